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
