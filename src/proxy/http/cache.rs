//! The response cache (RFC 9111), opt-in per TrafficPolicy (`cache`).
//!
//! The outermost layer of a destination's stack: an answer given from the
//! store costs the target nothing (no rate-limit token, no retry budget,
//! no request in the target's series, which measure the target); the
//! cache counts its own outcomes (`weft_proxy_cache_requests`).
//!
//! What RFC 9111 decides (may this answer be stored, is it fresh, does
//! the request select it through `Vary`, which validators to send, how a
//! 304 updates it) is `http-cache-semantics`'. This file keeps the
//! answers within a byte budget and adds RFC 5861's `stale-if-error` and
//! `stale-while-revalidate`, which that crate leaves to its user.
//!
//! Scope, deliberately narrow:
//! - GET is stored, HEAD is answered from a fresh stored GET; other
//!   methods pass, and an unsafe one answered 2xx/3xx drops the stored
//!   answer of its URI (RFC 9111 §4.4).
//! - A request with its own validators or a range (`If-None-Match`,
//!   `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`, `If-Range`,
//!   `Range`) passes untouched: its answer depends on what the client
//!   holds, which the store does not know.
//! - One variant per URI: a request `Vary` selects differently is a miss,
//!   and its answer replaces the stored one.
//! - Concurrent misses for one URI each go to the target (no collapsing).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body::Frame;
use http_body_util::BodyExt;
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy, RequestLike};

use super::Shared;
use super::body::{self, Body, BodyError, BoxError, Request, Response};
use super::route::RouteCtx;
use crate::config::CacheConfig;
use crate::proxy::destination::Destination;
use crate::proxy::metrics::{CacheLabels, CacheStoreLabels};

/// How a request went, the `result` of `weft_proxy_cache_requests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the store, fresh; the target was not asked.
    Hit,
    /// The target said the stored answer still holds (304).
    Revalidated,
    /// Asked of the target (nothing usable stored).
    Miss,
    /// Answered stale at once while the proxy revalidates in the
    /// background (`stale-while-revalidate`).
    Stale,
    /// Answered stale because the target failed (`stale-if-error`).
    StaleIfError,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Revalidated => "revalidated",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::StaleIfError => "stale-if-error",
        }
    }
}

/// One target's stored answers, shared by every destination of the
/// target (each host a wildcard matches, each port) and kept across
/// config reloads that leave its settings as they were.
pub struct ResponseStore {
    entries: quick_cache::sync::Cache<String, Arc<Stored>, Weigh>,
    config: CacheConfig,
    /// The `policy` label of the bytes gauge.
    name: String,
    metrics: Arc<crate::proxy::metrics::ProxyMetrics>,
}

/// A stored answer.
struct Stored {
    policy: CachePolicy,
    status: StatusCode,
    /// The answer's headers, hop-by-hop ones already removed (the pool
    /// does), for answering stale (the crate only builds fresh heads).
    headers: HeaderMap,
    body: Bytes,
    /// When it stops being fresh.
    fresh_until: SystemTime,
    /// How long past that it may stand in for a failed answer, and be
    /// given while it is revalidated; None where the answer forbids it.
    stale_if_error: Option<Duration>,
    stale_while_revalidate: Option<Duration>,
    /// Memory it holds, as the store counts it.
    weight: u64,
    /// A background revalidation is under way.
    revalidating: AtomicBool,
}

impl Stored {
    fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until).unwrap_or_default()
    }

    fn may_stand_in_for_error(&self, now: SystemTime) -> bool {
        self.stale_if_error
            .is_some_and(|w| self.staleness(now) <= w)
    }

    fn may_be_given_while_revalidating(&self, now: SystemTime) -> bool {
        self.stale_while_revalidate
            .is_some_and(|w| self.staleness(now) <= w)
    }

    /// The stored answer as given now: its head with `Age` and `Date`
    /// brought up to date, its body unless the request was HEAD.
    fn answer(
        &self,
        mut head: http::response::Parts,
        now: SystemTime,
        head_only: bool,
    ) -> Response {
        head.headers.insert(http::header::DATE, http_date(now));
        let body = if head_only {
            body::empty()
        } else {
            body::full(self.body.clone())
        };
        Response::from_parts(head, body)
    }

    /// The stored answer given stale (the crate builds heads only for
    /// fresh ones).
    fn stale_answer(&self, now: SystemTime, head_only: bool) -> Response {
        let mut head = http::Response::new(()).into_parts().0;
        head.status = self.status;
        head.headers = self.headers.clone();
        let age = self.policy.age(now).as_secs();
        head.headers
            .insert(http::header::AGE, HeaderValue::from(age));
        self.answer(head, now, head_only)
    }
}

fn http_date(t: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(t))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

/// The store's weight of an entry: the bytes it holds.
#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<String, Arc<Stored>> for Weigh {
    fn weight(&self, _key: &String, val: &Arc<Stored>) -> u64 {
        val.weight
    }
}

/// Bookkeeping per entry besides its key, headers and body: the policy's
/// parsed directives and URI, the store's slot, the `Arc`.
const ENTRY_OVERHEAD: u64 = 512;

fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(n, v)| (n.as_str().len() + v.len() + 16) as u64)
        .sum()
}

impl ResponseStore {
    pub fn new(
        name: String,
        config: CacheConfig,
        metrics: Arc<crate::proxy::metrics::ProxyMetrics>,
    ) -> Self {
        // quick_cache splits the budget among its shards and refuses (in
        // silence) an entry larger than about a shard's share: each shard
        // gets room for at least two of the largest answers.
        let largest = config.max_object_bytes.max(1);
        let shards = (config.max_bytes / (2 * largest)).clamp(1, 4);
        let shards = 1usize << (63 - shards.leading_zeros());
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(((config.max_bytes / 2048) as usize).max(32 * shards))
            .weight_capacity(config.max_bytes)
            .build()
            .unwrap_or_else(|e| unreachable!("every option is set: {e}"));
        Self {
            entries: quick_cache::sync::Cache::with_options(
                options,
                Weigh,
                Default::default(),
                Default::default(),
            ),
            config,
            name,
            metrics,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Bytes held now, as counted against `maxBytes`.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    fn publish_bytes(&self) {
        self.metrics
            .cache_bytes
            .get_or_create(&CacheStoreLabels {
                policy: self.name.clone(),
            })
            .set(i64::try_from(self.bytes()).unwrap_or(i64::MAX));
    }

    fn covers(&self, path: &str) -> bool {
        self.config.paths.is_empty()
            || self
                .config
                .paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }

    fn forget(&self, key: &str) {
        if self.entries.remove(key).is_some() {
            self.publish_bytes();
        }
    }
}

impl Drop for ResponseStore {
    fn drop(&mut self) {
        self.metrics.cache_bytes.remove(&CacheStoreLabels {
            policy: self.name.clone(),
        });
    }
}

/// What the stale windows of a stored answer are: its own
/// `stale-if-error` / `stale-while-revalidate` (RFC 5861), else the
/// policy's; none at all where the answer must not be given stale
/// (RFC 9111 §4.2.4: `must-revalidate`, `proxy-revalidate`, `no-cache`,
/// and for a shared cache `s-maxage`, which carries `proxy-revalidate`).
fn stale_windows(
    headers: &HeaderMap,
    config: &CacheConfig,
) -> (Option<Duration>, Option<Duration>) {
    let mut directives = Vec::new();
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for d in value.split(',') {
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n, Some(a.trim().trim_matches('"'))),
                None => (d, None),
            };
            directives.push((name.trim().to_ascii_lowercase(), arg.map(str::to_owned)));
        }
    }
    let has = |name: &str| directives.iter().any(|(n, _)| n == name);
    let pragma_no_cache = !headers.contains_key(http::header::CACHE_CONTROL)
        && headers
            .get_all(http::header::PRAGMA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("no-cache")));
    if pragma_no_cache
        || [
            "must-revalidate",
            "proxy-revalidate",
            "no-cache",
            "s-maxage",
            "no-store",
        ]
        .iter()
        .any(|d| has(d))
    {
        return (None, None);
    }
    let seconds = |name: &str, cap: Duration| {
        directives
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| a.as_deref()?.parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(cap))
    };
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    (
        seconds("stale-if-error", MAX_STALE_IF_ERROR).or(ms(config.stale_if_error_ms)),
        seconds("stale-while-revalidate", MAX_STALE_WHILE_REVALIDATE)
            .or(ms(config.stale_while_revalidate_ms)),
    )
}

/// The longest staleness honoured, whatever an answer says (the CRD's
/// bounds on the policy's own).
const MAX_STALE_IF_ERROR: Duration = Duration::from_secs(24 * 3600);
const MAX_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(3600);

/// A request as the cache sees it: its URI absolute (`http://host/path`),
/// `Host` that same authority, in lower case, whatever form the client
/// wrote (origin-form with `Host`, absolute-form, an h2 `:authority`),
/// so every form of one request is one key and one match.
struct Asked {
    uri: Uri,
    method: Method,
    headers: HeaderMap,
}

impl RequestLike for Asked {
    fn uri(&self) -> Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        &self.uri == other
    }
    fn method(&self) -> &Method {
        &self.method
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// Headers that make a request's answer depend on what the client holds.
const CLIENT_CONDITIONS: [http::HeaderName; 6] = [
    http::header::IF_NONE_MATCH,
    http::header::IF_MODIFIED_SINCE,
    http::header::IF_MATCH,
    http::header::IF_UNMODIFIED_SINCE,
    http::header::IF_RANGE,
    http::header::RANGE,
];

/// What the cache does with a request.
enum Use {
    /// Not the cache's: passes untouched.
    Pass,
    /// GET or HEAD it may answer or store, under this key.
    Lookup(String, Box<Asked>),
    /// An unsafe method: a 2xx/3xx answer drops the key's entry.
    Invalidate(String),
}

fn classify(store: &ResponseStore, req: &Request) -> Use {
    let path = req.uri().path();
    if !store.covers(path) {
        return Use::Pass;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(authority) = authority.map(|a| a.to_ascii_lowercase()) else {
        return Use::Pass;
    };
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let key = format!("{authority}{path_and_query}");
    let method = req.method();
    if !(method == Method::GET || method == Method::HEAD) {
        let safe = matches!(*method, Method::OPTIONS | Method::TRACE);
        return if safe {
            Use::Pass
        } else {
            Use::Invalidate(key)
        };
    }
    if CLIENT_CONDITIONS
        .iter()
        .any(|h| req.headers().contains_key(h))
        || !http_body::Body::is_end_stream(req.body())
    {
        return Use::Pass;
    }
    let Ok(uri) = Uri::try_from(format!("http://{key}")) else {
        return Use::Pass;
    };
    let mut headers = req.headers().clone();
    let Ok(host) = HeaderValue::from_str(&authority) else {
        return Use::Pass;
    };
    headers.insert(http::header::HOST, host);
    // A HEAD is matched as the GET whose stored answer it may take.
    let asked = Asked {
        uri,
        method: Method::GET,
        headers,
    };
    Use::Lookup(key, Box::new(asked))
}

/// The cache layer: see the module's documentation.
#[derive(Clone)]
pub struct Cache<S> {
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    inner: S,
}

impl<S> Cache<S> {
    pub fn new(dst: Arc<Destination>, shared: Arc<Shared>, inner: S) -> Self {
        Self { dst, shared, inner }
    }
}

super::layer_service!(Cache);

impl<S: super::Inner> Cache<S> {
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        let Some(store) = self.dst.cache.clone() else {
            return self.inner.call(req);
        };
        match classify(&store, &req) {
            Use::Pass => self.inner.call(req),
            Use::Invalidate(key) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let rsp = fut.await?;
                    if rsp.status().is_success() || rsp.status().is_redirection() {
                        store.forget(&key);
                    }
                    Ok(rsp)
                })
            }
            Use::Lookup(key, asked) => {
                let lookup = Lookup {
                    store,
                    key,
                    asked,
                    dst: self.dst.clone(),
                    shared: self.shared.clone(),
                };
                Box::pin(lookup.run(self.inner.clone(), req))
            }
        }
    }
}

/// One GET or HEAD the cache may answer.
struct Lookup {
    store: Arc<ResponseStore>,
    key: String,
    asked: Box<Asked>,
    dst: Arc<Destination>,
    shared: Arc<Shared>,
}

/// Whether a target's answer is a failure a stale answer may stand in
/// for (RFC 5861 §4: 500, 502, 503, 504; and every error of the proxy's
/// own: unreachable, timed out, circuit open, rate-limited).
fn failed(result: &Result<Response, BoxError>) -> bool {
    match result {
        Ok(rsp) => matches!(rsp.status().as_u16(), 500 | 502 | 503 | 504),
        Err(_) => true,
    }
}

impl Lookup {
    fn count(&self, outcome: Outcome) {
        self.shared
            .metrics
            .cache_requests
            .get_or_create(&CacheLabels {
                dst: self.dst.label.clone(),
                result: outcome.label(),
            })
            .inc();
    }

    async fn run<S: super::Inner>(self, inner: S, mut req: Request) -> Result<Response, BoxError> {
        let head_only = req.method() == Method::HEAD;
        let now = SystemTime::now();
        let stored = self.store.entries.get(&self.key);
        let Some(stored) = stored else {
            return self.miss(super::call(inner, req), head_only).await;
        };
        let conditional = match stored.policy.before_request(&*self.asked, now) {
            BeforeRequest::Fresh(head) => {
                self.count(Outcome::Hit);
                return Ok(stored.answer(head, now, head_only));
            }
            // Another variant (`Vary`), or the client will not take this
            // one (`no-cache`, `max-age=0`, …) unvalidated.
            BeforeRequest::Stale { request, matches } => matches.then_some(request),
        };
        let Some(conditional) = conditional else {
            return self.miss(super::call(inner, req), head_only).await;
        };
        if stored.may_be_given_while_revalidating(now) {
            if !stored.revalidating.swap(true, Ordering::AcqRel) {
                let background = copy_for_revalidation(&req, &conditional.headers);
                let lookup = Lookup {
                    store: self.store.clone(),
                    key: self.key.clone(),
                    asked: Box::new(Asked {
                        uri: self.asked.uri.clone(),
                        method: Method::GET,
                        headers: self.asked.headers.clone(),
                    }),
                    dst: self.dst.clone(),
                    shared: self.shared.clone(),
                };
                let (inner, stored) = (inner.clone(), stored.clone());
                tokio::spawn(async move {
                    let result = super::call(inner, background).await;
                    let _ = lookup.revalidated(&stored, result, false).await;
                    stored.revalidating.store(false, Ordering::Release);
                });
            }
            self.count(Outcome::Stale);
            return Ok(stored.stale_answer(now, head_only));
        }
        if head_only {
            // A HEAD is answered from a fresh GET only; a stale one asks
            // the target as it is (a HEAD's answer has no body to store).
            let result = super::call(inner, req).await;
            if failed(&result) && stored.may_stand_in_for_error(SystemTime::now()) {
                self.count(Outcome::StaleIfError);
                return Ok(stored.stale_answer(SystemTime::now(), true));
            }
            self.count(Outcome::Miss);
            return result;
        }
        add_validators(req.headers_mut(), &conditional.headers);
        let result = super::call(inner, req).await;
        self.revalidated(&stored, result, true).await
    }

    /// Stores the answer (to a GET) that RFC 9111 allows to be, if it fits.
    fn keep(
        &self,
        policy: CachePolicy,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        now: SystemTime,
    ) {
        let weight = ENTRY_OVERHEAD
            + self.key.len() as u64
            + body.len() as u64
            + 2 * header_bytes(&headers)
            + header_bytes(&self.asked.headers);
        let store = &self.store;
        if weight > store.config.max_object_bytes {
            store.forget(&self.key);
            return;
        }
        let (stale_if_error, stale_while_revalidate) = stale_windows(&headers, &store.config);
        let fresh_until = now + policy.time_to_live(now);
        let stored = Stored {
            policy,
            status,
            headers,
            body,
            fresh_until,
            stale_if_error,
            stale_while_revalidate,
            weight,
            revalidating: AtomicBool::new(false),
        };
        store.entries.insert(self.key.clone(), Arc::new(stored));
        store.publish_bytes();
    }

    /// A request nothing stored answers: to the target, and its answer
    /// kept when it may be.
    async fn miss(self, fut: super::Answer, head_only: bool) -> Result<Response, BoxError> {
        self.count(Outcome::Miss);
        let rsp = fut.await?;
        if head_only {
            return Ok(rsp);
        }
        let policy = CachePolicy::new_options(&*self.asked, &rsp, SystemTime::now(), options());
        Ok(self.keep_answer(policy, rsp).await)
    }

    /// The target's answer to a revalidation of `stored`: a 304 refreshes
    /// it (and, for the client, is the stored answer), a failure lets the
    /// stale answer stand in where it may, anything else replaces it.
    /// `count`: the client waits on this (not a background refresh).
    async fn revalidated(
        self,
        stored: &Arc<Stored>,
        result: Result<Response, BoxError>,
        count: bool,
    ) -> Result<Response, BoxError> {
        let now = SystemTime::now();
        if failed(&result) && stored.may_stand_in_for_error(now) {
            if count {
                self.count(Outcome::StaleIfError);
            }
            return Ok(stored.stale_answer(now, false));
        }
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                if count {
                    self.count(Outcome::Miss);
                }
                return Err(e);
            }
        };
        // The 304 answers the validators this proxy sent for `stored`; one
        // that repeats none (RFC 9111 §4.3.4 then selects nothing) still
        // means `stored` holds: it gets the stored validators back.
        let mut reply = http::Response::new(());
        *reply.status_mut() = rsp.status();
        *reply.headers_mut() = rsp.headers().clone();
        if rsp.status() == StatusCode::NOT_MODIFIED {
            for name in [http::header::ETAG, http::header::LAST_MODIFIED] {
                if !reply.headers().contains_key(&name)
                    && let Some(v) = stored.headers.get(&name)
                {
                    reply.headers_mut().insert(name, v.clone());
                }
            }
        }
        match stored.policy.after_response(&*self.asked, &reply, now) {
            AfterResponse::NotModified(policy, head) => {
                if count {
                    self.count(Outcome::Revalidated);
                }
                // The 304's own body, if any, is nothing; the stored
                // body goes with the refreshed head (whose `Age` and
                // `Date` are set again whenever it is given).
                if policy.is_storable() {
                    self.keep(
                        policy,
                        stored.status,
                        head.headers.clone(),
                        stored.body.clone(),
                        now,
                    );
                } else {
                    self.store.forget(&self.key);
                }
                Ok(stored.answer(head, now, false))
            }
            AfterResponse::Modified(..) if rsp.status() == StatusCode::NOT_MODIFIED => {
                // A 304 naming another validator than the stored one's:
                // not this answer's, and never for a client that sent no
                // condition of its own. The stored answer goes, given
                // once more as it is.
                if count {
                    self.count(Outcome::Stale);
                }
                self.store.forget(&self.key);
                Ok(stored.stale_answer(now, false))
            }
            AfterResponse::Modified(policy, _) => {
                if count {
                    self.count(Outcome::Miss);
                }
                Ok(self.keep_answer(policy, rsp).await)
            }
        }
    }

    /// Reads the answer's body (up to the largest answer stored) and
    /// stores it when RFC 9111 and the budget allow; gives the answer on
    /// either way, the part read followed by the rest.
    async fn keep_answer(&self, policy: CachePolicy, rsp: Response) -> Response {
        if !policy.is_storable() {
            // A stored answer this one supersedes goes (`no-store` now).
            self.store.forget(&self.key);
            return rsp;
        }
        let limit = self.store.config.max_object_bytes;
        let declared = rsp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            self.store.forget(&self.key);
            return rsp;
        }
        let (head, mut body) = rsp.into_parts();
        let mut read = BytesMut::new();
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        read.extend_from_slice(&data);
                        if read.len() as u64 > limit {
                            self.store.forget(&self.key);
                            return Response::from_parts(head, resume(read.freeze(), None, body));
                        }
                    }
                    Err(frame) => {
                        // Trailers: given on, not stored.
                        self.store.forget(&self.key);
                        let trailers = frame.into_trailers().ok();
                        return Response::from_parts(
                            head,
                            body::full_with_trailers(read.freeze(), trailers),
                        );
                    }
                },
                Some(Err(e)) => {
                    return Response::from_parts(
                        head,
                        resume(read.freeze(), Some(e), body::empty()),
                    );
                }
            }
        }
        let body = read.freeze();
        self.keep(
            policy,
            head.status,
            head.headers.clone(),
            body.clone(),
            SystemTime::now(),
        );
        Response::from_parts(head, body::full(body))
    }
}

fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..CacheOptions::default()
    }
}

/// A body that gives `read` (already taken from the answer), then an
/// error that cut it, or the rest of `rest`.
fn resume(read: Bytes, error: Option<BodyError>, rest: Body) -> Body {
    let first = futures_util::stream::once(async move { Ok::<_, BodyError>(Frame::data(read)) });
    let tail = match error {
        Some(e) => StreamExt::boxed(futures_util::stream::once(async move { Err(e) })),
        None => StreamExt::boxed(http_body_util::BodyStream::new(rest)),
    };
    body::boxed(http_body_util::StreamBody::new(first.chain(tail)))
}

/// The validators the crate chose (`If-None-Match`, `If-Modified-Since`)
/// put on the client's request, which keeps its own URI and extensions.
fn add_validators(headers: &mut HeaderMap, conditional: &HeaderMap) {
    for name in [http::header::IF_NONE_MATCH, http::header::IF_MODIFIED_SINCE] {
        headers.remove(&name);
        if let Some(v) = conditional.get(&name) {
            headers.insert(name, v.clone());
        }
    }
}

/// The request a background revalidation sends: the client's method, URI
/// and headers with the validators, no body, and of its extensions only
/// the route (its timeout and retries), not the client's access-log
/// record or trace.
fn copy_for_revalidation(req: &Request, conditional: &HeaderMap) -> Request {
    let mut copy = http::Request::new(body::empty());
    *copy.method_mut() = Method::GET;
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    add_validators(copy.headers_mut(), conditional);
    if let Some(route) = req.extensions().get::<RouteCtx>() {
        copy.extensions_mut().insert(route.clone());
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CacheConfig {
        CacheConfig {
            max_bytes: 1 << 20,
            max_object_bytes: 64 << 10,
            paths: vec![],
            stale_if_error_ms: None,
            stale_while_revalidate_ms: None,
        }
    }

    fn headers(cc: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_str(cc).expect("value"),
        );
        h
    }

    /// The answer's own windows win over the policy's; an answer that
    /// must be revalidated is never given stale, whatever the policy.
    #[test]
    fn stale_windows_come_from_the_answer_then_the_policy_and_never_past_a_must() {
        let mut c = config();
        assert_eq!(stale_windows(&headers("max-age=60"), &c), (None, None));
        c.stale_if_error_ms = Some(300_000);
        c.stale_while_revalidate_ms = Some(10_000);
        assert_eq!(
            stale_windows(&headers("max-age=60"), &c),
            (
                Some(Duration::from_secs(300)),
                Some(Duration::from_secs(10))
            )
        );
        assert_eq!(
            stale_windows(
                &headers("max-age=60, stale-if-error=20, Stale-While-Revalidate=\"5\""),
                &c
            ),
            (Some(Duration::from_secs(20)), Some(Duration::from_secs(5)))
        );
        assert_eq!(
            stale_windows(&headers("max-age=60, stale-if-error=999999999"), &c).0,
            Some(MAX_STALE_IF_ERROR)
        );
        for must in [
            "must-revalidate",
            "proxy-revalidate",
            "no-cache",
            "s-maxage=60",
            "no-store",
        ] {
            assert_eq!(
                stale_windows(
                    &headers(&format!("max-age=60, stale-if-error=60, {must}")),
                    &c
                ),
                (None, None),
                "{must}"
            );
        }
        let mut pragma = HeaderMap::new();
        pragma.insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
        assert_eq!(stale_windows(&pragma, &c), (None, None));
    }

    /// Freshness from `Expires` needs the crate to read an HTTP-date
    /// (IMF-fixdate, `GMT`), which it parses as RFC 2822.
    #[test]
    fn expires_in_http_date_form_gives_freshness() {
        let now = SystemTime::now();
        let asked = Asked {
            uri: Uri::from_static("http://feed.test/p"),
            method: Method::GET,
            headers: HeaderMap::new(),
        };
        let rsp = http::Response::builder()
            .header(http::header::DATE, httpdate::fmt_http_date(now))
            .header(
                http::header::EXPIRES,
                httpdate::fmt_http_date(now + Duration::from_secs(120)),
            )
            .body(())
            .expect("response");
        let policy = CachePolicy::new_options(&asked, &rsp, now, options());
        assert!(policy.is_storable());
        let ttl = policy.time_to_live(now).as_secs();
        assert!((110..=120).contains(&ttl), "{ttl}");
    }
}
