//! The config a proxy runs: the current [`Snapshot`] behind an atomic
//! pointer, swapped whole on reload. A request takes the snapshot once, at
//! its start, and finishes on it even if a newer config arrives meanwhile.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use crate::config::{
    EndpointsConfig, ExternalPortConfig, ExternalPortProtocol, ExternalServiceConfig,
    OutboundService, ProxyConfig, ServicePolicy,
};

use super::destination::{
    Destination, Destinations, EXTERNAL_KEY_PREFIX, Locality, MAX_ADDRESS_DESTINATIONS,
    WILDCARD_KEY_PREFIX, source_for,
};
use super::http::route::normalize_path;
use super::metrics::ProxyMetrics;
use super::origin::{Originate, Originations};
use super::resilience::lock;

/// A Service's destinations by port: a short list, searched in order.
type PortDestinations = Vec<(u16, Arc<Destination>)>;

/// One of a snapshot's Services, as its lookups hand it out: the index
/// keys the snapshot's per-Service caches.
#[derive(Clone, Copy)]
pub struct ServiceRef<'a> {
    index: usize,
    svc: &'a OutboundService,
}

impl std::ops::Deref for ServiceRef<'_> {
    type Target = OutboundService;

    fn deref(&self) -> &OutboundService {
        self.svc
    }
}

/// One config, indexed for the data path, with the pods discovery
/// published for its Services (if any yet).
pub struct Snapshot {
    pub config: ProxyConfig,
    pub endpoints: Option<Arc<EndpointsConfig>>,
    /// Which endpoints document (in the order the store took them).
    endpoints_epoch: u64,
    by_addr: HashMap<SocketAddr, usize>,
    /// Published pods of meshed Services by address and port, for callers
    /// that dial a pod directly.
    by_pod: HashMap<SocketAddr, PodEntry>,
    /// Who a published pod address belongs to, as inbound metrics name a
    /// plaintext caller (see [`Snapshot::pod_source`]).
    pod_sources: HashMap<IpAddr, Arc<str>>,
    by_host: HashMap<String, usize>,
    by_key: HashMap<String, usize>,
    /// ExternalServices (their index in the config) by exact host, and by
    /// the suffix of a `*.` wildcard (`carrier.example` for
    /// `*.carrier.example`).
    external_exact: HashMap<String, usize>,
    external_wildcard: HashMap<String, usize>,
    /// TLS originations by (ExternalService index, port).
    originations: HashMap<(usize, u16), Result<Arc<Originate>, String>>,
    /// The inbound rate limits' buckets, one limiter per entry of the
    /// config's `inbound.rateLimits`.
    pub inbound_limits: super::inbound_limit::Limits,
    /// Destinations already looked up on this snapshot, so that a request
    /// costs no label formatting or string hashing: per Service (by its
    /// index in the config) the ports seen, and per bare address.
    by_service_port: Mutex<Vec<PortDestinations>>,
    by_address: Mutex<HashMap<SocketAddr, Arc<Destination>>>,
}

impl Snapshot {
    pub fn new(config: ProxyConfig) -> Self {
        Self::with_endpoints(config, None, 0)
    }

    pub fn with_endpoints(
        mut config: ProxyConfig,
        endpoints: Option<Arc<EndpointsConfig>>,
        endpoints_epoch: u64,
    ) -> Self {
        // Requests are matched against excluded paths in the normalised
        // form (see `outbound`), so the config's are held in it too.
        let policies = std::iter::once(&mut config.outbound.defaults)
            .chain(
                config
                    .outbound
                    .services
                    .iter_mut()
                    .filter_map(|s| s.policy.as_mut()),
            )
            .chain(
                config
                    .outbound
                    .external_services
                    .iter_mut()
                    .filter_map(|s| s.policy.as_mut()),
            );
        for policy in policies {
            for path in &mut policy.excluded_paths {
                if let std::borrow::Cow::Owned(normal) = normalize_path(path) {
                    *path = normal;
                }
            }
        }
        let mut by_addr = HashMap::new();
        let mut by_host = HashMap::new();
        let mut by_key = HashMap::new();
        for (i, svc) in config.outbound.services.iter().enumerate() {
            by_key.insert(format!("{}.{}", svc.name, svc.namespace), i);
            for host in &svc.hostnames {
                by_host.insert(host.clone(), i);
            }
            if svc.namespace == config.namespace {
                by_host.insert(svc.name.clone(), i);
            }
            for ip in svc
                .cluster_ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
            {
                for p in &svc.ports {
                    by_addr.insert(SocketAddr::new(ip, p.port), i);
                }
            }
        }
        let mut external_exact = HashMap::new();
        let mut external_wildcard = HashMap::new();
        for (i, es) in config.outbound.external_services.iter().enumerate() {
            for host in &es.hosts {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(suffix) => external_wildcard.entry(suffix.to_owned()).or_insert(i),
                    None => external_exact.entry(host).or_insert(i),
                };
            }
        }
        let by_pod = endpoints
            .as_deref()
            .map(|doc| pods_by_address(&config, &by_key, doc))
            .unwrap_or_default();
        let pod_sources = sources_by_ip(&config, &by_pod);
        let services = config.outbound.services.len();
        Self {
            config,
            endpoints,
            endpoints_epoch,
            by_addr,
            by_pod,
            pod_sources,
            by_host,
            by_key,
            external_exact,
            external_wildcard,
            originations: HashMap::new(),
            inbound_limits: Vec::new(),
            by_service_port: Mutex::new(vec![Vec::new(); services]),
            by_address: Mutex::default(),
        }
    }

    pub fn generation(&self) -> &str {
        &self.config.generation
    }

    /// The Service behind a ClusterIP and port.
    pub fn by_addr(&self, addr: SocketAddr) -> Option<ServiceRef<'_>> {
        self.by_addr.get(&addr).map(|i| self.service(*i))
    }

    /// A verified pod of a meshed Service dialled directly at `addr` (its
    /// address and the port it listens on): a headless Service's pods, a
    /// StatefulSet's peers, an ingress controller that picks pods itself.
    pub fn by_pod(&self, addr: SocketAddr) -> Option<&PodEntry> {
        self.by_pod.get(&addr).filter(|p| !p.disputed)
    }

    /// The workload a plaintext caller's address belongs to, as discovery
    /// published it: `ns/<namespace>/sa/<account>`, the path of the SPIFFE
    /// id it would present over mTLS, without the scheme. Not verified (an
    /// address says nothing the caller proves; mTLS edges carry the
    /// verified id): it names a caller in the inbound metrics of a
    /// Permissive port, where a meshed pod's unmeshed neighbours and
    /// pod-IP callers would otherwise all read `unknown`. Only pods of the
    /// Services this namespace's scope publishes are known.
    pub fn pod_source(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.pod_sources.get(&ip).cloned()
    }

    /// The Service that alone claims a pod, if one does.
    pub fn pod_service(&self, pod: &PodEntry) -> Option<ServiceRef<'_>> {
        pod.service.map(|i| self.service(i))
    }

    /// The destination for a pod called alone (it is not among its
    /// Service's current endpoints, or two Services claim it): that pod,
    /// held to its own ServiceAccount's identity (plaintext when it has no
    /// sidecar), under the one claiming Service's policy and label, or
    /// the default policy and the address when the claim is shared (which
    /// Service the caller meant is not known).
    pub fn pod_alone(
        &self,
        addr: SocketAddr,
        pod: &PodEntry,
        all: &Destinations,
    ) -> Arc<Destination> {
        let mut cache = lock(&self.by_address);
        if let Some(d) = cache.get(&addr) {
            return d.clone();
        }
        if cache.len() >= MAX_ADDRESS_DESTINATIONS {
            cache.clear();
        }
        let claimant = &self.config.outbound.services[pod.claimant];
        let mesh = match (&claimant.mesh, pod.unmeshed) {
            (Some(m), false) => Some(Arc::new(
                crate::proxy::mesh::MeshTarget::from_config(m).for_account(&pod.service_account),
            )),
            _ => None,
        };
        let (label, policy) = match self.pod_service(pod).map(|s| s.svc) {
            Some(svc) => (
                format!("{}.{}:{}", svc.name, svc.namespace, pod.port),
                self.policy(svc),
            ),
            None => (addr.to_string(), &self.config.outbound.defaults),
        };
        let d = all.get_address(addr, &label, policy, mesh);
        cache.insert(addr, d.clone());
        d
    }

    /// The Service a hostname names (`name`, `name.ns`, FQDN), port ignored.
    pub fn by_host(&self, host: &str) -> Option<ServiceRef<'_>> {
        let host = host.trim_end_matches('.');
        self.by_host.get(host).map(|i| self.service(*i))
    }

    /// The ExternalService claiming `host` on `port` for `protocol` (a
    /// name as [`normal_host`] leaves it), its index and that port: an
    /// exact name listing the port so, else a wildcard of the name's
    /// leftmost label listing it.
    pub fn external_for(
        &self,
        host: &str,
        port: u16,
        protocol: ExternalPortProtocol,
    ) -> Option<ExternalMatch<'_>> {
        if self.external_exact.is_empty() && self.external_wildcard.is_empty() {
            return None;
        }
        let listing = |i: &usize| {
            let es = &self.config.outbound.external_services[*i];
            let p = es
                .ports
                .iter()
                .find(|p| p.port == port && p.protocol == protocol)?;
            Some(ExternalMatch {
                index: *i,
                es,
                port: p,
                exact: false,
            })
        };
        if let Some(m) = self.external_exact.get(host).and_then(listing) {
            return Some(ExternalMatch { exact: true, ..m });
        }
        match host.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.external_wildcard.get(parent).and_then(listing)
            }
            _ => None,
        }
    }

    /// The TLS origination of port `port` of the `index`-th
    /// ExternalService, built when the snapshot was (None: it has none).
    pub fn origination(&self, index: usize, port: u16) -> Option<&Result<Arc<Originate>, String>> {
        self.originations.get(&(index, port))
    }

    /// Builds the TLS originations of the config's ExternalServices, each
    /// setting taken from `built` (so a reload keeps the same ones, and
    /// the destinations that hold them).
    fn originate_with(mut self, built: &Originations) -> Self {
        for (i, es) in self.config.outbound.external_services.iter().enumerate() {
            for p in &es.ports {
                if let Some(tls) = &p.tls {
                    self.originations.insert((i, p.port), built.get(tls));
                }
            }
        }
        self
    }

    /// Takes the inbound rate limits' buckets from `built` (so a reload
    /// that leaves a policy's limits as they were keeps them).
    fn limit_with(mut self, built: &super::inbound_limit::Limiters) -> Self {
        self.inbound_limits = built.of(&self.config);
        self
    }

    /// Whether an ExternalService passes TLS through on `port` (only then
    /// is a TLS connection's ClientHello read for its SNI).
    pub fn lists_external_tls_port(&self, port: u16) -> bool {
        self.config.outbound.external_services.iter().any(|es| {
            es.ports
                .iter()
                .any(|p| p.port == port && p.protocol == crate::config::ExternalPortProtocol::Tls)
        })
    }

    /// A Service by `name.namespace`.
    pub fn by_key(&self, key: &str) -> Option<ServiceRef<'_>> {
        self.by_key.get(key).map(|i| self.service(*i))
    }

    fn service(&self, index: usize) -> ServiceRef<'_> {
        ServiceRef {
            index,
            svc: &self.config.outbound.services[index],
        }
    }

    pub fn policy<'a>(&'a self, svc: &'a OutboundService) -> &'a ServicePolicy {
        svc.policy
            .as_ref()
            .unwrap_or(&self.config.outbound.defaults)
    }

    /// The destination for a port of one of this snapshot's Services.
    pub fn service_destination(
        &self,
        svc: ServiceRef<'_>,
        port: u16,
        all: &Destinations,
    ) -> Arc<Destination> {
        let mut cache = lock(&self.by_service_port);
        let ports = &mut cache[svc.index];
        if let Some((_, d)) = ports.iter().find(|(p, _)| *p == port) {
            return d.clone();
        }
        let d = all.get_at(
            &format!("{}.{}:{port}", svc.name, svc.namespace),
            self.policy(&svc),
            source_for(&svc, port, self.endpoints.as_deref()),
            svc.mesh
                .as_ref()
                .map(|m| Arc::new(crate::proxy::mesh::MeshTarget::from_config(m))),
            self.endpoints_epoch,
        );
        ports.push((port, d.clone()));
        d
    }

    /// The destination for an address no Service claims: the default
    /// policy, straight to that address.
    pub fn address_destination(&self, addr: SocketAddr, all: &Destinations) -> Arc<Destination> {
        let mut cache = lock(&self.by_address);
        if let Some(d) = cache.get(&addr) {
            return d.clone();
        }
        if cache.len() >= MAX_ADDRESS_DESTINATIONS {
            cache.clear();
        }
        let d = all.get_address(
            addr,
            &addr.to_string(),
            &self.config.outbound.defaults,
            None,
        );
        cache.insert(addr, d.clone());
        d
    }
}

/// A verified pod a caller may dial directly: the Service claiming it
/// (its index in the config; None when two or more do) and that
/// Service's port, and the identity it must present.
#[derive(Debug)]
pub struct PodEntry {
    service: Option<usize>,
    /// A Service claiming it: whose namespace and strictness its mesh
    /// identity takes.
    claimant: usize,
    /// The Service port (the label its calls are counted under, and the
    /// protocol declared for it), of the one claiming Service.
    pub port: u16,
    pub service_account: String,
    /// No sidecar: called in plaintext.
    pub unmeshed: bool,
    /// Claims disagree on its identity: not indexed.
    disputed: bool,
}

/// [`Snapshot::pod_source`]'s index: each undisputed pod's address, with
/// its namespace and account; an address whose ports disagree on them is
/// left out.
fn sources_by_ip(
    config: &ProxyConfig,
    by_pod: &HashMap<SocketAddr, PodEntry>,
) -> HashMap<IpAddr, Arc<str>> {
    let mut by_ip: HashMap<IpAddr, Option<(&str, &str)>> = HashMap::new();
    for (addr, pod) in by_pod {
        let who = (!pod.disputed).then(|| {
            (
                config.outbound.services[pod.claimant].namespace.as_str(),
                pod.service_account.as_str(),
            )
        });
        by_ip
            .entry(addr.ip())
            .and_modify(|seen| {
                if *seen != who {
                    *seen = None;
                }
            })
            .or_insert(who);
    }
    // One shared name per account.
    let mut names: HashMap<(&str, &str), Arc<str>> = HashMap::new();
    by_ip
        .into_iter()
        .filter_map(|(ip, who)| {
            let (ns, sa) = who?;
            let name = names
                .entry((ns, sa))
                .or_insert_with(|| Arc::from(format!("ns/{ns}/sa/{sa}")))
                .clone();
            Some((ip, name))
        })
        .collect()
}

/// The published pods of `config`'s meshed Services, by the address and
/// port a caller dials. Only pods the operator verified against the pod
/// itself (an endpoint with a ServiceAccount): a slice is anyone's to
/// write in its namespace, and an unverified claim must not bend calls
/// to another tenant's pod. A pod two Services claim (a StatefulSet's
/// headless and regular Services, or a slice written to take it over)
/// keeps its identity but no Service's policy.
fn pods_by_address(
    config: &ProxyConfig,
    by_key: &HashMap<String, usize>,
    doc: &EndpointsConfig,
) -> HashMap<SocketAddr, PodEntry> {
    let mut pods = HashMap::new();
    for (key, endpoints) in &doc.services {
        let Some(&service) = by_key.get(key) else {
            continue;
        };
        let svc = &config.outbound.services[service];
        if svc.mesh.is_none() {
            continue;
        }
        for group in &endpoints.groups {
            for (name, target) in &group.ports {
                let Some(port) = svc
                    .ports
                    .iter()
                    .find(|p| p.name.as_deref().unwrap_or_default() == name)
                else {
                    continue;
                };
                for e in &group.endpoints {
                    let Some(sa) = &e.service_account else {
                        continue;
                    };
                    for ip in e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                        pods.entry(SocketAddr::new(ip, *target))
                            .and_modify(|p: &mut PodEntry| {
                                if p.service != Some(service) {
                                    p.service = None;
                                }
                                // Claims that disagree on who the pod is
                                // (an address a finished pod left, a claim
                                // written to take it over): nobody's.
                                let namespace = |i: usize| &config.outbound.services[i].namespace;
                                if p.service_account != *sa
                                    || p.unmeshed != e.unmeshed
                                    || namespace(p.claimant) != namespace(service)
                                {
                                    p.disputed = true;
                                }
                            })
                            .or_insert_with(|| PodEntry {
                                service: Some(service),
                                claimant: service,
                                port: port.port,
                                service_account: sa.clone(),
                                unmeshed: e.unmeshed,
                                disputed: false,
                            });
                    }
                }
            }
        }
    }
    pods
}

/// An ExternalService port claiming a host ([`Snapshot::external_for`]).
#[derive(Clone, Copy)]
pub struct ExternalMatch<'a> {
    /// The ExternalService's index in the config.
    pub index: usize,
    pub es: &'a ExternalServiceConfig,
    pub port: &'a ExternalPortConfig,
    /// Claimed by name, not by a wildcard.
    pub exact: bool,
}

/// A host as a request (`Host`, `:authority`) or a ClientHello (SNI)
/// names it, made comparable: lowercase, without the trailing dot of a
/// fully qualified name. None for what is not a DNS name (an address, a
/// name with other characters or an empty label), which no
/// ExternalService can claim.
pub fn normal_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                // `_` too: real names carry it (service records, some
                // tenants' subdomains), though an ExternalService can list
                // it only through a wildcard.
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && host.parse::<std::net::IpAddr>().is_err();
    valid.then(|| host.to_ascii_lowercase())
}

/// The current snapshot and whether the proxy may report ready.
pub struct ConfigStore {
    current: ArcSwapOption<Snapshot>,
    /// The last endpoints document, kept for the next config too, and how
    /// many the store took (each snapshot knows which it holds).
    endpoints: ArcSwapOption<EndpointsConfig>,
    endpoints_epoch: std::sync::atomic::AtomicU64,
    /// The API watch of `weft-endpoints` delivered: from then on it alone
    /// decides (the mounted file lags it by up to a minute, and applying
    /// it after a newer document would move the proxy back).
    endpoints_watched: AtomicBool,
    /// One writer at a time: a config and an endpoints document arriving
    /// together must not each build on the other's old half.
    writing: Mutex<()>,
    metrics: Arc<ProxyMetrics>,
    pub destinations: Destinations,
    /// TLS origination settings, built once each ([`super::origin`]).
    originations: Originations,
    /// Inbound rate limits' buckets, kept across reloads.
    limiters: super::inbound_limit::Limiters,
    listening: AtomicBool,
}

impl ConfigStore {
    pub fn new(metrics: Arc<ProxyMetrics>, locality: Locality) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            endpoints: ArcSwapOption::empty(),
            endpoints_epoch: std::sync::atomic::AtomicU64::new(0),
            endpoints_watched: AtomicBool::new(false),
            writing: Mutex::new(()),
            destinations: Destinations::new(locality).with_metrics(metrics.clone()),
            metrics,
            originations: Originations::default(),
            limiters: super::inbound_limit::Limiters::default(),
            listening: AtomicBool::new(false),
        }
    }

    /// This proxy runs as ServiceAccount `sa`: its share of namespace-wide
    /// rate limits ([`Destinations::set_service_account`]).
    pub fn service_account(self, sa: &str) -> Self {
        self.destinations.set_service_account(sa);
        self
    }

    /// Client certificates for TLS origination are read from `dir` (the
    /// identity directory, where the operator puts them).
    pub fn credentials_in(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.originations = Originations::with_credentials(dir);
        self
    }

    /// The destination of calls to vendor `host` (as [`normal_host`]
    /// leaves it) on an ExternalService's port: its policy, the vendor's
    /// addresses (resolved from `host`, or the config's fixed ones) and,
    /// with `tls`, originated TLS verified for the host. Kept per host and
    /// port, so a wildcard's hosts each get their own breaker, limits and
    /// series.
    pub fn external_destination(
        &self,
        snapshot: &Snapshot,
        host: &str,
        m: &ExternalMatch<'_>,
    ) -> Result<Arc<Destination>, String> {
        let named = format!("{host}:{}", m.port.port);
        // A name the config lists is its own series; the names a wildcard
        // matches are the workload's to make up, so theirs are bounded.
        let label = if m.exact {
            named.clone()
        } else {
            self.metrics.bounds.vendor_host(&named)
        };
        let origin = match snapshot.origination(m.index, m.port.port) {
            None if m.port.tls.is_some() => {
                // Never plaintext where the config says TLS.
                return Err("its TLS origination was not built".to_owned());
            }
            None => None,
            Some(Err(why)) => return Err(why.clone()),
            Some(Ok(originate)) => Some(Arc::new(super::origin::OriginTarget {
                name: originate.name_for(host).to_owned(),
                originate: originate.clone(),
                dst: label.clone(),
                metrics: self.metrics.clone(),
            })),
        };
        let source = if m.es.endpoints.is_empty() {
            // Absolute: a pod's resolver would try the cluster's search
            // domains first (ndots 5) for every lookup.
            super::destination::EndpointSource::Dns {
                host: format!("{host}."),
                port: m.port.target_port,
            }
        } else {
            super::destination::EndpointSource::Static(
                m.es.endpoints
                    .iter()
                    .filter_map(|e| e.parse().ok())
                    .collect(),
            )
        };
        let policy =
            m.es.policy
                .as_ref()
                .unwrap_or(&snapshot.config.outbound.defaults);
        let prefix = if m.exact {
            EXTERNAL_KEY_PREFIX
        } else {
            WILDCARD_KEY_PREFIX
        };
        Ok(self.destinations.get_external(
            &format!("{prefix}{named}"),
            &label,
            policy,
            source,
            origin,
        ))
    }

    /// The snapshot in force, if a config was ever loaded.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Swaps in a new config unless it is the one in force. Returns whether
    /// anything changed.
    pub fn apply(&self, config: ProxyConfig) -> bool {
        let _writing = lock(&self.writing);
        if self
            .load()
            .is_some_and(|s| s.generation() == config.generation)
        {
            return false;
        }
        let generation = config.generation.clone();
        let keys: std::collections::HashSet<String> = config
            .outbound
            .services
            .iter()
            .map(|s| format!("{}.{}", s.name, s.namespace))
            .collect();
        self.originations.keep_only(&config);
        self.limiters.keep_only(&config);
        let snapshot = Arc::new(
            Snapshot::with_endpoints(
                config,
                self.endpoints.load_full(),
                self.endpoints_epoch.load(Ordering::Acquire),
            )
            .originate_with(&self.originations)
            .limit_with(&self.limiters),
        );
        self.current.store(Some(snapshot.clone()));
        // Audit series of rules no longer audited go, so that edits of an
        // auditing policy do not pile series up.
        let auditing: std::collections::HashSet<(String, String)> = snapshot
            .config
            .inbound
            .authorizations
            .iter()
            .filter(|a| a.audit)
            .map(|a| (a.policy.clone(), a.revision.clone()))
            .collect();
        self.metrics
            .bounds
            .retain_audits(&auditing, &self.metrics.access_audit);
        // Forget state of Services and vendor hosts that are gone;
        // addresses are kept.
        self.destinations.retain(|label| {
            // (A vendor key holds a host as `normal_host` left it.)
            if let Some(host_port) = label
                .strip_prefix(EXTERNAL_KEY_PREFIX)
                .or_else(|| label.strip_prefix(WILDCARD_KEY_PREFIX))
            {
                return host_port.rsplit_once(':').is_some_and(|(host, port)| {
                    port.parse().is_ok_and(|port| {
                        snapshot
                            .external_for(host, port, ExternalPortProtocol::Http)
                            .is_some()
                    })
                });
            }
            label.parse::<SocketAddr>().is_ok()
                || label
                    .rsplit_once(':')
                    .is_some_and(|(svc, _)| keys.contains(svc))
        });
        self.metrics.set_generation(&generation);
        self.metrics.config_reloads.inc();
        tracing::info!(%generation, "config applied");
        true
    }

    /// Takes a new endpoints document unless it is the one in force; the
    /// config in force is re-indexed with it (destinations keep their
    /// state: [`Destinations`] moves a Service to its new pods in place).
    /// Returns whether anything changed.
    pub fn apply_endpoints(&self, endpoints: EndpointsConfig) -> bool {
        let _writing = lock(&self.writing);
        if self
            .endpoints
            .load()
            .as_ref()
            .is_some_and(|e| e.generation == endpoints.generation)
        {
            return false;
        }
        self.destinations.locality.learn(&endpoints);
        self.destinations.reshare(&endpoints.client_proxies);
        let generation = endpoints.generation.clone();
        let services = endpoints.services.len();
        self.swap_endpoints(Some(Arc::new(endpoints)));
        tracing::info!(%generation, services, "endpoints applied");
        true
    }

    /// The endpoints document is gone (the namespace was unmeshed, or the
    /// ConfigMap deleted): every Service goes back to its ClusterIP rather
    /// than to pod addresses nobody keeps current.
    pub fn clear_endpoints(&self) {
        let _writing = lock(&self.writing);
        if self.endpoints.load().is_none() {
            return;
        }
        // The client counts are kept: without them every proxy would take
        // a namespace-wide limit whole.
        self.swap_endpoints(None);
        tracing::info!("endpoints withdrawn: Services are reached through their ClusterIPs");
    }

    fn swap_endpoints(&self, endpoints: Option<Arc<EndpointsConfig>>) {
        let epoch = self.endpoints_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.endpoints.store(endpoints.clone());
        if let Some(current) = self.load() {
            self.current.store(Some(Arc::new(
                Snapshot::with_endpoints(current.config.clone(), endpoints, epoch)
                    .originate_with(&self.originations)
                    .limit_with(&self.limiters),
            )));
        }
        self.metrics.endpoints_reloads.inc();
    }

    /// From now on only the API watch sets endpoints ([`ConfigStore::endpoints_watched`]).
    pub fn watching_endpoints(&self) {
        self.endpoints_watched.store(true, Ordering::Release);
    }

    /// Whether the API watch of `weft-endpoints` has delivered.
    pub fn endpoints_watched(&self) -> bool {
        self.endpoints_watched.load(Ordering::Acquire)
    }

    pub fn record_failure(&self, why: &str) {
        self.metrics.config_reload_failures.inc();
        tracing::warn!(error = %why, "config not applied; keeping the last good one");
    }

    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// Ready: a config is loaded and the listeners are bound.
    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Acquire) && self.current.load().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only verified pods (the operator named their ServiceAccount) are
    /// called by address with their Service's policy; one two Services
    /// claim keeps its identity but no Service's policy; a pod without
    /// the sidecar is called in plaintext.
    #[test]
    fn pods_are_indexed_by_address_only_when_verified_and_unambiguous() {
        let service = |name: &str| {
            serde_json::json!({
                "name": name, "namespace": "shop", "hostnames": [],
                "clusterIps": ["10.96.0.1"],
                "ports": [{"port": 80, "name": "http", "targetPort": 8080, "protocol": "detect"}],
                "mesh": {"namespace": "shop"},
            })
        };
        let config = serde_json::json!({"schemaVersion":"1.0","generation":"g1","namespace":"shop","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},
            "services":[service("db"), service("db-headless"), service("cache")]}});
        let config = ProxyConfig::from_json(config.to_string().as_bytes()).expect("config");
        let endpoint = |ip: &str, sa: Option<&str>, unmeshed: bool| {
            let mut e = serde_json::json!({"addresses": [ip], "ready": true, "unmeshed": unmeshed});
            if let Some(sa) = sa {
                e["serviceAccount"] = sa.into();
                e["pod"] = "p".into();
            }
            e
        };
        let group = |eps: Vec<serde_json::Value>| serde_json::json!({"groups": [{"ports": {"http": 8080}, "endpoints": eps}]});
        let doc: EndpointsConfig = serde_json::from_value(serde_json::json!({
            "schemaVersion": "1.0", "generation": "e", "namespace": "shop",
            "services": {
                "db-headless.shop": group(vec![endpoint("10.244.0.1", Some("db"), false)]),
                "cache.shop": group(vec![
                    endpoint("10.244.0.2", Some("cache"), true),
                    endpoint("10.244.0.3", None, false),
                    endpoint("10.244.0.4", Some("cache"), false),
                ]),
                "db.shop": group(vec![
                    endpoint("10.244.0.1", Some("db"), false),
                    endpoint("10.244.0.4", Some("db"), false),
                ]),
            },
        }))
        .expect("doc");
        let snapshot = Snapshot::with_endpoints(config, Some(Arc::new(doc)), 1);
        let at = |ip: &str| SocketAddr::new(ip.parse().expect("ip"), 8080);
        let shared = snapshot.by_pod(at("10.244.0.1")).expect("indexed");
        assert!(
            snapshot.pod_service(shared).is_none(),
            "two Services claim it"
        );
        assert_eq!(shared.service_account, "db");
        let all = Destinations::default();
        let alone = snapshot.pod_alone(at("10.244.0.1"), shared, &all);
        assert_eq!(alone.label, "10.244.0.1:8080", "no Service's label");
        assert_eq!(
            alone.policy, snapshot.config.outbound.defaults,
            "nor policy"
        );
        let expected = alone.mesh.as_ref().expect("meshed");
        assert_eq!(expected.server.service_accounts, ["db"], "its own identity");

        let plain = snapshot.by_pod(at("10.244.0.2")).expect("indexed");
        assert_eq!(
            snapshot.pod_service(plain).map(|s| s.name.clone()),
            Some("cache".to_owned())
        );
        assert!(plain.unmeshed);
        assert!(
            snapshot
                .pod_alone(at("10.244.0.2"), plain, &all)
                .mesh
                .is_none(),
            "no sidecar: plaintext"
        );
        assert!(
            snapshot.by_pod(at("10.244.0.3")).is_none(),
            "an unverified claim is not indexed"
        );
        assert!(
            snapshot.by_pod(at("10.244.0.4")).is_none(),
            "claims that disagree on who the pod is: nobody's"
        );

        // Inbound metrics name a plaintext caller by the same index: a
        // verified pod by its namespace and account (two Services claiming
        // it agree on who it is), an unverified or disputed one not at all.
        let source = |ip: &str| snapshot.pod_source(ip.parse().expect("ip"));
        assert_eq!(source("10.244.0.1").as_deref(), Some("ns/shop/sa/db"));
        assert_eq!(source("10.244.0.2").as_deref(), Some("ns/shop/sa/cache"));
        assert_eq!(source("10.244.0.3"), None);
        assert_eq!(source("10.244.0.4"), None);
    }

    #[test]
    fn addresses_no_service_claims_are_kept_within_a_limit() {
        let json = r#"{"schemaVersion":"1.0","generation":"g1","namespace":"shop","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[]}}"#;
        let snapshot = Snapshot::new(ProxyConfig::from_json(json.as_bytes()).expect("config"));
        let all = Destinations::default();
        let addr =
            |n: usize| SocketAddr::from(([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 443));
        let first = snapshot.address_destination(addr(0), &all);
        assert!(Arc::ptr_eq(
            &first,
            &snapshot.address_destination(addr(0), &all)
        ));
        for n in 1..=MAX_ADDRESS_DESTINATIONS + 10 {
            snapshot.address_destination(addr(n), &all);
        }
        assert!(lock(&snapshot.by_address).len() <= MAX_ADDRESS_DESTINATIONS);
        assert!(all.count() <= MAX_ADDRESS_DESTINATIONS);
    }

    #[test]
    fn hosts_are_compared_as_dns_names() {
        assert_eq!(
            normal_host("API.Gateway.example."),
            Some("api.gateway.example".into())
        );
        assert_eq!(
            normal_host("tenant_1.x.example"),
            Some("tenant_1.x.example".into())
        );
        for not_a_name in ["10.0.0.1", "[::1]", "a..b", ".a.b", "a b.example", "", "."] {
            assert_eq!(normal_host(not_a_name), None, "{not_a_name:?}");
        }
    }

    #[test]
    fn an_exact_name_without_the_port_leaves_it_to_a_wildcard_and_a_wildcard_claims_one_label() {
        let json = r#"{"schemaVersion":"1.0","generation":"g1","namespace":"shop","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[],
            "externalServices":[
                {"name":"api","namespace":"shop","hosts":["api.x.example"],"ports":[{"port":80,"targetPort":443,"tls":{}}]},
                {"name":"any","namespace":"shop","hosts":["*.x.example"],"ports":[{"port":443,"protocol":"tls","targetPort":443}]}
            ]}}"#;
        let snapshot = Snapshot::new(ProxyConfig::from_json(json.as_bytes()).expect("config"));
        use crate::config::ExternalPortProtocol::{Http, Tls};
        let found = |host: &str, port, protocol| {
            snapshot
                .external_for(host, port, protocol)
                .map(|m| (m.es.name.as_str(), m.exact))
        };
        assert_eq!(found("api.x.example", 80, Http), Some(("api", true)));
        assert_eq!(found("api.x.example", 443, Tls), Some(("any", false)));
        assert_eq!(found("eu.x.example", 443, Tls), Some(("any", false)));
        assert_eq!(
            found("eu.x.example", 443, Http),
            None,
            "not for that protocol"
        );
        assert_eq!(found("x.example", 443, Tls), None);
        assert_eq!(found("a.eu.x.example", 443, Tls), None);
        assert_eq!(found("eu.x.example", 80, Http), None);
        assert!(snapshot.lists_external_tls_port(443));
        assert!(!snapshot.lists_external_tls_port(80));
    }
}
