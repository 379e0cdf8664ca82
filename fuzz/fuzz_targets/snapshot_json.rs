//! The snapshot a sidecar receives from the control plane, on arbitrary bytes.
//!
//! Never panics; a snapshot it accepts serializes back to JSON that parses to the same
//! snapshot, so what a sidecar saves to its state directory is what it reloads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_policies::snapshot::Snapshot;

fuzz_target!(|input: &[u8]| {
    let Ok(snapshot) = Snapshot::from_json(input) else {
        return;
    };
    let again = Snapshot::from_json(&snapshot.to_json()).expect("a written snapshot reads back");
    assert_eq!(again, snapshot);
});
