//! Tier 3: a rotation of the mesh root with real proxies on loopback.
//! The operator's own pieces decide: the identity each ServiceAccount's
//! Secret holds in each phase ([`desired::identity`] under the phase's
//! [`TrustPlan`]), the proxies' reports as the stats collector reads them
//! ([`ProxyCounts::read`], [`MeshStats`]), and the rotation's pure
//! [`carotation::step`]. What is emulated is the API server (the Secrets
//! and the Mesh status are values here, round-tripped through JSON as the
//! API server stores them, so `since` loses its sub-seconds as it does in
//! a cluster) and the kubelet, which writes each changed Secret into the
//! pod's volume as its AtomicWriter does (`..data` swapped by rename:
//! kubernetes `pkg/volume/util/atomic_writer.go`), or, for a pod whose
//! volume is "frozen", never does.
//!
//! Under a steady stream of requests, none fails in any phase; in every
//! phase fresh handshakes succeed between a proxy that took the phase's
//! files and one still on the previous phase's; and a proxy that does not
//! take the new bundle blocks the rotation, by name, until it does and
//! the rotation is retried; a certificate from a root its peer does not
//! trust yet is refused, counted `unknown-ca`, and blocks it too.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::json;
use weft::api::{
    CaRotation, CaRotationPhase, CaRotationStatus, Duration as ApiDuration, RotationAction,
};
use weft::identity::{
    CA_CERT_KEY, CA_LIFETIME, MeshCa, SpiffeId, TLS_CERT_KEY, TLS_KEY_KEY, bundle_hash, bundle_of,
    fingerprint, root_of,
};
use weft::meshstats::{MeshStats, ProxyCounts, Reading};
use weft::operator::ca::TrustPlan;
use weft::operator::carotation::{self, Evidence, NewRoot, Roots};
use weft::operator::{carotations, desired};

use support::mesh::*;
use support::*;

/// How often the "collector" reads the proxies here (10 s in a cluster).
const TICK: Duration = Duration::from_millis(300);

/// Writes `files` into the volume at `dir` the way the kubelet's
/// AtomicWriter does: a new timestamped directory, `..data` re-pointed to
/// it by a rename, each key a symlink through `..data`. A reader sees the
/// whole old set or the whole new one.
fn kubelet_write(dir: &Path, files: &BTreeMap<String, String>) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let ts = format!("..{}", SEQ.fetch_add(1, Ordering::Relaxed));
    std::fs::create_dir(dir.join(&ts)).expect("timestamped dir");
    for (k, v) in files {
        std::fs::write(dir.join(&ts).join(k), v).expect("write key");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for k in files.keys() {
        let link = dir.join(k);
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("..data/{k}"), &link).expect("key link");
    }
}

/// A pod of namespace shop: its ServiceAccount, its identity volume, its
/// proxy.
struct Pod {
    name: &'static str,
    sa: &'static str,
    volume: IdDir,
    /// The kubelet never brings a changed Secret into this pod.
    frozen: bool,
    proxy: Option<TestProxy>,
}

/// The emulated control plane: the CAs, each ServiceAccount's Secret,
/// the Mesh's rotation status, and the stats the collector keeps.
struct Mesh {
    old: Arc<MeshCa>,
    new: Arc<MeshCa>,
    /// The CA in `weft-ca` (the new one once promoted).
    base: Arc<MeshCa>,
    secrets: BTreeMap<&'static str, BTreeMap<String, String>>,
    status: Option<CaRotationStatus>,
    stats: MeshStats,
    phases: Vec<CaRotationPhase>,
}

impl Mesh {
    fn new() -> Self {
        let now = SystemTime::now();
        let old = Arc::new(MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca"));
        let new = Arc::new(MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca"));
        Self {
            base: old.clone(),
            old,
            new,
            secrets: BTreeMap::new(),
            status: None,
            stats: MeshStats::reading_every(TICK),
            phases: Vec::new(),
        }
    }

    /// What the CA puts in force, from the status alone (as `ca::ensure`).
    fn plan(&self) -> TrustPlan {
        match &self.status {
            Some(s) if !s.phase.ended() && !s.new_root.is_empty() => {
                if fingerprint(self.base.anchor_pem()).as_deref() == Some(s.new_root.as_str()) {
                    TrustPlan::single(self.base.clone())
                } else {
                    TrustPlan::rotating(
                        self.base.clone(),
                        Some(self.new.clone()),
                        self.new.anchor_pem(),
                        s,
                    )
                    .expect("plan")
                }
            }
            _ => TrustPlan::single(self.base.clone()),
        }
    }

    /// The reconcile: each ServiceAccount's Secret as `desired::identity`
    /// makes it under the plan; then the kubelet's sync of every pod
    /// whose volume is not frozen.
    fn reconcile(&mut self, pods: &[Pod]) {
        let plan = self.plan();
        for pod in pods {
            let existing = self.secrets.get(pod.sa).cloned().unwrap_or_default();
            let id = desired::identity(
                "shop",
                "cluster.local",
                pod.sa,
                &existing,
                &plan,
                DAY,
                SystemTime::now(),
            )
            .expect("identity");
            self.secrets.insert(pod.sa, id.data.clone());
            if !pod.frozen {
                kubelet_write(pod.volume.dir.path(), &id.data);
            }
        }
    }

    /// One look of the rotation: read every proxy, gather the evidence as
    /// the operator does, step, and store the status as the API server
    /// would (JSON).
    async fn look(&mut self, spec: &CaRotation, pods: &[Pod]) -> Option<carotation::Decision> {
        let mut readings = Vec::new();
        for pod in pods {
            let Some(p) = &pod.proxy else { continue };
            readings.push(Reading {
                id: ("shop".into(), pod.name.into()),
                counts: ProxyCounts::read("shop", &p.metrics().await),
            });
        }
        let now = SystemTime::now();
        self.stats.record(now, readings);
        let mut ev = Evidence {
            base_root: fingerprint(self.base.anchor_pem()).expect("fp"),
            new_root: Some(Ok(NewRoot {
                fingerprint: fingerprint(self.new.anchor_pem()).expect("fp"),
                certificate: self.new.anchor_pem().to_owned(),
                expires: None,
            })),
            roots: Roots {
                old: fingerprint(self.old.anchor_pem()).expect("fp"),
                new: fingerprint(self.new.anchor_pem()).expect("fp"),
                both: bundle_hash(&bundle_of(&[self.old.anchor_pem(), self.new.anchor_pem()])),
                new_only: bundle_hash(&bundle_of(&[self.new.anchor_pem()])),
            },
            ..Evidence::default()
        };
        let both = bundle_of(&[self.old.anchor_pem(), self.new.anchor_pem()]);
        for (sa, data) in &self.secrets {
            ev.secrets.insert(
                format!("shop/weft-identity-{sa}"),
                root_of(&data[TLS_CERT_KEY], &both, now),
            );
        }
        if let Some(s) = &self.status {
            let since = SystemTime::from(s.since.0);
            carotations::read_ticks(
                &self.stats.touching(since),
                self.stats.identities(),
                since,
                &mut ev,
            );
        }
        let d = carotation::step(Some(spec), self.status.as_ref(), &ev, now)?;
        if d.promote {
            self.base = self.new.clone();
        }
        let stored = serde_json::to_value(&d.status).expect("json");
        self.status = Some(serde_json::from_value(stored).expect("reads back"));
        if self.phases.last() != Some(&d.status.phase) {
            self.phases.push(d.status.phase);
        }
        Some(d)
    }

    /// Reconciles and looks every tick until the rotation is in `phase`;
    /// fails past `within`, or if it is ever in `never`.
    async fn until(
        &mut self,
        spec: &CaRotation,
        pods: &[Pod],
        phase: CaRotationPhase,
        within: Duration,
        never: CaRotationPhase,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while self.phase() != Some(phase) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not {phase:?} within {within:?}: {:?}",
                self.status
            );
            self.reconcile(pods);
            tokio::time::sleep(TICK).await;
            self.look(spec, pods).await;
            assert_ne!(self.phase(), Some(never), "{:?}", self.status);
        }
    }

    fn phase(&self) -> Option<CaRotationPhase> {
        self.status.as_ref().map(|s| s.phase)
    }

    /// A pod's identity files as the plan of the previous phase left them
    /// (a pod whose kubelet lags one step).
    fn files(&self, sa: &str) -> BTreeMap<String, String> {
        self.secrets[sa].clone()
    }
}

/// The app behind payments, and its proxy.
async fn payments_pod(pki_dir: IdDir, app: &Upstream) -> Pod {
    let config = server_config("strict", &[], json!([]));
    let map = format!("127.0.0.1:0={}", app.addr.port());
    let proxy = meshed(&config, &[], &pki_dir, &["--inbound-map", &map]).await;
    Pod {
        name: "payments-1",
        sa: "payments",
        volume: pki_dir,
        frozen: false,
        proxy: Some(proxy),
    }
}

fn client_config(endpoint: std::net::SocketAddr) -> serde_json::Value {
    let mut svc = service("payments", &[endpoint], None, json!([]));
    svc["mesh"] = json!({ "namespace": "shop", "serviceAccounts": ["payments"], "strict": true });
    config(vec![svc])
}

/// A client pod of ServiceAccount `sa` calling payments at `endpoint`.
async fn client_pod(
    name: &'static str,
    sa: &'static str,
    volume: IdDir,
    endpoint: std::net::SocketAddr,
) -> Pod {
    let proxy = meshed(
        &client_config(endpoint),
        &["payments.shop:80"],
        &volume,
        &[],
    )
    .await;
    Pod {
        name,
        sa,
        volume,
        frozen: false,
        proxy: Some(proxy),
    }
}

/// An empty identity volume for `sa`, filled by the first reconcile.
fn volume(sa: &str) -> IdDir {
    IdDir {
        dir: tempfile::tempdir().expect("tempdir"),
        sa: sa.to_owned(),
    }
}

/// A request every 20 ms through `url` until stopped; counts what fails.
struct Load {
    sent: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(url: String) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (s, f) = (sent.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let client = h2_client();
            let mut every = tokio::time::interval(Duration::from_millis(20));
            while !*stopped.borrow() {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stopped.changed() => break,
                }
                let r = send(&client, "GET", &url, &[]).await;
                s.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    f.lock()
                        .expect("failed")
                        .push(format!("{} {:?} {}", r.status, r.proxy_error, r.body));
                }
            }
        });
        Self {
            sent,
            failed,
            stop,
            task,
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        let _ = self.stop.send(true);
        self.task.await.expect("load task");
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.lock().expect("failed").clone(),
        )
    }
}

/// A fresh proxy of ServiceAccount cart with `files` in its volume: its
/// first request to payments is a new handshake both ways.
async fn fresh_handshake(files: &BTreeMap<String, String>, endpoint: std::net::SocketAddr) -> u16 {
    let v = volume("cart");
    kubelet_write(v.dir.path(), files);
    let p = meshed(&client_config(endpoint), &["payments.shop:80"], &v, &[]).await;
    get(&p.outbound_url(0)).await.status
}

fn spec(gate_timeout: Duration) -> CaRotation {
    CaRotation {
        id: "2027-q1".into(),
        action: RotationAction::Proceed,
        retry: 0,
        // The CRD holds it to 2m at least; the step honours any value,
        // and a test cannot wait minutes.
        gate_timeout: ApiDuration::from_secs(gate_timeout.as_secs().max(1)),
        source: None,
    }
}

/// The mesh before the rotation: payments, checkout calling it, and the
/// carts' Secret; every volume synced.
async fn shop(mesh: &mut Mesh, app: &Upstream) -> Vec<Pod> {
    let mut pods = vec![
        Pod {
            name: "payments-1",
            sa: "payments",
            volume: volume("payments"),
            frozen: false,
            proxy: None,
        },
        Pod {
            name: "checkout-1",
            sa: "checkout",
            volume: volume("checkout"),
            frozen: false,
            proxy: None,
        },
        Pod {
            name: "cart-1",
            sa: "cart",
            volume: volume("cart"),
            frozen: false,
            proxy: None,
        },
    ];
    mesh.reconcile(&pods);
    let payments = pods.remove(0);
    let payments = payments_pod(payments.volume, app).await;
    let endpoint = payments.proxy.as_ref().expect("proxy").running.inbound[0];
    let checkout = pods.remove(0);
    let checkout = client_pod("checkout-1", "checkout", checkout.volume, endpoint).await;
    let cart = pods.remove(0);
    let cart = client_pod("cart-1", "cart", cart.volume, endpoint).await;
    vec![payments, checkout, cart]
}

fn endpoint(pods: &[Pod]) -> std::net::SocketAddr {
    pods[0].proxy.as_ref().expect("payments").running.inbound[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_steady_load_fails_no_request_and_every_phase_handshakes_with_the_last() {
    let app = Upstream::fixed(200, "charged").await;
    let mut mesh = Mesh::new();
    let pods = shop(&mut mesh, &app).await;
    let load = Load::start(pods[1].proxy.as_ref().expect("checkout").outbound_url(0));
    let spec = spec(Duration::from_secs(60));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut last_files = mesh.files("cart");
    while mesh.phase() != Some(CaRotationPhase::Complete) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotation did not complete: {:?}",
            mesh.status
        );
        mesh.reconcile(&pods);
        tokio::time::sleep(TICK).await;
        let before = mesh.phase();
        if let Some(d) = mesh.look(&spec, &pods).await {
            assert_ne!(
                d.status.phase,
                CaRotationPhase::Blocked,
                "{}",
                d.status.message
            );
        }
        if mesh.phase() != before {
            // The phase's Secrets, written; a pod on them and a pod still
            // on the last phase's files both handshake with payments.
            mesh.reconcile(&pods);
            let now_files = mesh.files("cart");
            assert_eq!(
                fresh_handshake(&now_files, endpoint(&pods)).await,
                200,
                "{:?} files",
                mesh.phase()
            );
            assert_eq!(
                fresh_handshake(&last_files, endpoint(&pods)).await,
                200,
                "a pod still on the files before {:?}",
                mesh.phase()
            );
            last_files = now_files;
        }
    }
    use CaRotationPhase::*;
    assert_eq!(
        mesh.phases,
        vec![AddingRoot, Reissuing, Presenting, RemovingOld, Complete]
    );
    // The end: every Secret trusts the new root alone and holds a
    // certificate from it.
    for data in mesh.secrets.values() {
        assert_eq!(data[CA_CERT_KEY], mesh.new.trust_bundle());
        assert!(weft::identity::chains_to(
            &data[TLS_CERT_KEY],
            mesh.new.anchor_pem(),
            SystemTime::now()
        ));
    }
    // An old-root certificate is refused now.
    let stale = mesh
        .old
        .issue(
            &SpiffeId::new("cluster.local", "shop", "cart"),
            SystemTime::now(),
            DAY,
        )
        .expect("leaf");
    let stale_files = BTreeMap::from([
        (
            CA_CERT_KEY.to_owned(),
            bundle_of(&[mesh.old.anchor_pem(), mesh.new.anchor_pem()]),
        ),
        (TLS_CERT_KEY.to_owned(), stale.cert_pem),
        (TLS_KEY_KEY.to_owned(), stale.key_pem),
    ]);
    assert_eq!(fresh_handshake(&stale_files, endpoint(&pods)).await, 502);
    let (sent, failed) = load.finish().await;
    assert!(sent > 100, "{sent} requests sent");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_takes_the_new_bundle_blocks_the_rotation_by_name_until_retried() {
    let app = Upstream::fixed(200, "charged").await;
    let mut mesh = Mesh::new();
    let mut pods = shop(&mut mesh, &app).await;
    // cart's kubelet stops syncing its volume.
    pods[2].frozen = true;
    let load = Load::start(pods[1].proxy.as_ref().expect("checkout").outbound_url(0));
    let mut spec = spec(Duration::from_secs(3));
    // Never past a proxy that did not take the bundle.
    mesh.until(
        &spec,
        &pods,
        CaRotationPhase::Blocked,
        Duration::from_secs(30),
        CaRotationPhase::Reissuing,
    )
    .await;
    let s = mesh.status.clone().expect("status");
    assert_eq!(s.blocked_in, Some(CaRotationPhase::AddingRoot));
    assert_eq!(
        s.waiting_on,
        vec!["shop/cart-1".to_owned()],
        "{}",
        s.message
    );
    assert!(s.message.contains("gateTimeout"), "{}", s.message);
    // Blocked, nothing moves: the issuer is still the old root.
    for _ in 0..3 {
        mesh.reconcile(&pods);
        tokio::time::sleep(TICK).await;
        assert!(mesh.look(&spec, &pods).await.is_none());
    }
    assert!(weft::identity::chains_to(
        &mesh.secrets["payments"][TLS_CERT_KEY],
        mesh.old.anchor_pem(),
        SystemTime::now()
    ));

    // The kubelet catches up; the rotation is retried and goes on.
    pods[2].frozen = false;
    spec.retry = 1;
    spec.gate_timeout = ApiDuration::from_secs(60);
    mesh.until(
        &spec,
        &pods,
        CaRotationPhase::Presenting,
        Duration::from_secs(60),
        CaRotationPhase::Blocked,
    )
    .await;

    // A certificate from a root the peer does not trust: payments
    // refuses it as unknown-ca, and the rotation stops, naming it.
    let foreign = MeshCa::generate("cluster.local", SystemTime::now(), CA_LIFETIME).expect("ca");
    let leaf = foreign
        .issue(
            &SpiffeId::new("cluster.local", "shop", "cart"),
            SystemTime::now(),
            DAY,
        )
        .expect("leaf");
    let rogue = BTreeMap::from([
        (CA_CERT_KEY.to_owned(), mesh.plan().bundle),
        (TLS_CERT_KEY.to_owned(), leaf.cert_pem),
        (TLS_KEY_KEY.to_owned(), leaf.key_pem),
    ]);
    assert_eq!(fresh_handshake(&rogue, endpoint(&pods)).await, 502);
    mesh.until(
        &spec,
        &pods,
        CaRotationPhase::Blocked,
        Duration::from_secs(10),
        CaRotationPhase::RemovingOld,
    )
    .await;
    let s = mesh.status.clone().expect("status");
    assert_eq!(s.blocked_in, Some(CaRotationPhase::Presenting));
    assert_eq!(
        s.waiting_on,
        vec!["shop/payments-1 (inbound unknown-ca)".to_owned()],
        "{}",
        s.message
    );
    assert!(s.message.contains("unknown-ca"), "{}", s.message);

    let (sent, failed) = load.finish().await;
    assert!(sent > 50, "{sent} requests sent");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}
