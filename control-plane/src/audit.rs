//! The audit trail: every state change the control plane makes, appended as a record that
//! carries the hash of the record before it ([`AuditRecord`]), so that a record altered,
//! removed or put out of order in the store breaks the chain at that record ([`verify`]).
//!
//! The store assigns the sequence number and the link in the same transaction that appends, so
//! replicas sharing etcd append to one chain (`Store::append_audit`). A record is appended once
//! the change it describes has committed; if the append itself fails the change stands, the
//! failure is logged and counted (`sidewall_control_plane_audit_failures_total`).
//!
//! What the chain alone cannot show: a whole chain rewritten, hashes recomputed, by someone
//! who can write the store. So the control plane signs the head every
//! `audit.checkpointInterval` when it moved, and once more when it stops: an `audit.checkpoint`
//! record in the chain itself, carrying the record it covers, that record's hash, the signature
//! and the signing certificate's chain ([`checkpoint`]). The key is the control plane's serving
//! key (its SVID, `spiffe://<td>/sidewall/control-plane`); [`verify_checkpoints`] checks each
//! signature, that the certificate is a valid SVID of the control plane chaining to the trust
//! bundle at the time it signed, that the record it covers is unchanged, and that no record
//! older than the caller's bound is left unsigned. Records cut off the end leave a shorter trail
//! that still verifies: the head a reader kept from an earlier run is the answer to that.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use sidewall_policies::TrustDomain;
use sidewall_policies::svid::{SpiffeClientVerifier, SvidError, TrustBundles};
use sidewall_policies::wire::operator::AuditRecord;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A change to record: the store gives it its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who made the change.
    pub actor: String,
    /// `noun.verb`.
    pub action: &'static str,
    /// What it was made to.
    pub subject: String,
    /// Facts of the change, never a secret.
    pub details: BTreeMap<String, String>,
}

impl AuditEvent {
    /// An event with no details yet.
    pub fn new(actor: impl Into<String>, action: &'static str, subject: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action,
            subject: subject.into(),
            details: BTreeMap::new(),
        }
    }

    /// Adds one detail.
    #[must_use]
    pub fn with(mut self, name: &str, value: impl ToString) -> Self {
        self.details.insert(name.to_owned(), value.to_string());
        self
    }

    /// The record this event becomes at `seq`, after the record whose hash is `prev`.
    pub fn chained(self, seq: u64, time: i64, prev: String) -> AuditRecord {
        let mut record = AuditRecord {
            seq,
            time,
            actor: self.actor,
            action: self.action.to_owned(),
            subject: self.subject,
            details: self.details,
            prev,
            hash: String::new(),
        };
        record.hash = digest(&record);
        record
    }
}

/// What is hashed: every field but the hash, in this order (serde writes fields in declaration
/// order and the details map sorted by name, so the JSON is canonical).
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time: i64,
    actor: &'a str,
    action: &'a str,
    subject: &'a str,
    details: &'a BTreeMap<String, String>,
    prev: &'a str,
}

/// The hash a record must carry, from its other fields.
pub fn digest(record: &AuditRecord) -> String {
    let hashed = Hashed {
        seq: record.seq,
        time: record.time,
        actor: &record.actor,
        action: &record.action,
        subject: &record.subject,
        details: &record.details,
        prev: &record.prev,
    };
    // Serializing strings, numbers and a string map cannot fail.
    let json = serde_json::to_vec(&hashed).unwrap_or_default();
    crate::random::sha256_hex(&json)
}

/// The `prev` of the record after one stored as `bytes`: its hash, or when it is not a record
/// at all (damaged in the store), the hash of the bytes, so that appending goes on and
/// verification names the damage.
pub fn link(bytes: &[u8]) -> String {
    match serde_json::from_slice::<AuditRecord>(bytes) {
        Ok(record) => record.hash,
        Err(_) => crate::random::sha256_hex(bytes),
    }
}

/// Refused registrations, folded so that no one who reaches the API can grow the store: in each
/// minute the first [`Refusals::PER_MINUTE`] refusals are recorded one by one (source and
/// reason), the rest counted by reason and recorded as one `registration.refused` record when
/// the minute is over ([`Refusals::flush`]).
pub struct Refusals {
    state: std::sync::Mutex<Window>,
}

struct Window {
    started: std::time::Instant,
    recorded: usize,
    folded: BTreeMap<&'static str, u64>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::new(Window {
                started: std::time::Instant::now(),
                recorded: 0,
                folded: BTreeMap::new(),
            }),
        }
    }
}

impl Refusals {
    /// Refusals recorded one by one per minute.
    pub const PER_MINUTE: usize = 10;

    /// A registration from `source` was refused for `reason`: the event to record now, or
    /// `None` when it is folded into the minute's count.
    pub fn refused(
        &self,
        source: Option<std::net::SocketAddr>,
        reason: &'static str,
    ) -> Option<AuditEvent> {
        let mut window = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if window.started.elapsed() >= std::time::Duration::from_secs(60)
            && window.folded.is_empty()
        {
            window.started = std::time::Instant::now();
            window.recorded = 0;
        }
        if window.recorded < Self::PER_MINUTE {
            window.recorded += 1;
            let source = source.map_or_else(|| "unknown".to_owned(), |s| s.ip().to_string());
            return Some(
                AuditEvent::new(source, "registration.refused", "-").with("reason", reason),
            );
        }
        *window.folded.entry(reason).or_default() += 1;
        None
    }

    /// Once the minute is over (or `now`, when the control plane stops): one record of what
    /// was folded in it (`None` when nothing was), and a new minute.
    pub fn flush(&self, now: bool) -> Option<AuditEvent> {
        let mut window = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !now && window.started.elapsed() < std::time::Duration::from_secs(60) {
            return None;
        }
        window.started = std::time::Instant::now();
        window.recorded = 0;
        let folded = std::mem::take(&mut window.folded);
        if folded.is_empty() {
            return None;
        }
        let total: u64 = folded.values().sum();
        let mut event =
            AuditEvent::new("several sources", "registration.refused", "-").with("folded", total);
        for (reason, count) in folded {
            event = event.with(&format!("reason.{reason}"), count);
        }
        Some(event)
    }
}

/// The action of a signed checkpoint.
pub const CHECKPOINT: &str = "audit.checkpoint";

/// The action of a policy set applied.
pub const POLICY_APPLIED: &str = "policy.applied";

/// The action of a segmentation test finished (`sidewall verify segmentation`).
pub const SEGMENTATION_VERIFIED: &str = "segmentation.verified";

/// The action of a segmentation report signed ([`crate::report`]).
pub const REPORT_SIGNED: &str = "report.signed";

/// The bytes a checkpoint signs: the trust domain, the record covered, its hash, the time.
pub fn checkpoint_message(trust_domain: &str, seq: u64, hash: &str, time: i64) -> Vec<u8> {
    format!("sidewall audit checkpoint v1\n{trust_domain}\n{seq}\n{hash}\n{time}\n").into_bytes()
}

/// A checkpoint over `head`, signed at `time` with `key` (the control plane's serving key):
/// the store appends it like any record, at `time`.
pub fn checkpoint(
    actor: &str,
    trust_domain: &TrustDomain,
    head: &AuditRecord,
    time: i64,
    key: &CertifiedKey,
) -> Result<AuditEvent, String> {
    let message = checkpoint_message(trust_domain.as_str(), head.seq, &head.hash, time);
    let (signature, chain) = sign(key, &message)?;
    Ok(AuditEvent::new(actor, CHECKPOINT, head.seq.to_string())
        .with("hash", &head.hash)
        .with("signature", crate::random::hex(&signature))
        .with("chain", chain))
}

/// Signs `message` with `key` (the control plane's serving key): ECDSA P-256 with SHA-256, DER,
/// and the certificate chain as PEM, leaf first. What `openssl dgst -sha256 -verify` checks.
pub fn sign(key: &CertifiedKey, message: &[u8]) -> Result<(Vec<u8>, String), String> {
    let signer = key
        .key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or("the control plane's key is not ECDSA P-256")?;
    let signature = signer.sign(message).map_err(|e| e.to_string())?;
    let chain = key
        .cert
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect();
    Ok((signature, chain))
}

/// What the signed checkpoints of an intact chain cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The newest record a valid checkpoint covers (0: none).
    pub covered: u64,
    /// When that checkpoint was signed.
    pub at: i64,
    /// Valid checkpoints.
    pub checkpoints: u64,
}

/// Checks every checkpoint of a chain that [`verify`] passed, against `bundle_pem` (the trust
/// domain's roots), and that no record older than `now - unsigned_for` is left uncovered.
pub fn verify_checkpoints(
    records: &[AuditRecord],
    trust_domain: &TrustDomain,
    bundle_pem: &str,
    now: i64,
    unsigned_for: i64,
) -> Result<Signed, Broken> {
    let verifier = SignatureCheck::new(trust_domain, bundle_pem);
    let mut signed = Signed {
        covered: 0,
        at: 0,
        checkpoints: 0,
    };
    for record in records.iter().filter(|r| r.action == CHECKPOINT) {
        let bad = |why: String| Broken::BadCheckpoint {
            seq: record.seq,
            why,
        };
        let covered: u64 = record
            .subject
            .parse()
            .map_err(|_| bad("its subject is not a record number".into()))?;
        if covered < first(records) {
            // It signed records a retention cut removed since.
            continue;
        }
        let detail = |name: &str| record.details.get(name).map(String::as_str).unwrap_or("");
        let target = records
            .iter()
            .find(|r| r.seq == covered)
            .ok_or_else(|| bad(format!("record {covered} is not in the trail")))?;
        if target.hash != detail("hash") {
            return Err(Broken::Rewritten {
                seq: covered,
                checkpoint: record.seq,
            });
        }
        let signature = crate::random::unhex(detail("signature"))
            .ok_or_else(|| bad("its signature is not hex".into()))?;
        let message = checkpoint_message(trust_domain.as_str(), covered, &target.hash, record.time);
        verifier
            .verify(detail("chain"), &message, &signature, record.time)
            .map_err(bad)?;
        if covered >= signed.covered {
            signed.covered = covered;
            signed.at = record.time;
        }
        signed.checkpoints += 1;
    }
    let stale = records
        .iter()
        .filter(|r| r.seq > signed.covered && r.action != CHECKPOINT)
        .filter(|r| r.time < now - unsigned_for)
        .map(|r| r.seq)
        .collect::<Vec<_>>();
    if let (Some(from), Some(to)) = (stale.first(), stale.last()) {
        return Err(Broken::Unsigned {
            from: *from,
            to: *to,
        });
    }
    Ok(signed)
}

/// Checks what the control plane signed ([`sign`]): its certificate chains to the trust
/// bundle's roots and names the control plane of the trust domain, and the signature verifies.
pub struct SignatureCheck(Option<SpiffeClientVerifier>);

impl SignatureCheck {
    /// Against `bundle_pem`, the roots of `trust_domain`.
    pub fn new(trust_domain: &TrustDomain, bundle_pem: &str) -> Self {
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
                .filter_map(Result::ok)
                .collect();
        let mut bundles = TrustBundles::default();
        let expected = trust_domain
            .id(crate::tls::CONTROL_PLANE_PATH)
            .map(|id| id.to_string())
            .unwrap_or_default();
        let verifier = bundles.add(trust_domain.clone(), roots).ok().and_then(|_| {
            let acceptor: sidewall_policies::svid::Acceptor = Arc::new(move |svid| {
                if svid.id.as_str() == expected {
                    Ok(())
                } else {
                    Err(SvidError::UnknownTrustDomain(format!(
                        "{} is not the control plane",
                        svid.id
                    )))
                }
            });
            SpiffeClientVerifier::new(&bundles, crate::tls::provider(), acceptor, true).ok()
        });
        Self(verifier)
    }

    /// Whether `signature` (DER) over `message` was made at `time` (Unix seconds) by the key
    /// of the leaf of `chain_pem`, a control-plane certificate valid then; why not.
    pub fn verify(
        &self,
        chain_pem: &str,
        message: &[u8],
        signature: &[u8],
        time: i64,
    ) -> Result<(), String> {
        let verifier = self
            .0
            .as_ref()
            .ok_or("the trust bundle holds no usable root")?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .filter_map(Result::ok)
                .collect();
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err("it carries no certificate".into());
        };
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(time).unwrap_or(0),
        ));
        use rustls::server::danger::ClientCertVerifier as _;
        verifier
            .verify_client_cert(leaf, intermediates, at)
            .map_err(|e| format!("its certificate is not the control plane's: {e}"))?;
        webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| format!("its certificate does not parse: {e:?}"))?
            .verify_signature(webpki::aws_lc_rs::ECDSA_P256_SHA256, message, signature)
            .map_err(|_| "its signature does not verify".to_owned())
    }
}

/// Where the chain breaks first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// A record's fields do not match its hash.
    #[error("record {seq} was altered: its fields do not match its hash")]
    Altered {
        /// The record.
        seq: u64,
    },
    /// The trail's first records are gone and no `audit.pruned` record accounts for them.
    #[error("records 1 to {to} were removed: no audit.pruned record accounts for them")]
    Truncated {
        /// The last one missing.
        to: u64,
    },
    /// A record is missing from its place.
    #[error("record {seq} was removed: the trail goes from {before} to {after}")]
    Removed {
        /// The missing record.
        seq: u64,
        /// The record before the gap (0: none).
        before: u64,
        /// The record found in its place.
        after: u64,
    },
    /// A record is not where its number says.
    #[error("record {seq} is out of order: record {found} is in its place")]
    Reordered {
        /// The first place out of order.
        seq: u64,
        /// The record the store holds there.
        found: u64,
    },
    /// A record does not link to the one before it: that one was replaced (with a hash made to
    /// match), or this one was.
    #[error(
        "record {seq} does not follow record {before}: one of them was replaced (its hash recomputed)"
    )]
    Unlinked {
        /// The record whose `prev` does not match.
        seq: u64,
        /// The record before it.
        before: u64,
    },
    /// A checkpoint that does not verify.
    #[error("checkpoint record {seq} does not verify: {why}")]
    BadCheckpoint {
        /// The checkpoint record.
        seq: u64,
        /// Why.
        why: String,
    },
    /// A record's hash differs from the one a checkpoint signed: the chain was rewritten from
    /// there, hashes recomputed.
    #[error(
        "record {seq} was rewritten: checkpoint record {checkpoint} signed another hash for it"
    )]
    Rewritten {
        /// The record.
        seq: u64,
        /// The checkpoint that signed it.
        checkpoint: u64,
    },
    /// Old records no checkpoint covers: the signatures were removed, or the control plane
    /// could not sign (its log says why).
    #[error("records {from} to {to} are covered by no signed checkpoint")]
    Unsigned {
        /// The first record uncovered.
        from: u64,
        /// The last.
        to: u64,
    },
}

impl Broken {
    /// The first record named.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Altered { seq }
            | Self::Removed { seq, .. }
            | Self::Reordered { seq, .. }
            | Self::Unlinked { seq, .. }
            | Self::BadCheckpoint { seq, .. }
            | Self::Rewritten { seq, .. } => *seq,
            Self::Unsigned { from, .. } => *from,
            Self::Truncated { .. } => 1,
        }
    }
}

/// The action of a retention cut: records up to `subject` were removed on purpose; `hash` is
/// the last one's, which the first record kept links to.
pub const PRUNED: &str = "audit.pruned";

/// Where a trail starts: record 1 after [`GENESIS`], or after a retention cut that an
/// `audit.pruned` record in the trail accounts for (its number and hash are those the first
/// record kept follows).
fn start(records: &[AuditRecord]) -> (u64, &str) {
    let Some(first) = records.first() else {
        return (1, GENESIS);
    };
    let accounted = first.seq > 1
        && records.iter().any(|r| {
            r.action == PRUNED
                && r.subject.parse::<u64>().ok() == Some(first.seq - 1)
                && r.details.get("hash") == Some(&first.prev)
        });
    if accounted {
        (first.seq, first.prev.as_str())
    } else {
        (1, GENESIS)
    }
}

/// Checks a whole trail, in the order the store holds it: numbers without gaps from 1 (or from
/// a retention cut an `audit.pruned` record accounts for), each record's hash, each link. `Ok`
/// with the number of the last record.
pub fn verify(records: &[AuditRecord]) -> Result<u64, Broken> {
    let (mut expected, mut prev) = start(records);
    let first = expected;
    for (index, record) in records.iter().enumerate() {
        if digest(record) != record.hash {
            return Err(Broken::Altered { seq: record.seq });
        }
        if record.seq != expected {
            let before = expected - 1;
            let later = records[index..].iter().any(|r| r.seq == expected);
            return Err(if record.seq < expected || later {
                Broken::Reordered {
                    seq: expected,
                    found: record.seq,
                }
            } else if index == 0 && first == 1 {
                Broken::Truncated { to: record.seq - 1 }
            } else {
                Broken::Removed {
                    seq: expected,
                    before,
                    after: record.seq,
                }
            });
        }
        if record.prev != prev {
            return Err(Broken::Unlinked {
                seq: record.seq,
                before: expected - 1,
            });
        }
        prev = &record.hash;
        expected += 1;
    }
    Ok(expected - 1)
}

/// The first record number of a trail that [`verify`] passed.
pub fn first(records: &[AuditRecord]) -> u64 {
    start(records).0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn trail(n: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for seq in 1..=n {
            let prev = out.last().map_or(GENESIS.to_owned(), |r| r.hash.clone());
            let event = AuditEvent::new("spiffe://td/sidewall/operator/ana", "token.created", "t")
                .with("identity", format!("spiffe://td/w{seq}"));
            out.push(event.chained(seq, 1_700_000_000 + seq as i64, prev));
        }
        out
    }

    #[test]
    fn an_intact_trail_verifies_and_every_kind_of_tampering_is_named() {
        assert_eq!(verify(&trail(5)), Ok(5));
        assert_eq!(verify(&[]), Ok(0));

        let mut altered = trail(5);
        altered[2].actor = "someone else".into();
        assert_eq!(verify(&altered), Err(Broken::Altered { seq: 3 }));

        let mut rehashed = trail(5);
        rehashed[2].actor = "someone else".into();
        rehashed[2].hash = digest(&rehashed[2]);
        assert_eq!(
            verify(&rehashed),
            Err(Broken::Unlinked { seq: 4, before: 3 })
        );

        let mut removed = trail(5);
        removed.remove(1);
        let broken = verify(&removed).unwrap_err();
        assert_eq!(
            broken,
            Broken::Removed {
                seq: 2,
                before: 1,
                after: 3
            }
        );
        assert_eq!(
            broken.to_string(),
            "record 2 was removed: the trail goes from 1 to 3"
        );

        let mut first_gone = trail(3);
        first_gone.remove(0);
        assert_eq!(verify(&first_gone).unwrap_err().seq(), 1);

        let mut swapped = trail(5);
        swapped.swap(1, 3);
        assert_eq!(
            verify(&swapped),
            Err(Broken::Reordered { seq: 2, found: 4 })
        );
        let mut adjacent = trail(5);
        adjacent.swap(3, 4);
        assert_eq!(verify(&adjacent).unwrap_err().seq(), 4);
    }

    #[test]
    fn a_retention_cut_verifies_only_where_a_pruned_record_accounts_for_it() {
        let mut full = trail(5);
        // A cut through record 2, recorded as record 6.
        let cut = AuditEvent::new("cp", PRUNED, "2").with("hash", &full[1].hash);
        let prev = full[4].hash.clone();
        full.push(cut.chained(6, 1_700_000_006, prev));
        let kept = full[2..].to_vec();
        assert_eq!(verify(&kept), Ok(6));
        assert_eq!(first(&kept), 3);
        // Without its account, the start is missing.
        let unaccounted = trail(5)[2..].to_vec();
        assert_eq!(verify(&unaccounted), Err(Broken::Truncated { to: 2 }));
        assert_eq!(
            Broken::Truncated { to: 2 }.to_string(),
            "records 1 to 2 were removed: no audit.pruned record accounts for them"
        );
        // An account that names another hash accounts for nothing.
        let mut forged = full.clone();
        forged[5].details.insert("hash".into(), "0".repeat(64));
        forged[5].hash = digest(&forged[5]);
        assert_eq!(verify(&forged[2..]), Err(Broken::Truncated { to: 2 }));
    }

    #[test]
    fn the_hash_covers_every_field() {
        let record = &trail(1)[0];
        let changes: [fn(&mut AuditRecord); 7] = [
            |r| r.seq += 1,
            |r| r.time += 1,
            |r| r.actor.push('x'),
            |r| r.action.push('x'),
            |r| r.subject.push('x'),
            |r| {
                r.details.insert("more".into(), "x".into());
            },
            |r| r.prev = "1".repeat(64),
        ];
        for change in changes {
            let mut changed = record.clone();
            change(&mut changed);
            assert_ne!(digest(&changed), record.hash);
        }
    }
}
