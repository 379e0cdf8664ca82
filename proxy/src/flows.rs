//! What this sidecar decided, by flow, between two reports to the control plane (`POST
//! /v1/flows`, for `policy impact`, the dashboard and the fleet's flow view): bounded in
//! distinct flows and per peer, and counted when it is not kept.

use std::collections::HashMap;

use sidewall_policies::Protocol;
use sidewall_policies::wire;

/// Most distinct flows counted between reports.
const MAX_FLOWS: usize = 10_000;
/// Of those, from one peer at most (review M5: one peer sending requests to thousands of
/// distinct paths must not take the places of the others). The control plane keeps as many
/// per peer of a reporting sidecar.
const MAX_FLOWS_PER_PEER: usize = 500;
/// What a flow is: who, which port, and for HTTP the method and the first path segments.
type FlowKey = (String, u16, Protocol, Option<String>, Option<String>);

/// Decisions on one flow since the last report.
#[derive(Debug, Default, Clone)]
struct FlowCounts {
    allow: u64,
    deny: u64,
    audit: u64,
    last_denial: Option<String>,
}

/// Most distinct (reason, source) refusals, and (reason, target, port) outbound refusals,
/// counted between reports.
const MAX_REFUSALS: usize = 1_000;

/// Flow counts since the last report, bounded to [`MAX_FLOWS`] distinct flows and
/// [`MAX_FLOWS_PER_PEER`] per peer, and the refusals detection cares about.
#[derive(Default)]
pub struct Flows(std::sync::Mutex<FlowTable>);

#[derive(Default)]
struct FlowTable {
    flows: HashMap<FlowKey, FlowCounts>,
    /// Distinct flows per peer in `flows`.
    per_peer: HashMap<String, usize>,
    refusals: HashMap<(wire::RefusalReason, String), u64>,
    /// Authenticated handshakes by TLS version and cipher suite (a handful of pairs).
    tls: HashMap<(&'static str, &'static str), u64>,
    /// Plaintext connections accepted, by permissive port.
    plaintext: HashMap<u16, u64>,
    /// The app's connections refused here, by (reason, target, port).
    outbound: HashMap<(wire::OutboundReason, String, u16), u64>,
}

/// The first two segments of a normalized path (`/v1/orders/7/items` → `/v1/orders`), so
/// that flow tables stay bounded whatever paths clients send.
pub fn path_prefix(path: &str) -> String {
    let mut end = path.len();
    let mut slashes = 0;
    for (i, b) in path.bytes().enumerate() {
        if b == b'/' {
            slashes += 1;
            if slashes == 3 {
                end = i;
                break;
            }
        }
    }
    path[..end].to_owned()
}

impl Flows {
    /// Counts one decision, within [`MAX_FLOWS`] distinct flows.
    pub fn count(
        &self,
        peer: &str,
        port: u16,
        protocol: Protocol,
        request: Option<(&str, &str)>,
        decision: &sidewall_policies::Decision,
    ) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (
            peer.to_owned(),
            port,
            protocol,
            request.map(|(method, _)| method.to_owned()),
            request.map(|(_, path)| path_prefix(path)),
        );
        if !table.flows.contains_key(&key) {
            let of_peer = table.per_peer.get(peer).copied().unwrap_or(0);
            let full = if table.flows.len() >= MAX_FLOWS {
                Some("table_full")
            } else if of_peer >= MAX_FLOWS_PER_PEER {
                Some("peer_quota")
            } else {
                None
            };
            if let Some(reason) = full {
                metrics::counter!(crate::metric::FLOWS_DROPPED, "reason" => reason).increment(1);
                return;
            }
            *table.per_peer.entry(peer.to_owned()).or_default() += 1;
        }
        let counts = table.flows.entry(key).or_default();
        match decision.outcome {
            sidewall_policies::Outcome::Allow => counts.allow += 1,
            sidewall_policies::Outcome::Audit => counts.audit += 1,
            sidewall_policies::Outcome::Deny => {
                counts.deny += 1;
                counts.last_denial = Some(match &decision.reason {
                    Some(r) => format!("policy={} rule={}", r.policy, r.rule),
                    None => "default deny".to_owned(),
                });
            }
        }
    }

    /// Counts a connection refused before its identity was authorized, when the label is one
    /// detection cares about (plaintext, a revoked, expired or untrusted certificate); `source`
    /// is the peer's identity if it was authenticated, otherwise its address.
    pub fn refused(&self, label: &str, source: impl std::fmt::Display) {
        let Some(reason) = wire::RefusalReason::of_label(label) else {
            return;
        };
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (reason, source.to_string());
        if table.refusals.len() >= MAX_REFUSALS && !table.refusals.contains_key(&key) {
            metrics::counter!(crate::metric::FLOWS_DROPPED, "reason" => "refusals_full")
                .increment(1);
            return;
        }
        *table.refusals.entry(key).or_default() += 1;
    }

    /// Counts a connection the app opened that this sidecar refused before it left the machine
    /// (`target`: the service, or the address outside the mesh).
    pub fn outbound_refused(
        &self,
        reason: wire::OutboundReason,
        target: impl std::fmt::Display,
        port: u16,
    ) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (reason, target.to_string(), port);
        if table.outbound.len() >= MAX_REFUSALS && !table.outbound.contains_key(&key) {
            metrics::counter!(crate::metric::FLOWS_DROPPED, "reason" => "refusals_full")
                .increment(1);
            return;
        }
        *table.outbound.entry(key).or_default() += 1;
    }

    /// Counts an authenticated inbound TLS handshake.
    pub fn handshake(&self, version: &'static str, suite: &'static str) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *table.tls.entry((version, suite)).or_default() += 1;
    }

    /// Counts a plaintext connection accepted on permissive `port`.
    pub fn plaintext(&self, port: u16) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *table.plaintext.entry(port).or_default() += 1;
    }

    /// Everything counted since the last call, as a flow report (records the control plane
    /// would not keep already left out), and a fresh table.
    pub fn take_report(&self) -> wire::FlowReport {
        let taken = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        let refusals = taken
            .refusals
            .into_iter()
            .map(|((reason, source), count)| wire::RefusalRecord {
                reason,
                source,
                count,
            })
            .collect();
        let flows = taken
            .flows
            .into_iter()
            .map(
                |((peer, port, protocol, method, path), c)| wire::FlowRecord {
                    peer,
                    port,
                    protocol,
                    method,
                    path,
                    count: c.allow + c.deny + c.audit,
                    allow: c.allow,
                    deny: c.deny,
                    audit: c.audit,
                    last_denial: c.last_denial,
                },
            )
            .filter_map(wire::FlowRecord::sanitized)
            .collect();
        let tls = taken
            .tls
            .into_iter()
            .map(|((version, suite), count)| wire::TlsUse {
                version: version.to_owned(),
                suite: suite.to_owned(),
                count,
            })
            .collect();
        let plaintext = taken
            .plaintext
            .into_iter()
            .map(|(port, count)| wire::PlaintextUse { port, count })
            .collect();
        let outbound = taken
            .outbound
            .into_iter()
            .map(|((reason, target, port), count)| wire::OutboundRefusal {
                reason,
                target,
                port,
                count,
            })
            .collect();
        wire::FlowReport {
            flows,
            refusals,
            tls,
            plaintext,
            outbound,
        }
    }
}
