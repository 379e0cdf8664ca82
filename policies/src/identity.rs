//! SPIFFE identities: trust domains, SPIFFE IDs and the identity patterns policies use.
//!
//! [`TrustDomain`] and [`SpiffeId`] can only hold values that are valid under the SPIFFE ID
//! specification; every way a string can fail that is its own [`IdentityError`] variant, so
//! callers (and tests) can tell exactly what was wrong. [`IdentityPattern`] adds the two
//! wildcards policies may use as a final segment: `/*` (exactly one segment) and `/**` (one or
//! more). Patterns match on whole segments and never across trust domains.

use std::sync::Arc;

/// The only scheme a SPIFFE ID may have.
const SCHEME: &str = "spiffe://";
/// Longest trust domain name the SPIFFE ID spec allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest whole SPIFFE ID the SPIFFE ID spec allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// The path prefix reserved for Sidewall's own identities (control plane, operators).
pub const RESERVED_PREFIX: &str = "/sidewall";

/// Why a string is not a valid trust domain, SPIFFE ID or identity pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The input was empty.
    #[error("empty identity (expected spiffe://<trust-domain>/<path>)")]
    Empty,
    /// The input has no `scheme://` part at all.
    #[error("missing scheme (expected it to start with spiffe://)")]
    MissingScheme,
    /// The input has a scheme other than lowercase `spiffe`.
    #[error("scheme {0:?} is not allowed (the scheme must be lowercase spiffe://)")]
    WrongScheme(String),
    /// Nothing between `spiffe://` and the path.
    #[error("missing trust domain after spiffe://")]
    MissingTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {0} bytes long (at most 255 allowed)")]
    TrustDomainTooLong(usize),
    /// The trust domain has an uppercase letter (trust domains are lowercase).
    #[error("trust domain contains uppercase {0:?} (trust domains are lowercase)")]
    TrustDomainUppercase(char),
    /// The trust domain has a port (`example.org:8080`).
    #[error("trust domain has a port (a SPIFFE ID names no port)")]
    Port,
    /// The trust domain has user information (`user@example.org`).
    #[error("trust domain has user information before '@' (not allowed in a SPIFFE ID)")]
    Userinfo,
    /// A character outside `[a-z0-9._-]` in the trust domain.
    #[error("trust domain contains {0:?} (allowed: a-z 0-9 . _ -)")]
    TrustDomainChar(char),
    /// A `%` anywhere: SPIFFE IDs are never percent-encoded.
    #[error("percent-encoding is not allowed in a SPIFFE ID")]
    PercentEncoded,
    /// A `?` query part.
    #[error("a SPIFFE ID has no query part ('?')")]
    Query,
    /// A `#` fragment part.
    #[error("a SPIFFE ID has no fragment part ('#')")]
    Fragment,
    /// Two slashes in a row (an empty path segment).
    #[error("empty path segment ('//')")]
    EmptySegment,
    /// A `.` path segment.
    #[error("path segment '.' is not allowed")]
    DotSegment,
    /// A `..` path segment.
    #[error("path segment '..' is not allowed")]
    DotDotSegment,
    /// The path ends with `/`.
    #[error("trailing '/' is not allowed")]
    TrailingSlash,
    /// A character outside `[a-zA-Z0-9._-]` in a path segment.
    #[error("path contains {0:?} (allowed in segments: a-z A-Z 0-9 . _ -)")]
    PathChar(char),
    /// The whole ID is longer than 2048 bytes.
    #[error("identity is {0} bytes long (at most 2048 allowed)")]
    TooLong(usize),
    /// A wildcard (`*` or `**`) somewhere other than the final segment of a pattern.
    #[error("a wildcard ('*' or '**') may only be the final segment of a pattern")]
    WildcardNotLast,
    /// A wildcard mixed with other characters in one segment (`svc-*`).
    #[error("a wildcard must be a whole segment ('/*' or '/**'), not part of one")]
    PartialWildcard,
}

/// A SPIFFE trust domain, such as `example.org`. Always valid and lowercase.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

/// `sidewall.local`, the trust domain a fresh control plane serves.
impl Default for TrustDomain {
    fn default() -> Self {
        // Valid by inspection: lowercase letters and a dot.
        Self("sidewall.local".into())
    }
}

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`, no scheme).
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        check_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    /// The trust domain's name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of a path in this trust domain, e.g. `id("/ns/shop/svc/api")`.
    pub fn id(&self, path: &str) -> Result<SpiffeId, IdentityError> {
        SpiffeId::parse(&format!("{SCHEME}{}{path}", self.0))
    }
}

fn check_trust_domain(name: &str) -> Result<(), IdentityError> {
    if name.is_empty() {
        return Err(IdentityError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdentityError::TrustDomainTooLong(name.len()));
    }
    if name.contains('@') {
        return Err(IdentityError::Userinfo);
    }
    if let Some((_, port)) = name.rsplit_once(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(IdentityError::Port);
    }
    if name.contains('%') {
        return Err(IdentityError::PercentEncoded);
    }
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => {}
            'A'..='Z' => return Err(IdentityError::TrustDomainUppercase(c)),
            _ => return Err(IdentityError::TrustDomainChar(c)),
        }
    }
    Ok(())
}

/// Checks the path part of an ID (empty, or `/seg/seg...`).
fn check_path(path: &str) -> Result<(), IdentityError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        // `spiffe://td/` has an empty path segment too, but the trailing slash is the clearer
        // message for it.
        return Err(IdentityError::TrailingSlash);
    }
    for segment in path[1..].split('/') {
        check_segment(segment)?;
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), IdentityError> {
    match segment {
        "" => return Err(IdentityError::EmptySegment),
        "." => return Err(IdentityError::DotSegment),
        ".." => return Err(IdentityError::DotDotSegment),
        _ => {}
    }
    for c in segment.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => {}
            '%' => return Err(IdentityError::PercentEncoded),
            _ => return Err(IdentityError::PathChar(c)),
        }
    }
    Ok(())
}

/// Splits `spiffe://td/path` into (trust domain, path), checking everything but the path
/// segments. `?` and `#` are reported before anything else, as they change what the rest means.
fn split_id(input: &str) -> Result<(&str, &str), IdentityError> {
    if input.is_empty() {
        return Err(IdentityError::Empty);
    }
    if input.len() > MAX_ID_LEN {
        return Err(IdentityError::TooLong(input.len()));
    }
    let Some(rest) = input.strip_prefix(SCHEME) else {
        return Err(match input.find("://") {
            Some(end) => IdentityError::WrongScheme(input[..end].to_owned()),
            None => IdentityError::MissingScheme,
        });
    };
    if rest.contains('?') {
        return Err(IdentityError::Query);
    }
    if rest.contains('#') {
        return Err(IdentityError::Fragment);
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    check_trust_domain(trust_domain)?;
    Ok((trust_domain, path))
}

/// A valid SPIFFE ID, such as `spiffe://example.org/ns/shop/svc/api`.
///
/// Cheap to clone. The path may be empty (the ID of the trust domain itself); workload
/// identities issued by the control plane always have the form `/ns/<namespace>/svc/<service>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    text: Arc<str>,
    /// Byte length of the trust domain, which starts right after `spiffe://`.
    trust_domain_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let (trust_domain, path) = split_id(input)?;
        check_path(path)?;
        Ok(Self {
            text: input.into(),
            trust_domain_len: trust_domain.len(),
        })
    }

    /// The whole ID as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.text[SCHEME.len()..SCHEME.len() + self.trust_domain_len]
    }

    /// The trust domain as its own type.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().into())
    }

    /// The path, e.g. `/ns/shop/svc/api`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.text[SCHEME.len() + self.trust_domain_len..]
    }

    /// Whether the path is reserved for Sidewall's own identities (`/sidewall` or below).
    pub fn is_reserved(&self) -> bool {
        let path = self.path();
        path == RESERVED_PREFIX
            || path
                .strip_prefix(RESERVED_PREFIX)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// What a pattern's final segment allows after its fixed prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wildcard {
    /// No wildcard: the pattern is one exact ID.
    None,
    /// `/*`: exactly one more segment.
    One,
    /// `/**`: one or more further segments.
    Many,
}

/// An identity or a pattern of identities, as written in policies: an exact SPIFFE ID, or one
/// whose final segment is `*` (exactly one segment) or `**` (one or more segments).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdentityPattern {
    text: Arc<str>,
    /// The fixed part, as a SPIFFE ID prefix (`spiffe://td/ns/prod` for `spiffe://td/ns/prod/*`).
    prefix_len: usize,
    trust_domain_len: usize,
    wildcard: Wildcard,
}

impl IdentityPattern {
    /// Parses and validates a pattern.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let (trust_domain, path) = split_id(input)?;
        if path.ends_with('/') {
            return Err(IdentityError::TrailingSlash);
        }
        let (fixed, wildcard) = if let Some(fixed) = path.strip_suffix("/**") {
            (fixed, Wildcard::Many)
        } else if let Some(fixed) = path.strip_suffix("/*") {
            (fixed, Wildcard::One)
        } else {
            (path, Wildcard::None)
        };
        if fixed.contains('*') {
            let whole = fixed[1..]
                .split('/')
                .any(|segment| segment == "*" || segment == "**");
            return Err(if whole {
                IdentityError::WildcardNotLast
            } else {
                IdentityError::PartialWildcard
            });
        }
        if wildcard != Wildcard::None && fixed.ends_with('/') {
            return Err(IdentityError::EmptySegment);
        }
        check_path(fixed)?;
        Ok(Self {
            text: input.into(),
            prefix_len: SCHEME.len() + trust_domain.len() + fixed.len(),
            trust_domain_len: trust_domain.len(),
            wildcard,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The fixed part before any wildcard, e.g. `spiffe://example.org/ns/prod`.
    pub fn prefix(&self) -> &str {
        &self.text[..self.prefix_len]
    }

    /// The trust domain name the pattern is confined to.
    pub fn trust_domain_name(&self) -> &str {
        &self.text[SCHEME.len()..SCHEME.len() + self.trust_domain_len]
    }

    /// The wildcard at the end, if any.
    pub fn wildcard(&self) -> Wildcard {
        self.wildcard
    }

    /// Whether the pattern is one exact identity.
    pub fn exact(&self) -> Option<&str> {
        (self.wildcard == Wildcard::None).then(|| self.as_str())
    }

    /// Whether every identity `other` matches is also matched by `self`.
    pub fn covers(&self, other: &IdentityPattern) -> bool {
        if self.trust_domain_name() != other.trust_domain_name() {
            return false;
        }
        if other.wildcard == Wildcard::None {
            return SpiffeId::parse(other.as_str()).is_ok_and(|id| self.matches(&id));
        }
        let (mine, theirs) = (self.prefix(), other.prefix());
        match self.wildcard {
            Wildcard::None => false,
            Wildcard::One => other.wildcard == Wildcard::One && mine == theirs,
            Wildcard::Many => {
                mine == theirs
                    || theirs
                        .strip_prefix(mine)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }

    /// Whether `id` matches, on whole segments and within the pattern's trust domain.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        let id = id.as_str();
        let prefix = self.prefix();
        // The trust domain is part of the prefix; a prefix that ends inside the trust domain
        // (`spiffe://a.org` against `spiffe://a.org.evil/x`) is excluded by requiring the next
        // byte to be the end of the ID or a '/'.
        let Some(rest) = id.strip_prefix(prefix) else {
            return false;
        };
        match self.wildcard {
            Wildcard::None => rest.is_empty(),
            Wildcard::One => rest
                .strip_prefix('/')
                .is_some_and(|segment| !segment.is_empty() && !segment.contains('/')),
            Wildcard::Many => rest.strip_prefix('/').is_some_and(|tail| !tail.is_empty()),
        }
    }
}

crate::text_type!(TrustDomain, TrustDomain::new, IdentityError, "trust domain");
crate::text_type!(SpiffeId, SpiffeId::parse, IdentityError, "SPIFFE ID");
crate::text_type!(
    IdentityPattern,
    IdentityPattern::parse,
    IdentityError,
    "identity pattern"
);

#[cfg(test)]
mod tests;
