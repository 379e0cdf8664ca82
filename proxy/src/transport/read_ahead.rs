//! Fewer receive calls under TLS on the long-lived connections.
//!
//! rustls asks its transport for at most 4 KiB at a time (at most one record), so a busy TLS
//! connection made a `recv` per 4–16 KiB. [`ReadAhead`] sits between rustls and the socket and,
//! once [enabled](ReadAhead::enable), receives up to 64 KiB per call and hands rustls the bytes
//! from memory. It is enabled only on connections that are shared (HTTP/2 between sidecars,
//! carried TCP connections), where its buffer is paid once for many app connections; on a
//! connection per app connection it stays off and costs nothing. Writes pass straight through.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes received per call once enabled.
pub const READ_AHEAD: usize = 64 * 1024;

/// A stream that can read ahead into its own buffer (off until [`ReadAhead::enable`]).
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`, reading through (no buffer) until enabled.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buffer: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// From now on, receive up to [`READ_AHEAD`] bytes per call.
    pub fn enable(&mut self) {
        if self.buffer.is_empty() {
            self.buffer = vec![0; READ_AHEAD];
        }
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

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}
