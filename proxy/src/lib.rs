//! The Sidewall sidecar: the only way into and out of a service.
//!
//! - [`config`]: the strict YAML configuration.
//! - [`identity`]: the key pair generated here (only a CSR leaves), joining with a token
//!   (pinning the CA), renewal at 70 % with a new key each time, the state directory.
//! - [`distribution`]: snapshots from the control plane (register, watch, ack, flows).
//! - [`snapshot`]: the snapshot enforced, or built from local files (`local:`).
//! - [`tls`]: rustls configurations from the credential and the snapshot; strict SVID checks.
//! - [`inbound`]: the mTLS listener; a decision before any byte reaches the app.
//! - [`http`]: HTTP ports: request checks, normalization, a decision per request.
//! - [`outbound`]: explicit routes to other services, verifying the expected identity.
//! - [`transport`]: the port header between sidecars and the forwarding copy.
//! - [`admit`]: the one admission path: a peer connection decided on the snapshot in force.
//! - [`connections`]: open connections, re-checked when the snapshot changes (`onRevoke`).
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/config`.
//! - [`redirect`]: the iptables rules of transparent mode (`sidewall iptables install`).
//!
//! [`run`] takes bound listeners and a shutdown future. It depends on `sidewall-policies` for
//! the engine, the snapshot and the SVID rules, and never on the control plane.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub mod admin;
pub mod admit;
pub mod config;
pub mod connections;
pub mod distribution;
pub mod h2frames;
mod handshakes;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod listen;
pub mod lograte;
mod mux;
pub mod outbound;
pub mod redirect;
pub mod snapshot;
pub mod tls;
pub mod transport;

/// Entry points for the fuzz targets in `fuzz/` into what is not public otherwise; not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Feeds `input` to the HTTP/1 request framing scanner in pieces of `step` bytes; which of
    /// the first `count` requests it would refuse.
    pub fn http_framing(input: &[u8], step: usize, count: usize) -> Vec<bool> {
        crate::http::framing::refused(input, step, count)
    }
}

use config::Config;
use connections::{CloseReason, Table};
use identity::Credential;
use snapshot::Active;
use tls::TlsSet;

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
    pub flows: distribution::Flows,
    /// The control plane URL the snapshot stream is open to, if any.
    pub control_plane: std::sync::Mutex<Option<String>>,
    /// The pooled client to the apps behind HTTP ports (HTTP/1.1).
    pub app_client: http::AppClient,
    /// HTTP/2 connections to apps that speak it (`appProtocol: http2`), by app address.
    pub(crate) app_h2: http::pool::Pool<std::net::SocketAddr>,
    /// HTTP/2 connections to peer sidecars (ALPN `sidewall-h2/1`), by service and port.
    pub(crate) peers_h2: http::pool::Pool<(sidewall_policies::SpiffeId, u16)>,
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
            flows: distribution::Flows::default(),
            control_plane: std::sync::Mutex::new(None),
            app_client: http::app_client(),
            app_h2: http::pool::Pool::default(),
            peers_h2: http::pool::Pool::default(),
            peers_mux: mux::Pool::default(),
            config,
        }
    }
}

/// The bound sockets, in the order of the configuration.
pub struct Listeners {
    /// `inbound.listen`.
    pub inbound: TcpListener,
    /// One per `outbound.routes` entry, same order.
    pub routes: Vec<TcpListener>,
    /// `admin.listen`.
    pub admin: TcpListener,
    /// `outbound.transparent.listen`, when transparent mode is on.
    pub transparent: Option<TcpListener>,
}

/// Binds every listener of `config`.
pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
    let with = |addr: std::net::SocketAddr| {
        move |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
        }
    };
    let inbound = TcpListener::bind(config.inbound.listen)
        .await
        .map_err(with(config.inbound.listen))?;
    let mut routes = Vec::new();
    for route in &config.outbound.routes {
        routes.push(
            TcpListener::bind(route.listen)
                .await
                .map_err(with(route.listen))?,
        );
    }
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .map_err(with(config.admin.listen))?;
    let transparent = match config.outbound.transparent {
        Some(transparent) => Some(
            TcpListener::bind(transparent.listen)
                .await
                .map_err(with(transparent.listen))?,
        ),
        None => None,
    };
    Ok(Listeners {
        inbound,
        routes,
        admin,
        transparent,
    })
}

/// A random id for this sidecar process.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rebuilds the TLS configurations whenever the credential or the snapshot changes, and
/// re-checks open connections when the snapshot changes.
async fn follow(
    context: Arc<Context>,
    mut credential: watch::Receiver<Option<Arc<Credential>>>,
    mut snapshot: watch::Receiver<Option<Arc<Active>>>,
    tls: watch::Sender<Option<Arc<TlsSet>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = credential.borrow_and_update().clone();
        let active = snapshot.borrow_and_update().clone();
        if let Some(current) = current {
            let revocations = active
                .as_ref()
                .map(|a| a.snapshot.revocations.clone())
                .unwrap_or_default();
            let bundles = active
                .as_ref()
                .map(|a| a.snapshot.trust_bundles.clone())
                .unwrap_or_default();
            match TlsSet::new(
                current,
                revocations,
                &bundles,
                context.config.tls.allow_tls12,
            ) {
                Ok(set) => {
                    let _ = tls.send(Some(Arc::new(set)));
                }
                Err(error) => tracing::error!(%error, "cannot build the TLS configuration"),
            }
        }
        tokio::select! {
            changed = credential.changed() => if changed.is_err() { return },
            changed = snapshot.changed() => {
                if changed.is_err() { return }
                if let Some(active) = snapshot.borrow().clone() {
                    let closed = context.connections.reevaluate(&context.config.identity, &active);
                    if closed > 0 {
                        tracing::info!(connections = closed, "open connections no longer allowed: onRevoke applied");
                    }
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Runs the sidecar until `shutdown` resolves; then stops accepting, lets open connections
/// finish for up to `limits.drainTimeout`, and closes the rest.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) {
    let config = Arc::new(config);
    transport::set_mark(config.outbound.mark);
    for port in &config.inbound.ports {
        if !port.app.ip().is_loopback() {
            tracing::warn!(app = %port.app, "app address is not loopback: the app may be reachable without the sidecar");
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (credential_tx, credential_rx) =
        watch::channel(identity::load_saved(&config).map(Arc::new));
    let saved = match config.local {
        Some(_) => None,
        None => distribution::load_saved(&config.state_dir, &config.identity).map(Arc::new),
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(saved);
    let (tls_tx, tls_rx) = watch::channel(None);
    let context = Arc::new(Context::new(
        config.clone(),
        tls_rx,
        snapshot_rx.clone(),
        stop_rx.clone(),
    ));
    let distributor = match config.local.clone() {
        Some(local) => {
            tokio::spawn(snapshot::watch_local(
                local,
                config.identity.clone(),
                snapshot_tx,
                stop_rx.clone(),
            ));
            None
        }
        None => Some(tokio::spawn(distribution::run(
            context.clone(),
            credential_rx.clone(),
            snapshot_tx,
            stop_rx.clone(),
        ))),
    };
    tokio::spawn(identity::maintain(
        config.clone(),
        credential_tx,
        stop_rx.clone(),
    ));
    tokio::spawn(follow(
        context.clone(),
        credential_rx,
        snapshot_rx,
        tls_tx,
        stop_rx.clone(),
    ));
    let mut tasks = vec![tokio::spawn(inbound::serve(
        context.clone(),
        listeners.inbound,
        stop_rx.clone(),
    ))];
    for (route, listener) in config.outbound.routes.iter().zip(listeners.routes) {
        tasks.push(tokio::spawn(outbound::serve(
            context.clone(),
            route.clone(),
            listener,
            stop_rx.clone(),
        )));
    }
    if let Some(listener) = listeners.transparent {
        tasks.push(tokio::spawn(outbound::serve_transparent(
            context.clone(),
            listener,
            stop_rx.clone(),
        )));
    }
    let admin = tokio::spawn(admin::serve(
        context.clone(),
        listeners.admin,
        metrics,
        stop_rx.clone(),
    ));
    tracing::info!(identity = %config.identity, inbound = %config.inbound.listen, routes = config.outbound.routes.len(), "sidecar started");

    shutdown.await;
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let drain = config.limits.drain_timeout.0;
    let deadline = tokio::time::Instant::now() + drain;
    while !context.connections.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !context.connections.is_empty() {
        tracing::warn!(
            open = context.connections.len(),
            "drain period over: closing the remaining connections"
        );
        context.connections.close_all(CloseReason::Shutdown);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(task) = distributor {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    admin.abort();
    tracing::info!("sidecar stopped");
}
