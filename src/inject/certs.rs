//! The webhook's serving certificate, managed by `weft control-plane`:
//!
//! - a CA of its own (not the mesh CA: the API server trusts it, proxies
//!   must not) and a serving certificate for the webhook Service's DNS
//!   names, kept in a Secret in weft-system, created when absent and
//!   re-issued at two thirds of its life (the CA is kept, so the caBundle
//!   does not change on a renewal);
//! - the CA as `caBundle` of the MutatingWebhookConfiguration, set with
//!   server-side apply (field manager `weft-control-plane`, forced: the
//!   control plane owns that one field). It is compared with the live
//!   object on every check, not with what this process last wrote: a
//!   configuration recreated by `helm upgrade --force`, `kubectl replace` or
//!   a delete and re-apply comes back without a caBundle, and with
//!   `failurePolicy: Fail` every pod creation in a meshed namespace is
//!   refused until it is set again. When the CA changes (the Secret was
//!   deleted, or the CA neared its end), the old CA stays in the bundle
//!   beside the new one for [`CA_OVERLAP`], so that a replica still serving
//!   a certificate from the old CA is trusted until it has read the new
//!   Secret;
//! - the serving certificate swapped into the running HTTPS server, without
//!   a restart, once its CA is in the caBundle.
//!
//! `plan` and `ca_bundle_wanted` decide (pure); `ensure`, `sync_ca_bundle`
//! and `apply_ca_bundle` talk to the API server; `check` is one pass and
//! `run` loops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use super::webhook::ServingCert;
use crate::identity::{MeshCa, inspect_der, inspect_pem};

/// Lifetime of the webhook CA and of its serving certificates.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The field manager of every write the control plane makes.
pub const FIELD_MANAGER: &str = "weft-control-plane";
/// How often the Secret and the live caBundle are checked even when nothing
/// is due: either may have been deleted, edited or replaced, and a webhook
/// configuration without its caBundle blocks pod creation. Each check is two
/// GETs of one small object; writes happen only when something differs.
pub const RECHECK: Duration = Duration::from_secs(15);
/// How long a replaced webhook CA stays in the caBundle beside the new one,
/// counted from the newer CA's notBefore (which is backdated five minutes):
/// far longer than any replica takes to read the new Secret (one RECHECK,
/// or the retry backoff of at most a minute), short enough that a CA
/// replaced on purpose stops being trusted soon.
pub const CA_OVERLAP: Duration = Duration::from_secs(20 * 60);

/// Keys of the serving Secret (`kubernetes.io/tls` plus the CA).
pub mod keys {
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const TLS_CERT: &str = "tls.crt";
    pub const TLS_KEY: &str = "tls.key";
}

/// Where the webhook lives.
#[derive(Clone, Debug)]
pub struct WebhookNames {
    /// The control plane's namespace (weft-system).
    pub namespace: String,
    /// The Service in front of the webhook.
    pub service: String,
    /// The Secret holding the CA and the serving certificate.
    pub secret: String,
    /// The MutatingWebhookConfiguration.
    pub configuration: String,
    /// The webhook's entry in it.
    pub webhook: String,
}

impl Default for WebhookNames {
    /// The names `manifests/` and the chart install.
    fn default() -> Self {
        Self {
            namespace: "weft-system".into(),
            service: "weft-injector".into(),
            secret: "weft-injector-tls".into(),
            configuration: "weft-injector".into(),
            webhook: "inject.weft.dev".into(),
        }
    }
}

impl WebhookNames {
    /// The DNS names the API server may use for the Service.
    pub fn dns_names(&self) -> Vec<String> {
        let (s, ns) = (&self.service, &self.namespace);
        vec![
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
            format!("{s}.{ns}"),
            s.clone(),
        ]
    }
}

/// The serving material, as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

/// The two keys never appear in a print (a `?plan` in a log line).
impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::identity::REDACTED;
        f.debug_struct("Material")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &REDACTED)
            .field("cert", &self.cert)
            .field("key", &REDACTED)
            .finish()
    }
}

impl Material {
    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let get = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        Some(Self {
            ca_cert: get(keys::CA_CERT)?,
            ca_key: get(keys::CA_KEY)?,
            cert: get(keys::TLS_CERT)?,
            key: get(keys::TLS_KEY)?,
        })
    }

    fn to_data(&self) -> BTreeMap<String, ByteString> {
        [
            (keys::CA_CERT, &self.ca_cert),
            (keys::CA_KEY, &self.ca_key),
            (keys::TLS_CERT, &self.cert),
            (keys::TLS_KEY, &self.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
        .collect()
    }

    /// When the serving certificate is due for renewal.
    pub fn renew_at(&self) -> Option<SystemTime> {
        inspect_pem(&self.cert).ok().map(|i| i.renew_at())
    }
}

/// What to do about the stored material.
#[derive(Debug)]
pub enum Plan {
    /// Valid and not due: use it.
    Keep(Material),
    /// Store this (the reason is for the log).
    Store(Material, String),
}

/// Decides from the stored Secret (if any): keep it, re-issue the serving
/// certificate from the stored CA, or start over with a new CA.
pub fn plan(
    stored: Option<&Secret>,
    names: &WebhookNames,
    now: SystemTime,
) -> anyhow::Result<Plan> {
    let dns = names.dns_names();
    let material = stored.and_then(Material::from_secret);
    let ca = material.as_ref().and_then(|m| {
        let info = inspect_pem(&m.ca_cert).ok()?;
        let ca = MeshCa::from_pem(&m.ca_cert, &m.ca_key).ok()?;
        // A CA within a serving lifetime of its end is replaced.
        (info.not_after > now + SERVING_LIFETIME).then_some(ca)
    });
    let Some(ca) = ca else {
        let ca = MeshCa::generate("weft-webhook", now, CA_LIFETIME)?;
        let leaf = ca.issue_server(&dns, now, SERVING_LIFETIME)?;
        let why = if material.is_some() {
            "the stored webhook CA is unreadable or near its end: new CA"
        } else {
            "no serving certificate yet: new CA"
        };
        return Ok(Plan::Store(
            Material {
                ca_cert: ca.cert_pem().to_owned(),
                ca_key: ca.key_pem().to_owned(),
                cert: leaf.cert_pem,
                key: leaf.key_pem,
            },
            why.to_owned(),
        ));
    };
    let Some(material) = material else {
        unreachable!("a CA was read from stored material")
    };
    let due = match inspect_pem(&material.cert) {
        Ok(info) if names_match(&material.cert, &dns) => {
            (info.renew_at() <= now).then_some("the serving certificate is due for renewal")
        }
        Ok(_) => Some("the serving certificate does not name the webhook Service"),
        Err(_) => Some("the serving certificate is unreadable"),
    };
    match due {
        None => Ok(Plan::Keep(material)),
        Some(why) => {
            let leaf = ca.issue_server(&dns, now, SERVING_LIFETIME)?;
            Ok(Plan::Store(
                Material {
                    cert: leaf.cert_pem,
                    key: leaf.key_pem,
                    ..material
                },
                why.to_owned(),
            ))
        }
    }
}

/// Whether the certificate's DNS SANs are exactly `dns`.
fn names_match(cert_pem: &str, dns: &[String]) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut want = dns.to_vec();
    names.sort();
    want.sort();
    names == want
}

/// Reads the Secret, stores what `plan` says, and returns the material in
/// force. Two replicas racing to create it: the loser reads the winner's.
pub async fn ensure(client: &kube::Client, names: &WebhookNames) -> anyhow::Result<Material> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    for _ in 0..3 {
        let stored = api
            .get_opt(&names.secret)
            .await
            .with_context(|| format!("reading Secret {}/{}", names.namespace, names.secret))?;
        let (material, why) = match plan(stored.as_ref(), names, SystemTime::now())? {
            Plan::Keep(m) => return Ok(m),
            Plan::Store(m, why) => (m, why),
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(names.secret.clone()),
                namespace: Some(names.namespace.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        FIELD_MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                resource_version: stored
                    .as_ref()
                    .and_then(|s| s.metadata.resource_version.clone()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(material.to_data()),
            ..Default::default()
        };
        let written = match &stored {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => {
                api.replace(&names.secret, &PostParams::default(), &secret)
                    .await
            }
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %names.secret, reason = %why, "webhook serving certificate stored");
                return Ok(material);
            }
            // Another replica wrote first (AlreadyExists or Conflict): read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("writing Secret {}/{}", names.namespace, names.secret)
                });
            }
        }
    }
    anyhow::bail!(
        "Secret {}/{} kept changing while it was being written; will retry",
        names.namespace,
        names.secret
    )
}

/// The server-side-apply body that sets the webhook's `caBundle` (PEM).
pub fn ca_bundle_apply(names: &WebhookNames, bundle_pem: &str) -> serde_json::Value {
    use base64::Engine;
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": names.configuration },
        "webhooks": [{
            "name": names.webhook,
            "clientConfig": {
                "caBundle": base64::engine::general_purpose::STANDARD.encode(bundle_pem),
            },
        }],
    })
}

/// One certificate of a caBundle.
struct BundleCert {
    der: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// The readable certificates of a PEM bundle, in order; anything else in it
/// is left out (and so dropped on the next write).
fn bundle_certs(pem: &[u8]) -> Vec<BundleCert> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .map_while(Result::ok)
        .filter_map(|der| {
            let info = inspect_der(&der).ok()?;
            Some(BundleCert {
                der: der.to_vec(),
                not_before: info.not_before,
                not_after: info.not_after,
            })
        })
        .collect()
}

/// A DER certificate as PEM.
fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The caBundle to write, or `None` when the live one (`live`, PEM as
/// stored; `None` when the webhook has none) already holds exactly the
/// certificates wanted: the CA in force, plus each other CA of the live
/// bundle that is unexpired and whose rotation against the CA in force
/// (the later of the two notBefores) is less than [`CA_OVERLAP`] ago. That
/// keeps an old CA while replicas move off it, and also a newer one that
/// another replica has just minted and this one has not read yet, so two
/// replicas never undo each other. Compared as sets: order and PEM layout
/// do not cause a write.
pub fn ca_bundle_wanted(
    ca_pem: &str,
    live: Option<&[u8]>,
    now: SystemTime,
) -> anyhow::Result<Option<String>> {
    let current = bundle_certs(ca_pem.as_bytes())
        .into_iter()
        .next()
        .context("the webhook CA certificate is unreadable")?;
    let live = live.map(bundle_certs).unwrap_or_default();
    let mut kept: Vec<&BundleCert> = Vec::new();
    for cert in &live {
        let rotated = cert.not_before.max(current.not_before);
        let keep = cert.der != current.der
            && cert.not_after > now
            && now < rotated + CA_OVERLAP
            && !kept.iter().any(|k| k.der == cert.der);
        if keep {
            kept.push(cert);
        }
    }
    let mut want: Vec<&[u8]> = kept.iter().map(|c| c.der.as_slice()).collect();
    want.push(&current.der);
    let mut have: Vec<&[u8]> = live.iter().map(|c| c.der.as_slice()).collect();
    want.sort_unstable();
    have.sort_unstable();
    have.dedup();
    if want == have {
        return Ok(None);
    }
    // The CA in force first and as stored; the others after it.
    let mut bundle = ca_pem.to_owned();
    if !kept.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    for cert in kept {
        bundle.push_str(&der_to_pem(&cert.der));
    }
    Ok(Some(bundle))
}

/// Sets the webhook's `caBundle` (PEM, one or more CAs) with server-side
/// apply.
pub async fn apply_ca_bundle(
    client: &kube::Client,
    names: &WebhookNames,
    bundle_pem: &str,
) -> anyhow::Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(
        &names.configuration,
        &params,
        &Patch::Apply(ca_bundle_apply(names, bundle_pem)),
    )
    .await
    .with_context(|| {
        format!(
            "setting the caBundle of MutatingWebhookConfiguration {} (is it installed? see manifests/)",
            names.configuration
        )
    })?;
    Ok(())
}

/// Reads the live webhook configuration and sets its caBundle when it is
/// not what [`ca_bundle_wanted`] says. Returns whether it wrote.
pub async fn sync_ca_bundle(
    client: &kube::Client,
    names: &WebhookNames,
    ca_pem: &str,
) -> anyhow::Result<bool> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let live = api
        .get_opt(&names.configuration)
        .await
        .with_context(|| {
            format!(
                "reading MutatingWebhookConfiguration {}",
                names.configuration
            )
        })?
        .with_context(|| {
            format!(
                "MutatingWebhookConfiguration {} not found (is it installed? see manifests/)",
                names.configuration
            )
        })?;
    // Applying to a webhook the configuration lacks would add a bare entry
    // the API server rejects: say what is wrong instead.
    let webhook = live
        .webhooks
        .iter()
        .flatten()
        .find(|w| w.name == names.webhook)
        .with_context(|| {
            format!(
                "MutatingWebhookConfiguration {} has no webhook {}",
                names.configuration, names.webhook
            )
        })?;
    let live_bundle = webhook
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| b.0.as_slice());
    let Some(bundle) = ca_bundle_wanted(ca_pem, live_bundle, SystemTime::now())? else {
        return Ok(false);
    };
    apply_ca_bundle(client, names, &bundle).await?;
    tracing::info!(
        configuration = %names.configuration,
        cas = bundle_certs(bundle.as_bytes()).len(),
        was_empty = live_bundle.is_none_or(|b| b.is_empty()),
        "webhook caBundle set"
    );
    Ok(true)
}

/// One pass of [`run`]: the Secret, then the live caBundle, then the
/// running server. A new serving certificate is served only once its CA is
/// in the caBundle (before the first one, anything beats nothing). Returns
/// the material in force.
pub async fn check(
    client: &kube::Client,
    names: &WebhookNames,
    serving: &ServingCert,
) -> anyhow::Result<Material> {
    let material = ensure(client, names).await?;
    let trusted = sync_ca_bundle(client, names, &material.ca_cert).await;
    if trusted.is_ok() || !serving.ready() {
        serving.set(&material.cert, &material.key)?;
    }
    trusted?;
    Ok(material)
}

/// Keeps the serving certificate valid, in the Secret, in the webhook
/// configuration and in the running server. Never returns; errors are
/// logged and retried with backoff.
pub async fn run(client: kube::Client, names: WebhookNames, serving: Arc<ServingCert>) {
    let mut failures = 0u32;
    loop {
        let result = check(&client, &names, &serving).await;
        let wait = match result {
            Ok(material) => {
                failures = 0;
                let due = material
                    .renew_at()
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(RECHECK);
                due.min(RECHECK)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %format!("{e:#}"), "webhook serving certificate not in order; retrying");
                Duration::from_secs(1u64 << failures.min(6))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Loads a serving certificate someone else manages (cert-manager) from
/// the Secret's `tls.crt`/`tls.key`, and reloads it when it changes.
pub async fn run_external(client: kube::Client, names: WebhookNames, serving: Arc<ServingCert>) {
    let api: Api<Secret> = Api::namespaced(client, &names.namespace);
    let mut loaded: Option<String> = None;
    loop {
        let result = async {
            let secret = api
                .get(&names.secret)
                .await
                .with_context(|| format!("reading Secret {}/{}", names.namespace, names.secret))?;
            let data = secret.data.unwrap_or_default();
            let text = |k: &str| {
                data.get(k)
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .with_context(|| format!("Secret {} has no {k}", names.secret))
            };
            let (cert, key) = (text(keys::TLS_CERT)?, text(keys::TLS_KEY)?);
            if loaded.as_deref() != Some(cert.as_str()) {
                serving.set(&cert, &key)?;
                tracing::info!(secret = %names.secret, "webhook serving certificate loaded");
                loaded = Some(cert);
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), "webhook serving certificate not loaded; retrying");
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> WebhookNames {
        WebhookNames::default()
    }

    fn secret(m: &Material) -> Secret {
        Secret {
            data: Some(m.to_data()),
            ..Default::default()
        }
    }

    #[test]
    fn issues_once_keeps_then_renews_from_the_same_ca() {
        let now = SystemTime::now();
        let Plan::Store(first, _) = plan(None, &names(), now).expect("plan") else {
            panic!("nothing stored: a CA and a certificate are made");
        };
        assert!(names_match(&first.cert, &names().dns_names()));
        let stored = secret(&first);
        assert!(matches!(
            plan(Some(&stored), &names(), now).expect("plan"),
            Plan::Keep(m) if m == first
        ));
        // Two thirds into its life: a new serving certificate, same CA.
        let later = now + SERVING_LIFETIME * 2 / 3 + Duration::from_secs(60);
        let Plan::Store(renewed, why) = plan(Some(&stored), &names(), later).expect("plan") else {
            panic!("due for renewal");
        };
        assert!(why.contains("renewal"), "{why}");
        assert_eq!(renewed.ca_cert, first.ca_cert, "the caBundle stays");
        assert_ne!(renewed.cert, first.cert);
        // A renamed Service gets a certificate for its names.
        let mut moved = names();
        moved.service = "injector".into();
        assert!(matches!(
            plan(Some(&stored), &moved, now).expect("plan"),
            Plan::Store(m, _) if names_match(&m.cert, &moved.dns_names()) && m.ca_cert == first.ca_cert
        ));
        // A broken Secret starts over.
        let broken = Secret {
            data: Some([(keys::CA_CERT.to_owned(), ByteString(b"junk".to_vec()))].into()),
            ..Default::default()
        };
        assert!(matches!(
            plan(Some(&broken), &names(), now).expect("plan"),
            Plan::Store(..)
        ));
    }

    #[test]
    fn a_debug_print_of_the_webhook_material_or_plan_shows_no_key() {
        let Plan::Store(material, _) = plan(None, &names(), SystemTime::now()).expect("plan")
        else {
            panic!("nothing stored: a CA and a certificate are made");
        };
        let keys = [material.ca_key.clone(), material.key.clone()];
        let printed = [
            format!("{material:?}"),
            format!("{:#?}", Plan::Keep(material.clone())),
        ];
        for printed in &printed {
            for key in &keys {
                assert!(
                    !crate::identity::contains_key_material(printed, key),
                    "a key in a Debug print: {printed}"
                );
            }
        }
    }

    fn ca(at: SystemTime, lifetime: Duration) -> String {
        MeshCa::generate("weft-webhook", at, lifetime)
            .expect("ca")
            .cert_pem()
            .to_owned()
    }

    fn ders(bundle: &str) -> Vec<Vec<u8>> {
        bundle_certs(bundle.as_bytes())
            .into_iter()
            .map(|c| c.der)
            .collect()
    }

    #[test]
    fn the_live_ca_bundle_is_written_only_when_it_differs() {
        let now = SystemTime::now();
        let current = ca(now, CA_LIFETIME);
        // A recreated configuration: no caBundle, or an empty one.
        for live in [None, Some(&b""[..])] {
            assert_eq!(
                ca_bundle_wanted(&current, live, now).expect("wanted"),
                Some(current.clone()),
                "exactly the stored CA"
            );
        }
        // Already there: nothing to write, in whatever PEM layout.
        assert_eq!(
            ca_bundle_wanted(&current, Some(current.as_bytes()), now).expect("wanted"),
            None
        );
        let relaid = der_to_pem(&ders(&current)[0]).replace('\n', "\r\n");
        assert_eq!(
            ca_bundle_wanted(&current, Some(relaid.as_bytes()), now).expect("wanted"),
            None
        );
        // A CA replaced more than CA_OVERLAP ago, an expired one and junk
        // are dropped.
        let foreign = ca(now - Duration::from_secs(3600), CA_LIFETIME);
        let expired = ca(now - Duration::from_secs(7200), Duration::from_secs(3600));
        let live = format!("{expired}junk\n{foreign}{current}");
        let wanted = ca_bundle_wanted(&current, Some(live.as_bytes()), now + CA_OVERLAP)
            .expect("wanted")
            .expect("a write");
        assert_eq!(wanted, current);
        assert!(ca_bundle_wanted("junk", None, now).is_err());
    }

    #[test]
    fn a_new_ca_is_published_beside_the_old_one_until_the_overlap_ends() {
        let minted = SystemTime::now();
        let old = ca(minted - Duration::from_secs(86_400), CA_LIFETIME);
        let new = ca(minted, CA_LIFETIME);
        // The replica that minted the new CA: new first, old kept.
        let both = ca_bundle_wanted(&new, Some(old.as_bytes()), minted)
            .expect("wanted")
            .expect("a write");
        assert!(both.starts_with(&new), "the CA in force first, as stored");
        assert_eq!(ders(&both), [ders(&new), ders(&old)].concat());
        // Once published, neither replica writes again during the overlap:
        // not the one on the new CA, nor one that has not read it yet (it
        // must not take the new CA out again), whatever the order.
        let soon = minted + Duration::from_secs(60);
        let reversed = format!("{old}{new}");
        for (in_force, live) in [(&new, &both), (&old, &both), (&new, &reversed)] {
            assert_eq!(
                ca_bundle_wanted(in_force, Some(live.as_bytes()), soon).expect("wanted"),
                None
            );
        }
        // After the overlap, the old CA goes.
        let after = minted + CA_OVERLAP;
        assert_eq!(
            ca_bundle_wanted(&new, Some(both.as_bytes()), after).expect("wanted"),
            Some(new.clone())
        );
    }
}
