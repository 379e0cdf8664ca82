//! `sidewall-bench`: Sidewall's forwarding path side by side with direct connections, a copy
//! baseline and peer proxies, in one run, every figure a ratio to `direct` (issue 8).
//!
//! ```text
//! cargo run --release -p sidewall-bench -- [--quick] [--only CONTENDER] [--out DIR]
//!                                          [--rounds N] [--sidewall PATH] [--workloads W]
//! cargo run --release -p sidewall-bench -- compare A B   # two report directories
//! sidewall-bench serve --listen ADDR                     # the app for target mode
//! sidewall-bench --target HOST:PORT [--direct HOST:PORT] [--metrics URL]… [--http]
//! ```
//!
//! - [`runner`]: rounds of (start contender → every workload → stop), then the report.
//! - [`contenders`]: each contender as a two-hop chain (`peers`, `sidewall` inside), whether
//!   it can run here, readiness; the copy- and splice-baseline relays (this binary's hidden `relay`).
//! - [`load`]: the load generator: bulk, closed and open loop, connection rate, idle.
//! - [`http1`]: the little HTTP/1.1 the `sidewall-http` chain needs, both ends.
//! - [`server`]: the in-process echo/sink server at the end of every chain.
//! - [`procs`]: child processes in their own groups, CPU and RSS from `/proc`, stopping.
//! - [`progress`]: the progress line.
//! - [`target`]: target mode, a user's own deployment loaded instead of the chains started here.
//!
//! The library (`src/lib.rs`) holds the names, the certificates, the report and the plots.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sidewall_bench::model::{Contender, Workload};

mod contenders;
mod http1;
mod load;
mod procs;
mod progress;
mod runner;
mod server;
mod target;

/// Benchmark Sidewall's data path against direct connections and peer proxies.
#[derive(Parser)]
#[command(name = "sidewall-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A short run (1 round, 1 s per workload, 1,000 idle connections): the CI smoke test.
    #[arg(long)]
    quick: bool,
    /// Run only these contenders (repeat or separate with commas); `direct` always runs,
    /// because every figure is a ratio to it. Names: direct, copy-baseline, splice-baseline,
    /// haproxy, nginx, stunnel, sidewall-l4, sidewall-l4-dedicated, sidewall-http.
    #[arg(long, value_name = "CONTENDER", value_delimiter = ',')]
    only: Vec<String>,
    /// Load your own deployment instead of the chains this harness starts: HOST:PORT is where
    /// your client connects (a sidecar's outbound route, or a port behind a sidecar), and the
    /// app behind it must be `sidewall-bench serve`. The report calls it `target`.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["only", "sidewall"])]
    target: Option<String>,
    /// With --target: the same `sidewall-bench serve` reached without the deployment, measured
    /// in the same run as `direct`, so every figure of `target` has its ratio to it.
    #[arg(long, value_name = "HOST:PORT", requires = "target")]
    direct: Option<String>,
    /// With --target: a sidecar's metrics (its admin listener, e.g.
    /// http://127.0.0.1:4691/metrics), scraped before and after every workload; repeat for each
    /// sidecar on the path. The report lists what changed and takes CPU and memory from them.
    #[arg(long, value_name = "URL", requires = "target")]
    metrics: Vec<String>,
    /// With --target: speak HTTP/1.1 (POST /echo, POST /sink, GET /count, host b.bench.local)
    /// for a port the sidecar declares `protocol: http`; the policy must allow them.
    #[arg(long, requires = "target")]
    http: bool,
    /// Where report.md, report.json and plots/ go. Default: bench/results/<timestamp>/.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Rounds; contenders are interleaved within each. Default: 3 (1 with --quick).
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// The sidecar binary: `sidewall-proxy` (the lean one) or `sidewall`, to compare builds.
    /// Default: `sidewall-proxy` next to this executable, built there if missing.
    #[arg(long, value_name = "PATH")]
    sidewall: Option<PathBuf>,
    /// Run only these workloads (for profiling one path; the report says so). Names:
    /// throughput-1, throughput-8, rr-c1, rr-c16, rr-c64, rr-fixed-rate, connect-rate, idle-10k.
    #[arg(long, value_name = "WORKLOAD", value_delimiter = ',')]
    workloads: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Compare two reports: each (contender, workload, metric) both measured, B over A, and
    /// each contender's ratio to `direct` in both; the machines and sources are named and
    /// their differences said.
    Compare {
        /// The earlier report: a directory holding report.json, or the file.
        a: PathBuf,
        /// The later report.
        b: PathBuf,
    },
    /// Serve the app that target mode loads: echo, sink and the count of bytes sunk, in raw
    /// bytes and HTTP/1.1 on one port. Put it behind your sidecar, then run
    /// `sidewall-bench --target` against the sidecar.
    Serve {
        /// Where to listen.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
    /// The copy-baseline hop (started by the harness itself).
    #[command(hide = true)]
    Relay {
        /// Where to accept.
        #[arg(long)]
        listen: SocketAddr,
        /// Where to connect.
        #[arg(long)]
        to: SocketAddr,
        /// Move bytes with `splice(2)` (the splice-baseline hop).
        #[arg(long)]
        splice: bool,
    },
}

/// A report, from its directory or its `report.json`.
fn read_report(path: &std::path::Path) -> Result<sidewall_bench::report::Report, String> {
    let file = if path.is_dir() {
        path.join("report.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a sidewall-bench report: {e}", file.display()))
}

fn compare(a: &std::path::Path, b: &std::path::Path) -> ExitCode {
    match (read_report(a), read_report(b)) {
        (Ok(old), Ok(new)) => {
            let text = sidewall_bench::report::compare(
                &old,
                &a.display().to_string(),
                &new,
                &b.display().to_string(),
            );
            print!("{text}");
            ExitCode::SUCCESS
        }
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

/// `--target` and its companions, checked.
fn target_options(given: &str, cli: &Cli) -> Result<target::Target, String> {
    let entry = target::resolve("--target", given)?;
    let direct = match &cli.direct {
        Some(direct) => Some((direct.clone(), target::resolve("--direct", direct)?)),
        None => None,
    };
    let metrics = cli
        .metrics
        .iter()
        .map(|url| target::Endpoint::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(target::Target {
        given: given.to_owned(),
        entry,
        direct,
        framing: if cli.http {
            load::Framing::Http
        } else {
            load::Framing::Raw
        },
        metrics,
    })
}

/// A runtime with a worker per CPU; `None`, said on stderr, if it cannot start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, usize::from))
        .enable_all()
        .build()
        .map_err(|error| eprintln!("error: cannot start the runtime: {error}"))
        .ok()
}

/// SIGTERM, watched from now on (inside the runtime); `None`, said on stderr, if it cannot be.
fn sigterm() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| eprintln!("error: cannot watch SIGTERM: {error}"))
        .ok()
}

/// `serve`: the server until SIGTERM or Ctrl-C.
fn serve(listen: SocketAddr) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let server = match server::Server::bind(listen).await {
            Ok(server) => server,
            Err(error) => {
                eprintln!("error: cannot listen on {listen}: {error}");
                return ExitCode::FAILURE;
            }
        };
        let Some(mut terminate) = sigterm() else {
            return ExitCode::FAILURE;
        };
        println!(
            "serving echo, sink and count on {} (raw bytes and HTTP/1.1)",
            server.addr
        );
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        ExitCode::SUCCESS
    })
}

/// The command line as a user would type it again.
fn command_line() -> String {
    let release = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_str()? == "release"))
        .unwrap_or(false);
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "cargo run {}-p sidewall-bench{}{}",
        if release { "--release " } else { "" },
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Relay { listen, to, splice }) => {
            return match contenders::relay(listen, to, splice) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("relay: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Compare { a, b }) => return compare(&a, &b),
        Some(Command::Serve { listen }) => return serve(listen),
        None => {}
    }
    let mut only = Vec::new();
    for name in &cli.only {
        match Contender::from_name(name) {
            Some(contender) => only.push(contender),
            None => {
                eprintln!("error: --only {name}: no such contender");
                return ExitCode::from(2);
            }
        }
    }
    let mut workloads = Vec::new();
    for name in &cli.workloads {
        match Workload::from_name(name) {
            Some(workload) => workloads.push(workload),
            None => {
                eprintln!("error: --workloads {name}: no such workload");
                return ExitCode::from(2);
            }
        }
    }
    let target = match &cli.target {
        Some(given) => match target_options(given, &cli) {
            Ok(target) => Some(target),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let options = runner::Options {
        target,
        workloads,
        quick: cli.quick,
        only,
        out: cli.out,
        rounds: cli.rounds,
        sidewall: cli.sidewall,
        command: command_line(),
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let Some(mut terminate) = sigterm() else {
            return ExitCode::FAILURE;
        };
        // Dropping the run (on a signal) drops every started process group: SIGKILL to each.
        tokio::select! {
            result = runner::run(options) => match result {
                Ok(out) => {
                    eprintln!("report: {}", out.join("report.md").display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\ninterrupted: stopped every process this run started");
                ExitCode::from(130)
            }
            _ = terminate.recv() => {
                eprintln!("terminated: stopped every process this run started");
                ExitCode::from(143)
            }
        }
    })
}
