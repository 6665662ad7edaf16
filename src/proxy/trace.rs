//! Distributed tracing: W3C Trace Context
//! (<https://www.w3.org/TR/trace-context/>) on every hop, and spans
//! exported over OTLP/HTTP when the Mesh names a collector
//! (`spec.tracing`, compiled into the config's `tracing`).
//!
//! Without `tracing` the proxy passes `traceparent` and `tracestate` on as
//! they came (it forwards every header): nothing is read or written.
//!
//! With it, each HTTP request the proxy handles:
//! - keeps the trace and the sampling decision of a valid `traceparent`;
//!   without one (or with an invalid one) it starts a trace, sampled with
//!   the Mesh's probability. The decision travels in the flags, so every
//!   later hop keeps it and a trace is recorded whole or not at all.
//! - gets a span of its own: CLIENT for outbound (as the caller's sidecar
//!   sends it), SERVER for inbound (as the callee's receives it). The
//!   `traceparent` sent on names this span as the parent, so the caller's
//!   client span is the parent of the callee's server span, and the app's
//!   own spans nest under the server span. `tracestate` goes on as it
//!   came with a valid `traceparent`, and is dropped with a trace the
//!   proxy starts; flags other than `sampled` and `random-trace-id` are
//!   zeroed.
//! - if sampled, its span is queued when the response head arrives (its
//!   end), with OpenTelemetry's HTTP semantic-convention attributes; a
//!   request dropped before then (its caller left, say) ends its span when
//!   dropped, as an error with `error.type` `cancelled`.
//!
//! Export never slows a request: spans wait in a bounded queue
//! ([`QUEUE_SPANS`]) that a thread of its own sends in batches
//! ([`BATCH_SPANS`], or every [`EXPORT_EVERY`]) as OTLP/HTTP JSON. A full
//! queue, or a collector that refuses or does not answer, drops spans and
//! counts them (`weft_proxy_spans_dropped_total{reason}`); a failing
//! collector is logged once per outage. Hand-written rather than the
//! `opentelemetry-otlp` crate: see the README's "Tracing" for the memory
//! figures behind the choice.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::http::body::Request;
use super::metrics::ReasonLabels;
use crate::config::TracingConfig;

/// Spans waiting for export at most (under 1 KiB each: the path and the
/// server name are capped).
pub const QUEUE_SPANS: usize = 1024;
/// Spans per export request at most.
pub const BATCH_SPANS: usize = 256;
/// How long spans wait for a batch to fill.
pub const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// A collector gets this long to connect and this long to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest `url.path` a span carries.
const MAX_PATH: usize = 256;

/// A span's kind, as OTLP numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Inbound: the request as this pod's sidecar received it.
    Server = 2,
    /// Outbound: the request as this pod's sidecar sent it on.
    Client = 3,
}

/// The trace flags this proxy passes on: `sampled` (Level 1) and
/// `random-trace-id` (Level 2,
/// <https://www.w3.org/TR/trace-context-2/#random-trace-id-flag>), which
/// stays true of a trace id passed on unchanged. This proxy does not set
/// the latter on the traces it starts.
const KNOWN_FLAGS: u8 = 0b11;

/// A valid `traceparent`'s fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace: u128,
    pub span: u64,
    pub flags: u8,
}

impl Parent {
    /// Parses a `traceparent` value
    /// (<https://www.w3.org/TR/trace-context/#traceparent-header>):
    /// `version-traceid-parentid-flags`, lowercase hex, version not `ff`,
    /// ids not all zeros; a version above 00 may carry more fields.
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let value = value.to_str().ok()?;
        let mut fields = value.split('-');
        let (ver, trace, span, flags) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = hex(ver, 2)
            && ver != "ff"
            && hex(trace, 32)
            && hex(span, 16)
            && hex(flags, 2)
            && (ver != "00" || fields.next().is_none());
        if !valid {
            return None;
        }
        let parent = Parent {
            trace: u128::from_str_radix(trace, 16).ok()?,
            span: u64::from_str_radix(span, 16).ok()?,
            // Only the flags this proxy knows go on: Level 1 says a
            // vendor MUST zero the others, and a later version's bits
            // mean nothing in the version 00 header written here.
            flags: u8::from_str_radix(flags, 16).ok()? & KNOWN_FLAGS,
        };
        (parent.trace != 0 && parent.span != 0).then_some(parent)
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The header value, version 00 (the version this proxy writes).
    pub fn header(&self) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace, self.span, self.flags
        );
        HeaderValue::from_str(&text).expect("hex digits and dashes")
    }
}

/// A standard method's name, else `_OTHER`: what a client sent is never
/// copied into a span unbounded.
fn method_name(m: &http::Method) -> &'static str {
    use http::Method as M;
    match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PATCH => "PATCH",
        M::TRACE => "TRACE",
        M::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v = fastrand::u128(..);
        if v != 0 {
            return v;
        }
    }
}

/// One span, as exported.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace: u128,
    pub id: u64,
    pub parent: Option<u64>,
    pub kind: Kind,
    /// A standard method's name, else `_OTHER` (OpenTelemetry's rule:
    /// an extension method may be 64 KiB long).
    pub method: &'static str,
    pub start: SystemTime,
    pub duration: Duration,
    /// The answer's status; None: the request was dropped before any
    /// answer.
    pub status: Option<u16>,
    /// `url.path`, cut at [`MAX_PATH`].
    pub path: String,
    /// Outbound: the Service or address called; inbound: None.
    pub server: Option<String>,
    /// The proxy's own answer (`weft-proxy-error`), if it answered.
    pub proxy_error: Option<&'static str>,
}

/// What a [`Tracer`] counts. The drop counters are taken from the family
/// once, so a drop on the request path costs no allocation or lock.
#[derive(Clone)]
pub struct TraceMetrics {
    pub exported: Counter,
    pub dropped: Family<ReasonLabels, Counter>,
    queue_full: Counter,
    exporter_gone: Counter,
    collector_failed: Counter,
}

impl Default for TraceMetrics {
    fn default() -> Self {
        let dropped = Family::<ReasonLabels, Counter>::default();
        let reason = |r: &str| {
            dropped
                .get_or_create(&ReasonLabels {
                    reason: r.to_owned(),
                })
                .clone()
        };
        TraceMetrics {
            exported: Counter::default(),
            queue_full: reason("queue-full"),
            exporter_gone: reason("exporter-gone"),
            collector_failed: reason("collector"),
            dropped,
        }
    }
}

/// How long after an exporter thread failed to start (the process is out
/// of threads or memory) the next request may try again.
const RESTART_AFTER: Duration = Duration::from_secs(30);

/// Records spans for one collector, while the config names it.
pub struct Tracer {
    config: TracingConfig,
    queue: SyncSender<Span>,
    metrics: TraceMetrics,
}

/// The proxy's tracer: the one the config in force names, made when the
/// config first names it and replaced when it names another collector.
/// The exporter of a tracer no longer named sends what it holds and ends.
pub struct Tracing {
    current: arc_swap::ArcSwapOption<Tracer>,
    /// Held while a tracer is made; holds when the last one failed to
    /// start, so requests do not each try (and log) again.
    making: Mutex<Option<Instant>>,
    /// `service.name` and `k8s.namespace.name` of the spans.
    workload: Arc<str>,
    metrics: TraceMetrics,
}

/// A request's span, begun: ended (and queued, if sampled) by
/// [`Started::end`].
pub struct Started {
    tracer: Arc<Tracer>,
    ctx: Parent,
    parent: Option<u64>,
    kind: Kind,
    method: &'static str,
    path: String,
    server: Option<String>,
    start: SystemTime,
    began: Instant,
    /// Recorded (or not sampled): nothing more to do when dropped.
    ended: bool,
}

impl Tracing {
    pub fn new(workload: &str, metrics: TraceMetrics) -> Self {
        Tracing {
            current: arc_swap::ArcSwapOption::empty(),
            making: Mutex::new(None),
            workload: workload.into(),
            metrics,
        }
    }

    /// The tracer for `config`'s collector (None: tracing is off).
    fn tracer(&self, config: Option<&TracingConfig>, namespace: &str) -> Option<Arc<Tracer>> {
        let Some(config) = config else {
            if self.current.load().is_some() {
                self.current.store(None);
            }
            return None;
        };
        if let Some(t) = self.current.load_full().filter(|t| &t.config == config) {
            return Some(t);
        }
        let mut failed_at = self.making.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.current.load_full().filter(|t| &t.config == config) {
            return Some(t);
        }
        if failed_at.is_some_and(|at| at.elapsed() < RESTART_AFTER) {
            return None;
        }
        let tracer = match Tracer::start(
            config.clone(),
            &self.workload,
            namespace,
            self.metrics.clone(),
        ) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                tracing::warn!(error = %e, "tracing: the exporter thread did not start; spans are not recorded (tried again in {}s)", RESTART_AFTER.as_secs());
                *failed_at = Some(Instant::now());
                return None;
            }
        };
        *failed_at = None;
        self.current.store(Some(tracer.clone()));
        Some(tracer)
    }

    /// Begins `req`'s span when the config in force turns tracing on:
    /// reads (or starts) its trace and sets the `traceparent` it goes on
    /// with. `server`: the destination an outbound request is sent to.
    pub fn begin(
        &self,
        config: Option<&TracingConfig>,
        namespace: &str,
        kind: Kind,
        server: impl FnOnce() -> Option<String>,
        req: &mut Request,
    ) -> Option<Started> {
        let tracer = self.tracer(config, namespace)?;
        let incoming = req.headers().get("traceparent").and_then(Parent::parse);
        let (trace, parent, flags) = match incoming {
            Some(p) => (p.trace, Some(p.span), p.flags),
            None => {
                // A new trace: a `tracestate` that came without a valid
                // `traceparent` belongs to no trace this request is in
                // and MUST be discarded (Trace Context, "No traceparent
                // received" in the processing model).
                req.headers_mut().remove("tracestate");
                let sampled = fastrand::f64() < tracer.config.sampling;
                (nonzero_u128(), None, u8::from(sampled))
            }
        };
        let ctx = Parent {
            trace,
            span: nonzero_u64(),
            flags,
        };
        req.headers_mut().insert(
            http::header::HeaderName::from_static("traceparent"),
            ctx.header(),
        );
        // What only a recorded span needs is copied only for one.
        let (path, server) = if ctx.sampled() {
            let path = req.uri().path();
            let mut end = path.len().min(MAX_PATH);
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            (path[..end].to_owned(), server())
        } else {
            (String::new(), None)
        };
        Some(Started {
            tracer,
            ctx,
            parent,
            kind,
            method: method_name(req.method()),
            path,
            server,
            start: SystemTime::now(),
            began: Instant::now(),
            ended: false,
        })
    }
}

impl Started {
    /// The response head arrived (or the proxy answered itself): the
    /// span ends, and is queued if its trace is sampled.
    pub fn end(mut self, rsp: &super::http::body::Response) {
        let proxy_error = rsp
            .extensions()
            .get::<super::accesslog::ProxyAnswer>()
            .map(|a| a.0);
        self.record(Some(rsp.status().as_u16()), proxy_error);
    }

    /// Ends the span (once): queued if its trace is sampled. No status:
    /// the request was dropped before any answer.
    fn record(&mut self, status: Option<u16>, proxy_error: Option<&'static str>) {
        if std::mem::replace(&mut self.ended, true) || !self.ctx.sampled() {
            return;
        }
        let span = Span {
            trace: self.ctx.trace,
            id: self.ctx.span,
            parent: self.parent,
            kind: self.kind,
            method: self.method,
            start: self.start,
            duration: self.began.elapsed(),
            status,
            path: std::mem::take(&mut self.path),
            server: self.server.take(),
            proxy_error,
        };
        match self.tracer.queue.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.tracer.metrics.queue_full.inc();
            }
            Err(TrySendError::Disconnected(_)) => {
                self.tracer.metrics.exporter_gone.inc();
            }
        }
    }
}

/// A request dropped before its answer (its caller left, its connection
/// failed, or the proxy stopped waiting for it at shutdown) still ends its
/// span: the trace shows the hop and
/// how long it ran, as an error with `error.type` `cancelled`.
impl Drop for Started {
    fn drop(&mut self) {
        self.record(None, None);
    }
}

/// Who the spans come from (OTLP's resource).
#[derive(Clone)]
struct Resource {
    workload: Arc<str>,
    namespace: String,
}

impl Tracer {
    fn start(
        config: TracingConfig,
        workload: &Arc<str>,
        namespace: &str,
        metrics: TraceMetrics,
    ) -> std::io::Result<Self> {
        let (queue, spans) = std::sync::mpsc::sync_channel(QUEUE_SPANS);
        let resource = Resource {
            workload: workload.clone(),
            namespace: namespace.to_owned(),
        };
        let (c, m) = (config.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("weft-trace-export".into())
            .spawn(move || export(spans, &c, &resource, &m))?;
        Ok(Tracer {
            config,
            queue,
            metrics,
        })
    }
}

/// The exporter thread: batches until every sender is gone.
fn export(
    spans: Receiver<Span>,
    config: &TracingConfig,
    resource: &Resource,
    metrics: &TraceMetrics,
) {
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH_SPANS);
    let mut body = Vec::new();
    let mut collector = Resolved::default();
    let mut failing = false;
    let mut since = Instant::now();
    loop {
        let gone = match spans.recv_timeout(EXPORT_EVERY.saturating_sub(since.elapsed())) {
            Ok(span) => {
                batch.push(span);
                while batch.len() < BATCH_SPANS {
                    match spans.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(_) => break,
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if !batch.is_empty()
            && (gone || batch.len() >= BATCH_SPANS || since.elapsed() >= EXPORT_EVERY)
        {
            otlp_json(&batch, resource, &mut body);
            let sent = collector
                .addresses(config)
                .and_then(|addrs| post(config, addrs, &body));
            if !matches!(sent, Ok(200..=299)) {
                // Unreachable, or not taking spans, where it was: look it
                // up again next time (it may have moved).
                collector.forget();
            }
            match sent {
                Ok(status) if (200..300).contains(&status) => {
                    metrics.exported.inc_by(batch.len() as u64);
                    if failing {
                        tracing::info!(collector = %config.collector, "tracing: the collector takes spans again");
                    }
                    failing = false;
                }
                result => {
                    metrics.collector_failed.inc_by(batch.len() as u64);
                    if !failing {
                        let why = match result {
                            Ok(status) => format!("answered {status}"),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(collector = %config.collector, %why, "tracing: spans are dropped and counted until the collector takes them");
                    }
                    failing = true;
                }
            }
            batch.clear();
            // Kept for the next batch, unless one grew it far past a
            // batch's usual size.
            if body.capacity() > 1 << 20 {
                body = Vec::new();
            }
        }
        if batch.is_empty() {
            since = Instant::now();
        }
        if gone {
            return;
        }
    }
}

/// How long the collector's addresses, once resolved, are used before
/// its name is looked up again: the TTL cluster DNS gives Service records
/// (CoreDNS's `kubernetes` plugin, 5 s by default), so a collector whose
/// pods move (a headless Service) is followed as a resolver would.
/// Resolving for every batch would cost the cluster's DNS a few queries
/// per second per proxy (a short name under `ndots:5` tries each search
/// domain first).
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The collector's addresses and when they were resolved. The lookup
/// blocks (the system resolver has no deadline of its own), which holds
/// only this thread: spans queue behind it, and past the queue's bound
/// are dropped and counted, as with a collector that does not answer.
#[derive(Default)]
struct Resolved {
    addrs: Vec<SocketAddr>,
    at: Option<Instant>,
}

impl Resolved {
    fn addresses(&mut self, config: &TracingConfig) -> std::io::Result<&[SocketAddr]> {
        if self.at.is_none_or(|at| at.elapsed() >= RESOLVE_EVERY) {
            self.addrs = config.collector.to_socket_addrs()?.collect();
            self.at = Some(Instant::now());
        }
        Ok(&self.addrs)
    }

    fn forget(&mut self) {
        self.at = None;
    }
}

/// POSTs `body` to the collector at the first of `addrs` that takes a
/// connection; its status code.
fn post(config: &TracingConfig, addrs: &[SocketAddr], body: &[u8]) -> std::io::Result<u16> {
    // One deadline for the whole exchange, so a collector that trickles
    // bytes cannot hold the exporter (and the spans behind it).
    let deadline = Instant::now() + CONNECT_TIMEOUT + ANSWER_TIMEOUT;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the collector took too long")
            })
    };
    let mut last = std::io::Error::other(format!("{} resolves to no address", config.collector));
    for addr in addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT.min(left()?)) {
            Ok(mut s) => {
                s.set_write_timeout(Some(left()?))?;
                write!(
                    s,
                    "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    config.path,
                    config.collector,
                    body.len()
                )?;
                for chunk in body.chunks(16 * 1024) {
                    s.set_write_timeout(Some(left()?))?;
                    s.write_all(chunk)?;
                }
                // The status line is all that is read.
                let mut head = [0u8; 64];
                let mut n = 0;
                while n < 12 {
                    s.set_read_timeout(Some(left()?))?;
                    let got = s.read(&mut head[n..])?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
                let line = std::str::from_utf8(&head[..n]).unwrap_or("");
                return line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The OTLP/HTTP JSON request for `spans`, written into `out` (reused
/// from batch to batch: no tree of values per span)
/// (<https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding>:
/// ids as hex, 64-bit integers as strings, enums as numbers).
fn otlp_json(spans: &[Span], resource: &Resource, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // A JSON string, escaped.
    fn text(out: &mut Vec<u8>, s: &str) {
        let _ = serde_json::to_writer(&mut *out, s);
    }
    fn attr(out: &mut Vec<u8>, first: &mut bool, key: &str, value: &str) {
        if !std::mem::take(first) {
            out.push(b',');
        }
        let _ = write!(out, "{{\"key\":\"{key}\",\"value\":{{\"stringValue\":");
        text(out, value);
        out.extend_from_slice(b"}}");
    }
    out.clear();
    out.extend_from_slice(b"{\"resourceSpans\":[{\"resource\":{\"attributes\":[");
    let mut first = true;
    attr(out, &mut first, "service.name", &resource.workload);
    attr(out, &mut first, "k8s.namespace.name", &resource.namespace);
    let _ = write!(
        out,
        "]}},\"scopeSpans\":[{{\"scope\":{{\"name\":\"weft-proxy\",\"version\":\"{}\"}},\"spans\":[",
        env!("CARGO_PKG_VERSION")
    );
    for (i, sp) in spans.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let start = nanos(sp.start);
        let _ = write!(
            out,
            "{{\"traceId\":\"{:032x}\",\"spanId\":\"{:016x}\",",
            sp.trace, sp.id
        );
        if let Some(p) = sp.parent {
            let _ = write!(out, "\"parentSpanId\":\"{p:016x}\",");
        }
        out.extend_from_slice(b"\"name\":");
        text(out, sp.method);
        // OpenTelemetry's HTTP conventions: a 5xx (or no answer) is an
        // error on either side; a 4xx is the client's error, so it marks
        // the client span and leaves the server's unset.
        let failed = sp
            .status
            .is_none_or(|c| c >= 500 || (c >= 400 && sp.kind == Kind::Client));
        let _ = write!(
            out,
            ",\"kind\":{},\"startTimeUnixNano\":\"{start}\",\"endTimeUnixNano\":\"{}\",\"status\":{{\"code\":{}}},\"attributes\":[",
            sp.kind as u8,
            start + sp.duration.as_nanos(),
            if failed { 2 } else { 0 }
        );
        let mut first = true;
        attr(out, &mut first, "http.request.method", sp.method);
        attr(out, &mut first, "url.path", &sp.path);
        if sp.status.is_none() {
            attr(out, &mut first, "error.type", "cancelled");
        }
        if let Some(status) = sp.status {
            let _ = write!(
                out,
                ",{{\"key\":\"http.response.status_code\",\"value\":{{\"intValue\":\"{status}\"}}}}"
            );
        }
        if let Some(server) = &sp.server {
            // `server.address` is the name or address alone (an IPv6 one
            // without brackets), its port in `server.port`.
            let (address, port) = match server.rsplit_once(':') {
                Some((host, port))
                    if !host.contains(':') || (host.starts_with('[') && host.ends_with(']')) =>
                {
                    (
                        host.trim_start_matches('[').trim_end_matches(']'),
                        port.parse::<u16>().ok(),
                    )
                }
                _ => (server.as_str(), None),
            };
            attr(out, &mut first, "server.address", address);
            if let Some(port) = port {
                let _ = write!(
                    out,
                    ",{{\"key\":\"server.port\",\"value\":{{\"intValue\":\"{port}\"}}}}"
                );
            }
        }
        if let Some(e) = sp.proxy_error {
            attr(out, &mut first, "weft.proxy_error", e);
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}]}]}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(v: &str) -> Option<Parent> {
        Parent::parse(&HeaderValue::from_str(v).unwrap())
    }

    /// The W3C rules: lowercase hex of the right lengths, no all-zero ids,
    /// version ff refused, a higher version's extra fields allowed.
    #[test]
    fn traceparent_is_read_as_the_w3c_spec_says() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = tp(ok).expect("valid");
        assert_eq!(p.trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert!(p.sampled());
        assert_eq!(p.header().to_str().unwrap(), ok);
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(tp(bad), None, "{bad}");
        }
        assert!(tp("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later").is_some());
        // Flags this proxy does not know are zeroed; sampled and
        // random-trace-id go on.
        let p = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff").unwrap();
        assert_eq!(p.flags, 0b11);
        assert!(p.header().to_str().unwrap().ends_with("-03"));
    }

    /// A request with a trace keeps it and its decision; the header sent
    /// on names the new span as parent. One without starts a trace.
    #[test]
    fn a_span_continues_the_trace_and_becomes_the_next_parent() {
        let tracing = Tracing::new("checkout", TraceMetrics::default());
        let config = TracingConfig {
            collector: "127.0.0.1:9".into(),
            path: "/v1/traces".into(),
            sampling: 0.0,
        };
        let get = |traceparent: Option<&str>| {
            let mut req = http::Request::get("/orders");
            if let Some(tp) = traceparent {
                req = req.header("traceparent", tp);
            }
            // Every request here carries some vendor's state too.
            req.header("tracestate", "shop=1")
                .body(super::super::http::body::empty())
                .unwrap()
        };
        let mut req = get(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let started = tracing
            .begin(Some(&config), "shop", Kind::Client, || None, &mut req)
            .expect("on");
        let sent = Parent::parse(&req.headers()["traceparent"]).unwrap();
        assert_eq!(sent.trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(started.parent, Some(0x00f067aa0ba902b7));
        assert_eq!(sent.span, started.ctx.span);
        assert!(
            sent.sampled(),
            "the caller's decision is kept, whatever the rate"
        );
        assert_eq!(req.headers()["tracestate"], "shop=1", "its state goes on");
        // No traceparent, a rate of 0: a new trace, not sampled, and said
        // so; a tracestate without a valid traceparent is dropped with it.
        for traceparent in [
            None,
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        ] {
            let mut req = get(traceparent);
            let started = tracing
                .begin(Some(&config), "shop", Kind::Client, || None, &mut req)
                .expect("on");
            let sent = Parent::parse(&req.headers()["traceparent"]).unwrap();
            assert!(!sent.sampled());
            assert_ne!(sent.trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
            assert_eq!(started.parent, None);
            assert!(req.headers().get("tracestate").is_none(), "{traceparent:?}");
        }
        // Off: the request is left as it came.
        let mut req = get(None);
        assert!(
            tracing
                .begin(None, "shop", Kind::Client, || None, &mut req)
                .is_none()
        );
        assert!(req.headers().get("traceparent").is_none());
    }

    /// The collector's addresses are kept for [`RESOLVE_EVERY`], then
    /// looked up again, and at once after `forget`.
    #[test]
    fn the_collector_is_looked_up_again_when_stale_or_forgotten() {
        let config = TracingConfig {
            collector: "127.0.0.1:4318".into(),
            path: "/v1/traces".into(),
            sampling: 1.0,
        };
        let looked_up: SocketAddr = "127.0.0.1:4318".parse().unwrap();
        let earlier: SocketAddr = "127.0.0.2:4318".parse().unwrap();
        let mut r = Resolved::default();
        assert_eq!(r.addresses(&config).unwrap(), [looked_up]);
        // What an earlier lookup gave is used while fresh...
        r.addrs = vec![earlier];
        assert_eq!(r.addresses(&config).unwrap(), [earlier]);
        // ...not once stale...
        r.at = Instant::now().checked_sub(RESOLVE_EVERY);
        assert_eq!(r.addresses(&config).unwrap(), [looked_up]);
        // ...nor after the collector could not be reached there.
        r.addrs = vec![earlier];
        r.forget();
        assert_eq!(r.addresses(&config).unwrap(), [looked_up]);
    }

    /// OpenTelemetry's HTTP conventions as the exporter writes them: a 4xx
    /// is an error on the client span only, a 5xx or no answer on both;
    /// `server.address` is the host alone (an IPv6 address unbracketed)
    /// and `server.port` its port.
    #[test]
    fn spans_follow_the_http_conventions_for_status_and_server() {
        let span = |kind, status, server: &str| Span {
            trace: 1,
            id: 2,
            parent: None,
            kind,
            method: "GET",
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(1),
            status,
            path: "/".into(),
            server: Some(server.into()),
            proxy_error: None,
        };
        let spans = [
            span(Kind::Client, Some(404), "inventory.shop:80"),
            span(Kind::Server, Some(404), "inventory.shop:80"),
            span(Kind::Server, Some(503), "[fd00::7]:8080"),
            span(Kind::Client, None, "10.0.0.7:80"),
            span(Kind::Client, Some(200), "no-port"),
        ];
        let resource = Resource {
            workload: "cart".into(),
            namespace: "shop".into(),
        };
        let mut out = Vec::new();
        otlp_json(&spans, &resource, &mut out);
        let doc: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        let written = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .expect("spans")
            .clone();
        let attr = |sp: &serde_json::Value, key: &str| {
            sp["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == key)
                .map(|a| a["value"].clone())
        };
        let codes: Vec<_> = written
            .iter()
            .map(|sp| sp["status"]["code"].clone())
            .collect();
        assert_eq!(codes, [2, 0, 2, 2, 0]);
        let servers: Vec<_> = written
            .iter()
            .map(|sp| {
                (
                    attr(sp, "server.address").map(|v| v["stringValue"].clone()),
                    attr(sp, "server.port").map(|v| v["intValue"].clone()),
                )
            })
            .collect();
        let s = |v: &str| Some(serde_json::Value::from(v));
        assert_eq!(
            servers,
            [
                (s("inventory.shop"), s("80")),
                (s("inventory.shop"), s("80")),
                (s("fd00::7"), s("8080")),
                (s("10.0.0.7"), s("80")),
                (s("no-port"), None),
            ]
        );
    }
}
