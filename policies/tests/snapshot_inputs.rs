//! Snapshots found by the `snapshot_json` fuzz target, kept as regression inputs: each either
//! is refused or reads back equal after it is written.

#![allow(clippy::expect_used)] // a helper of the tests: it panics to report

use sidewall_policies::snapshot::Snapshot;

fn round_trips(input: &[u8]) {
    if let Ok(snapshot) = Snapshot::from_json(input) {
        let again =
            Snapshot::from_json(&snapshot.to_json()).expect("a written snapshot reads back");
        assert_eq!(again, snapshot);
    }
}

/// A host pattern `*.sh..`: read as `*.sh.`, written so, and read back as `*.sh`.
#[test]
fn a_host_pattern_with_an_empty_label() {
    round_trips(include_bytes!("data/snapshot-host-double-dot.json"));
}
