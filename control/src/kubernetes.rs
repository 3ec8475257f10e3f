//! Kubernetes objects → desired state: the pure translation the Kubernetes source ends in,
//! with kube-proxy's semantics.
//!
//! Owns: which Services xlb handles (not headless, not ExternalName, not labelled for another
//! proxy), their VIPs (clusterIPs, LoadBalancer ingress IPs, externalIPs), ports (TCP and UDP;
//! SCTP reported as unsupported), endpoints merged from all EndpointSlices of a Service and
//! de-duplicated, endpoint conditions (KEP-1669: ready takes new flows; serving + terminating
//! keeps its flows and takes new ones only when nothing is ready), traffic policies
//! (internalTrafficPolicy / externalTrafficPolicy Local: node-local endpoints only, none means
//! none), trafficDistribution (PreferSameZone / PreferClose, PreferSameNode, with fallback),
//! session affinity, and xlb's annotations (`xlb.io/scheduler`, `xlb.io/maglev-table-size`).
//!
//! Must not know: the API server, watches, time; packets.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use xlb_dataplane::lb::maglev::is_valid_table_size;

use crate::config::{BackendStateConfig, NoBackendConfig, ProtocolConfig, SchedulerConfig};
use crate::desired::{DesiredBackend, DesiredService};

/// The label of EndpointSlices naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy.
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// kube-proxy's default session affinity timeout.
const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// Where xlb runs, for node-local policies and topology.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name.
    pub name: String,
    /// This node's zone (`topology.kubernetes.io/zone`), if known.
    pub zone: Option<String>,
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
    let mut by_service: HashMap<(Option<&str>, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        if let Some(name) = service_of(slice) {
            by_service
                .entry((slice.metadata.namespace.as_deref(), name))
                .or_default()
                .push(slice);
        }
    }
    let mut out = Translation::default();
    for service in services {
        let meta = &service.metadata;
        let own = by_service
            .get(&(
                meta.namespace.as_deref(),
                meta.name.as_deref().unwrap_or(""),
            ))
            .map_or(&[][..], Vec::as_slice);
        translate_service(service, own, node, &mut out);
    }
    out
}

/// Translates one Service with its own EndpointSlices (those labelled with its name, in its
/// namespace) as seen from `node`.
#[must_use]
pub fn translate_one(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Translation {
    let mut out = Translation::default();
    translate_service(service, slices, node, &mut out);
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

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

fn translate_service(
    service: &Service,
    own_slices: &[&EndpointSlice],
    node: &NodeContext,
    out: &mut Translation,
) {
    let meta = &service.metadata;
    let name = object_name(meta);
    let Some(spec) = &service.spec else { return };
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(PROXY_NAME_LABEL))
    {
        return;
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let warn = |out: &mut Translation, kind, message: String| {
        out.warnings.push(Warning {
            object: name.clone(),
            kind,
            message,
        });
    };
    // VIPs, each with whether it is internal (cluster IPs) or external.
    let mut vips: Vec<(IpAddr, bool)> = Vec::new();
    let cluster_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    for ip in cluster_ips {
        if ip == "None" || ip.is_empty() {
            continue; // headless
        }
        match ip.parse() {
            Ok(addr) => vips.push((addr, true)),
            Err(_) => warn(
                out,
                "bad-address",
                format!("clusterIP {ip:?} is not an address"),
            ),
        }
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    let external = ingress
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .chain(spec.external_ips.iter().flatten().cloned());
    for ip in external {
        match ip.parse() {
            Ok(addr) => vips.push((addr, false)),
            Err(_) => warn(
                out,
                "bad-address",
                format!("external address {ip:?} is not an address"),
            ),
        }
    }
    if vips.is_empty() {
        return;
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let scheduler = match annotations.get("xlb.io/scheduler").map(String::as_str) {
        None | Some("maglev") => SchedulerConfig::Maglev,
        Some("random") => SchedulerConfig::Random,
        Some("round-robin") => SchedulerConfig::RoundRobin,
        Some("least-connections") => SchedulerConfig::LeastConnections,
        Some(other) => {
            warn(out, "bad-annotation", format!("xlb.io/scheduler {other:?} is not maglev, random, round-robin or least-connections; using maglev"));
            SchedulerConfig::Maglev
        }
    };
    let table_size = match annotations.get("xlb.io/maglev-table-size") {
        None => None,
        Some(v) => match v.parse::<u32>() {
            Ok(m) if is_valid_table_size(m) => Some(m),
            _ => {
                warn(out, "bad-annotation", format!("xlb.io/maglev-table-size {v:?} is not a prime from 251 to 131071; using the automatic size"));
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
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let distribution = spec.traffic_distribution.as_deref();
    for port in spec.ports.iter().flatten() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => ProtocolConfig::Tcp,
            "UDP" => ProtocolConfig::Udp,
            other => {
                warn(
                    out,
                    "unsupported-protocol",
                    format!("port {} is {other}, which xlb does not forward", port.port),
                );
                continue;
            }
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            warn(
                out,
                "bad-port",
                format!("port {} is out of range", port.port),
            );
            continue;
        };
        for &(vip, internal) in &vips {
            let all = endpoints(own_slices, port, protocol, vip);
            let local_only = if internal {
                internal_local
            } else {
                external_local
            };
            let chosen: Vec<&(DesiredBackend, EndpointInfo)> = if local_only {
                all.iter()
                    .filter(|(_, e)| e.node.as_deref() == Some(node.name.as_str()))
                    .collect()
            } else {
                prefer(&all, distribution, node)
            };
            out.services.push(DesiredService {
                name: format!("{name}:{}", port.name.as_deref().unwrap_or("")),
                vip,
                port: service_port,
                protocol,
                backends: chosen.into_iter().map(|(b, _)| *b).collect(),
                scheduler,
                affinity_timeout,
                no_backend: NoBackendConfig::Reject,
                table_size,
            });
        }
    }
}

/// Where an endpoint runs, for topology choices.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointInfo {
    node: Option<String>,
    zone: Option<String>,
}

/// The Service port's endpoints of the VIP's family, merged over all slices, de-duplicated.
fn endpoints(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    protocol: ProtocolConfig,
    vip: IpAddr,
) -> Vec<(DesiredBackend, EndpointInfo)> {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let want_proto = if protocol == ProtocolConfig::Tcp {
        "TCP"
    } else {
        "UDP"
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        // The slice port with the Service port's name (both unnamed for a single-port Service).
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                && p.protocol.as_deref().unwrap_or("TCP") == want_proto
        }) else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(state) = state(endpoint) else {
                continue;
            };
            for address in &endpoint.addresses {
                let Ok(addr) = address.parse::<IpAddr>() else {
                    continue;
                };
                if !seen.insert((addr, target_port)) {
                    continue;
                }
                out.push((
                    DesiredBackend {
                        address: addr,
                        port: target_port,
                        weight: 1,
                        state,
                    },
                    EndpointInfo {
                        node: endpoint.node_name.clone(),
                        zone: endpoint.zone.clone(),
                    },
                ));
            }
        }
    }
    out
}

/// An endpoint's condition (KEP-1669): ready, or serving and terminating; neither is left out.
/// An unset `ready` or `serving` means ready (the API's documented meaning); `serving`
/// defaults to `ready`.
fn state(endpoint: &Endpoint) -> Option<BackendStateConfig> {
    let c = endpoint.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Some(BackendStateConfig::Ready)
    } else if serving && terminating {
        Some(BackendStateConfig::Terminating)
    } else {
        None
    }
}

/// trafficDistribution: the preferred subset when it has an endpoint that takes new flows,
/// else everything.
fn prefer<'a>(
    all: &'a [(DesiredBackend, EndpointInfo)],
    distribution: Option<&str>,
    node: &NodeContext,
) -> Vec<&'a (DesiredBackend, EndpointInfo)> {
    let usable = |set: &[&(DesiredBackend, EndpointInfo)]| {
        set.iter()
            .any(|(b, _)| b.state == BackendStateConfig::Ready)
    };
    let same_zone: Vec<_> = all
        .iter()
        .filter(|(_, e)| e.zone.is_some() && e.zone == node.zone)
        .collect();
    let same_node: Vec<_> = all
        .iter()
        .filter(|(_, e)| e.node.as_deref() == Some(node.name.as_str()))
        .collect();
    match distribution {
        Some("PreferSameNode") if usable(&same_node) => same_node,
        Some("PreferSameNode" | "PreferSameZone" | "PreferClose") if usable(&same_zone) => {
            same_zone
        }
        _ => all.iter().collect(),
    }
}
