//! The YAML form of Sidewall documents and the serde_yaml calls that read and write it.
//!
//! These types mirror the model in camelCase and refuse unknown fields; leaf values (IDs,
//! ports, paths…) validate inside their own visitors, so serde_yaml can attach each error to
//! the offending value's line and column.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::http::{HostPattern, Method, PathPattern};
use crate::identity::{IdentityPattern, SpiffeId};
use crate::policy::{
    Action, HttpMatch, Mode, NonEmpty, OnRevoke, Policy, PolicyName, PolicySet, PortRange,
    Protocol, Rule,
};
use crate::testing::{Expectation, PolicyTest, TestCase};

/// The only API version this release reads.
const API_VERSION: &str = "sidewall.dev/v1";

/// One `---`-separated document of a file, and the line it starts on (0-based).
pub(super) struct Document<'a> {
    pub(super) text: &'a str,
    pub(super) line_offset: usize,
}

/// Splits a file into documents at lines that start with `---` followed by a space, a tab or
/// the end of the line. YAML forbids such a line inside any scalar ("c-forbidden"), so this
/// split is exact; doing it here keeps each document's parse independent (one broken document
/// does not hide errors in the next) and linear in the file size.
pub(super) fn split(text: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut offset = 0;
    for (line_number, line) in text.split_inclusive('\n').enumerate() {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if marker && offset > start {
            documents.push(Document {
                text: &text[start..offset],
                line_offset: start_line,
            });
            start = offset;
            start_line = line_number;
        } else if marker {
            start_line = line_number;
        }
        offset += line.len();
    }
    documents.push(Document {
        text: &text[start..],
        line_offset: start_line,
    });
    documents
}

/// A parser error, with its position inside the document.
pub(super) struct DocumentError {
    pub(super) message: String,
    pub(super) position: Option<(usize, usize)>,
}

impl From<serde_yaml::Error> for DocumentError {
    fn from(error: serde_yaml::Error) -> Self {
        let position = error.location().map(|l| (l.line(), l.column()));
        let mut message = error.to_string();
        // serde_yaml appends " at line L column C"; the position is reported separately.
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        Self {
            message: readable_expectation(&message),
            position,
        }
    }
}

/// Replaces serde's "expected struct Foo" (a Rust type name) with words a user knows.
fn readable_expectation(message: &str) -> String {
    let Some(at) = message.find("expected struct ") else {
        return message.to_owned();
    };
    let rest = &message[at + "expected struct ".len()..];
    let name_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let wanted = if &rest[..name_len] == "Header" {
        "a document (a mapping with apiVersion, kind, metadata and spec)"
    } else {
        "a mapping"
    };
    format!("{}expected {wanted}{}", &message[..at], &rest[name_len..])
}

/// What one document turned out to be.
pub(super) enum Parsed {
    /// Only comments or nothing.
    Empty,
    /// Another Sidewall kind, not read by this load.
    Skipped(&'static str),
    /// A policy.
    Policy(Policy),
    /// A test document.
    Test(PolicyTest),
}

/// The kinds of document Sidewall knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Policy,
    PolicyTest,
    Mesh,
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl Visitor<'_> for KindVisitor {
            type Value = Kind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a document kind")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                match v {
                    "Policy" => Ok(Kind::Policy),
                    "PolicyTest" => Ok(Kind::PolicyTest),
                    "Mesh" => Ok(Kind::Mesh),
                    other => Err(E::custom(format_args!(
                        "unknown kind {other:?} (known: Policy, PolicyTest, Mesh)"
                    ))),
                }
            }
        }
        deserializer.deserialize_str(KindVisitor)
    }
}

/// `apiVersion`, checked where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ApiVersion;

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VersionVisitor;
        impl Visitor<'_> for VersionVisitor {
            type Value = ApiVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an apiVersion")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ApiVersion, E> {
                if v == API_VERSION {
                    Ok(ApiVersion)
                } else {
                    Err(E::custom(format_args!(
                        "unknown apiVersion {v:?} (this release reads {API_VERSION})"
                    )))
                }
            }
        }
        deserializer.deserialize_str(VersionVisitor)
    }
}

impl Serialize for ApiVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(API_VERSION)
    }
}

/// The first pass over a document: what it is. Other fields are read in the second pass.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[allow(dead_code)] // checked while deserializing
    api_version: ApiVersion,
    kind: Kind,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: PolicyName,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicyDocument {
    api_version: ApiVersion,
    kind: String,
    metadata: Metadata,
    spec: PolicySpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicySpec {
    target: IdentityPattern,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    on_revoke: OnRevoke,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<std::net::SocketAddr>,
    rules: Vec<RuleDocument>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDocument {
    action: Action,
    from: NonEmpty<IdentityPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<NonEmpty<PortRange>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<HttpDocument>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    methods: Option<NonEmpty<Method>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    paths: Option<NonEmpty<PathPattern>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hosts: Option<NonEmpty<HostPattern>>,
}

impl From<PolicyDocument> for Policy {
    fn from(document: PolicyDocument) -> Self {
        let spec = document.spec;
        Policy {
            name: document.metadata.name,
            target: spec.target,
            mode: spec.mode,
            on_revoke: spec.on_revoke,
            addresses: spec.addresses,
            rules: spec
                .rules
                .into_iter()
                .map(|rule| Rule {
                    action: rule.action,
                    from: rule.from,
                    ports: rule.ports,
                    http: rule.http.map(|http| HttpMatch {
                        methods: http.methods,
                        paths: http.paths,
                        hosts: http.hosts,
                    }),
                })
                .collect(),
        }
    }
}

impl From<&Policy> for PolicyDocument {
    fn from(policy: &Policy) -> Self {
        PolicyDocument {
            api_version: ApiVersion,
            kind: "Policy".to_owned(),
            metadata: Metadata {
                name: policy.name.clone(),
            },
            spec: PolicySpec {
                target: policy.target.clone(),
                mode: policy.mode,
                on_revoke: policy.on_revoke,
                addresses: policy.addresses.clone(),
                rules: policy
                    .rules
                    .iter()
                    .map(|rule| RuleDocument {
                        action: rule.action,
                        from: rule.from.clone(),
                        ports: rule.ports.clone(),
                        http: rule.http.as_ref().map(|http| HttpDocument {
                            methods: http.methods.clone(),
                            paths: http.paths.clone(),
                            hosts: http.hosts.clone(),
                        }),
                    })
                    .collect(),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TestDocument {
    #[allow(dead_code)] // checked while deserializing
    api_version: ApiVersion,
    #[allow(dead_code)] // checked in the first pass
    kind: String,
    metadata: Metadata,
    spec: TestSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSpec {
    cases: Vec<TestCase>,
}

/// Parses one document: first what it is, then (for the kinds wanted) strictly what it says.
pub(super) fn parse(text: &str, tests: bool) -> Result<Parsed, DocumentError> {
    let Some(header) = Option::<Header>::deserialize(serde_yaml::Deserializer::from_str(text))?
    else {
        return Ok(Parsed::Empty);
    };
    no_duplicate_keys(text)?;
    match header.kind {
        Kind::Policy => {
            let document = PolicyDocument::deserialize(serde_yaml::Deserializer::from_str(text))?;
            Ok(Parsed::Policy(document.into()))
        }
        Kind::PolicyTest if tests => {
            let document = TestDocument::deserialize(serde_yaml::Deserializer::from_str(text))?;
            Ok(Parsed::Test(PolicyTest {
                name: document.metadata.name.to_string(),
                file: String::new(),
                cases: document.spec.cases,
            }))
        }
        Kind::PolicyTest => Ok(Parsed::Skipped("PolicyTest")),
        Kind::Mesh => Ok(Parsed::Skipped("Mesh")),
    }
}

/// Parses a configuration document (one document, strict by the type's own attributes).
pub(super) fn parse_config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, DocumentError> {
    no_duplicate_keys(text)?;
    Ok(T::deserialize(serde_yaml::Deserializer::from_str(text))?)
}

/// Refuses a key repeated in any mapping of the document, at its second occurrence.
///
/// serde_yaml reports a repeated struct field at the start of the enclosing mapping (and keeps
/// the last value of a repeated map key); this walk fails inside the repeated key's own
/// visitor instead, where serde_yaml records the key's line and column.
fn no_duplicate_keys(text: &str) -> Result<(), DocumentError> {
    struct Walk;
    impl<'de> Deserialize<'de> for Walk {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(Walk)
        }
    }
    impl<'de> Visitor<'de> for Walk {
        type Value = Walk;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any YAML value")
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_none<E: de::Error>(self) -> Result<Walk, E> {
            Ok(Walk)
        }
        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Walk, D::Error> {
            Walk::deserialize(deserializer)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Walk, A::Error> {
            while seq.next_element::<Walk>()?.is_some() {}
            Ok(Walk)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Walk, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while map.next_key_seed(Key(&mut seen))?.is_some() {
                map.next_value::<Walk>()?;
            }
            Ok(Walk)
        }
        fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Walk, A::Error> {
            // A tagged value (`!tag value`): walk the value.
            let (_, variant) = data.variant::<de::IgnoredAny>()?;
            de::VariantAccess::newtype_variant::<Walk>(variant)?;
            Ok(Walk)
        }
    }
    /// A mapping key, refused when the mapping already had it.
    struct Key<'a>(&'a mut std::collections::HashSet<String>);
    impl<'de> de::DeserializeSeed<'de> for Key<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }
    impl Key<'_> {
        fn record<E: de::Error>(self, key: String) -> Result<(), E> {
            if self.0.contains(&key) {
                return Err(E::custom(format!("duplicate key `{key}`")));
            }
            self.0.insert(key);
            Ok(())
        }
    }
    impl<'de> Visitor<'de> for Key<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping key")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
            self.record(v.to_owned())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
            self.record(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
            self.record(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
            self.record(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
            self.record(v.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            self.record("~".to_owned())
        }
        // A complex key (a sequence or a mapping): not compared, but walked.
        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
            Walk.visit_seq(seq).map(|_| ())
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
            Walk.visit_map(map).map(|_| ())
        }
    }
    Walk::deserialize(serde_yaml::Deserializer::from_str(text))?;
    Ok(())
}

/// The position of `metadata.name` in a document that is known to parse.
///
/// serde_yaml reports positions only for errors, so this parses the document once more with a
/// probe that fails on purpose at the name. Only used on the error path.
pub(super) fn name_position(text: &str) -> Option<(usize, usize)> {
    struct Here;
    impl<'de> Deserialize<'de> for Here {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            // Failing inside the visitor makes serde_yaml report the value's own position.
            struct Fail;
            impl Visitor<'_> for Fail {
                type Value = Here;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a name")
                }
                fn visit_str<E: de::Error>(self, _: &str) -> Result<Here, E> {
                    Err(E::custom("here"))
                }
            }
            deserializer.deserialize_str(Fail)
        }
    }
    #[derive(Deserialize)]
    struct MetadataProbe {
        #[allow(dead_code)] // never constructed: the probe always fails
        name: Here,
    }
    #[derive(Deserialize)]
    struct Probe {
        #[allow(dead_code)] // never constructed: the probe always fails
        metadata: MetadataProbe,
    }
    match Probe::deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(_) => None,
        Err(error) => error.location().map(|l| (l.line(), l.column())),
    }
}

/// Writes a policy set as YAML documents separated by `---`, in the form the loader reads.
pub fn to_yaml(set: &PolicySet) -> String {
    let mut out = String::new();
    for policy in set.policies() {
        out.push_str("---\n");
        // Serializing these plain structs of strings, numbers and lists cannot fail.
        match serde_yaml::to_string(&PolicyDocument::from(policy)) {
            Ok(text) => out.push_str(&text),
            Err(error) => out.push_str(&format!("# cannot serialize: {error}\n")),
        }
    }
    out
}

impl<'de> Deserialize<'de> for Expectation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpectVisitor;
        impl Visitor<'_> for ExpectVisitor {
            type Value = Expectation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("allow, deny or audit")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Expectation, E> {
                match v {
                    "allow" => Ok(Expectation::Allow),
                    "deny" => Ok(Expectation::Deny),
                    "audit" => Ok(Expectation::Audit),
                    other => Err(E::custom(format_args!(
                        "unknown expectation {other:?} (expected allow, deny or audit)"
                    ))),
                }
            }
        }
        deserializer.deserialize_str(ExpectVisitor)
    }
}

// `TestCase` is read here (the only YAML module) and defined in `testing`.
impl<'de> Deserialize<'de> for TestCase {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CaseDocument {
            from: SpiffeId,
            to: SpiffeId,
            port: PortNumber,
            #[serde(default)]
            protocol: Option<Protocol>,
            #[serde(default)]
            method: Option<String>,
            #[serde(default)]
            path: Option<String>,
            #[serde(default)]
            host: Option<String>,
            expect: Expectation,
        }
        let case = CaseDocument::deserialize(deserializer)?;
        TestCase::new(
            case.from,
            case.to,
            case.port.0,
            case.protocol,
            case.method,
            case.path,
            case.host,
            case.expect,
        )
        .map_err(de::Error::custom)
    }
}

/// A single port number (1–65535), validated where it stands.
struct PortNumber(u16);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let range = PortRange::deserialize(deserializer)?;
        if range.start() != range.end() {
            return Err(de::Error::custom(format_args!(
                "expected one port, not the range {range}"
            )));
        }
        Ok(Self(range.start()))
    }
}
