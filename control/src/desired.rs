//! The desired state: what every source (the file, Kubernetes) produces and `translate` turns
//! into a snapshot. One [`DesiredService`] per Service port and VIP, each backend with its own
//! port (Kubernetes' named target ports resolve per endpoint).
//!
//! Must not know: where it came from (the file's schema and Kubernetes' objects translate into
//! these types, not the other way round), packets, the kernel.

use std::net::IpAddr;
use std::sync::Arc;

/// The Service policies the dataplane carries out, named as it names them (no source's
/// words: the file and Kubernetes translate into these).
pub use xlb_dataplane::lb::snapshot::{BackendState, NoBackend, Scheduler};

/// What kind of address a VIP is, for the operator (`/services`) and for which policies
/// apply to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VipKind {
    /// Named in the configuration file.
    #[default]
    Configured,
    /// A Kubernetes Service's cluster IP.
    ClusterIp,
    /// An external IP (`spec.externalIPs`).
    ExternalIp,
    /// A load balancer's ingress IP (`status.loadBalancer.ingress[].ip`).
    LoadBalancer,
    /// A node address with a Service's node port.
    NodePort,
}

/// An IP prefix (`198.18.0.0/15`, `2001:2::/48`): an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address (bits past the length are ignored).
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Cidr {
    /// The dataplane's form of the prefix.
    #[must_use]
    pub fn prefix(&self) -> xlb_dataplane::lb::prefix::Prefix {
        let family = if self.addr.is_ipv4() {
            xlb_dataplane::packet::Family::Ipv4
        } else {
            xlb_dataplane::packet::Family::Ipv6
        };
        xlb_dataplane::lb::prefix::Prefix::new(
            family,
            xlb_dataplane::packet::key_addr(self.addr),
            self.len,
        )
    }

    /// Whether `addr` lies in the prefix.
    #[must_use]
    pub fn contains(&self, addr: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((prefix, width), (value, other)) = (bits(self.addr), bits(addr));
        let len = u32::from(self.len).min(width);
        width == other && ((prefix ^ value).checked_shr(128 - len).unwrap_or(0) == 0)
    }
}

impl core::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a prefix (address/length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: the length must be 0 to {max}"))?;
        Ok(Self { addr, len })
    }
}

impl core::fmt::Display for Cidr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One Service (VIP, port, protocol) and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DesiredService {
    /// Where it came from, for logs and errors (`services[2] (web)`, `default/web:http`).
    pub name: String,
    /// The VIP.
    pub vip: IpAddr,
    /// The Service port.
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The backends.
    pub backends: Vec<DesiredBackend>,
    /// How new flows pick a backend.
    pub scheduler: Scheduler,
    /// Session affinity timeout in seconds, if any.
    pub affinity_timeout: Option<u32>,
    /// What a new flow gets when no backend can take it.
    pub no_backend: NoBackend,
    /// An explicit Maglev table size.
    pub table_size: Option<u32>,
    /// What kind of address the VIP is.
    pub kind: VipKind,
    /// The client prefixes allowed to open flows; empty: anyone.
    pub source_ranges: Arc<[Cidr]>,
    /// Which endpoints it was given: all of them, or only this node's.
    pub traffic_policy: TrafficPolicy,
}

/// Which endpoints a VIP was given (Kubernetes' traffic policies: internal for a cluster IP,
/// external for the others), for the operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    /// Endpoints anywhere (the file's Services, and Kubernetes' default).
    #[default]
    Cluster,
    /// Only this node's endpoints.
    Local,
}

/// One backend of a [`DesiredService`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DesiredBackend {
    /// Its address.
    pub address: IpAddr,
    /// Its port.
    pub port: u16,
    /// Its share of new flows.
    pub weight: u32,
    /// Its condition.
    pub state: BackendState,
    /// Whether it runs on this node (Kubernetes' endpoint `nodeName`; the file's: never).
    pub local: bool,
}

/// A Service's transport protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_print_and_contain_what_they_should() {
        let p: Cidr = "198.18.0.0/15".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.0.0/15");
        assert!(p.contains("198.19.255.1".parse().unwrap()));
        assert!(!p.contains("198.20.0.1".parse().unwrap()));
        assert!(
            !p.contains("2001:2::1".parse().unwrap()),
            "families never mix"
        );
        let six: Cidr = "2001:2::/48".parse().unwrap();
        assert!(six.contains("2001:2:0:ffff::1".parse().unwrap()));
        assert!(!six.contains("2001:3::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in ["198.18.0.0", "198.18.0.0/33", "x/8", "2001:2::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
