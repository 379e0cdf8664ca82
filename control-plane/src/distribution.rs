//! Policy distribution: the policy set in force, the directory built from registrations, one
//! snapshot per workload; the fleet of sidecars ([`fleet`]) and the flows they report
//! ([`flows`]).
//!
//! Distribution follows the store's change feed ([`Distribution::follow`]): every change (a
//! policy version, a registration, a revocation) arrives as the state read at a new store
//! revision; each watch stream rebuilds its workload's snapshot and sends it only if its
//! content changed, so a change reaches only the workloads it concerns. Snapshot versions are
//! `(store epoch, counter)` and the counter is the revision: embedded, it continues above the
//! start time in milliseconds, so it keeps growing across restarts without a write per change;
//! with etcd, it is etcd's revision, so every replica agrees. Sidecars' liveness and acks stay
//! in this process; a [`ReplicaSummary`] is what other replicas learn of them.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use sidewall_policies::load::{LoadErrors, LoadOptions, Source, load_sources};
use sidewall_policies::snapshot::directory::Registrations;
use sidewall_policies::snapshot::{Revocations, Schema, Snapshot, SnapshotVersion};
use sidewall_policies::{Engine, PolicySet, SpiffeId, TrustDomain};
use tokio::sync::{oneshot, watch};

use crate::store::{RegistrationRecord, RevocationRecord};

pub mod fleet;
pub mod flows;
mod probes;
pub use probes::SharedRun;
pub mod rollups;
pub use fleet::{
    ClaimRefused, IdentityLimits, Pending, RECONNECT_GRACE_SECONDS, ReplicaSummary, SUMMARY_ROWS,
};
pub use flows::{MAX_FLOWS, MAX_FLOWS_PER_PEER, MAX_FLOWS_PER_TARGET, decide, explain};
use sidewall_policies::wire::operator::RevocationKind;
pub use sidewall_policies::wire::operator::{
    FleetEntry, FlowKey, FlowStats, RefusedAddress, RefusedBecause,
};

/// Why a policy set was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub LoadErrors);

struct State {
    policy_version: u64,
    applied_by: String,
    engine: Arc<Engine>,
    files: Vec<Source>,
    registrations: Vec<RegistrationRecord>,
    revocations: Revocations,
    generation: u64,
    /// Generation at which each policy version took effect (this process's lifetime).
    version_generation: HashMap<u64, (u64, Instant)>,
    /// The CA set, once a rotation has begun.
    ca: Option<crate::ca::rotation::CaRecord>,
    /// What every snapshot carries of it, derived once when it changes: the roots trusted
    /// and the signing intermediate's fingerprint.
    ca_roots: Vec<String>,
    signing_ca: Option<String>,
    /// Generation at which the trust bundle or the signing CA last changed (in this process).
    ca_generation: u64,
}

/// When each sidecar applied one policy version: instance → (identity, Unix seconds).
type Rollout = BTreeMap<String, (String, i64)>;

/// Distribution state shared by the API handlers and the watch streams.
pub struct Distribution {
    epoch: String,
    trust_domain: TrustDomain,
    bundle_pem: String,
    replica: std::sync::OnceLock<String>,
    state: RwLock<State>,
    /// Other replicas share the store ([`crate::store::Store::replicated`]).
    replicated: bool,
    changes: watch::Sender<u64>,
    fleet: Mutex<BTreeMap<String, FleetEntry>>,
    limits: IdentityLimits,
    /// The open watch of each instance (one each), by number: dropping its sender ends it.
    watches: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
    next_watch: AtomicU64,
    flows: Mutex<flows::FlowTable>,
    /// What this process's sidecars reported today, until written to the store.
    rollups: Mutex<rollups::Rollups>,
    /// This process, in the roll-ups it writes.
    process: String,
    /// One roll-up write at a time (the minute's, a report's, the last at stop).
    rollup_writes: tokio::sync::Mutex<()>,
    /// When each sidecar first applied each policy version, seen by this process: version →
    /// instance → (identity, Unix seconds). The newest [`fleet::ROLLOUT_VERSIONS`] versions.
    rollouts: Mutex<BTreeMap<u64, Rollout>>,
    /// The segmentation test run, the newest (one at a time).
    verification: Mutex<Option<probes::Run>>,
    /// Probe orders waiting for each source instance's watch.
    probe_orders: Mutex<HashMap<String, Vec<sidewall_policies::wire::Probe>>>,
    /// Bumped when probe orders are waiting.
    probes_changed: watch::Sender<u64>,
    /// The newest segmentation report this process signed, as the dashboard's page.
    latest_report: Mutex<Option<bytes::Bytes>>,
    detection: crate::detection::Detector,
    source_error: Mutex<Option<String>>,
    closing: watch::Sender<bool>,
    /// When this process started distributing, Unix seconds: what it holds in memory (the
    /// fleet, the flows) covers no earlier time.
    started: i64,
}

/// Loads policy files with the same engine as `sidewall policy validate`.
pub fn compile(files: &[Source]) -> Result<PolicySet, Refused> {
    load_sources(files, &LoadOptions::default())
        .map(|loaded| loaded.policies)
        .map_err(Refused)
}

#[cfg(test)]
impl Distribution {
    /// One with nothing in force (no policy, registration or revocation), for unit tests.
    #[allow(clippy::unwrap_used)]
    pub(crate) fn for_tests() -> Self {
        Self::new(
            "e".into(),
            TrustDomain::new("sidewall.local").unwrap(),
            String::new(),
            crate::store::Loaded {
                revision: 1,
                read_at: 1,
                latest: None,
                registrations: Vec::new(),
                revocations: Vec::new(),
                ca: None,
            },
            false,
        )
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Distribution {
    /// Starts from the stored state read at one revision, which is the snapshot counter
    /// ([`crate::store::Loaded::revision`]). `replicated`: other replicas share the store and
    /// hold their own sidecars' watches.
    pub fn new(
        epoch: String,
        trust_domain: TrustDomain,
        bundle_pem: String,
        loaded: crate::store::Loaded,
        replicated: bool,
    ) -> Self {
        let distribution = Self {
            epoch,
            trust_domain,
            bundle_pem,
            replica: std::sync::OnceLock::new(),
            state: RwLock::new(State {
                policy_version: 0,
                applied_by: String::new(),
                engine: Arc::new(Engine::new(PolicySet::default())),
                files: Vec::new(),
                registrations: Vec::new(),
                revocations: Revocations::default(),
                generation: 0,
                version_generation: HashMap::new(),
                ca: None,
                ca_roots: Vec::new(),
                signing_ca: None,
                ca_generation: 0,
            }),
            replicated,
            changes: watch::channel(0).0,
            fleet: Mutex::new(BTreeMap::new()),
            limits: IdentityLimits::default(),
            watches: Mutex::new(HashMap::new()),
            next_watch: AtomicU64::new(0),
            flows: Mutex::new(flows::FlowTable::default()),
            rollups: Mutex::new(rollups::Rollups::default()),
            process: crate::random::hex_token(8),
            rollup_writes: tokio::sync::Mutex::new(()),
            latest_report: Mutex::new(None),
            verification: Mutex::new(None),
            probe_orders: Mutex::new(HashMap::new()),
            probes_changed: watch::channel(0).0,
            rollouts: Mutex::new(BTreeMap::new()),
            detection: crate::detection::Detector::new(Default::default()),
            source_error: Mutex::new(None),
            closing: watch::channel(false).0,
            started: crate::now_unix(),
        };
        distribution.put_in_force(loaded, true);
        distribution
    }

    /// Keeps `report`, just signed, as the newest the dashboard links, rendered once
    /// ([`crate::report::dashboard_html`]).
    pub fn set_latest_report(&self, report: &sidewall_policies::wire::report::Report) {
        let page = bytes::Bytes::from(crate::report::dashboard_html(report));
        *lock(&self.latest_report) = Some(page);
    }

    /// The page of the newest report this process signed, if any.
    pub fn latest_report(&self) -> Option<bytes::Bytes> {
        lock(&self.latest_report).clone()
    }

    /// With detection's thresholds and windows from `config` (its baseline starts now).
    #[must_use]
    pub fn with_detection(mut self, config: crate::detection::DetectionConfig) -> Self {
        self.detection = crate::detection::Detector::new(config);
        self
    }

    /// Connections `target`'s sidecar refused before authorizing an identity: to detection.
    pub fn report_refusals(
        &self,
        target: &SpiffeId,
        refusals: &[sidewall_policies::wire::RefusalRecord],
    ) {
        self.detection.observe_refusals(target, refusals);
    }

    /// The alerts detection raised recently, oldest first.
    pub fn alerts(&self) -> Vec<crate::detection::Alert> {
        self.detection.alerts()
    }

    /// With `limits` instead of the defaults.
    #[must_use]
    pub fn with_limits(mut self, limits: IdentityLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Follows the store's change feed: puts the state last changed at `loaded.revision` in
    /// force, with that revision as the snapshot counter (with etcd, every replica sends the
    /// same version for the same content). A read no newer than what is in force is ignored.
    pub fn follow(&self, loaded: crate::store::Loaded) {
        self.put_in_force(loaded, false);
    }

    fn put_in_force(&self, loaded: crate::store::Loaded, first: bool) {
        let mut state = self.write();
        if loaded.revision <= state.generation && !first {
            return;
        }
        let (version, applied_by, files) = match loaded.latest {
            Some(v) => (v.version, v.applied_by, v.files),
            None => (0, String::new(), Vec::new()),
        };
        if version != state.policy_version || first {
            // Valid when it was applied; if this release cannot load it, default deny.
            let set = compile(&files).unwrap_or_else(|e| {
                tracing::error!(version, errors = %e, "the stored policy set does not load: enforcing default deny");
                PolicySet::default()
            });
            state.engine = Arc::new(Engine::new(set));
            state.policy_version = version;
            state.applied_by = applied_by;
            state.files = files;
            state
                .version_generation
                .insert(version, (loaded.revision, Instant::now()));
            metrics::gauge!(crate::metric::POLICY_VERSION).set(version as f64);
        }
        state.registrations = loaded.registrations;
        state.revocations = to_revocations(&loaded.revocations);
        if loaded.ca != state.ca || first {
            state.ca_roots = loaded
                .ca
                .as_ref()
                .map_or_else(|| vec![self.bundle_pem.clone()], |ca| ca.roots());
            state.signing_ca = loaded.ca.as_ref().map(|ca| ca.signing_ca());
            state.ca = loaded.ca;
            state.ca_generation = loaded.revision;
        }
        state.generation = loaded.revision;
        self.changes.send_replace(loaded.revision);
    }

    /// Waits (at most `limit`) until the state in force is at least at store `revision`;
    /// false if it is not by then.
    pub async fn caught_up(&self, revision: u64, limit: std::time::Duration) -> bool {
        let mut changes = self.subscribe();
        tokio::time::timeout(
            limit,
            changes.wait_for(|generation| *generation >= revision),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every open watch stream (the control plane is stopping; sidecars reconnect).
    pub fn close_watches(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves when the control plane starts stopping.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Subscribes to changes (the current generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The policy set in force: version, who applied it, the engine, the files.
    pub fn current(&self) -> (u64, String, Arc<Engine>, Vec<Source>) {
        let state = self.read();
        (
            state.policy_version,
            state.applied_by.clone(),
            state.engine.clone(),
            state.files.clone(),
        )
    }

    /// The CA rotation record in force, and the generation at which the trust bundle or the
    /// signing CA last changed: a sidecar has the bundle once it processed that generation.
    pub fn ca(&self) -> (Option<crate::ca::rotation::CaRecord>, u64) {
        let state = self.read();
        (state.ca.clone(), state.ca_generation)
    }

    /// The registrations in force (one per sidecar instance).
    pub fn registrations(&self) -> Vec<RegistrationRecord> {
        self.read().registrations.clone()
    }

    /// Whether an identity or certificate serial is on the revocation list.
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.read().revocations.is_revoked(id, serial)
    }

    /// Whether an identity (every certificate of it) is on the revocation list.
    pub fn is_identity_revoked(&self, id: &SpiffeId) -> bool {
        self.read().revocations.identities.contains(id)
    }

    /// Records (or clears) a problem with the policy source directory.
    pub fn set_source_error(&self, error: Option<String>) {
        *lock(&self.source_error) = error;
    }

    /// The current problem with the policy source directory, if any.
    pub fn source_error(&self) -> Option<String> {
        lock(&self.source_error).clone()
    }

    /// The snapshot for `workload` now, and a hash of its content (version excluded).
    pub fn snapshot_for(&self, workload: &SpiffeId) -> (Snapshot, u64) {
        let state = self.read();
        let mut snapshot = Snapshot {
            schema: Schema::default(),
            version: SnapshotVersion {
                epoch: self.epoch.clone(),
                counter: 0,
            },
            workload: workload.clone(),
            policies: state.engine.set_for(workload),
            trust_bundles: BTreeMap::from([(self.trust_domain.clone(), state.ca_roots.clone())]),
            signing_ca: state.signing_ca.clone(),
            revocations: state.revocations.clone(),
            directory: Registrations::new(&state.registrations)
                .directory_for(&state.engine, workload),
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        snapshot.to_json().hash(&mut hasher);
        snapshot.version.counter = state.generation;
        (snapshot, hasher.finish())
    }

    /// The replica's own URL (set once the API is bound).
    pub fn replica(&self) -> &str {
        self.replica.get().map_or("", String::as_str)
    }

    /// Records the replica's own URL.
    pub fn set_replica(&self, url: String) {
        let _ = self.replica.set(url);
    }

    /// The addresses of a registration by `identity` that its callers would not be sent to
    /// now, with why; each counted in `sidewall_control_plane_addresses_refused_total`.
    pub fn refuse_addresses(
        &self,
        identity: &SpiffeId,
        addresses: &[String],
        registrations: &[RegistrationRecord],
    ) -> Vec<RefusedAddress> {
        let state = self.read();
        let registrations = Registrations::new(registrations);
        addresses
            .iter()
            .filter_map(|address| {
                let reason = registrations.address_refusal(&state.engine, identity, address)?;
                metrics::counter!(crate::metric::ADDRESSES_REFUSED, "reason" => reason.as_str())
                    .increment(1);
                tracing::warn!(%identity, address, reason = reason.as_str(), "registered address refused: callers are not sent there");
                Some(RefusedAddress {
                    address: address.clone(),
                    reason,
                })
            })
            .collect()
    }
}

fn to_revocations(records: &[RevocationRecord]) -> Revocations {
    let mut revocations = Revocations::default();
    for record in records {
        match record.kind {
            RevocationKind::Identity => {
                if let Ok(id) = SpiffeId::parse(&record.value) {
                    revocations.identities.push(id);
                }
            }
            RevocationKind::Serial => revocations.serials.push(record.value.clone()),
        }
    }
    revocations
}
