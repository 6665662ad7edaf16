//! The admin server (`/live`, `/ready`, `/metrics`, and `/config` and
//! `POST /shutdown` from localhost) and the probe server, which forwards
//! kubelet probes rewritten to `/probe/<port>/<path>` to the application —
//! plaintext, so probes keep working when the namespace is STRICT, and
//! answers TCP probes rewritten to `/probe-tcp/<port>` by connecting to the
//! application's port. It serves only GET and HEAD for the probes the
//! injector rewrote (`--probe-target`), never for the proxy's own ports: it
//! answers anyone who can reach the pod, past STRICT mode and AccessPolicy.
//! Probe paths are compared, and forwarded, in one canonical form
//! ([`canonical_probe_path`]) that the injector also registers and writes
//! into the rewritten probe, so the kubelet sends exactly that form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request as AxumRequest, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::{TcpListener, TcpStream};

use super::Proxy;
use super::http::body;
use super::http::errors::{self, ProxyError};

pub fn admin_router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .route("/shutdown", post(shutdown))
        .with_state(proxy)
}

async fn ready(State(p): State<Arc<Proxy>>) -> impl IntoResponse {
    if p.drain.started() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned());
    }
    if p.store.load().is_some() && p.store.ready() && !p.ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no identity loaded yet\n".to_owned(),
        );
    }
    match p.store.load() {
        Some(s) if p.store.ready() => (
            StatusCode::OK,
            format!("ready, config generation {}\n", s.generation()),
        ),
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "listeners not bound yet\n".to_owned(),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no config loaded yet\n".to_owned(),
        ),
    }
}

async fn metrics(State(p): State<Arc<Proxy>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics.encode(),
    )
}

/// Whether `peer` is the pod's own localhost: 127.0.0.1 or ::1 (or the
/// former mapped into IPv6), the addresses the pod's processes dial the
/// admin port at. Not the rest of 127/8, and never the pod's own address,
/// which other pods reach too.
fn from_pod_localhost(peer: SocketAddr) -> bool {
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => ip == Ipv4Addr::LOCALHOST,
        IpAddr::V6(ip) => ip == Ipv6Addr::LOCALHOST,
    }
}

/// The config in use, to the pod's own processes only: it lays out every
/// Service the namespace may call and the access rules, which another pod
/// has no business reading.
async fn config(
    State(p): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> axum::response::Response {
    if !from_pod_localhost(peer) {
        tracing::debug!(%peer, "admin /config refused: not from localhost");
        return refused(
            StatusCode::FORBIDDEN,
            "forbidden",
            "/config is served to localhost only\n".to_owned(),
        );
    }
    match p.store.load() {
        Some(s) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            serde_json::to_string_pretty(&s.config).unwrap_or_default(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/plain")],
            "no config loaded yet\n".to_owned(),
        )
            .into_response(),
    }
}

async fn shutdown(
    State(p): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> impl IntoResponse {
    if !from_pod_localhost(peer) {
        return (
            StatusCode::FORBIDDEN,
            "shutdown is accepted from localhost only\n",
        );
    }
    tracing::info!("shutdown requested on the admin port");
    p.drain.start();
    (StatusCode::ACCEPTED, "draining\n")
}

/// The flag (and env var) naming the probes the probe server forwards.
pub const PROBE_TARGET_FLAG: &str = "--probe-target";
pub const PROBE_TARGET_ENV: &str = "WEFT_PROBE_TARGETS";

/// A probe the injector rewrote: the app port and what is checked there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    pub port: u16,
    pub check: ProbeCheck,
}

/// What a probe target checks on its port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeCheck {
    /// An HTTP probe rewritten to `/probe/<port>/<path>`: the path, in its
    /// canonical form ([`canonical_probe_path`]; starts with `/`; without
    /// the query, which passes through), forwarded to the app.
    Http { path: String },
    /// A TCP probe rewritten to `/probe-tcp/<port>`: the probe server
    /// answers by connecting to the app's port.
    Tcp,
}

impl ProbeTarget {
    /// An HTTP probe of `path` (no query) on `port`, the path made
    /// canonical: targets built from the pod spec, from the flag and from a
    /// request are equal exactly when they are the same probe.
    pub fn http(port: u16, path: &str) -> Self {
        Self {
            port,
            check: ProbeCheck::Http {
                path: canonical_probe_path(path),
            },
        }
    }

    pub fn tcp(port: u16) -> Self {
        Self {
            port,
            check: ProbeCheck::Tcp,
        }
    }

    /// The path the kubelet requests on the probe port for this target
    /// (before any query): what the injector writes into the rewritten
    /// probe, and what the probe server reads back as this same target.
    pub fn request_path(&self) -> String {
        match &self.check {
            ProbeCheck::Http { path } => format!("/probe/{}{path}", self.port),
            ProbeCheck::Tcp => format!("/probe-tcp/{}", self.port),
        }
    }
}

/// A probe path (no query) in the one form the injector registers and
/// writes into the rewritten probe, and the probe server compares and
/// forwards: a `%XX` escape of an unreserved character (RFC 3986: letters,
/// digits, `-._~`) decoded, every other escape kept with upper-case hex,
/// and every byte that may not stand as it is in a URI path escaped (a
/// space, a non-ASCII or control byte, one of `"<>[\]^{|}`, a backtick, a
/// `%` that starts no escape). So `/health check` and `/health%20check`
/// are one path, as are `/santé` and `/sant%c3%a9`; but `%2F` is never `/`,
/// nor `%3B` `;`, which an app may route apart. Go's net/url, which builds
/// the kubelet's request, sends a path of this form byte for byte (each of
/// its bytes is one it leaves as it is), while a path as written in a pod
/// spec it may re-escape (`/a(b) c` goes out as `/a%28b%29%20c`): hence the
/// injector rewrites probes to this form rather than predicting Go's.
pub fn canonical_probe_path(path: &str) -> String {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    // Unreserved, sub-delims, `:`, `@` and the segment separator.
    let as_is = |b: u8| unreserved(b) || b"!$&'()*+,;=:@/".contains(&b);
    let hex = |b: Option<&u8>| {
        char::from(*b?)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escape = match (b, hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => Some((high << 4) | low),
            _ => None,
        };
        let (b, keep) = match escape {
            Some(e) => {
                i += 3;
                (e, unreserved(e))
            }
            None => {
                i += 1;
                (b, as_is(b))
            }
        };
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// As parsed: `8080/healthz`, `tcp:5432`.
impl std::fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.check {
            ProbeCheck::Http { path } => write!(f, "{}{path}", self.port),
            ProbeCheck::Tcp => write!(f, "tcp:{}", self.port),
        }
    }
}

/// One `--probe-target` value: `<port>/<path>` such as `8080/healthz`
/// (`8080/` for the root) for an HTTP probe, the path made canonical and a
/// query dropped as matching ignores it; `tcp:<port>` such as `tcp:5432`
/// for a TCP probe.
pub fn parse_probe_target(s: &str) -> Result<ProbeTarget, String> {
    let bad = |why: &str| {
        format!(
            "{PROBE_TARGET_FLAG} ({PROBE_TARGET_ENV}) entry {s:?}: {why}; expected <port>/<path>, such as 8080/healthz, or tcp:<port>, such as tcp:5432"
        )
    };
    let port_number = |port: &str, what: &str| -> Result<u16, String> {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("{what} is not a port number")));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad("the port is not in 1-65535")),
        }
    };
    let entry = s.trim();
    if let Some(port) = entry.strip_prefix("tcp:") {
        return Ok(ProbeTarget::tcp(port_number(port, "the part after tcp:")?));
    }
    let (port, path) = entry
        .split_once('/')
        .ok_or_else(|| bad("no / between the port and the path"))?;
    let port = port_number(port, "the part before the first /")?;
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad("the path holds whitespace or control characters"));
    }
    Ok(ProbeTarget::http(port, &format!("/{path}")))
}

/// How long the probe server waits for the app to accept a TCP probe's
/// connection. The kubelet enforces the probe's own `timeoutSeconds`; a
/// port that takes longer than this to accept counts as down.
pub const TCP_PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the probe server needs: the proxy, and the ports of its own
/// listeners, which it never forwards to even when configured.
struct ProbeServer {
    proxy: Arc<Proxy>,
    own_ports: Vec<u16>,
}

/// The probe server. It serves only GET and HEAD requests for the probes
/// the injector rewrote (`Proxy::probe_targets`) and never for a port of
/// the proxy itself: it listens on every address, outside the iptables
/// redirect, STRICT mode and AccessPolicy, so anything more would let any
/// pod reach any port of the app (and the admin server from loopback).
/// HTTP probes (`/probe/<port>/<path>`) are forwarded to the app; TCP
/// probes (`/probe-tcp/<port>`) get 200 when the app's port accepts a
/// connection, else 503.
pub fn probe_router(proxy: Arc<Proxy>, own_ports: Vec<u16>) -> Router {
    Router::new()
        .fallback(probe)
        .with_state(Arc::new(ProbeServer { proxy, own_ports }))
}

/// `/probe/<port>` and `/probe/<port>/<path>`: the port and the path to
/// forward, made canonical (still percent-encoded: `%2F` stays `%2F`);
/// `/probe-tcp/<port>`: the port to connect to; `None` for anything else.
fn probe_path(path: &str) -> Option<Result<ProbeTarget, String>> {
    let port_number = |port: &str, form: &str| {
        port.parse::<u16>()
            .ok()
            .filter(|_| port.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| format!("{port:?} is not a port number; the probe port serves {form}"))
    };
    if let Some(port) = path.strip_prefix("/probe-tcp/") {
        return Some(port_number(port, "/probe-tcp/<port>").map(ProbeTarget::tcp));
    }
    let rest = path.strip_prefix("/probe/")?;
    let (port, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some(
        port_number(port, "/probe/<port>/<path>")
            .map(|p| ProbeTarget::http(p, &format!("/{path}"))),
    )
}

async fn probe(State(s): State<Arc<ProbeServer>>, req: AxumRequest) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let target = match probe_path(req.uri().path()) {
        Some(Ok(target)) => target,
        Some(Err(why)) => {
            tracing::debug!(%peer, uri = %req.uri(), "probe refused: {why}");
            return proxy_error(&ProxyError::BadRequest(why));
        }
        None => {
            tracing::debug!(%peer, uri = %req.uri(), "probe refused: not a /probe/ path");
            return refused(
                StatusCode::NOT_FOUND,
                "not-found",
                "the probe port serves /probe/<port>/<path> and /probe-tcp/<port> only\n"
                    .to_owned(),
            );
        }
    };
    let port = target.port;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let method = req.method().clone();
        tracing::debug!(%peer, %method, probe = %target, "probe refused: method not allowed");
        let mut rsp = refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!(
                "method {method} is not allowed on the probe port: it forwards only GET and HEAD, as the kubelet's HTTP probes send\n"
            ),
        );
        rsp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return rsp;
    }
    if s.own_ports.contains(&port) {
        tracing::debug!(%peer, probe = %target, "probe refused: a port of the proxy itself");
        return proxy_error(&ProxyError::Forbidden(format!(
            "port {port} is a port of the weft proxy itself; the probe port serves only the pod's own probes of the application"
        )));
    }
    let p = &s.proxy;
    if !p.probe_targets.contains(&target) {
        tracing::debug!(%peer, probe = %target, "probe refused: not a probe the injector rewrote");
        let none = if p.probe_targets.is_empty() {
            format!(" (none are configured: {PROBE_TARGET_FLAG} / {PROBE_TARGET_ENV})")
        } else {
            String::new()
        };
        let what = match &target.check {
            ProbeCheck::Http { path } => format!("port {port} path {path}"),
            ProbeCheck::Tcp => format!("TCP port {port}"),
        };
        return proxy_error(&ProxyError::Forbidden(format!(
            "{what} is not a probe the injector rewrote; the probe port serves only the pod's own probes{none}"
        )));
    }
    match target.check {
        ProbeCheck::Http { path } => forward_probe(p, port, path, req).await,
        ProbeCheck::Tcp => tcp_probe(p, port).await,
    }
}

/// A TCP probe: 200 when the app's port accepts a connection (closed at
/// once, as the kubelet's own TCP probe does), else 503.
async fn tcp_probe(p: &Proxy, port: u16) -> axum::response::Response {
    let app = SocketAddr::from((p.app_ip, port));
    let why = match tokio::time::timeout(TCP_PROBE_CONNECT_TIMEOUT, TcpStream::connect(app)).await {
        Ok(Ok(conn)) => {
            drop(conn);
            let mut rsp = axum::response::Response::new(axum::body::Body::from(format!(
                "port {port} accepts connections\n"
            )));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return rsp;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "no answer within {}ms",
            TCP_PROBE_CONNECT_TIMEOUT.as_millis()
        ),
    };
    tracing::debug!(%app, "TCP probe failed: {why}");
    refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "connect-error",
        format!("connecting to {app} failed: {why}\n"),
    )
}

/// Forwards a registered HTTP probe with `path` in its canonical form, so
/// the app only ever sees the registered paths however a request spelled
/// them; the query as received.
async fn forward_probe(
    p: &Proxy,
    port: u16,
    path: String,
    req: AxumRequest,
) -> axum::response::Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let (mut parts, body_in) = req.into_parts();
    parts.uri = match format!("{path}{query}").parse() {
        Ok(uri) => uri,
        Err(_) => return proxy_error(&ProxyError::BadRequest("bad probe path".to_owned())),
    };
    parts.headers.remove(&super::inbound::CLIENT_ID_HEADER);
    // Only a proxy's word reaches the app under these names.
    super::http::deadline::strip(&mut parts.headers);
    let req = http::Request::from_parts(parts, body::boxed(body_in));
    let app = p
        .shared
        .pool
        .app_endpoint(SocketAddr::from((p.app_ip, port)));
    super::inbound::send_to_app(p, app, req)
        .await
        .map(axum::body::Body::new)
}

fn proxy_error(err: &ProxyError) -> axum::response::Response {
    errors::response(err).map(axum::body::Body::new)
}

/// A refusal without a [`ProxyError`] of its own, marked the same way.
fn refused(status: StatusCode, reason: &'static str, body: String) -> axum::response::Response {
    let mut rsp = axum::response::Response::new(axum::body::Body::from(body));
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(errors::ERROR_HEADER, HeaderValue::from_static(reason));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Serves a router for the life of the process: metrics and readiness stay
/// visible while the proxy drains. Held to the proxy's HTTP limits and
/// connection cap ([`super::server::serve_router`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: super::server::HttpLimits,
    limit: Arc<super::server::ConnLimit>,
) {
    super::server::serve_router(listener, "admin", router, limits, limit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16, path: &str) -> ProbeTarget {
        ProbeTarget::http(port, path)
    }

    #[test]
    fn probe_targets_parse_as_port_and_path() {
        assert_eq!(
            parse_probe_target("8080/healthz"),
            Ok(target(8080, "/healthz"))
        );
        assert_eq!(parse_probe_target(" 8080/a/b "), Ok(target(8080, "/a/b")));
        assert_eq!(parse_probe_target("8080/"), Ok(target(8080, "/")));
        assert_eq!(
            parse_probe_target("8080/ready?full=1"),
            Ok(target(8080, "/ready")),
            "the query is not part of the match"
        );
        assert_eq!(target(9090, "/live").to_string(), "9090/live");
        assert_eq!(parse_probe_target("tcp:5432"), Ok(ProbeTarget::tcp(5432)));
        assert_eq!(parse_probe_target(" tcp:6379 "), Ok(ProbeTarget::tcp(6379)));
        assert_eq!(ProbeTarget::tcp(5432).to_string(), "tcp:5432");
        assert_ne!(
            parse_probe_target("5432/"),
            parse_probe_target("tcp:5432"),
            "an HTTP probe of the root is not a TCP probe"
        );
        for bad in [
            "",
            "8080",
            "/healthz",
            "http/healthz",
            "0/healthz",
            "70000/x",
            "-1/x",
            "8080/a b",
            "tcp:",
            "tcp:0",
            "tcp:70000",
            "tcp:5432/x",
            "tcp:db",
            "TCP:5432",
            "udp:53",
        ] {
            let err = parse_probe_target(bad).expect_err(bad);
            assert!(
                err.contains("--probe-target")
                    && err.contains("WEFT_PROBE_TARGETS")
                    && err.contains("<port>/<path>")
                    && err.contains("tcp:<port>")
                    && err.contains(&format!("{bad:?}")),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn the_flag_takes_comma_delimited_targets_and_names_itself_when_malformed() {
        use clap::{Args, FromArgMatches};
        let parse = |argv: &[&str]| {
            let cmd = super::super::ProxyArgs::augment_args(clap::Command::new("proxy"));
            cmd.try_get_matches_from(argv)
                .map(|m| super::super::ProxyArgs::from_arg_matches(&m).expect("args"))
        };
        let args = parse(&[
            "proxy",
            "--probe-target",
            "8080/healthz,8080/ready",
            "--probe-target",
            "9090/,tcp:5432",
        ])
        .expect("valid targets");
        assert_eq!(
            args.probe_targets,
            vec![
                target(8080, "/healthz"),
                target(8080, "/ready"),
                target(9090, "/"),
                ProbeTarget::tcp(5432),
            ]
        );
        assert!(parse(&["proxy"]).expect("no flag").probe_targets.is_empty());
        let err = parse(&["proxy", "--probe-target", "8080/healthz,healthz"])
            .expect_err("malformed")
            .to_string();
        assert!(
            err.contains("--probe-target") && err.contains("expected <port>/<path>"),
            "{err}"
        );
    }

    #[test]
    fn canonical_probe_paths_decode_only_unreserved_escapes_and_escape_what_cannot_stand() {
        for (path, canonical) in [
            ("/healthz", "/healthz"),
            ("/health check", "/health%20check"),
            ("/health%20check", "/health%20check"),
            ("/sant\u{e9}", "/sant%C3%A9"),
            ("/sant%c3%a9", "/sant%C3%A9"),
            ("/%68ealth%7Ez", "/health~z"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%3Bb", "/a%3Bb"),
            ("/a;b=c,d(e)!*'+$&:@", "/a;b=c,d(e)!*'+$&:@"),
            ("/a[b]{c}|\"<>^`\\", "/a%5Bb%5D%7Bc%7D%7C%22%3C%3E%5E%60%5C"),
            ("/a\tb", "/a%09b"),
            ("/50%", "/50%25"),
            ("/a%zz", "/a%25zz"),
            ("/a%2", "/a%252"),
            ("/a%25", "/a%25"),
            ("/a%252F", "/a%252F"),
            ("/a?b#c", "/a%3Fb%23c"),
        ] {
            assert_eq!(canonical_probe_path(path), canonical, "{path:?}");
            assert_eq!(
                canonical_probe_path(canonical),
                canonical,
                "{path:?}: stable"
            );
        }
        // Every escape: decoded when it names an unreserved character, else
        // kept, upper-case; every ASCII character: kept when it may stand
        // in a path, else escaped. Either way the result is stable.
        for b in 0..=u8::MAX {
            let escaped = canonical_probe_path(&format!("%{b:02x}"));
            let c = char::from(b);
            if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                assert_eq!(escaped, c.to_string());
            } else {
                assert_eq!(escaped, format!("%{b:02X}"));
            }
            assert_eq!(canonical_probe_path(&escaped), escaped);
            if b.is_ascii() {
                let got = canonical_probe_path(&c.to_string());
                let stands = c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/".contains(c);
                assert_eq!(
                    got,
                    if stands {
                        c.to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                );
            }
        }
    }

    #[test]
    fn targets_are_canonical_whichever_way_they_are_spelt_and_near_misses_differ() {
        let sante = target(8080, "/sant\u{e9}");
        assert_eq!(sante.to_string(), "8080/sant%C3%A9");
        for spelt in ["8080/sant%C3%A9", "8080/sant%c3%a9", "8080/s%61nt\u{e9}"] {
            assert_eq!(parse_probe_target(spelt), Ok(sante.clone()), "{spelt}");
        }
        for request in ["/probe/8080/sant%C3%A9", "/probe/8080/sant%c3%a9"] {
            assert_eq!(probe_path(request), Some(Ok(sante.clone())), "{request}");
        }
        assert_eq!(
            probe_path("/probe/8080/health%20check"),
            Some(Ok(target(8080, "/health check")))
        );
        for near in [
            "/probe/8080/sant%C3%A9/",
            "/probe/8080/sant%C3",
            "/probe/8080/sante",
            "/probe/8080/sant%C3%A9%2F..%2Fcharges",
            "/probe/8080/sant%25C3%25A9",
            "/probe/8081/sant%C3%A9",
        ] {
            assert_ne!(probe_path(near), Some(Ok(sante.clone())), "{near}");
        }
        let check = target(8080, "/health check");
        for near in [
            "/probe/8080/health+check",
            "/probe/8080/health%2520check",
            "/probe/8080/healthcheck",
            "/probe/8080/health%20checks",
            "/probe/8080/health%3Fcheck",
        ] {
            assert_ne!(probe_path(near), Some(Ok(check.clone())), "{near}");
        }
        // What the injector writes into the probe reads back as its target.
        for t in [
            sante,
            check,
            target(8080, "/"),
            target(8080, "/a%2Fb;c"),
            ProbeTarget::tcp(5432),
        ] {
            assert_eq!(probe_path(&t.request_path()), Some(Ok(t.clone())), "{t}");
            assert_eq!(parse_probe_target(&t.to_string()), Ok(t.clone()), "{t}");
        }
    }

    #[test]
    fn probe_paths_keep_the_path_escaped() {
        assert_eq!(
            probe_path("/probe/8080/healthz"),
            Some(Ok(target(8080, "/healthz")))
        );
        assert_eq!(probe_path("/probe/8080/"), Some(Ok(target(8080, "/"))));
        assert_eq!(probe_path("/probe/8080"), Some(Ok(target(8080, "/"))));
        assert_eq!(
            probe_path("/probe/8080/a%2Fb"),
            Some(Ok(target(8080, "/a%2Fb")))
        );
        assert!(matches!(probe_path("/probe/+80/x"), Some(Err(_))));
        assert!(matches!(probe_path("/probe/x/y"), Some(Err(_))));
        assert_eq!(probe_path("/ready"), None);
        assert_eq!(probe_path("/probe"), None);
        assert_eq!(
            probe_path("/probe-tcp/5432"),
            Some(Ok(ProbeTarget::tcp(5432)))
        );
        for bad in [
            "/probe-tcp/",
            "/probe-tcp/5432/",
            "/probe-tcp/5432/x",
            "/probe-tcp/+80",
        ] {
            let err = probe_path(bad).expect("a probe path").expect_err(bad);
            assert!(err.contains("/probe-tcp/<port>"), "{bad}: {err}");
        }
        assert_eq!(probe_path("/probe-tcp"), None);
    }
}
