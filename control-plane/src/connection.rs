//! One API connection after its TLS handshake, bounded in time and per source (review H2).
//!
//! - A connection must start a request within `limits.requestTimeout` of its handshake (HTTP/1.1
//!   or HTTP/2 alike: a silent client, or one that sends only the HTTP/2 preface, is closed).
//! - On HTTP/1.1, a request head must arrive whole within `limits.requestTimeout` of its first
//!   byte. (hyper's own header timer is off: it also runs while a keep-alive connection waits
//!   for its next request, which closed idle connections at `requestTimeout`.)
//! - A connection with no request in flight for `limits.idleTimeout` is closed. A snapshot watch
//!   is a request in flight for as long as it streams, so sidecars keep theirs.
//! - HTTP/2 keep-alive pings find peers that vanished.
//! - A connection closes the way RFC 9112 §9.6 asks: TLS close_notify and FIN first, then what
//!   the client still sends is read and discarded until it closes, for at most [`LINGER`]. A
//!   client still sending a body that was answered before it was read (a 413) reads the
//!   answer instead of a reset.
//! - One source address may hold `limits.unauthenticatedPerSource` connections without a client
//!   certificate (joining sidecars, `/v1/trust-bundle`); more are closed at once.
//!
//! Each closing is counted in `sidewall_control_plane_connections_closed_total{reason}` or
//! `sidewall_control_plane_connections_refused_total{reason}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::api::{Api, Peer, handle};

/// Interval of HTTP/2 keep-alive pings, and how long a ping may go unanswered.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

/// How long a closing connection reads what its client still sends (nginx's `lingering_time`
/// is 30 s, and 5 s without a byte).
const LINGER: Duration = Duration::from_secs(5);

/// Connections without a client certificate, per source address.
#[derive(Default)]
pub(crate) struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its source; uncounted when dropped.
pub(crate) struct Counted {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection from `ip`, or `None` when it already has `cap`.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<Counted> {
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        let count = counts.entry(ip).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(Counted {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.sources.lock();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What a connection's requests are doing.
struct Activity {
    in_flight: AtomicUsize,
    started: AtomicBool,
    idle_since: Mutex<Instant>,
    /// When bytes of a request head arrived with no request in flight (HTTP/1.1 only).
    head_since: Mutex<Option<Instant>>,
    /// Something above changed: the serving loop recomputes its deadline.
    changed: Notify,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        *lock(&self.head_since) = None;
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *lock(&self.idle_since)
    }

    /// Bytes arrived: with no request in flight, they start a request head.
    fn received(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let mut head = lock(&self.head_since);
            if head.is_none() {
                *head = Some(Instant::now());
                self.changed.notify_one();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection's stream, telling [`Activity`] when bytes arrive (HTTP/1.1), and given back
/// to [`serve`] when hyper drops it, to be closed by [`linger`].
struct Watched<S> {
    /// Always `Some` until dropped.
    stream: Option<S>,
    activity: Option<Arc<Activity>>,
    back: Option<oneshot::Sender<S>>,
}

impl<S: Unpin> Watched<S> {
    fn io(&mut self) -> std::io::Result<Pin<&mut S>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| std::io::ErrorKind::NotConnected.into())
    }
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            // `serve` gone too: the stream is dropped, as it would have been.
            let _ = back.send(stream);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = match self.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(error) => return Poll::Ready(Err(error)),
        };
        if buf.filled().len() > before
            && let Some(activity) = &self.activity
        {
            activity.received();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => io.poll_write(cx, data),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => io.poll_write_vectored(cx, data),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(S::is_write_vectored)
    }
}

/// One request in flight, until its response body has been sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *lock(&self.0.idle_since) = Instant::now();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_one();
        }
    }
}

/// A response body that keeps its request in flight while it is being sent.
struct Tracked {
    body: http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one connection until it ends, stays without a request for too long, or the control
/// plane stops (`watcher`). `http2` is whether ALPN chose HTTP/2 (its frames between requests
/// are no request head).
pub(crate) async fn serve<S>(
    api: Arc<Api>,
    stream: S,
    http2: bool,
    peer: Arc<Peer>,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote: Option<SocketAddr> = peer.remote;
    let first_request = api.config.request_timeout;
    let idle = api.config.idle_timeout;
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        started: AtomicBool::new(false),
        idle_since: Mutex::new(Instant::now()),
        head_since: Mutex::new(None),
        changed: Notify::new(),
    });
    let (back, mut given_back) = oneshot::channel();
    let stream = Watched {
        stream: Some(stream),
        activity: (!http2).then(|| activity.clone()),
        back: Some(back),
    };
    let requests = activity.clone();
    let service = service_fn(move |request| {
        let in_flight = requests.begin();
        let response = handle(api.clone(), peer.clone(), request);
        async move {
            let response = response.await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Timed here instead, from the head's first byte (the module's comment says why).
        .header_read_timeout(None)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE.0)
        .keep_alive_timeout(KEEPALIVE.1)
        .max_concurrent_streams(100)
        .max_header_list_size(32 * 1024);
    let connection = watcher.watch(
        builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned(),
    );
    serve_until_done(connection, &activity, remote, first_request, idle).await;
    // hyper dropped the stream with its connection: close it as clients expect.
    if let Ok(stream) = given_back.try_recv() {
        linger(stream).await;
    }
}

/// Polls `connection` until it ends or stays without a request for too long.
async fn serve_until_done(
    connection: impl std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
    activity: &Activity,
    remote: Option<SocketAddr>,
    first_request: Duration,
    idle: Duration,
) {
    tokio::pin!(connection);
    loop {
        let head = *lock(&activity.head_since);
        // Until the first request, its deadline counts from the handshake, whatever arrived.
        let (from, limit, reason) = match head {
            _ if !activity.started.load(Ordering::Relaxed) => {
                (activity.idle_since(), first_request, "no_request")
            }
            Some(since) => (since, first_request, "no_request"),
            None => (activity.idle_since(), idle, "idle"),
        };
        let busy = activity.in_flight.load(Ordering::Acquire) > 0;
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(?remote, %error, "connection ended with an error");
                }
                return;
            }
            () = activity.changed.notified() => {}
            () = tokio::time::sleep_until(from + limit), if !busy => {
                let quiet = activity.in_flight.load(Ordering::Acquire) == 0
                    && *lock(&activity.head_since) == head
                    && from.elapsed() >= limit;
                if quiet {
                    metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
                    tracing::debug!(?remote, reason, "API connection closed: no request in time");
                    return;
                }
            }
        }
    }
}

/// Closes a connection hyper is done with: TLS close_notify and FIN, then what the client
/// still sends is discarded until it closes too, for at most [`LINGER`]. Closed with unread
/// bytes, the connection would be reset by the kernel, and a client still sending would lose
/// the answer it was sent.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = stream.shutdown().await;
        let mut discard = vec![0; 16 * 1024];
        while matches!(stream.read(&mut discard).await, Ok(read) if read > 0) {}
    })
    .await;
}
