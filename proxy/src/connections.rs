//! Open inbound connections, so that a new snapshot can re-check each one and apply the
//! policy's `onRevoke`, and a shutdown can drain them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sidewall_policies::engine::{Query, Subject};
use sidewall_policies::policy::OnRevoke;
use sidewall_policies::{Protocol, SpiffeId};
use tokio::sync::watch;

use crate::snapshot::Active;

/// Why a connection is being closed by the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Policy no longer allows it.
    Revoked,
    /// The peer is on the revocation list.
    PeerRevoked,
    /// The sidecar is shutting down and the drain period is over.
    Shutdown,
}

impl CloseReason {
    /// Label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Revoked => "policy_revoked",
            CloseReason::PeerRevoked => "peer_revoked",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

struct Tracked {
    peer: SpiffeId,
    serial: String,
    port: u16,
    protocol: Protocol,
    on_revoke: OnRevoke,
    close: watch::Sender<Option<CloseReason>>,
    /// Set once a revocation has been scheduled (drain), so it is not scheduled twice.
    closing: bool,
}

/// The open inbound connections.
#[derive(Default)]
pub struct Table {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Tracked>>,
}

/// Removes its connection from the table when dropped.
pub struct Registration<'a> {
    table: &'a Table,
    id: u64,
    /// Resolves with the reason when the sidecar wants the connection closed.
    pub closed: watch::Receiver<Option<CloseReason>>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl Registration<'_> {
    /// The connection was admitted by a policy with this `onRevoke`.
    pub fn admitted(&self, on_revoke: OnRevoke) {
        if let Some(tracked) = self.table.lock().get_mut(&self.id) {
            tracked.on_revoke = on_revoke;
        }
    }
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a connection about to be decided (see `crate::admit`): until
    /// [`Registration::admitted`] says otherwise, a re-evaluation that no longer allows it
    /// closes it at once.
    pub fn register(
        &self,
        peer: SpiffeId,
        serial: String,
        port: u16,
        protocol: Protocol,
    ) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.lock().insert(
            id,
            Tracked {
                peer,
                serial,
                port,
                protocol,
                on_revoke: OnRevoke::Terminate,
                close,
                closing: false,
            },
        );
        Registration {
            table: self,
            id,
            closed,
        }
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none are open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-decides every open connection against a new snapshot and applies `onRevoke` to those
    /// no longer allowed. Returns how many were closed or scheduled to close.
    pub fn reevaluate(&self, workload: &SpiffeId, active: &Active) -> usize {
        let mut affected = 0;
        for tracked in self.lock().values_mut() {
            // A revoked peer is cut at once, whatever `onRevoke` says, even while a drain
            // scheduled by an earlier policy change is under way.
            if active
                .snapshot
                .revocations
                .is_revoked(&tracked.peer, &tracked.serial)
            {
                if *tracked.close.borrow() != Some(CloseReason::PeerRevoked) {
                    let _ = tracked.close.send(Some(CloseReason::PeerRevoked));
                    tracked.closing = true;
                    affected += 1;
                }
                continue;
            }
            if tracked.closing {
                continue;
            }
            let decision = active.engine.decide(&Query {
                peer: &tracked.peer,
                target: workload,
                port: tracked.port,
                subject: Subject::Connection(tracked.protocol),
            });
            if decision.permits() {
                continue;
            }
            let reason = CloseReason::Revoked;
            match tracked.on_revoke {
                OnRevoke::Keep => {
                    tracing::info!(peer = %tracked.peer, port = tracked.port, "no longer allowed; kept open (onRevoke: keep)");
                    continue;
                }
                OnRevoke::Terminate => {
                    let _ = tracked.close.send(Some(reason));
                }
                OnRevoke::Drain(period) => {
                    let close = tracked.close.clone();
                    let wait: Duration = period.duration();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = close.send(Some(reason));
                    });
                }
            }
            tracked.closing = true;
            affected += 1;
        }
        affected
    }

    /// Asks every connection to close now.
    pub fn close_all(&self, reason: CloseReason) {
        for tracked in self.lock().values() {
            let _ = tracked.close.send(Some(reason));
        }
    }
}
