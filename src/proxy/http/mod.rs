//! The HTTP data path. Each file is one layer; read them in this order,
//! which is the order a request passes through them:
//!
//! `route` (match and weighted split) -> per backend: `cache` -> `metrics` ->
//! `timeout` -> `retry` (budget) -> `breaker` + `ratelimit` -> `balance`
//! (P2C peak-EWMA over endpoints) -> `pool` (pooled upstream connections).
//!
//! Errors the proxy makes travel boxed through the stack as [`ProxyError`]
//! and are turned into HTTP responses once, at the edge (`errors`).

pub mod balance;
pub mod body;
pub mod breaker;
pub mod cache;
pub mod deadline;
pub mod errors;
pub mod metrics;
pub mod pool;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod timeout;

pub use body::{Body, BoxError, Request, Response};
pub use errors::ProxyError;

use std::sync::Arc;

use super::destination::Destination;
use super::metrics::ProxyMetrics;

/// The future every service of the stack answers with.
pub type Answer = futures_util::future::BoxFuture<'static, Result<Response, BoxError>>;

/// What a layer may wrap: a cloneable service of the stack's types, whose
/// future is already boxed (so a layer passes it on as it is, rather than
/// boxing a box).
pub trait Inner:
    tower::Service<Request, Response = Response, Error = BoxError, Future = Answer>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: tower::Service<Request, Response = Response, Error = BoxError, Future = Answer>
        + Clone
        + Send
        + 'static
{
}

/// The tower plumbing every wrapping layer shares: readiness is the inner
/// service's, and the layer's own `handle` makes the boxed future.
macro_rules! layer_service {
    ($layer:ident) => {
        impl<S: $crate::proxy::http::Inner> tower::Service<$crate::proxy::http::Request>
            for $layer<S>
        {
            type Response = $crate::proxy::http::Response;
            type Error = $crate::proxy::http::BoxError;
            type Future =
                futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

            fn poll_ready(
                &mut self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                self.inner.poll_ready(cx)
            }

            fn call(&mut self, req: $crate::proxy::http::Request) -> Self::Future {
                self.handle(req)
            }
        }
    };
}
pub(crate) use layer_service;

/// Sends a request through a service once it is ready. The stack's
/// services are always ready, so this usually hands back the service's own
/// future as it is; only a service not ready yet gets a future that waits
/// for it (boxed: an unboxed tower future awaited inside a `Send` async
/// block trips the compiler's higher-ranked lifetime check on the boxed
/// error).
pub fn call<S>(mut svc: S, req: Request) -> Answer
where
    S: tower::Service<Request, Response = Response, Error = BoxError, Future = Answer>
        + Send
        + 'static,
{
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match svc.poll_ready(&mut cx) {
        std::task::Poll::Ready(Ok(())) => svc.call(req),
        std::task::Poll::Ready(Err(e)) => Box::pin(std::future::ready(Err(e))),
        std::task::Poll::Pending => Box::pin(async move {
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
            svc.call(req).await
        }),
    }
}

/// What every layer may need besides its destination.
pub struct Shared {
    pub metrics: Arc<ProxyMetrics>,
    pub pool: pool::Pool,
    /// This proxy's workload, the `src` of its metrics.
    pub workload: String,
    /// Request bodies buffered for retry, all requests together.
    pub replay_budget: Arc<retry::ReplayBudget>,
}

/// The stack for one destination, outermost first.
pub type Backend = cache::Cache<
    metrics::Metrics<
        timeout::Timeout<retry::Retry<breaker::Breaker<ratelimit::RateLimit<balance::Balance>>>>,
    >,
>;

/// Builds the per-destination stack: response cache -> metrics -> timeout
/// -> retry -> circuit breaker -> rate limit -> load balancer -> pool.
pub fn backend(dst: Arc<Destination>, shared: &Arc<Shared>) -> Backend {
    let balance = balance::Balance::new(dst.clone(), shared.pool.clone());
    let limited = ratelimit::RateLimit::new(dst.clone(), shared.clone(), balance);
    let broken = breaker::Breaker::new(dst.clone(), shared.clone(), limited);
    let retried = retry::Retry::new(dst.clone(), shared.clone(), broken);
    let timed = timeout::Timeout::new(dst.clone(), retried);
    let measured = metrics::Metrics::new(dst.clone(), shared.clone(), timed);
    cache::Cache::new(dst, shared.clone(), measured)
}
