//! Admission: the one place an authenticated peer's connection to one of our ports is decided,
//! however it arrived (its own TLS connection, or a stream of a shared connection).
//!
//! ```text
//! admit(peer, port, arrival)
//!   certificate still valid? → port redirected here = port asked for? → port in inbound.ports,
//!   served the way it arrived? → REGISTER for re-evaluation → the snapshot in force NOW →
//!   peer revoked? → Engine::decide_connection → Admission (entry, registration, onRevoke)
//!                                              │ Refusal (one table: status byte, HTTP status,
//!                                              │ metric, log)
//! ```
//!
//! The connection is registered *before* the snapshot is read: a snapshot that is applied after
//! that read re-evaluates it (the sidecar's follower walks the registered connections after every
//! change), and one applied before it is the one the decision uses; when one is applied while
//! deciding, the decision is taken again on it. A peer that holds back its
//! port header across a policy change or its own revocation is therefore decided on the new
//! snapshot, never admitted on the old one and missed by the re-evaluation (review M1).

use std::sync::Arc;

use hyper::StatusCode;
use sidewall_policies::policy::OnRevoke;
use sidewall_policies::svid::Svid;
use sidewall_policies::{Decision, Outcome, Protocol, SpiffeId};

use crate::Context;
use crate::config::InboundPort;
use crate::connections::{CloseReason, Registration};
use crate::identity::now_unix;
use crate::snapshot::Active;
use crate::transport::Status;

/// How a peer's connection to a port arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Its own TLS connection (ALPN `sidewall-l4/1`, or `sidewall-h2/1` when `h2`).
    Direct {
        /// HTTP/2 from the first byte: only an HTTP port can take it.
        h2: bool,
    },
    /// A `CONNECT` stream of a shared connection (ALPN `sidewall-mux/1`): TCP ports only.
    Carried,
}

/// Why a peer's connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer certificate has expired (a resumed session skips verification).
    CertificateExpired,
    /// Transparent mode: the port asked for is not the port the connection was sent to.
    PortMismatch,
    /// This sidecar does not serve the port.
    UnknownPort,
    /// HTTP/2 was asked for on a port that is not an HTTP port.
    NotHttp,
    /// A carried (TCP) connection to an HTTP port: HTTP goes as requests.
    NotTcp,
    /// The sidecar has no snapshot.
    NoSnapshot,
    /// The peer's identity or certificate is on the revocation list.
    Revoked,
    /// The policy denies the peer on this port.
    Denied,
}

impl Refusal {
    /// Label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::CertificateExpired => "certificate_expired",
            Refusal::PortMismatch => "port_mismatch",
            Refusal::UnknownPort => "unknown_port",
            Refusal::NotHttp => "not_http",
            Refusal::NotTcp => "not_tcp",
            Refusal::NoSnapshot => "no_snapshot",
            Refusal::Revoked => "revoked",
            Refusal::Denied => "deny",
        }
    }

    /// The status byte answered on a direct connection; `None`: closed without one (the peer
    /// learns nothing about a port it may not ask for in the first place).
    pub fn status(self) -> Option<Status> {
        match self {
            Refusal::CertificateExpired | Refusal::PortMismatch | Refusal::NoSnapshot => None,
            Refusal::UnknownPort => Some(Status::UnknownPort),
            Refusal::NotHttp | Refusal::NotTcp => Some(Status::NotHttp),
            Refusal::Revoked | Refusal::Denied => Some(Status::Denied),
        }
    }

    /// The response status of a refused carried stream.
    pub fn http_status(self) -> StatusCode {
        match self {
            Refusal::UnknownPort => StatusCode::NOT_FOUND,
            Refusal::NotHttp | Refusal::NotTcp => StatusCode::MISDIRECTED_REQUEST,
            Refusal::NoSnapshot => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::CertificateExpired
            | Refusal::PortMismatch
            | Refusal::Revoked
            | Refusal::Denied => StatusCode::FORBIDDEN,
        }
    }

    /// Counts and logs the refusal (a denial was counted with its policy by [`record`]).
    fn count(self, peer: &SpiffeId, port: u16, arrival: Arrival) {
        match self {
            Refusal::Denied => {}
            // About the peer's certificate or the transport, not about the port.
            Refusal::CertificateExpired | Refusal::PortMismatch | Refusal::NoSnapshot => {
                if arrival == Arrival::Carried {
                    metrics::counter!(crate::metric::CARRIED_CONNECTIONS, "outcome" => self.label()).increment(1);
                } else {
                    metrics::counter!(crate::metric::HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => self.label()).increment(1);
                }
                if let Some(folded) = crate::lograte::admit(peer.as_str(), port, self.label()) {
                    tracing::info!(%peer, port, reason = self.label(), folded, "inbound connection refused");
                }
            }
            Refusal::UnknownPort | Refusal::NotHttp | Refusal::NotTcp | Refusal::Revoked => {
                metrics::counter!(crate::metric::AUTHORIZATIONS, "outcome" => self.label(), "policy" => "-").increment(1);
                if let Some(folded) = crate::lograte::admit(peer.as_str(), port, self.label()) {
                    tracing::warn!(%peer, port, reason = self.label(), folded, "inbound connection refused");
                }
            }
        }
    }
}

/// An admitted connection: registered for re-evaluation with what its policy's `onRevoke` says.
pub struct Admission<'c> {
    /// The port entry it was admitted to.
    pub entry: InboundPort,
    registration: Registration<'c>,
    /// The peer's certificate, as it was admitted with.
    peer: Svid,
}

/// Decides `peer`'s connection to `port` on the snapshot in force now (see the module docs).
pub fn admit<'c>(
    context: &'c Context,
    peer: &Svid,
    port: u16,
    redirected: Option<u16>,
    arrival: Arrival,
) -> Result<Admission<'c>, Refusal> {
    let admitted = (|| {
        if peer.expired(now_unix()) {
            return Err(Refusal::CertificateExpired);
        }
        if redirected.is_some_and(|original| original != port) {
            return Err(Refusal::PortMismatch);
        }
        let entry = *context
            .config
            .inbound_port(port)
            .ok_or(Refusal::UnknownPort)?;
        match (arrival, entry.protocol) {
            (Arrival::Direct { h2: true }, Protocol::Tcp) => return Err(Refusal::NotHttp),
            (Arrival::Carried, Protocol::Http) => return Err(Refusal::NotTcp),
            _ => {}
        }
        let registration = context.connections.register(
            peer.id.clone(),
            peer.serial.clone(),
            port,
            entry.protocol,
        );
        // Decided on the snapshot in force; if another was applied meanwhile, decided again
        // on that one, so the decision is never older than the last re-evaluation.
        let mut active = current(context)?;
        let decision = loop {
            let decision = judge(context, &active, peer, port, entry.protocol);
            let now = current(context)?;
            if Arc::ptr_eq(&active, &now) {
                break decision;
            }
            active = now;
        };
        let on_revoke = account(context, &active, &peer.id, port, entry.protocol, decision?)
            .ok_or(Refusal::Denied)?;
        registration.admitted(on_revoke);
        Ok(Admission {
            entry,
            registration,
            peer: peer.clone(),
        })
    })();
    if let Err(refusal) = admitted {
        refusal.count(&peer.id, port, arrival);
        context.flows.refused(refusal.label(), &peer.id);
    }
    admitted
}

/// What a segmentation probe of `port` by `peer` is answered ([`crate::probe`]): `Allowed`
/// when [`admit`] would admit the connection, the refusal's status otherwise. Nothing is
/// registered or counted as a connection, and nothing reaches the app.
pub fn probe(context: &Context, peer: &Svid, port: u16) -> Status {
    if peer.expired(now_unix()) {
        return Status::Denied;
    }
    let Some(entry) = context.config.inbound_port(port) else {
        return Status::UnknownPort;
    };
    let Ok(active) = current(context) else {
        return Status::Denied;
    };
    match judge(context, &active, peer, port, entry.protocol) {
        Ok(decision) if decision.permits() => Status::Allowed,
        _ => Status::Denied,
    }
}

/// Whether the snapshot in force lets `peer` reach some TCP port of ours: what a shared
/// connection (which carries TCP only) is for. Not counted; each stream is decided by [`admit`].
pub fn may_carry(context: &Context, peer: &Svid) -> bool {
    let Some(active) = context.snapshot.borrow().clone() else {
        return false;
    };
    !active
        .snapshot
        .revocations
        .is_revoked(&peer.id, &peer.serial)
        && context.config.inbound.ports.iter().any(|entry| {
            entry.protocol == Protocol::Tcp
                && active
                    .engine
                    .decide_connection(
                        &peer.id,
                        &context.config.identity,
                        entry.port,
                        Protocol::Tcp,
                    )
                    .permits()
        })
}

/// Counts a connection-level decision, with the deciding policy.
pub(crate) fn record(decision: &Decision) {
    let outcome = match decision.outcome {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::Audit => "audit",
    };
    let policy = decision
        .reason
        .as_ref()
        .map_or_else(|| "-".to_owned(), |r| r.policy.to_string());
    metrics::counter!(crate::metric::AUTHORIZATIONS, "outcome" => outcome, "policy" => policy)
        .increment(1);
}

fn current(context: &Context) -> Result<Arc<Active>, Refusal> {
    context.snapshot.borrow().clone().ok_or(Refusal::NoSnapshot)
}

/// What `active` says of `peer` on `port`: revoked, or the engine's decision. Pure: counted
/// once, by [`account`], for the snapshot that finally decided.
fn judge(
    context: &Context,
    active: &Active,
    peer: &Svid,
    port: u16,
    protocol: Protocol,
) -> Result<Decision, Refusal> {
    if active
        .snapshot
        .revocations
        .is_revoked(&peer.id, &peer.serial)
    {
        return Err(Refusal::Revoked);
    }
    Ok(active
        .engine
        .decide_connection(&peer.id, &context.config.identity, port, protocol))
}

/// Counts and logs a connection-level decision and records its flow (HTTP ports count each
/// request instead, see `crate::http`; a denied connection counts here). `None` when denied;
/// otherwise what `onRevoke` says for the policy that allowed it.
fn account(
    context: &Context,
    active: &Active,
    peer: &SpiffeId,
    port: u16,
    protocol: Protocol,
    decision: Decision,
) -> Option<OnRevoke> {
    let target = &context.config.identity;
    record(&decision);
    if protocol == Protocol::Tcp || !decision.permits() {
        context
            .flows
            .count(peer.as_str(), port, protocol, None, &decision);
    }
    if !decision.permits() {
        // One line per peer and port per window, with how many were folded into it.
        if let Some(folded) = crate::lograte::admit(peer.as_str(), port, "deny") {
            tracing::warn!(%peer, %target, port, %decision, folded, "connection denied");
        }
        return None;
    }
    if decision.outcome == Outcome::Audit || decision.shadow.is_some() {
        tracing::info!(%peer, port, decision = %decision.to_string().replace('\n', "; "), "audit");
    } else {
        tracing::debug!(%peer, port, %decision, "connection allowed");
    }
    Some(
        decision
            .reason
            .as_ref()
            .and_then(|r| active.snapshot.policies.get(r.policy.as_str()))
            .map(|p| p.on_revoke)
            .unwrap_or_default(),
    )
}

impl Admission<'_> {
    /// Runs the admitted connection's `work`: it ends when the work ends, when the sidecar
    /// closes it (`onRevoke`, revocation, shutdown), or when the peer certificate it was
    /// admitted with expires.
    pub async fn supervise(mut self, work: impl std::future::Future<Output = ()>) {
        let port = self.entry.port;
        let peer = &self.peer.id;
        let expiry = self.peer.remaining(now_unix());
        tokio::select! {
            () = work => {}
            reason = self.registration.closed.wait_for(Option::is_some) => {
                let label = reason.ok().and_then(|r| *r).map_or("closed", CloseReason::label);
                metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => label).increment(1);
                tracing::info!(%peer, port, reason = label, "connection closed by the sidecar");
            }
            () = tokio::time::sleep(expiry) => {
                metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "peer_certificate_expired").increment(1);
                tracing::info!(%peer, port, "peer certificate expired: connection closed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
