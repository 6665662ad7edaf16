//! Status verdicts: the conditions the compiler decides for each policy.
//! The operator turns them into `status.conditions` (adding timestamps);
//! `weft compile` prints them.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde::Serialize;

use crate::api::conditions::{self, reason};

/// The weft kinds that get a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    Mesh,
    MTLSPolicy,
    TrafficPolicy,
    ServiceRoute,
    AccessPolicy,
    ExternalService,
}

/// The conditions the compiler decided for one policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    pub kind: PolicyKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The `metadata.generation` judged, for `observedGeneration`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    pub conditions: Vec<VerdictCondition>,
}

impl PolicyVerdict {
    /// The condition of a type, if decided.
    pub fn condition(&self, type_: &str) -> Option<&VerdictCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// `Kind namespace/name`, for messages.
    pub fn object(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{:?} {ns}/{}", self.kind, self.name),
            None => format!("{:?} {}", self.kind, self.name),
        }
    }
}

/// One condition, without the timestamp the operator adds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct VerdictCondition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

type VerdictKey = (PolicyKind, Option<String>, String);

/// Collects verdicts while the compiler runs.
#[derive(Default)]
pub(crate) struct Verdicts {
    done: BTreeMap<VerdictKey, PolicyVerdict>,
    /// Which Service each winning TrafficPolicy/ServiceRoute applies to, so
    /// `Programmed` can be decided once the configs exist.
    placements: Vec<(PolicyKind, String, String, super::ServiceKey)>,
}

impl Verdicts {
    pub(crate) fn start<K: kube::Resource>(&self, kind: PolicyKind, obj: &K) -> PolicyVerdict {
        PolicyVerdict {
            kind,
            namespace: obj.namespace(),
            name: obj.name_any(),
            generation: obj.meta().generation,
            conditions: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, v: PolicyVerdict) {
        self.done
            .insert((v.kind, v.namespace.clone(), v.name.clone()), v);
    }

    pub(crate) fn placed(
        &mut self,
        kind: PolicyKind,
        ns: &str,
        name: &str,
        target: super::ServiceKey,
    ) {
        self.placements
            .push((kind, ns.to_owned(), name.to_owned(), target));
    }

    pub(crate) fn take_placements(
        &mut self,
    ) -> Vec<(PolicyKind, String, String, super::ServiceKey)> {
        std::mem::take(&mut self.placements)
    }

    pub(crate) fn get_mut(
        &mut self,
        kind: PolicyKind,
        ns: &str,
        name: &str,
    ) -> Option<&mut PolicyVerdict> {
        self.done
            .get_mut(&(kind, Some(ns.to_owned()), name.to_owned()))
    }

    /// Every verdict, with `Programmed=False` filled in where nothing
    /// programmed the policy.
    pub(crate) fn finish(self) -> Vec<PolicyVerdict> {
        self.done
            .into_values()
            .map(|mut v| {
                if v.condition(conditions::PROGRAMMED).is_none() {
                    let why = v
                        .conditions
                        .iter()
                        .find(|c| !c.status)
                        .map(|c| format!("not programmed: {}", c.message))
                        .unwrap_or_else(|| "not programmed".to_owned());
                    v.not_programmed(reason::NOT_PROGRAMMED, why);
                }
                v
            })
            .collect()
    }
}

impl PolicyVerdict {
    fn set(&mut self, type_: &'static str, status: bool, reason: &'static str, message: String) {
        self.conditions.retain(|c| c.type_ != type_);
        self.conditions.push(VerdictCondition {
            type_,
            status,
            reason,
            message,
        });
    }

    pub(crate) fn accept(&mut self) {
        self.set(
            conditions::ACCEPTED,
            true,
            reason::ACCEPTED,
            "accepted".to_owned(),
        );
    }

    pub(crate) fn reject(&mut self, reason: &'static str, message: String) {
        self.set(conditions::ACCEPTED, false, reason, message);
    }

    pub(crate) fn conflict(&mut self, message: String) {
        self.reject(reason::CONFLICTED, message);
    }

    pub(crate) fn resolved(&mut self) {
        self.set(
            conditions::RESOLVED_REFS,
            true,
            reason::RESOLVED_REFS,
            "all references resolved".to_owned(),
        );
    }

    pub(crate) fn unresolved(&mut self, reason: &'static str, message: String) {
        self.set(conditions::RESOLVED_REFS, false, reason, message);
    }

    pub(crate) fn programmed(&mut self, message: String) {
        self.set(conditions::PROGRAMMED, true, reason::PROGRAMMED, message);
    }

    pub(crate) fn not_programmed(&mut self, reason: &'static str, message: String) {
        self.set(conditions::PROGRAMMED, false, reason, message);
    }
}
