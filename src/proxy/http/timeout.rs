//! The request deadline: the route's timeout, else the Service policy's.
//! It covers every retry; on expiry the client gets 504.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

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

super::layer_service!(Timeout);

impl<S: super::Inner> Timeout<S> {
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
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
