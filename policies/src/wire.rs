//! The bodies a sidecar and the control plane exchange, typed once (issue 16, first part): one
//! side writes them with these types and the other reads them with the same ones, so a renamed
//! field is a compile error, not a silent `400` or an unusable answer.
//!
//! Forward compatibility: every type here accepts unknown fields (serde's default), so that a
//! newer sidecar can add a field an older control plane does not know yet; fields added later
//! carry `#[serde(default)]` for the same reason the other way round.
//!
//! The operator API's bodies (what the CLI sends and reads) are in [`operator`].

pub mod operator;
pub mod report;

use serde::{Deserialize, Serialize};

use crate::snapshot::{ServicePort, SnapshotVersion};
use crate::{Protocol, SpiffeId};

/// Longest instance id, in characters.
pub const MAX_INSTANCE: usize = 64;

/// Whether `instance` is a valid sidecar process id: 1 to [`MAX_INSTANCE`] of `a-z A-Z 0-9 -`.
pub fn valid_instance(instance: &str) -> bool {
    (1..=MAX_INSTANCE).contains(&instance.len())
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `POST /v1/certificates`: a CSR, with a join token on first contact (a renewal presents the
/// current certificate instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// One PKCS#10 CSR in PEM.
    pub csr: String,
    /// A join token, `swt1.<id>.<secret>.<root-sha256>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Instead of a join token: the pod's projected Kubernetes service-account token (a JWT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<String>,
    /// The pod asking, when the sidecar knows it: a service-account token bound to another
    /// pod is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// The answer to `POST /v1/certificates` and `POST /v1/operators`: the new certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The leaf, then the intermediate, PEM.
    pub certificate_chain: String,
    /// The trust domain's roots, PEM.
    pub trust_bundle: String,
    /// When the leaf expires, RFC 3339.
    pub expires_at: String,
    /// The SPIFFE ID it certifies.
    pub identity: String,
    /// Its serial, lowercase hex.
    pub serial: String,
}

/// `POST /v1/registrations`: the endpoint a sidecar advertises and the ports it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The sidecar process.
    pub instance: String,
    /// Its inbound mTLS endpoint, `IP:port`.
    pub endpoint: String,
    /// The service ports it serves.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Other addresses callers may dial for it (`inbound.addresses`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// The answer to `POST /v1/registrations`: the endpoint as registered, and the addresses in
/// `inbound.addresses` that callers will not be sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The endpoint, as the control plane registered it.
    pub endpoint: String,
    /// The refused addresses, and why.
    #[serde(default)]
    pub addresses_refused: Vec<operator::RefusedAddress>,
}

/// What a sidecar did with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    /// It is in force.
    Applied,
    /// It was refused; the last good one stays in force.
    Rejected,
    /// Any other word: accepted by the parser so that the control plane can refuse it with its
    /// own code (`status_invalid`) instead of a generic JSON error. Never sent.
    #[serde(other)]
    Unknown,
}

/// `POST /v1/acks`: the version a sidecar applied, or why it rejected one. Also sent again at
/// every keep-alive line of the watch, so that the control plane hears from a live sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The sidecar process.
    pub instance: String,
    /// The snapshot's version.
    pub version: SnapshotVersion,
    /// Applied or rejected.
    pub status: AckStatus,
    /// Why it was rejected.
    #[serde(default)]
    pub reason: Option<String>,
    /// When the sidecar's certificate expires, Unix seconds.
    #[serde(default)]
    pub certificate_expires_at: Option<i64>,
    /// Its certificate's serial, lowercase hex: which CA it chains to, during a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// What the sidecar runs with (a sidecar of an older release sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarFacts>,
}

/// What a sidecar runs with, as it says in each ack: for the fleet view and the segmentation
/// report's scope, exceptions and encryption sections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarFacts {
    /// Its release (`0.1.0`).
    pub version: String,
    /// The ports where it accepts plaintext from outside the mesh (`permissive`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissive_ports: Vec<u16>,
    /// The destinations outside the mesh its app may reach (`outbound.egress`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
    /// Whether it accepts TLS 1.2 from peers (`tls.allowTls12`); TLS 1.3 only otherwise.
    #[serde(default)]
    pub allow_tls12: bool,
    /// Whether it makes segmentation probes (a `{"probes": …}` line of its watch).
    #[serde(default)]
    pub probes: bool,
}

impl SidecarFacts {
    /// Most entries in a list, and longest text, the control plane takes.
    pub const MAX_ENTRIES: usize = 256;
    /// See [`Self::MAX_ENTRIES`].
    pub const MAX_TEXT: usize = 64;

    /// Why the control plane would not keep these facts, if it would not.
    pub fn invalid(&self) -> Option<String> {
        let long = |text: &String| text.chars().count() > Self::MAX_TEXT;
        if long(&self.version) {
            return Some(format!("version over {} characters", Self::MAX_TEXT));
        }
        if self.permissive_ports.len() > Self::MAX_ENTRIES || self.egress.len() > Self::MAX_ENTRIES
        {
            return Some(format!(
                "more than {} ports or egress entries",
                Self::MAX_ENTRIES
            ));
        }
        self.egress
            .iter()
            .any(long)
            .then(|| format!("an egress entry over {} characters", Self::MAX_TEXT))
    }
}

/// `POST /v1/flows`: decision counts a sidecar observed since its last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowReport {
    /// One record per distinct flow.
    pub flows: Vec<FlowRecord>,
    /// Connections refused before any identity was authorized, for detection: a sidecar of
    /// an older release sends none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<RefusalRecord>,
    /// Authenticated inbound TLS handshakes, by protocol version and cipher suite.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsUse>,
    /// Plaintext connections accepted on permissive ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plaintext: Vec<PlaintextUse>,
    /// Connections this sidecar's own app opened that the sidecar refused before they left the
    /// machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<OutboundRefusal>,
}

impl FlowReport {
    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
            && self.refusals.is_empty()
            && self.tls.is_empty()
            && self.plaintext.is_empty()
            && self.outbound.is_empty()
    }
}

/// Why a sidecar refused a connection its own app opened, as the segmentation report counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundReason {
    /// A service not in its directory: no policy lets this workload call it.
    UnknownService,
    /// An address no service claims and not on its egress list (transparent mode).
    NotInMesh,
    /// A reason of a newer release.
    #[serde(other)]
    Other,
}

impl OutboundReason {
    /// The label (as in `sidewall_proxy_outbound_failures_total{reason}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownService => "unknown_service",
            Self::NotInMesh => "not_in_mesh",
            Self::Other => "other",
        }
    }
}

/// Connections to one target refused for one reason by the caller's sidecar since its last
/// report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundRefusal {
    /// Why.
    pub reason: OutboundReason,
    /// The service's identity, or the address (`IP:port`) outside the mesh.
    pub target: String,
    /// The port asked for.
    pub port: u16,
    /// How many.
    pub count: u64,
}

/// A line of the snapshot watch that is not a snapshot: probes the control plane asks this
/// sidecar to make (`sidewall verify segmentation`; docs/compliance.md). A sidecar of an older
/// release is sent none (it says no `sidecar` facts in its acks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOrder {
    /// The probes, each a pair the policies in force must deny.
    pub probes: Vec<Probe>,
    /// When the run's time is up, Unix seconds: probes not made by then are not made.
    #[serde(default)]
    pub deadline: Option<i64>,
}

impl ProbeOrder {
    /// Most probes in one order.
    pub const MAX: usize = 1000;
}

/// One probe: dial `endpoint` as this sidecar, expecting `target`'s sidecar there, and ask for
/// `port` marked as a probe (ALPN `sidewall-probe/1`); the target must refuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// The verification run.
    pub run: String,
    /// The target workload.
    pub target: String,
    /// Its sidecar's endpoint, `IP:port`.
    pub endpoint: String,
    /// The service port.
    pub port: u16,
}

/// `POST /v1/probes`: what targets answered to this sidecar's probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResults {
    /// The sidecar process that probed.
    pub instance: String,
    /// One per probe.
    pub results: Vec<ProbeResult>,
}

/// What one target answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The probe, as ordered.
    #[serde(flatten)]
    pub probe: Probe,
    /// The answer.
    pub answer: ProbeAnswer,
}

/// A target's answer to a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeAnswer {
    /// Not yet answered.
    Pending,
    /// Refused: what the policy says.
    Refused,
    /// Admitted: the target does not enforce what the policy says.
    Admitted,
    /// No answer: the target did not complete the handshake or did not answer in time.
    NoAnswer,
}

/// Handshakes of one TLS version and cipher suite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsUse {
    /// `TLSv1_3` or `TLSv1_2`.
    pub version: String,
    /// The IANA name (`TLS13_AES_256_GCM_SHA384`).
    pub suite: String,
    /// Handshakes.
    pub count: u64,
}

/// Plaintext connections accepted on one permissive port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextUse {
    /// The service port.
    pub port: u16,
    /// Connections.
    pub count: u64,
}

/// Why a connection was refused before its identity was authorized, as detection sees it.
/// A reason this release does not know is kept as [`RefusalReason::Other`] (and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// Plaintext on an mTLS-only port.
    NotTls,
    /// A revoked identity or certificate.
    Revoked,
    /// An expired certificate.
    CertificateExpired,
    /// A certificate not valid yet.
    CertificateNotYetValid,
    /// A certificate from a CA the sidecar does not trust.
    UnknownIssuer,
    /// An identity of a trust domain the sidecar does not trust.
    UnknownTrustDomain,
    /// A reason of a newer release.
    #[serde(other)]
    Other,
}

impl RefusalReason {
    /// The reason for a handshake failure label, if detection cares about it.
    pub fn of_label(label: &str) -> Option<Self> {
        Some(match label {
            "not_tls" => Self::NotTls,
            "revoked" => Self::Revoked,
            "certificate_expired" => Self::CertificateExpired,
            "certificate_not_yet_valid" => Self::CertificateNotYetValid,
            "unknown_issuer" => Self::UnknownIssuer,
            "unknown_trust_domain" => Self::UnknownTrustDomain,
            _ => return None,
        })
    }

    /// The label (as in `sidewall_proxy_handshake_failures_total{reason}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::Revoked => "revoked",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateNotYetValid => "certificate_not_yet_valid",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownTrustDomain => "unknown_trust_domain",
            Self::Other => "other",
        }
    }
}

/// Connections refused for one reason from one source since the last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalRecord {
    /// Why.
    pub reason: RefusalReason,
    /// Who: the peer's identity when it was authenticated (a revoked one), otherwise its
    /// address.
    pub source: String,
    /// How many.
    pub count: u64,
}

/// The longest `source` of a refusal record the control plane keeps.
pub const MAX_REFUSAL_SOURCE: usize = 256;

/// One observed flow to the reporting sidecar's workload and its counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The peer identity (a SPIFFE ID; records with anything else are dropped).
    pub peer: String,
    /// The service port.
    pub port: u16,
    /// The port's protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// The HTTP method, on HTTP ports.
    #[serde(default)]
    pub method: Option<String>,
    /// The first two path segments, on HTTP ports.
    #[serde(default)]
    pub path: Option<String>,
    /// Decisions in all.
    pub count: u64,
    /// Of which allowed.
    #[serde(default)]
    pub allow: u64,
    /// Of which denied.
    #[serde(default)]
    pub deny: u64,
    /// Of which allowed in audit mode only.
    #[serde(default)]
    pub audit: u64,
    /// The last denial's reason.
    #[serde(default)]
    pub last_denial: Option<String>,
}

/// The control plane's limits on one flow record's fields: the method at most this long.
pub const MAX_FLOW_METHOD: usize = 32;
/// The path at most this long.
pub const MAX_FLOW_PATH: usize = 256;
/// The last denial's reason, in characters, kept at most.
pub const MAX_FLOW_DENIAL: usize = 200;

impl FlowRecord {
    /// The record as the control plane keeps it: `None` when the peer is not a SPIFFE ID; an
    /// over-long method or path is dropped, the denial reason cut to [`MAX_FLOW_DENIAL`].
    pub fn sanitized(self) -> Option<Self> {
        SpiffeId::parse(&self.peer).ok()?;
        Some(Self {
            method: self.method.filter(|m| m.len() <= MAX_FLOW_METHOD),
            path: self.path.filter(|p| p.len() <= MAX_FLOW_PATH),
            last_denial: self
                .last_denial
                .map(|d| d.chars().take(MAX_FLOW_DENIAL).collect()),
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `value` as JSON and reads it back: the same value.
    pub(super) fn round_trip<T>(value: &T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(value).unwrap_or_default();
        let back: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(&back, value);
    }

    #[test]
    fn every_body_reads_back_what_was_written() {
        for token in [Some("swt1.a.b.c".to_owned()), None] {
            round_trip(&CertificateRequest {
                csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
                token,
                service_account_token: None,
                pod: None,
            });
        }
        round_trip(&CertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            token: None,
            service_account_token: Some("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into()),
            pod: Some("api-7f9c".into()),
        });
        round_trip(&Certificate {
            certificate_chain: "leaf, intermediate".into(),
            trust_bundle: "root".into(),
            expires_at: "2026-12-08T00:00:00Z".into(),
            identity: "spiffe://sidewall.local/ns/a/svc/b".into(),
            serial: "0a1b".into(),
        });
        round_trip(&Registration {
            instance: "api-1".into(),
            endpoint: "127.0.0.1:4643".into(),
            ports: vec![ServicePort {
                port: 8080,
                protocol: Protocol::Http,
                path_parameters: crate::http::PathParameters::Strip,
            }],
            addresses: vec!["10.0.0.1:80".into()],
        });
        round_trip(&Registered {
            endpoint: "10.0.0.7:4643".into(),
            addresses_refused: vec![operator::RefusedAddress {
                address: "10.96.0.1:80".into(),
                reason: operator::RefusedBecause::NotDeclared,
            }],
        });
        for status in [AckStatus::Applied, AckStatus::Rejected] {
            round_trip(&Ack {
                instance: "api-1".into(),
                version: SnapshotVersion {
                    epoch: "e".into(),
                    counter: 7,
                },
                status,
                reason: Some("why".into()),
                certificate_expires_at: Some(1),
                certificate_serial: None,
                sidecar: Some(SidecarFacts {
                    version: "0.1.0".into(),
                    permissive_ports: vec![8080],
                    egress: vec!["10.0.0.1:443".into()],
                    allow_tls12: true,
                    probes: true,
                }),
            });
        }
        round_trip(&FlowReport {
            tls: vec![TlsUse {
                version: "TLSv1_3".into(),
                suite: "TLS13_AES_256_GCM_SHA384".into(),
                count: 2,
            }],
            plaintext: vec![PlaintextUse { port: 80, count: 1 }],
            outbound: vec![OutboundRefusal {
                reason: OutboundReason::NotInMesh,
                target: "10.0.0.9:443".into(),
                port: 443,
                count: 1,
            }],
            flows: vec![FlowRecord {
                peer: "spiffe://sidewall.local/web".into(),
                port: 8080,
                protocol: Protocol::Http,
                method: Some("GET".into()),
                path: Some("/v1/orders".into()),
                count: 3,
                allow: 2,
                deny: 1,
                audit: 0,
                last_denial: Some("no rule".into()),
            }],
            refusals: vec![RefusalRecord {
                reason: RefusalReason::Revoked,
                source: "127.0.0.1".into(),
                count: 2,
            }],
        });
    }

    #[test]
    fn a_report_without_refusals_or_with_an_unknown_reason_is_read() {
        let old: FlowReport =
            serde_json::from_str(r#"{"flows":[]}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(old.refusals.is_empty());
        let newer: FlowReport = serde_json::from_str(
            r#"{"flows":[],"refusals":[{"reason":"quantum","source":"10.0.0.1","count":1}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(newer.refusals[0].reason, RefusalReason::Other);
        let newer: FlowReport = serde_json::from_str(
            r#"{"flows":[],"outbound":[{"reason":"quantum","target":"x","port":1,"count":1}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(newer.outbound[0].reason, OutboundReason::Other);
        for label in [
            "not_tls",
            "revoked",
            "certificate_expired",
            "unknown_issuer",
        ] {
            let reason = RefusalReason::of_label(label).unwrap_or_else(|| panic!("{label}"));
            assert_eq!(reason.as_str(), label);
        }
        assert_eq!(RefusalReason::of_label("timeout"), None);
    }

    #[test]
    fn unknown_fields_are_accepted_and_an_unknown_status_is_told_apart() {
        let ack: Ack = serde_json::from_str(
            r#"{"instance":"a","version":{"epoch":"e","counter":1},"status":"applied","later":true}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ack.status, AckStatus::Applied);
        let ack: Ack = serde_json::from_str(
            r#"{"instance":"a","version":{"epoch":"e","counter":1},"status":"done"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ack.status, AckStatus::Unknown);
        assert!(
            serde_json::from_str::<Ack>(
                r#"{"instance":"a","version":{"epoch":"e","counter":1},"status":7}"#
            )
            .is_err()
        );
    }

    #[test]
    fn instances_and_flow_records_are_checked() {
        assert!(valid_instance("api-7f3a"));
        for bad in ["", "a b", "a/b", &"x".repeat(65), "é"] {
            assert!(!valid_instance(bad), "{bad:?}");
        }
        let record = |peer: &str, method: &str| FlowRecord {
            peer: peer.into(),
            port: 1,
            protocol: Protocol::Http,
            method: Some(method.into()),
            path: None,
            count: 1,
            allow: 1,
            deny: 0,
            audit: 0,
            last_denial: Some("d".repeat(300)),
        };
        assert_eq!(record("not an id", "GET").sanitized(), None);
        let kept = record("spiffe://td/web", &"M".repeat(33))
            .sanitized()
            .unwrap_or_else(|| panic!("kept"));
        assert_eq!(kept.method, None);
        assert_eq!(kept.last_denial.map(|d| d.len()), Some(200));
    }
}
