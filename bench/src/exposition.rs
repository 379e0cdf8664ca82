//! The Prometheus text exposition format, read as far as a before/after comparison needs:
//! every sample as `series → value`, where the series is the metric name with its labels as
//! written (`name{label="value",…}`). Comments, histogram buckets and malformed lines are left
//! out; what the target mode reports is what changed between two scrapes ([`changes`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One scrape: series → value.
pub type Samples = BTreeMap<String, f64>;

/// The samples of an exposition text. Histogram `_bucket` series are dropped (their `_sum` and
/// `_count` stay): a bucket per latency bound is too fine for a report.
pub fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, rest)) = split_series(line) else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if name.ends_with("_bucket") {
            continue;
        }
        // The value, then an optional timestamp.
        let Some(value) = rest.split_whitespace().next().and_then(parse_value) else {
            continue;
        };
        samples.insert(series.to_owned(), value);
    }
    samples
}

/// `name{labels}` and what follows it; label values may hold spaces, braces and escaped quotes.
fn split_series(line: &str) -> Option<(&str, &str)> {
    let Some(open) = line.find('{') else {
        let end = line.find(char::is_whitespace)?;
        return Some((&line[..end], &line[end..]));
    };
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => {
                let end = open + i + 1;
                return Some((&line[..end], &line[end..]));
            }
            _ => {}
        }
    }
    None
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok().filter(|v: &f64| v.is_finite()),
    }
}

/// A series that changed between two scrapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// `name{labels}`.
    pub series: String,
    /// Its value in the first scrape (0 if it did not exist yet).
    pub before: f64,
    /// Its value in the second.
    pub after: f64,
}

impl Change {
    /// `after - before`.
    pub fn delta(&self) -> f64 {
        self.after - self.before
    }
}

/// Every series whose value differs between `before` and `after`, in series order; a series
/// first seen in `after` counts from 0 (a counter created by the load).
pub fn changes(before: &Samples, after: &Samples) -> Vec<Change> {
    after
        .iter()
        .filter_map(|(series, &value)| {
            let old = before.get(series).copied().unwrap_or(0.0);
            (old != value).then(|| Change {
                series: series.clone(),
                before: old,
                after: value,
            })
        })
        .collect()
}

/// The sum of every sample of metric `name` (all its label sets).
pub fn total(samples: &Samples, name: &str) -> Option<f64> {
    let mut found = None;
    for (series, value) in samples {
        if series.split('{').next() == Some(name) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TEXT: &str = r#"# HELP process_cpu_seconds_total User and system CPU time spent.
# TYPE process_cpu_seconds_total gauge
process_cpu_seconds_total 1.25
sidewall_proxy_connections_opened_total{direction="outbound"} 7
sidewall_proxy_connections_opened_total{direction="inbound"} 3 1700000000000
sidewall_proxy_denials_total{reason="a } b \" c"} 2
sidewall_proxy_handshake_seconds_bucket{le="0.001"} 4
sidewall_proxy_handshake_seconds_sum 0.004
sidewall_proxy_handshake_seconds_count 4
broken_line_without_value
nan_value NaN
"#;

    #[test]
    fn reads_samples_labels_and_leaves_out_buckets_comments_and_junk() {
        let samples = parse(TEXT);
        assert_eq!(samples["process_cpu_seconds_total"], 1.25);
        assert_eq!(
            samples[r#"sidewall_proxy_connections_opened_total{direction="inbound"}"#],
            3.0
        );
        assert_eq!(
            samples[r#"sidewall_proxy_denials_total{reason="a } b \" c"}"#],
            2.0
        );
        assert_eq!(samples["sidewall_proxy_handshake_seconds_count"], 4.0);
        assert!(samples.keys().all(|k| !k.contains("_bucket")));
        assert!(!samples.contains_key("broken_line_without_value"));
        assert!(!samples.contains_key("nan_value"));
        assert_eq!(samples.len(), 6);
        assert_eq!(
            total(&samples, "sidewall_proxy_connections_opened_total"),
            Some(10.0)
        );
        assert_eq!(total(&samples, "absent"), None);
    }

    #[test]
    fn changes_are_what_moved_new_series_counting_from_zero() {
        let before = parse("a 1\nb{x=\"1\"} 5\nc 2\n");
        let after = parse("a 1\nb{x=\"1\"} 9\nc 1.5\nd 3\n");
        let changed = changes(&before, &after);
        let named: Vec<(&str, f64)> = changed
            .iter()
            .map(|c| (c.series.as_str(), c.delta()))
            .collect();
        assert_eq!(named, [("b{x=\"1\"}", 4.0), ("c", -0.5), ("d", 3.0)]);
    }
}
