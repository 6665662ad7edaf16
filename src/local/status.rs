//! `weft local status`: the service graph as the sidecars count it. Every
//! proxy's admin `/metrics` is scraped; outbound series give each edge
//! (client workload → Service) its rate, success rate, retries, latency and
//! — for a split route — its share; inbound series give each workload's own
//! view, so an injected failure rate shows on the server while the client,
//! behind its retries, barely sees it. The tables are the cluster's (`weft
//! edges`, `weft stat`), drawn from the stats API's window
//! ([`crate::meshstats::MeshStats`]) over the pictures taken; the totals
//! since start ([`View::edges`]) are for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

pub use crate::promtext::{Sample, parse_metrics};

/// Requests and latency of one edge or workload: the stats API's own
/// counts ([`crate::meshstats::Requests`]).
pub use crate::meshstats::Requests as Counts;

/// Everything one scrape of every proxy says, summed over replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// (client workload, destination, route).
    pub edges: BTreeMap<(String, String, String), Counts>,
    /// (client workload, destination).
    pub retries: BTreeMap<(String, String), f64>,
    /// (client workload, destination): answered by the client's response
    /// cache without asking the destination.
    pub cache_hits: BTreeMap<(String, String), f64>,
    /// Server workload, as its inbound proxies count.
    pub servers: BTreeMap<String, Counts>,
}

impl Snapshot {
    /// Adds one proxy's metrics, read as the stats API reads them
    /// ([`crate::meshstats::ProxyCounts`]); `workload` is whose sidecar
    /// it is.
    pub fn add(&mut self, workload: &str, samples: &[Sample]) {
        let counts = crate::meshstats::ProxyCounts::from_samples("", samples);
        for (k, r) in counts.edges {
            self.edges
                .entry((workload.to_owned(), k.dst, k.route))
                .or_default()
                .add(&r);
        }
        for (k, d) in counts.dsts {
            *self
                .retries
                .entry((workload.to_owned(), k.dst.clone()))
                .or_default() += d.retries;
            *self
                .cache_hits
                .entry((workload.to_owned(), k.dst))
                .or_default() += d.cache_hits;
        }
        for r in counts.inbound.values() {
            self.servers.entry(workload.to_owned()).or_default().add(r);
        }
    }
}

/// One edge of the status table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeRow {
    pub src: String,
    pub dst: String,
    pub route: String,
    /// Since start.
    pub requests: u64,
    /// Since start: not 5xx, not failed.
    pub succeeded: u64,
    /// Over the refresh window (0 on the first picture).
    pub rps: f64,
    /// Over the refresh window when it saw traffic, else since start.
    pub success_rate: Option<f64>,
    pub retries: u64,
    /// Since start: answered by the client's response cache, which
    /// `requests` (what reached the destination) does not count.
    pub cache_hits: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// For a route that splits: this destination's share of the route's
    /// requests from this client.
    pub share: Option<f64>,
}

/// One workload's own (inbound) view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerRow {
    pub workload: String,
    pub requests: u64,
    pub succeeded: u64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct View {
    pub pods: usize,
    pub reachable: usize,
    pub edges: Vec<EdgeRow>,
    pub servers: Vec<ServerRow>,
    /// The stats API's view of the same proxies (what `weft edges -o
    /// json` gives in a cluster): the tables are drawn from it.
    pub stats: crate::meshstats::StatsView,
}

/// The table rows: totals since start, rates, success and latency over the
/// window since `earlier` (taken `seconds` before) when there is one and it
/// saw traffic, otherwise since start.
pub fn view(now: &Snapshot, earlier: Option<&Snapshot>, seconds: f64) -> Vec<EdgeRow> {
    let mut route_totals: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for ((src, _, route), c) in &now.edges {
        *route_totals.entry((src, route)).or_default() += c.requests;
    }
    let split_routes: BTreeMap<(&str, &str), usize> = now
        .edges
        .keys()
        .filter(|(_, _, r)| r != "default")
        .fold(BTreeMap::new(), |mut m, (s, _, r)| {
            *m.entry((s.as_str(), r.as_str())).or_default() += 1;
            m
        });
    now.edges
        .iter()
        .map(|((src, dst, route), c)| {
            let window = windowed(
                c,
                earlier.and_then(|e| e.edges.get(&(src.clone(), dst.clone(), route.clone()))),
            );
            let total = route_totals[&(src.as_str(), route.as_str())];
            let splits = split_routes
                .get(&(src.as_str(), route.as_str()))
                .copied()
                .unwrap_or(0);
            EdgeRow {
                src: src.clone(),
                dst: dst.clone(),
                route: route.clone(),
                requests: c.requests as u64,
                succeeded: c.succeeded as u64,
                rps: rate(
                    c,
                    earlier.and_then(|e| e.edges.get(&(src.clone(), dst.clone(), route.clone()))),
                    seconds,
                ),
                success_rate: ratio(window.succeeded, window.requests),
                retries: now
                    .retries
                    .get(&(src.clone(), dst.clone()))
                    .copied()
                    .unwrap_or(0.0) as u64,
                cache_hits: now
                    .cache_hits
                    .get(&(src.clone(), dst.clone()))
                    .copied()
                    .unwrap_or(0.0) as u64,
                p50_ms: window.quantile(0.5),
                p99_ms: window.quantile(0.99),
                share: (route != "default" && splits > 1)
                    .then(|| ratio(c.requests, total))
                    .flatten(),
            }
        })
        .collect()
}

pub fn server_view(now: &Snapshot, earlier: Option<&Snapshot>, seconds: f64) -> Vec<ServerRow> {
    now.servers
        .iter()
        .map(|(workload, c)| {
            let before = earlier.and_then(|e| e.servers.get(workload));
            let window = windowed(c, before);
            ServerRow {
                workload: workload.clone(),
                requests: c.requests as u64,
                succeeded: c.succeeded as u64,
                rps: rate(c, before, seconds),
                success_rate: ratio(window.succeeded, window.requests),
                p50_ms: window.quantile(0.5),
                p99_ms: window.quantile(0.99),
            }
        })
        .collect()
}

fn windowed(now: &Counts, before: Option<&Counts>) -> Counts {
    match before {
        Some(b) if now.requests > b.requests => now.since(b),
        _ => now.clone(),
    }
}

fn rate(now: &Counts, before: Option<&Counts>, seconds: f64) -> f64 {
    match before {
        Some(b) if seconds > 0.0 => ((now.requests - b.requests) / seconds).max(0.0),
        None if seconds > 0.0 => 0.0,
        _ => 0.0,
    }
}

fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole)
}

/// The tables, as `weft local status` prints them: the same rendering
/// as `weft edges` and `weft stat` in a cluster, over the same kind of
/// window (`stats`).
pub fn render(view: &View) -> String {
    let s = &view.stats;
    format!(
        "weft local: {} pods, {} answering; over the last {:.0}s\n\n{}\n{}",
        view.pods,
        view.reachable,
        s.window_seconds,
        crate::statcli::edges_table(s),
        crate::statcli::workloads_table(s)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy_text(dst: &str, route: &str, ok: u32, failed: u32, retries: u32) -> String {
        format!(
            "weft_proxy_requests_total{{direction=\"outbound\",src=\"w\",dst=\"{dst}\",route=\"{route}\",status_class=\"2xx\",tls=\"true\"}} {ok}\n\
             weft_proxy_requests_total{{direction=\"outbound\",src=\"w\",dst=\"{dst}\",route=\"{route}\",status_class=\"5xx\",tls=\"true\"}} {failed}\n\
             weft_proxy_request_duration_ms_bucket{{direction=\"outbound\",src=\"w\",dst=\"{dst}\",route=\"{route}\",le=\"1.0\"}} {ok}\n\
             weft_proxy_request_duration_ms_bucket{{direction=\"outbound\",src=\"w\",dst=\"{dst}\",route=\"{route}\",le=\"2.0\"}} {}\n\
             weft_proxy_request_duration_ms_bucket{{direction=\"outbound\",src=\"w\",dst=\"{dst}\",route=\"{route}\",le=\"+Inf\"}} {}\n\
             weft_proxy_retries_total{{dst=\"{dst}\"}} {retries}\n",
            ok + failed,
            ok + failed
        )
    }

    #[test]
    fn replicas_sum_and_a_split_route_shows_shares() {
        let mut snap = Snapshot::default();
        snap.add(
            "shopper",
            &parse_metrics(&proxy_text("checkout.shop:80", "shop/r/split", 80, 0, 0)),
        );
        snap.add(
            "shopper",
            &parse_metrics(&proxy_text("checkout.shop:80", "shop/r/split", 10, 0, 0)),
        );
        snap.add(
            "shopper",
            &parse_metrics(&proxy_text("canary.shop:80", "shop/r/split", 10, 0, 0)),
        );
        snap.add(
            "cart",
            &parse_metrics(&proxy_text("inventory.shop:80", "default", 99, 1, 25)),
        );
        let rows = view(&snap, None, 0.0);
        let row = |dst: &str| rows.iter().find(|r| r.dst == dst).expect(dst);
        assert_eq!(row("checkout.shop:80").requests, 90);
        assert_eq!(row("checkout.shop:80").share, Some(0.9));
        assert_eq!(row("canary.shop:80").share, Some(0.1));
        let inv = row("inventory.shop:80");
        assert_eq!(
            (inv.share, inv.retries, inv.success_rate),
            (None, 25, Some(0.99))
        );
        // 99 of 100 at most 1 ms: the median is inside the first bucket.
        assert!(inv.p50_ms.is_some_and(|p| p > 0.0 && p <= 1.0), "{inv:?}");
        assert_eq!(inv.p99_ms, Some(1.0));
    }

    #[test]
    fn a_window_gives_rates_and_recent_success() {
        let mut before = Snapshot::default();
        before.add(
            "cart",
            &parse_metrics(&proxy_text("inv", "default", 100, 0, 0)),
        );
        let mut now = Snapshot::default();
        now.add(
            "cart",
            &parse_metrics(&proxy_text("inv", "default", 110, 10, 0)),
        );
        let rows = view(&now, Some(&before), 2.0);
        assert_eq!(rows[0].rps, 10.0);
        assert_eq!(rows[0].success_rate, Some(0.5), "over the window only");
        assert_eq!(rows[0].requests, 120);
    }

    #[test]
    fn quantiles_interpolate_and_stop_at_the_last_bound() {
        let c = Counts {
            requests: 10.0,
            succeeded: 10.0,
            buckets: vec![(1.0, 0.0), (3.0, 10.0), (f64::INFINITY, 10.0)],
            ..Counts::default()
        };
        assert_eq!(c.quantile(0.5), Some(2.0));
        let slow = Counts {
            requests: 1.0,
            succeeded: 1.0,
            buckets: vec![(1.0, 0.0), (f64::INFINITY, 1.0)],
            ..Counts::default()
        };
        assert_eq!(slow.quantile(0.99), Some(1.0));
        assert_eq!(Counts::default().quantile(0.5), None);
    }
}
