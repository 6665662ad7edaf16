//! Tier 3: the real proxy between a real client and a real upstream on
//! loopback. Each test asserts what a user of the mesh would see: status
//! codes, the `weft-proxy-error` header, how many requests the upstream
//! received, metric values.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;

const INVENTORY: &str = "inventory.shop.svc.cluster.local:80";

/// Fails the first `n` requests with `status`, then answers 200.
fn fail_first(n: usize, status: u16) -> Behaviour {
    Arc::new(move |i, _| {
        if i < n {
            (status, "down".into(), Duration::ZERO)
        } else {
            (200, "ok".into(), Duration::ZERO)
        }
    })
}

fn retries(attempts: u32, retry_on: &[&str], budget: serde_json::Value) -> serde_json::Value {
    json!({ "retry": { "maxRetries": attempts, "retryOn": retry_on, "budget": budget } })
}

/// A proxy whose explicit outbound listener reaches Service `inventory`
/// at `endpoint`, with `policy` (or the defaults).
async fn inventory_proxy(
    endpoint: std::net::SocketAddr,
    policy: Option<serde_json::Value>,
) -> TestProxy {
    let cfg = config(vec![service("inventory", &[endpoint], policy, json!([]))]);
    start_proxy(&cfg, &[INVENTORY], &[]).await
}

#[tokio::test]
async fn a_failed_get_is_retried_and_succeeds() {
    let up = Upstream::start(fail_first(1, 503)).await;
    let p = inventory_proxy(
        up.addr,
        Some(policy(retries(2, &["gateway-error"], json!({})))),
    )
    .await;
    let r = get(&format!("{}/stock", p.outbound_url(0))).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    assert_eq!(up.hits(), 2, "one failure and one retry");
    assert_eq!(p.metric("weft_proxy_retries_total").await, 1.0);
}

#[tokio::test]
async fn a_post_is_retried_only_with_an_idempotency_key() {
    let up = Upstream::start(fail_first(1, 503)).await;
    let p = inventory_proxy(up.addr, Some(policy(retries(2, &["5xx"], json!({}))))).await;
    let url = format!("{}/reserve", p.outbound_url(0));
    let r = send(&client(), "POST", &url, &[]).await;
    assert_eq!(r.status, 503, "the application's own 503 comes back");
    assert_eq!(r.proxy_error, None, "and untouched");
    assert_eq!(
        up.hits(),
        1,
        "a POST without Idempotency-Key is never retried"
    );

    up.set(fail_first(2, 503)); // the counter is at 1: one more failure, then success
    let r = send(&client(), "POST", &url, &[("Idempotency-Key", "order-42")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 3, "with the key it was retried");
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    let up = Upstream::fixed(503, "down").await;
    // 10 % of requests plus a floor of 1/s over a 10 s window: 10 floor
    // retries plus 10 % of the 100 requests, however many attempts a
    // request may make.
    let budget = json!({ "percent": 10, "minPerSecond": 1, "windowMs": 10000 });
    let p = inventory_proxy(up.addr, Some(policy(retries(3, &["5xx"], budget)))).await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(
            send(&c, "GET", &format!("{}/stock", p.outbound_url(0)), &[])
                .await
                .status,
            503
        );
    }
    let hits = up.hits();
    assert!(hits > 100, "some retries were sent: {hits}");
    assert!(
        hits <= 100 + 10 + 10 + 2,
        "without a budget it would be 400; got {hits}"
    );
    assert!(p.metric("weft_proxy_retry_budget_exhausted_total").await >= 50.0);
}

#[tokio::test]
async fn a_slow_upstream_times_out_with_504() {
    let up = Upstream::start(Arc::new(|_, _| {
        (200, "late".into(), Duration::from_secs(5))
    }))
    .await;
    let p = inventory_proxy(
        up.addr,
        Some(policy(
            json!({ "timeoutMs": 200, "retry": { "maxRetries": 0 } }),
        )),
    )
    .await;
    let r = get(&format!("{}/stock", p.outbound_url(0))).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.proxy_error.as_deref(), Some("timeout"));
    assert!(p.metric("weft_proxy_proxy_errors_total{direction=\"outbound\",dst=\"inventory.shop:80\",reason=\"timeout\"}").await >= 1.0);
}

fn breaker_policy() -> serde_json::Value {
    policy(json!({
        "retry": { "maxRetries": 0 },
        "circuitBreaker": { "consecutiveFailures": 3, "openMs": 300, "maxOpenMs": 1000 },
        "excludedPaths": ["/health"],
    }))
}

#[tokio::test]
async fn the_circuit_opens_fails_fast_and_closes_after_recovery() {
    let up = Upstream::fixed(500, "broken").await;
    let p = inventory_proxy(up.addr, Some(breaker_policy())).await;
    let url = format!("{}/stock", p.outbound_url(0));
    for _ in 0..3 {
        assert_eq!(get(&url).await.status, 500);
    }
    let r = get(&url).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (503, Some("circuit-open"))
    );
    assert_eq!(up.hits(), 3, "the open circuit did not reach the upstream");
    assert_eq!(
        p.metric("weft_proxy_circuit_state{dst=\"inventory.shop:80\"}")
            .await,
        1.0
    );

    up.set(Arc::new(|_, _| (200, "ok".into(), Duration::ZERO)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get(&url).await;
    assert_eq!(
        r.status, 200,
        "the probe after the open period closes the circuit"
    );
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(
        p.metric("weft_proxy_circuit_state{dst=\"inventory.shop:80\"}")
            .await,
        0.0
    );
}

/// Breakers trip per endpoint: a broken endpoint is ejected and retries go
/// to the healthy one, so the Service never fails as a whole; only when
/// every endpoint is out does the Service's circuit open.
#[tokio::test]
async fn one_broken_endpoint_is_ejected_and_the_service_circuit_stays_closed() {
    let broken = Upstream::fixed(503, "broken").await;
    let healthy = Upstream::fixed(200, "ok").await;
    let mut pol = breaker_policy();
    pol["retry"] = json!({
        "maxRetries": 2, "retryOn": ["5xx"], "methods": ["GET"],
        "idempotencyHeader": "idempotency-key",
        "budget": { "percent": 100, "minPerSecond": 100, "windowMs": 10000 },
        "backoffBaseMs": 1, "backoffMaxMs": 2
    });
    let cfg = config(vec![service(
        "inventory",
        &[broken.addr, healthy.addr],
        Some(pol),
        json!([]),
    )]);
    let p = start_proxy(&cfg, &[INVENTORY], &[]).await;
    let url = format!("{}/stock", p.outbound_url(0));
    for i in 0..40 {
        assert_eq!(get(&url).await.status, 200, "request {i}");
    }
    assert!(
        broken.hits() <= 6,
        "the broken endpoint was ejected after 3 failures (and a probe or so): {} hits",
        broken.hits()
    );
    let state = "weft_proxy_circuit_state{dst=\"inventory.shop:80\"}";
    assert_eq!(p.metric(state).await, 0.0);
    assert_eq!(
        p.metric("weft_proxy_circuit_opened_total{dst=\"inventory.shop:80\"}")
            .await,
        0.0
    );

    // Now the healthy one breaks too: every endpoint out, the Service's
    // circuit opens and requests fail fast.
    healthy.set(Arc::new(|_, _| (503, "broken".into(), Duration::ZERO)));
    for _ in 0..6 {
        let _ = get(&url).await;
    }
    let r = get(&url).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (503, Some("circuit-open"))
    );
    assert_eq!(p.metric(state).await, 1.0);
    assert_eq!(
        p.metric("weft_proxy_circuit_opened_total{dst=\"inventory.shop:80\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn health_check_failures_never_open_the_circuit() {
    let up = Upstream::start(Arc::new(|_, req| {
        if req.uri().path() == "/health" {
            (500, "sick".into(), Duration::ZERO)
        } else {
            (200, "ok".into(), Duration::ZERO)
        }
    }))
    .await;
    let p = inventory_proxy(up.addr, Some(breaker_policy())).await;
    for _ in 0..10 {
        assert_eq!(
            get(&format!("{}/health", p.outbound_url(0))).await.status,
            500
        );
    }
    let r = get(&format!("{}/stock", p.outbound_url(0))).await;
    assert_eq!(
        r.status, 200,
        "ten failed health checks did not open the circuit: {r:?}"
    );
    assert_eq!(up.hits(), 11);
}

/// A health path is one path however a client spells it: escaped
/// unreserved characters and dot segments are normalised on both sides
/// before the comparison, so these failures are no more counted against
/// the circuit than `/health`'s are.
#[tokio::test]
async fn a_health_path_spelled_otherwise_is_still_a_health_path() {
    let spellings = [
        "/%68ealth",
        "/x/../health",
        "/./health",
        "/HEALTH/../health",
    ];
    let up = Upstream::start(Arc::new(move |_, req| {
        if spellings.contains(&req.uri().path()) {
            (500, "sick".into(), Duration::ZERO)
        } else {
            (200, "ok".into(), Duration::ZERO)
        }
    }))
    .await;
    let mut pol = breaker_policy();
    // The policy's own spelling is normalised too.
    pol["excludedPaths"] = json!(["/heal%74h"]);
    let p = inventory_proxy(up.addr, Some(pol)).await;
    for spelling in spellings.iter().cycle().take(12) {
        let r = get(&format!("{}{spelling}", p.outbound_url(0))).await;
        assert_eq!(
            r.status, 500,
            "{spelling} was not answered by the app: {r:?}"
        );
    }
    let r = get(&format!("{}/stock", p.outbound_url(0))).await;
    assert_eq!(
        r.status, 200,
        "twelve failed health checks did not open the circuit: {r:?}"
    );
    assert_eq!(up.hits(), 13);
}

/// Routes match the path the server's app will see: `/search/../charge`
/// is `/charge`, so a POST spelled that way does not take the route that
/// allows POST retries, and is sent once.
#[tokio::test]
async fn routes_match_the_normalised_path_so_dot_segments_do_not_borrow_a_routes_retries() {
    let up = Upstream::fixed(503, "down").await;
    let search_retries = json!({
        "maxRetries": 2, "retryOn": ["5xx"], "methods": ["GET", "POST"],
        "idempotencyHeader": "idempotency-key",
        "budget": { "percent": 100, "minPerSecond": 100, "windowMs": 10000 },
        "backoffBaseMs": 1, "backoffMaxMs": 2
    });
    let routes = json!([
        { "name": "shop/payments/search",
          "matches": [{ "path": { "type": "PathPrefix", "value": "/search" } }],
          "backends": [{ "service": "payments.shop", "weight": 1 }],
          "retry": search_retries },
        { "name": "shop/payments/rest", "backends": [{ "service": "payments.shop", "weight": 1 }] },
    ]);
    let cfg = config(vec![service(
        "payments",
        &[up.addr],
        Some(policy(json!({ "retry": { "maxRetries": 0 } }))),
        routes,
    )]);
    let p = start_proxy(&cfg, &["payments.shop:80"], &[]).await;
    let c = client();
    for (path, sent) in [
        ("/search/items", 3),
        ("/%73earch/items", 3),
        ("/search/../charge", 1),
        ("/search/%2e%2e/charge", 1),
        ("/charge", 1),
    ] {
        let before = up.hits();
        let r = send(&c, "POST", &format!("{}{path}", p.outbound_url(0)), &[]).await;
        assert_eq!(r.status, 503, "{path}: {r:?}");
        assert_eq!(
            up.hits() - before,
            sent,
            "POST {path} reached the app this often"
        );
    }
}

fn canary_routes() -> serde_json::Value {
    json!([
        { "name": "shop/checkout/opt-in", "matches": [{ "headers": { "x-canary": "true" } }],
          "backends": [{ "service": "checkout-canary.shop", "weight": 1 }] },
        { "name": "shop/checkout/split",
          "backends": [{ "service": "checkout.shop", "weight": 90 }, { "service": "checkout-canary.shop", "weight": 10 }] },
    ])
}

#[tokio::test]
async fn a_90_10_split_lands_near_10_percent_and_headers_pick_the_canary() {
    let stable = Upstream::fixed(200, "stable").await;
    let canary = Upstream::fixed(200, "canary").await;
    let cfg = config(vec![
        service("checkout", &[stable.addr], None, canary_routes()),
        service("checkout-canary", &[canary.addr], None, json!([])),
    ]);
    let p = start_proxy(&cfg, &["checkout.shop:80"], &[]).await;
    let c = client();
    let url = format!("{}/cart", p.outbound_url(0));
    let mut to_canary = 0;
    for _ in 0..2000 {
        let r = send(&c, "GET", &url, &[]).await;
        assert_eq!(r.status, 200);
        if r.body == "canary" {
            to_canary += 1;
        }
    }
    let share = f64::from(to_canary) / 20.0;
    assert!(
        (7.0..=13.0).contains(&share),
        "canary share {share} % is not 10 ± 3"
    );
    for _ in 0..20 {
        assert_eq!(
            send(&c, "GET", &url, &[("x-canary", "true")]).await.body,
            "canary"
        );
    }
    let m = p.metrics().await;
    assert!(
        m.contains("route=\"shop/checkout/split\""),
        "per-route metrics:\n{m}"
    );
}

#[tokio::test]
async fn a_config_swap_under_load_fails_nothing_and_a_corrupt_file_is_ignored() {
    let stable = Upstream::fixed(200, "stable").await;
    let canary = Upstream::fixed(200, "canary").await;
    let all_to = |name: &str| json!([{ "name": "shop/checkout/all", "backends": [{ "service": format!("{name}.shop"), "weight": 1 }] }]);
    let cfg = |name: &str| {
        config(vec![
            service("checkout", &[stable.addr], None, all_to(name)),
            service("checkout-canary", &[canary.addr], None, json!([])),
        ])
    };
    let p = start_proxy(&cfg("checkout"), &["checkout.shop:80"], &[]).await;
    let url = format!("{}/cart", p.outbound_url(0));
    let load = {
        let url = url.clone();
        tokio::spawn(async move {
            let c = client();
            let mut bodies = Vec::new();
            for _ in 0..400 {
                let r = send(&c, "GET", &url, &[]).await;
                assert_eq!(r.status, 200, "no request fails during the swap: {r:?}");
                bodies.push(r.body);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            bodies
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.write_config(&cfg("checkout-canary"));
    let bodies = load.await.expect("load task");
    assert_eq!(bodies.first().map(String::as_str), Some("stable"));
    assert_eq!(
        bodies.last().map(String::as_str),
        Some("canary"),
        "the new config took effect"
    );

    write_atomic(&p.config_path(), b"{ this is not json");
    let failures = p
        .wait_metric("weft_proxy_config_reload_failures_total", 1.0)
        .await;
    assert_eq!(
        failures, 1.0,
        "the corrupt file was noticed and counted once"
    );
    assert_eq!(
        get(&url).await.body,
        "canary",
        "the last good config stays in force"
    );
}

#[tokio::test]
async fn h2c_works_end_to_end() {
    let up = Upstream::fixed(200, "h2").await;
    let p = inventory_proxy(up.addr, None).await;
    let r = send(
        &h2_client(),
        "GET",
        &format!("{}/stock", p.outbound_url(0)),
        &[],
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "h2"));
    let m = p.metrics().await;
    assert!(m.contains("protocol=\"http2\""), "{m}");
}

#[tokio::test]
async fn unknown_destinations_are_forwarded_with_the_default_policy() {
    let up = Upstream::fixed(200, "elsewhere").await;
    let p = start_proxy(&config(vec![]), &[&up.addr.to_string()], &[]).await;
    let r = get(&format!("{}/x", p.outbound_url(0))).await;
    assert_eq!((r.status, r.body.as_str()), (200, "elsewhere"));
}

#[tokio::test]
async fn a_dead_endpoint_is_a_502_connect_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    // The listener is dropped: connections are refused.
    let p = inventory_proxy(dead, None).await;
    let r = get(&format!("{}/stock", p.outbound_url(0))).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (502, Some("connect-error"))
    );
}

#[tokio::test]
async fn rate_limits_answer_429() {
    let up = Upstream::fixed(200, "ok").await;
    let p = inventory_proxy(
        up.addr,
        Some(policy(
            json!({ "rateLimit": { "requestsPerSecond": 1, "burst": 3 } }),
        )),
    )
    .await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = send(&c, "GET", &format!("{}/stock", p.outbound_url(0)), &[]).await;
        statuses.push((r.status, r.proxy_error));
    }
    // A burst of 3, then 1/s: a slow run may earn one more token.
    let passed = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert!((3..=4).contains(&passed), "{statuses:?}");
    assert!(
        statuses
            .iter()
            .any(|(s, e)| *s == 429 && e.as_deref() == Some("rate-limited")),
        "{statuses:?}"
    );
    assert!(up.hits() <= 4);
}

/// A request small enough to be buffered for a retry keeps its trailers
/// (gRPC-style, on HTTP/2 with a content-length): the replayed body carries
/// them as the client sent them.
#[tokio::test]
async fn a_request_buffered_for_retry_keeps_its_trailers() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let collected = req.into_body().collect().await?;
                        let trailer = collected
                            .trailers()
                            .and_then(|t| t.get("x-checksum"))
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        let body = format!("trailer={trailer}");
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(bytes::Bytes::from(
                            body,
                        ))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    // The default policy retries a failed connect once: bodies of known
    // small size are buffered for it.
    let p = inventory_proxy(addr, None).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>>(
        );
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
    let body = Full::new(bytes::Bytes::from_static(b"hello"))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let req = http::Request::post(format!("{}/charge", p.outbound_url(0)))
        .header("content-length", "5")
        .body(body)
        .expect("request");
    let rsp = client.request(req).await.expect("response");
    let text = rsp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(text, bytes::Bytes::from_static(b"trailer=abc"));
}
