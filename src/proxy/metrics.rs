//! The proxy's Prometheus metrics, served as text on the admin port.
//!
//! Label sets are small structs so every call site names what it counts.
//! Families are created once per proxy; requests only increment.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// One request, as counted on an edge of the service graph.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    /// This proxy's workload.
    pub src: String,
    /// The destination Service (`name.ns`) or address.
    pub dst: String,
    /// The route that matched (`ns/route/rule`), or `default`.
    pub route: String,
    /// `2xx` .. `5xx`, or `error` when no response came.
    pub status_class: String,
    pub tls: bool,
}

/// Latency has no status class: one histogram per edge and route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    pub direction: Direction,
    pub src: String,
    pub dst: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DstLabels {
    pub dst: String,
}

/// A request the response cache looked at, by destination and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub dst: String,
    /// `hit`, `revalidated`, `miss`, `stale`, `stale-if-error`
    /// ([`crate::proxy::http::cache::Outcome`]).
    pub result: &'static str,
}

/// One response cache: the TrafficPolicy (`namespace/name`) whose target
/// it serves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheStoreLabels {
    pub policy: String,
}

/// A TLS origination that failed, by destination and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginFailureLabels {
    pub dst: String,
    /// `unknown-issuer`, `bad-signature` (issued in the name of a trusted
    /// CA that did not sign it), `name-mismatch`, `expired`, `not-yet-valid`,
    /// `bad-certificate`, `alert` (the vendor refused us), `handshake`,
    /// `timeout`, `connection` (TCP, before any TLS), `bad-name`.
    pub reason: &'static str,
}

/// A destination no Service or ExternalService names, as the egress
/// control saw it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    /// The host (HTTP `Host`, TLS SNI) and port, else the address.
    pub dst: String,
    /// `http`, `tls` or `tcp`.
    pub protocol: &'static str,
    /// `refused` (RegistryOnly) or `allowed` (AllowAll: what the switch
    /// would refuse).
    pub action: &'static str,
}

/// A TLS connection passed through to a vendor, by vendor host and what
/// came of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExternalConnLabels {
    pub dst: String,
    /// `relayed`, `unresolved` or `connect-failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyErrorLabels {
    pub direction: Direction,
    pub dst: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    /// `http1`, `http2`, `tls`, `opaque`.
    pub protocol: String,
    pub tls: bool,
    pub port: PortLabel,
}

/// A plaintext inbound connection: the container port it reached and the
/// address it came from (the rollout maps addresses to pods). Both are
/// bounded ([`LabelBounds`]): past the bound they read `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaintextLabels {
    pub port: PortLabel,
    pub src_addr: String,
}

/// The label value for sources or ports past their bound.
pub const OTHER: &str = "other";

/// A port as a label value: the number, or `other` (port 0, which no
/// connection has) past the bound.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct PortLabel(pub u16);

impl EncodeLabelValue for PortLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self.0 {
            0 => EncodeLabelValue::encode(&OTHER, encoder),
            p => EncodeLabelValue::encode(&p, encoder),
        }
    }
}

/// Distinct ports that get a series of their own (per proxy, all
/// families): the inbound redirect catches every port, so a client
/// knocking on all 65535 would otherwise make as many series.
pub const MAX_PORT_LABELS: usize = 256;
/// Distinct source addresses that get a series of their own in the
/// plaintext families. Large, because the operator maps each to a pod:
/// plaintext past it reads `other`, which holds a rollout in Observing.
pub const MAX_SOURCE_LABELS: usize = 1024;
/// Distinct destinations named by workloads (not by the config) that get
/// a series of their own: vendor hosts a wildcard matches, hosts and
/// addresses no Service or ExternalService names.
pub const MAX_DESTINATION_LABELS: usize = 256;

/// Keeps the label sets built from network input bounded: the first
/// ports and source addresses seen get their own value, later new ones
/// read `other`. Ports with one atomic bitmap (no lock on the connection
/// path); addresses under a lock, on the plaintext path only.
pub struct LabelBounds {
    ports: Box<[std::sync::atomic::AtomicU64]>,
    port_count: std::sync::atomic::AtomicUsize,
    max_ports: usize,
    sources: std::sync::Mutex<std::collections::HashSet<std::net::IpAddr>>,
    max_sources: usize,
    /// Destinations named by the workload: hosts no Service or
    /// ExternalService names (and addresses), and vendor hosts a wildcard
    /// ExternalService matched, each set bounded apart so that the one
    /// filling up does not take the other's series.
    unregistered: std::sync::Mutex<std::collections::HashSet<String>>,
    vendor_hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Audit label sets seen (without verdict and revision), and the
    /// shapes each (policy, caller, port) has.
    audits: std::sync::Mutex<AuditBounds>,
}

impl Default for LabelBounds {
    fn default() -> Self {
        Self::new(MAX_PORT_LABELS, MAX_SOURCE_LABELS)
    }
}

impl LabelBounds {
    pub fn new(max_ports: usize, max_sources: usize) -> Self {
        Self {
            ports: (0..1024).map(|_| Default::default()).collect(),
            port_count: Default::default(),
            max_ports,
            sources: Default::default(),
            max_sources,
            unregistered: Default::default(),
            vendor_hosts: Default::default(),
            audits: Default::default(),
        }
    }

    /// `labels`; past [`MAX_AUDIT_SHAPES_PER_CALLER`] shapes of its
    /// caller on its port, with method and path `*`; and once
    /// [`MAX_AUDIT_LABELS`] other sets were seen first, the policy's
    /// `other` series (caller, port, method and path all `other`), which
    /// the operator reads as callers it cannot name.
    pub fn audit(&self, mut labels: AuditLabels) -> AuditLabels {
        let key = |l: &AuditLabels| AuditKey {
            policy: l.policy.clone(),
            rules: l.rules.clone(),
            src: l.src.clone(),
            port: l.port,
            method: l.method.clone(),
            path: l.path.clone(),
        };
        let mut b = self.audits.lock().unwrap_or_else(|e| e.into_inner());
        if b.seen.contains(&key(&labels)) {
            return labels;
        }
        let caller = (
            labels.policy.clone(),
            labels.rules.clone(),
            labels.src.clone(),
            labels.port,
        );
        if b.shapes.get(&caller).copied().unwrap_or(0) >= MAX_AUDIT_SHAPES_PER_CALLER {
            labels.method = "*".to_owned();
            labels.path = "*".to_owned();
            if b.seen.contains(&key(&labels)) {
                return labels;
            }
        }
        if b.seen.len() < MAX_AUDIT_LABELS {
            b.seen.insert(key(&labels));
            *b.shapes.entry(caller).or_default() += 1;
            return labels;
        }
        AuditLabels {
            policy: labels.policy,
            src: OTHER.to_owned(),
            port: PortLabel(0),
            method: OTHER.to_owned(),
            path: OTHER.to_owned(),
            verdict: labels.verdict,
            rules: labels.rules,
        }
    }

    /// Forgets the audit series of (policy, rules) pairs not in `keep`
    /// (a policy that stopped auditing, rules edited since), removing
    /// them from `family` too: only the rules audited now take places in
    /// the bounds. The counts of removed series not yet read are lost;
    /// the control plane's window runs for the rules in force anyway.
    pub fn retain_audits(
        &self,
        keep: &std::collections::HashSet<(String, String)>,
        family: &Family<AuditLabels, Counter>,
    ) {
        let mut b = self.audits.lock().unwrap_or_else(|e| e.into_inner());
        let kept =
            |policy: &String, rules: &String| keep.contains(&(policy.clone(), rules.clone()));
        let gone: Vec<AuditKey> = b
            .seen
            .iter()
            .filter(|k| !kept(&k.policy, &k.rules))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        let series = |k: &AuditKey, verdict| AuditLabels {
            policy: k.policy.clone(),
            src: k.src.clone(),
            port: k.port,
            method: k.method.clone(),
            path: k.path.clone(),
            verdict,
            rules: k.rules.clone(),
        };
        let mut pairs = std::collections::HashSet::new();
        for k in &gone {
            b.seen.remove(k);
            for verdict in ["admitted", "refused"] {
                family.remove(&series(k, verdict));
            }
            pairs.insert((k.policy.clone(), k.rules.clone()));
        }
        b.shapes
            .retain(|(policy, rules, _, _), _| kept(policy, rules));
        // The pairs' `other` series (never in `seen`).
        for (policy, rules) in pairs {
            let other = AuditKey {
                policy,
                rules,
                src: OTHER.to_owned(),
                port: PortLabel(0),
                method: OTHER.to_owned(),
                path: OTHER.to_owned(),
            };
            for verdict in ["admitted", "refused"] {
                family.remove(&series(&other, verdict));
            }
        }
    }

    /// A destination nothing registers (`host:port`, `ip:port`) as a
    /// label, or `other` once [`MAX_DESTINATION_LABELS`] others were seen
    /// first: an app names as many as it likes.
    pub fn destination(&self, dst: &str) -> String {
        bounded(&self.unregistered, dst)
    }

    /// A vendor host a wildcard ExternalService matched (`host:port`), as
    /// [`LabelBounds::destination`], counted apart.
    pub fn vendor_host(&self, dst: &str) -> String {
        bounded(&self.vendor_hosts, dst)
    }
}

fn bounded(set: &std::sync::Mutex<std::collections::HashSet<String>>, value: &str) -> String {
    let mut seen = set.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(value)
        || (seen.len() < MAX_DESTINATION_LABELS && seen.insert(value.to_owned()))
    {
        value.to_owned()
    } else {
        OTHER.to_owned()
    }
}

impl LabelBounds {
    /// `port`, or `other` once `max_ports` others were seen first.
    pub fn port(&self, port: u16) -> PortLabel {
        use std::sync::atomic::Ordering;
        let (word, bit) = (&self.ports[usize::from(port / 64)], 1u64 << (port % 64));
        if word.load(Ordering::Relaxed) & bit != 0 {
            return PortLabel(port);
        }
        if self.port_count.fetch_add(1, Ordering::Relaxed) >= self.max_ports {
            self.port_count.fetch_sub(1, Ordering::Relaxed);
            return PortLabel(0);
        }
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            // Another connection admitted it meanwhile.
            self.port_count.fetch_sub(1, Ordering::Relaxed);
        }
        PortLabel(port)
    }

    /// The address as a label, or `other` once `max_sources` others were
    /// seen first.
    pub fn source(&self, ip: std::net::IpAddr) -> String {
        let ip = ip.to_canonical();
        let mut seen = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&ip) || (seen.len() < self.max_sources && seen.insert(ip)) {
            ip.to_string()
        } else {
            OTHER.to_owned()
        }
    }
}

/// One of the proxy's listeners: `inbound`, `outbound`, `admin`, `probe`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

/// A refusal by an AccessPolicy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// `namespace/name` of the AccessPolicy.
    pub policy: String,
    /// `http` (answered 403) or `tcp` (connection closed).
    pub protocol: String,
}

/// A request (or TCP connection) an auditing AccessPolicy let through,
/// with the verdict its rules would have given. Built from network input
/// and bounded ([`LabelBounds::audit`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// `namespace/name` of the AccessPolicy.
    pub policy: String,
    /// The caller's verified identity as `namespace/serviceAccount`,
    /// `plaintext` without one, `other` past the bound.
    pub src: String,
    /// The container port called.
    pub port: PortLabel,
    /// The method; `*` for extension methods, empty for TCP.
    pub method: String,
    /// The normalised path's first segment (`/charges`); `*` when longer
    /// than [`MAX_AUDIT_SEGMENT`], empty for TCP.
    pub path: String,
    /// `admitted` or `refused`: what the rules would have done.
    pub verdict: &'static str,
    /// The revision of the rules the verdict was given under.
    pub rules: String,
}

/// Distinct audit label sets (policy, caller, port, method, path) one
/// proxy keeps apart; later new ones are counted under `other`.
pub const MAX_AUDIT_LABELS: usize = 512;
/// Distinct (method, path) shapes one caller of one policy gets on a
/// port before its further new ones are counted as method and path `*`
/// (the caller still named): one caller calling many paths cannot fill
/// [`MAX_AUDIT_LABELS`] and hide everyone after it.
pub const MAX_AUDIT_SHAPES_PER_CALLER: usize = 32;
/// The longest first path segment an audit series names.
pub const MAX_AUDIT_SEGMENT: usize = 64;

/// What [`LabelBounds::audit`] has seen.
#[derive(Default)]
struct AuditBounds {
    seen: std::collections::HashSet<AuditKey>,
    /// Shapes per (policy, rules, caller, port).
    shapes: std::collections::HashMap<(String, String, String, PortLabel), usize>,
}

/// An audit series without its verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct AuditKey {
    policy: String,
    rules: String,
    src: String,
    port: PortLabel,
    method: String,
    path: String,
}

/// A request refused by an inbound rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLimitLabels {
    /// `namespace/name` of the TrafficPolicy.
    pub policy: String,
    /// Which limit had nothing left: `total`, `identity`, `override`, or
    /// `route/<name>`.
    pub limit: String,
}

/// Why spans were dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenerationLabels {
    pub generation: String,
}

/// Every metric the proxy exports.
pub struct ProxyMetrics {
    pub registry: Registry,
    /// Bounds on the label values built from network input.
    pub bounds: LabelBounds,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EdgeLabels, Histogram>,
    pub proxy_errors: Family<ProxyErrorLabels, Counter>,
    pub retries: Family<DstLabels, Counter>,
    pub retry_budget_exhausted: Family<DstLabels, Counter>,
    /// Back-offs a destination asked for (`Retry-After`, `RateLimit-*`)
    /// that this proxy honours (`retryAfter`), begun or extended.
    pub back_offs: Family<DstLabels, Counter>,
    /// Calls that waited out a destination's back-off and then went.
    pub back_off_waits: Family<DstLabels, Counter>,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit_state: Family<DstLabels, Gauge>,
    pub circuit_opened: Family<DstLabels, Counter>,
    pub connections_total: Family<ConnLabels, Counter>,
    pub connections_open: Family<ConnLabels, Gauge>,
    pub detect_timeouts: Counter,
    pub config_generation: Family<GenerationLabels, Gauge>,
    pub config_reloads: Counter,
    pub config_reload_failures: Counter,
    /// Endpoints documents (discovery) applied.
    pub endpoints_reloads: Counter,
    /// Peer certificates refused in mesh TLS, by direction and reason.
    pub tls_rejections: Family<crate::proxy::tls::RejectLabels, Counter>,
    /// When this proxy's certificate expires (unix seconds).
    pub certificate_expiry: Gauge,
    /// The trust bundle in use (value 1 on the current hash).
    pub trust_bundle: Family<BundleLabels, Gauge>,
    /// The root of the trust bundle its own certificate chains to (value
    /// 1 on its fingerprint): a CA rotation's "every proxy presents the
    /// new root" gate.
    pub certificate_root: Family<RootLabels, Gauge>,
    pub identity_reload_failures: Counter,
    /// Plaintext inbound connections by port and source address.
    pub plaintext_connections: Family<PlaintextLabels, Counter>,
    /// Plaintext inbound connections refused under STRICT, by port and
    /// source address (the operator rolls back only for sources that are
    /// meshed pods).
    pub plaintext_rejected: Family<PlaintextLabels, Counter>,
    /// Requests and connections refused by AccessPolicy.
    pub access_denied: Family<DenialLabels, Counter>,
    /// Requests and connections an auditing AccessPolicy let through.
    pub access_audit: Family<AuditLabels, Counter>,
    /// Requests answered 429 by an inbound rate limit (TrafficPolicy
    /// `inboundRateLimit`).
    pub inbound_rate_limited: Family<InboundLimitLabels, Counter>,
    /// Mesh TLS handshakes that failed for a reason other than a refused
    /// certificate (those are in `tls_rejections`): timeouts, protocol.
    pub tls_handshake_failures: Family<HandshakeLabels, Counter>,
    /// Outbound connections to a meshed, non-STRICT destination whose
    /// endpoint did not speak TLS, sent in plaintext instead.
    pub plaintext_fallbacks: Family<DstLabels, Counter>,
    /// TLS originated to an ExternalService that failed (no request was
    /// sent), by reason.
    pub origin_failures: Family<OriginFailureLabels, Counter>,
    /// GETs and HEADs a response cache looked at, by outcome.
    pub cache_requests: Family<CacheLabels, Counter>,
    /// Bytes each response cache holds (within its `maxBytes`).
    pub cache_bytes: Family<CacheStoreLabels, Gauge>,
    /// Requests and connections to destinations no Service or
    /// ExternalService names, refused or (under AllowAll) let through.
    pub egress_unregistered: Family<EgressLabels, Counter>,
    /// TLS connections passed through to an ExternalService, by SNI.
    pub external_tls_connections: Family<ExternalConnLabels, Counter>,
    /// Inbound connections closed because no config was loaded yet (the
    /// mode and the access rules are unknown until then).
    pub inbound_refused_no_config: Counter,
    /// Connections closed because they were addressed to one of the
    /// proxy's own transparent ports (15101, 15106): relaying them would
    /// loop them back into the proxy.
    pub refused_own_port: Family<DirectionLabels, Counter>,
    /// Requests answered `overloaded` because the direction's in-flight
    /// limit was reached.
    pub requests_shed: Family<DirectionLabels, Counter>,
    /// Connections closed at once because their listener was at its
    /// connection cap.
    pub connections_over_limit: Family<ListenerLabels, Counter>,
    /// Connections closed at once because their source address held its
    /// whole share of the listener's connection cap (inbound only). No
    /// address label: the sources are whoever connects, unbounded.
    pub connections_over_source_share: Family<ListenerLabels, Counter>,
    /// Requests sent without a buffered body, so never retried, because
    /// the proxy's retry buffer budget was spent.
    pub retry_unbuffered: Counter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Spans exported, and dropped (queue full, collector failing).
    pub trace: crate::proxy::trace::TraceMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleLabels {
    pub hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RootLabels {
    pub fingerprint: String,
}

fn latency_histogram() -> Histogram {
    // Milliseconds, 0.5 ms .. 10 s.
    Histogram::new([
        0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0,
        2000.0, 5000.0, 10000.0,
    ])
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_proxy");
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP requests by edge, route and status class",
            requests.clone(),
        );
        let latency = Family::<EdgeLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_ms",
            "HTTP request latency in milliseconds",
            latency.clone(),
        );
        let proxy_errors = Family::default();
        registry.register(
            "proxy_errors",
            "Responses the proxy generated instead of the application, by reason",
            proxy_errors.clone(),
        );
        let retries = Family::default();
        registry.register("retries", "Retries sent", retries.clone());
        let back_offs = Family::default();
        registry.register(
            "back_offs",
            "Back-offs a destination asked for (Retry-After on a 429 or 503, or a spent RateLimit quota) that calls now wait out",
            back_offs.clone(),
        );
        let back_off_waits = Family::default();
        registry.register(
            "back_off_waits",
            "Calls that waited out a destination's back-off and then went",
            back_off_waits.clone(),
        );
        let retry_budget_exhausted = Family::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the destination's retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let circuit_state = Family::default();
        registry.register(
            "circuit_state",
            "Service circuit breaker: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let circuit_opened = Family::default();
        registry.register(
            "circuit_opened",
            "Times a circuit opened",
            circuit_opened.clone(),
        );
        let connections_total = Family::default();
        registry.register(
            "tcp_connections",
            "TCP connections accepted",
            connections_total.clone(),
        );
        let connections_open = Family::default();
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            connections_open.clone(),
        );
        let detect_timeouts = Counter::default();
        registry.register(
            "protocol_detect_timeouts",
            "Connections that sent nothing to detect in time and were handled as opaque TCP",
            detect_timeouts.clone(),
        );
        let config_generation = Family::default();
        registry.register(
            "config_generation",
            "The ProxyConfig generation in use (value 1 on the current generation)",
            config_generation.clone(),
        );
        let config_reloads = Counter::default();
        registry.register(
            "config_reloads",
            "Config changes applied",
            config_reloads.clone(),
        );
        let endpoints_reloads = Counter::default();
        registry.register(
            "endpoints_reloads",
            "Endpoints documents (the pods behind the Services called) applied",
            endpoints_reloads.clone(),
        );
        let config_reload_failures = Counter::default();
        registry.register(
            "config_reload_failures",
            "Config files that could not be read or parsed (the last good config stays in use)",
            config_reload_failures.clone(),
        );
        let tls_rejections = Family::default();
        registry.register(
            "tls_rejections",
            "Peer certificates refused in mesh TLS, by direction and reason",
            tls_rejections.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When this proxy's workload certificate expires",
            certificate_expiry.clone(),
        );
        let trust_bundle = Family::default();
        registry.register(
            "trust_bundle",
            "The trust bundle in use (value 1 on the current hash)",
            trust_bundle.clone(),
        );
        let certificate_root = Family::default();
        registry.register(
            "certificate_root",
            "The trust bundle's root that the proxy's own certificate chains to (value 1 on its SHA-256 fingerprint, first 8 bytes)",
            certificate_root.clone(),
        );
        let identity_reload_failures = Counter::default();
        registry.register(
            "identity_reload_failures",
            "Identity files that could not be read or loaded (the last good identity stays in use)",
            identity_reload_failures.clone(),
        );
        let plaintext_connections = Family::default();
        registry.register(
            "inbound_plaintext_connections",
            "Inbound connections without mesh TLS, by container port and source address (the STRICT rollout gate)",
            plaintext_connections.clone(),
        );
        let plaintext_rejected = Family::default();
        registry.register(
            "inbound_plaintext_rejected",
            "Inbound plaintext connections refused because the namespace is STRICT, by container port",
            plaintext_rejected.clone(),
        );
        let access_denied = Family::default();
        registry.register(
            "access_denied",
            "Requests (http) and connections (tcp) refused by an AccessPolicy",
            access_denied.clone(),
        );
        let access_audit = Family::default();
        registry.register(
            "access_audit",
            "Requests (and TCP connections) an AccessPolicy in mode Audit let through, by caller, container port, method, first path segment, and the verdict its rules would have given",
            access_audit.clone(),
        );
        let inbound_rate_limited = Family::default();
        registry.register(
            "inbound_rate_limited",
            "Requests answered 429 by an inbound rate limit (TrafficPolicy inboundRateLimit), by policy and the limit that had nothing left",
            inbound_rate_limited.clone(),
        );
        let tls_handshake_failures = Family::default();
        registry.register(
            "tls_handshake_failures",
            "Mesh TLS handshakes that failed for a reason other than a refused certificate",
            tls_handshake_failures.clone(),
        );
        let plaintext_fallbacks = Family::default();
        registry.register(
            "outbound_plaintext_fallbacks",
            "Connections to a meshed, non-STRICT destination sent in plaintext because the endpoint does not speak mesh TLS",
            plaintext_fallbacks.clone(),
        );
        let origin_failures = Family::default();
        registry.register(
            "outbound_tls_origination_failures",
            "TLS connections to an ExternalService that failed before any request was sent, by reason (an untrusted or wrong certificate never falls back)",
            origin_failures.clone(),
        );
        let cache_requests = Family::default();
        registry.register(
            "cache_requests",
            "GET and HEAD requests a response cache (TrafficPolicy cache) looked at, by outcome: hit (fresh, the target not asked), revalidated (the target answered 304), miss, stale (given while revalidated in the background), stale-if-error (given because the target failed)",
            cache_requests.clone(),
        );
        let cache_bytes = Family::default();
        registry.register(
            "cache_bytes",
            "Bytes of answers a response cache holds, by TrafficPolicy (at most its cache.maxBytes)",
            cache_bytes.clone(),
        );
        let egress_unregistered = Family::default();
        registry.register(
            "outbound_egress_unregistered",
            "Requests and connections to destinations no Service or ExternalService names: refused under egress RegistryOnly, allowed (and counted, to show what the switch would refuse) under AllowAll",
            egress_unregistered.clone(),
        );
        let external_tls_connections = Family::default();
        registry.register(
            "outbound_external_tls_connections",
            "TLS connections the app made to an ExternalService, passed through untouched, by SNI and outcome",
            external_tls_connections.clone(),
        );
        let inbound_refused_no_config = Counter::default();
        registry.register(
            "inbound_refused_no_config",
            "Inbound connections closed because no config was loaded yet",
            inbound_refused_no_config.clone(),
        );
        let refused_own_port = Family::default();
        registry.register(
            "refused_own_port",
            "Connections closed because they were addressed to one of the proxy's own transparent ports",
            refused_own_port.clone(),
        );
        let requests_shed = Family::default();
        registry.register(
            "requests_shed",
            "Requests answered 503 overloaded at once because the direction's in-flight limit was reached",
            requests_shed.clone(),
        );
        let connections_over_limit = Family::default();
        registry.register(
            "connections_over_limit",
            "Connections closed at once because their listener was at its connection cap",
            connections_over_limit.clone(),
        );
        let connections_over_source_share = Family::default();
        registry.register(
            "connections_over_source_share",
            "Connections closed at once because their source address held its whole share of the listener's connection cap",
            connections_over_source_share.clone(),
        );
        let retry_unbuffered = Counter::default();
        registry.register(
            "retry_unbuffered",
            "Requests sent unbuffered, and so not retried, because the proxy's retry buffer budget was spent",
            retry_unbuffered.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because stdout fell behind (more than 256 KiB waiting)",
            access_log_dropped.clone(),
        );
        let trace = crate::proxy::trace::TraceMetrics::default();
        registry.register(
            "spans_exported",
            "Spans the tracing collector took",
            trace.exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans dropped: the export queue was full (queue-full) or the collector failed (collector)",
            trace.dropped.clone(),
        );
        Self {
            registry,
            bounds: LabelBounds::default(),
            access_log_dropped,
            trace,
            connections_over_limit,
            connections_over_source_share,
            retry_unbuffered,
            inbound_refused_no_config,
            refused_own_port,
            requests_shed,
            plaintext_connections,
            plaintext_rejected,
            access_denied,
            access_audit,
            inbound_rate_limited,
            tls_handshake_failures,
            plaintext_fallbacks,
            origin_failures,
            cache_requests,
            cache_bytes,
            external_tls_connections,
            egress_unregistered,
            tls_rejections,
            certificate_expiry,
            trust_bundle,
            certificate_root,
            identity_reload_failures,
            requests,
            latency,
            proxy_errors,
            retries,
            retry_budget_exhausted,
            back_offs,
            back_off_waits,
            circuit_state,
            circuit_opened,
            connections_total,
            connections_open,
            detect_timeouts,
            config_generation,
            config_reloads,
            config_reload_failures,
            endpoints_reloads,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn set_generation(&self, generation: &str) {
        self.config_generation.clear();
        self.config_generation
            .get_or_create(&GenerationLabels {
                generation: generation.to_owned(),
            })
            .set(1);
    }
}

/// One edge's series (a destination and route, or an inbound source),
/// looked up in the families once and then reused by every request, so the
/// data path neither allocates label strings nor hashes them.
pub struct EdgeSeries {
    edge: EdgeLabels,
    tls: bool,
    latency: Histogram,
    /// By status class 1xx..5xx, created on first use so idle classes do
    /// not show up as zero series.
    requests: [std::sync::OnceLock<Counter>; 5],
}

impl EdgeSeries {
    pub fn new(metrics: &ProxyMetrics, edge: EdgeLabels, tls: bool) -> Self {
        Self {
            latency: metrics.latency.get_or_create_owned(&edge),
            edge,
            tls,
            requests: Default::default(),
        }
    }

    /// Counts one request and its latency.
    pub fn record(
        &self,
        metrics: &ProxyMetrics,
        status: http::StatusCode,
        started: std::time::Instant,
    ) {
        self.latency.observe(started.elapsed().as_secs_f64() * 1e3);
        let class = usize::from(status.as_u16() / 100).clamp(1, 5);
        self.requests[class - 1]
            .get_or_init(|| {
                metrics.requests.get_or_create_owned(&RequestLabels {
                    direction: self.edge.direction,
                    src: self.edge.src.clone(),
                    dst: self.edge.dst.clone(),
                    route: self.edge.route.clone(),
                    status_class: format!("{class}xx"),
                    tls: self.tls,
                })
            })
            .inc();
    }
}

/// Edge series by a short key (a route name, a source identity).
#[derive(Default)]
pub struct EdgeCache(
    std::sync::Mutex<std::collections::HashMap<std::sync::Arc<str>, std::sync::Arc<EdgeSeries>>>,
);

impl EdgeCache {
    pub fn get(
        &self,
        key: &std::sync::Arc<str>,
        make: impl FnOnce() -> EdgeSeries,
    ) -> std::sync::Arc<EdgeSeries> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(series) = map.get(key) {
            return series.clone();
        }
        let series = std::sync::Arc::new(make());
        map.insert(key.clone(), series.clone());
        series
    }
}

/// `2xx`-style class of a status code.
pub fn status_class(status: http::StatusCode) -> String {
    format!("{}xx", status.as_u16() / 100)
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    /// Audit series are bounded per caller first (its shapes past the
    /// bound read `*`, the caller still named), then in all (`other`).
    #[test]
    fn audit_labels_are_bounded_per_caller_then_in_all() {
        let bounds = LabelBounds::default();
        let label = |src: &str, path: &str| {
            bounds.audit(AuditLabels {
                policy: "shop/payments".into(),
                src: src.into(),
                port: PortLabel(8080),
                method: "GET".into(),
                path: path.into(),
                verdict: "refused",
                rules: "r1".into(),
            })
        };
        for i in 0..MAX_AUDIT_SHAPES_PER_CALLER {
            assert_eq!(
                label("shop/noisy", &format!("/p{i}")).path,
                format!("/p{i}")
            );
        }
        let past = label("shop/noisy", "/more");
        assert_eq!(
            (past.src.as_str(), past.method.as_str(), past.path.as_str()),
            ("shop/noisy", "*", "*")
        );
        assert_eq!(
            label("shop/noisy", "/p0").path,
            "/p0",
            "a shape seen keeps its own"
        );
        assert_eq!(
            label("shop/quiet", "/status").path,
            "/status",
            "others unaffected"
        );
        for i in 0..MAX_AUDIT_LABELS {
            label(&format!("shop/sa-{i}"), "/");
        }
        let full = label("shop/late", "/status");
        assert_eq!((full.src.as_str(), full.port), (OTHER, PortLabel(0)));
        assert_eq!(label("shop/quiet", "/status").src, "shop/quiet");
        // Rules edited: the old rules' series go, with their places.
        let family: Family<AuditLabels, Counter> = Family::default();
        family.get_or_create(&label("shop/quiet", "/status")).inc();
        family.get_or_create(&full).inc();
        bounds.retain_audits(
            &[("shop/payments".to_owned(), "r2".to_owned())].into(),
            &family,
        );
        assert!(!family.remove(&label("shop/quiet", "/status")), "removed");
        assert!(!family.remove(&full), "the `other` series too");
        let fresh = bounds.audit(AuditLabels {
            rules: "r2".into(),
            ..label("shop/late", "/status")
        });
        assert_eq!(fresh.src, "shop/late", "places freed");
    }

    /// A client knocking from many addresses on many ports makes at most
    /// the bound's series; the rest read `other`, and values already seen
    /// keep their own.
    #[test]
    fn label_values_from_the_network_are_bounded_with_an_other_bucket() {
        let bounds = LabelBounds::new(3, 2);
        let ports: Vec<PortLabel> = (1..=5).map(|p| bounds.port(p)).collect();
        assert_eq!(ports, [1, 2, 3, 0, 0].map(PortLabel), "past 3 ports: other");
        assert_eq!(bounds.port(2), PortLabel(2), "a known port keeps its value");
        let src = |last: u8| bounds.source(std::net::IpAddr::from([10, 0, 0, last]));
        assert_eq!(src(1), "10.0.0.1");
        assert_eq!(src(2), "10.0.0.2");
        assert_eq!(src(3), OTHER);
        assert_eq!(src(1), "10.0.0.1");

        let metrics = ProxyMetrics::new();
        metrics
            .plaintext_connections
            .get_or_create(&PlaintextLabels {
                port: PortLabel(0),
                src_addr: OTHER.into(),
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("encode");
        assert!(
            text.contains(
                r#"weft_proxy_inbound_plaintext_connections_total{port="other",src_addr="other"} 1"#
            ),
            "{text}"
        );
    }
}
