//! The request deadline: the route's timeout, else the Service policy's,
//! and never later than the deadline the application passed on from its
//! own caller (`deadline`). It covers every retry; on expiry the client
//! gets 504, at once when the caller's deadline had already passed.
//!
//! The deadline also travels with the request as a [`Deadline`] extension
//! (the retry layer tightens it to each try's own limit), so that the
//! balancer, which alone knows the endpoint a try went to, can time the
//! try out itself and count it against that endpoint. This layer's timer
//! stays for whatever happens before the balancer is reached.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::body::{BoxError, Request, Response};
use super::deadline::{self, CallersDeadline, From};
use super::errors::ProxyError;
use super::route::RouteCtx;
use crate::proxy::destination::Destination;

/// The earliest instant by which a try must have its response: the
/// request's deadline or the try's, whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Sets the deadline to `at` unless the request already has an earlier
    /// one.
    pub fn tighten(extensions: &mut http::Extensions, at: Instant) {
        let earliest = match extensions.get::<Deadline>() {
            Some(Deadline(current)) => at.min(*current),
            None => at,
        };
        extensions.insert(Deadline(earliest));
    }
}

/// The error of a call cut off by its caller's deadline (not this hop's
/// own timeout).
pub fn caller_gave_up(label: &str) -> ProxyError {
    ProxyError::DeadlineExceeded(format!(
        "the caller's deadline passed before {label} answered"
    ))
}

#[derive(Clone)]
pub struct Timeout<S> {
    dst: Arc<Destination>,
    inner: S,
}

impl<S> Timeout<S> {
    pub fn new(dst: Arc<Destination>, inner: S) -> Self {
        Self { dst, inner }
    }
}

super::layer_service!(Timeout);

impl<S: super::Inner> Timeout<S> {
    fn handle(&mut self, mut req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        let limit = req
            .extensions()
            .get::<RouteCtx>()
            .and_then(|r| r.timeout)
            .or(self.dst.policy.timeout_ms.map(Duration::from_millis));
        let now = Instant::now();
        // The application's own deadline, passed on from the request it is
        // serving (see `deadline`): this hop waits no longer than its caller.
        let asked = deadline::take(req.headers_mut(), From::App, now, SystemTime::now());
        // A limit too large to add to the clock is no limit.
        let own = limit.and_then(|l| now.checked_add(l));
        let Some(deadline) = own.into_iter().chain(asked).min() else {
            return self.inner.call(req);
        };
        if asked.is_some_and(|at| at <= now) {
            // Nobody waits for the answer any more: not sent at all.
            let why = format!(
                "the caller's deadline had passed; {} was not called",
                self.dst.label
            );
            return Box::pin(std::future::ready(Err(
                ProxyError::DeadlineExceeded(why).into()
            )));
        }
        Deadline::tighten(req.extensions_mut(), deadline);
        if let Some(at) = asked {
            req.extensions_mut().insert(CallersDeadline(at));
        }
        let callers = asked.is_some_and(|at| at <= deadline);
        let fut = self.inner.call(req);
        let label = self.dst.label.clone();
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(result) => result,
                Err(_) if callers => Err(caller_gave_up(&label).into()),
                Err(_) => Err(ProxyError::Timeout(label).into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::proxy::http::balance::tests::{destination, request};
    use crate::proxy::http::errors::classify;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn tighten_keeps_the_earlier_deadline() {
        let now = Instant::now();
        let mut ext = http::Extensions::new();
        Deadline::tighten(&mut ext, now + 200 * MS);
        assert_eq!(ext.get(), Some(&Deadline(now + 200 * MS)));
        Deadline::tighten(&mut ext, now + 100 * MS);
        assert_eq!(ext.get(), Some(&Deadline(now + 100 * MS)));
        Deadline::tighten(&mut ext, now + 300 * MS);
        assert_eq!(ext.get(), Some(&Deadline(now + 100 * MS)));
    }

    /// An inner service that records the request's deadline and never
    /// answers: as if the request were stuck before the balancer.
    fn stuck(seen: Arc<Mutex<Option<Deadline>>>) -> impl super::super::Inner {
        tower::service_fn(move |req: Request| {
            *seen.lock().expect("seen") = req.extensions().get::<Deadline>().copied();
            Box::pin(std::future::pending::<Result<Response, BoxError>>()) as super::super::Answer
        })
    }

    /// The deadline goes down the stack, and this layer's own timer still
    /// answers 504 when nothing below it does.
    #[tokio::test]
    async fn the_deadline_goes_with_the_request_and_still_fires_here() {
        let unused = "127.0.0.1:9".parse().expect("addr");
        let dst = destination(unused, 1, json!({ "timeoutMs": 200 }));
        let seen = Arc::new(Mutex::new(None));
        let mut timeout = Timeout::new(dst.clone(), stuck(seen.clone()));
        let before = Instant::now();
        let err = tower::Service::call(&mut timeout, request(None))
            .await
            .expect_err("timed out");
        assert_eq!(
            classify(&err, &dst.label),
            ProxyError::Timeout(dst.label.clone())
        );
        let Deadline(at) = seen.lock().expect("seen").expect("a deadline was set");
        assert!(at >= before + 200 * MS && at <= Instant::now(), "{at:?}");
    }

    #[tokio::test]
    async fn no_timeout_sets_no_deadline() {
        let unused = "127.0.0.1:9".parse().expect("addr");
        let dst = destination(unused, 1, json!({}));
        let seen = Arc::new(Mutex::new(Some(Deadline(Instant::now()))));
        let mut timeout = Timeout::new(dst, stuck(seen.clone()));
        let fut = tower::Service::call(&mut timeout, request(None));
        assert!(
            tokio::time::timeout(50 * MS, fut).await.is_err(),
            "nothing times out"
        );
        assert_eq!(*seen.lock().expect("seen"), None);
    }
}
