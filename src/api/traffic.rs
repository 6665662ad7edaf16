//! `TrafficPolicy`: how clients call one Service — timeout, retries,
//! circuit breaking, rate limit, load balancing.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, HttpMethod, PathMatch, PolicyStatus};

/// Resilience settings every client proxy applies when calling the target
/// Service. One per Service: when several target it the oldest wins.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    namespaced,
    doc = "How clients call one Service: timeout, retries (safe by default), circuit breaking, rate limit, load balancing.",
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "tp",
    category = "weft",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Timeout", type_ = "string", json_path = ".spec.timeout"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.timeout) || !has(self.retries) || !has(self.retries.perTryTimeout) || duration(self.retries.perTryTimeout) <= duration(self.timeout)").message("retries.perTryTimeout must not exceed timeout: the whole request would time out before one try does"))]
#[x_kube(validation = Rule::new("!has(self.rateLimit) || !has(self.rateLimit.serviceAccounts) || size(self.rateLimit.serviceAccounts) == 0 || self.targetRef.kind == 'ExternalService'").message("rateLimit.serviceAccounts is for an ExternalService target: for a Service, the callers are in other namespaces, whose ServiceAccounts this policy cannot name"))]
#[x_kube(validation = Rule::new("!has(self.inboundRateLimit) || self.targetRef.kind == 'Service'").message("inboundRateLimit is enforced by the proxies of the target's own pods, and an ExternalService has none: limit the calls to it with rateLimit"))]
pub struct TrafficPolicySpec {
    /// The Service (or ExternalService) this policy applies to, in the
    /// policy's namespace.
    pub target_ref: PolicyTargetReference,
    /// Deadline for the whole request, retries included. Unset: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retries of failed requests. Only idempotent methods, or requests that
    /// carry an `Idempotency-Key` header, are retried unless `methods` says
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// Stop sending to a failing endpoint (or the whole Service) for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// A token bucket on the calls to the target: each client proxy's own,
    /// or (`scope: Namespace`) shared by a namespace's client pods. HTTP
    /// calls only: TLS passed through is not seen request by request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Limits on the requests the target's own pods admit, enforced by
    /// each pod's proxy after mTLS and AccessPolicy: for all callers
    /// together, for each caller identity, for named callers, and per
    /// route. What is over a limit is answered `429 Too Many Requests`
    /// (`weft-proxy-error: rate-limited`, with `Retry-After`) without
    /// reaching the application. Every limit is per pod: a Service of
    /// three pods admits three times the rate. HTTP requests only: an
    /// opaque TCP connection is not seen request by request. A Service
    /// target only (an ExternalService has no pods of the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_rate_limit: Option<InboundRateLimit>,
    /// Honour the target's own back-off: after it answers `429 Too Many
    /// Requests` with `Retry-After` (or says `RateLimit-Remaining: 0` with
    /// `RateLimit-Reset`), each client proxy sends it nothing until the
    /// time it gave. Health paths (`excludedPaths`) are neither held nor
    /// listened to. Calls meanwhile wait, a
    /// bounded number for a bounded time, and past either are answered 429
    /// by the proxy (`weft-proxy-error: rate-limited`, with the
    /// `Retry-After` left); retries wait the same way. Unset: a 429 passes
    /// through and the next call goes at once. For a vendor's API, set it;
    /// for an internal Service that answers 429 per end user rather than
    /// per caller, leave it unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<RetryAfter>,
    /// How endpoints are picked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Keep the target's reusable answers to GET (and HEAD) in each
    /// client proxy's memory and answer from there while they are fresh
    /// (RFC 9111: `Cache-Control`, `Expires`, `ETag`/`Last-Modified`
    /// revalidation, `Vary`; never `no-store`, `private`, answers setting
    /// a cookie unless `public`, or answers to requests with
    /// `Authorization` unless `public`, `s-maxage` or `must-revalidate`). With `staleIfError`, a stored answer
    /// the target marked reusable also stands in while the target fails.
    /// Unset: nothing is cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ResponseCache>,
    /// Request paths (exact, query ignored) that never count as failures and
    /// are never retried, such as health checks: `/health`, `/readyz`.
    /// Compared normalised: `/%68ealth` and `/x/../health` are `/health`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^/[^\s?#]*$")), extend("x-kubernetes-list-type" = "set"))]
    pub excluded_paths: Vec<String>,
}

/// How a client proxy caches the target's answers.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxObjectBytes * 4 <= self.maxBytes").message("cache.maxObjectBytes must be at most a quarter of cache.maxBytes (defaults 64Ki and 1Mi), so that the store holds several answers"))]
#[x_kube(validation = Rule::new("!has(self.staleIfError) || duration(self.staleIfError) <= duration('24h')").message("cache.staleIfError must be at most 24h"))]
#[x_kube(validation = Rule::new("!has(self.staleWhileRevalidate) || duration(self.staleWhileRevalidate) <= duration('1h')").message("cache.staleWhileRevalidate must be at most 1h"))]
pub struct ResponseCache {
    /// Bytes of answers (head and body) each client proxy keeps for this
    /// target, all its hosts and ports together; past it the least used
    /// go. It is memory of every client pod: default 1 MiB, at most 64 MiB.
    #[serde(default = "default_cache_bytes")]
    #[schemars(range(min = 65536, max = 67108864))]
    pub max_bytes: u32,
    /// The largest answer stored (head and body); larger ones pass
    /// through uncached. Default 64 KiB, at most a quarter of `maxBytes`.
    #[serde(default = "default_cache_object_bytes")]
    #[schemars(range(min = 4096, max = 16777216))]
    pub max_object_bytes: u32,
    /// Path prefixes cached (`/v1/products/`); a request whose path
    /// starts with none of them is neither answered from nor stored in the
    /// cache. Empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^/[^\s?#]*$")), extend("x-kubernetes-list-type" = "set"))]
    pub paths: Vec<String>,
    /// How long past its freshness a stored answer may stand in for one
    /// the target failed to give (an error, no answer in time, 500, 502,
    /// 503, 504), where the answer does not say itself
    /// (`Cache-Control: stale-if-error`, RFC 5861, which wins). Never for an answer
    /// marked `must-revalidate`, `proxy-revalidate`, `no-cache` or
    /// `s-maxage`. Unset: only as long as the answer says. At most 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<Duration>,
    /// How long past its freshness a stored answer is still given at once
    /// while the proxy revalidates it in the background, where the answer
    /// does not say itself (`stale-while-revalidate`, RFC 5861, which
    /// wins). Same exceptions as `staleIfError`. At most 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<Duration>,
}

/// What each of the target's pods admits per second, enforced by its own
/// proxy. A request draws on every limit that applies to it (its route's,
/// its caller's, the total) and is refused by the first that has nothing
/// left, taking nothing from the others.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.total) || has(self.perIdentity) || (has(self.overrides) && size(self.overrides) > 0) || (has(self.routes) && size(self.routes) > 0)").message("inboundRateLimit sets no limit: give it total, perIdentity, overrides or routes"))]
#[x_kube(validation = Rule::new("!has(self.total) || !has(self.perIdentity) || self.perIdentity.requestsPerSecond <= self.total.requestsPerSecond").message("inboundRateLimit.perIdentity.requestsPerSecond must not exceed total.requestsPerSecond: no caller could use it"))]
#[x_kube(validation = Rule::new("!has(self.total) || !has(self.overrides) || self.overrides.all(o, o.requestsPerSecond <= self.total.requestsPerSecond)").message("inboundRateLimit.overrides[].requestsPerSecond must not exceed total.requestsPerSecond: no caller could use it"))]
pub struct InboundRateLimit {
    /// All callers of one pod together: what the pod can take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<RequestRate>,
    /// Each caller identity's own share of one pod (the fairness limit: a
    /// runaway caller cannot starve the others). Callers without a mesh
    /// identity (plaintext, in PERMISSIVE) count as one caller together.
    /// Callers an override names take the override's limit instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<RequestRate>,
    /// Named callers with a limit of their own instead of `perIdentity`
    /// (higher for a batch job the team trusts, lower for a noisy one).
    /// The callers one override names share its limit; a caller named by
    /// several takes the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub overrides: Vec<InboundRateOverride>,
    /// Requests matching a route (path, and methods if given) share the
    /// route's limit, all callers together, besides the other limits: an
    /// expensive search, a checkout. A request takes the first route it
    /// matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub routes: Vec<InboundRouteRate>,
    /// Request paths (exact, query ignored, compared normalised) no limit
    /// counts: the health checks and metrics scrapes a load balancer or a
    /// monitor sends to the application's port. (Kubelet HTTP probes
    /// never reach it, the injector moves them to the proxy's probe port;
    /// gRPC health checks are never limited.) Not `/`: that would exempt
    /// the home page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^/[^\s?#]+$")), extend("x-kubernetes-list-type" = "set"))]
    pub excluded_paths: Vec<String>,
}

/// A token bucket: a sustained rate and a burst above it.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRate {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    /// Requests allowed at once above the rate after a quiet spell;
    /// default equals `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
}

/// Callers with a limit of their own.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundRateOverride {
    /// The callers: ServiceAccounts, or every ServiceAccount of a
    /// namespace. Callers without a mesh identity cannot be named.
    #[schemars(length(min = 1, max = 16))]
    pub from: Vec<super::AccessSource>,
    /// The limit of these callers together.
    #[serde(flatten)]
    pub rate: RequestRate,
}

/// A route with a limit of its own.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundRouteRate {
    /// Names the route in metrics (`weft_proxy_inbound_rate_limited_total`)
    /// and in refusals.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The request path, compared normalised (as AccessPolicy compares it).
    pub path: PathMatch,
    /// HTTP methods the route covers. Empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub methods: Vec<HttpMethod>,
    /// The limit of this route, all callers together.
    #[serde(flatten)]
    pub rate: RequestRate,
}

fn default_cache_bytes() -> u32 {
    1 << 20
}
fn default_cache_object_bytes() -> u32 {
    64 << 10
}

/// When and how often a failed request is sent again.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.backoff) || duration(self.backoff.base) <= duration(self.backoff.max)").message("retries.backoff.base must not exceed retries.backoff.max"))]
pub struct RetryPolicy {
    /// How many times a failed request is retried, not counting the first try.
    #[serde(default = "default_attempts")]
    #[schemars(range(max = 10))]
    pub attempts: u32,
    /// Deadline of each try. Unset: each try may use what is left of `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Which failures are retried. Default: `connect-failure`, `reset`,
    /// `gateway-error`.
    #[serde(default = "default_retry_on")]
    #[schemars(length(min = 1), extend("x-kubernetes-list-type" = "set"))]
    pub retry_on: Vec<RetryOn>,
    /// Response status codes retried in addition to `retryOn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 100, max = 599)), extend("x-kubernetes-list-type" = "set"))]
    pub status_codes: Vec<u16>,
    /// Methods that may be retried. Default: the idempotent ones, GET, HEAD,
    /// OPTIONS, PUT, DELETE, TRACE. A request with an `Idempotency-Key` header
    /// is retried whatever its method. Add POST only if its handler is
    /// idempotent: a retried POST can charge a customer twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub methods: Option<Vec<HttpMethod>>,
    /// Caps retries to a share of live traffic so an outage cannot multiply
    /// the load on a struggling Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// Exponential backoff with jitter between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
}

fn default_attempts() -> u32 {
    2
}

pub fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::GatewayError,
    ]
}

/// A class of failure that may be retried.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection to the endpoint could not be made (the request never
    /// left, so any method is safe to retry).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The endpoint reset or closed the connection before responding.
    #[serde(rename = "reset")]
    Reset,
}

/// The share of requests that may be retries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed as a percentage of requests (default 20).
    #[serde(default = "default_budget_percent")]
    #[schemars(range(max = 100))]
    pub percent: u32,
    /// Retries per second always allowed, however little traffic there is
    /// (default 10).
    #[serde(default = "default_min_retries")]
    pub min_retries_per_second: u32,
    /// The window over which requests and retries are counted (default 10s).
    #[serde(default = "default_budget_window")]
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: default_budget_percent(),
            min_retries_per_second: default_min_retries(),
            window: default_budget_window(),
        }
    }
}

fn default_budget_percent() -> u32 {
    20
}
fn default_min_retries() -> u32 {
    10
}
fn default_budget_window() -> Duration {
    Duration::from_secs(10)
}

/// Exponential backoff between tries: `base * 2^n`, capped at `max`, with
/// full jitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First backoff (default 25ms).
    #[serde(default = "default_backoff_base")]
    pub base: Duration,
    /// Largest backoff (default 250ms).
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}
fn default_backoff_max() -> Duration {
    Duration::from_millis(250)
}

/// Trips per endpoint (and for the Service when every endpoint is out).
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.openDuration) <= duration(self.maxOpenDuration)").message("circuitBreaker.openDuration must not exceed circuitBreaker.maxOpenDuration"))]
pub struct CircuitBreaker {
    /// Consecutive failures that open the circuit (default 5).
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: u32,
    /// Also open when the failure rate over a window passes a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRate>,
    /// How long the circuit stays open the first time (default 5s); it
    /// doubles on each trip that follows a failed probe.
    #[serde(default = "default_open_duration")]
    pub open_duration: Duration,
    /// The longest the circuit stays open (default 1m).
    #[serde(default = "default_max_open_duration")]
    pub max_open_duration: Duration,
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_open_duration() -> Duration {
    Duration::from_secs(5)
}
fn default_max_open_duration() -> Duration {
    Duration::from_secs(60)
}

/// A failure-rate trip condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureRate {
    /// Failure percentage that opens the circuit.
    #[schemars(range(min = 1, max = 100))]
    pub percent: u32,
    /// Requests the window must hold before the rate counts (default 20).
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: u32,
    /// The sliding window (default 10s).
    #[serde(default = "default_rate_window")]
    pub window: Duration,
}

fn default_min_requests() -> u32 {
    20
}
fn default_rate_window() -> Duration {
    Duration::from_secs(10)
}

/// A token bucket.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.serviceAccounts) || size(self.serviceAccounts) == 0 || self.scope == 'Namespace'").message("rateLimit.serviceAccounts is for scope Namespace: it says whose pods share the namespace's limit"))]
pub struct RateLimit {
    /// Sustained requests per second: of each client proxy, or with
    /// `scope: Namespace` of the namespace's client pods together.
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// Requests allowed in a burst above the rate; default equals
    /// `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Whose calls the limit counts. `Proxy` (default): each client
    /// proxy's own. `Namespace`: those of all the client pods of a
    /// calling namespace together, as a vendor counts an API key's quota:
    /// the operator counts the meshed pods (running or starting, not
    /// finished, scheduled to a node) and each proxy takes its share of
    /// rate and burst (at least one request of burst), re-divided as pods
    /// come and go; all the hosts and ports of the target draw on one
    /// limit. For a Service target, each calling namespace gets the whole
    /// limit.
    #[serde(default)]
    pub scope: RateLimitScope,
    /// With `scope: Namespace`, the ServiceAccounts whose pods share the
    /// limit (the ones that call the target), so that pods that never
    /// call it do not dilute the shares. Other pods of the namespace get
    /// no share: their calls are answered 429 `rate-limited`. Default:
    /// every meshed pod of the namespace. ExternalService targets only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 253)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub service_accounts: Vec<String>,
}

/// Whose calls a rate limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RateLimitScope {
    /// Each client proxy's own calls.
    #[default]
    Proxy,
    /// The calls of a namespace's client pods together.
    Namespace,
}

/// What a TrafficPolicy applies to, in its own namespace: a Service
/// (group `""`) or an ExternalService (group `weft.dev`), shaped like
/// Gateway API's `LocalPolicyTargetReference`.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'ExternalService' ? self.group == 'weft.dev' : self.group == ''").message("targetRef.group must be \"\" (the core group) for a Service and \"weft.dev\" for an ExternalService"))]
#[x_kube(validation = Rule::new("self.kind != 'Service' || size(self.name) <= 63").message("targetRef.name of a Service is at most 63 characters (a DNS label)"))]
pub struct PolicyTargetReference {
    /// API group of the referent: `""` for a Service, `weft.dev` for an
    /// ExternalService.
    #[serde(default)]
    #[schemars(extend("enum" = ["", "weft.dev"]))]
    pub group: String,
    /// Kind of the referent: `Service` (default) or `ExternalService`.
    #[serde(default)]
    pub kind: PolicyTargetKind,
    /// Name of the referent, in the same namespace as this policy.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl PolicyTargetReference {
    pub fn service(name: impl Into<String>) -> Self {
        Self {
            group: String::new(),
            kind: PolicyTargetKind::Service,
            name: name.into(),
        }
    }

    pub fn external_service(name: impl Into<String>) -> Self {
        Self {
            group: super::GROUP.to_owned(),
            kind: PolicyTargetKind::ExternalService,
            name: name.into(),
        }
    }
}

/// The kinds a TrafficPolicy may target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PolicyTargetKind {
    #[default]
    Service,
    ExternalService,
}

/// How calls wait out the target's back-off.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(has(self.maxWait) ? self.maxWait : '1s') <= duration(has(self.maxBackOff) ? self.maxBackOff : '60s')").message("retryAfter.maxWait must not exceed retryAfter.maxBackOff (defaults 1s and 60s): no call waits longer than the longest back-off honoured"))]
#[x_kube(validation = Rule::new("!has(self.maxBackOff) || duration(self.maxBackOff) <= duration('1h')").message("retryAfter.maxBackOff must be at most 1h: a longer back-off is an outage, for the circuit breaker and alerts, not a wait"))]
pub struct RetryAfter {
    /// How long a call may wait for the back-off to end (default 1s); one
    /// that would wait longer, or past its own timeout, is answered 429 at
    /// once. `0s`: calls never wait.
    #[serde(default = "default_retry_after_wait")]
    pub max_wait: Duration,
    /// Calls that may wait at once, per client proxy (default 100); the
    /// rest are answered 429 at once.
    #[serde(default = "default_retry_after_queue")]
    #[schemars(range(max = 10000))]
    pub max_queued: u32,
    /// The longest back-off honoured (default 60s, at most 1h): a longer
    /// `Retry-After`, or a date further ahead, is cut to it.
    #[serde(default = "default_retry_after_back_off")]
    pub max_back_off: Duration,
}

impl Default for RetryAfter {
    fn default() -> Self {
        Self {
            max_wait: default_retry_after_wait(),
            max_queued: default_retry_after_queue(),
            max_back_off: default_retry_after_back_off(),
        }
    }
}

fn default_retry_after_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_after_queue() -> u32 {
    100
}
fn default_retry_after_back_off() -> Duration {
    Duration::from_secs(60)
}

/// Endpoint selection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// `PeakEwma` (default): power of two choices by peak-EWMA latency.
    /// `RoundRobin`: each endpoint in turn.
    #[serde(default)]
    pub algorithm: LoadBalancerAlgorithm,
    /// Keep calls in the caller's zone while that zone has enough healthy
    /// endpoints, and spill to other zones when it does not. Unset: the
    /// Service's own `spec.trafficDistribution` decides (`PreferClose` or
    /// `PreferSameZone` turn this on with its defaults), else every zone
    /// is one pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_same_zone: Option<ZoneAffinity>,
}

/// Zone-aware routing with failover.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZoneAffinity {
    /// The share of the caller's zone's endpoints that must be healthy
    /// (not ejected by the circuit breaker, not terminating) for all calls
    /// to stay in the zone. Below it, calls spill to other zones in
    /// proportion (at half of it, half spill), as Envoy's priority
    /// failover does with its overprovisioning factor of 1.4 (about 70).
    /// With no healthy endpoint in the zone, every call goes elsewhere.
    #[serde(default = "default_min_healthy_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub min_healthy_percent: u32,
}

impl Default for ZoneAffinity {
    fn default() -> Self {
        Self {
            min_healthy_percent: default_min_healthy_percent(),
        }
    }
}

fn default_min_healthy_percent() -> u32 {
    70
}

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LoadBalancerAlgorithm {
    #[default]
    PeakEwma,
    RoundRobin,
}
