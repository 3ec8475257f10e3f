//! Property tests of Maglev tables: full, order-independent, fair, minimally disruptive,
//! weight-proportional, and never a panic.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use xlb_dataplane::lb::maglev::{table_size_for, MaglevTable, SIZE_LADDER};
use xlb_dataplane::packet::Endpoint;

/// `n` distinct backends in 198.18.0.0/15 drawn from `seed`.
fn distinct_backends(n: usize, seed: u64) -> Vec<(Endpoint, u32)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut x = seed | 1;
    let mut out = Vec::new();
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let addr = Ipv4Addr::from(0xc612_0000 | (x as u32 & 0x1_ffff));
        let port = 1024 + (x >> 40) as u16 % 60000;
        if seen.insert((addr, port)) {
            out.push((Endpoint::new(addr.into(), port), 1));
        }
    }
    out
}

/// The table as endpoints, slot by slot.
fn owners(table: &MaglevTable, backends: &[(Endpoint, u32)]) -> Vec<Endpoint> {
    table
        .slots()
        .iter()
        .map(|&i| backends[usize::from(i)].0)
        .collect()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    ProptestConfig::with_cases(cases.unwrap_or(64))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_slot_belongs_to_a_backend(n in 1usize..300, seed in any::<u64>()) {
        let backends = distinct_backends(n, seed);
        let table = MaglevTable::build(&backends, None).unwrap();
        prop_assert_eq!(table.size(), table_size_for(n));
        prop_assert!(table.slots().iter().all(|&s| usize::from(s) < n));
    }

    #[test]
    fn the_table_does_not_depend_on_input_order(n in 2usize..100, seed in any::<u64>(), rotate in any::<usize>()) {
        let backends = distinct_backends(n, seed);
        let mut shuffled = backends.clone();
        shuffled.reverse();
        shuffled.rotate_left(rotate % n);
        let a = MaglevTable::build(&backends, None).unwrap();
        let b = MaglevTable::build(&shuffled, None).unwrap();
        prop_assert_eq!(owners(&a, &backends), owners(&b, &shuffled));
    }

    #[test]
    fn every_backend_gets_its_fair_share_within_one_percent(n in 1usize..1000, seed in any::<u64>()) {
        let backends = distinct_backends(n, seed);
        let table = MaglevTable::build(&backends, None).unwrap();
        let m = f64::from(table.size());
        prop_assume!(m >= 100.0 * n as f64);
        let fair = m / n as f64;
        for (i, count) in table.counts(n).into_iter().enumerate() {
            let off = (f64::from(count) - fair).abs() / fair;
            prop_assert!(off <= 0.01, "backend {} has {} slots, fair share {:.1}", i, count, fair);
        }
    }

    #[test]
    fn weights_are_honoured_within_two_percent(weights in proptest::collection::vec(1u32..=4, 2..50), seed in any::<u64>()) {
        let mut backends = distinct_backends(weights.len(), seed);
        for (b, w) in backends.iter_mut().zip(&weights) {
            b.1 = *w;
        }
        let table = MaglevTable::build(&backends, Some(65521)).unwrap();
        let total: u32 = weights.iter().sum();
        for (count, w) in table.counts(backends.len()).into_iter().zip(&weights) {
            let expected = 65521.0 * f64::from(*w) / f64::from(total);
            let off = (f64::from(count) - expected).abs() / expected;
            prop_assert!(off <= 0.02, "weight {} got {} slots, expected {:.0}", w, count, expected);
        }
    }

    #[test]
    fn arbitrary_inputs_never_panic(
        raw in proptest::collection::vec((any::<[u8; 4]>(), any::<u16>(), 0u32..1000), 0..40),
        size in proptest::option::of(any::<u32>()),
    ) {
        let backends: Vec<(Endpoint, u32)> = raw
            .iter()
            .map(|(a, p, w)| (Endpoint::new(Ipv4Addr::from(*a).into(), *p), *w))
            .collect();
        if let Ok(table) = MaglevTable::build(&backends, size) {
            prop_assert!(table.slots().iter().all(|&s| backends[usize::from(s)].1 > 0));
            prop_assert!(table.lookup(u64::MAX) < backends.len());
        }
    }
}

proptest! {
    // Each case averages 64 sets: fewer cases (PROPTEST_CASES / 4).
    #![proptest_config(ProptestConfig::with_cases(config().cases.div_ceil(4)))]

    /// Disruption is a property of the algorithm on average: for a given backend set a
    /// removal can move more (the paper's loop cascades when turns shift; `xlb maglev
    /// --remove` shows the figure for a real set). Single sets are heavy-tailed (up to 7% at
    /// N = 10, M = 1021), so each case averages 64 random sets; the true means measured over
    /// 200 sets are 1.5-2.5%.
    #[test]
    fn removing_a_backend_moves_few_other_slots_on_average(n in 3usize..60, seed in any::<u64>()) {
        let near_100 = table_size_for(n);
        let over_1000 = SIZE_LADDER.iter().copied().find(|&m| u64::from(m) >= 1000 * n as u64);
        let mut sizes = vec![(near_100, 0.03)];
        if let Some(m) = over_1000.filter(|&m| m <= 32749) {
            sizes.push((m, 0.01));
        }
        for (m, bound) in sizes {
            let trials = 64;
            let mean = (0..trials).map(|t| moved_by_removal(n, seed.wrapping_add(t), t as usize, m)).sum::<f64>() / trials as f64;
            prop_assert!(mean <= bound, "M = {}, N = {}: {:.2}% of slots moved", m, n, mean * 100.0);
        }
    }
}

/// The share of slots, other than the removed backend's, that change owner when one of `n`
/// backends leaves a table of `m` slots.
fn moved_by_removal(n: usize, seed: u64, victim: usize, m: u32) -> f64 {
    let backends = distinct_backends(n, seed);
    let victim = victim % n;
    let mut fewer = backends.clone();
    fewer.remove(victim);
    let before = owners(&MaglevTable::build(&backends, Some(m)).unwrap(), &backends);
    let after = owners(&MaglevTable::build(&fewer, Some(m)).unwrap(), &fewer);
    let gone = backends[victim].0;
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != gone && b != a)
        .count();
    moved as f64 / f64::from(m)
}

/// The averages the paper's algorithm is known for: about 2.5% at 100 slots per backend and
/// 0.5% at 1000 (printed with --nocapture for the record).
#[test]
fn disruption_averages_are_in_line_with_the_paper() {
    for (n, m, bound) in [(100, 10007_u32, 0.03), (10, 10007, 0.01)] {
        let trials = 20;
        let mean = (0..trials)
            .map(|t| moved_by_removal(n, 0x5eed + t, t as usize, m))
            .sum::<f64>()
            / trials as f64;
        println!(
            "N = {n}, M = {m}: {:.2}% of other slots move on average",
            mean * 100.0
        );
        assert!(mean <= bound);
    }
}
