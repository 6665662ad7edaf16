//! Accepting connections and shutting down gracefully: on shutdown the
//! listeners close (new connections are refused), HTTP connections finish
//! their in-flight requests and close, and the proxy waits for every
//! connection up to the drain timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
/// counts requests with one too.)
pub struct ConnLimit {
    limit: usize,
    now: AtomicUsize,
    refused: Counter,
}

impl ConnLimit {
    pub fn new(limit: usize, refused: Counter) -> Arc<Self> {
        Arc::new(Self {
            limit,
            now: AtomicUsize::new(0),
            refused,
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
            Some(ConnLimitGuard(self.clone()))
        } else {
            self.refused.inc();
            None
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.now.load(Ordering::Acquire)
    }
}

/// Held by each connection (or request) counted against a [`ConnLimit`].
pub struct ConnLimitGuard(Arc<ConnLimit>);

impl Drop for ConnLimitGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
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
            _ = tokio::time::sleep(limits.idle_timeout) => {
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
                    // At the cap the connection is closed at once (dropped).
                    let Some(held) = limit.enter() else {
                        tracing::debug!(%peer, "connection refused: the listener is at its connection cap");
                        continue;
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
