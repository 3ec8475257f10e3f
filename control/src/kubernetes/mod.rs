//! Kubernetes objects → desired state: the pure translation the Kubernetes source ends in,
//! with kube-proxy's semantics.
//!
//! In two steps, so that the source can keep a compact digest of each object rather than the
//! object (a Service and its 10-endpoint EndpointSlice take ~7 KB as k8s-openapi structs,
//! ~0.6 KB as views): [`ServiceView::of`] and [`SliceView::of`] (the `views` submodule) read
//! what translation needs from one object (and say what they skipped), [`translate_views`]
//! (here) turns a Service's view and its slices' views into desired Services for this node.
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
use k8s_openapi::api::discovery::v1::EndpointSlice;

mod views;
pub use views::{local_ready_endpoints, ServiceView, SliceView, Zones};
use views::{Distribution, EndpointView, PortView};

use crate::desired::{BackendState, NoBackend};
use crate::desired::{DesiredBackend, DesiredService, TrafficPolicy, VipKind};

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
