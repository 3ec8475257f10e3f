//! The file source: xlb's YAML configuration, parsed and validated.
//!
//! Owns: the schema (documented with a commented example in `deploy/examples/xlb.yaml`),
//! parse errors that name the line, column and field, and semantic checks that name the field
//! path. It produces a [`Config`]; turning its Services into a snapshot is `translate`'s job.
//!
//! Must not know: packet bytes, workers, the kernel.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;
use xlb_dataplane::lb::flow::FlowTable;

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
    pub cluster_cidrs: Vec<crate::desired::Cidr>,
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
    /// Flow table entries (two per connection).
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: usize,
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
    pub node_port_addresses: Vec<crate::desired::Cidr>,
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
    pub source_ranges: Vec<crate::desired::Cidr>,
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

/// Why a configuration is refused. The message names where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the file at `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file and where in it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Parses and validates YAML text.
    ///
    /// # Errors
    /// A [`ConfigError`]: syntax and schema errors give the field path, line and column;
    /// semantic errors the field path.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml_ng::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config
            .validate()
            .map_err(|e| ConfigError(with_line(text, &e.0)))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.interfaces.is_empty() && self.node.is_none() {
            return fail("interfaces: at least one interface is needed (or a node section)".into());
        }
        if let Some(node) = &self.node {
            if let Some(why) = node_problem(node, &self.interfaces) {
                return fail(why);
            }
        }
        if let Some(twice) = first_repeated(&self.interfaces) {
            return fail(format!("interfaces: {twice} is named twice"));
        }
        if self.interfaces.len() > MAX_INTERFACES {
            return fail(format!("interfaces: at most {MAX_INTERFACES}"));
        }
        if let Some(m) = self.maglev_table_size {
            if !xlb_dataplane::lb::maglev::is_valid_table_size(m) {
                return fail(format!(
                    "maglev_table_size: {m} is not a prime from 251 to 131071"
                ));
            }
        }
        if self.cores.is_empty() {
            return fail("cores: at least one core is needed".into());
        }
        if let Some(twice) = first_repeated(&self.cores) {
            return fail(format!(
                "cores: core {twice} is named twice (one worker per core)"
            ));
        }
        if self.queue + u32::try_from(self.cores.len()).unwrap_or(u32::MAX) > MAX_QUEUES {
            return fail(format!(
                "queue: queues {}..{} go past the filter's {MAX_QUEUES}",
                self.queue,
                u64::from(self.queue) + self.cores.len() as u64
            ));
        }
        if !(MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&self.flow_capacity) {
            return fail(format!(
                "flow_capacity: {} is outside {MIN_FLOW_CAPACITY}..={MAX_FLOW_CAPACITY} entries \
                 ({} bytes each; the most takes {} GiB)",
                self.flow_capacity,
                xlb_dataplane::lb::flow::ENTRY_BYTES,
                FlowTable::memory_for(MAX_FLOW_CAPACITY) >> 30
            ));
        }
        if let Some(dsr) = &self.dsr {
            if self.mode != ModeConfig::Dsr {
                return fail("dsr: only with mode: dsr".into());
            }
            if dsr.ipv4.is_none() && dsr.ipv6.is_none() {
                return fail("dsr: give ipv4, ipv6 or both (the outer source addresses)".into());
            }
            if dsr.mtu < 1280 {
                return fail(format!(
                    "dsr.mtu: {} is below IPv6's minimum of 1280",
                    dsr.mtu
                ));
            }
        }
        if self.mode == ModeConfig::Dsr {
            if self.node.is_some() {
                return fail(
                    "mode: dsr cannot serve a node's own traffic (node): backends \
                             would answer the node's pods from the VIP directly"
                        .into(),
                );
            }
            if !self.cluster_cidrs.is_empty() {
                return fail("cluster_cidrs: dsr mode translates no address".into());
            }
        }
        if !self.cluster_cidrs.is_empty() && self.mode == ModeConfig::Snat {
            return fail(
                "cluster_cidrs: only in dnat mode (snat mode masquerades every client)".into(),
            );
        }
        if self.snat.is_none() && self.mode == ModeConfig::Snat {
            return fail("mode: snat needs an snat section with an address".into());
        }
        if self.snat.is_none() && !self.cluster_cidrs.is_empty() {
            return fail(
                "cluster_cidrs: clients outside them are masqueraded: an snat section with an \
                 address is needed"
                    .into(),
            );
        }
        if let Some(snat) = &self.snat {
            if snat.ipv4.is_none() && snat.ipv6.is_none() {
                return fail("snat: give ipv4, ipv6 or both".into());
            }
            if snat.first_port == 0 || snat.first_port > snat.last_port {
                return fail("snat.first_port: must be non-zero and at most last_port".into());
            }
            for (field, addr) in [
                ("ipv4", snat.ipv4.map(IpAddr::V4)),
                ("ipv6", snat.ipv6.map(IpAddr::V6)),
            ] {
                if let Some(why) = addr.and_then(not_a_host) {
                    return fail(format!(
                        "snat.{field}: {} is {why}",
                        addr.unwrap_or(IpAddr::from([0; 4]))
                    ));
                }
            }
        }
        if let Some(k) = &self.kubernetes {
            if k.min_sync_period_ms > 1000 {
                return fail("kubernetes.min_sync_period_ms: at most 1000".into());
            }
            if k.health_timeout_s == 0 {
                return fail("kubernetes.health_timeout_s: at least 1".into());
            }
        }
        let mut seen = std::collections::HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", service.name);
            if let Some(why) = not_a_host(service.vip) {
                return fail(format!("{at}.vip: {} is {why}", service.vip));
            }
            if service.ports.is_empty() {
                return fail(format!("{at}.ports: at least one port"));
            }
            for (j, port) in service.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == Some(0) {
                    return fail(format!("{at}.ports[{j}]: port 0 is not a Service port"));
                }
                if let Some(first) =
                    seen.insert((service.vip, port.port, port.protocol), at.clone())
                {
                    return fail(format!(
                        "{at}.ports[{j}]: {}:{} {:?} is already a port of {first}",
                        service.vip, port.port, port.protocol
                    ));
                }
            }
            let mut addresses = std::collections::HashSet::new();
            for (j, backend) in service.backends.iter().enumerate() {
                let address = backend.address;
                if address.is_ipv4() != service.vip.is_ipv4() {
                    return fail(format!(
                        "{at}.backends[{j}].address: {address} is not of the VIP's family"
                    ));
                }
                if let Some(why) = not_a_host(address) {
                    return fail(format!("{at}.backends[{j}].address: {address} is {why}"));
                }
                if address == service.vip {
                    return fail(format!(
                        "{at}.backends[{j}].address: {address} is the Service's own VIP"
                    ));
                }
                if !addresses.insert(address) {
                    return fail(format!(
                        "{at}.backends[{j}].address: {address} is a backend of {} twice",
                        service.name
                    ));
                }
            }
            if let Some(size) = service.table_size {
                if !xlb_dataplane::lb::maglev::is_valid_table_size(size) {
                    return fail(format!(
                        "{at}.table_size: {size} is not a prime from 251 to 131071"
                    ));
                }
            }
            if let Some(dsr) = &self.dsr {
                let has = if service.vip.is_ipv4() {
                    dsr.ipv4.is_some()
                } else {
                    dsr.ipv6.is_some()
                };
                if !has {
                    return fail(format!("{at}.vip: dsr has no outer address of this family"));
                }
            }
            if self.mode == ModeConfig::Dsr {
                if let Some((j, p)) = service
                    .ports
                    .iter()
                    .enumerate()
                    .find(|(_, p)| p.target_port.is_some_and(|t| t != p.port))
                {
                    return fail(format!(
                        "{at}.ports[{j}].target_port: dsr mode sends packets unchanged, so a \
                         backend serves the Service port itself ({}), not another",
                        p.port
                    ));
                }
            }
            if self.mode == ModeConfig::Snat {
                let snat = self.snat.as_ref();
                let has = if service.vip.is_ipv4() {
                    snat.and_then(|s| s.ipv4).is_some()
                } else {
                    snat.and_then(|s| s.ipv6).is_some()
                };
                if !has {
                    return fail(format!("{at}.vip: snat has no address of this family"));
                }
            }
        }
        Ok(())
    }
}

/// Interfaces the XDP filter can serve (`port_base` slots in `bpf/filter.c`).
pub const MAX_INTERFACES: usize = 64;
/// Receive queues per interface the filter can serve (`XSK_QUEUES` in `bpf/filter.c`).
pub const MAX_QUEUES: u32 = 64;
/// The smallest flow table (one bucket pair per 16 entries: smaller tables overflow at once).
pub const MIN_FLOW_CAPACITY: usize = 1024;
/// The largest flow table: 64 Mi entries, 4 GiB.
pub const MAX_FLOW_CAPACITY: usize = 1 << 26;

/// Why `addr` cannot be a VIP, a backend or an SNAT address, if it cannot: no host sends from
/// or answers at it.
fn not_a_host(addr: IpAddr) -> Option<&'static str> {
    match addr {
        _ if addr.is_unspecified() => Some("the unspecified address"),
        _ if addr.is_loopback() => Some("a loopback address"),
        _ if addr.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("in 0.0.0.0/8 (\"this network\")"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("an IPv4-mapped address"),
        _ => None,
    }
}

/// What is wrong with a node section, if anything: names the kernel cannot take, a link that
/// is also a served interface, a mark that is not one bit.
fn node_problem(node: &NodeConfig, interfaces: &[String]) -> Option<String> {
    for (field, name) in [("link", &node.link), ("peer", &node.peer)] {
        // IFNAMSIZ is 16 with the terminating zero.
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) {
            return Some(format!("node.{field}: {name:?} is not an interface name"));
        }
        if interfaces.contains(name) {
            return Some(format!(
                "node.{field}: {name} is xlb's own link; do not list it in interfaces"
            ));
        }
    }
    if node.link == node.peer {
        return Some("node.peer: must differ from node.link".into());
    }
    if let Some(why) = not_a_host(IpAddr::V4(node.address)) {
        return Some(format!("node.address: {} is {why}", node.address));
    }
    if node.mark.count_ones() != 1 {
        return Some(format!("node.mark: {:#x} is not a single bit", node.mark));
    }
    if node.table == 0 || (253..=255).contains(&node.table) {
        return Some(format!(
            "node.table: {} is one of the kernel's own tables",
            node.table
        ));
    }
    if node.rule_priority == 0 || node.rule_priority >= LOCAL_RULE_PRIORITY {
        return Some(format!(
            "node.rule_priority: {} must be between 1 and {} (the local rule moves to {LOCAL_RULE_PRIORITY})",
            node.rule_priority,
            LOCAL_RULE_PRIORITY - 1
        ));
    }
    None
}

/// Where a node's `local` routing rule is moved to, after xlb's (see `node_link`).
pub const LOCAL_RULE_PRIORITY: u32 = 100;

/// The first item that appears twice.
fn first_repeated<T: PartialEq + core::fmt::Display>(items: &[T]) -> Option<&T> {
    items
        .iter()
        .enumerate()
        .find(|(i, item)| items[..*i].contains(item))
        .map(|(_, item)| item)
}

/// Adds the line a semantic error is about: the `services` item it names, or the top-level
/// field it starts with (serde's own errors carry their line already).
fn with_line(text: &str, message: &str) -> String {
    let line = if let Some(rest) = message.strip_prefix("services[") {
        rest.split(']')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| service_line(text, i))
    } else {
        let field = message.split(['.', ':']).next().unwrap_or_default();
        text.lines()
            .position(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
            .map(|i| i + 1)
    };
    match line {
        Some(line) => format!("{message} (line {line})"),
        None => message.to_owned(),
    }
}

/// The line of the `index`-th item of the top-level `services` list (block style).
fn service_line(text: &str, index: usize) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.starts_with("services:"))?;
    let mut indent = None;
    let mut seen = 0;
    for (n, line) in lines.iter().enumerate().skip(start + 1) {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let depth = line.len() - trimmed.len();
        if depth == 0 {
            break;
        }
        if trimmed.starts_with("- ") && indent.is_none_or(|d| d == depth) {
            indent = Some(depth);
            if seen == index {
                return Some(n + 1);
            }
            seen += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
interfaces: [xlb-c, xlb-b]
services:
  - name: web
    vip: 198.18.64.1
    ports:
      - { port: 80, target_port: 8080 }
      - { port: 53, protocol: udp }
    backends:
      - { address: 198.18.128.1 }
      - { address: 198.18.128.2, weight: 3, state: terminating }
    scheduler: least-connections
    session_affinity: {}
";

    #[test]
    fn a_good_file_parses_with_its_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.mode, ModeConfig::Dnat);
        assert_eq!(c.cores, vec![0]);
        let s = &c.services[0];
        assert_eq!(s.ports[1].protocol, ProtocolConfig::Udp);
        assert_eq!(s.backends[1].state, BackendStateConfig::Terminating);
        assert_eq!(s.session_affinity.unwrap().timeout_seconds, 10_800);
        assert_eq!(s.scheduler, SchedulerConfig::LeastConnections);
    }

    #[test]
    fn an_unknown_value_names_the_field_and_the_line() {
        let bad = GOOD.replace("protocol: udp", "protocol: dccp");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("services[0].ports[1].protocol"), "{e}");
        assert!(e.contains("line 8"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_refused_not_ignored() {
        let bad = GOOD.replace("scheduler:", "schedular:");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("schedular"), "{e}");
    }

    #[test]
    fn a_backend_of_the_other_family_is_refused_with_its_path_and_line() {
        let bad = GOOD.replace("198.18.128.2", "2001:2::2");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("services[0] (web).backends[1].address"), "{e}");
        assert!(e.ends_with("(line 4)"), "the Service's line: {e}");
    }

    #[test]
    fn a_semantic_error_in_a_later_service_names_that_services_line() {
        let two = format!("{GOOD}  - name: api\n    vip: 198.18.64.9\n    ports: []\n");
        let e = Config::parse(&two).unwrap_err().0;
        assert!(
            e.contains("services[1] (api).ports") && e.ends_with("(line 14)"),
            "{e}"
        );
        let e = Config::parse(&format!("mode: snat\n{GOOD}")).unwrap_err().0;
        assert!(e.ends_with("(line 1)"), "{e}");
    }

    #[test]
    fn a_port_given_twice_is_refused() {
        let bad = GOOD.replace("{ port: 53, protocol: udp }", "{ port: 80 }");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("already a port"), "{e}");
    }

    /// Issue 11, fault 9: `flow_capacity: 1e12` aborted on allocation and 2^64-1 panicked.
    #[test]
    fn unbounded_settings_are_refused_with_their_field_and_line() {
        for capacity in ["1000000000000", "18446744073709551615", "100000000", "1000"] {
            let bad = format!("flow_capacity: {capacity}\n{GOOD}");
            let e = Config::parse(&bad).unwrap_err().0;
            assert!(
                e.starts_with("flow_capacity:") && e.ends_with("(line 1)"),
                "{e}"
            );
        }
        let ok = format!("flow_capacity: {MAX_FLOW_CAPACITY}\n{GOOD}");
        assert!(Config::parse(&ok).is_ok());
        let e = Config::parse(&format!("cores: [0, 1, 0]\n{GOOD}"))
            .unwrap_err()
            .0;
        assert!(
            e.contains("cores: core 0 is named twice") && e.ends_with("(line 1)"),
            "{e}"
        );
        let twice = GOOD.replace("[xlb-c, xlb-b]", "[xlb-c, xlb-c]");
        let e = Config::parse(&twice).unwrap_err().0;
        assert!(e.contains("interfaces: xlb-c is named twice"), "{e}");
        let e = Config::parse(&format!("queue: 63\ncores: [0, 1]\n{GOOD}"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("queue:"), "{e}");
    }

    #[test]
    fn addresses_no_host_can_have_are_refused_as_vips_backends_and_snat_addresses() {
        for vip in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "0.1.2.3",
        ] {
            let bad = GOOD.replace("vip: 198.18.64.1", &format!("vip: {vip}"));
            let e = Config::parse(&bad).unwrap_err().0;
            assert!(
                e.contains("services[0] (web).vip") && e.ends_with("(line 4)"),
                "{e}"
            );
        }
        for backend in ["0.0.0.0", "127.0.0.2", "255.255.255.255", "198.18.64.1"] {
            let bad = GOOD.replace("198.18.128.1", backend);
            let e = Config::parse(&bad).unwrap_err().0;
            assert!(e.contains("backends[0].address"), "{e}");
        }
        let v6 = GOOD
            .replace("vip: 198.18.64.1", "vip: '2001:2::40:1'")
            .replace("198.18.128.1", "'::1'")
            .replace("198.18.128.2", "'2001:2::80:2'");
        assert!(Config::parse(&v6).unwrap_err().0.contains("loopback"));
        let snat = format!("mode: snat\nsnat: {{ ipv4: 0.0.0.0 }}\n{GOOD}");
        assert!(Config::parse(&snat).unwrap_err().0.contains("snat.ipv4"));
    }

    #[test]
    fn source_ranges_parse_as_prefixes_and_a_bad_one_names_its_field() {
        let with = GOOD.replace(
            "    scheduler: least-connections",
            "    source_ranges: [198.18.0.0/24, '2001:2::/48']\n    scheduler: least-connections",
        );
        let c = Config::parse(&with).unwrap();
        assert_eq!(c.services[0].source_ranges.len(), 2);
        let bad = with.replace("198.18.0.0/24", "198.18.0.0/40");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("services[0].source_ranges"), "{e}");
    }

    #[test]
    fn a_backend_named_twice_names_its_service_and_line() {
        let bad = GOOD.replace("198.18.128.2", "198.18.128.1");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(
            e.contains(
                "services[0] (web).backends[1].address: 198.18.128.1 is a backend of web twice"
            ) && e.ends_with("(line 4)"),
            "{e}"
        );
    }

    #[test]
    fn snat_mode_without_an_address_is_refused() {
        let bad = format!("mode: snat\n{GOOD}");
        assert!(Config::parse(&bad).unwrap_err().0.contains("snat"));
    }

    #[test]
    fn a_node_section_needs_no_interfaces_and_its_bad_values_are_named() {
        let node = GOOD.replace("interfaces: [xlb-c, xlb-b]", "interfaces: []\nnode: {}");
        let c = Config::parse(&node).unwrap();
        let n = c.node.unwrap();
        assert_eq!((n.link.as_str(), n.peer.as_str()), ("xlb0", "xlb1"));
        assert_eq!((n.mark, n.table, n.rule_priority), (0x8_0000, 4270, 90));
        for (field, value, says) in [
            ("mark", "0x3", "not a single bit"),
            ("table", "254", "kernel's own tables"),
            ("rule_priority", "100", "between 1 and 99"),
            ("link", "xlb-c", "do not list it in interfaces"),
            ("peer", "xlb0", "must differ"),
            ("address", "224.0.0.1", "multicast"),
            ("link", "a-name-far-too-long", "not an interface name"),
        ] {
            let bad = GOOD.replace(
                "interfaces: [xlb-c, xlb-b]",
                &format!("interfaces: [xlb-c]\nnode: {{ {field}: {value} }}"),
            );
            let e = Config::parse(&bad).unwrap_err().0;
            assert!(
                e.contains(&format!("node.{field}")) && e.contains(says),
                "{field}: {e}"
            );
        }
        let none = GOOD.replace("interfaces: [xlb-c, xlb-b]", "interfaces: []");
        assert!(Config::parse(&none).unwrap_err().0.contains("node section"));
    }

    #[test]
    fn detect_local_needs_dnat_mode_and_an_snat_address() {
        let cidrs = format!("cluster_cidrs: [198.18.128.0/17]\n{GOOD}");
        assert!(Config::parse(&cidrs)
            .unwrap_err()
            .0
            .contains("an snat section with an address is needed"));
        let with_pool = format!("snat: {{ ipv4: 198.18.0.9 }}\n{cidrs}");
        assert_eq!(
            Config::parse(&with_pool).unwrap().cluster_cidrs.len(),
            1,
            "dnat with a pool: detect-local"
        );
        let snat = format!("mode: snat\n{with_pool}");
        assert!(Config::parse(&snat)
            .unwrap_err()
            .0
            .contains("only in dnat mode"));
    }

    #[test]
    fn dsr_keeps_ports_and_its_encapsulation_needs_dsr_mode_and_an_outer_address() {
        let dsr = GOOD.replace("{ port: 80, target_port: 8080 }", "{ port: 80 }");
        assert!(Config::parse(&format!("mode: dsr\n{dsr}")).is_ok());
        let e = Config::parse(&format!("mode: dsr\n{GOOD}")).unwrap_err().0;
        assert!(e.contains("target_port") && e.contains("unchanged"), "{e}");
        let e = Config::parse(&format!(
            "dsr: {{ encapsulation: ipip, ipv4: 198.18.0.9 }}\n{dsr}"
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("only with mode: dsr"), "{e}");
        let e = Config::parse(&format!("mode: dsr\ndsr: {{ encapsulation: ipip }}\n{dsr}"))
            .unwrap_err()
            .0;
        assert!(e.contains("give ipv4, ipv6 or both"), "{e}");
        let v6_only =
            format!("mode: dsr\ndsr: {{ encapsulation: ipip, ipv6: '2001:2::9' }}\n{dsr}");
        assert!(Config::parse(&v6_only)
            .unwrap_err()
            .0
            .contains("no outer address of this family"));
        let node = format!("mode: dsr\nnode: {{}}\n{dsr}");
        assert!(Config::parse(&node).unwrap_err().0.contains("node"));
    }
}
