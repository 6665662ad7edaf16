//! Mesh TLS: the rustls configurations every proxy uses between meshed
//! pods. TLS 1.3 only, with the hybrid post-quantum key exchange
//! (X25519MLKEM768) preferred — the aws-lc-rs provider offers it. Both
//! sides present their workload certificate; both verifiers check the chain
//! against the mesh trust bundle, then the peer's SPIFFE id: the trust
//! domain always, and for outbound connections the identities the config
//! says serve the destination. Every rejection is counted by reason.
//!
//! Certificates and the trust bundle live behind atomic pointers, so a
//! rotation takes effect on the next handshake while established
//! connections carry on undisturbed.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::identity::{SpiffeId, inspect_der};

/// ALPN of mesh TLS carrying HTTP/2.
pub const ALPN_H2: &[u8] = b"weft/h2";
/// ALPN of mesh TLS carrying HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"weft/http1";
/// ALPN of mesh TLS carrying opaque TCP.
pub const ALPN_TCP: &[u8] = b"weft/tcp";

/// Why a peer's certificate was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not signed by the mesh CA.
    UnknownCa,
    Expired,
    NotYetValid,
    /// No URI SAN that is a weft SPIFFE id.
    NoSpiffeId,
    /// More than one URI SAN: an X.509-SVID carries exactly one.
    MultipleUriSans,
    /// A SPIFFE id of another trust domain.
    ForeignTrustDomain,
    /// A valid mesh identity, but not one that serves this destination.
    UnexpectedIdentity,
    /// Anything else wrong with the certificate.
    BadCertificate,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownCa => "unknown-ca",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not-yet-valid",
            RejectReason::NoSpiffeId => "no-spiffe-id",
            RejectReason::MultipleUriSans => "multiple-uri-sans",
            RejectReason::ForeignTrustDomain => "foreign-trust-domain",
            RejectReason::UnexpectedIdentity => "unexpected-identity",
            RejectReason::BadCertificate => "bad-certificate",
        }
    }

    fn from_chain_error(err: &Error) -> Self {
        match err {
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => RejectReason::Expired,
            Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => RejectReason::NotYetValid,
            Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => RejectReason::UnknownCa,
            _ => RejectReason::BadCertificate,
        }
    }
}

/// Labels of the rejection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `inbound` (a client's certificate) or `outbound` (a server's).
    pub direction: String,
    pub reason: String,
}

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {message}")]
    Pem { what: &'static str, message: String },
    #[error("the trust bundle holds no certificate")]
    EmptyBundle,
    #[error("building the certificate verifier: {0}")]
    Verifier(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] Error),
}

/// The trust bundle in force.
struct Trust {
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    hash: String,
}

/// This proxy's identity and trust, shared by every TLS configuration.
pub struct MeshIdentity {
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    key: ArcSwapOption<CertifiedKey>,
    trust: ArcSwapOption<Trust>,
    rejections: Family<RejectLabels, Counter>,
}

impl std::fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// The crypto provider of mesh TLS: aws-lc-rs, whose default key exchange
/// groups put the post-quantum hybrid first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl MeshIdentity {
    pub fn new(trust_domain: &str, rejections: Family<RejectLabels, Counter>) -> Arc<Self> {
        let provider = provider();
        // aws-lc seeds its random generator from CPU jitter entropy on first
        // use, tens of milliseconds of CPU: done here, at start-up, before
        // the proxy reports ready, not inside the first request's handshake.
        let _ = provider.secure_random.fill(&mut [0u8; 32]);
        Arc::new(Self {
            trust_domain: trust_domain.to_owned(),
            provider,
            key: ArcSwapOption::empty(),
            trust: ArcSwapOption::empty(),
            rejections,
        })
    }

    /// Installs a certificate chain, its key and the trust bundle (PEM).
    /// New handshakes use them at once; nothing is changed on error.
    pub fn update(&self, chain_pem: &str, key_pem: &str, bundle_pem: &str) -> Result<(), TlsError> {
        let pem_err = |what: &'static str| {
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                what,
                message: e.to_string(),
            }
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(pem_err("workload certificate"))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("workload key"))?;
        let key = CertifiedKey::from_der(chain, key, &self.provider)?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            roots
                .add(cert.map_err(pem_err("trust bundle"))?)
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        self.trust.store(Some(Arc::new(Trust {
            roots,
            client_verifier,
            hash: crate::identity::bundle_hash(bundle_pem),
        })));
        self.key.store(Some(Arc::new(key)));
        Ok(())
    }

    /// Whether an identity has been loaded.
    pub fn ready(&self) -> bool {
        self.key.load().is_some() && self.trust.load().is_some()
    }

    /// The hash of the trust bundle in force.
    pub fn bundle_hash(&self) -> Option<String> {
        self.trust.load().as_ref().map(|t| t.hash.clone())
    }

    fn reject(&self, direction: &str, reason: RejectReason) -> Error {
        self.rejections
            .get_or_create(&RejectLabels {
                direction: direction.to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
        tracing::debug!(
            direction,
            reason = reason.as_str(),
            "peer certificate rejected"
        );
        match reason {
            RejectReason::Expired => Error::InvalidCertificate(CertificateError::Expired),
            RejectReason::NotYetValid => Error::InvalidCertificate(CertificateError::NotValidYet),
            RejectReason::UnknownCa => Error::InvalidCertificate(CertificateError::UnknownIssuer),
            _ => Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
        }
    }

    /// The SPIFFE id of a verified chain's leaf in our trust domain.
    fn identity_of(
        &self,
        direction: &str,
        end_entity: &CertificateDer<'_>,
    ) -> Result<SpiffeId, Error> {
        let info = inspect_der(end_entity)
            .map_err(|_| self.reject(direction, RejectReason::BadCertificate))?;
        if info.uri_sans.len() > 1 {
            return Err(self.reject(direction, RejectReason::MultipleUriSans));
        }
        let Some(id) = info.spiffe_id() else {
            return Err(self.reject(direction, RejectReason::NoSpiffeId));
        };
        if id.trust_domain != self.trust_domain {
            return Err(self.reject(direction, RejectReason::ForeignTrustDomain));
        }
        Ok(id)
    }

    fn algorithms(&self) -> WebPkiSupportedAlgorithms {
        self.provider.signature_verification_algorithms
    }

    /// The server side of mesh TLS: client certificates required.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(InboundVerifier(self.clone())))
            .with_cert_resolver(Arc::new(CurrentKey(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        // No session resumption: every new connection proves the peer's
        // current certificate, so a rotation or a trust-bundle change takes
        // effect at once. Mesh connections are pooled, so full handshakes
        // are rare.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The client side of mesh TLS towards a destination served by
    /// `expected`, carrying `alpn`.
    pub fn client_config(
        self: &Arc<Self>,
        expected: ExpectedServer,
        alpn: &[u8],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(OutboundVerifier {
                identity: self.clone(),
                expected,
            }))
            .with_client_cert_resolver(Arc::new(CurrentKey(self.clone())));
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// Who may serve a destination: any ServiceAccount of `namespace`, or only
/// those listed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExpectedServer {
    pub namespace: String,
    pub service_accounts: Vec<String>,
}

impl ExpectedServer {
    fn admits(&self, id: &SpiffeId) -> bool {
        id.namespace == self.namespace
            && (self.service_accounts.is_empty()
                || self.service_accounts.contains(&id.service_account))
    }
}

/// Whether a failed handshake is this side's verifier refusing the peer's
/// certificate: those are counted by reason in `tls_rejections`, and must
/// not be counted again as handshake failures.
pub fn refused_by_verifier(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<Error>())
        .is_some_and(|e| matches!(e, Error::InvalidCertificate(_)))
}

/// The SPIFFE id of a TLS peer whose chain was verified in the handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    inspect_der(leaf).ok()?.spiffe_id()
}

/// The handshake-signature half of a verifier, the same on both sides: TLS
/// 1.3 signatures checked with the provider's algorithms.
macro_rules! handshake_signatures {
    ($self:ident => $identity:expr) => {
        fn verify_tls12_signature(
            &$self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(tls13_only())
        }

        fn verify_tls13_signature(
            &$self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &$identity.algorithms())
        }

        fn supported_verify_schemes(&$self) -> Vec<SignatureScheme> {
            $identity.algorithms().supported_schemes()
        }
    };
}

/// The configs offer TLS 1.3 only, so a TLS 1.2 signature never arrives.
fn tls13_only() -> Error {
    Error::General("mesh TLS is TLS 1.3 only".into())
}

/// Serves the current key pair on both sides.
#[derive(Debug)]
struct CurrentKey(Arc<MeshIdentity>);

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.key.load_full()
    }
}

impl rustls::client::ResolvesClientCert for CurrentKey {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.key.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.key.load().is_some()
    }
}

/// Verifies clients: the chain (webpki, client-auth usage), then the id.
#[derive(Debug)]
struct InboundVerifier(Arc<MeshIdentity>);

impl ClientCertVerifier for InboundVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let Some(trust) = self.0.trust.load_full() else {
            return Err(self.0.reject("inbound", RejectReason::UnknownCa));
        };
        trust
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.0.reject("inbound", RejectReason::from_chain_error(&e)))?;
        self.0.identity_of("inbound", end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!(self => self.0);
}

/// Verifies servers: the chain (webpki, server-auth usage, no host name:
/// mesh servers are named by SPIFFE id), then the id against the
/// destination's expected identities.
#[derive(Debug)]
struct OutboundVerifier {
    identity: Arc<MeshIdentity>,
    expected: ExpectedServer,
}

impl ServerCertVerifier for OutboundVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let me = &self.identity;
        let Some(trust) = me.trust.load_full() else {
            return Err(me.reject("outbound", RejectReason::UnknownCa));
        };
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|_| me.reject("outbound", RejectReason::BadCertificate))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &trust.roots,
            intermediates,
            now,
            me.algorithms().all,
        )
        .map_err(|e| me.reject("outbound", RejectReason::from_chain_error(&e)))?;
        let id = me.identity_of("outbound", end_entity)?;
        if !self.expected.admits(&id) {
            return Err(me.reject("outbound", RejectReason::UnexpectedIdentity));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!(self => self.identity);
}
