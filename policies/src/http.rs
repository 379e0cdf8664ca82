//! HTTP request facts as policies see them: methods, path patterns, host patterns, and the
//! path normalization that runs before any path is matched.
//!
//! The sidecar forwards the *normalized* path to the app, and `sidewall policy check`
//! normalizes the same way, so what a policy author tests is what the app receives.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a method, path pattern or host pattern in a policy is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The method is empty or has a character that is not an HTTP token character.
    #[error("{0:?} is not an HTTP method token")]
    MethodToken(String),
    /// The method has lowercase letters; methods are case-sensitive and registered uppercase.
    #[error("{0:?} has lowercase letters; HTTP methods are case-sensitive (write {1:?})")]
    MethodLowercase(String, String),
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    PathNotAbsolute,
    /// The path contains `?`; queries are excluded from matching.
    #[error("path contains '?'; the query is excluded from matching, so remove it")]
    PathQuery,
    /// The path contains `#`; fragments never reach a server.
    #[error("path contains '#'; fragments never reach the server, so remove it")]
    PathFragment,
    /// An empty segment (`//`) other than a single trailing slash.
    #[error(
        "path has an empty segment ('//'); paths are matched after repeated slashes are merged"
    )]
    PathEmptySegment,
    /// A `.` or `..` segment; paths are matched after dot segments are resolved.
    #[error("path has a '.' or '..' segment; paths are matched after dot segments are resolved")]
    PathDotSegment,
    /// `**` somewhere other than the last segment.
    #[error("'**' may only be the last segment of a path")]
    PathDoubleStarNotLast,
    /// A wildcard mixed with other characters in one segment (`/v1/order*`).
    #[error("a wildcard must be a whole segment ('*' or '**'), not part of one")]
    PathPartialWildcard,
    /// A character that cannot appear in a normalized path.
    #[error("path contains {0:?}, which never appears in a normalized request path")]
    PathChar(char),
    /// A percent-encoding the normalizer would have decoded or refused (`%41`, `%2F`), or a bad one.
    #[error(
        "path has percent-encoding {0:?} that never appears in a normalized request path (write unreserved characters plainly; '/', '\\\\' and '.' cannot be encoded)"
    )]
    PathPercent(String),
    /// The host pattern is empty.
    #[error("empty host")]
    HostEmpty,
    /// The port after `:` is not a number from 1 to 65535.
    #[error("host port {0:?} is not a number from 1 to 65535")]
    HostPort(String),
    /// `*` anywhere but as the whole first label (`*.shop`).
    #[error("'*' may only be the whole first label of a host ('*.shop')")]
    HostWildcard,
    /// A character that is not valid in a host name or IP literal.
    #[error("host contains {0:?} (allowed: letters, digits, '-', '_', '.', or an [IPv6] literal)")]
    HostChar(char),
    /// An empty label: `..`, a leading `.`, or more than one trailing `.`.
    #[error("host has an empty label ('..', a leading '.', or more than one trailing '.')")]
    HostEmptyLabel,
}

/// An HTTP method as written in a policy (`GET`, `POST`, …): an uppercase token.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(Arc<str>);

impl Method {
    /// Parses a method; HTTP methods are case-sensitive, so lowercase letters are refused.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() || !text.bytes().all(is_token_byte) {
            return Err(PatternError::MethodToken(text.to_owned()));
        }
        if text.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(PatternError::MethodLowercase(
                text.to_owned(),
                text.to_ascii_uppercase(),
            ));
        }
        Ok(Self(text.into()))
    }

    /// The method as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

crate::text_type!(Method, Method::parse, PatternError, "HTTP method");

/// One segment of a [`PathPattern`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PathSegment {
    Literal(Box<str>),
    /// `*`: exactly one non-empty segment.
    One,
    /// `**`: one or more segments (the rest of the path, non-empty); only last.
    Many,
}

/// A path pattern (`/v1/orders/*/items`, `/static/**`), matched against normalized paths.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PathPattern {
    text: Arc<str>,
    segments: Box<[PathSegment]>,
}

impl PathPattern {
    /// Parses a pattern. It must already be in normalized form, or it could never match.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(PatternError::PathNotAbsolute);
        };
        let raw: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        for (i, segment) in raw.iter().enumerate() {
            let last = i + 1 == raw.len();
            segments.push(match *segment {
                // A single trailing slash (or the root "/") is a literal empty final segment.
                "" if last => PathSegment::Literal("".into()),
                "" => return Err(PatternError::PathEmptySegment),
                "." | ".." => return Err(PatternError::PathDotSegment),
                "*" => PathSegment::One,
                "**" if last => PathSegment::Many,
                "**" => return Err(PatternError::PathDoubleStarNotLast),
                literal => {
                    check_path_literal(literal)?;
                    PathSegment::Literal(literal.into())
                }
            });
        }
        Ok(Self {
            text: text.into(),
            segments: segments.into(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern speaks of `path`'s part of the tree: its first segment is a
    /// wildcard, or the path's first segment. A request for a path no pattern mentions is one
    /// the policies never thought of, what a scanner tries.
    pub fn mentions(&self, path: &str) -> bool {
        let first = path
            .strip_prefix('/')
            .unwrap_or(path)
            .split('/')
            .next()
            .unwrap_or("");
        match self.segments.first() {
            Some(PathSegment::One | PathSegment::Many) => true,
            Some(PathSegment::Literal(literal)) => **literal == *first,
            None => false,
        }
    }

    /// Whether a normalized path (from [`normalize_path`], without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut segments = self.segments.iter().peekable();
        while let Some(segment) = segments.next() {
            let (head, tail) = match rest.split_once('/') {
                Some((head, tail)) => (head, Some(tail)),
                None => (rest, None),
            };
            match segment {
                PathSegment::Many => return !rest.is_empty(),
                PathSegment::One if head.is_empty() => return false,
                PathSegment::One => {}
                PathSegment::Literal(literal) if **literal != *head => return false,
                PathSegment::Literal(_) => {}
            }
            match (tail, segments.peek()) {
                (Some(tail), Some(_)) => rest = tail,
                (None, None) => return true,
                _ => return false,
            }
        }
        false
    }
}

crate::text_type!(
    PathPattern,
    PathPattern::parse,
    PatternError,
    "path pattern"
);

fn check_path_literal(segment: &str) -> Result<(), PatternError> {
    if segment.contains('*') {
        return Err(PatternError::PathPartialWildcard);
    }
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'?' => return Err(PatternError::PathQuery),
            b'#' => return Err(PatternError::PathFragment),
            b'%' => {
                let encoded = segment.get(i..i + 3).unwrap_or(&segment[i..]);
                match decode_percent(bytes, i) {
                    Some(decoded)
                        if !is_unreserved(decoded)
                            && !matches!(decoded, b'/' | b'\\' | b'.')
                            && !decoded.is_ascii_control()
                            && encoded == encoded.to_ascii_uppercase() => {}
                    _ => return Err(PatternError::PathPercent(encoded.to_owned())),
                }
                i += 3;
                continue;
            }
            _ if is_path_byte(b) => {}
            _ => {
                let c = segment[i..].chars().next().unwrap_or('\u{fffd}');
                return Err(PatternError::PathChar(c));
            }
        }
        i += 1;
    }
    Ok(())
}

/// RFC 3986 unreserved characters: decoded by normalization (§6.2.2.2).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes that may stand unencoded in a path segment (pchar without '%'). `;` is not among
/// them: see [`PathError::PathParameter`].
fn is_path_byte(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,=:@".contains(&b)
}

fn decode_percent(bytes: &[u8], at: usize) -> Option<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let high = hex(*bytes.get(at + 1)?)?;
    let low = hex(*bytes.get(at + 2)?)?;
    u8::try_from(high * 16 + low).ok()
}

/// Why a request path is refused (`400`) before any policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("path does not start with '/'")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding")]
    BadPercentEncoding,
    /// `%2F`: an encoded slash would let a path hide a segment boundary.
    #[error("percent-encoded '/' (%2F) is refused")]
    EncodedSlash,
    /// `%5C`: an encoded backslash, which some apps treat as a slash.
    #[error("percent-encoded '\\' (%5C) is refused")]
    EncodedBackslash,
    /// `%2E`: an encoded dot could form a dot segment after decoding.
    #[error("percent-encoded '.' (%2E) is refused")]
    EncodedDot,
    /// A control character, raw or percent-encoded (`%00`).
    #[error("control character in path")]
    ControlCharacter,
    /// A raw backslash, which some apps treat as a slash.
    #[error("backslash in path")]
    Backslash,
    /// `#`: fragments are never sent to a server.
    #[error("fragment ('#') in request path")]
    Fragment,
    /// `;`: Tomcat, Jetty and Spring strip path parameters (`/static/..;/admin`) before they
    /// resolve dot segments, so the app would serve a path no rule was matched against.
    #[error("path parameters (';') are refused: some servers strip them before resolving the path")]
    PathParameter,
    /// Any other byte that is not allowed in a request path (space, non-ASCII).
    #[error("byte 0x{0:02x} is not allowed in a request path")]
    InvalidByte(u8),
}

/// What a port does with `;` path parameters (`/orders;jsessionid=1`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathParameters {
    /// Refused with `400` (default): see [`PathError::PathParameter`].
    #[default]
    Refuse,
    /// Removed from every segment before the path is normalized, matched and forwarded, for
    /// apps that use them (Java session ids). A segment `..;…` or `.;…` is still refused.
    Strip,
}

impl PathParameters {
    /// Whether this is the default.
    pub fn is_refuse(&self) -> bool {
        *self == PathParameters::Refuse
    }
}

/// Removes `;` path parameters from every segment of a raw request path (`%3B` is data and
/// stays). A dot segment with parameters (`..;x`, `.;`) is refused: servers disagree on it.
pub fn strip_path_parameters(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.contains(';') {
        return Ok(Cow::Borrowed(path));
    }
    let mut stripped = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            stripped.push('/');
        }
        match segment.split_once(';') {
            Some(("." | "..", _)) => return Err(PathError::PathParameter),
            Some((name, _)) => stripped.push_str(name),
            None => stripped.push_str(segment),
        }
    }
    Ok(Cow::Owned(stripped))
}

/// Normalizes a request path (without its query) per RFC 3986 before matching.
///
/// Percent-encoded unreserved characters are decoded (except `.`), other percent-encodings
/// are uppercased, repeated slashes are merged and dot segments resolved. Encoded `/`, `\`
/// and `.`, control characters, raw backslashes and fragments are refused, because apps
/// disagree on what they mean. The result is what policies match and what the app receives.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // First pass: validate and decode into `decoded` only if something changes.
    let mut decoded = String::new();
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let value = decode_percent(bytes, i).ok_or(PathError::BadPercentEncoding)?;
                match value {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::EncodedBackslash),
                    b'.' => return Err(PathError::EncodedDot),
                    v if v.is_ascii_control() => return Err(PathError::ControlCharacter),
                    v if is_unreserved(v) => {
                        changed = true;
                        decoded.push(v as char);
                    }
                    v => {
                        let upper = format!("%{v:02X}");
                        changed |= upper.as_bytes() != &bytes[i..i + 3];
                        decoded.push_str(&upper);
                    }
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b'#' => return Err(PathError::Fragment),
            b';' => return Err(PathError::PathParameter),
            _ if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            b'/' => {}
            _ if is_path_byte(b) => {}
            _ => return Err(PathError::InvalidByte(b)),
        }
        decoded.push(b as char);
        i += 1;
    }
    let text: &str = if changed { &decoded } else { path };
    let needs_segments = text.contains("//")
        || text
            .split('/')
            .any(|segment| segment == "." || segment == "..");
    if !needs_segments {
        return Ok(if changed {
            Cow::Owned(decoded)
        } else {
            Cow::Borrowed(path)
        });
    }
    Ok(Cow::Owned(resolve_segments(text)))
}

/// Merges repeated slashes and resolves dot segments (RFC 3986 §5.2.4) in an absolute path.
fn resolve_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path[1..].split('/') {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            other => out.push(other),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        normalized.push('/');
    }
    normalized
}

/// A host pattern in a policy: `api.shop`, `*.shop`, `api.shop:8443`, `10.0.0.1`, `[::1]:80`.
///
/// Compared case-insensitively with a trailing dot ignored; a pattern without a port matches
/// any port, one with a port matches only a Host that names that port.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// Normalized text: lowercase, no trailing dot.
    text: Arc<str>,
    /// The host name without `*.` and port; for a wildcard it starts with `.` (`.shop`).
    name_len: (usize, usize),
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses and normalizes a host pattern.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let lower = text.to_ascii_lowercase();
        let (host, port) = split_host_port(&lower).ok_or_else(|| {
            PatternError::HostPort(lower.rsplit_once(':').map(|(_, p)| p).unwrap_or("").into())
        })?;
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return Err(PatternError::HostEmpty);
        }
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        if name.contains('*') {
            return Err(PatternError::HostWildcard);
        }
        if name.is_empty() {
            return Err(PatternError::HostEmpty);
        }
        let literal = name.starts_with('[') && name.ends_with(']');
        if let Some(c) = name.chars().find(|&c| {
            !(c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.')
                || (literal && matches!(c, ':' | '[' | ']')))
        }) {
            return Err(PatternError::HostChar(c));
        }
        // One trailing dot (the DNS root) is dropped above; any other empty label would make
        // the normalized text read back differently.
        if !literal && name.split('.').any(str::is_empty) {
            return Err(PatternError::HostEmptyLabel);
        }
        let mut normalized = host.to_owned();
        if let Some(port) = port {
            normalized.push_str(&format!(":{port}"));
        }
        // For a wildcard, keep the leading '.' of ".shop" as part of the name slice.
        let start = if wildcard { 1 } else { 0 };
        Ok(Self {
            text: normalized.into(),
            name_len: (start, host.len()),
            wildcard,
            port,
        })
    }

    /// The normalized pattern.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a request's Host (or `:authority`) value matches.
    pub fn matches(&self, host: &str) -> bool {
        let Some((name, port)) = split_host_port(host) else {
            return false;
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if self.port.is_some() && self.port != port {
            return false;
        }
        let pattern = &self.text[self.name_len.0..self.name_len.1];
        if self.wildcard {
            // ".shop" must be a proper suffix: at least one label before it.
            name.len() > pattern.len()
                && name.is_char_boundary(name.len() - pattern.len())
                && name[name.len() - pattern.len()..].eq_ignore_ascii_case(pattern)
                && !name[..name.len() - pattern.len()].ends_with('.')
        } else {
            name.eq_ignore_ascii_case(pattern)
        }
    }
}

crate::text_type!(
    HostPattern,
    HostPattern::parse,
    PatternError,
    "host pattern"
);

/// Splits `host[:port]` or `[v6][:port]`; `None` if the port is not a valid non-zero port.
/// Whether a request may carry `host` as its Host (or `:authority`): a registered name of
/// letters, digits, `-`, `_` and `.`, or a bracketed IPv6 literal, then optionally `:` and a
/// port 1–65535. This is RFC 3986's authority without userinfo, percent-encoding and
/// sub-delimiters, which no service name uses and which servers read differently. The sidecar
/// refuses anything else with `400` before any rule is evaluated: a port no host rule could
/// match (`admin.shop:abc`, `:0`) while the app strips it, or `?`, `#`, `@`, `/` and
/// whitespace, which would change the URI an HTTP/2 app receives.
pub fn valid_host(host: &str) -> bool {
    let Some((name, _)) = split_host_port(host) else {
        return false;
    };
    match name.strip_prefix('[') {
        Some(literal) => literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }),
        None => {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        }
    }
}

fn split_host_port(value: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if value.starts_with('[') {
        match value.find(']') {
            Some(end) => {
                let (host, rest) = value.split_at(end + 1);
                match rest.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None if rest.is_empty() => (host, None),
                    None => return None,
                }
            }
            None => return None,
        }
    } else {
        match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    match port {
        None => Some((host, None)),
        Some(port) => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            match port.parse::<u16>() {
                Ok(0) | Err(_) => None,
                Ok(port) => Some((host, Some(port))),
            }
        }
    }
}

#[cfg(test)]
mod tests;
