//! A token bucket per destination, shared by every connection of this
//! proxy: calls beyond the rate get 429 without leaving the pod.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt};
use tower::Service;

use super::body::{BoxError, Request, Response};
use super::errors::ProxyError;
use crate::proxy::destination::Destination;

#[derive(Clone)]
pub struct RateLimit<S> {
    dst: Arc<Destination>,
    inner: S,
}

impl<S> RateLimit<S> {
    pub fn new(dst: Arc<Destination>, inner: S) -> Self {
        Self { dst, inner }
    }
}

impl<S> Service<Request> for RateLimit<S>
where
    S: Service<Request, Response = Response, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if let Some(limiter) = &self.dst.limiter
            && !limiter.try_take(Instant::now())
        {
            let err = ProxyError::RateLimited(self.dst.label.clone());
            return async move { Err(err.into()) }.boxed();
        }
        self.inner.call(req).boxed()
    }
}
