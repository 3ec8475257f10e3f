//! The configuration's semantic checks: what parses but cannot work (an unbounded table,
//! an address no host can have, a mode without what it needs), each refused with the field
//! path and, through [`line_of`], the line it is on.
//!
//! Must not know: the schema's parsing (serde does it, in the parent module), the kernel.

use std::net::IpAddr;

use xlb_dataplane::lb::flow::{ENTRY_BYTES_IPV4, ENTRY_BYTES_IPV6};

use super::{Config, ConfigError, ModeConfig, NodeConfig};

impl Config {
    /// Every semantic check, in the order of the file's fields: the first failure, naming
    /// its field path.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError::invalid(msg));
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
        let capacities = [
            ("flow_capacity", Some(self.flow_capacity), ENTRY_BYTES_IPV4),
            (
                "flow_capacity_ipv6",
                self.flow_capacity_ipv6,
                ENTRY_BYTES_IPV6,
            ),
        ];
        for (field, capacity, bytes) in capacities {
            let Some(capacity) = capacity else { continue };
            if !(MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&capacity) {
                return fail(format!(
                    "{field}: {capacity} is outside {MIN_FLOW_CAPACITY}..={MAX_FLOW_CAPACITY} \
                     entries ({bytes} bytes each; the most takes {} GiB)",
                    (MAX_FLOW_CAPACITY * bytes) >> 30
                ));
            }
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
/// The largest flow table of a family: 64 Mi entries, 2.5 GiB of IPv4 ones, 4.5 GiB of IPv6.
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

/// The line a semantic error is about: the `services` item it names, or the top-level
/// field it starts with (serde's own errors carry their line already).
pub(super) fn line_of(text: &str, message: &str) -> Option<usize> {
    if let Some(rest) = message.strip_prefix("services[") {
        rest.split(']')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| service_line(text, i))
    } else {
        let field = message.split(['.', ':']).next().unwrap_or_default();
        text.lines()
            .position(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
            .map(|i| i + 1)
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
