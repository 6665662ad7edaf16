//! Tier 3: what the balancer learns from a failed or timed-out try. A
//! failing endpoint must look expensive to P2C, never cheap; a try the
//! deadline cut short counts against its endpoint's breaker; a client that
//! gave up first counts as nothing. Real sockets on loopback: the real
//! proxy, real upstreams, a real client. Outcomes are counted, never timed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::net::TcpListener;

const INVENTORY: &str = "inventory.shop.svc.cluster.local:80";
const DST: &str = "dst=\"inventory.shop:80\"";

/// An address nothing listens on: connections to it are refused.
fn refusing() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
    // The listener is dropped here.
}

/// A server that accepts connections, reads nothing and never answers.
/// Counts the connections it accepted (HTTP/1.1: one per request sent to
/// it, as a timed-out request takes its connection with it).
struct BlackHole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BlackHole {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn inventory_proxy(endpoints: &[SocketAddr], policy: Option<serde_json::Value>) -> TestProxy {
    let cfg = config(vec![service("inventory", endpoints, policy, json!([]))]);
    start_proxy(&cfg, &[INVENTORY], &[]).await
}

/// A breaker that opens after 3 consecutive failures and stays open for
/// the rest of the test; no retries, so every try is one request.
fn breaker_policy(extra: serde_json::Value) -> serde_json::Value {
    let mut p = policy(json!({
        "retry": { "maxRetries": 0 },
        "circuitBreaker": { "consecutiveFailures": 3, "openMs": 60000, "maxOpenMs": 60000 },
    }));
    for (k, v) in extra.as_object().expect("object") {
        if k == "retry" {
            for (rk, rv) in v.as_object().expect("retry object") {
                p["retry"][rk] = rv.clone();
            }
        } else {
            p[k] = v.clone();
        }
    }
    p
}

/// Bug 2: a refused connection takes ~0.1 ms, faster than any real answer.
/// Recorded as an RTT it made the dead endpoint the cheapest, so P2C sent
/// it nearly every first try and the retry budget paid for all of them.
/// With the default policy (retry on connect failure only, no breaker),
/// each first try that reached the dead endpoint is one retry or one
/// budget refusal: their sum counts them.
#[tokio::test]
async fn a_refusing_endpoint_gets_few_first_tries_under_the_default_policy() {
    let healthy = Upstream::fixed(200, "ok").await;
    let p = inventory_proxy(&[refusing(), healthy.addr], None).await;
    let url = format!("{}/stock", p.outbound_url(0));
    let c = client();
    let total = 300;
    let mut failed = Vec::new();
    for i in 0..total {
        let r = send(&c, "GET", &url, &[]).await;
        if r.status != 200 {
            failed.push((i, r.status, r.proxy_error));
        }
    }
    let retries = p
        .metric(&format!("weft_proxy_retries_total{{{DST}}}"))
        .await;
    let refused = p
        .metric(&format!("weft_proxy_retry_budget_exhausted_total{{{DST}}}"))
        .await;
    let to_dead = retries + refused;
    assert!(
        to_dead < f64::from(total) * 0.2,
        "{to_dead} of {total} first tries went to the refusing endpoint \
         ({retries} retried, {refused} refused by the budget)"
    );
    assert!(failed.is_empty(), "every request succeeded: {failed:?}");
    assert_eq!(healthy.hits(), total as usize);
}

/// Three tries to an endpoint that accepts and never answers, under the
/// deadline `extra` sets: each is a 504, and they trip its breaker like
/// any other failures, so the next requests fail fast without reaching it.
async fn silence_trips_the_breaker(extra: serde_json::Value) {
    let hole = BlackHole::start().await;
    let p = inventory_proxy(&[hole.addr], Some(breaker_policy(extra))).await;
    let url = format!("{}/stock", p.outbound_url(0));
    let expected = [(504, "timeout"); 3]
        .into_iter()
        .chain([(503, "circuit-open"); 5]);
    for (i, (status, reason)) in expected.enumerate() {
        let r = get(&url).await;
        assert_eq!(
            (r.status, r.proxy_error.as_deref()),
            (status, Some(reason)),
            "request {i}"
        );
    }
    assert_eq!(hole.accepted(), 3, "the open breaker kept requests away");
    assert_eq!(
        p.metric(&format!("weft_proxy_circuit_opened_total{{{DST}}}"))
            .await,
        1.0
    );
}

/// Bug 1, the per-try deadline (the retry layer's; it is the only one, so
/// its timer and the balancer's expire at the same instant).
#[tokio::test]
async fn per_try_timeouts_open_the_breaker_and_then_requests_fail_fast() {
    silence_trips_the_breaker(json!({ "retry": { "perTryTimeoutMs": 200 } })).await;
}

/// Bug 1, the request deadline (the timeout layer's, no per-try limit).
#[tokio::test]
async fn request_timeouts_open_the_breaker_too() {
    silence_trips_the_breaker(json!({ "timeoutMs": 200 })).await;
}

/// Beside a healthy endpoint, the silent one stops getting traffic: each
/// timeout penalises its latency estimate, and its breaker trips after
/// three. The healthy endpoint answers in 50 ms, slower than the 30 ms a
/// never-measured endpoint is assumed to take: had the timeouts taught the
/// balancer nothing, the silent endpoint would look the cheaper one for
/// good and take every request.
#[tokio::test]
async fn a_silent_endpoint_beside_a_healthy_one_stops_getting_traffic() {
    let hole = BlackHole::start().await;
    let healthy = Upstream::start(Arc::new(|_, _| {
        (200, "ok".into(), Duration::from_millis(50))
    }))
    .await;
    let pol = breaker_policy(json!({ "retry": { "perTryTimeoutMs": 200 } }));
    let p = inventory_proxy(&[hole.addr, healthy.addr], Some(pol)).await;
    let url = format!("{}/stock", p.outbound_url(0));
    let c = client();
    let mut timeouts = 0;
    for _ in 0..30 {
        let r = send(&c, "GET", &url, &[]).await;
        match (r.status, r.proxy_error.as_deref()) {
            (200, None) => {}
            (504, Some("timeout")) => timeouts += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(
        timeouts <= 3,
        "at most the three timeouts that trip the breaker: {timeouts}"
    );
    assert!(hole.accepted() <= 3, "{} tries reached it", hole.accepted());
}

/// A client that gives up before the deadline tells nothing about the
/// endpoint: with a breaker that opens on one failure, three cancelled
/// requests leave it closed. The wait past the deadline makes sure the
/// proxy really dropped them (one still running would have timed out and
/// counted by then).
#[tokio::test]
async fn a_client_cancelling_before_the_deadline_counts_as_nothing() {
    let up = Upstream::start(Arc::new(|_, _| {
        (200, "late".into(), Duration::from_secs(30))
    }))
    .await;
    let mut pol = breaker_policy(json!({ "retry": { "perTryTimeoutMs": 1500 } }));
    pol["circuitBreaker"]["consecutiveFailures"] = json!(1);
    let p = inventory_proxy(&[up.addr], Some(pol)).await;
    let url = format!("{}/stock", p.outbound_url(0));
    for _ in 0..3 {
        let req = http::Request::get(&url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        // A fresh client per request: dropping it closes the connection.
        let c = client();
        let early = tokio::time::timeout(Duration::from_millis(300), c.request(req)).await;
        if let Ok(answer) = early {
            panic!(
                "answered before the client gave up (an opened breaker?): {:?}",
                answer.map(|r| (r.status(), r.headers().get("weft-proxy-error").cloned()))
            );
        }
    }
    assert_eq!(up.hits(), 3, "the requests reached the upstream");
    tokio::time::sleep(Duration::from_millis(2000)).await;

    up.set(Arc::new(|_, _| (200, "ok".into(), Duration::ZERO)));
    let r = get(&url).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "ok"),
        "the breaker stayed closed: {r:?}"
    );
    assert_eq!(
        p.metric(&format!("weft_proxy_circuit_opened_total{{{DST}}}"))
            .await,
        0.0
    );
}
