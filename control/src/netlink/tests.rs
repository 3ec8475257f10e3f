//! The next-hop policy, on routes and neighbours made up in the tests.

use super::*;
use rtnetlink::packet_route::AddressFamily;

fn port(i: u8) -> Port {
    Port {
        name: format!("p{i}"),
        ifindex: u32::from(i) + 10,
        mac: MacAddr([2, 0, 0, 0, 0, i]),
    }
}

fn neighbour(port: u8, ip: &str, mac: Option<[u8; 6]>, state: NeighbourState) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.ifindex = u32::from(port) + 10;
    msg.header.state = state;
    let ip: IpAddr = ip.parse().unwrap();
    msg.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.attributes
        .push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    if let Some(mac) = mac {
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    msg
}

fn view() -> KernelView {
    let ports = [port(0), port(1)];
    let mut view = KernelView {
        neighbours: HashMap::new(),
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
    let client = neighbour(
        0,
        "198.18.0.1",
        Some([2, 1, 1, 1, 1, 1]),
        NeighbourState::Reachable,
    );
    let gateway = neighbour(
        1,
        "198.18.128.254",
        Some([2, 2, 2, 2, 2, 2]),
        NeighbourState::Stale,
    );
    assert!(view.apply_neighbour(&ports, &client, true));
    assert!(view.apply_neighbour(&ports, &gateway, true));
    view
}

#[test]
fn routes_through_resolved_gateways_and_resolved_hosts_become_next_hops() {
    let ports = [port(0), port(1)];
    let view = view();
    let hops = view.next_hops(&ports, None);
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

/// Issue 13: on a node, what no port routes goes to the kernel through the link (local
/// pods, other nodes, the node's own sockets); what a port routes keeps its hop.
#[test]
fn on_a_node_the_link_is_the_next_hop_of_everything_no_port_routes() {
    let ports = [port(0), port(1)];
    let link = NextHop {
        port: 2,
        src_mac: MacAddr([2, 0, 0, 0, 0xa, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0xa, 0]),
    };
    let hops = view().next_hops(&ports, Some(link));
    // An unresolved neighbour on a port's connected prefix is resolved there, not sent
    // to the link.
    assert_eq!(
        hops.lookup(Family::Ipv4, &key_addr("198.18.0.2".parse().unwrap())),
        None
    );
    for unrouted in ["198.19.7.7", "2001:2:0:99::1"] {
        let ip: IpAddr = unrouted.parse().unwrap();
        assert_eq!(
            hops.lookup(family_of(ip), &key_addr(ip)),
            Some(link),
            "{unrouted}"
        );
    }
    let client = hops
        .lookup(Family::Ipv4, &key_addr("198.18.0.1".parse().unwrap()))
        .unwrap();
    assert_eq!(client.port, 0, "a resolved neighbour keeps its port");
}

/// Issue 11, fault 6: neighbours learnt from notifications, one by one, not from a
/// periodic re-read of the whole table.
#[test]
fn neighbour_notifications_add_change_and_remove_next_hops() {
    let ports = [port(0), port(1)];
    let mut view = view();
    let new = "198.18.0.7";
    let addr = key_addr(new.parse().unwrap());
    // Being resolved: no address yet, nothing changes.
    let incomplete = neighbour(0, new, None, NeighbourState::Incomplete);
    assert!(!view.apply_neighbour(&ports, &incomplete, true));
    // Learnt (an ARP request from a new client makes a stale entry).
    let learnt = neighbour(0, new, Some([2, 7, 7, 7, 7, 7]), NeighbourState::Stale);
    assert!(view.apply_neighbour(&ports, &learnt, true));
    assert!(
        !view.apply_neighbour(&ports, &learnt, true),
        "the same again"
    );
    let hop = view
        .next_hops(&ports, None)
        .lookup(Family::Ipv4, &addr)
        .unwrap();
    assert_eq!(hop.dst_mac, MacAddr([2, 7, 7, 7, 7, 7]));
    // Failed, then deleted: gone.
    let failed = neighbour(0, new, None, NeighbourState::Failed);
    assert!(view.apply_neighbour(&ports, &failed, true));
    assert!(view
        .next_hops(&ports, None)
        .lookup(Family::Ipv4, &addr)
        .is_none());
    assert!(view.apply_neighbour(&ports, &learnt, true));
    assert!(view.apply_neighbour(&ports, &learnt, false));
    assert!(view
        .next_hops(&ports, None)
        .lookup(Family::Ipv4, &addr)
        .is_none());
    // A neighbour of another interface is not xlb's.
    let elsewhere = neighbour(9, new, Some([2, 9, 9, 9, 9, 9]), NeighbourState::Reachable);
    assert!(!view.apply_neighbour(&ports, &elsewhere, true));
}
