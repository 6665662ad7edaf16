//! Golden files of the sidecar injector: each `tests/golden/inject/<case>.pod.yaml`
//! is injected and the decision, warnings and JSON Patch compared with
//! `<case>.golden.json`. Every patch is applied to its pod: the result must
//! be a valid Pod, and injecting it again must change nothing.
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test --test inject_golden`,
//! then review the diff of the golden files.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use weft::inject::{ClusterCaps, Decision, InjectSettings, NamespaceInfo, inject};

/// Case name, and whether the cluster has native sidecars.
const CASES: [(&str, bool); 14] = [
    ("plain", true),
    ("own-init", true),
    ("classic", false),
    ("classic-own-init", false),
    ("opt-out", true),
    ("host-network", true),
    ("already-injected", true),
    ("probes", true),
    ("skip-ports", true),
    ("custom-sa", true),
    ("job-classic", false),
    ("warnings", true),
    ("native-sidecar-probes", true),
    ("native-sidecar-probes-classic", false),
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

fn shop() -> NamespaceInfo {
    NamespaceInfo::meshed("shop")
}

fn settings(native: bool) -> InjectSettings {
    InjectSettings::new(
        "weft:test",
        ClusterCaps {
            native_sidecars: native,
        },
    )
}

fn load(case: &str) -> (Value, Pod) {
    let path = dir().join(format!("{case}.pod.yaml"));
    let text = std::fs::read_to_string(&path).expect("pod yaml");
    let value: Value = serde_norway::from_str(&text).expect("yaml");
    let pod: Pod = serde_json::from_value(value.clone()).expect("a Pod");
    (value, pod)
}

#[test]
fn injection_matches_the_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for (case, native) in CASES {
        let (_, pod) = load(case);
        let got = inject(&pod, &shop(), &settings(native));
        let decision = match &got.decision {
            Decision::Injected => "inject".to_owned(),
            Decision::Skipped(why) => format!("skip: {why}"),
        };
        let actual = json!({
            "decision": decision,
            "warnings": got.warnings,
            "patch": serde_json::to_value(&got.patch).expect("patch json"),
        });
        let path = dir().join(format!("{case}.golden.json"));
        let text = serde_json::to_string_pretty(&actual).expect("json") + "\n";
        if update {
            std::fs::write(&path, &text).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == text => {}
            Ok(expected) => mismatches.push(format!(
                "{case}: differs from {}\n--- expected\n{expected}\n--- actual\n{text}",
                path.display()
            )),
            Err(e) => mismatches.push(format!("{case}: {}: {e}", path.display())),
        }
    }
    assert!(
        mismatches.is_empty(),
        "{}\n(after an intended change: UPDATE_GOLDEN=1 cargo test --test inject_golden)",
        mismatches.join("\n")
    );
}

#[test]
fn every_patch_yields_a_valid_pod_and_injecting_twice_is_injecting_once() {
    for (case, native) in CASES {
        let (mut value, pod) = load(case);
        let settings = settings(native);
        let first = inject(&pod, &shop(), &settings);
        json_patch::patch(&mut value, &first.patch).unwrap_or_else(|e| panic!("{case}: {e}"));
        let injected: Pod = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{case}: not a Pod: {e}"));
        let second = inject(&injected, &shop(), &settings);
        assert!(
            second.patch.0.is_empty(),
            "{case}: a second injection changes nothing"
        );
        if first.decision != Decision::Injected {
            continue;
        }
        assert!(
            matches!(&second.decision, Decision::Skipped(why) if why.contains("already injected")),
            "{case}: {:?}",
            second.decision
        );
        let spec = injected.spec.expect("spec");
        let inits = spec.init_containers.clone().unwrap_or_default();
        let own_inits: Vec<&str> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .map(|c| c.name.as_str())
            .collect();
        let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
        if native {
            // The native sidecar starts before the init containers after it.
            assert_eq!(
                names,
                [&["weft-init", "weft-proxy"][..], &own_inits].concat(),
                "{case}: weft-init, the native sidecar, then the app's own"
            );
        } else {
            // The classic proxy starts only after every init container: the
            // app's own must run before the redirect.
            assert_eq!(
                names,
                [&own_inits[..], &["weft-init"]].concat(),
                "{case}: the app's own init containers, then weft-init"
            );
        }
        let proxy = if native {
            assert_eq!(
                inits[1].name, "weft-proxy",
                "{case}: the native sidecar comes next"
            );
            assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
            &inits[1]
        } else {
            assert_eq!(
                spec.containers[0].name, "weft-proxy",
                "{case}: classic: first container"
            );
            &spec.containers[0]
        };
        let sc = proxy.security_context.clone().expect("security context");
        assert_eq!(
            (
                sc.run_as_user,
                sc.read_only_root_filesystem,
                sc.allow_privilege_escalation
            ),
            (Some(1450), Some(true), Some(false)),
            "{case}"
        );
        // The identity volume carries this pod's own key pair, nothing else.
        let sa = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        let identity = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "weft-identity")
            .and_then(|v| v.secret.clone())
            .expect("identity volume");
        // The pod's own ServiceAccount's Secret, which holds no other
        // account's key, mounted whole.
        assert_eq!(
            identity.secret_name.as_deref(),
            Some(weft::identity::identity_secret_name(&sa).as_str()),
            "{case}"
        );
        assert_eq!(identity.items, None, "{case}");
        // The probe targets the proxy is told parse as it parses them; the
        // request paths it serves for them.
        let requests: Vec<String> = proxy
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == "WEFT_PROBE_TARGETS")
            .flat_map(|e| e.value.as_deref().unwrap_or_default().split(','))
            .map(|t| {
                weft::proxy::admin::parse_probe_target(t)
                    .unwrap_or_else(|e| panic!("{case}: {e}"))
                    .request_path()
            })
            .collect();
        // Every HTTP and TCP probe of the pod now goes to the probe port,
        // and asks for exactly what one of the probe targets serves (the
        // kubelet sends the rewritten path as it is): the only requests the
        // probe port serves. A probe of another host is the user's still.
        let own_containers = spec.containers.iter().filter(|c| c.name != "weft-proxy");
        for (i, c) in own_containers.enumerate() {
            let before = pod.spec.as_ref().map(|s| &s.containers[i]).expect("spec");
            assert_eq!(before.name, c.name);
            for (probe, was) in [
                (&c.liveness_probe, &before.liveness_probe),
                (&c.readiness_probe, &before.readiness_probe),
                (&c.startup_probe, &before.startup_probe),
            ] {
                let Some(probe) = probe else { continue };
                let host = (probe.http_get.as_ref().and_then(|g| g.host.clone()))
                    .or(probe.tcp_socket.as_ref().and_then(|t| t.host.clone()));
                if host.is_some_and(|h| !h.is_empty()) {
                    assert_eq!(Some(probe), was.as_ref(), "{case}: {}: as written", c.name);
                    continue;
                }
                if let Some(get) = &probe.http_get
                    && get.scheme.as_deref() != Some("HTTPS")
                {
                    assert_eq!(
                        get.port,
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15121),
                        "{case}: {}",
                        c.name
                    );
                    let path = get.path.as_deref().unwrap_or_default();
                    let path = path.split('?').next().unwrap_or_default();
                    assert!(
                        requests.iter().any(|r| r == path),
                        "{case}: {}: {path} is not the request of a target in WEFT_PROBE_TARGETS {requests:?}",
                        c.name
                    );
                }
                assert!(
                    probe.tcp_socket.is_none(),
                    "{case}: {}: a TCP probe of the pod is rewritten",
                    c.name
                );
            }
        }
    }
}

#[test]
fn an_unlabelled_namespace_is_left_alone() {
    let (_, pod) = load("plain");
    let ns = NamespaceInfo {
        name: "default".into(),
        ..Default::default()
    };
    let got = inject(&pod, &ns, &settings(true));
    assert!(got.patch.0.is_empty());
    assert!(matches!(got.decision, Decision::Skipped(why) if why.contains("not labelled")));
}
