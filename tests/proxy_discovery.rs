//! Tier 3, issue 19: the proxy balances, ejects, retries and drains per
//! pod when the operator publishes a Service's pods (ConfigMap
//! `weft-endpoints`, here its mounted `endpoints.json` next to the
//! config), and reaches the Service through its ClusterIP while nothing is
//! published. Real proxy, real upstreams on loopback; each "pod" is an
//! upstream on its own port (a group of the document per port).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const INVENTORY: &str = "inventory.shop.svc.cluster.local:80";

/// The tests here measure the balancer by the share of requests each pod
/// gets; run side by side on a two-core machine, each one's load would
/// skew the others' latencies (and so their shares). One at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Service `inventory` with no explicit endpoints and a ClusterIP where
/// nothing listens (127.0.0.9:80): only published pods can serve it.
/// Meshed (its pods run a proxy), not strict: these proxies hold no
/// identity, so they speak plaintext to the pods, which is all the
/// upstreams here understand. Only meshed Services are balanced per pod.
fn inventory(policy: Option<Value>) -> Value {
    let mut s = service("inventory", &[], policy, json!([]));
    s["clusterIps"] = json!(["127.0.0.9"]);
    s["mesh"] = json!({ "namespace": "shop" });
    s
}

/// A pod of the endpoints document: `addr`, ready unless `terminating`.
fn pod(addr: SocketAddr, terminating: bool) -> Value {
    json!({
        "ports": { "": addr.port() },
        "endpoints": [{
            "addresses": [addr.ip().to_string()],
            "ready": !terminating,
            "terminating": terminating,
            "serving": terminating,
            "serviceAccount": "inventory",
        }],
    })
}

/// Publishes `groups` as inventory's pods and waits until the proxy took
/// this document (its `generation`).
async fn publish(p: &TestProxy, generation: &str, groups: Vec<Value>) {
    let doc = json!({
        "schemaVersion": "1.0", "generation": generation, "namespace": "shop",
        "services": { "inventory.shop": { "groups": groups } },
    });
    p.publish_endpoints(&doc).await;
}

/// `n` GETs through the proxy from `parallel` callers, each sending its
/// next request when its last one is answered: the steady concurrency of
/// a service whose client keeps `parallel` requests in flight. (Batches
/// that wait for their slowest request would start each batch with every
/// pod idle, which no caller under load sees, and hide the pending counts
/// the balancer weighs.) The statuses, in no particular order.
async fn load(p: &TestProxy, n: usize, parallel: usize) -> Vec<u16> {
    let url = p.outbound_url(0);
    let callers = (0..parallel).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(n / parallel);
            for _ in 0..n / parallel {
                statuses.push(get(&url).await.status);
            }
            statuses
        })
    });
    futures_util::future::join_all(callers)
        .await
        .into_iter()
        .flat_map(|r| r.expect("caller task"))
        .collect()
}

#[tokio::test]
async fn a_slow_pod_gets_under_a_tenth_of_the_requests() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fast = |ms| {
        Upstream::start(std::sync::Arc::new(move |_, _| {
            (200, "ok".into(), Duration::from_millis(ms))
        }))
    };
    // 5 ms against 50 ms: ten times slower, with room for a loaded CI
    // machine's scheduling noise (a few ms) not to blur the contrast.
    let (a, b) = (fast(5).await, fast(5).await);
    let slow = fast(50).await;
    let p = start_proxy(&config(vec![inventory(None)]), &[INVENTORY], &[]).await;
    publish(
        &p,
        "three",
        vec![
            pod(a.addr, false),
            pod(b.addr, false),
            pod(slow.addr, false),
        ],
    )
    .await;
    let statuses = load(&p, 2000, 8).await;
    assert!(statuses.iter().all(|s| *s == 200), "all served");
    let share = slow.hits() as f64 / 2000.0;
    assert!(
        share < 0.10,
        "the pod ten times slower got {:.1} % ({} / {} / {})",
        share * 100.0,
        a.hits(),
        b.hits(),
        slow.hits()
    );
    assert!(a.hits() > 0 && b.hits() > 0, "both fast pods serve");

    // One caller, one request at a time: nothing is ever pending, so only
    // the latency estimates keep the slow pod out (a balancer blind to
    // them would give it a third).
    let before = slow.hits();
    let statuses = load(&p, 300, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "all served");
    let share = (slow.hits() - before) as f64 / 300.0;
    assert!(
        share < 0.20,
        "one at a time, the slow pod got {:.1} %",
        share * 100.0
    );
}

#[tokio::test]
async fn a_failing_pod_is_ejected_and_retries_go_to_another_pod() {
    let _one = ONE_AT_A_TIME.lock().await;
    let ok = Upstream::fixed(200, "ok").await;
    let ok2 = Upstream::fixed(200, "ok").await;
    let broken = Upstream::fixed(503, "down").await;
    let policy = policy(json!({
        "retry": { "maxRetries": 2, "retryOn": ["5xx"] },
        "circuitBreaker": { "consecutiveFailures": 3, "openMs": 60000, "maxOpenMs": 60000 },
    }));
    let p = start_proxy(&config(vec![inventory(Some(policy))]), &[INVENTORY], &[]).await;
    publish(
        &p,
        "one-broken",
        vec![
            pod(ok.addr, false),
            pod(ok2.addr, false),
            pod(broken.addr, false),
        ],
    )
    .await;
    let statuses = load(&p, 400, 4).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        served as f64 >= 0.995 * statuses.len() as f64,
        "{served} of {} served",
        statuses.len()
    );
    // Every try that met the broken pod was retried elsewhere (a retry
    // never goes back to a pod that failed this request), and its breaker
    // took it out after three.
    assert!(
        broken.hits() <= 3 + 4,
        "ejected: {} tries reached it",
        broken.hits()
    );
    assert_eq!(
        ok.hits() + ok2.hits(),
        served,
        "each success came from a healthy pod"
    );
}

#[tokio::test]
async fn a_terminating_pod_gets_no_new_request_unless_it_is_the_last() {
    let _one = ONE_AT_A_TIME.lock().await;
    let live = Upstream::fixed(200, "live").await;
    let leaving = Upstream::fixed(200, "leaving").await;
    let p = start_proxy(&config(vec![inventory(None)]), &[INVENTORY], &[]).await;
    publish(
        &p,
        "rolling",
        vec![pod(live.addr, false), pod(leaving.addr, true)],
    )
    .await;
    let statuses = load(&p, 100, 4).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(leaving.hits(), 0, "the terminating pod took nothing new");
    assert_eq!(live.hits(), 100);

    // Only terminating pods left that still serve: they take requests, as
    // kube-proxy's terminating-endpoints fallback does.
    publish(&p, "last", vec![pod(leaving.addr, true)]).await;
    let statuses = load(&p, 20, 4).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(leaving.hits(), 20);
}

/// Until pods are published the Service is reached through its ClusterIP
/// (kube-proxy's path); once they are, straight at them, and moving pods
/// keeps the proxy's view of the ones that stay.
#[tokio::test]
async fn without_published_pods_the_cluster_ip_serves_then_the_pods_do() {
    let _one = ONE_AT_A_TIME.lock().await;
    let behind_cluster_ip = Upstream::fixed(200, "cluster-ip").await;
    let pod_a = Upstream::fixed(200, "a").await;
    let pod_b = Upstream::fixed(200, "b").await;
    // The Service's port is the ClusterIP upstream's, so 127.0.0.1 is its
    // "ClusterIP".
    let port = behind_cluster_ip.addr.port();
    let mut svc = service("inventory", &[], None, json!([]));
    svc["clusterIps"] = json!(["127.0.0.1"]);
    svc["ports"] = json!([{ "port": port, "targetPort": 8080, "protocol": "detect" }]);
    svc["mesh"] = json!({ "namespace": "shop" });
    let target = format!("inventory.shop.svc.cluster.local:{port}");
    let p = start_proxy(&config(vec![svc]), &[&target], &[]).await;
    let statuses = load(&p, 10, 2).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(behind_cluster_ip.hits(), 10, "the ClusterIP path");

    let group = |addr: SocketAddr, terminating: bool| {
        json!({
            "ports": { "": addr.port() },
            "endpoints": [{ "addresses": [addr.ip().to_string()],
                            "ready": !terminating, "terminating": terminating, "serving": true }],
        })
    };
    publish(&p, "a", vec![group(pod_a.addr, false)]).await;
    load(&p, 10, 2).await;
    assert_eq!(pod_a.hits(), 10, "the published pod");
    // A rolling update: a new pod, the old one terminating.
    publish(
        &p,
        "a-leaving-b-new",
        vec![group(pod_a.addr, true), group(pod_b.addr, false)],
    )
    .await;
    load(&p, 20, 2).await;
    assert_eq!(pod_b.hits(), 20, "the new pod takes every new request");
    assert_eq!(pod_a.hits(), 10, "the terminating one none");
    assert_eq!(behind_cluster_ip.hits(), 10, "no longer the ClusterIP");

    // The document is withdrawn (the namespace unmeshed, the ConfigMap
    // deleted, the projection drops the file): back to the ClusterIP, not
    // to a frozen list of pod addresses nobody keeps current.
    let reloads = p.metric("weft_proxy_endpoints_reloads").await;
    std::fs::remove_file(p.dir.path().join("endpoints.json")).expect("remove");
    p.wait_metric("weft_proxy_endpoints_reloads", reloads + 1.0)
        .await;
    load(&p, 10, 2).await;
    assert_eq!(behind_cluster_ip.hits(), 20, "the ClusterIP again");
    assert_eq!(pod_b.hits(), 20);

    // An unmeshed Service is never sent to published pod addresses: one
    // may already belong to another pod, and plaintext would reach it.
    let mut plain = p.proxy.store.load().expect("config").config.clone();
    plain.outbound.services[0].mesh = None;
    let plain = plain.seal();
    p.write_config(&serde_json::to_value(&plain).expect("json"));
    p.wait_metric("weft_proxy_config_reloads", 2.0).await;
    publish(&p, "b-again", vec![group(pod_b.addr, false)]).await;
    load(&p, 10, 2).await;
    assert_eq!(behind_cluster_ip.hits(), 30, "unmeshed: the ClusterIP");
    assert_eq!(pod_b.hits(), 20);
}

/// `RoundRobin` (the TrafficPolicy's `loadBalancer.algorithm`) takes the
/// pods in turn, the slow one included: each of three gets a third.
#[tokio::test]
async fn round_robin_takes_each_pod_in_turn() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pods = [
        Upstream::fixed(200, "a").await,
        Upstream::fixed(200, "b").await,
        Upstream::fixed(200, "c").await,
    ];
    let policy = policy(json!({ "loadBalancer": "RoundRobin" }));
    let p = start_proxy(&config(vec![inventory(Some(policy))]), &[INVENTORY], &[]).await;
    publish(
        &p,
        "three",
        pods.iter().map(|u| pod(u.addr, false)).collect(),
    )
    .await;
    let statuses = load(&p, 300, 1).await;
    assert!(statuses.iter().all(|s| *s == 200));
    for u in &pods {
        assert_eq!(u.hits(), 100, "each pod in turn");
    }
}

/// Zone-aware routing with failover (issue 19, item 4): a proxy in
/// `zone-a` whose policy prefers its zone sends every call to the pods of
/// `zone-a` while they are healthy; when they fail, their breakers eject
/// them and calls spill to `zone-b` (retries already go there, so callers
/// see no failure); when they recover and their breakers let a probe
/// through, calls come back.
#[tokio::test]
async fn calls_stay_in_the_zone_spill_when_it_fails_and_come_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _one = ONE_AT_A_TIME.lock().await;
    let failing = Arc::new(AtomicBool::new(false));
    let local = || {
        let failing = failing.clone();
        Upstream::start(Arc::new(move |_, _| {
            if failing.load(Ordering::SeqCst) {
                (503, "down".into(), Duration::ZERO)
            } else {
                (200, "here".into(), Duration::ZERO)
            }
        }))
    };
    let (here_1, here_2) = (local().await, local().await);
    let (there_1, there_2) = (
        Upstream::fixed(200, "there").await,
        Upstream::fixed(200, "there").await,
    );
    let policy = policy(json!({
        "retry": { "maxRetries": 2, "retryOn": ["5xx"] },
        "circuitBreaker": { "consecutiveFailures": 3, "openMs": 2000, "maxOpenMs": 2000 },
        "zoneAffinity": { "minHealthyPercent": 70 },
    }));
    let p = start_proxy(
        &config(vec![inventory(Some(policy))]),
        &[INVENTORY],
        &["--zone", "zone-a"],
    )
    .await;
    let in_zone = |addr: SocketAddr, zone: &str| {
        let mut g = pod(addr, false);
        g["endpoints"][0]["zone"] = json!(zone);
        g
    };
    publish(
        &p,
        "two-zones",
        vec![
            in_zone(here_1.addr, "zone-a"),
            in_zone(here_2.addr, "zone-a"),
            in_zone(there_1.addr, "zone-b"),
            in_zone(there_2.addr, "zone-b"),
        ],
    )
    .await;
    let there = || there_1.hits() + there_2.hits();
    let here = || here_1.hits() + here_2.hits();

    let statuses = load(&p, 200, 4).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(there(), 0, "healthy zone: every call stays in it");
    assert_eq!(here(), 200);

    // The zone's pods fail every request.
    failing.store(true, Ordering::SeqCst);
    let statuses = load(&p, 200, 4).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 200, "retries reach the other zone");
    let failed_tries = here() - 200;
    assert!(
        failed_tries <= 2 * (3 + 4),
        "each failing pod ejected after three failures (plus those in flight): {failed_tries} tries met them"
    );
    assert_eq!(there(), 200, "the other zone served every call");

    // Recovered: once the breakers' open time is over, a probe closes
    // each one and calls come back to the zone.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (here_before, there_before) = (here(), there());
    let statuses = load(&p, 200, 4).await;
    assert!(statuses.iter().all(|s| *s == 200));
    let (back, away) = (here() - here_before, there() - there_before);
    assert!(
        back >= 190,
        "calls came back to the zone: {back} here, {away} in the other zone"
    );
}
