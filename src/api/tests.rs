use std::path::Path;

use serde_json::Value;

use super::*;

/// `crds/` is what users apply; it must be exactly what the types generate.
#[test]
fn crds_directory_matches_generated() {
    // crds/ for kubectl, and the chart's copy (Helm installs a chart's
    // crds/ before its templates).
    for dir in ["crds", "charts/weft/crds"] {
        crds_dir_matches(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir));
    }
}

fn crds_dir_matches(dir: &Path) {
    let mut expected: Vec<String> = Vec::new();
    for crd in crds() {
        let name = crd_file_name(&crd);
        let path = dir.join(&name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
        assert!(
            on_disk == crd_yaml(&crd),
            "{} differs from `weft crdgen`; run `make crds`",
            path.display()
        );
        expected.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(present, expected, "crds/ holds a file no type generates");
}

/// Walk every schema node: each must be typed (structural) and every
/// property must carry a description, so `kubectl explain` is useful.
fn check_structural(node: &Value, path: &str, problems: &mut Vec<String>) {
    let obj = match node.as_object() {
        Some(o) => o,
        None => return problems.push(format!("{path}: not an object")),
    };
    let typed = obj.contains_key("type")
        || obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !typed {
        problems.push(format!("{path}: no type"));
    }
    for banned in ["$ref", "definitions", "$defs", "oneOf", "const"] {
        if obj.contains_key(banned) {
            problems.push(format!(
                "{path}: `{banned}` is not allowed in a structural schema"
            ));
        }
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (name, prop) in props {
            let p = format!("{path}.{name}");
            let is_meta =
                path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
            if !is_meta
                && prop
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
            {
                problems.push(format!("{p}: no description"));
            }
            check_structural(prop, &p, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(items, &format!("{path}[]"), problems);
    }
    if let Some(add @ Value::Object(_)) = obj.get("additionalProperties") {
        check_structural(add, &format!("{path}{{}}"), problems);
    }
}

#[test]
fn every_crd_is_structural_and_documented() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        assert_eq!(crd.spec.group, GROUP);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind} has no status subresource"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{kind} has no short name"
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 2),
            "{kind} has no printer columns"
        );
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("schema serialises");
        let mut problems = Vec::new();
        check_structural(&schema, "", &mut problems);
        assert!(problems.is_empty(), "{kind}:\n{}", problems.join("\n"));
        let status = &schema["properties"]["status"]["properties"];
        assert!(
            status.get("observedGeneration").is_some(),
            "{kind}: status.observedGeneration"
        );
        assert!(
            status.get("conditions").is_some(),
            "{kind}: status.conditions"
        );
    }
}

#[test]
fn schema_carries_the_validation_users_rely_on() {
    let tp = serde_json::to_value(TrafficPolicy::crd()).expect("crd");
    let spec = &tp["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["timeout"]["pattern"], DURATION_PATTERN);
    assert_eq!(
        spec["properties"]["retries"]["properties"]["attempts"]["maximum"],
        10.0
    );
    assert_eq!(
        spec["properties"]["retries"]["properties"]["attempts"]["default"],
        2
    );
    let sr = serde_json::to_value(ServiceRoute::crd()).expect("crd");
    let rule = &sr["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["rules"]["items"];
    assert_eq!(rule["properties"]["backendRefs"]["minItems"], 1);
    assert_eq!(
        rule["properties"]["backendRefs"]["items"]["properties"]["weight"]["maximum"],
        1000.0
    );
    assert!(
        rule["x-kubernetes-validations"]
            .to_string()
            .contains("weight > 0")
    );
    let mtls = serde_json::to_value(MTLSPolicy::crd()).expect("crd");
    let columns = mtls["spec"]["versions"][0]["additionalPrinterColumns"].to_string();
    assert!(
        columns.contains(".spec.mode") && columns.contains(".status.phase"),
        "{columns}"
    );
}
