//! Shared sidecar connections (ALPN `sidewall-mux/1`): many app connections to TCP ports
//! carried over one long-lived mTLS connection per service, each an HTTP/2 `CONNECT
//! sidewall:<port>` stream that the server sidecar authorizes on its own
//! (`crate::inbound::mux`).
//!
//! This is the fast path for new connections: no TLS handshake and no sidecar-to-sidecar TCP
//! connect per app connection, only a stream opened on a connection that exists. It uses the
//! `h2` crate directly rather than hyper's upgrade so that the bytes are not copied twice more:
//! data read from the app goes out as the same buffer ([`Bytes`]), and data received is written
//! to the app from the frame it arrived in.
//!
//! A connection carries at most [`STREAMS_PER_CONNECTION`] app connections; more open another
//! one. Its connection window holds every stream's full window, so HTTP/2 flow control works
//! per stream only: an app that stops reading stalls its own stream, never the others (review
//! M9). Each connection is pinged every `limits.keepalive`, and closed when a ping goes
//! unanswered that long: a frozen or vanished peer sidecar holds no app connection.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use sidewall_policies::SpiffeId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::transport::Forwarded;
use crate::transport::copy::{Activity, until_idle};

/// The host every stream names: only the port means anything.
pub(crate) const HOST: &str = "sidewall";

/// Bytes first reserved for reading from the app when it has something to send; doubled up
/// to [`MAX_READ`] while reads fill it.
const FIRST_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Frames written to the app in one call at most.
const BATCH: usize = 16;

/// App connections one shared connection carries at once at most.
pub(crate) const STREAMS_PER_CONNECTION: usize = 128;

/// Room for every stream's full window (128 MiB): a stalled stream never takes another's
/// share. Memory is bounded per stream all the same (a stream's window is what can wait
/// unread for its app), and only by streams that actually hold data.
const CONNECTION_WINDOW: u32 = STREAMS_PER_CONNECTION as u32 * crate::http::STREAM_WINDOW;

/// HTTP/2 settings of both ends of a shared connection.
pub(crate) fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(crate::http::STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(crate::http::MAX_FRAME)
        .max_header_list_size(4096)
        .max_concurrent_reset_streams(1024)
        .max_send_buffer_size(crate::http::STREAM_WINDOW as usize);
    builder
}

/// See [`client_builder`]; `streams` is the server's limit of carried connections at once
/// (one connection carries [`STREAMS_PER_CONNECTION`] at most).
pub(crate) fn server_builder(streams: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(crate::http::STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(crate::http::MAX_FRAME)
        .max_header_list_size(4096)
        .max_concurrent_streams(streams.min(STREAMS_PER_CONNECTION as u32))
        .max_pending_accept_reset_streams(crate::http::MAX_PENDING_RESETS)
        .max_concurrent_reset_streams(1024)
        .max_send_buffer_size(crate::http::STREAM_WINDOW as usize);
    builder
}

/// The shared connections of one sidecar, by service.
pub(crate) type Pool = crate::pool::Pool<SpiffeId, SendRequest<Bytes>>;

/// A new shared connection, for the pool.
pub(crate) type Opened = crate::pool::Opened<SendRequest<Bytes>>;

/// Why a carried connection could not be opened: a label for logs and metrics.
pub(crate) type Refusal = &'static str;

/// The pool of shared connections: at most [`STREAMS_PER_CONNECTION`] app connections on one.
pub(crate) fn pool() -> Pool {
    Pool::with_streams(STREAMS_PER_CONNECTION)
}

/// Opens a stream to `service`'s `port` on a shared connection from `pool` (made with
/// `connect` when none has room), and waits for the server's decision.
pub(crate) async fn open<F, Fut>(
    pool: &Pool,
    service: &SpiffeId,
    port: u16,
    answer_within: Duration,
    connect: F,
) -> Result<(SendStream<Bytes>, RecvStream, crate::pool::Carried), Refusal>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Opened, Refusal>>,
{
    let authority = format!("{HOST}:{port}");
    let mut fresh = false;
    let (response, send, closed, carried) = loop {
        let crate::pool::Lease {
            sender,
            closed,
            carried,
        } = pool.lease(service, &connect, fresh).await?;
        // A connection that ended between two uses fails here; once more on a new one.
        let attempt = match sender.ready().await {
            Ok(mut ready) => {
                let request = hyper::Request::connect(authority.as_str())
                    .body(())
                    .map_err(|_| "bad_request")?;
                ready.send_request(request, false)
            }
            Err(error) => Err(error),
        };
        match attempt {
            Ok((response, send)) => break (response, send, closed, carried),
            Err(error) if !fresh => {
                tracing::debug!(%service, %error, "shared connection unusable: opening another");
                closed.store(true, Ordering::Relaxed);
                fresh = true;
            }
            Err(error) => {
                tracing::warn!(%service, port, %error, "the shared connection to the service failed");
                return Err("stream_failed");
            }
        }
    };
    let response = match tokio::time::timeout(answer_within, response).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            tracing::warn!(%service, port, %error, "carried connection failed before an answer");
            return Err("stream_failed");
        }
        Err(_) => {
            // A frozen or blackholed peer sidecar: this connection is not used again, the
            // next app connection opens another (to the next endpoint if this one still
            // does not answer).
            closed.store(true, Ordering::Relaxed);
            metrics::counter!(crate::metric::H2_POOL, "event" => "abandoned").increment(1);
            tracing::warn!(%service, port, waited = ?answer_within, "the peer sidecar did not answer on the shared connection: abandoned");
            return Err("peer_timeout");
        }
    };
    let refusal = match response.status() {
        hyper::StatusCode::OK => None,
        hyper::StatusCode::FORBIDDEN => Some("denied"),
        hyper::StatusCode::NOT_FOUND => Some("unknown_port"),
        hyper::StatusCode::MISDIRECTED_REQUEST => Some("not_tcp"),
        hyper::StatusCode::BAD_GATEWAY => Some("app_unavailable"),
        hyper::StatusCode::SERVICE_UNAVAILABLE => Some("peer_busy"),
        _ => Some("bad_status"),
    };
    if let Some(reason) = refusal {
        tracing::warn!(%service, port, status = reason, code = %response.status(), "peer sidecar refused the connection");
        return Err(reason);
    }
    Ok((send, response.into_body(), carried))
}

/// Starts driving a new client connection; the flag turns true when it ends (or when `gone`
/// resolves, at the server's expiry or revocation, or when a ping sent every `keepalive` is
/// not answered within it: it is closed then).
pub(crate) fn drive<T>(
    mut connection: h2::client::Connection<T, Bytes>,
    gone: impl Future<Output = crate::outbound::Gone> + Send + 'static,
    service: SpiffeId,
    keepalive: Duration,
) -> Arc<AtomicBool>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    let pings = connection.ping_pong();
    tokio::spawn(async move {
        tokio::select! {
            result = connection => {
                if let Err(error) = result {
                    tracing::debug!(%service, %error, "shared connection ended");
                }
            }
            // Dropping the connection ends every stream on it.
            gone = gone => gone.record(&service, crate::outbound::Carrier::Shared),
            () = unanswered(pings, keepalive) => {
                metrics::counter!(crate::metric::H2_POOL, "event" => "keepalive_timeout").increment(1);
                tracing::warn!(%service, ?keepalive, "the peer sidecar did not answer a ping on the shared connection: closed with the app connections it carried");
            }
        }
        flag.store(true, Ordering::Relaxed);
    });
    closed
}

/// Pings every `keepalive`; resolves when a ping is not answered within `keepalive` (never
/// when the connection has no ping handle, or once it has ended: its driver sees that).
async fn unanswered(pings: Option<h2::PingPong>, keepalive: Duration) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(keepalive).await;
        match tokio::time::timeout(keepalive, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_ended)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

fn h2_io(error: h2::Error) -> std::io::Error {
    if error.reason() == Some(h2::Reason::CANCEL) || error.reason() == Some(h2::Reason::NO_ERROR) {
        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "stream cancelled")
    } else {
        std::io::Error::other(error)
    }
}

/// The payload of a DATA frame that, with its 9-byte header, is one full TLS record (16 KiB of
/// plaintext).
const FRAME_PAYLOAD: usize = 16 * 1024 - 9;

/// App → stream: reads when the app has something to send (no buffer while it is idle),
/// sends what it read as it is, within the stream's flow-control window; the app's EOF ends
/// the stream.
async fn upstream(
    app: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    activity: &Activity,
) -> std::io::Result<u64> {
    let mut buffer = BytesMut::new();
    let mut want = FIRST_READ;
    let mut total = 0u64;
    loop {
        app.readable().await?;
        buffer.reserve(want);
        let n = match app.try_read_buf(&mut buffer) {
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                // A spurious wake-up (a new socket starts out "ready"): hold no buffer while
                // waiting for real data.
                if want == FIRST_READ {
                    buffer = BytesMut::new();
                }
                continue;
            }
            Err(error) => return Err(error),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        activity.touch();
        // A read that filled what was asked for means bulk: ask for more next time.
        if n >= want && want < MAX_READ {
            want *= 2;
        }
        let mut data = buffer.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted,
                Some(Err(error)) => return Err(h2_io(error)),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "stream closed",
                    ));
                }
            };
            if granted == 0 {
                continue;
            }
            let mut chunk = data.split_to(granted.min(data.len()));
            // One DATA frame per TLS record: header and payload fill a record exactly, where a
            // full-size frame would leave its last 9 bytes to a record of their own.
            while chunk.len() > FRAME_PAYLOAD {
                send.send_data(chunk.split_to(FRAME_PAYLOAD), false)
                    .map_err(h2_io)?;
            }
            send.send_data(chunk, false).map_err(h2_io)?;
        }
        // Small reads: hold no memory while the connection idles. Bulk keeps its buffer (the
        // allocation is reused once the last chunk has gone out).
        if want == FIRST_READ {
            buffer = BytesMut::new();
        }
    }
}

/// Stream → app: writes the frames' bytes as received — several at once when several have
/// arrived (one `writev`), up to [`MAX_READ`] — and returns the window.
async fn downstream(
    recv: &mut RecvStream,
    app: &mut tokio::net::tcp::WriteHalf<'_>,
    activity: &Activity,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut ended = false;
    while !ended {
        let Some(first) = recv.data().await else {
            break;
        };
        batch.push(first.map_err(h2_io)?);
        let mut size = batch[0].len();
        // Whatever else has already arrived goes in the same write.
        while size < MAX_READ && batch.len() < BATCH {
            let next = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(match recv.poll_data(cx) {
                    std::task::Poll::Ready(next) => Some(next),
                    std::task::Poll::Pending => None,
                })
            })
            .await;
            match next {
                Some(Some(chunk)) => {
                    let chunk = chunk.map_err(h2_io)?;
                    size += chunk.len();
                    batch.push(chunk);
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        write_all_vectored(app, &batch, size).await?;
        batch.clear();
        total += size as u64;
        activity.touch();
        recv.flow_control().release_capacity(size).map_err(h2_io)?;
    }
    app.shutdown().await?;
    Ok(total)
}

/// Writes every byte of `chunks` (`size` in all), as few calls as the socket allows.
async fn write_all_vectored(
    app: &mut tokio::net::tcp::WriteHalf<'_>,
    chunks: &[Bytes],
    size: usize,
) -> std::io::Result<()> {
    let mut written = 0;
    while written < size {
        let mut skip = written;
        let mut slices = [std::io::IoSlice::new(&[]); BATCH];
        let mut count = 0;
        for chunk in chunks.iter().take(BATCH) {
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            slices[count] = std::io::IoSlice::new(&chunk[skip..]);
            count += 1;
            skip = 0;
        }
        let n = app.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// Moves bytes both ways between the app and a carried stream until both directions end,
/// either fails, or nothing moves for `idle_timeout` (then the stream is reset).
pub(crate) async fn forward(
    mut app: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    idle_timeout: Duration,
) -> std::io::Result<Forwarded> {
    let activity = Activity::new();
    let (mut read, mut write) = app.split();
    let both = async {
        tokio::try_join!(
            upstream(&mut read, &mut send, &activity),
            downstream(&mut recv, &mut write, &activity),
        )
    };
    let result = until_idle(both, &activity, idle_timeout).await;
    if !matches!(result, Ok(Forwarded { idle: false, .. })) {
        send.send_reset(h2::Reason::CANCEL);
    }
    result
}
