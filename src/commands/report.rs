//! `sidewall report`: the signed segmentation report for auditors (docs/compliance.md). The
//! control plane builds the JSON and signs it; this checks the signature against the trust
//! bundle in the data directory, then writes the JSON, the signature, the signing chain and a
//! self-contained HTML page rendered from the JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hyper::Method;
use sidewall_control_plane::audit::SignatureCheck;
use sidewall_policies::wire::report::{Report, SignedReport};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

/// `sidewall report`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The period the report covers, back from now (like 24h, 30d, 90d).
    #[arg(long, value_name = "AGE", value_parser = super::audit::parse_age, default_value = "30d")]
    since: Duration,
    /// The directory to write report.json, report.json.sig (DER), chain.pem and report.html
    /// into (created if missing; files of an earlier report there are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

pub(crate) fn run(args: Args) -> ExitCode {
    block_on(async {
        let (trust_domain, bundle) = super::audit::trust(&args.access)?;
        let client = client(&args.access)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let since = i64::try_from(now.saturating_sub(args.since.as_secs())).unwrap_or(0);
        let body = serde_json::json!({ "since": since });
        let (status, answer_body) = client
            .call(Method::POST, "/v1/reports", Some(&body))
            .await?;
        let signed: SignedReport = answer("POST /v1/reports", status, answer_body)?;
        let signature = sidewall_control_plane::random::unhex(&signed.signature)
            .context("the control plane's signature is not hex")?;
        let report: Report = serde_json::from_str(&signed.report)
            .context("the control plane's report is not what this sidewall reads")?;
        // Signed just now: its certificate must be valid now.
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        SignatureCheck::new(&trust_domain, &bundle)
            .verify(&signed.chain, signed.report.as_bytes(), &signature, now)
            .map_err(|e| anyhow::anyhow!("the report's signature does not verify: {e}"))?;
        let out = &args.out;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let write = |name: &str, bytes: &[u8]| {
            let path = out.join(name);
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
        };
        write("report.json", signed.report.as_bytes())?;
        write("report.json.sig", &signature)?;
        write("chain.pem", signed.chain.as_bytes())?;
        write(
            "report.html",
            sidewall_control_plane::report::html(&report).as_bytes(),
        )?;
        println!(
            "report {} to {}: {} workloads, {} rules in force, {} denied attempts; signed by the \
             control plane, signature verified against {}",
            report.since,
            report.until,
            report.scope.workloads.len(),
            report.segmentation.rules.len(),
            report.segmentation.denied_attempts,
            sidewall_control_plane::data_dir::bundle_path(&args.access.data_dir).display()
        );
        println!(
            "wrote {0}/report.html, {0}/report.json, {0}/report.json.sig, {0}/chain.pem \
             (docs/compliance.md shows how to verify them with openssl)",
            out.display()
        );
        Ok(())
    })
}
