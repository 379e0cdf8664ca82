//! `sidewall policy validate | check | test`: the policy language from the command line.
//!
//! Exit codes: `validate` 0 when valid, 1 when not; `check` 0 for any decision, 2 for bad
//! input (including a policy set that does not load); `test` 0 when every case passes, 1
//! when one fails, 2 when the files do not load.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use sidewall_policies::engine::{Query, Request, Subject};
use sidewall_policies::http::{normalize_path, valid_host};
use sidewall_policies::load::{LoadOptions, Loaded, load_paths};
use sidewall_policies::testing;
use sidewall_policies::{Engine, Protocol, SpiffeId};

/// The `policy` subcommands.
#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Check policy files strictly and summarize them.
    ///
    /// Reads *.yaml and *.yml files found recursively under each PATH (a file named directly
    /// is read whatever its extension). Prints `N policies, M rules OK` and the targets that
    /// audit mode leaves open, or every error as `file:line:column: message (hint: ...)`.
    Validate {
        /// Files or directories holding policies.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        limits: Limits,
    },
    /// Ask what the policies decide for one connection or request.
    ///
    /// Without request facts this is a connection to a plain TCP port; --http makes it a
    /// connection to an HTTP port; any of --method, --path, --host makes it one request on an
    /// HTTP port (method defaults to GET, path to /). The path is normalized as the sidecar
    /// normalizes it. The first line is `ALLOW|DENY|AUDIT policy=<name> rule=<n>`
    /// (`policy=- rule=-` for the default deny), then `audit: would ...` when audit policies
    /// would decide differently.
    Check(CheckArgs),
    /// Send a policy set to the control plane; it becomes a new version and is distributed.
    Apply(super::policy_remote::ApplyArgs),
    /// List the policy versions the control plane has stored, and who applied each.
    History(super::policy_remote::HistoryArgs),
    /// Show what changed between two stored versions, policy by policy.
    Diff(super::policy_remote::DiffArgs),
    /// Which recently observed flows a candidate set would flip (nothing is applied).
    Impact(super::policy_remote::ImpactArgs),
    /// Write the smallest allow-list that admits every allowed flow the sidecars observed.
    ///
    /// Learning mode: run targets in audit mode (or with permissive ports) while traffic
    /// flows, then suggest, review, and apply in enforce mode. One file per target: the
    /// policy (each rule names the peers seen, with the ports, methods and paths seen) and a
    /// PolicyTest listing every flow it was made from. Paths are kept to the two segments the
    /// sidecars record: `/a` exactly, `/a/b` with everything under it; a second segment seen
    /// with --generalize-after distinct values becomes `*`, and the output says so. Flows that
    /// were only ever denied get no rule.
    Suggest(super::policy_remote::SuggestArgs),
    /// Run the PolicyTest documents found under PATH against the policies found there.
    Test {
        /// Files or directories holding policies and PolicyTest documents.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        limits: Limits,
    },
}

/// Limits applied while loading.
#[derive(Args)]
pub(crate) struct Limits {
    /// Refuse policy sets with more rules than this.
    #[arg(long, default_value_t = sidewall_policies::load::DEFAULT_MAX_RULES, value_name = "N")]
    max_rules: usize,
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// The peer's SPIFFE ID.
    #[arg(long, value_name = "ID")]
    from: String,
    /// The target service's SPIFFE ID.
    #[arg(long, value_name = "ID")]
    to: String,
    /// The target's service port.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Decide for a port the target serves as HTTP.
    #[arg(long)]
    http: bool,
    /// Request method (makes it a request decision).
    #[arg(long, value_name = "M")]
    method: Option<String>,
    /// Request path, query excluded (makes it a request decision).
    #[arg(long, value_name = "P")]
    path: Option<String>,
    /// Request Host (makes it a request decision).
    #[arg(long, value_name = "H")]
    host: Option<String>,
    /// Also print which policies and rules were considered and why each matched or not.
    #[arg(long)]
    explain: bool,
    /// Ask the running system: the set in force on the control plane, and the port's real
    /// protocol from its directory (unless --http or request facts say otherwise).
    #[arg(long)]
    live: bool,
    /// Policy files or directories (not with --live).
    #[arg(required_unless_present = "live", conflicts_with = "live")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    limits: Limits,
    #[command(flatten)]
    access: super::ControlPlaneAccess,
}

pub(crate) fn run(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Validate { paths, limits } => validate(&paths, &limits),
        PolicyCommand::Check(args) => check(&args),
        PolicyCommand::Apply(args) => super::policy_remote::apply(args),
        PolicyCommand::History(args) => super::policy_remote::history(args),
        PolicyCommand::Diff(args) => super::policy_remote::diff(args),
        PolicyCommand::Impact(args) => super::policy_remote::impact(args),
        PolicyCommand::Suggest(args) => super::policy_remote::suggest(args),
        PolicyCommand::Test { paths, limits } => test(&paths, &limits),
    }
}

fn load(paths: &[PathBuf], limits: &Limits, tests: bool) -> Result<Loaded, ()> {
    let options = LoadOptions {
        max_rules: limits.max_rules,
        tests,
        ..LoadOptions::default()
    };
    load_paths(paths, &options).map_err(|errors| {
        for error in &errors.0 {
            eprintln!("{error}");
        }
        let n = errors.0.len();
        eprintln!("{n} error{}", if n == 1 { "" } else { "s" });
    })
}

fn validate(paths: &[PathBuf], limits: &Limits) -> ExitCode {
    let Ok(loaded) = load(paths, limits, false) else {
        return ExitCode::from(1);
    };
    let set = &loaded.policies;
    println!(
        "{} policies, {} rules OK",
        set.policies().len(),
        set.rule_count()
    );
    for (kind, count) in &loaded.skipped {
        println!("skipped {count} {kind} document{}", plural(*count));
    }
    let open = set.audit_only_targets();
    if !open.is_empty() {
        println!("audit mode leaves these targets open (allowed, recorded, not enforced):");
        for target in open {
            println!("  {target}");
        }
    }
    ExitCode::SUCCESS
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn bad_input(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn check(args: &CheckArgs) -> ExitCode {
    let peer = match SpiffeId::parse(&args.from) {
        Ok(id) => id,
        Err(e) => return bad_input(format_args!("--from {:?}: {e}", args.from)),
    };
    let target = match SpiffeId::parse(&args.to) {
        Ok(id) => id,
        Err(e) => return bad_input(format_args!("--to {:?}: {e}", args.to)),
    };
    let live = if args.live {
        let target = target.to_string();
        let port = args.port;
        let request_facts = args.method.is_some() || args.path.is_some() || args.host.is_some();
        let result = super::block_on_value(async move {
            let client = super::client(&args.access)?;
            let (version, engine) = super::policy_remote::live_engine(&client).await?;
            let protocol = if request_facts {
                None
            } else {
                super::policy_remote::live_protocol(&client, &target, port).await?
            };
            Ok((version, engine, protocol))
        });
        match result {
            Ok(live) => Some(live),
            Err(error) => return bad_input(format_args!("{error:#}")),
        }
    } else {
        None
    };
    let protocol = match (&live, args.http) {
        (_, true) => Some(Protocol::Http),
        (Some((_, _, Some(protocol))), false) => Some(*protocol),
        _ => None,
    };
    let case = match testing::TestCase::new(
        peer,
        target,
        args.port,
        protocol,
        args.method.clone(),
        args.path.clone(),
        args.host.clone(),
        testing::Expectation::Allow,
    ) {
        Ok(case) => case,
        Err(e) => return bad_input(e),
    };
    let path;
    let subject = match &case.request {
        None => Subject::Connection(case.protocol),
        Some(request) => {
            path = match normalize_path(&request.path) {
                Ok(path) => path,
                Err(e) => {
                    return bad_input(format_args!(
                        "--path {:?}: the sidecar refuses this path with 400 before any policy: {e}",
                        request.path
                    ));
                }
            };
            if let Some(host) = request.host.as_deref().filter(|h| !valid_host(h)) {
                return bad_input(format_args!(
                    "--host {host:?}: the sidecar refuses this Host with 400 before any policy: not a host name or IP literal with an optional port 1-65535"
                ));
            }
            Subject::Request(Request {
                method: &request.method,
                path: &path,
                host: request.host.as_deref(),
            })
        }
    };
    let engine = match live {
        Some((version, engine, _)) => {
            eprintln!("(live: policy version {version} in force on the control plane)");
            engine
        }
        None => {
            let Ok(loaded) = load(&args.paths, &args.limits, false) else {
                return ExitCode::from(2);
            };
            Engine::new(loaded.policies)
        }
    };
    let query = Query {
        peer: &case.from,
        target: &case.to,
        port: case.port,
        subject,
    };
    if args.explain {
        let explanation = engine.explain(&query);
        println!("{}", explanation.decision);
        println!("{explanation}");
    } else {
        println!("{}", engine.decide(&query));
    }
    ExitCode::SUCCESS
}

fn test(paths: &[PathBuf], limits: &Limits) -> ExitCode {
    let Ok(loaded) = load(paths, limits, true) else {
        return ExitCode::from(2);
    };
    if loaded.tests.is_empty() {
        eprintln!("error: no PolicyTest documents found");
        return ExitCode::from(1);
    }
    let engine = Engine::new(loaded.policies);
    let report = testing::run(&engine, &loaded.tests);
    for failure in &report.failures {
        println!("{failure}");
    }
    let failed = report.failures.len();
    println!(
        "{} passed, {failed} failed ({} test document{}, {} policies)",
        report.cases - failed,
        loaded.tests.len(),
        plural(loaded.tests.len()),
        engine.policy_set().policies().len(),
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
