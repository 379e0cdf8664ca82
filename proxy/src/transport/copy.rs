//! The bidirectional copy: half-close both ways, reused buffers, idle timeout, byte counts.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Each direction starts with a small buffer inside the task itself, no allocation: most
/// connections (requests, responses, idle keep-alives) never need more, and memory per
/// connection is what a sidecar holding thousands of them pays.
const SMALL_BUFFER: usize = 2 * 1024;
/// The first heap buffer, taken when a read fills the small one: one TLS record.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest size a busy direction grows to: enough for a TLS writer to fill several whole
/// records from one read during bulk transfers.
const MAX_BUFFER: usize = 64 * 1024;

/// What a finished copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Bytes from the first stream to the second.
    pub a_to_b: u64,
    /// Bytes from the second stream to the first.
    pub b_to_a: u64,
    /// Whether it ended because nothing moved for the idle timeout.
    pub idle: bool,
}

/// When bytes last moved on a connection, for its idle timeout (shared by both directions of
/// every copy: this one, [`super::forward_spliced`] and the carried streams of `crate::mux`).
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Bytes moved just now.
    pub(crate) fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Duration {
        Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Runs `both` (the two directions, returning their byte counts) until it ends, or until
/// nothing has moved for `idle_timeout`.
pub(crate) async fn until_idle<F>(
    both: F,
    activity: &Activity,
    idle_timeout: Duration,
) -> std::io::Result<Forwarded>
where
    F: Future<Output = std::io::Result<(u64, u64)>>,
{
    tokio::pin!(both);
    loop {
        let last = activity.last();
        let deadline = activity.start + last + idle_timeout;
        tokio::select! {
            result = &mut both => {
                let (a_to_b, b_to_a) = result?;
                return Ok(Forwarded { a_to_b, b_to_a, idle: false });
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if activity.last() == last {
                    return Ok(Forwarded { idle: true, ..Forwarded::default() });
                }
            }
        }
    }
}

/// One direction: read into the buffer, write it all, until EOF; then shut the writer down
/// (half-close). Backpressure is natural: nothing is read until the last chunk is written.
async fn pump<R, W>(mut from: R, mut to: W, activity: &Activity) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut small = [0u8; SMALL_BUFFER];
    let mut buffer: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let n = if buffer.is_empty() {
            from.read(&mut small).await?
        } else {
            from.read(&mut buffer).await?
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        let data = if buffer.is_empty() {
            &small[..n]
        } else {
            &buffer[..n]
        };
        to.write_all(data).await?;
        to.flush().await?;
        // A read that fills the buffer means a bulk transfer: grow (once per doubling, never
        // per chunk) so that later reads and writes move more per syscall.
        if buffer.is_empty() {
            if n == SMALL_BUFFER {
                buffer = vec![0u8; INITIAL_BUFFER];
            }
        } else if n == buffer.len() && buffer.len() < MAX_BUFFER {
            buffer.resize(buffer.len() * 2, 0);
        }
        total += n as u64;
        activity.touch();
    }
}

/// Copies both ways between `a` and `b` until both directions have ended, either side
/// fails, or nothing moves for `idle_timeout`.
pub async fn forward<A, B>(a: A, b: B, idle_timeout: Duration) -> std::io::Result<Forwarded>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let activity = Activity::new();
    let both = async {
        tokio::try_join!(
            pump(a_read, b_write, &activity),
            pump(b_read, a_write, &activity),
        )
    };
    until_idle(both, &activity, idle_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let forwarding = tokio::spawn(forward(proxy_a, proxy_b, Duration::from_secs(5)));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let payload = vec![7u8; 300_000];
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client_write.write_all(&sent).await.unwrap();
            client_write.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        server_read.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, payload, "all bytes arrive, then EOF (half-close)");
        writer.await.unwrap();
        // The other direction still works after the first one closed.
        server_write.write_all(b"reply").await.unwrap();
        server_write.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client_read.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let counts = forwarding.await.unwrap().unwrap();
        assert_eq!(
            (counts.a_to_b, counts.b_to_a, counts.idle),
            (300_000, 5, false)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed() {
        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let counts = forward(proxy_a, proxy_b, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(counts.idle);
    }
}
