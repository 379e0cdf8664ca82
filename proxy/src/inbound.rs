//! The inbound listener: mTLS from peer sidecars, a decision before a single byte reaches the
//! app, then forwarding.
//!
//! ```text
//! accept (permit) → TLS (client SVID required, strict) → port header    [handshake thread]
//!   → crate::admit (expiry, port in inbound.ports, registered, snapshot now, revocation,
//!   Engine::decide_connection) → Refusal: its status byte, close │ Admission: connect the app,
//!   status Allowed, forward until EOF, idle, revocation (onRevoke) or the peer certificate's
//!   expiry
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sidewall_policies::svid::{Usage, peer_svid};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::Context;
use crate::admit::{Arrival, admit};
use crate::transport::{Status, forward, read_header, write_status};

mod mux;

/// Accepts until `stop` turns true.
pub(crate) async fn serve(
    context: Arc<Context>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    crate::listen::accept_loop(
        context,
        listener,
        stop,
        crate::listen::Budget::Inbound,
        |context, stream, remote, pending| async move {
            handle(&context, stream, remote, pending).await;
        },
    )
    .await;
}

pub(super) fn refused(
    context: &Context,
    reason: &'static str,
    remote: SocketAddr,
    detail: &dyn std::fmt::Display,
) {
    metrics::counter!(crate::metric::HANDSHAKE_FAILURES, "direction" => "inbound", "reason" => reason).increment(1);
    context.flows.refused(reason, remote.ip().to_canonical());
    if let Some(folded) = crate::lograte::admit(&remote.ip().to_string(), 0, reason) {
        tracing::info!(%remote, reason, %detail, folded, "inbound connection refused");
    }
}

async fn handle(
    context: &Arc<Context>,
    stream: TcpStream,
    remote: SocketAddr,
    mut pending: crate::listen::Pending,
) {
    let Some(tls) = context.tls.borrow().clone() else {
        // No certificate yet: fail closed.
        let why = &"the sidecar has no certificate yet";
        return refused(context, "no_local_certificate", remote, why);
    };
    if context.snapshot.borrow().is_none() {
        let why = &"the sidecar has no policy snapshot yet";
        return refused(context, "no_snapshot", remote, why);
    }
    let _ = stream.set_nodelay(true);
    let timeout = context.config.limits.handshake_timeout.0;
    // Transparent mode: a connection redirected from an app port carries that port as its
    // original destination.
    let redirected_port = crate::transport::original_destination(&stream)
        .ok()
        .filter(|d| d.port() != context.config.inbound.listen.port())
        .map(|d| d.port());
    if !starts_with_tls(&stream, timeout).await {
        return plaintext(context, stream, remote, redirected_port, pending).await;
    }
    let handshake = handshake(&tls, stream, timeout).await;
    if let Ok((stream, _)) = &handshake {
        let connection = stream.get_ref().1;
        context.flows.handshake(
            connection
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("unknown"),
            connection
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or("unknown"),
        );
    }
    match handshake {
        Ok((stream, Some(port)))
            if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_PROBE) =>
        {
            crate::probe::answer(context, stream, port).await
        }
        // Authenticated: out of the handshake budget, into the inbound one (a shared
        // connection decides that itself, see `mux::serve`).
        Ok((_, Some(_))) if !pending.authenticated(context) => {}
        Ok((stream, Some(port))) => direct(context, stream, remote, port, redirected_port).await,
        Ok((stream, None)) => mux::serve(context, stream, remote, redirected_port, pending).await,
        Err((reason, detail)) => refused(context, reason, remote, &detail),
    }
}

/// An inbound connection after its handshake.
type Tls = tokio_rustls::server::TlsStream<crate::transport::ReadAhead<TcpStream>>;

/// The TLS handshake and, on a connection of its own, the port header, within `timeout` and
/// on the handshake thread (see `crate::handshakes`: a flood of handshakes does not queue the
/// authenticated connections' work). `None` for the port: a shared connection.
async fn handshake(
    tls: &crate::tls::TlsSet,
    stream: TcpStream,
    timeout: Duration,
) -> Result<(Tls, Option<u16>), (&'static str, String)> {
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let handshake = async move {
        let mut stream = acceptor
            .accept(crate::transport::ReadAhead::new(stream))
            .await
            .map_err(|e| (sidewall_policies::svid::io_failure_label(&e), e.to_string()))?;
        let alpn = stream.get_ref().1.alpn_protocol();
        if alpn == Some(crate::tls::ALPN_MUX) || alpn == Some(crate::tls::ALPN_H2) {
            // A long-lived shared connection: worth gathering reads and writes.
            stream.get_mut().0.enable();
        } else {
            // A connection per app connection: read ahead only while it carries a bulk transfer.
            stream.get_mut().0.adapt();
        }
        if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_MUX) {
            // A shared connection: each stream names its port and is decided on its own.
            return Ok((stream, None));
        }
        let port = read_header(&mut stream)
            .await
            .map_err(|e| ("bad_header", e.to_string()))?;
        Ok((stream, Some(port)))
    };
    match crate::handshakes::run(tokio::time::timeout(timeout, handshake)).await {
        None => Err(("internal", "the handshake task was lost".into())),
        Some(Ok(outcome)) => outcome,
        Some(Err(_)) => Err(("timeout", "handshake or port header too slow".into())),
    }
}

/// A peer's connection of its own to `port`: admitted (or answered with the refusal's status
/// byte), then served as HTTP requests or forwarded to the app.
async fn direct(
    context: &Arc<Context>,
    mut stream: Tls,
    remote: SocketAddr,
    port: u16,
    redirected_port: Option<u16>,
) {
    let Some(peer) = peer_svid(stream.get_ref().1.peer_certificates(), Usage::Client) else {
        return refused(context, "no_certificate", remote, &"no client SVID");
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
    let admission = match admit(
        context,
        &peer,
        port,
        redirected_port,
        Arrival::Direct { h2 },
    ) {
        Ok(admission) => admission,
        Err(refusal) => {
            if let Some(status) = refusal.status() {
                let _ = write_status(&mut stream, status).await;
            }
            return;
        }
    };
    let entry = admission.entry;
    let limits = &context.config.limits;
    if entry.protocol == sidewall_policies::Protocol::Http {
        // The connection may carry requests: each is decided on its own from here on.
        if write_status(&mut stream, Status::Allowed).await.is_err() {
            return;
        }
        let first = crate::http::FirstRequest {
            within: limits.handshake_timeout.0,
            pending: None,
        };
        let peer = Some(peer.id.clone());
        let serve = crate::http::serve(context.clone(), stream, peer, entry, remote, h2, first);
        return admission.supervise(serve).await;
    }
    let Some(app) = connect_app(context, &entry).await else {
        let _ = write_status(&mut stream, Status::AppUnavailable).await;
        return;
    };
    if write_status(&mut stream, Status::Allowed).await.is_err() {
        return;
    }
    let copy = async {
        match forward(stream, app, limits.idle_timeout.0).await {
            Ok(counts) => {
                metrics::counter!(crate::metric::BYTES, "direction" => "inbound")
                    .increment(counts.a_to_b + counts.b_to_a);
                tracing::debug!(peer = %peer.id, port, to_app = counts.a_to_b, from_app = counts.b_to_a, idle = counts.idle, "connection closed");
            }
            Err(error) => {
                tracing::debug!(peer = %peer.id, %error, "connection ended with an error")
            }
        }
    };
    admission.supervise(copy).await;
}

/// Connects to the app behind `entry` within `limits.connectTimeout`; `None`, logged, when it
/// does not answer (the peer is then told the app is unavailable).
pub(crate) async fn connect_app(
    context: &Context,
    entry: &crate::config::InboundPort,
) -> Option<TcpStream> {
    let within = context.config.limits.connect_timeout.0;
    match tokio::time::timeout(within, TcpStream::connect(entry.app)).await {
        Ok(Ok(app)) => {
            let _ = app.set_nodelay(true);
            Some(app)
        }
        Ok(Err(error)) => {
            tracing::warn!(app = %entry.app, %error, "app unreachable");
            None
        }
        Err(_) => {
            tracing::warn!(app = %entry.app, "app connect timed out");
            None
        }
    }
}

/// Whether the first byte is a TLS handshake record (waits up to `timeout` for it).
async fn starts_with_tls(stream: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == 0x16,
        // Nothing sent yet (a server-speaks-first protocol) or closed: not a TLS client.
        _ => false,
    }
}

/// A connection that is not TLS: refused, unless it was redirected from an app port the
/// config marks `permissive` (transparent mode, during a migration).
async fn plaintext(
    context: &Arc<Context>,
    stream: TcpStream,
    remote: SocketAddr,
    port: Option<u16>,
    mut pending: crate::listen::Pending,
) {
    let config = &context.config;
    let Some(entry) = port
        .and_then(|p| config.inbound_port(p))
        .filter(|e| e.permissive)
    else {
        return refused(
            context,
            "not_tls",
            remote,
            &"plaintext on an mTLS port (not permissive)",
        );
    };
    metrics::counter!(crate::metric::PLAINTEXT_ACCEPTED, "port" => entry.port.to_string())
        .increment(1);
    context.flows.plaintext(entry.port);
    tracing::info!(%remote, port = entry.port, "plaintext accepted on a permissive port (no identity, no policy)");
    if entry.protocol == sidewall_policies::Protocol::Http {
        // Unauthenticated: it holds a handshake slot until its first request is in.
        let first = crate::http::FirstRequest {
            within: config.limits.handshake_timeout.0,
            pending: Some(pending),
        };
        crate::http::serve(context.clone(), stream, None, *entry, remote, false, first).await;
        return;
    }
    if !pending.authenticated(context) {
        return;
    }
    let Some(app) = connect_app(context, entry).await else {
        return;
    };
    // Plain TCP on both sides: the bytes never enter the process.
    let _ = crate::transport::forward_spliced(stream, app, config.limits.idle_timeout.0).await;
}
