//! `weft-demo`: a stand-in for the shop's services in demos and tests. It
//! serves HTTP/1.1 and h2c on one port, calls the downstream services named
//! on its command line for every request it serves, and injects failures
//! on request, so an outage can be staged without touching the mesh.
//!
//! - `GET /...`: answers JSON with its name, the caller identity its proxy
//!   handed it (`weft-client-id`), and the status of each downstream call;
//!   the status is 502 if a downstream call failed.
//! - `GET /healthz`: 200 unless hard down (never slowed or failed by the
//!   error rate: a health path).
//! - `POST /__demo/faults?error_rate=0.2&latency=50ms&down=false`: sets the
//!   faults (each parameter optional; `POST /__demo/faults` alone clears).
//!
//! `--drive URL --rps N` also sends N GETs a second to URL (a shopper), so
//! `weft local` has traffic to show.
//!
//! Faults: `--error-rate` answers that share of requests 503, `--latency`
//! delays every answer, `--down` answers everything 503 (health included).
//!
//! As a stub vendor (`weft local` runs one per ExternalService called):
//! `--tls-cert`/`--tls-key` serve HTTPS (HTTP/1.1) instead, and
//! `--cache-control` marks its good answers cacheable.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "weft-demo",
    about = "A demo service for the weft mesh: serves, calls downstream, fails on request"
)]
struct Args {
    /// Where to listen (HTTP/1.1 and h2c).
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// This service's name, in every answer.
    #[arg(long, default_value = "demo")]
    name: String,
    /// A downstream service to call for every request served (repeatable),
    /// such as http://inventory.shop:80/items.
    #[arg(long = "call")]
    calls: Vec<String>,
    /// Share of requests answered 503 (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Added to every answer.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    latency: Duration,
    /// Answer everything 503.
    #[arg(long)]
    down: bool,
    /// Also drive load: GET this URL `--rps` times a second, for ever
    /// (repeatable; each URL gets its own rate). The demo's shoppers.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Requests per second for each `--drive` URL.
    #[arg(long, default_value_t = 10.0)]
    rps: f64,
    /// Instead of serving: GET this URL once, print the status on the first
    /// line and the body after it, exit 0 (1 when no response came).
    #[arg(long)]
    fetch: Option<String>,
    /// With `--fetch`: send this many GETs one after another and print a
    /// JSON summary instead (counts by status, by answering service, by
    /// `weft-proxy-error`, and requests with no response).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// With `--fetch`: the method (GET, or POST with an empty body, e.g.
    /// to set faults: `--fetch http://127.0.0.1:8080/__demo/faults?down=true
    /// --method POST`).
    #[arg(long, default_value = "GET")]
    method: http::Method,
    /// With `--fetch`: a request header `name:value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Serve HTTPS (HTTP/1.1) with this certificate chain (PEM), as a
    /// vendor outside the mesh does.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// `Cache-Control` of every 200 answer (a vendor's feed:
    /// `max-age=5`).
    #[arg(long)]
    cache_control: Option<http::HeaderValue>,
}

/// The TLS server of `--tls-cert`/`--tls-key`.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    // Not the key's text in the message: the PEM parser's errors may
    // quote the line, and a one-line key is the key.
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|_| format!("{}: not a PEM private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(weft::proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<weft::api::Duration>()
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    error_rate: f64,
    latency: Duration,
    down: bool,
}

struct State {
    name: String,
    calls: Vec<http::Uri>,
    faults: Mutex<Faults>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

type Body = Full<Bytes>;

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(value.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn set_faults(state: &State, query: &str) -> Result<Faults, String> {
    let mut f = Faults::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "error_rate" => {
                f.error_rate = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("error_rate={v}: a share between 0 and 1"))?;
            }
            "latency" => f.latency = parse_duration(v).map_err(|e| format!("latency: {e}"))?,
            "down" => f.down = v == "true" || v == "1",
            other => {
                return Err(format!(
                    "unknown fault {other:?}: error_rate, latency, down"
                ));
            }
        }
    }
    *state.faults.lock().unwrap_or_else(|e| e.into_inner()) = f;
    Ok(f)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/__demo/faults" && req.method() == http::Method::POST {
        let query = req.uri().query().unwrap_or("").to_owned();
        return Ok(match set_faults(&state, &query) {
            Ok(f) => json_response(
                StatusCode::OK,
                json!({ "error_rate": f.error_rate, "latency_ms": f.latency.as_millis() as u64, "down": f.down }),
            ),
            Err(e) => json_response(StatusCode::BAD_REQUEST, json!({ "error": e })),
        });
    }
    let faults = *state.faults.lock().unwrap_or_else(|e| e.into_inner());
    if faults.down {
        return Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "service": state.name, "error": "down" }),
        ));
    }
    if path == "/healthz" {
        return Ok(json_response(
            StatusCode::OK,
            json!({ "service": state.name }),
        ));
    }
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.error_rate > 0.0 && fastrand::f64() < faults.error_rate {
        return Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "service": state.name, "error": "injected failure" }),
        ));
    }
    let caller = req
        .headers()
        .get("weft-client-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = req.into_body().collect().await;
    let mut downstream = Vec::new();
    let mut ok = true;
    for uri in &state.calls {
        let status = match tokio::time::timeout(
            Duration::from_secs(10),
            state.client.get(uri.clone()),
        )
        .await
        {
            Ok(Ok(rsp)) => {
                let status = rsp.status().as_u16();
                let _ = rsp.into_body().collect().await;
                status
            }
            _ => 0,
        };
        ok &= (200..300).contains(&status);
        downstream.push(json!({ "url": uri.to_string(), "status": status }));
    }
    Ok(json_response(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        },
        json!({ "service": state.name, "caller": caller, "downstream": downstream }),
    ))
}

/// `--drive`: GETs `uri` at `rps`, each request on its own task so a slow
/// answer does not lower the rate; at most 256 in flight.
async fn drive(client: Client<HttpConnector, Empty<Bytes>>, uri: http::Uri, rps: f64) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let (client, uri) = (client.clone(), uri.clone());
        tokio::spawn(async move {
            if let Ok(Ok(rsp)) =
                tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await
            {
                let _ = rsp.into_body().collect().await;
            }
            drop(permit);
        });
    }
}

/// `--fetch`: one GET (status, then body), or with `--count` many and a
/// summary, for scripts and tests inside a pod (the kind end-to-end tier).
async fn fetch(url: &str, method: &http::Method, count: u32, headers: &[String]) -> ExitCode {
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: --fetch {url:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut extra = Vec::new();
    for h in headers {
        let parsed = h.split_once(':').and_then(|(k, v)| {
            Some((
                http::HeaderName::try_from(k.trim()).ok()?,
                http::HeaderValue::try_from(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some(kv) => extra.push(kv),
            None => {
                eprintln!("error: --header {h:?}: expected name:value");
                return ExitCode::from(2);
            }
        }
    }
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let get = |uri: http::Uri| {
        let mut req = http::Request::builder().method(method.clone()).uri(uri);
        for (k, v) in &extra {
            req = req.header(k, v);
        }
        let req = req.body(Empty::new()).expect("a GET request");
        let client = client.clone();
        async move {
            let rsp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .map_err(|_| "no answer within 10 s".to_owned())?
                .map_err(|e| e.to_string())?;
            let status = rsp.status().as_u16();
            let proxy_error = rsp
                .headers()
                .get("weft-proxy-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = rsp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, proxy_error, body))
        }
    };
    if count <= 1 {
        return match get(uri).await {
            Ok((status, _, body)) => {
                println!("{status}\n{}", String::from_utf8_lossy(&body));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {method} {url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut statuses = std::collections::BTreeMap::<String, u32>::new();
    let mut services = std::collections::BTreeMap::<String, u32>::new();
    let mut proxy_errors = std::collections::BTreeMap::<String, u32>::new();
    let mut failed = 0u32;
    for _ in 0..count {
        match get(uri.clone()).await {
            Ok((status, proxy_error, body)) => {
                *statuses.entry(status.to_string()).or_default() += 1;
                if let Some(e) = proxy_error {
                    *proxy_errors.entry(e).or_default() += 1;
                }
                let service = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["service"].as_str().map(str::to_owned));
                if let Some(s) = service {
                    *services.entry(s).or_default() += 1;
                }
            }
            Err(_) => failed += 1,
        }
    }
    println!(
        "{}",
        json!({ "requests": count, "statuses": statuses, "services": services,
                "proxy_errors": proxy_errors, "no_response": failed })
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(url) = &args.fetch {
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(fetch(url, &args.method, args.count, &args.headers)),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let uris = |flag: &str, list: &[String]| -> Result<Vec<http::Uri>, String> {
        list.iter()
            .map(|c| c.parse().map_err(|e| format!("{flag} {c:?}: {e}")))
            .collect()
    };
    let (calls, drives) = match (uris("--call", &args.calls), uris("--drive", &args.drives)) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !(args.rps > 0.0 && args.rps <= 10_000.0) {
        eprintln!("error: --rps must be above 0 and at most 10000");
        return ExitCode::from(2);
    }
    if !(0.0..=1.0).contains(&args.error_rate) {
        eprintln!("error: --error-rate must be between 0 and 1");
        return ExitCode::from(2);
    }
    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match tls_acceptor(cert, key) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let cache_control = args.cache_control.clone();
    let state = Arc::new(State {
        name: args.name.clone(),
        calls,
        faults: Mutex::new(Faults {
            error_rate: args.error_rate,
            latency: args.latency,
            down: args.down,
        }),
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: std::io::Result<()> = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!(
            "weft-demo {}: listening on {}",
            args.name,
            listener.local_addr()?
        );
        for uri in drives {
            tokio::spawn(drive(state.client.clone(), uri, args.rps));
        }
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (state, acceptor, cache_control) =
                (state.clone(), acceptor.clone(), cache_control.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (state, cache_control) = (state.clone(), cache_control.clone());
                    async move {
                        let mut rsp = handle(state, req).await?;
                        if let Some(cc) = cache_control
                            && rsp.status() == StatusCode::OK
                        {
                            rsp.headers_mut().insert(http::header::CACHE_CONTROL, cc);
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                    }
                }
            });
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
