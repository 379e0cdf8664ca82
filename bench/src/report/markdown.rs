//! `report.md`: the machine, the contenders, Sidewall's goals, then one table per workload in
//! which every median carries its range and its ratio to `direct` (and, on Sidewall's rows, to
//! the best peer).

use std::fmt::Write as _;

use super::{Report, Summary, TargetRun, best_peer, find, median, ratio};
use crate::model::{Contender, Metric, Workload};

/// A value with as many digits as it deserves.
pub(crate) fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn times(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "–".to_owned(), |r| format!("×{}", number(r)))
}

/// The ratio of a summary to `direct`'s figure for the same workload and metric.
fn to_direct(report: &Report, s: &Summary) -> Option<f64> {
    let workload = Workload::from_name(&s.workload)?;
    let metric = Metric::from_name(&s.metric)?;
    let direct = find(&report.summary, Contender::Direct, workload, metric)?;
    ratio(s.median, direct.median)
}

/// The ratio of a Sidewall summary to the best peer's, and that peer's name.
fn to_best_peer(report: &Report, s: &Summary) -> Option<(f64, String)> {
    let contender = Contender::from_name(&s.contender)?;
    if !contender.is_sidewall() {
        return None;
    }
    let workload = Workload::from_name(&s.workload)?;
    let metric = Metric::from_name(&s.metric)?;
    let best = best_peer(&report.summary, workload, metric)?;
    Some((ratio(s.median, best.median)?, best.contender.clone()))
}

fn header(out: &mut String, report: &Report) {
    let m = &report.machine;
    let s = &report.settings;
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# Sidewall benchmark report\n");
    let _ = writeln!(
        out,
        "Started {} (UTC). Command: `{}`\n",
        report.started, s.command
    );
    let _ = writeln!(
        out,
        "Machine: {} CPUs ({}), {} MiB memory, Linux {}, loopback MTU {}. Source: {}.\n",
        m.nproc,
        m.cpu_model,
        m.memory_mib,
        m.kernel,
        m.loopback_mtu.map_or("unknown".into(), |v| v.to_string()),
        m.commit.as_deref().unwrap_or("not a checkout"),
    );
    let _ = writeln!(
        out,
        "Settings: {} round(s), contenders interleaved within each round and restarted for each; \
         {} s warm-up and {} s measured per timed workload; `rr-fixed-rate` at {} requests/s over \
         {} connections; `connect-rate` with {} concurrent loops; `idle-10k` with {} idle \
         connections{}.\n",
        s.rounds,
        s.warmup_s,
        s.duration_s,
        s.fixed_rate_rps,
        s.fixed_rate_connections,
        s.connect_workers,
        s.idle_connections,
        if s.quick {
            " (`--quick`: fewer than 10,000; short durations; one round)"
        } else {
            ""
        }
    );
    if let Some(target) = &report.target {
        let direct = target.direct.as_deref().map_or_else(
            || {
                "no `--direct` was given, so no figure has a ratio to the app reached without it"
                    .to_owned()
            },
            |d| format!("`direct` is the same app reached at `{d}`, without the deployment"),
        );
        let metrics = if target.metrics.is_empty() {
            "no `--metrics` endpoint was given, so the report has no CPU, memory or sidecar \
             counters"
                .to_owned()
        } else {
            format!(
                "the sidecars' metrics came from {}",
                target
                    .metrics
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let _ = writeln!(
            out,
            "Target mode: `target` is the deployment at `{}`, loaded with {} framing; {direct}; \
             {metrics}.\n",
            target.target, target.framing,
        );
    }
    if let Some(floor) = &report.crypto {
        let _ = writeln!(
            out,
            "Crypto floor ({}, {} KiB records, one core): seal {} Gbit/s, open {} Gbit/s. \
             The `× limit` column divides each figure by the limit of an mTLS chain here: for \
             bulk rates `1 / (1/splice + (1/seal + 1/open) / cores)`, for CPU per GB `splice + \
             8/seal + 8/open`, for request rates and latencies the `splice-baseline` figure \
             itself (bench/RESULTS.md explains them).\n",
            floor.aead,
            floor.record_bytes / 1024,
            number(floor.seal_gbps),
            number(floor.open_gbps),
        );
    }
    let _ = writeln!(out, "## Contenders\n");
    let _ = writeln!(out, "| contender | mode | status | version or reason |");
    let _ = writeln!(out, "|---|---|---|---|");
    for c in &report.contenders {
        let detail = c.reason.as_deref().or(c.version.as_deref()).unwrap_or("");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            c.contender,
            c.mode,
            c.status,
            detail.replace('|', "/")
        );
    }
}

fn goals(out: &mut String, report: &Report) {
    if report.goals.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n## Sidewall's goals (issue 8)\n");
    let _ = writeln!(
        out,
        "| goal | sidewall-l4 | compared with | ratio | verdict |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for g in &report.goals {
        let value = g.sidewall.map_or_else(|| "–".to_owned(), number);
        let reference = match g.reference {
            Some(v) => format!("{} {}", g.reference_name, number(v)),
            None => g.reference_name.clone(),
        };
        let _ = writeln!(
            out,
            "| {} | {} {} | {} | {} | {} |",
            g.goal,
            value,
            g.unit,
            reference,
            times(g.ratio),
            g.verdict.label()
        );
    }
}

fn figures(out: &mut String, report: &Report) {
    let _ = writeln!(out, "\n## Figures\n");
    let _ = writeln!(
        out,
        "Median over the rounds, the range (min–max), the ratio to `direct` in this run, on \
         Sidewall's rows the ratio to the best peer (highest for rates, lowest for latency and \
         cost), and the ratio to this machine's limit (above). `cpu_s_per_gb` counts both proxies (children included) per 10^9 bytes \
         delivered; `rss_mib` is per proxy (the pair's RSS / 2) before any load; \
         `rss_kib_per_conn` is the pair's RSS growth per idle connection. `direct` has no proxy, \
         so these have no ratio to it.{}\n",
        if report.target.is_some() {
            " For `target` they come from the `process_*` metrics of the `--metrics` endpoints \
             instead: CPU summed over the endpoints, `rss_mib` per endpoint, \
             `rss_kib_per_conn` their growth per idle connection."
        } else {
            ""
        }
    );
    for workload in Workload::ALL {
        let rows: Vec<&Summary> = report
            .summary
            .iter()
            .filter(|s| s.workload == workload.name())
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "### {}\n", workload.name());
        let _ = writeln!(
            out,
            "| contender | mode | metric | median | min–max | × direct | × best peer | × limit |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for s in rows {
            let peer = to_best_peer(report, s).map_or_else(
                || "".to_owned(),
                |(r, name)| format!("{} ({name})", times(Some(r))),
            );
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} {} | {}–{} | {} | {} | {} |",
                s.contender,
                s.mode,
                s.metric,
                number(s.median),
                s.unit,
                number(s.min),
                number(s.max),
                times(to_direct(report, s)),
                peer,
                times(report.limit(s).and_then(|limit| ratio(s.median, limit)))
            );
        }
        let _ = writeln!(out);
    }
}

/// One table per `--metrics` endpoint: a row per series that changed, a column per workload,
/// each cell the change over the workload (median over the rounds).
fn where_time_went(out: &mut String, target: &TargetRun) {
    if target.metrics.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Where time went: the sidecars' metrics\n");
    let _ = writeln!(
        out,
        "Each `--metrics` endpoint was scraped before and after every workload on `target` \
         (warm-up included). A cell is the change over the workload, the median over the rounds; \
         series that did not change are left out, and so are histogram buckets (`_sum` over \
         `_count` is the mean). `process_cpu_seconds_total` is the CPU each sidecar spent; \
         Sidewall counts a connection's bytes when it ends, and the second scrape waits for the \
         workload's connections to close.\n"
    );
    for endpoint in &target.metrics {
        let scrapes: Vec<_> = target
            .scrapes
            .iter()
            .filter(|s| &s.endpoint == endpoint)
            .collect();
        let workloads: Vec<Workload> = Workload::ALL
            .into_iter()
            .filter(|w| scrapes.iter().any(|s| s.workload == w.name()))
            .collect();
        let mut series: Vec<&str> = scrapes
            .iter()
            .flat_map(|s| s.changes.iter().map(|c| c.series.as_str()))
            .collect();
        series.sort_unstable();
        series.dedup();
        let _ = writeln!(out, "### {endpoint}\n");
        if series.is_empty() {
            let _ = writeln!(out, "Nothing changed (or the endpoint was not reached).\n");
            continue;
        }
        let names: Vec<&str> = workloads.iter().map(|w| w.name()).collect();
        let _ = writeln!(out, "| series | {} |", names.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(names.len()));
        for name in series {
            let cells: Vec<String> = workloads
                .iter()
                .map(|w| {
                    let deltas: Vec<f64> = scrapes
                        .iter()
                        .filter(|s| s.workload == w.name())
                        .map(|s| {
                            s.changes
                                .iter()
                                .find(|c| c.series == name)
                                .map_or(0.0, |c| c.delta())
                        })
                        .collect();
                    median(&deltas).map_or_else(|| "–".to_owned(), number)
                })
                .collect();
            let _ = writeln!(
                out,
                "| `{}` | {} |",
                name.replace('|', "/"),
                cells.join(" | ")
            );
        }
        let _ = writeln!(out);
    }
}

/// Renders the report as Markdown; `plots` are file names under `plots/`.
pub fn markdown(report: &Report, plots: &[String]) -> String {
    let mut out = String::new();
    header(&mut out, report);
    goals(&mut out, report);
    figures(&mut out, report);
    if let Some(target) = &report.target {
        where_time_went(&mut out, target);
    }
    if !report.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for note in &report.notes {
            let _ = writeln!(out, "- {note}");
        }
        let _ = writeln!(out);
    }
    if !plots.is_empty() {
        let _ = writeln!(out, "## Plots\n");
        for plot in plots {
            let _ = writeln!(out, "![{plot}](plots/{plot})");
        }
    }
    out
}
