//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the holder renews
//! the lease; a candidate takes it once it has seen the same lease unchanged for longer than its
//! duration (measured on the candidate's own clock, so skewed clocks do not matter), or at once
//! when the holder released it on shutdown. Writes carry the resourceVersion they read, so two
//! candidates cannot both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// How long a lease is valid without renewal; a dead leader is replaced within about
/// `LEASE_DURATION + RETRY_PERIOD`.
pub const LEASE_DURATION: Duration = Duration::from_secs(12);
/// How often the leader renews.
pub const RENEW_PERIOD: Duration = Duration::from_secs(4);
/// A leader that could not renew for this long stops, before anyone else may take over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(9);
/// How often a candidate tries to acquire.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// What a candidate remembers about the lease it last saw.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    version: Option<String>,
    seen_at: Option<Instant>,
}

impl Observation {
    /// Records the lease's version; the clock restarts only when the version changes.
    pub fn see(&mut self, version: Option<&str>, now: Instant) {
        if self.version.as_deref() != version || self.seen_at.is_none() {
            self.version = version.map(str::to_owned);
            self.seen_at = Some(now);
        }
    }

    /// The lease has not changed for longer than `duration`.
    pub fn expired(&self, duration: Duration, now: Instant) -> bool {
        self.seen_at
            .is_some_and(|seen| now.duration_since(seen) > duration)
    }
}

/// One candidate for the lease `name`.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    observation: Observation,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            observation: Observation::default(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn spec(&self, transitions: i32, acquired: MicroTime) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquired),
            renew_time: Some(Self::now()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Acquires or renews the lease; `Ok(true)` while this candidate holds it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(&self.name).await? {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(0, Self::now())),
                };
                return conflict_is_loss(self.api.create(&PostParams::default(), &lease).await);
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        self.observation
            .see(current.metadata.resource_version.as_deref(), Instant::now());
        let next = match holder {
            Some(holder) if holder == self.identity => LeaseSpec {
                renew_time: Some(Self::now()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                ..spec
            },
            Some(_)
                if !self
                    .observation
                    .expired(lease_duration(&spec), Instant::now()) =>
            {
                return Ok(false);
            }
            _ => self.spec(spec.lease_transitions.unwrap_or(0) + 1, Self::now()),
        };
        let lease = Lease {
            metadata: current.metadata.clone(),
            spec: Some(next),
        };
        conflict_is_loss(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Gives the lease up so that a standby takes over at once (on shutdown).
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let mut spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(spec),
        };
        conflict_is_loss(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
        .map(|_| ())
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "cannot read or write the leader lease"),
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    }

    /// Renews the lease until a renewal fails for `RENEW_DEADLINE`; returns when leadership is
    /// lost.
    pub async fn keep(&mut self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(RENEW_PERIOD).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    tracing::error!(
                        identity = self.identity,
                        "another process took the leader lease"
                    );
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot renew the leader lease");
                    if last_renewal.elapsed() > RENEW_DEADLINE {
                        return;
                    }
                }
            }
        }
    }
}

fn lease_duration(spec: &LeaseSpec) -> Duration {
    spec.lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(LEASE_DURATION, Duration::from_secs)
}

/// A write that lost a race (409) means someone else holds the lease.
fn conflict_is_loss(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_lease_expires_on_the_observers_clock() {
        let start = Instant::now();
        let mut seen = Observation::default();
        assert!(
            !seen.expired(LEASE_DURATION, start),
            "never seen is not expired"
        );
        seen.see(Some("1"), start);
        assert!(!seen.expired(LEASE_DURATION, start + Duration::from_secs(5)));
        seen.see(Some("1"), start + Duration::from_secs(10));
        assert!(seen.expired(LEASE_DURATION, start + Duration::from_secs(13)));
    }

    #[test]
    fn a_renewal_restarts_the_clock() {
        let start = Instant::now();
        let mut seen = Observation::default();
        seen.see(Some("1"), start);
        seen.see(Some("2"), start + Duration::from_secs(10));
        assert!(!seen.expired(LEASE_DURATION, start + Duration::from_secs(13)));
        assert!(seen.expired(LEASE_DURATION, start + Duration::from_secs(23)));
    }

    #[test]
    fn failover_fits_in_twenty_seconds() {
        assert!(LEASE_DURATION + RETRY_PERIOD * 2 < Duration::from_secs(20));
        assert!(RENEW_DEADLINE < LEASE_DURATION);
    }

    #[test]
    fn a_released_lease_has_a_short_duration() {
        let spec = LeaseSpec {
            lease_duration_seconds: Some(1),
            ..LeaseSpec::default()
        };
        assert_eq!(lease_duration(&spec), Duration::from_secs(1));
        assert_eq!(lease_duration(&LeaseSpec::default()), LEASE_DURATION);
    }
}
