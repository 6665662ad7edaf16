//! Tier 5: a real kube-apiserver and etcd from `KUBEBUILDER_ASSETS`
//! (`setup-envtest use -p path`); the operator, the webhook's certificate
//! keeper and the webhook itself run in this process against them. Run with
//! `make test-apiserver`, which fails, naming what is missing, without the
//! binaries. Under `make test` (no binaries on CI) every `tier5_` test here
//! says SKIPPED loudly instead, and `make test` prints that line.
//!
//! What the harness sets up as a cluster would, and where that is written
//! down:
//! - Admission: the plugins a default kube-apiserver enables (no
//!   `--enable-admission-plugins` / `--disable-admission-plugins`), so the
//!   ServiceAccount plugin sets a pod's ServiceAccount and adds its token
//!   volume before any mutating webhook sees the pod
//!   (<https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/#which-plugins-are-enabled-by-default>).
//!   envtest disables that plugin; this harness does not, because the
//!   webhook must see what a real cluster sends it.
//! - No kube-controller-manager runs. In a cluster its serviceaccount
//!   controller creates every namespace's `default` ServiceAccount (and
//!   the token and root-CA publishers do their part); the ServiceAccount
//!   admission plugin refuses a pod whose ServiceAccount does not exist,
//!   so the tests create the ServiceAccounts their pods use
//!   (<https://kubernetes.io/docs/reference/access-authn-authz/service-accounts-admin/>).
//! - Service-account keys: `--service-account-key-file` is read with
//!   client-go's `keyutil.PublicKeysFromFile`, which takes PKIX public keys,
//!   certificates, RSA private keys and SEC1 `EC PRIVATE KEY`s, but not a
//!   PKCS#8 EC key (what rcgen writes): it gets the public key as `PUBLIC
//!   KEY`. `--service-account-signing-key-file` is read with
//!   `keyutil.PrivateKeyFromFile`, which takes PKCS#8 (`PRIVATE KEY`)
//!   (k8s.io/client-go/util/keyutil/key.go; envtest likewise passes a
//!   certificate and its key, controller-runtime
//!   pkg/internal/testing/controlplane/apiserver.go).
//! - Service IPs: `--service-cluster-ip-range=10.0.0.0/24`, what envtest
//!   passes and the API server's own built-in default. The examples carry
//!   no ClusterIP; the API server allocates one.
//! - The control plane's identity: the ServiceAccount, ClusterRole(Binding)
//!   and Role(Binding) of `manifests/10-control-plane.yaml`, used by
//!   impersonating the ServiceAccount (user
//!   `system:serviceaccount:<ns>:<name>`, groups `system:serviceaccounts`,
//!   `system:serviceaccounts:<ns>`, `system:authenticated`: what the API
//!   server's token authenticator gives a pod's token,
//!   <https://kubernetes.io/docs/reference/access-authn-authz/rbac/#referring-to-subjects>).
//!
//! etcd and kube-apiserver log to files in the cluster's temp directory;
//! when start-up or a test fails their last lines are printed and the
//! directory is kept. The tests run one at a time (each starts its own
//! API server; two cores do not start three at once in good time).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Discovery, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use weft::api::AccessPolicy;
use weft::config::{CONFIG_KEY, CONFIG_MAP_NAME, ProxyConfig};
use weft::identity::{
    CA_CERT_KEY, CA_SECRET, LEGACY_IDENTITY_SECRET, MeshCa, identity_secret_name,
};
use weft::inject::webhook::{self, AllMeshed, ServingCert, Webhook};
use weft::inject::{ClusterCaps, InjectSettings};
use weft::operator::desired::{CONFIG_READER, FIELD_MANAGER as OPERATOR};

/// One API server at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The field manager of what the tests apply (as `kubectl apply
/// --server-side` would, with its own name).
const TEST_MANAGER: &str = "tier5-test";

/// The Service range passed to the API server (envtest's, and the API
/// server's own default).
const SERVICE_RANGE: (u8, u8, u8) = (10, 0, 0);

/// The envtest binaries, or `None` after saying why the test is skipped.
fn assets() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from) else {
        eprintln!(
            "\n*** SKIPPED: KUBEBUILDER_ASSETS is not set. This tier needs kube-apiserver and etcd:\n\
             ***   go install sigs.k8s.io/controller-runtime/tools/setup-envtest@latest\n\
             ***   export KUBEBUILDER_ASSETS=$(setup-envtest use -p path)\n\
             ***   make test-apiserver\n"
        );
        return None;
    };
    for bin in ["kube-apiserver", "etcd"] {
        if !dir.join(bin).is_file() {
            eprintln!("\n*** SKIPPED: {} has no {bin}\n", dir.display());
            return None;
        }
    }
    Some(dir)
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Operator and webhook logs in the test's output (shown on failure, and
/// always under `make test-apiserver`'s `--nocapture`).
fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

// ---------------------------------------------------------------------------
// The cluster: etcd, kube-apiserver, an admin client.

/// A running etcd + kube-apiserver and an admin client (O=system:masters).
/// On a panic it prints the last lines of both logs and keeps its
/// directory; either way it stops both processes.
struct Cluster {
    client: kube::Client,
    /// The admin's config, for clients that impersonate.
    config: kube::Config,
    procs: Vec<(&'static str, Child, PathBuf)>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, child, log) in &mut self.procs {
                let state = match child.try_wait() {
                    Ok(Some(status)) => format!("exited: {status}"),
                    _ => "running".to_owned(),
                };
                eprintln!(
                    "\n--- {name} ({state}), last lines of {} ---\n{}",
                    log.display(),
                    tail(log, 40)
                );
            }
        }
        // The API server first, then its etcd.
        for (_, child, _) in self.procs.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("--- kept {} for a look ---", dir.keep().display());
        }
    }
}

impl Cluster {
    /// A client acting as ServiceAccount `ns/name`, with the groups the API
    /// server gives a ServiceAccount's token.
    fn client_as_service_account(&self, ns: &str, name: &str) -> kube::Client {
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{name}"));
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ]);
        kube::Client::try_from(config).expect("impersonating client")
    }

    /// Exits early when a process died (its log says why).
    fn check_alive(&mut self) {
        for (name, child, _) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited ({status}) before the API server was ready");
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

/// The API server's service-account key pair, as files it reads: the
/// public key (PKIX `PUBLIC KEY`) for `--service-account-key-file`, the
/// private key (PKCS#8 `PRIVATE KEY`) for
/// `--service-account-signing-key-file`.
fn service_account_keys(dir: &Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("service-account key");
    (
        write(dir, "sa.pub", &key.public_key_pem()),
        write(dir, "sa.key", &key.serialize_pem()),
    )
}

fn spawn_logged(
    name: &'static str,
    bin: &Path,
    args: &[String],
    dir: &Path,
) -> (&'static str, Child, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    (name, child, log)
}

async fn start_cluster(assets: &Path) -> Cluster {
    log_to_test_output();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let pki = envtest_pki();
    let (serving, admin) = (&pki.serving, &pki.admin);
    let (sa_public, sa_private) = service_account_keys(&d);
    let (etcd_port, api_port) = (free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let etcd = spawn_logged(
        "etcd",
        &assets.join("etcd"),
        &[
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{}", free_port()),
            // As envtest runs it (etcd 3.5+): a test's data need not
            // survive a power cut.
            "--unsafe-no-fsync=true".into(),
        ],
        &d,
    );
    let (a, b, c) = SERVICE_RANGE;
    let apiserver = spawn_logged(
        "kube-apiserver",
        &assets.join("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            // Without it the API server looks for a non-loopback interface
            // to advertise, and a machine without one fails to start it.
            "--advertise-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", write(&d, "apiserver.crt", &serving.0)),
            format!(
                "--tls-private-key-file={}",
                write(&d, "apiserver.key", &serving.1)
            ),
            format!("--client-ca-file={}", write(&d, "ca.crt", &pki.ca_pem)),
            format!("--service-account-key-file={sa_public}"),
            format!("--service-account-signing-key-file={sa_private}"),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-cluster-ip-range={a}.{b}.{c}.0/24"),
            "--authorization-mode=RBAC".into(),
        ],
        &d,
    );

    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "envtest",
        "clusters": [{ "name": "envtest", "cluster": {
            "server": format!("https://localhost:{api_port}"),
            "certificate-authority-data": b64(&pki.ca_pem),
        }}],
        "users": [{ "name": "admin", "user": {
            "client-certificate-data": b64(&admin.0),
            "client-key-data": b64(&admin.1),
        }}],
        "contexts": [{ "name": "envtest", "context": { "cluster": "envtest", "user": "admin" } }],
    });
    let kubeconfig: kube::config::Kubeconfig =
        serde_json::from_value(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config.clone()).expect("client");
    let mut cluster = Cluster {
        client: client.clone(),
        config,
        procs: vec![etcd, apiserver],
        dir: Some(dir),
    };

    // Ready: /readyz passes (its checks include RBAC's bootstrap roles and
    // the default ServiceCIDR, without which no Service gets an address),
    // and the system namespaces exist.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        cluster.check_alive();
        let readyz = http::Request::get("/readyz")
            .body(Vec::new())
            .expect("request");
        let ready = client
            .request_text(readyz)
            .await
            .is_ok_and(|t| t.trim() == "ok")
            && Api::<Namespace>::all(client.clone())
                .get_opt("default")
                .await
                .ok()
                .flatten()
                .is_some();
        if ready {
            return cluster;
        }
        assert!(
            Instant::now() < deadline,
            "kube-apiserver was not ready within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The test cluster's PKI: a CA, the API server's serving certificate for
/// localhost, and an admin client certificate (O=system:masters).
struct Pki {
    ca_pem: String,
    serving: (String, String),
    admin: (String, String),
}

fn envtest_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "envtest CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca_pem = ca_params.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, cn: &str, org: Option<&str>, usage| {
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        serving: leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        admin: leaf(
            vec![],
            "admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        ca_pem,
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// What `--service-account-key-file` gets must be a key kube-apiserver
/// reads there (`keyutil.ParsePublicKeysPEM`): this one ran as the first
/// outside run's failure, `data does not contain any valid RSA or ECDSA
/// public keys`, when the harness passed rcgen's PKCS#8 EC private key.
/// Runs everywhere: it needs no API server.
#[test]
fn the_service_account_key_file_holds_a_key_kube_apiserver_reads() {
    let dir = tempfile::tempdir().expect("tmp");
    let (public, private) = service_account_keys(dir.path());
    let public = std::fs::read(public).expect("read");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&public).expect("PEM");
    assert_eq!(pem.label, "PUBLIC KEY");
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pem.contents).expect("PKIX");
    assert!(
        matches!(
            spki.parsed(),
            Ok(x509_parser::public_key::PublicKey::EC(_)
                | x509_parser::public_key::PublicKey::RSA(_))
        ),
        "an ECDSA or RSA key"
    );
    // The signing key: a block keyutil.ParsePrivateKeyPEM recognises.
    let private = std::fs::read(private).expect("read");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&private).expect("PEM");
    assert!(
        ["EC PRIVATE KEY", "RSA PRIVATE KEY", "PRIVATE KEY"].contains(&pem.label.as_str()),
        "{}",
        pem.label
    );
}

// ---------------------------------------------------------------------------
// Applying YAML as `kubectl apply --server-side` does, keeping the warnings.

/// Every document of a YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The `*.yaml` files of a directory, in name order.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of examples/shop, in file order.
fn shop_documents() -> Vec<Value> {
    yaml_files(&repo("examples/shop"))
        .iter()
        .flat_map(|f| documents(f))
        .collect()
}

fn kind_of(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn describe(doc: &Value) -> String {
    let meta = &doc["metadata"];
    match meta["namespace"].as_str() {
        Some(ns) => format!("{} {ns}/{}", kind_of(doc), meta["name"]),
        None => format!("{} {}", kind_of(doc), meta["name"]),
    }
}

/// The API for a document's kind, through discovery.
fn api_for(client: &kube::Client, discovery: &Discovery, doc: &Value) -> Api<DynamicObject> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind_of(doc));
    let (ar, caps) = discovery
        .resolve_gvk(&gvk)
        .unwrap_or_else(|| panic!("{gvk:?} is unknown to the API server"));
    match (&caps.scope, doc["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, ns) => {
            Api::namespaced_with(client.clone(), ns.unwrap_or("default"), &ar)
        }
        (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
    }
}

/// An applied object and the `Warning` headers the API server answered
/// with (kube's typed calls drop them).
struct Applied {
    object: Value,
    warnings: Vec<String>,
}

/// Server-side applies `doc` through a raw request, so the response's
/// `Warning` headers can be read.
async fn apply(
    client: &kube::Client,
    discovery: &Discovery,
    doc: &Value,
) -> Result<Applied, kube::Error> {
    let api = api_for(client, discovery, doc);
    let name = doc["metadata"]["name"].as_str().expect("metadata.name");
    let request = kube::core::Request::new(api.resource_url())
        .patch(
            name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(doc),
        )
        .map_err(kube::Error::BuildRequest)?;
    let response = client.send(request.map(kube::client::Body::from)).await?;
    let warnings = response
        .headers()
        .get_all(http::header::WARNING)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let code = response.status();
    let body = response.into_body().collect_bytes().await?;
    if !code.is_success() {
        let status = serde_json::from_slice(&body).unwrap_or_else(|_| kube::core::Status {
            code: code.as_u16(),
            message: String::from_utf8_lossy(&body).into_owned(),
            ..Default::default()
        });
        return Err(kube::Error::Api(Box::new(status)));
    }
    let object = serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?;
    Ok(Applied { object, warnings })
}

/// A cluster of this test's own (the others wait: the guard, dropped
/// last when bound first), with weft's CRDs and the example shop applied.
async fn shop_cluster(assets: &Path) -> (tokio::sync::MutexGuard<'static, ()>, Cluster, Discovery) {
    let one = ONE_AT_A_TIME.lock().await;
    let cluster = start_cluster(assets).await;
    let discovery = install_crds(&cluster.client).await;
    apply_all(&cluster.client, &discovery, &shop_documents()).await;
    (one, cluster, discovery)
}

/// Applies every document; each must be accepted without a warning.
async fn apply_all(client: &kube::Client, discovery: &Discovery, docs: &[Value]) -> Vec<Value> {
    let mut applied = Vec::new();
    for doc in docs {
        let what = describe(doc);
        let a = apply(client, discovery, doc)
            .await
            .unwrap_or_else(|e| panic!("applying {what}: {e}"));
        assert!(
            a.warnings.is_empty(),
            "applying {what}: the API server warned {:?}",
            a.warnings
        );
        applied.push(a.object);
    }
    applied
}

/// Applies every CRD in crds/ (no warnings allowed), waits until each is
/// Established, and returns a discovery that knows their kinds.
async fn install_crds(client: &kube::Client) -> Discovery {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let crds: Vec<Value> = yaml_files(&repo("crds"))
        .iter()
        .flat_map(|f| documents(f))
        .collect();
    assert_eq!(crds.len(), weft::api::crds().len(), "one file per CRD");
    apply_all(client, &discovery, &crds).await;
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in &crds {
        let name = crd["metadata"]["name"].as_str().expect("name").to_owned();
        let established = wait_for(Duration::from_secs(30), || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let crd = api.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
        assert!(established.is_some(), "CRD {name} is not Established=True");
    }
    // Served once discovery lists them.
    let kinds: Vec<String> = crds
        .iter()
        .map(|c| {
            c["spec"]["names"]["kind"]
                .as_str()
                .expect("kind")
                .to_owned()
        })
        .collect();
    wait_for(Duration::from_secs(30), || {
        let (client, kinds) = (client.clone(), kinds.clone());
        async move {
            let d = Discovery::new(client).run().await.ok()?;
            kinds
                .iter()
                .all(|k| {
                    d.resolve_gvk(&kube::api::GroupVersionKind::gvk(
                        weft::api::GROUP,
                        "v1alpha1",
                        k,
                    ))
                    .is_some()
                })
                .then_some(d)
        }
    })
    .await
    .expect("the CRDs' kinds in discovery within 30 s")
}

/// Polls `f` every 200 ms until it returns Some or `limit` passes.
async fn wait_for<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The API server refused an object as invalid, naming `field` and `why`.
fn assert_refused(result: Result<Applied, kube::Error>, field: &str, why: &str) {
    let status = match result {
        Ok(a) => panic!("accepted: {}", a.object),
        Err(kube::Error::Api(status)) => status,
        Err(e) => panic!("not an answer from the API server: {e}"),
    };
    assert_eq!(
        (status.code, status.reason.as_str()),
        (422, "Invalid"),
        "{status:?}"
    );
    assert!(
        status.message.contains(&format!("{field}: Invalid value")) && status.message.contains(why),
        "the refusal names {field} and says {why:?}: {}",
        status.message
    );
    let causes: Vec<&str> = status
        .details
        .iter()
        .flat_map(|d| d.causes.iter().map(|c| c.field.as_str()))
        .collect();
    assert!(causes.contains(&field), "{causes:?}");
}

// ---------------------------------------------------------------------------
// The tests.

/// Every CRD in crds/ installs without a warning and is Established; the
/// example shop applies as it is (its Services get addresses from this
/// API server's range); and the API server itself refuses invalid
/// policies, naming the field: an OpenAPI bound and a CEL rule.
#[tokio::test]
async fn tier5_crds_install_cleanly_and_the_api_server_refuses_invalid_policies_by_field() {
    let Some(assets) = assets() else { return };
    let (_one, cluster, discovery) = shop_cluster(&assets).await;
    let client = cluster.client.clone();
    let (a, b, c) = SERVICE_RANGE;
    let range = format!("{a}.{b}.{c}.");
    for ns in ["shop", "payments"] {
        for svc in Api::<Service>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .expect("services")
        {
            let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
            assert!(ip.starts_with(&range), "{ns}/{:?}: {ip}", svc.metadata.name);
        }
    }

    // OpenAPI: retries.attempts has maximum 10.
    let too_many_retries = json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": { "name": "too-many-retries", "namespace": "shop" },
        "spec": {
            "targetRef": { "kind": "Service", "name": "cart" },
            "retries": { "attempts": 50 },
        },
    });
    assert_refused(
        apply(&client, &discovery, &too_many_retries).await,
        "spec.retries.attempts",
        "less than or equal to 10",
    );
    // CEL (x-kubernetes-validations on a rule): some backend must get traffic.
    let all_weights_zero = json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "ServiceRoute",
        "metadata": { "name": "nowhere", "namespace": "shop" },
        "spec": {
            "parentRef": { "kind": "Service", "name": "checkout" },
            "rules": [{ "backendRefs": [
                { "name": "checkout", "weight": 0 },
                { "name": "checkout-canary", "weight": 0 },
            ] }],
        },
    });
    assert_refused(
        apply(&client, &discovery, &all_weights_zero).await,
        "spec.rules[0]",
        "at least one backendRef must have a weight above 0",
    );
    // The same objects, made valid, are accepted: the refusals were about
    // those fields.
    let mut fixed = too_many_retries.clone();
    fixed["spec"]["retries"]["attempts"] = json!(3);
    apply_all(&client, &discovery, &[fixed]).await;
    let mut fixed = all_weights_zero.clone();
    fixed["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(1);
    apply_all(&client, &discovery, &[fixed]).await;
}

/// A ServiceRoute's status has two writers, each with its own field
/// manager (server-side apply of the status subresource): the compiler's
/// conditions (`weft-operator`) and the canary's `rollout`
/// (`weft-canary`). Neither may remove the other's fields, and the canary
/// removes its own by applying none. The API server also refuses, by
/// field, the rollouts the CRD's rules forbid.
#[tokio::test]
async fn tier5_the_canary_and_the_compiler_write_one_status_without_erasing_each_other() {
    let Some(assets) = assets() else { return };
    let (_one, cluster, discovery) = shop_cluster(&assets).await;
    let client = cluster.client.clone();

    let route = |rollout: Value| {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "ServiceRoute",
            "metadata": { "name": "checkout-canary-rollout", "namespace": "shop" },
            "spec": {
                "parentRef": { "kind": "Service", "name": "checkout" },
                "rules": [{ "backendRefs": [
                    { "name": "checkout", "weight": 90 },
                    { "name": "checkout-canary", "weight": 10 },
                ] }],
                "rollout": rollout,
            },
        })
    };
    assert_refused(
        apply(
            &client,
            &discovery,
            &route(json!({ "canary": "checkout-canary", "steps": [10, 50] })),
        )
        .await,
        "spec.rollout",
        "rollout.steps must end with 100",
    );
    assert_refused(
        apply(&client, &discovery, &route(json!({ "canary": "checkout" }))).await,
        "spec",
        "rollout.canary must be another Service than parentRef",
    );
    apply_all(
        &client,
        &discovery,
        &[route(
            json!({ "canary": "checkout-canary", "interval": "30s" }),
        )],
    )
    .await;

    let api: Api<weft::api::ServiceRoute> = Api::namespaced(client.clone(), "shop");
    let name = "checkout-canary-rollout";
    let conditions = |message: &str| {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "ServiceRoute",
            "status": { "observedGeneration": 1, "conditions": [{
                "type": "Accepted", "status": "True", "reason": "Accepted", "message": message,
                "lastTransitionTime": "2026-12-07T10:00:00Z", "observedGeneration": 1,
            }] },
        })
    };
    let by = |manager: &'static str| PatchParams::apply(manager).force();
    api.patch_status(name, &by(OPERATOR), &Patch::Apply(conditions("first")))
        .await
        .expect("the compiler's conditions");
    let rollout = json!({
        "revision": "0123456789abcdef", "phase": "Progressing", "step": 1, "weight": 5,
        "stepSince": "2026-12-07T10:00:00Z", "verdict": "Started",
    });
    weft::operator::canaries::apply_status(&api, name, json!({ "rollout": rollout }))
        .await
        .expect("the canary's status");
    // The compiler writes again (its conditions only): the rollout stays.
    api.patch_status(name, &by(OPERATOR), &Patch::Apply(conditions("second")))
        .await
        .expect("the compiler's conditions again");
    let read = api.get_status(name).await.expect("read back");
    let status = read.status.expect("a status");
    assert_eq!(status.conditions[0].message, "second");
    let kept = status
        .rollout
        .expect("the canary's rollout survived the compiler's write");
    assert_eq!((kept.step, kept.weight), (1, 5));
    // The canary drops its part: the conditions stay.
    weft::operator::canaries::apply_status(&api, name, json!({}))
        .await
        .expect("the canary's removal");
    let status = api
        .get_status(name)
        .await
        .expect("read back")
        .status
        .expect("a status");
    assert!(status.rollout.is_none(), "{:?}", status.rollout);
    assert_eq!(status.conditions.len(), 1);
}

/// An AccessPolicy's audit fields and the compiler's conditions on one
/// status, each under its own field manager; the audit's write is
/// conditional on the version it read (a policy edited meanwhile gets
/// 409, not a phase decided for its old rules); and the CRD's rules on
/// `mode` and `observationWindow` on a real API server.
#[tokio::test]
async fn tier5_the_audit_writes_its_status_only_over_the_version_it_read() {
    let Some(assets) = assets() else { return };
    let (_one, cluster, discovery) = shop_cluster(&assets).await;
    let client = cluster.client.clone();
    let policy = |mode: &str, window: &str| {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": { "name": "payments-audit", "namespace": "shop" },
            "spec": {
                "targetRef": { "kind": "Service", "name": "checkout" },
                "mode": mode, "observationWindow": window,
            },
        })
    };
    assert_refused(
        apply(&client, &discovery, &policy("Audit", "10m")).await,
        "spec",
        "observationWindow must be at most 9m",
    );
    apply_all(&client, &discovery, &[policy("Audit", "2m")]).await;
    let api: Api<AccessPolicy> = Api::namespaced(client.clone(), "shop");
    let name = "payments-audit";
    let by = |manager: &'static str| PatchParams::apply(manager).force();
    let conditions = json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AccessPolicy",
        "status": { "observedGeneration": 1, "conditions": [{
            "type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok",
            "lastTransitionTime": "2026-12-07T10:00:00Z", "observedGeneration": 1,
        }] },
    });
    api.patch_status(name, &by(OPERATOR), &Patch::Apply(&conditions))
        .await
        .expect("the compiler's conditions");
    let read = api.get(name).await.expect("read");
    let audit = json!({
        "enforcement": { "phase": "Auditing", "since": "2026-12-07T10:00:00Z" },
        "observedCallers": [{ "caller": "shop/checkout", "port": 80, "method": "GET",
                              "pathPrefix": "/status", "requests": 3, "admitted": false,
                              "lastSeen": "2026-12-07T10:00:10Z" }],
    });
    weft::operator::canaries::apply_status_as(
        &api,
        name,
        weft::operator::audits::AUDIT_FIELD_MANAGER,
        read.resource_version(),
        audit.clone(),
    )
    .await
    .expect("the audit's status over the version it read");
    // Read again (the audit's own write made a new version), then
    // edited by someone else: the audit's write over what it read is
    // refused.
    let read = api.get(name).await.expect("read again");
    apply_all(&client, &discovery, &[policy("Enforce", "2m")]).await;
    let stale = weft::operator::canaries::apply_status_as(
        &api,
        name,
        weft::operator::audits::AUDIT_FIELD_MANAGER,
        read.resource_version(),
        audit,
    )
    .await;
    assert!(
        matches!(&stale, Err(kube::Error::Api(e)) if e.code == 409),
        "{stale:?}"
    );
    // The compiler writes again: the audit's fields stay.
    api.patch_status(name, &by(OPERATOR), &Patch::Apply(&conditions))
        .await
        .expect("the compiler's conditions again");
    let status = api
        .get_status(name)
        .await
        .expect("read back")
        .status
        .expect("a status");
    assert_eq!(status.conditions.len(), 1);
    assert_eq!(
        status.enforcement.map(|e| e.phase),
        Some(weft::api::EnforcementPhase::Auditing)
    );
    assert_eq!(status.observed_callers.len(), 1);
}

/// The control plane under the RBAC that manifests/ gives it, not as an
/// admin: the operator and the webhook's certificate keeper run with a
/// client that impersonates the Deployment's ServiceAccount. A verb the
/// ClusterRole or Role lacks shows up here as a missing object or status.
#[tokio::test]
async fn tier5_the_control_plane_reconciles_the_shop_under_its_own_rbac() {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::api::events::v1::Event;
    use weft::inject::certs::{self, WebhookNames};

    let Some(assets) = assets() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = start_cluster(&assets).await;
    let admin = cluster.client.clone();
    let discovery = install_crds(&admin).await;

    // The install, as `kubectl apply -f manifests/` would do it, minus the
    // Deployment and its Services: the namespace, the RBAC, the webhook
    // configuration.
    let control_plane = documents(&repo("manifests/10-control-plane.yaml"));
    let rbac: Vec<Value> = control_plane
        .iter()
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&kind_of(d))
        })
        .cloned()
        .collect();
    let deployment = control_plane
        .iter()
        .find(|d| kind_of(d) == "Deployment")
        .expect("the control plane's Deployment");
    let sa = rbac
        .iter()
        .find(|d| kind_of(d) == "ServiceAccount")
        .expect("the control plane's ServiceAccount");
    let (sa_ns, sa_name) = (
        sa["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
            .to_owned(),
        sa["metadata"]["name"].as_str().expect("name").to_owned(),
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"], sa_name,
        "the Deployment runs as the ServiceAccount tested here"
    );
    let webhook_config = documents(&repo("manifests/20-webhook.yaml"));
    let mut install = documents(&repo("manifests/00-namespace.yaml"));
    install.extend(rbac);
    install.extend(webhook_config.iter().cloned());
    apply_all(&admin, &discovery, &install).await;
    let shop = apply_all(&admin, &discovery, &shop_documents()).await;

    let sa_client = cluster.client_as_service_account(&sa_ns, &sa_name);
    // The impersonation holds: the API server sees the ServiceAccount, and
    // refuses it what its roles do not grant.
    let review = Api::<SelfSubjectReview>::all(sa_client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let who = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    assert_eq!(who, format!("system:serviceaccount:{sa_ns}:{sa_name}"));
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "not-allowed"}})).expect("ns");
    match Api::<Namespace>::all(sa_client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("the control plane may not create namespaces: {other:?}"),
    }
    // What only the injector's caches list: Nodes, for the kubelets'
    // versions. (Bindings reach the API server's RBAC cache within
    // moments of their creation.)
    let nodes = wait_for(Duration::from_secs(10), || {
        let api = Api::<Node>::all(sa_client.clone());
        async move { api.list(&ListParams::default()).await.ok() }
    })
    .await;
    assert!(nodes.is_some(), "the control plane may list Nodes");

    // The operator and the webhook's certificate keeper, as the control
    // plane runs them (src/controlplane.rs), with the ServiceAccount's
    // client.
    let identity = "tier5-replica".to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(weft::operator::run(
        sa_client.clone(),
        weft::operator::Options {
            namespace: sa_ns.clone(),
            lease: "weft-operator".into(),
            identity: identity.clone(),
            lease_duration: Duration::from_secs(15),
            concurrency: 4,
            stats: Default::default(),
            mtls_policies: Default::default(),
        },
        Arc::new(weft::operator::metrics::Metrics::default()),
        Arc::new(AtomicBool::new(false)),
        async move {
            let _ = stopped.await;
        },
    ));
    let mwc = webhook_config
        .iter()
        .find(|d| kind_of(d) == "MutatingWebhookConfiguration")
        .expect("MutatingWebhookConfiguration");
    let service = &mwc["webhooks"][0]["clientConfig"]["service"];
    let names = WebhookNames {
        namespace: sa_ns.clone(),
        service: service["name"].as_str().expect("service").to_owned(),
        // `weft control-plane --webhook-secret`'s default (the Deployment
        // does not set it).
        secret: "weft-injector-tls".into(),
        configuration: mwc["metadata"]["name"].as_str().expect("name").to_owned(),
        webhook: mwc["webhooks"][0]["name"]
            .as_str()
            .expect("name")
            .to_owned(),
    };
    let keeper = tokio::spawn(certs::run(
        sa_client.clone(),
        names.clone(),
        Arc::new(ServingCert::default()),
    ));

    // Every meshed namespace of the example gets its config, its
    // identities (every ServiceAccount's key pair) and the Role that lets
    // its proxies read the config.
    let meshed: Vec<String> = shop
        .iter()
        .filter(|d| {
            kind_of(d) == "Namespace"
                && d["metadata"]["labels"][weft::api::INJECT_LABEL] == weft::api::INJECT_ENABLED
        })
        .map(|d| d["metadata"]["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(meshed.len(), 2, "{meshed:?}");
    let config_of = |ns: String| {
        let api = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
        async move {
            let cm = api.get_opt(CONFIG_MAP_NAME).await.ok()??;
            let managers: Vec<String> = cm
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .filter_map(|m| m.manager.clone())
                .collect();
            assert!(managers.contains(&OPERATOR.to_owned()), "{managers:?}");
            let json = cm.data.as_ref()?.get(CONFIG_KEY)?.clone();
            ProxyConfig::from_json(json.as_bytes()).ok()
        }
    };
    for ns in &meshed {
        let config = wait_for(Duration::from_secs(60), || config_of(ns.clone()))
            .await
            .unwrap_or_else(|| panic!("no {CONFIG_MAP_NAME} in {ns} within 60 s"));
        assert_eq!(&config.namespace, ns);
        let accounts: Vec<&str> = shop
            .iter()
            .filter(|d| kind_of(d) == "ServiceAccount" && d["metadata"]["namespace"] == **ns)
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        assert!(!accounts.is_empty(), "{ns}");
        let secrets = Api::<Secret>::namespaced(admin.clone(), ns);
        // One kubernetes.io/tls Secret per ServiceAccount, holding that
        // account's key pair and nothing of another's (the API server
        // validates the type's tls.crt and tls.key).
        for sa in &accounts {
            let name = identity_secret_name(sa);
            let secret = wait_for(Duration::from_secs(30), || {
                let secrets = secrets.clone();
                let name = name.clone();
                async move { secrets.get_opt(&name).await.ok()? }
            })
            .await
            .unwrap_or_else(|| panic!("{ns}/{name}, the identity of {sa}"));
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
            let keys: Vec<String> = secret.data.unwrap_or_default().into_keys().collect();
            assert_eq!(keys, [CA_CERT_KEY, "tls.crt", "tls.key"], "{ns}/{name}");
        }
        assert!(
            secrets
                .get_opt(LEGACY_IDENTITY_SECRET)
                .await
                .expect("get")
                .is_none(),
            "no Secret holds every account's keys"
        );
        // Granting it needs no escalation: the control plane holds the
        // rights the Role gives.
        let reader = wait_for(Duration::from_secs(30), || {
            let roles = Api::<Role>::namespaced(admin.clone(), ns);
            let bindings = Api::<RoleBinding>::namespaced(admin.clone(), ns);
            async move {
                roles.get_opt(CONFIG_READER).await.ok()??;
                bindings.get_opt(CONFIG_READER).await.ok()?
            }
        })
        .await;
        assert!(
            reader.is_some(),
            "{ns}: Role and RoleBinding {CONFIG_READER}"
        );
    }
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &sa_ns)
            .get_opt(CA_SECRET)
            .await
            .expect("get")
            .is_some(),
        "the mesh CA was created"
    );

    // The config carries the addresses the API server gave the Services.
    let shop_config = config_of("shop".into()).await.expect("shop's config");
    let catalog_ip = Api::<Service>::namespaced(admin.clone(), "shop")
        .get("catalog")
        .await
        .expect("catalog")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("an address from the API server");
    let in_config = shop_config
        .outbound
        .services
        .iter()
        .find(|s| s.name == "catalog" && s.namespace == "shop")
        .map(|s| s.cluster_ips.clone())
        .unwrap_or_default();
    assert_eq!(in_config, vec![catalog_ip]);

    // Issue 19: an EndpointSlice created through the API server (here by
    // hand: envtest runs no controller-manager, whose EndpointSlice
    // controller would write it) appears in the namespace's published
    // endpoints, through the control plane's RBAC for slices.
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "catalog-tier5", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "catalog"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.7.7"], "conditions": {"ready": true}, "zone": "zone-a"}],
    }))
    .expect("slice");
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(admin.clone(), "shop")
        .create(&PostParams::default(), &slice)
        .await
        .expect("the API server takes the slice");
    let published = wait_for(Duration::from_secs(30), || {
        let api = Api::<ConfigMap>::namespaced(admin.clone(), "shop");
        async move {
            let cm = api
                .get_opt(weft::config::ENDPOINTS_CONFIG_MAP_NAME)
                .await
                .ok()??;
            let json = cm.data.as_ref()?.get(weft::config::ENDPOINTS_KEY)?.clone();
            let doc = weft::config::EndpointsConfig::from_bytes(json.as_bytes()).ok()?;
            doc.services.contains_key("catalog.shop").then_some(doc)
        }
    })
    .await
    .expect("catalog's slice in shop's weft-endpoints within 30 s");
    let catalog = &published.services["catalog.shop"].groups;
    assert_eq!(catalog[0].endpoints[0].addresses, ["10.244.7.7"]);
    assert_eq!(catalog[0].endpoints[0].zone.as_deref(), Some("zone-a"));

    // Every policy of the example is Accepted, for its current generation.
    let policies: Vec<&Value> = shop
        .iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with(weft::api::GROUP))
        })
        .collect();
    assert!(policies.len() >= 5, "{}", policies.len());
    for policy in policies {
        let api = api_for(&admin, &discovery, policy);
        let name = policy["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let accepted = wait_for(Duration::from_secs(30), || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let obj = api.get(&name).await.ok()?;
                let generation = obj.metadata.generation?;
                obj.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| {
                        c["type"] == "Accepted"
                            && c["status"] == "True"
                            && c["observedGeneration"] == generation
                    })
                    .then_some(())
            }
        })
        .await;
        assert!(accepted.is_some(), "{} is not Accepted", describe(policy));
    }

    // Leading, Events, and the webhook's certificate, all through the
    // ServiceAccount's rights.
    let lease = Api::<Lease>::namespaced(admin.clone(), &sa_ns)
        .get("weft-operator")
        .await
        .expect("the operator's Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        Some(identity.clone())
    );
    let events = Api::<Event>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reporting_controller.as_deref() == Some(OPERATOR)),
        "an Event from {OPERATOR} (the mesh CA's creation)"
    );
    let bundle = wait_for(Duration::from_secs(30), || {
        let api = Api::<MutatingWebhookConfiguration>::all(admin.clone());
        let names = names.clone();
        async move {
            let mwc = api.get(&names.configuration).await.ok()?;
            let hook = mwc
                .webhooks?
                .into_iter()
                .find(|w| w.name == names.webhook)?;
            hook.client_config.ca_bundle.filter(|b| !b.0.is_empty())
        }
    })
    .await;
    assert!(bundle.is_some(), "the webhook's caBundle was set");
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &sa_ns)
            .get_opt(&names.secret)
            .await
            .expect("get")
            .is_some(),
        "the webhook's serving certificate Secret"
    );

    // An edit reaches the ConfigMap.
    let inventory_timeout = |c: &ProxyConfig| {
        c.outbound
            .services
            .iter()
            .find(|s| s.name == "inventory" && s.namespace == "shop")
            .and_then(|s| s.policy.as_ref())
            .and_then(|p| p.timeout_ms)
    };
    assert_eq!(inventory_timeout(&shop_config), Some(3000));
    Api::<weft::api::TrafficPolicy>::namespaced(admin.clone(), "shop")
        .patch(
            "inventory",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"timeout": "1s"}})),
        )
        .await
        .expect("edit");
    let updated = wait_for(Duration::from_secs(15), || async {
        config_of("shop".into())
            .await
            .filter(|c| inventory_timeout(c) == Some(1000))
    })
    .await;
    assert!(updated.is_some(), "the edit reached shop's ConfigMap");

    keeper.abort();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
}

/// A pod created through the real admission chain: the ServiceAccount
/// plugin (its ServiceAccount and token volume), then the webhook, in
/// this process, over TLS, registered by URL from the manifest's webhook
/// configuration. In the labelled namespace it comes back injected; in
/// an unlabelled one untouched.
#[tokio::test]
async fn tier5_pods_in_a_labelled_namespace_come_back_injected() {
    let Some(assets) = assets() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = start_cluster(&assets).await;
    let client = cluster.client.clone();

    // The webhook over HTTPS with a certificate for localhost.
    let now = SystemTime::now();
    let ca = MeshCa::generate("weft-webhook", now, Duration::from_secs(3600)).expect("ca");
    let leaf = ca
        .issue_server(&["localhost".to_owned()], now, Duration::from_secs(3600))
        .expect("leaf");
    let serving = Arc::new(ServingCert::default());
    serving
        .set(&leaf.cert_pem, &leaf.key_pem)
        .expect("serving cert");
    // Every namespace the API server asks about is meshed: the webhook's
    // namespaceSelector is what keeps it away from "plain".
    let hook = Arc::new(Webhook::new(
        InjectSettings::new("weft:envtest", ClusterCaps::from_version("1", "29")),
        Box::new(AllMeshed),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(webhook::serve_https(
        listener,
        serving,
        webhook::router(hook),
    ));

    let mut config = documents(&repo("manifests/20-webhook.yaml"))
        .into_iter()
        .find(|d| kind_of(d) == "MutatingWebhookConfiguration")
        .expect("MutatingWebhookConfiguration");
    config["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://localhost:{port}/mutate"),
        "caBundle": b64(ca.cert_pem()),
    });
    let config: MutatingWebhookConfiguration = serde_json::from_value(config).expect("config");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .expect("webhook registered");

    for (ns, label) in [("shop", true), ("plain", false)] {
        let mut labels = serde_json::Map::new();
        if label {
            labels.insert(
                weft::api::INJECT_LABEL.into(),
                json!(weft::api::INJECT_ENABLED),
            );
        }
        let namespace: Namespace =
            serde_json::from_value(json!({ "metadata": { "name": ns, "labels": labels } }))
                .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace created");
        // kube-controller-manager's serviceaccount controller would make
        // `default`; the admission plugin refuses pods without it.
        for name in ["default", "catalog"] {
            let sa: ServiceAccount =
                serde_json::from_value(json!({ "metadata": { "name": name } })).expect("sa");
            Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &sa)
                .await
                .expect("ServiceAccount created");
        }
    }
    let pod = |name: &str, service_account: Option<&str>| -> Pod {
        let mut spec = json!({ "containers": [{ "name": "catalog", "image": "shop/catalog:1",
            "ports": [{ "name": "http", "containerPort": 8080 }],
            "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } } }] });
        if let Some(sa) = service_account {
            spec["serviceAccountName"] = json!(sa);
        }
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { "app": "catalog" } },
            "spec": spec,
        }))
        .expect("pod")
    };
    let init_names = |p: &Pod| -> Vec<String> {
        p.spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .map(|c| c.name.clone())
            .collect()
    };

    // The API server picks up the webhook configuration within moments.
    let shop = Api::<Pod>::namespaced(client.clone(), "shop");
    let mut injected = None;
    for attempt in 0..40 {
        let created = shop
            .create(
                &PostParams::default(),
                &pod(&format!("catalog-{attempt}"), None),
            )
            .await
            .expect("pod created");
        if init_names(&created).contains(&"weft-proxy".to_owned()) {
            injected = Some(created);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let injected = injected.expect("a pod in the labelled namespace comes back injected");
    let read_back = shop
        .get(injected.metadata.name.as_deref().expect("name"))
        .await
        .expect("read back");
    assert_eq!(init_names(&read_back), ["weft-init", "weft-proxy"]);
    let spec = read_back.spec.clone().expect("spec");
    let probe = spec.containers[0]
        .readiness_probe
        .clone()
        .expect("probe")
        .http_get
        .expect("http");
    assert_eq!(probe.path.as_deref(), Some("/probe/8080/ready"));
    assert!(
        read_back
            .metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .contains_key("weft.dev/injected-version")
    );
    // What the ServiceAccount plugin did first: the pod's ServiceAccount,
    // and its own projected token volume mounted in the app; the webhook's
    // token volume beside it passed validation because of it.
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    assert_service_account_token_volume(&read_back);
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(volumes.contains(&"weft-token"), "{volumes:?}");
    // The identity volume is that ServiceAccount's own Secret.
    assert_eq!(
        identity_secret(&read_back).as_deref(),
        Some("weft-identity-default")
    );

    // A pod with a ServiceAccount of its own gets that one's key pair.
    let own = shop
        .create(&PostParams::default(), &pod("catalog-own", Some("catalog")))
        .await
        .expect("pod created");
    assert_eq!(init_names(&own), ["weft-init", "weft-proxy"]);
    assert_eq!(
        identity_secret(&own).as_deref(),
        Some("weft-identity-catalog")
    );

    let untouched = Api::<Pod>::namespaced(client.clone(), "plain")
        .create(&PostParams::default(), &pod("catalog-0", None))
        .await
        .expect("pod created");
    assert!(
        init_names(&untouched).is_empty(),
        "no injection outside labelled namespaces"
    );
    assert_eq!(untouched.spec.as_ref().expect("spec").containers.len(), 1);
    assert_service_account_token_volume(&untouched);
}

/// The volume the ServiceAccount admission plugin adds (`kube-api-access-*`,
/// a projected service-account token), mounted in the app container.
fn assert_service_account_token_volume(pod: &Pod) {
    let spec = pod.spec.as_ref().expect("spec");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name.starts_with("kube-api-access-"))
        .unwrap_or_else(|| panic!("no kube-api-access volume: {:?}", spec.volumes));
    let sources = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.clone())
        .unwrap_or_default();
    assert!(
        sources.iter().any(|s| s.service_account_token.is_some()),
        "{sources:?}"
    );
    let mounted = spec.containers[0].volume_mounts.iter().flatten().any(|m| {
        m.name == volume.name && m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"
    });
    assert!(mounted, "{:?}", spec.containers[0].volume_mounts);
}

/// The Secret the pod's identity volume mounts.
fn identity_secret(pod: &Pod) -> Option<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .find(|v| v.name == "weft-identity")
        .and_then(|v| v.secret.as_ref()?.secret_name.clone())
}

/// The CA rotation request and its status as a real API server keeps
/// them: the source of a rotation is fixed for its id (a transition rule,
/// judged on update), the rotation's status is written under its own
/// field manager over the version it read, and the compiler's conditions
/// written afterwards leave it in place.
#[tokio::test]
async fn tier5_a_ca_rotation_keeps_its_source_and_its_status_beside_the_conditions() {
    use weft::api::{CaRotationPhase, Mesh};
    let Some(assets) = assets() else { return };
    let (_one, cluster, discovery) = shop_cluster(&assets).await;
    let client = cluster.client.clone();
    let mesh = |rotation: Value| {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "Mesh",
            "metadata": { "name": "default" },
            "spec": { "ca": { "rotation": rotation } },
        })
    };
    apply_all(&client, &discovery, &[mesh(json!({ "id": "r1" }))]).await;
    assert_refused(
        apply(
            &client,
            &discovery,
            &mesh(json!({ "id": "r1", "source": { "secretName": "shop-root" } })),
        )
        .await,
        "spec.ca.rotation",
        "ca.rotation.source is fixed for a rotation",
    );
    assert_refused(
        apply(
            &client,
            &discovery,
            &mesh(json!({ "id": "r1", "gateTimeout": "1m" })),
        )
        .await,
        "spec.ca.rotation",
        "gateTimeout must be between 2m and 168h",
    );
    // A new id may name another source.
    apply_all(
        &client,
        &discovery,
        &[mesh(
            json!({ "id": "r2", "source": { "secretName": "shop-root", "anchorKey": "ca.crt" } }),
        )],
    )
    .await;

    let api: Api<Mesh> = Api::all(client.clone());
    let by = |manager: &'static str| PatchParams::apply(manager).force();
    let conditions = json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "Mesh",
        "status": { "observedGeneration": 1, "conditions": [{
            "type": "CertificateAuthority", "status": "True", "reason": "Ready", "message": "ok",
            "lastTransitionTime": "2026-12-07T10:00:00Z", "observedGeneration": 1,
        }] },
    });
    api.patch_status("default", &by(OPERATOR), &Patch::Apply(&conditions))
        .await
        .expect("the compiler's conditions");
    let read = api.get("default").await.expect("read");
    let rotation = json!({ "ca": { "rotation": {
        "id": "r2", "phase": "AddingRoot", "since": "2026-12-07T10:00:00Z",
        "retry": 0, "message": "adding root", "oldRoot": "00aa", "newRoot": "11bb",
        "source": { "secretName": "shop-root", "certKey": "tls.crt", "keyKey": "tls.key", "anchorKey": "ca.crt" },
    } } });
    weft::operator::canaries::apply_status_as(
        &api,
        "default",
        weft::operator::carotations::FIELD_MANAGER,
        read.resource_version(),
        rotation.clone(),
    )
    .await
    .expect("the rotation's status over the version it read");
    // Someone edits the Mesh: a write over the version read before is
    // refused.
    let read = api.get("default").await.expect("read again");
    apply_all(&client, &discovery, &[mesh(json!({ "id": "r2", "action": "Pause", "source": { "secretName": "shop-root", "anchorKey": "ca.crt" } }))]).await;
    let stale = weft::operator::canaries::apply_status_as(
        &api,
        "default",
        weft::operator::carotations::FIELD_MANAGER,
        read.resource_version(),
        rotation,
    )
    .await;
    assert!(
        matches!(&stale, Err(kube::Error::Api(e)) if e.code == 409),
        "{stale:?}"
    );
    api.patch_status("default", &by(OPERATOR), &Patch::Apply(&conditions))
        .await
        .expect("the compiler's conditions again");
    let status = api
        .get_status("default")
        .await
        .expect("read back")
        .status
        .expect("a status");
    assert_eq!(status.conditions.len(), 1);
    assert_eq!(
        status.ca.and_then(|c| c.rotation).map(|r| r.phase),
        Some(CaRotationPhase::AddingRoot)
    );
}
