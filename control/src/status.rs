//! `xlb status`: a running xlb's state as an operator reads it, from its admin API. Traffic
//! totals and rates, drops by reason, the flow table's fill and each Service with its
//! backends, as aligned tables; or the same as one JSON document (`--json`).
//!
//! Owns: reading `/metrics` text and `/services` pages into a [`Status`], rates from two
//! samples of `/metrics`, and the tables. Must not know: how the daemon keeps its counters (it
//! reads only what `/metrics` publishes, by metric name).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::admin_client::get;
use crate::error::Error;

/// The most Services `xlb status` lists (ten `/services` pages); the rest are counted.
pub const STATUS_SERVICES_MAX: usize = 10_000;

/// The traffic counters `xlb status` shows, by metric name, with the label it prints.
const TRAFFIC: [(&str, &str); 8] = [
    ("xlb_received_packets_total", "received"),
    ("xlb_transmitted_packets_total", "transmitted"),
    ("xlb_forwarded_packets_total", "forwarded to a backend"),
    ("xlb_replied_packets_total", "replies translated back"),
    (
        "xlb_rejected_packets_total",
        "rejected (reset, unreachable)",
    ),
    ("xlb_passed_packets_total", "not for xlb"),
    ("xlb_handed_back_packets_total", "handed back to the kernel"),
    ("xlb_held_packets_total", "held for a next hop"),
];

/// Counters that count drops of one reason each (the rest are `xlb_dropped_packets_total`'s
/// `reason` label and the sockets' ring counters).
const DROPS: [(&str, &str); 5] = [
    ("xlb_tx_ring_full_drops_total", "TxRingFull"),
    ("xlb_no_next_hop_drops_total", "NoNextHop"),
    ("xlb_rewrite_failed_drops_total", "RewriteFailed"),
    ("xlb_fragments_expired_drops_total", "FragmentExpired"),
    ("xlb_too_big_packets_total", "TooBig"),
];

/// The sockets' counters that are drops (`xlb_socket_<name>_total`).
const SOCKET_DROPS: [&str; 4] = [
    "rx_dropped",
    "rx_ring_full",
    "rx_invalid_descs",
    "tx_invalid_descs",
];

/// One sample of `/metrics`: every series (name and labels as written) and its value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    /// Reads the Prometheus text format; comments and lines that are not `series value` are
    /// skipped.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The sum of `name`'s series whose labels include every `label="value"` of `labels`.
    #[must_use]
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                    && labels
                        .iter()
                        .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .fold(0.0, |sum, (_, v)| sum + v)
    }

    /// `name`'s series summed by the value of `label`.
    fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let key = format!("{label}=\"");
        for (series, value) in &self.0 {
            let Some(rest) = series.strip_prefix(name).filter(|r| r.starts_with('{')) else {
                continue;
            };
            let Some(at) = rest.find(&key) else { continue };
            let from = &rest[at + key.len()..];
            let Some(end) = from.find('"') else { continue };
            *out.entry(from[..end].to_owned()).or_insert(0.0) += value;
        }
        out
    }
}

/// A running xlb's state: what `xlb status` prints.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// The second sample of `/metrics`.
    pub metrics: Metrics,
    /// Its totals' growth per second since the first sample (`None`: one sample only).
    pub rates: Option<Metrics>,
    /// `/services`' Services, in its order.
    pub services: Vec<serde_json::Value>,
    /// Services past [`STATUS_SERVICES_MAX`]: where the next page starts.
    pub more_from: Option<u64>,
}

impl Status {
    /// Samples `/metrics` twice, `interval` apart (once when it is zero), and reads
    /// `/services`.
    ///
    /// # Errors
    /// xlb not reachable at `admin`, or an answer that is not the admin API's.
    pub fn fetch(admin: SocketAddr, interval: Duration) -> Result<Self, Error> {
        let first = Metrics::parse(&get(admin, "/metrics")?);
        let started = Instant::now();
        let (metrics, rates) = if interval.is_zero() {
            (first, None)
        } else {
            std::thread::sleep(interval);
            let second = Metrics::parse(&get(admin, "/metrics")?);
            let seconds = started.elapsed().as_secs_f64();
            let rates = second
                .0
                .iter()
                .filter(|(series, _)| series.split('{').next().is_some_and(is_total))
                .map(|(series, v)| {
                    let before = first.0.get(series).copied().unwrap_or(0.0);
                    (series.clone(), ((v - before) / seconds).max(0.0))
                })
                .collect();
            (second, Some(Metrics(rates)))
        };
        let (services, more_from) = services(admin)?;
        Ok(Self {
            metrics,
            rates,
            services,
            more_from,
        })
    }

    /// Drops by reason, summed over workers and sockets: (reason, total, per second).
    #[must_use]
    pub fn drops(&self) -> Vec<(String, f64, Option<f64>)> {
        let read = |m: &Metrics| {
            let mut out = m.by_label("xlb_dropped_packets_total", "reason");
            for (name, reason) in DROPS {
                out.insert(reason.to_owned(), m.sum(name, &[]));
            }
            for name in SOCKET_DROPS {
                out.insert(
                    format!("socket {name}"),
                    m.sum(&format!("xlb_socket_{name}_total"), &[]),
                );
            }
            out
        };
        let rates = self.rates.as_ref().map(read);
        read(&self.metrics)
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .map(|(reason, n)| {
                let rate = rates
                    .as_ref()
                    .map(|r| r.get(&reason).copied().unwrap_or(0.0));
                (reason, n, rate)
            })
            .collect()
    }

    /// The whole report as aligned tables.
    #[must_use]
    pub fn text(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        // Each family's table fills on its own.
        let fill = |family| {
            let entries = m.sum("xlb_flow_entries", &[("family", family)]);
            let capacity = m.sum("xlb_flow_capacity", &[("family", family)]);
            let percent = if capacity > 0.0 {
                100.0 * entries / capacity
            } else {
                0.0
            };
            format!("{entries} of {capacity} ({percent:.1}% full)")
        };
        let _ = writeln!(
            out,
            "snapshot generation {}, flow table: IPv4 {}, IPv6 {}; {} evicted, {} not recorded (table full)",
            m.sum("xlb_snapshot_generation", &[]),
            fill("ipv4"),
            fill("ipv6"),
            m.sum("xlb_flow_evictions_total", &[]),
            m.sum("xlb_flow_table_full_total", &[]),
        );
        if m.0.contains_key("xlb_kubernetes_synced") {
            let _ = writeln!(
                out,
                "kubernetes: synced {}, watch errors {}, relists {}",
                m.sum("xlb_kubernetes_synced", &[]) > 0.0,
                m.sum("xlb_kubernetes_watch_errors_total", &[]),
                m.sum("xlb_kubernetes_relists_total", &[]),
            );
        }
        let rate = |name: &str, labels: &[(&str, &str)]| {
            self.rates
                .as_ref()
                .map_or_else(|| "-".to_owned(), |r| format!("{:.1}", r.sum(name, labels)))
        };
        out.push('\n');
        let mut traffic = Table::new(["PACKETS", "TOTAL", "PER SECOND"]);
        for (name, label) in TRAFFIC {
            traffic.row([
                label.to_owned(),
                m.sum(name, &[]).to_string(),
                rate(name, &[]),
            ]);
        }
        out.push_str(&traffic.to_string());
        out.push('\n');
        let drops = self.drops();
        if drops.is_empty() {
            out.push_str("no drops\n");
        } else {
            let mut table = Table::new(["DROPPED, BY REASON", "TOTAL", "PER SECOND"]);
            for (reason, n, per_second) in drops {
                table.row([
                    reason,
                    n.to_string(),
                    per_second.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}")),
                ]);
            }
            out.push_str(&table.to_string());
        }
        out.push('\n');
        out.push_str(&services_tables(&self.services, self.more_from));
        out
    }

    /// The whole report as JSON: the Services as `/services` gives them, every metric series,
    /// and the rates.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        let drops: Vec<_> = self
            .drops()
            .into_iter()
            .map(|(reason, total, per_second)| {
                serde_json::json!({ "reason": reason, "total": total, "per_second": per_second })
            })
            .collect();
        serde_json::json!({
            "services": self.services,
            "more_services_from": self.more_from,
            "drops": drops,
            "metrics": self.metrics.0,
            "rates_per_second": self.rates.as_ref().map(|r| &r.0),
        })
    }
}

/// Whether a metric name is a counter's (it grows, so it has a rate).
fn is_total(name: &str) -> bool {
    name.ends_with("_total")
}

/// Every page of `/services` up to [`STATUS_SERVICES_MAX`].
fn services(admin: SocketAddr) -> Result<(Vec<serde_json::Value>, Option<u64>), Error> {
    let mut out = Vec::new();
    let mut from = Some(0u64);
    while let Some(at) = from.filter(|_| out.len() < STATUS_SERVICES_MAX) {
        let body = get(admin, &format!("/services?limit=1000&from={at}"))?;
        let mut page: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::AdminAnswer(format!("/services: {e}")))?;
        if let Some(list) = page["services"].as_array_mut() {
            out.append(list);
        }
        from = page["next"].as_u64();
    }
    Ok((out, from))
}

/// The Services table (one row each) and the backends table (one row per backend of each).
fn services_tables(services: &[serde_json::Value], more_from: Option<u64>) -> String {
    if services.is_empty() {
        return "no Services\n".to_owned();
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let address = |v: &serde_json::Value, port: &serde_json::Value| match v.as_str() {
        Some(a) if a.contains(':') => format!("[{a}]:{port}"),
        a => format!("{}:{port}", a.unwrap_or("-")),
    };
    let mut table = Table::new([
        "SERVICE",
        "VIP",
        "KIND",
        "SCHEDULER",
        "AFFINITY",
        "POLICY",
        "SOURCES",
        "NO ENDPOINTS",
        "BACKENDS",
    ]);
    let mut backends = Table::new(["SERVICE", "BACKEND", "STATE", "WHERE", "WEIGHT", "FLOWS"]);
    for s in services {
        let list = s["backends"].as_array().map_or(&[][..], Vec::as_slice);
        let ready = list.iter().filter(|b| b["state"] == "ready").count();
        let ranges: Vec<String> = s["source_ranges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        table.row([
            text(&s["name"]),
            format!(
                "{}/{}",
                address(&s["vip"], &s["port"]),
                text(&s["protocol"])
            ),
            text(&s["kind"]),
            text(&s["scheduler"]),
            s["affinity_timeout_seconds"]
                .as_u64()
                .map_or_else(|| "none".to_owned(), |t| format!("{t}s")),
            text(&s["traffic_policy"]),
            if ranges.is_empty() {
                "any".to_owned()
            } else {
                ranges.join(",")
            },
            text(&s["no_endpoints"]),
            format!("{ready} ready of {}", list.len()),
        ]);
        for b in list {
            backends.row([
                text(&s["name"]),
                address(&b["address"], &b["port"]),
                text(&b["state"]),
                if b["local"].as_bool() == Some(true) {
                    "local"
                } else {
                    "remote"
                }
                .to_owned(),
                b["weight"].to_string(),
                b["live_flows"]
                    .as_u64()
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            ]);
        }
    }
    let mut out = table.to_string();
    if let Some(rest) = more_from {
        let _ = writeln!(
            out,
            "(more Services from {rest} on: see /services?from={rest})"
        );
    }
    out.push('\n');
    if backends.rows.is_empty() {
        out.push_str("no backends\n");
    } else {
        out.push_str(&backends.to_string());
    }
    out
}

/// Rows of cells printed in columns as wide as their widest cell.
struct Table<const N: usize> {
    head: [&'static str; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(head: [&'static str; N]) -> Self {
        Self {
            head,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells);
    }
}

impl<const N: usize> core::fmt::Display for Table<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut widths = self.head.map(str::len);
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (i, (cell, w)) in cells.zip(widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let _ = write!(text, "{cell:<w$}");
            }
            writeln!(f, "{}", text.trim_end())
        };
        line(&mut self.head.iter().copied())?;
        for row in &self.rows {
            line(&mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP xlb_received_packets_total Frames received
# TYPE xlb_received_packets_total counter
xlb_received_packets_total{worker=\"0\"} 10
xlb_received_packets_total{worker=\"1\"} 5
xlb_dropped_packets_total{worker=\"0\",reason=\"NoService\"} 3
xlb_dropped_packets_total{worker=\"1\",reason=\"NoService\"} 4
xlb_dropped_packets_total{worker=\"1\",reason=\"BadChecksum\"} 0
xlb_tx_ring_full_drops_total{worker=\"0\"} 2
xlb_socket_rx_ring_full_total{worker=\"0\",port=\"n0\"} 1
xlb_flow_entries{family=\"ipv4\"} 250
xlb_flow_entries{family=\"ipv6\"} 10
xlb_flow_capacity{family=\"ipv4\"} 1000
xlb_flow_capacity{family=\"ipv6\"} 200
";

    #[test]
    fn metrics_text_sums_series_by_name_and_labels() {
        let m = Metrics::parse(METRICS);
        assert_eq!(m.sum("xlb_received_packets_total", &[]), 15.0);
        assert_eq!(m.sum("xlb_received_packets_total", &[("worker", "1")]), 5.0);
        assert_eq!(
            m.sum("xlb_received_packets", &[]),
            0.0,
            "a prefix is not a name"
        );
        assert_eq!(
            m.by_label("xlb_dropped_packets_total", "reason"),
            BTreeMap::from([("BadChecksum".into(), 0.0), ("NoService".into(), 7.0)])
        );
    }

    fn status(rates: Option<&str>) -> Status {
        Status {
            metrics: Metrics::parse(METRICS),
            rates: rates.map(Metrics::parse),
            services: vec![serde_json::json!({
                "name": "shop/web:http", "kind": "load-balancer", "vip": "2001:2::10", "port": 80,
                "protocol": "tcp", "scheduler": "maglev", "affinity_timeout_seconds": 10800,
                "traffic_policy": "Local", "source_ranges": ["198.18.0.0/24", "2001:2::/64"],
                "no_endpoints": "drop",
                "backends": [
                    {"address": "2001:2::1:1", "port": 8080, "state": "terminating",
                     "weight": 1, "local": true, "live_flows": 3},
                    {"address": "198.18.1.2", "port": 8080, "state": "ready",
                     "weight": 2, "local": false, "live_flows": 0},
                ],
            })],
            more_from: None,
        }
    }

    #[test]
    fn drops_are_listed_by_reason_summed_over_workers_without_the_zero_ones() {
        let s = status(Some(
            "xlb_dropped_packets_total{worker=\"0\",reason=\"NoService\"} 1.5\n",
        ));
        assert_eq!(
            s.drops(),
            vec![
                ("NoService".into(), 7.0, Some(1.5)),
                ("TxRingFull".into(), 2.0, Some(0.0)),
                ("socket rx_ring_full".into(), 1.0, Some(0.0)),
            ]
        );
    }

    #[test]
    fn the_report_prints_aligned_tables_of_traffic_drops_services_and_backends() {
        let text = status(None).text();
        assert!(
            text.starts_with(
                "snapshot generation 0, flow table: IPv4 250 of 1000 (25.0% full), IPv6 10 of 200 \
                 (5.0% full);"
            ),
            "{text}"
        );
        assert!(
            text.contains("PACKETS                        TOTAL  PER SECOND\nreceived                       15     -\n"),
            "{text}"
        );
        assert!(text.contains("\nNoService            7      -\n"), "{text}");
        assert!(
            text.contains(
                "shop/web:http  [2001:2::10]:80/tcp  load-balancer  maglev     10800s    Local   \
                 198.18.0.0/24,2001:2::/64  drop          1 ready of 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "shop/web:http  [2001:2::1:1]:8080  terminating  local   1       3\n\
                 shop/web:http  198.18.1.2:8080     ready        remote  2       0\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_json_report_has_the_services_every_series_and_the_drops() {
        let j = status(None).json();
        assert_eq!(j["services"][0]["name"], "shop/web:http");
        assert_eq!(j["metrics"]["xlb_flow_entries{family=\"ipv4\"}"], 250.0);
        assert_eq!(j["drops"][0]["reason"], "NoService");
        assert!(j["rates_per_second"].is_null());
    }
}
