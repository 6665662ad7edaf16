//! Tier 3: the progressive canary of a ServiceRoute with real proxies on
//! loopback: a client proxy routing `checkout` by the compiled route to
//! a stable and a canary pod, each an app behind its own proxy. Each look
//! does what the control plane does on a cluster, with the same code:
//! read every proxy's `/metrics` into the mesh stats, gather what the
//! canary's and the stable backends' own pods served, take the state
//! machine's step, write it as the route's status, compile the mesh, and
//! hand the client proxy the config with the weights the compiler put in
//! force. Only the API server is left out (its writes are
//! the `weft-canary` field manager's server-side apply, tier 5), and the
//! step's window is shortened to a second.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use weft::api::{CanaryPhase, CanaryRollout, ServiceRoute};
use weft::meshstats::{MeshStats, ProxyCounts, Reading};
use weft::operator::canaries::{current_of, gather, status_of};
use weft::operator::canary::{self, Decision};

use support::*;

/// The shop's objects: the `checkout` Service, its canary, and the route
/// that splits `checkout` between them with a progressive canary.
const SHOP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/inject: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: checkout-canary, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata: {name: checkout, namespace: shop, generation: 1}
spec:
  parentRef: {name: checkout}
  rules:
  - name: all
    backendRefs: [{name: checkout, weight: 90}, {name: checkout-canary, weight: 10}]
  rollout:
    canary: checkout-canary
    steps: [5, 25, 50, 100]
    gates: {maxSuccessRateDrop: 1, maxP99IncreasePercent: 50, minRequests: 30}
";

/// The route, loaded and checked as `weft compile` and the API server
/// would; its window shortened to a second (below what the CRD allows,
/// so that a test runs in seconds).
fn route(
    min_requests: u32,
    retries: bool,
) -> (weft::compile::ClusterFacts, ServiceRoute, CanaryRollout) {
    let mut loaded = weft::manifest::Loaded::default();
    let mut errors = Vec::new();
    let shop = if retries {
        // Two retries of any 5xx: a client sees almost none of a
        // canary's failures.
        SHOP.replace(
            "  - name: all\n",
            "  - name: all\n    retries: {attempts: 3, retryOn: [5xx], budget: {percent: 100}}\n",
        )
    } else {
        SHOP.to_owned()
    };
    weft::manifest::load_str(Path::new("shop.yaml"), &shop, &mut loaded, &mut errors);
    assert!(errors.is_empty(), "{errors:#?}");
    let facts = loaded.facts;
    let route = facts.service_routes[0].clone();
    let mut rollout = route.spec.rollout.clone().expect("rollout");
    rollout.interval = weft::api::Duration::from_secs(1);
    rollout.gates.min_requests = min_requests;
    (facts, route, rollout)
}

/// A client proxy whose `checkout` routes are the ones the compiler made
/// of the route with `route`'s status.
struct Look {
    facts: weft::compile::ClusterFacts,
    route: ServiceRoute,
    rollout: CanaryRollout,
    stats: MeshStats,
    proxy: TestProxy,
    stable: Upstream,
    canary: Upstream,
    /// The stable and the canary pod's own proxies.
    stable_pod: TestProxy,
    canary_pod: TestProxy,
}

impl Look {
    /// The proxy's `checkout` config as the compiler makes it now.
    fn config(&self) -> Value {
        let mut facts = self.facts.clone();
        facts.service_routes = vec![self.route.clone()];
        let compiled = weft::compile::compile(&facts);
        let shop = &compiled.configs["shop"];
        let routes = shop
            .outbound
            .services
            .iter()
            .find(|s| s.name == "checkout")
            .map(|s| serde_json::to_value(&s.routes).expect("routes"))
            .expect("checkout compiled");
        let checkout = service(
            "checkout",
            &[self.stable_pod.running.inbound[0]],
            None,
            routes,
        );
        let canary = service(
            "checkout-canary",
            &[self.canary_pod.running.inbound[0]],
            None,
            json!([]),
        );
        config(vec![checkout, canary])
    }

    /// The canary's share in the routes the proxy runs.
    fn weight_in_config(&self) -> u32 {
        let routes = &self.config()["outbound"]["services"][0]["routes"][0]["backends"];
        let of = |name: &str| {
            routes
                .as_array()
                .expect("backends")
                .iter()
                .find(|b| b["service"] == name)
                .and_then(|b| b["weight"].as_u64())
                .unwrap_or(0)
        };
        let (canary, stable) = (of("checkout-canary.shop"), of("checkout.shop"));
        u32::try_from(100 * canary / (canary + stable).max(1)).expect("percent")
    }

    async fn reload(&self) {
        self.proxy.write_config(&self.config());
        // The proxy polls its config file; a request after the reload
        // goes by the new weights.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    /// Reads every proxy's metrics into the stats, as the control
    /// plane's collector does every tick.
    async fn read(&mut self) {
        let mut readings = Vec::new();
        for (pod, proxy) in [
            ("frontend-0", &self.proxy),
            ("checkout-0", &self.stable_pod),
            ("checkout-canary-0", &self.canary_pod),
        ] {
            let text = proxy.metrics().await;
            readings.push(Reading {
                id: ("shop".into(), pod.into()),
                counts: Ok(ProxyCounts::read("shop", &text).expect("readable")),
            });
        }
        self.stats.record(SystemTime::now(), readings);
    }

    /// One look of the control plane: the decision, written as the
    /// route's status and put in force.
    async fn look(&mut self) -> Decision {
        self.read().await;
        let generation = self.route.metadata.generation;
        let revision = self.route.canary_revision().expect("a rollout");
        let current = self
            .route
            .status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .map(current_of);
        let since = current.as_ref().map_or(SystemTime::now(), |c| c.since);
        let ticks = self.stats.since(since);
        // The workloads the pods' proxies report under (on a cluster, from
        // the Services' EndpointSlices and the pods' labels).
        let (canary, stable): (BTreeSet<String>, BTreeSet<String>) = (
            ["checkout-canary".to_owned()].into(),
            ["checkout".to_owned()].into(),
        );
        let evidence = gather(&ticks, "shop", &canary, &stable);
        let d = canary::step(
            &self.rollout,
            &revision,
            false,
            current.as_ref(),
            &evidence,
            SystemTime::now(),
        );
        let status = self.route.status.get_or_insert_with(Default::default);
        status.rollout = Some(status_of(&d, generation, &revision));
        self.reload().await;
        d
    }

    /// `n` calls through the proxy, a few at a time.
    async fn traffic(&self, n: usize) {
        let url = format!("{}/pay", self.proxy.outbound_url(0));
        let client = client();
        for chunk in 0..n.div_ceil(10) {
            let calls = (0..10.min(n - chunk * 10)).map(|_| send(&client, "GET", &url, &[]));
            futures_util::future::join_all(calls).await;
        }
    }
}

/// A stable upstream, a canary failing `fail_every`-th request (0: never),
/// a proxy routing by the compiled route (its rule retrying 5xx, if
/// `retries`), the first look taken.
async fn start(fail_every: usize, min_requests: u32, retries: bool) -> Look {
    let stable = Upstream::fixed(200, "stable").await;
    let canary = Upstream::start(Arc::new(move |n, _| {
        let failed = fail_every > 0 && n % fail_every == fail_every - 1;
        (
            if failed { 500 } else { 200 },
            "canary".into(),
            Duration::ZERO,
        )
    }))
    .await;
    let (facts, route, rollout) = route(min_requests, retries);
    let placeholder = config(vec![]);
    let proxy = start_proxy(&placeholder, &["checkout.shop:80"], &[]).await;
    let pod = |app: &Upstream, workload: &'static str| {
        let map = format!("127.0.0.1:0={}", app.addr.port());
        let placeholder = placeholder.clone();
        async move {
            start_proxy(
                &placeholder,
                &[],
                &["--inbound-map", &map, "--workload", workload],
            )
            .await
        }
    };
    let stable_pod = pod(&stable, "checkout").await;
    let canary_pod = pod(&canary, "checkout-canary").await;
    let mut look = Look {
        facts,
        route,
        rollout,
        stats: MeshStats::reading_every(Duration::from_secs(1)),
        proxy,
        stable,
        canary,
        stable_pod,
        canary_pod,
    };
    look.reload().await;
    // The collector's first reading is a baseline.
    look.read().await;
    let d = look.look().await;
    assert_eq!(
        (d.phase, d.step, d.weight),
        (CanaryPhase::Progressing, 0, 5)
    );
    look
}

#[tokio::test]
async fn a_healthy_canary_reaches_all_traffic_through_every_step() {
    let mut look = start(0, 30, false).await;
    let mut weights = vec![look.weight_in_config()];
    for _ in 0..12 {
        // Enough for 30 canary requests at 5 %.
        look.traffic(800).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let d = look.look().await;
        if d.event {
            weights.push(look.weight_in_config());
        }
        if d.phase == CanaryPhase::Promoted {
            break;
        }
        assert_eq!(d.phase, CanaryPhase::Progressing, "{}", d.message);
    }
    assert_eq!(weights, [5, 25, 50, 100], "every step in turn");
    // All traffic goes to the canary now.
    let before = look.stable.hits();
    look.traffic(50).await;
    assert_eq!(
        look.stable.hits(),
        before,
        "the stable backend still got requests"
    );
}

/// A canary failing a fifth of its requests, the client's calls retried
/// (`retries`) or not: aborted at its first step, and no more traffic.
async fn failing_canary_is_aborted(retries: bool) {
    let mut look = start(5, 30, retries).await;
    let mut looks = 0;
    let d = loop {
        look.traffic(800).await;
        let d = look.look().await;
        if d.phase != CanaryPhase::Progressing {
            break d;
        }
        assert_eq!(d.step, 0, "passed its first step: {}", d.message);
        looks += 1;
        assert!(looks < 10, "never judged: {}", d.message);
    };
    assert_eq!(
        (d.phase, d.step, d.weight),
        (CanaryPhase::Aborted, 0, 0),
        "{}",
        d.message
    );
    assert_eq!(d.verdict, canary::verdict::SUCCESS_RATE);
    assert_eq!(look.weight_in_config(), 0);
    let hits = look.canary.hits();
    look.traffic(300).await;
    assert_eq!(look.canary.hits(), hits, "an aborted canary got traffic");
    // And it stays aborted.
    let d = look.look().await;
    assert_eq!((d.phase, d.weight), (CanaryPhase::Aborted, 0));
}

#[tokio::test]
async fn a_canary_failing_a_fifth_of_its_requests_is_aborted_at_its_first_step_and_gets_no_more() {
    failing_canary_is_aborted(false).await;
}

/// The client's retries hide the canary's failures from its callers (two
/// retries make a fifth about a hundredth); the canary's own pods count
/// every try, so the gate still sees a fifth.
#[tokio::test]
async fn a_failing_canary_is_aborted_even_when_the_clients_retries_hide_its_failures() {
    failing_canary_is_aborted(true).await;
}

#[tokio::test]
async fn a_quiet_canary_never_passes_a_gate() {
    // 2000 requests a step: far more than the traffic gives at 5 %.
    let mut look = start(0, 2000, false).await;
    for _ in 0..4 {
        look.traffic(200).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let d = look.look().await;
        assert_eq!(
            (d.phase, d.step, d.weight),
            (CanaryPhase::Progressing, 0, 5),
            "{}",
            d.message
        );
        assert!(!d.event);
    }
    let d = look.look().await;
    assert_eq!(
        d.verdict,
        canary::verdict::TOO_FEW_REQUESTS,
        "{}",
        d.message
    );
    assert_eq!(look.weight_in_config(), 5);
}
