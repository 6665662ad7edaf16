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
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use support::*;

/// The namespace's config: ExternalService `carrier` (plain HTTP, the
/// vendor at `vendor`), limited to 30 requests per second for the
/// namespace's pods together (burst 30), shared among `accounts`' pods
/// (empty: all).
fn carrier(vendor: std::net::SocketAddr, accounts: &[&str]) -> Value {
    carrier_at(vendor, accounts, &["api.carrier.test"])
}

/// [`carrier`] named by `hosts`.
fn carrier_at(vendor: std::net::SocketAddr, accounts: &[&str], hosts: &[&str]) -> Value {
    let mut c = config(vec![]);
    c["outbound"]["externalServices"] = json!([{
        "name": "carrier", "namespace": "shop",
        "hosts": hosts,
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
        p.publish_endpoints(&doc).await;
    }
}

/// Each pod's app calls the vendor as fast as it is answered (a 429
/// waits 5 ms, as a client backing off a little) until `stop`, naming
/// `hosts` in turn; the calls the proxy let through, per pod.
fn hammer(pods: &[&TestProxy], stop: Arc<AtomicBool>, hosts: &[&str]) -> Vec<Arc<AtomicUsize>> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    pods.iter()
        .map(|p| {
            let (url, stop, passed, hosts) = (
                p.outbound_url(0),
                stop.clone(),
                Arc::new(AtomicUsize::new(0)),
                hosts.clone(),
            );
            let count = passed.clone();
            tokio::spawn(async move {
                let c = client();
                let mut turn = 0;
                while !stop.load(Ordering::Relaxed) {
                    turn += 1;
                    let req = http::Request::get(format!("{url}/rates"))
                        .header(http::header::HOST, &hosts[turn % hosts.len()])
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

/// What the vendor got from fresh proxies under load: in the first 300
/// ms (the bursts), and per second over `window` after a second for them
/// to drain, over the time actually measured (a late wake-up of this test
/// on a busy machine must not read as a faster vendor); and per pod, the
/// calls let through in that window.
struct Measured {
    burst: usize,
    rate: f64,
    each: Vec<usize>,
    seconds: f64,
}

async fn measure(
    vendor: &Upstream,
    pods: &[&TestProxy],
    window: Duration,
    hosts: &[&str],
) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let start = vendor.hits();
    let passed = hammer(pods, stop.clone(), hosts);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let burst = vendor.hits() - start;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (hits0, each0): (usize, Vec<usize>) = (
        vendor.hits(),
        passed.iter().map(|p| p.load(Ordering::Relaxed)).collect(),
    );
    let from = Instant::now();
    tokio::time::sleep(window).await;
    // Every count read before the time is taken: on a loaded machine
    // the reads themselves take a while, which must count as measured.
    let hits = vendor.hits() - hits0;
    let each = passed
        .iter()
        .zip(each0)
        .map(|(p, before)| p.load(Ordering::Relaxed) - before)
        .collect();
    let seconds = from.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    Measured {
        burst,
        rate: hits as f64 / seconds,
        each,
        seconds,
    }
}

impl Measured {
    /// The vendor got 30/s (within 10 %, and used rather than starved),
    /// no pod more than `share` per second.
    fn within_limit(&self, share: f64) {
        let m = self;
        assert!(
            m.rate <= 33.0,
            "{:.1}/s reached the vendor: {:?}",
            m.rate,
            m.each
        );
        assert!(
            m.rate >= 24.0,
            "the limit is used, not starved: {:.1}/s",
            m.rate
        );
        for got in &m.each {
            // A call let through just before the window and answered in
            // it counts in it: a few of them.
            let most = share * m.seconds + 3.0;
            assert!(
                *got as f64 <= most,
                "a pod over its {share}/s: {:?}",
                m.each
            );
        }
    }
}

const CARRIER: &[&str] = &["api.carrier.test"];

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
    let m = measure(&vendor, &[&a, &b, &c], window, CARRIER).await;
    // The bursts: a third of 30 each (and what 300 ms earn), not 30 each.
    assert!(m.burst <= 30 + 10, "{} in the first 300 ms", m.burst);
    // 30/s for the three together; each takes a third. (Far above 30 if
    // each applied the whole limit: three pods hammering get 90.)
    m.within_limit(10.0);

    // Scaled to six: the operator counts six, every pod takes a sixth.
    let (d, e, f) = (
        pod(&cfg, "default").await,
        pod(&cfg, "default").await,
        pod(&cfg, "default").await,
    );
    let six = [&a, &b, &c, &d, &e, &f];
    count_clients(&six, "six", json!({ "default": 6 })).await;
    let m = measure(&vendor, &six, window, CARRIER).await;
    m.within_limit(5.0);
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
    let m = measure(
        &vendor,
        &[&checkout, &catalog],
        Duration::from_secs(2),
        CARRIER,
    )
    .await;
    m.within_limit(30.0);
    assert_eq!(m.each[1], 0, "a pod of another account gets no share");
    let refused = catalog
        .metric(
            "weft_proxy_requests_total{direction=\"outbound\",src=\"unknown\",dst=\"api.carrier.test:80\",route=\"default\",status_class=\"4xx\"",
        )
        .await;
    assert!(refused >= 1.0, "{}", catalog.metrics().await);
}

/// One limit for the target: each host a wildcard matches is its own
/// destination (breaker, series), but they all draw on the one quota.
#[tokio::test]
async fn the_hosts_of_one_external_service_draw_on_one_limit() {
    let vendor = Upstream::fixed(200, "rates").await;
    let cfg = carrier_at(vendor.addr, &[], &["*.carrier.test"]);
    let p = pod(&cfg, "default").await;
    count_clients(&[&p], "one", json!({ "default": 1 })).await;
    let hosts = ["eu.carrier.test", "us.carrier.test", "asia.carrier.test"];
    let m = measure(&vendor, &[&p], Duration::from_secs(2), &hosts).await;
    assert!(m.burst <= 30 + 10, "{} in the first 300 ms", m.burst);
    m.within_limit(30.0);
}
