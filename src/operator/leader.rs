//! Leader election with a `coordination.k8s.io/v1` Lease, so that of the
//! control plane's replicas exactly one writes (the webhook serves on all).
//!
//! The holder renews every third of the lease's duration; a candidate takes
//! the lease once the holder has not renewed for a whole duration. Every
//! write goes through `replace` with the `resourceVersion` that was read,
//! so two candidates cannot both win: the loser gets a 409 and reads again.
//! A leader that cannot renew before its lease runs out stops writing at
//! once ([`Leadership::lost`] resolves) — the process then exits and
//! restarts as a candidate, which is simpler and safer than unwinding
//! half-done work. On shutdown the leader releases the lease so a standby
//! takes over without waiting.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

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

fn expired(spec: &LeaseSpec, now: SystemTime) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().map(|t| SystemTime::from(t.0)) else {
        return true;
    };
    let ttl = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    now.duration_since(renewed).unwrap_or_default() > ttl
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

    /// One attempt to hold the lease: Ok(true) when this replica holds it
    /// now.
    async fn try_hold(&self, api: &Api<Lease>) -> Result<bool, kube::Error> {
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
        if !mine && !free && !expired(&spec, now) {
            return Ok(false);
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

    /// Waits until this replica holds the lease, then keeps renewing it.
    pub async fn acquire(self, client: Client) -> Leadership {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        let retry = self.duration / 3;
        let mut waiting_logged = false;
        loop {
            match self.try_hold(&api).await {
                Ok(true) => break,
                Ok(false) => {
                    if !waiting_logged {
                        tracing::info!(lease = %self.lease, "another replica leads; standing by");
                        waiting_logged = true;
                    }
                }
                Err(e) => tracing::warn!(lease = %self.lease, error = %e, "lease"),
            }
            tokio::time::sleep(retry).await;
        }
        tracing::info!(lease = %self.lease, identity = %self.identity, "leading");
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(renew(self.clone(), api.clone(), tx));
        Leadership {
            lost,
            task,
            api,
            candidate: self,
        }
    }
}

async fn renew(c: Candidate, api: Api<Lease>, lost: watch::Sender<bool>) {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(c.duration / 3).await;
        match c.try_hold(&api).await {
            Ok(true) => last = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %c.lease, "the lease was taken over");
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %c.lease, error = %e, "renewing the lease");
                // Stop before the lease can run out under a new holder.
                if last.elapsed() + c.duration / 3 >= c.duration {
                    tracing::error!(lease = %c.lease, "could not renew the lease in time");
                    let _ = lost.send(true);
                    return;
                }
            }
        }
    }
}

impl Leadership {
    /// Resolves when leadership is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Gives the lease up (on shutdown), so a standby takes over at once.
    pub async fn release(self) {
        self.task.abort();
        let Ok(Some(mut lease)) = self.api.get_opt(&self.candidate.lease).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.candidate.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self
            .api
            .replace(&self.candidate.lease, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing the lease");
        } else {
            tracing::info!("released the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_a_whole_duration_after_its_last_renewal() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(micro(t0)),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec, t0 + Duration::from_secs(15)));
        assert!(expired(&spec, t0 + Duration::from_secs(16)));
        assert!(expired(&LeaseSpec::default(), t0), "never renewed");
    }
}
