//! The operator: weft policies and the cluster reconciled into each meshed
//! namespace's `weft-proxy-config` ConfigMap and `weft-identity` Secret,
//! policy status, the mesh CA, and the staged PERMISSIVE → STRICT rollout.

pub mod ca;
pub mod desired;
pub mod driver;
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
}

/// `/livez`, `/readyz` and `/metrics` of the control plane. `ready` says
/// whether this replica can serve (caches synced, webhook certificate
/// loaded, not shutting down); it does not depend on leading, so standby
/// replicas keep serving the webhook.
pub async fn serve_admin(
    listen: SocketAddr,
    metrics: Arc<metrics::Metrics>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
) -> anyhow::Result<()> {
    let app = axum::Router::new()
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
    tracing::info!(%listen, "admin server (/livez /readyz /metrics)");
    axum::serve(listener, app).await?;
    Ok(())
}

/// Runs the operator: watches on this replica at once (`synced` turns true
/// when they have listed), then, once this replica holds the Lease,
/// [`lead`]. Returns an error when leadership is lost (the process should
/// exit and restart as a candidate), Ok on `shutdown` — also while still
/// syncing or standing by for the Lease (a standby holds nothing to give
/// up).
pub async fn run(
    client: Client,
    opts: Options,
    metrics: Arc<metrics::Metrics>,
    synced: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let writers = world::Writers::default();
    let world = writers.world();
    let (changes_tx, changes) = mpsc::unbounded_channel();
    let (leading_tx, leading) = watch::channel(false);
    world::watch_all(
        &client,
        writers,
        world::ChangeSink {
            changes: changes_tx.clone(),
            leading,
        },
    );
    tokio::pin!(shutdown);
    tokio::select! {
        () = world.synced() => {}
        () = &mut shutdown => return Ok(()),
    }
    synced.store(true, Ordering::Relaxed);
    tracing::info!("caches synced");

    let candidate = leader::Candidate {
        namespace: opts.namespace.clone(),
        lease: opts.lease.clone(),
        identity: opts.identity.clone(),
        duration: opts.lease_duration,
    };
    let leadership = tokio::select! {
        l = candidate.acquire(client.clone()) => l,
        () = &mut shutdown => {
            tracing::info!("shutting down while standing by for the lease");
            return Ok(());
        }
    };
    metrics.leading(true);

    let ctx = Arc::new(reconcile::Ctx::new(
        client.clone(),
        world,
        Arc::new(observe::HttpScraper::default()),
        metrics.clone(),
        opts.namespace.clone(),
        Some(opts.identity.clone()),
    ));
    // Changes from now on reach the compile loop; earlier ones are in the
    // caches, which the first compile in `lead` reads.
    leading_tx.send_replace(true);
    let ended = lead(
        ctx,
        changes,
        changes_tx,
        opts.concurrency,
        leadership.lost(),
        shutdown,
    )
    .await;
    leading_tx.send_replace(false);
    metrics.leading(false);
    match ended {
        Ended::Lost => Err(anyhow::anyhow!(
            "lost the lease {}: stopped writing so that only one replica writes",
            opts.lease
        )),
        Ended::Shutdown => {
            leadership.release().await;
            Ok(())
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
    let writers = WriterTasks(vec![
        tokio::spawn(watch_ca(ctx.clone(), all_tx.clone())),
        tokio::spawn(driver::compile_loop(ctx.clone(), changes, one_tx, all_tx)),
    ]);
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
            tracing::error!("leadership lost: stopping every writer now");
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
