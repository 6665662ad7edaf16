//! The response cache (RFC 9111), opt-in per TrafficPolicy (`cache`).
//!
//! The outermost layer of a destination's stack: an answer given from the
//! store costs the target nothing (no rate-limit token, no retry budget,
//! no request in the target's series, which measure the target); the
//! cache counts its own outcomes (`weft_proxy_cache_requests`).
//!
//! What RFC 9111 decides (may this answer be stored, is it fresh, does
//! the request select it through `Vary`, which validators to send) is
//! `http-cache-semantics`'. This file keeps the answers within a byte
//! budget, builds the heads it gives (the crate's keep only the last value
//! of a repeated field), merges a 304 into the stored head itself (for the
//! same reason), and adds RFC 5861's `stale-if-error` and
//! `stale-while-revalidate`, which the crate leaves to its user. What the
//! crate sees is normalised first: Cache-Control directive names in lower
//! case (the crate matches them as written), repeated request fields
//! joined (it compares the first value only when matching `Vary`), and a
//! client's `max-stale` removed (a client must not be able to take a
//! stored answer the target said to revalidate).
//!
//! Scope, deliberately narrow:
//! - GET is stored, HEAD is answered from a fresh stored GET; other
//!   methods pass, and an unsafe one answered 2xx/3xx drops the stored
//!   answer of its URI (RFC 9111 §4.4).
//! - A request with its own validators or a range (`If-None-Match`,
//!   `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`, `If-Range`,
//!   `Range`), one pinned to a pod (dialled by address), and one whose
//!   `Host` differs from its URI's authority pass untouched.
//! - Stored only: answers the target marks reusable (explicit freshness,
//!   `public`) or that carry a validator; never one setting a cookie
//!   unless `public`; never an event stream. Given stale only when the
//!   target gave it explicit freshness or `public`.
//! - One variant per URI: a request `Vary` selects differently is a miss,
//!   and its answer replaces the stored one.
//! - Concurrent misses for one URI each go to the target (no collapsing).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use http_body::Frame;
use http_body_util::BodyExt;
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy, RequestLike};

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

/// Bytes of budget the live response caches of this proxy were granted
/// together: a new store gets its `maxBytes`, or what is left of
/// [`PROXY_CACHE_BYTES`] (the sidecar's memory is the pod's; policies of
/// several targets each with a large `maxBytes` must not add up to an
/// OOM kill). Each store evicts within its grant as usual.
static GRANTED: AtomicU64 = AtomicU64::new(0);
/// The most every cache of a proxy holds together.
pub const PROXY_CACHE_BYTES: u64 = 64 << 20;

/// Takes up to `wanted` bytes of [`PROXY_CACHE_BYTES`]; what it got.
fn grant(wanted: u64) -> u64 {
    let mut got = 0;
    let _ = GRANTED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
        got = wanted.min(PROXY_CACHE_BYTES.saturating_sub(held));
        Some(held + got)
    });
    got
}

/// One target's stored answers, shared by every destination of the
/// target (each host a wildcard matches, each port) and kept across
/// config reloads that leave its settings as they were.
pub struct ResponseStore {
    entries: quick_cache::sync::Cache<String, Arc<Stored>, Weigh>,
    config: CacheConfig,
    /// Its share of [`PROXY_CACHE_BYTES`] (≤ `maxBytes`), topped up
    /// when budget comes free ([`ResponseStore::stores`]); below four of
    /// its largest answers it stores nothing.
    granted: AtomicU64,
    /// The `policy` label of the bytes gauge.
    name: String,
    /// What this store last added to the gauge.
    published: AtomicU64,
    metrics: Arc<crate::proxy::metrics::ProxyMetrics>,
}

/// A stored answer. Every header value is a copy of its own (hyper's
/// point into the connection's read buffer, which they would keep alive).
struct Stored {
    policy: CachePolicy,
    status: StatusCode,
    /// The answer's headers, hop-by-hop ones already removed (the pool
    /// does), every value of a repeated field kept.
    headers: HeaderMap,
    body: Bytes,
    /// When it stops being fresh.
    fresh_until: SystemTime,
    /// How long past that it may stand in for a failed answer, and be
    /// given while it is revalidated; None where the answer forbids it.
    windows: Windows,
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
        self.windows
            .stale_if_error
            .is_some_and(|w| self.staleness(now) <= w)
    }

    fn may_be_given_while_revalidating(&self, now: SystemTime) -> bool {
        self.policy.is_stale(now)
            && self
                .windows
                .stale_while_revalidate
                .is_some_and(|w| self.staleness(now) <= w)
    }

    /// The stored answer as given now: its own head (the target's `Date`
    /// kept) with its `Age`, and its body unless the request was HEAD.
    fn answer(&self, now: SystemTime, head_only: bool) -> Response {
        let mut head = http::Response::new(()).into_parts().0;
        head.status = self.status;
        head.headers = self.headers.clone();
        let age = self.policy.age(now).as_secs();
        head.headers
            .insert(http::header::AGE, HeaderValue::from(age));
        let body = if head_only {
            body::empty()
        } else {
            body::full(self.body.clone())
        };
        Response::from_parts(head, body)
    }
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
const ENTRY_OVERHEAD: u64 = 1024;

/// Memory a header map holds: its names and values, and per field the
/// map's own entry (some 100 bytes with its index).
fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(n, v)| (n.as_str().len() + v.len() + 100) as u64)
        .sum()
}

/// `h` with every value copied out of whatever buffer it points into.
fn owned(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (name, value) in h {
        if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
            out.append(name.clone(), v);
        }
    }
    out
}

impl ResponseStore {
    pub fn new(
        name: String,
        config: CacheConfig,
        metrics: Arc<crate::proxy::metrics::ProxyMetrics>,
    ) -> Self {
        let largest = config.max_object_bytes.max(1);
        let granted = grant(config.max_bytes);
        if granted < 4 * largest {
            tracing::warn!(
                policy = %name,
                "the response caches of this proxy hold their 64 MiB budget: this policy's answers are not cached until some is freed"
            );
        }
        // Sharded for the whole `maxBytes`, whatever was granted so far.
        let sized = config.max_bytes;
        // quick_cache splits the budget among its shards and refuses (in
        // silence) an entry larger than about a shard's share: each shard
        // gets room for at least two of the largest answers.
        let shards = (sized / (2 * largest)).clamp(1, 4);
        let shards = 1usize << (63 - shards.leading_zeros());
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(((sized / 2048) as usize).max(32 * shards))
            .weight_capacity(granted.max(1))
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
            granted: AtomicU64::new(granted),
            name,
            published: AtomicU64::new(0),
            metrics,
        }
    }

    /// Whether it stores anything: it holds a share of the proxy's
    /// budget for four of its largest answers, taking more (up to its
    /// `maxBytes`) as other stores give theirs back.
    fn stores(&self) -> bool {
        let held = self.granted.load(Ordering::Acquire);
        if held < self.config.max_bytes && GRANTED.load(Ordering::Acquire) < PROXY_CACHE_BYTES {
            let more = grant(self.config.max_bytes - held);
            if more > 0 {
                let now = self.granted.fetch_add(more, Ordering::AcqRel) + more;
                self.entries.set_capacity(now);
            }
        }
        self.granted.load(Ordering::Acquire) >= 4 * self.config.max_object_bytes.max(1)
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Bytes held now, as counted against `maxBytes`.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    /// Moves the gauge (the sum of the stores of one policy) by what this
    /// store's size changed since it last did.
    fn publish_bytes(&self) {
        let now = self.bytes();
        let was = self.published.swap(now, Ordering::AcqRel);
        self.shift(now as i64 - was as i64);
    }

    fn shift(&self, delta: i64) {
        self.metrics
            .cache_bytes
            .get_or_create(&CacheStoreLabels {
                policy: self.name.clone(),
            })
            .inc_by(delta);
    }

    fn covers(&self, path: &str) -> bool {
        let path = super::route::normalize_path(path);
        self.config.paths.is_empty()
            || self
                .config
                .paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }

    /// Stores `stored` under `key`, unless `replacing` is given and the
    /// key no longer holds it (a newer answer came in meanwhile: a late
    /// 304 must not make an older one fresh again). The entry, stored or
    /// not.
    fn insert(&self, key: String, stored: Stored, replacing: Option<&Arc<Stored>>) -> Arc<Stored> {
        let stored = Arc::new(stored);
        if let Some(old) = replacing
            && !self
                .entries
                .peek(&key)
                .is_some_and(|now| Arc::ptr_eq(&now, old))
        {
            return stored;
        }
        self.entries.insert(key, stored.clone());
        self.publish_bytes();
        stored
    }

    fn forget(&self, key: &str) {
        if self.entries.remove(key).is_some() {
            self.publish_bytes();
        }
    }

    /// Forgets `key` only while it still holds `old`.
    fn forget_if(&self, key: &str, old: &Arc<Stored>) {
        if self
            .entries
            .remove_if(key, |now| Arc::ptr_eq(now, old))
            .is_some()
        {
            self.publish_bytes();
        }
    }
}

impl Drop for ResponseStore {
    fn drop(&mut self) {
        let was = self.published.swap(0, Ordering::AcqRel);
        self.shift(-(was as i64));
        GRANTED.fetch_sub(*self.granted.get_mut(), Ordering::AcqRel);
    }
}

/// The staleness an answer allows, each None where it is not to be given
/// stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Windows {
    stale_if_error: Option<Duration>,
    stale_while_revalidate: Option<Duration>,
}

/// A Cache-Control field's directives, names in lower case.
fn directives(headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for d in value.split(',') {
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n, Some(a.trim().trim_matches('"').to_owned())),
                None => (d, None),
            };
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                out.push((name, arg));
            }
        }
    }
    out
}

fn pragma_no_cache(headers: &HeaderMap) -> bool {
    headers.get_all(http::header::PRAGMA).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
    })
}

/// Whether the target marked its answer reusable in itself: a freshness
/// lifetime of its own (`max-age`, `s-maxage`, `Expires`) or `public`.
/// Only such an answer is ever given stale: one the target said nothing
/// about may be personal (a page for the session cookie the URI does not
/// name), and RFC 9111 would never give it without asking the target.
fn explicit(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::EXPIRES)
        || directives(headers)
            .iter()
            .any(|(n, _)| matches!(n.as_str(), "max-age" | "s-maxage" | "public"))
}

/// What the stale windows of a stored answer are: its own
/// `stale-if-error` / `stale-while-revalidate` (RFC 5861), else the
/// policy's; none at all where the answer must not be given stale
/// (RFC 9111 §4.2.4: `must-revalidate`, `proxy-revalidate`, `no-cache`,
/// and for a shared cache `s-maxage`, which carries `proxy-revalidate`; a
/// directive given twice, which the RFC reads as `must-revalidate`), or
/// where it is not explicitly reusable ([`explicit`]).
fn stale_windows(headers: &HeaderMap, config: &CacheConfig) -> Windows {
    let directives = directives(headers);
    let has = |name: &str| directives.iter().any(|(n, _)| n == name);
    let repeated = directives
        .iter()
        .enumerate()
        .any(|(i, (n, _))| directives[..i].iter().any(|(m, _)| m == n));
    let forbidden = [
        "must-revalidate",
        "proxy-revalidate",
        "no-cache",
        "s-maxage",
        "no-store",
    ];
    if pragma_no_cache(headers)
        || repeated
        || forbidden.iter().any(|d| has(d))
        || !explicit(headers)
    {
        return Windows::default();
    }
    let seconds = |name: &str, cap: Duration| {
        directives
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| a.as_deref()?.parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(cap))
    };
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    Windows {
        stale_if_error: seconds("stale-if-error", MAX_STALE_IF_ERROR)
            .or(ms(config.stale_if_error_ms)),
        stale_while_revalidate: seconds("stale-while-revalidate", MAX_STALE_WHILE_REVALIDATE)
            .or(ms(config.stale_while_revalidate_ms)),
    }
}

/// The longest staleness honoured, whatever an answer says (the CRD's
/// bounds on the policy's own).
const MAX_STALE_IF_ERROR: Duration = Duration::from_secs(24 * 3600);
const MAX_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(3600);

/// Rewrites Cache-Control and Pragma with their directive names in lower
/// case (RFC 9111 §5.2: case-insensitive; the crate matches them as
/// written, so `Private` or `No-Store` would be stored and shared), and
/// without the directives in `drop`.
fn normalize_cache_control(headers: &mut HeaderMap, drop: &[&str]) {
    if headers.contains_key(http::header::CACHE_CONTROL) {
        let kept: Vec<String> = directives(headers)
            .into_iter()
            .filter(|(n, _)| !drop.contains(&n.as_str()))
            .map(|(n, a)| match a {
                Some(a) if a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                    format!("{n}={a}")
                }
                Some(a) => format!("{n}=\"{a}\""),
                None => n,
            })
            .collect();
        headers.remove(http::header::CACHE_CONTROL);
        if let Ok(v) = HeaderValue::from_str(&kept.join(", "))
            && !kept.is_empty()
        {
            headers.insert(http::header::CACHE_CONTROL, v);
        }
    }
    if pragma_no_cache(headers) {
        headers.insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
    }
}

/// A request as the cache sees it: its URI absolute (`http://host/path`),
/// `Host` that same authority in lower case, each repeated field joined
/// into one value (so `Vary` compares all of them: HTTP/2 clients send
/// every cookie as a field of its own), Cache-Control normalised, and a
/// client's `max-stale` removed.
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

impl Asked {
    fn new(uri: Uri, authority: HeaderValue, request: &HeaderMap) -> Self {
        let mut headers = HeaderMap::with_capacity(request.keys_len());
        for name in request.keys() {
            let values: Vec<&[u8]> = request.get_all(name).iter().map(|v| v.as_bytes()).collect();
            let sep: &[u8] = if name == http::header::COOKIE {
                b"; "
            } else {
                b", "
            };
            if let Ok(v) = HeaderValue::from_bytes(&values.join(sep)) {
                headers.insert(name.clone(), v);
            }
        }
        headers.insert(http::header::HOST, authority);
        normalize_cache_control(&mut headers, &["max-stale"]);
        // A HEAD is matched as the GET whose stored answer it may take.
        Self {
            uri,
            method: Method::GET,
            headers,
        }
    }

    /// What a stored policy keeps of the request: the fields the answer's
    /// `Vary` names and those the crate reads (Host, Authorization,
    /// Cache-Control, Pragma), not every cookie and header of the client.
    fn for_storage(&self, answer: &HeaderMap) -> Asked {
        let mut keep: Vec<HeaderName> = vec![
            http::header::HOST,
            http::header::AUTHORIZATION,
            http::header::CACHE_CONTROL,
            http::header::PRAGMA,
        ];
        for v in answer.get_all(http::header::VARY) {
            for name in v.to_str().unwrap_or("").split(',') {
                if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    keep.push(n);
                }
            }
        }
        let mut headers = HeaderMap::new();
        for name in keep {
            if let Some(v) = self.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        // The crate looks only at whether there was one: the client's
        // credential is not kept (unless the answer varies on it).
        if headers.contains_key(http::header::AUTHORIZATION)
            && !answer.get_all(http::header::VARY).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|n| n.trim().eq_ignore_ascii_case("authorization"))
                })
            })
        {
            headers.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_static("present"),
            );
        }
        Asked {
            uri: self.uri.clone(),
            method: Method::GET,
            headers,
        }
    }

    /// The client asks for an answer validated now (`no-cache`,
    /// `max-age`, `min-fresh`): never one given while revalidating.
    fn wants_validation(&self) -> bool {
        pragma_no_cache(&self.headers)
            || directives(&self.headers)
                .iter()
                .any(|(n, _)| matches!(n.as_str(), "no-cache" | "max-age" | "min-fresh"))
    }
}

/// Headers that make a request's answer depend on what the client holds.
const CLIENT_CONDITIONS: [HeaderName; 6] = [
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

/// Marks a request whose `Host` the proxy wrote itself (an
/// ExternalService's name), replacing whatever the client sent.
#[derive(Clone, Copy, Debug)]
pub struct HostWritten;

/// The authority a request is sent with: its one `Host`, else its URI's.
/// None (not cached) where they disagree or `Host` is repeated: the key
/// must name what the target is told (an absolute-form request naming
/// one site with another in `Host` would store that site's answer under
/// this one's name).
fn authority_sent(req: &Request) -> Option<String> {
    if req.extensions().get::<HostWritten>().is_some() {
        // The proxy wrote `Host` itself (a vendor's name and port), after
        // the client's URI: that is what the vendor is told.
        return req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return None;
    }
    let host = host
        .map(|h| h.to_str().map(str::to_ascii_lowercase))
        .transpose()
        .ok()?;
    let uri = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_ascii_lowercase());
    match (host, uri) {
        (Some(h), Some(u)) if h != u => None,
        (Some(h), _) => Some(h),
        (None, u) => u,
    }
}

fn classify(store: &ResponseStore, dst: &str, req: &Request) -> Use {
    if !store.covers(req.uri().path()) {
        return Use::Pass;
    }
    // Dialled by address: one pod's answer, not the Service's.
    if req.extensions().get::<super::balance::Pinned>().is_some() {
        return Use::Pass;
    }
    let Some(authority) = authority_sent(req) else {
        return Use::Pass;
    };
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // The destination too: one store serves each port (and each host of
    // a wildcard) of its target.
    let key = format!("{dst} {authority}{path_and_query}");
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
    let (Ok(uri), Ok(host)) = (
        Uri::try_from(format!("http://{authority}{path_and_query}")),
        HeaderValue::from_str(&authority),
    ) else {
        return Use::Pass;
    };
    Use::Lookup(key, Box::new(Asked::new(uri, host, req.headers())))
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
        match classify(&store, &self.dst.label, &req) {
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

/// How long a background revalidation may take, body included, before
/// it is given up (and the entry may be revalidated again).
const BACKGROUND_LIMIT: Duration = Duration::from_secs(30);

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

    /// Counts `outcome` when the client waits on it (`.0`), not for a
    /// background refresh.
    fn counted(&self, (count, outcome): (bool, Outcome)) {
        if count {
            self.count(outcome);
        }
    }

    /// The same lookup, for a background revalidation.
    fn copy(&self) -> Lookup {
        Lookup {
            store: self.store.clone(),
            key: self.key.clone(),
            asked: Box::new(Asked {
                uri: self.asked.uri.clone(),
                method: Method::GET,
                headers: self.asked.headers.clone(),
            }),
            dst: self.dst.clone(),
            shared: self.shared.clone(),
        }
    }

    async fn run<S: super::Inner>(self, inner: S, mut req: Request) -> Result<Response, BoxError> {
        let head_only = req.method() == Method::HEAD;
        let now = SystemTime::now();
        let Some(stored) = self.store.entries.get(&self.key) else {
            return self.miss(super::call(inner, req), head_only).await;
        };
        let conditional = match stored.policy.before_request(&*self.asked, now) {
            BeforeRequest::Fresh(_) => {
                self.count(Outcome::Hit);
                return Ok(stored.answer(now, head_only));
            }
            // Another variant (`Vary`), or the client will not take this
            // one (`no-cache`, `max-age=0`, …) unvalidated.
            BeforeRequest::Stale { request, matches } => matches.then_some(request),
        };
        let Some(conditional) = conditional else {
            return self.miss(super::call(inner, req), head_only).await;
        };
        if head_only {
            // A HEAD is answered from a fresh GET only; a stale one asks
            // the target as it is (a HEAD's answer has no body to store).
            let result = super::call(inner, req).await;
            let now = SystemTime::now();
            if failed(&result) && stored.may_stand_in_for_error(now) {
                self.count(Outcome::StaleIfError);
                return Ok(stored.answer(now, true));
            }
            self.count(Outcome::Miss);
            return result;
        }
        if stored.may_be_given_while_revalidating(now) && !self.asked.wants_validation() {
            if !stored.revalidating.swap(true, Ordering::AcqRel) {
                let background = copy_for_revalidation(&req, &conditional.headers);
                let (lookup, inner, stored) = (self.copy(), inner.clone(), stored.clone());
                tokio::spawn(async move {
                    let refresh = async {
                        let result = super::call(inner, background).await;
                        if let Ok(rsp) = lookup.revalidated(&stored, result, false).await {
                            // Read to its end, which stores it (a body
                            // the cache does not keep is let go as read).
                            let mut body = rsp.into_body();
                            while let Some(Ok(_)) = body.frame().await {}
                        }
                    };
                    let _ = tokio::time::timeout(BACKGROUND_LIMIT, refresh).await;
                    stored.revalidating.store(false, Ordering::Release);
                });
            }
            self.count(Outcome::Stale);
            return Ok(stored.answer(now, false));
        }
        add_validators(req.headers_mut(), &conditional.headers);
        let result = super::call(inner, req).await;
        self.revalidated(&stored, result, true).await
    }

    /// A request nothing stored answers: to the target, and its answer
    /// kept when it may be.
    async fn miss(self, fut: super::Answer, head_only: bool) -> Result<Response, BoxError> {
        self.count(Outcome::Miss);
        let rsp = fut.await?;
        if head_only {
            return Ok(rsp);
        }
        Ok(self.keep_answer(rsp))
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
        let counted = |outcome| (count, outcome);
        // The 304 answers the validators this proxy sent for `stored`.
        // One naming another strong validator is not this answer's (RFC
        // 9111 §4.3.4), nor an answer for a client that sent no condition
        // of its own: a failure of the target, as far as the client goes.
        let strong = |h: &HeaderMap| {
            h.get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.starts_with("W/"))
        };
        let foreign_304 = result.as_ref().is_ok_and(|rsp| {
            rsp.status() == StatusCode::NOT_MODIFIED
                && matches!((strong(rsp.headers()), strong(&stored.headers)), (Some(new), Some(old)) if new != old)
        });
        if foreign_304 {
            self.store.forget_if(&self.key, stored);
        }
        if (failed(&result) || foreign_304) && stored.may_stand_in_for_error(now) {
            self.counted(counted(Outcome::StaleIfError));
            return Ok(stored.answer(now, false));
        }
        if foreign_304 {
            self.counted(counted(Outcome::Miss));
            return Err(super::ProxyError::UpstreamReset(
                self.dst.label.clone(),
                "it answered 304 Not Modified naming a validator it was not sent".to_owned(),
            )
            .into());
        }
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                self.counted(counted(Outcome::Miss));
                return Err(e);
            }
        };
        if rsp.status() != StatusCode::NOT_MODIFIED {
            self.counted(counted(Outcome::Miss));
            return Ok(self.keep_answer(rsp));
        }
        self.counted(counted(Outcome::Revalidated));
        // RFC 9111 §3.2: each field the 304 carries replaces every value
        // of that field in the stored head (all of the 304's values kept);
        // the body and its framing stay. The stored `Age` goes unless the
        // 304 gives one: the answer is as old as the 304.
        let mut headers = stored.headers.clone();
        headers.remove(http::header::AGE);
        let mut merged = std::collections::HashSet::new();
        for (name, value) in owned(rsp.headers()).iter() {
            if matches!(
                *name,
                http::header::CONTENT_LENGTH
                    | http::header::CONTENT_ENCODING
                    | http::header::CONTENT_RANGE
                    | http::header::TRANSFER_ENCODING
            ) {
                continue;
            }
            if merged.insert(name.clone()) {
                headers.remove(name);
            }
            headers.append(name.clone(), value.clone());
        }
        let entry = Entry::of(&self.asked, stored.status, headers, now);
        let status = entry.status;
        let merged_head = entry.headers.clone();
        let kept = match entry.worth_keeping(&self.store.config) {
            Some(entry) => self.store_body(entry, stored.body.clone(), now, Some(stored)),
            None => {
                self.store.forget_if(&self.key, stored);
                None
            }
        };
        // The stored body with the refreshed head: the entry built from
        // it, or where it is not to be kept (the 304 said `no-store`, or
        // set a cookie), the merged head all the same.
        Ok(match kept {
            Some(entry) => entry.answer(now, false),
            None => {
                let mut rsp = Response::new(body::full(stored.body.clone()));
                *rsp.status_mut() = status;
                *rsp.headers_mut() = merged_head;
                rsp
            }
        })
    }

    /// Stores `body` with `entry` when it fits the object cap; the entry
    /// built (stored, or not when `replacing` is no longer what the key
    /// holds), None when it does not fit.
    fn store_body(
        &self,
        entry: (Entry, Windows),
        body: Bytes,
        now: SystemTime,
        replacing: Option<&Arc<Stored>>,
    ) -> Option<Arc<Stored>> {
        let (entry, windows) = entry;
        let asked = self.asked.for_storage(&entry.headers);
        let weight = ENTRY_OVERHEAD
            + self.key.len() as u64
            + body.len() as u64
            + 2 * header_bytes(&entry.headers)
            + header_bytes(&asked.headers);
        if weight > self.store.config.max_object_bytes || !self.store.stores() {
            match replacing {
                Some(old) => self.store.forget_if(&self.key, old),
                None => self.store.forget(&self.key),
            }
            return None;
        }
        let fresh_until = now
            .checked_add(entry.policy.time_to_live(now))
            .unwrap_or(now + MAX_STALE_IF_ERROR * 365);
        Some(self.store.insert(
            self.key.clone(),
            Stored {
                policy: entry.policy,
                status: entry.status,
                headers: entry.headers,
                body,
                fresh_until,
                windows,
                weight,
                revalidating: AtomicBool::new(false),
            },
            replacing,
        ))
    }

    /// Gives the target's answer on at once, and stores it once its body
    /// has passed whole (up to the largest answer stored), when RFC 9111
    /// and the rules of this cache allow.
    fn keep_answer(self, rsp: Response) -> Response {
        let now = SystemTime::now();
        let entry = Entry::of(&self.asked, rsp.status(), owned(rsp.headers()), now);
        let stream = rsp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| {
                t.trim()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        let limit = self.store.config.max_object_bytes;
        let declared = rsp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let entry = entry
            .worth_keeping(&self.store.config)
            .filter(|_| self.store.stores() && !stream && declared.is_none_or(|n| n <= limit));
        let Some(entry) = entry else {
            // A stored answer this one supersedes goes (`no-store` now,
            // too large, a stream).
            self.store.forget(&self.key);
            return rsp;
        };
        if http_body::Body::is_end_stream(rsp.body()) {
            // No body to pass (a 204, `Content-Length: 0`): a server never
            // polls it, so it is stored now.
            self.store_body(entry, Bytes::new(), now, None);
            return rsp;
        }
        // Grown as the body comes, from at most a page or two up front.
        let capacity = declared.unwrap_or(0).min(limit).min(16 << 10) as usize;
        rsp.map(|inner| {
            let tee = Tee {
                inner,
                read: Some(BytesMut::with_capacity(capacity)),
                limit,
                done: Some(Box::new(move |body: Bytes| {
                    self.store_body(entry, body, now, None);
                })),
            };
            tee.boxed_unsync()
        })
    }
}

/// An answer's head as the crate reads it.
fn head_view(status: StatusCode, headers: HeaderMap) -> http::Response<()> {
    let mut view = http::Response::new(());
    *view.status_mut() = status;
    *view.headers_mut() = headers;
    view
}

/// An answer's head and the policy RFC 9111 gives it, before its body.
struct Entry {
    policy: CachePolicy,
    status: StatusCode,
    headers: HeaderMap,
}

impl Entry {
    /// The policy RFC 9111 gives the answer with `headers` to `asked`. The
    /// crate reads a copy whose Cache-Control and Pragma are normalised
    /// ([`normalize_cache_control`]); the head stored and given is the
    /// target's own.
    fn of(asked: &Asked, status: StatusCode, headers: HeaderMap, now: SystemTime) -> Entry {
        let mut seen = headers.clone();
        normalize_cache_control(&mut seen, &[]);
        let policy = CachePolicy::new_options(
            &asked.for_storage(&seen),
            &head_view(status, seen),
            now,
            options(),
        );
        Entry {
            policy,
            status,
            headers,
        }
    }

    /// The entry and its stale windows, if it is to be stored: storable
    /// for a shared cache, not setting a cookie unless `public`, and of
    /// some use later (fresh for a while, a validator to revalidate with,
    /// or given stale on error).
    fn worth_keeping(self, config: &CacheConfig) -> Option<(Entry, Windows)> {
        if !self.policy.is_storable() {
            return None;
        }
        let public = directives(&self.headers).iter().any(|(n, _)| n == "public");
        if self.headers.contains_key(http::header::SET_COOKIE) && !public {
            return None;
        }
        // `Vary: *` matches no later request.
        let vary_all = self.headers.get_all(http::header::VARY).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|n| n.trim() == "*"))
        });
        if vary_all {
            return None;
        }
        let windows = stale_windows(&self.headers, config);
        let fresh = self.policy.time_to_live(SystemTime::now()) > Duration::ZERO;
        let validator = self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED);
        let useful = fresh || validator || windows.stale_if_error.is_some();
        useful.then_some((self, windows))
    }
}

fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..CacheOptions::default()
    }
}

pin_project_lite::pin_project! {
    /// An answer's body on its way to the client, copied aside up to the
    /// largest answer stored; `done` gets the copy once the body ended
    /// whole (no trailers, no error, not too large).
    struct Tee {
        #[pin]
        inner: Body,
        read: Option<BytesMut>,
        limit: u64,
        done: Option<Box<dyn FnOnce(Bytes) + Send>>,
    }
}

impl Tee {
    fn finish(read: &mut Option<BytesMut>, done: &mut Option<Box<dyn FnOnce(Bytes) + Send>>) {
        if let (Some(read), Some(done)) = (read.take(), done.take()) {
            // Exactly its size: the buffer may have grown past it.
            done(Bytes::copy_from_slice(&read));
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => match this.read.as_mut() {
                    Some(read) if (read.len() + data.len()) as u64 <= *this.limit => {
                        read.extend_from_slice(data);
                        // A server stops polling once the body says it
                        // ended: that is the end too.
                        if this.inner.is_end_stream() {
                            Tee::finish(this.read, this.done);
                        }
                    }
                    _ => {
                        *this.read = None;
                        *this.done = None;
                    }
                },
                // Trailers: given on, not stored.
                None => {
                    *this.read = None;
                    *this.done = None;
                }
            },
            Poll::Ready(None) => Tee::finish(this.read, this.done),
            Poll::Ready(Some(Err(_))) => {
                *this.read = None;
                *this.done = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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
/// record or trace, nor its deadline: the client has its answer, and the
/// refresh runs on the target's own timeout.
fn copy_for_revalidation(req: &Request, conditional: &HeaderMap) -> Request {
    let mut copy = http::Request::new(body::empty());
    *copy.method_mut() = Method::GET;
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    super::deadline::strip(copy.headers_mut());
    copy.headers_mut().remove(&super::deadline::GRPC_TIMEOUT);
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

    fn windows(sie: Option<u64>, swr: Option<u64>) -> Windows {
        Windows {
            stale_if_error: sie.map(Duration::from_secs),
            stale_while_revalidate: swr.map(Duration::from_secs),
        }
    }

    /// The answer's own windows win over the policy's; an answer that
    /// must be revalidated, or that the target did not mark reusable, is
    /// never given stale, whatever the policy.
    #[test]
    fn stale_windows_come_from_the_answer_then_the_policy_and_never_past_a_must() {
        let mut c = config();
        assert_eq!(
            stale_windows(&headers("max-age=60"), &c),
            windows(None, None)
        );
        c.stale_if_error_ms = Some(300_000);
        c.stale_while_revalidate_ms = Some(10_000);
        assert_eq!(
            stale_windows(&headers("max-age=60"), &c),
            windows(Some(300), Some(10))
        );
        assert_eq!(
            stale_windows(
                &headers("Max-Age=60, stale-if-error=20, Stale-While-Revalidate=\"5\""),
                &c
            ),
            windows(Some(20), Some(5))
        );
        assert_eq!(
            stale_windows(&headers("max-age=60, stale-if-error=999999999"), &c).stale_if_error,
            Some(MAX_STALE_IF_ERROR)
        );
        for must in [
            "must-revalidate",
            "Proxy-Revalidate",
            "no-cache",
            "s-maxage=60",
            "no-store",
            "max-age=30",
        ] {
            assert_eq!(
                stale_windows(
                    &headers(&format!("max-age=60, stale-if-error=60, {must}")),
                    &c
                ),
                windows(None, None),
                "{must}"
            );
        }
        // Nothing said about reuse: never stale, even with the policy's.
        assert_eq!(stale_windows(&HeaderMap::new(), &c), windows(None, None));
        let mut pragma = headers("public");
        pragma.insert(http::header::PRAGMA, HeaderValue::from_static("No-Cache"));
        assert_eq!(stale_windows(&pragma, &c), windows(None, None));
    }

    /// Directive names reach the crate in lower case, and a client's
    /// `max-stale` never does.
    #[test]
    fn cache_control_is_lowercased_and_max_stale_dropped() {
        let mut h = headers("Private, Max-Age=600, community=\"UCI\"");
        normalize_cache_control(&mut h, &[]);
        assert_eq!(h["cache-control"], "private, max-age=600, community=UCI");
        let mut h = headers("max-stale, no-cache");
        normalize_cache_control(&mut h, &["max-stale"]);
        assert_eq!(h["cache-control"], "no-cache");
        let mut h = headers("Max-Stale=60");
        normalize_cache_control(&mut h, &["max-stale"]);
        assert!(!h.contains_key("cache-control"));
    }

    /// Repeated request fields are one value to `Vary`: two users whose
    /// first cookie is the same are still told apart.
    #[test]
    fn repeated_fields_are_joined_for_vary() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("theme=dark"));
        h.append("cookie", HeaderValue::from_static("session=alice"));
        h.append("accept", HeaderValue::from_static("text/html"));
        h.append("accept", HeaderValue::from_static("application/json"));
        let asked = Asked::new(
            Uri::from_static("http://feed.test/p"),
            HeaderValue::from_static("feed.test"),
            &h,
        );
        assert_eq!(asked.headers["cookie"], "theme=dark; session=alice");
        assert_eq!(asked.headers["accept"], "text/html, application/json");
        assert_eq!(asked.headers["host"], "feed.test");
    }

    /// The key names the authority the target is told: the one `Host`,
    /// else the URI's; a request whose two disagree, or with two `Host`s,
    /// is not cached (it would store one site's answer under another's
    /// name).
    #[test]
    fn the_key_is_the_authority_sent_and_disagreement_is_not_cached() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut r = http::Request::get(uri)
                .body(body::empty())
                .expect("request");
            for h in hosts {
                r.headers_mut()
                    .append(http::header::HOST, HeaderValue::from_str(h).expect("host"));
            }
            r
        };
        assert_eq!(
            authority_sent(&req("/x", &["Shop.Test"])).as_deref(),
            Some("shop.test")
        );
        assert_eq!(
            authority_sent(&req("http://shop.test/x", &[])).as_deref(),
            Some("shop.test")
        );
        assert_eq!(
            authority_sent(&req("http://shop.test/x", &["shop.test"])).as_deref(),
            Some("shop.test")
        );
        assert_eq!(
            authority_sent(&req("http://shop.test/x", &["evil.test"])),
            None
        );
        assert_eq!(
            authority_sent(&req("/x", &["shop.test", "evil.test"])),
            None
        );
        assert_eq!(authority_sent(&req("/x", &[])), None);
    }

    /// Every cache of a proxy draws on one 64 MiB budget: a store gets
    /// its `maxBytes` or what is left, none when too little is left for
    /// four of its largest answers, and gives its share back when it goes.
    #[test]
    fn the_caches_of_a_proxy_share_one_budget() {
        let metrics = Arc::new(crate::proxy::metrics::ProxyMetrics::new());
        let mut c = config();
        c.max_bytes = 48 << 20;
        c.max_object_bytes = 1 << 20;
        let a = ResponseStore::new("a".into(), c.clone(), metrics.clone());
        let b = ResponseStore::new("b".into(), c.clone(), metrics.clone());
        let granted = |s: &ResponseStore| s.granted.load(Ordering::Acquire);
        assert_eq!((granted(&a), granted(&b)), (48 << 20, 16 << 20));
        let none = ResponseStore::new("c".into(), c.clone(), metrics.clone());
        assert!(!none.stores());
        // Budget freed goes to the stores that want more, when they next
        // store: a settings change (a new store while the old one still
        // holds its share) is not left without a cache.
        drop(a);
        assert!(b.stores());
        assert_eq!(granted(&b), 48 << 20);
        assert!(none.stores());
        assert_eq!(granted(&none), 16 << 20);
        assert_eq!(none.entries.capacity(), 16 << 20);
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
