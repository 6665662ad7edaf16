//! `AccessPolicy`: which identities may call a Service (or every workload of
//! a namespace). Allow by default until a policy selects a target; from then
//! on that target admits only what some rule allows.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{HttpMethod, PathMatch, PolicyStatus};

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
    doc = "Which identities (service accounts, namespaces) may call a Service or the workloads of a namespace, on which ports, paths and methods. Everything else is denied once a policy selects a target.",
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "ap",
    category = "weft",
    printcolumn(
        name = "Target Kind",
        type_ = "string",
        json_path = ".spec.targetRef.kind"
    ),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
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
pub struct AccessPolicySpec {
    /// The Service, or the whole namespace, this policy guards.
    pub target_ref: AccessTarget,
    /// Allow rules; a request is admitted when any rule matches. No rules
    /// denies every caller.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub rules: Vec<AccessRule>,
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
