//! `sidewall operator issue NAME --role ROLE | list | revoke NAME`: operator credentials, their
//! keys generated here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use hyper::Method;

use sidewall_control_plane::ca::write_private;
use sidewall_control_plane::client::Client;
use sidewall_control_plane::client::key_and_csr;
use sidewall_control_plane::data_dir::operator_paths;
use sidewall_policies::wire;
use sidewall_policies::wire::operator::{OperatorRequest, OperatorRevoked, Operators, Role};

use super::ControlPlaneAccess;
use super::{answer, block_on, client, expect_success};

/// The `operator` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum OperatorCommand {
    /// Issue a credential for spiffe://<td>/sidewall/operator/NAME with a role. The key is
    /// generated here and written 0600; only a CSR is sent. Needs the admin role.
    Issue {
        /// The operator's name (one path segment).
        name: String,
        /// What it may do: viewer (read status, fleet, flows, policy history, diffs, impact),
        /// policy (viewer, and apply policy sets) or admin (everything: tokens, operators,
        /// revocations, registrations).
        #[arg(long, value_name = "ROLE", value_parser = parse_role)]
        role: Role,
        /// Where to write NAME.pem and NAME.key [default: <data-dir>/operators].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// List operator certificates: name, role, state, expiry, who issued them. Needs the
    /// admin role.
    List {
        /// Include expired certificates.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an operator: every certificate of spiffe://<td>/sidewall/operator/NAME is
    /// refused from its next request on, and the name cannot be issued again. Needs the
    /// admin role; no operator can revoke itself.
    Revoke {
        /// The operator's name.
        name: String,
    },
}

fn parse_role(word: &str) -> Result<Role, String> {
    Role::parse(word).ok_or_else(|| format!("{word:?} is no role: viewer, policy or admin"))
}

pub(crate) fn run(command: OperatorCommand, access: &ControlPlaneAccess) -> ExitCode {
    block_on(async move {
        let client = client(access)?;
        match command {
            OperatorCommand::Issue { name, role, out } => {
                issue(&client, access, name, role, out).await?;
            }
            OperatorCommand::List { all, json } => {
                let path = if all {
                    "/v1/operators?all=true"
                } else {
                    "/v1/operators"
                };
                let (status, body) = client.call(Method::GET, path, None).await?;
                let list: Operators = answer("GET /v1/operators", status, body)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list.operators)?);
                    return Ok(());
                }
                println!(
                    "{:<16}  {:<6}  {:<7}  {:<20}  {:<32}  ISSUED BY",
                    "NAME", "ROLE", "STATE", "EXPIRES", "SERIAL"
                );
                for o in &list.operators {
                    println!(
                        "{:<16}  {:<6}  {:<7}  {:<20}  {:<32}  {}",
                        o.name,
                        o.role.map_or("-", Role::as_str),
                        o.state,
                        o.expires_at,
                        o.serial,
                        o.issued_by,
                    );
                }
            }
            OperatorCommand::Revoke { name } => {
                let path = format!("/v1/operators/{name}");
                let (status, body) = client.call(Method::DELETE, &path, None).await?;
                let revoked: OperatorRevoked = answer("DELETE /v1/operators/{name}", status, body)?;
                println!(
                    "revoked {} ({} valid certificate{})",
                    revoked.identity,
                    revoked.certificates,
                    if revoked.certificates == 1 { "" } else { "s" }
                );
            }
        }
        Ok(())
    })
}

async fn issue(
    client: &Client,
    access: &ControlPlaneAccess,
    name: String,
    role: Role,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (key, csr) = key_and_csr().context("generating a key")?;
    let body = serde_json::to_value(OperatorRequest {
        name: name.clone(),
        role,
        csr,
    })?;
    let (status, answer) = client
        .call(Method::POST, "/v1/operators", Some(&body))
        .await?;
    expect_success(status, &answer)?;
    let (mut cert_path, mut key_path) = operator_paths(&access.data_dir, &name);
    if let Some(dir) = out {
        cert_path = dir.join(format!("{name}.pem"));
        key_path = dir.join(format!("{name}.key"));
    }
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    let issued: wire::Certificate = serde_json::from_value(answer)
        .context("the control plane's answer is not a certificate")?;
    write_private(&cert_path, issued.certificate_chain.as_bytes(), 0o644)?;
    println!(
        "{} ({role}, expires {}): {} and {}",
        issued.identity,
        issued.expires_at,
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}
