//! The control-plane API against its OpenAPI description (docs/openapi.yaml): every route the
//! server routes is described, and Schemathesis (from PyPI; scripts/test-deps installs it)
//! sends a bounded run of generated requests as each kind of caller (none, a workload, an
//! operator) and finds no 5xx, and every answer matching the description (status, content
//! type, body schema, and for a refusal its code among those documented for that operation and
//! status). That each documented refusal is reachable is the job of
//! control-plane/tests/bad_input.rs, which gives every one of them on its operation.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

mod support;

use std::path::Path;
use std::process::Command;

use support::{ControlPlaneProcess, repo_root};

const TD: &str = "spiffe://sidewall.local/ns/schema/svc";

/// Every path the API routes (`control-plane/src/api.rs`) has an entry in docs/openapi.yaml:
/// exact paths as they are, prefix routes (`/v1/tokens/` + id) as a templated path.
#[test]
fn every_route_is_described() {
    let routes = std::fs::read_to_string(repo_root().join("control-plane/src/api.rs")).unwrap();
    let description = std::fs::read_to_string(repo_root().join("docs/openapi.yaml")).unwrap();
    let described: Vec<&str> = description
        .lines()
        .filter_map(|l| l.strip_prefix("  /v1/")?.strip_suffix(':'))
        .collect();
    let mut checked = 0;
    for line in routes.lines().filter(|l| l.contains("(&Method::")) {
        let Some(path) = line.split('"').nth(1).and_then(|p| p.strip_prefix("/v1/")) else {
            continue;
        };
        let found = if line.contains("starts_with") {
            described
                .iter()
                .any(|d| d.starts_with(path) && d[path.len()..].starts_with('{'))
        } else {
            described.contains(&path)
        };
        assert!(
            found,
            "/v1/{path} (from `{}`) is not in docs/openapi.yaml",
            line.trim()
        );
        checked += 1;
    }
    assert!(checked >= 19, "only {checked} routes found in api.rs");
}

/// A workload certificate for `TD/name`, made the way a user without a sidecar would: openssl
/// for the key and CSR, a join token, curl. Returns (chain, key) paths.
fn workload(cp: &ControlPlaneProcess, dir: &Path, name: &str) -> (String, String) {
    let token = cp.cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
    assert_eq!(token.code, 0, "{}", token.stderr);
    let token = token.stdout.lines().last().unwrap().trim().to_owned();
    let (key, csr) = (dir.join("key.pem"), dir.join("req.csr"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=ignored", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let body = serde_json::json!({"csr": std::fs::read_to_string(&csr).unwrap(), "token": token});
    let body_file = dir.join("body.json");
    std::fs::write(&body_file, body.to_string()).unwrap();
    let issued = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(cp.data_dir.join("trust-bundle.pem"))
        .arg("--data-binary")
        .arg(format!("@{}", body_file.display()))
        .arg(format!("https://127.0.0.1:{}/v1/certificates", cp.api_port))
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&issued.stdout).unwrap();
    let chain = dir.join("chain.pem");
    std::fs::write(&chain, answer["certificate_chain"].as_str().unwrap()).unwrap();
    (chain.display().to_string(), key.display().to_string())
}

/// Runs Schemathesis (in `dir`) on the operations tagged `tag`, with `certificate` if any;
/// returns its output after checking that it passed.
fn schemathesis(
    cp: &ControlPlaneProcess,
    dir: &Path,
    tag: &str,
    certificate: Option<(&str, &str)>,
) -> String {
    let mut command = Command::new("schemathesis");
    // Its example database goes to the working directory: the test's, not the repository.
    command
        .current_dir(dir)
        .arg("run")
        .arg(repo_root().join("docs/openapi.yaml"))
        .args(["--url", &format!("https://127.0.0.1:{}", cp.api_port)])
        .arg("--tls-verify")
        .arg(cp.data_dir.join("trust-bundle.pem"))
        .args(["--include-tag", tag, "--exclude-tag", "stream"])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        ])
        .args(["--max-examples", "15", "--no-color"]);
    // The seed a failed run printed replays it.
    if let Ok(seed) = std::env::var("SIDEWALL_SCHEMATHESIS_SEED") {
        command.args(["--seed", &seed]);
    }
    if let Some((chain, key)) = certificate {
        command.args(["--request-cert", chain, "--request-cert-key", key]);
    }
    let run = command
        .output()
        .expect("schemathesis (scripts/test-deps installs it from PyPI)");
    let output = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success() && output.contains(" passed") && !output.contains(" failed"),
        "schemathesis found failures as {tag}:\n{output}\n{}\nthe control plane's log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        std::fs::read_to_string(cp.data_dir.with_extension("log")).unwrap_or_default()
    );
    output
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_off_the_description() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    let (chain, key) = workload(&cp, dir.path(), "generated");
    let admin = cp.data_dir.join("operators");
    let (admin_chain, admin_key) = (
        admin.join("admin.pem").display().to_string(),
        admin.join("admin.key").display().to_string(),
    );
    schemathesis(&cp, dir.path(), "public", None);
    schemathesis(&cp, dir.path(), "workload", Some((&chain, &key)));
    schemathesis(
        &cp,
        dir.path(),
        "operator",
        Some((&admin_chain, &admin_key)),
    );
    // Whatever it sent, the control plane still serves.
    let (status, _) = support::http_get(cp.admin_port, "/ready");
    assert_eq!(status, 200);
}
