//! The contract between the operator and every proxy: `ProxyConfig`, the
//! document stored under key `config.json` of ConfigMap `weft-proxy-config`
//! in each meshed namespace, and [`EndpointsConfig`], the pods behind the
//! Services it names, under `endpoints.json` of ConfigMap `weft-endpoints`.
//!
//! Versioning: `schemaVersion` is `MAJOR.MINOR`. A reader accepts any minor
//! version of its major (unknown fields from a newer minor are ignored, so
//! new fields must be optional with a safe default) and refuses a newer
//! major. `generation` is a content hash: two configs with the same
//! generation are identical, so proxies and the operator compare it to tell
//! whether a change has reached everyone.
//!
//! Durations are integer milliseconds and addresses are strings, so a proxy
//! does no parsing beyond JSON.
//!
//! Size: the document is compact JSON under `config.json` (about 300 bytes
//! per reachable Service: 1000 Services is under 300 KiB). Above
//! [`COMPRESS_ABOVE`] it is stored gzip-compressed under binaryData key
//! `config.json.gz` instead (about a tenth of the size), so a namespace that
//! reaches thousands of Services stays under the 1 MiB object limit. The
//! ConfigMap holds exactly one of the two keys; readers accept either (see
//! [`ProxyConfig::from_bytes`]). Figures: `bench/results/compile.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::api::{EgressMode, HttpMethod, LoadBalancerAlgorithm, PathMatchType, RetryOn};

/// The version this build writes.
pub const SCHEMA_VERSION: &str = "1.0";
/// The major version this build reads.
pub const SCHEMA_MAJOR: u32 = 1;
/// ConfigMap holding the document, one per meshed namespace.
pub const CONFIG_MAP_NAME: &str = "weft-proxy-config";
/// Key of the document in the ConfigMap.
pub const CONFIG_KEY: &str = "config.json";
/// binaryData key of the gzip-compressed document, used above
/// [`COMPRESS_ABOVE`].
pub const CONFIG_GZ_KEY: &str = "config.json.gz";
/// Compact JSON larger than this is stored compressed.
pub const COMPRESS_ABOVE: usize = 256 * 1024;
/// The most a compressed document may inflate to; guards the proxy against
/// a corrupt or hostile file.
pub const MAX_INFLATED: u64 = 64 * 1024 * 1024;
/// Header that makes any request retryable.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The compiled proxy configuration of one namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// `MAJOR.MINOR` of this document's schema.
    pub schema_version: String,
    /// Content hash of everything else (16 hex digits).
    pub generation: String,
    /// The namespace whose proxies run this config.
    pub namespace: String,
    /// Trust domain of SPIFFE identities.
    pub trust_domain: String,
    pub inbound: InboundConfig,
    pub outbound: OutboundConfig,
    /// Where spans go, when the Mesh turns tracing on (optional: a proxy
    /// of an older minor ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
}

/// The Mesh's `tracing`, checked and split for the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingConfig {
    /// The collector, `host:port`.
    pub collector: String,
    /// The OTLP/HTTP path, `/v1/traces` by default.
    pub path: String,
    /// The share of new traces recorded, 0.0 to 1.0.
    pub sampling: f64,
}

impl TracingConfig {
    /// The Mesh's settings, or why they cannot be used.
    pub fn from_settings(s: &crate::api::TracingSettings) -> Result<Self, String> {
        let rest = s.collector.strip_prefix("http://").ok_or_else(|| {
            format!(
                "tracing.collector {:?}: give a plain-HTTP OTLP endpoint, http://HOST:PORT (for example http://otel-collector.observability:4318)",
                s.collector
            )
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/v1/traces"),
        };
        let uri: http::uri::Authority = authority.parse().map_err(|_| {
            format!(
                "tracing.collector {:?}: {authority:?} is not HOST or HOST:PORT",
                s.collector
            )
        })?;
        if authority.contains('@') || uri.host().is_empty() {
            return Err(format!(
                "tracing.collector {:?}: name the collector as HOST or HOST:PORT, without credentials",
                s.collector
            ));
        }
        // The path goes into the request line as it is.
        if path
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
        {
            return Err(format!(
                "tracing.collector {:?}: the path {path:?} may hold no spaces, control characters, query or fragment",
                s.collector
            ));
        }
        if !(0.0..=100.0).contains(&s.sampling_percent) {
            return Err(format!(
                "tracing.samplingPercent {}: give a percentage from 0 to 100",
                s.sampling_percent
            ));
        }
        Ok(TracingConfig {
            collector: format!("{}:{}", uri.host(), uri.port_u16().unwrap_or(4318)),
            path: if path == "/" {
                "/v1/traces".to_owned()
            } else {
                path.to_owned()
            },
            sampling: s.sampling_percent / 100.0,
        })
    }
}

/// What the namespace's proxies admit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundConfig {
    /// Applies to every workload of the namespace.
    pub mode: InboundMode,
    /// Container ports that accept plaintext under `Strict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plaintext_ports: Vec<u16>,
    /// Access rules; a port no authorization covers admits everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorizations: Vec<Authorization>,
    /// Limits on the HTTP requests the namespace's Services admit, by
    /// Service name (TrafficPolicy `inboundRateLimit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<InboundRateLimitConfig>,
}

/// The limits one Service's pods put on the requests they admit, each pod
/// its own. Applies, as a Service's [`Authorization`] does, on the
/// container ports the Service forwards to, in pods its selector matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundRateLimitConfig {
    /// The TrafficPolicy this came from, `namespace/name`, for metrics.
    pub policy: String,
    /// The Service whose pods enforce it.
    pub service: String,
    /// The Service's pod selector; unset when membership cannot be told
    /// from labels (then every pod of the namespace applies it on `ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// The container ports the Service forwards to.
    pub ports: Vec<PortRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<RequestRateConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<RequestRateConfig>,
    /// In order: a caller takes the first that names it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateOverrideConfig>,
    /// In order: a request takes the first route it matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteRateConfig>,
    /// Paths (exact, compared normalised) no limit counts: the policy's
    /// `excludedPaths`, health checks a kubelet or a monitor sends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_paths: Vec<String>,
}

/// A token bucket's settings, the burst filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRateConfig {
    pub requests_per_second: u32,
    pub burst: u32,
}

/// Named callers sharing a limit of their own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateOverrideConfig {
    pub identities: Vec<IdentityMatch>,
    pub limit: RequestRateConfig,
}

/// A route's own limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRateConfig {
    pub name: String,
    pub path: PathMatchConfig,
    /// Empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    pub limit: RequestRateConfig,
}

/// The inbound mTLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    Permissive,
    Strict,
}

/// The allow rules guarding some ports of the namespace's workloads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    /// The AccessPolicy this came from, `namespace/name`, for metrics.
    pub policy: String,
    /// The guarded Service; unset for a namespace-wide policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The guarded Service's pod selector. Every workload of the namespace
    /// shares this config, so a proxy applies a Service's guard only when
    /// its pod's labels match; unset (namespace-wide, or a Service without
    /// a selector) when membership cannot be told from labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Container ports guarded: numbers, or port names the proxy resolves
    /// from its pod's container ports. Empty: every port (namespace-wide).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRef>,
    /// A request is admitted when any rule matches; none denies all.
    #[serde(default)]
    pub rules: Vec<AccessRuleConfig>,
    /// The policy only audits: its rules refuse nobody, and each request
    /// (or TCP connection) is counted in
    /// `weft_proxy_access_audit_total` by caller, port, method, first
    /// path segment and the verdict the rules would have given. An
    /// auditing guard never tightens: on a Service whose guard audits, a
    /// request passes when the namespace-wide guard or the audited rules
    /// admit it (`proxy::authz::check_audited`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    /// The policy's rules as the operator hashes them (its
    /// `status.enforcement.revision`); audit counts carry it as the
    /// `rules` label, so a verdict is judged against the rules it was
    /// given under. Set on auditing guards only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
}

/// A container port by number or by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One allow rule with identities resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessRuleConfig {
    /// Callers admitted.
    pub identities: Vec<IdentityMatch>,
    /// Container ports; empty: all the authorization guards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatchConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
}

/// A caller: one ServiceAccount, or any in a namespace (`serviceAccount`
/// unset).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityMatch {
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// A path comparison.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatchConfig {
    #[serde(rename = "type")]
    pub type_: PathMatchType,
    pub value: String,
}

/// Every Service the namespace may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundConfig {
    /// The policy of a Service that has no TrafficPolicy.
    pub defaults: ServicePolicy,
    /// Sorted by namespace, then name.
    pub services: Vec<OutboundService>,
    /// Whether destinations nothing here names are refused (the Mesh's
    /// `egress`, or the namespace's `weft.dev/egress`). A proxy of an
    /// older minor ignores it and allows all.
    #[serde(default, skip_serializing_if = "EgressMode::is_allow_all")]
    pub egress: EgressMode,
    /// The namespace's ExternalServices, sorted by name. (A proxy of an
    /// older minor ignores them and relays that traffic as before.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_services: Vec<ExternalServiceConfig>,
}

/// A destination outside the cluster ([`crate::api::ExternalService`]),
/// claimed by the host name a request carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalServiceConfig {
    pub name: String,
    pub namespace: String,
    /// Exact names, and `*.suffix` wildcards of one leftmost label. No
    /// host is claimed by two ExternalServices of one config.
    pub hosts: Vec<String>,
    pub ports: Vec<ExternalPortConfig>,
    /// Its TrafficPolicy; unset means `outbound.defaults`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ServicePolicy>,
    /// Fixed vendor addresses (`ip:port`), as tests and `weft local` write
    /// them; empty in a cluster: the proxy resolves the host called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// A port of an external destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPortConfig {
    /// The port workloads dial.
    pub port: u16,
    /// What workloads speak on it.
    #[serde(default, skip_serializing_if = "ExternalPortProtocol::is_http")]
    pub protocol: ExternalPortProtocol,
    /// The vendor's port.
    pub target_port: u16,
    /// Set: the proxy connects to the vendor with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OriginateTlsConfig>,
}

/// What a workload speaks to an external port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalPortProtocol {
    /// Plain HTTP: routed by `Host`, under the policy (TLS originated
    /// with `tls`).
    #[default]
    Http,
    /// The workload's own TLS, passed through, routed by SNI.
    Tls,
}

impl ExternalPortProtocol {
    fn is_http(&self) -> bool {
        *self == Self::Http
    }
}

/// TLS origination towards a vendor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginateTlsConfig {
    /// PEM CA certificates; unset: the Mozilla roots built into the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// SNI and the name to verify; unset: the host called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The Secret whose certificate and key the proxy presents; read from
    /// its identity directory as `egress.<name>.crt` and `.key`
    /// ([`egress_credential_keys`]), where the operator copies them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
}

/// The keys (file names in the proxy's identity directory) under which
/// the operator stores client certificate Secret `secret`'s chain and key.
pub fn egress_credential_keys(secret: &str) -> (String, String) {
    (
        format!("{EGRESS_KEY_PREFIX}{secret}.crt"),
        format!("{EGRESS_KEY_PREFIX}{secret}.key"),
    )
}

/// The prefix of the client certificate keys in an identity Secret.
pub const EGRESS_KEY_PREFIX: &str = "egress.";

/// A Service as its clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundService {
    pub name: String,
    pub namespace: String,
    /// The names clients may use: `name.ns.svc.<domain>`, `name.ns.svc`,
    /// `name.ns`; a proxy in the same namespace also accepts `name`.
    pub hostnames: Vec<String>,
    /// ClusterIPs; empty for a headless Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ServicePortConfig>,
    /// Set when the Service's pods run a proxy: connections use mesh mTLS and
    /// the server must present one of these identities. Unset: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshedServer>,
    /// Routes, first match wins; a request no route matches goes to this
    /// Service's own endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// This Service's TrafficPolicy; unset means `outbound.defaults`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ServicePolicy>,
    /// Explicit endpoint addresses (`ip:port`), as `weft local` and tests
    /// write them. Empty in a cluster: the proxy resolves `hostnames[0]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortConfig {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the endpoints listen; a name when the Service uses a named
    /// targetPort.
    pub target_port: PortRef,
    pub protocol: PortProtocol,
}

/// How a port's traffic is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// Peek at the first bytes to tell HTTP/1, HTTP/2 and opaque TCP apart.
    Detect,
    Http1,
    Http2,
    /// Plain TCP, never inspected (server-speaks-first protocols).
    Opaque,
}

/// Who serves a meshed Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshedServer {
    /// Namespace of the serving identities.
    pub namespace: String,
    /// ServiceAccounts that may serve; empty: any of `namespace`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// The server namespace is enforcing (or about to enforce) STRICT:
    /// never fall back to plaintext.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

/// A route: requests that match go to weighted backends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteConfig {
    /// `namespace/route-name/rule-name-or-index`, for metrics.
    pub name: String,
    /// Any match selects the route; empty matches everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchConfig>,
    /// Empty when every backend was missing: the proxy answers 503.
    pub backends: Vec<WeightedBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
}

/// Conditions that must all hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatchConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// Header names lowercased; exact values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A backend Service and its share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedBackend {
    /// `name.namespace`, a key into `outbound.services`.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
}

/// The resolved resilience policy for calls to one Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePolicy {
    /// The TrafficPolicy, `namespace/name`; unset for the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub retry: RetryConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// Hold calls while the Service's own back-off (`Retry-After`) runs;
    /// unset: its 429s pass through and change nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<RetryAfterConfig>,
    pub load_balancer: LoadBalancerAlgorithm,
    /// Zone-aware routing; unset: every zone is one pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_affinity: Option<ZoneAffinityConfig>,
    /// Exact paths that never count as failures and are never retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_paths: Vec<String>,
    /// Answers kept and reused (RFC 9111); unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
}

/// A client proxy's cache of one target's answers
/// ([`crate::api::ResponseCache`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    pub max_bytes: u64,
    pub max_object_bytes: u64,
    /// Path prefixes cached; empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate_ms: Option<u64>,
}

/// Calls stay in the caller's zone while at least `min_healthy_percent`
/// of the zone's endpoints are healthy; below it they spill to other
/// zones in proportion ([`crate::api::ZoneAffinity`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZoneAffinityConfig {
    pub min_healthy_percent: u32,
}

/// Retries, with every default filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// Retries after the first try; 0 disables retries.
    pub max_retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    pub retry_on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Methods retried without an idempotency header.
    pub methods: Vec<HttpMethod>,
    /// A request carrying this header (lowercase) is retried whatever its
    /// method.
    pub idempotency_header: String,
    pub budget: RetryBudgetConfig,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

/// Retries allowed: `percent` of requests in `window`, plus a floor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetConfig {
    pub percent: u32,
    pub min_per_second: u32,
    pub window_ms: u64,
}

/// Circuit breaking, with defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerConfig {
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRateConfig>,
    pub open_ms: u64,
    pub max_open_ms: u64,
}

/// Failure-rate trip condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureRateConfig {
    pub percent: u32,
    pub min_requests: u32,
    pub window_ms: u64,
}

/// Token bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
    /// Set: the limit is the namespace's client pods' together, and each
    /// proxy takes its share ([`EndpointsConfig::client_proxies`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedLimitConfig>,
}

/// A rate limit shared by a namespace's client pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedLimitConfig {
    /// The ServiceAccounts whose pods share it; empty: every pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

impl RateLimitConfig {
    /// How many proxies share this limit, as `clients` (meshed pods by
    /// ServiceAccount) counts them; 0 when `own` (this proxy's
    /// ServiceAccount) has no share. A per-proxy limit is 1.
    pub fn sharers(&self, clients: &BTreeMap<String, u32>, own: &str) -> u32 {
        let Some(shared) = &self.shared else {
            return 1;
        };
        // Saturating: the document is data anyone who may write the
        // namespace's ConfigMaps could have written.
        let sum = |counts: &mut dyn Iterator<Item = u32>| counts.fold(0u32, u32::saturating_add);
        if shared.service_accounts.is_empty() {
            return sum(&mut clients.values().copied()).max(1);
        }
        if !shared.service_accounts.iter().any(|sa| sa == own) {
            return 0;
        }
        sum(&mut shared
            .service_accounts
            .iter()
            .filter_map(|sa| clients.get(sa).copied()))
        .max(1)
    }
}

/// How calls wait out a Service's back-off ([`crate::api::RetryAfter`]),
/// defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryAfterConfig {
    pub max_wait_ms: u64,
    pub max_queued: u32,
    pub max_back_off_ms: u64,
}

/// The document as stored in the ConfigMap: one key or the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredConfig {
    /// `data["config.json"]`.
    Json(String),
    /// `binaryData["config.json.gz"]`.
    Gzip(Vec<u8>),
}

impl StoredConfig {
    /// Bytes the payload takes in the ConfigMap (binaryData is base64).
    pub fn stored_len(&self) -> usize {
        match self {
            StoredConfig::Json(s) => s.len(),
            StoredConfig::Gzip(b) => b.len().div_ceil(3) * 4,
        }
    }
}

/// Why a config document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("compressed proxy config is corrupt: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("compressed proxy config inflates past {MAX_INFLATED} bytes")]
    TooLarge,
    #[error("proxy config is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("proxy config has no schemaVersion string")]
    NoVersion,
    #[error("proxy config schemaVersion {0:?} is not MAJOR.MINOR")]
    BadVersion(String),
    #[error(
        "proxy config schemaVersion {found} is newer than this proxy understands (major {SCHEMA_MAJOR}); upgrade the proxy image to match the operator"
    )]
    NewerMajor { found: String },
    #[error("proxy config field {path}: {source}")]
    Field {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ProxyConfig {
    /// Whether a policy of this config has a namespace-wide rate limit
    /// (its proxies then need the client count,
    /// [`EndpointsConfig::client_proxies`]).
    pub fn shares_limits(&self) -> bool {
        let out = &self.outbound;
        std::iter::once(&out.defaults)
            .chain(out.services.iter().filter_map(|s| s.policy.as_ref()))
            .chain(
                out.external_services
                    .iter()
                    .filter_map(|e| e.policy.as_ref()),
            )
            .any(|p| p.rate_limit.as_ref().is_some_and(|r| r.shared.is_some()))
    }

    /// Fills in `schemaVersion` and `generation`: call after building.
    pub fn seal(mut self) -> Self {
        self.schema_version = SCHEMA_VERSION.to_owned();
        self.generation = String::new();
        self.generation = content_hash(&self);
        self
    }

    /// The compact JSON written to the ConfigMap.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The ConfigMap payload: plain JSON, or gzip above [`COMPRESS_ABOVE`].
    pub fn to_stored(&self) -> StoredConfig {
        StoredConfig::of(self.to_json())
    }

    /// Reads either stored form: gzip (recognised by its magic bytes) or
    /// plain JSON.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        read_versioned(&inflate(bytes)?)
    }

    /// Reads a document, accepting any minor version of our major.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        read_versioned(bytes)
    }
}

impl StoredConfig {
    /// `json` as stored: as it is, or gzip above [`COMPRESS_ABOVE`].
    pub fn of(json: String) -> Self {
        use std::io::Write;
        if json.len() <= COMPRESS_ABOVE {
            return StoredConfig::Json(json);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing into a Vec cannot fail.
        let _ = gz.write_all(json.as_bytes());
        StoredConfig::Gzip(gz.finish().unwrap_or_default())
    }
}

/// The JSON of a stored document: gzip (recognised by its magic bytes)
/// inflated, up to [`MAX_INFLATED`]; anything else as it is.
fn inflate(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, ConfigError> {
    use std::io::Read;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut json)
        .map_err(ConfigError::Gzip)?;
    if json.len() as u64 > MAX_INFLATED {
        return Err(ConfigError::TooLarge);
    }
    Ok(std::borrow::Cow::Owned(json))
}

/// A document of this contract: it says which version it is.
trait Versioned: serde::de::DeserializeOwned {
    fn schema_version(&self) -> &str;
}

impl Versioned for ProxyConfig {
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

impl Versioned for EndpointsConfig {
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// Reads a document of this contract, accepting any minor version of our
/// major.
///
/// Straight from the bytes into `T`, never through a `serde_json::Value`
/// tree: for a namespace's endpoints that tree is several times the
/// document's size, and the proxy's heap would keep the pages it grew into
/// after it is dropped. A document that does not read is looked at again
/// only to say why: a version this proxy does not take first (a newer
/// major may well not read), then its JSON, then the field.
fn read_versioned<T: Versioned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(doc) => {
            de.end().map_err(ConfigError::Json)?;
            check_version(doc.schema_version())?;
            Ok(doc)
        }
        Err(e) => {
            check_version(&version_of(bytes)?)?;
            Err(ConfigError::Field {
                path: e.path().to_string(),
                source: e.into_inner(),
            })
        }
    }
}

/// The `schemaVersion` of a document that did not read as a whole.
fn version_of(bytes: &[u8]) -> Result<String, ConfigError> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "schemaVersion", default)]
        schema_version: Option<serde_json::Value>,
    }
    // Only an object has a version (serde would also read a struct from
    // an array, field by field).
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(ConfigError::Json)?;
        return Err(ConfigError::NoVersion);
    }
    match serde_json::from_slice::<Head>(bytes) {
        Ok(Head {
            schema_version: Some(serde_json::Value::String(v)),
        }) => Ok(v),
        Ok(_) => Err(ConfigError::NoVersion),
        Err(e) if e.is_syntax() || e.is_eof() || e.is_io() => Err(ConfigError::Json(e)),
        // `schemaVersion` twice.
        Err(e) => Err(ConfigError::BadVersion(e.to_string())),
    }
}

/// Refuses a version that is not MAJOR.MINOR, or of a newer major.
fn check_version(version: &str) -> Result<(), ConfigError> {
    let major: u32 = version
        .split_once('.')
        .and_then(|(major, minor)| minor.parse::<u32>().ok().and(major.parse().ok()))
        .ok_or_else(|| ConfigError::BadVersion(version.to_owned()))?;
    if major > SCHEMA_MAJOR {
        return Err(ConfigError::NewerMajor {
            found: version.to_owned(),
        });
    }
    Ok(())
}

/// ConfigMap holding each meshed namespace's [`EndpointsConfig`], next to
/// [`CONFIG_MAP_NAME`]: pod churn rewrites this one, never the policy.
pub const ENDPOINTS_CONFIG_MAP_NAME: &str = "weft-endpoints";
/// Key of the endpoints document; [`ENDPOINTS_GZ_KEY`] (binaryData) when
/// it is over [`COMPRESS_ABOVE`], as for the config.
pub const ENDPOINTS_KEY: &str = "endpoints.json";
pub const ENDPOINTS_GZ_KEY: &str = "endpoints.json.gz";

/// The pods behind every Service a namespace's config names, as the
/// cluster's EndpointSlices say (`discovery.k8s.io/v1`), so a proxy
/// balances, ejects and retries per pod instead of per ClusterIP. Same
/// versioning, hashing and compression as [`ProxyConfig`]. A Service that
/// is not here (no slice yet, ExternalName, an unmeshed caller) is reached
/// through its ClusterIP, as before discovery.
///
/// Size: about 110 bytes of JSON per endpoint, a tenth of that gzipped: a
/// namespace whose Services have 20 000 pods stores about 250 KiB.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsConfig {
    pub schema_version: String,
    /// Content hash, as [`ProxyConfig::generation`].
    pub generation: String,
    pub namespace: String,
    /// By Service, keyed `name.namespace`.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceEndpoints>,
    /// The namespace's meshed pods (not finished) by ServiceAccount,
    /// among which a namespace-wide rate limit is divided. Published only
    /// while the config holds such a limit (pod churn would rewrite the
    /// document for nothing otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_proxies: BTreeMap<String, u32>,
}

/// One Service's endpoints: a group per distinct port mapping (a named
/// `targetPort` may be a different number on different pods).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEndpoints {
    pub groups: Vec<EndpointGroup>,
    /// Endpoints neither ready nor serving (and not terminating), counted
    /// by zone: no proxy sends to them, but they are part of their zone,
    /// so a zone whose pods fail readiness counts as unhealthy in
    /// zone-aware routing. Kept out of `groups` so that no proxy, this
    /// version or an older one, ever picks them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unready_by_zone: BTreeMap<String, u32>,
}

/// Endpoints that listen on the same ports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointGroup {
    /// Service port name (`""` for the one unnamed port) to the port the
    /// endpoints listen on.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<EndpointEntry>,
}

/// One endpoint (a pod, usually).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointEntry {
    /// Its addresses (one per family on a dual-stack pod).
    pub addresses: Vec<String>,
    /// May take new requests (EndpointSlice `ready`; unset there is true).
    pub ready: bool,
    /// Terminating: takes no new request while any other endpoint is
    /// ready; requests in flight finish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
    /// Serving while terminating (EndpointSlice `serving`): may still take
    /// requests when nothing else is ready, as kube-proxy does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serving: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The pod behind the address, and its ServiceAccount: the identity a
    /// meshed endpoint must present. Set only when the operator verified
    /// the slice's claim: the slice's `targetRef` names a pod of the
    /// slice's own namespace whose `status.podIPs` hold every address.
    /// Unset (a pod not yet in the operator's cache, a hand-written
    /// slice), the endpoint is held to the Service's identities, and a
    /// caller that dials it by address is not given the Service's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// A verified pod without the weft sidecar (opted out, or on the
    /// host's network): called in plaintext, as it cannot speak mesh TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unmeshed: bool,
}

impl EndpointsConfig {
    /// The key of a Service in [`EndpointsConfig::services`].
    pub fn key(namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}")
    }

    /// Fills in `schemaVersion` and `generation`: call after building.
    pub fn seal(mut self) -> Self {
        self.schema_version = SCHEMA_VERSION.to_owned();
        self.generation = String::new();
        self.generation = content_hash(&self);
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn to_stored(&self) -> StoredConfig {
        StoredConfig::of(self.to_json())
    }

    /// Reads either stored form, as [`ProxyConfig::from_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        read_versioned(&inflate(bytes)?)
    }
}

/// Sha-256 of a document's compact JSON, first 8 bytes in hex.
fn content_hash<T: Serialize>(doc: &T) -> String {
    let json = serde_json::to_string(doc).unwrap_or_default();
    let digest = Sha256::digest(json.as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_shared_limit_is_divided_among_the_pods_of_its_service_accounts() {
        let clients = BTreeMap::from([
            ("checkout".to_owned(), 3),
            ("catalog".to_owned(), 20),
            ("batch".to_owned(), 1),
        ]);
        let limit = |shared: Option<Vec<&str>>| RateLimitConfig {
            requests_per_second: 30,
            burst: 30,
            shared: shared.map(|sas| SharedLimitConfig {
                service_accounts: sas.into_iter().map(str::to_owned).collect(),
            }),
        };
        assert_eq!(limit(None).sharers(&clients, "checkout"), 1, "per proxy");
        assert_eq!(limit(Some(vec![])).sharers(&clients, "checkout"), 24);
        let named = limit(Some(vec!["checkout", "batch"]));
        assert_eq!(named.sharers(&clients, "checkout"), 4);
        assert_eq!(named.sharers(&clients, "catalog"), 0, "no share");
        // Not counted yet (a document behind the pods): the whole limit
        // rather than none.
        assert_eq!(named.sharers(&BTreeMap::new(), "batch"), 1);
        assert_eq!(limit(Some(vec![])).sharers(&BTreeMap::new(), "x"), 1);
    }

    use super::*;

    fn sample() -> ProxyConfig {
        ProxyConfig {
            schema_version: String::new(),
            generation: String::new(),
            namespace: "shop".into(),
            trust_domain: "cluster.local".into(),
            inbound: InboundConfig {
                mode: InboundMode::Permissive,
                plaintext_ports: vec![],
                authorizations: vec![],
                rate_limits: Vec::new(),
            },
            outbound: OutboundConfig {
                defaults: ServicePolicy {
                    source: None,
                    timeout_ms: None,
                    retry: RetryConfig {
                        max_retries: 1,
                        per_try_timeout_ms: None,
                        retry_on: vec![RetryOn::ConnectFailure],
                        status_codes: vec![],
                        methods: HttpMethod::IDEMPOTENT.to_vec(),
                        idempotency_header: IDEMPOTENCY_HEADER.into(),
                        budget: RetryBudgetConfig {
                            percent: 20,
                            min_per_second: 10,
                            window_ms: 10_000,
                        },
                        backoff_base_ms: 25,
                        backoff_max_ms: 250,
                    },
                    circuit_breaker: None,
                    rate_limit: None,
                    retry_after: None,
                    load_balancer: LoadBalancerAlgorithm::PeakEwma,
                    zone_affinity: None,
                    excluded_paths: vec![],
                    cache: None,
                },
                services: vec![],
                egress: EgressMode::AllowAll,
                external_services: vec![],
            },
            tracing: None,
        }
        .seal()
    }

    #[test]
    fn round_trips_and_hash_tracks_content() {
        let a = sample();
        assert_eq!(a.schema_version, SCHEMA_VERSION);
        assert_eq!(a.generation.len(), 16);
        let back = ProxyConfig::from_json(a.to_json().as_bytes()).expect("reads back");
        assert_eq!(back, a);
        let mut b = sample();
        b.inbound.mode = InboundMode::Strict;
        let b = b.seal();
        assert_ne!(
            a.generation, b.generation,
            "a content change must change the generation"
        );
        assert_eq!(
            sample().generation,
            a.generation,
            "the hash is deterministic"
        );
    }

    #[test]
    fn large_configs_are_stored_compressed_and_read_back() {
        let small = sample();
        assert!(matches!(small.to_stored(), StoredConfig::Json(_)));
        let mut big = sample();
        big.inbound.plaintext_ports = (1..=u16::MAX).collect();
        let big = big.seal();
        let stored = big.to_stored();
        let StoredConfig::Gzip(bytes) = &stored else {
            panic!("a {} byte config must be compressed", big.to_json().len());
        };
        assert!(
            stored.stored_len() < COMPRESS_ABOVE,
            "{}",
            stored.stored_len()
        );
        assert_eq!(ProxyConfig::from_bytes(bytes).expect("inflates"), big);
        assert_eq!(
            ProxyConfig::from_bytes(small.to_json().as_bytes()).expect("plain"),
            small
        );
        let err = ProxyConfig::from_bytes(&bytes[..bytes.len() / 2]).expect_err("truncated");
        assert!(matches!(err, ConfigError::Gzip(_)), "{err}");
    }

    #[test]
    fn newer_minor_with_unknown_fields_is_read() {
        let mut v = serde_json::to_value(sample()).expect("json");
        v["schemaVersion"] = "1.7".into();
        v["futureKnob"] = serde_json::json!({"x": 1});
        v["inbound"]["futureInbound"] = true.into();
        let cfg =
            ProxyConfig::from_json(v.to_string().as_bytes()).expect("newer minor is tolerated");
        assert_eq!(cfg.namespace, "shop");
    }

    #[test]
    fn newer_major_is_refused_with_advice() {
        let mut v = serde_json::to_value(sample()).expect("json");
        v["schemaVersion"] = "2.0".into();
        let err = ProxyConfig::from_json(v.to_string().as_bytes()).expect_err("major 2");
        assert!(matches!(err, ConfigError::NewerMajor { .. }));
        assert!(err.to_string().contains("upgrade the proxy"), "{err}");
    }

    #[test]
    fn broken_documents_name_the_problem() {
        let cases: [(&str, &str); 10] = [
            ("{", "not valid JSON"),
            ("{}", "no schemaVersion"),
            (r#"{"schemaVersion":"one"}"#, "not MAJOR.MINOR"),
            // Valid JSON that is not an object has no version, whatever a
            // struct could be read from (serde reads one from an array).
            (r#"["1.0","x","shop"]"#, "no schemaVersion"),
            ("[1,", "not valid JSON"),
            (r#"{"schemaVersion":1}"#, "no schemaVersion"),
            (
                r#"{"schemaVersion":"1.0","schemaVersion":"1.0"}"#,
                "duplicate field",
            ),
            // A newer major is refused as such, even when its fields do
            // not read as this version's.
            (
                r#"{"schemaVersion":"2.0","inbound":7}"#,
                "newer than this proxy",
            ),
            (
                r#"{"schemaVersion":"1.0","generation":"x","namespace":"shop","trustDomain":"t","inbound":{"mode":"strict"},"outbound":{}} {}"#,
                "trailing characters",
            ),
            (
                r#"{"schemaVersion":"1.0","generation":"x","namespace":"shop","trustDomain":"t","inbound":{"mode":"sometimes"},"outbound":{}}"#,
                "inbound.mode",
            ),
        ];
        for (doc, expected) in cases {
            let err = ProxyConfig::from_json(doc.as_bytes()).expect_err(doc);
            assert!(err.to_string().contains(expected), "{doc}: {err}");
        }
    }
}
