//! The rollout's eyes: what each proxy reports on its admin `/metrics`
//! (config generation, trust bundle, identity, plaintext seen and refused),
//! and the memory that turns cumulative counters into "since the phase
//! began" and "within the rollback window". Scraping sits behind
//! [`Scraper`] so `weft local` and tests can feed the rollout directly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use super::rollout::ProxyReport;
use crate::promtext::parse_metrics;
use crate::proxy::ADMIN_PORT;

/// One proxy's metrics, as the rollout reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scrape {
    pub report: ProxyReport,
    /// Cumulative plaintext connections by (container port, source address).
    pub plaintext: BTreeMap<(u16, String), u64>,
    /// Cumulative plaintext connections refused under STRICT, by (container
    /// port, source address); an older proxy without the `src_addr` label
    /// reports `""`, which no pod holds.
    pub rejected: BTreeMap<(u16, String), u64>,
}

/// Reads a proxy's `/metrics` text.
pub fn read(text: &str) -> Scrape {
    let mut out = Scrape::default();
    for s in parse_metrics(text) {
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        match s.name.as_str() {
            "weft_proxy_config_generation" if s.value >= 1.0 => {
                out.report.generation = Some(label("generation"));
            }
            "weft_proxy_trust_bundle" if s.value >= 1.0 => {
                out.report.trust_bundle_hash = Some(label("hash"));
            }
            "weft_proxy_certificate_expiry_timestamp_seconds" if s.value > 0.0 => {
                out.report.has_identity = true;
            }
            "weft_proxy_inbound_plaintext_connections_total" => {
                if let Some(port) = port_of(&label("port")) {
                    *out.plaintext.entry((port, label("src_addr"))).or_default() += s.value as u64;
                }
            }
            "weft_proxy_inbound_plaintext_rejected_total" => {
                if let Some(port) = port_of(&label("port")) {
                    *out.rejected.entry((port, label("src_addr"))).or_default() += s.value as u64;
                }
            }
            _ => {}
        }
    }
    out
}

/// A `port` label: the number, or 0 for the proxy's `other` bucket (past
/// its bound on distinct ports), which no exception lists, so it is never
/// dropped from what the rollout sees.
fn port_of(label: &str) -> Option<u16> {
    if label == super::rollout::OTHER_SOURCE {
        return Some(0);
    }
    label.parse().ok()
}

/// Why a proxy could not be read.
#[derive(Debug, thiserror::Error)]
#[error("scraping {addr}: {reason}")]
pub struct ScrapeError {
    pub addr: String,
    pub reason: String,
}

/// Fetches a pod's proxy metrics text.
pub trait Scraper: Send + Sync {
    fn scrape(&self, pod_ip: IpAddr) -> BoxFuture<'static, Result<String, ScrapeError>>;
}

/// Largest `/metrics` body read from one proxy. A proxy's metrics are a
/// few hundred KiB at most (its network-built label sets are bounded); a
/// larger answer is skipped, so a proxy (or whatever answers on its port)
/// cannot make the operator buffer without end.
pub const MAX_SCRAPE_BYTES: usize = 4 * 1024 * 1024;

/// How long one scrape may take, head and body.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Plain HTTP to `<pod IP>:15120/metrics`, bounded in size and time: a
/// proxy whose answer is too large, too slow or unreadable is skipped (the
/// rollout reads it as not reporting) and counted in
/// `weft_operator_scrapes_skipped_total{reason}`.
pub struct HttpScraper {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    metrics: Option<std::sync::Arc<super::metrics::Metrics>>,
    port: u16,
    max_bytes: usize,
    timeout: Duration,
}

impl Default for HttpScraper {
    fn default() -> Self {
        Self {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            metrics: None,
            port: ADMIN_PORT,
            max_bytes: MAX_SCRAPE_BYTES,
            timeout: SCRAPE_TIMEOUT,
        }
    }
}

impl HttpScraper {
    /// Counts skipped scrapes in `metrics`.
    pub fn with_metrics(metrics: std::sync::Arc<super::metrics::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }
}

impl Scraper for HttpScraper {
    fn scrape(&self, pod_ip: IpAddr) -> BoxFuture<'static, Result<String, ScrapeError>> {
        let client = self.client.clone();
        let addr = std::net::SocketAddr::new(pod_ip, self.port).to_string();
        let (metrics, max_bytes, limit) = (self.metrics.clone(), self.max_bytes, self.timeout);
        Box::pin(async move {
            let err = |reason: &'static str, detail: String| {
                if let Some(m) = &metrics {
                    m.scrape_skipped(reason);
                }
                ScrapeError {
                    addr: addr.clone(),
                    reason: format!("{reason}: {detail}"),
                }
            };
            let uri: http::Uri = format!("http://{addr}/metrics")
                .parse()
                .map_err(|e| err("unreadable", format!("{e}")))?;
            let fetch = async {
                let rsp = client
                    .get(uri)
                    .await
                    .map_err(|e| err("unreadable", e.to_string()))?;
                if !rsp.status().is_success() {
                    return Err(err("unreadable", format!("status {}", rsp.status())));
                }
                let body = http_body_util::Limited::new(rsp.into_body(), max_bytes);
                let body = http_body_util::BodyExt::collect(body).await.map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        err("too-large", format!("more than {max_bytes} bytes"))
                    } else {
                        err("unreadable", e.to_string())
                    }
                })?;
                String::from_utf8(body.to_bytes().to_vec())
                    .map_err(|e| err("unreadable", e.to_string()))
            };
            tokio::time::timeout(limit, fetch)
                .await
                .map_err(|_| err("timeout", format!("no whole answer within {limit:?}")))?
        })
    }
}

/// A plaintext counter's key: (pod, container port, source address).
pub type PlaintextKey = (String, u16, String);

/// One look at a namespace's refused-plaintext counters: when, and the
/// cumulative count per (pod, port, source address).
type RejectedSample = (SystemTime, HashMap<PlaintextKey, u64>);

/// What the operator remembers between looks, per namespace. Lost on a
/// restart, and not shared with other replicas: a namespace the operator
/// holds no baseline for reads as "not counted", and the rollout restarts
/// its window rather than trust counters it never saw.
#[derive(Debug, Default)]
pub struct Counters {
    /// The start of the current phase (or window), and the counters read
    /// in the look that started it.
    baselines: HashMap<String, (SystemTime, HashMap<PlaintextKey, u64>)>,
    /// (when, the namespace's total refused so far per pod).
    rejected: HashMap<String, VecDeque<RejectedSample>>,
}

impl Counters {
    /// Plaintext connections since `since` (the current phase's or
    /// window's start), by key, counted from the baseline [`Self::recount`]
    /// took then; None when there is no baseline for `since` (this replica
    /// did not see that start). A counter below its baseline (the proxy
    /// restarted) counts from zero; a key without one counts whole.
    pub fn plaintext_since(
        &self,
        namespace: &str,
        since: SystemTime,
        now: &HashMap<PlaintextKey, u64>,
    ) -> Option<BTreeMap<PlaintextKey, u64>> {
        // Taking the baseline here, at the first look that carries a new
        // `since`, would lose what arrived between the look that moved
        // `since` and this one; only the look that moved it may take it.
        let (at, base) = self.baselines.get(namespace)?;
        if *at != since {
            return None;
        }
        Some(
            now.iter()
                .filter_map(|(k, &v)| {
                    let base = base.get(k).copied().unwrap_or(0);
                    let seen = if v >= base { v - base } else { v };
                    (seen > 0).then(|| (k.clone(), seen))
                })
                .collect(),
        )
    }

    /// Makes `now` (the counters read in this look) the baseline of the
    /// phase or window that starts (or is re-counted) at `since`.
    pub fn recount(&mut self, namespace: &str, since: SystemTime, now: HashMap<PlaintextKey, u64>) {
        self.baselines.insert(namespace.to_owned(), (since, now));
    }

    /// Plaintext connections refused within `window` before `now`, by
    /// (port, source address), from the proxies' cumulative counters.
    pub fn rejected_within(
        &mut self,
        namespace: &str,
        now: SystemTime,
        window: Duration,
        per_pod: HashMap<PlaintextKey, u64>,
    ) -> BTreeMap<(u16, String), u64> {
        let samples = self.rejected.entry(namespace.to_owned()).or_default();
        samples.push_back((now, per_pod));
        // Keep one sample at or before the window's start, as the base.
        while samples.len() > 1
            && samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t).unwrap_or_default() >= window)
        {
            samples.pop_front();
        }
        let (Some((_, first)), Some((_, last))) = (samples.front(), samples.back()) else {
            return BTreeMap::new();
        };
        // Per source, summed over the namespace's proxies; a counter below
        // its baseline restarted (its proxy did) and counts from zero.
        let mut by_source: BTreeMap<(u16, String), u64> = BTreeMap::new();
        for (key, &v) in last {
            let base = first.get(key).copied().unwrap_or(0);
            let seen = if v >= base { v - base } else { v };
            if seen > 0 {
                *by_source.entry((key.1, key.2.clone())).or_default() += seen;
            }
        }
        by_source
    }

    pub fn forget(&mut self, namespace: &str) {
        self.baselines.remove(namespace);
        self.rejected.remove(namespace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake proxy admin port on loopback: answers each connection with
    /// `head`, then `body_chunks` chunks of 1 MiB (then closes), or, with
    /// none, stays silent until dropped.
    async fn fake_metrics(head: &'static str, body_chunks: usize) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for _ in 0..4 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'#'; 1024 * 1024];
                    for _ in 0..body_chunks {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    // Stalls (holds the socket) for at most 30 s.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        port
    }

    fn scraper_at(
        port: u16,
        metrics: &std::sync::Arc<super::super::metrics::Metrics>,
    ) -> HttpScraper {
        HttpScraper {
            port,
            timeout: Duration::from_millis(500),
            ..HttpScraper::with_metrics(metrics.clone())
        }
    }

    /// A "proxy" that answers 50 MiB is skipped once the size limit is
    /// passed, and counted; one that sends its head and then stalls is
    /// skipped at the time limit, and counted; a normal one is read.
    #[tokio::test]
    async fn an_oversized_or_stalled_metrics_answer_is_skipped_and_counted() {
        let metrics = std::sync::Arc::new(super::super::metrics::Metrics::default());
        let localhost = IpAddr::from([127, 0, 0, 1]);

        let huge = fake_metrics("HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n", 50).await;
        let e = scraper_at(huge, &metrics)
            .scrape(localhost)
            .await
            .expect_err("skipped");
        assert!(e.reason.starts_with("too-large"), "{e}");
        assert_eq!(metrics.scrapes_skipped("too-large"), 1);

        let chunked =
            fake_metrics("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0).await;
        let e = scraper_at(chunked, &metrics)
            .scrape(localhost)
            .await
            .expect_err("skipped");
        assert!(e.reason.starts_with("timeout"), "{e}");
        assert_eq!(metrics.scrapes_skipped("timeout"), 1);

        let fine = fake_metrics("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0).await;
        assert_eq!(
            scraper_at(fine, &metrics)
                .scrape(localhost)
                .await
                .expect("read"),
            "ok"
        );
    }

    /// The proxy's `other` buckets are read, never dropped: port `other`
    /// reads as port 0, which no exception lists.
    #[test]
    fn the_other_bucket_is_read_as_port_0() {
        let s = read(
            "weft_proxy_inbound_plaintext_connections_total{port=\"other\",src_addr=\"other\"} 4\n",
        );
        assert_eq!(s.plaintext.get(&(0, "other".to_owned())), Some(&4));
    }

    #[test]
    fn reads_what_the_proxy_exports() {
        let text = "\
# TYPE weft_proxy_config_generation gauge
weft_proxy_config_generation{generation=\"old\"} 0
weft_proxy_config_generation{generation=\"abc123\"} 1
weft_proxy_trust_bundle{hash=\"h1\"} 1
weft_proxy_certificate_expiry_timestamp_seconds 1.9e9
weft_proxy_inbound_plaintext_connections_total{port=\"8080\",src_addr=\"10.0.0.7\"} 3
weft_proxy_inbound_plaintext_rejected_total{port=\"8080\",src_addr=\"10.0.0.7\"} 2
weft_proxy_inbound_plaintext_rejected_total{port=\"9090\",src_addr=\"10.0.0.8\"} 1
";
        let s = read(text);
        assert_eq!(s.report.generation.as_deref(), Some("abc123"));
        assert_eq!(s.report.trust_bundle_hash.as_deref(), Some("h1"));
        assert!(s.report.has_identity);
        assert_eq!(s.plaintext[&(8080, "10.0.0.7".into())], 3);
        assert_eq!(
            s.rejected,
            BTreeMap::from([
                ((8080, "10.0.0.7".into()), 2),
                ((9090, "10.0.0.8".into()), 1)
            ])
        );
    }

    fn key(pod: &str) -> PlaintextKey {
        (pod.into(), 8080, "10.0.0.7".into())
    }

    #[test]
    fn plaintext_counts_from_the_look_that_started_the_window() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut c = Counters::default();
        let now = HashMap::from([(key("a"), 5)]);
        assert_eq!(
            c.plaintext_since("shop", t0, &now),
            None,
            "no baseline: not counted (a restart, or another replica's window)"
        );
        // The look that starts the window at t0 read 5.
        c.recount("shop", t0, now);
        // Plaintext arrives before the next look: it counts.
        let now = HashMap::from([(key("a"), 7)]);
        assert_eq!(
            c.plaintext_since("shop", t0, &now),
            Some(BTreeMap::from([(key("a"), 2)]))
        );
        // A window that this replica did not start is not counted.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(c.plaintext_since("shop", t1, &now), None);
        // The window restarts at t1 with the counters of that look; what
        // comes after counts, also when it arrives before the next look.
        c.recount("shop", t1, now);
        let now = HashMap::from([(key("a"), 8), (key("b"), 1)]);
        assert_eq!(
            c.plaintext_since("shop", t1, &now),
            Some(BTreeMap::from([(key("a"), 1), (key("b"), 1)]))
        );
        // The proxy restarted: its counter starts again from zero.
        let now = HashMap::from([(key("a"), 1)]);
        assert_eq!(
            c.plaintext_since("shop", t1, &now),
            Some(BTreeMap::from([(key("a"), 1)]))
        );
        c.forget("shop");
        assert_eq!(c.plaintext_since("shop", t1, &now), None);
    }

    #[test]
    fn rejections_are_counted_within_the_window_only() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let w = Duration::from_secs(60);
        let mut c = Counters::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Pods a and b refused the same source: one count for it.
        let pods = |n: u64| HashMap::from([(key("a"), n), (key("b"), n / 2)]);
        let mut count = |at: SystemTime, n: u64| {
            c.rejected_within("ns", at, w, pods(n))
                .get(&(8080, "10.0.0.7".to_owned()))
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(count(at(0), 0), 0);
        assert_eq!(count(at(30), 4), 4 + 2);
        assert_eq!(count(at(59), 9), 9 + 4);
        // The first sample leaves the window: counted from the one at 30 s.
        assert_eq!(count(at(95), 10), 6 + 3);
        assert_eq!(count(at(200), 10), 0);
    }
}
