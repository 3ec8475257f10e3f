//! The Prometheus text of `/metrics`: per-worker counters by verdict, drop reason and event,
//! the sockets' kernel counters, the flow table's gauges, sync latency, the Kubernetes
//! source's health and the XDP filter's counts.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use xlb_dataplane::lb::decide::{DecideDrop, Event};
use xlb_dataplane::packet::DropReason;
use xlb_dataplane::worker::{SocketStats, WorkerCounters};

use super::AdminState;

/// A per-worker counter series: name, help, and how to read it.
type Series = (&'static str, &'static str, fn(&WorkerCounters) -> u64);

/// The whole `/metrics` page. Reads only published counters and gauges: nothing here scans
/// the flow table or the snapshot.
pub(super) fn metrics(state: &AdminState) -> String {
    let mut out = String::new();
    let workers: Vec<WorkerCounters> = state.workers.iter().map(|w| w.load()).collect();
    let series: [Series; 15] = [
        ("xlb_received_packets_total", "Frames received", |c| {
            c.io.received
        }),
        (
            "xlb_transmitted_packets_total",
            "Frames queued for transmission",
            |c| c.io.transmitted,
        ),
        (
            "xlb_forwarded_packets_total",
            "Packets forwarded to a backend",
            |c| c.decide.forwarded,
        ),
        (
            "xlb_replied_packets_total",
            "Backend replies un-NATed",
            |c| c.decide.replied,
        ),
        (
            "xlb_rejected_packets_total",
            "Packets refused with a TCP reset or an ICMP unreachable (new flows without a backend, segments of flows whose backend left)",
            |c| c.decide.rejected,
        ),
        (
            "xlb_reset_replies_total",
            "Replies of flows whose backend left, turned into resets towards the client",
            |c| c.decide.reset,
        ),
        (
            "xlb_passed_packets_total",
            "Packets not for xlb (dropped, or handed back to the kernel through a node's link)",
            |c| c.decide.passed,
        ),
        (
            "xlb_fragments_expired_drops_total",
            "Fragments dropped because their datagram's first fragment did not come within a second",
            |c| c.io.fragments_expired,
        ),
        (
            "xlb_too_big_packets_total",
            "Packets too big for the path once encapsulated (answered with ICMP too big, or dropped when IPv4 may fragment)",
            |c| c.io.too_big,
        ),
        (
            "xlb_handed_back_packets_total",
            "Packets not for xlb handed back to the kernel through the node's link",
            |c| c.io.handed_back,
        ),
        (
            "xlb_tx_ring_full_drops_total",
            "Drops on a full transmit ring",
            |c| c.io.tx_ring_full,
        ),
        (
            "xlb_no_next_hop_drops_total",
            "Drops for a next hop not resolved in time (or a full hold queue)",
            |c| c.io.no_next_hop,
        ),
        (
            "xlb_held_packets_total",
            "Packets held until their next hop was resolved, then sent",
            |c| c.io.held,
        ),
        (
            "xlb_rewrite_failed_drops_total",
            "Drops where a verdict could not be applied",
            |c| c.io.rewrite_failed,
        ),
        (
            "xlb_busy_polls_total",
            "Worker loops that found work",
            |c| c.io.busy_polls,
        ),
    ];
    for (name, help, get) in series {
        header(&mut out, name, "counter", help);
        for (i, c) in workers.iter().enumerate() {
            let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", get(c));
        }
    }
    header(
        &mut out,
        "xlb_dropped_packets_total",
        "counter",
        "Drops by reason",
    );
    for (i, c) in workers.iter().enumerate() {
        let decide = DecideDrop::ALL
            .iter()
            .map(|r| format!("{r:?}"))
            .zip(c.decide.dropped);
        let parse = DropReason::ALL
            .iter()
            .map(|r| format!("{r:?}"))
            .zip(c.decide.malformed);
        for (reason, count) in decide.chain(parse) {
            let _ = writeln!(
                out,
                "xlb_dropped_packets_total{{worker=\"{i}\",reason=\"{reason}\"}} {count}"
            );
        }
    }
    header(
        &mut out,
        "xlb_flow_events_total",
        "counter",
        "What the load balancer did besides its verdicts, by event: Untracked (a new flow forwarded without an entry, the table full), Recreated and RecreatedUnpicked (a flow recreated from a backend's packet), PortReused, Repicked, BackendLeftReset",
    );
    for (i, c) in workers.iter().enumerate() {
        for (event, count) in Event::ALL.iter().zip(c.decide.events) {
            let _ = writeln!(
                out,
                "xlb_flow_events_total{{worker=\"{i}\",event=\"{event:?}\"}} {count}"
            );
        }
    }
    socket_metrics(&mut out, state);
    let flows = &state.flows;
    // Relaxed: gauges read on their own.
    let live = state.live_entries.load(Ordering::Relaxed);
    let generation = state.generation.load(Ordering::Relaxed);
    let singles: [(&str, &str, &str, u64); 7] = [
        (
            "xlb_flow_entries",
            "gauge",
            "Live flow table entries (two per connection), counted every few seconds",
            live,
        ),
        (
            "xlb_flow_evictions_total",
            "counter",
            "Live flows that were not established (half-open, one-exchange, closing), evicted for new ones",
            flows.evictions(),
        ),
        (
            "xlb_flow_table_full_total",
            "counter",
            "New flows not recorded: both buckets held live established flows",
            flows.full_inserts(),
        ),
        (
            "xlb_flow_capacity",
            "gauge",
            "Flow table entries in all",
            flows.capacity() as u64,
        ),
        (
            "xlb_snapshot_generation",
            "gauge",
            "The live snapshot's generation",
            generation,
        ),
        (
            "xlb_config_hash",
            "gauge",
            "The live configuration file's content hash (xxh3-64 of its bytes, 48 bits; xlb check prints it)",
            state.config_hash.load(Ordering::Relaxed),
        ),
        (
            "xlb_config_generation",
            "gauge",
            "The live configuration file's generation: field (0 without one)",
            state.config_generation.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in singles {
        header(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    state.sync_seconds.write(
        &mut out,
        "xlb_sync_duration_seconds",
        "Time from a source change being seen (a file edit noticed, a Kubernetes event received) to its snapshot being live.",
    );
    if let Some(kube) = &state.kube {
        kube_metrics(&mut out, kube);
    }
    let counts = **state.filter_counts.load();
    header(
        &mut out,
        "xlb_filter_packets_total",
        "counter",
        "Packets seen by the XDP filter: redirected to xlb, passed to the kernel, or xlb's but passed for want of a socket on their queue (unbound)",
    );
    for (action, n) in [
        ("redirect", counts.redirected),
        ("pass", counts.passed),
        ("unbound", counts.unbound),
    ] {
        let _ = writeln!(out, "xlb_filter_packets_total{{action=\"{action}\"}} {n}");
    }
    out
}

/// The kernel's counters of every AF_XDP socket, per worker and port (issue 11, fault 2:
/// receive-ring drops showed only in the log line at stop).
fn socket_metrics(out: &mut String, state: &AdminState) {
    let sockets: Vec<_> = state.workers.iter().map(|w| w.sockets()).collect();
    for (i, (name, _)) in SocketStats::default().named().iter().enumerate() {
        let metric = format!("xlb_socket_{name}_total");
        header(
            out,
            &metric,
            "counter",
            SOCKET_HELP
                .get(i)
                .copied()
                .unwrap_or("AF_XDP socket counter"),
        );
        for (worker, ports) in sockets.iter().enumerate() {
            for (port, stats) in ports.iter().enumerate() {
                let value = stats.named()[i].1;
                let port = state.ports.get(port).map_or("?", String::as_str);
                let _ = writeln!(
                    out,
                    "{metric}{{worker=\"{worker}\",port=\"{port}\"}} {value}"
                );
            }
        }
    }
}

/// HELP texts of the socket counters, in [`SocketStats::named`] order.
const SOCKET_HELP: [&str; 6] = [
    "Frames the kernel dropped on an AF_XDP socket for other reasons than a full ring (XDP_STATISTICS rx_dropped)",
    "Invalid descriptors on an AF_XDP receive ring",
    "Frames dropped because an AF_XDP receive ring was full: the worker did not keep up",
    "Times an AF_XDP fill ring was empty when the kernel needed a frame",
    "Invalid descriptors on an AF_XDP transmit ring",
    "Times the kernel found an AF_XDP transmit ring empty",
];

fn kube_metrics(out: &mut String, kube: &crate::kube_source::KubeMetrics) {
    // Relaxed: counters and gauges read on their own.
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    header(
        out,
        "xlb_kubernetes_objects",
        "gauge",
        "Kubernetes objects watched, by kind",
    );
    for (kind, n) in [
        ("service", &kube.services),
        ("endpointslice", &kube.slices),
        ("node", &kube.nodes),
    ] {
        let _ = writeln!(out, "xlb_kubernetes_objects{{kind=\"{kind}\"}} {}", load(n));
    }
    header(
        out,
        "xlb_kubernetes_translation_errors_total",
        "counter",
        "Objects or values skipped or defaulted in translation, by kind, each counted when it appears",
    );
    for (kind, n) in crate::kube_source::ERROR_KINDS.iter().zip(&kube.errors) {
        let _ = writeln!(
            out,
            "xlb_kubernetes_translation_errors_total{{kind=\"{kind}\"}} {}",
            load(n)
        );
    }
    header(
        out,
        "xlb_kubernetes_refused_objects",
        "gauge",
        "Objects currently skipped or partly skipped in translation, by kind",
    );
    for (kind, n) in crate::kube_source::ERROR_KINDS.iter().zip(&kube.refusing) {
        let _ = writeln!(
            out,
            "xlb_kubernetes_refused_objects{{kind=\"{kind}\"}} {}",
            load(n)
        );
    }
    header(
        out,
        "xlb_kubernetes_watch_errors_total",
        "counter",
        "Failed lists and watches (each retried with backoff)",
    );
    let _ = writeln!(
        out,
        "xlb_kubernetes_watch_errors_total {}",
        load(&kube.watch_errors)
    );
    header(
        out,
        "xlb_kubernetes_relists_total",
        "counter",
        "Lists started again because the API server said a resourceVersion or continue token was unusable",
    );
    let _ = writeln!(out, "xlb_kubernetes_relists_total {}", load(&kube.relists));
    header(
        out,
        "xlb_kubernetes_synced",
        "gauge",
        "1 while Services and EndpointSlices are listed and no watch has been failing for longer than the grace period",
    );
    let _ = writeln!(
        out,
        "xlb_kubernetes_synced {}",
        u8::from(kube.synced.load(Ordering::Relaxed))
    );
}

/// The HELP and TYPE lines of a metric.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
}
