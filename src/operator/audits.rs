//! The loop that drives every audited AccessPolicy: each look reads the
//! policy's status (where its move to Enforce stands, the callers seen so
//! far), the audit counts of the guarded pods' own proxies from the mesh
//! stats the control plane keeps, and writes [`audit::step`]'s decision
//! and the callers [`audit::fold`] gathered, with an Event per
//! transition.
//!
//! Only the proxies of the policy's own namespace count, and for a
//! Service target only those of the pods behind the Service (its
//! EndpointSlices), each known by the pod the control plane read it
//! from, never by its own word: no other proxy can block a policy, put
//! callers in its status or hide one.
//! The compiler reads the phase back ([`crate::api::AccessPolicy::audits`]),
//! so nothing held in memory decides whether a proxy enforces.
//!
//! The status is written by server-side apply under a field manager of
//! its own ([`AUDIT_FIELD_MANAGER`]): `enforcement`, `observedCallers`,
//! `observedCallersDropped` and `observedThrough`; the compiler's
//! conditions are never touched.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;

use super::audit::{self, current_of};
use super::canaries::{apply_status_as, look_at_each};
use super::reconcile::{Ctx, now_secs};
use super::world::SERVICE_NAME_LABEL;
use crate::api::{AccessMode, AccessPolicy, AccessTargetKind, EnforcementPhase};
use crate::meshstats::{MeshStats, SharedStats};

/// The field manager of the audit's part of an AccessPolicy's status.
pub const AUDIT_FIELD_MANAGER: &str = "weft-audit";

/// The callers seen are written at most this often when nothing but
/// they changed (each write makes the mesh recompile).
const CALLERS_EVERY: Duration = Duration::from_secs(60);

/// Looks at every AccessPolicy every `every` until the task is aborted
/// (the lease lost, or shutdown).
pub async fn run(ctx: Arc<Ctx>, stats: SharedStats, every: Duration) {
    let policies = {
        let ctx = ctx.clone();
        move || ctx.world.access_policies.state()
    };
    look_at_each(every, "AccessPolicy audit", policies, |policy, last| {
        let (ctx, stats) = (ctx.clone(), stats.clone());
        async move { look(&ctx, &stats, &policy, last).await }
    })
    .await
}

/// One look at one policy; true when its status was written.
pub async fn look(
    ctx: &Ctx,
    stats: &SharedStats,
    policy: &AccessPolicy,
    last_write: Option<Instant>,
) -> Result<bool, kube::Error> {
    // A policy in Enforce that never audited has nothing to hold.
    if policy.spec.mode == AccessMode::Enforce
        && policy
            .status
            .as_ref()
            .is_none_or(|s| s.enforcement.is_none())
    {
        return Ok(false);
    }
    let ns = policy.namespace().unwrap_or_default();
    let guarded = Guarded::of(ctx, policy, &ns);
    let Some(seen) = decide(
        policy,
        &crate::proxy::resilience::lock(stats),
        guarded.pods.as_ref(),
        |p| guarded.port_of(p),
        now_secs(),
    ) else {
        return Ok(false);
    };
    let due = last_write.is_none_or(|at| at.elapsed() >= CALLERS_EVERY);
    let write = seen.moved || (seen.changed && due);
    if !write {
        return Ok(false);
    }
    let api: Api<AccessPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    // Written only over the object this look read: a policy replaced or
    // edited meanwhile (its rules, its mode) is looked at again instead
    // of getting a phase decided for another.
    apply_status_as(
        &api,
        &policy.name_any(),
        AUDIT_FIELD_MANAGER,
        policy.resource_version(),
        seen.status,
    )
    .await?;
    ctx.metrics.wrote("AccessPolicy", "status");
    let d = seen.decision;
    if d.event {
        ctx.event(
            policy,
            d.warning,
            d.reason,
            "Enforcement",
            d.message.clone(),
        )
        .await;
    }
    if d.phase == EnforcementPhase::Enforced && d.event {
        tracing::info!(policy = %format!("{ns}/{}", policy.name_any()), "AccessPolicy enforced after its observation window");
    }
    Ok(true)
}

/// What one look makes of a policy.
#[derive(Debug)]
pub struct Seen {
    pub decision: audit::Decision,
    /// The audit's part of the status to write.
    pub status: serde_json::Value,
    /// News (a phase, the callers blocking, the rules): written at once.
    pub moved: bool,
    /// Anything else changed (the callers' figures, a window started
    /// again by one more sighting of the same callers): written at most
    /// every [`CALLERS_EVERY`], each write making the mesh recompile.
    pub changed: bool,
}

/// One look, without I/O: where `policy` stands (its spec and status),
/// what the proxies of `pods` (every pod of its namespace when `None`)
/// counted for it in `stats`, as of `now`. `port_of` reads a container
/// port as the policy's. `None`: nothing to hold.
pub fn decide(
    policy: &AccessPolicy,
    stats: &MeshStats,
    pods: Option<&BTreeSet<String>>,
    port_of: impl Fn(u16) -> Option<u16>,
    now: SystemTime,
) -> Option<Seen> {
    let status = policy.status.clone().unwrap_or_default();
    let ns = policy.namespace().unwrap_or_default();
    let id = format!("{ns}/{}", policy.name_any());
    let revision = policy.rules_revision();
    let current = status.enforcement.as_ref().map(current_of);
    // The window's counts: since it began, for the rules it runs for.
    let window_since = current
        .as_ref()
        .filter(|c| c.revision.as_deref() == Some(revision.as_str()))
        .map_or(now, |c| c.since);
    let mut evidence = audit::evidence(
        &stats.touching(window_since),
        window_since,
        &ns,
        &id,
        &revision,
        pods,
    );
    // A policy not in force (a conflict lost, its Service missing, its
    // namespace not meshed, or an edit the compiler has not yet judged)
    // is counted by no proxy: its silence is no evidence.
    if !programmed(policy) && evidence.unreadable.is_none() {
        evidence.unreadable = Some(
            "the policy is not in force (its Programmed condition is not True for this generation), so no proxy counts it"
                .to_owned(),
        );
    }
    let decision = audit::step(
        policy.spec.mode,
        policy.spec.observation_window(),
        &revision,
        current.as_ref(),
        &evidence,
        now,
    )?;
    let through = status
        .observed_through
        .as_ref()
        .map_or(SystemTime::UNIX_EPOCH, |t| SystemTime::from(t.0));
    let fresh = stats.since(through);
    let (callers, dropped) = audit::fold(
        &status.observed_callers,
        &fresh,
        &ns,
        &id,
        &revision,
        pods,
        port_of,
    );
    let through = fresh
        .first()
        .and_then(|t| t.at)
        .map(|at| Time(k8s_openapi::jiff::Timestamp::try_from(at).unwrap_or_default()))
        .or(status.observed_through.clone());
    let enforcement = decision.status(&revision);
    let moved = status.enforcement.as_ref().is_none_or(|e| {
        (e.phase, &e.revision, &e.unlisted)
            != (
                enforcement.phase,
                &enforcement.revision,
                &enforcement.unlisted,
            )
    });
    let changed =
        callers != status.observed_callers || status.enforcement.as_ref() != Some(&enforcement);
    let mut value = json!({
        "enforcement": enforcement,
        "observedCallers": callers,
        "observedThrough": through,
    });
    if dropped > 0 {
        value["observedCallersDropped"] = json!(dropped);
    }
    Some(Seen {
        decision,
        status: value,
        moved,
        changed,
    })
}

/// Whether the compiler's status says the policy, as it is now, is in
/// force on its namespace's proxies.
fn programmed(policy: &AccessPolicy) -> bool {
    policy.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == crate::api::conditions::PROGRAMMED
                && c.status == "True"
                && c.observed_generation == policy.metadata.generation
        })
    })
}

/// Whose counts speak for a policy, and in which ports.
struct Guarded {
    /// For a Service target, its pods (from its EndpointSlices); `None`:
    /// every pod of the namespace.
    pods: Option<BTreeSet<String>>,
    /// The Service and its slices, to read container ports as its own.
    service: Option<(Arc<Service>, Vec<Arc<EndpointSlice>>)>,
}

impl Guarded {
    fn of(ctx: &Ctx, policy: &AccessPolicy, ns: &str) -> Self {
        let target = &policy.spec.target_ref;
        let name = match (target.kind, &target.name) {
            (AccessTargetKind::Service, Some(name)) => name,
            _ => {
                return Guarded {
                    pods: None,
                    service: None,
                };
            }
        };
        let slices: Vec<Arc<EndpointSlice>> = ctx
            .world
            .endpoint_slices
            .state()
            .into_iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(ns)
                    && s.labels().get(SERVICE_NAME_LABEL) == Some(name)
            })
            .collect();
        let pods = slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter_map(|e| e.target_ref.as_ref())
            .filter(|t| t.kind.as_deref() == Some("Pod"))
            .filter_map(|t| t.name.clone())
            .collect();
        let service = ctx
            .world
            .services
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns));
        // Without a selector, the proxies apply the Service's guard on
        // every pod of the namespace (membership cannot be told): all of
        // them speak for it.
        let selects = service.as_ref().is_some_and(|svc| {
            svc.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|sel| !sel.is_empty())
        });
        Guarded {
            pods: selects.then_some(pods),
            service: service.map(|svc| (svc, slices)),
        }
    }

    /// A container port a proxy counted, as the policy speaks of it: the
    /// Service's port for a Service target.
    fn port_of(&self, container: u16) -> Option<u16> {
        match &self.service {
            Some((svc, slices)) => service_port_of(svc, slices, container),
            None if self.pods.is_none() => Some(container),
            None => None,
        }
    }
}

/// The port of `svc` that forwards to `container`: by a numeric
/// `targetPort`, or by a named one through the EndpointSlices (which say
/// the number each Service port name reached).
pub fn service_port_of(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
    container: u16,
) -> Option<u16> {
    let ports = svc.spec.as_ref()?.ports.as_ref()?;
    for p in ports {
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let target = match &p.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            // A named target port: the number each slice says the
            // Service port of that name reached (it may differ between
            // pods during a rollout).
            Some(IntOrString::String(_)) => slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .any(|sp| {
                    sp.name.as_deref().unwrap_or_default() == p.name.as_deref().unwrap_or_default()
                        && sp.protocol.as_deref().is_none_or(|pr| pr == "TCP")
                        && sp.port == Some(i32::from(container))
                })
                .then_some(container),
        };
        if target == Some(container) {
            return Some(port);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AccessPolicyStatus, Enforcement};

    /// A policy Observing for `window` with every count read and no
    /// caller outside its rules: enforced only when the compiler's status
    /// says it is in force for this generation (a policy no proxy counts
    /// has no evidence in its silence).
    #[test]
    fn a_policy_not_in_force_is_never_enforced_on_silence() {
        let t = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs);
        let mut policy: AccessPolicy = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "payments", "generation": 2},
            "spec": {"targetRef": {"kind": "Namespace"}, "observationWindow": "1m"},
        }))
        .expect("policy");
        let condition = |generation: i64| {
            serde_json::from_value(json!({
                "type": "Programmed", "status": "True", "reason": "Programmed", "message": "",
                "lastTransitionTime": "2026-12-07T10:00:00Z", "observedGeneration": generation,
            }))
            .expect("condition")
        };
        let mut stats = MeshStats::default();
        for at in (0..=90).step_by(10) {
            stats.record(t(at), vec![]);
        }
        let revision = policy.rules_revision();
        let status = |generation| AccessPolicyStatus {
            conditions: vec![condition(generation)],
            enforcement: Some(Enforcement {
                phase: EnforcementPhase::Observing,
                since: Time(k8s_openapi::jiff::Timestamp::try_from(t(0)).expect("time")),
                revision: Some(revision.clone()),
                message: String::new(),
                unlisted: Vec::new(),
            }),
            ..AccessPolicyStatus::default()
        };
        policy.status = Some(status(1));
        let seen = decide(&policy, &stats, None, Some, t(95)).expect("a state");
        assert_eq!(
            seen.decision.phase,
            EnforcementPhase::Observing,
            "{}",
            seen.decision.message
        );
        assert!(
            seen.decision.message.contains("not in force"),
            "{}",
            seen.decision.message
        );
        policy.status = Some(status(2));
        let seen = decide(&policy, &stats, None, Some, t(95)).expect("a state");
        assert_eq!(
            seen.decision.phase,
            EnforcementPhase::Enforced,
            "{}",
            seen.decision.message
        );
        assert!(seen.moved);
    }
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::EndpointPort;

    #[test]
    fn a_container_port_reads_as_the_service_port_that_reaches_it() {
        let svc = Service {
            spec: Some(ServiceSpec {
                ports: Some(vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: Some(IntOrString::Int(8080)),
                        ..ServicePort::default()
                    },
                    ServicePort {
                        name: Some("admin".into()),
                        port: 9000,
                        target_port: Some(IntOrString::String("admin".into())),
                        ..ServicePort::default()
                    },
                    ServicePort {
                        name: Some("raw".into()),
                        port: 7000,
                        ..ServicePort::default()
                    },
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let slice = EndpointSlice {
            ports: Some(vec![EndpointPort {
                name: Some("admin".into()),
                port: Some(9090),
                ..EndpointPort::default()
            }]),
            ..EndpointSlice::default()
        };
        let slices = [Arc::new(slice)];
        let of = |c| service_port_of(&svc, &slices, c);
        assert_eq!(
            (of(8080), of(9090), of(7000), of(1234)),
            (Some(80), Some(9000), Some(7000), None)
        );
        // Without slices a named target port cannot be told.
        assert_eq!(service_port_of(&svc, &[], 9090), None);
    }
}
