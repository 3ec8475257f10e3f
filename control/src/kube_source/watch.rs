//! One resource's list and watch, as client-go's reflector drives it, with the failures of a
//! real API server told apart.
//!
//! Owns: paginated lists (a failed page starts the list again), watches from the list's
//! resourceVersion with bookmarks and a server-side timeout, the client's idle read timeout
//! (a watch that stalls without ending is dropped and started again), and what each failure
//! means:
//! * "your resourceVersion is unusable" — 410 Gone or Expired (compacted history, an expired
//!   continue token), 504 "Too large resource version" (an API server restored from a
//!   backup, whose counter went backwards) — relists at once;
//! * 429 Too Many Requests waits for the server's `Retry-After` (seen by [`RetryAfter`] on
//!   the response) or the back-off, whichever is longer;
//! * anything else retries after a back-off (exponential with jitter, capped, reset by the
//!   first answer), so recovery after an outage takes at most the cap.
//!
//! Each step reports [`Progress`]: an event, an answer from the server (a failure streak is
//! over), or a failure.
//!
//! Must not know: what the objects mean (the store), how often the source publishes.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::core::ErrorResponse;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::store::{Event, Lenient};

/// How a watch is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// Objects per list page.
    pub page_size: u32,
    /// How long the API server keeps a watch open before ending it (`timeoutSeconds`); the
    /// client gives up on a connection that stays silent a little longer than this.
    pub watch_timeout: Duration,
    /// The first retry's delay after a failure.
    pub backoff_min: Duration,
    /// The longest delay between retries.
    pub backoff_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            page_size: 500,
            watch_timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(3),
        }
    }
}

impl WatchOptions {
    /// How long a connection may stay silent before the client drops it: the watch timeout
    /// and a margin, so that a watch the server ends on time never trips it.
    #[must_use]
    pub fn read_timeout(&self) -> Duration {
        self.watch_timeout + (self.watch_timeout / 4).max(Duration::from_secs(1))
    }
}

/// The latest `Retry-After` the API server sent, as an instant to wait for (milliseconds
/// since `base`); shared by the client's middleware, which sees response headers, and the
/// watches, which see only the error they became.
#[derive(Debug)]
pub struct RetryAfter {
    base: Instant,
    until_ms: AtomicU64,
}

impl Default for RetryAfter {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl RetryAfter {
    /// Notes a response's `Retry-After` header (seconds; an HTTP date is not used by the API
    /// server and is ignored).
    pub fn note<B>(&self, response: &http::Response<B>) {
        let Some(secs) = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            return;
        };
        // At most ten minutes: a confused server does not silence xlb for a day.
        let until = Instant::now() + Duration::from_secs(secs.min(600));
        let ms = u64::try_from(until.duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        // Relaxed: a hint read on its own.
        self.until_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the server asked to be left alone until, if that is still ahead.
    #[must_use]
    pub fn until(&self) -> Option<Instant> {
        // Relaxed: see note.
        let at = self.base + Duration::from_millis(self.until_ms.load(Ordering::Relaxed));
        (at > Instant::now()).then_some(at)
    }
}

/// What one step of a watch gave.
#[derive(Debug)]
pub enum Progress<K> {
    /// An event for the store (a relist is `Init`, the objects, `InitDone`).
    Event(Box<Event<Lenient<K>>>),
    /// The API server answered a list or watch request: a failure streak is over.
    Answered,
    /// The server said the resourceVersion is unusable (why): the watch lists again.
    Relisting(String),
    /// A request or a watch failed; the next request waits `retry_in`.
    Failed {
        /// What went wrong.
        error: String,
        /// The back-off (or the server's `Retry-After`).
        retry_in: Duration,
    },
    /// A watch event that did not decode was skipped; the watch goes on.
    Skipped(String),
}

/// What a failure means for the next request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meaning {
    /// The resourceVersion (or continue token) is unusable: list again.
    Desync,
    /// The server is overloaded: wait as long as it asks.
    Throttled,
    /// Anything else: back off and retry the same request.
    Other,
}

fn meaning(e: &ErrorResponse) -> Meaning {
    let too_large = e.code == 504
        && (e.reason == "ResourceVersionTooLarge"
            || e.message
                .to_ascii_lowercase()
                .contains("too large resource version"));
    match e.code {
        410 => Meaning::Desync,
        _ if too_large => Meaning::Desync,
        429 => Meaning::Throttled,
        _ => Meaning::Other,
    }
}

fn meaning_of(e: &kube::Error) -> Meaning {
    match e {
        kube::Error::Api(r) => meaning(r),
        _ => Meaning::Other,
    }
}

/// A line of a watch response.
enum Line<K> {
    /// An object added or modified.
    Apply(Box<Lenient<K>>),
    /// An object deleted.
    Delete(Box<Lenient<K>>),
    /// A bookmark: the resourceVersion the watch has reached.
    Bookmark(String),
    /// An error event, or a Status in place of an event.
    Api(ErrorResponse),
    /// A line that is neither.
    Undecodable(String),
    /// The connection broke, or stayed silent past the read timeout.
    Broken(String),
}

type EventStream<K> = BoxStream<'static, Line<K>>;

/// The longest watch line read: one object, with room to spare (the API server's own limit
/// on an object is 1.5 MiB in etcd).
const MAX_LINE: usize = 64 << 20;

/// The lines of a watch response's body, decoded.
fn watch_lines<K: DeserializeOwned + Send + 'static>(body: kube::client::Body) -> EventStream<K> {
    use http_body_util::BodyExt;
    let lines = futures::stream::unfold(
        (body, Vec::<u8>::new(), false),
        |(mut body, mut buf, mut ended)| async move {
            loop {
                if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    return Some((Ok(line), (body, buf, ended)));
                }
                if ended {
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    let line = std::mem::take(&mut buf);
                    return Some((Ok(line), (body, buf, ended)));
                }
                if buf.len() > MAX_LINE {
                    let e = format!("a watch line longer than {MAX_LINE} bytes");
                    return Some((Err(e), (body, Vec::new(), true)));
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => return Some((Err(e.to_string()), (body, Vec::new(), true))),
                    None => ended = true,
                }
            }
        },
    );
    lines
        .filter_map(|line| async move {
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Line::Broken(e)),
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                return None;
            }
            Some(
                match serde_json::from_slice::<WatchEvent<Lenient<K>>>(&line) {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => Line::Apply(Box::new(o)),
                    Ok(WatchEvent::Deleted(o)) => Line::Delete(Box::new(o)),
                    Ok(WatchEvent::Bookmark(b)) => Line::Bookmark(b.metadata.resource_version),
                    Ok(WatchEvent::Error(e)) => Line::Api(e),
                    Err(e) => match serde_json::from_slice::<ErrorResponse>(&line) {
                        Ok(status) => Line::Api(status),
                        Err(_) => Line::Undecodable(e.to_string()),
                    },
                },
            )
        })
        .boxed()
}

enum State<K> {
    /// Listing: the next page's continue token (`None`: the first page).
    List { continue_token: Option<String> },
    /// Listed or watched up to `version`: the next request is a watch from there.
    Watch { version: String },
    /// Watching.
    Watching {
        version: String,
        stream: EventStream<K>,
    },
}

/// One resource's list and watch.
pub struct Watch<K> {
    api: Api<Lenient<K>>,
    client: Client,
    fields: Option<String>,
    options: WatchOptions,
    retry_after: Arc<RetryAfter>,
    state: State<K>,
    pending: VecDeque<Progress<K>>,
    /// Failures since the last answer.
    failures: u32,
    /// Desyncs since the last event: the first relists at once, more back off.
    desyncs: u32,
    /// No request before this.
    not_before: Option<Instant>,
    random: RandomState,
}

impl<K> Debug for Watch<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("fields", &self.fields)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl<K> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    /// A watch of every `K` (those whose fields match `fields`, if given) through `client`;
    /// nothing is requested before the first [`Watch::next`].
    pub fn new(
        client: &Client,
        fields: Option<String>,
        options: WatchOptions,
        retry_after: Arc<RetryAfter>,
    ) -> Self {
        Self {
            api: Api::all(client.clone()),
            client: client.clone(),
            fields,
            options,
            retry_after,
            state: State::List {
                continue_token: None,
            },
            pending: VecDeque::new(),
            failures: 0,
            desyncs: 0,
            not_before: None,
            random: RandomState::new(),
        }
    }

    /// The watch as an endless stream of its steps.
    pub fn into_stream(self) -> BoxStream<'static, Progress<K>> {
        futures::stream::unfold(self, |mut w| async move {
            let p = w.next().await;
            Some((p, w))
        })
        .boxed()
    }

    /// The next step: waits out a back-off, then lists or watches as the state says.
    pub async fn next(&mut self) -> Progress<K> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return p;
            }
            if let Some(t) = self.not_before.take() {
                tokio::time::sleep_until(t.into()).await;
            }
            let state = std::mem::replace(
                &mut self.state,
                State::List {
                    continue_token: None,
                },
            );
            match state {
                State::List { continue_token } => self.list(continue_token).await,
                State::Watch { version } => match self.start_watch(&version).await {
                    Ok(stream) => {
                        self.answered();
                        self.state = State::Watching { version, stream };
                    }
                    Err((error, m)) => self.failed(error, m, State::Watch { version }),
                },
                State::Watching {
                    mut version,
                    mut stream,
                } => match stream.next().await {
                    Some(Line::Apply(o)) => {
                        if let Some(v) = Resource::meta(&*o).resource_version.clone() {
                            version = v;
                        }
                        self.desyncs = 0;
                        self.state = State::Watching { version, stream };
                        return Progress::Event(Box::new(Event::Apply(*o)));
                    }
                    Some(Line::Delete(o)) => {
                        if let Some(v) = Resource::meta(&*o).resource_version.clone() {
                            version = v;
                        }
                        self.desyncs = 0;
                        self.state = State::Watching { version, stream };
                        return Progress::Event(Box::new(Event::Delete(*o)));
                    }
                    Some(Line::Bookmark(version)) => {
                        self.state = State::Watching { version, stream };
                    }
                    Some(Line::Api(e)) => {
                        // The server ends the watch after an error event; watch again (or
                        // relist) rather than wait for it.
                        let m = meaning(&e);
                        self.failed(
                            format!("watch error {}: {} ({})", e.code, e.message, e.reason),
                            m,
                            State::Watch { version },
                        );
                    }
                    Some(Line::Undecodable(e)) => {
                        // One line that is not an event: skip it, keep watching.
                        self.state = State::Watching { version, stream };
                        return Progress::Skipped(e);
                    }
                    Some(Line::Broken(e)) => {
                        let error = format!("watch connection lost: {e}");
                        self.failed(error, Meaning::Other, State::Watch { version });
                    }
                    // Ended by the server (its timeout): watch on from where it was.
                    None => {
                        self.desyncs = 0;
                        self.state = State::Watch { version };
                    }
                },
            }
        }
    }

    /// Starts a watch from `version`: the event stream once the server has answered 200, or
    /// what the refusal means.
    async fn start_watch(&mut self, version: &str) -> Result<EventStream<K>, (String, Meaning)> {
        let mut params = WatchParams::default().timeout(self.timeout_secs());
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        let request = kube::core::Request::new(Lenient::<K>::url_path(&(), None))
            .watch(&params, version)
            .map_err(|e| (e.to_string(), Meaning::Other))?;
        let response = self
            .client
            .send(request.map(kube::client::Body::from))
            .await
            .map_err(|e| (e.to_string(), Meaning::Other))?;
        let status = response.status();
        if status.is_success() {
            return Ok(watch_lines(response.into_body()));
        }
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let e = serde_json::from_slice::<ErrorResponse>(&body).unwrap_or_else(|_| ErrorResponse {
            status: "Failure".to_owned(),
            message: String::from_utf8_lossy(&body).into_owned(),
            reason: status.canonical_reason().unwrap_or("").to_owned(),
            code: status.as_u16(),
        });
        let m = meaning(&e);
        Err((
            format!("watch refused {}: {} ({})", e.code, e.message, e.reason),
            m,
        ))
    }

    async fn list(&mut self, continue_token: Option<String>) {
        let first = continue_token.is_none();
        let mut params = ListParams::default().limit(self.options.page_size);
        params.continue_token = continue_token;
        if let Some(f) = &self.fields {
            params = params.fields(f);
        }
        match self.api.list(&params).await {
            Ok(list) => {
                self.answered();
                if first {
                    self.pending
                        .push_back(Progress::Event(Box::new(Event::Init)));
                }
                self.pending.extend(
                    list.items
                        .into_iter()
                        .map(|o| Progress::Event(Box::new(Event::InitApply(o)))),
                );
                let next = list.metadata.continue_.filter(|c| !c.is_empty());
                let version = list.metadata.resource_version.filter(|v| !v.is_empty());
                match (next, version) {
                    (Some(token), _) => {
                        self.state = State::List {
                            continue_token: Some(token),
                        };
                    }
                    (None, Some(version)) => {
                        self.pending
                            .push_back(Progress::Event(Box::new(Event::InitDone)));
                        self.state = State::Watch { version };
                    }
                    (None, None) => {
                        self.pending.clear();
                        self.failed(
                            "a list without a resourceVersion".to_owned(),
                            Meaning::Other,
                            State::List {
                                continue_token: None,
                            },
                        );
                    }
                }
            }
            Err(e) => {
                // A failed page (an expired continue token among them) starts the list again.
                let m = meaning_of(&e);
                self.failed(
                    e.to_string(),
                    m,
                    State::List {
                        continue_token: None,
                    },
                );
            }
        }
    }

    fn timeout_secs(&self) -> u32 {
        u32::try_from(self.options.watch_timeout.as_secs())
            .unwrap_or(u32::MAX)
            .clamp(1, 290)
    }

    /// The server answered: the back-off starts again from its minimum.
    fn answered(&mut self) {
        self.failures = 0;
        self.pending.push_back(Progress::Answered);
    }

    /// Records a failure: the next state (a relist when the failure says the version is
    /// unusable), when to try again, and the report.
    fn failed(&mut self, error: String, meaning: Meaning, retry: State<K>) {
        let mut retry_in = self.backoff();
        let relist = meaning == Meaning::Desync;
        match meaning {
            Meaning::Desync => {
                // The server answered, and said to start over: at once, the first time.
                self.failures = 0;
                self.desyncs += 1;
                if self.desyncs == 1 {
                    retry_in = Duration::ZERO;
                }
                self.state = State::List {
                    continue_token: None,
                };
            }
            Meaning::Throttled => {
                if let Some(until) = self.retry_after.until() {
                    retry_in = retry_in.max(until.saturating_duration_since(Instant::now()));
                }
                self.state = retry;
            }
            Meaning::Other => self.state = retry,
        }
        self.not_before = Some(Instant::now() + retry_in);
        self.pending.push_back(if relist {
            Progress::Relisting(error)
        } else {
            Progress::Failed { error, retry_in }
        });
    }

    /// The delay before the next retry: doubling from the minimum with each failure (or each
    /// desync after the first), up to the maximum, less a random tenth so that many nodes do
    /// not retry in step.
    fn backoff(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let n = self.failures.max(self.desyncs).min(16);
        let full = self
            .options
            .backoff_min
            .saturating_mul(1 << (n - 1))
            .min(self.options.backoff_max);
        let jitter = self.random.hash_one((n, Instant::now())) % 1000;
        full - full / 10 * u32::try_from(jitter).unwrap_or(0) / 1000
    }
}
