//! The first step of the translation: what it reads of each object, as a compact view
//! ([`ServiceView::of`], [`SliceView::of`]), with what was skipped. The source keeps these
//! instead of the objects.

use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashMap;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use xlb_dataplane::lb::maglev::is_valid_table_size;

use super::{object_name, Warning, DEFAULT_AFFINITY_SECONDS, PROXY_NAME_LABEL};
use crate::desired::{BackendState, Cidr, Protocol, Scheduler, VipKind};

/// trafficDistribution, as far as xlb acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Distribution {
    Any,
    SameZone,
    SameNode,
}

/// A Service port xlb forwards (or an EndpointSlice's port, without a node port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PortView {
    pub(super) name: Box<str>,
    pub(super) protocol: Protocol,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
}

/// What translation reads of a Service xlb handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub(super) name: Arc<str>,
    /// VIPs with their kind.
    pub(super) vips: Box<[(IpAddr, VipKind)]>,
    /// Which IP families the Service has (IPv4, IPv6), for node ports.
    pub(super) families: (bool, bool),
    pub(super) ports: Box<[PortView]>,
    /// `loadBalancerSourceRanges`, for the ingress IPs.
    pub(super) source_ranges: Arc<[Cidr]>,
    pub(super) scheduler: Scheduler,
    pub(super) table_size: Option<u32>,
    pub(super) affinity_timeout: Option<u32>,
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
    pub(super) distribution: Distribution,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with externalTrafficPolicy
    /// Local: where external load balancers ask whether this node has endpoints.
    pub(super) health_check_port: Option<u16>,
}

/// One address of an endpoint that may take or keep flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EndpointView {
    pub(super) address: IpAddr,
    pub(super) state: BackendState,
    /// Whether it runs on this node.
    pub(super) local: bool,
    pub(super) zone: Option<Arc<str>>,
}

/// What translation reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub(super) ipv6: bool,
    pub(super) ports: Box<[PortView]>,
    pub(super) endpoints: Box<[EndpointView]>,
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
    pub(super) fn port(&self, service_port: &PortView) -> Option<&PortView> {
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
