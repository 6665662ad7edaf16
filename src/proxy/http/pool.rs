//! The innermost layer: pooled upstream connections. HTTP/1.1 connections
//! are kept alive and reused, HTTP/2 connections multiplexed; the version
//! the client spoke is preserved upstream. Endpoints of meshed destinations
//! get mesh mTLS (`super::super::mesh`), pooled apart per expected server
//! identity and inner protocol. Upstream failures are classified here,
//! where it is still known whether a connection was ever made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::Service;

use crate::proxy::mesh::{MeshStream, MeshTarget, Originator};
use crate::proxy::tls::{ALPN_H2, ALPN_HTTP1};

use super::body::{self, Body, BoxError, Request, Response};
use super::errors::ProxyError;

/// How long a connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = crate::proxy::mesh::CONNECT_TIMEOUT;
/// Idle pooled connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The address a request is sent to, chosen by the balancer, with its URI
/// authority made once rather than per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    authority: Authority,
    /// Set for an endpoint of a meshed destination: speak mesh mTLS.
    pub mesh: Option<Arc<MeshTarget>>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|e| unreachable!("a socket address is a valid authority: {e}"));
        Self {
            addr,
            authority,
            mesh: None,
        }
    }

    pub fn meshed(addr: SocketAddr, mesh: Option<Arc<MeshTarget>>) -> Self {
        Self {
            mesh,
            ..Self::new(addr)
        }
    }
}

/// Marks a response that came over mesh TLS (hyper copies a connection's
/// extra into every response it carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverMeshTls(pub bool);

/// Shared upstream clients: plaintext ones per HTTP version, mesh ones per
/// (expected server, HTTP version), made on first use.
#[derive(Clone)]
pub struct Pool {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
    mesh: Option<Arc<MeshClients>>,
}

type MeshClient = Client<MeshConnector, Body>;

struct MeshClients {
    originator: Arc<Originator>,
    clients: Mutex<HashMap<(Arc<MeshTarget>, bool), MeshClient>>,
}

fn builder(http2: bool) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(IDLE_TIMEOUT);
    if http2 {
        b.http2_only(true);
    } else {
        b.pool_max_idle_per_host(1024);
    }
    b
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Pool {
    /// Without an originator every endpoint is reached in plaintext.
    pub fn new(originator: Option<Arc<Originator>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(true);
        Self {
            http1: builder(false).build(connector.clone()),
            http2: builder(true).build(connector),
            mesh: originator.map(|originator| {
                Arc::new(MeshClients {
                    originator,
                    clients: Mutex::default(),
                })
            }),
        }
    }

    fn mesh_client(&self, target: &Arc<MeshTarget>, http2: bool) -> Option<MeshClient> {
        let mesh = self.mesh.as_ref()?;
        let mut clients = mesh.clients.lock().unwrap_or_else(|e| e.into_inner());
        let client = clients.entry((target.clone(), http2)).or_insert_with(|| {
            builder(http2).build(MeshConnector {
                originator: mesh.originator.clone(),
                target: target.clone(),
                alpn: if http2 { ALPN_H2 } else { ALPN_HTTP1 },
            })
        });
        Some(client.clone())
    }
}

/// Connects hyper's mesh clients: TCP, then mesh TLS for one expectation.
#[derive(Clone)]
pub struct MeshConnector {
    originator: Arc<Originator>,
    target: Arc<MeshTarget>,
    alpn: &'static [u8],
}

impl Service<Uri> for MeshConnector {
    type Response = MeshIo;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<MeshIo, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .map(|a| a.as_str())
                .unwrap_or_default()
                .parse()
                .map_err(|e| format!("{uri}: not an endpoint address: {e}"))?;
            let stream = this
                .originator
                .connect(addr, &this.target, this.alpn)
                .await?;
            Ok(MeshIo(TokioIo::new(stream)))
        })
    }
}

/// A mesh connection as hyper reads and writes it.
pub struct MeshIo(TokioIo<MeshStream>);

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(OverMeshTls(self.0.inner().is_tls()))
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    if let Some(listed) = headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
    {
        let listed: Vec<String> = listed
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        for name in listed {
            headers.remove(name.as_str());
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

impl Service<Request> for Pool {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let Some(endpoint) = req.extensions_mut().remove::<Endpoint>() else {
            return Box::pin(async {
                Err(ProxyError::NoEndpoints("request had no endpoint".into()).into())
            });
        };
        // Keep the authority the client used: HTTP/2 carries it in the URI,
        // HTTP/1 in Host; the URI is rewritten to the chosen endpoint.
        if !req.headers().contains_key(http::header::HOST)
            && let Some(authority) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(http::header::HOST, authority);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(endpoint.authority);
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        *req.uri_mut() = match Uri::from_parts(parts) {
            Ok(uri) => uri,
            Err(e) => {
                let err = ProxyError::BadRequest(format!("cannot forward {}: {e}", req.uri()));
                return Box::pin(async move { Err(err.into()) });
            }
        };
        let addr = endpoint.addr;
        strip_hop_by_hop(req.headers_mut());
        let http2 = req.version() == Version::HTTP_2;
        if !http2 {
            *req.version_mut() = Version::HTTP_11;
        }
        let sent = match endpoint
            .mesh
            .as_ref()
            .and_then(|t| self.mesh_client(t, http2))
        {
            Some(mesh) => mesh.request(req),
            None if http2 => self.http2.request(req),
            None => self.http1.request(req),
        };
        Box::pin(async move {
            match sent.await {
                Ok(rsp) => Ok(rsp.map(body::boxed)),
                Err(e) if e.is_connect() => {
                    Err(ProxyError::Connect(addr.to_string(), error_chain(&e)).into())
                }
                Err(e) => Err(ProxyError::UpstreamReset(addr.to_string(), error_chain(&e)).into()),
            }
        })
    }
}

/// `outer: inner: innermost`, so the cause (refused, reset) is visible.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
