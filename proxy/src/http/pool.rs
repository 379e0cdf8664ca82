//! Long-lived HTTP/2 connections, shared by every request to the same place.
//!
//! One connection per key (a peer service and port for HTTP between sidecars; a peer service
//! for carried TCP connections; an app address for an app that speaks HTTP/2). Requests are
//! streams on it, each flow-controlled on its own, so a slow one does not stall the others. A
//! connection that closed — the peer restarted, its certificate expired, it went away — or
//! that is past the time its opener gave it (see [`Opened`]) is replaced on the next request;
//! streams already on it carry on. A request that had not been sent yet when it found the
//! connection closed is retried once on a new one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyper::body::{Body, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};

/// The sending half of one pooled connection carrying request bodies of type `B`.
pub(crate) type Sender<B = Incoming> = SendRequest<B>;

/// A new connection.
pub(crate) struct Opened<B> {
    /// Sends requests on it.
    pub(crate) sender: Sender<B>,
    /// Until when new requests may be put on it (for a connection to a peer sidecar: well
    /// before the server's certificate expires, so that a renewed one is picked up by the next
    /// connection while the streams on this one finish).
    pub(crate) until: Option<Instant>,
    /// The peer sidecar it reached, if it is one: no new request once it is revoked.
    pub(crate) server: Option<crate::outbound::Server>,
}

impl<B> Opened<B> {
    fn usable(&self) -> bool {
        !self.sender.is_closed()
            && self.until.is_none_or(|until| Instant::now() < until)
            && !self.server.as_ref().is_some_and(|s| s.revoked())
    }
}

type Slot<B> = Arc<tokio::sync::Mutex<Option<Opened<B>>>>;

/// Why a pooled request failed.
#[derive(Debug)]
pub(crate) enum PoolError<E> {
    /// No connection could be made (the connect closure's reason).
    Connect(E),
    /// The request failed on the connection.
    Request(hyper::Error),
}

/// Pooled HTTP/2 connections keyed by `K`, carrying request bodies of type `B`.
pub(crate) struct Pool<K, B = Incoming> {
    slots: Mutex<HashMap<K, Slot<B>>>,
}

impl<K, B> Default for Pool<K, B> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, B> std::fmt::Debug for Pool<K, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.slots.lock().map_or(0, |s| s.len());
        f.debug_struct("Pool").field("keys", &open).finish()
    }
}

impl<K, B> Pool<K, B>
where
    K: Hash + Eq + Clone,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn slot(&self, key: &K) -> Slot<B> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// A ready sender for `key`: the pooled one, or a new connection from `connect` (one at a
    /// time per key: concurrent first requests wait for the same connection).
    async fn sender<E, F, Fut>(&self, key: &K, connect: &F, fresh: bool) -> Result<Sender<B>, E>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Opened<B>, E>>,
    {
        let slot = self.slot(key);
        let mut held = slot.lock().await;
        if !fresh && let Some(pooled) = held.as_ref().filter(|pooled| pooled.usable()) {
            metrics::counter!(crate::metric::H2_POOL, "event" => "reused").increment(1);
            return Ok(pooled.sender.clone());
        }
        let opened = Box::pin(connect()).await?;
        metrics::counter!(crate::metric::H2_POOL, "event" => "opened").increment(1);
        let sender = opened.sender.clone();
        *held = Some(opened);
        Ok(sender)
    }

    /// Sends `request` on the pooled connection for `key`, connecting with `connect` when there
    /// is none (or it closed).
    pub(crate) async fn send<E, F, Fut>(
        &self,
        key: &K,
        connect: F,
        request: Request<B>,
    ) -> Result<Response<Incoming>, PoolError<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Opened<B>, E>>,
    {
        let mut request = request;
        let mut fresh = false;
        loop {
            let mut sender = self
                .sender(key, &connect, fresh)
                .await
                .map_err(PoolError::Connect)?;
            if let Err(error) = sender.ready().await {
                if fresh {
                    return Err(PoolError::Request(error));
                }
                fresh = true;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    // Not sent: the connection was going away. Once more on a new one.
                    Some(unsent) if !fresh => {
                        request = unsent;
                        fresh = true;
                    }
                    _ => return Err(PoolError::Request(error.into_error())),
                },
            }
        }
    }
}
