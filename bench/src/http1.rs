//! Just enough HTTP/1.1 for the `sidewall-http` chain, whose inbound port parses every request:
//! `POST /echo` with a `content-length` body is answered `200` with the same body (keep-alive);
//! `POST /sink` with a huge `content-length` is read and counted until the connection closes;
//! `GET /count` is answered with the count so far (target mode).
//! Only the framing the load generator and the sidecar produce is understood: a head ended by
//! an empty line, `content-length` bodies, no chunking.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The `content-length` of a sink request: more than any run sends.
pub(crate) const SINK_LENGTH: u64 = 1 << 40;
/// The longest head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A request: `POST <path>`, a host, the body's length, the body.
pub(crate) fn request(path: &str, body: &[u8]) -> Vec<u8> {
    let mut message = format!(
        "POST {path} HTTP/1.1\r\nhost: b.bench.local\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    message.extend_from_slice(body);
    message
}

/// The head of a sink request (its body follows for as long as the client writes).
pub(crate) fn sink_head() -> Vec<u8> {
    format!("POST /sink HTTP/1.1\r\nhost: b.bench.local\r\ncontent-length: {SINK_LENGTH}\r\n\r\n")
        .into_bytes()
}

/// The request for the count of bytes sunk so far (target mode).
pub(crate) fn count_request() -> Vec<u8> {
    b"GET /count HTTP/1.1\r\nhost: b.bench.local\r\n\r\n".to_vec()
}

/// The head of a `200` response with a body of `length` bytes.
pub(crate) fn response_head(length: usize) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n").into_bytes()
}

/// What the framing needs from a head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// The request or status line.
    pub(crate) start: String,
    /// The body length (0 without `content-length`).
    pub(crate) content_length: u64,
}

impl Head {
    /// The second word of the start line: a request's path or a response's status code.
    pub(crate) fn second_word(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }
}

/// Parses a head (start line and headers, up to and including the empty line).
pub(crate) fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let start = lines.next()?.to_owned();
    let mut content_length = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().ok()?;
        }
    }
    Some(Head {
        start,
        content_length,
    })
}

fn head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads one head from `stream` into `buffer` (which may already hold bytes) and removes it
/// from the buffer, leaving whatever followed. `None` on a clean end of stream before a head.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Option<Head>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = head_end(buffer) {
            let head = parse_head(&buffer[..end]).ok_or_else(|| invalid("unreadable HTTP head"))?;
            buffer.drain(..end);
            return Ok(Some(head));
        }
        if buffer.len() > MAX_HEAD {
            return Err(invalid("HTTP head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(invalid("the stream ended inside an HTTP head"))
            };
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until `buffer` holds at least `length` bytes.
pub(crate) async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
    length: usize,
) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    while buffer.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Reads a `200` response with a `length`-byte body and discards it.
pub(crate) async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
    length: usize,
) -> std::io::Result<()> {
    let head = read_head(stream, buffer)
        .await?
        .ok_or_else(|| invalid("the stream ended before the response"))?;
    if head.second_word() != "200" {
        return Err(invalid(&format!("response {:?}", head.start)));
    }
    if head.content_length != length as u64 {
        return Err(invalid("unexpected response length"));
    }
    read_body(stream, buffer, length).await?;
    buffer.drain(..length);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_with_any_header_case() {
        let head = parse_head(
            b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 1024\r\nx-sidewall-peer-identity: spiffe://x/y\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.second_word(), "/echo");
        assert_eq!(head.content_length, 1024);
        let response = parse_head(&response_head(7)).unwrap();
        assert_eq!(
            (response.second_word(), response.content_length),
            ("200", 7)
        );
        assert!(parse_head(b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn a_request_is_read_back_with_what_follows_it() {
        let mut bytes = request("/echo", b"hello");
        bytes.extend_from_slice(b"POST");
        let mut reader = &bytes[..];
        let mut buffer = Vec::new();
        let head = read_head(&mut reader, &mut buffer).await.unwrap().unwrap();
        assert_eq!(head.content_length, 5);
        read_body(&mut reader, &mut buffer, 5).await.unwrap();
        assert_eq!(&buffer[..], b"helloPOST");
    }
}
