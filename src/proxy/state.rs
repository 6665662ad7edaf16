//! The config a proxy runs: the current [`Snapshot`] behind an atomic
//! pointer, swapped whole on reload. A request takes the snapshot once, at
//! its start, and finishes on it even if a newer config arrives meanwhile.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use crate::config::{OutboundService, ProxyConfig, ServicePolicy};

use super::destination::{Destination, Destinations, EndpointSource, source_for};
use super::metrics::ProxyMetrics;

/// One config, indexed for the data path.
pub struct Snapshot {
    pub config: ProxyConfig,
    by_addr: HashMap<SocketAddr, usize>,
    by_host: HashMap<String, usize>,
    by_key: HashMap<String, usize>,
    /// Destinations already looked up on this snapshot.
    dsts: Mutex<HashMap<String, Arc<Destination>>>,
}

impl Snapshot {
    pub fn new(config: ProxyConfig) -> Self {
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
        Self {
            config,
            by_addr,
            by_host,
            by_key,
            dsts: Mutex::default(),
        }
    }

    pub fn generation(&self) -> &str {
        &self.config.generation
    }

    /// The Service behind a ClusterIP and port.
    pub fn by_addr(&self, addr: SocketAddr) -> Option<&OutboundService> {
        self.by_addr
            .get(&addr)
            .map(|i| &self.config.outbound.services[*i])
    }

    /// The Service a hostname names (`name`, `name.ns`, FQDN), port ignored.
    pub fn by_host(&self, host: &str) -> Option<&OutboundService> {
        let host = host.trim_end_matches('.');
        self.by_host
            .get(host)
            .map(|i| &self.config.outbound.services[*i])
    }

    /// A Service by `name.namespace`.
    pub fn by_key(&self, key: &str) -> Option<&OutboundService> {
        self.by_key
            .get(key)
            .map(|i| &self.config.outbound.services[*i])
    }

    pub fn policy<'a>(&'a self, svc: &'a OutboundService) -> &'a ServicePolicy {
        svc.policy
            .as_ref()
            .unwrap_or(&self.config.outbound.defaults)
    }

    /// The destination for a Service port.
    pub fn service_destination(
        &self,
        svc: &OutboundService,
        port: u16,
        all: &Destinations,
    ) -> Arc<Destination> {
        let label = format!("{}.{}:{port}", svc.name, svc.namespace);
        self.destination(label, all, || {
            (
                self.policy(svc).clone(),
                source_for(svc, port),
                svc.mesh
                    .as_ref()
                    .map(|m| Arc::new(crate::proxy::mesh::MeshTarget::from_config(m))),
            )
        })
    }

    /// The destination for an address no Service claims: the default
    /// policy, straight to that address.
    pub fn address_destination(&self, addr: SocketAddr, all: &Destinations) -> Arc<Destination> {
        self.destination(addr.to_string(), all, || {
            (
                self.config.outbound.defaults.clone(),
                EndpointSource::Static(vec![addr]),
                None,
            )
        })
    }

    fn destination(
        &self,
        label: String,
        all: &Destinations,
        make: impl FnOnce() -> (
            ServicePolicy,
            EndpointSource,
            Option<Arc<crate::proxy::mesh::MeshTarget>>,
        ),
    ) -> Arc<Destination> {
        let mut cache = self.dsts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = cache.get(&label) {
            return d.clone();
        }
        let (policy, source, mesh) = make();
        let d = all.get(&label, &policy, source, mesh);
        cache.insert(label, d.clone());
        d
    }
}

/// The current snapshot and whether the proxy may report ready.
pub struct ConfigStore {
    current: ArcSwapOption<Snapshot>,
    metrics: Arc<ProxyMetrics>,
    pub destinations: Destinations,
    listening: AtomicBool,
}

impl ConfigStore {
    pub fn new(metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            metrics,
            destinations: Destinations::default(),
            listening: AtomicBool::new(false),
        }
    }

    /// The snapshot in force, if a config was ever loaded.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Swaps in a new config unless it is the one in force. Returns whether
    /// anything changed.
    pub fn apply(&self, config: ProxyConfig) -> bool {
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
        self.current.store(Some(Arc::new(Snapshot::new(config))));
        // Forget state of Services that are gone; addresses are kept.
        self.destinations.retain(|label| {
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
