//! Talking to the control plane for certificates (the routes documented in docs/api.md).
//!
//! First contact pins the CA: the trust bundle is fetched without verifying the server (no
//! secret is sent on that connection), and of what it holds only the root whose SHA-256 equals
//! the fingerprint in the join token is kept. The join (token and CSR) goes only to a control
//! plane presenting exactly `spiffe://<td>/sidewall/control-plane` chained to that one root; the
//! trust bundle in its answer is then the sidecar's, and renewals are verified against it.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::{SpiffeServerVerifier, TrustBundles};
use sidewall_policies::wire;
use tokio_rustls::TlsConnector;

use super::Credential;
use crate::tls::provider;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The error a [`JoinError`] was caused by, kept as it is.
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why joining or renewing failed. The message carries the cause's (logs print one line);
/// `source()` gives the cause itself.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No `controlPlane.tokenFile` or `serviceAccountTokenFile`, and no saved certificate.
    #[error(
        "no valid certificate saved and no controlPlane.tokenFile or serviceAccountTokenFile to join with"
    )]
    NoToken,
    /// The token file cannot be read.
    #[error("token file {0}: {1}")]
    TokenFile(String, #[source] std::io::Error),
    /// The token is not a Sidewall join token.
    #[error("the join token is malformed (expected swt1.<id>.<secret>.<ca-sha256>)")]
    Token,
    /// The trust bundle does not match the token's CA fingerprint.
    #[error(
        "the control plane at {0} is not the one the token was made for (CA fingerprint differs)"
    )]
    Pin(String),
    /// Generating the key or CSR failed.
    #[error("key generation: {0}")]
    Key(#[source] rcgen::Error),
    /// A control-plane URL is not `https://host:port`.
    #[error("bad control plane URL {0:?}")]
    BadUrl(String),
    /// No control-plane URL is configured.
    #[error("no control plane URL")]
    NoUrl,
    /// The control plane at the URL could not be reached.
    #[error("{url}: {source}")]
    Unreachable {
        /// The control plane's URL.
        url: String,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The server's certificate does not chain to a root this sidecar trusts for it (at the
    /// join, only the pinned root), or is not the control plane's SVID.
    #[error(
        "the control plane at {0} presented a certificate that does not chain to a root this sidecar trusts ({1})"
    )]
    Untrusted(String, #[source] rustls::Error),
    /// The control plane refused.
    #[error("control plane refused ({0}): {1}")]
    Refused(u16, String),
    /// The answer is unusable.
    #[error("unusable answer from the control plane: {0}")]
    Answer(#[source] Cause),
}

/// Accepts any server certificate: used only to fetch the public trust bundle, whose content
/// is then checked against the token's fingerprint. Nothing secret is sent on such a
/// connection.
#[derive(Debug)]
struct FetchOnly(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for FetchOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `host:port` and host of an `https://host:port` URL.
pub(crate) fn authority(url: &str) -> Result<(String, String), JoinError> {
    let authority = url
        .strip_prefix("https://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .ok_or_else(|| JoinError::BadUrl(url.to_owned()))?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_matches(['[', ']']);
    Ok((authority.to_owned(), host.to_owned()))
}

async fn call(
    url: &str,
    tls: Arc<ClientConfig>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, Bytes), JoinError> {
    let work = async {
        let (authority, host) = authority(url)?;
        let fail = |e: Cause| JoinError::Unreachable {
            url: url.to_owned(),
            source: e,
        };
        let tcp = crate::transport::connect_authority(&authority)
            .await
            .map_err(|e| fail(e.into()))?;
        let name = ServerName::try_from(host).map_err(|e| fail(e.into()))?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_error(url, e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.into()))?;
        tokio::spawn(connection);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| fail(e.into()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(e.into()))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.into()))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .map_err(|_| JoinError::Unreachable {
            url: url.to_owned(),
            source: "timed out".into(),
        })?
}

/// A refused server certificate is [`JoinError::Untrusted`]; anything else is unreachable.
fn handshake_error(url: &str, error: std::io::Error) -> JoinError {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(refused @ rustls::Error::InvalidCertificate(_)) => {
            JoinError::Untrusted(url.to_owned(), refused.clone())
        }
        _ => JoinError::Unreachable {
            url: url.to_owned(),
            source: error.into(),
        },
    }
}

/// A client configuration that accepts only the control plane of `identity`'s trust domain.
pub(crate) fn verified_config(
    identity: &SpiffeId,
    bundle_pem: &str,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, JoinError> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| JoinError::Answer(e.into()))?;
    config_trusting(identity, roots, client)
}

/// A client configuration that accepts only the control plane of `identity`'s trust domain,
/// chained to one of `roots`.
fn config_trusting(
    identity: &SpiffeId,
    roots: Vec<CertificateDer<'static>>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, JoinError> {
    let mut bundles = TrustBundles::default();
    bundles
        .add(identity.trust_domain(), roots)
        .map_err(|e| JoinError::Answer(e.into()))?;
    let expected = identity
        .trust_domain()
        .id("/sidewall/control-plane")
        .map_err(|e| JoinError::Answer(e.into()))?;
    let provider = provider();
    let verifier = SpiffeServerVerifier::new(expected, bundles, &provider, None);
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JoinError::Answer(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| JoinError::Answer(e.into()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Fetches the trust bundle from `url` and returns, as PEM, only the root whose SHA-256 is the
/// pinned fingerprint: the one certificate the join trusts. Anything else the unverified answer
/// holds is dropped (an on-path impostor could have added its own root beside the genuine one),
/// so a control plane whose certificate chains to another root fails the handshake before the
/// token is sent.
async fn pinned_root(url: &str, fingerprint: &str) -> Result<CertificateDer<'static>, JoinError> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| JoinError::Answer(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FetchOnly(
            provider.signature_verification_algorithms,
        )))
        .with_no_client_auth();
    let (status, body) = call(url, Arc::new(config), Method::GET, "/v1/trust-bundle", None).await?;
    if status != 200 {
        return Err(JoinError::Refused(status, "trust bundle".into()));
    }
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&body)
        .filter_map(Result::ok)
        .collect();
    let others = certificates.len().saturating_sub(1);
    let root = certificates
        .into_iter()
        .find(|root| hex(digest::digest(&digest::SHA256, root).as_ref()) == fingerprint)
        .ok_or_else(|| JoinError::Pin(url.to_owned()))?;
    if others > 0 {
        tracing::warn!(
            url,
            others,
            "the trust bundle holds certificates beside the root the join token pins; the join trusts only the pinned root"
        );
    }
    Ok(root)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn certificate_answer(status: u16, body: &Bytes) -> Result<wire::Certificate, JoinError> {
    if status == 200 {
        return serde_json::from_slice(body).map_err(|e| JoinError::Answer(e.into()));
    }
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    Err(JoinError::Refused(status, message))
}

/// Tries each URL in turn; the last error is returned if none works. A refusal is final (the
/// next replica would refuse too).
async fn each_url<T, F, Fut>(urls: &[String], mut attempt: F) -> Result<T, JoinError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, JoinError>>,
{
    let mut last = JoinError::NoUrl;
    for url in urls {
        match attempt(url.clone()).await {
            Ok(value) => return Ok(value),
            Err(error @ JoinError::Refused(..)) => return Err(error),
            Err(error) => {
                tracing::warn!(url = %url, %error, "control plane attempt failed");
                last = error;
            }
        }
    }
    Err(last)
}

/// First contact: pin the CA from the token, then exchange the token and CSR.
pub(super) async fn join(
    urls: &[String],
    identity: &SpiffeId,
    token: &str,
    csr: &str,
) -> Result<wire::Certificate, JoinError> {
    let mut parts = token.split('.');
    let fingerprint = match (parts.next(), parts.nth(2), parts.next()) {
        (Some("swt1"), Some(fp), None) if fp.len() == 64 => fp.to_owned(),
        _ => return Err(JoinError::Token),
    };
    let request = wire::CertificateRequest {
        csr: csr.to_owned(),
        token: Some(token.to_owned()),
        service_account_token: None,
        pod: None,
    };
    first_contact(urls, identity, &fingerprint, request).await
}

/// Joins with a Kubernetes service-account token, pinning the root `fingerprint`.
pub(super) async fn join_with_service_account(
    urls: &[String],
    identity: &SpiffeId,
    fingerprint: &str,
    (jwt, pod): (&str, Option<&str>),
    csr: &str,
) -> Result<wire::Certificate, JoinError> {
    let request = wire::CertificateRequest {
        csr: csr.to_owned(),
        token: None,
        service_account_token: Some(jwt.to_owned()),
        pod: pod.map(str::to_owned),
    };
    first_contact(urls, identity, fingerprint, request).await
}

/// Posts `request` (which carries a secret) only to a control plane that chains to the root
/// pinned by `fingerprint`.
async fn first_contact(
    urls: &[String],
    identity: &SpiffeId,
    fingerprint: &str,
    request: wire::CertificateRequest,
) -> Result<wire::Certificate, JoinError> {
    let body = serde_json::json!(request);
    each_url(urls, |url| {
        let body = body.clone();
        async move {
            let root = pinned_root(&url, fingerprint).await?;
            let tls = config_trusting(identity, vec![root], None)?;
            let (status, answer) =
                call(&url, tls, Method::POST, "/v1/certificates", Some(body)).await?;
            certificate_answer(status, &answer)
        }
    })
    .await
}

/// Renewal over mTLS with the current certificate.
pub(super) async fn renew(
    urls: &[String],
    current: &Credential,
    csr: &str,
) -> Result<wire::Certificate, JoinError> {
    let chain: Vec<CertificateDer<'static>> = current.certified_key.cert.clone();
    let key = PrivateKeyDer::from_pem_slice(current.key_pem.as_bytes())
        .map_err(|e| JoinError::Answer(e.into()))?;
    let tls = verified_config(&current.svid.id, &current.bundle_pem, Some((chain, key)))?;
    each_url(urls, |url| {
        let tls = tls.clone();
        async move {
            let body = serde_json::json!(wire::CertificateRequest {
                csr: csr.to_owned(),
                token: None,
                service_account_token: None,
                pod: None,
            });
            let (status, answer) =
                call(&url, tls, Method::POST, "/v1/certificates", Some(body)).await?;
            certificate_answer(status, &answer)
        }
    })
    .await
}
