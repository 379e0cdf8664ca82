//! Fewer system calls under TLS on the long-lived connections.
//!
//! rustls asks its transport for at most 4 KiB at a time (at most one record), and tokio-rustls
//! sends each write's records at once, so a busy shared connection — HTTP/2 writes one 16 KiB
//! frame at a time — made a `recv` per 4–16 KiB and a `writev` per frame. [`ReadAhead`] sits
//! between rustls and the socket and, once [enabled](ReadAhead::enable), receives up to 64 KiB
//! per call and hands rustls the bytes from memory, and gathers what rustls sends until the
//! writer flushes (HTTP/2 flushes after each batch of frames) or 64 KiB are waiting. It is
//! enabled only after the handshake, and only on connections that are shared (HTTP/2 between
//! sidecars, carried TCP connections), where its buffers are paid once for many app
//! connections; on a connection per app connection it stays off and costs nothing.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes received per call, and gathered before sending, once enabled.
pub const READ_AHEAD: usize = 64 * 1024;

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
        }
    }

    /// From now on, receive up to [`READ_AHEAD`] bytes per call and gather writes until a
    /// flush. Call it only between messages (after the handshake): nothing is buffered yet.
    pub fn enable(&mut self) {
        if self.buffer.is_empty() {
            self.buffer = vec![0; READ_AHEAD];
            self.pending = Vec::with_capacity(READ_AHEAD);
        }
    }

    fn enabled(&self) -> bool {
        !self.buffer.is_empty()
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
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buffer);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    this.start = 0;
                    this.end = fill.filled().len();
                }
                other => return other,
            }
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buffer[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
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
    async fn delivers_every_byte_in_order_enabled_or_not() {
        for enabled in [false, true] {
            let (mut writer, reader) = tokio::io::duplex(256 * 1024);
            let mut reader = ReadAhead::new(reader);
            if enabled {
                reader.enable();
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
            assert_eq!(received, payload, "enabled: {enabled}");
        }
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
