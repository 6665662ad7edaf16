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
