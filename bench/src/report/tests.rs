use super::*;
use crate::goals::{Verdict, evaluate};

fn row(contender: Contender, workload: Workload, metric: Metric, value: f64, round: u32) -> Row {
    Row::new(contender, workload, metric, value, round)
}

#[test]
fn median_of_odd_even_and_empty_sets() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(median(&[7.0]), Some(7.0));
    assert_eq!(median(&[]), None);
    assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0), "NaN is ignored");
}

#[test]
fn a_row_serializes_to_the_shape_the_issue_names() {
    let json = serde_json::to_value(row(
        Contender::SidewallL4,
        Workload::RrC64,
        Metric::P99Us,
        812.5,
        2,
    ))
    .unwrap();
    let object = json.as_object().unwrap();
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "contender",
            "metric",
            "mode",
            "round",
            "unit",
            "value",
            "workload"
        ]
    );
    assert_eq!(json["contender"], "sidewall-l4");
    assert_eq!(json["mode"], "mtls");
    assert_eq!(json["workload"], "rr-c64");
    assert_eq!(json["metric"], "p99_us");
    assert_eq!(json["unit"], "us");
    assert_eq!(json["value"], 812.5);
    assert_eq!(json["round"], 2);
}

#[test]
fn summary_groups_by_contender_workload_metric_in_report_order() {
    let rows = vec![
        row(
            Contender::SidewallL4,
            Workload::Throughput1,
            Metric::Gbps,
            4.0,
            1,
        ),
        row(
            Contender::Direct,
            Workload::Throughput1,
            Metric::Gbps,
            15.0,
            1,
        ),
        row(
            Contender::SidewallL4,
            Workload::Throughput1,
            Metric::Gbps,
            6.0,
            2,
        ),
        row(
            Contender::Direct,
            Workload::Throughput1,
            Metric::Gbps,
            13.0,
            2,
        ),
        row(
            Contender::SidewallL4,
            Workload::Throughput1,
            Metric::Gbps,
            5.0,
            3,
        ),
        row(
            Contender::Direct,
            Workload::Throughput1,
            Metric::Gbps,
            14.0,
            3,
        ),
    ];
    let summary = summarize(&rows);
    assert_eq!(summary.len(), 2);
    assert_eq!(
        summary[0].contender, "direct",
        "direct first, as in the model"
    );
    assert_eq!(
        (
            summary[0].median,
            summary[0].min,
            summary[0].max,
            summary[0].rounds
        ),
        (14.0, 13.0, 15.0, 3)
    );
    assert_eq!(
        (summary[1].median, summary[1].min, summary[1].max),
        (5.0, 4.0, 6.0)
    );
    assert_eq!(summary[1].mode, "mtls");
}

#[test]
fn best_peer_is_the_highest_rate_and_the_lowest_cost() {
    let rows = vec![
        row(
            Contender::Haproxy,
            Workload::Throughput1,
            Metric::Gbps,
            3.65,
            1,
        ),
        row(
            Contender::Nginx,
            Workload::Throughput1,
            Metric::Gbps,
            3.48,
            1,
        ),
        row(
            Contender::Haproxy,
            Workload::RrC64,
            Metric::P99Us,
            78_000.0,
            1,
        ),
        row(
            Contender::Nginx,
            Workload::RrC64,
            Metric::P99Us,
            37_000.0,
            1,
        ),
        // Not a peer: never the best peer.
        row(
            Contender::SidewallL4,
            Workload::RrC64,
            Metric::P99Us,
            1.0,
            1,
        ),
    ];
    let summary = summarize(&rows);
    let fastest = best_peer(&summary, Workload::Throughput1, Metric::Gbps).unwrap();
    assert_eq!(fastest.contender, "haproxy");
    let lowest = best_peer(&summary, Workload::RrC64, Metric::P99Us).unwrap();
    assert_eq!(lowest.contender, "nginx");
    assert!(best_peer(&summary, Workload::ConnectRate, Metric::Rps).is_none());
}

#[test]
fn ratios_refuse_a_zero_reference() {
    assert_eq!(ratio(3.0, 1.5), Some(2.0));
    assert_eq!(ratio(3.0, 0.0), None);
}

#[test]
fn goals_compare_with_the_best_peer_direct_or_a_budget() {
    let rows = vec![
        row(
            Contender::Haproxy,
            Workload::Throughput1,
            Metric::Gbps,
            3.0,
            1,
        ),
        row(
            Contender::SidewallL4,
            Workload::Throughput1,
            Metric::Gbps,
            7.0,
            1,
        ),
        row(Contender::Direct, Workload::RrC64, Metric::P99Us, 1000.0, 1),
        row(
            Contender::SidewallL4,
            Workload::RrC64,
            Metric::P99Us,
            3500.0,
            1,
        ),
        row(
            Contender::SidewallL4,
            Workload::Idle10k,
            Metric::RssKibPerConn,
            19.0,
            1,
        ),
    ];
    let goals = evaluate(&summarize(&rows), None, 2);
    let verdict = |metric: &str| {
        // Each goal is judged on a different metric.
        goals.iter().find(|g| g.metric == metric).unwrap().verdict
    };
    assert_eq!(verdict("gbps"), Verdict::Met, "7 ≥ 2 × 3");
    assert_eq!(verdict("p99_us"), Verdict::NotMet, "3500 > 3 × 1000");
    assert_eq!(verdict("rss_kib_per_conn"), Verdict::Met, "19 ≤ 20");
    assert_eq!(verdict("rps"), Verdict::Unknown, "no peer measured");
    assert_eq!(verdict("rss_mib"), Verdict::Unknown, "not measured");
    let limit_goal = |goals: &[crate::goals::Goal]| {
        goals
            .iter()
            .find(|g| g.reference_name == "limit" && g.metric == "gbps")
            .unwrap()
            .clone()
    };
    assert_eq!(limit_goal(&goals).verdict, Verdict::Unknown, "no floor");

    // With the splice chain at 16 Gbit/s and a floor of 16 both ways on 2 cores, the limit is
    // 8 Gbit/s: 7 is within 12.5 % of it, not 10 %.
    let mut rows = rows;
    rows.push(row(
        Contender::SpliceBaseline,
        Workload::Throughput1,
        Metric::Gbps,
        16.0,
        1,
    ));
    let floor = crate::floor::CryptoFloor {
        aead: "AES".into(),
        record_bytes: 16_384,
        seal_gbps: 16.0,
        open_gbps: 16.0,
    };
    let goal = limit_goal(&evaluate(&summarize(&rows), Some(&floor), 2));
    assert_eq!(goal.reference, Some(8.0));
    assert_eq!(goal.ratio, Some(0.875));
    assert_eq!(goal.verdict, Verdict::NotMet);
}

#[test]
fn the_markdown_shows_every_figure_with_its_ratio_to_direct() {
    let rows = vec![
        row(
            Contender::Direct,
            Workload::Throughput1,
            Metric::Gbps,
            10.0,
            1,
        ),
        row(
            Contender::Haproxy,
            Workload::Throughput1,
            Metric::Gbps,
            4.0,
            1,
        ),
        row(
            Contender::SidewallL4,
            Workload::Throughput1,
            Metric::Gbps,
            5.0,
            1,
        ),
    ];
    let summary = summarize(&rows);
    let report = Report {
        started: "2026-01-01T000000Z".into(),
        machine: Machine::describe(),
        settings: Settings {
            command: "sidewall-bench --quick".into(),
            quick: true,
            rounds: 1,
            warmup_s: 0.2,
            duration_s: 1.0,
            settle_s: 0.2,
            idle_connections: 1000,
            fixed_rate_rps: 2000,
            fixed_rate_connections: 16,
            connect_workers: 8,
        },
        contenders: Vec::new(),
        notes: vec!["a note".into()],
        goals: evaluate(&summary, None, 2),
        rows,
        summary,
        crypto: None,
        target: None,
    };
    let text = markdown(&report, &["throughput-1_gbps.svg".to_owned()]);
    assert!(text.contains("| haproxy | mtls | gbps | 4.00 Gbit/s | 4.00–4.00 | ×0.40 |  |"));
    assert!(
        text.contains(
            "| sidewall-l4 | mtls | gbps | 5.00 Gbit/s | 5.00–5.00 | ×0.50 | ×1.25 (haproxy) |"
        ),
        "{text}"
    );
    assert!(text.contains("fewer than 10,000"));
    assert!(text.contains("- a note"));
    assert!(text.contains("](plots/throughput-1_gbps.svg)"));
}

/// A report of one round with these (contender, workload, metric, value) rows.
fn report_of(rows: &[(Contender, Workload, Metric, f64)], machine: Machine) -> Report {
    let rows: Vec<Row> = rows
        .iter()
        .map(|&(c, w, m, v)| row(c, w, m, v, 1))
        .collect();
    let summary = summarize(&rows);
    Report {
        started: "2026-12-07T12:00:00Z".into(),
        machine,
        settings: Settings {
            command: "sidewall-bench".into(),
            quick: false,
            rounds: 1,
            warmup_s: 1.0,
            duration_s: 5.0,
            settle_s: 0.5,
            idle_connections: 10_000,
            fixed_rate_rps: 2000,
            fixed_rate_connections: 16,
            connect_workers: 8,
        },
        contenders: Vec::new(),
        notes: Vec::new(),
        goals: Vec::new(),
        rows,
        summary,
        crypto: None,
        target: None,
    }
}

#[test]
fn compare_gives_each_change_its_direction_and_the_ratios_to_direct_of_both_runs() {
    use Contender::{Direct, SidewallL4};
    use Metric::{Gbps, P99Us};
    use Workload::{RrC64, Throughput1};
    let machine = Machine {
        nproc: 2,
        memory_mib: 24_000,
        kernel: "6.1.0".into(),
        cpu_model: "Test CPU".into(),
        loopback_mtu: Some(65536),
        commit: Some("10c4c55".into()),
    };
    let a = report_of(
        &[
            (Direct, Throughput1, Gbps, 20.0),
            (SidewallL4, Throughput1, Gbps, 4.0),
            (Direct, RrC64, P99Us, 1000.0),
            (SidewallL4, RrC64, P99Us, 4000.0),
        ],
        machine.clone(),
    );
    let b = report_of(
        &[
            (Direct, Throughput1, Gbps, 20.0),
            (SidewallL4, Throughput1, Gbps, 5.0),
            (Direct, RrC64, P99Us, 1000.0),
            (SidewallL4, RrC64, P99Us, 5000.0),
        ],
        Machine {
            commit: Some("e4ec41a".into()),
            ..machine.clone()
        },
    );
    let text = compare(&a, "A", &b, "B");
    assert!(text.contains("- A: started 2026-12-07T12:00:00Z, source 10c4c55, 2 CPUs (Test CPU), Linux 6.1.0, loopback MTU 65536, 1 round(s)"), "{text}");
    assert!(
        text.contains("- B: started 2026-12-07T12:00:00Z, source e4ec41a"),
        "{text}"
    );
    assert!(text.contains("The same kind of machine"), "{text}");
    assert!(
        text.contains("| sidewall-l4 | throughput-1 | gbps | 4.00 Gbit/s | 5.00 Gbit/s | ×1.25 | better | ×0.20 | ×0.25 |"),
        "{text}"
    );
    assert!(
        text.contains("| sidewall-l4 | rr-c64 | p99_us | 4000.00 us | 5000.00 us | ×1.25 | worse | ×4.00 | ×5.00 |"),
        "{text}"
    );
    assert!(
        text.contains(
            "| direct | throughput-1 | gbps | 20.00 Gbit/s | 20.00 Gbit/s | ×1.00 | same | – | – |"
        ),
        "{text}"
    );

    let elsewhere = report_of(
        &[(Direct, Workload::ConnectRate, Metric::Rps, 9000.0)],
        Machine {
            nproc: 4,
            loopback_mtu: Some(1500),
            ..machine
        },
    );
    let text = compare(&a, "A", &elsewhere, "C");
    assert!(
        text.contains("The machines differ (CPUs: 2 against 4; loopback MTU: 65536 against 1500)"),
        "{text}"
    );
    assert!(text.contains("No (contender, workload, metric) was measured in both reports."));
}

#[test]
fn every_row_shows_its_ratio_to_the_limit_from_the_splice_baseline_and_the_crypto_floor() {
    let mut machine = Machine::describe();
    machine.nproc = 2;
    let mut report = report_of(
        &[
            (Contender::Direct, Workload::Throughput1, Metric::Gbps, 20.0),
            (
                Contender::SpliceBaseline,
                Workload::Throughput1,
                Metric::Gbps,
                16.0,
            ),
            (
                Contender::SidewallL4,
                Workload::Throughput1,
                Metric::Gbps,
                6.0,
            ),
            (
                Contender::SpliceBaseline,
                Workload::Throughput1,
                Metric::CpuSPerGb,
                0.5,
            ),
            (
                Contender::SidewallL4,
                Workload::Throughput1,
                Metric::CpuSPerGb,
                3.0,
            ),
        ],
        machine,
    );
    let without = markdown(&report, &[]);
    assert!(
        without.contains("| sidewall-l4 | mtls | gbps | 6.00 Gbit/s | 6.00–6.00 | ×0.30 |  | – |"),
        "{without}"
    );
    report.crypto = Some(crate::floor::CryptoFloor {
        aead: "AES".into(),
        record_bytes: 16_384,
        seal_gbps: 16.0,
        open_gbps: 16.0,
    });
    let text = markdown(&report, &[]);
    // Limit 1 / (1/16 + (1/16 + 1/16) / 2) = 8 Gbit/s; 0.5 + 8/16 + 8/16 = 1.5 s per GB.
    assert!(
        text.contains("| sidewall-l4 | mtls | gbps | 6.00 Gbit/s | 6.00–6.00 | ×0.30 |  | ×0.75 |"),
        "{text}"
    );
    assert!(text.contains("| ×2.00 |\n"), "{text}");
    assert!(
        text.contains("seal 16.0 Gbit/s, open 16.0 Gbit/s"),
        "{text}"
    );
}

#[test]
fn target_mode_says_what_was_loaded_and_where_time_went_per_sidecar() {
    use crate::exposition::Change;
    let change = |series: &str, before: f64, after: f64| Change {
        series: series.into(),
        before,
        after,
    };
    let scrape = |workload: Workload, round: u32, changes: Vec<Change>| Scrape {
        endpoint: "http://127.0.0.1:4691/metrics".into(),
        workload: workload.name().into(),
        round,
        seconds: 1.5,
        changes,
    };
    let mut report = report_of(
        &[
            (Contender::Direct, Workload::RrC1, Metric::Rps, 10_000.0),
            (Contender::Target, Workload::RrC1, Metric::Rps, 5_000.0),
        ],
        Machine::describe(),
    );
    report.target = Some(TargetRun {
        target: "127.0.0.1:15001".into(),
        direct: Some("127.0.0.1:9000".into()),
        framing: "raw".into(),
        metrics: vec![
            "http://127.0.0.1:4691/metrics".into(),
            "http://127.0.0.1:4692/metrics".into(),
        ],
        scrapes: vec![
            scrape(
                Workload::RrC1,
                1,
                vec![change("process_cpu_seconds_total", 1.0, 1.5)],
            ),
            // A round in which the series did not move counts as 0 in the median.
            scrape(Workload::RrC1, 2, vec![]),
            scrape(
                Workload::RrC1,
                3,
                vec![change("process_cpu_seconds_total", 2.0, 2.75)],
            ),
            scrape(
                Workload::ConnectRate,
                1,
                vec![change("a{b=\"x|y\"}", 0.0, 2.0)],
            ),
        ],
    });
    let text = markdown(&report, &[]);
    assert!(
        text.contains("| target | deployment | rps | 5000 1/s | 5000–5000 | ×0.50 |"),
        "{text}"
    );
    assert!(
        text.contains("`target` is the deployment at `127.0.0.1:15001`, loaded with raw framing; `direct` is the same app reached at `127.0.0.1:9000`"),
        "{text}"
    );
    assert!(text.contains("| series | rr-c1 | connect-rate |"), "{text}");
    assert!(
        text.contains("| `process_cpu_seconds_total` | 0.50 | 0.00 |"),
        "{text}"
    );
    assert!(text.contains("| `a{b=\"x/y\"}` | 0.00 | 2.00 |"), "{text}");
    // The endpoint no scrape answered for is named, with nothing to show.
    assert!(
        text.contains("### http://127.0.0.1:4692/metrics\n\nNothing changed"),
        "{text}"
    );
    assert!(!text.contains("Sidewall's goals"), "{text}");
}
