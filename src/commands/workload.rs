//! `sidewall workload revoke | list | deregister`.

use std::process::ExitCode;

use hyper::Method;
use sidewall_policies::wire::operator::{
    Deregistered, Directory, RevocationRequest, Revocations, Revoked,
};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

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
                if identity.is_some() == serial.is_some() {
                    anyhow::bail!("give an identity or --serial");
                }
                let body = serde_json::to_value(RevocationRequest { identity, serial })?;
                let (status, body) = client
                    .call(Method::POST, "/v1/revocations", Some(&body))
                    .await?;
                let revoked: Revoked = answer("POST /v1/revocations", status, body)?;
                println!("revoked {} {}", revoked.kind, revoked.value);
            }
            WorkloadCommand::Deregister { instance } => {
                let path = format!("/v1/directory/{instance}");
                let (status, body) = client.call(Method::DELETE, &path, None).await?;
                let removed: Deregistered =
                    answer("DELETE /v1/directory/{instance}", status, body)?;
                println!(
                    "removed registration {} of {}",
                    removed.removed,
                    removed.identities.join(", ")
                );
            }
            WorkloadCommand::List => {
                let (status, body) = client.call(Method::GET, "/v1/directory", None).await?;
                let directory: Directory = answer("GET /v1/directory", status, body)?;
                println!(
                    "{:<48} {:<18} {:<22} {:<10} PORTS",
                    "IDENTITY", "INSTANCE", "ENDPOINT", "AGE"
                );
                for r in &directory.registrations {
                    let ports: Vec<String> = r
                        .ports
                        .iter()
                        .map(|p| format!("{}/{}", p.port, p.protocol))
                        .collect();
                    println!(
                        "{:<48} {:<18} {:<22} {:<10} {}",
                        r.identity,
                        r.instance,
                        r.endpoint,
                        super::status::when(Some(r.registered_at)),
                        ports.join(" ")
                    );
                }
                let (status, body) = client.call(Method::GET, "/v1/revocations", None).await?;
                let list: Revocations = answer("GET /v1/revocations", status, body)?;
                println!("\n{} revoked", list.revocations.len());
                for r in &list.revocations {
                    println!("  {} {} at {} by {}", r.kind, r.value, r.at, r.by);
                }
            }
        }
        Ok(())
    })
}
