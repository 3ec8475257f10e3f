//! The file source: xlb's YAML configuration, parsed and validated.
//!
//! Owns: the schema (documented with a commented example in `deploy/examples/xlb.yaml`),
//! parse errors that name the line, column and field, and semantic checks that name the field
//! path (in the `validate` submodule, apart: the schema is read as a reference, the checks as
//! rules). It produces a [`Config`] and its Services as the desired state every source produces
//! ([`Config::desired`]); turning those into a snapshot is `translate`'s job.
//!
//! Must not know: packet bytes, workers, the kernel.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use crate::desired::{self, DesiredBackend, DesiredService, TrafficPolicy, VipKind};

mod error;
mod validate;
pub use error::ConfigError;
use validate::line_of;
pub use validate::{
    LOCAL_RULE_PRIORITY, MAX_FLOW_CAPACITY, MAX_INTERFACES, MAX_QUEUES, MIN_FLOW_CAPACITY,
};

#[cfg(test)]
mod tests;

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The ports (network interfaces) xlb serves.
    pub interfaces: Vec<String>,
    /// `dnat` (source-preserving, the default) or `snat`.
    #[serde(default)]
    pub mode: ModeConfig,
    /// The addresses and ports replaced sources get: every flow's in snat mode; in dnat mode
    /// the hairpin flows' and those of clients outside `cluster_cidrs` (on a node: the node's
    /// own addresses, and a port range outside `net.ipv4.ip_local_port_range`).
    #[serde(default)]
    pub snat: Option<SnatConfig>,
    /// kube-proxy's detect-local (`--cluster-cidr`, or the node's pod CIDR for NodeCIDR): in
    /// dnat mode, clients in these prefixes keep their address and all others are masqueraded
    /// to the `snat` addresses; empty: everyone keeps it.
    #[serde(default)]
    pub cluster_cidrs: Vec<desired::Cidr>,
    /// dsr mode: encapsulate each packet to its backend (routed backends, not on xlb's
    /// segment) instead of only readdressing its Ethernet frame.
    #[serde(default)]
    pub dsr: Option<DsrConfig>,
    /// xlb as this node's kube-proxy: the veth pair through which the kernel hands xlb the
    /// Service traffic of the node's own processes and of its pods (see
    /// `control/src/node_link.rs`).
    #[serde(default)]
    pub node: Option<NodeConfig>,
    /// The cores to run workers on, one worker each (default: core 0).
    #[serde(default = "default_cores")]
    pub cores: Vec<usize>,
    /// The first receive queue; worker i serves queue `queue + i` of every interface.
    #[serde(default)]
    pub queue: u32,
    /// How the XDP filter is attached: `native` (driver) or `skb` (generic).
    #[serde(default)]
    pub xdp_mode: XdpModeConfig,
    /// Bind AF_XDP sockets in zero-copy mode (not available on veth).
    #[serde(default)]
    pub zero_copy: bool,
    /// Preferred busy polling of the AF_XDP sockets (for cores dedicated to workers).
    #[serde(default)]
    pub busy_poll: bool,
    /// IPv4 flow table entries (two per connection, 40 bytes each).
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: usize,
    /// IPv6 flow table entries (72 bytes each); a quarter of `flow_capacity` when absent
    /// ([`Self::ipv6_flow_capacity`]).
    #[serde(default)]
    pub flow_capacity_ipv6: Option<usize>,
    /// Where the admin HTTP server listens.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// The Maglev table size of every Service that names none (the file's `table_size`, the
    /// `xlb.io/maglev-table-size` annotation): a prime from 251 to 131071. Without it, a
    /// Service's table grows with its backend count, and a table of another size moves most
    /// flows: gateways behind ECMP should fix it (65537 as Katran). At the next start.
    #[serde(default)]
    pub maglev_table_size: Option<u32>,
    /// The Services.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// The Kubernetes source: Services and EndpointSlices from the API server (beside the
    /// file's `services`; a key both name stays with its first claimant, the other's claim
    /// waiting until it is let go).
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    /// A number the file's editor may carry: `xlb_config_generation` shows it once the file
    /// is live, so a tool can wait for its own edit.
    #[serde(default)]
    pub generation: Option<u64>,
}

/// Where and how to watch the Kubernetes API.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; without it, the in-cluster service account, then `$KUBECONFIG` or
    /// `~/.kube/config` (as kubectl does).
    #[serde(default)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// This node's name (for node-local policies and its zone); `--node-name` or the
    /// `NODE_NAME` environment variable (the downward API) give it otherwise.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The shortest time between two publications, in milliseconds: changes arriving
    /// within it are published together (default 10, at most 1000).
    #[serde(default = "default_min_sync_ms")]
    pub min_sync_period_ms: u64,
    /// Which addresses of xlb's interfaces serve node ports (kube-proxy's
    /// `--nodeport-addresses`): those in any of these prefixes; empty: all of them.
    #[serde(default)]
    pub node_port_addresses: Vec<desired::Cidr>,
    /// Where kube-proxy's health server (`/healthz`, `/livez`) listens (kube-proxy's
    /// `--healthz-bind-address`, default `0.0.0.0:10256`); `null`: nowhere. The Services'
    /// healthCheckNodePorts are served on the node port addresses.
    #[serde(default = "default_health_address")]
    pub health_address: Option<SocketAddr>,
    /// How long a change may wait to be live before the health server says unhealthy, in
    /// seconds (default 60, as kube-proxy's twice 30 s sync period).
    #[serde(default = "default_health_timeout_s")]
    pub health_timeout_s: u64,
}

fn default_min_sync_ms() -> u64 {
    10
}

#[allow(clippy::unnecessary_wraps)] // serde's default for an optional field
fn default_health_address() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 10256)))
}

fn default_health_timeout_s() -> u64 {
    crate::health::DEFAULT_TIMEOUT.as_secs()
}

/// Direct server return to routed backends: IP-in-IP (Katran's design; backends decapsulate
/// with an `ipip` / `ip6tnl` device holding the VIP).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DsrConfig {
    /// `ipip`: IPv4 in IPv4, IPv6 in IPv6.
    pub encapsulation: EncapsulationConfig,
    /// The outer source address of IPv4 packets (needed for IPv4 Services).
    #[serde(default)]
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// The outer source address of IPv6 packets (needed for IPv6 Services).
    #[serde(default)]
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// The largest IP packet the path to the backends takes, outer header included (default
    /// 1500); larger ones are answered with ICMP "too big".
    #[serde(default = "default_dsr_mtu")]
    pub mtu: u16,
}

/// How dsr packets reach routed backends.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EncapsulationConfig {
    /// IP in IP: an outer header of the packet's own family.
    Ipip,
}

fn default_dsr_mtu() -> u16 {
    1500
}

/// The node's link: names and the policy-routing numbers xlb takes.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The kernel's end of the veth pair, into which Service traffic is routed (default
    /// `xlb0`).
    #[serde(default = "default_link")]
    pub link: String,
    /// xlb's end, which workers serve (default `xlb1`).
    #[serde(default = "default_peer")]
    pub peer: String,
    /// The firewall mark bit that routes replies into the link (default 0x00080000; one bit
    /// no other user of marks on the node takes).
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// The routing table marked packets are routed by (default 4270).
    #[serde(default = "default_table")]
    pub table: u32,
    /// The priority of the rule that sends marked packets to that table (default 90; the
    /// kernel's `local` rule is moved from 0 to 100 so that it comes after).
    #[serde(default = "default_rule_priority")]
    pub rule_priority: u32,
    /// An IPv4 address for the link's kernel end (default 169.254.42.1, scope link): the
    /// kernel's reverse-path filter refuses every packet from a device without one.
    #[serde(default = "default_link_address")]
    pub address: std::net::Ipv4Addr,
}

fn default_link() -> String {
    "xlb0".into()
}
fn default_peer() -> String {
    "xlb1".into()
}
fn default_mark() -> u32 {
    0x0008_0000
}
fn default_table() -> u32 {
    4270
}
fn default_rule_priority() -> u32 {
    90
}
fn default_link_address() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(169, 254, 42, 1)
}

/// Forwarding mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    /// Destination NAT only; replies must route back through xlb.
    #[default]
    Dnat,
    /// Source and destination NAT; replies come back to xlb in any topology.
    Snat,
    /// Direct server return (L2): packets go to the backend unchanged but for their
    /// Ethernet addresses; backends on a directly connected segment hold the VIP on a
    /// loopback or dummy interface and answer clients directly.
    Dsr,
}

/// How the XDP filter is attached.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// In the driver.
    #[default]
    Native,
    /// Generic, after skb allocation.
    Skb,
}

/// snat mode's source addresses and ports.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnatConfig {
    /// The IPv4 source address (needed for IPv4 Services).
    #[serde(default)]
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// The IPv6 source address (needed for IPv6 Services).
    #[serde(default)]
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// The first source port (default 1024).
    #[serde(default = "default_first_port")]
    pub first_port: u16,
    /// The last source port (default 65535). Workers split the range.
    #[serde(default = "default_last_port")]
    pub last_port: u16,
}

/// One Service: a VIP with its ports and backends.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// A name for logs and the admin API.
    pub name: String,
    /// The virtual IP.
    pub vip: IpAddr,
    /// Its ports.
    pub ports: Vec<PortConfig>,
    /// Its backends.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// `maglev` (default), `random`, `round-robin` or `least-connections`.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Session affinity by client address.
    #[serde(default)]
    pub session_affinity: Option<AffinityConfig>,
    /// What a new flow gets when no backend can take it: `reject` (default) or `drop`.
    #[serde(default)]
    pub no_backend: NoBackendConfig,
    /// An explicit Maglev table size (a prime between 251 and 131071).
    #[serde(default)]
    pub table_size: Option<u32>,
    /// Client prefixes allowed to open flows (as Kubernetes' `loadBalancerSourceRanges`);
    /// empty: anyone.
    #[serde(default)]
    pub source_ranges: Vec<desired::Cidr>,
}

/// One port of a Service.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The Service port.
    pub port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// The backends' port (default: the Service port).
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// A transport protocol (in the file, and as `xlb explain`'s argument).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolConfig {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (single-homed associations: the address each packet carries is translated).
    Sctp,
}

/// One backend.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Its address.
    pub address: IpAddr,
    /// Relative share of new flows (default 1; 0 takes none).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// `ready` (default), `terminating` or `draining`.
    #[serde(default)]
    pub state: BackendStateConfig,
}

/// A backend's condition.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BackendStateConfig {
    /// Takes new flows.
    #[default]
    Ready,
    /// Keeps its flows; takes new ones only when nothing is ready.
    Terminating,
    /// Keeps its flows, takes no new ones.
    Draining,
}

/// A scheduler.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerConfig {
    /// Maglev consistent hashing.
    #[default]
    Maglev,
    /// Uniformly at random.
    Random,
    /// In turn.
    RoundRobin,
    /// Fewest live flows.
    LeastConnections,
}

/// Session affinity.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AffinityConfig {
    /// How long a client sticks to its backend after its last flow (default 10800 s, as
    /// Kubernetes).
    #[serde(default = "default_affinity")]
    pub timeout_seconds: u32,
}

/// The answer for "no usable backend".
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum NoBackendConfig {
    /// TCP reset or ICMP port unreachable.
    #[default]
    Reject,
    /// Silence.
    Drop,
}

fn default_cores() -> Vec<usize> {
    vec![0]
}
fn default_flow_capacity() -> usize {
    1 << 20
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_first_port() -> u16 {
    1024
}
fn default_last_port() -> u16 {
    65535
}
fn default_weight() -> u32 {
    1
}
fn default_affinity() -> u32 {
    10_800
}

impl Config {
    /// Reads and validates the file at `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file and where in it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse_file(path, &bytes)
    }

    /// Parses and validates `bytes`, the content of the file at `path` (the file source reads
    /// it itself, to hash it).
    ///
    /// # Errors
    /// As [`Config::parse`], in a [`ConfigError::InFile`] naming the file; or
    /// [`ConfigError::NotUtf8`].
    pub fn parse_file(path: &Path, bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8 {
            path: path.to_owned(),
        })?;
        Self::parse(text).map_err(|e| ConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(e),
        })
    }

    /// Parses and validates YAML text.
    ///
    /// # Errors
    /// A [`ConfigError`]: syntax and schema errors give the field path, line and column;
    /// semantic errors the field path.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Schema(e.to_string()))?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid {
                message,
                line: None,
            } => ConfigError::Invalid {
                line: line_of(text, &message),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }
}

impl Config {
    /// The IPv6 flow table's entries: `flow_capacity_ipv6`, or a quarter of `flow_capacity`.
    #[must_use]
    pub fn ipv6_flow_capacity(&self) -> usize {
        self.flow_capacity_ipv6.unwrap_or(self.flow_capacity / 4)
    }

    /// The file's Services as desired state: one per Service port.
    #[must_use]
    pub fn desired(&self) -> Vec<DesiredService> {
        let mut out = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            for port in &s.ports {
                let target = port.target_port.unwrap_or(port.port);
                out.push(DesiredService {
                    name: format!("services[{i}] ({})", s.name),
                    vip: s.vip,
                    port: port.port,
                    protocol: port.protocol.into(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| DesiredBackend {
                            address: b.address,
                            port: target,
                            weight: b.weight,
                            state: b.state.into(),
                            local: false,
                        })
                        .collect(),
                    scheduler: s.scheduler.into(),
                    affinity_timeout: s.session_affinity.map(|a| a.timeout_seconds),
                    no_backend: s.no_backend.into(),
                    table_size: s.table_size,
                    kind: VipKind::Configured,
                    source_ranges: s.source_ranges.clone().into(),
                    traffic_policy: TrafficPolicy::Cluster,
                });
            }
        }
        out
    }
}

impl From<ProtocolConfig> for desired::Protocol {
    fn from(p: ProtocolConfig) -> Self {
        match p {
            ProtocolConfig::Tcp => Self::Tcp,
            ProtocolConfig::Udp => Self::Udp,
            ProtocolConfig::Sctp => Self::Sctp,
        }
    }
}

impl From<BackendStateConfig> for desired::BackendState {
    fn from(s: BackendStateConfig) -> Self {
        match s {
            BackendStateConfig::Ready => Self::Ready,
            BackendStateConfig::Terminating => Self::Terminating,
            BackendStateConfig::Draining => Self::Draining,
        }
    }
}

impl From<SchedulerConfig> for desired::Scheduler {
    fn from(s: SchedulerConfig) -> Self {
        match s {
            SchedulerConfig::Maglev => Self::Maglev,
            SchedulerConfig::Random => Self::Random,
            SchedulerConfig::RoundRobin => Self::RoundRobin,
            SchedulerConfig::LeastConnections => Self::LeastConnections,
        }
    }
}

impl From<NoBackendConfig> for desired::NoBackend {
    fn from(n: NoBackendConfig) -> Self {
        match n {
            NoBackendConfig::Reject => Self::Reject,
            NoBackendConfig::Drop => Self::Drop,
        }
    }
}
