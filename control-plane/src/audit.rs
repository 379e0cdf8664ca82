//! The audit trail: every state change the control plane makes, appended as a record that
//! carries the hash of the record before it ([`AuditRecord`]), so that a record altered,
//! removed or put out of order in the store breaks the chain at that record ([`verify`]).
//!
//! The store assigns the sequence number and the link in the same transaction that appends, so
//! replicas sharing etcd append to one chain (`Store::append_audit`). A record is appended once
//! the change it describes has committed; if the append itself fails the change stands, the
//! failure is logged and counted (`sidewall_control_plane_audit_failures_total`).
//!
//! What the chain alone cannot show: records cut off the end, or a whole chain rewritten by
//! someone who can write the store. Signed checkpoints of the chain head are the answer to
//! both; they are not built yet (docs/audit.md).

use std::collections::BTreeMap;

use serde::Serialize;
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

/// Where the chain breaks first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// A record's fields do not match its hash.
    #[error("record {seq} was altered: its fields do not match its hash")]
    Altered {
        /// The record.
        seq: u64,
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
}

impl Broken {
    /// The first record named.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Altered { seq }
            | Self::Removed { seq, .. }
            | Self::Reordered { seq, .. }
            | Self::Unlinked { seq, .. } => *seq,
        }
    }
}

/// Checks a whole trail, in the order the store holds it: numbers from 1 without gaps, each
/// record's hash, each link. `Ok` with the number of records.
pub fn verify(records: &[AuditRecord]) -> Result<u64, Broken> {
    let mut expected = 1;
    let mut prev = GENESIS;
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
