//! Plaintext to plaintext without entering user space: `splice(2)` through a pipe.
//!
//! Used where both sides of a connection are plain TCP sockets the sidecar only relays:
//! egress destinations in transparent mode and permissive ports. The bytes go socket → pipe →
//! socket inside the kernel (page references move, nothing is copied into the process), one
//! pipe per direction, created when that direction first has data (an idle connection holds
//! none). Same contract as [`super::forward`]: both directions, half-close propagated, idle
//! timeout, byte counts. The TLS legs cannot do this without kernel TLS, which these machines
//! lack (see `ARCHITECTURE.md`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Forwarded;
use super::copy::{Activity, until_idle};

/// Bytes moved per `splice` call: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

fn io(error: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(error as i32)
}

/// One direction: socket → pipe → socket until EOF, then half-close the writer.
async fn pump(from: &TcpStream, to: &TcpStream, activity: &Activity) -> std::io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        if pipe.is_none() {
            pipe = Some(nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io)?);
        }
        let Some((pipe_out, pipe_in)) = pipe.as_ref() else {
            continue;
        };
        let read = from.try_io(Interest::READABLE, || {
            splice(from, None, &*pipe_in, None, CHUNK, flags).map_err(io)
        });
        let mut in_pipe = match read {
            Ok(0) => {
                shutdown(to.as_raw_fd(), Shutdown::Write).map_err(io)?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        while in_pipe > 0 {
            to.writable().await?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice(&*pipe_out, None, to, None, in_pipe, flags).map_err(io)
            });
            match written {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        activity.touch();
    }
}

/// Relays between two plain TCP sockets with `splice(2)` until both directions have ended,
/// either fails, or nothing moves for `idle_timeout`.
pub async fn forward_spliced(
    a: TcpStream,
    b: TcpStream,
    idle_timeout: Duration,
) -> std::io::Result<Forwarded> {
    let activity = Activity::new();
    let both = async { tokio::try_join!(pump(&a, &b, &activity), pump(&b, &a, &activity)) };
    until_idle(both, &activity, idle_timeout).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of real sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_and_propagates_half_close() {
        let (mut client, proxy_a) = pair().await;
        let (proxy_b, mut server) = pair().await;
        let relay = tokio::spawn(forward_spliced(proxy_a, proxy_b, Duration::from_secs(10)));
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let (mut client_read, mut client_write) = client.split();
        let writer = async {
            client_write.write_all(&sent).await.unwrap();
            client_write.shutdown().await.unwrap();
        };
        let reader = async {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.unwrap();
            received
        };
        let ((), received) = tokio::join!(writer, reader);
        assert!(received == payload, "every byte, in order, then EOF");
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client_read.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let counts = relay.await.unwrap().unwrap();
        assert_eq!((counts.a_to_b, counts.b_to_a), (3_000_000, 5));
    }
}
