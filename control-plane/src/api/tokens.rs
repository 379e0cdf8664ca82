//! Join tokens: create, list (never the secret) and revoke.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::SpiffeId;
use sidewall_policies::wire::operator::{
    TokenCreated, TokenRequest, TokenRevoked, TokenRow, TokenState, Tokens,
};

use super::{
    Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, require_operator,
    unix_rfc3339,
};
use crate::attestation::{JoinToken, workload_identity};
use crate::audit::AuditEvent;

/// `POST /v1/tokens`: a join token for one workload identity, shown once.
pub(super) async fn create_token(
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
    if identity.trust_domain_name() != api.ca().trust_domain().as_str() {
        return Err(ApiError::bad_request(
            "foreign_trust_domain",
            format!(
                "{identity} is not in trust domain {}",
                api.ca().trust_domain()
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
    let token = JoinToken::generate(&api.ca().token_root_fingerprint());
    let record = token.record(&identity, ttl, uses, now_unix(), &operator);
    let expires_at = record.expires_at;
    api.store.put_token(record).await?;
    metrics::counter!(crate::metric::TOKENS_CREATED).increment(1);
    tracing::info!(token = %token.id, %identity, uses, operator, "join token created");
    api.audit(
        AuditEvent::new(operator, "token.created", token.id.to_string())
            .with("identity", &identity)
            .with("uses", uses)
            .with("expires_at", unix_rfc3339(expires_at)),
    )
    .await;
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

/// `GET /v1/tokens`: every token with its state, never the secret.
pub(super) async fn list_tokens(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
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

/// `DELETE /v1/tokens/{id}`.
pub(super) async fn revoke_token(
    api: &Api,
    peer: &Peer,
    id: &str,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    if api.store.revoke_token(id, now_unix()).await? {
        tracing::info!(token = id, operator, "join token revoked");
        api.audit(AuditEvent::new(operator, "token.revoked", id))
            .await;
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
