//! The control plane's TLS: its own short-lived certificate for
//! `spiffe://<td>/sidewall/control-plane`, swapped in place when renewed, and the server
//! configuration that asks for (but does not require) a client SVID.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::{SpiffeClientVerifier, TrustBundles};

use crate::ca::rotation::CaSet;
use crate::ca::{CaError, Issued};

/// The path of the control plane's identity.
pub const CONTROL_PLANE_PATH: &str = "/sidewall/control-plane";

/// The crypto provider used everywhere (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// Issuing the serving certificate failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A PEM input is unusable.
    #[error("tls: {0}")]
    Pem(String),
}

/// Builds a rustls certified key from a chain and a fresh key pair.
pub fn certified_key(chain_pem: &str, key: &KeyPair) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let signing = provider().key_provider.load_private_key(key_der)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The serving certificate, replaceable while connections use the old one.
#[derive(Debug)]
pub struct ServingCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCertificate {
    /// Issues a fresh certificate (new key) for the control plane's identity.
    pub fn issue(
        ca: &CaSet,
        lifetime: Duration,
        names: &[String],
    ) -> Result<(Arc<CertifiedKey>, Issued), TlsError> {
        let id: SpiffeId = ca
            .trust_domain()
            .id(CONTROL_PLANE_PATH)
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let key = KeyPair::generate().map_err(CaError::from)?;
        let issued = ca.issue_serving(&id, &key.subject_public_key_info(), lifetime, names)?;
        Ok((certified_key(&issued.chain_pem, &key)?, issued))
    }

    /// Starts with a freshly issued certificate.
    pub fn new(
        ca: &CaSet,
        lifetime: Duration,
        names: &[String],
    ) -> Result<(Self, Issued), TlsError> {
        let (key, issued) = Self::issue(ca, lifetime, names)?;
        Ok((
            Self {
                current: RwLock::new(key),
            },
            issued,
        ))
    }

    /// The certificate and key in use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the certificate; handshakes from now on use the new one.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value is
        // still a whole Arc, so keep using it.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The API's server configuration: TLS 1.3 and 1.2, ALPN h2 and http/1.1, a client SVID
/// optional (first contact authenticates with a join token instead) but verified strictly when
/// presented, against the roots `verifier` holds now.
pub fn server_config(
    verifier: Arc<ClientRoots>,
    certificate: Arc<ServingCertificate>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client-certificate verifier of the API, over the roots of the CA set in force: a CA
/// rotation replaces them and the next handshake uses the new ones.
#[derive(Debug)]
pub struct ClientRoots(RwLock<Arc<SpiffeClientVerifier>>);

fn client_verifier(ca: &CaSet) -> Result<Arc<SpiffeClientVerifier>, TlsError> {
    let mut bundles = TrustBundles::default();
    bundles.add(ca.trust_domain().clone(), ca.roots_der())?;
    Ok(Arc::new(SpiffeClientVerifier::new(
        &bundles,
        provider(),
        Arc::new(|_| Ok(())),
        false,
    )?))
}

impl ClientRoots {
    /// Verifies against `ca`'s roots.
    pub fn new(ca: &CaSet) -> Result<Self, TlsError> {
        Ok(Self(RwLock::new(client_verifier(ca)?)))
    }

    /// Verifies against `ca`'s roots from the next handshake on.
    pub fn set(&self, ca: &CaSet) -> Result<(), TlsError> {
        let verifier = client_verifier(ca)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = verifier;
        Ok(())
    }

    fn current(&self) -> Arc<SpiffeClientVerifier> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::server::danger::ClientCertVerifier for ClientRoots {
    fn offer_client_auth(&self) -> bool {
        self.current().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}
