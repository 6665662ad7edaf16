//! Tier 3: learned least privilege with a real proxy on loopback.
//! `payments`' proxy runs the config the compiler makes of an AccessPolicy
//! in mode Audit; meshed callers (identities minted by the mesh's own CA)
//! call it over mTLS. Each look does what the control plane does on a
//! cluster, with the same code: read the proxy's `/metrics` into the mesh
//! stats, fold the audit counts into `status.observedCallers`, take the
//! staged move's step, write it as the policy's status, compile, and
//! hand the proxy the new config. `weft authz suggest` is the real binary.
//! Only the API server is left out (the status is the `weft-audit` field
//! manager's server-side apply on a cluster), and the observation window
//! is shortened to two seconds.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft::api::{AccessMode, AccessPolicy, EnforcementPhase};
use weft::meshstats::{MeshStats, ProxyCounts, Reading};
use weft::operator::audit::Decision;

use support::mesh::*;
use support::*;

/// The shop's objects, with `payments` forwarding port 80 to the app's
/// port, guarded by an AccessPolicy that only audits (no rules yet).
fn shop(app_port: u16) -> String {
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{weft.dev/inject: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: payments, namespace: shop}}
spec: {{clusterIP: 10.96.0.20, ports: [{{name: http, port: 80, targetPort: {app_port}}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: payments, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec:
  targetRef: {{kind: Service, name: payments}}
  mode: Audit
  observationWindow: 2s
"
    )
}

/// An observed caller as a row: caller, port, method, path, requests.
type Seen = (String, Option<u16>, String, Option<String>, u64);

/// `payments`' proxy, the stats the control plane keeps of it, and the
/// policy as the API server holds it.
struct Mesh {
    pki: Pki,
    facts: weft::compile::ClusterFacts,
    policy: AccessPolicy,
    stats: MeshStats,
    proxy: TestProxy,
    _app: Upstream,
    _id: IdDir,
}

impl Mesh {
    async fn start() -> Self {
        let pki = Pki::new();
        let app = Upstream::fixed(200, "ok").await;
        let mut loaded = weft::manifest::Loaded::default();
        let mut errors = Vec::new();
        weft::manifest::load_str(
            Path::new("shop.yaml"),
            &shop(app.addr.port()),
            &mut loaded,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:#?}");
        let facts = loaded.facts;
        let policy = facts.access_policies[0].clone();
        let id = pki.dir("shop", "payments");
        let map = format!("127.0.0.1:0={}", app.addr.port());
        let config = compiled(&facts, &policy);
        let proxy = meshed(
            &config,
            &[],
            &id,
            &["--inbound-map", &map, "--workload", "payments"],
        )
        .await;
        let mut mesh = Mesh {
            pki,
            facts,
            policy,
            stats: MeshStats::default(),
            proxy,
            _app: app,
            _id: id,
        };
        // The first reading is a baseline.
        mesh.read().await;
        mesh
    }

    /// A request from shop/`account`'s proxy (mesh mTLS): the status.
    async fn call(&self, account: &str, method: &str, path: &str) -> u16 {
        let mut tls = mesh_connect(&self.pki, self.proxy.running.inbound[0], account).await;
        tls.write_all(
            format!("{method} {path} HTTP/1.1\r\nhost: payments\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        text.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no answer: {text:?}"))
    }

    /// Reads the proxy's metrics into the stats, as the control plane's
    /// collector does every tick.
    async fn read(&mut self) {
        let text = self.proxy.metrics().await;
        let counts = ProxyCounts::read("shop", &text).expect("readable");
        self.stats.record(
            SystemTime::now(),
            vec![Reading {
                id: ("shop".into(), "payments-0".into()),
                counts: Ok(counts),
            }],
        );
    }

    /// One look of the control plane: the compiler's conditions written
    /// (as `weft-operator` does; the audit holds back a policy that is
    /// not `Programmed`), then `operator::audits::decide` on the stats,
    /// its part of the status applied (as `weft-audit`'s server-side
    /// apply does), and the config compiled from the result handed to
    /// the proxy.
    async fn look(&mut self) -> Decision {
        self.read().await;
        self.compile();
        // On a cluster, the pods behind the Service's EndpointSlices.
        let pods: BTreeSet<String> = ["payments-0".to_owned()].into();
        let service = self.facts.services[0].clone();
        // The control plane's clock, to the second as a status holds it.
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs(),
            );
        let seen = weft::operator::audits::decide(
            &self.policy,
            &self.stats,
            Some(&pods),
            |c| weft::operator::audits::service_port_of(&service, &[], c),
            now,
        )
        .expect("an audited policy has a state");
        let mut status =
            serde_json::to_value(self.policy.status.clone().unwrap_or_default()).expect("json");
        let fields = status.as_object_mut().expect("an object");
        fields.remove("observedCallersDropped");
        for (k, v) in seen.status.as_object().expect("an object") {
            fields.insert(k.clone(), v.clone());
        }
        self.policy.status = Some(serde_json::from_value(status).expect("a status"));
        self.compile();
        seen.decision
    }

    /// Compiles the mesh with the policy as it stands: its conditions
    /// into its status, its config to the proxy.
    fn compile(&mut self) {
        let mut facts = self.facts.clone();
        facts.access_policies = vec![self.policy.clone()];
        let c = weft::compile::compile(&facts);
        let verdict = c
            .verdicts
            .iter()
            .find(|v| v.name == "payments")
            .expect("a verdict");
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let written = weft::operator::status::policy_status(verdict, &[], &now);
        let mut status = self.policy.status.clone().unwrap_or_default();
        status.conditions =
            serde_json::from_value(written["conditions"].clone()).expect("conditions");
        status.observed_generation = verdict.generation;
        self.policy.status = Some(status);
        self.proxy
            .write_config(&serde_json::to_value(&c.configs["shop"]).expect("config"));
    }
}

/// `shop`'s proxy config with `policy` as it stands.
fn compiled(facts: &weft::compile::ClusterFacts, policy: &AccessPolicy) -> Value {
    let mut facts = facts.clone();
    facts.access_policies = vec![policy.clone()];
    let c = weft::compile::compile(&facts);
    serde_json::to_value(&c.configs["shop"]).expect("config")
}

/// Polls until `account`'s GET of `path` is answered `status` (the proxy
/// reloads its config file within a second).
async fn until_answered(mesh: &Mesh, account: &str, path: &str, status: u16) {
    for _ in 0..50 {
        if mesh.call(account, "GET", path).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{account} GET {path} never answered {status}");
}

#[tokio::test]
async fn audit_learns_two_callers_suggests_them_and_blocks_enforce_while_a_third_calls() {
    let mut mesh = Mesh::start().await;
    assert!(mesh.policy.audits(), "mode Audit");
    mesh.look().await;
    // Auditing: every caller admitted, even with no rule at all.
    for _ in 0..3 {
        assert_eq!(mesh.call("checkout", "POST", "/charges/7").await, 200);
    }
    assert_eq!(mesh.call("checkout", "GET", "/charges").await, 200);
    assert_eq!(mesh.call("cart", "GET", "/status").await, 200);
    assert_eq!(mesh.call("cart", "GET", "/status/deep").await, 200);
    let text = mesh.proxy.metrics().await;
    assert!(
        text.contains(
            r#"weft_proxy_access_audit_total{policy="shop/payments",src="shop/checkout",port=""#
        ) && text.contains(&format!(
            r#"method="POST",path="/charges",verdict="refused",rules="{}"}} 3"#,
            mesh.policy.rules_revision()
        )),
        "{text}"
    );
    let d = mesh.look().await;
    assert_eq!(d.phase, EnforcementPhase::Auditing);
    let seen: Vec<Seen> = mesh
        .policy
        .status
        .as_ref()
        .expect("status")
        .observed_callers
        .iter()
        .map(|c| {
            (
                c.caller.clone(),
                c.port,
                c.method.map(|m| m.as_str().to_owned()).unwrap_or_default(),
                c.path_prefix.clone(),
                c.requests,
            )
        })
        .collect();
    let row = |caller: &str, method: &str, path: &str, n| {
        (
            caller.to_owned(),
            Some(80),
            method.to_owned(),
            Some(path.to_owned()),
            n,
        )
    };
    assert_eq!(
        seen,
        [
            row("shop/checkout", "POST", "/charges", 3),
            row("shop/cart", "GET", "/status", 2),
            row("shop/checkout", "GET", "/charges", 1),
        ]
    );

    // `weft authz suggest`, the binary, on the policy as the cluster
    // holds it.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payments.yaml");
    std::fs::write(&file, serde_norway::to_string(&mesh.policy).expect("yaml")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["authz", "suggest", "shop/payments", "--from-file"])
        .arg(&file)
        .output()
        .expect("weft runs");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let suggested: AccessPolicy = serde_norway::from_str(&printed).expect("an AccessPolicy");
    assert_eq!(suggested.spec.mode, AccessMode::Enforce);
    let callers: BTreeSet<String> = suggested
        .spec
        .rules
        .iter()
        .flat_map(|r| &r.from)
        .filter_map(|f| f.service_account.clone())
        .collect();
    assert_eq!(callers, ["cart".to_owned(), "checkout".to_owned()].into());
    // Exactly what was seen: checked by the proxy's own authorizer on
    // the config the suggestion compiles to.
    let config: weft::config::ProxyConfig =
        serde_json::from_value(compiled(&mesh.facts, &suggested)).expect("config");
    let port = mesh._app.addr.port();
    let decide = |sa: &str, method: &http::Method, path: &str| {
        let id = weft::identity::SpiffeId::new("cluster.local", "shop", sa);
        weft::proxy::authz::check(
            &config.inbound,
            &Default::default(),
            None,
            port,
            Some(&id),
            Some(weft::proxy::authz::HttpRequest { method, path }),
        ) == weft::proxy::authz::Access::Allowed
    };
    let (get, post, delete) = (http::Method::GET, http::Method::POST, http::Method::DELETE);
    assert!(decide("checkout", &post, "/charges/9"));
    assert!(decide("checkout", &get, "/charges"));
    assert!(decide("cart", &get, "/status/other"));
    assert!(
        !decide("checkout", &delete, "/charges/9"),
        "a method not seen"
    );
    assert!(
        !decide("cart", &post, "/status"),
        "a method not seen on that path"
    );
    assert!(
        !decide("cart", &get, "/charges"),
        "a path not seen from cart"
    );
    assert!(!decide("ads", &get, "/status"), "a caller not seen");

    // Enforce the suggestion: staged. While `ads` keeps calling, the
    // move is Blocked, naming it, and the proxy still admits it.
    let status = mesh.policy.status.clone();
    mesh.policy.spec = suggested.spec.clone();
    mesh.policy.spec.observation_window = Some(weft::api::Duration::from_secs(2));
    mesh.policy.status = status;
    assert!(mesh.policy.audits(), "Enforce waits for the status");
    let d = mesh.look().await;
    assert_eq!(d.phase, EnforcementPhase::Observing, "{}", d.message);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        mesh.call("ads", "GET", "/status").await,
        200,
        "still auditing"
    );
    assert_eq!(mesh.call("checkout", "POST", "/charges/8").await, 200);
    let d = mesh.look().await;
    assert_eq!(d.phase, EnforcementPhase::Blocked, "{}", d.message);
    assert_eq!(d.unlisted, ["shop/ads"]);
    assert!(d.message.contains("shop/ads (1)"), "{}", d.message);
    // It keeps calling: still Blocked, past what would have been the
    // window, and still admitted.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(mesh.call("ads", "GET", "/status").await, 200);
        let d = mesh.look().await;
        assert_eq!(d.phase, EnforcementPhase::Blocked, "{}", d.message);
    }
    // `ads` stops; the listed callers go on. A whole quiet window later
    // the rules are enforced, and `ads` is refused.
    let mut enforced = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(mesh.call("checkout", "POST", "/charges/8").await, 200);
        assert_eq!(mesh.call("cart", "GET", "/status").await, 200);
        let d = mesh.look().await;
        if d.phase == EnforcementPhase::Enforced {
            enforced = true;
            break;
        }
        assert_eq!(d.phase, EnforcementPhase::Blocked, "{}", d.message);
    }
    assert!(enforced, "a quiet window enforces");
    assert!(!mesh.policy.audits());
    until_answered(&mesh, "ads", "/status", 403).await;
    assert_eq!(mesh.call("checkout", "POST", "/charges/8").await, 200);
    assert_eq!(mesh.call("cart", "GET", "/status").await, 200);
    assert_eq!(mesh.call("checkout", "DELETE", "/charges/8").await, 403);
}
