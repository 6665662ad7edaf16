//! Access logs: one JSON object per HTTP request on the proxy's stdout
//! (its own logs go to stderr), off by default. A pod turns them on with
//! the annotation `weft.dev/access-log: json` (or its namespace does, for
//! every pod injected after), as Linkerd's `config.linkerd.io/access-log`
//! does; the injector passes `WEFT_ACCESS_LOG=json`.
//!
//! A line is written when the response body ends (or the client goes
//! away), so it holds the whole exchange:
//!
//! ```json
//! {"timestamp":"2026-12-06T17:02:20.123Z","direction":"outbound",
//!  "src":"spiffe://cluster.local/ns/shop/sa/cart","src_addr":"10.244.1.7:51234","mtls":true,
//!  "dst":"inventory.shop:80","endpoint":"10.244.2.9:8080","route":"default",
//!  "method":"GET","authority":"inventory.shop","path":"/stock","protocol":"HTTP/1.1",
//!  "status":200,"proxy_error":null,"completed":true,"duration_ms":4.21,"upstream_ms":3.9,
//!  "retries":1,"bytes_in":0,"bytes_out":312,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}
//! ```
//!
//! - `src`: outbound, this pod's identity (its workload name without one);
//!   inbound, the caller's verified SPIFFE id over mesh TLS, else the
//!   workload a published pod address belongs to (`ns/<ns>/sa/<sa>`,
//!   unverified), else `unknown`; `src_addr` is the connection's peer.
//! - `dst`: outbound, the Service and port (the metrics' `dst`); inbound,
//!   this workload. `endpoint`: the pod the last attempt went to, or the
//!   application's address.
//! - `path`: normalised as the proxy compares it, the query dropped unless
//!   `weft.dev/access-log-query: keep` (queries carry tokens and personal
//!   data more often than paths do).
//! - `mtls`: the hop was mesh mTLS (outbound: to the pod; inbound: from
//!   the caller, so `src` is verified).
//! - `proxy_error`: the `weft-proxy-error` reason of an answer the proxy
//!   made itself ([`ProxyAnswer`]), never a header an upstream sent.
//! - `upstream_ms`: from sending the last attempt to its response head;
//!   null when no upstream answered it. `duration_ms`: from the request
//!   head to the end of the response body; `completed`: the body got
//!   there (false, `status` null, when the client left before any head).
//! - `retries`: attempts sent beyond the first.
//! - `trace_id`: from a valid W3C `traceparent`, else null.
//!
//! Writing never slows a request: lines are appended to a buffer a writer
//! thread empties every 100 ms (at once past 32 KiB), so a busy proxy pays
//! no wake-up, allocation or write(2) per line; past [`QUEUE_BYTES`]
//! waiting (stdout blocked or slower than the traffic) a line is dropped
//! and counted in `weft_proxy_access_log_dropped_total`.

use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::destination::Destination;
use super::http::body::{Body, BodyError, Request, Response};
use super::http::pool::OverMeshTls;
use super::http::route::normalize_path;

/// Bytes of lines waiting for the writer at most; past it lines are
/// dropped and counted. A quarter of a MiB: a few thousand lines, within
/// the proxy's memory budget.
pub const QUEUE_BYTES: usize = 256 * 1024;
/// The longest path (with its query, when kept) a line holds; longer ones
/// are cut at a character boundary and end in `...`.
pub const MAX_PATH: usize = 1024;
/// The same for the authority (host and port) and the method.
const MAX_AUTHORITY: usize = 256;
const MAX_METHOD: usize = 32;

/// `--access-log`: what the proxy writes per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Off,
    Json,
}

/// `--access-log-query`: whether a line's path keeps the query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Query {
    #[default]
    Drop,
    Keep,
}

/// The sink every access-log line goes to.
pub struct AccessLog {
    queue: Arc<Queue>,
    dropped: Counter,
    keep_query: bool,
    /// This pod's `src` on outbound lines.
    local: Arc<str>,
    /// This workload, the `dst` of inbound lines.
    workload: Arc<str>,
}

/// Lines waiting for the writer thread, appended to one buffer. The
/// writer is woken once when lines start to wait and once when they reach
/// [`FLUSH_AT`]; otherwise it writes what gathered every [`FLUSH_EVERY`].
/// So a busy proxy pays no wake-up, allocation or write(2) per line.
struct Queue {
    state: Mutex<Waiting>,
    wake: Condvar,
}

#[derive(Default)]
struct Waiting {
    lines: Vec<u8>,
    /// The writer sleeps until woken (nothing waited).
    idle: bool,
    /// The writer was woken for [`FLUSH_AT`] since its last batch.
    urged: bool,
    /// The writer holds a batch it has not written yet.
    writing: bool,
}

/// How long the writer gathers lines before writing them.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Waiting bytes that make the writer write at once.
const FLUSH_AT: usize = 32 * 1024;

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AccessLog {
    /// Lines to `out` (the process's stdout; tests give a buffer), from
    /// a writer thread of their own. `local` names this pod on outbound
    /// lines, `workload` on inbound ones.
    pub fn to_writer(
        mut out: Box<dyn Write + Send>,
        local: Arc<str>,
        workload: Arc<str>,
        keep_query: bool,
        dropped: Counter,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            state: Mutex::new(Waiting::default()),
            wake: Condvar::new(),
        });
        let q = queue.clone();
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                let mut failing = false;
                let mut waiting = q.lock();
                loop {
                    while waiting.lines.is_empty() {
                        waiting.idle = true;
                        waiting = q.wake.wait(waiting).unwrap_or_else(|e| e.into_inner());
                    }
                    waiting.idle = false;
                    if waiting.lines.len() < FLUSH_AT {
                        waiting = q
                            .wake
                            .wait_timeout(waiting, FLUSH_EVERY)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    let mut batch = std::mem::replace(&mut waiting.lines, std::mem::take(&mut spare));
                    waiting.urged = false;
                    waiting.writing = true;
                    drop(waiting);
                    let result = out.write_all(&batch).and_then(|()| out.flush());
                    // Said once per outage, not per line; the lines are
                    // counted as dropped.
                    match (result, failing) {
                        (Err(e), was) => {
                            lost.inc_by(batch.iter().filter(|b| **b == b'\n').count() as u64);
                            if !was {
                                tracing::warn!(error = %e, "access log: writing to stdout failed; lines are dropped and counted until it works again");
                            }
                            failing = true;
                        }
                        (Ok(()), _) => failing = false,
                    }
                    // The buffer is reused, unless one burst grew it well
                    // past a batch.
                    batch.clear();
                    if batch.capacity() > 4 * FLUSH_AT {
                        batch = Vec::new();
                    }
                    spare = batch;
                    waiting = q.lock();
                    waiting.writing = false;
                }
            })?;
        Ok(Self {
            queue,
            dropped,
            keep_query,
            local,
            workload,
        })
    }

    /// Waits (at most `within`) until every line queued is written and
    /// flushed: the proxy's last lines on its way out.
    pub fn flush(&self, within: Duration) {
        let until = Instant::now() + within;
        loop {
            {
                let waiting = self.queue.lock();
                if waiting.lines.is_empty() && !waiting.writing {
                    return;
                }
            }
            if Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn write(&self, line: &[u8]) {
        let mut waiting = self.queue.lock();
        if waiting.lines.len() + line.len() > QUEUE_BYTES {
            drop(waiting);
            self.dropped.inc();
            return;
        }
        waiting.lines.extend_from_slice(line);
        let urge = !waiting.urged && waiting.lines.len() >= FLUSH_AT;
        if waiting.idle || urge {
            waiting.idle = false;
            waiting.urged |= urge;
            drop(waiting);
            self.queue.wake.notify_one();
        }
    }

    /// Starts the line of a request the proxy received: counts its body's
    /// bytes from here on and hands the stack a [`Record`] to fill.
    /// `src`: the caller as the direction names it (see the module docs);
    /// outbound passes None for this pod's own identity.
    pub fn begin(
        self: &Arc<Self>,
        direction: Direction,
        src: Option<Arc<str>>,
        src_addr: Option<SocketAddr>,
        req: &mut Request,
    ) -> Pending {
        let record = Arc::new(Record::default());
        let body = std::mem::replace(req.body_mut(), super::http::body::empty());
        *req.body_mut() = Body::new(Counted {
            inner: body,
            count: Count::Shared(record.clone()),
        });
        req.extensions_mut().insert(RecordRef(record.clone()));
        // Only bounded copies of what the client sent (a path or a Host
        // may be 64 KiB), the three in one string: the line lives as long
        // as the response streams.
        let normal = normalize_path(req.uri().path());
        let query = req.uri().query().filter(|_| self.keep_query);
        // Host and port only: an absolute-form URI's userinfo
        // (`http://user:pass@host/`) is a credential.
        let authority = match req.uri().authority() {
            Some(a) => Some(a.as_str().rsplit('@').next().unwrap_or_default()),
            None => req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.rsplit('@').next().unwrap_or_default()),
        };
        let method = req.method().as_str();
        let path = [
            &*normal,
            if query.is_some() { "?" } else { "" },
            query.unwrap_or(""),
        ];
        let mut text = String::with_capacity(
            method.len().min(MAX_METHOD)
                + authority.map_or(0, |a| a.len().min(MAX_AUTHORITY))
                + path.iter().map(|p| p.len()).sum::<usize>().min(MAX_PATH),
        );
        push_capped(&mut text, &[method], MAX_METHOD);
        let method_end = text.len();
        let authority_end = authority.map(|a| {
            push_capped(&mut text, &[a], MAX_AUTHORITY);
            text.len()
        });
        push_capped(&mut text, &path, MAX_PATH);
        Pending(Some(Box::new(Line {
            begun: Begun {
                log: self.clone(),
                record,
                started: Instant::now(),
                at: SystemTime::now(),
                direction,
                src: src.unwrap_or_else(|| self.local.clone()),
                src_addr,
                text,
                method_end,
                authority_end,
                version: req.version(),
                trace_id: trace_id_of(req.headers()),
                fallback_dst: None,
            },
            status: None,
            proxy_error: None,
            mtls: None,
            bytes_out: 0,
            completed: false,
        })))
    }
}

/// Appends `parts` joined to `out`, at most `max` bytes of them: a longer
/// text is cut at a character boundary and ends in `...`.
fn push_capped(out: &mut String, parts: &[&str], max: usize) {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(max >= 3, "room for the \"...\"");
    let mut room = if total > max {
        max.saturating_sub(3)
    } else {
        total
    };
    for part in parts {
        if part.len() <= room {
            out.push_str(part);
            room -= part.len();
        } else {
            let mut at = room;
            while !part.is_char_boundary(at) {
                at -= 1;
            }
            out.push_str(&part[..at]);
            break;
        }
    }
    if total > max {
        out.push_str("...");
    }
}

/// A request's direction through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// What the stack learns of a request on its way, for its line: the
/// destination and route (the outbound stack's outer layer), the pod of
/// each attempt and the last attempt's upstream time (the balancer). In
/// the request's extensions as [`RecordRef`], so retries (which copy the
/// extensions) fill the same one.
#[derive(Default)]
pub struct Record {
    learned: Mutex<Learned>,
    /// The request body's data bytes, counted as they pass.
    bytes_in: AtomicU64,
}

#[derive(Default)]
struct Learned {
    mtls: Option<bool>,
    dst: Option<Dst>,
    route: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    upstream: Option<Duration>,
}

impl Record {
    fn learn(&self, f: impl FnOnce(&mut Learned)) {
        f(&mut self.learned.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The destination and route the request was sent to.
    pub fn destination(&self, dst: &Arc<Destination>, route: &Arc<str>) {
        self.learn(|l| {
            l.dst = Some(Dst::Service(dst.clone()));
            l.route = Some(route.clone());
        });
    }

    /// One attempt sent to `endpoint`.
    pub fn attempt(&self, endpoint: SocketAddr) {
        self.learn(|l| {
            l.endpoint = Some(endpoint);
            l.attempts += 1;
            // An earlier attempt's answer is not this one's.
            l.upstream = None;
        });
    }

    /// An inbound request for this pod's application at `app`, on a
    /// connection over mesh mTLS or not.
    pub fn to_app(&self, app: SocketAddr, mtls: bool) {
        self.learn(|l| {
            l.dst = Some(Dst::Workload);
            l.endpoint = Some(app);
            l.mtls = Some(mtls);
        });
    }

    /// The upstream answered the last attempt after `took`.
    pub fn answered(&self, took: Duration) {
        self.learn(|l| l.upstream = Some(took));
    }
}

/// A line's `dst`, named when the line is written (no copy per request).
enum Dst {
    /// Outbound: the destination's label.
    Service(Arc<Destination>),
    /// Inbound: this workload.
    Workload,
}

/// The request extension holding its [`Record`].
#[derive(Clone)]
pub struct RecordRef(pub Arc<Record>);

impl RecordRef {
    /// The record of a request whose line is being kept, if any.
    pub fn of(req: &Request) -> Option<&Arc<Record>> {
        req.extensions().get::<RecordRef>().map(|r| &r.0)
    }
}

/// A request begun, its line not yet written. Dropped before
/// [`Pending::finish`] (the client reset the stream or closed the
/// connection, or the drain ran out, before any response head), it writes
/// the line all the same: no status, `completed: false`.
pub struct Pending(Option<Box<Line>>);

/// What a line knows from the request head.
struct Begun {
    log: Arc<AccessLog>,
    record: Arc<Record>,
    started: Instant,
    at: SystemTime,
    direction: Direction,
    src: Arc<str>,
    src_addr: Option<SocketAddr>,
    /// The method, the authority (when there is one) and the path, each
    /// capped, one after the other: `text[..method_end]`,
    /// `text[method_end..authority_end]`, the rest.
    text: String,
    method_end: usize,
    authority_end: Option<usize>,
    version: http::Version,
    trace_id: Option<u128>,
    /// The `dst` when the stack never named one (no config yet, a host
    /// that does not resolve): the target the client dialled.
    fallback_dst: Option<Dialled>,
}

impl Begun {
    fn method(&self) -> &str {
        &self.text[..self.method_end]
    }

    fn authority(&self) -> Option<&str> {
        self.authority_end
            .map(|end| &self.text[self.method_end..end])
    }

    fn path(&self) -> &str {
        &self.text[self.authority_end.unwrap_or(self.method_end)..]
    }
}

/// The target an outbound client dialled, named only if a line needs it.
#[derive(Clone)]
pub enum Dialled {
    /// A transparent connection's original destination.
    Addr(SocketAddr),
    /// An explicit listener's `host:port` (made once per connection).
    Named(Arc<str>),
}

impl Pending {
    /// The record the stack fills (inbound fills it itself).
    pub fn record(&self) -> &Arc<Record> {
        &self
            .0
            .as_ref()
            .expect("a pending line until finished")
            .begun
            .record
    }

    /// The `dst` to write when the stack names none.
    pub fn fallback_dst(&mut self, dst: Dialled) {
        if let Some(line) = &mut self.0 {
            line.begun.fallback_dst = Some(dst);
        }
    }

    /// The response head is known: its body is counted, and the line is
    /// written when the body ends or is dropped.
    pub fn finish(mut self, rsp: Response) -> Response {
        let Some(mut line) = self.0.take() else {
            return rsp;
        };
        let (parts, body) = rsp.into_parts();
        line.status = Some(parts.status.as_u16());
        // The proxy's own answers only, never a header an upstream sent
        // (which would claim one, and could be any length).
        line.proxy_error = parts.extensions.get::<ProxyAnswer>().map(|a| a.0);
        line.mtls = parts.extensions.get::<OverMeshTls>().map(|t| t.0);
        let body = Body::new(Counted {
            inner: body,
            count: Count::Line(line),
        });
        Response::from_parts(parts, body)
    }
}

/// A response extension the proxy puts on the answers it makes itself
/// (`errors::response`): the `weft-proxy-error` reason.
#[derive(Clone, Copy, Debug)]
pub struct ProxyAnswer(pub &'static str);

/// A request's line, written when dropped: with its response body (or
/// with the request, when no response head came).
///
/// Dropped with its [`Pending`] before any response head (the client reset
/// the stream or closed the connection, or the drain ran out), it is
/// written all the same: no status, `completed: false`.
struct Line {
    begun: Begun,
    status: Option<u16>,
    proxy_error: Option<&'static str>,
    /// Over mesh mTLS: outbound from the response, inbound from the
    /// connection ([`Record::to_app`]).
    mtls: Option<bool>,
    bytes_out: u64,
    /// The response body reached its end.
    completed: bool,
}

impl Drop for Line {
    fn drop(&mut self) {
        let p = &self.begun;
        let learned =
            std::mem::take(&mut *p.record.learned.lock().unwrap_or_else(|e| e.into_inner()));
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        // Formatted only for a request no destination claimed.
        let dialled = match (&learned.dst, &p.fallback_dst) {
            (None, Some(Dialled::Addr(a))) => Some(a.to_string()),
            _ => None,
        };
        let dst = match &learned.dst {
            Some(Dst::Service(d)) => Some(d.label.as_str()),
            Some(Dst::Workload) => Some(&*p.log.workload),
            None => match &p.fallback_dst {
                Some(Dialled::Named(n)) => Some(&**n),
                _ => dialled.as_deref(),
            },
        };
        let line = Json {
            timestamp: Rfc3339Millis(p.at),
            direction: p.direction,
            src: &p.src,
            src_addr: p.src_addr,
            mtls: learned.mtls.or(self.mtls).unwrap_or(false),
            dst,
            endpoint: learned.endpoint,
            route: learned.route.as_deref(),
            method: p.method(),
            authority: p.authority(),
            path: p.path(),
            protocol: version(p.version),
            status: self.status,
            proxy_error: self.proxy_error,
            completed: self.completed,
            duration_ms: ms(p.started.elapsed()),
            upstream_ms: learned.upstream.map(ms),
            retries: learned.attempts.saturating_sub(1),
            bytes_in: p.record.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            trace_id: p.trace_id.map(TraceId),
        };
        // Serialised into a buffer each thread keeps: no allocation per
        // line once it has grown.
        SCRATCH.with_borrow_mut(|out| {
            out.clear();
            if serde_json::to_writer(&mut *out, &line).is_ok() {
                out.push(b'\n');
                p.log.write(out);
            }
            if out.capacity() > 16 * 1024 {
                *out = Vec::new();
            }
        });
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One line, in the order its fields are written.
#[derive(Serialize)]
struct Json<'a> {
    timestamp: Rfc3339Millis,
    direction: Direction,
    src: &'a str,
    src_addr: Option<SocketAddr>,
    mtls: bool,
    dst: Option<&'a str>,
    endpoint: Option<SocketAddr>,
    route: Option<&'a str>,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    protocol: &'static str,
    status: Option<u16>,
    proxy_error: Option<&'a str>,
    completed: bool,
    duration_ms: f64,
    upstream_ms: Option<f64>,
    retries: u32,
    bytes_in: u64,
    bytes_out: u64,
    trace_id: Option<TraceId>,
}

/// A trace id as the W3C spec writes it: 32 lowercase hex digits.
struct TraceId(u128);

impl Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:032x}", self.0))
    }
}

fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// `2026-12-06T17:02:20.123Z`, written straight into the line.
struct Rfc3339Millis(SystemTime);

impl std::fmt::Display for Rfc3339Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = time::OffsetDateTime::from(self.0);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl Serialize for Rfc3339Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The trace id of a valid W3C `traceparent`
/// (<https://www.w3.org/TR/trace-context/#traceparent-header>):
/// `version-traceid-parentid-flags`, lowercase hex, version not `ff`, ids
/// not all zeros; a version above 00 may carry more fields after the four.
fn trace_id_of(headers: &HeaderMap) -> Option<u128> {
    Some(super::trace::Parent::parse(headers.get("traceparent")?)?.trace)
}

/// Where a body's byte count goes.
enum Count {
    /// A request body: its line reads the count when written.
    Shared(Arc<Record>),
    /// A response body: its line, written when the body is dropped.
    Line(Box<Line>),
}

/// A body that counts the data bytes passing through.
struct Counted {
    inner: Body,
    count: Count,
}

impl Drop for Counted {
    fn drop(&mut self) {
        // Its line is written next (its own drop): say whether the body
        // ran to its end first. hyper stops polling a body that says it
        // has ended, and never polls an empty one.
        if let Count::Line(line) = &mut self.count {
            line.completed |= self.inner.is_end_stream();
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let n = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let ended = matches!(polled, Poll::Ready(None));
        match &mut self.count {
            Count::Shared(record) => {
                if n > 0 {
                    record.bytes_in.fetch_add(n, Ordering::Relaxed);
                }
            }
            Count::Line(line) => {
                line.bytes_out += n;
                line.completed |= ended;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A writer tests read back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        async fn lines(&self, n: usize) -> Vec<serde_json::Value> {
            for _ in 0..200 {
                let text = String::from_utf8(self.0.lock().expect("buffer").clone()).expect("utf8");
                if text.lines().count() >= n {
                    return text
                        .lines()
                        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
                        .collect();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("not {n} lines");
        }
    }

    fn log(keep_query: bool) -> (Arc<AccessLog>, Buffer, Counter) {
        let buf = Buffer::default();
        let dropped = Counter::default();
        let log = AccessLog::to_writer(
            Box::new(buf.clone()),
            Arc::from("spiffe://cluster.local/ns/shop/sa/cart"),
            Arc::from("cart"),
            keep_query,
            dropped.clone(),
        )
        .expect("writer");
        (Arc::new(log), buf, dropped)
    }

    #[tokio::test]
    async fn a_line_holds_the_whole_exchange_once_the_body_ends() {
        let (log, buf, _) = log(false);
        let mut req = http::Request::post("http://inventory.shop/stock/../reserve?card=4111")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(super::super::http::body::full("12345"))
            .expect("request");
        let addr: SocketAddr = "10.244.1.7:51234".parse().expect("addr");
        let pending = log.begin(Direction::Outbound, None, Some(addr), &mut req);
        // The stack: reads the request body, records two attempts.
        let record = RecordRef::of(&req).expect("record").clone();
        let dst = crate::proxy::http::balance::tests::destination(
            "10.244.2.9:8080".parse().expect("addr"),
            5,
            serde_json::json!({}),
        );
        record.destination(&dst, &Arc::from("default"));
        record.attempt("10.244.2.9:8080".parse().expect("addr"));
        record.attempt("10.244.2.10:8080".parse().expect("addr"));
        record.answered(Duration::from_millis(3));
        let sent = req.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&sent[..], b"12345");
        let rsp = pending.finish(
            http::Response::builder()
                .status(201)
                .body(super::super::http::body::full("created!"))
                .expect("response"),
        );
        assert!(
            buf.0.lock().expect("buffer").is_empty(),
            "not before the body ends"
        );
        let got = rsp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&got[..], b"created!");
        let line = &buf.lines(1).await[0];
        assert_eq!(line["direction"], "outbound");
        assert_eq!(line["src"], "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(line["src_addr"], "10.244.1.7:51234");
        assert_eq!(line["dst"], "inventory.shop:80");
        assert_eq!(line["endpoint"], "10.244.2.10:8080");
        assert_eq!(line["route"], "default");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["authority"], "inventory.shop");
        assert_eq!(line["path"], "/reserve", "normalised, the query dropped");
        assert_eq!(line["status"], 201);
        assert_eq!(line["proxy_error"], serde_json::Value::Null);
        assert_eq!(line["upstream_ms"], 3.0);
        assert!(line["duration_ms"].as_f64().expect("duration") >= 0.0);
        assert_eq!(line["retries"], 1);
        assert_eq!(line["bytes_in"], 5);
        assert_eq!(line["bytes_out"], 8);
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let ts = line["timestamp"].as_str().expect("timestamp");
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
    }

    #[tokio::test]
    async fn a_proxy_error_an_abandoned_body_and_a_kept_query() {
        let (log, buf, _) = log(true);
        let mut req = http::Request::get("/search?q=shoes")
            .header("host", "user:secret@catalog.shop")
            .header(
                "traceparent",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(super::super::http::body::empty())
            .expect("request");
        let pending = log.begin(
            Direction::Inbound,
            Some(Arc::from("unknown")),
            None,
            &mut req,
        );
        let rsp = super::super::http::errors::response(
            &super::super::http::errors::ProxyError::Forbidden("no".into()),
        );
        // The client went away: the body is dropped unread.
        drop(pending.finish(rsp));
        let line = &buf.lines(1).await[0];
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["src"], "unknown");
        assert_eq!(line["mtls"], false);
        assert_eq!(line["authority"], "catalog.shop", "no userinfo");
        assert_eq!(line["path"], "/search?q=shoes");
        assert_eq!(line["status"], 403);
        assert_eq!(line["proxy_error"], "forbidden");
        assert_eq!(line["completed"], false);
        assert_eq!(line["upstream_ms"], serde_json::Value::Null);
        assert_eq!(line["retries"], 0);
        assert_eq!(line["bytes_out"], 0);
        assert_eq!(
            line["trace_id"],
            serde_json::Value::Null,
            "version ff is invalid"
        );
    }

    /// An upstream's `weft-proxy-error` header is not the proxy's answer:
    /// the line does not claim it, whatever its length.
    #[tokio::test]
    async fn an_upstream_cannot_claim_a_proxy_error() {
        let (log, buf, _) = log(false);
        let mut req = http::Request::get("http://payments.payments/charge")
            .body(super::super::http::body::empty())
            .expect("request");
        let pending = log.begin(Direction::Outbound, None, None, &mut req);
        let mut rsp = http::Response::new(super::super::http::body::empty());
        *rsp.status_mut() = http::StatusCode::BAD_GATEWAY;
        rsp.headers_mut().insert(
            super::super::http::errors::ERROR_HEADER,
            http::HeaderValue::from_str(&"x".repeat(300_000)).expect("value"),
        );
        drop(pending.finish(rsp));
        let line = &buf.lines(1).await[0];
        assert_eq!(line["status"], 502);
        assert_eq!(line["proxy_error"], serde_json::Value::Null);
        assert_eq!(line["completed"], true, "an empty body is complete");
    }

    /// A request whose client leaves before any response head still gets
    /// its line: no status, not completed.
    #[tokio::test]
    async fn a_request_abandoned_before_its_response_is_logged() {
        let (log, buf, _) = log(false);
        let mut req = http::Request::get("http://inventory.shop/stock")
            .body(super::super::http::body::empty())
            .expect("request");
        let mut pending = log.begin(Direction::Outbound, None, None, &mut req);
        pending.fallback_dst(Dialled::Named("inventory.shop:80".into()));
        RecordRef::of(&req)
            .expect("record")
            .attempt("10.244.2.9:8080".parse().expect("addr"));
        drop(pending);
        let line = &buf.lines(1).await[0];
        assert_eq!(line["status"], serde_json::Value::Null);
        assert_eq!(line["completed"], false);
        assert_eq!(line["dst"], "inventory.shop:80");
        assert_eq!(line["endpoint"], "10.244.2.9:8080");
    }

    /// A 64 KiB path or Host costs the line a bounded copy, cut at a
    /// character boundary: the three fields in one string of at most
    /// their caps.
    #[test]
    fn long_fields_are_copied_only_up_to_their_cap() {
        let capped = |parts: &[&str], max| {
            let mut out = String::new();
            push_capped(&mut out, parts, max);
            out
        };
        let long = format!("/{}", "é".repeat(32 * 1024));
        let path = capped(&[&long, "?", "q=1"], MAX_PATH);
        assert!(
            path.len() <= MAX_PATH && path.ends_with("..."),
            "{}",
            path.len()
        );
        assert_eq!(capped(&["/a", "?", "b=1"], MAX_PATH), "/a?b=1");
        assert_eq!(capped(&["/a", "", ""], MAX_PATH), "/a");
        assert_eq!(capped(&["abcdef"], 5), "ab...");

        let (log, _, _) = log(true);
        let mut req = http::Request::get(format!("/{}?q=1", "p".repeat(60_000)))
            .header("host", "h".repeat(60_000))
            .body(super::super::http::body::empty())
            .expect("request");
        let pending = log.begin(Direction::Inbound, None, None, &mut req);
        let begun = &pending.0.as_ref().expect("pending").begun;
        assert_eq!(begun.method(), "GET");
        assert_eq!(begun.authority().map(str::len), Some(MAX_AUTHORITY));
        assert!(begun.authority().is_some_and(|a| a.ends_with("...")));
        assert_eq!(begun.path().len(), MAX_PATH);
        assert!(
            begun.text.capacity() <= MAX_METHOD + MAX_AUTHORITY + MAX_PATH,
            "no 60 KiB allocation kept: {}",
            begun.text.capacity()
        );
    }

    #[test]
    fn traceparent_as_the_w3c_spec_reads_it() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let id = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("traceparent", v.parse().expect("value"));
            trace_id_of(&h).map(|t| format!("{t:032x}"))
        };
        assert_eq!(id(ok).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // A future version may add fields; version 00 may not.
        assert!(id(&format!("01{}-extra", &ok[2..])).is_some());
        for bad in [
            format!("{ok}-extra"),
            ok.to_uppercase(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736".into(),
        ] {
            assert_eq!(id(&bad), None, "{bad}");
        }
    }

    /// A writer that never returns: lines pile up to the cap, then are
    /// dropped and counted; the request path never waits.
    #[test]
    fn a_blocked_stdout_drops_and_counts_rather_than_waits() {
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dropped = Counter::default();
        let log = AccessLog::to_writer(
            Box::new(Stuck),
            Arc::from("x"),
            Arc::from("x"),
            false,
            dropped.clone(),
        )
        .expect("writer");
        let line = vec![b'x'; 1000];
        let started = Instant::now();
        for _ in 0..1000 {
            log.write(&line);
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let kept = 1000 - dropped.get() as usize;
        // The queue holds the cap; the writer took one batch (at most the
        // cap) before stdout blocked.
        assert!(
            (QUEUE_BYTES / 1000..=2 * (QUEUE_BYTES / 1000)).contains(&kept),
            "kept {kept}, dropped {}",
            dropped.get()
        );
    }
}
