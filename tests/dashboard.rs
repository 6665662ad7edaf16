//! The Grafana dashboard the chart ships (`charts/weft/dashboards/`) asks
//! only for metrics a weft proxy exports, of the type the query assumes.
//! (The chart's monitoring templates: `tests/manifests.rs`.)

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/weft/dashboards/weft-mesh.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON")
}

/// Every `weft_…` metric name in the dashboard's queries.
fn queried(dash: &Value) -> Vec<String> {
    let mut names = Vec::new();
    let exprs = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .chain(
            dash["templating"]["list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["definition"].as_str().map(str::to_owned)),
        );
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("weft_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The metric family a sample name belongs to, and the type that name
/// implies (OpenMetrics: counters' samples end in `_total`, histograms'
/// in `_bucket`, `_sum`, `_count`).
fn family(name: &str) -> (&str, &str) {
    for (suffix, kind) in [
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_sum", "histogram"),
        ("_count", "histogram"),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            return (base, kind);
        }
    }
    (name, "gauge")
}

/// A proxy that has seen what the dashboard shows: requests to a failing
/// Service (retries, the budget running out, the circuit opening and
/// failing fast), plaintext refused under STRICT, and a request an
/// AccessPolicy denies. Its `/metrics` then holds every family the
/// dashboard queries, and the stats API reads the same output.
#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported_by_the_proxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dash = dashboard();
    let names = queried(&dash);
    assert!(names.len() >= 10, "the dashboard queries {names:?}");

    let up = Upstream::fixed(503, "down").await;
    let failing = policy(serde_json::json!({
        "retry": { "maxRetries": 1, "retryOn": ["5xx"],
                   "budget": { "percent": 0, "minPerSecond": 1, "windowMs": 1000 } },
        "circuitBreaker": { "consecutiveFailures": 3, "openMs": 60000, "maxOpenMs": 60000 },
    }));
    let mut cfg = config(vec![service(
        "inventory",
        &[up.addr],
        Some(failing),
        serde_json::json!([]),
    )]);
    let (strict_port, guarded_port) = (up.addr.port(), up.addr.port().wrapping_add(1));
    cfg["inbound"] = serde_json::json!({
        "mode": "strict",
        "plaintextPorts": [guarded_port],
        "authorizations": [{
            "policy": "shop/payments-callers",
            "rules": [{ "identities": [{ "namespace": "shop", "serviceAccount": "checkout" }] }],
        }],
    });
    let p = start_proxy(
        &cfg,
        &["inventory.shop:80"],
        &[
            "--inbound-map",
            &format!("127.0.0.1:0={strict_port}"),
            "--inbound-map",
            &format!("127.0.0.1:0={guarded_port}"),
        ],
    )
    .await;
    let c = client();
    for _ in 0..6 {
        let _ = send(&c, "GET", &format!("{}/stock", p.outbound_url(0)), &[]).await;
    }
    // Plaintext to a STRICT port: refused.
    if let Ok(mut s) = tokio::net::TcpStream::connect(p.running.inbound[0]).await {
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 64])).await;
    }
    // Plaintext allowed on the other port, but no identity the policy names.
    let denied = send(&c, "GET", &format!("http://{}/", p.running.inbound[1]), &[]).await;
    assert_eq!(denied.status, 403);
    p.wait_metric("weft_proxy_inbound_plaintext_rejected_total", 1.0)
        .await;

    let text = p.metrics().await;
    let missing: Vec<String> = names
        .iter()
        .filter(|n| {
            let (base, kind) = family(n);
            !text.contains(&format!("# TYPE {base} {kind}\n"))
                || !text.lines().any(|l| l.starts_with(n.as_str()))
        })
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the proxy does not export (or not of that type): {missing:?}"
    );

    // The stats API reads this very output: the failing edge, its retries
    // and its circuit.
    let counts = weft::meshstats::ProxyCounts::read("shop", &text).expect("readable");
    let (edge, r) = counts
        .edges
        .iter()
        .find(|(k, _)| k.dst.starts_with("inventory.shop"))
        .expect("the edge to inventory");
    assert_eq!((r.requests, r.succeeded), (6.0, 0.0), "{edge:?}");
    assert!(r.buckets.len() > 1, "latency buckets read");
    let (_, d) = counts.dsts.iter().next().expect("per destination");
    assert!(
        d.retry_budget_exhausted > 0.0 && d.circuit_rejected > 0.0,
        "{d:?}"
    );
    let (_, circuit) = counts.circuits.iter().next().expect("circuit");
    assert_eq!(circuit.open, 1);
}
