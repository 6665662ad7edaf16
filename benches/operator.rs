//! Operator benchmark: how long the mesh takes to converge after a change,
//! and how many API requests a reconcile costs, with 100 and 1000 meshed
//! namespaces. Writes `bench/results/operator.md`.
//!
//! The operator runs in process against the fake API server of the tier-2
//! tests (`tests/support/fakeapi.rs`, loopback HTTP, objects kept in
//! memory): what is measured is the operator's own work (compile, plan,
//! per-namespace diff, certificate checks, serialisation, the HTTP round
//! trips), not a real API server's latency. Namespaces are reconciled 8 at
//! once, as the controller does by default.
//!
//! Topology: N client namespaces plus 10 namespaces serving 10 Services
//! each; every namespace may call every Service (no AccessPolicy), so a
//! TrafficPolicy on one Service changes all N + 10 configs — the worst case
//! for a policy edit. Scenarios, each from a settled mesh:
//! - resync: every namespace reconciled with nothing changed;
//! - TrafficPolicy: a timeout edited on `svc-0-0`;
//! - ServiceAccount: one added in one namespace (one Secret changes).
//!
//! Run with `make bench` (release). Without `--bench` (as under `cargo test
//! --all-targets`) it is a smoke run with 5 namespaces, nothing written.

#[path = "../tests/support/fakeapi.rs"]
mod fakeapi;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use weft::identity::{CA_LIFETIME, MeshCa};
use weft::operator::driver;
use weft::operator::metrics::Metrics;
use weft::operator::observe::{ScrapeError, Scraper};
use weft::operator::reconcile::{self, CaState, Ctx};
use weft::operator::world::{Change, Writers};

const CONCURRENCY: usize = 8;
const SERVING_NAMESPACES: usize = 10;
const SERVICES_PER_NAMESPACE: usize = 10;
const ROUNDS: usize = 3;

struct NoProxies;

impl Scraper for NoProxies {
    fn scrape(&self, ip: IpAddr) -> BoxFuture<'static, Result<String, ScrapeError>> {
        Box::pin(async move {
            Err(ScrapeError {
                addr: ip.to_string(),
                reason: "no proxies in this benchmark".into(),
            })
        })
    }
}

fn obj<K: DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("object")
}

fn put<K: Clone + kube::Resource<DynamicType = ()> + 'static>(w: &mut Writer<K>, o: K) {
    w.apply_watcher_event(&watcher::Event::Apply(o));
}

struct Mesh {
    fake: fakeapi::Shared,
    writers: Writers,
    ctx: Arc<Ctx>,
    names: Vec<String>,
}

impl Mesh {
    async fn new(clients: usize) -> Self {
        let (fake, client) = fakeapi::start().await;
        let mut writers = Writers::default();
        let ctx = Arc::new(Ctx::new(
            client,
            writers.world(),
            Arc::new(NoProxies),
            Arc::new(Metrics::default()),
            "weft-system".into(),
            None,
        ));
        let ca = MeshCa::generate("cluster.local", SystemTime::now(), CA_LIFETIME).expect("ca");
        ctx.ca.store(Arc::new(CaState::Ready(Arc::new(ca))));
        let mut names = Vec::new();
        for i in 0..SERVING_NAMESPACES {
            let ns = format!("svc-{i}");
            for j in 0..SERVICES_PER_NAMESPACE {
                put(
                    &mut writers.services,
                    obj(json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"namespace": ns, "name": format!("svc-{i}-{j}")},
                        "spec": {"clusterIP": format!("10.{i}.{j}.1"),
                                 "ports": [{"port": 80, "targetPort": 8080}]}})),
                );
            }
            names.push(ns);
        }
        for i in 0..clients {
            names.push(format!("client-{i}"));
        }
        for ns in &names {
            put(
                &mut writers.namespaces,
                obj(json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": format!("uid-{ns}"),
                                 "labels": {"weft.dev/inject": "enabled"}}})),
            );
            for sa in ["default", "app"] {
                put(&mut writers.service_accounts, account(ns, sa));
            }
        }
        Self {
            fake,
            writers,
            ctx,
            names,
        }
    }

    fn requests(&self) -> usize {
        self.fake.lock().expect("fake").seen.len()
    }

    /// What the watches would deliver: every child the fake holds.
    fn sync_children(&mut self) {
        let objects: Vec<(String, Value)> = self
            .fake
            .lock()
            .expect("fake")
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (path, v) in objects {
            if path.contains("/configmaps/") {
                put::<ConfigMap>(&mut self.writers.config_maps, obj(v));
            } else if path.contains("/secrets/") {
                put::<Secret>(&mut self.writers.secrets, obj(v));
            } else if path.contains("/rolebindings/") {
                put::<RoleBinding>(&mut self.writers.role_bindings, obj(v));
            } else if path.contains("/roles/") {
                put::<Role>(&mut self.writers.roles, obj(v));
            }
        }
    }

    /// Reconciles `names` as they come, CONCURRENCY at once; returns how
    /// many.
    async fn reconcile(&self, names: impl futures_util::Stream<Item = String>) -> usize {
        names
            .map(|ns| {
                let ctx = self.ctx.clone();
                async move {
                    let obj: Arc<Namespace> = ctx
                        .world
                        .namespaces
                        .get(&ObjectRef::new(&ns))
                        .expect("cached");
                    reconcile::reconcile(obj, ctx).await.expect("reconcile");
                }
            })
            .buffer_unordered(CONCURRENCY)
            .count()
            .await
    }

    /// Sends one change through the compile loop and reconciles the
    /// `expected` namespaces it names (reconciling each as it arrives);
    /// returns (time to converge, namespaces reconciled, requests).
    async fn converge(&self, change: Change, expected: usize) -> (Duration, usize, usize) {
        let (tx, changes) = mpsc::unbounded_channel();
        let (one_tx, mut one) = mpsc::unbounded_channel();
        let (all_tx, _all) = mpsc::unbounded_channel();
        let task = tokio::spawn(driver::compile_loop(
            self.ctx.clone(),
            changes,
            one_tx,
            all_tx,
        ));
        let before = self.requests();
        let start = Instant::now();
        tx.send(change).expect("send");
        // The first trigger arrives after the debounce and the compile.
        let names = futures_util::stream::unfold(&mut one, |rx| async move {
            rx.recv().await.map(|r| (r.name, rx))
        })
        .take(expected);
        let reconciled = self.reconcile(names).await;
        let took = start.elapsed();
        // Nothing beyond what was expected.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let extra = std::iter::from_fn(|| one.try_recv().ok()).count();
        let reconciled = reconciled + extra;
        task.abort();
        (took, reconciled, self.requests() - before)
    }
}

fn account(ns: &str, name: &str) -> ServiceAccount {
    obj(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"namespace": ns, "name": name}}))
}

struct Row {
    clients: usize,
    namespaces: usize,
    first_time: Duration,
    first_requests: usize,
    resync: Duration,
    resync_requests: usize,
    policy: Vec<Duration>,
    policy_reconciled: usize,
    policy_requests: usize,
    account: Vec<Duration>,
    account_reconciled: usize,
    account_requests: usize,
    compile: Duration,
}

async fn scenario(clients: usize) -> Row {
    let mut mesh = Mesh::new(clients).await;
    let namespaces = mesh.names.len();

    let t = Instant::now();
    driver::recompile(&mesh.ctx).await;
    let compile = t.elapsed();
    let before = mesh.requests();
    let t = Instant::now();
    mesh.reconcile(futures_util::stream::iter(mesh.names.clone()))
        .await;
    let first_time = t.elapsed();
    let first_requests = mesh.requests() - before;
    mesh.sync_children();

    let before = mesh.requests();
    let t = Instant::now();
    mesh.reconcile(futures_util::stream::iter(mesh.names.clone()))
        .await;
    let resync = t.elapsed();
    let resync_requests = mesh.requests() - before;

    let mut policy = Vec::new();
    let (mut policy_reconciled, mut policy_requests) = (0, 0);
    for round in 0..ROUNDS {
        let tp = json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"namespace": "svc-0", "name": "svc-0-0", "generation": round + 1,
                         "creationTimestamp": "2026-11-01T00:00:00Z"},
            "spec": {"targetRef": {"kind": "Service", "name": "svc-0-0"},
                     "timeout": format!("{}s", round + 2)}});
        mesh.fake.lock().expect("fake").objects.insert(
            "/apis/weft.dev/v1alpha1/namespaces/svc-0/trafficpolicies/svc-0-0".into(),
            tp.clone(),
        );
        put(&mut mesh.writers.traffic_policies, obj(tp));
        let (took, n, reqs) = mesh.converge(Change::Inputs, namespaces).await;
        policy.push(took);
        (policy_reconciled, policy_requests) = (n, reqs);
        mesh.sync_children();
        // The status the loop wrote comes back through the watch.
        let stored = mesh.fake.lock().expect("fake").objects
            ["/apis/weft.dev/v1alpha1/namespaces/svc-0/trafficpolicies/svc-0-0"]
            .clone();
        put::<weft::api::TrafficPolicy>(&mut mesh.writers.traffic_policies, obj(stored));
    }

    let mut account_times = Vec::new();
    let (mut account_reconciled, mut account_requests) = (0, 0);
    for round in 0..ROUNDS {
        put(
            &mut mesh.writers.service_accounts,
            account("client-0", &format!("worker-{round}")),
        );
        let (took, n, reqs) = mesh.converge(Change::Inputs, 1).await;
        account_times.push(took);
        (account_reconciled, account_requests) = (n, reqs);
        mesh.sync_children();
    }

    Row {
        clients,
        namespaces,
        first_time,
        first_requests,
        resync,
        resync_requests,
        policy,
        policy_reconciled,
        policy_requests,
        account: account_times,
        account_reconciled,
        account_requests,
        compile,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn per(requests: usize, reconciles: usize) -> String {
    format!("{:.2}", requests as f64 / reconciles.max(1) as f64)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if bench { &[100, 1000] } else { &[5] };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<Row> = sizes.iter().map(|&n| rt.block_on(scenario(n))).collect();
    for r in &rows {
        assert_eq!(r.resync_requests, 0, "a settled mesh costs no API requests");
        assert_eq!(
            r.account_reconciled, 1,
            "a ServiceAccount touches one namespace"
        );
        assert_eq!(
            r.policy_reconciled, r.namespaces,
            "every config lists svc-0-0"
        );
    }
    if !bench {
        println!("operator bench smoke run: ok");
        return;
    }

    let mut md = String::new();
    let when = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC");
    let _ = writeln!(md, "# Operator: convergence and API requests\n");
    let _ = writeln!(
        md,
        "Produced by `make bench` (`benches/operator.rs`) on {when}, {} cores, release build.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        md,
        "The operator in process against the tier-2 fake API server (loopback HTTP, objects in memory): the figures are the operator's own work — compile, plan, per-namespace diff, certificate checks, serialisation and HTTP round trips — not a real API server's latency. {CONCURRENCY} namespaces reconciled at once. Topology: N client namespaces plus {SERVING_NAMESPACES} namespaces serving {SERVICES_PER_NAMESPACE} Services each, every namespace may call every Service, so a TrafficPolicy on one Service changes every config (the worst case for an edit). Convergence: from the watch event to the last affected namespace's writes answered; median of {ROUNDS} rounds.\n"
    );
    let _ = writeln!(
        md,
        "| client namespaces | meshed namespaces | whole-mesh compile | first reconcile of all | API requests per namespace (first) | resync of all, nothing changed | per namespace | API requests (resync) | TrafficPolicy edit: converged | namespaces reconciled | API requests per reconcile | new ServiceAccount: converged | namespaces reconciled | API requests per reconcile |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.clients,
            r.namespaces,
            ms(r.compile),
            ms(r.first_time),
            per(r.first_requests, r.namespaces),
            ms(r.resync),
            ms(r.resync / r.namespaces as u32),
            r.resync_requests,
            ms(median(r.policy.clone())),
            r.policy_reconciled,
            per(r.policy_requests, r.policy_reconciled),
            ms(median(r.account.clone())),
            r.account_reconciled,
            per(r.account_requests, r.account_reconciled),
        );
    }
    let _ = writeln!(
        md,
        "\nReading it: the first reconcile of a namespace is 4 applies (ConfigMap, Role, RoleBinding, identity Secret); a settled mesh costs no request at all (reads come from the watch caches and nothing differs); a TrafficPolicy edit costs one ConfigMap apply per namespace whose config changed, plus the policy's status write; a new ServiceAccount costs one Secret apply in its namespace. The compile is whole-mesh and runs once per batch of changes (debounced 100 ms, included in the convergence time). A per-namespace resync that grows with N comes from each reconcile scanning the ServiceAccount and MTLSPolicy caches for its namespace (linear in the cluster); an index by namespace would make it constant."
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/operator.md");
    std::fs::write(&path, md).expect("write results");
    println!("wrote {}", path.display());
}
