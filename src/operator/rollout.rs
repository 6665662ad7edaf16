//! The staged move of a namespace from PERMISSIVE to STRICT mTLS, as a pure
//! state machine: given the policy, where the rollout stands and what was
//! observed, [`step`] says where it goes next, what holds it back (by name)
//! and when to look again. No I/O: the operator gathers the [`Evidence`]
//! (pods, what each proxy reports, plaintext counters) and writes the
//! [`Decision`] into `status`; the compiler reads `status.phase` back, so
//! the phase is what changes the proxies' configs.
//!
//! ```text
//! Permissive -> Preparing -> Observing -> Enforcing -> Strict
//!                  |   ^          |                     |
//!                  v   |          v (plaintext: window  v (rejected burst)
//!                Blocked          restarts)          RolledBack
//! ```
//!
//! - Preparing: every pod carries the sidecar (Pending ones included), and
//!   every running pod has an identity and runs the namespace's current
//!   config generation and trust bundle. A pod without the sidecar needs
//!   the user (a restart re-injects it): Blocked. A pod not running yet
//!   (unschedulable, waiting on a volume) holds nothing: it starts on
//!   whatever config and identity are current then.
//! - Observing: a whole window without plaintext on a non-excepted port,
//!   counted from counters the operator read when the window began (an
//!   operator that restarted or took over has none, so the window starts
//!   again). Plaintext stops the window and names its sources; while it
//!   keeps coming the status stays as it is (no write, no Event, unless a
//!   new source appears), and the first look without any starts the window
//!   again.
//! - Enforcing: client namespaces were told to expect STRICT (the compiler
//!   does that in this phase); wait until the config that says so has been
//!   compiled and every client proxy runs it, so none falls back to
//!   plaintext after the flip.
//! - Strict: the servers reject plaintext. A burst of rejected plaintext
//!   from *meshed* pods (pods with the sidecar, which the flip broke: they
//!   should have spoken mTLS) above the threshold within the rollback
//!   window rolls back to Permissive (RolledBack), which holds until the
//!   policy is edited. Plaintext from anything else (a pod without the
//!   sidecar, an address no pod of the cluster holds) is what STRICT exists
//!   to refuse: it is counted and named in the status message, and never
//!   rolls back, or anyone who can reach a pod could switch mTLS off by
//!   knocking.
//!
//! Plaintext from an address no live pod of the cluster holds (a node, a
//! host-network pod, something outside the cluster) never holds the
//! observation window either: it is named in the message and the window
//! runs on. Only a pod of the cluster that would lose its traffic under
//! STRICT blocks the rollout.

use std::time::{Duration, SystemTime};

use crate::api::{MTLSPolicySpec, MtlsMode, RolloutPhase, RolloutStrategy};

/// Condition reasons the rollout writes (type `Ready` of the policy's
/// rollout, and Event reasons).
pub mod reason {
    pub const PERMISSIVE: &str = "Permissive";
    pub const WAITING_FOR_PROXIES: &str = "WaitingForProxies";
    pub const PODS_WITHOUT_SIDECAR: &str = "PodsWithoutSidecar";
    pub const OBSERVING: &str = "Observing";
    pub const PLAINTEXT_SEEN: &str = "PlaintextSeen";
    pub const OBSERVATION_RESTARTED: &str = "ObservationRestarted";
    pub const WAITING_FOR_COMPILE: &str = "WaitingForCompile";
    pub const WAITING_FOR_CLIENTS: &str = "WaitingForClients";
    pub const STRICT: &str = "Strict";
    pub const IMMEDIATE: &str = "Immediate";
    pub const REJECTED_PLAINTEXT_BURST: &str = "RejectedPlaintextBurst";
    pub const ROLLED_BACK: &str = "RolledBack";
}

/// One pod of the namespace, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvidence {
    pub name: String,
    /// The pod carries the weft-proxy sidecar.
    pub injected: bool,
    /// The pod runs (phase Running, not being deleted), so its proxy is
    /// expected to report. A pod not running yet (Pending: unscheduled,
    /// waiting on a volume or image; Unknown) counts for the sidecar gate
    /// only: it has nothing to report and speaks to nobody, and once it
    /// starts it reads the then-current config and identity.
    pub running: bool,
    /// What its proxy reports; None when it could not be asked (not
    /// running, not ready, not reachable) or has no sidecar.
    pub proxy: Option<ProxyReport>,
    /// Inbound ports its weft-init left out of the redirect (the pod's
    /// `weft.dev/skip-inbound-ports`): their traffic never passes the
    /// proxy, so Strict does not cover them.
    pub skipped_inbound_ports: Vec<u16>,
}

/// What one proxy reports on its admin `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyReport {
    /// The config generation it runs.
    pub generation: Option<String>,
    /// The trust bundle it trusts.
    pub trust_bundle_hash: Option<String>,
    /// It holds a workload certificate.
    pub has_identity: bool,
}

/// Plaintext connections from one source to one port of the namespace,
/// counted since the current phase (or window) began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaintextSource {
    pub src_addr: String,
    /// The pod that has `src_addr`, when one does.
    pub pod: Option<String>,
    /// That pod carries the weft sidecar.
    pub meshed: bool,
    pub port: u16,
    pub connections: u64,
}

/// A proxy elsewhere in the mesh that calls this namespace (in a running
/// pod: one not running yet starts on the config that expects Strict).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEvidence {
    /// `namespace/pod`.
    pub pod: String,
    /// The generation it runs; None when it could not be asked.
    pub running: Option<String>,
    /// Its namespace's current generation (which, during Enforcing,
    /// expects STRICT from this namespace).
    pub expected: String,
}

/// Everything [`step`] decides on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    pub pods: Vec<PodEvidence>,
    /// The namespace's current config generation.
    pub config_generation: String,
    /// The mesh's current trust bundle.
    pub trust_bundle_hash: String,
    /// Since the current phase (or window) began.
    pub plaintext: Vec<PlaintextSource>,
    /// The operator holds the counters it read when the current phase (or
    /// window) began, so `plaintext` is complete. False after the operator
    /// restarted or another replica took over: `plaintext` is then empty
    /// and says nothing.
    pub plaintext_counted: bool,
    /// The rollout phase this policy's status held when the latest compile
    /// read it (what the client namespaces' configs were made from); None
    /// when that compile did not see the policy or it had no phase.
    pub compiled_phase: Option<RolloutPhase>,
    /// Client proxies of this namespace's Services in other pods.
    pub clients: Vec<ClientEvidence>,
    /// Plaintext connections the namespace's proxies rejected within the
    /// auto-rollback window, by source.
    pub rejected_recently: Vec<PlaintextSource>,
}

/// Where the rollout stands (from the policy's status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub phase: RolloutPhase,
    pub since: SystemTime,
    /// The policy generation the status was written for.
    pub observed_generation: Option<i64>,
    /// The last look saw plaintext ([`reason::PLAINTEXT_SEEN`]): no window
    /// runs until a look sees none.
    pub plaintext_seen: bool,
    /// The blockers the status lists.
    pub blockers: Vec<String>,
}

/// What to write and when to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub phase: RolloutPhase,
    pub since: SystemTime,
    /// What holds the rollout back, by name.
    pub blockers: Vec<String>,
    pub reason: &'static str,
    pub message: String,
    /// Worth an Event: a phase change, a restarted window, or a new
    /// plaintext source.
    pub event: bool,
    /// The plaintext counters read in this look become the baseline that
    /// later looks count from (the phase or window starts now, or plaintext
    /// was seen and the next look must tell whether more came).
    pub recount: bool,
    pub requeue_after: Duration,
}

const RECHECK: Duration = Duration::from_secs(10);
const RECHECK_FAST: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(300);
/// At most this many blockers are listed; the message says how many more.
const MAX_BLOCKERS: usize = 20;

/// One step of the rollout of a namespace whose MTLSPolicy has `spec` at
/// `generation`.
pub fn step(
    spec: &MTLSPolicySpec,
    generation: Option<i64>,
    current: Option<&Current>,
    evidence: &Evidence,
    now: SystemTime,
) -> Decision {
    let phase = current.map(|c| c.phase);
    let since = current.map_or(now, |c| c.since);
    let to = |phase: RolloutPhase, reason, message: String, blockers, requeue_after| {
        let changed = current.is_none_or(|c| c.phase != phase);
        Decision {
            phase,
            since: if changed { now } else { since },
            blockers,
            reason,
            message,
            event: changed,
            recount: changed,
            requeue_after,
        }
    };

    if spec.mode == MtlsMode::Permissive {
        return to(
            RolloutPhase::Permissive,
            reason::PERMISSIVE,
            "the policy asks for Permissive: plaintext and mesh mTLS are both accepted".into(),
            Vec::new(),
            IDLE,
        );
    }
    if spec.rollout.strategy == RolloutStrategy::Immediate {
        return to(
            RolloutPhase::Strict,
            reason::IMMEDIATE,
            "strategy Immediate: only mesh mTLS is accepted, without a staged rollout".into(),
            Vec::new(),
            IDLE,
        );
    }

    let edited = current.is_some_and(|c| c.observed_generation != generation);
    match phase {
        Some(RolloutPhase::RolledBack) if !edited => {
            // What broke stays listed; a pod that starts speaking
            // plaintext later joins it. Without counts, so the list (and
            // the status) changes only when the set of sources does.
            let mut sources = current.map(|c| c.blockers.clone()).unwrap_or_default();
            for b in current_blockers(evidence) {
                if !sources.contains(&b) {
                    sources.push(b);
                }
            }
            return to(
                RolloutPhase::RolledBack,
                reason::ROLLED_BACK,
                "rolled back to Permissive; edit the policy (any change) to start the rollout again"
                    .into(),
                capped(sources).0,
                IDLE,
            );
        }
        Some(RolloutPhase::Strict) => {
            let rb = &spec.rollout.auto_rollback;
            let (meshed, outside): (Vec<&PlaintextSource>, Vec<&PlaintextSource>) = evidence
                .rejected_recently
                .iter()
                .filter(|r| r.connections > 0)
                .partition(|r| r.pod.is_some() && r.meshed);
            let broken: u64 = meshed.iter().map(|r| r.connections).sum();
            if rb.enabled && broken >= u64::from(rb.rejected_connections) {
                return to(
                    RolloutPhase::RolledBack,
                    reason::REJECTED_PLAINTEXT_BURST,
                    format!(
                        "{broken} plaintext connections from pods with the sidecar were rejected within {} (threshold {}): the flip broke meshed clients, back to Permissive",
                        rb.window, rb.rejected_connections
                    ),
                    capped(meshed.iter().map(|r| describe(r)).collect()).0,
                    IDLE,
                );
            }
            // Refusals from outside the mesh are STRICT doing its job: named
            // (without counts, so more of the same rewrites nothing), never
            // a reason to roll back.
            let mut message = "only mesh mTLS is accepted".to_owned();
            let mut refused: Vec<String> =
                outside.iter().chain(&meshed).map(|r| describe(r)).collect();
            refused.sort();
            refused.dedup();
            if !refused.is_empty() {
                let n = refused.len();
                let (named, more) = capped(refused);
                message = format!(
                    "only mesh mTLS is accepted; refused within {} ({n} sources, none of them enough to roll back){more}: {}",
                    rb.window,
                    named.join("; ")
                );
            }
            message.push_str(&uncovered_note(evidence));
            return to(
                RolloutPhase::Strict,
                reason::STRICT,
                message,
                Vec::new(),
                RECHECK,
            );
        }
        Some(RolloutPhase::Enforcing) => {
            // The clients' expected generation below comes from the latest
            // compile; unless that compile read this policy in Enforcing,
            // the configs it made do not tell clients to expect Strict yet,
            // and clients "running the expected generation" means nothing.
            // (A compile that read Strict made the same client configs.)
            if !matches!(
                evidence.compiled_phase,
                Some(RolloutPhase::Enforcing | RolloutPhase::Strict)
            ) {
                let read = evidence
                    .compiled_phase
                    .map_or_else(|| "no phase".to_owned(), |p| format!("phase {p:?}"));
                return to(
                    RolloutPhase::Enforcing,
                    reason::WAITING_FOR_COMPILE,
                    "waiting for the config that expects Strict to be compiled".into(),
                    vec![format!(
                        "waiting for the config that expects Strict to be compiled (the latest compile read this policy in {read})"
                    )],
                    RECHECK_FAST,
                );
            }
            let lagging: Vec<String> = evidence
                .clients
                .iter()
                .filter(|c| c.running.as_deref() != Some(c.expected.as_str()))
                .map(|c| match &c.running {
                    Some(g) => format!(
                        "client {} runs config {g}, not {} (which expects Strict)",
                        c.pod, c.expected
                    ),
                    None => format!("client {} did not report its config generation", c.pod),
                })
                .collect();
            if lagging.is_empty() {
                return to(
                    RolloutPhase::Strict,
                    reason::STRICT,
                    format!(
                        "all {} client proxies expect Strict; the servers now accept only mesh mTLS{}",
                        evidence.clients.len(),
                        uncovered_note(evidence)
                    ),
                    Vec::new(),
                    RECHECK,
                );
            }
            let n = lagging.len();
            let (blockers, more) = capped(lagging);
            return to(
                RolloutPhase::Enforcing,
                reason::WAITING_FOR_CLIENTS,
                format!(
                    "waiting for {n} client proxies to run the config that expects Strict{more}"
                ),
                blockers,
                RECHECK_FAST,
            );
        }
        _ => {}
    }

    // Preparing, Observing, Blocked, a fresh policy, or an edited one.
    let uninjected: Vec<String> = evidence
        .pods
        .iter()
        .filter(|p| !p.injected)
        .map(|p| {
            format!(
                "pod {} has no weft sidecar (restart it to inject one)",
                p.name
            )
        })
        .collect();
    if !uninjected.is_empty() {
        let n = uninjected.len();
        let (blockers, more) = capped(uninjected);
        return to(
            RolloutPhase::Blocked,
            reason::PODS_WITHOUT_SIDECAR,
            format!("{n} pods have no sidecar and would lose their traffic under Strict{more}"),
            blockers,
            RECHECK,
        );
    }
    let unready = unready_proxies(evidence);
    if !unready.is_empty() {
        let n = unready.len();
        let (blockers, more) = capped(unready);
        return to(
            RolloutPhase::Preparing,
            reason::WAITING_FOR_PROXIES,
            format!(
                "waiting for {n} proxies to run config {} with an identity{more}",
                evidence.config_generation
            ),
            blockers,
            RECHECK,
        );
    }
    let window = spec.rollout.observation_window.as_std();
    let Some(current) = current.filter(|c| c.phase == RolloutPhase::Observing && !edited) else {
        // Into Observing, or edited while in it: the window starts now,
        // from fresh counters. An edit in Observing kept the phase, and
        // with it a phaseSince that may be an hour old (plaintext first
        // seen then): the next quiet look would have found the window
        // long over and gone to Enforcing.
        return window_starts(spec, now, true);
    };
    if !evidence.plaintext_counted {
        // The counters from the window's start are gone (this replica
        // restarted or took over): plaintext since phaseSince cannot be
        // told, so the window cannot be trusted and starts again now.
        return Decision {
            phase: RolloutPhase::Observing,
            since: now,
            blockers: Vec::new(),
            reason: reason::OBSERVATION_RESTARTED,
            message: format!(
                "the operator holds no plaintext counters from the window's start (it restarted, or another replica took over): the {} window starts again",
                spec.rollout.observation_window
            ),
            event: true,
            recount: true,
            requeue_after: window.min(RECHECK),
        };
    }
    // Only a pod of the cluster can hold the window: an address no pod
    // holds is refused under STRICT and breaks nothing the mesh serves.
    // Except the proxy's `other` bucket (plaintext from more sources than
    // it names, or on more ports): a real client may hide in it behind a
    // flood of addresses, so it holds the window as a pod would.
    let (plaintext, outside): (Vec<&PlaintextSource>, Vec<&PlaintextSource>) = evidence
        .plaintext
        .iter()
        .filter(|p| p.connections > 0 && !spec.plaintext_ports.contains(&p.port))
        .partition(|p| p.pod.is_some() || p.src_addr == OTHER_SOURCE || p.port == 0);
    let outside_note = outside_note(&outside);
    if !plaintext.is_empty() {
        // Sources add up while plaintext keeps coming; counts stay out of
        // the blockers so that more of the same writes nothing.
        let mut sources = if current.plaintext_seen {
            current.blockers.clone()
        } else {
            Vec::new()
        };
        for b in plaintext.iter().map(|p| describe(p)) {
            if !sources.contains(&b) {
                sources.push(b);
            }
        }
        let n = sources.len();
        let (blockers, more) = capped(sources);
        let event = !current.plaintext_seen || blockers != current.blockers;
        return Decision {
            phase: RolloutPhase::Observing,
            // phaseSince says when plaintext was first seen; no window runs
            // until a look sees none.
            since: if current.plaintext_seen {
                current.since
            } else {
                now
            },
            message: format!(
                "plaintext seen from {n} sources; the {} window starts again once none is seen{more}{outside_note}",
                spec.rollout.observation_window
            ),
            blockers,
            reason: reason::PLAINTEXT_SEEN,
            event,
            recount: true,
            requeue_after: window.min(RECHECK),
        };
    }
    if current.plaintext_seen {
        // The first look without plaintext: the window starts now.
        let mut d = window_starts(spec, now, false);
        d.message.push_str(&outside_note);
        return d;
    }
    let observed = now.duration_since(since).unwrap_or_default();
    if observed >= window {
        return to(
            RolloutPhase::Enforcing,
            reason::WAITING_FOR_CLIENTS,
            format!(
                "no plaintext from pods for {}; client proxies are told to expect Strict{outside_note}",
                spec.rollout.observation_window
            ),
            Vec::new(),
            RECHECK_FAST,
        );
    }
    // The message stays the same for the whole window, so the status is
    // not rewritten on every look.
    to(
        RolloutPhase::Observing,
        reason::OBSERVING,
        format!("{}{outside_note}", window_message(spec)),
        Vec::new(),
        (window - observed).min(RECHECK),
    )
}

/// Names the inbound ports Strict does not cover because a pod's weft-init
/// left them out of the redirect ("" when there are none), so the status
/// never claims Strict for traffic the proxy does not see.
fn uncovered_note(evidence: &Evidence) -> String {
    let all: Vec<String> = evidence
        .pods
        .iter()
        .flat_map(|p| {
            p.skipped_inbound_ports
                .iter()
                .map(move |port| format!("pod {} port {port}", p.name))
        })
        .collect();
    if all.is_empty() {
        return String::new();
    }
    let n = all.len();
    let (named, more) = capped(all);
    format!(
        "; not covered by Strict ({n} ports skipped by the pods' weft.dev/skip-inbound-ports: their traffic never passes the proxy, plaintext or not){more}: {}",
        named.join(", ")
    )
}

/// Names the plaintext sources no pod of the cluster holds, which do not
/// hold the rollout ("" when there are none). No counts, so that more of
/// the same rewrites nothing.
fn outside_note(outside: &[&PlaintextSource]) -> String {
    if outside.is_empty() {
        return String::new();
    }
    let mut all: Vec<String> = outside.iter().map(|p| describe(p)).collect();
    all.sort();
    all.dedup();
    let n = all.len();
    let (named, more) = capped(all);
    format!(
        "; ignored, as no pod of the cluster holds the address (STRICT will refuse it), {n} sources{more}: {}",
        named.join("; ")
    )
}

/// Observing, with the window starting at `now` on fresh counters.
fn window_starts(spec: &MTLSPolicySpec, now: SystemTime, event: bool) -> Decision {
    Decision {
        phase: RolloutPhase::Observing,
        since: now,
        blockers: Vec::new(),
        reason: reason::OBSERVING,
        message: window_message(spec),
        event,
        recount: true,
        requeue_after: spec.rollout.observation_window.as_std().min(RECHECK),
    }
}

fn window_message(spec: &MTLSPolicySpec) -> String {
    format!(
        "every pod is meshed and current; no plaintext so far (Enforcing after {} without any, counted from phaseSince)",
        spec.rollout.observation_window
    )
}

fn unready_proxies(evidence: &Evidence) -> Vec<String> {
    evidence
        .pods
        .iter()
        .filter(|p| p.running)
        .filter_map(|p| {
            let Some(proxy) = &p.proxy else {
                return Some(format!("pod {}: its proxy did not report", p.name));
            };
            if proxy.generation.as_deref() != Some(evidence.config_generation.as_str()) {
                return Some(format!(
                    "pod {} runs config {}, not {}",
                    p.name,
                    proxy.generation.as_deref().unwrap_or("(none)"),
                    evidence.config_generation
                ));
            }
            if !proxy.has_identity {
                return Some(format!("pod {} has no workload certificate yet", p.name));
            }
            if proxy.trust_bundle_hash.as_deref() != Some(evidence.trust_bundle_hash.as_str()) {
                return Some(format!(
                    "pod {} does not trust the current mesh CA yet",
                    p.name
                ));
            }
            None
        })
        .collect()
}

/// After a rollback: which pods still speak plaintext (what broke),
/// uncapped. An address no pod holds is not one of them.
fn current_blockers(evidence: &Evidence) -> Vec<String> {
    evidence
        .plaintext
        .iter()
        .filter(|p| p.connections > 0 && p.pod.is_some())
        .map(describe)
        .collect()
}

/// The source address a proxy reports for plaintext past its bound on
/// distinct addresses; a port past its bound on ports reads as port 0.
pub const OTHER_SOURCE: &str = "other";

fn describe(p: &PlaintextSource) -> String {
    if p.src_addr == OTHER_SOURCE || p.port == 0 {
        return "plaintext from more sources or to more ports than the proxy names (its `other` bucket)".to_owned();
    }
    let who = match (&p.pod, p.meshed) {
        (Some(pod), true) => format!("{} (pod {pod}, meshed)", p.src_addr),
        (Some(pod), false) => format!("{} (pod {pod})", p.src_addr),
        (None, _) => format!("{} (not a pod of the cluster)", p.src_addr),
    };
    // No connection count: it grows on every look, and a blocker that
    // changes on every look is a status write on every look.
    format!("plaintext from {who} to port {}", p.port)
}

/// At most [`MAX_BLOCKERS`], and " (N more not listed)" when cut.
fn capped(mut all: Vec<String>) -> (Vec<String>, String) {
    all.sort();
    let more = all.len().saturating_sub(MAX_BLOCKERS);
    all.truncate(MAX_BLOCKERS);
    let note = if more > 0 {
        format!(" ({more} more not listed)")
    } else {
        String::new()
    };
    (all, note)
}

#[cfg(test)]
mod tests;
