//! Pieces for tier-3 proxy tests: a real upstream on loopback whose
//! behaviour a test scripts, the real proxy started in-process with a
//! config file in a temp dir, and a real HTTP client.

#![allow(dead_code)]

pub mod mesh;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weft::proxy::{Proxy, ProxyArgs, Running};

/// An axum app served on a loopback port while this lives (fakes of what
/// a proxy talks to: a collector, a vendor's API).
pub struct Served {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn serve(app: axum::Router) -> Served {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Served { addr, task }
}

/// What the upstream answers: `(status, body, delay)` for the n-th request
/// (0-based) it has seen, given the request.
pub type Behaviour =
    Arc<dyn Fn(usize, &http::Request<Incoming>) -> (u16, String, Duration) + Send + Sync>;

/// A real HTTP/1.1 + h2c server on loopback that counts requests.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub behaviour: Arc<std::sync::Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(std::sync::Mutex::new(behaviour));
        let (h, b) = (hits.clone(), behaviour.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let (h, b) = (h.clone(), b.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let n = h.fetch_add(1, Ordering::SeqCst);
                        let f = b.lock().expect("behaviour").clone();
                        let (status, body, delay) = f(n, &req);
                        let echo_identity = req.headers().get("x-echo").cloned();
                        async move {
                            // Read the whole request body so a client's body is consumed.
                            let _ = req.into_body().collect().await;
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut rsp = http::Response::new(Full::new(Bytes::from(body)));
                            *rsp.status_mut() = http::StatusCode::from_u16(status).expect("status");
                            if let Some(v) = echo_identity {
                                rsp.headers_mut().insert("x-echo", v);
                            }
                            Ok::<_, Infallible>(rsp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            hits,
            behaviour,
            task,
        }
    }

    /// Always answers `status` with `body`.
    pub async fn fixed(status: u16, body: &str) -> Self {
        let body = body.to_owned();
        Self::start(Arc::new(move |_, _| (status, body.clone(), Duration::ZERO))).await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("behaviour") = behaviour;
    }
}

/// The default policy block of a config.
pub fn default_policy() -> Value {
    json!({
        "retry": {
            "maxRetries": 1, "retryOn": ["connect-failure"],
            "methods": ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"],
            "idempotencyHeader": "idempotency-key",
            "budget": { "percent": 20, "minPerSecond": 10, "windowMs": 10000 },
            "backoffBaseMs": 1, "backoffMaxMs": 5
        },
        "loadBalancer": "PeakEwma"
    })
}

/// A Service entry `name.shop` on port 80 with explicit endpoints.
pub fn service(
    name: &str,
    endpoints: &[SocketAddr],
    policy: Option<Value>,
    routes: Value,
) -> Value {
    let mut s = json!({
        "name": name, "namespace": "shop",
        "hostnames": [format!("{name}.shop.svc.cluster.local"), format!("{name}.shop.svc"), format!("{name}.shop")],
        "ports": [{ "port": 80, "targetPort": 8080, "protocol": "detect" }],
        "endpoints": endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        "routes": routes,
    });
    if let Some(p) = policy {
        s["policy"] = p;
    }
    s
}

/// A TrafficPolicy-shaped resolved policy with overrides merged in.
pub fn policy(overrides: Value) -> Value {
    let mut p = default_policy();
    p["source"] = json!("shop/test");
    merge(&mut p, overrides);
    p
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A whole ProxyConfig for namespace `shop`.
pub fn config(services: Vec<Value>) -> Value {
    json!({
        "schemaVersion": "1.0", "generation": format!("test-{}", fastrand::u64(..)),
        "namespace": "shop", "trustDomain": "cluster.local",
        "inbound": { "mode": "permissive" },
        "outbound": { "defaults": default_policy(), "services": services },
    })
}

/// A running in-process proxy with an explicit outbound listener per
/// mapped Service.
pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub running: Running,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// Writes endpoints document `doc` (a `weft-endpoints` as mounted)
    /// and waits until the proxy took it.
    pub async fn publish_endpoints(&self, doc: &Value) {
        let before = self.metric("weft_proxy_endpoints_reloads").await;
        write_atomic(
            &self.dir.path().join("endpoints.json"),
            doc.to_string().as_bytes(),
        );
        let after = self
            .wait_metric("weft_proxy_endpoints_reloads", before + 1.0)
            .await;
        assert!(
            after > before,
            "the proxy did not take endpoints {}",
            doc["generation"]
        );
    }

    /// Replaces the config file atomically, as the kubelet does.
    pub fn write_config(&self, config: &Value) {
        write_atomic(&self.config_path(), config.to_string().as_bytes());
    }

    /// `http://addr` of the n-th explicit outbound listener.
    pub fn outbound_url(&self, n: usize) -> String {
        format!("http://{}", self.running.outbound[n])
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.running.admin);
        let rsp = client()
            .get(url.parse().expect("uri"))
            .await
            .expect("metrics");
        String::from_utf8(
            rsp.into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .to_vec(),
        )
        .expect("utf8")
    }

    /// Polls a metric until it reaches `at_least` (at most 5 s); returns
    /// its last value.
    pub async fn wait_metric(&self, prefix: &str, at_least: f64) -> f64 {
        let mut value = 0.0;
        for _ in 0..50 {
            value = self.metric(prefix).await;
            if value >= at_least {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        value
    }

    /// The value of one sample line, e.g. `weft_proxy_retries_total{dst="inventory.shop:80"}`.
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// Starts a proxy whose explicit outbound listeners map to `targets`
/// (`host:port`), with `config` on disk.
pub async fn start_proxy(config: &Value, targets: &[&str], extra: &[&str]) -> TestProxy {
    start_proxy_with(config, targets, extra, None).await
}

/// What a proxy wrote to its access log (stdout in a pod), read back.
#[derive(Clone, Default)]
pub struct Lines(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Every line so far, each parsed as one JSON object.
    pub fn now(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().expect("lines").clone()).expect("utf8");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
            .collect()
    }

    /// The lines once there are at least `n` (at most 5 s).
    pub async fn wait(&self, n: usize) -> Vec<Value> {
        for _ in 0..500 {
            let lines = self.now();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not {n} access-log lines: {:#?}", self.now());
    }
}

/// [`start_proxy`], its access-log lines (if `--access-log json` is among
/// `extra`) going to `log`.
pub async fn start_proxy_with(
    config: &Value,
    targets: &[&str],
    extra: &[&str],
    log: Option<Lines>,
) -> TestProxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.json");
    write_atomic(&path, config.to_string().as_bytes());
    let mut argv: Vec<String> = vec![
        "proxy".into(),
        "--config".into(),
        path.display().to_string(),
        "--no-transparent".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--probe".into(),
        "127.0.0.1:0".into(),
    ];
    for t in targets {
        argv.push("--outbound-map".into());
        argv.push(format!("127.0.0.1:0={t}"));
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = parse_args(&argv);
    let proxy = match log {
        None => Proxy::new(&args),
        Some(lines) => Proxy::with_access_log_to(&args, Box::new(lines)),
    }
    .expect("proxy");
    let running = weft::proxy::start(&args, proxy.clone())
        .await
        .expect("proxy starts");
    assert!(
        proxy.store.ready(),
        "proxy ready once the config is loaded and listeners bound"
    );
    TestProxy {
        proxy,
        running,
        dir,
    }
}

pub fn parse_args(argv: &[String]) -> ProxyArgs {
    use clap::{Args, FromArgMatches};
    let cmd = ProxyArgs::augment_args(clap::Command::new("proxy"));
    let matches = cmd.try_get_matches_from(argv).expect("proxy args");
    ProxyArgs::from_arg_matches(&matches).expect("proxy args")
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

/// A finished response: status, the proxy error header, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub proxy_error: Option<String>,
    pub body: String,
    pub headers: http::HeaderMap,
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let rsp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20s")
        .expect("response");
    let status = rsp.status().as_u16();
    let proxy_error = rsp
        .headers()
        .get("weft-proxy-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        proxy_error,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
    }
}

/// Polls `url` until it answers `status` (at most 5 s); returns the last
/// status seen.
pub async fn wait_status(url: &str, status: u16) -> u16 {
    let mut last = 0;
    for _ in 0..50 {
        last = get(url).await.status;
        if last == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

pub async fn get(url: &str) -> Reply {
    send(&client(), "GET", url, &[]).await
}
