//! The live-flow recount: the live flows of every backend, counted from the flow table and
//! stored in the snapshot's Services. Workers count flows as they start, for least-connections
//! Services only (whose picks weigh the counts); no packet reports a flow's end, by a FIN, by
//! expiry or by eviction, so this periodic recount gives every Service its true counts (what
//! `xlb status` shows) and corrects least-connections'. It reads the whole table: it runs off
//! the packet path and off the control thread (`control::chores` decides when).
//!
//! Must not know: when it runs, packets.

use super::flow::{FlowTable, FlowValue, Live, Second, AFFINITY};
use super::snapshot::Snapshot;

/// Recounts the live flows of every backend from the flow table and stores the counts in the
/// snapshot's Services. Run periodically off the packet path and off the control thread (it
/// reads the whole table). Returns the live entries it saw.
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
    for service in snapshot.services() {
        let id = service.spec().id.0.get();
        service.recounted(|backend| counts.get(&(id, backend.0.get())).copied().unwrap_or(0));
    }
    live
}
