//! Accepting connections and shutting down gracefully: on shutdown the
//! listeners close (new connections are refused), HTTP connections finish
//! their in-flight requests and close, and the proxy waits for every
//! connection up to the drain timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use prometheus_client::metrics::counter::Counter;

use super::http::errors::{self, ProxyError};
use super::http::{Request, Response, body};

/// Largest HTTP/1 request head accepted; beyond it the client gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Caps the requests one direction of the proxy has waiting for their
/// response, across all its connections. Past the cap a request is answered
/// at once with 503 `weft-proxy-error: overloaded` and counted, instead of
/// queueing: a proxy in front of a stalled service then sheds load rather
/// than holding memory and descriptors for every caller (the count of
/// HTTP/2 streams per connection alone does not bound this).
pub struct InFlight {
    direction: &'static str,
    flag: &'static str,
    slots: Arc<ConnLimit>,
}

impl InFlight {
    /// `flag` names the setting, for the error a shed request gets.
    pub fn new(
        direction: &'static str,
        flag: &'static str,
        limit: usize,
        shed: Counter,
    ) -> Arc<Self> {
        Arc::new(Self {
            direction,
            flag,
            slots: ConnLimit::new(limit, shed),
        })
    }

    /// A place for one more request, or `None` (counted) when all are taken.
    fn enter(&self) -> Option<ConnLimitGuard> {
        self.slots.enter()
    }

    fn overloaded(&self) -> Response {
        errors::response(&ProxyError::Overloaded(format!(
            "{} {} requests are already waiting for a response in this proxy (--{})",
            self.slots.limit, self.direction, self.flag
        )))
    }
}

/// Time limits on one HTTP connection, the same on every listener that
/// serves HTTP.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// How long a client may take to send a request head. hyper also runs
    /// this timer while an HTTP/1 connection waits for its next request, so
    /// it bounds HTTP/1 keep-alive idleness too.
    pub header_read_timeout: Duration,
    /// A connection on which no request started for this long (and none is
    /// waiting for its response) is closed gracefully: HTTP/1 after the
    /// response in flight, HTTP/2 with GOAWAY. Also the HTTP/2 keep-alive
    /// ping interval, so a vanished peer is noticed.
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Caps the connections one listener (or set of listeners) holds open.
/// Past the cap a new connection is closed at once and counted, so a
/// client that opens connections and sends nothing (slowloris) fills at
/// most the cap, for at most the header-read timeout each. ([`InFlight`]
/// counts requests with one too.) With a [`SourceShare`], one source
/// address fills at most its share of the cap.
pub struct ConnLimit {
    limit: usize,
    now: AtomicUsize,
    refused: Counter,
    per_source: Option<SourceShare>,
}

/// The part of a [`ConnLimit`] one source address may hold: connections
/// from an address that holds its share are closed at once and counted,
/// whatever room the cap has left, so one pod that opens connections and
/// sends nothing cannot take every slot from the other callers.
///
/// The table holds an entry only for a source with a connection open (the
/// entry goes when its count drops to zero), so it never has more entries
/// than the cap. One short lock and one hash lookup per accepted
/// connection and one per closed connection; nothing per request.
pub struct SourceShare {
    share: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    refused: Counter,
}

impl SourceShare {
    /// The share of the inbound cap one source address may hold: a
    /// quarter. It must not starve a busy legitimate source, and several
    /// are common: a client keeping an HTTP/1.1 pool of ~100 connections,
    /// an ingress controller's upstream keep-alive pool (ingress-nginx
    /// keeps up to 320 per worker), or many outside clients that reach the
    /// pod through one node address after SNAT. A quarter of the default
    /// cap (4096) is 1024, well above those; and one source, however it
    /// behaves, leaves three quarters of the slots to everyone else. (It
    /// takes four sources to fill the cap; past that, the header-read and
    /// idle timeouts bound how long they hold it.)
    pub fn of(limit: usize) -> usize {
        (limit / 4).max(1)
    }
}

/// Why [`ConnLimit::enter_from`] refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its whole cap.
    AtCap,
    /// This source address holds its whole share of the cap.
    OverSourceShare,
}

impl ConnLimit {
    pub fn new(limit: usize, refused: Counter) -> Arc<Self> {
        Arc::new(Self {
            limit,
            now: AtomicUsize::new(0),
            refused,
            per_source: None,
        })
    }

    /// A cap of which one source address may hold at most
    /// [`SourceShare::of`] the cap; connections refused for that are
    /// counted in `over_share`.
    pub fn with_source_share(limit: usize, refused: Counter, over_share: Counter) -> Arc<Self> {
        Self::with_share(limit, SourceShare::of(limit), refused, over_share)
    }

    /// A cap of which one source address may hold at most `share`.
    pub fn with_share(
        limit: usize,
        share: usize,
        refused: Counter,
        over_share: Counter,
    ) -> Arc<Self> {
        Arc::new(Self {
            limit,
            now: AtomicUsize::new(0),
            refused,
            per_source: Some(SourceShare {
                share: share.max(1),
                held: Mutex::default(),
                refused: over_share,
            }),
        })
    }

    /// A place for one more connection, or `None` (counted) at the cap.
    pub fn enter(self: &Arc<Self>) -> Option<ConnLimitGuard> {
        let entered = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if entered {
            Some(ConnLimitGuard {
                limit: self.clone(),
                source: None,
            })
        } else {
            self.refused.inc();
            None
        }
    }

    /// A place for one more connection from `source`: refused (and counted)
    /// at the cap, or, with a source share, when `source` holds its share.
    /// Without a source share this is [`ConnLimit::enter`].
    pub fn enter_from(self: &Arc<Self>, source: IpAddr) -> Result<ConnLimitGuard, Refusal> {
        // The cap first: a flood past it is refused without taking the lock.
        let mut guard = self.enter().ok_or(Refusal::AtCap)?;
        let Some(per_source) = &self.per_source else {
            return Ok(guard);
        };
        // An IPv4 client of a dual-stack socket is one source either way.
        let source = source.to_canonical();
        {
            let mut held = per_source.held.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(source).or_insert(0);
            if *n >= per_source.share {
                drop(held);
                per_source.refused.inc();
                // Dropping `guard` gives the slot of the cap back.
                return Err(Refusal::OverSourceShare);
            }
            *n += 1;
        }
        guard.source = Some(source);
        Ok(guard)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.now.load(Ordering::Acquire)
    }

    /// The most connections one source may hold, when this cap has a
    /// source share.
    pub fn source_share(&self) -> Option<usize> {
        self.per_source.as_ref().map(|s| s.share)
    }

    /// The source addresses with a connection open now.
    pub fn sources(&self) -> usize {
        self.per_source.as_ref().map_or(0, |s| {
            s.held.lock().unwrap_or_else(|e| e.into_inner()).len()
        })
    }

    fn leave_source(&self, source: IpAddr) {
        let Some(per_source) = &self.per_source else {
            return;
        };
        let mut held = per_source.held.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut n) = held.entry(source) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

/// Held by each connection (or request) counted against a [`ConnLimit`].
pub struct ConnLimitGuard {
    limit: Arc<ConnLimit>,
    /// The source whose share this connection counts against.
    source: Option<IpAddr>,
}

impl Drop for ConnLimitGuard {
    fn drop(&mut self) {
        if let Some(source) = self.source {
            self.limit.leave_source(source);
        }
        self.limit.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requests on one connection, for the idle timeout: the high half counts
/// requests started, the low half those whose handler is still running.
/// One atomic add when a request starts and one when its handler returns.
#[derive(Clone, Default)]
pub struct Activity(Arc<AtomicU64>);

const ACTIVITY_STARTED: u64 = 1 << 32;

impl Activity {
    pub fn enter(&self) -> ActivityGuard {
        self.0.fetch_add(ACTIVITY_STARTED + 1, Ordering::Relaxed);
        ActivityGuard(self.0.clone())
    }

    fn snapshot(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct ActivityGuard(Arc<AtomicU64>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long an opaque (TCP) relay may carry no byte either way before it
/// is closed: an hour, Istio's default for TCP, so a database pool's idle
/// connections live, while a connection nobody uses cannot hold a slot of
/// the connection cap forever.
pub const OPAQUE_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Copies bytes both ways until either side closes, or no byte has moved
/// either way for `idle`. Returns the bytes copied each way, as
/// [`tokio::io::copy_bidirectional`] does, or why it stopped.
pub async fn relay_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let moved = Arc::new(AtomicU64::new(0));
    let mut a = Counted {
        io: a,
        moved: moved.clone(),
    };
    let mut b = Counted {
        io: b,
        moved: moved.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut seen = 0;
    loop {
        tokio::select! {
            r = &mut copy => return r,
            () = tokio::time::sleep(idle) => {
                let now = moved.load(Ordering::Relaxed);
                if now == seen {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no byte either way for {idle:?}"),
                    ));
                }
                seen = now;
            }
        }
    }
}

/// A stream that counts the reads that brought bytes, for
/// [`relay_until_idle`]: one relaxed add per read.
struct Counted<'a, S: ?Sized> {
    io: &'a mut S,
    moved: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Serves one connection with `service` under `limits` until it closes,
/// it idles past the idle timeout, or `stop` fires (then it finishes its
/// in-flight requests and closes). `activity` must be entered by the
/// service for each request. A connection told to close that does not
/// within the header-read timeout (an HTTP/2 peer that never acknowledges
/// GOAWAY) is dropped.
pub async fn serve_limited<I, S, B>(
    io: I,
    limits: &HttpLimits,
    activity: &Activity,
    stop: Option<watch::Receiver<bool>>,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stop = stop;
    let mut seen = activity.snapshot();
    // Until its first request a connection gets the header-read timeout,
    // whatever its protocol: the HTTP/1 timer starts only once the
    // protocol is known, and HTTP/2 has none, so a client that completes
    // its handshake and sends nothing (or half a preface) is closed as
    // soon as one that sends half a request head.
    let mut wait = limits.header_read_timeout.min(limits.idle_timeout);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = async {
                match stop.as_mut() {
                    Some(rx) => stopped(rx).await,
                    None => std::future::pending().await,
                }
            } => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = tokio::time::sleep(wait) => {
                wait = limits.idle_timeout;
                let now = activity.snapshot();
                if now == seen && now & (ACTIVITY_STARTED - 1) == 0 {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(limits.header_read_timeout, conn.as_mut()).await {
                        Ok(r) => break r,
                        Err(_) => return,
                    }
                }
                seen = now;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Serves an axum router (admin, probe and control-plane admin ports) on
/// `listener` until the task ends, each connection under `limits`, with
/// at most `limit` open at once (past it a new one is closed at once and
/// counted), so a client that opens connections and sends nothing cannot
/// take the port from the kubelet, Prometheus or the operator. Handlers see
/// the peer as `ConnectInfo<SocketAddr>`.
pub async fn serve_router(
    listener: TcpListener,
    name: &'static str,
    router: axum::Router,
    limits: HttpLimits,
    limit: Arc<ConnLimit>,
) {
    use tower::ServiceExt;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                back_off_after_accept_error(name, &e).await;
                continue;
            }
        };
        let Some(held) = limit.enter() else {
            tracing::debug!(%peer, listener = name, "connection refused: at the connection cap");
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let activity = Activity::default();
            let active = activity.clone();
            let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                let seen = active.enter();
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let rsp = router.clone().oneshot(req.map(axum::body::Body::new));
                async move {
                    let rsp = rsp.await;
                    drop(seen);
                    rsp
                }
            });
            serve_limited(stream, &limits, &activity, None, service).await;
            drop(held);
        });
    }
}

/// What a listener does when accept fails (out of file descriptors and
/// the like): log, pause, and keep serving, rather than spin or end the
/// server.
pub async fn back_off_after_accept_error(listener: &str, error: &std::io::Error) {
    tracing::warn!(listener, error = %error, "accept failed; retrying in 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Tells connections to wind down, and counts them until they have.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            signal: watch::channel(false).0,
            active: Arc::default(),
            idle: Arc::default(),
        }
    }

    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Starts the shutdown.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    pub fn started(&self) -> bool {
        *self.signal.borrow()
    }

    /// Marks a connection open until the guard drops.
    pub fn track(&self) -> ConnGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until every connection closed or `limit` passed; returns how
    /// many were still open.
    pub async fn wait(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

/// Resolves once the drain has started.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Map the borrow guard away at once: it must not live across an await.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Held by each open connection.
pub struct ConnGuard(Drain);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accepts until shutdown, handing each connection to `handle`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    drain: Drain,
    limit: Arc<ConnLimit>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = drain.watch();
    let handle = Arc::new(handle);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // At the cap, or past the source's share of it, the
                    // connection is closed at once (dropped).
                    let held = match limit.enter_from(peer.ip()) {
                        Ok(held) => held,
                        Err(Refusal::AtCap) => {
                            tracing::debug!(%peer, "connection refused: the listener is at its connection cap");
                            continue;
                        }
                        Err(Refusal::OverSourceShare) => {
                            tracing::debug!(
                                %peer,
                                share = limit.source_share(),
                                "connection refused: this source holds its whole share of the listener's connection cap"
                            );
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let guard = drain.track();
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        handle(stream, peer).await;
                        drop(guard);
                        drop(held);
                    });
                }
                Err(e) => back_off_after_accept_error("proxy", &e).await,
            },
            _ = stopped(&mut stop) => break,
        }
    }
    // Dropping the listener closes the socket: new connections are refused.
}

/// Serves HTTP/1.1 and HTTP/2 on one connection until it closes, idles
/// past the limit, or the drain asks it to finish its in-flight requests
/// and close.
pub async fn serve_http<I, F, Fut>(
    io: I,
    drain: &Drain,
    limits: &HttpLimits,
    in_flight: &Arc<InFlight>,
    handle: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let in_flight = in_flight.clone();
    let activity = Activity::default();
    let active = activity.clone();
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let seen = active.enter();
        // Boxed: hyper spawns a task per HTTP/2 stream around this future
        // and moves it whole more than once on the way; a pointer is
        // cheaper to move than the request path's state.
        let work = match in_flight.enter() {
            Some(entered) => Ok((entered, Box::pin(handle(req.map(body::boxed))))),
            None => Err(in_flight.overloaded()),
        };
        async move {
            let rsp = match work {
                Ok((entered, rsp)) => {
                    let rsp = rsp.await;
                    drop(entered);
                    rsp
                }
                Err(overloaded) => overloaded,
            };
            drop(seen);
            Ok::<_, Infallible>(rsp)
        }
    });
    serve_limited(io, limits, &activity, Some(drain.watch()), service).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An opaque relay nobody sends on ends after the idle timeout; one
    /// that carries a byte now and then does not.
    #[tokio::test]
    async fn an_opaque_relay_ends_only_when_idle() {
        use tokio::io::AsyncWriteExt;
        let idle = Duration::from_millis(200);
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut app) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move { relay_until_idle(&mut a, &mut b, idle).await });
        // Busy for five idle periods: a byte every 50 ms.
        for _ in 0..20 {
            client.write_all(b"x").await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!relay.is_finished(), "a relay that carries bytes goes on");
        let ended = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("ends once idle")
            .expect("task");
        let err = ended.expect_err("timed out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(app.write_all(b"").await);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    /// A source at its share is refused (and counted) while others are
    /// admitted; closing one of its connections admits it again; the table
    /// forgets a source with nothing open, so it holds no more entries
    /// than there are connections however many addresses come and go.
    #[test]
    fn a_source_at_its_share_is_refused_and_forgotten_once_it_holds_nothing() {
        let (refused, over_share) = (Counter::default(), Counter::default());
        let limit = ConnLimit::with_source_share(8, refused.clone(), over_share.clone());
        assert_eq!(limit.source_share(), Some(2));

        let first: Vec<_> = (0..2)
            .map(|_| limit.enter_from(ip("10.0.0.1")).expect("within the share"))
            .collect();
        assert_eq!(
            limit.enter_from(ip("10.0.0.1")).err(),
            Some(Refusal::OverSourceShare)
        );
        // The IPv4 address as a dual-stack socket reports it is the same source.
        assert_eq!(
            limit.enter_from(ip("::ffff:10.0.0.1")).err(),
            Some(Refusal::OverSourceShare)
        );
        assert_eq!(over_share.get(), 2);
        assert_eq!(limit.open(), 2, "a refused connection gives its slot back");
        let other = limit.enter_from(ip("10.0.0.2")).expect("another source");

        drop(first);
        assert_eq!(
            limit.sources(),
            1,
            "a source with nothing open is forgotten"
        );
        let again = limit.enter_from(ip("10.0.0.1")).expect("admitted again");
        drop((other, again));
        assert_eq!((limit.open(), limit.sources()), (0, 0));

        for n in 0..1000u32 {
            let _held = limit
                .enter_from(IpAddr::from(n.to_be_bytes()))
                .expect("one each");
        }
        assert_eq!(limit.sources(), 0, "the table does not grow with churn");
        assert_eq!(refused.get(), 0);
    }

    /// The whole cap still holds across sources: past it a connection is
    /// refused as over the cap, not as over a share.
    #[test]
    fn the_cap_holds_across_sources() {
        let (refused, over_share) = (Counter::default(), Counter::default());
        let limit = ConnLimit::with_source_share(4, refused.clone(), over_share.clone());
        let held: Vec<_> = (1..=4u8)
            .map(|n| {
                limit
                    .enter_from(IpAddr::from([10, 0, 0, n]))
                    .expect("within the cap")
            })
            .collect();
        assert_eq!(limit.enter_from(ip("10.0.0.5")).err(), Some(Refusal::AtCap));
        assert_eq!((refused.get(), over_share.get()), (1, 0));
        drop(held);
        assert_eq!(limit.sources(), 0);
    }

    /// A cap without a source share lets one source hold all of it (the
    /// outbound, admin and probe listeners).
    #[test]
    fn without_a_source_share_one_source_may_hold_the_cap() {
        let limit = ConnLimit::new(3, Counter::default());
        let held: Vec<_> = (0..3)
            .map(|_| limit.enter_from(ip("127.0.0.1")).expect("within the cap"))
            .collect();
        assert_eq!(
            limit.enter_from(ip("127.0.0.1")).err(),
            Some(Refusal::AtCap)
        );
        assert_eq!((held.len(), limit.sources()), (3, 0));
    }
}
