//! Request path normalization on arbitrary UTF-8.
//!
//! Never panics; a path it accepts comes out absolute, without `//`, `.` or `..` segments, and
//! unchanged by normalizing it again. A normalized path without `*` is also a valid path
//! pattern that matches itself, so a policy author can write any path the app receives.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_policies::http::{PathPattern, normalize_path};

fuzz_target!(|input: &str| {
    let Ok(normalized) = normalize_path(input) else {
        return;
    };
    assert!(normalized.starts_with('/'), "{input:?} -> {normalized:?}");
    assert!(!normalized.contains("//"), "{input:?} -> {normalized:?}");
    assert!(
        !normalized.split('/').any(|s| s == "." || s == ".."),
        "{input:?} -> {normalized:?}"
    );
    let again = normalize_path(&normalized)
        .unwrap_or_else(|e| panic!("{input:?} -> {normalized:?} is refused: {e}"));
    assert_eq!(again, normalized, "normalizing {input:?} twice");
    if !normalized.contains('*') {
        let pattern = PathPattern::parse(&normalized)
            .unwrap_or_else(|e| panic!("{input:?} -> {normalized:?} is not a pattern: {e}"));
        assert!(pattern.matches(&normalized), "{normalized:?} as a pattern");
    }
});
