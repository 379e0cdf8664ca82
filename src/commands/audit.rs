//! `sidewall audit log | verify`: the control plane's audit trail, read and checked here.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hyper::Method;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sidewall_control_plane::api::unix_rfc3339;
use sidewall_control_plane::audit;
use sidewall_control_plane::client::Client;
use sidewall_control_plane::data_dir::{bundle_path, operator_paths};
use sidewall_policies::TrustDomain;
use sidewall_policies::svid::{Svid, Usage};
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
    /// record's hash, each link to the record before; then each signed checkpoint (the
    /// control plane's certificate, chained to <data-dir>/trust-bundle.pem, its signature, the
    /// record it covers unchanged). Exit 0 when intact; exit 1 naming the first record
    /// altered, removed, out of order or rewritten, a checkpoint that does not verify, or
    /// records no checkpoint covers. Needs the viewer role.
    Verify {
        /// Records older than this must be covered by a signed checkpoint (keep it above the
        /// control plane's audit.checkpointInterval, 60s by default).
        #[arg(long, value_name = "AGE", value_parser = parse_age, default_value = "15m")]
        unsigned_for: Duration,
    },
}

pub(crate) fn parse_age(text: &str) -> Result<Duration, String> {
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
            AuditCommand::Verify { unsigned_for } => {
                let (trust_domain, mut bundle) = trust(access)?;
                // Checkpoints signed before a CA rotation chain to a root it retired since.
                if let Ok(retired) = std::fs::read_to_string(
                    sidewall_control_plane::data_dir::retired_roots_path(&access.data_dir),
                ) {
                    bundle.push_str(&retired);
                }
                let checked = audit::verify(&records).and_then(|count| {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let signed = audit::verify_checkpoints(
                        &records,
                        &trust_domain,
                        &bundle,
                        i64::try_from(now).unwrap_or(i64::MAX),
                        i64::try_from(unsigned_for.as_secs()).unwrap_or(i64::MAX),
                    )?;
                    Ok((count, signed))
                });
                match checked {
                    Ok((0, _)) => println!("audit trail intact: no records yet"),
                    Ok((count, signed)) => {
                        let head = records.last().map_or("", |r| r.hash.as_str());
                        let signed = match signed.covered {
                            0 => "no signed checkpoint yet".to_owned(),
                            covered => format!(
                                "signed up to record {covered} at {} ({} checkpoint{})",
                                unix_rfc3339(signed.at),
                                signed.checkpoints,
                                if signed.checkpoints == 1 { "" } else { "s" }
                            ),
                        };
                        let first = audit::first(&records);
                        println!(
                            "audit trail intact: records {first} to {count}, head {head}; {signed}"
                        );
                    }
                    Err(error) => {
                        eprintln!("audit trail broken: {error}");
                        broken = true;
                    }
                }
            }
        }
        Ok(())
    });
    if broken { ExitCode::from(1) } else { code }
}

/// The trust domain (of the operator credential in use) and its roots, both from the data
/// directory: what the checkpoints must chain to, whatever the control plane answers.
pub(crate) fn trust(access: &ControlPlaneAccess) -> anyhow::Result<(TrustDomain, String)> {
    let bundle_path = bundle_path(&access.data_dir);
    let bundle = std::fs::read_to_string(&bundle_path)
        .with_context(|| format!("reading the trust bundle {}", bundle_path.display()))?;
    let (cert_path, _) = operator_paths(&access.data_dir, &access.operator);
    let pem = std::fs::read(&cert_path)
        .with_context(|| format!("reading the operator credential {}", cert_path.display()))?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .with_context(|| format!("{}: no certificate", cert_path.display()))?;
    let svid = Svid::from_der(&der, Usage::Client)
        .with_context(|| format!("{}: not an SVID", cert_path.display()))?;
    Ok((svid.id.trust_domain(), bundle))
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

/// A detail as the table shows it: hashes and signatures (long hex) and certificates (PEM) cut
/// to their start, on one line (`--json` has them whole).
fn short(value: &str) -> String {
    let hex = value.len() >= 32 && value.bytes().all(|b| b.is_ascii_hexdigit());
    if value.starts_with("-----BEGIN") {
        "-----BEGIN…".to_owned()
    } else if hex {
        format!("{}…", &value[..8])
    } else {
        value.replace('\n', " ")
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
        let details: Vec<String> = r
            .details
            .iter()
            .map(|(k, v)| format!("{k}={}", short(v)))
            .collect();
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
