//! The loop that drives a CA rotation: each look reads the Mesh (its
//! `spec.ca.rotation` and where the rotation stands in its status), the
//! CA in `weft-ca` and the new one, what every proxy reported in the
//! latest reading of the mesh stats (the bundle hash it trusts, the root
//! its own certificate chains to, the handshakes it refused as
//! `unknown-ca`) and, in the phases that wait on them, the root each
//! identity Secret's certificate chains to. The pure
//! [`carotation::step`] decides; its status is written under a field
//! manager of its own ([`FIELD_MANAGER`]) over the version read, then the
//! CA re-reads the phase ([`ca::ensure`]) and every namespace is
//! reconciled when what it puts in force changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;

use super::ca::{self, NEXT_SECRET, ROTATION_ANNOTATION};
use super::carotation::{self, Evidence, NewRoot, Roots};
use super::desired::{MANAGED_BY, MANAGED_BY_LABEL};
use super::reconcile::Ctx;
use crate::api::{CaRotation, CaRotationPhase, CaRotationStatus, MESH_NAME, Mesh};
use crate::identity::{
    CA_LIFETIME, IDENTITY_SECRET_PREFIX, MeshCa, TLS_CERT_KEY, bundle_hash, bundle_of, fingerprint,
    inspect_pem, root_of,
};
use crate::meshstats::{SharedStats, Tick};

/// The field manager of `status.ca`.
pub const FIELD_MANAGER: &str = "weft-ca-rotation";

/// The rejection reason that blocks a rotation.
const UNKNOWN_CA: &str = "unknown-ca";

/// Looks at the rotation every `every` until the task is aborted (the
/// lease lost, or shutdown); `all` asks for every namespace to be
/// reconciled (the CA in force changed).
pub async fn run(
    ctx: Arc<Ctx>,
    stats: SharedStats,
    every: Duration,
    all: mpsc::UnboundedSender<()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match look(&ctx, &stats).await {
            Ok(false) => {}
            Ok(true) => match ca::ensure(&ctx).await {
                Ok(true) => {
                    tracing::info!(
                        "the CA rotation changed the CA in force: reconciling every namespace"
                    );
                    if all.send(()).is_err() {
                        return;
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reading the mesh CA after a rotation step"),
            },
            Err(e) if e.contains("409") => {
                tracing::debug!(
                    "CA rotation: the Mesh changed since the cache showed it; looked at again next tick"
                );
            }
            Err(e) => tracing::warn!(error = %e, "CA rotation: status not written"),
        }
    }
}

/// One look; true when the status was written.
pub async fn look(ctx: &Ctx, stats: &SharedStats) -> Result<bool, String> {
    let Some(mesh) = ctx
        .world
        .meshes
        .state()
        .into_iter()
        .find(|m| m.name_any() == MESH_NAME)
    else {
        return Ok(false);
    };
    let spec = mesh.spec.ca.as_ref().and_then(|c| c.rotation.as_ref());
    let current = mesh
        .status
        .as_ref()
        .and_then(|s| s.ca.as_ref())
        .and_then(|c| c.rotation.as_ref());
    let under_way = current.filter(|c| !c.phase.ended());
    if spec.is_none() && under_way.is_none() {
        return Ok(false);
    }
    if spec.is_some_and(|s| current.is_some_and(|c| c.id == s.id && c.phase.ended())) {
        return Ok(false);
    }
    let base = ca::read_base(ctx).await?;
    let now = SystemTime::now();
    let mut ev = Evidence {
        base_root: fingerprint(base.anchor_pem()).unwrap_or_default(),
        ..Evidence::default()
    };
    let begun = under_way.filter(|c| !c.new_root.is_empty());
    let new = match (begun, spec) {
        (Some(c), _) => Some(ca::read_source(ctx, c.source.as_ref(), &c.id).await),
        (None, Some(s)) if s.action == crate::api::RotationAction::Proceed => {
            Some(prepare(ctx, s).await)
        }
        (None, _) => None,
    };
    ev.new_root = new.as_ref().map(|r| {
        r.as_ref()
            .map(|ca| NewRoot {
                fingerprint: fingerprint(ca.anchor_pem()).unwrap_or_default(),
                expires: inspect_pem(ca.anchor_pem()).ok().map(|i| i.not_after),
            })
            .map_err(Clone::clone)
    });
    if let (Some(c), Some(Ok(new))) = (begun, &new) {
        gather(ctx, stats, c, &base, new, now, &mut ev);
    }
    let Some(d) = carotation::step(spec, current, &ev, now) else {
        return Ok(false);
    };
    if d.promote {
        let Some(Ok(new)) = &new else {
            return Err("the new CA vanished before it could be made weft-ca".into());
        };
        ca::promote(ctx, new)
            .await
            .map_err(|e| format!("making the new root weft-ca: {e}"))?;
        tracing::info!(rotation = %d.status.id, "the new root is now the mesh CA in Secret weft-ca");
    }
    let api: Api<Mesh> = Api::all(ctx.client.clone());
    super::canaries::apply_status_as(
        &api,
        MESH_NAME,
        FIELD_MANAGER,
        mesh.resource_version(),
        json!({ "ca": { "rotation": d.status } }),
    )
    .await
    .map_err(|e| e.to_string())?;
    ctx.metrics.wrote("Mesh", "status");
    if let Some((reason, message, warning)) = d.event {
        if warning {
            tracing::warn!(rotation = %d.status.id, reason, "{message}");
        } else {
            tracing::info!(rotation = %d.status.id, reason, "{message}");
        }
        ctx.event(mesh.as_ref(), warning, reason, "RotateCA", message)
            .await;
    }
    if d.status.phase == CaRotationPhase::Complete && d.status.source.is_none() {
        // The generated root is weft-ca now: its copy goes.
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
        if let Err(e) = secrets.delete(NEXT_SECRET, &DeleteParams::default()).await {
            tracing::warn!(error = %e, "deleting {NEXT_SECRET} after the rotation");
        }
    }
    Ok(true)
}

/// The new CA of a rotation about to begin: the user's, or one the
/// operator generates into [`NEXT_SECRET`] (created once per rotation id;
/// a leftover of an ended rotation is replaced).
async fn prepare(ctx: &Ctx, spec: &CaRotation) -> Result<MeshCa, String> {
    if let Some(source) = &spec.source {
        return ca::read_source(ctx, Some(source), &spec.id).await;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let at = format!("Secret {}/{NEXT_SECRET}", ctx.control_namespace);
    let found = api
        .get_opt(NEXT_SECRET)
        .await
        .map_err(|e| format!("reading {at}: {e}"))?;
    if found
        .as_ref()
        .is_some_and(|s| s.annotations().get(ROTATION_ANNOTATION) == Some(&spec.id))
    {
        return ca::read_source(ctx, None, &spec.id).await;
    }
    let trust_domain = ctx.snapshot.load().mesh.trust_domain.clone();
    let new = MeshCa::generate(&trust_domain, SystemTime::now(), CA_LIFETIME)
        .map_err(|e| format!("generating the new root: {e}"))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(NEXT_SECRET.into()),
            namespace: Some(ctx.control_namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                ROTATION_ANNOTATION.to_owned(),
                spec.id.clone(),
            )])),
            resource_version: found.as_ref().and_then(|s| s.resource_version()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(ca::secret_data(&new)),
        ..Secret::default()
    };
    let written = match found {
        // Over the version read: a replica that got there first wins,
        // and its root is read next look.
        Some(_) => {
            api.replace(NEXT_SECRET, &PostParams::default(), &secret)
                .await
        }
        None => api.create(&PostParams::default(), &secret).await,
    };
    written.map_err(|e| format!("writing {at}: {e}"))?;
    ctx.metrics.wrote("Secret", "create");
    tracing::info!(rotation = %spec.id, "generated the new root in {at}");
    Ok(new)
}

/// The evidence of the rotation `c` under way, from `old` (weft-ca) to
/// `new`.
fn gather(
    ctx: &Ctx,
    stats: &SharedStats,
    c: &CaRotationStatus,
    old: &MeshCa,
    new: &MeshCa,
    now: SystemTime,
    ev: &mut Evidence,
) {
    ev.roots = Roots {
        old: c.old_root.clone(),
        new: c.new_root.clone(),
        both: bundle_hash(&bundle_of(&[old.anchor_pem(), new.anchor_pem()])),
        new_only: bundle_hash(&bundle_of(&[new.anchor_pem()])),
    };
    let since = SystemTime::from(c.since.0);
    let ticks = crate::proxy::resilience::lock(stats).since(since);
    read_ticks(&ticks, ev);
    let phase = match c.phase {
        CaRotationPhase::Blocked => c.blocked_in.unwrap_or(CaRotationPhase::AddingRoot),
        p => p,
    };
    if matches!(
        phase,
        CaRotationPhase::Reissuing | CaRotationPhase::Reverting
    ) {
        let both = bundle_of(&[old.anchor_pem(), new.anchor_pem()]);
        for s in ctx.world.secrets.state() {
            let name = s.name_any();
            if !name.starts_with(IDENTITY_SECRET_PREFIX)
                || s.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY)
            {
                continue;
            }
            let root = super::desired::secret_text(&s)
                .get(TLS_CERT_KEY)
                .and_then(|cert| root_of(cert, &both, now));
            ev.secrets.insert(
                format!("{}/{name}", s.namespace().unwrap_or_default()),
                root,
            );
        }
    }
}

/// What the ticks since the phase began say: the latest one's proxies,
/// and every `unknown-ca` refusal in any of them.
pub fn read_ticks(ticks: &[Arc<Tick>], ev: &mut Evidence) {
    ev.read = !ticks.is_empty();
    if let Some(latest) = ticks.first() {
        for ((ns, pod), id) in &latest.identities {
            ev.proxies.insert(format!("{ns}/{pod}"), Some(id.clone()));
        }
        for (ns, pod) in &latest.unreadable_pods {
            ev.proxies.insert(format!("{ns}/{pod}"), None);
        }
    }
    for t in ticks {
        for (k, v) in &t.counts.rejections {
            if k.reason == UNKNOWN_CA && *v > 0.0 {
                *ev.unknown_ca
                    .entry(format!("{}/{} ({})", k.pod.0, k.pod.1, k.direction))
                    .or_default() += *v as u64;
            }
        }
    }
}
