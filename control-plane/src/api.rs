//! The HTTPS API (docs/api.md lists every route). JSON bodies use snake_case and are the
//! `wire` types; every error is `{"error": "<code>", "message": "<text>"}` with a fitting
//! status, produced in one place ([`ApiError`]) where it is also counted and logged.
//!
//! This file holds the router and what every route shares (the caller, errors, bodies); the
//! routes are grouped by what they manage: `identity` (certificates), `operators` (operator
//! credentials and their roles), `tokens`, `revocations`, `distribution` (what sidecars call: registrations, the snapshot
//! watch, acks, flows) and `policies` (policy versions, impact, the directory, the fleet).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::json;
use sidewall_policies::svid::Svid;
use sidewall_policies::wire::operator::Role;

use crate::attestation::TokenError;
use crate::attestation::kubernetes::ServiceAccountError;
use crate::ca::csr;
use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::store::{Store, StoreError};

/// Largest request body, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Everything the API needs.
pub struct Api {
    /// The CA set in force ([`Api::ca`]); a rotation swaps it.
    pub ca_set: crate::ca::rotation::CaCell,
    /// Where CA keys are kept (a rotation's new CA too).
    pub ca_keys: crate::ca::rotation::KeyHome,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Issuance rate limit per identity.
    pub limiter: RateLimiter,
    /// The configuration.
    pub config: Config,
    /// Policy distribution and the fleet view.
    pub distribution: Arc<crate::distribution::Distribution>,
    /// Kubernetes service-account attestation, when configured.
    pub kubernetes: Option<crate::attestation::kubernetes::Kubernetes>,
    /// Refused registrations, folded for the audit trail.
    pub refusals: crate::audit::Refusals,
    /// The control plane's serving certificate and key, which also sign reports.
    pub certificate: Arc<crate::tls::ServingCertificate>,
    /// Reports are built one at a time: each reads the whole audit trail and the store.
    pub reports: tokio::sync::Mutex<()>,
}

impl Api {
    /// The CA set in force.
    pub fn ca(&self) -> Arc<crate::ca::rotation::CaSet> {
        self.ca_set.get()
    }

    /// Appends a change that has committed to the audit trail. A failure is logged and counted;
    /// the change stands.
    pub(crate) async fn audit(&self, event: crate::audit::AuditEvent) {
        self.audit_at(event, now_unix()).await;
    }

    /// [`Self::audit`] with the record's time given (a checkpoint signs its own time).
    pub(crate) async fn audit_at(&self, event: crate::audit::AuditEvent, time: i64) {
        let action = event.action;
        match self.store.append_audit(event, time).await {
            Ok(record) => {
                metrics::counter!(crate::metric::AUDIT_RECORDS, "action" => action).increment(1);
                tracing::debug!(seq = record.seq, action, actor = %record.actor, subject = %record.subject, "audit record appended");
            }
            Err(error) => {
                metrics::counter!(crate::metric::AUDIT_FAILURES, "action" => action).increment(1);
                tracing::error!(action, %error, "audit record not appended; the change stands");
            }
        }
    }

    /// After a write that changes snapshots: waits until the store's change feed has put the
    /// write in force on this replica, so the answer reflects it (and, with etcd, the snapshot
    /// version is the store's revision on every replica).
    pub(crate) async fn settle(&self) {
        let revision = self.store.written();
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
        if let StoreError::Unavailable { .. } = error {
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

impl From<ServiceAccountError> for ApiError {
    fn from(error: ServiceAccountError) -> Self {
        let status = match error {
            ServiceAccountError::NotConfigured | ServiceAccountError::Malformed => {
                StatusCode::BAD_REQUEST
            }
            ServiceAccountError::NotAllowed(_) | ServiceAccountError::OtherPod { .. } => {
                StatusCode::FORBIDDEN
            }
            ServiceAccountError::ReviewUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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

mod audit;
pub(crate) mod ca;
mod reports;
mod verifications;
pub(crate) use audit::PAGE as AUDIT_PAGE;
pub(crate) mod distribution;
mod identity;
mod operators;
mod policies;
mod revocations;
mod tokens;

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

pub(super) fn rfc3339(time: SystemTime) -> String {
    time::OffsetDateTime::from(time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Unix seconds as RFC 3339 (UTC); empty when out of range.
pub fn unix_rfc3339(seconds: i64) -> String {
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
    /// The role an operator's certificate carries ([`crate::ca::operator_role`]).
    pub role: Option<Role>,
}

/// Serves one request; never fails (errors become JSON responses).
pub async fn handle(
    api: Arc<Api>,
    peer: Arc<Peer>,
    request: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (route, access) = route(&method, &path);
    let result = match access {
        Access::Operator(needed) => authorize(&api, &peer, needed, &method, &path),
        Access::Anyone | Access::Workload => Ok(()),
    };
    let result = match result {
        Ok(()) => dispatch(&api, &peer, request, &method, &path).await,
        Err(error) => Err(error),
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            metrics::counter!(crate::metric::REFUSALS, "route" => route, "reason" => error.code)
                .increment(1);
            tracing::warn!(route, reason = error.code, peer = ?peer.svid.as_ref().map(|s| s.id.to_string()), message = %error.message, "request refused");
            if route == "certificates"
                && let Some(event) = api.refusals.refused(peer.remote, error.code)
            {
                api.audit(event).await;
            }
            json_response(
                error.status,
                &json!({"error": error.code, "message": error.message}),
            )
        }
    };
    metrics::counter!(crate::metric::REQUESTS, "route" => route, "status" => response.status().as_str().to_owned())
        .increment(1);
    Ok(response)
}

async fn dispatch(
    api: &Arc<Api>,
    peer: &Peer,
    request: Request<Incoming>,
    method: &Method,
    path: &str,
) -> Result<HttpResponse, ApiError> {
    match (method, path) {
        (&Method::GET, "/v1/trust-bundle") => Ok(identity::trust_bundle(api)),
        (&Method::POST, "/v1/certificates") => identity::certificates(api, peer, request).await,
        (&Method::POST, "/v1/tokens") => tokens::create_token(api, peer, request).await,
        (&Method::GET, "/v1/tokens") => tokens::list_tokens(api, peer).await,
        (&Method::DELETE, p) if p.starts_with("/v1/tokens/") => {
            tokens::revoke_token(api, peer, &p["/v1/tokens/".len()..]).await
        }
        (&Method::POST, "/v1/operators") => operators::issue(api, peer, request).await,
        (&Method::GET, "/v1/operators") => operators::list(api, peer, &request).await,
        (&Method::DELETE, p) if p.starts_with("/v1/operators/") => {
            operators::revoke(api, peer, &p["/v1/operators/".len()..]).await
        }
        (&Method::POST, "/v1/revocations") => revocations::revoke(api, peer, request).await,
        (&Method::GET, "/v1/revocations") => revocations::list_revocations(api, peer).await,
        (&Method::GET, "/v1/snapshots/watch") => distribution::watch(api, peer, &request),
        (&Method::POST, "/v1/registrations") => distribution::register(api, peer, request).await,
        (&Method::DELETE, p) if p.starts_with("/v1/registrations/") => {
            distribution::deregister(api, peer, &p["/v1/registrations/".len()..]).await
        }
        (&Method::POST, "/v1/acks") => distribution::ack(api, peer, request).await,
        (&Method::POST, "/v1/flows") => distribution::flows(api, peer, request).await,
        (&Method::GET, "/v1/flows") => distribution::list_flows(api, peer).await,
        (&Method::POST, "/v1/policies") => policies::apply(api, peer, request).await,
        (&Method::GET, "/v1/policies") => policies::history(api, peer).await,
        (&Method::POST, "/v1/policies/impact") => policies::impact(api, peer, request).await,
        (&Method::GET, p) if p.starts_with("/v1/policies/") => {
            policies::version(api, peer, &p["/v1/policies/".len()..]).await
        }
        (&Method::GET, "/v1/directory") => policies::directory(api, peer).await,
        (&Method::DELETE, p) if p.starts_with("/v1/directory/") => {
            distribution::remove(api, peer, &p["/v1/directory/".len()..]).await
        }
        (&Method::GET, "/v1/fleet") => policies::fleet(api, peer).await,
        (&Method::GET, "/v1/audit") => audit::list(api, peer, &request).await,
        (&Method::POST, "/v1/reports") => reports::create(api, peer, request).await,
        (&Method::POST, "/v1/verifications") => verifications::start(api, peer, request).await,
        (&Method::GET, p) if p.starts_with("/v1/verifications/") => {
            verifications::read(api, peer, &p["/v1/verifications/".len()..]).await
        }
        (&Method::POST, "/v1/probes") => verifications::results(api, peer, request).await,
        (&Method::GET, "/v1/ca") => ca::status(api, peer).await,
        (&Method::POST, "/v1/ca/rotation") => ca::rotate(api, peer, request).await,
        (
            _,
            "/v1/trust-bundle" | "/v1/certificates" | "/v1/tokens" | "/v1/operators"
            | "/v1/revocations" | "/v1/ca" | "/v1/ca/rotation",
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
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anyone who completed the handshake (the route checks the credential it takes).
    Anyone,
    /// A workload's sidecar (the route checks which).
    Workload,
    /// An operator whose role is at least this one.
    Operator(Role),
}

/// A route's name (its metrics label) and who may call it: the one table of the role each
/// route needs (docs/api.md#operator-roles). A method a route does not take is `Anyone`: it
/// is answered 405 or 404 to everyone.
pub(crate) fn route(method: &Method, path: &str) -> (&'static str, Access) {
    use Access::{Anyone, Operator, Workload};
    use Role::{Admin, Policy, Viewer};
    let get = method == Method::GET;
    let (post, delete) = (method == Method::POST, method == Method::DELETE);
    let prefix = |p: &str| path.starts_with(p);
    match path {
        "/v1/trust-bundle" => ("trust_bundle", Anyone),
        "/v1/certificates" => ("certificates", Anyone),
        "/v1/tokens" if get || post => ("tokens", Operator(Admin)),
        _ if prefix("/v1/tokens/") && delete => ("tokens", Operator(Admin)),
        _ if prefix("/v1/tokens") => ("tokens", Anyone),
        "/v1/operators" if get || post => ("operators", Operator(Admin)),
        _ if prefix("/v1/operators/") && delete => ("operators", Operator(Admin)),
        _ if prefix("/v1/operators") => ("operators", Anyone),
        "/v1/revocations" if post => ("revocations", Operator(Admin)),
        "/v1/revocations" if get => ("revocations", Operator(Viewer)),
        "/v1/revocations" => ("revocations", Anyone),
        "/v1/snapshots/watch" => ("watch", Workload),
        _ if prefix("/v1/registrations") => ("registrations", Workload),
        "/v1/acks" => ("acks", Workload),
        "/v1/flows" if get => ("flows", Operator(Viewer)),
        "/v1/flows" => ("flows", Workload),
        "/v1/policies" if post => ("policies", Operator(Policy)),
        "/v1/policies/impact" if post => ("policies", Operator(Viewer)),
        _ if prefix("/v1/policies") && get => ("policies", Operator(Viewer)),
        _ if prefix("/v1/policies") => ("policies", Anyone),
        "/v1/directory" if get => ("directory", Operator(Viewer)),
        _ if prefix("/v1/directory/") && delete => ("directory", Operator(Admin)),
        _ if prefix("/v1/directory") => ("directory", Anyone),
        "/v1/fleet" if get => ("fleet", Operator(Viewer)),
        "/v1/fleet" => ("fleet", Anyone),
        "/v1/audit" if get => ("audit", Operator(Viewer)),
        "/v1/audit" => ("audit", Anyone),
        "/v1/reports" if post => ("reports", Operator(Viewer)),
        "/v1/reports" => ("reports", Anyone),
        "/v1/verifications" if post => ("verifications", Operator(Policy)),
        _ if prefix("/v1/verifications/") && get => ("verifications", Operator(Viewer)),
        _ if prefix("/v1/verifications") => ("verifications", Anyone),
        "/v1/probes" if post => ("probes", Workload),
        "/v1/probes" => ("probes", Anyone),
        "/v1/ca" if get => ("ca", Operator(Viewer)),
        "/v1/ca/rotation" if post => ("ca", Operator(Admin)),
        "/v1/ca" | "/v1/ca/rotation" => ("ca", Anyone),
        _ => ("other", Anyone),
    }
}

/// An operator whose role is at least `needed`, or why not.
fn authorize(
    api: &Api,
    peer: &Peer,
    needed: Role,
    method: &Method,
    path: &str,
) -> Result<(), ApiError> {
    let operator = require_operator(api, peer)?;
    let role = peer.role.unwrap_or(Role::Viewer);
    if role >= needed {
        return Ok(());
    }
    let has = match peer.role {
        Some(role) => format!("has the {role} role"),
        None => "carries no role (issued before roles): it may only read".to_owned(),
    };
    Err(ApiError::forbidden(
        "role_insufficient",
        format!(
            "{operator} {has}; {method} {path} needs {needed}; an admin can issue a credential with `sidewall operator issue NAME --role {needed}`"
        ),
    ))
}

/// Where operators' identities live in the trust domain.
pub(crate) const OPERATOR_PATH: &str = "/sidewall/operator/";

pub(crate) fn require_operator(api: &Api, peer: &Peer) -> Result<String, ApiError> {
    let Some(svid) = &peer.svid else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "operator_credential_required",
            "this route needs an operator certificate (mTLS)",
        ));
    };
    let prefix = format!("spiffe://{}{OPERATOR_PATH}", api.ca().trust_domain());
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
