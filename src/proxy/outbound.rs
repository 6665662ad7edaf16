//! Outbound: connections the local application makes, redirected to the
//! proxy. The original destination names a Service (by ClusterIP, or by
//! hostname for explicit listeners); HTTP goes through the routing and
//! resilience stack, anything else is forwarded as opaque TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::compile::SERVER_FIRST_PORTS;
use crate::config::{
    EgressMode, ExternalPortConfig, ExternalPortProtocol, PortProtocol, ServicePolicy,
};

use super::detect::{PrefixedIo, Protocol};
use super::hello::Hello;
use super::http::errors::{self, ProxyError};
use super::http::route::{self, RouteCtx, normalize_path};
use super::http::{self as stack, Request};
use super::mesh::{MeshStream, MeshTarget, connect_tcp};
use super::metrics::{ConnLabels, Direction, EgressLabels, ExternalConnLabels};
use super::state::{ExternalMatch, ServiceRef, Snapshot, normal_host};
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
    // A server-speaks-first port is not waited on for the client's first
    // bytes, unless an ExternalService passes TLS through on it (TLS
    // clients speak first: a managed Redis or MongoDB over TLS).
    let skip = declared_opaque
        || (SERVER_FIRST_PORTS.contains(&port)
            && !proxy
                .store
                .load()
                .is_some_and(|s| s.lists_external_tls_port(port) && !registered(&s, &target)));
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
        Protocol::Tls => forward_tls(&proxy, io, &target).await,
        Protocol::Opaque => forward_tcp(&proxy, io, &target, None).await,
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
        // A vendor an ExternalService of the namespace claims, by the
        // host the request names: its policy, and TLS if it says so.
        let host = vendor_host(target, &req);
        if let Some(host) = &host
            && let Some(m) = snapshot.external_for(host, port, ExternalPortProtocol::Http)
        {
            let dst = match proxy.store.external_destination(&snapshot, host, &m) {
                Ok(dst) => dst,
                Err(why) => {
                    return refuse(ProxyError::NoEndpoints(format!(
                        "{host}:{port} (ExternalService {}/{}: {why})",
                        m.es.namespace, m.es.name
                    )));
                }
            };
            // Vendors are spoken to in HTTP/1.1 (the ExternalService's
            // `HTTP`), over the originated TLS when there is one, and the
            // request names the vendor it goes to: a `Host` that differs
            // from the absolute URI's authority (or a second `Host`) would
            // otherwise reach another site behind the vendor's front end.
            if super::http::deadline::is_grpc(req.headers()) {
                // gRPC exists only over HTTP/2, which vendors are not
                // spoken to in (yet): say so rather than send it broken.
                return refuse(ProxyError::BadRequest(format!(
                    "gRPC to ExternalService {}/{} ({host}) is not supported: vendors are called over HTTP/1.1; use a port of protocol TLS and the app's own TLS",
                    m.es.namespace, m.es.name
                )));
            }
            *req.version_mut() = http::Version::HTTP_11;
            match vendor_authority(host, m.port) {
                Some(authority) => {
                    req.headers_mut().insert(http::header::HOST, authority);
                    req.extensions_mut().insert(super::http::cache::HostWritten);
                }
                None => return refuse(ProxyError::BadRequest(format!("host {host:?}"))),
            }
            let policy =
                m.es.policy
                    .as_ref()
                    .unwrap_or(&snapshot.config.outbound.defaults);
            let ctx = route_ctx(proxy, policy, RouteCtx::default_route(), &req);
            req.extensions_mut().insert(ctx);
            return stack::call(stack::backend(dst, &proxy.shared), req);
        }
        // Nothing the registry names: refused under RegistryOnly, and
        // counted either way.
        let named = match &host {
            Some(host) => format!("{host}:{port}"),
            None => target_label(target),
        };
        if !unregistered_may_go(proxy, &snapshot, &named, "http") {
            return refuse(ProxyError::EgressDenied(named));
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
    ctx: RouteCtx,
    req: &mut Request,
) {
    let declared = svc
        .ports
        .iter()
        .find(|p| p.port == port)
        .map(|p| p.protocol);
    *req.version_mut() = upstream_version(declared, req);
    let ctx = route_ctx(proxy, snapshot.policy(&svc), ctx, req);
    req.extensions_mut().insert(ctx);
}

/// `ctx`, marked when the request's path is a health check the breaker
/// and the retries leave alone.
fn route_ctx(proxy: &Proxy, policy: &ServicePolicy, mut ctx: RouteCtx, req: &Request) -> RouteCtx {
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
    ctx
}

/// The host a request to no Service is for, as an ExternalService would
/// claim it ([`normal_host`]): the name an explicit listener maps to, else
/// the request's own (the authority of an HTTP/2 or absolute-form request,
/// else `Host`), without its port. None for an address or what is not a
/// DNS name.
fn vendor_host(target: &Target, req: &Request) -> Option<String> {
    match target {
        Target::Host(h, _) => normal_host(h),
        Target::Addr(_) => match req.uri().host() {
            Some(h) => normal_host(h),
            None => {
                let value = req.headers().get(http::header::HOST)?.to_str().ok()?;
                let authority: http::uri::Authority = value.parse().ok()?;
                normal_host(authority.host())
            }
        },
    }
}

/// The `Host` a request to vendor `host` carries: the name, with the
/// vendor's port unless it is the scheme's own (443 with originated TLS,
/// 80 without).
fn vendor_authority(host: &str, port: &ExternalPortConfig) -> Option<http::HeaderValue> {
    let default = if port.tls.is_some() { 443 } else { 80 };
    let value = if port.target_port == default {
        host.to_owned()
    } else {
        format!("{host}:{}", port.target_port)
    };
    http::HeaderValue::from_str(&value).ok()
}

/// The HTTP version to speak to a Service port: the one its Service
/// declares (`appProtocol`), else the client's. A port declared HTTP/1.1 is
/// served by an HTTP/1.1 server, so an HTTP/2 client's requests reach it as
/// HTTP/1.1 — except gRPC, which exists only over HTTP/2; a port declared
/// HTTP/2 (h2c, gRPC) gets HTTP/2 whatever the client spoke.
pub fn upstream_version(declared: Option<PortProtocol>, req: &Request) -> http::Version {
    let grpc = super::http::deadline::is_grpc(req.headers());
    match declared {
        Some(PortProtocol::Http1) if !grpc => http::Version::HTTP_11,
        Some(PortProtocol::Http2) => http::Version::HTTP_2,
        _ => req.version(),
    }
}

/// TLS the application speaks itself, never terminated here: to a
/// Service or a pod of one, relayed as opaque TCP as before; otherwise
/// its ClientHello's SNI is read, and a name an ExternalService lists on
/// this port as `HTTPS`/`TLS` is passed through to that vendor, while any
/// other goes on as opaque TCP to where it was headed (or is refused under
/// RegistryOnly), counted under the name it asked for.
async fn forward_tls(proxy: &Arc<Proxy>, io: PrefixedIo<TcpStream>, target: &Target) {
    let port = target.port();
    let Some(snapshot) = proxy.store.load() else {
        return forward_tcp(proxy, io, target, None).await;
    };
    if registered(&snapshot, target) {
        return forward_tcp(proxy, io, target, None).await;
    }
    let (hello, io) = match super::detect::read_client_hello(io, proxy.detect_timeout).await {
        Ok(read) => read,
        Err(e) => return tracing::debug!(error = %e, "connection failed before its ClientHello"),
    };
    let sni = match &hello {
        Hello::ClientHello { sni: Some(sni), .. } => normal_host(sni),
        _ => None,
    };
    let Some(sni) = sni else {
        return forward_tcp(proxy, io, target, None).await;
    };
    let Some(m) = snapshot.external_for(&sni, port, ExternalPortProtocol::Tls) else {
        return forward_tcp(proxy, io, target, Some(&sni)).await;
    };
    pass_through(proxy, io, &sni, &m).await;
}

/// Relays a TLS connection for `sni` to the vendor: the ExternalService's
/// fixed addresses, else `sni` resolved, on its target port. Counted per
/// vendor host and outcome.
async fn pass_through(
    proxy: &Arc<Proxy>,
    mut io: PrefixedIo<TcpStream>,
    sni: &str,
    m: &ExternalMatch<'_>,
) {
    let (es, es_port) = (m.es, m.port);
    let named = format!("{sni}:{}", es_port.port);
    // A listed name is its own series; a wildcard's are bounded.
    let dst = if m.exact {
        named
    } else {
        proxy.metrics.bounds.vendor_host(&named)
    };
    let count = |outcome: &'static str| {
        proxy
            .metrics
            .external_tls_connections
            .get_or_create(&ExternalConnLabels {
                dst: dst.clone(),
                outcome,
            })
            .inc();
    };
    let fixed = es
        .endpoints
        .iter()
        .find_map(|e| e.parse::<SocketAddr>().ok());
    let addr = match fixed {
        Some(addr) => Some(addr),
        None => {
            // Absolute: not walked through the pod's search domains.
            let lookup = tokio::net::lookup_host((format!("{sni}."), es_port.target_port));
            match tokio::time::timeout(super::mesh::CONNECT_TIMEOUT, lookup).await {
                Ok(Ok(mut addrs)) => addrs.find(|a| super::destination::usable_answer(a.ip())),
                _ => None,
            }
        }
    };
    let Some(addr) = addr else {
        count("unresolved");
        return tracing::debug!(%dst, "vendor host does not resolve");
    };
    let mut upstream = match connect_tcp(addr).await {
        Ok(upstream) => upstream,
        Err(e) => {
            count("connect-failed");
            return tracing::debug!(%dst, %addr, error = %e, "vendor connect failed");
        }
    };
    count("relayed");
    if let Err(e) =
        super::server::relay_until_idle(&mut io, &mut upstream, super::server::OPAQUE_IDLE_TIMEOUT)
            .await
    {
        tracing::debug!(%dst, error = %e, "passed-through TLS ended");
    }
}

/// Whether a Service, or a published pod of one, is at `target`: its
/// traffic never goes by a name an ExternalService lists.
fn registered(snapshot: &Snapshot, target: &Target) -> bool {
    find(snapshot, target).is_some()
        || matches!(target, Target::Addr(a) if snapshot.by_pod(*a).is_some())
}

/// Counts a call to a destination no Service or ExternalService names
/// (`named`: host and port, else the address) and says whether it may go:
/// yes under egress `AllowAll`, no under `RegistryOnly`.
fn unregistered_may_go(
    proxy: &Proxy,
    snapshot: &Snapshot,
    named: &str,
    protocol: &'static str,
) -> bool {
    let allowed = snapshot.config.outbound.egress == EgressMode::AllowAll;
    proxy
        .metrics
        .egress_unregistered
        .get_or_create(&EgressLabels {
            dst: proxy.metrics.bounds.destination(named),
            protocol,
            action: if allowed { "allowed" } else { "refused" },
        })
        .inc();
    if !allowed {
        tracing::debug!(dst = %named, protocol, "egress refused: nothing registers the destination");
    }
    allowed
}

/// Opaque TCP: pick an endpoint and copy bytes both ways. `sni`: the name
/// a TLS connection asked for, if read.
async fn forward_tcp<I>(proxy: &Arc<Proxy>, mut io: I, target: &Target, sni: Option<&str>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some((addr, mesh)) = resolve_tcp(proxy, target, sni).await else {
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
    sni: Option<&str>,
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
    if let Some(snapshot) = &snapshot {
        let (named, protocol) = match sni {
            Some(host) => (format!("{host}:{}", target.port()), "tls"),
            None => (target_label(target), "tcp"),
        };
        if !unregistered_may_go(proxy, snapshot, &named, protocol) {
            return None;
        }
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
