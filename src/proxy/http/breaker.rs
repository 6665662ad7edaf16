//! The Service-level circuit breaker: after enough failures every request
//! to the destination fails fast with 503 until a probe succeeds (the
//! balancer keeps one breaker per endpoint as well). Health-check paths
//! neither count as failures nor as successes.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::Shared;
use super::body::{BoxError, Request, Response};
use super::errors::{ProxyError, classify};
use super::route::RouteCtx;
use crate::proxy::destination::Destination;
use crate::proxy::metrics::DstLabels;
use crate::proxy::resilience::{BreakerPermit, BreakerState, CircuitBreaker};

#[derive(Clone)]
pub struct Breaker<S> {
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    inner: S,
}

impl<S> Breaker<S> {
    pub fn new(dst: Arc<Destination>, shared: Arc<Shared>, inner: S) -> Self {
        Self { dst, shared, inner }
    }
}

/// Whether an outcome counts against the destination: any 5xx, any failure
/// to get a response. Our own refusals (rate limit, open circuits) do not.
pub fn is_failure(result: &Result<Response, BoxError>, label: &str) -> bool {
    match result {
        Ok(rsp) => rsp.status().is_server_error(),
        Err(e) => !matches!(
            classify(e, label),
            ProxyError::RateLimited(_) | ProxyError::CircuitOpen(_)
        ),
    }
}

/// Reports an outcome to a permit, unless the request was on a health path.
pub fn report(permit: BreakerPermit, excluded: bool, failed: bool) {
    let now = Instant::now();
    match (excluded, failed) {
        (true, _) => drop(permit),
        (false, true) => permit.failure(now),
        (false, false) => permit.success(now),
    }
}

fn state_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
    }
}

super::layer_service!(Breaker);

impl<S: super::Inner> Breaker<S> {
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        let Some(breaker) = self.dst.breaker.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let (dst, shared) = (self.dst.clone(), self.shared.clone());
        let Some(permit) = breaker.try_acquire(Instant::now()) else {
            publish(&breaker, &dst, &shared);
            return Box::pin(async move { Err(ProxyError::CircuitOpen(dst.label.clone()).into()) });
        };
        let excluded = req
            .extensions()
            .get::<RouteCtx>()
            .is_some_and(|r| r.excluded);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let was_closed = breaker.state(Instant::now()) == BreakerState::Closed;
            report(permit, excluded, is_failure(&result, &dst.label));
            let label = DstLabels {
                dst: dst.label.clone(),
            };
            if was_closed && breaker.state(Instant::now()) == BreakerState::Open {
                tracing::warn!(dst = %dst.label, "circuit opened");
                shared.metrics.circuit_opened.get_or_create(&label).inc();
            }
            publish(&breaker, &dst, &shared);
            result
        })
    }
}

fn publish(breaker: &CircuitBreaker, dst: &Destination, shared: &Shared) {
    shared
        .metrics
        .circuit_state
        .get_or_create(&DstLabels {
            dst: dst.label.clone(),
        })
        .set(state_value(breaker.state(Instant::now())));
}
