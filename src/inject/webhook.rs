//! The mutating admission webhook: `POST /mutate` (AdmissionReview v1 in
//! and out) and `GET /healthz`, over HTTPS with a serving certificate that
//! can be swapped while serving.
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

/// Serves `router` over HTTPS with the current serving certificate until
/// the listener fails.
pub async fn serve_https(
    listener: TcpListener,
    cert: Arc<ServingCert>,
    router: Router,
) -> anyhow::Result<()> {
    let config = rustls::ServerConfig::builder_with_provider(crate::proxy::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            serve_connection(acceptor, tcp, peer, router).await;
        });
    }
}

async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
) {
    let tls = match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "webhook TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "webhook TLS handshake timed out"),
    };
    let service = hyper_util::service::TowerToHyperService::new(
        router.map_request(|r: http::Request<hyper::body::Incoming>| r.map(Body::new)),
    );
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT);
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "webhook connection ended");
    }
}
