//! The certificate signing request a workload sends to get its certificate (`ca/csr.rs`), on
//! arbitrary bytes: as DER, and as text (PEM).
//!
//! Never panics; a CSR it accepts yields a public key and a key type.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_control_plane::ca::csr;

fuzz_target!(|input: &[u8]| {
    if let Ok(key) = csr::parse_der(input) {
        assert!(!key.spki.is_empty() && !key.kind.is_empty());
    }
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = csr::parse(text);
    }
});
