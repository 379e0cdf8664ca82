//! `sidewall operator issue NAME`: a new operator credential, its key generated here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use hyper::Method;

use sidewall_control_plane::ca::write_private;
use sidewall_control_plane::client::key_and_csr;
use sidewall_control_plane::data_dir::operator_paths;
use sidewall_policies::wire;
use sidewall_policies::wire::operator::OperatorRequest;

use super::ControlPlaneAccess;
use super::{block_on, client, expect_success};

/// The `operator` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum OperatorCommand {
    /// Issue a credential for spiffe://<td>/sidewall/operator/NAME. The key is generated
    /// here and written 0600; only a CSR is sent.
    Issue {
        /// The operator's name (one path segment).
        name: String,
        /// Where to write NAME.pem and NAME.key [default: <data-dir>/operators].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

pub(crate) fn run(command: OperatorCommand, access: &ControlPlaneAccess) -> ExitCode {
    block_on(async move {
        let OperatorCommand::Issue { name, out } = command;
        let client = client(access)?;
        let (key, csr) = key_and_csr().context("generating a key")?;
        let body = serde_json::to_value(OperatorRequest {
            name: name.clone(),
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
            "{} (expires {}): {} and {}",
            issued.identity,
            issued.expires_at,
            cert_path.display(),
            key_path.display()
        );
        Ok(())
    })
}
