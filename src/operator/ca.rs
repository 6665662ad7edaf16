//! The mesh CA in Secret `weft-ca` (namespace `weft-system`): created once,
//! with a create that fails if anything is already there, and never written
//! again by weft. Losing it breaks every connection in the mesh, so when it
//! is gone (or unreadable) while namespaces still hold certificates from
//! it, the operator mints nothing, sets the Mesh's `CertificateAuthority`
//! condition and emits an Event instead of generating a new root. Restoring
//! the Secret from a backup heals it; so does deleting the namespaces'
//! `weft-identity-*` Secrets, which tells the operator to start a new CA.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, ResourceExt};

use super::desired::{MANAGED_BY, MANAGED_BY_LABEL};
use super::reconcile::{CaState, Ctx, Error};
use crate::identity::{CA_CERT_KEY, CA_KEY_KEY, CA_LIFETIME, CA_SECRET, MeshCa};

/// Condition type on the Mesh, and Event reasons.
pub const CONDITION: &str = "CertificateAuthority";
pub mod reason {
    pub const READY: &str = "Ready";
    pub const CREATED: &str = "Created";
    pub const MISSING: &str = "CAMissing";
    pub const INVALID: &str = "CAInvalid";
}

/// Looks at `weft-ca` and updates `ctx.ca`: loads it, creates it when
/// nothing in the mesh depends on an old one, or records why it cannot.
/// Returns whether the CA in use changed (every namespace then needs its
/// identities re-issued).
pub async fn ensure(ctx: &Ctx) -> Result<bool, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let api_err = |action, source| Error::Api {
        action,
        kind: "Secret".into(),
        namespace: ctx.control_namespace.clone(),
        name: CA_SECRET.into(),
        source,
    };
    let found = api
        .get_opt(CA_SECRET)
        .await
        .map_err(|e| api_err("reading", e))?;
    let next = match found {
        Some(secret) => load(&secret),
        None => {
            let holders = holders(ctx);
            if holders.is_empty() {
                create(ctx, &api)
                    .await
                    .map_err(|e| api_err("creating", e))?
            } else {
                CaState::Missing {
                    reason: reason::MISSING,
                    message: format!(
                        "Secret {}/{CA_SECRET} is gone while {} namespaces hold certificates from it ({}); \
                         no new root is minted, because that would break every connection in the mesh. \
                         Restore the Secret from a backup, or delete those namespaces' weft-identity-* \
                         Secrets to start over with a new CA",
                        ctx.control_namespace,
                        holders.len(),
                        preview(&holders),
                    ),
                }
            }
        }
    };
    let changed = match (ctx.ca.load().as_ref(), &next) {
        (CaState::Ready(a), CaState::Ready(b)) => a.cert_pem() != b.cert_pem(),
        (CaState::Ready(_), _) | (_, CaState::Ready(_)) => true,
        _ => false,
    };
    if let CaState::Missing { reason, message } = &next {
        let was =
            matches!(ctx.ca.load().as_ref(), CaState::Missing { reason: r, .. } if r == reason);
        if !was {
            tracing::error!(reason, "{message}");
            ctx.event(
                &ca_ref(&ctx.control_namespace),
                true,
                reason,
                "LoadCA",
                message.clone(),
            )
            .await;
        }
    }
    ctx.ca.store(Arc::new(next));
    Ok(changed)
}

/// Namespaces with an identity Secret that holds a trust bundle.
fn holders(ctx: &Ctx) -> Vec<String> {
    let mut out: Vec<String> = ctx
        .world
        .secrets
        .state()
        .iter()
        .filter(|s| super::desired::is_identity_secret(&s.name_any()))
        .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key(CA_CERT_KEY)))
        .filter_map(|s| s.namespace())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

fn load(secret: &Secret) -> CaState {
    let text = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    match (text(CA_CERT_KEY), text(CA_KEY_KEY)) {
        (Some(cert), Some(key)) => match MeshCa::from_pem(&cert, &key) {
            Ok(ca) => CaState::Ready(Arc::new(ca)),
            Err(e) => CaState::Missing {
                reason: reason::INVALID,
                message: format!(
                    "Secret {}/{CA_SECRET} does not hold a usable CA ({e}); fix or restore it",
                    secret.namespace().unwrap_or_default()
                ),
            },
        },
        _ => CaState::Missing {
            reason: reason::INVALID,
            message: format!(
                "Secret {}/{CA_SECRET} lacks `{CA_CERT_KEY}` or `{CA_KEY_KEY}`; restore it",
                secret.namespace().unwrap_or_default()
            ),
        },
    }
}

/// Creates `weft-ca` (a create never replaces: if another replica won the
/// race, its CA is read and used).
async fn create(ctx: &Ctx, api: &Api<Secret>) -> Result<CaState, kube::Error> {
    let trust_domain = ctx.snapshot.load().mesh.trust_domain.clone();
    let ca = match MeshCa::generate(&trust_domain, SystemTime::now(), CA_LIFETIME) {
        Ok(ca) => ca,
        Err(e) => {
            return Ok(CaState::Missing {
                reason: reason::INVALID,
                message: format!("generating the mesh CA failed: {e}"),
            });
        }
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(ctx.control_namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                CA_CERT_KEY.to_owned(),
                ByteString(ca.cert_pem().as_bytes().to_vec()),
            ),
            (
                CA_KEY_KEY.to_owned(),
                ByteString(ca.key_pem().as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            ctx.metrics.wrote("Secret", "create");
            tracing::info!(namespace = %ctx.control_namespace, "created the mesh CA in Secret {CA_SECRET}");
            ctx.event(
                &ca_ref(&ctx.control_namespace),
                false,
                reason::CREATED,
                "CreateCA",
                format!("created the mesh CA for trust domain {trust_domain}"),
            )
            .await;
            Ok(CaState::Ready(Arc::new(ca)))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = api.get(CA_SECRET).await?;
            Ok(load(&theirs))
        }
        Err(e) => Err(e),
    }
}

/// What Events about the CA point at (it may not exist).
fn ca_ref(namespace: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    }
}

/// The Mesh condition for the CA as it stands.
pub fn condition(state: &CaState) -> (bool, &'static str, String) {
    match state {
        CaState::Ready(ca) => (
            true,
            reason::READY,
            format!(
                "the mesh CA is loaded; it expires at {}",
                crate::identity::inspect_pem(ca.cert_pem())
                    .map(|i| humantime(i.not_after))
                    .unwrap_or_else(|_| "an unknown time".into())
            ),
        ),
        CaState::Missing { reason, message } => (false, reason, message.clone()),
        CaState::Unknown => (false, "Pending", "the CA has not been read yet".into()),
    }
}

fn humantime(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
