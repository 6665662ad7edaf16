//! `weft control-plane`: the cluster side of weft, one binary per replica:
//! - the sidecar injector on every replica: the admission webhook over
//!   HTTPS, its serving certificate (`inject::certs`), and the caches it
//!   reads (the Mesh defaults, namespace labels, the API server's and the
//!   kubelets' versions);
//! - the operator (`crate::operator`), whose watches run on every replica
//!   and whose writers run only on the one holding the Lease;
//! - the admin server: `/livez`, `/readyz`, `/metrics`.
//!
//! On SIGTERM or SIGINT (every replica, leading or not) `/readyz` fails
//! at once, the webhook keeps answering for [`SHUTDOWN_GRACE`] while the
//! operator stops (the leader releases the Lease), then the webhook drains
//! (no new connections; the admission requests in flight are answered,
//! for at most [`webhook::DRAIN_TIMEOUT`]) and the process exits. Losing
//! the Lease is no shutdown: the operator stops writing and stands by to
//! lead again, and the webhook serves on.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::version::Info;
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
    /// Where `/livez`, `/readyz`, `/metrics`, the dashboard and its API
    /// (`/api/v1/stats`, `/api/v1/rollouts`) are served (plain HTTP).
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
    // First, on every replica: without a handler SIGTERM kills the process
    // outright, webhook and all.
    let signal = shutdown_signal()?;
    tokio::pin!(signal);
    let connect = async {
        let client = Client::try_default()
            .await
            .context("connecting to the API server (in-cluster config or KUBECONFIG)")?;
        let version = client
            .apiserver_version()
            .await
            .context("reading the API server version")?;
        anyhow::Ok((client, version))
    };
    let (client, version) = tokio::select! {
        r = connect => r?,
        () = &mut signal => return Ok(()),
    };
    serve(args, client, version, signal).await
}

/// Runs the control plane against `client`, an API server at `version`,
/// until `signal` (then the shutdown [`serve_until_shutdown`] describes).
/// Apart from [`main`] so that a test can drive the whole of it against a
/// fake API server.
pub async fn serve(
    args: ControlPlaneArgs,
    client: Client,
    version: Info,
    signal: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let apiserver = apiserver_version(&version);
    tracing::info!(version = %version.git_version, "API server");
    // Classic until the Nodes are listed: native sidecars need every
    // kubelet at 1.29 too (`watch_kubelets`).
    let settings = InjectSettings {
        image: args.proxy_image.clone(),
        mesh: MeshSpec::default(),
        caps: ClusterCaps {
            native_sidecars: false,
        },
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

    // The webhook is ready once what it reads has listed: the namespaces
    // (their labels decide injection) and the Mesh (its proxy defaults).
    // Not the operator's caches: in a large cluster listing every Pod takes
    // a while, and a webhook that fails closed would refuse every pod of a
    // meshed namespace in the meantime.
    let mesh_listed = Arc::new(AtomicBool::new(false));
    let webhook_synced = Arc::new(AtomicBool::new(false));
    {
        let (store, mesh_listed, webhook_synced) =
            (store.clone(), mesh_listed.clone(), webhook_synced.clone());
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_err() {
                return;
            }
            while !mesh_listed.load(Ordering::Relaxed) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            webhook_synced.store(true, Ordering::Relaxed);
            tracing::info!("webhook caches synced (namespaces, Mesh)");
        });
    }
    let hook = Arc::new(Webhook {
        settings: ArcSwap::from_pointee(settings),
        namespaces: Box::new(NamespaceCache(store)),
    });
    tokio::spawn(watch_mesh(client.clone(), hook.clone(), mesh_listed));
    tokio::spawn(watch_kubelets(client.clone(), apiserver, hook.clone()));

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
    // The operator's own caches gate only the operator, not readiness.
    let synced = Arc::new(AtomicBool::new(false));
    let (stage, _) = tokio::sync::watch::channel(Stage::Up);
    // Ready only once the webhook's port is bound: the Service would
    // otherwise route admissions to a port that refuses them.
    let listening = Arc::new(AtomicBool::new(false));
    let ready = {
        let (webhook_synced, serving, stage, listening) = (
            webhook_synced.clone(),
            serving.clone(),
            stage.subscribe(),
            listening.clone(),
        );
        Arc::new(move || {
            webhook_synced.load(Ordering::Relaxed)
                && serving.ready()
                && listening.load(Ordering::Relaxed)
                && *stage.borrow() == Stage::Up
        })
    };
    let stats = crate::meshstats::SharedStats::default();
    let mtls_policies = crate::operator::MtlsPolicyCache::default();
    let admin = crate::operator::serve_admin(
        args.admin_listen,
        metrics.clone(),
        ready,
        crate::dashboard::Sources::new(
            stats.clone(),
            crate::operator::rollouts_source(mtls_policies.clone()),
        ),
    );
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
            stats,
            mtls_policies,
        },
        metrics,
        synced,
        reached(stage.subscribe(), Stage::Leaving),
    );

    let webhook = async {
        let mut drain = std::pin::pin!(reached(stage.subscribe(), Stage::Draining));
        let loaded = async {
            while !serving.ready() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            () = loaded => {}
            () = &mut drain => return Ok(()),
        }
        let listener = tokio::net::TcpListener::bind(args.webhook_listen)
            .await
            .with_context(|| format!("binding the webhook listener on {}", args.webhook_listen))?;
        listening.store(true, Ordering::Relaxed);
        tracing::info!(listen = %args.webhook_listen, "admission webhook serving");
        let router = webhook::router(hook);
        let limit = webhook::DRAIN_TIMEOUT;
        let limits = webhook::LIMITS;
        webhook::serve_https_until(listener, serving.clone(), router, drain, limit, limits).await
    };
    serve_until_shutdown(signal, SHUTDOWN_GRACE, &stage, operator, webhook, admin).await
}

/// How far a replica's shutdown has gone; each part watches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Serving.
    Up,
    /// SIGTERM came: `/readyz` fails and the operator stops, while the
    /// webhook answers on for [`SHUTDOWN_GRACE`].
    Leaving,
    /// The grace is over: the webhook stops accepting and answers the
    /// requests in flight.
    Draining,
}

/// Resolves once the shutdown has reached `stage` (or whoever drives it is
/// gone).
pub async fn reached(mut stages: tokio::sync::watch::Receiver<Stage>, stage: Stage) {
    let _ = stages.wait_for(|s| *s >= stage).await;
}

/// How long the webhook keeps answering after SIGTERM, `/readyz` failing.
/// A terminating pod leaves the Service's EndpointSlices at once, but
/// kube-proxy on every node and the API server (which calls the webhook
/// through the Service) take a few seconds to stop sending to it; requests
/// that reach a closed listener fail, and with `failurePolicy: Fail` they
/// deny pod creations. Well inside the default 30 s
/// `terminationGracePeriodSeconds`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the control plane's parts until one fails or `signal` fires. The
/// webhook or the admin server ending first (only on an error) ends the
/// process; the operator ends only when told to, losing the lease included.
/// On `signal`, driving the parts through `stage`: [`Stage::Leaving`]
/// (`/readyz` fails, the operator stops and releases the lease if it
/// leads) while the webhook and the admin server keep serving, until both
/// `grace` has passed and the operator has stopped; then
/// [`Stage::Draining`], and this returns when the webhook has drained.
pub async fn serve_until_shutdown(
    signal: impl Future<Output = ()>,
    grace: Duration,
    stage: &tokio::sync::watch::Sender<Stage>,
    operator: impl Future<Output = ()>,
    webhook: impl Future<Output = anyhow::Result<()>>,
    admin: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::pin!(signal, operator, webhook, admin);
    tokio::select! {
        () = &mut operator => anyhow::bail!("the operator stopped unasked"),
        r = &mut webhook => return r,
        r = &mut admin => return r,
        () = &mut signal => {}
    }
    tracing::info!(
        ?grace,
        "shutting down: not ready; the webhook serves on while the endpoint is removed"
    );
    stage.send_replace(Stage::Leaving);
    let left = async { tokio::join!(tokio::time::sleep(grace), &mut operator) };
    tokio::select! {
        _ = left => {}
        r = &mut webhook => return r,
        r = &mut admin => return r,
    }
    stage.send_replace(Stage::Draining);
    let r = tokio::select! {
        r = &mut webhook => r,
        r = &mut admin => r,
    };
    tracing::info!("stopped");
    r
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed
/// when this is called, not when the future is first polled.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Keeps the injector's Mesh defaults current: the Mesh named `default`,
/// or the built-in defaults while there is none (never created, or
/// deleted).
async fn watch_mesh(client: Client, hook: Arc<Webhook>, first_listed: Arc<AtomicBool>) {
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
            Ok(watcher::Event::InitDone) => {
                first_listed.store(true, Ordering::Relaxed);
                (!listed).then(MeshSpec::default)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Mesh watch");
                None
            }
        };
        let Some(mut spec) = spec else { continue };
        // The CA settings do not shape a pod: left out, a rotation
        // request does not change every pod's injection hash.
        spec.ca = None;
        if hook.settings.load().mesh != spec {
            // rcu: the kubelet watch writes the settings too.
            hook.settings.rcu(|current| {
                let mut next = InjectSettings::clone(current);
                next.mesh = spec.clone();
                next
            });
            tracing::info!("Mesh defaults updated");
        }
    }
}

/// A Kubernetes `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
}

/// The first release with native sidecars on by default (init containers
/// with `restartPolicy: Always`; the SidecarContainers feature is beta and
/// on from 1.29). An older kubelet runs such an init container as an
/// ordinary one that never exits, and the pod stays in Init for good.
pub const NATIVE_SIDECARS_SINCE: KubeVersion = KubeVersion {
    major: 1,
    minor: 29,
};

impl KubeVersion {
    /// From a version as Kubernetes reports it: `v1.29.3`, `1.29`,
    /// `v1.30.0-eks-abc`, `v1.28.15+k3s1`. None for anything else.
    pub fn parse(version: &str) -> Option<Self> {
        let v = version.trim();
        let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
        // The version proper ends at a pre-release (`-`) or build (`+`) suffix.
        let core = v.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let major = number(parts.next()?)?;
        let minor = number(parts.next()?)?;
        match (parts.next(), parts.next()) {
            (None, _) => {}
            (Some(patch), None) if number(patch).is_some() => {}
            _ => return None,
        }
        Some(Self { major, minor })
    }
}

impl std::fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Digits only (`str::parse` would take a leading `+`).
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The API server's version: its `major`/`minor` (`"1"`, `"29+"` on some
/// providers), else its `gitVersion`.
pub fn apiserver_version(info: &Info) -> Option<KubeVersion> {
    let trimmed = |s: &str| number(s.trim_end_matches(|c: char| !c.is_ascii_digit()));
    match (trimmed(&info.major), trimmed(&info.minor)) {
        (Some(major), Some(minor)) => Some(KubeVersion { major, minor }),
        _ => KubeVersion::parse(&info.git_version),
    }
}

/// Whether `sidecarMode: Auto` injects native sidecars, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarSupport {
    pub native: bool,
    pub reason: String,
}

/// Native sidecars only when the API server and every Node's kubelet are
/// 1.29 or newer (kubelets may lag the API server by three minors, and the
/// control plane is upgraded first). `kubelets` holds each Node's
/// `status.nodeInfo.kubeletVersion` by name, or why the Nodes are not
/// known (the list failed or is forbidden). Anything unknown — an
/// unparseable version, no Nodes, no list — means classic, the mode every
/// kubelet runs.
pub fn sidecar_support(
    apiserver: Option<KubeVersion>,
    kubelets: Result<&BTreeMap<String, String>, &str>,
) -> SidecarSupport {
    let classic = |reason: String| SidecarSupport {
        native: false,
        reason,
    };
    match apiserver {
        None => return classic("the API server's version is unknown".into()),
        Some(v) if v < NATIVE_SIDECARS_SINCE => {
            return classic(format!(
                "the API server is {v}, before {NATIVE_SIDECARS_SINCE}"
            ));
        }
        Some(_) => {}
    }
    let kubelets = match kubelets {
        Ok(k) => k,
        Err(e) => return classic(format!("the Nodes' kubelet versions are unknown: {e}")),
    };
    if kubelets.is_empty() {
        return classic("no Node is known yet".into());
    }
    let old: Vec<String> = kubelets
        .iter()
        .filter_map(|(node, raw)| match KubeVersion::parse(raw) {
            Some(v) if v >= NATIVE_SIDECARS_SINCE => None,
            Some(_) => Some(format!("{node} ({raw})")),
            None => Some(format!("{node} (unparseable {raw:?})")),
        })
        .collect();
    if old.is_empty() {
        return SidecarSupport {
            native: true,
            reason: format!(
                "the API server and the kubelets of all {} Nodes are {NATIVE_SIDECARS_SINCE}+",
                kubelets.len()
            ),
        };
    }
    const SHOWN: usize = 5;
    let more = match old.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    classic(format!(
        "{} Node(s) with a kubelet before {NATIVE_SIDECARS_SINCE} or of unknown version: {}{more}",
        old.len(),
        old[..old.len().min(SHOWN)].join(", ")
    ))
}

/// The Nodes' kubelet versions as a Node watch reports them.
#[derive(Debug, Default)]
struct Kubelets {
    /// By Node name; None until a list has completed.
    nodes: Option<BTreeMap<String, String>>,
    /// A (re)list in progress.
    listing: Option<BTreeMap<String, String>>,
    /// The watch's last error, until it delivers again: Nodes may have
    /// joined meanwhile.
    failed: Option<String>,
}

fn kubelet_version(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.kubelet_version.clone())
        .unwrap_or_default()
}

impl Kubelets {
    fn event(&mut self, ev: watcher::Event<Node>) {
        match ev {
            watcher::Event::Init => self.listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(node) => {
                let version = self.note(&node);
                self.listing
                    .get_or_insert_default()
                    .insert(node.name_any(), version);
            }
            watcher::Event::InitDone => {
                self.nodes = Some(self.listing.take().unwrap_or_default());
                self.failed = None;
            }
            // After an error the watch resumes where it was (or lists
            // again, above): an event means nothing was missed.
            watcher::Event::Apply(node) => {
                let version = self.note(&node);
                if let Some(nodes) = &mut self.nodes {
                    nodes.insert(node.name_any(), version);
                    self.failed = None;
                }
            }
            watcher::Event::Delete(node) => {
                if let Some(nodes) = &mut self.nodes {
                    nodes.remove(&node.name_any());
                    self.failed = None;
                }
            }
        }
    }

    fn error(&mut self, error: String) {
        self.failed = Some(error);
    }

    /// The Node's kubelet version, warning (once per version) when it does
    /// not parse.
    fn note(&self, node: &Node) -> String {
        let version = kubelet_version(node);
        let name = node.name_any();
        let known = self
            .nodes
            .iter()
            .chain(self.listing.iter())
            .any(|nodes| nodes.get(&name) == Some(&version));
        if !known && KubeVersion::parse(&version).is_none() {
            tracing::warn!(
                node = %name,
                kubelet_version = %version,
                "unparseable kubelet version: taken as older than {NATIVE_SIDECARS_SINCE} (classic sidecars)"
            );
        }
        version
    }

    fn support(&self, apiserver: Option<KubeVersion>) -> SidecarSupport {
        let kubelets = match (&self.failed, &self.nodes) {
            (Some(e), _) => Err(e.as_str()),
            (None, None) => Err("not listed yet"),
            (None, Some(nodes)) => Ok(nodes),
        };
        sidecar_support(apiserver, kubelets)
    }
}

/// Keeps the injector's native-sidecar capability current from a watch on
/// the Nodes (cheaper than listing them all again every minute, and a Node
/// that joins counts at once), logging each change of decision once.
async fn watch_kubelets(client: Client, apiserver: Option<KubeVersion>, hook: Arc<Webhook>) {
    let stream = watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    let mut kubelets = Kubelets::default();
    let mut current: Option<SidecarSupport> = None;
    // A failing list or watch is logged once, not at every retry.
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => kubelets.event(ev),
            Err(e) => kubelets.error(e.to_string()),
        }
        match &kubelets.failed {
            Some(e) if !failing => {
                tracing::warn!(
                    error = %e,
                    "listing or watching Nodes (needs list and watch on nodes): \
                     classic sidecars until it works again"
                );
                failing = true;
            }
            Some(_) => {}
            None if failing => {
                tracing::info!("listing and watching Nodes again");
                failing = false;
                current = None;
            }
            None => {}
        }
        // Mid-list, the decision stands until the list completes.
        if kubelets.listing.is_some() && !failing {
            continue;
        }
        let support = kubelets.support(apiserver);
        // Logged when the mode changes, not at every Node joining or leaving.
        let flipped = current.as_ref().is_none_or(|c| c.native != support.native);
        if !failing && current.as_ref() != Some(&support) && !flipped {
            tracing::debug!(reason = %support.reason, native = support.native, "sidecarMode Auto");
        } else if !failing && flipped {
            if support.native {
                tracing::info!(reason = %support.reason, "sidecarMode Auto: native sidecars");
            } else {
                tracing::warn!(reason = %support.reason, "sidecarMode Auto: classic sidecars");
            }
        }
        let native = support.native;
        current = Some(support);
        if hook.settings.load().caps.native_sidecars != native {
            hook.settings.rcu(|settings| {
                let mut next = InjectSettings::clone(settings);
                next.caps.native_sidecars = native;
                next
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> Option<KubeVersion> {
        Some(KubeVersion { major, minor })
    }

    #[test]
    fn kube_versions_parse_with_provider_suffixes_and_nothing_else() {
        for (s, want) in [
            ("v1.29.3", v(1, 29)),
            ("v1.30.0-eks-abc", v(1, 30)),
            ("v1.28.15+k3s1", v(1, 28)),
            ("v1.29.1-gke.1589017", v(1, 29)),
            ("1.29", v(1, 29)),
            (" V1.31.0 ", v(1, 31)),
            ("v2.0.0", v(2, 0)),
            ("", None),
            ("v", None),
            ("1", None),
            ("v1.x.3", None),
            ("+1.29.0", None),
            ("v1.+29.0", None),
            ("v1..3", None),
            ("v1.29.3.4", None),
            ("v1.29.x", None),
            ("kubelet", None),
        ] {
            assert_eq!(KubeVersion::parse(s), want, "{s:?}");
        }
    }

    #[test]
    fn the_api_servers_version_comes_from_major_minor_else_git_version() {
        let info = |major: &str, minor: &str, git: &str| Info {
            major: major.into(),
            minor: minor.into(),
            git_version: git.into(),
            ..Default::default()
        };
        assert_eq!(
            apiserver_version(&info("1", "29+", "v1.29.1-gke.1")),
            v(1, 29)
        );
        assert_eq!(apiserver_version(&info("", "", "v1.30.2")), v(1, 30));
        assert_eq!(apiserver_version(&info("", "", "")), None);
    }

    fn nodes(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn native_sidecars_only_when_the_api_server_and_every_kubelet_are_1_29() {
        let new = nodes(&[
            ("a", "v1.29.3"),
            ("b", "v1.30.0-eks-abc"),
            ("c", "v1.31.1+k3s1"),
        ]);
        assert!(sidecar_support(v(1, 30), Ok(&new)).native);

        let one_old = nodes(&[("a", "v1.29.3"), ("old-1", "v1.28.15+k3s1")]);
        let s = sidecar_support(v(1, 30), Ok(&one_old));
        assert!(!s.native);
        assert!(s.reason.contains("old-1 (v1.28.15+k3s1)"), "{}", s.reason);
        assert!(!s.reason.contains("a ("), "{}", s.reason);

        let unparseable = nodes(&[("a", "v1.29.3"), ("odd", "banana")]);
        let s = sidecar_support(v(1, 30), Ok(&unparseable));
        assert!(!s.native);
        assert!(
            s.reason.contains("odd (unparseable \"banana\")"),
            "{}",
            s.reason
        );

        let no_status = nodes(&[("fresh", "")]);
        assert!(!sidecar_support(v(1, 30), Ok(&no_status)).native);

        let s = sidecar_support(v(1, 30), Err("nodes is forbidden"));
        assert!(!s.native);
        assert!(s.reason.contains("forbidden"), "{}", s.reason);

        assert!(
            !sidecar_support(v(1, 28), Ok(&new)).native,
            "old API server"
        );
        assert!(
            !sidecar_support(None, Ok(&new)).native,
            "unknown API server"
        );
        assert!(
            !sidecar_support(v(1, 30), Ok(&BTreeMap::new())).native,
            "no Nodes"
        );
    }

    #[test]
    fn many_old_kubelets_are_counted_not_all_named() {
        let many: BTreeMap<String, String> = (0..20)
            .map(|i| (format!("n{i:02}"), "v1.27.0".to_owned()))
            .collect();
        let s = sidecar_support(v(1, 30), Ok(&many));
        assert!(!s.native);
        assert!(s.reason.starts_with("20 Node(s)"), "{}", s.reason);
        assert!(s.reason.ends_with("and 15 more"), "{}", s.reason);
    }

    fn node(name: &str, kubelet: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"nodeInfo": {
                "kubeletVersion": kubelet,
                "architecture": "", "bootID": "", "containerRuntimeVersion": "",
                "kernelVersion": "", "kubeProxyVersion": "", "machineID": "",
                "operatingSystem": "", "osImage": "", "systemUUID": "",
            }},
        }))
        .expect("node")
    }

    #[test]
    fn the_node_watch_decides_from_complete_lists_and_falls_back_on_errors() {
        use watcher::Event;
        let api = v(1, 30);
        let mut k = Kubelets::default();
        assert!(!k.support(api).native, "nothing listed yet");

        k.event(Event::Init);
        k.event(Event::InitApply(node("a", "v1.29.3")));
        k.event(Event::InitDone);
        assert!(k.support(api).native);

        // A 1.28 Node joins, then leaves.
        k.event(Event::Apply(node("b", "v1.28.15")));
        assert!(!k.support(api).native);
        k.event(Event::Delete(node("b", "v1.28.15")));
        assert!(k.support(api).native);

        // An error: classic until the watch delivers again.
        k.error("connection refused".into());
        let s = k.support(api);
        assert!(
            !s.native && s.reason.contains("connection refused"),
            "{s:?}"
        );
        k.event(Event::Apply(node("a", "v1.29.4")));
        assert!(k.support(api).native);

        // A relist replaces what was known: b is gone unless listed again.
        k.event(Event::Apply(node("b", "v1.28.15")));
        k.event(Event::Init);
        k.event(Event::InitApply(node("a", "v1.29.4")));
        k.event(Event::InitDone);
        assert!(k.support(api).native);

        // The list itself forbidden: classic.
        let mut k = Kubelets::default();
        k.error("nodes is forbidden".into());
        assert!(!k.support(api).native);
    }

    /// Plain HTTP/1.1 GET; the status code.
    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        Ok(text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }

    #[tokio::test]
    async fn on_shutdown_readiness_fails_while_the_webhook_answers_then_both_stop() {
        use axum::routing::get as route;
        let grace = Duration::from_millis(600);
        let (stage, _) = tokio::sync::watch::channel(Stage::Up);

        let admin_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let ready = {
            let stage = stage.subscribe();
            Arc::new(move || *stage.borrow() == Stage::Up)
        };
        let admin = crate::operator::serve_admin(
            admin_addr,
            Arc::default(),
            ready,
            crate::dashboard::Sources::new(
                Default::default(),
                crate::operator::rollouts_source(Default::default()),
            ),
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let hook_addr = listener.local_addr().expect("addr");
        let drained = Arc::new(AtomicBool::new(false));
        let webhook = {
            let (drain, drained) = (reached(stage.subscribe(), Stage::Draining), drained.clone());
            async move {
                let app = axum::Router::new().route("/healthz", route(|| async { "ok" }));
                axum::serve(listener, app)
                    .with_graceful_shutdown(drain)
                    .await?;
                drained.store(true, Ordering::Relaxed);
                anyhow::Ok(())
            }
        };

        let stopped = Arc::new(AtomicBool::new(false));
        let operator = {
            let (stop, stopped) = (reached(stage.subscribe(), Stage::Leaving), stopped.clone());
            async move {
                stop.await;
                stopped.store(true, Ordering::Relaxed);
            }
        };
        let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async {
            let _ = signal_rx.await;
        };
        let mut stages = stage.subscribe();
        let run = tokio::spawn(async move {
            serve_until_shutdown(signal, grace, &stage, operator, webhook, admin).await
        });

        // Serving and ready.
        let mut up = false;
        for _ in 0..100 {
            if get(admin_addr, "/readyz").await.ok() == Some(200) {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(up, "the admin server came up");
        assert_eq!(get(hook_addr, "/healthz").await.expect("webhook"), 200);
        assert!(!stopped.load(Ordering::Relaxed));

        let signalled = tokio::time::Instant::now();
        signal_tx.send(()).expect("signal");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Not ready, the operator told to stop, the webhook still answering.
        assert_eq!(get(admin_addr, "/readyz").await.expect("admin"), 503);
        assert!(stopped.load(Ordering::Relaxed), "the operator is stopped");
        assert_eq!(get(hook_addr, "/healthz").await.expect("webhook"), 200);
        assert!(!run.is_finished(), "still in the grace period");
        assert!(
            !drained.load(Ordering::Relaxed),
            "the webhook drains after the grace"
        );

        tokio::time::timeout(
            Duration::from_secs(10),
            stages.wait_for(|s| *s == Stage::Draining),
        )
        .await
        .expect("the drain starts")
        .expect("stage");
        assert!(signalled.elapsed() >= grace, "{:?}", signalled.elapsed());
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("stops once the webhook drained")
            .expect("join")
            .expect("a clean stop");
        assert!(
            drained.load(Ordering::Relaxed),
            "the webhook was drained, not dropped"
        );
        assert!(
            get(hook_addr, "/healthz").await.is_err(),
            "the webhook's listener is closed"
        );
    }
}
