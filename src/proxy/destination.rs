//! A destination as the proxy sees it: one Service port (or, for traffic
//! to an address no config knows, that address), its resolved policy, and
//! the state that policy needs — retry budget, circuit breakers, rate
//! limiter, endpoints with their latency estimates.
//!
//! Destinations outlive config reloads: a reload that leaves a Service's
//! policy and endpoints unchanged keeps its state (an open circuit stays
//! open), anything else gets fresh state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{CircuitBreakerConfig, EndpointsConfig, OutboundService, ServicePolicy};
use crate::proxy::http::pool::{CLUSTER_IP_H2_CONNECTIONS, Endpoint};
use crate::proxy::mesh::MeshTarget;
use crate::proxy::metrics::EdgeCache;

use super::resilience::{
    BreakerSettings, BreakerState, CircuitBreaker, FailureRateSettings, PeakEwma, RetryBudget,
    TokenBucket, lock,
};

/// Latency assumed for an endpoint before it has answered.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the peak-EWMA forgets.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// How long resolved DNS answers are used.
const DNS_TTL: Duration = Duration::from_secs(5);
/// How long a lookup may take before the last answer is kept.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed first lookup, how long before the next.
const DNS_RETRY: Duration = Duration::from_secs(1);

/// Where a destination's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSource {
    /// Addresses known up front: explicit endpoints, or the original
    /// destination itself.
    Static(Vec<SocketAddr>),
    /// A Service's ClusterIPs: each stands for the Service's pods, which
    /// kube-proxy picks among per connection, so HTTP/2 requests are
    /// spread over several connections to it.
    ClusterIps(Vec<SocketAddr>),
    /// A headless Service: resolve this name.
    Dns { host: String, port: u16 },
    /// The Service's pods, as the operator's endpoint discovery published
    /// them ([`crate::config::EndpointsConfig`]).
    Discovered(Vec<Discovered>),
}

/// A pod behind a Service, as discovery published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    pub addr: SocketAddr,
    /// The pod's ServiceAccount: a meshed endpoint must present exactly
    /// this identity, not merely one of the Service's.
    pub service_account: Option<String>,
    /// Terminating, or not ready: takes a new request only when no other
    /// endpoint can (in-flight ones finish either way).
    pub draining: bool,
    /// Its zone (EndpointSlice `zone`), for zone-aware routing.
    pub zone: Option<String>,
}

/// Where this proxy runs, for zone-aware routing: its zone as the injector
/// told it (`WEFT_ZONE`: the pod's `topology.kubernetes.io/zone` label,
/// which the API server copies from the Node at binding since Kubernetes
/// 1.35, KEP-4742), or else learned from the endpoints document: the zone
/// of a published endpoint on this proxy's own node (`WEFT_NODE`, the
/// pod's `spec.nodeName`). Neither: no zone, and every zone is one pool.
#[derive(Debug, Default)]
pub struct Locality {
    zone: std::sync::OnceLock<String>,
    node: Option<String>,
}

impl Locality {
    /// Empty strings are unset (a downward-API label that does not exist
    /// reads as "").
    pub fn new(zone: Option<String>, node: Option<String>) -> Self {
        let zone_lock = std::sync::OnceLock::new();
        if let Some(z) = zone.filter(|z| !z.is_empty()) {
            let _ = zone_lock.set(z);
        }
        Self {
            zone: zone_lock,
            node: node.filter(|n| !n.is_empty()),
        }
    }

    pub fn zone(&self) -> Option<&str> {
        self.zone.get().map(String::as_str)
    }

    /// Learns the zone from `doc` when it is not known yet: a node is in
    /// one zone, so any endpoint on this proxy's node tells it.
    pub fn learn(&self, doc: &EndpointsConfig) {
        let Some(node) = &self.node else { return };
        if self.zone.get().is_some() {
            return;
        }
        let found = doc
            .services
            .values()
            .flat_map(|s| &s.groups)
            .flat_map(|g| &g.endpoints)
            .find(|e| e.node.as_ref() == Some(node) && e.zone.is_some())
            .and_then(|e| e.zone.clone());
        if let Some(zone) = found
            && self.zone.set(zone.clone()).is_ok()
        {
            tracing::info!(%zone, %node, "zone learned from an endpoint on this node");
        }
    }
}

/// One endpoint and what the balancer knows of it.
pub struct EndpointState {
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
    pub load: Arc<PeakEwma>,
    pub breaker: Option<CircuitBreaker>,
    /// Takes new requests only when no other endpoint can ([`Discovered`]).
    /// Updated in place when a republished list flips it, so a pod keeps
    /// its breaker and latency estimate through a readiness flap.
    draining: std::sync::atomic::AtomicBool,
    /// The identity it was built for (discovered endpoints), so a
    /// republished list keeps its state only while that is unchanged.
    service_account: Option<String>,
    /// Its zone (discovered endpoints), for zone-aware routing.
    zone: Option<Box<str>>,
}

/// A destination's endpoints, shared with requests in flight.
pub type EndpointList = Arc<Vec<Arc<EndpointState>>>;

/// A destination's state.
pub struct Destination {
    /// `name.ns:port` for a Service, `ip:port` otherwise: the metrics label.
    pub label: String,
    pub policy: ServicePolicy,
    /// The policy's retries, shared with every request that has no
    /// route-level retry of its own.
    pub retry: Arc<crate::config::RetryConfig>,
    pub budget: RetryBudget,
    /// Whether the policy has a circuit breaker (kept per endpoint).
    pub has_breaker: bool,
    /// The Service's circuit state last published: Open only when every
    /// endpoint's breaker is open (see [`Destination::circuit_state`]).
    pub published_circuit: std::sync::atomic::AtomicU8,
    pub limiter: Option<TokenBucket>,
    /// `RoundRobin`'s turn: requests taken so far.
    turn: std::sync::atomic::AtomicUsize,
    /// The order of the endpoints document its pods came from
    /// ([`Destinations::get_at`]): a request on an older snapshot never
    /// moves it back to older pods.
    epoch: std::sync::atomic::AtomicU64,
    /// Metric series per route, for the metrics layer: over plaintext
    /// and over mesh TLS.
    pub edges: EdgeCache,
    pub tls_edges: EdgeCache,
    /// Who serves a meshed destination (its endpoints get mesh mTLS).
    pub mesh: Option<Arc<MeshTarget>>,
    source: Mutex<EndpointSource>,
    /// The name and port to resolve, for a headless Service (fixed).
    dns: Option<(String, u16)>,
    /// When DNS was last asked (None: never), and the endpoints.
    endpoints: Mutex<(Option<Instant>, EndpointList)>,
    /// Held by the one request refreshing DNS.
    refreshing: tokio::sync::Mutex<()>,
    /// Where this proxy runs (shared by all destinations).
    locality: Arc<Locality>,
}

fn breaker(cfg: &Option<CircuitBreakerConfig>) -> Option<CircuitBreaker> {
    cfg.as_ref().map(|cb| {
        CircuitBreaker::new(BreakerSettings {
            consecutive_failures: cb.consecutive_failures,
            failure_rate: cb.failure_rate.as_ref().map(|fr| FailureRateSettings {
                percent: fr.percent,
                min_requests: fr.min_requests,
                window: Duration::from_millis(fr.window_ms),
            }),
            open: Duration::from_millis(cb.open_ms),
            max_open: Duration::from_millis(cb.max_open_ms),
        })
    })
}

impl Destination {
    pub fn new(
        label: String,
        policy: ServicePolicy,
        source: EndpointSource,
        mesh: Option<Arc<MeshTarget>>,
    ) -> Self {
        let budget = RetryBudget::new(
            policy.retry.budget.percent,
            policy.retry.budget.min_per_second,
            Duration::from_millis(policy.retry.budget.window_ms.max(1)),
        );
        let limiter = policy
            .rate_limit
            .as_ref()
            .map(|rl| TokenBucket::new(rl.requests_per_second, rl.burst.max(1)));
        let static_endpoints = fixed_list(&source, &policy, &mesh, &[]);
        let fixed = static_endpoints.is_some();
        Self {
            label,
            retry: Arc::new(policy.retry.clone()),
            has_breaker: policy.circuit_breaker.is_some(),
            published_circuit: std::sync::atomic::AtomicU8::new(0),
            budget,
            limiter,
            turn: std::sync::atomic::AtomicUsize::new(0),
            epoch: std::sync::atomic::AtomicU64::new(0),
            edges: EdgeCache::default(),
            tls_edges: EdgeCache::default(),
            mesh,
            endpoints: Mutex::new((
                fixed.then(Instant::now),
                static_endpoints.unwrap_or_default(),
            )),
            dns: match &source {
                EndpointSource::Dns { host, port } => Some((host.clone(), *port)),
                _ => None,
            },
            source: Mutex::new(source),
            policy,
            refreshing: tokio::sync::Mutex::new(()),
            locality: Arc::default(),
        }
    }

    /// Current endpoints, resolving DNS when the last answer is stale.
    pub async fn endpoints(&self) -> EndpointList {
        // A destination's kind of source never changes (a republished
        // list replaces a discovered one with another), so the lists known
        // up front take no lock here beyond the endpoints' own.
        let Some((host, port)) = &self.dns else {
            return self.cached().1;
        };
        let (host, port) = (host.clone(), *port);
        let (resolved_at, current) = self.cached();
        if resolved_at.is_some_and(|t| t.elapsed() < DNS_TTL) {
            return current;
        }
        // One refresh at a time: the others keep using the last answer
        // (with none yet, they wait for it), and endpoint state is never
        // split between two refreshes that both saw a new address.
        let _refreshing = match self.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(_) if !current.is_empty() => return current,
            Err(_) => {
                let _wait = self.refreshing.lock().await;
                return self.cached().1;
            }
        };
        let lookup = tokio::net::lookup_host((host.as_str(), port));
        let fresh: Vec<SocketAddr> = match tokio::time::timeout(DNS_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => addrs.collect(),
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {DNS_TIMEOUT:?}"),
                };
                tracing::warn!(%host, error = %why, "resolving endpoints failed; keeping the last answer");
                // Asked again after the TTL (a second, with no answer at
                // all yet), not on every request while the resolver is down.
                let wait = if current.is_empty() {
                    DNS_RETRY
                } else {
                    DNS_TTL
                };
                let mut guard = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
                guard.0 = Instant::now().checked_sub(DNS_TTL - wait);
                return current;
            }
        };
        // Keep the state of endpoints that are still there.
        let known: HashMap<SocketAddr, Arc<EndpointState>> =
            current.iter().map(|e| (e.addr, e.clone())).collect();
        let next: EndpointList = Arc::new(
            fresh
                .into_iter()
                .map(|a| {
                    known.get(&a).cloned().unwrap_or_else(|| {
                        endpoint(a, &self.policy, &self.mesh, 1, Discovered::plain(a))
                    })
                })
                .collect(),
        );
        let mut guard = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        *guard = (Some(Instant::now()), next.clone());
        next
    }

    /// The Service's circuit: Open when every endpoint's breaker is open
    /// (the balancer then fails fast), HalfOpen when none is closed but one
    /// may take a probe, else Closed. None without a breaker policy.
    pub fn circuit_state(&self, now: Instant) -> Option<BreakerState> {
        if !self.has_breaker {
            return None;
        }
        let (_, endpoints) = self.cached();
        let states: Vec<BreakerState> = endpoints
            .iter()
            .filter_map(|e| e.breaker.as_ref().map(|b| b.state(now)))
            .collect();
        Some(
            if states.is_empty() || states.contains(&BreakerState::Closed) {
                BreakerState::Closed
            } else if states.contains(&BreakerState::HalfOpen) {
                BreakerState::HalfOpen
            } else {
                BreakerState::Open
            },
        )
    }

    fn cached(&self) -> (Option<Instant>, EndpointList) {
        let guard = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    fn same_as(
        &self,
        policy: &ServicePolicy,
        source: &EndpointSource,
        mesh: &Option<Arc<MeshTarget>>,
    ) -> bool {
        &self.policy == policy && &*lock(&self.source) == source && &self.mesh == mesh
    }

    /// `RoundRobin`: the next of `candidates` (endpoint indices with their
    /// costs, in endpoint order) in turn; one atomic add per request.
    pub fn next_in_turn(&self, candidates: &[(usize, f64)]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let n = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(candidates[n % candidates.len()].0)
    }

    /// Zone-aware routing ([`crate::config::ZoneAffinityConfig`]): of
    /// `candidates` (indices into `endpoints` that may take a request),
    /// those in this proxy's zone while enough of the zone is healthy, else
    /// those elsewhere. Healthy: admitted by its breaker and not draining,
    /// counted against every endpoint of the zone, so ejected and
    /// terminating pods both lower the share. Below the policy's share the
    /// calls spill in proportion (Envoy's priority failover), so a zone
    /// that is half healthy keeps about as many calls as it can serve
    /// rather than all or none. None (all candidates) without a policy, a
    /// known zone, any endpoint in that zone, or any candidate on the side
    /// chosen.
    pub fn in_zone(
        &self,
        endpoints: &[Arc<EndpointState>],
        candidates: &[(usize, f64)],
        rng: &mut fastrand::Rng,
    ) -> Option<Vec<(usize, f64)>> {
        let (Some(affinity), Some(zone)) = (&self.policy.zone_affinity, self.locality.zone())
        else {
            return None;
        };
        let local = |e: &EndpointState| e.zone.as_deref() == Some(zone);
        let in_zone = endpoints.iter().filter(|e| local(e)).count();
        if in_zone == 0 {
            return None;
        }
        let healthy = candidates
            .iter()
            .filter(|(i, _)| local(&endpoints[*i]) && !endpoints[*i].is_draining())
            .count();
        let stay = healthy as f64 * 100.0
            / (in_zone as f64 * f64::from(affinity.min_healthy_percent.max(1)));
        let here = healthy > 0 && (stay >= 1.0 || rng.f64() < stay);
        let chosen: Vec<(usize, f64)> = candidates
            .iter()
            .copied()
            .filter(|(i, _)| local(&endpoints[*i]) == here)
            .collect();
        (!chosen.is_empty()).then_some(chosen)
    }

    /// Takes a republished list of pods (discovery moved some) in place:
    /// the destination keeps its retry budget, rate limiter and series,
    /// and each pod still there keeps its latency estimate and breaker.
    /// False when `source` is not a discovered list. A list older than
    /// the one in place (`epoch`) is ignored.
    fn repoint(&self, source: EndpointSource, epoch: u64) -> bool {
        if !matches!(source, EndpointSource::Discovered(_))
            || !matches!(&*lock(&self.source), EndpointSource::Discovered(_))
        {
            return false;
        }
        let mut source_now = lock(&self.source);
        if epoch < self.epoch.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        self.epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
        let (_, current) = self.cached();
        let next = fixed_list(&source, &self.policy, &self.mesh, &current).unwrap_or_default();
        *lock(&self.endpoints) = (Some(Instant::now()), next);
        *source_now = source;
        true
    }
}

/// The endpoint list of a source known up front (not DNS), reusing the
/// state of `keep`'s endpoints that are the same pod with the same
/// identity and draining state.
fn fixed_list(
    source: &EndpointSource,
    policy: &ServicePolicy,
    mesh: &Option<Arc<MeshTarget>>,
    keep: &[Arc<EndpointState>],
) -> Option<EndpointList> {
    let plain = |addrs: &[SocketAddr], h2| {
        addrs
            .iter()
            .map(|a| endpoint(*a, policy, mesh, h2, Discovered::plain(*a)))
            .collect::<Vec<_>>()
    };
    let list = match source {
        EndpointSource::Static(addrs) => plain(addrs, 1),
        EndpointSource::ClusterIps(addrs) => plain(addrs, CLUSTER_IP_H2_CONNECTIONS),
        EndpointSource::Dns { .. } => return None,
        EndpointSource::Discovered(pods) => {
            // A pod keeps its state while its address, identity and zone
            // are unchanged.
            type Key<'a> = (SocketAddr, Option<&'a str>, Option<&'a str>);
            let known: HashMap<Key<'_>, &Arc<EndpointState>> = keep
                .iter()
                .map(|e| ((e.addr, e.service_account.as_deref(), e.zone.as_deref()), e))
                .collect();
            // One expected identity per account, shared by its pods (their
            // pooled connections are keyed by it).
            let mut targets: HashMap<&str, Arc<MeshTarget>> = HashMap::new();
            pods.iter()
                .map(|p| {
                    let key = (p.addr, p.service_account.as_deref(), p.zone.as_deref());
                    if let Some(e) = known.get(&key) {
                        e.draining
                            .store(p.draining, std::sync::atomic::Ordering::Relaxed);
                        return Arc::clone(e);
                    }
                    let target = match (mesh, p.service_account.as_deref()) {
                        (Some(m), Some(sa)) => Some(
                            targets
                                .entry(sa)
                                .or_insert_with(|| Arc::new(m.for_account(sa)))
                                .clone(),
                        ),
                        _ => mesh.clone(),
                    };
                    endpoint(p.addr, policy, &target, 1, p.clone())
                })
                .collect()
        }
    };
    Some(Arc::new(list))
}

fn endpoint(
    addr: SocketAddr,
    policy: &ServicePolicy,
    mesh: &Option<Arc<MeshTarget>>,
    h2_connections: usize,
    pod: Discovered,
) -> Arc<EndpointState> {
    Arc::new(EndpointState {
        addr,
        endpoint: Endpoint::meshed(addr, mesh.clone()).with_h2_connections(h2_connections),
        load: Arc::new(PeakEwma::new(DEFAULT_RTT, EWMA_DECAY)),
        breaker: breaker(&policy.circuit_breaker),
        draining: std::sync::atomic::AtomicBool::new(pod.draining),
        service_account: pod.service_account,
        zone: pod.zone.map(String::into_boxed_str),
    })
}

impl Discovered {
    /// An address known with nothing else about it.
    fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            service_account: None,
            draining: false,
            zone: None,
        }
    }
}

impl EndpointState {
    /// Terminating or unready: new requests only when nothing else can.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a Service port's endpoints come from: explicit endpoints, else
/// the pods discovery published, else its ClusterIPs, else (headless) DNS.
pub fn source_for(
    svc: &OutboundService,
    port: u16,
    discovered: Option<&EndpointsConfig>,
) -> EndpointSource {
    if !svc.endpoints.is_empty() {
        return EndpointSource::Static(
            svc.endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect(),
        );
    }
    // Meshed Services only: a pod address can be handed to another pod
    // before the document catches up, and only mTLS (each pod held to its
    // own identity) makes a stale address fail rather than reach a
    // stranger in plaintext. Unmeshed Services keep their ClusterIP.
    if svc.mesh.is_some()
        && let Some(pods) = discovered.and_then(|d| discovered_pods(svc, port, d))
    {
        return EndpointSource::Discovered(pods);
    }
    let ips: Vec<SocketAddr> = svc
        .cluster_ips
        .iter()
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if !ips.is_empty() {
        return EndpointSource::ClusterIps(ips);
    }
    let host = svc
        .hostnames
        .first()
        .cloned()
        .unwrap_or_else(|| format!("{}.{}", svc.name, svc.namespace));
    EndpointSource::Dns { host, port }
}

/// The pods behind `svc`'s `port`, when discovery published any: each
/// group's port of the same name, one address family (the Service's
/// primary one: a dual-stack pod is in a slice per family, and counting it
/// twice would double its share).
fn discovered_pods(
    svc: &OutboundService,
    port: u16,
    discovered: &EndpointsConfig,
) -> Option<Vec<Discovered>> {
    let groups = &discovered
        .services
        .get(&EndpointsConfig::key(&svc.namespace, &svc.name))?
        .groups;
    let name = svc
        .ports
        .iter()
        .find(|p| p.port == port)?
        .name
        .clone()
        .unwrap_or_default();
    let parsed = |a: &String| a.parse::<std::net::IpAddr>().ok();
    let family_v6 = match svc
        .cluster_ips
        .first()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
    {
        Some(ip) => ip.is_ipv6(),
        // Headless: IPv4 when any pod has it.
        None => !groups
            .iter()
            .flat_map(|g| &g.endpoints)
            .flat_map(|e| &e.addresses)
            .any(|a| parsed(a).is_some_and(|ip| ip.is_ipv4())),
    };
    let mut pods = Vec::new();
    for group in groups {
        let Some(target) = group.ports.get(&name) else {
            continue;
        };
        for e in &group.endpoints {
            for ip in e.addresses.iter().filter_map(parsed) {
                if ip.is_ipv6() == family_v6 {
                    pods.push(Discovered {
                        addr: SocketAddr::new(ip, *target),
                        service_account: e.service_account.clone(),
                        draining: e.terminating || !e.ready,
                        zone: e.zone.clone(),
                    });
                }
            }
        }
    }
    (!pods.is_empty()).then_some(pods)
}

/// Destinations by label, carried across config reloads.
#[derive(Default)]
pub struct Destinations {
    by_label: Mutex<HashMap<String, Arc<Destination>>>,
    /// Where this proxy runs, shared with every destination.
    pub locality: Arc<Locality>,
}

impl Destinations {
    pub fn new(locality: Locality) -> Self {
        Self {
            by_label: Mutex::default(),
            locality: Arc::new(locality),
        }
    }

    /// The destination for `label`, reusing its state when nothing that
    /// shapes it changed.
    pub fn get(
        &self,
        label: &str,
        policy: &ServicePolicy,
        source: EndpointSource,
        mesh: Option<Arc<MeshTarget>>,
    ) -> Arc<Destination> {
        self.get_at(label, policy, source, mesh, 0)
    }

    /// [`Destinations::get`] for a source taken from endpoints document
    /// number `epoch` (the store counts them): a discovered destination
    /// moves to the new pods in place, and never back to an older
    /// document's (a request still on an older snapshot may ask).
    pub fn get_at(
        &self,
        label: &str,
        policy: &ServicePolicy,
        source: EndpointSource,
        mesh: Option<Arc<MeshTarget>>,
        epoch: u64,
    ) -> Arc<Destination> {
        self.get_keyed(label, label, policy, source, mesh, epoch)
    }

    /// [`Destinations::get_at`] kept under `key` rather than its label: a
    /// pod dialled by address is kept by that address (forgotten with the
    /// other addresses, [`Destinations::retain`]) and counted under its
    /// Service's label.
    pub fn get_keyed(
        &self,
        key: &str,
        label: &str,
        policy: &ServicePolicy,
        source: EndpointSource,
        mesh: Option<Arc<MeshTarget>>,
        epoch: u64,
    ) -> Arc<Destination> {
        let mut map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(key)
            && d.label == label
        {
            if d.same_as(policy, &source, &mesh) {
                return d.clone();
            }
            if &d.policy == policy && d.mesh == mesh && d.repoint(source.clone(), epoch) {
                return d.clone();
            }
        }
        let mut d = Destination::new(label.to_owned(), policy.clone(), source, mesh);
        d.locality = self.locality.clone();
        d.epoch.store(epoch, std::sync::atomic::Ordering::Release);
        let d = Arc::new(d);
        map.insert(key.to_owned(), d.clone());
        d
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.by_label
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Forgets destinations a new config no longer names.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|label, _| keep(label));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ServicePolicy {
        serde_json::from_str(
            r#"{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma","circuitBreaker":{"consecutiveFailures":1,"openMs":60000,"maxOpenMs":60000}}"#,
        )
        .expect("policy")
    }

    fn pod(last: u8, account: &str, draining: bool) -> Discovered {
        Discovered {
            addr: SocketAddr::from(([10, 244, 0, last], 8080)),
            service_account: Some(account.to_owned()),
            draining,
            zone: None,
        }
    }

    /// Pods come and go (discovery republishes): the destination stays,
    /// with its retry budget and series, and each pod still there keeps
    /// its breaker and latency estimate; a pod whose account or draining
    /// state changed starts afresh.
    #[tokio::test]
    async fn republished_pods_keep_the_state_of_those_that_stay() {
        let all = Destinations::default();
        let mesh = Some(Arc::new(MeshTarget::from_config(
            &crate::config::MeshedServer {
                namespace: "shop".into(),
                service_accounts: vec![],
                strict: true,
            },
        )));
        let first = EndpointSource::Discovered(vec![
            pod(1, "inventory", false),
            pod(2, "inventory", false),
        ]);
        let d = all.get("inventory.shop:80", &policy(), first, mesh.clone());
        let before = d.endpoints().await;
        // Pod 1 failed: its breaker is open.
        let permit = before[0]
            .breaker
            .as_ref()
            .expect("breaker")
            .try_acquire(Instant::now())
            .expect("closed");
        permit.failure(Instant::now());
        assert_eq!(
            d.circuit_state(Instant::now()),
            Some(BreakerState::Closed),
            "pod 2 still serves"
        );

        let next = EndpointSource::Discovered(vec![
            pod(1, "inventory", false),
            pod(2, "inventory", true),
            pod(3, "inventory", false),
        ]);
        let same = all.get_at("inventory.shop:80", &policy(), next, mesh.clone(), 1);
        assert!(Arc::ptr_eq(&d, &same), "the destination is kept");
        let after = same.endpoints().await;
        assert_eq!(after.len(), 3);
        assert!(Arc::ptr_eq(&before[0], &after[0]), "pod 1 keeps its state");
        assert!(
            !after[0]
                .breaker
                .as_ref()
                .expect("breaker")
                .admits(Instant::now()),
            "its breaker is still open"
        );
        assert!(after[1].is_draining() && !after[2].is_draining());
        assert!(
            Arc::ptr_eq(&before[1], &after[1]),
            "pod 2 now drains, in place: it keeps its state"
        );
        // A request still on the first snapshot cannot move it back.
        let older = EndpointSource::Discovered(vec![pod(1, "inventory", false)]);
        let again = all.get_at("inventory.shop:80", &policy(), older, mesh.clone(), 0);
        assert!(Arc::ptr_eq(&again, &same));
        assert_eq!(again.endpoints().await.len(), 3, "the newer pods stay");
        // Each pod is held to its own account.
        let expected = after[2].endpoint.mesh.as_ref().expect("meshed");
        assert_eq!(expected.server.service_accounts, ["inventory"]);
    }

    /// Below the policy's share of healthy pods, calls leave the zone in
    /// proportion: two of four healthy against 70 % keeps about 71 % of
    /// calls (Envoy's overprovisioned priority load), none healthy keeps
    /// none; the zone is learned from a pod on this proxy's node.
    #[tokio::test]
    async fn a_zone_that_is_half_down_keeps_calls_in_proportion() {
        let mut zoned = policy();
        zoned.zone_affinity = Some(crate::config::ZoneAffinityConfig {
            min_healthy_percent: 70,
        });
        let locality = Locality::new(Some(String::new()), Some("node-1".into()));
        assert_eq!(locality.zone(), None, "an empty label is no zone");
        let doc: EndpointsConfig = serde_json::from_value(serde_json::json!({
            "schemaVersion": "1.0", "generation": "g", "namespace": "shop",
            "services": {"inventory.shop": {"groups": [{"ports": {"": 8080}, "endpoints": [
                {"addresses": ["10.244.0.1"], "ready": true, "zone": "a", "node": "node-1"}
            ]}]}},
        }))
        .expect("doc");
        locality.learn(&doc);
        assert_eq!(locality.zone(), Some("a"));
        let all = Destinations::new(locality);
        let in_zone = |last: u8, zone: &str| Discovered {
            zone: Some(zone.to_owned()),
            ..pod(last, "inventory", false)
        };
        let d = all.get(
            "inventory.shop:80",
            &zoned,
            EndpointSource::Discovered(vec![
                in_zone(1, "a"),
                in_zone(2, "a"),
                in_zone(3, "a"),
                in_zone(4, "a"),
                in_zone(5, "b"),
            ]),
            None,
        );
        let endpoints = d.endpoints().await;
        let mut rng = fastrand::Rng::with_seed(7);
        let everyone: Vec<(usize, f64)> = (0..5).map(|i| (i, 1.0)).collect();
        let picked = d.in_zone(&endpoints, &everyone, &mut rng).expect("zoned");
        assert_eq!(picked.len(), 4, "healthy zone: its pods only");
        // Pods 1 and 2 ejected (not among the candidates).
        let half: Vec<(usize, f64)> = vec![(2, 1.0), (3, 1.0), (4, 1.0)];
        let stayed = (0..10_000)
            .filter(|_| {
                let p = d.in_zone(&endpoints, &half, &mut rng).expect("zoned");
                p.iter().all(|(i, _)| *i < 4)
            })
            .count();
        let expected = 10_000.0 * 50.0 / 70.0;
        assert!(
            (stayed as f64 - expected).abs() < 300.0,
            "{stayed} of 10000 stayed, about {expected:.0} expected"
        );
        let none: Vec<(usize, f64)> = vec![(4, 1.0)];
        assert_eq!(d.in_zone(&endpoints, &none, &mut rng), Some(none.clone()));
    }

    #[tokio::test]
    async fn a_failed_lookup_is_not_repeated_on_every_request() {
        let policy: ServicePolicy = serde_json::from_str(
            r#"{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"}"#,
        )
        .expect("policy");
        let d = Destination::new(
            "nowhere:80".into(),
            policy,
            EndpointSource::Dns {
                // RFC 6761: never resolves.
                host: "weft-test.invalid".into(),
                port: 80,
            },
            None,
        );
        assert!(d.endpoints().await.is_empty());
        let (asked, _) = d.cached();
        assert!(asked.is_some(), "the failure is remembered");
        // Within the retry interval the next request does not ask again
        // (asking would move the timestamp).
        assert!(d.endpoints().await.is_empty());
        assert_eq!(d.cached().0, asked);
    }
}
