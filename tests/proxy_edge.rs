//! Tier 3: the proxy at its edges — bad clients, opaque TCP, server-first
//! protocols, inbound forwarding, probes, admin, and graceful shutdown.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INVENTORY: &str = "inventory.shop.svc.cluster.local:80";

/// Sends raw bytes and reads until the peer closes or 5 s pass.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx_and_the_proxy_keeps_serving() {
    let up = Upstream::fixed(200, "ok").await;
    let p = start_proxy(
        &config(vec![service("inventory", &[up.addr], None, json!([]))]),
        &[INVENTORY],
        &[],
    )
    .await;
    let addr = p.running.outbound[0];

    let reply = raw(addr, b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        reply.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let reply = raw(addr, &big).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );

    // An HTTP/2 preface followed by a frame of an undefined size for its
    // type (SETTINGS must be a multiple of 6 bytes): a connection error.
    let mut h2 = weft::proxy::detect::H2_PREFACE.to_vec();
    h2.extend_from_slice(&[0, 0, 5, 0x4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
    let reply = raw(addr, &h2).await;
    // The server answers with its SETTINGS and a GOAWAY (type 7) frame.
    let mut i = 0;
    let mut frame_types = Vec::new();
    while i + 9 <= reply.len() {
        let len = (usize::from(reply[i]) << 16)
            | (usize::from(reply[i + 1]) << 8)
            | usize::from(reply[i + 2]);
        frame_types.push(reply[i + 3]);
        i += 9 + len;
    }
    assert!(
        frame_types.contains(&7),
        "expected a GOAWAY, got frame types {frame_types:?}"
    );

    let r = get(&format!("{}/stock", p.outbound_url(0))).await;
    assert_eq!(r.status, 200, "still serving after bad clients");
    assert_eq!(up.hits(), 1, "no bad request reached the upstream");
}

async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn opaque_tcp_is_echoed_through() {
    let (echo, _task) = echo_server().await;
    let p = start_proxy(
        &config(vec![service("cache", &[echo], None, json!([]))]),
        &["cache.shop:80"],
        &[],
    )
    .await;
    let mut s = TcpStream::connect(p.running.outbound[0])
        .await
        .expect("connect");
    let payload = b"\x00\x01binary-protocol\xff";
    s.write_all(payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&back, payload);
    assert!(p.metrics().await.contains("protocol=\"opaque\""));
}

#[tokio::test]
async fn a_server_speaks_first_port_is_not_stalled_by_detection() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let db = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"+OK postgres ready\r\n").await;
        }
    });
    let mut svc = service("db", &[db], None, json!([]));
    svc["ports"] = json!([{ "port": 5432, "targetPort": 5432, "protocol": "opaque" }]);
    // A detection timeout far longer than the wait below: only skipping
    // detection can deliver the greeting in time.
    let p = start_proxy(
        &config(vec![svc]),
        &["db.shop:5432"],
        &["--detect-timeout", "60s"],
    )
    .await;
    let mut s = TcpStream::connect(p.running.outbound[0])
        .await
        .expect("connect");
    let mut greeting = vec![0u8; 20];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut greeting))
        .await
        .expect("the greeting arrives without the client speaking")
        .expect("read");
    assert_eq!(&greeting, b"+OK postgres ready\r\n");
}

#[tokio::test]
async fn inbound_forwards_to_the_app_and_probes_reach_it_in_plaintext() {
    let app = Upstream::start(std::sync::Arc::new(|_, req| {
        (200, format!("app saw {}", req.uri()), Duration::ZERO)
    }))
    .await;
    let inbound = format!("127.0.0.1:0={}", app.addr.port());
    let probe = format!("{}/healthz", app.addr.port());
    let p = start_proxy(
        &config(vec![]),
        &[],
        &["--inbound-map", &inbound, "--probe-target", &probe],
    )
    .await;
    let r = get(&format!("http://{}/orders?id=7", p.running.inbound[0])).await;
    assert_eq!((r.status, r.body.as_str()), (200, "app saw /orders?id=7"));
    let m = p.metrics().await;
    assert!(
        m.contains("direction=\"inbound\"") && m.contains("status_class=\"2xx\""),
        "{m}"
    );

    let r = get(&format!(
        "http://{}/probe/{}/healthz?full=1",
        p.running.probe,
        app.addr.port()
    ))
    .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "app saw /healthz?full=1")
    );
}

/// Paths an application may resolve past a prefix rule (`..;`, `..%2F`, a
/// backslash) are answered 400 by the inbound proxy and never reach the
/// app; an escaped slash inside a name passes.
#[tokio::test]
async fn ambiguous_paths_are_refused_with_400_and_never_reach_the_app() {
    let app = Upstream::start(std::sync::Arc::new(|_, req| {
        (200, format!("app saw {}", req.uri()), Duration::ZERO)
    }))
    .await;
    let inbound = format!("127.0.0.1:0={}", app.addr.port());
    let p = start_proxy(&config(vec![]), &[], &["--inbound-map", &inbound]).await;
    let ask = |path: &'static str| {
        let addr = p.running.inbound[0];
        async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let head = format!("GET {path} HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n\r\n");
            s.write_all(head.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
                .await
                .expect("an answer in time")
                .expect("read");
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    for path in [
        "/public/..;/admin",
        "/public/..%2Fadmin",
        "/public/..\\admin",
    ] {
        let r = ask(path).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{path}: {r}");
        assert!(r.contains("ambiguous"), "{path}: {r}");
    }
    assert_eq!(app.hits(), 0);
    let r = ask("/repos/group%2Fproject").await;
    assert!(r.ends_with("app saw /repos/group%2Fproject"), "{r}");
}

/// `/config` is for the pod's own processes, which reach the admin port at
/// 127.0.0.1 or ::1. Another pod's connection comes from its pod address
/// (tests/netns.rs shows that for real); here, on loopback only, a peer at
/// 127.0.0.2 stands in for any address that is not the pod's localhost.
#[tokio::test]
async fn the_config_is_refused_to_a_peer_that_is_not_localhost() {
    let p = start_proxy(&config(vec![]), &[], &[]).await;
    let admin = p.running.admin;
    let request =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let from = |local: [u8; 4], path: &'static str| {
        let request = request(path);
        async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(SocketAddr::from((local, 0)))
                .expect("bind the peer address");
            let mut s = socket.connect(admin).await.expect("connect");
            s.write_all(request.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let refused = from([127, 0, 0, 2], "/config").await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("weft-proxy-error: forbidden"),
        "{refused}"
    );
    assert!(
        !refused.contains("generation"),
        "no config in the refusal: {refused}"
    );
    let metrics = from([127, 0, 0, 2], "/metrics").await;
    assert!(
        metrics.starts_with("HTTP/1.1 200"),
        "scraped from outside: {metrics}"
    );
    let local = from([127, 0, 0, 1], "/config").await;
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
    assert!(local.contains("generation"), "{local}");
}

#[tokio::test]
async fn admin_reports_readiness_config_and_drains_on_request() {
    let p = start_proxy(&config(vec![]), &[], &[]).await;
    let admin = format!("http://{}", p.running.admin);
    assert_eq!(get(&format!("{admin}/live")).await.status, 200);
    let ready = get(&format!("{admin}/ready")).await;
    assert_eq!(ready.status, 200);
    let cfg: serde_json::Value =
        serde_json::from_str(&get(&format!("{admin}/config")).await.body).expect("json");
    assert!(
        ready
            .body
            .contains(cfg["generation"].as_str().expect("generation"))
    );
    let gen_metric = p.metrics().await;
    assert!(
        gen_metric.contains(&format!(
            "weft_proxy_config_generation{{generation=\"{}\"}} 1",
            cfg["generation"].as_str().unwrap_or_default()
        )),
        "{gen_metric}"
    );

    let r = send(&client(), "POST", &format!("{admin}/shutdown"), &[]).await;
    assert_eq!(r.status, 202);
    assert_eq!(
        get(&format!("{admin}/ready")).await.status,
        503,
        "not ready while draining"
    );
}

#[tokio::test]
async fn not_ready_until_a_config_exists_then_picks_it_up() {
    let app = Upstream::fixed(200, "app").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.json");
    let argv: Vec<String> = [
        "proxy",
        "--config",
        &path.display().to_string(),
        "--no-transparent",
        "--admin",
        "127.0.0.1:0",
        "--probe",
        "127.0.0.1:0",
        "--inbound-map",
        &format!("127.0.0.1:0={}", app.addr.port()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args = parse_args(&argv);
    let proxy = weft::proxy::Proxy::new(&args).expect("proxy");
    let running = weft::proxy::start(&args, proxy.clone())
        .await
        .expect("start");
    let admin = format!("http://{}/ready", running.admin);
    assert_eq!(get(&admin).await.status, 503);

    // Inbound fails closed until a config says the mode and the rules: the
    // connection is closed and the app sees nothing.
    let mut raw = TcpStream::connect(running.inbound[0])
        .await
        .expect("connect");
    let _ = raw.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(app.hits(), 0);
    let refused = "weft_proxy_inbound_refused_no_config_total";
    let metrics = format!("http://{}/metrics", running.admin);
    assert!(get(&metrics).await.body.contains(&format!("{refused} 1")));

    write_atomic(&path, config(vec![]).to_string().as_bytes());
    let status = wait_status(&admin, 200).await;
    assert_eq!(status, 200, "ready once the config file appears");
    let inbound = format!("http://{}/", running.inbound[0]);
    assert_eq!(
        get(&inbound).await.status,
        200,
        "served once it has a config"
    );
    assert_eq!(app.hits(), 1);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_and_refuses_new_connections() {
    let up = Upstream::start(std::sync::Arc::new(|_, _| {
        (200, "slow but done".into(), Duration::from_millis(1500))
    }))
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.json");
    write_atomic(
        &path,
        config(vec![service("inventory", &[up.addr], None, json!([]))])
            .to_string()
            .as_bytes(),
    );
    let (admin, listen) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "proxy",
            "--config",
            &path.display().to_string(),
            "--no-transparent",
        ])
        .args([
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--probe",
            "127.0.0.1:0",
        ])
        .args(["--outbound-map", &format!("127.0.0.1:{listen}={INVENTORY}")])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn weft proxy");
    let mut child = Kill(child);
    let mut ready = false;
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", admin)).await.is_ok()
            && get(&format!("http://127.0.0.1:{admin}/ready")).await.status == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "proxy became ready");
    let in_flight =
        tokio::spawn(async move { get(&format!("http://127.0.0.1:{listen}/stock")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(("127.0.0.1", listen)).await.is_err(),
        "new connections are refused while draining"
    );
    let r = in_flight.await.expect("request task");
    assert_eq!((r.status, r.body.as_str()), (200, "slow but done"));
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = child.0.try_wait().expect("wait") {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "exits cleanly after draining: {exited:?}"
    );
}

#[tokio::test]
async fn the_proxy_waits_for_its_identity_then_reports_expiry_and_bundle() {
    use weft::identity::{CA_LIFETIME, MeshCa, SpiffeId, bundle_hash};
    let ids = tempfile::tempdir().expect("tempdir");
    let dir = ids.path().display().to_string();
    let p = start_proxy(
        &config(vec![]),
        &[],
        &["--identity-dir", &dir, "--service-account", "checkout"],
    )
    .await;
    let ready = format!("http://{}/ready", p.running.admin);
    let r = get(&ready).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "no identity loaded yet\n")
    );

    let now = std::time::SystemTime::now();
    let ca = MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca");
    let leaf = ca
        .issue(
            &SpiffeId::new("cluster.local", "shop", "checkout"),
            now,
            Duration::from_secs(24 * 3600),
        )
        .expect("leaf");
    write_atomic(&ids.path().join("ca.crt"), ca.trust_bundle().as_bytes());
    write_atomic(&ids.path().join("tls.key"), leaf.key_pem.as_bytes());
    write_atomic(&ids.path().join("tls.crt"), leaf.cert_pem.as_bytes());
    let status = wait_status(&ready, 200).await;
    assert_eq!(status, 200, "ready once the identity is loaded");
    let m = p.metrics().await;
    let expiry = leaf
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs();
    assert!(
        m.contains(&format!(
            "weft_proxy_certificate_expiry_timestamp_seconds {expiry}"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "weft_proxy_trust_bundle{{hash=\"{}\"}} 1",
            bundle_hash(&ca.trust_bundle())
        )),
        "{m}"
    );

    // A broken key keeps the loaded identity and is counted.
    write_atomic(&ids.path().join("tls.key"), b"not a key");
    let failures = p
        .wait_metric("weft_proxy_identity_reload_failures_total", 1.0)
        .await;
    assert_eq!(failures, 1.0);
    assert_eq!(
        get(&ready).await.status,
        200,
        "the last good identity stays"
    );
}
