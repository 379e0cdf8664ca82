//! The fleet: one row per sidecar process connected to this replica (its watch stream, what
//! it was sent and acknowledged, its certificate's expiry), the instance ids each identity
//! holds, and which sidecars a policy version has not reached yet.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sidewall_policies::SpiffeId;
use sidewall_policies::wire::operator::{CaSidecar, Fleet, FleetEntry};
use tokio::sync::oneshot;

use super::{Distribution, lock};
use crate::now_unix;

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
    /// The generation of the trust bundle in force there ([`Distribution::ca`]); the same on
    /// every replica once it has followed the store.
    #[serde(default)]
    pub ca_generation: u64,
    /// Its connected sidecars that have not applied that bundle yet (at most
    /// [`SUMMARY_ROWS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_pending: Vec<FleetEntry>,
    /// The certificate serials its connected sidecars hold that have applied that bundle (at
    /// most [`SERIAL_ROWS`]): a rotation's `activate` waits for every live certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_applied: Vec<String>,
    /// While a CA rotation is under way: its connected sidecars' positions (at most
    /// [`POSITION_ROWS`]), for `ca status` on any replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_sidecars: Vec<CaSidecar>,
    /// Its connected sidecars that make segmentation probes, as (identity, instance), at most
    /// [`SERIAL_ROWS`]: a segmentation test started at any replica orders them probes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probers: Vec<(String, String)>,
}

/// Most serials listed in a [`ReplicaSummary`].
pub const SERIAL_ROWS: usize = 10_000;
/// Most sidecar positions listed in a [`ReplicaSummary`] during a CA rotation.
pub const POSITION_ROWS: usize = 2_000;

/// Most pending sidecars listed in a [`ReplicaSummary`].
pub const SUMMARY_ROWS: usize = 50;

/// How long a sidecar whose snapshot stream closed still counts as one a policy version waits
/// for: long enough to reconnect after a control-plane restart (a sidecar retries at most every
/// 10 s). Later it is listed apart, and gets the version when it reconnects.
pub const RECONNECT_GRACE_SECONDS: i64 = 15;

/// Whether a connected sidecar has been silent (no ack) for more than three keep-alives.
fn stale(entry: &FleetEntry, now: i64) -> bool {
    let heard = entry.last_ack_at.unwrap_or(entry.since).max(entry.since);
    entry.connected
        && entry.keepalive.is_some_and(|k| {
            now.saturating_sub(heard) > i64::try_from(k.saturating_mul(3)).unwrap_or(i64::MAX)
        })
}

/// Whether `entry` has yet to process the store change at `generation`, or to apply a snapshot
/// sent since: what [`Distribution::pending`] and [`Distribution::has_applied`] count as behind.
fn behind(entry: &FleetEntry, generation: u64) -> bool {
    entry.processed < generation
        || entry
            .sent
            .is_some_and(|sent| sent >= generation && entry.applied < Some(sent))
}

/// Policy versions whose rollout (when each sidecar applied them) is kept.
pub const ROLLOUT_VERSIONS: usize = 100;
/// Sidecars whose apply time is kept per version.
const ROLLOUT_INSTANCES: usize = 10_000;

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

impl Distribution {
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
                        metrics::counter!(crate::metric::IDENTITY_LIMIT, "limit" => "instances")
                            .increment(1);
                        tracing::warn!(%identity, instance, limit = self.limits.instances, "new sidecar instance refused: the identity has as many connected (limits.instancesPerIdentity)");
                        return Err(ClaimRefused::Full(self.limits.instances));
                    };
                    fleet.remove(&oldest);
                    metrics::counter!(crate::metric::FLEET_ROWS_FORGOTTEN, "reason" => "identity_limit").increment(1);
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
            metrics::counter!(crate::metric::FLEET_ROWS_FORGOTTEN, "reason" => "retention")
                .increment(forgotten as u64);
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
            metrics::counter!(crate::metric::WATCHES_REPLACED).increment(1);
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
                certificate_serial: None,
                addresses_refused: Vec::new(),
                keepalive: None,
                stale: false,
                sidecar: None,
                processed: 0,
            });
        update(entry);
        let connected = fleet.values().filter(|e| e.connected).count();
        metrics::gauge!(crate::metric::PROXIES_CONNECTED).set(connected as f64);
    }

    /// Records an acknowledgement.
    pub fn ack(
        &self,
        instance: &str,
        identity: &SpiffeId,
        counter: u64,
        rejection: Option<String>,
        (expires_at, serial): (Option<i64>, Option<String>),
        sidecar: Option<sidewall_policies::wire::SidecarFacts>,
    ) {
        let mut newly_applied = false;
        self.fleet_update(instance, |entry| {
            entry.identity = identity.to_string();
            entry.last_ack_at = Some(now_unix());
            if expires_at.is_some() {
                entry.certificate_expires_at = expires_at;
            }
            // Checked by the API (lowercase hex, at most 20 bytes).
            if serial.is_some() {
                entry.certificate_serial = serial;
            }
            if sidecar.is_some() {
                entry.sidecar = sidecar;
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
        // The version this snapshot carries: the newest in force at or before its counter. The
        // first ack of it is when this sidecar applied that version.
        let carried = state
            .version_generation
            .iter()
            .filter(|(_, (generation, _))| *generation <= counter)
            .max_by_key(|(_, (generation, _))| *generation)
            .map(|(version, _)| *version);
        if let (true, Some(version)) = (newly_applied, carried) {
            // Kept by day in the store too, so that a report after a restart still says when.
            lock(&self.rollups).add_applied(
                (version, instance, identity.as_str()),
                now_unix(),
                self.started,
            );
            let mut rollouts = lock(&self.rollouts);
            let instances = rollouts.entry(version).or_default();
            if instances.len() < ROLLOUT_INSTANCES {
                instances
                    .entry(instance.to_owned())
                    .or_insert_with(|| (identity.to_string(), now_unix()));
            }
            while rollouts.len() > ROLLOUT_VERSIONS {
                rollouts.pop_first();
            }
        }
        if let Some((generation, at)) = state.version_generation.get(&state.policy_version)
            && newly_applied
            && counter >= *generation
        {
            metrics::gauge!(crate::metric::PROPAGATION_SECONDS).set(at.elapsed().as_secs_f64());
        }
        let behind = lock(&self.fleet)
            .values()
            .filter(|e| e.connected && e.sent.is_some() && e.applied < e.sent)
            .count();
        metrics::gauge!(crate::metric::PROXIES_BEHIND).set(behind as f64);
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
                entry.stale = stale(&entry, now);
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
        let ca_generation = self.read().ca_generation;
        let mut ca_pending = self.pending_since(ca_generation).waiting;
        ca_pending.truncate(SUMMARY_ROWS);
        let mut ca_applied = self.holding_bundle();
        ca_applied.truncate(SERIAL_ROWS);
        let mut probers = self.probers();
        probers.truncate(SERIAL_ROWS);
        let rotating = self
            .read()
            .ca
            .as_ref()
            .is_some_and(|r| r.stage() != crate::ca::rotation::Stage::Settled);
        let ca_sidecars = if rotating {
            lock(&self.fleet)
                .values()
                .filter(|e| e.connected)
                .take(POSITION_ROWS)
                .map(|e| CaSidecar {
                    instance: e.instance.clone(),
                    identity: e.identity.clone(),
                    connected: true,
                    bundle_applied: !behind(e, ca_generation),
                    certificate_serial: e.certificate_serial.clone(),
                    // The reader knows the certificates' roots.
                    certificate_ca: "unknown".into(),
                    certificate_expires_at: e.certificate_expires_at,
                    replica: Some(self.replica().to_owned()),
                })
                .collect()
        } else {
            Vec::new()
        };
        ReplicaSummary {
            replica: self.replica().to_owned(),
            policy_version,
            connected: lock(&self.fleet).values().filter(|e| e.connected).count(),
            pending_count,
            pending,
            ca_generation,
            ca_pending,
            ca_applied,
            ca_sidecars,
            probers,
        }
    }

    /// When each sidecar first applied policy `version` (instance, identity, Unix seconds), as
    /// this process saw it, by instance.
    pub fn rollout(&self, version: u64) -> Vec<(String, String, i64)> {
        lock(&self.rollouts)
            .get(&version)
            .map(|instances| {
                instances
                    .iter()
                    .map(|(instance, (identity, at))| (instance.clone(), identity.clone(), *at))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether sidecar `entry` applied the snapshot carrying the trust bundle in force (and
    /// every snapshot sent since).
    pub fn has_applied_bundle(&self, entry: &FleetEntry) -> bool {
        !behind(entry, self.read().ca_generation)
    }

    /// The connected sidecars that make segmentation probes and were heard from lately, as
    /// (identity, instance).
    pub fn probers(&self) -> Vec<(String, String)> {
        let now = now_unix();
        lock(&self.fleet)
            .values()
            .filter(|e| {
                e.connected && !stale(e, now) && e.sidecar.as_ref().is_some_and(|s| s.probes)
            })
            .map(|e| (e.identity.clone(), e.instance.clone()))
            .collect()
    }

    /// The certificate serials held by connected sidecars that applied the trust bundle in
    /// force.
    pub fn holding_bundle(&self) -> Vec<String> {
        let generation = self.read().ca_generation;
        lock(&self.fleet)
            .values()
            .filter(|e| e.connected && !behind(e, generation))
            .filter_map(|e| e.certificate_serial.clone())
            .collect()
    }

    /// Whether sidecar `entry` enforces policy `version`: its watch has processed the change
    /// that put it in force (sending nothing when its snapshot did not change) and it applied
    /// every snapshot sent since, as [`Self::pending`] counts it. `None` when this process does
    /// not know when that version took effect.
    pub fn has_applied(&self, version: u64, entry: &FleetEntry) -> Option<bool> {
        let generation = self.read().version_generation.get(&version)?.0;
        Some(!behind(entry, generation))
    }

    /// Which sidecars have not yet received and applied what policy `version` changed for
    /// them: `None` if the version is unknown. With a replicated store a disconnected sidecar is
    /// not counted here: it is connected to another replica (which counts it) or down (which the
    /// fleet view shows).
    pub fn pending(&self, version: u64) -> Option<Pending> {
        let generation = self.read().version_generation.get(&version)?.0;
        Some(self.pending_since(generation))
    }

    /// Which sidecars have not yet processed the store change at `generation` (or applied a
    /// snapshot sent since), as [`Self::pending`] counts them.
    pub fn pending_since(&self, generation: u64) -> Pending {
        let fleet = lock(&self.fleet);
        // A restarted sidecar is a new instance of the same identity and endpoint.
        let live: HashSet<(&str, Option<&str>)> = fleet
            .values()
            .filter(|e| e.connected)
            .map(|e| (e.identity.as_str(), e.endpoint.as_deref()))
            .collect();
        let now = now_unix();
        let mut pending = Pending::default();
        for entry in fleet.values().filter(|e| behind(e, generation)) {
            if entry.connected {
                pending.waiting.push(entry.clone());
            } else if entry.sent.is_none() {
                // Registered but never watched: nothing was ever sent to wait for.
                continue;
            } else if self.replicated
                || live.contains(&(entry.identity.as_str(), entry.endpoint.as_deref()))
            {
                continue;
            } else if now - entry.since < RECONNECT_GRACE_SECONDS {
                pending.waiting.push(entry.clone());
            } else {
                pending.disconnected.push(entry.clone());
            }
        }
        pending
    }
}
