//! `sidewall token create | list | revoke`.

use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use serde_json::json;
use sidewall_policies::policy::parse_duration_within;

use super::{block_on, client, expect_success};
use crate::ControlPlaneAccess;

/// The `token` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a join token for one workload identity. The token is printed alone on the last
    /// line of stdout; it carries what a new sidecar needs to pin the control plane's CA.
    Create {
        /// The workload identity, spiffe://<td>/ns/<namespace>/svc/<service>.
        #[arg(long, value_name = "ID")]
        identity: String,
        /// How long the token stays valid (e.g. 30m, 1h; capped by the control plane).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// How many sidecars (distinct keys) may join with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
        uses: u32,
    },
    /// List tokens and their state (active, used, expired, revoked). Secrets are never shown.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (the second part of the token).
    Revoke {
        /// The token id.
        id: String,
    },
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    parse_duration_within(text, Duration::from_secs(30 * 86_400)).map_err(|e| e.to_string())
}

pub(crate) fn run(command: TokenCommand, access: &ControlPlaneAccess) -> ExitCode {
    block_on(async move {
        let client = client(access)?;
        match command {
            TokenCommand::Create {
                identity,
                ttl,
                uses,
            } => {
                let body = json!({"identity": identity, "ttl_seconds": ttl.as_secs().max(1), "uses": uses});
                let (status, answer) = client.call(Method::POST, "/v1/tokens", Some(&body)).await?;
                expect_success(status, &answer)?;
                eprintln!(
                    "token {} for {} ({} use{}), expires {}",
                    answer["id"].as_str().unwrap_or("?"),
                    answer["identity"].as_str().unwrap_or("?"),
                    uses,
                    if uses == 1 { "" } else { "s" },
                    answer["expires_at"].as_str().unwrap_or("?"),
                );
                println!("{}", answer["token"].as_str().unwrap_or_default());
            }
            TokenCommand::List { json } => {
                let (status, answer) = client.call(Method::GET, "/v1/tokens", None).await?;
                expect_success(status, &answer)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&answer["tokens"])?);
                } else {
                    println!(
                        "{:<16}  {:<8}  {:>4}  {:<20}  IDENTITY",
                        "ID", "STATE", "USED", "EXPIRES"
                    );
                    for t in answer["tokens"].as_array().into_iter().flatten() {
                        println!(
                            "{:<16}  {:<8}  {:>4}  {:<20}  {}",
                            t["id"].as_str().unwrap_or(""),
                            t["state"].as_str().unwrap_or(""),
                            format!("{}/{}", t["used"], t["uses"]),
                            t["expires_at"].as_str().unwrap_or(""),
                            t["identity"].as_str().unwrap_or(""),
                        );
                    }
                }
            }
            TokenCommand::Revoke { id } => {
                let (status, answer) = client
                    .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                    .await?;
                expect_success(status, &answer)?;
                println!("revoked token {id}");
            }
        }
        Ok(())
    })
}
