//! Issue 18, item 8: no private key reaches a log line. The pieces that
//! handle keys run with every target logging at TRACE (kube, hyper,
//! rustls included), and every line they write is searched for PEM armour
//! of a private key and for any 16-character piece of the keys they
//! handled ([`weft::identity::contains_key_material`]):
//!
//! - the webhook's certificate keeper (`certs::ensure`) creating its CA and
//!   serving key against a fake API server (axum on loopback: the kube
//!   client, its HTTP and the Secret body are real; the API server is not,
//!   none runs here);
//! - the proxy (in process, its real stack and identity watcher) loading a
//!   workload key, serving its admin port, then refusing two broken ones.
//!
//! The operator creating the mesh CA and issuing, keeping and deleting
//! workload identities is held to the same in `tests/operator.rs`
//! (`the_operator_logs_no_key_at_trace_creating_the_ca_and_issuing_identities`),
//! and `weft local up` with its proxies and apps at debug in
//! `tests/local.rs` (the loopback shop checks every log it kept).

#[path = "support/logs.rs"]
mod logs;
mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use base64::Engine;
use logs::{Captured, assert_no_key};
use serde_json::{Value, json};
use support::{config, get as http_get, start_proxy, write_atomic};
use tokio::net::TcpListener;
use weft::identity::{CA_LIFETIME, MeshCa, SpiffeId};
use weft::inject::certs::{self, WebhookNames};

/// The Secret store of the fake API server.
type Stored = Arc<Mutex<Option<Value>>>;

async fn fake_api_server() -> (String, Stored) {
    let stored: Stored = Arc::default();
    let path = "/api/v1/namespaces/{ns}/secrets";
    let app = axum::Router::new()
        .route(
            &format!("{path}/{{name}}"),
            get(|State(s): State<Stored>| async move {
                match s.lock().expect("store").clone() {
                    Some(secret) => (StatusCode::OK, axum::Json(secret)),
                    None => (
                        StatusCode::NOT_FOUND,
                        axum::Json(json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404, "message": "not found"
                        })),
                    ),
                }
            }),
        )
        .route(
            path,
            post(
                |State(s): State<Stored>, axum::Json(mut secret): axum::Json<Value>| async move {
                    secret["metadata"]["resourceVersion"] = json!("1");
                    *s.lock().expect("store") = Some(secret.clone());
                    (StatusCode::CREATED, axum::Json(secret))
                },
            ),
        )
        .with_state(stored.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, stored)
}

#[tokio::test(flavor = "current_thread")]
async fn the_webhook_certificate_keeper_logs_no_key_at_trace() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (captured, _guard) = Captured::at_trace();

    let (url, stored) = fake_api_server().await;
    let config = kube::Config::new(url.parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let names = WebhookNames::default();
    let made = certs::ensure(&client, &names).await.expect("created");
    // Again: read back and kept.
    let kept = certs::ensure(&client, &names).await.expect("kept");
    assert_eq!(kept, made);
    let secret = stored.lock().expect("store").clone().expect("stored");
    let data = secret["data"].as_object().expect("data");
    let b64 = base64::engine::general_purpose::STANDARD;
    let keys: Vec<String> = data
        .iter()
        .filter(|(k, _)| k.ends_with(".key"))
        .map(|(_, v)| {
            String::from_utf8(b64.decode(v.as_str().expect("base64")).expect("decodes"))
                .expect("pem")
        })
        .collect();
    assert_eq!(keys.len(), 2, "the CA's and the serving key: {data:?}");
    assert!(keys.contains(&made.key) && keys.contains(&made.ca_key));
    assert_no_key("the webhook certificate keeper", &captured.text(), &keys);
}

fn write_identity(dir: &Path, ca: &MeshCa, sa: &str) -> String {
    let leaf = ca
        .issue(
            &SpiffeId::new("cluster.local", "shop", sa),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("leaf");
    write_atomic(&dir.join("ca.crt"), ca.trust_bundle().as_bytes());
    write_atomic(&dir.join("tls.crt"), leaf.cert_pem.as_bytes());
    write_atomic(&dir.join("tls.key"), leaf.key_pem.as_bytes());
    leaf.key_pem
}

/// In-process so that every target really logs at TRACE into the buffer
/// (the binary's `WEFT_LOG` filter sits under `fmt()`'s default INFO
/// ceiling today, so its debug and trace events are never written).
#[tokio::test(flavor = "current_thread")]
async fn the_proxy_logs_no_key_at_trace_loading_serving_or_rejecting_one() {
    let (captured, _guard) = Captured::at_trace();

    let dir = tempfile::tempdir().expect("tempdir");
    let ids = dir.path().join("id");
    std::fs::create_dir(&ids).expect("mkdir");
    let ca = MeshCa::generate("cluster.local", SystemTime::now(), CA_LIFETIME).expect("ca");
    let first = write_identity(&ids, &ca, "cart");
    let ids_arg = ids.display().to_string();
    let p = start_proxy(
        &config(vec![]),
        &[],
        &[
            "--identity-dir",
            &ids_arg,
            "--service-account",
            "cart",
            "--workload",
            "cart",
        ],
    )
    .await;
    let admin = format!("http://{}", p.running.admin);
    let served = http_get(&format!("{admin}/config")).await.body + &p.metrics().await;

    // A key for another certificate, then a truncated one: both refused.
    let other = ca
        .issue(
            &SpiffeId::new("cluster.local", "shop", "cart"),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("leaf");
    let truncated: String = first.lines().take(3).collect::<Vec<_>>().join("\n");
    let failures = "weft_proxy_identity_reload_failures";
    for (n, broken) in [(1.0, &other.key_pem), (2.0, &truncated)] {
        write_atomic(&ids.join("tls.key"), broken.as_bytes());
        let mut refused = false;
        for _ in 0..100 {
            let sum: f64 = p
                .metrics()
                .await
                .lines()
                .filter(|l| l.starts_with(failures))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if sum >= n {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(refused, "the broken key was refused:\n{}", captured.text());
    }
    let keys = [first, other.key_pem];
    assert_no_key("the admin port", &served, &keys);
    assert_no_key("weft proxy", &captured.text(), &keys);
}
