//! The admin API under load: `/healthz` latency while `/flows` and `/services` are read in a
//! loop, at 1 000 000 flows and 10 000 Services (issue 11, fault 8: one `/flows` read took
//! 10 s and 2.2 GB, and blocked `/healthz` and reloads).
//!
//! `admin-load [FLOWS] [SERVICES] [SECONDS]` (default 1000000 10000 10): serves the admin API
//! in-process, as `xlb run` does (its own thread and runtime), over a flow table and a snapshot
//! of that size; two threads read `/flows?limit=10000` pages and `/services?limit=1000` pages
//! back to back, while the main thread asks `/healthz` every 10 ms. Prints the percentiles of
//! the health answers and what the readers got, and the process's peak resident memory.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use xlb_control::admin::{self, AdminState};
use xlb_control::admin_client::get;
use xlb_dataplane::lb::flow::{FlowState, FlowTable, FlowValue, Timeouts};
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, BackendState, Service, ServiceId, ServiceKey, ServiceSpec, Snapshot,
};
use xlb_dataplane::packet::{key_addr, Endpoint, Family, FlowKey, IpProto};
use xlb_dataplane::worker::{Clock, NextHops, Tables, WorkerStats};
use xlb_dataplane::xsk::FilterCounts;

fn snapshot(services: u32) -> Result<Snapshot, String> {
    let built = (0..services)
        .map(|n| {
            let backends = (0..10u32)
                .map(|b| Backend {
                    id: BackendId(NonZeroU32::MIN.saturating_add(b)),
                    endpoint: Endpoint::new(
                        std::net::Ipv4Addr::from(0xc613_0000 + n * 16 + b).into(),
                        8080,
                    ),
                    state: BackendState::Ready,
                    weight: 1,
                })
                .collect();
            let key = ServiceKey {
                vip: Endpoint::new(std::net::Ipv4Addr::from(0xc612_0000 + n).into(), 80),
                proto: IpProto::TCP,
            };
            let id = ServiceId(NonZeroU32::MIN.saturating_add(n));
            Service::new(ServiceSpec::new(id, key, backends))
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Snapshot::new(1, built).map_err(|e| e.to_string())
}

fn flows(count: u32) -> FlowTable {
    let table = FlowTable::new(count as usize * 2, Timeouts::default());
    for n in 0..count {
        let key = FlowKey::new(
            Family::Ipv4,
            IpProto::TCP,
            (
                key_addr(std::net::Ipv4Addr::from(0xc612_8000 + (n >> 16)).into()),
                u16::try_from(n & 0xFFFF).unwrap_or(0),
            ),
            (key_addr([198, 18, 64, 1].into()), 80),
        );
        let value = FlowValue::Forward {
            service: 1,
            backend: 1,
            snat_port: 0,
        };
        let _ = table.insert(&key, flow_hash(&key), value, FlowState::Established, 0);
    }
    table
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

fn run() -> Result<(), String> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let flow_count = u32::try_from(args.first().copied().unwrap_or(1_000_000)).unwrap_or(1);
    let services = u32::try_from(args.get(1).copied().unwrap_or(10_000)).unwrap_or(1);
    let seconds = args.get(2).copied().unwrap_or(10);
    let table = Arc::new(flows(flow_count));
    let live = table.iter(0).count() as u64;
    let state = Arc::new(AdminState {
        tables: Arc::new(ArcSwap::from_pointee(Tables {
            snapshot: Arc::new(snapshot(services)?),
            hops: NextHops::default(),
        })),
        flows: table,
        clock: Clock::start(),
        workers: vec![Arc::new(WorkerStats::new(4))],
        ports: (0..4).map(|i| format!("n{i}")).collect(),
        generation: AtomicU64::new(1),
        live_entries: [AtomicU64::new(live), AtomicU64::new(0)],
        sync_seconds: xlb_control::admin::SyncHistogram::default(),
        filter_counts: ArcSwap::from_pointee(FilterCounts::default()),
        kube: None,
        config_hash: AtomicU64::new(0),
        config_generation: AtomicU64::new(0),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let _server = admin::spawn(listener, state).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = [
        ("flows", "/flows?limit=10000", "flows"),
        ("services", "/services?limit=1000", "services"),
    ]
    .into_iter()
    .map(|(name, first, list)| {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut pages, mut items, mut bytes, mut refused) = (0u64, 0u64, 0u64, 0u64);
            let mut path = first.to_owned();
            // Relaxed: a stop flag only.
            while !stop.load(Ordering::Relaxed) {
                match get(addr, &path) {
                    Ok(body) => {
                        bytes += body.len() as u64;
                        let page: serde_json::Value =
                            serde_json::from_str(&body).unwrap_or_default();
                        items += page[list].as_array().map_or(0, |a| a.len() as u64);
                        pages += 1;
                        path = match page["next"].as_u64() {
                            Some(next) => format!("{first}&from={next}"),
                            None => first.to_owned(),
                        };
                    }
                    Err(_) => refused += 1,
                }
            }
            (name, pages, items, bytes, refused)
        })
    })
    .collect();
    let started = Instant::now();
    let mut health = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let asked = Instant::now();
        let ok = get(addr, "/healthz").is_ok_and(|b| b == "ok\n");
        if ok {
            health.push(asked.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Relaxed: see the readers.
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let (name, pages, items, bytes, refused) = reader.join().map_err(|_| "a reader died")?;
        println!(
            "{name}: {pages} pages, {items} items, {:.1} MiB, {refused} refused",
            bytes as f64 / f64::from(1 << 20)
        );
    }
    health.sort_by(f64::total_cmp);
    println!(
        "healthz while /flows and /services are read ({flow_count} flows, {services} Services): \
         {} answers, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; peak resident {} MiB",
        health.len(),
        percentile(&health, 0.5),
        percentile(&health, 0.99),
        health.last().copied().unwrap_or(0.0),
        xlb_bench::memory().peak >> 20
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("admin-load: {e}");
            ExitCode::FAILURE
        }
    }
}
