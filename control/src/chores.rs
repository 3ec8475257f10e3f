//! The housekeeping thread: the scan of the whole flow table — the backends' live-flow recount
//! and the live-entry gauge — off the control thread and off the workers' cores, as often as
//! what changed calls for.
//!
//! A scan takes tens of milliseconds (a recount of a million flows over 100 000 Services:
//! about 100). While packets arrive, flows start and end, so it runs every [`BUSY_PERIOD`]
//! when a least-connections Service weighs the counts in its picks, else every
//! [`SHOWN_BUSY_PERIOD`] (the counts are then only shown); while no packet arrives, only
//! expiry changes the table, so it runs every [`IDLE_PERIOD`]: an idle xlb scans a tenth as
//! often. A first packet after an idle spell needs no fresher count: expired flows are
//! invisible to lookups, and the counts only weigh new picks.
//!
//! Must not know: how flows are counted (`lb::recount`), packets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xlb_dataplane::lb::recount::recount_live_flows;
use xlb_dataplane::worker::Shared;

use crate::admin::AdminState;

/// How often the chores thread wakes, and how often the scan runs while packets arrive and a
/// least-connections Service needs fresh counts.
pub const BUSY_PERIOD: Duration = Duration::from_secs(1);
/// How often the scan runs while packets arrive and no Service picks by the counts.
pub const SHOWN_BUSY_PERIOD: Duration = Duration::from_secs(5);
/// How often either runs while no packet arrives.
pub const IDLE_PERIOD: Duration = Duration::from_secs(10);

/// When the chores run: from whether a least-connections Service needs recounts, the packets
/// received so far and the time.
#[derive(Debug, Default)]
pub struct Schedule {
    /// When the last scan ran, and the packets received then.
    last: Option<(Instant, u64)>,
}

impl Schedule {
    /// Whether the scan is due at `now`, with `received` packets received by all workers so
    /// far.
    pub fn due(&mut self, least_connections: bool, received: u64, now: Instant) -> bool {
        let due = match self.last {
            None => true,
            Some((at, seen)) => {
                let since = now.saturating_duration_since(at);
                let busy = received != seen;
                let period = match (busy, least_connections) {
                    (false, _) => IDLE_PERIOD,
                    (true, true) => BUSY_PERIOD,
                    (true, false) => SHOWN_BUSY_PERIOD,
                };
                since >= period
            }
        };
        if due {
            self.last = Some((now, received));
        }
        due
    }
}

/// Starts the chores thread, `xlb-chores`, until `stop`.
///
/// # Errors
/// When the thread cannot be started.
pub fn spawn(
    shared: Shared,
    admin: Arc<AdminState>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("xlb-chores".into())
        .spawn(move || {
            let mut schedule = Schedule::default();
            // Relaxed: the flag is the only thing communicated.
            while !stop.load(Ordering::Relaxed) {
                let received = admin.workers.iter().map(|w| w.load().io.received).sum();
                let snapshot = Arc::clone(&shared.tables.load().snapshot);
                let now = shared.clock.now();
                if schedule.due(snapshot.has_least_connections(), received, Instant::now()) {
                    let live = recount_live_flows(&snapshot, &shared.flows, now);
                    // Relaxed: gauges read on their own.
                    admin.live_entries[0].store(live.ipv4, Ordering::Relaxed);
                    admin.live_entries[1].store(live.ipv6, Ordering::Relaxed);
                }
                std::thread::sleep(BUSY_PERIOD);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chores over `seconds`, one round a second, with `arriving` saying whether packets
    /// arrived in that second.
    fn rounds(least_connections: bool, arriving: impl Fn(u64) -> bool, seconds: u64) -> Vec<u64> {
        let start = Instant::now();
        let mut schedule = Schedule::default();
        let mut received = 0;
        let mut ran = Vec::new();
        for s in 0..seconds {
            if arriving(s) {
                received += 100;
            }
            let now = start + Duration::from_secs(s);
            if schedule.due(least_connections, received, now) {
                ran.push(s);
            }
        }
        ran
    }

    #[test]
    fn while_packets_arrive_the_recount_runs_every_second_and_the_gauge_every_five() {
        assert_eq!(rounds(true, |_| true, 5), [0, 1, 2, 3, 4]);
        assert_eq!(rounds(false, |_| true, 11), [0, 5, 10]);
    }

    #[test]
    fn an_idle_table_is_scanned_a_tenth_as_often() {
        assert_eq!(rounds(true, |_| false, 31), [0, 10, 20, 30]);
        assert_eq!(rounds(false, |_| false, 31), [0, 10, 20, 30]);
    }

    #[test]
    fn packets_after_an_idle_spell_bring_the_busy_period_back() {
        // Idle until second 14, then traffic: a recount at 14 (more than a second since 10).
        assert_eq!(
            rounds(true, |s| s >= 14, 17),
            [0, 10, 14, 15, 16],
            "recounts"
        );
    }
}
