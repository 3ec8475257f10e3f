//! Kubernetes objects (shaped as the API serves them) translated to desired state with
//! kube-proxy's semantics: one fixture per rule.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use xlb_control::desired::{BackendState, NoBackend, Protocol, Scheduler};
use xlb_control::kubernetes::{translate, NodeContext, Translation};

fn service(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": "default", "resourceVersion": "1" },
        "spec": spec,
    })
}

fn slice(service: &str, name: &str, family: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": "default",
                      "labels": { "kubernetes.io/service-name": service } },
        "addressType": family, "ports": ports, "endpoints": endpoints,
    })
}

/// An IPv4 slice of `web` with its `http` port on `port`.
fn web_slice(name: &str, port: u16, endpoints: Value) -> Value {
    slice(
        "web",
        name,
        "IPv4",
        json!([{ "name": "http", "protocol": "TCP", "port": port }]),
        endpoints,
    )
}

fn run(services: Vec<Value>, slices: Vec<Value>) -> Translation {
    let services: Vec<Service> = services
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let slices: Vec<EndpointSlice> = slices
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let node = NodeContext {
        name: "node-a".into(),
        zone: Some("zone-1".into()),
        node_port_addresses: vec![
            "198.18.0.254".parse().unwrap(),
            "2001:2::fe".parse().unwrap(),
        ],
    };
    translate(&services, &slices, &node)
}

fn web() -> Value {
    service(
        "web",
        json!({
            "type": "ClusterIP", "clusterIP": "198.18.64.1", "clusterIPs": ["198.18.64.1"],
            "ports": [{ "name": "http", "protocol": "TCP", "port": 80, "targetPort": "http" }],
        }),
    )
}

fn ep(addr: &str, node: &str, zone: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({ "addresses": [addr], "nodeName": node, "zone": zone,
            "conditions": { "ready": ready, "serving": serving, "terminating": terminating } })
}

#[test]
fn named_target_ports_resolve_per_slice_and_endpoints_merge_without_duplicates() {
    let t = run(
        vec![web()],
        vec![
            web_slice(
                "web-a",
                8080,
                json!([
                    ep("198.18.129.1", "node-a", "zone-1", true, true, false),
                    ep("198.18.129.2", "node-b", "zone-2", true, true, false)
                ]),
            ),
            web_slice(
                "web-b",
                9090,
                json!([ep("198.18.129.3", "node-b", "zone-2", true, true, false)]),
            ),
            // The same endpoint in a second slice (as during a slice rebalance): once only.
            web_slice(
                "web-c",
                8080,
                json!([ep("198.18.129.1", "node-a", "zone-1", true, true, false)]),
            ),
        ],
    );
    assert_eq!(t.services.len(), 1);
    let s = &t.services[0];
    assert_eq!(
        (s.vip.to_string(), s.port, s.protocol),
        ("198.18.64.1".into(), 80, Protocol::Tcp)
    );
    let mut backends: Vec<String> = s
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.address, b.port))
        .collect();
    backends.sort();
    assert_eq!(
        backends,
        [
            "198.18.129.1:8080",
            "198.18.129.2:8080",
            "198.18.129.3:9090"
        ]
    );
}

#[test]
fn headless_externalname_and_other_proxies_services_are_ignored() {
    let mut other = web();
    other["metadata"]["labels"] =
        json!({ "service.kubernetes.io/service-proxy-name": "someone-else" });
    let t = run(
        vec![
            service(
                "headless",
                json!({ "clusterIP": "None", "ports": [{ "port": 80 }] }),
            ),
            service(
                "ext",
                json!({ "type": "ExternalName", "externalName": "example.org" }),
            ),
            other,
        ],
        vec![],
    );
    assert!(t.services.is_empty(), "{:?}", t.services);
}

#[test]
fn dual_stack_load_balancer_and_external_ips_each_get_their_family_of_endpoints() {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "type": "LoadBalancer", "clusterIP": "198.18.64.1",
                  "clusterIPs": ["198.18.64.1", "2001:2:0:40::1"], "externalIPs": ["198.18.65.1"],
                  "ports": [{ "name": "dns", "protocol": "UDP", "port": 53 }] },
        "status": { "loadBalancer": { "ingress": [{ "ip": "198.18.66.1" }] } },
    });
    let t = run(
        vec![svc],
        vec![
            slice(
                "web",
                "v4",
                "IPv4",
                json!([{ "name": "dns", "protocol": "UDP", "port": 5353 }]),
                json!([ep("198.18.129.1", "node-a", "zone-1", true, true, false)]),
            ),
            slice(
                "web",
                "v6",
                "IPv6",
                json!([{ "name": "dns", "protocol": "UDP", "port": 5353 }]),
                json!([ep("2001:2:0:81::1", "node-a", "zone-1", true, true, false)]),
            ),
        ],
    );
    let mut vips: Vec<String> = t
        .services
        .iter()
        .map(|s| format!("{} {}", s.vip, s.backends[0].address))
        .collect();
    vips.sort();
    assert_eq!(
        vips,
        [
            "198.18.64.1 198.18.129.1",
            "198.18.65.1 198.18.129.1",
            "198.18.66.1 198.18.129.1",
            "2001:2:0:40::1 2001:2:0:81::1",
        ]
    );
    assert!(t.services.iter().all(|s| s.protocol == Protocol::Udp));
}

#[test]
fn ready_endpoints_take_flows_serving_terminating_ones_keep_them_and_others_are_left_out() {
    let t = run(
        vec![web()],
        vec![web_slice(
            "w",
            8080,
            json!([ep("198.18.129.1", "n", "z", true, true, false),
                          ep("198.18.129.2", "n", "z", false, true, true),
                          ep("198.18.129.3", "n", "z", false, false, true),
                          ep("198.18.129.4", "n", "z", false, false, false),
                          { "addresses": ["198.18.129.5"] }]),
        )],
    );
    let states: Vec<(String, BackendState)> = t.services[0]
        .backends
        .iter()
        .map(|b| (b.address.to_string(), b.state))
        .collect();
    assert_eq!(
        states,
        [
            ("198.18.129.1".into(), BackendState::Ready),
            ("198.18.129.2".into(), BackendState::Terminating),
            // No conditions: the API's meaning of unset is ready.
            ("198.18.129.5".into(), BackendState::Ready),
        ]
    );
}

#[test]
fn sctp_ports_are_forwarded_as_kube_proxy_forwards_them_and_other_protocols_reported() {
    let svc = service(
        "diameter",
        json!({ "clusterIP": "198.18.64.9",
        "ports": [{ "name": "s", "protocol": "SCTP", "port": 3868 },
                  { "name": "d", "protocol": "DCCP", "port": 9 },
                  { "name": "t", "protocol": "TCP", "port": 10 }] }),
    );
    let endpoints = slice(
        "diameter",
        "diameter-1",
        "IPv4",
        json!([{ "name": "s", "protocol": "SCTP", "port": 3869 },
               { "name": "t", "protocol": "TCP", "port": 11 }]),
        json!([ep("198.18.129.1", "node-b", "zone-1", true, true, false)]),
    );
    let t = run(vec![svc], vec![endpoints]);
    let sctp = t
        .services
        .iter()
        .find(|s| s.protocol == Protocol::Sctp)
        .expect("the SCTP port is served");
    assert_eq!((sctp.port, sctp.backends.len()), (3868, 1));
    assert_eq!(sctp.backends[0].port, 3869, "its slice's SCTP target port");
    assert_eq!(t.services.len(), 2, "SCTP and TCP");
    assert_eq!(t.warnings.len(), 1);
    assert_eq!(t.warnings[0].kind, "unsupported-protocol");
    assert!(t.warnings[0].message.contains("DCCP"));
}

#[test]
fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints_and_drops_without_one() {
    let mut svc = web();
    svc["spec"]["internalTrafficPolicy"] = json!("Local");
    let slices = |on: &str| {
        vec![web_slice(
            "w",
            8080,
            json!([
                ep("198.18.129.1", on, "zone-1", true, true, false),
                ep("198.18.129.2", "node-b", "zone-1", true, true, false)
            ]),
        )]
    };
    let t = run(vec![svc.clone()], slices("node-a"));
    assert_eq!(t.services[0].backends.len(), 1);
    assert_eq!(
        t.services[0].backends[0].address.to_string(),
        "198.18.129.1"
    );
    assert_eq!(t.services[0].no_backend, NoBackend::Reject);
    let t = run(vec![svc.clone()], slices("node-c"));
    assert!(
        t.services[0].backends.is_empty(),
        "no local endpoint: none, as kube-proxy does"
    );
    assert_eq!(
        t.services[0].no_backend,
        NoBackend::Drop,
        "endpoints elsewhere: dropped, as kube-proxy does"
    );
    // No endpoint anywhere: rejected.
    let t = run(vec![svc], Vec::new());
    assert!(t.services[0].backends.is_empty());
    assert_eq!(t.services[0].no_backend, NoBackend::Reject);
}

#[test]
fn prefer_same_zone_falls_back_to_all_when_the_zone_has_no_ready_endpoint() {
    let mut svc = web();
    svc["spec"]["trafficDistribution"] = json!("PreferSameZone");
    let make = |zone_of_first: &str| {
        vec![web_slice(
            "w",
            8080,
            json!([
                ep("198.18.129.1", "node-b", zone_of_first, true, true, false),
                ep("198.18.129.2", "node-c", "zone-2", true, true, false)
            ]),
        )]
    };
    let t = run(vec![svc.clone()], make("zone-1"));
    assert_eq!(t.services[0].backends.len(), 1, "only zone-1's");
    let t = run(vec![svc], make("zone-3"));
    assert_eq!(
        t.services[0].backends.len(),
        2,
        "nothing in zone-1: everyone"
    );
}

#[test]
fn client_ip_affinity_and_annotations_are_honoured_and_bad_values_warned() {
    let mut svc = web();
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    svc["spec"]["sessionAffinityConfig"] = json!({ "clientIP": { "timeoutSeconds": 600 } });
    svc["metadata"]["annotations"] =
        json!({ "xlb.io/scheduler": "least-connections", "xlb.io/maglev-table-size": "65537" });
    let t = run(vec![svc.clone()], vec![]);
    let s = &t.services[0];
    assert_eq!(
        (s.affinity_timeout, s.scheduler, s.table_size),
        (Some(600), Scheduler::LeastConnections, Some(65537))
    );
    assert!(t.warnings.is_empty());
    svc["metadata"]["annotations"] =
        json!({ "xlb.io/scheduler": "fastest", "xlb.io/maglev-table-size": "1000" });
    let t = run(vec![svc], vec![]);
    assert_eq!(
        (t.services[0].scheduler, t.services[0].table_size),
        (Scheduler::Maglev, None)
    );
    assert_eq!(t.warnings.len(), 2);
    assert!(t.warnings.iter().all(|w| w.kind == "bad-annotation"));
}

fn states(t: &Translation) -> Vec<(String, BackendState)> {
    t.services[0]
        .backends
        .iter()
        .map(|b| (b.address.to_string(), b.state))
        .collect()
}

/// Issue 12, item 2, as kube-proxy's `endpointslicecache.go` reads conditions
/// (`Ready == nil || *Ready`, `Serving == nil || *Serving`) and `topology.go` picks (ready,
/// else serving and terminating): a terminating endpoint with `serving` unset is a fallback,
/// and a ready one is ready even while terminating.
#[test]
fn serving_unset_counts_as_serving_and_ready_wins_over_terminating() {
    let t = run(
        vec![web()],
        vec![web_slice(
            "w",
            8080,
            json!([
                { "addresses": ["198.18.129.1"], "conditions": { "ready": false, "terminating": true } },
                { "addresses": ["198.18.129.2"], "conditions": { "ready": true, "terminating": true } },
                { "addresses": ["198.18.129.3"], "conditions": { "ready": false, "serving": true } },
            ]),
        )],
    );
    assert_eq!(
        states(&t),
        [
            ("198.18.129.1".into(), BackendState::Terminating),
            ("198.18.129.2".into(), BackendState::Ready),
        ]
    );
}

/// Issue 12, item 2: only `addresses[0]` counts (the API: "consumers must use the first
/// element"), and of one address in two slices the ready copy wins over a terminating one
/// (kube-proxy's endpointslicecache keeps the ready copy).
#[test]
fn only_the_first_address_counts_and_a_ready_copy_wins_over_a_terminating_one() {
    let t = run(
        vec![web()],
        vec![
            web_slice(
                "old",
                8080,
                json!([
                    ep("198.18.129.1", "node-b", "zone-1", false, true, true),
                    { "addresses": ["198.18.129.2", "198.18.129.9"] },
                ]),
            ),
            web_slice(
                "new",
                8080,
                json!([ep("198.18.129.1", "node-b", "zone-1", true, true, false)]),
            ),
        ],
    );
    assert_eq!(
        states(&t),
        [
            ("198.18.129.1".into(), BackendState::Ready),
            ("198.18.129.2".into(), BackendState::Ready),
        ]
    );
}

/// Issue 12, item 3: an external or ingress address of a family the Service does not have is
/// ignored (kube-proxy's servicechangetracker filters by the Service's IP families), not
/// turned into a VIP without backends that rejects.
#[test]
fn external_and_ingress_addresses_of_another_family_are_ignored() {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "type": "LoadBalancer", "clusterIP": "198.18.64.1", "clusterIPs": ["198.18.64.1"],
                  "ipFamilies": ["IPv4"], "externalIPs": ["198.18.65.1", "2001:2:0:65::1"],
                  "ports": [{ "name": "http", "protocol": "TCP", "port": 80 }] },
        "status": { "loadBalancer": { "ingress": [{ "ip": "2001:2:0:66::1" }, { "ip": "198.18.66.1" }] } },
    });
    let t = run(vec![svc], vec![]);
    let mut vips: Vec<String> = t.services.iter().map(|s| s.vip.to_string()).collect();
    vips.sort();
    assert_eq!(vips, ["198.18.64.1", "198.18.65.1", "198.18.66.1"]);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

/// Issue 12, item 4: an ingress IP whose `ipMode` is `Proxy` belongs to a load balancer that
/// proxies to node ports: it is not served on the node; `VIP` or unset is.
#[test]
fn an_ingress_ip_in_proxy_mode_is_not_served() {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "type": "LoadBalancer", "clusterIP": "198.18.64.1",
                  "ports": [{ "name": "http", "protocol": "TCP", "port": 80 }] },
        "status": { "loadBalancer": { "ingress": [
            { "ip": "198.18.66.1", "ipMode": "Proxy" },
            { "ip": "198.18.66.2", "ipMode": "VIP" },
            { "ip": "198.18.66.3" } ] } },
    });
    let t = run(vec![svc], vec![]);
    let mut vips: Vec<String> = t.services.iter().map(|s| s.vip.to_string()).collect();
    vips.sort();
    assert_eq!(vips, ["198.18.64.1", "198.18.66.2", "198.18.66.3"]);
}

/// Issue 12, item 1: `loadBalancerSourceRanges` applies to the ingress IPs only (kube-proxy's
/// nftables proxier puts the firewall check on load-balancer IPs; external IPs and the cluster
/// IP are not filtered).
#[test]
fn source_ranges_apply_to_the_load_balancer_ips_only() {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "type": "LoadBalancer", "clusterIP": "198.18.64.1", "externalIPs": ["198.18.65.1"],
                  "loadBalancerSourceRanges": ["198.18.0.0/24", " 203.0.113.0/24 ", "bogus"],
                  "ports": [{ "name": "http", "protocol": "TCP", "port": 80 }] },
        "status": { "loadBalancer": { "ingress": [{ "ip": "198.18.66.1" }] } },
    });
    let t = run(vec![svc], vec![]);
    for s in &t.services {
        let ranges: Vec<String> = s.source_ranges.iter().map(ToString::to_string).collect();
        if s.vip.to_string() == "198.18.66.1" {
            assert_eq!(ranges, ["198.18.0.0/24", "203.0.113.0/24"]);
        } else {
            assert!(ranges.is_empty(), "{} has {ranges:?}", s.vip);
        }
    }
    assert_eq!(t.warnings.len(), 1, "the bad range is reported");
}

/// Issue 12, item 5: node ports are served on the node's addresses of the Service's
/// families, for NodePort and LoadBalancer Services, following externalTrafficPolicy (Local:
/// this node's endpoints only, none there drops); a LoadBalancer without allocated node ports
/// (allocateLoadBalancerNodePorts: false) has none.
#[test]
fn node_ports_are_served_on_the_nodes_addresses_with_the_external_policy() {
    let node_port = |ty: &str, local: bool| {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": { "type": ty, "clusterIP": "198.18.64.1", "ipFamilies": ["IPv4"],
                      "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                      "ports": [{ "name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080 }] },
        })
    };
    let slices = vec![web_slice(
        "w",
        8080,
        json!([
            ep("198.18.129.1", "node-a", "zone-1", true, true, false),
            ep("198.18.129.2", "node-b", "zone-1", true, true, false)
        ]),
    )];
    let at_node_port = |t: &Translation| {
        t.services
            .iter()
            .filter(|s| s.port == 30080)
            .map(|s| (s.vip.to_string(), s.backends.len(), s.no_backend))
            .collect::<Vec<_>>()
    };
    let t = run(vec![node_port("NodePort", false)], slices.clone());
    assert_eq!(
        at_node_port(&t),
        [("198.18.0.254".into(), 2, NoBackend::Reject)],
        "IPv4 only: the Service has no IPv6"
    );
    let t = run(vec![node_port("LoadBalancer", true)], slices.clone());
    assert_eq!(
        at_node_port(&t),
        [("198.18.0.254".into(), 1, NoBackend::Reject)]
    );
    let remote = vec![web_slice(
        "w",
        8080,
        json!([ep("198.18.129.2", "node-b", "zone-1", true, true, false)]),
    )];
    let t = run(vec![node_port("NodePort", true)], remote);
    assert_eq!(
        at_node_port(&t),
        [("198.18.0.254".into(), 0, NoBackend::Drop)],
        "Local and no endpoint here: dropped"
    );
    let mut no_alloc = node_port("LoadBalancer", false);
    no_alloc["spec"]["allocateLoadBalancerNodePorts"] = json!(false);
    no_alloc["spec"]["ports"][0]
        .as_object_mut()
        .unwrap()
        .remove("nodePort");
    assert!(at_node_port(&run(vec![no_alloc], slices.clone())).is_empty());
    let cluster_ip = node_port("ClusterIP", false);
    assert!(
        at_node_port(&run(vec![cluster_ip], slices)).is_empty(),
        "a ClusterIP Service has no node port"
    );
}
