//! Retries, safe by default: a request is retried only when its method is
//! one the policy lists (the idempotent ones unless told otherwise) or it
//! carries an `Idempotency-Key` header — except a connection that could not
//! be made, which the server never saw. Bodies up to 64 KiB with a known
//! length are buffered for replay; larger or streamed bodies are sent once.
//! Every retry must be allowed by the destination's budget, so an outage
//! cannot multiply the load on a struggling Service. Tries are spaced by
//! exponential backoff with full jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;

use super::Shared;
use super::body::{self, BoxError, Request, Response};
use super::errors::{ProxyError, classify};
use super::route::RouteCtx;
use crate::config::{RetryConfig, RetryOn};
use crate::proxy::destination::Destination;
use crate::proxy::metrics::DstLabels;
use crate::proxy::resilience::backoff;

/// Largest body buffered so the request can be replayed.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

#[derive(Clone)]
pub struct Retry<S> {
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    inner: S,
}

impl<S> Retry<S> {
    pub fn new(dst: Arc<Destination>, shared: Arc<Shared>, inner: S) -> Self {
        Self { dst, shared, inner }
    }
}

/// Whether the request's method (or its idempotency header) allows
/// replaying it after the server may have seen it.
pub fn is_replay_safe(req: &Request, policy: &RetryConfig) -> bool {
    policy
        .methods
        .iter()
        .any(|m| m.as_str() == req.method().as_str())
        || req
            .headers()
            .contains_key(policy.idempotency_header.as_str())
}

/// Why a try should be retried, if it should.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done,
    /// The server never saw the request.
    RetryAlways,
    /// The server may have seen it: only replay-safe requests.
    RetryIfSafe,
}

fn judge(result: &Result<Response, BoxError>, policy: &RetryConfig, label: &str) -> Verdict {
    let on = |k: RetryOn| policy.retry_on.contains(&k);
    match result {
        Ok(rsp) => {
            let code = rsp.status().as_u16();
            let retry = (on(RetryOn::ServerError) && rsp.status().is_server_error())
                || (on(RetryOn::GatewayError) && matches!(code, 502..=504))
                || policy.status_codes.contains(&code);
            if retry {
                Verdict::RetryIfSafe
            } else {
                Verdict::Done
            }
        }
        Err(e) => match classify(e, label) {
            ProxyError::Connect(..) if on(RetryOn::ConnectFailure) => Verdict::RetryAlways,
            ProxyError::UpstreamReset(..) if on(RetryOn::Reset) => Verdict::RetryIfSafe,
            ProxyError::Timeout(_) if on(RetryOn::GatewayError) || on(RetryOn::ServerError) => {
                Verdict::RetryIfSafe
            }
            _ => Verdict::Done,
        },
    }
}

super::layer_service!(Retry);

impl<S: super::Inner> Retry<S> {
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        let (dst, shared, inner) = (self.dst.clone(), self.shared.clone(), self.inner.clone());
        Box::pin(async move {
            let ctx = req.extensions().get::<RouteCtx>().cloned();
            let policy: Arc<RetryConfig> = ctx
                .as_ref()
                .and_then(|c| c.retry.clone())
                .unwrap_or_else(|| dst.retry.clone());
            let excluded = ctx.as_ref().is_some_and(|c| c.excluded);
            dst.budget.record_request(Instant::now());
            let per_try = policy.per_try_timeout_ms.map(Duration::from_millis);
            if policy.max_retries == 0 || excluded {
                return attempt(inner, req, per_try, &dst.label).await;
            }
            let safe = is_replay_safe(&req, &policy);
            let (parts, body) = req.into_parts();
            // Only bodies of known, small size are buffered for replay; a
            // larger or streamed body is sent once.
            let small = http_body::Body::size_hint(&body)
                .upper()
                .is_some_and(|n| n <= MAX_REPLAY_BODY);
            if !small {
                return attempt(
                    inner,
                    http::Request::from_parts(parts, body),
                    per_try,
                    &dst.label,
                )
                .await;
            }
            let bytes: Bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    return Err(ProxyError::BadRequest(format!("reading request body: {e}")).into());
                }
            };
            let mut rng = fastrand::Rng::new();
            let mut tries: u32 = 0;
            // Shared by every attempt's copy: retries go to another endpoint
            // when there is one.
            let mut parts = parts;
            parts
                .extensions
                .insert(super::balance::TriedEndpoints::default());
            loop {
                let req = replay(&parts, bytes.clone());
                let result = attempt(inner.clone(), req, per_try, &dst.label).await;
                let verdict = judge(&result, &policy, &dst.label);
                let retry = match verdict {
                    Verdict::Done => false,
                    Verdict::RetryAlways => true,
                    Verdict::RetryIfSafe => safe,
                };
                if !retry || tries >= policy.max_retries {
                    return result;
                }
                let label = DstLabels {
                    dst: dst.label.clone(),
                };
                if !dst.budget.try_withdraw(Instant::now()) {
                    shared
                        .metrics
                        .retry_budget_exhausted
                        .get_or_create(&label)
                        .inc();
                    return result;
                }
                shared.metrics.retries.get_or_create(&label).inc();
                // Let the failed response go before waiting.
                drop(result);
                let wait = backoff(
                    tries,
                    Duration::from_millis(policy.backoff_base_ms),
                    Duration::from_millis(policy.backoff_max_ms),
                    &mut rng,
                );
                tokio::time::sleep(wait).await;
                tries += 1;
            }
        })
    }
}

/// A fresh copy of a buffered request.
fn replay(parts: &http::request::Parts, bytes: Bytes) -> Request {
    let mut req = http::Request::new(body::full(bytes));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

/// One try, under the per-try deadline.
async fn attempt<S: super::Inner>(
    inner: S,
    req: Request,
    per_try: Option<Duration>,
    label: &str,
) -> Result<Response, BoxError> {
    match per_try {
        None => super::call(inner, req).await,
        Some(limit) => match tokio::time::timeout(limit, super::call(inner, req)).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::Timeout(label.to_owned()).into()),
        },
    }
}
