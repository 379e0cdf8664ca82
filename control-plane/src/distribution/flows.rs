//! The flows sidecars report (peer, target, port, method, path, with counts), kept within
//! quotas per reporter and per pair, and what a candidate policy set would change for them
//! (`policy impact`).

use std::collections::{BTreeMap, HashMap};

use sidewall_policies::engine::{Decision, Explanation, Query, Request, Subject};
use sidewall_policies::wire::operator::{FlowKey, FlowStats};
use sidewall_policies::{Engine, Outcome, Protocol, SpiffeId};

use super::{Distribution, lock};
use crate::now_unix;

/// Most distinct flows kept for `policy impact`.
pub const MAX_FLOWS: usize = 10_000;
/// Distinct flows kept for one reporting sidecar (target identity).
pub const MAX_FLOWS_PER_TARGET: usize = 2_000;
/// Distinct flows kept for one peer of one target.
pub const MAX_FLOWS_PER_PEER: usize = 500;

/// Most TLS (version, suite) pairs and plaintext ports kept per identity.
const MAX_TRANSPORT_ENTRIES: usize = 64;

/// How connections reached one identity's sidecar: TLS handshakes by version and suite, and
/// plaintext accepted on its permissive ports, over a day's roll-up or a report's period.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// Handshakes by (version, cipher suite).
    pub tls: BTreeMap<(String, String), u64>,
    /// Plaintext connections by port.
    pub plaintext: BTreeMap<u16, u64>,
    /// When last reported, Unix seconds.
    pub last_seen: i64,
}

impl Transport {
    /// Adds reported counts seen at `now`, within bounds: at most [`MAX_TRANSPORT_ENTRIES`]
    /// (version, suite) pairs and ports, names at most 64 characters.
    pub fn add(
        &mut self,
        tls: &[sidewall_policies::wire::TlsUse],
        plaintext: &[sidewall_policies::wire::PlaintextUse],
        now: i64,
    ) {
        self.last_seen = self.last_seen.max(now);
        for used in tls {
            let key = (used.version.clone(), used.suite.clone());
            let fits = key.0.len() <= 64
                && key.1.len() <= 64
                && (self.tls.len() < MAX_TRANSPORT_ENTRIES || self.tls.contains_key(&key));
            if fits {
                let count = self.tls.entry(key).or_default();
                *count = count.saturating_add(used.count);
            }
        }
        for used in plaintext {
            if self.plaintext.len() < MAX_TRANSPORT_ENTRIES
                || self.plaintext.contains_key(&used.port)
            {
                let count = self.plaintext.entry(used.port).or_default();
                *count = count.saturating_add(used.count);
            }
        }
    }
}

/// The observed flows, with how many each reporter and each (peer, reporter) pair holds.
#[derive(Default)]
pub(super) struct FlowTable {
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
        metrics::counter!(crate::metric::FLOWS_DROPPED, "reason" => reason).increment(1);
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

impl Distribution {
    /// Adds reported flow counts (review M5: one noisy reporter or peer cannot blind
    /// `policy impact` for the others). A reporting sidecar keeps at most
    /// [`MAX_FLOWS_PER_TARGET`] distinct flows, one peer of it at most [`MAX_FLOWS_PER_PEER`];
    /// new flows over a quota are dropped and counted by reason. When the whole table holds
    /// [`MAX_FLOWS`], the flow seen longest ago makes room.
    pub fn report_flows(&self, flows: Vec<(FlowKey, FlowStats)>) {
        let engine = self.read().engine.clone();
        self.detection.observe(&flows, &engine);
        let now = now_unix();
        lock(&self.rollups).add_flows(&flows, now, self.started);
        let mut held = lock(&self.flows);
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

    /// Adds what `identity`'s sidecar reported of its connections' transport to this day's
    /// roll-up, within bounds (entries over them, or with names over 64 characters, are not
    /// kept).
    pub fn report_transport(
        &self,
        identity: &str,
        tls: &[sidewall_policies::wire::TlsUse],
        plaintext: &[sidewall_policies::wire::PlaintextUse],
    ) {
        if tls.is_empty() && plaintext.is_empty() {
            return;
        }
        lock(&self.rollups).add_transport(identity, tls, plaintext, now_unix(), self.started);
    }

    /// Adds the connections `identity`'s sidecar refused before they left it to this day's
    /// roll-up.
    pub fn report_outbound(
        &self,
        identity: &str,
        refused: &[sidewall_policies::wire::OutboundRefusal],
    ) {
        if !refused.is_empty() {
            lock(&self.rollups).add_outbound(identity, refused, now_unix(), self.started);
        }
    }

    /// The observed flows whose outcome differs between the set in force and `candidate`.
    pub fn impact(&self, candidate: &Engine) -> Vec<(FlowKey, u64, Outcome, Outcome)> {
        let current = self.read().engine.clone();
        let flows = lock(&self.flows).flows.clone();
        let mut flips = Vec::new();
        for (key, stats) in flows {
            let (Some(before), Some(after)) = (decide(&current, &key), decide(candidate, &key))
            else {
                continue;
            };
            let (before, after) = (before.outcome, after.outcome);
            if before != after {
                flips.push((key, stats.count, before, after));
            }
        }
        flips
    }
}

/// What `engine` decides for an observed flow (an HTTP flow as a request to its path prefix,
/// without a host); `None` when its identities do not parse. Cheap: `policy impact` asks it of
/// every flow at every call.
pub fn decide(engine: &Engine, key: &FlowKey) -> Option<Decision> {
    with_query(key, |query| engine.decide(query))
}

/// [`decide`], with every rule that matches the flow (for the report; it allocates a trace).
pub fn explain(engine: &Engine, key: &FlowKey) -> Option<Explanation> {
    with_query(key, |query| engine.explain(query))
}

fn with_query<T>(key: &FlowKey, ask: impl FnOnce(&Query<'_>) -> T) -> Option<T> {
    let (Ok(peer), Ok(target)) = (SpiffeId::parse(&key.peer), SpiffeId::parse(&key.target)) else {
        return None;
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
    Some(ask(&Query {
        peer: &peer,
        target: &target,
        port: key.port,
        subject,
    }))
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
