//! HTTP/2 frames that make the receiver work but carry no request, limited per connection.
//!
//! A `PING` or a `SETTINGS` frame must be answered (an acknowledgement), yet nothing in HTTP/2
//! limits how many a peer sends. hyper's h2 answers them one at a time (it stops reading while
//! an answer is pending, so memory stays bounded), but a peer that streams them keeps a worker
//! busy answering: under a PING flood from one allowed peer, other peers' requests waited
//! 50 times longer than in quiet (the hostile suite's `h2-ping-flood`; CVE-2019-9512 is the
//! same attack against servers that queued the answers).
//!
//! [`watched`] wraps an inbound connection that speaks HTTP/2 (an HTTP port, or a shared
//! connection) and follows the frame headers as the bytes go by. Each `PING` and `SETTINGS`
//! that is not itself an acknowledgement spends a token from a bucket of [`BURST`], refilled at
//! [`PER_SECOND`] a second. A peer that runs out is flooding: the read fails, hyper's h2
//! closes the connection, and it is counted
//! (`sidewall_proxy_connections_closed_total{reason="control_flood"}`) and logged once per
//! peer per window. A sidecar pings a shared connection every `limits.keepalive` (1 s at the
//! least) and sends `SETTINGS` once, far inside the budget.
//!
//! A connection that does not open with the HTTP/2 preface is not followed (an HTTP/1 port:
//! `framing.rs` follows it instead).

use std::time::Instant;

/// Control frames a connection may send at once.
pub const BURST: f64 = 100.0;
/// Control frames a connection may send per second, sustained.
pub const PER_SECOND: f64 = 10.0;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Where the follower is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Matching the preface, this many bytes of it so far (`expect_preface` only).
    Preface(usize),
    /// Reading a frame header, this many of its 9 bytes so far.
    Header([u8; 9], usize),
    /// Skipping a frame payload, this many bytes left.
    Payload(u32),
    /// Not HTTP/2 (or already refused): nothing more is followed.
    Off,
    /// The peer ran out of tokens.
    Flooding,
}

/// The frame follower and its token bucket; pure, fed every byte read from the peer.
#[derive(Debug)]
pub struct Follower {
    state: State,
    tokens: f64,
    since: Instant,
}

impl Follower {
    /// A follower for a connection that must first send the preface (`preface`), or one
    /// whose preface was already read.
    pub fn new(preface: bool) -> Self {
        Self {
            state: if preface {
                State::Preface(0)
            } else {
                State::Header([0; 9], 0)
            },
            tokens: BURST,
            since: Instant::now(),
        }
    }

    /// Follows `bytes`; false once the peer has sent more control frames than its budget.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return true,
                State::Flooding => return false,
                State::Preface(matched) => {
                    let n = (PREFACE.len() - *matched).min(bytes.len());
                    if bytes[..n] != PREFACE[*matched..*matched + n] {
                        self.state = State::Off;
                        return true;
                    }
                    *matched += n;
                    bytes = &bytes[n..];
                    if *matched == PREFACE.len() {
                        self.state = State::Header([0; 9], 0);
                    }
                }
                State::Payload(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= u32::try_from(n).unwrap_or(*left);
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::Header([0; 9], 0);
                    }
                }
                State::Header(header, have) => {
                    let n = (9 - *have).min(bytes.len());
                    header[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < 9 {
                        continue;
                    }
                    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                    let (kind, flags) = (header[3], header[4]);
                    let costly = (kind == PING || kind == SETTINGS) && flags & ACK == 0;
                    self.state = if length == 0 {
                        State::Header([0; 9], 0)
                    } else {
                        State::Payload(length)
                    };
                    if costly && !self.spend(now) {
                        self.state = State::Flooding;
                        return false;
                    }
                }
            }
        }
        true
    }

    fn spend(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        self.since = now;
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Counts an inbound HTTP/2 connection's control frames (see the module) and refuses it past
/// the budget, counted and logged.
pub(crate) struct FloodWatch {
    follower: Follower,
    /// The peer, for the log line.
    peer: String,
    port: u16,
}

/// An inbound connection followed from its first byte; `port` is the service port (0 for a
/// shared connection, which carries many).
pub(crate) fn watched<S>(
    inner: S,
    peer: String,
    port: u16,
) -> crate::transport::Observed<S, FloodWatch> {
    crate::transport::Observed::new(
        inner,
        FloodWatch {
            follower: Follower::new(true),
            peer,
            port,
        },
    )
}

impl crate::transport::Observer for FloodWatch {
    fn observe(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.follower.feed(bytes, Instant::now()) {
            return Ok(());
        }
        metrics::counter!(crate::metric::CONNECTIONS_CLOSED, "reason" => "control_flood")
            .increment(1);
        if let Some(folded) = crate::lograte::admit(&self.peer, self.port, "control_flood") {
            tracing::warn!(peer = %self.peer, port = self.port, folded, burst = BURST, per_second = PER_SECOND, "connection closed: more HTTP/2 PING and SETTINGS frames than allowed");
        }
        Err(std::io::Error::other("HTTP/2 control frame flood"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut bytes = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 0];
        bytes.extend_from_slice(payload);
        bytes
    }

    fn pings(count: usize, flags: u8) -> Vec<u8> {
        (0..count)
            .flat_map(|_| frame(PING, flags, &[0; 8]))
            .collect()
    }

    #[test]
    fn a_burst_is_allowed_and_more_is_a_flood_in_any_split() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(SETTINGS, 0, &[]));
        input.extend(frame(0x1, 0x5, &[0x82, 0x87, 0x84]));
        input.extend(pings(98, 0));
        input.extend(frame(0x0, 0x1, &[b'x'; 300]));
        input.extend(pings(1, 0));
        for step in [1, 2, 7, 9, 17, 4096] {
            let now = Instant::now();
            let mut follower = Follower::new(true);
            assert!(
                input.chunks(step).all(|piece| follower.feed(piece, now)),
                "step {step}"
            );
            assert!(!follower.feed(&pings(1, 0), now), "step {step}");
            assert!(!follower.feed(b"anything", now), "a flood stays a flood");
        }
    }

    #[test]
    fn acknowledgements_cost_nothing_and_the_bucket_refills() {
        let start = Instant::now();
        let mut follower = Follower::new(false);
        assert!(follower.feed(&pings(10_000, ACK), start));
        assert!(follower.feed(&pings(100, 0), start));
        assert!(!Follower::new(false).feed(&pings(101, 0), start));
        // Ten seconds later, a hundred more; at ten a second for a minute, never refused.
        assert!(follower.feed(&pings(100, 0), start + Duration::from_secs(10)));
        for second in 11..71 {
            assert!(follower.feed(&pings(10, 0), start + Duration::from_secs(second)));
        }
    }

    #[test]
    fn http1_is_not_followed() {
        let mut follower = Follower::new(true);
        assert!(follower.feed(b"GET / HTTP/1.1\r\n\r\n", Instant::now()));
        assert!(follower.feed(&pings(1000, 0), Instant::now()));
    }
}
