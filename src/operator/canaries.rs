//! The loop that drives every ServiceRoute's progressive canary: each
//! look reads the route's status (where the canary stands), the golden
//! signals the backends' own pods reported since its step began (their
//! proxies' inbound counts, from the mesh stats the control plane already
//! keeps), and writes the pure [`canary::step`]'s decision into
//! `status.rollout`, with an Event for every transition.
//!
//! Which pods are whose comes from the Services' EndpointSlices and the
//! workload name each pod's proxy reports under (the pod cache keeps it,
//! [`WORKLOAD_ANNOTATION`]); only pods of the route's own namespace count,
//! so no proxy elsewhere in the mesh can speak for the canary. The compiler reads the weight back from the status
//! (a status write is a change of the route, so the mesh recompiles), so
//! nothing the loop holds in memory decides anything: a restarted
//! operator goes on from the status.
//!
//! `status.rollout` is written with a field manager of its own
//! ([`CANARY_FIELD_MANAGER`]) by server-side apply, so the compiler's
//! conditions (field manager `weft-operator`) and the canary never
//! overwrite each other.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::canary::{self, Current, Decision, Evidence};
use super::reconcile::{Ctx, now_secs};
use super::world::{SERVICE_NAME_LABEL, WORKLOAD_ANNOTATION};
use crate::api::{CanaryPhase, CanaryStatus, ROLLOUT_PAUSED_ANNOTATION, ServiceRoute};
use crate::meshstats::{Requests, SharedStats, Tick, WorkloadKey};

/// The field manager of `status.rollout`.
pub const CANARY_FIELD_MANAGER: &str = "weft-canary";

/// A running canary's figures are written at most this often when only
/// they changed (each write makes the mesh recompile).
const FIGURES_EVERY: Duration = Duration::from_secs(30);

/// Looks at every canary every `every` until the task is aborted (the
/// lease lost, or shutdown).
pub async fn run(ctx: Arc<Ctx>, stats: SharedStats, every: Duration) {
    let routes = {
        let ctx = ctx.clone();
        move || ctx.world.service_routes.state()
    };
    look_at_each(every, "canary", routes, |route, last| {
        let (ctx, stats) = (ctx.clone(), stats.clone());
        async move { look(&ctx, &stats, &route, last).await }
    })
    .await
}

/// Looks at every object `list` gives every `every`, until the task is
/// aborted; `look(object, last_write)` says whether it wrote the
/// object's status (and is told when it last did). An object changed
/// since the cache showed it (409) is looked at again next tick.
pub(crate) async fn look_at_each<K, F, Fut>(
    every: Duration,
    what: &'static str,
    list: impl Fn() -> Vec<Arc<K>>,
    mut look: F,
) where
    K: kube::Resource,
    F: FnMut(Arc<K>, Option<Instant>) -> Fut,
    Fut: std::future::Future<Output = Result<bool, kube::Error>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: HashMap<(String, String), Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let objects = list();
        written.retain(|(ns, name), _| {
            objects
                .iter()
                .any(|o| o.namespace().as_deref() == Some(ns) && &o.name_any() == name)
        });
        for object in objects {
            let key = (object.namespace().unwrap_or_default(), object.name_any());
            let last = written.get(&key).copied();
            let at = format!("{}/{}", key.0, key.1);
            match look(object, last).await {
                Ok(true) => {
                    written.insert(key, Instant::now());
                }
                Ok(false) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(object = %at, "{what}: changed since the cache showed it; looked at again next tick");
                }
                Err(e) => {
                    tracing::warn!(object = %at, error = %e, "{what} status not written");
                }
            }
        }
    }
}

/// One look at one route; true when its status was written.
async fn look(
    ctx: &Ctx,
    stats: &SharedStats,
    route: &ServiceRoute,
    last_write: Option<Instant>,
) -> Result<bool, kube::Error> {
    let ns = route.namespace().unwrap_or_default();
    let api: Api<ServiceRoute> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = route.status.as_ref().and_then(|s| s.rollout.as_ref());
    let (Some(rollout), Some(revision)) = (&route.spec.rollout, route.canary_revision()) else {
        if existing.is_some() {
            // The rollout was removed: so is what the canary wrote.
            apply_status(&api, &route.name_any(), json!({})).await?;
            return Ok(true);
        }
        return Ok(false);
    };
    let current = existing.map(current_of);
    let paused = route
        .annotations()
        .get(ROLLOUT_PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true");
    let now = now_secs();
    let since = current
        .as_ref()
        .filter(|c| c.revision.as_deref() == Some(revision.as_str()))
        .map_or(now, |c| c.since);
    let (canary_pods, stable_pods) = sides(ctx, &ns, route, &rollout.canary);
    let evidence = {
        let ticks = crate::proxy::resilience::lock(stats).since(since);
        gather(&ticks, &ns, &canary_pods, &stable_pods)
    };
    let d = canary::step(rollout, &revision, paused, current.as_ref(), &evidence, now);
    let status = status_of(&d, route.metadata.generation, &revision);
    let moved = existing.is_none_or(|e| {
        (
            e.phase,
            e.step,
            e.weight,
            e.verdict.as_str(),
            &e.step_since,
            &e.revision,
        ) != (
            status.phase,
            status.step,
            status.weight,
            status.verdict.as_str(),
            &status.step_since,
            &status.revision,
        )
    });
    // A settled canary keeps the figures that settled it; a running one
    // has them refreshed now and then (each write makes the mesh
    // recompile).
    let settled = matches!(d.phase, CanaryPhase::Aborted | CanaryPhase::Promoted);
    let refreshed = !settled
        && existing.is_some_and(|e| e != &status)
        && last_write.is_none_or(|at| at.elapsed() >= FIGURES_EVERY);
    if !moved && !refreshed {
        return Ok(false);
    }
    let value = serde_json::to_value(&status).unwrap_or_default();
    apply_status(&api, &route.name_any(), json!({ "rollout": value })).await?;
    ctx.metrics.wrote("ServiceRoute", "status");
    if d.event {
        ctx.event(route, d.warning, d.verdict, "Canary", d.message.clone())
            .await;
    }
    Ok(true)
}

/// Server-side apply of `status` (the canary's part) on the route, under
/// [`CANARY_FIELD_MANAGER`]: fields it wrote before and leaves out now go.
pub async fn apply_status(
    api: &Api<ServiceRoute>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    apply_status_as(api, name, CANARY_FIELD_MANAGER, None, status).await
}

/// Server-side apply of `status` on `name` under `manager`, a field
/// manager of the status's own: the compiler's conditions (another
/// manager) are left as they are, and fields `manager` wrote before and
/// leaves out now go. With `resource_version`, only over that version of
/// the object (the API server answers 409 Conflict otherwise: a server-side
/// apply naming `metadata.resourceVersion` is conditional on it).
pub async fn apply_status_as<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    resource_version: Option<String>,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({ "name": name, "resourceVersion": rv });
    }
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// Where the canary stands, as its status says.
pub fn current_of(s: &CanaryStatus) -> Current {
    Current {
        phase: s.phase,
        step: s.step.saturating_sub(1) as usize,
        since: SystemTime::from(s.step_since.0),
        revision: s.revision.clone(),
        verdict: s.verdict.clone(),
        message: s.message.clone(),
    }
}

/// The status a decision writes.
pub fn status_of(d: &Decision, generation: Option<i64>, revision: &str) -> CanaryStatus {
    CanaryStatus {
        observed_generation: generation,
        revision: Some(revision.to_owned()),
        phase: d.phase,
        step: u32::try_from(d.step + 1).unwrap_or(u32::MAX),
        weight: d.weight,
        step_since: Time(k8s_openapi::jiff::Timestamp::try_from(d.since).unwrap_or_default()),
        verdict: d.verdict.to_owned(),
        message: d.message.clone(),
        canary: d.canary.clone(),
        stable: d.stable.clone(),
    }
}

/// The workloads (the names their proxies report under) of the pods
/// behind the canary Service, and behind the other backends of the rules
/// naming it, in the route's namespace.
fn sides(
    ctx: &Ctx,
    ns: &str,
    route: &ServiceRoute,
    canary: &str,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let stable: BTreeSet<&str> = route
        .spec
        .rules
        .iter()
        .filter(|r| r.backend_refs.iter().any(|b| b.name == canary))
        .flat_map(|r| &r.backend_refs)
        .map(|b| b.name.as_str())
        .filter(|name| *name != canary)
        .collect();
    let mut behind = workloads_behind(ctx, ns, |service| {
        service == canary || stable.contains(service)
    });
    let canary_pods = behind.remove(canary).unwrap_or_default();
    let stable_pods = behind.into_values().flatten().collect();
    (canary_pods, stable_pods)
}

/// The workloads (the names their proxies report under, kept by the pod
/// cache) of the pods behind each Service of namespace `ns` that
/// `wanted` picks, from the Services' EndpointSlices.
fn workloads_behind(
    ctx: &Ctx,
    ns: &str,
    wanted: impl Fn(&str) -> bool,
) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for slice in ctx.world.endpoint_slices.state() {
        if slice.namespace().as_deref() != Some(ns) {
            continue;
        }
        let Some(service) = slice.labels().get(SERVICE_NAME_LABEL).filter(|s| wanted(s)) else {
            continue;
        };
        let side = out.entry(service.clone()).or_default();
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(pod) = endpoint
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .and_then(|t| t.name.as_deref())
            else {
                continue;
            };
            let workload = ctx
                .world
                .pods
                .get(&kube::runtime::reflector::ObjectRef::new(pod).within(ns))
                .and_then(|p| p.annotations().get(WORKLOAD_ANNOTATION).cloned());
            if let Some(w) = workload {
                side.insert(w);
            }
        }
    }
    out
}

/// What the pods of `canary` and `stable` workloads of namespace `ns`
/// served (their proxies' inbound counts), summed over `ticks`, and how
/// much time the ticks cover. Workloads on both sides cannot be told
/// apart: nothing is judged until the canary's pods report under a name
/// of their own.
pub fn gather(
    ticks: &[Arc<Tick>],
    ns: &str,
    canary: &BTreeSet<String>,
    stable: &BTreeSet<String>,
) -> Evidence {
    let covered = Duration::from_secs_f64(ticks.iter().map(|t| t.seconds).sum());
    let shared: Vec<&String> = canary.intersection(stable).collect();
    let unreadable = if canary.is_empty() {
        Some(
            "no pod of the canary's Service is known yet (its EndpointSlices name none)".to_owned(),
        )
    } else if !shared.is_empty() {
        Some(format!(
            "the canary's pods and the stable backends' report under the same workload name ({}): give the canary's pods an app label of their own",
            shared
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else {
        None
    };
    let (mut canary_served, mut stable_served) = (Requests::default(), Requests::default());
    if unreadable.is_none() {
        let sum = |workloads: &BTreeSet<String>, into: &mut Requests| {
            for t in ticks {
                for w in workloads {
                    let key = WorkloadKey {
                        namespace: ns.to_owned(),
                        workload: w.clone(),
                    };
                    if let Some(r) = t.counts.inbound.get(&key) {
                        into.add(r);
                    }
                    // Shed at the pod's in-flight cap: answered 503 by its
                    // proxy before it counted the request, a failure all
                    // the same.
                    if let Some(&shed) = t.counts.shed.get(&key) {
                        into.requests += shed;
                    }
                }
            }
        };
        sum(canary, &mut canary_served);
        sum(stable, &mut stable_served);
    }
    Evidence {
        canary: canary_served,
        stable: stable_served,
        covered,
        unreadable,
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::meshstats::{MeshStats, ProxyCounts, Reading};

    /// A proxy's inbound metrics: `ok` and `failed` requests served by
    /// `workload`.
    fn served(workload: &str, ok: u32, failed: u32) -> String {
        format!(
            "weft_proxy_requests_total{{direction=\"inbound\",src=\"spiffe://cluster.local/ns/web/sa/frontend\",dst=\"{workload}\",route=\"default\",status_class=\"2xx\",tls=\"true\"}} {ok}\n\
             weft_proxy_requests_total{{direction=\"inbound\",src=\"spiffe://cluster.local/ns/web/sa/frontend\",dst=\"{workload}\",route=\"default\",status_class=\"5xx\",tls=\"true\"}} {failed}\n"
        )
    }

    fn reading(ns: &str, pod: &str, text: &str) -> Reading {
        Reading {
            id: (ns.to_owned(), pod.to_owned()),
            counts: ProxyCounts::read(ns, text),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The evidence is what each side's own pods served in the route's
    /// namespace since the step began: a proxy of another namespace
    /// claiming the same workload name counts for nothing, and time
    /// before the step is left out.
    #[test]
    fn the_evidence_is_the_backends_own_pods_since_the_step_began() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut stats = MeshStats::default();
        let look = |stats: &mut MeshStats,
                    at: u64,
                    canary: (u32, u32),
                    stable: (u32, u32),
                    forged: u32| {
            stats.record(
                t0 + Duration::from_secs(at),
                vec![
                    reading(
                        "shop",
                        "checkout-canary-0",
                        &format!(
                            "{}weft_proxy_requests_shed_total{{direction=\"inbound\"}} {}\n",
                            served("checkout-canary", canary.0, canary.1),
                            canary.1
                        ),
                    ),
                    reading(
                        "shop",
                        "checkout-0",
                        &served("checkout", stable.0, stable.1),
                    ),
                    // Another tenant's pod claiming to be the canary.
                    reading("evil", "liar-0", &served("checkout-canary", forged, 0)),
                ],
            );
        };
        look(&mut stats, 0, (0, 0), (0, 0), 0);
        look(&mut stats, 10, (90, 10), (1000, 0), 1_000_000);
        // The step begins here.
        look(&mut stats, 20, (180, 20), (2000, 0), 2_000_000);
        look(&mut stats, 30, (270, 30), (3000, 0), 3_000_000);
        let ticks = stats.since(t0 + Duration::from_secs(10));
        let e = gather(
            &ticks,
            "shop",
            &set(&["checkout-canary"]),
            &set(&["checkout"]),
        );
        assert_eq!(e.unreadable, None);
        // 200 served, 20 of them failed, and 20 shed at the cap.
        assert_eq!((e.canary.requests, e.canary.succeeded), (220.0, 180.0));
        assert_eq!((e.stable.requests, e.stable.succeeded), (2000.0, 2000.0));
        assert_eq!(e.covered, Duration::from_secs(20));
        // Pods that cannot be told apart, or a canary without pods: no
        // evidence, not a verdict.
        let e = gather(&ticks, "shop", &set(&["checkout"]), &set(&["checkout"]));
        assert!(
            e.unreadable
                .expect("unreadable")
                .contains("same workload name")
        );
        assert_eq!(e.canary.requests, 0.0);
        let e = gather(&ticks, "shop", &set(&[]), &set(&["checkout"]));
        assert!(e.unreadable.is_some());
    }
}
