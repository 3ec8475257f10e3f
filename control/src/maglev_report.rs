//! `xlb maglev`: what share of a Service's flows each backend gets, and how many flows move
//! when one backend leaves — computed with the dataplane's own table builder.

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde_json::json;
use xlb_dataplane::lb::maglev::MaglevTable;
use xlb_dataplane::packet::Endpoint;

use crate::inspect::InputError;

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The backends.
    pub backends: Vec<SocketAddr>,
    /// Their weights (all 1 when empty).
    pub weights: Vec<u32>,
    /// An explicit table size.
    pub table_size: Option<u32>,
    /// A backend to remove, to see how many flows would move.
    pub remove: Option<SocketAddr>,
}

/// The computed report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Slots in the table.
    pub table_size: u32,
    /// Each backend with its share of the table.
    pub shares: Vec<(SocketAddr, f64)>,
    /// With a removal: the table size after it, the share of all flows that change backend,
    /// and the share of flows of the remaining backends that change backend.
    pub removal: Option<Removal>,
}

/// The effect of removing one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    /// The backend removed.
    pub backend: SocketAddr,
    /// Slots in the table without it.
    pub table_size: u32,
    /// Fraction of all flows whose backend changes (the removed backend's included).
    pub moved_fraction: f64,
    /// Fraction of all flows that change backend although theirs stayed.
    pub moved_other_fraction: f64,
}

/// Builds the table(s) and computes the report.
///
/// # Errors
/// Bad input (mismatched weights, an unknown backend to remove, a bad table size), phrased
/// for the operator.
pub fn report(req: &Request) -> Result<Report, InputError> {
    if !req.weights.is_empty() && req.weights.len() != req.backends.len() {
        return Err(InputError(format!(
            "{} weights for {} backends",
            req.weights.len(),
            req.backends.len()
        )));
    }
    let weighted: Vec<(Endpoint, u32)> = req
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| (Endpoint::from(*b), req.weights.get(i).copied().unwrap_or(1)))
        .collect();
    let build = |set: &[(Endpoint, u32)]| {
        MaglevTable::build(set, req.table_size).map_err(|e| InputError(e.to_string()))
    };
    let table = build(&weighted)?;
    let m = f64::from(table.size());
    let shares = table
        .counts(weighted.len())
        .iter()
        .zip(&req.backends)
        .map(|(c, b)| (*b, f64::from(*c) / m))
        .collect();
    let removal = match req.remove {
        None => None,
        Some(gone) => {
            let index = req
                .backends
                .iter()
                .position(|b| *b == gone)
                .ok_or_else(|| InputError(format!("{gone} is not one of the backends")))?;
            let mut rest = weighted.clone();
            rest.remove(index);
            let after = build(&rest)?;
            // Compare the backends flows land on, hash by hash, across both table sizes.
            let probes = 1u64 << 20;
            let (mut moved, mut moved_other) = (0u64, 0u64);
            for i in 0..probes {
                let hash = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let before = weighted[table.lookup(hash)].0;
                let now = rest[after.lookup(hash)].0;
                if before != now {
                    moved += 1;
                    if before != weighted[index].0 {
                        moved_other += 1;
                    }
                }
            }
            Some(Removal {
                backend: gone,
                table_size: after.size(),
                moved_fraction: moved as f64 / probes as f64,
                moved_other_fraction: moved_other as f64 / probes as f64,
            })
        }
    };
    Ok(Report {
        table_size: table.size(),
        shares,
        removal,
    })
}

impl Report {
    /// The report as JSON: `table_size`, `shares` (backend -> fraction), and with a removal
    /// `moved_fraction`, `moved_other_fraction` and `table_size_after`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let shares: serde_json::Map<String, serde_json::Value> = self
            .shares
            .iter()
            .map(|(b, s)| (b.to_string(), json!(s)))
            .collect();
        let mut out = json!({ "table_size": self.table_size, "shares": shares });
        if let Some(r) = &self.removal {
            out["removed"] = json!(r.backend.to_string());
            out["table_size_after"] = json!(r.table_size);
            out["moved_fraction"] = json!(r.moved_fraction);
            out["moved_other_fraction"] = json!(r.moved_other_fraction);
        }
        out
    }

    /// The report as text for a terminal.
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "table size {} ({} backends)\n",
            self.table_size,
            self.shares.len()
        );
        for (b, s) in &self.shares {
            let _ = writeln!(out, "  {b:<28} {:6.2}%", s * 100.0);
        }
        if let Some(r) = &self.removal {
            let _ = writeln!(
                out,
                "removing {}: table size {}, {:.2}% of flows move ({:.2}% of flows whose backend stays)",
                r.backend,
                r.table_size,
                r.moved_fraction * 100.0,
                r.moved_other_fraction * 100.0
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_dataplane::lb::maglev::table_size_for;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([198, 19, i, 2], 8080)))
            .collect()
    }

    #[test]
    fn shares_of_equal_backends_are_equal_within_a_slot() {
        let r = report(&Request {
            backends: addrs(4),
            ..Request::default()
        })
        .unwrap();
        assert_eq!(r.table_size, table_size_for(4));
        let slot = 1.0 / f64::from(r.table_size);
        for (_, s) in &r.shares {
            assert!((s - 0.25).abs() <= slot, "{s}");
        }
        assert!((r.shares.iter().map(|(_, s)| s).sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn weights_shift_the_shares() {
        let r = report(&Request {
            backends: addrs(2),
            weights: vec![1, 3],
            table_size: Some(65537),
            ..Request::default()
        })
        .unwrap();
        assert!((r.shares[1].1 - 0.75).abs() < 0.001, "{:?}", r.shares);
    }

    #[test]
    fn removing_a_backend_moves_its_flows_and_few_others() {
        let backends = addrs(10);
        let r = report(&Request {
            remove: Some(backends[3]),
            backends,
            table_size: Some(10007),
            ..Request::default()
        })
        .unwrap();
        let removal = r.removal.clone().unwrap();
        // Its own tenth must move; a few percent of the rest may.
        assert!(
            removal.moved_fraction >= 0.09 && removal.moved_fraction < 0.15,
            "{removal:?}"
        );
        assert!(removal.moved_other_fraction < 0.05, "{removal:?}");
        let json = r.to_json();
        assert!(json["moved_fraction"].as_f64().is_some());
        assert_eq!(json["table_size"], 10007);
        assert!(json["shares"]["198.19.0.2:8080"].as_f64().is_some());
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let mismatch = Request {
            backends: addrs(2),
            weights: vec![1],
            ..Request::default()
        };
        assert!(report(&mismatch)
            .unwrap_err()
            .0
            .contains("1 weights for 2 backends"));
        let unknown = Request {
            backends: addrs(2),
            remove: Some(SocketAddr::from(([198, 19, 9, 9], 1))),
            ..Request::default()
        };
        assert!(report(&unknown)
            .unwrap_err()
            .0
            .contains("not one of the backends"));
        let size = Request {
            backends: addrs(2),
            table_size: Some(1000),
            ..Request::default()
        };
        assert!(report(&size).unwrap_err().0.contains("not a prime"));
        assert!(report(&Request::default()).is_err());
    }
}
