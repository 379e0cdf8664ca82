//! SPIFFE IDs, trust domains and identity patterns from arbitrary UTF-8.
//!
//! Parsing never panics; whatever parses is stored exactly as written, displays as it was
//! written, parses back equal, and splits into a trust domain and a path that reassemble it.
//! Every ID is also an exact pattern that matches itself, and every wildcard pattern matches
//! an ID one segment below its fixed prefix.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_policies::identity::{MAX_ID_LEN, Wildcard};
use sidewall_policies::{IdentityPattern, SpiffeId, TrustDomain};

fuzz_target!(|input: &str| {
    if let Ok(id) = SpiffeId::parse(input) {
        let text = id.to_string();
        assert_eq!(text, input, "an ID displays as written");
        assert_eq!(
            SpiffeId::parse(&text).as_ref(),
            Ok(&id),
            "Display parses back"
        );
        let reassembled = format!("spiffe://{}{}", id.trust_domain_name(), id.path());
        assert_eq!(
            reassembled, input,
            "trust domain and path reassemble the ID"
        );
        let trust_domain = id.trust_domain();
        assert_eq!(trust_domain.as_str(), id.trust_domain_name());
        assert_eq!(
            TrustDomain::new(id.trust_domain_name()).as_ref(),
            Ok(&trust_domain)
        );
        assert_eq!(trust_domain.id(id.path()).as_ref(), Ok(&id));
        let exact = IdentityPattern::parse(input).expect("every ID is an exact pattern");
        assert_eq!(exact.exact(), Some(input));
        assert!(exact.matches(&id), "an exact pattern matches its own ID");
    }

    if let Ok(trust_domain) = TrustDomain::new(input) {
        assert_eq!(trust_domain.to_string(), input);
        assert_eq!(
            TrustDomain::new(&trust_domain.to_string()).as_ref(),
            Ok(&trust_domain)
        );
        let id = trust_domain
            .id("")
            .expect("a trust domain's own ID is valid");
        assert_eq!(id.trust_domain(), trust_domain);
        assert_eq!(id.path(), "");
    }

    if let Ok(pattern) = IdentityPattern::parse(input) {
        assert_eq!(pattern.to_string(), input);
        assert_eq!(
            IdentityPattern::parse(&pattern.to_string()).as_ref(),
            Ok(&pattern)
        );
        assert!(input.starts_with(pattern.prefix()));
        assert!(TrustDomain::new(pattern.trust_domain_name()).is_ok());
        let below = format!("{}/x", pattern.prefix());
        match pattern.wildcard() {
            Wildcard::None => {
                let id = SpiffeId::parse(input).expect("an exact pattern is an ID");
                assert!(pattern.matches(&id));
            }
            Wildcard::One | Wildcard::Many => {
                let id = SpiffeId::parse(&below).expect("one segment below a pattern is an ID");
                assert!(pattern.matches(&id), "{input} matches {below}");
                let prefix_id = SpiffeId::parse(pattern.prefix()).expect("a prefix is an ID");
                assert!(
                    !pattern.matches(&prefix_id),
                    "{input} does not match its prefix"
                );
                let deeper = format!("{below}/y");
                if deeper.len() <= MAX_ID_LEN {
                    let deeper = SpiffeId::parse(&deeper).expect("two segments below is an ID");
                    assert_eq!(
                        pattern.matches(&deeper),
                        pattern.wildcard() == Wildcard::Many,
                        "{input} against {deeper}"
                    );
                }
            }
        }
    }
});
