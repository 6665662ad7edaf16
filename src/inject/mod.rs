//! Sidecar injection: a pure function from a pod (plus its namespace, the
//! Mesh defaults and what the cluster supports) to a decision, an RFC 6902
//! JSON Patch and admission warnings. The webhook (`webhook`) is a thin
//! HTTPS shell around it; `certs` keeps its serving certificate.
//!
//! What an injected pod gets:
//!
//! - `weft-init`, an init container: `weft init` installs the iptables
//!   redirect (flags below), as a non-root user with NET_ADMIN and NET_RAW
//!   only. With a native sidecar it runs first; with a classic one it runs
//!   last, after the app's own init containers, since the proxy starts only
//!   once they are done and their traffic would otherwise be redirected to
//!   a port nothing listens on;
//! - `weft-proxy`: a native sidecar (an init container with
//!   `restartPolicy: Always` right after `weft-init`, with a startup probe)
//!   when the cluster runs Kubernetes 1.29 or newer, otherwise the first
//!   regular container with a `postStart` hook that holds the app's start
//!   until the proxy is ready;
//! - the proxy's config (ConfigMap `weft-proxy-config`) and identity (the
//!   Secret `weft-identity-<sa>` of the pod's own ServiceAccount, which holds
//!   no other account's key) as volumes, plus an API token for the proxy's
//!   config watch (the ServiceAccount admission plugin ran before webhooks,
//!   so the containers we add would otherwise have none);
//! - HTTP probes of the app rewritten to the proxy's probe port as
//!   `/probe/<port>/<path>`, the path in the proxy's canonical form (what
//!   the kubelet then sends byte for byte), their paths handed to the proxy
//!   as health paths and each `<port>/<path>` as a probe target
//!   (`WEFT_PROBE_TARGETS`), the only requests the probe port forwards; TCP
//!   probes rewritten to HTTP probes of `/probe-tcp/<port>` on the probe
//!   port (target `tcp:<port>`), which the proxy answers by connecting to
//!   the app's port, so the kubelet's connections are never counted as
//!   plaintext traffic nor refused under STRICT. gRPC probes, and probes
//!   with a `host` (the kubelet sends those to that host, not to the pod),
//!   are left as they are, with a warning;
//! - `weft.dev/injected-version` and `weft.dev/injection-hash` annotations.
//!
//! A pod that already has `weft-proxy` gets an empty patch, so injecting
//! twice is injecting once.
//!
//! The image holds `/weft` (every subcommand) and `/weft-proxy` (the
//! sidecar alone); the containers name their binary, so the image's
//! entrypoint does not matter.
//!
//! ## `weft init` flags (the contract with the init container)
//!
//! `--proxy-uid`, `--proxy-gid`, `--inbound-port`, `--outbound-port`,
//! `--skip-inbound-ports P,...`, `--skip-outbound-ports P,...`,
//! `--skip-outbound-cidrs CIDR,...`. The injector passes no `--ipv6`: its
//! default, `auto`, redirects IPv6 when the pod has an IPv6 address, which
//! only the pod itself can see (the CNI plugin assigns addresses after
//! admission, before the first init container starts).

pub mod certs;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::{INJECT_ANNOTATION, INJECT_ENABLED, INJECT_LABEL, MeshSpec, SidecarMode};
use crate::compile::SERVER_FIRST_PORTS;
use crate::proxy::admin::{ProbeCheck, ProbeTarget};
use crate::proxy::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROBE_PORT, PROXY_UID};

/// Names of what the injector adds.
pub const PROXY_CONTAINER: &str = "weft-proxy";
pub const INIT_CONTAINER: &str = "weft-init";
const CONFIG_VOLUME: &str = "weft-config";
const IDENTITY_VOLUME: &str = "weft-identity";
const TOKEN_VOLUME: &str = "weft-token";
const CONFIG_DIR: &str = "/var/run/weft/config";
const IDENTITY_DIR: &str = "/var/run/weft/identity";
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The pod's labels in the token volume, from the downward API.
const POD_LABELS_FILE: &str = "pod-labels";

/// Pod annotations the injector reads.
pub mod annotations {
    pub const SKIP_INBOUND_PORTS: &str = "weft.dev/skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "weft.dev/skip-outbound-ports";
    pub const SKIP_OUTBOUND_CIDRS: &str = "weft.dev/skip-outbound-cidrs";
    pub const OPAQUE_PORTS: &str = "weft.dev/opaque-ports";
    pub const PROXY_CPU_REQUEST: &str = "weft.dev/proxy-cpu-request";
    pub const PROXY_MEMORY_REQUEST: &str = "weft.dev/proxy-memory-request";
    pub const PROXY_CPU_LIMIT: &str = "weft.dev/proxy-cpu-limit";
    pub const PROXY_MEMORY_LIMIT: &str = "weft.dev/proxy-memory-limit";
    /// `json` or `off`: the proxy's access logs (on the pod, else on its
    /// namespace; off by default).
    pub const ACCESS_LOG: &str = "weft.dev/access-log";
    /// `keep` or `drop` (the default): whether access-log paths keep the
    /// query (on the pod, else on its namespace).
    pub const ACCESS_LOG_QUERY: &str = "weft.dev/access-log-query";
    /// Set by the injector: the weft version that injected the pod.
    pub const INJECTED_VERSION: &str = "weft.dev/injected-version";
    /// Set by the injector: a hash of everything the injection depended on.
    pub const INJECTION_HASH: &str = "weft.dev/injection-hash";
}

/// The uid `weft-init` runs as: not root, not the proxy.
const INIT_UID: i64 = 65534;

/// The namespace a pod is created in, as the injector sees it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// A namespace labelled `weft.dev/inject=enabled`.
    pub fn meshed(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            labels: [(INJECT_LABEL.to_owned(), INJECT_ENABLED.to_owned())].into(),
            annotations: BTreeMap::new(),
        }
    }
}

/// What the cluster supports.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClusterCaps {
    /// Native sidecars work here: the API server and (as the control plane
    /// checks) every node's kubelet are 1.29 or newer.
    pub native_sidecars: bool,
}

impl ClusterCaps {
    /// From the API server's `major`/`minor` version strings (`"1"`, `"29+"`).
    pub fn from_version(major: &str, minor: &str) -> Self {
        let num = |s: &str| {
            s.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse::<u32>()
                .unwrap_or(0)
        };
        let (major, minor) = (num(major), num(minor));
        Self {
            native_sidecars: major > 1 || (major == 1 && minor >= 29),
        }
    }
}

/// Everything an injection depends on besides the pod.
#[derive(Clone, Debug, Serialize)]
pub struct InjectSettings {
    /// The image of `weft-init` and `weft-proxy` (the weft binary).
    pub image: String,
    pub mesh: MeshSpec,
    pub caps: ClusterCaps,
}

impl InjectSettings {
    /// The built-in Mesh defaults, `image` for both containers.
    pub fn new(image: &str, caps: ClusterCaps) -> Self {
        Self {
            image: image.to_owned(),
            mesh: MeshSpec::default(),
            caps,
        }
    }
}

/// Whether the pod was injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Injected,
    Skipped(String),
}

/// The injector's answer: the decision, the patch (empty when skipped) and
/// warnings for whoever creates the pod.
#[derive(Clone, Debug)]
pub struct Injection {
    pub decision: Decision,
    pub patch: Patch,
    pub warnings: Vec<String>,
}

impl Injection {
    fn skip(reason: impl Into<String>) -> Self {
        Self {
            decision: Decision::Skipped(reason.into()),
            patch: Patch(Vec::new()),
            warnings: Vec::new(),
        }
    }
}

/// Decides and builds the patch for `pod` created in `ns`.
pub fn inject(pod: &Pod, ns: &NamespaceInfo, settings: &InjectSettings) -> Injection {
    let meta_annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(spec) = &pod.spec else {
        return Injection::skip("the pod has no spec");
    };
    if meta_annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("disabled") {
        return Injection::skip(format!(
            "opted out: annotation {INJECT_ANNOTATION}=disabled"
        ));
    }
    if ns.labels.get(INJECT_LABEL).map(String::as_str) != Some(INJECT_ENABLED) {
        return Injection::skip(format!(
            "namespace {} is not labelled {INJECT_LABEL}={INJECT_ENABLED}",
            ns.name
        ));
    }
    if spec.host_network == Some(true) {
        return Injection::skip(
            "hostNetwork: the pod shares the node's network, which a sidecar must not redirect",
        );
    }
    let has_proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    if has_proxy {
        return Injection::skip(format!("already injected: {PROXY_CONTAINER} is present"));
    }
    // Names the patch adds, taken already: the API server would refuse the
    // patched pod as a duplicate, and the pod would not be created at all.
    // Created as it is instead, unmeshed, and the creator told why.
    let ours = [CONFIG_VOLUME, IDENTITY_VOLUME, TOKEN_VOLUME];
    let taken = (spec.volumes.iter().flatten())
        .find(|v| ours.contains(&v.name.as_str()))
        .map(|v| format!("volume {}", v.name))
        .or_else(|| {
            (spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten()))
            .find(|c| c.name == INIT_CONTAINER)
            .map(|c| format!("container {}", c.name))
        });
    if let Some(taken) = taken {
        let why = format!(
            "not injected: the pod already has a {taken}, a name the weft sidecar needs; rename it for the pod to join the mesh"
        );
        let mut skipped = Injection::skip(why.clone());
        skipped.warnings.push(why);
        return skipped;
    }

    let mut warnings = Vec::new();
    let ports = |key: &str, warnings: &mut Vec<String>| {
        parse_ports(meta_annotations.get(key), key, warnings)
    };
    let skip_inbound = ports(annotations::SKIP_INBOUND_PORTS, &mut warnings);
    let skip_outbound = ports(annotations::SKIP_OUTBOUND_PORTS, &mut warnings);
    let opaque = ports(annotations::OPAQUE_PORTS, &mut warnings);
    let skip_cidrs = parse_cidrs(
        meta_annotations.get(annotations::SKIP_OUTBOUND_CIDRS),
        &mut warnings,
    );
    let access_log = access_log_env(&meta_annotations, ns, &mut warnings);
    let native = match settings.mesh.sidecar_mode {
        SidecarMode::Native => true,
        SidecarMode::Classic => false,
        SidecarMode::Auto => settings.caps.native_sidecars,
    };
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());

    warn_about_app(pod, &opaque, native, &mut warnings);

    // Probes: rewritten to the probe port; HTTP paths become health paths
    // and, with their ports, the probe targets the proxy serves. The app's
    // own native sidecars (init containers that keep running) are probed
    // for as long as the pod runs, through the same redirect: theirs too.
    // (These replace ops come before the inserts below, so the indexes are
    // the pod's own.)
    let mut ops = Vec::new();
    let mut health_paths = BTreeSet::new();
    let mut probe_targets = BTreeSet::new();
    let sidecars = spec.init_containers.iter().flatten().enumerate();
    let probed = (spec.containers.iter().enumerate())
        .map(|(i, c)| (format!("/spec/containers/{i}"), c))
        .chain(
            sidecars
                .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
                .map(|(i, c)| (format!("/spec/initContainers/{i}"), c)),
        );
    for (at, c) in probed {
        for (field, probe) in [
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
            ("startupProbe", &c.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            match rewrite_probe(probe, c) {
                Ok(Some((rewritten, target))) => {
                    if let ProbeCheck::Http { path } = &target.check {
                        health_paths.insert(path.clone());
                    }
                    probe_targets.insert(target.to_string());
                    ops.push(replace(&format!("{at}/{field}"), to_value(&rewritten)));
                }
                Ok(None) => {}
                Err(why) => warnings.push(format!("container {}: {field}: {why}", c.name)),
            }
        }
    }

    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let port_names: Vec<String> = (spec.containers.iter().chain(sidecars))
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some(format!("{}={}", p.name.as_deref()?, p.container_port)))
        .collect();
    let proxy = proxy_container(&mut ProxyInputs {
        settings,
        annotations: &meta_annotations,
        workload: workload_name(pod, &service_account),
        health_paths: health_paths.into_iter().collect(),
        probe_targets: probe_targets.into_iter().collect(),
        port_names,
        opaque: &opaque,
        access_log,
        native,
        warnings: &mut warnings,
    });
    let init = init_container(settings, &skip_inbound, &skip_outbound, &skip_cidrs);

    // Containers, native: weft-init first, then weft-proxy (a native
    // sidecar starts before the init containers after it), then the app's
    // own init containers. Classic: weft-proxy first of the regular
    // containers, which start only once every init container is done, so
    // weft-init goes last: the app's init containers (migrations,
    // wait-for-db) run before the redirect, not into a port nothing
    // listens on yet.
    match &spec.init_containers {
        Some(existing) if !existing.is_empty() => {
            if native {
                ops.push(add("/spec/initContainers/0", to_value(&init)));
                ops.push(add("/spec/initContainers/1", to_value(&proxy)));
            } else {
                ops.push(add("/spec/initContainers/-", to_value(&init)));
                warnings.push(format!(
                    "classic sidecar: the app's init containers ({}) run before {INIT_CONTAINER} and the proxy, so their traffic bypasses the mesh (plaintext, no identity) and a STRICT destination refuses it; on Kubernetes 1.29+ the native sidecar mode meshes it",
                    existing
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        _ => {
            let mut list = vec![init];
            if native {
                list.push(proxy.clone());
            }
            ops.push(add("/spec/initContainers", to_value(&list)));
        }
    }
    if !native {
        ops.push(add("/spec/containers/0", to_value(&proxy)));
    }

    // The ServiceAccount admission plugin mounted the API token into the
    // containers it saw, before webhooks run: the proxy gets its own.
    let volumes = vec![
        config_volume(),
        identity_volume(&service_account),
        token_volume(),
    ];
    match &spec.volumes {
        Some(existing) if !existing.is_empty() => {
            for v in volumes {
                ops.push(add("/spec/volumes/-", to_value(&v)));
            }
        }
        _ => ops.push(add("/spec/volumes", to_value(&volumes))),
    }

    let mut new_annotations = BTreeMap::new();
    new_annotations.insert(
        annotations::INJECTED_VERSION.to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    );
    new_annotations.insert(
        annotations::INJECTION_HASH.to_owned(),
        input_hash(pod, ns, settings),
    );
    if pod.metadata.annotations.is_none() {
        ops.push(add("/metadata/annotations", to_value(&new_annotations)));
    } else {
        for (k, v) in new_annotations {
            let path = format!("/metadata/annotations/{}", escape(&k));
            ops.push(add(&path, Value::String(v)));
        }
    }

    Injection {
        decision: Decision::Injected,
        patch: Patch(ops),
        warnings,
    }
}

/// Everything the proxy container is made from.
struct ProxyInputs<'a> {
    settings: &'a InjectSettings,
    annotations: &'a BTreeMap<String, String>,
    workload: String,
    health_paths: Vec<String>,
    /// `<port>/<path>` of every rewritten HTTP probe, the path canonical as
    /// the kubelet sends it (no query), and `tcp:<port>` of every rewritten
    /// TCP probe: what the proxy's probe port serves.
    probe_targets: Vec<String>,
    port_names: Vec<String>,
    opaque: &'a [u16],
    /// `WEFT_ACCESS_LOG` and `WEFT_ACCESS_LOG_QUERY`, when not the default.
    access_log: Vec<(&'static str, &'static str)>,
    native: bool,
    warnings: &'a mut Vec<String>,
}

fn proxy_container(p: &mut ProxyInputs<'_>) -> Container {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let from_field = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(field(path)),
        ..Default::default()
    };
    let value = |name: &str, v: String| EnvVar {
        name: name.to_owned(),
        value: Some(v),
        ..Default::default()
    };
    let mut env = vec![
        from_field("WEFT_POD_NAME", "metadata.name"),
        from_field("WEFT_NAMESPACE", "metadata.namespace"),
        from_field("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        from_field("WEFT_POD_IP", "status.podIP"),
        // Zone-aware routing: the pod's zone label, which the API server
        // copies from its Node at binding (Kubernetes 1.35+, KEP-4742;
        // "" where it does not), and its node, whose zone the proxy
        // otherwise learns from published endpoints on the same node.
        from_field(
            "WEFT_ZONE",
            "metadata.labels['topology.kubernetes.io/zone']",
        ),
        from_field("WEFT_NODE", "spec.nodeName"),
        value("WEFT_WORKLOAD", p.workload.clone()),
        value("WEFT_TRUST_DOMAIN", p.settings.mesh.trust_domain.clone()),
        value("WEFT_CONFIG", format!("{CONFIG_DIR}/config.json")),
        value("WEFT_IDENTITY_DIR", IDENTITY_DIR.to_owned()),
        value(
            "WEFT_POD_LABELS_FILE",
            format!("{TOKEN_DIR}/{POD_LABELS_FILE}"),
        ),
        value(
            "WEFT_LOG",
            serde_json::to_value(p.settings.mesh.proxy.log_level)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "info".to_owned()),
        ),
    ];
    if !p.health_paths.is_empty() {
        env.push(value("WEFT_HEALTH_PATHS", p.health_paths.join(",")));
    }
    if !p.probe_targets.is_empty() {
        env.push(value("WEFT_PROBE_TARGETS", p.probe_targets.join(",")));
    }
    if !p.port_names.is_empty() {
        env.push(value("WEFT_PORT_NAMES", p.port_names.join(",")));
    }
    if !p.opaque.is_empty() {
        env.push(value("WEFT_INBOUND_OPAQUE_PORTS", join(p.opaque)));
    }
    for (name, v) in &p.access_log {
        env.push(value(name, (*v).to_owned()));
    }
    let http = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::Int(i32::from(ADMIN_PORT)),
        ..Default::default()
    };
    let mounts = vec![
        VolumeMount {
            name: CONFIG_VOLUME.to_owned(),
            mount_path: CONFIG_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: IDENTITY_VOLUME.to_owned(),
            mount_path: IDENTITY_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: TOKEN_VOLUME.to_owned(),
            mount_path: TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    let proxy_uid = i64::from(PROXY_UID);
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(p.settings.image.clone()),
        // The sidecar binary: the proxy alone, fewer code pages resident.
        command: Some(vec!["/weft-proxy".to_owned()]),
        args: Some(vec![
            "--drain-timeout".to_owned(),
            p.settings.mesh.proxy.drain_timeout.to_string(),
        ]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("weft-admin".to_owned()),
                container_port: i32::from(ADMIN_PORT),
                ..Default::default()
            },
            ContainerPort {
                name: Some("weft-probe".to_owned()),
                container_port: i32::from(PROBE_PORT),
                ..Default::default()
            },
        ]),
        resources: Some(resources(p.settings, p.annotations, p.warnings)),
        readiness_probe: Some(Probe {
            http_get: Some(http("/ready")),
            period_seconds: Some(5),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http("/live")),
            period_seconds: Some(10),
            ..Default::default()
        }),
        startup_probe: p.native.then(|| Probe {
            http_get: Some(http("/ready")),
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..Default::default()
        }),
        // Classic: the kubelet runs postStart to completion before it
        // starts the next container, so the app waits for the proxy.
        lifecycle: (!p.native).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/weft".to_owned(),
                        "wait-ready".to_owned(),
                        "--timeout".to_owned(),
                        "120s".to_owned(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        restart_policy: p.native.then(|| "Always".to_owned()),
        security_context: Some(SecurityContext {
            run_as_user: Some(proxy_uid),
            run_as_group: Some(proxy_uid),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

fn init_container(
    settings: &InjectSettings,
    skip_inbound: &[u16],
    skip_outbound: &[u16],
    skip_cidrs: &[String],
) -> Container {
    let uid = PROXY_UID.to_string();
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        uid.clone(),
        "--proxy-gid".to_owned(),
        uid,
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--outbound-port".to_owned(),
        OUTBOUND_PORT.to_string(),
    ];
    // The proxy's own admin and probe ports are never redirected.
    let mut inbound: Vec<u16> = vec![ADMIN_PORT, PROBE_PORT];
    inbound.extend(skip_inbound);
    inbound.sort_unstable();
    inbound.dedup();
    args.extend(["--skip-inbound-ports".to_owned(), join(&inbound)]);
    if !skip_outbound.is_empty() {
        args.extend(["--skip-outbound-ports".to_owned(), join(skip_outbound)]);
    }
    if !skip_cidrs.is_empty() {
        args.extend(["--skip-outbound-cidrs".to_owned(), skip_cidrs.join(",")]);
    }
    let quantity = |s: &str| Quantity(s.to_owned());
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(settings.image.clone()),
        command: Some(vec!["/weft".to_owned()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_owned(), quantity("10m")),
                    ("memory".to_owned(), quantity("10Mi")),
                ]
                .into(),
            ),
            limits: Some([("memory".to_owned(), quantity("50Mi"))].into()),
            ..Default::default()
        }),
        security_context: Some(init_security_context(settings.mesh.init.run_as_root)),
        ..Default::default()
    }
}

/// weft-init's security context. A runtime gives a non-root container the
/// added capabilities in its bounding set only, so by default iptables
/// gains them from the file capabilities the image sets on the xtables
/// binaries, which the kernel honours only when privilege escalation
/// (`no_new_privs` unset) is allowed. The Mesh's `init.runAsRoot` is for
/// runtimes that strip file capabilities: root gets the two capabilities
/// from the runtime directly and needs no escalation.
fn init_security_context(run_as_root: bool) -> SecurityContext {
    let uid = if run_as_root { 0 } else { INIT_UID };
    SecurityContext {
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        run_as_non_root: Some(!run_as_root),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(!run_as_root),
        capabilities: Some(Capabilities {
            add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
            drop: Some(vec!["ALL".to_owned()]),
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

/// The runtime's default seccomp filter: Pod Security `baseline` and
/// `restricted` require it (or Localhost) on every container, and the proxy
/// and iptables need no syscall it blocks.
fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// The namespace's `weft-proxy-config` and `weft-endpoints` in one
/// directory (`config.json`, `endpoints.json`, or their `.gz` forms): the
/// proxy's bootstrap and its fallback while the API server is away.
fn config_volume() -> Volume {
    let source = |name: &str| VolumeProjection {
        config_map: Some(k8s_openapi::api::core::v1::ConfigMapProjection {
            name: name.to_owned(),
            // The operator creates them once the namespace is labelled;
            // until then the proxy starts, reports not ready, and watches
            // for the config (without endpoints it uses ClusterIPs).
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    Volume {
        name: CONFIG_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                source(crate::config::CONFIG_MAP_NAME),
                source(crate::config::ENDPOINTS_CONFIG_MAP_NAME),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's own ServiceAccount's identity Secret: no other account's key
/// is in it ([`crate::identity::identity_secret_name`]).
fn identity_volume(service_account: &str) -> Volume {
    Volume {
        name: IDENTITY_VOLUME.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(crate::identity::identity_secret_name(service_account)),
            // The kubelet writes these files as root:root (no fsGroup is set,
            // and setting one would re-own the app's volumes too), so the
            // proxy (uid/gid 1450) reads them only through the "other" bits.
            // Only the proxy container mounts this volume.
            default_mode: Some(0o444),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A service-account token for the proxy's config watch.
fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".to_owned(),
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".to_owned(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".to_owned(),
                            path: "ca.crt".to_owned(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![
                            DownwardAPIVolumeFile {
                                path: "namespace".to_owned(),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.namespace".to_owned(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                            // Kept current by the kubelet: which Services
                            // select this pod, for their AccessPolicies.
                            DownwardAPIVolumeFile {
                                path: POD_LABELS_FILE.to_owned(),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.labels".to_owned(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                        ]),
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Requests and limits: the Mesh defaults, each overridable by annotation.
fn resources(
    settings: &InjectSettings,
    annotations: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> ResourceRequirements {
    let r = &settings.mesh.proxy.resources;
    let mut pick = |key: &str, default: Option<&Quantity>| -> Option<Quantity> {
        match annotations.get(key) {
            Some(v) if is_quantity(v) => Some(Quantity(v.clone())),
            Some(v) => {
                warnings.push(format!(
                    "annotation {key}: {v:?} is not a quantity (such as 100m or 64Mi); using the Mesh default"
                ));
                default.cloned()
            }
            None => default.cloned(),
        }
    };
    let requests: BTreeMap<String, Quantity> = [
        (
            "cpu",
            pick(annotations::PROXY_CPU_REQUEST, Some(&r.cpu_request)),
        ),
        (
            "memory",
            pick(annotations::PROXY_MEMORY_REQUEST, Some(&r.memory_request)),
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
    .collect();
    let limits: BTreeMap<String, Quantity> = [
        (
            "cpu",
            pick(annotations::PROXY_CPU_LIMIT, r.cpu_limit.as_ref()),
        ),
        (
            "memory",
            pick(annotations::PROXY_MEMORY_LIMIT, Some(&r.memory_limit)),
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
    .collect();
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..Default::default()
    }
}

/// A Kubernetes quantity: a number with an optional suffix.
fn is_quantity(s: &str) -> bool {
    static RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei|[eE][0-9]+)?$")
            .unwrap_or_else(|e| unreachable!("a valid regex: {e}"))
    });
    RE.is_match(s)
}

/// The probe rewritten to the proxy's probe port and what the proxy is to
/// serve for it (`WEFT_PROBE_TARGETS`, in the proxy's own form; an HTTP
/// target's path is also a health path); `None` for probes left as they
/// are without a word (`exec`). HTTP probes become `/probe/<port>/<path>`;
/// TCP probes become HTTP probes of `/probe-tcp/<port>`, every other field
/// (timings, thresholds) kept. gRPC probes are left as they are, with a
/// warning: the proxy does not speak gRPC health; so are probes with a
/// `host`, which the kubelet sends to that host rather than to the pod.
fn rewrite_probe(probe: &Probe, c: &Container) -> Result<Option<(Probe, ProbeTarget)>, String> {
    if let Some(grpc) = &probe.grpc {
        return Err(format!(
            "a gRPC probe (port {port}) is left as it is: it bypasses the weft proxy, so it counts as plaintext traffic and fails under STRICT mTLS unless port {port} is in the namespace's MTLSPolicy plaintextPorts",
            port = grpc.port
        ));
    }
    // Rewritten, the kubelet would ask that host's port 15121 instead.
    let host = match (&probe.tcp_socket, &probe.http_get) {
        (Some(tcp), _) => tcp.host.as_deref().map(|h| ("a TCP", h)),
        (None, Some(get)) => get.host.as_deref().map(|h| ("an HTTP", h)),
        (None, None) => None,
    };
    if let Some((kind, host)) = host.filter(|(_, h)| !h.is_empty()) {
        return Err(format!(
            "{kind} probe of host {host:?} is left as it is: the kubelet sends it to that host, not to this pod, so it does not go through this pod's weft proxy"
        ));
    }
    // `get`'s other fields (headers, scheme) kept.
    let to_probe_port =
        |get: HTTPGetAction, target: &ProbeTarget, query: Option<&str>| HTTPGetAction {
            path: Some(match query {
                Some(q) => format!("{}?{q}", target.request_path()),
                None => target.request_path(),
            }),
            port: IntOrString::Int(i32::from(PROBE_PORT)),
            ..get
        };
    if let Some(tcp) = &probe.tcp_socket {
        let target = ProbeTarget::tcp(probe_port(&tcp.port, c)?);
        let rewritten = Probe {
            tcp_socket: None,
            http_get: Some(to_probe_port(HTTPGetAction::default(), &target, None)),
            ..probe.clone()
        };
        return Ok(Some((rewritten, target)));
    }
    let Some(get) = &probe.http_get else {
        return Ok(None);
    };
    if get
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
    {
        return Err("an HTTPS probe is left as it is; under STRICT mTLS it fails unless its port is a plaintext exception".to_owned());
    }
    let port = probe_port(&get.port, c)?;
    let original = get.path.as_deref().unwrap_or("/");
    if original.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!(
            "path {original:?} holds a control character; the probe is left as it is"
        ));
    }
    // As the kubelet's Go net/url reads it: a fragment is never sent, the
    // query is sent as written.
    let sent = original.split('#').next().unwrap_or_default();
    let (path, query) = match sent.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (sent, None),
    };
    // The canonical form keeps a comma as it is, and the proxy is told its
    // probe targets comma-delimited.
    if path.contains(',') {
        return Err(format!(
            "path {path:?} holds a comma, which the proxy's comma-delimited list of probe targets cannot carry; the probe is left as it is"
        ));
    }
    let target = ProbeTarget::http(port, &format!("/{}", path.trim_start_matches('/')));
    let rewritten = Probe {
        http_get: Some(to_probe_port(get.clone(), &target, query)),
        ..probe.clone()
    };
    Ok(Some((rewritten, target)))
}

/// A probe's port, a name resolved against the container's own ports.
fn probe_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    let port = match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .ok_or_else(|| {
                format!("port {name:?} is not a port of the container; the probe is left as it is")
            })?,
    };
    // The proxy refuses to start on a target outside 1-65535.
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "port {port} is not in 1-65535; the probe is left as it is"
        )),
    }
}

/// The access-log settings the pod asks for, its own annotations before
/// its namespace's: only what differs from the proxy's defaults (off, the
/// query dropped), so pods that ask nothing keep their injection. A value
/// the proxy does not know (case aside) is a warning naming the choices,
/// and the next word down decides: the namespace's, else the default.
fn access_log_env(
    pod: &BTreeMap<String, String>,
    ns: &NamespaceInfo,
    warnings: &mut Vec<String>,
) -> Vec<(&'static str, &'static str)> {
    let mut env = Vec::new();
    for (key, var, on, choices) in [
        (
            annotations::ACCESS_LOG,
            "WEFT_ACCESS_LOG",
            "json",
            ["json", "off"],
        ),
        (
            annotations::ACCESS_LOG_QUERY,
            "WEFT_ACCESS_LOG_QUERY",
            "keep",
            ["keep", "drop"],
        ),
    ] {
        let said = [
            (pod.get(key), "the pod's".to_owned()),
            (ns.annotations.get(key), format!("namespace {}'s", ns.name)),
        ];
        let chosen = said.into_iter().find_map(|(value, whose)| {
            let value = value?.trim().to_ascii_lowercase();
            if choices.contains(&value.as_str()) {
                return Some(value);
            }
            warnings.push(format!(
                "{whose} annotation {key}: {value:?} is not one of {}; ignored (the default is {})",
                choices.join(", "),
                choices[1]
            ));
            None
        });
        if chosen.as_deref() == Some(on) {
            env.push((var, on));
        }
    }
    env
}

fn warn_about_app(pod: &Pod, opaque: &[u16], native: bool, warnings: &mut Vec<String>) {
    let Some(spec) = &pod.spec else { return };
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let proxy_ports = [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, PROBE_PORT];
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let uid = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid);
        if uid == Some(i64::from(PROXY_UID)) {
            warnings.push(format!(
                "container {} runs as uid {PROXY_UID}, the proxy's uid: its traffic bypasses the proxy (no mTLS, no policy); run it as another user",
                c.name
            ));
        }
        for p in c.ports.iter().flatten() {
            let Ok(port) = u16::try_from(p.container_port) else {
                continue;
            };
            if proxy_ports.contains(&port) {
                warnings.push(format!(
                    "container {} listens on port {port}, which the weft proxy uses; move the app to another port",
                    c.name
                ));
            }
            if SERVER_FIRST_PORTS.contains(&port) && !opaque.contains(&port) {
                warnings.push(format!(
                    "container {} port {port} usually speaks first (a database or mail protocol): add it to the {} annotation of the pod and its Service so the proxy never waits for the client",
                    c.name,
                    annotations::OPAQUE_PORTS
                ));
            }
        }
    }
    let owned_by_job = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job");
    if owned_by_job && !native {
        warnings.push(
            "a Job's pod with a classic sidecar: the proxy keeps running after the job's work ends, so the pod never completes; on Kubernetes 1.29+ use the native sidecar mode, or have the job POST http://127.0.0.1:15120/shutdown when done"
                .to_owned(),
        );
    }
}

/// The workload's name for metrics: the app label, else the ServiceAccount.
/// (The operator's pod cache keeps it, computed the same way, for the
/// canary's evidence: see `operator::world::prune_pod`.)
pub(crate) fn workload_name(pod: &Pod, service_account: &str) -> String {
    let labels = pod.metadata.labels.as_ref();
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| labels.and_then(|l| l.get(*k)).cloned())
        .unwrap_or_else(|| service_account.to_owned())
}

fn parse_ports(value: Option<&String>, key: &str, warnings: &mut Vec<String>) -> Vec<u16> {
    let mut out = Vec::new();
    for item in value.into_iter().flat_map(|v| v.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        match item.parse::<u16>() {
            Ok(p) if p > 0 => out.push(p),
            _ => warnings.push(format!(
                "annotation {key}: {item:?} is not a port number (1-65535); ignored"
            )),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn parse_cidrs(value: Option<&String>, warnings: &mut Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for item in value.into_iter().flat_map(|v| v.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if crate::init::is_cidr(item) {
            out.push(item.to_owned());
        } else {
            warnings.push(format!(
                "annotation {}: {item:?} is not a CIDR such as 10.0.0.0/8; ignored",
                annotations::SKIP_OUTBOUND_CIDRS
            ));
        }
    }
    out
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A hash of everything the injection depended on, so a changed input can
/// be told from an unchanged one.
fn input_hash(pod: &Pod, ns: &NamespaceInfo, settings: &InjectSettings) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&pod.spec).unwrap_or_default());
    h.update(serde_json::to_vec(&pod.metadata.annotations).unwrap_or_default());
    h.update(serde_json::to_vec(ns).unwrap_or_default());
    h.update(serde_json::to_vec(settings).unwrap_or_default());
    h.update(env!("CARGO_PKG_VERSION"));
    hex::encode(&h.finalize()[..8])
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| unreachable!("k8s types serialize: {e}"))
}

/// A JSON Pointer token (RFC 6901): `~` and `/` escaped.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn pointer(path: &str) -> PointerBuf {
    PointerBuf::parse(path).unwrap_or_else(|e| unreachable!("{path} is a JSON pointer: {e}"))
}

fn add(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(path),
        value,
    })
}

fn replace(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(path),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_from_1_29() {
        let cases = [
            ("1", "28", false),
            ("1", "29", true),
            ("1", "30+", true),
            ("2", "0", true),
            ("1", "", false),
        ];
        for (major, minor, native) in cases {
            assert_eq!(
                ClusterCaps::from_version(major, minor).native_sidecars,
                native,
                "{major}.{minor}"
            );
        }
    }

    #[test]
    fn probes_are_rewritten_to_the_canonical_path_the_proxy_registers() {
        let probe = |path: &str| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::Int(8080),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Container::default();
        // The pod spec's path; the rewritten probe's, which the kubelet's
        // Go net/url sends byte for byte (Go itself would send
        // `/health%20check`, `/sant%C3%A9` and `/a%28b%29%20c` for the
        // first three as written); the probe target.
        for (path, rewritten_path, registered) in [
            (
                "/health check",
                "/probe/8080/health%20check",
                "8080/health%20check",
            ),
            ("/sant\u{e9}", "/probe/8080/sant%C3%A9", "8080/sant%C3%A9"),
            ("/a(b) c", "/probe/8080/a(b)%20c", "8080/a(b)%20c"),
            ("/ready?full=1", "/probe/8080/ready?full=1", "8080/ready"),
            (
                "/ready?full=1#top",
                "/probe/8080/ready?full=1",
                "8080/ready",
            ),
            (
                "/caf%c3%a9?q=\u{e9}",
                "/probe/8080/caf%C3%A9?q=\u{e9}",
                "8080/caf%C3%A9",
            ),
            ("/a#b", "/probe/8080/a", "8080/a"),
            ("/a%2Fb", "/probe/8080/a%2Fb", "8080/a%2Fb"),
            ("healthz", "/probe/8080/healthz", "8080/healthz"),
            ("/", "/probe/8080/", "8080/"),
        ] {
            let (rewritten, target) = rewrite_probe(&probe(path), &c)
                .expect("rewritten")
                .expect("an HTTP probe");
            assert_eq!(target.to_string(), registered, "{path:?}");
            let get = rewritten.http_get.expect("httpGet");
            assert_eq!(get.path.as_deref(), Some(rewritten_path), "{path:?}");
            assert_eq!(get.port, IntOrString::Int(i32::from(PROBE_PORT)));
            // The proxy reads the same target from the flag and from the
            // kubelet's request.
            assert_eq!(
                crate::proxy::admin::parse_probe_target(registered),
                Ok(target.clone()),
                "{path:?}"
            );
            assert!(rewritten_path.starts_with(&target.request_path()));
        }
        for bad in ["/a,b", "/a\nb", "/ok?x=\u{7}"] {
            let err = rewrite_probe(&probe(bad), &c).expect_err(bad);
            assert!(err.contains("left as it is"), "{bad}: {err}");
        }
    }

    /// Injects a pod of `containers` in a meshed namespace: the answer, and
    /// the pod with its patch applied.
    fn inject_containers(containers: Vec<Container>) -> (Injection, Pod) {
        let pod = Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers,
                ..Default::default()
            }),
            ..Default::default()
        };
        let got = inject(
            &pod,
            &NamespaceInfo::meshed("shop"),
            &InjectSettings::new("weft:test", ClusterCaps::from_version("1", "30")),
        );
        let mut value = serde_json::to_value(&pod).expect("json");
        json_patch::patch(&mut value, &got.patch).expect("the patch applies");
        (got, serde_json::from_value(value).expect("a pod"))
    }

    #[test]
    fn a_pod_holding_a_name_the_sidecar_needs_is_left_alone_with_a_warning() {
        use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, PodSpec, Volume};
        let app = Container {
            name: "app".into(),
            ..Default::default()
        };
        let with_volume = Pod {
            spec: Some(PodSpec {
                containers: vec![app.clone()],
                volumes: Some(vec![Volume {
                    name: CONFIG_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let with_container = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    app,
                    Container {
                        name: INIT_CONTAINER.into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        for (pod, name) in [
            (with_volume, "volume weft-config"),
            (with_container, "container weft-init"),
        ] {
            let got = inject(
                &pod,
                &NamespaceInfo::meshed("shop"),
                &InjectSettings::new("weft:test", ClusterCaps::from_version("1", "30")),
            );
            assert!(
                matches!(&got.decision, Decision::Skipped(why) if why.contains(name)),
                "{:?}",
                got.decision
            );
            assert!(got.patch.0.is_empty());
            assert!(
                got.warnings.iter().any(|w| w.contains(name)),
                "{:?}",
                got.warnings
            );
        }
    }

    #[test]
    fn probes_of_another_host_are_left_as_they_are_with_a_warning_naming_the_container() {
        use k8s_openapi::api::core::v1::TCPSocketAction;
        let http = |host: Option<&str>| Probe {
            http_get: Some(HTTPGetAction {
                host: host.map(str::to_owned),
                path: Some("/healthz".into()),
                port: IntOrString::Int(8080),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        };
        let search = Container {
            name: "search".into(),
            liveness_probe: Some(http(Some("10.0.0.9"))),
            readiness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(5432),
                    host: Some("db.shop".into()),
                }),
                ..Default::default()
            }),
            // An empty host is the pod's own IP: rewritten as usual.
            startup_probe: Some(http(Some(""))),
            ..Default::default()
        };
        let (got, injected) = inject_containers(vec![search.clone()]);
        assert_eq!(got.decision, Decision::Injected);
        let host_warnings: Vec<&str> = got
            .warnings
            .iter()
            .map(String::as_str)
            .filter(|w| w.contains("host"))
            .collect();
        assert_eq!(
            host_warnings,
            [
                "container search: livenessProbe: an HTTP probe of host \"10.0.0.9\" is left as it is: the kubelet sends it to that host, not to this pod, so it does not go through this pod's weft proxy",
                "container search: readinessProbe: a TCP probe of host \"db.shop\" is left as it is: the kubelet sends it to that host, not to this pod, so it does not go through this pod's weft proxy",
            ]
        );
        let spec = injected.spec.expect("spec");
        let app = &spec.containers[0];
        assert_eq!(
            app.liveness_probe, search.liveness_probe,
            "exactly as written"
        );
        assert_eq!(
            app.readiness_probe, search.readiness_probe,
            "exactly as written"
        );
        let startup = app.startup_probe.clone().and_then(|p| p.http_get);
        assert_eq!(
            startup.and_then(|g| g.path).as_deref(),
            Some("/probe/8080/healthz")
        );
        let proxy = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == PROXY_CONTAINER)
            .expect("the proxy");
        let targets: Vec<&str> = proxy
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == "WEFT_PROBE_TARGETS")
            .filter_map(|e| e.value.as_deref())
            .collect();
        assert_eq!(targets, ["8080/healthz"], "only the pod's own probe");
    }

    fn redis() -> Container {
        Container {
            name: "redis".into(),
            ports: Some(vec![ContainerPort {
                name: Some("redis".into()),
                container_port: 6379,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn tcp_probes_become_http_probes_of_the_probe_port_with_their_timings_kept() {
        use k8s_openapi::api::core::v1::TCPSocketAction;
        let tcp = |port: IntOrString| Probe {
            tcp_socket: Some(TCPSocketAction { port, host: None }),
            initial_delay_seconds: Some(5),
            period_seconds: Some(7),
            timeout_seconds: Some(3),
            success_threshold: Some(1),
            failure_threshold: Some(9),
            termination_grace_period_seconds: Some(42),
            ..Default::default()
        };
        let c = redis();
        for port in [IntOrString::String("redis".into()), IntOrString::Int(6379)] {
            let original = tcp(port.clone());
            let (rewritten, target) = rewrite_probe(&original, &c)
                .expect("rewritten")
                .expect("a TCP probe");
            assert_eq!(target, ProbeTarget::tcp(6379), "{port:?}");
            assert_eq!(target.to_string(), "tcp:6379");
            assert_eq!(
                rewritten,
                Probe {
                    tcp_socket: None,
                    http_get: Some(HTTPGetAction {
                        path: Some("/probe-tcp/6379".into()),
                        port: IntOrString::Int(i32::from(PROBE_PORT)),
                        ..Default::default()
                    }),
                    ..original
                },
                "{port:?}: every timing field kept"
            );
        }
        // The injector's target is one the proxy parses, as the same target.
        assert_eq!(
            crate::proxy::admin::parse_probe_target("tcp:6379"),
            Ok(crate::proxy::admin::ProbeTarget::tcp(6379))
        );
        let err = rewrite_probe(&tcp(IntOrString::String("db".into())), &c).expect_err("unknown");
        assert!(
            err.contains("\"db\" is not a port of the container") && err.contains("left as it is"),
            "{err}"
        );
        for bad in [0, 70000] {
            let err = rewrite_probe(&tcp(IntOrString::Int(bad)), &c).expect_err("out of range");
            assert!(err.contains("not in 1-65535"), "{err}");
        }
    }

    #[test]
    fn grpc_probes_are_left_as_they_are_with_a_warning_naming_the_container() {
        use k8s_openapi::api::core::v1::GRPCAction;
        let mut c = redis();
        c.name = "ledger".into();
        c.readiness_probe = Some(Probe {
            grpc: Some(GRPCAction {
                port: 50051,
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        });
        let (got, _) = inject_containers(vec![c]);
        assert_eq!(got.decision, Decision::Injected);
        let warning = got
            .warnings
            .iter()
            .find(|w| w.contains("gRPC"))
            .expect("a gRPC warning");
        assert_eq!(
            warning,
            "container ledger: readinessProbe: a gRPC probe (port 50051) is left as it is: it bypasses the weft proxy, so it counts as plaintext traffic and fails under STRICT mTLS unless port 50051 is in the namespace's MTLSPolicy plaintextPorts"
        );
        let field = serde_json::to_value(crate::api::MTLSPolicySpec {
            mode: Default::default(),
            rollout: Default::default(),
            plaintext_ports: vec![1],
        })
        .expect("json");
        assert!(field.get("plaintextPorts").is_some(), "the field named");
        let patch = serde_json::to_string(&got.patch).expect("json");
        assert!(
            !patch.contains("/spec/containers/0/readinessProbe")
                && !patch.contains("WEFT_PROBE_TARGETS"),
            "the probe is left as it is: {patch}"
        );
    }

    /// The security context of `container` (in either list) after
    /// injecting a one-container pod with `settings`, as JSON.
    fn injected_security_context(settings: &InjectSettings, container: &str) -> Value {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "orders-0" },
            "spec": { "containers": [{ "name": "orders", "image": "shop/orders" }] }
        }))
        .expect("a pod");
        let mut value = serde_json::to_value(&pod).expect("json");
        let got = inject(&pod, &NamespaceInfo::meshed("shop"), settings);
        json_patch::patch(&mut value, &got.patch).expect("the patch applies");
        let injected: Pod = serde_json::from_value(value).expect("a pod");
        let spec = injected.spec.expect("spec");
        let found = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == container)
            .expect("the injected container");
        serde_json::to_value(found.security_context.as_ref().expect("context")).expect("json")
    }

    #[test]
    fn weft_init_runs_unprivileged_with_file_capabilities_or_as_root_when_the_mesh_says() {
        let init_context = |run_as_root: bool| {
            let mut settings = InjectSettings::new(
                "weft:test",
                ClusterCaps {
                    native_sidecars: true,
                },
            );
            settings.mesh.init.run_as_root = run_as_root;
            injected_security_context(&settings, INIT_CONTAINER)
        };
        let caps = serde_json::json!({ "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] });
        // Default: uid 65534; the kernel honours the xtables binaries' file
        // capabilities only without no_new_privs.
        let default = init_context(false);
        assert_eq!(default["runAsUser"], 65534);
        assert_eq!(default["runAsNonRoot"], true);
        assert_eq!(default["allowPrivilegeEscalation"], true);
        assert_eq!(default["capabilities"], caps);
        let root = init_context(true);
        assert_eq!(root["runAsUser"], 0);
        assert_eq!(root["runAsNonRoot"], false);
        assert_eq!(root["allowPrivilegeEscalation"], false);
        assert_eq!(root["capabilities"], caps, "still only the two");
        for context in [&default, &root] {
            assert_eq!(
                context["seccompProfile"],
                serde_json::json!({ "type": "RuntimeDefault" }),
                "a restricted namespace admits weft-init: {context}"
            );
        }
    }

    #[test]
    fn the_injected_proxy_fits_pod_security_restricted() {
        for native_sidecars in [true, false] {
            let settings = InjectSettings::new("weft:test", ClusterCaps { native_sidecars });
            let context = injected_security_context(&settings, PROXY_CONTAINER);
            assert_eq!(context["allowPrivilegeEscalation"], false, "{context}");
            assert_eq!(context["runAsNonRoot"], true, "{context}");
            assert_eq!(
                context["capabilities"],
                serde_json::json!({ "drop": ["ALL"] }),
                "{context}"
            );
            assert_eq!(
                context["seccompProfile"],
                serde_json::json!({ "type": "RuntimeDefault" }),
                "{context}"
            );
        }
    }

    #[test]
    fn classic_puts_weft_init_after_the_apps_init_containers_and_native_before() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "orders-0" },
            "spec": {
                "initContainers": [
                    { "name": "migrate", "image": "shop/migrate" },
                    { "name": "wait-for-db", "image": "busybox" }
                ],
                "containers": [{ "name": "orders", "image": "shop/orders" }]
            }
        }))
        .expect("a pod");
        let inits = |native: bool| {
            let mut value = serde_json::to_value(&pod).expect("json");
            let got = inject(
                &pod,
                &NamespaceInfo::meshed("shop"),
                &InjectSettings::new(
                    "weft:test",
                    ClusterCaps {
                        native_sidecars: native,
                    },
                ),
            );
            json_patch::patch(&mut value, &got.patch).expect("the patch applies");
            let injected: Pod = serde_json::from_value(value).expect("a pod");
            let spec = injected.spec.expect("spec");
            (
                spec.init_containers
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| c.name)
                    .collect::<Vec<_>>(),
                spec.containers[0].name.clone(),
                got.warnings,
            )
        };
        let (classic, first, warnings) = inits(false);
        assert_eq!(classic, ["migrate", "wait-for-db", "weft-init"]);
        assert_eq!(first, "weft-proxy");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("(migrate, wait-for-db) run before weft-init")),
            "{warnings:?}"
        );
        let (native, first, warnings) = inits(true);
        assert_eq!(
            native,
            ["weft-init", "weft-proxy", "migrate", "wait-for-db"]
        );
        assert_eq!(first, "orders");
        assert!(
            !warnings.iter().any(|w| w.contains("run before weft-init")),
            "{warnings:?}"
        );
    }

    #[test]
    fn quantities_and_annotation_lists_are_checked() {
        assert!(
            is_quantity("100m")
                && is_quantity("64Mi")
                && is_quantity("1.5")
                && !is_quantity("lots")
        );
        let mut w = Vec::new();
        let ports = parse_ports(Some(&"8080, 9090,x,0".to_owned()), "k", &mut w);
        assert_eq!(ports, vec![8080, 9090]);
        assert_eq!(w.len(), 2, "{w:?}");
        let cidrs = parse_cidrs(
            Some(&"10.0.0.0/8,fd00::/8,10.0.0.1,1.2.3.4/40".to_owned()),
            &mut w,
        );
        assert_eq!(cidrs, vec!["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(w.len(), 4, "{w:?}");
    }

    /// Access logs: the pod's annotation before its namespace's, only
    /// what differs from the proxy's defaults reaches its env, and a value
    /// the proxy does not know is a warning that names the choices.
    #[test]
    fn access_logs_follow_the_pods_annotation_then_its_namespaces() {
        let proxy_env = |pod: &[(&str, &str)], ns: &[(&str, &str)]| {
            let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect()
            };
            let pod = Pod {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    annotations: Some(map(pod)),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::core::v1::PodSpec {
                    containers: vec![Container {
                        name: "app".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut namespace = NamespaceInfo::meshed("shop");
            namespace.annotations = map(ns);
            let got = inject(
                &pod,
                &namespace,
                &InjectSettings::new("weft:test", ClusterCaps::from_version("1", "30")),
            );
            let mut value = serde_json::to_value(&pod).expect("json");
            json_patch::patch(&mut value, &got.patch).expect("the patch applies");
            let pod: Pod = serde_json::from_value(value).expect("a pod");
            let proxy = pod
                .spec
                .expect("spec")
                .init_containers
                .into_iter()
                .flatten()
                .find(|c| c.name == PROXY_CONTAINER)
                .expect("native sidecar");
            let env: Vec<(String, String)> = proxy
                .env
                .into_iter()
                .flatten()
                .filter(|e| e.name.starts_with("WEFT_ACCESS_LOG"))
                .map(|e| (e.name, e.value.unwrap_or_default()))
                .collect();
            (env, got.warnings)
        };
        let on = ("WEFT_ACCESS_LOG".to_owned(), "json".to_owned());
        let keep = ("WEFT_ACCESS_LOG_QUERY".to_owned(), "keep".to_owned());
        assert_eq!(proxy_env(&[], &[]), (vec![], vec![]), "off by default");
        assert_eq!(
            proxy_env(&[], &[("weft.dev/access-log", "json")]),
            (vec![on.clone()], vec![])
        );
        assert_eq!(
            proxy_env(
                &[("weft.dev/access-log", "off")],
                &[
                    ("weft.dev/access-log", "json"),
                    ("weft.dev/access-log-query", "keep")
                ]
            ),
            (vec![keep.clone()], vec![]),
            "the pod's word wins, key by key"
        );
        assert_eq!(
            proxy_env(
                &[
                    ("weft.dev/access-log", "json"),
                    ("weft.dev/access-log-query", "keep")
                ],
                &[]
            ),
            (vec![on.clone(), keep], vec![])
        );
        let (env, warnings) = proxy_env(&[("weft.dev/access-log", "apache")], &[]);
        assert!(env.is_empty());
        assert_eq!(
            warnings,
            vec![
                "the pod's annotation weft.dev/access-log: \"apache\" is not one of json, off; ignored (the default is off)"
            ]
        );
        // A word the proxy does not know falls to the namespace's.
        let (env, warnings) = proxy_env(
            &[("weft.dev/access-log", "yes")],
            &[("weft.dev/access-log", "JSON")],
        );
        assert_eq!(env, vec![on]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }
}
