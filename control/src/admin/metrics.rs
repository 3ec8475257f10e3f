//! `/metrics`: one prometheus-client registry, encoded in the OpenMetrics text format. Every
//! metric is declared once, here: its name (Prometheus conventions: the unit in the name,
//! `_total` added to counters by the encoder), its help and how to read it. The registry
//! holds one collector that reads, at each scrape, the sync-latency histogram the control
//! thread observes into and what the workers, the XDP filter and the sources published: per-worker
//! counters by verdict, drop reason and event, the sockets' kernel counters, the flow table's
//! gauges and the Kubernetes source's health.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use xlb_dataplane::lb::decide::{DecideDrop, Event};
use xlb_dataplane::packet::{DropReason, Family};
use xlb_dataplane::worker::{SocketStats, WorkerCounters};

use super::AdminState;

/// Upper bounds of the sync-latency buckets, in seconds (kube-proxy's network programming
/// buckets, trimmed).
pub const SYNC_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The histogram of the time from a source change being seen to its snapshot being live.
/// The control thread observes into it without a lock (the library's own histogram takes a
/// mutex that a scrape takes too); a scrape reads it bucket by bucket.
#[derive(Debug, Default)]
pub struct SyncHistogram {
    /// Observations per bucket of [`SYNC_BUCKETS`], then above the last (not cumulative).
    buckets: [AtomicU64; SYNC_BUCKETS.len() + 1],
    /// Their sum, in nanoseconds.
    sum_ns: AtomicU64,
}

impl SyncHistogram {
    /// Records one duration in seconds.
    pub fn observe(&self, seconds: f64) {
        let bucket = SYNC_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(SYNC_BUCKETS.len());
        // Relaxed: counters read on their own.
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    fn encode(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Relaxed: counters read on their own.
        let counts = self.buckets.each_ref().map(|b| b.load(Ordering::Relaxed));
        // The encoder accumulates, and writes f64::INFINITY as +Inf.
        let buckets: Vec<(f64, u64)> = SYNC_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        e.encode_descriptor(
            "xlb_sync_duration_seconds",
            "Time from a source change being seen (a file edit noticed, a Kubernetes event received) to its snapshot being live",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }
}

/// The registry `/metrics` encodes: everything `state` publishes, read at each scrape.
pub(super) fn registry(state: &Arc<AdminState>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Published(Arc::clone(state))));
    registry
}

/// A per-worker counter: name (without `_total`), help, and how to read it.
type Series = (&'static str, &'static str, fn(&WorkerCounters) -> u64);

/// The per-worker counters, each with a `worker` label.
const WORKER_SERIES: [Series; 15] = [
    ("xlb_received_packets", "Frames received", |c| c.io.received),
    ("xlb_transmitted_packets", "Frames queued for transmission", |c| c.io.transmitted),
    ("xlb_forwarded_packets", "Packets forwarded to a backend", |c| c.decide.forwarded),
    ("xlb_replied_packets", "Backend replies un-NATed", |c| c.decide.replied),
    ("xlb_rejected_packets", "Packets refused with a TCP reset or an ICMP unreachable (new flows without a backend, segments of flows whose backend left)", |c| c.decide.rejected),
    ("xlb_reset_replies", "Replies of flows whose backend left, turned into resets towards the client", |c| c.decide.reset),
    ("xlb_passed_packets", "Packets not for xlb (dropped, or handed back to the kernel through a node's link)", |c| c.decide.passed),
    ("xlb_fragments_expired_drops", "Fragments dropped because their datagram's first fragment did not come within a second", |c| c.io.fragments_expired),
    ("xlb_too_big_packets", "Packets too big for the path once encapsulated (answered with ICMP too big, or dropped when IPv4 may fragment)", |c| c.io.too_big),
    ("xlb_handed_back_packets", "Packets not for xlb handed back to the kernel through the node's link", |c| c.io.handed_back),
    ("xlb_tx_ring_full_drops", "Drops on a full transmit ring", |c| c.io.tx_ring_full),
    ("xlb_no_next_hop_drops", "Drops for a next hop not resolved in time (or a full hold queue)", |c| c.io.no_next_hop),
    ("xlb_held_packets", "Packets held until their next hop was resolved, then sent", |c| c.io.held),
    ("xlb_rewrite_failed_drops", "Drops where a verdict could not be applied", |c| c.io.rewrite_failed),
    ("xlb_busy_polls", "Worker loops that found work", |c| c.io.busy_polls),
];

/// HELP texts of the socket counters, in [`SocketStats::named`] order.
const SOCKET_HELP: [&str; 6] = [
    "Frames the kernel dropped on an AF_XDP socket for other reasons than a full ring (XDP_STATISTICS rx_dropped)",
    "Invalid descriptors on an AF_XDP receive ring",
    "Frames dropped because an AF_XDP receive ring was full: the worker did not keep up",
    "Times an AF_XDP fill ring was empty when the kernel needed a frame",
    "Invalid descriptors on an AF_XDP transmit ring",
    "Times the kernel found an AF_XDP transmit ring empty",
];

/// What workers, filter and sources published, read at each scrape. Nothing here scans the
/// flow table or the snapshot.
#[derive(Debug)]
struct Published(Arc<AdminState>);

impl Collector for Published {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &*self.0;
        let e = &mut encoder;
        state.sync_seconds.encode(e)?;
        let workers: Vec<WorkerCounters> = state.workers.iter().map(|w| w.load()).collect();
        let worker = |i: usize| [("worker", i.to_string())];
        for (name, help, get) in WORKER_SERIES {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                workers.iter().enumerate().map(|(i, c)| (worker(i), get(c))),
            )?;
        }
        let drops = workers.iter().enumerate().flat_map(|(i, c)| {
            let decide = DecideDrop::ALL
                .iter()
                .map(|r| format!("{r:?}"))
                .zip(c.decide.dropped);
            let parse = DropReason::ALL
                .iter()
                .map(|r| format!("{r:?}"))
                .zip(c.decide.malformed);
            decide
                .chain(parse)
                .map(move |(reason, n)| ([("worker", i.to_string()), ("reason", reason)], n))
        });
        family(
            e,
            "xlb_dropped_packets",
            "Drops by reason",
            MetricType::Counter,
            drops,
        )?;
        let events = workers.iter().enumerate().flat_map(|(i, c)| {
            Event::ALL
                .iter()
                .zip(c.decide.events)
                .map(move |(event, n)| {
                    (
                        [("worker", i.to_string()), ("event", format!("{event:?}"))],
                        n,
                    )
                })
        });
        family(
            e,
            "xlb_flow_events",
            "What the load balancer did besides its verdicts, by event: Untracked (a new flow forwarded without an entry, the table full), Recreated and RecreatedUnpicked (a flow recreated from a backend's packet), PortReused, Repicked, BackendLeftReset, SnatPortReclaimed (an snat port taken back from a quiet flow that never had a reply)",
            MetricType::Counter,
            events,
        )?;
        sockets(e, state)?;
        let flows = &state.flows;
        // Relaxed: gauges and counters read on their own.
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let [live4, live6] = state.live_entries.each_ref().map(load);
        let capacity = |f| flows.capacity_of(f) as u64;
        let by_family = [
            (
                "xlb_flow_entries",
                "Live flow table entries (two per connection) by address family, counted every few seconds",
                [live4, live6],
            ),
            (
                "xlb_flow_capacity",
                "Flow table entries by address family (each family's table fills on its own)",
                [capacity(Family::Ipv4), capacity(Family::Ipv6)],
            ),
        ];
        for (name, help, [ipv4, ipv6]) in by_family {
            let series = [("ipv4", ipv4), ("ipv6", ipv6)].map(|(f, n)| ([("family", f)], n));
            family(e, name, help, MetricType::Gauge, series)?;
        }
        let singles: [(&str, MetricType, &str, u64); 5] = [
            ("xlb_flow_evictions", MetricType::Counter, "Live flows that were not established (half-open, one-exchange, closing), evicted for new ones", flows.evictions()),
            ("xlb_flow_table_full", MetricType::Counter, "New flows not recorded: both buckets held live established flows", flows.full_inserts()),
            ("xlb_snapshot_generation", MetricType::Gauge, "The live snapshot's generation", load(&state.generation)),
            ("xlb_config_hash", MetricType::Gauge, "The live configuration file's content hash (xxh3-64 of its bytes, 48 bits; xlb check prints it)", load(&state.config_hash)),
            ("xlb_config_generation", MetricType::Gauge, "The live configuration file's generation: field (0 without one)", load(&state.config_generation)),
        ];
        for (name, kind, help, value) in singles {
            single(e, name, help, kind, value)?;
        }
        if let Some(kube) = &state.kube {
            kube_metrics(e, kube)?;
        }
        let counts = **state.filter_counts.load();
        family(
            e,
            "xlb_filter_packets",
            "Packets seen by the XDP filter: redirected to xlb, passed to the kernel, or xlb's but passed for want of a socket on their queue (unbound)",
            MetricType::Counter,
            [("redirect", counts.redirected), ("pass", counts.passed), ("unbound", counts.unbound)]
                .map(|(action, n)| ([("action", action)], n)),
        )
    }
}

/// One metric of several series, each with its labels.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in series {
        value(kind, v, metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One metric of one series, without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    v: u64,
) -> Result<(), std::fmt::Error> {
    value(kind, v, encoder.encode_descriptor(name, help, None, kind)?)
}

/// One sample: a counter's or a gauge's.
fn value(kind: MetricType, v: u64, metric: MetricEncoder) -> Result<(), std::fmt::Error> {
    if matches!(kind, MetricType::Counter) {
        ConstCounter::new(v).encode(metric)
    } else {
        ConstGauge::new(v).encode(metric)
    }
}

fn sockets(e: &mut DescriptorEncoder, state: &AdminState) -> Result<(), std::fmt::Error> {
    let sockets: Vec<_> = state.workers.iter().map(|w| w.sockets()).collect();
    for (i, (name, _)) in SocketStats::default().named().iter().enumerate() {
        let series = sockets.iter().enumerate().flat_map(|(worker, ports)| {
            ports.iter().enumerate().map(move |(port, stats)| {
                let port = state.ports.get(port).map_or("?", String::as_str);
                (
                    [("worker", worker.to_string()), ("port", port.to_owned())],
                    stats.named()[i].1,
                )
            })
        });
        family(
            e,
            &format!("xlb_socket_{name}"),
            SOCKET_HELP
                .get(i)
                .copied()
                .unwrap_or("AF_XDP socket counter"),
            MetricType::Counter,
            series,
        )?;
    }
    Ok(())
}

fn kube_metrics(
    e: &mut DescriptorEncoder,
    kube: &crate::kube_source::KubeMetrics,
) -> Result<(), std::fmt::Error> {
    use crate::kube_source::ERROR_KINDS;
    // Relaxed: counters and gauges read on their own.
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    family(
        e,
        "xlb_kubernetes_objects",
        "Kubernetes objects watched, by kind",
        MetricType::Gauge,
        [
            ("service", &kube.services),
            ("endpointslice", &kube.slices),
            ("node", &kube.nodes),
        ]
        .map(|(kind, n)| ([("kind", kind)], load(n))),
    )?;
    family(
        e,
        "xlb_kubernetes_translation_errors",
        "Objects or values skipped or defaulted in translation, by kind, each counted when it appears",
        MetricType::Counter,
        ERROR_KINDS.iter().zip(&kube.errors).map(|(kind, n)| ([("kind", *kind)], load(n))),
    )?;
    family(
        e,
        "xlb_kubernetes_refused_objects",
        "Objects currently skipped or partly skipped in translation, by kind",
        MetricType::Gauge,
        ERROR_KINDS
            .iter()
            .zip(&kube.refusing)
            .map(|(kind, n)| ([("kind", *kind)], load(n))),
    )?;
    single(
        e,
        "xlb_kubernetes_watch_errors",
        "Failed lists and watches (each retried with backoff)",
        MetricType::Counter,
        load(&kube.watch_errors),
    )?;
    single(e, "xlb_kubernetes_relists", "Lists started again because the API server said a resourceVersion or continue token was unusable", MetricType::Counter, load(&kube.relists))?;
    single(
        e,
        "xlb_kubernetes_synced",
        "1 while Services and EndpointSlices are listed and no watch has been failing for longer than the grace period",
        MetricType::Gauge,
        u64::from(kube.synced.load(Ordering::Relaxed)),
    )
}
