//! `weft stat`, `weft edges`, `weft top`: the control plane's stats API
//! ([`crate::meshstats`]) as tables, read through the API server's service
//! proxy with the kubeconfig's credentials: no port-forward, and nothing
//! opened beyond the control plane's admin port (the caller needs `get` on
//! `services/proxy` in the control plane's namespace).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::meshstats::{EdgeRow, Signals, StatsView, WorkloadRow};

/// The control plane's Service that carries its admin port.
pub const STATS_SERVICE: &str = "weft-control-plane-metrics";

#[derive(clap::Args, Debug, Clone)]
pub struct StatArgs {
    /// Only edges to a destination (Service `name.ns:port`, or workload for
    /// `weft stat`) containing this.
    #[arg(long)]
    pub to: Option<String>,
    /// Only edges from a caller workload or namespace containing this
    /// (`weft stat`: workloads of a namespace containing this).
    #[arg(long)]
    pub from: Option<String>,
    /// The span the figures cover: seconds (`60`, `60s`) or minutes (`5m`),
    /// at most 10m.
    #[arg(long, default_value = "60s")]
    pub window: String,
    /// Order of the rows.
    #[arg(long, value_enum, default_value_t = Sort::Name)]
    pub sort: Sort,
    /// `table`, or `json` (the stats API's answer, filtered).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print again every 10 s (the stats' resolution) until interrupted.
    #[arg(short, long)]
    pub watch: bool,
    /// The control plane's namespace.
    #[arg(long, default_value = "weft-system")]
    pub control_plane_namespace: String,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Namespace, caller, destination, route.
    Name,
    /// Busiest first.
    Rps,
    /// Slowest p99 first.
    P99,
    /// Lowest success rate first.
    Success,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// Which table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Per workload, as its own sidecars count (`weft stat`).
    Workloads,
    /// Per edge (`weft edges`, `weft top`).
    Edges,
}

/// The path of the stats API through the API server's service proxy
/// (`/api/v1/namespaces/NS/services/NAME:PORT/proxy/PATH`, Kubernetes'
/// "Manually constructing apiserver proxy URLs").
pub fn proxy_path(namespace: &str, window: &str) -> String {
    format!(
        "/api/v1/namespaces/{namespace}/services/{STATS_SERVICE}:admin/proxy/api/{}/stats?window={window}",
        crate::meshstats::API_VERSION
    )
}

/// Reads the stats through `client`'s API server.
pub async fn fetch(client: &kube::Client, args: &StatArgs) -> anyhow::Result<StatsView> {
    crate::meshstats::parse_window(&args.window).map_err(anyhow::Error::msg)?;
    let path = proxy_path(&args.control_plane_namespace, &args.window);
    let req = http::Request::get(&path)
        .body(Vec::new())
        .context("building the request")?;
    let text = match client.request_text(req).await {
        Ok(text) => text,
        Err(kube::Error::Api(e)) if e.code == 403 => bail!(
            "the API server refused GET {path}: {}; the stats are read through the service \
             proxy, so your user needs `get` on `services/proxy` in namespace {}",
            e.message,
            args.control_plane_namespace
        ),
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 503) => bail!(
            "the control plane's stats API is not reachable ({}: {}); is weft installed in \
             namespace {} and its pods ready (`kubectl -n {} get pods`)? Use \
             --control-plane-namespace for another namespace",
            e.code,
            e.message,
            args.control_plane_namespace,
            args.control_plane_namespace
        ),
        Err(e) => return Err(e).with_context(|| format!("GET {path}")),
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "the stats API answered something that is not stats {}: {}",
            crate::meshstats::API_VERSION,
            text.chars().take(200).collect::<String>()
        )
    })
}

/// Keeps the rows `args` asks for, in its order.
pub fn filter(mut view: StatsView, args: &StatArgs) -> StatsView {
    let contains =
        |field: &str, want: &Option<String>| want.as_deref().is_none_or(|w| field.contains(w));
    let edge = |namespace: &str, src: &str, dst: &str| {
        contains(dst, &args.to) && (contains(src, &args.from) || contains(namespace, &args.from))
    };
    view.edges.retain(|e| edge(&e.namespace, &e.src, &e.dst));
    view.destinations
        .retain(|d| edge(&d.namespace, &d.src, &d.dst));
    view.workloads
        .retain(|w| contains(&w.workload, &args.to) && contains(&w.namespace, &args.from));
    sort(&mut view.edges, |e| &e.signals, args.sort);
    sort(&mut view.destinations, |d| &d.signals, args.sort);
    sort(&mut view.workloads, |w| &w.signals, args.sort);
    view
}

/// Orders `rows` by their signals (`Name` keeps the API's order).
fn sort<T>(rows: &mut [T], signals: impl Fn(&T) -> &Signals, by: Sort) {
    let key = |row: &T| -> f64 {
        let s = signals(row);
        match by {
            Sort::Name => 0.0,
            // Largest first: sorted by the negated value.
            Sort::Rps => -s.rps,
            Sort::P99 => -s.p99_ms.unwrap_or(-1.0),
            // Lowest first; none measured last.
            Sort::Success => s.success_rate.unwrap_or(f64::INFINITY),
        }
    };
    if by != Sort::Name {
        rows.sort_by(|a, b| key(a).total_cmp(&key(b)));
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.1}ms"))
}

/// The circuit as the caller's proxies see it: `closed`, `OPEN 2/3`,
/// `half-open 1/3`.
fn circuit(e: &EdgeRow) -> String {
    let c = e.resilience.circuit;
    let all = c.closed + c.open + c.half_open;
    if all == 0 {
        "-".to_owned()
    } else if c.open > 0 {
        format!("OPEN {}/{all}", c.open)
    } else if c.half_open > 0 {
        format!("half-open {}/{all}", c.half_open)
    } else {
        "closed".to_owned()
    }
}

/// The edges table (`weft edges`, `weft top`).
pub fn render_edges(view: &StatsView) -> String {
    header(view) + &edges_table(view)
}

/// The workloads table (`weft stat`).
pub fn render_workloads(view: &StatsView) -> String {
    header(view) + &workloads_table(view)
}

/// The edges table's rows, without the header line (`weft local status`
/// prints its own).
pub fn edges_table(view: &StatsView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<40} {:<24} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>8} {:>13}",
        "NAMESPACE",
        "CALLER -> DESTINATION",
        "ROUTE",
        "RPS",
        "SUCCESS",
        "P50",
        "P99",
        "MTLS",
        "SPLIT",
        "RETRY/S",
        "CIRCUIT"
    );
    for e in &view.edges {
        let _ = writeln!(
            out,
            "{:<12} {:<40} {:<24} {:>8.1} {:>8} {:>9} {:>9} {:>6} {:>6} {:>8.2} {:>13}",
            e.namespace,
            format!("{} -> {}", e.src, e.dst),
            e.route,
            e.signals.rps,
            pct(e.signals.success_rate),
            ms(e.signals.p50_ms),
            ms(e.signals.p99_ms),
            pct(e.signals.mtls_share),
            pct(e.split_share),
            e.resilience.retries_per_second,
            circuit(e),
        );
    }
    if view.edges.is_empty() {
        out.push_str("(no edge carried requests in the window)\n");
    }
    out
}

/// The workloads table's rows, without the header line.
pub fn workloads_table(view: &StatsView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<32} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>6}",
        "NAMESPACE", "WORKLOAD", "RPS", "SUCCESS", "P50", "P95", "P99", "MTLS", "SHED"
    );
    for w in &view.workloads {
        let WorkloadRow {
            namespace,
            workload,
            signals:
                Signals {
                    rps,
                    success_rate,
                    p50_ms,
                    p95_ms,
                    p99_ms,
                    mtls_share,
                    ..
                },
            shed,
            ..
        } = w;
        let _ = writeln!(
            out,
            "{namespace:<12} {workload:<32} {rps:>8.1} {:>8} {:>9} {:>9} {:>9} {:>6} {shed:>6}",
            pct(*success_rate),
            ms(*p50_ms),
            ms(*p95_ms),
            ms(*p99_ms),
            pct(*mtls_share),
        );
    }
    if view.workloads.is_empty() {
        out.push_str("(no workload served requests in the window)\n");
    }
    out
}

fn header(view: &StatsView) -> String {
    let mut out = format!(
        "over the last {:.0}s: {} proxies read",
        view.window_seconds, view.proxies
    );
    if view.unreadable > 0 {
        let _ = write!(
            out,
            ", {} unreadable (too slow or too large)",
            view.unreadable
        );
    }
    out.push_str("\n\n");
    out
}

/// Runs `f` with a client of the kubeconfig's (or in-cluster) cluster, on
/// a runtime of its own: the CLI commands that read a cluster.
pub fn with_cluster<T, F: std::future::Future<Output = anyhow::Result<T>>>(
    f: impl FnOnce(kube::Client) -> F,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("no cluster to read from: kube config or in-cluster credentials")?;
        f(client).await
    })
}

/// Runs `weft stat` / `edges` / `top`.
pub fn main(table: Table, args: &StatArgs) -> anyhow::Result<std::process::ExitCode> {
    with_cluster(|client| async move {
        loop {
            let view = filter(fetch(&client, args).await?, args);
            let text = match args.output {
                Output::Json => serde_json::to_string_pretty(&view)? + "\n",
                Output::Table => match table {
                    Table::Edges => render_edges(&view),
                    Table::Workloads => render_workloads(&view),
                },
            };
            if args.watch && args.output == Output::Table {
                // Clear the terminal and draw again, as `watch` does.
                print!("\x1b[2J\x1b[H{text}");
            } else {
                print!("{text}");
            }
            if !args.watch {
                return Ok(std::process::ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshstats::{Circuits, Resilience};

    fn edge(src: &str, dst: &str, rps: f64, success: f64, p99: f64) -> EdgeRow {
        EdgeRow {
            namespace: "shop".into(),
            src: src.into(),
            dst: dst.into(),
            route: "default".into(),
            signals: Signals {
                requests: (rps * 60.0) as u64,
                rps,
                success_rate: Some(success),
                p50_ms: Some(p99 / 4.0),
                p95_ms: Some(p99 / 2.0),
                p99_ms: Some(p99),
                mtls_share: Some(1.0),
            },
            split_share: None,
            resilience: Resilience {
                retries_per_second: 0.0,
                retry_budget_exhausted: 0,
                rate_limited: 0,
                circuit_rejected: 0,
                cache_hits: 0,
                cache_misses: 0,
                circuit: Circuits {
                    closed: 1,
                    ..Circuits::default()
                },
            },
        }
    }

    fn args(extra: &[&str]) -> StatArgs {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: StatArgs,
        }
        Cli::parse_from(std::iter::once("weft").chain(extra.iter().copied())).a
    }

    fn view() -> StatsView {
        StatsView {
            version: "v1".into(),
            window_seconds: 60.0,
            ticks: 6,
            proxies: 5,
            unreadable: 1,
            edges: vec![
                edge("cart", "inventory.shop:80", 50.0, 1.0, 8.0),
                edge("checkout", "payments.shop:80", 20.0, 0.7, 900.0),
                edge("shopper", "checkout.shop:80", 80.0, 0.99, 40.0),
            ],
            destinations: Vec::new(),
            workloads: Vec::new(),
        }
    }

    #[test]
    fn filters_and_sorts_pick_the_failing_edge_first() {
        let worst = filter(view(), &args(&["--sort", "success"]));
        assert_eq!(worst.edges[0].dst, "payments.shop:80");
        let busiest = filter(view(), &args(&["--sort", "rps"]));
        assert_eq!(busiest.edges[0].src, "shopper");
        let to = filter(view(), &args(&["--to", "payments"]));
        assert_eq!(to.edges.len(), 1);
        let from = filter(view(), &args(&["--from", "cart"]));
        assert_eq!(from.edges[0].dst, "inventory.shop:80");
    }

    #[test]
    fn the_table_shows_numbers_and_an_open_circuit() {
        let mut v = view();
        v.edges[1].resilience.circuit = Circuits {
            closed: 1,
            open: 2,
            half_open: 0,
        };
        let text = render_edges(&v);
        assert!(text.contains("5 proxies read, 1 unreadable"), "{text}");
        let line = text
            .lines()
            .find(|l| l.contains("checkout -> payments.shop:80"))
            .expect("the edge");
        assert!(line.contains("70.0%") && line.contains("900.0ms"), "{line}");
        assert!(line.contains("OPEN 2/3"), "{line}");
    }

    #[test]
    fn the_path_goes_through_the_service_proxy() {
        assert_eq!(
            proxy_path("weft-system", "60s"),
            "/api/v1/namespaces/weft-system/services/weft-control-plane-metrics:admin/proxy/api/v1/stats?window=60s"
        );
    }
}
