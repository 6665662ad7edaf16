//! Tier 5: a real kube-apiserver (with etcd) from `KUBEBUILDER_ASSETS`
//! (`setup-envtest use -p path`), and the real webhook in this process.
//! Run with `make test-apiserver`, which fails, naming what is missing,
//! without the binaries. Under `make test` (no binaries on CI) every test
//! here says SKIPPED loudly instead, and `make test` prints that line.
//!
//! - The webhook is registered by URL with its caBundle; a pod created in a
//!   labelled namespace comes back injected, one in an unlabelled namespace
//!   untouched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;
use weft::identity::MeshCa;
use weft::inject::webhook::{self, AllMeshed, ServingCert, Webhook};
use weft::inject::{ClusterCaps, InjectSettings};

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

/// Child processes killed on drop, even when the test panics.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

/// A running etcd + kube-apiserver and an admin client for it.
struct Cluster {
    _procs: Procs,
    _dir: tempfile::TempDir,
    client: kube::Client,
}

async fn start_cluster(assets: &Path) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = envtest_pki();
    let (serving, admin) = (&pki.serving, &pki.admin);
    let sa_key = rcgen::KeyPair::generate().expect("sa key").serialize_pem();
    let ca_file = write(d, "ca.crt", &pki.ca_pem);
    let etcd_port = free_port();
    let api_port = free_port();
    let etcd = Command::new(assets.join("etcd"))
        .args([
            "--data-dir",
            &d.join("etcd").display().to_string(),
            "--listen-client-urls",
            &format!("http://127.0.0.1:{etcd_port}"),
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{etcd_port}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd starts");
    let apiserver = Command::new(assets.join("kube-apiserver"))
        .args([
            &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            &format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1",
            &format!("--tls-cert-file={}", write(d, "apiserver.crt", &serving.0)),
            &format!(
                "--tls-private-key-file={}",
                write(d, "apiserver.key", &serving.1)
            ),
            &format!("--client-ca-file={ca_file}"),
            &format!("--service-account-key-file={}", write(d, "sa.key", &sa_key)),
            &format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ),
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kube-apiserver starts");
    let procs = Procs(vec![etcd, apiserver]);

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
    let client = kube::Client::try_from(config).expect("client");
    for _ in 0..120 {
        if client.apiserver_version().await.is_ok()
            && Api::<Namespace>::all(client.clone())
                .get_opt("default")
                .await
                .ok()
                .flatten()
                .is_some()
        {
            return Cluster {
                _procs: procs,
                _dir: dir,
                client,
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("kube-apiserver did not become ready within 60 s");
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

#[tokio::test]
async fn tier5_pods_in_a_labelled_namespace_come_back_injected() {
    let Some(assets) = assets() else { return };
    let cluster = start_cluster(&assets).await;
    let client = cluster.client.clone();

    // The webhook, in this process, over HTTPS with a certificate for localhost.
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

    // The manifest's webhook, registered by URL with its caBundle.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/20-webhook.yaml"),
    )
    .expect("manifest");
    let mut config: serde_json::Value = serde_norway::from_str(&text).expect("yaml");
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
            labels.insert("weft.dev/inject".into(), json!("enabled"));
        }
        let namespace: Namespace =
            serde_json::from_value(json!({ "metadata": { "name": ns, "labels": labels } }))
                .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace created");
        let sa: ServiceAccount =
            serde_json::from_value(json!({ "metadata": { "name": "default" } })).expect("sa");
        let _ = Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await;
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "catalog-0", "labels": { "app": "catalog" } },
        "spec": { "containers": [{ "name": "catalog", "image": "shop/catalog:1",
            "ports": [{ "name": "http", "containerPort": 8080 }],
            "readinessProbe": { "httpGet": { "path": "/ready", "port": "http" } } }] },
    }))
    .expect("pod");

    // The webhook configuration may take a moment to be picked up.
    let shop = Api::<Pod>::namespaced(client.clone(), "shop");
    let mut injected = None;
    for attempt in 0..40 {
        let mut p = pod.clone();
        p.metadata.name = Some(format!("catalog-{attempt}"));
        let created = shop
            .create(&PostParams::default(), &p)
            .await
            .expect("pod created");
        let has_proxy = created
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.name == "weft-proxy"));
        if has_proxy {
            injected = Some(created);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let injected = injected.expect("a pod in the labelled namespace comes back injected");
    let name = injected.metadata.name.clone().expect("name");
    let read_back = shop.get(&name).await.expect("read back");
    let spec = read_back.spec.expect("spec");
    let inits: Vec<String> = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(inits, vec!["weft-init", "weft-proxy"]);
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
            .unwrap_or_default()
            .contains_key("weft.dev/injected-version")
    );

    let plain = Api::<Pod>::namespaced(client.clone(), "plain");
    let untouched = plain
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod created");
    let spec = untouched.spec.expect("spec");
    assert!(
        spec.init_containers.unwrap_or_default().is_empty(),
        "no injection outside labelled namespaces"
    );
    assert_eq!(spec.containers.len(), 1);
}

/// Server-side applies every document of `yaml` as `kubectl apply
/// --server-side` would, resolving kinds through discovery.
async fn apply_all(client: &kube::Client, discovery: &kube::Discovery, yaml: &str) {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use serde::Deserialize;
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let v = serde_json::Value::deserialize(doc).expect("yaml");
        if v.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(v.clone()).expect("object");
        let gvk =
            kube::api::GroupVersionKind::try_from(obj.types.as_ref().expect("types")).expect("gvk");
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{gvk:?} unknown"));
        let name = obj.metadata.name.clone().expect("name");
        let api: Api<DynamicObject> = match (&caps.scope, obj.metadata.namespace.as_deref()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &ar)
            }
            (kube::discovery::Scope::Namespaced, None) => {
                Api::namespaced_with(client.clone(), "default", &ar)
            }
            (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
        };
        api.patch(
            &name,
            &PatchParams::apply("tier5-test").force(),
            &Patch::Apply(&v),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {} {name}: {e}", gvk.kind));
    }
}

async fn install_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("crds/") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        let crd: CustomResourceDefinition = serde_norway::from_str(&text).expect("crd");
        let name = crd.metadata.name.clone().expect("name");
        api.patch(
            &name,
            &PatchParams::apply("tier5-test"),
            &Patch::Apply(&crd),
        )
        .await
        .expect("crd applied");
        names.push(name);
    }
    for name in names {
        let established = wait_for(Duration::from_secs(30), || {
            let api = api.clone();
            let name = name.clone();
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
        assert!(established.is_some(), "CRD {name} established");
    }
}

/// Polls `f` every 200 ms until it returns Some or `limit` passes.
async fn wait_for<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[tokio::test]
async fn tier5_the_operator_reconciles_the_shop_into_config_maps_secrets_and_status() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Patch, PatchParams};
    use std::sync::atomic::AtomicBool;
    use weft::api::TrafficPolicy;
    use weft::config::ProxyConfig;

    let Some(assets) = assets() else { return };
    let cluster = start_cluster(&assets).await;
    let client = cluster.client.clone();
    install_crds(&client).await;
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "weft-system"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("weft-system");
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let shop = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shop");
    let mut files: Vec<_> = std::fs::read_dir(&shop)
        .expect("examples/shop")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        apply_all(
            &client,
            &discovery,
            &std::fs::read_to_string(f).expect("read"),
        )
        .await;
    }

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(weft::operator::run(
        client.clone(),
        weft::operator::Options {
            namespace: "weft-system".into(),
            lease: "weft-operator".into(),
            identity: "tier5-replica".into(),
            lease_duration: Duration::from_secs(15),
            concurrency: 4,
        },
        Arc::new(weft::operator::metrics::Metrics::default()),
        Arc::new(AtomicBool::new(false)),
        async move {
            let _ = stopped.await;
        },
    ));

    let config_of = |ns: &'static str| {
        let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
        async move {
            let cm = api.get_opt("weft-proxy-config").await.ok()??;
            let managers: Vec<String> = cm
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .filter_map(|m| m.manager.clone())
                .collect();
            assert!(
                managers.contains(&"weft-operator".to_owned()),
                "{managers:?}"
            );
            let json = cm.data.as_ref()?.get("config.json")?.clone();
            ProxyConfig::from_json(json.as_bytes()).ok()
        }
    };
    let shop_config = wait_for(Duration::from_secs(30), || config_of("shop"))
        .await
        .expect("shop's ConfigMap within 30 s");
    let payments_config = wait_for(Duration::from_secs(10), || config_of("payments"))
        .await
        .expect("payments' ConfigMap");
    assert_eq!(shop_config.namespace, "shop");
    assert_eq!(payments_config.namespace, "payments");

    let secrets = Api::<Secret>::namespaced(client.clone(), "shop");
    let identity = wait_for(Duration::from_secs(10), || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("weft-identity").await.ok()? }
    })
    .await
    .expect("shop's identity Secret");
    let keys: Vec<&String> = identity.data.as_ref().expect("data").keys().collect();
    assert!(keys.iter().any(|k| k.as_str() == "ca.crt"), "{keys:?}");
    assert!(
        keys.iter().any(|k| k.as_str() == "checkout.crt"),
        "{keys:?}"
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), "weft-system")
            .get_opt("weft-ca")
            .await
            .expect("get")
            .is_some(),
        "the mesh CA was created"
    );

    let policies = Api::<TrafficPolicy>::namespaced(client.clone(), "shop");
    let accepted = wait_for(Duration::from_secs(10), || {
        let policies = policies.clone();
        async move {
            let p = policies.get("inventory").await.ok()?;
            let st = p.status?;
            let ok = st.conditions.iter().any(|c| {
                c.type_ == "Accepted"
                    && c.status == "True"
                    && c.observed_generation == p.metadata.generation
            });
            ok.then_some(())
        }
    })
    .await;
    assert!(
        accepted.is_some(),
        "TrafficPolicy shop/inventory is Accepted"
    );

    // An edit reaches the ConfigMap within seconds.
    let inventory_timeout = |c: &ProxyConfig| {
        c.outbound
            .services
            .iter()
            .find(|s| s.name == "inventory" && s.namespace == "shop")
            .and_then(|s| s.policy.as_ref())
            .and_then(|p| p.timeout_ms)
    };
    assert_eq!(inventory_timeout(&shop_config), Some(3000));
    let edited = std::time::Instant::now();
    policies
        .patch(
            "inventory",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"timeout": "1s"}})),
        )
        .await
        .expect("edit");
    let updated = wait_for(Duration::from_secs(10), || async {
        config_of("shop")
            .await
            .filter(|c| inventory_timeout(c) == Some(1000))
    })
    .await;
    assert!(updated.is_some(), "the edit reached shop's ConfigMap");
    eprintln!("policy edit -> ConfigMap: {:?}", edited.elapsed());

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
}
