//! The canary's table: every phase, every gate, abort, pause, promotion,
//! an edit, and an operator that restarted mid-rollout.

use std::time::{Duration, SystemTime};

use super::*;
use crate::api::{CanaryGates, CanaryRollout};

const T0: Duration = Duration::from_secs(1_800_000_000);
const MINUTE: Duration = Duration::from_secs(60);

fn at(offset: Duration) -> SystemTime {
    SystemTime::UNIX_EPOCH + T0 + offset
}

fn rollout() -> CanaryRollout {
    CanaryRollout {
        canary: "checkout-canary".into(),
        steps: vec![5, 25, 50, 100],
        interval: crate::api::Duration::from_secs(60),
        gates: CanaryGates {
            max_success_rate_drop: 1,
            max_p99_increase_percent: 50,
            min_requests: 100,
        },
    }
}

/// `n` requests, `failed` of them failed, all at about `ms`.
fn requests(n: u32, failed: u32, ms: f64) -> Requests {
    let mut r = Requests {
        requests: f64::from(n),
        succeeded: f64::from(n - failed),
        ..Requests::default()
    };
    for le in [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0] {
        r.add_bucket(le, if le >= ms { f64::from(n) } else { 0.0 });
    }
    r.add_bucket(f64::INFINITY, f64::from(n));
    r
}

/// The canary's share the compiler puts in force for a status `current`.
fn weight_in_force(rollout: &CanaryRollout, revision: &str, current: Option<&Current>) -> u32 {
    rollout.weight_in_force(
        revision,
        current.map(|c| (c.phase, c.step, c.revision.as_deref())),
    )
}

fn evidence(canary: Requests, stable: Requests, covered: Duration) -> Evidence {
    Evidence {
        canary,
        stable,
        covered,
        unreadable: None,
    }
}

fn current(phase: CanaryPhase, step: usize, since: SystemTime) -> Current {
    Current {
        phase,
        step,
        since,
        revision: Some("r1".into()),
        verdict: String::new(),
        message: String::new(),
    }
}

/// The decision as the status would hold it: phase, step, weight.
fn at_step(d: &Decision) -> (CanaryPhase, usize, u32) {
    (d.phase, d.step, d.weight)
}

#[test]
fn a_new_rollout_starts_at_its_first_step_and_says_so() {
    let d = step(
        &rollout(),
        "r1",
        false,
        None,
        &Evidence::default(),
        at(MINUTE),
    );
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 0, 5));
    assert_eq!(
        (d.verdict, d.event, d.since),
        (verdict::STARTED, true, at(MINUTE))
    );
}

#[test]
fn a_healthy_canary_passes_every_step_and_is_promoted() {
    let r = rollout();
    let mut c = current(CanaryPhase::Progressing, 0, at(Duration::ZERO));
    let mut weights = vec![weight_in_force(&r, "r1", Some(&c))];
    for look in 1..=3u32 {
        let now = at(MINUTE * look);
        let healthy = evidence(requests(200, 0, 20.0), requests(2000, 2, 20.0), MINUTE);
        let d = step(&r, "r1", false, Some(&c), &healthy, now);
        assert!(d.event, "{d:?}");
        c = Current {
            phase: d.phase,
            step: d.step,
            since: d.since,
            revision: Some("r1".into()),
            verdict: d.verdict.into(),
            message: d.message.clone(),
        };
        weights.push(weight_in_force(&r, "r1", Some(&c)));
    }
    assert_eq!(weights, [5, 25, 50, 100]);
    assert_eq!(c.phase, CanaryPhase::Promoted);
    assert_eq!(c.verdict, verdict::PROMOTED);
    // Settled: nothing more happens, whatever comes.
    let bad = evidence(requests(200, 200, 20.0), requests(200, 0, 20.0), MINUTE);
    let d = step(&r, "r1", false, Some(&c), &bad, at(MINUTE * 9));
    assert_eq!(at_step(&d), (CanaryPhase::Promoted, 3, 100));
    assert!(!d.event);
}

#[test]
fn a_step_waits_for_its_whole_window_before_passing() {
    let c = current(CanaryPhase::Progressing, 1, at(Duration::ZERO));
    let healthy = |covered| evidence(requests(500, 0, 20.0), requests(1500, 0, 20.0), covered);
    let d = step(
        &rollout(),
        "r1",
        false,
        Some(&c),
        &healthy(MINUTE / 2),
        at(MINUTE / 2),
    );
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 1, 25));
    assert_eq!((d.verdict, d.event), (verdict::OBSERVING, false));
    assert!(d.requeue_after <= Duration::from_secs(10));
    let d = step(
        &rollout(),
        "r1",
        false,
        Some(&c),
        &healthy(MINUTE),
        at(MINUTE),
    );
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 2, 50));
    assert_eq!((d.verdict, d.since), (verdict::PASSED, at(MINUTE)));
}

#[test]
fn a_canary_failing_a_fifth_of_its_requests_is_aborted_at_its_first_step_at_once() {
    let c = current(CanaryPhase::Progressing, 0, at(Duration::ZERO));
    // Ten seconds into a one-minute window: enough requests, failed.
    let failing = evidence(requests(120, 24, 20.0), requests(2000, 0, 20.0), MINUTE / 6);
    let d = step(&rollout(), "r1", false, Some(&c), &failing, at(MINUTE / 6));
    assert_eq!(at_step(&d), (CanaryPhase::Aborted, 0, 0));
    assert_eq!(d.verdict, verdict::SUCCESS_RATE);
    assert!(d.event && d.warning);
    assert!(d.message.contains("20.0 points below"), "{}", d.message);
    // It stays aborted with no traffic, whatever comes after.
    let aborted = Current {
        verdict: d.verdict.into(),
        message: d.message.clone(),
        ..current(CanaryPhase::Aborted, 0, d.since)
    };
    let healthy = evidence(requests(500, 0, 20.0), requests(500, 0, 20.0), MINUTE);
    let d = step(
        &rollout(),
        "r1",
        false,
        Some(&aborted),
        &healthy,
        at(MINUTE * 5),
    );
    assert_eq!(at_step(&d), (CanaryPhase::Aborted, 0, 0));
    assert_eq!(d.verdict, verdict::SUCCESS_RATE);
    assert!(!d.event);
    assert_eq!(weight_in_force(&rollout(), "r1", Some(&aborted)), 0);
}

#[test]
fn a_drop_within_the_gate_passes() {
    let c = current(CanaryPhase::Progressing, 0, at(Duration::ZERO));
    // 99.0 % against 99.5 %: half a point, within the 1 allowed.
    let close = evidence(requests(1000, 10, 20.0), requests(2000, 10, 20.0), MINUTE);
    let d = step(&rollout(), "r1", false, Some(&c), &close, at(MINUTE));
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 1, 25));
}

#[test]
fn a_slow_canary_is_aborted_on_latency_but_a_few_milliseconds_never_fail() {
    let c = current(CanaryPhase::Progressing, 0, at(Duration::ZERO));
    let slow = evidence(requests(200, 0, 250.0), requests(2000, 0, 50.0), MINUTE / 2);
    let d = step(&rollout(), "r1", false, Some(&c), &slow, at(MINUTE / 2));
    assert_eq!(at_step(&d), (CanaryPhase::Aborted, 0, 0));
    assert_eq!(d.verdict, verdict::LATENCY);
    // 5 ms against 1 ms is +400 %, but within the slack.
    let fast = evidence(requests(200, 0, 5.0), requests(2000, 0, 1.0), MINUTE);
    let d = step(&rollout(), "r1", false, Some(&c), &fast, at(MINUTE));
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 1, 25));
}

#[test]
fn a_quiet_canary_never_passes_a_gate() {
    let c = current(CanaryPhase::Progressing, 0, at(Duration::ZERO));
    for (canary, stable) in [(99, 5000), (5000, 99), (0, 0)] {
        for covered in [MINUTE, MINUTE * 10] {
            let quiet = evidence(
                requests(canary, 0, 20.0),
                requests(stable, 0, 20.0),
                covered,
            );
            let d = step(&rollout(), "r1", false, Some(&c), &quiet, at(covered));
            assert_eq!(
                at_step(&d),
                (CanaryPhase::Progressing, 0, 5),
                "{canary}/{stable}"
            );
            assert_eq!(d.verdict, verdict::TOO_FEW_REQUESTS);
            assert!(!d.event);
        }
    }
    // Nor fails one: a few failures among too few requests prove nothing.
    let few = evidence(requests(50, 25, 20.0), requests(5000, 0, 20.0), MINUTE);
    let d = step(&rollout(), "r1", false, Some(&c), &few, at(MINUTE));
    assert_eq!(d.phase, CanaryPhase::Progressing);
}

#[test]
fn the_annotation_pauses_the_step_and_removing_it_restarts_the_window() {
    let r = rollout();
    let c = current(CanaryPhase::Progressing, 1, at(Duration::ZERO));
    let healthy = evidence(requests(500, 0, 20.0), requests(1500, 0, 20.0), MINUTE * 2);
    let d = step(&r, "r1", true, Some(&c), &healthy, at(MINUTE * 2));
    assert_eq!(at_step(&d), (CanaryPhase::Paused, 1, 25));
    assert_eq!(
        (d.verdict, d.event, d.since),
        (verdict::PAUSED, true, at(MINUTE * 2))
    );
    let paused = current(CanaryPhase::Paused, 1, d.since);
    assert_eq!(weight_in_force(&r, "r1", Some(&paused)), 25);
    // Still paused: no new Event, no move.
    let d = step(&r, "r1", true, Some(&paused), &healthy, at(MINUTE * 5));
    assert_eq!(at_step(&d), (CanaryPhase::Paused, 1, 25));
    assert!(!d.event);
    assert_eq!(d.since, at(MINUTE * 2));
    // Held, not blind: a canary failing while paused is aborted.
    let failing = evidence(requests(500, 250, 20.0), requests(1500, 0, 20.0), MINUTE);
    let d = step(&r, "r1", true, Some(&paused), &failing, at(MINUTE * 6));
    assert_eq!(at_step(&d), (CanaryPhase::Aborted, 1, 0));
    assert!(d.warning);
    // Resumed: the same step, its window from now.
    let d = step(&r, "r1", false, Some(&paused), &healthy, at(MINUTE * 7));
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 1, 25));
    assert_eq!(
        (d.verdict, d.event, d.since),
        (verdict::RESUMED, true, at(MINUTE * 7))
    );
}

#[test]
fn a_changed_rollout_starts_again_from_its_first_step() {
    let r = rollout();
    for phase in [
        CanaryPhase::Aborted,
        CanaryPhase::Promoted,
        CanaryPhase::Progressing,
    ] {
        let c = current(phase, 2, at(Duration::ZERO));
        // The compiler already routes a changed rollout by its first step.
        assert_eq!(weight_in_force(&r, "r2", Some(&c)), 5);
        let d = step(&r, "r2", false, Some(&c), &Evidence::default(), at(MINUTE));
        assert_eq!(at_step(&d), (CanaryPhase::Progressing, 0, 5), "{phase:?}");
        assert_eq!((d.verdict, d.event), (verdict::STARTED, true));
    }
    assert_eq!(weight_in_force(&r, "r1", None), 5);
}

/// An operator that restarted (or a replica that took over) reads where
/// the canary stands from the status alone: the same step and weight,
/// its window counted again from the evidence it has seen itself.
#[test]
fn a_restarted_operator_resumes_from_the_status_not_from_memory() {
    let r = rollout();
    // Step 3 (50 %) began ten minutes ago; the new operator has seen 10 s.
    let c = current(CanaryPhase::Progressing, 2, at(Duration::ZERO));
    let seen = evidence(
        requests(300, 0, 20.0),
        requests(300, 0, 20.0),
        Duration::from_secs(10),
    );
    let d = step(&r, "r1", false, Some(&c), &seen, at(MINUTE * 10));
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 2, 50));
    assert_eq!(d.verdict, verdict::OBSERVING);
    assert_eq!(
        d.since,
        at(Duration::ZERO),
        "the step's start stays as written"
    );
    assert!(!d.event);
    // Nothing seen at all: still the same step.
    let d = step(
        &r,
        "r1",
        false,
        Some(&c),
        &Evidence::default(),
        at(MINUTE * 10),
    );
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 2, 50));
    // A paused or aborted canary stays so.
    for phase in [CanaryPhase::Paused, CanaryPhase::Aborted] {
        let c = current(phase, 1, at(Duration::ZERO));
        let d = step(
            &r,
            "r1",
            phase == CanaryPhase::Paused,
            Some(&c),
            &Evidence::default(),
            at(MINUTE),
        );
        assert_eq!(d.phase, phase);
        assert!(!d.event);
    }
}

#[test]
fn steps_out_of_order_put_no_traffic_on_the_canary_and_say_why() {
    let mut r = rollout();
    r.steps = vec![50, 25, 100];
    let d = step(&r, "r1", false, None, &Evidence::default(), at(MINUTE));
    assert_eq!(at_step(&d), (CanaryPhase::Paused, 0, 0));
    assert!(d.message.contains("must ascend"), "{}", d.message);
    assert!(d.event);
    assert_eq!(weight_in_force(&r, "r1", None), 0);
}

/// Pods that cannot be told apart (or none yet) give no verdict either
/// way, however the requests went.
#[test]
fn without_evidence_nothing_is_judged() {
    let c = current(CanaryPhase::Progressing, 0, at(Duration::ZERO));
    let mut e = evidence(
        requests(500, 250, 20.0),
        requests(1500, 0, 20.0),
        MINUTE * 2,
    );
    e.unreadable = Some("the same workload name".into());
    let d = step(&rollout(), "r1", false, Some(&c), &e, at(MINUTE * 2));
    assert_eq!(at_step(&d), (CanaryPhase::Progressing, 0, 5));
    assert_eq!(d.verdict, verdict::NO_EVIDENCE);
    assert!(
        d.message.contains("the same workload name"),
        "{}",
        d.message
    );
}
