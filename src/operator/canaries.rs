//! The loop that drives every ServiceRoute's progressive canary: each
//! look reads the route's status (where the canary stands), the golden
//! signals the client proxies reported since its step began (the mesh
//! stats the control plane already keeps), and writes the pure
//! [`canary::step`]'s decision into `status.rollout`, with an Event for
//! every transition. The compiler reads the weight back from the status
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
use crate::api::{CanaryRollout, CanaryStatus, ROLLOUT_PAUSED_ANNOTATION, ServiceRoute};
use crate::meshstats::{Requests, SharedStats, Tick};

/// The field manager of `status.rollout`.
pub const CANARY_FIELD_MANAGER: &str = "weft-canary";

/// A running canary's figures are written at most this often when only
/// they changed (each write makes the mesh recompile).
const FIGURES_EVERY: Duration = Duration::from_secs(30);

/// Looks at every canary every `every` until the task is aborted (the
/// lease lost, or shutdown).
pub async fn run(ctx: Arc<Ctx>, stats: SharedStats, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: HashMap<(String, String), Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let routes = ctx.world.service_routes.state();
        written.retain(|(ns, name), _| {
            routes
                .iter()
                .any(|r| r.namespace().as_deref() == Some(ns) && &r.name_any() == name)
        });
        for route in routes {
            let key = (route.namespace().unwrap_or_default(), route.name_any());
            let last = written.get(&key).copied();
            match look(&ctx, &stats, &route, last).await {
                Ok(true) => {
                    written.insert(key, Instant::now());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(route = %format!("{}/{}", key.0, key.1), error = %e, "canary status not written");
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
    let Some(rollout) = &route.spec.rollout else {
        if existing.is_some() {
            // The rollout was removed: so is what the canary wrote.
            apply(&api, &route.name_any(), json!({})).await?;
            return Ok(true);
        }
        return Ok(false);
    };
    let generation = route.metadata.generation;
    let current = existing.map(current_of);
    let paused = route
        .annotations()
        .get(ROLLOUT_PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true");
    let now = now_secs();
    let since = current
        .as_ref()
        .filter(|c| c.observed_generation == generation)
        .map_or(now, |c| c.since);
    let evidence = {
        let ticks = crate::proxy::resilience::lock(stats).since(since);
        gather(&ticks, &ns, &route.name_any(), route, rollout)
    };
    let d = canary::step(
        rollout,
        generation,
        paused,
        current.as_ref(),
        &evidence,
        now,
    );
    let status = status_of(&d, generation);
    let moved = existing.is_none_or(|e| {
        (e.phase, e.step, e.weight, e.verdict.as_str(), &e.step_since)
            != (
                status.phase,
                status.step,
                status.weight,
                status.verdict.as_str(),
                &status.step_since,
            )
            || e.observed_generation != status.observed_generation
    });
    let refreshed = existing.is_some_and(|e| e != &status)
        && last_write.is_none_or(|at| at.elapsed() >= FIGURES_EVERY);
    if !moved && !refreshed {
        return Ok(false);
    }
    let value = serde_json::to_value(&status).unwrap_or_default();
    apply(&api, &route.name_any(), json!({ "rollout": value })).await?;
    ctx.metrics.wrote("ServiceRoute", "status");
    if d.event {
        ctx.event(route, d.warning, d.verdict, "Canary", d.message.clone())
            .await;
    }
    Ok(true)
}

/// Server-side apply of `status` (the canary's part) on the route.
async fn apply(
    api: &Api<ServiceRoute>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "ServiceRoute",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(CANARY_FIELD_MANAGER).force(),
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
        observed_generation: s.observed_generation,
        verdict: s.verdict.clone(),
        message: s.message.clone(),
    }
}

/// The status a decision writes.
pub fn status_of(d: &Decision, generation: Option<i64>) -> CanaryStatus {
    CanaryStatus {
        observed_generation: generation,
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

/// The canary's and the stable backends' requests on the rules that name
/// the canary, summed over `ticks` (every caller's proxies), and how much
/// time the ticks cover.
pub fn gather(
    ticks: &[Arc<Tick>],
    ns: &str,
    name: &str,
    route: &ServiceRoute,
    rollout: &CanaryRollout,
) -> Evidence {
    // The route label each rule's edges carry (as the compiler names it).
    let rules: BTreeSet<String> = route
        .spec
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.backend_refs.iter().any(|b| b.name == rollout.canary))
        .map(|(i, r)| {
            let rule = r.name.clone().unwrap_or_else(|| i.to_string());
            format!("{ns}/{name}/{rule}")
        })
        .collect();
    let canary_dst = format!("{}.{ns}:", rollout.canary);
    let (mut canary, mut stable) = (Requests::default(), Requests::default());
    let mut covered = 0.0;
    for t in ticks {
        covered += t.seconds;
        for (edge, requests) in &t.counts.edges {
            if !rules.contains(&edge.route) {
                continue;
            }
            if edge.dst.starts_with(&canary_dst) {
                canary.add(requests);
            } else {
                stable.add(requests);
            }
        }
    }
    Evidence {
        canary,
        stable,
        covered: Duration::from_secs_f64(covered),
    }
}
