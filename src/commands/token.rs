//! `sidewall token create | list | revoke`.

use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use sidewall_policies::policy::parse_duration_within;
use sidewall_policies::wire::operator::{TokenCreated, TokenRequest, TokenRevoked, Tokens};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

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
                let body = serde_json::to_value(TokenRequest {
                    identity,
                    ttl_seconds: Some(ttl.as_secs().max(1)),
                    uses: Some(uses),
                })?;
                let (status, body) = client.call(Method::POST, "/v1/tokens", Some(&body)).await?;
                let created: TokenCreated = answer("POST /v1/tokens", status, body)?;
                eprintln!(
                    "token {} for {} ({} use{}), expires {}",
                    created.id,
                    created.identity,
                    created.uses,
                    if created.uses == 1 { "" } else { "s" },
                    created.expires_at,
                );
                println!("{}", created.token);
            }
            TokenCommand::List { json } => {
                let (status, body) = client.call(Method::GET, "/v1/tokens", None).await?;
                let list: Tokens = answer("GET /v1/tokens", status, body)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list.tokens)?);
                } else {
                    println!(
                        "{:<16}  {:<8}  {:>4}  {:<20}  IDENTITY",
                        "ID", "STATE", "USED", "EXPIRES"
                    );
                    for t in &list.tokens {
                        println!(
                            "{:<16}  {:<8}  {:>4}  {:<20}  {}",
                            t.id,
                            t.state,
                            format!("{}/{}", t.used, t.uses),
                            t.expires_at,
                            t.identity,
                        );
                    }
                }
            }
            TokenCommand::Revoke { id } => {
                let (status, body) = client
                    .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                    .await?;
                let revoked: TokenRevoked = answer("DELETE /v1/tokens/{id}", status, body)?;
                println!("revoked token {}", revoked.id);
            }
        }
        Ok(())
    })
}
