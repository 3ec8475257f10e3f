//! The Kubernetes source: watches Services, EndpointSlices and this node, and turns what
//! changed into [`Change`]s for the publisher.
//!
//! Owns: the three watches ([`watch`]: list, watch from the list's resourceVersion, relist
//! when the server says the version is unusable, back-off, `Retry-After`, stalled watches),
//! the client they share (its idle read timeout and the middleware that reads
//! `Retry-After`), the store of what translation reads of each object (`store`),
//! coalescing (at most one publication per minimum sync period, bursts drained first), and
//! the truth about all of it in [`KubeMetrics`]: `synced` only while Services and
//! EndpointSlices are listed and no watch has been failing for longer than a grace period.
//! Nothing is published before Services and EndpointSlices are both listed, so the first
//! snapshot is whole.
//!
//! Must not know: snapshots, the dataplane, the daemon; what translation means (that is
//! `kubernetes`).

mod store;
pub mod watch;

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use tracing::{debug, info, warn};

pub use self::store::{Event, Lenient, Store, Watched};
use self::watch::{Progress, RetryAfter, Watch, WatchOptions};
use crate::health::{ProxyHealth, ServiceHealth};
use crate::kubernetes::{NodeContext, Warning};

use crate::translate::Change;

/// Counters of the Kubernetes source, for `/metrics`.
#[derive(Debug, Default)]
pub struct KubeMetrics {
    /// Services in the store.
    pub services: AtomicU64,
    /// EndpointSlices in the store.
    pub slices: AtomicU64,
    /// Nodes in the store (this node: 0 or 1).
    pub nodes: AtomicU64,
    /// Failed lists and watches (each retried).
    pub watch_errors: AtomicU64,
    /// Relists because the server said a resourceVersion was unusable.
    pub relists: AtomicU64,
    /// Translation errors and skipped objects, by kind (as [`ERROR_KINDS`]): each counted
    /// when it appears.
    pub errors: [AtomicU64; ERROR_KINDS.len()],
    /// Objects currently refused or partly refused, by kind (as [`ERROR_KINDS`]).
    pub refusing: [AtomicU64; ERROR_KINDS.len()],
    /// Whether Services and EndpointSlices are listed and no watch has been failing for
    /// longer than the grace period.
    pub synced: AtomicBool,
}

/// The kinds of translation error counted (the last one takes any other).
pub const ERROR_KINDS: [&str; 8] = [
    "malformed",
    "bad-address",
    "bad-annotation",
    "bad-port",
    "unsupported-protocol",
    "conflict",
    "refused",
    "other",
];

fn error_index(kind: &str) -> usize {
    ERROR_KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(ERROR_KINDS.len() - 1)
}

impl KubeMetrics {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        // Relaxed: a counter read on its own.
        self.errors[error_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// One more (`delta` 1) or one fewer (-1) object refused for each of `kinds`.
    fn refusing<'a>(&self, kinds: impl Iterator<Item = &'a str>, delta: i8) {
        for kind in kinds {
            let gauge = &self.refusing[error_index(kind)];
            // Relaxed: a gauge read on its own.
            if delta > 0 {
                gauge.fetch_add(1, Ordering::Relaxed);
            } else {
                gauge.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// How the source watches and publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceOptions {
    /// The shortest time between two publications.
    pub min_sync: Duration,
    /// How each watch is driven.
    pub watch: WatchOptions,
    /// How long a watch may keep failing before the source says it is not synced.
    pub failing_grace: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            min_sync: Duration::from_millis(10),
            watch: WatchOptions::default(),
            failing_grace: Duration::from_secs(15),
        }
    }
}

/// The longest a connection to the API server may take to open (TCP and TLS): after an
/// outage the next attempt comes within the back-off cap, not a 30 s connect later.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for the source: `config` with the watch's idle read timeout (a silent
/// connection is dropped a little after the server should have ended it), a bounded
/// connect timeout, and the middleware that reads `Retry-After` into `retry_after`.
///
/// # Errors
/// The configuration cannot make a client (its TLS settings, say).
pub fn client(
    mut config: kube::Config,
    options: &WatchOptions,
    retry_after: Arc<RetryAfter>,
) -> Result<Client, kube::Error> {
    config.read_timeout = Some(options.read_timeout());
    config.connect_timeout = Some(
        config
            .connect_timeout
            .map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT)),
    );
    let layer = tower::util::MapResponseLayer::new(
        move |response: http::Response<Box<kube::client::DynBody>>| {
            retry_after.note(&response);
            response
        },
    );
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// The watched resources, as indices into the source's per-watch state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Services,
    Slices,
    Node,
}

impl Resource {
    const ALL: [Self; 3] = [Self::Services, Self::Slices, Self::Node];

    fn name(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Slices => "endpointslices",
            Self::Node => "node",
        }
    }
}

/// A step of one of the watches.
#[derive(Debug)]
enum Step {
    Store(Watched),
    Answered(Resource),
    Relisting(Resource, String),
    Failed(Resource, String, Duration),
    Skipped(Resource, String),
}

impl Step {
    fn of<K>(
        resource: Resource,
        p: Progress<K>,
        event: fn(Box<Event<Lenient<K>>>) -> Watched,
    ) -> Self {
        match p {
            Progress::Event(e) => Self::Store(event(e)),
            Progress::Answered => Self::Answered(resource),
            Progress::Relisting(why) => Self::Relisting(resource, why),
            Progress::Failed { error, retry_in } => Self::Failed(resource, error, retry_in),
            Progress::Skipped(why) => Self::Skipped(resource, why),
        }
    }
}

/// At most this many complaints are logged per second (all are counted).
const COMPLAINTS_LOGGED: usize = 20;

/// Logs complaints about objects as they appear (each once, not again on every relist), at
/// most [`COMPLAINTS_LOGGED`] a second: a list full of bad objects does not flood the log.
#[derive(Debug)]
struct ComplaintLog {
    window: Instant,
    logged: usize,
    suppressed: usize,
}

impl ComplaintLog {
    fn log(&mut self, complaints: Vec<Warning>, now: Instant) {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!(
                    more = self.suppressed,
                    "more objects refused in part or whole (counted in /metrics)"
                );
            }
            *self = Self {
                window: now,
                logged: 0,
                suppressed: 0,
            };
        }
        for w in complaints {
            if self.logged < COMPLAINTS_LOGGED {
                self.logged += 1;
                warn!(object = %w.object, kind = w.kind, "{}", w.message);
            } else {
                self.suppressed += 1;
            }
        }
    }
}

/// How often the source looks again at whether it is synced while nothing arrives.
const HEALTH_PERIOD: Duration = Duration::from_secs(1);

/// The Kubernetes source: the watches, the store, and coalescing.
pub struct KubeSource {
    steps: BoxStream<'static, Step>,
    store: Store,
    options: SourceOptions,
    last_publish: Option<Instant>,
    /// Since when each watch has been failing (`None`: its last request was answered).
    failing: [Option<Instant>; 3],
    complaint_log: ComplaintLog,
    metrics: Arc<KubeMetrics>,
    /// Told when a change arrives and whether the node is eligible, if a health server runs.
    health: Option<Arc<ProxyHealth>>,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("options", &self.options)
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

/// A batch of changes ready to publish.
#[derive(Debug)]
pub struct Batch {
    /// What changed.
    pub change: Change,
    /// When the events behind it arrived, each instant once (for the event-to-live
    /// histogram): only events that changed some Service's translation; a relist counts
    /// once, from when it started.
    pub arrivals: Vec<Instant>,
    /// How long translating the stale Services took.
    pub translated_in: Duration,
    /// Every Service with a healthCheckNodePort and its local ready endpoints, when that
    /// changed.
    pub health: Option<Vec<ServiceHealth>>,
}

impl KubeSource {
    /// Starts watching through a client made of `config` (see [`client`]) as `node`:
    /// Services and EndpointSlices in every namespace and this node's Node object. Nothing is
    /// requested before the first [`KubeSource::next_batch`].
    ///
    /// # Errors
    /// The configuration cannot make a client.
    pub fn new(
        config: kube::Config,
        node: NodeContext,
        options: SourceOptions,
        metrics: Arc<KubeMetrics>,
    ) -> Result<Self, kube::Error> {
        let retry_after = Arc::new(RetryAfter::default());
        let client = client(config, &options.watch, Arc::clone(&retry_after))?;
        let node_fields = format!("metadata.name={}", node.name);
        let w = options.watch;
        let services = Watch::<Service>::new(&client, None, w, Arc::clone(&retry_after))
            .into_stream()
            .map(|p| Step::of(Resource::Services, p, Watched::Service));
        let slices = Watch::<EndpointSlice>::new(&client, None, w, Arc::clone(&retry_after))
            .into_stream()
            .map(|p| Step::of(Resource::Slices, p, Watched::Slice));
        let nodes = Watch::<Node>::new(&client, Some(node_fields), w, retry_after)
            .into_stream()
            .map(|p| Step::of(Resource::Node, p, Watched::Node));
        let steps =
            futures::stream::select_all([services.boxed(), slices.boxed(), nodes.boxed()]).boxed();
        Ok(Self {
            steps,
            store: Store::new(node),
            options,
            last_publish: None,
            failing: [None; 3],
            complaint_log: ComplaintLog {
                window: Instant::now(),
                logged: 0,
                suppressed: 0,
            },
            metrics,
            health: None,
        })
    }

    /// Tells `health` when changes arrive (kube-proxy's `QueuedUpdate`; the daemon says
    /// when they are live) and whether this node is eligible for load balancer traffic.
    #[must_use]
    pub fn with_health(mut self, health: Arc<ProxyHealth>) -> Self {
        self.health = Some(health);
        self
    }

    /// The source's counters.
    #[must_use]
    pub fn metrics(&self) -> &Arc<KubeMetrics> {
        &self.metrics
    }

    /// Waits for the next batch of changes: events are applied as they arrive; once some
    /// Service is stale (and both lists are in), what is already waiting is drained, and the
    /// batch is returned no sooner than the minimum sync period after the previous one.
    /// Cancel-safe: what a dropped call applied stays applied.
    pub async fn next_batch(&mut self) -> Batch {
        let mut health = tokio::time::interval(HEALTH_PERIOD);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ready = self.store.listed() && self.store.is_dirty();
            let mut due = Instant::now();
            if ready {
                // Drain what has already arrived: a burst is one batch.
                while let Some(Some(step)) = self.steps.next().now_or_never() {
                    self.arrived(step);
                }
                due = self.last_publish.map_or(due, |t| t + self.options.min_sync);
                let now = Instant::now();
                if due <= now {
                    return self.batch(now);
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(due.into()), if ready => {}
                step = self.steps.next() => match step {
                    Some(step) => self.arrived(step),
                    // The watches never end; if they did, there is nothing more to publish.
                    None => std::future::pending::<()>().await,
                },
                _ = health.tick() => self.check_synced(Instant::now()),
            }
        }
    }

    fn arrived(&mut self, step: Step) {
        let now = Instant::now();
        match step {
            Step::Store(watched) => {
                self.store.apply(watched, now, &self.metrics);
                self.complaint_log.log(self.store.take_complaints(), now);
                if let Some(h) = &self.health {
                    if self.store.is_dirty() {
                        h.queued(now);
                    }
                    h.set_node_eligible(self.store.node_eligible());
                }
            }
            Step::Answered(r) => {
                if let Some(since) = self.failing[r as usize].take() {
                    info!(
                        resource = r.name(),
                        after_s = now.duration_since(since).as_secs_f64(),
                        "Kubernetes API answers again"
                    );
                }
            }
            Step::Relisting(r, why) => {
                // Relaxed: counters read on their own.
                self.metrics.relists.fetch_add(1, Ordering::Relaxed);
                self.metrics.watch_errors.fetch_add(1, Ordering::Relaxed);
                info!(resource = r.name(), reason = %why, "resourceVersion unusable; listing again (the last good snapshot stays meanwhile)");
            }
            Step::Failed(r, error, retry_in) => {
                // Relaxed: a counter read on its own.
                self.metrics.watch_errors.fetch_add(1, Ordering::Relaxed);
                let slot = &mut self.failing[r as usize];
                if slot.is_none() {
                    warn!(resource = r.name(), %error, retry_in_s = retry_in.as_secs_f64(), "Kubernetes watch failed; retrying, the last good snapshot stays");
                    *slot = Some(now);
                } else {
                    debug!(resource = r.name(), %error, retry_in_s = retry_in.as_secs_f64(), "Kubernetes watch still failing");
                }
            }
            Step::Skipped(r, why) => {
                self.metrics.error("malformed");
                warn!(resource = r.name(), error = %why, "undecodable watch event skipped");
            }
        }
        self.check_synced(now);
    }

    /// Whether Services and EndpointSlices are listed and no watch has been failing for
    /// longer than the grace period (kept in the metrics).
    fn check_synced(&self, now: Instant) {
        let failing = Resource::ALL.iter().find_map(|r| {
            self.failing[*r as usize]
                .filter(|since| now.duration_since(*since) > self.options.failing_grace)
                .map(|_| r.name())
        });
        let synced = self.store.listed() && failing.is_none();
        // Relaxed: a flag read on its own.
        let was = self.metrics.synced.swap(synced, Ordering::Relaxed);
        if was && !synced {
            warn!(
                resource = failing.unwrap_or("-"),
                grace_s = self.options.failing_grace.as_secs_f64(),
                "Kubernetes watch failing for longer than the grace period: not synced"
            );
        }
    }

    fn batch(&mut self, now: Instant) -> Batch {
        self.last_publish = Some(now);
        let t = self.store.take_change(&self.metrics);
        self.complaint_log.log(self.store.take_complaints(), now);
        Batch {
            change: t.change,
            arrivals: t.arrivals,
            translated_in: now.elapsed(),
            health: t.health,
        }
    }
}
