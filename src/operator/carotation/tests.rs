//! The CA rotation's table: every phase, every gate, block and retry,
//! pause, abort, and a restart (each step reads only the status and the
//! evidence, so an operator that restarted decides the same).

use super::*;
use crate::api::{CaSource, Duration as ApiDuration};
use CaRotationPhase::*;

const OLD: &str = "0ld0ld0ld0ld0ld0";
const NEW: &str = "4e34e34e34e34e34";
const BOTH: &str = "b0b0b0b0b0b0b0b0";
const NEW_ONLY: &str = "n0n0n0n0n0n0n0n0";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn spec() -> CaRotation {
    CaRotation {
        id: "r1".into(),
        action: RotationAction::Proceed,
        retry: 0,
        gate_timeout: ApiDuration::from_secs(30 * 60),
        source: None,
    }
}

fn with(action: RotationAction) -> CaRotation {
    CaRotation { action, ..spec() }
}

fn proxy(bundle: &str, root: &str) -> Option<ProxyIdentity> {
    Some(ProxyIdentity {
        bundle: Some(bundle.into()),
        root: Some(root.into()),
    })
}

/// Evidence of a rotation from OLD to NEW: two proxies, two Secrets,
/// read since the phase began, as they are before anything changed.
fn ev() -> Evidence {
    Evidence {
        base_root: OLD.into(),
        new_root: Some(Ok(NewRoot {
            certificate: String::new(),
            fingerprint: NEW.into(),
            expires: Some(at(10 * 365 * 86400)),
        })),
        roots: Roots {
            old: OLD.into(),
            new: NEW.into(),
            both: BOTH.into(),
            new_only: NEW_ONLY.into(),
        },
        read: true,
        proxies: BTreeMap::from([
            ("shop/cart-1".into(), proxy("oldonly", OLD)),
            ("shop/checkout-1".into(), proxy("oldonly", OLD)),
        ]),
        secrets: BTreeMap::from([
            ("shop/weft-identity-cart".into(), Some(OLD.into())),
            ("shop/weft-identity-checkout".into(), Some(OLD.into())),
        ]),
        refused: BTreeMap::new(),
    }
}

fn all_proxies(ev: &mut Evidence, bundle: &str, root: &str) {
    for p in ev.proxies.values_mut() {
        *p = proxy(bundle, root);
    }
}

fn all_secrets(ev: &mut Evidence, root: &str) {
    for s in ev.secrets.values_mut() {
        *s = Some(root.into());
    }
}

fn started(now: SystemTime) -> CaRotationStatus {
    step(Some(&spec()), None, &ev(), now)
        .expect("a rotation starts")
        .status
}

fn in_phase(phase: CaRotationPhase, since: SystemTime) -> CaRotationStatus {
    CaRotationStatus {
        phase,
        since: time(since),
        ..started(since)
    }
}

#[test]
fn a_rotation_walks_every_phase_on_its_gates_and_promotes_the_new_root_last() {
    // Start: the new root joins every bundle; nothing issues from it.
    let d = step(Some(&spec()), None, &ev(), at(0)).expect("starts");
    assert_eq!(d.status.phase, AddingRoot);
    assert_eq!(
        (d.status.old_root.as_str(), d.status.new_root.as_str()),
        (OLD, NEW)
    );
    assert_eq!(d.event.as_ref().map(|e| e.0), Some(reason::STARTED));
    assert!(!d.promote);
    let s = d.status;
    assert_eq!(
        plan_of(&s),
        Plan {
            issuer: Root::Old,
            bundle: &[Root::Old, Root::New]
        }
    );

    // AddingRoot waits for every proxy to report the two-root bundle.
    let mut e = ev();
    e.proxies.insert("shop/cart-1".into(), proxy(BOTH, OLD));
    let d = step(Some(&spec()), Some(&s), &e, at(60)).expect("says who it waits on");
    assert_eq!(d.status.phase, AddingRoot);
    assert_eq!(d.status.waiting_on, vec!["shop/checkout-1".to_owned()]);
    assert!(d.event.is_none());
    // Nothing new to say: nothing written.
    assert_eq!(step(Some(&spec()), Some(&d.status), &e, at(70)), None);
    all_proxies(&mut e, BOTH, OLD);
    let d = step(Some(&spec()), Some(&d.status), &e, at(80)).expect("advances");
    assert_eq!(d.status.phase, Reissuing);
    assert_eq!(d.status.since, time(at(80)));
    assert_eq!(d.event.as_ref().map(|e| e.0), Some(reason::ADVANCED));
    assert_eq!(plan_of(&d.status).issuer, Root::New);

    // Reissuing waits for every identity Secret to hold a new-root leaf.
    let s = d.status;
    e.secrets
        .insert("shop/weft-identity-cart".into(), Some(NEW.into()));
    let d = step(Some(&spec()), Some(&s), &e, at(90)).expect("waits");
    assert_eq!(d.status.phase, Reissuing);
    assert_eq!(
        d.status.waiting_on,
        vec!["shop/weft-identity-checkout".to_owned()]
    );
    all_secrets(&mut e, NEW);
    let d = step(Some(&spec()), Some(&d.status), &e, at(100)).expect("advances");
    assert_eq!(d.status.phase, Presenting);

    // Presenting waits for every proxy to present the new root.
    let s = d.status;
    let d = step(Some(&spec()), Some(&s), &e, at(110)).expect("waits");
    assert_eq!(d.status.phase, Presenting);
    assert_eq!(d.status.waiting_on.len(), 2);
    all_proxies(&mut e, BOTH, NEW);
    let d = step(Some(&spec()), Some(&d.status), &e, at(120)).expect("advances");
    assert_eq!(d.status.phase, RemovingOld);
    assert_eq!(
        plan_of(&d.status),
        Plan {
            issuer: Root::New,
            bundle: &[Root::New]
        }
    );

    // RemovingOld waits for the new-root bundle, then promotes.
    let s = d.status;
    assert_eq!(
        step(Some(&spec()), Some(&s), &e, at(130)).map(|d| d.status.phase),
        Some(RemovingOld)
    );
    all_proxies(&mut e, NEW_ONLY, NEW);
    let d = step(Some(&spec()), Some(&s), &e, at(140)).expect("completes");
    assert_eq!(d.status.phase, Complete);
    assert!(
        d.promote,
        "the new root becomes weft-ca before the status says Complete"
    );
    assert_eq!(d.event.as_ref().map(|e| e.0), Some(reason::COMPLETE));
    // Over: nothing more, even for the same id.
    assert_eq!(step(Some(&spec()), Some(&d.status), &e, at(150)), None);
}

#[test]
fn no_gate_passes_without_a_reading_taken_after_the_phase_began_or_on_an_unreadable_proxy() {
    let s = started(at(0));
    let mut e = ev();
    all_proxies(&mut e, BOTH, OLD);
    e.read = false;
    let d = step(Some(&spec()), Some(&s), &e, at(30)).expect("says why");
    assert_eq!(d.status.phase, AddingRoot);
    assert!(
        d.status.message.contains("no reading"),
        "{}",
        d.status.message
    );
    e.read = true;
    e.proxies.insert("shop/cart-1".into(), None);
    let d = step(Some(&spec()), Some(&s), &e, at(30)).expect("says why");
    assert_eq!(d.status.phase, AddingRoot);
    assert_eq!(
        d.status.waiting_on,
        vec!["shop/cart-1 (unreadable)".to_owned()]
    );
    // An older proxy that does not say which root it presents is waited on.
    let mut e = ev();
    all_proxies(&mut e, BOTH, NEW);
    e.proxies.insert(
        "shop/cart-1".into(),
        Some(ProxyIdentity {
            bundle: Some(BOTH.into()),
            root: None,
        }),
    );
    let d = step(
        Some(&spec()),
        Some(&in_phase(Presenting, at(0))),
        &e,
        at(30),
    )
    .expect("waits");
    assert_eq!(d.status.phase, Presenting);
    assert_eq!(d.status.waiting_on, vec!["shop/cart-1".to_owned()]);
}

#[test]
fn a_refused_handshake_blocks_in_any_phase_paused_or_not_until_retry() {
    for phase in [AddingRoot, Reissuing, Presenting, RemovingOld, Reverting] {
        for action in [RotationAction::Proceed, RotationAction::Pause] {
            let s = in_phase(phase, at(0));
            let mut e = ev();
            all_proxies(&mut e, BOTH, NEW);
            e.refused
                .insert("shop/cart-1 (inbound unknown-ca)".into(), 3);
            let d = step(Some(&with(action)), Some(&s), &e, at(30)).expect("blocks");
            assert_eq!(d.status.phase, Blocked, "{phase:?} {action:?}");
            assert_eq!(d.status.blocked_in, Some(phase));
            assert_eq!(
                d.status.waiting_on,
                vec!["shop/cart-1 (inbound unknown-ca)".to_owned()]
            );
            assert!(
                d.status.message.contains("unknown-ca"),
                "{}",
                d.status.message
            );
            let (r, _, warning) = d.event.clone().expect("an Event");
            assert_eq!((r, warning), (reason::BLOCKED, true));
            // Blocked changes nothing in force.
            assert_eq!(plan_of(&d.status), plan_of(&s));
            // It stays Blocked, whatever the gates say, until retry.
            let mut clean = ev();
            all_proxies(&mut clean, NEW_ONLY, NEW);
            all_secrets(&mut clean, NEW);
            let blocked = d.status;
            assert_eq!(
                step(Some(&with(action)), Some(&blocked), &clean, at(60)),
                None
            );
            let retried = CaRotation {
                retry: 1,
                ..with(action)
            };
            let d = step(Some(&retried), Some(&blocked), &clean, at(90)).expect("released");
            assert_eq!(d.status.retry, 1);
            assert_eq!(d.event.as_ref().map(|e| e.0), Some(reason::RETRIED));
            assert_eq!(d.status.phase, phase, "resumes where it stopped");
            assert_eq!(d.status.since, time(at(90)), "the phase starts over");
        }
    }
}

#[test]
fn a_proxy_that_never_takes_the_new_bundle_blocks_at_the_gate_timeout_naming_it() {
    let s = started(at(0));
    let mut e = ev();
    e.proxies.insert("shop/cart-1".into(), proxy(BOTH, OLD));
    // Within the timeout: waiting.
    let d = step(Some(&spec()), Some(&s), &e, at(29 * 60)).expect("waits");
    assert_eq!(d.status.phase, AddingRoot);
    // Past it: Blocked, naming the proxy with the frozen bundle.
    let d = step(Some(&spec()), Some(&s), &e, at(31 * 60)).expect("blocks");
    assert_eq!(
        (d.status.phase, d.status.blocked_in),
        (Blocked, Some(AddingRoot))
    );
    assert_eq!(d.status.waiting_on, vec!["shop/checkout-1".to_owned()]);
    assert!(
        d.status.message.contains("gateTimeout"),
        "{}",
        d.status.message
    );
    // A paused rotation does not time out.
    let d = step(
        Some(&with(RotationAction::Pause)),
        Some(&s),
        &e,
        at(31 * 60),
    )
    .expect("says");
    assert_eq!(d.status.phase, AddingRoot);
    assert!(
        d.status.message.starts_with("paused"),
        "{}",
        d.status.message
    );
}

#[test]
fn pause_holds_a_met_gate_and_proceed_moves_on() {
    let s = started(at(0));
    let mut e = ev();
    all_proxies(&mut e, BOTH, OLD);
    let d = step(Some(&with(RotationAction::Pause)), Some(&s), &e, at(30)).expect("says");
    assert_eq!(d.status.phase, AddingRoot);
    assert!(
        d.status.message.contains("the gate is met"),
        "{}",
        d.status.message
    );
    assert!(d.status.paused);
    // Paused past the gate timeout: resuming starts the phase over, so
    // the pause never counts towards it.
    let mut lagging = e.clone();
    lagging
        .proxies
        .insert("shop/cart-1".into(), proxy("oldonly", OLD));
    let d = step(Some(&spec()), Some(&d.status), &lagging, at(3600)).expect("resumes");
    assert_eq!((d.status.phase, d.status.paused), (AddingRoot, false));
    assert_eq!(d.status.since, time(at(3600)));
    assert_eq!(d.event.as_ref().map(|e| e.0), Some(reason::RESUMED));
    let d2 = step(Some(&spec()), Some(&d.status), &lagging, at(3610)).expect("waits");
    assert_eq!(
        d2.status.phase, AddingRoot,
        "not timed out: {}",
        d2.status.message
    );
    let d = step(Some(&spec()), Some(&d2.status), &e, at(3620)).expect("moves");
    assert_eq!(d.status.phase, Reissuing);
}

#[test]
fn weft_ca_holding_another_root_than_the_old_one_blocks_the_rotation() {
    // The new root put into weft-ca by hand before the old one left the
    // bundles; or a third root restored from a backup.
    for (base, says) in [(NEW, "holds the new root"), ("3333333333333333", "neither")] {
        let mut e = ev();
        e.base_root = base.into();
        all_proxies(&mut e, BOTH, NEW);
        let d = step(
            Some(&spec()),
            Some(&in_phase(Presenting, at(0))),
            &e,
            at(10),
        )
        .expect("blocks");
        assert_eq!(
            (d.status.phase, d.status.blocked_in),
            (Blocked, Some(Presenting))
        );
        assert!(d.status.message.contains(says), "{}", d.status.message);
        assert!(!d.promote);
    }
}

#[test]
fn a_lost_new_key_blocks_the_phases_that_issue_from_it_but_not_the_revert() {
    let mut e = ev();
    e.new_root = Some(Err("Secret weft-system/weft-ca-next is not there".into()));
    let d = step(
        Some(&spec()),
        Some(&in_phase(Presenting, at(0))),
        &e,
        at(10),
    )
    .expect("blocks");
    assert_eq!(
        (d.status.phase, d.status.blocked_in),
        (Blocked, Some(Presenting))
    );
    // Aborting goes back to the old root, which needs only the new root's
    // certificate (kept in the status) for the bundles.
    let abort = with(RotationAction::Abort);
    let d = step(Some(&abort), Some(&d.status), &e, at(20)).expect("reverts");
    assert_eq!(d.status.phase, Reverting);
    let mut reverting = d.status;
    reverting.new_root_certificate = "-----BEGIN CERTIFICATE-----".into();
    let d = step(Some(&abort), Some(&reverting), &e, at(30)).expect("waits");
    assert_eq!(d.status.phase, Reverting, "{}", d.status.message);
}

#[test]
fn abort_drops_an_unused_root_at_once_reverts_an_issued_one_and_is_refused_late() {
    let abort = with(RotationAction::Abort);
    // Nothing came from the new root yet: out of the bundles at once.
    let d = step(Some(&abort), Some(&started(at(0))), &ev(), at(10)).expect("aborts");
    assert_eq!(d.status.phase, Aborted);
    assert_eq!(
        plan_of(&d.status),
        Plan {
            issuer: Root::Old,
            bundle: &[Root::Old]
        }
    );
    // Certificates came from it: issue from the old root again, both
    // still trusted, until every proxy presents the old root.
    for phase in [Reissuing, Presenting] {
        let d = step(Some(&abort), Some(&in_phase(phase, at(0))), &ev(), at(10)).expect("reverts");
        assert_eq!(d.status.phase, Reverting, "{phase:?}");
        assert_eq!(
            plan_of(&d.status),
            Plan {
                issuer: Root::Old,
                bundle: &[Root::Old, Root::New]
            }
        );
        let mut e = ev();
        all_proxies(&mut e, BOTH, NEW);
        e.secrets
            .insert("shop/weft-identity-cart".into(), Some(NEW.into()));
        let waiting = step(Some(&abort), Some(&d.status), &e, at(20)).expect("waits");
        assert_eq!(waiting.status.phase, Reverting);
        assert_eq!(
            waiting.status.waiting_on.len(),
            3,
            "{:?}",
            waiting.status.waiting_on
        );
        // Every proxy back on the old root: the rotation still waits out
        // late kubelet syncs (the same evidence held before any proxy
        // took a new-root certificate).
        let e = ev();
        let settling = step(Some(&abort), Some(&waiting.status), &e, at(30)).expect("settles");
        assert_eq!(settling.status.phase, Reverting);
        assert!(
            settling.status.message.contains("bring a Secret late"),
            "{}",
            settling.status.message
        );
        assert_eq!(settling.status.secrets_back_since, Some(time(at(30))));
        // Counted from when the Secrets were back, not from the phase's
        // start (re-issuing a large mesh takes a while).
        assert_eq!(
            step(Some(&abort), Some(&settling.status), &e, at(170)),
            None
        );
        let done = step(Some(&abort), Some(&settling.status), &e, at(30 + 150)).expect("done");
        assert_eq!(done.status.phase, Aborted);
        assert!(!done.promote);
    }
    // A Blocked rotation aborts from the phase it stopped in.
    let blocked = CaRotationStatus {
        phase: Blocked,
        blocked_in: Some(Presenting),
        ..started(at(0))
    };
    let d = step(Some(&abort), Some(&blocked), &ev(), at(10)).expect("reverts");
    assert_eq!(d.status.phase, Reverting);
    // Too late once the old root leaves the bundles: it goes on, saying so.
    let mut e = ev();
    all_proxies(&mut e, NEW_ONLY, NEW);
    let d = step(
        Some(&abort),
        Some(&in_phase(RemovingOld, at(0))),
        &e,
        at(10),
    )
    .expect("refuses");
    assert_eq!(d.status.phase, Complete);
    let mut e = ev();
    all_proxies(&mut e, BOTH, NEW);
    let d = step(
        Some(&abort),
        Some(&in_phase(RemovingOld, at(0))),
        &e,
        at(10),
    )
    .expect("refuses");
    assert_eq!(d.status.phase, RemovingOld);
    assert!(
        d.status.message.contains("abort refused"),
        "{}",
        d.status.message
    );
}

#[test]
fn a_restarted_operator_resumes_from_the_status_and_finishes_a_promotion_it_began() {
    // The same status and evidence give the same decision: nothing else
    // is read.
    let s = in_phase(Presenting, at(0));
    let mut e = ev();
    all_proxies(&mut e, BOTH, NEW);
    assert_eq!(
        step(Some(&spec()), Some(&s), &e, at(50)),
        step(Some(&spec()), Some(&s.clone()), &e.clone(), at(50))
    );
    // weft-ca already holds the new root (promoted, then the operator
    // stopped before the status said so): Complete, nothing written twice.
    let mut e = ev();
    e.base_root = NEW.into();
    let d = step(
        Some(&spec()),
        Some(&in_phase(RemovingOld, at(0))),
        &e,
        at(50),
    )
    .expect("done");
    assert_eq!(d.status.phase, Complete);
    assert!(!d.promote);
}

#[test]
fn a_new_root_that_changed_or_vanished_under_the_rotation_blocks_it() {
    let s = in_phase(Reissuing, at(0));
    let mut e = ev();
    e.new_root = Some(Ok(NewRoot {
        certificate: String::new(),
        fingerprint: "ffffffffffffffff".into(),
        expires: None,
    }));
    let d = step(Some(&spec()), Some(&s), &e, at(10)).expect("blocks");
    assert_eq!(
        (d.status.phase, d.status.blocked_in),
        (Blocked, Some(Reissuing))
    );
    assert!(
        d.status.message.contains("ffffffffffffffff"),
        "{}",
        d.status.message
    );
    e.new_root = Some(Err("Secret weft-system/my-root is not there".into()));
    let d = step(Some(&spec()), Some(&s), &e, at(10)).expect("blocks");
    assert!(d.status.message.contains("my-root"), "{}", d.status.message);
}

#[test]
fn a_rotation_begins_only_with_a_usable_new_root_and_not_while_paused() {
    // The source holds the root in force.
    let mut e = ev();
    e.new_root = Some(Ok(NewRoot {
        certificate: String::new(),
        fingerprint: OLD.into(),
        expires: None,
    }));
    let d = step(Some(&spec()), None, &e, at(0)).expect("says why");
    assert_eq!(
        (d.status.phase, d.status.blocked_in),
        (Blocked, Some(AddingRoot))
    );
    assert!(d.status.new_root.is_empty(), "not begun");
    assert!(d.status.message.contains("already"), "{}", d.status.message);
    assert!(d.event.is_some());
    // Said once.
    assert_eq!(step(Some(&spec()), Some(&d.status), &e, at(10)), None);
    // Once the source holds a new root, it begins: no retry needed.
    let d = step(Some(&spec()), Some(&d.status), &ev(), at(20)).expect("begins");
    assert_eq!(d.status.phase, AddingRoot);
    assert_eq!(d.status.new_root, NEW);
    // Paused before it began: nothing changes in force.
    let d = step(Some(&with(RotationAction::Pause)), None, &ev(), at(0)).expect("says");
    assert!(d.status.new_root.is_empty());
    assert!(d.status.message.contains("paused"), "{}", d.status.message);
    // A user's source is kept in the status for the whole rotation.
    let user = CaRotation {
        source: Some(CaSource {
            secret_name: "my-root".into(),
            cert_key: "tls.crt".into(),
            key_key: "tls.key".into(),
            anchor_key: Some("ca.crt".into()),
        }),
        ..spec()
    };
    let d = step(Some(&user), None, &ev(), at(0)).expect("begins");
    assert_eq!(d.status.source, user.source);
}

#[test]
fn another_id_waits_for_the_rotation_under_way_and_starts_after_it_ended() {
    let s = in_phase(Reissuing, at(0));
    let other = CaRotation {
        id: "r2".into(),
        ..spec()
    };
    let mut e = ev();
    all_secrets(&mut e, NEW);
    let d = step(Some(&other), Some(&s), &e, at(10)).expect("says");
    assert_eq!(
        d.status.phase, Reissuing,
        "held, not moved on another id's word"
    );
    assert_eq!(d.status.id, "r1");
    assert!(d.status.message.contains("r2"), "{}", d.status.message);
    // Removed from the spec mid-way: held too.
    let d = step(None, Some(&s), &e, at(10)).expect("says");
    assert_eq!(d.status.phase, Reissuing);
    // After r1 completed, r2 starts with weft-ca (now r1's root) as old.
    let done = CaRotationStatus {
        phase: Complete,
        ..s
    };
    let mut e = ev();
    e.base_root = NEW.into();
    e.new_root = Some(Ok(NewRoot {
        certificate: String::new(),
        fingerprint: "2222222222222222".into(),
        expires: None,
    }));
    let d = step(Some(&other), Some(&done), &e, at(20)).expect("r2 starts");
    assert_eq!((d.status.id.as_str(), d.status.phase), ("r2", AddingRoot));
    assert_eq!(d.status.old_root, NEW);
}
