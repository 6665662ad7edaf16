//! Inbound access control: the compiled AccessPolicy rules decide whether a
//! caller may reach a container port of this pod, and for HTTP, a path with
//! a method. The caller is its verified SPIFFE id; a plaintext caller has
//! none and so matches no rule (every rule names its callers).
//!
//! Which authorizations guard a port: those of the Services that select
//! this pod (by its labels) and list the port, else the namespace-wide one;
//! a port none covers admits everyone. Every workload of a namespace shares
//! one config, so a Service's guard must not leak onto another Service's
//! pods that happen to use the same port. When membership cannot be told
//! (the pod's labels are unknown, or a Service has no selector) the guard
//! applies: guarding too much refuses a caller, guarding too little would
//! admit one. With several guards, a request must satisfy every one.
//! Within an authorization a request is admitted when any rule matches it,
//! and refused (with the policy named, for metrics) otherwise.

use std::collections::{BTreeMap, HashMap};

use crate::config::{AccessRuleConfig, Authorization, InboundConfig, PortRef};
use crate::identity::SpiffeId;
use crate::proxy::http::route::path_matches;

/// The HTTP request being authorized, when the connection is HTTP.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
}

/// The outcome of a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// Refused by the AccessPolicy `namespace/name`.
    Denied {
        policy: String,
    },
}

/// This pod's container ports by name, for rules that name ports.
#[derive(Clone, Debug, Default)]
pub struct PortNames(HashMap<String, u16>);

impl PortNames {
    pub fn new(pairs: impl IntoIterator<Item = (String, u16)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    pub(crate) fn covers(&self, refs: &[PortRef], port: u16) -> bool {
        refs.iter().any(|r| match r {
            PortRef::Number(n) => *n == port,
            PortRef::Name(name) => self.0.get(name) == Some(&port),
        })
    }
}

/// This pod's labels, from the downward API.
pub type PodLabels = BTreeMap<String, String>;

/// Whether a Service guard applies to this pod. Unknown labels or an
/// unknown selector count as a member.
fn selects(auth: &Authorization, labels: Option<&PodLabels>) -> bool {
    selector_matches(auth.selector.as_ref(), labels)
}

/// Whether a Service's selector picks this pod; unknown labels or an
/// unknown selector count as a member (guarding too much refuses a
/// caller, guarding too little would admit one).
pub(crate) fn selector_matches(
    selector: Option<&BTreeMap<String, String>>,
    labels: Option<&PodLabels>,
) -> bool {
    match (selector, labels) {
        (Some(selector), Some(labels)) => selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        _ => true,
    }
}

fn rule_admits(
    rule: &AccessRuleConfig,
    names: &PortNames,
    port: u16,
    peer: Option<&SpiffeId>,
    request: Option<HttpRequest<'_>>,
) -> bool {
    let Some(peer) = peer else {
        return false;
    };
    let caller = rule.identities.iter().any(|m| {
        m.namespace == peer.namespace
            && m.service_account
                .as_deref()
                .is_none_or(|sa| sa == peer.service_account)
    });
    if !caller || !(rule.ports.is_empty() || names.covers(&rule.ports, port)) {
        return false;
    }
    // Path and method rules need an HTTP request; on a TCP connection only
    // rules without them can admit.
    if rule.paths.is_empty() && rule.methods.is_empty() {
        return true;
    }
    let Some(req) = request else {
        return false;
    };
    let path_ok = rule.paths.is_empty()
        || rule
            .paths
            .iter()
            .any(|p| path_matches(p.type_, &p.value, req.path));
    let method_ok = rule.methods.is_empty()
        || rule
            .methods
            .iter()
            .any(|m| m.as_str() == req.method.as_str());
    path_ok && method_ok
}

/// Decides one connection (`request: None`) or one HTTP request: by the
/// guards of the Services that list `port` and select this pod, every one
/// of which must admit it, else by the namespace-wide guard. Guards that
/// only audit are left out ([`check_audited`] reports them).
pub fn check(
    inbound: &InboundConfig,
    names: &PortNames,
    labels: Option<&PodLabels>,
    port: u16,
    peer: Option<&SpiffeId>,
    request: Option<HttpRequest<'_>>,
) -> Access {
    check_audited(inbound, names, labels, port, peer, request, |_, _| {})
}

/// [`check`], and for a request it admits, `audit(guard, admitted)` for
/// every auditing guard that would decide it once enforced, with the
/// verdict that guard's rules give. A request refused is never reported
/// (it never reached the app).
///
/// An auditing guard never tightens what is enforced around it: on the
/// ports of a Service whose guard only audits (and no enforcing Service
/// guard applies), a request is admitted when the namespace-wide guard
/// admits it *or* the auditing guards' own rules do (what they list they
/// already admit, as they will once enforced); so the callers refused
/// while auditing are those refused either way. An auditing
/// namespace-wide guard admits everyone.
pub fn check_audited(
    inbound: &InboundConfig,
    names: &PortNames,
    labels: Option<&PodLabels>,
    port: u16,
    peer: Option<&SpiffeId>,
    request: Option<HttpRequest<'_>>,
    mut audit: impl FnMut(&Authorization, bool),
) -> Access {
    let admits = |auth: &Authorization| {
        auth.rules
            .iter()
            .any(|r| rule_admits(r, names, port, peer, request))
    };
    let applies = |a: &&Authorization| {
        a.service.is_some() && names.covers(&a.ports, port) && selects(a, labels)
    };
    let denied = |auth: &Authorization| Access::Denied {
        policy: auth.policy.clone(),
    };
    let (mut enforcing, mut auditing) = (false, false);
    for auth in inbound.authorizations.iter().filter(applies) {
        if auth.audit {
            auditing = true;
            continue;
        }
        if !admits(auth) {
            return denied(auth);
        }
        enforcing = true;
    }
    let fallback = inbound.authorizations.iter().find(|a| a.service.is_none());
    if !enforcing && let Some(ns) = fallback.filter(|a| !a.audit) {
        let audited_admit = || {
            inbound
                .authorizations
                .iter()
                .filter(applies)
                .filter(|a| a.audit)
                .all(admits)
        };
        let passes = admits(ns) || (auditing && audited_admit());
        if !passes {
            return denied(ns);
        }
    }
    // Admitted: what the auditing guards that would decide it say.
    if inbound.authorizations.iter().any(|a| a.audit) {
        for auth in inbound.authorizations.iter().filter(|a| a.audit) {
            let decides = if auth.service.is_some() {
                applies(&auth)
            } else {
                !enforcing && !auditing
            };
            if decides {
                audit(auth, admits(auth));
            }
        }
    }
    Access::Allowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HttpMethod, PathMatchType};
    use crate::config::{IdentityMatch, InboundMode, PathMatchConfig};

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn inbound() -> InboundConfig {
        let caller = |ns: &str, sa: Option<&str>| IdentityMatch {
            namespace: ns.into(),
            service_account: sa.map(str::to_owned),
        };
        InboundConfig {
            mode: InboundMode::Permissive,
            plaintext_ports: vec![],
            authorizations: vec![
                Authorization {
                    policy: "shop/payments-callers".into(),
                    service: Some("payments".into()),
                    selector: Some([("app".to_owned(), "payments".to_owned())].into()),
                    ports: vec![PortRef::Number(8080), PortRef::Name("admin".into())],
                    rules: vec![
                        AccessRuleConfig {
                            identities: vec![caller("shop", Some("checkout"))],
                            ports: vec![],
                            paths: vec![PathMatchConfig {
                                type_: PathMatchType::PathPrefix,
                                value: "/charges".into(),
                            }],
                            methods: vec![HttpMethod::Post],
                        },
                        AccessRuleConfig {
                            identities: vec![caller("ops", None)],
                            ports: vec![PortRef::Name("admin".into())],
                            paths: vec![],
                            methods: vec![],
                        },
                    ],
                    audit: false,
                    revision: String::new(),
                },
                Authorization {
                    policy: "shop/namespace-wide".into(),
                    service: None,
                    selector: None,
                    ports: vec![],
                    rules: vec![AccessRuleConfig {
                        identities: vec![caller("shop", None)],
                        ports: vec![],
                        paths: vec![],
                        methods: vec![],
                    }],
                    audit: false,
                    revision: String::new(),
                },
            ],
            rate_limits: Vec::new(),
        }
    }

    #[test]
    fn rules_decide_by_identity_port_path_and_method() {
        let names = PortNames::new([("admin".to_owned(), 9090)]);
        let cfg = inbound();
        let (post, get) = (http::Method::POST, http::Method::GET);
        let req = |method, path| Some(HttpRequest { method, path });
        let checkout = id("shop", "checkout");
        let ops = id("ops", "oncall");
        let cart = id("shop", "cart");
        let denied = |p: &str| Access::Denied { policy: p.into() };
        /// What, port, caller, request, expected.
        type Case<'a> = (
            &'a str,
            u16,
            Option<&'a SpiffeId>,
            Option<HttpRequest<'a>>,
            Access,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "checkout may POST a charge",
                8080,
                Some(&checkout),
                req(&post, "/charges/7"),
                Access::Allowed,
            ),
            (
                "but not GET it",
                8080,
                Some(&checkout),
                req(&get, "/charges/7"),
                denied("shop/payments-callers"),
            ),
            (
                "nor POST elsewhere",
                8080,
                Some(&checkout),
                req(&post, "/refunds"),
                denied("shop/payments-callers"),
            ),
            (
                "nor open raw TCP (the rule needs a path)",
                8080,
                Some(&checkout),
                None,
                denied("shop/payments-callers"),
            ),
            (
                "cart is not listed",
                8080,
                Some(&cart),
                req(&post, "/charges"),
                denied("shop/payments-callers"),
            ),
            (
                "plaintext has no identity",
                8080,
                None,
                req(&post, "/charges"),
                denied("shop/payments-callers"),
            ),
            (
                "ops reaches the named admin port",
                9090,
                Some(&ops),
                None,
                Access::Allowed,
            ),
            (
                "but not the API port",
                8080,
                Some(&ops),
                req(&get, "/"),
                denied("shop/payments-callers"),
            ),
            (
                "other ports fall to the namespace-wide guard",
                7000,
                Some(&cart),
                None,
                Access::Allowed,
            ),
            (
                "which refuses other namespaces",
                7000,
                Some(&ops),
                None,
                denied("shop/namespace-wide"),
            ),
        ];
        for (what, port, peer, request, want) in cases {
            assert_eq!(
                check(&cfg, &names, None, port, peer, request),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn an_unguarded_port_admits_everyone() {
        let names = PortNames::default();
        let mut cfg = inbound();
        cfg.authorizations.pop();
        assert_eq!(check(&cfg, &names, None, 7000, None, None), Access::Allowed);
    }

    /// Two Services on the same container port, over different pods: each
    /// pod is guarded by its own Service's policy only.
    #[test]
    fn a_services_guard_stays_on_the_pods_it_selects() {
        let service = |name: &str, policy: &str, allowed_sa: Option<&str>| Authorization {
            policy: format!("shop/{policy}"),
            service: Some(name.into()),
            selector: Some([("app".to_owned(), name.to_owned())].into()),
            ports: vec![PortRef::Number(8080)],
            rules: vec![AccessRuleConfig {
                identities: vec![IdentityMatch {
                    namespace: "shop".into(),
                    service_account: allowed_sa.map(str::to_owned),
                }],
                ports: vec![],
                paths: vec![],
                methods: vec![],
            }],
            audit: false,
            revision: String::new(),
        };
        let cfg = InboundConfig {
            mode: InboundMode::Permissive,
            plaintext_ports: vec![],
            authorizations: vec![
                // Sorts first by name, as the compiler orders them.
                service("a-web", "web-open", None),
                service("billing", "billing-ops-only", Some("ops")),
            ],
            rate_limits: Vec::new(),
        };
        let names = PortNames::default();
        let (cart, ops) = (id("shop", "cart"), id("shop", "ops"));
        let pod = |app: &str| PodLabels::from([("app".to_owned(), app.to_owned())]);
        let billing = pod("billing");
        let web = pod("a-web");
        let at = |labels: Option<&PodLabels>, peer: &SpiffeId| {
            check(&cfg, &names, labels, 8080, Some(peer), None)
        };
        assert_eq!(
            at(Some(&billing), &cart),
            Access::Denied {
                policy: "shop/billing-ops-only".into()
            },
            "the open web policy must not admit cart into billing"
        );
        assert_eq!(at(Some(&billing), &ops), Access::Allowed);
        assert_eq!(at(Some(&web), &cart), Access::Allowed);
        // Labels unknown: both guards apply, and both must admit.
        assert_eq!(
            at(None, &cart),
            Access::Denied {
                policy: "shop/billing-ops-only".into()
            }
        );
        assert_eq!(at(None, &ops), Access::Allowed);
        // A pod neither Service selects is not guarded by them.
        assert_eq!(at(Some(&pod("cart")), &cart), Access::Allowed);
    }

    /// An auditing guard reports what its rules would have done, and
    /// neither loosens nor tightens another: on a Service whose guard
    /// only audits, what the namespace-wide guard or the audited rules
    /// admit passes; a request refused is not reported (it never reached
    /// the app).
    #[test]
    fn an_auditing_guard_admits_and_reports_what_it_would_have_done() {
        let names = PortNames::new([("admin".to_owned(), 9090)]);
        let mut cfg = inbound();
        cfg.authorizations[0].audit = true;
        let (post, get) = (http::Method::POST, http::Method::GET);
        let req = |method, path| Some(HttpRequest { method, path });
        let (checkout, cart, ops) = (
            id("shop", "checkout"),
            id("shop", "cart"),
            id("ops", "oncall"),
        );
        let run = |cfg: &InboundConfig, peer: &SpiffeId, request| {
            let mut seen = Vec::new();
            let access = check_audited(cfg, &names, None, 8080, Some(peer), request, |a, ok| {
                seen.push((a.policy.clone(), ok));
            });
            (access, seen)
        };
        let audited = |ok: bool| vec![("shop/payments-callers".to_owned(), ok)];
        // Listed: admitted, and the audit says the rules admit it.
        assert_eq!(
            run(&cfg, &checkout, req(&post, "/charges")),
            (Access::Allowed, audited(true))
        );
        // Not listed by the audited policy, but of the namespace the
        // enforcing namespace-wide guard admits: admitted, reported.
        assert_eq!(
            run(&cfg, &cart, req(&get, "/charges")),
            (Access::Allowed, audited(false))
        );
        // The namespace-wide guard still refuses another namespace the
        // audited rules do not admit either, and that request is not
        // reported as audited.
        assert_eq!(
            run(&cfg, &ops, req(&get, "/")),
            (
                Access::Denied {
                    policy: "shop/namespace-wide".into()
                },
                vec![]
            )
        );
        // Auditing never tightens: what the audited policy's own rules
        // admit passes although the namespace guard would refuse it.
        let ops_admin = |cfg: &InboundConfig| {
            let mut seen = Vec::new();
            let access = check_audited(cfg, &names, None, 9090, Some(&ops), None, |a, ok| {
                seen.push((a.policy.clone(), ok));
            });
            (access, seen)
        };
        assert_eq!(ops_admin(&cfg), (Access::Allowed, audited(true)));
        // Without the namespace guard: everyone admitted, refusals reported.
        cfg.authorizations.pop();
        assert_eq!(
            run(&cfg, &ops, req(&get, "/")),
            (Access::Allowed, audited(false))
        );
        // And `check` alone admits them too, reporting nothing.
        assert_eq!(
            check(&cfg, &names, None, 8080, Some(&ops), None),
            Access::Allowed
        );
        // An auditing namespace-wide guard reports for the ports no
        // enforcing Service guard decides.
        let mut cfg = inbound();
        cfg.authorizations[1].audit = true;
        let mut seen = Vec::new();
        let access = check_audited(&cfg, &names, None, 7000, Some(&ops), None, |a, ok| {
            seen.push((a.policy.clone(), ok));
        });
        assert_eq!(
            (access, seen),
            (
                Access::Allowed,
                vec![("shop/namespace-wide".to_owned(), false)]
            )
        );
    }

    /// The namespace-wide fallback is the namespace's policy, never a
    /// Service's guard that lists no port.
    #[test]
    fn a_service_guard_without_ports_is_not_the_namespace_fallback() {
        let cfg = InboundConfig {
            mode: InboundMode::Permissive,
            plaintext_ports: vec![],
            authorizations: vec![Authorization {
                policy: "shop/udp-only".into(),
                service: Some("dns".into()),
                selector: None,
                ports: vec![],
                rules: vec![],
                audit: false,
                revision: String::new(),
            }],
            rate_limits: Vec::new(),
        };
        let cart = id("shop", "cart");
        assert_eq!(
            check(&cfg, &PortNames::default(), None, 8080, Some(&cart), None),
            Access::Allowed
        );
    }
}
