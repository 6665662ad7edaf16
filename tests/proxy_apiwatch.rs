//! Tier 3: config updates through the API server. No kube-apiserver runs
//! here, so a fake one on loopback speaks the two requests the watch makes
//! (list, then watch) with real Kubernetes JSON; the real kube client and
//! the real proxy are on the other side.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::get as route_get;
use bytes::Bytes;
use serde_json::{Value, json};
use support::*;
use tokio::sync::{Mutex, mpsc};

type Events = std::sync::Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>;

fn configmap(config: &Value, rv: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "weft-proxy-config", "namespace": "shop", "resourceVersion": rv.to_string() },
        "data": { "config.json": config.to_string() },
    })
}

async fn configmaps(
    State((initial, events)): State<(Value, Events)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    assert_eq!(
        q.get("fieldSelector").map(String::as_str),
        Some("metadata.name=weft-proxy-config")
    );
    if q.get("watch").map(String::as_str) != Some("true") {
        let list = json!({ "apiVersion": "v1", "kind": "ConfigMapList", "metadata": { "resourceVersion": "1" }, "items": [initial] });
        return axum::response::IntoResponse::into_response(axum::Json(list));
    }
    // One watch stream is served; later reconnects hang until the test ends.
    let rx = events.lock().await.take();
    let stream = futures_util::stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(line), Some(rx)))
    });
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_configmap_change_through_the_api_server_takes_effect_without_the_file() {
    let stable = Upstream::fixed(200, "stable").await;
    let canary = Upstream::fixed(200, "canary").await;
    let to = |name: &str| {
        config(vec![
            service(
                "checkout",
                &[stable.addr],
                None,
                json!([{ "name": "r", "backends": [{ "service": format!("{name}.shop"), "weight": 1 }] }]),
            ),
            service("checkout-canary", &[canary.addr], None, json!([])),
        ])
    };
    let file_config = to("checkout");
    let p = start_proxy(&file_config, &["checkout.shop:80"], &[]).await;
    let url = format!("{}/cart", p.outbound_url(0));
    assert_eq!(get(&url).await.body, "stable");

    let (tx, rx) = mpsc::channel(4);
    let events: Events = std::sync::Arc::new(Mutex::new(Some(rx)));
    let app = axum::Router::new()
        .route("/api/v1/namespaces/shop/configmaps", route_get(configmaps))
        .with_state((configmap(&file_config, 1), events));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let kube_config = kube::Config::new(format!("http://{api}").parse().expect("url"));
    let client = kube::Client::try_from(kube_config).expect("client");
    tokio::spawn(weft::proxy::apiwatch::watch_configmap(
        client,
        "shop".into(),
        p.proxy.store.clone(),
    ));

    let event = json!({ "type": "MODIFIED", "object": configmap(&to("checkout-canary"), 2) });
    tx.send(Bytes::from(format!("{event}\n")))
        .await
        .expect("send event");
    let mut body = String::new();
    for _ in 0..100 {
        body = get(&url).await.body;
        if body == "canary" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body, "canary", "the watched ConfigMap took effect");
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(p.config_path()).expect("file")).expect("json");
    assert_eq!(
        on_disk["generation"], file_config["generation"],
        "the file did not change"
    );

    let broken = json!({ "type": "MODIFIED", "object": {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "weft-proxy-config", "namespace": "shop", "resourceVersion": "3" },
        "data": { "config.json": "{ broken" } } });
    tx.send(Bytes::from(format!("{broken}\n")))
        .await
        .expect("send event");
    let failures = p
        .wait_metric("weft_proxy_config_reload_failures_total", 1.0)
        .await;
    assert_eq!(failures, 1.0);
    assert_eq!(
        get(&url).await.body,
        "canary",
        "a broken document keeps the last good config"
    );
}
