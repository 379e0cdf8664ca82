//! Long-lived HTTP/2 connections, shared by every request or carried connection to the same
//! place: one pool design for all three uses.
//!
//! - a peer service and port, for HTTP between sidecars (hyper's client, `peers_h2`);
//! - an app address, for an app that speaks HTTP/2 (hyper's client, `app_h2`);
//! - a peer service, for app connections carried as streams (the `h2` crate, `peers_mux`, at
//!   most [`crate::mux::STREAMS_PER_CONNECTION`] streams per connection; more open another).
//!
//! Requests are streams on a connection, each flow-controlled on its own, so a slow one does not
//! stall the others. A connection that closed (the peer restarted, its certificate expired, it
//! went away), that a caller found broken, that its server's revocation ended or that is past
//! the time its opener gave it (see [`Opened`]) leaves the pool on the next lease; streams
//! already on it carry on, kept by its driver. A caller whose stream could not be opened on a
//! pooled connection marks it closed and leases once more with `fresh`, which opens a new one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};

/// The sending half of a pooled connection.
pub(crate) trait Sender: Clone {
    /// Whether the connection is known to have closed (besides its [`Opened::closed`] flag).
    fn is_closed(&self) -> bool;
}

impl<B> Sender for hyper::client::conn::http2::SendRequest<B> {
    fn is_closed(&self) -> bool {
        hyper::client::conn::http2::SendRequest::is_closed(self)
    }
}

impl Sender for h2::client::SendRequest<bytes::Bytes> {
    fn is_closed(&self) -> bool {
        // Its driver sets the flag when the connection ends.
        false
    }
}

/// A new connection, as its opener hands it to the pool.
pub(crate) struct Opened<S> {
    sender: S,
    until: Option<Instant>,
    server: Option<crate::outbound::Server>,
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
}

impl<S: Sender> Opened<S> {
    /// `sender` on a connection whose driver sets `closed` when it ends. New requests may go
    /// on it until `until` (for a connection to a peer sidecar: well before the server's
    /// certificate expires, so that a renewed one is picked up by the next connection while
    /// the streams on this one finish), and while `server`, the peer sidecar it reached if it
    /// is one, is not revoked.
    pub(crate) fn new(
        sender: S,
        until: Option<Instant>,
        server: Option<crate::outbound::Server>,
        closed: Arc<AtomicBool>,
    ) -> Self {
        Self {
            sender,
            until,
            server,
            closed,
            streams: Arc::default(),
        }
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
            && !self.sender.is_closed()
            && self.until.is_none_or(|until| Instant::now() < until)
            && !self.server.as_ref().is_some_and(|s| s.revoked())
    }

    /// A stream's use of it, counted when the pool limits streams (`counted`).
    fn lease(&self, counted: bool) -> Lease<S> {
        Lease {
            sender: self.sender.clone(),
            closed: self.closed.clone(),
            carried: Carried(counted.then(|| {
                self.streams.fetch_add(1, Ordering::Relaxed);
                self.streams.clone()
            })),
        }
    }
}

/// One stream's use of a pooled connection: its sender, the flag that takes the connection out
/// of the pool, and the count of streams on it while the lease lives.
pub(crate) struct Lease<S> {
    pub(crate) sender: S,
    pub(crate) closed: Arc<AtomicBool>,
    pub(crate) carried: Carried,
}

/// One stream counted on its connection while it lives (in a pool that limits streams; a
/// request on a hyper connection, whose peer limits them, pays no count).
pub(crate) struct Carried(Option<Arc<AtomicUsize>>);

impl Drop for Carried {
    fn drop(&mut self) {
        if let Some(streams) = &self.0 {
            streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The connections to one place.
type Slot<S> = Arc<tokio::sync::Mutex<Vec<Opened<S>>>>;

/// Pooled connections keyed by `K`, with senders of type `S`.
pub(crate) struct Pool<K, S> {
    slots: Mutex<HashMap<K, Slot<S>>>,
    /// Streams one connection carries at once at most.
    streams: usize,
}

impl<K, S> Default for Pool<K, S> {
    /// One connection per key, as many streams on it as its peer allows.
    fn default() -> Self {
        Self::with_streams(usize::MAX)
    }
}

impl<K, S> Pool<K, S> {
    /// At most `streams` streams per connection; more open another.
    pub(crate) fn with_streams(streams: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            streams,
        }
    }
}

impl<K, S> std::fmt::Debug for Pool<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.slots.lock().map_or(0, |s| s.len());
        f.debug_struct("Pool").field("keys", &open).finish()
    }
}

impl<K: Hash + Eq + Clone, S: Sender> Pool<K, S> {
    fn slot(&self, key: &K) -> Slot<S> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// A connection for `key` with room for one more stream, and the stream counted on it: a
    /// pooled one, or (when none has room, or when `fresh`) a new one from `connect`, one at a
    /// time per key, so concurrent first requests wait for the same connection.
    pub(crate) async fn lease<E, F, Fut>(
        &self,
        key: &K,
        connect: &F,
        fresh: bool,
    ) -> Result<Lease<S>, E>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Opened<S>, E>>,
    {
        let slot = self.slot(key);
        let mut held = slot.lock().await;
        // A connection no longer usable leaves the pool; its driver keeps it for the streams
        // it still carries.
        held.retain(Opened::usable);
        if !fresh
            && let Some(opened) = held
                .iter()
                .find(|o| o.streams.load(Ordering::Relaxed) < self.streams)
        {
            metrics::counter!(crate::metric::H2_POOL, "event" => "reused").increment(1);
            return Ok(opened.lease(self.streams != usize::MAX));
        }
        // Boxed: the handshake's state is large and rarely needed; inline, every caller's
        // future would be that large for its whole life.
        let opened = Box::pin(connect()).await?;
        metrics::counter!(crate::metric::H2_POOL, "event" => "opened").increment(1);
        let lease = opened.lease(self.streams != usize::MAX);
        held.push(opened);
        Ok(lease)
    }
}

/// Why a pooled request failed.
#[derive(Debug)]
pub(crate) enum PoolError<E> {
    /// No connection could be made (the connect closure's reason).
    Connect(E),
    /// The request failed on the connection.
    Request(hyper::Error),
}

/// The sending half of a pooled hyper connection carrying request bodies of type `B`.
pub(crate) type HyperSender<B = Incoming> = hyper::client::conn::http2::SendRequest<B>;

impl<K, B> Pool<K, HyperSender<B>>
where
    K: Hash + Eq + Clone,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `request` on the pooled connection for `key`, connecting with `connect` when
    /// there is none usable. A request not sent because the connection was going away is
    /// sent once more on a new one.
    pub(crate) async fn send<E, F, Fut>(
        &self,
        key: &K,
        connect: F,
        request: Request<B>,
    ) -> Result<Response<Incoming>, PoolError<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Opened<HyperSender<B>>, E>>,
    {
        let mut request = request;
        let mut fresh = false;
        loop {
            let Lease {
                mut sender, closed, ..
            } = self
                .lease(key, &connect, fresh)
                .await
                .map_err(PoolError::Connect)?;
            if let Err(error) = sender.ready().await {
                if fresh {
                    return Err(PoolError::Request(error));
                }
                closed.store(true, Ordering::Relaxed);
                fresh = true;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    // Not sent: the connection was going away. Once more on a new one.
                    Some(unsent) if !fresh => {
                        closed.store(true, Ordering::Relaxed);
                        request = unsent;
                        fresh = true;
                    }
                    _ => return Err(PoolError::Request(error.into_error())),
                },
            }
        }
    }
}
