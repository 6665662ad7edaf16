//! `weft control-plane`: the cluster side of weft, one binary per replica:
//! - the sidecar injector on every replica: the admission webhook over
//!   HTTPS, its serving certificate (`inject::certs`), and the caches it
//!   reads (the Mesh defaults, namespace labels, the API server's version);
//! - the operator (`crate::operator`), whose watches run on every replica
//!   and whose writers run only on the one holding the Lease;
//! - the admin server: `/livez`, `/readyz`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use arc_swap::ArcSwap;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::api::{MESH_NAME, Mesh, MeshSpec};
use crate::inject::certs::{self, WebhookNames};
use crate::inject::webhook::{self, Namespaces, ServingCert, Webhook};
use crate::inject::{ClusterCaps, InjectSettings, NamespaceInfo};

/// Command line of `weft control-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// Where the admission webhook listens (HTTPS).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], 9443)))]
    pub webhook_listen: SocketAddr,
    /// The control plane's namespace.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    pub namespace: String,
    /// The Service in front of the webhook (its DNS names go into the
    /// serving certificate).
    #[arg(long, default_value = "weft-injector")]
    pub webhook_service: String,
    /// The Secret holding the webhook's CA and serving certificate.
    #[arg(long, default_value = "weft-injector-tls")]
    pub webhook_secret: String,
    /// The MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "weft-injector")]
    pub webhook_configuration: String,
    /// The webhook's entry in that configuration.
    #[arg(long, default_value = "inject.weft.dev")]
    pub webhook_name: String,
    /// Who makes the webhook's serving certificate: `self` (the control
    /// plane makes, renews and publishes it) or `external` (cert-manager or
    /// another tool writes the Secret and the caBundle; the control plane
    /// only loads and reloads it).
    #[arg(long, value_enum, default_value_t = CertSource::SelfManaged)]
    pub webhook_cert_source: CertSource,
    /// The image injected as weft-init and weft-proxy.
    #[arg(long, env = "WEFT_PROXY_IMAGE", default_value = concat!("ghcr.io/weft-mesh/weft:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// Where `/livez`, `/readyz` and `/metrics` are served (plain HTTP).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], 9090)))]
    pub admin_listen: SocketAddr,
    /// The Lease the replicas compete for; only its holder writes.
    #[arg(long, default_value = "weft-operator")]
    pub lease_name: String,
    /// How long a leader that stopped renewing keeps the lease.
    #[arg(long, default_value = "15s", value_parser = crate::api::parse_std_duration)]
    pub lease_duration: std::time::Duration,
    /// This replica's name in the Lease and in Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Namespaces reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
}

/// Who makes the webhook's serving certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CertSource {
    #[value(name = "self")]
    SelfManaged,
    External,
}

/// Namespaces from a reflector's cache.
struct NamespaceCache(Store<Namespace>);

impl Namespaces for NamespaceCache {
    fn get(&self, name: &str) -> Option<NamespaceInfo> {
        let ns = self.0.get(&ObjectRef::new(name))?;
        Some(NamespaceInfo {
            name: name.to_owned(),
            labels: ns.labels().clone(),
            annotations: ns.annotations().clone(),
        })
    }
}

pub fn main(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weft-control-plane")
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the API server (in-cluster config or KUBECONFIG)")?;
    let version = client
        .apiserver_version()
        .await
        .context("reading the API server version")?;
    let caps = ClusterCaps::from_version(&version.major, &version.minor);
    tracing::info!(
        version = %version.git_version,
        native_sidecars = caps.native_sidecars,
        "API server"
    );
    let settings = InjectSettings {
        image: args.proxy_image.clone(),
        mesh: MeshSpec::default(),
        caps,
    };

    let (store, writer) = reflector::store::<Namespace>();
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects();
    tokio::spawn(async move {
        futures_util::pin_mut!(namespaces);
        while let Some(ev) = namespaces.next().await {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "namespace watch");
            }
        }
    });

    let hook = Arc::new(Webhook {
        settings: ArcSwap::from_pointee(settings),
        namespaces: Box::new(NamespaceCache(store)),
    });
    tokio::spawn(watch_mesh(client.clone(), hook.clone()));

    let serving = Arc::new(ServingCert::default());
    let names = WebhookNames {
        namespace: args.namespace.clone(),
        service: args.webhook_service.clone(),
        secret: args.webhook_secret.clone(),
        configuration: args.webhook_configuration.clone(),
        webhook: args.webhook_name.clone(),
    };
    match args.webhook_cert_source {
        CertSource::SelfManaged => {
            tokio::spawn(certs::run(client.clone(), names, serving.clone()));
        }
        CertSource::External => {
            tokio::spawn(certs::run_external(client.clone(), names, serving.clone()));
        }
    }
    let metrics = Arc::new(crate::operator::metrics::Metrics::default());
    let synced = Arc::new(AtomicBool::new(false));
    let ready = {
        let (synced, serving) = (synced.clone(), serving.clone());
        Arc::new(move || synced.load(Ordering::Relaxed) && serving.ready())
    };
    let admin = crate::operator::serve_admin(args.admin_listen, metrics.clone(), ready);
    let identity = args.pod_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "weft-control-plane".into());
        format!("{host}-{}", std::process::id())
    });
    let operator = crate::operator::run(
        client.clone(),
        crate::operator::Options {
            namespace: args.namespace.clone(),
            lease: args.lease_name.clone(),
            identity,
            lease_duration: args.lease_duration,
            concurrency: args.concurrency,
        },
        metrics,
        synced,
        shutdown_signal(),
    );

    let webhook = async {
        while !serving.ready() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let listener = tokio::net::TcpListener::bind(args.webhook_listen)
            .await
            .with_context(|| format!("binding the webhook listener on {}", args.webhook_listen))?;
        tracing::info!(listen = %args.webhook_listen, "admission webhook serving");
        webhook::serve_https(listener, serving.clone(), webhook::router(hook)).await
    };
    // The operator returns on SIGTERM (after releasing the lease) or with an
    // error when the lease is lost; either ends the process, and a lost
    // lease exits non-zero so the pod restarts as a candidate.
    tokio::select! {
        r = operator => r,
        r = webhook => r,
        r = admin => r,
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// Keeps the injector's Mesh defaults current: the Mesh named `default`,
/// or the built-in defaults while there is none (never created, or
/// deleted).
async fn watch_mesh(client: Client, hook: Arc<Webhook>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={MESH_NAME}"));
    let stream = watcher(Api::<Mesh>::all(client), config).default_backoff();
    futures_util::pin_mut!(stream);
    // Whether the current (re)list has delivered the Mesh.
    let mut listed = false;
    while let Some(ev) = stream.next().await {
        let spec = match ev {
            Ok(watcher::Event::Apply(mesh) | watcher::Event::InitApply(mesh)) => {
                listed = true;
                Some(mesh.spec)
            }
            Ok(watcher::Event::Delete(_)) => Some(MeshSpec::default()),
            Ok(watcher::Event::Init) => {
                listed = false;
                None
            }
            Ok(watcher::Event::InitDone) => (!listed).then(MeshSpec::default),
            Err(e) => {
                tracing::warn!(error = %e, "Mesh watch");
                None
            }
        };
        let Some(spec) = spec else { continue };
        let current = hook.settings.load();
        if current.mesh != spec {
            let mut next = InjectSettings::clone(&current);
            next.mesh = spec;
            hook.settings.store(Arc::new(next));
            tracing::info!("Mesh defaults updated");
        }
    }
}
