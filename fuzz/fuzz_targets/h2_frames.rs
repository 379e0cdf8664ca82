//! The HTTP/2 frame follower of inbound connections (`proxy/src/h2frames.rs`), on arbitrary
//! bytes cut in pieces.
//!
//! Never panics, and the piece size never changes the verdict: the same bytes are a flood
//! (more PING and SETTINGS frames than the budget) however the reads split them.

#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sidewall_proxy::h2frames::Follower;

fuzz_target!(|input: &[u8]| {
    let Some((&step, bytes)) = input.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut whole = Follower::new(true);
    let verdict = whole.feed(bytes, now);
    let mut pieces = Follower::new(true);
    let split = bytes
        .chunks(usize::from(step.max(1)))
        .all(|piece| pieces.feed(piece, now));
    assert_eq!(split, verdict);
});
