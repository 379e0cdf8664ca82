//! A stream whose incoming bytes are shown to an observer as they are read (writes pass
//! through, the observer told that they moved): how the HTTP/1 framing scan and head timing
//! (`crate::http::framing`) and the HTTP/2 control-frame limit (`crate::h2frames`) watch a
//! connection without owning its parsing.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Watches the bytes read from a peer; an error ends the connection (every later read fails).
pub(crate) trait Observer {
    /// Called with each read's new bytes, in order.
    fn observe(&mut self, bytes: &[u8]) -> std::io::Result<()>;

    /// Called after bytes were written to the peer.
    fn wrote(&mut self) {}
}

/// `inner` with `observer` shown every byte read.
pub(crate) struct Observed<S, O> {
    inner: S,
    observer: O,
    /// The observer refused the stream: reads fail from then on.
    refused: bool,
}

impl<S, O> Observed<S, O> {
    pub(crate) fn new(inner: S, observer: O) -> Self {
        Self {
            inner,
            observer,
            refused: false,
        }
    }
}

impl<S: AsyncRead + Unpin, O: Observer + Unpin> AsyncRead for Observed<S, O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.refused {
            return Poll::Ready(Err(std::io::Error::other("refused by the observer")));
        }
        let start = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && let Err(error) = this.observer.observe(&buf.filled()[start..])
        {
            this.refused = true;
            return Poll::Ready(Err(error));
        }
        result
    }
}

impl<S: AsyncWrite + Unpin, O: Observer + Unpin> AsyncWrite for Observed<S, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(1..)) = result {
            this.observer.wrote();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(1..)) = result {
            this.observer.wrote();
        }
        result
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
