//! TLS origination to destinations outside the mesh
//! ([`crate::api::ExternalService`] with `tls`): the workload speaks plain
//! HTTP to the proxy, which connects to the vendor with TLS 1.2 or 1.3 and
//! verifies the vendor's certificate (chain to the configured CAs or the
//! Mozilla roots built in, validity, and the name), as a browser would.
//! Nothing falls back to plaintext: a vendor whose certificate fails gets
//! no request, and the failure is counted by reason.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::mesh::{HANDSHAKE_TIMEOUT, MeshStream, connect_tcp};
use super::metrics::{OriginFailureLabels, ProxyMetrics};
use crate::config::OriginateTlsConfig;

/// Reads PEM CA certificates as the proxy will: how many there are (each
/// usable as a trust anchor), or why they cannot be used.
pub fn parse_ca_pem(pem: &str) -> Result<usize, String> {
    Ok(ca_store(pem)?.len())
}

/// The trust anchors of PEM CA certificates.
fn ca_store(pem: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in ca_certificates(pem)? {
        store
            .add(cert)
            .map_err(|e| format!("a CA certificate is not usable as a trust anchor ({e})"))?;
    }
    Ok(store)
}

fn ca_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))
}

/// The Mozilla root store (`webpki-roots`), built once per process.
fn public_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(RootCertStore::from_iter(
                webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
            ))
        })
        .clone()
}

/// How this proxy originates TLS for one `tls` setting: the client
/// config (roots, ALPN `http/1.1`) and the name to send and verify, if
/// fixed.
#[derive(Debug)]
pub struct Originate {
    config: Arc<ClientConfig>,
    /// With a client certificate: the config for the certificate loaded,
    /// by the credential's generation. Each has its own session store, so
    /// a session resumed (cheap: no signature, no chain to verify) was
    /// always authenticated with the certificate in force; a renewed or
    /// withdrawn one starts a new store.
    per_credential: Mutex<Option<(u64, Arc<ClientConfig>)>>,
    server_name: Option<String>,
    /// The client certificate presented, when configured.
    client: Option<Arc<ClientCredential>>,
}

/// How often a client certificate's files are read again: a renewed
/// Secret reaches the files through the kubelet, and the next handshake
/// after this long presents it.
const CREDENTIAL_RECHECK: Duration = Duration::from_secs(10);
/// How long a pooled connection that presented a client certificate is
/// reused: under steady traffic it never idles out, and a withdrawn or
/// renewed certificate must reach the vendor.
pub const CREDENTIAL_MAX_CONNECTION_AGE: Duration = Duration::from_secs(30);

/// A client certificate read from two files of the proxy's identity
/// directory (`egress.<secret>.crt` and `.key`, written there by the
/// operator through the identity Secret). Read when first needed and
/// again at most every [`CREDENTIAL_RECHECK`]; a read that fails keeps
/// the last good pair (a renewal half-written by the kubelet must not
/// take the certificate away).
pub struct ClientCredential {
    secret: String,
    files: Option<(PathBuf, PathBuf)>,
    state: Mutex<CredentialState>,
}

#[derive(Default)]
struct CredentialState {
    checked: Option<Instant>,
    read: Option<(String, String)>,
    /// The pair loaded, and when its certificate expires.
    key: Option<(Arc<CertifiedKey>, SystemTime)>,
    /// Why the files give no certificate (absent, or not a pair).
    why: Option<String>,
    /// Counts changes of `key` (loaded, replaced, withdrawn).
    generation: u64,
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredential")
            .field("secret", &self.secret)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ClientCredential {
    fn new(secret: &str, dir: Option<&Path>) -> Self {
        let (crt, key) = crate::config::egress_credential_keys(secret);
        Self {
            secret: secret.to_owned(),
            files: dir.map(|d| (d.join(crt), d.join(key))),
            state: Mutex::new(CredentialState::default()),
        }
    }

    /// The certificate and key to present, or why there is none: the
    /// files are gone (the Secret was deleted or refused: a deleted
    /// Secret revokes), or the certificate has expired.
    pub fn current(&self) -> Result<Arc<CertifiedKey>, String> {
        self.current_with_generation().map(|(key, _)| key)
    }

    /// [`ClientCredential::current`], and the generation of the pair.
    pub fn current_with_generation(&self) -> Result<(Arc<CertifiedKey>, u64), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = st
            .checked
            .is_none_or(|at| at.elapsed() >= CREDENTIAL_RECHECK);
        if due {
            st.checked = Some(Instant::now());
            self.reload(&mut st);
        }
        match (&st.key, &st.why) {
            (Some((_, not_after)), _) if *not_after <= SystemTime::now() => Err(format!(
                "the certificate of client certificate Secret {} has expired; renew the Secret",
                self.secret
            )),
            (Some((key, _)), _) => Ok((key.clone(), st.generation)),
            (None, why) => Err(why.clone().unwrap_or_default()),
        }
    }

    fn reload(&self, st: &mut CredentialState) {
        let Some((crt, key)) = &self.files else {
            st.why = Some(format!(
                "this proxy has no identity directory, where client certificate Secret {} would be",
                self.secret
            ));
            return;
        };
        // Two tries: the kubelet swaps a Secret's files at once, but two
        // reads can fall either side of the swap.
        for attempt in 0..2 {
            let read = |p: &Path| std::fs::read_to_string(p);
            let pair = match (read(crt), read(key)) {
                (Ok(c), Ok(k)) => (c, k),
                (Err(c), Err(k))
                    if c.kind() == io::ErrorKind::NotFound
                        && k.kind() == io::ErrorKind::NotFound =>
                {
                    // Gone: the operator took it away (Secret deleted,
                    // expired or refused). Nothing is presented.
                    if st.key.take().is_some() {
                        st.generation += 1;
                        tracing::warn!(secret = %self.secret, "client certificate withdrawn; the vendor is no longer called");
                    }
                    st.read = None;
                    st.why = Some(format!(
                        "client certificate Secret {} is not in the identity directory; the operator copies it there from a TLS Secret of the namespace (see the ExternalService's Events)",
                        self.secret
                    ));
                    return;
                }
                (Err(e), _) | (_, Err(e)) => {
                    if st.key.is_none() {
                        st.why = Some(format!(
                            "client certificate Secret {} cannot be read from the identity directory ({e})",
                            self.secret
                        ));
                    }
                    return;
                }
            };
            if st.read.as_ref() == Some(&pair) {
                // Unchanged since the last read; on the second try, the
                // same unusable pair as the first: said once, below.
                if attempt == 0 {
                    return;
                }
                break;
            }
            let loaded = certified_key(&pair.0, &pair.1).and_then(|k| {
                let leaf = k.end_entity_cert().map_err(|e| e.to_string())?;
                let info = crate::identity::inspect_der(leaf).map_err(|e| e.to_string())?;
                Ok((Arc::new(k), info.not_after))
            });
            match loaded {
                Ok(k) => {
                    st.key = Some(k);
                    st.generation += 1;
                    st.why = None;
                    st.read = Some(pair);
                    return;
                }
                Err(e) => {
                    st.why = Some(format!("client certificate Secret {}: {e}", self.secret));
                    // Not parsed again until it changes (a second try
                    // reads again: the kubelet may have been mid-swap).
                    st.read = Some(pair);
                }
            }
        }
        if st.key.is_some() {
            tracing::warn!(secret = %self.secret, "client certificate files do not hold a usable pair; keeping the last good one");
        }
    }
}

/// A PEM certificate chain and PEM private key as DER, with messages that
/// never quote the input (a key's bytes must not reach a log or an
/// Event).
pub fn parse_pair(
    chain_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            "tls.crt is not PEM certificates (check the BEGIN/END lines and the line breaks)"
                .to_owned()
        })?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        "tls.key is not a PEM private key (check the BEGIN/END lines and the line breaks)"
            .to_owned()
    })?;
    Ok((chain, key))
}

/// A certificate chain and its private key, checked to belong together.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let (chain, key) = parse_pair(chain_pem, key_pem)?;
    let key = super::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| {
            "tls.key is not a usable private key (RSA, ECDSA P-256/P-384 or Ed25519)".to_owned()
        })?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|_| "tls.key is not the key of tls.crt's first certificate".to_owned())?;
    Ok(certified)
}

/// rustls asks for the client certificate when the vendor requests one.
#[derive(Debug)]
struct PresentCredential(Arc<ClientCredential>);

impl ResolvesClientCert for PresentCredential {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().ok()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl Originate {
    fn new(tls: &OriginateTlsConfig, credentials: Option<&Path>) -> Result<Self, String> {
        let roots = match &tls.ca_certificates {
            None => public_roots(),
            Some(pem) => {
                let store = ca_store(pem)?;
                if store.is_empty() {
                    return Err("caCertificates holds no certificate".to_owned());
                }
                Arc::new(store)
            }
        };
        let config = ClientConfig::builder_with_provider(super::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let client = tls
            .client_certificate
            .as_deref()
            .map(|secret| Arc::new(ClientCredential::new(secret, credentials)));
        let mut config = match &client {
            None => config.with_no_client_auth(),
            Some(c) => config.with_client_cert_resolver(Arc::new(PresentCredential(c.clone()))),
        };
        // The request goes as HTTP/1.1 (`outbound::prepare`).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            per_credential: Mutex::new(None),
            server_name: tls.server_name.clone(),
            client,
        })
    }

    /// The client config for a connection made now: the one built at
    /// start, or with a client certificate, the one of the certificate's
    /// generation (a fresh session store when it changed).
    fn config_for(&self, generation: u64) -> Arc<ClientConfig> {
        if self.client.is_none() {
            return self.config.clone();
        }
        let mut cached = self
            .per_credential
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((g, config)) if *g == generation => config.clone(),
            _ => {
                let mut fresh = (*self.config).clone();
                fresh.resumption = rustls::client::Resumption::default();
                let fresh = Arc::new(fresh);
                *cached = Some((generation, fresh.clone()));
                fresh
            }
        }
    }

    /// The name a connection for a request to `host` sends as SNI and
    /// verifies: the configured one, else `host`.
    pub fn name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }
}

/// The origination settings of the config in force, built once per
/// distinct setting and kept across reloads that keep it (so the
/// destinations holding one keep their state). Looked up when a snapshot
/// is built, never per request.
#[derive(Default)]
pub struct Originations {
    built: Mutex<HashMap<OriginateTlsConfig, Result<Arc<Originate>, String>>>,
    /// Where client certificates are (the identity directory).
    credentials: Option<PathBuf>,
}

impl Originations {
    /// Originations that read client certificates from `dir`.
    pub fn with_credentials(dir: Option<PathBuf>) -> Self {
        Self {
            built: Mutex::default(),
            credentials: dir,
        }
    }

    /// The origination for `tls`, or why it cannot be built (the compiler
    /// refuses what would fail here, so this is a hand-written config).
    pub fn get(&self, tls: &OriginateTlsConfig) -> Result<Arc<Originate>, String> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built
            .entry(tls.clone())
            .or_insert_with(|| Originate::new(tls, self.credentials.as_deref()).map(Arc::new))
            .clone()
    }

    /// Forgets the settings `config` no longer holds.
    pub fn keep_only(&self, config: &crate::config::ProxyConfig) {
        let wanted: std::collections::HashSet<&OriginateTlsConfig> = config
            .outbound
            .external_services
            .iter()
            .flat_map(|es| es.ports.iter().filter_map(|p| p.tls.as_ref()))
            .collect();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built.retain(|tls, _| wanted.contains(tls));
    }
}

/// One vendor host reached with originated TLS: the settings and the
/// name verified. Two are the same when both are.
pub struct OriginTarget {
    pub originate: Arc<Originate>,
    /// SNI and the name the certificate must carry.
    pub name: String,
    /// The metrics label of the destination, for failures.
    pub dst: String,
    pub metrics: Arc<ProxyMetrics>,
}

impl std::fmt::Debug for OriginTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginTarget")
            .field("name", &self.name)
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}

impl PartialEq for OriginTarget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.originate, &other.originate)
            && self.name == other.name
            && self.dst == other.dst
    }
}
impl Eq for OriginTarget {}

impl OriginTarget {
    /// Whether connections to this vendor present a client certificate.
    pub fn presents_certificate(&self) -> bool {
        self.originate.client.is_some()
    }

    /// TCP to `addr`, then TLS verified for `name`. A failure is counted
    /// by reason and is a connect error (the vendor never saw a request).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<MeshStream> {
        let fail = |reason: &'static str, e: io::Error| {
            self.metrics
                .origin_failures
                .get_or_create(&OriginFailureLabels {
                    dst: self.dst.clone(),
                    reason,
                })
                .inc();
            io::Error::new(
                e.kind(),
                format!("TLS to {addr} as {:?} failed ({reason}): {e}", self.name),
            )
        };
        let name = ServerName::try_from(self.name.clone())
            .map_err(|e| fail("bad-name", io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // Without the certificate the vendor is not called at all (one
        // that makes it optional would take the call unauthenticated).
        // The check is before the handshake: a vendor that never asks for
        // a certificate is not called either, as the config says the
        // connection is authenticated.
        let generation = match &self.originate.client {
            None => 0,
            Some(client) => match client.current_with_generation() {
                Ok((_, generation)) => generation,
                Err(why) => {
                    return Err(fail(
                        "client-certificate",
                        io::Error::new(io::ErrorKind::NotFound, why),
                    ));
                }
            },
        };
        let tcp = connect_tcp(addr).await.map_err(|e| fail("connection", e))?;
        let connector = TlsConnector::from(self.originate.config_for(generation));
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(MeshStream::Origin(Box::new(tls))),
            Ok(Err(e)) => Err(fail(failure_reason(&e), e)),
            Err(_) => Err(fail(
                "timeout",
                io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
            )),
        }
    }
}

/// Why a handshake failed, as a bounded metric label.
pub fn failure_reason(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "connection";
    };
    match tls {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown-issuer",
            // Issued in the name of a trusted CA, not signed by it.
            CertificateError::BadSignature => "bad-signature",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name-mismatch"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not-yet-valid"
            }
            _ => "bad-certificate",
        },
        Error::AlertReceived(_) => "alert",
        _ => "handshake",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_pem_is_read_or_refused_with_a_reason() {
        let ca = crate::identity::MeshCa::generate(
            "cluster.local",
            std::time::SystemTime::now(),
            crate::identity::CA_LIFETIME,
        )
        .expect("ca");
        assert_eq!(parse_ca_pem(&ca.trust_bundle()), Ok(1));
        assert_eq!(parse_ca_pem("no pem here"), Ok(0));
        assert!(
            parse_ca_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
        );
    }

    #[test]
    fn the_built_in_roots_are_mozillas() {
        assert!(public_roots().len() > 100, "{}", public_roots().len());
    }

    #[test]
    fn one_origination_per_setting_and_a_bad_bundle_says_why() {
        let all = Originations::default();
        let public = OriginateTlsConfig {
            ca_certificates: None,
            server_name: None,
            client_certificate: None,
        };
        let a = all.get(&public).expect("public roots");
        let b = all.get(&public).expect("public roots");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.name_for("api.vendor.example"), "api.vendor.example");
        let bad = OriginateTlsConfig {
            ca_certificates: Some("nothing".into()),
            server_name: Some("pinned.vendor.example".into()),
            client_certificate: None,
        };
        assert!(all.get(&bad).unwrap_err().contains("no certificate"));
    }
}
