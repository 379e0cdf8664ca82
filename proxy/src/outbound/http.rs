//! The app's HTTP on its way out: requests to a service's HTTP port ride one long-lived
//! HTTP/2 connection to that service's sidecar (ALPN `sidewall-h2/1`), shared by every app
//! connection to the same service and port.
//!
//! The app speaks HTTP/1.1 or HTTP/2 (prior knowledge) to the route. Each request passes the
//! same checks the receiving sidecar applies ([`crate::http::request`],
//! [`crate::http::framing`]) before it leaves — so a translation here can never turn a request
//! the peer would refuse into one it accepts — and hop-by-hop headers are dropped. The peer
//! sidecar authorizes every request on its own. WebSocket upgrades and `CONNECT` take a
//! connection of their own (the L4 protocol, HTTP/1.1 inside) and become raw forwarding only
//! after the far side agrees.
//!
//! The pooled connection is checked like any other: the server must be exactly the service's
//! SPIFFE ID, the peer's connection-level check runs when it opens, and it closes when the
//! server's certificate expires (the next request opens a new one).
//!
//! When the peer closes a pooled connection (its policy no longer lets this workload in and
//! says `onRevoke: terminate`, its certificate was revoked, it went away), every app connection
//! to that service and port that has sent a request closes too, once its request in flight is
//! answered ([`Closed`]): to the app, the service closed the connection, as it would without
//! sidecars. A pooled connection retired here (recycled before the server's certificate
//! expires) ends quietly and closes nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sidewall_policies::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Context;
use crate::http::{ResponseBody, framing, request, short};
use crate::pool::{HyperSender, Opened, PoolError};

/// How many pooled connections the peer closed, per service and port (see the module's
/// comment); app connections watch their key.
#[derive(Default)]
pub(crate) struct Closed(std::sync::Mutex<HashMap<(SpiffeId, u16), watch::Sender<u64>>>);

impl Closed {
    fn watch(&self, key: &(SpiffeId, u16)) -> watch::Receiver<u64> {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        keys.entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn closed(&self, key: &(SpiffeId, u16)) {
        let keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = keys.get(key) {
            sender.send_modify(|count| *count += 1);
        }
    }
}

/// Serves the app's connection to `service`'s HTTP `port` until it ends.
pub(crate) async fn serve(context: Arc<Context>, app: TcpStream, service: SpiffeId, port: u16) {
    let remote = app.peer_addr().ok();
    let (app, scan) = framing::scanned(app);
    let timing = scan.clone();
    let idle = context.config.limits.idle_timeout.0;
    let mut peer_closed = context.peers_h2_closed.watch(&(service.clone(), port));
    let used = Arc::new(AtomicBool::new(false));
    let sent = used.clone();
    let name = service.to_string();
    let service = Arc::new(service);
    let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
        let context = context.clone();
        let service = service.clone();
        let smuggling = scan.refuses();
        sent.store(true, Ordering::Relaxed);
        async move {
            if smuggling {
                return Ok::<_, Infallible>(refused(
                    &request,
                    "Content-Length with Transfer-Encoding",
                    crate::http::smuggling_refused(),
                ));
            }
            Ok::<_, Infallible>(handle(&context, &service, port, request).await)
        }
    });
    let builder = crate::http::server();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(app), handler);
    tokio::pin!(connection);
    let mut shutting = false;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(?remote, error = ?error, "app HTTP connection ended with an error");
                }
                return;
            }
            reason = timing.expired(idle) => {
                crate::http::timed_out(reason, remote);
                return;
            }
            Ok(()) = peer_closed.changed(), if !shutting => {
                if used.load(Ordering::Relaxed) {
                    // Ends once the request in flight, if any, is answered.
                    shutting = true;
                    connection.as_mut().graceful_shutdown();
                    metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "peer_closed").increment(1);
                    tracing::debug!(?remote, service = name, port, "app HTTP connection closing: the peer sidecar closed the connection it rode");
                }
            }
        }
    }
}

fn refused(
    request: &Request<Incoming>,
    reason: &'static str,
    response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    tracing::warn!(method = %request.method(), path = request.uri().path(), reason, "outbound request refused before leaving");
    metrics::counter!(crate::metric::OUTBOUND_HTTP_REQUESTS, "outcome" => "bad_request")
        .increment(1);
    response
}

fn failed(reason: &'static str) -> Response<ResponseBody> {
    metrics::counter!(crate::metric::OUTBOUND_FAILURES, "reason" => reason).increment(1);
    metrics::counter!(crate::metric::OUTBOUND_HTTP_REQUESTS, "outcome" => "failed").increment(1);
    match reason {
        "denied" => short(StatusCode::FORBIDDEN, "forbidden\n"),
        _ => short(StatusCode::BAD_GATEWAY, "bad gateway\n"),
    }
}

async fn handle(
    context: &Arc<Context>,
    service: &SpiffeId,
    port: u16,
    mut request: Request<Incoming>,
) -> Response<ResponseBody> {
    // `;` path parameters pass only to a port whose sidecar strips them (as it registered).
    let parameters = context
        .snapshot
        .borrow()
        .as_ref()
        .and_then(|active| {
            let entry = active.snapshot.service(service)?;
            entry
                .ports
                .iter()
                .find(|p| p.port == port)
                .map(|p| p.path_parameters)
        })
        .unwrap_or_default();
    let checked = match request::check(&request, parameters) {
        Ok(checked) => checked,
        Err(refusal) => {
            return refused(
                &request,
                refusal.reason,
                short(refusal.status, refusal.body),
            );
        }
    };
    if checked.websocket || request.method() == Method::CONNECT {
        return tunnel(context, service, port, request).await;
    }
    let headers = request.headers_mut();
    for name in request::HOP_BY_HOP {
        headers.remove(*name);
    }
    crate::http::remove_peer_header(headers);
    let key = (service.clone(), port);
    let connect = || connect_peer(context.clone(), service, port);
    match context.peers_h2.send(&key, connect, request).await {
        Ok(response) => {
            metrics::counter!(crate::metric::OUTBOUND_HTTP_REQUESTS, "outcome" => "forwarded")
                .increment(1);
            response.map(BodyExt::boxed_unsync)
        }
        Err(PoolError::Connect(reason)) => failed(reason),
        Err(PoolError::Request(error)) => {
            tracing::warn!(%service, port, %error, "request to the peer sidecar failed");
            failed("peer_request_failed")
        }
    }
}

/// Opens the pooled HTTP/2 connection to `service`'s sidecar for `port`.
async fn connect_peer(
    context: Arc<Context>,
    service: &SpiffeId,
    port: u16,
) -> Result<Opened<HyperSender>, &'static str> {
    let (stream, server) = super::open(&context, service, Some(port), crate::tls::ALPN_H2).await?;
    let until = std::time::Instant::now() + server.lifetime / 2;
    let (sender, connection) = crate::http::h2_client()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| "h2_handshake")?;
    let service = service.clone();
    let gone = server.clone().gone();
    tokio::spawn(async move {
        // Ended by the peer (an error: it closed or reset the connection) or revoked: the app
        // connections that rode it close too. Retired here, it ends cleanly and closes nothing.
        let by_peer = tokio::select! {
            result = connection => match result {
                Ok(()) => false,
                Err(error) => {
                    tracing::debug!(%service, port, %error, "pooled HTTP/2 connection ended");
                    true
                }
            },
            gone = gone => {
                gone.record(&service, super::Carrier::Pooled);
                true
            }
        };
        if by_peer {
            context.peers_h2_closed.closed(&(service, port));
        }
    });
    Ok(Opened::new(
        sender,
        Some(until),
        Some(server),
        Default::default(),
    ))
}

/// A WebSocket upgrade or `CONNECT`: its own L4 connection, HTTP/1.1 inside, then raw bytes
/// both ways once the far side agrees (`101`, or `2xx` for `CONNECT`).
async fn tunnel(
    context: &Context,
    service: &SpiffeId,
    port: u16,
    mut request: Request<Incoming>,
) -> Response<ResponseBody> {
    let (stream, server) =
        match super::open(context, service, Some(port), crate::tls::ALPN_L4).await {
            Ok(pair) => pair,
            Err(reason) => return failed(reason),
        };
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return failed("peer_request_failed");
    };
    tokio::spawn(connection.with_upgrades());
    let connect = request.method() == Method::CONNECT;
    let client_side = hyper::upgrade::on(&mut request);
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%service, port, %error, "upgrade request to the peer sidecar failed");
            return failed("peer_request_failed");
        }
    };
    let agreed = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (connect && response.status().is_success());
    if !agreed {
        let mut response = response.map(BodyExt::boxed_unsync);
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let (parts, body) = response.into_parts();
    let mut upstream = Response::from_parts(parts.clone(), body);
    let peer_side = hyper::upgrade::on(&mut upstream);
    let service = service.clone();
    let idle = context.config.limits.idle_timeout.0;
    tokio::spawn(async move {
        if let (Ok(client), Ok(peer)) = (client_side.await, peer_side.await) {
            tokio::select! {
                _ = crate::transport::forward(TokioIo::new(client), TokioIo::new(peer), idle) => {}
                gone = server.gone() => gone.record(&service, super::Carrier::Tunnel),
            }
        }
    });
    Response::from_parts(
        parts,
        http_body_util::Empty::new()
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    )
}
