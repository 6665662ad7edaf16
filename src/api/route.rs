//! `ServiceRoute`: ordered rules that send a Service's requests to weighted
//! backend Services — canary splits, header routing. Shaped like Gateway API
//! HTTPRoute in mesh (GAMMA) mode, with one Service as parent.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, HttpMethod, PathMatch, PolicyStatus, ServiceReference};
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
    status = "PolicyStatus",
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
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRouteSpec {
    /// The Service whose callers this route steers, in the route's namespace.
    pub parent_ref: ServiceReference,
    /// Rules, first match wins. A request no rule matches goes to the parent
    /// Service itself.
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<RouteRule>,
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
