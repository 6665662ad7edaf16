//! Leader election with a `coordination.k8s.io/v1` Lease, so that of the
//! control plane's replicas exactly one writes (the webhook serves on all).
//!
//! The holder renews every third of the lease's duration. A candidate
//! takes the lease once its record (holder, times, resourceVersion) has
//! not changed for a whole duration by the candidate's own monotonic
//! clock, as client-go does: the holder's `renewTime` is never compared
//! with the local clock, so clock skew between nodes cannot hand a live
//! lease to a second writer. Every write goes through `replace` with the
//! `resourceVersion` that was read, so two candidates cannot both win: the
//! loser gets a 409 and reads again.
//!
//! Every attempt to acquire or renew is bounded by a timeout (an API
//! server that accepts the connection and never answers must not hold the
//! leader past its lease). A leader that has not renewed within the renew
//! deadline (two thirds of the duration after its last successful renewal
//! began, so a third of the lease is left) stops writing at once
//! ([`Leadership::lost`] resolves): every writer is aborted rather than
//! unwound (`super::lead`), and only then does the replica campaign again,
//! as a standby. On shutdown the leader releases the lease so a standby
//! takes over without waiting.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// Who competes for which lease.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub namespace: String,
    pub lease: String,
    /// This replica (its pod name).
    pub identity: String,
    pub duration: Duration,
}

/// Held leadership: renewed in the background until dropped or lost.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    candidate: Candidate,
}

fn micro(t: SystemTime) -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::try_from(t).unwrap_or_default())
}

/// A lease as a candidate saw it: any write by the holder changes it.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    spec: LeaseSpec,
    resource_version: Option<String>,
}

/// The lease record a candidate last saw change, and when, by its own
/// monotonic clock.
#[derive(Debug, Clone)]
struct Observed {
    record: Record,
    at: Instant,
}

impl Observed {
    /// Notes `record` as read at `now`; the clock restarts only when the
    /// record differs from the one seen before.
    fn see(seen: &mut Option<Observed>, record: Record, now: Instant) {
        if seen.as_ref().is_none_or(|o| o.record != record) {
            *seen = Some(Observed { record, at: now });
        }
    }

    /// Whether the holder has let the lease run out: its record has not
    /// changed for a whole lease duration since this replica saw it change.
    fn expired(&self, now: Instant) -> bool {
        let secs = self.record.spec.lease_duration_seconds.unwrap_or(15).max(1);
        let ttl = Duration::from_secs(u64::try_from(secs).unwrap_or(15));
        now.saturating_duration_since(self.at) > ttl
    }
}

impl Candidate {
    fn spec(&self, now: SystemTime, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| micro(now))),
            renew_time: Some(micro(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// How long after a renewal began the leader may go on without another:
    /// a third of the lease is then still left (client-go's 10 s of 15 s).
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// One attempt to hold the lease: Ok(true) when this replica holds it
    /// now. `seen` is what this replica saw of another holder's lease.
    async fn try_hold(
        &self,
        api: &Api<Lease>,
        seen: &mut Option<Observed>,
    ) -> Result<bool, kube::Error> {
        let now = SystemTime::now();
        let Some(mut lease) = api.get_opt(&self.lease).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, 0, None)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !mine && !free {
            let record = Record {
                spec: spec.clone(),
                resource_version: lease.metadata.resource_version.clone(),
            };
            Observed::see(seen, record, Instant::now());
            if !seen.as_ref().is_some_and(|o| o.expired(Instant::now())) {
                return Ok(false);
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(now, transitions, acquired));
        match api
            .replace(&self.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`Self::try_hold`] that gives up at `deadline`: an API server that
    /// never answers is a failed attempt, not a wait without end.
    async fn try_hold_by(
        &self,
        api: &Api<Lease>,
        seen: &mut Option<Observed>,
        deadline: Instant,
    ) -> Result<bool, String> {
        match tokio::time::timeout_at(deadline, self.try_hold(api, seen)).await {
            Ok(Ok(held)) => Ok(held),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the API server did not answer in time".into()),
        }
    }

    /// Waits until this replica holds the lease, then keeps renewing it.
    pub async fn acquire(self, client: Client) -> Leadership {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        let retry = self.duration / 3;
        let mut waiting_logged = false;
        let mut seen = None;
        let held_since = loop {
            let attempt = Instant::now();
            // A write that lands after this gives up is read back as "mine"
            // by the next attempt, which renews it.
            let deadline = attempt + self.renew_deadline();
            match self.try_hold_by(&api, &mut seen, deadline).await {
                Ok(true) => break attempt,
                Ok(false) => {
                    if !waiting_logged {
                        tracing::info!(lease = %self.lease, "another replica leads; standing by");
                        waiting_logged = true;
                    }
                }
                Err(e) => tracing::warn!(lease = %self.lease, error = %e, "lease"),
            }
            tokio::time::sleep_until(attempt + retry).await;
        };
        tracing::info!(lease = %self.lease, identity = %self.identity, "leading");
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(renew(self.clone(), api.clone(), tx, held_since));
        Leadership {
            lost,
            task,
            api,
            candidate: self,
        }
    }
}

/// Renews the lease until it cannot; `renewed` is when the last successful
/// write began (the lease runs from then, by the renewTime it carries).
async fn renew(c: Candidate, api: Api<Lease>, lost: watch::Sender<bool>, mut renewed: Instant) {
    let period = c.duration / 3;
    let retry = (c.duration / 10).max(Duration::from_millis(100));
    let mut next = renewed + period;
    loop {
        tokio::time::sleep_until(next).await;
        let deadline = renewed + c.renew_deadline();
        let attempt = Instant::now();
        match c.try_hold_by(&api, &mut None, deadline).await {
            Ok(true) => {
                renewed = attempt;
                next = attempt + period;
                continue;
            }
            Ok(false) => {
                tracing::warn!(lease = %c.lease, "the lease was taken over");
                let _ = lost.send(true);
                return;
            }
            Err(e) => tracing::warn!(lease = %c.lease, error = %e, "renewing the lease"),
        }
        // Stop while a third of the lease is left, before a standby can
        // take it over while this replica still writes.
        if Instant::now() >= deadline {
            tracing::warn!(lease = %c.lease, "could not renew the lease in time; stopping");
            let _ = lost.send(true);
            return;
        }
        next = (Instant::now() + retry).min(deadline);
    }
}

impl Leadership {
    /// Resolves when leadership is lost; it does not borrow `self`, so it
    /// can be handed to the term it ends.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut rx = self.lost.clone();
        async move {
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }

    /// Gives the lease up (on shutdown), so a standby takes over at once;
    /// bounded, so an API server that does not answer cannot hold the
    /// shutdown (the standby then waits out the lease instead).
    pub async fn release(self) {
        self.task.abort();
        self.candidate.give_up(&self.api).await;
    }
}

/// Dropped, leadership stops renewing (the lease then runs out); only
/// [`Leadership::release`] gives it up at once.
impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Candidate {
    /// Gives the lease up if it names this replica; for a shutdown that
    /// interrupted [`Candidate::acquire`], whose last write may have landed
    /// unseen (it would otherwise hold the standbys off for a whole lease
    /// duration). Bounded like [`Leadership::release`].
    pub async fn release(&self, client: Client) {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        self.give_up(&api).await;
    }

    async fn give_up(&self, api: &Api<Lease>) {
        let limit = self.renew_deadline();
        if tokio::time::timeout(limit, self.clear_holder(api))
            .await
            .is_err()
        {
            tracing::warn!("releasing the lease: the API server did not answer in time");
        }
    }

    /// Clears the holder if it is this replica; the replace carries the
    /// resourceVersion read, so a takeover meanwhile is left alone.
    async fn clear_holder(&self, api: &Api<Lease>) {
        let Ok(Some(mut lease)) = api.get_opt(&self.lease).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = api
            .replace(&self.lease, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing the lease");
        } else {
            tracing::info!("released the lease");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use serde_json::{Value, json};

    use super::*;

    fn record(holder: &str, renewed: SystemTime, rv: &str) -> Record {
        Record {
            spec: LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(micro(renewed)),
                ..LeaseSpec::default()
            },
            resource_version: Some(rv.into()),
        }
    }

    #[test]
    fn a_lease_expires_a_whole_duration_after_this_replica_saw_it_change() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        // The holder's clock runs an hour behind ours: by renewTime the
        // lease looks long dead, yet it was just renewed.
        let skewed = SystemTime::now() - secs(3600);
        let mut seen = None;
        Observed::see(&mut seen, record("a", skewed, "1"), t0);
        let o = seen.clone().expect("seen");
        assert!(!o.expired(t0), "renewTime is not compared with our clock");
        assert!(!o.expired(t0 + secs(15)));
        assert!(o.expired(t0 + secs(16)), "unchanged for a whole duration");

        // A renewal (a new record) restarts our clock, whatever it says.
        Observed::see(&mut seen, record("a", skewed, "2"), t0 + secs(10));
        let o = seen.clone().expect("seen");
        assert!(!o.expired(t0 + secs(16)));
        assert!(o.expired(t0 + secs(26)));
        // Reading the same record again does not.
        Observed::see(&mut seen, record("a", skewed, "2"), t0 + secs(20));
        assert!(seen.expect("seen").expired(t0 + secs(26)));
        // The holder's clock running ahead does not keep a dead lease.
        let ahead = SystemTime::now() + secs(3600);
        let mut seen = None;
        Observed::see(&mut seen, record("a", ahead, "7"), t0);
        assert!(seen.expect("seen").expired(t0 + secs(16)));
    }

    /// An in-memory Lease API: GET, POST and PUT of one Lease; once `hang`
    /// is set, requests are accepted and never answered.
    pub(crate) fn lease_api(hang: Arc<AtomicBool>) -> (Client, Arc<Mutex<Option<Value>>>) {
        let stored: Arc<Mutex<Option<Value>>> = Arc::default();
        let rv = Arc::new(AtomicU64::new(0));
        let store = stored.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (hang, store, rv) = (hang.clone(), store.clone(), rv.clone());
            async move {
                if hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                let method = req.method().clone();
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let body: Value = body
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                let mut lease = store.lock().expect("lease");
                let (code, out) = match (method, lease.clone()) {
                    (http::Method::GET, Some(l)) => (200, l),
                    (http::Method::GET, None) => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                    (http::Method::POST | http::Method::PUT, _) => {
                        let mut l = body;
                        l["metadata"]["resourceVersion"] =
                            json!(rv.fetch_add(1, Ordering::SeqCst).to_string());
                        *lease = Some(l.clone());
                        (200, l)
                    }
                    _ => (405, Value::Null),
                };
                let rsp = http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        out.to_string(),
                    )))
                    .expect("response");
                Ok::<_, std::convert::Infallible>(rsp)
            }
        });
        (Client::new(svc, "weft-system"), stored)
    }

    /// A renewal the API server never answers must not keep the replica
    /// leading past its lease: it is given up in time and leadership is
    /// lost while the lease it last wrote still holds. (An in-memory API;
    /// a short lease, so the test waits two seconds.)
    #[tokio::test]
    async fn a_renewal_that_never_answers_stops_leading_before_the_lease_runs_out() {
        let hang = Arc::new(AtomicBool::new(false));
        let (client, stored) = lease_api(hang.clone());
        let duration = Duration::from_secs(3);
        let candidate = Candidate {
            namespace: "weft-system".into(),
            lease: "weft-operator".into(),
            identity: "replica-a".into(),
            duration,
        };
        let before = Instant::now();
        let leadership = candidate.acquire(client).await;
        let held = stored
            .lock()
            .expect("lease")
            .clone()
            .expect("lease created");
        assert_eq!(held["spec"]["holderIdentity"], "replica-a");

        hang.store(true, Ordering::SeqCst);
        tokio::time::timeout(duration * 4, leadership.lost())
            .await
            .expect("leadership is given up when renewals hang");
        assert!(
            before.elapsed() < duration,
            "stopped after {:?}, past the lease of {duration:?} written at the start",
            before.elapsed()
        );
    }

    /// A shutdown that cut an acquire short gives up a lease the acquire's
    /// last write may have taken, and leaves another replica's alone.
    #[tokio::test]
    async fn releasing_as_a_candidate_clears_only_this_replicas_hold() {
        let (client, stored) = lease_api(Arc::default());
        let candidate = |identity: &str| Candidate {
            namespace: "weft-system".into(),
            lease: "weft-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
        };
        let holder = || {
            stored.lock().expect("lease").as_ref().expect("lease")["spec"]["holderIdentity"].clone()
        };
        // Nothing to release: no lease at all.
        candidate("replica-a").release(client.clone()).await;
        assert!(stored.lock().expect("lease").is_none());

        // Dropped: renewing stops, the hold stays until it runs out.
        drop(candidate("replica-a").acquire(client.clone()).await);
        assert_eq!(holder(), "replica-a");
        candidate("replica-b").release(client.clone()).await;
        assert_eq!(
            holder(),
            "replica-a",
            "another replica's hold is left alone"
        );
        candidate("replica-a").release(client).await;
        assert_eq!(holder(), Value::Null, "this replica's hold is given up");
    }
}
