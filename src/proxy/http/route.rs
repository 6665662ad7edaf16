//! The first layer: match the request against the Service's routes and
//! pick a backend Service by weight. The route's timeout and retry
//! overrides travel with the request as [`RouteCtx`].

use std::sync::Arc;
use std::time::Duration;

use crate::config::{MatchConfig, PathMatchType, RetryConfig, RouteConfig};

use super::body::Request;

/// The route a request took, for the layers below.
#[derive(Clone, Debug)]
pub struct RouteCtx {
    /// `ns/route/rule`, or `default`.
    pub name: Arc<str>,
    pub timeout: Option<Duration>,
    pub retry: Option<Arc<RetryConfig>>,
    /// A health-check path: never retried, never a failure.
    pub excluded: bool,
}

thread_local! {
    static DEFAULT_ROUTE: Arc<str> = Arc::from("default");
}

impl RouteCtx {
    pub fn default_route() -> Self {
        Self {
            name: DEFAULT_ROUTE.with(Arc::clone),
            timeout: None,
            retry: None,
            excluded: false,
        }
    }
}

/// The first route with a match that holds (a route without matches
/// matches everything).
pub fn find<'a>(routes: &'a [RouteConfig], req: &Request) -> Option<&'a RouteConfig> {
    routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| matches(m, req)))
}

fn matches(m: &MatchConfig, req: &Request) -> bool {
    if let Some(method) = m.method
        && method.as_str() != req.method().as_str()
    {
        return false;
    }
    if let Some(p) = &m.path
        && !path_matches(p.type_, &p.value, req.uri().path())
    {
        return false;
    }
    m.headers.iter().all(|(name, value)| {
        req.headers()
            .get_all(name.as_str())
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes())
    })
}

/// `Exact`, or `PathPrefix` at a `/` boundary (`/api` matches `/api/x`,
/// not `/apix`).
pub fn path_matches(kind: PathMatchType, pattern: &str, path: &str) -> bool {
    match kind {
        PathMatchType::Exact => path == pattern,
        PathMatchType::PathPrefix => {
            let pattern = pattern.trim_end_matches('/');
            pattern.is_empty()
                || path == pattern
                || (path.starts_with(pattern) && path.as_bytes().get(pattern.len()) == Some(&b'/'))
        }
    }
}

/// Index of a backend chosen by weight; `None` when every weight is 0.
pub fn pick_weighted(weights: &[u32], rng: &mut fastrand::Rng) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut roll = rng.u64(0..total);
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if roll < w {
            return Some(i);
        }
        roll -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        let cases = [
            ("/api", "/api", true),
            ("/api", "/api/cart", true),
            ("/api", "/apix", false),
            ("/api/", "/api/cart", true),
            ("/", "/anything", true),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(
                path_matches(PathMatchType::PathPrefix, pattern, path),
                expected,
                "{pattern} {path}"
            );
        }
        assert!(!path_matches(PathMatchType::Exact, "/health", "/health/x"));
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hits = [0u32; 3];
        for _ in 0..10_000 {
            if let Some(i) = pick_weighted(&[90, 10, 0], &mut rng) {
                hits[i] += 1;
            }
        }
        assert_eq!(hits[2], 0, "weight 0 never picked");
        assert!((850..=950).contains(&(hits[0] / 10)), "{hits:?}");
        assert_eq!(pick_weighted(&[0, 0], &mut rng), None);
    }
}
