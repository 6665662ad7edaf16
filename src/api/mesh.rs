//! `Mesh`: the cluster-wide settings, one object named `default`.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Duration;

/// Mesh-wide settings: trust domain, certificate lifetimes and proxy defaults.
/// A singleton: only the object named `default` is read.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Mesh",
    doc = "Mesh-wide settings of Weft: trust domain, certificate lifetimes, proxy defaults. A singleton named `default`.",
    status = "MeshStatus",
    derive = "PartialEq",
    shortname = "wmesh",
    category = "weft",
    validation = Rule::new("self.metadata.name == 'default'").message("the Mesh is a singleton: name it `default`"),
    printcolumn(name = "Trust Domain", type_ = "string", json_path = ".spec.trustDomain"),
    printcolumn(name = "Sidecar", type_ = "string", json_path = ".spec.sidecarMode"),
    printcolumn(name = "CA Rotation", type_ = "string", json_path = ".status.ca.rotation.phase"),
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
    /// The mesh CA: when to warn that its root nears expiry, and a
    /// request to rotate the root (a staged change: the new root is
    /// trusted everywhere before any certificate is issued from it, and
    /// the old one is dropped only once nothing presents it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSettings>,
}

/// The mesh CA's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSettings {
    /// The Mesh's `CARootExpiring` condition turns True (a warning) when
    /// the root expires within this long. Default `2160h` (90 days).
    #[serde(default = "default_expiry_warning")]
    pub expiry_warning: Duration,
    /// Rotate the root. Each rotation is named by its `id`; a new id
    /// starts a new rotation once the last one completed or aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<CaRotation>,
}

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            expiry_warning: default_expiry_warning(),
            rotation: None,
        }
    }
}

fn default_expiry_warning() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}

/// A request to rotate the mesh root.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.id != oldSelf.id || (has(self.source) == has(oldSelf.source) && (!has(self.source) || self.source == oldSelf.source))").message("ca.rotation.source is fixed for a rotation: give the rotation a new id to use another source"))]
#[x_kube(validation = Rule::new("duration(self.gateTimeout) >= duration('2m') && duration(self.gateTimeout) <= duration('168h')").message("ca.rotation.gateTimeout must be between 2m and 168h"))]
pub struct CaRotation {
    /// Names the rotation (`2027-q1`, say): a new id starts a new one.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$"))]
    pub id: String,
    /// `Proceed` (default), `Pause` (no phase is left; a rejection still
    /// blocks) or `Abort` (every certificate goes back to the old root,
    /// then the new root leaves the bundles; refused once the old root
    /// is being removed).
    #[serde(default)]
    pub action: RotationAction,
    /// Raise it to release a Blocked rotation once what blocked it is
    /// fixed: the phase it stopped in starts over.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub retry: u32,
    /// How long a phase may wait for every proxy before the rotation is
    /// Blocked, naming those it waits on. Default `30m`; the kubelet
    /// takes about a minute to bring a changed Secret into a pod.
    #[serde(default = "default_gate_timeout")]
    pub gate_timeout: Duration,
    /// Where the new root comes from. Absent: the operator generates
    /// one (kept in Secret `weft-ca-next` until the rotation completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CaSource>,
}

fn default_gate_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

/// What a rotation is asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RotationAction {
    #[default]
    Proceed,
    Pause,
    Abort,
}

/// A CA supplied by the user: a Secret in the control plane's namespace
/// (`weft-system`) holding a CA certificate and its key, as cert-manager
/// writes a CA `Certificate` (`tls.crt`, `tls.key`, `ca.crt`) or as an
/// offline root's intermediate is handed over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSource {
    /// The Secret's name, in the control plane's namespace.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"))]
    pub secret_name: String,
    /// The key of the CA certificate (then any intermediates above it).
    #[serde(default = "default_cert_key")]
    pub cert_key: String,
    /// The key of its private key (PKCS#8 or SEC1 PEM).
    #[serde(default = "default_key_key")]
    pub key_key: String,
    /// The key of the root the certificate chains to, when it is an
    /// intermediate (cert-manager: `ca.crt`). Absent: the certificate is
    /// itself the root every proxy will trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_key: Option<String>,
}

fn default_cert_key() -> String {
    "tls.crt".into()
}
fn default_key_key() -> String {
    "tls.key".into()
}

/// The Mesh's status: the compiler's and the CA's conditions; and,
/// written apart by the rotation's own field manager, where a CA
/// rotation stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `CertificateAuthority`, `CARootExpiring`,
    /// `ObjectsOwned`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The CA rotation, once one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaStatus>,
}

/// The CA as the rotation reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<CaRotationStatus>,
}

/// Where a CA rotation stands. The operator resumes from it after a
/// restart: nothing it decides is held only in memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaRotationStatus {
    /// The rotation's `id`.
    pub id: String,
    /// Where it stands.
    pub phase: CaRotationPhase,
    /// When the phase began (or last started over).
    pub since: Time,
    /// The phase a Blocked rotation stopped in, and resumes on `retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_in: Option<CaRotationPhase>,
    /// The `spec.ca.rotation.retry` last acted on.
    #[serde(default)]
    pub retry: u32,
    /// What the phase waits for, or why it stopped.
    #[serde(default)]
    pub message: String,
    /// Who the gate waits on, or who blocked it (at most 20: proxies as
    /// `namespace/pod`, identity Secrets as `namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub waiting_on: Vec<String>,
    /// The SHA-256 fingerprint (first 8 bytes, hex) of the root being
    /// replaced.
    pub old_root: String,
    /// The fingerprint of the new root; empty while the rotation has not
    /// begun (its new root could not be used yet).
    pub new_root: String,
    /// The new root's certificate (PEM; public): the bundles can hold it,
    /// and a rotation can be reverted, even when its key is lost.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub new_root_certificate: String,
    /// When the new root expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_root_expires: Option<Time>,
    /// The rotation was paused when this status was written: once it
    /// proceeds, the phase starts over (a pause never counts towards
    /// `gateTimeout`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Reverting: since when every identity Secret holds a certificate
    /// from the old root again; the proxies are judged from a while after
    /// (kubelets that bring a Secret late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_back_since: Option<Time>,
    /// Where the new root came from (absent: generated), fixed when the
    /// rotation began; either way the rotation works from its copy in
    /// `weft-ca-next`, never from a Secret the user may change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CaSource>,
}

/// The phases of a CA rotation, in order; every phase but the last two
/// waits on a gate read from the proxies or the identity Secrets.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum CaRotationPhase {
    /// Every trust bundle holds both roots; certificates still come from
    /// the old. Left when every proxy reports the two-root bundle.
    AddingRoot,
    /// Certificates come from the new root. Left when every identity
    /// Secret holds a certificate from it.
    Reissuing,
    /// Left when every proxy presents a certificate from the new root.
    Presenting,
    /// The bundles hold only the new root. Left when every proxy reports
    /// that bundle; the new root then becomes `weft-ca`.
    RemovingOld,
    Complete,
    /// Stopped: a TLS rejection `unknown-ca`, a gate that timed out, or a
    /// new root that cannot be read. Nothing changes until `retry`.
    Blocked,
    /// Aborted after certificates were issued from the new root: they are
    /// issued from the old again, both roots still trusted. Left when
    /// every proxy presents the old root.
    Reverting,
    /// The new root is gone from the bundles.
    Aborted,
}

impl CaRotationPhase {
    /// Whether the rotation is over.
    pub fn ended(self) -> bool {
        matches!(self, Self::Complete | Self::Aborted)
    }
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
            ca: None,
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
