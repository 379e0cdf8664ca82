//! The routes sidecars use with their own certificate: register, watch snapshots, ack,
//! report flows.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use sidewall_policies::SpiffeId;
use sidewall_policies::wire::operator::{Deregistered, FlowRow, Flows};
use sidewall_policies::wire::{self, AckStatus, valid_instance};
use tokio::sync::mpsc;

use super::{Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json};
use crate::attestation::workload_identity;
use crate::distribution::{ClaimRefused, FlowKey, FlowStats};
use crate::store::{RegistrationRecord, StoreError};

/// How often an idle watch stream sends a keep-alive line, unless the sidecar asks for another
/// interval (`&keepalive=SECONDS`, 1 to 60): it takes the stream for dead after three missed,
/// and answers each with an ack, so that the fleet view shows it stale when nothing comes back.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The workload identity of the caller, or why it may not use these routes (not a workload,
/// or revoked: its identity or its certificate's serial).
fn workload(api: &Api, peer: &Peer) -> Result<SpiffeId, ApiError> {
    let svid = peer.svid.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "workload_credential_required",
            "this route needs the workload's certificate (mTLS)",
        )
    })?;
    workload_identity(&svid.id).map_err(|why| ApiError::forbidden("not_a_workload", why))?;
    if api.distribution.is_revoked(&svid.id, &svid.serial) {
        return Err(ApiError::forbidden(
            "revoked",
            format!("{} (serial {}) is revoked", svid.id, svid.serial),
        ));
    }
    Ok(svid.id.clone())
}

/// Binds `instance` to the caller, or refuses an instance id another identity uses, or a new
/// one past `limits.instancesPerIdentity` live sidecars.
fn claim(api: &Api, instance: &str, identity: &SpiffeId) -> Result<(), ApiError> {
    api.distribution
        .claim(instance, identity)
        .map_err(|refused| match refused {
            ClaimRefused::Taken(_) => ApiError::new(
                StatusCode::CONFLICT,
                "instance_taken",
                format!("instance {instance} belongs to another workload; use an id of your own"),
            ),
            ClaimRefused::Full(limit) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "instances_exceeded",
                format!("{identity} already has {limit} sidecars connected (limits.instancesPerIdentity)"),
            ),
        })
}

/// The caller's workload identity, once `instance` is checked and claimed for it (what a
/// registration and an ack start with).
pub(super) fn claimed(api: &Api, peer: &Peer, instance: &str) -> Result<SpiffeId, ApiError> {
    let identity = workload(api, peer)?;
    if !valid_instance(instance) {
        return Err(ApiError::bad_request(
            "instance_invalid",
            "instance must be 1-64 of a-z A-Z 0-9 -",
        ));
    }
    claim(api, instance, &identity)?;
    Ok(identity)
}

/// Counts and answers a registration past one of `limit`'s caps.
fn over_limit(identity: &SpiffeId, limit: &'static str, message: String) -> ApiError {
    metrics::counter!(crate::metric::IDENTITY_LIMIT, "limit" => limit).increment(1);
    tracing::warn!(%identity, limit, "registration refused: {message}");
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        if limit == "registrations" {
            "registrations_exceeded"
        } else {
            "addresses_exceeded"
        },
        message,
    )
}

/// A body fed by a channel: one frame per snapshot line.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn query_value<'a>(request: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// `GET /v1/snapshots/watch?instance=ID`: newline-delimited JSON snapshots for the caller's
/// workload, one whenever its content changes, keep-alive blank lines in between.
pub(super) fn watch(
    api: &Arc<Api>,
    peer: &Peer,
    request: &Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let identity = workload(api, peer)?;
    let instance = query_value(request, "instance")
        .filter(|i| valid_instance(i))
        .ok_or_else(|| {
            ApiError::bad_request(
                "instance_missing",
                "give ?instance=<id> (1-64 of a-z A-Z 0-9 -)",
            )
        })?
        .to_owned();
    claim(api, &instance, &identity)?;
    let keepalive = query_value(request, "keepalive")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| (1..=60).contains(s))
        .map_or(KEEPALIVE, Duration::from_secs);
    let distribution = api.distribution.clone();
    let (sender, receiver) = mpsc::channel::<Bytes>(4);
    let mut changes = distribution.subscribe();
    let (number, mut replaced) = distribution.open_watch(&instance);
    distribution.fleet_update(&instance, |entry| {
        entry.identity = identity.to_string();
        entry.connected = true;
        entry.since = now_unix();
        entry.replica = distribution.replica().to_owned();
        entry.keepalive = Some(keepalive.as_secs());
    });
    tracing::info!(%identity, instance, "snapshot watch opened");
    let mut closing = distribution.closing();
    let mut probes = distribution.subscribe_probes();
    // Orders queued before this watch opened (a sidecar that reconnected) are sent at once.
    probes.mark_changed();
    let api = api.clone();
    tokio::spawn(async move {
        let mut last_hash = None;
        loop {
            let generation = *changes.borrow_and_update();
            let (snapshot, hash) = distribution.snapshot_for(&identity);
            if last_hash != Some(hash) {
                let counter = snapshot.version.counter;
                let mut line = snapshot.to_json();
                line.push(b'\n');
                if sender.send(Bytes::from(line)).await.is_err() {
                    break;
                }
                last_hash = Some(hash);
                distribution.fleet_update(&instance, |entry| entry.sent = Some(counter));
            }
            distribution.fleet_update(&instance, |entry| entry.processed = generation);
            tokio::select! {
                _ = closing.changed() => break,
                _ = &mut replaced => {
                    tracing::info!(%identity, instance, "snapshot watch replaced by a newer one of the same instance");
                    break;
                }
                changed = changes.changed() => if changed.is_err() { break },
                changed = probes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // Probes for this sidecar (`sidewall verify segmentation`): a line of its own.
                    if let Some(order) = distribution.take_probes(&instance) {
                        let Ok(mut line) = serde_json::to_vec(&order) else { continue };
                        line.push(b'\n');
                        if sender.send(Bytes::from(line)).await.is_err() {
                            break;
                        }
                    }
                }
                () = tokio::time::sleep(keepalive) => {
                    if sender.send(Bytes::from_static(b"\n")).await.is_err() {
                        break;
                    }
                }
            }
        }
        if !distribution.close_watch(&instance, number) {
            return;
        }
        let closed_at = now_unix();
        distribution.fleet_update(&instance, |entry| {
            entry.connected = false;
            entry.since = closed_at;
        });
        tracing::info!(%identity, instance, "snapshot watch closed");
        expire_after_lease(&api, &identity, &instance, closed_at).await;
    });
    let mut response = Response::new(ChannelBody(receiver).boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// `POST /v1/registrations`: the endpoint a sidecar advertises and the ports it serves.
pub(super) async fn register(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    // The body first: an answer sent before an HTTP/1.1 body is read can reach the client
    // as a connection reset instead of the answer.
    let body: wire::Registration = read_json(api, request).await?;
    let identity = claimed(api, peer, &body.instance)?;
    let endpoint = checked_endpoint(peer, &body)?;
    let registrations = api.store.registrations().await?;
    within_limits(api, &identity, &endpoint, &body.addresses, &registrations)?;
    let refused = api
        .distribution
        .refuse_addresses(&identity, &body.addresses, &registrations);
    let record = RegistrationRecord {
        instance: body.instance.clone(),
        identity: identity.to_string(),
        endpoint: endpoint.to_string(),
        ports: body.ports,
        addresses: body.addresses,
        registered_at: now_unix(),
    };
    if let Err(holder) = api.store.put_registration(record).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "endpoint_taken",
            format!("endpoint {endpoint} is registered to {holder}"),
        ));
    }
    api.settle().await;
    api.distribution.fleet_update(&body.instance, |entry| {
        entry.identity = identity.to_string();
        entry.endpoint = Some(endpoint.to_string());
        entry.addresses_refused = refused.clone();
    });
    tracing::info!(%identity, %endpoint, instance = body.instance, "registered");
    Ok(json_response(
        StatusCode::OK,
        &wire::Registered {
            endpoint: endpoint.to_string(),
            addresses_refused: refused,
        },
    ))
}

/// The registration's endpoint, ports and addresses checked: well formed, and the endpoint
/// the address the connection comes from.
fn checked_endpoint(
    peer: &Peer,
    body: &wire::Registration,
) -> Result<std::net::SocketAddr, ApiError> {
    let endpoint: std::net::SocketAddr = body.endpoint.parse().map_err(|_| {
        ApiError::bad_request(
            "endpoint_invalid",
            format!("endpoint {:?} must be IP:port", body.endpoint),
        )
    })?;
    // A sidecar may only advertise the address it connects from: it cannot claim another
    // machine's address to capture its traffic. Compared canonically: on a dual-stack listener
    // an IPv4 client is `::ffff:a.b.c.d`.
    if let Some(remote) = peer.remote
        && remote.ip().to_canonical() != endpoint.ip().to_canonical()
    {
        return Err(ApiError::forbidden(
            "endpoint_not_yours",
            format!(
                "endpoint {endpoint} is not the address this connection comes from ({})",
                remote.ip()
            ),
        ));
    }
    if body.ports.iter().any(|p| p.port == 0)
        || body.ports.len() > 1024
        || body.addresses.len() > 64
    {
        return Err(ApiError::bad_request(
            "ports_invalid",
            "ports must be 1-65535, at most 1024 of them and 64 addresses",
        ));
    }
    for address in &body.addresses {
        if address.parse::<std::net::SocketAddr>().is_err() {
            return Err(ApiError::bad_request(
                "address_invalid",
                format!("address {address:?} must be IP:port"),
            ));
        }
    }
    Ok(endpoint)
}

/// What one identity may hold (review M4), with this registration.
fn within_limits(
    api: &Api,
    identity: &SpiffeId,
    endpoint: &std::net::SocketAddr,
    new_addresses: &[String],
    registrations: &[RegistrationRecord],
) -> Result<(), ApiError> {
    // An extra address (a virtual IP) is registered as given, and callers are sent there only
    // while an operator declares it for this identity and it is no other service's endpoint
    // (checked again whenever the directory is assembled); what is not is answered, counted
    // and shown in the fleet view.
    // As many registrations as sidecars, and a few distinct addresses over all of them. This
    // registration replaces one at its endpoint.
    let endpoint_text = endpoint.to_string();
    let others: Vec<&RegistrationRecord> = registrations
        .iter()
        .filter(|r| r.identity == identity.as_str() && r.endpoint != endpoint_text)
        .collect();
    let limits = api.distribution.limits();
    if others.len() >= limits.instances {
        return Err(over_limit(
            identity,
            "registrations",
            format!(
                "{identity} already has {} registrations (limits.instancesPerIdentity)",
                others.len()
            ),
        ));
    }
    let addresses: std::collections::HashSet<&str> = others
        .iter()
        .flat_map(|r| r.addresses.iter())
        .chain(new_addresses)
        .map(String::as_str)
        .collect();
    if addresses.len() > limits.addresses {
        return Err(over_limit(
            identity,
            "addresses",
            format!(
                "{identity} would register {} distinct addresses, more than {} (limits.addressesPerIdentity)",
                addresses.len(),
                limits.addresses
            ),
        ));
    }
    Ok(())
}

/// `DELETE /v1/registrations/{instance}`: a sidecar shutting down.
pub(super) async fn deregister(
    api: &Api,
    peer: &Peer,
    instance: &str,
) -> Result<HttpResponse, ApiError> {
    let identity = workload(api, peer)?;
    let mine = api
        .store
        .registrations()
        .await?
        .into_iter()
        .any(|r| r.instance == instance && r.identity == identity.as_str());
    if !mine {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "registration_not_found",
            format!("no registration {instance} for {identity}"),
        ));
    }
    api.store.remove_registration(&identity, instance).await?;
    api.settle().await;
    Ok(json_response(
        StatusCode::OK,
        &Deregistered {
            removed: instance.to_owned(),
            identities: Vec::new(),
        },
    ))
}

/// A registration is a lease on its sidecar's watch (review H9): `registrations.lease` after
/// the watch of `instance` closed, its registration is removed, unless the instance watches
/// again on this replica or registered again since (on any replica: a sidecar registers at
/// the start of every session). Its endpoint is then free for another workload.
async fn expire_after_lease(api: &Api, identity: &SpiffeId, instance: &str, closed_at: i64) {
    if !lease_ends(api).await || api.distribution.watching(instance) {
        return;
    }
    expire(api, "watch_closed", |r| {
        r.instance == instance && r.identity == identity.as_str() && r.registered_at <= closed_at
    })
    .await;
}

/// Registrations found in the embedded store at start: their sidecars re-register when they
/// reconnect; those that have not within `registrations.lease` are gone (stopped while the
/// control plane was down) and are removed. Not with a replicated store, where other replicas
/// may hold their watches.
pub(crate) async fn expire_unclaimed(api: Arc<Api>, started: i64) {
    if api.store.replicated() {
        return;
    }
    if !lease_ends(&api).await {
        return;
    }
    expire(&api, "not_renewed_after_start", |r| {
        r.registered_at <= started && !api.distribution.watching(&r.instance)
    })
    .await;
}

/// Waits out `registrations.lease`; false when the control plane stops first (the lease
/// does not end with it: the registration is kept for the next start to judge).
async fn lease_ends(api: &Api) -> bool {
    let mut closing = api.distribution.closing();
    if *closing.borrow_and_update() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(api.config.registration_lease) => true,
        _ = closing.changed() => false,
    }
}

async fn expire(api: &Api, reason: &'static str, stale: impl Fn(&RegistrationRecord) -> bool) {
    let registrations = match api.store.registrations().await {
        Ok(registrations) => registrations,
        Err(error) => {
            tracing::warn!(%error, "cannot read registrations to expire them; kept");
            return;
        }
    };
    let mut removed = false;
    for record in registrations.iter().filter(|r| stale(r)) {
        let Ok(identity) = SpiffeId::parse(&record.identity) else {
            continue;
        };
        if let Err(error) = api
            .store
            .remove_registration(&identity, &record.instance)
            .await
        {
            tracing::warn!(%error, instance = record.instance, "cannot remove an expired registration");
            continue;
        }
        removed = true;
        metrics::counter!(crate::metric::REGISTRATIONS_EXPIRED, "reason" => reason).increment(1);
        tracing::info!(
            identity = record.identity,
            instance = record.instance,
            endpoint = record.endpoint,
            reason,
            "registration expired: its sidecar stopped watching"
        );
    }
    if removed {
        api.settle().await;
    }
}

/// `DELETE /v1/directory/{instance}` (operators): removes a sidecar's registration whatever
/// its identity, e.g. one left by a machine that is gone for good.
pub(super) async fn remove(
    api: &Api,
    peer: &Peer,
    instance: &str,
) -> Result<HttpResponse, ApiError> {
    let operator = super::require_operator(api, peer)?;
    let held: Vec<RegistrationRecord> = api
        .store
        .registrations()
        .await?
        .into_iter()
        .filter(|r| r.instance == instance)
        .collect();
    if held.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "registration_not_found",
            format!("no registration with instance {instance:?} (see `sidewall workload list`)"),
        ));
    }
    let mut identities = Vec::new();
    for record in &held {
        let identity = SpiffeId::parse(&record.identity)
            .map_err(|e| StoreError::corrupt(format!("registration {instance}"), e))?;
        api.store.remove_registration(&identity, instance).await?;
        tracing::warn!(%operator, identity = record.identity, instance, endpoint = record.endpoint, "registration removed by an operator");
        api.audit(
            crate::audit::AuditEvent::new(&operator, "registration.removed", &record.identity)
                .with("instance", instance)
                .with("endpoint", &record.endpoint),
        )
        .await;
        identities.push(record.identity.clone());
    }
    api.settle().await;
    Ok(json_response(
        StatusCode::OK,
        &Deregistered {
            removed: instance.to_owned(),
            identities,
        },
    ))
}

/// `POST /v1/acks`: the version a sidecar applied, or why it rejected one.
pub(super) async fn ack(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    // The body first, as for registrations.
    let body: wire::Ack = read_json(api, request).await?;
    let identity = claimed(api, peer, &body.instance)?;
    // The ack drives the rollout: facts out of bounds are left out, not the ack.
    let mut sidecar = body.sidecar;
    if let Some(why) = sidecar.as_ref().and_then(wire::SidecarFacts::invalid) {
        metrics::counter!(crate::metric::REFUSALS, "route" => "acks", "reason" => "sidecar_facts_invalid").increment(1);
        tracing::warn!(%identity, instance = body.instance, why, "the sidecar facts of an ack are left out");
        sidecar = None;
    }
    // Likewise a certificate serial that is not lowercase hex of at most 20 bytes.
    let serial = body.certificate_serial.filter(|serial| {
        let valid = !serial.is_empty()
            && serial.len() <= 40
            && serial
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            metrics::counter!(crate::metric::REFUSALS, "route" => "acks", "reason" => "certificate_serial_invalid").increment(1);
            tracing::warn!(%identity, instance = body.instance, "the certificate serial of an ack is left out: not lowercase hex of at most 40 digits");
        }
        valid
    });
    let rejection = match body.status {
        AckStatus::Unknown => {
            return Err(ApiError::bad_request(
                "status_invalid",
                "status must be applied or rejected",
            ));
        }
        AckStatus::Applied => None,
        AckStatus::Rejected => Some(
            body.reason
                .unwrap_or_else(|| "no reason given".into())
                .chars()
                .take(500)
                .collect(),
        ),
    };
    if let Some(reason) = &rejection {
        tracing::warn!(%identity, instance = body.instance, version = %body.version, reason, "snapshot rejected by a sidecar");
    }
    api.distribution.ack(
        &body.instance,
        &identity,
        body.version.counter,
        rejection,
        (body.certificate_expires_at, serial),
        sidecar,
    );
    Ok(json_response(StatusCode::OK, &json!({"ok": true})))
}

/// `POST /v1/flows`: decision counts a sidecar observed (for `policy impact`).
pub(super) async fn flows(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    // The body first, as for registrations.
    let body: wire::FlowReport = read_json(api, request).await?;
    let identity = workload(api, peer)?;
    if body.flows.len() > 10_000 || body.refusals.len() > 10_000 || body.outbound.len() > 10_000 {
        return Err(ApiError::bad_request(
            "too_many_flows",
            "at most 10000 flows, 10000 refusals and 10000 outbound refusals per report",
        ));
    }
    let flows = body
        .flows
        .into_iter()
        .filter_map(wire::FlowRecord::sanitized)
        .map(|f| {
            (
                FlowKey {
                    peer: f.peer,
                    target: identity.to_string(),
                    port: f.port,
                    protocol: f.protocol,
                    method: f.method,
                    path: f.path,
                },
                FlowStats {
                    count: f.count,
                    allow: f.allow,
                    deny: f.deny,
                    audit: f.audit,
                    last_denial: f.last_denial,
                    last_seen: 0,
                },
            )
        })
        .collect();
    api.distribution.report_flows(flows);
    let refusals: Vec<_> = body
        .refusals
        .into_iter()
        .filter(|r| {
            r.reason != wire::RefusalReason::Other && r.source.len() <= wire::MAX_REFUSAL_SOURCE
        })
        .collect();
    api.distribution.report_refusals(&identity, &refusals);
    api.distribution
        .report_transport(identity.as_str(), &body.tls, &body.plaintext);
    let outbound: Vec<_> = body
        .outbound
        .into_iter()
        .filter(|r| {
            r.reason != wire::OutboundReason::Other && r.target.len() <= wire::MAX_REFUSAL_SOURCE
        })
        .collect();
    api.distribution
        .report_outbound(identity.as_str(), &outbound);
    Ok(json_response(StatusCode::OK, &json!({"ok": true})))
}

/// `GET /v1/flows` (operator): every observed flow with its counts by outcome.
pub(super) async fn list_flows(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    super::require_operator(api, peer)?;
    let flows = api
        .distribution
        .flows()
        .into_iter()
        .map(|(flow, stats)| FlowRow { flow, stats })
        .collect();
    Ok(json_response(StatusCode::OK, &Flows { flows }))
}
