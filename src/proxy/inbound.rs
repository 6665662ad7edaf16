//! Inbound: connections from other pods to this pod's application,
//! redirected to the proxy. In order:
//!
//! 1. **Detect** what the client speaks. A TLS ClientHello is read whole:
//!    ALPN `weft/...` is mesh TLS, which this proxy terminates (checking the
//!    client's certificate); any other TLS is the application's own and
//!    passes through untouched.
//! 2. **Admit** by mode: PERMISSIVE takes mesh TLS and plaintext, STRICT
//!    only mesh TLS except on the config's plaintext ports. (The probe port
//!    is a listener of its own and always plaintext.) Every plaintext
//!    connection is counted by port and source address: the evidence the
//!    STRICT rollout waits for.
//! 3. **Authorize** by AccessPolicy: per request for HTTP (403 with
//!    `weft-proxy-error: forbidden`), once per connection for TCP (closed).
//! 4. **Forward** to the application at the pod's own address and the port the client
//!    called, HTTP-aware (counted per request, the caller's SPIFFE id in
//!    [`CLIENT_ID_HEADER`], its deadline in `weft-deadline` and cut off
//!    there, one already past answered 504 at once: see
//!    [`super::http::deadline`]) or opaque.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Proxy;
use super::authz::{self, Access, HttpRequest};
use super::detect::{self, Protocol};
use super::hello::Hello;
use super::http::deadline;
use super::http::errors::{self, ProxyError};
use super::http::pool::{Endpoint, ORIG_PROTO_HEADER, ORIG_PROTO_HTTP1};
use super::http::route::{ambiguous_path, normalize_path};
use super::http::{Request, Response};
use super::inbound_limit;
use super::metrics::{
    ConnLabels, DenialLabels, Direction, EdgeLabels, EdgeSeries, HandshakeLabels,
    InboundLimitLabels, PlaintextLabels, ProxyErrorLabels,
};
use super::tls::{ALPN_H2, ALPN_TCP, peer_identity};
use crate::config::InboundMode;
use crate::identity::SpiffeId;

/// The header that tells the application who called: the caller's verified
/// SPIFFE id. Whatever a client sends under this name is removed first, so
/// the application can trust it.
pub static CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("weft-client-id");

/// On a server-speaks-first (or declared opaque) port the client may say nothing; a meshed
/// client opens with its ClientHello at once, so this short wait is enough
/// to tell the two apart without stalling a plaintext client for long.
const SERVER_FIRST_TLS_WAIT: Duration = Duration::from_millis(100);
/// How long a mesh TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One admitted inbound connection.
struct Conn {
    app: Endpoint,
    /// The connection's peer address.
    peer: SocketAddr,
    port: u16,
    /// The caller's verified mesh identity (mesh TLS only).
    peer_id: Option<Arc<SpiffeId>>,
    /// The `src` of request metrics: the SPIFFE id over mesh TLS; in
    /// plaintext the workload a published pod address belongs to
    /// (`ns/<ns>/sa/<sa>`, unverified: see [`crate::proxy::state::Snapshot::pod_source`]),
    /// else "unknown".
    source: Arc<str>,
    /// The SPIFFE id as the [`CLIENT_ID_HEADER`] value, made once per
    /// connection rather than per request.
    peer_id_header: Option<HeaderValue>,
}

/// Handles one inbound connection meant for the application at `app`.
pub async fn serve(proxy: Arc<Proxy>, conn: TcpStream, peer: SocketAddr, app: SocketAddr) {
    let app_port = app.port();
    tracing::trace!(%peer, app_port, "inbound connection");
    // Until a config says the mode and the access rules, nothing is known
    // to be allowed: fail closed (the probe port is served apart).
    if proxy.store.load().is_none() {
        proxy.metrics.inbound_refused_no_config.inc();
        return tracing::debug!(%peer, app_port, "inbound connection refused: no config loaded yet");
    }
    let server_first = crate::compile::SERVER_FIRST_PORTS.contains(&app_port)
        || proxy.inbound_opaque_ports.contains(&app_port);
    let wait = if server_first {
        SERVER_FIRST_TLS_WAIT
    } else {
        proxy.detect_timeout
    };
    let detected = match detect::detect(conn, wait).await {
        Ok(d) => d,
        Err(e) => {
            return tracing::debug!(%peer, error = %e, "connection failed before its protocol was known");
        }
    };
    if detected.timed_out && !server_first {
        proxy.metrics.detect_timeouts.inc();
    }
    let (protocol, io) = (detected.protocol, detected.io);
    let mut conn = Conn {
        app: proxy.shared.pool.app_endpoint(app),
        peer,
        port: app_port,
        peer_id: None,
        source: proxy
            .store
            .load()
            .and_then(|s| s.pod_source(peer.ip()))
            .unwrap_or_else(|| proxy.unknown_source.clone()),
        peer_id_header: None,
    };
    if protocol == Protocol::Tls {
        let (hello, io) = match detect::read_client_hello(io, proxy.detect_timeout).await {
            Ok(read) => read,
            Err(e) => return tracing::debug!(%peer, error = %e, "reading the ClientHello failed"),
        };
        if hello.is_mesh()
            && let Some(config) = proxy.mesh_server.clone()
        {
            let accept = tokio_rustls::TlsAcceptor::from(config).accept(io);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    return handshake_failed(&proxy, peer, &e);
                }
                Err(_) => {
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
                    return handshake_failed(&proxy, peer, &e);
                }
            };
            let session = tls.get_ref().1;
            conn.peer_id = peer_identity(session.peer_certificates()).map(Arc::new);
            if let Some(id) = &conn.peer_id {
                let id = id.to_string();
                conn.peer_id_header = HeaderValue::from_str(&id).ok();
                conn.source = Arc::from(id);
            }
            let inner = match session.alpn_protocol() {
                Some(ALPN_TCP) => Protocol::Opaque,
                Some(ALPN_H2) => Protocol::Http2,
                _ => Protocol::Http1,
            };
            // `weft/tcp` is the client proxy's guess (its client was
            // silent), not this port's declaration: see who speaks first.
            let relay = if server_first {
                Relay::Opaque
            } else {
                Relay::SniffFirst
            };
            return handle(&proxy, tls, conn, inner, true, relay).await;
        }
        if let Hello::ClientHello { alpn, .. } = &hello
            && hello.is_mesh()
        {
            tracing::debug!(%peer, ?alpn, "mesh TLS offered but this proxy has no identity configured");
        }
        // The application's own TLS: end to end, opaque to the mesh.
        if !admit_plaintext(&proxy, peer, app_port) {
            return;
        }
        return handle(&proxy, io, conn, Protocol::Opaque, false, Relay::Opaque).await;
    }
    if !admit_plaintext(&proxy, peer, app_port) {
        return;
    }
    // Opaque for want of bytes (the timeout) on a port not declared so:
    // the client may yet speak first, and speak HTTP.
    let relay = if detected.timed_out && !server_first {
        Relay::SniffFirst
    } else {
        Relay::Opaque
    };
    handle(&proxy, io, conn, protocol, false, relay).await;
}

/// How an opaque connection is relayed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// Bytes both ways as they come: the port is declared opaque or
    /// server-first, the first bytes were not HTTP, or the application's
    /// own TLS.
    Opaque,
    /// Opaque only for want of bytes so far (the detection timeout, or a
    /// client proxy's `weft/tcp` guess), on a port not declared opaque. If
    /// the client speaks before the application does and what it says is
    /// HTTP, the connection is served as HTTP after all: otherwise a client
    /// could wait out the timeout, then send requests that skip the
    /// per-request access checks and carry a `weft-client-id` of its own
    /// making. If the application speaks first (a server-first protocol),
    /// it is relayed.
    SniffFirst,
}

fn handshake_failed(proxy: &Proxy, peer: SocketAddr, err: &std::io::Error) {
    // A refused certificate was counted by reason in the verifier.
    if !super::tls::refused_by_verifier(err) {
        proxy
            .metrics
            .tls_handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: Direction::Inbound,
            })
            .inc();
    }
    tracing::debug!(%peer, error = %err, "inbound mesh TLS handshake failed");
}

/// Counts a plaintext connection and decides it by mode.
fn admit_plaintext(proxy: &Proxy, peer: SocketAddr, port: u16) -> bool {
    let labels = PlaintextLabels {
        port: proxy.metrics.bounds.port(port),
        src_addr: proxy.metrics.bounds.source(peer.ip()),
    };
    proxy
        .metrics
        .plaintext_connections
        .get_or_create(&labels)
        .inc();
    let strict = proxy.store.load().is_some_and(|s| {
        let inbound = &s.config.inbound;
        inbound.mode == InboundMode::Strict && !inbound.plaintext_ports.contains(&port)
    });
    if strict {
        proxy
            .metrics
            .plaintext_rejected
            .get_or_create(&labels)
            .inc();
        tracing::debug!(%peer, port, "plaintext refused: the namespace is STRICT");
    }
    !strict
}

/// Serves an admitted connection: HTTP through the per-request path,
/// anything else relayed to the application once authorized.
async fn handle<I>(proxy: &Arc<Proxy>, io: I, conn: Conn, protocol: Protocol, tls: bool, how: Relay)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let labels = ConnLabels {
        direction: Direction::Inbound,
        protocol: protocol.label().to_owned(),
        tls,
        port: proxy.metrics.bounds.port(conn.port),
    };
    proxy.metrics.connections_total.get_or_create(&labels).inc();
    proxy.metrics.connections_open.get_or_create(&labels).inc();
    match protocol {
        Protocol::Http1 | Protocol::Http2 => serve_as_http(proxy, io, conn).await,
        Protocol::Tls | Protocol::Opaque => relay(proxy, io, conn, how).await,
    }
    proxy.metrics.connections_open.get_or_create(&labels).dec();
}

/// HTTP, request by request: each one authorized and counted.
async fn serve_as_http<I>(proxy: &Arc<Proxy>, io: I, conn: Conn)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (p, conn) = (proxy.clone(), Arc::new(conn));
    super::server::serve_http(
        io,
        &proxy.drain,
        &proxy.http_limits,
        &proxy.inbound_in_flight,
        move |req| forward_http(p.clone(), conn.clone(), req),
    )
    .await;
}

async fn relay<I>(proxy: &Arc<Proxy>, io: I, conn: Conn, how: Relay)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Decided opaque: authorized before the app sees a connection. To be
    // sniffed: authorized once it turns out not to be HTTP (HTTP is
    // authorized request by request).
    if how == Relay::Opaque && !tcp_admitted(proxy, &conn) {
        return;
    }
    let app = conn.app.addr;
    let mut upstream = match TcpStream::connect(app).await {
        Ok(upstream) => upstream,
        Err(e) => return tracing::debug!(%app, error = %e, "app refused an opaque connection"),
    };
    let _ = upstream.set_nodelay(true);
    let mut io = match how {
        Relay::Opaque => detect::PrefixedIo::new(bytes::Bytes::new(), io),
        Relay::SniffFirst => match first_speaker(
            io,
            &upstream,
            proxy.detect_timeout,
            proxy.http_limits.idle_timeout,
        )
        .await
        {
            Some(FirstWords::Client(Protocol::Http1 | Protocol::Http2, client)) => {
                drop(upstream);
                tracing::debug!(
                    port = conn.port,
                    "a silent client spoke HTTP first: served as HTTP"
                );
                return serve_as_http(proxy, client, conn).await;
            }
            Some(FirstWords::Client(_, client) | FirstWords::App(client)) => {
                if !tcp_admitted(proxy, &conn) {
                    return;
                }
                client
            }
            None => return,
        },
    };
    let _ =
        super::server::relay_until_idle(&mut io, &mut upstream, super::server::OPAQUE_IDLE_TIMEOUT)
            .await;
}

/// The AccessPolicy check of a whole TCP connection; a denial is counted.
fn tcp_admitted(proxy: &Proxy, conn: &Conn) -> bool {
    match authorize(proxy, conn, None) {
        Access::Allowed => true,
        Access::Denied { policy } => {
            deny(proxy, &policy, "tcp");
            tracing::debug!(port = conn.port, peer = ?conn.peer_id, %policy, "connection refused by AccessPolicy");
            false
        }
    }
}

/// Who spoke first on a connection relayed for want of bytes.
enum FirstWords<S> {
    /// The client, and what its first bytes are (replayed by the stream).
    Client(Protocol, detect::PrefixedIo<S>),
    /// The application (or it closed): relay as it is.
    App(detect::PrefixedIo<S>),
}

/// Waits for the client's first bytes until they are classified, or for
/// the application to become readable, whichever comes first. `None`: the
/// client's side failed.
///
/// Bytes that could still begin a request line (`get`, a token with no
/// space yet) are waited on for `undecided` at most and then served as
/// HTTP: HTTP is the safe reading, since relaying them opaquely would let
/// a client drip a request, a forged `weft-client-id` included, past the
/// access checks; the HTTP server answers 400 if they are not HTTP after
/// all. When neither side says anything for `silent`, the connection is
/// served as HTTP too, whose header-read timeout then closes it: a
/// connection nobody speaks on holds no slot of the connection cap for
/// long (AccessPolicy cannot judge it before its first words).
async fn first_speaker<S>(
    mut client: S,
    app: &TcpStream,
    undecided: Duration,
    silent: Duration,
) -> Option<FirstWords<S>>
where
    S: AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut seen = bytes::BytesMut::new();
    let far = tokio::time::Instant::now() + silent;
    let mut deadline = far;
    loop {
        let mut chunk = [0u8; 64];
        tokio::select! {
            biased;
            read = client.read(&mut chunk) => match read {
                Ok(0) => return Some(FirstWords::App(detect::PrefixedIo::new(seen.freeze(), client))),
                Ok(n) => {
                    seen.extend_from_slice(&chunk[..n]);
                    if let Some(p) = detect::classify(&seen) {
                        return Some(FirstWords::Client(p, detect::PrefixedIo::new(seen.freeze(), client)));
                    }
                    if deadline == far {
                        deadline = tokio::time::Instant::now() + undecided;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading a silent client's first bytes failed");
                    return None;
                }
            },
            ready = app.readable() => {
                if ready.is_err() {
                    return None;
                }
                return Some(FirstWords::App(detect::PrefixedIo::new(seen.freeze(), client)));
            }
            () = tokio::time::sleep_until(deadline) => {
                return Some(FirstWords::Client(
                    Protocol::Http1,
                    detect::PrefixedIo::new(seen.freeze(), client),
                ));
            }
        }
    }
}

fn authorize(proxy: &Proxy, conn: &Conn, request: Option<HttpRequest<'_>>) -> Access {
    match proxy.store.load() {
        Some(s) => authz::check_audited(
            &s.config.inbound,
            &proxy.port_names,
            proxy.pod_labels.load().as_deref(),
            conn.port,
            conn.peer_id.as_deref(),
            request,
            |auth, admitted| audited(proxy, conn, request, auth, admitted),
        ),
        // Connections are refused before a config loads (see `serve`).
        None => Access::Denied {
            policy: "(no config loaded)".to_owned(),
        },
    }
}

/// Counts a request (or connection) an auditing AccessPolicy let
/// through: who, where, and what its rules would have done.
fn audited(
    proxy: &Proxy,
    conn: &Conn,
    request: Option<HttpRequest<'_>>,
    auth: &crate::config::Authorization,
    admitted: bool,
) {
    use super::metrics::{AuditLabels, MAX_AUDIT_SEGMENT};
    let src = conn.peer_id.as_ref().map_or_else(
        || "plaintext".to_owned(),
        |id| format!("{}/{}", id.namespace, id.service_account),
    );
    let (method, path) = match request {
        None => (String::new(), String::new()),
        Some(r) => {
            let method = match crate::api::HttpMethod::from_name(r.method.as_str()) {
                Some(m) => m.as_str().to_owned(),
                None => "*".to_owned(),
            };
            (method, audit_segment(r.path, MAX_AUDIT_SEGMENT))
        }
    };
    let labels = proxy.metrics.bounds.audit(AuditLabels {
        policy: auth.policy.clone(),
        src,
        port: super::metrics::PortLabel(conn.port),
        method,
        path,
        verdict: if admitted { "admitted" } else { "refused" },
        rules: auth.revision.clone(),
    });
    proxy.metrics.access_audit.get_or_create(&labels).inc();
}

/// The first segment of a normalised path as an audit label: `/charges`
/// for `/charges/7`, `/` for `/` itself; `*` (a path no segment names)
/// when longer than `max` bytes, empty (`//x`), or not a path at all
/// (`OPTIONS *`).
fn audit_segment(path: &str, max: usize) -> String {
    if path == "/" {
        return "/".to_owned();
    }
    let Some(rest) = path.strip_prefix('/') else {
        return "*".to_owned();
    };
    let first = rest.split('/').next().unwrap_or_default();
    if first.is_empty() || first.len() > max {
        "*".to_owned()
    } else {
        format!("/{first}")
    }
}

/// What becomes of an HTTP request before the application.
enum Admission {
    Admitted,
    /// Refused by the AccessPolicy `namespace/name`.
    Denied(String),
    /// Refused by an inbound rate limit.
    Limited(inbound_limit::Refusal),
    /// Its caller's deadline had passed.
    Expired,
}

/// The inbound rate limits guarding the request's port (after
/// AccessPolicy admitted it: a caller refused there spends no token).
fn limit(proxy: &Proxy, conn: &Conn, req: &Request) -> Admission {
    let Some(snapshot) = proxy.store.load() else {
        return Admission::Admitted;
    };
    if snapshot.inbound_limits.is_empty() || inbound_limit::is_grpc_health_check(req) {
        return Admission::Admitted;
    }
    let request = HttpRequest {
        method: req.method(),
        path: req.uri().path(),
    };
    let caller = inbound_limit::Caller {
        id: conn.peer_id.as_deref(),
        key: conn.peer_id.as_ref().map(|_| &conn.source),
    };
    match inbound_limit::admit(
        &snapshot.inbound_limits,
        &proxy.port_names,
        proxy.pod_labels.load().as_deref(),
        conn.port,
        caller,
        request,
    ) {
        Ok(()) => Admission::Admitted,
        Err(refused) => Admission::Limited(refused),
    }
}

fn deny(proxy: &Proxy, policy: &str, protocol: &str) {
    proxy
        .metrics
        .access_denied
        .get_or_create(&DenialLabels {
            policy: policy.to_owned(),
            protocol: protocol.to_owned(),
        })
        .inc();
}

/// Replaces the request's path with its normal form (see
/// [`normalize_path`]); the query is kept as it came.
fn normalize_uri(req: &mut Request) -> Result<(), ProxyError> {
    let normal = normalize_path(req.uri().path());
    if let Some(why) = ambiguous_path(&normal) {
        return Err(ProxyError::BadRequest(format!(
            "path {:?} is ambiguous: {why}",
            req.uri().path()
        )));
    }
    let std::borrow::Cow::Owned(path) = normal else {
        return Ok(());
    };
    let raw = req.uri().path().to_owned();
    let bad =
        |why: String| ProxyError::BadRequest(format!("path {raw:?} normalises to {path:?}, {why}"));
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|e| bad(format!("{e}")))?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|e| bad(format!("{e}")))?;
    Ok(())
}

/// Authorizes one request, sends it to the application and counts it.
///
/// Everything up to the send (headers, authorization, the span and the
/// access-log line) is done here, before the future a request in flight
/// holds: that future is the application's answer and what the metrics,
/// span and line need at the end, not a copy of the request. (An HTTP/2
/// connection calls this for each stream on its own task, before the
/// stream's task runs.)
fn forward_http(
    proxy: Arc<Proxy>,
    conn: Arc<Conn>,
    mut req: Request,
) -> impl std::future::Future<Output = Response> + Send + 'static {
    let started = Instant::now();
    req.headers_mut().remove(&CLIENT_ID_HEADER);
    // The caller's deadline: a mesh peer's `weft-timeout`, anyone's
    // `grpc-timeout`; a `weft-*` header from outside the mesh is dropped.
    let from = match conn.peer_id {
        Some(_) => deadline::From::MeshPeer,
        None => deadline::From::Outside,
    };
    let until = deadline::take(
        req.headers_mut(),
        from,
        tokio::time::Instant::now(),
        SystemTime::now(),
    );
    super::http::pool::strip_connection_listed(req.headers_mut());
    // A client proxy carries HTTP/1.1 to this one as HTTP/2 over the mesh
    // connection; the application gets the version its client spoke. Only
    // a mesh peer's word counts, and the marker never reaches the app.
    if let Some(orig) = req.headers_mut().remove(&ORIG_PROTO_HEADER)
        && conn.peer_id.is_some()
        && orig == ORIG_PROTO_HTTP1
    {
        *req.version_mut() = http::Version::HTTP_11;
    }
    // First, so that a trace the proxy starts is the access-log line's too.
    let span = proxy.trace(super::trace::Kind::Server, || None, &mut req);
    // After the version is the caller's own again.
    let logged = proxy.access_log.as_ref().map(|log| {
        let line = log.begin(
            super::accesslog::Direction::Inbound,
            Some(conn.source.clone()),
            Some(conn.peer),
            &mut req,
        );
        line.record().to_app(conn.app.addr, conn.peer_id.is_some());
        line
    });
    // Rules and limits match, and the app receives, the normalised path.
    let access = normalize_uri(&mut req).map(|()| {
        let request = HttpRequest {
            method: req.method(),
            path: req.uri().path(),
        };
        match authorize(&proxy, &conn, Some(request)) {
            // Its caller has stopped waiting: the app is not called (and
            // no rate-limit token is spent on it).
            Access::Allowed if until.is_some_and(|at| at <= tokio::time::Instant::now()) => {
                Admission::Expired
            }
            Access::Allowed => limit(&proxy, &conn, &req),
            Access::Denied { policy } => Admission::Denied(policy),
        }
    });
    // The application's answer, or the proxy's own; `sent` when it went.
    let (answer, sent): (super::http::Answer, _) = match access {
        Err(bad) => (
            Box::pin(std::future::ready(Ok(errors::response(&bad)))),
            None,
        ),
        Ok(Admission::Denied(policy)) => {
            deny(&proxy, &policy, "http");
            let who = conn.peer_id.as_ref().map_or_else(
                || "a caller without a mesh identity".to_owned(),
                |id| id.to_string(),
            );
            let refused = errors::response(&ProxyError::Forbidden(format!(
                "AccessPolicy {policy} does not allow {who} to {} {} on port {}",
                req.method(),
                req.uri().path(),
                conn.port
            )));
            (Box::pin(std::future::ready(Ok(refused))), None)
        }
        Ok(Admission::Limited(refused)) => {
            let seconds = errors::retry_after_seconds(refused.retry_after);
            proxy
                .metrics
                .inbound_rate_limited
                .get_or_create(&InboundLimitLabels {
                    policy: refused.policy,
                    limit: refused.limit,
                })
                .inc();
            let refused =
                errors::response(&ProxyError::InboundRateLimited(refused.message, seconds));
            (Box::pin(std::future::ready(Ok(refused))), None)
        }
        Ok(Admission::Admitted) => {
            if let Some(id) = &conn.peer_id_header {
                req.headers_mut()
                    .insert(CLIENT_ID_HEADER.clone(), id.clone());
            }
            let sent = logged.as_ref().map(|_| Instant::now());
            (to_app_until(&proxy, conn.app.clone(), req, until), sent)
        }
        Ok(Admission::Expired) => {
            let expired = ProxyError::DeadlineExceeded(format!(
                "the caller's deadline had passed when the request arrived; {} was not called",
                proxy.shared.workload
            ));
            (Box::pin(std::future::ready(Err(expired.into()))), None)
        }
    };
    async move {
        let mut rsp = match answer.await {
            Ok(rsp) => rsp,
            Err(e) => {
                let err = errors::classify(&e, &conn.app.addr.to_string());
                proxy
                    .metrics
                    .proxy_errors
                    .get_or_create(&ProxyErrorLabels {
                        direction: Direction::Inbound,
                        dst: proxy.shared.workload.clone(),
                        reason: err.reason().to_owned(),
                    })
                    .inc();
                errors::response(&err)
            }
        };
        // Only a proxy says it answered: the application's own header of
        // that name (relayed from a call of its own, or made up) would
        // have the caller's proxy take a pod's answer for its own peer's
        // refusal.
        if rsp
            .extensions()
            .get::<super::accesslog::ProxyAnswer>()
            .is_none()
        {
            rsp.headers_mut().remove(errors::ERROR_HEADER);
        }
        if let (Some(line), Some(sent)) = (&logged, sent)
            && rsp
                .extensions()
                .get::<super::accesslog::ProxyAnswer>()
                .is_none()
        {
            line.record().answered(sent.elapsed());
        }
        let tls = conn.peer_id.is_some();
        let series = proxy.inbound_edges.get(&conn.source, || {
            let edge = EdgeLabels {
                direction: Direction::Inbound,
                src: conn.source.to_string(),
                dst: proxy.shared.workload.clone(),
                route: "default".to_owned(),
            };
            EdgeSeries::new(&proxy.metrics, edge, tls)
        });
        series.record(&proxy.metrics, rsp.status(), started);
        if let Some(span) = span {
            span.end(&rsp);
        }
        match logged {
            Some(line) => line.finish(rsp),
            None => rsp,
        }
    }
}

/// One request to the application on `app`: the pool's answer.
fn to_app(proxy: &Proxy, app: Endpoint, mut req: Request) -> super::http::Answer {
    req.extensions_mut().insert(app);
    super::http::call(proxy.shared.pool.clone(), req)
}

/// One request to the application, told the caller's deadline (see
/// `deadline`) and cut off at it: 504 rather than an answer nobody waits
/// for.
fn to_app_until(
    proxy: &Proxy,
    app: Endpoint,
    mut req: Request,
    until: Option<tokio::time::Instant>,
) -> super::http::Answer {
    let Some(at) = until else {
        return to_app(proxy, app, req);
    };
    let now = tokio::time::Instant::now();
    deadline::stamp(
        req.headers_mut(),
        until,
        None,
        deadline::To::App,
        now,
        SystemTime::now(),
    );
    let label = app.addr;
    let answer = to_app(proxy, app, req);
    Box::pin(async move {
        match tokio::time::timeout_at(at, answer).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::DeadlineExceeded(format!(
                "the caller's deadline passed before the application on {label} answered"
            ))
            .into()),
        }
    })
}

/// Sends one request to the application on `app`.
pub async fn send_to_app(proxy: &Proxy, app: Endpoint, req: Request) -> Response {
    let label = app.addr;
    match to_app(proxy, app, req).await {
        Ok(rsp) => rsp,
        Err(e) => errors::response(&errors::classify(&e, &label.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::audit_segment;

    #[test]
    fn an_audit_label_names_a_first_segment_or_nothing() {
        for (path, label) in [
            ("/charges/7", "/charges"),
            ("/charges", "/charges"),
            ("/", "/"),
            ("//x", "*"),
            ("*", "*"),
            ("/aaaaaaaaa/b", "*"),
        ] {
            assert_eq!(audit_segment(path, 8), label, "{path}");
        }
    }
}
