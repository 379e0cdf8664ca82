//! The issuer's keys over HTTPS (`attestation.kubernetes.jwksUrl`): the JWKS itself, or the
//! issuer's OIDC discovery document and then the JWKS its `jwks_uri` names. HTTPS only, the
//! server checked against `caFile` (the cluster's CA); with `bearerTokenFile`, the token (re-read
//! every time: the kubelet rotates it) as `Authorization: Bearer`. Bounded: 10 s, 1 MiB, no
//! redirects.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use jsonwebtoken::jwk::JwkSet;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};

use super::KeySource;

/// Longest answer read.
const MAX_BODY: usize = 1 << 20;
/// Longest a whole fetch may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The path that marks a discovery document.
const DISCOVERY: &str = "/.well-known/openid-configuration";

/// Fetches the issuer's keys from `source` (a URL source): the set, or why not.
pub(super) async fn keys(source: &KeySource) -> Result<JwkSet, String> {
    let KeySource::Url {
        url,
        ca_file,
        bearer_token_file,
    } = source
    else {
        return Err("not a URL source".into());
    };
    let roots = roots(ca_file)?;
    let bearer = match bearer_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("bearerTokenFile {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    tokio::time::timeout(TIMEOUT, async {
        let mut jwks_url = url.clone();
        if url.trim_end_matches('/').ends_with(DISCOVERY) {
            let body = get(url, &roots, bearer.as_deref()).await?;
            #[derive(serde::Deserialize)]
            struct Discovery {
                jwks_uri: String,
            }
            let discovery: Discovery = serde_json::from_slice(&body)
                .map_err(|e| format!("{url}: not an OIDC discovery document: {e}"))?;
            jwks_url = discovery.jwks_uri;
        }
        let body = get(&jwks_url, &roots, bearer.as_deref()).await?;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| format!("{jwks_url}: not a JWKS document: {e}"))?;
        if set.keys.is_empty() {
            return Err(format!("{jwks_url}: the JWKS has no key"));
        }
        Ok(set)
    })
    .await
    .map_err(|_| format!("{url}: no answer within {} s", TIMEOUT.as_secs()))?
}

/// The CA certificates in `path`.
fn roots(path: &std::path::Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("caFile {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("caFile {}: {e}", path.display()))?;
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(format!("caFile {}: no CA certificate", path.display()));
    }
    Ok(roots)
}

/// One HTTPS GET of `url`: the body of a `200`.
async fn get(url: &str, roots: &RootCertStore, bearer: Option<&str>) -> Result<Bytes, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: only https is fetched"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let tcp =
        tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(connection);
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(host)
        .to_owned();
    let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json");
    if let Some(token) = bearer {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("{url}: answered {}", response.status()));
    }
    Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .map_err(|e| format!("{url}: {e}"))
}
