//! Errors the proxy itself makes, classified once at the edge into an HTTP
//! status and a `weft-proxy-error` header naming the reason. Responses the
//! application sends pass through untouched and never reach this code.

use http::{HeaderValue, StatusCode};

use super::body::{self, BoxError, Response};

/// Header on every response the proxy generates.
pub const ERROR_HEADER: &str = "weft-proxy-error";

/// Why the proxy answered instead of the application.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("circuit open: {0} is failing; requests fail fast until it recovers")]
    CircuitOpen(String),
    #[error("no endpoints for {0}")]
    NoEndpoints(String),
    #[error("no backend exists for route {0}")]
    NoBackends(String),
    #[error("request to {0} timed out")]
    Timeout(String),
    /// The caller's own deadline (propagated: `grpc-timeout`,
    /// `weft-timeout`, `weft-deadline`) passed: what was not done.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("connecting to {0} failed: {1}")]
    Connect(String, String),
    #[error("{0} reset or closed the connection: {1}")]
    UpstreamReset(String, String),
    #[error("rate limit of calls to {0} exceeded")]
    RateLimited(String),
    /// The Service's own back-off (its `Retry-After`) runs longer than the
    /// call may wait, or too many wait already: what is left, in whole
    /// seconds rounded up.
    #[error("{0} asked callers to back off; try again in {1} s")]
    BackingOff(String, u64),
    /// Refused by one of this pod's inbound rate limits: which, and the
    /// whole seconds (rounded up) until it admits again.
    #[error("rate limit exceeded: {0}; try again in {1} s")]
    InboundRateLimited(String, u64),
    #[error("access denied: {0}")]
    Forbidden(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Egress `RegistryOnly`, and no Service or ExternalService names the
    /// destination.
    #[error(
        "egress to {0} is refused: no Service or ExternalService of this namespace names it (egress RegistryOnly); declare it with an ExternalService"
    )]
    EgressDenied(String),
}

impl ProxyError {
    /// The status and the short reason put in the header.
    pub fn status_and_reason(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::CircuitOpen(_) => (StatusCode::SERVICE_UNAVAILABLE, "circuit-open"),
            ProxyError::NoEndpoints(_) => (StatusCode::SERVICE_UNAVAILABLE, "no-endpoints"),
            ProxyError::NoBackends(_) => (StatusCode::SERVICE_UNAVAILABLE, "no-backends"),
            ProxyError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ProxyError::DeadlineExceeded(_) => (StatusCode::GATEWAY_TIMEOUT, "deadline-exceeded"),
            ProxyError::Connect(..) => (StatusCode::BAD_GATEWAY, "connect-error"),
            ProxyError::UpstreamReset(..) => (StatusCode::BAD_GATEWAY, "upstream-reset"),
            ProxyError::RateLimited(_) | ProxyError::BackingOff(..) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate-limited")
            }
            // Its own name: a client proxy tells a pod's refusal (steer
            // around that pod) from its own or the Service's back-off.
            ProxyError::InboundRateLimited(..) => {
                (StatusCode::TOO_MANY_REQUESTS, "inbound-rate-limited")
            }
            ProxyError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ProxyError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ProxyError::EgressDenied(_) => (StatusCode::FORBIDDEN, "egress-denied"),
        }
    }

    /// The reason label, for metrics.
    pub fn reason(&self) -> &'static str {
        self.status_and_reason().1
    }
}

/// Finds the [`ProxyError`] in a boxed error chain; anything else is an
/// upstream failure we did not classify, reported as 502.
pub fn classify(err: &BoxError, target: &str) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = cur {
        if let Some(p) = e.downcast_ref::<ProxyError>() {
            return p.clone();
        }
        cur = e.source();
    }
    ProxyError::UpstreamReset(target.to_owned(), err.to_string())
}

/// A wait as a `Retry-After` says it: whole seconds, rounded up, at
/// least one.
pub fn retry_after_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The response for a proxy error.
pub fn response(err: &ProxyError) -> Response {
    let (status, reason) = err.status_and_reason();
    let mut rsp = http::Response::new(body::full(format!("{err}\n")));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason));
    if let ProxyError::BackingOff(_, seconds) | ProxyError::InboundRateLimited(_, seconds) = err {
        rsp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(*seconds));
    }
    // For the access log: the proxy's own answer, which a header an
    // upstream sent cannot claim to be.
    rsp.extensions_mut()
        .insert(crate::proxy::accesslog::ProxyAnswer(reason));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Whether a response was made by the proxy rather than the application.
pub fn is_proxy_response(rsp: &http::Response<impl Sized>) -> bool {
    rsp.headers().contains_key(ERROR_HEADER)
}
