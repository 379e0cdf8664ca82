//! The report: one row per measurement, the summary per (contender, workload, metric), the
//! machine, and how each contender fared; written as `report.json` and `report.md`.
//!
//! A row is `{contender, mode, workload, metric, value, unit, round}` (names from
//! [`crate::model`]). The summary holds the median, minimum and maximum over the rounds. Every
//! figure is read against `direct` measured in the same run, and Sidewall's also against the
//! best peer, because absolute numbers on a shared machine drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::goals::Goal;
use crate::model::{Contender, Metric, Workload};

mod compare;
mod markdown;

pub use compare::compare;
pub use markdown::markdown;

/// One measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// A contender name (`direct`, `haproxy`, `sidewall-l4`, …).
    pub contender: String,
    /// `plain` or `mtls`.
    pub mode: String,
    /// A workload name (`throughput-1`, `rr-c64`, …).
    pub workload: String,
    /// A metric name (`gbps`, `p99_us`, …).
    pub metric: String,
    /// The value, in `unit`.
    pub value: f64,
    /// The metric's unit.
    pub unit: String,
    /// The round, from 1.
    pub round: u32,
}

impl Row {
    /// A row with the names, mode and unit filled in from the model.
    pub fn new(
        contender: Contender,
        workload: Workload,
        metric: Metric,
        value: f64,
        round: u32,
    ) -> Self {
        Self {
            contender: contender.name().to_owned(),
            mode: contender.mode().name().to_owned(),
            workload: workload.name().to_owned(),
            metric: metric.name().to_owned(),
            value,
            unit: metric.unit().to_owned(),
            round,
        }
    }
}

/// The rounds of one (contender, workload, metric), summarized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The contender.
    pub contender: String,
    /// Its mode.
    pub mode: String,
    /// The workload.
    pub workload: String,
    /// The metric.
    pub metric: String,
    /// The metric's unit.
    pub unit: String,
    /// The median over the rounds (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many rounds produced a value.
    pub rounds: usize,
}

/// The median of `values`: the middle one, or the mean of the middle two. `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Report order: contenders, workloads and metrics as listed in the model; unknown names last.
fn order_key(row: &Row) -> (usize, usize, usize, String, String, String) {
    let position = |found: Option<usize>| found.unwrap_or(usize::MAX);
    (
        position(
            Contender::ALL
                .iter()
                .position(|c| c.name() == row.contender),
        ),
        position(Workload::ALL.iter().position(|w| w.name() == row.workload)),
        position(Metric::ALL.iter().position(|m| m.name() == row.metric)),
        row.contender.clone(),
        row.workload.clone(),
        row.metric.clone(),
    )
}

/// Groups rows by (contender, workload, metric) and summarizes each group, in report order.
pub fn summarize(rows: &[Row]) -> Vec<Summary> {
    let mut groups: BTreeMap<_, (&Row, Vec<f64>)> = BTreeMap::new();
    for row in rows {
        groups
            .entry(order_key(row))
            .or_insert_with(|| (row, Vec::new()))
            .1
            .push(row.value);
    }
    groups
        .into_values()
        .filter_map(|(first, values)| {
            let median = median(&values)?;
            Some(Summary {
                contender: first.contender.clone(),
                mode: first.mode.clone(),
                workload: first.workload.clone(),
                metric: first.metric.clone(),
                unit: first.unit.clone(),
                median,
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                rounds: values.len(),
            })
        })
        .collect()
}

/// The machine the run was made on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs available to the run.
    pub nproc: usize,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// The kernel release.
    pub kernel: String,
    /// The CPU model name.
    pub cpu_model: String,
    /// The loopback interface's MTU (every chain here runs over it), if readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loopback_mtu: Option<u32>,
    /// The commit of the source the run was made from (`git describe --always --dirty`), if
    /// it was made from a checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

impl Machine {
    /// Reads the description from the running system (`/proc`).
    pub fn describe() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let commit = std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR")])
            .args(["describe", "--always", "--dirty", "--abbrev=12"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            memory_mib: memory_kib / 1024,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            loopback_mtu: read("/sys/class/net/lo/mtu").trim().parse().ok(),
            commit,
        }
    }

    /// How this machine differs from `other`, one phrase per difference (none: comparable).
    pub fn differences(&self, other: &Machine) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what}: {a} against {b}"));
            }
        };
        differ("CPU", self.cpu_model.clone(), other.cpu_model.clone());
        differ("CPUs", self.nproc.to_string(), other.nproc.to_string());
        differ("kernel", self.kernel.clone(), other.kernel.clone());
        let mtu = |m: &Machine| m.loopback_mtu.map_or("unknown".into(), |v| v.to_string());
        differ("loopback MTU", mtu(self), mtu(other));
        out
    }
}

/// How a contender fared in the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContenderStatus {
    /// The contender.
    pub contender: String,
    /// Its mode.
    pub mode: String,
    /// `ran`, `skipped` (not runnable here, with the reason) or `failed` (with the error).
    pub status: String,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version that ran, where the program tells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The settings of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The command line that made the report.
    pub command: String,
    /// Whether `--quick` shortened everything.
    pub quick: bool,
    /// Rounds run (contenders interleaved within each round).
    pub rounds: u32,
    /// Unmeasured lead-in of each timed workload, seconds.
    pub warmup_s: f64,
    /// Measured duration of each timed workload, seconds.
    pub duration_s: f64,
    /// Pause before each memory reading (after start, before and, doubled, after opening the
    /// idle connections), seconds.
    pub settle_s: f64,
    /// Idle connections opened by `idle-10k`.
    pub idle_connections: usize,
    /// The schedule of `rr-fixed-rate`, requests per second.
    pub fixed_rate_rps: u32,
    /// The connections `rr-fixed-rate` spreads its schedule over.
    pub fixed_rate_connections: usize,
    /// Concurrent connect-exchange-close loops of `connect-rate`.
    pub connect_workers: usize,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When the run started, UTC.
    pub started: String,
    /// The machine.
    pub machine: Machine,
    /// The settings.
    pub settings: Settings,
    /// Each contender: ran, skipped or failed.
    pub contenders: Vec<ContenderStatus>,
    /// Remarks a reader needs (deviations, shortened counts, errors during a workload).
    pub notes: Vec<String>,
    /// Every measurement.
    pub rows: Vec<Row>,
    /// Median, min and max per (contender, workload, metric).
    pub summary: Vec<Summary>,
    /// Sidewall's goals from the issue, judged on the summary.
    pub goals: Vec<Goal>,
    /// The crypto floor measured in the run (absent from reports made before it was).
    #[serde(default)]
    pub crypto: Option<crate::floor::CryptoFloor>,
    /// In target mode (`--target`): what was loaded and what its sidecars' metrics said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetRun>,
}

/// A run against a user's deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRun {
    /// `--target`, as given.
    pub target: String,
    /// `--direct`, as given: the same app without the deployment in between.
    pub direct: Option<String>,
    /// `raw` or `http` (`--http`).
    pub framing: String,
    /// The `--metrics` endpoints, scraped before and after every workload.
    pub metrics: Vec<String>,
    /// What changed at each endpoint over each workload of each round.
    pub scrapes: Vec<Scrape>,
}

/// What changed at one metrics endpoint over one workload on `target` (warm-up included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scrape {
    /// The endpoint's URL.
    pub endpoint: String,
    /// The workload.
    pub workload: String,
    /// The round, from 1.
    pub round: u32,
    /// Seconds between the two scrapes.
    pub seconds: f64,
    /// Every series that changed.
    pub changes: Vec<crate::exposition::Change>,
}

impl Report {
    /// The limit of `s`'s workload and metric on this machine ([`crate::floor::Limit`]), when
    /// the run measured the crypto floor and the splice baseline.
    pub fn limit(&self, s: &Summary) -> Option<f64> {
        let workload = Workload::from_name(&s.workload)?;
        let metric = Metric::from_name(&s.metric)?;
        let splice = find(&self.summary, Contender::SpliceBaseline, workload, metric)?;
        crate::floor::Limit {
            floor: self.crypto.as_ref()?,
            cores: self.machine.nproc as f64,
        }
        .of(workload, metric, splice.median)
    }
}

/// The summary entry of (contender, workload, metric), if measured.
pub fn find(
    summary: &[Summary],
    contender: Contender,
    workload: Workload,
    metric: Metric,
) -> Option<&Summary> {
    summary.iter().find(|s| {
        s.contender == contender.name()
            && s.workload == workload.name()
            && s.metric == metric.name()
    })
}

/// The best peer's summary for (workload, metric): highest or lowest median by the metric.
pub fn best_peer(summary: &[Summary], workload: Workload, metric: Metric) -> Option<&Summary> {
    let peers = Contender::PEERS
        .iter()
        .filter_map(|&p| find(summary, p, workload, metric));
    if metric.higher_is_better() {
        peers.max_by(|a, b| a.median.total_cmp(&b.median))
    } else {
        peers.min_by(|a, b| a.median.total_cmp(&b.median))
    }
}

/// `value / reference`, if the reference is usable.
pub fn ratio(value: f64, reference: f64) -> Option<f64> {
    (reference.is_finite() && reference != 0.0 && value.is_finite()).then(|| value / reference)
}

#[cfg(test)]
mod tests;
