//! `AccessPolicy`: which identities may call a Service (or every workload of
//! a namespace). Allow by default until a policy selects a target; from then
//! on that target admits only what some rule allows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, HttpMethod, PathMatch};

/// Who may call the target. One per target: when several select the same
/// target the oldest wins. A Service-level policy takes precedence over a
/// namespace-level one for that Service.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    plural = "accesspolicies",
    namespaced,
    doc = "Which identities (service accounts, namespaces) may call a Service or the workloads of a namespace, on which ports, paths and methods. Everything else is denied once a policy selects a target (in mode Audit, only counted).",
    status = "AccessPolicyStatus",
    derive = "PartialEq",
    shortname = "ap",
    category = "weft",
    printcolumn(
        name = "Target Kind",
        type_ = "string",
        json_path = ".spec.targetRef.kind"
    ),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Enforcement",
        type_ = "string",
        json_path = ".status.enforcement.phase"
    ),
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
#[x_kube(validation = Rule::new("!has(self.observationWindow) || duration(self.observationWindow) <= duration('9m')").message("observationWindow must be at most 9m (the control plane keeps ten minutes of evidence); 0s enforces without watching"))]
pub struct AccessPolicySpec {
    /// The Service, or the whole namespace, this policy guards.
    pub target_ref: AccessTarget,
    /// Allow rules; a request is admitted when any rule matches. No rules
    /// denies every caller.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub rules: Vec<AccessRule>,
    /// `Enforce` (the default): what no rule allows is refused. `Audit`:
    /// every caller is admitted, and the proxies count who called on
    /// which port, method and path, and whether the rules would have
    /// admitted it; the operator gathers that into
    /// `status.observedCallers` (`weft authz suggest` prints the policy
    /// that admits exactly those). Moving an audited policy to `Enforce`
    /// is staged: see `observationWindow`.
    #[serde(default)]
    pub mode: AccessMode,
    /// When a policy that was auditing is switched to `Enforce`, its
    /// proxies keep auditing until a window this long passes in which no
    /// caller outside the rules was seen (status `Observing`, or `Blocked`
    /// naming the callers while they keep coming). Default 5m; at most
    /// 9m; `0s` enforces at the next look without watching, from any
    /// phase. A policy created in `Enforce` enforces at once, and so do
    /// edits of an enforced policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observation_window: Option<Duration>,
}

/// Whether an AccessPolicy refuses what its rules do not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    /// Refuse what no rule allows.
    #[default]
    Enforce,
    /// Admit every caller; count what the rules would have refused.
    Audit,
}

/// The observation window of an Audit to Enforce move when the policy
/// names none.
pub const DEFAULT_OBSERVATION_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

impl AccessPolicySpec {
    /// The observation window before Enforce takes effect.
    pub fn observation_window(&self) -> std::time::Duration {
        self.observation_window
            .map_or(DEFAULT_OBSERVATION_WINDOW, |d| d.as_std())
    }
}

impl AccessPolicy {
    /// Whether the proxies only audit this policy (admit all, count what
    /// it would refuse): in mode `Audit`, and in mode `Enforce` until the
    /// status says the staged move to Enforce completed. A policy the
    /// operator never saw audit (no `status.enforcement`) enforces.
    pub fn audits(&self) -> bool {
        if self.spec.mode == AccessMode::Audit {
            return true;
        }
        self.status
            .as_ref()
            .and_then(|s| s.enforcement.as_ref())
            .is_some_and(|e| e.phase != EnforcementPhase::Enforced)
    }

    /// What an observation window runs for: the target and the rules,
    /// hashed. A change of either starts the window again.
    pub fn rules_revision(&self) -> String {
        super::common::revision_of(&(&self.spec.target_ref, &self.spec.rules))
    }
}

/// An AccessPolicy's status: the compiler's conditions; and, written
/// apart by the audit's own field manager, where a move to Enforce stands
/// and the callers the proxies saw while auditing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Programmed`, as in Gateway API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Whether the proxies audit or enforce, and why; set once the
    /// policy has audited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// The callers the proxies saw while the policy audited, most
    /// requests first (at most 200; the rest are counted in
    /// `observedCallersDropped`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub observed_callers: Vec<ObservedCaller>,
    /// Entries (caller, port, method, path) that did not fit the 200
    /// kept at the list's last update (each caller's busiest is kept
    /// first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_callers_dropped: Option<u64>,
    /// The end of the last stretch of the proxies' counts folded into
    /// `observedCallers` (nothing is counted twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_through: Option<Time>,
}

/// Where an audited policy stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EnforcementPhase {
    /// Mode Audit: every caller admitted, the refusals counted.
    Auditing,
    /// Mode Enforce, still auditing through the observation window.
    Observing,
    /// Mode Enforce, still auditing: callers outside the rules were seen
    /// in the window (named in `unlisted`); the window starts again after
    /// each sighting.
    Blocked,
    /// The rules are enforced.
    Enforced,
}

/// The state of an audited policy's move to Enforce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    pub phase: EnforcementPhase,
    /// When the phase, or the current observation window, began.
    pub since: Time,
    /// The rules the window runs for (a hash of `targetRef` and `rules`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// What the phase is waiting on, with the figures.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The callers outside the rules seen in the latest window
    /// (`namespace/serviceAccount`, `plaintext`, or `other`), at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub unlisted: Vec<String>,
}

/// Requests of one caller the proxies counted while the policy audited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedCaller {
    /// `namespace/serviceAccount` of the caller's verified mesh identity,
    /// `plaintext` for callers without one (no rule can admit those), or
    /// `other` for callers past a proxy's bound on distinct callers.
    pub caller: String,
    /// The port called: the Service's port for a Service target, the
    /// container port for a Namespace target; unset when it could not be
    /// told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The HTTP method; unset for TCP connections and for methods outside
    /// the standard ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// The first segment of the normalised path (`/charges` for
    /// `/charges/7`); unset for TCP connections and for first segments
    /// longer than 64 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Requests (or connections) counted.
    pub requests: u64,
    /// Whether the rules in force when they came admitted them.
    pub admitted: bool,
    pub last_seen: Time,
}

/// What an AccessPolicy guards.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'Namespace' || has(self.name)").message("targetRef.name is required when targetRef.kind is Service"))]
pub struct AccessTarget {
    /// `Service` or `Namespace` (this policy's own namespace).
    pub kind: AccessTargetKind,
    /// The Service's name; omitted for `Namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
}

/// Kinds an AccessPolicy can guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AccessTargetKind {
    Service,
    Namespace,
}

/// One allow rule: callers and what they may reach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// The callers this rule admits.
    #[schemars(length(min = 1, max = 64))]
    pub from: Vec<AccessSource>,
    /// Ports the callers may reach: the Service's ports for a Service target,
    /// the workloads' container ports for a Namespace target. Empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(range(min = 1)), extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<u16>,
    /// HTTP paths the callers may reach. Empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub paths: Vec<PathMatch>,
    /// HTTP methods the callers may use. Empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub methods: Vec<HttpMethod>,
}

/// A caller identity: a ServiceAccount, or every ServiceAccount of a
/// namespace.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.serviceAccount) || has(self.namespace)").message("a source names a serviceAccount, a namespace, or both"))]
pub struct AccessSource {
    /// A ServiceAccount name; with `namespace` unset it is looked up in the
    /// policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account: Option<String>,
    /// A namespace; alone it admits every ServiceAccount of that namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}
