//! The admin HTTP API, served on the control thread's runtime (127.0.0.1:9901 by default):
//! `/metrics` (Prometheus text), `/healthz`, `/services` and `/flows?limit=N` (JSON).
//!
//! A deliberately small GET-only HTTP/1.1 responder (one request per connection): the API is
//! four read-only documents for local tools and scrapers, and this keeps an HTTP framework
//! out of the binary until the Kubernetes issue brings hyper in anyway.
//!
//! Must not know: packet bytes; it reads what workers published.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xlb_dataplane::lb::decide::DecideDrop;
use xlb_dataplane::lb::flow::{FlowTable, FlowValue};
use xlb_dataplane::packet::DropReason;
use xlb_dataplane::worker::{Clock, SocketStats, Tables, WorkerCounters, WorkerStats};

/// What the admin API reads.
#[derive(Debug)]
pub struct AdminState {
    /// The published tables.
    pub tables: Arc<ArcSwap<Tables>>,
    /// The flow table.
    pub flows: Arc<FlowTable>,
    /// The workers' time base.
    pub clock: Clock,
    /// Each worker's published counters.
    pub workers: Vec<Arc<WorkerStats>>,
    /// The ports' interface names, in port order.
    pub ports: Vec<String>,
    /// The live snapshot's generation.
    pub generation: AtomicU64,
    /// Time from a source change being seen to its snapshot being live.
    pub sync_seconds: crate::histogram::Histogram,
    /// The XDP filter's (redirected, passed) counts.
    pub filter_counts: ArcSwap<(u64, u64)>,
    /// The Kubernetes source's counters, when it is configured.
    pub kube: Option<Arc<crate::kube_source::KubeMetrics>>,
}

/// Serves the API on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            // Read the request head (up to 8 KiB, 5 s): closing with unread bytes would reset
            // the connection before the client reads the answer.
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let head = async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(std::time::Duration::from_secs(5), head).await,
                Ok(true)
            ) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, kind, body) = respond(&request, &state);
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// The status line, content type and body for a raw request.
#[must_use]
pub fn respond(request: &str, state: &AdminState) -> (&'static str, &'static str, String) {
    let mut words = request.split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return ("400 Bad Request", "text/plain", "bad request\n".into());
    };
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics(state)),
        "/services" => ("200 OK", "application/json", services(state)),
        "/flows" => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            ("200 OK", "application/json", flows(state, limit))
        }
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

/// A per-worker counter series: name, help, and how to read it.
type Series = (&'static str, &'static str, fn(&WorkerCounters) -> u64);

fn metrics(state: &AdminState) -> String {
    let mut out = String::new();
    let workers: Vec<WorkerCounters> = state.workers.iter().map(|w| w.load()).collect();
    let series: [Series; 10] = [
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
            "New flows refused (RST or ICMP)",
            |c| c.decide.rejected,
        ),
        (
            "xlb_passed_packets_total",
            "Packets not for xlb (dropped: AF_XDP cannot pass)",
            |c| c.decide.passed,
        ),
        (
            "xlb_tx_ring_full_drops_total",
            "Drops on a full transmit ring",
            |c| c.io.tx_ring_full,
        ),
        (
            "xlb_no_next_hop_drops_total",
            "Drops for an unresolved next hop",
            |c| c.io.no_next_hop,
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
    socket_metrics(&mut out, state);
    let flows = &state.flows;
    let live = flows.iter(state.clock.now()).count() as u64;
    // Relaxed: a gauge read on its own.
    let generation = state.generation.load(Ordering::Relaxed);
    let singles: [(&str, &str, &str, u64); 5] = [
        (
            "xlb_flow_entries",
            "gauge",
            "Live flow table entries (two per connection)",
            live,
        ),
        (
            "xlb_flow_evictions_total",
            "counter",
            "Live new or closing flows evicted for new ones",
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
    let (redirected, passed) = **state.filter_counts.load();
    header(
        &mut out,
        "xlb_filter_packets_total",
        "counter",
        "Packets seen by the XDP filter",
    );
    let _ = writeln!(
        out,
        "xlb_filter_packets_total{{action=\"redirect\"}} {redirected}"
    );
    let _ = writeln!(out, "xlb_filter_packets_total{{action=\"pass\"}} {passed}");
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
        "Objects or values skipped or defaulted in translation, by kind",
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
        "xlb_kubernetes_synced",
        "gauge",
        "1 once Services and EndpointSlices have been listed",
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

fn services(state: &AdminState) -> String {
    let tables = state.tables.load();
    let list: Vec<_> = tables
        .snapshot
        .services()
        .map(|s| {
            let spec = s.spec();
            let backends: Vec<_> = spec
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "address": b.endpoint.ip().to_string(),
                        "port": b.endpoint.port(),
                        "state": format!("{:?}", b.state),
                        "weight": b.weight,
                        "live_flows": s.live_flows(b.id),
                    })
                })
                .collect();
            json!({
                "vip": spec.key.vip.ip().to_string(),
                "port": spec.key.vip.port(),
                "protocol": proto_name(spec.key.proto.0),
                "scheduler": format!("{:?}", spec.scheduler),
                "backends": backends,
            })
        })
        .collect();
    json!({ "generation": tables.snapshot.generation(), "services": list }).to_string()
}

fn flows(state: &AdminState, limit: usize) -> String {
    let now = state.clock.now();
    let list: Vec<_> = state
        .flows
        .iter(now)
        .take(limit)
        .map(|(key, hit)| {
            json!({
                "protocol": proto_name(key.proto.0),
                "source": format!("{}", std::net::SocketAddr::new(key.src_ip(), key.src_port)),
                "destination": format!("{}", std::net::SocketAddr::new(key.dst_ip(), key.dst_port)),
                "direction": match hit.value {
                    FlowValue::Forward { .. } => "forward",
                    FlowValue::Reverse { .. } => "reply",
                },
                "state": format!("{:?}", hit.state),
                "idle_seconds": now.saturating_sub(hit.last_seen),
            })
        })
        .collect();
    json!({ "flows": list }).to_string()
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_dataplane::lb::flow::{FlowState, Timeouts};
    use xlb_dataplane::lb::hash::flow_hash;
    use xlb_dataplane::packet::{Family, FlowKey, IpProto};

    fn state() -> AdminState {
        let flows = FlowTable::new(1024, Timeouts::default());
        for port in 0..3u16 {
            let key = FlowKey::new(
                Family::Ipv4,
                IpProto::UDP,
                (
                    [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    1000 + port,
                ),
                ([198, 18, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 53),
            );
            let value = FlowValue::Forward {
                service: 1,
                backend: 1,
                snat_port: 0,
            };
            let _ = flows.insert(&key, flow_hash(&key), value, FlowState::New, 0);
        }
        AdminState {
            tables: Arc::new(ArcSwap::from_pointee(Tables::empty())),
            flows: Arc::new(flows),
            clock: Clock::start(),
            workers: vec![Arc::new(WorkerStats::new(1))],
            ports: vec!["n0".into()],
            generation: AtomicU64::new(7),
            sync_seconds: crate::histogram::Histogram::default(),
            filter_counts: ArcSwap::from_pointee((3, 4)),
            kube: Some(Arc::default()),
        }
    }

    #[test]
    fn health_metrics_and_unknown_paths_get_their_statuses() {
        let s = state();
        assert_eq!(respond("GET /healthz HTTP/1.1\r\n\r\n", &s).0, "200 OK");
        assert_eq!(respond("GET /nope HTTP/1.1\r\n\r\n", &s).0, "404 Not Found");
        assert_eq!(
            respond("POST /healthz HTTP/1.1\r\n\r\n", &s).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", &s).0, "400 Bad Request");
        let (_, kind, body) = respond("GET /metrics HTTP/1.1\r\n\r\n", &s);
        assert!(kind.starts_with("text/plain"));
        for line in [
            "xlb_received_packets_total{worker=\"0\"} 0",
            "xlb_snapshot_generation 7",
            "xlb_filter_packets_total{action=\"pass\"} 4",
            "xlb_flow_entries 3",
            "xlb_kubernetes_objects{kind=\"endpointslice\"} 0",
            "xlb_kubernetes_translation_errors_total{kind=\"malformed\"} 0",
            "xlb_kubernetes_synced 0",
            "xlb_socket_rx_ring_full_total{worker=\"0\",port=\"n0\"} 0",
            "xlb_socket_rx_fill_ring_empty_descs_total{worker=\"0\",port=\"n0\"} 0",
        ] {
            assert_eq!(
                body.matches(&format!("\n{line}")).count() + usize::from(body.starts_with(line)),
                1,
                "{line} once"
            );
            assert!(body.contains(line), "{line} missing from\n{body}");
        }
    }

    #[test]
    fn flows_honours_its_limit_and_is_json() {
        let s = state();
        let (_, _, body) = respond("GET /flows?limit=2 HTTP/1.1\r\n\r\n", &s);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["flows"].as_array().unwrap().len(), 2);
        assert_eq!(v["flows"][0]["protocol"], "udp");
        let (_, _, body) = respond("GET /services HTTP/1.1\r\n\r\n", &s);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["services"].as_array().unwrap().len(), 0);
    }
}
