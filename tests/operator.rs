//! Tier 2: the operator against a recording fake API server (axum on
//! loopback) that keeps the objects written to it and answers as the API
//! server would. The caches are filled by hand, as the watches would fill
//! them, so each test controls exactly what the operator knows; every
//! assertion is on the HTTP requests the operator made.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;
#[path = "support/fakeapi.rs"]
mod fakeapi;

use fakeapi::{Seen, Shared};
use weft::api::{AccessPolicy, MTLSPolicy, TrafficPolicy};
use weft::identity::{CA_LIFETIME, MeshCa};
use weft::operator::ca;
use weft::operator::driver;
use weft::operator::metrics::Metrics;
use weft::operator::observe::{ScrapeError, Scraper};
use weft::operator::reconcile::{self, CaState, Ctx};
use weft::operator::world::{Change, Writers};

/// A scraper that answers from a table of pod IP -> metrics text.
#[derive(Default, Clone)]
struct TableScraper(Arc<Mutex<HashMap<IpAddr, String>>>);

impl Scraper for TableScraper {
    fn scrape(&self, ip: IpAddr) -> BoxFuture<'static, Result<String, ScrapeError>> {
        let found = self.0.lock().expect("table").get(&ip).cloned();
        Box::pin(async move {
            found.ok_or(ScrapeError {
                addr: ip.to_string(),
                reason: "connection refused".into(),
            })
        })
    }
}

struct Harness {
    fake: Shared,
    writers: Writers,
    ctx: Arc<Ctx>,
    scraper: TableScraper,
}

const CONTROL_NS: &str = "weft-system";

async fn harness() -> Harness {
    let (fake, client) = fakeapi::start().await;
    let writers = Writers::default();
    let scraper = TableScraper::default();
    let ctx = Arc::new(Ctx::new(
        client,
        writers.world(),
        Arc::new(scraper.clone()),
        Arc::new(Metrics::default()),
        CONTROL_NS.into(),
        Some("test-replica".into()),
    ));
    Harness {
        fake,
        writers,
        ctx,
        scraper,
    }
}

fn put<K: Clone + kube::Resource<DynamicType = ()> + 'static>(w: &mut Writer<K>, obj: K) {
    w.apply_watcher_event(&watcher::Event::Apply(obj));
}

fn remove<K: Clone + kube::Resource<DynamicType = ()> + 'static>(w: &mut Writer<K>, obj: K) {
    w.apply_watcher_event(&watcher::Event::Delete(obj));
}

fn obj<K: DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("a valid object")
}

fn namespace(name: &str, meshed: bool) -> Namespace {
    let labels = if meshed {
        json!({"weft.dev/inject": "enabled"})
    } else {
        json!({})
    };
    obj(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": labels}}))
}

fn account(ns: &str, name: &str) -> ServiceAccount {
    obj(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"namespace": ns, "name": name}}))
}

fn service(ns: &str, name: &str, ip: &str) -> Service {
    obj(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}}))
}

fn traffic_policy(ns: &str, target: &str, timeout: &str, generation: i64) -> TrafficPolicy {
    obj(
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"namespace": ns, "name": target, "generation": generation,
                     "creationTimestamp": "2026-11-01T00:00:00Z"},
        "spec": {"targetRef": {"kind": "Service", "name": target}, "timeout": timeout}}),
    )
}

impl Harness {
    fn seen(&self) -> Vec<Seen> {
        self.fake.lock().expect("fake").seen.clone()
    }

    fn clear(&self) {
        self.fake.lock().expect("fake").seen.clear();
    }

    /// Requests other than reads and Events.
    fn writes(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method != Method::GET && !s.path.contains("/events"))
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains("/events") && s.method == Method::POST)
            .map(|s| s.body)
            .collect()
    }

    fn stored<K: DeserializeOwned>(&self, path: &str) -> Option<K> {
        let v = self.fake.lock().expect("fake").objects.get(path).cloned()?;
        Some(obj(v))
    }

    /// Stores an object in the fake API server too (so status patches find
    /// it).
    fn seed(&self, path: &str, v: &impl serde::Serialize) {
        let v = serde_json::to_value(v).expect("json");
        self.fake
            .lock()
            .expect("fake")
            .objects
            .insert(path.to_owned(), v);
    }

    /// What the watches would deliver after the operator's writes: the
    /// children the fake holds, into the caches.
    fn sync_children(&mut self, namespaces: &[&str]) {
        for ns in namespaces {
            let base = format!("/api/v1/namespaces/{ns}");
            let rbac = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}");
            if let Some(cm) =
                self.stored::<ConfigMap>(&format!("{base}/configmaps/weft-proxy-config"))
            {
                put(&mut self.writers.config_maps, cm);
            }
            if let Some(s) = self.stored::<Secret>(&format!("{base}/secrets/weft-identity")) {
                put(&mut self.writers.secrets, s);
            }
            if let Some(r) = self.stored::<Role>(&format!("{rbac}/roles/weft-proxy-config-reader"))
            {
                put(&mut self.writers.roles, r);
            }
            if let Some(r) =
                self.stored::<RoleBinding>(&format!("{rbac}/rolebindings/weft-proxy-config-reader"))
            {
                put(&mut self.writers.role_bindings, r);
            }
        }
    }

    async fn reconcile(&self, ns: &str) {
        let nsobj = self
            .ctx
            .world
            .namespaces
            .get(&ObjectRef::new(ns))
            .expect("namespace in the cache");
        reconcile::reconcile(nsobj, self.ctx.clone())
            .await
            .expect("reconcile succeeds");
    }

    /// A reconcile of `ns` now writes nothing.
    async fn assert_settled(&self, ns: &str) {
        self.clear();
        self.reconcile(ns).await;
        assert!(self.writes().is_empty(), "{:#?}", self.writes());
    }

    /// The compile loop, fed as the watches would feed it: changes in, the
    /// namespaces it names out.
    fn compile_loop(
        &self,
    ) -> (
        mpsc::UnboundedSender<Change>,
        mpsc::UnboundedReceiver<ObjectRef<Namespace>>,
        mpsc::UnboundedReceiver<()>,
    ) {
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let (one_tx, one) = mpsc::unbounded_channel();
        let (all_tx, all) = mpsc::unbounded_channel();
        tokio::spawn(driver::compile_loop(
            self.ctx.clone(),
            changes,
            one_tx,
            all_tx,
        ));
        (changes_tx, one, all)
    }

    async fn with_ca(&self) {
        let ca = MeshCa::generate("cluster.local", std::time::SystemTime::now(), CA_LIFETIME)
            .expect("ca");
        self.ctx.ca.store(Arc::new(CaState::Ready(Arc::new(ca))));
    }
}

fn query_has(s: &Seen, pairs: &[(&str, &str)]) -> bool {
    let q: HashMap<String, String> = url_pairs(&s.query);
    pairs
        .iter()
        .all(|(k, v)| q.get(*k).map(String::as_str) == Some(*v))
}

fn url_pairs(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn labelling_a_namespace_applies_its_config_map_secret_and_rbac_once() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "default"));
    put(&mut h.writers.service_accounts, account("shop", "cart"));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;

    let writes = h.writes();
    let paths: Vec<&str> = writes.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/shop/configmaps/weft-proxy-config",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/weft-proxy-config-reader",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/weft-proxy-config-reader",
            "/api/v1/namespaces/shop/secrets/weft-identity",
        ],
        "{writes:#?}"
    );
    for w in &writes {
        assert_eq!(w.method, Method::PATCH);
        assert_eq!(w.content_type, "application/apply-patch+yaml");
        assert!(
            query_has(w, &[("fieldManager", "weft-operator"), ("force", "true")]),
            "{}",
            w.query
        );
        let owner = &w.body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["name"], &owner["uid"]),
            (&json!("Namespace"), &json!("shop"), &json!("uid-shop"))
        );
        assert_eq!(
            w.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "weft"
        );
    }
    let config: Value = serde_json::from_str(
        writes[0].body["data"]["config.json"]
            .as_str()
            .expect("config.json"),
    )
    .expect("json config");
    assert_eq!(config["namespace"], "shop");
    let secret_keys: Vec<&String> = writes[3].body["data"]
        .as_object()
        .expect("data")
        .keys()
        .collect();
    assert_eq!(
        secret_keys,
        [
            "ca.crt",
            "cart.crt",
            "cart.key",
            "default.crt",
            "default.key"
        ]
    );

    // The watches deliver what was written: a second reconcile writes
    // nothing.
    h.sync_children(&["shop"]);
    h.assert_settled("shop").await;
}

#[tokio::test]
async fn a_traffic_policy_change_reapplies_only_the_affected_namespaces() {
    let mut h = harness().await;
    for ns in ["shop", "payments", "marketing"] {
        put(&mut h.writers.namespaces, namespace(ns, true));
        put(&mut h.writers.service_accounts, account(ns, "default"));
    }
    put(
        &mut h.writers.services,
        service("shop", "inventory", "10.0.0.10"),
    );
    put(
        &mut h.writers.services,
        service("marketing", "campaigns", "10.0.0.20"),
    );
    // Only shop and payments may call inventory, so only their configs
    // list it.
    let guard: AccessPolicy = obj(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"namespace": "shop", "name": "inventory-callers", "generation": 1},
        "spec": {"targetRef": {"kind": "Service", "name": "inventory"},
                 "rules": [{"from": [{"namespace": "shop"}, {"namespace": "payments"}]}]}}));
    put(&mut h.writers.access_policies, guard);
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    for ns in ["shop", "payments", "marketing"] {
        h.reconcile(ns).await;
    }
    h.sync_children(&["shop", "payments", "marketing"]);

    let (changes_tx, mut one, _all) = h.compile_loop();
    let tp = traffic_policy("shop", "inventory", "2s", 1);
    h.seed(
        "/apis/weft.dev/v1alpha1/namespaces/shop/trafficpolicies/inventory",
        &tp,
    );
    put(&mut h.writers.traffic_policies, tp);
    h.clear();
    changes_tx.send(Change::Inputs).expect("send");

    let mut triggered = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(500), one.recv()).await {
        triggered.push(r.name);
    }
    triggered.sort();
    assert_eq!(triggered, ["payments", "shop"]);
    for ns in &triggered {
        h.reconcile(ns).await;
    }
    let applied: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|s| s.path.ends_with("/configmaps/weft-proxy-config"))
        .map(|s| s.path)
        .collect();
    assert_eq!(
        applied,
        [
            "/api/v1/namespaces/payments/configmaps/weft-proxy-config",
            "/api/v1/namespaces/shop/configmaps/weft-proxy-config",
        ]
    );
    // Reconciling the unaffected namespace anyway writes nothing.
    h.assert_settled("marketing").await;
}

#[tokio::test]
async fn a_deleted_config_map_is_recreated() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.sync_children(&["shop"]);

    let (changes_tx, mut one, _all) = h.compile_loop();

    // Someone deletes it; the watch reports the child's namespace.
    let cm: ConfigMap = h
        .stored("/api/v1/namespaces/shop/configmaps/weft-proxy-config")
        .expect("applied");
    remove(&mut h.writers.config_maps, cm);
    h.clear();
    changes_tx.send(Change::Child("shop".into())).expect("send");
    let r = tokio::time::timeout(Duration::from_secs(2), one.recv())
        .await
        .expect("a trigger")
        .expect("open");
    assert_eq!(r.name, "shop");
    h.reconcile("shop").await;
    let writes = h.writes();
    assert_eq!(writes.len(), 1, "only the missing child: {writes:#?}");
    assert_eq!(
        writes[0].path,
        "/api/v1/namespaces/shop/configmaps/weft-proxy-config"
    );
}

#[tokio::test]
async fn an_unlabelled_namespace_is_pruned() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.sync_children(&["shop"]);
    put(&mut h.writers.namespaces, namespace("shop", false));
    driver::recompile(&h.ctx).await;
    h.clear();
    h.reconcile("shop").await;
    let mut deleted: Vec<String> = h
        .writes()
        .into_iter()
        .map(|s| {
            assert_eq!(s.method, Method::DELETE);
            s.path.rsplit('/').nth(1).expect("kind").to_owned()
        })
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["configmaps", "rolebindings", "roles", "secrets"]);
}

#[tokio::test]
async fn policy_status_is_patched_once_and_not_again_when_only_time_moved() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(
        &mut h.writers.services,
        service("shop", "inventory", "10.0.0.10"),
    );
    let path = "/apis/weft.dev/v1alpha1/namespaces/shop/trafficpolicies/inventory";
    let tp = traffic_policy("shop", "inventory", "2s", 3);
    h.seed(path, &tp);
    put(&mut h.writers.traffic_policies, tp);
    driver::recompile(&h.ctx).await;
    assert_eq!(driver::write_policy_statuses(&h.ctx).await, 0);

    let writes = h.writes();
    assert_eq!(writes.len(), 1, "{writes:#?}");
    let w = &writes[0];
    assert_eq!(w.method, Method::PATCH);
    assert_eq!(w.path, format!("{path}/status"));
    assert!(query_has(
        w,
        &[("fieldManager", "weft-operator"), ("force", "true")]
    ));
    assert_eq!(w.body["status"]["observedGeneration"], 3);
    let types: Vec<&str> = w.body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| c["type"].as_str().expect("type"))
        .collect();
    assert!(
        types.contains(&"Accepted") && types.contains(&"Programmed"),
        "{types:?}"
    );

    // The watch delivers the written status; a second later nothing but
    // the clock has moved.
    let updated: TrafficPolicy = h.stored(path).expect("stored");
    put(&mut h.writers.traffic_policies, updated);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.clear();
    driver::recompile(&h.ctx).await;
    assert_eq!(driver::write_policy_statuses(&h.ctx).await, 0);
    assert!(h.writes().is_empty(), "{:#?}", h.writes());
}

const CA_PATH: &str = "/api/v1/namespaces/weft-system/secrets/weft-ca";

#[tokio::test]
async fn with_no_ca_one_is_created_once() {
    let h = harness().await;
    driver::recompile(&h.ctx).await;
    assert!(
        ca::ensure(&h.ctx).await.expect("ensure"),
        "a CA came into use"
    );
    assert!(!ca::ensure(&h.ctx).await.expect("ensure"), "the same CA");
    let creates: Vec<Seen> = h
        .writes()
        .into_iter()
        .filter(|s| s.path.starts_with("/api/v1/namespaces/weft-system/secrets"))
        .collect();
    assert_eq!(creates.len(), 1, "{creates:#?}");
    assert_eq!(creates[0].method, Method::POST);
    assert_eq!(creates[0].body["metadata"]["name"], "weft-ca");
    assert!(matches!(h.ctx.ca.load().as_ref(), CaState::Ready(_)));
}

#[tokio::test]
async fn an_existing_ca_is_never_written() {
    let mut h = harness().await;
    let ca =
        MeshCa::generate("cluster.local", std::time::SystemTime::now(), CA_LIFETIME).expect("ca");
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-ca", "namespace": "weft-system", "resourceVersion": "1"},
        "data": {"ca.crt": b64(ca.cert_pem()), "ca.key": b64(ca.key_pem())}});
    h.seed(CA_PATH, &secret);
    put(&mut h.writers.namespaces, namespace("shop", true));
    driver::recompile(&h.ctx).await;
    ca::ensure(&h.ctx).await.expect("ensure");
    h.reconcile("shop").await;
    ca::ensure(&h.ctx).await.expect("ensure");
    assert!(
        !h.writes().iter().any(|s| s.path.contains("weft-ca")
            || (s.method == Method::POST && s.path.ends_with("/secrets"))),
        "{:#?}",
        h.writes()
    );
    // The namespace's certificates come from that CA.
    let identity: Secret = h
        .stored("/api/v1/namespaces/shop/secrets/weft-identity")
        .expect("identity");
    let bundle = &identity.data.expect("data")["ca.crt"];
    assert_eq!(String::from_utf8_lossy(&bundle.0), ca.trust_bundle());
}

#[tokio::test]
async fn a_lost_ca_is_reported_not_regenerated() {
    let mut h = harness().await;
    let identity: Secret = obj(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-identity", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "weft"}},
        "data": {"ca.crt": b64("old bundle")}}));
    put(&mut h.writers.secrets, identity);
    let mesh = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Mesh",
        "metadata": {"name": "default", "generation": 1}, "spec": {}});
    h.seed("/apis/weft.dev/v1alpha1/meshes/default", &mesh);
    put(&mut h.writers.meshes, obj(mesh));
    driver::recompile(&h.ctx).await;
    assert!(!ca::ensure(&h.ctx).await.expect("ensure"));
    assert!(
        !h.writes()
            .iter()
            .any(|s| s.method == Method::POST && s.path.contains("secrets"))
    );
    let events = h.events();
    assert!(
        events.iter().any(|e| e["reason"] == "CAMissing"
            && e["note"].as_str().is_some_and(|n| n.contains("shop"))),
        "{events:#?}"
    );
    driver::write_policy_statuses(&h.ctx).await;
    let status = h
        .writes()
        .into_iter()
        .find(|s| s.path == "/apis/weft.dev/v1alpha1/meshes/default/status")
        .expect("the Mesh status was written");
    let cond = status.body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "CertificateAuthority")
        .cloned()
        .expect("the CA condition");
    assert_eq!(
        (&cond["status"], &cond["reason"]),
        (&json!("False"), &json!("CAMissing"))
    );
}

#[tokio::test]
async fn a_pod_without_the_sidecar_blocks_the_rollout_by_name() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("payments", true));
    let path = "/apis/weft.dev/v1alpha1/namespaces/payments/mtlspolicies/payments";
    let policy: MTLSPolicy = obj(
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": {"namespace": "payments", "name": "payments", "generation": 1},
        "spec": {"mode": "Strict"}}),
    );
    h.seed(path, &policy);
    put(&mut h.writers.mtls_policies, policy);
    let pod = |name: &str, ip: &str, sidecar: bool| -> Pod {
        let mut containers = vec![json!({"name": "app", "image": "payments"})];
        if sidecar {
            containers.push(json!({"name": "weft-proxy", "image": "weft"}));
        }
        obj(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "payments", "name": name},
            "spec": {"containers": containers},
            "status": {"phase": "Running", "podIP": ip}}))
    };
    put(&mut h.writers.pods, pod("payments-a", "10.1.0.1", true));
    put(
        &mut h.writers.pods,
        pod("payments-legacy", "10.1.0.2", false),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    let generation = h.ctx.snapshot.load().compiled.configs["payments"]
        .generation
        .clone();
    h.scraper.0.lock().expect("table").insert(
        "10.1.0.1".parse().expect("ip"),
        format!("weft_proxy_config_generation{{generation=\"{generation}\"}} 1\n"),
    );
    h.reconcile("payments").await;

    let st = h
        .writes()
        .into_iter()
        .find(|s| s.path == format!("{path}/status"))
        .expect("the rollout status was written");
    assert_eq!(st.body["status"]["phase"], "Blocked");
    let blockers = st.body["status"]["blockers"].to_string();
    assert!(blockers.contains("payments-legacy"), "{blockers}");
    assert!(!blockers.contains("payments-a "), "{blockers}");
    let events = h.events();
    assert!(
        events.iter().any(|e| e["reason"] == "PodsWithoutSidecar"
            && e["type"] == "Warning"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("payments-legacy"))),
        "{events:#?}"
    );
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
