//! Between sidecars, and the copy loop.
//!
//! **The port header.** After the mTLS handshake the client sidecar names the target *port
//! only*, never an address: 5 bytes, `53 57 01 <port: u16 big-endian>` ("SW", version 1). The
//! server maps the port through its own `inbound.ports`, decides, and answers one status
//! byte ([`Status`]) before any app byte flows back. A denied connection is closed right after
//! the status byte; nothing the client sent reaches the app.
//!
//! **The copy.** [`forward`] is the one place bytes are moved between two streams: both
//! directions at once, half-close propagated each way, one buffer per direction reused for the
//! whole connection, an idle timeout, and the byte counts returned. The benchmark issue
//! replaces its inside without touching callers.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) mod copy;
mod observed;
mod read_ahead;
mod splice;

pub use copy::{Forwarded, forward};
pub(crate) use observed::{Observed, Observer};
pub use read_ahead::{READ_AHEAD, ReadAhead};
pub use splice::forward_spliced;

/// Where a connection redirected by iptables `REDIRECT` was headed (`SO_ORIGINAL_DST`).
pub fn original_destination(
    stream: &tokio::net::TcpStream,
) -> std::io::Result<std::net::SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr()?;
    let error = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
    // An IPv4 connection on a dual-stack (`[::]`) listener is v4-mapped: it was redirected by
    // the IPv4 rules and its original destination is kept by IPv4 conntrack.
    let ipv4 = match local.ip() {
        std::net::IpAddr::V4(_) => true,
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    };
    if ipv4 {
        let address = getsockopt(stream, sockopt::OriginalDst).map_err(error)?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
        Ok(std::net::SocketAddr::from((
            ip,
            u16::from_be(address.sin_port),
        )))
    } else {
        let address = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(error)?;
        let ip = std::net::Ipv6Addr::from(address.sin6_addr.s6_addr);
        Ok(std::net::SocketAddr::from((
            ip,
            u16::from_be(address.sin6_port),
        )))
    }
}

/// The socket mark of this sidecar process (`outbound.mark`), set once at start.
static MARK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();

/// Records the process's socket mark; every connection the sidecar opens carries it.
pub fn set_mark(mark: Option<u32>) {
    let _ = MARK.set(mark);
}

/// Connects to `host:port` (the control plane), with the process's socket mark so that
/// iptables lets the sidecar's own connection through.
pub async fn connect_authority(authority: &str) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{authority}: no address"),
    );
    for address in tokio::net::lookup_host(authority).await? {
        match connect(address, MARK.get().copied().flatten()).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error,
        }
    }
    Err(last)
}

/// Connects to `address`, with SO_MARK set first when `mark` is given (so iptables rules can
/// tell the sidecar's own connections from the app's).
pub async fn connect(
    address: std::net::SocketAddr,
    mark: Option<u32>,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    }
    let stream = socket.connect(address).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The header's fixed prefix: "SW" and version 1.
pub const MAGIC: [u8; 3] = [0x53, 0x57, 0x01];

/// The server's answer to a port header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Authorized and connected to the app: bytes flow.
    Allowed = 0,
    /// Policy denies this peer on this port.
    Denied = 1,
    /// The server has no such port.
    UnknownPort = 2,
    /// The header was malformed.
    BadHeader = 3,
    /// Authorized, but the app could not be reached.
    AppUnavailable = 4,
    /// HTTP/2 was asked for (ALPN `sidewall-h2/1`) on a port that is not an HTTP port.
    NotHttp = 5,
}

impl Status {
    /// Decodes a status byte.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Status::Allowed,
            1 => Status::Denied,
            2 => Status::UnknownPort,
            3 => Status::BadHeader,
            4 => Status::AppUnavailable,
            5 => Status::NotHttp,
            _ => return None,
        })
    }

    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Status::Allowed => "allowed",
            Status::Denied => "denied",
            Status::UnknownPort => "unknown_port",
            Status::BadHeader => "bad_header",
            Status::AppUnavailable => "app_unavailable",
            Status::NotHttp => "not_http",
        }
    }
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Not the Sidewall header (or another version).
    #[error("not a Sidewall port header")]
    Magic,
    /// Port 0.
    #[error("port 0 is not a port")]
    Port,
    /// The stream ended or failed first.
    #[error("reading the port header: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes the header for `port`.
pub fn encode_header(port: u16) -> [u8; 5] {
    let [high, low] = port.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], high, low]
}

/// Reads a header and returns the port.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u16, HeaderError> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    if header[..3] != MAGIC {
        return Err(HeaderError::Magic);
    }
    match u16::from_be_bytes([header[3], header[4]]) {
        0 => Err(HeaderError::Port),
        port => Ok(port),
    }
}

/// Writes a status byte.
pub async fn write_status<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: Status,
) -> std::io::Result<()> {
    stream.write_all(&[status as u8]).await?;
    stream.flush().await
}

/// Sends the header and waits for the status, within `timeout`.
pub async fn request_port<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u16,
    timeout: Duration,
) -> std::io::Result<Option<Status>> {
    let exchange = async {
        stream.write_all(&encode_header(port)).await?;
        stream.flush().await?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).await?;
        Ok(Status::from_byte(status[0]))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer to the port header")
    })?
}
