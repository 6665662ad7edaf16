//! `weft stat` / `weft edges` against the fake API server (tier 2): the
//! stats are read through the API server's service proxy, and a refusal
//! names the permission to ask for. Tier 5 runs the control plane in the
//! test process, which no service proxy can reach: the path through a
//! real API server's service proxy is checked on a cluster by the e2e
//! suite (`check_stats` in `e2e/run.sh`).

#[path = "support/fakeapi.rs"]
mod fakeapi;

use clap::Parser as _;
use serde_json::json;
use weft::statcli::{StatArgs, fetch, filter, proxy_path, render_edges};

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: StatArgs,
}

fn args(extra: &[&str]) -> StatArgs {
    Cli::parse_from(std::iter::once("weft").chain(extra.iter().copied())).args
}

fn stats() -> serde_json::Value {
    let edge = |src: &str, dst: &str, success: f64, open: u32| {
        json!({
            "namespace": "shop", "src": src, "dst": dst, "route": "default",
            "requests": 600, "rps": 10.0, "successRate": success,
            "p50Ms": 2.0, "p95Ms": 8.0, "p99Ms": 12.5, "mtlsShare": 1.0,
            "splitShare": null, "retriesPerSecond": 0.5, "retryBudgetExhausted": 0,
            "rateLimited": 0, "circuitRejected": 0,
            "circuit": {"closed": 2 - open, "open": open, "halfOpen": 0},
        })
    };
    json!({
        "version": "v1", "windowSeconds": 60.0, "ticks": 6, "proxies": 4, "unreadable": 0,
        "edges": [
            edge("shopper", "checkout.shop:80", 1.0, 0),
            edge("checkout", "payments.shop:80", 0.62, 2),
        ],
        "workloads": [],
    })
}

#[tokio::test]
async fn weft_edges_reads_the_stats_through_the_service_proxy() {
    let (fake, client) = fakeapi::start().await;
    let path = proxy_path("weft-system", "60s");
    let (object_path, _) = path.split_once('?').expect("query");
    fake.lock()
        .expect("fake")
        .objects
        .insert(object_path.to_owned(), stats());
    let a = args(&["--sort", "success"]);
    let view = filter(fetch(&client, &a).await.expect("stats"), &a);
    assert_eq!(view.edges[0].dst, "payments.shop:80", "worst first");
    let text = render_edges(&view);
    let line = text
        .lines()
        .find(|l| l.contains("checkout -> payments.shop:80"))
        .expect("edge");
    assert!(
        line.contains("62.0%") && line.contains("OPEN 2/2"),
        "{line}"
    );
    let seen = fake.lock().expect("fake").seen.clone();
    let asked = seen.last().expect("a request");
    assert_eq!(
        (asked.path.as_str(), asked.query.as_str()),
        (object_path, "window=60s")
    );

    // Without `get services/proxy`: the error says what to grant.
    fake.lock()
        .expect("fake")
        .refuse_reads
        .insert(object_path.to_owned(), 403);
    let e = fetch(&client, &a).await.expect_err("refused");
    assert!(
        format!("{e:#}").contains("`get` on `services/proxy`"),
        "{e:#}"
    );

    // A window outside what the stats keep is refused before any request.
    let e = fetch(&client, &args(&["--window", "1h"]))
        .await
        .expect_err("too long");
    assert!(format!("{e:#}").contains("outside 1s..10m"), "{e:#}");
}

/// `weft dashboard` (#20 item 3) forwards the page's own GETs to the
/// service proxy with the kubeconfig's credentials, and nothing else: no
/// other path (it would be any API call as the user), no other method,
/// and no request whose Host is not loopback (DNS rebinding).
#[tokio::test]
async fn weft_dashboard_forwards_only_the_pages_own_reads_to_the_service_proxy() {
    use tower::ServiceExt as _;
    let (fake, client) = fakeapi::start().await;
    let prefix = weft::dashboard::proxy::service_proxy_prefix("weft-system");
    fake.lock()
        .expect("fake")
        .objects
        .insert(format!("{prefix}/api/v1/stats"), stats());
    let app = weft::dashboard::proxy::router(client, "weft-system");
    let send = |method: &str, path: &str, host: &str| {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .body(axum::body::Body::empty())
            .expect("request");
        let app = app.clone();
        async move {
            let rsp = app.oneshot(req).await.expect("answer");
            let status = rsp.status();
            let body = axum::body::to_bytes(rsp.into_body(), 1 << 20)
                .await
                .expect("body");
            (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (status, body) = send("GET", "/api/v1/stats?window=5m", "127.0.0.1:7070").await;
    assert_eq!(status, 200, "{body}");
    let view: weft::meshstats::StatsView = serde_json::from_str(&body).expect("stats");
    assert_eq!(view.edges.len(), 2);
    let asked = fake
        .lock()
        .expect("fake")
        .seen
        .last()
        .cloned()
        .expect("a request");
    assert_eq!(
        (asked.path.as_str(), asked.query.as_str()),
        (format!("{prefix}/api/v1/stats").as_str(), "window=5m")
    );

    let before = fake.lock().expect("fake").seen.len();
    for (method, path, host, want) in [
        (
            "GET",
            "/api/v1/namespaces/kube-system/secrets",
            "127.0.0.1:7070",
            404,
        ),
        (
            "GET",
            "/api/v1/stats/../../../secrets",
            "127.0.0.1:7070",
            404,
        ),
        ("POST", "/api/v1/stats", "127.0.0.1:7070", 405),
        ("GET", "/api/v1/stats", "attacker.example:7070", 403),
        ("GET", "/", "127.0.0.1.attacker.example", 403),
    ] {
        let (status, body) = send(method, path, host).await;
        assert_eq!(status, want, "{method} {path} (Host {host}): {body}");
    }
    assert_eq!(
        fake.lock().expect("fake").seen.len(),
        before,
        "nothing refused reached the API server"
    );
}
