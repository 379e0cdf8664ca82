//! `sidewall policy validate | check | test`, run as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

mod support;

use std::fs;

use support::sidewall;

const THREE_TIER: &str = "examples/three-tier";
const FRONTEND: &str = "spiffe://sidewall.local/ns/demo/svc/frontend";
const API: &str = "spiffe://sidewall.local/ns/demo/svc/api";
const DB: &str = "spiffe://sidewall.local/ns/demo/svc/db";
const REPORTS: &str = "spiffe://sidewall.local/ns/demo/svc/reports";

#[test]
fn validate_summarizes_and_lists_audit_only_targets() {
    let run = sidewall(["policy", "validate", "examples/three-tier/policies"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "3 policies, 4 rules OK");
    assert!(
        lines.contains(&format!("  {REPORTS}").as_str()),
        "{}",
        run.stdout
    );
}

#[test]
fn validate_reports_every_error_with_position_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("a.yaml"),
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: a}\nspec:\n  target: spiffe://example.org/x\n  rules:\n    - action: allow\n      from: [spiffe://example.org/y]\n      ports: [\"20-10\"]\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("b.yml"),
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: a}\nspec:\n  target: spiffe://example.org/x\n  rules: []\n  colour: blue\n",
    )
    .unwrap();
    // A repeated key is reported where it repeats (line 7), not where its mapping starts.
    fs::write(
        dir.path().join("c.yaml"),
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: c}\nspec:\n  target: spiffe://example.org/x\n  mode: audit\n  mode: enforce\n  rules: []\n",
    )
    .unwrap();
    let run = sidewall([
        "policy".as_ref(),
        "validate".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    let a = dir.path().join("a.yaml").display().to_string();
    let b = dir.path().join("b.yml").display().to_string();
    let c = dir.path().join("c.yaml").display().to_string();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{}", run.stderr);
    assert!(
        lines[0].starts_with(&format!(
            "{a}:9:15: spec.rules[0].ports[0]: port range 20-10 is out of order"
        )),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(&format!("{b}:7:3: spec: unknown field `colour`")),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with(&format!("{c}:7:3: spec: duplicate key `mode`")),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], "3 errors");
}

#[test]
fn check_prints_the_decision_first() {
    let run = sidewall([
        "policy",
        "check",
        "--from",
        API,
        "--to",
        DB,
        "--port",
        "5432",
        "examples/three-tier/policies",
    ]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "ALLOW policy=db-from-api rule=1\n")
    );

    let run = sidewall([
        "policy",
        "check",
        "--from",
        FRONTEND,
        "--to",
        DB,
        "--port",
        "5432",
        "examples/three-tier/policies",
    ]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "DENY policy=- rule=-\n")
    );

    // An HTTP rule admits the connection on an HTTP port but never raw TCP.
    let run = sidewall([
        "policy",
        "check",
        "--from",
        FRONTEND,
        "--to",
        API,
        "--port",
        "8080",
        "--http",
        "examples/three-tier/policies",
    ]);
    assert_eq!(
        run.stdout.lines().next(),
        Some("ALLOW policy=api-from-frontend rule=1")
    );
    let run = sidewall([
        "policy",
        "check",
        "--from",
        FRONTEND,
        "--to",
        API,
        "--port",
        "8080",
        "examples/three-tier/policies",
    ]);
    assert_eq!(run.stdout.lines().next(), Some("DENY policy=- rule=-"));

    // The path is normalized as the sidecar normalizes it before matching.
    let run = sidewall([
        "policy",
        "check",
        "--from",
        FRONTEND,
        "--to",
        API,
        "--port",
        "8080",
        "--method",
        "POST",
        "--path",
        "/v2/..//v1/./orders",
        "examples/three-tier/policies",
    ]);
    assert_eq!(
        run.stdout.lines().next(),
        Some("ALLOW policy=api-from-frontend rule=2")
    );
}

#[test]
fn check_explain_and_audit_lines() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: db}\nspec:\n  target: spiffe://e.org/db\n  rules:\n    - {action: allow, from: [spiffe://e.org/api]}\n---\napiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: db-next}\nspec:\n  target: spiffe://e.org/db\n  mode: audit\n  rules:\n    - {action: deny, from: [spiffe://e.org/api], ports: [5432]}\n",
    )
    .unwrap();
    let path = dir.path().display().to_string();
    let run = sidewall([
        "policy",
        "check",
        "--from",
        "spiffe://e.org/api",
        "--to",
        "spiffe://e.org/db",
        "--port",
        "5432",
        "--explain",
        &path,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "ALLOW policy=db rule=1");
    assert_eq!(lines[1], "audit: would deny policy=db-next rule=1");
    assert!(
        lines.contains(&"  policy db-next (target spiffe://e.org/db, audit)"),
        "{}",
        run.stdout
    );
    assert!(
        lines.contains(&"    rule 1 deny: matches"),
        "{}",
        run.stdout
    );
}

#[test]
fn check_refuses_bad_input_with_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--from",
                "spiffe://Sidewall.local/x",
                "--to",
                API,
                "--port",
                "1",
            ],
            "--from \"spiffe://Sidewall.local/x\": trust domain contains uppercase 'S'",
        ),
        (
            &["--from", API, "--to", "api", "--port", "1"],
            "--to \"api\": missing scheme",
        ),
        (
            &["--from", API, "--to", DB, "--port", "0"],
            "0 is not in 1..=65535",
        ),
        (
            &[
                "--from",
                API,
                "--to",
                DB,
                "--port",
                "1",
                "--path",
                "/%2e%2e/admin",
            ],
            "refuses this path with 400 before any policy: percent-encoded '.' (%2E) is refused",
        ),
        (
            &["--from", API, "--to", DB, "--port", "1", "--method", "G ET"],
            "\"G ET\" is not an HTTP method",
        ),
        // Review M12: what the sidecar refuses, check refuses too, instead of deciding.
        (
            &[
                "--from",
                API,
                "--to",
                DB,
                "--port",
                "1",
                "--host",
                "admin.shop:abc",
            ],
            "--host \"admin.shop:abc\": the sidecar refuses this Host with 400 before any policy",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["policy", "check"];
        all.extend_from_slice(args);
        all.push("examples/three-tier/policies");
        let run = sidewall(&all);
        assert_eq!(run.code, 2, "{all:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{all:?}: {}", run.stderr);
        assert_eq!(run.stdout, "");
    }
    let run = sidewall([
        "policy",
        "check",
        "--from",
        API,
        "--to",
        DB,
        "--port",
        "1",
        "no/such/dir",
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("no/such/dir: no such file or directory"),
        "{}",
        run.stderr
    );
}

#[test]
fn test_command_passes_the_example_and_reports_failures() {
    let run = sidewall(["policy", "test", THREE_TIER]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("18 passed, 0 failed"),
        "{}",
        run.stdout
    );

    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("t.yaml"),
        format!("apiVersion: sidewall.dev/v1\nkind: PolicyTest\nmetadata: {{name: wrong}}\nspec:\n  cases:\n    - {{from: {API}, to: {DB}, port: 5432, expect: allow}}\n    - {{from: {FRONTEND}, to: {DB}, port: 5432, expect: allow}}\n"),
    )
    .unwrap();
    let run = sidewall([
        "policy".as_ref(),
        "test".as_ref(),
        "examples/three-tier/policies".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert_eq!(run.code, 1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(lines[0].starts_with("FAIL wrong ("), "{}", lines[0]);
    assert!(lines[0].ends_with(&format!("case 2: {FRONTEND} -> {DB} port 5432 (tcp connection): expected ALLOW, got DENY policy=- rule=-")), "{}", lines[0]);
    assert!(lines[1].starts_with("1 passed, 1 failed"));
}

#[test]
fn help_explains_the_commands() {
    let run = sidewall(["policy", "check", "--help"]);
    assert_eq!(run.code, 0);
    for needle in ["--explain", "--http", "policy=- rule=-", "normalized"] {
        assert!(run.stdout.contains(needle), "{needle}: {}", run.stdout);
    }
}
