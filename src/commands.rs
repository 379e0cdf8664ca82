//! One module per `sidewall` subcommand.

pub(crate) mod control_plane;
pub(crate) mod demo_app;
pub(crate) mod iptables;
pub(crate) mod operator;
pub(crate) mod policy;
pub(crate) mod policy_remote;
pub(crate) mod probe;
pub(crate) mod proxy;
pub(crate) mod status;
pub(crate) mod token;
pub(crate) mod up;
pub(crate) mod workload;

use std::process::ExitCode;

use sidewall_control_plane::client::Client;

use crate::ControlPlaneAccess;

/// Runs an async CLI action on a small runtime; errors print as one line and exit 1.
pub(crate) fn block_on(action: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs an async action on a small runtime and returns its value.
pub(crate) fn block_on_value<T>(
    action: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(action)
}

/// The operator client for the control plane named by `access`.
pub(crate) fn client(access: &ControlPlaneAccess) -> anyhow::Result<Client> {
    Ok(Client::operator(
        &access.data_dir,
        &access.operator,
        access.control_plane.as_deref(),
    )?)
}

/// A successful answer to `what`, read as its wire type (`sidewall_policies::wire::operator`). A
/// refusal, or an answer of another shape (a control plane of another version), is an error
/// that says which.
pub(crate) fn answer<T: serde::de::DeserializeOwned>(
    what: &str,
    status: hyper::StatusCode,
    body: serde_json::Value,
) -> anyhow::Result<T> {
    expect_success(status, &body)?;
    serde_json::from_value(body).map_err(|e| {
        anyhow::anyhow!(
            "the control plane's answer to {what} is not what this sidewall reads ({e}); is the control plane another version?"
        )
    })
}

/// Turns a non-success API answer into an error carrying its message.
pub(crate) fn expect_success(
    status: hyper::StatusCode,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let message = body
        .get("message")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    let code = body
        .get("error")
        .and_then(|c| c.as_str())
        .unwrap_or("error");
    anyhow::bail!("control plane refused ({status}, {code}): {message}")
}
