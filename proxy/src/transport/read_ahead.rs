//! Fewer system calls under TLS on the long-lived connections.
//!
//! rustls asks its transport for at most 4 KiB at a time (at most one record), and tokio-rustls
//! sends each write's records at once, so a busy shared connection — HTTP/2 writes one 16 KiB
//! frame at a time — made a `recv` per 4–16 KiB and a `writev` per frame. [`ReadAhead`] sits
//! between rustls and the socket and, once [enabled](ReadAhead::enable), receives up to 64 KiB
//! per call and hands rustls the bytes from memory, and gathers what rustls sends until the
//! writer flushes or 64 KiB are waiting. HTTP/2 (the `h2` crate) flushes after every DATA frame,
//! so a flush is put off by one turn of the scheduler (the task wakes itself) while another
//! record still fits: the frames other streams produce meanwhile leave in the same `sendto`, and
//! a flush with nothing new since sends at once. It is
//! enabled only after the handshake, and only on connections that are shared (HTTP/2 between
//! sidecars, carried TCP connections), where its buffers are paid once for many app
//! connections.
//!
//! On a connection per app connection it [adapts](ReadAhead::adapt) instead: reads go through
//! (no buffer, nothing held by an idle connection) until [`BUSY_READS`] reads in a row fill all
//! rustls asked for — a bulk transfer — and then read ahead; once the buffer is drained and the
//! socket has nothing more (or the last read brought less than a quarter of it) the buffer is
//! dropped, and one full read takes it again. Writes are not
//! gathered there: tokio-rustls already sends each write's records in one `writev`.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes received per call, and gathered before sending, once enabled.
pub const READ_AHEAD: usize = 64 * 1024;

/// Room for one more full TLS record: a flush is put off only while it fits.
const DEFER_ROOM: usize = 16 * 1024 + 256;

/// Full reads in a row that make an adaptive stream read ahead.
pub(crate) const BUSY_READS: u8 = 4;

/// A stream that can read ahead and gather writes (off until [`ReadAhead::enable`]).
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    /// Waiting to be sent (empty with no capacity while off).
    pending: Vec<u8>,
    /// How much of `pending` the socket has taken.
    sent: usize,
    /// Gather writes until a flush ([`ReadAhead::enable`]).
    gather: bool,
    /// Read ahead only while reads come full ([`ReadAhead::adapt`]).
    adaptive: bool,
    /// Full pass-through reads in a row, while adaptive and not reading ahead.
    full_reads: u8,
    /// How much was waiting at the last flush that was put off (see `poll_flush`).
    deferred: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`, reading through (no buffer) until enabled.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buffer: Vec::new(),
            start: 0,
            end: 0,
            pending: Vec::new(),
            sent: 0,
            gather: false,
            adaptive: false,
            full_reads: 0,
            deferred: 0,
        }
    }

    /// From now on, receive up to [`READ_AHEAD`] bytes per call and gather writes until a
    /// flush. Call it only between messages (after the handshake): nothing is buffered yet.
    pub fn enable(&mut self) {
        self.adaptive = false;
        if self.buffer.is_empty() {
            self.buffer = vec![0; READ_AHEAD];
        }
        if !self.gather {
            self.gather = true;
            self.pending = Vec::with_capacity(READ_AHEAD);
        }
    }

    /// From now on, read ahead only during bulk transfers (see the module's documentation);
    /// writes go through. Call it only between messages (after the handshake).
    pub fn adapt(&mut self) {
        if !self.gather {
            self.adaptive = true;
        }
    }

    /// Whether reads currently go through a buffer of [`READ_AHEAD`] bytes.
    pub fn reading_ahead(&self) -> bool {
        !self.buffer.is_empty()
    }

    fn enabled(&self) -> bool {
        self.gather
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.start == this.end {
            if this.buffer.is_empty() || out.remaining() >= this.buffer.len() {
                let (asked, before) = (out.remaining(), out.filled().len());
                let poll = Pin::new(&mut this.inner).poll_read(cx, out);
                if this.adaptive && this.buffer.is_empty() && poll.is_ready() {
                    this.count_read(asked, out.filled().len() - before);
                }
                return poll;
            }
            let mut fill = ReadBuf::new(&mut this.buffer);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    this.start = 0;
                    this.end = fill.filled().len();
                }
                Poll::Pending if this.adaptive => {
                    // Drained and waiting: an idle connection holds no buffer. One more full
                    // read takes it again, so a transfer that merely caught up loses little.
                    this.buffer = Vec::new();
                    this.full_reads = BUSY_READS - 1;
                    return Poll::Pending;
                }
                other => return other,
            }
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buffer[this.start..this.start + n]);
        this.start += n;
        if this.adaptive && this.start == this.end && this.end < READ_AHEAD / 4 {
            // Drained after a short read: the transfer is over or slow; hold nothing.
            this.buffer = Vec::new();
            (this.start, this.end) = (0, 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> ReadAhead<S> {
    /// Counts a pass-through read of `got` bytes for `asked`; after [`BUSY_READS`] full ones in
    /// a row, reads ahead.
    fn count_read(&mut self, asked: usize, got: usize) {
        if asked > 0 && got == asked {
            self.full_reads += 1;
            if self.full_reads >= BUSY_READS {
                self.full_reads = 0;
                self.buffer = vec![0; READ_AHEAD];
            }
        } else {
            self.full_reads = 0;
        }
    }
}

impl<S: AsyncWrite + Unpin> ReadAhead<S> {
    /// Sends everything gathered so far.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        self.deferred = 0;
        Poll::Ready(Ok(()))
    }

    /// Gathers `bufs` (`total` bytes) if they fit; `None` when they do not even after sending
    /// what is waiting (the caller then writes them through).
    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        total: usize,
    ) -> Poll<std::io::Result<Option<usize>>> {
        if self.pending.len() + total > READ_AHEAD {
            match self.poll_send_pending(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if total > READ_AHEAD {
            return Poll::Ready(Ok(None));
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(Some(total)))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.enabled() {
            match this.poll_gather(cx, &[IoSlice::new(buf)], buf.len()) {
                Poll::Ready(Ok(Some(n))) => return Poll::Ready(Ok(n)),
                Poll::Ready(Ok(None)) => {}
                other => return other.map_ok(|_| 0),
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.enabled() {
            let total = bufs.iter().map(|b| b.len()).sum();
            match this.poll_gather(cx, bufs, total) {
                Poll::Ready(Ok(Some(n))) => return Poll::Ready(Ok(n)),
                Poll::Ready(Ok(None)) => {}
                other => return other.map_ok(|_| 0),
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.enabled() || self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let waiting = this.pending.len() - this.sent;
        if this.gather && waiting > this.deferred && waiting + DEFER_ROOM <= READ_AHEAD {
            // HTTP/2 flushes after every DATA frame; put the send off by one turn of the
            // scheduler so that the frames produced meanwhile leave in the same `sendto`.
            // A flush with nothing new since the last one put off sends at once.
            this.deferred = waiting;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match this.poll_send_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.poll_send_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn delivers_every_byte_in_order_off_enabled_or_adaptive() {
        for mode in ["off", "enabled", "adaptive"] {
            let (mut writer, reader) = tokio::io::duplex(256 * 1024);
            let mut reader = ReadAhead::new(reader);
            match mode {
                "enabled" => reader.enable(),
                "adaptive" => reader.adapt(),
                _ => {}
            }
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let sent = payload.clone();
            let task = tokio::spawn(async move {
                writer.write_all(&sent).await.unwrap();
                writer.shutdown().await.unwrap();
            });
            let mut received = Vec::new();
            let mut small = [0u8; 4096];
            loop {
                // Small reads (rustls' size) and, now and then, one larger than the buffer.
                let n = if received.len() % 3 == 0 {
                    let mut big = vec![0u8; READ_AHEAD + 1];
                    let n = reader.read(&mut big).await.unwrap();
                    received.extend_from_slice(&big[..n]);
                    n
                } else {
                    let n = reader.read(&mut small).await.unwrap();
                    received.extend_from_slice(&small[..n]);
                    n
                };
                if n == 0 {
                    break;
                }
            }
            task.await.unwrap();
            assert_eq!(received, payload, "mode: {mode}");
        }
    }

    #[tokio::test]
    async fn a_flush_is_put_off_one_turn_and_then_sends_everything() {
        let (writer, mut reader) = tokio::io::duplex(1024 * 1024);
        let mut writer = ReadAhead::new(writer);
        writer.enable();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        writer.write_all(b"frame one").await.unwrap();
        // The first flush waits a turn (and wakes its task), sending nothing yet.
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_pending());
        // What is written meanwhile joins the same send.
        writer.write_all(b", frame two").await.unwrap();
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_pending());
        // A flush with nothing new sends at once.
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_ready());
        let mut got = [0u8; 20];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"frame one, frame two");
        // Near the buffer's size nothing is put off.
        writer
            .write_all(&vec![3u8; READ_AHEAD - 1000])
            .await
            .unwrap();
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_ready());
        // And `flush().await` completes on its own (the task woke itself).
        writer.write_all(b"tail").await.unwrap();
        writer.flush().await.unwrap();
        let mut rest = vec![0u8; READ_AHEAD - 1000 + 4];
        reader.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest[rest.len() - 4..], b"tail");
        // Bytes sent by a full gather buffer end the put-off batch: the next one waits a turn too.
        writer.write_all(b"x").await.unwrap();
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_pending());
        writer.write_all(&vec![4u8; READ_AHEAD + 1]).await.unwrap();
        writer.write_all(b"y").await.unwrap();
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut writer).poll_flush(&mut cx).is_ready());
        let mut last = vec![0u8; READ_AHEAD + 3];
        reader.read_exact(&mut last).await.unwrap();
        assert_eq!((last[0], last[last.len() - 1]), (b'x', b'y'));
    }

    #[tokio::test]
    async fn adaptive_reads_ahead_only_during_a_bulk_transfer() {
        let (mut writer, reader) = tokio::io::duplex(1024 * 1024);
        let mut reader = ReadAhead::new(reader);
        reader.adapt();
        let mut small = [0u8; 4096];
        // Chatty: short messages never fill a read, so no buffer is ever taken.
        for _ in 0..10 {
            writer.write_all(&[1u8; 100]).await.unwrap();
            assert_eq!(reader.read(&mut small).await.unwrap(), 100);
            assert!(!reader.reading_ahead());
        }
        // Bulk: reads come full, and after BUSY_READS of them the stream reads ahead.
        let bulk: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        writer.write_all(&bulk).await.unwrap();
        let mut received = Vec::new();
        for _ in 0..BUSY_READS {
            assert!(!reader.reading_ahead());
            let n = reader.read(&mut small).await.unwrap();
            assert_eq!(n, small.len(), "the pipe holds more than asked");
            received.extend_from_slice(&small[..n]);
        }
        let n = reader.read(&mut small).await.unwrap();
        received.extend_from_slice(&small[..n]);
        assert!(
            reader.reading_ahead(),
            "full reads in a row switch read-ahead on"
        );
        while received.len() < bulk.len() {
            let n = reader.read(&mut small).await.unwrap();
            assert!(n > 0);
            received.extend_from_slice(&small[..n]);
        }
        assert_eq!(received, bulk);
        // Drained, the next read waits: the buffer is dropped while the stream is idle.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read(&mut small),
        )
        .await;
        assert!(waiting.is_err(), "nothing was sent");
        assert!(!reader.reading_ahead(), "an idle stream holds no buffer");
        writer.write_all(b"after").await.unwrap();
        let n = reader.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"after");
        assert!(!reader.reading_ahead());
    }

    #[tokio::test]
    async fn gathers_writes_until_a_flush_and_loses_none() {
        let (writer, mut reader) = tokio::io::duplex(1024 * 1024);
        let mut writer = ReadAhead::new(writer);
        writer.enable();
        // Small writes stay gathered until the flush.
        writer.write_all(b"hello ").await.unwrap();
        writer.write_all(b"world").await.unwrap();
        let mut probe = [0u8; 16];
        let nothing_yet = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            reader.read(&mut probe),
        )
        .await;
        assert!(nothing_yet.is_err(), "nothing is sent before the flush");
        writer.flush().await.unwrap();
        let mut got = [0u8; 11];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        // Large and vectored writes, past the buffer's size, arrive whole and in order.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let expected = big.clone();
        let task = tokio::spawn(async move {
            for piece in big.chunks(7_000) {
                let (a, b) = piece.split_at(piece.len() / 2);
                let mut slices = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
                let mut slices = &mut slices[..];
                while !slices.is_empty() {
                    let n = writer.write_vectored(slices).await.unwrap();
                    std::io::IoSlice::advance_slices(&mut slices, n);
                }
            }
            writer.write_all(&vec![9u8; READ_AHEAD * 2]).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        reader.read_to_end(&mut received).await.unwrap();
        task.await.unwrap();
        assert_eq!(received.len(), expected.len() + READ_AHEAD * 2);
        assert_eq!(&received[..expected.len()], &expected[..]);
        assert!(received[expected.len()..].iter().all(|b| *b == 9));
    }
}
