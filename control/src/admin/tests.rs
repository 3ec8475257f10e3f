use std::net::SocketAddr;

use xlb_dataplane::lb::flow::{FlowState, Timeouts};
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::packet::{Family, FlowKey, IpProto};

use super::*;
use crate::admin_client::get;

fn state(flows: u16) -> AdminState {
    let table = FlowTable::new((usize::from(flows) * 2).max(4096), Timeouts::default());
    for port in 0..flows {
        let key = FlowKey::new(
            Family::Ipv4,
            IpProto::UDP,
            (
                [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                1000 + port,
            ),
            ([198, 18, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 53),
        );
        let value = FlowValue::Forward {
            service: 1,
            backend: 1,
            snat_port: 0,
        };
        let _ = table.insert(&key, flow_hash(&key), value, FlowState::New, 0);
    }
    AdminState {
        tables: Arc::new(ArcSwap::from_pointee(Tables::empty())),
        flows: Arc::new(table),
        clock: Clock::start(),
        workers: vec![Arc::new(WorkerStats::new(1))],
        ports: vec!["n0".into()],
        generation: AtomicU64::new(7),
        live_entries: [AtomicU64::new(u64::from(flows)), AtomicU64::new(0)],
        sync_seconds: crate::admin::SyncHistogram::default(),
        filter_counts: ArcSwap::from_pointee(FilterCounts {
            redirected: 3,
            passed: 4,
            unbound: 5,
        }),
        kube: Some(Arc::default()),
        config_hash: AtomicU64::new(0x1234),
        config_generation: AtomicU64::new(9),
    }
}

fn serve(state: AdminState) -> (AdminServer, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (spawn(listener, Arc::new(state)).unwrap(), addr)
}

fn json(addr: SocketAddr, path: &str) -> serde_json::Value {
    serde_json::from_str(&get(addr, path).unwrap()).unwrap()
}

#[test]
fn health_metrics_and_unknown_paths_get_their_statuses() {
    let (_server, addr) = serve(state(3));
    assert_eq!(get(addr, "/healthz").unwrap(), "ok\n");
    assert!(get(addr, "/nope").unwrap_err().to_string().contains("404"));
    let body = get(addr, "/metrics").unwrap();
    for line in [
        "xlb_received_packets_total{worker=\"0\"} 0",
        "xlb_snapshot_generation 7",
        "xlb_config_hash 4660",
        "xlb_config_generation 9",
        "xlb_filter_packets_total{action=\"pass\"} 4",
        "xlb_filter_packets_total{action=\"unbound\"} 5",
        "xlb_flow_entries{family=\"ipv4\"} 3",
        "xlb_flow_entries{family=\"ipv6\"} 0",
        "xlb_flow_capacity{family=\"ipv6\"} 1024",
        "xlb_held_packets_total{worker=\"0\"} 0",
        "xlb_flow_events_total{worker=\"0\",event=\"Recreated\"} 0",
        "xlb_kubernetes_objects{kind=\"endpointslice\"} 0",
        "xlb_kubernetes_translation_errors_total{kind=\"malformed\"} 0",
        "xlb_kubernetes_synced 0",
        "xlb_socket_rx_ring_full_total{worker=\"0\",port=\"n0\"} 0",
        "xlb_socket_rx_fill_ring_empty_descs_total{worker=\"0\",port=\"n0\"} 0",
    ] {
        assert_eq!(
            body.lines().filter(|l| *l == line).count(),
            1,
            "{line} once in\n{body}"
        );
    }
}

/// Issue 11, fault 8: `GET /flows?limit=100000000` at a million flows took 10 s and 2.2 GB.
/// A page is capped, and pages together list every flow exactly once.
#[test]
fn flows_come_in_capped_pages_that_together_list_every_flow_once() {
    let (_server, addr) = serve(state(2500));
    let page = json(addr, "/flows?limit=100000000");
    assert_eq!(page["flows"].as_array().unwrap().len(), 2500);
    assert!(page["next"].is_null());
    let mut seen = std::collections::HashSet::new();
    let mut from = 0;
    loop {
        let page = json(addr, &format!("/flows?limit=700&from={from}"));
        let flows = page["flows"].as_array().unwrap();
        assert!(flows.len() <= 700);
        for f in flows {
            assert!(seen.insert(f["source"].as_str().unwrap().to_owned()), "{f}");
        }
        match page["next"].as_u64() {
            Some(next) => from = usize::try_from(next).unwrap(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2500);
    assert_eq!(
        json(addr, "/flows")["flows"].as_array().unwrap().len(),
        100,
        "default page"
    );
}

#[test]
fn a_page_is_never_larger_than_its_cap() {
    let table_cap = FLOWS_PAGE_MAX;
    let (_server, addr) = serve(state(12_000));
    let page = json(addr, "/flows?limit=1000000");
    assert_eq!(page["flows"].as_array().unwrap().len(), table_cap);
    assert!(page["next"].is_u64());
}

#[test]
fn services_come_in_pages_of_the_live_snapshot() {
    let (_server, addr) = serve(state(0));
    let page = json(addr, "/services?limit=5");
    assert_eq!(page["services"].as_array().unwrap().len(), 0);
    assert!(page["next"].is_null());
    assert_eq!(page["generation"], 0);
}

/// Health is answered while every blocking turn is taken and more requests wait.
#[test]
fn health_is_answered_while_heavy_requests_hold_every_turn() {
    let state = Arc::new(state(0));
    let shared = Shared {
        registry: Arc::new(super::metrics::registry(&state)),
        state: Arc::clone(&state),
        heavy: Arc::new(Semaphore::new(HEAVY_AT_ONCE)),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let heavy = Arc::clone(&shared.heavy);
    // Take every turn, as long scans would.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let held = runtime.block_on(async {
        Arc::clone(&heavy)
            .acquire_many_owned(u32::try_from(HEAVY_AT_ONCE).unwrap())
            .await
            .unwrap()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = routes(shared);
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                _ = stopped => {}
            }
        });
    });
    let waiting = std::thread::spawn(move || get(addr, "/flows"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(addr, "/healthz").unwrap(), "ok\n");
    // The waiting request is refused once its wait is over, not left hanging.
    let refused = waiting.join().unwrap();
    assert!(refused.unwrap_err().to_string().contains("503"));
    drop(held);
    let _ = stop.send(());
    server.join().unwrap();
}

/// What `/services` tells an operator about a Kubernetes Service, translated as the source
/// translates it: every VIP with its kind and policy, and each backend with its condition
/// and node.
#[test]
fn services_show_what_each_vip_is_and_each_backend_with_its_condition_and_node() {
    use k8s_openapi::api::core::v1::Service as KService;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let service: KService = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "shop", "name": "web"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.18.64.1", "clusterIPs": ["198.18.64.1"],
                 "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
                 "loadBalancerSourceRanges": ["198.18.0.0/24"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.65.1"}]}},
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "shop", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [
            {"addresses": ["198.18.128.1"], "nodeName": "node-a", "conditions": {"ready": true}},
            {"addresses": ["198.18.128.2"], "nodeName": "node-b",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
        ],
    }))
    .unwrap();
    let desired = crate::kubernetes::translate(
        &[service],
        &[slice],
        &crate::kubernetes::NodeContext::named("node-a"),
    )
    .services;
    let snapshot = crate::translate::translate_desired(
        &desired,
        &mut crate::translate::Builder::default(),
        &xlb_dataplane::lb::snapshot::Snapshot::default(),
        3,
    )
    .unwrap()
    .snapshot;
    let state = state(0);
    state.tables.store(Arc::new(Tables {
        snapshot: Arc::new(snapshot),
        hops: Tables::empty().hops,
    }));
    let (_server, addr) = serve(state);
    let page = json(addr, "/services");
    let services = page["services"].as_array().unwrap();
    let by_vip = |vip: &str| {
        services
            .iter()
            .find(|s| s["vip"] == vip)
            .unwrap_or_else(|| panic!("{vip} in {page}"))
    };
    let cluster = by_vip("198.18.64.1");
    assert_eq!(cluster["name"], "shop/web:http");
    assert_eq!(cluster["kind"], "cluster-ip");
    assert_eq!(cluster["traffic_policy"], "Cluster");
    assert_eq!(cluster["scheduler"], "maglev");
    assert_eq!(cluster["affinity_timeout_seconds"], 10_800);
    assert_eq!(cluster["source_ranges"], serde_json::json!([]));
    assert_eq!(cluster["no_endpoints"], "reject");
    let backends = cluster["backends"].as_array().unwrap();
    let backend = |a: &str| backends.iter().find(|b| b["address"] == a).unwrap();
    assert_eq!(
        (
            backend("198.18.128.1")["state"].as_str(),
            backend("198.18.128.1")["local"].as_bool()
        ),
        (Some("ready"), Some(true))
    );
    assert_eq!(
        (
            backend("198.18.128.2")["state"].as_str(),
            backend("198.18.128.2")["local"].as_bool()
        ),
        (Some("terminating"), Some(false))
    );
    let ingress = by_vip("198.18.65.1");
    assert_eq!(ingress["kind"], "load-balancer");
    assert_eq!(ingress["traffic_policy"], "Local");
    assert_eq!(
        ingress["source_ranges"],
        serde_json::json!(["198.18.0.0/24"])
    );
    assert_eq!(
        ingress["backends"].as_array().unwrap().len(),
        1,
        "Local: this node's endpoint only"
    );
    assert_eq!(ingress["backends"][0]["live_flows"], 0);
}

/// The metric conventions the README promises: `xlb_` names, a help for each, counters'
/// samples ending in `_total`, seconds in the histogram's name, each metric declared once.
#[test]
fn every_metric_follows_prometheus_naming_and_the_sync_histogram_counts_its_observations() {
    let state = state(1);
    for seconds in [0.003, 0.2, 10.0] {
        state.sync_seconds.observe(seconds);
    }
    let (_server, addr) = serve(state);
    let body = get(addr, "/metrics").unwrap();
    for line in [
        "xlb_sync_duration_seconds_bucket{le=\"0.001\"} 0",
        "xlb_sync_duration_seconds_bucket{le=\"0.005\"} 1",
        "xlb_sync_duration_seconds_bucket{le=\"0.25\"} 2",
        "xlb_sync_duration_seconds_bucket{le=\"+Inf\"} 3",
        "xlb_sync_duration_seconds_count 3",
        "# EOF",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in\n{body}");
    }
    let mut declared = std::collections::HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(name.starts_with("xlb_"), "{line}");
            assert!(
                body.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
            assert!(
                declared.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{name} declared twice"
            );
        } else if !line.starts_with('#') {
            let series = line.split([' ', '{']).next().unwrap();
            let (name, kind) = declared
                .iter()
                .filter(|(name, _)| series.starts_with(name.as_str()))
                .max_by_key(|(name, _)| name.len())
                .unwrap_or_else(|| panic!("{series} has no TYPE"));
            match kind.as_str() {
                "counter" => assert_eq!(series, format!("{name}_total"), "{line}"),
                "gauge" => assert_eq!(series, name, "{line}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
                other => panic!("{name}: an unexpected type {other}"),
            }
        }
    }
    assert!(declared.len() > 30, "{declared:?}");
}
