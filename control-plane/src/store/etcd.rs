//! The replicated store: etcd v3, for several control-plane replicas behind one address.
//!
//! Every record is one key under a prefix (default `/sidewall`), JSON like the embedded store:
//!
//! | key | value |
//! |---|---|
//! | `P/epoch` | the store epoch, created once (create-if-absent transaction) |
//! | `P/changed` | empty; written in the same transaction as every change to policies, registrations or revocations: its `mod_revision` is the snapshot counter |
//! | `P/ca` | the CA, private keys sealed with the key-encryption key ([`crate::ca::sealed`]) |
//! | `P/rotation/ca` | once a CA rotation has begun, the CA set ([`crate::ca::rotation::CaRecord`], keys sealed); it supersedes `P/ca` |
//! | `P/policies/<version, 20 digits>` | a [`PolicyVersion`] |
//! | `P/registrations/<endpoint>` | a [`RegistrationRecord`] |
//! | `P/tokens/<id>` | a [`TokenRecord`] |
//! | `P/certificates/<serial>` | a [`CertificateRecord`] |
//! | `P/revocations/<kind>:<value>` | a [`RevocationRecord`] |
//! | `P/audit/<number, 20 digits>` | an audit record ([`crate::audit`]), created only if absent |
//! | `P/rollups/<day, 8 digits>/<process>/<chunk, 5 digits>` | a [`RollupRecord`]: one chunk of a control-plane process's daily flow counts |
//! | `P/verification/run` | the segmentation test started last ([`crate::distribution::SharedRun`]), for every replica to order its sidecars' probes |
//! | `P/verification/answers/<run>/<hex of the replica's URL>` | the answers that replica's sidecars gave to the run's probes |
//! | `P/replicas/<hex of the replica's URL>` | a [`ReplicaSummary`], on a lease: gone when the replica is |
//!
//! Read-modify-write operations are transactions guarded by the key's `mod_revision` (or
//! `create_revision == 0` for a new key) and retried on conflict, so a join token is redeemed
//! at most as often as it allows even when two replicas race, and two policy versions never get
//! the same number. Each replica follows the prefix with an etcd watch ([`EtcdStore::follow`]):
//! a change reloads policies, registrations and revocations in one read transaction and puts
//! them in force with the revision of the last change to them (the `changed` marker) as the
//! snapshot counter, so every replica sends the same version for the same content ([`feed`]).
//! Per-proxy liveness and acks are never written per proxy: each replica keeps its own
//! proxies' state in memory and publishes a summary of it ([`EtcdStore::publish`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::embedded::redemption;
use super::{
    CertificateRecord, Loaded, PolicyVersion, Records, Redemption, RegistrationRecord,
    RevocationRecord, RollupRecord, Store, StoreError, StoreFuture, Task, TokenRecord,
};
use crate::audit::AuditEvent;
use crate::distribution::{Distribution, ReplicaSummary};
use sidewall_policies::wire::operator::AuditRecord;
use tokio::sync::watch;

pub mod feed;

/// The end of the key range of every key under `dir` (which ends with `/`): `/` is followed
/// by `0` in byte order.
fn prefix_end(dir: &str) -> String {
    format!("{}0", dir.trim_end_matches('/'))
}

/// How long one etcd request may take before it fails (and the API answers 503).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix, `/sidewall` by default: starts with `/`, no trailing `/`.
    pub prefix: String,
    /// PEM CA that signed the members' certificates (turns on TLS).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, PEM (mutual TLS).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// User name and password (etcd authentication).
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.ca_pem.is_some())
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// The store on etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
    /// The etcd revision of this process's last write (see [`Store::written`]).
    written: Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdStore({} {})", self.endpoints, self.prefix)
    }
}

/// Maps a client error: anything from etcd itself means it cannot serve now (no leader, no
/// quorum, unreachable, timed out).
fn unavailable(error: etcd_client::Error) -> StoreError {
    unavailable_with(String::new(), error)
}

/// `context` (when not empty), then etcd's own words: a gRPC status's message, not its
/// debug dump. The client's error is kept as the source.
fn unavailable_with(context: String, error: etcd_client::Error) -> StoreError {
    let text = match &error {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    StoreError::Unavailable {
        message: if context.is_empty() {
            text
        } else {
            format!("{context}: {text}")
        },
        source: Some(Box::new(error)),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::backend)
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(String::from_utf8_lossy(key), e))
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0))
}

impl EtcdStore {
    /// Connects and creates the store epoch if this is the first replica ever. Fails with a
    /// clear error when no member answers.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        let endpoints = options.endpoints.join(",");
        let tls = options.ca_pem.is_some() || options.identity_pem.is_some();
        let urls: Vec<String> = options
            .endpoints
            .iter()
            .map(|e| format!("{}://{e}", if tls { "https" } else { "http" }))
            .collect();
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // A member cut off from the others answers "no leader" at once instead of
            // serving a stale read or hanging until the timeout.
            .with_require_leader(true);
        if tls {
            let mut config = etcd_client::TlsOptions::new();
            if let Some(ca) = &options.ca_pem {
                config = config.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.identity_pem {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(config);
        }
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user.clone(), password.clone());
        }
        let cannot = |e: etcd_client::Error| {
            unavailable_with(format!("cannot reach etcd at {endpoints}"), e)
        };
        let client = tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&urls, Some(connect)))
            .await
            .map_err(|_| {
                StoreError::unavailable(format!("cannot reach etcd at {endpoints}: timed out"))
            })?
            .map_err(cannot)?;
        let store = Self {
            client,
            prefix: options.prefix.clone(),
            endpoints: endpoints.clone(),
            written: Arc::new(AtomicU64::new(0)),
        };
        // The epoch: created once by whichever replica comes first.
        let key = store.key("epoch");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), crate::random::hex_token(8), None)]);
        store.client.kv_client().txn(txn).await.map_err(cannot)?;
        Ok(store)
    }

    /// One etcd call, retried a few times over about 3 s when etcd cannot serve it: a
    /// member that just went away or a leader election should not fail an operator's
    /// request. Without quorum every attempt fails and the error is returned.
    async fn retried<T, Fut>(
        &self,
        mut call: impl FnMut(etcd_client::KvClient) -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut wait = Duration::from_millis(100);
        for _ in 0..5 {
            match call(self.client.kv_client()).await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    tracing::debug!(%error, "etcd request failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        call(self.client.kv_client()).await.map_err(unavailable)
    }

    async fn get_op(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        self.retried(|mut kv| {
            let (key, options) = (key.to_owned(), options.clone());
            async move { kv.get(key, options).await }
        })
        .await
    }

    async fn txn_op(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.retried(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Deletes the keys in `[from, end)`; the number deleted.
    async fn delete_range(&self, from: &str, end: &str) -> Result<u64, StoreError> {
        let options = etcd_client::DeleteOptions::new().with_range(end);
        let response = self
            .retried(|mut kv| {
                let (from, options) = (from.to_owned(), options.clone());
                async move { kv.delete(from, Some(options)).await }
            })
            .await?;
        Ok(u64::try_from(response.deleted()).unwrap_or(0))
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// The prefix of one kind of record, with its trailing `/`.
    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    fn policy_key(&self, version: u64) -> String {
        format!("{}{version:020}", self.dir("policies"))
    }

    /// Whether a key is part of what snapshots are built from (policies, registrations,
    /// revocations).
    fn in_snapshots(&self, key: &[u8]) -> bool {
        ["policies", "registrations", "revocations", "rotation"]
            .iter()
            .any(|kind| key.starts_with(self.dir(kind).as_bytes()))
    }

    /// The key every write to snapshot state also writes, in the same transaction: its
    /// `mod_revision` is the revision of the last such change, the snapshot counter.
    fn changed_key(&self) -> String {
        self.key("changed")
    }

    /// The CA rotation record's key.
    fn ca_record_key(&self) -> String {
        format!("{}ca", self.dir("rotation"))
    }

    /// The operations of a write to `key`: itself, and the change marker if it is snapshot
    /// state.
    fn with_marker(&self, key: &str, operation: TxnOp) -> Vec<TxnOp> {
        let mut operations = vec![operation];
        if self.in_snapshots(key.as_bytes()) {
            operations.push(TxnOp::put(self.changed_key(), "", None));
        }
        operations
    }

    /// Records the revision of a write that changes snapshots: the change feed reaches it
    /// (see [`Store::written`]).
    fn note_write(&self, key: &[u8], header: Option<&etcd_client::ResponseHeader>) {
        if self.in_snapshots(key) {
            self.written
                .fetch_max(revision_of(header), Ordering::SeqCst);
        }
    }

    async fn get_raw(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let response = self.get_op(key, None).await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.get_raw(key).await? {
            Some((bytes, _)) => Ok(Some(decode(key.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let operations = self.with_marker(key, TxnOp::put(key, encode(value)?, None));
        let response = self.txn_op(Txn::new().and_then(operations)).await?;
        self.note_write(key.as_bytes(), response.header());
        Ok(())
    }

    async fn all<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, StoreError> {
        let response = self
            .get_op(&self.dir(kind), Some(GetOptions::new().with_prefix()))
            .await?;
        response
            .kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// Puts `value` at `key` if the key is still at `mod_revision` (0: still absent).
    async fn put_if(
        &self,
        key: &str,
        mod_revision: i64,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let compare = if mod_revision == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, mod_revision)
        };
        let txn = Txn::new()
            .when([compare])
            .and_then(self.with_marker(key, TxnOp::put(key, value, None)));
        let response = self.txn_op(txn).await?;
        if response.succeeded() {
            self.note_write(key.as_bytes(), response.header());
        }
        Ok(response.succeeded())
    }

    /// Reads, changes and writes one token, retrying when another replica wrote it meanwhile.
    async fn update_token<T>(
        &self,
        id: &str,
        change: impl Fn(Option<&mut TokenRecord>) -> (T, bool),
    ) -> Result<T, StoreError> {
        let key = format!("{}{id}", self.dir("tokens"));
        loop {
            let Some((bytes, mod_revision)) = self.get_raw(&key).await? else {
                return Ok(change(None).0);
            };
            let mut token: TokenRecord = decode(key.as_bytes(), &bytes)?;
            let (result, changed) = change(Some(&mut token));
            if !changed || self.put_if(&key, mod_revision, encode(&token)?).await? {
                return Ok(result);
            }
            metrics::counter!(crate::metric::STORE_CONFLICTS).increment(1);
        }
    }

    /// The audit records as stored, key number and bytes: for tests that tamper with them.
    #[cfg(feature = "test-util")]
    pub async fn audit_raw(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let response = self
            .get_op(&self.dir("audit"), Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let seq = key.rsplit('/').next()?.parse().ok()?;
                Some((seq, kv.value().to_vec()))
            })
            .collect())
    }

    /// Writes (or with `None` deletes) one audit record as raw bytes, bypassing the chain: for
    /// tests that tamper with the trail.
    #[cfg(feature = "test-util")]
    pub async fn audit_set_raw(&self, seq: u64, value: Option<&[u8]>) -> Result<(), StoreError> {
        let key = format!("{}{seq:020}", self.dir("audit"));
        let operation = match value {
            Some(bytes) => TxnOp::put(key, bytes.to_vec(), None),
            None => TxnOp::delete(key, None),
        };
        self.txn_op(Txn::new().and_then([operation])).await?;
        Ok(())
    }

    /// Reads policies, registrations and revocations in one transaction (one revision).
    pub async fn read_state(&self) -> Result<Loaded, StoreError> {
        let newest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let txn = Txn::new().and_then([
            TxnOp::get(self.changed_key(), None),
            TxnOp::get(self.dir("policies"), Some(newest)),
            TxnOp::get(
                self.dir("registrations"),
                Some(GetOptions::new().with_prefix()),
            ),
            TxnOp::get(
                self.dir("revocations"),
                Some(GetOptions::new().with_prefix()),
            ),
            TxnOp::get(self.ca_record_key(), None),
        ]);
        let response = self.txn_op(txn).await?;
        let read_at = revision_of(response.header());
        let mut ranges = response.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().to_vec(),
            _ => Vec::new(),
        });
        let revision = ranges
            .next()
            .unwrap_or_default()
            .first()
            .map_or(0, |kv| u64::try_from(kv.mod_revision()).unwrap_or(0));
        let policies = ranges.next().unwrap_or_default();
        let registrations = ranges.next().unwrap_or_default();
        let revocations = ranges.next().unwrap_or_default();
        let ca = ranges.next().unwrap_or_default();
        Ok(Loaded {
            ca: match ca.first() {
                Some(kv) => Some(decode(kv.key(), kv.value())?),
                None => None,
            },
            revision,
            read_at,
            latest: match policies.first() {
                Some(kv) => Some(decode(kv.key(), kv.value())?),
                None => None,
            },
            registrations: registrations
                .iter()
                .map(|kv| decode(kv.key(), kv.value()))
                .collect::<Result<_, _>>()?,
            revocations: revocations
                .iter()
                .map(|kv| decode(kv.key(), kv.value()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The sealed CA, if a replica stored one.
    pub async fn sealed_ca(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_raw(&self.key("ca")).await?.map(|(bytes, _)| bytes))
    }

    /// Stores the sealed CA unless one is there already; returns the one in force.
    pub async fn create_sealed_ca(&self, sealed: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let key = self.key("ca");
        if self.put_if(&key, 0, sealed).await? {
            tracing::info!(key, "stored the new CA (keys sealed) in etcd");
        }
        self.sealed_ca()
            .await?
            .ok_or_else(|| StoreError::backend(format!("{key} vanished")))
    }
}

impl Store for EtcdStore {
    fn put_rollup(&self, record: RollupRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let key = format!("{}{}", self.dir("rollups"), record.key());
            self.put(&key, &record).await
        })
    }

    fn rollups(&self, from: i64, to: i64) -> StoreFuture<'_, Vec<RollupRecord>> {
        Box::pin(async move {
            let dir = self.dir("rollups");
            let start = format!("{dir}{}", RollupRecord::day_key(from));
            let end = format!("{dir}{}", RollupRecord::day_key(to.saturating_add(1)));
            let response = self
                .get_op(&start, Some(GetOptions::new().with_range(end)))
                .await?;
            response
                .kvs()
                .iter()
                .map(|kv| decode(kv.key(), kv.value()))
                .collect()
        })
    }

    fn prune_rollups(&self, before: i64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let dir = self.dir("rollups");
            let end = format!("{dir}{}", RollupRecord::day_key(before));
            self.delete_range(&dir, &end).await
        })
    }

    fn append_audit(&self, event: AuditEvent, time: i64) -> StoreFuture<'_, AuditRecord> {
        Box::pin(async move {
            loop {
                let newest = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1);
                let response = self.get_op(&self.dir("audit"), Some(newest)).await?;
                let (seq, prev) = match response.kvs().first() {
                    None => (1, crate::audit::GENESIS.to_owned()),
                    Some(kv) => {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let last = key
                            .rsplit('/')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .ok_or_else(|| StoreError::corrupt(key, "not an audit number"))?;
                        (last + 1, crate::audit::link(kv.value()))
                    }
                };
                let record = event.clone().chained(seq, time, prev);
                let key = format!("{}{seq:020}", self.dir("audit"));
                if self.put_if(&key, 0, encode(&record)?).await? {
                    return Ok(record);
                }
                metrics::counter!(crate::metric::STORE_CONFLICTS).increment(1);
            }
        })
    }

    fn prune_audit(&self, through: u64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let dir = self.dir("audit");
            let from = format!("{dir}{:020}", 0);
            let end = format!("{dir}{:020}", through.saturating_add(1));
            self.delete_range(&from, &end).await
        })
    }

    fn restore_audit(&self, record: AuditRecord) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let key = format!("{}{:020}", self.dir("audit"), record.seq);
            self.put_if(&key, 0, encode(&record)?).await
        })
    }

    fn audit_records(&self, after: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, AuditRecord)>> {
        Box::pin(async move {
            let dir = self.dir("audit");
            // Keys are zero-padded numbers under `dir`; `dir` with its `/` raised to `0` ends
            // the range.
            let end = format!("{}0", dir.trim_end_matches('/'));
            let from = format!("{dir}{:020}", after.saturating_add(1));
            let options = GetOptions::new()
                .with_range(end)
                .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
            let response = self.get_op(&from, Some(options)).await?;
            response
                .kvs()
                .iter()
                .map(|kv| {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let seq = key
                        .rsplit('/')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .ok_or_else(|| StoreError::corrupt(key.clone(), "not an audit number"))?;
                    Ok((seq, decode(kv.key(), kv.value())?))
                })
                .collect()
        })
    }

    fn put_policy_version(&self, mut record: PolicyVersion) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            loop {
                let newest = GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1);
                let response = self.get_op(&self.dir("policies"), Some(newest)).await?;
                let last = response.kvs().first().map_or(Ok(0), |kv| {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    key.rsplit('/')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .ok_or_else(|| StoreError::corrupt(key, "not a policy version number"))
                })?;
                record.version = last + 1;
                let key = self.policy_key(record.version);
                if self.put_if(&key, 0, encode(&record)?).await? {
                    return Ok(record.version);
                }
                metrics::counter!(crate::metric::STORE_CONFLICTS).increment(1);
            }
        })
    }

    fn policy_version(&self, version: u64) -> StoreFuture<'_, Option<PolicyVersion>> {
        Box::pin(async move { self.get(&self.policy_key(version)).await })
    }

    fn policy_versions(&self) -> StoreFuture<'_, Vec<PolicyVersion>> {
        // Keys are zero-padded, so etcd's key order is version order.
        Box::pin(self.all("policies"))
    }

    fn put_registration(&self, record: RegistrationRecord) -> StoreFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let key = format!("{}{}", self.dir("registrations"), record.endpoint);
            let value = encode(&record)?;
            loop {
                let holder = self.get_raw(&key).await?;
                let mod_revision = match &holder {
                    Some((bytes, mod_revision)) => {
                        let holder: RegistrationRecord = decode(key.as_bytes(), bytes)?;
                        if holder.identity != record.identity {
                            return Ok(Err(holder.identity));
                        }
                        *mod_revision
                    }
                    None => 0,
                };
                if self.put_if(&key, mod_revision, value.clone()).await? {
                    return Ok(Ok(()));
                }
            }
        })
    }

    fn remove_registration(
        &self,
        identity: &sidewall_policies::SpiffeId,
        instance: &str,
    ) -> StoreFuture<'_, ()> {
        let (identity, instance) = (identity.to_string(), instance.to_owned());
        Box::pin(async move {
            let response = self
                .get_op(
                    &self.dir("registrations"),
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            let mut deletes = Vec::new();
            for kv in response.kvs() {
                let record: RegistrationRecord = decode(kv.key(), kv.value())?;
                if record.instance == instance && record.identity == identity {
                    // Only if unchanged since read: a new holder of the endpoint stays.
                    deletes.push(
                        Txn::new()
                            .when([Compare::mod_revision(
                                kv.key(),
                                CompareOp::Equal,
                                kv.mod_revision(),
                            )])
                            .and_then([
                                TxnOp::delete(kv.key(), None),
                                TxnOp::put(self.changed_key(), "", None),
                            ]),
                    );
                }
            }
            for txn in deletes {
                let response = self.txn_op(txn).await?;
                self.note_write(self.dir("registrations").as_bytes(), response.header());
            }
            Ok(())
        })
    }

    fn registrations(&self) -> StoreFuture<'_, Vec<RegistrationRecord>> {
        Box::pin(self.all("registrations"))
    }

    fn put_token(&self, token: TokenRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.put(&format!("{}{}", self.dir("tokens"), token.id), &token)
                .await
        })
    }

    fn token(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let key = format!("{}{id}", self.dir("tokens"));
        Box::pin(async move { self.get(&key).await })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(self.all("tokens"))
    }

    fn redeem_token(&self, id: &str, key_sha256: &str, now: i64) -> StoreFuture<'_, Redemption> {
        let (id, key) = (id.to_owned(), key_sha256.to_owned());
        Box::pin(async move {
            self.update_token(&id, |token| match token {
                None => (Redemption::Unknown, false),
                Some(token) => {
                    let before = token.redeemed_keys.len();
                    let outcome = redemption(token, &key, now);
                    (outcome, token.redeemed_keys.len() != before)
                }
            })
            .await
        })
    }

    fn revoke_token(&self, id: &str, now: i64) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        Box::pin(async move {
            self.update_token(&id, |token| match token {
                None => (false, false),
                Some(token) => {
                    let changed = token.revoked_at.is_none();
                    token.revoked_at.get_or_insert(now);
                    (true, changed)
                }
            })
            .await
        })
    }

    fn put_certificate(&self, record: CertificateRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.put(
                &format!("{}{}", self.dir("certificates"), record.serial),
                &record,
            )
            .await
        })
    }

    fn certificate(&self, serial: &str) -> StoreFuture<'_, Option<CertificateRecord>> {
        let key = format!("{}{serial}", self.dir("certificates"));
        Box::pin(async move { self.get(&key).await })
    }

    fn certificates(&self) -> StoreFuture<'_, Vec<CertificateRecord>> {
        Box::pin(self.all("certificates"))
    }

    fn put_revocation(&self, record: RevocationRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let key = format!(
                "{}{}:{}",
                self.dir("revocations"),
                record.kind,
                record.value
            );
            self.put(&key, &record).await
        })
    }

    fn revocations(&self) -> StoreFuture<'_, Vec<RevocationRecord>> {
        Box::pin(self.all("revocations"))
    }

    fn ca_record(&self) -> StoreFuture<'_, Option<(crate::ca::rotation::CaRecord, u64)>> {
        Box::pin(async move {
            let key = self.ca_record_key();
            match self.get_raw(&key).await? {
                Some((bytes, revision)) => Ok(Some((
                    decode(key.as_bytes(), &bytes)?,
                    u64::try_from(revision).unwrap_or(0),
                ))),
                None => Ok(None),
            }
        })
    }

    fn put_ca_record(
        &self,
        record: crate::ca::rotation::CaRecord,
        version: u64,
    ) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let key = self.ca_record_key();
            self.put_if(
                &key,
                i64::try_from(version).unwrap_or(i64::MAX),
                encode(&record)?,
            )
            .await
        })
    }

    fn epoch(&self) -> StoreFuture<'_, String> {
        Box::pin(async move {
            let key = self.key("epoch");
            match self.get_raw(&key).await? {
                Some((bytes, _)) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
                None => Err(StoreError::corrupt(key, "missing")),
            }
        })
    }

    fn reserve_counters(&self, at_least: u64) -> StoreFuture<'_, u64> {
        // Snapshot counters are etcd revisions from the first snapshot on (`Loaded::revision`).
        Box::pin(async move { Ok(at_least) })
    }

    fn records(&self) -> StoreFuture<'_, Records> {
        Box::pin(async move {
            // One range read per kind, all at the revision of the first: a consistent copy
            // that does not carry the flow roll-ups.
            let mut records = Records::default();
            let mut revision = 0;
            for kind in [
                "policies",
                "tokens",
                "certificates",
                "revocations",
                "registrations",
                "audit",
            ] {
                let mut options = GetOptions::new().with_prefix();
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let response = self.get_op(&self.dir(kind), Some(options)).await?;
                if revision == 0 {
                    revision = response.header().map_or(0, |h| h.revision());
                }
                for kv in response.kvs() {
                    let (key, value) = (kv.key(), kv.value());
                    match kind {
                        "policies" => records.policy_versions.push(decode(key, value)?),
                        "tokens" => records.tokens.push(decode(key, value)?),
                        "certificates" => records.certificates.push(decode(key, value)?),
                        "revocations" => records.revocations.push(decode(key, value)?),
                        "registrations" => records.registrations.push(decode(key, value)?),
                        _ => records.audit.push(decode(key, value)?),
                    }
                }
            }
            Ok(records)
        })
    }

    fn load(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(self.read_state())
    }

    fn follow(&self, distribution: Arc<Distribution>, stop: watch::Receiver<bool>) -> Task {
        Box::pin(self.clone().follow_feed(distribution, stop))
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn replicated(&self) -> bool {
        true
    }

    fn publish(&self, distribution: Arc<Distribution>, stop: watch::Receiver<bool>) -> Task {
        Box::pin(self.clone().publish_summary(distribution, stop))
    }

    fn replicas(&self) -> StoreFuture<'_, Vec<ReplicaSummary>> {
        Box::pin(self.all("replicas"))
    }

    fn put_shared_run(&self, run: crate::distribution::SharedRun) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let answers = format!("{}answers/", self.dir("verification"));
            self.delete_range(&answers, &prefix_end(&answers)).await?;
            self.put(&format!("{}run", self.dir("verification")), &run)
                .await
        })
    }

    fn shared_run(&self) -> StoreFuture<'_, Option<crate::distribution::SharedRun>> {
        Box::pin(async move { self.get(&format!("{}run", self.dir("verification"))).await })
    }

    fn put_probe_answers(
        &self,
        run: &str,
        replica: &str,
        answers: Vec<sidewall_policies::wire::report::VerificationPair>,
    ) -> StoreFuture<'_, ()> {
        let key = format!(
            "{}answers/{run}/{}",
            self.dir("verification"),
            crate::random::hex(replica.as_bytes())
        );
        Box::pin(async move { self.put(&key, &answers).await })
    }

    fn probe_answers(
        &self,
        run: &str,
    ) -> StoreFuture<'_, Vec<sidewall_policies::wire::report::VerificationPair>> {
        let kind = format!("verification/answers/{run}");
        Box::pin(async move {
            let replicas: Vec<Vec<sidewall_policies::wire::report::VerificationPair>> =
                self.all(&kind).await?;
            Ok(replicas.into_iter().flatten().collect())
        })
    }
}
