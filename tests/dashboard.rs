//! The dashboard and the segmentation report end to end: the real `sidewall control-plane`
//! binary, a policy set applied with the CLI, three workloads enrolled with join tokens that
//! register, watch, acknowledge and report flows (one of them denied) over the mTLS API as
//! sidecars do, and the pages loaded in headless Chromium: the dashboard must show the three
//! services and the denied edge; the report must state what the test did, and its signature
//! must verify with `openssl`.
//!
//! Needs Debian's `chromium` (`scripts/test-deps` installs it); without it the dashboard test
//! prints `SKIPPED: chromium not installed` and passes (the report test checks all but the
//! rendering). Set `SIDEWALL_DASHBOARD_SCREENSHOT=<file.png>` to also save a 1280×900
//! screenshot of the dashboard; the report's screenshot is always kept, in the test target's
//! temporary directory (`target/tmp/segmentation-report.png`).

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
    let version = env!("CARGO_PKG_VERSION");
    let watches = vec![
        frontend
            .watch_and_ack_as(
                json!({"version": version, "permissive_ports": [9090], "egress": ["10.0.0.9:443"]}),
            )
            .await,
        api.watch_and_ack().await,
        db.watch_and_ack_as(json!({"version": version, "allow_tls12": true}))
            .await,
    ];
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
    // How connections arrived: handshakes by TLS version and suite, plaintext on 9090.
    frontend
        .post(
            "/v1/flows",
            json!({"flows": [], "tls": [{"version": "TLSv1_3", "suite": "TLS13_AES_256_GCM_SHA384", "count": 5}],
                   "plaintext": [{"port": 9090, "count": 4}]}),
        )
        .await;
    db.post(
        "/v1/flows",
        json!({"flows": [], "tls": [{"version": "TLSv1_3", "suite": "TLS13_AES_256_GCM_SHA384", "count": 7},
                                    {"version": "TLSv1_2", "suite": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "count": 1}]}),
    )
    .await;
    (workloads, watches)
}

/// [`feed`] on a runtime of its own, returned with what it made: the watches stay open while
/// the runtime lives.
fn fed(
    cp: &ControlPlaneProcess,
) -> (
    tokio::runtime::Runtime,
    Vec<Workload>,
    Vec<sidewall_control_plane::testing::Watch>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (workloads, watches) = runtime.block_on(feed(cp));
    (runtime, workloads, watches)
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

    // The watches stay open (the fleet shows the sidecars connected) while Chromium runs.
    let (_runtime, _workloads, watches) = fed(&cp);

    // The dashboard is on its own address, never on the admin one.
    assert_eq!(http_get(cp.admin_port, "/api/graph").0, 404);
    let page = format!("http://127.0.0.1:{}/", cp.ui_port);
    let work = tempfile::tempdir().unwrap();
    let dom = chromium(work.path(), &page, &["--dump-dom"]);
    assert!(
        dom.contains(r#"<body data-loaded="true">"#),
        "the first fetch never completed:\n{dom}"
    );
    assert!(
        dom.contains(r#"<a id="report-link" class="report-link" href="/report""#),
        "no link to the segmentation report:\n{dom}"
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

/// A shell command in `dir`: (success, stdout and stderr).
fn shell(dir: &std::path::Path, command: &str) -> (bool, String) {
    let run = std::process::Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        run.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        ),
    )
}

/// A known mesh: two policy versions by two operators (the second adds an audit-mode policy),
/// three workloads with allowed, denied and audited flows, a revocation. `sidewall report`
/// states each of those numbers, its signature verifies with `openssl` against the trust
/// bundle, an edited report.json does not, and Chromium renders the page.
#[test]
fn the_signed_report_states_what_the_mesh_did() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    let ok = |run: &support::Run| assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    ok(&cp.cli(&["operator", "issue", "ana", "--role", "policy"]));
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let first: Vec<&str> = POLICIES.split("---\n").collect();
    std::fs::write(policies.join("demo.yaml"), first[..2].join("---\n")).unwrap();
    ok(&cp.cli(&["policy", "apply", policies.to_str().unwrap()]));
    std::fs::write(policies.join("demo.yaml"), POLICIES).unwrap();
    ok(&cp.cli(&[
        "policy",
        "apply",
        policies.to_str().unwrap(),
        "--operator",
        "ana",
    ]));
    // Revoked before the sidecars connect: the snapshot they acknowledge carries it.
    ok(&cp.cli(&["workload", "revoke", &format!("{TD}/retired")]));
    let (runtime, workloads, watches) = fed(&cp);
    // Facts out of bounds are left out of an ack, which still counts.
    let api = &workloads[1];
    let (status, answer) = runtime
        .block_on(api.client.call(
            hyper::Method::POST,
            "/v1/acks",
            Some(
                &json!({"instance": api.instance(), "version": watches[1].snapshot["version"],
                         "status": "applied", "sidecar": {"version": "9".repeat(65)},
                         "certificate_serial": "not hex"}),
            ),
        ))
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    // A request allowed by its sidecar that the policies in force, replayed on the path's
    // first segments and no host, would deny: the report does not guess its rule.
    let frontend = &workloads[0];
    runtime.block_on(api.report_flows(json!([
        {"peer": frontend.identity, "port": 8080, "protocol": "http", "method": "GET", "path": "/v2/items", "count": 1, "allow": 1},
    ])));
    let (_, metrics) = http_get(cp.admin_port, "/metrics");
    for reason in ["sidecar_facts_invalid", "certificate_serial_invalid"] {
        assert!(
            metrics.contains(&format!(
                r#"sidewall_control_plane_refusals_total{{route="acks",reason="{reason}"}} 1"#
            )),
            "{metrics}"
        );
    }

    let out = dir.path().join("report");
    let (status, said) = http_get(cp.ui_port, "/report");
    assert_eq!(
        status, 404,
        "the dashboard has no report before one is made: {said}"
    );
    assert!(said.contains("sidewall report --out DIR"), "{said}");
    let run = cp.cli(&["report", "--since", "1d", "--out", out.to_str().unwrap()]);
    ok(&run);
    assert!(
        run.stdout
            .contains("3 workloads, 3 rules in force, 3 denied attempts"),
        "{}",
        run.stdout
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let strings = |value: &serde_json::Value, field: &str| -> Vec<String> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[field].as_str().unwrap().to_owned())
            .collect()
    };
    let admin = "spiffe://sidewall.local/sidewall/operator/admin";
    let ana = "spiffe://sidewall.local/sidewall/operator/ana";
    assert_eq!(report["generated_by"], admin);

    // 1. Scope: the three workloads, connected, with the version in force applied.
    let scope = &report["scope"];
    assert_eq!(scope["trust_domain"], "spiffe://sidewall.local");
    assert_eq!(scope["control_plane_version"], env!("CARGO_PKG_VERSION"));
    let identities = strings(&scope["workloads"], "identity");
    assert_eq!(
        identities,
        [
            format!("{TD}/api"),
            format!("{TD}/db"),
            format!("{TD}/frontend")
        ]
    );
    for workload in scope["workloads"].as_array().unwrap() {
        assert_eq!(workload["connected"], true, "{workload}");
        assert_eq!(workload["policy_in_force"], true, "{workload}");
        assert!(workload["certificate_expires_at"].is_string(), "{workload}");
        assert_eq!(workload["key_type"], "ECDSA P-256", "{workload}");
        assert_eq!(
            workload["sidecar_version"],
            env!("CARGO_PKG_VERSION"),
            "{workload}"
        );
    }
    // Exceptions: the audit-only target, and what the sidecars said they run with.
    let exceptions: Vec<String> = scope["exceptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}: {}",
                e["kind"].as_str().unwrap(),
                e["target"].as_str().unwrap().rsplit('/').next().unwrap(),
                e["detail"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        exceptions,
        [
            "audit_only frontend: an audit-mode policy targets it and no enforce policy does: traffic to it is allowed and only recorded",
            "egress frontend: its app may reach 10.0.0.9:443, outside the mesh, in plaintext",
            "permissive_port frontend: port 9090 accepts plaintext connections, with no identity and no policy (a migration allowance in its sidecar's configuration)",
            "tls12 db: its sidecar accepts TLS 1.2 as well as TLS 1.3",
        ]
    );

    // 2. The matrix: the three rules, with the flows each decided; default deny.
    let segmentation = &report["segmentation"];
    assert_eq!(segmentation["default"], "deny");
    assert_eq!(segmentation["denied_attempts"], 3);
    let rules: Vec<String> = segmentation["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} ports {} [{}] matched {}",
                r["policy"].as_str().unwrap(),
                r["mode"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
                r["from"][0].as_str().unwrap().rsplit('/').next().unwrap(),
                r["ports"].as_str().unwrap(),
                r["http"].as_str().unwrap(),
                r["matched"]
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            "api-from-frontend enforce allow frontend ports 8080 [methods GET; paths /v1/orders, /v1/orders/**] matched 12",
            "db-from-api enforce allow api ports 5432 [] matched 9",
            "frontend-metrics audit allow monitor ports 9090 [] matched 0",
        ]
    );

    // 3. Observed: four flows; the audit rule unused; the denied attempts by pair.
    let observed = &report["observed"];
    let flows: Vec<String> = observed["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}->{}:{} {} allowed {} denied {} would-deny {} by {}",
                f["source"].as_str().unwrap().rsplit('/').next().unwrap(),
                f["target"].as_str().unwrap().rsplit('/').next().unwrap(),
                f["port"],
                f["request"].as_str().unwrap(),
                f["allowed"],
                f["denied"],
                f["would_deny"],
                f["rule"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        flows,
        [
            "api->db:5432  allowed 9 denied 0 would-deny 0 by db-from-api rule 1",
            "api->frontend:9090  allowed 0 denied 0 would-deny 2 by default deny",
            "frontend->api:8080 GET /v1/orders allowed 12 denied 0 would-deny 0 by api-from-frontend rule 1",
            "frontend->api:8080 GET /v2/items allowed 1 denied 0 would-deny 0 by undetermined: the deciding rule needs the whole path or the host",
            "frontend->db:5432  allowed 0 denied 3 would-deny 0 by default deny",
        ]
    );
    assert_eq!(
        observed["unused_allow_rules"],
        serde_json::json!([{"policy": "frontend-metrics", "rule": 1}])
    );
    assert_eq!(
        observed["denied"],
        serde_json::json!([{"source": format!("{TD}/frontend"), "target": format!("{TD}/db"), "attempts": 3}])
    );

    // 4. Every observed flow over mutual TLS; workload certificates of 24 h.
    let encryption = &report["encryption"];
    assert_eq!(encryption["mutual_tls"], 12 + 1 + 9 + 3 + 2);
    assert_eq!(encryption["shortest_certificate_hours"], 24);
    assert_eq!(encryption["longest_certificate_hours"], 24);
    assert_eq!(
        encryption["tls"],
        serde_json::json!([
            {"version": "TLSv1_2", "suite": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "handshakes": 1},
            {"version": "TLSv1_3", "suite": "TLS13_AES_256_GCM_SHA384", "handshakes": 12},
        ])
    );
    assert_eq!(
        encryption["plaintext"],
        serde_json::json!([{"target": format!("{TD}/frontend"), "port": 9090, "connections": 4}])
    );

    // 5. Two versions by two operators; the trail intact.
    let changes = &report["changes"];
    let versions: Vec<String> = changes["policy_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{} {} policies {} rules {} added [{}] in force {}",
                v["version"],
                v["applied_by"].as_str().unwrap(),
                v["policies"],
                v["rules"],
                v["added"].as_str().unwrap(),
                v["in_force"]
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            // The first version has nothing before it to differ from.
            format!("1 {admin} policies 2 rules 2 added [] in force false"),
            format!("2 {ana} policies 3 rules 3 added [frontend-metrics] in force true"),
        ]
    );
    // The three sidecars connected after version 2: they applied it, never version 1.
    let rollout = |v: usize| -> Vec<String> {
        changes["policy_versions"][v]["applied_by_sidecars"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                assert!(a["at"].as_str().unwrap().ends_with('Z'), "{a}");
                a["instance"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(rollout(0), Vec::<String>::new());
    assert_eq!(rollout(1), ["api-1", "db-1", "frontend-1"]);
    assert_eq!(changes["audit_trail"]["verified"], true, "{changes}");
    assert!(
        changes["policy_versions"][1]["set_sha256"]
            .as_str()
            .unwrap()
            .len()
            == 64
    );

    // 6. Certificates: two operators and three workloads issued, one identity revoked.
    let certificates = &report["certificates"];
    let mut issued: Vec<String> = certificates["issued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["kind"].as_str().unwrap(),
                c["identity"].as_str().unwrap().rsplit('/').next().unwrap()
            )
        })
        .collect();
    issued.sort();
    assert_eq!(
        issued,
        [
            "operator admin",
            "operator ana",
            "workload api",
            "workload db",
            "workload frontend"
        ]
    );
    assert_eq!(
        strings(&certificates["revoked"], "value"),
        [format!("{TD}/retired")]
    );
    assert_eq!(strings(&certificates["revoked"], "by"), [admin]);
    assert_eq!(report["controls"].as_array().unwrap().len(), 6);

    // The signature, with openssl and the trust bundle only; an edited report fails.
    std::fs::copy(
        cp.data_dir.join("trust-bundle.pem"),
        out.join("trust-bundle.pem"),
    )
    .unwrap();
    let verify = "openssl verify -CAfile trust-bundle.pem -untrusted chain.pem chain.pem && \
                  openssl x509 -in chain.pem -noout -ext subjectAltName && \
                  openssl x509 -in chain.pem -noout -pubkey > control-plane.pub && \
                  openssl dgst -sha256 -verify control-plane.pub -signature report.json.sig report.json";
    let (passed, said) = shell(&out, verify);
    assert!(
        passed
            && said.contains("chain.pem: OK")
            && said.contains("URI:spiffe://sidewall.local/sidewall/control-plane")
            && said.contains("Verified OK"),
        "{said}"
    );
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    let edited = text.replacen("\"denied_attempts\": 3", "\"denied_attempts\": 0", 1);
    assert_ne!(edited, text);
    std::fs::write(out.join("report.json"), edited).unwrap();
    let (passed, said) = shell(&out, verify);
    assert!(!passed && said.contains("Verification failure"), "{said}");
    std::fs::write(out.join("report.json"), &text).unwrap();

    // The dashboard links the newest report, rendered from the same JSON but for section 6:
    // anyone who reaches the dashboard reads it, and join token ids stay behind the API.
    let (status, page) = http_get(cp.ui_port, "/report");
    assert_eq!(status, 200, "{page}");
    let file = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        file.contains("token:") && !page.contains("token:"),
        "{page}"
    );
    assert!(
        page.contains(r#"<p id="certificates-elsewhere">"#),
        "{page}"
    );
    let before_section_6 =
        |html: &str| html[..html.find(r#"<section id="s6">"#).unwrap()].to_owned();
    assert_eq!(before_section_6(&page), before_section_6(&file));

    // Generating it is itself an audit record.
    let trail = cp.cli(&["audit", "log", "--json"]);
    ok(&trail);
    assert!(
        trail
            .stdout
            .lines()
            .any(|l| l.contains("\"action\":\"report.signed\"") && l.contains(admin)),
        "{}",
        trail.stdout
    );

    // These sidecars do not make probes: a segmentation test cannot verify anything, and
    // says so (exit 1), naming how many pairs went unprobed.
    let run = cp.cli(&["verify", "segmentation", "--timeout", "10s"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .starts_with("segmentation not verified: 4 pairs could not be probed"),
        "{}{}",
        run.stdout,
        run.stderr
    );

    // The page, in headless Chromium: self-contained, every section, the numbers above.
    if !chromium_installed() {
        eprintln!("SKIPPED (rendering only): chromium not installed");
        return;
    }
    let page = format!("file://{}", out.join("report.html").display());
    let work = tempfile::tempdir().unwrap();
    let dom = chromium(work.path(), &page, &["--dump-dom"]);
    for (n, title) in [
        (1, "Scope"),
        (2, "Segmentation matrix"),
        (3, "Observed against allowed"),
        (4, "Encryption in transit"),
        (5, "Change history"),
        (6, "Certificates"),
        (7, "Control mapping"),
    ] {
        assert!(
            dom.contains(&format!("<h2>{n}. {title}</h2>")),
            "no section {n}:\n{dom}"
        );
    }
    assert!(
        dom.contains(r#"<strong id="denied-attempts">3</strong>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<strong id="mutual-tls">27</strong>"#),
        "{dom}"
    );
    assert!(dom.contains(r#"<span class="ok">intact</span>"#), "{dom}");
    assert!(dom.contains("not a certification"), "{dom}");
    assert!(dom.matches("<tr><td><code>spiffe://").count() >= 3, "{dom}");
    let screenshot =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("segmentation-report.png");
    chromium(
        work.path(),
        &page,
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,2400",
            "--hide-scrollbars",
        ],
    );
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        screenshot.display()
    );
    eprintln!("the report's screenshot: {}", screenshot.display());
    drop(watches);
}

/// Flow counts outlive the control plane: what sidecars reported before a restart is in the
/// report made after it, added to what they report after it (each process's daily roll-ups,
/// kept in the store).
#[test]
fn a_report_counts_what_sidecars_reported_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    let ok = |run: &support::Run| assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("demo.yaml"), POLICIES).unwrap();
    ok(&cp.cli(&["policy", "apply", policies.to_str().unwrap()]));
    let (runtime, workloads, watches) = fed(&cp);
    assert_eq!(cp.stop(), Some(0));
    cp.restart(&[]);
    // After the restart, db's sidecar reports one more connection from api, and a handshake.
    let (api, db) = (&workloads[1], &workloads[2]);
    runtime.block_on(db.post(
        "/v1/flows",
        json!({"flows": [{"peer": api.identity, "port": 5432, "count": 1, "allow": 1}],
               "tls": [{"version": "TLSv1_3", "suite": "TLS13_AES_256_GCM_SHA384", "count": 1}]}),
    ));

    let out = dir.path().join("report");
    ok(&cp.cli(&["report", "--since", "1d", "--out", out.to_str().unwrap()]));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["segmentation"]["denied_attempts"], 3, "{report}");
    // The three sidecars applied version 1 before the restart, and the report still says so.
    let applied: Vec<&str> = report["changes"]["policy_versions"][0]["applied_by_sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["instance"].as_str().unwrap())
        .collect();
    assert_eq!(applied, ["api-1", "db-1", "frontend-1"], "{report}");
    let flows: Vec<String> = report["observed"]["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}->{}:{} allowed {} denied {} would-deny {}",
                f["source"].as_str().unwrap().rsplit('/').next().unwrap(),
                f["target"].as_str().unwrap().rsplit('/').next().unwrap(),
                f["port"],
                f["allowed"],
                f["denied"],
                f["would_deny"],
            )
        })
        .collect();
    assert_eq!(
        flows,
        [
            "api->db:5432 allowed 10 denied 0 would-deny 0",
            "api->frontend:9090 allowed 0 denied 0 would-deny 2",
            "frontend->api:8080 allowed 12 denied 0 would-deny 0",
            "frontend->db:5432 allowed 0 denied 3 would-deny 0",
        ]
    );
    let encryption = &report["encryption"];
    assert_eq!(encryption["mutual_tls"], 12 + 10 + 3 + 2);
    assert_eq!(
        encryption["tls"],
        serde_json::json!([
            {"version": "TLSv1_2", "suite": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "handshakes": 1},
            {"version": "TLSv1_3", "suite": "TLS13_AES_256_GCM_SHA384", "handshakes": 13},
        ])
    );
    assert_eq!(
        encryption["plaintext"],
        serde_json::json!([{"target": format!("{TD}/frontend"), "port": 9090, "connections": 4}])
    );
    // The counts run from the first process's start, before the restart.
    let counted_since = report["observed"]["counted_since"].as_str().unwrap();
    let trail = cp.cli(&["audit", "log", "--json"]);
    ok(&trail);
    let first_start = trail
        .stdout
        .lines()
        .find(|l| l.contains("\"action\":\"control-plane.started\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time"].as_i64())
        .unwrap()
        .unwrap();
    let first_start = sidewall_control_plane::api::unix_rfc3339(first_start);
    assert!(
        counted_since <= first_start.as_str(),
        "{counted_since} after {first_start}"
    );
    drop(watches);
}
