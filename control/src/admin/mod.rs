//! The admin HTTP API (127.0.0.1:9901 by default): `/metrics` (OpenMetrics text), `/healthz`,
//! and `/services` and `/flows` (JSON, in pages).
//!
//! Served by axum on a thread of its own with its own tokio runtime, never on the control
//! thread that publishes snapshots: no admin request can delay a Kubernetes change or a
//! reload. Reading the flow table or serialising Services is blocking work: it runs on the
//! runtime's blocking threads, at most [`HEAVY_AT_ONCE`] requests at a time (a later one waits
//! up to [`HEAVY_WAIT`], then gets 503), and its answers are bounded — at most
//! [`FLOWS_PAGE_MAX`] flows or [`SERVICES_PAGE_MAX`] Services a page, with the cursor of the
//! next page — and streamed as they are produced, so memory does not grow with the table.
//! `/healthz` and `/metrics` read only published counters and never wait for any of it.
//!
//! Pages: `GET /flows?limit=N&from=I` lists live entries from table index `I` on; its answer
//! ends with `"next"`, the `from` of the next page (null after the last). `GET
//! /services?limit=N&from=I` lists Services `I..I+N` of the snapshot named by its
//! `"generation"`; `"next"` likewise.
//!
//! Must not know: packet bytes; it reads what workers and the control thread published.

mod metrics;
pub use metrics::{SyncHistogram, SYNC_BUCKETS};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::net::IpAddr;
use tokio::sync::{mpsc, Semaphore};

use xlb_dataplane::lb::flow::{FlowTable, FlowValue};
use xlb_dataplane::lb::snapshot::{BackendState, NoBackend, Scheduler, Service};
use xlb_dataplane::worker::{Clock, Tables, WorkerStats};
use xlb_dataplane::xsk::FilterCounts;

use crate::desired::{DesiredService, TrafficPolicy, VipKind};
use crate::server_thread::ServerThread;

/// Blocking requests (`/flows`, `/services`) served at once.
pub const HEAVY_AT_ONCE: usize = 2;
/// How long a blocking request waits for its turn before it is answered 503.
pub const HEAVY_WAIT: Duration = Duration::from_secs(5);
/// The most flows one `/flows` page holds.
pub const FLOWS_PAGE_MAX: usize = 10_000;
/// The most Services one `/services` page holds.
pub const SERVICES_PAGE_MAX: usize = 1_000;
/// The page size when none is asked for.
const PAGE_DEFAULT: usize = 100;
/// Bytes gathered before a chunk of a streamed answer is sent.
const CHUNK: usize = 64 * 1024;

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
    /// Live flow table entries, IPv4 then IPv6, counted every few seconds off the control
    /// thread.
    pub live_entries: [AtomicU64; 2],
    /// Time from a source change being seen to its snapshot being live.
    pub sync_seconds: SyncHistogram,
    /// The XDP filter's counts.
    pub filter_counts: ArcSwap<FilterCounts>,
    /// The Kubernetes source's counters, when it is configured.
    pub kube: Option<Arc<crate::kube_source::KubeMetrics>>,
    /// The live configuration file's content hash (`file_source::content_hash`).
    pub config_hash: AtomicU64,
    /// The live configuration file's `generation:` (0 without one).
    pub config_generation: AtomicU64,
}

/// The running admin server. Dropping it stops the server and joins its thread.
pub type AdminServer = ServerThread;

/// Serves the API on `listener` (already bound, so a taken port fails the caller's start) on
/// a new thread named `xlb-admin` with its own runtime.
///
/// # Errors
/// When the thread or its runtime cannot be started.
pub fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
) -> std::io::Result<AdminServer> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(HEAVY_AT_ONCE + 1)
        .thread_name("xlb-admin")
        .enable_all()
        .build()?;
    ServerThread::spawn("xlb-admin", runtime, move || async move {
        if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
            let _ = axum::serve(listener, router(state)).await;
        }
    })
}

/// The routes, over `state`.
pub fn router(state: Arc<AdminState>) -> Router {
    routes(Shared {
        registry: Arc::new(metrics::registry(&state)),
        state,
        heavy: Arc::new(Semaphore::new(HEAVY_AT_ONCE)),
    })
}

fn routes(shared: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_page))
        .route("/services", get(services_page))
        .route("/flows", get(flows_page))
        .with_state(shared)
}

#[derive(Clone)]
struct Shared {
    state: Arc<AdminState>,
    registry: Arc<prometheus_client::registry::Registry>,
    heavy: Arc<Semaphore>,
}

/// `limit` and `from` of a page request.
#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<usize>,
    from: Option<usize>,
}

impl Page {
    fn limit(&self, max: usize) -> usize {
        self.limit.unwrap_or(PAGE_DEFAULT).min(max)
    }
}

async fn metrics_page(State(shared): State<Shared>) -> Response {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, &shared.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn flows_page(State(shared): State<Shared>, Query(page): Query<Page>) -> Response {
    let limit = page.limit(FLOWS_PAGE_MAX);
    let from = page.from.unwrap_or(0);
    stream_blocking(&shared, move |state, out| {
        let now = state.clock.now();
        out.write(b"{\"flows\":[");
        let mut next = None;
        for (n, (key, hit)) in state.flows.iter_from(from, now).enumerate() {
            if n == limit {
                next = Some(hit.entry.index);
                break;
            }
            let flow = json!({
                "index": hit.entry.index,
                "protocol": proto_name(key.proto.0),
                "source": std::net::SocketAddr::new(key.src_ip(), key.src_port).to_string(),
                "destination": std::net::SocketAddr::new(key.dst_ip(), key.dst_port).to_string(),
                "direction": match hit.value {
                    FlowValue::Forward { .. } => "forward",
                    FlowValue::Reverse { .. } => "reply",
                },
                "state": format!("{:?}", hit.state),
                "idle_seconds": now.saturating_sub(hit.last_seen),
            });
            if !out.item(n, &flow) {
                return;
            }
        }
        out.write(format!("],\"next\":{}}}", json!(next)).as_bytes());
    })
    .await
}

async fn services_page(State(shared): State<Shared>, Query(page): Query<Page>) -> Response {
    let limit = page.limit(SERVICES_PAGE_MAX);
    let from = page.from.unwrap_or(0);
    stream_blocking(&shared, move |state, out| {
        let tables = state.tables.load_full();
        let snapshot = &tables.snapshot;
        out.write(format!("{{\"generation\":{},\"services\":[", snapshot.generation()).as_bytes());
        for (n, s) in snapshot.services().skip(from).take(limit).enumerate() {
            if !out.item(n, &describe(s)) {
                return;
            }
        }
        let end = from.saturating_add(limit);
        let next = (end < snapshot.len()).then_some(end);
        out.write(format!("],\"next\":{}}}", json!(next)).as_bytes());
    })
    .await
}

/// One Service of the live snapshot for the operator: where it came from and what kind of
/// VIP it is, how it picks, its policies, and each backend with its condition, whether it
/// runs on this node, and its live flows.
fn describe(s: &Service) -> serde_json::Value {
    let spec = s.spec();
    let desired = spec.origin.get::<DesiredService>();
    // Node-locality is the desired state's; the dataplane does not keep it.
    let local: HashMap<(IpAddr, u16), bool> = desired
        .map(|d| {
            d.backends
                .iter()
                .map(|b| ((b.address, b.port), b.local))
                .collect()
        })
        .unwrap_or_default();
    let backends: Vec<_> = spec
        .backends
        .iter()
        .map(|b| {
            let at = (b.endpoint.ip(), b.endpoint.port());
            json!({
                "address": at.0.to_string(),
                "port": at.1,
                "state": match b.state {
                    BackendState::Ready => "ready",
                    BackendState::Terminating => "terminating",
                    BackendState::Draining => "draining",
                },
                "weight": b.weight,
                "local": local.get(&at).copied().unwrap_or(false),
                "live_flows": s.live_flows(b.id),
            })
        })
        .collect();
    json!({
        "name": desired.map(|d| d.name.as_str()),
        "kind": desired.map(|d| match d.kind {
            VipKind::Configured => "configured",
            VipKind::ClusterIp => "cluster-ip",
            VipKind::ExternalIp => "external-ip",
            VipKind::LoadBalancer => "load-balancer",
            VipKind::NodePort => "node-port",
        }),
        "vip": spec.key.vip.ip().to_string(),
        "port": spec.key.vip.port(),
        "protocol": proto_name(spec.key.proto.0),
        "scheduler": match spec.scheduler {
            Scheduler::Maglev => "maglev",
            Scheduler::Random => "random",
            Scheduler::RoundRobin => "round-robin",
            Scheduler::LeastConnections => "least-connections",
        },
        "affinity_timeout_seconds": spec.affinity_timeout,
        "traffic_policy": desired.map(|d| match d.traffic_policy {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }),
        "source_ranges": desired
            .map(|d| d.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>())
            .unwrap_or_default(),
        "no_endpoints": match spec.no_backend {
            NoBackend::Reject => "reject",
            NoBackend::Drop => "drop",
        },
        "backends": backends,
    })
}

/// Runs `produce` on a blocking thread once one of the [`HEAVY_AT_ONCE`] turns is free, and
/// streams what it writes as the answer's body (JSON).
async fn stream_blocking(
    shared: &Shared,
    produce: impl FnOnce(&AdminState, &mut Sink) + Send + 'static,
) -> Response {
    let turn = tokio::time::timeout(HEAVY_WAIT, Arc::clone(&shared.heavy).acquire_owned()).await;
    let Ok(Ok(turn)) = turn else {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy: try again\n").into_response();
    };
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let state = Arc::clone(&shared.state);
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut sink = Sink {
            tx,
            buf: Vec::with_capacity(CHUNK),
            open: true,
        };
        produce(&state, &mut sink);
        sink.flush();
    });
    let chunks = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, std::convert::Infallible>))
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// Where a streamed answer is written: chunks of [`CHUNK`] bytes to the connection.
struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    /// False once the client went away.
    open: bool,
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.flush();
        }
    }

    /// Writes the `n`th item of a JSON list. Returns false when the client went away.
    fn item(&mut self, n: usize, value: &serde_json::Value) -> bool {
        if n > 0 {
            self.buf.push(b',');
        }
        let _ = serde_json::to_writer(&mut self.buf, value);
        if self.buf.len() >= CHUNK {
            self.flush();
        }
        self.open
    }

    fn flush(&mut self) {
        if self.open && !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.open = self.tx.blocking_send(chunk).is_ok();
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
