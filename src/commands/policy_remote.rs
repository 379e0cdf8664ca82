//! The `policy` subcommands that talk to the control plane: apply (with `--wait`), history,
//! diff, impact, suggest, and `check --live`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::Value;
use sidewall_control_plane::client::Client;
use sidewall_policies::load::{LoadOptions, Source, load_paths, load_sources, read_sources};
use sidewall_policies::suggest;
use sidewall_policies::wire::operator::{
    self as wire, Applied, Directory, Flows, History, Impact, PendingRow, Propagation, Version,
};
use sidewall_policies::{Engine, PolicySet, Protocol, SpiffeId};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

/// The body of `POST /v1/policies` and `POST /v1/policies/impact`.
pub(crate) fn policy_set(files: Vec<Source>) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(wire::PolicySet { files })?)
}

/// Reads and validates policy files locally (the control plane validates again).
fn local_files(paths: &[PathBuf]) -> anyhow::Result<Vec<Source>> {
    let options = LoadOptions::default();
    if let Err(errors) = load_paths(paths, &options) {
        bail!("the policy set is invalid; nothing was sent:\n{errors}");
    }
    Ok(read_sources(paths, &options)?)
}

/// The policy set of a stored version (or `current`).
pub(crate) async fn fetch_set(client: &Client, version: &str) -> anyhow::Result<(u64, PolicySet)> {
    let (status, body) = client
        .call(Method::GET, &format!("/v1/policies/{version}"), None)
        .await?;
    let stored: Version = answer("GET /v1/policies/{version}", status, body)?;
    let set = load_sources(&stored.files, &LoadOptions::default())
        .with_context(|| format!("version {version} no longer loads"))?
        .policies;
    Ok((stored.version, set))
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    sidewall_policies::policy::parse_duration_within(text, Duration::from_secs(3600))
        .map_err(|e| e.to_string())
}

/// Flags of `policy apply`.
#[derive(clap::Args)]
pub(crate) struct ApplyArgs {
    /// Policy files or directories.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Wait until every affected sidecar has applied the new version.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits before exiting 1 with the sidecars still pending.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    timeout: Duration,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

pub(crate) fn apply(args: ApplyArgs) -> ExitCode {
    block_on(async move {
        let files = local_files(&args.paths)?;
        let client = client(&args.access)?;
        let (status, body) = client
            .call(Method::POST, "/v1/policies", Some(&policy_set(files)?))
            .await?;
        let applied: Applied = answer("POST /v1/policies", status, body)?;
        let version = applied.version;
        println!(
            "applied version {version}: {} policies, {} rules",
            applied.policies, applied.rules
        );
        if !applied.audit_only_targets.is_empty() {
            println!("audit mode leaves these targets open (allowed, recorded, not enforced):");
            for target in &applied.audit_only_targets {
                println!("  {target}");
            }
        }
        if !args.wait {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            let (status, body) = client
                .call(Method::GET, &format!("/v1/policies/{version}/status"), None)
                .await?;
            let propagation: Propagation =
                answer("GET /v1/policies/{version}/status", status, body)?;
            if propagation.done {
                let disconnected = propagation.disconnected;
                let ms = started.elapsed().as_millis();
                if disconnected.is_empty() {
                    println!("every affected sidecar applied version {version} ({ms} ms)");
                } else {
                    println!(
                        "every connected sidecar applied version {version} ({ms} ms); {} not connected get it when they reconnect:",
                        disconnected.len()
                    );
                    for row in &disconnected {
                        println!("{}", pending_line(row));
                    }
                }
                return Ok(());
            }
            if started.elapsed() >= args.timeout {
                let pending: Vec<String> = propagation.pending.iter().map(pending_line).collect();
                bail!(
                    "timed out after {:?}; {} sidecar(s) have not applied version {version}:\n{}",
                    args.timeout,
                    pending.len(),
                    pending.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// One row of a version's status: who, on which replica, and why it has not applied it.
fn pending_line(p: &PendingRow) -> String {
    if let Some(behind) = p.replica_behind {
        return format!("  replica {}: still at version {behind}", p.replica);
    }
    let why = if !p.connected {
        "not connected".to_owned()
    } else if let Some(reason) = &p.last_rejection {
        format!("rejected: {reason}")
    } else {
        "not applied yet".to_owned()
    };
    let on = if p.replica.is_empty() {
        String::new()
    } else {
        format!(", on {}", p.replica)
    };
    format!("  {} (instance {}{on}): {why}", p.identity, p.instance)
}

/// Flags of `policy history`.
#[derive(clap::Args)]
pub(crate) struct HistoryArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

pub(crate) fn history(args: HistoryArgs) -> ExitCode {
    block_on(async move {
        let client = client(&args.access)?;
        let (status, body) = client.call(Method::GET, "/v1/policies", None).await?;
        if args.json {
            super::expect_success(status, &body)?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        let history: History = answer("GET /v1/policies", status, body)?;
        println!(
            "{:>7}  {:<20}  {:>8}  {:>5}  APPLIED BY",
            "VERSION", "APPLIED AT", "POLICIES", "RULES"
        );
        let count = |n: Option<usize>| n.map_or("-".to_owned(), |n| n.to_string());
        for v in &history.versions {
            let marker = if v.in_force { " (in force)" } else { "" };
            println!(
                "{:>7}  {:<20}  {:>8}  {:>5}  {}{marker}",
                v.version,
                v.applied_at,
                count(v.policies),
                count(v.rules),
                v.applied_by
            );
        }
        if let Some(error) = &history.source_error {
            println!("policy directory is invalid (last good set in force):\n{error}");
        }
        Ok(())
    })
}

/// Flags of `policy diff`.
#[derive(clap::Args)]
pub(crate) struct DiffArgs {
    /// The older version.
    from: u64,
    /// The newer version.
    to: u64,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

pub(crate) fn diff(args: DiffArgs) -> ExitCode {
    block_on(async move {
        let client = client(&args.access)?;
        let (_, old) = fetch_set(&client, &args.from.to_string()).await?;
        let (_, new) = fetch_set(&client, &args.to.to_string()).await?;
        let changes = sidewall_policies::diff::diff(&old, &new);
        if changes.is_empty() {
            println!(
                "versions {} and {} hold the same policies",
                args.from, args.to
            );
        }
        for change in changes {
            println!("{change}");
        }
        Ok(())
    })
}

/// Flags of `policy impact`.
#[derive(clap::Args)]
pub(crate) struct ImpactArgs {
    /// The candidate policy files or directories.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

pub(crate) fn impact(args: ImpactArgs) -> ExitCode {
    block_on(async move {
        let files = local_files(&args.paths)?;
        let client = client(&args.access)?;
        let (status, body) = client
            .call(
                Method::POST,
                "/v1/policies/impact",
                Some(&policy_set(files)?),
            )
            .await?;
        let impact: Impact = answer("POST /v1/policies/impact", status, body)?;
        if impact.flips.is_empty() {
            println!("no recently observed flow would change outcome");
        }
        for flip in &impact.flips {
            let flow = &flip.flow;
            let request = match (&flow.method, &flow.path) {
                (Some(m), Some(p)) => format!(" {m} {p}"),
                _ => String::new(),
            };
            println!(
                "{} -> {} port {}{request}: {} -> {} ({} decisions)",
                flow.peer, flow.target, flow.port, flip.before, flip.after, flip.count,
            );
        }
        if !impact.flows_dropped.is_empty() {
            let total: u64 = impact.flows_dropped.values().sum();
            let reasons: Vec<String> = impact
                .flows_dropped
                .iter()
                .map(|(reason, count)| format!("{reason}: {count}"))
                .collect();
            println!(
                "{total} reported flows were not kept ({}): `policy impact` cannot judge them",
                reasons.join(", ")
            );
        }
        if !impact.audit_only_targets.is_empty() {
            println!("audit mode would leave these targets open:");
            for target in &impact.audit_only_targets {
                println!("  {target}");
            }
        }
        Ok(())
    })
}

/// The protocol the target serves `port` as, from the control plane's directory.
pub(crate) async fn live_protocol(
    client: &Client,
    target: &str,
    port: u16,
) -> anyhow::Result<Option<Protocol>> {
    let (status, body) = client.call(Method::GET, "/v1/directory", None).await?;
    let directory: Directory = answer("GET /v1/directory", status, body)?;
    Ok(directory
        .registrations
        .iter()
        .filter(|r| r.identity == target)
        .flat_map(|r| &r.ports)
        .find(|p| p.port == port)
        .map(|p| p.protocol))
}

/// The engine for `check --live`: the set in force on the control plane.
pub(crate) async fn live_engine(client: &Client) -> anyhow::Result<(u64, Engine)> {
    let (version, set) = fetch_set(client, "current").await?;
    Ok((version, Engine::new(set)))
}

fn parse_age(text: &str) -> Result<Duration, String> {
    sidewall_policies::policy::parse_duration_within(text, Duration::from_secs(366 * 86_400))
        .map_err(|e| e.to_string())
}

/// Flags of `policy suggest`.
#[derive(clap::Args)]
pub(crate) struct SuggestArgs {
    /// Where to write one file per target, `suggested-<target path>.yaml`: the policy and a
    /// PolicyTest listing every flow it was made from (the directory is created if missing;
    /// files of the same name are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Only this target (a SPIFFE ID); repeat for several. Default: every target with allowed
    /// flows observed.
    #[arg(long = "target", value_name = "ID")]
    targets: Vec<String>,
    /// Only flows reported within this long (e.g. 7d, 12h, 30m). Default: every flow the
    /// control plane holds.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    since: Option<Duration>,
    /// Distinct values of a path's second segment (under one first segment, on one port)
    /// from which that segment becomes `*`.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u16).range(2..))]
    generalize_after: u16,
    /// Also print what the suggestion would change in the policies in force.
    #[arg(long)]
    diff: bool,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

/// `policy suggest`: the smallest allow-list that admits every allowed flow observed.
pub(crate) fn suggest(args: SuggestArgs) -> ExitCode {
    let mut targets = Vec::new();
    for target in &args.targets {
        match SpiffeId::parse(target) {
            Ok(id) => targets.push(id),
            Err(error) => {
                eprintln!("error: --target {target:?}: {error}");
                return ExitCode::from(2);
            }
        }
    }
    block_on(async move {
        let client = client(&args.access)?;
        let observed = observed_flows(&client, args.since).await?;
        let options = suggest::Options {
            generalize_after: usize::from(args.generalize_after),
        };
        let suggested = suggest::suggest(&observed, &targets, options);
        if suggested.is_empty() {
            println!(
                "no allowed flow observed{}: nothing to suggest",
                if targets.is_empty() {
                    ""
                } else {
                    " for these targets"
                }
            );
            return Ok(());
        }
        let files = write_suggestions(&args.out, &suggested)?;
        let written = check_written(&files)?;
        if args.diff {
            print_diff(&client, &written).await?;
        }
        println!(
            "review, then: sidewall policy impact {dir} && sidewall policy apply {dir}",
            dir = args.out.display()
        );
        Ok(())
    })
}

/// The flows the control plane holds, reported within `since` if given.
async fn observed_flows(
    client: &Client,
    since: Option<Duration>,
) -> anyhow::Result<Vec<(wire::FlowKey, wire::FlowStats)>> {
    let (status, body) = client.call(Method::GET, "/v1/flows", None).await?;
    let flows: Flows = answer("GET /v1/flows", status, body)?;
    let oldest = since.map(|since| {
        sidewall_control_plane::now_unix()
            .saturating_sub(i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
    });
    Ok(flows
        .flows
        .into_iter()
        .filter(|row| oldest.is_none_or(|oldest| row.stats.last_seen >= oldest))
        .map(|row| (row.flow, row.stats))
        .collect())
}

/// Writes one file per suggestion under `out`, saying each with what it generalized.
fn write_suggestions(
    out: &std::path::Path,
    suggested: &[suggest::Suggested],
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    for suggestion in suggested {
        let path = out.join(format!("{}.yaml", suggestion.name));
        std::fs::write(&path, &suggestion.yaml)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!(
            "{}: {} from {} observed flow(s)",
            path.display(),
            suggestion.target,
            suggestion.flows
        );
        for note in &suggestion.notes {
            println!("  {note}");
        }
        files.push(path);
    }
    Ok(files)
}

/// What was written loads, and every flow it was made from passes its test.
fn check_written(files: &[PathBuf]) -> anyhow::Result<PolicySet> {
    let options = LoadOptions {
        tests: true,
        ..LoadOptions::default()
    };
    let loaded = load_paths(files, &options)
        .map_err(|e| anyhow::anyhow!("the suggestion does not load (a bug): {e}"))?;
    let report =
        sidewall_policies::testing::run(&Engine::new(loaded.policies.clone()), &loaded.tests);
    if let Some(failure) = report.failures.first() {
        bail!("the suggestion does not admit what it was made from (a bug): {failure}");
    }
    Ok(loaded.policies)
}

/// What `written` would change in the set in force (same-named policies replaced).
async fn print_diff(client: &Client, written: &PolicySet) -> anyhow::Result<()> {
    let (version, current) = fetch_set(client, "current").await?;
    let mut merged: Vec<_> = current
        .policies()
        .iter()
        .filter(|p| written.get(p.name.as_str()).is_none())
        .cloned()
        .collect();
    merged.extend(written.policies().iter().cloned());
    let merged = PolicySet::new(merged)?;
    println!("against version {version} in force:");
    for change in sidewall_policies::diff::diff(&current, &merged) {
        println!("{change}");
    }
    Ok(())
}
