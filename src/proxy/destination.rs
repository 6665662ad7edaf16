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

use crate::config::{CircuitBreakerConfig, OutboundService, ServicePolicy};
use crate::proxy::http::pool::{CLUSTER_IP_H2_CONNECTIONS, Endpoint};
use crate::proxy::mesh::MeshTarget;
use crate::proxy::metrics::EdgeCache;

use super::resilience::{
    BreakerSettings, BreakerState, CircuitBreaker, FailureRateSettings, PeakEwma, RetryBudget,
    TokenBucket,
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
}

/// One endpoint and what the balancer knows of it.
pub struct EndpointState {
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
    pub load: Arc<PeakEwma>,
    pub breaker: Option<CircuitBreaker>,
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
    /// Metric series per route, for the metrics layer: over plaintext
    /// and over mesh TLS.
    pub edges: EdgeCache,
    pub tls_edges: EdgeCache,
    /// Who serves a meshed destination (its endpoints get mesh mTLS).
    pub mesh: Option<Arc<MeshTarget>>,
    source: EndpointSource,
    /// When DNS was last asked (None: never), and the endpoints.
    endpoints: Mutex<(Option<Instant>, EndpointList)>,
    /// Held by the one request refreshing DNS.
    refreshing: tokio::sync::Mutex<()>,
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
        let fixed = |addrs: &[SocketAddr], h2_connections| {
            let list = addrs
                .iter()
                .map(|a| endpoint(*a, &policy, &mesh, h2_connections))
                .collect();
            Some(Arc::new(list))
        };
        let static_endpoints = match &source {
            EndpointSource::Static(addrs) => fixed(addrs, 1),
            EndpointSource::ClusterIps(addrs) => fixed(addrs, CLUSTER_IP_H2_CONNECTIONS),
            EndpointSource::Dns { .. } => None,
        };
        let fixed = static_endpoints.is_some();
        Self {
            label,
            retry: Arc::new(policy.retry.clone()),
            has_breaker: policy.circuit_breaker.is_some(),
            published_circuit: std::sync::atomic::AtomicU8::new(0),
            budget,
            limiter,
            edges: EdgeCache::default(),
            tls_edges: EdgeCache::default(),
            mesh,
            endpoints: Mutex::new((
                fixed.then(Instant::now),
                static_endpoints.unwrap_or_default(),
            )),
            source,
            policy,
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Current endpoints, resolving DNS when the last answer is stale.
    pub async fn endpoints(&self) -> EndpointList {
        let (host, port) = match &self.source {
            EndpointSource::Static(_) | EndpointSource::ClusterIps(_) => return self.cached().1,
            EndpointSource::Dns { host, port } => (host.clone(), *port),
        };
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
                    known
                        .get(&a)
                        .cloned()
                        .unwrap_or_else(|| endpoint(a, &self.policy, &self.mesh, 1))
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
        &self.policy == policy && &self.source == source && &self.mesh == mesh
    }
}

fn endpoint(
    addr: SocketAddr,
    policy: &ServicePolicy,
    mesh: &Option<Arc<MeshTarget>>,
    h2_connections: usize,
) -> Arc<EndpointState> {
    Arc::new(EndpointState {
        addr,
        endpoint: Endpoint::meshed(addr, mesh.clone()).with_h2_connections(h2_connections),
        load: Arc::new(PeakEwma::new(DEFAULT_RTT, EWMA_DECAY)),
        breaker: breaker(&policy.circuit_breaker),
    })
}

/// Where a Service port's endpoints come from: explicit endpoints, else its
/// ClusterIPs, else (headless) DNS.
pub fn source_for(svc: &OutboundService, port: u16) -> EndpointSource {
    if !svc.endpoints.is_empty() {
        return EndpointSource::Static(
            svc.endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect(),
        );
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

/// Destinations by label, carried across config reloads.
#[derive(Default)]
pub struct Destinations {
    by_label: Mutex<HashMap<String, Arc<Destination>>>,
}

impl Destinations {
    /// The destination for `label`, reusing its state when nothing that
    /// shapes it changed.
    pub fn get(
        &self,
        label: &str,
        policy: &ServicePolicy,
        source: EndpointSource,
        mesh: Option<Arc<MeshTarget>>,
    ) -> Arc<Destination> {
        let mut map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(label)
            && d.same_as(policy, &source, &mesh)
        {
            return d.clone();
        }
        let d = Arc::new(Destination::new(
            label.to_owned(),
            policy.clone(),
            source,
            mesh,
        ));
        map.insert(label.to_owned(), d.clone());
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
