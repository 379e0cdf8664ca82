//! The control plane's state behind one trait: join tokens, issued certificates, revocations.
//!
//! The embedded store ([`embedded::EmbeddedStore`], one redb file) is the default: crash-safe,
//! no service to run. The etcd store (`etcd::EtcdStore`, cargo feature `etcd`) backs several
//! replicas: every operation that must be atomic across replicas (redeeming a token, numbering a
//! policy version) is one method, an etcd transaction there, and methods are async.
//!
//! Both publish a change feed ([`Store::follow`]): every write that changes snapshots (a policy
//! version, a registration, a revocation) moves the store's revision on, and distribution
//! reloads what it needs at that revision. The API writes, then waits for the feed to put the
//! write in force ([`Store::written`]); it never updates distribution itself.

use crate::ca::rotation::CaRecord;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sidewall_policies::load::Source;
pub use sidewall_policies::wire::operator::RegistrationRecord;
use sidewall_policies::wire::operator::{AuditRecord, RevocationKind, Role};
use tokio::sync::watch;

use crate::audit::AuditEvent;
use crate::distribution::Distribution;

pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;

/// How many snapshot counters one control-plane process reserves at start
/// ([`Store::reserve_counters`]): more than it can use (one per change), few enough that a
/// `u64` lasts millions of restarts.
pub const COUNTER_BLOCK: u64 = 1 << 40;

/// A boxed future returned by store methods (dyn-compatible for a runtime choice of store).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The error a [`StoreError`] was caused by, kept as it is (its type and its own causes).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the store failed. Its message carries the cause's (logs and the CLI print one line);
/// `source()` gives the cause itself to code that looks into it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store file could not be opened.
    #[error("store {}: {source}", path.display())]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The backing database failed.
    #[error("store: {source}")]
    Backend {
        /// The database's error.
        #[source]
        source: Cause,
    },
    /// A replicated store cannot serve now: unreachable, no leader, no quorum.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What failed, with the cause's own words.
        message: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// A stored record does not decode.
    #[error("store: corrupt record {key}: {source}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What is wrong.
        #[source]
        source: Cause,
    },
}

impl StoreError {
    /// The backing database failed with `error`.
    pub fn backend(error: impl Into<Cause>) -> Self {
        Self::Backend {
            source: error.into(),
        }
    }

    /// The record at `key` does not decode, because of `error`.
    pub fn corrupt(key: impl Into<String>, error: impl Into<Cause>) -> Self {
        Self::Corrupt {
            key: key.into(),
            source: error.into(),
        }
    }

    /// The store cannot serve now (`message`), without an error of a client to keep.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: None,
        }
    }
}

/// A task that runs until the control plane stops ([`Store::follow`], [`Store::publish`]).
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The state distribution needs, read at one revision of the store (which it follows:
/// [`Distribution::follow`]).
#[derive(Debug)]
pub struct Loaded {
    /// The revision of the last change to that state: the snapshot counter. With etcd, the
    /// `changed` marker's `mod_revision` (0 before any), so two replicas that read the same
    /// content read the same value, whatever else was written to etcd meanwhile. Embedded,
    /// this process's counter, from [`Store::reserve_counters`] on.
    pub revision: u64,
    /// The store's revision of the read itself (etcd's change feed continues after it).
    pub read_at: u64,
    /// The newest policy version.
    pub latest: Option<PolicyVersion>,
    /// Every registration.
    pub registrations: Vec<RegistrationRecord>,
    /// Every revocation.
    pub revocations: Vec<RevocationRecord>,
    /// The CA set, once a rotation has begun ([`crate::ca::rotation`]).
    pub ca: Option<CaRecord>,
}

/// A join token as stored: the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public identifier (also the lookup key).
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// The identity the token attests.
    pub identity: String,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// How many distinct keys may redeem it.
    pub uses: u32,
    /// SHA-256 of each public key that redeemed it (redeeming again with one is idempotent).
    #[serde(default)]
    pub redeemed_keys: Vec<String>,
    /// Set when revoked, Unix seconds.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// The operator who created it.
    #[serde(default)]
    pub created_by: String,
    /// SHA-256 of the root the token pins (absent in records made before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_root: Option<String>,
}

/// What redeeming a token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redemption {
    /// A use was recorded for this key (or it had been already: idempotent).
    Redeemed,
    /// No such token.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked by an operator.
    Revoked,
    /// Every use is taken by other keys.
    UsedUp,
}

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial, lowercase hex (the key).
    pub serial: String,
    /// Identity.
    pub identity: String,
    /// Issued at, Unix seconds.
    pub issued_at: i64,
    /// Expires at, Unix seconds.
    pub not_after: i64,
    /// How the caller authenticated: `token:<id>`, `renewal:<serial>`, `operator:<id>`, or
    /// `control-plane` for the `admin` credential it writes itself.
    pub authenticated_by: String,
    /// An operator certificate's role (the certificate carries it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The key's type (`ECDSA P-256`, `RSA`…), from the request; absent in records written
    /// before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SHA-256 of the root the certificate chains to (absent in records written before CA
    /// rotation existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_root: Option<String>,
}

/// What one control-plane process counted of its sidecars' reports in one UTC day: one chunk
/// of its daily roll-up ([`crate::distribution::rollups`]), small enough for one etcd request.
/// Reports over a period add up every process's chunks of the period's days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupRecord {
    /// The day: Unix seconds divided by 86 400.
    pub day: i64,
    /// The process that counted (random, fixed at its start).
    pub process: String,
    /// The chunk's number within that process's day.
    pub chunk: u32,
    /// The replica the process served as (its API URL).
    pub replica: String,
    /// When the process began counting that day, Unix seconds.
    pub from: i64,
    /// Flows, with their counts that day.
    #[serde(default)]
    pub flows: Vec<sidewall_policies::wire::operator::FlowRow>,
    /// How connections reached each identity's sidecar that day.
    #[serde(default)]
    pub transport: Vec<TransportRow>,
    /// Connections callers' sidecars refused that day before they left the caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<OutboundRow>,
    /// When each sidecar first applied a policy version that day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedRow>,
}

/// When one sidecar first applied one policy version (for the report's change history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRow {
    /// The policy version.
    pub version: u64,
    /// The sidecar process.
    pub instance: String,
    /// Its identity.
    pub identity: String,
    /// When it applied it, Unix seconds.
    pub at: i64,
}

impl RollupRecord {
    /// The record's key within the roll-ups: by day first, so a range of days is a key range.
    pub fn key(&self) -> String {
        format!("{:08}/{}/{:05}", self.day, self.process, self.chunk)
    }

    /// The first key of `day`'s roll-ups (and the end of the range before it).
    pub fn day_key(day: i64) -> String {
        format!("{:08}/", day.clamp(0, 99_999_999))
    }
}

/// Connections from one caller to one target its sidecar refused for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundRow {
    /// The caller's identity.
    pub source: String,
    /// Why.
    pub reason: sidewall_policies::wire::OutboundReason,
    /// The service's identity, or the address outside the mesh.
    pub target: String,
    /// The port asked for.
    pub port: u16,
    /// How many.
    pub count: u64,
    /// When last reported, Unix seconds.
    pub last_seen: i64,
}

/// TLS handshakes and plaintext connections one identity's sidecar reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportRow {
    /// The identity.
    pub identity: String,
    /// Handshakes by TLS version and cipher suite.
    #[serde(default)]
    pub tls: Vec<sidewall_policies::wire::TlsUse>,
    /// Plaintext connections by permissive port.
    #[serde(default)]
    pub plaintext: Vec<sidewall_policies::wire::PlaintextUse>,
    /// When last reported, Unix seconds.
    pub last_seen: i64,
}

/// A revoked identity or serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// What it names.
    pub kind: RevocationKind,
    /// The identity or serial.
    pub value: String,
    /// When, Unix seconds.
    pub at: i64,
    /// Who.
    #[serde(default)]
    pub by: String,
}

/// An accepted policy set: its version, who applied it, and the files themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// Assigned by the store, 1, 2, 3, …
    pub version: u64,
    /// The operator (or `gitops:<dir>`).
    pub applied_by: String,
    /// When, Unix seconds.
    pub applied_at: i64,
    /// The files, as applied.
    pub files: Vec<Source>,
}

/// Everything a store holds, read at one point in time: what a backup carries (the CA aside).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Records {
    /// Every policy version, oldest first.
    pub policy_versions: Vec<PolicyVersion>,
    /// Every join token (secrets only as hashes).
    pub tokens: Vec<TokenRecord>,
    /// Every issued certificate.
    pub certificates: Vec<CertificateRecord>,
    /// Every revocation.
    pub revocations: Vec<RevocationRecord>,
    /// Every registration.
    pub registrations: Vec<RegistrationRecord>,
    /// The audit trail, in the store's order (absent from backups made before it existed).
    #[serde(default)]
    pub audit: Vec<AuditRecord>,
}

impl Records {
    /// Whether there is nothing at all.
    pub fn is_empty(&self) -> bool {
        self.policy_versions.is_empty()
            && self.tokens.is_empty()
            && self.certificates.is_empty()
            && self.revocations.is_empty()
            && self.registrations.is_empty()
            && self.audit.is_empty()
    }
}

/// The control plane's persistent state.
pub trait Store: Send + Sync + 'static {
    /// Appends `event` to the audit trail ([`crate::audit`]): numbered one above the newest
    /// record and linked to its hash, in one transaction (replicas race safely).
    fn append_audit(&self, event: AuditEvent, time: i64) -> StoreFuture<'_, AuditRecord>;
    /// Audit records whose key is above `after`, at most `limit`, in the store's order, each
    /// with its key (a record altered in the store may carry another number).
    fn audit_records(&self, after: u64, limit: usize) -> StoreFuture<'_, Vec<(u64, AuditRecord)>>;
    /// Writes an audit record as it is, at its own number, if that place is free (an import:
    /// the trail is carried over unchanged, breaks included, for `audit verify` to judge).
    /// False when the place is taken.
    fn restore_audit(&self, record: AuditRecord) -> StoreFuture<'_, bool>;
    /// Removes the audit records numbered up to `through` (a retention cut, which the caller
    /// has recorded first). The number removed.
    fn prune_audit(&self, through: u64) -> StoreFuture<'_, u64>;
    /// Stores a new policy version: assigns `version` (last + 1) atomically and returns it.
    fn put_policy_version(&self, record: PolicyVersion) -> StoreFuture<'_, u64>;
    /// One policy version.
    fn policy_version(&self, version: u64) -> StoreFuture<'_, Option<PolicyVersion>>;
    /// Every policy version, oldest first.
    fn policy_versions(&self) -> StoreFuture<'_, Vec<PolicyVersion>>;
    /// Adds or replaces a registration, keyed by endpoint. Refused (returns the holder's
    /// identity) when another identity holds the endpoint.
    fn put_registration(&self, record: RegistrationRecord) -> StoreFuture<'_, Result<(), String>>;
    /// Removes the registrations of `identity`'s sidecar `instance` (never another
    /// identity's, whatever instance id it used).
    fn remove_registration(
        &self,
        identity: &sidewall_policies::SpiffeId,
        instance: &str,
    ) -> StoreFuture<'_, ()>;
    /// Every registration.
    fn registrations(&self) -> StoreFuture<'_, Vec<RegistrationRecord>>;
    /// Adds a token.
    fn put_token(&self, token: TokenRecord) -> StoreFuture<'_, ()>;
    /// Looks a token up.
    fn token(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>>;
    /// Every token.
    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>>;
    /// Atomically records a redemption of token `id` by the key with hash `key_sha256` at
    /// `now`, if the token allows it. The secret is checked by the caller beforehand.
    fn redeem_token(&self, id: &str, key_sha256: &str, now: i64) -> StoreFuture<'_, Redemption>;
    /// Marks a token revoked; false if there is no such token.
    fn revoke_token(&self, id: &str, now: i64) -> StoreFuture<'_, bool>;
    /// Records an issued certificate.
    fn put_certificate(&self, record: CertificateRecord) -> StoreFuture<'_, ()>;
    /// Looks a certificate up by serial.
    fn certificate(&self, serial: &str) -> StoreFuture<'_, Option<CertificateRecord>>;
    /// Every issued certificate.
    fn certificates(&self) -> StoreFuture<'_, Vec<CertificateRecord>>;
    /// Adds a revocation (idempotent).
    fn put_revocation(&self, record: RevocationRecord) -> StoreFuture<'_, ()>;
    /// Every revocation.
    fn revocations(&self) -> StoreFuture<'_, Vec<RevocationRecord>>;
    /// The CA rotation record and its version, once a rotation has begun.
    fn ca_record(&self) -> StoreFuture<'_, Option<(CaRecord, u64)>>;
    /// Writes the CA rotation record if the stored one is still at `version` (0: none yet);
    /// false when another write came first. It changes every snapshot (the trust bundle).
    fn put_ca_record(&self, record: CaRecord, version: u64) -> StoreFuture<'_, bool>;
    /// Writes (or replaces) one chunk of a process's daily flow roll-up.
    fn put_rollup(&self, record: RollupRecord) -> StoreFuture<'_, ()>;
    /// Every roll-up chunk of the days `from..=to`, by day.
    fn rollups(&self, from: i64, to: i64) -> StoreFuture<'_, Vec<RollupRecord>>;
    /// Removes the roll-ups of the days before `before`; the number of chunks removed.
    fn prune_rollups(&self, before: i64) -> StoreFuture<'_, u64>;
    /// The store's epoch: a random value fixed when the store was created.
    fn epoch(&self) -> StoreFuture<'_, String>;
    /// The first snapshot counter this process may send: at least `at_least` (the clock, in
    /// ms) and above every counter an earlier process of this store could have sent, whatever
    /// the clock says now (a clock stepped back, a fast restart after many changes). Reserves
    /// [`COUNTER_BLOCK`] counters for this process, durably, before anything is sent. A store
    /// whose snapshot counters are its own revisions (etcd) returns `at_least`.
    fn reserve_counters(&self, at_least: u64) -> StoreFuture<'_, u64>;
    /// Everything, read at one point in time (one read transaction, one etcd revision).
    fn records(&self) -> StoreFuture<'_, Records>;
    /// What distribution needs (the newest policy version, registrations, revocations), read
    /// at one revision.
    fn load(&self) -> StoreFuture<'_, Loaded>;
    /// The change feed: keeps `distribution` in step with the store until `stop` turns true,
    /// one reload per batch of changes. While the store cannot serve, distribution keeps
    /// what it has and the feed retries with backoff.
    fn follow(&self, distribution: Arc<Distribution>, stop: watch::Receiver<bool>) -> Task;
    /// The revision of the newest write that changes snapshots (at least this process's last
    /// one): once distribution has followed the feed that far, the write is in force.
    fn written(&self) -> u64;
    /// Whether other control-plane replicas share this store (and hold their own sidecars'
    /// watches).
    fn replicated(&self) -> bool {
        false
    }
    /// For a replicated store: publishes this replica's summary of its sidecars until `stop`
    /// turns true. Nothing to publish for a store that serves one control plane.
    fn publish(&self, _distribution: Arc<Distribution>, _stop: watch::Receiver<bool>) -> Task {
        Box::pin(async {})
    }
    /// Shares the segmentation test just started with the other replicas (a replicated store;
    /// elsewhere nothing to do), dropping the answers to earlier runs.
    fn put_shared_run(&self, _run: crate::distribution::SharedRun) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// The segmentation test shared last, if any.
    fn shared_run(&self) -> StoreFuture<'_, Option<crate::distribution::SharedRun>> {
        Box::pin(async { Ok(None) })
    }
    /// Shares the answers `replica`'s sidecars gave to run `run`'s probes.
    fn put_probe_answers(
        &self,
        _run: &str,
        _replica: &str,
        _answers: Vec<sidewall_policies::wire::report::VerificationPair>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Every replica's answers to run `run`'s probes.
    fn probe_answers(
        &self,
        _run: &str,
    ) -> StoreFuture<'_, Vec<sidewall_policies::wire::report::VerificationPair>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// For a replicated store: what the other replicas publish about their sidecars. Empty
    /// for a store that serves one control plane.
    fn replicas(&self) -> StoreFuture<'_, Vec<crate::distribution::ReplicaSummary>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Longest wait between two attempts to reload after the store failed.
pub const MAX_FEED_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// Counts and logs a change feed that failed; returns the next backoff (doubled, capped).
pub(crate) fn feed_failed(error: &StoreError, backoff: std::time::Duration) -> std::time::Duration {
    metrics::counter!(crate::metric::STORE_WATCH_FAILURES).increment(1);
    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "the store's change feed failed; serving the state in memory");
    (backoff * 2).min(MAX_FEED_BACKOFF)
}
