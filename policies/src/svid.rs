//! X.509-SVIDs: the SPIFFE rules for workload certificates, and rustls verifiers that enforce
//! them on top of ordinary chain validation.
//!
//! rustls' stock verifiers accept certificates the SPIFFE X.509-SVID spec forbids (two URI
//! SANs, no URI SAN, `keyCertSign` on a leaf) and check DNS names SPIFFE does not use. The
//! verifiers here parse the leaf first and refuse anything that is not a valid SVID, pick the
//! roots of the **leaf's own trust domain** only, and then let webpki validate the chain.
//! Pure computation: no I/O. Compiled with the `x509` feature.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{IdentityError, SpiffeId, TrustDomain};

/// Why a certificate is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// Not a DER certificate (or bytes after it).
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    /// No URI SAN at all.
    #[error("certificate has no URI SAN (an SVID has exactly one)")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("certificate has {0} URI SANs (an SVID has exactly one)")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffe(IdentityError),
    /// `cA=true` on a leaf.
    #[error("leaf certificate is a CA (basicConstraints cA=true)")]
    CaLeaf,
    /// `keyCertSign` on a leaf.
    #[error("leaf certificate has keyCertSign")]
    KeyCertSign,
    /// `cRLSign` on a leaf.
    #[error("leaf certificate has cRLSign")]
    CrlSign,
    /// No key usage extension, or one without `digitalSignature`.
    #[error("leaf certificate lacks key usage digitalSignature")]
    NoDigitalSignature,
    /// The extended key usage does not allow this use (clientAuth or serverAuth).
    #[error("certificate's extended key usage does not include {0}")]
    WrongUsage(&'static str),
    /// No roots are known for the ID's trust domain.
    #[error("no trust bundle for trust domain {0}")]
    UnknownTrustDomain(String),
    /// The identity is not the one this connection expects.
    #[error("peer is {actual}, expected {expected}")]
    UnexpectedIdentity {
        /// What the peer presented.
        actual: String,
        /// What was required.
        expected: String,
    },
    /// The identity is not allowed here (reserved path, revoked, or otherwise refused).
    #[error("identity {0} is not accepted here: {1}")]
    Refused(String, &'static str),
}

impl SvidError {
    /// A short, stable label for metrics (`handshake failures by reason`).
    pub fn label(&self) -> &'static str {
        match self {
            SvidError::Malformed(_) => "malformed_certificate",
            SvidError::NoUriSan => "no_uri_san",
            SvidError::MultipleUriSans(_) => "multiple_uri_sans",
            SvidError::NotSpiffe(_) => "not_spiffe",
            SvidError::CaLeaf => "ca_leaf",
            SvidError::KeyCertSign => "key_cert_sign_leaf",
            SvidError::CrlSign => "crl_sign_leaf",
            SvidError::NoDigitalSignature => "no_digital_signature",
            SvidError::WrongUsage(_) => "wrong_extended_key_usage",
            SvidError::UnknownTrustDomain(_) => "unknown_trust_domain",
            SvidError::UnexpectedIdentity { .. } => "unexpected_identity",
            SvidError::Refused(_, reason) => reason,
        }
    }
}

impl From<SvidError> for rustls::Error {
    fn from(error: SvidError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    }
}

/// Finds the [`SvidError`] inside a rustls error, if that is what it carries.
pub fn svid_error(error: &rustls::Error) -> Option<&SvidError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// A short, stable label for why a TLS handshake failed, for metrics and logs: the SVID rule
/// that was broken, or the kind of TLS failure.
pub fn failure_label(error: &rustls::Error) -> &'static str {
    if let Some(svid) = svid_error(error) {
        return svid.label();
    }
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "certificate_expired",
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "certificate_not_yet_valid",
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        rustls::Error::InvalidCertificate(_) => "invalid_certificate",
        rustls::Error::InvalidMessage(_) => "not_tls",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::AlertReceived(_) => "peer_alert",
        rustls::Error::NoApplicationProtocol => "no_application_protocol",
        _ => "tls_error",
    }
}

/// [`failure_label`] for the `std::io::Error` tokio-rustls returns (`io` when it is not TLS).
pub fn io_failure_label(error: &std::io::Error) -> &'static str {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .map_or("io", failure_label)
}

/// How a certificate will be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A client certificate (EKU clientAuth required).
    Client,
    /// A server certificate (EKU serverAuth required).
    Server,
}

/// The facts Sidewall uses from a valid X.509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID from the one URI SAN.
    pub id: SpiffeId,
    /// The serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    /// Not valid before, Unix seconds.
    pub not_before: i64,
    /// Not valid after, Unix seconds.
    pub not_after: i64,
}

impl Svid {
    /// Whether it has expired at `now` (Unix seconds): valid up to, not including, `not_after`.
    pub fn expired(&self, now: i64) -> bool {
        self.not_after <= now
    }

    /// How long it stays valid after `now` (Unix seconds); zero once expired.
    pub fn remaining(&self, now: i64) -> std::time::Duration {
        std::time::Duration::from_secs(u64::try_from(self.not_after - now).unwrap_or(0))
    }

    /// Parses a leaf certificate and checks the X.509-SVID rules for `usage`.
    pub fn from_der(der: &[u8], usage: Usage) -> Result<Self, SvidError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(SvidError::Malformed(format!(
                "{} bytes after the certificate",
                rest.len()
            )));
        }
        let mut uris = Vec::new();
        let mut digital_signature = false;
        let mut extended: Option<(bool, bool)> = None;
        for extension in cert.extensions() {
            match extension.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::URI(uri) = name {
                            uris.push(*uri);
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(SvidError::CaLeaf),
                ParsedExtension::KeyUsage(ku) => {
                    if ku.key_cert_sign() {
                        return Err(SvidError::KeyCertSign);
                    }
                    if ku.crl_sign() {
                        return Err(SvidError::CrlSign);
                    }
                    digital_signature = ku.digital_signature();
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    extended = Some((eku.client_auth || eku.any, eku.server_auth || eku.any));
                }
                _ => {}
            }
        }
        let uri = match uris.as_slice() {
            [] => return Err(SvidError::NoUriSan),
            [one] => *one,
            many => return Err(SvidError::MultipleUriSans(many.len())),
        };
        let id = SpiffeId::parse(uri).map_err(SvidError::NotSpiffe)?;
        if !digital_signature {
            return Err(SvidError::NoDigitalSignature);
        }
        let (client, server) = extended.unwrap_or((false, false));
        match usage {
            Usage::Client if !client => return Err(SvidError::WrongUsage("clientAuth")),
            Usage::Server if !server => return Err(SvidError::WrongUsage("serverAuth")),
            _ => {}
        }
        let (not_before, not_after) = (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        );
        // Never valid at any time: refused whatever the clock says (found by fuzzing).
        if not_after < not_before {
            return Err(SvidError::Malformed(
                "the validity ends before it starts".into(),
            ));
        }
        Ok(Svid {
            id,
            serial: serial_hex(cert.raw_serial()),
            not_before,
            not_after,
        })
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: between 60 % and 75 %
/// of its lifetime, at a point fixed by its serial. Sidecars whose certificates were issued
/// together (a fleet started at once, a control plane back after an outage) then renew spread
/// over a sixth of the lifetime, not all at once; and a restarted sidecar keeps its point.
/// The control plane renews its own serving certificate the same way.
pub fn renewal_point(not_before: i64, not_after: i64, serial: &str) -> i64 {
    let lifetime = (not_after - not_before).max(0);
    // FNV-1a of the serial (random, chosen by the CA): spread, not secrecy.
    let hash = serial
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    let permille = 600 + i64::try_from(hash % 151).unwrap_or(0);
    not_before + lifetime.saturating_mul(permille) / 1000
}

/// Lowercase hex of a serial number's bytes, without leading zero bytes.
pub fn serial_hex(bytes: &[u8]) -> String {
    let trimmed: &[u8] = match bytes.iter().position(|&b| b != 0) {
        Some(first) => &bytes[first..],
        None => &[0],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decides whether a valid SVID's identity is accepted (e.g. not revoked, not reserved).
pub type Acceptor = Arc<dyn Fn(&Svid) -> Result<(), SvidError> + Send + Sync>;

/// Root certificates per trust domain.
#[derive(Clone, Default)]
pub struct TrustBundles {
    roots: BTreeMap<TrustDomain, Arc<RootCertStore>>,
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.roots.keys()).finish()
    }
}

impl TrustBundles {
    /// Adds (or extends) a trust domain's roots. Returns how many certificates were added.
    pub fn add(
        &mut self,
        trust_domain: TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<usize, rustls::Error> {
        let mut store = self
            .roots
            .get(&trust_domain)
            .map(|s| (**s).clone())
            .unwrap_or_else(RootCertStore::empty);
        let mut added = 0;
        for root in roots {
            store.add(root)?;
            added += 1;
        }
        self.roots.insert(trust_domain, Arc::new(store));
        Ok(added)
    }

    /// The roots of a trust domain.
    pub fn roots(&self, trust_domain: &str) -> Option<&Arc<RootCertStore>> {
        self.roots
            .iter()
            .find(|(td, _)| td.as_str() == trust_domain)
            .map(|(_, roots)| roots)
    }

    /// Whether no trust domain has roots.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// A client-certificate verifier for mTLS servers: the client's certificate must be a valid
/// X.509-SVID, chain to a root of its own trust domain, and be accepted by the acceptor.
pub struct SpiffeClientVerifier {
    per_domain: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
    acceptor: Acceptor,
    mandatory: bool,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domains", &self.per_domain.keys())
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl SpiffeClientVerifier {
    /// Builds a verifier. With `mandatory` false, clients without a certificate are let
    /// through the handshake (the control plane's first contact uses a join token instead).
    pub fn new(
        bundles: &TrustBundles,
        provider: Arc<CryptoProvider>,
        acceptor: Acceptor,
        mandatory: bool,
    ) -> Result<Self, rustls::Error> {
        let mut per_domain = BTreeMap::new();
        for (td, roots) in &bundles.roots {
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            if !mandatory {
                builder = builder.allow_unauthenticated();
            }
            let verifier = builder
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            per_domain.insert(td.as_str().to_owned(), verifier);
        }
        Ok(Self {
            per_domain,
            algorithms: provider.signature_verification_algorithms,
            acceptor,
            mandatory,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let svid = Svid::from_der(end_entity, Usage::Client)?;
        let td = svid.id.trust_domain_name();
        let inner = self
            .per_domain
            .get(td)
            .ok_or_else(|| SvidError::UnknownTrustDomain(td.to_owned()))?;
        inner.verify_client_cert(end_entity, intermediates, now)?;
        (self.acceptor)(&svid)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server-certificate verifier for mTLS clients: the server must present a valid X.509-SVID
/// for exactly the expected SPIFFE ID, chained to a root of that ID's trust domain. DNS names
/// play no part (the server name passed by the caller is ignored).
pub struct SpiffeServerVerifier {
    expected: SpiffeId,
    bundles: TrustBundles,
    algorithms: WebPkiSupportedAlgorithms,
    acceptor: Option<Acceptor>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl SpiffeServerVerifier {
    /// Builds a verifier that accepts only `expected`.
    pub fn new(
        expected: SpiffeId,
        bundles: TrustBundles,
        provider: &CryptoProvider,
        acceptor: Option<Acceptor>,
    ) -> Self {
        Self {
            expected,
            bundles,
            algorithms: provider.signature_verification_algorithms,
            acceptor,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let svid = Svid::from_der(end_entity, Usage::Server)?;
        if svid.id != self.expected {
            return Err(SvidError::UnexpectedIdentity {
                actual: svid.id.to_string(),
                expected: self.expected.to_string(),
            }
            .into());
        }
        let td = svid.id.trust_domain_name();
        let roots = self
            .bundles
            .roots(td)
            .ok_or_else(|| SvidError::UnknownTrustDomain(td.to_owned()))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if let Some(acceptor) = &self.acceptor {
            acceptor(&svid)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The identity of the peer of an established TLS connection, from its leaf certificate.
pub fn peer_svid(certificates: Option<&[CertificateDer<'_>]>, usage: Usage) -> Option<Svid> {
    let leaf = certificates?.first()?;
    Svid::from_der(leaf, usage).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_time_left_are_read_at_the_instant_given() {
        let svid = Svid {
            id: SpiffeId::parse("spiffe://td/a").unwrap_or_else(|e| panic!("{e}")),
            serial: "1".into(),
            not_before: 100,
            not_after: 200,
        };
        for (now, expired, left) in [
            (150, false, 50),
            (199, false, 1),
            (200, true, 0),
            (999, true, 0),
        ] {
            assert_eq!(svid.expired(now), expired, "at {now}");
            assert_eq!(svid.remaining(now).as_secs(), left, "at {now}");
        }
    }
}
