//! The HTTPS API (docs/api.md lists every route). JSON bodies use snake_case; every error is
//! `{"error": "<code>", "message": "<text>"}` with a fitting status, produced in one place
//! ([`ApiError`]) where it is also counted and logged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::json;
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::Svid;
use sidewall_policies::wire;
use sidewall_policies::wire::operator::{
    OperatorRequest, RevocationKind, RevocationRequest, RevocationRow, Revocations, Revoked,
    TokenCreated, TokenRequest, TokenRevoked, TokenRow, TokenState, Tokens,
};

use crate::attestation::{JoinToken, TokenError, workload_identity};
use crate::ca::{Authority, Issued, csr};
use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::store::{CertificateRecord, Redemption, RevocationRecord, Store, StoreError};

/// Largest request body, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Everything the API needs.
pub struct Api {
    /// The CA.
    pub ca: Authority,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Issuance rate limit per identity.
    pub limiter: RateLimiter,
    /// The configuration.
    pub config: Config,
    /// Policy distribution and the fleet view.
    pub distribution: Arc<crate::distribution::Distribution>,
}

impl Api {
    /// After a write that changes snapshots. With a replicated store, waits until this
    /// replica's change feed has put the write in force (so the answer reflects it, and the
    /// snapshot version is the store's revision on every replica) and returns true. Returns
    /// false for a store without a change feed: the caller updates distribution itself.
    pub(crate) async fn follows_store(&self) -> bool {
        let Some(revision) = self.store.written() else {
            return false;
        };
        if !self
            .distribution
            .caught_up(revision, Duration::from_secs(10))
            .await
        {
            tracing::warn!(
                revision,
                "the store's change feed has not reached this replica's write yet"
            );
        }
        true
    }
}

/// An error answered to a client: status, stable code, human message (no internals).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store failure");
        if let StoreError::Unavailable(_) = error {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the replicated store (etcd) has lost quorum or cannot be reached: changes are refused until it recovers; sidecars keep enforcing what they have",
            );
        }
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the control plane's store is unavailable; retry later",
        )
    }
}

impl From<TokenError> for ApiError {
    fn from(error: TokenError) -> Self {
        let status = match error {
            TokenError::Malformed => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        };
        Self::new(status, error.code(), error.to_string())
    }
}

impl From<csr::CsrError> for ApiError {
    fn from(error: csr::CsrError) -> Self {
        let status = match error {
            csr::CsrError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, error.code(), error.to_string())
    }
}

/// Every response body: whole (JSON, PEM) or streamed (snapshot watches).
pub(crate) type HttpResponse = Response<UnsyncBoxBody<Bytes, Infallible>>;

pub(crate) mod distribution;
mod policies;

/// Applies a policy set that came from the policy directory (see [`crate::gitops`]).
pub async fn apply_from_source(
    api: &Api,
    files: Vec<sidewall_policies::load::Source>,
    set: sidewall_policies::PolicySet,
    applied_by: String,
) -> Result<u64, String> {
    policies::store_and_apply(api, files, set, applied_by)
        .await
        .map_err(|e| e.message)
}

/// An answer with a JSON body: one of the `wire` types, or a `json!` value.
pub(crate) fn json_response<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    body: &T,
) -> HttpResponse {
    let (status, bytes) = match serde_json::to_vec(body) {
        Ok(bytes) => (status, bytes),
        // Only a map with keys that are not strings fails, and no answer has one.
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "internal", "message": error.to_string()})
                .to_string()
                .into_bytes(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) use crate::now_unix;

fn rfc3339(time: SystemTime) -> String {
    time::OffsetDateTime::from(time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn unix_rfc3339(seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Reads a JSON body within [`MAX_BODY_BYTES`] and the configured request timeout.
pub(crate) async fn read_json<T: DeserializeOwned>(
    api: &Api,
    request: Request<Incoming>,
) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body over {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let collected = tokio::time::timeout(api.config.request_timeout, body.collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "request body not received in time",
            )
        })?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::bad_request("body_unreadable", "request body could not be read")
            }
        })?;
    serde_json::from_slice(&collected.to_bytes()).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("body is not the expected JSON: {e}"),
        )
    })
}

/// The peer of a connection, as its TLS handshake established it.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The client's SVID, if it presented one (already verified by the handshake).
    pub svid: Option<Svid>,
    /// The client's address as this control plane sees it.
    pub remote: Option<std::net::SocketAddr>,
}

/// Serves one request; never fails (errors become JSON responses).
pub async fn handle(
    api: Arc<Api>,
    peer: Arc<Peer>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = route_name(&method, &path);
    let result = match (&method, path.as_str()) {
        (&Method::GET, "/v1/trust-bundle") => Ok(trust_bundle(&api)),
        (&Method::POST, "/v1/certificates") => certificates(&api, &peer, request).await,
        (&Method::POST, "/v1/tokens") => create_token(&api, &peer, request).await,
        (&Method::GET, "/v1/tokens") => list_tokens(&api, &peer).await,
        (&Method::DELETE, p) if p.starts_with("/v1/tokens/") => {
            revoke_token(&api, &peer, &p["/v1/tokens/".len()..]).await
        }
        (&Method::POST, "/v1/operators") => issue_operator(&api, &peer, request).await,
        (&Method::POST, "/v1/revocations") => revoke(&api, &peer, request).await,
        (&Method::GET, "/v1/revocations") => list_revocations(&api, &peer).await,
        (&Method::GET, "/v1/snapshots/watch") => distribution::watch(&api, &peer, &request),
        (&Method::POST, "/v1/registrations") => distribution::register(&api, &peer, request).await,
        (&Method::DELETE, p) if p.starts_with("/v1/registrations/") => {
            distribution::deregister(&api, &peer, &p["/v1/registrations/".len()..]).await
        }
        (&Method::POST, "/v1/acks") => distribution::ack(&api, &peer, request).await,
        (&Method::POST, "/v1/flows") => distribution::flows(&api, &peer, request).await,
        (&Method::GET, "/v1/flows") => distribution::list_flows(&api, &peer).await,
        (&Method::POST, "/v1/policies") => policies::apply(&api, &peer, request).await,
        (&Method::GET, "/v1/policies") => policies::history(&api, &peer).await,
        (&Method::POST, "/v1/policies/impact") => policies::impact(&api, &peer, request).await,
        (&Method::GET, p) if p.starts_with("/v1/policies/") => {
            policies::version(&api, &peer, &p["/v1/policies/".len()..]).await
        }
        (&Method::GET, "/v1/directory") => policies::directory(&api, &peer).await,
        (&Method::DELETE, p) if p.starts_with("/v1/directory/") => {
            distribution::remove(&api, &peer, &p["/v1/directory/".len()..]).await
        }
        (&Method::GET, "/v1/fleet") => policies::fleet(&api, &peer).await,
        (
            _,
            "/v1/trust-bundle" | "/v1/certificates" | "/v1/tokens" | "/v1/operators"
            | "/v1/revocations",
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {path}"),
        )),
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            metrics::counter!("sidewall_control_plane_refusals_total", "route" => route, "reason" => error.code)
                .increment(1);
            tracing::warn!(route, reason = error.code, peer = ?peer.svid.as_ref().map(|s| s.id.to_string()), message = %error.message, "request refused");
            json_response(
                error.status,
                &json!({"error": error.code, "message": error.message}),
            )
        }
    };
    metrics::counter!("sidewall_control_plane_requests_total", "route" => route, "status" => response.status().as_str().to_owned())
        .increment(1);
    Ok(response)
}

fn route_name(method: &Method, path: &str) -> &'static str {
    match (method, path) {
        (_, "/v1/trust-bundle") => "trust_bundle",
        (_, "/v1/certificates") => "certificates",
        (_, p) if p.starts_with("/v1/tokens") => "tokens",
        (_, "/v1/operators") => "operators",
        (_, "/v1/revocations") => "revocations",
        (_, "/v1/snapshots/watch") => "watch",
        (_, p) if p.starts_with("/v1/registrations") => "registrations",
        (_, "/v1/acks") => "acks",
        (_, "/v1/flows") => "flows",
        (_, p) if p.starts_with("/v1/policies") => "policies",
        (_, p) if p.starts_with("/v1/directory") => "directory",
        (_, "/v1/fleet") => "fleet",
        _ => "other",
    }
}

fn trust_bundle(api: &Api) -> HttpResponse {
    let mut response =
        Response::new(Full::new(Bytes::from(api.ca.trust_bundle_pem().to_owned())).boxed_unsync());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    response
}

pub(crate) fn require_operator(api: &Api, peer: &Peer) -> Result<String, ApiError> {
    let Some(svid) = &peer.svid else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "operator_credential_required",
            "this route needs an operator certificate (mTLS)",
        ));
    };
    let prefix = format!("spiffe://{}/sidewall/operator/", api.ca.trust_domain());
    if api.distribution.is_revoked(&svid.id, &svid.serial) {
        return Err(ApiError::forbidden(
            "revoked",
            format!("{} (serial {}) is revoked", svid.id, svid.serial),
        ));
    }
    match svid.id.as_str().strip_prefix(&prefix) {
        Some(name) if !name.is_empty() && !name.contains('/') => Ok(svid.id.to_string()),
        _ => Err(ApiError::forbidden(
            "not_an_operator",
            format!("{} is not an operator identity", svid.id),
        )),
    }
}

async fn is_revoked(
    api: &Api,
    identity: &SpiffeId,
    serial: Option<&str>,
) -> Result<bool, ApiError> {
    let revocations = api.store.revocations().await?;
    Ok(revocations.iter().any(|r| {
        (r.kind == RevocationKind::Identity && r.value == identity.as_str())
            || (r.kind == RevocationKind::Serial
                && Some(r.value.as_str()) == serial.map(|s| s.trim_start_matches('0')))
    }))
}

async fn certificates(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body: wire::CertificateRequest = read_json(api, request).await?;
    // The CSR is checked before a token is spent: a bad request consumes nothing.
    let key = csr::parse(&body.csr)?;
    let key_sha256 = crate::random::sha256_hex(&key.spki);
    let now = now_unix();
    let (identity, authenticated_by) = match (&body.token, &peer.svid) {
        (Some(text), presented) => {
            let token = JoinToken::parse(text)?;
            if token.ca_fingerprint != api.ca.root_fingerprint() {
                return Err(TokenError::OtherCa.into());
            }
            let record = api
                .store
                .token(&token.id)
                .await?
                .ok_or(TokenError::Unknown)?;
            if !token.matches(&record) {
                return Err(TokenError::Unknown.into());
            }
            let identity = SpiffeId::parse(&record.identity).map_err(|_| TokenError::Unknown)?;
            if let Some(svid) = presented
                && svid.id != identity
            {
                return Err(ApiError::forbidden(
                    "identity_mismatch",
                    format!(
                        "the token is for {identity} but the client certificate is for {}",
                        svid.id
                    ),
                ));
            }
            // A token made before its identity (or the certificate presented) was revoked
            // yields nothing.
            if is_revoked(
                api,
                &identity,
                presented.as_ref().map(|s| s.serial.as_str()),
            )
            .await?
            {
                return Err(ApiError::forbidden(
                    "revoked",
                    format!("{identity} is revoked; its join tokens cannot be redeemed"),
                ));
            }
            limit(api, &identity)?;
            match api.store.redeem_token(&token.id, &key_sha256, now).await? {
                Redemption::Redeemed => {}
                Redemption::Unknown => return Err(TokenError::Unknown.into()),
                Redemption::Expired => return Err(TokenError::Expired.into()),
                Redemption::Revoked => return Err(TokenError::Revoked.into()),
                Redemption::UsedUp => return Err(TokenError::UsedUp.into()),
            }
            (identity, format!("token:{}", token.id))
        }
        (None, Some(svid)) => {
            if workload_identity(&svid.id).is_err() {
                return Err(ApiError::forbidden(
                    "not_a_workload",
                    format!(
                        "{} cannot renew here; only workload identities are issued",
                        svid.id
                    ),
                ));
            }
            if is_revoked(api, &svid.id, Some(&svid.serial)).await? {
                return Err(ApiError::forbidden(
                    "revoked",
                    format!("{} (serial {}) is revoked", svid.id, svid.serial),
                ));
            }
            limit(api, &svid.id)?;
            (svid.id.clone(), format!("renewal:{}", svid.serial))
        }
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_missing",
                "first contact needs a join token; renewals need the current certificate (mTLS)",
            ));
        }
    };
    let issued = issue(
        api,
        &identity,
        &key.spki,
        api.config.workload_lifetime,
        &authenticated_by,
        "workload",
    )
    .await?;
    tracing::info!(identity = %identity, serial = %issued.serial, key = key.kind, authenticated_by, "certificate issued");
    Ok(certificate_response(api, &issued))
}

fn limit(api: &Api, identity: &SpiffeId) -> Result<(), ApiError> {
    if api.limiter.allow(identity.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many certificates for {identity}; retry in a minute"),
        ))
    }
}

async fn issue(
    api: &Api,
    identity: &SpiffeId,
    spki: &[u8],
    lifetime: Duration,
    authenticated_by: &str,
    kind: &'static str,
) -> Result<Issued, ApiError> {
    let issued = api.ca.issue(identity, spki, lifetime).map_err(|e| {
        // Every check on the key has passed: a signer that still fails is this server's
        // fault, not the client's.
        tracing::error!(error = %e, "signing failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the certificate could not be signed; the control plane's log says why",
        )
    })?;
    api.store
        .put_certificate(CertificateRecord {
            serial: issued.serial.clone(),
            identity: identity.to_string(),
            issued_at: now_unix(),
            not_after: issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            authenticated_by: authenticated_by.to_owned(),
        })
        .await?;
    metrics::counter!("sidewall_control_plane_certificates_issued_total", "kind" => kind)
        .increment(1);
    Ok(issued)
}

fn certificate_response(api: &Api, issued: &Issued) -> HttpResponse {
    let body = wire::Certificate {
        certificate_chain: issued.chain_pem.clone(),
        trust_bundle: api.ca.trust_bundle_pem().to_owned(),
        expires_at: rfc3339(issued.not_after),
        identity: issued.identity.to_string(),
        serial: issued.serial.clone(),
    };
    json_response(StatusCode::OK, &json!(body))
}

async fn create_token(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let body: TokenRequest = read_json(api, request).await?;
    let identity = SpiffeId::parse(&body.identity).map_err(|e| {
        ApiError::bad_request(
            "invalid_identity",
            format!("identity {:?}: {e}", body.identity),
        )
    })?;
    if identity.trust_domain_name() != api.ca.trust_domain().as_str() {
        return Err(ApiError::bad_request(
            "foreign_trust_domain",
            format!(
                "{identity} is not in trust domain {}",
                api.ca.trust_domain()
            ),
        ));
    }
    workload_identity(&identity).map_err(|why| ApiError::bad_request("not_a_workload", why))?;
    if api.distribution.is_revoked(&identity, "") {
        return Err(ApiError::bad_request(
            "revoked",
            format!("{identity} is revoked; no token can be made for it"),
        ));
    }
    let ttl = Duration::from_secs(body.ttl_seconds.unwrap_or(3600));
    if ttl.is_zero() || ttl > api.config.token_max_ttl {
        return Err(ApiError::bad_request(
            "ttl_out_of_range",
            format!(
                "ttl must be from 1 s to {} s",
                api.config.token_max_ttl.as_secs()
            ),
        ));
    }
    let uses = body.uses.unwrap_or(1);
    if !(1..=10_000).contains(&uses) {
        return Err(ApiError::bad_request(
            "uses_out_of_range",
            "uses must be from 1 to 10000",
        ));
    }
    let token = JoinToken::generate(&api.ca.root_fingerprint());
    let record = token.record(&identity, ttl, uses, now_unix(), &operator);
    let expires_at = record.expires_at;
    api.store.put_token(record).await?;
    metrics::counter!("sidewall_control_plane_tokens_created_total").increment(1);
    tracing::info!(token = %token.id, %identity, uses, operator, "join token created");
    Ok(json_response(
        StatusCode::CREATED,
        &TokenCreated {
            token: token.to_text(),
            id: token.id,
            identity: identity.to_string(),
            uses,
            expires_at: unix_rfc3339(expires_at),
        },
    ))
}

async fn list_tokens(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let now = now_unix();
    let mut tokens = api.store.tokens().await?;
    tokens.sort_by_key(|t| t.created_at);
    let tokens = tokens
        .into_iter()
        .map(|t| {
            let state = if t.revoked_at.is_some() {
                TokenState::Revoked
            } else if now >= t.expires_at {
                TokenState::Expired
            } else if t.redeemed_keys.len() >= t.uses as usize {
                TokenState::Used
            } else {
                TokenState::Active
            };
            TokenRow {
                state,
                used: t.redeemed_keys.len(),
                created_at: unix_rfc3339(t.created_at),
                expires_at: unix_rfc3339(t.expires_at),
                id: t.id,
                identity: t.identity,
                uses: t.uses,
                created_by: t.created_by,
            }
        })
        .collect();
    Ok(json_response(StatusCode::OK, &Tokens { tokens }))
}

async fn revoke_token(api: &Api, peer: &Peer, id: &str) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    if api.store.revoke_token(id, now_unix()).await? {
        tracing::info!(token = id, operator, "join token revoked");
        Ok(json_response(
            StatusCode::OK,
            &TokenRevoked {
                id: id.to_owned(),
                state: TokenState::Revoked,
            },
        ))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "token_not_found",
            format!("no token {id}"),
        ))
    }
}

async fn issue_operator(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let body: OperatorRequest = read_json(api, request).await?;
    let identity = api
        .ca
        .trust_domain()
        .id(&format!("/sidewall/operator/{}", body.name))
        .ok()
        .filter(|_| !body.name.is_empty() && !body.name.contains('/'))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_name",
                format!(
                    "operator name {:?} must be one segment of a-z A-Z 0-9 . _ -",
                    body.name
                ),
            )
        })?;
    let key = csr::parse(&body.csr)?;
    let issued = issue(
        api,
        &identity,
        &key.spki,
        api.config.operator_lifetime,
        &format!("operator:{operator}"),
        "operator",
    )
    .await?;
    tracing::info!(%identity, serial = %issued.serial, by = operator, "operator credential issued");
    Ok(certificate_response(api, &issued))
}

async fn revoke(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let body: RevocationRequest = read_json(api, request).await?;
    let (kind, value) = match (body.identity, body.serial) {
        (Some(identity), None) => {
            let id = SpiffeId::parse(&identity).map_err(|e| {
                ApiError::bad_request("invalid_identity", format!("identity {identity:?}: {e}"))
            })?;
            (RevocationKind::Identity, id.to_string())
        }
        (None, Some(serial)) => {
            let serial = serial
                .trim_start_matches("0x")
                .to_ascii_lowercase()
                .replace(':', "");
            if serial.is_empty()
                || !serial.bytes().all(|b| b.is_ascii_hexdigit())
                || serial.len() > 64
            {
                return Err(ApiError::bad_request(
                    "invalid_serial",
                    "serial must be hex",
                ));
            }
            (
                RevocationKind::Serial,
                serial.trim_start_matches('0').to_owned(),
            )
        }
        _ => {
            return Err(ApiError::bad_request(
                "identity_or_serial",
                "give exactly one of identity and serial",
            ));
        }
    };
    api.store
        .put_revocation(RevocationRecord {
            kind,
            value: value.clone(),
            at: now_unix(),
            by: operator.clone(),
        })
        .await?;
    if !api.follows_store().await {
        api.distribution
            .set_revocations(&api.store.revocations().await?);
    }
    tracing::warn!(kind = kind.as_str(), value, operator, "revoked");
    Ok(json_response(StatusCode::OK, &Revoked { kind, value }))
}

async fn list_revocations(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let revocations = api
        .store
        .revocations()
        .await?
        .into_iter()
        .map(|r| RevocationRow {
            kind: r.kind,
            at: unix_rfc3339(r.at),
            value: r.value,
            by: r.by,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &Revocations { revocations }))
}
