//! Tier 3: two real proxies on loopback with identities minted by the
//! mesh's own CA: mTLS between them (checked on the wire), PERMISSIVE and
//! STRICT admission, refused certificates, AccessPolicy, the application's
//! own TLS passing through, and certificate rotation under load.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft::identity::{CA_LIFETIME, MeshCa, SpiffeId};

use support::mesh::*;
use support::*;

const CHECKOUT_ID: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

/// An app that answers with the caller identity its proxy handed it.
async fn app() -> Upstream {
    Upstream::start(Arc::new(|_, req| {
        let who = req
            .headers()
            .get("weft-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        (200, format!("client-id={who}"), Duration::ZERO)
    }))
    .await
}

/// An app that answers with the HTTP version it received and whether the
/// upgrade marker reached it.
async fn version_app() -> Upstream {
    Upstream::start(Arc::new(|_, req| {
        let marker = req.headers().contains_key("weft-orig-proto");
        (
            200,
            format!("{:?} marker={marker}", req.version()),
            Duration::ZERO,
        )
    }))
    .await
}

/// A TCP relay that records what the client side sends.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(target: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut dr, mut dw) = down.split();
                    let (mut ur, mut uw) = up.split();
                    let upstream = async {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = dr.read(&mut buf).await {
                            if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            s.lock().expect("tap").extend_from_slice(&buf[..n]);
                        }
                        let _ = uw.shutdown().await;
                    };
                    let downstream = async {
                        let _ = tokio::io::copy(&mut ur, &mut dw).await;
                        let _ = dw.shutdown().await;
                    };
                    tokio::join!(upstream, downstream);
                });
            }
        });
        Self { addr, seen }
    }

    fn bytes(&self) -> Vec<u8> {
        self.seen.lock().expect("tap").clone()
    }
}

/// Handshakes with a mesh server as a meshed client would and returns the
/// expiry (unix seconds) of the certificate the server presented.
async fn presented_expiry(pki: &Pki, addr: SocketAddr) -> u64 {
    let tls = mesh_connect(pki, addr, "probe-client").await;
    let cert = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
    weft::identity::inspect_der(&cert)
        .expect("certificate")
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs()
}

/// The content types of the TLS records in `wire`, which must be nothing
/// but whole TLS records.
fn tls_records(wire: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "a truncated record header");
        let (kind, version) = (rest[0], rest[1]);
        assert!(
            matches!(kind, 0x14..=0x17) && version == 3,
            "not a TLS record: {:?}",
            String::from_utf8_lossy(&rest[..rest.len().min(40)])
        );
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        assert!(rest.len() >= 5 + len, "a truncated record");
        kinds.push(kind);
        rest = &rest[5 + len..];
    }
    kinds
}

/// The config of the client namespace: `payments.shop` served by the
/// `payments` identity at `endpoint`.
fn client_config(endpoint: SocketAddr, strict: bool) -> Value {
    let mut svc = service("payments", &[endpoint], None, json!([]));
    svc["mesh"] = json!({ "namespace": "shop", "serviceAccounts": ["payments"], "strict": strict });
    config(vec![svc])
}

/// `checkout`'s proxy (identity shop/checkout) sending `payments.shop:80`
/// to `endpoint`, meshed (`strict`: never falling back to plaintext), and
/// its identity dir.
async fn checkout_client(pki: &Pki, endpoint: SocketAddr, strict: bool) -> (TestProxy, IdDir) {
    let cid = pki.dir("shop", "checkout");
    let client = meshed(
        &client_config(endpoint, strict),
        &["payments.shop:80"],
        &cid,
        &[],
    )
    .await;
    (client, cid)
}

/// checkout's proxy calling payments' proxy (in `mode`) in front of
/// `payments`: the client proxy, the server proxy, and their identity dirs
/// (server's, then client's).
async fn checkout_to_payments(
    pki: &Pki,
    payments: &Upstream,
    mode: &str,
) -> (TestProxy, TestProxy, IdDir, IdDir) {
    let (server, sid) = server_proxy(
        pki,
        &server_config(mode, &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let (client, cid) = checkout_client(pki, server.running.inbound[0], true).await;
    (client, server, sid, cid)
}

/// A raw plaintext HTTP/1.1 request; returns what came back before the
/// connection closed (empty: closed without an answer).
async fn raw_plaintext(addr: SocketAddr) -> String {
    speak_after(
        addr,
        Duration::ZERO,
        "GET /charges HTTP/1.1\r\nhost: payments\r\nconnection: close\r\n\r\n",
    )
    .await
}

#[tokio::test]
async fn meshed_hops_are_mtls_on_the_wire_and_the_server_app_learns_the_caller() {
    let pki = Pki::new();
    let payments = app().await;
    let (server, _sid) = server_proxy(
        &pki,
        &server_config("strict", &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let tap = Tap::start(server.running.inbound[0]).await;
    let (client, _cid) = checkout_client(&pki, tap.addr, true).await;

    let r = get(&client.outbound_url(0)).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, format!("client-id={CHECKOUT_ID}").as_str())
    );
    let h2 = send(&h2_client(), "GET", &client.outbound_url(0), &[]).await;
    assert_eq!(h2.status, 200, "h2 inside mesh TLS too: {h2:?}");

    let wire = tap.bytes();
    let kinds = tls_records(&wire);
    assert_eq!(
        kinds.first(),
        Some(&0x16),
        "the hop opens with a TLS handshake"
    );
    assert!(
        kinds.contains(&0x17),
        "the requests travel as TLS application data: {kinds:?}"
    );
    let text = String::from_utf8_lossy(&wire);
    assert!(
        !text.contains("GET /") && !text.contains("HTTP/1.1"),
        "no plaintext HTTP on the wire"
    );
    // Both proxies count the hop as TLS.
    assert!(
        client
            .metric("weft_proxy_requests_total{direction=\"outbound\",src=\"unknown\",dst=\"payments.shop:80\",route=\"default\",status_class=\"2xx\",tls=\"true\"}")
            .await
            >= 2.0
    );
    assert!(
        server
            .metric("weft_proxy_tcp_connections_total{direction=\"inbound\",protocol=\"http2\",tls=\"true\"")
            .await
            >= 1.0
    );
    assert!(
        server
            .metrics()
            .await
            .contains(&format!("src=\"{CHECKOUT_ID}\"")),
        "inbound requests are counted by the caller's identity"
    );
}

#[tokio::test]
async fn strict_refuses_plaintext_but_serves_the_probe_port_and_excepted_ports() {
    let pki = Pki::new();
    let payments = app().await;
    let health = app().await;
    let port = payments.addr.port();
    let (server, _sid) = probe_server(
        &pki,
        &server_config("strict", &[health.addr.port()], json!([])),
        &[port, health.addr.port()],
        &["--probe-target", &format!("{port}/healthz")],
    )
    .await;

    // Plaintext to a guarded port: closed, the app never sees it.
    let answer = raw_plaintext(server.running.inbound[0]).await;
    assert_eq!(answer, "", "closed without an answer");
    assert_eq!(payments.hits(), 0, "the app never saw the request");
    assert_eq!(
        server
            .metric(&format!(
                "weft_proxy_inbound_plaintext_rejected_total{{port=\"{port}\",src_addr="
            ))
            .await,
        1.0
    );
    // The excepted port and the probe port still answer plaintext.
    assert_eq!(
        get(&format!("http://{}/", server.running.inbound[1]))
            .await
            .status,
        200
    );
    let probe = format!("http://{}/probe/{port}/healthz", server.running.probe);
    assert_eq!(get(&probe).await.status, 200);
    assert_eq!(payments.hits(), 1, "only the probe reached the guarded app");

    // A meshed client still gets through.
    let (client, _cid) = checkout_client(&pki, server.running.inbound[0], true).await;
    assert_eq!(get(&client.outbound_url(0)).await.status, 200);
}

/// A payments proxy with an identity in front of `app_ports`, with `extra`
/// flags (the probe targets); ready.
async fn probe_server(
    pki: &Pki,
    config: &Value,
    app_ports: &[u16],
    extra: &[&str],
) -> (TestProxy, IdDir) {
    let id = pki.dir("shop", "payments");
    let mut args: Vec<String> = app_ports
        .iter()
        .flat_map(|p| ["--inbound-map".to_owned(), format!("127.0.0.1:0={p}")])
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = meshed(config, &[], &id, &args).await;
    (p, id)
}

/// An app that records `METHOD uri` of every request it receives.
async fn recording_app() -> (Upstream, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Upstream::start(Arc::new(move |_, req| {
        s.lock()
            .expect("seen")
            .push(format!("{} {}", req.method(), req.uri()));
        (200, "app".into(), Duration::ZERO)
    }))
    .await;
    (app, seen)
}

fn seen(log: &Mutex<Vec<String>>) -> Vec<String> {
    log.lock().expect("seen").clone()
}

#[tokio::test]
async fn the_probe_port_forwards_only_the_probes_the_injector_rewrote() {
    let pki = Pki::new();
    let (payments, log) = recording_app().await;
    let other = app().await;
    let port = payments.addr.port();
    let targets = format!("{port}/healthz,{port}/ready");
    let (server, _sid) = probe_server(
        &pki,
        &server_config("strict", &[], json!([])),
        &[port, other.addr.port()],
        &["--probe-target", &targets],
    )
    .await;
    let base = format!("http://{}/probe", server.running.probe);
    let c = client();

    // The rewritten probes reach the app, GET and HEAD, with their query.
    let r = get(&format!("{base}/{port}/healthz")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "app"), "{r:?}");
    assert_eq!(r.proxy_error, None);
    assert_eq!(
        get(&format!("{base}/{port}/ready?full=1")).await.status,
        200
    );
    let head = send(&c, "HEAD", &format!("{base}/{port}/healthz"), &[]).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""), "{head:?}");
    let forwarded = ["GET /healthz", "GET /ready?full=1", "HEAD /healthz"];
    assert_eq!(seen(&log), forwarded);

    // Any other method, even on a probe path: 405, never forwarded.
    for (method, path) in [
        ("POST", "healthz"),
        ("PUT", "healthz"),
        ("DELETE", "ready"),
        ("PATCH", "healthz"),
        ("OPTIONS", "healthz"),
        ("POST", "charges"),
    ] {
        let r = send(&c, method, &format!("{base}/{port}/{path}"), &[]).await;
        assert_eq!(r.status, 405, "{method} {path}: {r:?}");
        assert_eq!(r.proxy_error.as_deref(), Some("method-not-allowed"));
        assert!(
            r.body.contains(&format!("method {method} is not allowed"))
                && r.body.contains("GET and HEAD"),
            "{}",
            r.body
        );
    }

    // Any other path or port of the app: 403, never forwarded.
    let r = get(&format!("{base}/{port}/charges")).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (403, Some("forbidden"))
    );
    assert!(
        r.body.contains(&format!(
            "port {port} path /charges is not a probe the injector rewrote"
        )),
        "{}",
        r.body
    );
    for path in [
        format!("{port}/charges?x=/healthz"),
        format!("{port}/healthz/../charges"),
        format!("{port}/healthz%2F..%2Fcharges"),
        format!("{port}/healthz/"),
        format!("{port}/"),
        port.to_string(),
        format!("{}/healthz", other.addr.port()),
    ] {
        let r = get(&format!("{base}/{path}")).await;
        assert_eq!(
            (r.status, r.proxy_error.as_deref()),
            (403, Some("forbidden")),
            "{path}: {r:?}"
        );
    }

    // The admin server through the probe port: refused; the proxy runs on.
    let admin = server.running.admin.port();
    for (method, path, status) in [
        ("GET", "ready", 403),
        ("GET", "shutdown", 403),
        ("POST", "shutdown", 405),
    ] {
        let r = send(&c, method, &format!("{base}/{admin}/{path}"), &[]).await;
        assert_eq!(r.status, status, "{method} {path}: {r:?}");
    }
    assert!(!server.proxy.drain.started(), "the proxy is not draining");
    assert_eq!(
        get(&format!("http://{}/ready", server.running.admin))
            .await
            .status,
        200
    );

    assert_eq!(seen(&log), forwarded, "the app saw the probes only");
    assert_eq!(payments.hits(), 3);
    assert_eq!(other.hits(), 0, "the pod's other port saw nothing");
}

#[tokio::test]
async fn the_probe_port_serves_the_paths_the_kubelet_escapes_as_the_injector_registered_them() {
    use k8s_openapi::api::core::v1::Pod;
    use weft::inject::{ClusterCaps, InjectSettings, NamespaceInfo, PROXY_CONTAINER, inject};
    let pki = Pki::new();
    let (payments, log) = recording_app().await;
    let port = payments.addr.port();
    // The injector's own rewrite of probes whose paths the kubelet escapes.
    let http = |path: &str| json!({ "httpGet": { "path": path, "port": port } });
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "payments-0" },
        "spec": { "containers": [{
            "name": "payments",
            "image": "shop/payments",
            "livenessProbe": http("/health check"),
            "readinessProbe": http("/sant\u{e9}"),
            "startupProbe": http("/ready?full=1"),
        }] }
    }))
    .expect("a pod");
    let caps = ClusterCaps {
        native_sidecars: true,
    };
    let injection = inject(
        &pod,
        &NamespaceInfo::meshed("shop"),
        &InjectSettings::new("weft:test", caps),
    );
    let mut value = serde_json::to_value(&pod).expect("json");
    json_patch::patch(&mut value, &injection.patch).expect("the patch applies");
    let spec = serde_json::from_value::<Pod>(value)
        .expect("a pod")
        .spec
        .expect("spec");
    let app = &spec.containers[0];
    let probes: Vec<String> = [
        &app.liveness_probe,
        &app.readiness_probe,
        &app.startup_probe,
    ]
    .into_iter()
    .map(|p| {
        let get = p.clone().and_then(|p| p.http_get).expect("an HTTP probe");
        get.path.expect("a path")
    })
    .collect();
    // What the kubelet sends: Go's net/url leaves these paths as they are.
    assert_eq!(
        probes,
        [
            format!("/probe/{port}/health%20check"),
            format!("/probe/{port}/sant%C3%A9"),
            format!("/probe/{port}/ready?full=1"),
        ]
    );
    let proxy = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == PROXY_CONTAINER)
        .expect("the proxy");
    let targets = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEFT_PROBE_TARGETS")
        .and_then(|e| e.value.clone())
        .expect("probe targets");
    let (server, _sid) = probe_server(
        &pki,
        &server_config("strict", &[], json!([])),
        &[port],
        &["--probe-target", &targets],
    )
    .await;
    let base = format!("http://{}", server.running.probe);
    let c = client();

    // The kubelet's requests reach the app; so does another spelling of a
    // registered path, as the path registered.
    for path in &probes {
        let r = get(&format!("{base}{path}")).await;
        assert_eq!((r.status, r.proxy_error.as_deref()), (200, None), "{path}");
    }
    for path in ["sant%c3%a9", "health%20ch%65ck"] {
        let r = get(&format!("{base}/probe/{port}/{path}")).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    let head = send(&c, "HEAD", &format!("{base}{}", probes[0]), &[]).await;
    assert_eq!(head.status, 200, "{head:?}");
    let forwarded = [
        "GET /health%20check",
        "GET /sant%C3%A9",
        "GET /ready?full=1",
        "GET /sant%C3%A9",
        "GET /health%20check",
        "HEAD /health%20check",
    ];
    assert_eq!(seen(&log), forwarded);

    // A path near a registered one, however close: 403, never forwarded.
    for path in [
        "health+check",
        "health%2520check",
        "health%20check/",
        "health%20checks",
        "health",
        "sant%C3",
        "sante",
        "sant%C3%A9%2F..%2Fcharges",
        "sant%C3%A9/../charges",
        "ready%3Ffull=1",
    ] {
        let r = get(&format!("{base}/probe/{port}/{path}")).await;
        assert_eq!(
            (r.status, r.proxy_error.as_deref()),
            (403, Some("forbidden")),
            "{path}: {r:?}"
        );
    }
    // Nor any other method, nor the proxy's own ports however spelt.
    let r = send(&c, "POST", &format!("{base}{}", probes[1]), &[]).await;
    assert_eq!(r.status, 405, "{r:?}");
    let admin = server.running.admin.port();
    for path in ["re%61dy", "sh%75tdown"] {
        let r = get(&format!("{base}/probe/{admin}/{path}")).await;
        assert_eq!(
            (r.status, r.proxy_error.as_deref()),
            (403, Some("forbidden")),
            "{path}: {r:?}"
        );
    }
    assert!(!server.proxy.drain.started(), "the proxy is not draining");
    assert_eq!(seen(&log), forwarded, "the app saw the probes only");
}

#[tokio::test]
async fn the_probe_port_answers_the_tcp_probes_the_injector_rewrote_by_connecting_to_the_app() {
    let pki = Pki::new();
    // The app's port accepts (the kernel completes the handshake) without
    // the test accepting, so the connections the proxy made can be counted.
    let db = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the app");
    db.set_nonblocking(true).expect("nonblocking");
    let port = db.local_addr().expect("addr").port();
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind another port");
    other.set_nonblocking(true).expect("nonblocking");
    let (server, _sid) = probe_server(
        &pki,
        &server_config("strict", &[], json!([])),
        &[port],
        &["--probe-target", &format!("tcp:{port}")],
    )
    .await;
    let base = format!("http://{}", server.running.probe);
    let c = client();
    let accepted = |l: &std::net::TcpListener| std::iter::from_fn(|| l.accept().ok()).count();

    // The app listens: 200, GET and HEAD; each one connection to the app.
    let r = get(&format!("{base}/probe-tcp/{port}")).await;
    assert_eq!((r.status, r.proxy_error.as_deref()), (200, None), "{r:?}");
    let head = send(&c, "HEAD", &format!("{base}/probe-tcp/{port}"), &[]).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""), "{head:?}");
    assert_eq!(accepted(&db), 2, "the proxy connected once per probe");

    // Never any other method, nor the HTTP form of the port.
    let r = send(&c, "POST", &format!("{base}/probe-tcp/{port}"), &[]).await;
    assert_eq!(r.status, 405, "{r:?}");
    for path in [format!("probe/{port}/"), format!("probe/{port}")] {
        let r = get(&format!("{base}/{path}")).await;
        assert_eq!(
            (r.status, r.proxy_error.as_deref()),
            (403, Some("forbidden")),
            "{path}: {r:?}"
        );
    }
    // A port of the pod that is not a registered TCP probe: 403, untouched.
    let r = get(&format!(
        "{base}/probe-tcp/{}",
        other.local_addr().expect("addr").port()
    ))
    .await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (403, Some("forbidden")),
        "{r:?}"
    );
    assert!(
        r.body.contains("is not a probe the injector rewrote"),
        "{}",
        r.body
    );
    assert_eq!(accepted(&other), 0, "the unregistered port saw nothing");
    // The proxy's own admin port: 403.
    let admin = server.running.admin.port();
    let r = get(&format!("{base}/probe-tcp/{admin}")).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (403, Some("forbidden")),
        "{r:?}"
    );
    assert!(
        r.body
            .contains(&format!("port {admin} is a port of the weft proxy itself")),
        "{}",
        r.body
    );
    // A malformed port: 400.
    let r = get(&format!("{base}/probe-tcp/{port}x")).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (400, Some("bad-request")),
        "{r:?}"
    );
    assert_eq!(accepted(&db), 0, "only the allowed probes reached the app");

    // The app's listener closed: 503, marked as the proxy's answer.
    drop(db);
    let r = get(&format!("{base}/probe-tcp/{port}")).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (503, Some("connect-error")),
        "{r:?}"
    );
    assert!(
        r.body
            .contains(&format!("connecting to 127.0.0.1:{port} failed")),
        "{}",
        r.body
    );
    let head = send(&c, "HEAD", &format!("{base}/probe-tcp/{port}"), &[]).await;
    assert_eq!(head.status, 503, "{head:?}");
    assert!(!server.proxy.drain.started(), "the proxy runs on");
    // The probes never went through the inbound listener: no plaintext
    // traffic for a STRICT rollout to see.
    assert!(
        !server
            .metrics()
            .await
            .contains("weft_proxy_inbound_plaintext_connections_total{"),
        "TCP probes are not counted as plaintext connections"
    );
}

#[tokio::test]
async fn the_probe_port_never_forwards_to_the_proxys_own_ports_even_when_configured() {
    let pki = Pki::new();
    let (payments, log) = recording_app().await;
    let port = payments.addr.port();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let targets = format!("{admin}/shutdown,{admin}/ready,{admin}/live,{port}/healthz");
    // The admin port is fixed up front so that a probe target can name it.
    let id = pki.dir("shop", "payments");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    let strict = server_config("strict", &[], json!([])).to_string();
    write_atomic(&config, strict.as_bytes());
    let flags = format!(
        "proxy --no-transparent --admin 127.0.0.1:{admin} --probe 127.0.0.1:0 \
         --inbound-map 127.0.0.1:0={port} --probe-target {targets} --config"
    );
    let argv: Vec<String> = (flags.split_whitespace().map(str::to_owned))
        .chain([config.display().to_string()])
        .chain(id.args())
        .collect();
    let args = parse_args(&argv);
    let proxy = weft::proxy::Proxy::new(&args).expect("proxy");
    let running = weft::proxy::start(&args, proxy.clone())
        .await
        .expect("proxy starts");
    let server = TestProxy {
        proxy,
        running,
        dir,
    };
    wait_ready(&server).await;
    assert_eq!(server.running.admin.port(), admin);
    let base = format!("http://{}/probe", server.running.probe);
    let c = client();
    for path in ["ready", "live", "shutdown"] {
        let r = get(&format!("{base}/{admin}/{path}")).await;
        assert_eq!(
            (r.status, r.proxy_error.as_deref()),
            (403, Some("forbidden")),
            "{path}: {r:?}"
        );
        assert!(
            r.body
                .contains(&format!("port {admin} is a port of the weft proxy itself")),
            "{}",
            r.body
        );
    }
    let r = send(&c, "POST", &format!("{base}/{admin}/shutdown"), &[]).await;
    assert_eq!(r.status, 405, "{r:?}");
    // Nor the inbound listener (a loop back in past STRICT) or itself.
    let inbound = server.running.inbound[0].port();
    let probe = server.running.probe.port();
    for path in [
        format!("{inbound}/healthz"),
        format!("{probe}/probe/{port}/healthz"),
    ] {
        assert_eq!(get(&format!("{base}/{path}")).await.status, 403, "{path}");
    }
    assert!(!server.proxy.drain.started(), "the proxy is not draining");
    assert_eq!(
        get(&format!("http://127.0.0.1:{admin}/ready")).await.status,
        200
    );

    assert_eq!(get(&format!("{base}/{port}/healthz")).await.status, 200);
    assert_eq!(seen(&log), ["GET /healthz"]);
}

#[tokio::test]
async fn without_probe_targets_the_probe_port_forwards_nothing() {
    let pki = Pki::new();
    let (payments, log) = recording_app().await;
    let port = payments.addr.port();
    let (server, _sid) =
        probe_server(&pki, &server_config("strict", &[], json!([])), &[port], &[]).await;
    let r = get(&format!(
        "http://{}/probe/{port}/healthz",
        server.running.probe
    ))
    .await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (403, Some("forbidden")),
        "{r:?}"
    );
    assert!(r.body.contains("none are configured"), "{}", r.body);
    assert_eq!(payments.hits(), 0);
    assert!(seen(&log).is_empty());
}

#[tokio::test]
async fn permissive_admits_both_and_counts_them_apart() {
    let pki = Pki::new();
    let payments = app().await;
    let (server, _sid) = server_proxy(
        &pki,
        &server_config("permissive", &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let inbound = server.running.inbound[0];
    let plain = get(&format!("http://{inbound}/")).await;
    assert_eq!((plain.status, plain.body.as_str()), (200, "client-id=none"));
    // A plaintext client cannot pose as a meshed one.
    let forged = send(
        &client(),
        "GET",
        &format!("http://{inbound}/"),
        &[("weft-client-id", CHECKOUT_ID)],
    )
    .await;
    assert_eq!(
        forged.body, "client-id=none",
        "a forged identity header is removed"
    );

    let (checkout, _cid) = checkout_client(&pki, inbound, false).await;
    let r = get(&checkout.outbound_url(0)).await;
    assert_eq!(r.body, format!("client-id={CHECKOUT_ID}"));

    let port = payments.addr.port();
    let m = server.metrics().await;
    let count = |tls: bool| {
        m.lines()
            .filter(|l| {
                l.starts_with("weft_proxy_tcp_connections_total{direction=\"inbound\"")
                    && l.contains(&format!("tls=\"{tls}\",port=\"{port}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!((count(false), count(true)), (2.0, 1.0), "{m}");
    assert!(
        m.contains(&format!(
            "weft_proxy_inbound_plaintext_connections_total{{port=\"{port}\",src_addr=\"127.0.0.1\"}} 2"
        )),
        "{m}"
    );
    assert!(
        !m.contains("weft_proxy_inbound_plaintext_rejected_total{"),
        "{m}"
    );
}

#[tokio::test]
async fn a_foreign_ca_an_expired_certificate_and_a_wrong_trust_domain_are_refused_and_counted() {
    let pki = Pki::new();
    let payments = app().await;
    let (server, _sid) = server_proxy(
        &pki,
        &server_config("permissive", &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let rogue = MeshCa::generate("cluster.local", SystemTime::now(), CA_LIFETIME).expect("rogue");
    let checkout = SpiffeId::new("cluster.local", "shop", "checkout");
    let now = SystemTime::now();
    let cases = [
        (
            "unknown-ca",
            pki.dir_with("checkout", &rogue, &checkout, now),
        ),
        (
            "expired",
            pki.dir_with("checkout", &pki.ca, &checkout, now - 2 * DAY),
        ),
        (
            "foreign-trust-domain",
            pki.dir_with(
                "checkout",
                &pki.ca,
                &SpiffeId::new("evil.example", "shop", "checkout"),
                now,
            ),
        ),
    ];
    for (reason, id) in &cases {
        let client = meshed(
            &client_config(server.running.inbound[0], false),
            &["payments.shop:80"],
            id,
            &[],
        )
        .await;
        let r = get(&client.outbound_url(0)).await;
        // TLS 1.3: the client finishes its side of the handshake before the
        // server's refusal arrives, so it surfaces as a connect error or as
        // a reset of the first request. Either way: 502, no plaintext.
        assert_eq!(r.status, 502, "{reason}: refused: {r:?}");
        assert!(
            matches!(
                r.proxy_error.as_deref(),
                Some("connect-error" | "upstream-reset")
            ),
            "{reason}: {r:?}"
        );
        let counted = server
            .wait_metric(
                &format!(
                    "weft_proxy_tls_rejections_total{{direction=\"inbound\",reason=\"{reason}\"}}"
                ),
                1.0,
            )
            .await;
        assert!(counted >= 1.0, "{reason} counted");
    }
    assert_eq!(payments.hits(), 0);
    // Counted once, by reason: a refused certificate is not also a failed
    // handshake.
    assert_eq!(
        server
            .metric("weft_proxy_tls_handshake_failures_total{direction=\"inbound\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn access_policy_answers_403_to_http_and_closes_tcp_and_counts_per_policy() {
    let pki = Pki::new();
    let payments = app().await;
    let ledger = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ledger_port = ledger.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = ledger.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let authorizations = json!([{
        "policy": "shop/payments-callers",
        "service": "payments",
        "ports": [payments.addr.port(), "ledger"],
        "rules": [{
            "identities": [{ "namespace": "shop", "serviceAccount": "checkout" }],
            "paths": [{ "type": "PathPrefix", "value": "/charges" }],
            "methods": ["GET"],
        }],
    }]);
    let id = pki.dir("shop", "payments");
    let ledger_name = format!("ledger={ledger_port}");
    let maps = [
        "--inbound-map".to_owned(),
        format!("127.0.0.1:0={}", payments.addr.port()),
        "--inbound-map".to_owned(),
        format!("127.0.0.1:0={ledger_port}"),
        "--port-name".to_owned(),
        ledger_name,
    ];
    let maps: Vec<&str> = maps.iter().map(String::as_str).collect();
    let server = meshed(
        &server_config("permissive", &[], authorizations),
        &[],
        &id,
        &maps,
    )
    .await;

    // checkout: allowed on /charges, refused elsewhere with a 403 that says why.
    let mut svc = service("payments", &[server.running.inbound[0]], None, json!([]));
    svc["mesh"] = json!({ "namespace": "shop", "serviceAccounts": ["payments"] });
    let mut ledger_svc = service("ledger", &[server.running.inbound[1]], None, json!([]));
    ledger_svc["mesh"] = json!({ "namespace": "shop", "serviceAccounts": ["payments"] });
    ledger_svc["ports"] = json!([{ "port": 80, "targetPort": "ledger", "protocol": "opaque" }]);
    let cid = pki.dir("shop", "checkout");
    let checkout = meshed(
        &config(vec![svc.clone(), ledger_svc.clone()]),
        &["payments.shop:80", "ledger.shop:80"],
        &cid,
        &[],
    )
    .await;
    let ok = get(&format!("{}/charges/1", checkout.outbound_url(0))).await;
    assert_eq!(ok.status, 200);
    let refused = get(&format!("{}/refunds/1", checkout.outbound_url(0))).await;
    assert_eq!(
        (refused.status, refused.proxy_error.as_deref()),
        (403, Some("forbidden"))
    );
    assert!(
        refused.body.contains("shop/payments-callers"),
        "{}",
        refused.body
    );

    // cart: refused everywhere; plaintext too.
    let cart_id = pki.dir("shop", "cart");
    let cart = meshed(
        &config(vec![svc, ledger_svc]),
        &["payments.shop:80", "ledger.shop:80"],
        &cart_id,
        &[],
    )
    .await;
    assert_eq!(
        get(&format!("{}/charges/1", cart.outbound_url(0)))
            .await
            .status,
        403
    );
    assert_eq!(
        get(&format!("http://{}/charges/1", server.running.inbound[0]))
            .await
            .status,
        403
    );
    assert_eq!(
        payments.hits(),
        1,
        "only the allowed request reached the app"
    );

    // Opaque TCP to the named port: no rule admits TCP (the rule names a
    // path), so the connection is closed before the app sees a byte. (A
    // line that cannot begin an HTTP request: a bare `ping` could, and is
    // waited on as one.)
    let mut tcp = TcpStream::connect(cart.running.outbound[1])
        .await
        .expect("connect");
    let _ = tcp.write_all(b"ping\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .expect("closed in time");
    assert!(out.is_empty(), "closed without echo");

    let denied = |protocol: &str| {
        format!(
            "weft_proxy_access_denied_total{{policy=\"shop/payments-callers\",protocol=\"{protocol}\"}}"
        )
    };
    assert_eq!(server.metric(&denied("http")).await, 3.0);
    assert_eq!(server.wait_metric(&denied("tcp"), 1.0).await, 1.0);
}

/// Sends `n` requests one after another; returns the answers and how
/// long they took.
async fn calls(method: &str, url: &str, n: usize) -> (Vec<Reply>, Duration) {
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(send(&client(), method, url, &[]).await);
    }
    (out, started.elapsed())
}

/// Tokens a bucket of 1 request/s can have refilled in `elapsed`: the
/// slack every count below allows on a slow machine.
fn refilled(elapsed: Duration) -> usize {
    elapsed.as_secs() as usize + 1
}

/// TrafficPolicy `inboundRateLimit` in payments' own proxy: two meshed
/// callers each held to their own limit (checkout to its override's),
/// plaintext callers to one limit together, a route's limit across
/// callers, the total over all; each refusal a 429 `rate-limited` with a
/// `Retry-After` that is honest (after it, the caller is admitted), the
/// application never seeing a refused request, and the refusals counted
/// by the limit that made them.
#[tokio::test]
async fn inbound_rate_limits_hold_each_caller_to_its_share_and_answer_429_with_retry_after() {
    let pki = Pki::new();
    let payments = app().await;
    let port = payments.addr.port();
    let mut config = server_config("permissive", &[], json!([]));
    config["inbound"]["rateLimits"] = json!([{
        "policy": "shop/payments", "service": "payments", "ports": [port],
        "total": { "requestsPerSecond": 1, "burst": 12 },
        "perIdentity": { "requestsPerSecond": 1, "burst": 3 },
        "overrides": [{
            "identities": [{ "namespace": "shop", "serviceAccount": "checkout" }],
            "limit": { "requestsPerSecond": 1, "burst": 6 },
        }],
        "routes": [{
            "name": "refunds", "path": { "type": "PathPrefix", "value": "/refunds" },
            "methods": ["POST"], "limit": { "requestsPerSecond": 1, "burst": 1 },
        }],
    }]);
    let (server, _sid) = server_proxy(&pki, &config, &[port]).await;
    let endpoint = server.running.inbound[0];
    let (checkout, _cid) = checkout_client(&pki, endpoint, true).await;
    let cart_id = pki.dir("shop", "cart");
    let cart = meshed(
        &client_config(endpoint, true),
        &["payments.shop:80"],
        &cart_id,
        &[],
    )
    .await;
    let admitted = |replies: &[Reply]| replies.iter().filter(|r| r.status == 200).count();

    // cart: its own 3, over the mesh; the rest refused by its identity
    // limit, each saying who and why.
    let cart_url = format!("{}/charges", cart.outbound_url(0));
    let (cart_replies, took) = calls("GET", &cart_url, 8).await;
    let mut cart_ok = admitted(&cart_replies);
    assert!(
        (3..3 + refilled(took)).contains(&cart_ok),
        "cart admitted {cart_ok} in {took:?}"
    );
    let refusal = cart_replies
        .iter()
        .find(|r| r.status == 429)
        .expect("a refusal");
    assert_eq!(refusal.proxy_error.as_deref(), Some("inbound-rate-limited"));
    assert!(
        refusal
            .body
            .contains("from each caller, and spiffe://cluster.local/ns/shop/sa/cart is over it")
            && refusal.body.contains("TrafficPolicy shop/payments"),
        "{}",
        refusal.body
    );
    // The Retry-After is honest: cart is refused now (the first refusal
    // from here, whatever refilled meanwhile), and admitted once it has
    // passed.
    let (refused_at, again) = loop {
        let at = std::time::Instant::now();
        let r = get(&cart_url).await;
        if r.status == 429 {
            break (at, r);
        }
        cart_ok += 1;
    };
    let retry_after: u64 = again.headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert_eq!(retry_after, 1, "a token a second");
    tokio::time::sleep_until((refused_at + Duration::from_secs(retry_after)).into()).await;
    assert_eq!(get(&cart_url).await.status, 200);

    // checkout: its override's 6, not perIdentity's 3.
    let (checkout_replies, took) =
        calls("GET", &format!("{}/charges", checkout.outbound_url(0)), 9).await;
    let checkout_ok = admitted(&checkout_replies);
    assert!(
        (6..6 + refilled(took)).contains(&checkout_ok),
        "checkout admitted {checkout_ok} in {took:?}"
    );
    assert!(
        checkout_replies
            .iter()
            .filter(|r| r.status == 429)
            .all(|r| r
                .body
                .contains("(an override, shared by the callers it names)")),
        "{checkout_replies:?}"
    );

    // Plaintext callers are one caller together: the total (12) has
    // about 2 left, the unverified share 3.
    let direct = format!("http://{endpoint}/charges");
    let (plain, took) = calls("GET", &direct, 6).await;
    let plain_ok = admitted(&plain);
    assert!(
        (1..=3 + refilled(took)).contains(&plain_ok),
        "plaintext admitted {plain_ok}"
    );
    assert!(
        plain.iter().filter(|r| r.status == 429).all(|r| {
            r.body.contains("callers without a mesh identity")
                || r.body.contains("from all callers together")
        }),
        "{plain:?}"
    );

    // gRPC health checks (what a kubelet gRPC probe sends to the app's
    // port) are never refused, while plain requests are.
    let mut refilled_since = 0;
    while get(&direct).await.status != 429 {
        refilled_since += 1;
        assert!(refilled_since < 10, "plaintext callers are never refused");
    }
    let health = format!("http://{endpoint}/grpc.health.v1.Health/Check");
    for _ in 0..3 {
        let r = send(
            &client(),
            "POST",
            &health,
            &[("content-type", "application/grpc")],
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // Every request the app saw was admitted (cart's after its
    // Retry-After too); every other one was a 429, counted by its limit.
    let all = cart_ok + 1 + checkout_ok + plain_ok + refilled_since + 3;
    assert_eq!(payments.hits(), all);
    let refused = |replies: &[Reply]| replies.iter().filter(|r| r.status == 429).count();
    let refusals = refused(&cart_replies) + 1 + refused(&checkout_replies) + refused(&plain) + 1;
    let counted = |limit: &str| {
        format!(
            "weft_proxy_inbound_rate_limited_total{{policy=\"shop/payments\",limit=\"{limit}\"}}"
        )
    };
    let by_limit = server.metric(&counted("identity")).await
        + server.metric(&counted("override")).await
        + server.metric(&counted("total")).await;
    assert_eq!(by_limit as usize, refusals);

    // A route's limit counts every caller: one refund in its burst (of
    // one, at 1/s: of two sent together, one goes).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refund = |proxy: &TestProxy| format!("{}/refunds/7", proxy.outbound_url(0));
    let (a, b) = (refund(&checkout), refund(&cart));
    let started = std::time::Instant::now();
    let (c1, c2) = (client(), client());
    let (first, second) = tokio::join!(send(&c1, "POST", &a, &[]), send(&c2, "POST", &b, &[]));
    // (A machine so slow the pair spans a refill proves nothing here.)
    if started.elapsed() < Duration::from_millis(900) {
        let mut statuses = [first.status, second.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 429], "{first:?} {second:?}");
        let refused = if first.status == 429 { &first } else { &second };
        assert!(
            refused.body.contains("route refunds of Service payments"),
            "{}",
            refused.body
        );
        assert_eq!(server.metric(&counted("route/refunds")).await, 1.0);
    }
}

/// A pod whose own inbound limit refuses is steered around: its 429s
/// come back fast, and a balancer that took them for answers would send
/// the busiest pod the most. Nor does one pod's refusal hold the whole
/// Service under the client's `retryAfter` (it speaks for that pod).
#[tokio::test]
async fn a_pod_refusing_for_its_inbound_limit_is_steered_around_not_waited_for() {
    let pki = Pki::new();
    let (busy_app, free_app) = (app().await, app().await);
    let mut limited = server_config("permissive", &[], json!([]));
    limited["inbound"]["rateLimits"] = json!([{
        "policy": "shop/payments", "service": "payments", "ports": [busy_app.addr.port()],
        "total": { "requestsPerSecond": 1, "burst": 1 },
    }]);
    let (busy, _bid) = server_proxy(&pki, &limited, &[busy_app.addr.port()]).await;
    let open = server_config("permissive", &[], json!([]));
    let (free, _fid) = server_proxy(&pki, &open, &[free_app.addr.port()]).await;
    let mut svc = service(
        "payments",
        &[busy.running.inbound[0], free.running.inbound[0]],
        Some(policy(json!({
            "retryAfter": { "maxWaitMs": 2000, "maxQueued": 50, "maxBackOffMs": 60000 },
        }))),
        json!([]),
    );
    let mesh = json!({ "namespace": "shop", "serviceAccounts": ["payments"], "strict": true });
    svc["mesh"] = mesh.clone();
    // `ledger`: the busy pod alone, with the same retryAfter.
    let mut ledger = service(
        "ledger",
        &[busy.running.inbound[0]],
        svc.get("policy").cloned(),
        json!([]),
    );
    ledger["mesh"] = mesh;
    let cid = pki.dir("shop", "checkout");
    let checkout = meshed(
        &config(vec![svc, ledger]),
        &["payments.shop:80", "ledger.shop:80"],
        &cid,
        &[],
    )
    .await;
    // Timed calls: how many were refused, and the slowest.
    let run = |url: String, n: usize| async move {
        let (mut refused, mut slowest) = (0, Duration::ZERO);
        for _ in 0..n {
            let started = std::time::Instant::now();
            let r = get(&url).await;
            slowest = slowest.max(started.elapsed());
            match r.status {
                200 => {}
                429 => refused += 1,
                other => panic!("{other}: {}", r.body),
            }
        }
        (refused, slowest)
    };
    let (refused, _) = run(format!("{}/charges", checkout.outbound_url(0)), 60).await;
    assert!(
        refused <= 10,
        "{refused} of 60 went to the pod that was refusing (busy app saw {}, free app {})",
        busy_app.hits(),
        free_app.hits()
    );
    assert!(free_app.hits() >= 50);
    // The busy pod's 429s pass straight back: no call waits out its
    // Retry-After (which would hold every pod of a Service).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (refused, slowest) = run(format!("{}/charges", checkout.outbound_url(1)), 4).await;
    assert!(refused >= 3, "{refused} of 4 refused");
    assert!(
        slowest < Duration::from_millis(900),
        "a call waited {slowest:?}: the pod's Retry-After held the Service"
    );
}

/// The app's own TLS: a server with a certificate from the app's own CA
/// (ALPN h2, nothing weft), and a client config that trusts it.
async fn app_tls_server() -> (u16, Arc<rustls::ClientConfig>) {
    let app_ca = MeshCa::generate("app.example", SystemTime::now(), CA_LIFETIME).expect("app ca");
    let app_leaf = app_ca
        .issue(
            &SpiffeId::new("app.example", "shop", "payments"),
            SystemTime::now(),
            DAY,
        )
        .expect("leaf");
    let identity = weft::proxy::tls::MeshIdentity::new("app.example", Default::default());
    identity
        .update(
            &app_leaf.cert_pem,
            &app_leaf.key_pem,
            &app_ca.trust_bundle(),
        )
        .expect("identity");
    let mut server_cfg = (*identity.server_config().expect("cfg")).clone();
    server_cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app_port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 5];
                    if tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(&buf).await;
                    }
                }
            });
        }
    });
    let expected = weft::proxy::tls::ExpectedServer {
        namespace: "shop".into(),
        service_accounts: vec![],
    };
    let mut client_cfg = (*identity.client_config(expected, b"h2").expect("client cfg")).clone();
    client_cfg.alpn_protocols = vec![b"h2".to_vec()];
    (app_port, Arc::new(client_cfg))
}

/// An end-to-end TLS exchange with the app through `addr`.
async fn app_tls_echo(addr: SocketAddr, config: Arc<rustls::ClientConfig>) {
    use rustls::pki_types::ServerName;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("payments.shop").expect("name"), tcp)
        .await
        .expect("end-to-end TLS with the app through the proxies");
    tls.write_all(b"hello").await.expect("write");
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"hello");
}

#[tokio::test]
async fn an_applications_own_tls_passes_through_untouched_in_both_modes() {
    let (app_port, app_client) = app_tls_server().await;
    let pki = Pki::new();

    // PERMISSIVE: a client without a sidecar speaks TLS to the app; the
    // server proxy relays it (it is not mesh TLS: counted as plaintext).
    let (permissive, _sid) = server_proxy(
        &pki,
        &server_config("permissive", &[], json!([])),
        &[app_port],
    )
    .await;
    app_tls_echo(permissive.running.inbound[0], app_client.clone()).await;
    let m = permissive.metrics().await;
    assert!(
        m.contains(&format!(
            "weft_proxy_tcp_connections_total{{direction=\"inbound\",protocol=\"opaque\",tls=\"false\",port=\"{app_port}\"}} 1"
        )),
        "{m}"
    );

    // STRICT: a meshed client's app speaks TLS through its own sidecar,
    // which wraps it in mesh mTLS (weft/tcp); the server proxy unwraps it
    // and the app's TLS arrives untouched.
    let (strict, _sid2) =
        server_proxy(&pki, &server_config("strict", &[], json!([])), &[app_port]).await;
    let (checkout, _cid) = checkout_client(&pki, strict.running.inbound[0], true).await;
    app_tls_echo(checkout.running.outbound[0], app_client).await;
    let m = strict.metrics().await;
    assert!(
        m.contains(&format!(
            "weft_proxy_tcp_connections_total{{direction=\"inbound\",protocol=\"opaque\",tls=\"true\",port=\"{app_port}\"}} 1"
        )),
        "the app's TLS crossed the hop inside mesh mTLS: {m}"
    );
    assert!(
        !m.contains("weft_proxy_inbound_plaintext_rejected_total{"),
        "{m}"
    );
}

/// Issue 19, item 3: with discovery, the client knows which pod it
/// dialled and that pod's ServiceAccount, and holds it to exactly that
/// identity, not merely to any account of the namespace: a pod presenting
/// another account of the same namespace (here, the published pod is
/// `cart`'s, the certificate `payments`') is refused and counted as
/// `unexpected-identity`; published as `payments`', it is served.
#[tokio::test]
async fn a_pod_presenting_another_account_of_its_namespace_is_refused() {
    let pki = Pki::new();
    let payments = app().await;
    let (server, _sid) = server_proxy(
        &pki,
        &server_config("strict", &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let mut svc = service("payments", &[], None, json!([]));
    svc["clusterIps"] = json!(["127.0.0.9"]);
    // Any account of `shop` may serve the Service as a whole.
    svc["mesh"] = json!({ "namespace": "shop", "strict": true });
    let cid = pki.dir("shop", "checkout");
    let client = meshed(&config(vec![svc]), &["payments.shop:80"], &cid, &[]).await;
    let endpoint = server.running.inbound[0];
    publish_pod(&client, "as-cart", endpoint, "cart");
    client
        .wait_metric("weft_proxy_endpoints_reloads", 1.0)
        .await;
    let r = get(&client.outbound_url(0)).await;
    assert_eq!(r.status, 502, "refused: {r:?}");
    let counted = client
        .wait_metric(
            "weft_proxy_tls_rejections_total{direction=\"outbound\",reason=\"unexpected-identity\"}",
            1.0,
        )
        .await;
    assert!(counted >= 1.0, "counted as unexpected-identity");
    assert_eq!(payments.hits(), 0);

    publish_pod(&client, "as-payments", endpoint, "payments");
    client
        .wait_metric("weft_proxy_endpoints_reloads", 2.0)
        .await;
    let r = get(&client.outbound_url(0)).await;
    assert_eq!(r.status, 200, "the pod's own account: {r:?}");
    assert_eq!(
        r.body,
        format!("client-id={CHECKOUT_ID}"),
        "and the server learned the caller"
    );
}

/// A caller that dials a pod's address itself (a headless Service's
/// client, a StatefulSet peer, an ingress controller that picks pods) is
/// not calling "some address": once discovery publishes that pod as
/// `payments`' under its ServiceAccount, the call gets the Service's mesh
/// mTLS, held to that pod's own identity, so the STRICT server takes it.
/// Before, it went out in plaintext and the server refused it.
#[tokio::test]
async fn a_pod_dialled_by_its_address_gets_its_services_mtls() {
    let pki = Pki::new();
    let payments = app().await;
    let (server, _sid) = server_proxy(
        &pki,
        &server_config("strict", &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let endpoint = server.running.inbound[0];
    let mut svc = service("payments", &[], None, json!([]));
    // Headless: no ClusterIP; callers resolve the pods and dial them.
    svc["clusterIps"] = json!([]);
    svc["mesh"] = json!({ "namespace": "shop", "strict": true });
    let cid = pki.dir("shop", "checkout");
    let target = endpoint.to_string();
    let client = meshed(&config(vec![svc]), &[&target], &cid, &[]).await;

    let r = get(&client.outbound_url(0)).await;
    assert_ne!(
        r.status, 200,
        "an unknown address goes out in plaintext: {r:?}"
    );
    assert_eq!(payments.hits(), 0, "and STRICT refused it");

    publish_pod(&client, "one-pod", endpoint, "payments");
    client
        .wait_metric("weft_proxy_endpoints_reloads", 1.0)
        .await;
    let r = get(&client.outbound_url(0)).await;
    assert_eq!(r.status, 200, "published: mesh mTLS to the pod: {r:?}");
    assert_eq!(r.body, format!("client-id={CHECKOUT_ID}"));
    // Counted as a call to the Service, not to a bare address.
    let counted = client
        .metric("weft_proxy_requests_total{direction=\"outbound\",src=\"unknown\",dst=\"payments.shop:80\",route=\"default\",status_class=\"2xx\",tls=\"true\"}")
        .await;
    assert_eq!(
        counted, 1.0,
        "counted under the Service port's label, over mTLS"
    );

    // Held to the pod's own account: published as another account's pod
    // (an address reused, a stale document), the call is refused.
    publish_pod(&client, "as-inventory", endpoint, "inventory");
    client
        .wait_metric("weft_proxy_endpoints_reloads", 2.0)
        .await;
    let r = get(&client.outbound_url(0)).await;
    assert_eq!(r.status, 502, "another account's pod: refused: {r:?}");
    assert!(
        client
            .metric("weft_proxy_tls_rejections_total{direction=\"outbound\",reason=\"unexpected-identity\"}")
            .await
            >= 1.0
    );
    assert_eq!(payments.hits(), 1);
}

/// Publishes, in `client`'s endpoints document `generation`, the pod at
/// `endpoint` as `payments.shop`'s one pod, of ServiceAccount `account`.
fn publish_pod(client: &TestProxy, generation: &str, endpoint: SocketAddr, account: &str) {
    let doc = json!({
        "schemaVersion": "1.0", "generation": generation, "namespace": "shop",
        "services": { "payments.shop": { "groups": [{
            "ports": { "": endpoint.port() },
            "endpoints": [{ "addresses": [endpoint.ip().to_string()], "ready": true,
                            "pod": format!("{account}-0"), "serviceAccount": account }],
        }]}},
    });
    write_atomic(
        &client.dir.path().join("endpoints.json"),
        doc.to_string().as_bytes(),
    );
}

/// A pod spec can name any Secret of its namespace, so a pod of
/// ServiceAccount checkout could mount payments' identity Secret. Its proxy
/// refuses that certificate: it presents only its own account's identity,
/// and stays unready (so the pod gets no traffic) until it has one.
#[tokio::test]
async fn a_pod_that_mounts_another_accounts_identity_secret_does_not_get_that_identity() {
    let pki = Pki::new();
    let payments = SpiffeId::new("cluster.local", "shop", "payments");
    let borrowed = pki.dir_with("checkout", &pki.ca, &payments, SystemTime::now());
    let args = borrowed.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nowhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let p = start_proxy(&client_config(nowhere, true), &[], &args).await;
    let failures = p
        .wait_metric("weft_proxy_identity_reload_failures", 1.0)
        .await;
    assert!(failures >= 1.0, "the borrowed certificate was not refused");
    assert_eq!(
        p.metric("weft_proxy_certificate_expiry_timestamp_seconds")
            .await,
        0.0,
        "no certificate is held"
    );
    let ready = get(&format!("http://{}/ready", p.running.admin)).await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.contains("no identity"), "{ready:?}");

    // Its own account's certificate, mounted next, is taken.
    let own = pki.dir("shop", "checkout");
    for file in ["tls.key", "tls.crt"] {
        let bytes = std::fs::read(own.dir.path().join(file)).expect("read");
        write_atomic(&borrowed.dir.path().join(file), &bytes);
    }
    wait_ready(&p).await;
}

#[tokio::test]
async fn rotating_certificates_under_load_fails_no_request_on_a_long_h2_connection() {
    let pki = Pki::new();
    let payments = app().await;
    let (checkout, server, sid, cid) = checkout_to_payments(&pki, &payments, "strict").await;
    // One long-lived h2 connection from the app, multiplexed requests.
    let h2 = h2_client();
    let url = checkout.outbound_url(0);
    let load = {
        let (h2, url) = (h2.clone(), url.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..300 {
                let r = send(&h2, "GET", &url, &[]).await;
                if r.status != 200 {
                    failures.push((i, r));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        })
    };
    // Rotate both sides twice while the load runs; each round's
    // certificates live an hour longer, so the expiry metric shows which
    // one a proxy holds.
    for round in 1..=2u32 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lifetime = DAY + round * Duration::from_secs(3600);
        let mut expiry = 0;
        for (dir, sa, proxy) in [(&sid, "payments", &server), (&cid, "checkout", &checkout)] {
            let leaf = pki
                .ca
                .issue(
                    &SpiffeId::new("cluster.local", "shop", sa),
                    SystemTime::now(),
                    lifetime,
                )
                .expect("leaf");
            // Key first, then certificate: a reader between the two sees a
            // mismatched pair, which must be refused and retried, not used.
            write_atomic(&dir.dir.path().join("tls.key"), leaf.key_pem.as_bytes());
            write_atomic(&dir.dir.path().join("tls.crt"), leaf.cert_pem.as_bytes());
            expiry = leaf
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .expect("epoch")
                .as_secs();
            let held = proxy
                .wait_metric(
                    "weft_proxy_certificate_expiry_timestamp_seconds",
                    expiry as f64,
                )
                .await;
            assert_eq!(
                held, expiry as f64,
                "round {round}: {sa} holds the new certificate"
            );
        }
        assert!(expiry > 0);
    }
    let failures = load.await.expect("load");
    assert!(failures.is_empty(), "no request failed: {failures:?}");
    assert_eq!(payments.hits(), 300);
    // A new handshake with the server proxy presents the rotated certificate.
    let presented = presented_expiry(&pki, server.running.inbound[0]).await;
    let held = server
        .metric("weft_proxy_certificate_expiry_timestamp_seconds")
        .await;
    assert_eq!(presented as f64, held, "the new certificate is presented");
    // New connections after the rotation handshake with the new certificates.
    let fresh = send(&client(), "GET", &url, &[]).await;
    assert_eq!(fresh.body, format!("client-id={CHECKOUT_ID}"));
}

#[tokio::test]
async fn an_endpoint_without_a_sidecar_gets_plaintext_only_while_the_destination_is_not_strict() {
    let pki = Pki::new();
    // No proxy in front of this app: it answers a ClientHello with a 400.
    let bare = app().await;
    let (migrating, cid) = checkout_client(&pki, bare.addr, false).await;
    let r = get(&migrating.outbound_url(0)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "client-id=none"));
    let fallbacks = format!(
        "weft_proxy_outbound_plaintext_fallbacks_total{{dst=\"{}\"}}",
        bare.addr
    );
    assert_eq!(migrating.metric(&fallbacks).await, 1.0);
    // Later requests reuse the plaintext connection: no TCP connect and
    // failed TLS handshake per request.
    for _ in 0..5 {
        assert_eq!(get(&migrating.outbound_url(0)).await.status, 200);
    }
    assert_eq!(migrating.metric(&fallbacks).await, 1.0);

    let strict = meshed(
        &client_config(bare.addr, true),
        &["payments.shop:80"],
        &cid,
        &[],
    )
    .await;
    let r = get(&strict.outbound_url(0)).await;
    assert_eq!(
        (r.status, r.proxy_error.as_deref()),
        (502, Some("connect-error")),
        "STRICT never downgrades: {r:?}"
    );
    assert_eq!(strict.metric(&fallbacks).await, 0.0);
    assert_eq!(
        bare.hits(),
        6,
        "only the fallback requests reached the app in plaintext"
    );
}

/// HTTP/1.1 between two proxies stays HTTP/1.1 inside mesh TLS, on
/// pooled connections: a burst of concurrent requests opens a bounded
/// number of them, and the next burst reuses them (no new handshake). The
/// app gets HTTP/1.1, as its client spoke, with no marker. A client proxy
/// of an earlier weft carried HTTP/1.1 as HTTP/2 with a marker: the server's
/// proxy still hands those to the app as HTTP/1.1. A plaintext caller
/// cannot use the marker.
#[tokio::test]
async fn http1_between_proxies_stays_http1_on_pooled_mesh_connections() {
    let pki = Pki::new();
    let payments = version_app().await;
    let (client, server, _sid, _cid) = checkout_to_payments(&pki, &payments, "permissive").await;

    let url = client.outbound_url(0);
    let burst = || {
        let calls: Vec<_> = (0..24)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { get(&url).await })
            })
            .collect();
        async move {
            for call in calls {
                let r = call.await.expect("request task");
                assert_eq!((r.status, r.body.as_str()), (200, "HTTP/1.1 marker=false"));
            }
        }
    };
    let mesh_http1 =
        "weft_proxy_tcp_connections_total{direction=\"inbound\",protocol=\"http1\",tls=\"true\"";
    burst().await;
    let opened = server.metric(mesh_http1).await;
    assert!(
        (1.0..=24.0).contains(&opened),
        "a burst of 24 opens between 1 and 24 mesh connections, got {opened}"
    );
    burst().await;
    burst().await;
    assert_eq!(
        server.metric(mesh_http1).await,
        opened,
        "later bursts reuse the pooled mesh connections"
    );
    assert_eq!(
        server
            .metric("weft_proxy_tcp_connections_total{direction=\"inbound\",protocol=\"http2\",tls=\"true\"")
            .await,
        0.0,
        "nothing was carried as HTTP/2"
    );

    // An earlier weft client proxy: HTTP/2 inside mesh TLS, marked.
    let tls = mesh_connect_alpn(
        &pki,
        server.running.inbound[0],
        "checkout",
        weft::proxy::tls::ALPN_H2,
    )
    .await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{}/", server.running.inbound[0]))
        .header("weft-orig-proto", "HTTP/1.1")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let rsp = sender.send_request(req).await.expect("marked request");
    let body = http_body_util::BodyExt::collect(rsp.into_body())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(
        body.as_ref(),
        b"HTTP/1.1 marker=false",
        "an older client's marked request"
    );

    // Sent in plaintext straight to the server's proxy, the marker is
    // removed and changes nothing: an HTTP/2 request stays HTTP/2.
    let h2 = send(
        &h2_client(),
        "GET",
        &format!("http://{}/", server.running.inbound[0]),
        &[("weft-orig-proto", "HTTP/1.1")],
    )
    .await;
    assert_eq!(
        (h2.status, h2.body.as_str()),
        (200, "HTTP/2.0 marker=false")
    );
}

/// Sends `request` on a new connection to `addr` after `silence` (past
/// the proxies' 1 s detection timeout, say), and returns what came back
/// before the connection closed (empty: closed without an answer).
async fn speak_after(addr: SocketAddr, silence: Duration, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(silence).await;
    // A refusing proxy may close before the write is through.
    let _ = s.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy answers or closes in time");
    String::from_utf8_lossy(&out).into_owned()
}

/// A client that waits out protocol detection and then speaks HTTP is
/// served as HTTP, not relayed as opaque TCP: its requests are still
/// authorized one by one and its own `weft-client-id` never reaches the
/// app. Both ways in: in plaintext (PERMISSIVE), where the server proxy's
/// detection timed out, and through a client proxy whose detection timed
/// out and which so opened mesh TLS as `weft/tcp`. And a request with a
/// rarer method (PROPFIND) is HTTP, not opaque TCP, from the first byte.
#[tokio::test]
async fn a_client_silent_past_detection_that_then_speaks_http_cannot_forge_its_identity() {
    let pki = Pki::new();
    let payments = app().await;
    let (client, server, _sid, _cid) = checkout_to_payments(&pki, &payments, "permissive").await;
    let forged = "GET /charges HTTP/1.1\r\nhost: payments\r\n\
                  weft-client-id: spiffe://cluster.local/ns/shop/sa/admin\r\n\
                  connection: close\r\n\r\n";
    let silence = Duration::from_millis(1300);

    let plain = speak_after(server.running.inbound[0], silence, forged).await;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(plain.ends_with("client-id=none"), "plaintext: {plain}");

    let meshed = speak_after(client.running.outbound[0], silence, forged).await;
    assert!(meshed.starts_with("HTTP/1.1 200"), "{meshed}");
    assert!(
        meshed.ends_with("client-id=spiffe://cluster.local/ns/shop/sa/checkout"),
        "through the mesh the app learns the real caller: {meshed}"
    );

    // A method outside the common few is HTTP too, not opaque TCP.
    let dav = forged.replacen("GET", "PROPFIND", 1);
    let dav = speak_after(server.running.inbound[0], Duration::ZERO, &dav).await;
    assert!(dav.ends_with("client-id=none"), "PROPFIND: {dav}");
    assert_eq!(payments.hits(), 3);
}

/// RFC 9112 §2.2 lets a server skip empty lines before a request line, and
/// HTTP/1 parsers accept any token as a method, in any case. Detection
/// that called such a request opaque relayed it to the app as it was, a
/// forged `weft-client-id` included; the app took the caller for checkout.
#[tokio::test]
async fn a_leading_empty_line_does_not_make_a_request_opaque() {
    let pki = Pki::new();
    let payments = app().await;
    let (_client, server, _sid, _cid) = checkout_to_payments(&pki, &payments, "permissive").await;
    let forged = |line: &str| {
        format!(
            "{line}host: payments\r\n\
             weft-client-id: spiffe://cluster.local/ns/shop/sa/checkout\r\n\
             connection: close\r\n\r\n"
        )
    };
    for start in [
        "\r\nGET /charges HTTP/1.1\r\n",
        "\n\n\r\nGET /charges HTTP/1.1\r\n",
        "get /charges HTTP/1.1\r\n",
        "Charge /charges HTTP/1.1\r\n",
    ] {
        let answer = speak_after(server.running.inbound[0], Duration::ZERO, &forged(start)).await;
        assert!(
            answer.starts_with("HTTP/1.1 ") && !answer.contains("client-id=spiffe"),
            "{start:?}: the forged id reached the app: {answer}"
        );
    }
    // A request dripped past the detection timeout: a method (`get`, then
    // the rest), or the start of the HTTP/2 preface (`PRI * `, which the
    // fuzzer found undecided, then an HTTP/1 version). Bytes that can still
    // begin a request line are served as HTTP.
    for (drip, rest) in [
        ("get", " /charges HTTP/1.1\r\n"),
        ("PRI * ", "HTTP/1.1\r\n"),
    ] {
        let mut s = TcpStream::connect(server.running.inbound[0])
            .await
            .expect("connect");
        s.write_all(drip.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let _ = s.write_all(forged(rest).as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let answer = String::from_utf8_lossy(&out);
        assert!(
            !answer.contains("client-id=spiffe"),
            "dripped {drip:?}: the forged id reached the app: {answer}"
        );
    }
}

/// `Connection` names headers for the next hop to drop. A mesh client
/// naming `weft-client-id` there must not make the server's proxy drop the
/// header it wrote itself: the app would take a known caller for an
/// anonymous one.
#[tokio::test]
async fn a_clients_connection_header_cannot_strip_the_client_id_the_proxy_writes() {
    let pki = Pki::new();
    let payments = app().await;
    let (server, _sid) = server_proxy(
        &pki,
        &server_config("strict", &[], json!([])),
        &[payments.addr.port()],
    )
    .await;
    let mut tls = mesh_connect(&pki, server.running.inbound[0], "cart").await;
    tls.write_all(
        b"GET /charges HTTP/1.1\r\nhost: payments\r\n\
          connection: weft-client-id, close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("client-id=spiffe://cluster.local/ns/shop/sa/cart"),
        "{answer}"
    );
}

/// The other side of that: on a port nobody declared server-first, an app
/// that greets first is still relayed once detection has timed out.
#[tokio::test]
async fn an_undeclared_server_first_app_still_greets_through_the_inbound_proxy() {
    let pki = Pki::new();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 ready\r\n").await;
                let mut line = [0u8; 6];
                if s.read_exact(&mut line).await.is_ok() {
                    let _ = s.write_all(&line).await;
                }
            });
        }
    });
    let (server, _sid) =
        server_proxy(&pki, &server_config("permissive", &[], json!([])), &[port]).await;
    let mut s = TcpStream::connect(server.running.inbound[0])
        .await
        .expect("connect");
    let mut greeting = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .expect("the greeting arrives after the detection timeout")
        .expect("read");
    assert_eq!(&greeting, b"220 ready\r\n");
    s.write_all(b"QUIT\r\n").await.expect("write");
    let mut echo = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&echo, b"QUIT\r\n");
}

/// The upgrade marker is the client proxy's to add, never its app's to
/// pass on: an HTTP/2 app sending `weft-orig-proto: HTTP/1.1` still
/// reaches the server's app as HTTP/2, and without the marker.
#[tokio::test]
async fn a_client_app_cannot_send_the_upgrade_marker_through_its_proxy() {
    let pki = Pki::new();
    let payments = version_app().await;
    let (client, _server, _sid, _cid) = checkout_to_payments(&pki, &payments, "strict").await;
    let r = send(
        &h2_client(),
        "GET",
        &format!("{}/charges", client.outbound_url(0)),
        &[("weft-orig-proto", "HTTP/1.1")],
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "HTTP/2.0 marker=false"));
}

/// A meshed endpoint without a sidecar, reached first by an HTTP/2 client
/// (h2c in plaintext after the fallback) and then by an HTTP/1.1 one: the
/// HTTP/1.1 request is not upgraded onto that h2c connection, so the app
/// gets HTTP/1.1 and no marker.
#[tokio::test]
async fn http1_is_not_upgraded_onto_an_h2c_connection_to_an_app_without_a_sidecar() {
    let pki = Pki::new();
    let bare = version_app().await;
    let (migrating, _cid) = checkout_client(&pki, bare.addr, false).await;
    let url = format!("{}/charges", migrating.outbound_url(0));
    let h2 = send(&h2_client(), "GET", &url, &[]).await;
    assert_eq!(
        (h2.status, h2.body.as_str()),
        (200, "HTTP/2.0 marker=false")
    );
    let h1 = get(&url).await;
    assert_eq!(
        (h1.status, h1.body.as_str()),
        (200, "HTTP/1.1 marker=false")
    );
}

/// What one call of the middle app to the next hop came to: when it was
/// made and returned, its status and proxy error.
#[derive(Clone, Debug)]
struct OnwardCall {
    made: std::time::Instant,
    returned: std::time::Instant,
    status: u16,
    proxy_error: Option<String>,
}

/// The middle hop's app (`orders`): stalls for `stall`, then calls
/// `payments` through its own proxy, passing the request's
/// `weft-deadline` on as the README asks applications to (as they pass
/// `traceparent`). The onward call runs in a task of its own, so that the
/// test still sees how it ended after the proxy gave up on this app.
async fn orders_app(
    stall: Arc<Mutex<Duration>>,
    onward: Arc<std::sync::OnceLock<String>>,
    calls: Arc<Mutex<Vec<OnwardCall>>>,
) -> Served {
    let handler = move |headers: http::HeaderMap| {
        let (onward, calls) = (onward.clone(), calls.clone());
        let stall = *stall.lock().expect("stall");
        async move {
            let task = tokio::spawn(async move {
                tokio::time::sleep(stall).await;
                let url = format!("{}/charges", onward.get().expect("onward url"));
                let deadline = headers.get("weft-deadline").and_then(|v| v.to_str().ok());
                let pass_on: Vec<(&str, &str)> =
                    deadline.map(|d| ("weft-deadline", d)).into_iter().collect();
                let made = std::time::Instant::now();
                let r = send(&client(), "GET", &url, &pass_on).await;
                calls.lock().expect("calls").push(OnwardCall {
                    made,
                    returned: std::time::Instant::now(),
                    status: r.status,
                    proxy_error: r.proxy_error,
                });
                r.status
            });
            let status = task.await.unwrap_or(500);
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
        }
    };
    serve(axum::Router::new().route("/orders", axum::routing::get(handler))).await
}

/// What `probe` finds within 2 s (polled every 10 ms).
async fn within_2s<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(found) = probe() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} within 2 s")
}

/// Three proxies, `frontend -> orders -> payments`, with a 300 ms budget
/// (the frontend's timeout for `orders`): the deadline travels with the
/// request, the middle hop's call is cut at what is left of it, and a call
/// made after it has passed is answered 504 at once without reaching
/// `payments`.
#[tokio::test]
async fn a_deadline_travels_three_hops_and_nobody_works_past_it() {
    let pki = Pki::new();
    // payments' app: slow (2 s, far past any budget here, so that a call
    // not cut at the deadline shows), and records when each request came
    // and the deadline headers it carried.
    let seen: Arc<Mutex<Vec<(SystemTime, http::HeaderMap)>>> = Arc::default();
    let s = seen.clone();
    let payments_app = Upstream::start(Arc::new(move |_, req| {
        let at = SystemTime::now();
        s.lock().expect("seen").push((at, req.headers().clone()));
        (200, "charged".into(), Duration::from_secs(2))
    }))
    .await;
    let (payments, _pid) = server_proxy(
        &pki,
        &server_config("permissive", &[], json!([])),
        &[payments_app.addr.port()],
    )
    .await;
    // orders: its app behind its proxy, which also carries its calls to
    // payments.
    let onward = Arc::new(std::sync::OnceLock::new());
    let calls: Arc<Mutex<Vec<OnwardCall>>> = Arc::default();
    let stall = Arc::new(Mutex::new(Duration::ZERO));
    let orders_app = orders_app(stall.clone(), onward.clone(), calls.clone()).await;
    let orders_id = pki.dir("shop", "orders");
    let orders_map = format!("127.0.0.1:0={}", orders_app.addr.port());
    let orders = meshed(
        &client_config(payments.running.inbound[0], true),
        &["payments.shop:80"],
        &orders_id,
        &["--inbound-map", &orders_map],
    )
    .await;
    onward.set(orders.outbound_url(0)).expect("set once");
    // frontend: 300 ms for a call to orders.
    let mut svc = service(
        "orders",
        &[orders.running.inbound[0]],
        Some(policy(json!({ "timeoutMs": 300 }))),
        json!([]),
    );
    svc["mesh"] = json!({ "namespace": "shop", "serviceAccounts": ["orders"], "strict": true });
    let frontend_id = pki.dir("shop", "frontend");
    let frontend = meshed(&config(vec![svc]), &["orders.shop:80"], &frontend_id, &[]).await;
    let url = format!("{}/orders", frontend.outbound_url(0));
    let budget = Duration::from_millis(300);
    // Warm up every connection on the way, so the timings below are the
    // deadline's, not the first handshakes' (payments is too slow for
    // the budget: the warm-up is a 504 too).
    assert_eq!(get(&url).await.status, 504);
    // Its onward call ends on its own (cut by orders' proxy): wait for
    // it, so it is not taken for the next one.
    within_2s("the warm-up's onward call", || {
        calls.lock().expect("calls").first().cloned()
    })
    .await;
    seen.lock().expect("seen").clear();
    calls.lock().expect("calls").clear();
    *stall.lock().expect("stall") = Duration::from_millis(200);

    // 1. A 200 ms stall at orders, then payments would take 2 s.
    let (started, wall) = (std::time::Instant::now(), SystemTime::now());
    let r = get(&url).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        took <= Duration::from_millis(320),
        "answered after {took:?}"
    );
    // payments' app was told the deadline the frontend set (as Unix ms,
    // on its own clock), never the proxies' relative marker.
    let (arrived, headers) = within_2s("payments never called", || {
        seen.lock().expect("seen").first().cloned()
    })
    .await;
    assert!(!headers.contains_key("weft-timeout"), "{headers:?}");
    let told: u64 = headers["weft-deadline"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("unix ms");
    let set = wall + budget;
    let told = std::time::UNIX_EPOCH + Duration::from_millis(told);
    // Near the frontend's (which started its clock a little after this
    // test's); told 300 ms from its own arrival, it would be 200 ms late.
    let apart = set.duration_since(told).unwrap_or_else(|e| e.duration());
    assert!(
        apart <= Duration::from_millis(100),
        "payments was told {told:?}, the frontend set {set:?}"
    );
    assert!(arrived < told, "payments called after the deadline");
    // orders' call to payments was cut at the deadline by orders' own
    // proxy (or payments'), not after payments' 2 s: 504.
    let onward_call = within_2s("orders' onward call never returned", || {
        calls.lock().expect("calls").first().cloned()
    })
    .await;
    assert_eq!(onward_call.status, 504, "{onward_call:?}");
    let cut_at = onward_call.returned.duration_since(started);
    assert!(
        cut_at <= Duration::from_millis(600),
        "orders' call to payments returned {cut_at:?} after the request began: not cut at the deadline"
    );
    assert!(onward_call.made.duration_since(started) >= Duration::from_millis(200));

    // 2. A stall past the deadline: the call orders makes then is answered
    // 504 at once by its own proxy, and payments never sees it.
    let calls_before = calls.lock().expect("calls").len();
    let hits_before = payments_app.hits();
    *stall.lock().expect("stall") = Duration::from_millis(350);
    let r = get(&url).await;
    assert_eq!(r.status, 504, "{}", r.body);
    let onward_call = within_2s("orders' late call never returned", || {
        calls.lock().expect("calls").get(calls_before).cloned()
    })
    .await;
    assert_eq!(onward_call.status, 504, "{onward_call:?}");
    assert_eq!(
        onward_call.proxy_error.as_deref(),
        Some("deadline-exceeded"),
        "{onward_call:?}"
    );
    assert!(
        onward_call.returned.duration_since(onward_call.made) < Duration::from_millis(50),
        "{onward_call:?}: not answered at once"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        payments_app.hits(),
        hits_before,
        "payments called past the deadline"
    );

    // 3. The mesh boundary: a plaintext caller's `weft-timeout` is not a
    // proxy's word (ignored, and never shown to the app); gRPC's own
    // header is anyone's, and one already spent is answered 504 at once.
    let inbound = payments.running.inbound[0];
    let hits_before = payments_app.hits();
    let direct = format!("http://{inbound}/charges");
    let r = send(&client(), "GET", &direct, &[("weft-timeout", "0")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let last = seen.lock().expect("seen").last().cloned().expect("seen");
    assert!(!last.1.contains_key("weft-timeout") && !last.1.contains_key("weft-deadline"));
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "0m")];
    let r = send(&client(), "POST", &direct, &grpc).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.proxy_error.as_deref(), Some("deadline-exceeded"));
    assert_eq!(
        payments_app.hits(),
        hits_before + 1,
        "an expired call reached the app"
    );
    // A server proxy cuts its app off at the caller's deadline: 504 in
    // about 100 ms, not payments' 2 s.
    let grpc = [
        ("content-type", "application/grpc"),
        ("grpc-timeout", "100m"),
    ];
    let started = std::time::Instant::now();
    let r = send(&client(), "POST", &direct, &grpc).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.proxy_error.as_deref(), Some("deadline-exceeded"));
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let counted = payments
        .metric("weft_proxy_proxy_errors_total{direction=\"inbound\",dst=\"unknown\",reason=\"deadline-exceeded\"}")
        .await;
    assert!(counted >= 2.0, "{counted}");
}
