//! Policy compiler benchmark: compile time and ProxyConfig size against the
//! number of Services. Writes `bench/results/compile.md`.
//!
//! Two clusters per size, both with N Services in namespaces of 50 and
//! policies on a fifth of them (TrafficPolicies on 10 %, ServiceRoutes on
//! 5 %, AccessPolicies admitting the client namespace on 5 %):
//! - `one client`: only the client namespace `shop` is meshed and it may
//!   reach every Service — the size of one namespace's config at N
//!   reachable Services, and the cost of compiling the whole cluster for it;
//! - `all meshed`: every namespace is meshed, so the compiler emits one
//!   config per namespace, each listing every Service;
//! - `all meshed, scoped`: the same, but every namespace declares the 20
//!   Services it calls (`weft.dev/calls`), so each config lists those, its
//!   own and their route backends; with 10 pods per Service, the client's
//!   `weft-endpoints` (built by the operator's own code) is measured too.
//!
//! Run with `make bench` (release build). Timing is the median of repeated
//! runs in one process; read the figures side by side, not against another
//! machine's.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;
use weft::compile::{ClusterFacts, compile};

const SIZES: [usize; 4] = [10, 100, 1000, 5000];
const PER_NAMESPACE: usize = 50;

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("bench fixture: {e}"))
}

/// Services each namespace calls in the scoped scenario.
const CALLED: usize = 20;
/// Pods behind each Service, for the endpoints document.
const PODS_PER_SERVICE: usize = 10;

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    OneClient,
    AllMeshed,
    Scoped,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::OneClient => "one client",
            Scenario::AllMeshed => "all meshed",
            Scenario::Scoped => "all meshed, scoped",
        }
    }
}

/// The `weft.dev/calls` of namespace number `n`: 20 Services spread over
/// the cluster.
fn calls(n: usize, services: usize) -> String {
    (0..CALLED)
        .map(|k| {
            let i = (n * 37 + k * 251) % services;
            format!("team-{:03}/svc-{i:05}", i / PER_NAMESPACE)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn cluster(services: usize, scenario: Scenario) -> ClusterFacts {
    let all_meshed = scenario != Scenario::OneClient;
    let scoped = scenario == Scenario::Scoped;
    let mut f = ClusterFacts::default();
    let namespaces = services.div_ceil(PER_NAMESPACE);
    let meshed = json!({ "weft.dev/inject": "enabled" });
    let annotations = |n: usize| {
        if scoped {
            json!({ "weft.dev/calls": calls(n, services) })
        } else {
            json!({})
        }
    };
    f.namespaces.push(from(
        json!({ "metadata": { "name": "shop", "labels": meshed, "annotations": annotations(namespaces) } }),
    ));
    f.service_accounts.push(from(
        json!({ "metadata": { "name": "client", "namespace": "shop" } }),
    ));
    for n in 0..namespaces {
        let ns = format!("team-{n:03}");
        let labels = if all_meshed {
            meshed.clone()
        } else {
            json!({})
        };
        f.namespaces.push(from(
            json!({ "metadata": { "name": ns, "labels": labels, "annotations": annotations(n) } }),
        ));
    }
    for i in 0..services {
        let ns = format!("team-{:03}", i / PER_NAMESPACE);
        let name = format!("svc-{i:05}");
        f.service_accounts.push(from(
            json!({ "metadata": { "name": name, "namespace": ns } }),
        ));
        f.services.push(from(json!({
            "metadata": { "name": name, "namespace": ns, "annotations": { "weft.dev/service-accounts": name } },
            "spec": {
                "clusterIP": format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256),
                "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http" }],
            },
        })));
        let meta = json!({ "name": name, "namespace": ns, "generation": 1 });
        let target = json!({ "kind": "Service", "name": name });
        if i % 10 == 0 {
            f.traffic_policies
                .push(from(json!({ "metadata": meta, "spec": {
                    "targetRef": target, "timeout": "2s",
                    "retries": { "attempts": 2, "perTryTimeout": "500ms" },
                    "circuitBreaker": { "consecutiveFailures": 5 },
                    "excludedPaths": ["/health"],
                }})));
        }
        if i % 20 == 1 && i + 1 < services {
            let canary = format!("svc-{:05}", i + 1);
            f.service_routes.push(from(json!({ "metadata": meta, "spec": {
                "parentRef": { "name": name },
                "rules": [{ "backendRefs": [{ "name": name, "weight": 90 }, { "name": canary, "weight": 10 }] }],
            }})));
        }
        if i % 20 == 2 {
            f.access_policies.push(from(json!({ "metadata": meta, "spec": {
                "targetRef": target,
                "rules": [{ "from": [{ "namespace": "shop" }, { "serviceAccount": "svc-00000", "namespace": "team-000" }] }],
            }})));
        }
    }
    f
}

struct Row {
    services: usize,
    scenario: Scenario,
    configs: usize,
    median: Duration,
    min: Duration,
    client_bytes: usize,
    client_stored: usize,
    /// The client's `weft-endpoints` as stored (scoped scenario only).
    endpoints_stored: Option<usize>,
    total_bytes: usize,
}

/// The client's endpoints document as the operator builds it, with
/// [`PODS_PER_SERVICE`] ready pods behind every Service it lists.
fn endpoints_stored(facts: &ClusterFacts, client: &weft::config::ProxyConfig) -> usize {
    use kube::runtime::watcher::Event;
    let mut w = weft::operator::world::Writers::default();
    for svc in &facts.services {
        w.services.apply_watcher_event(&Event::Apply(svc.clone()));
    }
    for (i, svc) in client.outbound.services.iter().enumerate() {
        let endpoints: Vec<serde_json::Value> = (0..PODS_PER_SERVICE)
            .map(|p| {
                json!({
                    "addresses": [format!("10.{}.{}.{}", 128 + i / 256, i % 256, p)],
                    "conditions": { "ready": true },
                    "zone": "zone-a", "nodeName": format!("node-{p:03}"),
                    "targetRef": { "kind": "Pod", "name": format!("{}-{p}", svc.name), "namespace": svc.namespace },
                })
            })
            .collect();
        let slice = from(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": format!("{}-1", svc.name), "namespace": svc.namespace,
                          "labels": { "kubernetes.io/service-name": svc.name } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": endpoints,
        }));
        w.endpoint_slices.apply_watcher_event(&Event::Apply(slice));
    }
    let world = w.world();
    let index = weft::operator::endpoints::index(&world);
    let doc = weft::operator::endpoints::desired(client, &world, &index);
    doc.to_stored().stored_len()
}

fn measure(services: usize, scenario: Scenario) -> Row {
    let facts = cluster(services, scenario);
    let first = compile(&facts);
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || (started.elapsed() < Duration::from_secs(3) && times.len() < 200) {
        let t = Instant::now();
        let out = compile(&facts);
        times.push(t.elapsed());
        assert_eq!(out.configs.len(), first.configs.len());
    }
    times.sort();
    let client = &first.configs["shop"];
    if scenario == Scenario::Scoped {
        // The 20 it calls and their canaries' backends, nothing else.
        assert!(
            (CALLED..=2 * CALLED).contains(&client.outbound.services.len()),
            "the scoped client lists {} Services",
            client.outbound.services.len()
        );
    } else {
        assert_eq!(
            client.outbound.services.len(),
            services,
            "the client reaches every Service"
        );
    }
    Row {
        services,
        scenario,
        configs: first.configs.len(),
        median: times[times.len() / 2],
        min: times[0],
        client_bytes: client.to_json().len(),
        client_stored: client.to_stored().stored_len(),
        endpoints_stored: (scenario == Scenario::Scoped).then(|| endpoints_stored(&facts, client)),
        total_bytes: first.configs.values().map(|c| c.to_json().len()).sum(),
    }
}

fn measure_once(services: usize) -> usize {
    let out = compile(&cluster(services, Scenario::AllMeshed));
    let scoped = measure(services, Scenario::Scoped);
    assert!(scoped.endpoints_stored.is_some_and(|n| n > 0));
    out.configs["shop"].outbound.services.len()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

fn main() {
    // `cargo bench` passes `--bench`. Without it (`cargo test --all-targets`)
    // this is a smoke run: the fixtures still build and compile, nothing is
    // timed or written.
    if !std::env::args().any(|a| a == "--bench") {
        let row = measure_once(100);
        println!("compile bench smoke: {row} services compiled; run `make bench` to measure");
        return;
    }
    let mut rows = Vec::new();
    for services in SIZES {
        for scenario in [Scenario::OneClient, Scenario::AllMeshed, Scenario::Scoped] {
            if scenario == Scenario::Scoped && services < 100 {
                continue;
            }
            let row = measure(services, scenario);
            eprintln!(
                "{:>5} services, {:<18}: {:>8.2} ms median, client config {:>7.1} KiB",
                row.services,
                row.scenario.label(),
                row.median.as_secs_f64() * 1e3,
                row.client_bytes as f64 / 1024.0
            );
            rows.push(row);
        }
    }
    let mut md = String::new();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output();
    let date = date
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let _ = writeln!(md, "# Policy compiler: time and config size\n");
    let _ = writeln!(
        md,
        "Produced by `make bench` (`benches/compile.rs`) on {date}, {}.",
        machine()
    );
    let _ = writeln!(
        md,
        "Release build, one thread; median and minimum of repeated runs of the whole compile \
         (all namespaces, JSON serialisation and hashing included).\n"
    );
    let _ = writeln!(
        md,
        "Scenarios: N Services in namespaces of {PER_NAMESPACE}, with TrafficPolicies on 10 %, ServiceRoutes on 5 % and AccessPolicies on 5 % of them. `one client`: only namespace `shop` is meshed and it reaches all N Services. `all meshed`: every namespace is meshed and gets its own config. `all meshed, scoped`: the same, each namespace declaring the {CALLED} Services it calls (`weft.dev/calls`); its endpoints column is the client's `weft-endpoints` with {PODS_PER_SERVICE} pods per Service, built by the operator's code.\n"
    );
    let _ = writeln!(
        md,
        "| services | scenario | configs | compile median | compile min | one namespace's config (JSON) | as stored in its ConfigMap | its endpoints, stored | all configs (JSON) |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} ms | {:.2} ms | {:.1} KiB | {:.1} KiB{} | {} | {:.1} KiB |",
            r.services,
            r.scenario.label(),
            r.configs,
            r.median.as_secs_f64() * 1e3,
            r.min.as_secs_f64() * 1e3,
            r.client_bytes as f64 / 1024.0,
            r.client_stored as f64 / 1024.0,
            if r.client_stored < r.client_bytes {
                " (gzip)"
            } else {
                ""
            },
            r.endpoints_stored
                .map(|n| format!("{:.1} KiB", n as f64 / 1024.0))
                .unwrap_or_else(|| "-".into()),
            r.total_bytes as f64 / 1024.0,
        );
    }
    let target = rows
        .iter()
        .find(|r| r.services == 5000 && r.scenario == Scenario::OneClient);
    let size = rows
        .iter()
        .find(|r| r.services == 1000 && r.scenario == Scenario::OneClient);
    if let Some(scoped) = rows
        .iter()
        .find(|r| r.services == 5000 && r.scenario == Scenario::Scoped)
    {
        let stored = scoped.client_stored + scoped.endpoints_stored.unwrap_or_default();
        let _ = writeln!(
            md,
            "\nScoped targets (issue 19): a namespace calling {CALLED} of 5000 Services stores at most 64 KiB \
             of config and endpoints ({:.1} KiB, {}); the whole-mesh compile of 5000 Services in {} \
             namespaces with scopes takes under 200 ms ({:.2} ms, {}).",
            stored as f64 / 1024.0,
            if stored <= 64 * 1024 { "met" } else { "MISSED" },
            scoped.configs,
            scoped.median.as_secs_f64() * 1e3,
            if scoped.median < Duration::from_millis(200) {
                "met"
            } else {
                "MISSED"
            },
        );
    }
    if let (Some(t), Some(s)) = (target, size) {
        let _ = writeln!(
            md,
            "\nTargets: 5000 Services compile in under 50 ms (`one client`: {:.2} ms, {}); \
             a namespace reaching 1000 Services gets a config under 512 KiB ({:.1} KiB stored, {}); \
             every stored config under the 1 MiB object limit ({}).",
            t.median.as_secs_f64() * 1e3,
            if t.median < Duration::from_millis(50) {
                "met"
            } else {
                "MISSED"
            },
            s.client_stored as f64 / 1024.0,
            if s.client_stored < 512 * 1024 {
                "met"
            } else {
                "MISSED"
            },
            if rows.iter().all(|r| r.client_stored < 1024 * 1024) {
                "met"
            } else {
                "MISSED"
            },
        );
        let _ = writeln!(
            md,
            "\n`all meshed` grows with namespaces x Services because every namespace gets the whole \
             outbound table: the last row is the worst case, a full compile of every namespace of a \
             5000-Service cluster at once. The fixtures' generated names compress better than real \
             ones, so read the gzip column as a lower bound; the JSON column is exact."
        );
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/compile.md");
    std::fs::write(&path, md).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    eprintln!("wrote {}", path.display());
}
