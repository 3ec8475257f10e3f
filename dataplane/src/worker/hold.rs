//! Frames waiting for a next hop: a small bounded queue per worker, as the kernel keeps one
//! per unresolved neighbour (`unres_qlen`), so that the first packet to a host the node has
//! just learned about (a new client's SYN-ACK, typically) is sent a moment later instead of
//! being dropped and retransmitted a second later.
//!
//! At most [`PER_ADDRESS`] frames per address and [`HELD`] in all; when either is reached the
//! oldest frame (of that address, or of all) is given up for the new one, as the kernel does,
//! so that a flood towards unresolvable addresses (spoofed sources) cannot keep a real new
//! client's first answer out. A frame held longer than [`HOLD_SECONDS`] is given up. The worker
//! retries held frames when new next hops are published.

use crate::lb::flow::Second;
use crate::packet::Family;

/// Frames held per unresolved address: a window of fragmented datagrams (three frames each at
/// 4 000 bytes), as the kernel's own queue for an unresolved neighbour holds (212 992 bytes).
pub const PER_ADDRESS: usize = 32;
/// Frames held by one worker in all.
pub const HELD: usize = 256;
/// How long a frame waits, in seconds: the kernel's three probes a second apart.
pub const HOLD_SECONDS: Second = 3;

/// A frame waiting for the next hop of its destination.
#[derive(Debug)]
pub(super) struct Held<F> {
    pub(super) frame: F,
    pub(super) family: Family,
    pub(super) addr: [u8; 16],
    since: Second,
}

/// The held frames of one worker.
#[derive(Debug)]
pub(super) struct HoldQueue<F> {
    held: Vec<Held<F>>,
}

impl<F> HoldQueue<F> {
    pub(super) fn new() -> Self {
        Self {
            held: Vec::with_capacity(HELD),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds `frame` for `addr`. Returns whether the address had no frame held before (so the
    /// caller asks for it to be resolved once), and the frame given up to make room, if any.
    pub(super) fn hold(
        &mut self,
        frame: F,
        family: Family,
        addr: [u8; 16],
        now: Second,
    ) -> (bool, Option<F>) {
        let mine = |h: &Held<F>| h.family == family && h.addr == addr;
        let same = self.held.iter().filter(|h| mine(h)).count();
        let given_up = if same >= PER_ADDRESS {
            self.held.iter().position(mine)
        } else if self.held.len() >= HELD {
            Some(0)
        } else {
            None
        }
        .map(|oldest| self.held.remove(oldest).frame);
        self.held.push(Held {
            frame,
            family,
            addr,
            since: now,
        });
        (same == 0, given_up)
    }

    /// Takes out, in arrival order, the frames whose address `resolved` now knows (into
    /// `ready`) and those held too long (into `expired`).
    pub(super) fn release(
        &mut self,
        now: Second,
        mut resolved: impl FnMut(Family, &[u8; 16]) -> bool,
        ready: &mut Vec<Held<F>>,
        expired: &mut Vec<F>,
    ) {
        let mut kept = Vec::new();
        for h in self.held.drain(..) {
            if resolved(h.family, &h.addr) {
                ready.push(h);
            } else if now.saturating_sub(h.since) >= HOLD_SECONDS {
                expired.push(h.frame);
            } else {
                kept.push(h);
            }
        }
        self.held = kept;
    }

    /// Every held frame (at stop, to give them back).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = F> + '_ {
        self.held.drain(..).map(|h| h.frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> [u8; 16] {
        let mut a = [0; 16];
        a[..4].copy_from_slice(&[198, 18, 0, n]);
        a
    }

    #[test]
    fn frames_are_held_per_address_up_to_a_bound_and_released_in_order() {
        let mut q = HoldQueue::new();
        let last = PER_ADDRESS + 1;
        assert_eq!(q.hold(1, Family::Ipv4, addr(1), 0), (true, None));
        for n in 2..last {
            assert_eq!(q.hold(n, Family::Ipv4, addr(1), 0), (false, None));
        }
        assert_eq!(
            q.hold(last, Family::Ipv4, addr(1), 0),
            (false, Some(1)),
            "PER_ADDRESS per address: the oldest goes"
        );
        assert_eq!(q.hold(last + 1, Family::Ipv4, addr(2), 0), (true, None));
        let (mut ready, mut expired) = (Vec::new(), Vec::new());
        q.release(1, |_, a| *a == addr(1), &mut ready, &mut expired);
        let frames: Vec<usize> = ready.iter().map(|h| h.frame).collect();
        assert_eq!(frames, (2..=last).collect::<Vec<_>>());
        assert!(expired.is_empty());
        ready.clear();
        q.release(HOLD_SECONDS, |_, _| false, &mut ready, &mut expired);
        assert_eq!((ready.len(), expired), (0, vec![last + 1]));
        assert!(q.is_empty());
    }

    /// A flood towards many unresolvable addresses cannot keep a new frame out: the oldest
    /// goes.
    #[test]
    fn the_queue_is_bounded_in_all_and_gives_up_its_oldest_frame() {
        let mut q = HoldQueue::new();
        for n in 0..HELD {
            let a = u8::try_from(n % 250).unwrap();
            let mut key = addr(a);
            key[4] = u8::try_from(n / 250).unwrap();
            assert_eq!(q.hold(n, Family::Ipv4, key, 0).1, None);
        }
        assert_eq!(q.hold(9999, Family::Ipv4, addr(255), 0), (true, Some(0)));
        let frames: Vec<usize> = q.drain().collect();
        assert_eq!(frames.len(), HELD);
        assert_eq!(frames.last(), Some(&9999));
    }
}
