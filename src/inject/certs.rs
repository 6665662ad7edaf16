//! The webhook's serving certificate, managed by `weft control-plane`:
//!
//! - a CA of its own (not the mesh CA: the API server trusts it, proxies
//!   must not) and a serving certificate for the webhook Service's DNS
//!   names, kept in a Secret in weft-system, created when absent and
//!   re-issued at two thirds of its life (the CA is kept, so the caBundle
//!   does not change on a renewal);
//! - the CA as `caBundle` of the MutatingWebhookConfiguration, set with
//!   server-side apply (field manager `weft-control-plane`, forced: the
//!   control plane owns that one field);
//! - the serving certificate swapped into the running HTTPS server, without
//!   a restart.
//!
//! `plan` decides from what is stored (pure); `ensure` and `apply_ca_bundle`
//! talk to the API server; `run` loops.

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
use crate::identity::{MeshCa, inspect_pem};

/// Lifetime of the webhook CA and of its serving certificates.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The field manager of every write the control plane makes.
pub const FIELD_MANAGER: &str = "weft-control-plane";
/// How often the Secret is checked even when nothing is due (it may have
/// been deleted or edited).
const RECHECK: Duration = Duration::from_secs(300);

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
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

/// The server-side-apply body that sets the webhook's `caBundle`.
pub fn ca_bundle_apply(names: &WebhookNames, ca_pem: &str) -> serde_json::Value {
    use base64::Engine;
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": names.configuration },
        "webhooks": [{
            "name": names.webhook,
            "clientConfig": {
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
        }],
    })
}

/// Sets the webhook's `caBundle` with server-side apply.
pub async fn apply_ca_bundle(
    client: &kube::Client,
    names: &WebhookNames,
    ca_pem: &str,
) -> anyhow::Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(
        &names.configuration,
        &params,
        &Patch::Apply(ca_bundle_apply(names, ca_pem)),
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

/// Keeps the serving certificate valid, in the Secret, in the webhook
/// configuration and in the running server. Never returns; errors are
/// logged and retried with backoff.
pub async fn run(client: kube::Client, names: WebhookNames, serving: Arc<ServingCert>) {
    let mut applied_bundle: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let result = async {
            let material = ensure(&client, &names).await?;
            serving.set(&material.cert, &material.key)?;
            if applied_bundle.as_deref() != Some(material.ca_cert.as_str()) {
                apply_ca_bundle(&client, &names, &material.ca_cert).await?;
                tracing::info!(configuration = %names.configuration, "webhook caBundle set");
                applied_bundle = Some(material.ca_cert.clone());
            }
            anyhow::Ok(material.renew_at())
        }
        .await;
        let wait = match result {
            Ok(renew_at) => {
                failures = 0;
                let due = renew_at
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
}
