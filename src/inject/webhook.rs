//! The mutating admission webhook: `POST /mutate` (AdmissionReview v1 in
//! and out) and `GET /healthz`, over HTTPS with a serving certificate that
//! can be swapped while serving, drained on shutdown so that every
//! request in flight is answered.
//!
//! The answers: a body that is not an AdmissionReview gets HTTP 400 with a
//! message; anything but a Pod CREATE is allowed unchanged; a pod is
//! allowed with the injector's patch and warnings. A business decision is
//! never an HTTP error, and the handler has no path that panics. Bodies are
//! limited in size and requests in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::{Decision, InjectSettings, NamespaceInfo, inject};
use crate::proxy::server::{Activity, HttpLimits, serve_limited};

/// The largest AdmissionReview read (a pod is far smaller; the API server
/// caps objects at about 1.5 MiB).
pub const MAX_BODY: usize = 2 * 1024 * 1024;
/// How long reading a request and answering it may take (the API server
/// gives the webhook `timeoutSeconds: 5`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

/// Where the webhook learns a namespace's labels and annotations.
pub trait Namespaces: Send + Sync {
    fn get(&self, name: &str) -> Option<NamespaceInfo>;
}

/// Every namespace the webhook is asked about is meshed: what its
/// namespaceSelector guarantees (for `weft local`, tests and benchmarks).
pub struct AllMeshed;

impl Namespaces for AllMeshed {
    fn get(&self, name: &str) -> Option<NamespaceInfo> {
        Some(NamespaceInfo::meshed(name))
    }
}

/// What the handlers share.
pub struct Webhook {
    pub settings: ArcSwap<InjectSettings>,
    pub namespaces: Box<dyn Namespaces>,
}

impl Webhook {
    pub fn new(settings: InjectSettings, namespaces: Box<dyn Namespaces>) -> Self {
        Self {
            settings: ArcSwap::from_pointee(settings),
            namespaces,
        }
    }
}

pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(webhook)
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

async fn mutate(State(webhook): State<Arc<Webhook>>, req: Request) -> Response {
    let read = axum::body::to_bytes(req.into_body(), MAX_BODY);
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return bad_request(format!("reading the body (at most {MAX_BODY} bytes): {e}"));
        }
        Err(_) => return (StatusCode::REQUEST_TIMEOUT, "request body too slow\n").into_response(),
    };
    match review(&webhook, &body) {
        Ok(review) => axum::Json(review).into_response(),
        Err(message) => bad_request(message),
    }
}

/// Answers one AdmissionReview body; `Err` is a body that is not one.
pub fn review(webhook: &Webhook, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| format!("not an AdmissionReview (admission.k8s.io/v1): {e}"))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_owned())?;
    Ok(respond(webhook, &request).into_review())
}

fn respond(webhook: &Webhook, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    if request.kind.kind != "Pod" || request.operation != Operation::Create {
        return allowed;
    }
    let pod: Pod = match request
        .object
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| e.to_string())
        .and_then(|v| serde_json::from_value(v.unwrap_or_default()).map_err(|e| e.to_string()))
    {
        Ok(pod) => pod,
        Err(e) => return allowed.deny(format!("weft injector: the object is not a Pod: {e}")),
    };
    let ns_name = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    // The webhook's namespaceSelector admitted only labelled namespaces: a
    // namespace not yet in the cache is one of them.
    let ns = webhook
        .namespaces
        .get(&ns_name)
        .unwrap_or_else(|| NamespaceInfo {
            labels: [(
                crate::api::INJECT_LABEL.to_owned(),
                crate::api::INJECT_ENABLED.to_owned(),
            )]
            .into(),
            name: ns_name.clone(),
            annotations: Default::default(),
        });
    let settings = webhook.settings.load();
    let injection = inject(&pod, &ns, &settings);
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    match &injection.decision {
        Decision::Injected => tracing::info!(namespace = %ns_name, pod = %name, "injected"),
        Decision::Skipped(why) => {
            tracing::debug!(namespace = %ns_name, pod = %name, reason = %why, "not injected")
        }
    }
    let mut response = if injection.patch.0.is_empty() {
        allowed
    } else {
        match allowed.clone().with_patch(injection.patch) {
            Ok(r) => r,
            Err(e) => allowed.deny(format!("weft injector: encoding the patch: {e}")),
        }
    };
    if !injection.warnings.is_empty() {
        response.warnings = Some(
            injection
                .warnings
                .into_iter()
                .map(|w| format!("weft: {w}"))
                .collect(),
        );
    }
    response
}

/// The serving certificate, swapped in place when it is renewed.
#[derive(Debug, Default)]
pub struct ServingCert(arc_swap::ArcSwapOption<CertifiedKey>);

impl ServingCert {
    /// Installs a certificate chain and key (PEM).
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("serving certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("serving key: {e}"))?;
        let provider = crate::proxy::tls::provider();
        let key = CertifiedKey::from_der(chain, key, &provider)?;
        self.0.store(Some(Arc::new(key)));
        Ok(())
    }

    pub fn ready(&self) -> bool {
        self.0.load().is_some()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

/// Serves `router` over HTTPS with the current serving certificate. A
/// failed accept (out of descriptors, say) is logged and retried after a
/// pause, so only the caller's shutdown ends it.
pub async fn serve_https(
    listener: TcpListener,
    cert: Arc<ServingCert>,
    router: Router,
) -> anyhow::Result<()> {
    serve_https_until(
        listener,
        cert,
        router,
        std::future::pending(),
        DRAIN_TIMEOUT,
        LIMITS,
    )
    .await
}

/// How long a drain waits for the requests in flight: the API server's
/// `timeoutSeconds` for this webhook, past which nobody waits for the
/// answer.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the webhook holds open at once (the API servers keep a few
/// each).
pub const MAX_CONNECTIONS: usize = 256;

/// Connections one source address may hold: an eighth of the cap. The
/// callers are the API servers (an HA control plane has three to five,
/// each keeping a few connections), so one pod that reaches the webhook's
/// port cannot take the slots the API servers need (`failurePolicy: Fail`
/// would then refuse every pod creation in meshed namespaces).
pub const SOURCE_SHARE: usize = MAX_CONNECTIONS / 8;

/// A webhook connection on which no request started for this long is
/// closed: HTTP/1 by the header-read timeout (hyper runs it while waiting
/// for the next request) well before, HTTP/2 with GOAWAY. HTTP/2 is also
/// pinged this often, so a vanished peer is noticed; but a peer that
/// answers pings would hold its connection, one of [`MAX_CONNECTIONS`],
/// for ever without this. A minute keeps the API server's connection
/// through the gaps between pod creations of a busy cluster, and costs a
/// quiet one a TLS handshake now and then (the API server opens a new
/// connection after GOAWAY without failing a request).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Time limits on each webhook connection: a request head (and the TLS
/// handshake before it) within [`REQUEST_TIMEOUT`], and [`IDLE_TIMEOUT`].
pub const LIMITS: HttpLimits = HttpLimits {
    header_read_timeout: REQUEST_TIMEOUT,
    idle_timeout: IDLE_TIMEOUT,
};

/// [`serve_https`] until `shutdown` resolves, then a drain: the listener
/// closes (new connections are refused) and every open connection is told
/// to finish — HTTP/1.1 answers the request in flight without keep-alive,
/// HTTP/2 sends GOAWAY and answers its open streams — so that the API
/// server, which keeps its connections open, gets every answer it is
/// waiting for and sends what comes next to another replica. Connections
/// still open after `limit` are closed; none outlives this call. A
/// connection still in its TLS handshake is closed once it completes,
/// before a request is read. Each connection is held to `limits`
/// ([`LIMITS`] but in tests).
pub async fn serve_https_until(
    listener: TcpListener,
    cert: Arc<ServingCert>,
    router: Router,
    shutdown: impl Future<Output = ()>,
    limit: Duration,
    limits: HttpLimits,
) -> anyhow::Result<()> {
    let config = rustls::ServerConfig::builder_with_provider(crate::proxy::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (drain, draining) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let cap = crate::proxy::server::ConnLimit::with_share(
        MAX_CONNECTIONS,
        SOURCE_SHARE,
        prometheus_client::metrics::counter::Counter::default(),
        prometheus_client::metrics::counter::Counter::default(),
    );
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    crate::proxy::server::back_off_after_accept_error("webhook", &e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        // Forget the finished ones, so the set holds only open connections.
        while connections.try_join_next().is_some() {}
        // At the cap, or past its source's share, a new connection is
        // closed at once: clients that open connections and send nothing
        // hold at most the cap (one source at most its share), each for at
        // most the handshake and header-read timeouts.
        let slot = match cap.enter_from(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::warn!(%peer, reason = ?why, "webhook connection refused");
                continue;
            }
        };
        // In the set from the accept on, so a drain waits for the handshake.
        let (acceptor, router, draining) = (acceptor.clone(), router.clone(), draining.clone());
        connections.spawn(async move {
            serve_connection(acceptor, tcp, peer, router, limits, draining).await;
            drop(slot);
        });
    }
    drop(listener);
    while connections.try_join_next().is_some() {}
    tracing::info!(
        connections = connections.len(),
        ?limit,
        "webhook draining: no new connections, the open ones finish their requests"
    );
    drain.send_replace(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(limit, drained).await.is_err() {
        tracing::warn!(
            ?limit,
            "webhook drain: connections still open past the limit are closed"
        );
    }
    connections.shutdown().await;
    tracing::info!("webhook drained");
    Ok(())
}

async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    draining: tokio::sync::watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "webhook TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "webhook TLS handshake timed out"),
    };
    if *draining.borrow() {
        return tracing::debug!(%peer, "webhook draining: closed after its TLS handshake");
    }
    // The proxy's connection server: header-read and idle timeouts, and a
    // graceful close (GOAWAY for HTTP/2) when the drain starts.
    let activity = Activity::default();
    let active = activity.clone();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let seen = active.enter();
        let rsp = router.clone().oneshot(req.map(Body::new));
        async move {
            let rsp = rsp.await;
            drop(seen);
            rsp
        }
    });
    serve_limited(tls, &limits, &activity, Some(draining), service).await;
    tracing::debug!(%peer, "webhook connection ended");
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::{http1, http2};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::net::TcpStream;
    use tokio::sync::{mpsc, oneshot, watch};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::inject::certs::{self, Plan, WebhookNames};

    const HOST: &str = "weft-injector.weft-system.svc";
    /// Bounds every wait, so that a broken drain fails the test instead of
    /// hanging it.
    const WAIT: Duration = Duration::from_secs(10);

    /// A loaded serving certificate, and its CA (PEM).
    fn certificate() -> (Arc<ServingCert>, String) {
        let Plan::Store(m, _) =
            certs::plan(None, &WebhookNames::default(), SystemTime::now()).expect("plan")
        else {
            unreachable!("nothing was stored")
        };
        let serving = Arc::new(ServingCert::default());
        serving.set(&m.cert, &m.key).expect("cert");
        (serving, m.ca_cert)
    }

    /// `GET /slow` says it started on `started`, then answers "done" once
    /// `release` turns true.
    fn slow_router(started: mpsc::UnboundedSender<()>, release: watch::Receiver<bool>) -> Router {
        let slow = move || {
            let (started, mut release) = (started.clone(), release.clone());
            async move {
                let _ = started.send(());
                let _ = release.wait_for(|go| *go).await;
                "done"
            }
        };
        Router::new()
            .route("/slow", get(slow))
            .route("/healthz", get(|| async { "ok\n" }))
    }

    /// Serves `router` on loopback until `drain` is sent, with a drain that
    /// gives up after `limit`.
    async fn serve(
        router: Router,
        limit: Duration,
    ) -> (
        SocketAddr,
        String,
        oneshot::Sender<()>,
        JoinHandle<anyhow::Result<()>>,
    ) {
        let (serving, ca) = certificate();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (drain, drained) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = drained.await;
        };
        let server = tokio::spawn(serve_https_until(
            listener, serving, router, shutdown, limit, LIMITS,
        ));
        (addr, ca, drain, server)
    }

    /// One client connection, as the API server keeps it open.
    enum Client {
        H1(http1::SendRequest<Empty<Bytes>>),
        H2(http2::SendRequest<Empty<Bytes>>),
    }

    impl Client {
        /// Connects over TLS, HTTP/2 if `h2`; the task ends when the
        /// server closes the connection.
        async fn open(addr: SocketAddr, ca_pem: &str, h2: bool) -> (Self, JoinHandle<()>) {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(c.expect("pem")).expect("root");
            }
            let mut config =
                rustls::ClientConfig::builder_with_provider(crate::proxy::tls::provider())
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
            config.alpn_protocols = vec![alpn.to_vec()];
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from(HOST).expect("name"), tcp)
                .await
                .expect("TLS handshake");
            let io = TokioIo::new(tls);
            if h2 {
                let (tx, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2");
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (Self::H2(tx), task)
            } else {
                let (tx, conn) = http1::handshake(io).await.expect("http/1.1");
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (Self::H1(tx), task)
            }
        }

        /// Status and body of `GET path`.
        async fn get(&mut self, path: &str) -> hyper::Result<(u16, String)> {
            let request = |uri: String| {
                http::Request::get(uri)
                    .header(http::header::HOST, HOST)
                    .body(Empty::new())
                    .expect("request")
            };
            let rsp = match self {
                Self::H1(tx) => tx.send_request(request(path.to_owned())).await?,
                Self::H2(tx) => {
                    tx.send_request(request(format!("https://{HOST}{path}")))
                        .await?
                }
            };
            let status = rsp.status().as_u16();
            let body = rsp.into_body().collect().await?.to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }
    }

    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        match tokio::time::timeout(WAIT, f).await {
            Ok(t) => t,
            Err(_) => panic!("{what}: not within {WAIT:?}"),
        }
    }

    /// Shutdown while the API server's connections are open, two of them
    /// with an admission request in flight: the listener closes, the idle
    /// connection is closed, the requests in flight are answered, and only
    /// then does the server end, its connections closed.
    #[tokio::test]
    async fn a_drain_answers_the_requests_in_flight_and_refuses_new_connections() {
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        // A limit the test never reaches: the requests end when it says.
        let limit = Duration::from_secs(3600);
        let (addr, ca, drain, mut server) = serve(slow_router(started_tx, released), limit).await;

        let (mut idle, idle_conn) = Client::open(addr, &ca, false).await;
        let answer = within("healthz", idle.get("/healthz")).await;
        assert_eq!(answer.expect("healthz"), (200, "ok\n".to_owned()));
        let mut in_flight = Vec::new();
        for h2 in [false, true] {
            let (mut client, conn) = Client::open(addr, &ca, h2).await;
            let answer = tokio::spawn(async move { client.get("/slow").await });
            within("the request reaches the handler", started.recv()).await;
            in_flight.push((h2, answer, conn));
        }

        drain.send(()).expect("the server runs");
        within("new connections are refused", async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        within("the idle connection is closed", idle_conn)
            .await
            .expect("join");
        assert!(
            !server.is_finished(),
            "the server ended with requests in flight"
        );

        release.send_replace(true);
        for (h2, answer, conn) in in_flight {
            let answer = within("the answer", answer).await.expect("join");
            assert_eq!(
                answer.expect("an answer, not a dropped connection"),
                (200, "done".to_owned()),
                "h2: {h2}"
            );
            within("the connection is closed after its answer", conn)
                .await
                .expect("join");
        }
        within("the server ends once drained", &mut server)
            .await
            .expect("join")
            .expect("a clean stop");
    }

    /// A request that does not finish within the drain's limit does not
    /// hold the shutdown: the server ends and its connection is closed.
    #[tokio::test]
    async fn a_drain_closes_what_is_still_open_at_its_limit() {
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (_never, released) = watch::channel(false);
        let limit = Duration::from_millis(100);
        let (addr, ca, drain, server) = serve(slow_router(started_tx, released), limit).await;
        let (mut client, conn) = Client::open(addr, &ca, false).await;
        let answer = tokio::spawn(async move { client.get("/slow").await });
        within("the request reaches the handler", started.recv()).await;

        drain.send(()).expect("the server runs");
        within("the server ends at the limit", server)
            .await
            .expect("join")
            .expect("a clean stop");
        within("the connection is closed", conn)
            .await
            .expect("join");
        let answer = within("the client gives up", answer).await.expect("join");
        assert!(answer.is_err(), "{answer:?}");
    }
}
