//! Access logs at tier 3: two real proxies in-process on loopback, a
//! client's call through both (outbound, then inbound, then the app), and
//! the line each proxy writes. The writer is the one stdout gets in a pod
//! (`Proxy::with_access_log_to` only swaps where it writes).

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The inventory app behind its own proxy (inbound map), and the cart's
/// proxy calling `inventory.shop:80`, whose one endpoint is the inventory
/// proxy's inbound listener. Both log.
struct TwoHops {
    app: Upstream,
    cart: TestProxy,
    cart_log: Lines,
    inventory: TestProxy,
    inventory_log: Lines,
}

async fn two_hops(app: Upstream, policy: Option<Value>) -> TwoHops {
    let inventory_log = Lines::default();
    let inventory = start_proxy_with(
        &config(vec![]),
        &[],
        &[
            "--workload",
            "inventory",
            "--inbound-map",
            &format!("127.0.0.1:0={}", app.addr.port()),
            "--access-log",
            "json",
        ],
        Some(inventory_log.clone()),
    )
    .await;
    let cart_log = Lines::default();
    let cart = start_proxy_with(
        &config(vec![service(
            "inventory",
            &[inventory.running.inbound[0]],
            policy,
            json!([]),
        )]),
        &["inventory.shop:80"],
        &["--workload", "cart", "--access-log", "json"],
        Some(cart_log.clone()),
    )
    .await;
    TwoHops {
        app,
        cart,
        cart_log,
        inventory,
        inventory_log,
    }
}

/// A retried GET through two proxies: the cart's line tells the whole
/// call (one retry, the endpoint, the bytes, the trace), the inventory's
/// proxy writes a line per attempt it served.
#[tokio::test]
async fn each_hop_logs_the_request_it_carried() {
    let app = Upstream::start(Arc::new(|n, _| match n {
        0 => (503, "busy".into(), Duration::ZERO),
        _ => (200, "stock: 7".into(), Duration::ZERO),
    }))
    .await;
    let retry_5xx = policy(json!({ "retry": { "maxRetries": 2, "retryOn": ["5xx"] } }));
    let hops = two_hops(app, Some(retry_5xx)).await;
    let rsp = send(
        &client(),
        "GET",
        &format!("{}/stock/../items?sku=42", hops.cart.outbound_url(0)),
        &[("traceparent", TRACEPARENT)],
    )
    .await;
    assert_eq!((rsp.status, rsp.body.as_str()), (200, "stock: 7"));
    assert_eq!(hops.app.hits(), 2);

    let cart = hops.cart_log.wait(1).await;
    assert_eq!(cart.len(), 1, "{cart:#?}");
    let line = &cart[0];
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["src"], "cart", "no identity: the workload");
    assert!(
        line["src_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    assert_eq!(line["dst"], "inventory.shop:80");
    assert_eq!(
        line["endpoint"],
        hops.inventory.running.inbound[0].to_string()
    );
    assert_eq!(line["route"], "default");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/items", "normalised, no query");
    assert_eq!(line["status"], 200);
    assert_eq!(line["proxy_error"], Value::Null);
    assert_eq!(line["completed"], true);
    assert_eq!(line["mtls"], false);
    assert_eq!(line["retries"], 1);
    assert_eq!(line["bytes_in"], 2, "the client's `{{}}`");
    assert_eq!(line["bytes_out"], 8);
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let (duration, upstream) = (
        line["duration_ms"].as_f64().expect("duration"),
        line["upstream_ms"].as_f64().expect("upstream time"),
    );
    assert!(upstream > 0.0 && upstream <= duration, "{line}");

    let inventory = hops.inventory_log.wait(2).await;
    let statuses: Vec<&Value> = inventory.iter().map(|l| &l["status"]).collect();
    assert_eq!(statuses, [503, 200], "{inventory:#?}");
    for line in &inventory {
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["src"], "unknown", "plaintext from no published pod");
        assert_eq!(line["dst"], "inventory");
        assert_eq!(
            line["endpoint"],
            format!("127.0.0.1:{}", hops.app.addr.port())
        );
        assert_eq!(line["path"], "/items");
        assert_eq!(line["retries"], 0);
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(line["upstream_ms"].as_f64().is_some(), "{line}");
    }
    assert_eq!(inventory[1]["bytes_out"], 8);
    assert_eq!(
        hops.cart
            .metric("weft_proxy_access_log_dropped_total")
            .await,
        0.0
    );
}

/// A request the proxy answers itself: its reason, no upstream time; the
/// query stays when asked.
#[tokio::test]
async fn a_proxy_answer_says_why_and_a_kept_query_stays() {
    let lines = Lines::default();
    let proxy = start_proxy_with(
        &config(vec![service("inventory", &[], None, json!([]))]),
        &["inventory.shop:80"],
        &["--access-log", "json", "--access-log-query", "keep"],
        Some(lines.clone()),
    )
    .await;
    let rsp = send(
        &client(),
        "POST",
        &format!("{}/reserve?sku=42", proxy.outbound_url(0)),
        &[],
    )
    .await;
    assert_eq!(rsp.status, 503);
    let line = &lines.wait(1).await[0];
    assert_eq!(line["status"], 503);
    assert_eq!(line["proxy_error"], "no-endpoints");
    assert_eq!(line["dst"], "inventory.shop:80");
    assert_eq!(line["completed"], true);
    assert_eq!(line["upstream_ms"], Value::Null);
    assert_eq!(line["endpoint"], Value::Null);
    assert_eq!(line["path"], "/reserve?sku=42");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["trace_id"], Value::Null);
    assert!(line["bytes_out"].as_u64().is_some_and(|n| n > 0));
}

/// Off by default: nothing is written.
#[tokio::test]
async fn without_the_flag_nothing_is_logged() {
    let app = Upstream::fixed(200, "ok").await;
    let lines = Lines::default();
    // Off said explicitly: a WEFT_ACCESS_LOG in the shell running the
    // tests would otherwise switch it on.
    let proxy = start_proxy_with(
        &config(vec![service("inventory", &[app.addr], None, json!([]))]),
        &["inventory.shop:80"],
        &["--access-log", "off"],
        Some(lines.clone()),
    )
    .await;
    let rsp = get(&format!("{}/stock", proxy.outbound_url(0))).await;
    assert_eq!(rsp.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(lines.now().is_empty());
}
