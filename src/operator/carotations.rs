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

use super::ca::{
    self, Marker, NEXT_SECRET, ROTATION_ANNOTATION, ROTATION_OLD_ROOT_ANNOTATION,
    ROTATION_PHASE_ANNOTATION,
};
use super::carotation::{self, Evidence, NewRoot, Roots};
use super::desired::{MANAGED_BY, MANAGED_BY_LABEL};
use super::reconcile::Ctx;
use crate::api::{CaRotation, CaRotationPhase, CaRotationStatus, MESH_NAME, Mesh};
use crate::identity::{
    CA_LIFETIME, MeshCa, TLS_CERT_KEY, bundle_hash, bundle_of, fingerprint, inspect_pem, root_of,
};
use crate::meshstats::{Latest, SharedStats, Tick};

/// The field manager of `status.ca`.
pub const FIELD_MANAGER: &str = "weft-ca-rotation";

/// Looks at the rotation every `every` until the task is aborted (the
/// lease lost, or shutdown); `all` asks for every namespace to be
/// reconciled (the CA in force changed). While a rotation is under way
/// the CA is re-read on every look, so a plan stored from an older
/// status (the CA watch racing a phase change) stands for one look at
/// most.
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
                Err(e) => tracing::warn!(error = %e, "reading the mesh CA during a rotation"),
            },
            Err(e) => tracing::warn!(error = %e, "CA rotation: nothing written"),
        }
    }
}

/// One look; true while a rotation is under way (or was just written).
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
    let begun = under_way.filter(|c| !c.new_root.is_empty());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let next_secret = secrets
        .get_opt(NEXT_SECRET)
        .await
        .map_err(|e| format!("reading {NEXT_SECRET}: {e}"))?;
    let marker = next_secret.as_ref().and_then(Marker::of);
    let ended_here = |m: &Marker| current.is_some_and(|c| c.id == m.id && c.phase.ended());

    // A rotation that issued from its new root, which the status no
    // longer shows (whatever the spec says now): written back as Blocked
    // where it stood, once; the CA mints nothing meanwhile.
    if let Some(m) = marker.as_ref().filter(|m| m.issued() && !ended_here(m))
        && begun.is_none()
    {
        let lost = lost_status(m, next_secret.as_ref(), spec, SystemTime::now());
        if write(ctx, &mesh, &lost, None).await? {
            tracing::warn!(rotation = %m.id, "{}", lost.message);
            ctx.event(
                mesh.as_ref(),
                true,
                carotation::reason::BLOCKED,
                "RotateCA",
                lost.message,
            )
            .await;
        }
        return Ok(true);
    }
    // The copy of an ended rotation's new root goes (its deletion may
    // have failed when it ended).
    if marker.as_ref().is_some_and(ended_here) {
        delete_next(ctx).await;
        return Ok(false);
    }
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
    let new = match (begun, spec) {
        (Some(c), _) => Some(
            next_secret
                .as_ref()
                .ok_or_else(|| {
                    format!(
                        "Secret {}/{NEXT_SECRET} is not there",
                        ctx.control_namespace
                    )
                })
                .and_then(|s| ca::next_material(s, &c.id)),
        ),
        (None, Some(s)) if s.action == crate::api::RotationAction::Proceed => {
            Some(prepare(ctx, s, next_secret.as_ref(), &ev.base_root).await)
        }
        (None, _) => None,
    };
    ev.new_root = new.as_ref().map(|r| {
        r.as_ref()
            .map(|ca| NewRoot {
                fingerprint: fingerprint(ca.anchor_pem()).unwrap_or_default(),
                certificate: ca.anchor_pem().to_owned(),
                expires: inspect_pem(ca.anchor_pem()).ok().map(|i| i.not_after),
            })
            .map_err(Clone::clone)
    });
    if let Some(c) = begun {
        gather(ctx, stats, c, &base, now, &mut ev);
    }
    let Some(d) = carotation::step(spec, current, &ev, now) else {
        return Ok(begun.is_some());
    };
    if d.promote {
        let Some(Ok(new)) = &new else {
            return Err("the new CA cannot be read to make it weft-ca".into());
        };
        ca::promote(ctx, new, &d.status.old_root)
            .await
            .map_err(|e| format!("making the new root weft-ca: {e}"))?;
        tracing::info!(rotation = %d.status.id, "the new root is now the mesh CA in Secret weft-ca");
    }
    if !write(ctx, &mesh, &d.status, next_secret.as_ref()).await? {
        return Ok(begun.is_some());
    }
    if let Some((reason, message, warning)) = d.event {
        if warning {
            tracing::warn!(rotation = %d.status.id, reason, "{message}");
        } else {
            tracing::info!(rotation = %d.status.id, reason, "{message}");
        }
        ctx.event(mesh.as_ref(), warning, reason, "RotateCA", message)
            .await;
    }
    if d.status.phase.ended() {
        delete_next(ctx).await;
    }
    Ok(true)
}

/// Writes `status` as the rotation's, over the version of the Mesh read;
/// first the phase onto the new root's copy (`next`), so a status lost
/// later still tells where the rotation stood. False on a 409 (the Mesh
/// changed since the cache showed it: looked at again next tick).
async fn write(
    ctx: &Ctx,
    mesh: &Mesh,
    status: &CaRotationStatus,
    next: Option<&Secret>,
) -> Result<bool, String> {
    if let Some(next) = next
        && !status.new_root.is_empty()
        && Marker::of(next).is_some_and(|m| m.id == status.id)
    {
        let phase = carotation::stage(status);
        let want = serde_json::to_value(phase).map_err(|e| e.to_string())?;
        if next
            .annotations()
            .get(ROTATION_PHASE_ANNOTATION)
            .map(String::as_str)
            != want.as_str()
        {
            // An update over the version read: a copy changed meanwhile
            // is looked at again.
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
            let mut marked = next.clone();
            let a = marked
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new);
            a.insert(
                ROTATION_PHASE_ANNOTATION.to_owned(),
                want.as_str().unwrap_or_default().to_owned(),
            );
            a.insert(
                ROTATION_OLD_ROOT_ANNOTATION.to_owned(),
                status.old_root.clone(),
            );
            secrets
                .replace(NEXT_SECRET, &PostParams::default(), &marked)
                .await
                .map_err(|e| format!("marking {NEXT_SECRET} with the phase: {e}"))?;
            ctx.metrics.wrote("Secret", "update");
        }
    }
    let api: Api<Mesh> = Api::all(ctx.client.clone());
    match super::canaries::apply_status_as(
        &api,
        MESH_NAME,
        FIELD_MANAGER,
        mesh.resource_version(),
        json!({ "ca": { "rotation": status } }),
    )
    .await
    {
        Ok(()) => {
            ctx.metrics.wrote("Mesh", "status");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(
                "CA rotation: the Mesh changed since the cache showed it; looked at again next tick"
            );
            Ok(false)
        }
        Err(e) => Err(format!("writing the Mesh's status.ca: {e}")),
    }
}

/// A rotation's status rebuilt from the marks on its new root's copy
/// (its root read without its key). A retry already in the spec for this
/// id does not count: the next raise does.
fn lost_status(
    m: &Marker,
    next: Option<&Secret>,
    spec: Option<&CaRotation>,
    now: SystemTime,
) -> CaRotationStatus {
    let root = next.and_then(ca::next_root).unwrap_or_default();
    CaRotationStatus {
        id: m.id.clone(),
        phase: CaRotationPhase::Blocked,
        since: carotation::time(now),
        blocked_in: Some(m.phase),
        retry: spec.filter(|s| s.id == m.id).map_or(0, |s| s.retry),
        message: format!(
            "the status of rotation {} was lost while it was in {:?} (the Mesh replaced, or \
             restored without its status); rebuilt from Secret {NEXT_SECRET}, and nothing \
             was issued while it was lost. Set spec.ca.rotation.id to {} and raise its retry to go on from \
             {:?}, or abort it",
            m.id, m.phase, m.id, m.phase
        ),
        waiting_on: Vec::new(),
        old_root: m.old_root.clone(),
        new_root: fingerprint(&root).unwrap_or_default(),
        new_root_certificate: root,
        new_root_expires: None,
        paused: false,
        secrets_back_since: None,
        source: None,
    }
}

async fn delete_next(ctx: &Ctx) {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    match secrets.delete(NEXT_SECRET, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.metrics.wrote("Secret", "delete");
            tracing::info!("deleted {NEXT_SECRET}: its rotation ended");
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => tracing::warn!(error = %e, "deleting {NEXT_SECRET} after its rotation ended"),
    }
}

/// The new CA of a rotation about to begin, copied into [`NEXT_SECRET`]
/// (the rotation works from the copy, never from a Secret the user may
/// change): the user's, or one the operator generates. A copy already
/// made for this id is used as it is; one of another rotation is
/// replaced only when nothing was issued from it or its rotation ended
/// (read from the API server, not the cache).
async fn prepare(
    ctx: &Ctx,
    spec: &CaRotation,
    existing: Option<&Secret>,
    base_root: &str,
) -> Result<MeshCa, String> {
    let at = format!("Secret {}/{NEXT_SECRET}", ctx.control_namespace);
    let marker = existing.and_then(Marker::of);
    // A CA to rotate to must be able to issue for a good while.
    let ttl = ctx.snapshot.load().mesh.certificates.workload_ttl.as_std();
    let usable = |ca: MeshCa| -> Result<MeshCa, String> {
        ca.usable_for(SystemTime::now(), ttl)
            .map_err(|e| format!("the new CA cannot be used: {e}"))?;
        Ok(ca)
    };
    if marker.as_ref().is_some_and(|m| m.id == spec.id) {
        return ca::next_material(existing.expect("marked"), &spec.id).and_then(usable);
    }
    if let Some(m) = marker.as_ref().filter(|m| m.issued()) {
        let meshes: Api<Mesh> = Api::all(ctx.client.clone());
        let fresh = meshes
            .get_opt(MESH_NAME)
            .await
            .map_err(|e| format!("reading the Mesh: {e}"))?
            .and_then(|m| m.status)
            .and_then(|s| s.ca)
            .and_then(|c| c.rotation);
        if !fresh.is_some_and(|r| r.id == m.id && r.phase.ended()) {
            return Err(format!(
                "{at} holds the new root of rotation {}, which reached {:?} and has not ended",
                m.id, m.phase
            ));
        }
    }
    let new = match &spec.source {
        Some(source) => usable(ca::read_source(ctx, source).await?)?,
        None => {
            let trust_domain = ctx.snapshot.load().mesh.trust_domain.clone();
            MeshCa::generate(&trust_domain, SystemTime::now(), CA_LIFETIME)
                .map_err(|e| format!("generating the new root: {e}"))?
        }
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(NEXT_SECRET.into()),
            namespace: Some(ctx.control_namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (ROTATION_ANNOTATION.to_owned(), spec.id.clone()),
                (
                    ROTATION_PHASE_ANNOTATION.to_owned(),
                    "AddingRoot".to_owned(),
                ),
                (
                    ROTATION_OLD_ROOT_ANNOTATION.to_owned(),
                    base_root.to_owned(),
                ),
            ])),
            resource_version: existing.and_then(|s| s.resource_version()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(ca::secret_data(&new)),
        ..Secret::default()
    };
    let written = match existing {
        // Over the version read: a replica that got there first wins,
        // and its copy is read next look.
        Some(_) => {
            secrets
                .replace(NEXT_SECRET, &PostParams::default(), &secret)
                .await
        }
        None => secrets.create(&PostParams::default(), &secret).await,
    };
    written.map_err(|e| format!("writing {at}: {e}"))?;
    ctx.metrics.wrote(
        "Secret",
        if existing.is_some() {
            "update"
        } else {
            "create"
        },
    );
    tracing::info!(rotation = %spec.id, "the new root is in {at}");
    Ok(new)
}

/// The evidence of the rotation `c` under way, from `old` (weft-ca) to
/// its new root.
fn gather(
    ctx: &Ctx,
    stats: &SharedStats,
    c: &CaRotationStatus,
    old: &MeshCa,
    now: SystemTime,
    ev: &mut Evidence,
) {
    let new_root = c.new_root_certificate.as_str();
    let both = bundle_of(&[old.anchor_pem(), new_root]);
    ev.roots = Roots {
        old: c.old_root.clone(),
        new: c.new_root.clone(),
        both: bundle_hash(&both),
        new_only: bundle_hash(&bundle_of(&[new_root])),
    };
    let since = SystemTime::from(c.since.0);
    {
        let stats = crate::proxy::resilience::lock(stats);
        read_ticks(&stats.touching(since), stats.identities(), since, ev);
    }
    if matches!(
        carotation::stage(c),
        CaRotationPhase::Reissuing | CaRotationPhase::Reverting
    ) {
        for (name, cert) in wanted_identities(ctx) {
            ev.secrets
                .insert(name, cert.and_then(|cert| root_of(&cert, &both, now)));
        }
    }
}

/// The identity Secrets the operator keeps, by `namespace/name`, with
/// the certificate each holds: those of the ServiceAccounts of every
/// meshed namespace that is not being deleted (what
/// [`super::desired::secret_names`] names), never a Secret someone else
/// made to look like one. One not there yet is issued from the current
/// issuer when it is made.
fn wanted_identities(ctx: &Ctx) -> Vec<(String, Option<String>)> {
    let snap = ctx.snapshot.load();
    let mut out = Vec::new();
    for ns in snap.compiled.configs.keys() {
        let terminating = ctx
            .world
            .namespaces
            .state()
            .iter()
            .any(|n| n.name_any() == *ns && n.metadata.deletion_timestamp.is_some());
        if terminating {
            continue;
        }
        let mut accounts: Vec<String> = ctx
            .world
            .service_accounts
            .state()
            .iter()
            .filter(|sa| sa.namespace().as_deref() == Some(ns.as_str()))
            .map(|sa| sa.name_any())
            .collect();
        accounts.sort();
        let (named, _) = super::desired::secret_names(&accounts);
        for (_, name) in named {
            let Some(secret) = super::world::World::child(&ctx.world.secrets, ns, &name) else {
                continue;
            };
            let cert = super::desired::secret_text(&secret).remove(TLS_CERT_KEY);
            out.push((format!("{ns}/{name}"), cert));
        }
    }
    out
}

/// What the stats say since the phase began: the latest reading of the
/// proxies, when it was taken wholly after `since`, and every handshake
/// refused for a [`carotation::BLOCKING_REASONS`] in the ticks that touch
/// the phase (one that straddles its start included: a refusal can only
/// hold a rotation back).
pub fn read_ticks(
    ticks: &[Arc<Tick>],
    latest: Option<&Latest>,
    since: SystemTime,
    ev: &mut Evidence,
) {
    if let Some(latest) = latest.filter(|l| l.at >= since) {
        ev.read = true;
        for ((ns, pod), id) in &latest.identities {
            ev.proxies.insert(format!("{ns}/{pod}"), Some(id.clone()));
        }
        for (ns, pod) in &latest.unreadable {
            ev.proxies.insert(format!("{ns}/{pod}"), None);
        }
    }
    for t in ticks {
        for (k, v) in &t.counts.rejections {
            if carotation::BLOCKING_REASONS.contains(&k.reason.as_str()) && *v > 0.0 {
                *ev.refused
                    .entry(format!(
                        "{}/{} ({} {})",
                        k.pod.0, k.pod.1, k.direction, k.reason
                    ))
                    .or_default() += *v as u64;
            }
        }
    }
}
