//! What `weft compile` says about the YAML users write.

use std::path::Path;

use super::*;

fn load_text(text: &str) -> (Loaded, Vec<ManifestError>) {
    let mut loaded = Loaded::default();
    let mut errors = Vec::new();
    load_str(Path::new("policies.yaml"), text, &mut loaded, &mut errors);
    (loaded, errors)
}

fn only_error(text: &str) -> ManifestError {
    let (_, errors) = load_text(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().expect("one error")
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

#[test]
fn misspelt_field_names_file_document_path_and_the_fix() {
    let text = format!(
        "{NAMESPACE}---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: inv\n  namespace: shop\nspec:\n  targetRef: {{kind: Service, name: inventory}}\n  retries:\n    attemps: 3\n"
    );
    let e = only_error(&text);
    assert_eq!((e.document, e.path.as_str()), (2, "spec.retries.attemps"));
    assert_eq!(e.object.as_deref(), Some("TrafficPolicy shop/inv"));
    let shown = e.to_string();
    assert!(
        shown.starts_with(
            "policies.yaml: document 2 (TrafficPolicy shop/inv): spec.retries.attemps: "
        ),
        "{shown}"
    );
    assert!(
        shown.contains("attempts"),
        "suggests the right spelling: {shown}"
    );
}

#[test]
fn invalid_duration_names_the_field_and_the_format() {
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  timeout: 5 seconds\n",
    );
    assert_eq!((e.document, e.path.as_str()), (1, "spec.timeout"));
    assert!(
        e.message.contains("5 seconds") && e.message.contains("pattern"),
        "{e}"
    );
}

/// A canary's rules, as the API server would judge them (defaults in
/// first): a backend of the route, steps ending at 100 without repeats,
/// an interval the control plane keeps evidence for.
#[test]
fn a_canary_rollout_is_checked_as_the_api_server_would() {
    let route = |rollout: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {{name: checkout, namespace: shop}}\nspec:\n  parentRef: {{name: checkout}}\n  rules: [{{backendRefs: [{{name: checkout, weight: 90}}, {{name: checkout-canary, weight: 10}}]}}]\n  rollout: {rollout}\n"
        )
    };
    let (docs, errors) = load_text(&route("{canary: checkout-canary}"));
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(docs.facts.service_routes.len(), 1);
    for (rollout, says) in [
        ("{canary: nobody}", "rollout.canary must name a backendRef"),
        (
            "{canary: checkout-canary, steps: [10, 50]}",
            "rollout.steps must end with 100",
        ),
        (
            "{canary: checkout-canary, steps: [10, 10, 100]}",
            "must not repeat a weight",
        ),
        (
            "{canary: checkout-canary, interval: 1h}",
            "rollout.interval must be between 10s and 9m",
        ),
        (
            "{canary: checkout-canary, interval: 1s}",
            "rollout.interval must be between 10s and 9m",
        ),
        (
            "{canary: checkout-canary, steps: [0, 100]}",
            "steps[0]: must be at least 1",
        ),
        (
            "{canary: checkout-canary, steps: [101]}",
            "steps[0]: must be at most 100",
        ),
        (
            "{canary: checkout}",
            "rollout.canary must be another Service than parentRef",
        ),
    ] {
        let e = only_error(&route(rollout)).to_string();
        assert!(e.contains(says), "{rollout}: {e}");
    }
}

/// An AccessPolicy's mode and observation window, as the API server
/// would judge them.
#[test]
fn an_access_policys_mode_and_window_are_checked_as_the_api_server_would() {
    let policy = |extra: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: payments, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: payments}}\n{extra}"
        )
    };
    for ok in [
        "",
        "  mode: Audit\n",
        "  mode: Enforce\n  observationWindow: 0s\n",
        "  observationWindow: 9m\n",
    ] {
        let (docs, errors) = load_text(&policy(ok));
        assert!(errors.is_empty(), "{ok}: {errors:#?}");
        assert_eq!(docs.facts.access_policies.len(), 1);
    }
    for (extra, says) in [
        ("  mode: audit\n", "spec.mode"),
        (
            "  observationWindow: 10m\n",
            "observationWindow must be at most 9m",
        ),
        ("  observationWindow: 5 minutes\n", "spec.observationWindow"),
    ] {
        let e = only_error(&policy(extra)).to_string();
        assert!(e.contains(says), "{extra}: {e}");
    }
}

#[test]
fn cel_rules_spanning_fields_are_checked() {
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  timeout: 1s\n  retries: {perTryTimeout: 2s}\n",
    );
    assert!(
        e.message.contains("perTryTimeout must not exceed timeout"),
        "{e}"
    );
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  retryAfter: {maxWait: 2m}\n",
    );
    assert!(
        e.message
            .contains("retryAfter.maxWait must not exceed retryAfter.maxBackOff"),
        "{e}"
    );
    // Against the default of the other field too, as the API server
    // (which fills defaults in first) judges it.
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  retryAfter: {maxBackOff: 500ms}\n",
    );
    assert!(
        e.message
            .contains("retryAfter.maxWait must not exceed retryAfter.maxBackOff"),
        "{e}"
    );
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  retryAfter: {maxWait: 2s, maxBackOff: 2h}\n",
    );
    assert!(e.message.contains("at most 1h"), "{e}");
    // The object cap against the budget's default (1 MiB).
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  cache: {maxObjectBytes: 524288}\n",
    );
    assert!(
        e.message
            .contains("cache.maxObjectBytes must be at most a quarter"),
        "{e}"
    );
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  cache: {staleIfError: 48h}\n",
    );
    assert!(
        e.message.contains("cache.staleIfError must be at most 24h"),
        "{e}"
    );
    // Inbound limits: on a Service only, something set, no caller's
    // limit above the total, route names unique.
    let inbound = |spec: &str| {
        only_error(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: inv, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: inventory}}\n  inboundRateLimit: {spec}\n"
        ))
    };
    for (spec, says) in [
        ("{}", "inboundRateLimit sets no limit"),
        (
            "{total: {requestsPerSecond: 10}, perIdentity: {requestsPerSecond: 20}}",
            "perIdentity.requestsPerSecond must not exceed total",
        ),
        (
            "{total: {requestsPerSecond: 10}, overrides: [{from: [{serviceAccount: batch}], requestsPerSecond: 20}]}",
            "overrides[].requestsPerSecond must not exceed total",
        ),
    ] {
        let e = inbound(spec);
        assert!(e.message.contains(says), "{spec}: {e}");
    }
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: feed, namespace: shop}\nspec:\n  targetRef: {group: weft.dev, kind: ExternalService, name: feed}\n  inboundRateLimit: {total: {requestsPerSecond: 10}}\n",
    );
    assert!(
        e.message
            .contains("an ExternalService has none: limit the calls to it with rateLimit"),
        "{e}"
    );
    let (_, errors) = load_text(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: inventory}\n  inboundRateLimit:\n    routes:\n    - {name: search, path: {value: /search}, requestsPerSecond: 5}\n    - {name: search, path: {value: /find}, requestsPerSecond: 5}\n",
    );
    assert!(
        errors
            .iter()
            .any(|e| e.path.starts_with("spec.inboundRateLimit.routes")),
        "two routes named alike are refused: {errors:#?}"
    );
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRef: {name: checkout}\n  rules:\n  - backendRefs: [{name: a, weight: 0}]\n",
    );
    assert!(e.message.contains("weight above 0"), "{e}");
    assert!(e.path.starts_with("spec.rules"), "{e}");
    let e =
        only_error("apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {name: prod}\nspec: {}\n");
    assert!(e.message.contains("name it `default`"), "{e}");
}

#[test]
fn schema_ranges_and_enums_are_enforced() {
    let cases = [
        (
            "spec:\n  parentRef: {name: c}\n  rules:\n  - backendRefs: [{name: a, weight: 1001}]\n",
            "ServiceRoute",
            "spec.rules[0].backendRefs[0].weight",
        ),
        (
            "spec:\n  parentRef: {name: c}\n  rules:\n  - backendRefs: []\n",
            "ServiceRoute",
            "spec.rules[0].backendRefs",
        ),
        ("spec:\n  mode: Strickt\n", "MTLSPolicy", "spec.mode"),
        (
            "spec:\n  targetRef: {kind: Deployment, name: x}\n",
            "TrafficPolicy",
            "spec.targetRef.kind",
        ),
    ];
    for (spec, kind, path) in cases {
        let text = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: x, namespace: shop}}\n{spec}"
        );
        let (_, errors) = load_text(&text);
        assert!(
            errors.iter().any(|e| e.path == path),
            "{kind} {path}: {errors:#?}"
        );
    }
}

#[test]
fn defaults_are_applied_like_the_api_server() {
    let (loaded, errors) = load_text(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv}\nspec:\n  targetRef: {name: inventory}\n  retries: {}\n",
    );
    assert!(errors.is_empty(), "{errors:#?}");
    let tp = &loaded.facts.traffic_policies[0];
    assert_eq!(
        tp.metadata.namespace.as_deref(),
        Some("default"),
        "kubectl's default namespace"
    );
    let retries = tp.spec.retries.as_ref().expect("retries");
    assert_eq!(retries.attempts, 2);
    assert_eq!(retries.retry_on, crate::api::default_retry_on());
}

#[test]
fn lists_core_objects_and_other_kinds() {
    let (loaded, errors) = load_text(
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ServiceAccount, metadata: {name: cart, namespace: shop}}\n- {apiVersion: v1, kind: Service, metadata: {name: cart, namespace: shop}, spec: {ports: [{port: 80}]}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: cart}\n",
    );
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(
        (
            loaded.facts.service_accounts.len(),
            loaded.facts.services.len()
        ),
        (1, 1)
    );
    assert_eq!(loaded.skipped, ["policies.yaml: document 2 (Deployment)"]);
}

#[test]
fn bad_documents_are_reported_not_skipped() {
    let cases = [
        (
            "kind: Service\nmetadata: {name: x}\n",
            "",
            "apiVersion` and `kind` are required",
        ),
        (
            "apiVersion: weft.dev/v1\nkind: TrafficPolicy\nmetadata: {name: x}\n",
            "",
            "unknown weft resource weft.dev/v1 TrafficPolicy",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: eighty}]}\n",
            "spec.ports[0].port",
            "invalid type",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: x\n",
            "",
            "not valid YAML",
        ),
    ];
    for (text, path, message) in cases {
        let e = only_error(text);
        assert_eq!(e.path, path, "{text}");
        assert!(e.message.contains(message), "{text}: {e}");
    }
}

#[test]
fn missing_paths_are_errors() {
    let errors = load(&[PathBuf::from("/nonexistent/weft")]).expect_err("missing");
    assert!(
        errors[0].to_string().contains("no such file"),
        "{}",
        errors[0]
    );
}

#[test]
fn external_services_and_their_policies_are_checked_as_the_api_server_would() {
    let ok = "apiVersion: weft.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: gateway, namespace: shop}\nspec:\n  hosts: [api.gateway.example, '*.carrier.example']\n  ports:\n  - {port: 80, protocol: HTTP, tls: {serverName: api.gateway.example}}\n---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: gw, namespace: shop}\nspec:\n  targetRef: {group: weft.dev, kind: ExternalService, name: gateway}\n  timeout: 3s\n";
    let (loaded, errors) = load_text(ok);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(loaded.facts.external_services.len(), 1);
    assert_eq!(loaded.facts.traffic_policies.len(), 1);

    // The group must match the kind (Gateway API's target references).
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: gw, namespace: shop}\nspec:\n  targetRef: {kind: ExternalService, name: gateway}\n",
    );
    assert!(
        e.message.contains("\"weft.dev\" for an ExternalService"),
        "{e}"
    );
    let e = only_error(
        "apiVersion: weft.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: gateway, namespace: shop}\nspec:\n  hosts: [api.gateway.example]\n  ports: [{port: 80, protocol: HTTP}, {port: 80, protocol: HTTP}]\n",
    );
    assert!(e.message.contains("each port may be listed once"), "{e}");
    for (hosts, path) in [
        ("[Api.Gateway.example]", "spec.hosts[0]"),
        ("['*.*.example']", "spec.hosts[0]"),
        ("[localhost]", "spec.hosts[0]"),
        ("[]", "spec.hosts"),
    ] {
        let text = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: g, namespace: shop}}\nspec:\n  hosts: {hosts}\n  ports: [{{port: 80, protocol: HTTP}}]\n"
        );
        let (_, errors) = load_text(&text);
        assert!(
            errors.iter().any(|e| e.path == path),
            "{hosts}: {errors:#?}"
        );
    }
}

/// The Mesh's CA rotation request, as the API server would judge it
/// (the rule that fixes the source per id holds on updates only).
#[test]
fn a_ca_rotation_request_is_checked_as_the_api_server_would() {
    let mesh = |ca: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec:\n  ca:\n{ca}"
        )
    };
    for ok in [
        "    expiryWarning: 720h\n",
        "    rotation: {id: 2027-q1}\n",
        "    rotation: {id: r2, action: Pause, retry: 3, gateTimeout: 2m}\n",
        "    rotation:\n      id: r3\n      source: {secretName: shop-root, anchorKey: ca.crt}\n",
    ] {
        let (_, errors) = load_text(&mesh(ok));
        assert!(errors.is_empty(), "{ok}: {errors:#?}");
    }
    for (bad, says) in [
        ("    rotation: {id: Q1}\n", "spec.ca.rotation.id"),
        (
            "    rotation: {id: r1, gateTimeout: 1m}\n",
            "gateTimeout must be between 2m and 168h",
        ),
        (
            "    rotation: {id: r1, action: Stop}\n",
            "spec.ca.rotation.action",
        ),
        (
            "    rotation: {id: r1, source: {certKey: tls.crt}}\n",
            "secretName",
        ),
    ] {
        let e = only_error(&mesh(bad)).to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
}
