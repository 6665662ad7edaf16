//! `weft local`: the whole mesh on one machine, without a cluster — the
//! quick start, the demo, and the data plane's end-to-end harness.
//!
//! `up DIR` reads the same YAML as `weft compile` plus a topology file
//! ([`topology`]), compiles the configs, publishes each Service's pods (the
//! topology's pods it selects) in the same endpoints document the operator
//! publishes in a cluster, mints identities from a fresh mesh CA, and
//! starts every pod: a `weft-demo` app and a real `weft-proxy` sidecar.
//! As root each pod is a network namespace with real `weft init` rules
//! (apps call Services by name; `/etc/hosts` maps the names to ClusterIPs
//! the sidecar intercepts); otherwise everything runs on 127.0.0.1 and the
//! apps call their sidecar's explicit ports. `status` shows the picture,
//! `down` (or Ctrl-C on `up`) removes every namespace and process.

pub mod plan;
mod run;
mod statedir;
pub mod status;
pub mod topology;

use std::path::PathBuf;

pub use run::{down, status_command, up};

/// `weft local ...`
#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    pub command: LocalCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum LocalCommand {
    /// Start the mesh described by DIR and drive its load, until Ctrl-C (or
    /// `weft local down`).
    Up(UpArgs),
    /// Stop what `up` started, even when `up` itself was killed.
    Down(StateArgs),
    /// Per-edge requests/s, success rate, retries and latency, refreshing.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// Where `up` keeps its state, configs, identities and logs (default:
    /// /run/weft-local as root, else $XDG_RUNTIME_DIR/weft-local or
    /// /tmp/weft-local-<uid>). In network namespaces the pods' users must
    /// reach it: `up` makes it traversable (o+x) and refuses, naming the
    /// directory, when one above it is not.
    #[arg(long, env = "WEFT_LOCAL_STATE")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The manifests (Namespaces, Services, ServiceAccounts, weft policies).
    pub dir: PathBuf,
    /// The topology file (default: DIR/local/topology.yaml).
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Where pods run: network namespaces with real iptables (needs root,
    /// ip, iptables, setpriv), plain loopback ports, or netns when possible.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// First port used in loopback mode (each pod takes four or more).
    #[arg(long, default_value_t = 17000)]
    pub base_port: u16,
    /// Print the status table every this often while up (0s: never; the
    /// default refreshes in place on a terminal and stays quiet otherwise).
    #[arg(long, value_parser = crate::api::parse_std_duration)]
    pub status_every: Option<std::time::Duration>,
    /// Where to serve the web dashboard (`off`: nowhere). Not 7070, which
    /// `weft dashboard` takes for a cluster's.
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub dashboard: DashboardAddr,
    #[command(flatten)]
    pub state: StateArgs,
}

/// `--dashboard`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DashboardAddr(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for DashboardAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(DashboardAddr(None));
        }
        s.parse()
            .map(|a| DashboardAddr(Some(a)))
            .map_err(|_| format!("{s:?} is not an address; give IP:PORT (127.0.0.1:7080) or off"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Auto,
    Netns,
    Loopback,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print one picture (rates over `--interval`) and exit.
    #[arg(long)]
    pub once: bool,
    /// Refresh period, and the rate window of `--once`.
    #[arg(long, default_value = "2s", value_parser = crate::api::parse_std_duration)]
    pub interval: std::time::Duration,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Runs `weft local ...`.
pub fn main(args: LocalArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.command {
        LocalCommand::Up(a) => up(&a),
        LocalCommand::Down(a) => down(&a),
        LocalCommand::Status(a) => status_command(&a),
    }
}
