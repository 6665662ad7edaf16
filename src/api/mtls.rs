//! `MTLSPolicy`: whether a namespace's workloads accept plaintext, and how
//! the move to STRICT is rolled out.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Duration;

/// The mutual-TLS mode of every meshed workload in this namespace. One per
/// namespace: when several exist the oldest is used.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MTLSPolicy",
    plural = "mtlspolicies",
    namespaced,
    doc = "The mutual-TLS mode of the meshed workloads in a namespace (PERMISSIVE or STRICT) and how a move to STRICT is rolled out.",
    status = "MTLSPolicyStatus",
    derive = "PartialEq",
    shortname = "mtls",
    category = "weft",
    printcolumn(
        name = "Mode",
        type_ = "string",
        description = "desired mode",
        json_path = ".spec.mode"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "rollout phase",
        json_path = ".status.phase"
    ),
    printcolumn(name = "Since", type_ = "date", json_path = ".status.phaseSince"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MTLSPolicySpec {
    /// `Permissive` accepts mesh mTLS and plaintext; `Strict` accepts only
    /// mesh mTLS (plaintext only on `plaintextPorts` and the probe port).
    pub mode: MtlsMode,
    /// How a move from Permissive to Strict happens.
    #[serde(default)]
    pub rollout: Rollout,
    /// Container ports that keep accepting plaintext under Strict, for
    /// clients outside the mesh (a metrics scraper, a legacy caller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(range(min = 1)), extend("x-kubernetes-list-type" = "set"))]
    pub plaintext_ports: Vec<u16>,
}

/// The desired mutual-TLS mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Accept mesh mTLS and plaintext.
    #[default]
    Permissive,
    /// Accept only mesh mTLS.
    Strict,
}

/// How a move to Strict is carried out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// `Staged` (the default) switches only on evidence: every pod injected
    /// and no plaintext seen for `observationWindow`. `Immediate` switches at
    /// once.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// How long the namespace must see no plaintext on non-excepted ports
    /// before the switch.
    #[serde(default = "default_observation_window")]
    pub observation_window: Duration,
    /// Going back to Permissive when the switch breaks clients.
    #[serde(default)]
    pub auto_rollback: AutoRollback,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            strategy: RolloutStrategy::default(),
            observation_window: default_observation_window(),
            auto_rollback: AutoRollback::default(),
        }
    }
}

fn default_observation_window() -> Duration {
    Duration::from_secs(600)
}

/// How a move to Strict is scheduled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutStrategy {
    /// Switch at once.
    Immediate,
    /// Switch after the evidence gates pass, with automatic rollback.
    #[default]
    Staged,
}

/// When a Strict namespace falls back to Permissive on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoRollback {
    /// Roll back automatically (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Rejected plaintext connections from meshed pods (pods with the weft
    /// sidecar, which the switch to Strict broke) within `window` that
    /// trigger a rollback. Plaintext from anything else (a pod without the
    /// sidecar, an address no pod of the cluster holds) is what Strict
    /// refuses: it is named in the status and never rolls back.
    #[serde(default = "default_rejected_threshold")]
    #[schemars(range(min = 1))]
    pub rejected_connections: u32,
    /// The window over which rejected connections are counted.
    #[serde(default = "default_rollback_window")]
    pub window: Duration,
}

impl Default for AutoRollback {
    fn default() -> Self {
        Self {
            enabled: true,
            rejected_connections: default_rejected_threshold(),
            window: default_rollback_window(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_rejected_threshold() -> u32 {
    10
}
fn default_rollback_window() -> Duration {
    Duration::from_secs(60)
}

/// Where a namespace stands on its way to Strict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutPhase {
    /// Plaintext is accepted.
    Permissive,
    /// Waiting for every pod to carry the sidecar and the current config.
    Preparing,
    /// Counting plaintext connections over the observation window.
    Observing,
    /// Clients were told to expect Strict; the servers flip next.
    Enforcing,
    /// Only mesh mTLS is accepted.
    Strict,
    /// A gate cannot pass without the user's help; see `blockers`.
    Blocked,
    /// Strict broke clients and the namespace went back to Permissive.
    RolledBack,
}

/// Progress of the mTLS rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MTLSPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current rollout phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// When the current phase began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Time>,
    /// What holds the rollout back, by name: pods without the sidecar,
    /// source addresses still speaking plaintext.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<String>,
    /// `Accepted`, `ResolvedRefs`, `Programmed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
