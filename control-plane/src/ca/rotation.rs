//! Staged CA rotation: the CA set in force, and how it moves through its stages.
//!
//! Before any rotation there is one CA and no record. A rotation writes a [`CaRecord`] to the
//! store; from then on the record, not the data directory or `P/ca`, says which CA signs and
//! which roots every sidecar trusts, and every replica follows it through the store's change
//! feed like any other snapshot state:
//!
//! | stage | signs | trust bundle | the control plane serves |
//! |---|---|---|---|
//! | settled | current | current | a certificate from current |
//! | prepared | current | current + next | a certificate from next, with next's root cross-signed by current's |
//! | activated | current (was next) | current + previous | the same, cross-signed by previous |
//!
//! Serving from the new CA from `prepare` on, with the new root cross-signed by the old one,
//! lets every client that trusts either root verify the control plane: sidecars that have not
//! yet applied the new bundle, join tokens made before the rotation (they pin the old root),
//! tokens made after (they pin the new one), and operators whose CLI holds an old bundle.
//! `retire` drops the old root and the cross-signature.
//!
//! The new CA's keys stay where the CA's keys are kept: files (0600) under `<data-dir>/ca/
//! rotation-N/` with the embedded store, sealed with the key-encryption key in the record with
//! etcd. Each stage is one compare-and-swap of the record, so a control plane that stops
//! mid-rotation starts again in the stage it was in, and two operators racing cannot both move
//! it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sidewall_policies::wire::operator::Role;
use sidewall_policies::{SpiffeId, TrustDomain};

use super::sealed::{CaMaterial, Kek, SealedCa};
use super::{Authority, CaError, Issued};

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// One CA signs and is trusted.
    Settled,
    /// A new root is trusted beside the one that signs.
    Prepared,
    /// The new CA signs; the old root is still trusted.
    Activated,
}

impl Stage {
    /// The stage's name, as `ca status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Settled => "settled",
            Self::Prepared => "prepared",
            Self::Activated => "activated",
        }
    }

    /// The step that leaves this stage.
    pub fn next_step(self) -> Step {
        match self {
            Self::Settled => Step::Prepare,
            Self::Prepared => Step::Activate,
            Self::Activated => Step::Retire,
        }
    }
}

/// A step of `sidewall ca rotate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Make a new CA and add its root to the trust bundle.
    Prepare,
    /// Sign with the new CA.
    Activate,
    /// Drop the old root.
    Retire,
}

impl Step {
    /// Parses `prepare`, `activate` or `retire`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "prepare" => Some(Self::Prepare),
            "activate" => Some(Self::Activate),
            "retire" => Some(Self::Retire),
            _ => None,
        }
    }

    /// The step's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Activate => "activate",
            Self::Retire => "retire",
        }
    }

    /// The stage the step starts from.
    pub fn from_stage(self) -> Stage {
        match self {
            Self::Prepare => Stage::Settled,
            Self::Activate => Stage::Prepared,
            Self::Retire => Stage::Activated,
        }
    }
}

/// Where one CA's keys are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "in", rename_all = "snake_case")]
pub enum CaKeys {
    /// In the data directory's `ca/` (`.`) or `ca/<dir>/`, files 0600 (embedded store).
    Files {
        /// The directory under `ca/`.
        dir: String,
    },
    /// Sealed with the key-encryption key, in the record itself (etcd).
    Sealed {
        /// The sealed CA.
        ca: Box<SealedCa>,
    },
}

/// One CA of the set: its certificates, and where its keys are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaEntry {
    /// The root certificate, PEM.
    pub root_pem: String,
    /// The intermediate certificate, PEM.
    pub intermediate_pem: String,
    /// Its keys.
    pub keys: CaKeys,
}

/// The CA set, as stored once a rotation has begun.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    /// How many rotations have begun (this one included).
    pub rotation: u64,
    /// The CA that signs.
    pub current: CaEntry,
    /// A prepared CA, trusted but not signing yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<CaEntry>,
    /// The CA that signed before activation, trusted until retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<CaEntry>,
    /// The newer root cross-signed by the older one, PEM (prepared and activated only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_pem: Option<String>,
    /// When the last step was taken, Unix seconds.
    pub changed_at: i64,
    /// Who took it (operator identity).
    pub changed_by: String,
    /// Whether it was forced past what blocked it.
    #[serde(default)]
    pub forced: bool,
    /// CAs retired by earlier stages: no longer trusted for anything but checking what they
    /// signed in the past (audit checkpoints). Kept whole, keys included, so that a root cannot
    /// be slipped in here: each is opened (its certificates authenticated by its keys) before
    /// its root is used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<CaEntry>,
}

impl CaRecord {
    /// The stage the record is in.
    pub fn stage(&self) -> Stage {
        if self.next.is_some() {
            Stage::Prepared
        } else if self.previous.is_some() {
            Stage::Activated
        } else {
            Stage::Settled
        }
    }

    /// The roots every sidecar trusts: the current one first.
    pub fn roots(&self) -> Vec<String> {
        [
            Some(&self.current),
            self.next.as_ref(),
            self.previous.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|entry| entry.root_pem.clone())
        .collect()
    }

    /// SHA-256 of the intermediate that signs, hex.
    pub fn signing_ca(&self) -> String {
        pem_fingerprint(&self.current.intermediate_pem)
    }
}

/// SHA-256 of the first certificate in `pem`, hex (empty if there is none).
pub fn pem_fingerprint(pem: &str) -> String {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_or_else(|_| String::new(), |der| crate::random::sha256_hex(&der))
}

/// Where this control plane keeps CA keys.
#[derive(Clone)]
pub enum KeyHome {
    /// The data directory's `ca/` (embedded store).
    Files(PathBuf),
    /// Sealed in the store with this key-encryption key (etcd).
    Sealed(Arc<Kek>),
}

impl std::fmt::Debug for KeyHome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Files(dir) => write!(f, "Files({})", dir.display()),
            Self::Sealed(_) => f.write_str("Sealed"),
        }
    }
}

impl KeyHome {
    /// Opens one CA of a record.
    pub fn open(&self, trust_domain: &TrustDomain, entry: &CaEntry) -> Result<Authority, CaError> {
        let material = match (&entry.keys, self) {
            (CaKeys::Files { dir }, Self::Files(ca_dir)) => {
                let dir = if dir == "." {
                    ca_dir.clone()
                } else {
                    ca_dir.join(dir)
                };
                let root_key = dir.join("root.key");
                CaMaterial {
                    root_pem: entry.root_pem.clone(),
                    root_key_pem: if root_key.exists() {
                        Some(super::read_private_pem(&root_key)?)
                    } else {
                        None
                    },
                    intermediate_pem: entry.intermediate_pem.clone(),
                    intermediate_key_pem: super::read_private_pem(&dir.join("intermediate.key"))?,
                }
            }
            (CaKeys::Sealed { ca }, Self::Sealed(kek)) => {
                if ca.root_pem != entry.root_pem || ca.intermediate_pem != entry.intermediate_pem {
                    return Err(CaError::Sealed(
                        "a rotation record's CA certificates differ from the sealed ones".into(),
                    ));
                }
                ca.open(trust_domain, kek)?
            }
            _ => {
                return Err(CaError::Sealed(
                    "the CA rotation record keeps its keys in another kind of store than this one"
                        .into(),
                ));
            }
        };
        Authority::from_material(trust_domain, &material)
    }

    /// Keeps a new CA's keys (files under `ca/<name>/`, or sealed) and says where.
    fn keep(
        &self,
        trust_domain: &TrustDomain,
        material: &CaMaterial,
        name: &str,
    ) -> Result<CaKeys, CaError> {
        match self {
            Self::Files(ca_dir) => {
                let dir = ca_dir.join(name);
                std::fs::create_dir_all(&dir).map_err(|source| CaError::Io {
                    path: dir.clone(),
                    source,
                })?;
                super::write_material(&dir, material)?;
                Ok(CaKeys::Files { dir: name.into() })
            }
            Self::Sealed(kek) => Ok(CaKeys::Sealed {
                ca: Box::new(SealedCa::seal(material, trust_domain, kek)?),
            }),
        }
    }

    /// The entry of the CA in force before any rotation.
    fn first(&self, trust_domain: &TrustDomain, ca: &Authority) -> Result<CaEntry, CaError> {
        let material = ca.material();
        Ok(CaEntry {
            root_pem: material.root_pem.clone(),
            intermediate_pem: material.intermediate_pem.clone(),
            keys: match self {
                Self::Files(_) => CaKeys::Files { dir: ".".into() },
                Self::Sealed(kek) => CaKeys::Sealed {
                    ca: Box::new(SealedCa::seal(material, trust_domain, kek)?),
                },
            },
        })
    }
}

/// The CAs in force: the one that signs, and those also trusted.
#[derive(Debug)]
pub struct CaSet {
    signing: Authority,
    next: Option<Authority>,
    previous: Option<Authority>,
    record: Option<CaRecord>,
    bundle_pem: String,
    /// The retired roots, PEM, each authenticated by opening its CA.
    retired_pem: String,
}

impl CaSet {
    /// One CA, before any rotation.
    pub fn single(ca: Authority) -> Self {
        let bundle_pem = ca.trust_bundle_pem().to_owned();
        Self {
            signing: ca,
            next: None,
            previous: None,
            record: None,
            bundle_pem,
            retired_pem: String::new(),
        }
    }

    /// The set a rotation record describes, keys opened from `home`.
    pub fn from_record(
        trust_domain: &TrustDomain,
        record: CaRecord,
        home: &KeyHome,
    ) -> Result<Self, CaError> {
        let open = |entry: &Option<CaEntry>| {
            entry
                .as_ref()
                .map(|entry| home.open(trust_domain, entry))
                .transpose()
        };
        let mut retired_pem = String::new();
        for entry in &record.retired {
            retired_pem.push_str(home.open(trust_domain, entry)?.trust_bundle_pem());
        }
        Ok(Self {
            signing: home.open(trust_domain, &record.current)?,
            next: open(&record.next)?,
            previous: open(&record.previous)?,
            bundle_pem: record.roots().concat(),
            retired_pem,
            record: Some(record),
        })
    }

    /// The rotation record, once a rotation has begun.
    pub fn record(&self) -> Option<&CaRecord> {
        self.record.as_ref()
    }

    /// The stage.
    pub fn stage(&self) -> Stage {
        self.record.as_ref().map_or(Stage::Settled, CaRecord::stage)
    }

    /// How many rotations have begun.
    pub fn rotations(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.rotation)
    }

    /// The CA that signs.
    pub fn signing(&self) -> &Authority {
        &self.signing
    }

    /// The prepared CA (prepared stage).
    pub fn next(&self) -> Option<&Authority> {
        self.next.as_ref()
    }

    /// The CA being retired (activated stage).
    pub fn previous(&self) -> Option<&Authority> {
        self.previous.as_ref()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.signing.trust_domain()
    }

    /// Every trusted root, PEM, the signing one first.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Every root trusted now or retired, PEM: for checking audit checkpoints signed before
    /// a rotation, never for a peer.
    pub fn history_bundle_pem(&self) -> String {
        format!("{}{}", self.bundle_pem, self.retired_pem)
    }

    /// The retired roots, PEM (authenticated), for `retired-roots.pem`.
    pub fn retired_pem(&self) -> &str {
        &self.retired_pem
    }

    /// Every trusted root, DER.
    pub fn roots_der(&self) -> Vec<CertificateDer<'static>> {
        [
            Some(&self.signing),
            self.next.as_ref(),
            self.previous.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|ca| ca.root_der().clone())
        .collect()
    }

    /// SHA-256 of the signing root: what the audit trail names.
    pub fn root_fingerprint(&self) -> String {
        self.signing.root_fingerprint()
    }

    /// The root a join token made now pins: the one that will outlive the rotation.
    pub fn token_root_fingerprint(&self) -> String {
        self.next
            .as_ref()
            .unwrap_or(&self.signing)
            .root_fingerprint()
    }

    /// Whether `fingerprint` (SHA-256 of a root, hex) is a root trusted now.
    pub fn trusts_root(&self, fingerprint: &str) -> bool {
        [
            Some(&self.signing),
            self.next.as_ref(),
            self.previous.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|ca| ca.root_fingerprint() == fingerprint)
    }

    /// Issues a workload certificate from the signing CA.
    pub fn issue(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        self.signing.issue(identity, spki, lifetime)
    }

    /// Issues an operator certificate from the signing CA.
    pub fn issue_operator(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
        role: Role,
    ) -> Result<Issued, CaError> {
        self.signing.issue_operator(identity, spki, lifetime, role)
    }

    /// Issues the control plane's serving certificate: from the newest CA, its chain carrying
    /// the cross-signed root while a rotation is under way (see the module's table).
    pub fn issue_serving(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
        names: &[String],
    ) -> Result<Issued, CaError> {
        let ca = self.next.as_ref().unwrap_or(&self.signing);
        let mut issued = ca.issue_with_names(identity, spki, lifetime, names)?;
        if let Some(cross) = self.record.as_ref().and_then(|r| r.cross_pem.as_ref())
            && self.stage() != Stage::Settled
        {
            issued.chain_pem.push_str(cross);
        }
        Ok(issued)
    }

    /// The record `prepare` writes: a new CA (keys kept in `home`), trusted beside this one,
    /// its root cross-signed by this one's. Refused when this CA's root key is not here.
    pub fn prepared(
        &self,
        home: &KeyHome,
        by: &str,
        now: i64,
    ) -> Result<CaRecord, RotationRefused> {
        let old = self.signing.material();
        let root_key = old
            .root_key_pem
            .as_deref()
            .ok_or(RotationRefused::RootKeyOffline)?;
        let rotation = self.rotations() + 1;
        let td = self.trust_domain();
        let suffix = format!(" (rotation {rotation})");
        let new = super::generate_named(td, &suffix)?;
        let cross_pem = cross_sign(td, &suffix, (&old.root_pem, root_key), &new)?;
        let keys = home.keep(td, &new, &format!("rotation-{rotation}"))?;
        let current = match &self.record {
            Some(record) => record.current.clone(),
            None => home.first(td, &self.signing)?,
        };
        Ok(CaRecord {
            rotation,
            current,
            next: Some(CaEntry {
                root_pem: new.root_pem,
                intermediate_pem: new.intermediate_pem,
                keys,
            }),
            previous: None,
            cross_pem: Some(cross_pem),
            changed_at: now,
            changed_by: by.to_owned(),
            forced: false,
            retired: self
                .record
                .as_ref()
                .map(|r| r.retired.clone())
                .unwrap_or_default(),
        })
    }

    /// The record the next step writes from this stage (`prepare` is [`Self::prepared`]).
    pub fn stepped(&self, step: Step, by: &str, now: i64) -> Option<CaRecord> {
        let record = self.record.as_ref()?;
        let mut record = record.clone();
        match step {
            Step::Prepare => return None,
            Step::Activate => {
                let next = record.next.take()?;
                record.previous = Some(std::mem::replace(&mut record.current, next));
            }
            Step::Retire => {
                let previous = record.previous.take()?;
                record.retired.push(previous);
                record.cross_pem = None;
            }
        }
        record.changed_at = now;
        record.changed_by = by.to_owned();
        record.forced = false;
        Some(record)
    }
}

/// Why a rotation step cannot be taken at all (blockers aside).
#[derive(Debug, thiserror::Error)]
pub enum RotationRefused {
    /// The root's key is not with the control plane (a plugged-in CA).
    #[error(
        "the root's private key is not with the control plane (a plugged-in CA keeps it offline): the new root could not be cross-signed, so clients that trust only the old root could not verify the control plane mid-rotation"
    )]
    RootKeyOffline,
    /// Generating, sealing or writing the new CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// `new`'s root (named with `suffix`) certified by the old root: same subject and key as the
/// new root, so a client trusting only the old root builds a path to it through this
/// certificate.
fn cross_sign(
    trust_domain: &TrustDomain,
    suffix: &str,
    (old_root_pem, old_root_key): (&str, &str),
    new: &CaMaterial,
) -> Result<String, CaError> {
    let old_key = KeyPair::from_pem(old_root_key)?;
    let old_root = CertificateDer::from_pem_slice(old_root_pem.as_bytes())
        .map_err(|e| CaError::Chain(format!("root: {e}")))?;
    let issuer = Issuer::from_ca_cert_der(&old_root, old_key)?;
    let new_key = KeyPair::from_pem(
        new.root_key_pem
            .as_deref()
            .ok_or_else(|| CaError::Chain("the new root has no key".into()))?,
    )?;
    let mut params = super::ca_params(
        trust_domain,
        &format!("root{suffix}"),
        super::ROOT_LIFETIME,
        None,
    )?;
    params.use_authority_key_identifier_extension = true;
    Ok(params.signed_by(&new_key, &issuer)?.pem())
}

/// The CA set in force, swapped whole when the record changes.
#[derive(Debug)]
pub struct CaCell(RwLock<Arc<CaSet>>);

impl CaCell {
    /// Starts with `set`.
    pub fn new(set: CaSet) -> Self {
        Self(RwLock::new(Arc::new(set)))
    }

    /// The set in force.
    pub fn get(&self) -> Arc<CaSet> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `set` in force.
    pub fn replace(&self, set: CaSet) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_rotation_moves_through_its_stages_and_the_new_root_is_cross_signed() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("td.test").unwrap();
        let home = KeyHome::Files(dir.path().to_path_buf());
        let first = Authority::load_or_create(dir.path(), &td, None).unwrap();
        let old_root = first.root_fingerprint();
        let set = CaSet::single(first);
        assert_eq!(set.stage(), Stage::Settled);
        assert!(set.stepped(Step::Activate, "op", 1).is_none());

        let prepared = set.prepared(&home, "op", 1).unwrap();
        assert_eq!(prepared.stage(), Stage::Prepared);
        assert_eq!(prepared.roots().len(), 2);
        assert!(dir.path().join("rotation-1/intermediate.key").exists());
        let set = CaSet::from_record(&td, prepared, &home).unwrap();
        let new_root = set.next().unwrap().root_fingerprint();
        assert_eq!(set.root_fingerprint(), old_root, "the old CA still signs");
        assert_eq!(set.token_root_fingerprint(), new_root);
        assert!(set.trusts_root(&old_root) && set.trusts_root(&new_root));
        // The cross certificate: the new root's subject and key, signed by the old root.
        let record = set.record().unwrap();
        let cross_der = der(record.cross_pem.as_ref().unwrap());
        let (_, cross) = X509Certificate::from_der(&cross_der).unwrap();
        let new_der = der(&record.next.as_ref().unwrap().root_pem);
        let (_, new) = X509Certificate::from_der(&new_der).unwrap();
        let old_der = der(&record.current.root_pem);
        let (_, old) = X509Certificate::from_der(&old_der).unwrap();
        assert_eq!(cross.subject(), new.subject());
        assert_ne!(new.subject(), old.subject(), "no two roots share a subject");
        assert_eq!(cross.public_key().raw, new.public_key().raw);
        cross.verify_signature(Some(old.public_key())).unwrap();
        // The serving chain carries it; a workload's does not.
        let key = KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let id = td.id("/sidewall/control-plane").unwrap();
        let serving = set
            .issue_serving(&id, &spki, Duration::from_secs(60), &[])
            .unwrap();
        assert_eq!(serving.chain_pem.matches("BEGIN CERTIFICATE").count(), 3);
        let workload = td.id("/ns/a/svc/b").unwrap();
        let issued = set
            .issue(&workload, &spki, Duration::from_secs(60))
            .unwrap();
        assert_eq!(issued.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);

        let activated = set.stepped(Step::Activate, "op", 2).unwrap();
        assert_eq!(activated.stage(), Stage::Activated);
        let set = CaSet::from_record(&td, activated, &home).unwrap();
        assert_eq!(set.root_fingerprint(), new_root, "the new CA signs");
        assert_eq!(set.previous().unwrap().root_fingerprint(), old_root);

        let retired = set.stepped(Step::Retire, "op", 3).unwrap();
        assert_eq!(retired.stage(), Stage::Settled);
        assert_eq!(retired.roots().len(), 1);
        assert_eq!(retired.retired.len(), 1);
        assert!(retired.cross_pem.is_none());
        // A root slipped into the retired list (another CA's certificate beside the retired
        // CA's keys) is refused, not trusted for checkpoints.
        let mut slipped = retired.clone();
        slipped.retired[0].root_pem = super::super::generate_material(&td).unwrap().root_pem;
        assert!(CaSet::from_record(&td, slipped, &home).is_err());
        let set = CaSet::from_record(&td, retired, &home).unwrap();
        assert!(set.retired_pem().contains("BEGIN CERTIFICATE"));
        assert!(!set.trusts_root(&old_root));
        assert!(set.history_bundle_pem().len() > set.trust_bundle_pem().len());
        let serving = set
            .issue_serving(&id, &spki, Duration::from_secs(60), &[])
            .unwrap();
        assert_eq!(serving.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        // The next rotation is number 2, under its own directory.
        let again = set.prepared(&home, "op", 4).unwrap();
        assert_eq!(again.rotation, 2);
        assert!(dir.path().join("rotation-2/root.key").exists());
    }

    #[test]
    fn a_plugged_in_ca_without_its_root_key_cannot_prepare() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("td.test").unwrap();
        let mut material = super::super::generate_material(&td).unwrap();
        material.root_key_pem = None;
        let set = CaSet::single(Authority::from_material(&td, &material).unwrap());
        let home = KeyHome::Files(dir.path().to_path_buf());
        assert!(matches!(
            set.prepared(&home, "op", 1),
            Err(RotationRefused::RootKeyOffline)
        ));
    }
}
