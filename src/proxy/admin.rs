//! The admin server (`/live`, `/ready`, `/metrics`, `/config`, and
//! `POST /shutdown` from localhost) and the probe server, which forwards
//! kubelet probes rewritten to `/probe/<port>/<path>` to the application —
//! plaintext, so probes keep working when the namespace is STRICT.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request as AxumRequest, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use tokio::net::TcpListener;

use super::Proxy;
use super::http::body;

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

pub fn probe_router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/probe/{port}", any(probe_root))
        .route("/probe/{port}/{*path}", any(probe))
        .with_state(proxy)
}

async fn probe_root(
    State(p): State<Arc<Proxy>>,
    Path(port): Path<u16>,
    req: AxumRequest,
) -> impl IntoResponse {
    forward_probe(p, port, String::new(), req).await
}

async fn probe(
    State(p): State<Arc<Proxy>>,
    Path((port, path)): Path<(u16, String)>,
    req: AxumRequest,
) -> impl IntoResponse {
    forward_probe(p, port, path, req).await
}

async fn forward_probe(
    p: Arc<Proxy>,
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
    parts.uri = match format!("/{path}{query}").parse() {
        Ok(uri) => uri,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad probe path\n").into_response(),
    };
    parts.headers.remove(&super::inbound::CLIENT_ID_HEADER);
    let req = http::Request::from_parts(parts, body::boxed(body_in));
    let app = p
        .shared
        .pool
        .app_endpoint(SocketAddr::from((p.app_ip, port)));
    super::inbound::send_to_app(&p, app, req)
        .await
        .map(axum::body::Body::new)
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
