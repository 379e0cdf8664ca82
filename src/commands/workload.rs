//! `sidewall workload revoke | list`.

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
    /// List registered workloads and what is revoked.
    List,
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
            WorkloadCommand::List => {
                let (status, directory) = client.call(Method::GET, "/v1/directory", None).await?;
                expect_success(status, &directory)?;
                println!("{:<48} {:<22} PORTS", "IDENTITY", "ENDPOINT");
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
                        "{:<48} {:<22} {}",
                        r["identity"].as_str().unwrap_or("?"),
                        r["endpoint"].as_str().unwrap_or("?"),
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
