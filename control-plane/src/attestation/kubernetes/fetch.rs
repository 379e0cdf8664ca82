//! Calls to the cluster over HTTPS: the issuer's keys (`attestation.kubernetes.jwksUrl`: the
//! JWKS itself, or the issuer's OIDC discovery document and then the JWKS its `jwks_uri` names),
//! and TokenReviews (`tokenReviewUrl`). HTTPS only, the server checked against `caFile` (the
//! cluster's CA); with `bearerTokenFile`, the token (re-read every time: the kubelet rotates it)
//! as `Authorization: Bearer`. Bounded: 10 s, 1 MiB, no redirects.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, Uri};
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
    let bearer = bearer(bearer_token_file.as_deref())?;
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

/// The token in `path`, if any.
fn bearer(path: Option<&std::path::Path>) -> Result<Option<String>, String> {
    path.map(|path| {
        std::fs::read_to_string(path)
            .map(|token| token.trim().to_owned())
            .map_err(|e| format!("bearerTokenFile {}: {e}", path.display()))
    })
    .transpose()
}

/// What the API server said of a token (`TokenReview.status`).
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct Reviewed {
    #[serde(default)]
    pub(super) authenticated: bool,
    #[serde(default)]
    pub(super) error: String,
    #[serde(default)]
    pub(super) user: ReviewedUser,
}

/// The user a TokenReview names.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct ReviewedUser {
    #[serde(default)]
    pub(super) username: String,
    #[serde(default)]
    pub(super) extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// Asks the API server at `url` to review `token` for `audience` (a `TokenReview`): its
/// status, or why there is none.
pub(super) async fn review(
    review: &super::TokenReview,
    token: &str,
    audience: &str,
) -> Result<Reviewed, String> {
    let roots = roots(&review.ca_file)?;
    let bearer = bearer(review.bearer_token_file.as_deref())?;
    let url = format!(
        "{}/apis/authentication.k8s.io/v1/tokenreviews",
        review.url.trim_end_matches('/')
    );
    let body = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    });
    let answer = tokio::time::timeout(
        TIMEOUT,
        call(&url, &roots, bearer.as_deref(), Some(body.to_string())),
    )
    .await
    .map_err(|_| format!("{url}: no answer within {} s", TIMEOUT.as_secs()))??;
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        status: Reviewed,
    }
    serde_json::from_slice::<Answer>(&answer)
        .map(|a| a.status)
        .map_err(|e| format!("{url}: not a TokenReview: {e}"))
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
    call(url, roots, bearer, None).await
}

/// One HTTPS request to `url`, a POST of JSON `body` if any, else a GET: the body of a `2xx`.
async fn call(
    url: &str,
    roots: &RootCertStore,
    bearer: Option<&str>,
    body: Option<String>,
) -> Result<Bytes, String> {
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
    let method = if body.is_some() {
        hyper::Method::POST
    } else {
        hyper::Method::GET
    };
    let mut request = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json");
    if body.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = bearer {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: answered {}", response.status()));
    }
    Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .map_err(|e| format!("{url}: {e}"))
}
