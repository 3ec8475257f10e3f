//! Kubernetes objects → desired state: the pure translation the Kubernetes source ends in,
//! with kube-proxy's semantics.
//!
//! In two steps, so that the source can keep a compact digest of each object rather than the
//! object (a Service and its 10-endpoint EndpointSlice take ~7 KB as k8s-openapi structs,
//! ~0.6 KB as views): [`ServiceView::of`] and [`SliceView::of`] read what translation needs
//! from one object (and say what they skipped), [`translate_views`] turns a Service's view
//! and its slices' views into desired Services for this node.
//!
//! Owns: which Services xlb handles (not headless, not ExternalName, not labelled for another
//! proxy), their VIPs (clusterIPs; LoadBalancer ingress IPs unless their `ipMode` is `Proxy`;
//! externalIPs; ingress and external IPs only of the Service's own IP families) and node
//! ports (on this node's addresses, for NodePort and LoadBalancer Services), ports (TCP, UDP
//! and SCTP; anything else reported as unsupported), endpoints merged from all EndpointSlices of a Service
//! and de-duplicated (a ready copy wins over a terminating one; only an endpoint's first
//! address counts), endpoint conditions (KEP-1669, as kube-proxy reads them: `ready` unset or
//! true takes new flows even if terminating; not ready but serving (unset counts as serving)
//! and terminating keeps its flows and takes new ones only when nothing is ready), traffic
//! policies (internalTrafficPolicy / externalTrafficPolicy Local: node-local endpoints only;
//! none there while others exist drops, as kube-proxy does, where no endpoint at all rejects;
//! node ports follow the external policy), `loadBalancerSourceRanges` (on the ingress IPs
//! only), trafficDistribution (PreferSameZone / PreferClose, PreferSameNode, with fallback),
//! session affinity, and xlb's annotations (`xlb.io/scheduler`, `xlb.io/maglev-table-size`).
//! kube-proxy's `pkg/proxy` (`endpointslicecache.go`, `servicechangetracker.go`, the nftables
//! proxier) is the reference; the fixtures in `tests/kubernetes_translate.rs` cite it.
//!
//! Must not know: the API server, watches, time; packets.

use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashMap;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use xlb_dataplane::lb::maglev::is_valid_table_size;

use crate::desired::{BackendState, NoBackend, Protocol, Scheduler};
use crate::desired::{Cidr, DesiredBackend, DesiredService, TrafficPolicy, VipKind};

/// The label of EndpointSlices naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy.
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// kube-proxy's default session affinity timeout.
const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// Where xlb runs, for node-local policies, topology and node ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name.
    pub name: String,
    /// This node's zone (`topology.kubernetes.io/zone`), if known.
    pub zone: Option<String>,
    /// The addresses node ports are served on (kube-proxy's `--nodeport-addresses`).
    pub node_port_addresses: Vec<IpAddr>,
}

impl NodeContext {
    /// The node called `name`, zone unknown, serving no node port.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }
}

/// Something the translation skipped or defaulted, for a warning log and a counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `namespace/name` of the object.
    pub object: String,
    /// The kind of problem (a counter label).
    pub kind: &'static str,
    /// What, for people.
    pub message: String,
}

/// The translation of a set of objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// What the dataplane should serve.
    pub services: Vec<DesiredService>,
    /// What was skipped or defaulted.
    pub warnings: Vec<Warning>,
}

/// trafficDistribution, as far as xlb acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Distribution {
    Any,
    SameZone,
    SameNode,
}

/// A Service port xlb forwards (or an EndpointSlice's port, without a node port).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PortView {
    name: Box<str>,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
}

/// What translation reads of a Service xlb handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    name: Arc<str>,
    /// VIPs with their kind.
    vips: Box<[(IpAddr, VipKind)]>,
    /// Which IP families the Service has (IPv4, IPv6), for node ports.
    families: (bool, bool),
    ports: Box<[PortView]>,
    /// `loadBalancerSourceRanges`, for the ingress IPs.
    source_ranges: Arc<[Cidr]>,
    scheduler: Scheduler,
    table_size: Option<u32>,
    affinity_timeout: Option<u32>,
    internal_local: bool,
    external_local: bool,
    distribution: Distribution,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with externalTrafficPolicy
    /// Local: where external load balancers ask whether this node has endpoints.
    health_check_port: Option<u16>,
}

/// One address of an endpoint that may take or keep flows.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointView {
    address: IpAddr,
    state: BackendState,
    /// Whether it runs on this node.
    local: bool,
    zone: Option<Arc<str>>,
}

/// What translation reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    ipv6: bool,
    ports: Box<[PortView]>,
    endpoints: Box<[EndpointView]>,
}

/// Shares the few distinct zone names among all endpoints.
#[derive(Debug, Default)]
pub struct Zones(HashMap<Box<str>, Arc<str>>);

impl Zones {
    fn intern(&mut self, zone: &str) -> Arc<str> {
        if let Some(z) = self.0.get(zone) {
            return Arc::clone(z);
        }
        let z: Arc<str> = Arc::from(zone);
        self.0.insert(zone.into(), Arc::clone(&z));
        z
    }
}

/// Translates Services and EndpointSlices (all namespaces) as seen from `node`.
#[must_use]
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> Translation {
    let mut zones = Zones::default();
    let mut by_service: HashMap<(Option<&str>, &str), Vec<SliceView>> = HashMap::new();
    for slice in slices {
        if let (Some(name), Some(view)) = (
            service_of(slice),
            SliceView::of(slice, &node.name, &mut zones),
        ) {
            by_service
                .entry((slice.metadata.namespace.as_deref(), name))
                .or_default()
                .push(view);
        }
    }
    let mut out = Translation::default();
    for service in services {
        let meta = &service.metadata;
        let Some(view) = ServiceView::of(service, &mut out.warnings) else {
            continue;
        };
        let own: Vec<&SliceView> = by_service
            .get(&(
                meta.namespace.as_deref(),
                meta.name.as_deref().unwrap_or(""),
            ))
            .into_iter()
            .flatten()
            .collect();
        out.services.extend(translate_views(&view, &own, node));
    }
    out
}

/// The name of the Service an EndpointSlice belongs to (its `kubernetes.io/service-name`
/// label), in the slice's namespace.
#[must_use]
pub fn service_of(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
}

/// `namespace/name` of an object.
#[must_use]
pub fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

impl ServiceView {
    /// What translation needs of `service`, or `None` when xlb does not handle it (headless,
    /// ExternalName, another proxy's, no VIP). What it skips or defaults goes to `warnings`.
    #[must_use]
    pub fn of(service: &Service, warnings: &mut Vec<Warning>) -> Option<Self> {
        let meta = &service.metadata;
        let spec = service.spec.as_ref()?;
        if meta
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(PROXY_NAME_LABEL))
        {
            return None;
        }
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let name: Arc<str> = Arc::from(object_name(meta));
        let mut warn = |kind, message: String| {
            warnings.push(Warning {
                object: name.to_string(),
                kind,
                message,
            });
        };
        let mut vips: Vec<(IpAddr, VipKind)> = Vec::new();
        let cluster_ips: Vec<&String> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().collect(),
            _ => spec.cluster_ip.iter().collect(),
        };
        for ip in cluster_ips {
            if ip == "None" || ip.is_empty() {
                continue; // headless
            }
            match ip.parse() {
                Ok(addr) => vips.push((addr, VipKind::ClusterIp)),
                Err(_) => warn("bad-address", format!("clusterIP {ip:?} is not an address")),
            }
        }
        // The Service's families: ipFamilies, or those of its cluster IPs.
        let families = match &spec.ip_families {
            Some(f) if !f.is_empty() => {
                (f.iter().any(|f| f == "IPv4"), f.iter().any(|f| f == "IPv6"))
            }
            _ => (
                vips.iter().any(|(a, _)| a.is_ipv4()),
                vips.iter().any(|(a, _)| a.is_ipv6()),
            ),
        };
        let of_family = |a: &IpAddr| if a.is_ipv4() { families.0 } else { families.1 };
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        // An ingress IP whose ipMode is Proxy is the load balancer's own: it proxies to node
        // ports, and traffic to the IP must not be captured on the node (KEP-1860).
        let ingress_ips = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_ref())
            .map(|ip| (ip, VipKind::LoadBalancer));
        let external_ips = spec
            .external_ips
            .iter()
            .flatten()
            .map(|ip| (ip, VipKind::ExternalIp));
        for (ip, kind) in ingress_ips.chain(external_ips) {
            match ip.parse::<IpAddr>() {
                // An address of a family the Service does not have: kube-proxy ignores it.
                Ok(addr) if !of_family(&addr) => {}
                Ok(addr) => vips.push((addr, kind)),
                Err(_) => warn(
                    "bad-address",
                    format!("external address {ip:?} is not an address"),
                ),
            }
        }
        if vips.is_empty() {
            return None;
        }
        let mut source_ranges = Vec::new();
        for range in spec.load_balancer_source_ranges.iter().flatten() {
            match range.trim().parse::<Cidr>() {
                Ok(cidr) => source_ranges.push(cidr),
                Err(e) => warn("bad-address", format!("loadBalancerSourceRanges: {e}")),
            }
        }
        let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let annotations = meta.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let scheduler = match annotation("xlb.io/scheduler") {
            None | Some("maglev") => Scheduler::Maglev,
            Some("random") => Scheduler::Random,
            Some("round-robin") => Scheduler::RoundRobin,
            Some("least-connections") => Scheduler::LeastConnections,
            Some(other) => {
                warn("bad-annotation", format!("xlb.io/scheduler {other:?} is not maglev, random, round-robin or least-connections; using maglev"));
                Scheduler::Maglev
            }
        };
        let table_size = match annotation("xlb.io/maglev-table-size") {
            None => None,
            Some(v) => match v.parse::<u32>() {
                Ok(m) if is_valid_table_size(m) => Some(m),
                _ => {
                    warn("bad-annotation", format!("xlb.io/maglev-table-size {v:?} is not a prime from 251 to 131071; using the automatic size"));
                    None
                }
            },
        };
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => {
                    warn(
                        "unsupported-protocol",
                        format!("port {} is {other}, which xlb does not forward", port.port),
                    );
                    continue;
                }
            };
            let Ok(number) = u16::try_from(port.port) else {
                warn("bad-port", format!("port {} is out of range", port.port));
                continue;
            };
            // allocateLoadBalancerNodePorts false: no node port was allocated, none served.
            let node_port = port
                .node_port
                .filter(|_| node_ports)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0);
            ports.push(PortView {
                name: port.name.as_deref().unwrap_or("").into(),
                protocol,
                port: number,
                node_port,
            });
        }
        Some(Self {
            name,
            vips: vips.into(),
            families,
            ports: ports.into(),
            source_ranges: source_ranges.into(),
            scheduler,
            table_size,
            affinity_timeout,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            distribution: match spec.traffic_distribution.as_deref() {
                Some("PreferSameNode") => Distribution::SameNode,
                Some("PreferSameZone" | "PreferClose") => Distribution::SameZone,
                _ => Distribution::Any,
            },
            // kube-proxy serves it only for these Services (ServiceChangeTracker:
            // `ExternalPolicyLocal() && HealthCheckNodePort != 0`).
            health_check_port: spec
                .health_check_node_port
                .filter(|_| spec.type_.as_deref() == Some("LoadBalancer"))
                .filter(|_| spec.external_traffic_policy.as_deref() == Some("Local"))
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0),
        })
    }

    /// The Service's `namespace/name`.
    #[must_use]
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its healthCheckNodePort, for a LoadBalancer Service with externalTrafficPolicy Local.
    #[must_use]
    pub fn health_check_port(&self) -> Option<u16> {
        self.health_check_port
    }
}

/// The Service's ready endpoints on this node, as kube-proxy counts them for its
/// healthCheckNodePort answer (`EndpointsMap.LocalReadyEndpoints`): distinct address and
/// target port pairs over all the Service's ports, local and ready (terminating ones are not
/// counted, so that load balancers drain the node).
#[must_use]
pub fn local_ready_endpoints(service: &ServiceView, slices: &[&SliceView]) -> u32 {
    let mut seen: Vec<(IpAddr, u16)> = Vec::new();
    for port in service.ports.iter() {
        for slice in slices {
            let Some(target) = slice.port(port) else {
                continue;
            };
            seen.extend(
                slice
                    .endpoints
                    .iter()
                    .filter(|e| e.local && e.state == BackendState::Ready)
                    .map(|e| (e.address, target.port)),
            );
        }
    }
    seen.sort_unstable();
    seen.dedup();
    u32::try_from(seen.len()).unwrap_or(u32::MAX)
}

impl SliceView {
    /// The slice's port for a Service port: the one with its name and protocol (both
    /// unnamed for a single-port Service).
    fn port(&self, service_port: &PortView) -> Option<&PortView> {
        self.ports
            .iter()
            .find(|p| p.name == service_port.name && p.protocol == service_port.protocol)
    }

    /// What translation needs of `slice` as seen from the node `node` (`None` for an address
    /// type xlb cannot forward to, such as FQDN). Endpoints that neither take nor keep flows,
    /// and addresses that do not parse, are left out.
    #[must_use]
    pub fn of(slice: &EndpointSlice, node: &str, zones: &mut Zones) -> Option<Self> {
        let ipv6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => return None,
        };
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    "SCTP" => Protocol::Sctp,
                    _ => return None,
                };
                Some(PortView {
                    name: p.name.as_deref().unwrap_or("").into(),
                    protocol,
                    port: p.port.and_then(|n| u16::try_from(n).ok())?,
                    node_port: None,
                })
            })
            .collect();
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        for endpoint in &slice.endpoints {
            let Some(state) = state(endpoint) else {
                continue;
            };
            let local = endpoint.node_name.as_deref() == Some(node);
            let zone = endpoint.zone.as_deref().map(|z| zones.intern(z));
            // Only the first address counts (the API says consumers must use it; the others
            // are unused), as kube-proxy does.
            if let Some(Ok(address)) = endpoint.addresses.first().map(|a| a.parse::<IpAddr>()) {
                endpoints.push(EndpointView {
                    address,
                    state,
                    local,
                    zone,
                });
            }
        }
        Some(Self {
            ipv6,
            ports,
            endpoints: endpoints.into(),
        })
    }
}

/// Translates one Service's view with its slices' views, for `node`: one desired Service per
/// port and VIP, and per node port and node address.
#[must_use]
pub fn translate_views(
    service: &ServiceView,
    slices: &[&SliceView],
    node: &NodeContext,
) -> Vec<DesiredService> {
    let node_ports = node.node_port_addresses.iter().filter(|a| {
        if a.is_ipv4() {
            service.families.0
        } else {
            service.families.1
        }
    });
    let mut out = Vec::with_capacity(service.ports.len() * service.vips.len());
    for port in service.ports.iter() {
        let at_node_ports = port
            .node_port
            .into_iter()
            .flat_map(|n| node_ports.clone().map(move |a| (*a, n, VipKind::NodePort)));
        let vips = service.vips.iter().map(|&(a, kind)| (a, port.port, kind));
        for (vip, vip_port, kind) in vips.chain(at_node_ports) {
            let all = endpoints(slices, port, vip);
            let local_only = if kind == VipKind::ClusterIp {
                service.internal_local
            } else {
                service.external_local
            };
            // kube-proxy rejects traffic to a Service without endpoints, and drops traffic
            // that a Local policy leaves without one (there are endpoints, elsewhere).
            let mut no_backend = NoBackend::Reject;
            let chosen: Vec<(&EndpointView, u16)> = if local_only {
                let local: Vec<_> = all.iter().copied().filter(|(e, _)| e.local).collect();
                if local.is_empty() && !all.is_empty() {
                    no_backend = NoBackend::Drop;
                }
                local
            } else {
                prefer(all, service.distribution, node.zone.as_deref())
            };
            out.push(DesiredService {
                name: format!("{}:{}", service.name, port.name),
                vip,
                port: vip_port,
                protocol: port.protocol,
                backends: chosen
                    .into_iter()
                    .map(|(e, port)| DesiredBackend {
                        address: e.address,
                        port,
                        weight: 1,
                        state: e.state,
                        local: e.local,
                    })
                    .collect(),
                scheduler: service.scheduler,
                affinity_timeout: service.affinity_timeout,
                no_backend,
                table_size: service.table_size,
                kind,
                source_ranges: if kind == VipKind::LoadBalancer {
                    Arc::clone(&service.source_ranges)
                } else {
                    Arc::from([])
                },
                traffic_policy: if local_only {
                    TrafficPolicy::Local
                } else {
                    TrafficPolicy::Cluster
                },
            });
        }
    }
    out
}

/// Up to this many endpoints, duplicates are found by scanning.
const SCAN_UP_TO: usize = 32;

/// The Service port's endpoints of the VIP's family, merged over all slices, de-duplicated,
/// each with the target port its slice gives.
fn endpoints<'a>(
    slices: &[&'a SliceView],
    port: &PortView,
    vip: IpAddr,
) -> Vec<(&'a EndpointView, u16)> {
    // Where each (address, port) is in `out`: found by a scan while `out` is short (most
    // Services), by a map once it is not.
    let mut seen: HashMap<(IpAddr, u16), usize> = HashMap::new();
    let mut out: Vec<(&'a EndpointView, u16)> = Vec::new();
    let find = |out: &[(&EndpointView, u16)], seen: &HashMap<(IpAddr, u16), usize>, key| {
        if out.len() <= SCAN_UP_TO {
            out.iter().position(|(e, p)| (e.address, *p) == key)
        } else {
            seen.get(&key).copied()
        }
    };
    for slice in slices.iter().filter(|s| s.ipv6 == vip.is_ipv6()) {
        let Some(target) = slice.port(port) else {
            continue;
        };
        for endpoint in slice.endpoints.iter() {
            let key = (endpoint.address, target.port);
            match find(&out, &seen, key) {
                // An endpoint in several slices (a slice being rebalanced, a pod terminating
                // in one and ready in another): the ready copy wins, as in kube-proxy's
                // endpointslicecache.
                Some(at) => {
                    if endpoint.state == BackendState::Ready {
                        out[at] = (endpoint, target.port);
                    }
                }
                None => {
                    out.push((endpoint, target.port));
                    if out.len() == SCAN_UP_TO + 1 {
                        seen.extend(
                            out.iter()
                                .enumerate()
                                .map(|(i, (e, p))| ((e.address, *p), i)),
                        );
                    } else if out.len() > SCAN_UP_TO {
                        seen.insert(key, out.len() - 1);
                    }
                }
            }
        }
    }
    out
}

/// An endpoint's condition (KEP-1669), read as kube-proxy reads it (`endpointslicecache.go`:
/// `Ready == nil || *Ready`, `Serving == nil || *Serving`, `Terminating != nil &&
/// *Terminating`; `topology.go` takes ready endpoints, else serving and terminating ones):
/// ready takes new flows (even when terminating); not ready but serving and terminating keeps
/// its flows and takes new ones only when nothing is ready; anything else is left out.
fn state(endpoint: &Endpoint) -> Option<BackendState> {
    let c = endpoint.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(true);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        Some(BackendState::Ready)
    } else if serving && terminating {
        Some(BackendState::Terminating)
    } else {
        None
    }
}

/// trafficDistribution: the preferred subset when it has an endpoint that takes new flows,
/// else everything.
fn prefer<'a>(
    all: Vec<(&'a EndpointView, u16)>,
    distribution: Distribution,
    zone: Option<&str>,
) -> Vec<(&'a EndpointView, u16)> {
    let usable =
        |set: &[(&EndpointView, u16)]| set.iter().any(|(e, _)| e.state == BackendState::Ready);
    let preferred: Vec<(&'a EndpointView, u16)> = match distribution {
        Distribution::Any => return all,
        Distribution::SameNode => all.iter().copied().filter(|(e, _)| e.local).collect(),
        Distribution::SameZone => Vec::new(),
    };
    if usable(&preferred) {
        return preferred;
    }
    let same_zone: Vec<(&'a EndpointView, u16)> = all
        .iter()
        .copied()
        .filter(|(e, _)| zone.is_some() && e.zone.as_deref() == zone)
        .collect();
    if usable(&same_zone) {
        same_zone
    } else {
        all
    }
}
