//! Tier 3, issue 21 item 1: ExternalService. The app speaks plain HTTP to
//! a vendor; the proxy finds the vendor by the host the request names,
//! applies its TrafficPolicy, and with `tls` originates TLS, verifying the
//! vendor's certificate against the CA the resource names. The vendors are
//! real TLS servers on loopback whose CA is made here; what reached them
//! (and under which SNI) is their own record.
//!
//! In a pod the app's connection to the vendor arrives at the proxy with
//! the vendor's address as its original destination (`SO_ORIGINAL_DST`,
//! whatever the app's DNS answered) and the vendor's name only in `Host`:
//! the tests dial an explicit listener mapped to such an address, so the
//! proxy must route by the name, as in a cluster.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpListener;
use weft::identity::{CA_LIFETIME, MeshCa};

const DAY: Duration = Duration::from_secs(86_400);

/// A vendor CA, as a payment gateway's private PKI.
fn vendor_ca() -> MeshCa {
    MeshCa::generate("vendor.test", SystemTime::now(), CA_LIFETIME).expect("vendor CA")
}

/// A vendor serving HTTPS with a certificate `ca` issued for `names`. It
/// answers 503 to its first `fail_first` requests and 200 `paid` after,
/// and records the SNI and path of each request.
/// What a vendor saw of each request: the SNI, and the path.
type Seen = Arc<Mutex<Vec<(Option<String>, String)>>>;

struct Vendor {
    addr: SocketAddr,
    seen: Seen,
    /// The `Host` of each request.
    hosts: Arc<Mutex<Vec<String>>>,
    /// The URI SAN of the client certificate of each request, if any.
    clients: Arc<Mutex<Vec<Option<String>>>>,
    /// TCP connections accepted.
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Vendor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Vendor {
    fn requests(&self) -> Vec<(Option<String>, String)> {
        self.seen.lock().expect("seen").clone()
    }

    fn hosts(&self) -> Vec<String> {
        self.hosts.lock().expect("hosts").clone()
    }

    fn clients(&self) -> Vec<Option<String>> {
        self.clients.lock().expect("clients").clone()
    }
}

async fn vendor(ca: &MeshCa, names: &[&str], fail_first: usize) -> Vendor {
    vendor_asking(ca, names, fail_first, None).await
}

/// [`vendor`] that requires a client certificate signed by `clients`
/// (mutual TLS, as a bank's API) when given, and records the URI SAN of
/// the certificate each request came with.
async fn vendor_asking(
    ca: &MeshCa,
    names: &[&str],
    fail_first: usize,
    clients: Option<&MeshCa>,
) -> Vendor {
    vendor_with(ca, names, fail_first, clients, Duration::ZERO).await
}

/// [`vendor_asking`] whose TLS handshakes each take `handshake` first (a
/// vendor far away, or a full handshake on a loaded node).
async fn vendor_with(
    ca: &MeshCa,
    names: &[&str],
    fail_first: usize,
    clients: Option<&MeshCa>,
    handshake: Duration,
) -> Vendor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf = ca
        .issue_server(&names, SystemTime::now(), DAY)
        .expect("vendor certificate");
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(weft::proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(clients.trust_bundle().as_bytes()) {
                roots.add(c.expect("client CA")).expect("client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                weft::proxy::tls::provider(),
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let hosts: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let (record, record_host, record_client) = (seen.clone(), hosts.clone(), clients.clone());
    let accepted = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (acceptor, record, record_host, record_client) = (
                acceptor.clone(),
                record.clone(),
                record_host.clone(),
                record_client.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(handshake).await;
                // A client that refuses the certificate ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| weft::identity::inspect_der(c).ok())
                    .and_then(|info| info.uri_sans.first().cloned());
                let record_client = record_client.clone();
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (record, sni) = (record.clone(), sni.clone());
                    record_client.lock().expect("clients").push(client.clone());
                    let host = req
                        .headers()
                        .get_all(http::header::HOST)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(",");
                    record_host.lock().expect("hosts").push(host);
                    async move {
                        let n = {
                            let mut seen = record.lock().expect("seen");
                            seen.push((sni, req.uri().path().to_owned()));
                            seen.len()
                        };
                        let status = if n <= fail_first { 503 } else { 200 };
                        let body = if status == 200 { "paid" } else { "busy" };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Vendor {
        addr,
        seen,
        hosts,
        clients,
        connections,
        task,
    }
}

/// The config of namespace `shop` with one ExternalService `gateway`.
fn with_external(external: Value) -> Value {
    let mut c = config(vec![]);
    c["outbound"]["externalServices"] = json!([external]);
    c
}

/// ExternalService `gateway`: `hosts`, port 80 dialled, the vendor at
/// `vendor` (fixed, as `weft local` writes it; DNS in a cluster), with
/// `tls` when given.
fn gateway(hosts: &[&str], vendor: SocketAddr, tls: Option<Value>, policy: Option<Value>) -> Value {
    let mut port = json!({ "port": 80, "targetPort": vendor.port() });
    if let Some(tls) = tls {
        port["tls"] = tls;
    }
    let mut es = json!({
        "name": "gateway", "namespace": "shop",
        "hosts": hosts,
        "ports": [port],
        "endpoints": [vendor.to_string()],
    });
    if let Some(p) = policy {
        es["policy"] = p;
    }
    es
}

/// A proxy whose outbound listener stands for a connection the app made
/// to some address on port 80 (the vendor's, as its DNS answered):
/// 127.0.0.2, where nothing listens, so a request that is not routed by
/// its name fails rather than reaching anything.
async fn proxy(config: &Value) -> TestProxy {
    start_proxy(config, &["127.0.0.2:80"], &[]).await
}

/// A proxy that originates TLS to vendor `v` as ExternalService `host`,
/// verified by `ca`, with no policy.
async fn originating(ca: &MeshCa, host: &str, v: &Vendor) -> TestProxy {
    let tls = json!({ "caCertificates": ca.trust_bundle() });
    proxy(&with_external(gateway(&[host], v.addr, Some(tls), None))).await
}

/// GET `path` through the proxy with `Host: host`: status, the proxy's
/// error header, body.
async fn call(p: &TestProxy, host: &str, path: &str) -> (u16, Option<String>, String) {
    let req = http::Request::get(format!("{}{path}", p.outbound_url(0)))
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = client().request(req).await.expect("response");
    let status = rsp.status().as_u16();
    let error = rsp
        .headers()
        .get("weft-proxy-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    (status, error, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_app_speaks_http_and_the_proxy_originates_tls_verified_by_the_named_ca() {
    let ca = vendor_ca();
    let v = vendor(&ca, &["api.gateway.test"], 0).await;
    let p = originating(&ca, "api.gateway.test", &v).await;

    let (status, _, body) = call(&p, "api.gateway.test", "/v1/charges").await;
    assert_eq!((status, body.as_str()), (200, "paid"));
    assert_eq!(
        v.requests(),
        vec![(
            Some("api.gateway.test".to_owned()),
            "/v1/charges".to_owned()
        )],
        "the vendor got the request over TLS, with the host as SNI"
    );
    // Measured against the vendor's name, not the address dialled.
    assert_eq!(
        p.metric(
            "weft_proxy_requests_total{direction=\"outbound\",src=\"unknown\",dst=\"api.gateway.test:80\",route=\"default\",status_class=\"2xx\""
        )
        .await,
        1.0
    );
    // The host matches in any case, with a port, and fully qualified
    // (one destination: one series, one breaker, one budget).
    for host in ["API.Gateway.test:80", "api.gateway.test."] {
        let (status, _, _) = call(&p, host, "/v1/refunds").await;
        assert_eq!(status, 200, "{host}");
    }
    assert_eq!(
        p.metric(
            "weft_proxy_requests_total{direction=\"outbound\",src=\"unknown\",dst=\"api.gateway.test:80\",route=\"default\",status_class=\"2xx\""
        )
        .await,
        3.0
    );
    // The vendor is told the name it is called by, whatever `Host` the
    // app wrote: an absolute-form request naming the vendor with another
    // site in `Host` (or two `Host`s) cannot reach that site behind the
    // vendor's front end.
    let mut raw = tokio::net::TcpStream::connect(p.running.outbound[0])
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(
        b"GET http://api.gateway.test/v1/x HTTP/1.1\r\nHost: exfil.attacker.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // (The vendor stub listens on a port of its own, which `Host` says.)
    let vendor = format!("api.gateway.test:{}", v.addr.port());
    assert!(v.hosts().iter().all(|h| *h == vendor), "{:?}", v.hosts());
}

#[tokio::test]
async fn a_vendor_certificate_the_named_ca_did_not_sign_gets_no_request_and_is_counted() {
    let (ours, impostor) = (vendor_ca(), vendor_ca());
    let v = vendor(&impostor, &["api.gateway.test"], 0).await;
    let p = proxy(&with_external(gateway(
        &["api.gateway.test"],
        v.addr,
        Some(json!({ "caCertificates": ours.trust_bundle() })),
        None,
    )))
    .await;

    let (status, error, _) = call(&p, "api.gateway.test", "/v1/charges").await;
    assert_eq!((status, error.as_deref()), (502, Some("connect-error")));
    assert!(v.requests().is_empty(), "nothing reached the impostor");
    // The impostor's CA bears our vendor CA's name: a certificate issued
    // in that name but not signed by it.
    let failures = p
        .metric("weft_proxy_outbound_tls_origination_failures_total{dst=\"api.gateway.test:80\",reason=\"bad-signature\"}")
        .await;
    assert!(failures >= 1.0, "{}", p.metrics().await);

    // With no CA named, the Mozilla roots are used: a private CA's
    // certificate is refused the same way.
    let p = proxy(&with_external(gateway(
        &["api.gateway.test"],
        v.addr,
        Some(json!({})),
        None,
    )))
    .await;
    let (status, _, _) = call(&p, "api.gateway.test", "/").await;
    assert_eq!(status, 502);
    assert!(v.requests().is_empty());
    let failures = p
        .metric("weft_proxy_outbound_tls_origination_failures_total{dst=\"api.gateway.test:80\",reason=\"unknown-issuer\"}")
        .await;
    assert!(failures >= 1.0, "{}", p.metrics().await);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_unless_that_name_is_pinned() {
    let ca = vendor_ca();
    let v = vendor(&ca, &["pay.gateway-cdn.test"], 0).await;
    let unpinned = originating(&ca, "api.gateway.test", &v).await;
    let (status, _, _) = call(&unpinned, "api.gateway.test", "/").await;
    assert_eq!(status, 502);
    assert!(
        unpinned
            .metric("weft_proxy_outbound_tls_origination_failures_total{dst=\"api.gateway.test:80\",reason=\"name-mismatch\"}")
            .await
            >= 1.0
    );
    assert!(v.requests().is_empty());

    let pinned = proxy(&with_external(gateway(
        &["api.gateway.test"],
        v.addr,
        Some(json!({ "caCertificates": ca.trust_bundle(), "serverName": "pay.gateway-cdn.test" })),
        None,
    )))
    .await;
    let (status, _, body) = call(&pinned, "api.gateway.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "paid"));
    assert_eq!(v.requests()[0].0.as_deref(), Some("pay.gateway-cdn.test"));
}

/// A wildcard claims one leftmost label; each host it matches is its own
/// destination (series, breaker), and the ExternalService's TrafficPolicy
/// applies: here a retry of a 503 the vendor answers first.
#[tokio::test]
async fn a_wildcard_claims_one_label_and_the_traffic_policy_applies() {
    let ca = vendor_ca();
    let v = vendor(&ca, &["eu.carrier.test", "us.carrier.test"], 1).await;
    let mut policy = default_policy();
    policy["source"] = json!("shop/carrier");
    policy["retry"]["retryOn"] = json!(["connect-failure", "5xx"]);
    let p = proxy(&with_external(gateway(
        &["*.carrier.test"],
        v.addr,
        Some(json!({ "caCertificates": ca.trust_bundle() })),
        Some(policy),
    )))
    .await;

    let (status, _, body) = call(&p, "eu.carrier.test", "/rates").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "paid"),
        "the vendor's 503 was retried under the policy"
    );
    assert_eq!(v.requests().len(), 2);
    let (status, _, _) = call(&p, "us.carrier.test", "/rates").await;
    assert_eq!(status, 200);
    let metrics = p.metrics().await;
    assert!(metrics.contains("dst=\"eu.carrier.test:80\""), "{metrics}");
    assert!(metrics.contains("dst=\"us.carrier.test:80\""), "{metrics}");

    // Neither the bare suffix nor two labels deep: those are not claimed,
    // and go where the app dialled (an address nothing serves here).
    for host in ["carrier.test", "a.eu.carrier.test"] {
        let (status, _, _) = call(&p, host, "/rates").await;
        assert_ne!(status, 200, "{host}");
    }
    assert_eq!(
        v.requests().len(),
        3,
        "the unclaimed hosts never reached the vendor"
    );
}

/// An HTTPS GET of `/` made by the app itself (its own TLS, trusting
/// `ca`, SNI `sni`) through the proxy's listener: the status and body, or
/// why it failed.
async fn https_get(p: &TestProxy, ca: &MeshCa, sni: &str) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.trust_bundle().as_bytes()) {
        roots.add(cert.expect("ca")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(weft::proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(p.running.outbound[0])
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header(http::header::HOST, sni)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// The app's own HTTPS passes through untouched (the vendor's certificate
/// reaches the app, which verifies it), routed by the SNI to the vendor
/// the ExternalService names, and counted per vendor host. A name no
/// ExternalService claims goes where the app dialled.
#[tokio::test]
async fn the_apps_own_tls_passes_through_routed_by_sni() {
    let ca = vendor_ca();
    let v = vendor(&ca, &["files.vendor.test", "other.vendor.test"], 0).await;
    let mut es = gateway(&["files.vendor.test"], v.addr, None, None);
    es["ports"] = json!([{ "port": 443, "protocol": "tls", "targetPort": v.addr.port() }]);
    // The app dialled 127.0.0.2:443, where nothing listens.
    let p = start_proxy(&with_external(es), &["127.0.0.2:443"], &[]).await;

    let answer = https_get(&p, &ca, "files.vendor.test").await;
    assert_eq!(answer, Ok((200, "paid".to_owned())));
    assert_eq!(
        v.requests(),
        vec![(Some("files.vendor.test".to_owned()), "/".to_owned())]
    );
    assert_eq!(
        p.metric("weft_proxy_outbound_external_tls_connections_total{dst=\"files.vendor.test:443\",outcome=\"relayed\"}")
            .await,
        1.0
    );

    let unclaimed = https_get(&p, &ca, "other.vendor.test").await;
    assert!(unclaimed.is_err(), "{unclaimed:?}");
    assert_eq!(
        v.requests().len(),
        1,
        "the unclaimed name never reached the vendor"
    );
}

/// Egress `RegistryOnly`: a request to a host nothing names is answered
/// 403 `egress-denied` and counted by host, a TCP connection to an
/// address nothing names is closed; what an ExternalService names still
/// works. Under `AllowAll` the same request goes and is counted as what
/// the switch would refuse.
#[tokio::test]
async fn registry_only_refuses_what_nothing_names_and_counts_it() {
    let ca = vendor_ca();
    let v = vendor(&ca, &["api.gateway.test"], 0).await;
    let open = serve(axum::Router::new().fallback(|| async { "anyone" })).await;
    let mut config = with_external(gateway(
        &["api.gateway.test"],
        v.addr,
        Some(json!({ "caCertificates": ca.trust_bundle() })),
        None,
    ));
    config["outbound"]["egress"] = json!("RegistryOnly");
    // The first listener stands for port 80 of some address, the second
    // for a plain server nothing registers (an unknown host's address).
    let open_target = open.addr.to_string();
    let p = start_proxy(&config, &["127.0.0.2:80", &open_target], &[]).await;

    let (status, _, body) = call(&p, "api.gateway.test", "/").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "paid"),
        "a named vendor works"
    );
    let (status, error, _) = call(&p, "exfiltrate.example", "/").await;
    assert_eq!((status, error.as_deref()), (403, Some("egress-denied")));
    assert_eq!(
        p.metric("weft_proxy_outbound_egress_unregistered_total{dst=\"exfiltrate.example:80\",protocol=\"http\",action=\"refused\"}")
            .await,
        1.0
    );
    // Opaque bytes to the unregistered address: closed unanswered.
    let mut tcp = tokio::net::TcpStream::connect(p.running.outbound[1])
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"\x00\x01binary hello").await.expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {got:?}");
    assert!(
        p.wait_metric(
            &format!("weft_proxy_outbound_egress_unregistered_total{{dst=\"{open_target}\",protocol=\"tcp\",action=\"refused\"}}"),
            1.0
        )
        .await
            >= 1.0
    );

    // AllowAll: the same request goes, and is counted as allowed.
    config["outbound"]["egress"] = json!("AllowAll");
    let p = start_proxy(&config, &[&open_target], &[]).await;
    let (status, _, body) = call(&p, "exfiltrate.example", "/").await;
    assert_eq!((status, body.as_str()), (200, "anyone"));
    assert_eq!(
        p.metric("weft_proxy_outbound_egress_unregistered_total{dst=\"exfiltrate.example:")
            .await,
        1.0
    );
}

/// TLS the app speaks to a name nothing registers is counted under that
/// name (read from the ClientHello, never terminated): refused under
/// RegistryOnly, let through under AllowAll, so the names to declare are
/// known before the switch.
#[tokio::test]
async fn unregistered_tls_is_counted_by_its_sni_and_refused_only_under_registry_only() {
    let ca = vendor_ca();
    // A server nothing registers, answering for the name the app asks.
    let v = vendor(&ca, &["files.nowhere.test"], 0).await;
    let dialled = v.addr.to_string();
    for (egress, action) in [("RegistryOnly", "refused"), ("AllowAll", "allowed")] {
        let mut config = config(vec![]);
        config["outbound"]["egress"] = json!(egress);
        let p = start_proxy(&config, &[&dialled], &[]).await;
        let answer = https_get(&p, &ca, "files.nowhere.test").await;
        if egress == "AllowAll" {
            assert_eq!(answer, Ok((200, "paid".to_owned())), "relayed untouched");
        } else {
            assert!(answer.is_err(), "{egress}: {answer:?}");
        }
        let reached = if egress == "AllowAll" { 1 } else { 0 };
        assert_eq!(v.requests().len(), reached, "{egress}");
        let series = format!(
            "weft_proxy_outbound_egress_unregistered_total{{dst=\"files.nowhere.test:{}\",protocol=\"tls\",action=\"{action}\"}}",
            v.addr.port()
        );
        assert_eq!(p.wait_metric(&series, 1.0).await, 1.0, "{egress}");
    }
}

#[tokio::test]
async fn a_client_certificate_is_presented_from_the_identity_directory_and_none_means_no_call() {
    // The bank's API wants a certificate its own client CA issued.
    let (ca, bank_clients) = (vendor_ca(), vendor_ca());
    let v = vendor_asking(&ca, &["api.bank.test"], 0, Some(&bank_clients)).await;
    let ours = weft::identity::SpiffeId::new("bank.test", "merchants", "shop-42");
    let cert = bank_clients
        .issue(&ours, SystemTime::now(), DAY)
        .expect("client certificate");
    // The identity directory as the kubelet writes the identity Secret,
    // with the operator's copy of Secret `bank-client` (no mesh identity
    // in it yet: a vendor call does not wait for one).
    let dir = tempfile::tempdir().expect("dir");
    let (crt, key) = weft::config::egress_credential_keys("bank-client");
    let config = with_external(gateway(
        &["api.bank.test"],
        v.addr,
        Some(json!({
            "caCertificates": ca.trust_bundle(),
            "clientCertificate": "bank-client",
        })),
        None,
    ));
    let identity = dir.path().display().to_string();
    let p = start_proxy(&config, &["127.0.0.2:80"], &["--identity-dir", &identity]).await;

    // Not there yet: nothing is sent, and the failure says which Secret.
    let (status, error, _) = call(&p, "api.bank.test", "/accounts").await;
    assert_eq!(
        (status, error.as_deref()),
        (502, Some("connect-error")),
        "without its certificate the vendor is not called"
    );
    assert!(v.requests().is_empty(), "{:?}", v.requests());
    // (Once per try: a connect failure is retried.)
    assert!(
        p.metric(
            "weft_proxy_outbound_tls_origination_failures_total{dst=\"api.bank.test:80\",reason=\"client-certificate\"}"
        )
        .await
            >= 1.0,
        "{}",
        p.metrics().await
    );

    // The kubelet writes the Secret's new keys; within the recheck the
    // next call presents the certificate.
    write_pair(&dir, &crt, &cert.cert_pem, &key, &cert.key_pem);
    let mut answered = None;
    for _ in 0..150 {
        let (status, _, body) = call(&p, "api.bank.test", "/accounts").await;
        if status == 200 {
            answered = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered.as_deref(), Some("paid"), "{:?}", v.clients());
    assert_eq!(v.clients(), vec![Some(ours.to_string())]);

    // Renewed (a new pair, another name): within the recheck the vendor
    // sees the new certificate on a new connection; no session resumed
    // with the old one, no pooled connection outlived it.
    let renewed_id = weft::identity::SpiffeId::new("bank.test", "merchants", "shop-42-renewed");
    let renewed = bank_clients
        .issue(&renewed_id, SystemTime::now(), DAY)
        .expect("renewed certificate");
    write_pair(&dir, &crt, &renewed.cert_pem, &key, &renewed.key_pem);
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    let (status, _, _) = call(&p, "api.bank.test", "/accounts").await;
    assert_eq!(status, 200);
    assert_eq!(v.clients().last(), Some(&Some(renewed_id.to_string())));

    // A pair that does not hold together (a key that is not the
    // certificate's) keeps the last good one.
    let other = bank_clients
        .issue(&ours, SystemTime::now(), DAY)
        .expect("another certificate");
    write_pair(&dir, &crt, &renewed.cert_pem, &key, &other.key_pem);
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    let (status, _, _) = call(&p, "api.bank.test", "/accounts").await;
    assert_eq!(status, 200);
    assert_eq!(v.clients().last(), Some(&Some(renewed_id.to_string())));

    // Withdrawn (the Secret deleted: the operator takes the keys out of
    // the identity Secret): the vendor is no longer called.
    kubelet_writes(&dir, &[]);
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    let before = v.requests().len();
    let (status, error, _) = call(&p, "api.bank.test", "/accounts").await;
    assert_eq!((status, error.as_deref()), (502, Some("connect-error")));
    assert_eq!(v.requests().len(), before, "nothing sent once withdrawn");
}

/// The identity Secret's client certificate keys as the kubelet writes
/// them ([`kubelet_writes`]).
fn write_pair(dir: &tempfile::TempDir, crt: &str, crt_pem: &str, key: &str, key_pem: &str) {
    kubelet_writes(dir, &[(crt, crt_pem), (key, key_pem)]);
}

/// A Secret volume's new contents, written as the kubelet's AtomicWriter
/// does (kubernetes pkg/volume/util/atomic_writer.go): the files go into
/// a new hidden timestamped directory, the `..data` symlink is swapped to
/// it in one rename, each key is a symlink `key -> ..data/key`, and a key
/// the Secret no longer has loses its symlink. Every key changes at once;
/// a reader that opens two files can still fall either side of the swap.
fn kubelet_writes(dir: &tempfile::TempDir, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    let root = dir.path();
    let stamp = format!("..{}", fastrand::u64(..));
    std::fs::create_dir(root.join(&stamp)).expect("payload dir");
    for (name, text) in files {
        std::fs::write(root.join(&stamp).join(name), text).expect("payload");
    }
    let old = std::fs::read_link(root.join("..data")).ok();
    symlink(&stamp, root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    for (name, _) in files {
        let link = root.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link).expect("key symlink");
        }
    }
    for entry in std::fs::read_dir(root).expect("dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_key_link =
            !name.starts_with("..") && entry.file_type().is_ok_and(|t| t.is_symlink());
        if is_key_link && !files.iter().any(|(f, _)| *f == name) {
            std::fs::remove_file(entry.path()).expect("stale key");
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(root.join(old)).expect("old payload");
    }
}

/// The vendor stub really demands a certificate (else the test above
/// would pass with none presented).
#[tokio::test]
async fn a_vendor_asking_for_a_certificate_refuses_a_proxy_that_has_none_configured() {
    let (ca, bank_clients) = (vendor_ca(), vendor_ca());
    let v = vendor_asking(&ca, &["api.bank.test"], 0, Some(&bank_clients)).await;
    let p = originating(&ca, "api.bank.test", &v).await;
    let (status, _, _) = call(&p, "api.bank.test", "/accounts").await;
    assert_eq!(status, 502);
    assert!(v.requests().is_empty());
}

/// A burst of requests to a vendor whose handshakes are slower than the
/// pool's wait for a busy endpoint (50 ms): the requests that find every
/// connection being opened wait for those to come up and share them,
/// rather than each starting a handshake of its own. In bench-proxy run M
/// (4000 requests/s, full handshakes on a loaded node) they did: ~4000
/// vendor connections in 11 s, each slowing the others, p99 +60 ms.
#[tokio::test]
async fn a_burst_to_a_slow_handshaking_vendor_shares_the_connections_being_opened() {
    const BURST: usize = 120;
    let ca = vendor_ca();
    let v = vendor_with(
        &ca,
        &["api.gateway.test"],
        0,
        None,
        Duration::from_millis(300),
    )
    .await;
    let p = originating(&ca, "api.gateway.test", &v).await;
    let p = Arc::new(p);
    let calls: Vec<_> = (0..BURST)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(
                async move { call(&p, "api.gateway.test", &format!("/v1/items/{i}")).await },
            )
        })
        .collect();
    for c in calls {
        let (status, error, _) = c.await.expect("call");
        assert_eq!(status, 200, "{error:?}");
    }
    assert_eq!(v.requests().len(), BURST);
    // The pool's soft limit (32 open) plus at most 4 being opened past it
    // at a time, and a few more as the last waiters drain; one
    // connection per request (120) without the bound.
    let connections = v.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connections <= 44,
        "{connections} vendor connections for {BURST} requests"
    );
}
