//! Tier 4: real iptables in network namespaces this test creates (and
//! removes, even when it fails): `weft init` for real, then pods whose app
//! talks plainly to another pod's IP while both sidecars carry the hop in
//! mTLS. Needs root, `ip`, `iptables` and `setpriv`; without them every test
//! here says SKIPPED loudly and passes. CI installs iptables, iproute2 and
//! util-linux and runs as root.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use weft::identity::{CA_LIFETIME, MeshCa, SpiffeId};
use weft::netns::{INIT_CAPS, ImageIptables, Netns, Network, missing_prerequisite};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");
const DEMO: &str = env!("CARGO_BIN_EXE_weft-demo");
/// The apps run as this user; the proxy as 1450.
const APP_UID: u32 = 1000;
const NOBODY: u32 = weft::netns::INIT_UID;

fn skip() -> bool {
    match missing_prerequisite() {
        Some(why) => {
            eprintln!("\n*** SKIPPED tier 4 (network namespaces): {why}\n");
            true
        }
        None => false,
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `weft init` as the weft-init container runs it (see `Netns::run_init`),
/// against the image's iptables.
fn init_in_pod(ns: &Netns, iptables: &ImageIptables, extra: &[&str]) -> Output {
    ns.run_init(WEFT, iptables, extra).expect("weft init runs")
}

fn nat_table(ns: &Netns) -> String {
    let saved = ns
        .run(None, "", &["iptables-save", "-t", "nat"])
        .expect("save");
    String::from_utf8(saved.stdout).expect("utf8")
}

#[test]
fn the_harness_gives_weft_init_what_a_runtime_gives_a_pod_and_no_more() {
    if skip() {
        return;
    }
    // What a real cluster showed in a weft-init container: the two
    // capabilities in the bounding set, none permitted, effective,
    // inheritable or ambient. A harness that grants more hides the bug
    // users hit first.
    let ns = Netns::new(&format!("weft-caps-{}", std::process::id())).expect("netns");
    let out = ns
        .run(Some(NOBODY), INIT_CAPS, &["cat", "/proc/self/status"])
        .expect("cat");
    let status = String::from_utf8_lossy(&out.stdout);
    let caps = weft::init::ProcessCaps::parse(&status);
    assert_eq!(
        (
            caps.effective_uid,
            caps.bounding,
            caps.permitted,
            caps.effective
        ),
        (NOBODY, 0x3000, 0, 0),
        "{status}"
    );
    assert_eq!((caps.inheritable, caps.ambient), (0, 0), "{status}");
    assert!(!caps.no_new_privs, "allowPrivilegeEscalation: true");
}

#[test]
fn init_runs_as_a_pod_runs_it_and_twice_leaves_one_copy() {
    if skip() {
        return;
    }
    let ns = Netns::new(&format!("weft-init-{}", std::process::id())).expect("netns");
    let iptables = ImageIptables::new(true).expect("the image's iptables");
    let extra = [
        "--skip-outbound-ports",
        "5432",
        "--skip-outbound-cidrs",
        "10.96.0.0/12",
    ];
    for run in 1..=2 {
        let out = init_in_pod(&ns, &iptables, &extra);
        assert!(out.status.success(), "run {run}: {}", stderr(&out));
    }
    let saved = nat_table(&ns);
    let rules: Vec<&str> = saved.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut unique = rules.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(rules.len(), unique.len(), "one copy of each rule:\n{saved}");
    for needle in [
        "-A PREROUTING -p tcp -j WEFT_INBOUND",
        "-A OUTPUT -p tcp -j WEFT_OUTPUT",
        "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15106",
        "-A WEFT_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15101",
        "-A WEFT_OUTPUT -m owner --uid-owner 1450 -j RETURN",
        "-A WEFT_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "--dports 5432 -j RETURN",
    ] {
        assert_eq!(
            rules.iter().filter(|r| r.contains(needle)).count(),
            1,
            "{needle}:\n{saved}"
        );
    }
}

#[test]
fn init_against_iptables_without_file_capabilities_names_the_fix() {
    if skip() {
        return;
    }
    // An image store or runtime that drops the xattrs: the bounding set
    // holds both capabilities, yet iptables would run with neither.
    let ns = Netns::new(&format!("weft-nofcap-{}", std::process::id())).expect("netns");
    let stripped = ImageIptables::new(false).expect("iptables without file capabilities");
    let out = init_in_pod(&ns, &stripped, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for needle in [
        "xtables-nft-multi would run without NET_ADMIN, NET_RAW (uid 65534)",
        "bounding set only",
        "carries no file capability",
        "setcap cap_net_admin,cap_net_raw+ep",
        "spec.init.runAsRoot: true",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(!nat_table(&ns).contains("WEFT_"), "nothing was installed");
}

#[test]
fn init_whose_bounding_set_lacks_a_capability_says_which() {
    if skip() {
        return;
    }
    // An admission policy that removed NET_ADMIN from capabilities.add.
    let ns = Netns::new(&format!("weft-nocap-{}", std::process::id())).expect("netns");
    let iptables = ImageIptables::new(true).expect("the image's iptables");
    let path = iptables.path_env();
    let out = ns
        .run(
            Some(NOBODY),
            "+net_raw",
            &["/usr/bin/env", &path, WEFT, "init"],
        )
        .expect("weft init runs");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("would run without NET_ADMIN (uid 65534)")
            && err.contains("bounding set lacks NET_ADMIN")
            && err.contains("capabilities.add"),
        "{err}"
    );
    assert!(!nat_table(&ns).contains("WEFT_"), "nothing was installed");
}

/// Files the pods' users can read: a directory of mode 0755.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Self { dir }
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::rename(&tmp, &path).expect("rename");
        path
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// The config of namespace `shop`: mode, and Service `b` at `b_ip` served
/// by identity shop/b (a ClusterIP stand-in: the pod's own address).
fn config(mode: &str, b_ip: &str) -> Value {
    json!({
        "schemaVersion": "1.0", "generation": format!("netns-{mode}"),
        "namespace": "shop", "trustDomain": "cluster.local",
        "inbound": { "mode": mode },
        "outbound": {
            "defaults": {
                "retry": {
                    "maxRetries": 1, "retryOn": ["connect-failure"], "methods": ["GET"],
                    "idempotencyHeader": "idempotency-key",
                    "budget": { "percent": 20, "minPerSecond": 10, "windowMs": 10000 },
                    "backoffBaseMs": 5, "backoffMaxMs": 50
                },
                "loadBalancer": "PeakEwma"
            },
            "services": [{
                "name": "b", "namespace": "shop",
                "hostnames": ["b.shop.svc.cluster.local", "b.shop"],
                "clusterIps": [b_ip],
                "ports": [{ "port": 8080, "targetPort": 8080, "protocol": "detect" }],
                "mesh": { "namespace": "shop", "serviceAccounts": ["b"] },
            }],
        },
    })
}

/// Starts pod `name` with `weft init` (as a pod runs it), its
/// sidecar (uid 1450) and a demo app (uid 1000) on 8080.
fn meshed_pod(
    net: &mut Network,
    files: &Files,
    ca: &MeshCa,
    name: &str,
    config: &Value,
    init_extra: &[&str],
) -> usize {
    let i = net.add_pod(name).expect("pod");
    let iptables = ImageIptables::new(true).expect("the image's iptables");
    let out = init_in_pod(&net.pods[i].ns, &iptables, init_extra);
    assert!(
        out.status.success(),
        "weft init in {name}: {}",
        stderr(&out)
    );
    let leaf = ca
        .issue(
            &SpiffeId::new("cluster.local", "shop", name),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .expect("leaf");
    files.write(&format!("{name}/id/ca.crt"), &ca.trust_bundle());
    files.write(&format!("{name}/id/tls.crt"), &leaf.cert_pem);
    files.write(&format!("{name}/id/tls.key"), &leaf.key_pem);
    let cfg = files.write(&format!("{name}/config.json"), &config.to_string());
    let (cfg, ids) = (
        cfg.display().to_string(),
        files.path(&format!("{name}/id")).display().to_string(),
    );
    let pod = &mut net.pods[i];
    pod.spawn(
        Some(1450),
        &[
            PROXY,
            "--config",
            &cfg,
            "--identity-dir",
            &ids,
            "--service-account",
            name,
            "--workload",
            name,
            "--no-api-watch",
        ],
        &files.path(&format!("{name}/proxy.log")),
    )
    .expect("proxy");
    let demo_log = files.path(&format!("{name}/app.log"));
    // On a dual-stack pod the app listens on both families, as it must
    // without a mesh too (inbound traffic reaches it at the address, and
    // so in the family, the client dialled).
    let listen = if pod.ip6.is_some() {
        "[::]:8080"
    } else {
        "0.0.0.0:8080"
    };
    pod.spawn(
        Some(APP_UID),
        &[DEMO, "--listen", listen, "--name", name],
        &demo_log,
    )
    .expect("app");
    wait_ok(&net.pods[i].ns, "http://127.0.0.1:15120/ready", files, name);
    wait_ok(
        &net.pods[i].ns,
        "http://127.0.0.1:8080/healthz",
        files,
        name,
    );
    i
}

/// GET from inside a pod as the app user: (status, body), or None.
fn fetch(ns: &Netns, url: &str) -> Option<(u16, String)> {
    let out = ns.run(Some(APP_UID), "", &[DEMO, "--fetch", url]).ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n')?;
    Some((status.trim().parse().ok()?, body.trim().to_owned()))
}

fn wait_ok(ns: &Netns, url: &str, files: &Files, pod: &str) {
    for _ in 0..100 {
        if fetch(ns, url).is_some_and(|(s, _)| s == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log =
        |f: &str| std::fs::read_to_string(files.path(&format!("{pod}/{f}"))).unwrap_or_default();
    panic!(
        "{url} in pod {pod} never answered 200\nproxy log:\n{}\napp log:\n{}",
        log("proxy.log"),
        log("app.log")
    );
}

fn metric(ns: &Netns, prefix: &str) -> f64 {
    let (_, text) = fetch(ns, "http://127.0.0.1:15120/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn ca() -> MeshCa {
    MeshCa::generate("cluster.local", SystemTime::now(), CA_LIFETIME).expect("ca")
}

#[test]
fn a_plain_call_to_a_pod_ip_crosses_both_sidecars_in_mtls() {
    if skip() {
        return;
    }
    let (files, ca) = (Files::new(), ca());
    let mut net = Network::new("e2e").expect("network");
    // B first, so A's config can name its address.
    let b_ip = pod_address(1);
    let cfg = config("strict", &b_ip);
    let a = meshed_pod(
        &mut net,
        &files,
        &ca,
        "a",
        &cfg,
        &["--skip-outbound-ports", "9090"],
    );
    let b = meshed_pod(
        &mut net,
        &files,
        &ca,
        "b",
        &cfg,
        &["--skip-inbound-ports", "9090"],
    );
    assert_eq!(net.pods[b].ip.to_string(), b_ip);
    // B also serves 9090 outside the mesh's view of A (excluded port).
    net.pods[b]
        .spawn(
            Some(APP_UID),
            &[DEMO, "--listen", "0.0.0.0:9090", "--name", "b-admin"],
            &files.path("b/admin.log"),
        )
        .expect("second app");

    let (status, body) =
        fetch(&net.pods[a].ns, &format!("http://{b_ip}:8080/orders")).expect("a response");
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        seen["caller"], "spiffe://cluster.local/ns/shop/sa/a",
        "B's app learns A's identity: the hop was mesh mTLS"
    );
    let (a_ns, b_ns) = (&net.pods[a].ns, &net.pods[b].ns);
    assert_eq!(
        metric(
            a_ns,
            "weft_proxy_requests_total{direction=\"outbound\",src=\"a\",dst=\"b.shop:8080\",route=\"default\",status_class=\"2xx\",tls=\"true\"}"
        ),
        1.0,
        "A's outbound proxy carried it, in TLS"
    );
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_requests_total{direction=\"inbound\",src=\"spiffe://cluster.local/ns/shop/sa/a\""
        ),
        1.0,
        "B's inbound proxy carried it"
    );
    // The proxy's own upstream connection was not looped back into itself:
    // A's outbound listener saw exactly one connection.
    assert_eq!(
        metric(
            a_ns,
            "weft_proxy_tcp_connections_total{direction=\"outbound\""
        ),
        1.0
    );

    // An excluded port bypasses both sidecars: A skips it outbound, B
    // inbound, so the app's plaintext reaches B's second app directly.
    let before = metric(
        a_ns,
        "weft_proxy_tcp_connections_total{direction=\"outbound\"",
    );
    let (status, body) = fetch(a_ns, &format!("http://{b_ip}:9090/")).expect("direct answer");
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (seen["service"].as_str(), seen["caller"].as_str()),
        (Some("b-admin"), None)
    );
    assert_eq!(
        metric(
            a_ns,
            "weft_proxy_tcp_connections_total{direction=\"outbound\""
        ),
        before,
        "port 9090 did not pass A's proxy"
    );
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_tcp_connections_total{direction=\"inbound\",protocol=\"http1\",tls=\"false\",port=\"9090\"}"
        ),
        0.0,
        "nor B's"
    );
}

#[test]
fn a_pod_without_a_sidecar_is_refused_by_strict_and_counted_under_permissive() {
    if skip() {
        return;
    }
    let (files, ca) = (Files::new(), ca());
    let mut net = Network::new("strict").expect("network");
    let b_ip = pod_address(0);
    let b = meshed_pod(&mut net, &files, &ca, "b", &config("strict", &b_ip), &[]);
    let c = net.add_pod("c").expect("plain pod");
    let c_ip = net.pods[c].ip.to_string();
    let url = format!("http://{b_ip}:8080/");

    assert!(
        fetch(&net.pods[c].ns, &url).is_none(),
        "STRICT refuses a pod without a sidecar"
    );
    let b_ns = &net.pods[b].ns;
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_inbound_plaintext_rejected_total{port=\"8080\",src_addr="
        ),
        1.0
    );

    // Permissive, and c published as the pod of a Service that b's
    // namespace calls (#19 item 5): c's calls are counted under its
    // workload, named from its address (unverified, so not a SPIFFE id).
    let mut permissive = config("permissive", &b_ip);
    permissive["outbound"]["services"]
        .as_array_mut()
        .expect("services")
        .push(json!({
            "name": "c", "namespace": "shop",
            "hostnames": ["c.shop.svc.cluster.local", "c.shop"],
            "clusterIps": ["10.96.0.12"],
            "ports": [{ "port": 8080, "targetPort": 8080, "protocol": "detect" }],
            "mesh": { "namespace": "shop", "serviceAccounts": ["c"] },
        }));
    let endpoints = json!({
        "schemaVersion": "1.0", "generation": "netns-c", "namespace": "shop",
        "services": { "c.shop": { "groups": [{ "ports": { "": 8080 }, "endpoints": [{
            "addresses": [c_ip], "ready": true, "pod": "c-0",
            "serviceAccount": "c", "unmeshed": true,
        }]}]}},
    });
    files.write("b/endpoints.json", &endpoints.to_string());
    files.write("b/config.json", &permissive.to_string());
    let mut answer = None;
    for _ in 0..50 {
        answer = fetch(&net.pods[c].ns, &url);
        if answer.as_ref().is_some_and(|(s, _)| *s == 200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = answer.expect("PERMISSIVE lets it through");
    assert_eq!(status, 200, "{body}");
    let counted = metric(
        b_ns,
        &format!(
            "weft_proxy_inbound_plaintext_connections_total{{port=\"8080\",src_addr=\"{c_ip}\"}}"
        ),
    );
    assert!(
        counted >= 2.0,
        "both attempts counted as plaintext from {c_ip}: {counted}"
    );
    let mut named = 0.0;
    for _ in 0..50 {
        let _ = fetch(&net.pods[c].ns, &url);
        named = metric(
            b_ns,
            "weft_proxy_requests_total{direction=\"inbound\",src=\"ns/shop/sa/c\"",
        );
        if named > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        named > 0.0,
        "inbound requests from {c_ip} name its workload"
    );
}

#[test]
fn ipv6_is_intercepted_in_a_dual_stack_pod_with_mtls_strict_and_access_policy() {
    if skip() {
        return;
    }
    let (files, ca) = (Files::new(), ca());
    let mut net = Network::new_dual_stack("v6").expect("network");
    // Pods a, b, c get hosts 10, 11, 12 of each family.
    let [p0, p1, p2, p3] = weft::netns::SUBNET6;
    let b6 = std::net::Ipv6Addr::new(p0, p1, p2, p3, 0, 0, 0, 11).to_string();
    // B's AccessPolicy admits A on /orders only.
    let mut cfg = config("strict", &b6);
    cfg["inbound"]["authorizations"] = json!([{
        "policy": "shop/b-callers",
        "ports": [8080],
        "rules": [{
            "identities": [{ "namespace": "shop", "serviceAccount": "a" }],
            "paths": [{ "type": "PathPrefix", "value": "/orders" }],
        }],
    }]);
    // No --ipv6: weft init sees the pod's IPv6 address and redirects it.
    let a = meshed_pod(&mut net, &files, &ca, "a", &cfg, &[]);
    let b = meshed_pod(&mut net, &files, &ca, "b", &cfg, &[]);
    assert_eq!(net.pods[b].ip6.map(|ip| ip.to_string()), Some(b6.clone()));
    let c = net.add_pod("c").expect("plain pod");
    let (a_ns, b_ns, c_ns) = (&net.pods[a].ns, &net.pods[b].ns, &net.pods[c].ns);
    let saved6 = a_ns
        .run(None, "", &["ip6tables-save", "-t", "nat"])
        .expect("save");
    let saved6 = String::from_utf8_lossy(&saved6.stdout);
    assert!(
        saved6.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT")
            && saved6.contains("-A WEFT_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15101"),
        "ip6tables redirect installed:\n{saved6}"
    );

    // A's app calls B's IPv6 address in plaintext; the sidecars carry it
    // in mTLS over IPv6 and B's app learns who called.
    let (status, body) = fetch(a_ns, &format!("http://[{b6}]:8080/orders")).expect("a response");
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(seen["caller"], "spiffe://cluster.local/ns/shop/sa/a");
    assert_eq!(
        metric(
            a_ns,
            "weft_proxy_requests_total{direction=\"outbound\",src=\"a\",dst=\"b.shop:8080\",route=\"default\",status_class=\"2xx\",tls=\"true\"}"
        ),
        1.0,
        "A's outbound proxy carried it, in TLS"
    );

    // AccessPolicy over IPv6: the same caller, a path it may not use.
    let (status, _) = fetch(a_ns, &format!("http://[{b6}]:8080/admin")).expect("an answer");
    assert_eq!(status, 403);
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_access_denied_total{policy=\"shop/b-callers\",protocol=\"http\"}"
        ),
        1.0
    );

    // STRICT over IPv6: a pod without a sidecar is refused and counted.
    assert!(
        fetch(c_ns, &format!("http://[{b6}]:8080/orders")).is_none(),
        "STRICT refuses plaintext over IPv6"
    );
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_inbound_plaintext_rejected_total{port=\"8080\",src_addr="
        ),
        1.0
    );
}

/// Issue: a listener bound to 127.0.0.1 inside a pod answered other pods
/// through the pod's IP, because inbound traffic was forwarded to
/// 127.0.0.1. It now goes to the address the client dialled (the pod's
/// own), as Istio does since 1.10: localhost stays private to the pod, and
/// an app bound only to the pod's address is reached.
#[test]
fn a_localhost_only_listener_is_not_reachable_from_another_pod() {
    if skip() {
        return;
    }
    let (files, mut net, b_ip, b, c) = meshed_b_beside_plain_c("lo", "permissive");
    let pod = &mut net.pods[b];
    pod.spawn(
        Some(APP_UID),
        &[DEMO, "--listen", "127.0.0.1:9999", "--name", "b-private"],
        &files.path("b/private.log"),
    )
    .expect("a localhost-only app");
    pod.spawn(
        Some(APP_UID),
        &[
            DEMO,
            "--listen",
            &format!("{b_ip}:8081"),
            "--name",
            "b-pod-ip",
        ],
        &files.path("b/pod-ip.log"),
    )
    .expect("an app bound to the pod's address");
    let (b_ns, c_ns) = (&net.pods[b].ns, &net.pods[c].ns);
    wait_ok(b_ns, "http://127.0.0.1:9999/healthz", &files, "b");
    wait_ok(b_ns, &format!("http://{b_ip}:8081/healthz"), &files, "b");

    let private = fetch(c_ns, &format!("http://{b_ip}:9999/"));
    assert!(
        private
            .as_ref()
            .is_none_or(|(status, body)| *status != 200 && !body.contains("b-private")),
        "the localhost-only listener answered another pod: {private:?}"
    );
    let (status, body) =
        fetch(c_ns, &format!("http://{b_ip}:8081/")).expect("the pod-address app answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("b-pod-ip"), "{body}");
}

/// Issue: connections to a pod's 15101 and 15106 were answered, relayed
/// back into the proxy. Addressed to a transparent port of the proxy
/// itself, from another pod or from the app, they are closed and counted.
#[test]
fn a_connection_to_the_proxys_own_port_is_refused() {
    if skip() {
        return;
    }
    let (_files, net, b_ip, b, c) = meshed_b_beside_plain_c("own", "permissive");
    let (b_ns, c_ns) = (&net.pods[b].ns, &net.pods[c].ns);
    for port in [15101, 15106] {
        assert_eq!(
            fetch(c_ns, &format!("http://{b_ip}:{port}/")),
            None,
            "port {port} from another pod"
        );
    }
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_refused_own_port_total{direction=\"inbound\"}"
        ),
        2.0
    );
    // From the app inside the pod: loopback and the pod's own address are
    // never redirected, so these reach the outbound listener directly,
    // addressed to itself (relayed, the second looped until the proxy ran
    // out of file descriptors).
    assert_eq!(fetch(b_ns, "http://127.0.0.1:15101/"), None);
    assert_eq!(fetch(b_ns, &format!("http://{b_ip}:15101/")), None);
    assert_eq!(
        metric(
            b_ns,
            "weft_proxy_refused_own_port_total{direction=\"outbound\"}"
        ),
        2.0
    );
    // The app still answers through the proxy.
    let (status, _) = fetch(c_ns, &format!("http://{b_ip}:8080/")).expect("the app answers");
    assert_eq!(status, 200);
}

/// The address `Network::add_pod` gives its first pod.
/// The address the network gives its `n`th pod, from 0.
fn pod_address(n: u8) -> String {
    let [a, b, c] = weft::netns::SUBNET;
    format!("{a}.{b}.{c}.{}", 10 + n)
}

/// A network with pod `b` meshed (its namespace in `mode`) and pod `c`
/// without a sidecar: the files, the network, b's address, b and c.
fn meshed_b_beside_plain_c(tag: &str, mode: &str) -> (Files, Network, String, usize, usize) {
    let (files, ca) = (Files::new(), ca());
    let mut net = Network::new(tag).expect("network");
    let b_ip = pod_address(0);
    let b = meshed_pod(&mut net, &files, &ca, "b", &config(mode, &b_ip), &[]);
    let c = net.add_pod("c").expect("plain pod");
    (files, net, b_ip, b, c)
}

/// Issue 18, item 7: the admin port answers every address of the pod (the
/// operator scrapes `/metrics` from outside), but `/config` (the pod's
/// whole outbound table and access rules) is for the pod's own processes
/// over localhost only; another pod, or a process of this one dialling the
/// pod's address, gets 403.
#[test]
fn the_config_is_served_only_to_localhost() {
    if skip() {
        return;
    }
    let (_files, net, b_ip, b, c) = meshed_b_beside_plain_c("cfg", "strict");
    let (b_ns, c_ns) = (&net.pods[b].ns, &net.pods[c].ns);
    let from_another_pod = fetch(c_ns, &format!("http://{b_ip}:15120/config"));
    assert_eq!(
        from_another_pod.as_ref().map(|(status, _)| *status),
        Some(403),
        "{from_another_pod:?}"
    );
    let (_, body) = from_another_pod.expect("an answer");
    assert!(
        !body.contains("clusterIps"),
        "no config in the refusal: {body}"
    );
    let via_pod_ip = fetch(b_ns, &format!("http://{b_ip}:15120/config"));
    assert_eq!(via_pod_ip.map(|(status, _)| status), Some(403));
    let (status, body) = fetch(b_ns, "http://127.0.0.1:15120/config").expect("config");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&b_ip), "the config, to localhost: {body}");
    let (status, body) =
        fetch(c_ns, &format!("http://{b_ip}:15120/metrics")).expect("metrics answer");
    assert_eq!(
        status, 200,
        "the operator scrapes /metrics from outside: {body}"
    );
}

/// `make test` runs this one again with its output shown, so whether tier
/// 4 ran or was skipped is visible in the log.
#[test]
fn tier4_prerequisites() {
    match missing_prerequisite() {
        Some(why) => eprintln!("\n*** SKIPPED tier 4 (network namespaces): {why}\n"),
        None => eprintln!(
            "*** tier 4 (network namespaces) ran: root, ip, iptables and setpriv are here"
        ),
    }
}
