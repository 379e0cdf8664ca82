//! The one smuggling class hyper hides: `Content-Length` together with `Transfer-Encoding`.
//!
//! hyper (correctly, per RFC 9112 §6.3) frames such a request by the chunked encoding, drops
//! the `Content-Length` header and closes the connection after the response, so nothing can be
//! smuggled to the app. But the request itself still arrives looking clean, and a sender of
//! both headers is either broken or probing for a desync: Sidewall answers it `400`.
//!
//! [`Scanned`] wraps the client side of an HTTP/1 connection and reads each request head as
//! the bytes go by (with `httparse`, the parser hyper itself uses), following the body framing
//! (`Content-Length` bytes, or the chunked encoding) to find the next head. It records the
//! index of the first head that carries both headers; [`Scan::refuses`] tells the request
//! handler, which counts requests in the order hyper delivers them (HTTP/1 is serial), whether
//! to refuse the one at hand.
//!
//! The scan also times the connection (HTTP/1 only): a head must arrive whole within
//! [`HEAD_TIMEOUT`] of its first byte (a slow-header client is cut off), and a connection with
//! no bytes either way for `limits.idleTimeout` is idle; [`Scan::expired`] resolves when
//! either happens. A keep-alive connection waiting for its next request is not in a head: apps
//! pool connections for a minute or more and send on them whenever they like, and a request
//! sent on a connection the sidecar closed in between fails (a `POST` cannot be retried).
//!
//! The scan stops — and refuses nothing more — at anything it does not follow: an HTTP/2
//! preface (HTTP/2 has no such framing confusion; hyper's h2 refuses `transfer-encoding`), an
//! upgrade or `CONNECT` (the bytes after it are not HTTP once the app agrees; a refused upgrade
//! ends the connection, see `crate::http`), a head hyper will refuse itself (malformed, too
//! large, a non-chunked `Transfer-Encoding`), or a malformed chunk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How long a request head may take from its first byte to its last.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Head bytes buffered before the scan gives up (hyper answers `431` well before this).
const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed per head (hyper's default limit is 100; more is refused by hyper).
const MAX_HEADERS: usize = 128;
const NONE: u64 = u64::MAX;

/// What the scan found, shared with the request handler and the connection's driver.
#[derive(Debug)]
pub(crate) struct Scan {
    first_bad: AtomicU64,
    delivered: AtomicU64,
    /// The times below count milliseconds from here.
    clock: Instant,
    /// When the head being read began (`NONE`: no head is being read).
    head_since: AtomicU64,
    /// When bytes last moved either way.
    last: AtomicU64,
    /// The client spoke HTTP/2: nothing here is timed.
    http2: AtomicBool,
    /// A head began: a waiting [`Scan::expired`] takes its deadline into account.
    head_began: tokio::sync::Notify,
}

impl Scan {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            first_bad: AtomicU64::new(NONE),
            delivered: AtomicU64::new(0),
            clock: Instant::now(),
            head_since: AtomicU64::new(NONE),
            last: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            head_began: tokio::sync::Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Resolves with the reason the connection must close: a request head begun
    /// [`HEAD_TIMEOUT`] ago is still not whole (`header_timeout`), or no bytes moved either way
    /// for `idle` (`idle`). Never for HTTP/2, which has its own keep-alive.
    pub(crate) async fn expired(&self, idle: Duration) -> &'static str {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        loop {
            if self.http2.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            // Registered before the state is read, so a head that begins after this read
            // still wakes the wait below (it would otherwise sleep until `idle`).
            let began = self.head_began.notified();
            tokio::pin!(began);
            began.as_mut().enable();
            let now = self.now();
            let head = self.head_since.load(Ordering::Relaxed);
            let head_at = match head {
                NONE => NONE,
                since => since.saturating_add(millis(HEAD_TIMEOUT)),
            };
            let idle_at = self
                .last
                .load(Ordering::Relaxed)
                .saturating_add(millis(idle));
            if head_at <= now {
                return "header_timeout";
            }
            if idle_at <= now {
                return "idle";
            }
            let wait = head_at.min(idle_at) - now;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                () = &mut began => {}
            }
        }
    }

    /// Called once per request, in delivery order: true when this request carried both
    /// `Content-Length` and `Transfer-Encoding`.
    pub(crate) fn refuses(&self) -> bool {
        let index = self.delivered.fetch_add(1, Ordering::Relaxed);
        index >= self.first_bad.load(Ordering::Relaxed)
    }
}

enum State {
    /// Reading a request head (bytes so far).
    Head(Vec<u8>),
    /// Skipping a body of this many bytes.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not following any more.
    Done,
}

enum Chunk {
    /// The chunk-size line: value so far, digits seen, inside an extension.
    Size {
        value: u64,
        digits: u8,
        extension: bool,
    },
    /// Chunk data left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// Trailer section: whether the current line is empty so far.
    Trailer { empty: bool },
}

/// The scanner itself, fed every byte read from the client.
pub(crate) struct Scanner {
    state: State,
    heads: u64,
    scan: Arc<Scan>,
}

impl Scanner {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Body(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::Chunked(chunk) => {
                    let used = match chunked(chunk, bytes) {
                        Some(Step::Continue(used)) => used,
                        Some(Step::End(used)) => {
                            self.state = State::Head(Vec::new());
                            used
                        }
                        None => {
                            self.state = State::Done;
                            return;
                        }
                    };
                    bytes = &bytes[used..];
                }
                State::Head(buffer) => {
                    if buffer.is_empty() && bytes.starts_with(b"PRI * HTTP/2.0") {
                        self.scan.http2.store(true, Ordering::Relaxed);
                        self.state = State::Done;
                        return;
                    }
                    let before = buffer.len();
                    buffer.extend_from_slice(bytes);
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut request = httparse::Request::new(&mut headers);
                    match request.parse(buffer) {
                        Ok(httparse::Status::Complete(length)) => {
                            let next = framing(&request);
                            let used = length - before;
                            bytes = &bytes[used..];
                            match next {
                                Framing::Smuggling => {
                                    self.scan.first_bad.store(self.heads, Ordering::Relaxed);
                                    self.state = State::Done;
                                    return;
                                }
                                Framing::None => self.state = State::Head(Vec::new()),
                                Framing::Length(0) => self.state = State::Head(Vec::new()),
                                Framing::Length(n) => self.state = State::Body(n),
                                Framing::Chunked => {
                                    self.state = State::Chunked(Chunk::Size {
                                        value: 0,
                                        digits: 0,
                                        extension: false,
                                    })
                                }
                                Framing::Stop => self.state = State::Done,
                            }
                            self.heads += 1;
                        }
                        Ok(httparse::Status::Partial) if buffer.len() <= MAX_HEAD => return,
                        // Malformed or oversize: hyper refuses it and closes.
                        Ok(httparse::Status::Partial) | Err(_) => {
                            self.state = State::Done;
                            return;
                        }
                    }
                }
            }
        }
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    Smuggling,
    Stop,
}

fn framing(request: &httparse::Request<'_, '_>) -> Framing {
    if request.method == Some("CONNECT") {
        return Framing::Stop;
    }
    let mut length = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (parsed, length) {
                (None, _) => return Framing::Stop,
                (Some(n), Some(m)) if n != m => return Framing::Stop,
                (Some(n), _) => length = Some(n),
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(header.value);
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            return Framing::Stop;
        }
    }
    match (transfer_encoding, length) {
        (Some(_), Some(_)) => Framing::Smuggling,
        (Some(value), None) => {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked
            } else {
                Framing::Stop
            }
        }
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::None,
    }
}

enum Step {
    /// Used this many bytes; the body goes on.
    Continue(usize),
    /// Used this many bytes; the body (trailers included) ended.
    End(usize),
}

/// Advances the chunked-body state over `bytes`; `None` when the encoding is malformed.
fn chunked(chunk: &mut Chunk, bytes: &[u8]) -> Option<Step> {
    let mut used = 0;
    while used < bytes.len() {
        match chunk {
            Chunk::Data(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - used);
                *left -= n as u64;
                used += n;
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                continue;
            }
            Chunk::DataEnd => match bytes[used] {
                b'\r' => {}
                b'\n' => {
                    *chunk = Chunk::Size {
                        value: 0,
                        digits: 0,
                        extension: false,
                    }
                }
                _ => return None,
            },
            Chunk::Size {
                value,
                digits,
                extension,
            } => match bytes[used] {
                b'\n' if *digits == 0 => return None,
                b'\n' if *value == 0 => *chunk = Chunk::Trailer { empty: true },
                b'\n' => *chunk = Chunk::Data(*value),
                b'\r' => {}
                b';' | b' ' | b'\t' => *extension = true,
                _ if *extension => {}
                byte => {
                    let digit = char::from(byte).to_digit(16)?;
                    *digits += 1;
                    if *digits > 16 {
                        return None;
                    }
                    *value = value.checked_mul(16)?.checked_add(u64::from(digit))?;
                }
            },
            Chunk::Trailer { empty } => match bytes[used] {
                b'\n' if *empty => return Some(Step::End(used + 1)),
                b'\n' => *empty = true,
                b'\r' => {}
                _ => *empty = false,
            },
        }
        used += 1;
    }
    Some(Step::Continue(used))
}

/// A client stream whose request heads are scanned as hyper reads them.
pub(crate) type Scanned<S> = crate::transport::Observed<S, Scanner>;

/// Wraps `inner`; the returned [`Scan`] is consulted once per request.
pub(crate) fn scanned<S>(inner: S) -> (Scanned<S>, Arc<Scan>) {
    let scan = Scan::new();
    let scanner = Scanner {
        state: State::Head(Vec::new()),
        heads: 0,
        scan: scan.clone(),
    };
    (crate::transport::Observed::new(inner, scanner), scan)
}

impl crate::transport::Observer for Scanner {
    fn observe(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let heads = self.heads;
        self.feed(bytes);
        let now = self.scan.now();
        self.scan.last.store(now, Ordering::Relaxed);
        // A head is open once it holds more than the empty lines a client may send between
        // requests; one that began in this read (after another ended) is timed from now.
        let open = matches!(&self.state, State::Head(buffer) if buffer.iter().any(|&b| b != b'\r' && b != b'\n'));
        let since = &self.scan.head_since;
        if !open {
            since.store(NONE, Ordering::Relaxed);
        } else if since.load(Ordering::Relaxed) == NONE || self.heads != heads {
            since.store(now, Ordering::Relaxed);
            self.scan.head_began.notify_waiters();
        }
        Ok(())
    }

    fn wrote(&mut self) {
        self.scan.last.store(self.scan.now(), Ordering::Relaxed);
    }
}

/// Feeds `input` to a scanner in pieces of `step` bytes (at least 1); returns which of the
/// first `count` requests it would refuse. For the tests and the fuzz target.
pub(crate) fn refused(input: &[u8], step: usize, count: usize) -> Vec<bool> {
    let scan = Scan::new();
    let mut scanner = Scanner {
        state: State::Head(Vec::new()),
        heads: 0,
        scan: scan.clone(),
    };
    for piece in input.chunks(step.max(1)) {
        scanner.feed(piece);
    }
    (0..count).map(|_| scan.refuses()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const SMUGGLE: &[u8] =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn finds_the_smuggling_request_behind_any_framing_in_any_split() {
        let mut input = Vec::new();
        input.extend_from_slice(GET);
        input.extend_from_slice(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
        );
        input.extend_from_slice(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        input.extend_from_slice(SMUGGLE);
        for step in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                refused(&input, step, 5),
                [false, false, false, true, true],
                "step {step}"
            );
        }
    }

    #[test]
    fn either_order_of_the_two_headers_and_any_case() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: gzip, CHUNKED\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(refused(input, 4096, 1), [true]);
    }

    #[test]
    fn clean_keep_alive_is_never_refused() {
        let input: Vec<u8> = GET.iter().copied().cycle().take(GET.len() * 50).collect();
        assert!(refused(&input, 5, 50).iter().all(|r| !r));
    }

    proptest::proptest! {
        /// Whatever a client sends, in whatever pieces: no panic, and a stream of clean
        /// requests ahead of it is never refused.
        #[test]
        fn arbitrary_bytes_never_panic_and_never_refuse_clean_requests(
            clean in 0usize..5,
            noise in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(b"\r\n:;0123456789abcdefABCDEF ,chunked".to_vec()),
                ],
                0..400,
            ),
            step in 1usize..64,
        ) {
            let mut input: Vec<u8> = GET.repeat(clean);
            input.extend_from_slice(&noise);
            let verdicts = refused(&input, step, clean + 1);
            proptest::prop_assert!(verdicts[..clean].iter().all(|r| !r));
        }
    }

    /// The scanner behind a connection, fed as reads arrive.
    fn timed() -> (Scanner, Arc<Scan>) {
        let scan = Scan::new();
        let scanner = Scanner {
            state: State::Head(Vec::new()),
            heads: 0,
            scan: scan.clone(),
        };
        (scanner, scan)
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_is_timed_from_its_first_byte_and_a_quiet_connection_is_idle() {
        use crate::transport::Observer;
        let idle = Duration::from_secs(60);
        let (mut scanner, scan) = timed();
        // Waiting for a request is not a head; empty lines between requests are not either.
        scanner.observe(GET).unwrap();
        scanner.observe(b"\r\n").unwrap();
        let started = Instant::now();
        assert_eq!(scan.expired(idle).await, "idle");
        assert_eq!(started.elapsed(), idle);
        // A head split over reads is timed from its first byte, not its last.
        scanner.observe(b"GET / HT").unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        scanner.observe(b"TP/1.1\r\n").unwrap();
        let started = Instant::now();
        assert_eq!(scan.expired(idle).await, "header_timeout");
        assert_eq!(started.elapsed(), HEAD_TIMEOUT - Duration::from_secs(6));
        // A head that began in the read that ended the one before is timed from that read.
        let (mut scanner, scan) = timed();
        scanner.observe(b"GET / HT").unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        scanner
            .observe(b"TP/1.1\r\nHost: a\r\n\r\nGET /next")
            .unwrap();
        let started = Instant::now();
        assert_eq!(scan.expired(idle).await, "header_timeout");
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
        // Writing to the client is activity too.
        let (mut scanner, scan) = timed();
        scanner.observe(GET).unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        scanner.wrote();
        let started = Instant::now();
        assert_eq!(scan.expired(idle).await, "idle");
        assert_eq!(started.elapsed(), idle);
    }

    /// A head that begins while the connection is already waiting is timed from its first
    /// byte, not by the idle timeout the wait began with.
    #[tokio::test(start_paused = true)]
    async fn a_head_that_begins_during_the_wait_is_timed() {
        use crate::transport::Observer;
        let idle = Duration::from_secs(3600);
        let (mut scanner, scan) = timed();
        let started = Instant::now();
        let waiting = scan.expired(idle);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), waiting.as_mut())
                .await
                .is_err()
        );
        scanner.observe(b"GET / HT").unwrap();
        assert_eq!(waiting.await, "header_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(1) + HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_is_not_timed_here() {
        use crate::transport::Observer;
        let (mut scanner, scan) = timed();
        scanner
            .observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .unwrap();
        let waited = tokio::time::timeout(
            Duration::from_secs(7200),
            scan.expired(Duration::from_secs(1)),
        )
        .await;
        assert!(waited.is_err());
    }

    #[test]
    fn stops_at_what_it_does_not_follow() {
        // HTTP/2, an upgrade, CONNECT, a malformed chunk: nothing after is refused.
        let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        h2.extend_from_slice(SMUGGLE);
        assert_eq!(refused(&h2, 4096, 1), [false]);
        let mut upgrade = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n".to_vec();
        upgrade.extend_from_slice(SMUGGLE);
        assert_eq!(refused(&upgrade, 4096, 2), [false, false]);
        let mut bad_chunk =
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec();
        bad_chunk.extend_from_slice(SMUGGLE);
        assert_eq!(refused(&bad_chunk, 4096, 2), [false, false]);
    }
}
