//! The progress line on stderr: what runs, which round, and about how long is left. On a
//! terminal it rewrites one line; elsewhere (CI logs) it prints a line per step.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Tracks blocks (one contender in one round) done and the time they took.
pub(crate) struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    /// When the last block finished, from `started`.
    finished: Duration,
    estimate: Duration,
    terminal: bool,
}

/// `1h02m`, `4m05s` or `12s`.
pub(crate) fn human(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// `total` blocks, each estimated at `estimate` until one has been measured.
    pub(crate) fn new(total: usize, estimate: Duration) -> Self {
        Self {
            total,
            done: 0,
            started: Instant::now(),
            finished: Duration::ZERO,
            estimate,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Time left: blocks left × the mean finished block (or the estimate before any finished),
    /// less what the current block has already run.
    pub(crate) fn left(&self, within_block: Duration) -> Duration {
        let per_block = if self.done == 0 {
            self.estimate
        } else {
            self.finished / u32::try_from(self.done).unwrap_or(u32::MAX)
        };
        let remaining = u32::try_from(self.total.saturating_sub(self.done)).unwrap_or(u32::MAX);
        (per_block * remaining).saturating_sub(within_block.min(per_block))
    }

    /// Shows the current step; `within_block` is how long the current block has run.
    pub(crate) fn show(&self, round: u32, rounds: u32, what: &str, within_block: Duration) {
        let line = format!(
            "[round {round}/{rounds} · {}/{}] {what} · about {} left",
            (self.done + 1).min(self.total),
            self.total,
            human(self.left(within_block))
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// One block finished.
    pub(crate) fn block_done(&mut self) {
        self.done += 1;
        self.finished = self.started.elapsed();
    }

    /// Ends the line (on a terminal) before other output.
    pub(crate) fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn time_left_starts_from_the_estimate() {
        let progress = Progress::new(4, Duration::from_secs(60));
        assert_eq!(progress.left(Duration::ZERO), Duration::from_secs(240));
        assert_eq!(
            progress.left(Duration::from_secs(20)),
            Duration::from_secs(220)
        );
    }
}
