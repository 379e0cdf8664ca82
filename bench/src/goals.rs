//! Sidewall's data-path goals from issue 8, judged on a run's summary (never asserted in
//! tests: a report states them, a reader decides what to do).
//!
//! Each goal compares `sidewall-l4` with the best peer or with `direct` measured in the same
//! run, or with a fixed budget: 2× the best peer's single-stream throughput, 5× its
//! new-connection rate, p99 at c=64 within 3× of direct, half its CPU per GB, at most 20 KiB
//! per idle connection for the pair, idle RSS at most 10 MiB per sidecar. Issue 22 adds the
//! machine's limit ([`crate::floor::Limit`]): single-stream throughput and CPU per GB within
//! 10 % of it.

use serde::{Deserialize, Serialize};

use crate::model::{Contender, Metric, Workload};
use crate::report::{Summary, best_peer, find, ratio};

/// Whether a goal is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The figure reaches the goal.
    Met,
    /// It does not.
    NotMet,
    /// A figure it needs was not measured (a contender skipped or failed).
    Unknown,
}

impl Verdict {
    /// How the verdict reads in a report.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "**not met**",
            Verdict::Unknown => "unknown",
        }
    }
}

/// One goal and how the run measured against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// The goal as the issue states it.
    pub goal: String,
    /// The workload it is judged on.
    pub workload: String,
    /// The metric it is judged on.
    pub metric: String,
    /// The metric's unit.
    pub unit: String,
    /// Sidewall's median.
    pub sidewall: Option<f64>,
    /// What it is compared with: a contender's name, or "budget".
    pub reference_name: String,
    /// The reference's median, or the budget.
    pub reference: Option<f64>,
    /// Sidewall / reference.
    pub ratio: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
}

/// What a goal compares with.
#[derive(Clone, Copy)]
enum Against {
    /// The best peer; the ratio must be at least (higher-is-better) or at most this.
    BestPeer(f64),
    /// `direct`; the ratio must be at most this.
    Direct(f64),
    /// A fixed budget the value must not exceed.
    Budget(f64),
    /// The machine's limit; the ratio must be at least (higher-is-better) or at most this.
    Limit(f64),
}

const GOALS: [(&str, Workload, Metric, Against); 8] = [
    (
        "2× the best peer's mTLS throughput (1 stream)",
        Workload::Throughput1,
        Metric::Gbps,
        Against::BestPeer(2.0),
    ),
    (
        "5× the best peer's new-connection rate",
        Workload::ConnectRate,
        Metric::Rps,
        Against::BestPeer(5.0),
    ),
    (
        "p99 at c=64 within 3× of direct",
        Workload::RrC64,
        Metric::P99Us,
        Against::Direct(3.0),
    ),
    (
        "half the best peer's CPU per GB (1 stream)",
        Workload::Throughput1,
        Metric::CpuSPerGb,
        Against::BestPeer(0.5),
    ),
    (
        "at most 20 KiB per idle connection for the pair",
        Workload::Idle10k,
        Metric::RssKibPerConn,
        Against::Budget(20.0),
    ),
    (
        "idle RSS at most 10 MiB per sidecar",
        Workload::Idle10k,
        Metric::RssMib,
        Against::Budget(10.0),
    ),
    (
        "throughput (1 stream) within 10 % of the limit",
        Workload::Throughput1,
        Metric::Gbps,
        Against::Limit(0.9),
    ),
    (
        "CPU per GB (1 stream) within 10 % of the limit",
        Workload::Throughput1,
        Metric::CpuSPerGb,
        Against::Limit(1.1),
    ),
];

/// Judges every goal on `summary`; the limit goals need the run's crypto floor and the machine's
/// cores (and `splice-baseline` in the summary).
pub fn evaluate(
    summary: &[Summary],
    crypto: Option<&crate::floor::CryptoFloor>,
    cores: usize,
) -> Vec<Goal> {
    GOALS
        .iter()
        .map(|&(text, workload, metric, against)| {
            let sidewall = find(summary, Contender::SidewallL4, workload, metric).map(|s| s.median);
            let (reference_name, reference, bound) = match against {
                Against::BestPeer(bound) => match best_peer(summary, workload, metric) {
                    Some(best) => (best.contender.clone(), Some(best.median), bound),
                    None => ("best peer (none ran)".to_owned(), None, bound),
                },
                Against::Direct(bound) => (
                    "direct".to_owned(),
                    find(summary, Contender::Direct, workload, metric).map(|s| s.median),
                    bound,
                ),
                Against::Budget(budget) => ("budget".to_owned(), Some(budget), 1.0),
                Against::Limit(bound) => {
                    let limit =
                        crypto.zip(find(summary, Contender::SpliceBaseline, workload, metric));
                    (
                        "limit".to_owned(),
                        limit.and_then(|(floor, splice)| {
                            crate::floor::Limit {
                                floor,
                                cores: cores as f64,
                            }
                            .of(workload, metric, splice.median)
                        }),
                        bound,
                    )
                }
            };
            let ratio = match (sidewall, reference) {
                (Some(value), Some(reference)) => ratio(value, reference),
                _ => None,
            };
            let verdict = match ratio {
                None => Verdict::Unknown,
                Some(r) if metric.higher_is_better() && r >= bound => Verdict::Met,
                Some(r) if !metric.higher_is_better() && r <= bound => Verdict::Met,
                Some(_) => Verdict::NotMet,
            };
            Goal {
                goal: text.to_owned(),
                workload: workload.name().to_owned(),
                metric: metric.name().to_owned(),
                unit: metric.unit().to_owned(),
                sidewall,
                reference_name,
                reference,
                ratio,
                verdict,
            }
        })
        .collect()
}
