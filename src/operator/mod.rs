//! The operator: weft policies and the cluster reconciled into each meshed
//! namespace's `weft-proxy-config` ConfigMap and its identity Secrets (one
//! per ServiceAccount), policy status, the mesh CA, and the staged PERMISSIVE → STRICT rollout.

pub mod audit;
pub mod audits;
pub mod ca;
pub mod canaries;
pub mod canary;
pub mod carotation;
pub mod carotations;
pub mod desired;
pub mod driver;
pub mod endpoints;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod rollout;
pub mod status;
pub mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::routing::get;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};

use crate::identity::CA_SECRET;

/// How the operator runs (from `weft control-plane`'s flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// The control plane's namespace: the CA and the Lease live there.
    pub namespace: String,
    pub lease: String,
    /// This replica's name (the pod name), for the Lease and Events.
    pub identity: String,
    pub lease_duration: std::time::Duration,
    /// Namespaces reconciled at once.
    pub concurrency: u16,
    /// Where the proxies' golden signals are kept for the stats API
    /// ([`collect_stats`]).
    pub stats: crate::meshstats::SharedStats,
    /// Where this replica's MTLSPolicy cache is published once its watch
    /// starts, for the dashboard's rollouts API ([`crate::dashboard`]).
    pub mtls_policies: MtlsPolicyCache,
}

/// The operator's MTLSPolicy cache, once it exists.
pub type MtlsPolicyCache =
    Arc<std::sync::OnceLock<kube::runtime::reflector::Store<crate::api::MTLSPolicy>>>;

/// The rollouts API's source: every MTLSPolicy in `cache`.
pub fn rollouts_source(cache: MtlsPolicyCache) -> crate::dashboard::RolloutsSource {
    Arc::new(move || match cache.get() {
        Some(store) => {
            let policies = store.state();
            crate::dashboard::RolloutsView::of(policies.iter().map(|p| &**p))
        }
        None => crate::dashboard::RolloutsView {
            version: crate::meshstats::API_VERSION.to_owned(),
            rollouts: Vec::new(),
            note: Some("the control plane has not listed the MTLSPolicies yet".to_owned()),
        },
    })
}

/// Proxies read at once by [`collect_stats`].
pub const STATS_SCRAPE_CONCURRENCY: usize = 16;

/// Reads every running injected pod's proxy each [`crate::meshstats::TICK`]
/// into `stats`, for `GET /api/v1/stats`. Every replica does (not only the
/// leader), so whichever replica the API server's service proxy reaches
/// answers with the same figures; the cost is one read of each proxy per
/// replica per tick, at most [`STATS_SCRAPE_CONCURRENCY`] at once, each
/// bounded as the rollout's is ([`observe::MAX_SCRAPE_BYTES`],
/// [`observe::SCRAPE_TIMEOUT`]; a proxy skipped is counted in
/// `weft_operator_scrapes_skipped_total` and shown as unreadable).
pub async fn collect_stats(
    namespaces: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>,
    pods: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod>,
    scraper: Arc<dyn observe::Scraper>,
    stats: crate::meshstats::SharedStats,
) {
    collect_stats_every(namespaces, pods, scraper, stats, crate::meshstats::TICK).await;
}

async fn collect_stats_every(
    namespaces: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>,
    pods: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod>,
    scraper: Arc<dyn observe::Scraper>,
    stats: crate::meshstats::SharedStats,
    tick: std::time::Duration,
) {
    use futures_util::StreamExt as _;
    use kube::ResourceExt as _;

    use crate::meshstats::{ProxyCounts, Reading};
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let meshed = reconcile::meshed_namespaces(&namespaces);
        // The injector's pods of meshed namespaces: a pod elsewhere that
        // names a container `weft-proxy` is nobody the stats should read.
        let targets: Vec<(String, String, std::net::IpAddr)> = pods
            .state()
            .iter()
            .filter(|p| p.namespace().is_some_and(|ns| meshed.contains(&ns)))
            .filter(|p| reconcile::injected(p) && reconcile::running(p))
            .filter_map(|p| {
                let ip = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
                Some((p.namespace()?, p.name_any(), ip))
            })
            .collect();
        let readings: Vec<Reading> = futures_util::stream::iter(targets)
            .map(|(namespace, pod, ip)| {
                let read = scraper.scrape(ip);
                async move {
                    let counts = match read.await {
                        // Off the runtime's threads: a 4 MiB answer takes
                        // a while to parse, and the webhook shares them.
                        Ok(text) => {
                            let ns = namespace.clone();
                            tokio::task::spawn_blocking(move || ProxyCounts::read(&ns, &text))
                                .await
                                .unwrap_or_else(|e| Err(format!("parsing failed: {e}")))
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    Reading {
                        id: (namespace, pod),
                        counts,
                    }
                }
            })
            .buffer_unordered(STATS_SCRAPE_CONCURRENCY)
            .collect()
            .await;
        crate::proxy::resilience::lock(&stats).record(std::time::SystemTime::now(), readings);
    }
}

/// `/livez`, `/readyz` and `/metrics` of the control plane. `ready` says
/// whether this replica can serve (caches synced, webhook certificate
/// loaded, not shutting down); it does not depend on leading, so standby
/// replicas keep serving the webhook.
/// Connections the control plane's admin server holds open at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

pub async fn serve_admin(
    listen: SocketAddr,
    metrics: Arc<metrics::Metrics>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    dashboard: crate::dashboard::Sources,
) -> anyhow::Result<()> {
    let app = crate::dashboard::router(dashboard)
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (http::StatusCode::OK, "ready")
                    } else {
                        (
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: caches syncing, certificate loading, or shutting down",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin listener on {listen}"))?;
    tracing::info!(
        %listen,
        "admin server (/livez /readyz /metrics, the dashboard at / and its API under /api/v1/)"
    );
    // Bounded as the proxy's admin port is: slow or idle clients are cut
    // off, and at most this many connections are open at once.
    let cap = crate::proxy::server::ConnLimit::new(ADMIN_MAX_CONNECTIONS, Default::default());
    crate::proxy::server::serve_router(
        listener,
        "control-plane admin",
        app,
        crate::proxy::server::HttpLimits::default(),
        cap,
    )
    .await;
    Ok(())
}

/// Runs the operator until `shutdown`: watches on this replica at once
/// (`synced` turns true when they have listed), then campaigns for the
/// Lease and, each time it wins it, runs [`lead`] for as long as it holds
/// it. A replica that loses the lease stops writing and stands by to lead
/// again, without a restart (so the webhook in the same process serves
/// on). Returns on `shutdown` — also while still syncing or standing by
/// for the Lease (a standby holds nothing to give up).
pub async fn run(
    client: Client,
    opts: Options,
    metrics: Arc<metrics::Metrics>,
    synced: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let writers = world::Writers::default();
    let world = writers.world();
    // Published once listed, so the rollouts API never says "none" for a
    // cache that has not listed yet. Run is called once per process; a
    // second call keeps the first cache.
    tokio::spawn({
        let (store, cell) = (world.mtls_policies.clone(), opts.mtls_policies.clone());
        async move {
            if store.wait_until_ready().await.is_ok() {
                let _ = cell.set(store);
            }
        }
    });
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let (leading_tx, leading) = watch::channel(false);
    world::watch_all(
        &client,
        writers,
        world::ChangeSink {
            changes: changes_tx,
            leading,
        },
    );
    let shutdown = shutdown.shared();
    tokio::select! {
        () = world.synced() => {}
        () = shutdown.clone() => return,
    }
    synced.store(true, Ordering::Relaxed);
    tracing::info!("caches synced");
    // Aborted when `run` returns (a JoinSet aborts its tasks when dropped).
    let mut collector = tokio::task::JoinSet::new();
    collector.spawn(collect_stats(
        world.namespaces.clone(),
        world.pods.clone(),
        Arc::new(observe::HttpScraper::with_metrics(metrics.clone())),
        opts.stats.clone(),
    ));

    let candidate = leader::Candidate {
        namespace: opts.namespace.clone(),
        lease: opts.lease.clone(),
        identity: opts.identity.clone(),
        duration: opts.lease_duration,
    };
    campaign(
        candidate,
        &client,
        &metrics,
        &leading_tx,
        &mut changes,
        shutdown,
        |term| {
            // A new context each term, as a restarted process would have:
            // nothing the last term left (its closed detached writers
            // included) carries over; the caches do.
            let ctx = Arc::new(
                reconcile::Ctx::new(
                    client.clone(),
                    world.clone(),
                    Arc::new(observe::HttpScraper::with_metrics(metrics.clone())),
                    metrics.clone(),
                    opts.namespace.clone(),
                    Some(opts.identity.clone()),
                )
                .with_stats(opts.stats.clone()),
            );
            lead(
                ctx,
                term.changes,
                term.retry,
                opts.concurrency,
                term.lost,
                term.shutdown,
            )
        },
    )
    .await;
}

/// One term as leader: what [`lead`] is given.
struct Term<S> {
    /// The watches' changes from the start of this term.
    changes: mpsc::UnboundedReceiver<world::Change>,
    /// A sender into `changes`.
    retry: mpsc::UnboundedSender<world::Change>,
    /// Resolves when this term's lease is lost.
    lost: BoxFuture<'static, ()>,
    shutdown: S,
}

/// Campaigns for the lease with `client` and, each time this replica
/// wins it, runs `term` until it returns: on [`Ended::Lost`] (its
/// writers all stopped, as [`lead`] guarantees) this replica stands by
/// and campaigns again; on [`Ended::Shutdown`] it releases the lease and
/// returns, as it does on `shutdown` while standing by. `leading` says
/// whether the watches pass their changes on, to `changes`; `metrics`
/// shows whether this replica leads.
async fn campaign<S, T, F>(
    candidate: leader::Candidate,
    client: &Client,
    metrics: &metrics::Metrics,
    leading: &watch::Sender<bool>,
    changes: &mut mpsc::UnboundedReceiver<world::Change>,
    shutdown: S,
    mut term: T,
) where
    S: Future<Output = ()> + Clone,
    T: FnMut(Term<S>) -> F,
    F: Future<Output = Ended>,
{
    loop {
        let leadership = tokio::select! {
            l = candidate.clone().acquire(client.clone()) => l,
            () = shutdown.clone() => {
                tracing::info!("shutting down while standing by for the lease");
                // The acquire's last write may have landed unseen.
                candidate.release(client.clone()).await;
                return;
            }
        };
        metrics.leading(true);
        // Changes from now on reach this term's compile loop; earlier
        // ones (queued while the last term wound down) are in the
        // caches, which the first compile in `lead` reads.
        while changes.try_recv().is_ok() {}
        // A channel per term: the compile loop that holds its receiver
        // is aborted with the term, while the watches' sender lives on.
        let (retry, term_changes) = mpsc::unbounded_channel();
        leading.send_replace(true);
        let forward = async {
            while let Some(change) = changes.recv().await {
                if retry.send(change).is_err() {
                    break;
                }
            }
            std::future::pending::<std::convert::Infallible>().await
        };
        let this = Term {
            changes: term_changes,
            retry: retry.clone(),
            lost: Box::pin(leadership.lost()),
            shutdown: shutdown.clone(),
        };
        let ended = tokio::select! {
            ended = term(this) => ended,
            never = forward => match never {},
        };
        leading.send_replace(false);
        metrics.leading(false);
        match ended {
            Ended::Lost => tracing::warn!(
                lease = %candidate.lease,
                "lost the lease: every writer stopped; standing by to lead again"
            ),
            Ended::Shutdown => {
                leadership.release().await;
                return;
            }
        }
    }
}

/// How [`lead`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Leadership was lost: everything that writes was stopped at once.
    Lost,
    /// Shutdown: in-flight reconciles were let finish.
    Shutdown,
}

/// Aborts its tasks when dropped, so no writer outlives [`lead`] whichever
/// way it returns.
struct WriterTasks(Vec<tokio::task::JoinHandle<()>>);

impl WriterTasks {
    fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }

    /// Aborts every task and waits until none runs any more.
    async fn stop(mut self) {
        self.abort();
        for t in self.0.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for WriterTasks {
    fn drop(&mut self) {
        self.abort();
    }
}

/// What the leader runs: the first compile, the CA, the policy statuses,
/// the compile loop (fed by `changes`; `retry` is its own sender, for a
/// first compile that failed), the CA watch and the namespace controller,
/// until `lost` or `shutdown` resolves. Every task that writes is tied to
/// this call: when leadership is lost they are all aborted, the controller
/// included (its in-flight reconciles are dropped rather than let finish
/// under a lease another replica may hold), and awaited before this
/// returns; on shutdown the controller's in-flight reconciles finish first.
pub async fn lead(
    ctx: Arc<reconcile::Ctx>,
    changes: mpsc::UnboundedReceiver<world::Change>,
    retry: mpsc::UnboundedSender<world::Change>,
    concurrency: u16,
    lost: impl std::future::Future<Output = ()>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Ended {
    tokio::pin!(lost, shutdown);
    let setup = async {
        if driver::try_recompile(&ctx).await.is_err() {
            // The compile loop retries it with its backoff.
            let _ = retry.send(world::Change::Inputs);
        }
        if let Err(e) = ca::ensure(&ctx).await {
            tracing::warn!(error = %e, "reading the mesh CA; retrying when it changes");
        }
        driver::write_policy_statuses(&ctx).await;
    };
    tokio::select! {
        () = &mut lost => return Ended::Lost,
        () = &mut shutdown => return Ended::Shutdown,
        () = setup => {}
    }
    let (one_tx, one) = mpsc::unbounded_channel();
    let (all_tx, all) = mpsc::unbounded_channel();
    let mut writers = WriterTasks(vec![
        tokio::spawn(watch_ca(ctx.clone(), all_tx.clone())),
        tokio::spawn(driver::compile_loop(
            ctx.clone(),
            changes,
            one_tx,
            all_tx.clone(),
        )),
    ]);
    // The canaries, the audits and the CA rotation read the mesh stats this replica
    // collects; a context without them (tests of the controller alone)
    // runs neither.
    if let Some(stats) = ctx.stats.clone() {
        writers.0.push(tokio::spawn(canaries::run(
            ctx.clone(),
            stats.clone(),
            crate::meshstats::TICK,
        )));
        writers.0.push(tokio::spawn(audits::run(
            ctx.clone(),
            stats.clone(),
            crate::meshstats::TICK,
        )));
        writers.0.push(tokio::spawn(carotations::run(
            ctx.clone(),
            stats,
            crate::meshstats::TICK,
            all_tx,
        )));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let detached = ctx.detached.clone();
    let mut controller = tokio::spawn(driver::run_controller(
        ctx,
        one,
        all,
        concurrency,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut controller_ended = false;
    let ended = tokio::select! {
        () = &mut lost => Ended::Lost,
        () = &mut shutdown => Ended::Shutdown,
        _ = &mut controller => {
            controller_ended = true;
            // The controller ends only when its triggers close, which
            // they do not while the writers run; should it end anyway,
            // wait for the lease or the shutdown as before.
            tracing::error!("the namespace controller stopped");
            tokio::select! {
                () = &mut lost => Ended::Lost,
                () = &mut shutdown => Ended::Shutdown,
            }
        }
    };
    match ended {
        Ended::Lost => {
            tracing::warn!("leadership lost: stopping every writer now");
            controller.abort();
            writers.abort();
            // Closed, not only aborted: a reconcile of the controller
            // still winding down cannot start another.
            detached.close();
        }
        Ended::Shutdown => {
            let _ = stop_tx.send(());
        }
    }
    if !controller_ended {
        let _ = controller.await;
    }
    writers.stop().await;
    ended
}

/// Re-reads the CA whenever Secret `weft-ca` changes (or every 5 minutes),
/// and asks for every namespace when the CA in use changed.
async fn watch_ca(ctx: Arc<reconcile::Ctx>, all: mpsc::UnboundedSender<()>) {
    let api: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), &ctx.control_namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={CA_SECRET}"));
    let events = watcher(api, config).default_backoff();
    futures_util::pin_mut!(events);
    loop {
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(300),
            futures_util::StreamExt::next(&mut events),
        )
        .await;
        match next {
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "watching the mesh CA");
                continue;
            }
            Ok(Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_)))) => continue,
            Ok(Some(Ok(_))) | Err(_) => {}
        }
        match ca::ensure(&ctx).await {
            Ok(true) => {
                tracing::info!("the mesh CA changed: re-issuing identities everywhere");
                if all.send(()).is_err() {
                    return;
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "reading the mesh CA"),
        }
        // Statuses carry the CA's condition.
        driver::write_policy_statuses(&ctx).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::future::Shared;
    use serde_json::{Value, json};

    use super::world::Change;
    use super::*;

    /// Bounds every wait, so that a broken campaign fails the test instead
    /// of hanging it.
    const WAIT: Duration = Duration::from_secs(10);

    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        match tokio::time::timeout(WAIT, f).await {
            Ok(t) => t,
            Err(_) => panic!("{what}: not within {WAIT:?}"),
        }
    }

    /// What a term saw, in order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Started,
        Change(Change),
        Ended(Ended),
    }

    /// A [`campaign`] of replica-a against an in-memory Lease API, with a
    /// term that reports what it sees and ends as [`lead`] does.
    struct Campaign {
        lease: Arc<Mutex<Option<Value>>>,
        metrics: Arc<metrics::Metrics>,
        leading: watch::Receiver<bool>,
        changes: mpsc::UnboundedSender<Change>,
        seen: mpsc::UnboundedReceiver<Seen>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    type Shutdown = Shared<BoxFuture<'static, ()>>;

    fn start() -> Campaign {
        let (client, lease) = leader::tests::lease_api(Arc::default());
        // Renewed every 200 ms: a take-over is noticed at once.
        let candidate = leader::Candidate {
            namespace: "weft-system".into(),
            lease: "weft-operator".into(),
            identity: "replica-a".into(),
            duration: Duration::from_millis(600),
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let (leading_tx, leading) = watch::channel(false);
        let (changes, mut changes_rx) = mpsc::unbounded_channel();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (stop, mut stopped) = watch::channel(false);
        let shutdown: Shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
        .boxed()
        .shared();
        let term = move |t: Term<Shutdown>| {
            let seen = seen_tx.clone();
            async move {
                let Term {
                    mut changes,
                    mut lost,
                    mut shutdown,
                    ..
                } = t;
                let _ = seen.send(Seen::Started);
                let ended = loop {
                    tokio::select! {
                        () = &mut lost => break Ended::Lost,
                        () = &mut shutdown => break Ended::Shutdown,
                        Some(c) = changes.recv() => {
                            let _ = seen.send(Seen::Change(c));
                        }
                    }
                };
                let _ = seen.send(Seen::Ended(ended));
                ended
            }
        };
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                let rx = &mut changes_rx;
                campaign(
                    candidate,
                    &client,
                    &metrics,
                    &leading_tx,
                    rx,
                    shutdown,
                    term,
                )
                .await;
            }
        });
        Campaign {
            lease,
            metrics,
            leading,
            changes,
            seen,
            stop,
            task,
        }
    }

    impl Campaign {
        async fn next(&mut self) -> Seen {
            within("what the term saw", self.seen.recv())
                .await
                .expect("the campaign runs")
        }

        fn gauge(&self) -> String {
            let text = self.metrics.render();
            let line = text
                .lines()
                .find(|l| l.starts_with("weft_operator_leader "));
            line.unwrap_or_default().to_owned()
        }

        fn lease(&self) -> Value {
            self.lease.lock().expect("lease").clone().expect("stored")
        }

        /// Replaces the stored lease's holder, as another replica (or its
        /// release) would.
        fn hand_to(&self, holder: Value) {
            let mut stored = self.lease.lock().expect("lease");
            let lease = stored.as_mut().expect("stored");
            lease["spec"]["holderIdentity"] = holder.clone();
            lease["spec"]["leaseDurationSeconds"] = json!(3600);
            lease["metadata"]["resourceVersion"] = json!(format!("handed to {holder}"));
        }

        /// Until this replica stands by: not leading, by the watches and
        /// by the metric.
        async fn standing_by(&mut self) {
            within("standing by", self.leading.wait_for(|l| !*l))
                .await
                .expect("the campaign runs");
            within("the metric", async {
                while self.gauge() != "weft_operator_leader 0" {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
    }

    /// Losing the lease ends the term (its writers stopped), and the
    /// replica stands by — writing nothing, not even to the Lease, while
    /// another replica holds it — then leads again in a new term once the
    /// lease is free, with the watches' changes from then on. Shutdown ends
    /// the term and releases the lease.
    #[tokio::test]
    async fn a_replica_that_loses_the_lease_stands_by_and_leads_again() {
        let mut c = start();
        assert_eq!(c.next().await, Seen::Started);
        assert_eq!(c.gauge(), "weft_operator_leader 1");
        assert!(*c.leading.borrow());
        assert_eq!(c.lease()["spec"]["holderIdentity"], "replica-a");
        c.changes.send(Change::Inputs).expect("send");
        assert_eq!(c.next().await, Seen::Change(Change::Inputs));

        c.hand_to(json!("replica-b"));
        assert_eq!(c.next().await, Seen::Ended(Ended::Lost));
        c.standing_by().await;
        // Queued as the term wound down: in the caches already.
        c.changes.send(Change::Child("stale".into())).expect("send");
        assert_eq!(c.lease()["spec"]["holderIdentity"], "replica-b");
        assert!(c.seen.try_recv().is_err(), "a term while replica-b leads");
        assert!(!c.task.is_finished());

        c.hand_to(Value::Null);
        assert_eq!(c.next().await, Seen::Started);
        assert_eq!(c.gauge(), "weft_operator_leader 1");
        assert!(*c.leading.borrow());
        let lease = c.lease();
        assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        c.changes.send(Change::AllChildren).expect("send");
        assert_eq!(c.next().await, Seen::Change(Change::AllChildren));

        c.stop.send_replace(true);
        assert_eq!(c.next().await, Seen::Ended(Ended::Shutdown));
        within("the campaign ends", &mut c.task)
            .await
            .expect("join");
        assert_eq!(c.gauge(), "weft_operator_leader 0");
        assert_eq!(c.lease()["spec"]["holderIdentity"], Value::Null, "released");
    }

    /// Shutdown while standing by after a loss ends the campaign at once,
    /// leaving the other replica's lease alone.
    #[tokio::test]
    async fn shutdown_while_standing_by_after_a_loss_ends_the_campaign() {
        let mut c = start();
        assert_eq!(c.next().await, Seen::Started);
        c.hand_to(json!("replica-b"));
        assert_eq!(c.next().await, Seen::Ended(Ended::Lost));
        c.standing_by().await;

        c.stop.send_replace(true);
        within("the campaign ends", &mut c.task)
            .await
            .expect("join");
        assert!(c.seen.try_recv().is_err(), "no term after the loss");
        assert_eq!(c.lease()["spec"]["holderIdentity"], "replica-b");
    }
}

#[cfg(test)]
mod stats_tests {
    use std::collections::{HashMap, VecDeque};
    use std::net::IpAddr;
    use std::sync::Mutex;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::reflector::store::Writer;
    use serde_json::json;

    use super::*;
    use crate::proxy::resilience::lock;

    /// Proxies' metrics texts by pod address, one per read in turn, the
    /// last one again once the others are read; `TIMEOUT` (or no text)
    /// answers as a proxy that timed out.
    struct Canned(Mutex<HashMap<IpAddr, VecDeque<String>>>);

    const TIMEOUT: &str = "(timed out)";

    impl observe::Scraper for Canned {
        fn scrape(&self, ip: IpAddr) -> BoxFuture<'static, Result<String, observe::ScrapeError>> {
            let next = lock(&self.0).get_mut(&ip).and_then(|texts| {
                if texts.len() > 1 {
                    texts.pop_front()
                } else {
                    texts.front().cloned()
                }
            });
            Box::pin(async move {
                next.filter(|t| t != TIMEOUT).ok_or(observe::ScrapeError {
                    addr: ip.to_string(),
                    reason: "timed out".into(),
                })
            })
        }
    }

    fn pod(name: &str, ip: &str, sidecar: bool, phase: &str) -> Pod {
        pod_in("shop", name, ip, sidecar, phase)
    }

    fn pod_in(ns: &str, name: &str, ip: &str, sidecar: bool, phase: &str) -> Pod {
        let mut containers = vec![json!({"name": "app", "image": "app"})];
        if sidecar {
            containers.push(json!({"name": crate::inject::PROXY_CONTAINER, "image": "weft"}));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": containers},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .expect("pod")
    }

    fn metrics(ok: u32, failed: u32) -> String {
        let l =
            "direction=\"outbound\",src=\"checkout\",dst=\"payments.shop:80\",route=\"default\"";
        format!(
            "weft_proxy_requests_total{{{l},status_class=\"2xx\",tls=\"true\"}} {ok}\n\
             weft_proxy_requests_total{{{l},status_class=\"5xx\",tls=\"true\"}} {failed}\n"
        )
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let status = out[9..12].parse().expect("status");
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The running proxies of meshed namespaces are read each tick (not
    /// the pods without the sidecar, nor pending ones, nor a pod of an
    /// unmeshed namespace that names a container `weft-proxy`), their
    /// growth merged per edge, a proxy
    /// that cannot be read is counted, and the API serves the window, or
    /// says what is wrong with the one asked for.
    #[tokio::test]
    async fn the_stats_api_serves_what_the_running_proxies_report() {
        let mut writer = Writer::<Pod>::default();
        let store = writer.as_reader();
        for p in [
            pod("checkout-a", "10.244.1.10", true, "Running"),
            pod("checkout-b", "10.244.1.11", true, "Running"),
            pod("legacy", "10.244.1.12", false, "Running"),
            pod("checkout-c", "10.244.1.13", true, "Pending"),
            pod_in("other", "poser", "10.244.2.20", true, "Running"),
        ] {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(p));
        }
        let mut namespaces = Writer::<k8s_openapi::api::core::v1::Namespace>::default();
        let meshed = namespaces.as_reader();
        for (name, label) in [("shop", "enabled"), ("other", "disabled")] {
            namespaces.apply_watcher_event(&kube::runtime::watcher::Event::Apply(
                serde_json::from_value(json!({"metadata": {"name": name,
                    "labels": {crate::api::INJECT_LABEL: label}}}))
                .expect("namespace"),
            ));
        }
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let canned = Canned(Mutex::new(HashMap::from([
            (
                ip("10.244.1.10"),
                VecDeque::from([metrics(0, 0), metrics(99, 1)]),
            ),
            (
                ip("10.244.1.11"),
                VecDeque::from([metrics(0, 0), TIMEOUT.to_owned()]),
            ),
            (
                ip("10.244.1.12"),
                VecDeque::from([metrics(7, 7), metrics(70, 70)]),
            ),
            (
                ip("10.244.1.13"),
                VecDeque::from([metrics(7, 7), metrics(70, 70)]),
            ),
            (
                ip("10.244.2.20"),
                VecDeque::from([metrics(7, 7), metrics(70, 70)]),
            ),
        ])));
        let stats = crate::meshstats::SharedStats::default();
        let collector = tokio::spawn(collect_stats_every(
            meshed,
            store,
            Arc::new(canned),
            stats.clone(),
            Duration::from_millis(20),
        ));
        let two_ticks = async {
            while lock(&stats).view(Duration::from_secs(600)).ticks < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), two_ticks)
            .await
            .expect("two ticks");
        collector.abort();

        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let admin = tokio::spawn(serve_admin(
            addr,
            Arc::default(),
            Arc::new(|| true),
            crate::dashboard::Sources::new(stats.clone(), rollouts_source(Arc::default())),
        ));
        let mut answer = None;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                answer = Some(get(addr, "/api/v1/stats?window=10m").await);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, body) = answer.expect("the admin server answers");
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(view["version"], "v1");
        assert_eq!(
            (view["proxies"].as_u64(), view["unreadable"].as_u64()),
            (Some(1), Some(1))
        );
        let edges = view["edges"].as_array().expect("edges");
        assert_eq!(edges.len(), 1, "{view}");
        assert_eq!(edges[0]["src"], "checkout");
        assert_eq!(edges[0]["requests"], 100);
        assert_eq!(edges[0]["successRate"], 0.99);

        let (status, body) = get(addr, "/api/v1/stats?window=soon").await;
        assert_eq!(status, 400);
        assert!(body.contains("give seconds"), "{body}");
        admin.abort();
    }
}
