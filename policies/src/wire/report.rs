//! The segmentation report (`POST /v1/reports`, `sidewall report`; docs/compliance.md): what
//! the control plane knows about the mesh's segmentation over a period, as JSON that it signs.
//! The CLI renders the same JSON as a self-contained HTML page. Field names are stable: the
//! JSON is the evidence, the page a reading of it. Times are RFC 3339 (UTC).

use serde::{Deserialize, Serialize};

/// The format this module writes, named in every report.
pub const FORMAT: &str = "sidewall-segmentation-report/1";

/// `POST /v1/reports`: the period the report covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// Start of the period, Unix seconds (its end is the time the report is made).
    pub since: i64,
}

/// The answer: the report's JSON exactly as signed, the signature and the signing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReport {
    /// The report ([`Report`] as JSON text): the bytes the signature covers.
    pub report: String,
    /// ECDSA P-256 with SHA-256 over `report`'s UTF-8 bytes, DER, hex.
    pub signature: String,
    /// The control plane's certificate chain (PEM), leaf first, which the trust bundle verifies.
    pub chain: String,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// [`FORMAT`].
    pub format: String,
    /// When it was made.
    pub generated_at: String,
    /// The operator who asked for it.
    pub generated_by: String,
    /// The period: from.
    pub since: String,
    /// The period: to (the time it was made).
    pub until: String,
    /// 1. Scope.
    pub scope: Scope,
    /// 2. The segmentation matrix.
    pub segmentation: Segmentation,
    /// 3. Observed against allowed.
    pub observed: Observed,
    /// 4. Encryption in transit.
    pub encryption: Encryption,
    /// 5. Change history.
    pub changes: Changes,
    /// 6. Certificates.
    pub certificates: Certificates,
    /// 7. Which controls each section supports.
    pub controls: Vec<ControlMapping>,
}

/// Section 1: what the report covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The trust domain (`spiffe://…`).
    pub trust_domain: String,
    /// The control plane's version.
    pub control_plane_version: String,
    /// The control plane replica that made the report.
    pub replica: String,
    /// The policy version in force.
    pub policy_version: u64,
    /// Every workload registered or connected, by identity then instance.
    pub workloads: Vec<Workload>,
    /// What is not segmented as the matrix says: audit-only targets (open, only recorded).
    pub exceptions: Vec<Exception>,
}

/// One sidecar (one workload process) as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Its SPIFFE ID.
    pub identity: String,
    /// The sidecar process.
    pub instance: String,
    /// The service ports it registered (`8080/http`).
    pub ports: Vec<String>,
    /// Whether its sidecar is connected now.
    pub connected: bool,
    /// Whether it has applied the policy version in force (`None`: not connected to this
    /// replica, unknown).
    pub policy_in_force: Option<bool>,
    /// When its certificate expires, as its sidecar reported.
    pub certificate_expires_at: Option<String>,
    /// The type of the key of the newest certificate issued to its identity (`ECDSA P-256`).
    pub key_type: Option<String>,
    /// Its sidecar's release, as the sidecar reported.
    pub sidecar_version: Option<String>,
}

/// Something the matrix does not govern as it reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    /// `audit_only` (a target whose policies only record), `permissive_port` (a port that
    /// accepts plaintext), `egress` (a destination outside the mesh an app may reach),
    /// `tls12` (a sidecar that accepts TLS 1.2).
    pub kind: String,
    /// The target (an identity or a pattern).
    pub target: String,
    /// In plain words.
    pub detail: String,
}

/// Section 2: who may reach whom, from the policies in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segmentation {
    /// Always `deny`: what is not allowed is refused.
    pub default: String,
    /// Every rule in force.
    pub rules: Vec<MatrixRow>,
    /// Denied attempts counted since `observed.counted_since`, in all: refused by the target's
    /// sidecar (`observed.denied`) or by the caller's (`observed.refused_at_caller`).
    pub denied_attempts: u64,
    /// The newest segmentation test (`sidewall verify segmentation`) since the control plane
    /// started, if any.
    #[serde(default)]
    pub last_test: Option<TestSummary>,
}

/// What the newest segmentation test found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestSummary {
    /// The run.
    pub id: String,
    /// When it started.
    pub at: String,
    /// Who started it.
    pub by: String,
    /// The policy version it tested.
    pub policy_version: u64,
    /// Whether it has finished.
    pub finished: bool,
    /// Pairs probed.
    pub pairs: u64,
    /// Refused, as the policy says.
    pub refused: u64,
    /// Admitted: failures.
    pub admitted: u64,
    /// Not answered: failures too.
    pub no_answer: u64,
    /// Pairs no sidecar could probe.
    pub unprobed: u64,
    /// The pairs not refused, `source -> target:port`.
    pub failures: Vec<String>,
}

/// One rule: `from` may (or may not) reach `target` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixRow {
    /// The policy.
    pub policy: String,
    /// The rule, numbered from 1 as written.
    pub rule: usize,
    /// `enforce` or `audit`.
    pub mode: String,
    /// `allow` or `deny`.
    pub action: String,
    /// The callers (identities or patterns).
    pub from: Vec<String>,
    /// The target (an identity or a pattern).
    pub target: String,
    /// The ports (`all` when the rule names none).
    pub ports: String,
    /// HTTP constraints, summarized (empty: the whole port).
    pub http: String,
    /// Observed requests or connections this rule matches (counted since
    /// `observed.counted_since`, for flows seen in the period).
    pub matched: u64,
}

/// Section 3: the flows observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// From when the counts run: the start of the period's first day (UTC) with counts, or when
    /// counting began that day (counts are kept by day, for every flow seen in the period).
    pub counted_since: String,
    /// Each flow seen, by source, target, port (and HTTP method and path).
    pub flows: Vec<ObservedFlow>,
    /// Allow rules no observed flow matched: least-privilege candidates (rules naming paths or
    /// hosts are not judged: flows keep a path's first segments and no host).
    pub unused_allow_rules: Vec<RuleName>,
    /// Denied attempts, by source and target, refused by the target's sidecar.
    pub denied: Vec<Denied>,
    /// Attempts refused by the caller's own sidecar before they left its machine: a service no
    /// policy lets it call, or an address outside the mesh.
    #[serde(default)]
    pub refused_at_caller: Vec<CallerRefusal>,
}

/// Attempts from one caller to one target and port its own sidecar refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerRefusal {
    /// The caller.
    pub source: String,
    /// The service's identity, or the address outside the mesh.
    pub target: String,
    /// The port.
    pub port: u16,
    /// `unknown_service` (no policy lets the caller call it) or `not_in_mesh` (an address no
    /// service claims, not on the caller's egress list).
    pub reason: String,
    /// Attempts refused.
    pub attempts: u64,
}

/// One flow observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedFlow {
    /// The caller.
    pub source: String,
    /// The callee.
    pub target: String,
    /// The port.
    pub port: u16,
    /// `tcp`, `http`…
    pub protocol: String,
    /// For HTTP: method and path prefix.
    pub request: String,
    /// Allowed.
    pub allowed: u64,
    /// Denied.
    pub denied: u64,
    /// Allowed by an audit-mode policy that would deny it.
    pub would_deny: u64,
    /// The rule that decides it now (`default deny` when none; `undetermined…` when replaying
    /// the flow contradicts what was observed).
    pub rule: String,
    /// Last seen.
    pub last_seen: String,
}

/// A rule, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleName {
    /// The policy.
    pub policy: String,
    /// The rule, from 1.
    pub rule: usize,
}

/// Denied attempts from one source at one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denied {
    /// The caller.
    pub source: String,
    /// The callee.
    pub target: String,
    /// Attempts refused.
    pub attempts: u64,
}

/// Section 4: encryption in transit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// Observed sidecar-to-sidecar connections and requests, all over mutual TLS.
    pub mutual_tls: u64,
    /// Authenticated TLS handshakes at sidecars, by version and cipher suite.
    pub tls: Vec<TlsInUse>,
    /// Plaintext connections accepted on permissive ports.
    pub plaintext: Vec<PlaintextAccepted>,
    /// The shortest lifetime of a workload certificate issued in the period, in hours.
    pub shortest_certificate_hours: Option<u64>,
    /// The longest.
    pub longest_certificate_hours: Option<u64>,
}

/// Handshakes of one TLS version and cipher suite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInUse {
    /// `TLSv1_3` or `TLSv1_2`.
    pub version: String,
    /// IANA name.
    pub suite: String,
    /// Handshakes counted.
    pub handshakes: u64,
}

/// Plaintext accepted at one port of one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextAccepted {
    /// The workload.
    pub target: String,
    /// Its port.
    pub port: u16,
    /// Connections accepted.
    pub connections: u64,
}

/// Section 5: changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Policy versions applied in the period, oldest first.
    pub policy_versions: Vec<PolicyChange>,
    /// The audit trail as verified when the report was made.
    pub audit_trail: AuditSummary,
}

/// One policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyChange {
    /// The version.
    pub version: u64,
    /// Who applied it.
    pub applied_by: String,
    /// When.
    pub applied_at: String,
    /// Policies and rules in it.
    pub policies: usize,
    /// Rules in it.
    pub rules: usize,
    /// Policies added, removed and changed against the version before (from the audit trail).
    pub added: String,
    /// See `added`.
    pub removed: String,
    /// See `added`.
    pub changed: String,
    /// SHA-256 of the set (from the audit trail).
    pub set_sha256: String,
    /// Whether it is in force now.
    pub in_force: bool,
    /// When each sidecar applied it, as the control plane that made the report saw since it
    /// started, by instance.
    pub applied_by_sidecars: Vec<SidecarApplied>,
}

/// One sidecar applying one policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarApplied {
    /// The workload.
    pub identity: String,
    /// The sidecar process.
    pub instance: String,
    /// When its ack said so.
    pub at: String,
}

/// The audit trail's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSummary {
    /// Records in the trail.
    pub records: u64,
    /// Records in the period.
    pub records_in_period: u64,
    /// The newest record's number and hash.
    pub head_seq: u64,
    /// See `head_seq`.
    pub head_hash: String,
    /// Whether the chain and its signed checkpoints verify.
    pub verified: bool,
    /// Why not, when it does not.
    pub error: Option<String>,
}

/// Section 6: certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificates {
    /// Issued in the period.
    pub issued: Vec<IssuedCertificate>,
    /// Revoked in the period.
    pub revoked: Vec<Revoked>,
    /// CA rotation steps taken in the period (absent from reports made before rotations).
    #[serde(default)]
    pub ca_rotations: Vec<CaRotationStep>,
}

/// One step of a CA rotation, from the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotationStep {
    /// When.
    pub at: String,
    /// `prepared`, `activated` or `retired`.
    pub step: String,
    /// Which rotation (1, 2…).
    pub rotation: String,
    /// The root before (SHA-256).
    pub old_root_sha256: String,
    /// The root after.
    pub new_root_sha256: String,
    /// Whether it was taken past what blocked it.
    pub forced: bool,
    /// Who took it.
    pub by: String,
}

/// One certificate issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// Serial (hex).
    pub serial: String,
    /// Identity.
    pub identity: String,
    /// `workload` or `operator`.
    pub kind: String,
    /// Issued.
    pub issued_at: String,
    /// Expires.
    pub not_after: String,
    /// How the caller proved who it was: a join token, a renewal, an operator.
    pub authenticated_by: String,
    /// The key's type (`ECDSA P-256`), when recorded.
    pub key_type: Option<String>,
}

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// `identity` or `serial`.
    pub kind: String,
    /// What it names.
    pub value: String,
    /// When.
    pub at: String,
    /// Who.
    pub by: String,
}

/// The controls one section is evidence for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMapping {
    /// The section (1 to 6).
    pub section: u8,
    /// Control identifiers, by framework (`PCI DSS v4.0 1.2.1`).
    pub controls: Vec<String>,
}

/// `POST /v1/verifications`: test the segmentation (`sidewall verify segmentation`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationRequest {
    /// Probe this many of the pairs that must be denied, picked at random (default: all, up
    /// to 10000).
    #[serde(default)]
    pub sample: Option<usize>,
}

/// A segmentation test: each pair the policies in force must deny, probed by the source's
/// sidecar, and what the target answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Its id.
    pub id: String,
    /// The operator who started it.
    pub started_by: String,
    /// When.
    pub started_at: String,
    /// The policy version the pairs come from.
    pub policy_version: u64,
    /// Every pair answered, or its time is up (pairs still pending are `no_answer` then).
    pub finished: bool,
    /// The pairs must be denied that no sidecar could probe (its source has no connected
    /// sidecar of this release).
    pub unprobed: u64,
    /// The pairs probed.
    pub pairs: Vec<VerificationPair>,
    /// Answers sidecars posted for this run to probes it never ordered them (a sidecar that
    /// reports what it was not asked is not to be trusted: see the control plane's log).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unordered_answers: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Verification {
    /// The pairs whose target did not refuse: admitted, or no answer.
    pub fn failures(&self) -> impl Iterator<Item = &VerificationPair> {
        self.pairs
            .iter()
            .filter(|p| p.answer != super::ProbeAnswer::Refused)
    }
}

/// One pair: `source` must not reach `target` on `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationPair {
    /// The caller.
    pub source: String,
    /// The caller's sidecar that probed.
    pub instance: String,
    /// The callee.
    pub target: String,
    /// The callee's sidecar endpoint.
    pub endpoint: String,
    /// The port.
    pub port: u16,
    /// What the callee's sidecar answered.
    pub answer: super::ProbeAnswer,
}
