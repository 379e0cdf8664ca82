//! `sidewall status`: the fleet, one row per sidecar process.

use std::process::ExitCode;

use hyper::Method;

use super::{block_on, client, expect_success};
use crate::ControlPlaneAccess;

/// Flags of `sidewall status`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: ControlPlaneAccess,
}

pub(crate) fn when(seconds: &serde_json::Value) -> String {
    let Some(at) = seconds.as_i64() else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let delta = at - now;
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
        expect_success(status, &body)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        println!(
            "policy version {} in force on {}",
            body["policy_version"],
            body["replica"].as_str().unwrap_or("?")
        );
        if let Some(error) = body["source_error"].as_str() {
            println!("policy directory is invalid (last good set in force): {error}");
        }
        println!(
            "{:<44} {:<21} {:<18} {:>14} {:>14} {:<10} {:<12} LAST REJECTION",
            "IDENTITY", "ENDPOINT", "CONNECTED", "APPLIED", "LATEST", "LAST ACK", "CERT EXPIRY",
        );
        for p in body["proxies"].as_array().into_iter().flatten() {
            let connected = if p["stale"] == true {
                format!("stale, ack {}", when(&p["last_ack_at"]))
            } else if p["connected"] == true {
                format!("yes, {}", when(&p["since"]))
            } else {
                format!("no, {}", when(&p["since"]))
            };
            let number =
                |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |n| n.to_string());
            println!(
                "{:<44} {:<21} {:<18} {:>14} {:>14} {:<10} {:<12} {}",
                p["identity"].as_str().unwrap_or("?"),
                p["endpoint"].as_str().unwrap_or("-"),
                connected,
                number(&p["applied"]),
                number(&p["sent"]),
                when(&p["last_ack_at"]),
                when(&p["certificate_expires_at"]),
                p["last_rejection"].as_str().unwrap_or("-"),
            );
        }
        for p in body["proxies"].as_array().into_iter().flatten() {
            for refused in p["addresses_refused"].as_array().into_iter().flatten() {
                println!(
                    "{} ({}): address {} refused ({}): callers are not sent there",
                    p["identity"].as_str().unwrap_or("?"),
                    p["instance"].as_str().unwrap_or("?"),
                    refused["address"].as_str().unwrap_or("?"),
                    refused["reason"].as_str().unwrap_or("?"),
                );
            }
        }
        Ok(())
    })
}
