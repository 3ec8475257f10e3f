//! A node's link: how xlb serves the Service traffic of the node it runs on, as kube-proxy
//! does — connections from the node's pods and from the node's own processes (kubelet,
//! hostNetwork pods) to ClusterIPs, node ports and every other VIP — with any CNI that routes
//! pod traffic through the node, and without per-pod configuration.
//!
//! Owns: the veth pair xlb creates (`xlb0`, the kernel's end; `xlb1`, the one workers serve),
//! its sysctls, the policy routing that sends packets into it, the nftables table `inet xlb`
//! that marks them, and keeping that table's sets in step with each snapshot (on a thread of
//! its own: `nft` runs there, never on the control loop). Everything it creates is removed
//! when it is dropped, and replaced when a crashed xlb left it behind.
//!
//! Must not know: packet bytes, workers, where Services come from.
//!
//! # DESIGN
//! An AF_XDP socket only receives what arrives on the device it is bound to, and a pod's or
//! the node's packet to a ClusterIP arrives on no device xlb serves: it is routed by the
//! node's kernel. So the kernel routes it to xlb: the `inet xlb` table marks
//! * packets to a Service (destination address, protocol and port in `services4/6`),
//! * and the replies of the flows xlb translated, wherever they come from (a local pod's
//!   veth, the uplink, an overlay): every packet xlb sends to the kernel sets the mark bit in
//!   its connection-tracking entry (`ct mark`), and a packet in the reply direction of such
//!   an entry is marked. A backend's answer to a client that connected to it directly, not
//!   through a Service, has no such entry and never reaches xlb; an entry outlives an xlb
//!   restart, so the replies of flows xlb lost still come to it and their flows are
//!   recreated (`decide`).
//!
//! in `prerouting` (pods, and the outside) and `output` (the node's own processes, a route
//! chain, so the marked packet is routed again). A rule before the kernel's `local` rule
//! (moved from priority 0 to 100) sends marked packets to a table whose only route is the
//! link, so even replies addressed to the node itself go to xlb first. The filter takes every
//! unicast IP packet on `xlb1` (a "link port", `filter.c`), the worker translates it as it
//! does on any port, and every translated packet leaves by `xlb1` again, to `xlb0`: the kernel
//! receives it from the link, as if from a neighbour, and routes it on with its own tables —
//! to a local pod, to another node through whatever the CNI set up, or to a local socket. A
//! packet xlb finds is not its own after all is handed back the same way, unchanged. What
//! comes back from `xlb0` is never marked again (its rule returns before the marking), so
//! nothing loops.
//!
//! What the kernel must allow for that, set here on the link: `arp off` on `xlb0` (the kernel
//! addresses frames to the link with `xlb0`'s own MAC, no neighbour resolution), no IPv6
//! addresses on either end (no neighbour discovery or DAD across the pair), loose reverse-path
//! filtering (a pod's translated packet arrives on `xlb0`, not on the pod's veth) with an
//! IPv4 address on `xlb0` (`node.address`, scope link: the filter refuses everything from a
//! device without one, whatever its mode) and `accept_local` on `xlb0` (the node's own
//! connections come back with the node's address as their source). Forwarding must be on, as
//! on every node (checked, not changed).
//!
//! Traffic to a VIP address on a port no Service has is refused in `forward` and `output`
//! (TCP reset, ICMP port unreachable), as kube-proxy's nftables mode does, instead of leaking
//! through the default route.
//!
//! The alternative, XDP on every pod's veth (found by name patterns, attached as pods come),
//! needs a socket per pod interface per worker and misses the node's own connections; the
//! link serves both with one socket per worker. Its price is one more pass through the
//! kernel's receive path per packet (xlb0 → xlb1 → xlb0), which `bench/` measures against
//! the kernel's own nftables DNAT for the same traffic.

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{info, warn};
use xlb_dataplane::lb::snapshot::Snapshot;
use xlb_dataplane::packet::IpProto;
use xlb_dataplane::worker::NextHop;

use crate::config::{NodeConfig, LOCAL_RULE_PRIORITY};
use crate::netlink::Port;

/// The nftables table xlb owns.
const TABLE: &str = "xlb";
/// Elements per `add element` statement (nft takes long lines, but not unbounded ones).
const CHUNK: usize = 4096;

/// The link, up, with its routing and marking in place.
#[derive(Debug)]
pub struct NodeLink {
    config: NodeConfig,
    /// The kernel's end.
    pub link: Port,
    /// xlb's end.
    pub peer: Port,
    ipv6: bool,
    sets: Option<SetWriter>,
}

impl NodeLink {
    /// Creates the veth pair with `queues` queues a side (one per worker), and the sysctls,
    /// routes, rules and nftables table that route Service traffic into it. A pair or table
    /// left by a crashed xlb is replaced.
    ///
    /// # Errors
    /// A message naming the step the kernel refused (and what to check).
    pub fn up(config: &NodeConfig, queues: u32) -> Result<Self, String> {
        if read_sysctl("net/ipv4/ip_forward").as_deref() != Some("1") {
            return Err(
                "node: net.ipv4.ip_forward is off; a node that forwards its pods' \
                        traffic needs it on (sysctl -w net.ipv4.ip_forward=1)"
                    .into(),
            );
        }
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        let (link, peer) = (config.link.as_str(), config.peer.as_str());
        let _ = ip(&["link", "del", link]);
        let _ = ip(&["link", "del", peer]);
        let q = queues.max(1).to_string();
        ip(&[
            "link",
            "add",
            link,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ])?;
        // From here on, a failure removes what was made (Drop).
        let mut this = Self {
            config: config.clone(),
            link: Port::lookup(link)?,
            peer: Port::lookup(peer)?,
            ipv6,
            sets: None,
        };
        for end in [link, peer] {
            ip(&["link", "set", end, "addrgenmode", "none"])?;
        }
        ip(&["link", "set", link, "arp", "off"])?;
        // Without an IPv4 address on the device, reverse-path filtering (strict or loose)
        // refuses everything that arrives on it.
        ip(&[
            "addr",
            "add",
            &format!("{}/32", config.address),
            "dev",
            link,
            "scope",
            "link",
        ])?;
        write_sysctl(&format!("net/ipv4/conf/{link}/rp_filter"), "2")?;
        write_sysctl(&format!("net/ipv4/conf/{link}/accept_local"), "1")?;
        // The kernel never forwards what reaches xlb's end (the filter drops the link's
        // traffic while no worker serves it).
        write_sysctl(&format!("net/ipv4/conf/{peer}/forwarding"), "0")?;
        if ipv6 {
            write_sysctl(&format!("net/ipv6/conf/{peer}/disable_ipv6"), "1")?;
            if read_sysctl("net/ipv6/conf/all/forwarding").as_deref() != Some("1") {
                warn!("net.ipv6.conf.all.forwarding is off: IPv6 pods' Service traffic is not forwarded");
            }
        }
        for end in [peer, link] {
            ip(&["link", "set", end, "up"])?;
        }
        // The MACs are final once the pair exists; read again for the log's sake.
        this.link = Port::lookup(link)?;
        this.peer = Port::lookup(peer)?;
        let table = config.table.to_string();
        let priority = config.rule_priority.to_string();
        let mark = format!("{:#x}/{:#x}", config.mark, config.mark);
        for family in this.families() {
            ip(&[
                family, "route", "replace", "default", "dev", link, "table", &table,
            ])?;
            while ip(&[family, "rule", "del", "priority", &priority]).is_ok() {}
            ip(&[
                family, "rule", "add", "priority", &priority, "fwmark", &mark, "lookup", &table,
            ])?;
            move_local_rule(family, 0, LOCAL_RULE_PRIORITY)?;
        }
        nft(&ruleset(config))?;
        this.sets = Some(SetWriter::spawn()?);
        info!(
            link,
            peer,
            table = config.table,
            mark = format!("{:#x}", config.mark),
            "node link up: Service traffic of the node and its pods is routed to xlb"
        );
        Ok(this)
    }

    fn families(&self) -> Vec<&'static str> {
        if self.ipv6 {
            vec!["-4", "-6"]
        } else {
            vec!["-4"]
        }
    }

    /// Where workers send what goes back to the kernel: out of `peer` (port number
    /// `port` among the workers' ports) to `link`.
    #[must_use]
    pub fn hand_back(&self, port: u16) -> NextHop {
        NextHop {
            port,
            src_mac: self.peer.mac,
            dst_mac: self.link.mac,
        }
    }

    /// Brings the nftables sets in step with `snapshot` (on the link's own thread; the last
    /// snapshot offered wins). `local` are the node's own addresses: a node port's VIP is one,
    /// and traffic to them on other ports is not refused.
    pub fn steer(&self, snapshot: Arc<Snapshot>, local: Arc<Vec<IpAddr>>) {
        if let Some(sets) = &self.sets {
            sets.offer(snapshot, local);
        }
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        drop(self.sets.take());
        let _ = nft(&format!("delete table inet {TABLE}\n"));
        let priority = self.config.rule_priority.to_string();
        for family in self.families() {
            while ip(&[family, "rule", "del", "priority", &priority]).is_ok() {}
            let _ = move_local_rule(family, LOCAL_RULE_PRIORITY, 0);
        }
        // Deleting one end deletes the pair, its routes and its XDP program.
        let _ = ip(&["link", "del", &self.config.link]);
        info!(link = %self.config.link, "node link removed");
    }
}

/// Warns when xlb's SNAT ports overlap the node's own ephemeral ports: a node socket and a
/// masqueraded flow could then share an address and port towards the same backend.
pub fn warn_if_ports_overlap(first: u16, last: u16) {
    let Some(range) = read_sysctl("net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut bounds = range
        .split_whitespace()
        .filter_map(|b| b.parse::<u16>().ok());
    if let (Some(low), Some(high)) = (bounds.next(), bounds.next()) {
        if first <= high && low <= last {
            warn!(
                snat_ports = format!("{first}-{last}"),
                local_ports = format!("{low}-{high}"),
                "snat ports overlap net.ipv4.ip_local_port_range: give snat.first_port and \
                 last_port a range the node's own sockets do not use"
            );
        }
    }
}

/// The `inet xlb` table (replacing any left behind), with empty sets.
fn ruleset(config: &NodeConfig) -> String {
    let mark = format!("{:#x}", config.mark);
    let link = &config.link;
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
	set services4 {{ type ipv4_addr . inet_proto . inet_service; }}
	set services6 {{ type ipv6_addr . inet_proto . inet_service; }}
	set vips4 {{ type ipv4_addr; }}
	set vips6 {{ type ipv6_addr; }}
	chain steer {{
		ct direction reply ct mark & {mark} == {mark} meta mark set meta mark | {mark} return
		ip daddr . meta l4proto . th dport @services4 meta mark set meta mark | {mark} return
		ip6 daddr . meta l4proto . th dport @services6 meta mark set meta mark | {mark} return
	}}
	chain prerouting {{
		type filter hook prerouting priority mangle; policy accept;
		iifname \"{link}\" ct mark set ct mark | {mark} return
		jump steer
	}}
	chain output {{
		type route hook output priority mangle; policy accept;
		jump steer
	}}
	chain refuse {{
		meta mark & {mark} == {mark} return
		ip daddr @vips4 meta l4proto tcp reject with tcp reset
		ip daddr @vips4 reject with icmp port-unreachable
		ip6 daddr @vips6 meta l4proto tcp reject with tcp reset
		ip6 daddr @vips6 reject with icmpv6 port-unreachable
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		jump refuse
	}}
	chain local_out {{
		type filter hook output priority filter; policy accept;
		jump refuse
	}}
}}
"
    )
}

/// One element of a set: the set's name and the element as nft writes it.
type Element = (&'static str, String);

/// Every element the sets should hold for `snapshot`.
fn elements(snapshot: &Snapshot, local: &[IpAddr]) -> HashSet<Element> {
    let mut out = HashSet::new();
    let v = |ip: IpAddr, four: &'static str, six: &'static str| {
        if ip.is_ipv4() {
            four
        } else {
            six
        }
    };
    for service in snapshot.services() {
        let spec = service.spec();
        let vip = spec.key.vip;
        let proto = spec.key.proto;
        if !matches!(proto, IpProto::TCP | IpProto::UDP | IpProto::SCTP) {
            continue;
        }
        let key = |ip: IpAddr, port: u16| format!("{ip} . {} . {port}", proto.0);
        out.insert((
            v(vip.ip(), "services4", "services6"),
            key(vip.ip(), vip.port()),
        ));
        if !local.contains(&vip.ip()) {
            out.insert((v(vip.ip(), "vips4", "vips6"), vip.ip().to_string()));
        }
    }
    out
}

/// The nft script that turns `from` into `to`.
fn script(from: &HashSet<Element>, to: &HashSet<Element>) -> String {
    let mut out = String::new();
    for (verb, elements) in [
        ("delete", from.difference(to).collect::<Vec<_>>()),
        ("add", to.difference(from).collect::<Vec<_>>()),
    ] {
        let mut by_set: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (set, element) in elements {
            by_set.entry(set).or_default().push(element);
        }
        for (set, elements) in by_set {
            for chunk in elements.chunks(CHUNK) {
                out.push_str(&format!(
                    "{verb} element inet {TABLE} {set} {{ {} }}\n",
                    chunk.join(", ")
                ));
            }
        }
    }
    out
}

/// What the set writer is offered: the newest snapshot and the node's addresses.
type Offer = (Arc<Snapshot>, Arc<Vec<IpAddr>>);

/// The thread that writes the sets; it ends when this is dropped.
#[derive(Debug)]
struct SetWriter {
    offers: Option<Sender<Offer>>,
    thread: Option<JoinHandle<()>>,
}

impl SetWriter {
    fn spawn() -> Result<Self, String> {
        let (offers, offered) = channel();
        let thread = std::thread::Builder::new()
            .name("xlb-node-sets".into())
            .spawn(move || write_sets(&offered))
            .map_err(|e| format!("node: cannot start the set writer: {e}"))?;
        Ok(Self {
            offers: Some(offers),
            thread: Some(thread),
        })
    }

    fn offer(&self, snapshot: Arc<Snapshot>, local: Arc<Vec<IpAddr>>) {
        if let Some(offers) = &self.offers {
            let _ = offers.send((snapshot, local));
        }
    }
}

impl Drop for SetWriter {
    fn drop(&mut self) {
        drop(self.offers.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer's loop: takes the newest offer, writes the difference from what the sets hold;
/// a refused write (someone changed the table) rewrites the sets whole at the next offer.
fn write_sets(offered: &Receiver<Offer>) {
    let mut applied: Option<HashSet<Element>> = Some(HashSet::new());
    while let Ok(first) = offered.recv() {
        // Only the newest snapshot matters.
        let (snapshot, local) = offered.try_iter().last().unwrap_or(first);
        let wanted = elements(&snapshot, &local);
        let text = match &applied {
            Some(now) => script(now, &wanted),
            None => {
                let flush: String = SETS
                    .iter()
                    .map(|set| format!("flush set inet {TABLE} {set}\n"))
                    .collect();
                flush + &script(&HashSet::new(), &wanted)
            }
        };
        if text.is_empty() {
            continue;
        }
        match nft(&text) {
            Ok(()) => applied = Some(wanted),
            Err(e) => {
                warn!(error = %e, "node: nftables refused a set update; rewriting the sets whole next time");
                applied = None;
            }
        }
    }
}

/// The sets of the table.
const SETS: [&str; 4] = ["services4", "services6", "vips4", "vips6"];

/// Moves the kernel's `local` rule from priority `from` to `to`, if it is at `from`.
fn move_local_rule(family: &str, from: u32, to: u32) -> Result<(), String> {
    let (from, to) = (from.to_string(), to.to_string());
    let shown = output(Command::new("ip").args([family, "rule", "show", "priority", &from]))?;
    if !shown.contains("lookup local") {
        return Ok(());
    }
    ip(&[family, "rule", "add", "priority", &to, "lookup", "local"])?;
    ip(&[family, "rule", "del", "priority", &from, "lookup", "local"])
}

fn ip(args: &[&str]) -> Result<(), String> {
    output(Command::new("ip").args(args)).map(drop)
}

/// Runs `nft -f -` on `script`.
fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("node: cannot run nft (the nftables package): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("node: nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("node: nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "node: nft refused the table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(command: &mut Command) -> Result<String, String> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .map_err(|e| format!("node: cannot run {shown} (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "node: {shown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn write_sysctl(name: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("/proc/sys/{name}"), value)
        .map_err(|e| format!("node: cannot set {}: {e}", name.replace('/', ".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[(&'static str, &str)]) -> HashSet<Element> {
        items.iter().map(|(s, e)| (*s, (*e).to_owned())).collect()
    }

    #[test]
    fn a_set_update_deletes_what_went_and_adds_what_came_grouped_by_set() {
        let from = set(&[
            ("services4", "198.18.0.1 . 6 . 80"),
            ("services4", "198.18.1.1 . 6 . 8080"),
        ]);
        let to = set(&[
            ("services4", "198.18.0.1 . 6 . 80"),
            ("services4", "198.18.1.2 . 6 . 8080"),
            ("vips6", "2001:2::1"),
        ]);
        assert_eq!(
            script(&from, &to),
            "delete element inet xlb services4 { 198.18.1.1 . 6 . 8080 }\n\
             add element inet xlb services4 { 198.18.1.2 . 6 . 8080 }\n\
             add element inet xlb vips6 { 2001:2::1 }\n"
        );
        assert_eq!(script(&to, &to), "");
    }

    #[test]
    fn the_ruleset_marks_with_the_configured_bit_and_skips_what_comes_back_from_the_link() {
        let config = NodeConfig {
            link: "xl0".into(),
            peer: "xl1".into(),
            mark: 0x100,
            table: 7,
            rule_priority: 9,
            address: [169, 254, 0, 1].into(),
        };
        let text = ruleset(&config);
        assert!(
            text.contains("iifname \"xl0\" ct mark set ct mark | 0x100 return"),
            "{text}"
        );
        assert!(
            text.contains("ct direction reply ct mark & 0x100 == 0x100"),
            "{text}"
        );
        assert!(
            text.contains("meta mark set meta mark | 0x100 return"),
            "{text}"
        );
        assert!(text.contains("meta mark & 0x100 == 0x100 return"), "{text}");
    }
}
