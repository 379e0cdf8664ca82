//! The segmentation report (issue 20 part 2; docs/compliance.md): what this control plane knows
//! of the mesh's segmentation over a period, built from the store (policy history, certificates,
//! revocations, registrations, the audit trail, every replica's daily roll-ups of what sidecars
//! reported) and this replica's view (the fleet), then signed with the control plane's key like an audit checkpoint.

use std::collections::BTreeMap;

mod html;
pub use html::{dashboard_html, html};

use sidewall_policies::PolicySet;
use sidewall_policies::policy::{Action, Mode};
use sidewall_policies::wire::ProbeAnswer;
use sidewall_policies::wire::report::{
    AuditSummary, CallerRefusal, Certificates, Changes, ControlMapping, Denied, Encryption,
    Exception, IssuedCertificate, MatrixRow, Observed, ObservedFlow, PlaintextAccepted,
    PolicyChange, Report, RuleName, Scope, Segmentation, SidecarApplied, TestSummary, TlsInUse,
    Workload,
};

use crate::api::{Api, OPERATOR_PATH, unix_rfc3339};
use crate::store::StoreError;
use sidewall_policies::wire::operator::RevocationKind;

/// The controls each section is evidence for (issue 20; docs/compliance.md says how).
const CONTROLS: [(u8, &[&str]); 6] = [
    (
        1,
        &[
            "PCI DSS v4.0 1.2.1",
            "SOC 2 CC6.1",
            "NIST SP 800-53 CM-3",
            "ISO/IEC 27001:2022 A.8.20",
        ],
    ),
    (
        2,
        &[
            "PCI DSS v4.0 1.3.1",
            "PCI DSS v4.0 1.3.2",
            "PCI DSS v4.0 1.4.1",
            "PCI DSS v4.0 11.4.5",
            "SOC 2 CC6.6",
            "NIST SP 800-53 AC-4",
            "NIST SP 800-53 SC-7",
            "NIST SP 800-53 CA-8",
            "ISO/IEC 27001:2022 A.8.22",
        ],
    ),
    (
        3,
        &[
            "PCI DSS v4.0 10.2",
            "SOC 2 CC7.2",
            "NIST SP 800-53 AU-2",
            "ISO/IEC 27001:2022 A.8.15",
        ],
    ),
    (
        4,
        &[
            "PCI DSS v4.0 4.2.1",
            "SOC 2 CC6.7",
            "NIST SP 800-53 SC-8",
            "NIST SP 800-53 IA-3",
            "ISO/IEC 27001:2022 A.8.24",
        ],
    ),
    (
        5,
        &[
            "PCI DSS v4.0 10.2",
            "SOC 2 CC8.1",
            "NIST SP 800-53 CM-3",
            "NIST SP 800-53 AU-9",
            "ISO/IEC 27001:2022 A.8.15",
        ],
    ),
    (
        6,
        &[
            "SOC 2 CC6.1",
            "NIST SP 800-53 IA-3",
            "ISO/IEC 27001:2022 A.8.24",
        ],
    ),
];

/// The report over `[since, now]`, asked for by `by`.
pub(crate) async fn build(api: &Api, by: &str, since: i64, now: i64) -> Result<Report, StoreError> {
    let (version, _, engine, sources) = api.distribution.current();
    let set = crate::distribution::compile(&sources).unwrap_or_default();
    let in_period = |t: i64| (since..=now).contains(&t);
    // What sidecars reported in the period's days, from every replica's roll-ups: this
    // process's own up to now first.
    api.distribution.write_rollups(api.store.as_ref()).await?;
    let counted = crate::distribution::rollups::merge(
        api.store
            .rollups(
                crate::distribution::rollups::day_of(since),
                crate::distribution::rollups::day_of(now),
            )
            .await?,
        since,
    );

    // 3. Each flow seen in the period, with the rule that decides it now and every rule that
    // matches it.
    let mut matched: BTreeMap<(String, usize), u64> = BTreeMap::new();
    let mut denied: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut flows = Vec::new();
    let mut connections: u64 = 0;
    for (key, stats) in counted.flows {
        if !in_period(stats.last_seen) {
            continue;
        }
        connections = connections.saturating_add(stats.count);
        let explanation = crate::distribution::explain(&engine, &key);
        for trace in explanation.iter().flat_map(|e| &e.policies) {
            for rule in trace.rules.iter().filter(|r| r.result.is_ok()) {
                let count = matched
                    .entry((trace.policy.to_string(), rule.rule))
                    .or_default();
                *count = count.saturating_add(stats.count);
            }
        }
        if stats.deny > 0 {
            let count = denied
                .entry((key.peer.clone(), key.target.clone()))
                .or_default();
            *count = count.saturating_add(stats.deny);
        }
        let request = match (&key.method, &key.path) {
            (Some(method), Some(path)) => format!("{method} {path}"),
            (Some(method), None) => method.clone(),
            _ => String::new(),
        };
        let rule = match explanation.as_ref().map(|e| &e.decision) {
            // Replayed on the path's first segments and without the host, a request can be
            // decided otherwise than it was: the flow says what happened, the rule is not known.
            Some(d) if d.permits() != (stats.allow.saturating_add(stats.audit) > 0) => {
                "undetermined: the deciding rule needs the whole path or the host".to_owned()
            }
            Some(sidewall_policies::Decision {
                reason: Some(r), ..
            }) => format!("{} rule {}", r.policy, r.rule),
            _ => "default deny".to_owned(),
        };
        flows.push(ObservedFlow {
            source: key.peer,
            target: key.target,
            port: key.port,
            protocol: key.protocol.to_string(),
            request,
            allowed: stats.allow,
            denied: stats.deny,
            would_deny: stats.audit,
            rule,
            last_seen: unix_rfc3339(stats.last_seen),
        });
    }

    // 2. The matrix, from the policies in force. An allow rule that matched no flow is unused,
    // unless it names paths or hosts (flows keep a path's first segments and no host, so such
    // a rule is not judged).
    let rules = matrix(&set, &matched);
    let unused_allow_rules = rules
        .iter()
        .filter(|(row, judged)| *judged && row.action == "allow" && row.matched == 0)
        .map(|(row, _)| RuleName {
            policy: row.policy.clone(),
            rule: row.rule,
        })
        .collect();
    let rules: Vec<MatrixRow> = rules.into_iter().map(|(row, _)| row).collect();
    let refused_at_caller: Vec<CallerRefusal> = counted
        .outbound
        .into_iter()
        .map(|((source, reason, target, port), attempts)| CallerRefusal {
            source,
            target,
            port,
            reason: reason.as_str().to_owned(),
            attempts,
        })
        .collect();
    let denied_attempts = denied
        .values()
        .chain(refused_at_caller.iter().map(|r| &r.attempts))
        .fold(0u64, |a, b| a.saturating_add(*b));

    // 1. Scope.
    let certificates = api.store.certificates().await?;
    let workloads = workloads(api, version, &certificates).await?;
    let mut exceptions: Vec<Exception> = set
        .audit_only_targets()
        .into_iter()
        .map(|target| Exception {
            kind: "audit_only".to_owned(),
            target: target.to_string(),
            detail: "an audit-mode policy targets it and no enforce policy does: traffic to it is \
                     allowed and only recorded"
                .to_owned(),
        })
        .collect();
    exceptions.extend(sidecar_exceptions(&api.distribution.fleet()));

    // 4. How connections arrived, from the sidecars' reports in the period.
    let mut tls: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut plaintext = Vec::new();
    for (identity, transport) in counted.transport {
        if !in_period(transport.last_seen) {
            continue;
        }
        for (key, count) in transport.tls {
            let total = tls.entry(key).or_default();
            *total = total.saturating_add(count);
        }
        for (port, connections) in transport.plaintext {
            plaintext.push(PlaintextAccepted {
                target: identity.clone(),
                port,
                connections,
            });
        }
    }

    // 5 and 6, from the store.
    let trail = crate::server::read_trail(api)
        .await
        .map_err(StoreError::unavailable)?;
    let policy_versions =
        policy_changes(api, (version, &counted.applied), &trail, since, now).await?;
    let audit_trail = audit_summary(api, &trail, since, now);
    let control_plane = api
        .ca()
        .trust_domain()
        .id(crate::tls::CONTROL_PLANE_PATH)
        .map(|id| id.to_string())
        .unwrap_or_default();
    let operator_prefix = format!("spiffe://{}{OPERATOR_PATH}", api.ca().trust_domain());
    let mut issued: Vec<IssuedCertificate> = Vec::new();
    let mut lifetimes = Vec::new();
    for certificate in certificates {
        if !in_period(certificate.issued_at) {
            continue;
        }
        let kind = if certificate.identity.starts_with(&operator_prefix) {
            "operator"
        } else if certificate.identity == control_plane {
            "control-plane"
        } else {
            lifetimes.push(certificate.not_after.saturating_sub(certificate.issued_at) / 3600);
            "workload"
        };
        issued.push(IssuedCertificate {
            serial: certificate.serial,
            identity: certificate.identity,
            kind: kind.to_owned(),
            issued_at: unix_rfc3339(certificate.issued_at),
            not_after: unix_rfc3339(certificate.not_after),
            authenticated_by: certificate.authenticated_by,
            key_type: certificate.key,
        });
    }
    issued.sort_by(|a, b| (&a.issued_at, &a.serial).cmp(&(&b.issued_at, &b.serial)));
    let mut revoked: Vec<_> = api
        .store
        .revocations()
        .await?
        .into_iter()
        .filter(|r| in_period(r.at))
        .map(|r| sidewall_policies::wire::report::Revoked {
            kind: match r.kind {
                RevocationKind::Identity => "identity",
                RevocationKind::Serial => "serial",
            }
            .to_owned(),
            value: r.value,
            at: unix_rfc3339(r.at),
            by: r.by,
        })
        .collect();
    revoked.sort_by(|a, b| (&a.at, &a.value).cmp(&(&b.at, &b.value)));
    let hours = |h: i64| u64::try_from(h).ok();

    Ok(Report {
        format: sidewall_policies::wire::report::FORMAT.to_owned(),
        generated_at: unix_rfc3339(now),
        generated_by: by.to_owned(),
        since: unix_rfc3339(since),
        until: unix_rfc3339(now),
        scope: Scope {
            trust_domain: format!("spiffe://{}", api.ca().trust_domain()),
            control_plane_version: env!("CARGO_PKG_VERSION").to_owned(),
            replica: api.distribution.replica().to_owned(),
            policy_version: version,
            workloads,
            exceptions,
        },
        segmentation: Segmentation {
            default: "deny".to_owned(),
            rules,
            denied_attempts,
            last_test: last_test(api, &trail, now),
        },
        observed: Observed {
            counted_since: unix_rfc3339(counted.from.unwrap_or(since)),
            flows,
            unused_allow_rules,
            denied: denied
                .into_iter()
                .map(|((source, target), attempts)| Denied {
                    source,
                    target,
                    attempts,
                })
                .collect(),
            refused_at_caller,
        },
        encryption: Encryption {
            mutual_tls: connections,
            tls: tls
                .into_iter()
                .map(|((version, suite), handshakes)| TlsInUse {
                    version,
                    suite,
                    handshakes,
                })
                .collect(),
            plaintext,
            shortest_certificate_hours: lifetimes.iter().min().copied().and_then(hours),
            longest_certificate_hours: lifetimes.iter().max().copied().and_then(hours),
        },
        changes: Changes {
            policy_versions,
            audit_trail,
        },
        certificates: Certificates {
            issued,
            revoked,
            ca_rotations: ca_rotations(&trail, since, now),
        },
        controls: CONTROLS
            .iter()
            .map(|(section, controls)| ControlMapping {
                section: *section,
                controls: controls.iter().map(|c| (*c).to_owned()).collect(),
            })
            .collect(),
    })
}

/// One row per rule in force, with how many observed requests or connections it matched, and
/// whether matching can be judged from flows (no `paths` or `hosts`).
fn matrix(set: &PolicySet, matched: &BTreeMap<(String, usize), u64>) -> Vec<(MatrixRow, bool)> {
    let mut rows = Vec::new();
    for policy in set.policies() {
        for (index, rule) in policy.rules.iter().enumerate() {
            let reference = (policy.name.to_string(), index + 1);
            let ports = rule.ports.as_ref().map_or_else(
                || "all".to_owned(),
                |ports| {
                    ports
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            );
            let http = rule
                .http
                .as_ref()
                .and_then(|h| serde_json::to_value(h).ok())
                .map(|h| http_summary(&h))
                .unwrap_or_default();
            let judged = rule
                .http
                .as_ref()
                .is_none_or(|h| h.paths.is_none() && h.hosts.is_none());
            rows.push((
                MatrixRow {
                    policy: policy.name.to_string(),
                    rule: index + 1,
                    mode: match policy.mode {
                        Mode::Enforce => "enforce",
                        Mode::Audit => "audit",
                    }
                    .to_owned(),
                    action: match rule.action {
                        Action::Allow => "allow",
                        Action::Deny => "deny",
                    }
                    .to_owned(),
                    from: rule.from.iter().map(ToString::to_string).collect(),
                    target: policy.target.to_string(),
                    ports,
                    http,
                    matched: matched.get(&reference).copied().unwrap_or(0),
                },
                judged,
            ));
        }
    }
    rows
}

/// `methods GET, HEAD; paths /v1/**` from a rule's `http` part as JSON.
fn http_summary(http: &serde_json::Value) -> String {
    ["methods", "paths", "hosts"]
        .iter()
        .filter_map(|name| {
            let values: Vec<&str> = http
                .get(name)?
                .as_array()?
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect();
            Some(format!("{name} {}", values.join(", ")))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What connected sidecars run with that the matrix does not govern: permissive ports,
/// egress destinations, TLS 1.2 accepted. One exception per identity and fact.
fn sidecar_exceptions(fleet: &[sidewall_policies::wire::operator::FleetEntry]) -> Vec<Exception> {
    let mut found = std::collections::BTreeSet::new();
    for entry in fleet.iter().filter(|e| e.connected) {
        let Some(facts) = &entry.sidecar else {
            continue;
        };
        for port in &facts.permissive_ports {
            found.insert((
                "permissive_port",
                entry.identity.clone(),
                format!(
                    "port {port} accepts plaintext connections, with no identity and no policy \
                     (a migration allowance in its sidecar's configuration)"
                ),
            ));
        }
        for destination in &facts.egress {
            found.insert((
                "egress",
                entry.identity.clone(),
                format!("its app may reach {destination}, outside the mesh, in plaintext"),
            ));
        }
        if facts.allow_tls12 {
            found.insert((
                "tls12",
                entry.identity.clone(),
                "its sidecar accepts TLS 1.2 as well as TLS 1.3".to_owned(),
            ));
        }
    }
    found
        .into_iter()
        .map(|(kind, target, detail)| Exception {
            kind: kind.to_owned(),
            target,
            detail,
        })
        .collect()
}

/// Every workload registered (any replica) or connected (this one).
async fn workloads(
    api: &Api,
    version: u64,
    certificates: &[crate::store::CertificateRecord],
) -> Result<Vec<Workload>, StoreError> {
    let fleet = api.distribution.fleet();
    let mut keys: BTreeMap<&str, (i64, Option<&String>)> = BTreeMap::new();
    for certificate in certificates {
        let newest = keys
            .entry(certificate.identity.as_str())
            .or_insert((i64::MIN, None));
        if certificate.issued_at >= newest.0 {
            *newest = (certificate.issued_at, certificate.key.as_ref());
        }
    }
    let key_of = |identity: &str| keys.get(identity).and_then(|k| k.1.cloned());
    let mut rows: BTreeMap<(String, String), Workload> = BTreeMap::new();
    for registration in api.store.registrations().await? {
        let ports = registration
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect();
        rows.insert(
            (registration.identity.clone(), registration.instance.clone()),
            Workload {
                identity: registration.identity,
                instance: registration.instance,
                ports,
                connected: false,
                policy_in_force: None,
                certificate_expires_at: None,
                key_type: None,
                sidecar_version: None,
            },
        );
    }
    for entry in fleet {
        let row = rows
            .entry((entry.identity.clone(), entry.instance.clone()))
            .or_insert_with(|| Workload {
                identity: entry.identity.clone(),
                instance: entry.instance.clone(),
                ports: Vec::new(),
                connected: false,
                policy_in_force: None,
                certificate_expires_at: None,
                key_type: None,
                sidecar_version: None,
            });
        row.connected = entry.connected;
        row.policy_in_force = entry
            .connected
            .then(|| api.distribution.has_applied(version, &entry))
            .flatten();
        row.certificate_expires_at = entry.certificate_expires_at.map(unix_rfc3339);
        row.sidecar_version = entry.sidecar.as_ref().map(|s| s.version.clone());
    }
    let mut rows: Vec<Workload> = rows.into_values().collect();
    for row in &mut rows {
        row.key_type = key_of(&row.identity);
    }
    Ok(rows)
}

/// Policy versions applied in the period, with what the audit trail says each changed.
async fn policy_changes(
    api: &Api,
    (in_force, stored): (u64, &AppliedBy),
    trail: &[sidewall_policies::wire::operator::AuditRecord],
    since: i64,
    now: i64,
) -> Result<Vec<PolicyChange>, StoreError> {
    // The newest `policy.applied` record of each version.
    let applied: std::collections::HashMap<&str, &sidewall_policies::wire::operator::AuditRecord> =
        trail
            .iter()
            .filter(|r| r.action == crate::audit::POLICY_APPLIED)
            .map(|r| (r.subject.as_str(), r))
            .collect();
    let mut changes = Vec::new();
    for version in api.store.policy_versions().await? {
        if !(since..=now).contains(&version.applied_at) {
            continue;
        }
        let set = crate::distribution::compile(&version.files).ok();
        let record = applied.get(version.version.to_string().as_str()).copied();
        let detail = |name: &str| {
            record
                .and_then(|r| r.details.get(name))
                .cloned()
                .unwrap_or_default()
        };
        changes.push(PolicyChange {
            version: version.version,
            applied_by: version.applied_by,
            applied_at: unix_rfc3339(version.applied_at),
            policies: set.as_ref().map_or(0, |s| s.policies().len()),
            rules: set.as_ref().map_or(0, PolicySet::rule_count),
            added: detail("added"),
            removed: detail("removed"),
            changed: detail("changed"),
            set_sha256: detail("set_sha256"),
            in_force: version.version == in_force,
            applied_by_sidecars: applied_by(api, stored, version.version),
        });
    }
    Ok(changes)
}

/// When each sidecar first applied each policy version (version → instance → identity, at).
type AppliedBy = BTreeMap<u64, BTreeMap<String, (String, i64)>>;

/// Which sidecars applied policy `version` and when: what this process saw, and what every
/// process wrote to its daily roll-ups (before a restart, at another replica), the earliest
/// time of each sidecar.
fn applied_by(api: &Api, stored: &AppliedBy, version: u64) -> Vec<SidecarApplied> {
    let mut first: BTreeMap<String, (String, i64)> =
        stored.get(&version).cloned().unwrap_or_default();
    for (instance, identity, at) in api.distribution.rollout(version) {
        let entry = first.entry(instance).or_insert((identity, at));
        entry.1 = entry.1.min(at);
    }
    first
        .into_iter()
        .map(|(instance, (identity, at))| SidecarApplied {
            identity,
            instance,
            at: unix_rfc3339(at),
        })
        .collect()
}

/// The trail's head and whether it verifies (links, hashes, signed checkpoints).
fn audit_summary(
    api: &Api,
    trail: &[sidewall_policies::wire::operator::AuditRecord],
    since: i64,
    now: i64,
) -> AuditSummary {
    let verified = crate::audit::verify(trail)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            crate::audit::verify_checkpoints(
                trail,
                api.ca().trust_domain(),
                &api.ca().history_bundle_pem(),
                0,
                i64::MAX,
            )
            .map_err(|e| e.to_string())
        });
    let head = trail.last();
    AuditSummary {
        records: trail.len() as u64,
        records_in_period: trail
            .iter()
            .filter(|r| (since..=now).contains(&r.time))
            .count() as u64,
        head_seq: head.map_or(0, |r| r.seq),
        head_hash: head.map(|r| r.hash.clone()).unwrap_or_default(),
        verified: verified.is_ok(),
        error: verified.err(),
    }
}

/// Section 2's newest segmentation test: the run this process holds, unless the audit trail
/// records a newer one (started before a restart, or at another replica), whose counts and
/// first 20 failures the record carries.
fn last_test(
    api: &Api,
    trail: &[sidewall_policies::wire::operator::AuditRecord],
    now: i64,
) -> Option<TestSummary> {
    let held = api.distribution.last_verification(now);
    let recorded = trail
        .iter()
        .rev()
        .find(|r| r.action == crate::audit::SEGMENTATION_VERIFIED);
    // The held run is the newest unless the trail records another, finished after it began.
    let held = held.filter(|v| {
        !v.finished || recorded.is_none_or(|r| r.subject == v.id || r.time < started(v))
    });
    if let Some(v) = held {
        let count = |answer| v.pairs.iter().filter(|p| p.answer == answer).count() as u64;
        return Some(TestSummary {
            id: v.id.clone(),
            at: v.started_at.clone(),
            by: v.started_by.clone(),
            policy_version: v.policy_version,
            finished: v.finished,
            pairs: v.pairs.len() as u64,
            refused: count(ProbeAnswer::Refused),
            admitted: count(ProbeAnswer::Admitted),
            no_answer: count(ProbeAnswer::NoAnswer),
            unprobed: v.unprobed,
            failures: v
                .failures()
                .map(|p| format!("{} -> {}:{}", p.source, p.target, p.port))
                .collect(),
        });
    }
    recorded.map(|record| {
        let number = |name: &str| {
            record
                .details
                .get(name)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        TestSummary {
            id: record.subject.clone(),
            // The record is made when the run finished.
            at: unix_rfc3339(record.time),
            by: record.actor.clone(),
            policy_version: number("policy_version"),
            finished: true,
            pairs: number("pairs"),
            refused: number("refused"),
            admitted: number("admitted"),
            no_answer: number("no_answer"),
            unprobed: number("unprobed"),
            failures: record
                .details
                .get("failures")
                .map(|f| {
                    f.split(", ")
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }
    })
}

/// When run `v` started, Unix seconds (0 when its time does not parse).
fn started(v: &sidewall_policies::wire::report::Verification) -> i64 {
    time::OffsetDateTime::parse(
        &v.started_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_or(0, |t| t.unix_timestamp())
}

/// Section 6: the CA rotation steps of the period, from the audit trail.
fn ca_rotations(
    trail: &[sidewall_policies::wire::operator::AuditRecord],
    since: i64,
    now: i64,
) -> Vec<sidewall_policies::wire::report::CaRotationStep> {
    trail
        .iter()
        .filter(|r| (since..=now).contains(&r.time))
        .filter_map(|r| {
            let step = r.action.strip_prefix("ca.rotation.")?;
            let detail = |name: &str| r.details.get(name).cloned().unwrap_or_default();
            Some(sidewall_policies::wire::report::CaRotationStep {
                at: unix_rfc3339(r.time),
                step: step.to_owned(),
                rotation: detail("rotation"),
                old_root_sha256: detail("old_root_sha256"),
                new_root_sha256: detail("new_root_sha256"),
                forced: detail("forced") == "true",
                by: r.actor.clone(),
            })
        })
        .collect()
}
