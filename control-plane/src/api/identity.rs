//! Certificates: the trust bundle, and workload certificates from CSRs (a join token on first
//! contact, the current certificate for a renewal).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::Svid;
use sidewall_policies::wire;
use sidewall_policies::wire::operator::{RevocationKind, Role};

use super::{Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, rfc3339};
use crate::attestation::kubernetes::ServiceAccountError;
use crate::attestation::{JoinToken, TokenError, workload_identity};
use crate::ca::{Issued, csr};
use crate::store::Redemption;

/// `GET /v1/trust-bundle`: the roots, PEM (no client certificate needed).
pub(super) fn trust_bundle(api: &Api) -> HttpResponse {
    let mut response = Response::new(
        Full::new(Bytes::from(api.ca().trust_bundle_pem().to_owned())).boxed_unsync(),
    );
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    response
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

/// `POST /v1/certificates`: a workload certificate from a CSR, after a join token (first
/// contact) or the current certificate (renewal).
pub(super) async fn certificates(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body: wire::CertificateRequest = read_json(api, request).await?;
    // The CSR is checked before a token is spent: a bad request consumes nothing.
    let key = csr::parse(&body.csr)?;
    let key_sha256 = crate::random::sha256_hex(&key.spki);
    let now = now_unix();
    if body.token.is_some() && body.service_account_token.is_some() {
        return Err(ApiError::bad_request(
            "attestation_ambiguous",
            "give a join token or a service-account token, not both",
        ));
    }
    if let Some(jwt) = &body.service_account_token {
        let kubernetes = api
            .kubernetes
            .as_ref()
            .ok_or(ServiceAccountError::NotConfigured)?;
        let attested = kubernetes.attest(jwt, body.pod.as_deref())?;
        kubernetes.review(jwt, &attested).await?;
        let identity = attested.identity;
        allowed(api, &identity, peer.svid.as_ref(), "service-account token").await?;
        let issued = issue(
            api,
            &identity,
            &key,
            api.config.workload_lifetime,
            &format!(
                "serviceaccount:{}/{}{}",
                attested.namespace,
                attested.service_account,
                attested
                    .pod
                    .map(|p| format!(" pod:{p}"))
                    .unwrap_or_default()
            ),
            None,
        )
        .await?;
        tracing::info!(identity = %identity, serial = %issued.serial, key = key.kind, "certificate issued for a service-account token");
        return Ok(certificate_response(api, &issued));
    }
    let (identity, authenticated_by) = match (&body.token, &peer.svid) {
        (Some(text), presented) => {
            let token = JoinToken::parse(text)?;
            // A token pins the root in force when it was made; a retired root is refused.
            if !api.ca().trusts_root(&token.ca_fingerprint) {
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
            allowed(api, &identity, presented.as_ref(), "token").await?;
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
        &key,
        api.config.workload_lifetime,
        &authenticated_by,
        None,
    )
    .await?;
    tracing::info!(identity = %identity, serial = %issued.serial, key = key.kind, authenticated_by, "certificate issued");
    Ok(certificate_response(api, &issued))
}

/// Whether `identity`, attested by a `what` (and the certificate `presented` alongside, if
/// any), may get a certificate: the certificate is for the same identity, neither is revoked
/// (a token made before the revocation yields nothing), and the issuance rate allows it.
async fn allowed(
    api: &Api,
    identity: &SpiffeId,
    presented: Option<&Svid>,
    what: &str,
) -> Result<(), ApiError> {
    if let Some(svid) = presented
        && svid.id != *identity
    {
        return Err(ApiError::forbidden(
            "identity_mismatch",
            format!(
                "the {what} is for {identity} but the client certificate is for {}",
                svid.id
            ),
        ));
    }
    if is_revoked(api, identity, presented.map(|s| s.serial.as_str())).await? {
        return Err(ApiError::forbidden(
            "revoked",
            format!("{identity} is revoked; no {what} yields a certificate for it"),
        ));
    }
    limit(api, identity)
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

pub(super) async fn issue(
    api: &Api,
    identity: &SpiffeId,
    key: &crate::ca::csr::RequestedKey,
    lifetime: Duration,
    authenticated_by: &str,
    role: Option<Role>,
) -> Result<Issued, ApiError> {
    let ca = api.ca();
    let issued = match role {
        Some(role) => ca.issue_operator(identity, &key.spki, lifetime, role),
        None => ca.issue(identity, &key.spki, lifetime),
    };
    let issued = issued.map_err(|e| {
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
        .put_certificate(issued.record(authenticated_by, role, key.kind, &ca.root_fingerprint()))
        .await?;
    let kind = if role.is_some() {
        "operator"
    } else {
        "workload"
    };
    metrics::counter!(crate::metric::CERTIFICATES_ISSUED, "kind" => kind).increment(1);
    Ok(issued)
}

pub(super) fn certificate_response(api: &Api, issued: &Issued) -> HttpResponse {
    let body = wire::Certificate {
        certificate_chain: issued.chain_pem.clone(),
        trust_bundle: api.ca().trust_bundle_pem().to_owned(),
        expires_at: rfc3339(issued.not_after),
        identity: issued.identity.to_string(),
        serial: issued.serial.clone(),
    };
    json_response(StatusCode::OK, &body)
}
