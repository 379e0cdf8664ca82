//! `sidewall audit log | verify`: the control plane's audit trail, read and checked here.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::Method;
use sidewall_control_plane::api::unix_rfc3339;
use sidewall_control_plane::audit;
use sidewall_control_plane::client::Client;
use sidewall_policies::wire::operator::{AuditPage, AuditRecord};

use super::ControlPlaneAccess;
use super::{answer, block_on, client};

/// The `audit` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum AuditCommand {
    /// Print the audit trail, oldest first: number, time, who, what, to what, and the
    /// change's details. Needs the viewer role.
    Log {
        /// Only records this recent (like 90m, 24h, 30d).
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        since: Option<Duration>,
        /// One JSON object per line (for a SIEM), every field: seq, time (Unix seconds),
        /// actor, action, subject, details, prev, hash.
        #[arg(long)]
        json: bool,
    },
    /// Check the whole trail here, record by record: numbers from 1 without gaps, each
    /// record's hash, each link to the record before. Exit 0 when intact; exit 1 naming the
    /// first record altered, removed or out of order. Needs the viewer role.
    Verify,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    sidewall_policies::policy::parse_duration_within(text, Duration::from_secs(3660 * 86_400))
        .map_err(|e| e.to_string())
}

pub(crate) fn run(command: AuditCommand, access: &ControlPlaneAccess) -> ExitCode {
    let mut broken = false;
    let code = block_on(async {
        let client = client(access)?;
        let records = fetch(&client).await?;
        match command {
            AuditCommand::Log { since, json } => print(&records, since, json)?,
            AuditCommand::Verify => match audit::verify(&records) {
                Ok(0) => println!("audit trail intact: no records yet"),
                Ok(count) => {
                    let head = records.last().map_or("", |r| r.hash.as_str());
                    println!("audit trail intact: records 1 to {count}, head {head}");
                }
                Err(error) => {
                    eprintln!("audit trail broken: {error}");
                    broken = true;
                }
            },
        }
        Ok(())
    });
    if broken { ExitCode::from(1) } else { code }
}

/// Every record, page by page, in the order the store holds them.
async fn fetch(client: &Client) -> anyhow::Result<Vec<AuditRecord>> {
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let path = format!("/v1/audit?after={after}");
        let (status, body) = client.call(Method::GET, &path, None).await?;
        let page: AuditPage = answer("GET /v1/audit", status, body)?;
        records.extend(page.records);
        match page.next {
            Some(next) if next > after => after = next,
            _ => return Ok(records),
        }
    }
}

fn print(records: &[AuditRecord], since: Option<Duration>, json: bool) -> anyhow::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let from = since.map_or(i64::MIN, |age| {
        i64::try_from(now.saturating_sub(age.as_secs())).unwrap_or(i64::MAX)
    });
    let shown = records.iter().filter(|r| r.time >= from);
    if json {
        for record in shown {
            println!("{}", serde_json::to_string(record)?);
        }
        return Ok(());
    }
    println!(
        "{:>5}  {:<20}  {:<24}  {:<46}  {:<20}  DETAILS",
        "SEQ", "TIME", "ACTION", "ACTOR", "SUBJECT"
    );
    for r in shown {
        let details: Vec<String> = r.details.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:>5}  {:<20}  {:<24}  {:<46}  {:<20}  {}",
            r.seq,
            unix_rfc3339(r.time),
            r.action,
            r.actor,
            r.subject,
            details.join(" ")
        );
    }
    Ok(())
}
