//! The per-namespace reconcile: make a namespace hold what [`super::desired`]
//! says (or nothing, once it is no longer meshed), write its MTLSPolicy
//! status, and move its staged rollout one [`rollout::step`].
//!
//! Reads come from the reflector caches ([`World`]) and the latest compile
//! ([`Snapshot`]); a child is applied (server-side apply, field manager
//! `weft-operator`, forced) only when the cached copy differs from what is
//! wanted, and a status only when [`status::differs`], so a reconcile of a
//! settled namespace writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::desired::{self, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL};
use super::metrics::Metrics;
use super::observe::{self, Counters, PlaintextKey, Scrape, Scraper};
use super::plan::Fingerprints;
use super::rollout::{
    self, ClientEvidence, Current, Decision, Evidence, PlaintextSource, PodEvidence,
};
use super::status;
use super::world::World;
use crate::api::{MTLSPolicy, MeshSpec, RolloutPhase};
use crate::compile::{ClusterFacts, Compiled, PolicyKind, PolicyVerdict};
use crate::config::{CONFIG_MAP_NAME, ENDPOINTS_CONFIG_MAP_NAME, ProxyConfig};
use crate::identity::{IdentityError, bundle_hash};
use crate::inject::PROXY_CONTAINER;

/// The latest compile of the whole mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// False until a compile succeeded in this leader term. Before that
    /// the snapshot is empty, which would read as "no namespace is
    /// meshed": reconciles wait instead of pruning every namespace's
    /// config and identities (a compiler panic on a new leader's first
    /// compile, say).
    pub ready: bool,
    pub compiled: Compiled,
    pub fingerprints: Fingerprints,
    pub mesh: MeshSpec,
    /// The rollout phase each MTLSPolicy's status held in the facts this
    /// compile read, by (namespace, name): the compiler derives what
    /// clients expect from it, so a gate on "clients run the compiled
    /// config" holds only for a compile that read the phase it is about.
    pub mtls_phases: BTreeMap<(String, String), Option<RolloutPhase>>,
}

/// The mesh CA as the operator last found it.
#[derive(Clone, Default)]
pub enum CaState {
    /// Not looked at yet.
    #[default]
    Unknown,
    Ready(Arc<super::ca::TrustPlan>),
    /// `weft-ca` is gone (or unreadable) while these namespaces hold
    /// certificates from it: nothing is minted until a human restores it.
    Missing {
        reason: &'static str,
        message: String,
    },
}

/// The whole-mesh compile the operator runs ([`crate::compile::compile`];
/// tests put in one that fails).
pub type Compiler = Arc<dyn Fn(&ClusterFacts) -> Compiled + Send + Sync>;

/// Everything a reconcile needs.
pub struct Ctx {
    pub client: Client,
    pub world: World,
    pub snapshot: ArcSwap<Snapshot>,
    pub ca: ArcSwap<CaState>,
    pub scraper: Arc<dyn Scraper>,
    pub metrics: Arc<Metrics>,
    /// The control plane's namespace (where `weft-ca` lives).
    pub control_namespace: String,
    pub(crate) compiler: Compiler,
    recorder: Recorder,
    counters: Mutex<Counters>,
    /// Consecutive failures per namespace, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The ServiceAccounts per namespace last reported as getting no
    /// identity ([`desired::secret_names`]), so the Event is sent
    /// once per change, not on every reconcile.
    refused: Mutex<HashMap<String, Vec<String>>>,
    /// Per namespace, the objects weft left alone because they are not
    /// its own ([`Error::NotOurs`]), as `Kind namespace/name`: the Mesh's
    /// `ObjectsOwned` condition names them.
    not_ours: Mutex<BTreeMap<String, Vec<String>>>,
    /// Per namespace, the `weft.dev/calls` value last reported as not
    /// parsing, so its Event is sent once per value, not on every
    /// reconcile (each endpoints write triggers one).
    bad_scopes: Mutex<HashMap<(String, &'static str), String>>,
    /// What was last said about each ExternalService (namespace, name)
    /// whose client certificate cannot be used: said again only when it
    /// changes.
    bad_credentials: Mutex<HashMap<(String, String, String), String>>,
    /// Per namespace, the `weft-endpoints` generation this replica last
    /// wrote and the one the cache held when it did: while the cache
    /// still shows the older one (the watch lags the write), the same
    /// document is not written again.
    endpoints_written: Mutex<HashMap<String, (String, String)>>,
    /// Writes started outside a reconcile (the failure Event of
    /// `error_policy`, which cannot wait), stopped with the other writers
    /// when the lease is lost.
    pub(crate) detached: Detached,
    /// The mesh's golden signals this replica collects: the evidence of
    /// the ServiceRoutes' progressive canaries (none without them).
    pub stats: Option<crate::meshstats::SharedStats>,
}

/// Tasks that write but belong to no caller that could wait for them: each
/// runs on its own, and [`Detached::close`] stops the ones still running
/// and refuses new ones, so none writes after this replica lost its lease.
/// Cheap to clone; clones share the tasks.
#[derive(Clone, Default)]
pub(crate) struct Detached(Arc<Mutex<DetachedTasks>>);

#[derive(Default)]
struct DetachedTasks {
    running: tokio::task::JoinSet<()>,
    closed: bool,
}

impl Detached {
    /// Runs `task` on its own, unless closed (then it is dropped unrun).
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.closed {
            return;
        }
        // Forget the finished ones, so the set holds only running tasks.
        while tasks.running.try_join_next().is_some() {}
        tasks.running.spawn(task);
    }

    /// Aborts the running tasks and refuses any later one.
    pub(crate) fn close(&self) {
        let mut tasks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tasks.closed = true;
        tasks.running.abort_all();
    }
}

impl Ctx {
    /// Records which objects of `ns` weft left alone; true when that
    /// changed (the Mesh's status then needs writing).
    fn note_not_ours(&self, ns: &str, objects: Vec<String>) -> bool {
        let mut known = self.not_ours.lock().expect("not ours");
        if objects.is_empty() {
            known.remove(ns).is_some()
        } else if known.get(ns) == Some(&objects) {
            false
        } else {
            known.insert(ns.to_owned(), objects);
            true
        }
    }

    /// Every object left alone, across namespaces, in order.
    pub fn not_ours(&self) -> Vec<String> {
        self.not_ours
            .lock()
            .expect("not ours")
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn new(
        client: Client,
        world: World,
        scraper: Arc<dyn Scraper>,
        metrics: Arc<Metrics>,
        control_namespace: String,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            world,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            ca: ArcSwap::from_pointee(CaState::Unknown),
            scraper,
            metrics,
            control_namespace,
            compiler: Arc::new(crate::compile::compile),
            counters: Mutex::default(),
            failures: Mutex::default(),
            refused: Mutex::default(),
            not_ours: Mutex::default(),
            bad_scopes: Mutex::default(),
            bad_credentials: Mutex::default(),
            endpoints_written: Mutex::default(),
            detached: Detached::default(),
            stats: None,
        }
    }

    /// The same, with the mesh stats the canaries read.
    pub fn with_stats(mut self, stats: crate::meshstats::SharedStats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The same, compiling with `compiler` instead of the policy compiler.
    pub fn with_compiler(mut self, compiler: Compiler) -> Self {
        self.compiler = compiler;
        self
    }

    /// Publishes an Event about `obj`; a failure to publish is logged, never
    /// fails the reconcile.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.event_related(obj, None, warning, reason, action, note)
            .await;
    }

    /// [`Ctx::event`] naming a second object it is about.
    pub async fn event_related<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: action.to_owned(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "{kind} {namespace}/{name} exists but weft did not create it (it lacks the label \
         {MANAGED_BY_LABEL}={MANAGED_BY}): weft leaves it alone, and the namespace's proxies go \
         without it; delete or rename it so that weft can create its own"
    )]
    NotOurs {
        kind: String,
        namespace: String,
        name: String,
    },
    #[error("issuing workload certificates for namespace {namespace}: {source}")]
    Identity {
        namespace: String,
        #[source]
        source: IdentityError,
    },
}

impl Error {
    /// `Kind namespace/name` of an object weft left alone.
    fn not_ours(&self) -> Option<String> {
        match self {
            Self::NotOurs {
                kind,
                namespace,
                name,
            } => Some(format!("{kind} {namespace}/{name}")),
            _ => None,
        }
    }

    /// A short, bounded label for metrics and Event reasons.
    /// Whether the API server refused the object itself (invalid, too
    /// large, or an admission policy said no), not a failure to reach it.
    pub fn refused_content(&self) -> bool {
        matches!(
            self,
            Error::Api {
                source: kube::Error::Api(resp),
                ..
            } if matches!(resp.code, 400 | 403 | 413 | 422)
        )
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Api { source, .. } => match source {
                kube::Error::Api(s) if s.code == 403 => "Forbidden",
                kube::Error::Api(s) if s.code == 409 => "Conflict",
                kube::Error::Api(s) if s.code == 422 => "Invalid",
                kube::Error::Api(s) if s.code >= 500 => "ApiServerError",
                kube::Error::Api(_) => "ApiRejected",
                _ => "ApiUnreachable",
            },
            Self::NotOurs { .. } => "ObjectNotManagedByWeft",
            Self::Identity { .. } => "CertificateIssueFailed",
        }
    }
}

/// How long a settled namespace waits before it is looked at again anyway.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a namespace is looked at again when nothing is compiled yet
/// (the compile loop retries with its own backoff; a success re-queues
/// every namespace it changes anyway).
const NOT_COMPILED_RETRY: Duration = Duration::from_secs(5);

/// Reconciles one namespace.
pub async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&ns, &ctx).await;
    ctx.metrics.reconciled(
        started.elapsed().as_secs_f64(),
        result.as_ref().err().map(Error::reason),
    );
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failures")
            .remove(&ns.name_any());
    }
    result
}

/// After a failure: retry with a backoff that doubles per consecutive
/// failure of the namespace, from 1 s up to 5 min, with jitter so a
/// flapping API server is not hit by every namespace at once. An Event on
/// the Namespace says what failed.
pub fn error_policy(ns: Arc<Namespace>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let name = ns.name_any();
    let n = {
        let mut failures = ctx.failures.lock().expect("failures");
        let n = failures.entry(name.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(namespace = %name, error = %error, attempt = n, retry_in = ?delay, "reconcile failed");
    let (reason, note) = (error.reason(), error.to_string());
    let detached = ctx.detached.clone();
    detached.spawn(async move {
        ctx.event(
            ns.as_ref(),
            true,
            reason,
            "Reconcile",
            format!("{note}; retrying in {delay:?}"),
        )
        .await;
    });
    Action::requeue(delay)
}

/// The delay before retry `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    let base = Duration::from_secs(1) * 2u32.saturating_pow(n.saturating_sub(1).min(9));
    let capped = base.min(Duration::from_secs(300));
    // Up to +20 % jitter.
    capped + capped.mul_f64(fastrand::f64() * 0.2)
}

/// The clock, to whole seconds: what the API server stores, so a time
/// written and read back compares equal.
pub(crate) fn now_secs() -> SystemTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn time(t: SystemTime) -> Time {
    Time(k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default())
}

/// Logs and raises a Warning Event (`reason`) when the namespace's
/// `annotation` cannot be read (`read` says why), once per value.
async fn warn_once(
    ctx: &Ctx,
    ns: &Namespace,
    annotation: &'static str,
    reason: &'static str,
    read: Result<(), String>,
) {
    let name = ns.name_any();
    let news = {
        let mut bad = ctx.bad_scopes.lock().expect("bad scopes");
        let key = (name.clone(), annotation);
        match &read {
            Ok(()) => {
                bad.remove(&key);
                false
            }
            Err(_) => {
                let value = ns
                    .annotations()
                    .get(annotation)
                    .cloned()
                    .unwrap_or_default();
                bad.insert(key, value.clone()).as_ref() != Some(&value)
            }
        }
    };
    if let (Err(why), true) = (read, news) {
        tracing::warn!(namespace = %name, "{why}");
        ctx.event(ns, true, reason, "Compile", why).await;
    }
}

async fn reconcile_inner(ns: &Namespace, ctx: &Ctx) -> Result<Action, Error> {
    let name = ns.name_any();
    if ns.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children with the Namespace;
        // what this replica holds about it goes now (no reconcile runs
        // once it is gone), its gauges included: a certificate expiry
        // left behind would raise an alert a day later.
        ctx.refused.lock().expect("refused").remove(&name);
        ctx.bad_scopes
            .lock()
            .expect("bad scopes")
            .retain(|(ns, _), _| *ns != name);
        ctx.bad_credentials
            .lock()
            .expect("bad credentials")
            .retain(|(ns, ..), _| *ns != name);
        ctx.endpoints_written
            .lock()
            .expect("endpoints written")
            .remove(&name);
        ctx.counters.lock().expect("counters").forget(&name);
        ctx.metrics.forget_namespace(&name);
        if ctx.note_not_ours(&name, Vec::new()) {
            super::driver::write_mesh_status(ctx).await;
        }
        return Ok(Action::await_change());
    }
    let now = now_secs();
    let snap = ctx.snapshot.load_full();
    if !snap.ready {
        tracing::debug!(namespace = %name, "nothing compiled yet in this term; reconciling later");
        return Ok(Action::requeue(NOT_COMPILED_RETRY));
    }
    let Some(config) = snap.compiled.configs.get(&name) else {
        if ctx.note_not_ours(&name, Vec::new()) {
            super::driver::write_mesh_status(ctx).await;
        }
        prune(ns, ctx).await?;
        write_mtls_status(ns, ctx, &snap, None, now).await?;
        ctx.metrics.expiry(&name, None);
        return Ok(Action::await_change());
    };

    // A `weft.dev/calls` that does not parse lists every Service (the
    // compiler keeps the whole mesh rather than cut the namespace off);
    // say so where its author looks.
    let scope = crate::compile::Scope::of(ns).map(|_| ());
    warn_once(
        ctx,
        ns,
        crate::compile::CALLS_ANNOTATION,
        "InvalidScope",
        scope,
    )
    .await;
    // Likewise a `weft.dev/egress` that does not read keeps the Mesh's.
    let egress = crate::compile::egress_of(ns, snap.mesh.egress).map(|_| ());
    warn_once(
        ctx,
        ns,
        crate::compile::EGRESS_ANNOTATION,
        "InvalidEgress",
        egress,
    )
    .await;

    // Each child is written whatever became of the ones before it: a
    // RoleBinding an admission policy refuses, or a ConfigMap over a quota,
    // must not stop certificate renewal or the rollout's rollback check.
    // The first error is returned at the end (backoff, and an Event).
    let mut failed: Vec<Error> = Vec::new();
    let w = &ctx.world;
    // The endpoints document first: it carries the client counts a
    // namespace-wide rate limit is divided by, and a config that brings
    // such a limit to proxies before the count would have each take it
    // whole.
    let applied = [
        apply_endpoints(ctx, ns, config).await,
        apply(
            ctx,
            &desired::config_map(ns, config),
            World::child(&w.config_maps, &name, CONFIG_MAP_NAME).as_deref(),
        )
        .await,
        apply(
            ctx,
            &desired::role(ns),
            World::child(&w.roles, &name, desired::CONFIG_READER).as_deref(),
        )
        .await,
        apply(
            ctx,
            &desired::role_binding(ns),
            World::child(&w.role_bindings, &name, desired::CONFIG_READER).as_deref(),
        )
        .await,
    ];
    failed.extend(applied.into_iter().filter_map(Result::err));

    let mut requeue = RESYNC;
    let ca = ctx.ca.load_full();
    let bundle = match ca.as_ref() {
        CaState::Ready(plan) => {
            let mut accounts: Vec<String> = w
                .service_accounts
                .state()
                .iter()
                .filter(|sa| sa.namespace().as_deref() == Some(&name))
                .map(|sa| sa.name_any())
                .collect();
            accounts.sort();
            let (named, refused) = desired::secret_names(&accounts);
            report_refused(ns, ctx, &refused).await;
            let egress = egress_credentials(ctx, &name, config).await;
            let mut issued = Vec::new();
            // What the pods hold: the new certificate once written, the
            // stored one while its renewal fails (so the expiry alert
            // fires when renewal is broken, not the opposite).
            let mut earliest_expiry: Option<SystemTime> = None;
            let mut incomplete = false;
            let mut hold = |at: SystemTime| {
                earliest_expiry = Some(earliest_expiry.map_or(at, |e: SystemTime| e.min(at)));
            };
            for (sa, secret_name) in &named {
                let stored = World::child(&w.secrets, &name, secret_name);
                let existing = stored
                    .as_deref()
                    .map(desired::secret_text)
                    .unwrap_or_default();
                let stored_expiry = existing
                    .get(crate::identity::TLS_CERT_KEY)
                    .and_then(|c| crate::identity::inspect_pem(c).ok())
                    .map(|info| info.not_after);
                let id = desired::identity(
                    &name,
                    &snap.mesh.trust_domain,
                    sa,
                    &existing,
                    plan,
                    snap.mesh.certificates.workload_ttl.as_std(),
                    SystemTime::now(),
                );
                let mut id = match id {
                    Ok(id) => id,
                    Err(source) => {
                        failed.push(Error::Identity {
                            namespace: name.clone(),
                            source,
                        });
                        incomplete = true;
                        stored_expiry.map(&mut hold);
                        continue;
                    }
                };
                if id.issued {
                    issued.push(sa.as_str());
                }
                let extra = egress.for_stored(&existing);
                // What the Secret holds of them already: kept if the new
                // ones are refused.
                let plain = (!extra.is_empty()).then(|| {
                    let mut plain = id.clone();
                    plain.data.extend(
                        existing
                            .iter()
                            .filter(|(k, _)| k.starts_with(crate::config::EGRESS_KEY_PREFIX))
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                    plain
                });
                id.data.extend(extra);
                let mut written =
                    apply(ctx, &desired::identity_secret(ns, &id), stored.as_deref()).await;
                // The mesh identity never waits on a vendor's certificate:
                // refused for its content with the new copies (a size
                // limit, an admission policy), the Secret is written with
                // only those it held. An API server in trouble (a
                // timeout, a 5xx) is retried as it is, by the backoff.
                if let (Err(e), Some(plain)) = (&written, plain)
                    && e.refused_content()
                    && plain.data != id.data
                {
                    tracing::warn!(namespace = %name, service_account = %sa, error = %e, "identity Secret refused with the client certificates; writing it without them");
                    if apply(
                        ctx,
                        &desired::identity_secret(ns, &plain),
                        stored.as_deref(),
                    )
                    .await
                    .is_ok()
                    {
                        if let Err(e) = std::mem::replace(&mut written, Ok(true)) {
                            failed.push(e);
                        }
                        incomplete = true;
                    }
                }
                match written {
                    Ok(_) => hold(id.not_after),
                    Err(e) => {
                        failed.push(e);
                        incomplete = true;
                        stored_expiry.map(&mut hold);
                    }
                }
                let due = id
                    .renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                requeue = requeue.min(due.max(Duration::from_secs(1)));
            }
            if !issued.is_empty() {
                tracing::info!(namespace = %name, accounts = ?issued, "issued workload certificates");
            }
            // A failure that left no certificate known keeps the gauge as
            // it was rather than removing it.
            if earliest_expiry.is_some() || !incomplete {
                ctx.metrics.expiry(&name, earliest_expiry);
            }
            if let Err(e) = prune_identities(ctx, &name, &named).await {
                failed.push(e);
            }
            bundle_hash(&plan.bundle)
        }
        // Without a CA nothing is minted; the Secrets the namespace holds
        // stay as they are, and the Mesh status says why. An mTLS rollout
        // goes on judging against the bundle they all carry (what the
        // proxies hold and will keep holding), rather than read every
        // proxy as distrusting a CA that is merely not readable now.
        CaState::Missing { .. } | CaState::Unknown => held_bundle(ctx, &name),
    };

    match write_mtls_status(ns, ctx, &snap, Some(&bundle), now).await {
        Ok(Some(after)) => requeue = requeue.min(after),
        Ok(None) => {}
        Err(e) => failed.push(e),
    }
    let foreign: Vec<String> = failed.iter().filter_map(Error::not_ours).collect();
    if ctx.note_not_ours(&name, foreign) {
        super::driver::write_mesh_status(ctx).await;
    }
    let mut failed = failed.into_iter();
    match failed.next() {
        None => Ok(Action::requeue(requeue)),
        Some(first) => {
            for also in failed {
                tracing::warn!(namespace = %name, error = %also, "reconcile: another write failed");
            }
            Err(first)
        }
    }
}

/// The trust bundle hash every identity Secret of namespace `ns` carries
/// (their [`desired::BUNDLE_HASH_ANNOTATION`]), or empty when they do not
/// agree (or there are none): then no proxy passes a rollout's "trusts
/// the current CA" gate.
fn held_bundle(ctx: &Ctx, ns: &str) -> String {
    let mut hashes = ctx
        .world
        .secrets
        .state()
        .into_iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(ns)
                && s.name_any()
                    .starts_with(crate::identity::IDENTITY_SECRET_PREFIX)
                && s.labels()
                    .get(desired::MANAGED_BY_LABEL)
                    .map(String::as_str)
                    == Some(desired::MANAGED_BY)
        })
        .map(|s| {
            s.annotations()
                .get(desired::BUNDLE_HASH_ANNOTATION)
                .cloned()
                .unwrap_or_default()
        });
    let Some(first) = hashes.next() else {
        return String::new();
    };
    if hashes.all(|h| h == first) {
        first
    } else {
        String::new()
    }
}

/// The client certificates `config`'s ExternalServices present, read
/// from their Secrets, for the namespace's identity Secrets (which only
/// the proxies mount).
struct EgressCredentials {
    /// Identity Secret data: `egress.<secret>.crt` and `.key`.
    read: BTreeMap<String, String>,
    /// Secrets the API would not give now (not a NotFound): their keys
    /// stay as each identity Secret holds them, so an API server in
    /// trouble does not take a certificate from the proxies.
    unreadable: Vec<String>,
}

impl EgressCredentials {
    /// What one identity Secret (holding `stored`) gets.
    fn for_stored(&self, stored: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut out = self.read.clone();
        for secret in &self.unreadable {
            let (crt, key) = crate::config::egress_credential_keys(secret);
            for k in [crt, key] {
                if let Some(v) = stored.get(&k) {
                    out.insert(k, v.clone());
                }
            }
        }
        out
    }
}

/// Reads the Secrets `config`'s ExternalServices name as client
/// certificates. One that is missing or unusable is left out (the proxy
/// then refuses to call that vendor, counted) and a Warning Event on each
/// ExternalService that names it says why and what to do.
async fn egress_credentials(ctx: &Ctx, ns: &str, config: &ProxyConfig) -> EgressCredentials {
    let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for es in &config.outbound.external_services {
        for p in &es.ports {
            if let Some(secret) = p.tls.as_ref().and_then(|t| t.client_certificate.as_deref()) {
                wanted.entry(secret).or_default().insert(&es.name);
            }
        }
    }
    let mut out = EgressCredentials {
        read: BTreeMap::new(),
        unreadable: Vec::new(),
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut bad: Vec<(&str, &str, &'static str, String)> = Vec::new();
    for (i, (secret, users)) in wanted.iter().enumerate() {
        let refused = if ns == ctx.control_namespace {
            Some(format!(
                "namespace {ns} is weft's control plane; its Secrets are never client certificates"
            ))
        } else if i >= desired::MAX_CLIENT_CERTIFICATES {
            Some(format!(
                "the namespace's ExternalServices name more than {} client certificate Secrets (each identity Secret carries a copy of every one); share one Secret among vendors that accept the same certificate",
                desired::MAX_CLIENT_CERTIFICATES
            ))
        } else {
            None
        };
        let got = match refused {
            Some(why) => Err(why),
            None => Ok(api.get_opt(secret).await),
        };
        let (reason, why) = match got {
            Err(why) => (desired::CLIENT_CERTIFICATE_INVALID, why),
            Ok(got) => match got {
                Ok(Some(s)) => match desired::client_certificate(&s, SystemTime::now()) {
                    Ok((crt, key)) => {
                        let (crt_key, key_key) = crate::config::egress_credential_keys(secret);
                        out.read.insert(crt_key, crt);
                        out.read.insert(key_key, key);
                        continue;
                    }
                    Err(why) => (desired::CLIENT_CERTIFICATE_INVALID, why),
                },
                Ok(None) => (
                    desired::CLIENT_CERTIFICATE_NOT_FOUND,
                    format!(
                        "Secret {secret} is not in namespace {ns}; create it: kubectl -n {ns} create secret tls {secret} --cert=client.crt --key=client.key"
                    ),
                ),
                Err(e) => {
                    tracing::warn!(namespace = %ns, %secret, error = %e, "could not read a client certificate Secret; the proxies keep the copy they have");
                    out.unreadable.push((*secret).to_owned());
                    continue;
                }
            },
        };
        for es in users {
            bad.push((es, secret, reason, why.clone()));
        }
    }
    // Said once per change: a reconcile runs on every endpoint change.
    let news: Vec<_> = {
        let mut said = ctx.bad_credentials.lock().expect("bad credentials");
        said.retain(|(n, es, secret), _| {
            n != ns || bad.iter().any(|(b, s, ..)| b == es && s == secret)
        });
        bad.into_iter()
            .filter(|(es, secret, _, why)| {
                let key = (ns.to_owned(), (*es).to_owned(), (*secret).to_owned());
                said.insert(key, why.clone()).as_ref() != Some(why)
            })
            .collect()
    };
    for (es, secret, reason, why) in news {
        let Some(obj) = ctx
            .world
            .external_services
            .get(&ObjectRef::new(es).within(ns))
        else {
            continue;
        };
        let note = format!(
            "client certificate unavailable: {why}; until then this namespace's proxies send {es} nothing on the ports that present it"
        );
        tracing::warn!(namespace = %ns, external_service = %es, "{note}");
        // The Secret as the related object: one Event series per Secret
        // (the recorder keys a series by regarding, related and reason).
        let related = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            namespace: Some(ns.to_owned()),
            name: Some(secret.to_owned()),
            ..Default::default()
        };
        ctx.event_related(obj.as_ref(), Some(related), true, reason, "Reconcile", note)
            .await;
    }
    out
}

/// Deletes the identity Secrets of `ns` no ServiceAccount of `named` has:
/// a deleted account's (once the API server confirms the account is gone:
/// a cache behind it, as a new leader's can be, must not cost a live
/// account its identity), and the one Secret that held every account's
/// keys before there was one per account, once no pod mounts it (pods
/// that do are named: a restart re-injects them).
async fn prune_identities(ctx: &Ctx, ns: &str, named: &[(String, String)]) -> Result<(), Error> {
    let w = &ctx.world;
    let wanted: HashSet<&str> = named.iter().map(|(_, n)| n.as_str()).collect();
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(ctx.client.clone(), ns);
    for stale in managed_identity_secrets(w, ns) {
        if wanted.contains(stale.as_str()) {
            continue;
        }
        if stale == crate::identity::LEGACY_IDENTITY_SECRET {
            let mounting = pods_mounting(w, ns, &stale);
            if !mounting.is_empty() {
                tracing::warn!(
                    namespace = %ns,
                    pods = ?mounting,
                    "Secret {stale} holds every ServiceAccount's key and is kept while these pods \
                     mount it; restart them (kubectl rollout restart) so that it can be deleted"
                );
                continue;
            }
        } else if let Some(sa) = World::child(&w.secrets, ns, &stale).and_then(|s| {
            s.annotations()
                .get(desired::SERVICE_ACCOUNT_ANNOTATION)
                .cloned()
        }) {
            match accounts.get_opt(&sa).await {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                Err(source) => {
                    return Err(Error::Api {
                        action: "reading",
                        kind: "ServiceAccount".into(),
                        namespace: ns.to_owned(),
                        name: sa,
                        source,
                    });
                }
            }
        }
        delete_managed(ctx, &w.secrets, ns, &stale).await?;
    }
    Ok(())
}

/// Pods of `ns` (not finished) with a volume of Secret `secret`.
fn pods_mounting(w: &World, ns: &str, secret: &str) -> Vec<String> {
    w.pods
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(|p| {
            p.spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
        })
        .map(|p| p.name_any())
        .collect()
}

/// The names of the identity Secrets the cache holds for namespace `ns`
/// (it holds only objects with weft's managed-by label).
fn managed_identity_secrets(w: &World, ns: &str) -> Vec<String> {
    w.secrets
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns))
        .map(|s| s.name_any())
        .filter(|n| desired::is_identity_secret(n))
        .collect()
}

/// Says which ServiceAccounts of `ns` get no identity (their keys would
/// collide with the trust bundle's): a Warning Event on the Namespace, as
/// for a failed reconcile, when that set changes to a non-empty one.
async fn report_refused(ns: &Namespace, ctx: &Ctx, refused: &[String]) {
    let name = ns.name_any();
    let news = {
        let mut known = ctx.refused.lock().expect("refused");
        if refused.is_empty() {
            known.remove(&name);
            false
        } else if known.get(&name).map(Vec::as_slice) == Some(refused) {
            false
        } else {
            known.insert(name.clone(), refused.to_vec());
            true
        }
    };
    if news {
        let message = desired::collision_message(refused);
        tracing::warn!(namespace = %name, accounts = ?refused, "{message}");
        ctx.event(
            ns,
            true,
            desired::IDENTITY_NAME_COLLISION,
            "IssueCertificates",
            message,
        )
        .await;
    }
}

/// What wants writing, by comparing the wanted object with the cached one:
/// every field the operator sets must be there with its value (fields
/// others set are theirs); `data` and `binaryData` must match exactly, so a
/// key the operator dropped (a deleted ServiceAccount's certificate) goes.
pub fn needs_apply(desired: &Value, stored: &Value) -> bool {
    fn contains(stored: Option<&Value>, want: &Value) -> bool {
        match (want, stored) {
            (Value::Object(w), Some(Value::Object(s))) => {
                w.iter().all(|(k, v)| contains(s.get(k), v))
            }
            (Value::Null, None) => true,
            (w, Some(s)) => w == s,
            (_, None) => false,
        }
    }
    let exact = ["data", "binaryData"];
    let Some(fields) = desired.as_object() else {
        return true;
    };
    fields
        .iter()
        .filter(|(k, _)| !exact.contains(&k.as_str()))
        .any(|(k, v)| !contains(stored.get(k), v))
        || exact.iter().any(|k| desired.get(k) != stored.get(k))
}

/// Publishes the endpoints of the Services `config` names as `ns`'s
/// `weft-endpoints`, unless it already holds them. True when it wrote.
pub async fn apply_endpoints(
    ctx: &Ctx,
    ns: &Namespace,
    config: &crate::config::ProxyConfig,
) -> Result<bool, Error> {
    let w = &ctx.world;
    apply_endpoints_from(ctx, ns, config, &super::endpoints::index(w)).await
}

/// [`apply_endpoints`] with the slices already indexed (once per batch).
pub async fn apply_endpoints_from(
    ctx: &Ctx,
    ns: &Namespace,
    config: &crate::config::ProxyConfig,
    slices: &super::endpoints::SliceIndex,
) -> Result<bool, Error> {
    let w = &ctx.world;
    let name = ns.name_any();
    let published = super::endpoints::desired(config, w, slices);
    let stored = World::child(&w.config_maps, &name, ENDPOINTS_CONFIG_MAP_NAME);
    let held = stored.as_ref().and_then(|cm| {
        cm.annotations()
            .get(desired::GENERATION_ANNOTATION)
            .cloned()
    });
    // Written already, and the cache has not caught up with that write
    // (it still holds what it held then): a batch right behind the last
    // one must not write the same document again. Anything else in the
    // cache (someone's edit, a deletion) is set right.
    let lagging = ctx
        .endpoints_written
        .lock()
        .expect("endpoints written")
        .get(&name)
        .is_some_and(|(before, last)| {
            *last == published.generation && held.as_ref() == Some(before)
        });
    if lagging {
        return Ok(false);
    }
    let applied = apply(
        ctx,
        &desired::endpoints_config_map(ns, &published),
        stored.as_deref(),
    )
    .await?;
    if applied && let Some(held) = held {
        ctx.endpoints_written
            .lock()
            .expect("endpoints written")
            .insert(name, (held, published.generation));
    }
    Ok(applied)
}

/// Server-side applies `obj` unless `stored` already matches it.
async fn apply<K>(ctx: &Ctx, obj: &K, stored: Option<&K>) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    if let Some(stored) = stored {
        let (want, have) = (serde_json::to_value(obj), serde_json::to_value(stored));
        if let (Ok(want), Ok(have)) = (want, have)
            && !needs_apply(&want, &have)
        {
            return Ok(false);
        }
    }
    let (ns, name) = (
        ResourceExt::namespace(obj).unwrap_or_default(),
        obj.name_any(),
    );
    let kind = <K as Resource>::kind(&()).into_owned();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    if stored.is_none() {
        // The cache holds only what weft manages. A same-named object
        // outside it is someone else's: a forced apply would take it over
        // (and a later prune delete it). Leave it, and say so.
        match api.get_opt(&name).await {
            Ok(Some(other))
                if other.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) =>
            {
                return Err(Error::NotOurs {
                    kind,
                    namespace: ns,
                    name,
                });
            }
            // Ours (the cache is behind), or absent.
            Ok(_) => {}
            // Unreadable: nothing says it is ours, so it is not written.
            Err(source) => {
                return Err(Error::Api {
                    action: "reading",
                    kind,
                    namespace: ns,
                    name,
                    source,
                });
            }
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Api {
        action: "applying",
        kind: kind.clone(),
        namespace: ns.clone(),
        name: name.clone(),
        source,
    })?;
    ctx.metrics.wrote(&kind, "apply");
    tracing::debug!(%kind, namespace = %ns, %name, "applied");
    Ok(true)
}

/// Deletes what the operator put in a namespace that is no longer meshed.
async fn prune(ns: &Namespace, ctx: &Ctx) -> Result<(), Error> {
    let name = ns.name_any();
    let w = &ctx.world;
    delete_managed(ctx, &w.config_maps, &name, CONFIG_MAP_NAME).await?;
    delete_managed(ctx, &w.config_maps, &name, ENDPOINTS_CONFIG_MAP_NAME).await?;
    for secret in managed_identity_secrets(w, &name) {
        delete_managed(ctx, &w.secrets, &name, &secret).await?;
    }
    delete_managed(ctx, &w.roles, &name, desired::CONFIG_READER).await?;
    delete_managed(ctx, &w.role_bindings, &name, desired::CONFIG_READER).await?;
    ctx.counters.lock().expect("counters").forget(&name);
    ctx.refused.lock().expect("refused").remove(&name);
    Ok(())
}

async fn delete_managed<K>(ctx: &Ctx, store: &Store<K>, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + 'static,
{
    let Some(obj) = World::child(store, ns, name) else {
        return Ok(());
    };
    if obj.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return Ok(());
    }
    let kind = <K as Resource>::kind(&()).into_owned();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    // Only the object the cache shows: one replaced since (someone else's,
    // recreated under the same name) fails the precondition and stays.
    let params = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: obj.uid(),
            resource_version: obj.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(%kind, namespace = %ns, %name, "not pruned: it changed since the cache saw it");
            return Ok(());
        }
        Err(source) => {
            return Err(Error::Api {
                action: "deleting",
                kind,
                namespace: ns.to_owned(),
                name: name.to_owned(),
                source,
            });
        }
    }
    ctx.metrics.wrote(&kind, "delete");
    tracing::info!(%kind, namespace = %ns, %name, "pruned");
    Ok(())
}

/// Writes `status` on `obj` (server-side apply on the status subresource)
/// when it differs from what `obj` holds.
pub async fn write_status<K>(ctx: &Ctx, api: Api<K>, obj: &K, status: Value) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let existing = serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.get("status").cloned());
    if !status::differs(existing.as_ref(), &status) {
        return Ok(false);
    }
    let kind = <K as Resource>::kind(&()).into_owned();
    let name = obj.name_any();
    let patch = json!({
        "apiVersion": <K as Resource>::api_version(&()),
        "kind": kind,
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Api {
        action: "writing the status of",
        kind: kind.clone(),
        namespace: ResourceExt::namespace(obj).unwrap_or_default(),
        name,
        source,
    })?;
    ctx.metrics.wrote(&kind, "status");
    Ok(true)
}

/// After `obj`'s status was written with `status` over `existing`
/// conditions: an Event on `obj` for each condition that changed (Warning
/// when it turned False), so `kubectl describe` tells when and why a
/// policy stopped (or started) working. Only on a write: an unchanged
/// verdict is neither written nor announced. The rollout's own condition
/// has its own Events.
pub async fn announce_conditions<K: Resource<DynamicType = ()>>(
    ctx: &Ctx,
    obj: &K,
    existing: &[Condition],
    status: &Value,
) {
    let written: Vec<Condition> = status
        .get("conditions")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default();
    for c in status::transitions(existing, &written) {
        if c.type_ == status::ROLLOUT_CONDITION {
            continue;
        }
        let warning = c.status == "False";
        let note = format!("{} is {}: {}", c.type_, c.status, c.message);
        ctx.event(obj, warning, &c.reason, "Compile", note).await;
    }
}

fn conditions_of(status: Option<&[Condition]>) -> &[Condition] {
    status.unwrap_or_default()
}

/// The MTLSPolicies of the namespace: the one in force gets its rollout
/// stepped (when the namespace is meshed; `bundle` is then the mesh's
/// trust-bundle hash), the others their verdict. Returns when to look
/// again for the rollout's sake.
async fn write_mtls_status(
    ns: &Namespace,
    ctx: &Ctx,
    snap: &Snapshot,
    bundle: Option<&str>,
    now: SystemTime,
) -> Result<Option<Duration>, Error> {
    let name = ns.name_any();
    let policies: Vec<Arc<MTLSPolicy>> = ctx
        .world
        .mtls_policies
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(&name))
        .collect();
    let api: Api<MTLSPolicy> = Api::namespaced(ctx.client.clone(), &name);
    let mut requeue = None;
    let mut phase = None;
    for policy in policies {
        let Some(verdict) = verdict_of(&snap.compiled, &policy) else {
            // Newer than the last compile: the recompile that follows
            // reconciles this namespace again.
            continue;
        };
        let existing = policy.status.as_ref().map(|s| s.conditions.as_slice());
        let in_force = verdict.condition("Accepted").is_some_and(|c| c.status);
        let (Some(bundle), true) = (bundle, in_force) else {
            let st = status::policy_status(verdict, conditions_of(existing), &time(now));
            if write_status(ctx, api.clone(), policy.as_ref(), st.clone()).await? {
                announce_conditions(ctx, policy.as_ref(), conditions_of(existing), &st).await;
            }
            continue;
        };
        let current = policy.status.as_ref().and_then(|s| {
            Some(Current {
                phase: s.phase?,
                since: s
                    .phase_since
                    .as_ref()
                    .map_or(now, |t| SystemTime::from(t.0)),
                observed_generation: s.observed_generation,
                plaintext_seen: s.conditions.iter().any(|c| {
                    c.type_ == status::ROLLOUT_CONDITION
                        && c.reason == rollout::reason::PLAINTEXT_SEEN
                }),
                blockers: s.blockers.clone(),
            })
        });
        let (evidence, plaintext_now) =
            gather(ctx, snap, &name, &policy, current.as_ref(), bundle, now).await;
        let decision = rollout::step(
            &policy.spec,
            policy.metadata.generation,
            current.as_ref(),
            &evidence,
            now,
        );
        let st = status::mtls_status(verdict, &decision, conditions_of(existing), &time(now));
        if write_status(ctx, api.clone(), policy.as_ref(), st.clone()).await? {
            announce_conditions(ctx, policy.as_ref(), conditions_of(existing), &st).await;
        }
        // Only once the status holds the new phaseSince: a failed write
        // leaves the old start and its baseline, and is decided again.
        if decision.recount || !evidence.plaintext_counted {
            ctx.counters
                .lock()
                .expect("counters")
                .recount(&name, decision.since, plaintext_now);
        }
        if decision.event {
            announce(ctx, &policy, &decision).await;
        }
        phase = Some(decision.phase);
        requeue = Some(decision.requeue_after);
    }
    ctx.metrics.phase(&name, phase);
    if phase.is_none() {
        ctx.counters.lock().expect("counters").forget(&name);
    }
    Ok(requeue)
}

fn verdict_of<'a>(compiled: &'a Compiled, policy: &MTLSPolicy) -> Option<&'a PolicyVerdict> {
    compiled.verdicts.iter().find(|v| {
        v.kind == PolicyKind::MTLSPolicy
            && v.namespace == policy.namespace()
            && v.name == policy.name_any()
    })
}

async fn announce(ctx: &Ctx, policy: &MTLSPolicy, d: &Decision) {
    let warning = matches!(d.phase, RolloutPhase::Blocked | RolloutPhase::RolledBack)
        || d.reason == rollout::reason::PLAINTEXT_SEEN;
    let mut note = d.message.clone();
    if !d.blockers.is_empty() {
        note = format!("{note}: {}", d.blockers.join("; "));
    }
    tracing::info!(
        namespace = %policy.namespace().unwrap_or_default(),
        phase = ?d.phase,
        reason = d.reason,
        "{}", d.message
    );
    ctx.event(policy, warning, d.reason, "Rollout", note).await;
}

/// Live pods of a namespace (not finished, not being deleted): what the
/// sidecar gate looks at, Pending ones included (a pod created without the
/// sidecar speaks plaintext once it starts).
fn live_pods(pods: &Store<Pod>, ns: &str) -> Vec<Arc<Pod>> {
    pods.state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .collect()
}

/// The namespaces labelled for injection (`weft.dev/inject=enabled`).
pub(crate) fn meshed_namespaces(
    namespaces: &kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>,
) -> HashSet<String> {
    namespaces
        .state()
        .iter()
        .filter(|n| {
            n.labels().get(crate::api::INJECT_LABEL).map(String::as_str)
                == Some(crate::api::INJECT_ENABLED)
        })
        .map(|n| n.name_any())
        .collect()
}

/// The pod runs (phase Running, not being deleted): its proxy is expected
/// to report, and only such proxies count for the evidence gates (current
/// config, identity, plaintext, clients). A Pending pod has no IP to
/// scrape and often none coming (unschedulable, waiting on a volume).
pub(crate) fn running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

pub(crate) fn injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER)
    })
}

/// Which pod a plaintext source address is, `ns/name`, and whether it
/// carries the sidecar (a meshed client the flip broke, rather than a
/// stranger STRICT is meant to refuse), to name it in blockers and Events.
/// Only pods that hold their address now: a finished pod keeps its `podIP`
/// in status after the network reused it, and a host-network pod's is its
/// node's, which the kubelet's probes come from. An address two such pods
/// claim names neither (`None`).
fn pods_by_ip(
    pods: &[Arc<Pod>],
    meshed_namespaces: &HashSet<String>,
) -> HashMap<IpAddr, Option<(String, bool)>> {
    let mut by_ip: HashMap<IpAddr, Option<(String, bool)>> = HashMap::new();
    for p in pods {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        let host_network = p.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        if matches!(phase, Some("Succeeded" | "Failed")) || host_network {
            continue;
        }
        let Some(ns) = p.namespace() else {
            continue;
        };
        let name = format!("{ns}/{}", p.name_any());
        let meshed = meshed_client(p, meshed_namespaces.contains(&ns));
        // Every address of a dual-stack pod, not only the primary one.
        for ip in pod_ips(p) {
            by_ip
                .entry(ip)
                .and_modify(|n| {
                    if n.as_ref().map(|(other, _)| other.as_str()) != Some(name.as_str()) {
                        *n = None;
                    }
                })
                .or_insert(Some((name.clone(), meshed)));
        }
    }
    by_ip
}

/// A pod whose refused plaintext is evidence that the flip to Strict broke
/// the mesh: a container named `weft-proxy` is not enough, since a pod's
/// author chooses its container names (and the webhook leaves a pod that
/// already has one alone). It must also carry the injector's annotation and
/// live in a namespace labelled for injection, which its author does not
/// control. What stays possible is documented: a workload owner in a meshed
/// namespace who crafts an injected-looking pod, or sends plaintext past
/// their own sidecar, can still trigger the rollback.
fn meshed_client(pod: &Pod, namespace_meshed: bool) -> bool {
    namespace_meshed
        && injected(pod)
        && pod
            .annotations()
            .contains_key(crate::inject::annotations::INJECTION_HASH)
}

/// Every address a pod holds (`status.podIPs`, else `status.podIP`).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// The proxies of `pods` worth asking: injected and running, by name and
/// address.
fn scrape_targets(pods: &[Arc<Pod>]) -> Vec<(String, IpAddr)> {
    pods.iter()
        .filter(|p| injected(p) && running(p))
        .filter_map(|p| Some((p.name_any(), pod_ip(p)?)))
        .collect()
}

/// Scrapes the proxies of `pods` at once ([`scrape_targets`]); a proxy
/// that cannot be read is left out (the rollout treats it as "not
/// reporting").
async fn scrape_all(ctx: &Ctx, pods: &[Arc<Pod>]) -> HashMap<String, Scrape> {
    let jobs = scrape_targets(pods).into_iter().map(|(name, ip)| {
        let fut = ctx.scraper.scrape(ip);
        async move {
            match fut.await {
                Ok(text) => Some((name, observe::read(&text))),
                Err(e) => {
                    tracing::debug!(pod = %name, error = %e, "proxy not readable");
                    None
                }
            }
        }
    });
    futures_util::future::join_all(jobs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// What the rollout of namespace `ns` decides on, and the plaintext
/// counters read in this look (the baseline, should the decision start a
/// phase or window now).
async fn gather(
    ctx: &Ctx,
    snap: &Snapshot,
    ns: &str,
    policy: &MTLSPolicy,
    current: Option<&Current>,
    bundle: &str,
    now: SystemTime,
) -> (Evidence, HashMap<PlaintextKey, u64>) {
    let compiled = &snap.compiled;
    let pods = live_pods(&ctx.world.pods, ns);
    let scrapes = scrape_all(ctx, &pods).await;
    let meshed_namespaces = meshed_namespaces(&ctx.world.namespaces);
    let by_ip = pods_by_ip(&ctx.world.pods.state(), &meshed_namespaces);

    let mut plaintext_now: HashMap<PlaintextKey, u64> = HashMap::new();
    let mut rejected_now: HashMap<PlaintextKey, u64> = HashMap::new();
    for (pod, s) in &scrapes {
        for ((port, src), n) in &s.plaintext {
            plaintext_now.insert((pod.clone(), *port, src.clone()), *n);
        }
        for ((port, src), n) in &s.rejected {
            rejected_now.insert((pod.clone(), *port, src.clone()), *n);
        }
    }
    let since = current.map_or(now, |c| c.since);
    let window = policy.spec.rollout.auto_rollback.window.as_std();
    let (plaintext, rejected_recently) = {
        let mut counters = ctx.counters.lock().expect("counters");
        let seen = counters.plaintext_since(ns, since, &plaintext_now);
        let rejected = counters.rejected_within(ns, now, window, rejected_now);
        (seen, rejected)
    };
    let plaintext_counted = plaintext.is_some();
    let source = |port: u16, src: String, connections: u64| {
        let pod = src
            .parse()
            .ok()
            .and_then(|ip| by_ip.get(&ip).cloned().flatten());
        PlaintextSource {
            meshed: pod.as_ref().is_some_and(|(_, meshed)| *meshed),
            pod: pod.map(|(name, _)| name),
            src_addr: src,
            port,
            connections,
        }
    };
    let plaintext = plaintext
        .unwrap_or_default()
        .into_iter()
        .map(|((_, port, src), connections)| source(port, src, connections))
        .collect();
    let rejected_recently = rejected_recently
        .into_iter()
        .map(|((port, src), connections)| source(port, src, connections))
        .collect();

    let clients = match current.map(|c| c.phase) {
        Some(RolloutPhase::Observing | RolloutPhase::Enforcing) => {
            clients(ctx, compiled, ns, &scrapes).await
        }
        _ => Vec::new(),
    };
    let compiled_phase = snap
        .mtls_phases
        .get(&(ns.to_owned(), policy.name_any()))
        .copied()
        .flatten();

    let evidence = Evidence {
        pods: pod_evidence(&pods, &scrapes),
        config_generation: compiled
            .configs
            .get(ns)
            .map(|c| c.generation.clone())
            .unwrap_or_default(),
        trust_bundle_hash: bundle.to_owned(),
        plaintext,
        plaintext_counted,
        compiled_phase,
        clients,
        rejected_recently,
    };
    (evidence, plaintext_now)
}

/// Every live pod of the namespace for the sidecar gate, and what the
/// running ones' proxies report.
fn pod_evidence(pods: &[Arc<Pod>], scrapes: &HashMap<String, Scrape>) -> Vec<PodEvidence> {
    pods.iter()
        .map(|p| PodEvidence {
            name: p.name_any(),
            injected: injected(p),
            running: running(p),
            proxy: scrapes.get(&p.name_any()).map(|s| s.report.clone()),
            skipped_inbound_ports: skipped_inbound_ports(p),
        })
        .collect()
}

/// The inbound ports the pod's weft-init left out of the redirect, as its
/// arguments say (what it applied; an annotation edited later changes
/// nothing), less the proxy's own admin and probe ports.
fn skipped_inbound_ports(pod: &Pod) -> Vec<u16> {
    let Some(init) = pod.spec.as_ref().and_then(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(&s.containers)
            .find(|c| c.name == crate::inject::INIT_CONTAINER)
    }) else {
        return Vec::new();
    };
    let args = init.args.as_deref().unwrap_or_default();
    let mut ports: Vec<u16> = args
        .iter()
        .zip(args.iter().skip(1))
        .filter(|(flag, _)| *flag == "--skip-inbound-ports")
        .flat_map(|(_, list)| list.split(','))
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| ![crate::proxy::ADMIN_PORT, crate::proxy::PROBE_PORT].contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The pods of a client namespace whose proxies must run the config that
/// expects Strict: injected and running (one that starts later reads that
/// config when it does).
fn client_pods(pods: Vec<Arc<Pod>>) -> Vec<Arc<Pod>> {
    pods.into_iter()
        .filter(|p| injected(p) && running(p))
        .collect()
}

/// What `caller`'s client pods run against what they should (`expected`).
fn client_evidence(
    caller: &str,
    expected: &str,
    pods: &[Arc<Pod>],
    scrapes: &HashMap<String, Scrape>,
) -> Vec<ClientEvidence> {
    pods.iter()
        .map(|p| ClientEvidence {
            pod: format!("{caller}/{}", p.name_any()),
            running: scrapes
                .get(&p.name_any())
                .and_then(|s| s.report.generation.clone()),
            expected: expected.to_owned(),
        })
        .collect()
}

/// The proxies that call `ns`'s Services: every running injected pod of
/// every meshed namespace whose config lists one of them (`ns` itself
/// included), with the generation it runs and the one it should.
async fn clients(
    ctx: &Ctx,
    compiled: &Compiled,
    ns: &str,
    own: &HashMap<String, Scrape>,
) -> Vec<ClientEvidence> {
    let callers: BTreeMap<&String, &String> = compiled
        .configs
        .iter()
        .filter(|(_, c)| c.outbound.services.iter().any(|s| s.namespace == ns))
        .map(|(name, c)| (name, &c.generation))
        .collect();
    let mut out = Vec::new();
    for (caller, expected) in callers {
        let pods = client_pods(live_pods(&ctx.world.pods, caller));
        let scraped;
        let scrapes = if caller == ns {
            own
        } else {
            scraped = scrape_all(ctx, &pods).await;
            &scraped
        };
        out.extend(client_evidence(caller, expected, &pods, scrapes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ports_weft_init_skipped_are_read_from_its_arguments() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "db-0"},
            "spec": {
                "initContainers": [{"name": "weft-init", "args": [
                    "init", "--proxy-uid", "1450",
                    "--skip-inbound-ports", "5432,15120,15121,9090",
                ]}],
                "containers": [{"name": "db"}],
            },
        }))
        .expect("a pod");
        assert_eq!(skipped_inbound_ports(&pod), [5432, 9090]);
        let plain: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "x"},
            "spec": {"containers": [{"name": "app", "args": ["--skip-inbound-ports", "80"]}]},
        }))
        .expect("a pod");
        assert!(skipped_inbound_ports(&plain).is_empty(), "only weft-init's");
    }

    #[test]
    fn plaintext_sources_name_only_pods_that_hold_their_address_now() {
        let pod = |name: &str, ip: &str, phase: &str, host_network: bool| {
            // Pods named *-meshed were injected: the sidecar and the
            // injector's annotation. A *-crafted one only names a
            // container weft-proxy.
            let (containers, annotations) = if name.ends_with("-meshed") {
                (
                    json!([{"name": "app"}, {"name": PROXY_CONTAINER}]),
                    json!({"weft.dev/injection-hash": "h"}),
                )
            } else if name.ends_with("-crafted") {
                (
                    json!([{"name": "app"}, {"name": PROXY_CONTAINER}]),
                    json!({}),
                )
            } else {
                (json!([{"name": "app"}]), json!({}))
            };
            let ns = if name.starts_with("tools-") {
                "tools"
            } else {
                "shop"
            };
            Arc::new(
                serde_json::from_value::<Pod>(json!({
                    "metadata": {"namespace": ns, "name": name, "annotations": annotations},
                    "spec": {"containers": containers, "hostNetwork": host_network},
                    "status": {"phase": phase, "podIP": ip,
                               "podIPs": [{"ip": ip},
                                          {"ip": format!("fd00::{}", ip.rsplit('.').next().unwrap_or("0"))}]},
                }))
                .expect("a pod"),
            )
        };
        let meshed_ns = HashSet::from(["shop".to_owned()]);
        let by_ip = pods_by_ip(
            &[
                pod("cron-1", "10.0.0.5", "Succeeded", false),
                pod("cart-1", "10.0.0.5", "Running", false),
                pod("checkout-meshed", "10.0.0.16", "Running", false),
                pod("node-agent", "192.168.1.10", "Running", true),
                pod("a", "10.0.0.7", "Running", false),
                pod("b", "10.0.0.7", "Pending", false),
                pod("shop-crafted", "10.0.0.28", "Running", false),
                pod("tools-meshed", "10.0.0.39", "Running", false),
            ],
            &meshed_ns,
        );
        let name = |ip: &str| by_ip.get(&ip.parse().expect("ip")).cloned().flatten();
        assert_eq!(name("10.0.0.5"), Some(("shop/cart-1".into(), false)));
        assert_eq!(
            name("10.0.0.16"),
            Some(("shop/checkout-meshed".into(), true)),
            "an injected pod of a meshed namespace is a meshed client"
        );
        assert_eq!(
            name("fd00::16"),
            Some(("shop/checkout-meshed".into(), true)),
            "by its second address too"
        );
        assert_eq!(
            name("10.0.0.28"),
            Some(("shop/shop-crafted".into(), false)),
            "a container named weft-proxy alone is not a sidecar"
        );
        assert_eq!(
            name("10.0.0.39"),
            Some(("tools/tools-meshed".into(), false)),
            "nor is a pod of a namespace not labelled for injection"
        );
        assert_eq!(name("192.168.1.10"), None, "a node's address is no pod's");
        assert_eq!(name("10.0.0.7"), None, "two claims name neither");
    }

    #[test]
    fn only_a_real_difference_is_applied() {
        let want = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "weft-proxy-config", "namespace": "shop",
                         "labels": {"app.kubernetes.io/managed-by": "weft"}},
            "data": {"config.json": "{}"},
        });
        let mut have = want.clone();
        have["metadata"]["resourceVersion"] = json!("7");
        have["metadata"]["labels"]["team"] = json!("shop");
        assert!(!needs_apply(&want, &have), "fields others own are theirs");

        let mut drifted = have.clone();
        drifted["data"]["config.json"] = json!("{\"edited\":true}");
        assert!(needs_apply(&want, &drifted));

        let mut extra = have.clone();
        extra["data"]["old.crt"] = json!("x");
        assert!(needs_apply(&want, &extra), "a dropped key must go");

        let mut relabelled = have;
        relabelled["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!("helm");
        assert!(needs_apply(&want, &relabelled));
    }

    #[tokio::test]
    async fn closing_the_detached_writers_stops_the_running_and_refuses_new_ones() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let detached = Detached::default();
        let wrote = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let w = wrote.clone();
        detached.spawn(async move {
            let _ = go_rx.await;
            w.fetch_add(1, Ordering::SeqCst);
        });
        let w = wrote.clone();
        detached.spawn(async move {
            w.fetch_add(1, Ordering::SeqCst);
        });
        tokio::task::yield_now().await;
        assert_eq!(wrote.load(Ordering::SeqCst), 1, "an unblocked task runs");

        // The lease is lost while one task still waits to write.
        detached.close();
        let _ = go_tx.send(());
        let w = wrote.clone();
        detached.spawn(async move {
            w.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            wrote.load(Ordering::SeqCst),
            1,
            "neither the waiting task nor one spawned after close may write"
        );
    }

    /// A pod of `shop` as the API server shows it: `status` its phase and
    /// IP, with the sidecar when `sidecar`.
    fn pod(name: &str, sidecar: bool, status: Value) -> Arc<Pod> {
        let mut containers = vec![json!({"name": "app", "image": "app"})];
        if sidecar {
            containers.push(json!({"name": PROXY_CONTAINER, "image": "weft"}));
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"containers": containers},
                "status": status,
            }))
            .expect("pod"),
        )
    }

    fn pending(name: &str, sidecar: bool) -> Arc<Pod> {
        pod(
            name,
            sidecar,
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable"}]}),
        )
    }

    fn running_at(name: &str, ip: &str) -> Arc<Pod> {
        pod(name, true, json!({"phase": "Running", "podIP": ip}))
    }

    fn reporting(generation: &str, bundle: &str) -> Scrape {
        Scrape {
            report: rollout::ProxyReport {
                generation: Some(generation.into()),
                trust_bundle_hash: Some(bundle.into()),
                has_identity: true,
            },
            ..Scrape::default()
        }
    }

    fn staged() -> crate::api::MTLSPolicySpec {
        serde_json::from_value(json!({"mode": "Strict"})).expect("spec")
    }

    /// One rollout step of `shop` in `phase` (a minute in), from what
    /// `gather` would make of `pods` and `scrapes`.
    fn step_in(
        phase: RolloutPhase,
        pods: &[Arc<Pod>],
        scrapes: &HashMap<String, Scrape>,
    ) -> Decision {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let current = Current {
            phase,
            since: now - Duration::from_secs(60),
            observed_generation: Some(1),
            plaintext_seen: false,
            blockers: Vec::new(),
        };
        let evidence = Evidence {
            pods: pod_evidence(pods, scrapes),
            config_generation: "g1".into(),
            trust_bundle_hash: "b1".into(),
            plaintext_counted: true,
            compiled_phase: Some(RolloutPhase::Enforcing),
            clients: client_evidence("shop", "g1", &client_pods(pods.to_vec()), scrapes),
            ..Evidence::default()
        };
        rollout::step(&staged(), Some(1), Some(&current), &evidence, now)
    }

    #[test]
    fn a_pending_injected_pod_without_an_ip_holds_neither_preparing_nor_enforcing() {
        let pods = vec![running_at("web-0", "10.0.0.5"), pending("db-0", true)];
        let targets = scrape_targets(&pods);
        assert_eq!(
            targets,
            vec![("web-0".to_owned(), "10.0.0.5".parse().expect("ip"))],
            "only the running proxy is asked"
        );
        let scrapes = HashMap::from([("web-0".to_owned(), reporting("g1", "b1"))]);

        let d = step_in(RolloutPhase::Preparing, &pods, &scrapes);
        assert_eq!(d.phase, RolloutPhase::Observing, "{d:#?}");
        assert!(d.blockers.is_empty(), "{d:#?}");

        let d = step_in(RolloutPhase::Enforcing, &pods, &scrapes);
        assert_eq!(d.phase, RolloutPhase::Strict, "{d:#?}");
        assert!(d.blockers.is_empty(), "{d:#?}");

        // A pod with an IP but not running yet (its init containers run),
        // or Unknown, or running but being deleted, is not asked either.
        let mut terminating = (*running_at("web-1", "10.0.0.7")).clone();
        terminating.metadata.deletion_timestamp = Some(time(now_secs()));
        let others = vec![
            pod(
                "init-0",
                true,
                json!({"phase": "Pending", "podIP": "10.0.0.6"}),
            ),
            pod(
                "lost-0",
                true,
                json!({"phase": "Unknown", "podIP": "10.0.0.8"}),
            ),
            Arc::new(terminating),
        ];
        assert!(scrape_targets(&others).is_empty());
        assert!(client_pods(others).is_empty());
    }

    #[test]
    fn a_pending_pod_without_the_sidecar_still_blocks_and_is_named() {
        let pods = vec![running_at("web-0", "10.0.0.5"), pending("legacy-0", false)];
        let scrapes = HashMap::from([("web-0".to_owned(), reporting("g1", "b1"))]);
        for phase in [RolloutPhase::Preparing, RolloutPhase::Observing] {
            let d = step_in(phase, &pods, &scrapes);
            assert_eq!(d.phase, RolloutPhase::Blocked, "{d:#?}");
            assert_eq!(d.reason, rollout::reason::PODS_WITHOUT_SIDECAR);
            assert_eq!(
                d.blockers,
                vec!["pod legacy-0 has no weft sidecar (restart it to inject one)".to_owned()]
            );
        }
    }

    #[test]
    fn a_running_pod_that_did_not_report_still_blocks() {
        let pods = vec![
            running_at("web-0", "10.0.0.5"),
            running_at("web-1", "10.0.0.6"),
            pending("db-0", true),
        ];
        let scrapes = HashMap::from([("web-0".to_owned(), reporting("g1", "b1"))]);

        let d = step_in(RolloutPhase::Preparing, &pods, &scrapes);
        assert_eq!(d.phase, RolloutPhase::Preparing, "{d:#?}");
        assert_eq!(
            d.blockers,
            vec!["pod web-1: its proxy did not report".to_owned()]
        );

        let d = step_in(RolloutPhase::Enforcing, &pods, &scrapes);
        assert_eq!(d.phase, RolloutPhase::Enforcing, "{d:#?}");
        assert_eq!(
            d.blockers,
            vec!["client shop/web-1 did not report its config generation".to_owned()]
        );
    }

    #[test]
    fn only_a_refusal_of_the_object_itself_drops_the_client_certificates() {
        let api = |code: u16| Error::Api {
            action: "applying",
            kind: "Secret".into(),
            namespace: "shop".into(),
            name: "weft-identity-cart".into(),
            source: kube::Error::Api(Box::new(
                serde_json::from_value(json!({"status": "Failure", "code": code})).expect("status"),
            )),
        };
        for code in [400, 403, 413, 422] {
            assert!(api(code).refused_content(), "{code}");
        }
        // An API server in trouble: the write is retried as it is.
        for code in [409, 429, 500, 503, 504] {
            assert!(!api(code).refused_content(), "{code}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let at = |n| backoff(n).as_secs_f64();
        assert!((1.0..=1.2).contains(&at(1)));
        assert!((8.0..=9.6).contains(&at(4)));
        assert!((300.0..=360.0).contains(&at(30)));
    }
}
