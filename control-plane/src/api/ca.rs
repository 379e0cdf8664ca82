//! `GET /v1/ca` and `POST /v1/ca/rotation`: the staged CA rotation ([`crate::ca::rotation`]),
//! each step refused while it would break traffic, with what blocks it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::SpiffeId;
use sidewall_policies::wire::operator::{
    CaBlocker, CaRoot, CaRotationRequest, CaSidecar, CaStatus,
};

use super::{
    Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, require_operator,
    unix_rfc3339,
};
use crate::audit::AuditEvent;
use crate::ca::rotation::{CaSet, RotationRefused, Stage, Step, pem_fingerprint};
use crate::store::CertificateRecord;

/// `GET /v1/ca`.
pub(super) async fn status(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    Ok(json_response(StatusCode::OK, &build_status(api).await?))
}

/// Where the rotation stands now, with the blockers of its next step.
async fn build_status(api: &Api) -> Result<CaStatus, ApiError> {
    let set = api.ca();
    let stage = set.stage();
    let certificates = api.store.certificates().await?;
    let blockers = blockers(api, &set, stage.next_step(), &certificates).await?;
    let by_serial: HashMap<&str, &CertificateRecord> = certificates
        .iter()
        .map(|c| (c.serial.as_str(), c))
        .collect();
    let mut sidecars: Vec<CaSidecar> = api
        .distribution
        .fleet()
        .into_iter()
        .map(|entry| {
            let ca_root = entry
                .certificate_serial
                .as_deref()
                .and_then(|serial| by_serial.get(serial))
                .and_then(|record| record.ca_root.as_deref());
            CaSidecar {
                bundle_applied: api.distribution.has_applied_bundle(&entry),
                certificate_ca: ca_role(&set, ca_root).to_owned(),
                instance: entry.instance,
                identity: entry.identity,
                connected: entry.connected,
                certificate_serial: entry.certificate_serial,
                certificate_expires_at: entry.certificate_expires_at,
                replica: None,
            }
        })
        .collect();
    // With etcd, the other replicas' sidecars, as their summaries list them mid-rotation.
    if api.store.replicated() {
        let own = api.distribution.replica().to_owned();
        for summary in api.store.replicas().await? {
            if summary.replica == own {
                continue;
            }
            for mut row in summary.ca_sidecars {
                let ca_root = row
                    .certificate_serial
                    .as_deref()
                    .and_then(|serial| by_serial.get(serial))
                    .and_then(|record| record.ca_root.as_deref());
                row.certificate_ca = ca_role(&set, ca_root).to_owned();
                sidecars.push(row);
            }
        }
    }
    let record = set.record();
    Ok(CaStatus {
        stage: stage.as_str().to_owned(),
        rotation: set.rotations(),
        changed_at: record.map(|r| r.changed_at),
        changed_by: record.map(|r| r.changed_by.clone()),
        forced: record.is_some_and(|r| r.forced),
        roots: roots(&set),
        next_step: stage.next_step().as_str().to_owned(),
        blockers,
        sidecars,
    })
}

/// Which CA of the set a certificate's recorded root is.
fn ca_role(set: &CaSet, root: Option<&str>) -> &'static str {
    let Some(root) = root else { return "unknown" };
    if root == set.signing().root_fingerprint() {
        "signing"
    } else if set
        .previous()
        .is_some_and(|ca| ca.root_fingerprint() == root)
    {
        "previous"
    } else if set.next().is_some_and(|ca| ca.root_fingerprint() == root) {
        "next"
    } else {
        "unknown"
    }
}

fn roots(set: &CaSet) -> Vec<CaRoot> {
    let described = |ca: &crate::ca::Authority, role: &str| {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = ca.root_der();
        let (name, not_after) = X509Certificate::from_der(der).map_or_else(
            |_| (String::new(), 0),
            |(_, cert)| {
                let name = cert
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (name, cert.validity().not_after.timestamp())
            },
        );
        CaRoot {
            sha256: ca.root_fingerprint(),
            role: role.to_owned(),
            name,
            not_after,
        }
    };
    let mut roots = vec![described(set.signing(), "signing")];
    roots.extend(set.next().map(|ca| described(ca, "next")));
    roots.extend(set.previous().map(|ca| described(ca, "previous")));
    roots
}

/// What blocks `step` now.
async fn blockers(
    api: &Api,
    set: &CaSet,
    step: Step,
    certificates: &[CertificateRecord],
) -> Result<Vec<CaBlocker>, ApiError> {
    Ok(match step {
        Step::Prepare => {
            if set.signing().material().root_key_pem.is_none() {
                vec![CaBlocker {
                    kind: "root_key".into(),
                    subject: set.root_fingerprint(),
                    reason: RotationRefused::RootKeyOffline.to_string(),
                }]
            } else {
                Vec::new()
            }
        }
        Step::Activate => bundle_blockers(api, certificates).await?,
        Step::Retire => retire_blockers(api, set, certificates).await?,
    })
}

/// `activate`: every sidecar must have applied a snapshot carrying the new root, or it would
/// refuse the certificates the new CA signs. Connected ones that have not are listed; so is
/// every live workload certificate that no connected sidecar with the new root holds (as its
/// acks report): its holder is offline, and would come back trusting only the old root. The
/// store keeps certificates, so this holds across control-plane restarts; with etcd, the
/// other replicas' sidecars come from their published summaries.
async fn bundle_blockers(
    api: &Api,
    certificates: &[CertificateRecord],
) -> Result<Vec<CaBlocker>, ApiError> {
    let (_, generation) = api.distribution.ca();
    let mut blockers = Vec::new();
    let sidecar = |entry: &crate::distribution::FleetEntry, reason: String| CaBlocker {
        kind: "sidecar".into(),
        subject: format!("{} (instance {})", entry.identity, entry.instance),
        reason,
    };
    for entry in api.distribution.pending_since(generation).waiting {
        let reason = if entry.connected {
            "has not applied the snapshot carrying the new root yet".into()
        } else {
            format!(
                "disconnected at {} without the new root; waiting for it to reconnect",
                unix_rfc3339(entry.since)
            )
        };
        blockers.push(sidecar(&entry, reason));
    }
    let mut held: HashSet<String> = api.distribution.holding_bundle().into_iter().collect();
    if api.store.replicated() {
        let own = api.distribution.replica().to_owned();
        for summary in api.store.replicas().await? {
            if summary.replica == own {
                continue;
            }
            if summary.ca_generation != generation {
                blockers.push(CaBlocker {
                    kind: "replica".into(),
                    subject: summary.replica.clone(),
                    reason: "has not yet reported its sidecars against the new trust bundle (it publishes every few seconds)".into(),
                });
                continue;
            }
            for entry in &summary.ca_pending {
                blockers.push(sidecar(
                    entry,
                    format!(
                        "connected to {}; has not applied the snapshot carrying the new root yet",
                        summary.replica
                    ),
                ));
            }
            held.extend(summary.ca_applied);
        }
    }
    for c in live(api, certificates, None) {
        if c.role.is_none() && !held.contains(&c.serial) {
            blockers.push(CaBlocker {
                kind: "certificate".into(),
                subject: format!("{} (serial {})", c.identity, c.serial),
                reason: format!(
                    "valid until {}, but no connected sidecar that has the new root holds it: its sidecar is offline (start it), or it is no longer used (revoke the serial), or --force",
                    unix_rfc3339(c.not_after)
                ),
            });
        }
    }
    Ok(blockers)
}

/// The certificates still live: not expired, not renewed (a renewal names the serial it
/// replaces), not revoked, for an operator not replaced by one from the signing CA, and not
/// from the root `except`.
fn live<'a>(
    api: &Api,
    certificates: &'a [CertificateRecord],
    except: Option<&str>,
) -> Vec<&'a CertificateRecord> {
    let now = now_unix();
    let signing = api.ca().root_fingerprint();
    let renewed: HashSet<&str> = certificates
        .iter()
        .filter_map(|c| c.authenticated_by.strip_prefix("renewal:"))
        .collect();
    let replaced_operators: HashSet<&str> = certificates
        .iter()
        .filter(|c| c.role.is_some() && c.ca_root.as_deref() == Some(signing.as_str()))
        .map(|c| c.identity.as_str())
        .collect();
    certificates
        .iter()
        .filter(|c| {
            c.not_after > now
                && (except.is_none() || c.ca_root.as_deref() != except)
                && !renewed.contains(c.serial.as_str())
                && !(c.role.is_some()
                    && c.ca_root.as_deref() != Some(signing.as_str())
                    && replaced_operators.contains(c.identity.as_str()))
                && !SpiffeId::parse(&c.identity)
                    .is_ok_and(|id| api.distribution.is_revoked(&id, &c.serial))
        })
        .collect()
}

/// `retire`: no live certificate may chain to the old root (its holder would be refused by
/// every peer), and no join token may pin it (a sidecar joining with it would be refused).
async fn retire_blockers(
    api: &Api,
    set: &CaSet,
    certificates: &[CertificateRecord],
) -> Result<Vec<CaBlocker>, ApiError> {
    let now = now_unix();
    let signing = set.signing().root_fingerprint();
    let mut blockers = Vec::new();
    for c in live(api, certificates, Some(&signing)) {
        blockers.push(CaBlocker {
            kind: "certificate".into(),
            subject: format!("{} (serial {})", c.identity, c.serial),
            reason: format!(
                "chains to the old root and is valid until {}; its holder has not renewed (a sidecar renews early once it sees the new CA sign; an operator needs `sidewall operator issue`): wait, start it, or revoke the serial",
                unix_rfc3339(c.not_after)
            ),
        });
    }
    for token in api.store.tokens().await? {
        let usable = token.revoked_at.is_none()
            && token.expires_at > now
            && token.redeemed_keys.len() < token.uses as usize;
        if usable && token.ca_root.as_deref() != Some(signing.as_str()) {
            blockers.push(CaBlocker {
                kind: "token".into(),
                subject: token.id.clone(),
                reason: format!(
                    "pins the old root (for {}, valid until {}): a sidecar joining with it after retire would be refused; revoke it (`sidewall token revoke {}`) and make a new one",
                    token.identity,
                    unix_rfc3339(token.expires_at),
                    token.id
                ),
            });
        }
    }
    Ok(blockers)
}

/// `POST /v1/ca/rotation`.
pub(super) async fn rotate(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body: CaRotationRequest = read_json(api, request).await?;
    let operator = require_operator(api, peer)?;
    let step = Step::parse(&body.step).ok_or_else(|| {
        ApiError::bad_request(
            "step_invalid",
            format!(
                "step {:?} is not one of prepare, activate, retire",
                body.step
            ),
        )
    })?;
    let refused = |code: &'static str, message: String| {
        metrics::counter!(crate::metric::CA_ROTATION_REFUSED, "step" => step.as_str(), "reason" => code)
            .increment(1);
        ApiError::new(StatusCode::CONFLICT, code, message)
    };
    let set = api.ca();
    let (stored, version) = match api.store.ca_record().await? {
        Some((record, version)) => (Some(record), version),
        None => (None, 0),
    };
    if stored.as_ref() != set.record() {
        return Err(refused(
            "ca_conflict",
            "the CA set is changing (another step was taken moments ago, here or on another replica); retry in a few seconds".into(),
        ));
    }
    let stage = set.stage();
    if stage != step.from_stage() {
        return Err(refused(
            "stage_mismatch",
            format!(
                "the rotation is {}: the next step is {}, not {}",
                stage.as_str(),
                stage.next_step().as_str(),
                step.as_str()
            ),
        ));
    }
    let certificates = api.store.certificates().await?;
    let blockers = blockers(api, &set, step, &certificates).await?;
    let root_key_offline = blockers.iter().any(|b| b.kind == "root_key");
    if root_key_offline || (!blockers.is_empty() && !body.force) {
        let list: Vec<String> = blockers
            .iter()
            .take(20)
            .map(|b| format!("{} {}: {}", b.kind, b.subject, b.reason))
            .collect();
        let more = blockers.len().saturating_sub(list.len());
        return Err(refused(
            if root_key_offline {
                "root_key_offline"
            } else {
                "rotation_blocked"
            },
            format!(
                "{} is blocked by {} ({}{}){}",
                step.as_str(),
                blockers.len(),
                list.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                },
                if root_key_offline {
                    ""
                } else {
                    "; `sidewall ca status` lists them; --force takes the step anyway"
                }
            ),
        ));
    }
    let now = now_unix();
    let mut record = match step {
        Step::Prepare => set
            .prepared(&api.ca_keys, &operator, now)
            .map_err(|error| {
                tracing::error!(%error, "preparing a new CA failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("the new CA could not be made: {error}"),
                )
            })?,
        Step::Activate | Step::Retire => set.stepped(step, &operator, now).ok_or_else(|| {
            refused(
                "stage_mismatch",
                "the rotation record is not in the stage this step needs".into(),
            )
        })?,
    };
    record.forced = !blockers.is_empty();
    if !api.store.put_ca_record(record.clone(), version).await? {
        return Err(refused(
            "ca_conflict",
            "another step was taken at the same moment; `sidewall ca status` shows where the rotation stands".into(),
        ));
    }
    api.settle().await;
    // The follower puts the record in force on every replica; here, before answering.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.ca().record() != Some(&record) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let forced = record.forced;
    metrics::counter!(crate::metric::CA_ROTATION_STEPS, "step" => step.as_str(), "forced" => if forced { "true" } else { "false" })
        .increment(1);
    let action = match step {
        Step::Prepare => "ca.rotation.prepared",
        Step::Activate => "ca.rotation.activated",
        Step::Retire => "ca.rotation.retired",
    };
    let new_root = record
        .next
        .as_ref()
        .unwrap_or(&record.current)
        .root_pem
        .clone();
    let old_root = match step {
        Step::Prepare => record.current.root_pem.clone(),
        Step::Activate => record
            .previous
            .as_ref()
            .map(|p| p.root_pem.clone())
            .unwrap_or_default(),
        Step::Retire => record
            .retired
            .last()
            .map(|r| r.root_pem.clone())
            .unwrap_or_default(),
    };
    if forced {
        tracing::warn!(step = step.as_str(), blockers = blockers.len(), %operator, "CA rotation step FORCED past what blocked it");
    } else {
        tracing::info!(step = step.as_str(), %operator, rotation = record.rotation, "CA rotation step taken");
    }
    api.audit(
        AuditEvent::new(&operator, action, pem_fingerprint(&new_root))
            .with("rotation", record.rotation)
            .with("old_root_sha256", pem_fingerprint(&old_root))
            .with("new_root_sha256", pem_fingerprint(&new_root))
            .with("forced", forced)
            .with("blockers", blockers.len()),
    )
    .await;
    Ok(json_response(StatusCode::OK, &build_status(api).await?))
}

/// The stage as the `sidewall_control_plane_ca_rotation_stage` gauge shows it.
pub(crate) fn stage_gauge(stage: Stage) -> f64 {
    match stage {
        Stage::Settled => 0.0,
        Stage::Prepared => 1.0,
        Stage::Activated => 2.0,
    }
}
