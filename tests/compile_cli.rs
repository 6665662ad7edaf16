//! `weft compile` as a user runs it: the real binary on the example shop
//! and on broken input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run weft")
}

fn shop() -> Value {
    let out = weft(&["compile", "examples/shop", "-o", "json", "--strict"]);
    assert!(
        out.status.success(),
        "weft compile examples/shop failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn service<'a>(config: &'a Value, ns: &str, name: &str) -> Option<&'a Value> {
    config["outbound"]["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["namespace"] == ns && s["name"] == name)
}

#[test]
fn checkout_canary_splits_90_10_and_honours_the_opt_in_header() {
    let out = shop();
    let checkout = service(&out["configs"]["shop"], "shop", "checkout").expect("checkout");
    let routes = checkout["routes"].as_array().expect("routes");
    assert_eq!(routes[0]["name"], "shop/checkout-canary/opt-in");
    assert_eq!(routes[0]["matches"][0]["headers"]["x-canary"], "true");
    assert_eq!(routes[0]["backends"][0]["service"], "checkout-canary.shop");
    let split: Vec<(String, u64)> = routes[1]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["service"].as_str().unwrap_or_default().to_owned(),
                b["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        split,
        [
            ("checkout.shop".to_owned(), 90),
            ("checkout-canary.shop".to_owned(), 10)
        ]
    );
}

#[test]
fn inventory_retries_safely_and_never_counts_its_health_check() {
    let out = shop();
    let policy =
        &service(&out["configs"]["shop"], "shop", "inventory").expect("inventory")["policy"];
    assert_eq!(policy["source"], "shop/inventory");
    assert_eq!(policy["timeoutMs"], 3000);
    assert_eq!(policy["excludedPaths"], serde_json::json!(["/health"]));
    let retry = &policy["retry"];
    assert_eq!(retry["maxRetries"], 3);
    assert_eq!(retry["perTryTimeoutMs"], 800);
    assert_eq!(
        retry["retryOn"],
        serde_json::json!(["5xx", "connect-failure", "reset"])
    );
    let methods = retry["methods"].to_string();
    assert!(
        !methods.contains("POST"),
        "POST must not be retried by default: {methods}"
    );
    assert_eq!(retry["idempotencyHeader"], "idempotency-key");
    assert_eq!(policy["circuitBreaker"]["consecutiveFailures"], 5);
}

#[test]
fn only_checkout_may_call_payments() {
    let out = shop();
    let payments_cfg = &out["configs"]["payments"];
    let auth = &payments_cfg["inbound"]["authorizations"];
    assert_eq!(auth.as_array().map(Vec::len), Some(1), "{auth}");
    assert_eq!(auth[0]["service"], "payments");
    assert_eq!(
        auth[0]["rules"][0]["identities"],
        serde_json::json!([{ "namespace": "shop", "serviceAccount": "checkout" }])
    );
    assert_eq!(
        auth[0]["rules"][0]["ports"],
        serde_json::json!([8080]),
        "Service port 80 -> container 8080"
    );
    // shop holds checkout's identity, so it may reach payments; payments'
    // own workloads may not, so their config leaves it out.
    let payments =
        service(&out["configs"]["shop"], "payments", "payments").expect("shop reaches payments");
    assert_eq!(payments["policy"]["timeoutMs"], 2000);
    assert_eq!(
        payments["mesh"]["serviceAccounts"],
        serde_json::json!(["payments"])
    );
    assert!(service(payments_cfg, "payments", "payments").is_none());
    // The staged STRICT rollout has not run, so payments still admits plaintext.
    assert_eq!(payments_cfg["inbound"]["mode"], "permissive");
}

#[test]
fn every_example_policy_is_accepted_resolved_and_programmed() {
    let out = shop();
    let verdicts = out["verdicts"].as_array().expect("verdicts");
    assert_eq!(verdicts.len(), 10, "{verdicts:#?}");
    for v in verdicts {
        for c in v["conditions"].as_array().expect("conditions") {
            assert_eq!(c["status"], true, "{v}");
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[test]
fn broken_input_fails_naming_file_document_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let misspelt = write(
        dir.path(),
        "misspelt.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {name: inventory}\n  retries: {attemps: 3}\n",
    );
    let duration = write(
        dir.path(),
        "duration.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: pay, namespace: payments}\nspec:\n  targetRef: {name: payments}\n  timeout: 2 seconds\n",
    );
    let out = weft(&["compile", &misspelt, &duration]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stdout.is_empty(),
        "nothing is printed as if it compiled"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{misspelt}: document 2 (TrafficPolicy shop/inv): spec.retries.attemps: unknown field"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean \"attempts\""), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{duration}: document 1 (TrafficPolicy payments/pay): spec.timeout:"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}

#[test]
fn strict_flag_fails_on_unhealthy_policies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "orphan.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orphan, namespace: shop}\nspec:\n  targetRef: {name: ghost}\n",
    );
    let lenient = weft(&["compile", &file]);
    assert!(lenient.status.success());
    let text = String::from_utf8_lossy(&lenient.stdout);
    assert!(
        text.contains("ResolvedRefs=False") && text.contains("Service shop/ghost not found"),
        "{text}"
    );
    assert_eq!(weft(&["compile", "--strict", &file]).status.code(), Some(3));
}

#[test]
fn crdgen_prints_every_crd() {
    let out = weft(&["crdgen"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "Mesh",
        "MTLSPolicy",
        "TrafficPolicy",
        "ServiceRoute",
        "AccessPolicy",
    ] {
        assert!(text.contains(&format!("kind: {kind}\n")), "{kind}");
    }
}
