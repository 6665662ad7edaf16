//! Table-driven: each case is a policy, where the rollout stands, what was
//! observed, and where it must go.

use super::*;
use crate::api::{AutoRollback, Duration as ApiDuration, Rollout};

const GEN: &str = "g-current";
const BUNDLE: &str = "b-current";

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn minutes(m: u64) -> Duration {
    Duration::from_secs(60 * m)
}

fn spec(mode: MtlsMode, strategy: RolloutStrategy) -> MTLSPolicySpec {
    MTLSPolicySpec {
        mode,
        rollout: Rollout {
            strategy,
            observation_window: ApiDuration::from_secs(600),
            auto_rollback: AutoRollback::default(),
        },
        plaintext_ports: vec![9090],
    }
}

fn staged() -> MTLSPolicySpec {
    spec(MtlsMode::Strict, RolloutStrategy::Staged)
}

fn pod(name: &str) -> PodEvidence {
    PodEvidence {
        name: name.into(),
        injected: true,
        running: true,
        proxy: Some(ProxyReport {
            generation: Some(GEN.into()),
            trust_bundle_hash: Some(BUNDLE.into()),
            has_identity: true,
        }),
        skipped_inbound_ports: Vec::new(),
    }
}

fn uninjected(name: &str) -> PodEvidence {
    PodEvidence {
        name: name.into(),
        injected: false,
        running: true,
        proxy: None,
        skipped_inbound_ports: Vec::new(),
    }
}

/// Not running yet (Pending, say unschedulable): nothing reported.
fn pending(name: &str) -> PodEvidence {
    PodEvidence {
        running: false,
        proxy: None,
        ..pod(name)
    }
}

fn on_generation(name: &str, generation: &str) -> PodEvidence {
    let mut p = pod(name);
    if let Some(proxy) = p.proxy.as_mut() {
        proxy.generation = Some(generation.into());
    }
    p
}

fn evidence(pods: Vec<PodEvidence>) -> Evidence {
    Evidence {
        pods,
        config_generation: GEN.into(),
        trust_bundle_hash: BUNDLE.into(),
        plaintext_counted: true,
        compiled_phase: Some(RolloutPhase::Enforcing),
        ..Evidence::default()
    }
}

/// Plaintext from `src`: a pod without the sidecar, or (`None`) an
/// address no pod of the cluster holds.
fn plaintext(src: &str, pod: Option<&str>, port: u16, n: u64) -> PlaintextSource {
    PlaintextSource {
        src_addr: src.into(),
        pod: pod.map(str::to_owned),
        meshed: false,
        port,
        connections: n,
    }
}

/// Plaintext from a pod that carries the sidecar: a meshed client.
fn meshed(src: &str, pod: &str, port: u16, n: u64) -> PlaintextSource {
    PlaintextSource {
        meshed: true,
        ..plaintext(src, Some(pod), port, n)
    }
}

fn client(pod: &str, running: &str, expected: &str) -> ClientEvidence {
    ClientEvidence {
        pod: pod.into(),
        running: Some(running.into()),
        expected: expected.into(),
    }
}

/// In `phase` since `ago` before now, for policy generation 1.
fn at(phase: RolloutPhase, ago: Duration) -> Option<Current> {
    Some(Current {
        phase,
        since: t0() - ago,
        observed_generation: Some(1),
        plaintext_seen: false,
        blockers: Vec::new(),
    })
}

/// Where a decision leaves the rollout (what the next look reads back).
fn after(d: &Decision) -> Current {
    Current {
        phase: d.phase,
        since: d.since,
        observed_generation: Some(1),
        plaintext_seen: d.reason == reason::PLAINTEXT_SEEN,
        blockers: d.blockers.clone(),
    }
}

struct Case {
    name: &'static str,
    spec: MTLSPolicySpec,
    generation: i64,
    current: Option<Current>,
    evidence: Evidence,
    phase: RolloutPhase,
    reason: &'static str,
    /// The phase (or window) starts now.
    restarts: bool,
    /// Every one of these appears in a blocker.
    blockers: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    use RolloutPhase::*;
    let mut no_rollback = staged();
    no_rollback.rollout.auto_rollback.enabled = false;
    vec![
        Case {
            name: "an uninjected pod blocks the rollout and is named",
            spec: staged(),
            generation: 1,
            current: None,
            evidence: evidence(vec![pod("checkout-0"), uninjected("legacy-7f9c")]),
            phase: Blocked,
            reason: reason::PODS_WITHOUT_SIDECAR,
            restarts: true,
            blockers: &["pod legacy-7f9c has no weft sidecar"],
        },
        Case {
            name: "an uninjected pod appearing while observing blocks again",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(5)),
            evidence: evidence(vec![pod("a"), uninjected("b")]),
            phase: Blocked,
            reason: reason::PODS_WITHOUT_SIDECAR,
            restarts: true,
            blockers: &["pod b has no weft sidecar"],
        },
        Case {
            name: "a proxy on an old config keeps it preparing, named with both generations",
            spec: staged(),
            generation: 1,
            current: at(Blocked, minutes(1)),
            evidence: evidence(vec![pod("a"), on_generation("b", "g-old")]),
            phase: Preparing,
            reason: reason::WAITING_FOR_PROXIES,
            restarts: true,
            blockers: &["pod b runs config g-old, not g-current"],
        },
        Case {
            name: "a running proxy that did not report keeps it preparing (a pending one does not)",
            spec: staged(),
            generation: 1,
            current: at(Preparing, minutes(1)),
            evidence: evidence(vec![
                pending("db-0"),
                PodEvidence {
                    proxy: None,
                    ..pod("a")
                },
            ]),
            phase: Preparing,
            reason: reason::WAITING_FOR_PROXIES,
            restarts: false,
            blockers: &["pod a: its proxy did not report"],
        },
        Case {
            name: "a pending injected pod that never reported does not hold Preparing",
            spec: staged(),
            generation: 1,
            current: at(Preparing, minutes(1)),
            evidence: evidence(vec![pod("a"), pending("db-0")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "a pending injected pod appearing while observing keeps the window",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(4)),
            evidence: evidence(vec![pod("a"), pending("a-new")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: false,
            blockers: &[],
        },
        Case {
            name: "a pending pod without the sidecar still blocks, named",
            spec: staged(),
            generation: 1,
            current: at(Preparing, minutes(1)),
            evidence: evidence(vec![
                pod("a"),
                PodEvidence {
                    running: false,
                    ..uninjected("legacy-0")
                },
            ]),
            phase: Blocked,
            reason: reason::PODS_WITHOUT_SIDECAR,
            restarts: true,
            blockers: &["pod legacy-0 has no weft sidecar"],
        },
        Case {
            name: "every pod meshed and current: the window opens",
            spec: staged(),
            generation: 1,
            current: at(Preparing, minutes(1)),
            evidence: evidence(vec![pod("a"), pod("b")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "plaintext during the window restarts it and names the source",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(9)),
            evidence: Evidence {
                plaintext: vec![plaintext("10.244.1.7", Some("shop/legacy-0"), 8080, 3)],
                ..evidence(vec![pod("a")])
            },
            phase: Observing,
            reason: reason::PLAINTEXT_SEEN,
            restarts: true,
            blockers: &["plaintext from 10.244.1.7 (pod shop/legacy-0) to port 8080"],
        },
        Case {
            name: "observing without the counters from the window's start (the operator restarted) starts the window again",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(11)),
            evidence: Evidence {
                plaintext_counted: false,
                ..evidence(vec![pod("a")])
            },
            phase: Observing,
            reason: reason::OBSERVATION_RESTARTED,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "plaintext on an excepted port does not count",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(11)),
            evidence: Evidence {
                plaintext: vec![plaintext("10.244.1.8", None, 9090, 40)],
                ..evidence(vec![pod("a")])
            },
            phase: Enforcing,
            reason: reason::WAITING_FOR_CLIENTS,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "a clean window not yet over keeps observing",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(4)),
            evidence: evidence(vec![pod("a")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: false,
            blockers: &[],
        },
        Case {
            name: "a clean full window moves to Enforcing",
            spec: staged(),
            generation: 1,
            current: at(Observing, minutes(10)),
            evidence: evidence(vec![pod("a")]),
            phase: Enforcing,
            reason: reason::WAITING_FOR_CLIENTS,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "Enforcing waits for a client proxy still on the old generation",
            spec: staged(),
            generation: 1,
            current: at(Enforcing, minutes(1)),
            evidence: Evidence {
                clients: vec![
                    client("shop/checkout-0", "c-new", "c-new"),
                    client("shop/checkout-1", "c-old", "c-new"),
                ],
                ..evidence(vec![pod("a")])
            },
            phase: Enforcing,
            reason: reason::WAITING_FOR_CLIENTS,
            restarts: false,
            blockers: &["client shop/checkout-1 runs config c-old, not c-new"],
        },
        Case {
            name: "Enforcing on a compile that read the policy in Observing waits for the compile",
            spec: staged(),
            generation: 1,
            current: at(Enforcing, minutes(1)),
            evidence: Evidence {
                clients: vec![client("shop/checkout-0", "c-old", "c-old")],
                compiled_phase: Some(Observing),
                ..evidence(vec![pod("a")])
            },
            phase: Enforcing,
            reason: reason::WAITING_FOR_COMPILE,
            restarts: false,
            blockers: &["waiting for the config that expects Strict to be compiled"],
        },
        Case {
            name: "Strict only once every client proxy runs the generation that expects it",
            spec: staged(),
            generation: 1,
            current: at(Enforcing, minutes(2)),
            evidence: Evidence {
                clients: vec![
                    client("shop/checkout-0", "c-new", "c-new"),
                    client("shop/checkout-1", "c-new", "c-new"),
                ],
                ..evidence(vec![pod("a")])
            },
            phase: Strict,
            reason: reason::STRICT,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "a burst of rejected plaintext from meshed pods rolls back, with its reason",
            spec: staged(),
            generation: 1,
            current: at(Strict, minutes(30)),
            evidence: Evidence {
                rejected_recently: vec![
                    meshed("10.244.3.3", "shop/checkout-1", 8080, 7),
                    meshed("10.244.3.4", "shop/checkout-2", 8080, 5),
                ],
                ..evidence(vec![pod("a")])
            },
            phase: RolledBack,
            reason: reason::REJECTED_PLAINTEXT_BURST,
            restarts: true,
            blockers: &[
                "plaintext from 10.244.3.3 (pod shop/checkout-1, meshed) to port 8080",
                "plaintext from 10.244.3.4 (pod shop/checkout-2, meshed) to port 8080",
            ],
        },
        Case {
            name: "rejections below the threshold keep Strict",
            spec: staged(),
            generation: 1,
            current: at(Strict, minutes(30)),
            evidence: Evidence {
                rejected_recently: vec![meshed("10.244.3.3", "shop/checkout-1", 8080, 9)],
                ..evidence(vec![pod("a")])
            },
            phase: Strict,
            reason: reason::STRICT,
            restarts: false,
            blockers: &[],
        },
        Case {
            name: "auto-rollback disabled keeps Strict whatever is rejected",
            spec: no_rollback,
            generation: 1,
            current: at(Strict, minutes(30)),
            evidence: Evidence {
                rejected_recently: vec![meshed("10.244.3.3", "shop/checkout-1", 8080, 500)],
                ..evidence(vec![pod("a")])
            },
            phase: Strict,
            reason: reason::STRICT,
            restarts: false,
            blockers: &[],
        },
        Case {
            name: "rolled back stays rolled back until the policy is edited",
            spec: staged(),
            generation: 1,
            current: at(RolledBack, minutes(60)),
            evidence: evidence(vec![pod("a")]),
            phase: RolledBack,
            reason: reason::ROLLED_BACK,
            restarts: false,
            blockers: &[],
        },
        Case {
            name: "an edit after a rollback starts again",
            spec: staged(),
            generation: 2,
            current: at(RolledBack, minutes(60)),
            evidence: evidence(vec![pod("a")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "an edit while observing starts the window again",
            spec: staged(),
            generation: 2,
            current: at(Observing, minutes(60)),
            evidence: evidence(vec![pod("a")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "an edit while plaintext is seen starts the window again",
            spec: staged(),
            generation: 2,
            current: at(Observing, minutes(60)).map(|c| Current {
                plaintext_seen: true,
                blockers: vec!["10.0.0.9 on port 8080".into()],
                ..c
            }),
            evidence: evidence(vec![pod("a")]),
            phase: Observing,
            reason: reason::OBSERVING,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "the Immediate strategy flips at once, uninjected pods or not",
            spec: spec(MtlsMode::Strict, RolloutStrategy::Immediate),
            generation: 1,
            current: None,
            evidence: evidence(vec![uninjected("legacy")]),
            phase: Strict,
            reason: reason::IMMEDIATE,
            restarts: true,
            blockers: &[],
        },
        Case {
            name: "asking for Permissive again goes there from any phase",
            spec: spec(MtlsMode::Permissive, RolloutStrategy::Staged),
            generation: 2,
            current: at(Strict, minutes(5)),
            evidence: evidence(vec![pod("a")]),
            phase: Permissive,
            reason: reason::PERMISSIVE,
            restarts: true,
            blockers: &[],
        },
    ]
}

#[test]
fn rollout_table() {
    for case in cases() {
        let d = step(
            &case.spec,
            Some(case.generation),
            case.current.as_ref(),
            &case.evidence,
            t0(),
        );
        let n = case.name;
        assert_eq!(d.phase, case.phase, "{n}: {d:#?}");
        assert_eq!(d.reason, case.reason, "{n}: {d:#?}");
        let restarted = d.since == t0();
        assert_eq!(restarted, case.restarts, "{n}: since {d:#?}");
        assert_eq!(
            d.event, case.restarts,
            "{n}: an Event on every change: {d:#?}"
        );
        for want in case.blockers {
            assert!(
                d.blockers.iter().any(|b| b.contains(want)),
                "{n}: no blocker says {want:?}: {:?}",
                d.blockers
            );
        }
        if case.blockers.is_empty() && case.phase != RolloutPhase::RolledBack {
            assert!(d.blockers.is_empty(), "{n}: {:?}", d.blockers);
        }
        assert!(
            d.requeue_after > Duration::ZERO && d.requeue_after <= Duration::from_secs(300),
            "{n}: requeue {:?}",
            d.requeue_after
        );
    }
}

#[test]
fn a_full_staged_rollout_walks_every_phase_in_order() {
    use RolloutPhase::*;
    let spec = staged();
    let mut now = t0();
    let mut current: Option<Current> = None;
    let mut seen = Vec::new();
    let mut ev = evidence(vec![pod("a"), uninjected("b")]);
    let advance = |ev: &Evidence, now: SystemTime, current: &mut Option<Current>| {
        let d = step(&spec, Some(1), current.as_ref(), ev, now);
        *current = Some(after(&d));
        d
    };
    seen.push(advance(&ev, now, &mut current).phase);
    ev.pods[1] = pod("b");
    seen.push(advance(&ev, now, &mut current).phase);
    now += minutes(3);
    ev.plaintext = vec![plaintext("10.0.0.9", Some("shop/legacy-0"), 8080, 1)];
    let d = advance(&ev, now, &mut current);
    assert_eq!((d.phase, d.since), (Observing, now), "the window stopped");
    ev.plaintext.clear();
    now += minutes(1);
    let d = advance(&ev, now, &mut current);
    assert_eq!(
        (d.phase, d.reason, d.since),
        (Observing, reason::OBSERVING, now),
        "the first look without plaintext starts the window"
    );
    now += minutes(9);
    seen.push(advance(&ev, now, &mut current).phase);
    now += minutes(1);
    seen.push(advance(&ev, now, &mut current).phase);
    ev.clients = vec![client("shop/c-0", "old", "new")];
    seen.push(advance(&ev, now, &mut current).phase);
    ev.clients = vec![client("shop/c-0", "new", "new")];
    seen.push(advance(&ev, now, &mut current).phase);
    assert_eq!(
        seen,
        [Blocked, Observing, Observing, Enforcing, Enforcing, Strict]
    );
}

/// While plaintext keeps coming, a look that sees only more of it from the
/// same sources changes nothing a user reads (so the status is not
/// rewritten and no Event goes out); a new source is news; the window only
/// runs from the first look without plaintext.
#[test]
fn persisting_plaintext_keeps_the_status_still_until_a_new_source_appears() {
    let spec = staged();
    let mut now = t0();
    let mut current = at(RolloutPhase::Observing, minutes(4)).expect("current");
    let mut ev = evidence(vec![pod("a")]);
    let look = |ev: &Evidence, now: SystemTime, current: &mut Current| {
        let d = step(&spec, Some(1), Some(&*current), ev, now);
        *current = after(&d);
        d
    };
    ev.plaintext = vec![plaintext("10.0.0.9", Some("shop/legacy-0"), 8080, 3)];
    let first = look(&ev, now, &mut current);
    assert_eq!(first.reason, reason::PLAINTEXT_SEEN);
    assert!(first.event && first.recount, "{first:#?}");
    assert_eq!(first.since, now);

    for _ in 0..5 {
        now += Duration::from_secs(10);
        ev.plaintext[0].connections += 40;
        let d = look(&ev, now, &mut current);
        assert!(!d.event, "the same source again is no news: {d:#?}");
        assert!(d.recount, "the next look counts from this one");
        assert_eq!(
            (d.since, &d.blockers, &d.message),
            (first.since, &first.blockers, &first.message),
            "nothing a user reads changed"
        );
    }

    now += Duration::from_secs(10);
    ev.plaintext = vec![plaintext("10.0.0.12", Some("shop/cron-1"), 8080, 1)];
    let d = look(&ev, now, &mut current);
    assert!(d.event, "a new source: {d:#?}");
    assert_eq!(d.since, first.since);
    assert_eq!(
        d.blockers.len(),
        2,
        "both sources stay named: {:?}",
        d.blockers
    );

    now += Duration::from_secs(10);
    ev.plaintext.clear();
    let d = look(&ev, now, &mut current);
    assert_eq!((d.reason, d.since), (reason::OBSERVING, now));
    assert!(d.blockers.is_empty() && d.recount);

    // A whole window from that look, not from the plaintext's first sight.
    let d = look(&ev, now + minutes(9), &mut current);
    assert_eq!(d.phase, RolloutPhase::Observing);
    let d = look(&ev, now + minutes(10), &mut current);
    assert_eq!(d.phase, RolloutPhase::Enforcing);
}

/// After a rollback, growing counts do not change the blockers (so the
/// status is not rewritten); a new source joins them.
#[test]
fn rolled_back_blockers_change_only_with_the_set_of_sources() {
    let spec = staged();
    let mut current = at(RolloutPhase::Strict, minutes(30)).expect("current");
    let mut ev = Evidence {
        rejected_recently: vec![meshed("10.244.3.3", "shop/cron-1", 8080, 12)],
        plaintext: vec![meshed("10.244.3.3", "shop/cron-1", 8080, 12)],
        ..evidence(vec![pod("a")])
    };
    let d = step(&spec, Some(1), Some(&current), &ev, t0());
    assert_eq!(d.phase, RolloutPhase::RolledBack);
    current = after(&d);
    let blockers = d.blockers.clone();
    ev.plaintext[0].connections = 500;
    let d = step(&spec, Some(1), Some(&current), &ev, t0() + minutes(5));
    assert_eq!(
        (d.phase, &d.blockers, d.event),
        (RolloutPhase::RolledBack, &blockers, false)
    );
    // An address no pod holds is not something the rollback broke.
    ev.plaintext.push(plaintext("203.0.113.9", None, 8080, 40));
    let d = step(&spec, Some(1), Some(&current), &ev, t0() + minutes(10));
    assert_eq!(d.blockers, blockers, "a stranger joins nothing");
    ev.plaintext
        .push(plaintext("10.244.3.4", Some("shop/cron-2"), 8080, 1));
    let d = step(&spec, Some(1), Some(&current), &ev, t0() + minutes(10));
    assert_eq!(d.blockers.len(), 2, "{:?}", d.blockers);
}

#[test]
fn long_blocker_lists_are_capped_and_say_how_many_more() {
    let pods: Vec<PodEvidence> = (0..25).map(|i| uninjected(&format!("p{i:02}"))).collect();
    let d = step(&staged(), Some(1), None, &evidence(pods), t0());
    assert_eq!(d.blockers.len(), 20);
    assert!(
        d.message.starts_with("25 pods have no sidecar"),
        "{}",
        d.message
    );
    assert!(d.message.ends_with("(5 more not listed)"), "{}", d.message);
}

/// Anyone who can reach a pod could otherwise switch mTLS off for it:
/// knocking with plaintext from a pod without the sidecar, or from an
/// address no pod holds, is what STRICT refuses, not evidence that the flip
/// broke the mesh.
#[test]
fn plaintext_knocking_from_an_unknown_pod_does_not_roll_back_strict() {
    let spec = staged();
    let current = at(RolloutPhase::Strict, minutes(30)).expect("current");
    let ev = Evidence {
        rejected_recently: vec![
            plaintext("10.244.9.9", Some("tools/curl-0"), 8080, 500),
            plaintext("192.168.1.10", None, 8080, 500),
            meshed("10.244.3.3", "shop/checkout-1", 8080, 1),
        ],
        ..evidence(vec![pod("a")])
    };
    let d = step(&spec, Some(1), Some(&current), &ev, t0());
    assert_eq!((d.phase, d.reason), (RolloutPhase::Strict, reason::STRICT));
    assert!(d.blockers.is_empty() && !d.event, "{d:#?}");
    for named in [
        "plaintext from 10.244.9.9 (pod tools/curl-0) to port 8080",
        "plaintext from 192.168.1.10 (not a pod of the cluster) to port 8080",
        "plaintext from 10.244.3.3 (pod shop/checkout-1, meshed) to port 8080",
    ] {
        assert!(d.message.contains(named), "{named}: {}", d.message);
    }
    // More of the same knocking rewrites nothing.
    let mut more = ev.clone();
    more.rejected_recently[0].connections = 5000;
    let again = step(&spec, Some(1), Some(&after(&d)), &more, t0() + minutes(1));
    assert_eq!(again.message, d.message);
}

/// A source that is not a pod of the cluster is named, and the window runs
/// on: it cannot hold a rollout in Observing forever.
#[test]
fn plaintext_from_an_address_no_pod_holds_cannot_hold_the_window() {
    let spec = staged();
    let mut current = at(RolloutPhase::Observing, minutes(0)).expect("current");
    let ev = Evidence {
        plaintext: vec![plaintext("192.168.1.10", None, 8080, 40)],
        ..evidence(vec![pod("a")])
    };
    let mut now = t0();
    let d = step(&spec, Some(1), Some(&current), &ev, now);
    assert_eq!(
        (d.phase, d.reason),
        (RolloutPhase::Observing, reason::OBSERVING)
    );
    assert!(d.blockers.is_empty(), "{:?}", d.blockers);
    assert!(
        d.message
            .contains("plaintext from 192.168.1.10 (not a pod of the cluster) to port 8080"),
        "{}",
        d.message
    );
    current = after(&d);
    now += minutes(10);
    let d = step(&spec, Some(1), Some(&current), &ev, now);
    assert_eq!(d.phase, RolloutPhase::Enforcing, "{d:#?}");
}

/// The proxy's `other` bucket may hide a real client behind a flood of
/// addresses (or ports): unlike an address no pod holds, it holds the
/// window, and is named as what it is.
#[test]
fn plaintext_in_the_proxys_other_bucket_holds_the_window() {
    let spec = staged();
    let current = at(RolloutPhase::Observing, minutes(0)).expect("current");
    for (src, port) in [("other", 8080), ("10.0.0.9", 0)] {
        let ev = Evidence {
            plaintext: vec![plaintext(src, None, port, 1)],
            ..evidence(vec![pod("a")])
        };
        let d = step(&spec, Some(1), Some(&current), &ev, t0() + minutes(20));
        assert_eq!(
            (d.phase, d.reason),
            (RolloutPhase::Observing, reason::PLAINTEXT_SEEN),
            "{src}:{port}: {d:#?}"
        );
        assert!(
            d.blockers.iter().any(|b| b.contains("`other` bucket")),
            "{:?}",
            d.blockers
        );
    }
}

/// A port a pod's annotation keeps out of the redirect never sees the
/// proxy: the status names it as not covered, in Strict and on the way in.
#[test]
fn a_port_skipped_by_annotation_is_named_as_not_covered_by_strict() {
    let spec = staged();
    let ev = evidence(vec![
        pod("a"),
        PodEvidence {
            skipped_inbound_ports: vec![9090, 5432],
            ..pod("db-0")
        },
    ]);
    let strict = at(RolloutPhase::Strict, minutes(30)).expect("current");
    let d = step(&spec, Some(1), Some(&strict), &ev, t0());
    assert_eq!(d.phase, RolloutPhase::Strict);
    for named in [
        "not covered by Strict",
        "pod db-0 port 9090",
        "pod db-0 port 5432",
    ] {
        assert!(d.message.contains(named), "{named}: {}", d.message);
    }
    let enforcing = at(RolloutPhase::Enforcing, minutes(2)).expect("current");
    let d = step(&spec, Some(1), Some(&enforcing), &ev, t0());
    assert_eq!(d.phase, RolloutPhase::Strict);
    assert!(d.message.contains("pod db-0 port 9090"), "{}", d.message);
    let clean = step(
        &spec,
        Some(1),
        Some(&strict),
        &evidence(vec![pod("a")]),
        t0(),
    );
    assert!(!clean.message.contains("not covered"), "{}", clean.message);
}
