//! Table-driven tests of the compiler's rules, built from small object
//! builders (no API server, no files).

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::api::conditions::{self, reason};
use crate::config::{HttpMethod, RetryOn};

fn meta(ns: Option<&str>, name: &str, age_secs: Option<i64>) -> Value {
    let mut m = json!({ "name": name, "generation": 1 });
    if let Some(ns) = ns {
        m["namespace"] = ns.into();
    }
    if let Some(secs) = age_secs {
        // Older objects have smaller timestamps.
        let ts = Timestamp::from_second(1_700_000_000 + secs).expect("timestamp");
        m["creationTimestamp"] = serde_json::to_value(Time(ts)).expect("time");
    }
    m
}

fn ns(name: &str, meshed: bool) -> Namespace {
    let mut m = meta(None, name, None);
    if meshed {
        m["labels"] = json!({ INJECT_LABEL: INJECT_ENABLED });
    }
    serde_json::from_value(json!({ "metadata": m })).expect("namespace")
}

fn svc(ns: &str, name: &str) -> Service {
    svc_ports(
        ns,
        name,
        json!([{ "name": "http", "port": 80, "targetPort": 8080 }]),
    )
}

fn svc_ports(ns: &str, name: &str, ports: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": meta(Some(ns), name, None),
        "spec": { "clusterIP": "10.96.0.1", "ports": ports },
    }))
    .expect("service")
}

/// `svc` selecting the pods labelled `app: <app>`.
fn selecting(mut svc: Service, app: &str) -> Service {
    svc.spec.as_mut().expect("spec").selector = Some([("app".to_owned(), app.to_owned())].into());
    svc
}

/// A TrafficPolicy named after the Service it targets, with an
/// `inboundRateLimit`.
fn inbound_tp(ns: &str, service: &str, limit: Value) -> TrafficPolicy {
    tp(
        ns,
        service,
        None,
        service,
        json!({ "inboundRateLimit": limit }),
    )
}

fn sa(ns: &str, name: &str) -> ServiceAccount {
    serde_json::from_value(json!({ "metadata": meta(Some(ns), name, None) })).expect("sa")
}

/// A weft policy from its spec; `age` orders conflicts (smaller is older).
fn policy<K: serde::de::DeserializeOwned>(
    ns: &str,
    name: &str,
    age: Option<i64>,
    spec: Value,
) -> K {
    serde_json::from_value(json!({ "metadata": meta(Some(ns), name, age), "spec": spec }))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn tp(ns: &str, name: &str, age: Option<i64>, target: &str, extra: Value) -> TrafficPolicy {
    let mut spec = json!({ "targetRef": { "kind": "Service", "name": target } });
    merge(&mut spec, extra);
    policy(ns, name, age, spec)
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), extra) {
        a.extend(b);
    }
}

/// Two meshed namespaces, `shop` (client) and `payments`, and an unmeshed
/// `legacy`.
fn base() -> ClusterFacts {
    ClusterFacts {
        namespaces: vec![ns("shop", true), ns("payments", true), ns("legacy", false)],
        services: vec![
            svc("shop", "checkout"),
            svc("shop", "checkout-canary"),
            svc("shop", "inventory"),
            svc("payments", "payments"),
            svc("legacy", "mainframe"),
        ],
        service_accounts: vec![
            sa("shop", "checkout"),
            sa("shop", "cart"),
            sa("payments", "payments"),
        ],
        ..Default::default()
    }
}

fn verdict<'a>(c: &'a Compiled, kind: PolicyKind, name: &str) -> &'a PolicyVerdict {
    c.verdicts
        .iter()
        .find(|v| v.kind == kind && v.name == name)
        .unwrap_or_else(|| panic!("no verdict for {kind:?} {name}: {:#?}", c.verdicts))
}

fn cond<'a>(v: &'a PolicyVerdict, type_: &str) -> &'a VerdictCondition {
    v.condition(type_)
        .unwrap_or_else(|| panic!("{} has no {type_}: {:#?}", v.object(), v.conditions))
}

fn service<'a>(c: &'a Compiled, client: &str, ns: &str, name: &str) -> Option<&'a OutboundService> {
    c.configs[client]
        .outbound
        .services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
}

#[test]
fn only_meshed_namespaces_get_a_config() {
    let c = compile(&base());
    assert_eq!(c.configs.keys().collect::<Vec<_>>(), ["payments", "shop"]);
    let mainframe =
        service(&c, "shop", "legacy", "mainframe").expect("unmeshed services are callable");
    assert!(
        mainframe.mesh.is_none(),
        "an unmeshed Service is called in plaintext"
    );
    let payments = service(&c, "shop", "payments", "payments").expect("payments listed");
    assert_eq!(
        payments.mesh.as_ref().map(|m| m.namespace.as_str()),
        Some("payments")
    );
    assert_eq!(
        payments.hostnames,
        [
            "payments.payments.svc.cluster.local",
            "payments.payments.svc",
            "payments.payments"
        ]
    );
    assert_eq!(payments.ports[0].target_port, PortRef::Number(8080));
}

#[test]
fn missing_targets_are_unresolved_and_emit_nothing() {
    let mut f = base();
    f.traffic_policies.push(tp(
        "shop",
        "ghost-tp",
        None,
        "ghost",
        json!({ "timeout": "1s" }),
    ));
    f.service_routes.push(policy(
        "shop",
        "ghost-route",
        None,
        json!({ "parentRef": { "name": "ghost" }, "rules": [{ "backendRefs": [{ "name": "checkout" }] }] }),
    ));
    f.access_policies.push(policy(
        "shop",
        "ghost-ap",
        None,
        json!({ "targetRef": { "kind": "Service", "name": "ghost" }, "rules": [] }),
    ));
    let c = compile(&f);
    for (kind, name) in [
        (PolicyKind::TrafficPolicy, "ghost-tp"),
        (PolicyKind::ServiceRoute, "ghost-route"),
        (PolicyKind::AccessPolicy, "ghost-ap"),
    ] {
        let v = verdict(&c, kind, name);
        let rr = cond(v, conditions::RESOLVED_REFS);
        assert!(!rr.status, "{kind:?}");
        assert_eq!(rr.reason, reason::TARGET_NOT_FOUND);
        assert!(
            rr.message.contains("Service shop/ghost not found"),
            "{}",
            rr.message
        );
        assert!(!cond(v, conditions::PROGRAMMED).status);
    }
    // Nothing was emitted: no Service carries a policy or routes, and no
    // deny-all authorization appeared.
    for config in c.configs.values() {
        assert!(
            config
                .outbound
                .services
                .iter()
                .all(|s| s.policy.is_none() && s.routes.is_empty())
        );
        assert!(config.inbound.authorizations.is_empty());
    }
}

#[test]
fn missing_backend_is_dropped_and_its_weight_shared() {
    let mut f = base();
    f.service_routes.push(policy(
        "shop",
        "canary",
        None,
        json!({ "parentRef": { "name": "checkout" }, "rules": [{ "backendRefs": [
            { "name": "checkout", "weight": 80 },
            { "name": "checkout-v3", "weight": 10 },
            { "name": "checkout-canary", "weight": 10 },
        ]}]}),
    ));
    let c = compile(&f);
    let route = &service(&c, "shop", "shop", "checkout")
        .expect("checkout")
        .routes[0];
    let backends: Vec<(&str, u32)> = route
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.weight))
        .collect();
    // Weights are relative, so dropping 10 of 100 leaves 80:10, i.e. the
    // missing share is spread proportionally.
    assert_eq!(
        backends,
        [("checkout.shop", 80), ("checkout-canary.shop", 10)]
    );
    let v = verdict(&c, PolicyKind::ServiceRoute, "canary");
    let rr = cond(v, conditions::RESOLVED_REFS);
    assert_eq!((rr.status, rr.reason), (false, reason::BACKEND_NOT_FOUND));
    assert!(
        rr.message.contains("shop/checkout-v3 not found") && rr.message.contains("10 of 100"),
        "{}",
        rr.message
    );
    assert!(
        cond(v, conditions::PROGRAMMED).status,
        "the route still works with what exists"
    );
}

/// A progressive canary's share comes from the route's status: the first
/// step for a new or edited rollout, the step in force, none after an
/// abort, all after promotion; the stable backends share the rest in
/// proportion to their own weights, and a rule without the canary keeps
/// its weights.
#[test]
fn a_canary_takes_the_share_its_status_puts_in_force() {
    let weights = |status: Option<Value>| {
        let mut f = base();
        let mut sr: ServiceRoute = policy(
            "shop",
            "checkout",
            None,
            json!({ "parentRef": { "name": "checkout" },
                "rules": [
                    { "name": "main", "backendRefs": [
                        { "name": "checkout", "weight": 60 },
                        { "name": "inventory", "weight": 20 },
                        { "name": "checkout-canary", "weight": 20 },
                    ]},
                    { "name": "other", "matches": [{ "path": { "type": "PathPrefix", "value": "/v1" } }],
                      "backendRefs": [{ "name": "checkout", "weight": 3 }, { "name": "inventory", "weight": 1 }] },
                ],
                "rollout": { "canary": "checkout-canary", "steps": [5, 25, 50, 100] } }),
        );
        if let Some(mut st) = status {
            // Written for this rollout, unless the test says otherwise.
            if st["revision"].is_null() {
                st["revision"] = json!(sr.canary_revision().expect("a rollout"));
            }
            sr.status = Some(serde_json::from_value(json!({ "rollout": st })).expect("status"));
        }

        f.service_routes.push(sr);
        let c = compile(&f);
        let routes = &service(&c, "shop", "shop", "checkout")
            .expect("checkout")
            .routes;
        let of = |i: usize| -> Vec<(String, u32)> {
            routes[i]
                .backends
                .iter()
                .map(|b| (b.service.clone(), b.weight))
                .collect()
        };
        assert_eq!(
            of(1),
            [
                ("checkout.shop".to_owned(), 3),
                ("inventory.shop".to_owned(), 1)
            ]
        );
        of(0)
    };
    let split = |canary: u32, checkout: u32, inventory: u32| {
        vec![
            ("checkout.shop".to_owned(), checkout),
            ("inventory.shop".to_owned(), inventory),
            ("checkout-canary.shop".to_owned(), canary),
        ]
    };
    let status = |phase: &str, step: u32, generation: i64| {
        json!({ "observedGeneration": generation, "phase": phase, "step": step,
                "weight": 0, "stepSince": "2026-12-07T10:00:00Z", "verdict": "Observing" })
    };
    assert_eq!(weights(None), split(5_000, 71_250, 23_750));
    assert_eq!(
        weights(Some(status("Progressing", 2, 1))),
        split(25_000, 56_250, 18_750)
    );
    assert_eq!(
        weights(Some(status("Paused", 3, 1))),
        split(50_000, 37_500, 12_500)
    );
    assert_eq!(
        weights(Some(status("Aborted", 2, 1))),
        split(0, 75_000, 25_000)
    );
    assert_eq!(
        weights(Some(status("Promoted", 4, 1))),
        split(100_000, 0, 0)
    );
    // Written for another rollout (its steps or its rules' backends
    // changed): it starts again from step 1.
    let mut stale = status("Aborted", 2, 1);
    stale["revision"] = json!("0123456789abcdef");
    assert_eq!(weights(Some(stale)), split(5_000, 71_250, 23_750));
}

/// What a canary runs for: its rollout and its rules' backends. Editing
/// anything else (a timeout, a match) leaves it where it stands.
#[test]
fn only_a_change_of_the_rollout_or_its_backends_restarts_a_canary() {
    let route = |timeout: &str, weight: u32, steps: Value| -> ServiceRoute {
        policy(
            "shop",
            "checkout",
            None,
            json!({ "parentRef": { "name": "checkout" },
                "rules": [{ "timeout": timeout, "backendRefs": [
                    { "name": "checkout", "weight": weight },
                    { "name": "checkout-canary", "weight": 10 },
                ]}],
                "rollout": { "canary": "checkout-canary", "steps": steps } }),
        )
    };
    let base = route("1s", 90, json!([5, 50, 100])).canary_revision();
    assert!(base.is_some());
    assert_eq!(route("3s", 90, json!([5, 50, 100])).canary_revision(), base);
    assert_ne!(route("1s", 80, json!([5, 50, 100])).canary_revision(), base);
    assert_ne!(
        route("1s", 90, json!([10, 50, 100])).canary_revision(),
        base
    );
}

#[test]
fn a_rule_with_no_existing_backend_answers_503_rather_than_falling_through() {
    let mut f = base();
    f.service_routes.push(policy(
        "shop",
        "gone",
        None,
        json!({ "parentRef": { "name": "checkout" }, "rules": [{ "backendRefs": [{ "name": "nope" }] }] }),
    ));
    let c = compile(&f);
    let route = &service(&c, "shop", "shop", "checkout")
        .expect("checkout")
        .routes[0];
    assert!(route.backends.is_empty());
    let rr = cond(
        verdict(&c, PolicyKind::ServiceRoute, "gone"),
        conditions::RESOLVED_REFS,
    );
    assert!(rr.message.contains("503"), "{}", rr.message);
}

#[test]
fn conflicts_go_to_the_oldest_then_the_name() {
    struct Case {
        what: &'static str,
        // (name, age): the expected winner first after ordering.
        policies: [(&'static str, Option<i64>); 2],
        winner: &'static str,
    }
    let cases = [
        Case {
            what: "older timestamp wins",
            policies: [("b-new", Some(100)), ("z-old", Some(10))],
            winner: "z-old",
        },
        Case {
            what: "same timestamp: name",
            policies: [("b", Some(10)), ("a", Some(10))],
            winner: "a",
        },
        Case {
            what: "stored beats unstored",
            policies: [("a", None), ("b", Some(10))],
            winner: "b",
        },
    ];
    for case in cases {
        let mut f = base();
        for (i, (name, age)) in case.policies.iter().enumerate() {
            let timeout = format!("{}s", i + 1);
            f.traffic_policies.push(tp(
                "shop",
                name,
                *age,
                "inventory",
                json!({ "timeout": timeout }),
            ));
            f.access_policies.push(policy(
                "shop",
                name,
                *age,
                json!({ "targetRef": { "kind": "Service", "name": "inventory" },
                        "rules": [{ "from": [{ "namespace": "shop" }], "ports": [80] }] }),
            ));
        }
        let c = compile(&f);
        let loser = case
            .policies
            .iter()
            .map(|p| p.0)
            .find(|n| *n != case.winner)
            .expect("two");
        for kind in [PolicyKind::TrafficPolicy, PolicyKind::AccessPolicy] {
            let win = cond(verdict(&c, kind, case.winner), conditions::ACCEPTED);
            assert!(win.status, "{}: {kind:?} winner", case.what);
            let lose = cond(verdict(&c, kind, loser), conditions::ACCEPTED);
            assert_eq!(
                (lose.status, lose.reason),
                (false, reason::CONFLICTED),
                "{}: {kind:?}",
                case.what
            );
            assert!(
                lose.message.contains(&format!("shop/{}", case.winner)),
                "{}: {}",
                case.what,
                lose.message
            );
        }
        let inv = service(&c, "shop", "shop", "inventory").map(|s| s.policy.clone());
        let source = inv.flatten().and_then(|p| p.source);
        assert_eq!(
            source,
            Some(format!("shop/{}", case.winner)),
            "{}",
            case.what
        );
        let auth = &c.configs["shop"].inbound.authorizations;
        assert_eq!(auth.len(), 1, "{}", case.what);
        assert_eq!(
            auth[0].policy,
            format!("shop/{}", case.winner),
            "{}",
            case.what
        );
    }
}

#[test]
fn conflicting_routes_and_mtls_policies_keep_the_oldest() {
    let mut f = base();
    for (name, age, weight) in [("new", 50, 1), ("old", 5, 7)] {
        f.service_routes.push(policy(
            "shop",
            name,
            Some(age),
            json!({ "parentRef": { "name": "checkout" }, "rules": [{ "backendRefs": [{ "name": "checkout", "weight": weight }] }] }),
        ));
        f.mtls_policies.push(policy(
            "shop",
            name,
            Some(age),
            json!({ "mode": if name == "old" { "Strict" } else { "Permissive" }, "rollout": { "strategy": "Immediate" } }),
        ));
    }
    let c = compile(&f);
    assert_eq!(
        service(&c, "shop", "shop", "checkout")
            .expect("checkout")
            .routes[0]
            .backends[0]
            .weight,
        7
    );
    assert_eq!(c.configs["shop"].inbound.mode, InboundMode::Strict);
    for kind in [PolicyKind::ServiceRoute, PolicyKind::MTLSPolicy] {
        assert_eq!(
            cond(verdict(&c, kind, "new"), conditions::ACCEPTED).reason,
            reason::CONFLICTED,
            "{kind:?}"
        );
    }
}

#[test]
fn retries_are_safe_by_default() {
    type Check = fn(&crate::config::RetryConfig);
    let cases: [(&str, Value, Check); 4] = [
        (
            "no policy: only connection failures, once",
            Value::Null,
            |r| {
                assert_eq!(r.max_retries, 1);
                assert_eq!(r.retry_on, [RetryOn::ConnectFailure]);
            },
        ),
        ("empty retries block", json!({ "retries": {} }), |r| {
            assert_eq!(r.max_retries, 2);
            assert!(
                !r.methods.contains(&HttpMethod::Post) && !r.methods.contains(&HttpMethod::Patch)
            );
            for m in [
                HttpMethod::Get,
                HttpMethod::Head,
                HttpMethod::Options,
                HttpMethod::Put,
                HttpMethod::Delete,
            ] {
                assert!(r.methods.contains(&m), "{m:?}");
            }
            assert_eq!(r.idempotency_header, "idempotency-key");
            assert_eq!((r.budget.percent, r.budget.min_per_second), (20, 10));
            assert_eq!(
                r.retry_on,
                [
                    RetryOn::GatewayError,
                    RetryOn::ConnectFailure,
                    RetryOn::Reset
                ]
            );
        }),
        (
            "explicit budget and methods",
            json!({ "retries": { "methods": ["POST", "GET"], "budget": { "percent": 5, "minRetriesPerSecond": 1 } } }),
            |r| {
                assert_eq!(r.methods, [HttpMethod::Get, HttpMethod::Post]);
                assert_eq!(
                    (
                        r.budget.percent,
                        r.budget.min_per_second,
                        r.budget.window_ms
                    ),
                    (5, 1, 10_000)
                );
            },
        ),
        (
            "policy without retries keeps the safe default",
            json!({ "timeout": "1s" }),
            |r| {
                assert_eq!(
                    (r.max_retries, r.retry_on.as_slice()),
                    (1, [RetryOn::ConnectFailure].as_slice())
                );
            },
        ),
    ];
    for (what, extra, check) in cases {
        let mut f = base();
        if !extra.is_null() {
            f.traffic_policies
                .push(tp("shop", "inv", None, "inventory", extra));
        }
        let c = compile(&f);
        let config = &c.configs["shop"];
        let inv = service(&c, "shop", "shop", "inventory").expect("inventory");
        let policy = inv.policy.as_ref().unwrap_or(&config.outbound.defaults);
        eprintln!("case: {what}");
        check(&policy.retry);
    }
}

#[test]
fn health_paths_are_excluded_and_circuit_breaker_defaults_filled() {
    let policy = inventory_policy_of(
        json!({ "excludedPaths": ["/health", "/ready", "/health"], "circuitBreaker": {} }),
    );
    assert_eq!(policy.excluded_paths, ["/health", "/ready"]);
    let cb = policy.circuit_breaker.expect("circuit breaker");
    assert_eq!(
        (cb.consecutive_failures, cb.open_ms, cb.max_open_ms),
        (5, 5_000, 60_000)
    );
}

/// `retryAfter` reaches the proxy with its defaults filled in; without it
/// the proxy holds nothing.
#[test]
fn retry_after_defaults_are_filled_and_its_absence_is_kept() {
    let policy = inventory_policy_of(json!({ "retryAfter": { "maxQueued": 5 } }));
    assert_eq!(
        policy.retry_after,
        Some(crate::config::RetryAfterConfig {
            max_wait_ms: 1_000,
            max_queued: 5,
            max_back_off_ms: 60_000,
        })
    );
    assert_eq!(
        compile(&base()).configs["shop"]
            .outbound
            .defaults
            .retry_after,
        None
    );
}

/// `cache` reaches the proxy with its defaults (1 MiB, 64 KiB objects),
/// its paths sorted once each, its stale windows in milliseconds, and an
/// object cap kept within a quarter of the budget whatever an older CRD
/// let through.
#[test]
fn cache_settings_are_filled_in_and_bounded() {
    let policy = inventory_policy_of(json!({
        "cache": { "paths": ["/v1/products/", "/v1/brands/", "/v1/products/"], "staleIfError": "5m" }
    }));
    assert_eq!(
        policy.cache,
        Some(crate::config::CacheConfig {
            max_bytes: 1 << 20,
            max_object_bytes: 64 << 10,
            paths: vec!["/v1/brands/".into(), "/v1/products/".into()],
            stale_if_error_ms: Some(300_000),
            stale_while_revalidate_ms: None,
        })
    );
    let policy =
        inventory_policy_of(json!({ "cache": { "maxBytes": 65536, "maxObjectBytes": 1048576 } }));
    assert_eq!(policy.cache.expect("cache").max_object_bytes, 16384);
    assert_eq!(inventory_policy_of(json!({})).cache, None);
}

/// The policy `payments` gets for calling `shop/inventory` under a
/// TrafficPolicy with `spec` (beside the target).
fn inventory_policy_of(spec: Value) -> crate::config::ServicePolicy {
    let mut f = base();
    f.traffic_policies
        .push(tp("shop", "inv", None, "inventory", spec));
    let c = compile(&f);
    service(&c, "payments", "shop", "inventory")
        .and_then(|s| s.policy.clone())
        .expect("policy")
}

/// A namespace that declares what it calls (`weft.dev/calls`) lists only
/// those Services, its own, and the backends their routes split to; one
/// whose annotation does not parse keeps every Service.
#[test]
fn a_declared_scope_lists_what_the_namespace_calls_and_route_backends() {
    let mut f = base();
    let calls = |f: &mut ClusterFacts, value: &str| {
        let payments = f
            .namespaces
            .iter_mut()
            .find(|n| n.name_any() == "payments")
            .expect("payments");
        payments.metadata.annotations =
            Some([(CALLS_ANNOTATION.to_owned(), value.to_owned())].into());
    };
    f.service_routes.push(policy(
        "shop",
        "canary",
        None,
        json!({ "parentRef": { "name": "checkout" }, "rules": [{ "backendRefs": [
            { "name": "checkout", "weight": 90 },
            { "name": "checkout-canary", "weight": 10 },
        ]}]}),
    ));
    let listed = |c: &Compiled| -> Vec<String> {
        c.configs["payments"]
            .outbound
            .services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect()
    };
    let everything = listed(&compile(&f));
    assert_eq!(everything.len(), 5, "{everything:?}");

    calls(&mut f, "shop/checkout");
    assert_eq!(
        listed(&compile(&f)),
        ["payments/payments", "shop/checkout", "shop/checkout-canary"],
        "its own, the one it calls, and that one's canary backend"
    );
    calls(&mut f, "legacy, shop/inventory");
    assert_eq!(
        listed(&compile(&f)),
        ["legacy/mainframe", "payments/payments", "shop/inventory"]
    );
    // The client's own scope leaves other namespaces' configs alone.
    assert_eq!(compile(&f).configs["shop"].outbound.services.len(), 5);
    calls(&mut f, "shop/Checkout");
    assert_eq!(listed(&compile(&f)), everything, "a typo cuts nothing off");
}

/// Zone affinity comes from the TrafficPolicy, else from the Service's
/// own `trafficDistribution` (PreferClose / PreferSameZone) with the
/// defaults; other values and an unset field leave every zone one pool.
#[test]
fn zone_affinity_follows_the_policy_then_the_services_traffic_distribution() {
    let mut f = base();
    let distribution = |name: &str, value: &str| -> Service {
        let mut s = svc("shop", name);
        s.spec.as_mut().expect("spec").traffic_distribution = Some(value.to_owned());
        s
    };
    f.services.push(distribution("catalog", "PreferClose"));
    f.services.push(distribution("reviews", "PreferSameZone"));
    f.services.push(distribution("search", "PreferSameNode"));
    f.services.push(distribution("cart", "PreferClose"));
    f.traffic_policies.push(tp(
        "shop",
        "cart",
        None,
        "cart",
        json!({ "loadBalancer": { "preferSameZone": { "minHealthyPercent": 50 } } }),
    ));
    f.traffic_policies.push(tp(
        "shop",
        "inv",
        None,
        "inventory",
        json!({ "timeout": "2s" }),
    ));
    let c = compile(&f);
    let affinity = |name: &str| {
        service(&c, "payments", "shop", name)
            .and_then(|s| s.policy.as_ref())
            .and_then(|p| p.zone_affinity.as_ref())
            .map(|z| z.min_healthy_percent)
    };
    assert_eq!(affinity("catalog"), Some(70));
    assert_eq!(affinity("reviews"), Some(70));
    assert_eq!(affinity("search"), Some(70), "node preference: the zone");
    assert_eq!(affinity("cart"), Some(50), "the TrafficPolicy's own");
    assert_eq!(affinity("inventory"), None);
    // Only the zone preference is added: the rest is the defaults.
    let catalog = service(&c, "payments", "shop", "catalog")
        .and_then(|s| s.policy.clone())
        .expect("policy");
    let mut expected = policy::default_service_policy();
    expected.zone_affinity = catalog.zone_affinity.clone();
    assert_eq!(catalog, expected);
}

#[test]
fn access_allows_by_default_then_denies_by_default() {
    struct Case {
        what: &'static str,
        rules: Value,
        target: Value,
        // (client namespace, may it reach payments/payments)
        reach: [(&'static str, bool); 2],
    }
    let svc_target = json!({ "kind": "Service", "name": "payments" });
    let cases = [
        Case {
            what: "no policy",
            rules: Value::Null,
            target: svc_target.clone(),
            reach: [("shop", true), ("payments", true)],
        },
        Case {
            what: "checkout only",
            rules: json!([{ "from": [{ "serviceAccount": "checkout", "namespace": "shop" }] }]),
            target: svc_target.clone(),
            reach: [("shop", true), ("payments", false)],
        },
        Case {
            what: "an account the client namespace lacks",
            rules: json!([{ "from": [{ "serviceAccount": "robot", "namespace": "shop" }] }]),
            target: svc_target.clone(),
            reach: [("shop", false), ("payments", false)],
        },
        Case {
            what: "whole namespace",
            rules: json!([{ "from": [{ "namespace": "payments" }] }]),
            target: svc_target.clone(),
            reach: [("shop", false), ("payments", true)],
        },
        Case {
            what: "no rules denies all",
            rules: json!([]),
            target: svc_target.clone(),
            reach: [("shop", false), ("payments", false)],
        },
        Case {
            what: "namespace-wide target",
            rules: json!([{ "from": [{ "serviceAccount": "checkout", "namespace": "shop" }] }]),
            target: json!({ "kind": "Namespace" }),
            reach: [("shop", true), ("payments", false)],
        },
    ];
    for case in cases {
        let mut f = base();
        if !case.rules.is_null() {
            f.access_policies.push(policy(
                "payments",
                "ap",
                None,
                json!({ "targetRef": case.target, "rules": case.rules }),
            ));
        }
        let c = compile(&f);
        for (client, expected) in case.reach {
            let listed = service(&c, client, "payments", "payments").is_some();
            assert_eq!(
                listed, expected,
                "{}: may {client} reach payments?",
                case.what
            );
        }
        // Scoping never hides Services no policy guards.
        assert!(
            service(&c, "payments", "shop", "checkout").is_some(),
            "{}",
            case.what
        );
        let auth = &c.configs["payments"].inbound.authorizations;
        assert_eq!(auth.is_empty(), case.rules.is_null(), "{}", case.what);
    }
}

/// An audited policy is compiled for auditing: callers its rules leave
/// out still find the Service in their config (they are admitted). It
/// stays so after `mode: Enforce` until the status says the staged move
/// completed; a policy that never audited enforces at once.
#[test]
fn an_audited_policy_audits_until_its_status_says_enforced() {
    use crate::api::{AccessPolicy, AccessPolicyStatus, Enforcement, EnforcementPhase};
    let checkout_only = |mode: &str| {
        json!({ "targetRef": { "kind": "Service", "name": "payments" }, "mode": mode,
                "rules": [{ "from": [{ "serviceAccount": "checkout", "namespace": "shop" }] }] })
    };
    let with_phase = |mode: &str, phase: Option<EnforcementPhase>| {
        let mut p: AccessPolicy = policy("payments", "ap", None, checkout_only(mode));
        p.status = phase.map(|phase| AccessPolicyStatus {
            enforcement: Some(Enforcement {
                phase,
                since: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                revision: None,
                message: String::new(),
                unlisted: Vec::new(),
            }),
            ..AccessPolicyStatus::default()
        });
        p
    };
    let cases = [
        ("Audit", None, true),
        ("Audit", Some(EnforcementPhase::Enforced), true),
        ("Enforce", Some(EnforcementPhase::Auditing), true),
        ("Enforce", Some(EnforcementPhase::Observing), true),
        ("Enforce", Some(EnforcementPhase::Blocked), true),
        ("Enforce", Some(EnforcementPhase::Enforced), false),
        ("Enforce", None, false),
    ];
    for (mode, phase, audits) in cases {
        let mut f = base();
        f.access_policies.push(with_phase(mode, phase));
        let c = compile(&f);
        let auth = &c.configs["payments"].inbound.authorizations;
        assert_eq!(auth[0].audit, audits, "{mode} {phase:?}");
        // No identity of namespace `payments` is listed: its own config
        // lists the Service only while the policy audits.
        assert_eq!(
            service(&c, "payments", "payments", "payments").is_some(),
            audits,
            "{mode} {phase:?}: an audited Service stays reachable for callers its rules leave out"
        );
        let programmed = cond(verdict(&c, PolicyKind::AccessPolicy, "ap"), "Programmed");
        assert_eq!(
            programmed.message.starts_with("audited"),
            audits,
            "{}",
            programmed.message
        );
    }
}

/// Every workload of a namespace shares its config: a Service's guard
/// carries the Service's selector, so a proxy applies it to that Service's
/// pods only.
#[test]
fn a_service_guard_carries_the_services_selector() {
    let mut f = base();
    let mut ledger = svc_ports(
        "payments",
        "ledger",
        json!([{ "name": "http", "port": 80, "targetPort": 8080 }]),
    );
    ledger.spec.as_mut().expect("spec").selector =
        Some([("app".to_owned(), "ledger".to_owned())].into());
    f.services.push(ledger);
    f.access_policies.push(policy(
        "payments",
        "ledger",
        None,
        json!({ "targetRef": { "kind": "Service", "name": "ledger" },
                "rules": [{ "from": [{ "serviceAccount": "checkout", "namespace": "shop" }] }] }),
    ));
    f.access_policies.push(policy(
        "payments",
        "everyone-in-shop",
        None,
        json!({ "targetRef": { "kind": "Namespace" },
                "rules": [{ "from": [{ "namespace": "shop" }] }] }),
    ));
    let c = compile(&f);
    let auth = &c.configs["payments"].inbound.authorizations;
    let ledger = auth.iter().find(|a| a.service.as_deref() == Some("ledger"));
    assert_eq!(
        ledger.and_then(|a| a.selector.clone()),
        Some([("app".to_owned(), "ledger".to_owned())].into())
    );
    let wide = auth
        .iter()
        .find(|a| a.service.is_none())
        .expect("namespace-wide");
    assert_eq!(wide.selector, None);
}

#[test]
fn access_rules_speak_container_ports() {
    let mut f = base();
    f.services.push(svc_ports(
        "payments",
        "ledger",
        json!([{ "name": "http", "port": 80, "targetPort": "web" }, { "name": "grpc", "port": 9090, "targetPort": 9091 }]),
    ));
    f.access_policies.push(policy(
        "payments",
        "ledger",
        None,
        json!({ "targetRef": { "kind": "Service", "name": "ledger" },
                "rules": [{ "from": [{ "serviceAccount": "checkout", "namespace": "shop" }], "ports": [9090],
                            "paths": [{ "type": "PathPrefix", "value": "/v1" }], "methods": ["GET"] }] }),
    ));
    let c = compile(&f);
    let auth = &c.configs["payments"].inbound.authorizations[0];
    assert_eq!(auth.service.as_deref(), Some("ledger"));
    assert_eq!(auth.selector, None, "a Service without a selector");
    assert_eq!(
        auth.ports,
        [PortRef::Number(9091), PortRef::Name("web".into())]
    );
    let rule = &auth.rules[0];
    assert_eq!(
        rule.ports,
        [PortRef::Number(9091)],
        "Service port 9090 forwards to 9091"
    );
    assert_eq!(rule.methods, [HttpMethod::Get]);
    assert_eq!(rule.paths[0].value, "/v1");
    assert_eq!(
        rule.identities,
        [crate::config::IdentityMatch {
            namespace: "shop".into(),
            service_account: Some("checkout".into())
        }]
    );
}

#[test]
fn access_rule_naming_a_missing_port_is_invalid() {
    let mut f = base();
    f.access_policies.push(policy(
        "payments",
        "ap",
        None,
        json!({ "targetRef": { "kind": "Service", "name": "payments" },
                "rules": [{ "from": [{ "namespace": "shop" }], "ports": [443] }] }),
    ));
    let c = compile(&f);
    let accepted = cond(
        verdict(&c, PolicyKind::AccessPolicy, "ap"),
        conditions::ACCEPTED,
    );
    assert_eq!((accepted.status, accepted.reason), (false, reason::INVALID));
    assert!(
        accepted
            .message
            .contains("rules[0].ports: Service payments/payments has no port 443"),
        "{}",
        accepted.message
    );
}

/// `inboundRateLimit` goes to the Service's own namespace, placed on its
/// pods as its AccessPolicy would be, with bursts filled in and callers
/// resolved; the client namespaces' entries carry none of it.
#[test]
fn an_inbound_rate_limit_is_placed_on_the_services_own_pods() {
    let mut f = base();
    f.services.push(selecting(
        svc_ports(
            "payments",
            "ledger",
            json!([{ "name": "http", "port": 80, "targetPort": "web" }, { "name": "grpc", "port": 9090, "targetPort": 9091 }]),
        ),
        "ledger",
    ));
    f.traffic_policies.push(inbound_tp(
        "payments",
        "ledger",
        json!({
            "total": { "requestsPerSecond": 100, "burst": 200 },
            "perIdentity": { "requestsPerSecond": 20 },
            "overrides": [{ "from": [{ "serviceAccount": "batch" }, { "namespace": "shop" }], "requestsPerSecond": 50 }],
            "routes": [{ "name": "refunds", "path": { "value": "/refunds" }, "methods": ["POST"], "requestsPerSecond": 2 }],
        }),
    ));
    let c = compile(&f);
    let limits = &c.configs["payments"].inbound.rate_limits;
    assert_eq!(limits.len(), 1);
    let l = &limits[0];
    assert_eq!(
        (l.policy.as_str(), l.service.as_str()),
        ("payments/ledger", "ledger")
    );
    assert_eq!(
        l.selector,
        Some([("app".to_owned(), "ledger".to_owned())].into())
    );
    assert_eq!(
        l.ports,
        [PortRef::Number(9091), PortRef::Name("web".into())]
    );
    let rate = |requests_per_second, burst| crate::config::RequestRateConfig {
        requests_per_second,
        burst,
    };
    assert_eq!(l.total, Some(rate(100, 200)));
    assert_eq!(
        l.per_identity,
        Some(rate(20, 20)),
        "burst defaults to the rate"
    );
    assert_eq!(l.overrides[0].limit, rate(50, 50));
    assert_eq!(
        l.overrides[0].identities,
        [
            crate::config::IdentityMatch {
                namespace: "payments".into(),
                service_account: Some("batch".into())
            },
            crate::config::IdentityMatch {
                namespace: "shop".into(),
                service_account: None
            },
        ],
        "an account without a namespace is the policy's own"
    );
    assert_eq!(l.routes[0].name, "refunds");
    assert_eq!(l.routes[0].methods, [HttpMethod::Post]);
    assert_eq!(l.routes[0].limit, rate(2, 2));
    assert!(
        c.configs["shop"].inbound.rate_limits.is_empty(),
        "a client namespace enforces none of it"
    );
    let p = cond(
        verdict(&c, PolicyKind::TrafficPolicy, "ledger"),
        conditions::PROGRAMMED,
    );
    assert!(p.status, "{}", p.message);
    assert!(
        p.message.contains(
            "inboundRateLimit enforced by the proxy of each pod of Service payments/ledger"
        ),
        "{}",
        p.message
    );
}

/// Not on pods a selector cannot tell, nor on ports whose requests the
/// proxy does not see; the status says so.
#[test]
fn an_inbound_rate_limit_is_not_placed_where_it_would_miss_or_overreach() {
    let mut f = base();
    f.traffic_policies.push(inbound_tp(
        "payments",
        "payments",
        json!({ "total": { "requestsPerSecond": 5 } }),
    ));
    let c = compile(&f);
    assert!(c.configs["payments"].inbound.rate_limits.is_empty());
    let p = cond(
        verdict(&c, PolicyKind::TrafficPolicy, "payments"),
        conditions::PROGRAMMED,
    );
    assert_eq!((p.status, p.reason), (false, reason::NOT_PROGRAMMED));
    assert!(p.message.contains("has no selector"), "{}", p.message);

    let mut f = base();
    f.services.push(selecting(
        svc_ports(
            "payments",
            "ledger",
            json!([{ "name": "http", "port": 80, "targetPort": 8080 }, { "name": "pg", "port": 5432, "targetPort": 5432 }]),
        ),
        "ledger",
    ));
    f.traffic_policies.push(inbound_tp(
        "payments",
        "ledger",
        json!({ "total": { "requestsPerSecond": 5 } }),
    ));
    let c = compile(&f);
    assert_eq!(
        c.configs["payments"].inbound.rate_limits[0].ports,
        [PortRef::Number(5432), PortRef::Number(8080)],
        "5432 is server-first, but the pod's proxy serves what comes as HTTP as HTTP"
    );
    let p = cond(
        verdict(&c, PolicyKind::TrafficPolicy, "ledger"),
        conditions::PROGRAMMED,
    );
    assert!(p.status);
    assert!(
        p.message
            .contains("on port 5432 only what comes as HTTP (the Service calls it opaque TCP)"),
        "{}",
        p.message
    );
}

/// Only the meshed namespace's proxies enforce it: elsewhere the policy
/// says so rather than claiming to be programmed.
#[test]
fn an_inbound_rate_limit_in_an_unmeshed_namespace_is_not_programmed() {
    let mut f = base();
    f.services
        .retain(|s| s.metadata.name.as_deref() != Some("mainframe"));
    f.services
        .push(selecting(svc("legacy", "mainframe"), "mainframe"));
    f.traffic_policies.push(inbound_tp(
        "legacy",
        "mainframe",
        json!({ "total": { "requestsPerSecond": 5 } }),
    ));
    let c = compile(&f);
    let p = cond(
        verdict(&c, PolicyKind::TrafficPolicy, "mainframe"),
        conditions::PROGRAMMED,
    );
    assert_eq!((p.status, p.reason), (false, reason::NAMESPACE_NOT_MESHED));
    assert!(p.message.contains("admits every request"), "{}", p.message);
}

#[test]
fn access_policy_in_an_unmeshed_namespace_warns_it_enforces_nothing() {
    let mut f = base();
    f.access_policies.push(policy(
        "legacy",
        "ap",
        None,
        json!({ "targetRef": { "kind": "Service", "name": "mainframe" }, "rules": [] }),
    ));
    let c = compile(&f);
    let p = cond(
        verdict(&c, PolicyKind::AccessPolicy, "ap"),
        conditions::PROGRAMMED,
    );
    assert_eq!((p.status, p.reason), (false, reason::NAMESPACE_NOT_MESHED));
    assert!(
        p.message.contains("every caller is still admitted"),
        "{}",
        p.message
    );
}

#[test]
fn staged_strict_follows_the_rollout_phase() {
    use crate::api::RolloutPhase;
    let cases = [
        ("Permissive", "Staged", None, InboundMode::Permissive, false),
        ("Strict", "Immediate", None, InboundMode::Strict, true),
        ("Strict", "Staged", None, InboundMode::Permissive, false),
        (
            "Strict",
            "Staged",
            Some(RolloutPhase::Observing),
            InboundMode::Permissive,
            false,
        ),
        (
            "Strict",
            "Staged",
            Some(RolloutPhase::Enforcing),
            InboundMode::Permissive,
            true,
        ),
        (
            "Strict",
            "Staged",
            Some(RolloutPhase::Strict),
            InboundMode::Strict,
            true,
        ),
        (
            "Strict",
            "Staged",
            Some(RolloutPhase::RolledBack),
            InboundMode::Permissive,
            false,
        ),
    ];
    for (mode, strategy, phase, inbound, clients_strict) in cases {
        let mut f = base();
        let mut p: MTLSPolicy = policy(
            "payments",
            "mtls",
            None,
            json!({ "mode": mode, "rollout": { "strategy": strategy }, "plaintextPorts": [9102, 9100, 9102] }),
        );
        p.status = phase.map(|phase| crate::api::MTLSPolicyStatus {
            phase: Some(phase),
            ..Default::default()
        });
        f.mtls_policies.push(p);
        let c = compile(&f);
        let what = format!("{mode}/{strategy}/{phase:?}");
        assert_eq!(c.configs["payments"].inbound.mode, inbound, "{what}");
        assert_eq!(
            c.configs["payments"].inbound.plaintext_ports,
            [9100, 9102],
            "{what}"
        );
        let seen = service(&c, "shop", "payments", "payments")
            .and_then(|s| s.mesh.clone())
            .expect("meshed");
        assert_eq!(
            seen.strict, clients_strict,
            "{what}: clients told to expect strict"
        );
    }
}

#[test]
fn protocols_come_from_app_protocol_annotations_and_well_known_ports() {
    let mut f = base();
    let mut db = svc_ports(
        "shop",
        "db",
        json!([
            { "name": "pg", "port": 5432 },
            { "name": "web", "port": 80, "appProtocol": "http" },
            { "name": "grpc", "port": 81, "appProtocol": "kubernetes.io/h2c" },
            { "name": "custom", "port": 7000 },
            { "name": "raw", "port": 7001 },
            { "name": "dns", "port": 53, "protocol": "UDP" },
        ]),
    );
    db.metadata.annotations =
        Some([(OPAQUE_PORTS_ANNOTATION.to_owned(), "7001".to_owned())].into());
    f.services.push(db);
    let c = compile(&f);
    let ports: Vec<(u16, PortProtocol)> = service(&c, "shop", "shop", "db")
        .expect("db")
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            (5432, PortProtocol::Opaque),
            (80, PortProtocol::Http1),
            (81, PortProtocol::Http2),
            (7000, PortProtocol::Detect),
            (7001, PortProtocol::Opaque),
        ],
        "UDP ports are not proxied"
    );
}

#[test]
fn output_is_deterministic_whatever_the_input_order() {
    let mut f = base();
    f.traffic_policies.push(tp(
        "shop",
        "inv",
        None,
        "inventory",
        json!({ "timeout": "1s" }),
    ));
    f.access_policies.push(policy(
        "payments",
        "ap",
        None,
        json!({ "targetRef": { "kind": "Service", "name": "payments" }, "rules": [{ "from": [{ "namespace": "shop" }] }] }),
    ));
    let a = compile(&f);
    f.services.reverse();
    f.namespaces.reverse();
    f.service_accounts.reverse();
    let b = compile(&f);
    assert_eq!(a, b);
    assert_eq!(a.configs["shop"].generation, b.configs["shop"].generation);
}

#[test]
fn mesh_singleton_sets_the_trust_domain() {
    let mut f = base();
    let mesh = |name: &str, td: &str| -> Mesh {
        serde_json::from_value(
            json!({ "metadata": meta(None, name, None), "spec": { "trustDomain": td } }),
        )
        .expect("mesh")
    };
    f.meshes = vec![
        mesh("default", "shop.example"),
        mesh("other", "ignored.example"),
    ];
    let c = compile(&f);
    assert_eq!(c.configs["shop"].trust_domain, "shop.example");
    let other = cond(verdict(&c, PolicyKind::Mesh, "other"), conditions::ACCEPTED);
    assert_eq!((other.status, other.reason), (false, reason::INVALID));
}

/// The Mesh's `tracing` reaches every namespace's config, checked: a
/// collector that is not plain HTTP turns tracing off and says why in the
/// Mesh's status, while the rest of the Mesh stays in force.
#[test]
fn mesh_tracing_reaches_every_config_or_says_why_not() {
    let mut f = base();
    let mesh = |collector: &str, percent: f64| -> Mesh {
        serde_json::from_value(json!({
            "metadata": meta(None, "default", None),
            "spec": {"trustDomain": "shop.example",
                     "tracing": {"collector": collector, "samplingPercent": percent}},
        }))
        .expect("mesh")
    };
    f.meshes = vec![mesh("http://otel-collector.observability", 5.0)];
    let c = compile(&f);
    let t = c.configs["shop"].tracing.clone().expect("tracing");
    assert_eq!(
        (t.collector.as_str(), t.path.as_str(), t.sampling),
        ("otel-collector.observability:4318", "/v1/traces", 0.05)
    );
    let said = &cond(
        verdict(&c, PolicyKind::Mesh, "default"),
        conditions::PROGRAMMED,
    )
    .message;
    assert!(
        said.contains("otel-collector.observability:4318/v1/traces"),
        "{said}"
    );

    for (collector, percent, why) in [
        ("https://otel.example:4318", 1.0, "plain-HTTP"),
        (
            "http://user:pw@otel.example:4318",
            1.0,
            "without credentials",
        ),
        ("http://otel.example:4318", 150.0, "from 0 to 100"),
    ] {
        f.meshes = vec![mesh(collector, percent)];
        let c = compile(&f);
        assert_eq!(c.configs["shop"].tracing, None, "{collector}");
        assert_eq!(
            c.configs["shop"].trust_domain, "shop.example",
            "the rest holds"
        );
        let said = &cond(
            verdict(&c, PolicyKind::Mesh, "default"),
            conditions::PROGRAMMED,
        )
        .message;
        assert!(
            said.contains("tracing is off") && said.contains(why),
            "{said}"
        );
    }
}

fn external(ns: &str, name: &str, age: Option<i64>, spec: Value) -> ExternalService {
    policy(ns, name, age, spec)
}

fn gateway_spec(hosts: &[&str]) -> Value {
    json!({ "hosts": hosts, "ports": [{ "port": 80, "protocol": "HTTP", "tls": {} }] })
}

#[test]
fn an_external_service_reaches_its_own_namespace_with_its_traffic_policy() {
    let mut facts = base();
    facts.external_services = vec![
        external(
            "shop",
            "gateway",
            Some(1),
            gateway_spec(&["api.gateway.example"]),
        ),
        external(
            "legacy",
            "gateway",
            Some(1),
            gateway_spec(&["api.gateway.example"]),
        ),
    ];
    let mut policy = tp(
        "shop",
        "gateway-calls",
        Some(2),
        "gateway",
        json!({ "timeout": "3s" }),
    );
    policy.spec.target_ref = crate::api::PolicyTargetReference::external_service("gateway");
    facts.traffic_policies = vec![
        policy,
        // Same name, kind Service: no such Service, so unresolved; it
        // does not conflict with the one on the ExternalService.
        tp("shop", "gateway-svc", Some(3), "gateway", json!({})),
    ];
    let c = compile(&facts);

    let shop = &c.configs["shop"].outbound.external_services;
    assert_eq!(shop.len(), 1);
    let es = &shop[0];
    assert_eq!(es.hosts, vec!["api.gateway.example"]);
    assert_eq!(es.ports[0].port, 80);
    assert_eq!(
        es.ports[0].target_port, 443,
        "tls defaults the vendor port to 443"
    );
    assert!(es.ports[0].tls.is_some());
    assert_eq!(es.policy.as_ref().and_then(|p| p.timeout_ms), Some(3000));
    assert!(
        c.configs["payments"].outbound.external_services.is_empty(),
        "an ExternalService is its own namespace's"
    );

    let in_ns = |ns: &str| {
        c.verdicts
            .iter()
            .find(|v| v.kind == PolicyKind::ExternalService && v.namespace.as_deref() == Some(ns))
            .unwrap_or_else(|| panic!("no verdict in {ns}"))
    };
    assert!(cond(in_ns("shop"), conditions::PROGRAMMED).status);
    let legacy = in_ns("legacy");
    assert_eq!(
        cond(legacy, conditions::PROGRAMMED).reason,
        reason::NAMESPACE_NOT_MESHED
    );
    let on_external = verdict(&c, PolicyKind::TrafficPolicy, "gateway-calls");
    assert!(cond(on_external, conditions::ACCEPTED).status);
    assert!(cond(on_external, conditions::PROGRAMMED).status);
    let on_service = verdict(&c, PolicyKind::TrafficPolicy, "gateway-svc");
    assert!(cond(on_service, conditions::ACCEPTED).status);
    let unresolved = cond(on_service, conditions::RESOLVED_REFS);
    assert_eq!(
        (unresolved.status, unresolved.reason),
        (false, reason::TARGET_NOT_FOUND)
    );
    assert!(
        unresolved.message.starts_with("Service shop/gateway"),
        "{}",
        unresolved.message
    );
}

#[test]
fn a_policy_on_a_missing_external_service_says_so() {
    let mut facts = base();
    let mut policy = tp("shop", "orphan", None, "nowhere", json!({}));
    policy.spec.target_ref = crate::api::PolicyTargetReference::external_service("nowhere");
    facts.traffic_policies = vec![policy];
    let c = compile(&facts);
    let v = cond(
        verdict(&c, PolicyKind::TrafficPolicy, "orphan"),
        conditions::RESOLVED_REFS,
    );
    assert_eq!((v.status, v.reason), (false, reason::TARGET_NOT_FOUND));
    assert!(
        v.message
            .starts_with("ExternalService shop/nowhere not found"),
        "{}",
        v.message
    );
}

#[test]
fn a_host_belongs_to_the_oldest_external_service_and_bad_input_names_the_field() {
    let mut facts = base();
    facts.external_services = vec![
        external(
            "shop",
            "newer",
            Some(5),
            gateway_spec(&["api.gateway.example", "b.example"]),
        ),
        external(
            "shop",
            "older",
            Some(1),
            gateway_spec(&["api.gateway.example"]),
        ),
        external(
            "shop",
            "inside",
            Some(2),
            gateway_spec(&["*.svc.cluster.local"]),
        ),
        external("shop", "numeric", Some(6), gateway_spec(&["10.1"])),
        external(
            "shop",
            "badca",
            Some(3),
            json!({ "hosts": ["c.example"], "ports": [{ "port": 80, "protocol": "HTTP", "tls": { "caCertificates": "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n" } }] }),
        ),
        external(
            "shop",
            "noca",
            Some(4),
            json!({ "hosts": ["d.example"], "ports": [{ "port": 80, "protocol": "HTTP", "tls": { "caCertificates": "not a certificate" } }] }),
        ),
    ];
    let c = compile(&facts);
    let names: Vec<&str> = c.configs["shop"]
        .outbound
        .external_services
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, vec!["older"]);

    let newer = cond(
        verdict(&c, PolicyKind::ExternalService, "newer"),
        conditions::ACCEPTED,
    );
    assert_eq!((newer.status, newer.reason), (false, reason::CONFLICTED));
    assert!(
        newer
            .message
            .contains("api.gateway.example (ExternalService shop/older)"),
        "{}",
        newer.message
    );
    for (name, field) in [
        ("inside", "hosts[0]"),
        ("numeric", "hosts[0]"),
        ("badca", "ports[0].tls.caCertificates"),
        ("noca", "ports[0].tls.caCertificates"),
    ] {
        let v = cond(
            verdict(&c, PolicyKind::ExternalService, name),
            conditions::ACCEPTED,
        );
        assert_eq!((v.status, v.reason), (false, reason::INVALID), "{name}");
        assert!(v.message.starts_with(field), "{name}: {}", v.message);
    }
}

#[test]
fn egress_follows_the_namespace_annotation_then_the_mesh() {
    let mut f = base();
    let annotated = |name: &str, value: &str| {
        let mut n = ns(name, true);
        n.metadata.annotations = Some([(EGRESS_ANNOTATION.to_owned(), value.to_owned())].into());
        n
    };
    f.namespaces = vec![
        annotated("shop", "AllowAll"),
        annotated("payments", "registry-only"),
        annotated("orders", "registryonly"),
        ns("catalog", true),
    ];
    let c = compile(&f);
    assert_eq!(
        c.configs["catalog"].outbound.egress,
        EgressMode::AllowAll,
        "AllowAll by default"
    );
    assert_eq!(
        c.configs["orders"].outbound.egress,
        EgressMode::RegistryOnly
    );

    f.meshes = vec![
        serde_json::from_value(json!({ "metadata": meta(None, "default", None), "spec": { "egress": "RegistryOnly" } }))
            .expect("mesh"),
    ];
    let c = compile(&f);
    let egress = |ns: &str| c.configs[ns].outbound.egress;
    assert_eq!(egress("shop"), EgressMode::AllowAll, "the annotation wins");
    assert_eq!(egress("orders"), EgressMode::RegistryOnly, "in any case");
    assert_eq!(egress("catalog"), EgressMode::RegistryOnly, "the Mesh's");
    assert_eq!(
        egress("payments"),
        EgressMode::RegistryOnly,
        "an unreadable annotation keeps the Mesh's"
    );
    let why = egress_of(
        &annotated("payments", "registry-only"),
        EgressMode::RegistryOnly,
    )
    .expect_err("unreadable");
    assert!(why.contains("neither AllowAll nor RegistryOnly"), "{why}");
}
