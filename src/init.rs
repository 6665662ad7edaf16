//! `weft init`: the iptables redirect of a meshed pod, run by the `weft-init`
//! init container before anything else in the pod.
//!
//! In the nat table, chain `WEFT_INBOUND` (from PREROUTING) sends inbound
//! TCP to the proxy's inbound port and `WEFT_OUTPUT` (from OUTPUT) sends the
//! app's outbound TCP to its outbound port. Never redirected: the proxy's
//! own traffic (its uid and gid), loopback traffic (the app talking to
//! itself, the proxy talking to the app), DNS (port 53), the proxy's admin
//! and probe ports, and the ports and CIDRs the pod's annotations exclude.
//!
//! [`plan`] is pure: the settings and the nat table as it is now in, the
//! `iptables-restore --noflush` input out. Declaring weft's chains flushes
//! them, and the jumps from the built-in chains are added only when absent,
//! so a second run leaves exactly one copy of every rule. [`apply`] finds
//! the backend in use (nft or legacy), checks the capabilities, and applies
//! atomically with `iptables-restore`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::proxy::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROBE_PORT, PROXY_UID};

pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
pub const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";
const IN_REDIRECT: &str = "WEFT_IN_REDIRECT";
const OUT_REDIRECT: &str = "WEFT_OUT_REDIRECT";
/// iptables' multiport match takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// Command line of `weft init` (the injector fills it from annotations).
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The proxy's uid: its own traffic is never redirected.
    #[arg(long, default_value_t = PROXY_UID)]
    pub proxy_uid: u32,
    /// The proxy's gid, likewise.
    #[arg(long, default_value_t = PROXY_UID)]
    pub proxy_gid: u32,
    /// Where inbound TCP goes (the proxy's inbound listener).
    #[arg(long, default_value_t = INBOUND_PORT)]
    pub inbound_port: u16,
    /// Where outbound TCP goes (the proxy's outbound listener).
    #[arg(long, default_value_t = OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Only these inbound ports are redirected (default: all but the
    /// skipped ones).
    #[arg(long, value_delimiter = ',')]
    pub include_inbound_ports: Vec<u16>,
    /// Inbound ports that go straight to the app (the proxy's admin and
    /// probe ports always do).
    #[arg(long, value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound ports that bypass the proxy.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destinations (CIDRs) that bypass the proxy.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<String>,
    /// Also redirect IPv6 (ip6tables).
    #[arg(long)]
    pub ipv6: bool,
    /// Print the `iptables-restore` input for a pod with no rules yet and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn accepts(self, cidr: &str) -> bool {
        cidr.contains(':') == (self == Family::V6)
    }
}

/// Checks the settings; a message names the flag and the fix.
pub fn validate(args: &InitArgs) -> anyhow::Result<()> {
    if args.inbound_port == 0 || args.outbound_port == 0 {
        bail!("--inbound-port and --outbound-port must be ports (1-65535)");
    }
    if args.inbound_port == args.outbound_port {
        bail!(
            "--inbound-port and --outbound-port are both {}: the proxy listens on two different ports",
            args.inbound_port
        );
    }
    for cidr in &args.skip_outbound_cidrs {
        if !is_cidr(cidr) {
            bail!("--skip-outbound-cidrs: {cidr:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8");
        }
    }
    Ok(())
}

/// An IPv4 or IPv6 CIDR such as `10.0.0.0/8` or `fd00::/8`.
pub fn is_cidr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(ip, len)| {
        match (ip.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
            (Ok(std::net::IpAddr::V4(_)), Ok(n)) => n <= 32,
            (Ok(std::net::IpAddr::V6(_)), Ok(n)) => n <= 128,
            _ => false,
        }
    })
}

fn port_lists(ports: &[u16]) -> Vec<String> {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .chunks(MULTIPORT_MAX)
        .map(|c| c.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
        .collect()
}

/// Whether `current` (`iptables-save -t nat` output) already jumps from
/// `chain` to `target`.
fn has_jump(current: &str, chain: &str, target: &str) -> bool {
    current
        .lines()
        .any(|l| l.starts_with(&format!("-A {chain} ")) && l.ends_with(&format!("-j {target}")))
}

/// The `iptables-restore --noflush` input that brings the nat table from
/// `current` to the redirect `args` describe.
pub fn plan(args: &InitArgs, family: Family, current: &str) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("*nat".into());
    // Declaring a chain creates it, or flushes it when it exists.
    for chain in [INBOUND_CHAIN, IN_REDIRECT, OUTPUT_CHAIN, OUT_REDIRECT] {
        line(format!(":{chain} - [0:0]"));
    }
    if !has_jump(current, "PREROUTING", INBOUND_CHAIN) {
        line(format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"));
    }
    if !has_jump(current, "OUTPUT", OUTPUT_CHAIN) {
        line(format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"));
    }

    // Inbound.
    line(format!(
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        args.inbound_port
    ));
    let mut skip_inbound = vec![ADMIN_PORT, PROBE_PORT];
    skip_inbound.extend(&args.skip_inbound_ports);
    for ports in port_lists(&skip_inbound) {
        line(format!(
            "-A {INBOUND_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN"
        ));
    }
    if args.include_inbound_ports.is_empty() {
        line(format!("-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT}"));
    } else {
        for ports in port_lists(&args.include_inbound_ports) {
            line(format!(
                "-A {INBOUND_CHAIN} -p tcp -m multiport --dports {ports} -j {IN_REDIRECT}"
            ));
        }
    }

    // Outbound.
    line(format!(
        "-A {OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        args.outbound_port
    ));
    line(format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        args.proxy_uid
    ));
    line(format!(
        "-A {OUTPUT_CHAIN} -m owner --gid-owner {} -j RETURN",
        args.proxy_gid
    ));
    line(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    line(format!(
        "-A {OUTPUT_CHAIN} -d {} -j RETURN",
        family.loopback()
    ));
    line(format!("-A {OUTPUT_CHAIN} -p tcp --dport 53 -j RETURN"));
    for ports in port_lists(&args.skip_outbound_ports) {
        line(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN"
        ));
    }
    for cidr in args
        .skip_outbound_cidrs
        .iter()
        .filter(|c| family.accepts(c))
    {
        line(format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN"));
    }
    line(format!("-A {OUTPUT_CHAIN} -p tcp -j {OUT_REDIRECT}"));
    line("COMMIT".into());
    out
}

/// The dry run's output: the plan for a pod without rules, per family.
pub fn dry_run(args: &InitArgs) -> String {
    let mut out = String::new();
    let families: &[Family] = if args.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for f in families {
        let _ = writeln!(out, "# {}-restore --noflush", f.name());
        out.push_str(&plan(args, *f, ""));
    }
    out
}

/// The iptables backend in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
        }
    }
}

/// Decides the backend from the rule counts each reports (the one the
/// node's kube-proxy already uses has rules), else from what `iptables`
/// itself is.
pub fn choose_backend(nft_rules: usize, legacy_rules: usize, iptables_version: &str) -> Backend {
    if legacy_rules > nft_rules {
        Backend::Legacy
    } else if nft_rules > legacy_rules || iptables_version.contains("nf_tables") {
        Backend::Nft
    } else if iptables_version.contains("legacy") {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} (is iptables installed in the image?)"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing to {cmd}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command of a backend, falling back to the plain name where the
/// suffixed one does not exist.
fn tool(family: Family, backend: Backend, what: &str) -> String {
    let base = format!("{}{what}", family.name());
    let suffixed = format!("{}{}{what}", family.name(), backend.suffix());
    let exists = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if exists(&suffixed) { suffixed } else { base }
}

fn count_rules(cmd: &str) -> usize {
    run(cmd, &[], None)
        .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
        .unwrap_or(0)
}

/// Which capabilities the process lacks of NET_ADMIN and NET_RAW, from
/// `CapEff` in /proc/self/status.
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    [(12, "NET_ADMIN"), (13, "NET_RAW")]
        .into_iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect()
}

/// Installs the redirect (both families with `--ipv6`).
pub fn apply(args: &InitArgs) -> anyhow::Result<()> {
    validate(args)?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_capabilities(&status);
    if !missing.is_empty() {
        bail!(
            "weft init needs the capabilities NET_ADMIN and NET_RAW; missing: {}. Add them to the \
             weft-init container's securityContext.capabilities.add (the injector does).",
            missing.join(", ")
        );
    }
    let version = run("iptables", &["--version"], None).unwrap_or_default();
    let backend = choose_backend(
        count_rules("iptables-nft-save"),
        count_rules("iptables-legacy-save"),
        &version,
    );
    tracing::info!(?backend, "iptables backend");
    let families: &[Family] = if args.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for family in families {
        let save = tool(*family, backend, "-save");
        let restore = tool(*family, backend, "-restore");
        let current = run(&save, &["-t", "nat"], None)?;
        let input = plan(args, *family, &current);
        run(&restore, &["--noflush"], Some(&input))?;
        tracing::info!(family = family.name(), "redirect installed");
    }
    Ok(())
}

/// `weft init`.
pub fn main(args: &InitArgs) -> anyhow::Result<()> {
    validate(args)?;
    if args.dry_run {
        print!("{}", dry_run(args));
        return Ok(());
    }
    apply(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> InitArgs {
        use clap::{Args, FromArgMatches};
        let cmd = InitArgs::augment_args(clap::Command::new("init"));
        InitArgs::from_arg_matches(&cmd.get_matches_from(["init"])).expect("args")
    }

    #[test]
    fn a_second_plan_adds_no_jump_twice() {
        let first = plan(&defaults(), Family::V4, "");
        assert!(first.contains("-A PREROUTING -p tcp -j WEFT_INBOUND"));
        let current = "-A PREROUTING -p tcp -j WEFT_INBOUND\n-A OUTPUT -p tcp -j WEFT_OUTPUT\n";
        let second = plan(&defaults(), Family::V4, current);
        assert!(!second.contains("-A PREROUTING") && !second.contains("-A OUTPUT "));
        assert!(
            second.contains(":WEFT_INBOUND - [0:0]"),
            "chains are flushed and refilled"
        );
    }

    #[test]
    fn multiport_lists_are_split_at_fifteen() {
        let ports: Vec<u16> = (1000..1020).collect();
        assert_eq!(port_lists(&ports).len(), 2);
    }

    #[test]
    fn capabilities_and_backends() {
        assert_eq!(
            missing_capabilities("CapEff:\t0000000000003000\n"),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing_capabilities("CapEff:\t0000000000001000\n"),
            vec!["NET_RAW"]
        );
        assert_eq!(missing_capabilities(""), vec!["NET_ADMIN", "NET_RAW"]);
        assert_eq!(
            choose_backend(0, 12, "iptables v1.8.9 (nf_tables)"),
            Backend::Legacy
        );
        assert_eq!(
            choose_backend(3, 0, "iptables v1.8.9 (legacy)"),
            Backend::Nft
        );
        assert_eq!(
            choose_backend(0, 0, "iptables v1.8.9 (legacy)"),
            Backend::Legacy
        );
        assert_eq!(choose_backend(0, 0, ""), Backend::Nft);
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let mut a = defaults();
        a.skip_outbound_cidrs = vec!["10.0.0.0".into()];
        assert!(
            validate(&a)
                .unwrap_err()
                .to_string()
                .contains("--skip-outbound-cidrs")
        );
        let mut a = defaults();
        a.outbound_port = a.inbound_port;
        assert!(
            validate(&a)
                .unwrap_err()
                .to_string()
                .contains("--outbound-port")
        );
    }
}
