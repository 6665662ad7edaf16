//! Mesh identities: the mesh CA, the workload certificates it issues, and
//! the checks every proxy makes of a peer's certificate.
//!
//! A workload's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`,
//! carried as the only URI SAN of a short-lived ECDSA P-256 leaf signed by
//! the mesh CA (a long-lived self-signed root, in Secret `weft-ca` of
//! `weft-system`). Leaves are re-issued at two thirds of their life, so a
//! proxy always holds a certificate with a third of its life to spare.
//! X.509 is built by rcgen and read by x509-parser; chains are verified by
//! rustls' webpki. Nothing here parses ASN.1 by hand.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use sha2::{Digest, Sha256};

/// Secret in `weft-system` holding the mesh CA.
pub const CA_SECRET: &str = "weft-ca";
/// Name of the one Secret per namespace that held every ServiceAccount's
/// key pair before weft 0.1.0 split it ([`identity_secret_name`]); the
/// operator deletes it when it is weft's.
pub const LEGACY_IDENTITY_SECRET: &str = "weft-identity";
/// What every workload identity Secret's name starts with.
pub const IDENTITY_SECRET_PREFIX: &str = "weft-identity-";
/// Key of the trust bundle (and of the CA certificate in `weft-ca`).
pub const CA_CERT_KEY: &str = "ca.crt";
/// Keys of a workload's certificate and private key in its identity Secret
/// (a `kubernetes.io/tls` Secret), and the files the proxy reads from its
/// identity directory.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
/// The longest object name Kubernetes takes (a DNS-1123 subdomain).
const MAX_NAME: usize = 253;

/// The Secret that holds ServiceAccount `sa`'s key pair and the trust
/// bundle: `weft-identity-<sa>`, one per ServiceAccount, so that no object
/// holds the keys of two workloads and a namespace's ServiceAccounts are
/// not capped by one object's 1 MiB. A name too long for that (a
/// ServiceAccount name over 239 characters) is cut and ends in a hash of
/// the whole name. The operator and the injector both name the Secret
/// with this function.
pub fn identity_secret_name(sa: &str) -> String {
    let direct = format!("{IDENTITY_SECRET_PREFIX}{sa}");
    if direct.len() <= MAX_NAME {
        return direct;
    }
    // 64 bits: finding another name with the same cut and hash is out of
    // reach, and a collision refuses both accounts (desired::secret_names).
    let hash = hex::encode(&Sha256::digest(sa.as_bytes())[..8]);
    let keep = MAX_NAME - IDENTITY_SECRET_PREFIX.len() - 1 - hash.len();
    // ServiceAccount names are ASCII (DNS-1123); the cut must not leave a
    // label ending in '-' or '.' before the hash's '-'.
    let cut: String = sa.chars().take(keep).collect();
    let cut = cut.trim_end_matches(['-', '.']);
    format!("{IDENTITY_SECRET_PREFIX}{cut}-{hash}")
}
/// Key of the root in `weft-ca` when its CA is an intermediate under an
/// offline root (absent: `ca.crt` is the root).
pub const CA_ANCHOR_KEY: &str = "anchor.crt";
/// Key of the CA's private key in `weft-ca`.
pub const CA_KEY_KEY: &str = "ca.key";
/// How long the mesh CA is valid: ten years.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are valid from a little before issue, for clock skew.
const BACKDATE: Duration = Duration::from_secs(300);
/// The shortest life a leaf is issued with (under an intermediate about
/// to expire, none is).
const MIN_LEAF_LIFE: Duration = Duration::from_secs(3600);

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
    /// held to the SPIFFE ID rules (lower-case trust domain of letters,
    /// digits, `.`, `-` and `_`; no empty, `.` or `..` segment; no percent
    /// encoding) and to Kubernetes' names for the namespace (a DNS-1123
    /// label) and the service account (a DNS-1123 subdomain).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if trust_domain_ok(td) && dns1123_label(ns) && dns1123_subdomain(sa) =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// A SPIFFE trust domain: `[a-z0-9._-]+`, at most 255 bytes.
fn trust_domain_ok(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A DNS-1123 label (a namespace name): `[a-z0-9-]`, at most 63 bytes,
/// starting and ending with a letter or digit.
fn dns1123_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|&b| alnum(b) || b == b'-')
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
}

/// A DNS-1123 subdomain (a service account name): dot-separated labels, at
/// most 253 bytes. This also rules out the `.` and `..` segments SPIFFE
/// forbids.
fn dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns1123_label)
}

/// What went wrong making or reading identities.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "not a weft SPIFFE id (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {0:?}"
    )]
    BadSpiffeId(String),
    #[error("reading a certificate: {0}")]
    Parse(String),
}

/// The mesh CA: signs every workload certificate. Its trust anchor (the
/// root every proxy trusts) is its own certificate when it is a root, or
/// a root above it when it is an intermediate (a CA supplied by the user,
/// under an offline root); then every leaf it issues carries its chain.
pub struct MeshCa {
    /// The issuing certificate, then the intermediates above it.
    cert_pem: String,
    key_pem: String,
    /// The root its leaves chain to.
    anchor_pem: String,
    /// What an issued leaf carries after itself: nothing under a root,
    /// the intermediates (`cert_pem`) under an offline root.
    chain_pem: String,
    /// When the first certificate of the chain it issues under (itself
    /// and its intermediates, the root aside) expires; leaves never
    /// outlive it.
    chain_not_after: Option<SystemTime>,
    issuer: Issuer<'static, KeyPair>,
}

/// The key never appears in a print: a `?ca` in a log line or an error
/// must not publish the key that signs every identity in the mesh.
impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &REDACTED)
            .finish_non_exhaustive()
    }
}

/// What a Debug print shows in place of a private key.
pub const REDACTED: &str = "<redacted>";

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl MeshCa {
    /// A new self-signed root for `trust_domain`, valid from `now` for
    /// `lifetime`.
    pub fn generate(
        trust_domain: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "weft");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("weft mesh CA for {trust_domain}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + lifetime);
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok(Self {
            issuer: Issuer::new(params, key),
            anchor_pem: cert_pem.clone(),
            chain_pem: String::new(),
            chain_not_after: None,
            cert_pem,
            key_pem,
        })
    }

    /// The CA stored in Secret `weft-ca`: a root, its own anchor.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        Self::from_parts(cert_pem, key_pem, None)
    }

    /// A CA from its certificate (the issuing certificate first, then any
    /// intermediates above it), its key, and the root its leaves chain
    /// to (`None`: the certificate is that root). Refused unless a leaf
    /// it issues verifies against that root, so a key that does not
    /// match, or a chain that does not reach the root, is found here and
    /// not in the proxies' handshakes.
    pub fn from_parts(
        cert_pem: &str,
        key_pem: &str,
        anchor_pem: Option<&str>,
    ) -> Result<Self, IdentityError> {
        let certs = pem_blocks(cert_pem);
        let Some(first) = certs.first() else {
            return Err(IdentityError::Parse(
                "no PEM certificate in the CA certificate".into(),
            ));
        };
        if !inspect_pem(first)?.is_ca {
            return Err(IdentityError::Parse(
                "the CA certificate is not a CA (basicConstraints CA:TRUE)".into(),
            ));
        }
        let anchor = match anchor_pem {
            Some(a) => match pem_blocks(a).as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(IdentityError::Parse(
                        "no PEM certificate in the root".into(),
                    ));
                }
                _ => {
                    return Err(IdentityError::Parse(
                        "the root holds more than one certificate; give the one root".into(),
                    ));
                }
            },
            None => first.clone(),
        };
        let fp = |pem: &str| fingerprint(pem).unwrap_or_default();
        // Leaves carry the intermediates; never the root itself.
        let chain: Vec<&String> = certs.iter().filter(|c| fp(c) != fp(&anchor)).collect();
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(first, key)?;
        // Leaves never outlive the intermediates they carry (proxies hold
        // a root to no dates, as webpki does not check a trust anchor's).
        let mut chain_not_after = None;
        for c in &chain {
            let info = inspect_pem(c)?;
            chain_not_after =
                Some(chain_not_after.map_or(info.not_after, |t: SystemTime| t.min(info.not_after)));
        }
        let ca = Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            anchor_pem: anchor,
            chain_pem: chain.iter().map(|c| format!("{c}\n")).collect(),
            chain_not_after,
        };
        // Probed at a time every certificate of the chain is valid, not
        // now: an expired root still loads (its expiry is a condition,
        // and a rotation away from it must be able to run).
        let mut windows = vec![inspect_pem(&ca.anchor_pem)?];
        for c in &certs {
            windows.push(inspect_pem(c)?);
        }
        let from = windows
            .iter()
            .map(|w| w.not_before)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let to = windows
            .iter()
            .map(|w| w.not_after)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let at = from + BACKDATE + Duration::from_secs(1);
        if at + Duration::from_secs(1) >= to {
            return Err(IdentityError::Parse(
                "the CA certificate and its root are never valid at the same time".into(),
            ));
        }
        let probe = ca.issue(
            &SpiffeId::new("probe.invalid", "probe", "probe"),
            at,
            Duration::from_secs(600),
        )?;
        if !chains_to(&probe.cert_pem, &ca.anchor_pem, at) {
            return Err(IdentityError::Parse(
                "a certificate this CA issues does not verify against its root, as a client \
                 or as a server: the key does not match the certificate, the chain does not \
                 reach the root, or a certificate of the chain forbids the use (extended key \
                 usage, name constraints)"
                    .into(),
            ));
        }
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The root its leaves chain to.
    pub fn anchor_pem(&self) -> &str {
        &self.anchor_pem
    }

    /// Whether the intermediates it issues under are valid at `now` and
    /// will be for `margin` more: asked of a CA about to be rotated to.
    /// (A CA already in use loads whatever its dates, so a rotation away
    /// from it can run; it only stops issuing, [`MeshCa::issue`].)
    pub fn usable_for(&self, now: SystemTime, margin: Duration) -> Result<(), IdentityError> {
        for c in pem_blocks(&self.chain_pem) {
            let info = inspect_pem(&c)?;
            if info.not_before > now + BACKDATE {
                return Err(IdentityError::Parse(
                    "an intermediate of the CA certificate is not valid yet".into(),
                ));
            }
            if info.not_after <= now + margin {
                return Err(IdentityError::Parse(format!(
                    "an intermediate of the CA certificate expires within {}h",
                    margin.as_secs() / 3600
                )));
            }
        }
        Ok(())
    }

    /// The intermediates every leaf it issues carries (none under a
    /// root), as PEM blocks.
    pub fn chain(&self) -> Vec<String> {
        pem_blocks(&self.chain_pem)
    }

    /// When the CA stops being usable: the earliest expiry of its root
    /// and the intermediates it issues under.
    pub fn expires(&self) -> Option<SystemTime> {
        let root = inspect_pem(&self.anchor_pem).ok().map(|i| i.not_after);
        match (root, self.chain_not_after) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }

    /// The PEM every proxy trusts when this CA is the only one.
    pub fn trust_bundle(&self) -> String {
        bundle_of(&[&self.anchor_pem])
    }

    /// A workload certificate for `id`, valid from `now` for `lifetime`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let uri = id.to_string().try_into()?;
        self.sign(
            &format!("{}.{}", id.service_account, id.namespace),
            vec![SanType::URI(uri)],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            now,
            lifetime,
        )
    }

    /// A TLS server certificate for DNS names (the webhook's serving
    /// certificate, from a CA of its own).
    pub fn issue_server(
        &self,
        dns_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let sans = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.clone().try_into()?)))
            .collect::<Result<Vec<_>, IdentityError>>()?;
        let cn = dns_names.first().map_or("weft", String::as_str);
        self.sign(
            cn,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            now,
            lifetime,
        )
    }

    fn sign(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let not_before = now - BACKDATE;
        let not_after = match self.chain_not_after {
            // Too little left to be worth a leaf: nothing is issued (a
            // leaf cut shorter each time would be re-issued ever faster).
            Some(limit) if limit <= now + MIN_LEAF_LIFE => {
                return Err(IdentityError::Parse(format!(
                    "an intermediate of the mesh CA expires at {}: nothing more can be issued \
                     from it; rotate to another CA",
                    k8s_openapi::jiff::Timestamp::try_from(limit)
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                )));
            }
            Some(limit) => (now + lifetime).min(limit),
            None => now + lifetime,
        };
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            issued_at: now,
            not_after,
        })
    }
}

/// A workload's certificate and key.
#[derive(Clone)]
pub struct WorkloadCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &REDACTED)
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl WorkloadCert {
    /// When to issue the next one: two thirds into its life.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.issued_at, self.not_after)
    }
}

/// Two thirds of the way from `issued` to `expires`.
pub fn renew_at(issued: SystemTime, expires: SystemTime) -> SystemTime {
    let life = expires.duration_since(issued).unwrap_or_default();
    issued + life * 2 / 3
}

/// Whether `text` (a log line, a Debug print, an Event, an error) holds
/// any of the private key `key_pem`: PEM armour of a private key, or a run
/// of 16 characters of the base64 of its secret scalar, the way a key
/// leaks in pieces (a line of the PEM, a truncated print, the base64 of the
/// PEM that a Secret's `data` carries). The PKCS#8 structure around the
/// scalar is the same in every P-256 key, and the public key at its end is
/// in the certificate too, so neither counts.
pub fn contains_key_material(text: &str, key_pem: &str) -> bool {
    use base64::Engine;
    const RUN: usize = 16;
    if text.contains("PRIVATE KEY") {
        return true;
    }
    let b64 = &base64::engine::general_purpose::STANDARD;
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = b64.decode(&body).unwrap_or_default();
    // ECPrivateKey: version 1, then the scalar as an OCTET STRING.
    let start = der
        .windows(4)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04])
        .map_or(0, |i| i + 5);
    let end = KeyPair::from_pem(key_pem)
        .ok()
        .and_then(|k| {
            let public = k.public_key_raw().to_vec();
            der.windows(public.len()).position(|w| w == public)
        })
        .map_or(der.len(), |i| i.saturating_sub(5))
        .max(start);
    // The characters that encode only secret bytes, in the body and in the
    // base64 of the whole PEM document.
    let chars = |from: usize, to: usize| (from * 4).div_ceil(3)..to * 4 / 3;
    let in_body = chars(start, end);
    let header = key_pem.find('\n').map_or(0, |i| i + 1);
    let in_pem = |j: usize| header + j + j / 64;
    let encoded = b64.encode(key_pem);
    let pieces = [
        body.get(in_body.clone()).unwrap_or_default(),
        encoded
            .get(chars(in_pem(in_body.start), in_pem(in_body.end)))
            .unwrap_or_default(),
    ];
    pieces.iter().any(|piece| {
        let piece = piece.as_bytes();
        (0..=piece.len().saturating_sub(RUN))
            .filter_map(|i| piece.get(i..i + RUN))
            .filter_map(|run| std::str::from_utf8(run).ok())
            .any(|run| text.contains(run))
    })
}

/// What a certificate says, as far as the mesh cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Every URI SAN, as written.
    pub uri_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
}

impl CertInfo {
    /// The workload identity the certificate carries: its URI SAN, when it
    /// has exactly one and that is a weft SPIFFE id. An X.509-SVID has
    /// exactly one URI SAN; with several, which one names the workload
    /// would be the reader's guess.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        match self.uri_sans.as_slice() {
            [uri] => uri.parse().ok(),
            _ => None,
        }
    }

    /// When a certificate read back (say, from a Secret) is due for
    /// renewal. The validity start was backdated for clock skew; the
    /// renewal point is computed from the intended issue time.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.not_before + BACKDATE, self.not_after)
    }
}

/// Reads the first certificate of a PEM document.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, IdentityError> {
    let (_, doc) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    inspect_der(&doc.contents)
}

/// Reads a DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertInfo, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let uri_sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        uri_sans,
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
        is_ca: cert.is_ca(),
    })
}

/// A short, stable fingerprint of a trust bundle, reported by proxies so the
/// operator can tell when a new bundle has reached everyone.
pub fn bundle_hash(pem: &str) -> String {
    hex::encode(&Sha256::digest(pem.trim().as_bytes())[..8])
}

/// The trust bundle that holds `roots`, in that order, written the one
/// way: the same roots always give the same text, and so the same
/// [`bundle_hash`] (the operator and the proxies compare hashes).
pub fn bundle_of(roots: &[&str]) -> String {
    roots
        .iter()
        .flat_map(|r| pem_blocks(r))
        .map(|b| format!("{b}\n"))
        .collect()
}

/// Each `CERTIFICATE` block of a PEM text, as written, trimmed; anything
/// around or between them (comments, other blocks) is left out.
pub fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(
            rest[start..end]
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        rest = &rest[end..];
    }
    out
}

/// The SHA-256 fingerprint of a PEM certificate's DER, its first 8 bytes
/// in hex: how the operator and the proxies name a root. (Every root
/// weft generates has the same subject, so the subject names none.)
pub fn fingerprint(pem: &str) -> Option<String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    Some(hex::encode(&Sha256::digest(der.as_ref())[..8]))
}

/// Whether the certificate chain `chain_pem` (a leaf, then its
/// intermediates) verifies as a mesh client certificate against the
/// roots in `anchor_pem` at `now`: the check a peer proxy makes, by
/// rustls' webpki.
pub fn chains_to(chain_pem: &str, anchor_pem: &str, now: SystemTime) -> bool {
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    static PROVIDER: std::sync::LazyLock<std::sync::Arc<rustls::crypto::CryptoProvider>> =
        std::sync::LazyLock::new(|| {
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
        });
    let Ok(certs) =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    let Some((leaf, intermediates)) = certs.split_first() else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(anchor_pem.as_bytes()) {
        let Ok(root) = root else { return false };
        if roots.add(root).is_err() {
            return false;
        }
    }
    let roots_again = roots.clone();
    let Ok(verifier) =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), PROVIDER.clone())
            .build()
    else {
        return false;
    };
    let at = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    // A mesh leaf is both: the client of one hop, the server of another
    // (the server side is checked as the proxies check it, `tls.rs`).
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(leaf) else {
        return false;
    };
    verifier.verify_client_cert(leaf, intermediates, at).is_ok()
        && rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots_again,
            intermediates,
            at,
            PROVIDER.signature_verification_algorithms.all,
        )
        .is_ok()
}

/// The fingerprint of the root in `bundle_pem` that the certificate
/// chain `chain_pem` verifies against: which root a proxy's identity
/// presents, so a CA rotation can tell when every proxy moved.
pub fn root_of(chain_pem: &str, bundle_pem: &str, now: SystemTime) -> Option<String> {
    pem_blocks(bundle_pem)
        .into_iter()
        .find(|root| chains_to(chain_pem, root, now))
        .and_then(|root| fingerprint(&root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn every_service_account_gets_a_secret_name_the_api_server_takes() {
        assert_eq!(identity_secret_name("checkout"), "weft-identity-checkout");
        // The longest name that fits is used as it is.
        let fits = "a".repeat(MAX_NAME - IDENTITY_SECRET_PREFIX.len());
        assert_eq!(identity_secret_name(&fits), format!("weft-identity-{fits}"));
        // Longer ones are cut, end in a hash of the whole name, and stay
        // DNS-1123 subdomains: no label ends in '-' or '.' at the cut.
        // The cut (222 characters) falls just after the '.'.
        let long_a = format!("{}.b{}", "a".repeat(221), "c".repeat(20));
        let long_b = format!("{}.b{}", "a".repeat(221), "d".repeat(20));
        let (a, b) = (identity_secret_name(&long_a), identity_secret_name(&long_b));
        assert_ne!(a, b, "names that differ past the cut differ");
        for name in [&a, &b] {
            assert!(name.len() <= MAX_NAME, "{} characters", name.len());
            assert!(
                name.split('.').all(|label| !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')),
                "{name} is not a DNS-1123 subdomain"
            );
        }
        assert!(
            a.starts_with(&format!("weft-identity-{}-", "a".repeat(221))),
            "{a}"
        );
        assert_eq!(a.len(), MAX_NAME - 1, "a cut of 221, '-' and 16 hex digits");
    }

    #[test]
    fn spiffe_ids_round_trip_and_reject_junk() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .expect("parses");
        assert_eq!(id, SpiffeId::new("cluster.local", "shop", "checkout"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
        // A service account name may be a DNS-1123 subdomain.
        let dotted: SpiffeId = "spiffe://my_domain.example/ns/shop-eu/sa/ci.deployer"
            .parse()
            .expect("parses");
        assert_eq!(dotted.service_account, "ci.deployer");
        for bad in [
            "https://cluster.local/ns/shop/sa/checkout",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/ns/shop/sa/checkout/extra",
            "spiffe:///ns/shop/sa/x",
            // SPIFFE: a lower-case trust domain, no percent encoding, no
            // dot segments; Kubernetes: DNS-1123 names.
            "spiffe://Cluster.Local/ns/shop/sa/x",
            "spiffe://cluster.local/ns/shop/sa/%2e%2e",
            "spiffe://cluster.local/ns/shop/sa/..",
            "spiffe://cluster.local/ns/./sa/x",
            "spiffe://cluster.local/ns/Shop/sa/x",
            "spiffe://cluster.local/ns/-shop/sa/x",
            "spiffe://cluster.local/ns/shop.eu/sa/x",
            "spiffe://cluster.local/ns/shop/sa/a..b",
            "spiffe://cluster:8080/ns/shop/sa/x",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn issued_certificates_carry_the_identity_and_lifetime() {
        let t = now();
        let ca = MeshCa::generate("cluster.local", t, CA_LIFETIME).expect("ca");
        let ca_info = inspect_pem(ca.cert_pem()).expect("ca info");
        assert!(ca_info.is_ca);
        let id = SpiffeId::new("cluster.local", "payments", "payments");
        let leaf = ca
            .issue(&id, t, Duration::from_secs(24 * 3600))
            .expect("leaf");
        let info = inspect_pem(&leaf.cert_pem).expect("leaf info");
        assert_eq!(info.spiffe_id(), Some(id));
        assert!(!info.is_ca);
        let life = info
            .not_after
            .duration_since(t)
            .expect("after now")
            .as_secs();
        assert!((24 * 3600 - 1..=24 * 3600).contains(&life), "{life}");
        let renew = leaf.renew_at().duration_since(t).expect("later").as_secs();
        assert_eq!(renew, 16 * 3600, "re-issued at two thirds of 24 h");
        let read_back = info.renew_at().duration_since(t).expect("later").as_secs();
        assert!(
            (16 * 3600 - 1..=16 * 3600).contains(&read_back),
            "{read_back}"
        );
    }

    #[test]
    fn a_ca_read_from_its_secret_keeps_issuing_for_the_same_root() {
        let t = now();
        let ca = MeshCa::generate("cluster.local", t, CA_LIFETIME).expect("ca");
        let again = MeshCa::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        assert_eq!(
            bundle_hash(&again.trust_bundle()),
            bundle_hash(&ca.trust_bundle())
        );
        let leaf = again
            .issue(
                &SpiffeId::new("cluster.local", "shop", "cart"),
                t,
                Duration::from_secs(3600),
            )
            .expect("leaf");
        // The reloaded CA's leaves chain to the original root.
        let (_, root) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).expect("pem");
        let root = root.parse_x509().expect("root");
        let (_, leaf_pem) =
            x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).expect("pem");
        let leaf = leaf_pem.parse_x509().expect("leaf");
        assert_eq!(leaf.issuer(), root.subject());
        assert!(
            leaf.verify_signature(Some(root.public_key())).is_ok(),
            "signed by the original root key"
        );
        assert!(MeshCa::from_pem(ca.cert_pem(), "not a key").is_err());
    }

    /// An offline root and an intermediate under it, as a user hands
    /// weft (cert-manager's CA `Certificate`, or a PKI team's issuer).
    fn offline_root_and_intermediate() -> (String, String, String) {
        let t = now();
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = offset(t - BACKDATE);
            p.not_after = offset(t + CA_LIFETIME);
            p
        };
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let root_params = ca_params("offline root");
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);
        let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let inter = ca_params("weft issuer")
            .signed_by(&inter_key, &root_issuer)
            .expect("intermediate");
        (root.pem(), inter.pem(), inter_key.serialize_pem())
    }

    #[test]
    fn a_user_ca_under_an_offline_root_issues_leaves_that_carry_its_chain() {
        let t = now();
        let (root, inter, key) = offline_root_and_intermediate();
        let ca = MeshCa::from_parts(&inter, &key, Some(&root)).expect("usable");
        assert_eq!(fingerprint(ca.anchor_pem()), fingerprint(&root));
        assert_eq!(ca.trust_bundle(), bundle_of(&[&root]));
        let leaf = ca
            .issue(
                &SpiffeId::new("cluster.local", "shop", "cart"),
                t,
                Duration::from_secs(3600),
            )
            .expect("leaf");
        assert_eq!(
            pem_blocks(&leaf.cert_pem).len(),
            2,
            "the leaf, then the intermediate"
        );
        assert!(chains_to(&leaf.cert_pem, &root, t));
        // Which root of a two-root bundle it presents, by fingerprint.
        let other = MeshCa::generate("cluster.local", t, CA_LIFETIME).expect("ca");
        let both = bundle_of(&[other.anchor_pem(), &root]);
        assert_eq!(root_of(&leaf.cert_pem, &both, t), fingerprint(&root));
        assert_eq!(root_of(&leaf.cert_pem, &other.trust_bundle(), t), None);
        // Without its root the intermediate would be the anchor: its
        // leaves then verify against it alone.
        let alone = MeshCa::from_parts(&inter, &key, None).expect("usable as its own anchor");
        assert_eq!(fingerprint(alone.anchor_pem()), fingerprint(&inter));

        // Refused, saying why: the wrong key, a root the chain does not
        // reach, a certificate that is not a CA, two roots.
        let wrong_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let err = MeshCa::from_parts(&inter, &wrong_key.serialize_pem(), Some(&root)).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        assert!(MeshCa::from_parts(&inter, &key, Some(other.anchor_pem())).is_err());
        let err = MeshCa::from_parts(&leaf.cert_pem, &leaf.key_pem, None).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        assert!(MeshCa::from_parts(&inter, &key, Some(&both)).is_err());
    }

    #[test]
    fn an_expired_root_still_loads_so_a_rotation_away_from_it_can_run() {
        let long_ago = now() - Duration::from_secs(7200);
        let expired =
            MeshCa::generate("cluster.local", long_ago, Duration::from_secs(600)).expect("ca");
        let loaded = MeshCa::from_pem(expired.cert_pem(), expired.key_pem()).expect("loads");
        assert_eq!(
            fingerprint(loaded.anchor_pem()),
            fingerprint(expired.cert_pem())
        );
        // A key that is not the certificate's is still refused.
        let other =
            MeshCa::generate("cluster.local", long_ago, Duration::from_secs(600)).expect("ca");
        assert!(MeshCa::from_pem(expired.cert_pem(), other.key_pem()).is_err());
    }

    #[test]
    fn leaves_never_outlive_their_intermediate_and_none_is_issued_near_its_end() {
        let t = now();
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut root_params = CertificateParams::default();
        root_params
            .distinguished_name
            .push(DnType::CommonName, "root");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);
        let intermediate = |life: Duration| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, "issuer");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            p.not_before = offset(t - Duration::from_secs(86400));
            p.not_after = offset(t + life);
            let cert = p.signed_by(&key, &root_issuer).expect("intermediate");
            MeshCa::from_parts(&cert.pem(), &key.serialize_pem(), Some(&root.pem()))
        };
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        // Ten hours left: a day's leaf is cut to them.
        let ca = intermediate(Duration::from_secs(10 * 3600)).expect("loads");
        let leaf = ca.issue(&id, t, DAY_FOR_TESTS).expect("leaf");
        let life = leaf.not_after.duration_since(t).expect("later").as_secs();
        assert!((10 * 3600 - 2..=10 * 3600).contains(&life), "{life}");
        assert!(
            ca.usable_for(t, DAY_FOR_TESTS).is_err(),
            "not worth rotating to"
        );
        assert!(ca.usable_for(t, Duration::from_secs(3600)).is_ok());
        // Half an hour left: nothing is issued; expired: it still loads
        // (a rotation away from it must run), and issues nothing.
        let err = intermediate(Duration::from_secs(1800))
            .expect("loads")
            .issue(&id, t, DAY_FOR_TESTS)
            .unwrap_err();
        assert!(
            err.to_string().contains("nothing more can be issued"),
            "{err}"
        );
        let expired = intermediate(Duration::ZERO).expect("an expired intermediate loads");
        assert!(expired.issue(&id, t, DAY_FOR_TESTS).is_err());
        assert!(
            expired
                .expires()
                .is_some_and(|e| e <= t + Duration::from_secs(1))
        );
    }

    const DAY_FOR_TESTS: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_bundle_is_written_one_way_so_its_hash_is_stable() {
        let t = now();
        let a = MeshCa::generate("cluster.local", t, CA_LIFETIME).expect("ca");
        let b = MeshCa::generate("cluster.local", t, CA_LIFETIME).expect("ca");
        let both = bundle_of(&[a.anchor_pem(), b.anchor_pem()]);
        // However the roots were written (CRLF, padding, comments).
        let messy = format!(
            "# a comment\r\n  {}\r\n\r\n{}",
            a.cert_pem().replace('\n', "\r\n"),
            b.cert_pem()
        );
        assert_eq!(bundle_of(&[&messy]), both);
        assert_eq!(
            bundle_hash(&bundle_of(&[a.anchor_pem()])),
            bundle_hash(a.cert_pem())
        );
        assert_ne!(fingerprint(a.cert_pem()), fingerprint(b.cert_pem()));
        assert_eq!(pem_blocks(&both).len(), 2);
    }

    #[test]
    fn a_debug_print_of_a_ca_or_a_workload_certificate_shows_no_key() {
        let t = now();
        let ca = MeshCa::generate("cluster.local", t, CA_LIFETIME).expect("ca");
        let leaf = ca
            .issue(
                &SpiffeId::new("cluster.local", "shop", "cart"),
                t,
                Duration::from_secs(3600),
            )
            .expect("leaf");
        for (printed, key) in [
            (format!("{ca:?}"), ca.key_pem()),
            (format!("{leaf:?}"), &leaf.key_pem),
            (format!("{leaf:#?}"), &leaf.key_pem),
        ] {
            assert!(
                !contains_key_material(&printed, key),
                "a key in a Debug print: {printed}"
            );
            assert!(printed.contains("<redacted>"), "{printed}");
        }
        // The check sees a key that is there, whole or in pieces, and not
        // in the certificate that carries its public half.
        let line = leaf.key_pem.lines().nth(2).expect("a second body line");
        let secret_data =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &leaf.key_pem);
        for leaked in [format!("{:?}", leaf.key_pem), line.to_owned(), secret_data] {
            assert!(contains_key_material(&leaked, &leaf.key_pem), "{leaked}");
        }
        assert!(!contains_key_material(&leaf.cert_pem, &leaf.key_pem));
        assert!(!contains_key_material(&ca.trust_bundle(), ca.key_pem()));
    }
}
