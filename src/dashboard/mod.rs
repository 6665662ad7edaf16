//! The mesh's web dashboard and the read-only API behind it, served on the
//! control plane's admin port (and by `weft local up`):
//!
//! - `GET /`, `/dashboard.js`, `/dashboard.css`: the page. Written by hand
//!   (no framework, no build step, no CDN) and embedded in the binary, so
//!   it needs no network at run time. Every URL it fetches is relative,
//!   so it works as well at the API server's service-proxy path
//!   (`/api/v1/namespaces/NS/services/NAME:admin/proxy/`) as at `/`.
//! - `GET /api/v1/stats?window=60s`: the golden signals ([`crate::meshstats`]).
//! - `GET /api/v1/rollouts`: every MTLSPolicy's way to Strict (phase,
//!   blockers, conditions), as the operator's cache holds it.

use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube::ResourceExt as _;
use serde::{Deserialize, Serialize};

use crate::api::MTLSPolicy;
use crate::meshstats::{SharedStats, StatsView};

pub mod proxy;

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

/// The page's policy: nothing but this origin. The API server's service
/// proxy serves the page and its API from one origin too.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The stats over a window, as the stats API answers.
pub type StatsSource = Arc<dyn Fn(Duration) -> StatsView + Send + Sync>;
/// The rollouts now.
pub type RolloutsSource = Arc<dyn Fn() -> RolloutsView + Send + Sync>;

/// What the dashboard's API reads.
#[derive(Clone)]
pub struct Sources {
    pub stats: StatsSource,
    pub rollouts: RolloutsSource,
}

impl Sources {
    /// The stats a scraping loop records into `stats`, and `rollouts`.
    pub fn new(stats: SharedStats, rollouts: RolloutsSource) -> Self {
        Sources {
            stats: Arc::new(move |window| {
                // Under the lock only the list of ticks is copied.
                let ticks = crate::proxy::resilience::lock(&stats).window(window);
                crate::meshstats::view_of(&ticks)
            }),
            rollouts,
        }
    }
}

/// The rollouts API's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutsView {
    pub version: String,
    pub rollouts: Vec<RolloutRow>,
    /// Said of all of them (`weft local` runs no staged rollout; the
    /// operator's cache has not listed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One MTLSPolicy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRow {
    pub namespace: String,
    pub name: String,
    /// `Strict` or `Permissive`, as asked.
    pub mode: String,
    /// `Staged` or `Immediate`.
    pub strategy: String,
    /// Where the rollout stands (`status.phase`); None before the operator
    /// has written one.
    pub phase: Option<String>,
    /// RFC 3339.
    pub phase_since: Option<String>,
    pub blockers: Vec<String>,
    pub conditions: Vec<ConditionRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionRow {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl RolloutsView {
    /// The rollouts of `policies`, by namespace and name.
    pub fn of<'a>(policies: impl IntoIterator<Item = &'a MTLSPolicy>) -> Self {
        let mut rollouts: Vec<RolloutRow> = policies.into_iter().map(RolloutRow::of).collect();
        rollouts.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        RolloutsView {
            version: crate::meshstats::API_VERSION.to_owned(),
            rollouts,
            note: None,
        }
    }
}

impl RolloutRow {
    fn of(p: &MTLSPolicy) -> Self {
        let status = p.status.clone().unwrap_or_default();
        RolloutRow {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            mode: format!("{:?}", p.spec.mode),
            strategy: format!("{:?}", p.spec.rollout.strategy),
            phase: status.phase.map(|ph| format!("{ph:?}")),
            phase_since: status.phase_since.map(|t| t.0.to_string()),
            blockers: status.blockers,
            conditions: status
                .conditions
                .into_iter()
                .map(|c| ConditionRow {
                    type_: c.type_,
                    status: c.status,
                    reason: c.reason,
                    message: c.message,
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
struct StatsQuery {
    window: Option<String>,
}

/// The page and its API. Read-only: every route is a GET.
pub fn router(sources: Sources) -> axum::Router {
    let Sources { stats, rollouts } = sources;
    axum::Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }),
        )
        .route(
            "/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }),
        )
        .route(
            "/api/v1/stats",
            get(move |query: axum::extract::Query<StatsQuery>| {
                let stats = stats.clone();
                async move {
                    let window = match query.window.as_deref().map(crate::meshstats::parse_window) {
                        None => Duration::from_secs(60),
                        Some(Ok(w)) => w,
                        Some(Err(why)) => {
                            return (http::StatusCode::BAD_REQUEST, why).into_response();
                        }
                    };
                    no_store(axum::Json(stats(window)))
                }
            }),
        )
        .route(
            "/api/v1/rollouts",
            get(move || {
                let rollouts = rollouts.clone();
                async move { no_store(axum::Json(rollouts())) }
            }),
        )
}

/// Whether a request names a loopback host (`127.0.0.1:PORT`,
/// `localhost:PORT`, `[::1]:PORT`). A dashboard served on this machine's
/// loopback answers only those: a page elsewhere that points a name of
/// its own at 127.0.0.1 (DNS rebinding) sends that name, and is refused.
pub fn loopback_host(headers: &http::HeaderMap) -> bool {
    let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let port_ok = |rest: &str| {
        rest.is_empty()
            || rest
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok())
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((name, after)) if port_ok(after) => name,
            _ => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) if port_ok(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `router`, answering 403 to requests that do not name a loopback host
/// ([`loopback_host`]): for a dashboard served on this machine.
pub fn loopback_only(router: axum::Router) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        |req: axum::extract::Request, next: axum::middleware::Next| async move {
            if loopback_host(req.headers()) {
                next.run(req).await
            } else {
                (
                    http::StatusCode::FORBIDDEN,
                    "open the dashboard at http://127.0.0.1:PORT/ or http://localhost:PORT/\n",
                )
                    .into_response()
            }
        },
    ))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (http::header::CONTENT_TYPE, content_type),
            (http::header::CACHE_CONTROL, "no-cache"),
            (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (http::header::CONTENT_SECURITY_POLICY, CSP),
            (http::header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

fn no_store(body: impl IntoResponse) -> Response {
    (
        [
            (http::header::CACHE_CONTROL, "no-store"),
            (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    fn sources() -> Sources {
        let policy: MTLSPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "MTLSPolicy",
            "metadata": {"name": "payments", "namespace": "payments"},
            "spec": {"mode": "Strict"},
            "status": {"phase": "Observing", "blockers": ["10.244.1.7 still speaks plaintext"]},
        }))
        .unwrap();
        let view = RolloutsView::of([&policy]);
        Sources {
            stats: Arc::new(|w| StatsView {
                window_seconds: w.as_secs_f64(),
                ..crate::meshstats::view_of(&[])
            }),
            rollouts: Arc::new(move || view.clone()),
        }
    }

    async fn get(path: &str) -> (http::StatusCode, http::HeaderMap, String) {
        let rsp = router(sources())
            .oneshot(
                http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = rsp.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    /// The page is served whole from the binary, under a policy that lets
    /// it load nothing from anywhere else, and it names its parts by
    /// relative URLs (so the API server's service-proxy path works).
    #[tokio::test]
    async fn the_page_is_embedded_and_loads_nothing_from_elsewhere() {
        let (status, headers, html) = get("/").await;
        assert_eq!(status, 200);
        assert_eq!(
            headers[http::header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(
            headers[http::header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'none'")
        );
        for part in ["src=\"dashboard.js\"", "href=\"dashboard.css\""] {
            assert!(html.contains(part), "{part} in {html}");
        }
        for text in [html.as_str(), DASHBOARD_JS, DASHBOARD_CSS] {
            assert!(
                !text.contains("http://")
                    && !text.contains("https://")
                    && !text.contains("\"//")
                    && !text.contains("'//"),
                "a URL elsewhere"
            );
        }
        assert!(DASHBOARD_JS.contains("\"api/v1/stats?window=\""));
        let (status, headers, _) = get("/dashboard.js").await;
        assert_eq!(
            (status, &headers[http::header::CONTENT_TYPE]),
            (
                http::StatusCode::OK,
                &http::HeaderValue::from_static("text/javascript; charset=utf-8")
            )
        );
    }

    #[test]
    fn only_a_loopback_host_is_served() {
        let host = |h: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::header::HOST, h.parse().unwrap());
            loopback_host(&m)
        };
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST",
            "[::1]:7070",
            "[::1]",
            "127.0.0.2:80",
        ] {
            assert!(host(ok), "{ok}");
        }
        for refused in [
            "evil.example:7070",
            "127.0.0.1.evil.example:7070",
            "[::1]evil",
            "[::1]:x",
            "localhost:7070:1",
            "10.244.1.7:7070",
        ] {
            assert!(!host(refused), "{refused}");
        }
        assert!(!loopback_host(&http::HeaderMap::new()));
    }

    #[tokio::test]
    async fn a_local_dashboard_refuses_a_rebound_name() {
        let app = loopback_only(router(sources()));
        let status = |host: &'static str| {
            let app = app.clone();
            async move {
                app.oneshot(
                    http::Request::get("/api/v1/rollouts")
                        .header(http::header::HOST, host)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
            }
        };
        assert_eq!(status("127.0.0.1:7080").await, 200);
        assert_eq!(status("shop-deals.example:7080").await, 403);
    }

    #[tokio::test]
    async fn the_api_answers_stats_and_rollouts_and_names_a_bad_window() {
        let (status, _, body) = get("/api/v1/stats?window=5m").await;
        assert_eq!(status, 200);
        let view: StatsView = serde_json::from_str(&body).unwrap();
        assert_eq!(view.window_seconds, 300.0);
        let (status, _, body) = get("/api/v1/stats?window=soon").await;
        assert_eq!(status, 400);
        assert!(body.contains("window: \"soon\""), "{body}");
        let (status, _, body) = get("/api/v1/rollouts").await;
        assert_eq!(status, 200);
        let view: RolloutsView = serde_json::from_str(&body).unwrap();
        let r = &view.rollouts[0];
        assert_eq!(
            (
                r.namespace.as_str(),
                r.mode.as_str(),
                r.strategy.as_str(),
                r.phase.as_deref()
            ),
            ("payments", "Strict", "Staged", Some("Observing"))
        );
        assert_eq!(r.blockers, ["10.244.1.7 still speaks plaintext"]);
    }
}
