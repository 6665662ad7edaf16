//! The request deadline: the route's timeout, else the Service policy's.
//! It covers every retry; on expiry the client gets 504.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tower::Service;

use super::body::{BoxError, Request, Response};
use super::errors::ProxyError;
use super::route::RouteCtx;
use crate::proxy::destination::Destination;

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

impl<S> Service<Request> for Timeout<S>
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
        let deadline = req
            .extensions()
            .get::<RouteCtx>()
            .and_then(|r| r.timeout)
            .or(self.dst.policy.timeout_ms.map(Duration::from_millis));
        let fut = self.inner.call(req);
        let Some(deadline) = deadline else {
            return Box::pin(fut);
        };
        let label = self.dst.label.clone();
        Box::pin(async move {
            match tokio::time::timeout(deadline, fut).await {
                Ok(result) => result,
                Err(_) => Err(ProxyError::Timeout(label).into()),
            }
        })
    }
}
