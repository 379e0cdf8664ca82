//! Segmentation testing (`sidewall verify segmentation`; docs/compliance.md): `POST
//! /v1/verifications` picks the pairs the policies in force must deny and sends each source
//! sidecar its probes over its watch; `POST /v1/probes` takes what the targets answered;
//! `GET /v1/verifications/{id}` reads the run, and records it in the audit trail once finished.

use std::collections::{BTreeMap, HashMap};

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::json;
use sidewall_policies::SpiffeId;
use sidewall_policies::engine::Outcome;
use sidewall_policies::wire::report::{Verification, VerificationPair, VerificationRequest};
use sidewall_policies::wire::{Probe, ProbeAnswer, ProbeOrder, ProbeResults};

use super::{
    Api, ApiError, HttpResponse, Peer, json_response, now_unix, read_json, require_operator,
    unix_rfc3339,
};

/// Most pairs probed in one run.
pub(crate) const MAX_PAIRS: usize = 10_000;
/// Most pairs listed before sampling; more are counted as unprobed.
const MAX_LISTED: usize = 100_000;
/// Most results in one `POST /v1/probes`.
const MAX_RESULTS: usize = 1000;

/// `POST /v1/verifications` (policy role): starts a run.
pub(super) async fn start(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let operator = require_operator(api, peer)?;
    let body: VerificationRequest = read_json(api, request).await?;
    if body.sample == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_sample",
            "sample must be at least 1 (leave it out to probe every pair)",
        ));
    }
    let running = |id: String| {
        ApiError::new(
            StatusCode::CONFLICT,
            "verification_running",
            format!("verification {id} is under way; read it with GET /v1/verifications/{id}"),
        )
    };
    if let Some(id) = api.distribution.verification_running(now_unix()) {
        return Err(running(id));
    }
    let (version, _, engine, _) = api.distribution.current();
    // One probing sidecar per source identity: a connected one that says it probes and was
    // heard from lately.
    let fleet = api.distribution.fleet();
    let mut sources: BTreeMap<String, String> =
        api.distribution.probers().into_iter().rev().collect();
    // With etcd, the sidecars connected to the other replicas too, from their summaries: the
    // run is shared through the store and each replica orders its own sidecars' probes.
    if api.store.replicated() {
        let own = api.distribution.replica().to_owned();
        for summary in api.store.replicas().await? {
            if summary.replica != own {
                for (identity, instance) in summary.probers {
                    sources.entry(identity).or_insert(instance);
                }
            }
        }
    }
    let id = crate::random::hex_token(8);
    let mut pairs = Vec::new();
    let mut unprobed = 0u64;
    let registrations = api.store.registrations().await?;
    let identities: Vec<SpiffeId> = {
        let mut all: Vec<String> = registrations.iter().map(|r| r.identity.clone()).collect();
        all.extend(fleet.into_iter().map(|e| e.identity));
        all.extend(sources.keys().cloned());
        all.sort();
        all.dedup();
        all.iter().filter_map(|i| SpiffeId::parse(i).ok()).collect()
    };
    for registration in &registrations {
        let Ok(target) = SpiffeId::parse(&registration.identity) else {
            continue;
        };
        for port in &registration.ports {
            for source in identities.iter().filter(|s| **s != target) {
                let decision = engine.decide_connection(source, &target, port.port, port.protocol);
                if decision.outcome != Outcome::Deny {
                    continue;
                }
                let Some(instance) = sources.get(source.as_str()) else {
                    unprobed += 1;
                    continue;
                };
                // Bounded work: past this many, pairs are counted, not kept.
                if pairs.len() >= MAX_LISTED {
                    unprobed += 1;
                    continue;
                }
                pairs.push(VerificationPair {
                    source: source.to_string(),
                    instance: instance.clone(),
                    target: target.to_string(),
                    endpoint: registration.endpoint.clone(),
                    port: port.port,
                    answer: ProbeAnswer::Pending,
                });
            }
        }
    }
    // A sample (or more pairs than a run takes): the pairs this run's id orders first.
    let keep = body.sample.unwrap_or(MAX_PAIRS).min(MAX_PAIRS);
    if pairs.len() > keep {
        // Left out by a sample: chosen not to be probed. Past the cap: not probed.
        if body.sample.is_none_or(|n| n > MAX_PAIRS) {
            unprobed += (pairs.len() - keep) as u64;
        }
        pairs.sort_by_cached_key(|p| {
            crate::random::sha256_hex(
                format!("{id} {} {} {} {}", p.source, p.target, p.endpoint, p.port).as_bytes(),
            )
        });
        pairs.truncate(keep);
    }
    // One order a source, of at most what a sidecar takes: the rest are unprobed.
    let mut per_source: HashMap<String, usize> = HashMap::new();
    pairs.retain(|pair| {
        let count = per_source.entry(pair.instance.clone()).or_default();
        *count += 1;
        let kept = *count <= ProbeOrder::MAX;
        unprobed += u64::from(!kept);
        kept
    });
    let mut orders: HashMap<String, Vec<Probe>> = HashMap::new();
    for pair in &pairs {
        orders
            .entry(pair.instance.clone())
            .or_default()
            .push(Probe {
                run: id.clone(),
                target: pair.target.clone(),
                endpoint: pair.endpoint.clone(),
                port: pair.port,
            });
    }
    // A sidecar makes 20 probes a second: time for the busiest, and to report.
    let busiest = orders.values().map(Vec::len).max().unwrap_or(0);
    let now = now_unix();
    let deadline = now + 20 + i64::try_from(busiest / 20).unwrap_or(i64::MAX);
    let verification = Verification {
        id,
        started_by: operator.clone(),
        started_at: unix_rfc3339(now),
        policy_version: version,
        finished: pairs.is_empty(),
        unprobed,
        pairs,
        unordered_answers: 0,
    };
    let replaced = api
        .distribution
        .start_verification(verification.clone(), orders, deadline, now)
        .map_err(running)?;
    if api.store.replicated() {
        let shared = crate::distribution::SharedRun {
            verification: verification.clone(),
            deadline,
            replica: api.distribution.replica().to_owned(),
        };
        api.store.put_shared_run(shared).await?;
    }
    if let Some(earlier) = replaced {
        // Finished, but nobody read it since: recorded now.
        record(api, &earlier).await;
    }
    tracing::info!(%operator, id = verification.id, pairs = verification.pairs.len(), unprobed, "segmentation verification started");
    if let Some((finished, true)) = api.distribution.verification(&verification.id, now) {
        // Nothing to probe: finished at once, and recorded.
        record(api, &finished).await;
    }
    Ok(json_response(StatusCode::OK, &verification))
}

/// `GET /v1/verifications/{id}` (viewer).
pub(super) async fn read(api: &Api, peer: &Peer, id: &str) -> Result<HttpResponse, ApiError> {
    require_operator(api, peer)?;
    if api.store.replicated() {
        // What the sidecars of the other replicas answered.
        let answers = api.store.probe_answers(id).await?;
        api.distribution.merge_answers(id, &answers);
    }
    let Some((verification, finished_now)) = api.distribution.verification(id, now_unix()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "verification_unknown",
            format!(
                "no verification {id:?} (only the newest is kept, since the control plane started)"
            ),
        ));
    };
    if finished_now {
        record(api, &verification).await;
    }
    Ok(json_response(StatusCode::OK, &verification))
}

/// The audit record of a finished run.
async fn record(api: &Api, verification: &Verification) {
    let count = |answer: ProbeAnswer| {
        verification
            .pairs
            .iter()
            .filter(|p| p.answer == answer)
            .count()
    };
    let failures: Vec<String> = verification
        .failures()
        .take(20)
        .map(|p| format!("{} -> {}:{}", p.source, p.target, p.port))
        .collect();
    api.audit(
        crate::audit::AuditEvent::new(
            &verification.started_by,
            crate::audit::SEGMENTATION_VERIFIED,
            &verification.id,
        )
        .with("policy_version", verification.policy_version)
        .with("pairs", verification.pairs.len())
        .with("refused", count(ProbeAnswer::Refused))
        .with("admitted", count(ProbeAnswer::Admitted))
        .with("no_answer", count(ProbeAnswer::NoAnswer))
        .with("unprobed", verification.unprobed)
        .with("unordered_answers", verification.unordered_answers)
        .with("failures", failures.join(", ")),
    )
    .await;
}

/// `POST /v1/probes` (workload): what the targets answered to the caller's probes.
pub(super) async fn results(
    api: &Api,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    // The body first, as for registrations.
    let body: ProbeResults = read_json(api, request).await?;
    let identity = super::distribution::claimed(api, peer, &body.instance)?;
    if body.results.len() > MAX_RESULTS {
        return Err(ApiError::bad_request(
            "too_many_results",
            format!("at most {MAX_RESULTS} probe results per request"),
        ));
    }
    let (taken, unordered) = api.distribution.probe_results(
        identity.as_str(),
        &body.instance,
        &body.results,
        now_unix(),
    );
    if taken > 0 && api.store.replicated() {
        // For the replica that started the run, if another one did.
        if let Some(run) = body.results.first().map(|r| r.probe.run.clone()) {
            let answered = api.distribution.answered_pairs(&run);
            api.store
                .put_probe_answers(&run, api.distribution.replica(), answered)
                .await?;
        }
    }
    if unordered > 0 {
        // A sidecar answering what it was not asked is broken or not the sidecar it claims
        // to be: the run says how many, the log says who.
        metrics::counter!(crate::metric::REFUSALS, "route" => "probes", "reason" => "probe_not_ordered")
            .increment(unordered as u64);
        tracing::warn!(%identity, instance = %body.instance, unordered, "answers to probes this sidecar was never ordered: ignored");
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "taken": taken}),
    ))
}
