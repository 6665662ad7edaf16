//! A destination as the proxy sees it: one Service port (or, for traffic
//! to an address no config knows, that address), its resolved policy, and
//! the state that policy needs — retry budget, circuit breakers, rate
//! limiter, endpoints with their latency estimates.
//!
//! Destinations outlive config reloads: a reload that leaves a Service's
//! policy and endpoints unchanged keeps its state (an open circuit stays
//! open), anything else gets fresh state.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{
    CircuitBreakerConfig, EndpointsConfig, OutboundService, RateLimitConfig, ServicePolicy,
};
use crate::proxy::http::pool::{CLUSTER_IP_H2_CONNECTIONS, Endpoint};
use crate::proxy::mesh::MeshTarget;
use crate::proxy::metrics::EdgeCache;
use crate::proxy::origin::OriginTarget;

use super::resilience::{
    BreakerSettings, BreakerState, CircuitBreaker, FailureRateSettings, Hold, PeakEwma,
    RetryBudget, TokenBucket, lock,
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

/// Whether an address a DNS answer gave may be connected to: not this
/// pod's loopback, not link-local (the cloud metadata service at
/// 169.254.169.254), not unspecified or multicast. The proxy connects
/// from the user iptables leaves alone, so a name whose DNS answer
/// (a vendor's, or a wildcard's that anyone can make resolve anywhere)
/// pointed there would reach what the app itself may not.
pub fn usable_answer(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    use std::net::Ipv4Addr;
    let ip = ip.to_canonical();
    // IPv4 a NAT64 prefix (64:ff9b::/96) carries is judged as IPv4.
    let ip = match ip {
        IpAddr::V6(v6) if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
            let [.., a, b, c, d] = v6.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
        other => other,
    };
    // Cloud metadata services outside link-local: AWS's over IPv6 and
    // Alibaba's.
    const METADATA: [IpAddr; 2] = [
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    ];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || METADATA.contains(&ip)
        || match ip {
            // 0.0.0.0/8 is "this network": the host itself.
            IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast() || v4.octets()[0] == 0,
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        })
}

/// How the destinations of vendor hosts are keyed apart from Services'
/// (`name.ns:port`, which a host like `payments.shop` could equal) and
/// addresses: hosts an ExternalService lists by name, and hosts a
/// wildcard matched (as many as a workload names, so these alone are
/// bounded and forgotten).
pub const EXTERNAL_KEY_PREFIX: &str = "external:";
pub const WILDCARD_KEY_PREFIX: &str = "external*:";

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
    /// them ([`crate::config::EndpointsConfig`]), and how many pods of each
    /// zone are neither ready nor serving (never called, but counted in
    /// their zone's health).
    Discovered(Vec<Discovered>, Arc<BTreeMap<String, u32>>),
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
    /// Terminating: leaving, so not counted in its zone's health.
    pub terminating: bool,
    /// Its zone (EndpointSlice `zone`), for zone-aware routing.
    pub zone: Option<String>,
    /// A pod without the sidecar (the operator checked): plaintext.
    pub unmeshed: bool,
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
    /// one zone, so any verified endpoint on this proxy's node tells it.
    pub fn learn(&self, doc: &EndpointsConfig) {
        let Some(node) = &self.node else { return };
        if self.zone.get().is_some() {
            return;
        }
        // The proxy's own namespace's Services only: a tenant elsewhere
        // could run a pod on this node and publish it with any zone.
        let own = format!(".{}", doc.namespace);
        let found = doc
            .services
            .iter()
            .filter(|(key, _)| key.ends_with(&own))
            .flat_map(|(_, s)| &s.groups)
            .flat_map(|g| &g.endpoints)
            // Only an endpoint the operator verified against its pod: a
            // hand-written slice could claim any node and zone.
            .find(|e| {
                e.node.as_ref() == Some(node) && e.zone.is_some() && e.service_account.is_some()
            })
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
    /// Terminating (updated in place, as `draining`).
    terminating: std::sync::atomic::AtomicBool,
}

/// A destination's endpoints, shared with requests in flight.
pub type EndpointList = Arc<Endpoints>;

/// A destination's endpoints (a slice, through `Deref`), with the index
/// the balancer samples from, built on first use. Picking two endpoints
/// at random from the index costs the same with 3 endpoints as with
/// 1000; the full scan ([`Destination::in_zone`], the candidate lists of
/// the balancer) is left for what the index cannot answer: a retry that
/// avoids pods already tried, a pinned pod, a zone that spills, every pod
/// draining or refused.
#[derive(Default)]
pub struct Endpoints {
    all: Vec<Arc<EndpointState>>,
    index: arc_swap::ArcSwapOption<SampleIndex>,
}

/// Indices into [`Endpoints`] by what they can take, as of the list's
/// making. Draining flags flip in place on the shared endpoint states when
/// a republished list replaces this one, so a sample is checked again
/// before use.
pub struct SampleIndex {
    /// The zone `local` was worked out for.
    zone: Option<Box<str>>,
    /// Endpoints not draining.
    pub serving: Vec<u32>,
    /// Endpoints not draining, in `zone`.
    pub local: Vec<u32>,
    /// Endpoints in `zone` not terminating (they count in its health).
    local_staying: usize,
}

impl Endpoints {
    /// The index for a proxy in `zone` (made again if the zone was learned
    /// after it was made).
    pub fn sample_index(&self, zone: Option<&str>) -> Arc<SampleIndex> {
        if let Some(index) = self.index.load_full()
            && index.zone.as_deref() == zone
        {
            return index;
        }
        let local = |e: &EndpointState| zone.is_some() && e.zone.as_deref() == zone;
        let mut index = SampleIndex {
            zone: zone.map(Into::into),
            serving: Vec::new(),
            local: Vec::new(),
            local_staying: 0,
        };
        for (i, e) in self.all.iter().enumerate() {
            // More endpoints than u32 can count cannot be published (the
            // document's size caps them far below).
            let Ok(i) = u32::try_from(i) else { break };
            if !e.is_draining() {
                index.serving.push(i);
                if local(e) {
                    index.local.push(i);
                }
            }
            if local(e) && !e.is_terminating() {
                index.local_staying += 1;
            }
        }
        let index = Arc::new(index);
        self.index.store(Some(index.clone()));
        index
    }
}

impl std::ops::Deref for Endpoints {
    type Target = [Arc<EndpointState>];
    fn deref(&self) -> &Self::Target {
        &self.all
    }
}

impl FromIterator<Arc<EndpointState>> for Endpoints {
    fn from_iter<I: IntoIterator<Item = Arc<EndpointState>>>(iter: I) -> Self {
        Self {
            all: iter.into_iter().collect(),
            index: Default::default(),
        }
    }
}

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
    /// The token bucket: this destination's own, or, for a limit shared
    /// by the namespace's pods, the one every destination of the policy's
    /// target holds ([`Destinations::attach`]).
    pub limiter: Option<Arc<TokenBucket>>,
    /// The Service's own back-off (`Retry-After`), when the policy
    /// honours it.
    pub hold: Option<Arc<Hold>>,
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
    /// A vendor reached with TLS this proxy originates (an ExternalService
    /// with `tls`).
    pub origin: Option<Arc<OriginTarget>>,
    /// The target's stored answers, when its policy caches them: one
    /// store per policy target ([`Destinations::attach`]).
    pub cache: Option<Arc<crate::proxy::http::cache::ResponseStore>>,
    source: Mutex<EndpointSource>,
    /// The name and port to resolve, for a headless Service (fixed).
    dns: Option<(String, u16)>,
    /// When DNS was last asked (None: never), and the endpoints.
    endpoints: Mutex<(Option<Instant>, EndpointList)>,
    /// Held by the one request refreshing DNS.
    refreshing: tokio::sync::Mutex<()>,
    /// Where this proxy runs (shared by all destinations).
    locality: Arc<Locality>,
    /// Pods neither ready nor serving, by zone (discovered endpoints).
    unready_by_zone: arc_swap::ArcSwap<BTreeMap<String, u32>>,
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
        Self::with_wire(label, policy, source, mesh, None)
    }

    /// [`Destination::new`] for a vendor, its connections TLS that this
    /// proxy originates as `origin` says.
    pub fn originated(
        label: String,
        policy: ServicePolicy,
        source: EndpointSource,
        origin: Option<Arc<OriginTarget>>,
    ) -> Self {
        Self::with_wire(label, policy, source, None, origin)
    }

    fn with_wire(
        label: String,
        policy: ServicePolicy,
        source: EndpointSource,
        mesh: Option<Arc<MeshTarget>>,
        origin: Option<Arc<OriginTarget>>,
    ) -> Self {
        let budget = RetryBudget::new(
            policy.retry.budget.percent,
            policy.retry.budget.min_per_second,
            Duration::from_millis(policy.retry.budget.window_ms.max(1)),
        );
        let limiter = policy
            .rate_limit
            .as_ref()
            .map(|rl| Arc::new(TokenBucket::new(rl.requests_per_second, rl.burst.max(1))));
        let static_endpoints = fixed_list(&source, &policy, &mesh, &origin, &[]);
        let unready = unready_of(&source);
        let fixed = static_endpoints.is_some();
        Self {
            label,
            retry: Arc::new(policy.retry.clone()),
            has_breaker: policy.circuit_breaker.is_some(),
            published_circuit: std::sync::atomic::AtomicU8::new(0),
            budget,
            limiter,
            hold: policy.retry_after.as_ref().map(|ra| {
                Arc::new(Hold::new(
                    Duration::from_millis(ra.max_wait_ms),
                    ra.max_queued,
                    Duration::from_millis(ra.max_back_off_ms),
                ))
            }),
            turn: std::sync::atomic::AtomicUsize::new(0),
            epoch: std::sync::atomic::AtomicU64::new(0),
            edges: EdgeCache::default(),
            tls_edges: EdgeCache::default(),
            mesh,
            origin,
            cache: None,
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
            unready_by_zone: arc_swap::ArcSwap::new(unready),
        }
    }

    /// The current endpoints when they are known without waiting: always
    /// for a list published or written in the config, and for a DNS name
    /// while its last answer is fresh or another request is refreshing it.
    /// None when [`Destination::endpoints`] has a lookup to make (or to
    /// wait for).
    pub fn endpoints_now(&self) -> Option<EndpointList> {
        let (resolved_at, current) = self.cached();
        match &self.dns {
            None => Some(current),
            Some(_) if resolved_at.is_some_and(|t| t.elapsed() < DNS_TTL) => Some(current),
            // Stale, and another request is refreshing it: the last
            // answer, as `endpoints` gives.
            Some(_) if !current.is_empty() && self.refreshing.try_lock().is_err() => Some(current),
            Some(_) => None,
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
            Ok(Ok(addrs)) => addrs.filter(|a| usable_answer(a.ip())).collect(),
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
                        endpoint(
                            a,
                            &self.policy,
                            &self.mesh,
                            &self.origin,
                            1,
                            Discovered::plain(a),
                        )
                    })
                })
                .collect::<Endpoints>(),
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

    /// `RoundRobin`'s next turn (one atomic add).
    pub fn take_turn(&self) -> usize {
        self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The balancer's quick answer to [`Destination::in_zone`]: the
    /// endpoints of `index` a first try samples from, or None when only
    /// the full scan can tell (the zone spills, or no endpoint serves).
    /// The zone's serving endpoints while the zone keeps every call (as
    /// many healthy as its policy's share asks), else all serving ones;
    /// the same test as `in_zone`, counted over the zone alone.
    pub fn serving_pool<'a>(
        &self,
        endpoints: &Endpoints,
        index: &'a SampleIndex,
        now: Instant,
    ) -> Option<&'a [u32]> {
        let pool = match (&self.policy.zone_affinity, self.locality.zone()) {
            (Some(affinity), Some(zone)) if index.zone.as_deref() == Some(zone) => {
                let healthy = index
                    .local
                    .iter()
                    .filter(|i| endpoints[**i as usize].is_healthy(now))
                    .count();
                match self.zone_stay(affinity, zone, index.local_staying, healthy) {
                    None => &index.serving,
                    Some(stay) if healthy > 0 && stay >= 1.0 => &index.local,
                    Some(_) => return None,
                }
            }
            (Some(_), Some(_)) => return None,
            _ => &index.serving,
        };
        (!pool.is_empty()).then_some(pool.as_slice())
    }

    /// How much of its calls the proxy's `zone` can keep: its `healthy`
    /// pods over the share `affinity` asks of the pods staying there, which
    /// are those not terminating (`staying`: leaving pods must not push
    /// calls out of the zone in a rolling update) and the unready ones
    /// discovery counted (pods failing readiness are a zone in trouble).
    /// 1 or more: the zone keeps every call. None: the zone has no pods.
    fn zone_stay(
        &self,
        affinity: &crate::config::ZoneAffinityConfig,
        zone: &str,
        staying: usize,
        healthy: usize,
    ) -> Option<f64> {
        let unready = self.unready_by_zone.load().get(zone).copied().unwrap_or(0);
        let in_zone = staying + unready as usize;
        (in_zone > 0).then(|| {
            healthy as f64 * 100.0
                / (in_zone as f64 * f64::from(affinity.min_healthy_percent.max(1)))
        })
    }

    /// The zone a proxy of this destination is in, if known.
    pub fn zone(&self) -> Option<&str> {
        self.locality.zone()
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
        self.in_zone_probing(endpoints, candidates, rng, true)
    }

    /// [`Destination::in_zone`]; `probing` false for a caller that takes
    /// no breaker permit (an opaque connection): it must not pile onto a
    /// pod on probation, whose breaker only a request can settle.
    pub fn in_zone_probing(
        &self,
        endpoints: &[Arc<EndpointState>],
        candidates: &[(usize, f64)],
        rng: &mut fastrand::Rng,
        probing: bool,
    ) -> Option<Vec<(usize, f64)>> {
        let (Some(affinity), Some(zone)) = (&self.policy.zone_affinity, self.locality.zone())
        else {
            return None;
        };
        let local = |e: &EndpointState| e.zone.as_deref() == Some(zone);
        let staying = endpoints
            .iter()
            .filter(|e| local(e) && !e.is_terminating())
            .count();
        let now = Instant::now();
        let healthy = candidates
            .iter()
            .map(|(i, _)| &endpoints[*i])
            .filter(|e| local(e) && e.is_healthy(now))
            .count();
        let stay = self.zone_stay(affinity, zone, staying, healthy)?;
        let here = healthy > 0 && (stay >= 1.0 || rng.f64() < stay);
        if !here && probing {
            // A pod of the zone on probation whose breaker lets a probe
            // through (the candidates are those admitted) takes this call:
            // its success is what brings the zone back, and nothing else
            // would send it one while the zone counts as down.
            let probe = candidates.iter().copied().find(|(i, _)| {
                let e = &endpoints[*i];
                local(e)
                    && !e.is_draining()
                    && e.breaker
                        .as_ref()
                        .is_some_and(|b| b.state(now) == BreakerState::HalfOpen)
            });
            if let Some(probe) = probe {
                return Some(vec![probe]);
            }
        }
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
        if !matches!(source, EndpointSource::Discovered(..))
            || !matches!(&*lock(&self.source), EndpointSource::Discovered(..))
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
        let next = fixed_list(&source, &self.policy, &self.mesh, &self.origin, &current)
            .unwrap_or_default();
        self.unready_by_zone.store(unready_of(&source));
        *lock(&self.endpoints) = (Some(Instant::now()), next);
        *source_now = source;
        true
    }
}

/// Pods neither ready nor serving, by zone ([`EndpointSource::Discovered`]).
type UnreadyByZone = Arc<BTreeMap<String, u32>>;

/// A discovered source's count of unready pods by zone (empty otherwise).
fn unready_of(source: &EndpointSource) -> UnreadyByZone {
    match source {
        EndpointSource::Discovered(_, unready) => unready.clone(),
        _ => Arc::default(),
    }
}

/// The endpoint list of a source known up front (not DNS), reusing the
/// state of `keep`'s endpoints that are the same pod with the same
/// identity and draining state.
fn fixed_list(
    source: &EndpointSource,
    policy: &ServicePolicy,
    mesh: &Option<Arc<MeshTarget>>,
    origin: &Option<Arc<OriginTarget>>,
    keep: &[Arc<EndpointState>],
) -> Option<EndpointList> {
    let plain = |addrs: &[SocketAddr], h2| {
        addrs
            .iter()
            .map(|a| endpoint(*a, policy, mesh, origin, h2, Discovered::plain(*a)))
            .collect::<Vec<_>>()
    };
    let list = match source {
        EndpointSource::Static(addrs) => plain(addrs, 1),
        EndpointSource::ClusterIps(addrs) => plain(addrs, CLUSTER_IP_H2_CONNECTIONS),
        EndpointSource::Dns { .. } => return None,
        EndpointSource::Discovered(pods, _) => {
            // A pod keeps its state while its address, identity and zone
            // are unchanged.
            type Key<'a> = (SocketAddr, Option<&'a str>, Option<&'a str>, bool);
            let known: HashMap<Key<'_>, &Arc<EndpointState>> = keep
                .iter()
                .map(|e| {
                    let meshed = e.endpoint.mesh.is_some();
                    (
                        (
                            e.addr,
                            e.service_account.as_deref(),
                            e.zone.as_deref(),
                            meshed,
                        ),
                        e,
                    )
                })
                .collect();
            // One expected identity per account, shared by its pods (their
            // pooled connections are keyed by it).
            let mut targets: HashMap<&str, Arc<MeshTarget>> = HashMap::new();
            pods.iter()
                .map(|p| {
                    let meshed = mesh.is_some() && !p.unmeshed;
                    let key = (
                        p.addr,
                        p.service_account.as_deref(),
                        p.zone.as_deref(),
                        meshed,
                    );
                    if let Some(e) = known.get(&key) {
                        e.draining
                            .store(p.draining, std::sync::atomic::Ordering::Relaxed);
                        e.terminating
                            .store(p.terminating, std::sync::atomic::Ordering::Relaxed);
                        return Arc::clone(e);
                    }
                    let target = match (mesh, p.service_account.as_deref()) {
                        // No sidecar, as the operator saw the pod: it
                        // cannot speak mesh TLS.
                        _ if p.unmeshed => None,
                        (Some(m), Some(sa)) => Some(
                            targets
                                .entry(sa)
                                .or_insert_with(|| Arc::new(m.for_account(sa)))
                                .clone(),
                        ),
                        _ => mesh.clone(),
                    };
                    endpoint(p.addr, policy, &target, &None, 1, p.clone())
                })
                .collect()
        }
    };
    Some(Arc::new(Endpoints {
        all: list,
        index: Default::default(),
    }))
}

fn endpoint(
    addr: SocketAddr,
    policy: &ServicePolicy,
    mesh: &Option<Arc<MeshTarget>>,
    origin: &Option<Arc<OriginTarget>>,
    h2_connections: usize,
    pod: Discovered,
) -> Arc<EndpointState> {
    Arc::new(EndpointState {
        addr,
        endpoint: Endpoint::meshed(addr, mesh.clone())
            .with_origin(origin.clone())
            .with_h2_connections(h2_connections),
        load: Arc::new(PeakEwma::new(DEFAULT_RTT, EWMA_DECAY)),
        breaker: breaker(&policy.circuit_breaker),
        draining: std::sync::atomic::AtomicBool::new(pod.draining),
        service_account: pod.service_account,
        zone: pod.zone.map(String::into_boxed_str),
        terminating: std::sync::atomic::AtomicBool::new(pod.terminating),
    })
}

impl Discovered {
    /// An address known with nothing else about it.
    fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            service_account: None,
            draining: false,
            terminating: false,
            zone: None,
            unmeshed: false,
        }
    }
}

impl EndpointState {
    /// Terminating or unready: new requests only when nothing else can.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn is_terminating(&self) -> bool {
        self.terminating.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Healthy, for zone-aware routing: not draining, and its breaker (if
    /// any) closed; a half-open one is still on probation.
    fn is_healthy(&self, now: Instant) -> bool {
        !self.is_draining()
            && self
                .breaker
                .as_ref()
                .is_none_or(|b| b.state(now) == BreakerState::Closed)
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
        && let Some((pods, unready)) = discovered.and_then(|d| discovered_pods(svc, port, d))
    {
        return EndpointSource::Discovered(pods, unready);
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
) -> Option<(Vec<Discovered>, UnreadyByZone)> {
    let published = discovered
        .services
        .get(&EndpointsConfig::key(&svc.namespace, &svc.name))?;
    let groups = &published.groups;
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
                        terminating: e.terminating,
                        zone: e.zone.clone(),
                        unmeshed: e.unmeshed,
                    });
                }
            }
        }
    }
    (!pods.is_empty()).then(|| (pods, Arc::new(published.unready_by_zone.clone())))
}

/// Destinations kept for bare addresses, before they are forgotten all at
/// once.
pub const MAX_ADDRESS_DESTINATIONS: usize = 4096;

/// Destinations by label, carried across config reloads.
#[derive(Default)]
pub struct Destinations {
    by_label: Mutex<HashMap<String, Arc<Destination>>>,
    /// How many of them are vendor hosts a wildcard matched
    /// ([`WILDCARD_KEY_PREFIX`]).
    external_count: std::sync::atomic::AtomicUsize,
    /// Where this proxy runs, shared with every destination.
    pub locality: Arc<Locality>,
    /// The namespace's client pods by ServiceAccount, as the endpoints
    /// document last counted them, and this proxy's own ServiceAccount:
    /// how namespace-wide rate limits are divided.
    sharing: Mutex<(BTreeMap<String, u32>, String)>,
    /// The buckets of namespace-wide limits, one per policy (and so per
    /// target: a TrafficPolicy has one) and setting: every destination of
    /// the target (each host a wildcard matches, each port of a Service)
    /// draws on it, and a destination rebuilt by a reload finds it again
    /// rather than a fresh burst.
    shared_buckets: Mutex<HashMap<String, (Arc<TokenBucket>, RateLimitConfig)>>,
    /// The response caches, one per policy and setting, as the shared
    /// buckets: every destination of a target uses its target's, and a
    /// reload that leaves the settings as they were keeps the answers.
    /// Held by the destinations only: a store whose settings changed goes
    /// (with its memory and its share of the proxy's cache budget) with
    /// the last destination that used it.
    caches: Mutex<HashMap<String, std::sync::Weak<crate::proxy::http::cache::ResponseStore>>>,
    /// Where the caches publish their size.
    metrics: Arc<crate::proxy::metrics::ProxyMetrics>,
}

impl Destinations {
    /// Publishes the caches' sizes to `metrics` (the proxy's).
    pub fn with_metrics(mut self, metrics: Arc<crate::proxy::metrics::ProxyMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn new(locality: Locality) -> Self {
        Self {
            by_label: Mutex::default(),
            external_count: Default::default(),
            locality: Arc::new(locality),
            sharing: Mutex::new((BTreeMap::new(), "default".to_owned())),
            shared_buckets: Mutex::default(),
            caches: Mutex::default(),
            metrics: Arc::default(),
        }
    }

    /// This proxy runs as ServiceAccount `sa` (whose pods may be named by
    /// a namespace-wide rate limit).
    pub fn set_service_account(&self, sa: &str) {
        lock(&self.sharing).1 = sa.to_owned();
    }

    /// A new count of the namespace's client pods: every destination
    /// with a namespace-wide limit takes its new share now.
    pub fn reshare(&self, clients: &BTreeMap<String, u32>) {
        let sharing = {
            let mut sharing = lock(&self.sharing);
            if sharing.0 == *clients {
                return;
            }
            sharing.0 = clients.clone();
            sharing.clone()
        };
        for (bucket, rl) in lock(&self.shared_buckets).values() {
            bucket.share_among(rl.sharers(&sharing.0, &sharing.1));
        }
    }

    /// What every new destination gets from the proxy: where it runs, and
    /// for a namespace-wide limit its target's bucket at this proxy's
    /// share.
    fn attach(&self, d: &mut Destination) {
        d.locality = self.locality.clone();
        if let Some(cache) = &d.policy.cache {
            let name = d.policy.source.clone().unwrap_or_else(|| d.label.clone());
            let key = format!("{name}|{cache:?}");
            let mut caches = lock(&self.caches);
            let store = match caches.get(&key).and_then(std::sync::Weak::upgrade) {
                Some(store) => store,
                None => {
                    let store = Arc::new(crate::proxy::http::cache::ResponseStore::new(
                        name,
                        cache.clone(),
                        self.metrics.clone(),
                    ));
                    caches.retain(|_, c| c.strong_count() > 0);
                    caches.insert(key, Arc::downgrade(&store));
                    store
                }
            };
            d.cache = Some(store);
        }
        let Some(rl) = d.policy.rate_limit.as_ref().filter(|r| r.shared.is_some()) else {
            return;
        };
        let key = format!(
            "{}|{}|{}|{:?}",
            d.policy.source.as_deref().unwrap_or(&d.label),
            rl.requests_per_second,
            rl.burst,
            rl.shared
        );
        let mut buckets = lock(&self.shared_buckets);
        let (bucket, _) = buckets.entry(key).or_insert_with(|| {
            let bucket = Arc::new(TokenBucket::new(rl.requests_per_second, rl.burst.max(1)));
            let (clients, own) = &*lock(&self.sharing);
            bucket.share_among(rl.sharers(clients, own));
            (bucket, rl.clone())
        });
        d.limiter = Some(bucket.clone());
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
        if let Some(old) = map.get(key).filter(|old| old.label == label)
            && let (Some(was), Some(now)) = (&old.hold, &d.hold)
        {
            now.inherit(was);
        }
        self.attach(&mut d);
        d.epoch.store(epoch, std::sync::atomic::Ordering::Release);
        let d = Arc::new(d);
        map.insert(key.to_owned(), d.clone());
        d
    }

    /// [`Destinations::get_keyed`] for a bare address (an address no
    /// Service claims, or a pod called alone): kept by the address, and
    /// all such forgotten at once past [`MAX_ADDRESS_DESTINATIONS`], so
    /// rotating external IPs and pod churn cannot grow the map for the
    /// proxy's life (each snapshot's own cache is emptied with every new
    /// endpoints document, so the cap must hold here).
    pub fn get_address(
        &self,
        addr: SocketAddr,
        label: &str,
        policy: &ServicePolicy,
        mesh: Option<Arc<MeshTarget>>,
    ) -> Arc<Destination> {
        let key = addr.to_string();
        {
            let mut map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
            if !map.contains_key(&key) && map.len() >= MAX_ADDRESS_DESTINATIONS {
                let is_address = |k: &str| k.parse::<SocketAddr>().is_ok();
                if map.keys().filter(|k| is_address(k)).count() >= MAX_ADDRESS_DESTINATIONS {
                    tracing::debug!("address destinations at their limit; forgetting them");
                    map.retain(|k, _| !is_address(k));
                }
            }
        }
        self.get_keyed(
            &key,
            label,
            policy,
            EndpointSource::Static(vec![addr]),
            mesh,
            0,
        )
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.by_label
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The destination of a vendor host, kept under `key`
    /// ([`super::state::ConfigStore::external_destination`]). Vendor hosts
    /// a wildcard claims are as many as a workload names: past
    /// [`MAX_ADDRESS_DESTINATIONS`] of them, their state is forgotten, as
    /// for bare addresses.
    pub fn get_external(
        &self,
        key: &str,
        label: &str,
        policy: &ServicePolicy,
        source: EndpointSource,
        origin: Option<Arc<OriginTarget>>,
    ) -> Arc<Destination> {
        let mut map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(key)
            && &d.policy == policy
            && *lock(&d.source) == source
            && d.origin == origin
        {
            return d.clone();
        }
        if key.starts_with(WILDCARD_KEY_PREFIX) && !map.contains_key(key) {
            let held = self
                .external_count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if held > MAX_ADDRESS_DESTINATIONS {
                tracing::debug!("vendor host destinations at their limit; forgetting them");
                map.retain(|k, _| !k.starts_with(WILDCARD_KEY_PREFIX));
                self.external_count
                    .store(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let mut d = Destination::originated(label.to_owned(), policy.clone(), source, origin);
        self.attach(&mut d);
        if let Some(old) = map.get(key)
            && let (Some(was), Some(now)) = (&old.hold, &d.hold)
        {
            now.inherit(was);
        }
        let d = Arc::new(d);
        map.insert(key.to_owned(), d.clone());
        d
    }

    /// Forgets destinations a new config no longer names.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|label, _| keep(label));
        // A shared bucket no destination holds any more goes with them
        // (one a request in flight still holds is dropped with it).
        lock(&self.shared_buckets).retain(|_, (b, _)| Arc::strong_count(b) > 1);
        lock(&self.caches).retain(|_, c| c.strong_count() > 0);
        let external = map
            .keys()
            .filter(|k| k.starts_with(WILDCARD_KEY_PREFIX))
            .count();
        self.external_count
            .store(external, std::sync::atomic::Ordering::Relaxed);
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
            terminating: draining,
            zone: None,
            unmeshed: false,
        }
    }

    fn discovered(pods: Vec<Discovered>) -> EndpointSource {
        EndpointSource::Discovered(pods, Arc::default())
    }

    /// The balancer's sampling index: draining pods are left out, the
    /// zone's serving pods make the pool while the zone is healthy, and a
    /// zone that must spill (or one learned after the index was made) is
    /// left to the full scan or answered afresh.
    #[tokio::test]
    async fn the_sampling_pool_is_the_zones_serving_pods_while_the_zone_holds() {
        let mut zoned = policy();
        zoned.zone_affinity = Some(crate::config::ZoneAffinityConfig {
            min_healthy_percent: 70,
        });
        let locality = Locality::new(Some("a".into()), None);
        let all = Destinations::new(locality);
        let member = |last: u8, zone: &str, draining: bool| Discovered {
            zone: Some(zone.to_owned()),
            ..pod(last, "inventory", draining)
        };
        let d = all.get(
            "inventory.shop:80",
            &zoned,
            discovered(vec![
                member(1, "a", false),
                member(2, "a", false),
                member(3, "a", true),
                member(4, "b", false),
            ]),
            None,
        );
        let endpoints = d.endpoints().await;
        let now = Instant::now();
        let index = endpoints.sample_index(d.zone());
        assert_eq!(index.serving, [0, 1, 3], "the draining pod is not sampled");
        // Two of the zone's two staying pods healthy: the zone's pool.
        assert_eq!(
            d.serving_pool(&endpoints, &index, now),
            Some(&[0u32, 1][..])
        );
        // One ejected: 50 % < 70 %, the zone spills in proportion, which
        // only the full scan decides.
        let b = endpoints[0].breaker.as_ref().expect("breaker");
        b.try_acquire(now).expect("closed").failure(now);
        assert_eq!(d.serving_pool(&endpoints, &index, now), None);

        // Without a zone, every serving pod; an index made for no zone is
        // made again once the zone is known.
        let plain = all.get(
            "cart.shop:80",
            &policy(),
            discovered(vec![member(5, "a", false), member(6, "b", true)]),
            None,
        );
        let endpoints = plain.endpoints().await;
        let none = endpoints.sample_index(None);
        assert_eq!(
            (none.serving.as_slice(), none.local.len()),
            (&[0u32][..], 0)
        );
        let a = endpoints.sample_index(Some("a"));
        assert_eq!(a.local, [0]);
        assert_eq!(plain.serving_pool(&endpoints, &a, now), Some(&[0u32][..]));
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
        let first = discovered(vec![pod(1, "inventory", false), pod(2, "inventory", false)]);
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

        let next = discovered(vec![
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
        let older = discovered(vec![pod(1, "inventory", false)]);
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
            "services": {
                // Another namespace's pod on this node, published with a
                // zone of its choosing: not trusted for this proxy's zone.
                "evil.other": {"groups": [{"ports": {"": 8080}, "endpoints": [
                    {"addresses": ["10.244.0.8"], "ready": true, "zone": "evil", "node": "node-1",
                     "pod": "evil-0", "serviceAccount": "evil"}
                ]}]},
                "inventory.shop": {"groups": [{"ports": {"": 8080}, "endpoints": [
                {"addresses": ["10.244.0.9"], "ready": true, "zone": "evil", "node": "node-1"},
                {"addresses": ["10.244.0.1"], "ready": true, "zone": "a", "node": "node-1",
                 "pod": "inventory-0", "serviceAccount": "inventory"}
            ]}]}
            },
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
            discovered(vec![
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

    /// A rolling update (terminating pods in the zone) keeps calls in the
    /// zone; pods failing readiness (published only as a count) and a
    /// breaker on probation (half-open) count against it, the latter
    /// taking the probe that can close it.
    #[tokio::test]
    async fn terminating_pods_leave_the_zone_and_unready_or_probing_ones_count_against_it() {
        let mut zoned = policy();
        zoned.zone_affinity = Some(crate::config::ZoneAffinityConfig {
            min_healthy_percent: 70,
        });
        zoned.circuit_breaker = Some(crate::config::CircuitBreakerConfig {
            consecutive_failures: 1,
            failure_rate: None,
            open_ms: 1,
            max_open_ms: 1,
        });
        let all = Destinations::new(Locality::new(Some("a".into()), None));
        let member = |last: u8, zone: &str, terminating: bool| Discovered {
            zone: Some(zone.to_owned()),
            terminating,
            ..pod(last, "inventory", terminating)
        };
        let pods = vec![
            member(1, "a", false),
            member(2, "a", false),
            member(3, "a", true),
            member(4, "a", true),
            member(5, "b", false),
        ];
        let d = all.get(
            "inventory.shop:80",
            &zoned,
            EndpointSource::Discovered(pods.clone(), Arc::default()),
            None,
        );
        let endpoints = d.endpoints().await;
        let serving: Vec<(usize, f64)> = vec![(0, 1.0), (1, 1.0), (4, 1.0)];
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..100 {
            let p = d.in_zone(&endpoints, &serving, &mut rng).expect("zoned");
            assert_eq!(p, vec![(0, 1.0), (1, 1.0)], "two of two staying pods");
        }
        // Two more pods of zone a fail readiness: two of four healthy.
        let unready = EndpointSource::Discovered(pods, Arc::new(BTreeMap::from([("a".into(), 2)])));
        let d = all.get_at("inventory.shop:80", &zoned, unready, None, 1);
        let stayed = (0..1000)
            .filter(|_| {
                d.in_zone(&endpoints, &serving, &mut rng)
                    .is_some_and(|p| p.iter().all(|(i, _)| *i < 4))
            })
            .count();
        assert!(
            (600..830).contains(&stayed),
            "{stayed} of 1000 stayed, about 714 expected"
        );
        // Pod 1's breaker on probation: one of four healthy.
        let endpoints = d.endpoints().await;
        let b = endpoints[0].breaker.as_ref().expect("breaker");
        b.try_acquire(Instant::now())
            .expect("closed")
            .failure(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
        let mut probes = 0;
        let stayed = (0..1000)
            .filter(|_| {
                let p = d.in_zone(&endpoints, &serving, &mut rng).expect("zoned");
                probes += usize::from(p == [(0, 1.0)]);
                p.iter().all(|(i, _)| *i < 4) && p != [(0, 1.0)]
            })
            .count();
        assert!(probes > 0, "pod 1 takes the probe when the zone is left");
        assert!(
            (250..470).contains(&stayed),
            "{stayed} of 1000 stayed, about 357 expected"
        );
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

    #[test]
    fn forgetting_wildcard_hosts_leaves_listed_vendors_and_services_named_alike_alone() {
        let all = Destinations::default();
        let service = all.get_at(
            "external-dns.kube-system:7979",
            &policy(),
            EndpointSource::Static(vec![]),
            None,
            0,
        );
        let listed = all.get_external(
            &format!("{EXTERNAL_KEY_PREFIX}api.x.example:443"),
            "api.x.example:443",
            &policy(),
            EndpointSource::Static(vec![]),
            None,
        );
        for n in 0..=MAX_ADDRESS_DESTINATIONS + 1 {
            let host = format!("h{n}.x.example:443");
            all.get_external(
                &format!("{WILDCARD_KEY_PREFIX}{host}"),
                &host,
                &policy(),
                EndpointSource::Dns {
                    host: host.clone(),
                    port: 443,
                },
                None,
            );
        }
        assert!(
            all.count() <= MAX_ADDRESS_DESTINATIONS + 2,
            "{}",
            all.count()
        );
        let listed_again = all.get_external(
            &format!("{EXTERNAL_KEY_PREFIX}api.x.example:443"),
            "api.x.example:443",
            &policy(),
            EndpointSource::Static(vec![]),
            None,
        );
        assert!(
            Arc::ptr_eq(&listed, &listed_again),
            "a listed vendor host kept its state"
        );
        let again = all.get_at(
            "external-dns.kube-system:7979",
            &policy(),
            EndpointSource::Static(vec![]),
            None,
            0,
        );
        assert!(Arc::ptr_eq(&service, &again), "the Service kept its state");
    }

    #[test]
    fn dns_answers_that_point_inside_the_pod_or_at_metadata_are_not_used() {
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "0.1.2.3",
            "fd00:ec2::254",
            "100.100.100.200",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!usable_answer(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["10.0.0.1", "203.0.113.7", "2001:db8::1"] {
            assert!(usable_answer(ip.parse().expect("ip")), "{ip}");
        }
    }
}
