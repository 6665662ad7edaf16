//! The mesh CA in Secret `weft-ca` (namespace `weft-system`): created once,
//! with a create that fails if anything is already there, and written
//! again only by a CA rotation that completed (which makes the new root
//! `weft-ca`, [`promote`]). Losing it breaks every connection in the mesh,
//! so when it is gone (or unreadable) while namespaces still hold
//! certificates from it, the operator mints nothing, sets the Mesh's
//! `CertificateAuthority` condition and emits an Event instead of
//! generating a new root. Restoring the Secret from a backup heals it; so
//! does deleting the namespaces' `weft-identity-*` Secrets, which tells
//! the operator to start a new CA.
//!
//! While a rotation ([`super::carotation`]) is under way, the CA in force
//! is a [`TrustPlan`]: which CA issues, and which roots the bundles hold,
//! as the rotation's phase in the Mesh's status says. The new CA is read
//! from `weft-ca-next` (a root the operator generated) or from the
//! user's Secret; when it cannot be read, nothing is minted, as above.

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
use crate::api::{CaRotationPhase, CaRotationStatus, CaSource, MESH_NAME, Mesh};
use crate::identity::{
    CA_ANCHOR_KEY, CA_CERT_KEY, CA_KEY_KEY, CA_LIFETIME, CA_SECRET, MeshCa, bundle_of, fingerprint,
    pem_blocks,
};

/// The Secret (in the control plane's namespace) that holds a root the
/// operator generated for a rotation, until the rotation completes.
pub const NEXT_SECRET: &str = "weft-ca-next";
/// Annotation on [`NEXT_SECRET`]: the rotation it was generated for.
pub const ROTATION_ANNOTATION: &str = "weft.dev/ca-rotation";

/// What the mesh CA puts in force: the CA that issues every workload
/// certificate, and the trust bundle every identity Secret carries.
#[derive(Debug)]
pub struct TrustPlan {
    pub issuer: Arc<MeshCa>,
    pub bundle: String,
    /// The CA in `weft-ca`.
    pub base: Arc<MeshCa>,
}

impl TrustPlan {
    /// One CA, trusted alone: no rotation under way.
    pub fn single(ca: Arc<MeshCa>) -> Self {
        Self {
            bundle: ca.trust_bundle(),
            issuer: ca.clone(),
            base: ca,
        }
    }

    /// What `rotation` puts in force, `base` being the CA in `weft-ca`,
    /// `new_root` the rotation's new root (PEM) and `new` its CA, which
    /// only the phases that issue from the new root need: the others
    /// (adding the root, reverting, aborted) go on without its key.
    pub fn rotating(
        base: Arc<MeshCa>,
        new: Option<Arc<MeshCa>>,
        new_root: &str,
        rotation: &CaRotationStatus,
    ) -> Result<Self, String> {
        use super::carotation::Root;
        let plan = super::carotation::plan_of(rotation);
        let pem = |r: &Root| match r {
            Root::Old => base.anchor_pem(),
            Root::New => new_root,
        };
        let bundle = bundle_of(&plan.bundle.iter().map(pem).collect::<Vec<_>>());
        let issuer = match (plan.issuer, new) {
            (Root::Old, _) => base.clone(),
            (Root::New, Some(new)) => new,
            (Root::New, None) => {
                return Err(format!(
                    "rotation {} in {:?} issues from the new root, whose key cannot be read",
                    rotation.id, rotation.phase
                ));
            }
        };
        Ok(Self {
            issuer,
            bundle,
            base,
        })
    }
}

/// Condition type on the Mesh, and Event reasons.
pub const CONDITION: &str = "CertificateAuthority";
pub mod reason {
    pub const READY: &str = "Ready";
    pub const CREATED: &str = "Created";
    pub const MISSING: &str = "CAMissing";
    pub const INVALID: &str = "CAInvalid";
    /// A rotation is under way and what it needs does not add up (its
    /// new CA unreadable or changed, weft-ca changed, its status lost).
    pub const ROTATION_INCONSISTENT: &str = "RotationInconsistent";
    pub const NOT_SOON: &str = "NotSoon";
    pub const EXPIRES_SOON: &str = "ExpiresSoon";
    pub const EXPIRED: &str = "Expired";
}

/// Condition type on the Mesh: True (a warning) when the root expires
/// within `spec.ca.expiryWarning`.
pub const EXPIRY_CONDITION: &str = "CARootExpiring";

/// Looks at `weft-ca` and updates `ctx.ca`: loads it, creates it when
/// nothing in the mesh depends on an old one, or records why it cannot.
/// Returns whether the CA in use changed (every namespace then needs its
/// identities re-issued).
pub async fn ensure(ctx: &Ctx) -> Result<bool, Error> {
    // One at a time (the CA watch and the rotation both call it): what
    // one stores is never older than what it replaces.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    // Read in the reverse of the order a rotation writes them (weft-ca,
    // then weft-ca-next's marks, the Mesh's status, weft-ca-next's
    // deletion): whatever a rotation wrote meanwhile, what is read of
    // the later writes is never newer than what is read of the earlier.
    let rotation = read_rotation(ctx).await?;
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
    let base = match found {
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
    let next = match base {
        CaState::Ready(plan) => with_rotation(ctx, plan.base.clone(), rotation),
        other => other,
    };
    let changed = match (ctx.ca.load().as_ref(), &next) {
        (CaState::Ready(a), CaState::Ready(b)) => {
            a.issuer.cert_pem() != b.issuer.cert_pem() || a.bundle != b.bundle
        }
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

/// What a rotation's plan is made from: `weft-ca-next`, and the
/// rotation the Mesh's status shows.
struct RotationState {
    next: Option<Secret>,
    shown: Option<CaRotationStatus>,
}

async fn read_rotation(ctx: &Ctx) -> Result<RotationState, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let next = secrets.get_opt(NEXT_SECRET).await.map_err(|e| Error::Api {
        action: "reading",
        kind: "Secret".into(),
        namespace: ctx.control_namespace.clone(),
        name: NEXT_SECRET.into(),
        source: e,
    })?;
    let meshes: Api<Mesh> = Api::all(ctx.client.clone());
    let mesh = meshes.get_opt(MESH_NAME).await.map_err(|e| Error::Api {
        action: "reading",
        kind: "Mesh".into(),
        namespace: String::new(),
        name: MESH_NAME.into(),
        source: e,
    })?;
    let shown = mesh
        .and_then(|m| m.status)
        .and_then(|s| s.ca)
        .and_then(|c| c.rotation);
    Ok(RotationState { next, shown })
}

/// The plan the Mesh's rotation (read from the API server, not the
/// cache, so a phase just written is the one put in force) asks of
/// `base`. Whatever does not add up (weft-ca holding another root than
/// the rotation's old one, the new root's copy gone or changed, a copy
/// in `weft-ca-next` whose rotation the status no longer shows) mints
/// nothing: the Secrets stay as they are, and the proxies with them.
fn with_rotation(ctx: &Ctx, base: Arc<MeshCa>, state: RotationState) -> CaState {
    let RotationState { next, shown } = state;
    let rotation = shown
        .clone()
        .filter(|r| !r.phase.ended() && !r.new_root.is_empty());
    let missing = |message: String| CaState::Missing {
        reason: reason::ROTATION_INCONSISTENT,
        message,
    };
    let Some(rotation) = rotation else {
        if let Some(m) = next.as_ref().and_then(Marker::of)
            && m.issued()
            && !shown.is_some_and(|r| r.id == m.id && r.phase.ended())
        {
            return missing(format!(
                "Secret {}/{NEXT_SECRET} holds the new root of CA rotation {}, which had reached \
                 {:?}, but the Mesh's status.ca.rotation no longer shows it (the Mesh replaced, \
                 or restored without its status): nothing is issued, so no bundle drops a root \
                 a proxy presents. The rotation's loop writes it back as Blocked; raise \
                 spec.ca.rotation.retry (with the same id) to go on",
                ctx.control_namespace, m.id, m.phase
            ));
        }
        return CaState::Ready(Arc::new(TrustPlan::single(base)));
    };
    let stage = super::carotation::stage(&rotation);
    let base_root = fingerprint(base.anchor_pem()).unwrap_or_default();
    if base_root == rotation.new_root {
        if stage == CaRotationPhase::RemovingOld {
            // Promoted already (the status not yet written).
            return CaState::Ready(Arc::new(TrustPlan::single(base)));
        }
        return missing(format!(
            "Secret {}/{CA_SECRET} holds the new root {} of CA rotation {} while it is only in \
             {stage:?}: nothing is issued until the old root {} is back in it",
            ctx.control_namespace, rotation.new_root, rotation.id, rotation.old_root
        ));
    }
    if base_root != rotation.old_root {
        return missing(format!(
            "Secret {}/{CA_SECRET} holds root {base_root}, not the old root {} of CA rotation {}: \
             nothing is issued until it is back",
            ctx.control_namespace, rotation.old_root, rotation.id
        ));
    }
    let new = next
        .as_ref()
        .ok_or_else(|| {
            format!(
                "Secret {}/{NEXT_SECRET} is not there",
                ctx.control_namespace
            )
        })
        .and_then(|s| next_material(s, &rotation.id))
        .and_then(|ca| {
            let fp = fingerprint(ca.anchor_pem()).unwrap_or_default();
            if fp == rotation.new_root {
                Ok(Arc::new(ca))
            } else {
                Err(format!(
                    "its copy of the new root is root {fp}, not {} that the rotation began with",
                    rotation.new_root
                ))
            }
        });
    let new_root = if rotation.new_root_certificate.is_empty() {
        new.as_ref()
            .map(|c| c.anchor_pem().to_owned())
            .unwrap_or_default()
    } else {
        rotation.new_root_certificate.clone()
    };
    if fingerprint(&new_root).as_deref() != Some(rotation.new_root.as_str()) {
        return missing(format!(
            "CA rotation {} cannot tell its new root {}: {}",
            rotation.id,
            rotation.new_root,
            new.err()
                .unwrap_or_else(|| "the status holds another certificate".into())
        ));
    }
    let why = new.as_ref().err().cloned();
    match TrustPlan::rotating(base, new.ok(), &new_root, &rotation) {
        Ok(plan) => CaState::Ready(Arc::new(plan)),
        Err(e) => missing(format!(
            "{e} ({}); nothing is issued until it can be, or abort the rotation (certificates \
             go back to the old root without the new key)",
            why.unwrap_or_default()
        )),
    }
}

/// What `weft-ca-next` says of the rotation it was made for: its
/// annotations, written before each status write that moves the phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub id: String,
    /// The furthest phase the rotation was in (Blocked ones by the phase
    /// they stopped in).
    pub phase: CaRotationPhase,
    pub old_root: String,
}

/// Annotations on [`NEXT_SECRET`]: the phase and the old root.
pub const ROTATION_PHASE_ANNOTATION: &str = "weft.dev/ca-rotation-phase";
pub const ROTATION_OLD_ROOT_ANNOTATION: &str = "weft.dev/ca-rotation-old-root";

impl Marker {
    pub fn of(secret: &Secret) -> Option<Self> {
        let a = secret.annotations();
        Some(Self {
            id: a.get(ROTATION_ANNOTATION)?.clone(),
            phase: serde_json::from_value(serde_json::Value::String(
                a.get(ROTATION_PHASE_ANNOTATION)?.clone(),
            ))
            .ok()?,
            old_root: a
                .get(ROTATION_OLD_ROOT_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// Whether certificates may have been issued from the new root.
    pub fn issued(&self) -> bool {
        !matches!(
            self.phase,
            CaRotationPhase::AddingRoot | CaRotationPhase::Complete | CaRotationPhase::Aborted
        )
    }
}

/// The root of the rotation's copy in `weft-ca-next` (PEM), read
/// without its key.
pub fn next_root(secret: &Secret) -> Option<String> {
    let text = |k: &str| {
        secret
            .data
            .as_ref()?
            .get(k)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    let root = text(CA_ANCHOR_KEY).or_else(|| text(CA_CERT_KEY))?;
    pem_blocks(&root).into_iter().next()
}

/// The rotation's copy of its new CA, in `weft-ca-next`.
pub fn next_material(secret: &Secret, id: &str) -> Result<MeshCa, String> {
    let at = format!(
        "Secret {}/{NEXT_SECRET}",
        secret.namespace().unwrap_or_default()
    );
    if secret
        .annotations()
        .get(ROTATION_ANNOTATION)
        .map(String::as_str)
        != Some(id)
    {
        return Err(format!("{at} was not made for rotation {id}"));
    }
    stored(secret).map_err(|e| format!("{at}: {e}"))
}

/// A CA as weft keeps it (`weft-ca`, `weft-ca-next`): [`secret_data`]'s
/// keys.
fn stored(secret: &Secret) -> Result<MeshCa, String> {
    let anchor = secret
        .data
        .as_ref()
        .is_some_and(|d| d.contains_key(CA_ANCHOR_KEY))
        .then_some(CA_ANCHOR_KEY);
    material(secret, CA_CERT_KEY, CA_KEY_KEY, anchor)
}

/// The CA in `weft-ca`, read from the API server; Err says why it
/// cannot be used.
pub async fn read_base(ctx: &Ctx) -> Result<MeshCa, String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let at = format!("Secret {}/{CA_SECRET}", ctx.control_namespace);
    let secret = api
        .get_opt(CA_SECRET)
        .await
        .map_err(|e| format!("reading {at}: {e}"))?
        .ok_or_else(|| format!("{at} is not there"))?;
    stored(&secret).map_err(|e| format!("{at}: {e}"))
}

/// The CA in the user's Secret `source` (in the control plane's
/// namespace). Err says what is wrong, naming the Secret and the key.
pub async fn read_source(ctx: &Ctx, source: &CaSource) -> Result<MeshCa, String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let at = format!("Secret {}/{}", ctx.control_namespace, source.secret_name);
    let secret = api
        .get_opt(&source.secret_name)
        .await
        .map_err(|e| format!("reading {at}: {e}"))?
        .ok_or_else(|| format!("{at} is not there"))?;
    material(
        &secret,
        &source.cert_key,
        &source.key_key,
        source.anchor_key.as_deref(),
    )
    .map_err(|e| format!("{at}: {e}"))
}

/// A CA from a Secret's keys.
fn material(
    secret: &Secret,
    cert_key: &str,
    key_key: &str,
    anchor_key: Option<&str>,
) -> Result<MeshCa, String> {
    let text = |k: &str| -> Result<String, String> {
        let v = secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .ok_or_else(|| format!("it has no key `{k}`"))?;
        String::from_utf8(v.0.clone()).map_err(|_| format!("`{k}` is not PEM text"))
    };
    let anchor = anchor_key.map(text).transpose()?;
    MeshCa::from_parts(&text(cert_key)?, &text(key_key)?, anchor.as_deref())
        .map_err(|e| format!("it does not hold a usable CA: {e}"))
}

/// The Secret data that holds `ca`, as `weft-ca` keeps it.
pub fn secret_data(ca: &MeshCa) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::from([
        (
            CA_CERT_KEY.to_owned(),
            ByteString(ca.cert_pem().as_bytes().to_vec()),
        ),
        (
            CA_KEY_KEY.to_owned(),
            ByteString(ca.key_pem().as_bytes().to_vec()),
        ),
    ]);
    if fingerprint(ca.anchor_pem()) != fingerprint(ca.cert_pem()) {
        data.insert(
            CA_ANCHOR_KEY.to_owned(),
            ByteString(ca.anchor_pem().as_bytes().to_vec()),
        );
    }
    data
}

/// Makes `new` the CA in `weft-ca`: the last step of a rotation, once no
/// proxy trusts or presents the old root; only while it still holds the
/// rotation's old root, and by an update over the version read.
pub async fn promote(ctx: &Ctx, new: &MeshCa, old_root: &str) -> Result<(), String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let mut secret = api.get(CA_SECRET).await.map_err(|e| e.to_string())?;
    let held = stored(&secret)
        .ok()
        .and_then(|ca| fingerprint(ca.anchor_pem()));
    if held.as_deref() != Some(old_root) {
        return Err(format!(
            "Secret {}/{CA_SECRET} no longer holds the old root {old_root} (it holds {}): not \
             overwritten",
            ctx.control_namespace,
            held.unwrap_or_else(|| "no usable CA".into())
        ));
    }
    secret.data = Some(secret_data(new));
    secret.string_data = None;
    api.replace(CA_SECRET, &PostParams::default(), &secret)
        .await
        .map_err(|e| e.to_string())?;
    ctx.metrics.wrote("Secret", "update");
    Ok(())
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
        (Some(cert), Some(key)) => {
            match MeshCa::from_parts(&cert, &key, text(CA_ANCHOR_KEY).as_deref()) {
                Ok(ca) => CaState::Ready(Arc::new(TrustPlan::single(Arc::new(ca)))),
                Err(e) => CaState::Missing {
                    reason: reason::INVALID,
                    message: format!(
                        "Secret {}/{CA_SECRET} does not hold a usable CA ({e}); fix or restore it",
                        secret.namespace().unwrap_or_default()
                    ),
                },
            }
        }
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
        data: Some(secret_data(&ca)),
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
            Ok(CaState::Ready(Arc::new(TrustPlan::single(Arc::new(ca)))))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = api.get(CA_SECRET).await?;
            Ok(load(&theirs))
        }
        Err(e) => Err(e),
    }
}

/// What Events about the CA point at (it may not exist).
pub(crate) fn ca_ref(namespace: &str) -> Secret {
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
        CaState::Ready(plan) => (
            true,
            reason::READY,
            format!(
                "the mesh CA is loaded; its root expires at {}{}",
                root_expiry(plan)
                    .map(humantime)
                    .unwrap_or_else(|| "an unknown time".into()),
                if std::ptr::eq(plan.issuer.as_ref(), plan.base.as_ref()) {
                    ""
                } else {
                    "; a rotation issues from the new root"
                }
            ),
        ),
        CaState::Missing { reason, message } => (false, reason, message.clone()),
        CaState::Unknown => (false, "Pending", "the CA has not been read yet".into()),
    }
}

/// When the CA in `weft-ca` expires: its root, or an intermediate it
/// issues under, whichever is first.
fn root_expiry(plan: &TrustPlan) -> Option<SystemTime> {
    plan.base.expires()
}

/// The Mesh's `CARootExpiring` condition: True (a warning) once the
/// root in `weft-ca` expires within `warning` of `now`. None while no
/// CA is loaded (the `CertificateAuthority` condition says why).
pub fn expiry_condition(
    state: &CaState,
    warning: std::time::Duration,
    now: SystemTime,
) -> Option<(bool, &'static str, String)> {
    let CaState::Ready(plan) = state else {
        return None;
    };
    let expires = root_expiry(plan)?;
    let at = humantime(expires);
    Some(if expires <= now {
        (
            true,
            reason::EXPIRED,
            format!(
                "the mesh CA expired at {at} (its root, or an intermediate it issues under): \
                 clients outside the mesh refuse its certificates, and proxies too once an \
                 intermediate expired; rotate it (spec.ca.rotation)"
            ),
        )
    } else if expires.duration_since(now).unwrap_or_default() <= warning {
        (
            true,
            reason::EXPIRES_SOON,
            format!(
                "the mesh CA expires at {at} (its root, or an intermediate it issues under), \
                 within spec.ca.expiryWarning ({}h): rotate it with spec.ca.rotation before then \
                 (for a renewed intermediate under the same root, replace ca.crt and ca.key of \
                 weft-ca with it instead)",
                warning.as_secs() / 3600
            ),
        )
    } else {
        (
            false,
            reason::NOT_SOON,
            format!("the mesh CA expires at {at}"),
        )
    })
}

fn humantime(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
