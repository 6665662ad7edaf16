//! Admission webhook benchmark: how long one AdmissionReview takes for a
//! typical Deployment pod (two containers, named ports, HTTP probes,
//! resources, a ConfigMap volume), in process (decode, inject, encode) and
//! over HTTPS at a fixed rate against the real server on loopback. Writes
//! `bench/results/webhook.md`. Target: p99 ≤ 2 ms in process.
//!
//! Run with `make bench` (release build). Without `--bench` (as under
//! `cargo test --all-targets`) it is a smoke run: a few reviews, nothing
//! written.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use weft::inject::certs::{self, Plan, WebhookNames};
use weft::inject::webhook::{self, AllMeshed, ServingCert, Webhook};
use weft::inject::{ClusterCaps, InjectSettings};

const IN_PROCESS: usize = 20_000;
const HTTPS_RATE: u64 = 200;
const HTTPS_SECONDS: u64 = 10;
const TARGET_P99: Duration = Duration::from_millis(2);

fn hook() -> Webhook {
    Webhook::new(
        InjectSettings::new(
            "ghcr.io/weft-mesh/weft:0.1.0",
            ClusterCaps {
                native_sidecars: true,
            },
        ),
        Box::new(AllMeshed),
    )
}

/// A Deployment's pod as the ReplicaSet controller creates it.
fn typical_pod() -> Value {
    let probe =
        |path: &str| json!({ "httpGet": { "path": path, "port": "http" }, "periodSeconds": 10 });
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "checkout-6c9d4b7f8-", "namespace": "shop",
            "labels": { "app": "checkout", "pod-template-hash": "6c9d4b7f8", "version": "v4" },
            "annotations": { "prometheus.io/scrape": "true" },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-6c9d4b7f8",
                "uid": "0d7c9a4e-1111-4c55-9a0e-3f0e5d3b8a11", "controller": true, "blockOwnerDeletion": true }],
        },
        "spec": {
            "serviceAccountName": "checkout",
            "containers": [
                {
                    "name": "checkout", "image": "shop/checkout:4.4.0",
                    "ports": [{ "name": "http", "containerPort": 8080 }, { "name": "metrics", "containerPort": 9102 }],
                    "env": [{ "name": "PAYMENTS_URL", "value": "http://payments.payments:80" }],
                    "resources": { "requests": { "cpu": "200m", "memory": "256Mi" }, "limits": { "memory": "512Mi" } },
                    "livenessProbe": probe("/healthz"), "readinessProbe": probe("/ready"),
                    "volumeMounts": [{ "name": "settings", "mountPath": "/etc/checkout" }],
                },
                { "name": "log-shipper", "image": "shop/fluent-bit:3.0", "resources": { "requests": { "cpu": "20m" } } },
            ],
            "volumes": [{ "name": "settings", "configMap": { "name": "checkout-settings" } }],
        },
    })
}

fn review_body() -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop", "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": typical_pod(), "dryRun": false,
        },
    })
    .to_string()
    .into_bytes()
}

/// Decode, inject, encode: what the handler does with a body.
fn one_review(hook: &Webhook, body: &[u8]) -> usize {
    let answer = webhook::review(hook, body).expect("a valid review");
    let out = serde_json::to_vec(&answer).expect("encode");
    assert!(out.len() > 1000, "a patch was made");
    out.len()
}

struct Stats {
    n: u64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn stats(h: &Histogram<u64>) -> Stats {
    let us = |q: f64| h.value_at_quantile(q) as f64;
    Stats {
        n: h.len(),
        p50: us(0.5),
        p99: us(0.99),
        p999: us(0.999),
        max: h.max() as f64,
    }
}

fn in_process(hook: &Webhook, body: &[u8]) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for _ in 0..1000 {
        one_review(hook, body);
    }
    for _ in 0..IN_PROCESS {
        let t = Instant::now();
        one_review(hook, body);
        h.saturating_record(t.elapsed().as_micros().max(1) as u64);
    }
    h
}

/// Open-loop at a fixed rate over a few keep-alive HTTPS connections;
/// latency from each request's scheduled time.
async fn over_https(body: Vec<u8>) -> Histogram<u64> {
    use http_body_util::{BodyExt, Full};
    let names = WebhookNames::default();
    let Plan::Store(m, _) = certs::plan(None, &names, SystemTime::now()).expect("plan") else {
        unreachable!("nothing stored yet")
    };
    let serving = Arc::new(ServingCert::default());
    serving.set(&m.cert, &m.key).expect("serving cert");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(webhook::serve_https(
        l,
        serving,
        webhook::router(Arc::new(hook())),
    ));

    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(m.ca_cert.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(weft::proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut senders = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name =
            rustls::pki_types::ServerName::try_from("weft-injector.weft-system.svc").expect("name");
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .expect("tls");
        let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("http");
        tokio::spawn(conn);
        senders.push(Arc::new(tokio::sync::Mutex::new(tx)));
    }
    let hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let body = bytes::Bytes::from(body);
    // The pacer is an OS thread: tokio's timer is too coarse to schedule
    // requests 5 ms apart without adding its own lag to every one.
    let total = HTTPS_RATE * HTTPS_SECONDS;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let start = Instant::now() + Duration::from_millis(50);
    std::thread::spawn(move || {
        for i in 0..total {
            let scheduled = start + Duration::from_micros(i * 1_000_000 / HTTPS_RATE);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if tx.send((i, scheduled)).is_err() {
                return;
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((i, scheduled)) = rx.recv().await {
        let (sender, body, hist) = (
            senders[(i as usize) % senders.len()].clone(),
            body.clone(),
            hist.clone(),
        );
        tasks.spawn(async move {
            let mut tx = sender.lock().await;
            let req = http::Request::post("/mutate")
                .header("host", "weft-injector.weft-system.svc")
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("request");
            let rsp = tx.send_request(req).await.expect("response");
            assert_eq!(rsp.status(), 200);
            let _ = rsp.into_body().collect().await.expect("body");
            let us = scheduled.elapsed().as_micros().max(1) as u64;
            hist.lock().expect("hist").saturating_record(us);
        });
    }
    while tasks.join_next().await.is_some() {}
    hist.lock().expect("hist").clone()
}

fn main() {
    let body = review_body();
    let hook = hook();
    if !std::env::args().any(|a| a == "--bench") {
        let n = one_review(&hook, &body);
        println!(
            "webhook bench smoke: one review answered ({n} bytes); run `make bench` to measure"
        );
        return;
    }
    let local = stats(&in_process(&hook, &body));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let remote = stats(&rt.block_on(over_https(body.clone())));

    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "# Admission webhook: latency per AdmissionReview\n");
    let _ = writeln!(
        md,
        "Produced by `make bench` (`benches/webhook.rs`) on {date}, {cores} cores, release build. \
         The review is a Deployment's pod ({} bytes of AdmissionReview: two containers, named ports, \
         HTTP probes, resources, a ConfigMap volume) in a labelled namespace, injected as a native sidecar.\n",
        body.len()
    );
    let _ = writeln!(
        md,
        "- **in process**: `webhook::review` on the body (JSON decode, the patch builder, JSON encode of the answer), \
         {IN_PROCESS} times after 1000 unrecorded, one thread;\n\
         - **over HTTPS**: the real server (`webhook::serve_https`, TLS 1.3) on loopback, {HTTPS_RATE} reviews/s for \
         {HTTPS_SECONDS} s over 4 keep-alive connections, open loop, latency from each request's scheduled time to the \
         end of its response (client and server share the machine).\n"
    );
    let _ = writeln!(
        md,
        "| path | reviews | p50 µs | p99 µs | p99.9 µs | max µs |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for (name, s) in [("in process", &local), ("over HTTPS", &remote)] {
        let _ = writeln!(
            md,
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.n, s.p50, s.p99, s.p999, s.max
        );
    }
    let met = local.p99 <= TARGET_P99.as_micros() as f64;
    let _ = writeln!(
        md,
        "\nTarget: p99 ≤ {} ms in process: **{}** ({:.0} µs).",
        TARGET_P99.as_millis(),
        if met { "MET" } else { "MISSED" },
        local.p99
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/webhook.md");
    std::fs::write(&path, &md).expect("write results");
    print!("{md}");
}
