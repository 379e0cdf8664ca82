//! The server at the end of every chain: one listener, and the first byte of each connection
//! says what it is for. `S` (sink): read and discard until EOF, counting the bytes, which is
//! how throughput is measured (bytes delivered, not bytes written). `E` (echo): write back
//! whatever arrives until EOF, for request/response, connection rate and idle connections.
//! `C` (count): the bytes sunk so far, 8 bytes big-endian, then close: how target mode reads
//! what reached a server in another process (`sidewall-bench serve`) through the deployment.
//! Anything else is HTTP/1.1 (the `sidewall-http` chain): `POST /sink` counts its body like `S`,
//! `GET /count` is answered with the count as `C` is, `POST /echo` with its own body, on a
//! keep-alive connection ([`crate::http1`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::http1;

/// The first byte of a sink connection.
pub(crate) const SINK: u8 = b'S';
/// The first byte of an echo connection.
pub(crate) const ECHO: u8 = b'E';
/// The first byte of a connection asking for the count of bytes sunk.
pub(crate) const COUNT: u8 = b'C';

/// A running server; stops when dropped.
pub(crate) struct Server {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Bytes read by sink connections so far.
    pub(crate) sunk: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Server {
    /// Binds 127.0.0.1 on a free port and serves.
    pub(crate) async fn start() -> std::io::Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` and serves.
    pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deep backlog: connection-rate and idle workloads open connections in bursts.
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let sunk = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept(listener, sunk.clone()));
        Ok(Self { addr, sunk, accept })
    }
}

async fn accept(listener: TcpListener, sunk: Arc<AtomicU64>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, sunk.clone()));
            }
            // Out of file descriptors, typically: let some close.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
}

async fn serve(mut stream: TcpStream, sunk: Arc<AtomicU64>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let kind = stream.read_u8().await?;
    match kind {
        SINK => sink(&mut stream, &sunk).await,
        COUNT => {
            stream
                .write_all(&sunk.load(Ordering::Relaxed).to_be_bytes())
                .await?;
            stream.shutdown().await
        }
        ECHO => {
            // Small: most echo connections sit idle, and 10,000 of them are held at once.
            let mut buffer = vec![0u8; 2048];
            loop {
                let n = stream.read(&mut buffer).await?;
                if n == 0 {
                    return stream.shutdown().await;
                }
                stream.write_all(&buffer[..n]).await?;
            }
        }
        first => http(stream, first, &sunk).await,
    }
}

/// Counts everything read until EOF.
async fn sink(stream: &mut TcpStream, sunk: &AtomicU64) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        sunk.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// HTTP/1.1: `/sink` counts, anything else echoes its body; keep-alive until EOF.
async fn http(mut stream: TcpStream, first: u8, sunk: &AtomicU64) -> std::io::Result<()> {
    let mut buffer = vec![first];
    while let Some(head) = http1::read_head(&mut stream, &mut buffer).await? {
        if head.second_word() == "/sink" {
            sunk.fetch_add(buffer.len() as u64, Ordering::Relaxed);
            return sink(&mut stream, sunk).await;
        }
        if head.second_word() == "/count" {
            let mut response = http1::response_head(8);
            response.extend(sunk.load(Ordering::Relaxed).to_be_bytes());
            stream.write_all(&response).await?;
            continue;
        }
        let length = usize::try_from(head.content_length).unwrap_or(usize::MAX);
        if length > 1 << 20 {
            return Ok(());
        }
        http1::read_body(&mut stream, &mut buffer, length).await?;
        let mut response = http1::response_head(length);
        response.extend(buffer.drain(..length));
        stream.write_all(&response).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_and_sinks() {
        let server = Server::start().await.unwrap();
        let mut echo = TcpStream::connect(server.addr).await.unwrap();
        echo.write_all(&[ECHO]).await.unwrap();
        echo.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        echo.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");

        let mut sink = TcpStream::connect(server.addr).await.unwrap();
        sink.write_all(&[SINK]).await.unwrap();
        sink.write_all(&[0u8; 10_000]).await.unwrap();
        sink.shutdown().await.unwrap();
        let mut rest = Vec::new();
        sink.read_to_end(&mut rest).await.unwrap();
        assert_eq!(server.sunk.load(Ordering::Relaxed), 10_000);
    }

    #[tokio::test]
    async fn speaks_enough_http() {
        let server = Server::start().await.unwrap();
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        let mut buffer = Vec::new();
        for _ in 0..2 {
            client
                .write_all(&http1::request("/echo", &[9u8; 1024]))
                .await
                .unwrap();
            http1::read_response(&mut client, &mut buffer, 1024)
                .await
                .unwrap();
        }
        let mut sink = TcpStream::connect(server.addr).await.unwrap();
        sink.write_all(&http1::sink_head()).await.unwrap();
        sink.write_all(&[0u8; 5000]).await.unwrap();
        sink.shutdown().await.unwrap();
        let mut rest = Vec::new();
        sink.read_to_end(&mut rest).await.unwrap();
        assert_eq!(server.sunk.load(Ordering::Relaxed), 5000);
    }
}
