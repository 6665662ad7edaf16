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
use std::path::{Path, PathBuf};
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
    /// IPv6 (ip6tables): `auto` (the default) redirects it whenever the pod
    /// has IPv6 on an interface other than loopback, link-local included
    /// (pods on one bridge share a link, so `fe80::` reaches them), `on`
    /// (or a bare `--ipv6`) always, `off` never. The choice is made here,
    /// in the pod, because the injector cannot know it: a pod gets its
    /// addresses from the CNI plugin after admission, before its first
    /// init container starts.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto, num_args = 0..=1, default_missing_value = "on")]
    pub ipv6: Ipv6Mode,
    /// Print the `iptables-restore` input for a pod with no rules yet and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Whether `weft init` redirects IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// The pod's reachable IPv6, from `/proc/net/if_inet6`: none, link-local
/// only (`fe80::/10`, scope `20`: reachable from the same link, which on a
/// bridge CNI is every pod of the node), or an address of global scope
/// (`00`, unique-local `fd00::/8` included). Loopback does not count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ipv6Reach {
    None,
    LinkLocal,
    Global,
}

pub fn ipv6_reach(if_inet6: &str) -> Ipv6Reach {
    if_inet6
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6 && f[5] != "lo").then(|| match f[3] {
                "00" => Ipv6Reach::Global,
                _ => Ipv6Reach::LinkLocal,
            })
        })
        .max()
        .unwrap_or(Ipv6Reach::None)
}

impl InitArgs {
    /// The families to redirect in this pod, and whether a failure to
    /// redirect IPv6 may be tolerated: in `auto` with link-local IPv6 only
    /// (a node whose kernel lacks IPv6 NAT must not fail every pod of an
    /// IPv4 cluster; the proxy still listens on IPv6 and the failure is
    /// logged as the exposure it is).
    fn families(&self) -> (Vec<Family>, bool) {
        let reach = match self.ipv6 {
            Ipv6Mode::On => Ipv6Reach::Global,
            Ipv6Mode::Off => Ipv6Reach::None,
            Ipv6Mode::Auto => std::fs::read_to_string("/proc/net/if_inet6")
                .map(|t| ipv6_reach(&t))
                .unwrap_or(Ipv6Reach::None),
        };
        match reach {
            Ipv6Reach::None => (vec![Family::V4], false),
            Ipv6Reach::LinkLocal => (vec![Family::V4, Family::V6], true),
            Ipv6Reach::Global => (vec![Family::V4, Family::V6], false),
        }
    }
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
    for f in args.families().0 {
        let _ = writeln!(out, "# {}-restore --noflush", f.name());
        out.push_str(&plan(args, f, ""));
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

/// The two capabilities iptables needs, as (bit, name).
const NEEDED: [(u32, &str); 2] = [(12, "NET_ADMIN"), (13, "NET_RAW")];

/// What the kernel says of this process's capabilities (`/proc/self/status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessCaps {
    pub effective_uid: u32,
    pub permitted: u64,
    pub effective: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
    /// `no_new_privs`: set by `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

impl ProcessCaps {
    /// Parses `/proc/self/status`; missing lines read as empty sets.
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let set = |name: &str| {
            field(name)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0)
        };
        Self {
            // `Uid:` lists real, effective, saved and filesystem uids.
            effective_uid: field("Uid:")
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX),
            permitted: set("CapPrm:"),
            effective: set("CapEff:"),
            inheritable: set("CapInh:"),
            bounding: set("CapBnd:"),
            ambient: set("CapAmb:"),
            no_new_privs: field("NoNewPrivs:") == Some("1"),
        }
    }
}

/// A binary's file capabilities (the `security.capability` xattr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileCaps {
    pub permitted: u64,
    pub inheritable: u64,
    /// The effective bit: the permitted set becomes effective on exec.
    pub effective: bool,
}

/// `VFS_CAP_REVISION_*` and `VFS_CAP_FLAGS_EFFECTIVE` (linux/capability.h).
const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
const VFS_CAP_REVISION_1: u32 = 0x0100_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;

impl FileCaps {
    /// The xattr's name.
    pub const XATTR: &'static str = "security.capability";

    /// Decodes `struct vfs_cap_data` (revision 1, 2, or 3 with a root uid).
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            raw.get(4 * i..4 * i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let magic = word(0)?;
        let words = match magic & VFS_CAP_REVISION_MASK {
            VFS_CAP_REVISION_1 => 1,
            VFS_CAP_REVISION_2 | VFS_CAP_REVISION_3 => 2,
            _ => return None,
        };
        let (mut permitted, mut inheritable) = (0u64, 0u64);
        for i in 0..words {
            permitted |= u64::from(word(1 + 2 * i)?) << (32 * i);
            inheritable |= u64::from(word(2 + 2 * i)?) << (32 * i);
        }
        Some(Self {
            permitted,
            inheritable,
            effective: magic & VFS_CAP_FLAGS_EFFECTIVE != 0,
        })
    }

    /// Encodes `cap_net_admin,cap_net_raw+ep` style capabilities as a
    /// revision-2 `vfs_cap_data` (what `setcap` writes for a non-namespaced
    /// file, and what the weft image carries on the xtables binaries).
    /// `const`, so the image builder's copy of these bytes is this one.
    pub const fn encode(self) -> [u8; 20] {
        let magic = if self.effective {
            VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
        } else {
            VFS_CAP_REVISION_2
        };
        let mut out = [0u8; 20];
        let words = [
            magic,
            self.permitted as u32,
            self.inheritable as u32,
            (self.permitted >> 32) as u32,
            (self.inheritable >> 32) as u32,
        ];
        let mut i = 0;
        while i < words.len() {
            let b = words[i].to_le_bytes();
            let mut j = 0;
            while j < 4 {
                out[4 * i + j] = b[j];
                j += 1;
            }
            i += 1;
        }
        out
    }

    /// `cap_net_admin,cap_net_raw+ep`: what iptables needs.
    pub const fn net_admin_and_raw() -> Self {
        Self {
            permitted: NEEDED_MASK,
            inheritable: 0,
            effective: true,
        }
    }
}

/// The effective set a process with `p` gets when it executes a binary
/// carrying `file` capabilities: the rules of capabilities(7),
/// "Transformation of capabilities during execve()", including root's
/// special case and `no_new_privs`, which caps the new permitted set at the
/// old one.
pub fn effective_after_exec(p: &ProcessCaps, file: Option<FileCaps>) -> u64 {
    let root = p.effective_uid == 0;
    let file = if root {
        // For root the file sets are taken as all ones (SECBIT_NOROOT unset).
        Some(FileCaps {
            permitted: u64::MAX,
            inheritable: u64::MAX,
            effective: true,
        })
    } else {
        file
    };
    let ambient = if file.is_some() { 0 } else { p.ambient };
    let f = file.unwrap_or_default();
    let mut permitted = (p.inheritable & f.inheritable) | (f.permitted & p.bounding) | ambient;
    if p.no_new_privs {
        permitted &= p.permitted | ambient;
    }
    if f.effective { permitted } else { ambient }
}

/// A capability mask as names, of the two iptables needs.
fn names(mask: u64) -> Vec<&'static str> {
    NEEDED
        .iter()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// [`NEEDED`] as a capability mask.
const NEEDED_MASK: u64 = (1 << NEEDED[0].0) | (1 << NEEDED[1].0);

/// Why iptables at `binary` (the file it resolves to, with `file` caps)
/// would lack NET_ADMIN or NET_RAW when this process runs it: a message
/// naming what is missing and the fix, or `None` when it will have both.
pub fn capability_problem(
    p: &ProcessCaps,
    binary: &Path,
    file: Option<FileCaps>,
) -> Option<String> {
    let missing = NEEDED_MASK & !effective_after_exec(p, file);
    if missing == 0 {
        return None;
    }
    let missing_names = names(missing).join(", ");
    let shown = binary.display();
    let not_bounded = names(missing & !p.bounding);
    let why = if !not_bounded.is_empty() {
        format!(
            "the container's capability bounding set lacks {}. Add them to the weft-init container's \
             securityContext.capabilities.add (the injector does; an admission policy or Pod Security \
             level below `privileged` may have removed them)",
            not_bounded.join(", ")
        )
    } else if p.no_new_privs && file.is_some_and(|f| f.permitted & missing == missing) {
        format!(
            "{shown} carries the file capabilities, but no_new_privs is set, so the kernel ignores them. \
             Set allowPrivilegeEscalation: true on the weft-init container (the injector does)"
        )
    } else {
        let carried = match file {
            Some(f) if f.permitted & missing != 0 && !f.effective => format!(
                "{shown} carries {} without the effective flag",
                names(f.permitted & missing).join(", ")
            ),
            Some(f) if f.permitted & missing != 0 => {
                format!("{shown} carries its file capabilities")
            }
            _ => format!("{shown} carries no file capability for them"),
        };
        format!(
            "a container runtime grants a non-root container its added capabilities in the bounding \
             set only (no ambient ones), so iptables gets them only from file capabilities, and {carried}. \
             Use the weft image (`make image` sets cap_net_admin,cap_net_raw+ep on the xtables \
             binaries) or run `setcap cap_net_admin,cap_net_raw+ep` on them in your image; where the \
             runtime strips file capabilities, set the Mesh's spec.init.runAsRoot: true"
        )
    };
    Some(format!(
        "weft init: {} would run without {missing_names} (uid {}): {why}.",
        binary.display(),
        p.effective_uid
    ))
}

/// The file a command name runs: found on `PATH`, symlinks resolved (the
/// capabilities that count are the final file's).
fn resolve(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(command))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// Checks that `command` will run with NET_ADMIN and NET_RAW.
fn check_capabilities(p: &ProcessCaps, command: &str) -> anyhow::Result<()> {
    let Some(binary) = resolve(command) else {
        bail!("weft init: {command} is not on PATH (is iptables installed in the image?)");
    };
    let file = xattr::get(&binary, FileCaps::XATTR)
        .ok()
        .flatten()
        .and_then(|raw| FileCaps::decode(&raw));
    // On a nosuid mount the kernel ignores file capabilities.
    let nosuid = nix::sys::statvfs::statvfs(binary.as_path())
        .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID));
    let honoured = if nosuid { None } else { file };
    match capability_problem(p, &binary, honoured) {
        Some(problem) if nosuid && file.is_some() => bail!(
            "{problem} ({} is on a nosuid mount, where the kernel ignores its file capabilities)",
            binary.display()
        ),
        Some(problem) => bail!("{problem}"),
        None => Ok(()),
    }
}

/// Installs the redirect (IPv6 too, as `--ipv6` decides).
pub fn apply(args: &InitArgs) -> anyhow::Result<()> {
    validate(args)?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = ProcessCaps::parse(&status);
    let version = run("iptables", &["--version"], None).unwrap_or_default();
    let backend = choose_backend(
        count_rules("iptables-nft-save"),
        count_rules("iptables-legacy-save"),
        &version,
    );
    let (families, v6_optional) = args.families();
    tracing::info!(?backend, ?families, "iptables backend");
    for family in &families {
        let save = tool(*family, backend, "-save");
        let restore = tool(*family, backend, "-restore");
        let installed = (|| {
            // Checked before anything runs, so a pod that cannot work says
            // why instead of iptables' "Permission denied (you must be root)".
            check_capabilities(&caps, &save)?;
            check_capabilities(&caps, &restore)?;
            let current = run(&save, &["-t", "nat"], None)?;
            let input = plan(args, *family, &current);
            run(&restore, &["--noflush"], Some(&input))?;
            anyhow::Ok(())
        })();
        match installed {
            Ok(()) => tracing::info!(family = family.name(), "redirect installed"),
            Err(e) if *family == Family::V6 && v6_optional => tracing::warn!(
                error = %e,
                "the pod has link-local IPv6 only and its redirect could not be installed: \
                 pods on the same link can reach it over IPv6 past the proxy; pass --ipv6=on \
                 to make this fatal, or disable IPv6 in pods"
            ),
            Err(e) => return Err(e),
        }
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
    fn ipv6_is_redirected_whenever_the_pod_has_it_beyond_loopback() {
        // /proc/net/if_inet6 of a dual-stack pod, then of an IPv4-only one
        // (loopback and link-local only).
        let dual = "00000000000000000000000000000001 01 80 10 80       lo\n\
                    fd00001002440001000000000000000a 02 40 00 80     eth0\n\
                    fe80000000000000b0f1c2fffe0a0b0c 02 40 20 80     eth0\n";
        let v4_only = "00000000000000000000000000000001 01 80 10 80       lo\n\
                       fe80000000000000b0f1c2fffe0a0b0c 02 40 20 80     eth0\n";
        assert_eq!(ipv6_reach(dual), Ipv6Reach::Global);
        // Pods on one bridge share a link: fe80:: reaches them.
        assert_eq!(ipv6_reach(v4_only), Ipv6Reach::LinkLocal);
        assert_eq!(
            ipv6_reach("00000000000000000000000000000001 01 80 10 80       lo\n"),
            Ipv6Reach::None
        );
        assert_eq!(ipv6_reach(""), Ipv6Reach::None);
        let mut a = defaults();
        assert_eq!(a.ipv6, Ipv6Mode::Auto);
        a.ipv6 = Ipv6Mode::On;
        assert!(dry_run(&a).contains("# ip6tables-restore --noflush"));
        assert!(plan(&a, Family::V6, "").contains("-A WEFT_OUTPUT -d ::1/128 -j RETURN"));
        a.ipv6 = Ipv6Mode::Off;
        assert!(!dry_run(&a).contains("ip6tables"));
    }

    #[test]
    fn multiport_lists_are_split_at_fifteen() {
        let ports: Vec<u16> = (1000..1020).collect();
        assert_eq!(port_lists(&ports).len(), 2);
    }

    /// `/proc/self/status` of a container the way containerd and CRI-O
    /// start weft-init (uid 65534, `capabilities.add: [NET_ADMIN, NET_RAW]`,
    /// `drop: [ALL]`): the two capabilities in the bounding set only. This is
    /// what a real cluster showed: `CapPrm 0, CapEff 0, CapBnd 0x3000, CapAmb 0`.
    const POD_STATUS: &str = "Uid:\t65534\t65534\t65534\t65534\nCapInh:\t0000000000000000\n\
        CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000003000\n\
        CapAmb:\t0000000000000000\nNoNewPrivs:\t0\n";

    #[test]
    fn a_pods_bounding_set_plus_file_capabilities_is_enough_and_nothing_less() {
        let pod = ProcessCaps::parse(POD_STATUS);
        assert_eq!(pod.effective_uid, 65534);
        assert_eq!(pod.bounding, 0x3000);
        let bin = Path::new("/usr/sbin/xtables-nft-multi");
        let ep = FileCaps::net_admin_and_raw();
        assert_eq!(capability_problem(&pod, bin, Some(ep)), None);

        // No file capabilities: the message names the binary and the fix.
        let err = capability_problem(&pod, bin, None).expect("refused");
        for needle in [
            "/usr/sbin/xtables-nft-multi would run without NET_ADMIN, NET_RAW",
            "bounding set only",
            "setcap cap_net_admin,cap_net_raw+ep",
            "spec.init.runAsRoot",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }

        // Without the effective flag the capabilities stay merely permitted.
        let no_e = FileCaps {
            effective: false,
            ..ep
        };
        let err = capability_problem(&pod, bin, Some(no_e)).expect("refused");
        assert!(err.contains("without the effective flag"), "{err}");

        // allowPrivilegeEscalation: false sets no_new_privs.
        let nnp = ProcessCaps {
            no_new_privs: true,
            ..pod
        };
        let err = capability_problem(&nnp, bin, Some(ep)).expect("refused");
        assert!(err.contains("allowPrivilegeEscalation: true"), "{err}");

        // A capability missing from the bounding set cannot come from a file.
        let only_raw = ProcessCaps {
            bounding: 1 << 13,
            ..pod
        };
        let err = capability_problem(&only_raw, bin, Some(ep)).expect("refused");
        assert!(
            err.contains("would run without NET_ADMIN (")
                && err.contains("bounding set lacks NET_ADMIN")
                && err.contains("capabilities.add"),
            "{err}"
        );
    }

    #[test]
    fn root_and_ambient_capabilities_need_no_file_capabilities() {
        let bin = Path::new("/usr/sbin/xtables-nft-multi");
        // Mesh spec.init.runAsRoot: uid 0, the two in the bounding set.
        let root = ProcessCaps {
            effective_uid: 0,
            bounding: 0x3000,
            ..ProcessCaps::default()
        };
        assert_eq!(capability_problem(&root, bin, None), None);
        let ambient = ProcessCaps {
            effective_uid: 65534,
            bounding: 0x3000,
            permitted: 0x3000,
            inheritable: 0x3000,
            ambient: 0x3000,
            ..ProcessCaps::default()
        };
        assert_eq!(capability_problem(&ambient, bin, None), None);
        // A file with capabilities clears the ambient set on exec.
        let other = FileCaps {
            permitted: 1 << 10,
            inheritable: 0,
            effective: true,
        };
        assert!(capability_problem(&ambient, bin, Some(other)).is_some());
    }

    #[test]
    fn file_capabilities_round_trip_the_kernels_encoding() {
        let ep = FileCaps::net_admin_and_raw();
        let raw = ep.encode();
        // What `setcap cap_net_admin,cap_net_raw+ep` writes (revision 2).
        assert_eq!(
            raw,
            [
                1, 0, 0, 2, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(FileCaps::decode(&raw), Some(ep));
        // Revision 3 adds a root uid; revision 1 has one word per set.
        let mut v3 = raw.to_vec();
        v3[3] = 3;
        v3.extend([0, 0, 0, 0]);
        assert_eq!(FileCaps::decode(&v3), Some(ep));
        assert_eq!(
            FileCaps::decode(&[1, 0, 0, 1, 0, 0x30, 0, 0, 0, 0, 0, 0]),
            Some(ep)
        );
        assert_eq!(FileCaps::decode(&[0, 0, 0, 9]), None);
        assert_eq!(FileCaps::decode(&raw[..7]), None);
    }

    #[test]
    fn backends() {
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
