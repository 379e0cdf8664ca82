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

pub(super) fn refused(reason: &'static str, remote: SocketAddr, detail: &dyn std::fmt::Display) {
    metrics::counter!("sidewall_proxy_handshake_failures_total", "direction" => "inbound", "reason" => reason).increment(1);
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
    let config = &context.config;
    let Some(tls) = context.tls.borrow().clone() else {
        // No certificate yet: fail closed.
        refused(
            "no_local_certificate",
            remote,
            &"the sidecar has no certificate yet",
        );
        return;
    };
    if context.snapshot.borrow().is_none() {
        refused(
            "no_snapshot",
            remote,
            &"the sidecar has no policy snapshot yet",
        );
        return;
    }
    let _ = stream.set_nodelay(true);
    let timeout = config.limits.handshake_timeout.0;
    // Transparent mode: a connection redirected from an app port carries that port as its
    // original destination.
    let redirected_port = crate::transport::original_destination(&stream)
        .ok()
        .filter(|d| d.port() != config.inbound.listen.port())
        .map(|d| d.port());
    if !starts_with_tls(&stream, timeout).await {
        return plaintext(context, stream, remote, redirected_port, pending).await;
    }
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
            return Ok::<_, (&'static str, String)>((stream, None));
        }
        let port = read_header(&mut stream)
            .await
            .map_err(|e| ("bad_header", e.to_string()))?;
        Ok((stream, Some(port)))
    };
    // On the handshake thread (see `crate::handshakes`): a flood of handshakes does not queue
    // the authenticated connections' work.
    let Some(outcome) = crate::handshakes::run(tokio::time::timeout(timeout, handshake)).await
    else {
        return refused("internal", remote, &"the handshake task was lost");
    };
    let (mut stream, port) = match outcome {
        // Authenticated: out of the handshake budget, into the inbound one (a shared
        // connection decides that itself, see `mux::serve`).
        Ok(Ok((_, Some(_)))) if !pending.authenticated(context) => return,
        Ok(Ok((stream, Some(port)))) => (stream, port),
        Ok(Ok((stream, None))) => {
            return mux::serve(context, stream, remote, redirected_port, pending).await;
        }
        Ok(Err((reason, detail))) => return refused(reason, remote, &detail),
        Err(_) => return refused("timeout", remote, &"handshake or port header too slow"),
    };
    let Some(peer) = peer_svid(stream.get_ref().1.peer_certificates(), Usage::Client) else {
        return refused("no_certificate", remote, &"no client SVID");
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
    if entry.protocol == sidewall_policies::Protocol::Http {
        // The connection may carry requests: each is decided on its own from here on.
        if write_status(&mut stream, Status::Allowed).await.is_err() {
            return;
        }
        let serve = crate::http::serve(
            context.clone(),
            stream,
            Some(peer.id.clone()),
            entry,
            remote,
            h2,
            crate::http::FirstRequest {
                within: timeout,
                pending: None,
            },
        );
        admission.supervise(serve).await;
        return;
    }
    let app = match tokio::time::timeout(
        config.limits.connect_timeout.0,
        TcpStream::connect(entry.app),
    )
    .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            tracing::warn!(app = %entry.app, %error, "app unreachable");
            let _ = write_status(&mut stream, Status::AppUnavailable).await;
            return;
        }
        Err(_) => {
            tracing::warn!(app = %entry.app, "app connect timed out");
            let _ = write_status(&mut stream, Status::AppUnavailable).await;
            return;
        }
    };
    let _ = app.set_nodelay(true);
    if write_status(&mut stream, Status::Allowed).await.is_err() {
        return;
    }
    let copy = async {
        match forward(stream, app, config.limits.idle_timeout.0).await {
            Ok(counts) => {
                metrics::counter!("sidewall_proxy_bytes_total", "direction" => "inbound")
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
            "not_tls",
            remote,
            &"plaintext on an mTLS port (not permissive)",
        );
    };
    metrics::counter!("sidewall_proxy_plaintext_accepted_total", "port" => entry.port.to_string())
        .increment(1);
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
    let Ok(Ok(app)) = tokio::time::timeout(
        config.limits.connect_timeout.0,
        TcpStream::connect(entry.app),
    )
    .await
    else {
        tracing::warn!(app = %entry.app, "app unreachable");
        return;
    };
    // Plain TCP on both sides: the bytes never enter the process.
    let _ = crate::transport::forward_spliced(stream, app, config.limits.idle_timeout.0).await;
}
