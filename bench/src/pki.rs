//! The certificates one run needs, made fresh with rcgen (ECDSA P-256, aws-lc-rs): a root, an
//! intermediate that signs, and leaves.
//!
//! Sidewall's leaves are X.509-SVIDs exactly as its control plane issues them (one URI SAN,
//! `cA=false`, key usage `digitalSignature`, EKU serverAuth+clientAuth, 24 h) and are written
//! into a sidecar's state directory, so the sidecar starts without asking the control plane.
//! The peers get leaves from the same chain with a DNS name added (`proxy-b`), because they
//! check the server's host name the way `shared/peers/` configured them. Everyone thus
//! presents leaf + intermediate and verifies against the same root: the handshakes compared
//! carry the same chain.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// The trust domain of every identity in a run.
pub const TRUST_DOMAIN: &str = "bench.local";

/// Lifetime of the leaves (the sidecars renew at 70 %, far beyond any run).
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the root and the intermediate.
const CA_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Certificates start a minute in the past, so a clock step never makes them "not yet valid".
const BACKDATE: Duration = Duration::from_secs(60);

/// A leaf certificate and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf, PEM.
    pub leaf_pem: String,
    /// Leaf then intermediate, PEM: what the holder presents.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// A root and an intermediate that signs leaves.
pub struct Pki {
    root_pem: String,
    intermediate: CertifiedIssuer<'static, KeyPair>,
    serial: AtomicU64,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

/// The SPIFFE ID of a bench service: `spiffe://bench.local/ns/bench/svc/<name>`.
pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/bench/svc/{service}")
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sidewall bench");
    dn.push(DnType::CommonName, common);
    dn
}

fn ca(common: &str, path_len: Option<u8>) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common);
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{TRUST_DOMAIN}").try_into()?)];
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
    validity(&mut params, CA_LIFETIME);
    Ok(params)
}

impl Pki {
    /// Generates a root and an intermediate.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let mut root_params = ca("Sidewall bench root CA", None)?;
        root_params.serial_number = Some(SerialNumber::from_slice(&[1]));
        let root = CertifiedIssuer::self_signed(root_params, KeyPair::generate()?)?;
        let mut intermediate_params = ca("Sidewall bench intermediate CA", Some(0))?;
        intermediate_params.serial_number = Some(SerialNumber::from_slice(&[2]));
        let intermediate =
            CertifiedIssuer::signed_by(intermediate_params, KeyPair::generate()?, &root)?;
        Ok(Self {
            root_pem: root.pem(),
            intermediate,
            serial: AtomicU64::new(16),
        })
    }

    /// The root, PEM: the trust bundle.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn leaf(&self, sans: Vec<SanType>, common: Option<&str>) -> Result<Leaf, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = match common {
            Some(common) => name(common),
            None => {
                let mut dn = DistinguishedName::new();
                dn.push(DnType::OrganizationName, "SPIFFE");
                dn
            }
        };
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        validity(&mut params, LEAF_LIFETIME);
        let leaf = params.signed_by(&key, &self.intermediate)?;
        let leaf_pem = leaf.pem();
        Ok(Leaf {
            chain_pem: format!("{leaf_pem}{}", self.intermediate.pem()),
            leaf_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// An X.509-SVID for `spiffe://bench.local/ns/bench/svc/<service>`: exactly one URI SAN.
    pub fn svid(&self, service: &str) -> Result<Leaf, rcgen::Error> {
        let uri = SanType::URI(spiffe_id(service).try_into()?);
        self.leaf(vec![uri], None)
    }

    /// A leaf for a peer proxy: the DNS name `name` (checked by the peer on the other end), the
    /// address 127.0.0.1 and a SPIFFE ID, as `shared/peers/gen_certs.sh` made them.
    pub fn peer(&self, name: &str) -> Result<Leaf, rcgen::Error> {
        let sans = vec![
            SanType::DnsName(name.try_into()?),
            SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
            SanType::URI(spiffe_id(name).try_into()?),
        ];
        self.leaf(sans, Some(name))
    }
}

/// Writes `contents` to `path` with `mode` (created or truncated).
pub fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// Fills a sidecar state directory the way the sidecar saves it: `certificate.pem` (leaf and
/// intermediate), `key.pem` (0600) and `trust-bundle.pem` (the root).
pub fn seed_state_dir(dir: &Path, leaf: &Leaf, root_pem: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_file(&dir.join("trust-bundle.pem"), root_pem, 0o644)?;
    write_file(&dir.join("key.pem"), &leaf.key_pem, 0o600)?;
    write_file(&dir.join("certificate.pem"), &leaf.chain_pem, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidewall_policies::SpiffeId;
    use sidewall_proxy::identity::Credential;

    #[test]
    fn a_seeded_svid_is_what_the_sidecar_loads_from_its_state() {
        let pki = Pki::generate().unwrap();
        let leaf = pki.svid("a").unwrap();
        let identity = SpiffeId::parse(&spiffe_id("a")).unwrap();
        let credential = Credential::from_pem(
            &identity,
            leaf.chain_pem.clone(),
            leaf.key_pem.clone(),
            pki.root_pem().to_owned(),
        )
        .unwrap();
        assert_eq!(credential.svid.id, identity);
        assert!(credential.seconds_left() > 23 * 3600);
        assert_eq!(leaf.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[test]
    fn the_state_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let pki = Pki::generate().unwrap();
        let dir = std::env::temp_dir().join(format!("sidewall-bench-pki-{}", std::process::id()));
        seed_state_dir(&dir, &pki.svid("b").unwrap(), pki.root_pem()).unwrap();
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode & 0o777, 0o600);
    }
}
