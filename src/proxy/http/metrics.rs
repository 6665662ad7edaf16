//! Counts each request on its edge (this workload -> destination, route,
//! status class) and records its latency. Errors the proxy answers for are
//! counted with the status they will get, and by reason.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::Shared;
use super::body::{BoxError, Request, Response};
use super::errors::classify;
use super::route::RouteCtx;
use crate::proxy::destination::Destination;
use crate::proxy::metrics::{Direction, EdgeLabels, ProxyErrorLabels, RequestLabels, status_class};

#[derive(Clone)]
pub struct Metrics<S> {
    dst: Arc<Destination>,
    shared: Arc<Shared>,
    inner: S,
}

impl<S> Metrics<S> {
    pub fn new(dst: Arc<Destination>, shared: Arc<Shared>, inner: S) -> Self {
        Self { dst, shared, inner }
    }
}

super::layer_service!(Metrics);

impl<S: super::Inner> Metrics<S> {
    fn handle(&mut self, req: Request) -> BoxFuture<'static, Result<Response, BoxError>> {
        let route = req
            .extensions()
            .get::<RouteCtx>()
            .map(|r| r.name.to_string())
            .unwrap_or_else(|| "default".to_owned());
        let (dst, shared) = (self.dst.clone(), self.shared.clone());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let class = match &result {
                Ok(rsp) => status_class(rsp.status()),
                Err(e) => {
                    let err = classify(e, &dst.label);
                    shared
                        .metrics
                        .proxy_errors
                        .get_or_create(&ProxyErrorLabels {
                            direction: Direction::Outbound,
                            dst: dst.label.clone(),
                            reason: err.reason().to_owned(),
                        })
                        .inc();
                    status_class(err.status_and_reason().0)
                }
            };
            let edge = EdgeLabels {
                direction: Direction::Outbound,
                src: shared.workload.clone(),
                dst: dst.label.clone(),
                route: route.clone(),
            };
            shared
                .metrics
                .latency
                .get_or_create(&edge)
                .observe(started.elapsed().as_secs_f64() * 1e3);
            shared
                .metrics
                .requests
                .get_or_create(&RequestLabels {
                    direction: Direction::Outbound,
                    src: edge.src,
                    dst: edge.dst,
                    route,
                    status_class: class,
                    tls: false,
                })
                .inc();
            result
        })
    }
}
