//! The `sidewall` command: argument parsing and wiring only; the logic lives in the crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod commands;

use commands::ControlPlaneAccess;

/// Sidewall: mutual-TLS sidecars with SPIFFE identities and default-deny policy.
#[derive(Parser)]
#[command(name = "sidewall", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SIDEWALL_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policies, ask what they decide, and run their expectation tests.
    #[command(subcommand)]
    Policy(commands::policy::PolicyCommand),
    /// Run the control plane: the CA, attestation and the API.
    ControlPlane(commands::control_plane::Args),
    /// Run a sidecar beside a service: mTLS in and out, policy enforced before any byte.
    Proxy(commands::proxy::Args),
    /// Send an app's TCP through its sidecar in this network namespace (transparent mode).
    #[command(subcommand)]
    Iptables(commands::iptables::IptablesCommand),
    /// Create, list and revoke join tokens (needs an operator credential).
    Token {
        #[command(subcommand)]
        command: commands::token::TokenCommand,
        #[command(flatten)]
        access: ControlPlaneAccess,
    },
    /// Revoke workloads and list registered ones (needs an operator credential).
    Workload {
        #[command(subcommand)]
        command: commands::workload::WorkloadCommand,
        #[command(flatten)]
        access: ControlPlaneAccess,
    },
    /// The fleet: each sidecar's connection, versions, acks and certificate expiry.
    Status(commands::status::Args),
    /// Check an admin endpoint (`/ready`, `/live`) for container health checks in images
    /// without curl: exit 0 on a 2xx answer, 1 otherwise, 2 on a bad URL.
    Probe(commands::probe::Args),
    /// Run a whole mesh on loopback (control plane, demo apps, sidecars) with a live view.
    Up(commands::up::Args),
    /// The small demo app `sidewall up` runs behind each sidecar.
    #[command(hide = true)]
    DemoApp(commands::demo_app::Args),
    /// The CA: the fingerprint of its root (what sidecars pin), and its staged rotation.
    Ca {
        #[command(subcommand)]
        command: commands::ca::CaCommand,
        #[command(flatten)]
        access: ControlPlaneAccess,
    },
    /// Issue, list and revoke operator credentials (needs the admin role).
    Operator {
        #[command(subcommand)]
        command: commands::operator::OperatorCommand,
        #[command(flatten)]
        access: ControlPlaneAccess,
    },
    /// The control plane's audit trail: every change, who made it, chained by hash; print it
    /// or check it (needs an operator credential).
    Audit {
        #[command(subcommand)]
        command: commands::audit::AuditCommand,
        #[command(flatten)]
        access: ControlPlaneAccess,
    },
    /// Write the signed segmentation report for auditors: scope, who may reach whom, what was
    /// observed and refused, encryption, changes, certificates and the controls each section
    /// supports, as report.html, report.json, its signature and the signing chain (needs the
    /// viewer role; docs/compliance.md).
    Report(commands::report::Args),
    /// Test what the policies say against what the sidecars do: `verify segmentation` has
    /// each source sidecar probe the pairs that must be denied (needs the policy role).
    Verify {
        #[command(subcommand)]
        command: commands::verify::VerifyCommand,
        #[command(flatten)]
        access: ControlPlaneAccess,
    },
}

fn init_logging(format: LogFormat) {
    sidewall_proxy::process::init_logging(matches!(format, LogFormat::Json));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A process `sidewall up` started ends with it, however `up` ends.
    if !commands::up::exit_with_parent() {
        return ExitCode::from(1);
    }
    // One crypto provider for the whole process (aws-lc-rs); failure means one is installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Policy(command) => commands::policy::run(command),
        Command::ControlPlane(args) => {
            init_logging(cli.log_format);
            commands::control_plane::run(args)
        }
        Command::Proxy(args) => {
            init_logging(cli.log_format);
            commands::proxy::run(args)
        }
        Command::Token { command, access } => commands::token::run(command, &access),
        Command::Workload { command, access } => commands::workload::run(command, &access),
        Command::Status(args) => commands::status::run(args),
        Command::Probe(args) => commands::probe::run(args),
        Command::Up(args) => commands::up::run(args),
        Command::DemoApp(args) => commands::demo_app::run(args),
        Command::Iptables(command) => commands::iptables::run(command),
        Command::Operator { command, access } => commands::operator::run(command, &access),
        Command::Audit { command, access } => commands::audit::run(command, &access),
        Command::Ca { command, access } => commands::ca::run(command, &access),
        Command::Report(args) => commands::report::run(args),
        Command::Verify { command, access } => commands::verify::run(command, &access),
    }
}
