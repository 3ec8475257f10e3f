//! Memory of a snapshot of many Services: resident-set growth while building one, and its
//! bytes per Service and per backend. `snapshot-memory [SERVICES] [BACKENDS_PER_SERVICE]`
//! (default 100000 and 2).

use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;

use xlb_dataplane::lb::snapshot::{
    Backend, BackendId, BackendState, Service, ServiceId, ServiceKey, ServiceSpec, Snapshot,
};
use xlb_dataplane::packet::{Endpoint, IpProto};

fn main() -> ExitCode {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(100_000);
    let per = args.get(1).copied().unwrap_or(2);
    let before = xlb_bench::memory().resident;
    if before == 0 {
        eprintln!("snapshot-memory: cannot read /proc/self/status");
        return ExitCode::FAILURE;
    }
    let mut built = Vec::with_capacity(services);
    for s in 0..services {
        let n = u32::try_from(s).unwrap_or(u32::MAX);
        let vip = Endpoint::new(std::net::Ipv4Addr::from(0xc612_0000 + n).into(), 80);
        let backends = (0..per)
            .map(|b| {
                let b = u32::try_from(b).unwrap_or(0);
                Backend {
                    id: BackendId(NonZeroU32::MIN.saturating_add(b)),
                    endpoint: Endpoint::new(
                        std::net::Ipv4Addr::from(0xc613_0000 + n * 8 + b).into(),
                        8080,
                    ),
                    state: BackendState::Ready,
                    weight: 1,
                }
            })
            .collect();
        let key = ServiceKey {
            vip,
            proto: IpProto::TCP,
        };
        let spec = ServiceSpec::new(ServiceId(NonZeroU32::MIN.saturating_add(n)), key, backends);
        match Service::new(spec) {
            Ok(service) => built.push(Arc::new(service)),
            Err(e) => {
                eprintln!("snapshot-memory: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let heap: usize = built.iter().map(|s| s.heap_bytes()).sum();
    let snapshot = match Snapshot::new(1, built) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("snapshot-memory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let after = xlb_bench::memory().resident.max(before);
    let grown = after.saturating_sub(before) as f64;
    println!(
        "{} Services x {per} backends: resident +{:.1} MiB = {:.0} bytes per Service, {:.0} per \
         backend; Maglev slots and backend records are {:.0} of the bytes per Service",
        snapshot.len(),
        grown / 1_048_576.0,
        grown / services as f64,
        grown / (services * per) as f64,
        heap as f64 / services as f64,
    );
    ExitCode::SUCCESS
}
