//! HTTP ports: per-request authorization that cannot be bypassed.
//!
//! A port declared `protocol: http` is served with hyper (HTTP/1.1, or HTTP/2 when the client
//! speaks it) after the connection-level check. Between sidecars HTTP rides HTTP/2 (ALPN
//! `sidewall-h2/1`: the port header, then one long-lived multiplexed connection per peer
//! service and port, see `crate::outbound::http`). Every request is then, in order:
//!
//! 1. checked for the smuggling and confusion classes refused with `400` ([`request`],
//!    [`framing`]): two Host headers, Host and `:authority` disagreeing, `Content-Length` with
//!    `Transfer-Encoding`, upgrades other than WebSocket (`h2c` included); hyper itself refuses
//!    NUL, bare CR/LF and obsolete line folding, differing `Content-Length`s, and oversize
//!    headers (`431`);
//! 2. normalized (`sidewall_policies::http::normalize_path`; encoded `/`, `\` and `.`, `;` path
//!    parameters and control characters refused with `400`) — the **normalized** path is what
//!    is matched and what the app receives;
//! 3. decided with the engine on (peer, method, normalized path, host) from the snapshot in
//!    force *now*; `403` with a short body on deny, `405` for an unallowed `CONNECT`;
//! 4. forwarded to the app — HTTP/1.1 over a keep-alive pool, or HTTP/2 over one multiplexed
//!    connection (`appProtocol: http2`) — with `x-sidewall-peer-identity` set to the peer's
//!    SPIFFE ID (any such header from elsewhere removed, `_` spellings included); a WebSocket
//!    upgrade (always HTTP/1.1 to the app) switches to raw forwarding only after the app
//!    answers `101`, and a refused upgrade ends the connection. The tunnel runs inside the
//!    connection's own future, so whatever closes the connection (revocation, `onRevoke`,
//!    peer-certificate expiry, shutdown) closes it, and it holds the connection's permit; it
//!    ends after `limits.idleTimeout` without traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sidewall_policies::engine::Request as Facts;
use sidewall_policies::{Outcome, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::Context;
use crate::config::{AppProtocol, InboundPort};

pub(crate) mod framing;
pub(crate) mod request;

/// The header that carries the authenticated peer to the app.
pub const PEER_HEADER: &str = "x-sidewall-peer-identity";

/// Removes the peer header in every spelling an app could read as it: CGI, WSGI, Rack and PHP
/// fold `-` and `_` into one variable (`HTTP_X_SIDEWALL_PEER_IDENTITY`), so
/// `x_sidewall_peer_identity` from a client would reach the app as the peer's identity.
pub(crate) fn remove_peer_header(headers: &mut hyper::HeaderMap) {
    headers.remove(PEER_HEADER);
    let lookalike = |name: &HeaderName| {
        name.as_str().len() == PEER_HEADER.len()
            && name
                .as_str()
                .bytes()
                .zip(PEER_HEADER.bytes())
                .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
    };
    // Rare (a name with `_`), so the allocation is off the common path.
    if headers.keys().any(lookalike) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| lookalike(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}
/// Request headers allowed in all, per request, before `431`. Default is 32 KiB.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// HTTP/2 streams open at once per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 streams a client may reset before being accepted before the connection is closed
/// (rapid-reset protection).
pub const MAX_PENDING_RESETS: usize = 20;

/// The body type of every response.
pub type ResponseBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// A pooled client to the apps (keep-alive, connection reuse).
pub type AppClient = Client<HttpConnector, Incoming>;

/// HTTP/2 flow-control windows: per stream, and per connection (room for many streams).
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Largest HTTP/2 frame accepted: a bulk stream moves 64 KiB per frame (fewer frame heads,
/// wake-ups and window updates; TLS still cuts records at 16 KiB).
pub(crate) const MAX_FRAME: u32 = 16 * 1024;

/// Builds the app client: HTTP/1.1 with keep-alive.
pub fn app_client() -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(60))
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new());
    builder.build(connector)
}

/// The HTTP/2 client settings used for pooled connections (to peer sidecars and to apps).
pub(crate) fn h2_client() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// The server settings for every HTTP connection the sidecar accepts (from peers, and from
/// its own app on the way out): the header limit, the HTTP/2 hardening.
pub(crate) fn server() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // A client that half-closes after its request still gets the response.
        .half_close(true)
        .timer(TokioTimer::new())
        // Timed by the framing scan instead, from a head's first byte: hyper's deadline also
        // runs while a keep-alive connection waits for its next request.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(1024);
    builder
}

/// A short plain-text answer that names no internals.
pub(crate) fn short(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// `400` for a request that carried both `Content-Length` and `Transfer-Encoding`; the
/// connection ends after it.
pub(crate) fn smuggling_refused() -> Response<ResponseBody> {
    let mut response = short(StatusCode::BAD_REQUEST, "bad request\n");
    response
        .headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What an HTTP connection must do before its first request is in: arrive within a deadline
/// (the HTTP version sniff and the request head included), and, for plaintext on a permissive
/// port, hold only a handshake slot until then (review H1).
pub(crate) struct FirstRequest {
    /// The deadline (`limits.handshakeTimeout`).
    pub(crate) within: Duration,
    /// A permissive port's connection, still in the handshake budget: it moves to the inbound
    /// one with its first request.
    pub(crate) pending: Option<crate::listen::Pending>,
}

/// Serves one authorized HTTP connection from `peer` until it ends. `h2` says the peer sidecar
/// negotiated HTTP/2 (no sniffing then).
pub(crate) async fn serve<S>(
    context: Arc<Context>,
    stream: S,
    peer: Option<SpiffeId>,
    port: InboundPort,
    remote: SocketAddr,
    h2: bool,
    first: FirstRequest,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer_value = peer
        .as_ref()
        .and_then(|p| HeaderValue::from_str(p.as_str()).ok());
    let (stream, scan) = framing::scanned(stream);
    let timing = scan.clone();
    let stream = crate::h2frames::watched(
        stream,
        peer.as_ref()
            .map_or_else(|| remote.ip().to_string(), ToString::to_string),
        port.port,
    );
    let (tunnels, upgraded) = tokio::sync::mpsc::unbounded_channel::<Tunnel>();
    let started = Arc::new((std::sync::atomic::AtomicBool::new(false), Notify::new()));
    let first_seen = started.clone();
    let budget_context = context.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let context = context.clone();
        let peer = peer.clone();
        let peer_value = peer_value.clone();
        let tunnels = tunnels.clone();
        let smuggling = scan.refuses();
        if !started.0.swap(true, std::sync::atomic::Ordering::Relaxed) {
            started.1.notify_one();
        }
        async move {
            if smuggling {
                tracing::warn!(peer = peer.as_ref().map_or("plaintext (permissive port)", SpiffeId::as_str), method = %request.method(), path = request.uri().path(), reason = "Content-Length with Transfer-Encoding", "request refused");
                record("bad_request", "-".into(), Instant::now());
                return Ok::<_, Infallible>(smuggling_refused());
            }
            Ok::<_, Infallible>(
                handle(&context, peer.as_ref(), peer_value, port, request, &tunnels).await,
            )
        }
    });
    let mut builder = server();
    if h2 {
        builder = builder.http2_only();
    }
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    drive(
        &budget_context,
        connection,
        upgraded,
        first,
        (&first_seen.1, &timing),
        remote,
    )
    .await;
}

/// Counts and logs an HTTP/1 connection closed by its timing ([`framing::Scan::expired`]).
pub(crate) fn timed_out(reason: &'static str, remote: Option<SocketAddr>) {
    metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
    tracing::debug!(
        ?remote,
        reason,
        "HTTP connection closed: a request head took too long, or nothing moved for limits.idleTimeout"
    );
}

/// Runs one HTTP connection to its end: the first request must come within the handshake
/// deadline (a permissive plaintext connection holds a handshake slot until then), later
/// HTTP/1 heads within [`framing::HEAD_TIMEOUT`] of their first byte, and bytes must move
/// within `limits.idleTimeout` (`timing`); the
/// upgraded tunnels run here, not on tasks of their own: they end with this future, so the
/// connection's supervision (limit, revocation, `onRevoke`, expiry) covers them too. A handler
/// hands its tunnel over before its `101` is sent, so every tunnel of this connection is in the
/// channel by the time the connection future ends.
async fn drive<E: std::fmt::Display>(
    context: &Context,
    connection: impl std::future::Future<Output = Result<(), E>>,
    mut upgraded: tokio::sync::mpsc::UnboundedReceiver<Tunnel>,
    first: FirstRequest,
    (first_seen, timing): (&Notify, &framing::Scan),
    remote: SocketAddr,
) {
    let idle = context.config.limits.idle_timeout.0;
    tokio::pin!(connection);
    let mut running = tokio::task::JoinSet::new();
    let mut serving = true;
    let FirstRequest {
        within,
        pending: mut budget,
    } = first;
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    let mut waiting = true;
    while serving || !running.is_empty() {
        tokio::select! {
            () = first_seen.notified(), if waiting => {
                waiting = false;
                if let Some(pending) = budget.as_mut()
                    && !pending.authenticated(context)
                {
                    return;
                }
            }
            () = &mut deadline, if waiting => {
                metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "no_request").increment(1);
                tracing::debug!(%remote, ?within, "HTTP connection closed: no request within the handshake deadline");
                return;
            }
            result = &mut connection, if serving => {
                if let Err(error) = result {
                    tracing::debug!(%remote, %error, "HTTP connection ended with an error");
                }
                serving = false;
                while let Ok(tunnel) = upgraded.try_recv() {
                    running.spawn(tunnel);
                }
            }
            Some(tunnel) = upgraded.recv(), if serving => {
                running.spawn(tunnel);
            }
            reason = timing.expired(idle), if serving => {
                timed_out(reason, Some(remote));
                return;
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
}

/// An upgraded connection's byte copy, run by the connection's own [`serve`].
type Tunnel = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Where a handler hands over the tunnel of a request it upgraded.
type Tunnels = tokio::sync::mpsc::UnboundedSender<Tunnel>;

/// The engine's decision for one request; `Err` is the response for a denied one.
fn authorize(
    context: &Context,
    peer: &SpiffeId,
    port: InboundPort,
    request: &Request<Incoming>,
    checked: &request::Checked,
) -> Result<(&'static str, String), (StatusCode, &'static str)> {
    let Some(active) = context.snapshot.borrow().clone() else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "unavailable\n"));
    };
    let decision = active.engine.decide_request(
        peer,
        &context.config.identity,
        port.port,
        Facts {
            method: request.method().as_str(),
            path: &checked.path,
            host: checked.host.as_deref(),
        },
    );
    context.flows.count(
        peer.as_str(),
        port.port,
        sidewall_policies::Protocol::Http,
        Some((request.method().as_str(), &checked.path)),
        &decision,
    );
    let policy = decision
        .reason
        .as_ref()
        .map_or_else(|| "-".to_owned(), |r| r.policy.to_string());
    if !decision.permits() {
        // Once per peer, port and 10 s (review L9); the metric counts each.
        if let Some(folded) = crate::lograte::admit(peer.as_str(), port.port, "request_denied") {
            tracing::warn!(%peer, method = %request.method(), path = %checked.path, host = checked.host.as_deref().unwrap_or("-"), %decision, folded, "request denied");
        }
        metrics::counter!(crate::metric::HTTP_DENIALS, "policy" => policy).increment(1);
        if request.method() == hyper::Method::CONNECT {
            return Err((StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
        }
        return Err((StatusCode::FORBIDDEN, "forbidden\n"));
    }
    if decision.outcome == Outcome::Audit || decision.shadow.is_some() {
        tracing::info!(%peer, method = %request.method(), path = %checked.path, decision = %decision.to_string().replace('\n', "; "), "audit");
    }
    let outcome = if decision.outcome == Outcome::Audit {
        "audit"
    } else {
        "allow"
    };
    Ok((outcome, policy))
}

fn record(outcome: &'static str, policy: String, started: Instant) {
    metrics::counter!(crate::metric::HTTP_REQUESTS, "outcome" => outcome, "policy" => policy)
        .increment(1);
    metrics::histogram!(crate::metric::HTTP_REQUEST_SECONDS)
        .record(started.elapsed().as_secs_f64());
}

async fn handle(
    context: &Context,
    peer: Option<&SpiffeId>,
    peer_value: Option<HeaderValue>,
    port: InboundPort,
    request: Request<Incoming>,
    tunnels: &Tunnels,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let who = peer.map_or("plaintext (permissive port)", SpiffeId::as_str);
    let checked = match request::check(&request, port.path_parameters) {
        Ok(checked) => checked,
        Err(refusal) => {
            tracing::warn!(peer = who, method = %request.method(), path = request.uri().path(), reason = refusal.reason, "request refused");
            record("bad_request", "-".into(), started);
            return short(refusal.status, refusal.body);
        }
    };
    let (outcome, policy) = match peer {
        Some(peer) => match authorize(context, peer, port, &request, &checked) {
            Ok(pair) => pair,
            Err((status, body)) => {
                record("deny", "-".into(), started);
                return short(status, body);
            }
        },
        // A permissive port lets plaintext through unauthenticated (logged at startup and
        // counted here); the peer header is still stripped below.
        None => ("permissive", "-".to_owned()),
    };
    let h2 = port.app_protocol == AppProtocol::Http2 && !checked.websocket;
    let Some((request, upgrade)) = rewrite(&checked, port, h2, request, peer_value) else {
        record("bad_request", policy, started);
        return short(StatusCode::BAD_REQUEST, "bad request\n");
    };
    let app = match to_app(context, port, h2, request).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(app = %port.app, %error, "app request failed");
            record("app_error", policy, started);
            return short(StatusCode::BAD_GATEWAY, "bad gateway\n");
        }
    };
    record(outcome, policy, started);
    if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, app.status()) {
        return upgraded(context, tunnels, client_side, app);
    }
    let mut response = app.map(|body| body.boxed_unsync());
    if checked.websocket {
        // A refused upgrade ends the connection: what the client sends next was meant for a
        // protocol that never started.
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The request as the app gets it: the normalized path (query kept), HTTP/2 or HTTP/1.1 as the
/// port says, hop-by-hop headers dropped, the peer header set by this sidecar alone. With the
/// client's side of a WebSocket upgrade. `None`: the rewritten target is not a URI.
fn rewrite(
    checked: &request::Checked,
    port: InboundPort,
    h2: bool,
    mut request: Request<Incoming>,
    peer_value: Option<HeaderValue>,
) -> Option<(Request<Incoming>, Option<hyper::upgrade::OnUpgrade>)> {
    let authority = match (h2, checked.host.as_deref()) {
        // HTTP/2 carries the host as :authority (the connection goes to the app regardless).
        (true, Some(host)) => host.to_owned(),
        _ => port.app.to_string(),
    };
    let target = match &checked.query {
        Some(query) => format!("http://{authority}{}?{query}", checked.path),
        None => format!("http://{authority}{}", checked.path),
    };
    let uri = target.parse::<hyper::Uri>().ok()?;
    let upgrade = checked.websocket.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    parts.uri = uri;
    parts.version = if h2 {
        hyper::Version::HTTP_2
    } else {
        hyper::Version::HTTP_11
    };
    let headers = &mut parts.headers;
    remove_peer_header(headers);
    for name in request::HOP_BY_HOP {
        if !(checked.websocket && (*name == "connection" || *name == "upgrade")) {
            headers.remove(*name);
        }
    }
    if let Some(value) = peer_value {
        headers.insert(HeaderName::from_static(PEER_HEADER), value);
    }
    if h2 {
        headers.remove(hyper::header::HOST);
    } else if let (Some(host), false) = (
        checked.host.as_deref(),
        headers.contains_key(hyper::header::HOST),
    ) && let Ok(value) = HeaderValue::from_str(host)
    {
        // HTTP/2 carries the host as :authority; an HTTP/1.1 app needs a Host header.
        headers.insert(hyper::header::HOST, value);
    }
    Some((Request::from_parts(parts, body), upgrade))
}

/// Sends the rewritten request to the app: over the port's shared HTTP/2 connection, or the
/// HTTP/1.1 keep-alive pool.
async fn to_app(
    context: &Context,
    port: InboundPort,
    h2: bool,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, String> {
    if h2 {
        let app = port.app;
        let timeout = context.config.limits.connect_timeout.0;
        context
            .app_h2
            .send(&app, || connect_app_h2(app, timeout), request)
            .await
            .map_err(|error| match error {
                crate::pool::PoolError::Connect(reason) => reason.to_owned(),
                crate::pool::PoolError::Request(error) => error.to_string(),
            })
    } else {
        context
            .app_client
            .request(request)
            .await
            .map_err(|error| error.to_string())
    }
}

/// The app switched protocols (a WebSocket): the tunnel between the two upgraded sides is run
/// by this connection's `serve`, under its supervision (if the connection is gone, nothing
/// receives it and it is never opened), and the client gets the app's `101`.
fn upgraded(
    context: &Context,
    tunnels: &Tunnels,
    client_side: hyper::upgrade::OnUpgrade,
    app: Response<Incoming>,
) -> Response<ResponseBody> {
    let (parts, body) = app.into_parts();
    let mut from_app = Response::from_parts(parts.clone(), body);
    let app_side = hyper::upgrade::on(&mut from_app);
    let idle = context.config.limits.idle_timeout.0;
    let _ = tunnels.send(Box::pin(async move {
        if let (Ok(client), Ok(app)) = (client_side.await, app_side.await) {
            let _ = crate::transport::forward(TokioIo::new(client), TokioIo::new(app), idle).await;
        }
    }));
    let mut response = Response::from_parts(
        parts,
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
}

/// Opens a cleartext HTTP/2 connection (prior knowledge) to an app.
async fn connect_app_h2(
    app: SocketAddr,
    timeout: Duration,
) -> Result<crate::pool::Opened<crate::pool::HyperSender>, &'static str> {
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(app))
        .await
        .map_err(|_| "app connect timed out")?
        .map_err(|_| "app unreachable")?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = h2_client()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| "app refused HTTP/2")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%app, %error, "app HTTP/2 connection ended");
        }
    });
    Ok(crate::pool::Opened::new(sender, None, None, Arc::default()))
}
