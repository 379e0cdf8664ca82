//! The audit trail, read: `GET /v1/audit` ([`crate::audit`]).

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::wire::operator::AuditPage;

use super::{Api, ApiError, HttpResponse, Peer, json_response, require_operator};

/// Records per page at most (and by default).
pub(crate) const PAGE: usize = 1000;

/// `GET /v1/audit[?after=N][&limit=M]`: records numbered above `after`, oldest first, in the
/// order the store holds them (verification is the reader's: `sidewall audit verify`).
pub(super) async fn list(
    api: &Api,
    peer: &Peer,
    request: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let (mut after, mut limit) = (0u64, PAGE);
    for pair in request.uri().query().unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |why: &str| {
            ApiError::bad_request(
                "invalid_query",
                format!("{pair:?}: {why}; the query takes after=N and limit=1..{PAGE}"),
            )
        };
        match name {
            "" => {}
            "after" => after = value.parse().map_err(|_| bad("not a record number"))?,
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=PAGE).contains(n))
                    .ok_or_else(|| bad("out of range"))?;
            }
            _ => return Err(bad("unknown parameter")),
        }
    }
    let mut records = api.store.audit_records(after, limit + 1).await?;
    let next = (records.len() > limit).then(|| {
        records.truncate(limit);
        records.last().map_or(after, |(key, _)| *key)
    });
    let records = records.into_iter().map(|(_, record)| record).collect();
    Ok(json_response(StatusCode::OK, &AuditPage { records, next }))
}
