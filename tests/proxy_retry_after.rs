//! Tier 3, issue 21 item 3: a proxy whose TrafficPolicy honours the
//! target's back-off (`retryAfter`) sends nothing to a vendor inside the
//! window its `429 Retry-After` gave; calls meanwhile wait (a bounded
//! number) and go when it ends, the rest are answered 429 by the proxy.
//! The vendor's own log of when it was called is the proof. Real proxy,
//! a vendor stub on loopback.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use support::*;

/// A vendor that answers its first call `429 Retry-After: 2` and every
/// later one 200, noting when each came.
struct Vendor {
    served: Served,
    calls: Arc<Mutex<Vec<Instant>>>,
}

async fn vendor() -> Vendor {
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = calls.clone();
    let app = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            let mut calls = seen.lock().expect("calls");
            calls.push(Instant::now());
            if calls.len() == 1 {
                (
                    http::StatusCode::TOO_MANY_REQUESTS,
                    [(http::header::RETRY_AFTER, "2")],
                    "slow down",
                )
            } else {
                (
                    http::StatusCode::OK,
                    [(http::header::CACHE_CONTROL, "no-store")],
                    "paid",
                )
            }
        }
    });
    Vendor {
        served: serve(app).await,
        calls,
    }
}

/// A proxy whose Service `payments` is the vendor, under `policy`.
async fn payments(vendor: &Vendor, policy: serde_json::Value) -> TestProxy {
    start_proxy(
        &config(vec![service(
            "payments",
            &[vendor.served.addr],
            Some(policy),
            json!([]),
        )]),
        &["payments.shop:80"],
        &[],
    )
    .await
}

/// Status, `weft-proxy-error` and `Retry-After` of a GET.
async fn get_with_headers(url: &str) -> (u16, Option<String>, Option<String>) {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = client().request(req).await.expect("response");
    let header = |name: &str| {
        rsp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    (
        rsp.status().as_u16(),
        header("weft-proxy-error"),
        header("retry-after"),
    )
}

#[tokio::test]
async fn nothing_reaches_the_vendor_inside_its_retry_after_and_queued_calls_go_after() {
    let vendor = vendor().await;
    let policy = policy(json!({
        "retryAfter": { "maxWaitMs": 3000, "maxQueued": 3, "maxBackOffMs": 60000 },
    }));
    let p = payments(&vendor, policy).await;
    let url = format!("{}/charge", p.outbound_url(0));

    // The vendor's own 429 passes through as it sent it.
    let (status, proxy_error, retry_after) = get_with_headers(&url).await;
    assert_eq!(
        (status, proxy_error, retry_after.as_deref()),
        (429, None, Some("2"))
    );
    let window_start = vendor.calls.lock().expect("calls")[0];

    // Six calls during the window: three wait for it, three are turned
    // away at once by the proxy.
    let calls = (0..6).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { get_with_headers(&url).await })
    });
    let answers: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("call"))
        .collect();
    let paid = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!((paid, refused.len()), (3, 3), "{answers:?}");
    for (_, proxy_error, retry_after) in &refused {
        assert_eq!(proxy_error.as_deref(), Some("rate-limited"));
        let left: u64 = retry_after
            .as_deref()
            .and_then(|s| s.parse().ok())
            .expect("Retry-After on the proxy's own 429");
        assert!((1..=2).contains(&left), "{left}");
    }

    // The vendor's log: the 429, then only the three that waited, each
    // after the window it asked for.
    let calls = vendor.calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 4, "the three refused never reached it");
    for at in &calls[1..] {
        let after = at.duration_since(window_start);
        assert!(
            after >= Duration::from_secs(2),
            "called {} ms into its 2 s back-off",
            after.as_millis()
        );
    }

    // Over: the next call goes at once.
    let (status, proxy_error, _) = get_with_headers(&url).await;
    assert_eq!((status, proxy_error), (200, None));
    let dst = "{dst=\"payments.shop:80\"}";
    assert_eq!(
        p.metric(&format!("weft_proxy_back_offs_total{dst}")).await,
        1.0
    );
    assert_eq!(
        p.metric(&format!("weft_proxy_back_off_waits_total{dst}"))
            .await,
        3.0
    );
}

/// A call whose own deadline ends before the back-off does is answered at
/// once rather than held until it times out.
#[tokio::test]
async fn a_call_that_cannot_outwait_the_back_off_is_answered_at_once() {
    let vendor = vendor().await;
    let policy = policy(json!({
        "timeoutMs": 1000,
        "retryAfter": { "maxWaitMs": 5000, "maxQueued": 10, "maxBackOffMs": 60000 },
    }));
    let p = payments(&vendor, policy).await;
    let url = format!("{}/charge", p.outbound_url(0));
    assert_eq!(get_with_headers(&url).await.0, 429);
    // Held until its timeout it would be a 504 `timeout`.
    let (status, proxy_error, _) = get_with_headers(&url).await;
    assert_eq!(
        (status, proxy_error.as_deref()),
        (429, Some("rate-limited"))
    );
    assert_eq!(vendor.calls.lock().expect("calls").len(), 1);
}

/// A policy that retries 429s: the retry waits out the back-off the 429
/// asked for rather than firing into it, and the caller gets the answer
/// that came after.
#[tokio::test]
async fn a_retry_waits_out_the_back_off_its_429_asked_for() {
    let vendor = vendor().await;
    let policy = policy(json!({
        "retry": { "maxRetries": 2, "statusCodes": [429] },
        "retryAfter": { "maxWaitMs": 3000, "maxQueued": 10, "maxBackOffMs": 60000 },
    }));
    let p = payments(&vendor, policy).await;
    let (status, proxy_error, _) = get_with_headers(&format!("{}/charge", p.outbound_url(0))).await;
    assert_eq!((status, proxy_error), (200, None), "the retry got through");
    let calls = vendor.calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 2, "the 429, then one retry");
    let after = calls[1].duration_since(calls[0]);
    assert!(
        after >= Duration::from_secs(2),
        "the retry came {} ms into the 2 s back-off",
        after.as_millis()
    );
}

/// A retry the back-off would refuse (its 429 asked for longer than the
/// retry may wait) is not sent: the caller gets the vendor's own 429, with
/// its `Retry-After`, not the proxy's refusal of a retry that never left.
#[tokio::test]
async fn a_retry_that_cannot_outwait_the_back_off_leaves_the_vendors_answer() {
    let vendor = vendor().await;
    let policy = policy(json!({
        "retry": { "maxRetries": 2, "statusCodes": [429] },
        "retryAfter": { "maxWaitMs": 500, "maxQueued": 10, "maxBackOffMs": 60000 },
    }));
    let p = payments(&vendor, policy).await;
    let (status, proxy_error, retry_after) =
        get_with_headers(&format!("{}/charge", p.outbound_url(0))).await;
    assert_eq!(
        (status, proxy_error, retry_after.as_deref()),
        (429, None, Some("2"))
    );
    assert_eq!(vendor.calls.lock().expect("calls").len(), 1);
    assert_eq!(
        p.metric("weft_proxy_retries_total{dst=\"payments.shop:80\"}")
            .await,
        0.0,
        "no retry was counted"
    );
}
