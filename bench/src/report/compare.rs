//! `sidewall-bench compare A B`: two reports side by side. For every (contender, workload,
//! metric) both measured: A's median, B's, B over A, and whether that is better or worse for
//! the metric; and, since absolute figures drift between runs and machines, each contender's
//! ratio to `direct` in A and in B. The header names both machines and sources and says how
//! the machines differ, so a reader knows how far the absolute columns can be trusted.

use std::fmt::Write;

use super::{Report, Summary, ratio};
use crate::model::Metric;

/// `direct`'s median for (workload, metric) in `summary`.
fn direct<'a>(summary: &'a [Summary], of: &Summary) -> Option<&'a Summary> {
    summary
        .iter()
        .find(|s| s.contender == "direct" && s.workload == of.workload && s.metric == of.metric)
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("×{v:.2}"))
}

/// The comparison of `b` against `a` (labelled `a_name`, `b_name`), as markdown.
pub fn compare(a: &Report, a_name: &str, b: &Report, b_name: &str) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# {b_name} against {a_name}\n");
    for (name, report) in [(a_name, a), (b_name, b)] {
        let m = &report.machine;
        let _ = writeln!(
            out,
            "- {name}: started {}, source {}, {} CPUs ({}), Linux {}, loopback MTU {}, {} round(s){}",
            report.started,
            m.commit.as_deref().unwrap_or("unknown"),
            m.nproc,
            m.cpu_model,
            m.kernel,
            m.loopback_mtu.map_or("unknown".into(), |v| v.to_string()),
            report.settings.rounds,
            if report.settings.quick {
                ", --quick"
            } else {
                ""
            },
        );
    }
    let differences = a.machine.differences(&b.machine);
    let _ = if differences.is_empty() {
        writeln!(
            out,
            "\nThe same kind of machine: the absolute columns compare, within the drift between runs.\n"
        )
    } else {
        writeln!(
            out,
            "\nThe machines differ ({}): compare the ratios to `direct`, not the absolute columns.\n",
            differences.join("; ")
        )
    };
    let _ = writeln!(
        out,
        "| contender | workload | metric | {a_name} | {b_name} | {b_name} / {a_name} | | vs direct in {a_name} | vs direct in {b_name} |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let mut compared = 0;
    for old in &a.summary {
        let Some(new) = b.summary.iter().find(|s| {
            s.contender == old.contender && s.workload == old.workload && s.metric == old.metric
        }) else {
            continue;
        };
        let change = ratio(new.median, old.median);
        let verdict = match (change, Metric::from_name(&old.metric)) {
            (Some(c), Some(metric)) if (c - 1.0).abs() >= 0.005 => {
                if (c > 1.0) == metric.higher_is_better() {
                    "better"
                } else {
                    "worse"
                }
            }
            (Some(_), Some(_)) => "same",
            _ => "",
        };
        let against_direct = |report: &Report, s: &Summary| {
            if s.contender == "direct" {
                return "–".to_owned();
            }
            times(direct(&report.summary, s).and_then(|d| ratio(s.median, d.median)))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} {} | {:.2} {} | {} | {verdict} | {} | {} |",
            old.contender,
            old.workload,
            old.metric,
            old.median,
            old.unit,
            new.median,
            new.unit,
            times(change),
            against_direct(a, old),
            against_direct(b, new),
        );
        compared += 1;
    }
    if compared == 0 {
        let _ = writeln!(
            out,
            "\nNo (contender, workload, metric) was measured in both reports."
        );
    }
    out
}
