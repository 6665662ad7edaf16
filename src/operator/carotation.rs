//! The rotation of the mesh root, as a pure state machine: given the
//! Mesh's `spec.ca.rotation`, where the rotation stands (its status) and
//! what the proxies and identity Secrets show, [`step`] says where it goes
//! next and why. No I/O: the loop in `carotations.rs` gathers the
//! evidence and writes the decision into `status.ca.rotation`; the CA
//! ([`super::ca`]) reads the phase back from there to know which root
//! issues and which roots the bundles hold ([`plan_of`]). Nothing decided
//! lives only in memory: a restarted operator goes on from the status.
//!
//! ```text
//!  AddingRoot --> Reissuing --> Presenting --> RemovingOld --> Complete
//!   bundle old+new  issuer new    (every proxy    bundle new     weft-ca := new
//!   issuer old                     presents new)
//!      |              |             |
//!      | Abort        +-- Abort ----+--> Reverting --> Aborted
//!      v                                 issuer old     bundle old
//!   Aborted                              bundle old+new
//!
//!  any phase but the last two --(unknown-ca, gate timeout, root unreadable)--> Blocked
//!  Blocked --(spec.ca.rotation.retry raised)--> the phase it stopped in, from the start
//! ```
//!
//! - Each gate is read from the proxies (the bundle hash each reports and
//!   the root its own certificate chains to) or from the identity Secrets
//!   (the root each leaf chains to), over a reading of the proxies taken
//!   wholly after the phase began: an unreadable proxy is waited on, never
//!   passed over.
//! - Any TLS rejection `unknown-ca` counted by any proxy while a phase is
//!   under way stops the rotation (Blocked) and names who refused, paused
//!   or not: a pause stops the rotation moving, never its eyes.
//! - A phase that waits longer than `gateTimeout` is Blocked, naming the
//!   proxies or Secrets it waits on (a pause does not time out).
//! - Abort is refused once the old root is being removed: some bundles
//!   may already hold only the new root, so going back would break them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{CaRotation, CaRotationPhase, CaRotationStatus, RotationAction};
use crate::meshstats::ProxyIdentity;

/// Event reasons.
pub mod reason {
    pub const STARTED: &str = "CARotationStarted";
    pub const ADVANCED: &str = "CARotationAdvanced";
    pub const COMPLETE: &str = "CARotationComplete";
    pub const BLOCKED: &str = "CARotationBlocked";
    pub const RETRIED: &str = "CARotationRetried";
    pub const REVERTING: &str = "CARotationReverting";
    pub const RESUMED: &str = "CARotationResumed";
    pub const ABORTED: &str = "CARotationAborted";
}

/// How many names a status or Event carries.
pub const MAX_NAMES: usize = 20;

/// How long Reverting waits, once every identity Secret is back on the
/// old root, before it believes the proxies. Its evidence (a proxy
/// presenting the old root) also held before any proxy took a new-root
/// certificate, so a proxy whose kubelet brings the new-root Secret late
/// would pass for reverted: this covers the kubelet's sync period (1 min
/// by default) and its Secret cache.
pub const REVERT_SETTLE: Duration = Duration::from_secs(150);

/// The rejection reasons that stop a rotation: a peer's chain that
/// reaches no trusted root (`unknown-ca`), or whose intermediate is not
/// valid (yet, or any more) or forbids the use (`not-yet-valid`,
/// `expired`, `bad-certificate`): what a rotation can cause.
pub const BLOCKING_REASONS: [&str; 4] =
    ["unknown-ca", "not-yet-valid", "bad-certificate", "expired"];

/// Which root issues the workload certificates, and which roots every
/// trust bundle holds, in a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub issuer: Root,
    pub bundle: &'static [Root],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    Old,
    New,
}

/// The phase a rotation is in, a Blocked one by the phase it stopped in.
pub fn stage(status: &CaRotationStatus) -> CaRotationPhase {
    match status.phase {
        CaRotationPhase::Blocked => status.blocked_in.unwrap_or(CaRotationPhase::AddingRoot),
        p => p,
    }
}

/// What a rotation in `status` puts in force. A Blocked rotation holds
/// the plan of the phase it stopped in: being stopped changes nothing.
pub fn plan_of(status: &CaRotationStatus) -> Plan {
    use CaRotationPhase::*;
    use Root::*;
    let phase = match status.phase {
        Blocked => status.blocked_in.unwrap_or(AddingRoot),
        p => p,
    };
    match phase {
        AddingRoot | Reverting | Blocked => Plan {
            issuer: Old,
            bundle: &[Old, New],
        },
        Reissuing | Presenting => Plan {
            issuer: New,
            bundle: &[Old, New],
        },
        RemovingOld | Complete => Plan {
            issuer: New,
            bundle: &[New],
        },
        Aborted => Plan {
            issuer: Old,
            bundle: &[Old],
        },
    }
}

/// The roots of a rotation as the proxies name them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roots {
    /// Fingerprints ([`crate::identity::fingerprint`]).
    pub old: String,
    pub new: String,
    /// Bundle hashes ([`crate::identity::bundle_hash`]) of the bundles
    /// the plans write: both roots, the new alone.
    pub both: String,
    pub new_only: String,
}

/// The new root a rotation starts with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewRoot {
    pub fingerprint: String,
    /// Its certificate (PEM).
    pub certificate: String,
    pub expires: Option<SystemTime>,
}

/// Everything [`step`] decides on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The fingerprint of the root in `weft-ca` (the old one while a
    /// rotation runs; the new one once it was promoted).
    pub base_root: String,
    /// The new root: for a rotation to start, or the one under way (which
    /// must be the one it began with). Err says why it cannot be used.
    pub new_root: Option<Result<NewRoot, String>>,
    /// The hashes and fingerprints of the rotation under way.
    pub roots: Roots,
    /// False until the proxies were read wholly after the phase began:
    /// nothing read before says anything of it.
    pub read: bool,
    /// Every proxy of the latest reading, as `namespace/pod`: what it
    /// says of its identity, None when it could not be read.
    pub proxies: BTreeMap<String, Option<ProxyIdentity>>,
    /// Every workload identity Secret, as `namespace/name`: the
    /// fingerprint of the root its certificate chains to, None when
    /// neither (or it holds none).
    pub secrets: BTreeMap<String, Option<String>>,
    /// Handshakes refused for one of the [`BLOCKING_REASONS`] since the
    /// phase began, by `namespace/pod (direction reason)`.
    pub refused: BTreeMap<String, u64>,
}

/// What [`step`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: CaRotationStatus,
    /// Make the new root `weft-ca` before the status is written (the step
    /// into Complete).
    pub promote: bool,
    /// An Event: reason, message, and whether it is a warning.
    pub event: Option<(&'static str, String, bool)>,
}

pub(crate) fn time(t: SystemTime) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::try_from(t)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn system(t: &Time) -> SystemTime {
    SystemTime::from(t.0)
}

/// Names, at most [`MAX_NAMES`], and how many more there were.
fn names<'a>(all: impl IntoIterator<Item = &'a String>) -> (Vec<String>, String) {
    let all: Vec<&String> = all.into_iter().collect();
    let shown: Vec<String> = all.iter().take(MAX_NAMES).map(|s| (*s).clone()).collect();
    let more = if all.len() > MAX_NAMES {
        format!(" and {} more", all.len() - MAX_NAMES)
    } else {
        String::new()
    };
    (shown, more)
}

/// Where the rotation goes from `current` (None: none ever ran), as
/// asked by `spec` (None: no rotation asked for), at `now`. None when
/// nothing is to be written.
pub fn step(
    spec: Option<&CaRotation>,
    current: Option<&CaRotationStatus>,
    ev: &Evidence,
    now: SystemTime,
) -> Option<Decision> {
    let under_way = current.filter(|c| !c.phase.ended());
    let Some(cur) = under_way else {
        // Nothing under way: a new id starts a rotation.
        let spec = spec?;
        if current.is_some_and(|c| c.id == spec.id) {
            return None;
        }
        return Some(start(spec, current, ev, now));
    };
    let mut next = cur.clone();
    let mut event = None;
    let mut promote = false;
    let same = spec.filter(|s| s.id == cur.id);
    let phase = |s: &CaRotationStatus| match s.phase {
        CaRotationPhase::Blocked => s.blocked_in.unwrap_or(CaRotationPhase::AddingRoot),
        p => p,
    };

    // A rotation that never began (its new root could not be read) begins
    // as soon as it can: nothing was changed yet.
    if cur.new_root.is_empty() {
        let d = start(spec?, Some(cur), ev, now);
        return (d.status != *cur || d.event.is_some()).then_some(d);
    }

    let stage = phase(cur);
    // weft-ca must hold the old root until the rotation makes the new one
    // weft-ca at its very end; anything else there (a restore, a hand
    // edit) would change every bundle under the proxies.
    let base_trouble = if ev.base_root == cur.new_root && stage != CaRotationPhase::RemovingOld {
        Some(format!(
            "Secret weft-ca holds the new root {} while proxies may still present the old \
             root {}: put the old root back in weft-ca",
            cur.new_root, cur.old_root
        ))
    } else if ev.base_root != cur.new_root && ev.base_root != cur.old_root {
        Some(format!(
            "Secret weft-ca holds root {}, neither the old root {} nor the new root {} of the \
             rotation: put the old root back in weft-ca",
            ev.base_root, cur.old_root, cur.new_root
        ))
    } else {
        None
    };

    // The new root was made weft-ca, the status not yet written: done.
    if ev.base_root == cur.new_root && base_trouble.is_none() {
        next.phase = CaRotationPhase::Complete;
        next.blocked_in = None;
        next.since = time(now);
        next.waiting_on.clear();
        next.message = format!("the mesh root is {} (rotation {})", cur.new_root, cur.id);
        return Some(Decision {
            event: Some((reason::COMPLETE, next.message.clone(), false)),
            status: next,
            promote: false,
        });
    }

    // Released on a raised retry.
    if let Some(spec) = same
        && spec.retry > cur.retry
    {
        next.retry = spec.retry;
        if cur.phase == CaRotationPhase::Blocked {
            next.phase = phase(cur);
            next.blocked_in = None;
            next.since = time(now);
            next.waiting_on.clear();
            next.secrets_back_since = None;
            next.message = format!("retried: {:?} starts over", next.phase);
            // What was gathered was for the phase as it stood: the next
            // look reads it afresh.
            return Some(Decision {
                event: Some((reason::RETRIED, next.message.clone(), false)),
                status: next,
                promote: false,
            });
        }
    }

    // The new root must stay the one the rotation began with.
    let root_trouble = match &ev.new_root {
        Some(Ok(r)) if r.fingerprint == cur.new_root => None,
        Some(Ok(r)) => Some(format!(
            "the new root's source now holds root {}, not {} that the rotation began with; \
             put it back, or abort",
            r.fingerprint, cur.new_root
        )),
        Some(Err(why)) => Some(why.clone()),
        None => Some("the new root is not known".to_owned()),
    };

    let action = match same {
        Some(s) => s.action,
        None => RotationAction::Pause,
    };
    // Resumed after a pause: the phase starts over, so the pause does not
    // count towards its timeout (and what was gathered was for before).
    if cur.paused && action != RotationAction::Pause {
        next.paused = false;
        next.since = time(now);
        next.waiting_on.clear();
        next.message = format!("resumed: {:?} starts over", phase(cur));
        return Some(Decision {
            event: Some((reason::RESUMED, next.message.clone(), false)),
            status: next,
            promote: false,
        });
    }
    next.paused = action == RotationAction::Pause;
    let mut note = match spec {
        Some(s) if s.id != cur.id => format!(
            "; spec.ca.rotation.id is {} but rotation {} is under way: it stays where it is \
             until the id is set back (to go on or abort it)",
            s.id, cur.id
        ),
        None => format!(
            "; spec.ca.rotation is gone while rotation {} is under way: it stays where it is \
             until it is set back",
            cur.id
        ),
        _ => String::new(),
    };

    // Abort.
    if action == RotationAction::Abort {
        match phase(&next) {
            CaRotationPhase::AddingRoot => {
                // No certificate came from the new root: it can leave the
                // bundles at once.
                next.phase = CaRotationPhase::Aborted;
                next.blocked_in = None;
                next.since = time(now);
                next.waiting_on.clear();
                next.message = format!(
                    "aborted while adding root {}: no certificate was issued from it, so it \
                     leaves every bundle now",
                    cur.new_root
                );
                return Some(Decision {
                    event: Some((reason::ABORTED, next.message.clone(), true)),
                    status: next,
                    promote: false,
                });
            }
            CaRotationPhase::Reissuing | CaRotationPhase::Presenting => {
                next.phase = CaRotationPhase::Reverting;
                next.blocked_in = None;
                next.since = time(now);
                next.waiting_on.clear();
                next.message = format!(
                    "aborting: certificates are issued from the old root {} again; root {} \
                     stays trusted until no proxy presents it",
                    cur.old_root, cur.new_root
                );
                return Some(Decision {
                    event: Some((reason::REVERTING, next.message.clone(), true)),
                    status: next,
                    promote: false,
                });
            }
            CaRotationPhase::RemovingOld => {
                note.push_str(
                    "; abort refused: the old root is already leaving the bundles, so going \
                     back would break the proxies that took them; let the rotation complete \
                     and rotate again",
                );
            }
            _ => {}
        }
    }

    let finish =
        |mut next: CaRotationStatus, event: Option<(&'static str, String, bool)>, promote: bool| {
            (next != *cur || event.is_some()).then(|| {
                next.message = next.message.trim().to_owned();
                Decision {
                    status: next,
                    promote,
                    event,
                }
            })
        };

    if next.phase == CaRotationPhase::Blocked {
        return finish(next, event, promote);
    }

    let block = |next: &mut CaRotationStatus, message: String, who: Vec<String>| {
        next.blocked_in = Some(next.phase);
        next.phase = CaRotationPhase::Blocked;
        next.since = time(now);
        next.secrets_back_since = None;
        next.message = message;
        next.waiting_on = who;
        Some((reason::BLOCKED, next.message.clone(), true))
    };

    if let Some(why) = base_trouble {
        let message = format!(
            "blocked in {:?}: {why}; then raise spec.ca.rotation.retry",
            next.phase
        );
        event = block(&mut next, message, Vec::new());
        return finish(next, event, promote);
    }

    // Reverting issues from the old root and needs only the new root's
    // certificate (in the status) for the bundles.
    let root_trouble = root_trouble.filter(|_| {
        next.phase != CaRotationPhase::Reverting || cur.new_root_certificate.is_empty()
    });
    if let Some(why) = root_trouble {
        let message = format!(
            "blocked in {:?}: {why}; then raise spec.ca.rotation.retry",
            next.phase
        );
        event = block(&mut next, message, Vec::new());
        return finish(next, event, promote);
    }

    if !ev.refused.is_empty() {
        let total: u64 = ev.refused.values().sum();
        let (who, more) = names(ev.refused.keys());
        let message = format!(
            "blocked in {:?}: {total} TLS handshakes were refused (unknown-ca, not-yet-valid, \
             expired or bad-certificate), by {}{more}. A proxy presents a certificate from a root its peer \
             does not trust yet, or one its peer cannot use: find it (its bundle hash is not \
             the others'), fix it, then raise spec.ca.rotation.retry",
            next.phase,
            who.join(", ")
        );
        event = block(&mut next, message, who);
        return finish(next, event, promote);
    }

    let (mut passed, mut waiting, mut what) = gate(next.phase, ev);
    let since = system(&next.since);
    let waited = now.duration_since(since).unwrap_or_default();
    if next.phase == CaRotationPhase::Reverting {
        let secrets_back = ev.read
            && ev
                .secrets
                .values()
                .all(|r| r.as_deref() == Some(ev.roots.old.as_str()));
        if !secrets_back {
            next.secrets_back_since = None;
        } else if next.secrets_back_since.is_none() {
            next.secrets_back_since = Some(time(now));
        }
        let settled = next
            .secrets_back_since
            .as_ref()
            .is_some_and(|t| now.duration_since(system(t)).unwrap_or_default() >= REVERT_SETTLE);
        if passed && !settled {
            passed = false;
            waiting = Vec::new();
            what = format!(
                "every identity Secret and proxy is back on the old root; the proxies are judged \
                 again {}s after the Secrets were, for kubelets that bring a Secret late",
                REVERT_SETTLE.as_secs()
            );
        }
    }
    let timeout = same.map_or(Duration::MAX, |s| s.gate_timeout.as_std());
    // Abort moves on too: through Reverting, or on past a refusal.
    let moving = action != RotationAction::Pause;
    if passed && moving {
        let to = match next.phase {
            CaRotationPhase::AddingRoot => CaRotationPhase::Reissuing,
            CaRotationPhase::Reissuing => CaRotationPhase::Presenting,
            CaRotationPhase::Presenting => CaRotationPhase::RemovingOld,
            CaRotationPhase::RemovingOld => CaRotationPhase::Complete,
            CaRotationPhase::Reverting => CaRotationPhase::Aborted,
            other => other,
        };
        let from = next.phase;
        next.phase = to;
        next.since = time(now);
        next.waiting_on.clear();
        next.secrets_back_since = None;
        next.message = match to {
            CaRotationPhase::Reissuing => {
                "every proxy trusts both roots: issuing every certificate from the new one".into()
            }
            CaRotationPhase::Presenting => {
                "every identity Secret holds a certificate from the new root: waiting for every \
                 proxy to present it"
                    .into()
            }
            CaRotationPhase::RemovingOld => format!(
                "every proxy presents the new root: removing the old root {} from the bundles",
                cur.old_root
            ),
            CaRotationPhase::Complete => {
                promote = true;
                format!("the mesh root is {} (rotation {})", cur.new_root, cur.id)
            }
            CaRotationPhase::Aborted => format!(
                "every proxy presents the old root again: root {} leaves the bundles",
                cur.new_root
            ),
            _ => String::new(),
        };
        let r = match to {
            CaRotationPhase::Complete => reason::COMPLETE,
            CaRotationPhase::Aborted => reason::ABORTED,
            _ => reason::ADVANCED,
        };
        event = Some((r, format!("{from:?} -> {to:?}: {}", next.message), false));
        return finish(next, event, promote);
    }
    if !passed && moving && waited > timeout && !waiting.is_empty() {
        let (who, more) = names(&waiting);
        let message = format!(
            "blocked in {:?}: the gate was not met within gateTimeout ({}s): {what}, by {}{more}; \
             fix them, then raise spec.ca.rotation.retry",
            next.phase,
            timeout.as_secs(),
            who.join(", ")
        );
        event = block(&mut next, message, who);
        return finish(next, event, promote);
    }
    let (who, more) = names(&waiting);
    let paused = if action == RotationAction::Pause && same.is_some() {
        "paused (spec.ca.rotation.action: Pause); "
    } else {
        ""
    };
    next.message = if passed {
        format!("{paused}the gate is met{note}")
    } else {
        format!("{paused}waiting: {what}{more}{note}")
    };
    next.waiting_on = who;
    finish(next, event, promote)
}

/// Whether `phase`'s gate is met; if not, who it waits on and what for.
fn gate(phase: CaRotationPhase, ev: &Evidence) -> (bool, Vec<String>, String) {
    if !ev.read {
        return (
            false,
            Vec::new(),
            "no reading of the proxies since the phase began yet".into(),
        );
    }
    let proxies = |want: &dyn Fn(&ProxyIdentity) -> bool| -> Vec<String> {
        ev.proxies
            .iter()
            .filter(|(_, id)| !id.as_ref().is_some_and(want))
            .map(|(pod, id)| match id {
                None => format!("{pod} (unreadable)"),
                Some(_) => pod.clone(),
            })
            .collect()
    };
    let secrets = |root: &str| -> Vec<String> {
        ev.secrets
            .iter()
            .filter(|(_, r)| r.as_deref() != Some(root))
            .map(|(name, _)| name.clone())
            .collect()
    };
    let r = &ev.roots;
    let (waiting, what) = match phase {
        CaRotationPhase::AddingRoot => (
            proxies(&|p| p.bundle.as_deref() == Some(r.both.as_str())),
            format!(
                "proxies that do not yet report the two-root bundle {}",
                r.both
            ),
        ),
        CaRotationPhase::Reissuing => (
            secrets(&r.new),
            format!("identity Secrets without a certificate from root {}", r.new),
        ),
        CaRotationPhase::Presenting => (
            proxies(&|p| p.root.as_deref() == Some(r.new.as_str())),
            format!(
                "proxies that do not yet present a certificate from root {}",
                r.new
            ),
        ),
        CaRotationPhase::RemovingOld => (
            proxies(&|p| p.bundle.as_deref() == Some(r.new_only.as_str())),
            format!(
                "proxies that do not yet report the new-root bundle {}",
                r.new_only
            ),
        ),
        CaRotationPhase::Reverting => {
            let mut w = secrets(&r.old);
            w.extend(proxies(&|p| p.root.as_deref() == Some(r.old.as_str())));
            (
                w,
                format!(
                    "identity Secrets and proxies not yet back on a certificate from root {}",
                    r.old
                ),
            )
        }
        CaRotationPhase::Complete | CaRotationPhase::Aborted | CaRotationPhase::Blocked => {
            (Vec::new(), String::new())
        }
    };
    (waiting.is_empty(), waiting, what)
}

/// A new rotation, or why it cannot begin yet.
fn start(
    spec: &CaRotation,
    previous: Option<&CaRotationStatus>,
    ev: &Evidence,
    now: SystemTime,
) -> Decision {
    let mut status = CaRotationStatus {
        id: spec.id.clone(),
        phase: CaRotationPhase::AddingRoot,
        since: time(now),
        blocked_in: None,
        retry: spec.retry,
        message: String::new(),
        waiting_on: Vec::new(),
        old_root: ev.base_root.clone(),
        new_root: String::new(),
        new_root_certificate: String::new(),
        new_root_expires: None,
        paused: false,
        secrets_back_since: None,
        source: spec.source.clone(),
    };
    let not_yet = |mut status: CaRotationStatus, why: String| {
        status.blocked_in = Some(CaRotationPhase::AddingRoot);
        status.phase = CaRotationPhase::Blocked;
        status.message = format!("rotation {} has not begun: {why}", spec.id);
        // Said once, not on every look.
        let said = previous.is_some_and(|p| p.id == spec.id && p.message == status.message);
        if let Some(p) = previous.filter(|p| p.id == spec.id) {
            status.since = p.since.clone();
        }
        let warning = spec.action != RotationAction::Pause;
        Decision {
            event: (!said).then(|| (reason::BLOCKED, status.message.clone(), warning)),
            status,
            promote: false,
        }
    };
    match &ev.new_root {
        _ if spec.action == RotationAction::Abort => {
            status.phase = CaRotationPhase::Aborted;
            status.message = format!("rotation {} was aborted before it began", spec.id);
            Decision {
                event: Some((reason::ABORTED, status.message.clone(), false)),
                status,
                promote: false,
            }
        }
        _ if spec.action == RotationAction::Pause => not_yet(
            status,
            "it is paused (spec.ca.rotation.action: Pause); set Proceed to begin".into(),
        ),
        Some(Ok(new)) if new.fingerprint == ev.base_root => not_yet(
            status,
            format!(
                "the source holds root {}, the root in force already; give it a new root",
                new.fingerprint
            ),
        ),
        Some(Ok(new)) => {
            status.new_root = new.fingerprint.clone();
            status.new_root_certificate = new.certificate.clone();
            status.new_root_expires = new.expires.map(time);
            status.message = format!(
                "adding root {} to every trust bundle next to {}",
                new.fingerprint, ev.base_root
            );
            Decision {
                event: Some((reason::STARTED, status.message.clone(), false)),
                status,
                promote: false,
            }
        }
        Some(Err(why)) => not_yet(status, why.clone()),
        None => not_yet(status, "the new root is not ready yet".into()),
    }
}

#[cfg(test)]
mod tests;
