//! The admin server (`/live`, `/ready`, `/metrics`, `/config`, and
//! `POST /shutdown` from localhost) and the probe server, which forwards
//! kubelet probes rewritten to `/probe/<port>/<path>` to the application —
//! plaintext, so probes keep working when the namespace is STRICT. It
//! forwards only GET and HEAD for the probes the injector rewrote
//! (`--probe-target`), never to the proxy's own ports: it answers anyone
//! who can reach the pod, past STRICT mode and AccessPolicy.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request as AxumRequest, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;

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

async fn config(State(p): State<Arc<Proxy>>) -> impl IntoResponse {
    match p.store.load() {
        Some(s) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            serde_json::to_string_pretty(&s.config).unwrap_or_default(),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/plain")],
            "no config loaded yet\n".to_owned(),
        ),
    }
}

async fn shutdown(
    State(p): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> impl IntoResponse {
    if !peer.ip().is_loopback() {
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

/// A probe the injector rewrote to `/probe/<port>/<path>`: the app port and
/// the path the kubelet sends (without the query, which passes through).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl std::fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.port, self.path)
    }
}

/// One `--probe-target` value, `<port>/<path>` such as `8080/healthz`
/// (`8080/` for the root); a query is dropped, as matching ignores it.
pub fn parse_probe_target(s: &str) -> Result<ProbeTarget, String> {
    let bad = |why: &str| {
        format!(
            "{PROBE_TARGET_FLAG} ({PROBE_TARGET_ENV}) entry {s:?}: {why}; expected <port>/<path>, such as 8080/healthz"
        )
    };
    let entry = s.trim();
    let (port, path) = entry
        .split_once('/')
        .ok_or_else(|| bad("no / between the port and the path"))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the part before the first / is not a port number"));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(bad("the port is not in 1-65535")),
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad("the path holds whitespace or control characters"));
    }
    Ok(ProbeTarget {
        port,
        path: format!("/{path}"),
    })
}

/// What the probe server needs: the proxy, and the ports of its own
/// listeners, which it never forwards to even when configured.
struct ProbeServer {
    proxy: Arc<Proxy>,
    own_ports: Vec<u16>,
}

/// The probe server. It forwards only GET and HEAD requests for the probes
/// the injector rewrote (`Proxy::probe_targets`) and never to a port of the
/// proxy itself: it listens on every address, outside the iptables
/// redirect, STRICT mode and AccessPolicy, so anything more would let any
/// pod reach any port of the app (and the admin server from loopback).
pub fn probe_router(proxy: Arc<Proxy>, own_ports: Vec<u16>) -> Router {
    Router::new()
        .fallback(probe)
        .with_state(Arc::new(ProbeServer { proxy, own_ports }))
}

/// `/probe/<port>` and `/probe/<port>/<path>`: the port and the path to
/// forward (as received, still percent-encoded); `None` for anything else.
fn probe_path(path: &str) -> Option<Result<(u16, String), String>> {
    let rest = path.strip_prefix("/probe/")?;
    let (port, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some(
        port.parse::<u16>()
            .ok()
            .filter(|_| port.bytes().all(|b| b.is_ascii_digit()))
            .map(|p| (p, format!("/{path}")))
            .ok_or_else(|| format!("{port:?} is not a port number")),
    )
}

async fn probe(State(s): State<Arc<ProbeServer>>, req: AxumRequest) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let (port, path) = match probe_path(req.uri().path()) {
        Some(Ok(target)) => target,
        Some(Err(why)) => {
            tracing::debug!(%peer, uri = %req.uri(), "probe refused: {why}");
            return proxy_error(&ProxyError::BadRequest(format!(
                "{why}; the probe port serves /probe/<port>/<path>"
            )));
        }
        None => {
            tracing::debug!(%peer, uri = %req.uri(), "probe refused: not a /probe/ path");
            return refused(
                StatusCode::NOT_FOUND,
                "not-found",
                "the probe port serves /probe/<port>/<path> only\n".to_owned(),
            );
        }
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let method = req.method().clone();
        tracing::debug!(%peer, %method, port, path, "probe refused: method not allowed");
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
        tracing::debug!(%peer, port, path, "probe refused: a port of the proxy itself");
        return proxy_error(&ProxyError::Forbidden(format!(
            "port {port} is a port of the weft proxy itself; the probe port forwards only the pod's own HTTP probes to the application"
        )));
    }
    let p = &s.proxy;
    if !p
        .probe_targets
        .iter()
        .any(|t| t.port == port && t.path == path)
    {
        tracing::debug!(%peer, port, path, "probe refused: not a probe the injector rewrote");
        let none = if p.probe_targets.is_empty() {
            format!(" (none are configured: {PROBE_TARGET_FLAG} / {PROBE_TARGET_ENV})")
        } else {
            String::new()
        };
        return proxy_error(&ProxyError::Forbidden(format!(
            "port {port} path {path} is not a probe the injector rewrote; the probe port forwards only the pod's own HTTP probes{none}"
        )));
    }
    forward_probe(p, port, path, req).await
}

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
/// visible while the proxy drains.
pub async fn serve(listener: TcpListener, router: Router) {
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, app).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "admin server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16, path: &str) -> ProbeTarget {
        ProbeTarget {
            port,
            path: path.to_owned(),
        }
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
        for bad in [
            "",
            "8080",
            "/healthz",
            "http/healthz",
            "0/healthz",
            "70000/x",
            "-1/x",
            "8080/a b",
        ] {
            let err = parse_probe_target(bad).expect_err(bad);
            assert!(
                err.contains("--probe-target")
                    && err.contains("WEFT_PROBE_TARGETS")
                    && err.contains("<port>/<path>")
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
            "9090/",
        ])
        .expect("valid targets");
        assert_eq!(
            args.probe_targets,
            vec![
                target(8080, "/healthz"),
                target(8080, "/ready"),
                target(9090, "/")
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
    fn probe_paths_keep_the_raw_path() {
        assert_eq!(
            probe_path("/probe/8080/healthz"),
            Some(Ok((8080, "/healthz".into())))
        );
        assert_eq!(probe_path("/probe/8080/"), Some(Ok((8080, "/".into()))));
        assert_eq!(probe_path("/probe/8080"), Some(Ok((8080, "/".into()))));
        assert_eq!(
            probe_path("/probe/8080/a%2Fb"),
            Some(Ok((8080, "/a%2Fb".into())))
        );
        assert!(matches!(probe_path("/probe/+80/x"), Some(Err(_))));
        assert!(matches!(probe_path("/probe/x/y"), Some(Err(_))));
        assert_eq!(probe_path("/ready"), None);
        assert_eq!(probe_path("/probe"), None);
    }
}
