//! Tracing at tier 3 (#20 item 5): two real proxies in-process on loopback
//! (the cart's, calling inventory; inventory's, in front of its app) and a
//! fake OTLP/HTTP collector. One call makes one trace of two spans, the
//! cart's CLIENT span the parent of inventory's SERVER span, and the app
//! sees the server span as its parent. With the collector down, calls are
//! answered as before and the spans are counted as dropped.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// A collector on loopback: every span it was sent, or none taken when
/// `refuse` (an OTLP collector in trouble answers 503).
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
    _served: Served,
}

async fn collector() -> Collector {
    let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: http::HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
                let req: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                for rs in req["resourceSpans"].as_array().expect("resourceSpans") {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .and_then(|a| a.iter().find(|x| x["key"] == "service.name"))
                        .map(|x| x["value"]["stringValue"].clone())
                        .unwrap_or_default();
                    for ss in rs["scopeSpans"].as_array().expect("scopeSpans") {
                        for sp in ss["spans"].as_array().expect("spans") {
                            let mut sp = sp.clone();
                            sp["service"] = service.clone();
                            seen.lock().expect("spans").push(sp);
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let served = serve(app).await;
    Collector {
        addr: served.addr,
        spans,
        _served: served,
    }
}

/// `config` with tracing to `collector`, every new trace recorded.
fn traced(mut config: Value, collector: std::net::SocketAddr) -> Value {
    config["tracing"] = json!({
        "collector": collector.to_string(), "path": "/v1/traces", "sampling": 1.0,
    });
    config
}

struct TwoHops {
    app: Upstream,
    /// The `traceparent` each request reached the app with.
    seen: Arc<Mutex<Vec<String>>>,
    cart: TestProxy,
    /// The cart proxy's config without `tracing`.
    cart_config: Value,
    inventory: TestProxy,
}

async fn two_hops(collector: std::net::SocketAddr) -> TwoHops {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let app = Upstream::start(Arc::new(move |_, req| {
        if let Some(tp) = req.headers().get("traceparent") {
            s.lock()
                .expect("seen")
                .push(tp.to_str().unwrap_or_default().to_owned());
        }
        // `/slow` answers after the caller has given up.
        let wait = if req.uri().path() == "/slow" {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        (200, "stock: 7".into(), wait)
    }))
    .await;
    let inventory = start_proxy_with(
        &traced(config(vec![]), collector),
        &[],
        &[
            "--workload",
            "inventory",
            "--inbound-map",
            &format!("127.0.0.1:0={}", app.addr.port()),
        ],
        None,
    )
    .await;
    let cart_config = config(vec![service(
        "inventory",
        &[inventory.running.inbound[0]],
        None,
        json!([]),
    )]);
    let cart = start_proxy_with(
        &traced(cart_config.clone(), collector),
        &["inventory.shop:80"],
        &["--workload", "cart"],
        None,
    )
    .await;
    TwoHops {
        app,
        seen,
        cart,
        cart_config,
        inventory,
    }
}

#[tokio::test]
async fn one_call_is_one_trace_of_two_linked_spans() {
    let collector = collector().await;
    let hops = two_hops(collector.addr).await;
    // No traceparent from the client: the cart's proxy starts the trace.
    let rsp = send(
        &client(),
        "GET",
        &format!("{}/stock?sku=42", hops.cart.outbound_url(0)),
        &[],
    )
    .await;
    assert_eq!((rsp.status, rsp.body.as_str()), (200, "stock: 7"));

    let spans = spans_until(&collector, |s| s.len() >= 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let by = |kind: u64| {
        spans
            .iter()
            .find(|s| s["kind"] == kind)
            .unwrap_or_else(|| panic!("no span of kind {kind}: {spans:#?}"))
    };
    let (client_span, server_span) = (by(3), by(2));
    assert_eq!(client_span["traceId"], server_span["traceId"], "one trace");
    assert_eq!(
        server_span["parentSpanId"], client_span["spanId"],
        "the cart's client span is the parent of inventory's server span"
    );
    assert!(
        client_span.get("parentSpanId").is_none(),
        "the trace's root"
    );
    assert_eq!(client_span["service"], "cart");
    assert_eq!(server_span["service"], "inventory");
    let attr = |span: &Value, key: &str| {
        span["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["key"] == key))
            .map(|x| x["value"].clone())
            .unwrap_or(Value::Null)
    };
    for span in [client_span, server_span] {
        assert_eq!(span["name"], "GET");
        assert_eq!(attr(span, "http.request.method")["stringValue"], "GET");
        assert_eq!(attr(span, "url.path")["stringValue"], "/stock");
        assert_eq!(attr(span, "http.response.status_code")["intValue"], "200");
        assert_eq!(span["status"]["code"], 0);
        let (start, end): (u128, u128) = (
            span["startTimeUnixNano"].as_str().unwrap().parse().unwrap(),
            span["endTimeUnixNano"].as_str().unwrap().parse().unwrap(),
        );
        assert!(start > 0 && end >= start, "{span}");
    }
    assert_eq!(
        attr(client_span, "server.address")["stringValue"],
        "inventory.shop"
    );
    assert_eq!(attr(client_span, "server.port")["intValue"], "80");
    // The app's own spans would nest under inventory's server span.
    let seen = hops.seen.lock().expect("seen").clone();
    let trace = client_span["traceId"].as_str().unwrap();
    let parent = server_span["spanId"].as_str().unwrap();
    assert_eq!(seen, [format!("00-{trace}-{parent}-01")]);
    // Counted once the collector's answer is read, a moment after it
    // stored the spans.
    assert_eq!(
        hops.cart
            .wait_metric("weft_proxy_spans_exported_total", 1.0)
            .await,
        1.0
    );
    drop(hops.app);
}

/// The spans collected so far, waiting (10 s at most) until `enough`.
async fn spans_until(collector: &Collector, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = collector.spans.lock().expect("spans").clone();
        if enough(&spans) {
            return spans;
        }
        assert!(Instant::now() < deadline, "the collector got {spans:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A caller that leaves before the answer still leaves its hop in the
/// trace: the span ends then, as an error with no status.
#[tokio::test]
async fn a_call_the_caller_gave_up_on_ends_its_spans_as_cancelled() {
    let collector = collector().await;
    let hops = two_hops(collector.addr).await;
    let url = format!("{}/slow", hops.cart.outbound_url(0));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        send(&client(), "GET", &url, &[]),
    )
    .await;
    assert!(gave_up.is_err(), "the app answers after 5 s");
    // Both hops: the cart's client span, and inventory's server span
    // (the cart's proxy gave up its call when the caller left).
    let spans = spans_until(&collector, |s| {
        s.iter().any(|s| s["kind"] == 3) && s.iter().any(|s| s["kind"] == 2)
    })
    .await;
    for kind in [3, 2] {
        let span = spans.iter().find(|s| s["kind"] == kind).expect("span");
        let attrs = span["attributes"].as_array().expect("attributes");
        let attr = |key: &str| attrs.iter().find(|x| x["key"] == key).map(|x| &x["value"]);
        assert_eq!(
            attr("error.type").map(|v| &v["stringValue"]),
            Some(&json!("cancelled")),
            "{span:#}"
        );
        assert_eq!(attr("http.response.status_code"), None, "no answer came");
        assert_eq!(span["status"]["code"], 2, "an error");
        let time = |key: &str| -> u128 { span[key].as_str().unwrap().parse().unwrap() };
        let ran = time("endTimeUnixNano") - time("startTimeUnixNano");
        // The caller left after 500 ms; a loaded machine may start the
        // span late, so only a generous part of that is asserted.
        assert!(
            (200_000_000..4_000_000_000).contains(&ran),
            "it ran until the caller left, not until the app answered: {} ms",
            ran / 1_000_000
        );
    }
}

#[tokio::test]
async fn a_collector_that_is_down_slows_nothing_and_spans_are_counted_dropped() {
    // A port nothing listens on: the collector is down.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let hops = two_hops(down).await;
    let client = client();
    for _ in 0..20 {
        let rsp = send(
            &client,
            "GET",
            &format!("{}/stock", hops.cart.outbound_url(0)),
            &[],
        )
        .await;
        assert_eq!(rsp.status, 200);
    }
    assert_eq!(hops.app.hits(), 20);
    // Each proxy tried to export its 20 spans, and counted them dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    for proxy in [&hops.cart, &hops.inventory] {
        loop {
            let dropped = proxy
                .metric("weft_proxy_spans_dropped_total{reason=\"collector\"}")
                .await;
            if dropped >= 20.0 {
                break;
            }
            assert!(Instant::now() < deadline, "dropped {dropped}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(proxy.metric("weft_proxy_spans_exported_total").await, 0.0);
    }
}

/// A trace whose caller decided not to sample it (`-00`) is passed on
/// with that decision and records nothing.
#[tokio::test]
async fn an_unsampled_trace_goes_on_unsampled_and_records_nothing() {
    let collector = collector().await;
    let hops = two_hops(collector.addr).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let url = format!("{}/stock", hops.cart.outbound_url(0));
    let rsp = send(
        &client(),
        "GET",
        &url,
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-00"))],
    )
    .await;
    assert_eq!(rsp.status, 200);
    let seen = hops.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].starts_with(&format!("00-{trace}-")) && seen[0].ends_with("-00"),
        "the same trace, still unsampled: {seen:?}"
    );
    // A sampled call after it is exported: by then the first would have been.
    assert_eq!(send(&client(), "GET", &url, &[]).await.status, 200);
    let spans = spans_until(&collector, |s| s.len() >= 2).await;
    assert!(
        spans.iter().all(|s| s["traceId"] != trace),
        "nothing of the unsampled trace: {spans:#?}"
    );
    assert_eq!(
        hops.cart
            .wait_metric("weft_proxy_spans_exported_total", 1.0)
            .await,
        1.0
    );
}

/// A collector that takes the connection and never answers holds only
/// the exporter: calls are all answered, the spans that do not fit the
/// queue meanwhile are dropped as `queue-full`, and the batch it held is
/// dropped as `collector` when its 4 s are up.
#[tokio::test]
async fn a_collector_that_never_answers_costs_spans_not_calls() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let hops = two_hops(addr).await;
    let url = format!("{}/stock", hops.cart.outbound_url(0));
    // Far more spans than the exporter holds (a batch of 256 waiting on
    // the collector) and the queue behind it (1024), from 8 callers.
    let callers = (0..8).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let client = client();
            let mut ok = 0;
            for _ in 0..250 {
                ok += usize::from(send(&client, "GET", &url, &[]).await.status == 200);
            }
            ok
        })
    });
    let answered: usize = futures_util::future::join_all(callers)
        .await
        .into_iter()
        .map(|r| r.expect("caller"))
        .sum();
    assert_eq!(answered, 2000, "every call answered");
    let queue_full = hops
        .cart
        .wait_metric("weft_proxy_spans_dropped_total{reason=\"queue-full\"}", 1.0)
        .await;
    assert!(queue_full >= 1.0, "the queue overflowed: {queue_full}");
    // The held batch times out (4 s for the whole exchange).
    let mut failed = 0.0;
    for _ in 0..10 {
        failed = hops
            .cart
            .wait_metric("weft_proxy_spans_dropped_total{reason=\"collector\"}", 1.0)
            .await;
        if failed >= 1.0 {
            break;
        }
    }
    assert!(failed >= 1.0, "the held batch was counted dropped");
    assert_eq!(
        hops.cart.metric("weft_proxy_spans_exported_total").await,
        0.0
    );
    hold.abort();
}

/// The Mesh names another collector: spans go to it from then on (the
/// proxy is not restarted), and none to the old one.
#[tokio::test]
async fn a_new_collector_takes_the_spans_after_the_config_names_it() {
    let first = collector().await;
    let second = collector().await;
    let hops = two_hops(first.addr).await;
    let url = format!("{}/stock", hops.cart.outbound_url(0));
    assert_eq!(send(&client(), "GET", &url, &[]).await.status, 200);
    spans_until(&first, |s| s.iter().any(|s| s["service"] == "cart")).await;

    let reloads = hops.cart.metric("weft_proxy_config_reloads").await;
    let mut next = traced(hops.cart_config.clone(), second.addr);
    // A new document, as the operator writes one for every change.
    next["generation"] = json!("second-collector");
    hops.cart.write_config(&next);
    let now = hops
        .cart
        .wait_metric("weft_proxy_config_reloads", reloads + 1.0)
        .await;
    assert!(now > reloads, "the cart's proxy took the new config");
    assert_eq!(send(&client(), "GET", &url, &[]).await.status, 200);
    let spans = spans_until(&second, |s| s.iter().any(|s| s["service"] == "cart")).await;
    assert_eq!(
        spans.iter().filter(|s| s["service"] == "cart").count(),
        1,
        "{spans:#?}"
    );
    let to_first = first
        .spans
        .lock()
        .expect("spans")
        .iter()
        .filter(|s| s["service"] == "cart")
        .count();
    assert_eq!(
        to_first, 1,
        "the old collector got only the first call's span"
    );
}
