//! The dashboard end to end: the real `sidewall control-plane` binary, a policy set applied with
//! the CLI, three workloads enrolled with join tokens that register, watch, acknowledge and
//! report flows (one of them denied) over the mTLS API as sidecars do, and the page loaded in
//! headless Chromium, which must show the three services and the denied edge.
//!
//! Needs Debian's `chromium` (`scripts/test-deps` installs it); without it the test prints
//! `SKIPPED: chromium not installed` and passes. Set `SIDEWALL_DASHBOARD_SCREENSHOT=<file.png>`
//! to also save a 1280×900 screenshot of the page.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

mod support;

use serde_json::json;
use sidewall_control_plane::testing::{Workload, enroll};
use sidewall_policies::TrustDomain;
use support::{ControlPlaneProcess, chromium, chromium_installed, http_get};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

const POLICIES: &str = "\
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api-from-frontend}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/api
  rules:
    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/frontend], ports: [8080], http: {methods: [GET], paths: [/v1/orders, /v1/orders/**]}}
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: db-from-api}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/db
  rules:
    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/api], ports: [5432]}
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: frontend-metrics}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/frontend
  mode: audit
  rules:
    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/monitor], ports: [9090]}
";

/// Enrolls, registers and connects three workloads, and reports the flows their sidecars saw.
async fn feed(
    cp: &ControlPlaneProcess,
) -> (Vec<Workload>, Vec<sidewall_control_plane::testing::Watch>) {
    let url = format!("https://127.0.0.1:{}", cp.api_port);
    let trust_domain = TrustDomain::new("sidewall.local").unwrap();
    let mut workloads = Vec::new();
    for name in ["frontend", "api", "db"] {
        workloads.push(enroll(&cp.data_dir, &url, &trust_domain, &format!("{TD}/{name}")).await);
    }
    let [frontend, api, db] = &workloads[..] else {
        unreachable!()
    };
    frontend.register(support::free_port(), "tcp").await;
    api.register(support::free_port(), "http").await;
    db.register(support::free_port(), "tcp").await;
    let mut watches = Vec::new();
    for workload in &workloads {
        watches.push(workload.watch_and_ack().await);
    }
    api.report_flows(json!([
        {"peer": frontend.identity, "port": 8080, "protocol": "http", "method": "GET", "path": "/v1/orders", "count": 12, "allow": 12},
    ]))
    .await;
    db.report_flows(json!([
        {"peer": api.identity, "port": 5432, "count": 9, "allow": 9},
        {"peer": frontend.identity, "port": 5432, "count": 3, "deny": 3, "last_denial": "default deny"},
    ]))
    .await;
    frontend
        .report_flows(json!([{"peer": api.identity, "port": 9090, "count": 2, "audit": 2}]))
        .await;
    (workloads, watches)
}

/// The markup from the first occurrence of `start` to the first `end` after it, if any.
fn element<'a>(dom: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let at = dom.find(start)?;
    Some(&dom[at..at + dom[at..].find(end)? + end.len()])
}

#[test]
fn chromium_shows_the_three_services_and_the_denied_edge() {
    if !chromium_installed() {
        eprintln!("SKIPPED: chromium not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Two denials of one peer at one target are an alert here (20 by default).
    let config = dir.path().join("control-plane.yaml");
    std::fs::write(&config, "detection: {denials: 2}\n").unwrap();
    let cp = ControlPlaneProcess::start(
        &dir.path().join("cp"),
        &["--config", config.to_str().unwrap()],
    );
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("demo.yaml"), POLICIES).unwrap();
    let run = cp.cli(&["policy", "apply", policies.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The watches stay open (the fleet shows the sidecars connected) while Chromium runs.
    let (_workloads, watches) = runtime.block_on(feed(&cp));

    // The dashboard is on its own address, never on the admin one.
    assert_eq!(http_get(cp.admin_port, "/api/graph").0, 404);
    let page = format!("http://127.0.0.1:{}/", cp.ui_port);
    let work = tempfile::tempdir().unwrap();
    let dom = chromium(work.path(), &page, &["--dump-dom"]);
    assert!(
        dom.contains(r#"<body data-loaded="true">"#),
        "the first fetch never completed:\n{dom}"
    );
    for name in ["frontend", "api", "db"] {
        let identity = format!("{TD}/{name}");
        let node = element(
            &dom,
            &format!(r#"<g class="node connected" data-identity="{identity}""#),
            "</g>",
        )
        .unwrap_or_else(|| panic!("no connected node for {name}:\n{dom}"));
        assert!(node.contains(&format!(r#"data-name="{name}""#)), "{node}");
        assert!(
            node.contains(&format!(">{name}</text>")),
            "name not drawn: {node}"
        );
        let row = element(
            &dom,
            &format!(r#"<tr class="proxy connected" data-identity="{identity}""#),
            "</tr>",
        )
        .unwrap_or_else(|| panic!("no fleet row for {name}:\n{dom}"));
        assert!(row.contains(">in sync</span>"), "{row}");
    }
    let denied = element(
        &dom,
        &format!(r#"<g class="edge denied" data-from="{TD}/frontend" data-to="{TD}/db""#),
        "</g>",
    )
    .unwrap_or_else(|| panic!("no denied edge frontend → db:\n{dom}"));
    assert!(denied.contains(r#"data-deny="3""#), "{denied}");
    assert!(denied.contains(">:5432 · 3 denied</text>"), "{denied}");
    let row = element(
        &dom,
        &format!(r#"<tr class="flow denied" data-from="{TD}/frontend" data-to="{TD}/db""#),
        "</tr>",
    )
    .unwrap_or_else(|| panic!("no denied row in the flows table:\n{dom}"));
    assert!(
        row.contains(">denied</span>") && row.contains(">default deny</td>"),
        "{row}"
    );
    // The other edges keep their own colours: only the denied one is red.
    for (from, to, kind) in [
        ("frontend", "api", "allowed"),
        ("api", "db", "allowed"),
        ("api", "frontend", "audit"),
    ] {
        assert!(
            dom.contains(&format!(
                r#"<g class="edge {kind}" data-from="{TD}/{from}" data-to="{TD}/{to}""#
            )),
            "{from} → {to} is not {kind}:\n{dom}"
        );
    }
    assert_eq!(dom.matches(r#"<g class="edge denied""#).count(), 1);
    // The Alerts panel: the denials of frontend at db were a burst.
    let alert = element(
        &dom,
        &format!(
            r#"<tr class="alert denial_burst" data-signal="denial_burst" data-from="{TD}/frontend" data-to="{TD}/db""#
        ),
        "</tr>",
    )
    .unwrap_or_else(|| panic!("no alert row for frontend → db:\n{dom}"));
    assert!(
        alert.contains(">denial burst</span>") && alert.contains(">3 denials within 60 s</td>"),
        "{alert}"
    );
    assert_eq!(dom.matches(r#"<tr class="alert "#).count(), 1, "{dom}");
    assert!(
        dom.contains(r#"data-name="frontend-metrics" data-mode="audit""#),
        "{dom}"
    );

    if let Ok(file) = std::env::var("SIDEWALL_DASHBOARD_SCREENSHOT") {
        chromium(
            work.path(),
            &page,
            &[
                &format!("--screenshot={file}"),
                "--window-size=1280,900",
                "--hide-scrollbars",
            ],
        );
        assert!(
            std::fs::metadata(&file).is_ok_and(|m| m.len() > 10_000),
            "no screenshot at {file}"
        );
    }
    drop(watches);
}
