//! rustls configurations built from the current credential and snapshot.
//!
//! Inbound: TLS 1.3 (1.2 only if configured), a client SVID required and verified strictly
//! (exactly one URI SAN, no CA bits on the leaf, EKU clientAuth, chained to a root of the
//! peer's own trust domain, not reserved, not revoked). Outbound: the server must present
//! exactly the SPIFFE ID expected for the service. Both are rebuilt whenever the certificate
//! or the snapshot changes; connections keep the configuration they started with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};
use sidewall_policies::SpiffeId;
use sidewall_policies::snapshot::Revocations;
use sidewall_policies::svid::{
    Acceptor, SpiffeClientVerifier, SpiffeServerVerifier, SvidError, TrustBundles,
};

use crate::identity::Credential;

/// ALPN of the sidecar-to-sidecar L4 protocol (port header, then raw bytes).
pub const ALPN_L4: &[u8] = b"sidewall-l4/1";
/// ALPN of HTTP between sidecars: the same port header and status byte, then HTTP/2 (so the
/// connection-level check still runs before any HTTP is parsed), one long-lived connection
/// carrying many requests.
pub const ALPN_H2: &[u8] = b"sidewall-h2/1";
/// ALPN of carried TCP connections: HTTP/2 right after the handshake (no port header), each
/// app connection one `CONNECT sidewall:<port>` stream, authorized on its own.
pub const ALPN_MUX: &[u8] = b"sidewall-mux/1";
/// ALPN of a segmentation probe: the port header, answered with the status byte the
/// connection would get, then closed; nothing reaches the app (`crate::probe`).
pub const ALPN_PROBE: &[u8] = b"sidewall-probe/1";

/// The crypto provider used everywhere (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&TLS13];
static TLS13_AND_12: [&SupportedProtocolVersion; 2] = [&TLS13, &TLS12];

fn versions(tls12: bool) -> &'static [&'static SupportedProtocolVersion] {
    if tls12 { &TLS13_AND_12 } else { &TLS13_ONLY }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct ClientCertificate(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Refuses reserved identities (the control plane and operators are not workloads) and
/// revoked identities or serials.
fn acceptor(revocations: Revocations) -> Acceptor {
    Arc::new(move |svid| {
        if svid.id.is_reserved() {
            return Err(SvidError::Refused(svid.id.to_string(), "reserved_identity"));
        }
        if revocations.is_revoked(&svid.id, &svid.serial) {
            return Err(SvidError::Refused(svid.id.to_string(), "revoked"));
        }
        Ok(())
    })
}

/// The TLS configurations for one (credential, snapshot) pair.
pub struct TlsSet {
    /// The inbound server configuration.
    pub server: Arc<ServerConfig>,
    credential: Arc<Credential>,
    bundles: TrustBundles,
    revocations: Revocations,
    tls12: bool,
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    clients_h2: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    clients_mux: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

/// The snapshot's roots per trust domain (several during a CA rotation, and other trust
/// domains when federated); the credential's own roots only for its trust domain when the
/// snapshot has none for it. The snapshot is the newer word: when a rotation retires a root it
/// leaves the snapshot's bundle, and must stop being trusted although the certificate was
/// issued with a bundle that held it.
fn merge_bundles(
    credential: &Credential,
    snapshot: &std::collections::BTreeMap<sidewall_policies::TrustDomain, Vec<String>>,
) -> TrustBundles {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let own = credential.svid.id.trust_domain();
    let has_own = snapshot.get(&own).is_some_and(|pems| {
        pems.iter()
            .any(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).any(|c| c.is_ok()))
    });
    let mut bundles = if has_own {
        TrustBundles::default()
    } else {
        credential.bundles.clone()
    };
    for (td, pems) in snapshot {
        let roots: Vec<CertificateDer<'static>> = pems
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok))
            .collect();
        if let Err(error) = bundles.add(td.clone(), roots) {
            tracing::warn!(trust_domain = %td, %error, "trust bundle from the snapshot ignored");
        }
    }
    bundles
}

impl std::fmt::Debug for TlsSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSet")
            .field("credential", &self.credential)
            .finish()
    }
}

impl TlsSet {
    /// Builds the server configuration; client configurations are made per expected peer on
    /// first use and kept (so TLS sessions resume).
    pub fn new(
        credential: Arc<Credential>,
        revocations: Revocations,
        snapshot_bundles: &std::collections::BTreeMap<sidewall_policies::TrustDomain, Vec<String>>,
        tls12: bool,
    ) -> Result<Self, rustls::Error> {
        let bundles = merge_bundles(&credential, snapshot_bundles);
        let verifier =
            SpiffeClientVerifier::new(&bundles, provider(), acceptor(revocations.clone()), true)?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(tls12))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(Fixed(credential.certified_key.clone())));
        server.alpn_protocols = vec![
            ALPN_L4.to_vec(),
            ALPN_H2.to_vec(),
            ALPN_MUX.to_vec(),
            ALPN_PROBE.to_vec(),
        ];
        Ok(Self {
            server: Arc::new(server),
            bundles,
            credential,
            revocations,
            tls12,
            clients: Mutex::new(HashMap::new()),
            clients_h2: Mutex::new(HashMap::new()),
            clients_mux: Mutex::new(HashMap::new()),
        })
    }

    /// The credential these configurations present.
    pub fn credential(&self) -> &Arc<Credential> {
        &self.credential
    }

    /// A client configuration that accepts only `expected` as the server, for the L4 protocol.
    pub fn client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, rustls::Error> {
        self.client_for(expected, ALPN_L4)
    }

    /// A client configuration for `expected` with the given ALPN protocol ([`ALPN_L4`],
    /// [`ALPN_H2`] or [`ALPN_MUX`]).
    pub fn client_for(
        &self,
        expected: &SpiffeId,
        alpn: &'static [u8],
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let clients = if alpn == ALPN_H2 {
            &self.clients_h2
        } else if alpn == ALPN_MUX {
            &self.clients_mux
        } else {
            &self.clients
        };
        let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = clients.get(expected) {
            return Ok(config.clone());
        }
        let config = self.build_client(expected, alpn)?;
        clients.insert(expected.clone(), config.clone());
        Ok(config)
    }

    /// A client configuration for a probe of `expected` (not kept: probes are rare).
    pub fn probe_client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, rustls::Error> {
        self.build_client(expected, ALPN_PROBE)
    }

    fn build_client(
        &self,
        expected: &SpiffeId,
        alpn: &'static [u8],
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let provider = provider();
        let verifier = SpiffeServerVerifier::new(
            expected.clone(),
            self.bundles.clone(),
            &provider,
            Some(acceptor(self.revocations.clone())),
        );
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions(self.tls12))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientCertificate(
                self.credential.certified_key.clone(),
            )));
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}
