//! The CA shared by control-plane replicas through etcd, private keys sealed.
//!
//! Every replica signs with the same intermediate, so sidecars and their peers see one chain
//! whichever replica issued a certificate, and the trust bundle never changes when a replica is
//! added. The intermediate's (and a generated root's) private key is stored in etcd only
//! encrypted with AES-256-GCM under a key-encryption key (KEK): 32 random bytes each replica is
//! given in a file (`--ca-kek-file`, mode 0600, e.g. a Kubernetes Secret), never stored in
//! etcd. The additional authenticated data binds each sealed key to the trust domain, its role
//! and the SHA-256 of both certificates, so neither a sealed key nor a certificate can be
//! swapped or added to (a root appended to the bundle would be trusted by every sidecar), and
//! opening also checks that the certificates are the keys' own and the root signed the
//! intermediate. Whoever reads etcd without the KEK learns the certificates only; whoever has
//! the KEK and read access to etcd can sign.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use serde::{Deserialize, Serialize};
use sidewall_policies::TrustDomain;

use super::CaError;

/// The CA's certificates and keys, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// The root certificate.
    pub root_pem: String,
    /// The root's key, when the CA was generated here (a plugged-in root's key stays offline).
    pub root_key_pem: Option<String>,
    /// The intermediate certificate.
    pub intermediate_pem: String,
    /// The intermediate's key, which signs every certificate.
    pub intermediate_key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaMaterial")
    }
}

/// The key-encryption key.
pub struct Kek(RandomizedNonceKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek")
    }
}

fn kek_error(path: &Path, message: &str) -> CaError {
    CaError::Pem {
        path: path.to_path_buf(),
        message: message.to_owned(),
    }
}

impl Kek {
    /// Reads a KEK file: 64 hex digits (`openssl rand -hex 32`), not readable by others.
    pub fn load(path: &Path) -> Result<Self, CaError> {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Group read is allowed, unlike for the CA's key files: a Kubernetes Secret volume
        // can give a non-root process its file only through the pod's own group (fsGroup).
        if metadata.permissions().mode() & 0o027 != 0 {
            return Err(CaError::Sealed(format!(
                "{}: the key-encryption key is writable by group or readable by others (chmod 600)",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bytes = crate::random::unhex(text.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
            kek_error(
                path,
                "a key-encryption key is 32 random bytes as 64 hex digits (openssl rand -hex 32)",
            )
        })?;
        Self::from_bytes(&bytes).ok_or_else(|| kek_error(path, "unusable key-encryption key"))
    }

    /// A KEK from 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        RandomizedNonceKey::new(&AES_256_GCM, bytes).ok().map(Self)
    }

    fn seal(&self, aad: &str, plaintext: &str) -> Result<String, CaError> {
        let mut in_out = plaintext.as_bytes().to_vec();
        let nonce = self
            .0
            .seal_in_place_append_tag(Aad::from(aad.as_bytes()), &mut in_out)
            .map_err(|_| CaError::Sealed("sealing failed".into()))?;
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&in_out);
        Ok(crate::random::hex(&out))
    }

    fn open(&self, aad: &str, sealed: &str) -> Result<String, CaError> {
        let wrong = || {
            CaError::Sealed(
                "the key-encryption key does not open the CA: it was sealed with another --ca-kek-file, or its certificates were changed after it was sealed".into(),
            )
        };
        let bytes = crate::random::unhex(sealed).ok_or_else(wrong)?;
        let (nonce, rest) = bytes.split_at_checked(NONCE_LEN).ok_or_else(wrong)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut in_out = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut in_out)
            .map_err(|_| wrong())?;
        String::from_utf8(plain.to_vec()).map_err(|_| wrong())
    }
}

/// The format [`SealedCa::seal`] writes. In format 2 the additional authenticated data of each
/// sealed key also binds the SHA-256 of both certificates, so a certificate changed where the
/// sealed CA is stored (etcd, a backup file) makes it fail to open. Format 1 bound only the trust
/// domain and the role; it is still opened when every certificate is bound to a sealed key (a
/// generated root: its key must match it), and refused with a plugged-in root.
pub const FORMAT: u32 = 2;

/// The CA as stored in etcd: certificates in clear, keys sealed (hex of nonce ‖ ciphertext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedCa {
    /// Format version, [`FORMAT`] (1 from older releases).
    pub format: u32,
    /// The trust domain the CA serves.
    pub trust_domain: String,
    /// The root certificate, PEM.
    pub root_pem: String,
    /// The intermediate certificate, PEM.
    pub intermediate_pem: String,
    /// The sealed root key, if there is one.
    pub root_key: Option<String>,
    /// The sealed intermediate key.
    pub intermediate_key: String,
}

/// What a sealed key of `role` is bound to in `format`.
fn binding(
    format: u32,
    role: &str,
    trust_domain: &str,
    root_pem: &str,
    intermediate_pem: &str,
) -> String {
    match format {
        1 => format!("sidewall-ca {role} {trust_domain}"),
        _ => format!(
            "sidewall-ca/2 {role} {trust_domain} root-sha256={} intermediate-sha256={}",
            crate::random::sha256_hex(root_pem.as_bytes()),
            crate::random::sha256_hex(intermediate_pem.as_bytes())
        ),
    }
}

impl SealedCa {
    /// Seals `material` for `trust_domain` with `kek`, binding its certificates.
    pub fn seal(
        material: &CaMaterial,
        trust_domain: &TrustDomain,
        kek: &Kek,
    ) -> Result<Self, CaError> {
        let bound = |role: &str| {
            binding(
                FORMAT,
                role,
                trust_domain.as_str(),
                &material.root_pem,
                &material.intermediate_pem,
            )
        };
        Ok(Self {
            format: FORMAT,
            trust_domain: trust_domain.to_string(),
            root_pem: material.root_pem.clone(),
            intermediate_pem: material.intermediate_pem.clone(),
            root_key: match &material.root_key_pem {
                Some(pem) => Some(kek.seal(&bound("root"), pem)?),
                None => None,
            },
            intermediate_key: kek.seal(&bound("intermediate"), &material.intermediate_key_pem)?,
        })
    }

    /// Opens the keys, and checks that the certificates are the ones sealed with them and
    /// belong together ([`super::Authority::from_material`]); refuses a CA for another trust
    /// domain, another KEK, or changed certificates.
    pub fn open(&self, trust_domain: &TrustDomain, kek: &Kek) -> Result<CaMaterial, CaError> {
        if self.trust_domain != trust_domain.as_str() {
            return Err(CaError::Sealed(format!(
                "the CA stored in etcd is for trust domain {}, not {trust_domain}",
                self.trust_domain
            )));
        }
        match self.format {
            FORMAT => {}
            // Its certificates are authenticated only through the keys that match them.
            1 if self.root_key.is_some() => {}
            1 => {
                return Err(CaError::Sealed(
                    "the CA was sealed by an older release (format 1) with a plugged-in root, whose certificates that format does not authenticate: seal it again from the plug-in files (a new etcd prefix and a replica started with the plug-in settings)".into(),
                ));
            }
            other => {
                return Err(CaError::Sealed(format!(
                    "sealed CA format {other} is unknown to this release (it knows 1 and {FORMAT})"
                )));
            }
        }
        let bound = |role: &str| {
            binding(
                self.format,
                role,
                trust_domain.as_str(),
                &self.root_pem,
                &self.intermediate_pem,
            )
        };
        let material = CaMaterial {
            root_pem: self.root_pem.clone(),
            root_key_pem: match &self.root_key {
                Some(sealed) => Some(kek.open(&bound("root"), sealed)?),
                None => None,
            },
            intermediate_pem: self.intermediate_pem.clone(),
            intermediate_key_pem: kek.open(&bound("intermediate"), &self.intermediate_key)?,
        };
        super::Authority::from_material(trust_domain, &material)?;
        Ok(material)
    }

    /// Parses the stored JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, CaError> {
        serde_json::from_slice(bytes)
            .map_err(|e| CaError::Sealed(format!("the CA stored in etcd does not parse: {e}")))
    }

    /// The stored JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The KEK file given to a replica, as configured.
pub fn kek_path_required(path: Option<&PathBuf>) -> Result<&PathBuf, CaError> {
    path.ok_or_else(|| {
        CaError::Sealed(
            "the etcd store needs --ca-kek-file (caKekFile): the CA's keys are stored in etcd sealed with it; create one with `openssl rand -hex 32 > ca.kek && chmod 600 ca.kek` and give every replica the same file".into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(td: &TrustDomain) -> CaMaterial {
        super::super::generate_material(td).unwrap()
    }

    #[test]
    fn sealed_keys_open_only_with_the_same_kek_and_trust_domain() {
        let td = TrustDomain::new("example.org").unwrap();
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let material = material(&td);
        let sealed = SealedCa::seal(&material, &td, &kek).unwrap();
        let json = String::from_utf8(sealed.to_json()).unwrap();
        let secret = |pem: &str| pem.lines().nth(1).unwrap().to_owned();
        assert!(!json.contains(&secret(&material.intermediate_key_pem)));
        assert!(!json.contains(&secret(material.root_key_pem.as_deref().unwrap())));
        let back = SealedCa::from_json(json.as_bytes()).unwrap();
        assert!(back.open(&td, &kek).unwrap() == material);

        let other = Kek::from_bytes(&[8u8; 32]).unwrap();
        let error = back.open(&td, &other).unwrap_err().to_string();
        assert!(error.contains("does not open the CA"), "{error}");
        let error = back
            .open(&TrustDomain::new("other.org").unwrap(), &kek)
            .unwrap_err()
            .to_string();
        assert!(error.contains("for trust domain example.org"), "{error}");
        // A sealed key moved into another role does not open.
        let mut swapped = back.clone();
        swapped.intermediate_key = back.root_key.clone().unwrap();
        assert!(swapped.open(&td, &kek).is_err());
    }

    #[test]
    fn changed_certificates_do_not_open() {
        let td = TrustDomain::new("example.org").unwrap();
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let sealed = SealedCa::seal(&material(&td), &td, &kek).unwrap();
        let foreign = material(&td);
        type Change<'a> = Box<dyn Fn(&mut SealedCa) + 'a>;
        let changes: [(&str, Change); 3] = [
            (
                "a root appended",
                Box::new(|s| s.root_pem.push_str(&foreign.root_pem)),
            ),
            (
                "another root",
                Box::new(|s| s.root_pem = foreign.root_pem.clone()),
            ),
            (
                "another intermediate",
                Box::new(|s| s.intermediate_pem = foreign.intermediate_pem.clone()),
            ),
        ];
        for (what, change) in &changes {
            let mut changed = sealed.clone();
            change(&mut changed);
            let error = changed.open(&td, &kek).unwrap_err().to_string();
            assert!(
                error.contains("certificates were changed"),
                "{what}: {error}"
            );
        }
    }

    /// Format 1 sealed only the keys; its certificates are accepted only when they are the
    /// keys' own (a generated root), and never with a root appended.
    #[test]
    fn format_1_is_opened_only_when_its_keys_vouch_for_its_certificates() {
        let td = TrustDomain::new("example.org").unwrap();
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let m = material(&td);
        let legacy = |m: &CaMaterial| SealedCa {
            format: 1,
            trust_domain: td.to_string(),
            root_pem: m.root_pem.clone(),
            intermediate_pem: m.intermediate_pem.clone(),
            root_key: m.root_key_pem.as_ref().map(|pem| {
                kek.seal(&binding(1, "root", td.as_str(), "", ""), pem)
                    .unwrap()
            }),
            intermediate_key: kek
                .seal(
                    &binding(1, "intermediate", td.as_str(), "", ""),
                    &m.intermediate_key_pem,
                )
                .unwrap(),
        };
        assert!(legacy(&m).open(&td, &kek).unwrap() == m);

        let mut appended = legacy(&m);
        appended.root_pem.push_str(&material(&td).root_pem);
        let error = appended.open(&td, &kek).unwrap_err().to_string();
        assert!(error.contains("exactly one root"), "{error}");

        let mut other_root = legacy(&m);
        other_root.root_pem = material(&td).root_pem;
        let error = other_root.open(&td, &kek).unwrap_err().to_string();
        assert!(error.contains("certificates refused"), "{error}");

        let plugged_in = legacy(&CaMaterial {
            root_key_pem: None,
            ..m.clone()
        });
        let error = plugged_in.open(&td, &kek).unwrap_err().to_string();
        assert!(error.contains("format 1"), "{error}");

        let mut future = SealedCa::seal(&m, &td, &kek).unwrap();
        future.format = 3;
        let error = future.open(&td, &kek).unwrap_err().to_string();
        assert!(error.contains("format 3 is unknown"), "{error}");
    }

    #[test]
    fn kek_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.kek");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Kek::load(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Kek::load(&path).is_ok());
        std::fs::write(&path, "too short").unwrap();
        let error = Kek::load(&path).unwrap_err().to_string();
        assert!(error.contains("64 hex digits"), "{error}");
    }
}
