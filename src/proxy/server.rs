//! Accepting connections and shutting down gracefully: on shutdown the
//! listeners close (new connections are refused), HTTP connections finish
//! their in-flight requests and close, and the proxy waits for every
//! connection up to the drain timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    limit: usize,
    now: AtomicUsize,
    shed: Counter,
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
            limit,
            now: AtomicUsize::new(0),
            shed,
        })
    }

    /// A place for one more request, or `None` when all are taken.
    fn enter(self: &Arc<Self>) -> Option<InFlightGuard> {
        let entered = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if entered {
            Some(InFlightGuard(self.clone()))
        } else {
            self.shed.inc();
            None
        }
    }

    fn overloaded(&self) -> Response {
        errors::response(&ProxyError::Overloaded(format!(
            "{} {} requests are already waiting for a response in this proxy (--{})",
            self.limit, self.direction, self.flag
        )))
    }
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
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
pub async fn accept_loop<F, Fut>(listener: TcpListener, drain: Drain, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = drain.watch();
    let handle = Arc::new(handle);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let guard = drain.track();
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        handle(stream, peer).await;
                        drop(guard);
                    });
                }
                Err(e) => back_off_after_accept_error("proxy", &e).await,
            },
            _ = stopped(&mut stop) => break,
        }
    }
    // Dropping the listener closes the socket: new connections are refused.
}

/// Serves HTTP/1.1 and HTTP/2 on one connection until it closes or the
/// drain asks it to finish its in-flight requests and close.
pub async fn serve_http<I, F, Fut>(io: I, drain: &Drain, in_flight: &Arc<InFlight>, handle: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES)
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .timer(hyper_util::rt::TokioTimer::new());
    let in_flight = in_flight.clone();
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
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
            Ok::<_, Infallible>(rsp)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stop = drain.watch();
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}
