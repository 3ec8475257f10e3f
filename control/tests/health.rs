//! kube-proxy's health servers as external load balancers and probes see them: `/healthz`
//! and `/livez` with kube-proxy's bodies and status codes (`pkg/proxy/healthcheck/
//! proxy_health.go`), and a healthCheckNodePort server per LoadBalancer Service with
//! externalTrafficPolicy Local answering with its local ready endpoints
//! (`service_health.go`, counted as `EndpointsMap.LocalReadyEndpoints` counts them), fed
//! from the Kubernetes source against control::fake_api.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xlb_control::fake_api::{FakeApi, Resource};
use xlb_control::health::{HealthServer, ProxyHealth, ServiceHealth};
use xlb_control::kube_source::{KubeMetrics, KubeSource, SourceOptions};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long any one expectation may take.
const PATIENCE: Duration = Duration::from_secs(10);

/// An answer: status code, headers (lower-case names) and body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Answer {
        status,
        headers: head.to_lowercase(),
        body: body.to_owned(),
    })
}

/// Waits until `check` holds for the answer at `addr` `path` (or for the failure to
/// connect, `None`).
fn until(what: &str, addr: SocketAddr, path: &str, check: impl Fn(Option<&Answer>) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = get(addr, path).ok();
        if check(answer.as_ref()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last answer: {:?}",
            answer.map(|a| (a.status, a.body))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port free on the loopback address right now.
fn free_port() -> u16 {
    TcpListener::bind((LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proxy_server(health: &Arc<ProxyHealth>) -> (HealthServer, SocketAddr) {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HealthServer::spawn(Some(listener), Arc::clone(health), vec![LOCALHOST]).unwrap();
    (server, addr)
}

#[test]
fn healthz_and_livez_answer_as_kube_proxy_and_turn_503_when_a_change_waits_too_long() {
    let health = Arc::new(ProxyHealth::new(Duration::from_millis(300), None));
    let (_server, addr) = proxy_server(&health);
    for path in ["/healthz", "/livez"] {
        let a = get(addr, path).unwrap();
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert!(a.headers.contains("content-type: application/json"));
        assert!(a.headers.contains("x-content-type-options: nosniff"));
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert!(body["lastUpdated"]
            .as_str()
            .unwrap()
            .ends_with(" +0000 UTC"));
        assert!(body["currentTime"]
            .as_str()
            .unwrap()
            .ends_with(" +0000 UTC"));
        assert_eq!(body.get("nodeEligible").is_some(), path == "/healthz");
    }
    // A change arrives and is not made live: healthy until the limit, then 503.
    health.queued(Instant::now());
    assert_eq!(get(addr, "/healthz").unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(350));
    for path in ["/healthz", "/livez"] {
        let a = get(addr, path).unwrap();
        assert_eq!(a.status, 503, "{path}");
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            body["lastUpdated"], "0001-01-01 00:00:00 +0000 UTC",
            "never updated"
        );
    }
    health.updated(Instant::now());
    assert_eq!(get(addr, "/healthz").unwrap().status, 200);
    // A node being deleted: /healthz says so, /livez does not care.
    health.set_node_eligible(false);
    let a = get(addr, "/healthz").unwrap();
    assert_eq!(a.status, 503);
    assert!(a.body.contains("\"nodeEligible\": false"), "{}", a.body);
    assert_eq!(get(addr, "/livez").unwrap().status, 200);
    assert_eq!(
        get(addr, "/other").unwrap().status,
        404,
        "only kube-proxy's two paths"
    );
}

#[test]
fn health_check_ports_open_close_and_answer_with_the_local_endpoint_count() {
    let metrics = Arc::new(KubeMetrics::default());
    metrics.synced.store(true, Ordering::Relaxed);
    let health = Arc::new(ProxyHealth::new(
        Duration::from_secs(60),
        Some(Arc::clone(&metrics)),
    ));
    let (server, _) = proxy_server(&health);
    let (a, b) = (free_port(), free_port());
    let at = |port| SocketAddr::new(LOCALHOST, port);
    let entry = |name: &str, port, local_endpoints| ServiceHealth {
        name: name.into(),
        port,
        local_endpoints,
    };
    server.set_services(vec![entry("shop/web", a, 2), entry("shop/api", b, 0)]);
    until("web answers 200", at(a), "/", |r| {
        r.is_some_and(|r| r.status == 200)
    });
    let web = get(at(a), "/any/path").unwrap();
    assert!(web.headers.contains("content-type: application/json"));
    let body: Value = serde_json::from_str(&web.body).unwrap();
    assert_eq!(
        body,
        json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2,
               "serviceProxyHealthy": true})
    );
    let api = get(at(b), "/").unwrap();
    assert_eq!(api.status, 503, "no local endpoint: pick another node");
    assert!(api.body.contains("\"localEndpoints\": 0"), "{}", api.body);

    // The source loses the API server: every Service says 503, its count unchanged.
    metrics.synced.store(false, Ordering::Relaxed);
    let web = get(at(a), "/").unwrap();
    assert_eq!(web.status, 503);
    assert!(web.body.contains("\"serviceProxyHealthy\": false"));
    metrics.synced.store(true, Ordering::Relaxed);

    // web's count falls to 0; api goes; web moves to another port.
    server.set_services(vec![entry("shop/web", a, 0)]);
    until("web answers 503", at(a), "/", |r| {
        r.is_some_and(|r| r.status == 503)
    });
    until("api's port is closed", at(b), "/", |r| r.is_none());
    let c = free_port();
    server.set_services(vec![entry("shop/web", c, 1)]);
    until("web answers on its new port", at(c), "/", |r| {
        r.is_some_and(|r| r.status == 200)
    });
    until("web's old port is closed", at(a), "/", |r| r.is_none());
}

#[test]
fn a_health_check_port_someone_else_holds_is_opened_once_it_is_released() {
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60), None));
    let (server, _) = proxy_server(&health);
    let squatter = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let other = free_port();
    server.set_services(vec![
        ServiceHealth {
            name: "shop/web".into(),
            port: taken,
            local_endpoints: 1,
        },
        ServiceHealth {
            name: "shop/api".into(),
            port: other,
            local_endpoints: 1,
        },
    ]);
    let at = |port| SocketAddr::new(LOCALHOST, port);
    until("the other Service is served", at(other), "/", |r| {
        r.is_some_and(|r| r.status == 200)
    });
    drop(squatter);
    // Retried every 5 s.
    until("the released port is served", at(taken), "/", |r| {
        r.is_some_and(|r| r.status == 200 && r.body.contains("\"web\""))
    });
}

fn lb_service(policy: &str) -> Value {
    json!({
        "metadata": {"namespace": "shop", "name": "web"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.18.64.1", "clusterIPs": ["198.18.64.1"],
                 "externalTrafficPolicy": policy, "healthCheckNodePort": 32000,
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080},
                           {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.65.1"}]}},
    })
}

/// Endpoints (address, node, ready, terminating) in one slice with two ports.
fn lb_slice(endpoints: &[(&str, &str, bool, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(a, node, ready, terminating)| {
            json!({"addresses": [a], "nodeName": node,
                   "conditions": {"ready": ready, "serving": true, "terminating": terminating}})
        })
        .collect();
    json!({
        "metadata": {"namespace": "shop", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080},
                  {"name": "dns", "protocol": "UDP", "port": 5353}],
        "endpoints": endpoints,
    })
}

/// The health-check Services of the next batch that has them.
async fn next_health(source: &mut KubeSource) -> Vec<ServiceHealth> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let batch = tokio::time::timeout_at(deadline, source.next_batch())
            .await
            .expect("a batch with health-check Services");
        if let Some(h) = batch.health {
            return h;
        }
    }
}

#[tokio::test]
async fn the_kubernetes_source_counts_local_ready_endpoints_for_local_load_balancer_services() {
    let api = FakeApi::start().await.unwrap();
    api.apply(Resource::Nodes, json!({"metadata": {"name": "node-a"}}))
        .await;
    api.apply(Resource::Services, lb_service("Local")).await;
    // Two local ready pods (each counted once per port: 4), one local terminating (not
    // counted: load balancers drain the node), one ready elsewhere.
    api.apply(
        Resource::EndpointSlices,
        lb_slice(&[
            ("198.18.128.1", "node-a", true, false),
            ("198.18.128.2", "node-a", true, false),
            ("198.18.128.3", "node-a", false, true),
            ("198.18.128.4", "node-b", true, false),
        ]),
    )
    .await;
    let metrics = Arc::new(KubeMetrics::default());
    let health = Arc::new(ProxyHealth::new(
        Duration::from_secs(60),
        Some(Arc::clone(&metrics)),
    ));
    let mut source = KubeSource::new(
        kube::Config::new(api.url().parse().unwrap()),
        xlb_control::kubernetes::NodeContext::named("node-a"),
        SourceOptions::default(),
        metrics,
    )
    .unwrap()
    .with_health(Arc::clone(&health));
    let web = |n| {
        vec![ServiceHealth {
            name: "shop/web".into(),
            port: 32000,
            local_endpoints: n,
        }]
    };
    assert_eq!(next_health(&mut source).await, web(4));
    api.apply(
        Resource::EndpointSlices,
        lb_slice(&[
            ("198.18.128.1", "node-a", false, true),
            ("198.18.128.2", "node-a", false, true),
            ("198.18.128.4", "node-b", true, false),
        ]),
    )
    .await;
    assert_eq!(
        next_health(&mut source).await,
        web(0),
        "only terminating here"
    );
    // externalTrafficPolicy Cluster: no health-check port (kube-proxy serves none).
    api.apply(Resource::Services, lb_service("Cluster")).await;
    assert_eq!(next_health(&mut source).await, Vec::new());

    // The cluster autoscaler is about to delete this node.
    assert!(health.status(Instant::now()).node_eligible);
    api.apply(
        Resource::Nodes,
        json!({"metadata": {"name": "node-a"},
               "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}),
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while health.status(Instant::now()).node_eligible {
        assert!(Instant::now() < deadline, "the taint was not seen");
        let _ = tokio::time::timeout(Duration::from_millis(50), source.next_batch()).await;
    }
}
