//! Who owns a Service key (VIP, port, protocol), decided in one place: the first claimant
//! holds the key until it lets it go; a later claimant waits (with what it wants to put
//! there), and when the holder lets go, the waiters are handed back at once, in the order
//! they came, for the caller to publish. Used twice with the same rule: between the
//! Services of the Kubernetes source (`kube_source`: the Service that claimed a key first
//! keeps it) and between sources (`publish`: the file and Kubernetes).
//!
//! The snapshot's own check of two Services at one key (`SnapshotError::DuplicateService`)
//! is not a decision: it refuses a change that would break the rule.
//!
//! Must not know: what the claimants are, or where their claims come from.

use hashbrown::HashMap;
use xlb_dataplane::lb::snapshot::ServiceKey;

/// The holders of Service keys, and the claims waiting for them (`W`: what a waiting claim
/// carries).
#[derive(Debug)]
pub struct Claims<C, W = ()> {
    holders: HashMap<ServiceKey, C>,
    waiting: HashMap<ServiceKey, Vec<(C, W)>>,
}

impl<C, W> Default for Claims<C, W> {
    fn default() -> Self {
        Self {
            holders: HashMap::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<C: Clone + PartialEq, W> Claims<C, W> {
    /// Who holds `key`.
    #[must_use]
    pub fn holder(&self, key: &ServiceKey) -> Option<&C> {
        self.holders.get(key)
    }

    /// Whether `who` may take `key`: it is free, or `who` holds it already. Otherwise the
    /// holder, and `who`'s claim waits with `wanted` (replacing an earlier one of `who`).
    ///
    /// # Errors
    /// The holder, when another claimant holds the key.
    pub fn claim(&mut self, key: ServiceKey, who: &C, wanted: W) -> Result<(), C> {
        match self.holders.get(&key) {
            Some(holder) if holder != who => {
                let queue = self.waiting.entry(key).or_default();
                queue.retain(|(c, _)| c != who);
                queue.push((who.clone(), wanted));
                Err(holder.clone())
            }
            _ => Ok(()),
        }
    }

    /// The keys `who` holds.
    pub fn held_by<'a>(&'a self, who: &'a C) -> impl Iterator<Item = ServiceKey> + 'a {
        self.holders
            .iter()
            .filter(move |(_, c)| *c == who)
            .map(|(k, _)| *k)
    }

    /// The claims waiting for `key`, first come first.
    pub fn waiting(&self, key: &ServiceKey) -> impl Iterator<Item = &(C, W)> {
        self.waiting.get(key).into_iter().flatten()
    }

    /// Records `who` as the holder of `key` (after [`Claims::claim`] said it may take it, once
    /// what it claimed for is in place).
    pub fn hold(&mut self, key: ServiceKey, who: C) {
        self.holders.insert(key, who);
    }

    /// `who` lets `key` go: if it held it, the key is free and the claims that waited for it
    /// are returned, first come first; if it only waited, its claim is withdrawn.
    pub fn release(&mut self, key: &ServiceKey, who: &C) -> Vec<(C, W)> {
        if self.holders.get(key) == Some(who) {
            self.holders.remove(key);
            return self.waiting.remove(key).unwrap_or_default();
        }
        if let Some(queue) = self.waiting.get_mut(key) {
            queue.retain(|(c, _)| c != who);
            if queue.is_empty() {
                self.waiting.remove(key);
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_dataplane::packet::{Endpoint, IpProto};

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            vip: Endpoint::new([198, 18, 64, 1].into(), port),
            proto: IpProto::TCP,
        }
    }

    #[test]
    fn the_first_claimant_holds_a_key_and_a_later_one_waits() {
        let mut c: Claims<&str, u32> = Claims::default();
        assert_eq!(c.claim(key(80), &"a", 1), Ok(()));
        c.hold(key(80), "a");
        assert_eq!(c.claim(key(80), &"a", 2), Ok(()), "the holder claims again");
        assert_eq!(c.claim(key(80), &"b", 3), Err("a"));
        assert_eq!(c.holder(&key(80)), Some(&"a"));
        assert_eq!(c.claim(key(81), &"b", 4), Ok(()), "another key is free");
    }

    #[test]
    fn letting_go_hands_the_waiting_claims_back_first_come_first_with_their_latest_wants() {
        let mut c: Claims<&str, u32> = Claims::default();
        c.hold(key(80), "a");
        let _ = c.claim(key(80), &"b", 1);
        let _ = c.claim(key(80), &"c", 2);
        let _ = c.claim(key(80), &"b", 3);
        assert_eq!(c.release(&key(80), &"z"), [], "not the holder, not waiting");
        assert_eq!(c.holder(&key(80)), Some(&"a"));
        assert_eq!(c.release(&key(80), &"a"), [("c", 2), ("b", 3)]);
        assert_eq!(c.holder(&key(80)), None);
        assert_eq!(c.release(&key(80), &"a"), [], "handed back once");
    }

    #[test]
    fn a_waiter_that_lets_go_is_not_handed_the_key_later() {
        let mut c: Claims<&str> = Claims::default();
        c.hold(key(80), "a");
        let _ = c.claim(key(80), &"b", ());
        assert_eq!(c.release(&key(80), &"b"), []);
        assert_eq!(c.release(&key(80), &"a"), []);
    }
}
