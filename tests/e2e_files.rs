//! The end-to-end tier's files (`e2e/`) stay runnable where they cannot run:
//! the script parses and passes shellcheck; it checks its settings and its
//! tools before it touches a cluster, and says what is wrong (exit 2, never
//! a pass); every workload runs under a ServiceAccount that exists, every
//! Service of the example shop has pods behind it; every pod the suite
//! starts, injected by the real injector with the Mesh of `e2e/values.yaml`,
//! requests at most 10m CPU (one node with 2 CPUs holds the suite); no
//! address is written into the suite; and the image holds the binaries the
//! injector points at.
//!
//! The script runs here only up to its checks of settings and tools, with
//! an empty `PATH` (so no kubectl, helm, kind or docker is found, whatever
//! this machine has): nothing in that part calls a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};
use weft::api::MeshSpec;
use weft::inject::{ClusterCaps, Decision, InjectSettings, NamespaceInfo, inject};

/// What the suite lets any pod or container it starts request.
const CPU_LIMIT_MILLIS: f64 = 10.0;

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

fn shop() -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("examples/shop"))
        .expect("examples/shop")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files.iter().flat_map(|f| docs(f)).collect()
}

fn workloads() -> Vec<Value> {
    docs(&root().join("e2e/workloads.yaml"))
}

fn shop_and_workloads() -> Vec<Value> {
    let mut all = shop();
    all.extend(workloads());
    all
}

/// Every pod template of e2e/workloads.yaml (Deployments and Jobs), with
/// its namespace and name.
fn pod_templates() -> Vec<(String, String, Value)> {
    workloads()
        .into_iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "Job")
        .map(|d| {
            (
                d["metadata"]["namespace"]
                    .as_str()
                    .expect("namespace")
                    .to_owned(),
                d["metadata"]["name"].as_str().expect("name").to_owned(),
                d["spec"]["template"].clone(),
            )
        })
        .collect()
}

/// Helm's merge of a values file over the chart's: maps key by key, any
/// other value replaced.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// charts/weft/values.yaml with e2e/values.yaml over it.
fn e2e_values() -> Value {
    let mut values = docs(&root().join("charts/weft/values.yaml")).remove(0);
    let over = docs(&root().join("e2e/values.yaml")).remove(0);
    merge(&mut values, &over);
    values
}

/// CPU millicores of a Kubernetes quantity (`10m`, `0.01`, `1`).
fn millicores(q: &str) -> f64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().unwrap_or_else(|e| panic!("cpu {q:?}: {e}")),
        None => {
            q.parse::<f64>()
                .unwrap_or_else(|e| panic!("cpu {q:?}: {e}"))
                * 1000.0
        }
    }
}

fn cpu_request(container: &Value) -> f64 {
    container["resources"]["requests"]["cpu"]
        .as_str()
        .map(millicores)
        .unwrap_or(0.0)
}

/// A pod's CPU request as the scheduler counts it with native sidecars: an
/// init container runs next to the sidecars started before it, the app's
/// containers next to every sidecar.
fn pod_cpu_request(spec: &Value) -> f64 {
    let none = Vec::new();
    let inits = spec["initContainers"].as_array().unwrap_or(&none);
    let (mut sidecars, mut peak) = (0.0_f64, 0.0_f64);
    for c in inits {
        peak = peak.max(sidecars + cpu_request(c));
        if c["restartPolicy"] == "Always" {
            sidecars += cpu_request(c);
        }
    }
    let apps: f64 = spec["containers"]
        .as_array()
        .unwrap_or(&none)
        .iter()
        .map(cpu_request)
        .sum();
    peak.max(apps + sidecars)
}

fn bash() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/bin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("bash"))
        .find(|p| p.is_file())
        .expect("bash")
}

/// e2e/run.sh with only these variables and an empty PATH.
fn run_script(vars: &[(&str, &str)]) -> Output {
    let empty = tempfile::tempdir().expect("a temporary directory");
    let mut cmd = Command::new(bash());
    cmd.arg(root().join("e2e/run.sh"))
        .env_clear()
        .env("PATH", empty.path());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("bash e2e/run.sh")
}

/// The script did not run, said why on stderr, and passed nothing.
fn assert_not_run(out: &Output, mentions: &[&str]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit 2 (not run)\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("e2e: NOT RUN: "),
        "says it did not run: {stderr}"
    );
    for m in mentions {
        assert!(stderr.contains(m), "names {m:?}: {stderr}");
    }
    assert!(
        !stdout.contains("e2e: ok") && !stdout.contains(" passed, "),
        "never a pass: {stdout}"
    );
}

#[test]
fn the_script_parses_and_passes_shellcheck() {
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
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "shellcheck is not installed ({e}), and under CI=true it must check e2e/run.sh: \
             .ci/run installs it (apt-get install shellcheck)"
        ),
        Err(_) => eprintln!("shellcheck not installed: only `bash -n` checked e2e/run.sh"),
    }
}

#[test]
fn a_kubeconfig_that_is_not_there_is_named() {
    let out = run_script(&[
        ("WEFT_E2E_KUBECONFIG", "/nonexistent/weft-e2e/kubeconfig"),
        ("WEFT_E2E_IMAGE", "ghcr.io/weft-mesh/weft:0.1.0"),
    ]);
    assert_not_run(
        &out,
        &["WEFT_E2E_KUBECONFIG=/nonexistent/weft-e2e/kubeconfig"],
    );
}

#[test]
fn a_load_command_without_its_archive_names_the_fix() {
    let out = run_script(&[
        ("WEFT_E2E_CONTEXT", "somewhere"),
        ("WEFT_E2E_LOAD", "sudo ctr -n k8s.io images import"),
    ]);
    assert_not_run(
        &out,
        &[
            "WEFT_E2E_LOAD has no {archive}",
            "WEFT_E2E_LOAD='sudo ctr -n k8s.io images import {archive}'",
        ],
    );
}

#[test]
fn settings_that_cannot_work_are_refused_before_anything_runs() {
    let image = ("WEFT_E2E_IMAGE", "ghcr.io/weft-mesh/weft:0.1.0");
    let context = ("WEFT_E2E_CONTEXT", "somewhere");
    let cases: [(&[(&str, &str)], &str); 7] = [
        (
            &[context, image, ("WEFT_E2E_LOAD", "true {archive}")],
            "not both",
        ),
        (&[context], "an existing cluster needs the image"),
        (
            &[context, ("WEFT_E2E_IMAGE", "ghcr.io/weft-mesh/weft:latest")],
            "a tag other than latest",
        ),
        (
            &[context, ("WEFT_E2E_IMAGE", "ghcr.io/weft-mesh/weft")],
            "REPOSITORY:TAG",
        ),
        (&[image], "are for an existing cluster"),
        (
            &[context, image, ("WEFT_E2E_KEEP", "yes")],
            "WEFT_E2E_KEEP=yes",
        ),
        (
            &[context, image, ("WEFT_E2E_CLUSTER", "other")],
            "unset WEFT_E2E_CLUSTER",
        ),
    ];
    for (vars, says) in cases {
        assert_not_run(&run_script(vars), &[says]);
    }
}

#[test]
fn missing_tools_are_named_and_nothing_passes() {
    // kind: docker and kind too.
    let out = run_script(&[]);
    assert_not_run(
        &out,
        &[
            "missing", "docker", "kind", "kubectl", "helm", "python3", "make",
        ],
    );
    // An existing cluster with its image on the nodes: no docker, no kind.
    let out = run_script(&[
        ("WEFT_E2E_CONTEXT", "somewhere"),
        ("WEFT_E2E_IMAGE", "ghcr.io/weft-mesh/weft:0.1.0"),
    ]);
    assert_not_run(&out, &["missing kubectl helm python3 timeout ("]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("docker") && !stderr.contains("kind"),
        "{stderr}"
    );
    // Loading the archive: make, and the load command's own program.
    let out = run_script(&[
        ("WEFT_E2E_CONTEXT", "somewhere"),
        ("WEFT_E2E_LOAD", "LANG=C weft-e2e-no-such-loader {archive}"),
    ]);
    assert_not_run(&out, &["make", "weft-e2e-no-such-loader"]);
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
    let templates = pod_templates();
    assert!(!templates.is_empty());
    for (ns, name, template) in &templates {
        let pod: Pod = serde_json::from_value(json!({ "spec": template["spec"] }))
            .unwrap_or_else(|e| panic!("{ns}/{name}: not a pod template: {e}"));
        let spec = pod.spec.expect("pod spec");
        if let Some(sa) = &spec.service_account_name {
            assert!(
                accounts.contains(&(ns.clone(), sa.clone())),
                "{ns}/{name} runs as {sa}, which neither examples/shop nor e2e/workloads.yaml creates"
            );
        }
        for c in &spec.containers {
            assert_eq!(c.command.as_ref().expect("command")[0], "/weft-demo");
        }
    }
    for svc in all.iter().filter(|d| d["kind"] == "Service") {
        let ns = svc["metadata"]["namespace"].as_str().expect("namespace");
        let selector = svc["spec"]["selector"].as_object().expect("selector");
        let served = workloads()
            .iter()
            .filter(|d| d["kind"] == "Deployment" && d["metadata"]["namespace"] == ns)
            .any(|d| {
                let labels = &d["spec"]["template"]["metadata"]["labels"];
                selector.iter().all(|(k, v)| &labels[k] == v)
            });
        assert!(
            served,
            "Service {ns}/{} has no Deployment in e2e/workloads.yaml",
            svc["metadata"]["name"]
        );
    }
}

#[test]
fn the_workloads_run_the_image_under_test_from_the_nodes() {
    for (ns, name, template) in pod_templates() {
        for c in template["spec"]["containers"]
            .as_array()
            .expect("containers")
        {
            assert_eq!(
                c["image"], "@WEFT_IMAGE@",
                "{ns}/{name}: run.sh puts the image under test in place of @WEFT_IMAGE@"
            );
            assert_eq!(
                c["imagePullPolicy"], "Never",
                "{ns}/{name}: the image is on the nodes, never pulled"
            );
        }
    }
    let script = std::fs::read_to_string(root().join("e2e/run.sh")).expect("run.sh");
    assert!(
        script.contains(r#"sed "s|@WEFT_IMAGE@|$IMAGE|g" e2e/workloads.yaml"#),
        "run.sh fills in the image"
    );
    assert_eq!(e2e_values()["image"]["pullPolicy"], "Never");
}

#[test]
fn every_pod_the_suite_starts_requests_at_most_10m_cpu() {
    let values = e2e_values();
    let control_plane = values["controlPlane"]["resources"]["requests"]["cpu"]
        .as_str()
        .map(millicores)
        .expect("controlPlane.resources.requests.cpu");
    assert!(
        control_plane <= CPU_LIMIT_MILLIS,
        "the control plane requests {control_plane}m"
    );
    let mesh: MeshSpec =
        serde_json::from_value(values["mesh"]["spec"].clone()).expect("the chart's Mesh spec");
    let meshed: BTreeMap<String, NamespaceInfo> = shop()
        .iter()
        .chain(workloads().iter())
        .filter(|d| d["kind"] == "Namespace")
        .filter(|d| d["metadata"]["labels"]["weft.dev/inject"] == "enabled")
        .map(|d| {
            let name = d["metadata"]["name"].as_str().expect("name");
            (name.to_owned(), NamespaceInfo::meshed(name))
        })
        .collect();
    assert!(meshed.contains_key("shop") && meshed.contains_key("payments"));
    for native in [true, false] {
        let settings = InjectSettings {
            mesh: mesh.clone(),
            ..InjectSettings::new(
                "ghcr.io/weft-mesh/weft:0.1.0",
                ClusterCaps {
                    native_sidecars: native,
                },
            )
        };
        for (ns, name, template) in pod_templates() {
            let mut value = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": name, "namespace": ns, "labels": template["metadata"]["labels"] },
                "spec": template["spec"],
            });
            if let Some(info) = meshed.get(&ns) {
                let pod: Pod = serde_json::from_value(value.clone()).expect("a Pod");
                let injection = inject(&pod, info, &settings);
                assert_eq!(injection.decision, Decision::Injected, "{ns}/{name}");
                json_patch::patch(&mut value, &injection.patch)
                    .unwrap_or_else(|e| panic!("{ns}/{name}: {e}"));
            }
            let spec = &value["spec"];
            let none = Vec::new();
            for c in spec["initContainers"]
                .as_array()
                .unwrap_or(&none)
                .iter()
                .chain(spec["containers"].as_array().unwrap_or(&none))
            {
                assert!(
                    c["resources"]["requests"]["cpu"].is_string(),
                    "{ns}/{name}: container {} states its CPU request",
                    c["name"]
                );
                assert!(
                    cpu_request(c) <= CPU_LIMIT_MILLIS,
                    "{ns}/{name} (native sidecars: {native}): container {} requests {}m",
                    c["name"],
                    cpu_request(c)
                );
            }
            let total = pod_cpu_request(spec);
            assert!(
                total <= CPU_LIMIT_MILLIS,
                "{ns}/{name} (native sidecars: {native}): the pod requests {total}m"
            );
        }
    }
}

#[test]
fn no_address_is_written_into_the_suite() {
    let ipv4 = regex::Regex::new(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b").expect("regex");
    for file in [
        "e2e/run.sh",
        "e2e/workloads.yaml",
        "e2e/values.yaml",
        "e2e/kind.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect(file);
        for m in ipv4.find_iter(&text) {
            assert!(
                ["127.0.0.1", "0.0.0.0"].contains(&m.as_str()),
                "{file} holds the address {}: Services, pods and nodes are found by name",
                m.as_str()
            );
        }
        assert!(!text.contains("clusterIP:"), "{file} sets a clusterIP");
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
            copy.contains(&format!("/{bin} ")),
            "{bin} is copied into the image: {copy}"
        );
    }
    assert!(
        copy.trim_end().ends_with(" /"),
        "binaries land in / (the injector runs /weft and /weft-proxy)"
    );
}
