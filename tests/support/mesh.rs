//! Mesh identities for tier-3 tests: a CA of the mesh's own code, the
//! identity directories a pod mounts, proxies started with them, and
//! clients that handshake as a meshed workload would.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::net::TcpStream;
use weft::identity::{CA_LIFETIME, MeshCa, SpiffeId};

use super::*;

/// A leaf certificate's lifetime in these tests.
pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// The mesh CA and the identity directories it fills.
pub struct Pki {
    pub ca: MeshCa,
}

impl Pki {
    pub fn new() -> Self {
        let ca = MeshCa::generate("cluster.local", SystemTime::now(), CA_LIFETIME).expect("ca");
        Self { ca }
    }

    /// A mounted identity Secret for `sa` holding a certificate for `id`,
    /// issued by `issuer`, from `issued` for a day.
    pub fn dir_with(&self, sa: &str, issuer: &MeshCa, id: &SpiffeId, issued: SystemTime) -> IdDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let leaf = issuer.issue(id, issued, DAY).expect("leaf");
        write_atomic(
            &dir.path().join("ca.crt"),
            self.ca.trust_bundle().as_bytes(),
        );
        write_atomic(&dir.path().join("tls.key"), leaf.key_pem.as_bytes());
        write_atomic(&dir.path().join("tls.crt"), leaf.cert_pem.as_bytes());
        IdDir {
            dir,
            sa: sa.to_owned(),
        }
    }

    pub fn dir(&self, ns: &str, sa: &str) -> IdDir {
        let id = SpiffeId::new("cluster.local", ns, sa);
        self.dir_with(sa, &self.ca, &id, SystemTime::now())
    }
}

pub struct IdDir {
    pub dir: tempfile::TempDir,
    pub sa: String,
}

impl IdDir {
    pub fn args(&self) -> Vec<String> {
        vec![
            "--identity-dir".into(),
            self.dir.path().display().to_string(),
            "--service-account".into(),
            self.sa.clone(),
        ]
    }
}

/// Handshakes with a mesh server as a meshed client of identity
/// shop/`account` would, speaking HTTP/1.1 inside.
pub async fn mesh_connect(
    pki: &Pki,
    addr: SocketAddr,
    account: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    mesh_connect_alpn(pki, addr, account, weft::proxy::tls::ALPN_HTTP1).await
}

/// [`mesh_connect`], speaking `alpn` inside.
pub async fn mesh_connect_alpn(
    pki: &Pki,
    addr: SocketAddr,
    account: &str,
    alpn: &'static [u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let id = SpiffeId::new("cluster.local", "shop", account);
    let leaf = pki.ca.issue(&id, SystemTime::now(), DAY).expect("leaf");
    let me = weft::proxy::tls::MeshIdentity::new("cluster.local", Default::default());
    me.update(&leaf.cert_pem, &leaf.key_pem, &pki.ca.trust_bundle())
        .expect("identity");
    let expected = weft::proxy::tls::ExpectedServer {
        namespace: "shop".into(),
        service_accounts: vec![],
    };
    let config = me.client_config(expected, alpn).expect("client config");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("mesh handshake")
}

/// The server namespace's config: mode, plaintext ports, authorizations.
pub fn server_config(mode: &str, plaintext_ports: &[u16], authorizations: Value) -> Value {
    let mut c = config(vec![]);
    c["inbound"] = json!({
        "mode": mode, "plaintextPorts": plaintext_ports, "authorizations": authorizations,
    });
    c
}

pub async fn wait_ready(p: &TestProxy) {
    let ready = format!("http://{}/ready", p.running.admin);
    assert_eq!(wait_status(&ready, 200).await, 200, "proxy ready");
}

/// Starts a proxy with an identity and waits until it is ready.
pub async fn meshed(config: &Value, targets: &[&str], id: &IdDir, extra: &[&str]) -> TestProxy {
    let mut args: Vec<String> = id.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = start_proxy(config, targets, &args).await;
    wait_ready(&p).await;
    p
}

/// The server side: a proxy in front of `app_port` (and more ports).
pub async fn server_proxy(pki: &Pki, config: &Value, app_ports: &[u16]) -> (TestProxy, IdDir) {
    let id = pki.dir("shop", "payments");
    let maps: Vec<String> = app_ports
        .iter()
        .flat_map(|p| ["--inbound-map".to_owned(), format!("127.0.0.1:0={p}")])
        .collect();
    let maps: Vec<&str> = maps.iter().map(String::as_str).collect();
    let p = meshed(config, &[], &id, &maps).await;
    (p, id)
}
