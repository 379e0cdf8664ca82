//! `sidewall ca fingerprint | status | rotate`: the SHA-256 of the CA root(s) in the data
//! directory's trust bundle (what a sidecar joining with a service-account token pins,
//! `caFingerprint`), and the staged CA rotation (docs/ca-rotation.md).

use std::path::PathBuf;
use std::process::ExitCode;

use hyper::Method;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sidewall_control_plane::api::unix_rfc3339;
use sidewall_control_plane::data_dir::bundle_path;
use sidewall_control_plane::random::sha256_hex;
use sidewall_policies::wire::operator::{CaRotationRequest, CaStatus};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

/// The `ca` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum CaCommand {
    /// Print the SHA-256 of each root in the trust bundle, one per line (64 hex digits: the
    /// last field of a join token, and a sidecar's `controlPlane.caFingerprint`). Reads the
    /// data directory's trust-bundle.pem only; no control plane is called.
    Fingerprint {
        /// A trust bundle file instead of the data directory's (PEM).
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
    },
    /// Where a CA rotation stands: the stage, the roots trusted, what blocks the next step,
    /// and every sidecar's position (needs the viewer role).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take one step of a staged CA rotation (needs the admin role): `prepare` makes a new
    /// CA and adds its root to every sidecar's trust bundle; `activate` signs with it once
    /// every sidecar has that bundle (sidecars then renew early, spread over time); `retire`
    /// drops the old root once no live certificate or join token depends on it. Each step is
    /// refused, with the list of what blocks it, while it would break traffic.
    Rotate {
        /// The step.
        #[arg(value_parser = ["prepare", "activate", "retire"])]
        step: String,
        /// Take the step although something blocks it (the audit trail records it as forced).
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn run(command: CaCommand, access: &ControlPlaneAccess) -> ExitCode {
    match command {
        CaCommand::Fingerprint { bundle } => fingerprint(bundle, access),
        CaCommand::Status { json } => block_on(async move {
            let client = client(access)?;
            let (status, body) = client.call(Method::GET, "/v1/ca", None).await?;
            let ca: CaStatus = answer("GET /v1/ca", status, body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ca)?);
            } else {
                print_status(&ca);
            }
            Ok(())
        }),
        CaCommand::Rotate { step, force } => block_on(async move {
            let client = client(access)?;
            let body = serde_json::to_value(CaRotationRequest {
                step: step.clone(),
                force,
            })?;
            let (status, body) = client
                .call(Method::POST, "/v1/ca/rotation", Some(&body))
                .await?;
            let ca: CaStatus = answer("POST /v1/ca/rotation", status, body)?;
            if ca.forced {
                eprintln!("warning: {step} was FORCED past what blocked it");
            }
            eprintln!("{step}: done; the rotation is {}", ca.stage);
            print_status(&ca);
            Ok(())
        }),
    }
}

fn print_status(ca: &CaStatus) {
    println!(
        "stage {} (rotation {}){}",
        ca.stage,
        ca.rotation,
        match (&ca.changed_by, ca.changed_at) {
            (Some(by), Some(at)) => format!(", last step by {by} at {}", unix_rfc3339(at)),
            _ => String::new(),
        }
    );
    for root in &ca.roots {
        println!(
            "root {:<9} {}  {} (until {})",
            root.role,
            root.sha256,
            root.name,
            unix_rfc3339(root.not_after)
        );
    }
    if ca.blockers.is_empty() {
        println!("next step: {} (nothing blocks it)", ca.next_step);
    } else {
        println!(
            "next step: {} (blocked by {}):",
            ca.next_step,
            ca.blockers.len()
        );
        for blocker in &ca.blockers {
            println!("  {} {}: {}", blocker.kind, blocker.subject, blocker.reason);
        }
    }
    if !ca.sidecars.is_empty() {
        println!(
            "{:<10} {:<9} {:<7} {:<9} IDENTITY",
            "INSTANCE", "CONNECTED", "BUNDLE", "CERT CA"
        );
        for sidecar in &ca.sidecars {
            println!(
                "{:<10} {:<9} {:<7} {:<9} {}",
                sidecar.instance.chars().take(10).collect::<String>(),
                if sidecar.connected { "yes" } else { "no" },
                if sidecar.bundle_applied {
                    "applied"
                } else {
                    "pending"
                },
                sidecar.certificate_ca,
                match &sidecar.replica {
                    Some(replica) => format!("{} (on {replica})", sidecar.identity),
                    None => sidecar.identity.clone(),
                }
            );
        }
    }
}

fn fingerprint(bundle: Option<PathBuf>, access: &ControlPlaneAccess) -> ExitCode {
    let file = bundle.unwrap_or_else(|| bundle_path(&access.data_dir));
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
