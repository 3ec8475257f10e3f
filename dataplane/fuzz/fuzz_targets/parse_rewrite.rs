//! Fuzzes parse, describe and every rewrite primitive on arbitrary frames.
//!
//! Beyond "no panic", it checks the rewrite contract: a frame whose checksums all verify
//! before a rewrite still has them all verified after it.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use xlb_dataplane::packet::{
    parse, set_destination, set_ethernet, set_source, Endpoint, Family, Layers, MacAddr,
};

fuzz_target!(|data: &[u8]| {
    // The last 18 bytes choose the rewrite; the rest is the frame.
    let Some((frame, choice)) = data.split_last_chunk::<18>() else {
        let _ = parse(data);
        return;
    };
    let before = Layers(frame).to_string();
    let Ok(mut parsed) = parse(frame) else {
        return;
    };
    let mut out = frame.to_vec();
    let addr = match parsed.key.family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(choice[0], choice[1], choice[2], choice[3])),
        Family::Ipv6 => {
            let mut a = [0; 16];
            a.copy_from_slice(&choice[..16]);
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    let port = u16::from_be_bytes([choice[16], choice[17]]);
    let ok = if choice[17] & 1 == 0 {
        set_destination(&mut out, &mut parsed, &Endpoint::new(addr, port))
    } else {
        set_source(&mut out, &mut parsed, &Endpoint::new(addr, port))
    };
    let _ = set_ethernet(&mut out, MacAddr([2; 6]), MacAddr([4; 6]));
    let after = Layers(&out).to_string();
    if ok.is_ok() && !before.contains("BAD") && !before.contains("partial") {
        assert!(!after.contains("BAD"), "a rewrite broke a checksum:\n{before}\n--\n{after}");
        assert_eq!(parse(&out).map(|p| p.key).ok(), Some(parsed.key));
    }
});
