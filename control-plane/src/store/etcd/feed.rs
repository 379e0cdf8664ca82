//! Each replica's link to the others through etcd: the change feed that keeps its
//! [`Distribution`] in step with the store ([`EtcdStore::follow_feed`]), and the summary of its
//! own sidecars it publishes for the other replicas ([`EtcdStore::publish_summary`]).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchOptions;
use tokio::sync::watch;

use super::{EtcdStore, encode, unavailable};
use crate::distribution::{Distribution, ReplicaSummary};
use crate::store::StoreError;

/// Longest wait between two attempts to re-open the watch.
const MAX_BACKOFF: Duration = crate::store::MAX_FEED_BACKOFF;
/// How often a replica's summary is refreshed (when it changed).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How long a replica's summary outlives the replica (a crash: no lease renewal).
pub const SUMMARY_TTL_SECONDS: i64 = 10;

impl EtcdStore {
    /// Publishes this replica's [`ReplicaSummary`] until `stop` turns true: at most once per
    /// [`PUBLISH_EVERY`] and only when it changed, on a lease that expires
    /// [`SUMMARY_TTL_SECONDS`] after the replica stops renewing it (a crash), or revoked at
    /// once on a clean stop. At most ten writes a second per replica, whatever the fleet, and
    /// none while nothing changes.
    pub async fn publish_summary(
        self,
        distribution: Arc<Distribution>,
        mut stop: watch::Receiver<bool>,
    ) {
        let key = format!(
            "{}{}",
            self.dir("replicas"),
            crate::random::hex(distribution.replica().as_bytes())
        );
        loop {
            match self.publish_once(&key, &distribution, &mut stop).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, "publishing this replica's summary failed; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(MAX_BACKOFF) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn publish_once(
        &self,
        key: &str,
        distribution: &Distribution,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(SUMMARY_TTL_SECONDS, None)
            .await
            .map_err(unavailable)?
            .id();
        let (mut keeper, mut renewals) =
            client.lease_keep_alive(lease).await.map_err(unavailable)?;
        let mut last: Option<ReplicaSummary> = None;
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(PUBLISH_EVERY) => {}
                _ = stop.changed() => {
                    let _ = client.lease_revoke(lease).await;
                    return Ok(());
                }
            }
            if renewed.elapsed() >= Duration::from_secs(2) {
                keeper.keep_alive().await.map_err(unavailable)?;
                match renewals.message().await.map_err(unavailable)? {
                    Some(answer) if answer.ttl() > 0 => renewed = tokio::time::Instant::now(),
                    _ => {
                        return Err(StoreError::unavailable("the summary's lease expired"));
                    }
                }
            }
            let summary = distribution.summary();
            if last.as_ref() != Some(&summary) {
                client
                    .put(
                        key,
                        encode(&summary)?,
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    )
                    .await
                    .map_err(unavailable)?;
                last = Some(summary);
            }
        }
    }

    /// Keeps `distribution` in step with etcd until `stop` turns true: one reload at the start,
    /// then one after each batch of changes to policies, registrations or revocations. While
    /// etcd cannot serve (no quorum), the replica keeps what it has and retries with backoff.
    pub async fn follow_feed(
        self,
        distribution: Arc<Distribution>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let wait = match self.follow_once(&distribution, &mut stop).await {
                Ok(()) => return,
                Err(error) => {
                    let wait = backoff;
                    backoff = crate::store::feed_failed(&error, backoff);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn follow_once(
        &self,
        distribution: &Distribution,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let revision = self.sync(distribution).await?;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(i64::try_from(revision + 1).unwrap_or(i64::MAX));
        let mut stream = self
            .client
            .watch_client()
            .watch(format!("{}/", self.prefix), Some(options))
            .await
            .map_err(unavailable)?;
        // Every change to snapshot state writes the marker in the same transaction.
        let marker = self.changed_key();
        loop {
            let message = tokio::select! {
                message = stream.message() => message.map_err(unavailable)?,
                _ = stop.changed() => return Ok(()),
            };
            let Some(response) = message else {
                return Err(StoreError::unavailable("the etcd watch ended"));
            };
            if response.canceled() {
                return Err(StoreError::unavailable(format!(
                    "the etcd watch was cancelled: {}",
                    response.cancel_reason()
                )));
            }
            let changed = response
                .events()
                .iter()
                .any(|event| event.kv().is_some_and(|kv| kv.key() == marker.as_bytes()));
            if changed {
                self.sync(distribution).await?;
            }
        }
    }

    /// Reloads and puts the state in force at its revision; returns the revision of the read.
    async fn sync(&self, distribution: &Distribution) -> Result<u64, StoreError> {
        let loaded = self.read_state().await?;
        let read_at = loaded.read_at;
        distribution.follow(loaded);
        Ok(read_at)
    }
}
