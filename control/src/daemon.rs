//! `xlb run`: starts the dataplane from a configuration file and keeps it in step.
//!
//! Owns the process's lifecycle: load and attach the XDP filter, open one worker's AF_XDP
//! sockets per core and pin the worker there, then run the control loop on a tokio runtime
//! on the calling thread (never on a worker core): watch the file and publish a new snapshot
//! when it changes (an invalid edit keeps the last good one, logged), publish the Kubernetes
//! source's batches when it is configured (the file's Services keep serving while the API
//! server is away), keep next hops in step with the kernel's neighbours and routes, resolve
//! what workers report unresolved and log what they notice, and on SIGINT or SIGTERM stop the
//! workers and detach the filter. The admin API runs on a thread of its own
//! ([`crate::admin`]), and whole-table chores (least-connections recounts, the live-entry
//! gauge) on another ([`crate::chores`]): nothing slow runs on the control loop.
//!
//! Must not know: packet bytes (workers and the dataplane own them).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{info, warn};
use xlb_dataplane::lb::decide::{Masquerade, SnatPool};
use xlb_dataplane::lb::flow::{FlowTable, Timeouts};
use xlb_dataplane::lb::fragments::Fragments;
use xlb_dataplane::lb::prefix::PrefixMap;
use xlb_dataplane::lb::snapshot::Snapshot;
use xlb_dataplane::packet::{key_addr, Family};
use xlb_dataplane::worker::{
    Clock, Encapsulation, Notice, NoticeKind, Reports, Shared, Tables, Worker, WorkerStats,
};
use xlb_dataplane::xsk::{FilterCounts, XdpFilter, XdpMode, XskConfig, XskIo};

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError, KubernetesConfig, ModeConfig, XdpModeConfig};
use crate::error::Error;
use crate::file_source::{content_hash, FileSource};
use crate::health::{HealthServer, ProxyHealth};
use crate::kube_source::{Batch, KubeMetrics, KubeSource, SourceOptions};
use crate::kubernetes::NodeContext;
use crate::netlink::{Kernel, Port};
use crate::node_link::NodeLink;
use crate::publish::{Published, Publisher};
use crate::translate::BuildStats;

/// The capabilities `xlb run` needs when not root, no more: BPF programs and maps (BPF, and
/// PERFMON for the verifier), attaching XDP (NET_ADMIN), AF_XDP sockets (NET_RAW), locking the
/// UMEM (IPC_LOCK). The netns test runs xlb with exactly these; the DaemonSet and the systemd
/// unit grant exactly these.
pub const CAPABILITIES: [&str; 5] = ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "IPC_LOCK"];

/// How often the backends of new Services are resolved (workers' reports are at once).
const HOPS_PERIOD: Duration = Duration::from_millis(200);
/// How often the kernel's neighbours and routes are read whole, in case a notification was
/// lost (the kernel drops them when the socket's buffer overflows).
const REREAD_PERIOD: Duration = Duration::from_secs(10);
/// How often the configuration file is checked for changes.
const FILE_PERIOD: Duration = Duration::from_secs(1);

/// Runs xlb until SIGINT or SIGTERM.
///
/// # Errors
/// A message for anything that stops the start: a bad file, a missing interface, a busy
/// queue, missing privileges.
pub fn run(path: &Path, node_name: Option<String>) -> Result<(), Error> {
    let config = Config::load(path)?;
    for warning in crate::explain::dsr_warnings(&config) {
        warn!("{warning}");
    }
    let loaded_hash = std::fs::read(path).ok().map(|b| content_hash(&b));
    let mut ports = config
        .interfaces
        .iter()
        .map(|name| {
            Port::lookup(name).map_err(|reason| Error::Interface {
                interface: name.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // On a node, xlb's end of its link is one more port, the last (removed again on return).
    let node = match &config.node {
        Some(n) => {
            let queues = config.queue + u32::try_from(config.cores.len()).unwrap_or(1);
            if let Some(snat) = &config.snat {
                crate::node_link::warn_if_ports_overlap(snat.first_port, snat.last_port);
            }
            Some(NodeLink::up(n, queues).map_err(Error::Kernel)?)
        }
        None => None,
    };
    let hand_back = node.as_ref().map(|n| {
        ports.push(n.peer.clone());
        n.hand_back(u16::try_from(ports.len() - 1).unwrap_or(u16::MAX))
    });
    let existing = core_affinity::get_core_ids().unwrap_or_default();
    if let Some(missing) = config
        .cores
        .iter()
        .find(|c| !existing.iter().any(|e| e.id == **c))
    {
        return Err(Error::Core {
            core: *missing,
            available: existing.len(),
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::resource("start the control runtime"))?;

    let mut filter = XdpFilter::load().map_err(|e| Error::Filter(e.to_string()))?;
    let mode = match config.xdp_mode {
        XdpModeConfig::Native => XdpMode::Native,
        XdpModeConfig::Skb => XdpMode::Skb,
    };
    // The netlink socket registers with the runtime's reactor as it is created.
    let _context = runtime.enter();
    let mut kernel = runtime
        .block_on(Kernel::open(ports.clone()))
        .map_err(Error::Kernel)?;
    if let Some(hop) = hand_back {
        kernel.hand_back_to(hop);
    }
    let local = match &node {
        Some(_) => Arc::new(
            runtime
                .block_on(kernel.addresses())
                .map_err(Error::Kernel)?,
        ),
        None => Arc::default(),
    };
    let tables = Arc::new(ArcSwap::from_pointee(Tables {
        snapshot: Arc::new(Snapshot::default()),
        hops: kernel.next_hops(),
    }));
    let (kube, health) = match &config.kubernetes {
        Some(k) => {
            let addresses = runtime
                .block_on(kernel.addresses())
                .map_err(Error::Kernel)?;
            let source = runtime.block_on(kube_source(k, node_name, addresses.clone()))?;
            let proxy = Arc::new(ProxyHealth::new(
                Duration::from_secs(k.health_timeout_s),
                Some(Arc::clone(source.metrics())),
            ));
            // healthCheckNodePorts: on the node port addresses, as kube-proxy serves them.
            let at: Vec<std::net::IpAddr> = if k.node_port_addresses.is_empty() {
                Vec::new()
            } else {
                addresses
                    .into_iter()
                    .filter(|a| k.node_port_addresses.iter().any(|c| c.contains(*a)))
                    .collect()
            };
            (
                Some(source.with_health(Arc::clone(&proxy))),
                Some((proxy, at, k.health_address)),
            )
        }
        None => (None, None),
    };
    let mut publisher = Publisher::new(&config, Arc::clone(&tables));
    publisher.publish_file(config.desired(), &mut filter)?;

    // Workers wake the control loop when they report an address to resolve.
    let wake = Arc::new(tokio::sync::Notify::new());
    let reports = {
        let wake = Arc::clone(&wake);
        Reports::new(1024, move || wake.notify_one())
    };
    let table_bytes = FlowTable::memory_for(config.flow_capacity);
    if let Some(total) = memory_total() {
        if table_bytes > total / 2 {
            return Err(ConfigError::invalid(format!(
                "flow_capacity: {} entries take {} MiB, more than half of this machine's {} MiB",
                config.flow_capacity,
                table_bytes >> 20,
                total >> 20
            ))
            .into());
        }
    }
    let flows = Arc::new(FlowTable::new(config.flow_capacity, Timeouts::default()));
    info!(
        entries = flows.capacity(),
        mebibytes = flows.memory_bytes() >> 20,
        "flow table allocated"
    );
    let shared = Shared {
        tables: Arc::clone(&tables),
        flows,
        clock: Clock::start(),
        reports: Arc::new(reports),
        fragments: Arc::new(Fragments::default()),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let xsk_config = XskConfig {
        zero_copy: config.zero_copy,
        busy_poll: config.busy_poll,
        ..XskConfig::default()
    };
    // Everything that can fail for lack of a resource (a busy queue, a taken admin port) comes
    // before the filter is attached, so a failed start never disturbs a running xlb.
    let interfaces: Vec<String> = ports.iter().map(|p| p.name.clone()).collect();
    let mut sockets = Vec::new();
    for i in 0..config.cores.len() {
        let queue = config.queue + u32::try_from(i).unwrap_or(0);
        sockets.push(
            XskIo::open(&interfaces, queue, &xsk_config, &filter)
                .map_err(|e| Error::Socket(e.to_string()))?,
        );
    }
    let listener = std::net::TcpListener::bind(config.admin).map_err(Error::resource(format!(
        "listen on {} for the admin API",
        config.admin
    )))?;
    let health_listener = match health.as_ref().and_then(|h| h.2) {
        Some(at) => Some(
            std::net::TcpListener::bind(at).map_err(Error::resource(format!(
                "listen on {at} for the health server (kubernetes.health_address)"
            )))?,
        ),
        None => None,
    };
    for port in &ports {
        filter
            .attach(port.ifindex, mode)
            .map_err(|e| Error::Interface {
                interface: port.name.clone(),
                reason: e.to_string(),
            })?;
        info!(interface = %port.name, ?mode, "XDP filter attached");
    }
    if let Some(node) = &node {
        filter
            .mark_link(node.peer.ifindex)
            .map_err(|e| Error::Interface {
                interface: node.peer.name.clone(),
                reason: e.to_string(),
            })?;
    }

    let mut workers = Vec::new();
    let mut stats = Vec::new();
    for (i, (&core, mut io)) in config.cores.iter().zip(sockets).enumerate() {
        let queue = config.queue + u32::try_from(i).unwrap_or(0);
        let worker_stats = Arc::new(WorkerStats::new(ports.len()));
        stats.push(Arc::clone(&worker_stats));
        let snat = snat_pool(&config, i);
        let mut worker = Worker::new(
            shared.clone(),
            ports.len(),
            snat,
            worker_stats,
            0x9e37_79b9 + i as u64,
        );
        if let Some(hop) = hand_back {
            worker = worker.handing_back(hop);
        }
        if config.mode == ModeConfig::Dsr {
            worker = match &config.dsr {
                Some(d) => worker.encapsulating(Encapsulation {
                    ipv4: d.ipv4.map(|a| key_addr(a.into())),
                    ipv6: d.ipv6.map(|a| key_addr(a.into())),
                    mtu: d.mtu,
                }),
                None => worker.direct_server_return(),
            };
        }
        let stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("xlb-worker-{i}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    warn!(core, "cannot pin the worker; it runs unpinned");
                }
                // Relaxed: the flag is the only thing communicated; the join orders the rest.
                worker.run(&mut io, || stop.load(Ordering::Relaxed));
            })
            .map_err(Error::resource(format!("start worker {i}")))?;
        info!(worker = i, core, queue, "worker started");
        workers.push(thread);
    }

    let admin_state = Arc::new(AdminState {
        tables: Arc::clone(&tables),
        flows: Arc::clone(&shared.flows),
        clock: shared.clock,
        workers: stats,
        ports: ports.iter().map(|p| p.name.clone()).collect(),
        generation: std::sync::atomic::AtomicU64::new(publisher.generation()),
        sync_seconds: crate::admin::sync_histogram(),
        live_entries: std::sync::atomic::AtomicU64::new(0),
        filter_counts: ArcSwap::from_pointee(FilterCounts::default()),
        kube: kube.as_ref().map(|k| Arc::clone(k.metrics())),
        config_hash: std::sync::atomic::AtomicU64::new(loaded_hash.unwrap_or(0)),
        config_generation: std::sync::atomic::AtomicU64::new(config.generation.unwrap_or(0)),
    });
    let (file, unwatched) = FileSource::new(path, loaded_hash);
    if let Some(why) = unwatched {
        warn!(error = %why, "cannot watch the configuration's directory; edits are seen within a second");
    }
    let mut control = Control {
        config,
        publisher,
        kernel,
        filter,
        shared,
        admin: Arc::clone(&admin_state),
        file,
        to_resolve: backends_of(tables.load().snapshot.services()),
        wake,
        health: None,
        node,
        local,
    };
    control.steer_node();
    let admin_server = admin::spawn(listener, Arc::clone(&admin_state))
        .map_err(Error::resource("start the admin API"))?;
    info!(address = %control.config.admin, "admin API listening");
    if let Some((proxy, at, address)) = health {
        let server = HealthServer::spawn(health_listener, Arc::clone(&proxy), at)
            .map_err(Error::resource("start the health server"))?;
        if let Some(address) = address {
            info!(%address, "health server listening (/healthz, /livez)");
        }
        control.health = Some((proxy, server));
    }
    let chores = crate::chores::spawn(
        control.shared.clone(),
        Arc::clone(&admin_state),
        Arc::clone(&stop),
    )
    .map_err(Error::resource("start the housekeeping thread"))?;
    let result = runtime.block_on(control.serve(kube));
    // Relaxed: see the worker's load.
    stop.store(true, Ordering::Relaxed);
    for thread in workers {
        let _ = thread.join();
    }
    let _ = chores.join();
    drop(admin_server);
    for (worker, stats) in admin_state.workers.iter().enumerate() {
        for (port, s) in stats.sockets().iter().enumerate() {
            info!(worker, port, ?s, "AF_XDP socket statistics at stop");
        }
    }
    // Dropping `control` drops the filter, which detaches it from every port.
    drop(control);
    info!("stopped; XDP filter detached");
    result
}

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
            "flow table full of established flows: a new flow was not recorded (forwarded without state in dnat mode, dropped in snat mode); raise flow_capacity"
        ),
        NoticeKind::NoSnatPort => warn!(
            %proto, %from, %to,
            "no free snat port for a new flow: dropped; widen snat.first_port..last_port"
        ),
    }
}

/// This machine's memory in bytes (MemTotal of /proc/meminfo), if it can be read.
fn memory_total() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The backend addresses of `services`, as next-hop keys.
fn backends_of<'a>(
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

/// The Kubernetes source for `k`: a client from the kubeconfig named, or the in-cluster
/// service account, or `$KUBECONFIG` / `~/.kube/config`. Nothing is requested yet: an API
/// server that does not answer is retried with backoff once the control loop runs.
async fn kube_source(
    k: &KubernetesConfig,
    node_name: Option<String>,
    addresses: Vec<std::net::IpAddr>,
) -> Result<KubeSource, Error> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                Error::Kubernetes(format!("kubernetes.kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    Error::Kubernetes(format!("kubernetes.kubeconfig {}: {e}", path.display()))
                })?
        }
        None => kube::Config::infer().await.map_err(|e| {
            Error::Kubernetes(format!(
                "no in-cluster service account and no kubeconfig ({e}); set kubernetes.kubeconfig"
            ))
        })?,
    };
    let url = config.cluster_url.clone();
    let node = k.node_name.clone().or(node_name).ok_or_else(|| {
        Error::Kubernetes(
            "this node's name is needed (kubernetes.node_name, --node-name or NODE_NAME)".into(),
        )
    })?;
    let node_port_addresses: Vec<std::net::IpAddr> = addresses
        .into_iter()
        .filter(|a| {
            k.node_port_addresses.is_empty() || k.node_port_addresses.iter().any(|c| c.contains(*a))
        })
        .collect();
    info!(api = %url, node = %node, ?node_port_addresses, "watching Services and EndpointSlices");
    let node = NodeContext {
        name: node,
        zone: None,
        node_port_addresses,
    };
    let options = SourceOptions {
        min_sync: Duration::from_millis(k.min_sync_period_ms),
        ..SourceOptions::default()
    };
    KubeSource::new(config, node, options, Arc::new(KubeMetrics::default()))
        .map_err(|e| Error::Kubernetes(format!("cannot make a client for {url}: {e}")))
}

/// Worker `worker`'s SNAT pool: in snat mode for every flow; in dnat mode, when the file
/// gives addresses, for hairpin flows and clients outside `cluster_cidrs` (detect-local).
fn snat_pool(config: &Config, worker: usize) -> Option<SnatPool> {
    let snat = config.snat.as_ref()?;
    let masquerade = match config.mode {
        ModeConfig::Dsr => return None,
        ModeConfig::Snat => Masquerade::All,
        ModeConfig::Dnat => Masquerade::Outside(PrefixMap::new(
            config.cluster_cidrs.iter().map(|c| (c.prefix(), ())),
        )),
    };
    // Each worker its own slice of the port range, so workers never hand out the same port.
    let workers = u32::try_from(config.cores.len().max(1)).unwrap_or(1);
    let range = u32::from(snat.last_port) - u32::from(snat.first_port) + 1;
    let share = (range / workers).max(1);
    let first = u32::from(snat.first_port) + share * u32::try_from(worker).unwrap_or(0);
    Some(
        SnatPool::new(
            snat.ipv4,
            snat.ipv6,
            u16::try_from(first).unwrap_or(u16::MAX),
            u16::try_from(share).unwrap_or(u16::MAX),
        )
        .masquerading(masquerade),
    )
}

struct Control {
    config: Config,
    publisher: Publisher,
    kernel: Kernel,
    filter: XdpFilter,
    shared: Shared,
    admin: Arc<AdminState>,
    /// The configuration file: its content hash and the watch of its directory.
    file: FileSource,
    /// Backend addresses whose next hops to look for at the next round.
    to_resolve: Vec<(Family, [u8; 16])>,
    /// Notified by workers that reported something.
    wake: Arc<tokio::sync::Notify>,
    /// kube-proxy's health servers (with the Kubernetes source).
    health: Option<(Arc<ProxyHealth>, HealthServer)>,
    /// On a node, its link (last: removed after the filter is detached).
    node: Option<NodeLink>,
    /// The node's own addresses (for the link's steering).
    local: Arc<Vec<std::net::IpAddr>>,
}

impl Control {
    async fn serve(&mut self, mut kube: Option<KubeSource>) -> Result<(), Error> {
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
    fn steer_node(&self) {
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
