//! The admission webhook: AdmissionReview in and out (in process and over
//! HTTPS), the answers to bad input, the serving certificate swapped while
//! serving, and (tier 2) the serving-certificate flow against a mock API
//! server that checks the exact server-side-apply request for the caBundle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weft::inject::certs::{self, Plan, WebhookNames};
use weft::inject::webhook::{self, AllMeshed, ServingCert, Webhook};
use weft::inject::{ClusterCaps, InjectSettings};

#[path = "support/fakeapi.rs"]
mod fakeapi;

fn hook() -> Webhook {
    Webhook::new(
        InjectSettings::new(
            "weft:test",
            ClusterCaps {
                native_sidecars: true,
            },
        ),
        Box::new(AllMeshed),
    )
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "generateName": "catalog-", "namespace": "shop", "labels": { "app": "catalog" } },
        "spec": { "containers": [{ "name": "catalog", "image": "shop/catalog:1", "ports": [{ "containerPort": 15120 }] }] },
    })
}

fn review(kind: &str, operation: &str, object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": kind },
            "resource": { "group": "", "version": "v1", "resource": format!("{}s", kind.to_lowercase()) },
            "namespace": "shop",
            "operation": operation,
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": object,
            "dryRun": false,
        },
    })
}

/// A review's patch bytes: the API server (Go's `[]byte`) reads a base64
/// string or an array of byte values; kube-rs writes the array.
fn patch_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("base64"),
        ),
        Value::Array(a) => Some(
            a.iter()
                .map(|b| {
                    b.as_u64()
                        .and_then(|b| u8::try_from(b).ok())
                        .expect("a byte")
                })
                .collect(),
        ),
        _ => None,
    }
}

/// The response part of an answered review, with the patch decoded.
fn response(answer: &Value) -> (bool, Option<Value>, Vec<String>) {
    let r = &answer["response"];
    assert_eq!(
        r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
        "the uid is echoed"
    );
    let patch = patch_bytes(&r["patch"]).map(|bytes| {
        assert_eq!(r["patchType"], "JSONPatch");
        serde_json::from_slice(&bytes).expect("patch json")
    });
    let warnings = r["warnings"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (r["allowed"].as_bool().unwrap_or(false), patch, warnings)
}

#[test]
fn a_pod_create_gets_the_patch_and_warnings_anything_else_passes_unchanged() {
    let h = hook();
    let body = review("Pod", "CREATE", pod()).to_string();
    let answer =
        serde_json::to_value(webhook::review(&h, body.as_bytes()).expect("review")).expect("json");
    let (allowed, patch, warnings) = response(&answer);
    assert!(allowed);
    let patch = patch.expect("a patch");
    let mut injected = pod();
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("patch");
    json_patch::patch(&mut injected, &patch).expect("applies");
    assert_eq!(injected["spec"]["initContainers"][1]["name"], "weft-proxy");
    assert!(
        warnings.iter().any(|w| w.contains("15120")),
        "the port collision is reported: {warnings:?}"
    );

    for (kind, op, object) in [
        ("Pod", "UPDATE", pod()),
        ("Pod", "DELETE", pod()),
        (
            "Service",
            "CREATE",
            json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "x" } }),
        ),
    ] {
        let body = review(kind, op, object).to_string();
        let answer = serde_json::to_value(webhook::review(&h, body.as_bytes()).expect("review"))
            .expect("json");
        assert_eq!(response(&answer), (true, None, vec![]), "{kind} {op}");
    }
}

#[test]
fn bodies_that_are_not_admission_reviews_are_refused_with_a_message() {
    let h = hook();
    for body in [
        &b"not json"[..],
        b"{}",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        let err = webhook::review(&h, body).expect_err("refused");
        assert!(err.contains("AdmissionReview"), "{err}");
    }
}

/// An HTTPS client that trusts `ca_pem` only.
fn https_client(ca_pem: &str) -> reqwest_like::Client {
    reqwest_like::Client::new(ca_pem)
}

/// A minimal HTTPS client on hyper and rustls, enough for these tests.
mod reqwest_like {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    pub struct Client {
        config: Arc<rustls::ClientConfig>,
    }

    impl Client {
        pub fn new(ca_pem: &str) -> Self {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(c.expect("pem")).expect("root");
            }
            let config = rustls::ClientConfig::builder_with_provider(weft::proxy::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Self {
                config: Arc::new(config),
            }
        }

        /// Sends one request to `addr` as `host`; returns status, body and
        /// the server certificate's serial.
        pub async fn send(
            &self,
            addr: std::net::SocketAddr,
            host: &str,
            method: &str,
            path: &str,
            body: Vec<u8>,
        ) -> (u16, String, Vec<u8>) {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from(host.to_owned()).expect("name");
            let tls = tokio_rustls::TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
                .expect("TLS handshake with the webhook");
            let serial = tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec();
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("http");
            tokio::spawn(conn);
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", host)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            let rsp = tx.send_request(req).await.expect("response");
            let status = rsp.status().as_u16();
            let body = rsp.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned(), serial)
        }
    }
}

fn names() -> WebhookNames {
    WebhookNames::default()
}

fn material() -> certs::Material {
    match certs::plan(None, &names(), SystemTime::now()).expect("plan") {
        Plan::Store(m, _) => m,
        Plan::Keep(_) => unreachable!("nothing was stored"),
    }
}

#[tokio::test]
async fn the_https_server_answers_reviews_refuses_junk_and_swaps_its_certificate() {
    let m = material();
    let serving = Arc::new(ServingCert::default());
    serving.set(&m.cert, &m.key).expect("cert");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(webhook::serve_https(
        l,
        serving.clone(),
        webhook::router(Arc::new(hook())),
    ));
    let client = https_client(&m.ca_cert);
    let host = "weft-injector.weft-system.svc";

    let (status, body, first_cert) = client.send(addr, host, "GET", "/healthz", vec![]).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let review = review("Pod", "CREATE", pod()).to_string().into_bytes();
    let (status, body, _) = client.send(addr, host, "POST", "/mutate", review).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert!(response(&answer).1.is_some(), "patched");

    let (status, body, _) = client
        .send(addr, host, "POST", "/mutate", b"{not json".to_vec())
        .await;
    assert_eq!(status, 400);
    assert!(body.contains("not an AdmissionReview"), "{body}");
    let huge = vec![b' '; webhook::MAX_BODY + 1];
    let (status, body, _) = client.send(addr, host, "POST", "/mutate", huge).await;
    assert_eq!(status, 400, "{body}");

    // A renewed certificate (same CA) is served on the next handshake.
    let ca = weft::identity::MeshCa::from_pem(&m.ca_cert, &m.ca_key).expect("ca");
    let renewed = ca
        .issue_server(
            &names().dns_names(),
            SystemTime::now(),
            certs::SERVING_LIFETIME,
        )
        .expect("renewed");
    serving
        .set(&renewed.cert_pem, &renewed.key_pem)
        .expect("swap");
    // A new client: no session to resume, so a full handshake.
    let fresh = https_client(&m.ca_cert);
    let (status, _, second_cert) = fresh.send(addr, host, "GET", "/healthz", vec![]).await;
    assert_eq!(status, 200);
    assert_ne!(
        first_cert, second_cert,
        "the new certificate is served without a restart"
    );
}

/// What the mock API server saw.
#[derive(Default)]
struct Seen {
    secret: Option<Value>,
    apply: Option<(HashMap<String, String>, String, Value)>,
}

type Shared = Arc<Mutex<Seen>>;

async fn get_secret(
    State(seen): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
) -> (StatusCode, axum::Json<Value>) {
    let stored = seen.lock().expect("seen").secret.clone();
    match stored {
        Some(s) => (StatusCode::OK, axum::Json(s)),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("secrets \"{name}\" not found in {ns}"),
            })),
        ),
    }
}

async fn create_secret(State(seen): State<Shared>, body: Bytes) -> (StatusCode, axum::Json<Value>) {
    let mut secret: Value = serde_json::from_slice(&body).expect("secret json");
    secret["metadata"]["resourceVersion"] = json!("1");
    seen.lock().expect("seen").secret = Some(secret.clone());
    (StatusCode::CREATED, axum::Json(secret))
}

async fn apply_webhook(
    State(seen): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<Value> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = serde_json::from_slice(&body).expect("apply body is JSON");
    seen.lock().expect("seen").apply = Some((q, content_type, body.clone()));
    // The merged object, as the API server would return it.
    let mut stored = body;
    stored["metadata"]["name"] = json!(name);
    stored["webhooks"][0]["sideEffects"] = json!("None");
    stored["webhooks"][0]["admissionReviewVersions"] = json!(["v1"]);
    axum::Json(stored)
}

/// The configuration as installed: the control plane reads it to see
/// whether its caBundle is in order.
async fn get_webhook(Path(name): Path<String>) -> axum::Json<Value> {
    axum::Json(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [{
            "name": "inject.weft.dev", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "clientConfig": {},
        }],
    }))
}

#[tokio::test]
async fn tier2_the_serving_certificate_is_created_and_its_ca_applied_to_the_webhook_configuration()
{
    let seen: Shared = Arc::default();
    let api = axum::Router::new()
        .route("/api/v1/namespaces/{ns}/secrets/{name}", get(get_secret))
        .route("/api/v1/namespaces/{ns}/secrets", post(create_secret))
        .route(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
            get(get_webhook).patch(apply_webhook),
        )
        .with_state(seen.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, api).await });
    let config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");

    let serving = Arc::new(ServingCert::default());
    let task = tokio::spawn(certs::run(client, names(), serving.clone()));
    let mut applied = None;
    for _ in 0..100 {
        applied = seen.lock().expect("seen").apply.clone();
        if applied.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let (query, content_type, body) = applied.expect("the caBundle was applied");
    assert!(serving.ready(), "the server has its certificate");

    let secret = seen
        .lock()
        .expect("seen")
        .secret
        .clone()
        .expect("secret created");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let ca_b64 = secret["data"]["ca.crt"].as_str().expect("ca.crt");
    let expected = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "weft-injector" },
        "webhooks": [{ "name": "inject.weft.dev", "clientConfig": { "caBundle": ca_b64 } }],
    });
    assert_eq!(body, expected, "exactly the caBundle, nothing else");
    assert_eq!(content_type, "application/apply-patch+yaml");
    assert_eq!(
        query.get("fieldManager").map(String::as_str),
        Some("weft-control-plane")
    );
    assert_eq!(query.get("force").map(String::as_str), Some("true"));
}

/// A webhook on loopback with the generated serving certificate, under
/// `limits`; its address and CA (PEM).
async fn serve_webhook(limits: weft::proxy::server::HttpLimits) -> (std::net::SocketAddr, String) {
    let m = material();
    let serving = Arc::new(ServingCert::default());
    serving.set(&m.cert, &m.key).expect("cert");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(webhook::serve_https_until(
        l,
        serving,
        webhook::router(Arc::new(hook())),
        std::future::pending(),
        webhook::DRAIN_TIMEOUT,
        limits,
    ));
    (addr, m.ca_cert)
}

/// An HTTP/2 client connection to the webhook over TLS (ALPN `h2`), as the
/// API server opens one; the task ends when the connection closes. `Err`
/// when the server closed the connection before the handshakes finished.
async fn h2_connection(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    String,
> {
    h2_connection_from(addr, ca_pem, 1).await
}

/// A TCP connection from loopback address `127.0.0.<from>` (Linux routes
/// all of 127/8 to lo): another source address, as another pod would be.
async fn connect_from(
    addr: std::net::SocketAddr,
    from: u8,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, from], 0)))?;
    socket.connect(addr).await
}

/// A TLS client that trusts `ca_pem` and offers ALPN `h2`, as the API
/// server dials the webhook.
fn h2_tls(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(weft::proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The name the webhook's serving certificate is for.
fn webhook_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("weft-injector.weft-system.svc").expect("name")
}

/// [`h2_connection`] from `127.0.0.<from>`.
async fn h2_connection_from(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    from: u8,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    String,
> {
    let tcp = connect_from(addr, from).await.map_err(|e| e.to_string())?;
    let tls = h2_tls(ca_pem)
        .connect(webhook_name(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .map_err(|e| format!("HTTP/2: {e}"))?;
    Ok((send, tokio::spawn(conn)))
}

/// `GET /healthz` on an HTTP/2 connection; its status.
async fn healthz(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
) -> Result<u16, String> {
    use http_body_util::BodyExt;
    let req = http::Request::get("https://weft-injector.weft-system.svc/healthz")
        .body(http_body_util::Empty::new())
        .expect("request");
    let rsp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    rsp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

/// An HTTP/2 connection that carries no request is closed once the idle
/// timeout passes, although its client answers every keep-alive ping: a
/// peer that only answers pings cannot hold a webhook connection (one of
/// its capped few) for ever. (The idle timeout is short here; the header
/// read timeout is the real one.)
#[tokio::test]
async fn an_idle_http2_connection_to_the_webhook_is_closed() {
    let limits = weft::proxy::server::HttpLimits {
        idle_timeout: Duration::from_millis(300),
        ..webhook::LIMITS
    };
    let (addr, ca) = serve_webhook(limits).await;
    let (mut send, conn) = h2_connection(addr, &ca).await.expect("connect");
    assert_eq!(healthz(&mut send).await, Ok(200));
    // `send` is kept: a client connection with no sender left closes itself.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "the server closed the idle connection (GOAWAY): {closed:?}"
    );
    drop(send);
}

/// The webhook holds at most `MAX_CONNECTIONS` connections: with that many
/// open and silent (clients that connect and never start TLS, from as many
/// sources as the per-source share needs), the next, from yet another
/// source, is closed at once while those stay open; once some of them go,
/// a client is served again.
#[tokio::test]
async fn the_webhook_refuses_connections_past_its_cap_and_serves_again_after() {
    use tokio::io::AsyncReadExt;
    // A long header-read timeout: a silent client would otherwise be
    // closed by it, and the test could not tell that from the cap.
    let limits = weft::proxy::server::HttpLimits {
        header_read_timeout: Duration::from_secs(60),
        ..webhook::LIMITS
    };
    let (addr, ca) = serve_webhook(limits).await;
    let mut silent = Vec::new();
    for i in 0..webhook::MAX_CONNECTIONS {
        let from = 10 + (i / webhook::SOURCE_SHARE) as u8;
        silent.push(connect_from(addr, from).await.expect("connect"));
    }
    let mut over = connect_from(addr, 200).await.expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the connection past the cap is closed by the server: {read:?}"
    );
    // Those within the cap are still open (a silent client is otherwise
    // closed by the handshake timeout, which would close the first first).
    let still = tokio::time::timeout(Duration::from_millis(100), silent[0].read(&mut buf)).await;
    assert!(
        still.is_err(),
        "the first silent connection is still open: {still:?}"
    );

    silent.truncate(webhook::MAX_CONNECTIONS - 8);
    // The server learns of the closes as it reads them: a few tries.
    let mut served = Err("not tried".to_owned());
    for _ in 0..50 {
        served = match h2_connection(addr, &ca).await {
            Ok((mut send, _conn)) => healthz(&mut send).await,
            Err(e) => Err(e),
        };
        if served == Ok(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served, Ok(200), "a client is served again");
    drop(silent);
}

/// One pod that reaches the webhook's port cannot take the slots the API
/// servers need: one source address holds at most `SOURCE_SHARE`
/// connections, and past that its new ones are closed at once while
/// another source is served.
#[tokio::test]
async fn one_source_cannot_hold_the_webhooks_connection_cap() {
    use tokio::io::AsyncReadExt;
    let limits = weft::proxy::server::HttpLimits {
        header_read_timeout: Duration::from_secs(60),
        ..webhook::LIMITS
    };
    let (addr, ca) = serve_webhook(limits).await;
    let mut held = Vec::new();
    for _ in 0..webhook::SOURCE_SHARE {
        held.push(connect_from(addr, 7).await.expect("connect"));
    }
    let mut over = connect_from(addr, 7).await.expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the source's connection past its share is closed: {read:?}"
    );
    let (mut send, _conn) = h2_connection_from(addr, &ca, 8)
        .await
        .expect("another source connects");
    assert_eq!(healthz(&mut send).await, Ok(200), "and is served");
    drop(held);
}

/// A client that completes its TLS handshake and then sends nothing (not
/// even the HTTP/2 preface) is closed after the header-read timeout, not
/// the idle timeout: it cannot hold a slot for a minute per connection.
#[tokio::test]
async fn a_silent_client_after_its_handshake_is_closed_at_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let limits = weft::proxy::server::HttpLimits {
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(60),
    };
    let (addr, ca) = serve_webhook(limits).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = h2_tls(&ca)
        .connect(webhook_name(), tcp)
        .await
        .expect("handshake");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the silent connection is closed: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "closed by the header-read timeout, not the idle one: {:?}",
        started.elapsed()
    );
}

/// Issue 18 item 9: the control plane's `/readyz` (what the Service in
/// front of the webhook routes by) waits for the caches the webhook reads,
/// the Namespaces and the Mesh, and for nothing of the operator's. The
/// whole control plane (`controlplane::serve`: webhook, admin server,
/// operator watches) runs against a fake API server (tier 2: no real one
/// runs here) that answers lists and watches but holds the Pod and Secret
/// lists unanswered, as a large cluster's take long: `/readyz` fails while
/// the Mesh list is held too, and passes once it is answered, the Pod and
/// Secret lists still pending. Were readiness to wait for the operator's
/// caches, a slow start would refuse every pod of a meshed namespace
/// (`failurePolicy: Fail`) until they listed.
#[tokio::test]
async fn webhook_readiness_does_not_wait_for_pod_or_secret_caches() {
    const PODS: &str = "/api/v1/pods";
    const SECRETS: &str = "/api/v1/secrets";
    const MESHES: &str = "/apis/weft.dev/v1alpha1/meshes";
    let (fake, client, held) = fakeapi::start_with_lists().await;
    let m = material();
    {
        let mut f = fake.lock().expect("fake");
        // The serving certificate, as cert-manager would have written it.
        f.objects.insert(
            "/api/v1/namespaces/weft-system/secrets/weft-injector-tls".into(),
            json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": { "name": "weft-injector-tls", "namespace": "weft-system" },
                "data": {
                    "tls.crt": base64::engine::general_purpose::STANDARD.encode(&m.cert),
                    "tls.key": base64::engine::general_purpose::STANDARD.encode(&m.key),
                    "ca.crt": base64::engine::general_purpose::STANDARD.encode(&m.ca_cert),
                },
            }),
        );
        f.objects.insert(
            "/api/v1/namespaces/shop".into(),
            json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": "shop", "labels": { "weft.dev/inject": "enabled" } },
            }),
        );
    }
    held.send_replace([PODS, SECRETS, MESHES].map(String::from).into());

    let admin = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let args = weft::controlplane::ControlPlaneArgs {
        webhook_listen: "127.0.0.1:0".parse().expect("addr"),
        namespace: "weft-system".into(),
        webhook_service: "weft-injector".into(),
        webhook_secret: "weft-injector-tls".into(),
        webhook_configuration: "weft-injector".into(),
        webhook_name: "inject.weft.dev".into(),
        webhook_cert_source: weft::controlplane::CertSource::External,
        proxy_image: "weft:test".into(),
        admin_listen: admin,
        lease_name: "weft-operator".into(),
        lease_duration: Duration::from_secs(15),
        pod_name: Some("weft-control-plane-0".into()),
        concurrency: 1,
    };
    let version = k8s_openapi::apimachinery::pkg::version::Info {
        major: "1".into(),
        minor: "33".into(),
        git_version: "v1.33.0".into(),
        ..Default::default()
    };
    let control_plane = tokio::spawn(weft::controlplane::serve(
        args,
        client,
        version,
        std::future::pending(),
    ));

    let requested = |path: &str, watch: bool| {
        fake.lock().expect("fake").seen.iter().any(|s| {
            s.method == http::Method::GET && s.path == path && s.query.contains("watch=") == watch
        })
    };
    let readyz = || async {
        let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/readyz")
            .header("host", "weft")
            .body(http_body_util::Empty::<Bytes>::new())
            .ok()?;
        Some(send.send_request(req).await.ok()?.status().as_u16())
    };
    // The certificate read and every list asked for, the Mesh's held.
    let mut asked = false;
    for _ in 0..200 {
        asked = requested(
            "/api/v1/namespaces/weft-system/secrets/weft-injector-tls",
            false,
        ) && requested("/api/v1/namespaces", false)
            && [PODS, SECRETS, MESHES].iter().all(|p| requested(p, false));
        if asked && readyz().await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        asked,
        "the control plane asked for its certificate and lists"
    );
    assert_eq!(
        readyz().await,
        Some(503),
        "not ready while the Mesh, which the webhook reads, is not listed"
    );

    held.send_modify(|h| {
        h.remove(MESHES);
    });
    let mut status = None;
    for _ in 0..200 {
        status = readyz().await;
        if status == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        Some(200),
        "ready once the Namespaces and the Mesh are listed"
    );
    assert!(
        !requested(PODS, true) && !requested(SECRETS, true),
        "the Pod and Secret lists are still unanswered (no watch followed them)"
    );
    assert!(!control_plane.is_finished(), "the control plane runs on");
    control_plane.abort();
}
