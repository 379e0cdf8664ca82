//! `sidewall-bench --target` against a real mesh (issue 22, part 3): a control plane, an `api`
//! sidecar in front of `sidewall-bench serve`, a `web` sidecar with a route to it, the policy
//! applied with the CLI; the bench loads web's route as a performance engineer would and reads
//! both sidecars' metrics. Nothing about speed is asserted: what is checked is that every
//! workload produced its figures through the mesh, and that the report's "where time went"
//! agrees with what the load did.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use support::{ControlPlaneProcess, ProxyProcess, free_port};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

/// The `sidewall-bench` binary beside `sidewall` (`cargo test --workspace` builds every
/// workspace binary before the tests run), built there if a narrower build left it out. A
/// narrower build does not rebuild it either: after changing the bench, `cargo build -p
/// sidewall-bench` before `cargo test --test bench_target`.
fn bench_binary() -> PathBuf {
    let sidewall = Path::new(env!("CARGO_BIN_EXE_sidewall"));
    let binary = sidewall.with_file_name("sidewall-bench");
    if !binary.is_file() {
        let dir = sidewall.parent().unwrap();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "-p", "sidewall-bench", "--bin", "sidewall-bench"])
            .args(["--profile", profile])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(
            status.success() && binary.is_file(),
            "cannot build sidewall-bench"
        );
    }
    binary
}

/// `sidewall-bench serve`, killed when dropped.
struct Serve(Child);

impl Serve {
    fn start(port: u16) -> Self {
        let mut child = Command::new(bench_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("serving echo, sink and count on"),
            "{line}"
        );
        Self(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mesh: control plane, `api` (inbound 8080 tcp and 8081 http, both to the app; run by the
/// lean `sidewall-proxy`) and `web` (routes to both; `sidewall proxy`), web allowed on both
/// ports.
struct Mesh {
    dir: tempfile::TempDir,
    _cp: ControlPlaneProcess,
    _serve: Serve,
    app: u16,
    api: ProxyProcess,
    web: ProxyProcess,
    tcp_route: u16,
    http_route: u16,
}

/// A sidecar for `name`; `lean` runs it with `sidewall-proxy` instead of `sidewall proxy`.
fn sidecar(
    dir: &Path,
    cp: &ControlPlaneProcess,
    (name, lean): (&str, bool),
    ports: &str,
    routes: &str,
) -> ProxyProcess {
    let run = cp.cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let token = dir.join(format!("{name}.token"));
    std::fs::write(&token, run.stdout.lines().last().unwrap()).unwrap();
    let admin = free_port();
    let config = format!(
        "identity: {TD}/{name}\ncontrolPlane:\n  urls: [https://127.0.0.1:{}]\n  tokenFile: {}\n\
         stateDir: {}\ninbound:\n  listen: 127.0.0.1:{}\n  ports: [{ports}]\n\
         outbound:\n  routes: [{routes}]\nadmin:\n  listen: 127.0.0.1:{admin}\nworkerThreads: 1\n",
        cp.api_port,
        token.display(),
        dir.join(format!("state-{name}")).display(),
        free_port(),
    );
    let proxy = if lean {
        ProxyProcess::start_lean(dir, name, &config, admin)
    } else {
        ProxyProcess::start(dir, name, &config, admin)
    };
    proxy.wait_ready();
    proxy
}

impl Mesh {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
        let app = free_port();
        let serve = Serve::start(app);
        let api = sidecar(
            dir.path(),
            &cp,
            // The server side runs the lean binary: both serve the same mesh.
            ("api", true),
            &format!(
                "{{port: 8080, app: 127.0.0.1:{app}}}, {{port: 8081, protocol: http, app: 127.0.0.1:{app}}}"
            ),
            "",
        );
        let (tcp_route, http_route) = (free_port(), free_port());
        let web = sidecar(
            dir.path(),
            &cp,
            ("web", false),
            "",
            &format!(
                "{{listen: 127.0.0.1:{tcp_route}, service: {TD}/api, port: 8080}}, \
                 {{listen: 127.0.0.1:{http_route}, service: {TD}/api, port: 8081}}"
            ),
        );
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("api.yaml"),
            format!(
                "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: api-bench}}\nspec:\n  \
                 target: {TD}/api\n  rules:\n    - {{action: allow, from: [{TD}/web], ports: [8080]}}\n    \
                 - {{action: allow, from: [{TD}/web], ports: [8081], http: {{methods: [POST], paths: [/echo, /sink]}}}}\n    \
                 - {{action: allow, from: [{TD}/web], ports: [8081], http: {{methods: [GET], paths: [/count]}}}}\n"
            ),
        )
        .unwrap();
        let run = cp.cli(&[
            "policy",
            "apply",
            policies.to_str().unwrap(),
            "--wait",
            "--timeout",
            "20s",
        ]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        Self {
            dir,
            _cp: cp,
            _serve: serve,
            app,
            api,
            web,
            tcp_route,
            http_route,
        }
    }

    fn metrics_url(proxy: &ProxyProcess) -> String {
        format!("http://127.0.0.1:{}/metrics", proxy.admin_port)
    }

    /// Runs `sidewall-bench` with `args`; (exit code, stderr).
    fn bench(&self, args: &[&str]) -> (i32, String) {
        let output = Command::new(bench_binary()).args(args).output().unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// The rows of `contender` in a report.
fn rows<'a>(report: &'a Value, contender: &str) -> Vec<&'a Value> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["contender"] == contender)
        .collect()
}

fn value(report: &Value, contender: &str, workload: &str, metric: &str) -> Option<f64> {
    rows(report, contender)
        .into_iter()
        .find(|r| r["workload"] == workload && r["metric"] == metric)
        .and_then(|r| r["value"].as_f64())
}

/// The change of `series` at `endpoint` over `workload` (0 if it did not change).
fn change(report: &Value, endpoint: &str, workload: &str, series: &str) -> f64 {
    let scrape = report["target"]["scrapes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["endpoint"] == endpoint && s["workload"] == workload)
        .unwrap_or_else(|| panic!("no scrape of {endpoint} over {workload}"));
    scrape["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["series"] == series)
        .map_or(0.0, |c| {
            c["after"].as_f64().unwrap() - c["before"].as_f64().unwrap()
        })
}

#[test]
fn target_mode_loads_a_mesh_route_and_reads_where_the_sidecars_spent_their_time() {
    let mesh = Mesh::start();
    let out = mesh.dir.path().join("report");
    let (web, api) = (Mesh::metrics_url(&mesh.web), Mesh::metrics_url(&mesh.api));
    let (code, stderr) = mesh.bench(&[
        "--target",
        &format!("127.0.0.1:{}", mesh.tcp_route),
        "--direct",
        &format!("127.0.0.1:{}", mesh.app),
        "--metrics",
        &web,
        "--metrics",
        &api,
        "--quick",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let statuses: Vec<(String, String)> = report["contenders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["contender"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("direct".into(), "ran".into()),
            ("target".into(), "ran".into())
        ]
    );

    // Every workload produced its figures through the mesh, and direct beside it.
    for (workload, metric) in [
        ("throughput-1", "gbps"),
        ("throughput-1", "cpu_s_per_gb"),
        ("throughput-8", "gbps"),
        ("rr-c1", "p99_us"),
        ("rr-c16", "rps"),
        ("rr-c64", "rps"),
        ("rr-fixed-rate", "p50_us"),
        ("connect-rate", "rps"),
        ("idle-10k", "rss_mib"),
        ("idle-10k", "rss_kib_per_conn"),
    ] {
        let figure = value(&report, "target", workload, metric);
        assert!(
            figure.is_some_and(|v| v > 0.0),
            "target {workload} {metric}: {figure:?}"
        );
    }
    assert!(value(&report, "direct", "throughput-1", "gbps").is_some_and(|v| v > 0.0));
    assert!(value(&report, "direct", "throughput-1", "cpu_s_per_gb").is_none());

    // The idle RSS per sidecar is what the sidecars' own gauges said: between the smallest
    // and largest of the two now (both hold less than they did with 1,000 connections open).
    let rss = value(&report, "target", "idle-10k", "rss_mib").unwrap();
    assert!(rss > 1.0 && rss < 512.0, "rss_mib {rss}");

    // Where time went: both sidecars spent CPU on the bulk stream, and every connection the
    // connection-rate loop completed in its window was one web opened toward api.
    for endpoint in [&web, &api] {
        let cpu = change(
            &report,
            endpoint,
            "throughput-1",
            "process_cpu_seconds_total",
        );
        assert!(cpu > 0.0, "{endpoint}: CPU over throughput-1 {cpu}");
    }
    // Bytes are counted when a connection ends: the bench lets the bulk stream's close land
    // before the second scrape, so its bytes are the bulk workload's.
    let delivered = value(&report, "target", "throughput-1", "gbps").unwrap() * 1e9 / 8.0
        * report["settings"]["duration_s"].as_f64().unwrap();
    let forwarded = change(
        &report,
        &web,
        "throughput-1",
        "sidewall_proxy_bytes_total{direction=\"outbound\"}",
    );
    assert!(
        forwarded >= delivered.floor(),
        "web forwarded {forwarded} bytes over throughput-1, the app received {delivered} in the window"
    );
    let connected = value(&report, "target", "connect-rate", "rps").unwrap()
        * report["settings"]["duration_s"].as_f64().unwrap();
    let opened = change(
        &report,
        &web,
        "connect-rate",
        "sidewall_proxy_connections_opened_total{direction=\"outbound\"}",
    );
    assert!(
        opened >= connected.floor(),
        "web opened {opened} outbound connections, the load completed {connected} in the window"
    );
    let allowed: f64 = report["target"]["scrapes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["endpoint"] == api.as_str() && s["workload"] == "connect-rate")
        .flat_map(|s| s["changes"].as_array().unwrap())
        .filter(|c| {
            let series = c["series"].as_str().unwrap();
            series.starts_with("sidewall_proxy_authorizations_total")
                && series.contains("outcome=\"allow\"")
        })
        .map(|c| c["after"].as_f64().unwrap() - c["before"].as_f64().unwrap())
        .sum();
    assert!(
        allowed >= connected.floor(),
        "api allowed {allowed} connections, the load completed {connected}"
    );

    // The report a reader opens says what was loaded, names the machine and the source, and
    // has a table per sidecar.
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        format!(
            "`target` is the deployment at `127.0.0.1:{}`",
            mesh.tcp_route
        ),
        "Machine: ".to_owned(),
        "loopback MTU".to_owned(),
        "Source: ".to_owned(),
        "## Where time went: the sidecars' metrics".to_owned(),
        format!("### {web}"),
        format!("### {api}"),
        "| `process_cpu_seconds_total` |".to_owned(),
    ] {
        assert!(markdown.contains(&needle), "no {needle:?} in:\n{markdown}");
    }
    assert!(!markdown.contains("## Sidewall's goals"), "{markdown}");
}

#[test]
fn target_mode_speaks_http_to_an_http_port_and_refuses_what_it_cannot_load() {
    let mesh = Mesh::start();
    let out = mesh.dir.path().join("http-report");
    let web = Mesh::metrics_url(&mesh.web);
    let (code, stderr) = mesh.bench(&[
        "--target",
        &format!("127.0.0.1:{}", mesh.http_route),
        "--http",
        "--metrics",
        &web,
        "--quick",
        "--workloads",
        "throughput-1,rr-c16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["target"]["framing"], "http");
    assert!(value(&report, "target", "throughput-1", "gbps").is_some_and(|v| v > 0.0));
    assert!(value(&report, "target", "rr-c16", "p99_us").is_some_and(|v| v > 0.0));
    // Without --direct, direct is skipped and said so.
    assert!(
        report["contenders"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no --direct")
    );
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(markdown.contains("no `--direct` was given"), "{markdown}");

    // The HTTP port in raw bytes: nothing echoes, and the bench says why before any round.
    let (code, stderr) = mesh.bench(&[
        "--target",
        &format!("127.0.0.1:{}", mesh.http_route),
        "--quick",
        "--out",
        mesh.dir.path().join("raw-on-http").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no echo came back through it")
            && stderr.contains("sidewall-bench serve")
            && stderr.contains("policy"),
        "{stderr}"
    );
    // A metrics endpoint that does not answer is refused before the run, named.
    let closed = format!("http://127.0.0.1:{}/metrics", free_port());
    let (code, stderr) = mesh.bench(&[
        "--target",
        &format!("127.0.0.1:{}", mesh.tcp_route),
        "--metrics",
        &closed,
        "--quick",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("scraping {closed}")), "{stderr}");
    // Flags that make no sense together are refused by the command line.
    let (code, stderr) = mesh.bench(&["--target", "127.0.0.1:1", "--only", "nginx"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
