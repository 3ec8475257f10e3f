//! Next hops from the kernel: routes and neighbours read over netlink (rtnetlink) for the
//! ports xlb serves, turned into the dataplane's `NextHops`; and neighbour resolution asked of
//! the kernel for addresses a worker found no next hop for.
//!
//! Must not know: Services, snapshots, packets.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};
use xlb_dataplane::packet::{key_addr, Family, MacAddr};
use xlb_dataplane::worker::{prefix_matches, NextHop, NextHops, Route};

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
#[derive(Clone, Debug)]
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
    neighbours: Vec<(usize, IpAddr, MacAddr)>,
    routes: Vec<KernelRoute>,
}

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::Ipv4,
        IpAddr::V6(_) => Family::Ipv6,
    }
}

/// Reads neighbours and routes of `ports` from the kernel.
///
/// # Errors
/// The netlink error, as text.
pub async fn read(handle: &Handle, ports: &[Port]) -> Result<KernelView, String> {
    let port_of = |ifindex: u32| ports.iter().position(|p| p.ifindex == ifindex);
    let mut view = KernelView::default();
    let mut neighbours = handle.neighbours().get().execute();
    while let Some(msg) = neighbours.try_next().await.map_err(|e| e.to_string())? {
        if let Some(entry) = neighbour_entry(&msg) {
            if let Some(port) = port_of(msg.header.ifindex) {
                view.neighbours.push((port, entry.0, entry.1));
            }
        }
    }
    for request in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(request).execute();
        while let Some(msg) = routes.try_next().await.map_err(|e| e.to_string())? {
            if let Some(route) = kernel_route(&msg, &port_of) {
                view.routes.push(route);
            }
        }
    }
    Ok(view)
}

fn neighbour_entry(msg: &NeighbourMessage) -> Option<(IpAddr, MacAddr)> {
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    );
    if !usable {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr);
            }
            _ => {}
        }
    }
    Some((ip?, mac?))
}

fn kernel_route(
    msg: &RouteMessage,
    port_of: &impl Fn(u32) -> Option<usize>,
) -> Option<KernelRoute> {
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
    let port = port_of(oif?)?;
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
    /// The next-hop table: every resolved neighbour on a port, and every route through a
    /// resolved gateway on a port.
    #[must_use]
    pub fn next_hops(&self, ports: &[Port]) -> NextHops {
        let hop = |port: usize, mac: MacAddr| NextHop {
            port: u16::try_from(port).unwrap_or(u16::MAX),
            src_mac: ports[port].mac,
            dst_mac: mac,
        };
        let hosts = self
            .neighbours
            .iter()
            .map(|&(port, ip, mac)| (family_of(ip), key_addr(ip), hop(port, mac)));
        let routes = self
            .routes
            .iter()
            .filter_map(|r| {
                let gateway = r.gateway?;
                let (_, _, mac) = self
                    .neighbours
                    .iter()
                    .find(|(port, ip, _)| *port == r.port && *ip == gateway)?;
                Some(Route {
                    prefix: r.prefix,
                    len: r.len,
                    family: r.family,
                    hop: hop(r.port, *mac),
                })
            })
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

/// Asks the kernel to resolve `neighbour` on `ifindex` (RTM_NEWNEIGH with NTF_USE: the
/// kernel starts ARP or neighbour discovery, as if it had a packet to send).
///
/// # Errors
/// The netlink error, as text.
pub async fn resolve(handle: &Handle, ifindex: u32, neighbour: IpAddr) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn port(i: u8) -> Port {
        Port {
            name: format!("p{i}"),
            ifindex: u32::from(i) + 10,
            mac: MacAddr([2, 0, 0, 0, 0, i]),
        }
    }

    #[test]
    fn routes_through_resolved_gateways_and_resolved_hosts_become_next_hops() {
        let ports = [port(0), port(1)];
        let view = KernelView {
            neighbours: vec![
                (
                    0,
                    "198.18.0.1".parse().unwrap(),
                    MacAddr([2, 1, 1, 1, 1, 1]),
                ),
                (
                    1,
                    "198.18.128.254".parse().unwrap(),
                    MacAddr([2, 2, 2, 2, 2, 2]),
                ),
            ],
            routes: vec![
                KernelRoute {
                    family: Family::Ipv4,
                    prefix: key_addr("198.18.0.0".parse().unwrap()),
                    len: 24,
                    gateway: None,
                    port: 0,
                },
                KernelRoute {
                    family: Family::Ipv4,
                    prefix: key_addr("198.18.128.0".parse().unwrap()),
                    len: 17,
                    gateway: Some("198.18.128.254".parse().unwrap()),
                    port: 1,
                },
            ],
        };
        let hops = view.next_hops(&ports);
        let client = hops
            .lookup(Family::Ipv4, &key_addr("198.18.0.1".parse().unwrap()))
            .unwrap();
        assert_eq!((client.port, client.src_mac), (0, ports[0].mac));
        let far = hops
            .lookup(Family::Ipv4, &key_addr("198.18.200.9".parse().unwrap()))
            .unwrap();
        assert_eq!((far.port, far.dst_mac), (1, MacAddr([2, 2, 2, 2, 2, 2])));
        assert!(hops
            .lookup(Family::Ipv4, &key_addr("198.18.0.2".parse().unwrap()))
            .is_none());
        assert_eq!(
            view.resolution_target("198.18.0.2".parse().unwrap()),
            Some((0, "198.18.0.2".parse().unwrap()))
        );
        assert_eq!(
            view.resolution_target("198.18.200.9".parse().unwrap()),
            Some((1, "198.18.128.254".parse().unwrap()))
        );
    }
}
