//! Inbound: connections from other pods to this pod's application,
//! redirected to the proxy. They are forwarded to the application on
//! localhost at the port the client called — HTTP-aware (counted per
//! request) when the bytes are HTTP, opaque otherwise.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::Proxy;
use super::detect::Protocol;
use super::http::errors;
use super::http::pool::Endpoint;
use super::http::{Request, Response};
use super::metrics::{ConnLabels, Direction, EdgeLabels, EdgeSeries};

/// Handles one inbound connection meant for `app_port`.
pub async fn serve(proxy: Arc<Proxy>, conn: TcpStream, peer: SocketAddr, app_port: u16) {
    let app = SocketAddr::from((proxy.app_ip, app_port));
    tracing::trace!(%peer, app_port, "inbound connection");
    let skip = crate::compile::SERVER_FIRST_PORTS.contains(&app_port);
    let Some((protocol, io)) = proxy.detect(conn, skip).await else {
        return;
    };
    let labels = ConnLabels {
        direction: Direction::Inbound,
        protocol: protocol.label().to_owned(),
        tls: false,
        port: app_port,
    };
    proxy.metrics.connections_total.get_or_create(&labels).inc();
    proxy.metrics.connections_open.get_or_create(&labels).inc();
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let p = proxy.clone();
            let endpoint = Endpoint::new(app);
            super::server::serve_http(io, &proxy.drain, move |req| {
                forward_http(p.clone(), endpoint.clone(), req)
            })
            .await;
        }
        Protocol::Tls | Protocol::Opaque => {
            let mut io = io;
            match TcpStream::connect(app).await {
                Ok(mut upstream) => {
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
                }
                Err(e) => tracing::debug!(%app, error = %e, "app refused an opaque connection"),
            }
        }
    }
    proxy.metrics.connections_open.get_or_create(&labels).dec();
}

/// Sends one request to the application and counts it.
pub async fn forward_http(proxy: Arc<Proxy>, app: Endpoint, mut req: Request) -> Response {
    let started = Instant::now();
    let label = app.addr;
    req.extensions_mut().insert(app);
    let rsp = match super::http::call(proxy.shared.pool.clone(), req).await {
        Ok(rsp) => rsp,
        Err(e) => errors::response(&errors::classify(&e, &label.to_string())),
    };
    // No peer identity yet (plaintext): one series per workload.
    let series = proxy.inbound_edges.get(&proxy.unknown_source, || {
        let edge = EdgeLabels {
            direction: Direction::Inbound,
            src: proxy.unknown_source.to_string(),
            dst: proxy.shared.workload.clone(),
            route: "default".to_owned(),
        };
        EdgeSeries::new(&proxy.metrics, edge, false)
    });
    series.record(&proxy.metrics, rsp.status(), started);
    rsp
}

/// The loopback address the application listens on.
pub const APP_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
