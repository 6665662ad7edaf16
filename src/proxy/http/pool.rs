//! The innermost layer: upstream connections, kept per endpoint. The
//! balancer has already chosen the endpoint, so there is no keyed pool to
//! search: each [`Endpoint`] carries its own idle HTTP/1.1 connections and
//! its one multiplexed HTTP/2 connection. Endpoints of meshed destinations
//! get mesh mTLS (`super::super::mesh`); an endpoint's mesh expectation is
//! fixed, so its connections are too. Upstream failures are classified
//! here, where it is still known whether a connection was ever made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use http::header::{self, HeaderName};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::Service;

use crate::proxy::mesh::{MeshStream, MeshTarget, Originator, connect_tcp};
use crate::proxy::origin::OriginTarget;
use crate::proxy::resilience::lock;
use crate::proxy::tls::{ALPN_H2, ALPN_HTTP1};

use super::body::{self, Body, BoxError, Request, Response};
use super::deadline::{self, CallersDeadline, To};
use super::errors::ProxyError;
use super::timeout::Deadline;

/// How long a connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = crate::proxy::mesh::CONNECT_TIMEOUT;
/// Idle HTTP/1.1 connections are closed after this, and never handed to
/// a request once this old. Below the server proxy's own keep-alive limit
/// (its `--header-read-timeout`, 30 s by default, which hyper applies to
/// an idle HTTP/1 connection): a client that kept a mesh connection
/// longer would write a request just as the server closes it, and a POST
/// caught so fails (HTTP/1.1 has no GOAWAY to say which were unseen).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// [`IDLE_TIMEOUT`] for a vendor reached with originated TLS (an
/// ExternalService), whose keep-alive limit is unknown and often short
/// (Node's and Apache's are 5 s): a charge written onto a connection the
/// vendor is closing fails, and a POST is not retried.
const VENDOR_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How often idle connections past [`IDLE_TIMEOUT`] are looked for.
const REAP_EVERY: Duration = Duration::from_secs(10);
/// HTTP/1.1 connections per endpoint past which a request first waits
/// (up to [`HTTP1_CONNECTION_WAIT`]) for one to be handed back rather
/// than open another, and past which idle connections are closed rather
/// than kept. HTTP/1.1 carries one request at a time, so a
/// burst (an upstream that stalls for 20 ms at 4000 requests/s) would
/// otherwise open a connection per request in flight, each holding some
/// 30 KiB of buffers and task state in the proxy, and keep them all
/// idle afterwards: the proxy's memory would follow the worst burst.
/// A soft limit, not Envoy's hard `max_connections`: requests that hold
/// their connection for long (long polls, streamed responses, WebSocket)
/// must not queue behind one another, so past the wait one more opens.
const HTTP1_SOFT_LIMIT: usize = 32;
/// How long a request waits for a connection of a busy endpoint (see
/// [`HTTP1_SOFT_LIMIT`]) before opening one of its own.
const HTTP1_CONNECTION_WAIT: Duration = Duration::from_millis(50);
/// Connections to one endpoint being opened at once past which a request
/// that waited [`HTTP1_CONNECTION_WAIT`] keeps waiting rather than open
/// another (Envoy's `max_connecting`, applied past the soft limit only).
/// A handshake that takes longer than the wait (a vendor's full TLS
/// handshake on a loaded node, a slow SYN) must not make every waiting
/// request start one of its own: at 4000 requests/s that was some 200
/// handshakes per 50 ms, each slowing the others, and the connections
/// then closed as surplus, a storm that fed itself (bench-proxy run M:
/// ~4000 vendor connections in 11 s, p99 +60 ms, 502s). Waiting requests
/// take the connections as they come up instead.
const HTTP1_MAX_CONNECTING: usize = 4;

/// The address a request is sent to, chosen by the balancer, with the
/// connections already open to it.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Set for an endpoint of a meshed destination: speak mesh mTLS.
    pub mesh: Option<Arc<MeshTarget>>,
    /// Set for a vendor's endpoint reached with TLS this proxy originates.
    pub origin: Option<Arc<OriginTarget>>,
    /// How many HTTP/2 connections its requests are spread over (see
    /// [`CLUSTER_IP_H2_CONNECTIONS`]).
    h2_connections: usize,
    conns: Arc<Conns>,
}

/// HTTP/2 connections kept to a Service's ClusterIP, its requests taken
/// in turn. kube-proxy picks a backend pod once per connection, so one
/// connection would send all of this pod's calls to the Service to one
/// backend pod (until [`MAX_H2_AGE`] replaces it); four reach up to four
/// pods at a time. A pod address, or an explicit endpoint, gets one.
pub const CLUSTER_IP_H2_CONNECTIONS: usize = 4;

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("mesh", &self.mesh)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Two endpoints are the same when they name the same address with the
/// same mesh expectation; their open connections are state, not identity.
impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr && self.mesh == other.mesh && self.origin == other.origin
    }
}
impl Eq for Endpoint {}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self::meshed(addr, None)
    }

    pub fn meshed(addr: SocketAddr, mesh: Option<Arc<MeshTarget>>) -> Self {
        Self {
            addr,
            mesh,
            origin: None,
            h2_connections: 1,
            conns: Arc::default(),
        }
    }

    /// Connections to this endpoint are TLS this proxy originates.
    pub fn with_origin(mut self, origin: Option<Arc<OriginTarget>>) -> Self {
        self.origin = origin;
        self
    }

    /// Spreads the endpoint's HTTP/2 requests over `n` connections (at
    /// least one), for an address that stands for several servers.
    pub fn with_h2_connections(mut self, n: usize) -> Self {
        self.h2_connections = n.max(1);
        self
    }
}

/// Marks a response that came over mesh TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverMeshTls(pub bool);

/// An endpoint's open connections.
#[derive(Default)]
struct Conns {
    /// Idle HTTP/1.1 connections, the most recently used last.
    http1: Mutex<Vec<Idle>>,
    /// HTTP/1.1 connections open, for [`HTTP1_SOFT_LIMIT`]. Apart from
    /// `Conns`, since each connection's task holds it: the task must not
    /// keep alive the `Conns` that holds the task's own idle sender.
    http1_count: Arc<Http1Count>,
    /// The multiplexed HTTP/2 connections, once made (one, or up to the
    /// endpoint's `h2_connections`).
    http2: Mutex<Vec<H2Conn>>,
    /// Which HTTP/2 connection the next request takes.
    next_h2: std::sync::atomic::AtomicUsize,
    /// An HTTP/2 connection is being added in the background.
    growing_h2: std::sync::atomic::AtomicBool,
    /// No connection is added before then (the last try failed).
    grow_blocked_until: Mutex<Option<Instant>>,
    /// Held while an HTTP/2 connection is being made, so that the
    /// requests arriving meanwhile share it rather than each making one.
    connecting_h2: tokio::sync::Mutex<()>,
    /// Whether the idle reaper looks after these connections yet.
    registered: std::sync::atomic::AtomicBool,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    made: Http1Made,
    since: Instant,
}

/// What an HTTP/1.1 connection was made as.
#[derive(Clone, Copy)]
struct Http1Made {
    tls: bool,
    /// How long it may sit idle and still be handed a request.
    idle_limit: Duration,
    /// When the connection stops being handed back for new requests: to an
    /// address that stands for several servers (a ClusterIP), after
    /// [`MAX_H2_AGE`], as for HTTP/2, so that a pod's calls keep moving
    /// among the backend pods kube-proxy picks per connection.
    retire_at: Option<Instant>,
}

#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<Body>,
    tls: bool,
    /// Tells this connection from a newer one to the same endpoint.
    id: u64,
    born: Instant,
}

/// New requests stop using an HTTP/2 connection this old; it closes once
/// its streams finish. A Service reached through its ClusterIP is balanced
/// by kube-proxy once per connection, and every request to the endpoint
/// rides this one connection: without a limit, all of a pod's calls to a
/// Service would stay on whichever backend pod its first connection drew.
/// The cost is one mesh handshake per endpoint per minute.
const MAX_H2_AGE: Duration = Duration::from_secs(60);

/// An HTTP/1.1 connection's retirement age, spread between three
/// quarters of `age` and all of it (never longer: `age` is a promise): the
/// connections a burst made together (up to the soft limit at once) then
/// retire apart, rather than all reconnecting in one storm of handshakes
/// every period (which run N of bench-proxy saw as the TLS-origination
/// tail).
fn spread(age: Duration) -> Duration {
    age.mul_f64(0.75 + fastrand::f64() * 0.25)
}

/// How long after a failed try to add an HTTP/2 connection the next may
/// be made.
const GROW_RETRY: Duration = Duration::from_secs(5);

/// Whether a connection made at `born` may take new requests at `now`.
fn young(born: Instant, now: Instant) -> bool {
    now.saturating_duration_since(born) < MAX_H2_AGE
}

/// Numbers HTTP/2 connections, for [`Conns::forget_h2`].
static H2_CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Conns {
    /// An idle connection ready for a request, dropping the ones the
    /// server closed or that idled too long.
    fn take_idle(&self, now: Instant) -> Option<Idle> {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() && now.duration_since(conn.since) < conn.made.idle_limit {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose exchange ended for the next request, or
    /// closes it (dropping its sender) when more than
    /// [`HTTP1_SOFT_LIMIT`] are open: a burst's extra connections go
    /// once it has passed.
    fn put_idle(&self, sender: http1::SendRequest<Body>, made: Http1Made) {
        {
            // Decided by the idle connections, under their lock: while
            // more than the limit are busy, each one handed back goes to
            // the next request (one may be waiting for it), and after a
            // burst the idle ones past the limit close, whatever the
            // count of open ones (which lags, until each closed task ends).
            let now = Instant::now();
            let retired = made.retire_at.is_some_and(|at| now >= at);
            let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < HTTP1_SOFT_LIMIT && !retired {
                idle.push(Idle {
                    sender,
                    made,
                    since: now,
                });
            }
        }
        self.http1_count.freed.notify_one();
    }

    /// Closes idle connections past the idle timeout (by dropping their
    /// senders, which ends their connection tasks).
    fn reap(&self, now: Instant) {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < c.made.idle_limit);
    }

    /// The HTTP/2 connection for the next request, taken in turn among
    /// the open ones that may take new requests, and whether fewer than
    /// `wanted` are open. A closed or old connection is let go here (one
    /// still carrying requests closes once they finish).
    fn h2(&self, wanted: usize) -> (Option<H2Conn>, bool) {
        let now = Instant::now();
        let mut conns = self.http2.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.sender.is_closed() && young(c.born, now));
        let pick = match conns.len() {
            0 => None,
            1 => Some(conns[0].clone()),
            n => {
                use std::sync::atomic::Ordering;
                let turn = self.next_h2.fetch_add(1, Ordering::Relaxed);
                Some(conns[turn % n].clone())
            }
        };
        (pick, conns.len() < wanted)
    }

    fn add_h2(&self, conn: H2Conn, wanted: usize) {
        let mut conns = self.http2.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= wanted {
            conns.remove(0);
        }
        conns.push(conn);
    }

    /// Drops HTTP/2 connection `id` from the cached ones, if still there.
    fn forget_h2(&self, id: u64) {
        let mut conns = self.http2.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.id != id);
    }
}

/// Opens upstream connections and sends requests on them. Cheap to clone.
#[derive(Clone, Default)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    /// Without an originator every endpoint is reached in plaintext.
    originator: Option<Arc<Originator>>,
    /// Endpoints with HTTP/1.1 connections, for the idle reaper.
    registered: Mutex<Vec<Weak<Conns>>>,
    reaper_started: std::sync::atomic::AtomicBool,
    /// The application's ports (inbound), so that connections to the app
    /// are shared by every inbound connection.
    apps: Mutex<HashMap<SocketAddr, Endpoint>>,
    /// [`HTTP1_CONNECTION_WAIT`] unless a test sets another.
    http1_wait: Option<Duration>,
}

impl Pool {
    pub fn new(originator: Option<Arc<Originator>>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                originator,
                ..Default::default()
            }),
        }
    }

    /// A pool whose requests wait `wait` for a busy endpoint's connection
    /// (see [`HTTP1_SOFT_LIMIT`]).
    #[cfg(test)]
    fn with_http1_wait(wait: Duration) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                http1_wait: Some(wait),
                ..Default::default()
            }),
        }
    }

    /// The endpoint of the local application at `addr`, with the
    /// connections every inbound connection shares.
    pub fn app_endpoint(&self, addr: SocketAddr) -> Endpoint {
        let mut apps = self.inner.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.entry(addr)
            .or_insert_with(|| Endpoint::new(addr))
            .clone()
    }

    /// Keeps an endpoint's idle connections under the reaper's eye.
    fn register(&self, conns: &Arc<Conns>) {
        use std::sync::atomic::Ordering;
        if conns.registered.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(conns));
        if !self.inner.reaper_started.swap(true, Ordering::AcqRel) {
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REAP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = inner.upgrade() else { return };
                    let now = Instant::now();
                    let mut registered = inner.registered.lock().unwrap_or_else(|e| e.into_inner());
                    registered.retain(|w| match w.upgrade() {
                        Some(conns) => {
                            conns.reap(now);
                            true
                        }
                        None => false,
                    });
                }
            });
        }
    }

    /// TCP, then mesh TLS when the endpoint is meshed and this proxy has an
    /// identity; a failure is a connect error (the server never saw the
    /// request).
    async fn connect(&self, ep: &Endpoint, alpn: &'static [u8]) -> Result<MeshStream, BoxError> {
        if let Some(origin) = &ep.origin {
            return origin
                .connect(ep.addr)
                .await
                .map_err(|e| ProxyError::Connect(ep.addr.to_string(), error_chain(&e)).into());
        }
        let stream = match (&ep.mesh, &self.inner.originator) {
            (Some(target), Some(originator)) => originator.connect(ep.addr, target, alpn).await,
            _ => connect_tcp(ep.addr).await.map(MeshStream::Plain),
        };
        stream.map_err(|e| ProxyError::Connect(ep.addr.to_string(), error_chain(&e)).into())
    }

    async fn connect_http1(
        &self,
        ep: &Endpoint,
        open: OpenHttp1,
    ) -> Result<(http1::SendRequest<Body>, Http1Made), BoxError> {
        let stream = self.connect(ep, ALPN_HTTP1).await?;
        self.handshake_http1(ep, stream, open).await
    }

    /// An HTTP/1.1 connection on `stream`, counted by `open` until it
    /// closes.
    async fn handshake_http1(
        &self,
        ep: &Endpoint,
        stream: MeshStream,
        open: OpenHttp1,
    ) -> Result<(http1::SendRequest<Body>, Http1Made), BoxError> {
        let made = Http1Made {
            tls: stream.is_tls(),
            idle_limit: if ep.origin.is_some() {
                VENDOR_IDLE_TIMEOUT
            } else {
                IDLE_TIMEOUT
            },
            retire_at: if ep.origin.as_ref().is_some_and(|o| o.presents_certificate()) {
                // A connection authenticated with a client certificate is
                // reused for a bounded time: a renewed or withdrawn
                // certificate reaches the vendor on the next one.
                Some(Instant::now() + spread(super::super::origin::CREDENTIAL_MAX_CONNECTION_AGE))
            } else {
                (ep.h2_connections > 1).then(|| Instant::now() + spread(MAX_H2_AGE))
            },
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Connect(ep.addr.to_string(), error_chain(&e)))?;
        drive(ep.addr, "HTTP/1.1", async move {
            let _open = open;
            conn.await
        });
        self.register(&ep.conns);
        Ok((sender, made))
    }

    /// The endpoint's HTTP/2 connection, made on first use and again when
    /// the server closed it.
    async fn http2(&self, ep: &Endpoint) -> Result<H2Conn, BoxError> {
        let wanted = ep.h2_connections;
        if let (Some(conn), more) = ep.conns.h2(wanted) {
            if more {
                self.grow_h2(ep, conn.tls);
            }
            return Ok(conn);
        }
        let _making = ep.conns.connecting_h2.lock().await;
        if let (Some(conn), _) = ep.conns.h2(wanted) {
            return Ok(conn);
        }
        let stream = self.connect(ep, ALPN_H2).await?;
        let conn = handshake_http2(ep.addr, stream).await?;
        ep.conns.add_h2(conn.clone(), wanted);
        Ok(conn)
    }

    /// Adds one more HTTP/2 connection to `ep` in the background, so the
    /// request that noticed the room does not wait for a handshake. Only
    /// a connection of the same kind (`tls`) as the open ones is kept; a
    /// failed or different one holds further tries off for
    /// [`GROW_RETRY`].
    fn grow_h2(&self, ep: &Endpoint, tls: bool) {
        use std::sync::atomic::Ordering;
        let conns = &ep.conns;
        let blocked = lock(&conns.grow_blocked_until).is_some_and(|t| Instant::now() < t);
        if blocked || conns.growing_h2.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, ep) = (self.clone(), ep.clone());
        tokio::spawn(async move {
            let grown = match pool.connect(&ep, ALPN_H2).await {
                Ok(stream) if stream.is_tls() == tls => handshake_http2(ep.addr, stream).await.ok(),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(addr = %ep.addr, error = %e, "another HTTP/2 connection failed");
                    None
                }
            };
            match grown {
                Some(conn) => ep.conns.add_h2(conn, ep.h2_connections),
                None => *lock(&ep.conns.grow_blocked_until) = Some(Instant::now() + GROW_RETRY),
            }
            ep.conns.growing_h2.store(false, Ordering::Release);
        });
    }

    /// One HTTP/1.1 request (in the form it goes in) to `ep`.
    ///
    /// To a meshed endpoint too, on pooled mesh TLS connections (ALPN
    /// `weft/http1`), as Istio's sidecars do by default, rather than
    /// upgraded to HTTP/2 as Linkerd's are (and weft's were): measured side
    /// by side on one machine (bench/proxy), carrying HTTP/1.1 as HTTP/2
    /// cost the two proxies of a hop ~20 % more CPU per request and ~60 µs
    /// more at the median, in HTTP/2 framing and the connection tasks'
    /// hand-offs, while a pooled connection's TLS handshake is paid once
    /// for thousands of requests. What a burst costs instead: up to
    /// [`HTTP1_SOFT_LIMIT`] connections (handshakes) per endpoint at once,
    /// then a wait for one to be handed back, as for plaintext.
    ///
    /// Its future is what a request in flight to a plaintext endpoint
    /// holds, so it is kept small: the request is owned once (not also as
    /// the `Forward` it came as), and the rare new connection (a TCP
    /// connect, a TLS handshake) is boxed apart, not held inline by every
    /// request as large as its largest step.
    async fn send_http1(self, ep: Endpoint, mut req: Request) -> Result<Response, BoxError> {
        // A pooled connection that the server closed meanwhile hands the
        // request back unsent: it goes once more, on a new connection.
        let mut reuse = true;
        loop {
            let slot = if reuse {
                // Usually a connection is at hand; the wait for one (a
                // timer and a place in the queue) is boxed apart.
                match ready_http1_slot(&ep) {
                    Some(slot) => slot,
                    None => Box::pin(self.http1_slot(&ep)).await,
                }
            } else {
                Http1Slot::New(OpenHttp1::new(&ep.conns), Connecting::new(&ep.conns))
            };
            let reused = matches!(slot, Http1Slot::Idle(_));
            let (sender, made) = match slot {
                Http1Slot::Idle(idle) => (idle.sender, idle.made),
                Http1Slot::New(open, connecting) => {
                    let made = Box::pin(self.connect_http1(&ep, open)).await;
                    drop(connecting);
                    made?
                }
            };
            stamp_deadline(&ep, &mut req);
            match send_on_http1(&ep, sender, made, req).await {
                Ok(rsp) => return Ok(rsp),
                Err(SendFailure::Unsent(unsent)) if reused => {
                    req = *unsent;
                    reuse = false;
                }
                Err(failure) => return Err(failure.into_error(ep.addr)),
            }
        }
    }

    /// An idle HTTP/1.1 connection to `ep`, or the count of a new one to
    /// open: at once below [`HTTP1_SOFT_LIMIT`] connections open or being
    /// opened, else once [`HTTP1_CONNECTION_WAIT`] passed with none
    /// handed back and fewer than [`HTTP1_MAX_CONNECTING`] being opened
    /// (looked at again each time a connection comes up or is handed
    /// back, and at least every wait). ([`ready_http1_slot`] is the look
    /// without a wait.)
    async fn http1_slot(&self, ep: &Endpoint) -> Http1Slot {
        let wait = self.inner.http1_wait.unwrap_or(HTTP1_CONNECTION_WAIT);
        let mut deadline = tokio::time::Instant::now() + wait;
        let mut waited = false;
        loop {
            // Listening before looking, so a connection handed back in
            // between is not missed.
            let freed = ep.conns.http1_count.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(idle) = ep.conns.take_idle(Instant::now()) {
                return Http1Slot::Idle(idle);
            }
            if let Some(open) = OpenHttp1::below_limit(&ep.conns) {
                return Http1Slot::New(open, Connecting::new(&ep.conns));
            }
            if waited {
                if let Some(connecting) = Connecting::below_limit(&ep.conns) {
                    return Http1Slot::New(OpenHttp1::new(&ep.conns), connecting);
                }
                deadline = tokio::time::Instant::now() + wait;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                waited = true;
            }
        }
    }

    async fn send_http2(&self, ep: Endpoint, parts: Forward) -> Result<Response, BoxError> {
        let mut req = parts.into_http2(ep.addr)?;
        let mut fresh = false;
        loop {
            let conn = self.http2(&ep).await?;
            stamp_deadline(&ep, &mut req);
            match send_on_http2(&ep, conn, req).await {
                Ok(rsp) => return Ok(rsp),
                // The cached connection was closing (GOAWAY, the server
                // proxy draining): the request was not sent, so it goes
                // once more on a new connection, whatever its method.
                Err(SendFailure::Unsent(unsent)) if !fresh => {
                    req = *unsent;
                    fresh = true;
                }
                Err(failure) => return Err(failure.into_error(ep.addr)),
            }
        }
    }
}

/// The header with which earlier weft client proxies marked HTTP/1.1
/// requests they carried to another proxy as HTTP/2 (today HTTP/1.1 stays
/// HTTP/1.1 between proxies). A server proxy still honours it, so that
/// during an upgrade of the mesh an older client's requests reach the app
/// as HTTP/1.1: it removes the marker and speaks HTTP/1.1 to the app. It
/// is only ever a proxy's to add: the client proxy removes it from what an
/// app sends.
pub static ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("weft-orig-proto");
pub const ORIG_PROTO_HTTP1: &str = "HTTP/1.1";

/// Why a request on a pooled connection got no response.
enum SendFailure {
    /// The connection closed before the request went: it may go again.
    Unsent(Box<Request>),
    /// The request went and the connection failed: the server may have
    /// seen it.
    Reset(hyper::Error),
}

impl SendFailure {
    fn into_error(self, addr: SocketAddr) -> BoxError {
        match self {
            // Nothing was sent on a connection that was closed under it:
            // to the retry layer, a connection that could not be used.
            SendFailure::Unsent(_) => ProxyError::Connect(
                addr.to_string(),
                "the connection closed before the request was sent".into(),
            )
            .into(),
            SendFailure::Reset(e) => reset(addr, &e),
        }
    }
}

/// An idle HTTP/1.1 connection to `ep`, or the count of a new one when
/// fewer than [`HTTP1_SOFT_LIMIT`] are open; None when the request must
/// wait ([`Pool::http1_slot`], which looks again once it listens).
fn ready_http1_slot(ep: &Endpoint) -> Option<Http1Slot> {
    if let Some(idle) = ep.conns.take_idle(Instant::now()) {
        return Some(Http1Slot::Idle(idle));
    }
    OpenHttp1::below_limit(&ep.conns).map(|open| Http1Slot::New(open, Connecting::new(&ep.conns)))
}

/// One request on one HTTP/1.1 connection. The request is handed to the
/// connection here, before the future is made, so the future does not
/// hold a second copy of it.
fn send_on_http1(
    ep: &Endpoint,
    mut sender: http1::SendRequest<Body>,
    made: Http1Made,
    req: Request,
) -> impl std::future::Future<Output = Result<Response, SendFailure>> + Send + 'static {
    let sent = sender.try_send_request(req);
    let conns = ep.conns.clone();
    async move {
        match sent.await {
            Ok(rsp) => Ok(finish(rsp, made.tls, move |rsp| {
                body::boxed(Checkin {
                    body: rsp,
                    back: Some((sender, made, conns)),
                    done: false,
                })
            })),
            Err(mut e) => match e.take_message() {
                Some(unsent) => Err(SendFailure::Unsent(Box::new(unsent))),
                None => Err(SendFailure::Reset(e.into_error())),
            },
        }
    }
}

/// One request on the endpoint's HTTP/2 connection. A connection that
/// turns out closed, or closes before the request is written, hands it back
/// unsent and is forgotten, so the next request makes a new one.
async fn send_on_http2(ep: &Endpoint, conn: H2Conn, req: Request) -> Result<Response, SendFailure> {
    let H2Conn {
        mut sender,
        tls,
        id,
        ..
    } = conn;
    if sender.ready().await.is_err() {
        ep.conns.forget_h2(id);
        return Err(SendFailure::Unsent(Box::new(req)));
    }
    match sender.try_send_request(req).await {
        Ok(rsp) => Ok(finish(rsp, tls, body::boxed)),
        Err(mut e) => match e.take_message() {
            Some(unsent) => {
                ep.conns.forget_h2(id);
                Err(SendFailure::Unsent(Box::new(unsent)))
            }
            None => Err(SendFailure::Reset(e.into_error())),
        },
    }
}

/// An HTTP/2 client connection on `stream`, its I/O driven by a task.
async fn handshake_http2(addr: SocketAddr, stream: MeshStream) -> Result<H2Conn, BoxError> {
    let tls = stream.is_tls();
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::Connect(addr.to_string(), error_chain(&e)))?;
    drive(addr, "HTTP/2", conn);
    Ok(H2Conn {
        sender,
        tls,
        id: H2_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        born: Instant::now(),
    })
}

/// Where an HTTP/1.1 request goes: a pooled connection, or a new one.
enum Http1Slot {
    Idle(Idle),
    New(OpenHttp1, Connecting),
}

/// The HTTP/1.1 connections of an endpoint, counted for
/// [`HTTP1_SOFT_LIMIT`].
#[derive(Default)]
struct Http1Count {
    /// Open or being opened.
    open: std::sync::atomic::AtomicUsize,
    /// Being opened (connect and handshakes), for
    /// [`HTTP1_MAX_CONNECTING`].
    connecting: std::sync::atomic::AtomicUsize,
    /// Told when a connection is handed back or closes.
    freed: tokio::sync::Notify,
}

/// One of an endpoint's [`Http1Count`]s, held for one connection until
/// dropped, which tells a waiting request ([`Http1Count::freed`]).
struct Counted {
    count: Arc<Http1Count>,
    of: fn(&Http1Count) -> &std::sync::atomic::AtomicUsize,
    /// Tell every waiting request when dropped, not one: a connection
    /// coming up is news for those past their wait, whichever they are
    /// (one told at random may be inside its wait and look away).
    wake_all: bool,
}

impl Counted {
    fn new(conns: &Conns, of: fn(&Http1Count) -> &std::sync::atomic::AtomicUsize) -> Self {
        let count = conns.http1_count.clone();
        of(&count).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            count,
            of,
            wake_all: false,
        }
    }

    /// Counted only while fewer than `limit` are.
    fn below(
        conns: &Conns,
        of: fn(&Http1Count) -> &std::sync::atomic::AtomicUsize,
        limit: usize,
    ) -> Option<Self> {
        let count = conns.http1_count.clone();
        of(&count)
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| (n < limit).then_some(n + 1),
            )
            .ok()
            .map(|_| Self {
                count,
                of,
                wake_all: false,
            })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.of)(&self.count).fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if self.wake_all {
            self.count.freed.notify_waiters();
        } else {
            self.count.freed.notify_one();
        }
    }
}

/// An HTTP/1.1 connection being opened or open, counted from before the
/// connect until its task ends (or the connect fails), so a burst's
/// requests see each other's connections before any is made.
struct OpenHttp1 {
    _counted: Counted,
}

impl OpenHttp1 {
    fn new(conns: &Conns) -> Self {
        Self {
            _counted: Counted::new(conns, |c| &c.open),
        }
    }

    /// Counted only while fewer than [`HTTP1_SOFT_LIMIT`] are.
    fn below_limit(conns: &Conns) -> Option<Self> {
        Counted::below(conns, |c| &c.open, HTTP1_SOFT_LIMIT).map(|c| Self { _counted: c })
    }
}

/// An HTTP/1.1 connection being opened (TCP, TLS, HTTP/1.1 handshake),
/// counted for [`HTTP1_MAX_CONNECTING`] until it is up or failed: a
/// request waiting for a connection may then open one, if it waited long
/// enough (the new connection goes to the request that made it).
struct Connecting {
    _counted: Counted,
}

impl Connecting {
    fn new(conns: &Conns) -> Self {
        let mut counted = Counted::new(conns, |c| &c.connecting);
        counted.wake_all = true;
        Self { _counted: counted }
    }

    /// Counted only while fewer than [`HTTP1_MAX_CONNECTING`] are.
    fn below_limit(conns: &Conns) -> Option<Self> {
        Counted::below(conns, |c| &c.connecting, HTTP1_MAX_CONNECTING).map(|mut c| {
            c.wake_all = true;
            Self { _counted: c }
        })
    }
}

/// Runs a connection's I/O as a task of its own until it closes.
fn drive<C>(addr: SocketAddr, version: &'static str, conn: C)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, version, error = %e, "upstream connection ended");
        }
    });
}

fn reset(addr: SocketAddr, e: &hyper::Error) -> BoxError {
    // REFUSED_STREAM promises the stream was not processed (RFC 9113
    // §8.7): to the retry layer that is a connection that could not be
    // used, safe to send again whatever the method. A GOAWAY is not: the
    // same error reaches streams the server may have processed.
    let refused = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h2| h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM));
    if refused {
        return ProxyError::Connect(
            addr.to_string(),
            format!("refused the stream unprocessed: {}", error_chain(e)),
        )
        .into();
    }
    ProxyError::UpstreamReset(addr.to_string(), error_chain(e)).into()
}

fn finish(
    rsp: http::Response<Incoming>,
    tls: bool,
    wrap: impl FnOnce(Incoming) -> Body,
) -> Response {
    let mut rsp = rsp.map(wrap);
    strip_response_hop_by_hop(rsp.headers_mut());
    rsp.extensions_mut().insert(OverMeshTls(tls));
    rsp
}

pin_project_lite::pin_project! {
    /// An HTTP/1.1 response body that hands its connection back to the
    /// endpoint once the body was read to its end (a body dropped early
    /// takes the connection with it: its remaining bytes were never read).
    struct Checkin {
        #[pin]
        body: Incoming,
        back: Option<(http1::SendRequest<Body>, Http1Made, Arc<Conns>)>,
        done: bool,
    }

    impl PinnedDrop for Checkin {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !(*this.done || this.body.is_end_stream()) {
                return;
            }
            let Some((mut sender, made, conns)) = this.back.take() else { return };
            if sender.is_ready() {
                conns.put_idle(sender, made);
            } else if !sender.is_closed() {
                // The connection task has not seen the end of the
                // exchange yet: hand it back once it has.
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        conns.put_idle(sender, made);
                    }
                });
            }
        }
    }
}

impl http_body::Body for Checkin {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            *this.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
/// The last two concern requests only.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

/// Removes the hop-by-hop headers, and those the Connection header names.
/// A request going out as HTTP/2 keeps `te: trailers`, the one TE value
/// HTTP/2 allows (RFC 9113 §8.2.2), which gRPC servers expect.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, http2: bool) {
    strip(headers, &HOP_BY_HOP, http2);
}

/// The same for a response: an HTTP/1.1 upstream's `Connection: close` or
/// `Keep-Alive: timeout=5` describes its connection to this proxy, not the
/// client's, and must not close or reshape the client's connection.
fn strip_response_hop_by_hop(headers: &mut http::HeaderMap) {
    strip(headers, &HOP_BY_HOP[..5], false);
}

/// Removes the headers the Connection header names, and Connection itself.
/// The inbound proxy does this before it adds `weft-client-id`, so that a
/// client's `Connection: weft-client-id` cannot strip the header the proxy
/// wrote (the rest of the hop-by-hop headers go when the request is sent).
pub(crate) fn strip_connection_listed(headers: &mut http::HeaderMap) {
    strip(headers, &HOP_BY_HOP[..1], false);
}

fn strip(headers: &mut http::HeaderMap, hop_by_hop: &[HeaderName], http2: bool) {
    // Most messages carry none of them: one pass over the names says so,
    // cheaper than hashing each of the seven.
    if !headers.keys().any(|name| hop_by_hop.contains(name)) {
        return;
    }
    let keep_te = http2
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Every Connection line counts, not only the first. `close` and
    // `keep-alive`, by far the most common, name no other header: nothing
    // to collect for them.
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| {
            !(h.is_empty()
                || h.eq_ignore_ascii_case("close")
                || h.eq_ignore_ascii_case("keep-alive"))
        })
        .map(str::to_ascii_lowercase)
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in hop_by_hop {
        headers.remove(name);
    }
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
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
        // The request keeps the authority its client used (HTTP/1.1 in
        // Host, HTTP/2 in `:authority`, which an HTTP/2 client's request
        // gets in Host here); the connection goes to the endpoint the
        // balancer chose.
        if !req.headers().contains_key(header::HOST)
            && let Some(host) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        let http2 = req.version() == Version::HTTP_2;
        strip_hop_by_hop(req.headers_mut(), http2);
        // The marker is a proxy's (see `ORIG_PROTO_HEADER`), never a
        // client's to pass on: a server proxy would act on it.
        req.headers_mut().remove(&ORIG_PROTO_HEADER);
        let parts = Forward(req);
        let pool = self.clone();
        // One box per kind: a future holding both would be as large as the
        // larger, and that size is copied on every request. A meshed
        // endpoint gets the version its client spoke too, inside mesh TLS
        // (see `send_http1`).
        if http2 {
            Box::pin(async move { pool.send_http2(endpoint, parts).await })
        } else {
            match parts.into_http1() {
                Ok(req) => Box::pin(pool.send_http1(endpoint, req)),
                Err(e) => Box::pin(async move { Err(e) }),
            }
        }
    }
}

/// A request on its way upstream, its URI still to be put in the form the
/// HTTP version it goes in wants.
struct Forward(Request);

impl Forward {
    fn path(&self) -> PathAndQuery {
        self.0
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    }

    /// HTTP/1.1 to an origin server: origin-form, the host in Host.
    fn into_http1(self) -> Result<Request, BoxError> {
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(self.path());
        self.with_uri(parts, Version::HTTP_11)
    }

    /// HTTP/2 takes `:scheme` and `:authority` from an absolute URI: the
    /// authority the client used (its URI's, else its Host), else the
    /// endpoint's address.
    fn into_http2(self, addr: SocketAddr) -> Result<Request, BoxError> {
        let used = self.0.uri().authority().cloned().or_else(|| {
            self.0
                .headers()
                .get(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        });
        let authority = match used {
            Some(a) => a,
            None => Authority::try_from(addr.to_string().as_str())
                .map_err(|e| ProxyError::BadRequest(format!("{addr}: {e}")))?,
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = Some(self.path());
        self.with_uri(parts, Version::HTTP_2)
    }

    fn with_uri(self, parts: http::uri::Parts, version: Version) -> Result<Request, BoxError> {
        let mut req = self.0;
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|e| ProxyError::BadRequest(format!("cannot forward {}: {e}", req.uri())))?;
        *req.version_mut() = version;
        Ok(req)
    }
}

/// Tells the next hop the time the try has left (see `deadline`), as the
/// request is written on a connection, after any wait for one: a sidecar
/// in `weft-timeout`, a gRPC server in the `grpc-timeout` its caller set;
/// nothing `weft-*` leaves the mesh. (A request to the pod's own
/// application carries no [`Deadline`]: the inbound side tells it.)
fn stamp_deadline(ep: &Endpoint, req: &mut Request) {
    let Some(&Deadline(until)) = req.extensions().get::<Deadline>() else {
        return;
    };
    let callers = req.extensions().get::<CallersDeadline>().map(|c| c.0);
    let to = if ep.mesh.is_some() {
        To::MeshPeer
    } else {
        To::Outside
    };
    let now = tokio::time::Instant::now();
    deadline::stamp(
        req.headers_mut(),
        Some(until),
        callers,
        to,
        now,
        std::time::SystemTime::now(),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold(http::HeaderMap::new(), |mut m, (k, v)| {
                m.append(k, v);
                m
            })
    }

    fn names(h: &http::HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn an_http2_connection_past_its_age_takes_no_new_requests() {
        let born = Instant::now();
        assert!(young(born, born + MAX_H2_AGE - Duration::from_millis(1)));
        assert!(!young(born, born + MAX_H2_AGE));
        // A clock read before `born` (another thread's) is not an age.
        assert!(young(born + Duration::from_secs(1), born));
    }

    /// An HTTP/1.1 connection to a ClusterIP is not handed back for new
    /// requests once it is past its age (kube-proxy picks anew on the next
    /// one); one to a pod is, however old.
    #[tokio::test]
    async fn an_http1_connection_past_its_retirement_is_not_pooled_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let conns = Conns::default();
        let now = Instant::now();
        for (retire_at, pooled) in [
            (None, 1),
            (Some(now + Duration::from_secs(30)), 2),
            (Some(now - Duration::from_millis(1)), 2),
        ] {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (sender, conn) = http1::handshake::<_, Body>(TokioIo::new(tcp))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            conns.put_idle(
                sender,
                Http1Made {
                    tls: false,
                    idle_limit: IDLE_TIMEOUT,
                    retire_at,
                },
            );
            assert_eq!(
                conns.http1.lock().expect("idle").len(),
                pooled,
                "{retire_at:?}"
            );
        }
    }

    /// Retirement ages are spread over the last quarter, not all alike.
    #[test]
    fn retirement_ages_are_spread() {
        let ages: Vec<Duration> = (0..200).map(|_| spread(Duration::from_secs(40))).collect();
        assert!(
            ages.iter()
                .all(|a| (Duration::from_secs(30)..=Duration::from_secs(40)).contains(a))
        );
        let (min, max) = (ages.iter().min(), ages.iter().max());
        assert!(
            max.zip(min)
                .is_some_and(|(max, min)| *max - *min > Duration::from_secs(5)),
            "{min:?}..{max:?}"
        );
    }

    #[test]
    fn every_connection_line_names_hop_by_hop_headers() {
        let mut h = headers(&[
            ("connection", "x-one"),
            ("connection", "X-Two, keep-alive"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("x-kept", "3"),
            ("keep-alive", "timeout=5"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-kept"]);
    }

    #[test]
    fn a_response_loses_its_upstream_connection_headers_but_keeps_trailer() {
        let mut h = headers(&[
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("trailer", "grpc-status"),
            ("content-type", "text/plain"),
        ]);
        strip_response_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "trailer"]);
    }

    /// An HTTP/1.1 upstream for the soft-limit tests: it counts the
    /// connections it accepted and the requests it read, and answers one
    /// request per permit added to the returned semaphore.
    async fn gated_upstream() -> (
        SocketAddr,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<tokio::sync::Semaphore>,
        tokio::task::JoinHandle<()>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let read = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(tokio::sync::Semaphore::new(0));
        let server = {
            let (accepted, read, answers) = (accepted.clone(), read.clone(), answers.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (read, answers) = (read.clone(), answers.clone());
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        loop {
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => read.fetch_add(1, Ordering::SeqCst),
                            };
                            let Ok(permit) = answers.acquire().await else {
                                return;
                            };
                            permit.forget();
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        (addr, accepted, read, answers, server)
    }

    /// `n` GETs to `ep` at once, each in a task of its own that reads
    /// the response to its end (which hands the connection back), giving
    /// the status.
    fn burst(
        pool: &Pool,
        ep: &Endpoint,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<http::StatusCode, BoxError>>> {
        (0..n)
            .map(|_| {
                let mut req = http::Request::get(format!("http://{}/", ep.addr))
                    .body(body::empty())
                    .expect("request");
                req.extensions_mut().insert(ep.clone());
                let call = super::super::call(pool.clone(), req);
                tokio::spawn(async move {
                    let rsp = call.await?;
                    let status = rsp.status();
                    http_body_util::BodyExt::collect(rsp.into_body()).await?;
                    Ok(status)
                })
            })
            .collect()
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let wait = async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("never: {what}"));
    }

    async fn all_ok(requests: Vec<tokio::task::JoinHandle<Result<http::StatusCode, BoxError>>>) {
        for r in requests {
            assert_eq!(r.await.expect("task").expect("response"), 200);
        }
    }

    /// Past [`HTTP1_SOFT_LIMIT`] requests in flight to one endpoint, the
    /// next requests wait for a connection and take the ones handed back,
    /// with no new connection, while the endpoint stays busy; afterwards
    /// the limit's worth stays idle for the next burst.
    #[tokio::test]
    async fn past_the_soft_limit_requests_take_the_connections_handed_back() {
        use std::sync::atomic::Ordering;
        const BURST: usize = HTTP1_SOFT_LIMIT + 8;
        let (addr, accepted, read, answers, server) = gated_upstream().await;
        let pool = Pool::with_http1_wait(Duration::from_secs(30));
        let ep = pool.app_endpoint(addr);
        let requests = burst(&pool, &ep, BURST);
        eventually("the limit's connections open", || {
            read.load(Ordering::SeqCst) == HTTP1_SOFT_LIMIT
        })
        .await;
        // Eight answers: their connections go to the eight waiting
        // requests, and the endpoint is as busy as before.
        answers.add_permits(8);
        eventually("the waiting requests are sent", || {
            read.load(Ordering::SeqCst) == BURST
        })
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), HTTP1_SOFT_LIMIT);
        answers.add_permits(BURST);
        all_ok(requests).await;
        eventually("the connections wait idle", || {
            lock(&ep.conns.http1).len() == HTTP1_SOFT_LIMIT
        })
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), HTTP1_SOFT_LIMIT);
        server.abort();
    }

    /// The limit is soft: requests that find every connection held open
    /// (long polls) wait [`HTTP1_CONNECTION_WAIT`], then open their own
    /// (the 33rd connection no sooner); once the burst has passed, the
    /// extra connections close and the limit's worth stays idle.
    #[tokio::test]
    async fn a_burst_past_the_soft_limit_waits_then_opens_and_the_extras_close() {
        use std::sync::atomic::Ordering;
        const BURST: usize = HTTP1_SOFT_LIMIT + 8;
        let (addr, accepted, read, answers, server) = gated_upstream().await;
        let pool = Pool::default();
        let ep = pool.app_endpoint(addr);
        let started = Instant::now();
        let mut requests = burst(&pool, &ep, BURST);
        eventually("every request opens a connection in the end", || {
            accepted.load(Ordering::SeqCst) == BURST
        })
        .await;
        assert!(
            started.elapsed() >= HTTP1_CONNECTION_WAIT,
            "all {BURST} connections opened within {:?}, before the wait",
            started.elapsed()
        );
        // Still past the limit, one answer: its connection is kept for
        // the next request, not closed (which would make every request
        // wait and connect while the endpoint stays busy).
        answers.add_permits(1);
        eventually("one answer read", || lock(&ep.conns.http1).len() == 1).await;
        requests.extend(burst(&pool, &ep, 1));
        eventually("the next request sent", || {
            read.load(Ordering::SeqCst) == BURST + 1
        })
        .await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            BURST,
            "on the connection handed back"
        );
        answers.add_permits(BURST);
        all_ok(requests).await;
        let open = || ep.conns.http1_count.open.load(Ordering::SeqCst);
        eventually("the extra connections close", || open() == HTTP1_SOFT_LIMIT).await;
        assert_eq!(lock(&ep.conns.http1).len(), HTTP1_SOFT_LIMIT);
        server.abort();
    }
}
