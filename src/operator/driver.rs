//! What runs the reconciles: the compile loop and the namespace controller.
//!
//! The compile loop recompiles the whole mesh when a compiler input
//! changes (debounced, so a `kubectl apply -f dir/` is one compile), writes
//! the status of every policy but MTLSPolicies (those are the namespace
//! reconcile's, with their rollout), and sends the namespaces whose
//! [`plan::fingerprints`] moved to the controller. The controller
//! (kube-runtime) reconciles a namespace when the Namespace changes, when
//! the compile loop names it, when one of its children drifts or goes, and
//! when its own requeue time comes; it never runs two reconciles of one
//! namespace at once.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use super::ca;
use super::desired::{MANAGED_BY, MANAGED_BY_LABEL};
use super::plan;
use super::reconcile::{self, Ctx, Snapshot, write_status};
use super::status::{self, Wanted};
use super::world::Change;
use crate::api::{MESH_NAME, Mesh, MeshSpec};
use crate::compile::{PolicyKind, PolicyVerdict};

/// Changes arriving within this long of the first are compiled together.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A failed status write is retried after this long.
const STATUS_RETRY: Duration = Duration::from_secs(5);

/// Why a whole-mesh compile produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("the policy compiler panicked: {0}")]
    Panicked(String),
    #[error("the compile was cancelled (the runtime is shutting down)")]
    Cancelled,
}

impl CompileError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Panicked(_) => "CompilerPanicked",
            Self::Cancelled => "CompileCancelled",
        }
    }
}

impl From<tokio::task::JoinError> for CompileError {
    fn from(e: tokio::task::JoinError) -> Self {
        if !e.is_panic() {
            return Self::Cancelled;
        }
        let payload = e.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Self::Panicked(message)
    }
}

/// Compiles what the caches hold into a new snapshot and returns the
/// namespaces whose reconcile reads something that changed. A failed
/// compile is logged and counted and leaves the previous snapshot in
/// place (see [`try_recompile`] to retry it).
pub async fn recompile(ctx: &Ctx) -> BTreeSet<String> {
    try_recompile(ctx).await.unwrap_or_default()
}

/// [`recompile`], saying whether the compile failed. A compiler panic is a
/// bug, but one input that trips it must not freeze the operator: the
/// previous snapshot stays in force and the caller retries later.
pub async fn try_recompile(ctx: &Ctx) -> Result<BTreeSet<String>, CompileError> {
    let facts = ctx.world.facts();
    let compiler = ctx.compiler.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let compiled = compiler(&facts);
        (facts, compiled)
    })
    .await;
    let (facts, compiled) = match joined {
        Ok(done) => done,
        Err(e) => {
            let e = CompileError::from(e);
            tracing::error!(error = %e, "compiling the mesh failed; the previous config stays in force");
            ctx.metrics.compile_failed(e.reason());
            return Err(e);
        }
    };
    ctx.metrics.compiled();
    let fingerprints = plan::fingerprints(&facts, &compiled);
    let mesh = facts
        .meshes
        .iter()
        .find(|m| m.name_any() == MESH_NAME)
        .map(|m| m.spec.clone())
        .unwrap_or_else(MeshSpec::default);
    let mtls_phases = facts
        .mtls_policies
        .iter()
        .map(|p| {
            let key = (p.namespace().unwrap_or_default(), p.name_any());
            (key, p.status.as_ref().and_then(|s| s.phase))
        })
        .collect();
    let prev = ctx.snapshot.load_full();
    let affected = plan::affected(&prev.fingerprints, &fingerprints);
    ctx.snapshot.store(Arc::new(Snapshot {
        ready: true,
        compiled,
        fingerprints,
        mesh,
        mtls_phases,
    }));
    Ok(affected)
}

/// Writes the status of every Mesh, TrafficPolicy, ServiceRoute,
/// AccessPolicy and ExternalService whose verdict differs from what it holds. Returns how many
/// writes failed (each is logged).
pub async fn write_policy_statuses(ctx: &Ctx) -> usize {
    let snap = ctx.snapshot.load_full();
    let w = &ctx.world;
    let mut failed = 0;
    for v in &snap.compiled.verdicts {
        let result = match v.kind {
            PolicyKind::Mesh => mesh(ctx, v).await,
            PolicyKind::TrafficPolicy => one(ctx, &w.traffic_policies, v).await,
            PolicyKind::ServiceRoute => one(ctx, &w.service_routes, v).await,
            PolicyKind::AccessPolicy => one(ctx, &w.access_policies, v).await,
            PolicyKind::ExternalService => one(ctx, &w.external_services, v).await,
            // Written by the namespace reconcile, with the rollout.
            PolicyKind::MTLSPolicy => Ok(false),
        };
        if let Err(e) = result {
            tracing::warn!(policy = %v.object(), error = %e, "status not written");
            failed += 1;
        }
    }
    failed
}

async fn mesh(ctx: &Ctx, v: &PolicyVerdict) -> Result<bool, reconcile::Error> {
    let Some(mesh) = find(&ctx.world.meshes, v) else {
        return Ok(false);
    };
    let api = Api::<Mesh>::all(ctx.client.clone());
    let st = mesh_status(ctx, v, &existing_conditions(mesh.as_ref()));
    write_status(ctx, api, mesh.as_ref(), st).await
}

/// Writes the status of the Mesh `default` alone, when what only its
/// conditions show changed (the objects weft left alone).
pub async fn write_mesh_status(ctx: &Ctx) {
    let snap = ctx.snapshot.load_full();
    let found = snap
        .compiled
        .verdicts
        .iter()
        .find(|v| v.kind == PolicyKind::Mesh && v.name == MESH_NAME);
    if let Some(v) = found
        && let Err(e) = mesh(ctx, v).await
    {
        // The next status pass (any input change, or the CA watch)
        // writes it again.
        tracing::warn!(policy = %v.object(), error = %e, "status not written");
    }
}

async fn one<K>(ctx: &Ctx, store: &Store<K>, v: &PolicyVerdict) -> Result<bool, reconcile::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
        + 'static,
{
    let Some(obj) = find(store, v) else {
        return Ok(false);
    };
    let api: Api<K> = Api::namespaced(ctx.client.clone(), v.namespace.as_deref().unwrap_or(""));
    let existing = existing_conditions(obj.as_ref());
    let st = status::policy_status(v, &existing, &now());
    let written = write_status(ctx, api, obj.as_ref(), st.clone()).await?;
    if written {
        reconcile::announce_conditions(ctx, obj.as_ref(), &existing, &st).await;
    }
    Ok(written)
}

fn find<K>(store: &Store<K>, v: &PolicyVerdict) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let r = ObjectRef::new(&v.name);
    store.get(&match &v.namespace {
        Some(ns) => r.within(ns),
        None => r,
    })
}

fn existing_conditions<K: Serialize>(obj: &K) -> Vec<Condition> {
    serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.pointer("/status/conditions").cloned())
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default()
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Condition type on the Mesh: whether every object weft writes in the
/// meshed namespaces is weft's own.
pub const OBJECTS_OWNED: &str = "ObjectsOwned";

/// The `ObjectsOwned` condition: the objects weft left alone, by name.
fn objects_owned(not_ours: &[String]) -> (bool, &'static str, String) {
    if not_ours.is_empty() {
        return (
            true,
            "AllOwned",
            "every ConfigMap, Secret, Role and RoleBinding weft writes in meshed namespaces is its own"
                .into(),
        );
    }
    let mut named = not_ours
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if not_ours.len() > 10 {
        named.push_str(&format!(" and {} more", not_ours.len() - 10));
    }
    (
        false,
        "ObjectNotManagedByWeft",
        format!(
            "left alone because weft did not create them (they lack the label \
             {MANAGED_BY_LABEL}={MANAGED_BY}): {named}; the proxies of those namespaces go \
             without them. Delete or rename them so that weft can create its own"
        ),
    )
}

/// The Mesh's status: its verdict, the CA's condition and whether weft's
/// objects are its own.
fn mesh_status(ctx: &Ctx, v: &PolicyVerdict, existing: &[Condition]) -> serde_json::Value {
    let mut wanted: Vec<Wanted<'_>> = v.conditions.iter().map(Wanted::from).collect();
    let ca_state = ctx.ca.load();
    let (ok, reason, message) = ca::condition(&ca_state);
    let (owned, owned_reason, owned_message) = objects_owned(&ctx.not_ours());
    let warning = ctx
        .snapshot
        .load()
        .mesh
        .ca
        .as_ref()
        .map_or_else(crate::api::CaSettings::default, Clone::clone)
        .expiry_warning
        .as_std();
    let expiry = ca::expiry_condition(&ca_state, warning, std::time::SystemTime::now());
    if v.name == MESH_NAME {
        wanted.push(Wanted {
            type_: ca::CONDITION,
            status: ok,
            reason,
            message: &message,
        });
        if let Some((expiring, reason, message)) = &expiry {
            wanted.push(Wanted {
                type_: ca::EXPIRY_CONDITION,
                status: *expiring,
                reason,
                message,
            });
        }
        wanted.push(Wanted {
            type_: OBJECTS_OWNED,
            status: owned,
            reason: owned_reason,
            message: &owned_message,
        });
    }
    json!({
        "observedGeneration": v.generation,
        "conditions": status::conditions(&wanted, v.generation, existing, &now()),
    })
}

/// Republishes the endpoints of every meshed namespace whose config names
/// one of `services` (`namespace`, `name`), and of the namespaces in
/// `pods` (their client counts), except those in `skip` (a
/// reconcile of theirs is queued and publishes them). One apply per
/// namespace, and only when its document changed. Failures are logged;
/// the namespace's next reconcile (at the latest its periodic resync)
/// publishes again.
pub async fn publish_endpoints(
    ctx: &Ctx,
    services: &BTreeSet<(String, String)>,
    pods: &BTreeSet<String>,
    skip: &BTreeSet<String>,
) {
    let snap = ctx.snapshot.load_full();
    let slices = super::endpoints::index(&ctx.world);
    let affected = snap.compiled.configs.iter().filter(|(ns, config)| {
        !skip.contains(*ns)
            && (pods.contains(*ns)
                || config
                    .outbound
                    .services
                    .iter()
                    .any(|s| services.contains(&(s.namespace.clone(), s.name.clone()))))
    });
    // A few writes in flight at once: a Service called from a hundred
    // namespaces is a hundred applies, and one after another they would
    // hold the next batch (and the slice-to-proxy time) back by seconds.
    futures_util::stream::iter(affected)
        .for_each_concurrent(ENDPOINT_WRITES_IN_FLIGHT, |(ns, config)| {
            let slices = &slices;
            async move {
                let Some(namespace) = ctx.world.namespaces.get(&ObjectRef::new(ns)) else {
                    return;
                };
                if let Err(e) =
                    reconcile::apply_endpoints_from(ctx, &namespace, config, slices).await
                {
                    tracing::warn!(namespace = %ns, error = %e, "endpoints not published; the next reconcile retries");
                }
            }
        })
        .await;
}

/// Endpoint documents written at once by one batch of slice changes.
const ENDPOINT_WRITES_IN_FLIGHT: usize = 16;

/// Turns watch changes into compiles and reconcile triggers until
/// `changes` closes.
pub async fn compile_loop(
    ctx: Arc<Ctx>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    one: mpsc::UnboundedSender<ObjectRef<Namespace>>,
    all: mpsc::UnboundedSender<()>,
) {
    // When to compile and write statuses again after a failure of either.
    let mut retry: Option<tokio::time::Instant> = None;
    let mut compile_failures = 0u32;
    loop {
        let first = match retry {
            Some(at) => tokio::select! {
                c = changes.recv() => c,
                () = tokio::time::sleep_until(at) => Some(Change::Inputs),
            },
            None => changes.recv().await,
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        // Inputs settle before a compile; slice changes come in bursts (a
        // rollout moves many pods): both wait a moment to batch.
        if matches!(
            batch[0],
            Change::Inputs | Change::Endpoints(..) | Change::Pods(..) | Change::AllPods
        ) {
            tokio::time::sleep(DEBOUNCE).await;
        }
        while let Ok(c) = changes.try_recv() {
            batch.push(c);
        }
        let mut names = BTreeSet::new();
        let mut everyone = false;
        let mut inputs = false;
        let mut endpoints = BTreeSet::new();
        let mut pods = BTreeSet::new();
        let mut all_pods = false;
        for c in batch {
            match c {
                Change::Inputs => inputs = true,
                Change::Child(ns) => {
                    names.insert(ns);
                }
                Change::AllChildren => everyone = true,
                Change::Endpoints(ns, service) => {
                    endpoints.insert((ns, service));
                }
                Change::Pods(ns) => {
                    pods.insert(ns);
                }
                Change::AllPods => all_pods = true,
            }
        }
        if inputs {
            match try_recompile(&ctx).await {
                Ok(affected) => {
                    compile_failures = 0;
                    if !affected.is_empty() {
                        tracing::debug!(namespaces = affected.len(), "compile changed namespaces");
                    }
                    names.extend(affected);
                    let failed = write_policy_statuses(&ctx).await;
                    retry = (failed > 0).then(|| tokio::time::Instant::now() + STATUS_RETRY);
                }
                Err(_) => {
                    // Logged and counted already; the same inputs may pass
                    // once something changes, or not: retry with a backoff
                    // either way, and keep serving triggers meanwhile.
                    compile_failures = compile_failures.saturating_add(1);
                    retry =
                        Some(tokio::time::Instant::now() + reconcile::backoff(compile_failures));
                }
            }
        }
        // Namespaces being reconciled anyway publish their endpoints then.
        if !everyone {
            // Pod events are many and few namespaces divide a limit: only
            // those are looked at.
            let snap = ctx.snapshot.load_full();
            if all_pods {
                pods.extend(snap.compiled.configs.keys().cloned());
            }
            pods.retain(|ns| {
                snap.compiled
                    .configs
                    .get(ns)
                    .is_some_and(crate::config::ProxyConfig::shares_limits)
            });
            if !endpoints.is_empty() || !pods.is_empty() {
                publish_endpoints(&ctx, &endpoints, &pods, &names).await;
            }
        }
        if everyone && all.send(()).is_err() {
            return;
        }
        for ns in names {
            if one.send(ObjectRef::new(&ns)).is_err() {
                return;
            }
        }
    }
}

fn receiver<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// Runs the namespace controller until `shutdown` resolves. `one` names
/// namespaces to reconcile, `all` asks for every namespace.
pub async fn run_controller(
    ctx: Arc<Ctx>,
    one: mpsc::UnboundedReceiver<ObjectRef<Namespace>>,
    all: mpsc::UnboundedReceiver<()>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    Controller::new(namespaces, watcher::Config::default())
        .with_config(
            controller::Config::default()
                .concurrency(concurrency)
                .debounce(Duration::from_millis(50)),
        )
        .reconcile_on(receiver(one))
        .reconcile_all_on(receiver(all))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                // Reconcile errors went through the error policy already;
                // what is left are watch and queue errors.
                match e {
                    controller::Error::ReconcilerFailed(..) => {}
                    other => tracing::warn!(error = %other, "namespace controller"),
                }
            }
        })
        .await;
}
