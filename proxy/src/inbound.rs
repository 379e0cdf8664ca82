//! The inbound listener: mTLS from peer sidecars, a decision before a single byte reaches the
//! app, then forwarding.
//!
//! ```text
//! accept (permit) → TLS (client SVID required, strict) → port header → port in inbound.ports?
//!   → Engine::decide_connection(peer, self, port, protocol from OUR config) → Deny: status, log,
//!   metric, close │ Allow/Audit: connect the app, status Allowed, forward until EOF, idle,
//!   revocation (onRevoke) or the peer certificate's expiry
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sidewall_policies::svid::{Usage, peer_svid};
use sidewall_policies::{Decision, Outcome};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::Context;
use crate::connections::CloseReason;
use crate::identity::now_unix;
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
        "inbound",
        |context, stream, remote| async move {
            handle(&context, stream, remote).await;
        },
    )
    .await;
}

pub(super) fn refused(reason: &'static str, remote: SocketAddr, detail: &dyn std::fmt::Display) {
    metrics::counter!("sidewall_proxy_handshake_failures_total", "direction" => "inbound", "reason" => reason).increment(1);
    tracing::info!(%remote, reason, %detail, "inbound connection refused");
}

pub(super) fn record(decision: &Decision) {
    let outcome = match decision.outcome {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::Audit => "audit",
    };
    let policy = decision
        .reason
        .as_ref()
        .map_or_else(|| "-".to_owned(), |r| r.policy.to_string());
    metrics::counter!("sidewall_proxy_authorizations_total", "outcome" => outcome, "policy" => policy).increment(1);
}

async fn handle(context: &Arc<Context>, stream: TcpStream, remote: SocketAddr) {
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
    let Some(active) = context.snapshot.borrow().clone() else {
        refused(
            "no_snapshot",
            remote,
            &"the sidecar has no policy snapshot yet",
        );
        return;
    };
    let _ = stream.set_nodelay(true);
    let timeout = config.limits.handshake_timeout.0;
    // Transparent mode: a connection redirected from an app port carries that port as its
    // original destination.
    let redirected_port = crate::transport::original_destination(&stream)
        .ok()
        .filter(|d| d.port() != config.inbound.listen.port())
        .map(|d| d.port());
    if !starts_with_tls(&stream, timeout).await {
        return plaintext(context, stream, remote, redirected_port).await;
    }
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let handshake = async {
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
    let (mut stream, port) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok((stream, Some(port)))) => (stream, port),
        Ok(Ok((stream, None))) => {
            return mux::serve(context, stream, remote, redirected_port).await;
        }
        Ok(Err((reason, detail))) => return refused(reason, remote, &detail),
        Err(_) => return refused("timeout", remote, &"handshake or port header too slow"),
    };
    if redirected_port.is_some_and(|original| original != port) {
        return refused(
            "port_mismatch",
            remote,
            &"the port header differs from the port the connection was sent to",
        );
    }
    let Some(peer) = peer_svid(stream.get_ref().1.peer_certificates(), Usage::Client) else {
        return refused("no_certificate", remote, &"no client SVID");
    };
    // A resumed session skips certificate verification: expiry is checked here every time.
    if peer.not_after <= now_unix() {
        return refused("certificate_expired", remote, &peer.id);
    }
    let Some(entry) = config.inbound_port(port) else {
        metrics::counter!("sidewall_proxy_authorizations_total", "outcome" => "unknown_port", "policy" => "-").increment(1);
        tracing::warn!(peer = %peer.id, port, "peer asked for a port this sidecar does not serve");
        let _ = write_status(&mut stream, Status::UnknownPort).await;
        return;
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
    if h2 && entry.protocol != sidewall_policies::Protocol::Http {
        metrics::counter!("sidewall_proxy_authorizations_total", "outcome" => "not_http", "policy" => "-").increment(1);
        tracing::warn!(peer = %peer.id, port, "peer asked for HTTP/2 on a port that is not an HTTP port here");
        let _ = write_status(&mut stream, Status::NotHttp).await;
        return;
    }
    let Some(on_revoke) = decide(context, &active, &peer.id, port, entry.protocol) else {
        let _ = write_status(&mut stream, Status::Denied).await;
        return;
    };
    if entry.protocol == sidewall_policies::Protocol::Http {
        // The connection may carry requests: each is decided on its own from here on.
        if write_status(&mut stream, Status::Allowed).await.is_err() {
            return;
        }
        let serve = crate::http::serve(
            context.clone(),
            stream,
            Some(peer.id.clone()),
            *entry,
            remote,
            h2,
        );
        supervise(context, &peer, port, entry.protocol, on_revoke, serve).await;
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
    supervise(context, &peer, port, entry.protocol, on_revoke, copy).await;
}

/// The connection-level decision for `peer` on `port` with the snapshot in force: counted,
/// logged, and its flow recorded (HTTP ports count each request instead, see `crate::http`;
/// a denied connection counts here). `None` when denied; otherwise what `onRevoke` says for
/// the policy that allowed it.
pub(super) fn decide(
    context: &Context,
    active: &crate::snapshot::Active,
    peer: &sidewall_policies::SpiffeId,
    port: u16,
    protocol: sidewall_policies::Protocol,
) -> Option<sidewall_policies::policy::OnRevoke> {
    let target = &context.config.identity;
    let decision = active
        .engine
        .decide_connection(peer, target, port, protocol);
    record(&decision);
    if protocol == sidewall_policies::Protocol::Tcp || !decision.permits() {
        context
            .flows
            .count(peer.as_str(), port, protocol, None, &decision);
    }
    if !decision.permits() {
        tracing::warn!(%peer, %target, port, %decision, "connection denied");
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

/// Runs an authorized connection's `work` while it is registered for re-evaluation: it ends
/// when the work ends, when the sidecar closes it (`onRevoke`, revocation, shutdown), or when
/// the peer certificate it was authorized with expires.
pub(super) async fn supervise(
    context: &Context,
    peer: &sidewall_policies::svid::Svid,
    port: u16,
    protocol: sidewall_policies::Protocol,
    on_revoke: sidewall_policies::policy::OnRevoke,
    work: impl std::future::Future<Output = ()>,
) {
    let mut registration = context.connections.register(
        peer.id.clone(),
        peer.serial.clone(),
        port,
        protocol,
        on_revoke,
    );
    let expiry = Duration::from_secs(u64::try_from(peer.not_after - now_unix()).unwrap_or(0));
    tokio::select! {
        () = work => {}
        reason = registration.closed.wait_for(Option::is_some) => {
            let label = reason.ok().and_then(|r| *r).map_or("closed", CloseReason::label);
            metrics::counter!("sidewall_proxy_connections_closed_total", "reason" => label).increment(1);
            tracing::info!(peer = %peer.id, port, reason = label, "connection closed by the sidecar");
        }
        () = tokio::time::sleep(expiry) => {
            metrics::counter!("sidewall_proxy_connections_closed_total", "reason" => "peer_certificate_expired").increment(1);
            tracing::info!(peer = %peer.id, port, "peer certificate expired: connection closed");
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
        crate::http::serve(context.clone(), stream, None, *entry, remote, false).await;
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
