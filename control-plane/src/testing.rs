//! Test helpers shared by the control plane's tests and the end-to-end tests (feature
//! `test-util`): an in-process control plane on loopback, clients with any identity, and an
//! independent check of the X.509-SVID rules on issued certificates.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test support code

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sidewall_policies::TrustDomain;
use tokio::sync::oneshot;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::server::{self, Listeners};

/// A control plane running in this process on loopback ports.
pub struct TestControlPlane {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestControlPlane {
    /// Starts one in `data_dir`, letting `tweak` change the configuration first.
    pub async fn start(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::load(
            None,
            Overrides {
                data_dir: Some(data_dir.to_path_buf()),
                ..Overrides::default()
            },
        )
        .unwrap();
        tweak(&mut config);
        let trust_domain = config.trust_domain.clone();
        let prepared = server::prepare(config).await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (api_addr, admin_addr) = (api.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(prepared, Listeners { api, admin }, None, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            api: api_addr,
            admin: admin_addr,
            data_dir: data_dir.to_path_buf(),
            trust_domain,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.api)
    }

    /// The trust bundle the control plane wrote.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(server::bundle_path(&self.data_dir)).unwrap();
        CertificateDer::pem_slice_iter(&pem)
            .map(Result::unwrap)
            .collect()
    }

    /// A client without a certificate (first contact).
    pub fn anonymous(&self) -> Client {
        Client::new(&self.url(), &self.trust_domain, self.roots(), None).unwrap()
    }

    /// A client presenting `chain` with `key`.
    pub fn with_identity(&self, chain_pem: &str, key_pem: &str) -> Client {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        Client::new(
            &self.url(),
            &self.trust_domain,
            self.roots(),
            Some((chain, key)),
        )
        .unwrap()
    }

    /// The admin operator.
    pub fn operator(&self) -> Client {
        Client::operator(&self.data_dir, "admin", Some(&self.url())).unwrap()
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Checks, with x509-parser and independently of the code that built it, that `leaf_pem` is
/// an X.509-SVID for `identity`: exactly one URI SAN, cA=false, key usage digitalSignature
/// only and critical, EKU serverAuth + clientAuth, subject and authority key identifiers, a
/// 128-bit serial, and a lifetime of `lifetime` (give or take the 60 s backdating).
pub fn assert_svid(leaf_pem: &str, identity: &str, lifetime: Duration) {
    let der = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
    let (rest, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(rest.is_empty());
    let mut uris = Vec::new();
    let mut other_sans = 0;
    let (mut bc_ok, mut ku_ok, mut eku_ok, mut ski, mut aki) = (false, false, false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        _ => other_sans += 1,
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => bc_ok = !bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                ku_ok = ext.critical
                    && ku.digital_signature()
                    && !ku.key_cert_sign()
                    && !ku.crl_sign()
                    && !ku.key_encipherment();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                eku_ok = eku.server_auth && eku.client_auth && !eku.any;
            }
            ParsedExtension::SubjectKeyIdentifier(_) => ski = true,
            ParsedExtension::AuthorityKeyIdentifier(_) => aki = true,
            _ => {}
        }
    }
    assert_eq!(uris, vec![identity.to_owned()], "exactly one URI SAN");
    assert_eq!(other_sans, 0, "no other SANs on a workload SVID");
    assert!(bc_ok, "basicConstraints present with cA=false");
    assert!(ku_ok, "key usage: digitalSignature only, critical");
    assert!(eku_ok, "EKU serverAuth + clientAuth");
    assert!(ski && aki, "subject and authority key identifiers");
    let serial = cert.raw_serial();
    assert!(
        (15..=16).contains(&serial.len()),
        "128-bit serial, got {} bytes",
        serial.len()
    );
    let validity = cert.validity();
    let seconds = validity.not_after.timestamp() - validity.not_before.timestamp();
    let expected = i64::try_from(lifetime.as_secs()).unwrap();
    assert!(
        (expected..=expected + 61).contains(&seconds),
        "lifetime {seconds} s, expected {expected}"
    );
    let subject = cert.subject().to_string();
    assert!(
        !subject.contains("CN="),
        "subject copied from the request: {subject}"
    );
}
