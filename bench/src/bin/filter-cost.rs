//! What the XDP filter costs per packet, timed by the kernel (`BPF_PROG_TEST_RUN`, the program
//! run `REPEAT` times on one frame, no device and no socket involved): a packet to a Service,
//! a backend's reply and a packet that is not xlb's, with the steering keys of 1 and of
//! 100 000 Services loaded. Needs root (it loads the filter, attaches it nowhere).
//!
//! Usage: `filter-cost [SERVICES...]` (default 1 100000). Prints one JSON object per line:
//! `{"services": N, "frame": "service"|"reply"|"other", "ns": [...]}` with one mean per
//! repetition; `bench/budget.py` reads them.

use std::net::Ipv4Addr;
use std::process::ExitCode;

use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::{key_addr, Endpoint, Family, IpProto};
use xlb_dataplane::xsk::{SteerKey, XdpFilter};

/// Runs per timing: long enough that the kernel's clock reads are noise.
const REPEAT: u32 = 1_000_000;
/// Timings per frame and Service count.
const REPETITIONS: usize = 5;

/// Service `i`'s VIP (198.18.64.0 on) and its one backend (198.19.0.0 on).
fn addresses(i: u32) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::from(0xc612_4000 + i),
        Ipv4Addr::from(0xc613_0000 + i),
    )
}

/// The keys a dnat snapshot steers for Service `i`: its VIP and port, its VIP's address, its
/// backend's replies.
fn keys(i: u32) -> [SteerKey; 4] {
    let (vip, backend) = addresses(i);
    [
        SteerKey::destination(&Endpoint::new(vip.into(), 80), IpProto::TCP),
        SteerKey::vip_address(Family::Ipv4, key_addr(vip.into())),
        SteerKey::source(&Endpoint::new(backend.into(), 8080), IpProto::TCP),
        SteerKey::source_address(Family::Ipv4, key_addr(backend.into())),
    ]
}

fn run(services: &[u32]) -> Result<(), String> {
    let mut filter = XdpFilter::load().map_err(|e| format!("cannot load the filter: {e}"))?;
    let client = Ipv4Addr::new(198, 18, 0, 1);
    let mut loaded = 0;
    for &n in services {
        let more: Vec<SteerKey> = (loaded..n).flat_map(keys).collect();
        filter.change(&more, &[]).map_err(|e| e.to_string())?;
        loaded = loaded.max(n);
        // The last Service's packets: every key is in the map, none is special.
        let (vip, backend) = addresses(n.saturating_sub(1));
        let frames = [
            (
                "service",
                pkt().ipv4(client, vip).tcp(40000, 80).ack().pad_to(64),
            ),
            (
                "reply",
                pkt()
                    .ipv4(backend, client)
                    .tcp(8080, 40000)
                    .ack()
                    .pad_to(64),
            ),
            (
                "other",
                pkt()
                    .ipv4(client, Ipv4Addr::new(198, 18, 0, 2))
                    .tcp(40000, 22)
                    .ack()
                    .pad_to(64),
            ),
        ];
        for (name, frame) in frames {
            let frame = frame.build();
            let ns = (0..REPETITIONS)
                .map(|_| {
                    filter
                        .time(&frame, REPEAT)
                        .map(|d| d.as_nanos().to_string())
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("test run refused: {e}"))?;
            println!(
                "{{\"services\": {n}, \"frame\": \"{name}\", \"ns\": [{}]}}",
                ns.join(", ")
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut services: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if services.is_empty() {
        services = vec![1, 100_000];
    }
    services.sort_unstable();
    match run(&services) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("filter-cost: {e}");
            ExitCode::FAILURE
        }
    }
}
