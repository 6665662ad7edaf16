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
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;
#[path = "support/fakeapi.rs"]
mod fakeapi;
#[path = "support/logs.rs"]
mod logs;

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
    harness_compiling_with(Arc::new(weft::compile::compile)).await
}

async fn harness_compiling_with(compiler: reconcile::Compiler) -> Harness {
    let (fake, client) = fakeapi::start().await;
    let writers = Writers::default();
    let scraper = TableScraper::default();
    let ctx = Arc::new(
        Ctx::new(
            client,
            writers.world(),
            Arc::new(scraper.clone()),
            Arc::new(Metrics::default()),
            CONTROL_NS.into(),
            Some("test-replica".into()),
        )
        .with_compiler(compiler),
    );
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

    /// The Mesh `default`'s condition of this type, as the fake holds it.
    fn mesh_condition(&self, type_: &str) -> Value {
        let mesh: Value = self.stored(MESH_PATH).expect("the Mesh");
        mesh["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap_or_else(|| panic!("no {type_} condition: {mesh:#}"))
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
            for cm in ["weft-proxy-config", "weft-endpoints"] {
                if let Some(cm) = self.stored::<ConfigMap>(&format!("{base}/configmaps/{cm}")) {
                    put(&mut self.writers.config_maps, cm);
                }
            }
            let secrets: Vec<String> = {
                let fake = self.fake.lock().expect("fake");
                let prefix = format!("{base}/secrets/");
                fake.objects
                    .keys()
                    .filter(|p| p.starts_with(&prefix))
                    .cloned()
                    .collect()
            };
            for path in secrets {
                if let Some(s) = self.stored::<Secret>(&path) {
                    put(&mut self.writers.secrets, s);
                }
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

    /// A reconcile of `ns` that fails; its error.
    async fn reconcile_err(&self, ns: &str) -> reconcile::Error {
        let nsobj = self
            .ctx
            .world
            .namespaces
            .get(&ObjectRef::new(ns))
            .expect("namespace in the cache");
        reconcile::reconcile(nsobj, self.ctx.clone())
            .await
            .expect_err("the reconcile reports a failure")
    }

    /// The paths the compile loop's next batch wrote: waits for a first
    /// write (at most 5 s), then past the batch (anything else it wrote
    /// would be in it by then).
    async fn batch_writes(&self) -> Vec<String> {
        for _ in 0..250 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !self.writes().is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.writes().into_iter().map(|w| w.path).collect()
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
        self.ctx.ca.store(Arc::new(CaState::Ready(Arc::new(
            weft::operator::ca::TrustPlan::single(Arc::new(ca)),
        ))));
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
            "/api/v1/namespaces/shop/configmaps/weft-endpoints",
            "/api/v1/namespaces/shop/configmaps/weft-proxy-config",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/weft-proxy-config-reader",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/weft-proxy-config-reader",
            "/api/v1/namespaces/shop/secrets/weft-identity-cart",
            "/api/v1/namespaces/shop/secrets/weft-identity-default",
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
        writes[1].body["data"]["config.json"]
            .as_str()
            .expect("config.json"),
    )
    .expect("json config");
    assert_eq!(config["namespace"], "shop");
    // A Secret per ServiceAccount, each with that account's key pair and
    // no other's.
    let mut keys = Vec::new();
    for (w, sa) in writes[4..].iter().zip(["cart", "default"]) {
        assert_eq!(w.body["type"], "kubernetes.io/tls");
        assert_eq!(
            w.body["metadata"]["annotations"]["weft.dev/service-account"],
            sa
        );
        let data = w.body["data"].as_object().expect("data");
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
        let cert = String::from_utf8(
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                data["tls.crt"].as_str().expect("base64"),
            )
            .expect("decodes"),
        )
        .expect("pem");
        let info = weft::identity::inspect_pem(&cert).expect("certificate");
        assert_eq!(
            info.spiffe_id().map(|id| id.service_account),
            Some(sa.to_owned())
        );
        keys.push(data["tls.key"].clone());
    }
    assert_ne!(keys[0], keys[1]);

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

/// A same-named ConfigMap weft did not create (no managed-by label) is
/// someone else's: a forced apply would take it over and a later prune
/// delete it. The operator leaves it alone, writes the rest, and says why
/// in a Warning Event on the Namespace and in the Mesh's `ObjectsOwned`
/// condition, which turns back to True once the object is gone.
#[tokio::test]
async fn a_same_named_object_weft_did_not_create_is_left_alone() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "default"));
    let mesh = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Mesh",
        "metadata": {"name": "default", "generation": 1}, "spec": {}});
    h.seed(MESH_PATH, &mesh);
    put(&mut h.writers.meshes, obj(mesh));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    let theirs = "/api/v1/namespaces/shop/configmaps/weft-proxy-config";
    h.seed(
        theirs,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"namespace": "shop", "name": "weft-proxy-config",
                         "labels": {"app": "someone-else"}},
            "data": {"theirs": "yes"}}),
    );
    h.clear();
    let nsobj = h
        .ctx
        .world
        .namespaces
        .get(&ObjectRef::new("shop"))
        .expect("namespace in the cache");
    let err = reconcile::reconcile(nsobj.clone(), h.ctx.clone())
        .await
        .expect_err("the reconcile reports the object");
    assert_eq!(err.reason(), "ObjectNotManagedByWeft");
    let writes = h.writes();
    assert!(
        writes.iter().all(|w| w.path != theirs),
        "their ConfigMap was written: {writes:#?}"
    );
    assert!(
        writes
            .iter()
            .any(|w| w.path.ends_with("/secrets/weft-identity-default")),
        "the rest is still written: {writes:#?}"
    );
    let kept: Value = h.stored(theirs).expect("still there");
    assert_eq!(kept["data"]["theirs"], "yes");
    reconcile::error_policy(nsobj, &err, h.ctx.clone());
    let mut note = String::new();
    for _ in 0..50 {
        if let Some(e) = h
            .events()
            .into_iter()
            .find(|e| e["reason"] == "ObjectNotManagedByWeft")
        {
            assert_eq!(e["type"], "Warning");
            note = e["note"].as_str().unwrap_or_default().to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        note.contains("ConfigMap shop/weft-proxy-config")
            && note.contains("weft did not create it"),
        "{note:?}"
    );
    let owned = h.mesh_condition("ObjectsOwned");
    assert_eq!(
        (&owned["status"], &owned["reason"]),
        (&json!("False"), &json!("ObjectNotManagedByWeft")),
        "{owned:#}"
    );
    assert!(
        owned["message"]
            .as_str()
            .is_some_and(|m| m.contains("ConfigMap shop/weft-proxy-config")),
        "{owned:#}"
    );

    // Its owner deletes it: weft creates its own, and the condition clears.
    h.fake.lock().expect("fake").objects.remove(theirs);
    h.reconcile("shop").await;
    let owned = h.mesh_condition("ObjectsOwned");
    assert_eq!(
        (&owned["status"], &owned["reason"]),
        (&json!("True"), &json!("AllOwned")),
        "{owned:#}"
    );
}

/// A new leader term starts with nothing compiled. Until its first
/// compile succeeds (a compiler panic, say), a reconcile must not read the
/// empty snapshot as "nothing is meshed" and delete every namespace's
/// config and identities: it writes nothing and comes back later.
#[tokio::test]
async fn before_a_terms_first_compile_a_reconcile_deletes_nothing() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.sync_children(&["shop"]);

    // The next term's context, before any compile succeeded.
    h.ctx
        .snapshot
        .store(Arc::new(reconcile::Snapshot::default()));
    h.clear();
    h.reconcile("shop").await;
    assert!(h.writes().is_empty(), "{:#?}", h.writes());

    driver::recompile(&h.ctx).await;
    h.assert_settled("shop").await;
}

/// A write that an admission policy refuses (here the RoleBinding) does
/// not stop the others: the identities are still issued and written, so
/// certificates keep being renewed, and the failure is still returned,
/// for the backoff and the Event.
#[tokio::test]
async fn a_refused_role_binding_does_not_stop_the_identities() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "cart"));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    let binding =
        "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings/weft-proxy-config-reader";
    h.fake
        .lock()
        .expect("fake")
        .refuse
        .insert(binding.into(), 403);
    let ns = h
        .ctx
        .world
        .namespaces
        .get(&ObjectRef::new("shop"))
        .expect("namespace in the cache");
    let result = reconcile::reconcile(ns, h.ctx.clone()).await;
    assert!(result.is_err(), "the refusal is reported");
    let written: Vec<String> = h.writes().into_iter().map(|s| s.path).collect();
    assert!(
        written.iter().any(|p| p == binding),
        "the binding was tried: {written:#?}"
    );
    for child in ["configmaps/weft-proxy-config", "secrets/weft-identity-cart"] {
        assert!(
            h.fake
                .lock()
                .expect("fake")
                .objects
                .contains_key(&format!("/api/v1/namespaces/shop/{child}")),
            "{child} written despite the refused binding: {written:#?}"
        );
    }
}

/// A namespace going away takes its gauges with it (no reconcile runs once
/// it is gone), and a replica that stops leading drops every namespace's:
/// an expiry time left behind would raise a certificate alert a day later.
#[tokio::test]
async fn gauges_go_with_their_namespace_and_with_the_lead() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.namespaces, namespace("web", true));
    put(&mut h.writers.service_accounts, account("shop", "cart"));
    put(&mut h.writers.service_accounts, account("web", "front"));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.reconcile("web").await;
    let expiry = |ns: &str| format!("certificate_expiry_timestamp_seconds{{namespace=\"{ns}\"}}");
    let m = h.ctx.metrics.render();
    assert!(
        m.contains(&expiry("shop")) && m.contains(&expiry("web")),
        "{m}"
    );

    let mut leaving = namespace("shop", true);
    leaving.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-01T00:00:00Z".parse().expect("a time"),
        ));
    put(&mut h.writers.namespaces, leaving);
    h.reconcile("shop").await;
    let m = h.ctx.metrics.render();
    assert!(
        !m.contains(&expiry("shop")) && m.contains(&expiry("web")),
        "{m}"
    );

    h.ctx.metrics.leading(false);
    let m = h.ctx.metrics.render();
    assert!(!m.contains(&expiry("web")), "{m}");
}

#[tokio::test]
async fn an_unlabelled_namespace_is_pruned() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "default"));
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
    assert_eq!(
        deleted,
        [
            "configmaps",
            "configmaps",
            "rolebindings",
            "roles",
            "secrets"
        ]
    );
}

/// The Secret that held every ServiceAccount's keys (before there was one
/// per account) is deleted: any pod that mounted it could read them all.
/// A deleted account's Secret goes with it; the others stay untouched.
#[tokio::test]
async fn the_secret_holding_every_accounts_keys_is_deleted_and_a_deleted_accounts_goes() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    let cart = account("shop", "cart");
    put(&mut h.writers.service_accounts, cart.clone());
    put(&mut h.writers.service_accounts, account("shop", "default"));
    let shared = "/api/v1/namespaces/shop/secrets/weft-identity";
    let old = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-identity", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "weft"}},
        "data": {"ca.crt": b64("bundle"), "cart.key": b64("k1"), "default.key": b64("k2")}});
    h.seed(shared, &old);
    put(&mut h.writers.secrets, obj(old));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    let deleted: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|w| w.method == Method::DELETE)
        .map(|w| w.path)
        .collect();
    assert_eq!(deleted, [shared]);
    assert!(h.stored::<Secret>(shared).is_none());

    h.sync_children(&["shop"]);
    remove(
        &mut h.writers.secrets,
        obj(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-identity", "namespace": "shop"}})),
    );
    h.assert_settled("shop").await;

    remove(&mut h.writers.service_accounts, cart);
    h.clear();
    h.reconcile("shop").await;
    let writes: Vec<(Method, String)> =
        h.writes().into_iter().map(|w| (w.method, w.path)).collect();
    assert_eq!(
        writes,
        [(
            Method::DELETE,
            "/api/v1/namespaces/shop/secrets/weft-identity-cart".to_owned()
        )]
    );
}

/// Issue 18, item 8, for the operator: with every target at TRACE (kube
/// and hyper included), creating the mesh CA, issuing, keeping and
/// deleting workload identities, and failing to write one, log no piece
/// of any key it handled.
#[tokio::test(flavor = "current_thread")]
async fn the_operator_logs_no_key_at_trace_creating_the_ca_and_issuing_identities() {
    let (captured, _guard) = logs::Captured::at_trace();
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    let cart = account("shop", "cart");
    put(&mut h.writers.service_accounts, cart.clone());
    put(&mut h.writers.service_accounts, account("shop", "default"));
    put(&mut h.writers.service_accounts, account("shop", "refused"));
    h.fake.lock().expect("fake").refuse.insert(
        "/api/v1/namespaces/shop/secrets/weft-identity-refused".into(),
        422,
    );
    // Nothing holds certificates yet: the operator creates the CA.
    ca::ensure(&h.ctx).await.expect("ensure");
    driver::recompile(&h.ctx).await;
    let ns = h
        .ctx
        .world
        .namespaces
        .get(&ObjectRef::new("shop"))
        .expect("namespace");
    let err = reconcile::reconcile(ns.clone(), h.ctx.clone())
        .await
        .expect_err("the refused Secret is reported");
    reconcile::error_policy(ns, &err, h.ctx.clone());
    h.fake.lock().expect("fake").refuse.clear();
    h.sync_children(&["shop"]);
    h.reconcile("shop").await;
    remove(&mut h.writers.service_accounts, cart);
    h.reconcile("shop").await;
    // Let the detached Event writes finish, so their lines are in too.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let decoded = |v: &Value| {
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("base64"))
                .expect("decodes"),
        )
        .expect("pem")
    };
    let ca: Value = h.stored(CA_PATH).expect("the CA was created");
    let mut keys = vec![decoded(&ca["data"]["ca.key"])];
    for sa in ["cart", "default"] {
        let issued = h
            .fake
            .lock()
            .expect("fake")
            .seen
            .iter()
            .filter(|w| w.path.ends_with(&format!("/secrets/weft-identity-{sa}")))
            .filter_map(|w| w.body["data"].get("tls.key").map(decoded))
            .collect::<Vec<_>>();
        assert!(!issued.is_empty(), "{sa}'s key was written");
        keys.extend(issued);
    }
    let log = captured.text();
    assert!(
        log.contains("issued workload certificates"),
        "the run logged its work: {log}"
    );
    logs::assert_no_key("the operator", &log, &keys);
}

/// A tenant's own Secret named like a workload identity (no managed-by
/// label) is never written: no workload key ends up in an object weft does
/// not own. Nor is a Secret weft cannot read back (the GET fails): nothing
/// says it is weft's.
#[tokio::test]
async fn a_tenants_secret_named_like_an_identity_gets_no_key() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "cart"));
    put(&mut h.writers.service_accounts, account("shop", "web"));
    let theirs = "/api/v1/namespaces/shop/secrets/weft-identity-cart";
    h.seed(
        theirs,
        &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"namespace": "shop", "name": "weft-identity-cart"},
            "data": {"mine": b64("tenant data")}}),
    );
    let unreadable = "/api/v1/namespaces/shop/secrets/weft-identity-web";
    h.fake
        .lock()
        .expect("fake")
        .refuse_reads
        .insert(unreadable.into(), 500);
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    let err = h.reconcile_err("shop").await;
    assert_eq!(err.reason(), "ObjectNotManagedByWeft", "{err}");
    let writes = h.writes();
    assert!(
        writes
            .iter()
            .all(|w| w.path != theirs && w.path != unreadable),
        "{writes:#?}"
    );
    let kept: Value = h.stored(theirs).expect("still there");
    assert_eq!(kept["data"], json!({"mine": b64("tenant data")}));
    assert!(kept["metadata"].get("labels").is_none());
}

/// The Secret that held every account's keys stays while a pod still
/// mounts it (its proxy reads it until the pod restarts), and goes once
/// none does. A Secret whose ServiceAccount the cache no longer has, but
/// the API server still does (a cache behind, as a new leader's can be),
/// is not deleted.
#[tokio::test]
async fn identities_in_use_are_not_pruned_on_a_stale_view() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "default"));
    let shared = "/api/v1/namespaces/shop/secrets/weft-identity";
    let old = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-identity", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "weft"}},
        "data": {"ca.crt": b64("bundle"), "default.key": b64("k")}});
    h.seed(shared, &old);
    put(&mut h.writers.secrets, obj(old));
    let mut pod: Pod = obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "cart-0"},
        "spec": {"containers": [{"name": "app", "image": "cart"}],
                 "volumes": [{"name": "weft-identity",
                              "secret": {"secretName": "weft-identity", "items": [{"key": "default.crt", "path": "default.crt"}]}}]},
        "status": {"phase": "Running", "podIP": "10.244.0.7"}}));
    // As the operator's pod cache holds it.
    weft::operator::world::prune_pod(&mut pod);
    put(&mut h.writers.pods, pod.clone());
    // `cart`'s Secret, whose account the cache does not show yet.
    let cart = "/api/v1/namespaces/shop/secrets/weft-identity-cart";
    let cart_secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-identity-cart", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "weft"},
                     "annotations": {"weft.dev/service-account": "cart"}},
        "data": {"ca.crt": b64("bundle")}});
    h.seed(cart, &cart_secret);
    put(&mut h.writers.secrets, obj(cart_secret));
    h.seed(
        "/api/v1/namespaces/shop/serviceaccounts/cart",
        &account("shop", "cart"),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    let deleted: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|w| w.method == Method::DELETE)
        .map(|w| w.path)
        .collect();
    assert!(deleted.is_empty(), "{deleted:?}");

    remove(&mut h.writers.pods, pod);
    h.fake
        .lock()
        .expect("fake")
        .objects
        .remove("/api/v1/namespaces/shop/serviceaccounts/cart");
    h.clear();
    h.reconcile("shop").await;
    let mut deleted: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|w| w.method == Method::DELETE)
        .map(|w| w.path)
        .collect();
    deleted.sort();
    assert_eq!(deleted, [shared, cart]);
}

/// When renewals cannot be written, the certificate-expiry gauge keeps
/// showing what the pods hold, so the alert on it fires; it never goes
/// away because writing failed.
#[tokio::test]
async fn a_failed_renewal_keeps_the_expiry_gauge() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "cart"));
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.sync_children(&["shop"]);
    let gauge = |h: &Harness| {
        h.ctx
            .metrics
            .render()
            .lines()
            .find(|l| l.contains("certificate_expiry_timestamp_seconds{namespace=\"shop\"}"))
            .map(str::to_owned)
    };
    let before = gauge(&h).expect("the gauge after issuing");

    // Another CA: every certificate needs re-issuing, and the writes fail.
    h.with_ca().await;
    h.fake.lock().expect("fake").refuse.insert(
        "/api/v1/namespaces/shop/secrets/weft-identity-cart".into(),
        500,
    );
    h.reconcile_err("shop").await;
    assert_eq!(gauge(&h), Some(before), "the stored certificate's expiry");
}

/// An EndpointSlice of Service `ns/svc` holding `ips` (ready pods).
fn slice(ns: &str, svc: &str, name: &str, ips: &[&str]) -> EndpointSlice {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    obj(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
        "endpoints": endpoints}),
    )
}

/// The endpoints document a namespace holds, as the fake stores it.
fn published(h: &Harness, ns: &str) -> Option<weft::config::EndpointsConfig> {
    let cm: ConfigMap = h.stored(&format!(
        "/api/v1/namespaces/{ns}/configmaps/weft-endpoints"
    ))?;
    let json = cm.data?.remove("endpoints.json")?;
    Some(weft::config::EndpointsConfig::from_bytes(json.as_bytes()).expect("endpoints"))
}

/// Issue 19: a burst of pod changes (a rollout of inventory moving its
/// pods) costs one write per namespace that calls inventory, per batch;
/// a namespace that does not call it, and a batch that changed nothing,
/// cost none.
#[tokio::test]
async fn a_burst_of_slice_changes_is_one_write_per_calling_namespace() {
    let mut h = harness().await;
    for ns in ["shop", "payments"] {
        put(&mut h.writers.namespaces, namespace(ns, true));
    }
    put(&mut h.writers.namespaces, namespace("legacy", false));
    put(
        &mut h.writers.services,
        service("shop", "inventory", "10.96.0.10"),
    );
    put(
        &mut h.writers.endpoint_slices,
        slice("shop", "inventory", "inventory-1", &["10.244.0.1"]),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    for ns in ["shop", "payments"] {
        h.reconcile(ns).await;
        let e = published(&h, ns).expect("published");
        let only = &e.services["inventory.shop"].groups[0].endpoints;
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].addresses, ["10.244.0.1"]);
    }
    h.sync_children(&["shop", "payments"]);
    let (changes, _one, _all) = h.compile_loop();
    h.clear();

    // Twenty pod changes in a burst, each a slice event.
    for i in 2..=21 {
        let ips: Vec<String> = (1..=i).map(|n| format!("10.244.0.{n}")).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        put(
            &mut h.writers.endpoint_slices,
            slice("shop", "inventory", "inventory-1", &ips),
        );
        changes
            .send(Change::Endpoints("shop".into(), "inventory".into()))
            .expect("send");
    }
    let mut writes = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        writes = h.writes();
        if writes.len() >= 2 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut paths: Vec<String> = h.writes().into_iter().map(|w| w.path).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/payments/configmaps/weft-endpoints",
            "/api/v1/namespaces/shop/configmaps/weft-endpoints",
        ],
        "{writes:#?}"
    );
    for ns in ["shop", "payments"] {
        let e = published(&h, ns).expect("published");
        assert_eq!(e.services["inventory.shop"].groups[0].endpoints.len(), 21);
    }

    // The watch delivers what was written; a slice event that changed
    // nothing the proxies see writes nothing.
    h.sync_children(&["shop", "payments"]);
    h.clear();
    changes
        .send(Change::Endpoints("shop".into(), "inventory".into()))
        .expect("send");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(h.writes().is_empty(), "{:#?}", h.writes());
}

/// A deleted Service's endpoints leave every namespace's document.
#[tokio::test]
async fn a_deleted_service_takes_its_endpoints_with_it() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    let inventory = service("shop", "inventory", "10.96.0.10");
    put(&mut h.writers.services, inventory.clone());
    put(
        &mut h.writers.services,
        service("shop", "cart", "10.96.0.11"),
    );
    put(
        &mut h.writers.endpoint_slices,
        slice("shop", "inventory", "inventory-1", &["10.244.0.1"]),
    );
    put(
        &mut h.writers.endpoint_slices,
        slice("shop", "cart", "cart-1", &["10.244.0.2"]),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    let before = published(&h, "shop").expect("published");
    assert_eq!(
        before.services.keys().collect::<Vec<_>>(),
        ["cart.shop", "inventory.shop"]
    );
    h.sync_children(&["shop"]);

    // Service gone (its slices linger until the garbage collector runs).
    remove(&mut h.writers.services, inventory);
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    let after = published(&h, "shop").expect("published");
    assert_eq!(after.services.keys().collect::<Vec<_>>(), ["cart.shop"]);
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
const MESH_PATH: &str = "/apis/weft.dev/v1alpha1/meshes/default";

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
    put(&mut h.writers.service_accounts, account("shop", "default"));
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
        .stored("/api/v1/namespaces/shop/secrets/weft-identity-default")
        .expect("identity");
    let bundle = &identity.data.expect("data")["ca.crt"];
    assert_eq!(String::from_utf8_lossy(&bundle.0), ca.trust_bundle());
}

#[tokio::test]
async fn a_lost_ca_is_reported_not_regenerated() {
    let mut h = harness().await;
    let identity: Secret = obj(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weft-identity-default", "namespace": "shop",
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

const PAYMENTS_POLICY: &str = "/apis/weft.dev/v1alpha1/namespaces/payments/mtlspolicies/payments";
const PAYMENTS_POD_IP: &str = "10.1.0.1";
/// legacy/cron-0, a pod without the sidecar.
const LEGACY_POD_IP: &str = "10.9.9.9";

/// Namespace `payments` with one meshed pod, a Service, and a staged
/// Strict MTLSPolicy whose status is `status` (in the caches and in the
/// fake), compiled once.
async fn payments_rollout(status: Value) -> Harness {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("payments", true));
    put(
        &mut h.writers.service_accounts,
        account("payments", "default"),
    );
    put(
        &mut h.writers.services,
        service("payments", "payments", "10.0.0.30"),
    );
    let policy: MTLSPolicy = obj(
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": {"namespace": "payments", "name": "payments", "generation": 1},
        "spec": {"mode": "Strict", "rollout": {"strategy": "Staged", "observationWindow": "10m"}},
        "status": status}),
    );
    h.seed(PAYMENTS_POLICY, &policy);
    put(&mut h.writers.mtls_policies, policy);
    let pod: Pod = obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "payments", "name": "payments-0"},
        "spec": {"containers": [{"name": "app", "image": "payments"},
                                {"name": "weft-proxy", "image": "weft"}]},
        "status": {"phase": "Running", "podIP": PAYMENTS_POD_IP}}));
    put(&mut h.writers.pods, pod);
    // A pod of the cluster without the sidecar, which speaks plaintext in
    // some tests (an address no pod holds never blocks the rollout).
    let legacy: Pod = obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "legacy", "name": "cron-0"},
        "spec": {"containers": [{"name": "app", "image": "cron"}]},
        "status": {"phase": "Running", "podIP": LEGACY_POD_IP}}));
    put(&mut h.writers.pods, legacy);
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h
}

impl Harness {
    /// The payments proxy reports the namespace's current config, trust
    /// bundle and identity, and `plaintext` connections so far from
    /// 10.9.9.9 (legacy/cron-0) to port 8080.
    fn payments_proxy_reports(&self, generation: &str, plaintext: u64) {
        self.payments_proxy_reports_refusals(generation, plaintext, &[]);
    }

    /// As [`Self::payments_proxy_reports`], plus plaintext connections to
    /// port 8080 refused under STRICT so far, by source address.
    fn payments_proxy_reports_refusals(
        &self,
        generation: &str,
        plaintext: u64,
        refused: &[(&str, u64)],
    ) {
        let bundle = match self.ctx.ca.load().as_ref() {
            CaState::Ready(ca) => weft::identity::bundle_hash(&ca.bundle),
            _ => panic!("no CA"),
        };
        let text = format!(
            "weft_proxy_config_generation{{generation=\"{generation}\"}} 1\n\
             weft_proxy_trust_bundle{{hash=\"{bundle}\"}} 1\n\
             weft_proxy_certificate_expiry_timestamp_seconds 1.9e9\n\
             weft_proxy_inbound_plaintext_connections_total{{port=\"8080\",src_addr=\"10.9.9.9\"}} {plaintext}\n"
        );
        let mut text = text;
        for (src, n) in refused {
            text.push_str(&format!(
                "weft_proxy_inbound_plaintext_rejected_total{{port=\"8080\",src_addr=\"{src}\"}} {n}\n"
            ));
        }
        self.scraper
            .0
            .lock()
            .expect("table")
            .insert(PAYMENTS_POD_IP.parse().expect("ip"), text);
    }

    fn compiled_generation(&self, ns: &str) -> String {
        self.ctx.snapshot.load().compiled.configs[ns]
            .generation
            .clone()
    }

    /// The watch delivers the payments policy as the fake holds it.
    fn sync_payments_policy(&mut self) {
        let p: MTLSPolicy = self.stored(PAYMENTS_POLICY).expect("stored policy");
        put(&mut self.writers.mtls_policies, p);
    }

    /// The payments policy statuses written since the last `clear`.
    fn payments_statuses(&self) -> Vec<Value> {
        self.writes()
            .into_iter()
            .filter(|s| s.path == format!("{PAYMENTS_POLICY}/status"))
            .map(|s| s.body["status"].clone())
            .collect()
    }

    /// The one status write to payments' MTLSPolicy since the last clear.
    fn the_payments_status(&self) -> Value {
        let mut st = self.payments_statuses();
        assert_eq!(st.len(), 1, "exactly one status write: {st:#?}");
        st.remove(0)
    }
}

/// [`payments_rollout`] from Preparing, its proxy reporting `plaintext`
/// connections so far, reconciled once (the window opens); and the
/// compiled generation.
async fn payments_window_opened(plaintext: u64) -> (Harness, String) {
    let h = payments_rollout(
        json!({"phase": "Preparing", "phaseSince": "2020-01-01T00:00:00Z",
            "observedGeneration": 1}),
    )
    .await;
    let generation = h.compiled_generation("payments");
    h.payments_proxy_reports(&generation, plaintext);
    h.reconcile("payments").await;
    (h, generation)
}

fn rollout_reason(status: &Value) -> String {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "RolloutComplete")
        .and_then(|c| c["reason"].as_str())
        .expect("a RolloutComplete condition")
        .to_owned()
}

/// Plaintext that arrives between the reconcile that opens the observation
/// window and the next one is plaintext inside the window: it must stop
/// it. (The baseline is the counters read by the reconcile that opened the
/// window, not those of the first look after.)
#[tokio::test]
async fn plaintext_right_after_the_window_opens_is_seen() {
    let (mut h, generation) = payments_window_opened(5).await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Observing");
    assert_eq!(rollout_reason(&st), "Observing");
    h.sync_payments_policy();

    // Two more plaintext connections before the next look.
    h.payments_proxy_reports(&generation, 7);
    h.clear();
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Observing");
    assert_eq!(rollout_reason(&st), "PlaintextSeen", "{:#}", st);
    assert!(st["blockers"].to_string().contains("10.9.9.9"), "{:#}", st);
}

/// A CA that cannot be used for a while (a rotation that does not add
/// up, `weft-ca` unreadable) mints nothing and leaves every Secret as it
/// is: a rollout under way goes on judging the proxies against the bundle
/// those Secrets carry, instead of reading every proxy as distrusting the
/// CA and starting over from Preparing.
#[tokio::test]
async fn a_rollout_keeps_its_phase_while_the_ca_cannot_be_used() {
    let (mut h, _) = payments_window_opened(0).await;
    assert_eq!(h.the_payments_status()["phase"], "Observing");
    h.sync_payments_policy();
    h.sync_children(&["payments"]);
    h.ctx.ca.store(Arc::new(CaState::Missing {
        reason: "RotationInconsistent",
        message: "weft-ca holds another root".into(),
    }));
    h.clear();
    h.reconcile("payments").await;
    let statuses = h.payments_statuses();
    assert!(
        statuses.iter().all(|st| st["phase"] == "Observing"),
        "{statuses:#?}"
    );
    assert!(
        !h.writes().iter().any(|w| w.path.contains("/secrets/")),
        "nothing minted: {:#?}",
        h.writes()
    );
}

/// A replica that starts (or takes over) holds no counters from the
/// window's start: it must not trust `phaseSince` and pass the gate, but
/// start the window again and say why.
#[tokio::test]
async fn an_operator_without_counters_from_the_window_start_restarts_the_window() {
    let h = payments_rollout(
        json!({"phase": "Observing", "phaseSince": "2020-01-01T00:00:00Z",
        "observedGeneration": 1}),
    )
    .await;
    let generation = h.compiled_generation("payments");
    h.payments_proxy_reports(&generation, 3);
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Observing", "{:#}", st);
    assert_eq!(rollout_reason(&st), "ObservationRestarted");
    assert_ne!(st["phaseSince"], "2020-01-01T00:00:00Z");
    let events = h.events();
    assert!(
        events.iter().any(|e| e["reason"] == "ObservationRestarted"),
        "{events:#?}"
    );
}

/// Enforcing -> Strict needs every client to run the config that expects
/// Strict; a compile that read the policy before it reached Enforcing made
/// configs that do not, so clients running "the compiled generation" do
/// not pass the gate until the recompile.
#[tokio::test]
async fn strict_waits_for_the_compile_that_read_enforcing() {
    let mut h = payments_rollout(
        json!({"phase": "Observing", "phaseSince": "2020-01-01T00:00:00Z",
        "observedGeneration": 1}),
    )
    .await;
    let before = h.compiled_generation("payments");
    // The policy reached Enforcing; the compile of that is still to come.
    let mut policy: MTLSPolicy = h.stored(PAYMENTS_POLICY).expect("policy");
    if let Some(s) = policy.status.as_mut() {
        s.phase = Some(weft::api::RolloutPhase::Enforcing);
    }
    h.seed(PAYMENTS_POLICY, &policy);
    put(&mut h.writers.mtls_policies, policy);
    h.payments_proxy_reports(&before, 0);
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Enforcing", "{:#}", st);
    assert_eq!(rollout_reason(&st), "WaitingForCompile");
    assert!(
        st["blockers"]
            .to_string()
            .contains("waiting for the config that expects Strict to be compiled"),
        "{:#}",
        st
    );
    h.sync_payments_policy();

    // The recompile tells clients to expect Strict: a new generation, which
    // the client proxy does not run yet.
    driver::recompile(&h.ctx).await;
    let after = h.compiled_generation("payments");
    assert_ne!(before, after);
    h.clear();
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Enforcing");
    assert_eq!(rollout_reason(&st), "WaitingForClients");
    h.sync_payments_policy();

    h.payments_proxy_reports(&after, 0);
    h.clear();
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Strict");
}

/// Plaintext that keeps coming from the same source restarts nothing a
/// user reads after the first look: one status write and one Event, not
/// one of each per look.
#[tokio::test]
async fn persisting_plaintext_is_one_status_write_and_one_event() {
    let mut h = payments_rollout(
        json!({"phase": "Preparing", "phaseSince": "2020-01-01T00:00:00Z",
        "observedGeneration": 1}),
    )
    .await;
    let generation = h.compiled_generation("payments");
    h.payments_proxy_reports(&generation, 0);
    h.reconcile("payments").await;
    h.sync_payments_policy();
    h.clear();
    let mut plaintext = 0;
    let mut statuses = Vec::new();
    let mut events = Vec::new();
    for _ in 0..4 {
        plaintext += 25;
        h.payments_proxy_reports(&generation, plaintext);
        h.reconcile("payments").await;
        h.sync_payments_policy();
        statuses.extend(h.payments_statuses());
        events.extend(h.events());
        h.clear();
    }
    assert_eq!(statuses.len(), 1, "{statuses:#?}");
    assert_eq!(rollout_reason(&statuses[0]), "PlaintextSeen");
    let plaintext_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "PlaintextSeen")
        .collect();
    assert_eq!(plaintext_events.len(), 1, "{events:#?}");
    assert_eq!(plaintext_events[0]["type"], "Warning");
    assert!(
        plaintext_events[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("10.9.9.9")),
        "{:#}",
        plaintext_events[0]
    );

    // The source stops: the window starts at the first look without it.
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(rollout_reason(&st), "Observing");
}

/// A compiler panic is a bug, but it must not freeze the operator: it is
/// counted, and the compile loop keeps going and retries, so the namespace
/// still gets reconciled once a compile succeeds.
#[tokio::test]
async fn a_compiler_panic_is_counted_and_the_compile_is_retried() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let h = harness_compiling_with(Arc::new(move |facts| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("a compiler bug");
        }
        weft::compile::compile(facts)
    }))
    .await;
    let mut h = h;
    put(&mut h.writers.namespaces, namespace("shop", true));
    let (changes_tx, mut one, _all) = h.compile_loop();
    changes_tx.send(Change::Inputs).expect("send");
    let r = tokio::time::timeout(Duration::from_secs(10), one.recv())
        .await
        .expect("the loop survived the panic and compiled again")
        .expect("open");
    assert_eq!(r.name, "shop");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let metrics = h.ctx.metrics.render();
    assert!(
        metrics.contains("weft_operator_compile_errors_total{reason=\"CompilerPanicked\"} 1"),
        "{metrics}"
    );
    assert!(h.ctx.snapshot.load().compiled.configs.contains_key("shop"));
}

/// Once the lease is lost nothing the leader started writes any more: the
/// compile loop, the CA watch and the controller stop with it. A policy
/// edit arriving afterwards gets no status write from this replica.
#[tokio::test]
async fn after_the_lease_is_lost_nothing_writes() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(
        &mut h.writers.services,
        service("shop", "inventory", "10.0.0.10"),
    );
    let path = "/apis/weft.dev/v1alpha1/namespaces/shop/trafficpolicies/inventory";
    let tp = traffic_policy("shop", "inventory", "2s", 1);
    h.seed(path, &tp);
    put(&mut h.writers.traffic_policies, tp);

    let (changes_tx, changes) = mpsc::unbounded_channel();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let leading = tokio::spawn(weft::operator::lead(
        h.ctx.clone(),
        changes,
        changes_tx.clone(),
        2,
        async move {
            let _ = lost_rx.await;
        },
        std::future::pending(),
    ));
    // Leading: the policy's status is written.
    let status_path = format!("{path}/status");
    let mut written = false;
    for _ in 0..100 {
        if h.writes().iter().any(|s| s.path == status_path) {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written, "{:#?}", h.writes());
    // The compile loop runs: an edit is written while leading.
    put(
        &mut h.writers.traffic_policies,
        traffic_policy("shop", "inventory", "3s", 2),
    );
    h.clear();
    changes_tx
        .send(Change::Inputs)
        .expect("the compile loop runs");
    let mut rewritten = false;
    for _ in 0..100 {
        if h.writes().iter().any(|s| s.path == status_path) {
            rewritten = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rewritten, "{:#?}", h.writes());

    lost_tx.send(()).expect("lost");
    let ended = tokio::time::timeout(Duration::from_secs(5), leading)
        .await
        .expect("lead stops promptly")
        .expect("join");
    assert_eq!(ended, weft::operator::Ended::Lost);

    h.clear();
    put(
        &mut h.writers.traffic_policies,
        traffic_policy("shop", "inventory", "4s", 3),
    );
    // Whoever still listens would compile and write this status.
    let _ = changes_tx.send(Change::Inputs);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(h.writes().is_empty(), "{:#?}", h.writes());
}

/// A policy whose condition turns False gets one Warning Event naming the
/// condition, once: not again on the next compile that finds the same, and
/// a Normal one when it recovers.
#[tokio::test]
async fn a_condition_change_is_announced_once_on_the_policy() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    let path = "/apis/weft.dev/v1alpha1/namespaces/shop/trafficpolicies/inventory";
    // Its target Service does not exist (yet).
    let tp = traffic_policy("shop", "inventory", "2s", 1);
    h.seed(path, &tp);
    put(&mut h.writers.traffic_policies, tp);
    driver::recompile(&h.ctx).await;
    assert_eq!(driver::write_policy_statuses(&h.ctx).await, 0);
    let events = h.events();
    let on_policy: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["regarding"]["kind"] == "TrafficPolicy" && e["regarding"]["name"] == "inventory"
        })
        .collect();
    assert!(!on_policy.is_empty(), "{events:#?}");
    assert!(
        on_policy.iter().all(|e| e["type"] == "Warning"),
        "{on_policy:#?}"
    );
    assert!(
        on_policy.iter().any(|e| e["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("ResolvedRefs is False"))),
        "{on_policy:#?}"
    );
    let first = on_policy.len();
    let types: std::collections::BTreeSet<String> = on_policy
        .iter()
        .filter_map(|e| e["note"].as_str()?.split(' ').next().map(str::to_owned))
        .collect();
    assert_eq!(
        types.len(),
        first,
        "one Event per condition: {on_policy:#?}"
    );

    // The watch delivers the status; the next compile finds the same.
    let stored: TrafficPolicy = h.stored(path).expect("stored");
    put(&mut h.writers.traffic_policies, stored);
    h.clear();
    driver::recompile(&h.ctx).await;
    driver::write_policy_statuses(&h.ctx).await;
    assert!(h.events().is_empty(), "{:#?}", h.events());

    // The Service appears: the recovery is announced, as Normal.
    put(
        &mut h.writers.services,
        service("shop", "inventory", "10.0.0.10"),
    );
    driver::recompile(&h.ctx).await;
    driver::write_policy_statuses(&h.ctx).await;
    let events = h.events();
    assert!(
        events.iter().any(|e| e["type"] == "Normal"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("ResolvedRefs is True"))),
        "{events:#?}"
    );
}

/// Anyone who can reach payments could otherwise switch its mTLS off by
/// knocking: refused plaintext from a pod without the sidecar or from an
/// address no pod holds keeps Strict, and is named in the status; only a
/// burst from meshed pods (clients the flip broke) rolls back.
#[tokio::test]
async fn plaintext_knocking_from_an_unknown_pod_does_not_roll_back_strict() {
    let mut h = payments_rollout(
        json!({"phase": "Strict", "phaseSince": "2020-01-01T00:00:00Z",
        "observedGeneration": 1}),
    )
    .await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    let meshed: Pod = obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "checkout-0",
                     "annotations": {"weft.dev/injection-hash": "h"}},
        "spec": {"containers": [{"name": "app", "image": "checkout"},
                                {"name": "weft-proxy", "image": "weft"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.7"}}));
    put(&mut h.writers.pods, meshed);
    // A pod that names a container weft-proxy itself (the webhook leaves
    // such a pod alone): not a meshed client.
    let crafted: Pod = obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "tools", "name": "knock-0"},
        "spec": {"containers": [{"name": "app", "image": "curl"},
                                {"name": "weft-proxy", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.8"}}));
    put(&mut h.writers.pods, crafted);
    let generation = h.compiled_generation("payments");
    let strangers = |n: u64| [(LEGACY_POD_IP, n), ("192.0.2.44", n), ("10.1.0.8", n)];
    h.payments_proxy_reports_refusals(&generation, 0, &strangers(0));
    h.reconcile("payments").await;
    h.sync_payments_policy();
    h.clear();
    // Far above the threshold of 10 within the window.
    h.payments_proxy_reports_refusals(&generation, 0, &strangers(500));
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "Strict", "{st:#}");
    let message = st["conditions"].to_string();
    assert!(
        message.contains("10.9.9.9 (pod legacy/cron-0)")
            && message.contains("192.0.2.44 (not a pod of the cluster)")
            && message.contains("10.1.0.8 (pod tools/knock-0)"),
        "the refused sources are named: {st:#}"
    );
    h.sync_payments_policy();
    h.clear();

    // A meshed client refused: the flip broke the mesh, back to Permissive.
    let mut refused = strangers(500).to_vec();
    refused.push(("10.1.0.7", 12));
    h.payments_proxy_reports_refusals(&generation, 0, &refused);
    h.reconcile("payments").await;
    let st = h.the_payments_status();
    assert_eq!(st["phase"], "RolledBack", "{st:#}");
    assert!(
        st["blockers"]
            .to_string()
            .contains("10.1.0.7 (pod shop/checkout-0, meshed)"),
        "{st:#}"
    );
}

/// A namespace that declares what it calls (`weft.dev/calls`) gets only
/// those Services' endpoints, and a slice change of a Service it does not
/// call writes nothing there; an annotation that does not parse keeps
/// every Service and says why on the Namespace.
#[tokio::test]
async fn a_scoped_namespace_gets_only_the_endpoints_it_calls() {
    let mut h = harness().await;
    let scoped = |value: &str| {
        let mut ns = namespace("payments", true);
        ns.metadata.annotations =
            Some([(weft::compile::CALLS_ANNOTATION.to_owned(), value.to_owned())].into());
        ns
    };
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.namespaces, scoped("shop/inventory"));
    for (name, ip, pod_ip) in [
        ("inventory", "10.96.0.10", "10.244.0.1"),
        ("cart", "10.96.0.11", "10.244.0.2"),
    ] {
        put(&mut h.writers.services, service("shop", name, ip));
        put(
            &mut h.writers.endpoint_slices,
            slice("shop", name, &format!("{name}-1"), &[pod_ip]),
        );
    }
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    for ns in ["shop", "payments"] {
        h.reconcile(ns).await;
    }
    let keys = |h: &Harness, ns: &str| -> Vec<String> {
        published(h, ns)
            .expect("published")
            .services
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(keys(&h, "shop"), ["cart.shop", "inventory.shop"]);
    assert_eq!(
        keys(&h, "payments"),
        ["inventory.shop"],
        "what it calls only"
    );
    h.sync_children(&["shop", "payments"]);
    let (changes, _one, _all) = h.compile_loop();
    h.clear();

    // cart's pods move: only shop, which calls cart, is written.
    put(
        &mut h.writers.endpoint_slices,
        slice("shop", "cart", "cart-1", &["10.244.0.2", "10.244.0.3"]),
    );
    changes
        .send(Change::Endpoints("shop".into(), "cart".into()))
        .expect("send");
    assert_eq!(
        h.batch_writes().await,
        ["/api/v1/namespaces/shop/configmaps/weft-endpoints"],
        "payments does not call cart"
    );

    // A typo: every Service again, and a Warning on the Namespace.
    put(&mut h.writers.namespaces, scoped("shop/Inventory"));
    driver::recompile(&h.ctx).await;
    h.reconcile("payments").await;
    assert_eq!(keys(&h, "payments"), ["cart.shop", "inventory.shop"]);
    // Told once per value, not on every reconcile (each endpoints write
    // brings one): no further Event request, not even a series update.
    let event_requests = |h: &Harness| {
        h.seen()
            .iter()
            .filter(|s| s.path.contains("/events"))
            .count()
    };
    let told = event_requests(&h);
    h.reconcile("payments").await;
    assert_eq!(event_requests(&h), told, "told again");
    let events = h.events();
    assert!(
        events.iter().any(|e| e["reason"] == "InvalidScope"
            && e["type"] == "Warning"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("\"shop/Inventory\""))),
        "{events:#?}"
    );
}

/// The ConfigMap watch lags the operator's own writes: a batch right
/// behind the one that wrote a namespace's endpoints, with nothing new,
/// does not write the same document again; an edit the cache does show
/// is set right.
#[tokio::test]
async fn a_lagging_watch_does_not_make_the_same_endpoints_write_twice() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(
        &mut h.writers.services,
        service("shop", "inventory", "10.96.0.10"),
    );
    put(
        &mut h.writers.endpoint_slices,
        slice("shop", "inventory", "inventory-1", &["10.244.0.1"]),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.sync_children(&["shop"]);
    h.clear();
    let config = h.ctx.snapshot.load().compiled.configs["shop"].clone();
    let ns = h
        .ctx
        .world
        .namespaces
        .get(&ObjectRef::new("shop"))
        .expect("cached");
    // A pod moves: written once.
    put(
        &mut h.writers.endpoint_slices,
        slice("shop", "inventory", "inventory-1", &["10.244.0.2"]),
    );
    let slices_now = weft::operator::endpoints::index(&h.ctx.world);
    for _ in 0..3 {
        reconcile::apply_endpoints_from(&h.ctx, &ns, &config, &slices_now)
            .await
            .expect("apply");
    }
    assert_eq!(
        h.writes().len(),
        1,
        "once, the cache lagging: {:#?}",
        h.writes()
    );
    // The cache shows someone's older document (not the one it held
    // when the operator wrote): set right.
    h.sync_children(&["shop"]);
    h.clear();
    let mut edited: ConfigMap = h
        .stored("/api/v1/namespaces/shop/configmaps/weft-endpoints")
        .expect("stored");
    edited
        .annotations_mut()
        .insert("weft.dev/config-generation".into(), "someone-else".into());
    edited.data = Some([("endpoints.json".to_owned(), "{}".to_owned())].into());
    put(&mut h.writers.config_maps, edited);
    reconcile::apply_endpoints_from(&h.ctx, &ns, &config, &slices_now)
        .await
        .expect("apply");
    assert_eq!(h.writes().len(), 1, "the edit is set right");
}

/// An ExternalService `bank` in `shop` whose port 80 presents client
/// certificate Secret `secret` (none: no client certificate).
fn bank(secret: Option<&str>) -> weft::api::ExternalService {
    let mut tls = json!({});
    if let Some(s) = secret {
        tls["clientCertificate"] = json!({"secretName": s});
    }
    obj(
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "ExternalService",
        "metadata": {"namespace": "shop", "name": "bank", "uid": "uid-bank", "generation": 1,
                     "creationTimestamp": "2026-11-01T00:00:00Z"},
        "spec": {"hosts": ["api.bank.example"],
                 "ports": [{"port": 80, "protocol": "HTTP", "tls": tls}]}}),
    )
}

/// Issue 21: the client certificate an ExternalService presents reaches
/// the proxies through the identity Secrets (which only they mount); a
/// missing Secret is said on the ExternalService, an unreadable one keeps
/// what the proxies have, and dropping the reference takes the key away.
#[tokio::test]
async fn an_external_services_client_certificate_is_copied_into_the_identity_secrets() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "default"));
    put(&mut h.writers.service_accounts, account("shop", "cart"));
    put(&mut h.writers.external_services, bank(Some("bank-client")));
    h.seed(
        "/apis/weft.dev/v1alpha1/namespaces/shop/externalservices/bank",
        &bank(Some("bank-client")),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    let identity = |h: &Harness, sa: &str| -> serde_json::Map<String, Value> {
        let s: Value = h
            .stored(&format!(
                "/api/v1/namespaces/shop/secrets/weft-identity-{sa}"
            ))
            .expect("identity Secret");
        s["data"].as_object().expect("data").clone()
    };

    // Not created yet: the identities are written without it, and the
    // ExternalService says what to do.
    h.reconcile("shop").await;
    assert_eq!(
        identity(&h, "cart").keys().collect::<Vec<_>>(),
        ["ca.crt", "tls.crt", "tls.key"]
    );
    let events = h.events();
    let warned: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "ClientCertificateNotFound")
        .collect();
    assert_eq!(warned.len(), 1, "{events:#?}");
    assert_eq!(warned[0]["type"], "Warning");
    assert_eq!(warned[0]["regarding"]["kind"], "ExternalService");
    assert_eq!(warned[0]["regarding"]["name"], "bank");
    assert_eq!(warned[0]["related"]["kind"], "Secret");
    assert_eq!(warned[0]["related"]["name"], "bank-client");
    let note = warned[0]["note"].as_str().expect("note");
    assert!(note.contains("create secret tls bank-client"), "{note}");
    // Said once, not on every reconcile.
    h.clear();
    h.reconcile("shop").await;
    assert!(h.events().is_empty(), "{:#?}", h.events());

    // A Secret that is not a key pair is refused, saying why.
    let client_ca =
        MeshCa::generate("bank.example", std::time::SystemTime::now(), CA_LIFETIME).expect("ca");
    let id = weft::identity::SpiffeId::new("bank.example", "merchants", "shop-42");
    let cert = client_ca
        .issue(
            &id,
            std::time::SystemTime::now(),
            Duration::from_secs(86_400),
        )
        .expect("client certificate");
    let other = client_ca
        .issue(
            &id,
            std::time::SystemTime::now(),
            Duration::from_secs(86_400),
        )
        .expect("another");
    let secret = |crt: &str, key: &str| -> Secret {
        obj(
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "bank-client", "namespace": "shop"},
            "data": {"tls.crt": b64(crt), "tls.key": b64(key)}}),
        )
    };
    let path = "/api/v1/namespaces/shop/secrets/bank-client";
    h.seed(path, &secret(&cert.cert_pem, &other.key_pem));
    h.clear();
    h.reconcile("shop").await;
    let events = h.events();
    let note = events
        .iter()
        .find(|e| e["reason"] == "ClientCertificateInvalid")
        .and_then(|e| e["note"].as_str())
        .expect("warned again");
    assert!(note.contains("not the key of tls.crt"), "{note}");
    assert_eq!(identity(&h, "cart").len(), 3);

    // The right pair: every identity Secret carries it.
    h.seed(path, &secret(&cert.cert_pem, &cert.key_pem));
    h.reconcile("shop").await;
    for sa in ["cart", "default"] {
        let data = identity(&h, sa);
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            [
                "ca.crt",
                "egress.bank-client.crt",
                "egress.bank-client.key",
                "tls.crt",
                "tls.key"
            ]
        );
        assert_eq!(data["egress.bank-client.crt"], b64(&cert.cert_pem));
        assert_eq!(data["egress.bank-client.key"], b64(&cert.key_pem));
    }
    h.sync_children(&["shop"]);
    h.assert_settled("shop").await;

    // The API server cannot give the Secret now: the proxies keep theirs.
    h.fake
        .lock()
        .expect("fake")
        .refuse_reads
        .insert(path.to_owned(), 500);
    h.assert_settled("shop").await;
    h.fake.lock().expect("fake").refuse_reads.clear();

    // No longer referenced: the copies go.
    put(&mut h.writers.external_services, bank(None));
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    assert_eq!(identity(&h, "cart").len(), 3);
    assert_eq!(identity(&h, "default").len(), 3);
}

/// A workload identity is never a client certificate: copied into every
/// identity Secret, it would give each ServiceAccount that workload's.
#[tokio::test]
async fn a_weft_identity_secret_is_refused_as_a_client_certificate() {
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    put(&mut h.writers.service_accounts, account("shop", "default"));
    put(&mut h.writers.service_accounts, account("shop", "payments"));
    put(
        &mut h.writers.external_services,
        bank(Some("weft-identity-payments")),
    );
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    h.reconcile("shop").await;
    h.sync_children(&["shop"]);
    h.clear();
    h.reconcile("shop").await;
    let s: Value = h
        .stored("/api/v1/namespaces/shop/secrets/weft-identity-default")
        .expect("identity Secret");
    assert_eq!(s["data"].as_object().expect("data").len(), 3);
    let events = h.events();
    let note = events
        .iter()
        .find(|e| e["reason"] == "ClientCertificateInvalid")
        .and_then(|e| e["note"].as_str())
        .expect("warned");
    assert!(note.contains("one of weft's own"), "{note}");
}

/// A pod of `ns` running as `sa`, with the sidecar or not, in `phase`.
fn client_pod(ns: &str, name: &str, sa: &str, sidecar: bool, phase: &str) -> Pod {
    let mut containers = vec![json!({"name": "app"})];
    if sidecar {
        containers.push(json!({"name": "weft-proxy"}));
    }
    obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"serviceAccountName": sa, "containers": containers, "nodeName": "node-1"},
        "status": {"phase": phase}}))
}

/// Issue 21: a namespace-wide rate limit. The operator counts the
/// namespace's meshed client pods by ServiceAccount in its endpoints
/// document, and republishes it when a pod event moves the count; a
/// namespace without such a limit has no count (pod churn rewrites
/// nothing).
#[tokio::test]
async fn a_namespace_wide_limit_has_its_client_pods_counted_and_recounted_as_they_scale() {
    let mut h = harness().await;
    for ns in ["shop", "catalog"] {
        put(&mut h.writers.namespaces, namespace(ns, true));
    }
    let carrier: weft::api::ExternalService = obj(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "ExternalService",
        "metadata": {"namespace": "shop", "name": "carrier", "uid": "uid-carrier",
                     "generation": 1, "creationTimestamp": "2026-11-01T00:00:00Z"},
        "spec": {"hosts": ["api.carrier.example"], "ports": [{"port": 80, "protocol": "HTTP"}]}}));
    put(&mut h.writers.external_services, carrier);
    let limit: TrafficPolicy = obj(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"namespace": "shop", "name": "carrier", "generation": 1,
                     "creationTimestamp": "2026-11-01T00:00:00Z"},
        "spec": {"targetRef": {"group": "weft.dev", "kind": "ExternalService", "name": "carrier"},
                 "rateLimit": {"requestsPerSecond": 30, "scope": "Namespace",
                               "serviceAccounts": ["checkout"]}}}));
    put(&mut h.writers.traffic_policies, limit);
    for (i, sa) in ["checkout", "checkout", "checkout", "catalog"]
        .iter()
        .enumerate()
    {
        put(
            &mut h.writers.pods,
            client_pod("shop", &format!("p{i}"), sa, true, "Running"),
        );
    }
    // Not counted: no sidecar, finished, another namespace.
    put(
        &mut h.writers.pods,
        client_pod("shop", "plain", "checkout", false, "Running"),
    );
    put(
        &mut h.writers.pods,
        client_pod("shop", "done", "checkout", true, "Succeeded"),
    );
    put(
        &mut h.writers.pods,
        client_pod("catalog", "c0", "checkout", true, "Running"),
    );
    // Nor a pod no node was found for (it sends nothing, and a thousand
    // gated pods must not thin everyone's share).
    let mut unscheduled = client_pod("shop", "gated", "checkout", true, "Pending");
    unscheduled.spec.as_mut().expect("spec").node_name = None;
    put(&mut h.writers.pods, unscheduled);
    h.with_ca().await;
    driver::recompile(&h.ctx).await;
    // No ServiceAccount `checkout` in the cache: the status says so (a
    // typo would leave the callers with no share).
    let snap = h.ctx.snapshot.load_full();
    let verdict = snap
        .compiled
        .verdicts
        .iter()
        .find(|v| v.kind == weft::compile::PolicyKind::TrafficPolicy && v.name == "carrier")
        .expect("a verdict");
    let programmed = verdict.condition("Programmed").expect("Programmed");
    assert!(
        programmed
            .message
            .contains("names checkout that namespace shop does not have"),
        "{}",
        programmed.message
    );
    let config: Value = {
        h.reconcile("shop").await;
        let cm: ConfigMap = h
            .stored("/api/v1/namespaces/shop/configmaps/weft-proxy-config")
            .expect("config");
        serde_json::from_str(&cm.data.expect("data")["config.json"]).expect("json")
    };
    assert_eq!(
        config["outbound"]["externalServices"][0]["policy"]["rateLimit"],
        json!({"requestsPerSecond": 30, "burst": 30,
               "shared": {"serviceAccounts": ["checkout"]}})
    );
    let e = published(&h, "shop").expect("published");
    assert_eq!(
        e.client_proxies,
        [("catalog".to_owned(), 1), ("checkout".to_owned(), 3)].into()
    );
    h.reconcile("catalog").await;
    assert!(
        published(&h, "catalog")
            .expect("published")
            .client_proxies
            .is_empty()
    );

    // Scaled to six checkout pods: the pod events republish shop's
    // document, and only shop's.
    h.sync_children(&["shop", "catalog"]);
    let (changes, _one, _all) = h.compile_loop();
    h.clear();
    for i in 4..7 {
        put(
            &mut h.writers.pods,
            client_pod("shop", &format!("p{i}"), "checkout", true, "Pending"),
        );
        changes.send(Change::Pods("shop".into())).expect("send");
        changes.send(Change::Pods("catalog".into())).expect("send");
    }
    assert_eq!(
        h.batch_writes().await,
        ["/api/v1/namespaces/shop/configmaps/weft-endpoints"],
        "one write, for the namespace with the limit"
    );
    assert_eq!(
        published(&h, "shop").expect("published").client_proxies["checkout"],
        6
    );

    // A pod event that moves no count writes nothing.
    h.sync_children(&["shop"]);
    h.clear();
    changes.send(Change::Pods("shop".into())).expect("send");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(h.writes().is_empty(), "{:#?}", h.writes());
}

/// A proxy's metrics: requests `workload` served, and what an auditing
/// `shop/payments` counted, as (caller, container port, method, path,
/// admitted, count).
fn audit_metrics(
    workload: &str,
    rules: &str,
    rows: &[(&str, u16, &str, &str, bool, u32)],
) -> String {
    let mut text = format!(
        "weft_proxy_requests_total{{direction=\"inbound\",src=\"x\",dst=\"{workload}\",route=\"default\",status_class=\"2xx\",tls=\"true\"}} 1\n"
    );
    for (src, port, method, path, admitted, n) in rows {
        let verdict = if *admitted { "admitted" } else { "refused" };
        text.push_str(&format!(
            "weft_proxy_access_audit_total{{policy=\"shop/payments\",src=\"{src}\",port=\"{port}\",method=\"{method}\",path=\"{path}\",verdict=\"{verdict}\",rules=\"{rules}\"}} {n}\n"
        ));
    }
    text
}

/// The audit's loop writes `status.enforcement` and
/// `status.observedCallers` under a field manager of its own, from the
/// counts of the guarded Service's own pods only, with an Event per
/// transition; a caller outside the rules blocks the move to Enforce.
#[tokio::test]
async fn an_audited_policy_learns_its_callers_and_a_stranger_blocks_enforce() {
    use weft::api::EnforcementPhase;
    use weft::meshstats::{MeshStats, ProxyCounts, Reading};
    let mut h = harness().await;
    put(&mut h.writers.namespaces, namespace("shop", true));
    // With a selector, the guard is on the Service's own pods only (its
    // EndpointSlices say which).
    let mut payments = service("shop", "payments", "10.0.0.20");
    payments.spec.as_mut().expect("spec").selector =
        Some([("app".to_owned(), "payments".to_owned())].into());
    put(&mut h.writers.services, payments);
    let pod: Pod = obj(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "payments-0",
                     "annotations": {weft::operator::world::WORKLOAD_ANNOTATION: "payments"}}}));
    put(&mut h.writers.pods, pod);
    let slice: EndpointSlice = obj(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": "payments-abc",
                     "labels": {"kubernetes.io/service-name": "payments"}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": "payments-0", "namespace": "shop"}}]}),
    );
    put(&mut h.writers.endpoint_slices, slice);
    let path = "/apis/weft.dev/v1alpha1/namespaces/shop/accesspolicies/payments";
    let policy: AccessPolicy = obj(
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"namespace": "shop", "name": "payments", "generation": 1},
        "spec": {"targetRef": {"kind": "Service", "name": "payments"}, "mode": "Audit",
                 "observationWindow": "5m",
                 "rules": [{"from": [{"serviceAccount": "checkout"}]}]}}),
    );
    h.seed(path, &policy);
    let rules = policy.rules_revision();
    let stats = Arc::new(Mutex::new(MeshStats::default()));
    let record = |rows: &[(&str, u16, &str, &str, bool, u32)], forged: u32| {
        let read = |ns: &str, pod: &str, text: String| Reading {
            id: (ns.to_owned(), pod.to_owned()),
            counts: ProxyCounts::read(ns, &text),
        };
        stats.lock().expect("stats").record(
            std::time::SystemTime::now(),
            vec![
                read(
                    "shop",
                    "payments-0",
                    audit_metrics("payments", &rules, rows),
                ),
                // Another namespace's proxy speaking for shop/payments.
                read(
                    "evil",
                    "liar-0",
                    audit_metrics(
                        "payments",
                        &rules,
                        &[("evil/x", 8080, "GET", "/", false, forged)],
                    ),
                ),
                // A pod of shop that is not behind the Service, claiming
                // to be payments.
                read(
                    "shop",
                    "cart-0",
                    audit_metrics(
                        "payments",
                        &rules,
                        &[("shop/y", 8080, "GET", "/", false, forged)],
                    ),
                ),
            ],
        );
    };
    record(&[], 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let seen = [
        ("shop/checkout", 8080, "POST", "/charges", true, 7),
        ("shop/cart", 8080, "GET", "/status", false, 2),
    ];
    record(&seen, 1000);

    let look = |p: &AccessPolicy| {
        let (ctx, stats, p) = (h.ctx.clone(), stats.clone(), p.clone());
        async move {
            weft::operator::audits::look(&ctx, &stats, &p, None)
                .await
                .expect("written")
        }
    };
    assert!(look(&policy).await);
    let writes = h.writes();
    assert_eq!(writes.len(), 1, "{writes:#?}");
    let w = &writes[0];
    assert_eq!(w.path, format!("{path}/status"));
    assert!(query_has(
        w,
        &[("fieldManager", "weft-audit"), ("force", "true")]
    ));
    let status = &w.body["status"];
    assert!(
        status.get("conditions").is_none(),
        "the compiler's, never the audit's: {status:#}"
    );
    assert_eq!(status["enforcement"]["phase"], "Auditing");
    let callers: Vec<(String, u64, u64)> = status["observedCallers"]
        .as_array()
        .expect("callers")
        .iter()
        .map(|c| {
            (
                c["caller"].as_str().expect("caller").to_owned(),
                c["port"].as_u64().expect("the Service's port"),
                c["requests"].as_u64().expect("requests"),
            )
        })
        .collect();
    assert_eq!(
        callers,
        [
            ("shop/checkout".to_owned(), 80, 7),
            ("shop/cart".to_owned(), 80, 2)
        ],
        "only the guarded pods' own counts, in the Service's ports"
    );
    assert_eq!(h.events()[0]["reason"], "Auditing");

    let enforcement_of = |p: &AccessPolicy| {
        p.status
            .as_ref()
            .and_then(|s| s.enforcement.clone())
            .expect("enforcement")
    };
    // Switched to Enforce: Observing; then a caller outside the rules
    // blocks it, by name, with a Warning.
    let mut stored: AccessPolicy = h.stored(path).expect("stored");
    stored.spec.mode = weft::api::AccessMode::Enforce;
    h.seed(path, &stored);
    h.clear();
    assert!(look(&stored).await);
    let stored: AccessPolicy = h.stored(path).expect("stored");
    let enforcement = enforcement_of(&stored);
    assert_eq!(enforcement.phase, EnforcementPhase::Observing);
    assert!(stored.audits(), "the proxies keep auditing");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let more = [
        ("shop/checkout", 8080, "POST", "/charges", true, 9),
        ("shop/cart", 8080, "GET", "/status", false, 5),
    ];
    record(&more, 5000);
    h.clear();
    assert!(look(&stored).await);
    let stored: AccessPolicy = h.stored(path).expect("stored");
    let enforcement = enforcement_of(&stored);
    assert_eq!(
        enforcement.phase,
        EnforcementPhase::Blocked,
        "{}",
        enforcement.message
    );
    assert_eq!(enforcement.unlisted, ["shop/cart"]);
    let events = h.events();
    assert_eq!(
        (events[0]["reason"].as_str(), events[0]["type"].as_str()),
        (Some("Blocked"), Some("Warning"))
    );
    assert!(stored.audits());
}

/// Helpers of the CA rotation tests: one look of the rotation's loop and
/// the CA re-read after it (as `carotations::run` does), the watches
/// delivering what was written, and what the fake holds.
mod rotation {
    use super::*;
    use weft::api::{CaRotationStatus, Mesh};

    /// The shop (ServiceAccount payments) with a CA in weft-ca and the
    /// Mesh asking for `rotation`, reconciled once; and that CA.
    pub async fn shop(rotation: Value) -> (Harness, MeshCa) {
        let mut h = harness().await;
        put(&mut h.writers.namespaces, namespace("shop", true));
        put(&mut h.writers.service_accounts, account("shop", "payments"));
        let old = MeshCa::generate("cluster.local", std::time::SystemTime::now(), CA_LIFETIME)
            .expect("ca");
        h.seed(
            CA_PATH,
            &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "weft-ca", "namespace": "weft-system", "resourceVersion": "1"},
                "data": {"ca.crt": b64(old.cert_pem()), "ca.key": b64(old.key_pem())}}),
        );
        let mesh = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Mesh",
            "metadata": {"name": "default", "generation": 2, "resourceVersion": "5"},
            "spec": {"ca": {"rotation": rotation}}});
        h.seed(MESH_PATH, &mesh);
        put(&mut h.writers.meshes, obj(mesh));
        driver::recompile(&h.ctx).await;
        ca::ensure(&h.ctx).await.expect("ensure");
        h.reconcile("shop").await;
        (h, old)
    }

    pub async fn look(h: &Harness, stats: &weft::meshstats::SharedStats) -> bool {
        let wrote = weft::operator::carotations::look(&h.ctx, stats)
            .await
            .expect("look");
        ca::ensure(&h.ctx).await.expect("ensure");
        wrote
    }

    /// One look that writes, after which the rotation is in `phase`.
    pub async fn moves_to(
        h: &Harness,
        stats: &weft::meshstats::SharedStats,
        phase: weft::api::CaRotationPhase,
    ) {
        assert!(look(h, stats).await);
        let s = status(h);
        assert_eq!(s.phase, phase, "{}", s.message);
    }

    pub fn sync(h: &mut Harness) {
        let m: Mesh = h.stored(MESH_PATH).expect("mesh");
        put(&mut h.writers.meshes, m);
        h.sync_children(&["shop"]);
    }

    pub fn status(h: &Harness) -> CaRotationStatus {
        let m: Mesh = h.stored(MESH_PATH).expect("mesh");
        m.status
            .and_then(|s| s.ca)
            .and_then(|c| c.rotation)
            .expect("rotation")
    }

    pub fn text(h: &Harness, path: &str, key: &str) -> String {
        let s: Secret = h.stored(path).expect("secret");
        String::from_utf8(s.data.expect("data")[key].0.clone()).expect("utf8")
    }
}

/// A CA rotation driven through the operator's own loop against the
/// fake API server: it generates the new root into `weft-ca-next`,
/// writes `status.ca.rotation` under its own field manager over the
/// version it read, moves on the proxies' reports, re-issues the
/// namespace's identities from the new root, makes the new root `weft-ca`
/// at the end and removes its copy.
#[tokio::test]
async fn a_ca_rotation_walks_its_phases_through_the_api_and_promotes_the_new_root() {
    use weft::api::{CaRotationPhase, Mesh};
    use weft::identity::{bundle_hash, bundle_of, fingerprint};
    use weft::meshstats::{MeshStats, ProxyCounts, Reading};
    let (mut h, old) = rotation::shop(json!({"id": "2027-q1"})).await;
    let identity_path = "/api/v1/namespaces/shop/secrets/weft-identity-payments";
    let first_leaf = rotation::text(&h, identity_path, "tls.crt");

    let stats = Arc::new(Mutex::new(MeshStats::default()));
    let report = |bundle: &str, root: &str| {
        let metrics = format!(
            "weft_proxy_trust_bundle{{hash=\"{bundle}\"}} 1\n\
             weft_proxy_certificate_root{{fingerprint=\"{root}\"}} 1\n\
             weft_proxy_tls_rejections_total{{direction=\"inbound\",reason=\"expired\"}} 4\n"
        );
        stats.lock().expect("stats").record(
            std::time::SystemTime::now(),
            vec![Reading {
                id: ("shop".into(), "payments-0".into()),
                counts: ProxyCounts::read("shop", &metrics),
            }],
        );
    };
    // Two readings wholly after the phase began (its `since` is in
    // whole seconds, as the API server keeps it).
    let report_after = |bundle: String, root: String| {
        let report = &report;
        async move {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            report(&bundle, &root);
            tokio::time::sleep(Duration::from_millis(20)).await;
            report(&bundle, &root);
        }
    };
    // One look: the status, then the CA re-read and every namespace
    // reconciled, then the watch delivering what was written.

    // Start: the new root is generated once, into weft-ca-next.
    h.clear();
    assert!(rotation::look(&h, &stats).await);
    let next_path = "/api/v1/namespaces/weft-system/secrets/weft-ca-next";
    let next_pem = rotation::text(&h, next_path, "ca.crt");
    let new_fp = fingerprint(&next_pem).expect("fp");
    let w: Vec<Seen> = h.writes();
    let status_write = w
        .iter()
        .find(|s| s.path == format!("{MESH_PATH}/status"))
        .expect("status written");
    assert!(query_has(
        status_write,
        &[("fieldManager", "weft-ca-rotation"), ("force", "true")]
    ));
    assert_eq!(status_write.body["metadata"]["resourceVersion"], "5");
    assert!(status_write.body["status"].get("conditions").is_none());
    assert_eq!(rotation::status(&h).phase, CaRotationPhase::AddingRoot);
    assert_eq!(h.events()[0]["reason"], "CARotationStarted");
    rotation::sync(&mut h);
    h.reconcile("shop").await;
    let both = bundle_of(&[old.cert_pem(), &next_pem]);
    assert_eq!(
        rotation::text(&h, identity_path, "ca.crt"),
        both,
        "both roots trusted"
    );
    assert_eq!(
        rotation::text(&h, identity_path, "tls.crt"),
        first_leaf,
        "nothing re-issued yet"
    );

    // The proxy reports the two-root bundle: certificates come from the
    // new root.
    let old_fp = fingerprint(old.cert_pem()).expect("fp");
    report_after(bundle_hash(&both), old_fp.clone()).await;
    rotation::moves_to(&h, &stats, CaRotationPhase::Reissuing).await;
    rotation::sync(&mut h);
    h.reconcile("shop").await;
    let reissued = rotation::text(&h, identity_path, "tls.crt");
    assert_ne!(reissued, first_leaf);
    assert!(weft::identity::chains_to(
        &reissued,
        &next_pem,
        std::time::SystemTime::now()
    ));
    rotation::sync(&mut h);

    // The Mesh is replaced without its status (a GitOps replace, a
    // restore): nothing is issued (no bundle drops the new root that
    // certificates now chain to), and the loop writes the rotation back
    // as Blocked where it stood, from the marks on weft-ca-next.
    let mut replaced: Mesh = h.stored(MESH_PATH).expect("mesh");
    replaced.status = None;
    h.seed(MESH_PATH, &replaced);
    put(&mut h.writers.meshes, replaced.clone());
    ca::ensure(&h.ctx).await.expect("ensure");
    assert!(
        matches!(h.ctx.ca.load().as_ref(), CaState::Missing { reason, .. } if *reason == "RotationInconsistent"),
        "nothing minted while the rotation's state is lost"
    );
    h.clear();
    h.reconcile("shop").await;
    assert!(!h.writes().iter().any(|w| w.path == identity_path));
    assert!(rotation::look(&h, &stats).await);
    let m: Mesh = h.stored(MESH_PATH).expect("mesh");
    let rebuilt = m
        .status
        .and_then(|s| s.ca)
        .and_then(|c| c.rotation)
        .expect("rebuilt");
    assert_eq!(
        (rebuilt.phase, rebuilt.blocked_in),
        (CaRotationPhase::Blocked, Some(CaRotationPhase::Reissuing))
    );
    assert_eq!(rebuilt.new_root, new_fp);
    // The plan is back (Reissuing's), and a raised retry goes on.
    assert!(matches!(h.ctx.ca.load().as_ref(), CaState::Ready(_)));
    let mut retried: Mesh = h.stored(MESH_PATH).expect("mesh");
    retried
        .spec
        .ca
        .as_mut()
        .and_then(|c| c.rotation.as_mut())
        .expect("rotation")
        .retry = 1;
    h.seed(MESH_PATH, &retried);
    put(&mut h.writers.meshes, retried);
    rotation::moves_to(&h, &stats, CaRotationPhase::Reissuing).await;
    rotation::sync(&mut h);

    // Every Secret holds a new-root leaf; then the proxy presents it;
    // then it trusts the new root alone.
    report_after(bundle_hash(&both), old_fp.clone()).await;
    rotation::moves_to(&h, &stats, CaRotationPhase::Presenting).await;
    rotation::sync(&mut h);
    report_after(bundle_hash(&both), new_fp.clone()).await;
    rotation::moves_to(&h, &stats, CaRotationPhase::RemovingOld).await;
    rotation::sync(&mut h);
    h.reconcile("shop").await;
    let new_only = bundle_of(&[&next_pem]);
    assert_eq!(rotation::text(&h, identity_path, "ca.crt"), new_only);
    rotation::sync(&mut h);
    report_after(bundle_hash(&new_only), new_fp.clone()).await;
    h.clear();
    rotation::moves_to(&h, &stats, CaRotationPhase::Complete).await;
    // weft-ca holds the new root (an update over the version read), its
    // copy is gone, and the namespace's Secret does not change again.
    let puts: Vec<Seen> = h
        .writes()
        .into_iter()
        .filter(|s| s.path == CA_PATH)
        .collect();
    assert_eq!(puts.len(), 1, "{puts:#?}");
    assert_eq!(puts[0].method, Method::PUT);
    assert!(puts[0].body["metadata"]["resourceVersion"].is_string());
    assert_eq!(
        fingerprint(&rotation::text(&h, CA_PATH, "ca.crt")),
        Some(new_fp.clone())
    );
    assert!(h.stored::<Secret>(next_path).is_none());
    rotation::sync(&mut h);
    h.clear();
    h.reconcile("shop").await;
    assert!(
        !h.writes().iter().any(|s| s.path == identity_path),
        "{:#?}",
        h.writes()
    );
    // Done: the loop has nothing more to write.
    assert!(!rotation::look(&h, &stats).await);
}

/// A rotation to a CA the user supplies: an intermediate under an
/// offline root, as cert-manager writes a CA `Certificate` (`tls.crt`,
/// `tls.key`, `ca.crt`). The rotation copies it into `weft-ca-next` when
/// it begins and works from the copy, so the source re-keyed meanwhile
/// (a renewal) changes nothing; the bundles hold the offline root, and
/// every leaf carries the intermediate.
#[tokio::test]
async fn a_ca_rotation_to_a_users_intermediate_works_from_its_own_copy() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use weft::api::CaRotationPhase;
    use weft::identity::{bundle_hash, bundle_of, fingerprint, pem_blocks};
    use weft::meshstats::{MeshStats, ProxyCounts, Reading};
    let (mut h, old) = rotation::shop(json!({"id": "shop-2027",
        "source": {"secretName": "shop-root", "anchorKey": "ca.crt"}}))
    .await;
    // The PKI team's offline root, and the issuer they hand the mesh.
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate().expect("key");
    let root = ca_params("shop offline root")
        .self_signed(&root_key)
        .expect("root");
    let root_issuer = Issuer::new(ca_params("shop offline root"), root_key);
    let issue_intermediate = || {
        let key = KeyPair::generate().expect("key");
        let cert = ca_params("shop mesh issuer")
            .signed_by(&key, &root_issuer)
            .expect("intermediate");
        (cert.pem(), key.serialize_pem())
    };
    let (inter, inter_key) = issue_intermediate();
    let source_path = "/api/v1/namespaces/weft-system/secrets/shop-root";
    let source = |cert: &str, key: &str| {
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "shop-root", "namespace": "weft-system"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64(cert), "tls.key": b64(key), "ca.crt": b64(&root.pem())}})
    };
    h.seed(source_path, &source(&inter, &inter_key));

    let stats = Arc::new(Mutex::new(MeshStats::default()));
    assert!(rotation::look(&h, &stats).await);
    let r = rotation::status(&h);
    let root_fp = fingerprint(&root.pem()).expect("fp");
    assert_eq!(
        (r.phase, r.new_root.as_str()),
        (CaRotationPhase::AddingRoot, root_fp.as_str())
    );
    let next_path = "/api/v1/namespaces/weft-system/secrets/weft-ca-next";
    assert_eq!(
        fingerprint(&rotation::text(&h, next_path, "anchor.crt")),
        Some(root_fp.clone()),
        "the copy keeps the offline root apart from the issuer"
    );
    rotation::sync(&mut h);
    h.reconcile("shop").await;
    let identity_path = "/api/v1/namespaces/shop/secrets/weft-identity-payments";
    let both = bundle_of(&[old.cert_pem(), &root.pem()]);
    assert_eq!(
        rotation::text(&h, identity_path, "ca.crt"),
        both,
        "the proxies trust the offline root"
    );

    // cert-manager renews the issuer with a new key: the rotation goes
    // on from its copy.
    let (renewed, renewed_key) = issue_intermediate();
    h.seed(source_path, &source(&renewed, &renewed_key));
    let old_fp = fingerprint(old.cert_pem()).expect("fp");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let metrics = format!(
            "weft_proxy_trust_bundle{{hash=\"{}\"}} 1\nweft_proxy_certificate_root{{fingerprint=\"{old_fp}\"}} 1\n",
            bundle_hash(&both)
        );
        stats.lock().expect("stats").record(
            std::time::SystemTime::now(),
            vec![Reading {
                id: ("shop".into(), "payments-0".into()),
                counts: ProxyCounts::read("shop", &metrics),
            }],
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rotation::moves_to(&h, &stats, CaRotationPhase::Reissuing).await;
    rotation::sync(&mut h);
    h.reconcile("shop").await;
    // The leaf comes from the issuer copied when the rotation began, and
    // carries it: peers that trust only the offline root verify it.
    let leaf = rotation::text(&h, identity_path, "tls.crt");
    let blocks = pem_blocks(&leaf);
    assert_eq!(blocks.len(), 2, "the leaf, then the intermediate");
    assert_eq!(fingerprint(&blocks[1]), fingerprint(&inter));
    assert!(weft::identity::chains_to(
        &leaf,
        &root.pem(),
        std::time::SystemTime::now()
    ));
}
