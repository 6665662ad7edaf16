//! The Service's circuit, as the CRD describes it: breakers trip per
//! endpoint (the balancer keeps one per endpoint and skips the open ones),
//! and the Service counts as open only when every endpoint is out — then
//! the balancer fails fast with 503. This layer publishes that state and
//! counts its openings. (A Service-level breaker counting every attempt's
//! failure would trip on a steady 20 % error rate that per-endpoint
//! ejection and retries handle, and fail the whole Service for seconds.)
//! Health-check paths neither count as failures nor as successes.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::Shared;
use super::body::{BoxError, Request, Response};
use super::errors::{ProxyError, classify};
use crate::proxy::destination::Destination;
use crate::proxy::metrics::DstLabels;
use crate::proxy::resilience::{BreakerPermit, BreakerState};

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
/// to get a response. Our own refusals (rate limit, the Service's own
/// back-off, open circuits) do not.
pub fn is_failure(result: &Result<Response, BoxError>, label: &str) -> bool {
    match result {
        Ok(rsp) => rsp.status().is_server_error(),
        Err(e) => !matches!(
            classify(e, label),
            ProxyError::RateLimited(_) | ProxyError::BackingOff(..) | ProxyError::CircuitOpen(_)
        ),
    }
}

/// Whether the answer is a meshed pod's proxy refusing the request for its
/// own inbound rate limit (TrafficPolicy `inboundRateLimit`): that pod is
/// saturated. The balancer must hear it (the refusal comes back fast and
/// would make the busiest pod look the cheapest); the breaker must not
/// (the pod is not failing), nor the destination's back-off (it speaks
/// for one pod, not the Service).
/// `meshed`: the endpoint that answered has a proxy of the mesh (whose
/// inbound side removes the header from its application's answers, so
/// only that proxy can have set it).
pub fn refused_by_peer_limit(rsp: &Response, meshed: bool) -> bool {
    meshed
        && rsp.status() == http::StatusCode::TOO_MANY_REQUESTS
        && rsp
            .headers()
            .get(super::errors::ERROR_HEADER)
            .is_some_and(|v| v == "inbound-rate-limited")
}

/// Marks an answer [`refused_by_peer_limit`], for the layers above the
/// balancer (which alone knows the endpoint).
#[derive(Clone, Copy, Debug)]
pub struct PeerLimited;

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
        if !self.dst.has_breaker {
            return self.inner.call(req);
        }
        let (dst, shared) = (self.dst.clone(), self.shared.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            publish(&dst, &shared);
            result
        })
    }
}

/// Publishes the Service's circuit state; counts a move to Open.
fn publish(dst: &Destination, shared: &Shared) {
    let Some(state) = dst.circuit_state(Instant::now()) else {
        return;
    };
    let value = state_value(state);
    let label = DstLabels {
        dst: dst.label.clone(),
    };
    let before = dst
        .published_circuit
        .swap(value as u8, std::sync::atomic::Ordering::Relaxed);
    if state == BreakerState::Open && i64::from(before) != value {
        tracing::warn!(dst = %dst.label, "circuit opened: every endpoint is out");
        shared.metrics.circuit_opened.get_or_create(&label).inc();
    }
    shared
        .metrics
        .circuit_state
        .get_or_create(&label)
        .set(value);
}
