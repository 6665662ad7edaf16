//! The operator's `/metrics`: reconciles and their durations, errors by
//! reason, failed compiles by reason, API writes by kind and verb (what "API requests per reconcile"
//! is computed from), the rollout phase per namespace, the earliest
//! workload-certificate expiry per namespace, and whether this replica
//! leads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::RolloutPhase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Result_ {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Write {
    kind: String,
    verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Phase {
    namespace: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ns {
    namespace: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<Result_, Counter>,
    errors: Family<Reason, Counter>,
    duration: Histogram,
    writes: Family<Write, Counter>,
    writes_total: std::sync::atomic::AtomicU64,
    compiles: Counter,
    compile_errors: Family<Reason, Counter>,
    phase: Family<Phase, Gauge>,
    expiry: Family<Ns, Gauge>,
    leader: Gauge,
    scrapes_skipped: Family<Reason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft_operator");
        let reconciles = Family::<Result_, Counter>::default();
        registry.register(
            "reconciles",
            "Namespace reconciles, by result",
            reconciles.clone(),
        );
        let errors = Family::<Reason, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed namespace reconciles, by reason",
            errors.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one namespace reconcile takes",
            duration.clone(),
        );
        let writes = Family::<Write, Counter>::default();
        registry.register(
            "api_writes",
            "Writes to the API server, by kind and verb",
            writes.clone(),
        );
        let compiles = Counter::default();
        registry.register("compiles", "Whole-mesh policy compiles", compiles.clone());
        let compile_errors = Family::<Reason, Counter>::default();
        registry.register(
            "compile_errors",
            "Whole-mesh policy compiles that failed (and are retried), by reason",
            compile_errors.clone(),
        );
        let phase = Family::<Phase, Gauge>::default();
        registry.register(
            "rollout_phase",
            "1 for each namespace's current mTLS rollout phase",
            phase.clone(),
        );
        let expiry = Family::<Ns, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "The earliest expiry of a namespace's workload certificates (Unix time)",
            expiry.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the lease and writes",
            leader.clone(),
        );
        let scrapes_skipped = Family::<Reason, Counter>::default();
        registry.register(
            "scrapes_skipped",
            "Proxy /metrics scrapes skipped: too large, too slow, or unreadable",
            scrapes_skipped.clone(),
        );
        Self {
            registry,
            scrapes_skipped,
            reconciles,
            errors,
            duration,
            writes,
            writes_total: Default::default(),
            compiles,
            compile_errors,
            phase,
            expiry,
            leader,
        }
    }
}

const PHASES: [RolloutPhase; 7] = [
    RolloutPhase::Permissive,
    RolloutPhase::Preparing,
    RolloutPhase::Observing,
    RolloutPhase::Enforcing,
    RolloutPhase::Strict,
    RolloutPhase::Blocked,
    RolloutPhase::RolledBack,
];

impl Metrics {
    /// A proxy's `/metrics` was skipped for `reason` (`too-large`,
    /// `timeout`, `unreadable`).
    pub fn scrape_skipped(&self, reason: &'static str) {
        self.scrapes_skipped.get_or_create(&Reason { reason }).inc();
    }

    /// Skipped scrapes so far for `reason`.
    pub fn scrapes_skipped(&self, reason: &'static str) -> u64 {
        self.scrapes_skipped.get_or_create(&Reason { reason }).get()
    }

    pub fn reconciled(&self, seconds: f64, error: Option<&'static str>) {
        self.duration.observe(seconds);
        let result = if error.is_some() { "error" } else { "ok" };
        self.reconciles.get_or_create(&Result_ { result }).inc();
        if let Some(reason) = error {
            self.errors.get_or_create(&Reason { reason }).inc();
        }
    }

    pub fn wrote(&self, kind: &str, verb: &'static str) {
        let kind = kind.to_owned();
        self.writes.get_or_create(&Write { kind, verb }).inc();
        self.writes_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes so far, all kinds and verbs.
    pub fn writes_total(&self) -> u64 {
        self.writes_total.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn compiled(&self) {
        self.compiles.inc();
    }

    pub fn compile_failed(&self, reason: &'static str) {
        self.compile_errors.get_or_create(&Reason { reason }).inc();
    }

    pub fn phase(&self, namespace: &str, phase: Option<RolloutPhase>) {
        for p in PHASES {
            let key = Phase {
                namespace: namespace.to_owned(),
                phase: format!("{p:?}"),
            };
            if Some(p) == phase {
                self.phase.get_or_create(&key).set(1);
            } else {
                self.phase.remove(&key);
            }
        }
    }

    pub fn expiry(&self, namespace: &str, at: Option<std::time::SystemTime>) {
        let key = Ns {
            namespace: namespace.to_owned(),
        };
        match at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
            Some(d) => {
                self.expiry.get_or_create(&key).set(d.as_secs() as i64);
            }
            None => {
                self.expiry.remove(&key);
            }
        }
    }

    /// Whether this replica leads. A replica that stops leading drops
    /// its per-namespace gauges: the leader reports them, and a standby's
    /// last values (a certificate expiry time that passes, a phase long
    /// changed) would set off alerts of their own.
    pub fn leading(&self, yes: bool) {
        self.leader.set(i64::from(yes));
        if !yes {
            self.phase.clear();
            self.expiry.clear();
        }
    }

    /// Drops the per-namespace gauges of a namespace that is going away.
    pub fn forget_namespace(&self, namespace: &str) {
        self.phase(namespace, None);
        self.expiry(namespace, None);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
