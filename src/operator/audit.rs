//! Learned least privilege: an AccessPolicy in mode `Audit` admits every
//! caller while its proxies count who called, where, and what the rules
//! would have done (`weft_proxy_access_audit_total`). This module holds the
//! pure parts the control plane runs over those counts
//! ([`super::audits`] is the loop that feeds them):
//!
//! - [`step`]: where the policy's move to Enforce stands. Switching an
//!   audited policy to `Enforce` is staged like the PERMISSIVE→STRICT
//!   rollout: the proxies keep auditing (phase `Observing`) until a whole
//!   observation window passes in which no caller outside the rules was
//!   seen, then enforce. A caller outside the rules puts the policy in
//!   `Blocked`, naming it, and the window starts again after each
//!   sighting. Everything it decides is read back from the status
//!   ([`current_of`]), so a restarted operator goes on from there.
//! - [`fold`]: the callers seen, folded into `status.observedCallers`.
//! - [`suggest`]: the least-privilege policy that admits exactly what was
//!   seen (`weft authz suggest`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::api::{
    AccessMode, AccessPolicy, AccessPolicySpec, AccessRule, AccessSource, AccessTargetKind,
    Enforcement, EnforcementPhase, HttpMethod, ObservedCaller, PathMatch, PathMatchType,
};
use crate::meshstats::{AuditKey, TICK, Tick};

/// Callers `status.observedCallers` keeps.
pub const MAX_OBSERVED: usize = 200;
/// Callers outside the rules `status.enforcement.unlisted` names.
pub const MAX_UNLISTED: usize = 20;
/// The caller of requests without a mesh identity.
pub const PLAINTEXT: &str = "plaintext";
/// The caller of requests past a proxy's bound on distinct series.
pub const OTHER: &str = crate::proxy::metrics::OTHER;

/// Where the move to Enforce stands, as the status says.
#[derive(Clone, Debug, PartialEq)]
pub struct Current {
    pub phase: EnforcementPhase,
    pub since: SystemTime,
    pub revision: Option<String>,
    pub unlisted: Vec<String>,
}

/// Reads [`Current`] back from a status.
pub fn current_of(e: &Enforcement) -> Current {
    Current {
        phase: e.phase,
        since: SystemTime::from(e.since.0),
        revision: e.revision.clone(),
        unlisted: e.unlisted.clone(),
    }
}

/// What the proxies guarding the target counted since the window began.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evidence {
    /// Requests the rules would have refused, by caller.
    pub refused: BTreeMap<String, f64>,
    /// The time the counts cover.
    pub covered: Duration,
    /// Why the counts cannot speak for the whole window, if so (a proxy
    /// of the namespace could not be read: what it counted meanwhile is
    /// lost).
    pub unreadable: Option<String>,
}

/// A step's outcome: the status to write and whether it is news.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub phase: EnforcementPhase,
    pub since: SystemTime,
    /// `Auditing`, `Observing`, `RulesChanged`, `NoEvidence`, `Blocked`,
    /// `Enforced`.
    pub reason: &'static str,
    pub message: String,
    pub unlisted: Vec<String>,
    /// An Event is due (a change of phase, or new callers blocking).
    pub event: bool,
    pub warning: bool,
}

impl Decision {
    /// The status this decision writes.
    pub fn status(&self, revision: &str) -> Enforcement {
        Enforcement {
            phase: self.phase,
            since: Time(k8s_openapi::jiff::Timestamp::try_from(self.since).unwrap_or_default()),
            revision: Some(revision.to_owned()),
            message: self.message.clone(),
            unlisted: self.unlisted.clone(),
        }
    }
}

/// The next state of a policy in `mode` whose rules hash to `revision`,
/// from where its status says it stands and what the proxies counted
/// since `current.since`. `None`: nothing to hold (a policy in Enforce
/// that never audited enforces, with no `status.enforcement`).
pub fn step(
    mode: AccessMode,
    window: Duration,
    revision: &str,
    current: Option<&Current>,
    evidence: &Evidence,
    now: SystemTime,
) -> Option<Decision> {
    let decision = |phase, since, reason, message: String, unlisted: Vec<String>| {
        let event = current.is_none_or(|c| c.phase != phase)
            || reason == "RulesChanged"
            || unlisted
                .iter()
                .any(|u| !current.is_some_and(|c| c.unlisted.contains(u)));
        Decision {
            phase,
            since,
            reason,
            message,
            unlisted,
            event,
            warning: phase == EnforcementPhase::Blocked,
        }
    };
    let window_text =
        crate::api::Duration::from_millis(u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
            .to_string();
    if mode == AccessMode::Audit {
        let since = current
            .filter(|c| c.phase == EnforcementPhase::Auditing)
            .map_or(now, |c| c.since);
        return Some(decision(
            EnforcementPhase::Auditing,
            since,
            "Auditing",
            "every caller is admitted; the callers seen are in status.observedCallers (weft authz suggest prints the policy that admits exactly them); set mode: Enforce to start the move".to_owned(),
            Vec::new(),
        ));
    }
    let current = current?;
    let enforced = |reason, message: String| {
        Some(decision(
            EnforcementPhase::Enforced,
            now,
            reason,
            message,
            Vec::new(),
        ))
    };
    let observing = |reason, message: String| {
        Some(decision(
            EnforcementPhase::Observing,
            now,
            reason,
            message,
            Vec::new(),
        ))
    };
    match current.phase {
        EnforcementPhase::Enforced => Some(Decision {
            event: false,
            ..decision(
                EnforcementPhase::Enforced,
                current.since,
                "Enforced",
                "the rules are enforced".to_owned(),
                Vec::new(),
            )
        }),
        EnforcementPhase::Auditing if window.is_zero() => enforced(
            "Enforced",
            "the rules are enforced (observationWindow 0s: without watching)".to_owned(),
        ),
        EnforcementPhase::Auditing => observing(
            "Observing",
            format!(
                "still auditing: the rules are enforced after {window_text} in which no caller outside them is seen"
            ),
        ),
        // The way forward when callers no rule can admit keep coming
        // (plaintext ones): enforce regardless.
        EnforcementPhase::Observing | EnforcementPhase::Blocked if window.is_zero() => enforced(
            "Enforced",
            "the rules are enforced (observationWindow 0s: without watching)".to_owned(),
        ),
        EnforcementPhase::Observing | EnforcementPhase::Blocked
            if current.revision.as_deref() != Some(revision) =>
        {
            observing(
                "RulesChanged",
                format!("the rules changed: the {window_text} window starts again"),
            )
        }
        EnforcementPhase::Observing | EnforcementPhase::Blocked => {
            if !evidence.refused.is_empty() {
                let mut seen: Vec<(&String, &f64)> = evidence.refused.iter().collect();
                seen.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
                let mut listed: Vec<String> = seen
                    .iter()
                    .take(MAX_UNLISTED)
                    .map(|(caller, n)| format!("{caller} ({n:.0})"))
                    .collect();
                if seen.len() > MAX_UNLISTED {
                    listed.push(format!("and {} more", seen.len() - MAX_UNLISTED));
                }
                let hopeless = seen
                    .iter()
                    .any(|(c, _)| c.as_str() == PLAINTEXT || c.as_str() == OTHER);
                let way = if hopeless {
                    "; no rule can admit plaintext callers (mesh them) nor `other` ones (callers a proxy could not name): set observationWindow: 0s to enforce regardless"
                } else {
                    ""
                };
                // By name, so that callers trading places in the counts
                // are not news.
                let mut unlisted: Vec<String> = seen
                    .iter()
                    .take(MAX_UNLISTED)
                    .map(|(c, _)| (*c).clone())
                    .collect();
                unlisted.sort();
                return Some(decision(
                    EnforcementPhase::Blocked,
                    now,
                    "Blocked",
                    format!(
                        "callers outside the rules were seen (requests in the window): {}; admit them in rules, or stop them calling; the {window_text} window starts again after the last sighting{way}",
                        listed.join(", ")
                    ),
                    unlisted,
                ));
            }
            // Checked after the callers seen, which are named whatever
            // else is lost.
            if let Some(why) = &evidence.unreadable {
                return Some(Decision {
                    event: false,
                    ..decision(
                        current.phase,
                        now,
                        "NoEvidence",
                        format!(
                            "{why}: what it counted is lost, so the {window_text} window starts again"
                        ),
                        current.unlisted.clone(),
                    )
                });
            }
            let elapsed = now.duration_since(current.since).unwrap_or_default();
            // The counts begin at the first tick after the window did.
            let slack = TICK.min(window / 2);
            if elapsed >= window && evidence.covered + slack >= window {
                return enforced(
                    "Enforced",
                    format!(
                        "no caller outside the rules for {window_text}: the rules are enforced"
                    ),
                );
            }
            let left = window.saturating_sub(elapsed.min(evidence.covered + slack));
            Some(Decision {
                event: false,
                ..decision(
                    current.phase,
                    current.since,
                    if current.phase == EnforcementPhase::Blocked {
                        "Blocked"
                    } else {
                        "Observing"
                    },
                    format!(
                        "still auditing: no caller outside the rules so far; enforced in {}s unless one appears",
                        left.as_secs()
                    ),
                    current.unlisted.clone(),
                )
            })
        }
    }
}

/// Whether a count belongs to `policy` (`ns/name`): counted by the
/// proxy of one of `pods` (any of the namespace's when `None`) of the
/// policy's own namespace, so no proxy elsewhere speaks for it. Pods are
/// the control plane's word, never the proxy's.
fn counts_for(k: &AuditKey, ns: &str, policy: &str, pods: Option<&BTreeSet<String>>) -> bool {
    k.namespace == ns && k.policy == policy && pods.is_none_or(|p| p.contains(&k.pod))
}

/// The [`Evidence`] for `policy` of namespace `ns` under the rules at
/// `revision`, counted by the proxies of `pods` (every pod of `ns` when
/// `None`), in a window that began at `since`: `ticks` are those
/// touching it ([`crate::meshstats::MeshStats::touching`]). A caller
/// counted in the tick that straddles the window's start counts (it may
/// have called after the start: holding back is the safe side); that
/// tick's time does not count as covered. Refusals under other rules (a
/// proxy that has not yet loaded the rules the window is for) do not
/// count.
pub fn evidence(
    ticks: &[std::sync::Arc<Tick>],
    since: SystemTime,
    ns: &str,
    policy: &str,
    revision: &str,
    pods: Option<&BTreeSet<String>>,
) -> Evidence {
    let covered: f64 = ticks
        .iter()
        .filter(|t| {
            t.at.and_then(|at| at.checked_sub(Duration::from_secs_f64(t.seconds)))
                .is_some_and(|began| began >= since)
        })
        .map(|t| t.seconds)
        .sum();
    let mut out = Evidence {
        covered: Duration::from_secs_f64(covered),
        ..Evidence::default()
    };
    let lost: BTreeSet<&str> = ticks
        .iter()
        .flat_map(|t| &t.unreadable_pods)
        .filter(|(pod_ns, pod)| pod_ns == ns && pods.is_none_or(|p| p.contains(pod)))
        .map(|(_, pod)| pod.as_str())
        .collect();
    if !lost.is_empty() {
        out.unreadable = Some(format!(
            "the proxy of {} could not be read since the window began",
            lost.into_iter()
                .map(|p| format!("{ns}/{p}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for t in ticks {
        for (k, n) in &t.counts.audit {
            if !k.admitted && k.rules == revision && counts_for(k, ns, policy, pods) {
                *out.refused.entry(k.src.clone()).or_default() += n;
            }
        }
    }
    out
}

/// Folds the audit counts of `ticks` for `policy` (whose rules are now at
/// `revision`), counted by the
/// proxies of `pods`, into the callers seen so far: one entry per
/// caller, port, method and path segment, at most [`MAX_OBSERVED`]: each
/// caller's busiest entry first (so a caller with many shapes cannot
/// push the others out), then the rest by requests. The number of
/// entries left out is returned too. `port_of` turns the container port
/// a proxy counted into the port the policy speaks of.
pub fn fold(
    seen: &[ObservedCaller],
    ticks: &[std::sync::Arc<Tick>],
    ns: &str,
    policy: &str,
    revision: &str,
    pods: Option<&BTreeSet<String>>,
    port_of: impl Fn(u16) -> Option<u16>,
) -> (Vec<ObservedCaller>, u64) {
    type Key = (String, Option<u16>, Option<HttpMethod>, Option<String>);
    let mut all: BTreeMap<Key, ObservedCaller> = seen
        .iter()
        .map(|c| {
            (
                (c.caller.clone(), c.port, c.method, c.path_prefix.clone()),
                c.clone(),
            )
        })
        .collect();
    // Oldest first, so that the newest verdict is the one kept.
    for t in ticks.iter().rev() {
        let at = Time(
            k8s_openapi::jiff::Timestamp::try_from(t.at.unwrap_or(SystemTime::UNIX_EPOCH))
                .unwrap_or_default(),
        );
        for (k, n) in &t.counts.audit {
            if !counts_for(k, ns, policy, pods) {
                continue;
            }
            let port = k.port.parse::<u16>().ok().and_then(&port_of);
            let method = HttpMethod::from_name(&k.method);
            let path = Some(k.path.clone()).filter(|p| p.starts_with('/'));
            let entry = all
                .entry((k.src.clone(), port, method, path.clone()))
                .or_insert_with(|| ObservedCaller {
                    caller: k.src.clone(),
                    port,
                    method,
                    path_prefix: path,
                    requests: 0,
                    admitted: k.admitted,
                    last_seen: at.clone(),
                });
            entry.requests = entry.requests.saturating_add(n.round() as u64);
            // The verdict of the rules in force wins over an older one's.
            if k.rules == revision || entry.requests == n.round() as u64 {
                entry.admitted = k.admitted;
            }
            entry.last_seen = at.clone();
        }
    }
    let mut out: Vec<ObservedCaller> = all.into_values().collect();
    out.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.caller.cmp(&b.caller)));
    let dropped = out.len().saturating_sub(MAX_OBSERVED) as u64;
    if dropped > 0 {
        // Each caller's busiest entry is kept before anyone's second.
        let mut firsts = BTreeSet::new();
        let (mut kept, mut rest): (Vec<_>, Vec<_>) = out
            .into_iter()
            .partition(|c| firsts.insert(c.caller.clone()));
        kept.truncate(MAX_OBSERVED);
        rest.truncate(MAX_OBSERVED - kept.len());
        kept.extend(rest);
        kept.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.caller.cmp(&b.caller)));
        out = kept;
    }
    (out, dropped)
}

/// The least-privilege AccessPolicy that admits exactly the callers
/// `policy`'s status says were seen (by caller, port, method and first
/// path segment), in mode Enforce, and notes on what it cannot admit or
/// had to widen.
pub fn suggest(policy: &AccessPolicy) -> Result<(AccessPolicy, Vec<String>), String> {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let status = policy.status.clone().unwrap_or_default();
    if status.observed_callers.is_empty() {
        return Err(format!(
            "AccessPolicy {ns}/{name} has seen no caller yet: set spec.mode: Audit and let traffic flow; status.observedCallers fills in within a minute"
        ));
    }
    let mut notes = Vec::new();
    if let Some(n) = status.observed_callers_dropped.filter(|n| *n > 0) {
        notes.push(format!(
            "{n} of what was seen (caller, port, method, path) did not fit the {MAX_OBSERVED} entries the status keeps: those are not admitted"
        ));
    }
    // (caller, port) -> path segment (None: any) -> methods (None: any).
    type Seen = BTreeMap<Option<String>, BTreeSet<Option<HttpMethod>>>;
    let mut by_caller: BTreeMap<(String, Option<u16>), Seen> = BTreeMap::new();
    for c in &status.observed_callers {
        if c.caller == PLAINTEXT || c.caller == OTHER || !c.caller.contains('/') {
            notes.push(format!(
                "{} requests from {} on {}: no rule can admit {}",
                c.requests,
                c.caller,
                c.port.map_or("a port".to_owned(), |p| format!("port {p}")),
                if c.caller == PLAINTEXT {
                    "a caller without a mesh identity (mesh it)"
                } else {
                    "callers a proxy could not name (it saw too many distinct ones)"
                }
            ));
            continue;
        }
        by_caller
            .entry((c.caller.clone(), c.port))
            .or_default()
            .entry(c.path_prefix.clone())
            .or_default()
            .insert(c.method);
    }
    // (ports, paths, methods) -> callers: one rule each.
    type Shape = (Vec<u16>, Vec<String>, Vec<HttpMethod>);
    let mut shapes: BTreeMap<Shape, BTreeSet<String>> = BTreeMap::new();
    for ((caller, port), paths) in by_caller {
        let ports: Vec<u16> = port.into_iter().collect();
        // A connection or a path no segment names: any path, any method.
        if paths.contains_key(&None) {
            notes.push(format!(
                "{caller}{}: admitted on every path and method (it was seen on an opaque TCP port, or on paths the proxies did not name one by one)",
                port.map_or(String::new(), |p| format!(" on port {p}"))
            ));
            let methods = any_or_all(paths.values().flatten().copied());
            shapes
                .entry((ports, Vec::new(), methods))
                .or_default()
                .insert(caller);
            continue;
        }
        // Segments grouped by the methods seen on them: exact.
        let mut by_methods: BTreeMap<Vec<HttpMethod>, Vec<String>> = BTreeMap::new();
        for (path, methods) in paths {
            if methods.contains(&None) {
                notes.push(format!(
                    "{caller}{} used a method outside the standard ones on {}: any method is admitted there",
                    port.map_or(String::new(), |p| format!(" on port {p}")),
                    path.as_deref().unwrap_or("a path")
                ));
            }
            let methods = any_or_all(methods.into_iter());
            by_methods.entry(methods).or_default().extend(path);
        }
        for (methods, mut paths) in by_methods {
            if paths.len() > 32 {
                notes.push(format!(
                    "{caller} called {} path segments{}: more than a rule lists, so any path is admitted",
                    paths.len(),
                    port.map_or(String::new(), |p| format!(" on port {p}"))
                ));
                paths.clear();
            }
            shapes
                .entry((ports.clone(), paths, methods))
                .or_default()
                .insert(caller.clone());
        }
    }
    let mut rules = Vec::new();
    for ((ports, paths, methods), callers) in shapes {
        let from: Vec<AccessSource> = callers.iter().map(|c| source(c, &ns)).collect();
        for from in from.chunks(64) {
            rules.push(AccessRule {
                from: from.to_vec(),
                ports: ports.clone(),
                paths: paths
                    .iter()
                    .map(|p| PathMatch {
                        // `/` is the root itself (a first segment of
                        // nothing); as a prefix it would admit every path.
                        type_: if p == "/" {
                            PathMatchType::Exact
                        } else {
                            PathMatchType::PathPrefix
                        },
                        value: p.clone(),
                    })
                    .collect(),
                methods: methods.clone(),
            });
        }
    }
    if rules.len() > 64 {
        return Err(format!(
            "what AccessPolicy {ns}/{name} saw needs {} rules, more than the 64 a policy holds: write the rules by hand, broader (a namespace as a source admits all its accounts; fewer paths)",
            rules.len()
        ));
    }
    if !policy.spec.rules.is_empty() {
        notes.push(format!(
            "the policy's {} rules are not carried over: a caller they admit that was not seen while auditing is refused by this one",
            policy.spec.rules.len()
        ));
    }
    let mut out = AccessPolicy::new(
        &name,
        AccessPolicySpec {
            target_ref: policy.spec.target_ref.clone(),
            rules,
            mode: AccessMode::Enforce,
            observation_window: policy.spec.observation_window,
        },
    );
    out.metadata.namespace = Some(ns);
    if policy.spec.target_ref.kind == AccessTargetKind::Service
        && status.observed_callers.iter().any(|c| c.port.is_none())
    {
        notes.push(
            "some requests came on a container port no Service port names: those rules admit every port of the Service".to_owned(),
        );
    }
    Ok((out, notes))
}

/// The methods of a rule admitting exactly `seen`: empty (any) when a
/// connection or an extension method was among them.
fn any_or_all(seen: impl Iterator<Item = Option<HttpMethod>>) -> Vec<HttpMethod> {
    let mut out = BTreeSet::new();
    for m in seen {
        match m {
            Some(m) => {
                out.insert(m);
            }
            None => return Vec::new(),
        }
    }
    out.into_iter().collect()
}

/// `ns/sa` as a rule's source; the namespace is left out when it is the
/// policy's own.
fn source(caller: &str, policy_ns: &str) -> AccessSource {
    let (ns, sa) = caller.split_once('/').unwrap_or((policy_ns, caller));
    AccessSource {
        service_account: Some(sa.to_owned()),
        namespace: (ns != policy_ns).then(|| ns.to_owned()),
    }
}

#[cfg(test)]
mod tests;
