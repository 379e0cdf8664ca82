//! The embedded store: one redb file in the data directory. Every write is a transaction that
//! commits durably, so a crash loses nothing that was acknowledged.
//!
//! Its change feed is a counter in memory: a write that changes snapshots moves it on once it
//! has committed (on the thread that committed it, so a caller that gives up waiting cannot
//! lose the change), and [`EmbeddedStore::follow`] reloads after each move. Counters start
//! where [`Store::reserve_counters`] put them, above anything an earlier process sent.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use sidewall_policies::wire::operator::AuditRecord;

use super::{
    COUNTER_BLOCK, CertificateRecord, Loaded, PolicyVersion, Records, Redemption,
    RegistrationRecord, RevocationRecord, RollupRecord, Store, StoreError, StoreFuture, Task,
    TokenRecord,
};
use crate::audit::AuditEvent;
use crate::distribution::Distribution;

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const CERTIFICATES: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const POLICIES: TableDefinition<u64, &[u8]> = TableDefinition::new("policy_versions");
const REGISTRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("registrations");
/// The audit trail, by number.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Daily flow roll-ups, by [`RollupRecord::key`].
const ROLLUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("flow_rollups");
/// The CA rotation record under `ca`, as `{version, record}`.
const CA_ROTATION: TableDefinition<&str, &[u8]> = TableDefinition::new("ca_rotation");

/// The CA rotation record with the version a compare-and-swap checks.
#[derive(Serialize, serde::Deserialize)]
struct VersionedCa {
    version: u64,
    record: crate::ca::rotation::CaRecord,
}

fn read_ca(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<VersionedCa>, StoreError> {
    match table.get("ca").map_err(backend)? {
        Some(value) => Ok(Some(decode("ca_rotation/ca", value.value())?)),
        None => Ok(None),
    }
}

fn backend(error: impl Into<super::Cause>) -> StoreError {
    StoreError::backend(error)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(backend)
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(key, e))
}

/// Every record of a table keyed by text.
fn every<T: DeserializeOwned>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<'static, &'static str, &'static [u8]>,
) -> Result<Vec<T>, StoreError> {
    let table = tx.open_table(table).map_err(backend)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        out.push(decode(key.value(), value.value())?);
    }
    Ok(out)
}

/// The default store.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// The change feed: the revision of the newest committed change to snapshot state.
    feed: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file, creating its tables and epoch on first use.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let tx = db.begin_write().map_err(backend)?;
        {
            tx.open_table(TOKENS).map_err(backend)?;
            tx.open_table(CERTIFICATES).map_err(backend)?;
            tx.open_table(REVOCATIONS).map_err(backend)?;
            tx.open_table(POLICIES).map_err(backend)?;
            tx.open_table(REGISTRATIONS).map_err(backend)?;
            tx.open_table(AUDIT).map_err(backend)?;
            tx.open_table(ROLLUPS).map_err(backend)?;
            tx.open_table(CA_ROTATION).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            if meta.get("epoch").map_err(backend)?.is_none() {
                meta.insert("epoch", crate::random::hex_token(8).as_str())
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(Self {
            db: Arc::new(db),
            feed: Arc::new(watch::channel(0).0),
        })
    }

    /// The audit table as stored, key and bytes: for tests that tamper with it.
    #[cfg(feature = "test-util")]
    pub fn audit_raw(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(AUDIT).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            out.push((key.value(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// Writes (or with `None` deletes) one audit entry as raw bytes, bypassing the chain: for
    /// tests that tamper with the trail.
    #[cfg(feature = "test-util")]
    pub fn audit_set_raw(&self, key: u64, value: Option<&[u8]>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut table = tx.open_table(AUDIT).map_err(backend)?;
            match value {
                Some(bytes) => {
                    table.insert(key, bytes).map_err(backend)?;
                }
                None => {
                    table.remove(key).map_err(backend)?;
                }
            }
        }
        tx.commit().map_err(backend)
    }

    /// A write that changes snapshot state: the feed moves on once it has committed.
    fn changing<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        let feed = self.feed.clone();
        self.blocking(move |db| {
            let value = work(db)?;
            feed.send_modify(|revision| *revision += 1);
            Ok(value)
        })
    }

    /// Runs blocking database work off the async workers.
    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&db))
                .await
                .map_err(backend)?
        })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        value: &T,
    ) -> StoreFuture<'_, ()> {
        let bytes = encode(value);
        self.blocking(move |db| {
            let bytes = bytes?;
            let tx = db.begin_write().map_err(backend)?;
            tx.open_table(table)
                .map_err(backend)?
                .insert(key.as_str(), bytes.as_slice())
                .map_err(backend)?;
            tx.commit().map_err(backend)
        })
    }

    fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
    ) -> StoreFuture<'_, Option<T>> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = tx.open_table(table).map_err(backend)?;
            match table.get(key.as_str()).map_err(backend)? {
                Some(value) => Ok(Some(decode(&key, value.value())?)),
                None => Ok(None),
            }
        })
    }

    fn all<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> StoreFuture<'_, Vec<T>> {
        self.blocking(move |db| every(&db.begin_read().map_err(backend)?, table))
    }

    /// Reads, changes and writes one token in a single write transaction.
    fn update_token<T: Send + 'static>(
        &self,
        id: &str,
        change: impl FnOnce(Option<&mut TokenRecord>) -> (T, bool) + Send + 'static,
    ) -> StoreFuture<'_, T> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let result = {
                let mut table = tx.open_table(TOKENS).map_err(backend)?;
                let mut token: Option<TokenRecord> =
                    match table.get(id.as_str()).map_err(backend)? {
                        Some(value) => Some(decode(&id, value.value())?),
                        None => None,
                    };
                let (result, changed) = change(token.as_mut());
                if let (true, Some(token)) = (changed, token) {
                    table
                        .insert(id.as_str(), encode(&token)?.as_slice())
                        .map_err(backend)?;
                }
                result
            };
            tx.commit().map_err(backend)?;
            Ok(result)
        })
    }
}

impl Store for EmbeddedStore {
    fn put_rollup(&self, record: RollupRecord) -> StoreFuture<'_, ()> {
        self.put(ROLLUPS, record.key(), &record)
    }

    fn rollups(&self, from: i64, to: i64) -> StoreFuture<'_, Vec<RollupRecord>> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = tx.open_table(ROLLUPS).map_err(backend)?;
            let (start, end) = (
                RollupRecord::day_key(from),
                RollupRecord::day_key(to.saturating_add(1)),
            );
            let mut out = Vec::new();
            for entry in table.range(start.as_str()..end.as_str()).map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                out.push(decode(key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    fn prune_rollups(&self, before: i64) -> StoreFuture<'_, u64> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let removed = {
                let mut table = tx.open_table(ROLLUPS).map_err(backend)?;
                let end = RollupRecord::day_key(before);
                let keys: Vec<String> = table
                    .range(..end.as_str())
                    .map_err(backend)?
                    .map(|entry| entry.map(|(key, _)| key.value().to_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(backend)?;
                for key in &keys {
                    table.remove(key.as_str()).map_err(backend)?;
                }
                keys.len() as u64
            };
            tx.commit().map_err(backend)?;
            Ok(removed)
        })
    }

    fn put_policy_version(&self, mut record: PolicyVersion) -> StoreFuture<'_, u64> {
        self.changing(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let version = {
                let mut table = tx.open_table(POLICIES).map_err(backend)?;
                let last = table.last().map_err(backend)?.map_or(0, |(k, _)| k.value());
                record.version = last + 1;
                table
                    .insert(record.version, encode(&record)?.as_slice())
                    .map_err(backend)?;
                record.version
            };
            tx.commit().map_err(backend)?;
            Ok(version)
        })
    }

    fn policy_version(&self, version: u64) -> StoreFuture<'_, Option<PolicyVersion>> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = tx.open_table(POLICIES).map_err(backend)?;
            match table.get(version).map_err(backend)? {
                Some(value) => Ok(Some(decode(&version.to_string(), value.value())?)),
                None => Ok(None),
            }
        })
    }

    fn policy_versions(&self) -> StoreFuture<'_, Vec<PolicyVersion>> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = tx.open_table(POLICIES).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                out.push(decode(&key.value().to_string(), value.value())?);
            }
            Ok(out)
        })
    }

    fn put_registration(&self, record: RegistrationRecord) -> StoreFuture<'_, Result<(), String>> {
        self.changing(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let outcome = {
                let mut table = tx.open_table(REGISTRATIONS).map_err(backend)?;
                let holder: Option<RegistrationRecord> =
                    match table.get(record.endpoint.as_str()).map_err(backend)? {
                        Some(value) => Some(decode(&record.endpoint, value.value())?),
                        None => None,
                    };
                match holder {
                    Some(holder) if holder.identity != record.identity => Err(holder.identity),
                    _ => {
                        table
                            .insert(record.endpoint.as_str(), encode(&record)?.as_slice())
                            .map_err(backend)?;
                        Ok(())
                    }
                }
            };
            tx.commit().map_err(backend)?;
            Ok(outcome)
        })
    }

    fn remove_registration(
        &self,
        identity: &sidewall_policies::SpiffeId,
        instance: &str,
    ) -> StoreFuture<'_, ()> {
        let (identity, instance) = (identity.to_string(), instance.to_owned());
        self.changing(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            {
                let mut table = tx.open_table(REGISTRATIONS).map_err(backend)?;
                let mut mine = Vec::new();
                for entry in table.iter().map_err(backend)? {
                    let (key, value) = entry.map_err(backend)?;
                    let record: RegistrationRecord = decode(key.value(), value.value())?;
                    if record.instance == instance && record.identity == identity {
                        mine.push(key.value().to_owned());
                    }
                }
                for key in mine {
                    table.remove(key.as_str()).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
    }

    fn registrations(&self) -> StoreFuture<'_, Vec<RegistrationRecord>> {
        self.all(REGISTRATIONS)
    }

    fn put_token(&self, token: TokenRecord) -> StoreFuture<'_, ()> {
        self.put(TOKENS, token.id.clone(), &token)
    }

    fn token(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        self.get(TOKENS, id.to_owned())
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        self.all(TOKENS)
    }

    fn redeem_token(&self, id: &str, key_sha256: &str, now: i64) -> StoreFuture<'_, Redemption> {
        let key = key_sha256.to_owned();
        self.update_token(id, move |token| match token {
            None => (Redemption::Unknown, false),
            Some(token) => {
                let outcome = redemption(token, &key, now);
                (outcome, outcome == Redemption::Redeemed)
            }
        })
    }

    fn revoke_token(&self, id: &str, now: i64) -> StoreFuture<'_, bool> {
        self.update_token(id, move |token| match token {
            None => (false, false),
            Some(token) => {
                token.revoked_at.get_or_insert(now);
                (true, true)
            }
        })
    }

    fn put_certificate(&self, record: CertificateRecord) -> StoreFuture<'_, ()> {
        self.put(CERTIFICATES, record.serial.clone(), &record)
    }

    fn certificate(&self, serial: &str) -> StoreFuture<'_, Option<CertificateRecord>> {
        self.get(CERTIFICATES, serial.to_owned())
    }

    fn certificates(&self) -> StoreFuture<'_, Vec<CertificateRecord>> {
        self.all(CERTIFICATES)
    }

    fn put_revocation(&self, record: RevocationRecord) -> StoreFuture<'_, ()> {
        let key = format!("{}:{}", record.kind.as_str(), record.value);
        let bytes = encode(&record);
        self.changing(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            tx.open_table(REVOCATIONS)
                .map_err(backend)?
                .insert(key.as_str(), bytes?.as_slice())
                .map_err(backend)?;
            tx.commit().map_err(backend)
        })
    }

    fn revocations(&self) -> StoreFuture<'_, Vec<RevocationRecord>> {
        self.all(REVOCATIONS)
    }

    fn ca_record(&self) -> StoreFuture<'_, Option<(crate::ca::rotation::CaRecord, u64)>> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = tx.open_table(CA_ROTATION).map_err(backend)?;
            Ok(read_ca(&table)?.map(|v| (v.record, v.version)))
        })
    }

    fn put_ca_record(
        &self,
        record: crate::ca::rotation::CaRecord,
        version: u64,
    ) -> StoreFuture<'_, bool> {
        self.changing(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            {
                let mut table = tx.open_table(CA_ROTATION).map_err(backend)?;
                let stored = read_ca(&table)?.map_or(0, |v| v.version);
                if stored != version {
                    return Ok(false);
                }
                let bytes = encode(&VersionedCa {
                    version: version + 1,
                    record,
                })?;
                table.insert("ca", bytes.as_slice()).map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(true)
        })
    }

    fn append_audit(&self, event: AuditEvent, time: i64) -> StoreFuture<'_, AuditRecord> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let record = {
                let mut table = tx.open_table(AUDIT).map_err(backend)?;
                let newest = table
                    .last()
                    .map_err(backend)?
                    .map(|(key, value)| (key.value(), crate::audit::link(value.value())));
                let (seq, prev) = match newest {
                    Some((key, prev)) => (key + 1, prev),
                    None => (1, crate::audit::GENESIS.to_owned()),
                };
                let record = event.chained(seq, time, prev);
                table
                    .insert(seq, encode(&record)?.as_slice())
                    .map_err(backend)?;
                record
            };
            tx.commit().map_err(backend)?;
            Ok(record)
        })
    }

    fn prune_audit(&self, through: u64) -> StoreFuture<'_, u64> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let removed = {
                let mut table = tx.open_table(AUDIT).map_err(backend)?;
                let keys: Vec<u64> = table
                    .range(..=through)
                    .map_err(backend)?
                    .map(|entry| entry.map(|(key, _)| key.value()))
                    .collect::<Result<_, _>>()
                    .map_err(backend)?;
                for key in &keys {
                    table.remove(*key).map_err(backend)?;
                }
                keys.len() as u64
            };
            tx.commit().map_err(backend)?;
            Ok(removed)
        })
    }

    fn restore_audit(&self, record: AuditRecord) -> StoreFuture<'_, bool> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let free = {
                let mut table = tx.open_table(AUDIT).map_err(backend)?;
                let free = table.get(record.seq).map_err(backend)?.is_none();
                if free {
                    table
                        .insert(record.seq, encode(&record)?.as_slice())
                        .map_err(backend)?;
                }
                free
            };
            tx.commit().map_err(backend)?;
            Ok(free)
        })
    }

    fn audit_records(&self, after: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, AuditRecord)>> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = tx.open_table(AUDIT).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table
                .range(after.saturating_add(1)..)
                .map_err(backend)?
                .take(limit)
            {
                let (key, value) = entry.map_err(backend)?;
                out.push((
                    key.value(),
                    decode(&format!("audit/{}", key.value()), value.value())?,
                ));
            }
            Ok(out)
        })
    }

    fn records(&self) -> StoreFuture<'_, Records> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(backend)?;
            let mut policy_versions = Vec::new();
            let policies = tx.open_table(POLICIES).map_err(backend)?;
            for entry in policies.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                policy_versions.push(decode(&key.value().to_string(), value.value())?);
            }
            Ok(Records {
                policy_versions,
                tokens: every(&tx, TOKENS)?,
                certificates: every(&tx, CERTIFICATES)?,
                revocations: every(&tx, REVOCATIONS)?,
                registrations: every(&tx, REGISTRATIONS)?,
                audit: {
                    let table = tx.open_table(AUDIT).map_err(backend)?;
                    let mut audit = Vec::new();
                    for entry in table.iter().map_err(backend)? {
                        let (key, value) = entry.map_err(backend)?;
                        audit.push(decode(&format!("audit/{}", key.value()), value.value())?);
                    }
                    audit
                },
            })
        })
    }

    fn epoch(&self) -> StoreFuture<'_, String> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(backend)?;
            let meta = tx.open_table(META).map_err(backend)?;
            let epoch = meta.get("epoch").map_err(backend)?;
            Ok(epoch.map(|e| e.value().to_owned()).unwrap_or_default())
        })
    }

    fn reserve_counters(&self, at_least: u64) -> StoreFuture<'_, u64> {
        let reserved = self.blocking(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            let start = {
                let mut meta = tx.open_table(META).map_err(backend)?;
                let stored = meta
                    .get("counter_ceiling")
                    .map_err(backend)?
                    .map(|v| v.value().to_owned());
                let ceiling = match stored {
                    None => 0,
                    Some(text) => text
                        .parse::<u64>()
                        .map_err(|e| StoreError::corrupt("meta/counter_ceiling", e))?,
                };
                let start = at_least.max(ceiling);
                let next = start.saturating_add(COUNTER_BLOCK).to_string();
                meta.insert("counter_ceiling", next.as_str())
                    .map_err(backend)?;
                start
            };
            tx.commit().map_err(backend)?;
            Ok(start)
        });
        Box::pin(async move {
            let start = reserved.await?;
            self.feed.send_replace(start);
            Ok(start)
        })
    }

    fn load(&self) -> StoreFuture<'_, Loaded> {
        let feed = self.feed.clone();
        self.blocking(move |db| {
            // Read before the transaction opens: every change counted by then has committed,
            // so the read holds it (it may hold newer ones too, which the next reload labels).
            let revision = *feed.borrow();
            let tx = db.begin_read().map_err(backend)?;
            let latest = match tx
                .open_table(POLICIES)
                .map_err(backend)?
                .last()
                .map_err(backend)?
            {
                Some((key, value)) => Some(decode(&key.value().to_string(), value.value())?),
                None => None,
            };
            Ok(Loaded {
                revision,
                read_at: revision,
                latest,
                registrations: every(&tx, REGISTRATIONS)?,
                revocations: every(&tx, REVOCATIONS)?,
                ca: read_ca(&tx.open_table(CA_ROTATION).map_err(backend)?)?.map(|v| v.record),
            })
        })
    }

    fn follow(&self, distribution: Arc<Distribution>, mut stop: watch::Receiver<bool>) -> Task {
        let store = self.clone();
        Box::pin(async move {
            let mut changes = store.feed.subscribe();
            let mut backoff = Duration::from_millis(250);
            loop {
                changes.borrow_and_update();
                match store.load().await {
                    Ok(loaded) => {
                        distribution.follow(loaded);
                        backoff = Duration::from_millis(250);
                        tokio::select! {
                            _ = changes.changed() => {}
                            _ = stop.changed() => return,
                        }
                    }
                    Err(error) => {
                        let wait = backoff;
                        backoff = super::feed_failed(&error, backoff);
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
        })
    }

    fn written(&self) -> u64 {
        *self.feed.borrow()
    }
}

/// The token rules, shared by every store: revoked, expired, idempotent per key, then uses.
pub(crate) fn redemption(token: &mut TokenRecord, key_sha256: &str, now: i64) -> Redemption {
    if token.revoked_at.is_some() {
        Redemption::Revoked
    } else if now >= token.expires_at {
        Redemption::Expired
    } else if token.redeemed_keys.iter().any(|k| k == key_sha256) {
        Redemption::Redeemed
    } else if token.redeemed_keys.len() >= token.uses as usize {
        Redemption::UsedUp
    } else {
        token.redeemed_keys.push(key_sha256.to_owned());
        Redemption::Redeemed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk(day: i64, process: &str, chunk: u32) -> RollupRecord {
        RollupRecord {
            day,
            process: process.to_owned(),
            chunk,
            replica: "https://127.0.0.1:1".to_owned(),
            from: day * 86_400,
            flows: Vec::new(),
            transport: Vec::new(),
            outbound: Vec::new(),
            applied: Vec::new(),
        }
    }

    #[tokio::test]
    async fn rollups_are_read_by_days_replaced_by_key_and_pruned_before_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        for record in [
            chunk(9, "a", 0),
            chunk(10, "a", 0),
            chunk(10, "a", 1),
            chunk(10, "b", 0),
            chunk(11, "a", 0),
        ] {
            store.put_rollup(record).await.unwrap();
        }
        let replaced = RollupRecord {
            from: 10 * 86_400 + 5,
            ..chunk(10, "a", 1)
        };
        store.put_rollup(replaced.clone()).await.unwrap();
        let days = |records: Vec<RollupRecord>| -> Vec<(i64, String, u32)> {
            records
                .into_iter()
                .map(|r| (r.day, r.process, r.chunk))
                .collect()
        };
        let tenth = store.rollups(10, 10).await.unwrap();
        assert!(tenth.contains(&replaced));
        assert_eq!(
            days(tenth),
            [
                (10, "a".into(), 0),
                (10, "a".into(), 1),
                (10, "b".into(), 0)
            ]
        );
        assert_eq!(store.rollups(10, 11).await.unwrap().len(), 4);
        assert_eq!(store.prune_rollups(11).await.unwrap(), 4);
        assert_eq!(
            days(store.rollups(0, i64::MAX).await.unwrap()),
            [(11, "a".into(), 0)]
        );
    }
}
