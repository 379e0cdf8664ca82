//! Shared connections (ALPN `sidewall-mux/1`): one long-lived mTLS connection from a peer
//! sidecar carries many of its app's connections, each an HTTP/2 `CONNECT sidewall:<port>`
//! stream.
//!
//! Every stream is decided exactly like a new connection: the peer certificate's expiry and
//! revocation checked again, the port mapped through our own `inbound.ports`, the policy in
//! force *now* consulted, the decision counted and logged; then the app is connected, `200`
//! answered and bytes forwarded — registered for `onRevoke` and revocation like any
//! connection, and counted against `limits.maxConnections`. A refused stream gets a status
//! (`403` denied, `404` unknown port, `421` an HTTP port, `502` app unreachable, `503` at the
//! connection limit) and nothing reaches the app. HTTP/2 flow control is per stream, so a slow
//! reader stalls only its own stream.
//!
//! A peer that no policy lets reach any TCP port here has nothing to carry: its streams are
//! refused one by one, its connection stays in the handshake budget and is closed at
//! `limits.handshakeTimeout`. Any other must send the HTTP/2 preface and its first stream
//! within `limits.handshakeTimeout`, and a connection with no stream open for
//! `limits.idleTimeout` is closed (review M8).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use hyper::{Method, Request, Response, StatusCode};
use sidewall_policies::svid::{Svid, Usage, peer_svid};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::refused;
use crate::Context;
use crate::admit::{Arrival, admit};
use crate::identity::now_unix;
use crate::mux::HOST;
use crate::transport::ReadAhead;

/// Serves one shared connection until the peer closes it or its certificate expires.
pub(super) async fn serve(
    context: &Arc<Context>,
    stream: TlsStream<ReadAhead<TcpStream>>,
    remote: SocketAddr,
    redirected: Option<u16>,
    pending: crate::listen::Pending,
) {
    let mut pending = pending;
    let Some(peer) = peer_svid(stream.get_ref().1.peer_certificates(), Usage::Client) else {
        return refused(context, "no_certificate", remote, &"no client SVID");
    };
    if peer.expired(now_unix()) {
        return refused(context, "certificate_expired", remote, &peer.id);
    }
    // A peer that some policy lets reach a TCP port here holds an inbound permit for its
    // shared connection (each stream takes one more). One that no policy allows has nothing
    // to carry: its streams are refused one by one (counted, recorded as flows) while the
    // connection stays in the handshake budget, and it is closed at the handshake deadline.
    let limits = &context.config.limits;
    let expiry = peer.remaining(now_unix());
    let lifetime = if crate::admit::may_carry(context, &peer) {
        if !pending.authenticated(context) {
            return;
        }
        expiry
    } else {
        expiry.min(limits.handshake_timeout.0)
    };
    let _pending = pending;
    let peer = Arc::new(peer);
    let accept = streams(context, stream, peer.clone(), redirected, remote);
    tokio::select! {
        () = accept => {}
        () = tokio::time::sleep(lifetime) => {
            if lifetime < expiry {
                metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "shared_no_policy").increment(1);
                if let Some(folded) = crate::lograte::admit(peer.id.as_str(), 0, "shared_no_policy") {
                    tracing::info!(%remote, peer = %peer.id, folded, "shared connection closed: no policy lets this peer reach a TCP port here");
                }
            } else {
                tracing::info!(%remote, "peer certificate expired: shared connection closed");
            }
        }
    }
}

/// Accepts the streams of one shared connection, each decided on its own by [`carried`]: the
/// HTTP/2 preface, then a first stream, each within the handshake deadline; later, a
/// connection with no stream open for the idle timeout is closed.
async fn streams(
    context: &Arc<Context>,
    stream: TlsStream<ReadAhead<TcpStream>>,
    peer: Arc<Svid>,
    redirected: Option<u16>,
    remote: SocketAddr,
) {
    let limits = &context.config.limits;
    let streams = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let stream = crate::h2frames::watched(stream, peer.id.to_string(), 0);
    let handshake = crate::mux::server_builder(streams).handshake::<_, Bytes>(stream);
    let mut connection = match tokio::time::timeout(limits.handshake_timeout.0, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "shared connection: no HTTP/2 preface");
            return;
        }
        Err(_) => return refused(context, "timeout", remote, &"no HTTP/2 preface in time"),
    };
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut quiet_limit = limits.handshake_timeout.0;
    loop {
        let next = match tokio::time::timeout(quiet_limit, connection.accept()).await {
            Ok(next) => next,
            Err(_) if open.load(std::sync::atomic::Ordering::Acquire) > 0 => continue,
            Err(_) => {
                metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "shared_idle")
                    .increment(1);
                tracing::debug!(%remote, "shared connection closed: no stream in time");
                return;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                quiet_limit = limits.idle_timeout.0;
                let context = context.clone();
                let peer = peer.clone();
                let guard = Streaming::new(&open);
                tokio::spawn(async move {
                    let _guard = guard;
                    carried(context, peer, redirected, request, respond).await;
                });
            }
            Some(Err(error)) => {
                tracing::debug!(%remote, %error, "shared connection ended with an error");
                return;
            }
            None => return,
        }
    }
}

/// One open stream of a shared connection, counted while it lasts.
struct Streaming(Arc<std::sync::atomic::AtomicUsize>);

impl Streaming {
    fn new(open: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(open.clone())
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

fn stream_refused(
    respond: &mut SendResponse<Bytes>,
    reason: &'static str,
    peer: &Svid,
    status: StatusCode,
) {
    metrics::counter!(crate::metric::CARRIED_CONNECTIONS, "outcome" => reason).increment(1);
    tracing::info!(peer = %peer.id, reason, "carried connection refused");
    answer(respond, status);
}

/// One carried connection: decided like a new connection, then forwarded.
async fn carried(
    context: Arc<Context>,
    peer: Arc<Svid>,
    redirected: Option<u16>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let port = request
        .uri()
        .authority()
        .filter(|a| a.host() == HOST)
        .and_then(|a| a.port_u16())
        .filter(|p| *p != 0);
    let (Some(port), &Method::CONNECT) = (port, request.method()) else {
        return stream_refused(&mut respond, "bad_request", &peer, StatusCode::BAD_REQUEST);
    };
    let admission = match admit(&context, &peer, port, redirected, Arrival::Carried) {
        Ok(admission) => admission,
        Err(refusal) => return answer(&mut respond, refusal.http_status()),
    };
    let entry = admission.entry;
    let config = &context.config;
    let Ok(_permit) = context.permits.clone().try_acquire_owned() else {
        return stream_refused(
            &mut respond,
            "limit",
            &peer,
            StatusCode::SERVICE_UNAVAILABLE,
        );
    };
    let Some(app) = super::connect_app(&context, &entry).await else {
        return answer(&mut respond, StatusCode::BAD_GATEWAY);
    };
    let Ok(send) = respond.send_response(Response::new(()), false) else {
        return;
    };
    metrics::counter!(crate::metric::CARRIED_CONNECTIONS, "outcome" => "allowed").increment(1);
    let recv = request.into_body();
    let idle = config.limits.idle_timeout.0;
    let copy = async {
        match crate::mux::forward(app, send, recv, idle).await {
            Ok(counts) => {
                metrics::counter!(crate::metric::BYTES, "direction" => "inbound")
                    .increment(counts.a_to_b + counts.b_to_a);
                tracing::debug!(peer = %peer.id, port, to_app = counts.b_to_a, from_app = counts.a_to_b, idle = counts.idle, "carried connection closed");
            }
            Err(error) => {
                tracing::debug!(peer = %peer.id, %error, "carried connection ended with an error")
            }
        }
    };
    admission.supervise(copy).await;
}
