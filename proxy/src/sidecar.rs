//! The sidecar's run loop: binding the listeners, then [`run`] until shutdown, with the task
//! that follows the credential and the snapshot ([`follow`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::connections::CloseReason;
use crate::identity::Credential;
use crate::snapshot::Active;
use crate::tls::TlsSet;
use crate::{Context, admin, distribution, identity, inbound, outbound, snapshot, transport};

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
    metrics: Option<crate::metric::Render>,
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
        Some(snapshot_rx.clone()),
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
