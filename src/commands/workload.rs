//! `sidewall workload revoke | list | deregister`.

use std::process::ExitCode;

use hyper::Method;
use serde_json::json;

use super::{block_on, client, expect_success};
use crate::ControlPlaneAccess;

/// The `workload` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum WorkloadCommand {
    /// Revoke an identity (every certificate for it) or one certificate by serial: renewals
    /// are refused and every sidecar refuses and closes its connections.
    Revoke {
        /// The identity to revoke.
        #[arg(required_unless_present = "serial", conflicts_with = "serial")]
        identity: Option<String>,
        /// A certificate serial number (hex) to revoke instead.
        #[arg(long)]
        serial: Option<String>,
    },
    /// List registered workloads (identity, sidecar instance, endpoint, ports, age) and what is
    /// revoked.
    List,
    /// Remove a sidecar's registration now, whatever its identity (one left by a machine that
    /// is gone): callers stop being sent to its endpoint, and another workload may take it.
    /// Registrations also expire by themselves `registrations.lease` after their sidecar
    /// stopped watching.
    Deregister {
        /// The sidecar instance, as `sidewall workload list` shows it.
        instance: String,
    },
}

pub(crate) fn run(command: WorkloadCommand, access: &ControlPlaneAccess) -> ExitCode {
    block_on(async move {
        let client = client(access)?;
        match command {
            WorkloadCommand::Revoke { identity, serial } => {
                let body = match (identity, serial) {
                    (Some(identity), None) => json!({"identity": identity}),
                    (None, Some(serial)) => json!({"serial": serial}),
                    _ => anyhow::bail!("give an identity or --serial"),
                };
                let (status, answer) = client
                    .call(Method::POST, "/v1/revocations", Some(&body))
                    .await?;
                expect_success(status, &answer)?;
                println!(
                    "revoked {} {}",
                    answer["kind"].as_str().unwrap_or("?"),
                    answer["value"].as_str().unwrap_or("?")
                );
            }
            WorkloadCommand::Deregister { instance } => {
                let path = format!("/v1/directory/{instance}");
                let (status, answer) = client.call(Method::DELETE, &path, None).await?;
                expect_success(status, &answer)?;
                let identities: Vec<&str> = answer["identities"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_str())
                    .collect();
                println!(
                    "removed registration {instance} of {}",
                    identities.join(", ")
                );
            }
            WorkloadCommand::List => {
                let (status, directory) = client.call(Method::GET, "/v1/directory", None).await?;
                expect_success(status, &directory)?;
                println!(
                    "{:<48} {:<18} {:<22} {:<10} PORTS",
                    "IDENTITY", "INSTANCE", "ENDPOINT", "AGE"
                );
                for r in directory["registrations"].as_array().into_iter().flatten() {
                    let ports: Vec<String> = r["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("tcp"))
                        })
                        .collect();
                    println!(
                        "{:<48} {:<18} {:<22} {:<10} {}",
                        r["identity"].as_str().unwrap_or("?"),
                        r["instance"].as_str().unwrap_or("?"),
                        r["endpoint"].as_str().unwrap_or("?"),
                        super::status::when(&r["registered_at"]),
                        ports.join(" ")
                    );
                }
                let (status, revoked) = client.call(Method::GET, "/v1/revocations", None).await?;
                expect_success(status, &revoked)?;
                let list = revoked["revocations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                println!("\n{} revoked", list.len());
                for r in list {
                    println!(
                        "  {} {} at {} by {}",
                        r["kind"].as_str().unwrap_or("?"),
                        r["value"].as_str().unwrap_or("?"),
                        r["at"].as_str().unwrap_or("?"),
                        r["by"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        Ok(())
    })
}
