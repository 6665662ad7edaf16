//! Tier 2: the webhook caBundle kept against the LIVE MutatingWebhookConfiguration,
//! with a fake API server (axum on loopback) that stores the Secret and the
//! configuration, merges a server-side apply of `caBundle` into the stored
//! webhook as the API server would, and records every write.
//!
//! A configuration recreated behind the control plane's back (`helm upgrade
//! --force`, `kubectl replace`, delete and re-apply) comes back without a
//! caBundle: the next check must set it again though nothing changed in
//! memory, and a check that finds it in order must not write at all.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weft::inject::certs::{self, WebhookNames};
use weft::inject::webhook::ServingCert;

#[derive(Default)]
struct Fake {
    secret: Option<Value>,
    configuration: Option<Value>,
    /// `(method, path)` of every request that writes.
    writes: Vec<(Method, String)>,
    rv: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn not_found(what: &str) -> (StatusCode, axum::Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": "NotFound", "code": 404, "message": format!("{what} not found"),
        })),
    )
}

/// The configuration as the chart installs it: no caBundle.
fn installed() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "weft-injector", "resourceVersion": "1" },
        "webhooks": [{
            "name": "inject.weft.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": { "service": { "name": "weft-injector", "namespace": "weft-system", "path": "/mutate", "port": 443 } },
        }],
    })
}

/// A GET's answer: the object, or 404.
fn found(stored: Option<Value>, what: &str) -> (StatusCode, axum::Json<Value>) {
    match stored {
        Some(o) => (StatusCode::OK, axum::Json(o)),
        None => not_found(what),
    }
}

async fn get_secret(State(fake): State<Shared>) -> (StatusCode, axum::Json<Value>) {
    found(fake.lock().expect("fake").secret.clone(), "secret")
}

async fn write_secret(
    State(fake): State<Shared>,
    method: Method,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let mut f = fake.lock().expect("fake");
    f.writes.push((method.clone(), "secret".into()));
    let mut secret: Value = serde_json::from_slice(&body).expect("secret json");
    f.rv += 1;
    secret["metadata"]["resourceVersion"] = json!(f.rv.to_string());
    f.secret = Some(secret.clone());
    let code = if method == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (code, axum::Json(secret))
}

async fn get_configuration(State(fake): State<Shared>) -> (StatusCode, axum::Json<Value>) {
    found(
        fake.lock().expect("fake").configuration.clone(),
        "configuration",
    )
}

/// Server-side apply of the caBundle: merged into the stored webhook of
/// that name.
async fn apply_configuration(
    State(fake): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let mut f = fake.lock().expect("fake");
    f.writes
        .push((Method::PATCH, format!("configuration/{name}")));
    let body: Value = serde_json::from_slice(&body).expect("apply json");
    let Some(mut stored) = f.configuration.clone() else {
        return not_found("configuration");
    };
    for hook in body["webhooks"].as_array().expect("webhooks") {
        let entry = stored["webhooks"]
            .as_array_mut()
            .expect("stored webhooks")
            .iter_mut()
            .find(|w| w["name"] == hook["name"])
            .expect("applied to an existing webhook");
        entry["clientConfig"]["caBundle"] = hook["clientConfig"]["caBundle"].clone();
    }
    f.configuration = Some(stored.clone());
    (StatusCode::OK, axum::Json(stored))
}

async fn start() -> (Shared, kube::Client) {
    let fake: Shared = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            get(get_secret).put(write_secret),
        )
        .route("/api/v1/namespaces/{ns}/secrets", post(write_secret))
        .route(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
            get(get_configuration).patch(apply_configuration),
        )
        .with_state(fake.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    let config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
    (fake, kube::Client::try_from(config).expect("client"))
}

fn writes(fake: &Shared) -> Vec<(Method, String)> {
    fake.lock().expect("fake").writes.clone()
}

/// The live caBundle, decoded.
fn live_bundle(fake: &Shared) -> Option<String> {
    let f = fake.lock().expect("fake");
    let b64 = f.configuration.as_ref()?["webhooks"][0]["clientConfig"]["caBundle"].as_str()?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    Some(String::from_utf8(pem).expect("pem"))
}

fn certs_in(bundle: &str) -> usize {
    bundle.matches("-----BEGIN CERTIFICATE-----").count()
}

/// One check by a replica serving `serving`; then the live caBundle and
/// how many writes the fake has seen in all.
async fn check_then(
    fake: &Shared,
    client: &kube::Client,
    serving: &ServingCert,
) -> (Option<String>, usize) {
    certs::check(client, &WebhookNames::default(), serving)
        .await
        .expect("check");
    (live_bundle(fake), writes(fake).len())
}

#[tokio::test]
async fn a_recreated_configuration_gets_its_ca_bundle_back_on_the_next_check() {
    let (fake, client) = start().await;
    fake.lock().expect("fake").configuration = Some(installed());
    let serving = ServingCert::default();

    // First check: the Secret is made (one write) and the caBundle set
    // (another).
    let (bundle, n) = check_then(&fake, &client, &serving).await;
    assert!(serving.ready());
    let ca = fake.lock().expect("fake").secret.clone().expect("secret")["data"]["ca.crt"]
        .as_str()
        .map(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .expect("b64")
        })
        .map(|b| String::from_utf8(b).expect("pem"))
        .expect("ca.crt");
    assert_eq!((bundle.as_deref(), n), (Some(ca.as_str()), 2));
    let fixed = (Some(ca.clone()), 2);

    // The live object is in order: no write at all.
    assert_eq!(check_then(&fake, &client, &serving).await, fixed);

    // `kubectl replace` / `helm upgrade --force`: the configuration comes
    // back without a caBundle. Nothing changed in memory or in the Secret,
    // yet the next check sets it again, once, and the one after writes
    // nothing.
    fake.lock().expect("fake").configuration = Some(installed());
    let fixed = (Some(ca.clone()), 3);
    assert_eq!(check_then(&fake, &client, &serving).await, fixed);
    assert_eq!(
        writes(&fake)[2],
        (Method::PATCH, "configuration/weft-injector".into())
    );
    assert_eq!(check_then(&fake, &client, &serving).await, fixed);

    // An emptied caBundle (`caBundle: ""`) is the same.
    fake.lock()
        .expect("fake")
        .configuration
        .as_mut()
        .expect("cfg")["webhooks"][0]["clientConfig"]["caBundle"] = json!("");
    let fixed = (Some(ca), 4);
    assert_eq!(check_then(&fake, &client, &serving).await, fixed);
    assert_eq!(check_then(&fake, &client, &serving).await, fixed);
}

#[tokio::test]
async fn run_repairs_a_recreated_configuration_within_seconds() {
    let (fake, client) = start().await;
    fake.lock().expect("fake").configuration = Some(installed());
    let serving = Arc::new(ServingCert::default());
    let task = tokio::spawn(certs::run(client, WebhookNames::default(), serving));
    let wait_for_bundle = async || {
        for _ in 0..400 {
            if live_bundle(&fake).is_some() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        false
    };
    assert!(wait_for_bundle().await, "the caBundle was set");
    fake.lock().expect("fake").configuration = Some(installed());
    let recheck = certs::RECHECK + std::time::Duration::from_secs(5);
    assert!(
        tokio::time::timeout(recheck, wait_for_bundle())
            .await
            .unwrap_or(false),
        "repaired within one RECHECK ({:?})",
        certs::RECHECK
    );
    task.abort();
}

#[tokio::test]
async fn a_new_ca_is_published_beside_the_old_one_before_it_is_served() {
    let (fake, client) = start().await;
    fake.lock().expect("fake").configuration = Some(installed());
    let names = WebhookNames::default();
    let (a, b) = (ServingCert::default(), ServingCert::default());
    let old = certs::check(&client, &names, &a).await.expect("a");
    assert_eq!(certs::check(&client, &names, &b).await.expect("b"), old);

    // The Secret is deleted: replica a mints a new CA. Replica b still
    // serves the old CA's certificate until its next check, so the bundle
    // holds both, the new one first.
    fake.lock().expect("fake").secret = None;
    let new = certs::check(&client, &names, &a).await.expect("a");
    assert_ne!(new.ca_cert, old.ca_cert);
    let bundle = live_bundle(&fake).expect("bundle");
    assert!(bundle.starts_with(&new.ca_cert), "{bundle}");
    assert_eq!(certs_in(&bundle), 2);
    let before = writes(&fake).len();

    // Replica b reads the new Secret and finds the bundle in order: no
    // write, and it does not take either CA out.
    assert_eq!(certs::check(&client, &names, &b).await.expect("b"), new);
    assert_eq!(writes(&fake).len(), before, "{:?}", writes(&fake));
    assert_eq!(live_bundle(&fake).as_deref(), Some(bundle.as_str()));
}

#[tokio::test]
async fn without_a_configuration_the_check_fails_but_the_server_still_gets_a_certificate() {
    let (fake, client) = start().await;
    let serving = ServingCert::default();
    let err = certs::check(&client, &WebhookNames::default(), &serving)
        .await
        .expect_err("no configuration");
    assert!(format!("{err:#}").contains("not found"), "{err:#}");
    assert!(serving.ready(), "anything beats nothing");
    // Only the Secret was written: no apply that would create a bare
    // configuration.
    assert_eq!(writes(&fake), [(Method::POST, "secret".to_owned())]);
}
