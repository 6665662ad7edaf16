//! Tier 4: real iptables in network namespaces this test creates (and
//! removes, even when it fails). Needs root, `ip`, `iptables` and
//! `setpriv`; without them every test here says SKIPPED loudly and passes.
//! CI installs iptables and iproute2 and runs as root.

use std::process::{Command, Output};

/// Why this machine cannot run the tier, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not running as root (network namespaces and iptables need it)".into());
    }
    for tool in ["ip", "iptables", "iptables-save", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install -y iptables iproute2 util-linux)"
            ));
        }
    }
    None
}

fn skip() -> bool {
    match missing_prerequisite() {
        Some(why) => {
            eprintln!("\n*** SKIPPED tier 4 (network namespaces): {why}\n");
            true
        }
        None => false,
    }
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("weft-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name)
    }

    fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `weft init` as an unprivileged user holding only `caps`.
fn init_as_nobody(ns: &Netns, caps: &str, extra: &[&str]) -> Output {
    let weft = env!("CARGO_BIN_EXE_weft");
    let inh = if caps.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{caps}")
    };
    let mut argv = vec![
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        &inh,
    ];
    let ambient = format!("--ambient-caps={caps}");
    if !caps.is_empty() {
        argv.push(&ambient);
    }
    argv.extend([weft, "init"]);
    argv.extend(extra);
    ns.exec(&argv)
}

#[test]
fn init_runs_unprivileged_with_two_capabilities_and_twice_leaves_one_copy() {
    if skip() {
        return;
    }
    let ns = Netns::new("init");
    let extra = [
        "--skip-outbound-ports",
        "5432",
        "--skip-outbound-cidrs",
        "10.96.0.0/12",
    ];
    for run in 1..=2 {
        let out = init_as_nobody(&ns, "+net_admin,+net_raw", &extra);
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let saved = String::from_utf8(ns.exec(&["iptables-save", "-t", "nat"]).stdout).expect("utf8");
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
fn init_without_the_capabilities_says_which_are_missing() {
    if skip() {
        return;
    }
    let ns = Netns::new("nocap");
    let out = init_as_nobody(&ns, "+net_raw", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing: NET_ADMIN") && !err.contains("NET_RAW,"),
        "{err}"
    );
    let saved = String::from_utf8(ns.exec(&["iptables-save", "-t", "nat"]).stdout).expect("utf8");
    assert!(!saved.contains("WEFT_"), "nothing was installed:\n{saved}");
}
