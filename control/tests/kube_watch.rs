//! The Kubernetes source against an in-process API server (control::fake_api) that speaks
//! list and watch: resourceVersions, paginated lists, chunked watch streams, bookmarks, 410
//! Gone, dropped connections, an API server that is not there, one restored from a backup
//! (its resourceVersion goes backwards), expired continue tokens, stalled watches, 429 with
//! Retry-After. client-go's reflector (`tools/cache/reflector.go`: relist on
//! `isExpiredError` and `isTooLargeResourceVersionError`, back-off reset by success) is the
//! reference for what each fault must lead to.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::time::{timeout_at, Instant};
use xlb_control::config::Config;
use xlb_control::fake_api::{FakeApi, Resource};
use xlb_control::kube_source::watch::WatchOptions;
use xlb_control::kube_source::{KubeMetrics, KubeSource, SourceOptions, ERROR_KINDS};
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
    /// The arrivals each batch reported.
    arrivals: Vec<Vec<std::time::Instant>>,
    metrics: Arc<KubeMetrics>,
}

impl Harness {
    fn new(url: &str, min_sync: Duration) -> Self {
        Self::with(
            url,
            SourceOptions {
                min_sync,
                ..SourceOptions::default()
            },
        )
    }

    fn with(url: &str, options: SourceOptions) -> Self {
        let config = kube::Config::new(url.parse().unwrap());
        let metrics = Arc::new(KubeMetrics::default());
        let source = KubeSource::new(
            config,
            xlb_control::kubernetes::NodeContext::named("node-a"),
            options,
            Arc::clone(&metrics),
        )
        .unwrap();
        let tables = Arc::new(ArcSwap::from_pointee(Tables::empty()));
        let config = Config::parse("interfaces: [a]").unwrap();
        Self {
            source,
            publisher: Publisher::new(&config, tables),
            published: Vec::new(),
            arrivals: Vec::new(),
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
            self.arrivals.push(batch.arrivals);
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
            self.arrivals.push(batch.arrivals);
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

/// Options with a short grace, so that tests see `synced` drop within seconds.
fn quick(watch_timeout: Duration) -> SourceOptions {
    SourceOptions {
        min_sync: Duration::from_millis(10),
        watch: WatchOptions {
            watch_timeout,
            ..WatchOptions::default()
        },
        failing_grace: Duration::from_secs(2),
    }
}

/// Applies `slice` where only a relist will find it: watches dropped while the server
/// refuses connections, the change made, history compacted (so re-watching gets 410).
async fn behind_a_relist(api: &FakeApi, slice: Value) {
    api.set_down(true);
    api.drop_watches();
    api.apply(Resource::EndpointSlices, slice).await;
    api.compact().await;
    api.set_down(false);
}

fn synced(h: &Harness) -> bool {
    h.metrics.synced.load(Ordering::Relaxed)
}

fn refusing(h: &Harness, kind: &str) -> u64 {
    let i = ERROR_KINDS.iter().position(|k| *k == kind).unwrap();
    h.metrics.refusing[i].load(Ordering::Relaxed)
}

/// Item 8: etcd restored from a backup (or a control plane rebuilt at the same address):
/// xlb's resourceVersion is ahead of the server's. client-go relists on
/// `isTooLargeResourceVersionError`; so does xlb, instead of re-watching from its version
/// until the server's counter passes it and then applying only later events.
#[tokio::test]
async fn a_resource_version_ahead_of_a_restored_api_server_leads_to_a_relist() {
    let api = api_with(&[
        ("a", "198.18.64.1", &["198.18.128.1"]),
        ("b", "198.18.64.2", &["198.18.128.2"]),
    ])
    .await;
    let backup = api.backup().await;
    let mut h = Harness::with(&api.url(), quick(Duration::from_secs(60)));
    // After the backup: a deleted, c added, b given a second endpoint.
    api.delete(Resource::Services, "default/a").await;
    api.apply(Resource::Services, service("c", "198.18.64.3"))
        .await;
    api.apply(
        Resource::EndpointSlices,
        slice("b", "b-1", &["198.18.128.2", "198.18.128.20"]),
    )
    .await;
    h.until("the state after the backup", |s| {
        backends(s, "198.18.64.1").is_none()
            && backends(s, "198.18.64.2") == Some(2)
            && backends(s, "198.18.64.3") == Some(0)
    })
    .await;
    let lists = api.lists().await;
    api.restore(backup).await;
    let restored = std::time::Instant::now();
    h.until("the restored state", |s| {
        backends(s, "198.18.64.1") == Some(1)
            && backends(s, "198.18.64.2") == Some(1)
            && backends(s, "198.18.64.3").is_none()
    })
    .await;
    let took = restored.elapsed();
    println!("converged {took:?} after the restore");
    assert!(took < Duration::from_secs(5), "converged in {took:?}");
    assert!(api.lists().await > lists, "listed again");
    assert!(h.metrics.relists.load(Ordering::Relaxed) >= 1);
    assert!(api
        .requests()
        .await
        .iter()
        .any(|r| r.contains("watch=true") && r.contains("resourceVersion=8")));
    // The restored server moves on past xlb's old version: what changes after is seen,
    // and nothing from before the restore comes back.
    for i in 0..8u8 {
        api.apply(
            Resource::EndpointSlices,
            slice("a", "a-1", &first(1 + i % 3)),
        )
        .await;
    }
    api.apply(Resource::Services, service("d", "198.18.64.4"))
        .await;
    h.until("d, after the server's counter passed the old one", |s| {
        backends(s, "198.18.64.4") == Some(0) && backends(s, "198.18.64.1") == Some(2)
    })
    .await;
    assert!(backends(&h.publisher.snapshot(), "198.18.64.3").is_none());
    assert!(synced(&h));
}

/// Item 8: a continue token that expired between two pages of a list (history compacted
/// meanwhile) is answered 410; the list starts again and nothing partial is published.
#[tokio::test]
async fn an_expired_continue_token_starts_the_list_again_and_nothing_partial_is_published() {
    let names = ["a", "b", "c", "d", "e"];
    let api = FakeApi::start().await.unwrap();
    for (i, name) in names.iter().enumerate() {
        let ip = format!("198.18.64.{}", i + 1);
        api.apply(Resource::Services, service(name, &ip)).await;
        api.apply(
            Resource::EndpointSlices,
            slice(name, &format!("{name}-1"), &["198.18.128.1"]),
        )
        .await;
    }
    api.compact_during_next_list();
    let mut options = quick(Duration::from_secs(60));
    options.watch.page_size = 2;
    let mut h = Harness::with(&api.url(), options);
    h.until("five Services", |s| s.len() == 5).await;
    assert_eq!(h.published.len(), 1, "one whole first snapshot");
    assert!(h.metrics.relists.load(Ordering::Relaxed) >= 1);
    let requests = api.requests().await;
    let restarts = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && !r.contains("continue"))
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert!(
        restarts >= 2,
        "the Service list started again: {requests:#?}"
    );
}

/// Item 9: a watch that stays open and silent (no events, no bookmarks, never ended by the
/// server) is dropped after the read timeout and started again from where it was; a watch
/// the server ends on time (`timeoutSeconds`) is resumed without an error or a relist.
#[tokio::test]
async fn a_stalled_watch_is_dropped_and_resumed_within_its_read_timeout() {
    let api = api_with(&[("web", "198.18.64.1", &["198.18.128.1"])]).await;
    let options = quick(Duration::from_secs(2));
    let read_timeout = options.watch.read_timeout();
    let mut h = Harness::with(&api.url(), options);
    h.until("web is served", |s| backends(s, "198.18.64.1") == Some(1))
        .await;
    // Several server-side timeouts pass: watches end and resume quietly.
    h.for_a_while(Duration::from_secs(5)).await;
    let lists = api.lists().await;
    assert_eq!(h.metrics.watch_errors.load(Ordering::Relaxed), 0);
    let watches = api
        .requests()
        .await
        .iter()
        .filter(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true"))
        .inspect(|r| assert!(r.contains("timeoutSeconds=2"), "{r}"))
        .count();
    assert!(watches >= 3, "watches ended on time and resumed: {watches}");
    // Now every watch stalls; a change is made that no open watch will deliver.
    api.stall_watches(true);
    api.apply(Resource::EndpointSlices, slice("web", "web-1", &first(2)))
        .await;
    let stalled = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.stall_watches(false);
    h.until("the change made during the stall", |s| {
        backends(s, "198.18.64.1") == Some(2)
    })
    .await;
    let took = stalled.elapsed();
    println!("seen {took:?} after the stall (read timeout {read_timeout:?})");
    assert!(
        took < read_timeout + Duration::from_secs(2),
        "bounded by the read timeout: {took:?}"
    );
    assert_eq!(api.lists().await, lists, "resumed, not relisted");
}

/// Item 10: 429 with Retry-After (API priority and fairness) is waited out, not hammered
/// at the back-off's pace.
#[tokio::test]
async fn a_throttled_api_server_is_left_alone_for_its_retry_after() {
    let api = api_with(&[("web", "198.18.64.1", &["198.18.128.1"])]).await;
    let mut h = Harness::with(&api.url(), quick(Duration::from_secs(60)));
    h.until("web is served", |s| backends(s, "198.18.64.1") == Some(1))
        .await;
    let before = api.requests().await.len();
    api.throttle(Duration::from_secs(3), 2).await;
    api.drop_watches();
    api.apply(Resource::EndpointSlices, slice("web", "web-1", &first(3)))
        .await;
    let started = std::time::Instant::now();
    h.until("the change, once the throttle is over", |s| {
        backends(s, "198.18.64.1") == Some(3)
    })
    .await;
    let took = started.elapsed();
    let throttled = api.requests().await.len() - before;
    println!("{throttled} requests; converged {took:?} after a 3 s throttle");
    // Three watches, each: 429 at once, 429 after 2 s, served after 4 s. Paced by the
    // back-off (0.2, 0.4, 0.8, 1.6 s) it would be five each within the throttle.
    assert!(throttled <= 12, "{throttled} requests");
    assert!(took >= Duration::from_secs(3));
    assert!(took < Duration::from_secs(7), "{took:?}");
}

/// Items 10 and 11: an outage longer than the back-off's cap, with history compacted
/// meanwhile; within 5 s of the API server answering again the source has relisted and
/// published. `synced` drops while the watches have been failing past the grace period and
/// comes back with the relist.
#[tokio::test]
async fn after_an_outage_the_source_converges_within_five_seconds_and_synced_tells_the_truth() {
    let api = api_with(&[
        ("a", "198.18.64.1", &["198.18.128.1"]),
        ("b", "198.18.64.2", &["198.18.128.2"]),
    ])
    .await;
    let mut h = Harness::with(&api.url(), quick(Duration::from_secs(60)));
    h.until("two Services", |s| s.len() == 2).await;
    assert!(synced(&h));
    api.set_down(true);
    api.drop_watches();
    api.delete(Resource::Services, "default/a").await;
    api.apply(
        Resource::EndpointSlices,
        slice("b", "b-1", &["198.18.128.2", "198.18.128.20"]),
    )
    .await;
    api.compact().await;
    // Longer than the grace (2 s) and than the back-off's cap (3 s) several times over.
    h.for_a_while(Duration::from_secs(8)).await;
    assert!(!synced(&h), "watches failing for 8 s: not synced");
    assert_eq!(
        h.publisher.snapshot().len(),
        2,
        "the last good snapshot stays"
    );
    api.set_down(false);
    let back = std::time::Instant::now();
    h.until("the state after the outage", |s| {
        backends(s, "198.18.64.1").is_none() && backends(s, "198.18.64.2") == Some(2)
    })
    .await;
    let took = back.elapsed();
    println!("converged {took:?} after the API server answered again");
    assert!(took < Duration::from_secs(5), "converged in {took:?}");
    h.for_a_while(Duration::from_millis(1500)).await;
    assert!(synced(&h), "synced again");
}

/// Item 11: a malformed object is counted once, not again on every relist; the gauge of
/// refused objects says how many are refused now.
#[tokio::test]
async fn a_malformed_object_is_counted_once_across_relists_and_the_gauge_follows_it() {
    let api = api_with(&[("good", "198.18.64.1", &["198.18.128.1"])]).await;
    let mut bad = service("bad", "198.18.64.2");
    bad["spec"]["ports"][0]["port"] = json!("eighty");
    api.apply(Resource::Services, bad).await;
    let mut h = Harness::with(&api.url(), quick(Duration::from_secs(60)));
    h.until("good is served", |s| backends(s, "198.18.64.1") == Some(1))
        .await;
    for round in 0..3u8 {
        // A relist, with a change in it so that it is seen to be done.
        behind_a_relist(&api, slice("good", "good-1", &first(round + 2))).await;
        let want = usize::from(round) + 2;
        h.until("the change after the relist", |s| {
            backends(s, "198.18.64.1") == Some(want)
        })
        .await;
    }
    assert!(h.metrics.relists.load(Ordering::Relaxed) >= 3);
    assert_eq!(h.errors("malformed"), 1, "counted once");
    assert_eq!(refusing(&h, "malformed"), 1);
    api.delete(Resource::Services, "default/bad").await;
    api.apply(Resource::Services, service("later", "198.18.64.3"))
        .await;
    h.until("later is served", |s| s.len() == 2).await;
    assert_eq!(refusing(&h, "malformed"), 0, "deleted: refused no more");
    assert_eq!(h.errors("malformed"), 1);
}

/// Item 11: the event-to-live histogram is fed only events that changed some Service's
/// translation, from their arrival; a relist counts once, from when it started.
#[tokio::test]
async fn only_events_that_change_the_dataplane_are_timed_and_a_relist_once() {
    let services: Vec<(String, String)> = (1..=20u8)
        .map(|i| (format!("s{i}"), format!("198.18.64.{i}")))
        .collect();
    let api = FakeApi::start().await.unwrap();
    api.apply(Resource::Nodes, node("zone-a")).await;
    for (name, ip) in &services {
        api.apply(Resource::Services, service(name, ip)).await;
        api.apply(
            Resource::EndpointSlices,
            slice(name, &format!("{name}-1"), &["198.18.128.1"]),
        )
        .await;
    }
    let mut h = Harness::with(&api.url(), quick(Duration::from_secs(60)));
    h.until("twenty Services", |s| s.len() == 20).await;
    let first_batches: usize = h.arrivals.iter().map(Vec::len).sum();
    assert!(
        first_batches <= 2,
        "the first lists are one or two arrivals, not one per object: {:?}",
        h.arrivals
    );
    // A malformed change, then a real one: only the real one is timed, from its arrival.
    let mut bad = service("s1", "198.18.64.1");
    bad["spec"]["ports"][0]["port"] = json!("eighty");
    api.apply(Resource::Services, bad).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let real = std::time::Instant::now();
    api.apply(Resource::EndpointSlices, slice("s2", "s2-1", &first(2)))
        .await;
    h.arrivals.clear();
    h.until("s2 changed", |s| backends(s, "198.18.64.2") == Some(2))
        .await;
    let timed: Vec<_> = h.arrivals.iter().flatten().collect();
    assert_eq!(timed.len(), 1, "{timed:?}");
    assert!(*timed[0] >= real, "from the real change's arrival");
    // A relist that changes one Service of twenty: one arrival.
    h.arrivals.clear();
    behind_a_relist(&api, slice("s3", "s3-1", &first(3))).await;
    h.until("s3 changed", |s| backends(s, "198.18.64.3") == Some(3))
        .await;
    let timed: usize = h.arrivals.iter().map(Vec::len).sum();
    assert_eq!(timed, 1, "{:?}", h.arrivals);
}

/// Issue 16 item 2: two Services at one VIP and port. The one that claimed the key first
/// keeps it and the other is refused (counted as a conflict); when the first goes, the other
/// is served in the same publication that removes it: no snapshot without the key between.
#[tokio::test]
async fn a_key_two_services_want_stays_with_the_first_and_passes_to_the_other_at_once() {
    let a = first(1);
    let b = ["198.18.128.5", "198.18.128.6", "198.18.128.7"];
    let api = api_with(&[("a", "198.18.64.1", &[&a[0]]), ("b", "198.18.64.1", &b)]).await;
    let mut h = Harness::new(&api.url(), Duration::from_millis(10));
    h.until("the first claimant serves the key", |s| {
        backends(s, "198.18.64.1") == Some(1)
    })
    .await;
    assert_eq!(refusing(&h, "conflict"), 1, "b is refused");
    let before = h.published.len();
    api.delete(Resource::Services, "default/a").await;
    h.until("the other Service serves it", |s| {
        backends(s, "198.18.64.1") == Some(3)
    })
    .await;
    assert!(
        h.published[before..]
            .iter()
            .all(|s| backends(s, "198.18.64.1").is_some()),
        "a snapshot without the key was published"
    );
    h.for_a_while(Duration::from_millis(200)).await;
    assert_eq!(refusing(&h, "conflict"), 0, "nothing is refused any more");
}
