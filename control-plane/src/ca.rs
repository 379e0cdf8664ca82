//! The certificate authority: a root, an intermediate that signs, and X.509-SVIDs built from
//! scratch.
//!
//! On first start the control plane generates an ECDSA P-256 root (10 years) and an
//! intermediate (5 years) in `<data-dir>/ca/`, keys written 0600; later starts load them. An
//! operator may plug in their own root and intermediate instead (the root's key can then stay
//! offline). Every certificate issued here takes only a public key from its request; the
//! identity is whatever the caller authenticated, never what the request asked for.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sidewall_policies::wire::operator::Role;
use sidewall_policies::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

pub mod csr;
pub mod rotation;
pub mod sealed;

use sealed::CaMaterial;

/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a generated intermediate.
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Certificates start up to this long before "now", to tolerate clock skew between machines
/// (a tenth of the lifetime at most, so short lifetimes stay short).
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA cannot start or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing CA files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The public key from a request is not usable.
    #[error("unusable public key: {0}")]
    PublicKey(#[source] rcgen::Error),
    /// A key file is readable by others.
    #[error("{0}: private key is readable by group or others (chmod 600)")]
    KeyPermissions(PathBuf),
    /// The CA shared through the replicated store cannot be sealed or opened.
    #[error("shared CA: {0}")]
    Sealed(String),
    /// The CA's certificates do not belong together or to its keys.
    #[error("CA certificates refused: {0}")]
    Chain(String),
    /// A CA certificate does not parse.
    #[error("CA certificates refused: a CA certificate does not parse: {0}")]
    Unparsable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
}

/// Where a plugged-in CA's PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlugIn {
    /// The root certificate (its key is not needed).
    pub root_cert: PathBuf,
    /// The intermediate certificate, signed by the root.
    pub intermediate_cert: PathBuf,
    /// The intermediate's private key.
    pub intermediate_key: PathBuf,
}

/// A certificate issued by the CA.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The identity it certifies.
    pub identity: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The leaf, PEM.
    pub leaf_pem: String,
    /// Leaf then intermediate, PEM.
    pub chain_pem: String,
    /// Not valid after.
    pub not_after: SystemTime,
}

impl Issued {
    /// What the store keeps of it.
    pub fn record(
        &self,
        authenticated_by: &str,
        role: Option<Role>,
        key: &str,
        ca_root: &str,
    ) -> crate::store::CertificateRecord {
        crate::store::CertificateRecord {
            serial: self.serial.clone(),
            identity: self.identity.to_string(),
            issued_at: crate::now_unix(),
            not_after: self
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            authenticated_by: authenticated_by.to_owned(),
            role,
            key: Some(key.to_owned()),
            ca_root: Some(ca_root.to_owned()),
        }
    }
}

/// The CA: signs with the intermediate, publishes the root as the trust bundle.
pub struct Authority {
    trust_domain: TrustDomain,
    root_pem: String,
    root_der: CertificateDer<'static>,
    intermediate_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Every certificate and key, PEM (to seal it, or to cross-sign the next root).
    material: CaMaterial,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes CA material into a data directory's `ca/` files: keys 0600, certificates 0644, the
/// root last (its presence marks a complete CA).
pub fn write_material(dir: &Path, material: &CaMaterial) -> Result<(), CaError> {
    if let Some(root_key) = &material.root_key_pem {
        write_private(&dir.join("root.key"), root_key.as_bytes(), 0o600)?;
    }
    write_private(
        &dir.join("intermediate.key"),
        material.intermediate_key_pem.as_bytes(),
        0o600,
    )?;
    write_private(
        &dir.join("intermediate.pem"),
        material.intermediate_pem.as_bytes(),
        0o644,
    )?;
    write_private(&dir.join("root.pem"), material.root_pem.as_bytes(), 0o644)
}

/// Writes a file atomically with the given mode: a temporary file beside it, under a new
/// random name and created exclusively (`O_EXCL`, so neither a leftover file someone holds open
/// nor a planted link can receive the contents) with at most the final mode, then fsync and
/// rename.
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", crate::random::hex_token(8)));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()?;
            // The umask may have narrowed the mode; the file is ours alone until the rename.
            fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
        });
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(io_error(&temporary)(error));
    }
    fs::rename(&temporary, path).map_err(|error| {
        let _ = fs::remove_file(&temporary);
        io_error(path)(error)
    })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(CaError::KeyPermissions(path.to_path_buf()));
    }
    let pem = fs::read_to_string(path).map_err(io_error(path))?;
    KeyPair::from_pem(&pem).map_err(|e| CaError::Pem {
        path: path.to_path_buf(),
        message: format!("not a usable private key: {e}"),
    })
}

/// A private key file's PEM, refused when others can read it.
fn read_private_pem(path: &Path) -> Result<String, CaError> {
    read_key(path)?;
    fs::read_to_string(path).map_err(io_error(path))
}

fn read_cert(path: &Path) -> Result<(String, CertificateDer<'static>), CaError> {
    let pem = fs::read_to_string(path).map_err(io_error(path))?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Pem {
        path: path.to_path_buf(),
        message: format!("no PEM certificate: {e}"),
    })?;
    Ok((pem, der))
}

fn ca_params(
    trust_domain: &TrustDomain,
    name: &str,
    lifetime: Duration,
    path_len: Option<u8>,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sidewall");
    dn.push(
        DnType::CommonName,
        format!("Sidewall {name} CA {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = path_len.is_some();
    set_validity(&mut params, lifetime);
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE.min(lifetime / 10);
    params.not_after = now + lifetime;
}

/// A random positive, non-zero 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    crate::random::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Authority {
    /// Loads the CA from `dir` (or the plug-in files), or creates one there on first start.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &TrustDomain,
        plug_in: Option<&PlugIn>,
    ) -> Result<Self, CaError> {
        if let Some(plug_in) = plug_in {
            let (root_pem, root_der) = read_cert(&plug_in.root_cert)?;
            let (intermediate_pem, intermediate_der) = read_cert(&plug_in.intermediate_cert)?;
            let key = read_key(&plug_in.intermediate_key)?;
            return Self::from_parts(
                trust_domain,
                (root_pem, root_der, None),
                intermediate_pem,
                &intermediate_der,
                key,
            );
        }
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let root_cert = dir.join("root.pem");
        let intermediate_cert = dir.join("intermediate.pem");
        let intermediate_key = dir.join("intermediate.key");
        if !root_cert.exists() {
            Self::generate(dir, trust_domain)?;
        }
        let (root_pem, root_der) = read_cert(&root_cert)?;
        check_trust_domain(&root_cert, &root_der, trust_domain)?;
        let (intermediate_pem, intermediate_der) = read_cert(&intermediate_cert)?;
        let key = read_key(&intermediate_key)?;
        let root_key_path = dir.join("root.key");
        let root_key = if root_key_path.exists() {
            read_key(&root_key_path)?;
            Some(fs::read_to_string(&root_key_path).map_err(io_error(&root_key_path))?)
        } else {
            None
        };
        Self::from_parts(
            trust_domain,
            (root_pem, root_der, root_key),
            intermediate_pem,
            &intermediate_der,
            key,
        )
    }

    fn from_parts(
        trust_domain: &TrustDomain,
        (root_pem, root_der, root_key_pem): (String, CertificateDer<'static>, Option<String>),
        intermediate_pem: String,
        intermediate_der: &CertificateDer<'_>,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        check_chain(&root_pem, &root_der, intermediate_der, &key)?;
        let material = CaMaterial {
            root_pem: root_pem.clone(),
            root_key_pem,
            intermediate_pem: intermediate_pem.clone(),
            intermediate_key_pem: key.serialize_pem(),
        };
        let issuer = Issuer::from_ca_cert_der(intermediate_der, key)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            root_pem,
            root_der,
            intermediate_pem,
            issuer,
            material,
        })
    }

    /// Every certificate and key of this CA, PEM.
    pub fn material(&self) -> &CaMaterial {
        &self.material
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// Generates a root and an intermediate into `dir`. The root key is kept (0600) so the
    /// intermediate can be re-issued later.
    fn generate(dir: &Path, trust_domain: &TrustDomain) -> Result<(), CaError> {
        write_material(dir, &generate_material(trust_domain)?)
    }

    /// The CA from its PEM material (as shared through the replicated store).
    pub fn from_material(
        trust_domain: &TrustDomain,
        material: &CaMaterial,
    ) -> Result<Self, CaError> {
        let source = PathBuf::from("(shared CA)");
        let pem_error = |message: String| CaError::Pem {
            path: source.clone(),
            message,
        };
        let root_der = CertificateDer::from_pem_slice(material.root_pem.as_bytes())
            .map_err(|e| pem_error(format!("root: {e}")))?;
        check_trust_domain(&source, &root_der, trust_domain)?;
        let intermediate_der = CertificateDer::from_pem_slice(material.intermediate_pem.as_bytes())
            .map_err(|e| pem_error(format!("intermediate: {e}")))?;
        let key = KeyPair::from_pem(&material.intermediate_key_pem)
            .map_err(|e| pem_error(format!("intermediate key: {e}")))?;
        if let Some(root_key) = &material.root_key_pem {
            let root_key =
                KeyPair::from_pem(root_key).map_err(|e| pem_error(format!("root key: {e}")))?;
            if !same_public_key(&root_der, &root_key) {
                return Err(CaError::Chain(
                    "the root certificate is not the root key's".into(),
                ));
            }
        }
        Self::from_parts(
            trust_domain,
            (
                material.root_pem.clone(),
                root_der,
                material.root_key_pem.clone(),
            ),
            material.intermediate_pem.clone(),
            &intermediate_der,
            key,
        )
    }

    /// The material a replicated store starts from on its very first start: the plugged-in
    /// CA, else the CA already in `dir` (an embedded deployment moving to etcd), else a new one.
    pub fn initial_material(
        dir: &Path,
        trust_domain: &TrustDomain,
        plug_in: Option<&PlugIn>,
    ) -> Result<CaMaterial, CaError> {
        let read = |path: &Path| fs::read_to_string(path).map_err(io_error(path));
        if let Some(plug_in) = plug_in {
            read_key(&plug_in.intermediate_key)?;
            return Ok(CaMaterial {
                root_pem: read(&plug_in.root_cert)?,
                root_key_pem: None,
                intermediate_pem: read(&plug_in.intermediate_cert)?,
                intermediate_key_pem: read(&plug_in.intermediate_key)?,
            });
        }
        if dir.join("root.pem").exists() {
            read_key(&dir.join("intermediate.key"))?;
            let root_key = dir.join("root.key");
            return Ok(CaMaterial {
                root_pem: read(&dir.join("root.pem"))?,
                root_key_pem: if root_key.exists() {
                    read_key(&root_key)?;
                    Some(read(&root_key)?)
                } else {
                    None
                },
                intermediate_pem: read(&dir.join("intermediate.pem"))?,
                intermediate_key_pem: read(&dir.join("intermediate.key"))?,
            });
        }
        generate_material(trust_domain)
    }

    /// The trust domain this CA serves.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust bundle: the root(s), PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// SHA-256 of the root certificate, lowercase hex: what a join token pins.
    pub fn root_fingerprint(&self) -> String {
        crate::random::sha256_hex(&self.root_der)
    }

    /// Issues an X.509-SVID for `identity` to the holder of `spki` (DER SubjectPublicKeyInfo),
    /// valid for `lifetime`. Built from scratch: exactly one URI SAN, cA=false, key usage
    /// digitalSignature (critical), EKU serverAuth + clientAuth, key identifiers, a random
    /// 128-bit serial.
    pub fn issue(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        self.build(identity, spki, lifetime, &[], None)
    }

    /// Like [`Authority::issue`], for an operator: the role is the subject's
    /// organizationalUnit (as Kubernetes client certificates carry groups in the subject), so
    /// the credential itself says what it may do and the CA's signature vouches for it.
    pub fn issue_operator(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
        role: Role,
    ) -> Result<Issued, CaError> {
        self.build(identity, spki, lifetime, &[], Some(role))
    }

    /// Like [`Authority::issue`], with DNS names or IP addresses added beside the one URI SAN
    /// (the X.509-SVID spec allows other SAN types). Used only for the control plane's own
    /// serving certificate, never for workloads.
    pub fn issue_with_names(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
        names: &[String],
    ) -> Result<Issued, CaError> {
        self.build(identity, spki, lifetime, names, None)
    }

    fn build(
        &self,
        identity: &SpiffeId,
        spki: &[u8],
        lifetime: Duration,
        names: &[String],
        role: Option<Role>,
    ) -> Result<Issued, CaError> {
        let public_key = SubjectPublicKeyInfo::from_der(spki).map_err(CaError::PublicKey)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        if let Some(role) = role {
            dn.push(DnType::OrganizationalUnitName, role.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
        for name in names {
            params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(name.as_str().try_into()?),
                });
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        let serial_hex = sidewall_policies::svid::serial_hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        set_validity(&mut params, lifetime);
        let not_after: SystemTime = params.not_after.into();
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let leaf_pem = leaf.pem();
        Ok(Issued {
            identity: identity.clone(),
            serial: serial_hex,
            chain_pem: format!("{leaf_pem}{}", self.intermediate_pem),
            leaf_pem,
            not_after,
        })
    }
}

/// The role an operator certificate (DER) carries: the one organizationalUnit of its subject
/// when that names a role. `None` for a certificate issued before roles, or with no unit, an
/// unknown one or several: such a credential may only read (docs/api.md).
pub fn operator_role(der: &[u8]) -> Option<Role> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut units = cert.subject().iter_organizational_unit();
    let role = Role::parse(units.next()?.as_str().ok()?)?;
    units.next().is_none().then_some(role)
}

/// A new root and intermediate, in memory.
fn generate_material(trust_domain: &TrustDomain) -> Result<CaMaterial, CaError> {
    generate_named(trust_domain, "")
}

/// A new root and intermediate whose names end with `suffix` (a rotation's CA is named after
/// it, so that no two roots of the trust domain share a subject and paths build unambiguously).
fn generate_named(trust_domain: &TrustDomain, suffix: &str) -> Result<CaMaterial, CaError> {
    let root_key = KeyPair::generate()?;
    let root_params = ca_params(trust_domain, &format!("root{suffix}"), ROOT_LIFETIME, None)?;
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, &root_key);
    let intermediate_key = KeyPair::generate()?;
    let intermediate = ca_params(
        trust_domain,
        &format!("intermediate{suffix}"),
        INTERMEDIATE_LIFETIME,
        Some(0),
    )?
    .signed_by(&intermediate_key, &root_issuer)?;
    Ok(CaMaterial {
        root_pem: root.pem(),
        root_key_pem: Some(root_key.serialize_pem()),
        intermediate_pem: intermediate.pem(),
        intermediate_key_pem: intermediate_key.serialize_pem(),
    })
}

/// Refuses a generated root made for another trust domain (its URI SAN names it): starting an
/// existing data directory with a different `--trust-domain` would issue identities no
/// sidecar of that trust domain could verify.
/// Whether `certificate` carries `key`'s public key.
fn same_public_key(certificate: &CertificateDer<'_>, key: &KeyPair) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(certificate).is_ok_and(|(_, parsed)| {
        parsed.public_key().subject_public_key.data.as_ref() == rcgen::PublicKeyData::der_bytes(key)
    })
}

/// Checks that the CA's certificates belong together and to its key: the root is exactly one
/// certificate (its PEM is the trust bundle every sidecar receives, so one more in it would be
/// trusted mesh-wide), the intermediate carries the intermediate key's public key, and the root
/// signed it.
fn check_chain(
    root_pem: &str,
    root_der: &CertificateDer<'_>,
    intermediate_der: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<(), CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let roots = CertificateDer::pem_slice_iter(root_pem.as_bytes()).count();
    if roots != 1 {
        return Err(CaError::Chain(format!(
            "the root certificates hold {roots} certificates; a CA has exactly one root"
        )));
    }
    if !same_public_key(intermediate_der, key) {
        return Err(CaError::Chain(
            "the intermediate certificate is not the intermediate key's".into(),
        ));
    }
    let (_, root) = X509Certificate::from_der(root_der).map_err(CaError::Unparsable)?;
    let (_, intermediate) =
        X509Certificate::from_der(intermediate_der).map_err(CaError::Unparsable)?;
    intermediate
        .verify_signature(Some(root.public_key()))
        .map_err(|_| {
            CaError::Chain(
                "the intermediate certificate is not signed by the root certificate".into(),
            )
        })
}

fn check_trust_domain(
    path: &Path,
    root: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), CaError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(root) else {
        return Err(CaError::Pem {
            path: path.to_path_buf(),
            message: "root does not parse".into(),
        });
    };
    let expected = format!("spiffe://{trust_domain}");
    for extension in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && *uri != expected
                {
                    return Err(CaError::Pem {
                        path: path.to_path_buf(),
                        message: format!(
                            "this data directory's CA is for {uri}, not {expected}; use that trust domain or another data directory"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Paths of the CA files inside a data directory.
pub fn ca_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ca")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_certificate_carries_its_role_and_a_workload_one_none() {
        let td = TrustDomain::new("td.test").unwrap();
        let ca = Authority::from_material(&td, &generate_material(&td).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let der = |issued: Issued| {
            CertificateDer::from_pem_slice(issued.leaf_pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        for role in Role::ALL {
            let id = td.id("/sidewall/operator/alice").unwrap();
            let issued = ca
                .issue_operator(&id, &spki, Duration::from_secs(60), role)
                .unwrap();
            assert_eq!(operator_role(&der(issued)), Some(role));
        }
        let workload = td.id("/ns/a/svc/b").unwrap();
        let issued = ca.issue(&workload, &spki, Duration::from_secs(60)).unwrap();
        assert_eq!(operator_role(&der(issued)), None);
        assert_eq!(operator_role(b"not a certificate"), None);
    }
}
