//! examples/observability, checked: the Prometheus configuration and its alert rules load, the
//! rules pass their unit tests (`promtool`, from Debian's `prometheus`: `scripts/test-deps`),
//! and every metric the rules and the Grafana dashboard query is one the binaries really export,
//! with the labels the queries use. A metric counts as exported when the /metrics of a running
//! mesh (`sidewall up examples/three-tier`) shows it; the few that appear only once their event
//! has happened (a rejected snapshot, a refused connection) must be named where the binaries
//! record them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::repo_root;

/// Metrics a demo mesh does not produce, because their event does not happen there.
const ON_THEIR_EVENT_ONLY: [&str; 6] = [
    "sidewall_control_plane_alerts_total",
    "sidewall_proxy_snapshots_rejected_total",
    "sidewall_proxy_watch_silent_total",
    "sidewall_proxy_connections_refused_total",
    "sidewall_control_plane_policy_source_errors_total",
    "sidewall_control_plane_refusals_total",
];

fn observability() -> PathBuf {
    repo_root().join("examples/observability")
}

fn promtool(args: &[&str]) -> String {
    let run = Command::new("promtool")
        .args(args)
        .current_dir(observability())
        .output()
        .expect("promtool (Debian's prometheus; scripts/test-deps installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_prometheus_configuration_and_its_alert_rules_load_and_pass_their_tests() {
    let checked = promtool(&["check", "config", "prometheus.yaml"]);
    assert!(checked.contains("SUCCESS: 17 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(observability().join("alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(observability().join("alerts.test.yaml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no test in alerts.test.yaml"
        );
    }
}

/// Every query of the alert rules and of the dashboard's panels.
fn queries() -> Vec<String> {
    let rules: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(observability().join("alerts.yaml")).unwrap(),
    )
    .unwrap();
    let mut queries: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(observability().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(queries.len() >= 20, "{queries:?}");
    queries
}

/// The Sidewall metrics a query names, and the label names it matches on or groups by.
fn names_and_labels(query: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut rest = query;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '"') {
        rest = &rest[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            // A label value or a legend: skip to the closing quote.
            rest = quoted.split_once('"').map_or("", |(_, after)| after);
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        let after = rest[end..].trim_start();
        if word.starts_with("sidewall_") || word.starts_with("process_") {
            metrics.insert(word.to_owned());
        } else if after.starts_with("=") || after.starts_with("!=") || after.starts_with("=~") {
            labels.insert(word.to_owned());
        } else if word == "by" || word == "without" {
            let list = after
                .strip_prefix('(')
                .and_then(|l| l.split_once(')'))
                .map_or("", |(list, _)| list);
            labels.extend(list.split(',').map(|l| l.trim().to_owned()));
        }
        rest = &rest[end..];
    }
    (metrics, labels)
}

/// Metric name to the label names seen on it, over every /metrics text given.
fn exported(texts: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in texts.iter().flat_map(|t| t.lines()) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = exported.entry(line[..name_end].to_owned()).or_default();
        if let Some(inside) = line[name_end..]
            .strip_prefix('{')
            .and_then(|l| l.split_once('}'))
        {
            labels.extend(
                inside
                    .0
                    .split("\",")
                    .filter_map(|pair| Some(pair.split_once('=')?.0.to_owned())),
            );
        }
    }
    exported
}

/// Where the binaries record metrics: every name in a crate's metric module, and every
/// `counter!`, `gauge!` and `histogram!` called with a name of its own.
fn recorded_in_source() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for module in ["proxy/src/metric.rs", "control-plane/src/metric.rs"] {
        let text = std::fs::read_to_string(repo_root().join(module)).unwrap();
        for quoted in text.split('"').skip(1).step_by(2) {
            if quoted.starts_with("sidewall_") {
                names.insert(quoted.to_owned());
            }
        }
    }
    for dir in ["src", "proxy/src", "control-plane/src"] {
        let listing = Command::new("grep")
            .args(["-rhoE", r#"(counter|gauge|histogram)!\(\s*"[a-z_]+""#])
            .arg(repo_root().join(dir))
            .output()
            .unwrap();
        for found in String::from_utf8_lossy(&listing.stdout).lines() {
            names.insert(found.rsplit('"').nth(1).unwrap().to_owned());
        }
    }
    assert!(names.len() > 40, "{names:?}");
    names
}

/// `sidewall up examples/three-tier`, stopped (SIGTERM) when dropped.
struct Mesh {
    child: std::process::Child,
    metrics: Vec<String>,
}

impl Mesh {
    /// Starts it and reads the /metrics addresses it prints.
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sidewall"))
            .args(["up", "examples/three-tier"])
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("control plane metrics: "))
            .expect("`sidewall up` prints where the metrics are");
        // Keep draining its view so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let metrics = line
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
            .map(str::to_owned)
            .collect();
        Self { child, metrics }
    }

    /// Every process's /metrics.
    fn scrape(&self) -> Vec<String> {
        self.metrics
            .iter()
            .map(|url| {
                let (port, path) = url
                    .strip_prefix("http://127.0.0.1:")
                    .and_then(|rest| rest.split_once('/'))
                    .unwrap();
                support::http_get(port.parse().unwrap(), &format!("/{path}")).1
            })
            .collect()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[test]
fn every_metric_the_rules_and_the_dashboard_query_is_exported_with_those_labels() {
    let queries = queries();
    let mesh = Mesh::start();
    assert_eq!(mesh.metrics.len(), 5, "{:?}", mesh.metrics);
    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| names_and_labels(q).0)
        .filter(|m| !ON_THEIR_EVENT_ONLY.contains(&m.as_str()))
        .collect();
    // The demo's flows (an HTTP request allowed, one denied, a TCP call refused, ...) come every
    // one to three seconds: wait until every wanted metric has shown up, at most a minute.
    let started = Instant::now();
    let mut metrics = exported(&mesh.scrape());
    while started.elapsed() < Duration::from_secs(60)
        && !wanted.iter().all(|m| metrics.contains_key(m))
    {
        std::thread::sleep(Duration::from_secs(1));
        metrics = exported(&mesh.scrape());
    }
    let recorded = recorded_in_source();
    let target_labels = ["instance", "job"];
    for query in &queries {
        let (names, labels) = names_and_labels(query);
        // Only Prometheus's own `up` of the scrape job may stand without a Sidewall metric.
        assert!(
            !names.is_empty() || query.contains("up{job=\"sidewall-control-plane\"}"),
            "{query}: names no Sidewall metric"
        );
        for name in &names {
            match metrics.get(name) {
                Some(exported_labels) => {
                    for label in &labels {
                        assert!(
                            exported_labels.contains(label)
                                || target_labels.contains(&label.as_str()),
                            "{query}: {name} has no label {label} (it has {exported_labels:?})"
                        );
                    }
                }
                None => assert!(
                    ON_THEIR_EVENT_ONLY.contains(&name.as_str()) && recorded.contains(name),
                    "{query}: {name} is not exported by the running mesh (exported: {:?})",
                    metrics.keys().collect::<Vec<_>>()
                ),
            }
        }
    }
    for name in ON_THEIR_EVENT_ONLY {
        assert!(recorded.contains(name), "{name} is recorded nowhere");
    }
}
