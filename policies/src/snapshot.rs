//! The snapshot: everything one proxy needs from the control plane, as one versioned value.
//!
//! It is the contract between the control plane and the sidecar (JSON over HTTP, snake_case).
//! A proxy accepts unknown fields from a newer control plane, and refuses a snapshot whose
//! schema has an unknown *major* version. Versions pair a store epoch with a counter, so a
//! restored or migrated store (a new epoch) is never mistaken for an old one.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::http::PathParameters;
use crate::identity::{SpiffeId, TrustDomain};
use crate::policy::{Policy, PolicySet, Protocol};

pub mod directory;

/// The schema major version this release reads and writes.
pub const SCHEMA_MAJOR: u32 = 1;
/// The schema minor version this release writes (additions only).
pub const SCHEMA_MINOR: u32 = 0;

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not JSON, or not the shape of a snapshot.
    #[error("malformed snapshot: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A schema major version this release does not know.
    #[error("snapshot schema {0}.{1} is not supported (this release reads {SCHEMA_MAJOR}.x)")]
    UnsupportedSchema(u32, u32),
}

/// A schema version: `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    /// Incompatible changes bump this.
    pub major: u32,
    /// Compatible additions bump this.
    pub minor: u32,
}

impl Default for Schema {
    fn default() -> Self {
        Self {
            major: SCHEMA_MAJOR,
            minor: SCHEMA_MINOR,
        }
    }
}

/// A snapshot version: the store's epoch and a counter that only grows within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotVersion {
    /// Identifies one store's history; a restored or migrated store gets a new epoch.
    pub epoch: String,
    /// Grows with every change within the epoch.
    pub counter: u64,
}

impl SnapshotVersion {
    /// Whether a proxy holding `self` should apply `next`: any version of another epoch (the
    /// store was replaced), or a higher counter in the same epoch.
    pub fn is_superseded_by(&self, next: &SnapshotVersion) -> bool {
        self.epoch != next.epoch || next.counter > self.counter
    }
}

impl fmt::Display for SnapshotVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.epoch, self.counter)
    }
}

/// Identities and certificates no longer trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// Revoked identities: no certificate for them is accepted.
    #[serde(default)]
    pub identities: Vec<SpiffeId>,
    /// Revoked certificate serial numbers, hex without separators (compared as numbers).
    #[serde(default)]
    pub serials: Vec<String>,
}

impl Revocations {
    /// Whether a peer with this identity and certificate serial is revoked.
    pub fn is_revoked(&self, id: &SpiffeId, serial_hex: &str) -> bool {
        // Serials compare as numbers: case and leading zeros do not matter.
        let serial = serial_hex.trim_start_matches('0');
        self.identities.contains(id)
            || self
                .serials
                .iter()
                .any(|s| s.trim_start_matches('0').eq_ignore_ascii_case(serial))
    }
}

/// A port a service's sidecar serves, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// The service port.
    pub port: u16,
    /// Its protocol, as the service's own sidecar declares it.
    #[serde(default)]
    pub protocol: Protocol,
    /// What the service's sidecar does with `;` path parameters on this (HTTP) port; a
    /// client sidecar lets them through only where the server strips them.
    #[serde(default, skip_serializing_if = "PathParameters::is_refuse")]
    pub path_parameters: PathParameters,
}

/// One service in the directory: where its sidecars listen and what it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The service identity.
    pub identity: SpiffeId,
    /// The inbound mTLS endpoints of its sidecars (`host:port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The service ports and their protocols.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Other addresses clients may dial for it (a virtual IP, `host:port`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Everything one proxy needs, at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The schema this snapshot is written in.
    pub schema: Schema,
    /// Its version.
    pub version: SnapshotVersion,
    /// The workload it was built for.
    pub workload: SpiffeId,
    /// The policies whose target matches the workload.
    pub policies: PolicySet,
    /// PEM root certificates per trust domain; a peer is verified only against its own
    /// trust domain's roots. Several roots per domain during a rotation.
    #[serde(default)]
    pub trust_bundles: BTreeMap<TrustDomain, Vec<String>>,
    /// SHA-256 (hex) of the intermediate CA certificate that signs new certificates now. A
    /// sidecar whose own chain carries another renews early, at a point spread by its serial
    /// (a CA rotation's activate stage). Absent from older control planes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_ca: Option<String>,
    /// What is no longer trusted.
    #[serde(default)]
    pub revocations: Revocations,
    /// The services this workload may call.
    #[serde(default)]
    pub directory: Vec<ServiceEntry>,
}

impl Snapshot {
    /// Parses a snapshot, checking the schema's major version before anything else so that
    /// an incompatible one is reported as such rather than as a shape error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SnapshotError> {
        #[derive(Deserialize)]
        struct SchemaOnly {
            schema: Schema,
        }
        let SchemaOnly { schema } = serde_json::from_slice(bytes)?;
        if schema.major != SCHEMA_MAJOR {
            return Err(SnapshotError::UnsupportedSchema(schema.major, schema.minor));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Writes the snapshot as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // A snapshot is strings, numbers, lists and string-keyed maps: serializing it cannot
        // fail; an empty body would be refused by the proxy rather than misread.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The policies of this snapshot as a list.
    pub fn policy_list(&self) -> &[Policy] {
        self.policies.policies()
    }

    /// The directory entry of a service.
    pub fn service(&self, identity: &SpiffeId) -> Option<&ServiceEntry> {
        self.directory.iter().find(|e| &e.identity == identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{LoadOptions, load_str};

    fn sample() -> Snapshot {
        let loaded = load_str(
            "p.yaml",
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: db}\nspec:\n  target: spiffe://example.org/ns/shop/svc/db\n  onRevoke: drain:30s\n  rules:\n    - action: allow\n      from: [spiffe://example.org/ns/shop/svc/api]\n      ports: [5432, \"9000-9010\"]\n      http: {methods: [GET], paths: [/v1/**], hosts: [\"*.shop\"]}\n",
            &LoadOptions::default(),
        )
        .unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        Snapshot {
            schema: Schema::default(),
            version: SnapshotVersion {
                epoch: "3f2a".into(),
                counter: 7,
            },
            workload: td.id("/ns/shop/svc/db").unwrap(),
            policies: loaded.policies,
            trust_bundles: BTreeMap::from([(
                td.clone(),
                vec!["-----BEGIN CERTIFICATE-----\n".into()],
            )]),
            signing_ca: None,
            revocations: Revocations {
                identities: vec![td.id("/ns/shop/svc/old").unwrap()],
                serials: vec!["0a1b".into()],
            },
            directory: vec![ServiceEntry {
                identity: td.id("/ns/shop/svc/api").unwrap(),
                endpoints: vec!["10.0.0.2:4643".into()],
                ports: vec![ServicePort {
                    port: 8080,
                    protocol: Protocol::Http,
                    path_parameters: PathParameters::Strip,
                }],
                addresses: vec!["10.96.0.10:8080".into()],
            }],
        }
    }

    #[test]
    fn json_round_trip() {
        let snapshot = sample();
        let json = snapshot.to_json();
        assert_eq!(Snapshot::from_json(&json).unwrap(), snapshot);
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains("\"on_revoke\":\"drain:30s\""), "{text}");
        assert!(
            text.contains("\"trust_bundles\":{\"example.org\""),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_from_a_newer_control_plane_are_accepted() {
        let mut value: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["schema"]["minor"] = 4.into();
        value["future_field"] = "x".into();
        value["policies"][0]["future_policy_field"] = 1.into();
        value["policies"][0]["rules"][0]["future_rule_field"] = true.into();
        let parsed = Snapshot::from_json(value.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.policies, sample().policies);
    }

    #[test]
    fn unknown_major_is_refused_before_shape_errors() {
        let json = br#"{"schema": {"major": 2, "minor": 0}, "something": "else"}"#;
        assert!(matches!(
            Snapshot::from_json(json),
            Err(SnapshotError::UnsupportedSchema(2, 0))
        ));
        assert!(matches!(
            Snapshot::from_json(b"not json"),
            Err(SnapshotError::Malformed(_))
        ));
    }

    #[test]
    fn invalid_values_are_refused_even_from_the_control_plane() {
        let mut value: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["policies"][0]["rules"][0]["from"] = serde_json::json!([]);
        assert!(Snapshot::from_json(value.to_string().as_bytes()).is_err());
        let mut value: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        value["workload"] = "spiffe://Example.org/x".into();
        assert!(Snapshot::from_json(value.to_string().as_bytes()).is_err());
    }

    #[test]
    fn versions_order_within_an_epoch_and_yield_to_a_new_one() {
        let v = |epoch: &str, counter| SnapshotVersion {
            epoch: epoch.into(),
            counter,
        };
        assert!(v("a", 1).is_superseded_by(&v("a", 2)));
        assert!(!v("a", 2).is_superseded_by(&v("a", 2)));
        assert!(!v("a", 3).is_superseded_by(&v("a", 2)));
        assert!(v("a", 30).is_superseded_by(&v("b", 1)));
    }

    #[test]
    fn revocation_by_identity_or_serial() {
        let s = sample();
        let old = SpiffeId::parse("spiffe://example.org/ns/shop/svc/old").unwrap();
        let api = SpiffeId::parse("spiffe://example.org/ns/shop/svc/api").unwrap();
        assert!(s.revocations.is_revoked(&old, "ff"));
        assert!(s.revocations.is_revoked(&api, "0A1B"));
        assert!(!s.revocations.is_revoked(&api, "0a1c"));
    }
}
