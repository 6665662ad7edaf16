//! `ServiceRoute`: ordered rules that send a Service's requests to weighted
//! backend Services — canary splits, header routing. Shaped like Gateway API
//! HTTPRoute in mesh (GAMMA) mode, with one Service as parent.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::common::{Duration, HttpMethod, PathMatch, ServiceReference};
use super::traffic::RetryPolicy;

/// Routing for calls to one Service. One per Service: when several name the
/// same parent the oldest wins.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "ServiceRoute",
    namespaced,
    doc = "Ordered routing rules for calls to one Service: matches on path, method and headers send requests to weighted backend Services (canary splits).",
    status = "ServiceRouteStatus",
    derive = "PartialEq",
    shortname = "sr",
    category = "weft",
    printcolumn(name = "Parent", type_ = "string", json_path = ".spec.parentRef.name"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Resolved",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ResolvedRefs\")].status"
    ),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.rollout.phase"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.rollout.step"),
    printcolumn(
        name = "Weight",
        type_ = "integer",
        json_path = ".status.rollout.weight"
    ),
    printcolumn(
        name = "Verdict",
        type_ = "string",
        json_path = ".status.rollout.verdict"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.rollout) || self.rules.exists(r, r.backendRefs.exists(b, b.name == self.rollout.canary))").message("rollout.canary must name a backendRef of one of the rules"))]
#[x_kube(validation = Rule::new("!has(self.rollout) || self.rollout.canary != self.parentRef.name").message("rollout.canary must be another Service than parentRef (the canary backend, not the Service its callers call)"))]
pub struct ServiceRouteSpec {
    /// The Service whose callers this route steers, in the route's namespace.
    pub parent_ref: ServiceReference,
    /// Rules, first match wins. A request no rule matches goes to the parent
    /// Service itself.
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<RouteRule>,
    /// A progressive canary: the share of one backend raised step by step,
    /// each step gated on that backend's golden signals against the other
    /// backends' of the same rules, as their own pods' proxies counted
    /// them. Promoted at the last step (100), aborted (all traffic back to
    /// the other backends) on a failed gate, paused by the annotation
    /// `weft.dev/rollout-paused: "true"`. A change of `rollout` or of the
    /// canary's rules' backends starts it again from the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<CanaryRollout>,
}

/// The steps and gates of a progressive canary.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.steps[size(self.steps) - 1] == 100").message("rollout.steps must end with 100 (the promotion)"))]
#[x_kube(validation = Rule::new("self.steps.all(s, self.steps.exists_one(t, t == s))").message("rollout.steps must not repeat a weight"))]
#[x_kube(validation = Rule::new("duration(self.interval) >= duration('10s') && duration(self.interval) <= duration('9m')").message("rollout.interval must be between 10s and 9m (the control plane keeps ten minutes of evidence)"))]
pub struct CanaryRollout {
    /// The backendRef (a Service name) rolled out; every rule naming it
    /// takes part, its other backends being the stable ones.
    #[schemars(length(min = 1, max = 63))]
    pub canary: String,
    /// The canary's share of each rule's requests at each step, in
    /// percent, ascending; the last is 100 (promoted). Default 5, 25, 50,
    /// 100.
    #[serde(default = "default_canary_steps")]
    #[schemars(length(min = 1, max = 20), inner(range(min = 1, max = 100)))]
    pub steps: Vec<u32>,
    /// How long each step is observed before it may pass (default 1m;
    /// 10s to 9m). A failed gate aborts as soon as both sides have
    /// `minRequests`, without waiting for the window's end.
    #[serde(default = "default_canary_interval")]
    pub interval: Duration,
    /// What a step must show to pass.
    #[serde(default)]
    pub gates: CanaryGates,
}

/// The gates of each step, read over the step's window from the proxies
/// of the backends' own pods (every request each served, retries
/// included): the canary against the stable backends of the same rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryGates {
    /// How many percentage points the canary's success rate may fall
    /// below the stable backends' (default 1).
    #[serde(default = "default_max_success_rate_drop")]
    #[schemars(range(max = 100))]
    pub max_success_rate_drop: u32,
    /// How many percent the canary's p99 latency may exceed the stable
    /// backends' (default 50); differences under 5 ms never fail.
    #[serde(default = "default_max_p99_increase")]
    #[schemars(range(max = 10000))]
    pub max_p99_increase_percent: u32,
    /// Requests each side's pods must have served in the window before a
    /// gate is read (default 100): a quiet step never passes on no
    /// evidence.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_requests: u32,
}

impl Default for CanaryGates {
    fn default() -> Self {
        Self {
            max_success_rate_drop: default_max_success_rate_drop(),
            max_p99_increase_percent: default_max_p99_increase(),
            min_requests: default_min_requests(),
        }
    }
}

fn default_canary_steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}
fn default_canary_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_max_success_rate_drop() -> u32 {
    1
}
fn default_max_p99_increase() -> u32 {
    50
}
fn default_min_requests() -> u32 {
    100
}

impl CanaryRollout {
    /// The canary's share at `step` (from 0), in percent.
    pub fn weight_at(&self, step: usize) -> u32 {
        self.steps
            .get(step)
            .or(self.steps.last())
            .copied()
            .unwrap_or(100)
            .min(100)
    }

    /// Whether the steps ascend (the CRD checks the last and repeats; a
    /// rollout whose steps do not ascend puts no traffic on the canary).
    pub fn steps_ascend(&self) -> bool {
        self.steps.windows(2).all(|w| w[0] < w[1])
    }

    /// The canary's share in force for a rollout at `revision` whose
    /// status says `state` (phase, step from 0, the revision it ran
    /// for): the first step for a new or changed rollout, none after an
    /// abort or with steps that do not ascend, all after promotion.
    pub fn weight_in_force(
        &self,
        revision: &str,
        state: Option<(CanaryPhase, usize, Option<&str>)>,
    ) -> u32 {
        if !self.steps_ascend() {
            return 0;
        }
        match state {
            Some((phase, step, ran_for)) if ran_for == Some(revision) => match phase {
                CanaryPhase::Aborted => 0,
                CanaryPhase::Promoted => 100,
                CanaryPhase::Progressing | CanaryPhase::Paused => self.weight_at(step),
            },
            _ => self.weight_at(0),
        }
    }
}

impl ServiceRoute {
    /// The canary backend and its share in force, when the route has a
    /// progressive canary.
    pub fn canary_in_force(&self) -> Option<(&str, u32)> {
        let rollout = self.spec.rollout.as_ref()?;
        let revision = self.canary_revision()?;
        let state = self
            .status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .map(|s| {
                (
                    s.phase,
                    s.step.saturating_sub(1) as usize,
                    s.revision.as_deref(),
                )
            });
        Some((
            rollout.canary.as_str(),
            rollout.weight_in_force(&revision, state),
        ))
    }

    /// What the canary's rollout runs for: its `rollout` and the
    /// backends of the rules naming the canary, hashed. A change of
    /// either starts the rollout again; any other edit (a timeout, a
    /// match) leaves it where it stands.
    pub fn canary_revision(&self) -> Option<String> {
        let rollout = self.spec.rollout.as_ref()?;
        let backends: Vec<&Vec<BackendRef>> = self
            .spec
            .rules
            .iter()
            .filter(|r| r.backend_refs.iter().any(|b| b.name == rollout.canary))
            .map(|r| &r.backend_refs)
            .collect();
        Some(super::common::revision_of(&(rollout, backends)))
    }
}

/// The annotation that pauses a ServiceRoute's canary where it stands.
pub const ROLLOUT_PAUSED_ANNOTATION: &str = "weft.dev/rollout-paused";

/// A ServiceRoute's status: the compiler's conditions, and where its
/// canary stands (written apart, by the canary's own field manager).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRouteStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Programmed`, as in Gateway API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The progressive canary, when `spec.rollout` asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<CanaryStatus>,
}

/// Where a progressive canary stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CanaryPhase {
    /// At a step, observing it.
    Progressing,
    /// Held at its step by the pause annotation (or by steps that do
    /// not ascend); a failing gate still aborts it.
    Paused,
    /// Reached 100 %: the canary takes every request of its rules.
    Promoted,
    /// A gate failed: every request goes to the stable backends.
    Aborted,
}

/// A progressive canary's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// The route generation last looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What the rollout runs for: a hash of `spec.rollout` and the
    /// backends of the canary's rules (a change of either starts again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Progressing, Paused, Promoted or Aborted.
    pub phase: CanaryPhase,
    /// The step in force, from 1.
    pub step: u32,
    /// The canary's share of its rules' requests in force, in percent.
    pub weight: u32,
    /// When the step (or the pause) began.
    pub step_since: Time,
    /// The latest verdict of the gates: `Started`, `Observing`,
    /// `TooFewRequests`, `NoEvidence`, `Passed`, `SuccessRate`,
    /// `Latency`, `Paused`, `Resumed`, `Promoted`.
    pub verdict: String,
    /// What the verdict is made of, with the figures.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The canary's golden signals over the step's window so far (the
    /// window that settled it, once promoted or aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySignals>,
    /// The stable backends', on the same rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<CanarySignals>,
}

/// Golden signals of one side of a canary over a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanarySignals {
    /// Requests counted over the window.
    pub requests: u64,
    /// Percent of requests answered without a 5xx or a failed exchange,
    /// as text with one decimal (`"99.5"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<String>,
    /// The 99th percentile latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<u64>,
}

/// One routing rule.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.backendRefs.exists(b, b.weight > 0)").message("at least one backendRef must have a weight above 0"))]
pub struct RouteRule {
    /// A name for metrics and status messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: Option<String>,
    /// The rule applies when any match holds; no matches means every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go, split by weight.
    #[schemars(length(min = 1, max = 16))]
    pub backend_refs: Vec<BackendRef>,
    /// Overrides the backend's TrafficPolicy timeout for this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Overrides the backend's TrafficPolicy retries for this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
}

/// Conditions that must all hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// The request path, compared in its normalised form (escaped
    /// unreserved characters decoded, `.` and `..` segments removed), the
    /// one the destination's application receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The request method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// Request headers that must be present with these exact values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// An exact header match; names compare case-insensitively.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, such as `x-canary`.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"),
        length(min = 1, max = 256)
    )]
    pub name: String,
    /// The exact value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A weighted backend Service in the route's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// Name of the backend Service.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Port on the backend Service; unset uses the port the client called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Share of the rule's requests, relative to the other backends
    /// (0 to 1000, default 1).
    #[serde(default = "default_weight")]
    #[schemars(range(max = 1000))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}
