//! Randomness, hashing and constant-time comparison, from the one crypto provider (aws-lc-rs).

use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Fills `bytes` from the system's secure random source.
pub fn fill(bytes: &mut [u8]) {
    // SystemRandom::fill only fails if the OS has no entropy source at all, in which case no
    // key could be generated either; abort rather than issue predictable secrets.
    if SystemRandom::new().fill(bytes).is_err() {
        std::process::abort();
    }
}

/// `n` random bytes as lowercase hex.
pub fn hex_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    fill(&mut bytes);
    hex(&bytes)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hex text (either case); `None` for anything else.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// SHA-256, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}
