//! AccessPolicy: who may call what. A target with no policy admits every
//! caller; once a policy selects it, only what a rule allows. The same
//! rules decide which Services a namespace's config lists at all: a Service
//! that admits none of a namespace's identities is left out of its config.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use super::policy::summarize;
use super::verdict::{PolicyKind, Verdicts};
use super::{ClusterFacts, ServiceKey, age_order};
use crate::api::conditions::reason;
use crate::api::{AccessPolicy, AccessTargetKind, INJECT_ENABLED, INJECT_LABEL};
use crate::config::{AccessRuleConfig, Authorization, IdentityMatch, PathMatchConfig, PortRef};

/// Every namespace has this ServiceAccount without anyone creating it.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A winning AccessPolicy, compiled.
struct Guard {
    /// Every identity any rule admits, for reachability.
    sources: Vec<IdentityMatch>,
    authorization: Authorization,
}

/// The guards in force, by target.
#[derive(Default)]
pub(crate) struct Guards {
    services: HashMap<ServiceKey, Guard>,
    namespaces: HashMap<String, Guard>,
    /// Winning policies by namespace, for `Programmed`.
    placed: Vec<(String, String, bool)>,
}

impl Guards {
    /// Whether some identity of `client_ns` is admitted by the Service's
    /// guard (its own policy, else its namespace's).
    pub(crate) fn may_reach(
        &self,
        client_ns: &str,
        client_accounts: &BTreeSet<String>,
        key: &ServiceKey,
    ) -> bool {
        let admits = |guard: &Guard| {
            guard.sources.iter().any(|s| {
                s.namespace == client_ns
                    && s.service_account.as_deref().is_none_or(|sa| {
                        sa == DEFAULT_SERVICE_ACCOUNT || client_accounts.contains(sa)
                    })
            })
        };
        let namespace = self
            .namespaces
            .get(&key.0)
            .filter(|g| !g.authorization.audit);
        match self.services.get(key) {
            Some(guard) if !guard.authorization.audit => admits(guard),
            // An auditing Service guard admits what its own rules or the
            // namespace's guard admit (as the proxy does).
            Some(guard) => namespace.is_none_or(|ns| admits(ns) || admits(guard)),
            // An auditing namespace guard admits everyone.
            None => namespace.is_none_or(admits),
        }
    }

    /// The inbound authorizations of a namespace's workloads: Service-level
    /// ones first (by Service name), the namespace-wide one last, as the
    /// fallback for ports no Service guard covers.
    pub(crate) fn authorizations(&self, ns: &str) -> Vec<Authorization> {
        let mut out: Vec<&Guard> = self
            .services
            .iter()
            .filter(|(k, _)| k.0 == ns)
            .map(|(_, g)| g)
            .collect();
        out.sort_by(|a, b| a.authorization.service.cmp(&b.authorization.service));
        out.extend(self.namespaces.get(ns));
        out.into_iter().map(|g| g.authorization.clone()).collect()
    }
}

/// Resolves every AccessPolicy: conflicts, targets, identities and ports.
pub(crate) fn resolve(
    facts: &ClusterFacts,
    services: &BTreeMap<ServiceKey, &Service>,
    verdicts: &mut Verdicts,
) -> Guards {
    let mut sorted: Vec<&AccessPolicy> = facts.access_policies.iter().collect();
    sorted.sort_by(|a, b| age_order(*a, *b));
    let mut guards = Guards::default();
    let mut winners: HashMap<(String, Option<String>), String> = HashMap::new();
    for policy in sorted {
        let ns = policy.namespace().unwrap_or_default();
        let target = &policy.spec.target_ref;
        let service_name = match target.kind {
            AccessTargetKind::Service => target.name.clone(),
            AccessTargetKind::Namespace => None,
        };
        let what = match &service_name {
            Some(s) => format!("Service {ns}/{s}"),
            None => format!("namespace {ns}"),
        };
        let mut v = verdicts.start(PolicyKind::AccessPolicy, policy);
        let slot = (ns.clone(), service_name.clone());
        if let Some(winner) = winners.get(&slot) {
            v.conflict(format!(
                "AccessPolicy {ns}/{winner} is older and already guards {what}; merge their rules into one policy"
            ));
            verdicts.push(v);
            continue;
        }
        v.accept();
        let service = match &service_name {
            Some(name) => match services.get(&(ns.clone(), name.clone())) {
                Some(svc) => Some(*svc),
                None => {
                    v.unresolved(
                        reason::TARGET_NOT_FOUND,
                        format!("{what} not found; nothing is enforced until it exists"),
                    );
                    verdicts.push(v);
                    continue;
                }
            },
            None => None,
        };
        winners.insert(slot, policy.name_any());
        v.resolved();
        let port_map = service.map(target_ports).unwrap_or_default();
        let mut problems = Vec::new();
        let rules: Vec<AccessRuleConfig> = policy
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let identities = identities(&rule.from, &ns);
                let ports = match service {
                    // A Service target names the Service's ports: the proxy
                    // sees the container port they forward to.
                    Some(_) => rule
                        .ports
                        .iter()
                        .filter_map(|p| {
                            let found = port_map.get(p).cloned();
                            if found.is_none() {
                                problems.push(format!(
                                    "rules[{i}].ports: Service {ns}/{} has no port {p}",
                                    service_name.as_deref().unwrap_or_default()
                                ));
                            }
                            found
                        })
                        .collect(),
                    None => rule.ports.iter().map(|p| PortRef::Number(*p)).collect(),
                };
                AccessRuleConfig {
                    identities,
                    ports,
                    paths: rule
                        .paths
                        .iter()
                        .map(|p| PathMatchConfig {
                            type_: p.type_,
                            value: p.value.clone(),
                        })
                        .collect(),
                    methods: rule.methods.clone(),
                }
            })
            .collect();
        if !problems.is_empty() {
            v.reject(
                reason::INVALID,
                format!(
                    "{}; those rules admit nothing on the missing ports",
                    problems.join("; ")
                ),
            );
        }
        let mut sources: Vec<IdentityMatch> = rules
            .iter()
            .flat_map(|r| r.identities.iter().cloned())
            .collect();
        sources.sort();
        sources.dedup();
        let mut guarded: Vec<PortRef> = port_map.into_values().collect();
        guarded.sort();
        guarded.dedup();
        let guard = Guard {
            sources,
            authorization: Authorization {
                policy: format!("{ns}/{}", policy.name_any()),
                service: service_name.clone(),
                selector: service
                    .and_then(|svc| svc.spec.as_ref()?.selector.clone())
                    .filter(|sel| !sel.is_empty()),
                ports: guarded,
                rules,
                audit: policy.audits(),
                revision: if policy.audits() {
                    policy.rules_revision()
                } else {
                    String::new()
                },
            },
        };
        guards
            .placed
            .push((ns.clone(), policy.name_any(), guard.authorization.audit));
        match service_name {
            Some(name) => guards.services.insert((ns, name), guard),
            None => guards.namespaces.insert(ns, guard),
        };
        verdicts.push(v);
    }
    guards
}

/// The callers `from` names, each sorted and once: a ServiceAccount
/// without a namespace is in `ns`, the policy's own.
pub(crate) fn identities(from: &[crate::api::AccessSource], ns: &str) -> Vec<IdentityMatch> {
    let mut out: Vec<IdentityMatch> = from
        .iter()
        .map(|src| IdentityMatch {
            namespace: src.namespace.clone().unwrap_or_else(|| ns.to_owned()),
            service_account: src.service_account.clone(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Service port -> the container port it forwards to.
fn target_ports(svc: &Service) -> BTreeMap<u16, PortRef> {
    super::tcp_ports(svc)
        .map(|(_, port, target)| (port, target))
        .collect()
}

/// `Programmed`: an AccessPolicy is enforced by the proxies of its own
/// namespace, so it is programmed exactly when that namespace is meshed.
pub(crate) fn mark_programmed(guards: &Guards, verdicts: &mut Verdicts, meshed: &BTreeSet<String>) {
    for (ns, name, audit) in &guards.placed {
        let Some(v) = verdicts.get_mut(PolicyKind::AccessPolicy, ns, name) else {
            continue;
        };
        if meshed.contains(ns) {
            let how = if *audit {
                "audited (callers admitted, refusals counted)"
            } else {
                "enforced"
            };
            v.programmed(format!(
                "{how} by the proxies of {}",
                summarize(&[ns.as_str()])
            ));
        } else {
            v.not_programmed(
                reason::NAMESPACE_NOT_MESHED,
                format!("namespace {ns} is not labelled {INJECT_LABEL}={INJECT_ENABLED}: no proxy enforces this policy, so every caller is still admitted"),
            );
        }
    }
}
