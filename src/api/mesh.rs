//! `Mesh`: the cluster-wide settings, one object named `default`.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, PolicyStatus};

/// Mesh-wide settings: trust domain, certificate lifetimes and proxy defaults.
/// A singleton: only the object named `default` is read.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Mesh",
    doc = "Mesh-wide settings of Weft: trust domain, certificate lifetimes, proxy defaults. A singleton named `default`.",
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "wmesh",
    category = "weft",
    validation = Rule::new("self.metadata.name == 'default'").message("the Mesh is a singleton: name it `default`"),
    printcolumn(name = "Trust Domain", type_ = "string", json_path = ".spec.trustDomain"),
    printcolumn(name = "Sidecar", type_ = "string", json_path = ".spec.sidecarMode"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// The trust domain of every workload identity, the host part of
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`. Changing it
    /// re-issues every certificate.
    #[serde(default = "default_trust_domain")]
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"))]
    pub trust_domain: String,
    /// Lifetimes of the certificates the mesh CA issues.
    #[serde(default)]
    pub certificates: CertificateSettings,
    /// Defaults for every injected `weft-proxy` sidecar.
    #[serde(default)]
    pub proxy: ProxyDefaults,
    /// How the sidecar is injected: `Native` (an init container with
    /// `restartPolicy: Always`, Kubernetes 1.29+), `Classic` (a regular
    /// container the app waits for) or `Auto` (native when the API server
    /// and every node's kubelet are 1.29 or newer).
    #[serde(default)]
    pub sidecar_mode: SidecarMode,
    /// How the `weft-init` container (the pod's iptables redirect) runs.
    // Left out when default, so pods injected before the field existed keep
    // their injection hash.
    #[serde(default, skip_serializing_if = "InitSettings::is_default")]
    pub init: InitSettings,
    /// Distributed tracing: every proxy propagates W3C `traceparent`, and
    /// with this set records a span per request it handles and exports
    /// them over OTLP/HTTP to the collector named here. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
    /// What meshed workloads may call beyond the registry. `AllowAll`
    /// (default): a connection to any address goes where it was headed.
    /// `RegistryOnly`: one that no Service or ExternalService names is
    /// refused (403 `egress-denied` for HTTP, the connection closed for
    /// TLS and TCP). A namespace overrides it with the annotation
    /// `weft.dev/egress: AllowAll` or `RegistryOnly`. Either way proxies
    /// count what is (or would be) refused, by destination
    /// (`weft_proxy_outbound_egress_unregistered_total`), so the switch
    /// can be judged before it is made.
    #[serde(default, skip_serializing_if = "EgressMode::is_allow_all")]
    pub egress: EgressMode,
}

/// What a meshed workload may call outside the registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EgressMode {
    #[default]
    AllowAll,
    RegistryOnly,
}

impl EgressMode {
    pub fn is_allow_all(&self) -> bool {
        *self == EgressMode::AllowAll
    }
}

/// Where proxies send their spans, and how many traces they start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TracingSettings {
    /// The collector's OTLP/HTTP endpoint, plain HTTP:
    /// `http://otel-collector.observability:4318` (the path defaults to
    /// `/v1/traces`, the port to 4318).
    #[schemars(regex(pattern = r"^http://[^/?#@\s]+(/[^?#\s]*)?$"), length(max = 512))]
    pub collector: String,
    /// Of the requests that arrive without a sampling decision (no valid
    /// `traceparent`), the percentage whose new trace is recorded, 0 to
    /// 100. A request that carries a decision keeps it.
    #[serde(default = "default_sampling_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sampling_percent: f64,
}

fn default_sampling_percent() -> f64 {
    1.0
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            certificates: CertificateSettings::default(),
            proxy: ProxyDefaults::default(),
            sidecar_mode: SidecarMode::default(),
            init: InitSettings::default(),
            tracing: None,
            egress: EgressMode::AllowAll,
        }
    }
}

/// How `weft-init` runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitSettings {
    /// Run `weft-init` as root (uid 0) instead of uid 65534. By default it
    /// runs unprivileged with NET_ADMIN and NET_RAW in its bounding set, and
    /// iptables gains them from the file capabilities the weft image sets on
    /// the xtables binaries (as Linkerd's proxy-init does). Set this only
    /// where the container runtime or the image store strips file
    /// capabilities: `weft-init` then fails saying so. Only the init
    /// container runs as root; it still holds no capability but the two.
    #[serde(default)]
    pub run_as_root: bool,
}

impl InitSettings {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

pub fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

/// Lifetimes of mesh certificates.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.workloadTtl) >= duration('1h') && duration(self.workloadTtl) <= duration('720h')").message("certificates.workloadTtl must be between 1h and 720h"))]
pub struct CertificateSettings {
    /// Lifetime of a workload (leaf) certificate; it is re-issued at two
    /// thirds of its life. Between `1h` and `720h`.
    #[serde(default = "default_workload_ttl")]
    pub workload_ttl: Duration,
}

impl Default for CertificateSettings {
    fn default() -> Self {
        Self {
            workload_ttl: default_workload_ttl(),
        }
    }
}

fn default_workload_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Defaults for the injected proxy; pods may override some with annotations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyDefaults {
    /// Log level of the proxy.
    #[serde(default)]
    pub log_level: LogLevel,
    /// CPU and memory requests and limits of the proxy container.
    #[serde(default)]
    pub resources: ProxyResources,
    /// How long a stopping proxy lets in-flight requests finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
}

impl Default for ProxyDefaults {
    fn default() -> Self {
        Self {
            log_level: LogLevel::default(),
            resources: ProxyResources::default(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(20)
}

/// Resource requests and limits for the proxy container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyResources {
    /// CPU request, such as `50m`.
    #[serde(default = "default_cpu_request")]
    pub cpu_request: Quantity,
    /// Memory request, such as `32Mi`.
    #[serde(default = "default_memory_request")]
    pub memory_request: Quantity,
    /// CPU limit; unset leaves the proxy unthrottled, which keeps tail latency
    /// low.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<Quantity>,
    /// Memory limit, such as `128Mi`.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: Quantity,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: default_cpu_request(),
            memory_request: default_memory_request(),
            cpu_limit: None,
            memory_limit: default_memory_limit(),
        }
    }
}

fn default_cpu_request() -> Quantity {
    Quantity("50m".into())
}
fn default_memory_request() -> Quantity {
    Quantity("32Mi".into())
}
fn default_memory_limit() -> Quantity {
    Quantity("128Mi".into())
}

/// Proxy log verbosity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

/// How the proxy sidecar is injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SidecarMode {
    /// Native sidecar when the API server and every node's kubelet are 1.29
    /// or newer (kubelets may lag the control plane), else classic.
    #[default]
    Auto,
    /// Always a native sidecar (init container with `restartPolicy: Always`).
    Native,
    /// Always a regular container that the app waits for.
    Classic,
}
