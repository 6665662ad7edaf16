//! A token bucket per destination, shared by every connection of this
//! proxy: calls beyond the rate get 429 without leaving the pod.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt};

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

super::layer_service!(RateLimit);

impl<S: super::Inner> RateLimit<S> {
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        if let Some(limiter) = &self.dst.limiter
            && !limiter.try_take(Instant::now())
        {
            let err = ProxyError::RateLimited(self.dst.label.clone());
            return async move { Err(err.into()) }.boxed();
        }
        self.inner.call(req)
    }
}
