//! `sidewall status`: the fleet, one row per sidecar process.

use std::process::ExitCode;

use hyper::Method;

use sidewall_policies::wire::operator::{CaStatus, Fleet};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

/// Flags of `sidewall status`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

/// `in 3h` or `5m ago`, from Unix seconds; `-` for none.
pub(crate) fn when(seconds: Option<i64>) -> String {
    let Some(at) = seconds else {
        return "-".into();
    };
    let delta = at - sidewall_control_plane::now_unix();
    if delta >= 0 {
        format!("in {}", human(delta))
    } else {
        format!("{} ago", human(-delta))
    }
}

fn human(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub(crate) fn run(args: Args) -> ExitCode {
    block_on(async move {
        let client = client(&args.access)?;
        let (status, body) = client.call(Method::GET, "/v1/fleet", None).await?;
        if args.json {
            super::expect_success(status, &body)?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        let fleet: Fleet = answer("GET /v1/fleet", status, body)?;
        println!(
            "policy version {} in force on {}",
            fleet.policy_version, fleet.replica
        );
        if let Some(error) = &fleet.source_error {
            println!("policy directory is invalid (last good set in force): {error}");
        }
        // A CA rotation under way is worth a line (a control plane without the route: none).
        if let Ok((status, body)) = client.call(Method::GET, "/v1/ca", None).await
            && let Ok(ca) = answer::<CaStatus>("GET /v1/ca", status, body)
            && ca.stage != "settled"
        {
            println!(
                "CA rotation {} under way ({}): next step {}, {} (`sidewall ca status`)",
                ca.rotation,
                ca.stage,
                ca.next_step,
                match ca.blockers.len() {
                    0 => "nothing blocks it".to_owned(),
                    n => format!("blocked by {n}"),
                }
            );
        }
        println!(
            "{:<44} {:<21} {:<18} {:>14} {:>14} {:<10} {:<12} LAST REJECTION",
            "IDENTITY", "ENDPOINT", "CONNECTED", "APPLIED", "LATEST", "LAST ACK", "CERT EXPIRY",
        );
        for p in &fleet.proxies {
            let connected = if p.stale {
                format!("stale, ack {}", when(p.last_ack_at))
            } else if p.connected {
                format!("yes, {}", when(Some(p.since)))
            } else {
                format!("no, {}", when(Some(p.since)))
            };
            let number = |v: Option<u64>| v.map_or("-".to_owned(), |n| n.to_string());
            println!(
                "{:<44} {:<21} {:<18} {:>14} {:>14} {:<10} {:<12} {}",
                p.identity,
                p.endpoint.as_deref().unwrap_or("-"),
                connected,
                number(p.applied),
                number(p.sent),
                when(p.last_ack_at),
                when(p.certificate_expires_at),
                p.last_rejection.as_deref().unwrap_or("-"),
            );
        }
        for p in &fleet.proxies {
            for refused in &p.addresses_refused {
                println!(
                    "{} ({}): address {} refused ({}): callers are not sent there",
                    p.identity, p.instance, refused.address, refused.reason,
                );
            }
        }
        Ok(())
    })
}
