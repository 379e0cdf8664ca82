//! The `sidewall` command: argument parsing and wiring only; the logic lives in the crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

/// Sidewall: mutual-TLS sidecars with SPIFFE identities and default-deny policy.
#[derive(Parser)]
#[command(name = "sidewall", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policies, ask what they decide, and run their expectation tests.
    #[command(subcommand)]
    Policy(commands::policy::PolicyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(command) => commands::policy::run(command),
    }
}
