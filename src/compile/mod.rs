//! The policy compiler: a pure, deterministic function from what the cluster
//! holds (namespaces, Services, ServiceAccounts, weft policies) to one
//! [`ProxyConfig`] per meshed namespace plus a status verdict for every
//! policy. No I/O and no clock: the operator, `weft compile` and `weft local`
//! all call the same function, and the tests call it with plain values.
//!
//! Rules that apply to every kind:
//! - a policy whose target does not exist gets `ResolvedRefs=False` and is
//!   left out;
//! - two policies of one kind on the same target: the oldest wins
//!   (creationTimestamp, then name, as Gateway API resolves conflicts), the
//!   other gets `Accepted=False` with reason `Conflicted`;
//! - a namespace's config holds only the Services it may reach: a Service an
//!   AccessPolicy guards is left out of the configs of namespaces none of
//!   whose identities it admits.

mod access;
mod external;
mod policy;
mod scope;
mod verdict;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::api::{
    self, AccessPolicy, EgressMode, ExternalService, INJECT_ENABLED, INJECT_LABEL, MESH_NAME,
    MTLSPolicy, Mesh, MeshSpec, MtlsMode, RolloutPhase, RolloutStrategy, ServiceRoute,
    TrafficPolicy,
};
use crate::config::{
    InboundConfig, InboundMode, MeshedServer, OutboundConfig, OutboundService, PortProtocol,
    PortRef, ProxyConfig, ServicePortConfig,
};

pub use scope::{CALLS_ANNOTATION, Scope};
pub use verdict::{PolicyKind, PolicyVerdict, VerdictCondition};

/// Everything the compiler reads. Order does not matter: the compiler sorts.
#[derive(Clone, Debug, Default)]
pub struct ClusterFacts {
    pub namespaces: Vec<Namespace>,
    pub services: Vec<Service>,
    pub service_accounts: Vec<ServiceAccount>,
    pub meshes: Vec<Mesh>,
    pub mtls_policies: Vec<MTLSPolicy>,
    pub traffic_policies: Vec<TrafficPolicy>,
    pub service_routes: Vec<ServiceRoute>,
    pub access_policies: Vec<AccessPolicy>,
    pub external_services: Vec<ExternalService>,
}

/// What the compiler produces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// One config per meshed namespace, by namespace name.
    pub configs: BTreeMap<String, ProxyConfig>,
    /// One verdict per policy, sorted by kind, namespace, name.
    pub verdicts: Vec<PolicyVerdict>,
}

/// The Service annotation that names the ServiceAccounts serving it
/// (comma-separated). Without it any ServiceAccount of the Service's
/// namespace may serve it.
pub const SERVICE_ACCOUNTS_ANNOTATION: &str = "weft.dev/service-accounts";
/// The Service annotation listing ports (comma-separated) never inspected:
/// server-speaks-first protocols.
pub const OPAQUE_PORTS_ANNOTATION: &str = "weft.dev/opaque-ports";
/// Ports whose protocol speaks first; detection would stall on them.
pub const SERVER_FIRST_PORTS: [u16; 7] = [25, 3306, 4222, 5432, 6379, 11211, 27017];
/// The Namespace annotation that overrides the Mesh's `egress`:
/// `AllowAll` or `RegistryOnly`.
pub const EGRESS_ANNOTATION: &str = "weft.dev/egress";

/// The egress mode of a namespace: its annotation, else the Mesh's; or
/// why the annotation cannot be read (the Mesh's then applies).
pub fn egress_of(ns: &Namespace, mesh: EgressMode) -> Result<EgressMode, String> {
    let value = ns.annotations().get(EGRESS_ANNOTATION).map(|v| v.trim());
    match value.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(mesh),
        Some("allowall") => Ok(EgressMode::AllowAll),
        Some("registryonly") => Ok(EgressMode::RegistryOnly),
        Some(_) => Err(format!(
            "annotation {EGRESS_ANNOTATION} of namespace {name}: {:?} is neither AllowAll nor RegistryOnly; until it is fixed the Mesh's egress ({mesh:?}) applies",
            value.unwrap_or_default(),
            name = ns.name_any()
        )),
    }
}

/// The DNS domain of the cluster.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A Service's key: (namespace, name).
pub(crate) type ServiceKey = (String, String);

/// Compiles the cluster into proxy configs and policy verdicts.
pub fn compile(facts: &ClusterFacts) -> Compiled {
    let mut verdicts = verdict::Verdicts::default();
    let (mesh, tracing) = mesh_spec(facts, &mut verdicts);

    let services: BTreeMap<ServiceKey, &Service> = facts
        .services
        .iter()
        .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
        .collect();
    let meshed: BTreeSet<String> = facts
        .namespaces
        .iter()
        .filter(|ns| is_meshed(ns))
        .map(|ns| ns.name_any())
        .collect();
    let mut accounts: HashMap<String, BTreeSet<String>> = HashMap::new();
    for sa in &facts.service_accounts {
        accounts
            .entry(sa.namespace().unwrap_or_default())
            .or_default()
            .insert(sa.name_any());
    }

    let mtls = mtls_modes(facts, &meshed, &mut verdicts);
    let mut externals = external::resolve(&facts.external_services, &meshed, &mut verdicts);
    let traffic = policy::resolve_traffic(facts, &services, &externals, &meshed, &mut verdicts);
    let policies = &traffic.services;
    for (key, policy) in &traffic.externals {
        if let Some(es) = externals.get_mut(key) {
            es.policy = Some(policy.clone());
        }
    }
    let routes = policy::resolve_routes(facts, &services, &mut verdicts);
    let guards = access::resolve(facts, &services, &mut verdicts);

    // Each Service's outbound entry is the same for every client namespace,
    // so it is built once and cloned into the configs that may reach it.
    let entries: BTreeMap<&ServiceKey, OutboundService> = services
        .iter()
        .map(|(key, svc)| {
            let strict = mtls.get(&key.0).is_some_and(|m| m.clients_expect_strict);
            let entry = outbound_entry(
                key,
                svc,
                meshed.contains(&key.0),
                strict,
                routes.get(key).cloned().unwrap_or_default(),
                policies.get(key).cloned(),
            );
            (key, entry)
        })
        .collect();

    let defaults = policy::default_service_policy();
    let scopes: HashMap<String, Scope> = facts
        .namespaces
        .iter()
        .filter(|n| meshed.contains(&n.name_any()))
        // A bad annotation keeps the whole mesh (the operator warns).
        .map(|n| (n.name_any(), Scope::of(n).unwrap_or_default()))
        .collect();
    let egresses: HashMap<String, EgressMode> = facts
        .namespaces
        .iter()
        .filter(|n| meshed.contains(&n.name_any()))
        // A bad annotation keeps the Mesh's (the operator warns).
        .map(|n| {
            (
                n.name_any(),
                egress_of(n, mesh.egress).unwrap_or(mesh.egress),
            )
        })
        .collect();
    let mut configs = BTreeMap::new();
    for ns in &meshed {
        let no_accounts = BTreeSet::new();
        let client_accounts = accounts.get(ns).unwrap_or(&no_accounts);
        let listed = scope::select(scopes.get(ns).unwrap_or(&Scope::All), ns, &entries);
        let services: Vec<OutboundService> = entries
            .iter()
            .filter(|(key, _)| listed.as_ref().is_none_or(|l| l.contains(*key)))
            .filter(|(key, _)| guards.may_reach(ns, client_accounts, key))
            .map(|(_, entry)| entry.clone())
            .collect();
        let mode = mtls
            .get(ns)
            .map(|m| m.inbound)
            .unwrap_or(InboundMode::Permissive);
        let config = ProxyConfig {
            schema_version: String::new(),
            generation: String::new(),
            namespace: ns.clone(),
            trust_domain: mesh.trust_domain.clone(),
            inbound: InboundConfig {
                mode,
                plaintext_ports: mtls
                    .get(ns)
                    .map(|m| m.plaintext_ports.clone())
                    .unwrap_or_default(),
                authorizations: guards.authorizations(ns),
                rate_limits: traffic.inbound_of(ns),
            },
            outbound: OutboundConfig {
                defaults: defaults.clone(),
                services,
                egress: egresses.get(ns).copied().unwrap_or(mesh.egress),
                // Sorted by name: the map's order within the namespace.
                external_services: externals
                    .range((ns.clone(), String::new())..)
                    .take_while(|((es_ns, _), _)| es_ns == ns)
                    .map(|(_, es)| es.clone())
                    .collect(),
            },
            tracing: tracing.clone(),
        }
        .seal();
        configs.insert(ns.clone(), config);
    }

    policy::mark_programmed(&mut verdicts, &configs, &meshed, &traffic);
    access::mark_programmed(&guards, &mut verdicts, &meshed);
    Compiled {
        configs,
        verdicts: verdicts.finish(),
    }
}

/// Whether a namespace carries `weft.dev/inject=enabled`.
pub fn is_meshed(ns: &Namespace) -> bool {
    ns.labels().get(INJECT_LABEL).map(String::as_str) == Some(INJECT_ENABLED)
}

/// The oldest first: creationTimestamp, then name, as Gateway API orders
/// conflicting policies. Objects without a timestamp (not yet stored by the
/// API server, or read from a file) count as newest.
pub(crate) fn age_order<K: kube::Resource>(a: &K, b: &K) -> std::cmp::Ordering {
    let ts = |k: &K| k.meta().creation_timestamp.as_ref().map(|t| t.0);
    match (ts(a), ts(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
    .then_with(|| a.namespace().cmp(&b.namespace()))
    .then_with(|| a.name_any().cmp(&b.name_any()))
}

/// The Mesh in force, and its tracing when usable (why not is said in the
/// Mesh's status).
fn mesh_spec(
    facts: &ClusterFacts,
    verdicts: &mut verdict::Verdicts,
) -> (MeshSpec, Option<crate::config::TracingConfig>) {
    let mut chosen = None;
    let mut usable_tracing = None;
    for mesh in &facts.meshes {
        let mut v = verdicts.start(PolicyKind::Mesh, mesh);
        if mesh.name_any() == MESH_NAME {
            v.accept();
            v.resolved();
            // Tracing that cannot be used is off, said here; the rest of
            // the Mesh is in force either way.
            let tracing = match mesh
                .spec
                .tracing
                .as_ref()
                .map(crate::config::TracingConfig::from_settings)
            {
                Some(Err(why)) => format!("; tracing is off: {why}"),
                Some(Ok(t)) => {
                    let said = format!(
                        "; spans of {}% of new traces go to {}{}",
                        t.sampling * 100.0,
                        t.collector,
                        t.path
                    );
                    usable_tracing = Some(t);
                    said
                }
                None => String::new(),
            };
            v.programmed(format!("in force mesh-wide{tracing}"));
            chosen = Some(mesh.spec.clone());
        } else {
            v.reject(
                api::conditions::reason::INVALID,
                format!("only the Mesh named `{MESH_NAME}` is read; rename this one or delete it"),
            );
        }
        verdicts.push(v);
    }
    (chosen.unwrap_or_default(), usable_tracing)
}

/// The effective mTLS posture of a namespace.
struct MtlsPosture {
    inbound: InboundMode,
    /// Clients must not fall back to plaintext (phase Enforcing or Strict).
    clients_expect_strict: bool,
    plaintext_ports: Vec<u16>,
}

/// Picks each namespace's MTLSPolicy (the oldest) and derives what proxies
/// do from its spec and the rollout phase the operator recorded in status.
fn mtls_modes(
    facts: &ClusterFacts,
    meshed: &BTreeSet<String>,
    verdicts: &mut verdict::Verdicts,
) -> HashMap<String, MtlsPosture> {
    let mut sorted: Vec<&MTLSPolicy> = facts.mtls_policies.iter().collect();
    sorted.sort_by(|a, b| age_order(*a, *b));
    let mut winners: HashMap<String, String> = HashMap::new();
    let mut out = HashMap::new();
    for policy in sorted {
        let ns = policy.namespace().unwrap_or_default();
        let mut v = verdicts.start(PolicyKind::MTLSPolicy, policy);
        if let Some(winner) = winners.get(&ns) {
            v.conflict(format!(
                "MTLSPolicy {ns}/{winner} is older and already sets this namespace's mode; delete one of them"
            ));
            verdicts.push(v);
            continue;
        }
        winners.insert(ns.clone(), policy.name_any());
        v.accept();
        v.resolved();
        let phase = policy.status.as_ref().and_then(|s| s.phase);
        let (inbound, clients_expect_strict) =
            match (policy.spec.mode, policy.spec.rollout.strategy) {
                (MtlsMode::Permissive, _) => (InboundMode::Permissive, false),
                (MtlsMode::Strict, RolloutStrategy::Immediate) => (InboundMode::Strict, true),
                (MtlsMode::Strict, RolloutStrategy::Staged) => match phase {
                    Some(RolloutPhase::Strict) => (InboundMode::Strict, true),
                    Some(RolloutPhase::Enforcing) => (InboundMode::Permissive, true),
                    _ => (InboundMode::Permissive, false),
                },
            };
        if meshed.contains(&ns) {
            let note = match (policy.spec.mode, inbound) {
                (MtlsMode::Strict, InboundMode::Permissive) => {
                    "; Strict is enforced once the staged rollout's gates pass (see status.phase)"
                }
                _ => "",
            };
            v.programmed(format!("inbound mode {inbound:?} in namespace {ns}{note}"));
        } else {
            v.not_programmed(
                api::conditions::reason::NAMESPACE_NOT_MESHED,
                format!("namespace {ns} is not labelled {INJECT_LABEL}={INJECT_ENABLED}, so no proxy enforces this policy"),
            );
        }
        verdicts.push(v);
        let mut plaintext_ports = policy.spec.plaintext_ports.clone();
        plaintext_ports.sort_unstable();
        plaintext_ports.dedup();
        out.insert(
            ns,
            MtlsPosture {
                inbound,
                clients_expect_strict,
                plaintext_ports,
            },
        );
    }
    out
}

/// A Service as clients see it, independent of who the client is.
fn outbound_entry(
    (ns, name): &ServiceKey,
    svc: &Service,
    meshed: bool,
    strict: bool,
    routes: Vec<crate::config::RouteConfig>,
    policy: Option<crate::config::ServicePolicy>,
) -> OutboundService {
    let spec = svc.spec.clone().unwrap_or_default();
    let policy = zone_preference(&spec, policy);
    let ports = service_ports(svc);
    let cluster_ips = spec
        .cluster_ips
        .or_else(|| spec.cluster_ip.map(|ip| vec![ip]))
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| ip != "None" && !ip.is_empty())
        .collect();
    let mesh = meshed.then(|| MeshedServer {
        namespace: ns.clone(),
        service_accounts: svc
            .annotations()
            .get(SERVICE_ACCOUNTS_ANNOTATION)
            .map(|v| {
                let mut sas: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                sas.sort();
                sas.dedup();
                sas
            })
            .unwrap_or_default(),
        strict,
    });
    OutboundService {
        name: name.clone(),
        namespace: ns.clone(),
        hostnames: vec![
            format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
            format!("{name}.{ns}.svc"),
            format!("{name}.{ns}"),
        ],
        cluster_ips,
        ports,
        mesh,
        routes,
        policy,
        endpoints: Vec::new(),
    }
}

/// A Service that asks for traffic to stay close (`spec.trafficDistribution`
/// `PreferClose`, or its 1.34 spelling `PreferSameZone`; see
/// <https://kubernetes.io/docs/reference/networking/virtual-ips/#traffic-distribution>)
/// gets the proxy's zone affinity with its defaults, unless its
/// TrafficPolicy already sets one. kube-proxy honours the field for
/// unmeshed callers; meshed callers dial the pods themselves, so the
/// proxy must. `PreferSameNode` gets zone affinity too: the proxy keeps
/// calls in the zone, not on the node (kube-proxy itself falls back from
/// node to zone), which is the nearest it honours. Unlike kube-proxy,
/// which stays in the zone while any endpoint there is ready, the proxy
/// spills in proportion once fewer than 70 % of the zone's pods are
/// healthy.
fn zone_preference(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    policy: Option<crate::config::ServicePolicy>,
) -> Option<crate::config::ServicePolicy> {
    let close = matches!(
        spec.traffic_distribution.as_deref(),
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
    );
    if !close || policy.as_ref().is_some_and(|p| p.zone_affinity.is_some()) {
        return policy;
    }
    let mut policy = policy.unwrap_or_else(policy::default_service_policy);
    policy.zone_affinity = Some(policy::zone_affinity(&crate::api::ZoneAffinity::default()));
    Some(policy)
}

/// A Service's TCP ports with the container port each forwards to and
/// the protocol its proxies speak there.
pub(crate) fn service_ports(svc: &Service) -> Vec<ServicePortConfig> {
    let opaque: BTreeSet<u16> = svc
        .annotations()
        .get(OPAQUE_PORTS_ANNOTATION)
        .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_default();
    tcp_ports(svc)
        .map(|(p, port, target_port)| ServicePortConfig {
            port,
            name: p.name.clone(),
            target_port,
            protocol: port_protocol(port, p.app_protocol.as_deref(), opaque.contains(&port)),
        })
        .collect()
}

/// A Service's TCP ports (the proxy carries nothing else) with the container
/// port each forwards to: a number, or a name the proxy resolves from its
/// pod's container ports.
pub(crate) fn tcp_ports(svc: &Service) -> impl Iterator<Item = (&ServicePort, u16, PortRef)> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target = match &p.target_port {
                None => PortRef::Number(port),
                Some(IntOrString::Int(n)) => PortRef::Number(u16::try_from(*n).ok()?),
                Some(IntOrString::String(s)) => PortRef::Name(s.clone()),
            };
            Some((p, port, target))
        })
}

/// Protocol from `appProtocol` (Kubernetes' standard values), the opaque
/// annotation, and well-known server-speaks-first ports.
fn port_protocol(port: u16, app_protocol: Option<&str>, opaque: bool) -> PortProtocol {
    if opaque || SERVER_FIRST_PORTS.contains(&port) {
        return PortProtocol::Opaque;
    }
    match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http/1.1") => PortProtocol::Http1,
        Some("kubernetes.io/h2c" | "http2" | "grpc") => PortProtocol::Http2,
        Some("tcp" | "kubernetes.io/ws" | "kubernetes.io/wss" | "https" | "tls") => {
            PortProtocol::Opaque
        }
        _ => PortProtocol::Detect,
    }
}

#[cfg(test)]
mod tests;
