//! Next hops from the kernel: routes and neighbours of the ports xlb serves, kept in step by
//! rtnetlink notifications, turned into the dataplane's `NextHops`; and the policy of asking
//! the kernel to resolve the addresses xlb needs.
//!
//! Owns: the view of the kernel's tables ([`KernelView`]), updated from the neighbour and
//! route notifications the kernel multicasts (a neighbour the node learns — a new client's
//! ARP request, say — is known to xlb within the notification's delivery, not at the next
//! periodic read), with a full re-read as a safety net; and [`Kernel::resolve`]: one
//! request per neighbour (backends behind one gateway share it), at most
//! [`RESOLVE_PER_ROUND`] per call, the rest carried over.
//!
//! Must not know: Services, snapshots, packets.

use std::collections::HashSet;
use std::net::IpAddr;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use hashbrown::HashMap;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::AsyncSocket;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::warn;
use xlb_dataplane::packet::{key_addr, Endpoint, Family, MacAddr};
use xlb_dataplane::worker::{prefix_matches, NextHop, NextHops, Route};

/// At most this many neighbours are asked for per call of [`Kernel::resolve`].
pub const RESOLVE_PER_ROUND: usize = 256;

/// A port xlb serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Its own Ethernet address.
    pub mac: MacAddr,
}

impl Port {
    /// The port named `name`, with its index and address.
    ///
    /// # Errors
    /// A message when there is no such interface or it has no Ethernet address.
    pub fn lookup(name: &str) -> Result<Self, String> {
        let ifindex = xlb_dataplane::xsk::interface_index(name).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
            .map_err(|e| format!("interface {name}: no Ethernet address ({e})"))?;
        let mac: MacAddr = text.parse().map_err(|e| format!("interface {name}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            ifindex,
            mac,
        })
    }
}

/// A route through one of the ports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KernelRoute {
    family: Family,
    prefix: [u8; 16],
    len: u8,
    gateway: Option<IpAddr>,
    port: usize,
}

/// What the kernel's tables say about the ports.
#[derive(Debug, Default)]
pub struct KernelView {
    /// Usable neighbours, by port and address.
    neighbours: HashMap<(usize, IpAddr), MacAddr>,
    routes: Vec<KernelRoute>,
}

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::Ipv4,
        IpAddr::V6(_) => Family::Ipv6,
    }
}

/// The neighbour and route notification groups (RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE,
/// RTMGRP_IPV6_ROUTE).
const GROUPS: u32 = rtnetlink::constants::RTMGRP_NEIGH
    | rtnetlink::constants::RTMGRP_IPV4_ROUTE
    | rtnetlink::constants::RTMGRP_IPV6_ROUTE;

/// The kernel's tables for xlb's ports, kept in step.
pub struct Kernel {
    handle: Handle,
    ports: Vec<Port>,
    view: KernelView,
    notifications: UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    /// Addresses to resolve at the next call of [`Self::resolve`] (carried over).
    pending: Vec<(Family, [u8; 16])>,
    /// On a node: the link to the kernel, the next hop of everything no port routes.
    fallback: Option<NextHop>,
}

impl core::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kernel")
            .field("ports", &self.ports)
            .field("neighbours", &self.view.neighbours.len())
            .field("routes", &self.view.routes.len())
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Opens a netlink connection subscribed to neighbour and route notifications (on the
    /// current tokio runtime) and reads the tables once.
    ///
    /// # Errors
    /// The netlink error, as text.
    pub async fn open(ports: Vec<Port>) -> Result<Self, String> {
        let (mut connection, handle, notifications) =
            rtnetlink::new_connection().map_err(|e| format!("cannot open netlink: {e}"))?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&rtnetlink::sys::SocketAddr::new(0, GROUPS))
            .map_err(|e| format!("cannot subscribe to neighbour and route changes: {e}"))?;
        tokio::spawn(connection);
        let mut kernel = Self {
            handle,
            ports,
            view: KernelView::default(),
            notifications,
            pending: Vec::new(),
            fallback: None,
        };
        kernel.reread().await?;
        Ok(kernel)
    }

    /// The addresses of the ports (for node ports), in port order; on a node (see
    /// [`Self::hand_back_to`]), those of every interface but loopback, since the kernel
    /// routes what reaches any of them to xlb.
    ///
    /// # Errors
    /// The netlink error, as text.
    pub async fn addresses(&self) -> Result<Vec<IpAddr>, String> {
        let mut out = Vec::new();
        let filters: Vec<Option<u32>> = if self.fallback.is_some() {
            vec![None]
        } else {
            self.ports.iter().map(|p| Some(p.ifindex)).collect()
        };
        for filter in filters {
            let mut request = self.handle.address().get();
            if let Some(ifindex) = filter {
                request = request.set_link_index_filter(ifindex);
            }
            let mut addresses = request.execute();
            while let Some(msg) = addresses.try_next().await.map_err(|e| e.to_string())? {
                for attr in &msg.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        // Link-local addresses (a node link's own, 169.254.42.1 by default,
                        // among them) serve nothing a Service is reached by.
                        let link_local = match ip {
                            IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
                            IpAddr::V4(v4) => v4.is_link_local(),
                        };
                        if !link_local && !ip.is_loopback() && !out.contains(ip) {
                            out.push(*ip);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// On a node: everything no port has a route for goes to the kernel through `link` (the
    /// node's link, [`crate::node_link`]), which routes it on.
    pub fn hand_back_to(&mut self, link: NextHop) {
        self.fallback = Some(link);
    }

    /// The next-hop table the view gives.
    #[must_use]
    pub fn next_hops(&self) -> NextHops {
        self.view.next_hops(&self.ports, self.fallback)
    }

    /// Reads every neighbour and route of the ports again (the safety net for a lost
    /// notification: the kernel drops them when the socket's buffer overflows).
    ///
    /// # Errors
    /// The netlink error, as text; the view is then unchanged.
    pub async fn reread(&mut self) -> Result<(), String> {
        let mut view = KernelView::default();
        let mut neighbours = self.handle.neighbours().get().execute();
        while let Some(msg) = neighbours.try_next().await.map_err(|e| e.to_string())? {
            view.apply_neighbour(&self.ports, &msg, true);
        }
        view.routes = self.read_routes().await?;
        self.view = view;
        Ok(())
    }

    async fn read_routes(&self) -> Result<Vec<KernelRoute>, String> {
        let mut out = Vec::new();
        for request in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(request).execute();
            while let Some(msg) = routes.try_next().await.map_err(|e| e.to_string())? {
                if let Some(route) = kernel_route(&msg, &self.ports) {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    /// Waits for the next notification, applies it and every other one already queued; a
    /// route change re-reads the routes. Returns whether the next hops may have changed.
    pub async fn changed(&mut self) -> bool {
        let Some(first) = self.notifications.next().await else {
            // The connection ended: nothing will come; wait for the periodic re-read.
            std::future::pending::<()>().await;
            return false;
        };
        let mut changed = false;
        let mut routes = false;
        let mut next = Some(first);
        while let Some((message, _)) = next {
            if let NetlinkPayload::InnerMessage(inner) = message.payload {
                match inner {
                    RouteNetlinkMessage::NewNeighbour(msg) => {
                        changed |= self.view.apply_neighbour(&self.ports, &msg, true);
                    }
                    RouteNetlinkMessage::DelNeighbour(msg) => {
                        changed |= self.view.apply_neighbour(&self.ports, &msg, false);
                    }
                    RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
                        routes = true;
                    }
                    _ => {}
                }
            }
            next = self.notifications.try_recv().ok();
        }
        if routes {
            match self.read_routes().await {
                Ok(read) if read != self.view.routes => {
                    self.view.routes = read;
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot re-read routes; keeping the last ones"),
            }
        }
        changed
    }

    /// Asks the kernel to resolve what xlb needs a next hop for: `wanted` (addresses workers
    /// hold packets for, backends of new Services) and what earlier calls carried over, each
    /// address whose next hop is not known yet. One request per neighbour; at most
    /// [`RESOLVE_PER_ROUND`] per call, the rest carried over. Addresses no route of the ports
    /// covers are counted and reported in one warning.
    pub async fn resolve(&mut self, wanted: impl IntoIterator<Item = (Family, [u8; 16])>) {
        let hops = self.next_hops();
        let mut wanted: Vec<(Family, [u8; 16])> = std::mem::take(&mut self.pending)
            .into_iter()
            .chain(wanted)
            .filter(|(family, addr)| hops.lookup(*family, addr).is_none())
            .collect();
        let mut asked = HashSet::new();
        let mut seen = HashSet::new();
        let mut unrouted: Option<(IpAddr, usize)> = None;
        let mut rest = wanted.drain(..);
        for (family, addr) in rest.by_ref() {
            let ip = Endpoint::from_key_form(family, addr, 0).ip();
            if !seen.insert(ip) {
                continue;
            }
            match self.view.resolution_target(ip) {
                Some((port, neighbour)) => {
                    let ifindex = self.ports[port].ifindex;
                    if !asked.insert((ifindex, neighbour)) {
                        continue;
                    }
                    if let Err(e) = ask(&self.handle, ifindex, neighbour).await {
                        warn!(%ip, %neighbour, error = %e, "cannot ask the kernel to resolve");
                    }
                    if asked.len() == RESOLVE_PER_ROUND {
                        break;
                    }
                }
                None => unrouted = Some((ip, unrouted.map_or(1, |(_, n)| n + 1))),
            }
        }
        self.pending.extend(rest);
        if let Some((example, count)) = unrouted {
            warn!(count, %example, "addresses with no route through xlb's interfaces; packets to them are dropped");
        }
    }
}

/// Asks the kernel to resolve `neighbour` on `ifindex` (RTM_NEWNEIGH with NTF_USE: the
/// kernel starts ARP or neighbour discovery, as if it had a packet to send).
async fn ask(handle: &Handle, ifindex: u32, neighbour: IpAddr) -> Result<(), String> {
    handle
        .neighbours()
        .add(ifindex, neighbour)
        .flags(NeighbourFlags::Use)
        .state(NeighbourState::Incomplete)
        .replace()
        .execute()
        .await
        .map_err(|e| e.to_string())
}

/// The address and link-layer address of a neighbour message, and whether its state makes
/// it usable.
fn neighbour_entry(msg: &NeighbourMessage) -> (Option<IpAddr>, Option<MacAddr>, bool) {
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a));
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr);
            }
            _ => {}
        }
    }
    (ip, mac, usable)
}

fn kernel_route(msg: &RouteMessage, ports: &[Port]) -> Option<KernelRoute> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let port = ports.iter().position(|p| Some(p.ifindex) == oif)?;
    let len = msg.header.destination_prefix_length;
    let (family, prefix) = match dst {
        Some(ip) => (family_of(ip), key_addr(ip)),
        None => match msg.header.address_family {
            rtnetlink::packet_route::AddressFamily::Inet6 => (Family::Ipv6, [0; 16]),
            _ => (Family::Ipv4, [0; 16]),
        },
    };
    Some(KernelRoute {
        family,
        prefix,
        len,
        gateway,
        port,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl KernelView {
    /// Applies a neighbour message (`new`: RTM_NEWNEIGH or a dump entry; else RTM_DELNEIGH)
    /// for a neighbour of one of `ports`. Returns whether the view changed.
    fn apply_neighbour(&mut self, ports: &[Port], msg: &NeighbourMessage, new: bool) -> bool {
        let Some(port) = ports.iter().position(|p| p.ifindex == msg.header.ifindex) else {
            return false;
        };
        let (ip, mac, usable) = neighbour_entry(msg);
        let Some(ip) = ip else {
            return false;
        };
        match mac.filter(|_| new && usable) {
            Some(mac) => self.neighbours.insert((port, ip), mac) != Some(mac),
            // Gone, failed, or being resolved without an address yet.
            None if new && msg.header.state == NeighbourState::Incomplete => false,
            None => self.neighbours.remove(&(port, ip)).is_some(),
        }
    }

    /// The next-hop table: every resolved neighbour on a port, and every route through a
    /// resolved gateway on a port; and `fallback`, if given, as the default route of both
    /// families (ahead of any default route of a port).
    #[must_use]
    pub fn next_hops(&self, ports: &[Port], fallback: Option<NextHop>) -> NextHops {
        let hop = |port: usize, mac: MacAddr| NextHop {
            port: u16::try_from(port).unwrap_or(u16::MAX),
            src_mac: ports[port].mac,
            dst_mac: mac,
        };
        let hosts = self
            .neighbours
            .iter()
            .map(|(&(port, ip), &mac)| (family_of(ip), key_addr(ip), hop(port, mac)));
        let defaults = fallback.into_iter().flat_map(|hop| {
            [Family::Ipv4, Family::Ipv6].map(|family| Route {
                prefix: [0; 16],
                len: 0,
                family,
                hop: Some(hop),
            })
        });
        let routes = defaults
            .chain(self.routes.iter().filter_map(|r| {
                // A connected prefix: its addresses are neighbours, resolved one by one.
                let hop = match r.gateway {
                    None => None,
                    Some(gateway) => Some(hop(r.port, *self.neighbours.get(&(r.port, gateway))?)),
                };
                Some(Route {
                    prefix: r.prefix,
                    len: r.len,
                    family: r.family,
                    hop,
                })
            }))
            .collect();
        NextHops::new(hosts, routes)
    }

    /// Where to ask the kernel to resolve so that `addr` gets a next hop: the port and the
    /// neighbour (`addr` itself on a connected route, or the route's gateway).
    #[must_use]
    pub fn resolution_target(&self, addr: IpAddr) -> Option<(usize, IpAddr)> {
        let family = family_of(addr);
        let key = key_addr(addr);
        self.routes
            .iter()
            .filter(|r| r.family == family && prefix_matches(&r.prefix, r.len, &key))
            .max_by_key(|r| r.len)
            .map(|r| (r.port, r.gateway.unwrap_or(addr)))
    }
}

#[cfg(test)]
mod tests;
