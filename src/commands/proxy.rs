//! `sidewall proxy --config FILE`: check the configuration, bind, run the sidecar
//! ([`sidewall_proxy::process::run_sidecar`], which the lean `sidewall-proxy` runs too).

use std::path::PathBuf;
use std::process::ExitCode;

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
    sidewall_proxy::process::run_sidecar(&args.config, args.check)
}
