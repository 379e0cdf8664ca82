//! [`Context`]: what every task of one sidecar shares (configuration, credential and snapshot
//! watches, connection tables and budgets, pools), built once by [`Context::new`].

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::connections::Table;
use crate::snapshot::Active;
use crate::tls::TlsSet;
use crate::{http, listen, mux};

/// Shared by every task of one sidecar.
pub struct Context {
    /// The configuration.
    pub config: Arc<Config>,
    /// The current TLS configurations (`None` until there is a certificate).
    pub tls: watch::Receiver<Option<Arc<TlsSet>>>,
    /// The current snapshot.
    pub snapshot: watch::Receiver<Option<Arc<Active>>>,
    /// Open inbound connections.
    pub connections: Table,
    /// Authenticated inbound connections (`limits.maxConnections`).
    pub permits: Arc<Semaphore>,
    /// Outbound connections (`limits.maxConnections`, a budget of their own).
    pub outbound_permits: Arc<Semaphore>,
    /// Inbound connections not yet authenticated (`limits.maxHandshakes`).
    pub handshakes: Arc<Semaphore>,
    /// Those per source address (`limits.handshakesPerSource`).
    pub sources: Arc<listen::Sources>,
    /// True once shutdown has begun.
    pub stopping: watch::Receiver<bool>,
    /// This sidecar process's id in the control plane's fleet view.
    pub instance: String,
    /// Decision counts since the last report to the control plane.
    pub flows: crate::flows::Flows,
    /// The control plane URL the snapshot stream is open to, if any.
    pub control_plane: std::sync::Mutex<Option<String>>,
    /// The pooled client to the apps behind HTTP ports (HTTP/1.1).
    pub app_client: http::AppClient,
    /// HTTP/2 connections to apps that speak it (`appProtocol: http2`), by app address.
    pub(crate) app_h2: crate::pool::Pool<std::net::SocketAddr, crate::pool::HyperSender>,
    /// HTTP/2 connections to peer sidecars (ALPN `sidewall-h2/1`), by service and port.
    pub(crate) peers_h2:
        crate::pool::Pool<(sidewall_policies::SpiffeId, u16), crate::pool::HyperSender>,
    /// Pooled connections to peer sidecars that the peer closed, by service and port: the
    /// app's HTTP connections that rode them close too, once idle.
    pub(crate) peers_h2_closed: crate::outbound::http::Closed,
    /// Shared connections carrying app connections to TCP ports (ALPN `sidewall-mux/1`), by
    /// service.
    pub(crate) peers_mux: mux::Pool,
}

impl Context {
    /// A sidecar's state for `config`, following the TLS configurations, the snapshot and the
    /// shutdown flag it is given; connection tables, budgets and pools start empty.
    pub(crate) fn new(
        config: Arc<Config>,
        tls: watch::Receiver<Option<Arc<TlsSet>>>,
        snapshot: watch::Receiver<Option<Arc<Active>>>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Context {
            tls,
            snapshot,
            connections: Table::default(),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            outbound_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(config.limits.max_handshakes)),
            sources: Arc::default(),
            stopping,
            instance: instance_id(),
            flows: crate::flows::Flows::default(),
            control_plane: std::sync::Mutex::new(None),
            app_client: http::app_client(),
            app_h2: crate::pool::Pool::default(),
            peers_h2: crate::pool::Pool::default(),
            peers_h2_closed: crate::outbound::http::Closed::default(),
            peers_mux: mux::pool(),
            config,
        }
    }
}

/// A random id for this sidecar process.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
