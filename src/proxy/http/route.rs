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
/// matches everything). Paths match in the form the server's proxy hands
/// the application ([`normalize_path`]): otherwise `POST
/// /search/../charge` would take `/search`'s route, and the retries it
/// allows, to the app's `/charge`.
pub fn find<'a>(routes: &'a [RouteConfig], req: &Request) -> Option<&'a RouteConfig> {
    if routes.is_empty() {
        return None;
    }
    let path = normalize_path(req.uri().path());
    routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| matches(m, req, &path)))
}

fn matches(m: &MatchConfig, req: &Request, path: &str) -> bool {
    if let Some(method) = m.method
        && method.as_str() != req.method().as_str()
    {
        return false;
    }
    if let Some(p) = &m.path
        && !path_matches(p.type_, &p.value, path)
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

/// A request path as RFC 3986 normalises it: percent-encoded unreserved
/// characters decoded (`%2e` is `.`), other escapes' hex upper-cased, and
/// `.` and `..` segments removed (section 5.2.4). Access rules match, and
/// the app receives, this form: otherwise `/charges/../admin` would pass a
/// `/charges` prefix rule and reach `/admin` in any app that resolves dot
/// segments itself. Encoded `/` and `\` stay encoded (and so fail closed
/// against prefix rules), as Envoy keeps them by default. Paths that are
/// not absolute (`*`) are returned as they are.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let dotted = |p: &str| p.split('/').any(|seg| seg == "." || seg == "..");
    if !path.starts_with('/') || (!path.contains('%') && !dotted(path)) {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| Some((hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?)))
            .flatten();
        match escape {
            Some((hi, lo)) => {
                let c = char::from((hi * 16 + lo) as u8);
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                    decoded.push(c);
                } else {
                    decoded.push('%');
                    decoded.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
                }
                i += 3;
            }
            None => {
                // Not an escape: copy up to the next '%' (UTF-8 stays whole).
                let next = bytes[i + 1..]
                    .iter()
                    .position(|&b| b == b'%')
                    .map_or(bytes.len(), |n| i + 1 + n);
                decoded.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    if !dotted(&decoded) {
        return Cow::Owned(decoded);
    }
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other),
        }
        // `/a/.` and `/a/b/..` name a directory: keep the trailing slash.
        if n == last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    Cow::Owned(format!("/{}", out.join("/")))
}

/// Why a path in normal form ([`normalize_path`]) is still ambiguous: an
/// application may resolve it somewhere else than the form says, past a
/// prefix rule. A segment that is `.` or `..` once an escaped `/` or `\`
/// is read as a separator (`/public/..%2Fadmin`), or once its parameters
/// are cut off (`/public/..;/admin`, as Tomcat and Spring read it); a raw
/// `\`, which some servers take for `/`. The inbound proxy answers these
/// 400 rather than guess; an escaped slash in a name (`/repos/a%2Fb`) is
/// not ambiguous and passes.
pub fn ambiguous_path(normal: &str) -> Option<&'static str> {
    if !normal.contains(['%', ';', '\\']) {
        return None;
    }
    if normal.contains('\\') {
        return Some("a raw backslash, which some servers read as '/'");
    }
    let separated = normal.replace("%2F", "/").replace("%5C", "/");
    let dotted = separated.split('/').any(|seg| {
        let name = seg.split(';').next().unwrap_or_default();
        name == "." || name == ".."
    });
    dotted.then_some(
        "a '.' or '..' segment once '%2F', '%5C' or ';' parameters are read as an application may",
    )
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
    fn paths_normalise_as_rfc_3986_says() {
        for (raw, want) in [
            ("/charges/7", "/charges/7"),
            ("/charges/../admin", "/admin"),
            ("/charges/%2e%2e/admin", "/admin"),
            ("/charges/%2E%2e/admin", "/admin"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("/a//b/../c", "/a//c"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%5c..%5cb", "/a%5C..%5Cb"),
            ("/bad%zz/%4", "/bad%zz/%4"),
            ("/caf\u{e9}/%41", "/caf\u{e9}/A"),
            ("*", "*"),
            ("/", "/"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
        assert!(matches!(
            normalize_path("/plain/path"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn paths_that_an_app_may_resolve_elsewhere_are_ambiguous() {
        for (raw, ambiguous) in [
            ("/public/..;/admin", true),
            ("/public/..;jsessionid=1/admin", true),
            ("/public/.;/admin", true),
            ("/public/..%2Fadmin", true),
            ("/public/..%2fadmin", true),
            ("/public%5C..%5Cadmin", true),
            ("/public/..\\admin", true),
            ("/public\\x", true),
            ("/public/..%252Fadmin", false),
            ("/repos/group%2Fproject", false),
            ("/cart;jsessionid=1", false),
            ("/a/..b;c/d", false),
            ("/charges/7", false),
            ("/", false),
        ] {
            let normal = normalize_path(raw);
            assert_eq!(
                ambiguous_path(&normal).is_some(),
                ambiguous,
                "{raw} (normal form {normal})"
            );
        }
    }

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
