//! kube-proxy's health servers, for what probes a node from outside: the proxy's own
//! `/healthz` and `/livez` (kube-proxy's `--healthz-bind-address`, `0.0.0.0:10256` by
//! default), and one server per LoadBalancer Service with externalTrafficPolicy Local on its
//! `healthCheckNodePort`, which external load balancers ask whether this node has endpoints
//! of the Service (so a bare-metal gateway is picked only while it can serve).
//!
//! The answers are kube-proxy's (`pkg/proxy/healthcheck`: `proxy_health.go`,
//! `service_health.go`): the same JSON bodies, headers and status codes. The proxy is
//! healthy unless a change has been pending (arrived, not yet live in the dataplane) for
//! longer than the limit — and, where xlb is stricter than kube-proxy, only while the
//! Kubernetes source is synced (listed, and no watch failing for longer than its grace), so a
//! node that lost the API server or never listed stops attracting traffic. `/healthz` is also
//! unhealthy while the node is being deleted or tainted `ToBeDeletedByClusterAutoscaler`;
//! `/livez` ignores that. A Service's server answers 200 when the node has ready local
//! endpoints of it and the proxy is healthy, 503 otherwise.
//!
//! Served on a thread of its own (`xlb-health`) with its own runtime, like the admin API:
//! binding, accepting and answering never run on the control thread, which only records
//! instants in atomics and hands over the set of Services.
//!
//! Owns: the health definition and its clock, the listeners (opened, closed and re-tried as
//! the set of Services changes). Must not know: Kubernetes objects (it is given names, ports
//! and counts), snapshots, packets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use k8s_openapi::chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::kube_source::KubeMetrics;
use crate::server_thread::ServerThread;

/// How long a change may be pending before the proxy is unhealthy, by default (kube-proxy:
/// twice its 30 s sync period).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a health-check port that could not be opened is tried again.
const RETRY_BIND: Duration = Duration::from_secs(5);

/// Whether the proxy is healthy, as kube-proxy defines it (see the module documentation).
#[derive(Debug)]
pub struct ProxyHealth {
    epoch: Instant,
    wall_epoch: SystemTime,
    timeout: Duration,
    /// When the dataplane was last brought up to date: nanoseconds after `epoch`, plus one
    /// (0: never).
    last_updated: AtomicU64,
    /// When the oldest change not yet live arrived, in the same form (0: none pending).
    pending_since: AtomicU64,
    node_eligible: AtomicBool,
    /// The Kubernetes source's counters, for `synced`; `None`: no source to be synced with.
    source: Option<Arc<KubeMetrics>>,
}

/// What [`ProxyHealth::status`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// No change pending for longer than the limit, and the source synced.
    pub healthy: bool,
    /// The node is not being deleted.
    pub node_eligible: bool,
    /// When the dataplane was last brought up to date.
    pub last_updated: Option<SystemTime>,
    /// The time of the answer.
    pub now: SystemTime,
}

impl ProxyHealth {
    /// Healthy while no change has been pending for `timeout`, and while `source` (if any)
    /// is synced.
    #[must_use]
    pub fn new(timeout: Duration, source: Option<Arc<KubeMetrics>>) -> Self {
        Self {
            epoch: Instant::now(),
            wall_epoch: SystemTime::now(),
            timeout,
            last_updated: AtomicU64::new(0),
            pending_since: AtomicU64::new(0),
            node_eligible: AtomicBool::new(true),
            source,
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1
    }

    fn instant(&self, stamp: u64) -> Option<Instant> {
        (stamp != 0).then(|| self.epoch + Duration::from_nanos(stamp - 1))
    }

    /// A change arrived at `at` that the dataplane does not show yet (kube-proxy's
    /// `QueuedUpdate`): the oldest such instant is kept until [`Self::updated`].
    pub fn queued(&self, at: Instant) {
        // Relaxed: each stamp is a value read on its own; no other memory depends on it.
        let _ = self.pending_since.compare_exchange(
            0,
            self.stamp(at),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The dataplane shows every change that arrived before `at` (kube-proxy's `Updated`).
    pub fn updated(&self, at: Instant) {
        // Relaxed: see `queued`. A change queued between the two stores is forgotten only if
        // it arrived before `at`, that is, if it is part of what was published.
        self.pending_since.store(0, Ordering::Relaxed);
        self.last_updated.store(self.stamp(at), Ordering::Relaxed);
    }

    /// Whether the node may take load balancer traffic (its Node object says so).
    pub fn set_node_eligible(&self, eligible: bool) {
        // Relaxed: a flag read on its own.
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// The health at `now`.
    #[must_use]
    pub fn status(&self, now: Instant) -> Status {
        // Relaxed: see `queued`.
        let pending = self.instant(self.pending_since.load(Ordering::Relaxed));
        let late = pending.is_some_and(|p| now.saturating_duration_since(p) >= self.timeout);
        let synced = self
            .source
            .as_ref()
            .is_none_or(|m| m.synced.load(Ordering::Relaxed));
        let wall = |i: Instant| self.wall_epoch + i.saturating_duration_since(self.epoch);
        Status {
            healthy: synced && !late,
            node_eligible: self.node_eligible.load(Ordering::Relaxed),
            last_updated: self
                .instant(self.last_updated.load(Ordering::Relaxed))
                .map(wall),
            now: wall(now),
        }
    }
}

/// A Service with a health-check node port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    /// `namespace/name`.
    pub name: Arc<str>,
    /// Its `healthCheckNodePort`.
    pub port: u16,
    /// Its ready endpoints on this node.
    pub local_endpoints: u32,
}

/// The Services with health-check ports, by name.
type Services = Arc<HashMap<Arc<str>, ServiceHealth>>;

/// The running health servers. Dropping it closes every listener and joins its thread.
#[derive(Debug)]
pub struct HealthServer {
    services: watch::Sender<Services>,
    _thread: ServerThread,
}

impl HealthServer {
    /// Serves `/healthz` and `/livez` on `listener` (already bound, so a taken port fails
    /// the caller's start; `None`: not served) and the Services' health-check ports on
    /// `addresses` (kube-proxy's `--nodeport-addresses`; empty: every address), on a new
    /// thread named `xlb-health`.
    ///
    /// # Errors
    /// When the thread or its runtime cannot be started.
    pub fn spawn(
        listener: Option<std::net::TcpListener>,
        health: Arc<ProxyHealth>,
        addresses: Vec<IpAddr>,
    ) -> std::io::Result<Self> {
        if let Some(l) = &listener {
            l.set_nonblocking(true)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (services, watched) = watch::channel(Services::default());
        let thread = ServerThread::spawn("xlb-health", runtime, move || async move {
            // The proxy's server is a task of the runtime: it ends with it.
            if let Some(l) = listener.and_then(|l| tokio::net::TcpListener::from_std(l).ok()) {
                tokio::spawn(serve(l, proxy_routes(Arc::clone(&health))));
            }
            keep_service_ports(watched, health, addresses).await;
        })?;
        Ok(Self {
            services,
            _thread: thread,
        })
    }

    /// Serves exactly `services` from now on: new ports are opened, gone ones closed,
    /// counts are answered at once.
    pub fn set_services(&self, services: Vec<ServiceHealth>) {
        let by_name = services
            .into_iter()
            .map(|s| (Arc::clone(&s.name), s))
            .collect();
        self.services.send_replace(Arc::new(by_name));
    }
}

async fn serve(listener: tokio::net::TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        warn!(error = %e, "health server stopped");
    }
}

fn proxy_routes(health: Arc<ProxyHealth>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health)
}

/// Go's `time.Time` as kube-proxy prints it (`2006-01-02 15:04:05.999999999 +0000 UTC`);
/// never: Go's zero time.
fn go_time(t: Option<SystemTime>) -> String {
    t.map_or_else(
        || "0001-01-01 00:00:00 +0000 UTC".to_owned(),
        |t| {
            DateTime::<Utc>::from(t)
                .format("%Y-%m-%d %H:%M:%S%.f +0000 UTC")
                .to_string()
        },
    )
}

fn json(ok: bool, body: String) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// kube-proxy's `/healthz`: healthy and the node eligible. A healthy answer's `lastUpdated`
/// is the current time, as kube-proxy's is (for compatibility with older releases).
async fn healthz(State(health): State<Arc<ProxyHealth>>) -> Response {
    let s = health.status(Instant::now());
    let ok = s.healthy && s.node_eligible;
    let last = if s.healthy {
        Some(s.now)
    } else {
        s.last_updated
    };
    json(
        ok,
        format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": {}}}",
            go_time(last),
            go_time(Some(s.now)),
            s.node_eligible
        ),
    )
}

/// kube-proxy's `/livez`: healthy, whatever the node.
async fn livez(State(health): State<Arc<ProxyHealth>>) -> Response {
    let s = health.status(Instant::now());
    let last = if s.healthy {
        Some(s.now)
    } else {
        s.last_updated
    };
    json(
        s.healthy,
        format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
            go_time(last),
            go_time(Some(s.now))
        ),
    )
}

/// What a Service's health-check server answers on any path: 200 with the count of local
/// endpoints while there are some and the proxy is healthy, 503 otherwise.
async fn service_answer(
    State((name, services, health)): State<(Arc<str>, watch::Receiver<Services>, Arc<ProxyHealth>)>,
) -> Response {
    let count = services
        .borrow()
        .get(&name)
        .map_or(0, |s| s.local_endpoints);
    let healthy = health.status(Instant::now()).healthy;
    let (namespace, short) = name.split_once('/').unwrap_or(("", &name));
    let text = |s: &str| serde_json::Value::from(s).to_string();
    json(
        count != 0 && healthy,
        format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            text(namespace),
            text(short)
        ),
    )
}

/// A Service's open health-check port: its listeners' tasks.
struct Open {
    port: u16,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Keeps one server per Service in `watched` open on its port (on each of `addresses`, or
/// on every address), retrying ports that could not be opened.
async fn keep_service_ports(
    mut watched: watch::Receiver<Services>,
    health: Arc<ProxyHealth>,
    addresses: Vec<IpAddr>,
) {
    let mut open: HashMap<Arc<str>, Open> = HashMap::new();
    // Ports that could not be opened, logged once until they open.
    let mut failing: HashMap<Arc<str>, u16> = HashMap::new();
    let mut retry = tokio::time::interval(RETRY_BIND);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = watched.changed() => if changed.is_err() { return },
            _ = retry.tick() => {}
        }
        let wanted = Arc::clone(&watched.borrow_and_update());
        open.retain(|name, o| {
            let keep = wanted.get(name).is_some_and(|s| s.port == o.port);
            if !keep {
                info!(service = %name, port = o.port, "health-check port closed");
            }
            keep
        });
        failing.retain(|name, port| wanted.get(name).is_some_and(|s| s.port == *port));
        for (name, service) in wanted.iter() {
            if open.contains_key(name) {
                continue;
            }
            match bind(service.port, &addresses).await {
                Ok(listeners) => {
                    let state = (Arc::clone(name), watched.clone(), Arc::clone(&health));
                    let router = Router::new().fallback(service_answer).with_state(state);
                    let tasks = listeners
                        .into_iter()
                        .map(|l| tokio::spawn(serve(l, router.clone())))
                        .collect();
                    failing.remove(name);
                    info!(service = %name, port = service.port, "health-check port open");
                    open.insert(
                        Arc::clone(name),
                        Open {
                            port: service.port,
                            tasks,
                        },
                    );
                }
                Err(e) => {
                    if failing.insert(Arc::clone(name), service.port) != Some(service.port) {
                        warn!(service = %name, port = service.port, error = %e,
                            "cannot open the health-check port; trying again every 5 s");
                    }
                }
            }
        }
    }
}

/// Listeners on `port` at each of `addresses`, or at every address (IPv6 and IPv4 on one
/// socket where the host has IPv6, IPv4 alone otherwise). All or none.
async fn bind(port: u16, addresses: &[IpAddr]) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    if addresses.is_empty() {
        let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        return match tokio::net::TcpListener::bind(any6).await {
            Ok(l) => Ok(vec![l]),
            Err(_) => {
                let any4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
                Ok(vec![tokio::net::TcpListener::bind(any4).await?])
            }
        };
    }
    let mut listeners = Vec::with_capacity(addresses.len());
    for a in addresses {
        listeners.push(tokio::net::TcpListener::bind(SocketAddr::new(*a, port)).await?);
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_is_healthy_until_a_change_has_waited_longer_than_the_limit() {
        let h = ProxyHealth::new(Duration::from_secs(60), None);
        let t0 = Instant::now();
        assert!(h.status(t0).healthy, "healthy while starting up");
        assert_eq!(h.status(t0).last_updated, None);
        h.queued(t0);
        h.queued(t0 + Duration::from_secs(30)); // the oldest pending change counts
        assert!(h.status(t0 + Duration::from_secs(59)).healthy);
        assert!(!h.status(t0 + Duration::from_secs(60)).healthy);
        h.updated(t0 + Duration::from_secs(61));
        let s = h.status(t0 + Duration::from_secs(200));
        assert!(s.healthy, "nothing pending: healthy however long ago");
        assert!(s.last_updated.is_some());
    }

    #[test]
    fn the_proxy_is_unhealthy_while_its_kubernetes_source_is_not_synced() {
        let metrics = Arc::new(KubeMetrics::default());
        let h = ProxyHealth::new(Duration::from_secs(60), Some(Arc::clone(&metrics)));
        assert!(!h.status(Instant::now()).healthy, "not listed yet");
        metrics.synced.store(true, Ordering::Relaxed);
        assert!(h.status(Instant::now()).healthy);
    }

    #[test]
    fn times_print_as_go_prints_them() {
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_557_000_250);
        assert_eq!(go_time(Some(t)), "2025-12-01 02:43:20.250 +0000 UTC");
    }
}
