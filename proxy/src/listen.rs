//! The accept loop every listener of the sidecar shares: the connection budgets, the counters
//! and gauges by direction, and a clean stop.
//!
//! Three budgets, so that no kind of connection can starve another (review H1):
//! - **handshakes** (`limits.maxHandshakes`, at most `limits.handshakesPerSource` per source
//!   address): inbound connections not yet authenticated, from accept until their TLS
//!   handshake and port header are done (each stage under `limits.handshakeTimeout`);
//! - **inbound** (`limits.maxConnections`): authenticated inbound connections and the app
//!   connections carried on shared ones ([`Pending::authenticated`] moves a connection here);
//! - **outbound** (`limits.maxConnections`): the app's own connections to other services.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, watch};

use crate::Context;

/// Which budget a listener's connections take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// Peers: the handshake budget until authenticated, then the inbound one.
    Inbound,
    /// The app's own connections.
    Outbound,
}

impl Budget {
    fn label(self) -> &'static str {
        match self {
            Budget::Inbound => "inbound",
            Budget::Outbound => "outbound",
        }
    }
}

/// Inbound connections not yet authenticated, per source address.
#[derive(Default)]
pub struct Sources(Mutex<HashMap<IpAddr, usize>>);

struct SourceCount {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<SourceCount> {
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        let count = counts.entry(ip).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(SourceCount {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceCount {
    fn drop(&mut self) {
        let mut counts = self.sources.lock();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The budget a connection holds: a handshake slot until it is authenticated, then an inbound
/// (or outbound) permit. Released when dropped.
pub(crate) struct Pending {
    handshake: Option<(OwnedSemaphorePermit, SourceCount)>,
    admitted: Option<OwnedSemaphorePermit>,
}

impl Pending {
    /// The peer is authenticated (or a permissive port took its plaintext): the connection
    /// leaves the handshake budget for the inbound one. False, counted, when that one is full.
    pub(crate) fn authenticated(&mut self, context: &Context) -> bool {
        if self.admitted.is_some() {
            return true;
        }
        let Ok(permit) = context.permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "direction" => "inbound", "reason" => "limit").increment(1);
            tracing::warn!(
                "inbound connection refused: limits.maxConnections authenticated connections are open"
            );
            return false;
        };
        self.admitted = Some(permit);
        self.handshake = None;
        true
    }
}

/// Accepts on `listener` until `stop` turns true, running `handle` for each connection in its
/// own task with the budget it holds.
pub(crate) async fn accept_loop<F, Fut>(
    context: Arc<Context>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    budget: Budget,
    handle: F,
) where
    F: Fn(Arc<Context>, TcpStream, SocketAddr, Pending) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let direction = budget.label();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and the like: back off instead of spinning.
                    metrics::counter!(crate::metric::ACCEPT_ERRORS, "direction" => direction).increment(1);
                    tracing::warn!(%error, direction, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(pending) = take(&context, budget, remote) else {
            continue;
        };
        let work = handle(context.clone(), stream, remote, pending);
        tokio::spawn(async move {
            metrics::counter!(crate::metric::CONNECTIONS_OPENED, "direction" => direction)
                .increment(1);
            metrics::gauge!(crate::metric::CONNECTIONS_OPEN, "direction" => direction)
                .increment(1.0);
            work.await;
            metrics::gauge!(crate::metric::CONNECTIONS_OPEN, "direction" => direction)
                .decrement(1.0);
        });
    }
}

/// The budget for a new connection, or `None` (counted) when it is full.
fn take(context: &Context, budget: Budget, remote: SocketAddr) -> Option<Pending> {
    let refused = |reason: &'static str| {
        metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "direction" => budget.label(), "reason" => reason).increment(1);
        None
    };
    match budget {
        Budget::Outbound => match context.outbound_permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Pending {
                handshake: None,
                admitted: Some(permit),
            }),
            Err(_) => refused("limit"),
        },
        Budget::Inbound => {
            let limits = &context.config.limits;
            let Some(source) = context
                .sources
                .count(remote.ip(), limits.handshakes_per_source)
            else {
                return refused("source_limit");
            };
            let Ok(permit) = context.handshakes.clone().try_acquire_owned() else {
                return refused("handshake_limit");
            };
            Some(Pending {
                handshake: Some((permit, source)),
                admitted: None,
            })
        }
    }
}
