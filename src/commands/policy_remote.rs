//! The `policy` subcommands that talk to the control plane: apply (with `--wait`), history,
//! diff, impact, and `check --live`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::{Value, json};
use sidewall_control_plane::client::Client;
use sidewall_policies::load::{LoadOptions, Source, load_paths, load_sources, read_sources};
use sidewall_policies::{Engine, PolicySet, Protocol};

use super::{block_on, client, expect_success};
use crate::ControlPlaneAccess;

fn files_json(sources: &[Source]) -> Value {
    json!(
        sources
            .iter()
            .map(|s| json!({"name": s.name, "text": s.text}))
            .collect::<Vec<_>>()
    )
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
    expect_success(status, &body)?;
    let sources: Vec<Source> = body["files"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| Source {
            name: f["name"].as_str().unwrap_or_default().to_owned(),
            text: f["text"].as_str().unwrap_or_default().to_owned(),
        })
        .collect();
    let set = load_sources(&sources, &LoadOptions::default())
        .with_context(|| format!("version {version} no longer loads"))?
        .policies;
    Ok((body["version"].as_u64().unwrap_or(0), set))
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
            .call(
                Method::POST,
                "/v1/policies",
                Some(&json!({"files": files_json(&files)})),
            )
            .await?;
        expect_success(status, &body)?;
        let version = body["version"].as_u64().unwrap_or(0);
        println!(
            "applied version {version}: {} policies, {} rules",
            body["policies"], body["rules"]
        );
        if let Some(open) = body["audit_only_targets"]
            .as_array()
            .filter(|a| !a.is_empty())
        {
            println!("audit mode leaves these targets open (allowed, recorded, not enforced):");
            for target in open {
                println!("  {}", target.as_str().unwrap_or_default());
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
            expect_success(status, &body)?;
            if body["done"].as_bool() == Some(true) {
                let disconnected = body["disconnected"].as_array().cloned().unwrap_or_default();
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
                let pending: Vec<String> = body["pending"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(pending_line)
                    .collect();
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
fn pending_line(p: &serde_json::Value) -> String {
    if let Some(behind) = p["replica_behind"].as_u64() {
        return format!(
            "  replica {}: still at version {behind}",
            p["replica"].as_str().unwrap_or("?")
        );
    }
    let why = if p["connected"] == false {
        "not connected".to_owned()
    } else if let Some(reason) = p["last_rejection"].as_str() {
        format!("rejected: {reason}")
    } else {
        "not applied yet".to_owned()
    };
    let on = p["replica"]
        .as_str()
        .filter(|r| !r.is_empty())
        .map(|r| format!(", on {r}"))
        .unwrap_or_default();
    format!(
        "  {} (instance {}{on}): {why}",
        p["identity"].as_str().unwrap_or("?"),
        p["instance"].as_str().unwrap_or("?")
    )
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
        expect_success(status, &body)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        println!(
            "{:>7}  {:<20}  {:>8}  {:>5}  APPLIED BY",
            "VERSION", "APPLIED AT", "POLICIES", "RULES"
        );
        for v in body["versions"].as_array().into_iter().flatten() {
            let marker = if v["in_force"] == true {
                " (in force)"
            } else {
                ""
            };
            println!(
                "{:>7}  {:<20}  {:>8}  {:>5}  {}{marker}",
                v["version"],
                v["applied_at"].as_str().unwrap_or(""),
                v["policies"],
                v["rules"],
                v["applied_by"].as_str().unwrap_or("")
            );
        }
        if let Some(error) = body["source_error"].as_str() {
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
                Some(&json!({"files": files_json(&files)})),
            )
            .await?;
        expect_success(status, &body)?;
        let flips = body["flips"].as_array().cloned().unwrap_or_default();
        if flips.is_empty() {
            println!("no recently observed flow would change outcome");
        }
        for flip in &flips {
            let request = match (flip["method"].as_str(), flip["path"].as_str()) {
                (Some(m), Some(p)) => format!(" {m} {p}"),
                _ => String::new(),
            };
            println!(
                "{} -> {} port {}{request}: {} -> {} ({} decisions)",
                flip["peer"].as_str().unwrap_or("?"),
                flip["target"].as_str().unwrap_or("?"),
                flip["port"],
                flip["before"].as_str().unwrap_or("?"),
                flip["after"].as_str().unwrap_or("?"),
                flip["count"],
            );
        }
        if let Some(dropped) = body["flows_dropped"].as_object().filter(|d| !d.is_empty()) {
            let total: u64 = dropped.values().filter_map(serde_json::Value::as_u64).sum();
            let reasons: Vec<String> = dropped
                .iter()
                .map(|(reason, count)| format!("{reason}: {count}"))
                .collect();
            println!(
                "{total} reported flows were not kept ({}): `policy impact` cannot judge them",
                reasons.join(", ")
            );
        }
        if let Some(open) = body["audit_only_targets"]
            .as_array()
            .filter(|a| !a.is_empty())
        {
            println!("audit mode would leave these targets open:");
            for target in open {
                println!("  {}", target.as_str().unwrap_or_default());
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
    expect_success(status, &body)?;
    Ok(body["registrations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["identity"] == target)
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .find(|p| p["port"] == port)
        .map(|p| {
            if p["protocol"] == "http" {
                Protocol::Http
            } else {
                Protocol::Tcp
            }
        }))
}

/// The engine for `check --live`: the set in force on the control plane.
pub(crate) async fn live_engine(client: &Client) -> anyhow::Result<(u64, Engine)> {
    let (version, set) = fetch_set(client, "current").await?;
    Ok((version, Engine::new(set)))
}
