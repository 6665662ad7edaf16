//! Tier 3, issue 21 item 3: a rate limit for a whole namespace. A vendor
//! counts an API key's quota across every pod that uses it; a TrafficPolicy
//! with `rateLimit.scope: Namespace` says so, the operator counts the
//! namespace's client pods in the endpoints document (`clientProxies`),
//! and each proxy takes its share. Real proxies, each reading its own
//! copy of the mounted documents as in its own pod; the vendor stub's own
//! count is the proof.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::*;

/// The namespace's config: ExternalService `carrier` (plain HTTP, the
/// vendor at `vendor`), limited to 30 requests per second for the
/// namespace's pods together (burst 30), shared among `accounts`' pods
/// (empty: all).
fn carrier(vendor: std::net::SocketAddr, accounts: &[&str]) -> Value {
    let mut c = config(vec![]);
    c["outbound"]["externalServices"] = json!([{
        "name": "carrier", "namespace": "shop",
        "hosts": ["api.carrier.test"],
        "ports": [{ "port": 80, "targetPort": vendor.port() }],
        "endpoints": [vendor.to_string()],
        "policy": policy(json!({ "rateLimit": {
            "requestsPerSecond": 30, "burst": 30,
            "shared": { "serviceAccounts": accounts },
        }})),
    }]);
    c
}

/// A proxy of a pod running as ServiceAccount `sa`; the app's connection
/// to the vendor arrives as if dialled to 127.0.0.2:80 (nothing listens
/// there: the request is routed by its `Host`).
async fn pod(config: &Value, sa: &str) -> TestProxy {
    start_proxy(
        config,
        &["127.0.0.2:80"],
        &["--service-account", sa, "--no-api-watch"],
    )
    .await
}

/// Publishes the operator's count of the namespace's client pods to
/// `pods` (each its own mounted copy) and waits until each took it.
async fn count_clients(pods: &[&TestProxy], generation: &str, clients: Value) {
    let doc = json!({
        "schemaVersion": "1.0", "generation": generation, "namespace": "shop",
        "services": {}, "clientProxies": clients,
    });
    for p in pods {
        let before = p.metric("weft_proxy_endpoints_reloads").await;
        write_atomic(
            &p.dir.path().join("endpoints.json"),
            doc.to_string().as_bytes(),
        );
        p.wait_metric("weft_proxy_endpoints_reloads", before + 1.0)
            .await;
    }
}

/// Each pod's app calls the vendor as fast as it is answered (a 429
/// waits 5 ms, as a client backing off a little) until `stop`; the
/// calls the proxy let through, per pod.
fn hammer(pods: &[&TestProxy], stop: Arc<AtomicBool>) -> Vec<Arc<AtomicUsize>> {
    pods.iter()
        .map(|p| {
            let (url, stop, passed) = (
                p.outbound_url(0),
                stop.clone(),
                Arc::new(AtomicUsize::new(0)),
            );
            let count = passed.clone();
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    let req = http::Request::get(format!("{url}/rates"))
                        .header(http::header::HOST, "api.carrier.test")
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    match c.request(req).await.map(|r| r.status().as_u16()) {
                        Ok(200) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            });
            passed
        })
        .collect()
}

/// What reached the vendor per second over `window`, after a second for
/// the bursts to drain; and what each pod got through in that window.
async fn measure(vendor: &Upstream, pods: &[&TestProxy], window: Duration) -> (f64, Vec<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let passed = hammer(pods, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (hits0, each0): (usize, Vec<usize>) = (
        vendor.hits(),
        passed.iter().map(|p| p.load(Ordering::Relaxed)).collect(),
    );
    tokio::time::sleep(window).await;
    let hits = vendor.hits() - hits0;
    let each = passed
        .iter()
        .zip(each0)
        .map(|(p, before)| p.load(Ordering::Relaxed) - before)
        .collect();
    stop.store(true, Ordering::Relaxed);
    (hits as f64 / window.as_secs_f64(), each)
}

#[tokio::test]
async fn three_pods_send_the_namespace_limit_together_and_six_share_it_again() {
    let vendor = Upstream::fixed(200, "rates").await;
    let cfg = carrier(vendor.addr, &[]);
    let (a, b, c) = (
        pod(&cfg, "default").await,
        pod(&cfg, "default").await,
        pod(&cfg, "default").await,
    );
    count_clients(&[&a, &b, &c], "three", json!({ "default": 3 })).await;

    let window = Duration::from_secs(3);
    let (rate, each) = measure(&vendor, &[&a, &b, &c], window).await;
    // 30/s for the three together; each takes a third. (Far above 30 if
    // each applied the whole limit: three pods hammering get 90.)
    assert!(rate <= 33.0, "{rate:.1}/s reached the vendor: {each:?}");
    assert!(rate >= 24.0, "the limit is used, not starved: {rate:.1}/s");
    for got in &each {
        assert!(*got <= 3 * 10 + 2, "a pod over its third: {each:?}");
    }

    // Scaled to six: the operator counts six, every pod takes a sixth.
    let (d, e, f) = (
        pod(&cfg, "default").await,
        pod(&cfg, "default").await,
        pod(&cfg, "default").await,
    );
    let six = [&a, &b, &c, &d, &e, &f];
    count_clients(&six, "six", json!({ "default": 6 })).await;
    let (rate, each) = measure(&vendor, &six, window).await;
    assert!(rate <= 33.0, "{rate:.1}/s reached the vendor: {each:?}");
    assert!(rate >= 24.0, "the limit is used, not starved: {rate:.1}/s");
    for got in &each {
        assert!(*got <= 3 * 5 + 2, "a pod over its sixth: {each:?}");
    }
}

#[tokio::test]
async fn the_limit_is_divided_among_the_named_accounts_and_others_get_none() {
    let vendor = Upstream::fixed(200, "rates").await;
    let cfg = carrier(vendor.addr, &["checkout"]);
    let checkout = pod(&cfg, "checkout").await;
    let catalog = pod(&cfg, "catalog").await;
    // Twenty catalog pods never call the carrier: they do not dilute the
    // one checkout pod's share, which is the whole limit.
    count_clients(
        &[&checkout, &catalog],
        "named",
        json!({ "checkout": 1, "catalog": 20 }),
    )
    .await;
    let (rate, each) = measure(&vendor, &[&checkout, &catalog], Duration::from_secs(2)).await;
    assert!((24.0..=33.0).contains(&rate), "{rate:.1}/s: {each:?}");
    assert_eq!(each[1], 0, "a pod of another account gets no share");
    let refused = catalog
        .metric(
            "weft_proxy_requests_total{direction=\"outbound\",src=\"unknown\",dst=\"api.carrier.test:80\",route=\"default\",status_class=\"4xx\"",
        )
        .await;
    assert!(refused >= 1.0, "{}", catalog.metrics().await);
}
