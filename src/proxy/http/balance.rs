//! Load balancing: power of two choices by peak-EWMA latency among the
//! endpoints whose own circuit breaker admits a request. When every
//! endpoint's breaker is open the destination fails fast with 503.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tower::Service;

use super::body::{BoxError, Request, Response};
use super::breaker::{is_failure, report};
use super::errors::ProxyError;
use super::pool::Pool;
use super::route::RouteCtx;
use crate::proxy::destination::Destination;
use crate::proxy::resilience::p2c_pick;

#[derive(Clone)]
pub struct Balance {
    dst: Arc<Destination>,
    pool: Pool,
}

impl Balance {
    pub fn new(dst: Arc<Destination>, pool: Pool) -> Self {
        Self { dst, pool }
    }
}

impl Service<Request> for Balance {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let (dst, pool) = (self.dst.clone(), self.pool.clone());
        Box::pin(async move {
            let endpoints = dst.endpoints().await;
            if endpoints.is_empty() {
                return Err(ProxyError::NoEndpoints(dst.label.clone()).into());
            }
            let now = Instant::now();
            let admitted: Vec<(usize, f64)> = endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| e.breaker.as_ref().is_none_or(|b| b.admits(now)))
                .map(|(i, e)| (i, e.load.cost(now)))
                .collect();
            let mut rng = fastrand::Rng::new();
            let tried = req.extensions().get::<TriedEndpoints>().cloned();
            let mut candidates = admitted;
            if let Some(tried) = &tried {
                let seen = tried.0.lock().unwrap_or_else(|e| e.into_inner());
                let fresh: Vec<(usize, f64)> = candidates
                    .iter()
                    .copied()
                    .filter(|(i, _)| !seen.contains(&endpoints[*i].addr))
                    .collect();
                if !fresh.is_empty() {
                    candidates = fresh;
                }
            }
            // Try the two best candidates' breakers in P2C order; a
            // half-open breaker may refuse a second concurrent probe.
            let (chosen, permit) = loop {
                let Some(i) = p2c_pick(&candidates, &mut rng) else {
                    return Err(ProxyError::CircuitOpen(dst.label.clone()).into());
                };
                let endpoint = endpoints[i].clone();
                match &endpoint.breaker {
                    None => break (endpoint, None),
                    Some(b) => match b.try_acquire(now) {
                        Some(p) => break (endpoint, Some(p)),
                        None => candidates.retain(|(j, _)| *j != i),
                    },
                }
            };
            let excluded = req
                .extensions()
                .get::<RouteCtx>()
                .is_some_and(|r| r.excluded);
            if let Some(tried) = &tried {
                tried
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(chosen.addr);
            }
            req.extensions_mut().insert(chosen.endpoint.clone());
            let pending = chosen.load.start(Instant::now());
            let result = super::call(pool, req).await;
            pending.complete(Instant::now());
            if let Some(permit) = permit {
                report(permit, excluded, is_failure(&result, &dst.label));
            }
            result
        })
    }
}

/// The endpoints earlier attempts of a request went to (the retry layer
/// puts one in every attempt's extensions): a retry goes elsewhere when
/// another endpoint is admitted, so a fast-failing endpoint, cheap in the
/// latency estimate, does not take every attempt.
#[derive(Clone, Debug, Default)]
pub struct TriedEndpoints(pub Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>);
