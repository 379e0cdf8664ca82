//! An audit trail as `sidewall audit verify` reads it (`control-plane/src/audit.rs`): to the
//! auditor the control plane's answer, and the store behind it, are untrusted, so every record,
//! its certificate chain and its signature are arbitrary here. One JSON record per line.
//!
//! Never panics; a checkpoint the fuzzer made never verifies (it cannot sign for the root).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_control_plane::audit::{verify, verify_checkpoints};
use sidewall_policies::TrustDomain;
use sidewall_policies::wire::operator::AuditRecord;

/// A root the fuzzer holds no key for.
const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIBtjCCAVugAwIBAgIUF8IB5lvwN9KPN7+3Jq5H1UwOgBMwCgYIKoZIzj0EAwIw\nFDESMBAGA1UECgwJZnV6eiByb290MCAXDTI2MTIwNzE1MDEwMFoYDzIxMjYxMTEz\nMTUwMTAwWjAUMRIwEAYDVQQKDAlmdXp6IHJvb3QwWTATBgcqhkjOPQIBBggqhkjO\nPQMBBwNCAAQXgx5OJkpWLx9uxDbNYx4PHIG+DLJE+rlRwyeLM8OCW7Oa7rqD2c7z\nrilygincE+sJqf56Wt1BO8NYgfGZmweuo4GIMIGFMB0GA1UdDgQWBBQ1vwm9vpj/\n6qOqWBK1ym1RJw2g8zAfBgNVHSMEGDAWgBQ1vwm9vpj/6qOqWBK1ym1RJw2g8zAP\nBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAiBgNVHREEGzAZhhdzcGlm\nZmU6Ly9zaWRld2FsbC5sb2NhbDAKBggqhkjOPQQDAgNJADBGAiEA1LAknJcNNKso\n2NNDsLBfJ0wHYoXkMiAcKOc+QNPr0IACIQCqmxH4ZQt4j9CXIUiXGjMFoOzjGqr9\nsJR2OA2bhUVSFw==\n-----END CERTIFICATE-----";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let records: Vec<AuditRecord> = text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let Ok(domain) = TrustDomain::new("sidewall.local") else {
        return;
    };
    let _ = verify(&records);
    if let Ok(signed) = verify_checkpoints(&records, &domain, ROOT, 1_800_000_000, 900) {
        assert_eq!(signed.checkpoints, 0, "a checkpoint the fuzzer made verified");
    }
});
