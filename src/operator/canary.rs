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
//! - A step passes once its window (`interval`) is covered by evidence
//!   and both the canary and the stable backends had `minRequests` in it,
//!   with the canary's success rate and p99 within the gates of the
//!   stable backends'. Until both sides have `minRequests`, nothing is
//!   judged (`TooFewRequests` once the window is over): a quiet canary
//!   never passes.
//! - A gate fails as soon as both sides have `minRequests`, before the
//!   window ends: the canary is aborted and gets no more traffic until
//!   the route is edited.
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
    /// The route generation the rollout runs for.
    pub observed_generation: Option<i64>,
    pub verdict: String,
    pub message: String,
}

/// What the client proxies measured over the current step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    /// Requests to the canary backend on its rules.
    pub canary: Requests,
    /// Requests to the other backends of the same rules.
    pub stable: Requests,
    /// How much of the step the evidence covers: from the step's start,
    /// or from the control plane's first reading after it.
    pub covered: Duration,
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

/// The canary's share at `step` of `rollout`, in percent.
pub fn weight_at(rollout: &CanaryRollout, step: usize) -> u32 {
    rollout.weight_at(step)
}

/// The canary's share the compiler puts in force for a route at
/// `generation` whose status says `current` (see
/// [`CanaryRollout::weight_in_force`]).
pub fn weight_in_force(
    rollout: &CanaryRollout,
    generation: Option<i64>,
    current: Option<&Current>,
) -> u32 {
    rollout.weight_in_force(
        generation,
        current.map(|c| (c.phase, c.step, c.observed_generation)),
    )
}

/// Why the steps cannot run as written, if they cannot: the CRD's rules
/// check the last step and repeats, this the order.
pub fn invalid_steps(rollout: &CanaryRollout) -> Option<String> {
    let ascending = rollout.steps.windows(2).all(|w| w[0] < w[1]);
    (!ascending).then(|| {
        format!(
            "rollout.steps {:?} must ascend (each step a larger share than the one before)",
            rollout.steps
        )
    })
}

/// One look at a canary whose route is at `generation`.
pub fn step(
    rollout: &CanaryRollout,
    generation: Option<i64>,
    paused: bool,
    current: Option<&Current>,
    evidence: &Evidence,
    now: SystemTime,
) -> Decision {
    let signals = (signals(&evidence.canary), signals(&evidence.stable));
    let decide = |phase, step: usize, since, verdict, message: String, event, requeue_after| {
        let weight = match phase {
            CanaryPhase::Aborted => 0,
            CanaryPhase::Promoted => 100,
            _ => weight_at(rollout, step),
        };
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
    let restarted = current.is_none_or(|c| c.observed_generation != generation);
    if let Some(why) = invalid_steps(rollout) {
        // The compiler keeps the first step's weight; nothing moves.
        return decide(
            CanaryPhase::Paused,
            0,
            current.filter(|_| !restarted).map_or(now, |c| c.since),
            verdict::PAUSED,
            why,
            restarted,
            IDLE,
        );
    }
    let Some(c) = current.filter(|_| !restarted) else {
        let w = weight_at(rollout, 0);
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
    match c.phase {
        // Settled until the route is edited (which starts it again).
        CanaryPhase::Aborted | CanaryPhase::Promoted => {
            let verdict = if c.phase == CanaryPhase::Promoted {
                verdict::PROMOTED
            } else if c.verdict == verdict::LATENCY {
                verdict::LATENCY
            } else {
                verdict::SUCCESS_RATE
            };
            let mut d = decide(
                c.phase,
                at,
                c.since,
                verdict,
                c.message.clone(),
                false,
                IDLE,
            );
            // The figures that settled it stay as they were written.
            d.canary = None;
            d.stable = None;
            return d;
        }
        CanaryPhase::Progressing | CanaryPhase::Paused if paused => {
            let event = c.phase != CanaryPhase::Paused;
            let since = if event { now } else { c.since };
            return decide(
                CanaryPhase::Paused,
                at,
                since,
                verdict::PAUSED,
                format!(
                    "paused at step {} ({} %) by the annotation weft.dev/rollout-paused; remove it to resume (the step's window starts again)",
                    at + 1,
                    weight_at(rollout, at)
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
                    "resumed at step {} ({} %): its window starts again",
                    at + 1,
                    weight_at(rollout, at)
                ),
                true,
                RECHECK,
            );
        }
        CanaryPhase::Progressing => {}
    }
    if weight_at(rollout, at) >= 100 {
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
    let gates = &rollout.gates;
    let min = f64::from(gates.min_requests);
    let (canary, stable) = (&evidence.canary, &evidence.stable);
    let window = rollout.interval.as_std();
    let over = evidence.covered >= window;
    let figures = format!("canary {} (stable {})", describe(canary), describe(stable));
    if canary.requests < min || stable.requests < min {
        let (verdict, requeue) = if over {
            (verdict::TOO_FEW_REQUESTS, RECHECK)
        } else {
            (verdict::OBSERVING, RECHECK.min(window - evidence.covered))
        };
        let quiet = if canary.requests < min {
            "the canary"
        } else {
            "the stable backends"
        };
        return decide(
            CanaryPhase::Progressing,
            at,
            c.since,
            verdict,
            format!(
                "step {} ({} %): {quiet} had fewer than the {} requests a gate needs; {figures}",
                at + 1,
                weight_at(rollout, at),
                gates.min_requests
            ),
            false,
            requeue.max(Duration::from_secs(1)),
        );
    }
    let rate = |r: &Requests| 100.0 * r.succeeded / r.requests;
    let drop = rate(stable) - rate(canary);
    if drop > f64::from(gates.max_success_rate_drop) {
        return decide(
            CanaryPhase::Aborted,
            at,
            now,
            verdict::SUCCESS_RATE,
            format!(
                "aborted at step {} ({} %): the canary's success rate is {drop:.1} points below the stable backends' (at most {} allowed); {figures}; every request goes to the stable backends until the route is edited",
                at + 1,
                weight_at(rollout, at),
                gates.max_success_rate_drop
            ),
            true,
            IDLE,
        );
    }
    if let (Some(c99), Some(s99)) = (canary.quantile(0.99), stable.quantile(0.99)) {
        let allowed = s99 * (1.0 + f64::from(gates.max_p99_increase_percent) / 100.0);
        if c99 > allowed && c99 - s99 > LATENCY_SLACK_MS {
            return decide(
                CanaryPhase::Aborted,
                at,
                now,
                verdict::LATENCY,
                format!(
                    "aborted at step {} ({} %): the canary's p99 is {c99:.0} ms against the stable backends' {s99:.0} ms (at most {} % more allowed); {figures}; every request goes to the stable backends until the route is edited",
                    at + 1,
                    weight_at(rollout, at),
                    gates.max_p99_increase_percent
                ),
                true,
                IDLE,
            );
        }
    }
    if !over {
        return decide(
            CanaryPhase::Progressing,
            at,
            c.since,
            verdict::OBSERVING,
            format!(
                "step {} ({} %): within the gates so far, {:.0} s of {} s observed; {figures}",
                at + 1,
                weight_at(rollout, at),
                evidence.covered.as_secs_f64(),
                window.as_secs()
            ),
            false,
            RECHECK
                .min(window - evidence.covered)
                .max(Duration::from_secs(1)),
        );
    }
    let next = at + 1;
    if weight_at(rollout, next) >= 100 || next > last {
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
            "step {} ({} %) passed; step {} sends the canary {} %; {figures}",
            at + 1,
            weight_at(rollout, at),
            next + 1,
            weight_at(rollout, next)
        ),
        true,
        RECHECK,
    )
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
