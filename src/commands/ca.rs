//! `sidewall ca fingerprint`: the SHA-256 of the CA root(s) in the data directory's trust
//! bundle, what a sidecar joining with a service-account token pins (`caFingerprint`).

use std::path::PathBuf;
use std::process::ExitCode;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sidewall_control_plane::data_dir::bundle_path;
use sidewall_control_plane::random::sha256_hex;

/// The `ca` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum CaCommand {
    /// Print the SHA-256 of each root in the trust bundle, one per line (64 hex digits: the
    /// last field of a join token, and a sidecar's `controlPlane.caFingerprint`). Reads the
    /// file only; no control plane is called.
    Fingerprint {
        /// The control plane's data directory (its trust-bundle.pem is read).
        #[arg(
            long,
            env = "SIDEWALL_DATA_DIR",
            default_value = "sidewall-data",
            conflicts_with = "bundle"
        )]
        data_dir: PathBuf,
        /// A trust bundle file instead (PEM).
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
    },
}

pub(crate) fn run(command: CaCommand) -> ExitCode {
    let CaCommand::Fingerprint { data_dir, bundle } = command;
    let file = bundle.unwrap_or_else(|| bundle_path(&data_dir));
    let roots = std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("not PEM certificates: {e}"))
        });
    match roots {
        Ok(roots) if !roots.is_empty() => {
            for root in roots {
                println!("{}", sha256_hex(&root));
            }
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("error: {}: no certificate in it", file.display());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!(
                "error: {}: {error} (is the control plane's data directory right? --data-dir or SIDEWALL_DATA_DIR)",
                file.display()
            );
            ExitCode::FAILURE
        }
    }
}
