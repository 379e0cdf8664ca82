//! One module per `sidewall` subcommand.

pub(crate) mod audit;
pub(crate) mod ca;
pub(crate) mod control_plane;
pub(crate) mod demo_app;
pub(crate) mod iptables;
pub(crate) mod operator;
pub(crate) mod policy;
pub(crate) mod policy_remote;
pub(crate) mod probe;
pub(crate) mod proxy;
pub(crate) mod report;
pub(crate) mod status;
pub(crate) mod token;
pub(crate) mod up;
pub(crate) mod verify;
pub(crate) mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use sidewall_control_plane::client::Client;

/// Where the CLI finds the control plane: its data directory (operator credential, trust
/// bundle, the API address it recorded) and an optional URL override.
#[derive(clap::Args, Clone)]
pub(crate) struct ControlPlaneAccess {
    /// The control plane's data directory.
    #[arg(
        long,
        env = "SIDEWALL_DATA_DIR",
        default_value = "sidewall-data",
        global = true
    )]
    pub(crate) data_dir: PathBuf,
    /// The control plane API (default: the address it recorded in its data directory).
    #[arg(
        long = "control-plane",
        value_name = "URL",
        global = true,
        env = "SIDEWALL_CONTROL_PLANE"
    )]
    pub(crate) control_plane: Option<String>,
    /// Which operator credential (in <data-dir>/operators/) to use.
    #[arg(
        long,
        env = "SIDEWALL_OPERATOR",
        default_value = "admin",
        global = true
    )]
    pub(crate) operator: String,
}

/// The one way a command gets its runtime: on the calling thread (`None`: CLI commands) or
/// with that many worker threads (the control plane, the sidecar).
pub(crate) fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match workers {
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(workers) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build(),
    }
}

/// Runs an async action on [`runtime`]`(workers)`; errors print as one line and exit 1.
pub(crate) fn run_on(
    workers: Option<usize>,
    action: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let result = runtime(workers)
        .map_err(|error| anyhow::anyhow!("cannot start the runtime: {error}"))
        .and_then(|runtime| runtime.block_on(action));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs an async CLI action on the calling thread; errors print as one line and exit 1.
pub(crate) fn block_on(action: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_on(None, action)
}

/// Runs an async action on the calling thread and returns its value.
pub(crate) fn block_on_value<T>(
    action: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    runtime(None)?.block_on(action)
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
