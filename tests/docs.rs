//! The documentation's examples are checked: every `yaml` block in docs/policy.md is a
//! complete policy set whose PolicyTest expectations pass, and every `sidewall policy check`
//! command in a `sh` block that is followed by `# ALLOW|DENY|AUDIT ...` prints that line; every
//! metric the sidecar and the control plane export is in their metrics table, and every row of
//! those tables is a metric they export.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

mod support;

use std::fs;
use std::path::Path;

use support::{repo_root, sidewall};

/// The fenced blocks of a Markdown file with the given info string, with their first line.
fn blocks(markdown: &str, info: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_end() == format!("```{info}") => {
                current = Some((i + 2, String::new()))
            }
            None => {}
            Some(_) if line.trim_end() == "```" => found.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    found
}

#[test]
fn every_yaml_block_in_the_policy_reference_loads_and_its_tests_pass() {
    let markdown = fs::read_to_string(repo_root().join("docs/policy.md")).unwrap();
    let yaml = blocks(&markdown, "yaml");
    assert!(yaml.len() >= 5, "only {} yaml blocks", yaml.len());
    let mut with_tests = 0;
    for (line, text) in yaml {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("policy-md-line-{line}.yaml"));
        fs::write(&file, &text).unwrap();
        let file = file.display().to_string();
        let validate = sidewall(["policy", "validate", &file]);
        assert_eq!(
            validate.code, 0,
            "docs/policy.md block at line {line}:\n{}",
            validate.stderr
        );
        if text.contains("kind: PolicyTest") {
            with_tests += 1;
            let run = sidewall(["policy", "test", &file]);
            assert_eq!(
                run.code, 0,
                "docs/policy.md block at line {line}:\n{}{}",
                run.stdout, run.stderr
            );
        }
    }
    assert!(with_tests >= 5, "only {with_tests} blocks state outcomes");
}

/// Joins `\`-continued lines and pairs each `sidewall policy check` with the comment after it.
fn check_commands(markdown: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for (_, block) in blocks(markdown, "sh") {
        let mut lines = block.lines().peekable();
        while let Some(line) = lines.next() {
            if !line.starts_with("sidewall policy check") {
                continue;
            }
            let mut command = line.to_owned();
            while command.ends_with('\\') {
                command.pop();
                command.push_str(lines.next().unwrap_or_default().trim_start());
            }
            if let Some(expected) = lines.peek().and_then(|l| l.strip_prefix("# "))
                && ["ALLOW", "DENY", "AUDIT"]
                    .iter()
                    .any(|o| expected.starts_with(o))
            {
                pairs.push((command, expected.to_owned()));
            }
        }
    }
    pairs
}

#[test]
fn check_commands_in_the_docs_print_what_they_say() {
    let mut checked = 0;
    for doc in [
        "README.md",
        "examples/three-tier/README.md",
        "docs/policy.md",
    ] {
        let path = repo_root().join(doc);
        if !Path::new(&path).exists() {
            continue;
        }
        let markdown = fs::read_to_string(&path).unwrap();
        for (command, expected) in check_commands(&markdown) {
            let args: Vec<&str> = command.split_whitespace().skip(1).collect();
            let run = sidewall(&args);
            assert_eq!(run.code, 0, "{doc}: {command}\n{}", run.stderr);
            assert_eq!(
                run.stdout.lines().next(),
                Some(expected.as_str()),
                "{doc}: {command}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} documented commands checked");
}

/// The metric names in `text`: every `"<prefix>…"` literal (the crate's metric module) or
/// every `` `<prefix>…` `` at the start of a table row (the docs).
fn metric_names(text: &str, prefix: &str, table: bool) -> std::collections::BTreeSet<String> {
    let quote = if table { "| `" } else { "\"" };
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some(at) = line.find(&format!("{quote}{prefix}")) else {
            continue;
        };
        if table && at != 0 {
            continue;
        }
        let name: String = line[at + quote.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn every_metric_is_in_its_docs_table_and_every_row_is_a_metric() {
    let root = repo_root();
    for (module, doc, prefix) in [
        ("proxy/src/metric.rs", "docs/proxy.md", "sidewall_proxy_"),
        (
            "control-plane/src/metric.rs",
            "docs/api.md",
            "sidewall_control_plane_",
        ),
    ] {
        let exported = metric_names(
            &fs::read_to_string(root.join(module)).unwrap(),
            prefix,
            false,
        );
        let documented = metric_names(&fs::read_to_string(root.join(doc)).unwrap(), prefix, true);
        assert!(exported.len() > 15, "{module}: {exported:?}");
        let missing: Vec<_> = exported.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "not in {doc}'s metrics table: {missing:?}"
        );
        assert!(
            unknown.is_empty(),
            "in {doc} but not in {module}: {unknown:?}"
        );
    }
}
