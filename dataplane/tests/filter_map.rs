//! The XDP filter's steering map holds what 100 000 Services x 10 endpoints need in dnat mode
//! (a key per VIP and per backend: ~1.1 M), and gives it all back. Loads the filter into the
//! kernel (attaches it nowhere), so it needs root; without it, it says why and skips.

mod common;

use std::net::Ipv4Addr;

use common::filter_or_skip;

use xlb_dataplane::packet::{Endpoint, IpProto};
use xlb_dataplane::xsk::SteerKey;

#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn the_steering_map_takes_the_keys_of_100_000_services_of_10_endpoints_and_gives_them_back() {
    let Some(mut filter) = filter_or_skip() else {
        return;
    };
    // 100 000 VIPs and 1 000 000 backends (address:port pairs), all distinct.
    let keys: Vec<SteerKey> = (0..1_100_000u32)
        .map(|n| {
            let address = Ipv4Addr::from(0xc612_0000 + (n % 131_072));
            let port = 1 + u16::try_from(n / 131_072).unwrap_or(0);
            SteerKey::destination(&Endpoint::new(address.into(), port), IpProto::TCP)
        })
        .collect();
    filter.change(&keys, &[]).expect("1.1 M keys fit");
    filter.change(&[], &keys).expect("and all go");
}
