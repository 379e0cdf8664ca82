//! Daily roll-ups of what sidecars report (flows, TLS handshakes, plaintext on permissive
//! ports), kept in the store so that a report over any period counts what every replica saw,
//! across restarts (issue 20; docs/compliance.md).
//!
//! Each control-plane process adds what its sidecars report to its roll-up of the current UTC
//! day, in memory, and writes the chunks that changed to the store once a minute, when it
//! stops, and before it builds a report ([`crate::server::write_rollups`]). A chunk holds at
//! most [`CHUNK`] entries (a flow, or one identity's transport counts), well under etcd's
//! request limit; an entry keeps its chunk for the day, so a write replaces only what changed.
//! Each process writes only its own chunks (keyed by a random process id), so replicas never
//! write the same key and a restart never overwrites what the process before it counted.

use std::collections::{BTreeMap, HashMap};

use sidewall_policies::wire::operator::{FlowKey, FlowRow, FlowStats};
use sidewall_policies::wire::{OutboundReason, OutboundRefusal, PlaintextUse, TlsUse};

use super::flows::Transport;
use crate::store::{AppliedRow, OutboundRow, RollupRecord, TransportRow};

/// Seconds in a roll-up's day (UTC, as Unix time counts them).
pub const DAY: i64 = 86_400;
/// Entries per stored chunk.
pub const CHUNK: usize = 128;
/// Most entries one process keeps for one day; further new flows are dropped and counted
/// (`sidewall_control_plane_flows_dropped_total{reason="day_full"}`).
pub const MAX_DAY_ENTRIES: usize = 20_000;
/// Most of them for one reporting identity (`reason="day_target_quota"`).
pub const MAX_DAY_ENTRIES_PER_TARGET: usize = 2_000;

/// The day of a Unix time.
pub fn day_of(unix: i64) -> i64 {
    unix.div_euclid(DAY)
}

/// One entry's place: which flow or identity it counts.
#[derive(Debug, Clone)]
enum Slot {
    Flow(FlowKey),
    Transport(String),
    Outbound(OutboundKey),
    Applied((u64, String)),
}

/// A caller, why its sidecar refused, the target and the port.
pub type OutboundKey = (String, OutboundReason, String, u16);

/// What this process counted in one day.
#[derive(Debug)]
struct Day {
    day: i64,
    /// When counting began that day, Unix seconds.
    from: i64,
    /// Each flow's counts and chunk.
    flows: HashMap<FlowKey, (FlowStats, u32)>,
    /// Each identity's transport counts and chunk.
    transport: HashMap<String, (Transport, u32)>,
    /// Each caller-side refusal's (count, last seen) and chunk.
    outbound: HashMap<OutboundKey, ((u64, i64), u32)>,
    /// When each (policy version, sidecar instance) was first applied: (identity, at), chunk.
    applied: HashMap<(u64, String), ((String, i64), u32)>,
    per_target: HashMap<String, usize>,
    /// Entries in the order they came: entry `i` is in chunk `i / CHUNK`.
    slots: Vec<Slot>,
    /// Chunks changed since written, each with the number of its last change.
    dirty: BTreeMap<u32, u64>,
}

impl Day {
    fn new(day: i64, from: i64) -> Self {
        Self {
            day,
            from,
            flows: HashMap::new(),
            transport: HashMap::new(),
            outbound: HashMap::new(),
            applied: HashMap::new(),
            per_target: HashMap::new(),
            slots: Vec::new(),
            dirty: BTreeMap::new(),
        }
    }

    /// A new entry's chunk, or `None` (counted) when the day or `target` has no room.
    fn place(&mut self, target: &str, slot: Slot) -> Option<u32> {
        let reason = if self.slots.len() >= MAX_DAY_ENTRIES {
            "day_full"
        } else if self.per_target.get(target).copied().unwrap_or(0) >= MAX_DAY_ENTRIES_PER_TARGET {
            "day_target_quota"
        } else {
            *self.per_target.entry(target.to_owned()).or_default() += 1;
            self.slots.push(slot);
            return Some(u32::try_from((self.slots.len() - 1) / CHUNK).unwrap_or(u32::MAX));
        };
        metrics::counter!(crate::metric::FLOWS_DROPPED, "reason" => reason).increment(1);
        None
    }

    /// Chunk `chunk` as stored.
    fn record(&self, chunk: u32, process: &str, replica: &str) -> RollupRecord {
        let start = (chunk as usize).saturating_mul(CHUNK);
        let end = start.saturating_add(CHUNK).min(self.slots.len());
        let mut record = RollupRecord {
            day: self.day,
            process: process.to_owned(),
            chunk,
            replica: replica.to_owned(),
            from: self.from,
            flows: Vec::new(),
            transport: Vec::new(),
            outbound: Vec::new(),
            applied: Vec::new(),
        };
        for slot in self.slots.get(start..end).unwrap_or_default() {
            match slot {
                Slot::Flow(key) => {
                    if let Some((stats, _)) = self.flows.get(key) {
                        record.flows.push(FlowRow {
                            flow: key.clone(),
                            stats: stats.clone(),
                        });
                    }
                }
                Slot::Transport(identity) => {
                    if let Some((counts, _)) = self.transport.get(identity) {
                        record.transport.push(transport_row(identity, counts));
                    }
                }
                Slot::Applied(key) => {
                    if let Some(((identity, at), _)) = self.applied.get(key) {
                        record.applied.push(AppliedRow {
                            version: key.0,
                            instance: key.1.clone(),
                            identity: identity.clone(),
                            at: *at,
                        });
                    }
                }
                Slot::Outbound(key) => {
                    if let Some(((count, last_seen), _)) = self.outbound.get(key) {
                        let (source, reason, target, port) = key.clone();
                        record.outbound.push(OutboundRow {
                            source,
                            reason,
                            target,
                            port,
                            count: *count,
                            last_seen: *last_seen,
                        });
                    }
                }
            }
        }
        record
    }
}

fn transport_row(identity: &str, counts: &Transport) -> TransportRow {
    TransportRow {
        identity: identity.to_owned(),
        tls: counts
            .tls
            .iter()
            .map(|((version, suite), count)| TlsUse {
                version: version.clone(),
                suite: suite.clone(),
                count: *count,
            })
            .collect(),
        plaintext: counts
            .plaintext
            .iter()
            .map(|(port, count)| PlaintextUse {
                port: *port,
                count: *count,
            })
            .collect(),
        last_seen: counts.last_seen,
    }
}

/// This process's roll-ups not yet written whole: the current day's, and a day just ended
/// until its last chunks are written.
#[derive(Debug, Default)]
pub(super) struct Rollups {
    days: Vec<Day>,
    changes: u64,
}

/// A chunk to write, and the change it carries (see [`Rollups::written`]).
#[derive(Debug)]
pub struct Pending {
    /// The chunk.
    pub record: RollupRecord,
    change: u64,
}

impl Rollups {
    /// The day of `now` (begun when this process started, or at its first second), and the
    /// number of this change.
    fn today(&mut self, now: i64, started: i64) -> (&mut Day, u64) {
        self.changes += 1;
        let day = day_of(now);
        // Days without a change left to write are done.
        self.days.retain(|d| d.day == day || !d.dirty.is_empty());
        if self.days.last().is_none_or(|d| d.day != day) {
            self.days
                .push(Day::new(day, started.max(day.saturating_mul(DAY))));
        }
        let last = self.days.len() - 1;
        (&mut self.days[last], self.changes)
    }

    /// Adds reported flow counts.
    pub(super) fn add_flows(&mut self, flows: &[(FlowKey, FlowStats)], now: i64, started: i64) {
        let (day, change) = self.today(now, started);
        for (key, stats) in flows {
            let chunk = match day.flows.get(key) {
                Some((_, chunk)) => *chunk,
                None => match day.place(&key.target, Slot::Flow(key.clone())) {
                    Some(chunk) => chunk,
                    None => continue,
                },
            };
            let (entry, _) = day
                .flows
                .entry(key.clone())
                .or_insert_with(|| (FlowStats::default(), chunk));
            entry.count = entry.count.saturating_add(stats.count);
            entry.allow = entry.allow.saturating_add(stats.allow);
            entry.deny = entry.deny.saturating_add(stats.deny);
            entry.audit = entry.audit.saturating_add(stats.audit);
            if stats.last_denial.is_some() {
                entry.last_denial.clone_from(&stats.last_denial);
            }
            entry.last_seen = now;
            day.dirty.insert(chunk, change);
        }
    }

    /// Adds what `identity`'s sidecar reported of how connections reached it.
    pub(super) fn add_transport(
        &mut self,
        identity: &str,
        tls: &[TlsUse],
        plaintext: &[PlaintextUse],
        now: i64,
        started: i64,
    ) {
        let (day, change) = self.today(now, started);
        let chunk = match day.transport.get(identity) {
            Some((_, chunk)) => *chunk,
            None => match day.place(identity, Slot::Transport(identity.to_owned())) {
                Some(chunk) => chunk,
                None => return,
            },
        };
        let (counts, _) = day
            .transport
            .entry(identity.to_owned())
            .or_insert_with(|| (Transport::default(), chunk));
        counts.add(tls, plaintext, now);
        day.dirty.insert(chunk, change);
    }

    /// Adds the connections `source`'s sidecar refused before they left it.
    pub(super) fn add_outbound(
        &mut self,
        source: &str,
        refused: &[OutboundRefusal],
        now: i64,
        started: i64,
    ) {
        let (day, change) = self.today(now, started);
        for refusal in refused {
            let key: OutboundKey = (
                source.to_owned(),
                refusal.reason,
                refusal.target.clone(),
                refusal.port,
            );
            let chunk = match day.outbound.get(&key) {
                Some((_, chunk)) => *chunk,
                None => match day.place(source, Slot::Outbound(key.clone())) {
                    Some(chunk) => chunk,
                    None => continue,
                },
            };
            let ((count, last_seen), _) = day.outbound.entry(key).or_insert(((0, now), chunk));
            *count = count.saturating_add(refusal.count);
            *last_seen = now;
            day.dirty.insert(chunk, change);
        }
    }

    /// Records that sidecar `instance` of `identity` applied policy `version` at `now` (the
    /// first time only).
    pub(super) fn add_applied(
        &mut self,
        (version, instance, identity): (u64, &str, &str),
        now: i64,
        started: i64,
    ) {
        let (day, change) = self.today(now, started);
        let key = (version, instance.to_owned());
        if day.applied.contains_key(&key) {
            return;
        }
        let Some(chunk) = day.place(identity, Slot::Applied(key.clone())) else {
            return;
        };
        day.applied.insert(key, ((identity.to_owned(), now), chunk));
        day.dirty.insert(chunk, change);
    }

    /// The chunks changed since they were last written.
    pub(super) fn pending(&self, process: &str, replica: &str) -> Vec<Pending> {
        self.days
            .iter()
            .flat_map(|day| {
                day.dirty.iter().map(|(chunk, change)| Pending {
                    record: day.record(*chunk, process, replica),
                    change: *change,
                })
            })
            .collect()
    }

    /// Marks `written` as stored, unless it changed again since it was read.
    pub(super) fn written(&mut self, written: &Pending) {
        if let Some(day) = self.days.iter_mut().find(|d| d.day == written.record.day)
            && day.dirty.get(&written.record.chunk) == Some(&written.change)
        {
            day.dirty.remove(&written.record.chunk);
        }
    }
}

impl super::Distribution {
    /// Writes the roll-up chunks changed since they were last written; the number written. A
    /// chunk that fails stays pending for the next write.
    pub async fn write_rollups(
        &self,
        store: &dyn crate::store::Store,
    ) -> Result<usize, crate::store::StoreError> {
        let _one_at_a_time = self.rollup_writes.lock().await;
        let pending = super::lock(&self.rollups).pending(&self.process, self.replica());
        for chunk in &pending {
            if let Err(error) = store.put_rollup(chunk.record.clone()).await {
                metrics::counter!(crate::metric::ROLLUP_WRITES, "result" => "failed").increment(1);
                return Err(error);
            }
            metrics::counter!(crate::metric::ROLLUP_WRITES, "result" => "written").increment(1);
            super::lock(&self.rollups).written(chunk);
        }
        Ok(pending.len())
    }
}

/// Every process's chunks of a period, added up.
#[derive(Debug, Default)]
pub struct Merged {
    /// Each flow's counts.
    pub flows: BTreeMap<FlowKey, FlowStats>,
    /// Each identity's transport counts.
    pub transport: BTreeMap<String, Transport>,
    /// Each caller-side refusal's count.
    pub outbound: BTreeMap<OutboundKey, u64>,
    /// When each sidecar first applied each policy version: version → instance → (identity,
    /// Unix seconds).
    pub applied: BTreeMap<u64, BTreeMap<String, (String, i64)>>,
    /// The earliest time counted (the start of the first day with counts, or when counting
    /// began that day).
    pub from: Option<i64>,
}

/// Adds up roll-up chunks, leaving out what was last seen before `since` (a day's counts of
/// what was seen again after it are kept whole: counts may begin at the day's start).
pub fn merge(records: Vec<RollupRecord>, since: i64) -> Merged {
    let mut merged = Merged::default();
    for record in records {
        merged.from = Some(merged.from.map_or(record.from, |f| f.min(record.from)));
        for row in record.flows {
            if row.stats.last_seen < since {
                continue;
            }
            let entry = merged.flows.entry(row.flow).or_default();
            let stats = row.stats;
            entry.count = entry.count.saturating_add(stats.count);
            entry.allow = entry.allow.saturating_add(stats.allow);
            entry.deny = entry.deny.saturating_add(stats.deny);
            entry.audit = entry.audit.saturating_add(stats.audit);
            if stats.last_seen >= entry.last_seen {
                entry.last_seen = stats.last_seen;
                if stats.last_denial.is_some() {
                    entry.last_denial = stats.last_denial;
                }
            }
        }
        for row in record.applied {
            let first = merged
                .applied
                .entry(row.version)
                .or_default()
                .entry(row.instance)
                .or_insert((row.identity, row.at));
            first.1 = first.1.min(row.at);
        }
        for row in record.outbound {
            if row.last_seen < since || row.reason == OutboundReason::Other {
                continue;
            }
            let count = merged
                .outbound
                .entry((row.source, row.reason, row.target, row.port))
                .or_default();
            *count = count.saturating_add(row.count);
        }
        for row in record.transport {
            if row.last_seen < since {
                continue;
            }
            merged.transport.entry(row.identity).or_default().add(
                &row.tls,
                &row.plaintext,
                row.last_seen,
            );
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidewall_policies::Protocol;

    fn key(peer: usize, target: &str) -> FlowKey {
        FlowKey {
            peer: format!("spiffe://td/p{peer}"),
            target: target.to_owned(),
            port: 80,
            protocol: Protocol::Tcp,
            method: None,
            path: None,
        }
    }

    fn stats(count: u64) -> FlowStats {
        FlowStats {
            count,
            allow: count,
            ..FlowStats::default()
        }
    }

    #[test]
    fn the_first_apply_of_a_version_is_kept_and_merged_across_processes() {
        let start = 20_000 * DAY + 3_600;
        let mut a = Rollups::default();
        a.add_applied((7, "web-1", "spiffe://td/web"), start + 5, start);
        a.add_applied((7, "web-1", "spiffe://td/web"), start + 9, start);
        let mut b = Rollups::default();
        // The same sidecar reconnected to another process after a restart: re-acked later.
        b.add_applied((7, "web-1", "spiffe://td/web"), start + 60, start + 50);
        b.add_applied((8, "web-1", "spiffe://td/web"), start + 70, start + 50);
        let records: Vec<RollupRecord> = a
            .pending("a", "r")
            .into_iter()
            .chain(b.pending("b", "r"))
            .map(|p| p.record)
            .collect();
        assert_eq!(records[0].applied.len(), 1, "the first apply only");
        let merged = merge(records, start);
        assert_eq!(
            merged.applied[&7]["web-1"],
            ("spiffe://td/web".to_owned(), start + 5)
        );
        assert_eq!(merged.applied[&8]["web-1"].1, start + 70);
    }

    #[test]
    fn chunks_are_written_once_per_change_and_add_up_across_days_and_processes() {
        let mut rollups = Rollups::default();
        let start = 20_000 * DAY + 3_600;
        let flows: Vec<_> = (0..CHUNK + 1)
            .map(|i| (key(i, "spiffe://td/t"), stats(1)))
            .collect();
        rollups.add_flows(&flows, start, start);
        let pending = rollups.pending("a", "r");
        assert_eq!(pending.len(), 2, "two chunks");
        assert_eq!(pending[0].record.flows.len(), CHUNK);
        assert_eq!(pending[1].record.flows.len(), 1);
        for chunk in &pending {
            rollups.written(chunk);
        }
        assert!(rollups.pending("a", "r").is_empty());

        // One flow again: only its chunk is written, with the sum.
        rollups.add_flows(&flows[CHUNK..], start + 60, start);
        let again = rollups.pending("a", "r");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].record.chunk, 1);
        assert_eq!(again[0].record.flows[0].stats.count, 2);

        // A change while a write is under way keeps the chunk pending.
        rollups.add_flows(&flows[CHUNK..], start + 61, start);
        rollups.written(&again[0]);
        assert_eq!(rollups.pending("a", "r").len(), 1);

        // The next day starts its own chunks at its midnight; the day before stays pending
        // until written.
        rollups.add_flows(&flows[..1], start + DAY, start);
        let both = rollups.pending("a", "r");
        assert_eq!(
            both.iter()
                .map(|p| (p.record.day, p.record.chunk))
                .collect::<Vec<_>>(),
            [(20_000, 1), (20_001, 0)]
        );
        assert_eq!(both[1].record.from, 20_001 * DAY);
        assert_eq!(both[0].record.from, start);

        // What the store holds: the first chunk as first written, the second as written last,
        // the next day's, and another process's copy of the first.
        let first_chunk = pending.into_iter().next().map(|p| p.record);
        let mut records: Vec<_> = first_chunk.into_iter().collect();
        records.extend(both.into_iter().map(|p| p.record));
        records.push(RollupRecord {
            process: "b".into(),
            ..records[0].clone()
        });
        let merged = merge(records, 0);
        let first = &merged.flows[&flows[0].0];
        // Day one in process a, day two in a, day one again in b.
        assert_eq!(first.count, 3);
        assert_eq!(merged.flows[&flows[CHUNK].0].count, 3);
        assert_eq!(merged.from, Some(start));
    }

    #[test]
    fn a_day_keeps_at_most_its_quota_of_entries_per_target() {
        let mut rollups = Rollups::default();
        let now = 20_000 * DAY;
        let flows: Vec<_> = (0..MAX_DAY_ENTRIES_PER_TARGET + 5)
            .map(|i| (key(i, "spiffe://td/noisy"), stats(1)))
            .collect();
        rollups.add_flows(&flows, now, now);
        rollups.add_flows(&[(key(0, "spiffe://td/quiet"), stats(1))], now, now);
        let merged = merge(
            rollups
                .pending("a", "r")
                .into_iter()
                .map(|p| p.record)
                .collect(),
            0,
        );
        assert_eq!(merged.flows.len(), MAX_DAY_ENTRIES_PER_TARGET + 1);
    }
}
