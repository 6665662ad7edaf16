//! Request and response types shared by every layer.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

/// Any error inside the stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// An error while streaming a body. A concrete type rather than a boxed
/// trait object, so bodies carry no trait-object lifetime that the
/// compiler's `Send` checks on async blocks would have to generalise over.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// The one body type every layer speaks.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;
pub type Request = http::Request<Body>;
pub type Response = http::Response<Body>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of known bytes followed by `trailers`, when there are any: a
/// request buffered for replay keeps the trailers its client sent.
pub fn full_with_trailers(bytes: Bytes, trailers: Option<http::HeaderMap>) -> Body {
    match trailers {
        None => full(bytes),
        Some(trailers) => Full::new(bytes)
            .map_err(|never| match never {})
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed_unsync(),
    }
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(|e| BodyError(e.into())).boxed_unsync()
}
