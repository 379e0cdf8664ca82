//! The sidecar's identity: its key pair is generated here and never leaves; only a CSR does.
//!
//! On start the sidecar loads its last certificate, key and trust bundle from `stateDir`. If
//! there is none, or it has expired, it joins with the token from `tokenFile` (or, on
//! Kubernetes, the pod's service-account token from `serviceAccountTokenFile`): it fetches the
//! trust bundle, checks it against the CA fingerprint the join token carries (or
//! `caFingerprint`), and posts a CSR with the token. It then renews between 60 % and 75 % of the lifetime (a point fixed by
//! the certificate's serial, see [`renewal_point`]), over mTLS with its current
//! certificate and a **new key pair every time**, retrying with capped backoff while the old
//! certificate is still valid. Each new credential is published on a watch channel; listeners
//! build new TLS configurations from it, so open connections are untouched.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::{Svid, TrustBundles, Usage};
use tokio::sync::watch;

use crate::config::Config;

pub(crate) mod control_plane;
pub(crate) mod state;

pub use control_plane::JoinError;
pub use sidewall_policies::svid::renewal_point;

/// The earliest and latest wait between renewal attempts after a failure.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// A certificate, its key and the trust bundle, as one unit.
pub struct Credential {
    /// Leaf then intermediates, PEM.
    pub chain_pem: String,
    /// The private key, PEM (kept in memory and in the 0600 state file only).
    pub(crate) key_pem: String,
    /// The trust bundle, PEM.
    pub bundle_pem: String,
    /// The leaf's SVID facts.
    pub svid: Svid,
    /// The rustls form of chain and key.
    pub certified_key: Arc<CertifiedKey>,
    /// The roots per trust domain (this trust domain only, for now).
    pub bundles: TrustBundles,
    /// SHA-256 of the intermediate that signed the certificate, hex (empty without one): a
    /// snapshot naming another signing CA makes the sidecar renew early.
    pub issuer_sha256: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("identity", &self.svid.id)
            .field("serial", &self.svid.serial)
            .field("not_after", &self.svid.not_after)
            .finish_non_exhaustive()
    }
}

/// Why a credential is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The PEM or the certificate is unusable.
    #[error("credential: {0}")]
    Invalid(String),
    /// The certificate is not for this sidecar's identity.
    #[error("certificate is for {0}, expected {1}")]
    WrongIdentity(String, String),
}

fn invalid(e: impl std::fmt::Display) -> CredentialError {
    CredentialError::Invalid(e.to_string())
}

impl Credential {
    /// Builds a credential from PEM text, checking that the leaf is an SVID for `identity`.
    pub fn from_pem(
        identity: &SpiffeId,
        chain_pem: String,
        key_pem: String,
        bundle_pem: String,
    ) -> Result<Self, CredentialError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(invalid)?;
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("no certificate in the chain"))?;
        let svid = Svid::from_der(leaf, Usage::Client).map_err(invalid)?;
        if &svid.id != identity {
            return Err(CredentialError::WrongIdentity(
                svid.id.to_string(),
                identity.to_string(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(invalid)?;
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(invalid)?;
        let certified_key = Arc::new(CertifiedKey::new(chain, signing));
        certified_key
            .keys_match()
            .map_err(|_| invalid("the key does not match the certificate"))?;
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(invalid)?;
        if roots.is_empty() {
            return Err(invalid("empty trust bundle"));
        }
        let mut bundles = TrustBundles::default();
        bundles
            .add(identity.trust_domain(), roots)
            .map_err(invalid)?;
        let issuer_sha256 = certified_key.cert.get(1).map_or_else(String::new, |der| {
            control_plane::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
        });
        Ok(Self {
            issuer_sha256,
            chain_pem,
            key_pem,
            bundle_pem,
            svid,
            certified_key,
            bundles,
        })
    }

    /// Seconds until the certificate expires (negative once expired).
    pub fn seconds_left(&self) -> i64 {
        self.svid.not_after - now_unix()
    }

    /// When to renew ([`renewal_point`]).
    fn renew_at(&self) -> i64 {
        renewal_point(self.svid.not_before, self.svid.not_after, &self.svid.serial)
    }

    /// How long after noticing that another CA signs now to renew ([`early_renewal_delay`]).
    fn early_renewal_delay(&self) -> i64 {
        early_renewal_delay(self.svid.not_before, self.svid.not_after, &self.svid.serial)
    }
}

/// How long, in seconds, a certificate valid from `not_before` to `not_after` waits before it
/// renews once another CA signs (a CA rotation's activate stage): spread by `serial` (hex) over
/// a tenth of the lifetime, at most five minutes, so that a fleet does not renew at once.
pub fn early_renewal_delay(not_before: i64, not_after: i64, serial: &str) -> i64 {
    let window = ((not_after - not_before) / 10).clamp(1, 300);
    let tail = serial.get(serial.len().saturating_sub(8)..).unwrap_or("");
    let spread = u64::from_str_radix(tail, 16).unwrap_or(0) % window.unsigned_abs();
    i64::try_from(spread).unwrap_or(0)
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The current credential, `None` until the first one is obtained.
pub type CredentialWatch = watch::Receiver<Option<Arc<Credential>>>;

/// Loads the saved credential, if it is valid and for this identity.
pub fn load_saved(config: &Config) -> Option<Credential> {
    match state::load(&config.state_dir, &config.identity) {
        Ok(Some(credential)) if credential.seconds_left() > 0 => Some(credential),
        Ok(Some(credential)) => {
            tracing::warn!(serial = %credential.svid.serial, "saved certificate has expired; joining again");
            None
        }
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%error, "saved credential unusable; joining again");
            None
        }
    }
}

/// Keeps the credential current: joins if there is none, then renews at its
/// [`renewal_point`].
/// Runs until `stop` turns true.
pub async fn maintain(
    config: Arc<Config>,
    sender: watch::Sender<Option<Arc<Credential>>>,
    mut snapshots: Option<watch::Receiver<Option<Arc<crate::snapshot::Active>>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF.0;
    // When the snapshot names a signing CA other than the one that signed this certificate
    // (a CA rotation's activate stage): that CA, the certificate's serial, and when to renew
    // early. A new certificate that still differs (from a replica that had not followed yet)
    // waits its own spread again rather than renewing at once, over and over.
    let mut early: Option<(String, String, i64)> = None;
    // The key a join asks a certificate for, kept until a join succeeds: if an answer is lost
    // after the control plane redeemed the token for it, the retry asks for the same key, which
    // the token accepts again; a new key would find a single-use token used up.
    let mut joining: Option<(String, String)> = None;
    loop {
        let current = sender.borrow().clone();
        let signing = snapshots.as_mut().and_then(|s| {
            s.borrow_and_update()
                .as_ref()
                .and_then(|a| a.snapshot.signing_ca.clone())
        });
        early = match (&current, signing) {
            (Some(credential), Some(signing)) if signing != credential.issuer_sha256 => {
                match early.take() {
                    Some((ca, serial, at)) if ca == signing && serial == credential.svid.serial => {
                        Some((ca, serial, at))
                    }
                    _ => {
                        let delay = credential.early_renewal_delay().max(1);
                        tracing::info!(
                            renew_in_s = delay,
                            "the control plane signs with a new CA now: renewing early"
                        );
                        Some((signing, credential.svid.serial.clone(), now_unix() + delay))
                    }
                }
            }
            _ => None,
        };
        let wait = match &current {
            Some(credential) => {
                let at = early.as_ref().map_or(credential.renew_at(), |(_, _, at)| {
                    credential.renew_at().min(*at)
                });
                Duration::from_secs(u64::try_from(at - now_unix()).unwrap_or(0))
            }
            None => Duration::ZERO,
        };
        let snapshot_changed = async {
            match snapshots.as_mut() {
                Some(receiver) => receiver.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            open = snapshot_changed => {
                if !open {
                    snapshots = None;
                }
                continue;
            }
            _ = stop.changed() => return,
        }
        let result = match &current {
            Some(credential) if credential.seconds_left() > 0 => renew(&config, credential).await,
            _ => match &joining {
                Some(key) => join(&config, key).await,
                None => match key_and_csr() {
                    Ok(key) => join(&config, joining.insert(key)).await,
                    Err(error) => Err(error),
                },
            },
        };
        match result {
            Ok(credential) => {
                backoff = BACKOFF.0;
                joining = None;
                if let Err(error) = state::save(&config.state_dir, &credential) {
                    tracing::error!(%error, "cannot save the credential; it is used but not persisted");
                }
                tracing::info!(serial = %credential.svid.serial, expires_in_s = credential.seconds_left(), "certificate obtained");
                metrics::counter!(crate::metric::CERTIFICATES_OBTAINED).increment(1);
                let _ = sender.send(Some(Arc::new(credential)));
            }
            Err(error) => {
                let left = current.as_ref().map_or(0, |c| c.seconds_left());
                metrics::counter!(crate::metric::CERTIFICATE_FAILURES).increment(1);
                if left > 0 {
                    tracing::warn!(%error, retry_in_s = backoff.as_secs(), certificate_left_s = left, "renewal failed; keeping the current certificate");
                } else {
                    tracing::error!(%error, retry_in_s = backoff.as_secs(), "no valid certificate: handshakes fail closed until one is obtained");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// A fresh ECDSA P-256 key and a CSR for it.
fn key_and_csr() -> Result<(String, String), JoinError> {
    let key = rcgen::KeyPair::generate().map_err(JoinError::Key)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(JoinError::Key)?;
    Ok((key.serialize_pem(), csr))
}

/// Joins with the token file, asking a certificate for `key` (its PEM and its CSR).
async fn join(config: &Config, key: &(String, String)) -> Result<Credential, JoinError> {
    let cp = &config.control_plane;
    let (key_pem, csr) = key;
    let response = match (&cp.token_file, &cp.service_account_token_file) {
        (Some(path), _) => {
            let token = read_token(path)?;
            control_plane::join(&cp.urls, &config.identity, &token, csr).await?
        }
        (None, Some(path)) => {
            // Read at every join: the kubelet rotates it.
            let jwt = read_token(path)?;
            let fingerprint = cp.ca_fingerprint.as_deref().unwrap_or_default();
            let attestation = (jwt.as_str(), cp.pod.as_deref());
            control_plane::join_with_service_account(
                &cp.urls,
                &config.identity,
                fingerprint,
                attestation,
                csr,
            )
            .await?
        }
        (None, None) => return Err(JoinError::NoToken),
    };
    Credential::from_pem(
        &config.identity,
        response.certificate_chain,
        key_pem.clone(),
        response.trust_bundle,
    )
    .map_err(|e| JoinError::Answer(e.into()))
}

async fn renew(config: &Config, current: &Credential) -> Result<Credential, JoinError> {
    let (key_pem, csr) = key_and_csr()?;
    let response = control_plane::renew(&config.control_plane.urls, current, &csr).await?;
    Credential::from_pem(
        &config.identity,
        response.certificate_chain,
        key_pem,
        response.trust_bundle,
    )
    .map_err(|e| JoinError::Answer(e.into()))
}

fn read_token(path: &Path) -> Result<String, JoinError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| JoinError::TokenFile(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::{early_renewal_delay, renewal_point};

    #[test]
    fn early_renewal_is_spread_over_a_tenth_of_the_lifetime_at_most_five_minutes() {
        let serial = |i: u32| format!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15);
        for (lifetime, window) in [(120, 12), (3600, 300), (86_400, 300), (5, 1)] {
            let delays: Vec<i64> = (0..1000)
                .map(|i| early_renewal_delay(0, lifetime, &serial(i)))
                .collect();
            assert!(delays.iter().all(|d| (0..window).contains(d)), "{lifetime}");
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(
                distinct.len() as i64 >= window.min(10),
                "spread over the window for {lifetime} s: {} values",
                distinct.len()
            );
        }
        // A serial that is not hex, or empty, renews at once rather than never.
        assert_eq!(early_renewal_delay(0, 3600, "zz"), 0);
        assert_eq!(early_renewal_delay(0, 3600, ""), 0);
    }

    #[test]
    fn renewal_is_spread_over_60_to_75_percent_of_the_lifetime_by_serial() {
        let (not_before, lifetime) = (1_000_000, 86_400);
        let points: Vec<f64> = (0..2000)
            .map(|i| {
                let serial = format!("{:032x}", u128::from(i as u32) * 0x9e37_79b9_7f4a_7c15);
                let at = renewal_point(not_before, not_before + lifetime, &serial);
                assert_eq!(
                    at,
                    renewal_point(not_before, not_before + lifetime, &serial),
                    "the same serial, the same point"
                );
                (at - not_before) as f64 / lifetime as f64
            })
            .collect();
        let (low, high) = points
            .iter()
            .fold((1.0_f64, 0.0_f64), |(l, h), p| (l.min(*p), h.max(*p)));
        assert!(low >= 0.6 && high <= 0.75, "{low}..{high}");
        assert!(low < 0.61 && high > 0.74, "not spread: {low}..{high}");
        // A quarter of them in each quarter of the range, give or take.
        let in_first = points.iter().filter(|p| **p < 0.6375).count();
        assert!(
            (400..600).contains(&in_first),
            "{in_first} of 2000 in the first quarter"
        );
        // An expired or inverted validity renews at once.
        assert_eq!(renewal_point(5, 3, "ab"), 5);
    }
}
