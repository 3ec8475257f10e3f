//! The Kubernetes source against an in-process API server (control::fake_api) that speaks
//! list and watch: resourceVersions, paginated lists, chunked watch streams, bookmarks, 410
//! Gone, dropped connections, an API server that is not there.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::time::{timeout_at, Instant};
use xlb_control::config::Config;
use xlb_control::fake_api::{FakeApi, Resource};
use xlb_control::kube_source::{KubeMetrics, KubeSource, ERROR_KINDS};
use xlb_control::publish::{NoSteering, Publisher};
use xlb_dataplane::lb::snapshot::{ServiceKey, Snapshot};
use xlb_dataplane::packet::{Endpoint, IpProto};
use xlb_dataplane::worker::Tables;

/// How long any one expectation may take.
const PATIENCE: Duration = Duration::from_secs(15);

fn service(name: &str, ip: &str) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}]},
    })
}

/// The addresses of backends 1 to `n`.
fn first(n: u8) -> Vec<String> {
    (1..=n).map(|i| format!("198.18.128.{i}")).collect()
}

fn slice<A: AsRef<str>>(service: &str, name: &str, addresses: &[A]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(AsRef::as_ref)
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": "node-a", "zone": "zone-a"}))
        .collect();
    json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    })
}

fn node(zone: &str) -> Value {
    json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": zone}}})
}

fn key(ip: &str) -> ServiceKey {
    ServiceKey {
        vip: Endpoint::new(ip.parse().unwrap(), 80),
        proto: IpProto::TCP,
    }
}

fn backends(snapshot: &Snapshot, ip: &str) -> Option<usize> {
    snapshot.service(&key(ip)).map(|s| s.spec().backends.len())
}

struct Harness {
    source: KubeSource,
    publisher: Publisher,
    published: Vec<Arc<Snapshot>>,
    metrics: Arc<KubeMetrics>,
}

impl Harness {
    fn new(url: &str, min_sync: Duration) -> Self {
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let metrics = Arc::new(KubeMetrics::default());
        let source = KubeSource::new(
            &client,
            xlb_control::kubernetes::NodeContext::named("node-a"),
            min_sync,
            Arc::clone(&metrics),
        );
        let tables = Arc::new(ArcSwap::from_pointee(Tables::empty()));
        let config = Config::parse("interfaces: [a]").unwrap();
        Self {
            source,
            publisher: Publisher::new(&config, tables),
            published: Vec::new(),
            metrics,
        }
    }

    /// Publishes batches until `done` holds for the live snapshot; panics after PATIENCE.
    async fn until(&mut self, what: &str, done: impl Fn(&Snapshot) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(&self.publisher.snapshot()) {
            let Ok(batch) = timeout_at(deadline, self.source.next_batch()).await else {
                panic!("timed out waiting until {what}");
            };
            self.publisher
                .publish_kubernetes(batch.change, &mut NoSteering)
                .unwrap();
            self.published.push(self.publisher.snapshot());
        }
    }

    /// Publishes whatever comes within `window`; returns how many batches came.
    async fn for_a_while(&mut self, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut n = 0;
        while let Ok(batch) = timeout_at(deadline, self.source.next_batch()).await {
            self.publisher
                .publish_kubernetes(batch.change, &mut NoSteering)
                .unwrap();
            self.published.push(self.publisher.snapshot());
            n += 1;
        }
        n
    }

    fn errors(&self, kind: &str) -> u64 {
        let i = ERROR_KINDS.iter().position(|k| *k == kind).unwrap();
        self.metrics.errors[i].load(Ordering::Relaxed)
    }
}

async fn api_with(services: &[(&str, &str, &[&str])]) -> FakeApi {
    let api = FakeApi::start().await.unwrap();
    api.apply(Resource::Nodes, node("zone-a")).await;
    for (name, ip, addresses) in services {
        api.apply(Resource::Services, service(name, ip)).await;
        api.apply(
            Resource::EndpointSlices,
            slice(name, &format!("{name}-1"), addresses),
        )
        .await;
    }
    api
}

#[tokio::test]
async fn a_list_then_a_watch_publishes_services_and_follows_endpoint_changes_across_bookmarks() {
    let api = api_with(&[("web", "198.18.64.1", &["198.18.128.1", "198.18.128.2"])]).await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(10));
    h.until("web has two backends", |s| {
        backends(s, "198.18.64.1") == Some(2)
    })
    .await;
    api.bookmark().await;
    api.apply(
        Resource::EndpointSlices,
        slice(
            "web",
            "web-1",
            &["198.18.128.1", "198.18.128.2", "198.18.128.3"],
        ),
    )
    .await;
    h.until("web has three backends", |s| {
        backends(s, "198.18.64.1") == Some(3)
    })
    .await;
    // A second slice of the same Service merges in; a Service without a slice has no
    // backends (and rejects), it does not vanish.
    api.apply(
        Resource::EndpointSlices,
        slice("web", "web-2", &["198.18.128.9"]),
    )
    .await;
    api.apply(Resource::Services, service("empty", "198.18.64.2"))
        .await;
    h.until("web has four backends and empty none", |s| {
        backends(s, "198.18.64.1") == Some(4) && backends(s, "198.18.64.2") == Some(0)
    })
    .await;
    api.delete(Resource::Services, "default/web").await;
    h.until("web is gone", |s| backends(s, "198.18.64.1").is_none())
        .await;
    // The watch asked for bookmarks and started from the list's resourceVersion.
    let requests = api.requests().await;
    let list = requests
        .iter()
        .find(|r| r.starts_with("/api/v1/services?") && !r.contains("watch=true"))
        .unwrap();
    assert!(list.contains("limit=500"), "{list}");
    let watch = requests
        .iter()
        .find(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true"))
        .unwrap();
    assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");
    assert!(
        watch.ends_with("resourceVersion=3"),
        "from the list's version: {watch}"
    );
    assert_eq!(h.metrics.services.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_dropped_watch_connection_resumes_from_where_it_was_without_a_relist() {
    let api = api_with(&[("web", "198.18.64.1", &["198.18.128.1"])]).await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(10));
    h.until("web is served", |s| backends(s, "198.18.64.1") == Some(1))
        .await;
    let lists = api.lists().await;
    for round in 0..3u8 {
        api.drop_watches();
        api.apply(
            Resource::EndpointSlices,
            slice("web", "web-1", &first(round + 2)),
        )
        .await;
        let want = usize::from(round) + 2;
        h.until("the change after the drop is seen", |s| {
            backends(s, "198.18.64.1") == Some(want)
        })
        .await;
    }
    assert_eq!(
        api.lists().await,
        lists,
        "watches resumed; nothing was listed again"
    );
}

#[tokio::test]
async fn an_expired_watch_relists_and_keeps_every_unchanged_service_live_throughout() {
    let api = api_with(&[
        ("a", "198.18.64.1", &["198.18.128.1"]),
        ("b", "198.18.64.2", &["198.18.128.2"]),
        ("c", "198.18.64.3", &["198.18.128.3"]),
    ])
    .await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(10));
    h.until("three Services", |s| s.len() == 3).await;
    let lists = api.lists().await;
    // The API server goes away; while it is away, things change and history is compacted.
    api.set_down(true);
    api.drop_watches();
    api.delete(Resource::Services, "default/c").await;
    api.apply(
        Resource::EndpointSlices,
        slice("b", "b-1", &["198.18.128.2", "198.18.128.20"]),
    )
    .await;
    api.apply(Resource::Services, service("d", "198.18.64.4"))
        .await;
    api.apply(
        Resource::EndpointSlices,
        slice("d", "d-1", &["198.18.128.4"]),
    )
    .await;
    api.compact().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_down(false);
    h.until("the relisted state", |s| {
        backends(s, "198.18.64.3").is_none()
            && backends(s, "198.18.64.2") == Some(2)
            && backends(s, "198.18.64.4") == Some(1)
    })
    .await;
    assert!(
        api.lists().await > lists,
        "the expired watch was followed by a list"
    );
    assert!(h.metrics.watch_errors.load(Ordering::Relaxed) > 0);
    for snapshot in &h.published {
        assert_eq!(
            backends(snapshot, "198.18.64.1"),
            Some(1),
            "a, unchanged, stayed live in every published snapshot"
        );
    }
}

#[tokio::test]
async fn a_malformed_object_is_skipped_with_a_counter_and_the_others_are_served() {
    let api = api_with(&[("good", "198.18.64.1", &["198.18.128.1"])]).await;
    let mut bad = service("bad", "198.18.64.2");
    bad["spec"]["ports"][0]["port"] = json!("eighty");
    api.apply(Resource::Services, bad).await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(10));
    h.until("good is served", |s| backends(s, "198.18.64.1") == Some(1))
        .await;
    assert!(h.errors("malformed") >= 1);
    assert_eq!(h.publisher.snapshot().len(), 1);
    // Fixed, it is served.
    api.apply(Resource::Services, service("bad", "198.18.64.2"))
        .await;
    h.until("the fixed Service is served", |s| s.len() == 2)
        .await;
    // Broken again over a watch: skipped, its last good version stays.
    let mut bad = service("bad", "198.18.64.2");
    bad["spec"]["clusterIPs"] = json!(17);
    api.apply(Resource::Services, bad).await;
    api.apply(Resource::Services, service("later", "198.18.64.3"))
        .await;
    h.until("a later Service is served", |s| s.len() == 3).await;
    assert!(h.errors("malformed") >= 2);
}

#[tokio::test]
async fn an_api_server_that_is_not_there_is_retried_with_backoff_until_it_answers() {
    // A free port with nothing listening on it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut h = Harness::new(&format!("http://{addr}"), Duration::from_millis(10));
    let batches = h.for_a_while(Duration::from_secs(2)).await;
    assert_eq!(batches, 0, "nothing is published without the API");
    let errors = h.metrics.watch_errors.load(Ordering::Relaxed);
    assert!(errors >= 3, "each watch failed at least once: {errors}");
    assert!(errors < 100, "with backoff, not in a tight loop: {errors}");
    let api = FakeApi::start_at(addr).await.unwrap();
    api.apply(Resource::Services, service("web", "198.18.64.1"))
        .await;
    api.apply(
        Resource::EndpointSlices,
        slice("web", "web-1", &["198.18.128.1"]),
    )
    .await;
    h.until("served once the API answers", |s| {
        backends(s, "198.18.64.1") == Some(1)
    })
    .await;
}

#[tokio::test]
async fn this_nodes_zone_comes_from_its_node_object_and_steers_prefer_same_zone() {
    let api = FakeApi::start().await.unwrap();
    api.apply(Resource::Nodes, node("zone-b")).await;
    let mut web = service("web", "198.18.64.1");
    web["spec"]["trafficDistribution"] = json!("PreferSameZone");
    api.apply(Resource::Services, web).await;
    let mut s = slice(
        "web",
        "web-1",
        &["198.18.128.1", "198.18.128.2", "198.18.128.3"],
    );
    s["endpoints"][2]["zone"] = json!("zone-b");
    api.apply(Resource::EndpointSlices, s).await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(10));
    h.until("only the zone-b endpoint", |s| {
        backends(s, "198.18.64.1") == Some(1)
    })
    .await;
    // The node moves to zone-a (a relabel): two endpoints there.
    api.apply(Resource::Nodes, node("zone-a")).await;
    h.until("the zone-a endpoints", |s| {
        backends(s, "198.18.64.1") == Some(2)
    })
    .await;
    assert!(api
        .requests()
        .await
        .iter()
        .any(|r| r.starts_with("/api/v1/nodes?")
            && r.contains("fieldSelector=metadata.name%3Dnode-a")));
}

#[tokio::test]
async fn changes_within_the_minimum_sync_period_are_published_together() {
    let api = api_with(&[("web", "198.18.64.1", &["198.18.128.1"])]).await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(300));
    h.until("web is served", |s| backends(s, "198.18.64.1") == Some(1))
        .await;
    let before = h.published.len();
    for n in 2..=21u8 {
        api.apply(Resource::EndpointSlices, slice("web", "web-1", &first(n)))
            .await;
    }
    h.until("all twenty changes", |s| {
        backends(s, "198.18.64.1") == Some(21)
    })
    .await;
    let publications = h.published.len() - before;
    assert!(
        (1..=3).contains(&publications),
        "20 changes in one burst took {publications} publications"
    );
}
