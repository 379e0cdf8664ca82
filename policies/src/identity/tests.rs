use super::*;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn pattern(s: &str) -> IdentityPattern {
    IdentityPattern::parse(s).unwrap()
}

#[test]
fn valid_ids_parse_and_split() {
    let api = id("spiffe://example.org/ns/shop/svc/api");
    assert_eq!(api.trust_domain_name(), "example.org");
    assert_eq!(api.path(), "/ns/shop/svc/api");
    assert_eq!(api.to_string(), "spiffe://example.org/ns/shop/svc/api");
    let bare = id("spiffe://example.org");
    assert_eq!(bare.path(), "");
    for ok in [
        "spiffe://a.b-c_d.0/x",
        "spiffe://example.org/A-Z_a.z09",
        "spiffe://example.org/...",
        "spiffe://example.org/.x",
    ] {
        SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let longest_td = format!("spiffe://{}/x", "a".repeat(255));
    assert!(SpiffeId::parse(&longest_td).is_ok());
    let longest = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
    assert_eq!(longest.len(), 2048);
    assert!(SpiffeId::parse(&longest).is_ok());
}

/// Each invalid ID is rejected with the error that names its defect.
#[test]
fn invalid_ids_are_rejected_with_their_own_error() {
    use IdentityError as E;
    let long_td = format!("spiffe://{}/x", "a".repeat(256));
    let long_id = format!("spiffe://example.org/{}", "a".repeat(2048 - 20));
    let cases: Vec<(&str, IdentityError)> = vec![
        ("", E::Empty),
        ("example.org/ns/a", E::MissingScheme),
        ("spiffe:/example.org/a", E::MissingScheme),
        ("https://example.org/a", E::WrongScheme("https".into())),
        ("SPIFFE://example.org/a", E::WrongScheme("SPIFFE".into())),
        ("spiffe:///ns/a", E::MissingTrustDomain),
        ("spiffe://", E::MissingTrustDomain),
        (&long_td, E::TrustDomainTooLong(256)),
        ("spiffe://Example.org/a", E::TrustDomainUppercase('E')),
        ("spiffe://example.org:8443/a", E::Port),
        ("spiffe://user@example.org/a", E::Userinfo),
        ("spiffe://user:pw@example.org/a", E::Userinfo),
        ("spiffe://exa mple.org/a", E::TrustDomainChar(' ')),
        ("spiffe://[::1]/a", E::TrustDomainChar('[')),
        ("spiffe://exämple.org/a", E::TrustDomainChar('ä')),
        ("spiffe://ex%41mple.org/a", E::PercentEncoded),
        ("spiffe://example.org/ns/%61", E::PercentEncoded),
        ("spiffe://example.org/ns/a?x=1", E::Query),
        ("spiffe://example.org/ns/a#frag", E::Fragment),
        ("spiffe://example.org//a", E::EmptySegment),
        ("spiffe://example.org/ns//a", E::EmptySegment),
        ("spiffe://example.org/ns/./a", E::DotSegment),
        ("spiffe://example.org/ns/../a", E::DotDotSegment),
        ("spiffe://example.org/ns/a/", E::TrailingSlash),
        ("spiffe://example.org/", E::TrailingSlash),
        ("spiffe://example.org/ns/a b", E::PathChar(' ')),
        ("spiffe://example.org/ns/a:b", E::PathChar(':')),
        ("spiffe://example.org/ns/ü", E::PathChar('ü')),
        ("spiffe://example.org/ns/a\\b", E::PathChar('\\')),
        ("spiffe://example.org/ns/*", E::PathChar('*')),
        (&long_id, E::TooLong(2049)),
    ];
    assert!(cases.len() >= 25);
    for (input, expected) in cases {
        assert_eq!(
            SpiffeId::parse(input).err(),
            Some(expected),
            "input {input:?}"
        );
    }
}

#[test]
fn trust_domain_new_validates_bare_names() {
    assert_eq!(
        TrustDomain::new("example.org").unwrap().as_str(),
        "example.org"
    );
    assert_eq!(
        TrustDomain::new("Example.org"),
        Err(IdentityError::TrustDomainUppercase('E'))
    );
    assert_eq!(TrustDomain::new(""), Err(IdentityError::MissingTrustDomain));
    assert_eq!(
        TrustDomain::new("a/b"),
        Err(IdentityError::TrustDomainChar('/'))
    );
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(
        td.id("/ns/a/svc/b").unwrap().as_str(),
        "spiffe://example.org/ns/a/svc/b"
    );
}

#[test]
fn reserved_paths_are_recognized() {
    assert!(id("spiffe://td/sidewall").is_reserved());
    assert!(id("spiffe://td/sidewall/control-plane").is_reserved());
    assert!(id("spiffe://td/sidewall/operator/admin").is_reserved());
    assert!(!id("spiffe://td/sidewall-app").is_reserved());
    assert!(!id("spiffe://td/ns/sidewall/svc/x").is_reserved());
}

#[test]
fn patterns_match_whole_segments() {
    let cases = [
        // (pattern, id, matches)
        (
            "spiffe://example.org/ns/prod/*",
            "spiffe://example.org/ns/prod/a",
            true,
        ),
        (
            "spiffe://example.org/ns/prod/*",
            "spiffe://example.org/ns/prod/a/b",
            false,
        ),
        (
            "spiffe://example.org/ns/prod/*",
            "spiffe://example.org/ns/prod",
            false,
        ),
        (
            "spiffe://example.org/ns/prod/*",
            "spiffe://example.org/ns/prod-evil/svc/x",
            false,
        ),
        (
            "spiffe://example.org/ns/prod/*",
            "spiffe://example.org/ns/prodx",
            false,
        ),
        (
            "spiffe://example.org/ns/prod/**",
            "spiffe://example.org/ns/prod/a",
            true,
        ),
        (
            "spiffe://example.org/ns/prod/**",
            "spiffe://example.org/ns/prod/a/b/c",
            true,
        ),
        (
            "spiffe://example.org/ns/prod/**",
            "spiffe://example.org/ns/prod",
            false,
        ),
        (
            "spiffe://example.org/ns/prod/**",
            "spiffe://example.org/ns/prod-evil/svc/x",
            false,
        ),
        ("spiffe://example.org/**", "spiffe://example.org/x", true),
        ("spiffe://example.org/**", "spiffe://example.org", false),
        (
            "spiffe://example.org/**",
            "spiffe://example.org.evil/x",
            false,
        ),
        ("spiffe://a.org/**", "spiffe://b.org/x", false),
        ("spiffe://example.org/*", "spiffe://example.org/x", true),
        (
            "spiffe://example.org/ns/a",
            "spiffe://example.org/ns/a",
            true,
        ),
        (
            "spiffe://example.org/ns/a",
            "spiffe://example.org/ns/a/b",
            false,
        ),
        (
            "spiffe://example.org/ns/a",
            "spiffe://example.org/ns/ab",
            false,
        ),
        (
            "spiffe://example.org/ns/A",
            "spiffe://example.org/ns/a",
            false,
        ),
    ];
    for (p, i, expected) in cases {
        assert_eq!(pattern(p).matches(&id(i)), expected, "{p} vs {i}");
    }
}

#[test]
fn invalid_patterns_name_their_defect() {
    use IdentityError as E;
    let cases = [
        ("spiffe://example.org/*/svc", E::WildcardNotLast),
        ("spiffe://example.org/**/svc/a", E::WildcardNotLast),
        ("spiffe://example.org/ns/svc-*", E::PartialWildcard),
        ("spiffe://example.org/ns/***", E::PartialWildcard),
        ("spiffe://*.org/ns/a", E::TrustDomainChar('*')),
        ("spiffe://example.org/ns//*", E::EmptySegment),
        ("spiffe://example.org/ns/*/", E::TrailingSlash),
        ("http://example.org/**", E::WrongScheme("http".into())),
    ];
    for (input, expected) in cases {
        assert_eq!(
            IdentityPattern::parse(input).err(),
            Some(expected),
            "{input}"
        );
    }
    assert_eq!(
        pattern("spiffe://example.org/ns/a/**").prefix(),
        "spiffe://example.org/ns/a"
    );
    assert_eq!(
        pattern("spiffe://example.org/ns/a").exact(),
        Some("spiffe://example.org/ns/a")
    );
}

#[test]
fn serde_round_trip_and_errors_name_the_value() {
    let parsed: SpiffeId = serde_json::from_str("\"spiffe://example.org/a\"").unwrap();
    assert_eq!(
        serde_json::to_string(&parsed).unwrap(),
        "\"spiffe://example.org/a\""
    );
    let err = serde_json::from_str::<SpiffeId>("\"spiffe://example.org/a/\"").unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid SPIFFE ID \"spiffe://example.org/a/\": trailing '/'"),
        "{err}"
    );
}

#[test]
fn coverage_between_patterns() {
    let cases = [
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a/svc/x", true),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a/*", true),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a/b/**", true),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a/**", true),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/ab/**", false),
        ("spiffe://td/ns/a/**", "spiffe://td/ns/a", false),
        ("spiffe://td/**", "spiffe://td/ns/a/*", true),
        ("spiffe://td/**", "spiffe://other/ns/a", false),
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a/x", true),
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a/*", true),
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a/**", false),
        ("spiffe://td/ns/a/*", "spiffe://td/ns/a/x/y", false),
        ("spiffe://td/ns/a", "spiffe://td/ns/a", true),
        ("spiffe://td/ns/a", "spiffe://td/ns/a/*", false),
    ];
    for (wide, narrow, expected) in cases {
        assert_eq!(
            pattern(wide).covers(&pattern(narrow)),
            expected,
            "{wide} covers {narrow}"
        );
    }
}
