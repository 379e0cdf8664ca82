//! A peer's leaf certificate checked against the X.509-SVID rules (`Svid::from_der`), on
//! arbitrary bytes, as a client's and as a server's.
//!
//! Never panics; an SVID it accepts has a SPIFFE ID that parses back to itself and a validity
//! period that does not end before it starts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::{Svid, Usage};

fuzz_target!(|input: &[u8]| {
    for usage in [Usage::Client, Usage::Server] {
        if let Ok(svid) = Svid::from_der(input, usage) {
            assert_eq!(SpiffeId::parse(svid.id.as_str()).as_ref(), Ok(&svid.id));
            assert!(svid.not_before <= svid.not_after);
        }
    }
});
