//! The operator's client for the control plane API, as the `sidewall` CLI uses it: mTLS with
//! an operator credential from the data directory, and the control plane verified as exactly
//! `spiffe://<td>/sidewall/control-plane` against the trust bundle there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::store::Cause;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sidewall_policies::svid::{SpiffeServerVerifier, TrustBundles};
use sidewall_policies::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::data_dir::{Record, bundle_path, operator_paths, record_path};
use crate::tls::{CONTROL_PLANE_PATH, provider};

/// How long one API call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a call could not be made (an HTTP error status is not one of these). The message
/// carries the cause's (the CLI prints one line); `source()` gives the cause itself.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A file the client needs is missing or unreadable.
    #[error(
        "{0}: {1} (is the control plane's data directory right? --data-dir or SIDEWALL_DATA_DIR)"
    )]
    File(PathBuf, #[source] Cause),
    /// The URL is not `https://host:port`.
    #[error("control plane URL {0:?} must look like https://127.0.0.1:4600")]
    Url(String),
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(#[source] Cause),
    /// Connecting or talking to the control plane failed.
    #[error("cannot reach the control plane at {0}: {1}")]
    Connect(String, #[source] Cause),
    /// The answer is not JSON.
    #[error("unexpected answer from the control plane: {0}")]
    Answer(String),
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File(path.to_path_buf(), e.into()))
}

/// A connection recipe for the API.
#[derive(Clone)]
pub struct Client {
    url: String,
    authority: String,
    host: String,
    tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url).finish()
    }
}

impl Client {
    /// A client authenticated as operator `name`, from the files in `data_dir`. `url`
    /// overrides the address the control plane recorded there.
    pub fn operator(data_dir: &Path, name: &str, url: Option<&str>) -> Result<Self, ClientError> {
        let record_file = record_path(data_dir);
        let record: Option<Record> = read(&record_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let url = match (url, &record) {
            (Some(url), _) => url.to_owned(),
            (None, Some(record)) => record.api_url.clone(),
            (None, None) => {
                return Err(ClientError::File(
                    record_file,
                    "not found; start the control plane or pass --control-plane URL".into(),
                ));
            }
        };
        let (cert_path, key_path) = operator_paths(data_dir, name);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&cert_path)?)
                .collect::<Result<_, _>>()
                .map_err(|e| ClientError::File(cert_path.clone(), e.into()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| ClientError::File(cert_path.clone(), "no certificate".into()))?;
        let svid =
            sidewall_policies::svid::Svid::from_der(leaf, sidewall_policies::svid::Usage::Client)
                .map_err(|e| ClientError::File(cert_path.clone(), e.into()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?)
            .map_err(|e| ClientError::File(key_path.clone(), e.into()))?;
        let bundle_file = bundle_path(data_dir);
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&bundle_file)?)
                .collect::<Result<_, _>>()
                .map_err(|e| ClientError::File(bundle_file.clone(), e.into()))?;
        Self::new(&url, &svid.id.trust_domain(), roots, Some((chain, key)))
    }

    /// A client for `url` that trusts `roots` for `trust_domain`, with an optional client
    /// certificate chain and key.
    pub fn new(
        url: &str,
        trust_domain: &TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("https://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .ok_or_else(|| ClientError::Url(url.to_owned()))?
            .to_owned();
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                host.trim_matches(['[', ']']).to_owned()
            }
            _ => return Err(ClientError::Url(url.to_owned())),
        };
        let mut bundles = TrustBundles::default();
        bundles
            .add(trust_domain.clone(), roots)
            .map_err(|e| ClientError::Tls(e.into()))?;
        let expected: SpiffeId = trust_domain
            .id(CONTROL_PLANE_PATH)
            .map_err(|e| ClientError::Tls(e.into()))?;
        let provider = provider();
        let verifier = SpiffeServerVerifier::new(expected, bundles, &provider, None);
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.into()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Tls(e.into()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            url: url.to_owned(),
            authority,
            host,
            tls: Arc::new(config),
        })
    }

    /// The API URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TLS client configuration (for callers that speak to the API themselves).
    pub fn tls(&self) -> Arc<ClientConfig> {
        self.tls.clone()
    }

    /// Calls the API; returns the status and the JSON (or text) body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        self.call_bytes(method, path, Bytes::from(payload)).await
    }

    /// Calls the API with a raw body (any bytes); returns the status and the JSON (or text)
    /// body.
    pub async fn call_bytes(
        &self,
        method: Method,
        path: &str,
        payload: Bytes,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, payload))
            .await
            .map_err(|_| ClientError::Connect(self.url.clone(), "timed out".into()))?
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        payload: Bytes,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let connect = |e: Cause| ClientError::Connect(self.url.clone(), e);
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| connect(e.into()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| connect(e.into()))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| connect(e.into()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect(e.into()))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(payload))
            .map_err(|e| connect(e.into()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| connect(e.into()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| connect(e.into()))?
            .to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        Ok((status, value))
    }
}

/// A fresh ECDSA P-256 key and a CSR for it (the subject is irrelevant: the CA ignores it).
pub fn key_and_csr() -> Result<(rcgen::KeyPair, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    Ok((key, csr))
}
