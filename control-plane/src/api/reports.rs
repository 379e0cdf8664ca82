//! `POST /v1/reports`: a segmentation report, signed ([`crate::report`]).

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::wire::report::{ReportRequest, SignedReport};

use super::{
    Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, require_operator,
};
use crate::audit::AuditEvent;

/// The longest period a report covers: about ten years.
const MAX_PERIOD_SECONDS: i64 = 3660 * 86_400;

/// Builds the report over `[since, now]`, signs its JSON with the control plane's key and
/// records that it did in the audit trail (with the report's SHA-256).
pub(super) async fn create(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let body: ReportRequest = read_json(api, request).await?;
    let now = now_unix();
    if body.since > now || body.since < now - MAX_PERIOD_SECONDS {
        return Err(ApiError::bad_request(
            "invalid_period",
            format!(
                "since {} is not within the last 3660 days (Unix seconds, not in the future)",
                body.since
            ),
        ));
    }
    let _one_at_a_time = api.reports.lock().await;
    let report = crate::report::build(api, &operator, body.since, now_unix()).await?;
    let text = serde_json::to_string_pretty(&report).map_err(|e| internal(&e.to_string()))?;
    let (signature, chain) = crate::audit::sign(&api.certificate.current(), text.as_bytes())
        .map_err(|e| internal(&e))?;
    let sha256 = crate::random::sha256_hex(text.as_bytes());
    api.audit(
        AuditEvent::new(&operator, crate::audit::REPORT_SIGNED, &sha256)
            .with("since", &report.since)
            .with("until", &report.until),
    )
    .await;
    metrics::counter!(crate::metric::REPORTS_SIGNED).increment(1);
    api.distribution.set_latest_report(&report);
    Ok(json_response(
        StatusCode::OK,
        &SignedReport {
            report: text,
            signature: crate::random::hex(&signature),
            chain,
        },
    ))
}

fn internal(error: &str) -> ApiError {
    // Nothing a caller sends leads here: the key or the serializer failed.
    tracing::error!(%error, "the report could not be signed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the report could not be signed; the control plane's log says why",
    )
}
