//! Policy status as the operator writes it: the compiler's verdict as
//! standard conditions with `observedGeneration`, and, for an MTLSPolicy,
//! where its rollout stands. A condition keeps its `lastTransitionTime`
//! while its status is unchanged, so an unchanged verdict produces an
//! identical status and no write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use super::rollout::Decision;
use crate::api::RolloutPhase;
use crate::compile::{PolicyVerdict, VerdictCondition};

/// The condition type an MTLSPolicy's rollout is reported under: True
/// when settled (Permissive or Strict), False while under way or stuck.
pub const ROLLOUT_CONDITION: &str = "RolloutComplete";

/// One condition to write: type, status, reason, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: &'a str,
}

impl<'a> From<&'a VerdictCondition> for Wanted<'a> {
    fn from(c: &'a VerdictCondition) -> Self {
        Self {
            type_: c.type_,
            status: c.status,
            reason: c.reason,
            message: &c.message,
        }
    }
}

/// The conditions to write, keeping the transition time of each one whose
/// status did not change.
pub fn conditions(
    wanted: &[Wanted<'_>],
    generation: Option<i64>,
    existing: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    wanted
        .iter()
        .map(|w| {
            let status = if w.status { "True" } else { "False" };
            let since = existing
                .iter()
                .find(|c| c.type_ == w.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: w.type_.to_owned(),
                status: status.to_owned(),
                reason: w.reason.to_owned(),
                message: w.message.to_owned(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The `status` of an ordinary policy.
pub fn policy_status(verdict: &PolicyVerdict, existing: &[Condition], now: &Time) -> Value {
    let wanted: Vec<Wanted<'_>> = verdict.conditions.iter().map(Wanted::from).collect();
    json!({
        "observedGeneration": verdict.generation,
        "conditions": conditions(&wanted, verdict.generation, existing, now),
    })
}

/// The `status` of an MTLSPolicy: its verdict and its rollout.
pub fn mtls_status(
    verdict: &PolicyVerdict,
    decision: &Decision,
    existing: &[Condition],
    now: &Time,
) -> Value {
    let mut wanted: Vec<Wanted<'_>> = verdict.conditions.iter().map(Wanted::from).collect();
    wanted.push(Wanted {
        type_: ROLLOUT_CONDITION,
        status: matches!(
            decision.phase,
            RolloutPhase::Strict | RolloutPhase::Permissive
        ),
        reason: decision.reason,
        message: &decision.message,
    });
    let since = Time(jiff_from(decision.since));
    json!({
        "observedGeneration": verdict.generation,
        "phase": decision.phase,
        "phaseSince": since,
        "blockers": decision.blockers,
        "conditions": conditions(&wanted, verdict.generation, existing, now),
    })
}

fn jiff_from(t: std::time::SystemTime) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default()
}

/// The conditions of `written` worth an Event against `existing`: those
/// whose status or reason changed, and those new and False (a first
/// verdict that something is wrong is news; a first "all is well" is not).
pub fn transitions<'a>(existing: &[Condition], written: &'a [Condition]) -> Vec<&'a Condition> {
    written
        .iter()
        .filter(|w| match existing.iter().find(|e| e.type_ == w.type_) {
            Some(e) => e.status != w.status || e.reason != w.reason,
            None => w.status == "False",
        })
        .collect()
}

/// Status fields other loops write under field managers of their own.
const WRITTEN_APART: [&str; 6] = [
    "ca",
    "rollout",
    "enforcement",
    "observedCallers",
    "observedCallersDropped",
    "observedThrough",
];

/// Whether writing `desired` would change `existing` (a `status` value as
/// read back); empty lists and absent fields are the same.
pub fn differs(existing: Option<&Value>, desired: &Value) -> bool {
    let normal = |v: &Value| -> Value {
        match v {
            // A ServiceRoute's `rollout` is the canary's to write, and an
            // AccessPolicy's audit fields the audit's (field managers of
            // their own: `operator::canaries`, `operator::audits`), never
            // the conditions writer's.
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, v)| {
                        !v.is_null() && *v != &json!([]) && !WRITTEN_APART.contains(&k.as_str())
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        }
    };
    existing.map(normal) != Some(normal(desired))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::PolicyKind;

    fn time(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"))
    }

    fn verdict(programmed: bool, generation: i64) -> PolicyVerdict {
        PolicyVerdict {
            kind: PolicyKind::TrafficPolicy,
            namespace: Some("shop".into()),
            name: "inventory".into(),
            generation: Some(generation),
            conditions: vec![
                VerdictCondition {
                    type_: "Accepted",
                    status: true,
                    reason: "Accepted",
                    message: "ok".into(),
                },
                VerdictCondition {
                    type_: "Programmed",
                    status: programmed,
                    reason: if programmed {
                        "Programmed"
                    } else {
                        "NamespaceNotMeshed"
                    },
                    message: "m".into(),
                },
            ],
        }
    }

    #[test]
    fn only_condition_transitions_are_worth_an_event() {
        let first = policy_status(&verdict(false, 3), &[], &time(100));
        let conds: Vec<Condition> =
            serde_json::from_value(first["conditions"].clone()).expect("conditions");
        let news: Vec<&str> = transitions(&[], &conds)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(news, ["Programmed"], "new and False only");
        assert!(transitions(&conds, &conds).is_empty(), "nothing changed");
        let fixed = policy_status(&verdict(true, 3), &conds, &time(200));
        let fixed: Vec<Condition> =
            serde_json::from_value(fixed["conditions"].clone()).expect("conditions");
        let news: Vec<(&str, &str)> = transitions(&conds, &fixed)
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(news, [("Programmed", "True")]);
    }

    #[test]
    fn an_unchanged_verdict_is_not_written_again_later() {
        let first = policy_status(&verdict(true, 3), &[], &time(100));
        let conds: Vec<Condition> =
            serde_json::from_value(first["conditions"].clone()).expect("conditions");
        // A minute later, nothing changed but the clock.
        let again = policy_status(&verdict(true, 3), &conds, &time(160));
        assert!(!differs(Some(&first), &again), "{first:#}\n{again:#}");
        assert_eq!(again["observedGeneration"], 3);

        // A status change moves that condition's transition time only.
        let changed = policy_status(&verdict(false, 3), &conds, &time(200));
        assert!(differs(Some(&first), &changed));
        assert_eq!(
            changed["conditions"][0]["lastTransitionTime"],
            first["conditions"][0]["lastTransitionTime"]
        );
        assert_ne!(
            changed["conditions"][1]["lastTransitionTime"],
            first["conditions"][1]["lastTransitionTime"]
        );

        // A new generation with the same verdict is still a write
        // (observedGeneration moves).
        let bumped = policy_status(&verdict(true, 4), &conds, &time(300));
        assert!(differs(Some(&first), &bumped));
        assert!(differs(None, &first));
    }
}
