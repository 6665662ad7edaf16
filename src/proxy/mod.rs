//! `weft proxy`: the sidecar. Listeners (outbound 15101, inbound 15106,
//! admin 15120, probes 15121) accept connections; `outbound` and `inbound`
//! decide what each connection is and hand HTTP to the layered stack in
//! `http`; `state` and `watch` keep the config current; `server` drains on
//! shutdown.

pub mod accesslog;
pub mod admin;
pub mod apiwatch;
pub mod authz;
pub mod destination;
pub mod detect;
pub mod hello;
pub mod http;
pub mod inbound;
pub mod inbound_limit;
pub mod mesh;
pub mod metrics;
pub mod orig_dst;
pub mod origin;
pub mod outbound;
pub mod resilience;
pub mod server;
pub mod state;
pub mod tls;
pub mod trace;
pub mod watch;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use self::metrics::{Direction, ProxyMetrics};
use self::outbound::Target;
use self::server::Drain;
use self::state::ConfigStore;

/// Ports of the proxy (distinct from Istio's, Linkerd's and Kuma's).
pub const OUTBOUND_PORT: u16 = 15101;
pub const INBOUND_PORT: u16 = 15106;
pub const ADMIN_PORT: u16 = 15120;
pub const PROBE_PORT: u16 = 15121;
/// The uid and gid the proxy runs as; iptables skips this uid's traffic.
pub const PROXY_UID: u32 = 1450;

/// Command line of `weft proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// The ProxyConfig file (the mounted ConfigMap key; gzip or JSON).
    #[arg(
        long,
        env = "WEFT_CONFIG",
        default_value = "/var/run/weft/config/config.json"
    )]
    pub config: PathBuf,
    /// The mounted endpoints document (ConfigMap `weft-endpoints`, the
    /// pods behind the Services called); `endpoints.json` next to
    /// `--config` when unset. Missing is fine: Services are then reached
    /// through their ClusterIPs.
    #[arg(long, env = "WEFT_ENDPOINTS")]
    pub endpoints: Option<PathBuf>,
    /// This workload's name, the `src` of outbound metrics.
    #[arg(long, env = "WEFT_WORKLOAD", default_value = "unknown")]
    pub workload: String,
    /// Transparent outbound listener (iptables redirects here).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], OUTBOUND_PORT)))]
    pub outbound: SocketAddr,
    /// Transparent inbound listener.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT)))]
    pub inbound: SocketAddr,
    /// Admin server: /live, /ready, /metrics, /config, POST /shutdown.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)))]
    pub admin: SocketAddr,
    /// Probe server: /probe/<port>/<path> is forwarded to the app, for the
    /// probe targets only.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], PROBE_PORT)))]
    pub probe: SocketAddr,
    /// The probes the injector rewrote, `<port>/<path>` (`8080/healthz`) for
    /// HTTP and `tcp:<port>` for TCP: the only requests (GET or HEAD) the
    /// probe server forwards to, or checks on, the app. None: it forwards
    /// nothing.
    #[arg(
        long = "probe-target",
        env = "WEFT_PROBE_TARGETS",
        value_delimiter = ',',
        value_parser = admin::parse_probe_target
    )]
    pub probe_targets: Vec<admin::ProbeTarget>,
    /// Do not bind the transparent listeners (no iptables in front).
    #[arg(long)]
    pub no_transparent: bool,
    /// Explicit outbound listener `LISTEN=TARGET`: connections to LISTEN are
    /// treated as if headed to TARGET (`host:port` of a Service, or `ip:port`).
    #[arg(long = "outbound-map", value_parser = parse_outbound_map)]
    pub outbound_map: Vec<(SocketAddr, Target)>,
    /// Explicit inbound listener `LISTEN=APP_PORT`: forwards to the app on
    /// that port.
    #[arg(long = "inbound-map", value_parser = parse_inbound_map)]
    pub inbound_map: Vec<(SocketAddr, u16)>,
    /// Where the probe server and the explicit inbound listeners reach the
    /// application: in a pod the pod's own address (`WEFT_POD_IP`, from the
    /// downward API), where the kubelet's own probes would go, so an app
    /// bound only to it is reached and a listener bound to localhost is not
    /// exposed. Transparent inbound traffic goes to the address the client
    /// dialled.
    #[arg(long, env = "WEFT_POD_IP", default_value = "127.0.0.1")]
    pub app_ip: IpAddr,
    /// Request paths that are health checks: never retried, never a failure.
    #[arg(long = "health-path", env = "WEFT_HEALTH_PATHS", value_delimiter = ',')]
    pub health_paths: Vec<String>,
    /// How long in-flight requests may take to finish on shutdown.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long to wait for a client's first bytes before treating the
    /// connection as opaque TCP.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// This pod's zone, for zone-aware routing (the injector passes the
    /// pod's `topology.kubernetes.io/zone` label through the downward API;
    /// empty when the cluster does not set it).
    #[arg(long, env = "WEFT_ZONE")]
    pub zone: Option<String>,
    /// This pod's node (`spec.nodeName`): without `--zone`, the zone of a
    /// published endpoint on the same node is this proxy's zone.
    #[arg(long, env = "WEFT_NODE")]
    pub node: Option<String>,
    /// The pod's namespace, whose `weft-proxy-config` is watched through the
    /// API server (default: the service-account namespace file).
    #[arg(long, env = "WEFT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Do not watch the ConfigMap through the API server even when a
    /// service-account token is present.
    #[arg(long)]
    pub no_api_watch: bool,
    /// The mounted identity Secret: `tls.crt`, `tls.key` and `ca.crt`. When
    /// set, the proxy is not ready until an identity for its ServiceAccount
    /// loads.
    #[arg(long, env = "WEFT_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// This pod's ServiceAccount: the only one whose certificate it presents.
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// The mesh trust domain peers must belong to.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// This pod's named container ports, `NAME=PORT`, for AccessPolicy rules
    /// that name ports (the injector passes the pod's ports).
    #[arg(
        long = "port-name",
        env = "WEFT_PORT_NAMES",
        value_delimiter = ',',
        value_parser = parse_port_name
    )]
    pub port_names: Vec<(String, u16)>,
    /// This pod's labels as the downward API writes them (`key="value"`
    /// lines), kept current: a Service's AccessPolicy guards only the pods
    /// its selector picks. Without it every Service guard listing a port
    /// applies to it. The injector mounts it with the token volume.
    #[arg(long, env = "WEFT_POD_LABELS_FILE")]
    pub pod_labels_file: Option<PathBuf>,
    /// Inbound container ports carrying a server-speaks-first or other
    /// non-HTTP protocol (the pod's `weft.dev/opaque-ports`): never held
    /// for HTTP detection.
    #[arg(
        long = "inbound-opaque-ports",
        env = "WEFT_INBOUND_OPAQUE_PORTS",
        value_delimiter = ','
    )]
    pub inbound_opaque_ports: Vec<u16>,
    /// Worker threads (0: one per core).
    #[arg(long, env = "WEFT_PROXY_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Inbound requests waiting for the application's response at most;
    /// past it a request is answered 503 `overloaded` at once.
    #[arg(
        long,
        env = "WEFT_INBOUND_MAX_IN_FLIGHT",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub inbound_max_in_flight: u32,
    /// Outbound requests waiting for a response at most; past it a request
    /// is answered 503 `overloaded` at once.
    #[arg(
        long,
        env = "WEFT_OUTBOUND_MAX_IN_FLIGHT",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub outbound_max_in_flight: u32,
    /// How long a client may take to send a request head on any listener
    /// before its connection is closed (slowloris). hyper runs the same
    /// timer while an HTTP/1 connection waits for its next request, so it
    /// is also the HTTP/1 keep-alive idle limit.
    #[arg(long, env = "WEFT_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP connection on which no request started for this long is
    /// closed gracefully (HTTP/2: GOAWAY); also the HTTP/2 keep-alive ping
    /// interval.
    #[arg(long, env = "WEFT_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections open at once on the inbound listeners, all protocols;
    /// past it a new connection is closed at once and counted. One source
    /// address may hold a quarter of it; past that its new connections are
    /// closed at once and counted too.
    #[arg(
        long,
        env = "WEFT_INBOUND_MAX_CONNECTIONS",
        default_value_t = 4096,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub inbound_max_connections: u32,
    /// Connections open at once on the outbound listeners.
    #[arg(
        long,
        env = "WEFT_OUTBOUND_MAX_CONNECTIONS",
        default_value_t = 4096,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub outbound_max_connections: u32,
    /// Connections open at once on the admin and on the probe listener
    /// (each).
    #[arg(
        long,
        env = "WEFT_ADMIN_MAX_CONNECTIONS",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub admin_max_connections: u32,
    /// Bytes of request bodies held for retry at once, all requests
    /// together (each body at most 64 KiB); past it a request is sent
    /// unbuffered and not retried, and counted in
    /// `weft_proxy_retry_unbuffered_total`.
    #[arg(long, env = "WEFT_RETRY_BUFFER_BYTES", default_value_t = http::retry::DEFAULT_REPLAY_BUDGET)]
    pub retry_buffer_bytes: u64,
    /// Access logs: `json` writes one JSON object per HTTP request on
    /// stdout (see `accesslog`); the injector sets it from the pod's or
    /// its namespace's `weft.dev/access-log` annotation.
    #[arg(long, env = "WEFT_ACCESS_LOG", value_enum, default_value_t = accesslog::Format::Off)]
    pub access_log: accesslog::Format,
    /// Access logs keep the request's query (`keep`) or drop it (`drop`,
    /// the default: queries carry tokens and personal data).
    #[arg(long, env = "WEFT_ACCESS_LOG_QUERY", value_enum, default_value_t = accesslog::Query::Drop)]
    pub access_log_query: accesslog::Query,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crate::api::Duration>()
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

fn parse_port_name(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s
        .split_once('=')
        .ok_or("expected NAME=PORT, such as http=8080")?;
    let port = port
        .parse()
        .map_err(|_| format!("{port:?}: not a port number"))?;
    Ok((name.to_owned(), port))
}

fn parse_outbound_map(s: &str) -> Result<(SocketAddr, Target), String> {
    let (listen, target) = s
        .split_once('=')
        .ok_or("expected LISTEN=TARGET, such as 127.0.0.1:16001=inventory.shop:80")?;
    let listen = listen.parse().map_err(|e| format!("{listen:?}: {e}"))?;
    Ok((listen, Target::parse(target)?))
}

fn parse_inbound_map(s: &str) -> Result<(SocketAddr, u16), String> {
    let (listen, port) = s
        .split_once('=')
        .ok_or("expected LISTEN=APP_PORT, such as 127.0.0.1:16101=8080")?;
    let listen = listen.parse().map_err(|e| format!("{listen:?}: {e}"))?;
    Ok((
        listen,
        port.parse().map_err(|_| format!("{port:?}: not a port"))?,
    ))
}

/// What every connection handler shares.
pub struct Proxy {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<ProxyMetrics>,
    pub shared: Arc<http::Shared>,
    pub drain: Drain,
    pub app_ip: IpAddr,
    /// The pod's probe paths, normalised as requests are before they are
    /// compared (`normalize_path`).
    pub health_paths: Vec<String>,
    /// The probes the probe server forwards; nothing else.
    pub probe_targets: Vec<admin::ProbeTarget>,
    pub detect_timeout: Duration,
    /// Inbound request series by source.
    pub inbound_edges: metrics::EdgeCache,
    /// The source label of callers without a mesh identity.
    pub unknown_source: Arc<str>,
    /// This proxy's mesh identity, when an identity dir is configured.
    pub identity: Option<Arc<tls::MeshIdentity>>,
    /// The server side of mesh TLS (with an identity).
    pub mesh_server: Option<Arc<rustls::ServerConfig>>,
    /// Opens mesh TLS to meshed destinations (with an identity).
    pub originator: Option<Arc<mesh::Originator>>,
    /// This pod's container ports by name.
    pub port_names: authz::PortNames,
    /// This pod's labels, when a labels file is configured and readable.
    pub pod_labels: Arc<arc_swap::ArcSwapOption<authz::PodLabels>>,
    /// Inbound ports that are never held for HTTP detection.
    pub inbound_opaque_ports: Vec<u16>,
    /// Caps on requests waiting for a response, per direction.
    pub inbound_in_flight: Arc<server::InFlight>,
    pub outbound_in_flight: Arc<server::InFlight>,
    /// Time limits on every HTTP connection the proxy serves.
    pub http_limits: server::HttpLimits,
    /// Connection caps, per listener kind.
    pub inbound_connections: Arc<server::ConnLimit>,
    pub outbound_connections: Arc<server::ConnLimit>,
    pub admin_connections: Arc<server::ConnLimit>,
    pub probe_connections: Arc<server::ConnLimit>,
    /// Where access-log lines go, when they are on.
    pub access_log: Option<Arc<accesslog::AccessLog>>,
    /// Spans, when the config turns tracing on ([`trace`]).
    pub tracing: trace::Tracing,
}

impl Proxy {
    /// Begins `req`'s span if the config in force turns tracing on
    /// ([`trace::Tracing::begin`]).
    pub fn trace(
        &self,
        kind: trace::Kind,
        server: impl FnOnce() -> Option<String>,
        req: &mut http::body::Request,
    ) -> Option<trace::Started> {
        let snapshot = self.store.load()?;
        self.tracing.begin(
            snapshot.config.tracing.as_ref(),
            &snapshot.config.namespace,
            kind,
            server,
            req,
        )
    }

    /// Ready: config loaded, listeners bound, and an identity loaded when
    /// one is configured.
    pub fn ready(&self) -> bool {
        self.store.ready() && self.identity.as_ref().is_none_or(|i| i.ready())
    }

    /// Detects a connection's protocol, or takes it as opaque when `skip`
    /// (declared opaque, or a server-speaks-first port). `None`: the client
    /// went away first.
    pub async fn detect(
        &self,
        conn: tokio::net::TcpStream,
        skip: bool,
    ) -> Option<(detect::Protocol, detect::PrefixedIo<tokio::net::TcpStream>)> {
        if skip {
            return Some((
                detect::Protocol::Opaque,
                detect::PrefixedIo::new(Default::default(), conn),
            ));
        }
        match detect::detect(conn, self.detect_timeout).await {
            Ok(d) => {
                if d.timed_out {
                    self.metrics.detect_timeouts.inc();
                }
                Some((d.protocol, d.io))
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection failed before its protocol was known");
                None
            }
        }
    }

    pub fn new(args: &ProxyArgs) -> anyhow::Result<Arc<Self>> {
        Self::build(args, None)
    }

    /// A proxy whose access-log lines (when `--access-log` asks for them)
    /// go to `out` instead of stdout: tests read them back.
    pub fn with_access_log_to(
        args: &ProxyArgs,
        out: Box<dyn std::io::Write + Send>,
    ) -> anyhow::Result<Arc<Self>> {
        Self::build(args, Some(out))
    }

    fn build(
        args: &ProxyArgs,
        access_log_to: Option<Box<dyn std::io::Write + Send>>,
    ) -> anyhow::Result<Arc<Self>> {
        if args.header_read_timeout <= http::pool::IDLE_TIMEOUT {
            tracing::warn!(
                header_read_timeout = ?args.header_read_timeout,
                "--header-read-timeout is this proxy's HTTP/1 keep-alive limit, and client proxies hand an idle mesh connection a request for up to {:?}: below that, a request can be written onto a connection this proxy is closing; keep it above",
                http::pool::IDLE_TIMEOUT
            );
        }
        let metrics = Arc::new(ProxyMetrics::new());
        let identity = args
            .identity_dir
            .as_ref()
            .map(|_| tls::MeshIdentity::new(&args.trust_domain, metrics.tls_rejections.clone()));
        let mesh_server = identity
            .as_ref()
            .map(|i| i.server_config())
            .transpose()
            .context("building the mesh TLS server configuration")?;
        let originator = identity
            .as_ref()
            .map(|i| Arc::new(mesh::Originator::new(i.clone(), metrics.clone())));
        Ok(Arc::new(Self {
            store: Arc::new(
                ConfigStore::new(
                    metrics.clone(),
                    destination::Locality::new(args.zone.clone(), args.node.clone()),
                )
                .credentials_in(args.identity_dir.clone())
                .service_account(&args.service_account),
            ),
            shared: Arc::new(http::Shared {
                metrics: metrics.clone(),
                pool: http::pool::Pool::new(originator.clone()),
                workload: args.workload.clone(),
                replay_budget: http::retry::ReplayBudget::new(args.retry_buffer_bytes),
            }),
            drain: Drain::new(),
            app_ip: args.app_ip,
            health_paths: args
                .health_paths
                .iter()
                .map(|p| http::route::normalize_path(p).into_owned())
                .collect(),
            probe_targets: {
                let mut t = args.probe_targets.clone();
                t.sort_unstable();
                t.dedup();
                t
            },
            detect_timeout: args.detect_timeout,
            inbound_edges: metrics::EdgeCache::default(),
            unknown_source: Arc::from("unknown"),
            identity,
            mesh_server,
            originator,
            port_names: authz::PortNames::new(args.port_names.iter().cloned()),
            pod_labels: Arc::default(),
            inbound_opaque_ports: args.inbound_opaque_ports.clone(),
            inbound_in_flight: in_flight(&metrics, Direction::Inbound, args.inbound_max_in_flight),
            outbound_in_flight: in_flight(
                &metrics,
                Direction::Outbound,
                args.outbound_max_in_flight,
            ),
            http_limits: server::HttpLimits {
                header_read_timeout: args.header_read_timeout,
                idle_timeout: args.idle_timeout,
            },
            inbound_connections: inbound_conn_limit(&metrics, args.inbound_max_connections),
            outbound_connections: conn_limit(&metrics, "outbound", args.outbound_max_connections),
            admin_connections: conn_limit(&metrics, "admin", args.admin_max_connections),
            probe_connections: conn_limit(&metrics, "probe", args.admin_max_connections),
            access_log: access_log(args, &metrics, access_log_to)?,
            tracing: trace::Tracing::new(&args.workload, metrics.trace.clone()),
            metrics,
        }))
    }
}

/// The access-log sink `--access-log` asks for. Outbound lines name this
/// pod by the identity it presents (its workload without one).
fn access_log(
    args: &ProxyArgs,
    metrics: &ProxyMetrics,
    out: Option<Box<dyn std::io::Write + Send>>,
) -> anyhow::Result<Option<Arc<accesslog::AccessLog>>> {
    if args.access_log == accesslog::Format::Off {
        return Ok(None);
    }
    let local: Arc<str> = match (&args.identity_dir, &args.namespace) {
        (Some(_), Some(ns)) => Arc::from(format!(
            "spiffe://{}/ns/{ns}/sa/{}",
            args.trust_domain, args.service_account
        )),
        _ => Arc::from(args.workload.as_str()),
    };
    let log = accesslog::AccessLog::to_writer(
        out.unwrap_or_else(|| Box::new(std::io::stdout())),
        local,
        Arc::from(args.workload.as_str()),
        args.access_log_query == accesslog::Query::Keep,
        metrics.access_log_dropped.clone(),
    )
    .context("starting the access-log writer")?;
    Ok(Some(Arc::new(log)))
}

fn conn_limit(
    metrics: &ProxyMetrics,
    listener: &'static str,
    limit: u32,
) -> Arc<server::ConnLimit> {
    let refused = metrics
        .connections_over_limit
        .get_or_create(&metrics::ListenerLabels { listener })
        .clone();
    server::ConnLimit::new(limit as usize, refused)
}

/// The inbound cap, of which one source address holds at most a share
/// ([`server::SourceShare::of`]): inbound callers are other pods, and one
/// of them must not take every slot. Not on the other listeners, where
/// every connection comes from one source by design (outbound: the app;
/// admin and probe: the kubelet and Prometheus).
fn inbound_conn_limit(metrics: &ProxyMetrics, limit: u32) -> Arc<server::ConnLimit> {
    let labels = metrics::ListenerLabels {
        listener: "inbound",
    };
    let refused = metrics
        .connections_over_limit
        .get_or_create(&labels)
        .clone();
    let over_share = metrics
        .connections_over_source_share
        .get_or_create(&labels)
        .clone();
    server::ConnLimit::with_source_share(limit as usize, refused, over_share)
}

fn in_flight(metrics: &ProxyMetrics, direction: Direction, limit: u32) -> Arc<server::InFlight> {
    let flag = match direction {
        Direction::Inbound => "inbound-max-in-flight",
        Direction::Outbound => "outbound-max-in-flight",
    };
    let shed = metrics
        .requests_shed
        .get_or_create(&metrics::DirectionLabels { direction })
        .clone();
    server::InFlight::new(direction.as_str(), flag, limit as usize, shed)
}

/// Raises the soft limit on open files to the hard limit, and returns both
/// limits as they are then. Every proxied connection holds two descriptors
/// (the client's and the upstream's), and container runtimes differ in the
/// soft limit they hand a container: containerd 2 leaves the kernel's 1024,
/// which a proxy with 500 connections would exhaust. Go programs raise it
/// themselves at start; this is the same for the proxy.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

/// Runs the proxy until SIGTERM/SIGINT or `POST /shutdown`, then drains.
pub fn main(args: ProxyArgs) -> anyhow::Result<()> {
    match raise_open_files_limit() {
        Ok((soft, _)) if soft < 16_384 => tracing::warn!(
            limit = soft,
            "the open-files limit is low for a proxy (two per proxied connection); \
             raise the container runtime's RLIMIT_NOFILE"
        ),
        Ok((soft, _)) => tracing::debug!(limit = soft, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    // One worker is an event loop on this thread, as nginx runs one: no
    // work stealing, no cross-thread wake-ups on the data path.
    let mut rt = match args.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b
        }
    };
    let rt = rt.enable_all().thread_name("weft-proxy").build()?;
    rt.block_on(async move {
        let proxy = Proxy::new(&args)?;
        let running = start(&args, proxy.clone()).await?;
        wait_for_signal(&proxy).await?;
        proxy.drain.start();
        drop(running);
        let left = proxy.drain.wait(args.drain_timeout).await;
        if left > 0 {
            tracing::warn!(
                left,
                "drain timeout passed; closing the remaining connections"
            );
        } else {
            tracing::info!("drained");
        }
        // The drained requests' access-log lines, out before the process.
        if let Some(log) = proxy.access_log.clone() {
            let _ = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2))).await;
        }
        Ok(())
    })
}

/// Handles of a started proxy; the listeners run as tasks.
pub struct Running {
    pub admin: SocketAddr,
    pub probe: SocketAddr,
    pub outbound: Vec<SocketAddr>,
    pub inbound: Vec<SocketAddr>,
}

/// Loads the config (if present), binds every listener and starts serving.
pub async fn start(args: &ProxyArgs, proxy: Arc<Proxy>) -> anyhow::Result<Running> {
    if watch::effective_path(&args.config).exists()
        && let Err(why) = watch::load_file(&args.config, &proxy.store)
    {
        proxy.store.record_failure(&why);
    }
    tokio::spawn(watch::watch_file(args.config.clone(), proxy.store.clone()));
    let endpoints = args
        .endpoints
        .clone()
        .unwrap_or_else(|| args.config.with_file_name(crate::config::ENDPOINTS_KEY));
    if watch::effective_path(&endpoints).exists()
        && let Err(why) = watch::load_endpoints_file(&endpoints, &proxy.store)
    {
        proxy.store.record_failure(&why);
    }
    tokio::spawn(watch::watch_endpoints_file(endpoints, proxy.store.clone()));
    if let Some(path) = &args.pod_labels_file {
        watch::load_labels(path, &proxy.pod_labels);
        tokio::spawn(watch::watch_labels(path.clone(), proxy.pod_labels.clone()));
    }
    if let (Some(dir), Some(identity)) = (&args.identity_dir, &proxy.identity) {
        tokio::spawn(watch::watch_identity(
            dir.clone(),
            args.service_account.clone(),
            identity.clone(),
            proxy.metrics.clone(),
        ));
    }
    if !args.no_api_watch
        && let Some(ns) = apiwatch::pod_namespace(args.namespace.as_deref())
        && let Some(client) = apiwatch::in_cluster_client().await
    {
        tokio::spawn(apiwatch::watch_endpoints(
            client.clone(),
            ns.clone(),
            proxy.store.clone(),
        ));
        tokio::spawn(apiwatch::watch_configmap(client, ns, proxy.store.clone()));
    }

    let admin = bind_families(args.admin, "admin").await?;
    let probe = bind_families(args.probe, "probe").await?;
    let mut running = Running {
        admin: admin[0].local_addr()?,
        probe: probe[0].local_addr()?,
        outbound: Vec::new(),
        inbound: Vec::new(),
    };
    for l in admin {
        tokio::spawn(admin::serve(
            l,
            admin::admin_router(proxy.clone()),
            proxy.http_limits,
            proxy.admin_connections.clone(),
        ));
    }

    if !args.no_transparent {
        let outbound = bind_families(args.outbound, "outbound").await?;
        let inbound = bind_families(args.inbound, "inbound").await?;
        // The transparent ports as bound: a connection addressed to one of
        // them came to the proxy itself (from outside the pod, the inbound
        // redirect sends it to 15106 with 15101 or 15106 as its original
        // port; from the app, loopback is not redirected). Relaying it would
        // loop it back into the proxy: it is refused.
        let mut own: Vec<u16> = Vec::new();
        for l in outbound.iter().chain(&inbound) {
            own.push(l.local_addr()?.port());
        }
        let own: Arc<[u16]> = own.into();
        for l in outbound {
            running.outbound.push(l.local_addr()?);
            let own = own.clone();
            serve_listener(
                l,
                &proxy,
                &proxy.outbound_connections,
                move |p, conn, peer| {
                    let own = own.clone();
                    async move {
                        match orig_dst::original_dst(&conn) {
                            // No NAT happened (the original destination is this very
                            // socket: the app dialled the proxy's port, on
                            // loopback or on the pod's own address, which is
                            // not redirected), or loopback to a port of ours.
                            Ok(dst)
                                if conn.local_addr().ok() == Some(dst)
                                    || (dst.ip().is_loopback() && own.contains(&dst.port())) =>
                            {
                                refuse_own_port(&p, Direction::Outbound, peer, dst)
                            }
                            Ok(dst) => outbound::serve(p, conn, Target::Addr(dst)).await,
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "outbound connection without an original destination (is the iptables redirect installed?)")
                            }
                        }
                    }
                },
            );
        }
        for l in inbound {
            running.inbound.push(l.local_addr()?);
            let own = own.clone();
            serve_listener(
                l,
                &proxy,
                &proxy.inbound_connections,
                move |p, conn, peer| {
                    let own = own.clone();
                    async move {
                        match orig_dst::original_dst(&conn) {
                            Ok(dst) if own.contains(&dst.port()) => {
                                refuse_own_port(&p, Direction::Inbound, peer, dst)
                            }
                            // To the app at the address the client dialled, the
                            // pod's own, never 127.0.0.1: a listener the app
                            // bound to localhost stays private to the pod (as
                            // Istio does since 1.10), and an app bound only to
                            // the pod's address is reached.
                            Ok(dst) => inbound::serve(p, conn, peer, dst).await,
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "inbound connection without an original destination")
                            }
                        }
                    }
                },
            );
        }
    }
    for (listen, target) in &args.outbound_map {
        let l = bind(*listen, "explicit outbound").await?;
        running.outbound.push(l.local_addr()?);
        let target = target.clone();
        serve_listener(l, &proxy, &proxy.outbound_connections, move |p, conn, _| {
            outbound::serve(p, conn, target.clone())
        });
    }
    for (listen, app_port) in &args.inbound_map {
        let l = bind(*listen, "explicit inbound").await?;
        running.inbound.push(l.local_addr()?);
        let app = SocketAddr::new(args.app_ip, *app_port);
        serve_listener(
            l,
            &proxy,
            &proxy.inbound_connections,
            move |p, conn, peer| inbound::serve(p, conn, peer, app),
        );
    }
    // The probe server never forwards to the proxy's own ports: as given
    // and as bound (a port 0 becomes a real one).
    let mut own_ports: Vec<u16> = [args.admin, args.probe, args.outbound, args.inbound]
        .into_iter()
        .chain(args.outbound_map.iter().map(|(l, _)| *l))
        .chain(args.inbound_map.iter().map(|(l, _)| *l))
        .chain([running.admin, running.probe])
        .chain(running.outbound.iter().copied())
        .chain(running.inbound.iter().copied())
        .map(|a| a.port())
        .filter(|p| *p != 0)
        .collect();
    own_ports.sort_unstable();
    own_ports.dedup();
    for t in &proxy.probe_targets {
        if own_ports.contains(&t.port) {
            tracing::warn!(probe = %t, "probe target names a port of the proxy itself; it is never forwarded");
        }
    }
    let probe_router = admin::probe_router(proxy.clone(), own_ports);
    for l in probe {
        tokio::spawn(admin::serve(
            l,
            probe_router.clone(),
            proxy.http_limits,
            proxy.probe_connections.clone(),
        ));
    }
    proxy.store.set_listening();
    tracing::info!(admin = %running.admin, "proxy listening");
    Ok(running)
}

/// Closes a connection addressed to one of the proxy's own transparent
/// ports, and counts it.
fn refuse_own_port(proxy: &Proxy, direction: Direction, peer: SocketAddr, dst: SocketAddr) {
    proxy
        .metrics
        .refused_own_port
        .get_or_create(&metrics::DirectionLabels { direction })
        .inc();
    tracing::debug!(%peer, %dst, ?direction, "refused: addressed to the proxy's own port");
}

/// Accepts on `listener` until shutdown, handing connections to `handle`.
fn serve_listener<F, Fut>(
    listener: TcpListener,
    proxy: &Arc<Proxy>,
    limit: &Arc<server::ConnLimit>,
    handle: F,
) where
    F: Fn(Arc<Proxy>, tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let p = proxy.clone();
    tokio::spawn(server::accept_loop(
        listener,
        proxy.drain.clone(),
        limit.clone(),
        move |conn, peer| handle(p.clone(), conn, peer),
    ));
}

/// Binds `addr`; for the IPv4 wildcard (every default listener) also the
/// IPv6 wildcard on the same port, IPv6 only, so a dual-stack or IPv6 pod
/// is served on both families (`weft init` redirects IPv6 to the same
/// ports). Where the pod has no IPv6 at all the second bind fails, which
/// is logged and harmless: nothing can arrive over IPv6 there.
async fn bind_families(addr: SocketAddr, what: &str) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = vec![bind(addr, what).await?];
    if addr.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        // The port actually bound, should `addr` have asked for any.
        let port = listeners[0].local_addr()?.port();
        match bind_v6_only(port) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                tracing::info!(what, port, error = %e, "no IPv6 listener (the pod has no IPv6)")
            }
        }
    }
    Ok(listeners)
}

/// `[::]:port` with `IPV6_V6ONLY`, so it does not collide with the IPv4
/// listener on the same port (Linux's `net.ipv6.bindv6only` is 0).
fn bind_v6_only(port: u16) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)
        .map_err(std::io::Error::from)?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))?;
    socket.listen(1024)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

async fn wait_for_signal(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stop = proxy.drain.watch();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
        _ = server::stopped(&mut stop) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        // One below the hard limit: lowered, but not so far that the other
        // tests running in this process could run out.
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).expect("lower the soft limit");
        assert_eq!(
            super::raise_open_files_limit().expect("raise"),
            (hard, hard)
        );
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit"),
            (hard, hard)
        );
    }
}
