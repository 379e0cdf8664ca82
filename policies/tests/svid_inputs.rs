//! Certificates found by the `svid_der` fuzz target, kept as regression inputs.

use sidewall_policies::svid::{Svid, SvidError, Usage};

/// A leaf whose validity ends (3 Dec) before it starts (6 Dec), found by the fuzz target:
/// `from_der` accepted it. It can never be valid, so it is refused as malformed, whatever the
/// clock says.
#[test]
fn a_validity_that_ends_before_it_starts_is_refused() {
    let der = include_bytes!("data/svid-validity-inverted.der");
    for usage in [Usage::Client, Usage::Server] {
        match Svid::from_der(der, usage) {
            Err(SvidError::Malformed(why)) => assert!(why.contains("validity"), "{why}"),
            other => panic!("{usage:?}: {other:?}"),
        }
    }
}
