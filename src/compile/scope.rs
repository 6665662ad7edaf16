//! Outbound scope: which Services a namespace's config lists. By default
//! every Service of the mesh its identities may reach; a namespace that
//! declares what its pods call (`weft.dev/calls`) gets only those, its own
//! namespace's, and the backends their routes split to, so its config
//! and its `weft-endpoints` grow with what it calls rather than with the
//! cluster (as Istio's `Sidecar` egress hosts and Linkerd's on-demand
//! discovery keep each proxy's view small).
//!
//! A Service left out is still reachable: its proxy calls it as an
//! unknown address (its ClusterIP, the default policy, plaintext), so a
//! STRICT server refuses the call, and a staged rollout sees it as
//! plaintext from a meshed pod and holds. The entries to add are then the
//! Services named in those refusals.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;

use super::ServiceKey;
use crate::config::OutboundService;

/// The Namespace annotation listing what its pods call: comma-separated
/// `namespace` (all its Services) or `namespace/service` entries, or `*`
/// (everything: the same as no annotation).
pub const CALLS_ANNOTATION: &str = "weft.dev/calls";

/// What a namespace's config lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every Service (no annotation, `*`, or an annotation that does not
    /// parse: a typo must not cut a namespace off).
    #[default]
    All,
    /// These namespaces' Services and these Services, plus the namespace's
    /// own.
    Only {
        namespaces: BTreeSet<String>,
        services: BTreeSet<ServiceKey>,
    },
}

impl Scope {
    /// The scope a Namespace declares. An annotation that does not parse
    /// is an error naming the entry and the fix; the caller keeps
    /// [`Scope::All`] for it and says so.
    pub fn of(ns: &Namespace) -> Result<Scope, String> {
        match ns.annotations().get(CALLS_ANNOTATION) {
            None => Ok(Scope::All),
            Some(value) => parse(value).map_err(|entry| {
                format!(
                    "annotation {CALLS_ANNOTATION} of namespace {name}: {entry:?} is not a namespace, \
                     namespace/service or `*` (lowercase DNS labels, comma-separated, such as \
                     `payments, catalog/search`; `{name}` alone for its own Services only); \
                     until it is fixed this namespace's config lists every Service it may reach",
                    name = ns.name_any()
                )
            }),
        }
    }

    fn admits(&self, own: &str, (ns, name): &ServiceKey) -> bool {
        match self {
            Scope::All => true,
            Scope::Only {
                namespaces,
                services,
            } => {
                ns == own
                    || namespaces.contains(ns)
                    || services.contains(&(ns.clone(), name.clone()))
            }
        }
    }
}

/// Parses the annotation's value; the first bad entry is the error.
fn parse(value: &str) -> Result<Scope, String> {
    // Empty is more likely a template's blank or an attempt to clear the
    // annotation than "call nothing": its own name says that.
    if value.trim().is_empty() {
        return Err(value.to_owned());
    }
    let mut namespaces = BTreeSet::new();
    let mut services = BTreeSet::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            return Ok(Scope::All);
        }
        match entry.split_once('/') {
            None if is_dns_label(entry) => {
                namespaces.insert(entry.to_owned());
            }
            Some((ns, name)) if is_dns_label(ns) && is_dns_label(name) => {
                services.insert((ns.to_owned(), name.to_owned()));
            }
            _ => return Err(entry.to_owned()),
        }
    }
    Ok(Scope::Only {
        namespaces,
        services,
    })
}

/// RFC 1123 label, as namespace and Service names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The Services of `entries` a namespace `own` with `scope` lists (None:
/// all of them): those the scope admits and, transitively, every backend
/// their routes may send to (a canary split to a Service outside the list
/// must still reach it with its policy and identity).
pub(crate) fn select<'a>(
    scope: &Scope,
    own: &str,
    entries: &'a BTreeMap<&ServiceKey, OutboundService>,
) -> Option<BTreeSet<&'a ServiceKey>> {
    if *scope == Scope::All {
        return None;
    }
    let mut chosen: BTreeSet<&ServiceKey> = entries
        .keys()
        .copied()
        .filter(|k| scope.admits(own, k))
        .collect();
    let mut pending: Vec<&ServiceKey> = chosen.iter().copied().collect();
    while let Some(key) = pending.pop() {
        // A backend is `name.namespace` (neither holds a dot).
        let backends = entries[key]
            .routes
            .iter()
            .flat_map(|r| &r.backends)
            .filter_map(|b| {
                let (name, ns) = b.service.split_once('.')?;
                let (found, _) = entries.get_key_value(&(ns.to_owned(), name.to_owned()))?;
                Some(*found)
            });
        for backend in backends {
            if chosen.insert(backend) {
                pending.push(backend);
            }
        }
    }
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(annotation: Option<&str>) -> Namespace {
        let mut meta = serde_json::json!({ "name": "shop" });
        if let Some(a) = annotation {
            meta["annotations"] = serde_json::json!({ CALLS_ANNOTATION: a });
        }
        serde_json::from_value(serde_json::json!({ "metadata": meta })).expect("namespace")
    }

    #[test]
    fn the_annotation_parses_into_namespaces_and_services() {
        assert_eq!(Scope::of(&ns(None)), Ok(Scope::All));
        assert_eq!(Scope::of(&ns(Some(" payments , *"))), Ok(Scope::All));
        let Ok(Scope::Only {
            namespaces,
            services,
        }) = Scope::of(&ns(Some("payments, catalog/search,, ")))
        else {
            panic!("a scope");
        };
        assert_eq!(namespaces, BTreeSet::from(["payments".to_owned()]));
        assert_eq!(
            services,
            BTreeSet::from([("catalog".to_owned(), "search".to_owned())])
        );
        assert!(
            Scope::of(&ns(Some(" "))).is_err(),
            "empty: a blank, not \"nothing\""
        );
        for bad in ["Payments", "catalog/", "a/b/c", "search.catalog", "-x"] {
            let err = Scope::of(&ns(Some(&format!("payments, {bad}")))).expect_err(bad);
            assert!(
                err.contains(CALLS_ANNOTATION) && err.contains(&format!("{bad:?}")),
                "{err}"
            );
            assert!(err.contains("every Service"), "says what happens: {err}");
        }
    }
}
