//! Leader election through a `coordination.k8s.io/v1` `Lease`, so two controller replicas
//! never act at once.
//!
//! The algorithm is client-go's: the holder renews the lease's `renewTime` every
//! [`LeaseSettings::retry`]; the others watch the record and take it over only after it has
//! not changed for a whole [`LeaseSettings::duration`] of their *own* clock (never comparing
//! the holder's timestamps with the local clock, so clock skew between nodes cannot make two
//! holders). Every write carries the `resourceVersion` it read, so of two replicas racing for
//! an expired lease the API server lets exactly one win (the other gets `409 Conflict`).
//!
//! A holder that cannot renew for [`LeaseSettings::renew_deadline`] (shorter than the
//! duration) steps down on its own before anyone else may take over.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};

/// Timing of the election.
#[derive(Clone, Copy, Debug)]
pub struct LeaseSettings {
    /// How long a lease that stopped changing is left to its holder.
    pub duration: Duration,
    /// How long a holder keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the holder renews and the others retry.
    pub retry: Duration,
}

impl Default for LeaseSettings {
    /// client-go's defaults.
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What one attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease (acquired, taken over or renewed).
    Leading,
    /// Another replica holds it.
    Following { holder: Option<String> },
}

/// The record as last observed, and when (local monotonic clock) it last changed.
#[derive(Debug)]
struct Observed {
    resource_version: Option<String>,
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    changed_at: Instant,
}

/// One replica's view of the lease.
#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    settings: LeaseSettings,
    observed: Mutex<Option<Observed>>,
}

fn micro(t: Timestamp) -> MicroTime {
    MicroTime(t)
}

impl LeaseLock {
    #[must_use]
    pub fn new(api: Api<Lease>, name: &str, identity: &str, settings: LeaseSettings) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            settings,
            observed: Mutex::new(None),
        }
    }

    #[must_use]
    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Remembers `lease` as seen at `now`; returns when its record last changed.
    fn observe(&self, lease: &Lease, now: Instant) -> Instant {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let renew_time = spec.renew_time.map(|t| t.0);
        let rv = lease.metadata.resource_version.clone();
        let mut slot = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = slot.as_ref().is_some_and(|o| {
            o.holder == holder && o.renew_time == renew_time && o.resource_version == rv
        });
        if !same {
            *slot = Some(Observed {
                resource_version: rv,
                holder,
                renew_time,
                changed_at: now,
            });
        }
        slot.as_ref().map_or(now, |o| o.changed_at)
    }

    /// One election step at local time `now`: create the lease, renew it, take an expired one
    /// over, or find it held by another replica. An API error other than a lost race is
    /// returned (the caller counts it against its renew deadline).
    pub async fn try_acquire_or_renew(&self, now: Instant) -> Result<Attempt, kube::Error> {
        let wall = Timestamp::now();
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(micro(wall)),
                    renew_time: Some(micro(wall)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created, now);
                    Ok(Attempt::Leading)
                }
                // Another replica created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Ok(Attempt::Following { holder: None })
                }
                Err(e) => Err(e),
            };
        };
        let changed_at = self.observe(&current, now);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        // The holder's own duration counts, never less than ours.
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, |s| {
                Duration::from_secs(s).max(self.settings.duration)
            });
        if !mine && holder.is_some() && now.saturating_duration_since(changed_at) < held_for {
            return Ok(Attempt::Following { holder });
        }
        let mut next = current.clone();
        let mut new_spec = spec;
        if !mine {
            new_spec.holder_identity = Some(self.identity.clone());
            new_spec.acquire_time = Some(micro(wall));
            new_spec.lease_transitions =
                Some(new_spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        new_spec.renew_time = Some(micro(wall));
        new_spec.lease_duration_seconds = Some(self.duration_seconds());
        next.spec = Some(new_spec);
        // `replace` sends the resourceVersion read above: a concurrent write makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observe(&written, now);
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following { holder }),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown), so another replica need not wait for it to expire.
    /// Only clears it while this replica is still the holder.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut current) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = current.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &current)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Runs `work` only while this replica leads: waits for the lease, runs `work` (a fresh
/// future from `make_work` each time it becomes leader), renews, and drops `work` at once
/// when leadership is lost or cannot be confirmed within the renew deadline. Returns when
/// `stop` completes (releasing the lease if held).
pub async fn lead<F, W>(lock: &LeaseLock, mut make_work: F, stop: impl Future<Output = ()>)
where
    F: FnMut() -> W,
    W: Future<Output = ()>,
{
    let settings = lock.settings();
    tokio::pin!(stop);
    loop {
        // Follow until leading.
        loop {
            match lock.try_acquire_or_renew(Instant::now()).await {
                Ok(Attempt::Leading) => break,
                Ok(Attempt::Following { holder }) => {
                    tracing::debug!(holder = ?holder, "following");
                }
                Err(e) => tracing::warn!(error = %e, "leader election: lease unavailable"),
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(settings.retry) => {}
            }
        }
        tracing::info!("leading: controller starts");
        let mut last_renewed = Instant::now();
        // Boxed, so stepping down drops it (and everything it holds) right away.
        let mut work = Box::pin(make_work());
        let stepped_down = loop {
            tokio::select! {
                () = &mut stop => break false,
                () = work.as_mut() => {
                    tracing::error!("controller ended while leading");
                    break true;
                }
                () = tokio::time::sleep(settings.retry) => {
                    // A hanging API call must not outlive the deadline either.
                    let left = settings.renew_deadline.saturating_sub(last_renewed.elapsed());
                    match tokio::time::timeout(left, lock.try_acquire_or_renew(Instant::now())).await {
                        Ok(Ok(Attempt::Leading)) => last_renewed = Instant::now(),
                        Ok(Ok(Attempt::Following { holder })) => {
                            tracing::warn!(holder = ?holder, "leadership lost: controller stops");
                            break true;
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                        Err(_) => tracing::warn!("lease renewal timed out"),
                    }
                    if last_renewed.elapsed() >= settings.renew_deadline {
                        tracing::warn!("lease not renewed within the deadline: controller stops");
                        break true;
                    }
                }
            }
        };
        drop(work);
        if !stepped_down {
            if let Err(e) = lock.release().await {
                tracing::warn!(error = %e, "lease release failed; it expires on its own");
            }
            return;
        }
    }
}
