//! `sidewall proxy --config FILE`: check the configuration, bind, run the sidecar.

use std::path::PathBuf;
use std::process::ExitCode;

use sidewall_proxy::config::Config;

/// Flags of `sidewall proxy`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The sidecar's YAML configuration (docs/proxy.md describes every field).
    #[arg(long, value_name = "FILE", env = "SIDEWALL_PROXY_CONFIG")]
    config: PathBuf,
    /// Only check the configuration: print a summary and exit 0, or the error and exit 2.
    #[arg(long)]
    check: bool,
}

pub(crate) fn run(args: Args) -> ExitCode {
    // Configuration errors end here, before any port is bound.
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: OK: {} with {} inbound port(s), {} route(s){}{}",
            args.config.display(),
            config.identity,
            config.inbound.ports.len(),
            config.outbound.routes.len(),
            if config.outbound.transparent.is_some() {
                ", transparent mode"
            } else {
                ""
            },
            if config.local.is_some() {
                ", local snapshot"
            } else {
                ""
            },
        );
        return ExitCode::SUCCESS;
    }
    // Each authenticated inbound and each outbound connection holds two descriptors (peer and
    // app), a handshake one.
    let limits = &config.limits;
    crate::telemetry::raise_open_files_limit(
        (4 * limits.max_connections + limits.max_handshakes + 64) as u64,
        "2 x limits.maxConnections (inbound) + 2 x limits.maxConnections (outbound) + limits.maxHandshakes + 64",
    );
    let metrics = crate::telemetry::install("proxy", sidewall_proxy::metric::describe);
    let runtime = match super::runtime(Some(config.worker_threads)) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let shutdown = super::control_plane::shutdown_signal();
        let listeners = match sidewall_proxy::bind(&config).await {
            Ok(listeners) => listeners,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        };
        sidewall_proxy::run(config, listeners, metrics, shutdown).await;
        ExitCode::SUCCESS
    })
}
