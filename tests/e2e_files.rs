//! The kind tier's files (`e2e/`) stay runnable where they cannot run: the
//! script parses (and passes shellcheck where installed), every workload
//! runs under a ServiceAccount that exists, every Service of the example
//! shop has pods behind it, and the image holds the binaries the injector
//! points at.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use serde::Deserialize;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn shop_and_workloads() -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("examples/shop"))
        .expect("examples/shop")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files.push(root().join("e2e/workloads.yaml"));
    files.iter().flat_map(|f| docs(f)).collect()
}

#[test]
fn the_script_parses() {
    let script = root().join("e2e/run.sh");
    let ok = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .expect("bash");
    assert!(ok.success(), "bash -n e2e/run.sh");
    match Command::new("shellcheck").arg(&script).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck e2e/run.sh:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!("shellcheck not installed: only `bash -n` checked e2e/run.sh"),
    }
}

#[test]
fn every_workload_has_its_service_account_and_every_service_its_pods() {
    let all = shop_and_workloads();
    let accounts: BTreeSet<(String, String)> = all
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|d| {
            (
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                d["metadata"]["name"].as_str().expect("name").to_owned(),
            )
        })
        .collect();
    let deployments: Vec<Deployment> = all
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| serde_json::from_value(d.clone()).expect("a valid Deployment"))
        .collect();
    assert!(!deployments.is_empty());
    for d in &deployments {
        let ns = d.metadata.namespace.clone().expect("namespace");
        let spec = d.spec.template.spec.as_ref().expect("pod spec");
        if let Some(sa) = &spec.service_account_name {
            assert!(
                accounts.contains(&(ns.clone(), sa.clone())),
                "Deployment {ns}/{:?} runs as {sa}, which neither examples/shop nor e2e/workloads.yaml creates",
                d.metadata.name
            );
        }
        for c in &spec.containers {
            assert_eq!(c.image.as_deref(), Some("weft:e2e"));
            assert_eq!(c.command.as_ref().expect("command")[0], "/weft-demo");
        }
    }
    for svc in all.iter().filter(|d| d["kind"] == "Service") {
        let ns = svc["metadata"]["namespace"].as_str().expect("namespace");
        let selector = svc["spec"]["selector"].as_object().expect("selector");
        let served = deployments.iter().any(|d| {
            let labels = d
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            d.metadata.namespace.as_deref() == Some(ns)
                && selector
                    .iter()
                    .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        });
        assert!(
            served,
            "Service {ns}/{} has no Deployment in e2e/workloads.yaml",
            svc["metadata"]["name"]
        );
    }
}

#[test]
fn the_image_holds_what_the_injector_runs() {
    let dockerfile = std::fs::read_to_string(root().join("e2e/Dockerfile")).expect("Dockerfile");
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("a COPY of the built binaries");
    for bin in ["weft", "weft-proxy", "weft-demo"] {
        assert!(
            copy.contains(&format!("/target/release/{bin} ")),
            "{bin} is copied into the image"
        );
    }
    assert!(
        copy.trim_end().ends_with(" /"),
        "binaries land in / (the injector runs /weft and /weft-proxy)"
    );
}
