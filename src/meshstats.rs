//! The mesh's golden signals over a rolling window: what the control
//! plane's stats API (`GET /api/v1/stats` on its admin port) serves.
//!
//! Every [`TICK`] the control plane reads each running proxy's `/metrics`
//! (bounded in size and time, as the rollout's scrape is) and records, per
//! proxy, how much each counter grew since the last read. The growth of all
//! proxies is summed per edge (caller workload → destination Service and
//! route) into one tick, and [`WINDOW_TICKS`] ticks are kept: ten minutes
//! at ten-second resolution. A view over a window sums the ticks in it, so
//! rates are exact over the window, and latency quantiles come from the
//! merged histogram buckets (quantiles of different proxies are never
//! averaged).
//!
//! Counters restart at zero when a proxy restarts; a counter found smaller
//! than at the last read is taken as having restarted, and its value is
//! the growth (as Prometheus' `increase()` does). A proxy read for the
//! first time gives a baseline only: what it counted before is not known
//! to fall in the window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::promtext::{Sample, parse_metrics};

/// How often proxies are read: the resolution of the window.
pub const TICK: Duration = Duration::from_secs(10);
/// Ticks kept: ten minutes.
pub const WINDOW_TICKS: usize = 60;
/// The version in the stats API's path and answer.
pub const API_VERSION: &str = "v1";
/// Series (edges, destinations, workloads) one proxy may report. A proxy
/// has a few per Service it calls; a pod answering with more (anything
/// can answer on a pod's admin port) is left out as unreadable, so it
/// cannot grow the control plane's memory or its time per tick.
pub const MAX_SERIES_PER_PROXY: usize = 4096;
/// Histogram buckets one series may have (the proxy has 16).
pub const MAX_BUCKETS: usize = 64;

/// An edge: requests a caller workload's proxies sent to a destination
/// (a Service `name.ns:port`, or an address) under one route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeKey {
    /// The caller's namespace (where its proxies run).
    pub namespace: String,
    /// The caller's workload (`app` label, else ServiceAccount).
    pub src: String,
    pub dst: String,
    /// `ns/route/rule`, or `default`.
    pub route: String,
}

/// A caller's view of one destination (what is counted per destination,
/// not per route: retries, the breaker).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DstKey {
    pub namespace: String,
    pub src: String,
    pub dst: String,
}

/// A workload, as its own (inbound) proxies count it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    pub namespace: String,
    pub workload: String,
}

/// A caller as a workload's own (inbound) proxies saw it: its verified
/// SPIFFE id over mesh mTLS, `ns/<ns>/sa/<sa>` of a published pod address
/// in plaintext (unverified), or `unknown`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub namespace: String,
    pub workload: String,
    pub src: String,
}

/// Requests an auditing AccessPolicy let through, as the proxies of a
/// workload counted them (`weft_proxy_access_audit_total`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditKey {
    pub namespace: String,
    /// The pod whose proxy counted, as the control plane knows it (never
    /// the proxy's own word): set when the reading is recorded.
    pub pod: String,
    /// `namespace/name` of the AccessPolicy.
    pub policy: String,
    /// `namespace/serviceAccount`, `plaintext`, or `other`.
    pub src: String,
    /// The container port, or `other`.
    pub port: String,
    /// The method, `*`, `other`, or empty for TCP.
    pub method: String,
    /// The first path segment, `*`, `other`, or empty for TCP.
    pub path: String,
    /// Whether the policy's rules would have admitted them.
    pub admitted: bool,
    /// The revision of the rules that verdict was given under.
    pub rules: String,
}

/// Peer certificates a proxy refused (`weft_proxy_tls_rejections_total`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RejectKey {
    /// The pod whose proxy refused, as the control plane knows it: set
    /// when the reading is recorded.
    pub pod: ProxyId,
    /// `inbound` (a client's certificate) or `outbound` (a server's).
    pub direction: String,
    /// `unknown-ca`, `expired`, ...
    pub reason: String,
}

/// What a proxy says of its own identity: a state, not a count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyIdentity {
    /// The hash of the trust bundle in force.
    pub bundle: Option<String>,
    /// The fingerprint of the bundle's root its certificate chains to
    /// (an older proxy does not say).
    pub root: Option<String>,
}

/// Requests and their latency: cumulative for one proxy, or growth.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Requests {
    pub requests: f64,
    /// Not 5xx and not a failed exchange.
    pub succeeded: f64,
    /// Carried over mesh mTLS.
    pub mtls: f64,
    /// Cumulative histogram: (upper bound in ms, count), +Inf last.
    pub buckets: Vec<(f64, f64)>,
}

impl Requests {
    /// Adds `count` observations at or under `le` ms.
    pub fn add_bucket(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += count,
            None => {
                self.buckets.push((le, count));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Requests) {
        self.requests += other.requests;
        self.succeeded += other.succeeded;
        self.mtls += other.mtls;
        for &(le, c) in &other.buckets {
            self.add_bucket(le, c);
        }
    }

    /// Growth since `before`; the whole of `self` when any of its counters
    /// went down (the proxy restarted in between).
    pub fn since(&self, before: &Requests) -> Requests {
        let earlier = |le: f64| {
            before
                .buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c)
        };
        let restarted = self.requests < before.requests
            || self.succeeded < before.succeeded
            || self.mtls < before.mtls
            || self.buckets.iter().any(|(le, c)| *c < earlier(*le));
        if restarted {
            return self.clone();
        }
        Requests {
            requests: self.requests - before.requests,
            succeeded: self.succeeded - before.succeeded,
            mtls: self.mtls - before.mtls,
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| (*le, c - earlier(*le)))
                .collect(),
        }
    }

    /// The `q` quantile in ms, interpolated within its bucket; None with
    /// no observations. Past the last finite bound it answers that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = count - lower.1;
                let frac = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * frac);
            }
            lower = (le, count);
        }
        Some(lower.0)
    }
}

/// What a caller's proxies count per destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DstCounts {
    pub retries: f64,
    pub retry_budget_exhausted: f64,
    /// Answered 429 by the caller's own proxy (a TrafficPolicy rate limit).
    pub rate_limited: f64,
    /// Failed fast with the circuit open.
    pub circuit_rejected: f64,
    /// GETs the caller's response cache answered with a stored answer
    /// without asking the target (fresh, or stale), and ones it asked
    /// the target (missed, or revalidated).
    pub cache_hits: f64,
    pub cache_misses: f64,
}

impl DstCounts {
    fn add(&mut self, o: &DstCounts) {
        self.retries += o.retries;
        self.retry_budget_exhausted += o.retry_budget_exhausted;
        self.rate_limited += o.rate_limited;
        self.circuit_rejected += o.circuit_rejected;
        self.cache_hits += o.cache_hits;
        self.cache_misses += o.cache_misses;
    }

    fn since(&self, before: &DstCounts) -> DstCounts {
        let grew = |now: f64, was: f64| if now < was { now } else { now - was };
        DstCounts {
            retries: grew(self.retries, before.retries),
            retry_budget_exhausted: grew(
                self.retry_budget_exhausted,
                before.retry_budget_exhausted,
            ),
            rate_limited: grew(self.rate_limited, before.rate_limited),
            circuit_rejected: grew(self.circuit_rejected, before.circuit_rejected),
            cache_hits: grew(self.cache_hits, before.cache_hits),
            cache_misses: grew(self.cache_misses, before.cache_misses),
        }
    }
}

/// How many of a caller's proxies see a destination's circuit in each
/// state (the breaker is per proxy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Circuits {
    pub closed: u32,
    pub open: u32,
    pub half_open: u32,
}

/// One proxy's metrics, cumulative, as the stats read them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyCounts {
    pub edges: BTreeMap<EdgeKey, Requests>,
    pub dsts: BTreeMap<DstKey, DstCounts>,
    pub circuits: BTreeMap<DstKey, Circuits>,
    pub inbound: BTreeMap<WorkloadKey, Requests>,
    /// The same requests by caller (their latency is merged into the
    /// workload's: the dashboard shows who calls, not each caller's p99).
    pub peers: BTreeMap<PeerKey, Requests>,
    /// Requests shed at the in-flight cap, by the workload whose proxy shed.
    pub shed: BTreeMap<WorkloadKey, f64>,
    /// Requests auditing AccessPolicies let through.
    pub audit: BTreeMap<AuditKey, f64>,
    /// Peer certificates refused.
    pub rejections: BTreeMap<RejectKey, f64>,
    /// Its identity as it reports it (kept apart from the counts: a
    /// tick's sum has none).
    pub identity: ProxyIdentity,
}

impl ProxyCounts {
    /// Reads the metrics text of a proxy of namespace `namespace`, or
    /// says why it will not be used: more than [`MAX_SERIES_PER_PROXY`]
    /// series or [`MAX_BUCKETS`] buckets in one.
    pub fn read(namespace: &str, text: &str) -> Result<Self, String> {
        let counts = Self::from_samples(namespace, &parse_metrics(text));
        let series = counts.edges.len()
            + counts.dsts.len()
            + counts.circuits.len()
            + counts.inbound.len()
            + counts.peers.len()
            + counts.audit.len()
            + counts.rejections.len();
        if series > MAX_SERIES_PER_PROXY {
            return Err(format!(
                "{series} series, more than the {MAX_SERIES_PER_PROXY} a proxy has"
            ));
        }
        if counts
            .edges
            .values()
            .chain(counts.inbound.values())
            .any(|r| r.buckets.len() > MAX_BUCKETS)
        {
            return Err(format!("a histogram with more than {MAX_BUCKETS} buckets"));
        }
        Ok(counts)
    }

    /// [`ProxyCounts::read`] from parsed samples.
    pub fn from_samples(namespace: &str, samples: &[Sample]) -> Self {
        let mut out = ProxyCounts::default();
        // The proxy's own workload: the `src` of its outbound series, the
        // `dst` of its inbound ones.
        let mut workload: Option<String> = None;
        // Counts are finite and not negative; anything else (`NaN`, `+Inf`
        // parse as numbers) is not a proxy's and would poison the sums.
        for s in samples
            .iter()
            .filter(|s| s.value.is_finite() && s.value >= 0.0)
        {
            let label = |k: &str| s.labels.get(k).map(String::as_str).unwrap_or("");
            let inbound = label("direction") == "inbound";
            let edge = || EdgeKey {
                namespace: namespace.to_owned(),
                src: label("src").to_owned(),
                dst: label("dst").to_owned(),
                route: label("route").to_owned(),
            };
            let dst = || DstKey {
                namespace: namespace.to_owned(),
                src: String::new(),
                dst: label("dst").to_owned(),
            };
            let server = || WorkloadKey {
                namespace: namespace.to_owned(),
                workload: label("dst").to_owned(),
            };
            match s.name.as_str() {
                "weft_proxy_requests_total" => {
                    let succeeded = !matches!(label("status_class"), "5xx" | "error");
                    let mtls = label("tls") == "true";
                    let count = |r: &mut Requests| {
                        r.requests += s.value;
                        if succeeded {
                            r.succeeded += s.value;
                        }
                        if mtls {
                            r.mtls += s.value;
                        }
                    };
                    if inbound {
                        workload.get_or_insert_with(|| label("dst").to_owned());
                        count(out.inbound.entry(server()).or_default());
                        let peer = PeerKey {
                            namespace: namespace.to_owned(),
                            workload: label("dst").to_owned(),
                            src: label("src").to_owned(),
                        };
                        count(out.peers.entry(peer).or_default());
                    } else {
                        workload.get_or_insert_with(|| label("src").to_owned());
                        count(out.edges.entry(edge()).or_default());
                    }
                }
                "weft_proxy_request_duration_ms_bucket" => {
                    let le = match label("le") {
                        "+Inf" => f64::INFINITY,
                        le => match le.parse() {
                            Ok(v) => v,
                            Err(_) => continue,
                        },
                    };
                    let r = if inbound {
                        out.inbound.entry(server()).or_default()
                    } else {
                        out.edges.entry(edge()).or_default()
                    };
                    r.add_bucket(le, s.value);
                }
                "weft_proxy_retries_total" => {
                    out.dsts.entry(dst()).or_default().retries += s.value;
                }
                "weft_proxy_retry_budget_exhausted_total" => {
                    out.dsts.entry(dst()).or_default().retry_budget_exhausted += s.value;
                }
                "weft_proxy_proxy_errors_total" if !inbound => match label("reason") {
                    "rate-limited" => out.dsts.entry(dst()).or_default().rate_limited += s.value,
                    "circuit-open" => {
                        out.dsts.entry(dst()).or_default().circuit_rejected += s.value;
                    }
                    _ => {}
                },
                "weft_proxy_cache_requests_total" if !inbound => {
                    let d = out.dsts.entry(dst()).or_default();
                    if matches!(label("result"), "miss" | "revalidated") {
                        d.cache_misses += s.value;
                    } else {
                        d.cache_hits += s.value;
                    }
                }
                "weft_proxy_circuit_state" => {
                    let c = out.circuits.entry(dst()).or_default();
                    match s.value as i64 {
                        1 => c.open += 1,
                        2 => c.half_open += 1,
                        _ => c.closed += 1,
                    }
                }
                "weft_proxy_access_audit_total" => {
                    // Keyed by pod when recorded (`MeshStats::record`).
                    let key = AuditKey {
                        namespace: namespace.to_owned(),
                        pod: String::new(),
                        policy: label("policy").to_owned(),
                        src: label("src").to_owned(),
                        port: label("port").to_owned(),
                        method: label("method").to_owned(),
                        path: label("path").to_owned(),
                        admitted: label("verdict") == "admitted",
                        rules: label("rules").to_owned(),
                    };
                    *out.audit.entry(key).or_default() += s.value;
                }
                "weft_proxy_tls_rejections_total" => {
                    // Keyed by pod when recorded (`MeshStats::record`).
                    let key = RejectKey {
                        pod: (namespace.to_owned(), String::new()),
                        direction: label("direction").to_owned(),
                        reason: label("reason").to_owned(),
                    };
                    *out.rejections.entry(key).or_default() += s.value;
                }
                "weft_proxy_trust_bundle" if s.value >= 1.0 => {
                    out.identity.bundle = Some(label("hash").to_owned());
                }
                "weft_proxy_certificate_root" if s.value >= 1.0 => {
                    out.identity.root = Some(label("fingerprint").to_owned());
                }
                "weft_proxy_requests_shed_total" => {
                    // Keyed once the workload is known (below).
                    *out.shed
                        .entry(WorkloadKey {
                            namespace: namespace.to_owned(),
                            workload: String::new(),
                        })
                        .or_default() += s.value;
                }
                _ => {}
            }
        }
        // Series counted per destination carry no `src`: they are this
        // proxy's, whose workload its request series name.
        let workload = workload.unwrap_or_else(|| "unknown".to_owned());
        let own = |k: DstKey| DstKey {
            src: workload.clone(),
            ..k
        };
        out.dsts = std::mem::take(&mut out.dsts)
            .into_iter()
            .map(|(k, v)| (own(k), v))
            .collect();
        out.circuits = std::mem::take(&mut out.circuits)
            .into_iter()
            .map(|(k, v)| (own(k), v))
            .collect();
        out.shed = std::mem::take(&mut out.shed)
            .into_iter()
            .map(|(k, v)| {
                (
                    WorkloadKey {
                        workload: workload.clone(),
                        ..k
                    },
                    v,
                )
            })
            .collect();
        out
    }

    /// Growth since `before`, series by series (a series new since then
    /// grew by all it holds).
    fn since(&self, before: &ProxyCounts) -> ProxyCounts {
        fn each<K: Ord + Clone, V: Default>(
            now: &BTreeMap<K, V>,
            was: &BTreeMap<K, V>,
            since: impl Fn(&V, &V) -> V,
        ) -> BTreeMap<K, V> {
            let none = V::default();
            now.iter()
                .map(|(k, v)| (k.clone(), since(v, was.get(k).unwrap_or(&none))))
                .collect()
        }
        let mut grown = ProxyCounts {
            edges: each(&self.edges, &before.edges, Requests::since),
            dsts: each(&self.dsts, &before.dsts, DstCounts::since),
            circuits: self.circuits.clone(),
            inbound: each(&self.inbound, &before.inbound, Requests::since),
            peers: each(&self.peers, &before.peers, Requests::since),
            shed: each(&self.shed, &before.shed, grew),
            audit: each(&self.audit, &before.audit, grew),
            rejections: each(&self.rejections, &before.rejections, grew),
            identity: ProxyIdentity::default(),
        };
        // A tick keeps what grew (and the circuits, a state) only.
        grown.edges.retain(|_, r| r.requests > 0.0);
        grown.inbound.retain(|_, r| r.requests > 0.0);
        grown.peers.retain(|_, r| r.requests > 0.0);
        grown.dsts.retain(|_, d| *d != DstCounts::default());
        grown.shed.retain(|_, v| *v > 0.0);
        grown.audit.retain(|_, v| *v > 0.0);
        grown.rejections.retain(|_, v| *v > 0.0);
        grown
    }

    fn add(&mut self, o: &ProxyCounts) {
        self.add_growth(o);
        self.add_circuits(&o.circuits);
    }

    /// Adds `o`'s counters (not its circuits, a state).
    fn add_growth(&mut self, o: &ProxyCounts) {
        for (k, v) in &o.edges {
            self.edges.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &o.dsts {
            self.dsts.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &o.inbound {
            self.inbound.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &o.peers {
            self.peers.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &o.shed {
            *self.shed.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.audit {
            *self.audit.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.rejections {
            *self.rejections.entry(k.clone()).or_default() += v;
        }
    }

    fn add_circuits(&mut self, circuits: &BTreeMap<DstKey, Circuits>) {
        for (k, v) in circuits {
            let c = self.circuits.entry(k.clone()).or_default();
            c.closed += v.closed;
            c.open += v.open;
            c.half_open += v.half_open;
        }
    }
}

/// A counter's growth: what it holds now over what it held, or all it
/// holds after a reset (the proxy restarted).
fn grew(now: &f64, was: &f64) -> f64 {
    if now < was { *now } else { now - was }
}

/// A proxy, by namespace and pod name.
pub type ProxyId = (String, String);

/// One proxy read in a tick: its counts, or why it could not be read
/// (too slow, too large, refused: the reason is counted).
pub struct Reading {
    pub id: ProxyId,
    pub counts: Result<ProxyCounts, String>,
}

/// One tick: the growth of every proxy read, summed.
#[derive(Clone, Debug, Default)]
pub struct Tick {
    pub at: Option<SystemTime>,
    /// Since the tick before (the first covers no time: every proxy's
    /// reading in it is a baseline).
    pub seconds: f64,
    pub counts: ProxyCounts,
    pub proxies: usize,
    pub unreadable: usize,
    /// The proxies not read in this tick: what they counted since their
    /// last reading is lost (the next one is a baseline), so nothing can
    /// be said of what they saw in the tick's time.
    pub unreadable_pods: std::collections::BTreeSet<ProxyId>,
}

/// The latest reading of the proxies' identities: a state, so only the
/// latest is kept (not one per tick).
#[derive(Clone, Debug)]
pub struct Latest {
    /// When the proxies were read, at the earliest: the end of the tick
    /// before.
    pub at: SystemTime,
    /// What each proxy read says of its identity.
    pub identities: BTreeMap<ProxyId, ProxyIdentity>,
    /// The proxies that could not be read.
    pub unreadable: std::collections::BTreeSet<ProxyId>,
}

/// The rolling window, and each proxy's last reading.
#[derive(Default)]
pub struct MeshStats {
    last: HashMap<ProxyId, ProxyCounts>,
    latest: Option<Latest>,
    ticks: VecDeque<std::sync::Arc<Tick>>,
    /// Ticks kept; 0 is [`WINDOW_TICKS`].
    keep: usize,
}

impl std::fmt::Debug for MeshStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStats")
            .field("proxies", &self.last.len())
            .field("ticks", &self.ticks.len())
            .finish()
    }
}

/// The stats, shared by the task that reads the proxies and the API.
pub type SharedStats = std::sync::Arc<std::sync::Mutex<MeshStats>>;

impl MeshStats {
    /// Stats read every `every` rather than every [`TICK`], still keeping
    /// the ten minutes the API's `window` may ask for (`weft local` reads
    /// its proxies every 2 s).
    pub fn reading_every(every: Duration) -> Self {
        let kept = TICK * WINDOW_TICKS as u32;
        MeshStats {
            keep: (kept.as_secs_f64() / every.as_secs_f64().max(0.1)).ceil() as usize,
            ..MeshStats::default()
        }
    }

    /// Records the readings of one tick taken at `at`. Proxies not read
    /// (gone, or unreadable) are forgotten: the next reading of one is a
    /// baseline again, so a proxy that was unreadable for a while does not
    /// pour its whole absence into one tick.
    pub fn record(&mut self, at: SystemTime, readings: Vec<Reading>) {
        // The first tick covers no time; a clock stepped back counts as one
        // tick's time, not none (which would inflate the rates).
        let seconds = match self.ticks.back().and_then(|t| t.at) {
            None => Duration::ZERO,
            Some(before) => at.duration_since(before).unwrap_or(TICK),
        }
        .as_secs_f64();
        let mut tick = Tick {
            at: Some(at),
            seconds,
            ..Tick::default()
        };
        let mut last = HashMap::with_capacity(readings.len());
        let mut identities = BTreeMap::new();
        for r in readings {
            match r.counts {
                Ok(mut counts) => {
                    // Audit counts are judged by the pod that counted
                    // them, by the control plane's own word.
                    if !counts.audit.is_empty() {
                        counts.audit = std::mem::take(&mut counts.audit)
                            .into_iter()
                            .map(|(k, v)| {
                                (
                                    AuditKey {
                                        pod: r.id.1.clone(),
                                        ..k
                                    },
                                    v,
                                )
                            })
                            .collect();
                    }
                    if !counts.rejections.is_empty() {
                        counts.rejections = std::mem::take(&mut counts.rejections)
                            .into_iter()
                            .map(|(k, v)| {
                                (
                                    RejectKey {
                                        pod: r.id.clone(),
                                        ..k
                                    },
                                    v,
                                )
                            })
                            .collect();
                    }
                    identities.insert(r.id.clone(), std::mem::take(&mut counts.identity));
                    tick.proxies += 1;
                    if let Some(before) = self.last.get(&r.id) {
                        tick.counts.add(&counts.since(before));
                    } else {
                        // Its circuits are a state, not a growth: shown
                        // from the first reading.
                        tick.counts.add_circuits(&counts.circuits);
                    }
                    last.insert(r.id, counts);
                }
                Err(_) => {
                    tick.unreadable += 1;
                    tick.unreadable_pods.insert(r.id);
                }
            }
        }
        self.last = last;
        // The proxies were read after the tick before was recorded (the
        // first reading: within a tick before `at`, at the earliest).
        let began = self
            .ticks
            .back()
            .and_then(|t| t.at)
            .filter(|before| *before <= at)
            .unwrap_or_else(|| at.checked_sub(TICK).unwrap_or(at));
        self.latest = Some(Latest {
            at: began,
            identities,
            unreadable: tick.unreadable_pods.clone(),
        });
        self.ticks.push_back(std::sync::Arc::new(tick));
        let keep = if self.keep == 0 {
            WINDOW_TICKS
        } else {
            self.keep
        };
        while self.ticks.len() > keep {
            self.ticks.pop_front();
        }
    }

    /// The ticks covering the last `window`, newest first: at least one,
    /// and no more than reach back `window` (ticks that came late, after a
    /// slow round of reads, count for the time they cover). Cheap: the
    /// figures are made from them by [`view_of`], outside any lock.
    pub fn window(&self, window: Duration) -> Vec<std::sync::Arc<Tick>> {
        let mut covered = 0.0;
        let mut out: Vec<std::sync::Arc<Tick>> = Vec::new();
        for t in self.ticks.iter().rev() {
            if !out.is_empty() && covered + t.seconds > window.as_secs_f64() + 0.5 {
                break;
            }
            covered += t.seconds;
            out.push(t.clone());
        }
        out
    }

    /// The ticks that cover only time after `start`, newest first: what
    /// happened since then, as far as this process saw it. A tick that
    /// began before `start` is left out (nothing from before counts).
    pub fn since(&self, start: SystemTime) -> Vec<std::sync::Arc<Tick>> {
        self.ticks
            .iter()
            .rev()
            .take_while(|t| {
                t.at.and_then(|at| at.checked_sub(Duration::from_secs_f64(t.seconds)))
                    .is_some_and(|began| began >= start)
            })
            .cloned()
            .collect()
    }

    /// The ticks that cover any time after `start`, newest first: those
    /// of [`MeshStats::since`] and the one that began before `start` and
    /// ended after it. For evidence that can only hold a change back
    /// (a caller seen), where counting a little before `start` is the
    /// safe side.
    pub fn touching(&self, start: SystemTime) -> Vec<std::sync::Arc<Tick>> {
        self.ticks
            .iter()
            .rev()
            .take_while(|t| t.at.is_some_and(|at| at > start))
            .cloned()
            .collect()
    }

    /// The proxies' identities as last read.
    pub fn identities(&self) -> Option<&Latest> {
        self.latest.as_ref()
    }

    /// The golden signals over the last `window` ([`MeshStats::window`]
    /// and [`view_of`]).
    pub fn view(&self, window: Duration) -> StatsView {
        view_of(&self.window(window))
    }
}

/// The golden signals of `ticks` (newest first).
pub fn view_of(ticks: &[std::sync::Arc<Tick>]) -> StatsView {
    let mut sum = ProxyCounts::default();
    let mut seconds = 0.0;
    for t in ticks {
        // Circuits are a state: the latest tick's alone (below).
        sum.add_growth(&t.counts);
        seconds += t.seconds;
    }
    let latest = ticks.first();
    let circuits = latest.map(|t| &t.counts.circuits);
    let per_second = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };

    // A route that splits (its rule names several backends): each
    // destination's share of the caller's requests on that route.
    let mut route_totals: BTreeMap<(&str, &str, &str), (f64, usize)> = BTreeMap::new();
    for (k, r) in &sum.edges {
        let t = route_totals
            .entry((&k.namespace, &k.src, &k.route))
            .or_default();
        t.0 += r.requests;
        t.1 += 1;
    }
    let resilience = |k: &DstKey| {
        let d = sum.dsts.get(k).cloned().unwrap_or_default();
        Resilience {
            retries_per_second: per_second(d.retries),
            retry_budget_exhausted: d.retry_budget_exhausted.round() as u64,
            rate_limited: d.rate_limited.round() as u64,
            circuit_rejected: d.circuit_rejected.round() as u64,
            cache_hits: d.cache_hits.round() as u64,
            cache_misses: d.cache_misses.round() as u64,
            circuit: circuits.and_then(|c| c.get(k)).copied().unwrap_or_default(),
        }
    };
    let edges = sum
        .edges
        .iter()
        .map(|(k, r)| {
            let dk = DstKey {
                namespace: k.namespace.clone(),
                src: k.src.clone(),
                dst: k.dst.clone(),
            };
            let (route_total, backends) =
                route_totals[&(k.namespace.as_str(), k.src.as_str(), k.route.as_str())];
            EdgeRow {
                namespace: k.namespace.clone(),
                src: k.src.clone(),
                dst: k.dst.clone(),
                route: k.route.clone(),
                signals: Signals::of(r, seconds),
                split_share: (k.route != "default" && backends > 1)
                    .then(|| ratio(r.requests, route_total))
                    .flatten(),
                resilience: resilience(&dk),
            }
        })
        .collect();
    // Each caller → destination across its routes: the routes' requests
    // and histograms summed (their p99s are never averaged).
    let mut across: BTreeMap<DstKey, Requests> = BTreeMap::new();
    for (k, r) in &sum.edges {
        across
            .entry(DstKey {
                namespace: k.namespace.clone(),
                src: k.src.clone(),
                dst: k.dst.clone(),
            })
            .or_default()
            .add(r);
    }
    let destinations = across
        .into_iter()
        .map(|(k, r)| DestinationRow {
            signals: Signals::of(&r, seconds),
            resilience: resilience(&k),
            namespace: k.namespace,
            src: k.src,
            dst: k.dst,
        })
        .collect();
    let mut callers: BTreeMap<(&str, &str), Vec<CallerRow>> = BTreeMap::new();
    for (k, r) in &sum.peers {
        callers
            .entry((&k.namespace, &k.workload))
            .or_default()
            .push(CallerRow {
                src: k.src.clone(),
                requests: r.requests.round() as u64,
                rps: per_second(r.requests),
                success_rate: ratio(r.succeeded, r.requests),
                mtls_share: ratio(r.mtls, r.requests),
            });
    }
    for rows in callers.values_mut() {
        rows.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.src.cmp(&b.src)));
    }
    let workloads = sum
        .inbound
        .iter()
        .map(|(k, r)| WorkloadRow {
            namespace: k.namespace.clone(),
            workload: k.workload.clone(),
            signals: Signals::of(r, seconds),
            shed: sum.shed.get(k).copied().unwrap_or(0.0).round() as u64,
            callers: callers
                .remove(&(k.namespace.as_str(), k.workload.as_str()))
                .unwrap_or_default(),
        })
        .collect();
    StatsView {
        version: API_VERSION.to_owned(),
        window_seconds: seconds,
        ticks: ticks.len(),
        proxies: latest.map_or(0, |t| t.proxies),
        unreadable: latest.map_or(0, |t| t.unreadable),
        edges,
        destinations,
        workloads,
    }
}

fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole)
}

/// The stats API's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    pub version: String,
    /// The span the figures cover (the ticks' own, which may fall short of
    /// the window asked for just after a start).
    pub window_seconds: f64,
    pub ticks: usize,
    /// Proxies read in the latest tick, and those that could not be.
    pub proxies: usize,
    pub unreadable: usize,
    pub edges: Vec<EdgeRow>,
    /// The edges again, one row per caller → destination across its
    /// routes (the graph's arrows). Absent from answers of weft before it.
    #[serde(default)]
    pub destinations: Vec<DestinationRow>,
    pub workloads: Vec<WorkloadRow>,
}

/// A caller workload → a destination over the window, across routes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRow {
    pub namespace: String,
    pub src: String,
    pub dst: String,
    #[serde(flatten)]
    pub signals: Signals,
    #[serde(flatten)]
    pub resilience: Resilience,
}

/// What a caller's proxies count per destination (not per route) over the
/// window: retries and the breaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resilience {
    pub retries_per_second: f64,
    pub retry_budget_exhausted: u64,
    pub rate_limited: u64,
    pub circuit_rejected: u64,
    /// Answered from the caller's response cache (TrafficPolicy `cache`),
    /// and asked of the target by it; both 0 where nothing is cached.
    /// The requests answered from the cache are not in `requests`, which
    /// counts what reached the target.
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub cache_misses: u64,
    /// The caller's proxies by the destination's circuit state, latest.
    pub circuit: Circuits,
}

/// A caller of a workload, as the workload's own proxies saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CallerRow {
    /// The caller's verified SPIFFE id (mesh mTLS), `ns/<ns>/sa/<sa>` of a
    /// published pod address (plaintext: unverified), or `unknown`.
    pub src: String,
    pub requests: u64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub mtls_share: Option<f64>,
}

/// One edge over the window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRow {
    pub namespace: String,
    pub src: String,
    pub dst: String,
    pub route: String,
    #[serde(flatten)]
    pub signals: Signals,
    /// On a route that splits, this destination's share of its requests.
    pub split_share: Option<f64>,
    /// The destination's, across its routes (the proxy counts them per
    /// destination): repeated on each route's row.
    #[serde(flatten)]
    pub resilience: Resilience,
}

/// A workload as its own proxies count it (inbound).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRow {
    pub namespace: String,
    pub workload: String,
    #[serde(flatten)]
    pub signals: Signals,
    pub shed: u64,
    /// Who called it, busiest first. Absent from answers of weft before it.
    #[serde(default)]
    pub callers: Vec<CallerRow>,
}

/// The requests of an edge or a workload over the window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Signals {
    pub requests: u64,
    pub rps: f64,
    /// Not 5xx and not failed, of the requests in the window.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Of the requests, the share carried over mesh mTLS.
    pub mtls_share: Option<f64>,
}

impl Signals {
    /// `r`, grown over `seconds`.
    fn of(r: &Requests, seconds: f64) -> Self {
        Signals {
            requests: r.requests.round() as u64,
            rps: if seconds > 0.0 {
                r.requests / seconds
            } else {
                0.0
            },
            success_rate: ratio(r.succeeded, r.requests),
            p50_ms: r.quantile(0.5),
            p95_ms: r.quantile(0.95),
            p99_ms: r.quantile(0.99),
            mtls_share: ratio(r.mtls, r.requests),
        }
    }
}

/// Parses the stats API's `window` parameter: seconds (`60`) or with a
/// unit (`60s`, `5m`, `1h`); at most the window kept.
pub fn parse_window(value: &str) -> Result<Duration, String> {
    let (number, unit) = if let Some(n) = value.strip_suffix('h') {
        (n, 3600)
    } else if let Some(n) = value.strip_suffix('m') {
        (n, 60)
    } else {
        (value.strip_suffix('s').unwrap_or(value), 1)
    };
    let n: u64 = number.parse().map_err(|_| {
        format!("window: {value:?} is not a duration; give seconds (60, 60s) or minutes (5m)")
    })?;
    let kept = TICK * WINDOW_TICKS as u32;
    let asked = Duration::from_secs(n.saturating_mul(unit));
    if asked.is_zero() || asked > kept {
        return Err(format!(
            "window: {value:?} is outside 1s..{}m, the span the stats keep",
            kept.as_secs() / 60
        ));
    }
    Ok(asked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy of workload `src` with `ok` good and `failed` 5xx requests
    /// to `dst` on `route`, the good ones under 5 ms, the failed ones
    /// under 100 ms, and `retries` retries.
    fn proxy(src: &str, dst: &str, route: &str, ok: u32, failed: u32, retries: u32) -> String {
        let l = format!("direction=\"outbound\",src=\"{src}\",dst=\"{dst}\",route=\"{route}\"");
        let all = ok + failed;
        format!(
            "weft_proxy_requests_total{{{l},status_class=\"2xx\",tls=\"true\"}} {ok}\n\
             weft_proxy_requests_total{{{l},status_class=\"5xx\",tls=\"true\"}} {failed}\n\
             weft_proxy_request_duration_ms_bucket{{{l},le=\"5.0\"}} {ok}\n\
             weft_proxy_request_duration_ms_bucket{{{l},le=\"100.0\"}} {all}\n\
             weft_proxy_request_duration_ms_bucket{{{l},le=\"+Inf\"}} {all}\n\
             weft_proxy_retries_total{{dst=\"{dst}\"}} {retries}\n\
             weft_proxy_circuit_state{{dst=\"{dst}\"}} 0\n"
        )
    }

    fn reading(pod: &str, text: &str) -> Reading {
        Reading {
            id: ("shop".into(), pod.into()),
            counts: ProxyCounts::read("shop", text),
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    /// What a CA rotation reads: each proxy's identity as of its latest
    /// reading (kept once, not per tick, and dated by when the reading
    /// could have begun), and refused handshakes as growth, by the pod
    /// the control plane read them from (a proxy's own labels are not
    /// believed).
    #[test]
    fn identities_are_the_latest_reading_and_refusals_grow_by_the_pod_read() {
        let id = |bundle: &str, refused: u32| {
            format!(
                "weft_proxy_trust_bundle{{hash=\"{bundle}\"}} 1\n\
                 weft_proxy_certificate_root{{fingerprint=\"f1\"}} 1\n\
                 weft_proxy_tls_rejections_total{{direction=\"inbound\",reason=\"unknown-ca\",pod=\"forged\"}} {refused}\n"
            )
        };
        let mut stats = MeshStats::default();
        stats.record(at(0), vec![reading("cart-1", &id("b1", 5))]);
        let first = stats.identities().expect("read");
        assert_eq!(
            first.at,
            at(0) - TICK,
            "a first reading began within a tick before"
        );
        assert_eq!(
            stats.ticks[0].counts.rejections.len(),
            0,
            "a baseline, not growth"
        );
        stats.record(
            at(10),
            vec![
                reading("cart-1", &id("b2", 7)),
                Reading {
                    id: ("shop".into(), "gone-1".into()),
                    counts: Err("refused".into()),
                },
            ],
        );
        let latest = stats.identities().expect("read");
        assert_eq!(latest.at, at(0), "read after the tick before");
        let key = ("shop".to_owned(), "cart-1".to_owned());
        assert_eq!(latest.identities[&key].bundle.as_deref(), Some("b2"));
        assert_eq!(latest.identities[&key].root.as_deref(), Some("f1"));
        assert!(
            latest
                .unreadable
                .contains(&("shop".to_owned(), "gone-1".to_owned()))
        );
        let grown: Vec<(&RejectKey, &f64)> = stats.ticks[1].counts.rejections.iter().collect();
        assert_eq!(grown.len(), 1);
        assert_eq!((&grown[0].0.pod, grown[0].1), (&key, &2.0));
        assert_eq!(grown[0].0.reason, "unknown-ca");
    }

    /// Two replicas of the caller: the edge is their sum, its success
    /// rate over both, its p99 from the merged histogram (one replica's
    /// slow failures set it, as they would in one histogram), never an
    /// average of the two replicas' quantiles.
    #[test]
    fn two_proxies_merge_into_one_edge_with_the_histograms_merged() {
        let mut stats = MeshStats::default();
        stats.record(
            at(0),
            vec![
                reading(
                    "checkout-a",
                    &proxy("checkout", "payments.shop:80", "default", 0, 0, 0),
                ),
                reading(
                    "checkout-b",
                    &proxy("checkout", "payments.shop:80", "default", 0, 0, 0),
                ),
            ],
        );
        stats.record(
            at(10),
            vec![
                reading(
                    "checkout-a",
                    &proxy("checkout", "payments.shop:80", "default", 990, 0, 0),
                ),
                reading(
                    "checkout-b",
                    &proxy("checkout", "payments.shop:80", "default", 0, 10, 4),
                ),
            ],
        );
        let view = stats.view(Duration::from_secs(60));
        assert_eq!((view.proxies, view.edges.len()), (2, 1));
        let e = &view.edges[0];
        assert_eq!(
            (e.src.as_str(), e.dst.as_str()),
            ("checkout", "payments.shop:80")
        );
        assert_eq!(e.signals.requests, 1000);
        assert_eq!(e.signals.rps, 100.0);
        assert_eq!(e.signals.success_rate, Some(0.99));
        // 990 under 5 ms and 10 in 5..100 ms: the 99th percentile is the
        // top of the first bucket; averaging the replicas' p99 (5 and
        // 99.5) would say 52 ms.
        assert_eq!(e.signals.p99_ms, Some(5.0));
        assert!(e.signals.p95_ms.is_some_and(|p| p <= 5.0));
        assert_eq!(e.signals.mtls_share, Some(1.0));
        assert_eq!(e.resilience.retries_per_second, 0.4);
        assert_eq!(e.resilience.circuit.closed, 2);
    }

    /// A caller's response cache: the requests it answered from its
    /// store (fresh, revalidated, stale) are the edge's cache hits, the
    /// ones it asked the vendor its misses, over the window.
    #[test]
    fn cache_hits_and_misses_are_counted_per_destination() {
        let feed = "feed.vendor.test:80";
        let with_cache = |ok: u32, hits: u32, stale: u32, misses: u32| {
            format!(
                "{}weft_proxy_cache_requests_total{{dst=\"{feed}\",result=\"hit\"}} {hits}\n\
                 weft_proxy_cache_requests_total{{dst=\"{feed}\",result=\"stale-if-error\"}} {stale}\n\
                 weft_proxy_cache_requests_total{{dst=\"{feed}\",result=\"miss\"}} {misses}\n",
                proxy("catalog", feed, "default", ok, 0, 0)
            )
        };
        let mut stats = MeshStats::default();
        stats.record(at(0), vec![reading("catalog-a", &with_cache(0, 0, 0, 0))]);
        stats.record(
            at(10),
            vec![reading("catalog-a", &with_cache(20, 170, 10, 20))],
        );
        let view = stats.view(Duration::from_secs(60));
        let e = &view.edges[0];
        assert_eq!(e.signals.requests, 20, "what reached the vendor");
        assert_eq!(
            (e.resilience.cache_hits, e.resilience.cache_misses),
            (180, 20)
        );
    }

    /// A proxy that restarts between two reads starts its counters again:
    /// what it counted since is the growth, not a negative rate; a proxy
    /// seen for the first time is a baseline.
    #[test]
    fn a_proxy_restart_counts_what_it_counted_since() {
        let mut stats = MeshStats::default();
        let edge = |s: &MeshStats| s.view(TICK).edges.first().map(|e| e.signals.requests);
        stats.record(
            at(0),
            vec![reading(
                "cart-a",
                &proxy("cart", "inventory.shop:80", "default", 5000, 0, 0),
            )],
        );
        assert_eq!(edge(&stats), None, "the first reading is a baseline");
        stats.record(
            at(10),
            vec![reading(
                "cart-a",
                &proxy("cart", "inventory.shop:80", "default", 5100, 0, 0),
            )],
        );
        assert_eq!(edge(&stats), Some(100));
        // Restarted: 30 since.
        stats.record(
            at(20),
            vec![reading(
                "cart-a",
                &proxy("cart", "inventory.shop:80", "default", 30, 0, 0),
            )],
        );
        assert_eq!(edge(&stats), Some(30));
        let over_both = stats.view(Duration::from_secs(20));
        assert_eq!(over_both.edges[0].signals.requests, 130);
        assert_eq!(over_both.edges[0].signals.rps, 6.5);
    }

    /// An unreadable proxy (timed out, too large) is counted and left
    /// out; when it is read again its first reading is a baseline.
    #[test]
    fn an_unreadable_proxy_is_counted_and_left_out() {
        let mut stats = MeshStats::default();
        let text = |n| proxy("cart", "inventory.shop:80", "default", n, 0, 0);
        stats.record(
            at(0),
            vec![reading("cart-a", &text(0)), reading("cart-b", &text(0))],
        );
        stats.record(
            at(10),
            vec![
                reading("cart-a", &text(10)),
                Reading {
                    id: ("shop".into(), "cart-b".into()),
                    counts: Err("larger than 4 MiB".into()),
                },
            ],
        );
        let view = stats.view(TICK);
        assert_eq!((view.proxies, view.unreadable), (1, 1));
        assert_eq!(view.edges[0].signals.requests, 10);
        stats.record(
            at(20),
            vec![reading("cart-a", &text(10)), reading("cart-b", &text(500))],
        );
        assert!(
            stats.view(TICK).edges.is_empty(),
            "cart-b's 500 are a baseline, and cart-a's edge did not grow"
        );
    }

    /// A route that splits shows each backend's share; only the window
    /// asked for counts, and the ticks kept are bounded.
    #[test]
    fn a_split_route_shows_shares_and_the_window_is_bounded() {
        let mut stats = MeshStats::default();
        let both = |stable: u32, canary: u32| {
            format!(
                "{}{}",
                proxy(
                    "shopper",
                    "checkout.shop:80",
                    "shop/checkout/0",
                    stable,
                    0,
                    0
                ),
                proxy(
                    "shopper",
                    "checkout-canary.shop:80",
                    "shop/checkout/0",
                    canary,
                    0,
                    0
                )
            )
        };
        stats.record(at(0), vec![reading("shopper", &both(0, 0))]);
        stats.record(at(10), vec![reading("shopper", &both(90, 10))]);
        let view = stats.view(TICK);
        let share = |dst: &str| {
            view.edges
                .iter()
                .find(|e| e.dst == dst)
                .and_then(|e| e.split_share)
        };
        assert_eq!(share("checkout.shop:80"), Some(0.9));
        assert_eq!(share("checkout-canary.shop:80"), Some(0.1));
        for i in 2..100 {
            stats.record(at(i * 10), vec![reading("shopper", &both(90, 10))]);
        }
        assert_eq!(stats.ticks.len(), WINDOW_TICKS);
    }

    /// The graph's arrow from a caller to a destination sums its routes,
    /// their histograms merged; a workload lists who called it, as its
    /// own proxies saw them (verified over mTLS or not).
    #[test]
    fn an_edge_across_routes_merges_histograms_and_a_server_names_its_callers() {
        let mut stats = MeshStats::default();
        let caller = |fast: u32, slow_failed: u32| {
            format!(
                "{}{}",
                proxy("checkout", "payments.payments:80", "default", fast, 0, 3),
                proxy(
                    "checkout",
                    "payments.payments:80",
                    "payments/charge/0",
                    0,
                    slow_failed,
                    0
                )
            )
        };
        let server = |verified: u32, unknown: u32| {
            let l = |src: &str, tls: bool| {
                format!(
                    "direction=\"inbound\",src=\"{src}\",dst=\"payments\",route=\"default\",status_class=\"2xx\",tls=\"{tls}\""
                )
            };
            format!(
                "weft_proxy_requests_total{{{}}} {verified}\n\
                 weft_proxy_requests_total{{{}}} {unknown}\n",
                l("spiffe://cluster.local/ns/shop/sa/checkout", true),
                l("unknown", false),
            )
        };
        let read = |pod: &str, ns: &str, text: &str| Reading {
            id: (ns.into(), pod.into()),
            counts: ProxyCounts::read(ns, text),
        };
        stats.record(
            at(0),
            vec![
                read("checkout-a", "shop", &caller(0, 0)),
                read("payments-a", "payments", &server(0, 0)),
            ],
        );
        stats.record(
            at(10),
            vec![
                read("checkout-a", "shop", &caller(98, 2)),
                read("payments-a", "payments", &server(90, 10)),
            ],
        );
        let view = stats.view(TICK);
        assert_eq!(view.edges.len(), 2, "one row per route");
        let [d] = &view.destinations[..] else {
            panic!(
                "one arrow from checkout to payments: {:?}",
                view.destinations
            )
        };
        assert_eq!(
            (d.src.as_str(), d.dst.as_str()),
            ("checkout", "payments.payments:80")
        );
        assert_eq!(d.signals.requests, 100);
        assert_eq!(d.signals.success_rate, Some(0.98));
        // 98 under 5 ms, 2 in 5..100 ms: the merged p99 falls in the slow
        // bucket; neither route's own p99 (5 and 99.5) is it.
        let p99 = d.signals.p99_ms.unwrap();
        assert!(p99 > 5.0 && p99 < 99.5, "{p99}");
        assert_eq!(
            d.resilience.retries_per_second, 0.0,
            "3 retries were counted before the window"
        );
        let [w] = &view.workloads[..] else {
            panic!("{:?}", view.workloads)
        };
        let callers: Vec<_> = w
            .callers
            .iter()
            .map(|c| (c.src.as_str(), c.requests, c.mtls_share))
            .collect();
        assert_eq!(
            callers,
            [
                ("spiffe://cluster.local/ns/shop/sa/checkout", 90, Some(1.0)),
                ("unknown", 10, Some(0.0))
            ]
        );
    }

    /// Anything can answer on a pod's admin port: values no proxy sends
    /// (`NaN`, `+Inf`, negative) are ignored, and an answer with more
    /// series or buckets than a proxy has is not used at all.
    #[test]
    fn what_no_proxy_would_send_is_ignored_or_refused() {
        let poisoned = format!(
            "{}weft_proxy_retries_total{{dst=\"payments.shop:80\"}} NaN\n\
             weft_proxy_requests_total{{direction=\"outbound\",src=\"x\",dst=\"y\",route=\"default\",status_class=\"2xx\",tls=\"false\"}} +Inf\n",
            proxy("checkout", "payments.shop:80", "default", 10, 0, 0)
        );
        let counts = ProxyCounts::read("shop", &poisoned).expect("readable");
        assert_eq!(counts.edges.len(), 1, "the +Inf series is dropped");
        assert!(counts.dsts.values().all(|d| d.retries.is_finite()));

        let many: String = (0..=MAX_SERIES_PER_PROXY)
            .map(|i| format!("weft_proxy_retries_total{{dst=\"d{i}\"}} 1\n"))
            .collect();
        assert!(
            ProxyCounts::read("shop", &many)
                .unwrap_err()
                .contains("series")
        );
        let l = "direction=\"outbound\",src=\"x\",dst=\"y\",route=\"default\"";
        let buckets: String = (0..=MAX_BUCKETS)
            .map(|i| format!("weft_proxy_request_duration_ms_bucket{{{l},le=\"{i}.5\"}} 1\n"))
            .collect();
        assert!(
            ProxyCounts::read("shop", &buckets)
                .unwrap_err()
                .contains("buckets")
        );
    }

    #[test]
    fn the_window_parameter_names_the_fix() {
        assert_eq!(parse_window("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_window("11m").unwrap_err().contains("outside 1s..10m"));
        assert!(parse_window("soon").unwrap_err().contains("give seconds"));
    }
}
