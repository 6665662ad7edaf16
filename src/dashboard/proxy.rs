//! `weft dashboard`: the control plane's dashboard on this machine. It
//! listens on loopback and forwards the dashboard's own paths (and nothing
//! else) to the API server's service proxy for the control plane's admin
//! port, with the kubeconfig's credentials, as `kubectl proxy` would for
//! any path. So no port-forward and no extra exposure: the caller needs
//! `get` on `services/proxy` in the control plane's namespace, as for
//! `weft stat`.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use axum::response::{IntoResponse as _, Response};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt as _;

use crate::statcli::STATS_SERVICE;

/// The paths the page and its API use (see [`super::router`]).
const PATHS: &[&str] = &[
    "/",
    "/dashboard.js",
    "/dashboard.css",
    "/api/v1/stats",
    "/api/v1/rollouts",
];
/// The largest answer passed on: the stats of a large mesh are a few MiB.
const MAX_ANSWER: usize = 16 << 20;

#[derive(clap::Args, Debug, Clone)]
pub struct DashboardArgs {
    /// Where to serve the page on this machine: a loopback address, so no
    /// one else can use your credentials through it.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Print the URL only; do not start a browser.
    #[arg(long)]
    pub no_open: bool,
    /// The control plane's namespace.
    #[arg(long, default_value = "weft-system")]
    pub control_plane_namespace: String,
}

/// The service-proxy path of the control plane's admin port, without the
/// trailing path (Kubernetes' "Manually constructing apiserver proxy URLs").
pub fn service_proxy_prefix(namespace: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/services/{STATS_SERVICE}:admin/proxy")
}

pub fn main(args: &DashboardArgs) -> anyhow::Result<ExitCode> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: not a loopback address; whoever reaches it would read the mesh with your \
             credentials. Use 127.0.0.1:PORT (or [::1]:PORT)",
            args.listen
        );
    }
    crate::statcli::with_cluster(|client| async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| {
                format!(
                    "binding {}; another `weft dashboard` may be running (choose another with --listen)",
                    args.listen
                )
            })?;
        let url = format!("http://{}/", listener.local_addr()?);
        println!(
            "the weft dashboard, through the API server's service proxy: {url}\n(Ctrl-C stops it)"
        );
        if !args.no_open {
            open_browser(&url);
        }
        let app = router(client, &args.control_plane_namespace);
        tokio::select! {
            served = axum::serve(listener, app) => served.context("serving the dashboard")?,
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Starts the desktop's browser on `url`, if there is one; the URL is
/// printed either way.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    match std::process::Command::new(opener)
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        // Reaped when it exits (it hands the URL to the browser and ends).
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(e) => {
            eprintln!("(could not start a browser with {opener}: {e}; open the URL yourself)")
        }
    }
}

/// The forwarder: GETs of the dashboard's paths to the service proxy.
pub fn router(client: kube::Client, namespace: &str) -> axum::Router {
    let prefix = service_proxy_prefix(namespace);
    axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let (client, prefix) = (client.clone(), prefix.clone());
        async move { forward(&client, &prefix, method, uri, &headers).await }
    })
}

async fn forward(
    client: &kube::Client,
    prefix: &str,
    method: Method,
    uri: Uri,
    headers: &HeaderMap,
) -> Response {
    if method != Method::GET {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "the dashboard only reads");
    }
    // A page elsewhere could point a name of its own at 127.0.0.1 (DNS
    // rebinding) and read through this proxy: only a loopback Host is
    // served.
    if !super::loopback_host(headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "open the dashboard at http://127.0.0.1:PORT/ or http://localhost:PORT/",
        );
    }
    if !PATHS.contains(&uri.path()) {
        return refuse(StatusCode::NOT_FOUND, "not a path of the weft dashboard");
    }
    let target = match uri.query() {
        Some(q) => format!("{prefix}{}?{q}", uri.path()),
        None => format!("{prefix}{}", uri.path()),
    };
    let req = match http::Request::get(&target).body(kube::client::Body::empty()) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("{target}: {e}")),
    };
    let rsp = match client.send(req).await {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_GATEWAY,
                &format!("the API server did not answer GET {target}: {e}"),
            );
        }
    };
    let (parts, body) = rsp.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refuse(
                StatusCode::BAD_GATEWAY,
                &format!("the answer to GET {target} did not arrive whole: {e}"),
            );
        }
    };
    // Said once per kind of answer, not on every refresh of the page.
    static SAID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let code = parts.status.as_u16();
    let new = SAID.swap(code, std::sync::atomic::Ordering::Relaxed) != code;
    match code {
        _ if !new => {}
        403 => eprintln!(
            "the API server refused GET {target}: your user needs `get` on `services/proxy` in the control plane's namespace"
        ),
        404 | 502 | 503 => eprintln!(
            "GET {target}: {}; is weft installed and its control plane ready? (--control-plane-namespace names another namespace)",
            parts.status
        ),
        _ => {}
    }
    let mut out = Response::new(axum::body::Body::from(body));
    *out.status_mut() = parts.status;
    // The page's own headers pass (its type and its content policy).
    for name in [
        http::header::CONTENT_TYPE,
        http::header::CACHE_CONTROL,
        http::header::CONTENT_SECURITY_POLICY,
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::header::REFERRER_POLICY,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}
