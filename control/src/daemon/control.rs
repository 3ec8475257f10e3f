//! The control loop of `xlb run`: on the calling thread's tokio runtime, it publishes the
//! file's edits and the Kubernetes source's batches, keeps next hops in step with the kernel's
//! neighbours and routes, resolves what workers report unresolved, logs what they notice, and
//! returns on SIGINT or SIGTERM. Start-up and teardown are the parent module's.
//!
//! Must not know: packet bytes, how the sources read their input.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use xlb_dataplane::packet::Family;
use xlb_dataplane::worker::{Notice, NoticeKind, Shared};
use xlb_dataplane::xsk::XdpFilter;

use crate::admin::AdminState;
use crate::config::Config;
use crate::error::Error;
use crate::file_source::FileSource;
use crate::health::{HealthServer, ProxyHealth};
use crate::kube_source::{Batch, KubeSource};
use crate::netlink::Kernel;
use crate::node_link::NodeLink;
use crate::publish::{Published, Publisher};
use crate::translate::BuildStats;

/// How often the backends of new Services are resolved (workers' reports are at once).
const HOPS_PERIOD: Duration = Duration::from_millis(200);
/// How often the kernel's neighbours and routes are read whole, in case a notification was
/// lost (the kernel drops them when the socket's buffer overflows).
const REREAD_PERIOD: Duration = Duration::from_secs(10);
/// How often the configuration file is checked for changes.
const FILE_PERIOD: Duration = Duration::from_secs(1);

/// Logs what a worker noticed (each kind at most once a second per worker).
fn log_notice(notice: &Notice) {
    let key = &notice.key;
    let from = std::net::SocketAddr::new(key.src_ip(), key.src_port);
    let to = std::net::SocketAddr::new(key.dst_ip(), key.dst_port);
    let proto = key.proto;
    match notice.kind {
        NoticeKind::NoNextHop => warn!(
            address = %key.dst_ip(),
            "no next hop: packets to this address were held, then dropped (is it reachable from xlb's interfaces?)"
        ),
        NoticeKind::BackendLeftReset => info!(
            %proto, %from, %to,
            "flow reset: its backend left the Service"
        ),
        NoticeKind::TableFull => warn!(
            %proto, %from, %to,
            "flow table full of established flows: a new flow was not recorded (forwarded without state in dnat mode, dropped in snat mode); raise flow_capacity (flow_capacity_ipv6 for an IPv6 flow)"
        ),
        NoticeKind::NoSnatPort => warn!(
            %proto, %from, %to,
            "no free snat port for a new flow: dropped; widen snat.first_port..last_port"
        ),
    }
}

/// The backend addresses of `services`, as next-hop keys.
pub(super) fn backends_of<'a>(
    services: impl Iterator<Item = &'a xlb_dataplane::lb::snapshot::Service>,
) -> Vec<(Family, [u8; 16])> {
    services
        .flat_map(|s| s.spec().backends.iter())
        .map(|b| (b.endpoint.family(), *b.endpoint.key_addr()))
        .collect()
}

/// The next batch of the Kubernetes source, or never without one.
async fn next_batch(kube: &mut Option<KubeSource>) -> Batch {
    match kube {
        Some(k) => k.next_batch().await,
        None => std::future::pending().await,
    }
}

/// The control loop's state: what it publishes into and what it watches.
pub(super) struct Control {
    pub(super) config: Config,
    pub(super) publisher: Publisher,
    pub(super) kernel: Kernel,
    pub(super) filter: XdpFilter,
    pub(super) shared: Shared,
    pub(super) admin: Arc<AdminState>,
    /// The configuration file: its content hash and the watch of its directory.
    pub(super) file: FileSource,
    /// Backend addresses whose next hops to look for at the next round.
    pub(super) to_resolve: Vec<(Family, [u8; 16])>,
    /// Notified by workers that reported something.
    pub(super) wake: Arc<tokio::sync::Notify>,
    /// kube-proxy's health servers (with the Kubernetes source).
    pub(super) health: Option<(Arc<ProxyHealth>, HealthServer)>,
    /// On a node, its link (last: removed after the filter is detached).
    pub(super) node: Option<NodeLink>,
    /// The node's own addresses (for the link's steering).
    pub(super) local: Arc<Vec<std::net::IpAddr>>,
}

impl Control {
    /// Runs the loop until SIGINT or SIGTERM.
    pub(super) async fn serve(&mut self, mut kube: Option<KubeSource>) -> Result<(), Error> {
        let mut hops_tick = tokio::time::interval(HOPS_PERIOD);
        let mut reread_tick = tokio::time::interval(REREAD_PERIOD);
        let mut file_tick = tokio::time::interval(FILE_PERIOD);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(Error::resource("watch SIGTERM"))?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(Error::resource("watch SIGHUP"))?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); return Ok(()); }
                _ = term.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
                _ = hops_tick.tick() => self.resolve(Vec::new()).await,
                () = self.wake.notified() => {
                    let mut reported = Vec::new();
                    while let Some(addr) = self.shared.reports.next_unresolved() {
                        reported.push(addr);
                    }
                    self.resolve(reported).await;
                }
                changed = self.kernel.changed() => if changed {
                    self.publisher.publish_hops(self.kernel.next_hops());
                },
                _ = reread_tick.tick() => match self.kernel.reread().await {
                    Ok(()) => self.publisher.publish_hops(self.kernel.next_hops()),
                    Err(e) => warn!(error = %e, "cannot read neighbours and routes; keeping the last ones"),
                },
                batch = next_batch(&mut kube) => self.publish_kube(batch),
                () = self.file.changed() => self.reload(false),
                _ = hup.recv() => {
                    info!("SIGHUP: reading the configuration again");
                    self.reload(true);
                }
                // Also polled: inotify can be unavailable, and a watched directory can go.
                _ = file_tick.tick() => {
                    self.reload(false);
                    if let Err(e) = self.publisher.expire_steering(Instant::now(), &mut self.filter) {
                        warn!(error = %e, "cannot remove retired keys from the XDP filter");
                    }
                    self.admin.filter_counts.store(Arc::new(self.filter.counts()));
                }
            }
        }
    }

    /// Publishes a batch of Kubernetes changes; one Service the dataplane refuses keeps its
    /// previous version and does not hold up the others.
    fn publish_kube(&mut self, batch: Batch) {
        let started = Instant::now();
        let metrics = self.admin.kube.as_deref();
        match self
            .publisher
            .publish_kubernetes(batch.change, &mut self.filter)
        {
            Ok(published) => {
                if let Some(m) = metrics {
                    for _ in &published.failed {
                        m.error("refused");
                    }
                    for _ in &published.conflicts {
                        m.error("conflict");
                    }
                }
                let changed = published.stats.built + published.stats.removed > 0;
                self.published(&published, started);
                if let Some((proxy, server)) = &self.health {
                    proxy.updated(Instant::now());
                    if let Some(services) = batch.health {
                        server.set_services(services);
                    }
                }
                // Event to live, for each event in the batch that changed the dataplane.
                for arrival in batch.arrivals.iter().filter(|_| changed) {
                    self.admin
                        .sync_seconds
                        .observe(arrival.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                warn!(error = %e, "Kubernetes change refused; keeping the last good snapshot")
            }
        }
    }

    /// Asks the kernel to resolve what workers reported (`reported`) and the backends of
    /// Services published since the last round, and logs what workers noticed.
    async fn resolve(&mut self, reported: Vec<(Family, [u8; 16])>) {
        let backends = std::mem::take(&mut self.to_resolve);
        self.kernel
            .resolve(reported.into_iter().chain(backends))
            .await;
        while let Some(notice) = self.shared.reports.next_notice() {
            log_notice(&notice);
        }
    }

    /// Applies an edited file as a new snapshot (`force`: even if its content is the same,
    /// for SIGHUP); an invalid edit keeps the last good one.
    fn reload(&mut self, force: bool) {
        let Some(read) = self.file.read_if_changed(force) else {
            return;
        };
        let started = Instant::now();
        let config = match read.config {
            Ok(config) => config,
            Err(e) => {
                warn!(error = %e, "configuration edit refused; keeping the last good snapshot");
                return;
            }
        };
        if config.interfaces != self.config.interfaces
            || config.cores != self.config.cores
            || config.mode != self.config.mode
        {
            warn!("interfaces, cores and mode take effect at the next start; Services are applied now");
        }
        let published = match self
            .publisher
            .publish_file(config.desired(), &mut self.filter)
        {
            Ok(published) => published,
            Err(e) => {
                warn!(error = %e, "configuration edit refused; keeping the last good snapshot");
                return;
            }
        };
        self.published(&published, started);
        // Relaxed: gauges read on their own.
        self.admin.config_hash.store(read.hash, Ordering::Relaxed);
        self.admin
            .config_generation
            .store(config.generation.unwrap_or(0), Ordering::Relaxed);
        info!(hash = read.hash, generation = ?config.generation, "configuration live");
        if published.stats != BuildStats::default() {
            self.admin
                .sync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.config.services = config.services;
    }

    /// On a node: the link's steering follows the snapshot just published.
    pub(super) fn steer_node(&self) {
        if let Some(node) = &self.node {
            node.steer(self.publisher.snapshot(), Arc::clone(&self.local));
        }
    }

    /// Accounts for a publication: generation, sync time, logs.
    fn published(&mut self, published: &Published, started: Instant) {
        self.to_resolve
            .extend(backends_of(published.added.iter().map(|s| &**s)));
        if let Some(e) = &published.steer_error {
            warn!(error = %e, "cannot update the XDP filter");
        }
        for conflict in &published.conflicts {
            warn!(%conflict, "Service left out");
        }
        for e in &published.failed {
            warn!(error = %e, "Service refused by the dataplane; its previous version stays");
        }
        if published.stats == BuildStats::default() {
            return;
        }
        self.steer_node();
        let seconds = started.elapsed().as_secs_f64();
        // Relaxed: a gauge read on its own.
        self.admin
            .generation
            .store(published.generation, Ordering::Relaxed);
        info!(
            generation = published.generation,
            services = self.publisher.snapshot().len(),
            built = published.stats.built,
            removed = published.stats.removed,
            seconds,
            "snapshot published"
        );
    }
}
