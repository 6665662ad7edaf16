//! Reading the YAML a user would `kubectl apply` — Namespaces, Services,
//! ServiceAccounts and weft policies, many documents to a file — into the
//! compiler's [`ClusterFacts`], validating weft resources the way the API
//! server would: the CRD schema (unknown fields, types, patterns, ranges),
//! then its CEL rules, then its defaults. Every problem names the file, the
//! document and the field.

mod cli;

pub use cli::{CompileArgs, run};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use kube::core::cel::{RootContext, Validator, apply_defaults};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{self, GROUP};
use crate::compile::ClusterFacts;
use crate::schemacheck;

/// A problem with one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub document: usize,
    /// `TrafficPolicy shop/inventory`, when known.
    pub object: Option<String>,
    /// Field path such as `spec.retries.attempts`; empty for the document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// What was read.
#[derive(Debug, Default)]
pub struct Loaded {
    pub facts: ClusterFacts,
    /// Documents of kinds the compiler does not read (Deployments, ...),
    /// as `file: document N (Kind)`, so the user sees nothing vanished.
    pub skipped: Vec<String>,
}

/// Reads files and directories (recursively: `*.yaml`, `*.yml`, `*.json`,
/// in name order). Returns every problem found, not just the first.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, Vec<ManifestError>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        collect_files(path, &mut files, &mut errors);
    }
    let mut loaded = Loaded::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_str(&file, &text, &mut loaded, &mut errors),
            Err(e) => errors.push(error(&file, 0, None, "", format!("cannot read: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<ManifestError>) {
    if !path.is_dir() {
        if path.exists() {
            files.push(path.to_owned());
        } else {
            errors.push(error(path, 0, None, "", "no such file or directory".into()));
        }
        return;
    }
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(e) => return errors.push(error(path, 0, None, "", format!("cannot list: {e}"))),
    };
    entries.sort();
    for entry in entries {
        let manifest = entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if entry.is_dir() || manifest {
            collect_files(&entry, files, errors);
        }
    }
}

/// Reads every document of one file's text.
pub fn load_str(file: &Path, text: &str, loaded: &mut Loaded, errors: &mut Vec<ManifestError>) {
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(value) => load_object(file, index, "", value, loaded, errors),
            Err(e) => {
                errors.push(error(file, index, None, "", format!("not valid YAML: {e}")));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
}

fn load_object(
    file: &Path,
    index: usize,
    prefix: &str,
    value: Value,
    loaded: &mut Loaded,
    errors: &mut Vec<ManifestError>,
) {
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if api_version.is_empty() || kind.is_empty() {
        let message = "not a Kubernetes object: `apiVersion` and `kind` are required".to_owned();
        return errors.push(error(file, index, None, prefix, message));
    }
    let object = Some(describe(&kind, &value));
    let mut push = |path: &str, message: String| {
        let path = join(prefix, path);
        errors.push(error(file, index, object.clone(), &path, message));
    };
    let facts = &mut loaded.facts;
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => return push("items", "a List needs an `items` array".into()),
            };
            for (i, item) in items.into_iter().enumerate() {
                load_object(
                    file,
                    index,
                    &join(prefix, &format!("items[{i}]")),
                    item,
                    loaded,
                    errors,
                );
            }
        }
        ("v1", "Namespace") => typed::<Namespace>(value, &mut push)
            .into_iter()
            .for_each(|o| facts.namespaces.push(o)),
        ("v1", "Service") => typed::<Service>(namespaced(value), &mut push)
            .into_iter()
            .for_each(|o| facts.services.push(o)),
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(namespaced(value), &mut push)
            .into_iter()
            .for_each(|o| facts.service_accounts.push(o)),
        (v, _) if v.split('/').next() == Some(GROUP) => {
            let Some(crd) = weft_schema(v, &kind) else {
                let known = crd_schemas()
                    .iter()
                    .map(|c| c.kind.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return push(
                    "",
                    format!(
                        "unknown weft resource {v} {kind}; this weft reads {GROUP}/v1alpha1 kinds {known}"
                    ),
                );
            };
            let value = if crd.namespaced {
                namespaced(value)
            } else {
                value
            };
            let Some(value) = validate_weft(crd, value, &mut push) else {
                return;
            };
            match kind.as_str() {
                "Mesh" => typed(value, &mut push)
                    .into_iter()
                    .for_each(|o| facts.meshes.push(o)),
                "MTLSPolicy" => typed(value, &mut push)
                    .into_iter()
                    .for_each(|o| facts.mtls_policies.push(o)),
                "TrafficPolicy" => typed(value, &mut push)
                    .into_iter()
                    .for_each(|o| facts.traffic_policies.push(o)),
                "ServiceRoute" => typed(value, &mut push)
                    .into_iter()
                    .for_each(|o| facts.service_routes.push(o)),
                "AccessPolicy" => typed(value, &mut push)
                    .into_iter()
                    .for_each(|o| facts.access_policies.push(o)),
                "ExternalService" => typed(value, &mut push)
                    .into_iter()
                    .for_each(|o| facts.external_services.push(o)),
                other => push("", format!("internal: no loader for {other}")),
            }
        }
        _ => loaded
            .skipped
            .push(format!("{}: document {index} ({kind})", file.display())),
    }
}

/// A CRD's schema, prepared once.
struct CrdSchema {
    kind: String,
    version: String,
    namespaced: bool,
    schema: Value,
}

fn crd_schemas() -> &'static [CrdSchema] {
    static SCHEMAS: OnceLock<Vec<CrdSchema>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        api::crds()
            .into_iter()
            .flat_map(|crd| {
                let kind = crd.spec.names.kind.clone();
                let namespaced = crd.spec.scope == "Namespaced";
                crd.spec.versions.into_iter().map(move |v| CrdSchema {
                    kind: kind.clone(),
                    version: v.name,
                    namespaced,
                    schema: v
                        .schema
                        .and_then(|s| s.open_api_v3_schema)
                        .and_then(|s| serde_json::to_value(s).ok())
                        .unwrap_or(Value::Null),
                })
            })
            .collect()
    })
}

fn weft_schema(api_version: &str, kind: &str) -> Option<&'static CrdSchema> {
    let version = api_version.strip_prefix(GROUP)?.strip_prefix('/')?;
    crd_schemas()
        .iter()
        .find(|c| c.kind == kind && c.version == version)
}

/// Schema, then CEL rules, then defaults: the API server's order. `None`
/// when anything failed (and was pushed).
fn validate_weft(
    crd: &CrdSchema,
    value: Value,
    push: &mut impl FnMut(&str, String),
) -> Option<Value> {
    let violations = schemacheck::validate(&crd.schema, &value);
    if !violations.is_empty() {
        for v in violations {
            push(&v.path, v.message);
        }
        return None;
    }
    let root = RootContext {
        api_version: format!("{GROUP}/{}", crd.version),
        api_group: GROUP.to_owned(),
        kind: crd.kind.clone(),
    };
    if let Err(errors) =
        Validator::new().validate_with_context(&crd.schema, &value, None, Some(&root))
    {
        for e in errors.iter() {
            let path = e.field_path.trim_start_matches('.');
            push(path, format!("{} (rule: {})", e.message, e.rule));
        }
        return None;
    }
    Some(apply_defaults(&crd.schema, &value))
}

fn typed<T: DeserializeOwned>(value: Value, push: &mut impl FnMut(&str, String)) -> Option<T> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            push(&path, e.into_inner().to_string());
        })
        .ok()
}

/// `kubectl apply` puts an object without a namespace into `default`.
fn namespaced(mut value: Value) -> Value {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.entry("namespace")
            .or_insert_with(|| Value::String("default".into()));
    }
    value
}

fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_owned(),
        (_, true) => prefix.to_owned(),
        _ => format!("{prefix}.{path}"),
    }
}

fn error(
    file: &Path,
    document: usize,
    object: Option<String>,
    path: &str,
    message: String,
) -> ManifestError {
    ManifestError {
        file: file.to_owned(),
        document,
        object,
        path: path.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests;
