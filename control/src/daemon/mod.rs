//! `xlb run`: starts the dataplane from a configuration file and keeps it in step.
//!
//! Owns the process's lifecycle: load and attach the XDP filter, open one worker's AF_XDP
//! sockets per core and pin the worker there, then run the control loop on a tokio runtime
//! on the calling thread (never on a worker core) — the `control` submodule: it publishes
//! the file's edits (an invalid edit keeps the last good snapshot, logged) and the Kubernetes
//! source's batches (the file's Services keep serving while the API server is away), keeps
//! next hops in step with the kernel, and logs what workers notice — and on SIGINT or SIGTERM
//! stop the workers and detach the filter. The admin API runs on a thread of its own
//! ([`crate::admin`]), and whole-table chores (least-connections recounts, the live-entry
//! gauge) on another ([`crate::chores`]): nothing slow runs on the control loop.
//!
//! Must not know: packet bytes (workers and the dataplane own them).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::{info, warn};
use xlb_dataplane::lb::decide::{Masquerade, SnatPool};
use xlb_dataplane::lb::flow::{FlowTable, Timeouts};
use xlb_dataplane::lb::fragments::Fragments;
use xlb_dataplane::lb::prefix::PrefixMap;
use xlb_dataplane::lb::snapshot::Snapshot;
use xlb_dataplane::packet::{key_addr, Family};
use xlb_dataplane::worker::{Clock, Encapsulation, Reports, Shared, Tables, Worker, WorkerStats};
use xlb_dataplane::xsk::{FilterCounts, XdpFilter, XdpMode, XskConfig, XskIo};

mod control;

use control::{backends_of, Control};

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError, KubernetesConfig, ModeConfig, XdpModeConfig};
use crate::error::Error;
use crate::file_source::{content_hash, FileSource};
use crate::health::{HealthServer, ProxyHealth};
use crate::kube_source::{KubeMetrics, KubeSource, SourceOptions};
use crate::kubernetes::NodeContext;
use crate::netlink::{Kernel, Port};
use crate::node_link::NodeLink;
use crate::publish::Publisher;

/// The capabilities `xlb run` needs when not root, no more: BPF programs and maps (BPF, and
/// PERFMON for the verifier), attaching XDP (NET_ADMIN), AF_XDP sockets (NET_RAW), locking the
/// UMEM (IPC_LOCK). The netns test runs xlb with exactly these; the DaemonSet and the systemd
/// unit grant exactly these.
pub const CAPABILITIES: [&str; 5] = ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "IPC_LOCK"];

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
    let (ipv4, ipv6) = (config.flow_capacity, config.ipv6_flow_capacity());
    let table_bytes = FlowTable::memory_for(ipv4, ipv6);
    if let Some(total) = memory_total() {
        if table_bytes > total / 2 {
            return Err(ConfigError::invalid(format!(
                "flow_capacity: {ipv4} IPv4 and {ipv6} IPv6 entries take {} MiB, more than half \
                 of this machine's {} MiB",
                table_bytes >> 20,
                total >> 20
            ))
            .into());
        }
    }
    let flows = Arc::new(FlowTable::with_capacities(ipv4, ipv6, Timeouts::default()));
    info!(
        ipv4 = flows.capacity_of(Family::Ipv4),
        ipv6 = flows.capacity_of(Family::Ipv6),
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
        sync_seconds: crate::admin::SyncHistogram::default(),
        live_entries: Default::default(),
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
