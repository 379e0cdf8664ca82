//! Policy distribution: the policy set in force, the directory built from registrations, one
//! snapshot per workload, and what each sidecar has received and acknowledged.
//!
//! Every change (a policy version, a registration, a revocation) bumps a generation counter;
//! each watch stream rebuilds its workload's snapshot and sends it only if its content
//! changed, so a change reaches only the workloads it concerns. Snapshot versions are
//! `(store epoch, counter)`; the counter continues from the start time in milliseconds, so it
//! keeps growing across restarts of the control plane without a write per change. With the
//! etcd store, [`Distribution::follow`] puts the state in force at an etcd revision, which is
//! the counter: every replica agrees. Sidecars' liveness and acks stay in this process; a
//! [`ReplicaSummary`] is what other replicas learn of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sidewall_policies::engine::{Query, Request, Subject};
use sidewall_policies::load::{LoadErrors, LoadOptions, Source, load_sources};
use sidewall_policies::policy::Action;
use sidewall_policies::snapshot::{Revocations, Schema, ServiceEntry, Snapshot, SnapshotVersion};
use sidewall_policies::{Engine, Outcome, PolicySet, Protocol, SpiffeId, TrustDomain};
use tokio::sync::{oneshot, watch};

use crate::now_unix;
use crate::store::{RegistrationRecord, RevocationRecord};
use sidewall_policies::wire::operator::{Fleet, RevocationKind};
pub use sidewall_policies::wire::operator::{
    FleetEntry, FlowKey, FlowStats, RefusedAddress, RefusedBecause,
};

/// Most distinct flows kept for `policy impact`.
pub const MAX_FLOWS: usize = 10_000;
/// Distinct flows kept for one reporting sidecar (target identity).
pub const MAX_FLOWS_PER_TARGET: usize = 2_000;
/// Distinct flows kept for one peer of one target.
pub const MAX_FLOWS_PER_PEER: usize = 500;

/// What one workload identity may hold in the control plane (review M4), so that one
/// compromised workload cannot grow it without bound or inflate its callers' snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityLimits {
    /// Sidecar processes (fleet rows), hence live watch streams and registrations. When a new
    /// one would pass it, the identity's row disconnected longest makes room; with every row
    /// connected, the new one is refused. Default is 1024.
    pub instances: usize,
    /// Distinct extra addresses over all its registrations. Default is 64.
    pub addresses: usize,
    /// How long a disconnected sidecar's row stays in the fleet view. Default is 1 h.
    pub retention: Duration,
}

impl Default for IdentityLimits {
    fn default() -> Self {
        Self {
            instances: 1024,
            addresses: 64,
            retention: Duration::from_secs(3600),
        }
    }
}

/// Why an instance id cannot be used by an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimRefused {
    /// Another identity uses it (named).
    Taken(String),
    /// The identity already has [`IdentityLimits::instances`] sidecars connected.
    Full(usize),
}

/// The registrations by endpoint host, built once per directory assembly so that checking an
/// address costs one lookup, not a pass over every registration.
struct Hosts<'a>(HashMap<IpAddr, Vec<(&'a RegistrationRecord, u16)>>);

impl<'a> Hosts<'a> {
    fn new(registrations: &'a [RegistrationRecord]) -> Self {
        let mut hosts: HashMap<IpAddr, Vec<_>> = HashMap::new();
        for record in registrations {
            if let Ok(endpoint) = record.endpoint.parse::<std::net::SocketAddr>() {
                hosts
                    .entry(endpoint.ip().to_canonical())
                    .or_default()
                    .push((record, endpoint.port()));
            }
        }
        Self(hosts)
    }

    /// Whether a registration of another identity than `identity` serves `address` (its
    /// endpoint, or one of its ports on its endpoint's host).
    fn another_serves(&self, identity: &SpiffeId, address: std::net::SocketAddr) -> bool {
        self.0
            .get(&address.ip().to_canonical())
            .into_iter()
            .flatten()
            .any(|(record, port)| {
                record.identity != identity.as_str()
                    && (*port == address.port()
                        || record.ports.iter().any(|p| p.port == address.port()))
            })
    }
}

/// Why `identity` may not be reached at `address`: only an address an operator declared for
/// it, and never one that resolves to another service's endpoint (review H8).
fn address_refusal(
    engine: &Engine,
    hosts: &Hosts<'_>,
    identity: &SpiffeId,
    address: &str,
) -> Option<RefusedBecause> {
    let Ok(address) = address.parse::<std::net::SocketAddr>() else {
        return Some(RefusedBecause::NotDeclared);
    };
    if !engine.policy_set().declares(identity, address) {
        return Some(RefusedBecause::NotDeclared);
    }
    hosts
        .another_serves(identity, address)
        .then_some(RefusedBecause::EndpointOfAnother)
}

/// What one replica publishes about its own sidecars (replicated store only), so that any
/// replica can tell whether a policy version reached the whole fleet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaSummary {
    /// The replica's API URL.
    pub replica: String,
    /// The policy version it has in force.
    pub policy_version: u64,
    /// How many sidecars have a watch open to it.
    pub connected: usize,
    /// How many of them have not applied that version yet.
    pub pending_count: usize,
    /// The first of those (at most [`SUMMARY_ROWS`]).
    pub pending: Vec<FleetEntry>,
}

/// Most pending sidecars listed in a [`ReplicaSummary`].
pub const SUMMARY_ROWS: usize = 50;

/// How long a sidecar whose snapshot stream closed still counts as one a policy version waits
/// for: long enough to reconnect after a control-plane restart (a sidecar retries at most every
/// 10 s). Later it is listed apart, and gets the version when it reconnects.
pub const RECONNECT_GRACE_SECONDS: i64 = 15;

/// The sidecars a policy version has not reached yet ([`Distribution::pending`]).
#[derive(Debug, Default)]
pub struct Pending {
    /// Connected sidecars that have not applied it, and sidecars whose stream closed less
    /// than [`RECONNECT_GRACE_SECONDS`] ago: `policy apply --wait` waits for these.
    pub waiting: Vec<FleetEntry>,
    /// Sidecars not connected for longer, and not replaced by a connected instance of the same
    /// identity and endpoint (a restart): they get the version when they reconnect.
    pub disconnected: Vec<FleetEntry>,
}

/// The observed flows, with how many each reporter and each (peer, reporter) pair holds.
#[derive(Default)]
struct FlowTable {
    flows: BTreeMap<FlowKey, FlowStats>,
    per_target: HashMap<String, usize>,
    per_pair: HashMap<(String, String), usize>,
    /// Reported flows not kept since start, by reason.
    dropped: BTreeMap<&'static str, u64>,
}

impl FlowTable {
    /// Whether a new flow `key` may be added: refused (counted) over its reporter's or its
    /// pair's quota; when the table is full, the flow seen longest ago is evicted for it.
    fn make_room(&mut self, key: &FlowKey) -> bool {
        let pair = (key.peer.clone(), key.target.clone());
        let over = if self.per_target.get(&key.target).copied().unwrap_or(0) >= MAX_FLOWS_PER_TARGET
        {
            Some("target_quota")
        } else if self.per_pair.get(&pair).copied().unwrap_or(0) >= MAX_FLOWS_PER_PEER {
            Some("peer_quota")
        } else {
            None
        };
        if let Some(reason) = over {
            self.drop_one(reason);
            return false;
        }
        if self.flows.len() >= MAX_FLOWS {
            let oldest = self
                .flows
                .iter()
                .min_by_key(|(_, v)| v.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.flows.remove(&oldest);
                Self::uncount(&mut self.per_target, oldest.target.clone());
                Self::uncount(&mut self.per_pair, (oldest.peer, oldest.target));
                self.drop_one("evicted");
            }
        }
        *self.per_target.entry(key.target.clone()).or_default() += 1;
        *self.per_pair.entry(pair).or_default() += 1;
        true
    }

    /// Counts a reported flow not kept (or evicted), in the metric and for the readers.
    fn drop_one(&mut self, reason: &'static str) {
        metrics::counter!("sidewall_control_plane_flows_dropped_total", "reason" => reason)
            .increment(1);
        *self.dropped.entry(reason).or_default() += 1;
    }

    fn uncount<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
        if let Some(count) = counts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

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
    /// Whether the generation is a replicated store's revision ([`Distribution::follow`]).
    following: bool,
}

/// Distribution state shared by the API handlers and the watch streams.
pub struct Distribution {
    epoch: String,
    trust_domain: TrustDomain,
    bundle_pem: String,
    replica: std::sync::OnceLock<String>,
    state: RwLock<State>,
    changes: watch::Sender<u64>,
    fleet: Mutex<BTreeMap<String, FleetEntry>>,
    limits: IdentityLimits,
    /// The open watch of each instance (one each), by number: dropping its sender ends it.
    watches: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
    next_watch: AtomicU64,
    flows: Mutex<FlowTable>,
    source_error: Mutex<Option<String>>,
    closing: watch::Sender<bool>,
}

/// Loads policy files with the same engine as `sidewall policy validate`.
pub fn compile(files: &[Source]) -> Result<PolicySet, Refused> {
    load_sources(files, &LoadOptions::default())
        .map(|loaded| loaded.policies)
        .map_err(Refused)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Distribution {
    /// Starts from the stored state: the latest policy version, registrations, revocations,
    /// with snapshot counters from `first_counter` on ([`crate::store::Store::reserve_counters`]).
    pub fn new(
        epoch: String,
        first_counter: u64,
        trust_domain: TrustDomain,
        bundle_pem: String,
        latest: Option<crate::store::PolicyVersion>,
        registrations: Vec<RegistrationRecord>,
        revocations: &[RevocationRecord],
    ) -> Self {
        let generation = first_counter;
        let (policy_version, applied_by, files) = match latest {
            Some(v) => (v.version, v.applied_by, v.files),
            None => (0, String::new(), Vec::new()),
        };
        // A stored version was valid when applied; if this release cannot load it, start
        // with no policies (default deny) and say so.
        let set = compile(&files).unwrap_or_else(|e| {
            tracing::error!(errors = %e, "the stored policy set does not load: enforcing default deny");
            PolicySet::default()
        });
        let (changes, _) = watch::channel(generation);
        let mut version_generation = HashMap::new();
        version_generation.insert(policy_version, (generation, Instant::now()));
        Self {
            epoch,
            trust_domain,
            bundle_pem,
            replica: std::sync::OnceLock::new(),
            state: RwLock::new(State {
                policy_version,
                applied_by,
                engine: Arc::new(Engine::new(set)),
                files,
                registrations,
                revocations: to_revocations(revocations),
                generation,
                version_generation,
                following: false,
            }),
            changes,
            fleet: Mutex::new(BTreeMap::new()),
            limits: IdentityLimits::default(),
            watches: Mutex::new(HashMap::new()),
            next_watch: AtomicU64::new(0),
            flows: Mutex::new(FlowTable::default()),
            source_error: Mutex::new(None),
            closing: watch::channel(false).0,
        }
    }

    /// With `limits` instead of the defaults.
    #[must_use]
    pub fn with_limits(mut self, limits: IdentityLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Follows a replicated store: puts the state last changed at etcd `loaded.revision` in
    /// force, with that revision as the snapshot counter, so every replica sends the same
    /// version for the same content. A read no newer than what is in force is ignored.
    pub fn follow(&self, loaded: crate::store::Loaded) {
        let mut state = self.write();
        let first = !state.following;
        if loaded.revision <= state.generation && !first {
            return;
        }
        if first {
            // The start-time counter of `new` gives way to revisions before anything is served.
            state.following = true;
            state.version_generation.clear();
        }
        let (version, applied_by, files) = match loaded.latest {
            Some(v) => (v.version, v.applied_by, v.files),
            None => (0, String::new(), Vec::new()),
        };
        if version != state.policy_version || first {
            // Valid when a replica applied it; if this release cannot load it, default deny.
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
            metrics::gauge!("sidewall_control_plane_policy_version").set(version as f64);
        }
        state.registrations = loaded.registrations;
        state.revocations = to_revocations(&loaded.revocations);
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

    fn bump(&self, state: &mut State) -> u64 {
        state.generation += 1;
        let generation = state.generation;
        self.changes.send_replace(generation);
        generation
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

    /// Puts a stored policy version in force.
    pub fn apply(&self, version: u64, applied_by: String, files: Vec<Source>, set: PolicySet) {
        let mut state = self.write();
        state.policy_version = version;
        state.applied_by = applied_by;
        state.engine = Arc::new(Engine::new(set));
        state.files = files;
        let generation = self.bump(&mut state);
        state
            .version_generation
            .insert(version, (generation, Instant::now()));
        metrics::gauge!("sidewall_control_plane_policy_version").set(version as f64);
    }

    /// The registrations in force (one per sidecar instance).
    pub fn registrations(&self) -> Vec<RegistrationRecord> {
        self.read().registrations.clone()
    }

    /// Replaces the registrations (after a store change).
    pub fn set_registrations(&self, registrations: Vec<RegistrationRecord>) {
        let mut state = self.write();
        if state.registrations != registrations {
            state.registrations = registrations;
            self.bump(&mut state);
        }
    }

    /// Replaces the revocations (after a store change).
    pub fn set_revocations(&self, revocations: &[RevocationRecord]) {
        let mut state = self.write();
        state.revocations = to_revocations(revocations);
        self.bump(&mut state);
    }

    /// Whether an identity or certificate serial is on the revocation list.
    pub fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
        self.read().revocations.is_revoked(id, serial)
    }

    /// Records (or clears) a problem with the policy source directory.
    pub fn set_source_error(&self, error: Option<String>) {
        *lock(&self.source_error) = error;
    }

    /// The current problem with the policy source directory, if any.
    pub fn source_error(&self) -> Option<String> {
        lock(&self.source_error).clone()
    }

    /// Whether `workload` may call `service`: some allow rule's `from` matches it, or the
    /// service is covered only by audit policies (not enforced yet, so anyone may reach it).
    fn callable(engine: &Engine, workload: &SpiffeId, service: &SpiffeId) -> bool {
        let policies = engine.policies_for(service);
        let audit_only = !policies.is_empty()
            && policies
                .iter()
                .all(|p| p.mode == sidewall_policies::policy::Mode::Audit);
        audit_only
            || policies.iter().any(|policy| {
                policy.rules.iter().any(|rule| {
                    rule.action == Action::Allow && rule.from.iter().any(|p| p.matches(workload))
                })
            })
    }

    /// The snapshot for `workload` now, and a hash of its content (version excluded).
    pub fn snapshot_for(&self, workload: &SpiffeId) -> (Snapshot, u64) {
        let state = self.read();
        let policies: Vec<_> = state
            .engine
            .policies_for(workload)
            .into_iter()
            .cloned()
            .collect();
        let hosts = Hosts::new(&state.registrations);
        let mut by_service: BTreeMap<String, ServiceEntry> = BTreeMap::new();
        // What each entry holds already: a pass over its list per registration would be
        // quadratic in a service's registrations.
        let mut seen_ports: HashMap<String, HashSet<u16>> = HashMap::new();
        let mut seen_addresses: HashSet<(&str, &str)> = HashSet::new();
        for registration in &state.registrations {
            let Ok(service) = SpiffeId::parse(&registration.identity) else {
                continue;
            };
            if !Self::callable(&state.engine, workload, &service) {
                continue;
            }
            let entry = by_service
                .entry(registration.identity.clone())
                .or_insert_with(|| ServiceEntry {
                    identity: service.clone(),
                    endpoints: Vec::new(),
                    ports: Vec::new(),
                    addresses: Vec::new(),
                });
            entry.endpoints.push(registration.endpoint.clone());
            let ports = seen_ports.entry(registration.identity.clone()).or_default();
            for port in &registration.ports {
                if ports.insert(port.port) {
                    entry.ports.push(*port);
                }
            }
            for address in &registration.addresses {
                if !seen_addresses.contains(&(registration.identity.as_str(), address.as_str()))
                    && address_refusal(&state.engine, &hosts, &service, address).is_none()
                {
                    seen_addresses.insert((registration.identity.as_str(), address.as_str()));
                    entry.addresses.push(address.clone());
                }
            }
        }
        let mut snapshot = Snapshot {
            schema: Schema::default(),
            version: SnapshotVersion {
                epoch: self.epoch.clone(),
                counter: 0,
            },
            workload: workload.clone(),
            policies: PolicySet::new(policies).unwrap_or_default(),
            trust_bundles: BTreeMap::from([(
                self.trust_domain.clone(),
                vec![self.bundle_pem.clone()],
            )]),
            revocations: state.revocations.clone(),
            directory: by_service.into_values().collect(),
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

    /// Binds `instance` to `identity`: the first identity to use an instance id owns it, and
    /// no other may watch, register or ack with it. A new instance of an identity that holds
    /// [`IdentityLimits::instances`] rows takes the place of its row disconnected longest, or
    /// is refused when all of them are connected.
    pub fn claim(&self, instance: &str, identity: &SpiffeId) -> Result<(), ClaimRefused> {
        let mut fleet = lock(&self.fleet);
        match fleet.get(instance) {
            Some(entry) if !entry.identity.is_empty() && entry.identity != identity.as_str() => {
                return Err(ClaimRefused::Taken(entry.identity.clone()));
            }
            Some(_) => {}
            None => {
                // Only a new instance pays for the pass over the fleet (acks of known ones,
                // the common case, do not).
                self.forget_disconnected(&mut fleet);
                let mut held = 0;
                let mut oldest: Option<&FleetEntry> = None;
                for entry in fleet.values().filter(|e| e.identity == identity.as_str()) {
                    held += 1;
                    if !entry.connected && oldest.is_none_or(|o| entry.since < o.since) {
                        oldest = Some(entry);
                    }
                }
                if held >= self.limits.instances {
                    let Some(oldest) = oldest.map(|e| e.instance.clone()) else {
                        metrics::counter!("sidewall_control_plane_identity_limit_total", "limit" => "instances").increment(1);
                        tracing::warn!(%identity, instance, limit = self.limits.instances, "new sidecar instance refused: the identity has as many connected (limits.instancesPerIdentity)");
                        return Err(ClaimRefused::Full(self.limits.instances));
                    };
                    fleet.remove(&oldest);
                    metrics::counter!("sidewall_control_plane_fleet_rows_forgotten_total", "reason" => "identity_limit").increment(1);
                }
            }
        }
        drop(fleet);
        self.fleet_update(instance, |entry| entry.identity = identity.to_string());
        Ok(())
    }

    /// Forgets rows disconnected for longer than [`IdentityLimits::retention`].
    fn forget_disconnected(&self, fleet: &mut BTreeMap<String, FleetEntry>) {
        let retention = i64::try_from(self.limits.retention.as_secs()).unwrap_or(i64::MAX);
        let now = now_unix();
        let before = fleet.len();
        fleet.retain(|_, e| e.connected || now.saturating_sub(e.since) < retention);
        let forgotten = before - fleet.len();
        if forgotten > 0 {
            metrics::counter!("sidewall_control_plane_fleet_rows_forgotten_total", "reason" => "retention").increment(forgotten as u64);
        }
    }

    /// Opens the one watch stream of `instance`: one still open for it is ended (a sidecar
    /// reconnecting before its old stream was noticed gone). Returns the watch's number and
    /// what resolves when it is replaced.
    pub fn open_watch(&self, instance: &str) -> (u64, oneshot::Receiver<()>) {
        let number = self.next_watch.fetch_add(1, Ordering::Relaxed);
        let (replaced, ended) = oneshot::channel();
        if lock(&self.watches)
            .insert(instance.to_owned(), (number, replaced))
            .is_some()
        {
            metrics::counter!("sidewall_control_plane_watches_replaced_total").increment(1);
        }
        (number, ended)
    }

    /// Closes watch `number` of `instance`: true if it was the instance's current one (its row
    /// is then disconnected), false if a newer one replaced it.
    pub fn close_watch(&self, instance: &str, number: u64) -> bool {
        let mut watches = lock(&self.watches);
        if watches.get(instance).is_some_and(|(n, _)| *n == number) {
            watches.remove(instance);
            return true;
        }
        false
    }

    /// What one identity may hold.
    pub fn limits(&self) -> IdentityLimits {
        self.limits
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
        let hosts = Hosts::new(registrations);
        addresses
            .iter()
            .filter_map(|address| {
                let reason = address_refusal(&state.engine, &hosts, identity, address)?;
                metrics::counter!("sidewall_control_plane_addresses_refused_total", "reason" => reason.as_str())
                    .increment(1);
                tracing::warn!(%identity, address, reason = reason.as_str(), "registered address refused: callers are not sent there");
                Some(RefusedAddress {
                    address: address.clone(),
                    reason,
                })
            })
            .collect()
    }

    /// Whether `instance` has a snapshot watch open on this replica.
    pub fn watching(&self, instance: &str) -> bool {
        lock(&self.fleet).get(instance).is_some_and(|e| e.connected)
    }

    /// Records a watch stream opening or closing, and what it has sent.
    pub fn fleet_update(&self, instance: &str, update: impl FnOnce(&mut FleetEntry)) {
        let mut fleet = lock(&self.fleet);
        let entry = fleet
            .entry(instance.to_owned())
            .or_insert_with(|| FleetEntry {
                instance: instance.to_owned(),
                identity: String::new(),
                endpoint: None,
                connected: false,
                since: now_unix(),
                replica: self.replica().to_owned(),
                sent: None,
                applied: None,
                last_ack_at: None,
                last_rejection: None,
                certificate_expires_at: None,
                addresses_refused: Vec::new(),
                keepalive: None,
                stale: false,
                processed: 0,
            });
        update(entry);
        let connected = fleet.values().filter(|e| e.connected).count();
        metrics::gauge!("sidewall_control_plane_proxies_connected").set(connected as f64);
    }

    /// Records an acknowledgement.
    pub fn ack(
        &self,
        instance: &str,
        identity: &SpiffeId,
        counter: u64,
        rejection: Option<String>,
        expires_at: Option<i64>,
    ) {
        let mut newly_applied = false;
        self.fleet_update(instance, |entry| {
            entry.identity = identity.to_string();
            entry.last_ack_at = Some(now_unix());
            if expires_at.is_some() {
                entry.certificate_expires_at = expires_at;
            }
            match rejection {
                None => {
                    // A sidecar acks again at every keep-alive line: only a new counter
                    // tells how long a version took to arrive.
                    newly_applied = entry.applied != Some(counter);
                    entry.applied = Some(counter);
                }
                Some(reason) => entry.last_rejection = Some(reason),
            }
        });
        let state = self.read();
        if let Some((generation, at)) = state.version_generation.get(&state.policy_version)
            && newly_applied
            && counter >= *generation
        {
            metrics::gauge!("sidewall_control_plane_propagation_seconds")
                .set(at.elapsed().as_secs_f64());
        }
        let behind = lock(&self.fleet)
            .values()
            .filter(|e| e.connected && e.sent.is_some() && e.applied < e.sent)
            .count();
        metrics::gauge!("sidewall_control_plane_proxies_behind").set(behind as f64);
    }

    /// The fleet view, one row per sidecar process.
    pub fn fleet(&self) -> Vec<FleetEntry> {
        let mut fleet = lock(&self.fleet);
        self.forget_disconnected(&mut fleet);
        let now = now_unix();
        fleet
            .values()
            .cloned()
            .map(|mut entry| {
                let heard = entry.last_ack_at.unwrap_or(entry.since).max(entry.since);
                entry.stale = entry.connected
                    && entry.keepalive.is_some_and(|k| {
                        now.saturating_sub(heard)
                            > i64::try_from(k.saturating_mul(3)).unwrap_or(i64::MAX)
                    });
                entry
            })
            .collect()
    }

    /// The fleet with the policy version in force, this replica and the source error.
    pub fn fleet_view(&self) -> Fleet {
        Fleet {
            policy_version: self.read().policy_version,
            replica: self.replica().to_owned(),
            source_error: self.source_error(),
            proxies: self.fleet(),
            other_replicas: Vec::new(),
        }
    }

    /// This replica's summary for the others (see [`ReplicaSummary`]).
    pub fn summary(&self) -> ReplicaSummary {
        let policy_version = self.read().policy_version;
        let mut pending = self
            .pending(policy_version)
            .map(|p| p.waiting)
            .unwrap_or_default();
        let pending_count = pending.len();
        pending.truncate(SUMMARY_ROWS);
        ReplicaSummary {
            replica: self.replica().to_owned(),
            policy_version,
            connected: lock(&self.fleet).values().filter(|e| e.connected).count(),
            pending_count,
            pending,
        }
    }

    /// Which sidecars have not yet received and applied what policy `version` changed for
    /// them: `None` if the version is unknown. With a replicated store a disconnected sidecar is
    /// not counted here: it is connected to another replica (which counts it) or down (which the
    /// fleet view shows).
    pub fn pending(&self, version: u64) -> Option<Pending> {
        let (generation, following) = {
            let state = self.read();
            (state.version_generation.get(&version)?.0, state.following)
        };
        let fleet = lock(&self.fleet);
        let behind = |e: &FleetEntry| {
            e.processed < generation
                || e.sent
                    .is_some_and(|sent| sent >= generation && e.applied < Some(sent))
        };
        // A restarted sidecar is a new instance of the same identity and endpoint.
        let live: HashSet<(&str, Option<&str>)> = fleet
            .values()
            .filter(|e| e.connected)
            .map(|e| (e.identity.as_str(), e.endpoint.as_deref()))
            .collect();
        let now = now_unix();
        let mut pending = Pending::default();
        for entry in fleet.values().filter(|e| behind(e)) {
            if entry.connected {
                pending.waiting.push(entry.clone());
            } else if entry.sent.is_none() {
                // Registered but never watched: nothing was ever sent to wait for.
                continue;
            } else if following
                || live.contains(&(entry.identity.as_str(), entry.endpoint.as_deref()))
            {
                continue;
            } else if now - entry.since < RECONNECT_GRACE_SECONDS {
                pending.waiting.push(entry.clone());
            } else {
                pending.disconnected.push(entry.clone());
            }
        }
        Some(pending)
    }

    /// Adds reported flow counts (review M5: one noisy reporter or peer cannot blind
    /// `policy impact` for the others). A reporting sidecar keeps at most
    /// [`MAX_FLOWS_PER_TARGET`] distinct flows, one peer of it at most [`MAX_FLOWS_PER_PEER`];
    /// new flows over a quota are dropped and counted by reason. When the whole table holds
    /// [`MAX_FLOWS`], the flow seen longest ago makes room.
    pub fn report_flows(&self, flows: Vec<(FlowKey, FlowStats)>) {
        let mut held = lock(&self.flows);
        let now = now_unix();
        for (key, stats) in flows {
            if !held.flows.contains_key(&key) && !held.make_room(&key) {
                continue;
            }
            let entry = held.flows.entry(key).or_default();
            entry.count = entry.count.saturating_add(stats.count);
            entry.allow = entry.allow.saturating_add(stats.allow);
            entry.deny = entry.deny.saturating_add(stats.deny);
            entry.audit = entry.audit.saturating_add(stats.audit);
            if stats.last_denial.is_some() {
                entry.last_denial = stats.last_denial;
            }
            entry.last_seen = now;
        }
    }

    /// Every observed flow.
    pub fn flows(&self) -> Vec<(FlowKey, FlowStats)> {
        lock(&self.flows)
            .flows
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Reported flows not kept since start, by reason (`target_quota`, `peer_quota`,
    /// `evicted`): what `policy impact` and the dashboard cannot show.
    pub fn flows_dropped(&self) -> BTreeMap<String, u64> {
        lock(&self.flows)
            .dropped
            .iter()
            .map(|(reason, count)| ((*reason).to_owned(), *count))
            .collect()
    }

    /// The observed flows whose outcome differs between the set in force and `candidate`.
    pub fn impact(&self, candidate: &Engine) -> Vec<(FlowKey, u64, Outcome, Outcome)> {
        let current = self.read().engine.clone();
        let flows = lock(&self.flows).flows.clone();
        let mut flips = Vec::new();
        for (key, stats) in flows {
            let count = stats.count;
            let (Ok(peer), Ok(target)) = (SpiffeId::parse(&key.peer), SpiffeId::parse(&key.target))
            else {
                continue;
            };
            let path = key.path.clone().unwrap_or_else(|| "/".into());
            let subject = match (&key.method, key.protocol) {
                (Some(method), Protocol::Http) => Subject::Request(Request {
                    method,
                    path: &path,
                    host: None,
                }),
                _ => Subject::Connection(key.protocol),
            };
            let query = Query {
                peer: &peer,
                target: &target,
                port: key.port,
                subject,
            };
            let before = current.decide(&query).outcome;
            let after = candidate.decide(&query).outcome;
            if before != after {
                flips.push((key, count, before, after));
            }
        }
        flips
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(peer: usize, target: usize, path: usize) -> FlowKey {
        FlowKey {
            peer: format!("spiffe://td/p{peer}"),
            target: format!("spiffe://td/t{target}"),
            port: 80,
            protocol: Protocol::Http,
            method: Some("GET".into()),
            path: Some(format!("/{path}")),
        }
    }

    fn add(table: &mut FlowTable, key: FlowKey, seen: i64) -> bool {
        if !table.make_room(&key) {
            return false;
        }
        table.flows.entry(key).or_default().last_seen = seen;
        true
    }

    #[test]
    fn flow_quotas_per_reporter_and_pair_and_eviction_of_the_oldest() {
        let mut table = FlowTable::default();
        // One pair: 500 flows, then its quota.
        for path in 0..MAX_FLOWS_PER_PEER {
            assert!(add(&mut table, key(0, 0, path), 1));
        }
        assert!(
            !add(&mut table, key(0, 0, 9_999), 1),
            "over the pair's quota"
        );
        // The same reporter, other peers: up to 2000 in all, then its quota.
        for i in 0..MAX_FLOWS_PER_TARGET - MAX_FLOWS_PER_PEER {
            assert!(add(&mut table, key(1 + i, 0, 0), 2));
        }
        assert!(
            !add(&mut table, key(9_999, 0, 0), 2),
            "over the reporter's quota"
        );
        // Other reporters fill the table; the next new flow evicts the one seen longest ago.
        for target in 1..MAX_FLOWS / MAX_FLOWS_PER_TARGET {
            for i in 0..MAX_FLOWS_PER_TARGET {
                assert!(add(&mut table, key(i, target, 0), 3));
            }
        }
        assert_eq!(table.flows.len(), MAX_FLOWS);
        assert!(add(&mut table, key(0, 99, 0), 4));
        assert_eq!(table.flows.len(), MAX_FLOWS);
        assert_eq!(
            table.flows.values().filter(|v| v.last_seen == 1).count(),
            MAX_FLOWS_PER_PEER - 1
        );
        // The evicted flow's pair has room again.
        assert!(add(&mut table, key(0, 0, 9_999), 5));
    }
}
