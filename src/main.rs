//! The `weft` binary: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Weft: a lightweight service mesh for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print the weft.dev CustomResourceDefinitions as YAML (what `crds/` holds).
    Crdgen {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Compile policy YAML (what you would `kubectl apply`) into each meshed
    /// namespace's proxy config and every policy's status verdict.
    Compile(weft::manifest::CompileArgs),
    /// Run the sidecar proxy.
    Proxy(weft::proxy::ProxyArgs),
    /// Install the pod's iptables redirect through the proxy (the weft-init
    /// init container); `--dry-run` prints the rules.
    Init(weft::init::InitArgs),
    /// Run the control plane: the sidecar injector (admission webhook) and
    /// its serving certificate.
    ControlPlane(weft::controlplane::ControlPlaneArgs),
    /// The whole mesh on this machine, without a cluster: `up DIR` starts
    /// demo services with real sidecars from DIR's policies and topology,
    /// `status` shows the traffic per edge, `down` removes everything.
    Local(weft::local::LocalArgs),
    /// Each meshed workload's golden signals as its own sidecars count them
    /// (from the control plane's stats API, through the API server).
    Stat(weft::statcli::StatArgs),
    /// Each edge's golden signals: caller -> destination and route, with
    /// success rate, latency, mTLS, split shares, retries and circuits.
    Edges(weft::statcli::StatArgs),
    /// `weft edges`, busiest first, refreshed every 10 s.
    Top(weft::statcli::StatArgs),
    /// AccessPolicy helpers: `suggest NAMESPACE[/SERVICE]` prints the
    /// least-privilege policy that admits exactly the callers an audited
    /// policy saw.
    Authz(weft::authzcli::AuthzArgs),
    /// The mesh's web dashboard (service graph, edges, mTLS rollouts) on
    /// this machine, through the API server's service proxy.
    Dashboard(weft::dashboard::proxy::DashboardArgs),
    /// Wait until the local proxy is ready (the classic sidecar's postStart
    /// hook, which holds the app's start until then).
    WaitReady {
        /// The proxy's readiness endpoint.
        #[arg(long, default_value = "http://127.0.0.1:15120/ready")]
        url: String,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "120s")]
        timeout: weft::api::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    weft::init_process();
    let result = match cli.command {
        Command::Crdgen { out_dir } => crdgen(out_dir),
        Command::Compile(args) => weft::manifest::run(&args),
        Command::Proxy(args) => weft::proxy::main(args).map(|()| ExitCode::SUCCESS),
        Command::Init(args) => weft::init::main(&args).map(|()| ExitCode::SUCCESS),
        Command::ControlPlane(args) => weft::controlplane::main(args).map(|()| ExitCode::SUCCESS),
        Command::Local(args) => weft::local::main(args),
        Command::Authz(args) => weft::authzcli::main(&args),
        Command::Stat(args) => weft::statcli::main(weft::statcli::Table::Workloads, &args),
        Command::Edges(args) => weft::statcli::main(weft::statcli::Table::Edges, &args),
        Command::Top(mut args) => {
            if args.sort == weft::statcli::Sort::Name {
                args.sort = weft::statcli::Sort::Rps;
            }
            args.watch = true;
            weft::statcli::main(weft::statcli::Table::Edges, &args)
        }
        Command::Dashboard(args) => weft::dashboard::proxy::main(&args),
        Command::WaitReady { url, timeout } => wait_ready(&url, timeout.as_std()),
    };
    match result {
        Ok(code) => code,
        // A closed pipe (`weft compile ... | head`) is the reader's choice, not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                .is_some_and(|k| k == std::io::ErrorKind::BrokenPipe)
    })
}

/// Polls `url` (plain HTTP on this host) until it answers 200.
fn wait_ready(url: &str, timeout: std::time::Duration) -> anyhow::Result<ExitCode> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url {url:?}: expected http://HOST:PORT/PATH"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let deadline = std::time::Instant::now() + timeout;
    let step = std::time::Duration::from_millis(200);
    let mut last = String::from("no answer yet");
    while std::time::Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let mut s = std::net::TcpStream::connect_timeout(&addr, step * 5)?;
            s.set_read_timeout(Some(step * 5))?;
            write!(
                s,
                "GET /{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            )?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head)?;
            Ok(String::from_utf8_lossy(&head[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned())
        })();
        match attempt {
            Ok(status) if status.split(' ').nth(1) == Some("200") => return Ok(ExitCode::SUCCESS),
            Ok(status) => last = status,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(step);
    }
    eprintln!("error: {url} was not ready within {timeout:?} (last: {last})");
    Ok(ExitCode::FAILURE)
}

fn crdgen(out_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    for crd in weft::api::crds() {
        let yaml = weft::api::crd_yaml(&crd);
        match &out_dir {
            Some(dir) => {
                let path = dir.join(weft::api::crd_file_name(&crd));
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => print!("{yaml}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
