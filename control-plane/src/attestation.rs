//! Join tokens: how a new workload proves which identity it may have.
//!
//! A token is created by an operator for one identity and is all a new sidecar needs:
//! `swt1.<id>.<secret>.<root-sha256>` carries the lookup id, a 128-bit secret (stored only as
//! its SHA-256 and compared in constant time) and the fingerprint of the CA root, which the
//! sidecar pins on first contact. A token is single-use unless created with more uses; a
//! second redemption with the same public key is idempotent (a sidecar that crashed before
//! saving its certificate can retry).

use std::time::Duration;

use sidewall_policies::SpiffeId;

use crate::random::{constant_time_eq, hex_token, sha256_hex};
use crate::store::TokenRecord;

pub mod kubernetes;

const PREFIX: &str = "swt1";

/// Why a token is refused. Each has a stable code for the API and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the `swt1.<id>.<secret>.<fingerprint>` form.
    #[error("malformed join token")]
    Malformed,
    /// No token with this id, or the secret does not match (not distinguished on purpose).
    #[error("unknown join token")]
    Unknown,
    /// Past its expiry.
    #[error("join token expired")]
    Expired,
    /// Revoked by an operator.
    #[error("join token revoked")]
    Revoked,
    /// Every use already taken.
    #[error("join token already used")]
    UsedUp,
    /// The token pins a different CA than this control plane's.
    #[error("join token was issued by another control plane (CA fingerprint differs)")]
    OtherCa,
}

impl TokenError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::Unknown => "token_unknown",
            TokenError::Expired => "token_expired",
            TokenError::Revoked => "token_revoked",
            TokenError::UsedUp => "token_used",
            TokenError::OtherCa => "token_other_ca",
        }
    }
}

/// A parsed token string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Lookup id, 16 hex digits.
    pub id: String,
    /// The secret, 32 hex digits.
    pub secret: String,
    /// SHA-256 of the CA root, 64 hex digits.
    pub ca_fingerprint: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl JoinToken {
    /// Parses `swt1.<id>.<secret>.<fingerprint>`.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(fp), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        if !is_hex(id, 16) || !is_hex(secret, 32) || !is_hex(fp, 64) {
            return Err(TokenError::Malformed);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_fingerprint: fp.to_owned(),
        })
    }

    /// A fresh token for a CA root fingerprint.
    pub fn generate(ca_fingerprint: &str) -> Self {
        Self {
            id: hex_token(8),
            secret: hex_token(16),
            ca_fingerprint: ca_fingerprint.to_owned(),
        }
    }

    /// The token as the one string an operator hands to a sidecar.
    pub fn to_text(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }

    /// The record to store for this token (the secret only as a hash).
    pub fn record(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
        uses: u32,
        now: i64,
        created_by: &str,
    ) -> TokenRecord {
        TokenRecord {
            id: self.id.clone(),
            secret_sha256: sha256_hex(self.secret.as_bytes()),
            identity: identity.to_string(),
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            uses,
            redeemed_keys: Vec::new(),
            revoked_at: None,
            created_by: created_by.to_owned(),
            ca_root: Some(self.ca_fingerprint.clone()),
        }
    }

    /// Whether the secret matches the stored hash (constant time).
    pub fn matches(&self, record: &TokenRecord) -> bool {
        let presented = sha256_hex(self.secret.as_bytes());
        constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes())
    }
}

/// Whether an identity may be attested by a join token: a workload identity of the form
/// `/ns/<namespace>/svc/<service>`, never one under `/sidewall/`.
pub fn workload_identity(id: &SpiffeId) -> Result<(), &'static str> {
    if id.is_reserved() {
        return Err(
            "identities under /sidewall/ belong to the system and are never issued to workloads",
        );
    }
    let segments: Vec<&str> = id.path().split('/').skip(1).collect();
    match segments.as_slice() {
        ["ns", _, "svc", _] => Ok(()),
        _ => Err("workload identities have the form spiffe://<td>/ns/<namespace>/svc/<service>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_text_round_trips_and_refuses_garbage() {
        let token = JoinToken::generate(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&token.to_text()), Ok(token.clone()));
        assert_eq!(
            JoinToken::parse(&format!(" {}\n", token.to_text())),
            Ok(token.clone())
        );
        for bad in [
            "",
            "swt1",
            "swt2.a.b.c",
            &token.to_text().to_uppercase(),
            &format!("{}.x", token.to_text()),
        ] {
            assert_eq!(JoinToken::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn secrets_are_stored_hashed_and_compared() {
        let token = JoinToken::generate(&"00".repeat(32));
        let id = SpiffeId::parse("spiffe://td/ns/a/svc/b").unwrap();
        let record = token.record(&id, Duration::from_secs(60), 1, 1000, "admin");
        assert!(!record.secret_sha256.contains(&token.secret));
        assert_eq!(record.expires_at, 1060);
        assert!(token.matches(&record));
        let mut other = token.clone();
        other.secret = "0".repeat(32);
        assert!(!other.matches(&record));
    }

    #[test]
    fn only_workload_identities_are_attested() {
        let ok = SpiffeId::parse("spiffe://td/ns/default/svc/api").unwrap();
        assert!(workload_identity(&ok).is_ok());
        for bad in [
            "spiffe://td/sidewall/control-plane",
            "spiffe://td/sidewall/operator/x",
            "spiffe://td/api",
            "spiffe://td/ns/a/svc/b/c",
            "spiffe://td",
        ] {
            assert!(
                workload_identity(&SpiffeId::parse(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }
}
