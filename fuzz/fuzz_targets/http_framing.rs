//! The HTTP/1 request framing scanner that finds `Content-Length` with `Transfer-Encoding`
//! (`proxy/src/http/framing.rs`), on arbitrary bytes cut in arbitrary pieces.
//!
//! Never panics, and how the bytes arrive (the first input byte sets the piece size) never
//! changes which requests it refuses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_proxy::fuzzing::http_framing;

fuzz_target!(|input: &[u8]| {
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let whole = http_framing(data, data.len(), 8);
    let pieces = http_framing(data, usize::from(step), 8);
    assert_eq!(whole, pieces, "the piece size changed the verdict");
});
