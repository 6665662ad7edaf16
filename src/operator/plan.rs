//! Which namespaces a change affects, decided from the compiler's output
//! rather than by hand-written rules per kind: every namespace gets a
//! fingerprint of everything its reconcile reads from the compile (its
//! config's generation, its ServiceAccounts, the certificate lifetime, the
//! verdicts of its MTLSPolicies), and a change re-reconciles exactly the
//! namespaces whose fingerprint moved. A TrafficPolicy on `inventory`
//! therefore reaches the namespaces whose configs include `inventory` (the
//! client namespaces of a changed Service included) and no other.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use kube::ResourceExt;

use crate::compile::{ClusterFacts, Compiled, PolicyKind};

/// A namespace's fingerprint, by namespace name.
pub type Fingerprints = BTreeMap<String, u64>;

/// Fingerprints of every namespace in `facts`, from `compiled`.
pub fn fingerprints(facts: &ClusterFacts, compiled: &Compiled) -> Fingerprints {
    let mut accounts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sa in &facts.service_accounts {
        accounts
            .entry(sa.namespace().unwrap_or_default())
            .or_default()
            .insert(sa.name_any());
    }
    let ttl = facts
        .meshes
        .iter()
        .find(|m| m.name_any() == crate::api::MESH_NAME)
        .map(|m| m.spec.certificates.workload_ttl.as_std());
    facts
        .namespaces
        .iter()
        .map(|ns| {
            let name = ns.name_any();
            let mut h = DefaultHasher::new();
            compiled
                .configs
                .get(&name)
                .map(|c| &c.generation)
                .hash(&mut h);
            accounts.get(&name).hash(&mut h);
            ttl.hash(&mut h);
            for v in compiled.verdicts.iter().filter(|v| {
                v.kind == PolicyKind::MTLSPolicy && v.namespace.as_deref() == Some(&name)
            }) {
                (&v.name, v.generation, &v.conditions).hash(&mut h);
            }
            (name, h.finish())
        })
        .collect()
}

/// The namespaces whose fingerprint differs between `prev` and `next`,
/// including namespaces that appeared or went away.
pub fn affected(prev: &Fingerprints, next: &Fingerprints) -> BTreeSet<String> {
    let gone = prev.keys().filter(|k| !next.contains_key(*k));
    let moved = next.iter().filter(|(k, v)| prev.get(*k) != Some(v));
    gone.chain(moved.map(|(k, _)| k)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use k8s_openapi::api::core::v1::{
        Namespace, Service, ServiceAccount, ServicePort, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(str::to_owned),
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        }
    }

    fn namespace(name: &str, meshed: bool) -> Namespace {
        let mut m = meta(None, name);
        if meshed {
            m.labels = Some([("weft.dev/inject".to_owned(), "enabled".to_owned())].into());
        }
        Namespace {
            metadata: m,
            ..Namespace::default()
        }
    }

    fn service(ns: &str, name: &str) -> Service {
        Service {
            metadata: meta(Some(ns), name),
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.0.0.1".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn traffic_policy(ns: &str, target: &str, attempts: u32) -> crate::api::TrafficPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"namespace": ns, "name": target},
            "spec": {"targetRef": {"kind": "Service", "name": target},
                     "retries": {"attempts": attempts}},
        }))
        .expect("a valid TrafficPolicy")
    }

    fn world() -> ClusterFacts {
        ClusterFacts {
            namespaces: vec![
                namespace("shop", true),
                namespace("payments", true),
                namespace("legacy", false),
            ],
            services: vec![service("shop", "inventory"), service("payments", "ledger")],
            ..ClusterFacts::default()
        }
    }

    fn plan(before: &ClusterFacts, after: &ClusterFacts) -> BTreeSet<String> {
        affected(
            &fingerprints(before, &compile(before)),
            &fingerprints(after, &compile(after)),
        )
    }

    #[test]
    fn nothing_changed_nothing_to_do() {
        let w = world();
        assert!(plan(&w, &w).is_empty());
    }

    #[test]
    fn a_traffic_policy_reaches_the_namespaces_that_call_its_service() {
        let before = world();
        let mut after = before.clone();
        after
            .traffic_policies
            .push(traffic_policy("shop", "inventory", 3));
        // Both meshed namespaces may call inventory; the unmeshed one has
        // no config.
        assert_eq!(plan(&before, &after), set(&["payments", "shop"]));

        // The same policy, another value: the same two, nothing else.
        let mut again = after.clone();
        again.traffic_policies = vec![traffic_policy("shop", "inventory", 4)];
        assert_eq!(plan(&after, &again), set(&["payments", "shop"]));
    }

    #[test]
    fn a_service_account_touches_only_its_namespace() {
        let before = world();
        let mut after = before.clone();
        after.service_accounts.push(ServiceAccount {
            metadata: meta(Some("payments"), "ledger"),
            ..ServiceAccount::default()
        });
        assert_eq!(plan(&before, &after), set(&["payments"]));
    }

    #[test]
    fn labelling_and_deleting_namespaces() {
        let before = world();
        let mut after = before.clone();
        after.namespaces[2] = namespace("legacy", true);
        // legacy gets a config; the others now see legacy's Services as
        // meshed (it has none), so only legacy moves.
        assert_eq!(plan(&before, &after), set(&["legacy"]));

        let mut gone = before.clone();
        gone.namespaces.remove(1);
        gone.services.remove(1);
        // payments went away, and shop no longer reaches ledger.
        assert_eq!(plan(&before, &gone), set(&["payments", "shop"]));
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }
}
