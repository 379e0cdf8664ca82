//! `sidewall verify segmentation`: the sidecars test that the pairs the policies in force must
//! deny are refused (docs/compliance.md#segmentation-testing).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use hyper::Method;
use sidewall_policies::wire::ProbeAnswer;
use sidewall_policies::wire::report::Verification;

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

/// The `verify` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum VerifyCommand {
    /// For each pair of workloads the policies in force must keep apart (source, target,
    /// port), the source's own sidecar dials the target's sidecar as itself, past its own
    /// checks, marked as a probe that never reaches an app; the target must refuse. Prints
    /// every pair and its answer; exit 0 when every target refused, 1 naming each pair that was
    /// admitted or not answered, or when pairs could not be probed (a source with no connected
    /// sidecar of this release). Needs the policy role; recorded in the audit trail.
    Segmentation {
        /// Probe only this many pairs, picked at random (default: all, up to 10000).
        #[arg(long, value_name = "N")]
        sample: Option<usize>,
        /// How long to wait for the answers.
        #[arg(long, value_name = "AGE", value_parser = super::audit::parse_age, default_value = "2m")]
        timeout: Duration,
        /// Print the run as JSON (the `GET /v1/verifications/{id}` answer).
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: VerifyCommand, access: &ControlPlaneAccess) -> ExitCode {
    let VerifyCommand::Segmentation {
        sample,
        timeout,
        json,
    } = command;
    let mut failed = false;
    let code = block_on(async {
        let client = client(access)?;
        let body = serde_json::json!({ "sample": sample });
        let (status, reply) = client
            .call(Method::POST, "/v1/verifications", Some(&body))
            .await?;
        let mut run: Verification = answer("POST /v1/verifications", status, reply)?;
        let deadline = Instant::now() + timeout;
        while !run.finished && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let path = format!("/v1/verifications/{}", run.id);
            let (status, reply) = client.call(Method::GET, &path, None).await?;
            run = answer("GET /v1/verifications", status, reply)?;
        }
        failed = !run.finished || run.failures().next().is_some() || run.unprobed > 0;
        if json {
            println!("{}", serde_json::to_string_pretty(&run)?);
            return Ok(());
        }
        print(&run);
        Ok(())
    });
    if failed && code == ExitCode::SUCCESS {
        ExitCode::from(1)
    } else {
        code
    }
}

fn print(run: &Verification) {
    println!(
        "verification {}: {} pair{} that policy version {} must deny, probed by the sources' sidecars{}",
        run.id,
        run.pairs.len(),
        if run.pairs.len() == 1 { "" } else { "s" },
        run.policy_version,
        match run.unprobed {
            0 => String::new(),
            n => format!(" ({n} more with no connected sidecar of this release to probe them)"),
        }
    );
    if !run.pairs.is_empty() {
        println!("{:<48}  {:<48}  {:>5}  ANSWER", "SOURCE", "TARGET", "PORT");
        for pair in &run.pairs {
            println!(
                "{:<48}  {:<48}  {:>5}  {}",
                pair.source,
                pair.target,
                pair.port,
                describe(pair.answer)
            );
        }
    }
    if run.unordered_answers > 0 {
        // Ignored, so the verdict stands; but a sidecar that answers what it was not asked is
        // broken or not what it claims to be.
        eprintln!(
            "warning: {} answer{} came for probes no sidecar was ordered to make (ignored; the control plane's log names the sidecar)",
            run.unordered_answers,
            if run.unordered_answers == 1 { "" } else { "s" }
        );
    }
    let failures: Vec<_> = run.failures().collect();
    if !run.finished {
        eprintln!("segmentation not verified: the answers did not all come in time");
    } else if failures.is_empty() && run.unprobed > 0 {
        eprintln!(
            "segmentation not verified: {} pair{} could not be probed (no connected sidecar of this release at the source, or past the 10000 a run takes)",
            run.unprobed,
            if run.unprobed == 1 { "" } else { "s" }
        );
    } else if run.pairs.is_empty() {
        println!(
            "nothing to test: the policies in force deny no registered port to any known workload"
        );
    } else if failures.is_empty() {
        println!("segmentation holds: every target refused");
    } else {
        eprintln!(
            "segmentation broken: {} pair{} not refused:",
            failures.len(),
            if failures.len() == 1 { "" } else { "s" }
        );
        for pair in failures {
            eprintln!(
                "  {} -> {}:{} ({} at {})",
                pair.source,
                pair.target,
                pair.port,
                describe(pair.answer),
                pair.endpoint
            );
        }
    }
}

fn describe(answer: ProbeAnswer) -> &'static str {
    match answer {
        ProbeAnswer::Pending => "pending",
        ProbeAnswer::Refused => "refused",
        ProbeAnswer::Admitted => "ADMITTED",
        ProbeAnswer::NoAnswer => "no answer",
    }
}
