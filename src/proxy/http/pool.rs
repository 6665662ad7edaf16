//! The innermost layer: pooled upstream connections. HTTP/1.1 connections
//! are kept alive and reused, HTTP/2 connections multiplexed; the version
//! the client spoke is preserved upstream. Upstream failures are classified
//! here, where it is still known whether a connection was ever made.

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::Service;

use super::body::{self, Body, BoxError, Request, Response};
use super::errors::ProxyError;

/// How long a connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle pooled connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The address a request is sent to, chosen by the balancer, with its URI
/// authority made once rather than per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    authority: Authority,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|e| unreachable!("a socket address is a valid authority: {e}"));
        Self { addr, authority }
    }
}

/// Shared upstream clients, one per HTTP version.
#[derive(Clone)]
pub struct Pool {
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(true);
        let mut h1 = Client::builder(TokioExecutor::new());
        h1.pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(1024);
        let mut h2 = Client::builder(TokioExecutor::new());
        h2.pool_idle_timeout(IDLE_TIMEOUT).http2_only(true);
        Self {
            http1: h1.build(connector.clone()),
            http2: h2.build(connector),
        }
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
        let client = if req.version() == Version::HTTP_2 {
            self.http2.clone()
        } else {
            *req.version_mut() = Version::HTTP_11;
            self.http1.clone()
        };
        Box::pin(async move {
            match client.request(req).await {
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
