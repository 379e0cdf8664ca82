//! Operator credentials: issued with a role, listed, revoked. Which role each route needs is
//! decided before the route runs ([`super::route`]); these routes need `admin`.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::SpiffeId;
use sidewall_policies::wire::operator::{
    OperatorRequest, OperatorRevoked, OperatorRow, OperatorState, Operators, RevocationKind,
};

use super::identity::{certificate_response, issue as issue_certificate};
use super::{
    Api, ApiError, HttpResponse, OPERATOR_PATH, Peer, json_response, now_unix, read_json,
    require_operator, unix_rfc3339,
};
use crate::audit::AuditEvent;
use crate::ca::csr;
use crate::store::RevocationRecord;

/// `spiffe://<td>/sidewall/operator/<name>`, when `name` is one path segment.
fn operator_identity(api: &Api, name: &str) -> Result<SpiffeId, ApiError> {
    api.ca()
        .trust_domain()
        .id(&format!("{OPERATOR_PATH}{name}"))
        .ok()
        .filter(|_| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_name",
                format!("operator name {name:?} must be one segment of a-z A-Z 0-9 . _ -"),
            )
        })
}

/// `POST /v1/operators`: a credential with a role for a new operator.
pub(super) async fn issue(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let body: OperatorRequest = read_json(api, request).await?;
    let identity = operator_identity(api, &body.name)?;
    let key = csr::parse(&body.csr)?;
    if api.distribution.is_identity_revoked(&identity) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "name_revoked",
            format!(
                "operator {} was revoked: no certificate of {identity} is accepted again; choose another name",
                body.name
            ),
        ));
    }
    let issued = issue_certificate(
        api,
        &identity,
        &key,
        api.config.operator_lifetime,
        &format!("operator:{operator}"),
        Some(body.role),
    )
    .await?;
    tracing::info!(%identity, role = %body.role, serial = %issued.serial, by = operator, "operator credential issued");
    api.audit(
        AuditEvent::new(operator, "operator.issued", identity.as_str())
            .with("role", body.role)
            .with("serial", &issued.serial),
    )
    .await;
    Ok(certificate_response(api, &issued))
}

/// `GET /v1/operators[?all=true]`: operator certificates, those expired only with `all`.
pub(super) async fn list(
    api: &Api,
    peer: &Peer,
    request: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let all = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair == "all=true"));
    let prefix = format!("spiffe://{}{OPERATOR_PATH}", api.ca().trust_domain());
    let now = now_unix();
    let mut rows: Vec<(i64, OperatorRow)> = Vec::new();
    for record in api.store.certificates().await? {
        let Some(name) = record.identity.strip_prefix(&prefix) else {
            continue;
        };
        let revoked = SpiffeId::parse(&record.identity)
            .is_ok_and(|id| api.distribution.is_revoked(&id, &record.serial));
        let state = match (revoked, record.not_after <= now) {
            (true, _) => OperatorState::Revoked,
            (false, true) => OperatorState::Expired,
            (false, false) => OperatorState::Active,
        };
        if state == OperatorState::Expired && !all {
            continue;
        }
        let row = OperatorRow {
            name: name.to_owned(),
            identity: record.identity.clone(),
            role: record.role,
            serial: record.serial,
            state,
            issued_at: unix_rfc3339(record.issued_at),
            expires_at: unix_rfc3339(record.not_after),
            issued_by: record.authenticated_by,
        };
        rows.push((record.issued_at, row));
    }
    rows.sort_by(|(a_at, a), (b_at, b)| a.name.cmp(&b.name).then(a_at.cmp(b_at)));
    let operators = rows.into_iter().map(|(_, row)| row).collect();
    Ok(json_response(StatusCode::OK, &Operators { operators }))
}

/// `DELETE /v1/operators/{name}`: revokes the operator's identity, so every certificate of it
/// is refused from the next request on. An operator cannot revoke itself (it would lock
/// itself out halfway through), and a name never issued is not found.
pub(super) async fn revoke(api: &Api, peer: &Peer, name: &str) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let identity = operator_identity(api, name)?;
    if identity.as_str() == operator {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "self_revocation",
            format!(
                "{operator} cannot revoke its own credential; another admin can, with `sidewall operator revoke {name}`"
            ),
        ));
    }
    let now = now_unix();
    let certificates: Vec<_> = api
        .store
        .certificates()
        .await?
        .into_iter()
        .filter(|c| c.identity == identity.as_str())
        .collect();
    if certificates.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "operator_not_found",
            format!("no operator {name} was ever issued a credential here"),
        ));
    }
    let live = certificates.iter().filter(|c| c.not_after > now).count();
    api.store
        .put_revocation(RevocationRecord {
            kind: RevocationKind::Identity,
            value: identity.to_string(),
            at: now,
            by: operator.clone(),
        })
        .await?;
    api.settle().await;
    tracing::warn!(%identity, certificates = live, operator, "operator revoked");
    api.audit(
        AuditEvent::new(operator, "operator.revoked", identity.as_str())
            .with("live_certificates", live),
    )
    .await;
    Ok(json_response(
        StatusCode::OK,
        &OperatorRevoked {
            identity: identity.to_string(),
            certificates: live,
        },
    ))
}
