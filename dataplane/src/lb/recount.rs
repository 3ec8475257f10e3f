//! The least-connections recount: the live flows of every backend, counted from the flow
//! table and stored in the snapshot's least-connections Services. Workers count flows as they
//! start and as they end by a packet (a FIN, a reset); flows that end by expiry or eviction
//! are seen by no packet, so a periodic recount corrects the counts. It reads the whole table:
//! it runs off the packet path and off the control thread (`control::chores` decides when).
//!
//! Must not know: when it runs, packets.

use super::flow::{FlowTable, FlowValue, Live, Second, AFFINITY};
use super::snapshot::{Scheduler, Snapshot};

/// Recounts the live flows of every backend from the flow table and stores the counts in the
/// snapshot's least-connections Services. Run periodically off the packet path and off the
/// control thread (it reads the whole table): flows that end by expiry or eviction are seen
/// by no packet. Returns the live entries it saw.
pub fn recount_live_flows(snapshot: &Snapshot, flows: &FlowTable, now: Second) -> Live {
    let mut counts: hashbrown::HashMap<(u32, u32), u64> = hashbrown::HashMap::new();
    let mut live = Live::default();
    for (key, hit) in flows.iter(now) {
        live.count(key.family);
        if let FlowValue::Forward {
            service, backend, ..
        } = hit.value
        {
            if key.proto != AFFINITY {
                *counts.entry((service, backend)).or_default() += 1;
            }
        }
    }
    let least_connections = snapshot
        .services()
        .filter(|s| s.spec().scheduler == Scheduler::LeastConnections);
    for service in least_connections {
        let id = service.spec().id.0.get();
        for backend in &service.spec().backends {
            let n = counts.get(&(id, backend.id.0.get())).copied().unwrap_or(0);
            service.set_live_flows(backend.id, n);
        }
    }
    live
}
