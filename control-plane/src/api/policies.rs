//! Operator routes for policy: apply, history, one version, propagation status, impact, the
//! directory and the fleet.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sidewall_policies::Engine;
use sidewall_policies::load::{Source, to_yaml};
use sidewall_policies::wire::operator::{
    Applied, Directory, Flip, History, Impact, PendingRow, PolicySet, Propagation, ReplicaRow,
    Version, VersionSummary,
};

use super::{
    Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, require_operator,
    unix_rfc3339,
};
use crate::audit::AuditEvent;
use crate::distribution::compile;
use crate::store::PolicyVersion;

/// Most files in one policy set.
const MAX_FILES: usize = 1000;

fn audit_only(set: &sidewall_policies::PolicySet) -> Vec<String> {
    set.audit_only_targets()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn refused(errors: &sidewall_policies::load::LoadErrors) -> ApiError {
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    ApiError::bad_request("policy_invalid", lines.join("\n"))
}

async fn candidate(
    api: &Api,
    request: Request<Incoming>,
) -> Result<(Vec<Source>, sidewall_policies::PolicySet), ApiError> {
    let body: PolicySet = read_json(api, request).await?;
    if body.files.len() > MAX_FILES {
        return Err(ApiError::bad_request(
            "too_many_files",
            format!("at most {MAX_FILES} files"),
        ));
    }
    let set = compile(&body.files).map_err(|e| refused(&e.0))?;
    Ok((body.files, set))
}

/// Applies a policy set from an operator or the policy directory: stored as a new version
/// (history), then put in force. Used by `POST /v1/policies` and the directory watcher.
pub(crate) async fn store_and_apply(
    api: &Api,
    files: Vec<Source>,
    set: sidewall_policies::PolicySet,
    applied_by: String,
) -> Result<u64, ApiError> {
    let files_hash = serde_json::to_vec(&files).unwrap_or_default();
    let version = api
        .store
        .put_policy_version(PolicyVersion {
            version: 0,
            applied_by: applied_by.clone(),
            applied_at: now_unix(),
            files,
        })
        .await?;
    let summary = (set.policies().len(), set.rule_count());
    api.settle().await;
    let mut event = AuditEvent::new(
        applied_by.clone(),
        crate::audit::POLICY_APPLIED,
        version.to_string(),
    )
    .with("policies", summary.0)
    .with("rules", summary.1)
    .with("set_sha256", set_hash(&files_hash));
    if let Some(changes) = changes_since(api, version, &set).await {
        for (kind, names) in changes {
            event = event.with(kind, names);
        }
    }
    api.audit(event).await;
    tracing::info!(
        version,
        policies = summary.0,
        rules = summary.1,
        applied_by,
        "policy set applied"
    );
    Ok(version)
}

fn set_hash(files_json: &[u8]) -> String {
    crate::random::sha256_hex(files_json)
}

/// The policies added, removed and changed since the version before `version`, each kind as
/// a comma-separated list of names (kinds with none left out); `None` for the first version.
async fn changes_since(
    api: &Api,
    version: u64,
    set: &sidewall_policies::PolicySet,
) -> Option<Vec<(&'static str, String)>> {
    let before = api
        .store
        .policy_version(version.checked_sub(1)?)
        .await
        .ok()??;
    let before = crate::distribution::compile(&before.files).ok()?;
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for change in sidewall_policies::diff::diff(&before, set) {
        match change {
            sidewall_policies::diff::Change::Added(name) => added.push(name),
            sidewall_policies::diff::Change::Removed(name) => removed.push(name),
            sidewall_policies::diff::Change::Changed(name, _) => changed.push(name),
        }
    }
    Some(
        [("added", added), ("removed", removed), ("changed", changed)]
            .into_iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(kind, names)| (kind, names.join(",")))
            .collect(),
    )
}

/// `POST /v1/policies`: validate with the same engine, store a new version, distribute.
pub(super) async fn apply(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let (files, set) = candidate(api, request).await?;
    let audit_only_targets = audit_only(&set);
    let (policies, rules) = (set.policies().len(), set.rule_count());
    let version = store_and_apply(api, files, set, operator).await?;
    Ok(json_response(
        StatusCode::OK,
        &Applied {
            version,
            policies,
            rules,
            audit_only_targets,
        },
    ))
}

/// `GET /v1/policies`: the history, newest last.
pub(super) async fn history(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let (current, ..) = api.distribution.current();
    let versions = api
        .store
        .policy_versions()
        .await?
        .into_iter()
        .map(|v| {
            let summary = compile(&v.files)
                .ok()
                .map(|s| (s.policies().len(), s.rule_count()));
            VersionSummary {
                version: v.version,
                applied_at: unix_rfc3339(v.applied_at),
                applied_by: v.applied_by,
                files: v.files.len(),
                policies: summary.map(|s| s.0),
                rules: summary.map(|s| s.1),
                in_force: v.version == current,
            }
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &History {
            versions,
            source_error: api.distribution.source_error(),
        },
    ))
}

/// `GET /v1/policies/{v}` (`current` for the set in force) and `GET /v1/policies/{v}/status`.
pub(super) async fn version(api: &Api, peer: &Peer, rest: &str) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let (which, status) = match rest.strip_suffix("/status") {
        Some(which) => (which, true),
        None => (rest, false),
    };
    let (current, ..) = api.distribution.current();
    let number = if which == "current" {
        current
    } else {
        which.parse::<u64>().map_err(|_| {
            ApiError::bad_request("version_invalid", format!("{which:?} is not a version"))
        })?
    };
    if status {
        let Some(pending) = api.distribution.pending(number) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "version_unknown",
                format!(
                    "version {number} has not been applied by this control plane since it started"
                ),
            ));
        };
        let here = api.distribution.replica();
        let mut rows: Vec<_> = pending
            .waiting
            .iter()
            .map(|e| PendingRow::of(e, here))
            .collect();
        let disconnected = pending
            .disconnected
            .iter()
            .map(|e| PendingRow::of(e, here))
            .collect();
        // With several replicas, each one's own sidecars, from the summary it publishes.
        for summary in api.store.replicas().await? {
            if summary.replica == api.distribution.replica() || summary.policy_version > number {
                continue;
            }
            if summary.policy_version < number {
                rows.push(PendingRow {
                    instance: String::new(),
                    identity: String::new(),
                    connected: true,
                    since: None,
                    sent: None,
                    applied: None,
                    last_rejection: None,
                    replica: summary.replica,
                    replica_behind: Some(summary.policy_version),
                });
                continue;
            }
            rows.extend(
                summary
                    .pending
                    .iter()
                    .map(|e| PendingRow::of(e, &summary.replica)),
            );
        }
        return Ok(json_response(
            StatusCode::OK,
            &Propagation {
                version: number,
                in_force: number == current,
                done: rows.is_empty(),
                pending: rows,
                disconnected,
            },
        ));
    }
    if number == 0 {
        return Ok(json_response(
            StatusCode::OK,
            &Version {
                version: 0,
                applied_by: None,
                applied_at: None,
                files: Vec::new(),
                yaml: String::new(),
            },
        ));
    }
    let Some(record) = api.store.policy_version(number).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "version_unknown",
            format!("no policy version {number}"),
        ));
    };
    let yaml = compile(&record.files)
        .map(|s| to_yaml(&s))
        .unwrap_or_default();
    Ok(json_response(
        StatusCode::OK,
        &Version {
            version: record.version,
            applied_by: Some(record.applied_by),
            applied_at: Some(unix_rfc3339(record.applied_at)),
            files: record.files,
            yaml,
        },
    ))
}

/// `POST /v1/policies/impact`: which recently observed flows the candidate set would flip.
pub(super) async fn impact(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let (_, set) = candidate(api, request).await?;
    let audit_only_targets = audit_only(&set);
    let engine = Engine::new(set);
    let flips = api
        .distribution
        .impact(&engine)
        .into_iter()
        .map(|(flow, count, before, after)| Flip {
            flow,
            count,
            before: before.to_string(),
            after: after.to_string(),
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &Impact {
            flips,
            audit_only_targets,
            flows_dropped: api.distribution.flows_dropped(),
        },
    ))
}

/// `GET /v1/directory`: every registration (for `policy check --live` and `workload list`).
pub(super) async fn directory(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let registrations = api.store.registrations().await?;
    Ok(json_response(StatusCode::OK, &Directory { registrations }))
}

/// `GET /v1/fleet`: one row per sidecar process.
pub(super) async fn fleet(api: &Api, peer: &Peer) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    let mut fleet = api.distribution.fleet_view();
    // With several replicas: what the others report about their own sidecars.
    fleet.other_replicas = api
        .store
        .replicas()
        .await?
        .into_iter()
        .filter(|s| s.replica != api.distribution.replica())
        .map(|s| ReplicaRow {
            replica: s.replica,
            policy_version: s.policy_version,
            connected: s.connected,
            pending: s.pending_count,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &fleet))
}
