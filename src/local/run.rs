//! Carries a [`Plan`] out: files, processes, network namespaces; the state
//! file that lets `status` find the proxies and `down` remove everything;
//! and the scrape behind `status`.

use std::io::{IsTerminal, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::plan::{HEALTH_PATH, Mode, Plan, PodPlan, VendorPlan, plan};
use super::statedir::{self, PodUser};
use super::status::{self, Snapshot, View};
use super::{Format, ModeArg, StateArgs, StatusArgs, UpArgs, topology};
use crate::identity::{CA_LIFETIME, MeshCa, SpiffeId};
use crate::meshstats::{MeshStats, ProxyCounts, Reading, SharedStats};
use crate::netns::{self, Network};
use crate::proxy::PROXY_UID;

const STATE_FILE: &str = "state.json";
/// The apps run as this user in network-namespace pods.
const APP_UID: u32 = 1000;
/// The stub vendors run as this user: not the apps' (a stub's key is
/// readable by its user only).
const VENDOR_UID: u32 = 1001;
/// Names of the namespaces `up` creates start with these (see `Network`).
const NETNS_PREFIXES: [&str; 2] = ["wbr-local", "wp-local"];
const TAG: &str = "local";
/// How long a pod may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Workload certificates live this long (no rotation in weft local).
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// What `up` leaves for `status` and `down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// The `weft local up` process.
    up_pid: u32,
    mode: String,
    manifests: PathBuf,
    /// Network namespaces created (network-namespace mode).
    namespaces: Vec<String>,
    pods: Vec<PodState>,
    /// The stub vendors' processes.
    #[serde(default)]
    vendors: Vec<VendorState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VendorState {
    name: String,
    pids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodState {
    name: String,
    workload: String,
    namespace: String,
    ip: Ipv4Addr,
    /// The pod's network namespace; None on loopback.
    netns: Option<String>,
    admin_port: u16,
    app_port: u16,
    pids: Vec<u32>,
}

fn state_dir(args: &StateArgs) -> PathBuf {
    if let Some(dir) = &args.state_dir {
        return dir.clone();
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/run/weft-local");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("weft-local"),
        _ => std::env::temp_dir().join(format!("weft-local-{}", nix::unistd::Uid::effective())),
    }
}

fn read_state(dir: &Path) -> anyhow::Result<Option<State>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Whether `pid` is a live weft process (not a recycled pid).
fn alive(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie has exited; it only waits for its parent.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains("weft")
}

/// A binary installed next to this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the weft binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{name} is not next to {} (`make build` builds weft, weft-proxy and weft-demo together)",
            exe.display()
        );
    }
    Ok(path)
}

/// Processes and namespaces, removed on drop (even on an error or panic).
struct Running {
    /// Loopback processes.
    children: Vec<Child>,
    /// Dropped after the loopback processes; its own drop kills pods'
    /// processes and deletes the namespaces.
    network: Option<Network>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn choose_mode(args: &UpArgs) -> anyhow::Result<(Mode, String)> {
    let loopback = Mode::Loopback {
        base_port: args.base_port,
    };
    let missing = netns::missing_prerequisite();
    Ok(match (args.mode, missing) {
        (ModeArg::Netns, Some(why)) => {
            bail!("--mode netns needs network namespaces, but {why}; use --mode loopback")
        }
        (ModeArg::Netns | ModeArg::Auto, None) => (
            Mode::Netns,
            "network namespaces with real weft init rules".to_owned(),
        ),
        (ModeArg::Auto, Some(why)) => (
            loopback,
            format!("loopback ports from {} ({why})", args.base_port),
        ),
        (ModeArg::Loopback, _) => (loopback, format!("loopback ports from {}", args.base_port)),
    })
}

/// `weft local up DIR`.
pub fn up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.state);
    if let Some(state) = read_state(&dir)? {
        if alive(state.up_pid) {
            bail!(
                "weft local is already up (pid {}, state in {}): `weft local down` stops it",
                state.up_pid,
                dir.display()
            );
        }
        eprintln!("weft local: cleaning up after an earlier run that did not stop cleanly");
        cleanup(&dir, &state);
    }

    let loaded = match crate::manifest::load(std::slice::from_ref(&args.dir)) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "{} problem(s) in {}; nothing started",
                errors.len(),
                args.dir.display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    let topo_path = args
        .topology
        .clone()
        .unwrap_or_else(|| args.dir.join(topology::DEFAULT_PATH));
    let topology = match topology::load(&topo_path) {
        Ok(t) => t,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    let (mode, how) = choose_mode(args)?;
    let mut plan = match plan(&loaded.facts, &topology, mode) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {}: {e}", topo_path.display());
            }
            return Ok(ExitCode::from(2));
        }
    };
    if plan.mode == Mode::Netns
        && let Err(e) = pods_can_reach_their_files(&dir)
    {
        eprintln!("error: {e:#}");
        return Ok(ExitCode::from(2));
    }
    let vendor_ca = trust_vendors(&mut plan)?;
    report_plan(&plan, &how);

    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r?,
                    _ = term.recv() => {}
                }
                stop.store(true, Ordering::SeqCst);
                std::io::Result::Ok(())
            })
        })
    };
    let _ = signals; // lives until the process exits

    let running = start(&plan, vendor_ca.as_ref(), &dir, args, &stop)?;
    let Some((mut running, state)) = running else {
        eprintln!("weft local: interrupted while starting; everything it started is removed");
        return Ok(ExitCode::from(130));
    };
    println!(
        "\nthe mesh is up: {} pods. `weft local status` shows the traffic; Ctrl-C or `weft local down` stops it.\nconfigs, identities and logs: {}",
        state.pods.len(),
        dir.display()
    );
    let every = match args.status_every {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => std::io::stdout()
            .is_terminal()
            .then_some(Duration::from_secs(2)),
    };
    let tty = std::io::stdout().is_terminal();
    // The proxies are read as often as the table is printed, else every
    // DASHBOARD_TICK while the dashboard is served (its window needs
    // ticks); ten minutes of them are kept either way.
    let period = every.map_or(DASHBOARD_TICK, |e| e.max(Duration::from_millis(100)));
    // The baseline of the tables' window: the first one drawn has rates.
    let mut earlier = Pictures {
        earlier: None,
        stats: Arc::new(std::sync::Mutex::new(MeshStats::reading_every(period))),
    };
    picture(&state, &mut earlier);
    let dashboard = args.dashboard.0.and_then(|addr| {
        serve_dashboard(
            addr,
            earlier.stats.clone(),
            &loaded.facts.mtls_policies,
            &plan.configs,
        )
    });
    if let Some(url) = &dashboard {
        println!("the dashboard: {url}");
    }
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if (every.is_some() || dashboard.is_some()) && Instant::now() >= next {
            next = Instant::now() + period;
            let view = picture(&state, &mut earlier);
            if every.is_some() {
                if tty {
                    print!("\x1b[H\x1b[2J");
                }
                let url = dashboard
                    .as_deref()
                    .map(|u| format!(", the dashboard at {u}"))
                    .unwrap_or_default();
                println!("{}(Ctrl-C stops the mesh{url})", status::render(&view));
                let _ = std::io::stdout().flush();
            }
        }
        if let Some(dead) = exited(&mut running) {
            eprintln!("weft local: {dead} exited; stopping everything");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping {} pods...", state.pods.len());
    drop(running);
    cleanup(&dir, &state);
    println!(
        "stopped: no namespace or process of weft local is left; logs kept in {}",
        dir.join("logs").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// How often the proxies are read for the dashboard when no table is
/// printed (a cluster's control plane reads every 10 s).
const DASHBOARD_TICK: Duration = Duration::from_secs(2);

/// Serves the dashboard ([`crate::dashboard`]) on `addr` from a thread of
/// its own: the stats `up` records, and the MTLSPolicies of the manifests
/// in the modes their namespaces' configs enforce.
/// Returns its URL, or None (said on stderr) when `addr` cannot be bound:
/// the mesh runs on without it.
fn serve_dashboard(
    addr: SocketAddr,
    stats: SharedStats,
    policies: &[crate::api::MTLSPolicy],
    configs: &std::collections::BTreeMap<String, crate::config::ProxyConfig>,
) -> Option<String> {
    if !addr.ip().is_loopback() {
        eprintln!(
            "weft local: no dashboard on {addr}: it is served on loopback only (--dashboard 127.0.0.1:PORT)"
        );
        return None;
    }
    let listener = match std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "weft local: no dashboard: binding {addr}: {e} (choose another address with --dashboard, or --dashboard off)"
            );
            return None;
        }
    };
    let url = format!("http://{}/", listener.local_addr().ok()?);
    let rollouts = local_rollouts(policies, configs);
    let sources = crate::dashboard::Sources::new(stats, Arc::new(move || rollouts.clone()));
    std::thread::Builder::new()
        .name("dashboard".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("weft local: no dashboard: {e}"),
            };
            rt.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        let app =
                            crate::dashboard::loopback_only(crate::dashboard::router(sources));
                        axum::serve(l, app).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    eprintln!("weft local: the dashboard stopped: {e}");
                }
            });
        })
        .ok()?;
    Some(url)
}

/// The rollouts `weft local` shows: no operator runs here, so no staged
/// rollout advances; each namespace is shown in the mode its compiled
/// config enforces (a staged Strict stays Permissive, an immediate one is
/// Strict).
fn local_rollouts(
    policies: &[crate::api::MTLSPolicy],
    configs: &std::collections::BTreeMap<String, crate::config::ProxyConfig>,
) -> crate::dashboard::RolloutsView {
    let mut view = crate::dashboard::RolloutsView::of(policies);
    for row in &mut view.rollouts {
        if row.phase.is_none()
            && let Some(config) = configs.get(&row.namespace)
        {
            let phase = match config.inbound.mode {
                crate::config::InboundMode::Strict => "Strict",
                crate::config::InboundMode::Permissive => "Permissive",
            };
            row.phase = Some(phase.to_owned());
        }
    }
    view.note = Some(
        "weft local runs no operator: a staged move to Strict does not advance here (it stays Permissive); install weft on a cluster to see the rollout's phases".to_owned(),
    );
    view
}

/// In network namespaces the proxy and the app run as their own users
/// (see [`statedir`]): they must reach the state directory and their
/// binaries, which sit next to this one.
fn pods_can_reach_their_files(dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the weft binary")?;
    let proxy = PodUser {
        uid: PROXY_UID,
        what: "the proxy",
    };
    let app = PodUser {
        uid: APP_UID,
        what: "the demo app",
    };
    statedir::prepare(
        dir,
        &[
            (proxy, dir.to_owned()),
            (proxy, exe.with_file_name("weft-proxy")),
            (app, exe.with_file_name("weft-demo")),
        ],
    )
}

/// The first loopback process that died, if one did (pods in namespaces
/// are watched through their readiness instead).
fn exited(running: &mut Running) -> Option<String> {
    running
        .children
        .iter_mut()
        .find_map(|c| match c.try_wait() {
            Ok(Some(status)) => Some(format!("process {} ({status})", c.id())),
            _ => None,
        })
}

fn report_plan(plan: &Plan, how: &str) {
    println!("weft local: {} pods in {}", plan.pods.len(), how);
    for v in &plan.vendors {
        println!(
            "  stub vendor for ExternalService {}/{}: {} ({})",
            v.namespace,
            v.external_service,
            v.names.join(", "),
            if v.tls {
                "HTTPS, from a CA of this run"
            } else {
                "HTTP"
            }
        );
    }
    let not_ok: Vec<_> = plan
        .verdicts
        .iter()
        .filter(|v| {
            ["Accepted", "ResolvedRefs", "Programmed"]
                .iter()
                .any(|t| v.condition(t).is_some_and(|c| !c.status))
        })
        .collect();
    println!(
        "compiled {} namespace configs from {} policies ({} not fully programmed)",
        plan.configs.len(),
        plan.verdicts.len(),
        not_ok.len()
    );
    for v in not_ok {
        for c in v.conditions.iter().filter(|c| !c.status) {
            println!(
                "  warning: {:?} {}/{}: {} {}: {}",
                v.kind,
                v.namespace.as_deref().unwrap_or(""),
                v.name,
                c.type_,
                c.reason,
                c.message
            );
        }
    }
    for w in &plan.warnings {
        println!("  warning: {w}");
    }
}

/// Writes every pod's files and starts its processes, then waits until
/// every proxy and app answers. The apps that drive load start last, once
/// everything they reach is ready, so no request fails for a pod that has
/// not started yet. None when interrupted.
fn start(
    plan: &Plan,
    vendor_ca: Option<&MeshCa>,
    dir: &Path,
    args: &UpArgs,
    stop: &AtomicBool,
) -> anyhow::Result<Option<(Running, State)>> {
    let (weft, proxy, demo) = (
        std::env::current_exe().context("finding the weft binary")?,
        sibling("weft-proxy")?,
        sibling("weft-demo")?,
    );
    // Made at the first netns pod; only `weft init` uses it.
    let mut image_iptables: Option<netns::ImageIptables> = None;
    for sub in ["", "pods", "logs"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    if let Mode::Loopback { .. } = plan.mode {
        for pod in &plan.pods {
            for port in &pod.host_ports {
                std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).with_context(|| {
                    format!(
                        "port {port} (pod {}) is taken: pass another --base-port",
                        pod.name
                    )
                })?;
            }
        }
        for v in &plan.vendors {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, v.port)).with_context(|| {
                format!(
                    "port {} (stub vendor {}) is taken: pass another --base-port",
                    v.port, v.name
                )
            })?;
        }
    }
    let ca = MeshCa::generate(&plan.trust_domain, SystemTime::now(), CA_LIFETIME)?;
    let mut running = Running {
        children: Vec::new(),
        network: match plan.mode {
            Mode::Netns => Some(Network::new(TAG)?),
            Mode::Loopback { .. } => None,
        },
    };
    let mut state = State {
        up_pid: std::process::id(),
        mode: match plan.mode {
            Mode::Netns => "netns".into(),
            Mode::Loopback { .. } => "loopback".into(),
        },
        manifests: args.dir.clone(),
        namespaces: Vec::new(),
        pods: Vec::new(),
        vendors: Vec::new(),
    };
    let total = plan.pods.len();
    let log = |pod: &PodPlan, kind: &str| {
        dir.join("logs")
            .join(format!("{}.{}.{kind}.log", pod.namespace, pod.name))
    };
    let app_argv = |pod: &PodPlan| {
        let mut argv = vec![demo.display().to_string()];
        argv.extend(pod.app_args.iter().cloned());
        argv
    };
    for (i, pod) in plan.pods.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let files = write_pod_files(plan, dir, pod, &ca)?;
        let mut proxy_argv: Vec<String> = vec![
            proxy.display().to_string(),
            "--config".into(),
            files.config.display().to_string(),
            "--identity-dir".into(),
            files.identity.display().to_string(),
            "--pod-labels-file".into(),
            files.labels.display().to_string(),
        ];
        proxy_argv.extend(pod.proxy_args.iter().cloned());
        let netns = match &mut running.network {
            Some(net) => {
                let k = net.add_pod(&pod.name)?;
                let p = &mut net.pods[k];
                if p.ip != pod.ip || k != i {
                    bail!("pod {} got {} but the plan says {}", pod.name, p.ip, pod.ip);
                }
                if let Some(hosts) = &pod.hosts {
                    p.ns.set_etc_file("hosts", hosts)?;
                }
                // As in a pod: uid 65534, the two capabilities in the
                // bounding set only, iptables with the image's file
                // capabilities (see `netns::ImageIptables`).
                if image_iptables.is_none() {
                    image_iptables = Some(netns::ImageIptables::new(true)?);
                }
                let iptables = image_iptables.as_ref().context("image iptables")?;
                let out = p.ns.run_init(&weft.display().to_string(), iptables, &[])?;
                if !out.status.success() {
                    bail!(
                        "weft init in pod {}: {}",
                        pod.name,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Some(p.ns.name.clone())
            }
            None => None,
        };
        let mut pids = vec![running.spawn(i, Some(PROXY_UID), &proxy_argv, &log(pod, "proxy"))?];
        if !pod.drives {
            pids.push(running.spawn(i, Some(APP_UID), &app_argv(pod), &log(pod, "app"))?);
        }
        println!(
            "[{:>2}/{total}] started {}/{} ({})",
            i + 1,
            pod.namespace,
            pod.name,
            match plan.mode {
                Mode::Netns => format!("{}, app :{}", pod.ip, pod.app_port),
                Mode::Loopback { .. } =>
                    format!("app :{}, proxy admin :{}", pod.app_port, pod.admin.port()),
            }
        );
        state.pods.push(PodState {
            name: pod.name.clone(),
            workload: pod.workload.clone(),
            namespace: pod.namespace.clone(),
            ip: pod.ip,
            netns,
            admin_port: pod.admin.port(),
            app_port: pod.app_port,
            pids,
        });
        if let Some(net) = &running.network {
            state.namespaces = net.namespace_names();
        }
        // Written as it grows, so `down` finds everything even if this
        // process is killed half-way.
        write_state(dir, &state)?;
    }

    // The stub vendors, each in a network namespace of its own after the
    // pods' (no sidecar: a vendor is outside the mesh).
    for (j, vendor) in plan.vendors.iter().enumerate() {
        let mut argv = vec![demo.display().to_string()];
        argv.extend(vendor.app_args.iter().cloned());
        if vendor.tls {
            let ca = vendor_ca.context("no CA for the stub vendors")?;
            let (crt, key) = write_vendor_files(dir, vendor, ca, plan.mode)?;
            argv.extend([
                "--tls-cert".to_owned(),
                crt.display().to_string(),
                "--tls-key".to_owned(),
                key.display().to_string(),
            ]);
        }
        let index = match &mut running.network {
            Some(net) => {
                let k = net.add_pod(&vendor.name)?;
                if net.pods[k].ip != vendor.ip || k != plan.pods.len() + j {
                    bail!(
                        "stub vendor {} got {} but the plan says {}",
                        vendor.name,
                        net.pods[k].ip,
                        vendor.ip
                    );
                }
                state.namespaces = net.namespace_names();
                k
            }
            None => plan.pods.len() + j,
        };
        let log = dir
            .join("logs")
            .join(format!("{}.{}.vendor.log", vendor.namespace, vendor.name));
        let pid = running.spawn(index, Some(VENDOR_UID), &argv, &log)?;
        println!(
            "[vendor] started {} for ExternalService {}/{} ({}:{}{})",
            vendor.name,
            vendor.namespace,
            vendor.external_service,
            vendor.ip,
            vendor.port,
            if vendor.tls { ", TLS" } else { "" }
        );
        state.vendors.push(VendorState {
            name: vendor.name.clone(),
            pids: vec![pid],
        });
        write_state(dir, &state)?;
    }

    let started = Instant::now();
    for (i, pod) in state.pods.iter().enumerate() {
        if !wait_ready(dir, pod, !plan.pods[i].drives, started, stop)? {
            return Ok(None);
        }
        println!(
            "[{:>2}/{total}] ready   {}/{}",
            i + 1,
            pod.namespace,
            pod.name
        );
    }
    let drivers: Vec<usize> = (0..total).filter(|i| plan.pods[*i].drives).collect();
    for &i in &drivers {
        let pod = &plan.pods[i];
        let pid = running.spawn(i, Some(APP_UID), &app_argv(pod), &log(pod, "app"))?;
        state.pods[i].pids.push(pid);
        write_state(dir, &state)?;
    }
    let started = Instant::now();
    for &i in &drivers {
        if !wait_ready(dir, &state.pods[i], true, started, stop)? {
            return Ok(None);
        }
        println!(
            "[{:>2}/{total}] driving load: {}/{}",
            i + 1,
            state.pods[i].namespace,
            state.pods[i].name
        );
    }
    Ok(Some((running, state)))
}

impl Running {
    /// Starts a process in pod `index` (as `uid` in a network namespace;
    /// as the caller on loopback); returns its pid.
    fn spawn(
        &mut self,
        index: usize,
        uid: Option<u32>,
        argv: &[String],
        log: &Path,
    ) -> anyhow::Result<u32> {
        match &mut self.network {
            Some(net) => {
                let pod = &mut net.pods[index];
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                pod.spawn(uid, &argv, log)?;
                Ok(*pod.pids().last().unwrap_or(&0))
            }
            None => {
                let child = spawn_logged(argv, log)?;
                let pid = child.id();
                self.children.push(child);
                Ok(pid)
            }
        }
    }
}

/// Waits until the pod's proxy (and app, with `app`) answer; Ok(false)
/// when interrupted; an error naming the silent process, with its log's
/// last lines, after [`READY_TIMEOUT`] from `started`.
fn wait_ready(
    dir: &Path,
    pod: &PodState,
    app: bool,
    started: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let proxy_ready = get(pod, pod.admin_port, "/ready").is_ok_and(|(s, _)| s == 200);
        let app_ready = !app
            || (proxy_ready && get(pod, pod.app_port, HEALTH_PATH).is_ok_and(|(s, _)| s == 200));
        if proxy_ready && app_ready {
            return Ok(true);
        }
        if started.elapsed() > READY_TIMEOUT {
            let tail = |kind: &str| {
                let log = dir
                    .join("logs")
                    .join(format!("{}.{}.{kind}.log", pod.namespace, pod.name));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- {} (last lines) ---\n{}",
                    log.display(),
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            };
            bail!(
                "pod {}/{} was not ready within {READY_TIMEOUT:?} ({} not answering)\n{}\n{}",
                pod.namespace,
                pod.name,
                if proxy_ready { "app" } else { "proxy" },
                tail("proxy"),
                tail("app")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_logged(argv: &[String], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = file.try_clone()?;
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))
}

struct PodFiles {
    config: PathBuf,
    identity: PathBuf,
    labels: PathBuf,
}

/// The pod's config (its namespace's) and identity (its ServiceAccount's
/// key pair and the trust bundle), readable by the proxy's user only where
/// it matters: the key.
fn write_pod_files(
    plan: &Plan,
    dir: &Path,
    pod: &PodPlan,
    ca: &MeshCa,
) -> anyhow::Result<PodFiles> {
    let root = dir
        .join("pods")
        .join(format!("{}.{}", pod.namespace, pod.name));
    let identity = root.join("identity");
    std::fs::create_dir_all(&identity)?;
    for d in [&root, &identity] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let write = |path: &Path, text: &str, mode: u32| -> anyhow::Result<()> {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let config = root.join("config.json");
    write(&config, &plan.configs[&pod.namespace].to_json(), 0o644)?;
    // Where the proxy looks by default: next to its config, as the
    // injector's projected volume puts `weft-endpoints` in a cluster.
    if let Some(endpoints) = plan.endpoints.get(&pod.namespace) {
        write(
            &root.join(crate::config::ENDPOINTS_KEY),
            &endpoints.to_json(),
            0o644,
        )?;
    }
    let leaf = ca.issue(
        &SpiffeId::new(&plan.trust_domain, &pod.namespace, &pod.service_account),
        SystemTime::now(),
        LEAF_LIFETIME,
    )?;
    // As the kubelet mounts the pod's ServiceAccount's identity Secret.
    write(
        &identity.join(crate::identity::CA_CERT_KEY),
        &ca.trust_bundle(),
        0o644,
    )?;
    write(
        &identity.join(crate::identity::TLS_CERT_KEY),
        &leaf.cert_pem,
        0o644,
    )?;
    let key = identity.join(crate::identity::TLS_KEY_KEY);
    write(&key, &leaf.key_pem, 0o600)?;
    if plan.mode == Mode::Netns {
        std::os::unix::fs::chown(&key, Some(PROXY_UID), Some(PROXY_UID))
            .with_context(|| format!("handing {} to the proxy's user", key.display()))?;
    }
    // As the downward API writes `metadata.labels`.
    let labels = root.join("labels");
    let text: String = pod
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect();
    write(&labels, &text, 0o644)?;
    Ok(PodFiles {
        config,
        identity,
        labels,
    })
}

/// A CA of the run for the stub vendors, when the plan has any: each
/// ExternalService they stand for trusts it (`caCertificates` of its TLS
/// ports), as one names a vendor's private CA in a cluster.
fn trust_vendors(plan: &mut Plan) -> anyhow::Result<Option<MeshCa>> {
    if !plan.vendors.iter().any(|v| v.tls) {
        return Ok(None);
    }
    let ca = MeshCa::generate("stub vendors of weft local", SystemTime::now(), CA_LIFETIME)?;
    for vendor in plan.vendors.iter().filter(|v| v.tls) {
        let Some(config) = plan.configs.get_mut(&vendor.namespace) else {
            continue;
        };
        let stood_for =
            config.outbound.external_services.iter_mut().filter(|es| {
                es.namespace == vendor.namespace && es.name == vendor.external_service
            });
        for es in stood_for {
            for tls in es.ports.iter_mut().filter_map(|p| p.tls.as_mut()) {
                tls.ca_certificates = Some(ca.trust_bundle());
            }
        }
    }
    Ok(Some(ca))
}

/// A stub vendor's certificate (for the names it answers to) and key,
/// readable by the user it runs as.
fn write_vendor_files(
    dir: &Path,
    vendor: &VendorPlan,
    ca: &MeshCa,
    mode: Mode,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = dir.join("vendors").join(&vendor.name);
    std::fs::create_dir_all(&root)?;
    for d in [&dir.join("vendors"), &root] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let leaf = ca.issue_server(&vendor.names, SystemTime::now(), LEAF_LIFETIME)?;
    let (crt, key) = (root.join("tls.crt"), root.join("tls.key"));
    std::fs::write(&crt, &leaf.cert_pem).with_context(|| format!("writing {}", crt.display()))?;
    std::fs::set_permissions(&crt, std::fs::Permissions::from_mode(0o644))?;
    std::fs::write(&key, &leaf.key_pem).with_context(|| format!("writing {}", key.display()))?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    if mode == Mode::Netns {
        std::os::unix::fs::chown(&key, Some(VENDOR_UID), Some(VENDOR_UID))
            .with_context(|| format!("handing {} to the vendor's user", key.display()))?;
    }
    Ok((crt, key))
}

/// GET `path` from 127.0.0.1:`port` as seen inside the pod: (status, body).
fn get(pod: &PodState, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = match &pod.netns {
        Some(ns) => netns::connect_in(ns, addr, timeout)?,
        None => TcpStream::connect_timeout(&addr, timeout)?,
    };
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line"))?;
    Ok((status, body.to_owned()))
}

/// Scrapes every proxy once: the local snapshot, the stats API's
/// readings of the same text, and how many answered.
fn scrape(state: &State) -> (Snapshot, Vec<Reading>, usize) {
    let texts: Vec<Option<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = state
            .pods
            .iter()
            .map(|pod| s.spawn(move || get(pod, pod.admin_port, "/metrics").ok().map(|(_, b)| b)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let mut snap = Snapshot::default();
    let mut readings = Vec::with_capacity(state.pods.len());
    let mut reachable = 0;
    for (pod, text) in state.pods.iter().zip(texts) {
        let id = (pod.namespace.clone(), pod.name.clone());
        match text {
            Some(text) => {
                reachable += 1;
                let samples = status::parse_metrics(&text);
                snap.add(&pod.workload, &samples);
                let counts = ProxyCounts::from_samples(&pod.namespace, &samples);
                readings.push(Reading {
                    id,
                    counts: Ok(counts),
                });
            }
            None => readings.push(Reading {
                id,
                counts: Err("no answer on the admin port".to_owned()),
            }),
        }
    }
    (snap, readings, reachable)
}

/// How far back the tables look, as `weft edges` does by default.
const STATUS_WINDOW: Duration = Duration::from_secs(60);

/// The pictures taken so far: the last snapshot (rates since it), and the
/// rolling window the stats API keeps in a cluster.
#[derive(Default)]
struct Pictures {
    earlier: Option<(Snapshot, Instant)>,
    /// Shared with the dashboard `up` serves.
    stats: SharedStats,
}

/// The status view now, with rates since the previous call.
fn picture(state: &State, pictures: &mut Pictures) -> View {
    let (now, readings, reachable) = scrape(state);
    let at = Instant::now();
    crate::proxy::resilience::lock(&pictures.stats).record(SystemTime::now(), readings);
    let (before, seconds) = match pictures.earlier.as_ref() {
        Some((snap, t)) => (Some(snap), at.duration_since(*t).as_secs_f64()),
        None => (None, 0.0),
    };
    let view = View {
        pods: state.pods.len(),
        reachable,
        edges: status::view(&now, before, seconds),
        servers: status::server_view(&now, before, seconds),
        stats: crate::proxy::resilience::lock(&pictures.stats).view(STATUS_WINDOW),
    };
    pictures.earlier = Some((now, at));
    view
}

/// `weft local status`.
pub fn status_command(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.state);
    let Some(state) = read_state(&dir)? else {
        eprintln!(
            "weft local is not up (no {} in {}): start it with `weft local up examples/shop`",
            STATE_FILE,
            dir.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    let mut earlier = Pictures::default();
    picture(&state, &mut earlier);
    let tty = std::io::stdout().is_terminal();
    loop {
        std::thread::sleep(args.interval);
        let view = picture(&state, &mut earlier);
        match args.output {
            Format::Json => println!("{}", serde_json::to_string(&view)?),
            Format::Text => {
                if tty && !args.once {
                    print!("\x1b[H\x1b[2J");
                }
                println!("{}", status::render(&view));
            }
        }
        let _ = std::io::stdout().flush();
        if args.once {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// `weft local down`.
pub fn down(args: &StateArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(args);
    let state = read_state(&dir)?;
    if let Some(state) = &state
        && alive(state.up_pid)
    {
        println!("stopping weft local (pid {})...", state.up_pid);
        let pid = nix::unistd::Pid::from_raw(state.up_pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(state.up_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if let Some(state) = &state {
        cleanup(&dir, state);
    }
    let swept = sweep();
    let Some(state) = state else {
        println!(
            "weft local is down: nothing was up{}",
            if swept > 0 {
                format!(" (removed {swept} namespaces left by an earlier run)")
            } else {
                String::new()
            }
        );
        return Ok(ExitCode::SUCCESS);
    };
    // Check, rather than trust, that nothing is left.
    let existing = netns::list_namespaces();
    let namespaces_left: Vec<&String> = state
        .namespaces
        .iter()
        .filter(|n| existing.contains(n))
        .collect();
    let pids: Vec<u32> = state
        .pods
        .iter()
        .flat_map(|p| p.pids.clone())
        .chain(state.vendors.iter().flat_map(|v| v.pids.clone()))
        .collect();
    let processes_left: Vec<&u32> = pids.iter().filter(|p| alive(**p)).collect();
    if !namespaces_left.is_empty() || !processes_left.is_empty() {
        eprintln!(
            "error: still there after weft local down: namespaces {namespaces_left:?}, processes {processes_left:?}"
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "weft local is down: {} pods, {} stub vendors, {} network namespaces and {} processes are gone{}",
        state.pods.len(),
        state.vendors.len(),
        state.namespaces.len(),
        pids.len(),
        if swept > 0 {
            format!(" (and {swept} namespaces of an earlier run)")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Kills what `state` lists that still runs, deletes its namespaces, and
/// removes the state file and identities (logs stay).
fn cleanup(dir: &Path, state: &State) {
    let pids: Vec<u32> = state
        .pods
        .iter()
        .flat_map(|p| p.pids.iter().copied())
        .chain(state.vendors.iter().flat_map(|v| v.pids.iter().copied()))
        .filter(|p| alive(*p))
        .collect();
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // SIGKILL is asynchronous: wait (briefly) until they are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for ns in &state.namespaces {
        netns::delete_namespace(ns);
    }
    let _ = std::fs::remove_dir_all(dir.join("pods"));
    let _ = std::fs::remove_dir_all(dir.join("vendors"));
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
}

/// Deletes namespaces of earlier runs that no state file remembers: those
/// named by `up` (`wbr-local<pid>x<n>`, `wp-local<pid>x<n>-<pod>`) whose
/// `up` process is gone. A run that is still up is left alone, whatever
/// its state directory.
fn sweep() -> usize {
    if !nix::unistd::Uid::effective().is_root() {
        return 0;
    }
    let mut n = 0;
    for ns in netns::list_namespaces() {
        let Some(pid) = NETNS_PREFIXES
            .iter()
            .find_map(|p| ns.strip_prefix(p))
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            netns::delete_namespace(&ns);
            n += 1;
        }
    }
    n
}
