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
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
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
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Collector { addr, spans, task }
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
        (200, "stock: 7".into(), Duration::ZERO)
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
    let cart = start_proxy_with(
        &traced(
            config(vec![service(
                "inventory",
                &[inventory.running.inbound[0]],
                None,
                json!([]),
            )]),
            collector,
        ),
        &["inventory.shop:80"],
        &["--workload", "cart"],
        None,
    )
    .await;
    TwoHops {
        app,
        seen,
        cart,
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

    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = collector.spans.lock().expect("spans").clone();
        if spans.len() >= 2 {
            break spans;
        }
        assert!(Instant::now() < deadline, "the collector got {spans:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
    assert_eq!(
        hops.cart.metric("weft_proxy_spans_exported_total").await,
        1.0
    );
    drop(hops.app);
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
