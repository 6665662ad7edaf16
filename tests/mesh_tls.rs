//! Tier 3: mesh TLS handshakes over loopback with certificates minted by
//! the mesh's own CA code: who sees which identity, and which certificates
//! are refused, each for its own counted reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft::identity::{CA_LIFETIME, MeshCa, SpiffeId};
use weft::proxy::tls::{ALPN_HTTP1, ExpectedServer, MeshIdentity, RejectLabels, peer_identity};

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Side {
    identity: Arc<MeshIdentity>,
    rejections: Family<RejectLabels, Counter>,
}

fn side(ca: &MeshCa, bundle: &str, td: &str, id: &SpiffeId, issued: SystemTime) -> Side {
    let rejections = Family::default();
    let identity = MeshIdentity::new(td, rejections.clone());
    let cert = ca.issue(id, issued, DAY).expect("issue");
    identity
        .update(&cert.cert_pem, &cert.key_pem, bundle)
        .expect("load identity");
    Side {
        identity,
        rejections,
    }
}

fn rejected(side: &Side, direction: &str, reason: &str) -> u64 {
    side.rejections
        .get(&RejectLabels {
            direction: direction.into(),
            reason: reason.into(),
        })
        .map(|c| c.get())
        .unwrap_or(0)
}

/// Runs one handshake and a byte exchange. Returns what each side learnt
/// of the other, or `None` where the handshake failed.
async fn handshake(
    server: &Side,
    client: &Side,
    expected: ExpectedServer,
) -> (Option<SpiffeId>, Option<SpiffeId>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(server.identity.server_config().expect("server config"));
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.ok()?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.ok()?;
        tls.write_all(b"pong").await.ok()?;
        peer
    });
    let connector = TlsConnector::from(
        client
            .identity
            .client_config(expected, ALPN_HTTP1)
            .expect("client config"),
    );
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("mesh.weft.invalid").expect("name");
    let seen_by_client = match connector.connect(name, tcp).await {
        Ok(mut tls) => {
            let peer = peer_identity(tls.get_ref().1.peer_certificates());
            let _ = tls.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            let _ = tls.read_exact(&mut buf).await;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_HTTP1));
            assert_eq!(
                tls.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let group = tls
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name());
            assert_eq!(
                group,
                Some(rustls::NamedGroup::X25519MLKEM768),
                "hybrid post-quantum key exchange"
            );
            peer
        }
        Err(_) => None,
    };
    let seen_by_server = tokio::time::timeout(Duration::from_secs(5), srv)
        .await
        .expect("server in time")
        .expect("join");
    (seen_by_server, seen_by_client)
}

fn ids() -> (SpiffeId, SpiffeId) {
    (
        SpiffeId::new("cluster.local", "payments", "payments"),
        SpiffeId::new("cluster.local", "shop", "checkout"),
    )
}

fn payments() -> ExpectedServer {
    ExpectedServer {
        namespace: "payments".into(),
        service_accounts: vec!["payments".into()],
    }
}

#[tokio::test]
async fn both_sides_learn_each_others_spiffe_id() {
    let now = SystemTime::now();
    let ca = MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca");
    let (srv_id, cli_id) = ids();
    let server = side(&ca, &ca.trust_bundle(), "cluster.local", &srv_id, now);
    let client = side(&ca, &ca.trust_bundle(), "cluster.local", &cli_id, now);
    let (seen_by_server, seen_by_client) = handshake(&server, &client, payments()).await;
    assert_eq!(seen_by_server, Some(cli_id));
    assert_eq!(seen_by_client, Some(srv_id));
}

#[tokio::test]
async fn foreign_ca_expired_and_wrong_trust_domain_are_refused_for_their_own_reasons() {
    let now = SystemTime::now();
    let ca = MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca");
    let rogue = MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("rogue ca");
    let (srv_id, cli_id) = ids();
    let bundle = ca.trust_bundle();
    let server = side(&ca, &bundle, "cluster.local", &srv_id, now);

    // A client certificate from another CA.
    let stranger = side(&rogue, &bundle, "cluster.local", &cli_id, now);
    assert_eq!(handshake(&server, &stranger, payments()).await.0, None);
    assert_eq!(rejected(&server, "inbound", "unknown-ca"), 1);

    // An expired client certificate: issued two days ago for one day.
    let stale = side(&ca, &bundle, "cluster.local", &cli_id, now - 2 * DAY);
    assert_eq!(handshake(&server, &stale, payments()).await.0, None);
    assert_eq!(rejected(&server, "inbound", "expired"), 1);

    // A valid chain with an identity of another trust domain.
    let foreign_id = SpiffeId::new("evil.example", "shop", "checkout");
    let foreign = side(&ca, &bundle, "cluster.local", &foreign_id, now);
    assert_eq!(handshake(&server, &foreign, payments()).await.0, None);
    assert_eq!(rejected(&server, "inbound", "foreign-trust-domain"), 1);
}

/// A CA made with rcgen directly, to sign what the mesh CA never issues.
/// Returns its PEM (the trust bundle) and the issuer.
fn odd_ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let key = KeyPair::generate().expect("ca key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let cert = params.self_signed(&key).expect("ca cert");
    (cert.pem(), Issuer::new(params, key))
}

/// A side whose leaf, signed by `issuer`, carries the URI SANs `uris`.
fn odd_side(bundle: &str, issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, uris: &[&str]) -> Side {
    use rcgen::{CertificateParams, KeyPair, SanType};
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    let cert = params.signed_by(&key, issuer).expect("leaf");
    let rejections = Family::default();
    let identity = MeshIdentity::new("cluster.local", rejections.clone());
    identity
        .update(&cert.pem(), &key.serialize_pem(), bundle)
        .expect("load identity");
    Side {
        identity,
        rejections,
    }
}

/// An X.509-SVID carries exactly one URI SAN: a certificate with a second
/// one (whichever comes first) names no one workload, and one whose URI is
/// not a weft SPIFFE id names none; each is refused for its own reason.
#[tokio::test]
async fn several_uri_sans_or_a_non_spiffe_uri_are_refused_for_their_own_reasons() {
    let checkout = "spiffe://cluster.local/ns/shop/sa/checkout";
    let (bundle, issuer) = odd_ca();
    let server = odd_side(
        &bundle,
        &issuer,
        &["spiffe://cluster.local/ns/payments/sa/payments"],
    );
    // The control: the same CA's well-formed client is admitted.
    let good = odd_side(&bundle, &issuer, &[checkout]);
    let (seen_by_server, seen_by_client) = handshake(&server, &good, payments()).await;
    assert_eq!(seen_by_server, Some(ids().1));
    assert_eq!(seen_by_client, Some(ids().0));
    let mut expected = std::collections::HashMap::<&str, u64>::new();
    for (uris, reason) in [
        (
            vec!["https://example.com/checkout", checkout],
            "multiple-uri-sans",
        ),
        (
            vec![checkout, "spiffe://cluster.local/ns/shop/sa/admin"],
            "multiple-uri-sans",
        ),
        (vec!["https://example.com/checkout"], "no-spiffe-id"),
        (
            vec!["spiffe://cluster.local/ns/shop/sa/%2e%2e"],
            "no-spiffe-id",
        ),
    ] {
        let client = odd_side(&bundle, &issuer, &uris);
        let (seen_by_server, _) = handshake(&server, &client, payments()).await;
        assert_eq!(seen_by_server, None, "{uris:?}");
        *expected.entry(reason).or_default() += 1;
        for (reason, n) in &expected {
            assert_eq!(rejected(&server, "inbound", reason), *n, "{uris:?}");
        }
    }
}

#[tokio::test]
async fn clients_refuse_a_server_that_is_not_the_expected_identity() {
    let now = SystemTime::now();
    let ca = MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca");
    let (_, cli_id) = ids();
    let impostor_id = SpiffeId::new("cluster.local", "shop", "cart");
    let impostor = side(&ca, &ca.trust_bundle(), "cluster.local", &impostor_id, now);
    let client = side(&ca, &ca.trust_bundle(), "cluster.local", &cli_id, now);
    let (_, seen_by_client) = handshake(&impostor, &client, payments()).await;
    assert_eq!(seen_by_client, None, "cart may not pose as payments");
    assert_eq!(rejected(&client, "outbound", "unexpected-identity"), 1);
    // Any account of the namespace when the Service names none.
    let anyone = ExpectedServer {
        namespace: "shop".into(),
        service_accounts: vec![],
    };
    assert_eq!(
        handshake(&impostor, &client, anyone).await.1,
        Some(impostor_id)
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_presented_on_the_next_handshake() {
    let now = SystemTime::now();
    let ca = MeshCa::generate("cluster.local", now, CA_LIFETIME).expect("ca");
    let (srv_id, cli_id) = ids();
    let server = side(&ca, &ca.trust_bundle(), "cluster.local", &srv_id, now);
    let client = side(&ca, &ca.trust_bundle(), "cluster.local", &cli_id, now);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(server.identity.server_config().expect("config"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 1];
                    while tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(&buf).await;
                    }
                }
            });
        }
    });
    let connector = TlsConnector::from(
        client
            .identity
            .client_config(payments(), ALPN_HTTP1)
            .expect("config"),
    );
    let name = || ServerName::try_from("mesh.weft.invalid").expect("name");
    let mut first = connector
        .connect(name(), TcpStream::connect(addr).await.expect("tcp"))
        .await
        .expect("tls");
    let serial = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
    };
    let before = serial(&first);
    // Rotate the server's certificate.
    let fresh = ca.issue(&srv_id, SystemTime::now(), DAY).expect("issue");
    server
        .identity
        .update(&fresh.cert_pem, &fresh.key_pem, &ca.trust_bundle())
        .expect("rotate");
    // The established connection keeps working...
    first.write_all(b"x").await.expect("write");
    let mut buf = [0u8; 1];
    first
        .read_exact(&mut buf)
        .await
        .expect("echo on the old connection");
    // ...and a new handshake presents the new certificate.
    let second = connector
        .connect(name(), TcpStream::connect(addr).await.expect("tcp"))
        .await
        .expect("tls");
    let after = serial(&second);
    assert_ne!(before, after);
    use rustls::pki_types::pem::PemObject;
    let fresh_der =
        rustls::pki_types::CertificateDer::from_pem_slice(fresh.cert_pem.as_bytes()).expect("pem");
    assert_eq!(after, Some(fresh_der.to_vec()));
}
