//! The staged move from Audit to Enforce, the callers folded into the
//! status, and the policy suggested from them: pure tables.

use std::time::UNIX_EPOCH;

use super::*;
use crate::api::{AccessPolicyStatus, AccessTarget};
use crate::meshstats::{MeshStats, ProxyCounts, Reading};

const WINDOW: Duration = Duration::from_secs(300);
const REV: &str = "rev-1";

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn at(phase: EnforcementPhase, since: u64) -> Current {
    Current {
        phase,
        since: t(since),
        revision: Some(REV.to_owned()),
        unlisted: Vec::new(),
    }
}

/// Counts covering `secs`, with callers the rules would refuse.
fn seen(secs: u64, refused: &[(&str, f64)]) -> Evidence {
    Evidence {
        refused: refused.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
        covered: Duration::from_secs(secs),
        unreadable: None,
    }
}

fn enforce(current: Option<&Current>, evidence: &Evidence, now: u64) -> Option<Decision> {
    step(AccessMode::Enforce, WINDOW, REV, current, evidence, t(now))
}

#[test]
fn audit_mode_audits_and_keeps_its_start() {
    let d = step(AccessMode::Audit, WINDOW, REV, None, &seen(0, &[]), t(0)).expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event),
        (EnforcementPhase::Auditing, t(0), true)
    );
    // Still auditing later: the same start, no news.
    let c = at(EnforcementPhase::Auditing, 0);
    let d = step(
        AccessMode::Audit,
        WINDOW,
        REV,
        Some(&c),
        &seen(60, &[("shop/ads", 3.0)]),
        t(60),
    )
    .expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event),
        (EnforcementPhase::Auditing, t(0), false)
    );
    // Back to Audit from anywhere, Enforced included.
    for phase in [
        EnforcementPhase::Observing,
        EnforcementPhase::Blocked,
        EnforcementPhase::Enforced,
    ] {
        let c = at(phase, 0);
        let d = step(
            AccessMode::Audit,
            WINDOW,
            REV,
            Some(&c),
            &seen(0, &[]),
            t(90),
        )
        .expect("a state");
        assert_eq!(
            (d.phase, d.since, d.event),
            (EnforcementPhase::Auditing, t(90), true)
        );
    }
}

#[test]
fn a_policy_that_never_audited_enforces_without_a_status() {
    assert_eq!(enforce(None, &seen(0, &[]), 0), None);
}

#[test]
fn enforce_waits_a_whole_quiet_window_then_enforces() {
    let auditing = at(EnforcementPhase::Auditing, 0);
    let d = enforce(Some(&auditing), &seen(0, &[]), 100).expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event),
        (EnforcementPhase::Observing, t(100), true)
    );
    let observing = at(EnforcementPhase::Observing, 100);
    // Half the window: still observing, same start, no news.
    let d = enforce(Some(&observing), &seen(150, &[]), 250).expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event),
        (EnforcementPhase::Observing, t(100), false)
    );
    assert!(d.message.contains("enforced in 150s"), "{}", d.message);
    // The whole window, covered by the proxies' counts: enforced.
    let d = enforce(Some(&observing), &seen(295, &[]), 400).expect("a state");
    assert_eq!(
        (d.phase, d.event, d.reason),
        (EnforcementPhase::Enforced, true, "Enforced")
    );
    // The window elapsed but the counts cover little of it (an operator
    // restarted mid-window): not yet.
    let d = enforce(Some(&observing), &seen(60, &[]), 400).expect("a state");
    assert_eq!(d.phase, EnforcementPhase::Observing);
    // Enforced stays enforced, quietly.
    let enforced = at(EnforcementPhase::Enforced, 400);
    let d = enforce(Some(&enforced), &seen(10, &[("shop/ads", 1.0)]), 500).expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event),
        (EnforcementPhase::Enforced, t(400), false)
    );
}

#[test]
fn a_window_of_zero_enforces_at_the_next_look() {
    let auditing = at(EnforcementPhase::Auditing, 0);
    let d = step(
        AccessMode::Enforce,
        Duration::ZERO,
        REV,
        Some(&auditing),
        &seen(0, &[]),
        t(10),
    )
    .expect("a state");
    assert_eq!(d.phase, EnforcementPhase::Enforced);
}

#[test]
fn a_caller_outside_the_rules_blocks_and_restarts_the_window() {
    let observing = at(EnforcementPhase::Observing, 100);
    let d = enforce(
        Some(&observing),
        &seen(200, &[("shop/ads", 4.0), ("plaintext", 9.0)]),
        300,
    )
    .expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event, d.warning),
        (EnforcementPhase::Blocked, t(300), true, true)
    );
    assert_eq!(d.unlisted, ["plaintext", "shop/ads"], "most requests first");
    assert!(
        d.message.contains("plaintext (9), shop/ads (4)"),
        "{}",
        d.message
    );
    // Seen again: still blocked, the window restarts, no new Event for
    // the same callers; a new caller is news.
    let blocked = Current {
        unlisted: d.unlisted.clone(),
        ..at(EnforcementPhase::Blocked, 300)
    };
    let d = enforce(Some(&blocked), &seen(50, &[("shop/ads", 1.0)]), 350).expect("a state");
    assert_eq!(
        (d.phase, d.since, d.event),
        (EnforcementPhase::Blocked, t(350), false)
    );
    let d = enforce(Some(&blocked), &seen(50, &[("web/crawler", 1.0)]), 350).expect("a state");
    assert!(d.event, "a caller not named before");
    // Quiet since the last sighting, but not for a whole window: still
    // blocked, names kept.
    let d = enforce(Some(&blocked), &seen(100, &[]), 400).expect("a state");
    assert_eq!((d.phase, d.since), (EnforcementPhase::Blocked, t(300)));
    assert_eq!(d.unlisted, blocked.unlisted);
    // A whole quiet window after the last sighting: enforced.
    let d = enforce(Some(&blocked), &seen(300, &[]), 600).expect("a state");
    assert_eq!((d.phase, d.unlisted.len()), (EnforcementPhase::Enforced, 0));
}

#[test]
fn changed_rules_or_lost_counts_start_the_window_again() {
    let blocked = Current {
        unlisted: vec!["shop/ads".to_owned()],
        ..at(EnforcementPhase::Blocked, 100)
    };
    let d = step(
        AccessMode::Enforce,
        WINDOW,
        "rev-2",
        Some(&blocked),
        &seen(250, &[("shop/ads", 1.0)]),
        t(350),
    )
    .expect("a state");
    assert_eq!(
        (d.phase, d.since, d.reason),
        (EnforcementPhase::Observing, t(350), "RulesChanged")
    );
    let observing = at(EnforcementPhase::Observing, 100);
    let lost = Evidence {
        unreadable: Some("a proxy of namespace shop could not be read (1 times)".to_owned()),
        ..seen(400, &[])
    };
    let d = enforce(Some(&observing), &lost, 500).expect("a state");
    assert_eq!(
        (d.phase, d.since, d.reason),
        (EnforcementPhase::Observing, t(500), "NoEvidence"),
        "an unreadable proxy may have seen a caller outside the rules"
    );
}

/// Restarted mid-window, the operator goes on from the status alone.
#[test]
fn a_restarted_operator_goes_on_from_the_status() {
    let d = enforce(Some(&at(EnforcementPhase::Auditing, 0)), &seen(0, &[]), 100).expect("a state");
    let written = d.status(REV);
    let back = current_of(&written);
    assert_eq!(
        (back.phase, back.since),
        (EnforcementPhase::Observing, t(100))
    );
    let d = enforce(Some(&back), &seen(300, &[]), 400).expect("a state");
    assert_eq!(d.phase, EnforcementPhase::Enforced);
}

/// An observed caller as a row: caller, port, method, path, requests,
/// admitted.
type Row<'a> = (
    &'a str,
    Option<u16>,
    Option<HttpMethod>,
    Option<&'a str>,
    u64,
    bool,
);

/// A suggested rule's shape: callers, ports, paths, methods.
type RuleShape = (Vec<String>, Vec<u16>, Vec<String>, Vec<HttpMethod>);

/// A proxy's audit counts: (caller, port, method, path, admitted, n).
fn audit_text(policy: &str, rows: &[(&str, u16, &str, &str, bool, u32)]) -> String {
    rows.iter()
        .map(|(src, port, method, path, admitted, n)| {
            format!(
                "weft_proxy_access_audit_total{{policy=\"{policy}\",src=\"{src}\",port=\"{port}\",method=\"{method}\",path=\"{path}\",verdict=\"{}\",rules=\"{REV}\"}} {n}\n",
                if *admitted { "admitted" } else { "refused" }
            )
        })
        .collect::<String>()
        + "weft_proxy_requests_total{direction=\"inbound\",src=\"x\",dst=\"payments\",route=\"default\",status_class=\"2xx\",tls=\"true\"} 1\n"
}

fn reading(ns: &str, pod: &str, text: &str) -> Reading {
    Reading {
        id: (ns.to_owned(), pod.to_owned()),
        counts: ProxyCounts::read(ns, text),
    }
}

#[test]
fn the_callers_seen_are_the_guarded_pods_own_counts_folded_once() {
    let mut stats = MeshStats::default();
    let policy = "shop/payments";
    let rows0: &[(&str, u16, &str, &str, bool, u32)] = &[];
    stats.record(
        t(0),
        vec![
            reading("shop", "payments-0", &audit_text(policy, rows0)),
            reading("evil", "liar-0", &audit_text(policy, rows0)),
        ],
    );
    let rows = [
        ("shop/checkout", 8080, "POST", "/charges", false, 10),
        ("shop/checkout", 8080, "GET", "/charges", false, 2),
        ("web/frontend", 8080, "GET", "/status", true, 5),
        ("plaintext", 9090, "", "", false, 1),
    ];
    stats.record(
        t(10),
        vec![
            reading("shop", "payments-0", &audit_text(policy, &rows)),
            // Another namespace's proxy naming the same policy.
            reading(
                "evil",
                "liar-0",
                &audit_text(policy, &[("evil/x", 8080, "GET", "/", false, 1000)]),
            ),
        ],
    );
    let ticks = stats.since(t(0));
    let pods: BTreeSet<String> = ["payments-0".to_owned()].into();
    let e = evidence(
        &stats.touching(t(0)),
        t(0),
        "shop",
        policy,
        REV,
        Some(&pods),
    );
    assert_eq!(
        e.refused,
        BTreeMap::from([
            ("plaintext".to_owned(), 1.0),
            ("shop/checkout".to_owned(), 12.0)
        ])
    );
    // Container port 8080 is the Service's port 80; 9090 no port names.
    let port_of = |p: u16| (p == 8080).then_some(80);
    let (callers, dropped) = fold(&[], &ticks, "shop", policy, REV, Some(&pods), port_of);
    assert_eq!(dropped, 0);
    let rows: Vec<Row<'_>> = callers
        .iter()
        .map(|c| {
            (
                c.caller.as_str(),
                c.port,
                c.method,
                c.path_prefix.as_deref(),
                c.requests,
                c.admitted,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "shop/checkout",
                Some(80),
                Some(HttpMethod::Post),
                Some("/charges"),
                10,
                false
            ),
            (
                "web/frontend",
                Some(80),
                Some(HttpMethod::Get),
                Some("/status"),
                5,
                true
            ),
            (
                "shop/checkout",
                Some(80),
                Some(HttpMethod::Get),
                Some("/charges"),
                2,
                false
            ),
            ("plaintext", None, None, None, 1, false),
        ]
    );
    // Folding the same ticks onto what was folded would count twice: the
    // loop folds only ticks after `observedThrough`. Later growth adds.
    let more = [("shop/checkout", 8080, "POST", "/charges", false, 13)];
    stats.record(
        t(20),
        vec![reading("shop", "payments-0", &audit_text(policy, &more))],
    );
    let (callers, _) = fold(
        &callers,
        &stats.since(t(10)),
        "shop",
        policy,
        REV,
        Some(&pods),
        port_of,
    );
    assert_eq!(callers[0].requests, 13);
    // Pods other than the guarded Service's speak for nothing, whatever
    // they report.
    let others: BTreeSet<String> = ["cart-0".to_owned()].into();
    assert!(
        evidence(&ticks, t(0), "shop", policy, REV, Some(&others))
            .refused
            .is_empty()
    );
    // A window that began mid-tick: the straddling tick's callers count,
    // its time does not.
    let e = evidence(
        &stats.touching(t(15)),
        t(15),
        "shop",
        policy,
        REV,
        Some(&pods),
    );
    assert_eq!(e.refused.get("shop/checkout"), Some(&3.0));
    assert_eq!(e.covered, Duration::ZERO);
    // Refusals under other rules (a proxy not yet on the window's) do
    // not count.
    let e = evidence(
        &stats.touching(t(15)),
        t(15),
        "shop",
        policy,
        "rev-2",
        Some(&pods),
    );
    assert!(e.refused.is_empty());
}

#[test]
fn a_namespace_with_an_unreadable_proxy_has_no_evidence() {
    let mut stats = MeshStats::default();
    stats.record(t(0), vec![reading("shop", "payments-0", "")]);
    stats.record(
        t(10),
        vec![
            reading("shop", "payments-0", ""),
            Reading {
                id: ("shop".into(), "payments-1".into()),
                counts: Err("timed out".into()),
            },
        ],
    );
    let e = evidence(&stats.since(t(0)), t(0), "shop", "shop/payments", REV, None);
    assert!(e.unreadable.expect("lost").contains("shop/payments-1"));
    let guarded: BTreeSet<String> = ["payments-0".to_owned()].into();
    let e = evidence(
        &stats.since(t(0)),
        t(0),
        "shop",
        "shop/payments",
        REV,
        Some(&guarded),
    );
    assert_eq!(
        e.unreadable, None,
        "a pod the policy does not guard is not its evidence"
    );
    let e = evidence(&stats.since(t(0)), t(0), "web", "web/frontend", REV, None);
    assert_eq!(
        e.unreadable, None,
        "another namespace's proxy is not this one's"
    );
}

fn observed(
    caller: &str,
    port: Option<u16>,
    method: Option<HttpMethod>,
    path: Option<&str>,
) -> ObservedCaller {
    ObservedCaller {
        caller: caller.to_owned(),
        port,
        method,
        path_prefix: path.map(str::to_owned),
        requests: 1,
        admitted: false,
        last_seen: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

fn audited(callers: Vec<ObservedCaller>) -> AccessPolicy {
    let mut p = AccessPolicy::new(
        "payments",
        AccessPolicySpec {
            target_ref: AccessTarget {
                kind: AccessTargetKind::Service,
                name: Some("payments".into()),
            },
            rules: Vec::new(),
            mode: AccessMode::Audit,
            observation_window: None,
        },
    );
    p.metadata.namespace = Some("shop".into());
    p.status = Some(AccessPolicyStatus {
        observed_callers: callers,
        ..AccessPolicyStatus::default()
    });
    p
}

#[test]
fn the_suggestion_admits_exactly_what_was_seen() {
    use HttpMethod::{Get, Post};
    let p = audited(vec![
        observed("shop/checkout", Some(80), Some(Post), Some("/charges")),
        observed("shop/checkout", Some(80), Some(Get), Some("/charges")),
        observed("shop/checkout", Some(80), Some(Get), Some("/status")),
        observed("web/frontend", Some(80), Some(Get), Some("/status")),
        observed("ops/probe", Some(9090), None, None),
        observed("plaintext", Some(80), Some(Get), Some("/")),
    ]);
    let (s, notes) = suggest(&p).expect("a suggestion");
    assert_eq!(s.spec.mode, AccessMode::Enforce);
    assert_eq!(s.spec.target_ref, p.spec.target_ref);
    let rules: Vec<RuleShape> = s
        .spec
        .rules
        .iter()
        .map(|r| {
            (
                r.from
                    .iter()
                    .map(|f| {
                        format!(
                            "{}/{}",
                            f.namespace.as_deref().unwrap_or("(own)"),
                            f.service_account.as_deref().unwrap_or("*")
                        )
                    })
                    .collect(),
                r.ports.clone(),
                r.paths.iter().map(|p| p.value.clone()).collect(),
                r.methods.clone(),
            )
        })
        .collect();
    let own = |s: &str| s.to_owned();
    assert_eq!(
        rules,
        vec![
            (
                vec![own("(own)/checkout")],
                vec![80],
                vec![own("/charges")],
                vec![Get, Post]
            ),
            // GET /status: checkout and frontend alike, one rule.
            (
                vec![own("(own)/checkout"), own("web/frontend")],
                vec![80],
                vec![own("/status")],
                vec![Get]
            ),
            // A TCP connection: a rule without paths or methods.
            (vec![own("ops/probe")], vec![9090], vec![], vec![]),
        ]
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("plaintext") && n.contains("mesh it")),
        "{notes:?}"
    );
    // Nothing seen: no guess.
    let err = suggest(&audited(Vec::new())).expect_err("nothing to suggest");
    assert!(err.contains("spec.mode: Audit"), "{err}");
}

#[test]
fn a_window_of_zero_enforces_even_when_blocked() {
    let blocked = Current {
        unlisted: vec!["plaintext".to_owned()],
        ..at(EnforcementPhase::Blocked, 100)
    };
    let d = step(
        AccessMode::Enforce,
        Duration::ZERO,
        REV,
        Some(&blocked),
        &seen(10, &[("plaintext", 50.0)]),
        t(110),
    )
    .expect("a state");
    assert_eq!(d.phase, EnforcementPhase::Enforced);
}

#[test]
fn a_blocked_message_names_twenty_and_says_how_to_get_past_plaintext() {
    let many: Vec<(String, f64)> = (0..25)
        .map(|i| (format!("shop/caller-{i:02}"), 1.0))
        .chain([("plaintext".to_owned(), 2.0)])
        .collect();
    let refused: Vec<(&str, f64)> = many.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    let d = enforce(
        Some(&at(EnforcementPhase::Observing, 0)),
        &seen(10, &refused),
        10,
    )
    .expect("a state");
    assert_eq!(d.unlisted.len(), MAX_UNLISTED);
    assert_eq!(d.unlisted[0], "plaintext", "most requests first");
    assert!(d.message.contains("and 6 more"), "{}", d.message);
    assert!(d.message.contains("observationWindow: 0s"), "{}", d.message);
}

/// A caller with many shapes cannot push the others out of the status.
#[test]
fn every_caller_keeps_a_place_in_the_status() {
    let mut stats = MeshStats::default();
    let rows0: &[(&str, u16, &str, &str, bool, u32)] = &[];
    stats.record(
        t(0),
        vec![reading(
            "shop",
            "payments-0",
            &audit_text("shop/payments", rows0),
        )],
    );
    let paths: Vec<String> = (0..250).map(|i| format!("/p{i}")).collect();
    let mut rows: Vec<(&str, u16, &str, &str, bool, u32)> = paths
        .iter()
        .map(|p| ("shop/noisy", 8080, "GET", p.as_str(), false, 100))
        .collect();
    rows.push(("shop/quiet", 8080, "GET", "/status", false, 1));
    stats.record(
        t(10),
        vec![reading(
            "shop",
            "payments-0",
            &audit_text("shop/payments", &rows),
        )],
    );
    let (callers, dropped) = fold(
        &[],
        &stats.since(t(0)),
        "shop",
        "shop/payments",
        REV,
        None,
        Some,
    );
    assert_eq!((callers.len(), dropped), (MAX_OBSERVED, 51));
    assert!(callers.iter().any(|c| c.caller == "shop/quiet"));
}

#[test]
fn the_suggestion_says_what_it_widens_and_keeps_the_root_exact() {
    use HttpMethod::Get;
    let mut p = audited(vec![
        observed("shop/checkout", Some(80), Some(Get), Some("/")),
        observed("shop/cart", Some(80), Some(Get), None),
    ]);
    p.spec.rules = vec![AccessRule {
        from: vec![AccessSource {
            service_account: Some("monthly-job".into()),
            namespace: None,
        }],
        ports: vec![],
        paths: vec![],
        methods: vec![],
    }];
    let (s, notes) = suggest(&p).expect("a suggestion");
    let root = s
        .spec
        .rules
        .iter()
        .find(|r| r.from[0].service_account.as_deref() == Some("checkout"))
        .expect("checkout's rule");
    assert_eq!(
        root.paths,
        [PathMatch {
            type_: PathMatchType::Exact,
            value: "/".into()
        }],
        "the root, not every path"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("shop/cart on port 80: admitted on every path")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("1 rules are not carried over")),
        "{notes:?}"
    );
}
