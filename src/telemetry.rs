//! The Prometheus recorder both servers install: latencies as histograms with buckets (summaries
//! are per process and cannot be aggregated into a fleet-wide p99), `sidewall_build_info`, and
//! the `process_*` metrics Prometheus users expect, read from `/proc` at each scrape (as the
//! Prometheus client libraries do), so a scrape before and after a load test gives the CPU time
//! spent in between to the clock tick.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Latency buckets in seconds: 100 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// Installs the recorder for `component` (`proxy`, `control-plane`), with the help text of the
/// component's metrics from `describe`, and returns what renders `/metrics`; `None`, with a
/// warning, if it cannot be installed (the admin listener then answers `/metrics` with 404).
pub(crate) fn install(
    component: &'static str,
    describe: fn(),
) -> Option<Arc<dyn Fn() -> String + Send + Sync>> {
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
pub(crate) fn raise_open_files_limit(needed: u64, budgets: &str) {
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
