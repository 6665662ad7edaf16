//! Outbound: connections the local application makes, redirected to the
//! proxy. The original destination names a Service (by ClusterIP, or by
//! hostname for explicit listeners); HTTP goes through the routing and
//! resilience stack, anything else is forwarded as opaque TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::compile::SERVER_FIRST_PORTS;
use crate::config::PortProtocol;

use super::detect::Protocol;
use super::http::errors::{self, ProxyError};
use super::http::route::{self, RouteCtx, normalize_path};
use super::http::{self as stack, Request};
use super::mesh::{MeshStream, MeshTarget, connect_tcp};
use super::metrics::{ConnLabels, Direction};
use super::state::{ServiceRef, Snapshot};
use super::tls::ALPN_TCP;
use super::{Proxy, accesslog};

/// Where an outbound connection was headed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// From `SO_ORIGINAL_DST`, or an explicit listener mapped to an address.
    Addr(SocketAddr),
    /// An explicit listener mapped to a Service hostname and port.
    Host(String, u16),
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Host(_, p) => *p,
        }
    }

    /// Parses `ip:port` or `host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse() {
            return Ok(Target::Addr(addr));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected HOST:PORT"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        Ok(Target::Host(host.to_owned(), port))
    }
}

fn find<'a>(snapshot: &'a Snapshot, target: &Target) -> Option<ServiceRef<'a>> {
    match target {
        Target::Addr(a) => snapshot.by_addr(*a),
        Target::Host(h, _) => snapshot.by_host(h),
    }
}

/// The protocol the Service declares for the port `target` reaches: a
/// Service port, or a published pod's port.
fn declared_protocol(snapshot: &Snapshot, target: &Target) -> Option<PortProtocol> {
    let (svc, port) = match (find(snapshot, target), target) {
        (Some(svc), _) => (svc, target.port()),
        (None, Target::Addr(a)) => {
            let pod = snapshot.by_pod(*a)?;
            (snapshot.pod_service(pod)?, pod.port)
        }
        (None, Target::Host(..)) => return None,
    };
    svc.ports
        .iter()
        .find(|p| p.port == port)
        .map(|p| p.protocol)
}

/// Handles one outbound connection.
pub async fn serve(proxy: Arc<Proxy>, conn: TcpStream, target: Target) {
    let port = target.port();
    let client = proxy
        .access_log
        .as_ref()
        .and_then(|_| conn.peer_addr().ok());
    let declared_opaque = proxy
        .store
        .load()
        .and_then(|s| declared_protocol(&s, &target))
        == Some(PortProtocol::Opaque);
    let skip = declared_opaque || SERVER_FIRST_PORTS.contains(&port);
    let Some((protocol, io)) = proxy.detect(conn, skip).await else {
        return;
    };
    let labels = ConnLabels {
        direction: Direction::Outbound,
        protocol: protocol.label().to_owned(),
        tls: false,
        port: proxy.metrics.bounds.port(port),
    };
    proxy.metrics.connections_total.get_or_create(&labels).inc();
    proxy.metrics.connections_open.get_or_create(&labels).inc();
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let p = proxy.clone();
            let target = target.clone();
            // What the client dialled, named once for the connection's
            // access-log lines (when it has any).
            let dialled = proxy.access_log.as_ref().map(|_| match &target {
                Target::Addr(a) => accesslog::Dialled::Addr(*a),
                Target::Host(h, port) => accesslog::Dialled::Named(format!("{h}:{port}").into()),
            });
            super::server::serve_http(
                io,
                &proxy.drain,
                &proxy.http_limits,
                &proxy.outbound_in_flight,
                // The request's routing and its line's start happen here,
                // before the future a request in flight holds: that
                // future is the stack's answer and what the span and the
                // line need at the end, not a copy of the request.
                move |mut req| {
                    // First, so that a trace the proxy starts is the
                    // access-log line's too.
                    let span = p.trace(
                        super::trace::Kind::Client,
                        || Some(target_label(&target)),
                        &mut req,
                    );
                    let logged = p.access_log.as_ref().map(|log| {
                        let mut line =
                            log.begin(accesslog::Direction::Outbound, None, client, &mut req);
                        // Its `dst` if no destination claims the request
                        // (no config yet, a host that does not resolve),
                        // even when the client leaves first.
                        if let Some(dialled) = &dialled {
                            line.fallback_dst(dialled.clone());
                        }
                        line
                    });
                    let answer = dispatch(&p, &target, req);
                    let target = target.clone();
                    async move {
                        let rsp = match answer.await {
                            Ok(rsp) => rsp,
                            Err(e) => {
                                errors::response(&errors::classify(&e, &target_label(&target)))
                            }
                        };
                        if let Some(span) = span {
                            span.end(&rsp);
                        }
                        match logged {
                            Some(line) => line.finish(rsp),
                            None => rsp,
                        }
                    }
                },
            )
            .await;
        }
        Protocol::Tls | Protocol::Opaque => forward_tcp(&proxy, io, &target).await,
    }
    proxy.metrics.connections_open.get_or_create(&labels).dec();
}

fn target_label(target: &Target) -> String {
    match target {
        Target::Addr(a) => a.to_string(),
        Target::Host(h, p) => format!("{h}:{p}"),
    }
}

/// Routes one request on the snapshot in force when it arrived.
///
/// The destination is found here, before any future is made, and the
/// answer is the stack's own future: a request in flight holds no copy
/// of itself or of the routing. Only a request that must wait first (a
/// host name to resolve, a pod's Service endpoints to learn) gets a
/// future of its own for that. (An HTTP/2 connection calls this for each
/// stream on the connection's task, before the stream's own task runs;
/// routing is a few lookups, and the timing of a try starts in the
/// stream's task, see `balance::send`.)
pub fn dispatch(proxy: &Arc<Proxy>, target: &Target, mut req: Request) -> stack::Answer {
    let Some(snapshot) = proxy.store.load() else {
        return refuse(ProxyError::NoEndpoints("no config loaded yet".into()));
    };
    let port = target.port();
    let Some(svc) = find(&snapshot, target) else {
        // A verified pod of a meshed Service, dialled directly: that pod,
        // with its Service's policy and its own identity (mTLS, so a
        // STRICT server takes it), not as an unknown address.
        if let Target::Addr(addr) = *target
            && snapshot.by_pod(addr).is_some()
        {
            let proxy = proxy.clone();
            return Box::pin(async move {
                let pod = snapshot.by_pod(addr).expect("looked up above");
                let dst = pod_destination(&proxy, &snapshot, addr, pod, &mut req).await;
                stack::call(stack::backend(dst, &proxy.shared), req).await
            });
        }
        let to_address = move |proxy: &Arc<Proxy>, addr, mut req: Request| {
            let dst = snapshot.address_destination(addr, &proxy.store.destinations);
            req.extensions_mut().insert(RouteCtx::default_route());
            stack::call(stack::backend(dst, &proxy.shared), req)
        };
        return match target {
            Target::Addr(a) => to_address(proxy, *a, req),
            Target::Host(h, p) => {
                let (proxy, h, p) = (proxy.clone(), h.clone(), *p);
                Box::pin(async move {
                    let addr = tokio::net::lookup_host((h.as_str(), p))
                        .await
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| ProxyError::NoEndpoints(format!("{h}:{p}")))?;
                    to_address(&proxy, addr, req).await
                })
            }
        };
    };
    let (backend_svc, backend_port, ctx) = match route::find(&svc.routes, &req) {
        None => (svc, port, RouteCtx::default_route()),
        Some(r) => {
            let weights: Vec<u32> = r.backends.iter().map(|b| b.weight).collect();
            let picked = route::pick_weighted(&weights, &mut fastrand::Rng::new())
                .and_then(|i| r.backends.get(i))
                .and_then(|b| {
                    snapshot
                        .by_key(&b.service)
                        .map(|s| (s, b.port.unwrap_or(port)))
                });
            let Some((backend, backend_port)) = picked else {
                return refuse(ProxyError::NoBackends(r.name.clone()));
            };
            let ctx = RouteCtx {
                name: Arc::from(r.name.as_str()),
                timeout: r.timeout_ms.map(std::time::Duration::from_millis),
                retry: r.retry.clone().map(Arc::new),
                excluded: false,
            };
            (backend, backend_port, ctx)
        }
    };
    prepare(proxy, &snapshot, backend_svc, backend_port, ctx, &mut req);
    let dst = snapshot.service_destination(backend_svc, backend_port, &proxy.store.destinations);
    stack::call(stack::backend(dst, &proxy.shared), req)
}

/// The answer of a request refused before it reached a destination.
fn refuse(e: ProxyError) -> stack::Answer {
    Box::pin(std::future::ready(Err(e.into())))
}

/// A call to a verified pod by its address. When one Service claims it
/// and it is among that Service's endpoints, the call goes through the
/// Service's own destination pinned to that pod: one rate limit, retry
/// budget and breaker per pod whichever way it is reached, and the
/// Service's series. Otherwise to the pod alone ([`Snapshot::pod_alone`]).
async fn pod_destination(
    proxy: &Proxy,
    snapshot: &Snapshot,
    addr: SocketAddr,
    pod: &crate::proxy::state::PodEntry,
    req: &mut Request,
) -> Arc<super::destination::Destination> {
    let all = &proxy.store.destinations;
    if let Some(svc) = snapshot.pod_service(pod) {
        prepare(
            proxy,
            snapshot,
            svc,
            pod.port,
            RouteCtx::default_route(),
            req,
        );
        let dst = snapshot.service_destination(svc, pod.port, all);
        if dst.endpoints().await.iter().any(|e| e.addr == addr) {
            req.extensions_mut().insert(stack::balance::Pinned(addr));
            return dst;
        }
    } else {
        req.extensions_mut().insert(RouteCtx::default_route());
    }
    snapshot.pod_alone(addr, pod, all)
}

/// Readies a request for a port of `svc`: the HTTP version the port
/// declares, and whether its path is a health check the breaker and the
/// retries leave alone.
fn prepare(
    proxy: &Proxy,
    snapshot: &Snapshot,
    svc: ServiceRef<'_>,
    port: u16,
    mut ctx: RouteCtx,
    req: &mut Request,
) {
    let declared = svc
        .ports
        .iter()
        .find(|p| p.port == port)
        .map(|p| p.protocol);
    *req.version_mut() = upstream_version(declared, req);
    let policy = snapshot.policy(&svc);
    // Compared in the normalised form (both sides): `/%68ealth` and
    // `/x/../health` are the health path, not a failure to count.
    if !policy.excluded_paths.is_empty() || !proxy.health_paths.is_empty() {
        let path = normalize_path(req.uri().path());
        ctx.excluded = policy
            .excluded_paths
            .iter()
            .chain(&proxy.health_paths)
            .any(|p| **p == *path);
    }
    req.extensions_mut().insert(ctx);
}

/// The HTTP version to speak to a Service port: the one its Service
/// declares (`appProtocol`), else the client's. A port declared HTTP/1.1 is
/// served by an HTTP/1.1 server, so an HTTP/2 client's requests reach it as
/// HTTP/1.1 — except gRPC, which exists only over HTTP/2; a port declared
/// HTTP/2 (h2c, gRPC) gets HTTP/2 whatever the client spoke.
pub fn upstream_version(declared: Option<PortProtocol>, req: &Request) -> http::Version {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    match declared {
        Some(PortProtocol::Http1) if !grpc => http::Version::HTTP_11,
        Some(PortProtocol::Http2) => http::Version::HTTP_2,
        _ => req.version(),
    }
}

/// Opaque TCP: pick an endpoint and copy bytes both ways.
async fn forward_tcp<I>(proxy: &Arc<Proxy>, mut io: I, target: &Target)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some((addr, mesh)) = resolve_tcp(proxy, target).await else {
        return tracing::debug!(target = %target_label(target), "no endpoint for opaque connection");
    };
    let upstream = match (mesh, &proxy.originator) {
        // Mesh TLS carrying opaque bytes; the server's proxy unwraps them.
        (Some(mesh), Some(originator)) => originator.connect(addr, &mesh, ALPN_TCP).await,
        _ => connect_tcp(addr).await.map(MeshStream::Plain),
    };
    match upstream {
        Ok(mut upstream) => {
            if let Err(e) = super::server::relay_until_idle(
                &mut io,
                &mut upstream,
                super::server::OPAQUE_IDLE_TIMEOUT,
            )
            .await
            {
                tracing::debug!(%addr, error = %e, "opaque connection ended");
            }
        }
        Err(e) => tracing::debug!(%addr, error = %e, "opaque connect failed"),
    }
}

/// An endpoint for an opaque connection, and who must serve it when the
/// destination is meshed.
async fn resolve_tcp(
    proxy: &Arc<Proxy>,
    target: &Target,
) -> Option<(SocketAddr, Option<Arc<MeshTarget>>)> {
    let snapshot = proxy.store.load();
    if let Some(snapshot) = &snapshot
        && let Some(svc) = find(snapshot, target)
    {
        let dst = snapshot.service_destination(svc, target.port(), &proxy.store.destinations);
        let endpoints = dst.endpoints().await;
        // As the HTTP balancer: draining pods only when nothing else is
        // up, and the caller's zone while it has enough of them.
        let serving = || {
            endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.is_draining())
        };
        let mut rng = fastrand::Rng::new();
        let candidates: Vec<(usize, f64)> = match serving().next() {
            Some(_) => serving().map(|(i, _)| (i, 0.0)).collect(),
            None => (0..endpoints.len()).map(|i| (i, 0.0)).collect(),
        };
        let candidates = match dst.policy.zone_affinity {
            None => candidates,
            Some(_) => dst
                .in_zone_probing(&endpoints, &candidates, &mut rng, false)
                .unwrap_or(candidates),
        };
        return rng
            .choice(candidates)
            .map(|(i, _)| (endpoints[i].addr, endpoints[i].endpoint.mesh.clone()));
    }
    if let (Some(snapshot), Target::Addr(addr)) = (&snapshot, target)
        && let Some(pod) = snapshot.by_pod(*addr)
    {
        // The pod as its Service's destination knows it, else alone.
        let all = &proxy.store.destinations;
        if let Some(svc) = snapshot.pod_service(pod) {
            let dst = snapshot.service_destination(svc, pod.port, all);
            if let Some(e) = dst.endpoints().await.iter().find(|e| e.addr == *addr) {
                return Some((*addr, e.endpoint.mesh.clone()));
            }
        }
        let dst = snapshot.pod_alone(*addr, pod, all);
        let mesh = dst
            .endpoints()
            .await
            .first()
            .and_then(|e| e.endpoint.mesh.clone());
        return Some((*addr, mesh));
    }
    let addr = match target {
        Target::Addr(a) => *a,
        Target::Host(h, p) => tokio::net::lookup_host((h.as_str(), *p))
            .await
            .ok()?
            .next()?,
    };
    Some((addr, None))
}
