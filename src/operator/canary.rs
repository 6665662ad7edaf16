//! The progressive canary of a ServiceRoute, as a pure state machine:
//! given the route's `spec.rollout`, where the canary stands (its status)
//! and the golden signals the client proxies measured over the current
//! step, [`step`] says where it goes next and why. No I/O: the operator
//! reads the evidence from the mesh's stats (the same counts the stats API
//! serves) and writes the [`Decision`] into `status.rollout`; the compiler
//! reads the weight back from there, so the status is what moves traffic.
//!
//! ```text
//!   (new or edited) -> Progressing(step 1) -> Progressing(step 2) -> ... -> Promoted
//!                            |    ^                  |
//!             pause annotation    unpause            v (a gate fails)
//!                            v    |               Aborted (weight 0)
//!                           Paused
//! ```
//!
//! - The evidence is what the backends' own pods served (their proxies'
//!   inbound counts, every try of a retried call included, in the
//!   route's namespace): a proxy elsewhere in the mesh cannot speak for
//!   them, and a client's retries cannot hide a canary's failures.
//! - A step passes once its window (`interval`) is covered by evidence
//!   and both the canary and the stable backends had `minRequests` in it,
//!   with the canary's success rate and p99 within the gates of the
//!   stable backends'. Until both sides have `minRequests`, nothing is
//!   judged (`TooFewRequests` once the window is over): a quiet canary
//!   never passes.
//! - A gate fails as soon as both sides have `minRequests`, before the
//!   window ends, paused or not: the canary is aborted and gets no more
//!   traffic until its rollout (or its rules' backends) change.
//! - What the rollout runs for is a revision: a hash of `spec.rollout`
//!   and the backends of the canary's rules. A change of it starts again
//!   from the first step; any other edit of the route leaves it alone.
//! - The window counts from the step's start as written in the status,
//!   over what the control plane observed since; an operator that
//!   restarted (or another replica that took over) keeps the step and
//!   weight from the status and counts the window again from its own
//!   first reading, so a step never passes on evidence nobody saw.
//! - The last step is 100: reaching it promotes the canary (there is no
//!   stable traffic left to compare with).

use std::time::{Duration, SystemTime};

use crate::api::{CanaryPhase, CanaryRollout, CanarySignals};
use crate::meshstats::Requests;

/// Verdicts (`status.rollout.verdict`, and Event reasons).
pub mod verdict {
    pub const STARTED: &str = "Started";
    pub const OBSERVING: &str = "Observing";
    pub const TOO_FEW_REQUESTS: &str = "TooFewRequests";
    pub const NO_EVIDENCE: &str = "NoEvidence";
    pub const PASSED: &str = "Passed";
    pub const SUCCESS_RATE: &str = "SuccessRate";
    pub const LATENCY: &str = "Latency";
    pub const PAUSED: &str = "Paused";
    pub const RESUMED: &str = "Resumed";
    pub const PROMOTED: &str = "Promoted";
}

/// A p99 increase below this never fails the latency gate: at a few
/// milliseconds, one histogram bucket is more than any percentage.
pub const LATENCY_SLACK_MS: f64 = 5.0;

/// How often a step is looked at while it runs.
const RECHECK: Duration = Duration::from_secs(10);
/// How often a settled canary (promoted, aborted, paused) is looked at.
const IDLE: Duration = Duration::from_secs(60);

/// Where the canary stands, from `status.rollout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub phase: CanaryPhase,
    /// The step in force, from 0.
    pub step: usize,
    pub since: SystemTime,
    /// What the rollout ran for ([`crate::api::ServiceRoute::canary_revision`]).
    pub revision: Option<String>,
    pub verdict: String,
    pub message: String,
}

/// What the backends' pods served over the current step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    /// Requests the canary backend's pods served.
    pub canary: Requests,
    /// Requests the pods of the rules' other backends served.
    pub stable: Requests,
    /// How much of the step the evidence covers: from the step's start,
    /// or from the control plane's first reading after it.
    pub covered: Duration,
    /// Why the two sides cannot be told apart (nothing is judged).
    pub unreadable: Option<String>,
}

/// What to write and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub phase: CanaryPhase,
    /// From 0.
    pub step: usize,
    /// The canary's share in force, in percent.
    pub weight: u32,
    pub since: SystemTime,
    pub verdict: &'static str,
    pub message: String,
    /// Worth an Event: a new step, a pause or resume, promotion, abort.
    pub event: bool,
    /// The Event is a warning (an abort).
    pub warning: bool,
    pub canary: Option<CanarySignals>,
    pub stable: Option<CanarySignals>,
    pub requeue_after: Duration,
}

/// What the gates say of the evidence.
enum Judged {
    /// Too few requests on a side (or no telling them apart).
    Quiet(String),
    /// A gate failed: the verdict and why.
    Failed(&'static str, String),
    /// Within every gate.
    Within,
}

fn judge(rollout: &CanaryRollout, evidence: &Evidence, figures: &str) -> Judged {
    if let Some(why) = &evidence.unreadable {
        return Judged::Quiet(why.clone());
    }
    let gates = &rollout.gates;
    let min = f64::from(gates.min_requests);
    let (canary, stable) = (&evidence.canary, &evidence.stable);
    if canary.requests < min || stable.requests < min {
        let quiet = if canary.requests < min {
            "the canary's pods"
        } else {
            "the stable backends' pods"
        };
        return Judged::Quiet(format!(
            "{quiet} served fewer than the {} requests a gate needs; {figures}",
            gates.min_requests
        ));
    }
    let rate = |r: &Requests| 100.0 * r.succeeded / r.requests;
    let drop = rate(stable) - rate(canary);
    if drop > f64::from(gates.max_success_rate_drop) {
        return Judged::Failed(
            verdict::SUCCESS_RATE,
            format!(
                "the canary's success rate is {drop:.1} points below the stable backends' (at most {} allowed); {figures}",
                gates.max_success_rate_drop
            ),
        );
    }
    if let (Some(c99), Some(s99)) = (canary.quantile(0.99), stable.quantile(0.99)) {
        let allowed = s99 * (1.0 + f64::from(gates.max_p99_increase_percent) / 100.0);
        if c99 > allowed && c99 - s99 > LATENCY_SLACK_MS {
            return Judged::Failed(
                verdict::LATENCY,
                format!(
                    "the canary's p99 is {c99:.0} ms against the stable backends' {s99:.0} ms (at most {} % more allowed); {figures}",
                    gates.max_p99_increase_percent
                ),
            );
        }
    }
    Judged::Within
}

/// One look at a canary whose rollout is at `revision`.
pub fn step(
    rollout: &CanaryRollout,
    revision: &str,
    paused: bool,
    current: Option<&Current>,
    evidence: &Evidence,
    now: SystemTime,
) -> Decision {
    let signals = (signals(&evidence.canary), signals(&evidence.stable));
    let valid = rollout.steps_ascend();
    let decide = |phase, step: usize, since, verdict, message: String, event, requeue_after| {
        // What the compiler will put in force once this is the status.
        let weight = rollout.weight_in_force(revision, Some((phase, step, Some(revision))));
        Decision {
            phase,
            step,
            weight,
            since,
            verdict,
            message,
            event,
            warning: phase == CanaryPhase::Aborted && event,
            canary: signals.0.clone(),
            stable: signals.1.clone(),
            requeue_after,
        }
    };
    let restarted = current.is_none_or(|c| c.revision.as_deref() != Some(revision));
    if !valid {
        // No traffic on the canary until the steps are fixed.
        return decide(
            CanaryPhase::Paused,
            0,
            current.filter(|_| !restarted).map_or(now, |c| c.since),
            verdict::PAUSED,
            format!(
                "rollout.steps {:?} must ascend (each step a larger share than the one before); the canary gets no traffic until they do",
                rollout.steps
            ),
            restarted,
            IDLE,
        );
    }
    let Some(c) = current.filter(|_| !restarted) else {
        let w = rollout.weight_at(0);
        return decide(
            CanaryPhase::Progressing,
            0,
            now,
            verdict::STARTED,
            format!(
                "canary {} starts at step 1 of {}: {w} % of its rules' requests",
                rollout.canary,
                rollout.steps.len()
            ),
            true,
            RECHECK,
        );
    };
    let last = rollout.steps.len().saturating_sub(1);
    let at = c.step.min(last);
    let w = rollout.weight_at(at);
    let figures = format!(
        "canary {} (stable {})",
        describe(&evidence.canary),
        describe(&evidence.stable)
    );
    let aborted = |verdict, why: String| {
        decide(
            CanaryPhase::Aborted,
            at,
            now,
            verdict,
            format!(
                "aborted at step {} ({w} %): {why}; every request of its rules goes to the stable backends until its rollout changes",
                at + 1
            ),
            true,
            IDLE,
        )
    };
    match c.phase {
        // Settled until the rollout changes (which starts it again).
        CanaryPhase::Aborted | CanaryPhase::Promoted => {
            let verdict = match (c.phase, c.verdict.as_str()) {
                (CanaryPhase::Promoted, _) => verdict::PROMOTED,
                (_, verdict::LATENCY) => verdict::LATENCY,
                _ => verdict::SUCCESS_RATE,
            };
            return decide(
                c.phase,
                at,
                c.since,
                verdict,
                c.message.clone(),
                false,
                IDLE,
            );
        }
        CanaryPhase::Progressing | CanaryPhase::Paused if paused => {
            // Held, but not blind: a failing gate still aborts.
            if let Judged::Failed(verdict, why) = judge(rollout, evidence, &figures) {
                return aborted(verdict, why);
            }
            let event = c.phase != CanaryPhase::Paused;
            let since = if event { now } else { c.since };
            return decide(
                CanaryPhase::Paused,
                at,
                since,
                verdict::PAUSED,
                format!(
                    "paused at step {} ({w} %) by the annotation weft.dev/rollout-paused (a failing gate still aborts); remove it to resume (the step's window starts again)",
                    at + 1
                ),
                event,
                IDLE,
            );
        }
        CanaryPhase::Paused => {
            return decide(
                CanaryPhase::Progressing,
                at,
                now,
                verdict::RESUMED,
                format!(
                    "resumed at step {} ({w} %): its window starts again",
                    at + 1
                ),
                true,
                RECHECK,
            );
        }
        CanaryPhase::Progressing => {}
    }
    if w >= 100 {
        return decide(
            CanaryPhase::Promoted,
            at,
            now,
            verdict::PROMOTED,
            format!(
                "canary {} promoted: it takes every request of its rules; make it the stable backend and remove spec.rollout",
                rollout.canary
            ),
            true,
            IDLE,
        );
    }
    let window = rollout.interval.as_std();
    let over = evidence.covered >= window;
    let left = || {
        RECHECK
            .min(window.saturating_sub(evidence.covered))
            .max(Duration::from_secs(1))
    };
    match judge(rollout, evidence, &figures) {
        Judged::Failed(verdict, why) => aborted(verdict, why),
        Judged::Quiet(why) => {
            let verdict = match (&evidence.unreadable, over) {
                (Some(_), _) => verdict::NO_EVIDENCE,
                (None, true) => verdict::TOO_FEW_REQUESTS,
                (None, false) => verdict::OBSERVING,
            };
            decide(
                CanaryPhase::Progressing,
                at,
                c.since,
                verdict,
                format!("step {} ({w} %): {why}", at + 1),
                false,
                if over { RECHECK } else { left() },
            )
        }
        Judged::Within if !over => decide(
            CanaryPhase::Progressing,
            at,
            c.since,
            verdict::OBSERVING,
            format!(
                "step {} ({w} %): within the gates so far, {:.0} s of {} s observed; {figures}",
                at + 1,
                evidence.covered.as_secs_f64(),
                window.as_secs()
            ),
            false,
            left(),
        ),
        Judged::Within => {
            let next = at + 1;
            if next > last || rollout.weight_at(next) >= 100 {
                return decide(
                    CanaryPhase::Promoted,
                    next.min(last),
                    now,
                    verdict::PROMOTED,
                    format!(
                        "canary {} passed step {} and is promoted: it takes every request of its rules; make it the stable backend and remove spec.rollout; {figures}",
                        rollout.canary,
                        at + 1
                    ),
                    true,
                    IDLE,
                );
            }
            decide(
                CanaryPhase::Progressing,
                next,
                now,
                verdict::PASSED,
                format!(
                    "step {} ({w} %) passed; step {} sends the canary {} %; {figures}",
                    at + 1,
                    next + 1,
                    rollout.weight_at(next)
                ),
                true,
                RECHECK,
            )
        }
    }
}

/// One side's figures, for the status.
fn signals(r: &Requests) -> Option<CanarySignals> {
    (r.requests > 0.0).then(|| CanarySignals {
        requests: r.requests as u64,
        success_rate: Some(format!("{:.1}", 100.0 * r.succeeded / r.requests)),
        p99_ms: r.quantile(0.99).map(|ms| ms.round() as u64),
    })
}

/// One side's figures, for a message.
fn describe(r: &Requests) -> String {
    if r.requests <= 0.0 {
        return "no requests".to_owned();
    }
    let p99 = r
        .quantile(0.99)
        .map_or_else(String::new, |ms| format!(", p99 {ms:.0} ms"));
    format!(
        "{} requests, {:.1} % succeeded{p99}",
        r.requests as u64,
        100.0 * r.succeeded / r.requests
    )
}

#[cfg(test)]
mod tests;
