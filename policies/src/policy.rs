//! The validated policy model.
//!
//! Every type here can only hold valid values: leaf types validate themselves while being
//! deserialized, so the YAML loader ([`crate::load`]) and the JSON snapshot
//! ([`crate::snapshot`]) share one set of rules. The serde form of these types is the wire
//! (JSON, snake_case) form, which accepts unknown fields from a newer control plane; the
//! strict, camelCase YAML form lives in [`crate::load`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::{HostPattern, Method, PathPattern};
use crate::identity::{IdentityPattern, SpiffeId};

/// Why a policy value (name, port range, `onRevoke`, list) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The name is empty, too long, or has characters outside `[a-zA-Z0-9._-]`.
    #[error(
        "policy name {0:?} must be 1 to 253 characters of a-z A-Z 0-9 . _ - starting with a letter or digit"
    )]
    Name(String),
    /// Port 0, or a port above 65535.
    #[error("port {0} is out of range (1 to 65535)")]
    Port(u64),
    /// A range whose start is above its end.
    #[error("port range {0}-{1} is out of order (write the lower port first)")]
    RangeOrder(u16, u16),
    /// Text that is neither a port nor a `LOW-HIGH` range.
    #[error("{0:?} is not a port or a port range like \"9000-9010\"")]
    RangeSyntax(String),
    /// An `onRevoke` value other than `terminate`, `keep` or `drain:<duration>`.
    #[error("onRevoke {0:?} must be terminate, keep or drain:<duration> (e.g. drain:30s)")]
    OnRevoke(String),
    /// A drain duration that does not parse or is out of bounds.
    #[error(
        "duration {0:?} must be a whole number with ms, s, m, h or d (e.g. 30s, 5m, 1h), within the allowed range"
    )]
    Duration(String),
    /// A list that must not be empty is empty.
    #[error("empty list; it must have at least one entry")]
    EmptyList,
}

/// A policy's name, unique across a policy set.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyName(Arc<str>);

impl PolicyName {
    /// Validates a name: 1–253 characters of `[a-zA-Z0-9._-]`, starting alphanumeric.
    pub fn new(name: &str) -> Result<Self, PolicyError> {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(name.into()))
        } else {
            Err(PolicyError::Name(name.to_owned()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

crate::text_type!(PolicyName, PolicyName::new, PolicyError, "policy name");

/// Whether a policy's decisions are enforced or only recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decisions are enforced. The default.
    #[default]
    Enforce,
    /// Decisions are recorded as a shadow ("would deny") and never change an outcome.
    Audit,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The rule allows what it matches.
    Allow,
    /// The rule denies what it matches; deny beats allow.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// The protocol a sidecar serves on one of its ports. Decided by the target's own sidecar
/// configuration, never by the peer.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw TCP: only connection decisions. The default.
    #[default]
    Tcp,
    /// HTTP/1.1 or HTTP/2: a connection decision, then one per request.
    Http,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        })
    }
}

/// What the sidecar does with open connections that a new policy no longer allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OnRevoke {
    /// Close them at once. The default.
    #[default]
    Terminate,
    /// Leave them open until they end on their own (or their peer certificate expires).
    Keep,
    /// Let them finish within this grace period, then close them.
    Drain(DrainPeriod),
}

/// A drain grace period: whole milliseconds from 1 ms to 24 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrainPeriod(Duration);

impl DrainPeriod {
    /// A period, refused unless it is whole milliseconds from 1 ms to 24 h.
    pub fn new(duration: Duration) -> Result<Self, PolicyError> {
        if duration.is_zero()
            || duration > MAX_DRAIN
            || !duration.subsec_nanos().is_multiple_of(1_000_000)
        {
            return Err(PolicyError::Duration(format!("{duration:?}")));
        }
        Ok(Self(duration))
    }

    /// The period.
    pub fn duration(&self) -> Duration {
        self.0
    }
}

impl OnRevoke {
    /// Parses `terminate`, `keep` or `drain:<n>(ms|s|m|h)`.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        match text {
            "terminate" => Ok(Self::Terminate),
            "keep" => Ok(Self::Keep),
            _ => match text.strip_prefix("drain:") {
                Some(duration) => parse_duration(duration).map(|d| Self::Drain(DrainPeriod(d))),
                None => Err(PolicyError::OnRevoke(text.to_owned())),
            },
        }
    }

    fn as_text(&self) -> String {
        match self {
            Self::Terminate => "terminate".to_owned(),
            Self::Keep => "keep".to_owned(),
            Self::Drain(period) => format!("drain:{}", format_duration(period.0)),
        }
    }
}

impl fmt::Display for OnRevoke {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_text())
    }
}

impl Serialize for OnRevoke {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.as_text())
    }
}

impl<'de> Deserialize<'de> for OnRevoke {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OnRevokeVisitor;
        impl serde::de::Visitor<'_> for OnRevokeVisitor {
            type Value = OnRevoke;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("terminate, keep or drain:<duration>")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OnRevoke, E> {
                OnRevoke::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(OnRevokeVisitor)
    }
}

/// Longest drain grace period.
const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);

/// Parses `500ms`, `30s`, `5m`, `1h`, from 1 ms to 24 h (a drain grace period).
pub fn parse_duration(text: &str) -> Result<Duration, PolicyError> {
    parse_duration_within(text, MAX_DRAIN)
}

/// Parses a whole number followed by `ms`, `s`, `m`, `h` or `d`, from 1 ms to `max`.
pub fn parse_duration_within(text: &str, max: Duration) -> Result<Duration, PolicyError> {
    let bad = || PolicyError::Duration(text.to_owned());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = |factor: u64| number.checked_mul(factor).map(Duration::from_secs);
    let duration = match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    if duration.is_zero() || duration > max {
        return Err(bad());
    }
    Ok(duration)
}

/// A duration in a configuration file (`500ms`, `10s`, `24h`, `7d`), from 1 ms to 30 days,
/// validated where it stands so that errors carry its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl serde::de::Visitor<'_> for DurationVisitor {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 10s")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ConfigDuration, E> {
                parse_duration_within(v, Duration::from_secs(30 * 86_400))
                    .map(ConfigDuration)
                    .map_err(|_| {
                        E::custom(format_args!(
                            "duration {v:?} must be like 500ms, 10s, 5m, 24h or 7d, at most 30d"
                        ))
                    })
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Formats a duration in the largest unit that divides it exactly (`90s`, `2m`, `1500ms`).
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// An inclusive range of ports; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// A range from `start` to `end` inclusive; both non-zero, in order.
    pub fn new(start: u16, end: u16) -> Result<Self, PolicyError> {
        if start == 0 {
            return Err(PolicyError::Port(0));
        }
        if start > end {
            return Err(PolicyError::RangeOrder(start, end));
        }
        Ok(Self { start, end })
    }

    /// A single port.
    pub fn single(port: u16) -> Result<Self, PolicyError> {
        Self::new(port, port)
    }

    /// Parses `8080` or `9000-9010`.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let port = |s: &str| -> Result<u16, PolicyError> {
            let trimmed = s.trim();
            if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PolicyError::RangeSyntax(text.to_owned()));
            }
            let value: u64 = trimmed
                .parse()
                .map_err(|_| PolicyError::RangeSyntax(text.to_owned()))?;
            u16::try_from(value)
                .ok()
                .filter(|&p| p != 0)
                .ok_or(PolicyError::Port(value))
        };
        match text.split_once('-') {
            Some((start, end)) => Self::new(port(start)?, port(end)?),
            None => Self::single(port(text)?),
        }
    }

    /// The first port.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// The last port (inclusive).
    pub fn end(&self) -> u16 {
        self.end
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            serializer.serialize_u16(self.start)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl serde::de::Visitor<'_> for PortVisitor {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (8080) or an inclusive range (\"9000-9010\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRange, E> {
                let port = u16::try_from(v).map_err(|_| E::custom(PolicyError::Port(v)))?;
                PortRange::single(port).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRange, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format_args!(
                        "port {v} is out of range (1 to 65535)"
                    ))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRange, E> {
                PortRange::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

/// A list with at least one entry. Used where an empty list would be a mistake: it would
/// match nothing, while omitting the field means "any".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct NonEmpty<T>(Vec<T>);

impl<T> NonEmpty<T> {
    /// Wraps a vector, refusing an empty one.
    pub fn new(items: Vec<T>) -> Result<Self, PolicyError> {
        if items.is_empty() {
            Err(PolicyError::EmptyList)
        } else {
            Ok(Self(items))
        }
    }

    /// The entries.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// Iterates over the entries.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SeqVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for SeqVisitor<T> {
            type Value = NonEmpty<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-empty list")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NonEmpty<T>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                NonEmpty::new(items).map_err(serde::de::Error::custom)
            }
        }
        deserializer.deserialize_seq(SeqVisitor(std::marker::PhantomData))
    }
}

impl<'a, T> IntoIterator for &'a NonEmpty<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The HTTP part of a rule: each omitted list means "any" (for methods: any but `CONNECT`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpMatch {
    /// Methods, case-sensitive. Omitted: any method except `CONNECT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<NonEmpty<Method>>,
    /// Path patterns, matched against the normalized path without its query. Omitted: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<NonEmpty<PathPattern>>,
    /// Host patterns. Omitted: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<NonEmpty<HostPattern>>,
}

/// Why an HTTP request does not match a rule's `http` part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMismatch {
    /// The method is not listed.
    Method,
    /// The method is `CONNECT` and the rule lists no methods (CONNECT must be named).
    ConnectNotNamed,
    /// No path pattern matches.
    Path,
    /// No host pattern matches, or the request has no host.
    Host,
}

impl HttpMatch {
    /// Checks a request's method, normalized path and host against this rule.
    pub fn check(&self, method: &str, path: &str, host: Option<&str>) -> Result<(), HttpMismatch> {
        match &self.methods {
            Some(methods) if !methods.iter().any(|m| m.as_str() == method) => {
                return Err(HttpMismatch::Method);
            }
            None if method == "CONNECT" => return Err(HttpMismatch::ConnectNotNamed),
            _ => {}
        }
        if let Some(paths) = &self.paths
            && !paths.iter().any(|p| p.matches(path))
        {
            return Err(HttpMismatch::Path);
        }
        if let Some(hosts) = &self.hosts {
            let Some(host) = host else {
                return Err(HttpMismatch::Host);
            };
            if !hosts.iter().any(|h| h.matches(host)) {
                return Err(HttpMismatch::Host);
            }
        }
        Ok(())
    }
}

/// One rule of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// The peers the rule applies to (identities or patterns). Required, non-empty.
    pub from: NonEmpty<IdentityPattern>,
    /// The target's service ports the rule applies to. Omitted: all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<NonEmpty<PortRange>>,
    /// When present, the rule applies to HTTP requests only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
}

impl Rule {
    /// Whether the rule's `ports` include `port` (no `ports` means all).
    pub fn covers_port(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ports| ports.iter().any(|range| range.contains(port)))
    }
}

/// A validated policy: who may reach a target, on which ports and requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    /// Unique name across the policy set.
    pub name: PolicyName,
    /// The protected service(s): an identity or a pattern.
    pub target: IdentityPattern,
    /// Enforce (default) or audit.
    #[serde(default)]
    pub mode: Mode,
    /// What happens to open connections this policy stops allowing. Default: terminate.
    #[serde(default)]
    pub on_revoke: OnRevoke,
    /// The other addresses (`IP:port`, a virtual IP) the target may register as its own and
    /// callers may dial it at. Only with an exact target; one target per address in a set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::SocketAddr>,
    /// The rules, in order; decisions name them by 1-based index.
    pub rules: Vec<Rule>,
}

/// Why a set of policies cannot form a [`PolicySet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicySetError {
    /// Two policies share a name.
    #[error("policy name {0:?} is used twice; names must be unique across the set")]
    DuplicateName(String),
}

/// A set of policies with unique names, kept sorted by name so that decisions and their
/// reasons do not depend on file order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Builds a set, refusing duplicate names.
    pub fn new(mut policies: Vec<Policy>) -> Result<Self, PolicySetError> {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = policies.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(PolicySetError::DuplicateName(pair[0].name.to_string()));
        }
        Ok(Self { policies })
    }

    /// The policies, sorted by name.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The number of rules across all policies.
    pub fn rule_count(&self) -> usize {
        self.policies.iter().map(|p| p.rules.len()).sum()
    }

    /// The targets of audit policies that no enforce policy fully covers: audit mode leaves
    /// them open (traffic to them is allowed and only recorded). Sorted, without repeats.
    pub fn audit_only_targets(&self) -> Vec<&IdentityPattern> {
        let (audit, enforce): (Vec<&Policy>, Vec<&Policy>) =
            self.policies.iter().partition(|p| p.mode == Mode::Audit);
        let mut open: Vec<&IdentityPattern> = audit
            .iter()
            .map(|p| &p.target)
            .filter(|target| !enforce.iter().any(|e| e.target.covers(target)))
            .collect();
        open.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        open.dedup();
        open
    }

    /// Whether an operator declared `address` for `identity` (`spec.addresses` of a policy whose
    /// target is exactly that identity): the only addresses it may register as its own.
    pub fn declares(&self, identity: &SpiffeId, address: std::net::SocketAddr) -> bool {
        self.policies
            .iter()
            .any(|p| p.target.exact() == Some(identity.as_str()) && p.addresses.contains(&address))
    }

    /// The policy with this name.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.policies[i])
    }
}

impl<'de> Deserialize<'de> for PolicySet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let policies = Vec::<Policy>::deserialize(deserializer)?;
        PolicySet::new(policies).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse() {
        assert_eq!(
            PortRange::parse("8080").unwrap(),
            PortRange::single(8080).unwrap()
        );
        assert_eq!(
            PortRange::parse("9000-9010").unwrap().to_string(),
            "9000-9010"
        );
        assert_eq!(PortRange::parse("0"), Err(PolicyError::Port(0)));
        assert_eq!(PortRange::parse("70000"), Err(PolicyError::Port(70000)));
        assert_eq!(
            PortRange::parse("9010-9000"),
            Err(PolicyError::RangeOrder(9010, 9000))
        );
        assert_eq!(
            PortRange::parse("http"),
            Err(PolicyError::RangeSyntax("http".into()))
        );
        assert_eq!(
            PortRange::parse("1-2-3"),
            Err(PolicyError::RangeSyntax("1-2-3".into()))
        );
        assert!(PortRange::parse("9000-9010").unwrap().contains(9010));
        assert!(!PortRange::parse("9000-9010").unwrap().contains(9011));
    }

    #[test]
    fn on_revoke_and_durations() {
        assert_eq!(OnRevoke::parse("terminate"), Ok(OnRevoke::Terminate));
        assert_eq!(OnRevoke::parse("keep"), Ok(OnRevoke::Keep));
        assert_eq!(
            OnRevoke::parse("drain:30s"),
            Ok(OnRevoke::Drain(
                DrainPeriod::new(Duration::from_secs(30)).unwrap()
            ))
        );
        assert!(DrainPeriod::new(Duration::ZERO).is_err());
        assert!(DrainPeriod::new(Duration::from_micros(1500)).is_err());
        assert!(DrainPeriod::new(Duration::from_secs(86_401)).is_err());
        assert_eq!(
            OnRevoke::parse("drain:1500ms").unwrap().to_string(),
            "drain:1500ms"
        );
        assert_eq!(
            OnRevoke::parse("drain:90m").unwrap().to_string(),
            "drain:90m"
        );
        assert_eq!(
            OnRevoke::parse("drain:120s").unwrap().to_string(),
            "drain:2m"
        );
        for bad in [
            "drain:0s",
            "drain:25h",
            "drain:",
            "drain:5",
            "drain:5w",
            "drain:2d",
            "drain:-1s",
        ] {
            assert!(
                matches!(OnRevoke::parse(bad), Err(PolicyError::Duration(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            OnRevoke::parse("close"),
            Err(PolicyError::OnRevoke(_))
        ));
    }

    #[test]
    fn names() {
        assert!(PolicyName::new("api-access.v2_1").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(254)] {
            assert!(PolicyName::new(bad).is_err(), "{bad}");
        }
    }
}
