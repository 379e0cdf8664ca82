//! The sidecar's configuration file (`sidewall proxy --config`), on arbitrary text.
//!
//! Never panics: every text is a configuration or an error.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sidewall_proxy::config::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let _ = Config::from_text("fuzz.yaml", text, Path::new("/fuzz"), |_| None);
});
