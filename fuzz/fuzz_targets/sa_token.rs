//! A Kubernetes service-account token as a joining sidecar sends it
//! (`attestation/kubernetes.rs`), on arbitrary text: the header, the base64 and the JSON are
//! read before any signature is checked, so all of it is the sender's.
//!
//! Never panics; nothing unsigned by the issuer's key is accepted.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sidewall_control_plane::attestation::kubernetes::{
    DEFAULT_IDENTITY, KeySource, Kubernetes, KubernetesConfig,
};
use sidewall_policies::TrustDomain;

/// An issuer's public key (P-256; the example of RFC 7515, A.3): the fuzzer cannot sign with it.
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"fuzz","use":"sig","alg":"ES256",
"x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fn validator() -> &'static Kubernetes {
    static VALIDATOR: OnceLock<Kubernetes> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let file = std::env::temp_dir().join(format!("sidewall-fuzz-jwks-{}.json", std::process::id()));
        std::fs::write(&file, JWKS).expect("a temporary file");
        let config = KubernetesConfig {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            keys: KeySource::File(file),
            token_review: None,
            audience: "sidewall".into(),
            identity: DEFAULT_IDENTITY.into(),
            namespaces: Vec::new(),
            service_accounts: Vec::new(),
        };
        let trust_domain = TrustDomain::new("sidewall.local").expect("a trust domain");
        Kubernetes::new(config, trust_domain).expect("the JWKS loads")
    })
}

fuzz_target!(|input: &[u8]| {
    if let Ok(text) = std::str::from_utf8(input) {
        assert!(validator().attest(text, Some("pod-1")).is_err());
    }
});
