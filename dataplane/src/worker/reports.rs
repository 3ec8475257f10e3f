//! What workers tell the control thread without waiting for it: addresses to resolve, and
//! notices of what they dropped or reset (with the flow's addresses) for the logs.
//!
//! Both queues are bounded and lock-free; a full queue drops the report (the counters still
//! count the packets). A worker sends at most one notice per kind per second, so the logs
//! never carry a line per packet. After pushing, a worker wakes the control thread once per
//! loop through the callback it was given, so a new neighbour is asked for at once rather
//! than at the next timer tick.

use crossbeam_queue::ArrayQueue;

use crate::counted::counted_enum;
use crate::packet::{Family, FlowKey};

counted_enum! {
    /// What a notice is about.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum NoticeKind {
        /// A packet dropped because its destination's next hop could not be resolved in time
        /// (or the hold queue was full).
        NoNextHop,
        /// A flow whose backend left its Service was reset.
        BackendLeftReset,
        /// A new flow could not be recorded: the flow table's buckets were full of
        /// established flows (forwarded without state in dnat mode, dropped in snat mode).
        TableFull,
        /// snat mode: no translated port was free for a new flow.
        NoSnatPort,
    }
}

/// One notice: what happened, to which flow (for [`NoticeKind::NoNextHop`], only the key's
/// destination is set: the unresolved address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    /// What happened.
    pub kind: NoticeKind,
    /// The packet's flow key, after translation.
    pub key: FlowKey,
}

/// The queues from the workers to the control thread.
pub struct Reports {
    unresolved: ArrayQueue<(Family, [u8; 16])>,
    notices: ArrayQueue<Notice>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl core::fmt::Debug for Reports {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reports")
            .field("unresolved", &self.unresolved.len())
            .field("notices", &self.notices.len())
            .finish_non_exhaustive()
    }
}

impl Reports {
    /// Queues of `capacity` entries each; `wake` is called (from a worker thread) when
    /// something was pushed.
    #[must_use]
    pub fn new(capacity: usize, wake: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            unresolved: ArrayQueue::new(capacity.max(1)),
            notices: ArrayQueue::new(capacity.max(1)),
            wake: Box::new(wake),
        }
    }

    /// Queues that nobody listens to (tests and benchmarks read them directly).
    #[must_use]
    pub fn unwatched(capacity: usize) -> Self {
        Self::new(capacity, || {})
    }

    /// Asks for `addr` to be resolved. Returns false when the queue is full.
    pub fn unresolved(&self, family: Family, addr: [u8; 16]) -> bool {
        self.unresolved.push((family, addr)).is_ok()
    }

    /// Reports `notice`. Returns false when the queue is full.
    pub fn notice(&self, notice: Notice) -> bool {
        self.notices.push(notice).is_ok()
    }

    /// Wakes the control thread.
    pub fn wake(&self) {
        (self.wake)();
    }

    /// The next address to resolve (control thread).
    pub fn next_unresolved(&self) -> Option<(Family, [u8; 16])> {
        self.unresolved.pop()
    }

    /// The next notice (control thread).
    pub fn next_notice(&self) -> Option<Notice> {
        self.notices.pop()
    }
}
