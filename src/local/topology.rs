//! The topology file of `weft local`: which demo workloads run, how many
//! replicas, whom they call, which faults they carry and which of them drive
//! load. It sits beside the YAML you would `kubectl apply`, but it is not a
//! cluster object: `apiVersion: local.weft.dev/v1alpha1`, which `weft
//! compile` lists as skipped and `kubectl apply -f DIR` (not recursive)
//! never reads when it sits in a subdirectory (`DIR/local/topology.yaml`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::Duration;

pub const API_VERSION: &str = "local.weft.dev/v1alpha1";
pub const KIND: &str = "LocalTopology";
/// Where `weft local up DIR` looks for the topology when not told.
pub const DEFAULT_PATH: &str = "local/topology.yaml";
/// More would not fit the /24 the network-namespace pods use.
pub const MAX_PODS: usize = 200;
const MAX_REPLICAS: u32 = 20;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    api_version: String,
    kind: String,
    #[serde(default)]
    #[allow(dead_code)] // accepted for the look of a Kubernetes object
    metadata: Option<serde_json::Value>,
    spec: Topology,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    pub workloads: Vec<Workload>,
}

/// One demo service (a Deployment's worth of pods).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// The workload's name: its pods are `<name>-<i>`, it is the `src` of
    /// their outbound metrics, and the default `app` label.
    pub name: String,
    pub namespace: String,
    /// The mesh identity; default: the workload's name.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Pod labels, matched by Service selectors; default `app: <name>`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The port the app listens on.
    #[serde(default = "app_port")]
    pub port: u16,
    /// Downstream URLs called for every request served, by Service name:
    /// `http://inventory.shop/items` (port 80 unless given).
    #[serde(default)]
    pub calls: Vec<String>,
    /// Share of requests the app answers 503 (0.0 to 1.0).
    #[serde(default)]
    pub error_rate: f64,
    /// Added to every answer.
    #[serde(default)]
    pub latency: Option<Duration>,
    /// URLs this workload's pods GET on their own, `rps` times a second
    /// each: the shoppers that put load on the shop.
    #[serde(default)]
    pub drive: Vec<String>,
    #[serde(default = "default_rps")]
    pub rps: f64,
}

fn one() -> u32 {
    1
}
fn app_port() -> u16 {
    8080
}
fn default_rps() -> f64 {
    10.0
}

impl Workload {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// The labels Service selectors see.
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        if self.labels.is_empty() {
            BTreeMap::from([("app".to_owned(), self.name.clone())])
        } else {
            self.labels.clone()
        }
    }
}

/// A problem in the topology file, with the field that has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError {
    pub file: PathBuf,
    /// Such as `spec.workloads[2].calls[0]`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for TopologyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads and checks a topology file on its own (references to Services and
/// namespaces are checked against the manifests by the planner).
pub fn load(file: &Path) -> Result<Topology, Vec<TopologyError>> {
    let err = |path: &str, message: String| TopologyError {
        file: file.to_owned(),
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![err("", format!("cannot read the topology file: {e}"))])?;
    parse(&text).map_err(|errors| {
        errors
            .into_iter()
            .map(|(path, message)| err(&path, message))
            .collect()
    })
}

/// Parses and checks topology text; errors are `(field path, message)`.
pub fn parse(text: &str) -> Result<Topology, Vec<(String, String)>> {
    let de = serde_norway::Deserializer::from_str(text);
    let doc: Document = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        vec![(path, e.into_inner().to_string())]
    })?;
    let mut errors = Vec::new();
    if doc.api_version != API_VERSION || doc.kind != KIND {
        errors.push((
            String::new(),
            format!(
                "expected apiVersion {API_VERSION} and kind {KIND}, got {} {}",
                doc.api_version, doc.kind
            ),
        ));
    }
    let spec = doc.spec;
    if spec.workloads.is_empty() {
        errors.push((
            "spec.workloads".into(),
            "at least one workload is needed".into(),
        ));
    }
    let mut seen = BTreeMap::new();
    let mut pods = 0usize;
    for (i, w) in spec.workloads.iter().enumerate() {
        let at = |field: &str| format!("spec.workloads[{i}].{field}");
        for (field, value) in [("name", &w.name), ("namespace", &w.namespace)] {
            if let Err(why) = dns_label(value) {
                errors.push((at(field), why));
            }
        }
        if let Err(why) = dns_label(w.service_account()) {
            errors.push((at("serviceAccount"), why));
        }
        if let Some(first) = seen.insert(w.name.clone(), i) {
            errors.push((
                at("name"),
                format!(
                    "{:?} is also the name of spec.workloads[{first}]: workload names are unique (they name the pods)",
                    w.name
                ),
            ));
        }
        if !(1..=MAX_REPLICAS).contains(&w.replicas) {
            errors.push((
                at("replicas"),
                format!("must be between 1 and {MAX_REPLICAS}, got {}", w.replicas),
            ));
        }
        pods += w.replicas as usize;
        if w.port == 0 || (15100..=15199).contains(&w.port) {
            errors.push((
                at("port"),
                format!(
                    "{} is not a usable app port (15100-15199 belong to the proxy)",
                    w.port
                ),
            ));
        }
        if !(0.0..=1.0).contains(&w.error_rate) {
            errors.push((
                at("errorRate"),
                format!(
                    "a share between 0.0 and 1.0 (0.2 fails one request in five), got {}",
                    w.error_rate
                ),
            ));
        }
        if !(w.rps > 0.0 && w.rps <= 1000.0) {
            errors.push((
                at("rps"),
                format!("above 0 and at most 1000, got {}", w.rps),
            ));
        }
        for (field, urls) in [("calls", &w.calls), ("drive", &w.drive)] {
            for (j, url) in urls.iter().enumerate() {
                if let Err(why) = CallUrl::parse(url) {
                    errors.push((format!("spec.workloads[{i}].{field}[{j}]"), why));
                }
            }
        }
    }
    if pods > MAX_PODS {
        errors.push((
            "spec.workloads".into(),
            format!("{pods} pods in all; weft local runs at most {MAX_PODS}"),
        ));
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(errors)
    }
}

fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS label (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

/// A call or drive URL: `http://HOST[:PORT]/PATH`, HOST naming a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallUrl {
    pub host: String,
    pub port: u16,
    /// With the query, starting with `/`.
    pub path: String,
}

impl CallUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!(
                "{url:?}: expected http://SERVICE[.NAMESPACE][:PORT]/PATH (https is the mesh's job)"
            )
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{url:?}: {p:?} is not a port"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no Service name"));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: local.weft.dev/v1alpha1\nkind: LocalTopology\nspec:\n";

    #[test]
    fn defaults_fill_in() {
        let t = parse(&format!(
            "{HEAD}  workloads:\n  - name: cart\n    namespace: shop\n"
        ))
        .expect("valid");
        let w = &t.workloads[0];
        assert_eq!(
            (w.replicas, w.port, w.service_account(), w.rps),
            (1, 8080, "cart", 10.0)
        );
        assert_eq!(w.pod_labels()["app"], "cart");
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse(&format!(
            "{HEAD}  workloads:\n  - name: cart\n    namespace: shop\n    erorRate: 0.2\n"
        ))
        .expect_err("typo");
        assert_eq!(err[0].0, "spec.workloads[0].erorRate");
        assert!(err[0].1.contains("unknown field `erorRate`"), "{err:?}");

        let err = parse(&format!(
            "{HEAD}  workloads:\n  - name: cart\n    namespace: shop\n    errorRate: 20\n    calls: [\"https://x\"]\n  - name: cart\n    namespace: Shop\n    replicas: 0\n"
        ))
        .expect_err("bad values");
        let paths: Vec<&str> = err.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.workloads[0].errorRate",
                "spec.workloads[0].calls[0]",
                "spec.workloads[1].namespace",
                "spec.workloads[1].name",
                "spec.workloads[1].replicas",
            ],
            "{err:?}"
        );
    }

    #[test]
    fn a_service_account_named_ca_is_an_account_like_any_other() {
        // Its certificate once shared a file name with the trust bundle;
        // the identity files are tls.crt, tls.key and ca.crt now.
        parse(&format!(
            "{HEAD}  workloads:\n  - name: ca\n    namespace: shop\n"
        ))
        .expect("a workload named ca");
    }

    #[test]
    fn call_urls() {
        assert_eq!(
            CallUrl::parse("http://inventory.shop/items?x=1"),
            Ok(CallUrl {
                host: "inventory.shop".into(),
                port: 80,
                path: "/items?x=1".into()
            })
        );
        assert_eq!(CallUrl::parse("http://cart:8080").expect("ok").path, "/");
        assert!(CallUrl::parse("http://cart:0/").is_err());
        assert!(CallUrl::parse("http:///x").is_err());
    }
}
