//! TrafficPolicy and ServiceRoute: from specs to the resolved per-Service
//! policy and routes of the proxy config, with every default filled in so
//! the proxy never guesses.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use super::verdict::{PolicyKind, Verdicts};
use super::{ClusterFacts, ServiceKey, age_order};
use crate::api::conditions::reason;
use crate::api::{
    HttpMethod, LoadBalancerAlgorithm, PolicyTargetKind, RateLimitScope, RetryBudget, RetryOn,
    RetryPolicy, ServiceRoute, TrafficPolicy,
};
use crate::api::{INJECT_ENABLED, INJECT_LABEL};
use crate::config::{
    CircuitBreakerConfig, ExternalServiceConfig, FailureRateConfig, IDEMPOTENCY_HEADER,
    InboundRateLimitConfig, MatchConfig, PathMatchConfig, PortRef, ProxyConfig, RateLimitConfig,
    RateOverrideConfig, RequestRateConfig, RetryAfterConfig, RetryBudgetConfig, RetryConfig,
    RouteConfig, RouteRateConfig, ServicePolicy, SharedLimitConfig, WeightedBackend,
};

/// Backoff when a policy sets none: 25ms doubling to 250ms.
const DEFAULT_BACKOFF_MS: (u64, u64) = (25, 250);

/// The policy of a Service no TrafficPolicy targets: no deadline, and one
/// retry of a connection that could not be made (such a request never left,
/// so retrying it is safe for any method).
pub fn default_service_policy() -> ServicePolicy {
    ServicePolicy {
        source: None,
        timeout_ms: None,
        retry: RetryConfig {
            max_retries: 1,
            retry_on: vec![RetryOn::ConnectFailure],
            ..retry_config(None)
        },
        circuit_breaker: None,
        rate_limit: None,
        retry_after: None,
        load_balancer: LoadBalancerAlgorithm::PeakEwma,
        zone_affinity: None,
        excluded_paths: Vec::new(),
        cache: None,
    }
}

/// The proxy's zone-aware routing settings.
pub fn zone_affinity(z: &crate::api::ZoneAffinity) -> crate::config::ZoneAffinityConfig {
    crate::config::ZoneAffinityConfig {
        min_healthy_percent: z.min_healthy_percent.clamp(1, 100),
    }
}

/// Retries with defaults filled in: idempotent methods only (plus any
/// request carrying `Idempotency-Key`), a budget of 20 % of requests plus
/// 10 retries/s, backoff 25ms..250ms.
pub fn retry_config(policy: Option<&RetryPolicy>) -> RetryConfig {
    let default_policy;
    let r = match policy {
        Some(r) => r,
        None => {
            default_policy = serde_json::from_value::<RetryPolicy>(serde_json::json!({}))
                .unwrap_or_else(|e| unreachable!("RetryPolicy defaults deserialise: {e}"));
            &default_policy
        }
    };
    let mut retry_on = r.retry_on.clone();
    retry_on.sort();
    retry_on.dedup();
    let mut status_codes = r.status_codes.clone();
    status_codes.sort_unstable();
    status_codes.dedup();
    let mut methods: Vec<HttpMethod> = r
        .methods
        .clone()
        .unwrap_or_else(|| HttpMethod::IDEMPOTENT.to_vec());
    methods.sort();
    methods.dedup();
    let budget = r.budget.clone().unwrap_or_else(RetryBudget::default);
    let (base, max) = r
        .backoff
        .as_ref()
        .map(|b| (b.base.as_millis(), b.max.as_millis()))
        .unwrap_or(DEFAULT_BACKOFF_MS);
    RetryConfig {
        max_retries: r.attempts,
        per_try_timeout_ms: r.per_try_timeout.map(|d| d.as_millis()),
        retry_on,
        status_codes,
        methods,
        idempotency_header: IDEMPOTENCY_HEADER.to_owned(),
        budget: RetryBudgetConfig {
            percent: budget.percent,
            min_per_second: budget.min_retries_per_second,
            window_ms: budget.window.as_millis(),
        },
        backoff_base_ms: base,
        backoff_max_ms: max,
    }
}

fn service_policy(tp: &TrafficPolicy) -> ServicePolicy {
    let spec = &tp.spec;
    let excluded_paths = sorted_set(&spec.excluded_paths);
    ServicePolicy {
        source: Some(format!(
            "{}/{}",
            tp.namespace().unwrap_or_default(),
            tp.name_any()
        )),
        timeout_ms: spec.timeout.map(|d| d.as_millis()),
        retry: match &spec.retries {
            Some(r) => retry_config(Some(r)),
            None => default_service_policy().retry,
        },
        circuit_breaker: spec
            .circuit_breaker
            .as_ref()
            .map(|cb| CircuitBreakerConfig {
                consecutive_failures: cb.consecutive_failures,
                failure_rate: cb.failure_rate.as_ref().map(|fr| FailureRateConfig {
                    percent: fr.percent,
                    min_requests: fr.min_requests,
                    window_ms: fr.window.as_millis(),
                }),
                open_ms: cb.open_duration.as_millis(),
                max_open_ms: cb.max_open_duration.as_millis(),
            }),
        rate_limit: spec.rate_limit.as_ref().map(|rl| RateLimitConfig {
            requests_per_second: rl.requests_per_second,
            burst: rl.burst.unwrap_or(rl.requests_per_second),
            shared: (rl.scope == RateLimitScope::Namespace).then(|| SharedLimitConfig {
                // Names of the calling namespace's accounts: meaningful
                // for an ExternalService only (the CRD refuses them for a
                // Service; a cluster with older CRDs may still hold some,
                // which would leave every caller with no share).
                service_accounts: if spec.target_ref.kind == PolicyTargetKind::ExternalService {
                    rl.service_accounts.clone()
                } else {
                    Vec::new()
                },
            }),
        }),
        retry_after: spec.retry_after.as_ref().map(|ra| RetryAfterConfig {
            max_wait_ms: ra.max_wait.as_millis(),
            max_queued: ra.max_queued,
            max_back_off_ms: ra.max_back_off.as_millis(),
        }),
        load_balancer: spec
            .load_balancer
            .as_ref()
            .map(|lb| lb.algorithm)
            .unwrap_or_default(),
        zone_affinity: spec
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.prefer_same_zone.as_ref())
            .map(zone_affinity),
        excluded_paths,
        cache: spec.cache.as_ref().map(cache_config),
    }
}

/// Each once, in order: a list the CRD declares a set.
fn sorted_set(items: &[String]) -> Vec<String> {
    let mut out = items.to_vec();
    out.sort();
    out.dedup();
    out
}

/// The proxy's cache settings: one entry per path prefix, in order, and
/// the object cap kept within the store (a CRD older than the rule may
/// hold a larger one).
fn cache_config(c: &crate::api::ResponseCache) -> crate::config::CacheConfig {
    let paths = sorted_set(&c.paths);
    let max_bytes = u64::from(c.max_bytes);
    crate::config::CacheConfig {
        max_bytes,
        max_object_bytes: u64::from(c.max_object_bytes).min(max_bytes / 4),
        paths,
        stale_if_error_ms: c.stale_if_error.map(|d| d.as_millis()),
        stale_while_revalidate_ms: c.stale_while_revalidate.map(|d| d.as_millis()),
    }
}

/// What policies of one kind target: Services, or ExternalServices.
struct Targets<'a> {
    /// The kind, for messages.
    kind: &'static str,
    /// Said after "not found".
    missing: &'static str,
    exists: &'a dyn Fn(&ServiceKey) -> bool,
    /// Whether `Programmed` waits for the configs (a Service is in the
    /// configs of the namespaces that may reach it); else the accept step
    /// decides it.
    placed: bool,
}

impl<'a> Targets<'a> {
    /// Services, which are in the configs of the namespaces that may
    /// reach them.
    fn services(exists: &'a dyn Fn(&ServiceKey) -> bool) -> Self {
        Self {
            kind: "Service",
            missing: "",
            exists,
            placed: true,
        }
    }
}

/// Orders policies by age, resolves each target and settles conflicts.
/// Calls `accept` for each winner and returns what it produced per target.
fn resolve<P, T>(
    kind: PolicyKind,
    policies: &[&P],
    targets: Targets<'_>,
    verdicts: &mut Verdicts,
    target_name: impl Fn(&P) -> &str,
    mut accept: impl FnMut(&P, &mut super::verdict::PolicyVerdict) -> T,
) -> HashMap<ServiceKey, T>
where
    P: kube::Resource,
{
    let what = targets.kind;
    let mut sorted: Vec<&P> = policies.to_vec();
    sorted.sort_by(|a, b| age_order(*a, *b));
    let mut winners: HashMap<ServiceKey, String> = HashMap::new();
    let mut out = HashMap::new();
    for policy in sorted {
        let ns = policy.namespace().unwrap_or_default();
        let key: ServiceKey = (ns.clone(), target_name(policy).to_owned());
        let mut v = verdicts.start(kind, policy);
        if let Some(winner) = winners.get(&key) {
            v.conflict(format!(
                "{kind:?} {ns}/{winner} is older and already targets {what} {ns}/{}; merge the two or delete one",
                key.1
            ));
            verdicts.push(v);
            continue;
        }
        v.accept();
        if !(targets.exists)(&key) {
            v.unresolved(
                reason::TARGET_NOT_FOUND,
                format!(
                    "{what} {ns}/{} not found{}; nothing is applied until it exists",
                    key.1, targets.missing
                ),
            );
            verdicts.push(v);
            continue;
        }
        winners.insert(key.clone(), policy.name_any());
        v.resolved();
        let produced = accept(policy, &mut v);
        if targets.placed {
            verdicts.placed(kind, &ns, &policy.name_any(), key.clone());
        }
        verdicts.push(v);
        out.insert(key, produced);
    }
    out
}

/// The TrafficPolicies of Services, and of ExternalServices (an
/// accepted one of a meshed namespace is in that namespace's config, so
/// its policy is programmed there; see [`super::external`]).
pub(crate) fn resolve_traffic(
    facts: &ClusterFacts,
    services: &BTreeMap<ServiceKey, &Service>,
    externals: &BTreeMap<ServiceKey, ExternalServiceConfig>,
    meshed: &BTreeSet<String>,
    verdicts: &mut Verdicts,
) -> Traffic {
    let (external, service): (Vec<&TrafficPolicy>, Vec<&TrafficPolicy>) = facts
        .traffic_policies
        .iter()
        .partition(|tp| tp.spec.target_ref.kind == PolicyTargetKind::ExternalService);
    let of_services = resolve(
        PolicyKind::TrafficPolicy,
        &service,
        Targets::services(&|k| services.contains_key(k)),
        verdicts,
        |tp| tp.spec.target_ref.name.as_str(),
        |tp, _| {
            let key = (
                tp.namespace().unwrap_or_default(),
                tp.spec.target_ref.name.clone(),
            );
            let inbound = services
                .get(&key)
                .and_then(|svc| inbound_rate_limit(tp, svc));
            (service_policy(tp), inbound)
        },
    );
    let mut inbound = HashMap::new();
    let mut inbound_notes = HashMap::new();
    let of_services = of_services
        .into_iter()
        .map(|(key, (policy, limit))| {
            match limit {
                Some(Placed::On(limit, note)) => {
                    inbound.insert(key.clone(), limit);
                    if let Some(note) = note {
                        inbound_notes.insert(key.clone(), note);
                    }
                }
                Some(Placed::Nowhere(why)) => {
                    inbound_notes.insert(key.clone(), why);
                }
                None => {}
            }
            (key, policy)
        })
        .collect();
    let of_externals = resolve(
        PolicyKind::TrafficPolicy,
        &external,
        Targets {
            kind: "ExternalService",
            missing: " (or not accepted: see its status)",
            exists: &|k| externals.contains_key(k),
            placed: false,
        },
        verdicts,
        |tp| tp.spec.target_ref.name.as_str(),
        |tp, v| {
            let ns = tp.namespace().unwrap_or_default();
            // A ServiceAccount named for a shared limit that does not
            // exist is most likely a typo, and its callers get no share.
            let unknown: Vec<&str> = tp
                .spec
                .rate_limit
                .iter()
                .flat_map(|rl| &rl.service_accounts)
                .filter(|sa| {
                    !facts.service_accounts.iter().any(|a| {
                        a.namespace().as_deref() == Some(ns.as_str()) && a.name_any() == **sa
                    })
                })
                .map(String::as_str)
                .collect();
            let note = if unknown.is_empty() {
                String::new()
            } else {
                format!(
                    "; rateLimit.serviceAccounts names {} that namespace {ns} does not have: no pod shares the limit under that name (a typo leaves the callers with no share: 429)",
                    unknown.join(", ")
                )
            };
            if meshed.contains(&ns) {
                v.programmed(format!("in the proxy config of namespace {ns}{note}"));
            } else {
                v.not_programmed(
                    reason::NAMESPACE_NOT_MESHED,
                    format!("namespace {ns} is not meshed (label it weft.dev/inject=enabled)"),
                );
            }
            service_policy(tp)
        },
    );
    Traffic {
        services: of_services,
        externals: of_externals,
        inbound,
        inbound_notes,
    }
}

/// The winning TrafficPolicies, compiled.
pub(crate) struct Traffic {
    /// What the clients of each Service apply.
    pub services: HashMap<ServiceKey, ServicePolicy>,
    /// What the callers of each ExternalService apply.
    pub externals: HashMap<ServiceKey, ServicePolicy>,
    /// What each Service's own pods admit (`inboundRateLimit`).
    pub inbound: HashMap<ServiceKey, InboundRateLimitConfig>,
    /// What `Programmed` says of an inbound limit placed in part (some
    /// ports are not HTTP), or of one placed nowhere (and why).
    pub inbound_notes: HashMap<ServiceKey, String>,
}

/// Where an `inboundRateLimit` goes.
enum Placed {
    /// On these ports and pods, with what was left out.
    On(InboundRateLimitConfig, Option<String>),
    /// Nowhere, for this reason.
    Nowhere(String),
}

impl Traffic {
    /// The inbound limits of a namespace's Services, by Service name.
    pub(crate) fn inbound_of(&self, ns: &str) -> Vec<InboundRateLimitConfig> {
        let mut out: Vec<InboundRateLimitConfig> = self
            .inbound
            .iter()
            .filter(|(k, _)| k.0 == ns)
            .map(|(_, l)| l.clone())
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }
}

/// A TrafficPolicy's `inboundRateLimit`, placed on the Service's pods as
/// its AccessPolicy would be: the container ports it forwards to, in the
/// pods its selector matches. Unlike an AccessPolicy it is not placed on
/// pods the selector cannot tell (a Service without one): guarding too
/// much refuses a caller, but limiting too much throttles other
/// workloads. Nor on opaque ports, whose requests the proxy does not see.
fn inbound_rate_limit(tp: &TrafficPolicy, svc: &Service) -> Option<Placed> {
    let limit = tp.spec.inbound_rate_limit.as_ref()?;
    let ns = tp.namespace().unwrap_or_default();
    let name = format!("{ns}/{}", svc.name_any());
    let rate = |r: &crate::api::RequestRate| RequestRateConfig {
        requests_per_second: r.requests_per_second,
        burst: r.burst.unwrap_or(r.requests_per_second),
    };
    let Some(selector) = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .filter(|sel| !sel.is_empty())
    else {
        return Some(Placed::Nowhere(format!(
            "Service {name} has no selector, so its pods cannot be told from the namespace's others: no proxy enforces inboundRateLimit (give the Service a selector)"
        )));
    };
    // Every port, those the Service calls opaque too: the pod's proxy
    // decides by what the client speaks, serves HTTP as HTTP (a client
    // must not skip per-request checks by calling a port opaque), and
    // limits what it serves as HTTP. What the Service calls opaque is
    // said in the status.
    let opaque: Vec<String> = super::service_ports(svc)
        .iter()
        .filter(|p| p.protocol == crate::config::PortProtocol::Opaque)
        .map(|p| p.port.to_string())
        .collect();
    let note = (!opaque.is_empty()).then(|| {
        format!(
            "; on port {} only what comes as HTTP (the Service calls it opaque TCP)",
            opaque.join(", ")
        )
    });
    let mut ports: Vec<PortRef> = super::tcp_ports(svc).map(|(_, _, target)| target).collect();
    ports.sort();
    ports.dedup();
    let config = InboundRateLimitConfig {
        policy: format!("{ns}/{}", tp.name_any()),
        service: svc.name_any(),
        selector: Some(selector),
        ports,
        total: limit.total.as_ref().map(rate),
        per_identity: limit.per_identity.as_ref().map(rate),
        overrides: limit
            .overrides
            .iter()
            .map(|o| RateOverrideConfig {
                identities: super::access::identities(&o.from, &ns),
                limit: rate(&o.rate),
            })
            .collect(),
        routes: limit
            .routes
            .iter()
            .map(|r| RouteRateConfig {
                name: r.name.clone(),
                path: PathMatchConfig {
                    type_: r.path.type_,
                    value: r.path.value.clone(),
                },
                methods: r.methods.clone(),
                limit: rate(&r.rate),
            })
            .collect(),
        excluded_paths: sorted_set(&limit.excluded_paths),
    };
    Some(Placed::On(config, note))
}

pub(crate) fn resolve_routes(
    facts: &ClusterFacts,
    services: &BTreeMap<ServiceKey, &Service>,
    verdicts: &mut Verdicts,
) -> HashMap<ServiceKey, Vec<RouteConfig>> {
    let routes: Vec<&ServiceRoute> = facts.service_routes.iter().collect();
    resolve(
        PolicyKind::ServiceRoute,
        &routes,
        Targets::services(&|k| services.contains_key(k)),
        verdicts,
        |sr| sr.spec.parent_ref.name.as_str(),
        |sr, v| route_configs(sr, services, v),
    )
}

fn route_configs(
    sr: &ServiceRoute,
    services: &BTreeMap<ServiceKey, &Service>,
    v: &mut super::verdict::PolicyVerdict,
) -> Vec<RouteConfig> {
    let ns = sr.namespace().unwrap_or_default();
    let mut problems = Vec::new();
    // A progressive canary's share in force (its status says where it
    // stands; see `operator::canary`).
    let canary = sr.canary_in_force();
    let routes = sr
        .spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let rule_name = rule.name.clone().unwrap_or_else(|| i.to_string());
            let total: u32 = rule.backend_refs.iter().map(|b| b.weight).sum();
            let mut backends = Vec::new();
            for b in &rule.backend_refs {
                if services.contains_key(&(ns.clone(), b.name.clone())) {
                    backends.push(WeightedBackend {
                        service: format!("{}.{ns}", b.name),
                        port: b.port,
                        weight: canary.map_or(b.weight, |(name, percent)| {
                            canary_share(rule, name, percent, b)
                        }),
                    });
                } else {
                    problems.push(format!(
                        "rule {rule_name}: backend Service {ns}/{} not found; its share ({} of {total}) goes to the remaining backends",
                        b.name, b.weight
                    ));
                }
            }
            if backends.iter().all(|b| b.weight == 0) && !rule.backend_refs.is_empty() {
                if !backends.is_empty() || problems.is_empty() {
                    problems.push(format!("rule {rule_name}: no backend with a weight above 0 exists"));
                }
                problems.push(format!("rule {rule_name}: its requests are answered 503 until a backend exists"));
                backends.clear();
            }
            RouteConfig {
                name: format!("{ns}/{}/{rule_name}", sr.name_any()),
                matches: rule
                    .matches
                    .iter()
                    .map(|m| MatchConfig {
                        path: m.path.as_ref().map(|p| PathMatchConfig {
                            type_: p.type_,
                            value: p.value.clone(),
                        }),
                        method: m.method,
                        headers: m
                            .headers
                            .iter()
                            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                            .collect(),
                    })
                    .collect(),
                backends,
                timeout_ms: rule.timeout.map(|d| d.as_millis()),
                retry: rule.retries.as_ref().map(|r| retry_config(Some(r))),
            }
        })
        .collect();
    if !problems.is_empty() {
        v.unresolved(reason::BACKEND_NOT_FOUND, problems.join("; "));
    }
    routes
}

/// A backend's weight in a rule while its route's canary `canary` takes
/// `percent` of the rule's requests: the canary that share, the other
/// backends the rest in proportion to their own weights (in units of
/// 1/100000 of the rule's requests). A rule that does not name the canary
/// keeps its weights.
fn canary_share(
    rule: &crate::api::RouteRule,
    canary: &str,
    percent: u32,
    b: &crate::api::BackendRef,
) -> u32 {
    if !rule.backend_refs.iter().any(|r| r.name == canary) {
        return b.weight;
    }
    let stable: u64 = rule
        .backend_refs
        .iter()
        .filter(|r| r.name != canary)
        .map(|r| u64::from(r.weight))
        .sum();
    let percent = u64::from(percent.min(100));
    if b.name == canary {
        // Alone in its rule, it takes everything whatever the step.
        return if stable == 0 {
            100_000
        } else {
            (percent * 1000) as u32
        };
    }
    if stable == 0 {
        return 0;
    }
    ((100 - percent) * 1000 * u64::from(b.weight) / stable) as u32
}

/// `Programmed` for TrafficPolicies and ServiceRoutes: in how many meshed
/// namespaces' configs their Service appears.
pub(crate) fn mark_programmed(
    verdicts: &mut Verdicts,
    configs: &BTreeMap<String, ProxyConfig>,
    meshed: &BTreeSet<String>,
    traffic: &Traffic,
) {
    for (kind, ns, name, (svc_ns, svc_name)) in verdicts.take_placements() {
        let clients: Vec<&str> = configs
            .iter()
            .filter(|(_, c)| {
                c.outbound
                    .services
                    .binary_search_by(|s| {
                        (s.namespace.as_str(), s.name.as_str())
                            .cmp(&(svc_ns.as_str(), svc_name.as_str()))
                    })
                    .is_ok()
            })
            .map(|(client, _)| client.as_str())
            .collect();
        let Some(v) = verdicts.get_mut(kind, &ns, &name) else {
            continue;
        };
        let key = (svc_ns.clone(), svc_name.clone());
        let note = traffic.inbound_notes.get(&key).map(String::as_str);
        let placed = traffic.inbound.contains_key(&key);
        let clients_note = if clients.is_empty() {
            String::new()
        } else {
            format!(
                " (the rest of the policy is in the proxy config of {})",
                summarize(&clients)
            )
        };
        if kind == PolicyKind::TrafficPolicy
            && !placed
            && let Some(why) = note
        {
            v.not_programmed(reason::NOT_PROGRAMMED, format!("{why}{clients_note}"));
            continue;
        }
        if kind == PolicyKind::TrafficPolicy && placed {
            // The server side: enforced by the Service's own pods, which
            // only a meshed namespace has proxies in.
            if !meshed.contains(&svc_ns) {
                v.not_programmed(
                    reason::NAMESPACE_NOT_MESHED,
                    format!("namespace {svc_ns} is not labelled {INJECT_LABEL}={INJECT_ENABLED}: no proxy enforces inboundRateLimit, so Service {svc_ns}/{svc_name} admits every request{clients_note}"),
                );
                continue;
            }
            let enforced = format!(
                "inboundRateLimit enforced by the proxy of each pod of Service {svc_ns}/{svc_name}{}",
                note.unwrap_or_default()
            );
            if clients.is_empty() {
                v.programmed(format!(
                    "{enforced} (no meshed namespace may reach it, so no client applies the rest)"
                ));
            } else {
                v.programmed(format!(
                    "in the proxy config of {}; {enforced}",
                    summarize(&clients)
                ));
            }
            continue;
        }
        if clients.is_empty() {
            let why = if meshed.is_empty() {
                "no namespace is meshed yet (label one weft.dev/inject=enabled)".to_owned()
            } else {
                format!("no meshed namespace may reach Service {svc_ns}/{svc_name}")
            };
            v.not_programmed(reason::NOT_PROGRAMMED, why);
        } else {
            v.programmed(format!("in the proxy config of {}", summarize(&clients)));
        }
    }
}

/// `a, b, c` or `a, b, c and 7 more namespaces`.
pub(crate) fn summarize(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let head = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    match names.len() {
        1 => format!("namespace {head}"),
        n if n <= SHOWN => format!("namespaces {head}"),
        n => format!("namespaces {head} and {} more", n - SHOWN),
    }
}
