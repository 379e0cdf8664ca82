//! Certificate signing requests: the only thing a workload sends to get a certificate.
//!
//! A CSR is used for exactly one thing: its public key, after its signature proves the
//! sender holds the private key. Its subject, SANs, basic constraints, key usages and any
//! other requested extension are ignored, never copied.

use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Largest CSR accepted, PEM text, in bytes.
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR is refused. Each has a stable code for the API and the refusal metric.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CsrError {
    /// Over [`MAX_CSR_BYTES`].
    #[error("CSR is {0} bytes, over the 65536-byte limit")]
    TooLarge(usize),
    /// No PEM `CERTIFICATE REQUEST` block.
    #[error("no PEM CERTIFICATE REQUEST block found")]
    NotPem,
    /// More than one PEM block of a CSR.
    #[error("{0} CSRs in one request; send exactly one")]
    Several(usize),
    /// The DER does not parse as a PKCS#10 request (the parser's error).
    #[error("CSR does not parse: {0}")]
    Malformed(#[source] X509Error),
    /// Bytes after the DER structure.
    #[error("{0} bytes after the CSR")]
    TrailingBytes(usize),
    /// The self-signature does not verify: the sender may not hold the key.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// An RSA key below [`MIN_RSA_BITS`].
    #[error("RSA key of {0} bits is too small (at least 2048)")]
    WeakRsa(usize),
    /// A key type or curve Sidewall does not issue for.
    #[error("unsupported key type {0} (supported: ECDSA P-256, P-384, Ed25519, RSA >= 2048)")]
    UnsupportedKey(String),
}

impl CsrError {
    /// Stable code used in API errors and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            CsrError::TooLarge(_) => "csr_too_large",
            CsrError::NotPem => "csr_not_pem",
            CsrError::Several(_) => "csr_several",
            CsrError::Malformed(_) => "csr_malformed",
            CsrError::TrailingBytes(_) => "csr_trailing_bytes",
            CsrError::BadSignature => "csr_bad_signature",
            CsrError::WeakRsa(_) => "csr_weak_key",
            CsrError::UnsupportedKey(_) => "csr_unsupported_key",
        }
    }
}

/// The public key of a verified CSR, as DER SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedKey {
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// Human name of the key type (`ECDSA P-256`, ...), for logs.
    pub kind: &'static str,
}

/// Parses a PEM CSR, verifies its signature and returns only its public key.
pub fn parse(pem: &str) -> Result<RequestedKey, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let blocks: Vec<_> = CertificateSigningRequestDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    match blocks.as_slice() {
        [] => Err(CsrError::NotPem),
        [one] => parse_der(one.as_ref()),
        several => Err(CsrError::Several(several.len())),
    }
}

/// Parses a DER CSR, verifies its signature and returns only its public key.
pub fn parse_der(der: &[u8]) -> Result<RequestedKey, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.into()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingBytes(rest.len()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    let kind = if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256",
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384",
            Some(c) => return Err(CsrError::UnsupportedKey(format!("EC curve {c}"))),
            None => return Err(CsrError::UnsupportedKey("EC without a named curve".into())),
        }
    } else if *algorithm == OID_SIG_ED25519 {
        "Ed25519"
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            Ok(_) => return Err(CsrError::Malformed(X509Error::InvalidSPKI)),
            Err(error) => return Err(CsrError::Malformed(error)),
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakRsa(bits));
        }
        "RSA"
    } else {
        return Err(CsrError::UnsupportedKey(algorithm.to_id_string()));
    };
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(RequestedKey {
        spki: spki.raw.to_vec(),
        kind,
    })
}
