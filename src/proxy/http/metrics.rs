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
use crate::proxy::metrics::{Direction, EdgeLabels, EdgeSeries, ProxyErrorLabels};

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
        let route: Arc<str> = req
            .extensions()
            .get::<RouteCtx>()
            .map(|r| r.name.clone())
            .unwrap_or_else(|| Arc::from("default"));
        if let Some(record) = crate::proxy::accesslog::RecordRef::of(&req) {
            record.destination(&self.dst, &route);
        }
        let (dst, shared) = (self.dst.clone(), self.shared.clone());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let mut tls = false;
            let status = match &result {
                Ok(rsp) => {
                    tls = rsp
                        .extensions()
                        .get::<super::pool::OverMeshTls>()
                        .is_some_and(|t| t.0);
                    rsp.status()
                }
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
                    err.status_and_reason().0
                }
            };
            let edges = if tls { &dst.tls_edges } else { &dst.edges };
            let series = edges.get(&route, || {
                let edge = EdgeLabels {
                    direction: Direction::Outbound,
                    src: shared.workload.clone(),
                    dst: dst.label.clone(),
                    route: route.to_string(),
                };
                EdgeSeries::new(&shared.metrics, edge, tls)
            });
            series.record(&shared.metrics, status, started);
            result
        })
    }
}
