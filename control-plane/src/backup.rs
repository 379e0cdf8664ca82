//! Backups: `sidewall control-plane export` and `import`. A backup is one JSON file holding
//! everything a store holds ([`Records`], read at one point in time) and the CA with its
//! private keys sealed with the key-encryption key ([`crate::ca::sealed`]), so the file alone
//! cannot sign anything. It restores into either store: an embedded deployment moves to etcd
//! by exporting from its data directory and importing into a new etcd prefix.
//!
//! The store epoch is not carried over: the restored store has its own, so every sidecar
//! takes the first snapshot it receives from the new store (snapshot versions of another epoch
//! are always applied) whatever its counter.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ca::sealed::{CaMaterial, Kek, SealedCa, kek_path_required};
use crate::ca::{Authority, CaError, ca_dir, write_material};
#[cfg(not(feature = "etcd"))]
use crate::config::ConfigError;
use crate::config::{Config, StoreConfig};
use crate::now_unix;
use crate::server::StartError;
#[cfg(feature = "etcd")]
use crate::server::etcd_options;
use crate::store::embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
use crate::store::etcd::EtcdStore;
use crate::store::{Records, Store, StoreError};

/// The format tag of a backup file.
pub const FORMAT: &str = "sidewall-backup/1";

/// A backup file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Always [`FORMAT`].
    pub format: String,
    /// The trust domain of the CA and every identity in the records.
    pub trust_domain: String,
    /// When it was taken, Unix seconds.
    pub exported_at: i64,
    /// The CA, private keys sealed with the key-encryption key.
    pub ca: SealedCa,
    /// Everything else.
    pub records: Records,
}

/// Why a backup cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA cannot be read, sealed, opened or written.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The store settings are unusable.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The backup or the target does not fit.
    #[error("{0}")]
    Refused(String),
}

/// What an import wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Policy versions.
    pub policy_versions: usize,
    /// Join tokens.
    pub tokens: usize,
    /// Issued-certificate records.
    pub certificates: usize,
    /// Revocations.
    pub revocations: usize,
    /// Registrations.
    pub registrations: usize,
    /// Audit records.
    pub audit: usize,
}

/// The configured store. The embedded store's file must exist already when `existing`.
async fn open(config: &Config, existing: bool) -> Result<Target, BackupError> {
    match &config.store {
        StoreConfig::Embedded => {
            let path = crate::data_dir::store_path(&config.data_dir);
            if existing && !path.exists() {
                return Err(BackupError::Refused(format!(
                    "no embedded store at {} (another --data-dir?)",
                    path.display()
                )));
            }
            std::fs::create_dir_all(&config.data_dir)
                .map_err(|e| StartError::Io(config.data_dir.clone(), e))?;
            let store = EmbeddedStore::open(&path).map_err(|e| {
                BackupError::Refused(format!(
                    "{e} (stop the control plane first: the embedded store is one process's file)"
                ))
            })?;
            Ok(Target::Embedded(Arc::new(store)))
        }
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(etcd) => Ok(Target::Etcd(Box::new(
            EtcdStore::connect(&etcd_options(etcd)?).await?,
        ))),
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => Err(StartError::from(ConfigError::EtcdNotBuilt).into()),
    }
}

enum Target {
    Embedded(Arc<EmbeddedStore>),
    #[cfg(feature = "etcd")]
    Etcd(Box<EtcdStore>),
}

impl Target {
    fn store(&self) -> &dyn Store {
        match self {
            Self::Embedded(store) => store.as_ref(),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.as_ref(),
        }
    }
}

/// Takes a backup of the configured store and CA.
pub async fn export(config: &Config) -> Result<Backup, BackupError> {
    let kek = std::sync::Arc::new(Kek::load(kek_path_required(config.ca_kek_file.as_ref())?)?);
    let td = &config.trust_domain;
    let target = open(config, true).await?;
    // After a CA rotation the record says which CA signs; a backup carries that one alone, so
    // it cannot be taken in the middle of a rotation.
    let rotated = match target.store().ca_record().await? {
        Some((record, _)) if record.stage() != crate::ca::rotation::Stage::Settled => {
            return Err(BackupError::Refused(format!(
                "a CA rotation is under way ({}): finish it (`sidewall ca rotate retire`) before a backup",
                record.stage().as_str()
            )));
        }
        Some((record, _)) => {
            let home = match &target {
                Target::Embedded(_) => {
                    crate::ca::rotation::KeyHome::Files(ca_dir(&config.data_dir))
                }
                #[cfg(feature = "etcd")]
                Target::Etcd(_) => crate::ca::rotation::KeyHome::Sealed(kek.clone()),
            };
            let material = home.open(td, &record.current)?.material().clone();
            Some(SealedCa::seal(&material, td, &kek)?)
        }
        None => None,
    };
    let ca = match (rotated, &target) {
        (Some(ca), _) => ca,
        (None, Target::Embedded(_)) => {
            let dir = ca_dir(&config.data_dir);
            if config.plug_in.is_none() && !dir.join("root.pem").exists() {
                return Err(BackupError::Refused(format!(
                    "no CA in {} (another --data-dir?)",
                    dir.display()
                )));
            }
            let material = Authority::initial_material(&dir, td, config.plug_in.as_ref())?;
            // Refuses a CA for another trust domain before anything is written.
            Authority::from_material(td, &material)?;
            SealedCa::seal(&material, td, &kek)?
        }
        #[cfg(feature = "etcd")]
        (None, Target::Etcd(store)) => {
            let sealed = store
                .sealed_ca()
                .await?
                .ok_or_else(|| BackupError::Refused("no CA in etcd yet".into()))?;
            let sealed = SealedCa::from_json(&sealed)?;
            // Only a KEK that opens it makes a backup that can be restored.
            sealed.open(td, &kek)?;
            sealed
        }
    };
    let records = target.store().records().await?;
    Ok(Backup {
        format: FORMAT.into(),
        trust_domain: td.to_string(),
        exported_at: now_unix(),
        ca,
        records,
    })
}

/// Restores a backup into the configured store, which must be new (empty).
pub async fn import(config: &Config, backup: Backup) -> Result<Restored, BackupError> {
    if backup.format != FORMAT {
        return Err(BackupError::Refused(format!(
            "not a Sidewall backup (format {:?}, expected {FORMAT:?})",
            backup.format
        )));
    }
    let td = &config.trust_domain;
    if backup.trust_domain != td.as_str() {
        return Err(BackupError::Refused(format!(
            "the backup is for trust domain {}, not {td}: pass --trust-domain {}",
            backup.trust_domain, backup.trust_domain
        )));
    }
    let kek = Kek::load(kek_path_required(config.ca_kek_file.as_ref())?)?;
    let material = backup.ca.open(td, &kek)?;
    Authority::from_material(td, &material)?;
    let versions: Vec<u64> = backup
        .records
        .policy_versions
        .iter()
        .map(|v| v.version)
        .collect();
    if versions.iter().enumerate().any(|(i, v)| *v != i as u64 + 1) {
        return Err(BackupError::Refused(format!(
            "the backup's policy versions are not 1, 2, 3, …: {versions:?}"
        )));
    }
    let target = open(config, false).await?;
    if !target.store().records().await?.is_empty() {
        return Err(BackupError::Refused(
            "the target store is not empty: import into a new store (a new data directory or etcd prefix)".into(),
        ));
    }
    match &target {
        Target::Embedded(_) => restore_ca_files(&ca_dir(&config.data_dir), &material)?,
        #[cfg(feature = "etcd")]
        Target::Etcd(store) => {
            let stored = store
                .create_sealed_ca(SealedCa::seal(&material, td, &kek)?.to_json())
                .await?;
            if SealedCa::from_json(&stored)?.root_pem != material.root_pem {
                return Err(BackupError::Refused(
                    "etcd holds another CA already (did a replica start before the import?): import into a new prefix".into(),
                ));
            }
        }
    }
    let store = target.store();
    let records = backup.records;
    for version in &records.policy_versions {
        store.put_policy_version(version.clone()).await?;
    }
    for token in &records.tokens {
        store.put_token(token.clone()).await?;
    }
    for certificate in &records.certificates {
        store.put_certificate(certificate.clone()).await?;
    }
    for revocation in &records.revocations {
        store.put_revocation(revocation.clone()).await?;
    }
    for registration in &records.registrations {
        // Two registrations cannot hold one endpoint in a store: keep the first.
        let _ = store.put_registration(registration.clone()).await?;
    }
    // The trail as it was, signatures included (the CA, hence the control plane's identity,
    // is the same); two records of one number (a damaged backup): the first stays.
    for record in &records.audit {
        let _ = store.restore_audit(record.clone()).await?;
    }
    Ok(Restored {
        policy_versions: records.policy_versions.len(),
        tokens: records.tokens.len(),
        certificates: records.certificates.len(),
        revocations: records.revocations.len(),
        registrations: records.registrations.len(),
        audit: records.audit.len(),
    })
}

/// Writes the CA into a data directory, or checks that the one there is the same.
fn restore_ca_files(dir: &Path, material: &CaMaterial) -> Result<(), BackupError> {
    let root = dir.join("root.pem");
    if root.exists() {
        let present = std::fs::read_to_string(&root).map_err(|source| CaError::Io {
            path: root.clone(),
            source,
        })?;
        if present != material.root_pem {
            return Err(BackupError::Refused(format!(
                "{} holds another CA: import into a new data directory",
                dir.display()
            )));
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| StartError::Io(dir.to_path_buf(), e))?;
    write_material(dir, material)?;
    Ok(())
}
