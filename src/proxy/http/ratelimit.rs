//! Limits on calls to one destination, shared by every connection of this
//! proxy: the policy's token bucket (calls beyond the rate get 429 without
//! leaving the pod), and the destination's own back-off when the policy
//! honours it (`retryAfter`): after it answers 429 with `Retry-After`, or
//! says `RateLimit-Remaining: 0` with `RateLimit-Reset`, nothing is sent to
//! it until the time it gave. (A 503's `Retry-After` is left to the circuit
//! breaker: from a Service with several pods it speaks for one pod, and
//! holding the whole Service for it would be wrong; so is a meshed pod's
//! own inbound rate limit refusing, left to the balancer.) Health paths
//! (`excludedPaths`) are neither held nor listened to. Calls meanwhile wait in a
//! bounded queue for a bounded time (never past their own deadline), then
//! go; the rest are answered 429 here with the `Retry-After` left. This
//! layer sits below the retries, so a retry waits out the back-off like
//! any call and never fires into it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;

use super::Shared;
use super::body::{BoxError, Request, Response};
use super::errors::ProxyError;
use super::route::RouteCtx;
use super::timeout::Deadline;
use crate::proxy::destination::Destination;
use crate::proxy::metrics::DstLabels;
use crate::proxy::resilience::{Admit, Hold, Place};

#[derive(Clone)]
pub struct RateLimit<S> {
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    inner: S,
}

impl<S> RateLimit<S> {
    pub fn new(dst: Arc<Destination>, shared: Arc<Shared>, inner: S) -> Self {
        Self { dst, shared, inner }
    }
}

super::layer_service!(RateLimit);

impl<S: super::Inner> RateLimit<S> {
    fn handle(&mut self, req: Request) -> super::Answer {
        let Some(hold) = &self.dst.hold else {
            // No back-off honoured: the token bucket alone.
            return match over_rate(&self.dst) {
                Some(refused) => refused,
                None => self.inner.call(req),
            };
        };
        // Health paths are neither held nor listened to.
        if req
            .extensions()
            .get::<RouteCtx>()
            .is_some_and(|c| c.excluded)
        {
            return match over_rate(&self.dst) {
                Some(refused) => refused,
                None => self.inner.call(req),
            };
        }
        let now = Instant::now();
        if hold.until(now).is_some() {
            let deadline = req.extensions().get::<Deadline>().map(|d| d.0.into_std());
            let latest = hold.latest(now, deadline);
            match hold.admit(now, latest) {
                Admit::Go => {}
                Admit::Refuse(left) => return refused(&self.dst, left),
                Admit::Wait(_, place) => {
                    let (dst, shared) = (self.dst.clone(), self.shared.clone());
                    let inner = self.inner.clone();
                    let hold = hold.clone();
                    return Box::pin(waited(dst, shared, hold, inner, req, latest, place));
                }
            }
        }
        if let Some(refused) = over_rate(&self.dst) {
            return refused;
        }
        watched(&self.dst, &self.shared, self.inner.call(req))
    }
}

/// A call that waits for the back-off to end: it goes then, unless a later
/// answer extended the back-off past the latest it may leave.
async fn waited<S: super::Inner>(
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    hold: Arc<Hold>,
    inner: S,
    req: Request,
    latest: Instant,
    place: Place,
) -> Result<Response, BoxError> {
    loop {
        let now = Instant::now();
        match hold.until(now) {
            None => break,
            Some(until) if until > latest => return refused(&dst, until - now).await,
            Some(until) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
            }
        }
    }
    drop(place);
    if let Some(refused) = over_rate(&dst) {
        return refused.await;
    }
    shared
        .metrics
        .back_off_waits
        .get_or_create(&DstLabels {
            dst: dst.label.clone(),
        })
        .inc();
    watched(&dst, &shared, super::call(inner, req)).await
}

/// The token bucket's refusal, if it has no token.
fn over_rate(dst: &Destination) -> Option<super::Answer> {
    let limiter = dst.limiter.as_ref()?;
    if limiter.try_take(Instant::now()) {
        return None;
    }
    let err = ProxyError::RateLimited(dst.label.clone());
    Some(Box::pin(std::future::ready(Err::<Response, BoxError>(
        err.into(),
    ))))
}

/// 429 with the back-off `left` (whole seconds, rounded up).
fn refused(dst: &Destination, left: Duration) -> super::Answer {
    let err = ProxyError::BackingOff(dst.label.clone(), super::errors::retry_after_seconds(left));
    Box::pin(std::future::ready(Err::<Response, BoxError>(err.into())))
}

/// `call`, watched for a back-off its answer asks for, when the policy
/// honours one.
fn watched(dst: &Destination, shared: &Arc<Shared>, call: super::Answer) -> super::Answer {
    let Some(hold) = dst.hold.clone() else {
        return call;
    };
    let (label, shared) = (dst.label.clone(), shared.clone());
    Box::pin(async move {
        let rsp = call.await?;
        // A meshed pod's own inbound limit speaks for that pod, as a
        // 503's Retry-After does: the balancer steers around it.
        if rsp
            .extensions()
            .get::<super::breaker::PeerLimited>()
            .is_some()
        {
            return Ok(rsp);
        }
        if let Some(delay) = back_off_of(rsp.status().as_u16(), rsp.headers(), SystemTime::now())
            && hold.back_off(Instant::now(), delay)
        {
            shared
                .metrics
                .back_offs
                .get_or_create(&DstLabels { dst: label })
                .inc();
        }
        Ok::<Response, BoxError>(rsp)
    })
}

/// The longest header value read as a number of seconds: a day. Anything
/// longer is cut to the policy's `maxBackOff` anyway.
const LONGEST_SECONDS: u64 = 86_400;

/// The back-off an answer asks for, if any (at most [`LONGEST_SECONDS`]):
/// - `Retry-After` on a 429 (RFC 9110 §10.2.3: delay-seconds, digits
///   only, or an HTTP-date; a date in the past asks for none);
/// - `RateLimit-Remaining: 0` with `RateLimit-Reset: <seconds>` (the
///   IETF httpapi draft's first form, which vendors send), or the later
///   `RateLimit: "policy";r=0;t=<seconds>` field, on any answer: the quota
///   is spent until then.
pub fn back_off_of(status: u16, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let longest = Duration::from_secs(LONGEST_SECONDS);
    // Digits only (no sign); more of them than a u64 holds is "very long".
    let seconds = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| {
            s.parse::<u64>()
                .map_or(longest, |n| Duration::from_secs(n.min(LONGEST_SECONDS)))
        })
    };
    if status == 429
        && let Some(value) = text("retry-after")
    {
        let delay = seconds(value).or_else(|| {
            let at = httpdate::parse_http_date(value).ok()?;
            Some(
                at.duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    .min(longest),
            )
        });
        if let Some(delay) = delay.filter(|d| !d.is_zero()) {
            return Some(delay);
        }
    }
    if text("ratelimit-remaining") == Some("0")
        && let Some(reset) = text("ratelimit-reset").and_then(seconds)
        && !reset.is_zero()
    {
        return Some(reset);
    }
    // `RateLimit: "default";r=0;t=30, "burst";r=5;t=1`: the longest wait
    // among the spent quotas.
    let spent = text("ratelimit")?
        .split(',')
        .filter_map(|member| {
            let mut left = None;
            let mut reset = None;
            for param in member.split(';').skip(1) {
                match param.trim().split_once('=') {
                    Some(("r", v)) => left = v.trim().parse::<u64>().ok(),
                    Some(("t", v)) => reset = seconds(v.trim()),
                    _ => {}
                }
            }
            (left == Some(0)).then_some(reset).flatten()
        })
        .max()?;
    (!spent.is_zero()).then_some(spent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    /// What each form of back-off reads as, and what asks for none.
    #[test]
    fn back_offs_are_read_from_retry_after_and_ratelimit_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let secs = |n| Some(Duration::from_secs(n));
        let retry_after = |status, value: &'static str| {
            back_off_of(status, &headers(&[("retry-after", value)]), now)
        };
        assert_eq!(retry_after(429, "2"), secs(2));
        assert_eq!(retry_after(429, " 120 "), secs(120));
        // Only a 429 asks with Retry-After (a 503's is one pod's, left to
        // the breaker; a 301's means nothing here).
        assert_eq!(retry_after(503, "2"), None);
        assert_eq!(retry_after(301, "2"), None);
        assert_eq!(retry_after(200, "2"), None);
        // Digits only; nonsense and zero ask for nothing; a huge number,
        // even past a u64, is cut to a day.
        assert_eq!(retry_after(429, "+5"), None);
        assert_eq!(retry_after(429, "-5"), None);
        assert_eq!(retry_after(429, "soon"), None);
        assert_eq!(retry_after(429, "0"), None);
        assert_eq!(retry_after(429, "99999999999999"), secs(LONGEST_SECONDS));
        assert_eq!(
            retry_after(429, "999999999999999999999999"),
            secs(LONGEST_SECONDS)
        );
        // An HTTP-date: the time until then (a day at most); in the past:
        // none.
        let date = |offset: i64| {
            let at = if offset >= 0 {
                now + Duration::from_secs(offset.unsigned_abs())
            } else {
                now - Duration::from_secs(offset.unsigned_abs())
            };
            let mut h = HeaderMap::new();
            h.insert("retry-after", httpdate::fmt_http_date(at).parse().unwrap());
            back_off_of(429, &h, now)
        };
        assert_eq!(date(30), secs(30));
        assert_eq!(date(-30), None);
        assert_eq!(date(10 * 365 * 86_400), secs(LONGEST_SECONDS));
        // The quota headers, on any answer.
        let spent = [("ratelimit-remaining", "0"), ("ratelimit-reset", "7")];
        assert_eq!(back_off_of(200, &headers(&spent), now), secs(7));
        let left = [("ratelimit-remaining", "3"), ("ratelimit-reset", "7")];
        assert_eq!(back_off_of(200, &headers(&left), now), None);
        let structured = [("ratelimit", "\"default\";r=0;t=30, \"burst\";r=5;t=1")];
        assert_eq!(back_off_of(200, &headers(&structured), now), secs(30));
        let open = [("ratelimit", "\"default\";r=10;t=30")];
        assert_eq!(back_off_of(200, &headers(&open), now), None);
    }
}
