//! What a process that runs a sidecar (or the control plane) needs from its host, shared by
//! the `sidewall` binary and the lean `sidewall-proxy`: the log subscriber, the Prometheus
//! recorder (latencies as histograms with buckets: summaries are per process and cannot be
//! aggregated into a fleet-wide p99), `sidewall_build_info`, the `process_*` metrics Prometheus
//! users expect, read from `/proc` at each scrape (as the Prometheus client libraries do, so a
//! scrape before and after a load test gives the CPU time spent in between to the clock tick),
//! the open-files limit, the shutdown signals, and [`run_sidecar`]: `sidewall proxy` itself.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::config::Config;

/// Latency buckets in seconds: 100 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// Installs the recorder for `component` (`proxy`, `control-plane`), with the help text of the
/// component's metrics from `describe`, and returns what renders `/metrics`; `None`, with a
/// warning, if it cannot be installed (the admin listener then answers `/metrics` with 404).
pub fn install(component: &'static str, describe: fn()) -> Option<crate::metric::Render> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|error| eprintln!("warning: metrics disabled: {error}"))
        .ok()?;
    describe();
    describe_process();
    metrics::gauge!("sidewall_build_info", "version" => env!("CARGO_PKG_VERSION"), "component" => component)
        .set(1.0);
    Some(Arc::new(move || {
        sample_process();
        handle.render()
    }))
}

/// The help text of the metrics every component exports.
fn describe_process() {
    use metrics::describe_gauge;
    describe_gauge!("sidewall_build_info", "The release running (always 1).");
    describe_gauge!(
        "process_cpu_seconds_total",
        metrics::Unit::Seconds,
        "User and system CPU time spent."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        metrics::Unit::Bytes,
        "Resident memory size."
    );
    describe_gauge!(
        "process_virtual_memory_bytes",
        metrics::Unit::Bytes,
        "Virtual memory size."
    );
    describe_gauge!("process_open_fds", "Open file descriptors.");
    describe_gauge!("process_max_fds", "The limit on open file descriptors.");
    describe_gauge!(
        "process_start_time_seconds",
        metrics::Unit::Seconds,
        "Start time of the process since the Unix epoch."
    );
}

/// `/proc` reports CPU times in USER_HZ, 100 on Linux whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// Reads this process's CPU time, memory, file descriptors and start time into gauges. What
/// cannot be read is left as it was.
fn sample_process() {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which may hold spaces: field N is at N - 3.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            // A gauge: `metrics` counters hold whole numbers only.
            metrics::gauge!("process_cpu_seconds_total").set((user + system) / USER_HZ);
        }
        if let Some(bytes) = field(23) {
            metrics::gauge!("process_virtual_memory_bytes").set(bytes);
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let (Some(boot), Some(ticks)) = (boot, field(22)) {
            metrics::gauge!("process_start_time_seconds").set(boot + ticks / USER_HZ);
        }
    }
    let resident = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        });
    if let Some(kib) = resident {
        metrics::gauge!("process_resident_memory_bytes").set(kib * 1024.0);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(entries.count() as f64);
    }
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        metrics::gauge!("process_max_fds").set(soft as f64);
    }
}

/// Raises the soft limit on open files to the hard limit (review L3: systemd's default soft
/// limit of 1024 would make a few hundred connections fail with EMFILE), and warns when even
/// that is below what the configured budgets may open (`needed` descriptors).
pub fn raise_open_files_limit(needed: u64, budgets: &str) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(soft, hard, %error, "cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            budgets,
            "the open-files limit is below what the connection budgets may need: connections will fail with EMFILE before the budgets refuse them; raise LimitNOFILE (systemd), --ulimit nofile (Docker) or lower the budgets"
        );
    } else {
        tracing::info!(limit, needed, "open-files limit");
    }
}

/// The log subscriber on stderr: `SIDEWALL_LOG` filters (default `info`); one JSON object per
/// line with `json`, readable lines otherwise (with colours on a terminal).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIDEWALL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal that comes while the server is still starting (after it
/// wrote where it listens) is then a clean shutdown, not the default action's kill. Call it
/// inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (terminate, interrupt) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let wait = |installed: std::io::Result<tokio::signal::unix::Signal>| async move {
            match installed {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot watch a shutdown signal");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(terminate) => {}
            () = wait(interrupt) => {}
        }
        tracing::info!("shutting down");
    }
}

/// `sidewall proxy --config FILE [--check]` and `sidewall-proxy`: checks the configuration
/// (exit 2 on an error, before any port is bound), or binds and runs the sidecar until a
/// shutdown signal. Logging must be set up, and the crypto provider installed, by the caller.
pub fn run_sidecar(path: &Path, check: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!(
            "{}: OK: {} with {} inbound port(s), {} route(s){}{}",
            path.display(),
            config.identity,
            config.inbound.ports.len(),
            config.outbound.routes.len(),
            if config.outbound.transparent.is_some() {
                ", transparent mode"
            } else {
                ""
            },
            if config.local.is_some() {
                ", local snapshot"
            } else {
                ""
            },
        );
        return ExitCode::SUCCESS;
    }
    // Each authenticated inbound and each outbound connection holds two descriptors (peer and
    // app), a handshake one.
    let limits = &config.limits;
    raise_open_files_limit(
        (4 * limits.max_connections + limits.max_handshakes + 64) as u64,
        "2 x limits.maxConnections (inbound) + 2 x limits.maxConnections (outbound) + limits.maxHandshakes + 64",
    );
    let metrics = install("proxy", crate::metric::describe);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let shutdown = shutdown_signal();
        let listeners = match crate::bind(&config).await {
            Ok(listeners) => listeners,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(1);
            }
        };
        crate::run(config, listeners, metrics, shutdown).await;
        ExitCode::SUCCESS
    })
}
