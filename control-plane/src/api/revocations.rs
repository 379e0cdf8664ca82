//! Revocations of a workload identity or of one certificate, and their list.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::SpiffeId;
use sidewall_policies::wire::operator::{
    RevocationKind, RevocationRequest, RevocationRow, Revocations, Revoked,
};

use super::{
    Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, require_operator,
    unix_rfc3339,
};
use crate::store::RevocationRecord;

/// `POST /v1/revocations`: an identity (every certificate of it) or one certificate by serial.
pub(super) async fn revoke(
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
    // An operator revoking its own credential would lock itself out halfway through.
    if let Some(svid) = &peer.svid
        && match kind {
            RevocationKind::Identity => value == svid.id.as_str(),
            RevocationKind::Serial => value == svid.serial.trim_start_matches('0'),
        }
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "self_revocation",
            format!("{operator} cannot revoke its own credential; another admin can"),
        ));
    }
    api.store
        .put_revocation(RevocationRecord {
            kind,
            value: value.clone(),
            at: now_unix(),
            by: operator.clone(),
        })
        .await?;
    api.settle().await;
    tracing::warn!(kind = kind.as_str(), value, operator, "revoked");
    api.audit(
        crate::audit::AuditEvent::new(operator, "revocation.added", &value)
            .with("kind", kind.as_str()),
    )
    .await;
    Ok(json_response(StatusCode::OK, &Revoked { kind, value }))
}

/// `GET /v1/revocations`.
pub(super) async fn list_revocations(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
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
