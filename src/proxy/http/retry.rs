//! Retries, safe by default: a request is retried only when its method is
//! one the policy lists (the idempotent ones unless told otherwise) or it
//! carries an `Idempotency-Key` header — except a connection that could not
//! be made, which the server never saw. Bodies up to 64 KiB with a known
//! length are buffered for replay; larger or streamed bodies are sent once,
//! and so is any body once the proxy's [`ReplayBudget`] (one for all its
//! requests) is spent, so buffered bodies never hold more than that.
//! Every retry must be allowed by the destination's budget, so an outage
//! cannot multiply the load on a struggling Service. Tries are spaced by
//! exponential backoff with full jitter. A try past the request's deadline
//! is not retried: the timeout layer is about to answer 504.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;

use super::Shared;
use super::body::{self, BoxError, Request, Response};
use super::errors::{ProxyError, classify};
use super::route::RouteCtx;
use super::timeout::Deadline;
use crate::config::{RetryConfig, RetryOn};
use crate::proxy::destination::Destination;
use crate::proxy::metrics::DstLabels;
use crate::proxy::resilience::backoff;

/// Largest body buffered so the request can be replayed.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The bytes of request bodies one proxy may hold buffered for replay at
/// once, across all requests: a request whose body does not fit is sent
/// unbuffered and not retried (and counted), so a burst of large POSTs to
/// a slow Service cannot grow the proxy past its memory limit. One atomic
/// add to take a place and one to give it back.
pub struct ReplayBudget {
    limit: u64,
    held: std::sync::atomic::AtomicU64,
}

impl ReplayBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: Default::default(),
        })
    }

    /// Room for `bytes` more, held until the guard drops; `None` when they
    /// do not fit.
    pub fn take(self: &Arc<Self>, bytes: u64) -> Option<ReplayBytes> {
        use std::sync::atomic::Ordering;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                h.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .ok()
            .map(|_| ReplayBytes(self.clone(), bytes))
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Default for ReplayBudget {
    fn default() -> Self {
        Self {
            limit: DEFAULT_REPLAY_BUDGET,
            held: Default::default(),
        }
    }
}

/// The default [`ReplayBudget`]: well under the sidecar's default 128 MiB
/// memory limit.
pub const DEFAULT_REPLAY_BUDGET: u64 = 8 * 1024 * 1024;

/// A place in the [`ReplayBudget`].
pub struct ReplayBytes(Arc<ReplayBudget>, u64);

impl Drop for ReplayBytes {
    fn drop(&mut self) {
        self.0
            .held
            .fetch_sub(self.1, std::sync::atomic::Ordering::AcqRel);
    }
}

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

/// A proxy's 504 for a deadline that passed (see `deadline`).
pub fn is_deadline_answer(rsp: &Response) -> bool {
    rsp.status() == http::StatusCode::GATEWAY_TIMEOUT
        && rsp
            .headers()
            .get(super::errors::ERROR_HEADER)
            .is_some_and(|v| v == "deadline-exceeded")
}

/// A retry with less time than this left before the request's deadline
/// is not sent: it could not be answered, and would spend the budget.
/// (A next hop told the deadline in whole milliseconds, rounded down,
/// answers up to a millisecond before it.)
const TOO_LITTLE_LEFT: Duration = Duration::from_millis(5);

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
    /// Decides here, before any future is made, whether the request can be
    /// retried at all: most cannot (no retries in the policy, a health
    /// path, a body too large or streamed to buffer), and their future is
    /// the one try's alone, without the buffered copy and backoff timer a
    /// retried request carries through its tries.
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        let (dst, shared, inner) = (self.dst.clone(), self.shared.clone(), self.inner.clone());
        let ctx = req.extensions().get::<RouteCtx>();
        let policy: Arc<RetryConfig> = ctx
            .and_then(|c| c.retry.clone())
            .unwrap_or_else(|| dst.retry.clone());
        let excluded = ctx.is_some_and(|c| c.excluded);
        dst.budget.record_request(Instant::now());
        let per_try = policy.per_try_timeout_ms.map(Duration::from_millis);
        if policy.max_retries == 0 || excluded {
            return attempt(inner, req, per_try, dst);
        }
        let safe = is_replay_safe(&req, &policy);
        let (parts, body) = req.into_parts();
        // Only bodies of known, small size are buffered for replay; a
        // larger or streamed body is sent once.
        let small = http_body::Body::size_hint(&body)
            .upper()
            .filter(|n| *n <= MAX_REPLAY_BODY);
        let held = match small {
            Some(n) => {
                let held = shared.replay_budget.take(n);
                if held.is_none() {
                    shared.metrics.retry_unbuffered.inc();
                }
                held
            }
            None => None,
        };
        let Some(held) = held else {
            return attempt(inner, http::Request::from_parts(parts, body), per_try, dst);
        };
        Box::pin(retrying(
            Tries {
                inner,
                dst,
                shared,
                policy,
                safe,
                per_try,
                _held: held,
            },
            parts,
            body,
        ))
    }
}

/// What a retried request's tries share.
struct Tries<S> {
    inner: S,
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    policy: Arc<RetryConfig>,
    /// Replay-safe (its method or idempotency key).
    safe: bool,
    per_try: Option<Duration>,
    /// Its share of the replay budget, given back when the last try ends
    /// (when this is dropped).
    _held: ReplayBytes,
}

/// A request whose body is buffered, tried until a try succeeds, the
/// policy says not to retry, or the retry budget or the request's time
/// runs out.
async fn retrying<S: super::Inner>(
    t: Tries<S>,
    parts: http::request::Parts,
    body: body::Body,
) -> Result<Response, BoxError> {
    let (bytes, trailers): (Bytes, Option<http::HeaderMap>) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
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
    // The request's deadline (each try's copy gets its own, tighter).
    let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
    loop {
        let req = replay(&parts, bytes.clone(), trailers.clone());
        let result = attempt(t.inner.clone(), req, t.per_try, t.dst.clone()).await;
        let verdict = judge(&result, &t.policy, &t.dst.label);
        let retry = match verdict {
            Verdict::Done => false,
            Verdict::RetryAlways => true,
            Verdict::RetryIfSafe => t.safe,
        };
        // The balancer timed the try out at the request's deadline (or
        // the next hop's proxy did, a hair before it): no time is left
        // for another, so neither budget nor a retry is spent on it.
        let expired = deadline.is_some_and(|d| tokio::time::Instant::now() + TOO_LITTLE_LEFT >= d);
        // The answer asked for a back-off the retry could not wait out
        // (`retryAfter`): the caller gets that answer, not the proxy's
        // refusal of a retry that would never leave.
        let held =
            t.dst.hold.as_ref().is_some_and(|hold| {
                hold.would_refuse(Instant::now(), deadline.map(|d| d.into_std()))
            });
        if !retry || tries >= t.policy.max_retries || expired || held {
            return result;
        }
        let label = DstLabels {
            dst: t.dst.label.clone(),
        };
        if !t.dst.budget.try_withdraw(Instant::now()) {
            t.shared
                .metrics
                .retry_budget_exhausted
                .get_or_create(&label)
                .inc();
            return result;
        }
        t.shared.metrics.retries.get_or_create(&label).inc();
        // Let the failed response go before waiting.
        drop(result);
        let wait = backoff(
            tries,
            Duration::from_millis(t.policy.backoff_base_ms),
            Duration::from_millis(t.policy.backoff_max_ms),
            &mut rng,
        );
        tokio::time::sleep(wait).await;
        tries += 1;
    }
}

/// A fresh copy of a buffered request.
fn replay(
    parts: &http::request::Parts,
    bytes: Bytes,
    trailers: Option<http::HeaderMap>,
) -> Request {
    let mut req = http::Request::new(body::full_with_trailers(bytes, trailers));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

/// One try, under the per-try deadline. The deadline goes with the try
/// (the earlier of it and the request's) so that the balancer times the
/// try out itself and counts it against the endpoint; this timer stays for
/// a try that never reached the balancer.
fn attempt<S: super::Inner>(
    inner: S,
    mut req: Request,
    per_try: Option<Duration>,
    dst: Arc<Destination>,
) -> BoxFuture<'static, Result<Response, BoxError>> {
    // A limit too large to add to the clock is no limit.
    let Some(deadline) = per_try.and_then(|l| tokio::time::Instant::now().checked_add(l)) else {
        return super::call(inner, req);
    };
    Deadline::tighten(req.extensions_mut(), deadline);
    let call = super::call(inner, req);
    Box::pin(async move {
        match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::Timeout(dst.label.clone()).into()),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;
    use tokio::time::Instant as TokioInstant;

    use super::*;
    use crate::proxy::http::balance::tests::{destination, request};
    use crate::proxy::http::pool::Pool;
    use crate::proxy::metrics::ProxyMetrics;

    const MS: Duration = Duration::from_millis(1);

    /// Records each try's deadline and answers it with a timeout, as the
    /// balancer does once the deadline passes.
    fn timing_out(tries: Arc<Mutex<Vec<Option<Deadline>>>>) -> impl super::super::Inner {
        tower::service_fn(move |req: Request| {
            tries
                .lock()
                .expect("tries")
                .push(req.extensions().get::<Deadline>().copied());
            Box::pin(async { Err::<Response, BoxError>(ProxyError::Timeout("x".into()).into()) })
                as super::super::Answer
        })
    }

    #[tokio::test]
    async fn a_try_carries_the_earlier_of_its_own_and_the_request_deadline() {
        let now = TokioInstant::now();
        let (far, near) = (now + 10 * Duration::from_secs(1), now + 50 * MS);
        // (the request's deadline, the per-try limit)
        let cases = [
            (Some(far), Some(200 * MS)),
            (Some(near), Some(200 * MS)),
            (None, None),
        ];
        let tries = Arc::new(Mutex::new(Vec::new()));
        let dst = destination("127.0.0.1:9".parse().expect("addr"), 1, json!({}));
        for (deadline, per_try) in cases {
            let _ = attempt(
                timing_out(tries.clone()),
                request(deadline),
                per_try,
                dst.clone(),
            )
            .await;
        }
        let seen = tries.lock().expect("tries").clone();
        let Some(Deadline(per_try)) = seen[0] else {
            panic!("no deadline: {seen:?}")
        };
        assert!(per_try >= now + 200 * MS && per_try < far, "{per_try:?}");
        assert_eq!(seen[1], Some(Deadline(near)), "the request's is earlier");
        assert_eq!(seen[2], None);
    }

    /// A try the balancer timed out at the request's deadline is not
    /// retried (the timeout layer answers 504 now): no retry is counted and
    /// no budget spent. Before the deadline, a timed-out try is retried.
    #[tokio::test]
    async fn no_retry_is_spent_past_the_request_deadline() {
        let unused = "127.0.0.1:9".parse().expect("addr");
        let policy = json!({ "retry": { "maxRetries": 2, "retryOn": ["gateway-error"] } });
        let dst = destination(unused, 1, policy);
        let shared = Arc::new(Shared {
            metrics: Arc::new(ProxyMetrics::new()),
            pool: Pool::default(),
            workload: "test".into(),
            replay_budget: Default::default(),
        });
        let retries = || {
            shared
                .metrics
                .retries
                .get_or_create(&DstLabels {
                    dst: dst.label.clone(),
                })
                .get()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let run = |deadline| {
            let tries = Arc::new(Mutex::new(Vec::new()));
            let mut retry = Retry::new(dst.clone(), shared.clone(), timing_out(tries.clone()));
            let calls = calls.clone();
            async move {
                let _ = tower::Service::call(&mut retry, request(deadline)).await;
                calls.fetch_add(tries.lock().expect("tries").len(), Ordering::SeqCst);
            }
        };
        run(Some(TokioInstant::now())).await;
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "one try, no retry");
        assert_eq!(retries(), 0);
        run(Some(TokioInstant::now() + 10 * Duration::from_secs(1))).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3, "tried and retried twice");
        assert_eq!(retries(), 2);
    }

    /// With the proxy's replay budget spent, a request whose body would
    /// need buffering is sent once, unbuffered, and counted; with room it
    /// is buffered and retried, and the room is given back afterwards.
    #[tokio::test]
    async fn past_the_replay_budget_a_request_is_sent_unbuffered_and_not_retried() {
        let unused = "127.0.0.1:9".parse().expect("addr");
        let policy = json!({ "retry": { "maxRetries": 2, "retryOn": ["gateway-error"] } });
        let dst = destination(unused, 1, policy);
        let budget = ReplayBudget::new(8);
        let shared = Arc::new(Shared {
            metrics: Arc::new(ProxyMetrics::new()),
            pool: Pool::default(),
            workload: "test".into(),
            replay_budget: budget.clone(),
        });
        let tries_of = |body: &'static str| {
            let tries = Arc::new(Mutex::new(Vec::new()));
            let mut retry = Retry::new(dst.clone(), shared.clone(), timing_out(tries.clone()));
            async move {
                let mut req = request(Some(TokioInstant::now() + 10 * Duration::from_secs(1)));
                *req.body_mut() = body::full(body);
                let _ = tower::Service::call(&mut retry, req).await;
                tries.lock().expect("tries").len()
            }
        };
        assert_eq!(tries_of("hello").await, 3, "buffered and retried twice");
        assert_eq!(shared.metrics.retry_unbuffered.get(), 0);
        assert_eq!(budget.held(), 0, "the room is given back");

        let taken = budget.take(4).expect("room for 4");
        assert_eq!(tries_of("hello").await, 1, "sent once, unbuffered");
        assert_eq!(shared.metrics.retry_unbuffered.get(), 1);
        drop(taken);
        assert_eq!(budget.held(), 0);
    }

    /// A next hop's 504 for a deadline (a per-try timeout it was told)
    /// is retried as any 504: the request's own deadline, checked apart,
    /// decides whether time is left.
    #[test]
    fn a_deadline_answer_is_retried_as_any_gateway_timeout() {
        let policy: RetryConfig = serde_json::from_value(json!({
            "maxRetries": 2, "retryOn": ["gateway-error"], "methods": ["GET"],
            "idempotencyHeader": "idempotency-key",
            "budget": { "percent": 20, "minPerSecond": 10, "windowMs": 10000 },
            "backoffBaseMs": 1, "backoffMaxMs": 5,
        }))
        .expect("policy");
        let answer = |reason: Option<&'static str>| {
            let mut rsp = http::Response::new(body::empty());
            *rsp.status_mut() = http::StatusCode::GATEWAY_TIMEOUT;
            if let Some(r) = reason {
                rsp.headers_mut().insert(
                    super::super::errors::ERROR_HEADER,
                    http::HeaderValue::from_static(r),
                );
            }
            Ok(rsp)
        };
        for reason in [None, Some("timeout"), Some("deadline-exceeded")] {
            assert!(
                matches!(judge(&answer(reason), &policy, "x"), Verdict::RetryIfSafe),
                "{reason:?}"
            );
        }
        assert!(is_deadline_answer(
            &answer(Some("deadline-exceeded")).expect("ok")
        ));
    }
}
