//! The bodies of the operator API (`docs/api.md`): what the CLI sends and what it reads back,
//! typed once. The control plane writes every answer below with these types and the CLI reads it
//! with the same ones, so a renamed field is a compile error, not a `?` in `sidewall status`.
//!
//! Forward compatibility as in the parent module: unknown fields are accepted everywhere (an
//! older CLI reads a newer control plane's answers); a field added later carries
//! `#[serde(default)]`. Words that name a state or a kind are enums, written in `snake_case`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Protocol;
use crate::load::Source;
use crate::snapshot::ServicePort;

// ---- Policies ----

/// `POST /v1/policies` and `POST /v1/policies/impact`: a policy set as files, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    /// The files, each a name (as errors should show it) and its text.
    pub files: Vec<Source>,
}

/// The answer to `POST /v1/policies`: the new version and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The version the set was stored as.
    pub version: u64,
    /// How many policies.
    pub policies: usize,
    /// How many rules.
    pub rules: usize,
    /// Targets left open by audit mode.
    #[serde(default)]
    pub audit_only_targets: Vec<String>,
}

/// `GET /v1/policies`: the history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// One row per version.
    pub versions: Vec<VersionSummary>,
    /// The current problem with the policy directory (`--policies-dir`), if any.
    #[serde(default)]
    pub source_error: Option<String>,
}

/// One version in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// The version.
    pub version: u64,
    /// The operator, or `gitops:<dir>`.
    pub applied_by: String,
    /// When, RFC 3339.
    pub applied_at: String,
    /// How many files.
    pub files: usize,
    /// How many policies (`None` if the stored set no longer compiles).
    pub policies: Option<usize>,
    /// How many rules.
    pub rules: Option<usize>,
    /// Whether it is the version in force.
    pub in_force: bool,
}

/// `GET /v1/policies/{v}`: one version, its files and the set as YAML. Version 0 (nothing
/// applied yet) has no `applied_by` or `applied_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The version.
    pub version: u64,
    /// The operator, or `gitops:<dir>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_by: Option<String>,
    /// When, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    /// The files as applied.
    pub files: Vec<Source>,
    /// The compiled set, as YAML.
    pub yaml: String,
}

/// `GET /v1/policies/{v}/status`: whether a version reached every sidecar it changed something
/// for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propagation {
    /// The version asked about.
    pub version: u64,
    /// Whether it is the version in force.
    pub in_force: bool,
    /// No sidecar is still waiting for it.
    pub done: bool,
    /// The connected sidecars (or replicas) still waiting.
    pub pending: Vec<PendingRow>,
    /// Sidecars gone for longer than the reconnect grace; they get it when they come back.
    #[serde(default)]
    pub disconnected: Vec<PendingRow>,
}

/// A sidecar that has not yet applied a version, or a replica that has not yet caught up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRow {
    /// The sidecar process (empty for a replica row).
    pub instance: String,
    /// Its identity (empty for a replica row).
    pub identity: String,
    /// Whether its watch is open.
    pub connected: bool,
    /// Since when it is (dis)connected, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// The last snapshot counter sent to it.
    pub sent: Option<u64>,
    /// The last counter it applied.
    pub applied: Option<u64>,
    /// Why it last rejected a snapshot.
    pub last_rejection: Option<String>,
    /// The control plane replica it is connected to.
    pub replica: String,
    /// For a replica row: the version that replica is still at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_behind: Option<u64>,
}

impl PendingRow {
    /// The row of one sidecar, as its replica sees it.
    pub fn of(entry: &FleetEntry, replica: &str) -> Self {
        Self {
            instance: entry.instance.clone(),
            identity: entry.identity.clone(),
            connected: entry.connected,
            since: Some(entry.since),
            sent: entry.sent,
            applied: entry.applied,
            last_rejection: entry.last_rejection.clone(),
            replica: replica.to_owned(),
            replica_behind: None,
        }
    }
}

/// The answer to `POST /v1/policies/impact`: what the candidate set would change in the flows
/// observed recently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impact {
    /// Every observed flow whose outcome would change.
    pub flips: Vec<Flip>,
    /// Targets the candidate leaves open by audit mode.
    #[serde(default)]
    pub audit_only_targets: Vec<String>,
    /// Flow records the control plane did not keep, by reason (the picture is partial then).
    #[serde(default)]
    pub flows_dropped: BTreeMap<String, u64>,
}

/// One observed flow whose outcome would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flip {
    /// The flow, as observed.
    #[serde(flatten)]
    pub flow: FlowKey,
    /// How many decisions it had.
    pub count: u64,
    /// Its outcome under the set in force (`allow`, `deny`, `audit`).
    pub before: String,
    /// Its outcome under the candidate.
    pub after: String,
}

// ---- Flows ----

/// One observed flow, as sidecars report them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    /// The peer identity.
    pub peer: String,
    /// The target identity (the reporting sidecar).
    pub target: String,
    /// The service port.
    pub port: u16,
    /// The port's protocol.
    pub protocol: Protocol,
    /// For HTTP: the method.
    #[serde(default)]
    pub method: Option<String>,
    /// For HTTP: the first path segments.
    #[serde(default)]
    pub path: Option<String>,
}

/// What was observed on one flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStats {
    /// Decisions in all.
    pub count: u64,
    /// Allowed.
    pub allow: u64,
    /// Denied.
    pub deny: u64,
    /// Allowed but recorded as "would deny" (audit mode).
    pub audit: u64,
    /// The rule (or "default deny") behind the last denial.
    pub last_denial: Option<String>,
    /// When the flow was last reported, Unix seconds.
    pub last_seen: i64,
}

/// `GET /v1/flows`: the flows observed recently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flows {
    /// One row per flow.
    pub flows: Vec<FlowRow>,
}

/// One flow and what was observed on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    /// The flow.
    pub flow: FlowKey,
    /// Its counts.
    pub stats: FlowStats,
}

// ---- The fleet and the directory ----

/// `GET /v1/fleet` (and the dashboard): one row per sidecar process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    /// The policy version in force.
    pub policy_version: u64,
    /// This control plane replica's API URL.
    pub replica: String,
    /// The current problem with the policy directory, if any.
    #[serde(default)]
    pub source_error: Option<String>,
    /// One row per sidecar process connected to this replica (or once connected).
    pub proxies: Vec<FleetEntry>,
    /// With several replicas: what the others report about their own sidecars.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_replicas: Vec<ReplicaRow>,
}

/// One sidecar process as the control plane sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetEntry {
    /// The sidecar process.
    pub instance: String,
    /// Its identity.
    pub identity: String,
    /// The endpoint it registered, if any.
    pub endpoint: Option<String>,
    /// Whether its watch stream is open now.
    pub connected: bool,
    /// Since when (connected or disconnected), Unix seconds.
    pub since: i64,
    /// The control plane replica it is connected to.
    pub replica: String,
    /// The counter of the last snapshot sent to it.
    pub sent: Option<u64>,
    /// The counter it last acknowledged as applied.
    pub applied: Option<u64>,
    /// When it last acknowledged, Unix seconds.
    pub last_ack_at: Option<i64>,
    /// Why it last rejected a snapshot, if it did.
    pub last_rejection: Option<String>,
    /// When its certificate expires, Unix seconds (as it reported).
    pub certificate_expires_at: Option<i64>,
    /// Its certificate's serial (as it reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// Addresses it registered that callers are not sent to, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses_refused: Vec<RefusedAddress>,
    /// The keep-alive interval its watch asked for, seconds: it answers each keep-alive line
    /// with an ack, and takes a watch silent for three for dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u64>,
    /// Connected, but nothing heard from it (an ack) for more than three keep-alives: its
    /// watch is silent or its path to the control plane frozen; it reconnects on its own.
    /// Computed when the fleet is read.
    #[serde(default)]
    pub stale: bool,
    /// What it runs with, as its last ack said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<super::SidecarFacts>,
    /// The last generation its stream has processed: the control plane's own bookkeeping,
    /// never on the wire.
    #[serde(skip)]
    pub processed: u64,
}

/// An address a workload registered that its callers are not sent to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedAddress {
    /// The address as registered.
    pub address: String,
    /// Why.
    pub reason: RefusedBecause,
}

/// Why callers are not sent to a registered address.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RefusedBecause {
    /// No policy targeting the identity lists it in `spec.addresses`.
    NotDeclared,
    /// It is another service's sidecar endpoint host with one of that service's ports.
    EndpointOfAnother,
}

impl std::fmt::Display for RefusedBecause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl RefusedBecause {
    /// The word on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotDeclared => "not_declared",
            Self::EndpointOfAnother => "endpoint_of_another",
        }
    }
}

/// Another replica's summary of its own sidecars, in the fleet view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRow {
    /// That replica's API URL.
    pub replica: String,
    /// The policy version in force there.
    pub policy_version: u64,
    /// How many sidecars are connected to it.
    pub connected: usize,
    /// How many of them have not yet applied that version.
    pub pending: usize,
}

/// `GET /v1/directory`: every registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// One per sidecar process that registered.
    pub registrations: Vec<RegistrationRecord>,
}

/// A sidecar's registration, as the control plane keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    /// The sidecar process (a random id per process start).
    pub instance: String,
    /// Its identity (from its certificate).
    pub identity: String,
    /// `host:port` of its inbound listener.
    pub endpoint: String,
    /// Service ports and protocols.
    pub ports: Vec<ServicePort>,
    /// Extra addresses clients may dial for the service.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// When, Unix seconds.
    pub registered_at: i64,
}

/// The answer to `DELETE /v1/directory/{instance}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deregistered {
    /// The sidecar process whose registration was removed.
    pub removed: String,
    /// The identities it was registered under (the operator's route; a sidecar removing its
    /// own registration gets none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

// ---- Operators ----

/// What an operator credential may do. Each role includes the ones before it; docs/api.md
/// gives the role every route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads: status, fleet, flows, policy history and diffs, impact, revocations.
    Viewer,
    /// A viewer who may also apply policy sets.
    Policy,
    /// Everything: join tokens, operators, revocations, registrations.
    Admin,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Policy, Role::Admin];

    /// The word on the wire, on the command line and in the certificate.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Policy => "policy",
            Self::Admin => "admin",
        }
    }

    /// The role named `word`, if it is one.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == word)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// `POST /v1/operators`: a credential for a new operator (the answer is a
/// [`Certificate`](super::Certificate)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRequest {
    /// The operator's name: one segment of `a-z A-Z 0-9 . _ -`.
    pub name: String,
    /// What the credential may do.
    pub role: Role,
    /// A PKCS#10 CSR in PEM for the operator's own key.
    pub csr: String,
}

/// `GET /v1/operators`: every operator certificate not yet expired (`?all=true`: every one),
/// by name, then oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operators {
    /// One row per certificate.
    pub operators: Vec<OperatorRow>,
}

/// One operator certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRow {
    /// The operator's name.
    pub name: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// What the certificate may do; absent for one issued before roles (it may only read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Its serial, lowercase hex.
    pub serial: String,
    /// Whether it is usable.
    pub state: OperatorState,
    /// When it was issued, RFC 3339.
    pub issued_at: String,
    /// When it expires, RFC 3339.
    pub expires_at: String,
    /// Who issued it: `operator:<id>`, or `control-plane` for the `admin` credential the
    /// control plane writes itself.
    pub issued_by: String,
}

/// An operator certificate's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorState {
    /// Valid and not revoked.
    Active,
    /// Its identity or serial is revoked.
    Revoked,
    /// Past its expiry.
    Expired,
}

impl OperatorState {
    /// The word on the wire and in `operator list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

impl std::fmt::Display for OperatorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The answer to `DELETE /v1/operators/{name}`: the operator's identity, now revoked (every
/// certificate of it, at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRevoked {
    /// The operator's SPIFFE ID.
    pub identity: String,
    /// How many of its certificates were still valid.
    pub certificates: usize,
}

// ---- Join tokens ----

/// `POST /v1/tokens`: a join token for one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The workload identity the token attests.
    pub identity: String,
    /// How long it stays valid (default and cap: `tokens.defaultTtl`, `tokens.maxTtl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// How many pods may redeem it (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
}

/// The answer to `POST /v1/tokens`: the token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token itself, `swt1.<id>.<secret>.<root-sha256>`.
    pub token: String,
    /// Its id (what `token list` and `token revoke` use).
    pub id: String,
    /// The identity it attests.
    pub identity: String,
    /// How many pods may redeem it.
    pub uses: u32,
    /// When it expires, RFC 3339.
    pub expires_at: String,
}

/// `GET /v1/tokens`: every token, oldest first, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// One row per token.
    pub tokens: Vec<TokenRow>,
}

/// One join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    /// Its id.
    pub id: String,
    /// The identity it attests.
    pub identity: String,
    /// Whether it can still be redeemed.
    pub state: TokenState,
    /// How many redemptions it allows.
    pub uses: u32,
    /// How many it had.
    pub used: usize,
    /// When it was created, RFC 3339.
    pub created_at: String,
    /// When it expires, RFC 3339.
    pub expires_at: String,
    /// The operator who created it.
    pub created_by: String,
}

/// A join token's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Redeemable.
    Active,
    /// Every use redeemed.
    Used,
    /// Past its expiry.
    Expired,
    /// Revoked by an operator.
    Revoked,
}

impl std::fmt::Display for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl TokenState {
    /// The word on the wire and in `token list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Used => "used",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

/// The answer to `DELETE /v1/tokens/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoked {
    /// The token's id.
    pub id: String,
    /// Now [`TokenState::Revoked`].
    pub state: TokenState,
}

// ---- Revocations ----

/// `POST /v1/ca/rotation`: one step of a staged CA rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaRotationRequest {
    /// `prepare`, `activate` or `retire`.
    pub step: String,
    /// Take the step although something blocks it.
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/ca`, and the answer to a rotation step: where the rotation stands, what blocks
/// its next step, and every sidecar's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// `settled`, `prepared` or `activated`.
    pub stage: String,
    /// How many rotations have begun.
    pub rotation: u64,
    /// When the last step was taken, Unix seconds (none before any rotation).
    #[serde(default)]
    pub changed_at: Option<i64>,
    /// Who took it.
    #[serde(default)]
    pub changed_by: Option<String>,
    /// Whether it was forced past what blocked it.
    #[serde(default)]
    pub forced: bool,
    /// The roots trusted now.
    pub roots: Vec<CaRoot>,
    /// The step that leaves this stage.
    pub next_step: String,
    /// What blocks that step now (empty: it may be taken).
    pub blockers: Vec<CaBlocker>,
    /// Every sidecar this replica knows, with its position.
    pub sidecars: Vec<CaSidecar>,
}

/// A trusted root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRoot {
    /// SHA-256 of the certificate, hex (what join tokens and `caFingerprint` pin).
    pub sha256: String,
    /// `signing`, `next` (prepared) or `previous` (being retired).
    pub role: String,
    /// Its subject's common name.
    pub name: String,
    /// When it expires, Unix seconds.
    pub not_after: i64,
}

/// One thing that blocks a rotation step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaBlocker {
    /// `sidecar`, `replica`, `certificate`, `token` or `root_key`.
    pub kind: String,
    /// Which one (identity and instance, serial, token id, replica URL).
    pub subject: String,
    /// Why it blocks, and what unblocks it.
    pub reason: String,
}

/// One sidecar's position in a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaSidecar {
    /// The sidecar process.
    pub instance: String,
    /// Its identity.
    pub identity: String,
    /// Whether its watch is open now.
    pub connected: bool,
    /// Whether it applied the snapshot carrying the trust bundle in force.
    pub bundle_applied: bool,
    /// Its certificate's serial, as it reported.
    #[serde(default)]
    pub certificate_serial: Option<String>,
    /// Which CA signed that certificate: `signing`, `previous`, `next` or `unknown`.
    pub certificate_ca: String,
    /// When that certificate expires, Unix seconds.
    #[serde(default)]
    pub certificate_expires_at: Option<i64>,
    /// The replica it is connected to, when another than the one answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// `POST /v1/revocations`: exactly one of an identity or a certificate serial.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRequest {
    /// Every certificate of this workload identity, and its registrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// One certificate, by serial (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// A workload identity: every certificate of it.
    Identity,
    /// One certificate, by serial.
    Serial,
}

impl std::fmt::Display for RevocationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl RevocationKind {
    /// The word on the wire, in logs and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Serial => "serial",
        }
    }
}

/// The answer to `POST /v1/revocations`: what was revoked, normalized (a serial in lowercase hex
/// without leading zeros).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Identity or serial.
    pub kind: RevocationKind,
    /// The identity or the serial.
    pub value: String,
}

/// `GET /v1/revocations`: every revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// Oldest first.
    pub revocations: Vec<RevocationRow>,
}

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRow {
    /// Identity or serial.
    pub kind: RevocationKind,
    /// The identity or the serial.
    pub value: String,
    /// When, RFC 3339.
    pub at: String,
    /// The operator.
    pub by: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::PathParameters;
    use crate::wire::tests::round_trip;

    fn entry() -> FleetEntry {
        FleetEntry {
            instance: "api-1".into(),
            identity: "spiffe://td/api".into(),
            endpoint: Some("10.0.0.7:4643".into()),
            connected: true,
            since: 5,
            replica: "https://cp:4600".into(),
            sent: Some(3),
            applied: Some(2),
            last_ack_at: Some(6),
            last_rejection: Some("why".into()),
            certificate_expires_at: Some(7),
            certificate_serial: None,
            addresses_refused: vec![RefusedAddress {
                address: "10.96.0.1:80".into(),
                reason: RefusedBecause::EndpointOfAnother,
            }],
            keepalive: Some(15),
            stale: true,
            sidecar: Some(super::super::SidecarFacts::default()),
            processed: 0,
        }
    }

    fn flow() -> FlowKey {
        FlowKey {
            peer: "spiffe://td/web".into(),
            target: "spiffe://td/api".into(),
            port: 8080,
            protocol: Protocol::Http,
            method: Some("GET".into()),
            path: Some("/v1/orders".into()),
        }
    }

    #[test]
    fn every_operator_body_reads_back_what_was_written() {
        let source = Source {
            name: "api.yaml".into(),
            text: "kind: Policy\n".into(),
        };
        round_trip(&PolicySet {
            files: vec![source.clone()],
        });
        round_trip(&Applied {
            version: 3,
            policies: 2,
            rules: 4,
            audit_only_targets: vec!["spiffe://td/r".into()],
        });
        round_trip(&History {
            versions: vec![VersionSummary {
                version: 1,
                applied_by: "gitops:/p".into(),
                applied_at: "2026-12-07T00:00:00Z".into(),
                files: 1,
                policies: None,
                rules: Some(4),
                in_force: true,
            }],
            source_error: Some("bad".into()),
        });
        for (applied_by, applied_at) in [(None, None), (Some("admin".into()), Some("t".into()))] {
            round_trip(&Version {
                version: 1,
                applied_by,
                applied_at,
                files: vec![source.clone()],
                yaml: "x: 1\n".into(),
            });
        }
        let mut behind = PendingRow::of(&entry(), "https://cp:4600");
        behind.since = None;
        behind.replica_behind = Some(2);
        round_trip(&Propagation {
            version: 3,
            in_force: true,
            done: false,
            pending: vec![PendingRow::of(&entry(), "https://cp:4600"), behind],
            disconnected: vec![],
        });
        round_trip(&Impact {
            flips: vec![Flip {
                flow: flow(),
                count: 9,
                before: "allow".into(),
                after: "deny".into(),
            }],
            audit_only_targets: vec![],
            flows_dropped: BTreeMap::from([("per_target".into(), 2)]),
        });
        round_trip(&Flows {
            flows: vec![FlowRow {
                flow: flow(),
                stats: FlowStats {
                    count: 3,
                    allow: 2,
                    deny: 1,
                    audit: 0,
                    last_denial: Some("default deny".into()),
                    last_seen: 8,
                },
            }],
        });
        round_trip(&Fleet {
            policy_version: 3,
            replica: "https://cp:4600".into(),
            source_error: None,
            proxies: vec![entry()],
            other_replicas: vec![ReplicaRow {
                replica: "https://cp2:4600".into(),
                policy_version: 3,
                connected: 4,
                pending: 1,
            }],
        });
        round_trip(&Directory {
            registrations: vec![RegistrationRecord {
                instance: "api-1".into(),
                identity: "spiffe://td/api".into(),
                endpoint: "10.0.0.7:4643".into(),
                ports: vec![ServicePort {
                    port: 8080,
                    protocol: Protocol::Http,
                    path_parameters: PathParameters::Refuse,
                }],
                addresses: vec![],
                registered_at: 1,
            }],
        });
        round_trip(&Deregistered {
            removed: "api-1".into(),
            identities: vec!["spiffe://td/api".into()],
        });
        round_trip(&OperatorRequest {
            name: "alice".into(),
            role: Role::Policy,
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        });
        round_trip(&Operators {
            operators: vec![OperatorRow {
                name: "alice".into(),
                identity: "spiffe://td/sidewall/operator/alice".into(),
                role: Some(Role::Viewer),
                serial: "1f".into(),
                state: OperatorState::Revoked,
                issued_at: "2026-01-01T00:00:00Z".into(),
                expires_at: "2026-04-01T00:00:00Z".into(),
                issued_by: "control-plane".into(),
            }],
        });
        assert_eq!(
            serde_json::from_str::<OperatorRequest>(r#"{"name":"a","role":"root","csr":""}"#)
                .unwrap_err()
                .to_string(),
            "unknown variant `root`, expected one of `viewer`, `policy`, `admin` at line 1 column 25"
        );
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert!(Role::Viewer < Role::Policy && Role::Policy < Role::Admin);
        round_trip(&TokenRequest {
            identity: "spiffe://td/api".into(),
            ttl_seconds: Some(3600),
            uses: None,
        });
        round_trip(&TokenCreated {
            token: "swt1.a.b.c".into(),
            id: "a".into(),
            identity: "spiffe://td/api".into(),
            uses: 2,
            expires_at: "t".into(),
        });
        for state in [
            TokenState::Active,
            TokenState::Used,
            TokenState::Expired,
            TokenState::Revoked,
        ] {
            round_trip(&Tokens {
                tokens: vec![TokenRow {
                    id: "a".into(),
                    identity: "spiffe://td/api".into(),
                    state,
                    uses: 2,
                    used: 1,
                    created_at: "t".into(),
                    expires_at: "t".into(),
                    created_by: "admin".into(),
                }],
            });
            assert_eq!(
                serde_json::to_value(state).unwrap_or_default(),
                state.as_str()
            );
        }
        round_trip(&TokenRevoked {
            id: "a".into(),
            state: TokenState::Revoked,
        });
        round_trip(&RevocationRequest {
            identity: None,
            serial: Some("0a".into()),
        });
        for kind in [RevocationKind::Identity, RevocationKind::Serial] {
            round_trip(&Revoked {
                kind,
                value: "v".into(),
            });
            round_trip(&Revocations {
                revocations: vec![RevocationRow {
                    kind,
                    value: "v".into(),
                    at: "t".into(),
                    by: "admin".into(),
                }],
            });
            assert_eq!(
                serde_json::to_value(kind).unwrap_or_default(),
                kind.as_str()
            );
        }
        for reason in [
            RefusedBecause::NotDeclared,
            RefusedBecause::EndpointOfAnother,
        ] {
            assert_eq!(
                serde_json::to_value(reason).unwrap_or_default(),
                reason.as_str()
            );
        }
    }

    #[test]
    fn the_internal_counter_never_crosses_the_wire_and_unknown_words_are_refused() {
        let mut counted = entry();
        counted.processed = 9;
        let text = serde_json::to_string(&counted).unwrap_or_default();
        assert!(!text.contains("processed"), "{text}");
        // A revocation of a kind this build does not know is not silently something else.
        assert!(
            serde_json::from_str::<RevocationRow>(
                r#"{"kind":"spiffe_prefix","value":"v","at":"t","by":"b"}"#
            )
            .is_err()
        );
        // Unknown fields are accepted (a newer control plane's answers).
        let revoked: Revoked = serde_json::from_str(r#"{"kind":"serial","value":"a","later":1}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(revoked.kind, RevocationKind::Serial);
    }
}

// ---- Audit trail ----

/// One record of the control plane's audit trail: a state change, who made it and when, chained
/// to the record before it by hash (`GET /v1/audit`; docs/audit.md). The field names are
/// stable: SIEM pipelines read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its place in the trail: 1, 2, 3… with no gaps.
    pub seq: u64,
    /// When, as Unix seconds.
    pub time: i64,
    /// Who: an operator's SPIFFE ID, a workload's, `control-plane`, or for a refused
    /// registration the address it came from.
    pub actor: String,
    /// What, as `noun.verb`: `policy.applied`, `token.created`, `operator.revoked`…
    pub action: String,
    /// What it was done to: a policy version, a token id, an identity…
    pub subject: String,
    /// Facts of the change (never a secret), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
    /// `hash` of the record before (64 zeros for the first).
    pub prev: String,
    /// SHA-256 (hex) of this record's fields above, as canonical JSON in this order.
    pub hash: String,
}

/// `GET /v1/audit`: records after `after`, oldest first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    /// The records.
    pub records: Vec<AuditRecord>,
    /// Ask with `after=` this for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}
