//! Repeated log lines folded into one (review L9): an authenticated peer whose streams are
//! refused one by one would otherwise write a warning per stream, at stream rate.
//!
//! The first line for a key (peer, port, reason) is written; the same key is then quiet for
//! [`WINDOW`], and the next line written after it says how many were folded meanwhile. Metrics
//! still count every event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a key stays quiet after a line.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Keys remembered at most; past it, the table starts over (lines are written again).
const MAX_KEYS: usize = 4096;

/// A line's key: the peer (identity or address), the port, the reason.
type Key = (String, u16, &'static str);

/// Per-key windows: since when the key is quiet, and how many lines were folded.
#[derive(Default)]
pub struct LogRate(Mutex<HashMap<Key, (Instant, u64)>>);

/// The sidecar's one table: refusals are logged from places that share no state.
static LINES: std::sync::LazyLock<LogRate> = std::sync::LazyLock::new(LogRate::default);

/// [`LogRate::admit`] on the sidecar's table.
pub fn admit(peer: &str, port: u16, reason: &'static str) -> Option<u64> {
    LINES.admit(peer, port, reason)
}

impl LogRate {
    /// `Some(folded)` when a line should be written now (`folded` lines were skipped since the
    /// last one), `None` when this one is folded.
    pub fn admit(&self, peer: &str, port: u16, reason: &'static str) -> Option<u64> {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if table.len() >= MAX_KEYS {
            table.clear();
        }
        match table.get_mut(&(peer.to_owned(), port, reason)) {
            Some((since, folded)) if now.duration_since(*since) < WINDOW => {
                *folded += 1;
                None
            }
            Some((since, folded)) => {
                let skipped = *folded;
                *since = now;
                *folded = 0;
                Some(skipped)
            }
            None => {
                table.insert((peer.to_owned(), port, reason), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_written_once_per_window_with_what_was_folded() {
        let rate = LogRate::default();
        assert_eq!(rate.admit("spiffe://td/a", 80, "deny"), Some(0));
        assert_eq!(rate.admit("spiffe://td/a", 80, "deny"), None);
        assert_eq!(rate.admit("spiffe://td/a", 80, "deny"), None);
        assert_eq!(rate.admit("spiffe://td/a", 81, "deny"), Some(0));
        assert_eq!(rate.admit("spiffe://td/b", 80, "deny"), Some(0));
        assert_eq!(rate.admit("spiffe://td/a", 80, "revoked"), Some(0));
    }
}
