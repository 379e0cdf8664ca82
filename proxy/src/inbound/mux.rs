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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sidewall_policies::svid::{Svid, Usage, peer_svid};
use sidewall_policies::{Outcome, Protocol};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{record, refused, supervise};
use crate::Context;
use crate::identity::now_unix;

/// The host every stream names: only the port means anything.
const HOST: &str = "sidewall";

/// Serves one shared connection until the peer closes it or its certificate expires.
pub(super) async fn serve(
    context: &Arc<Context>,
    stream: TlsStream<TcpStream>,
    remote: SocketAddr,
    redirected: Option<u16>,
) {
    let Some(peer) = peer_svid(stream.get_ref().1.peer_certificates(), Usage::Client) else {
        return refused("no_certificate", remote, &"no client SVID");
    };
    if peer.not_after <= now_unix() {
        return refused("certificate_expired", remote, &peer.id);
    }
    let expiry = Duration::from_secs(u64::try_from(peer.not_after - now_unix()).unwrap_or(0));
    let peer = Arc::new(peer);
    let streams_context = context.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let context = streams_context.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(carried(context, peer, redirected, request).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(
            u32::try_from(context.config.limits.max_connections).unwrap_or(u32::MAX),
        )
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .max_header_list_size(4096)
        .max_pending_accept_reset_streams(crate::http::MAX_PENDING_RESETS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%remote, %error, "shared connection ended with an error");
            }
        }
        () = tokio::time::sleep(expiry) => {
            tracing::info!(%remote, "peer certificate expired: shared connection closed");
        }
    }
}

fn answer(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    response
}

fn stream_refused(reason: &'static str, peer: &Svid, status: StatusCode) -> Response<Empty<Bytes>> {
    metrics::counter!("sidewall_proxy_carried_connections_total", "outcome" => reason).increment(1);
    tracing::info!(peer = %peer.id, reason, "carried connection refused");
    answer(status)
}

/// One carried connection: decided, then forwarded once hyper hands over the stream.
async fn carried(
    context: Arc<Context>,
    peer: Arc<Svid>,
    redirected: Option<u16>,
    mut request: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let port = request
        .uri()
        .authority()
        .filter(|a| a.host() == HOST)
        .and_then(|a| a.port_u16())
        .filter(|p| *p != 0);
    let (Some(port), &Method::CONNECT) = (port, request.method()) else {
        return stream_refused("bad_request", &peer, StatusCode::BAD_REQUEST);
    };
    if peer.not_after <= now_unix() {
        return stream_refused("certificate_expired", &peer, StatusCode::FORBIDDEN);
    }
    if redirected.is_some_and(|original| original != port) {
        return stream_refused("port_mismatch", &peer, StatusCode::FORBIDDEN);
    }
    let Some(active) = context.snapshot.borrow().clone() else {
        return stream_refused("no_snapshot", &peer, StatusCode::SERVICE_UNAVAILABLE);
    };
    if active
        .snapshot
        .revocations
        .is_revoked(&peer.id, &peer.serial)
    {
        return stream_refused("revoked", &peer, StatusCode::FORBIDDEN);
    }
    let config = &context.config;
    let Some(entry) = config.inbound_port(port).copied() else {
        metrics::counter!("sidewall_proxy_authorizations_total", "outcome" => "unknown_port", "policy" => "-").increment(1);
        tracing::warn!(peer = %peer.id, port, "peer asked for a port this sidecar does not serve");
        return answer(StatusCode::NOT_FOUND);
    };
    if entry.protocol != Protocol::Tcp {
        metrics::counter!("sidewall_proxy_authorizations_total", "outcome" => "not_tcp", "policy" => "-").increment(1);
        tracing::warn!(peer = %peer.id, port, "peer carried a connection to an HTTP port (HTTP goes as requests)");
        return answer(StatusCode::MISDIRECTED_REQUEST);
    }
    let decision =
        active
            .engine
            .decide_connection(&peer.id, &config.identity, port, entry.protocol);
    record(&decision);
    context
        .flows
        .count(peer.id.as_str(), port, entry.protocol, None, &decision);
    if !decision.permits() {
        tracing::warn!(peer = %peer.id, target = %config.identity, port, %decision, "connection denied");
        return answer(StatusCode::FORBIDDEN);
    }
    if decision.outcome == Outcome::Audit || decision.shadow.is_some() {
        tracing::info!(peer = %peer.id, port, decision = %decision.to_string().replace('\n', "; "), "audit");
    }
    let on_revoke = decision
        .reason
        .as_ref()
        .and_then(|r| active.snapshot.policies.get(r.policy.as_str()))
        .map(|p| p.on_revoke)
        .unwrap_or_default();
    let Ok(permit) = context.permits.clone().try_acquire_owned() else {
        return stream_refused("limit", &peer, StatusCode::SERVICE_UNAVAILABLE);
    };
    let app = match tokio::time::timeout(
        config.limits.connect_timeout.0,
        TcpStream::connect(entry.app),
    )
    .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            tracing::warn!(app = %entry.app, %error, "app unreachable");
            return answer(StatusCode::BAD_GATEWAY);
        }
        Err(_) => {
            tracing::warn!(app = %entry.app, "app connect timed out");
            return answer(StatusCode::BAD_GATEWAY);
        }
    };
    let _ = app.set_nodelay(true);
    metrics::counter!("sidewall_proxy_carried_connections_total", "outcome" => "allowed")
        .increment(1);
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _permit = permit;
        let Ok(stream) = upgrade.await else {
            return;
        };
        let idle = context.config.limits.idle_timeout.0;
        let copy = async {
            match crate::transport::forward(TokioIo::new(stream), app, idle).await {
                Ok(counts) => {
                    metrics::counter!("sidewall_proxy_bytes_total", "direction" => "inbound")
                        .increment(counts.a_to_b + counts.b_to_a);
                    tracing::debug!(peer = %peer.id, port, to_app = counts.a_to_b, from_app = counts.b_to_a, idle = counts.idle, "carried connection closed");
                }
                Err(error) => {
                    tracing::debug!(peer = %peer.id, %error, "carried connection ended with an error")
                }
            }
        };
        supervise(&context, &peer, port, entry.protocol, on_revoke, copy).await;
    });
    answer(StatusCode::OK)
}
