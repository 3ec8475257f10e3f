//! An in-process Kubernetes API server for tests and benchmarks (feature `fake-api`): it
//! serves Services, EndpointSlices and Nodes with the API's list and watch semantics, and
//! lets a test break it the ways the real one breaks.
//!
//! What it speaks, as the API server does: lists with a resourceVersion and pagination
//! (`limit`, `continue`; items without kind and apiVersion), `fieldSelector=metadata.name=`,
//! watches from a resourceVersion (the events since, then live ones) as a chunked stream of
//! JSON lines (ADDED, MODIFIED, DELETED with kind and apiVersion), BOOKMARK events when asked
//! for, and a watch from a compacted resourceVersion answered with an ERROR event carrying a
//! 410 Expired Status, a watch from a resourceVersion the server has not reached answered
//! 504 "Too large resource version" (as after a restore from backup), a continue token from
//! before a compaction answered 410, watches ended after their `timeoutSeconds`, 429 with
//! `Retry-After` when throttling. Objects get resourceVersion, uid, creationTimestamp and
//! managedFields as the API sets them. What a test can do to it: change objects, send
//! bookmarks, compact history (also in the middle of a paginated list), drop every open
//! watch connection, stall watches (open, silent, never ending), throttle, refuse connections
//! for a while (a lost API server), and restore an earlier state (its resourceVersion goes
//! backwards).
//!
//! Test tooling only: its state sits behind an async mutex, which xlb itself never uses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod http;

use http::{chunk, hang, percent_decode, read_head, respond, respond_with, status};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, Mutex};

/// A resource the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    /// v1 Services.
    Services,
    /// discovery.k8s.io/v1 EndpointSlices.
    EndpointSlices,
    /// v1 Nodes.
    Nodes,
}

impl Resource {
    const ALL: [Self; 3] = [Self::Services, Self::EndpointSlices, Self::Nodes];

    fn path(self) -> &'static str {
        match self {
            Self::Services => "/api/v1/services",
            Self::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Self::Nodes => "/api/v1/nodes",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
struct Change {
    resource: Resource,
    rv: u64,
    kind: &'static str,
    object: Value,
}

/// What watches are told besides changes.
#[derive(Clone, Debug)]
enum Signal {
    Change(Change),
    Bookmark,
    Drop,
    Stall,
}

/// The server's objects and history at one moment (see [`FakeApi::backup`]).
#[derive(Clone, Debug, Default)]
pub struct Backup(State);

#[derive(Clone, Debug, Default)]
struct State {
    rv: u64,
    /// Objects by resource, then `namespace/name`.
    objects: BTreeMap<Resource, BTreeMap<String, Value>>,
    /// Changes after `compacted`, oldest first.
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
}

/// The running fake; it stops with the runtime it was started on.
#[derive(Debug, Clone)]
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    signals: broadcast::Sender<Signal>,
    down: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    /// Compact history right after serving the next first page of a paginated list.
    compact_mid_list: Arc<AtomicBool>,
    /// Until when requests get 429, and the Retry-After they carry.
    throttle: Arc<Mutex<Option<(Instant, u64)>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    /// Starts serving on 127.0.0.1 at a free port.
    ///
    /// # Errors
    /// The listener could not be bound.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_at("127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!())).await
    }

    /// Starts serving at `addr` (to come back at the address a client already uses).
    ///
    /// # Errors
    /// The listener could not be bound.
    pub async fn start_at(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let (signals, _) = broadcast::channel(1 << 16);
        let api = Self {
            addr: listener.local_addr()?,
            state: Arc::new(Mutex::new(State::default())),
            signals,
            down: Arc::new(AtomicBool::new(false)),
            stalled: Arc::new(AtomicBool::new(false)),
            compact_mid_list: Arc::new(AtomicBool::new(false)),
            throttle: Arc::new(Mutex::new(None)),
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Events go out as they happen, as the API server sends them.
                let _ = stream.set_nodelay(true);
                let server = server.clone();
                tokio::spawn(async move { server.connection(stream).await });
            }
        });
        Ok(api)
    }

    /// The URL a client configuration points at.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (a Service, EndpointSlice or Node as JSON; its
    /// namespace and name say which). Returns its new resourceVersion.
    pub async fn apply(&self, resource: Resource, mut object: Value) -> u64 {
        let mut state = self.state.lock().await;
        state.rv += 1;
        let rv = state.rv;
        let name = object_name(&object);
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
            meta["creationTimestamp"] = json!("2026-11-26T00:00:00Z");
            meta["managedFields"] = json!([{
                "manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": resource.api_version(), "time": "2026-11-26T00:00:00Z",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}
            }]);
        }
        let existed = state
            .objects
            .entry(resource)
            .or_default()
            .insert(name, object.clone())
            .is_some();
        let change = Change {
            resource,
            rv,
            kind: if existed { "MODIFIED" } else { "ADDED" },
            object,
        };
        state.history.push(change.clone());
        let _ = self.signals.send(Signal::Change(change));
        rv
    }

    /// Deletes an object by `namespace/name` (`name` alone for Nodes). Returns whether it
    /// was there.
    pub async fn delete(&self, resource: Resource, name: &str) -> bool {
        let mut state = self.state.lock().await;
        let Some(mut object) = state
            .objects
            .get_mut(&resource)
            .and_then(|m| m.remove(name))
        else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            resource,
            rv,
            kind: "DELETED",
            object,
        };
        state.history.push(change.clone());
        let _ = self.signals.send(Signal::Change(change));
        true
    }

    /// Sends a BOOKMARK (the current resourceVersion) on every watch that asked for them.
    pub async fn bookmark(&self) {
        let _guard = self.state.lock().await;
        let _ = self.signals.send(Signal::Bookmark);
    }

    /// Forgets history: a watch from an older resourceVersion gets 410 Gone.
    pub async fn compact(&self) {
        let mut state = self.state.lock().await;
        state.compacted = state.rv;
        state.history.clear();
    }

    /// Closes every open watch connection mid-stream, without a final chunk.
    pub fn drop_watches(&self) {
        let _ = self.signals.send(Signal::Drop);
    }

    /// The current objects and history, to [`FakeApi::restore`] later.
    pub async fn backup(&self) -> Backup {
        Backup(self.state.lock().await.clone())
    }

    /// Goes back to `backup`, as an API server whose etcd was restored from it: objects,
    /// history and resourceVersion as they were then (so a client's resourceVersion may now
    /// be ahead of the server's). Open watches are dropped.
    pub async fn restore(&self, backup: Backup) {
        *self.state.lock().await = backup.0;
        let _ = self.signals.send(Signal::Drop);
    }

    /// Compacts history right after the next first page of a paginated list is served, so
    /// that its continue token has expired when the client asks for the second page.
    pub fn compact_during_next_list(&self) {
        // Relaxed: a flag read on its own.
        self.compact_mid_list.store(true, Ordering::Relaxed);
    }

    /// While stalled, watches (those open now and those started meanwhile) send nothing more
    /// and never end; connections stay open. Watches started after it are served again.
    pub fn stall_watches(&self, stalled: bool) {
        // Relaxed: a flag read on its own.
        self.stalled.store(stalled, Ordering::Relaxed);
        if stalled {
            let _ = self.signals.send(Signal::Stall);
        }
    }

    /// For `window`, every request is answered 429 Too Many Requests with `Retry-After:
    /// retry_after_s` (and `details.retryAfterSeconds`), as an API server under priority and
    /// fairness limits answers.
    pub async fn throttle(&self, window: Duration, retry_after_s: u64) {
        *self.throttle.lock().await = Some((Instant::now() + window, retry_after_s));
    }

    /// While down, connections are closed as soon as they are accepted.
    pub fn set_down(&self, down: bool) {
        // Relaxed: a flag read on its own.
        self.down.store(down, Ordering::Relaxed);
    }

    /// Requests served so far (`path?query`), oldest first.
    pub async fn requests(&self) -> Vec<String> {
        self.requests.lock().await.clone()
    }

    /// List requests served so far (pages counted one by one): the requests that were not
    /// watches.
    pub async fn lists(&self) -> usize {
        self.requests
            .lock()
            .await
            .iter()
            .filter(|r| !r.contains("watch=true") && !r.contains("watch=1"))
            .count()
    }

    async fn connection(&self, mut stream: TcpStream) {
        let mut buf = Vec::with_capacity(4096);
        // Keep-alive: serve requests until the client closes or a watch ends the connection.
        loop {
            // Relaxed: see set_down.
            if self.down.load(Ordering::Relaxed) {
                return;
            }
            let Some(head) = read_head(&mut stream, &mut buf).await else {
                return;
            };
            let target = head
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("/")
                .to_owned();
            self.requests.lock().await.push(target.clone());
            if let Some(retry_after) = self.throttled().await {
                let mut body: Value = serde_json::from_str(&status(
                    429,
                    "TooManyRequests",
                    "too many requests, please try again later",
                ))
                .unwrap_or_default();
                body["details"] = json!({ "retryAfterSeconds": retry_after });
                let header = format!("Retry-After: {retry_after}\r\n");
                if respond_with(&mut stream, 429, &header, &body.to_string())
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
            let params: BTreeMap<String, String> = query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), percent_decode(v)))
                .collect();
            let Some(resource) = Resource::ALL.into_iter().find(|r| r.path() == path) else {
                let body = status(404, "NotFound", &format!("{path} is not served here"));
                if respond(&mut stream, 404, &body).await.is_err() {
                    return;
                }
                continue;
            };
            let watching = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
            if watching {
                self.watch(stream, resource, &params).await;
                return;
            }
            let (code, body) = self.list(resource, &params).await;
            if respond(&mut stream, code, &body).await.is_err() {
                return;
            }
        }
    }

    /// The Retry-After of a throttle in force.
    async fn throttled(&self) -> Option<u64> {
        let (until, retry_after) = (*self.throttle.lock().await)?;
        (Instant::now() < until).then_some(retry_after)
    }

    async fn list(&self, resource: Resource, params: &BTreeMap<String, String>) -> (u16, String) {
        let mut state = self.state.lock().await;
        let all: Vec<&Value> = state
            .objects
            .get(&resource)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|o| selected(o, params))
            .collect();
        // A continue token: where the next page starts, and the resourceVersion of the list.
        let token: Option<(usize, u64)> = params
            .get("continue")
            .and_then(|c| c.strip_prefix("page-"))
            .and_then(|c| c.split_once('-'))
            .and_then(|(start, rv)| Some((start.parse().ok()?, rv.parse().ok()?)));
        if let Some((_, rv)) = token {
            if rv < state.compacted {
                let body = status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                );
                return (410, body);
            }
        }
        let start = token.map_or(0, |(start, _)| start);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|&l| l > 0)
            .unwrap_or(usize::MAX);
        let end = start.saturating_add(limit).min(all.len());
        let list_rv = token.map_or(state.rv, |(_, rv)| rv);
        let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
        if end < all.len() {
            metadata["continue"] = json!(format!("page-{end}-{list_rv}"));
            metadata["remainingItemCount"] = json!(all.len() - end);
        }
        // List items carry neither kind nor apiVersion; the list does.
        let mut out = format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
            resource.kind(),
            resource.api_version(),
            metadata
        );
        for (i, o) in all.get(start..end).unwrap_or(&[]).iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&o.to_string());
        }
        out.push_str("]}");
        // Relaxed: see compact_during_next_list.
        if end < all.len() && start == 0 && self.compact_mid_list.swap(false, Ordering::Relaxed) {
            drop(all);
            // A write after the list, then compaction: the list's continue token is too old.
            state.rv += 1;
            state.compacted = state.rv;
            state.history.clear();
        }
        (200, out)
    }

    async fn watch(
        &self,
        mut stream: TcpStream,
        resource: Resource,
        params: &BTreeMap<String, String>,
    ) {
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let ends = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        // Subscribe before reading history so nothing falls between the two.
        let mut signals = self.signals.subscribe();
        let (backlog, expired, mut seen) = {
            let state = self.state.lock().await;
            if from > state.rv {
                // As the watch cache answers a version it has not reached (after waiting).
                let mut body: Value = serde_json::from_str(&status(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {from}, current: {}", state.rv),
                ))
                .unwrap_or_default();
                body["details"] = json!({
                    "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                    "retryAfterSeconds": 1,
                });
                drop(state);
                let _ = respond(&mut stream, 504, &body.to_string()).await;
                return;
            }
            let expired = from < state.compacted;
            let backlog: Vec<Change> = state
                .history
                .iter()
                .filter(|c| c.resource == resource && c.rv > from)
                .cloned()
                .collect();
            (backlog, expired, state.rv.max(from))
        };
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if expired {
            let error = json!({
                "type": "ERROR",
                "object": serde_json::from_str::<Value>(&status(410, "Expired",
                    &format!("too old resource version: {from}"))).unwrap_or_default(),
            });
            let _ = chunk(&mut stream, &error.to_string()).await;
            let _ = stream.write_all(b"0\r\n\r\n").await;
            return;
        }
        // Relaxed: see stall_watches.
        if self.stalled.load(Ordering::Relaxed) {
            return hang(stream).await;
        }
        for change in backlog {
            if chunk(&mut stream, &event(&change)).await.is_err() {
                return;
            }
        }
        loop {
            let signal = tokio::select! {
                s = signals.recv() => s,
                () = until(ends) => {
                    // Ended on time, as the API server ends a watch: the final chunk.
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                    return;
                }
            };
            match signal {
                Ok(Signal::Change(change)) if change.resource == resource && change.rv > from => {
                    seen = seen.max(change.rv);
                    if chunk(&mut stream, &event(&change)).await.is_err() {
                        return;
                    }
                }
                Ok(Signal::Bookmark) if bookmarks => {
                    let rv = self.state.lock().await.rv.max(seen);
                    let mark = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": resource.kind(),
                            "apiVersion": resource.api_version(),
                            "metadata": { "resourceVersion": rv.to_string() },
                        }
                    });
                    if chunk(&mut stream, &mark.to_string()).await.is_err() {
                        return;
                    }
                }
                // Dropped: close without the final chunk, as a lost connection does.
                Ok(Signal::Drop) | Err(broadcast::error::RecvError::Closed) => return,
                Ok(Signal::Stall) => return hang(stream).await,
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn object_name(object: &Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// Whether an object passes the request's field selector (`metadata.name=` only).
fn selected(object: &Value, params: &BTreeMap<String, String>) -> bool {
    match params
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
    {
        Some(name) => object["metadata"]["name"].as_str() == Some(name),
        None => true,
    }
}

fn event(change: &Change) -> String {
    let mut object = change.object.clone();
    object["kind"] = json!(change.resource.kind());
    object["apiVersion"] = json!(change.resource.api_version());
    // "type" first, as the API server writes it.
    format!("{{\"type\":\"{}\",\"object\":{}}}", change.kind, object)
}
