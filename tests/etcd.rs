//! Several control-plane replicas over a real 3-member etcd cluster, as processes: the
//! `sidewall` binary for the replicas and the sidecars, `etcd` for the store, traffic through
//! the sidecars. Skipped (loudly) without the `etcd` binary unless `SIDEWALL_REQUIRE_ETCD` is
//! set (CI sets it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sidewall_control_plane::testing::etcd::EtcdCluster;
use sidewall_control_plane::testing::kek_file;
use support::{
    ControlPlaneProcess, EchoApp, ProxyProcess, Run, eventually, exchange, free_port, http_get,
};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

/// Three replicas over three etcd members, an echo app behind the `api` sidecar.
struct Replicated {
    dir: tempfile::TempDir,
    cluster: EtcdCluster,
    kek: PathBuf,
    replicas: Vec<ControlPlaneProcess>,
    app: EchoApp,
    api_inbound: u16,
    web_route: u16,
    /// A configuration file every replica is started with, if any.
    config: Option<PathBuf>,
}

impl Replicated {
    fn start(test: &str) -> Option<Self> {
        Self::configured(test, None)
    }

    /// Three replicas started with the configuration file `config` (YAML), if given.
    fn configured(test: &str, config: Option<&str>) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let config = config.map(|yaml| {
            let file = dir.path().join("replicas.yaml");
            std::fs::write(&file, yaml).unwrap();
            file
        });
        let cluster = EtcdCluster::start(&dir.path().join("etcd"), 3, test)?;
        let kek = kek_file(&dir.path().join("secrets"));
        let mut mesh = Self {
            dir,
            cluster,
            kek,
            replicas: Vec::new(),
            app: EchoApp::start(),
            api_inbound: free_port(),
            web_route: free_port(),
            config,
        };
        for i in 0..3 {
            let args = mesh.replica_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let replica = ControlPlaneProcess::start(&mesh.path().join(format!("cp{i}")), &args);
            mesh.replicas.push(replica);
        }
        Some(mesh)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn replica_args(&self) -> Vec<String> {
        let mut args = vec![
            "--store".into(),
            self.cluster.store_url(),
            "--ca-kek-file".into(),
            self.kek.display().to_string(),
        ];
        if let Some(config) = &self.config {
            args.extend(["--config".into(), config.display().to_string()]);
        }
        args
    }

    fn url(&self, replica: usize) -> String {
        format!("https://127.0.0.1:{}", self.replicas[replica].api_port)
    }

    /// Applies `api.yaml` allowing `from` (comma-separated names) to reach api:8080, through
    /// replica `replica`.
    fn apply(&self, replica: usize, name: &str, from: &str) -> Run {
        self.apply_with(replica, name, from, &[])
    }

    fn apply_with(&self, replica: usize, name: &str, from: &str, extra: &[&str]) -> Run {
        let from: Vec<String> = from.split(',').map(|f| format!("{TD}/{f}")).collect();
        let from = from.join(", ");
        let dir = self.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("api.yaml"),
            format!(
                "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: api}}\nspec:\n  target: {TD}/api\n  onRevoke: terminate\n  rules:\n    - {{action: allow, from: [{from}], ports: [8080]}}\n"
            ),
        )
        .unwrap();
        let mut args = vec!["policy", "apply", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.replicas[replica].cli(&args)
    }

    /// Starts sidecar `name` (`api` serves the echo app, `web` routes to api:8080) with the
    /// replicas' URLs in the order `order`, enrolled with a token from replica 0.
    fn sidecar(&self, name: &str, order: &[usize]) -> ProxyProcess {
        let run = self.replicas[0].cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        std::fs::write(
            self.path().join(format!("{name}.token")),
            run.stdout.lines().last().unwrap(),
        )
        .unwrap();
        let (inbound, ports, routes) = if name == "api" {
            (
                self.api_inbound,
                format!("{{port: 8080, app: 127.0.0.1:{}}}", self.app.port),
                String::new(),
            )
        } else {
            (
                free_port(),
                String::new(),
                format!(
                    "{{listen: 127.0.0.1:{}, service: {TD}/api, port: 8080}}",
                    self.web_route
                ),
            )
        };
        let urls: Vec<String> = order.iter().map(|&i| self.url(i)).collect();
        let admin = free_port();
        let config = format!(
            "identity: {TD}/{name}\ncontrolPlane:\n  urls: [{}]\n  tokenFile: {name}.token\nstateDir: state/{name}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  ports: [{ports}]\noutbound:\n  routes: [{routes}]\nadmin:\n  listen: 127.0.0.1:{admin}\nworkerThreads: 1\nlimits: {{drainTimeout: 1s}}\n",
            urls.join(", ")
        );
        let proxy = ProxyProcess::start(self.path(), name, &config, admin);
        proxy.wait_ready();
        proxy
    }

    fn allowed(&self) -> bool {
        exchange(self.web_route, b"hello").as_deref() == Some(&b"hello"[..])
    }
}

/// A sidecar's admin `/config`.
fn http_config(proxy: &ProxyProcess) -> serde_json::Value {
    let (status, body) = http_get(proxy.admin_port, "/config");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The replica a sidecar's snapshot stream is open to (its admin `/config`), if any.
fn connected_to(proxy: &ProxyProcess) -> Option<String> {
    http_config(proxy)["control_plane"]
        .as_str()
        .map(str::to_owned)
}

/// Exchanges through the `web` route in a loop until stopped; counts successes and failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match exchange(port, b"steady") {
                    Some(answer) if answer == b"steady" => o.fetch_add(1, Ordering::SeqCst),
                    _ => f.fetch_add(1, Ordering::SeqCst),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops and returns (successes, failures).
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn bad_store_settings_fail_before_any_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let data = data.to_str().unwrap();
    let cases: [(&[&str], i32, &str); 3] = [
        (
            &["--store", "etcd://127.0.0.1"],
            2,
            "\"127.0.0.1\" is not HOST:PORT",
        ),
        (
            &["--store", "etcd://127.0.0.1:2379"],
            2,
            "the etcd store needs caKekFile (--ca-kek-file)",
        ),
        (
            &["--store", "zookeeper://x:1"],
            2,
            "expected `embedded` or `etcd://HOST:PORT[,HOST:PORT...]`",
        ),
    ];
    for (args, code, message) in cases {
        let mut all = vec!["control-plane", "--data-dir", data];
        all.extend_from_slice(args);
        let run = support::sidewall(&all);
        assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
    }
    // Nothing answers there: exit 1 with the address, before binding.
    let kek = kek_file(&dir.path().join("secrets"));
    let nowhere = format!("etcd://127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let run = support::sidewall([
        "control-plane",
        "--data-dir",
        data,
        "--listen",
        &listen,
        "--store",
        &nowhere,
        "--ca-kek-file",
        kek.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot reach etcd at 127.0.0.1:"),
        "{}",
        run.stderr
    );
    assert!(
        std::net::TcpListener::bind(&listen).is_ok(),
        "the API port was never bound"
    );
}

#[test]
fn a_policy_applied_at_one_replica_is_enforced_by_sidecars_of_another_which_move_when_it_stops() {
    let Some(mut mesh) = Replicated::start("etcd::replicas") else {
        return;
    };
    // Both sidecars start on replica 2.
    let api = mesh.sidecar("api", &[2, 0, 1]);
    let web = mesh.sidecar("web", &[2, 1, 0]);
    assert_eq!(connected_to(&api), Some(mesh.url(2)));
    assert_eq!(connected_to(&web), Some(mesh.url(2)));
    assert!(!mesh.allowed(), "default deny before any policy");

    // Applied through replica 0; enforced by sidecars connected to replica 2.
    let run = mesh.apply(0, "v1", "web");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let applied = Instant::now();
    eventually(30, "replica 2's sidecars to enforce version 1", || {
        mesh.allowed()
    });
    eprintln!(
        "apply at replica 0 -> enforced via replica 2: {:?}",
        applied.elapsed()
    );

    // Replica 0 sees replica 2's sidecars through the summary replica 2 publishes, and
    // `apply --wait` at replica 0 waits for them: a frozen sidecar on replica 2 holds it.
    eventually(10, "replica 0 to list replica 2's sidecars", || {
        let run = mesh.replicas[0].cli(&["status", "--json"]);
        let fleet: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        fleet["other_replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["replica"] == mesh.url(2).as_str() && r["connected"] == 2)
    });
    let signal = |name: &str, proxy: &ProxyProcess| {
        let status = std::process::Command::new("kill")
            .args([name, &proxy.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP", &api);
    let run = mesh.apply_with(0, "v1-frozen", "web,batch", &["--wait", "--timeout", "3s"]);
    signal("-CONT", &api);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "{TD}/api (instance {}, on {}): not applied yet",
            http_config(&api)["instance"].as_str().unwrap(),
            mesh.url(2)
        )),
        "{}",
        run.stderr
    );
    let run = mesh.apply_with(0, "v1-thawed", "web", &["--wait", "--timeout", "20s"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("every affected sidecar applied version"),
        "{}",
        run.stdout
    );

    // Replica 2 stops: both sidecars move to another replica, traffic never fails.
    let traffic = Traffic::start(mesh.web_route);
    eventually(10, "traffic to flow", || {
        traffic.ok.load(Ordering::SeqCst) > 5
    });
    let stopped_url = mesh.url(2);
    mesh.replicas[2].stop();
    for proxy in [&api, &web] {
        eventually(30, "the sidecar to move to another replica", || {
            connected_to(proxy).is_some_and(|url| url != stopped_url)
        });
    }
    let moved = (connected_to(&api).unwrap(), connected_to(&web).unwrap());
    eprintln!("sidecars moved to {} and {}", moved.0, moved.1);
    let before = traffic.ok.load(Ordering::SeqCst);
    eventually(10, "more traffic after the move", || {
        traffic.ok.load(Ordering::SeqCst) > before + 5
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(failed, 0, "no exchange failed ({ok} succeeded)");

    // The sidecars keep following policy from their new replicas.
    let run = mesh.apply(1, "v2", "nobody");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    eventually(
        30,
        "version 2 (web no longer allowed) to be enforced",
        || !mesh.allowed(),
    );
}

#[test]
fn losing_one_etcd_member_changes_nothing_losing_two_refuses_writes_until_they_return() {
    let Some(mut mesh) = Replicated::start("etcd::quorum") else {
        return;
    };
    let api = mesh.sidecar("api", &[0, 1, 2]);
    let mut web = mesh.sidecar("web", &[1, 2, 0]);
    let run = mesh.apply(0, "v1", "web");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    eventually(30, "version 1 to be enforced", || mesh.allowed());

    // One member down: writes and tokens still work at every replica.
    mesh.cluster.stop_member(0);
    for replica in 0..3 {
        let run = mesh.apply(replica, &format!("one-down-{replica}"), "web");
        assert_eq!(
            run.code, 0,
            "replica {replica}: {}{}",
            run.stdout, run.stderr
        );
        let run =
            mesh.replicas[replica].cli(&["token", "create", "--identity", &format!("{TD}/later")]);
        assert_eq!(run.code, 0, "replica {replica}: {}", run.stderr);
    }
    assert!(mesh.allowed());
    // A sidecar enrolls from scratch (token, certificate, registration, watch) meanwhile.
    web.stop();
    std::fs::remove_dir_all(mesh.path().join("state/web")).unwrap();
    let web = mesh.sidecar("web", &[1, 2, 0]);
    eventually(30, "the re-enrolled sidecar to be allowed", || {
        mesh.allowed()
    });

    // Two down: no quorum. Writes are refused with a clear message; traffic is unaffected.
    let traffic = Traffic::start(mesh.web_route);
    mesh.cluster.stop_member(1);
    let run = mesh.apply(1, "no-quorum", "nobody");
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stderr.contains("lost quorum"),
        "a clear refusal: {}",
        run.stderr
    );
    let run = mesh.replicas[2].cli(&["token", "create", "--identity", &format!("{TD}/later")]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(run.stderr.contains("lost quorum"), "{}", run.stderr);
    let before = traffic.ok.load(Ordering::SeqCst);
    eventually(10, "traffic while etcd has no quorum", || {
        traffic.ok.load(Ordering::SeqCst) > before + 5
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(
        failed, 0,
        "no exchange failed without quorum ({ok} succeeded)"
    );
    // The replicas keep serving the sidecars' watches from memory.
    assert_eq!(connected_to(&api), Some(mesh.url(0)));
    assert_eq!(connected_to(&web), Some(mesh.url(1)));

    // The members come back: writes work again and reach the sidecars.
    mesh.cluster.start_member(0);
    mesh.cluster.start_member(1);
    mesh.cluster.wait_healthy(&[0, 1, 2]);
    let recovered = Instant::now();
    eventually(60, "a write to succeed after recovery", || {
        mesh.apply(1, "recovered", "nobody").code == 0
    });
    eprintln!(
        "writes accepted {:?} after quorum returned",
        recovered.elapsed()
    );
    eventually(30, "the post-recovery version to be enforced", || {
        !mesh.allowed()
    });
}

/// The snapshot version a sidecar enforces (`epoch/counter`, from its admin `/config`).
fn snapshot_version(proxy: &ProxyProcess) -> String {
    let (_, body) = http_get(proxy.admin_port, "/config");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    config["snapshot_version"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn an_embedded_deployment_moves_to_etcd_with_export_and_import_and_the_fleet_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = EtcdCluster::start(&dir.path().join("etcd"), 3, "etcd::migration") else {
        return;
    };
    let kek = kek_file(&dir.path().join("secrets"));
    let kek_arg = kek.display().to_string();
    // An embedded control plane with a fleet and a policy.
    let mut mesh = Replicated {
        dir,
        cluster,
        kek,
        replicas: Vec::new(),
        app: EchoApp::start(),
        api_inbound: free_port(),
        web_route: free_port(),
        config: None,
    };
    let cp_dir = mesh.path().join("cp0");
    mesh.replicas.push(ControlPlaneProcess::start(&cp_dir, &[]));
    let api = mesh.sidecar("api", &[0]);
    let web = mesh.sidecar("web", &[0]);
    let run = mesh.apply(0, "v1", "web");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    eventually(30, "version 1 to be enforced", || mesh.allowed());
    let embedded_version = snapshot_version(&api);

    // Stop, export, import into etcd, start on the same address with the etcd store.
    let traffic = Traffic::start(mesh.web_route);
    mesh.replicas[0].stop();
    let backup = mesh.path().join("backup.json");
    let data_dir = cp_dir.display().to_string();
    let out = support::sidewall([
        "control-plane",
        "export",
        "--out",
        backup.to_str().unwrap(),
        "--data-dir",
        &data_dir,
        "--ca-kek-file",
        &kek_arg,
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("exported 1 policy versions, 2 tokens"),
        "{}",
        out.stdout
    );
    let store = mesh.cluster.store_url();
    let run = support::sidewall([
        "control-plane",
        "import",
        "--in",
        backup.to_str().unwrap(),
        "--store",
        &store,
        "--ca-kek-file",
        &kek_arg,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.starts_with("imported 1 policy versions"),
        "{}",
        run.stdout
    );
    let args = mesh.replica_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    mesh.replicas[0].restart(&args);

    // The sidecars reconnect, take the etcd store's snapshot (another epoch) and traffic
    // never stopped.
    for proxy in [&api, &web] {
        eventually(
            30,
            "the sidecar to follow the etcd-backed control plane",
            || {
                let version = snapshot_version(proxy);
                !version.is_empty()
                    && version.split('/').next() != embedded_version.split('/').next()
            },
        );
    }
    let before = traffic.ok.load(Ordering::SeqCst);
    eventually(10, "traffic after the move", || {
        traffic.ok.load(Ordering::SeqCst) > before + 5
    });
    let (ok, failed) = traffic.finish();
    assert_eq!(
        failed, 0,
        "no exchange failed during the move ({ok} succeeded)"
    );

    // History carried over; the next version is 2 and is enforced.
    let run = mesh.replicas[0].cli(&["policy", "history"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // So is the audit trail, signatures included: it verifies on etcd, the embedded
    // deployment's records first.
    let run = mesh.replicas[0].cli(&["audit", "verify"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let actions = audit_actions(&mesh.replicas[0]);
    let starts: Vec<usize> = (0..actions.len())
        .filter(|i| actions[*i] == "control-plane.started")
        .collect();
    let applied = actions.iter().position(|a| a == "policy.applied");
    assert!(
        starts.len() == 2 && applied.is_some_and(|v| starts[0] < v && v < starts[1]),
        "the embedded deployment's start and version 1, then the start on etcd: {actions:?}"
    );
    let run = mesh.apply(0, "v2", "nobody");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with("applied version 2"),
        "{}",
        run.stdout
    );
    eventually(30, "version 2 to be enforced", || !mesh.allowed());
}

/// The audit trail on etcd (issue 20): replicas append to one chain, and a record altered,
/// removed or swapped in etcd is named by `audit verify`, through any replica.
#[test]
fn replicas_append_to_one_audit_chain_and_verify_names_tampering_in_etcd() {
    use sidewall_control_plane::store::etcd::{EtcdOptions, EtcdStore};
    let Some(mut mesh) = Replicated::start("etcd::audit") else {
        return;
    };
    for (replica, name) in [(0, "v1"), (1, "v2"), (2, "v3")] {
        let run = mesh.apply(replica, name, "web");
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    }
    let run = mesh.replicas[1].cli(&["audit", "verify"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    // Three replicas, each issuing its admin credential and starting, and three versions: one
    // chain.
    assert!(
        run.stdout
            .starts_with("audit trail intact: records 1 to 9, head "),
        "{}",
        run.stdout
    );
    let actions = audit_actions(&mesh.replicas[2]);
    assert_eq!(
        actions.iter().filter(|a| *a == "policy.applied").count(),
        3,
        "{actions:?}"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime
        .block_on(EtcdStore::connect(&EtcdOptions {
            endpoints: mesh.cluster.endpoints(),
            prefix: "/sidewall".into(),
            ..EtcdOptions::default()
        }))
        .unwrap();
    let intact = runtime.block_on(store.audit_raw()).unwrap();
    assert_eq!(intact.len(), 9);
    let restore = |store: &EtcdStore| {
        for (seq, bytes) in &intact {
            runtime
                .block_on(store.audit_set_raw(*seq, Some(bytes)))
                .unwrap();
        }
    };
    let altered = String::from_utf8(intact[6].1.clone())
        .unwrap()
        .replace("policy.applied", "policy.rolled_back");
    type Tamper<'a> = Vec<(u64, Option<&'a [u8]>)>;
    let cases: [(&str, Tamper<'_>); 3] = [
        (
            "record 7 was altered: its fields do not match its hash",
            vec![(7, Some(altered.as_bytes()))],
        ),
        (
            "record 3 was removed: the trail goes from 2 to 4",
            vec![(3, None)],
        ),
        (
            "record 2 is out of order: record 6 is in its place",
            vec![(2, Some(&intact[5].1)), (6, Some(&intact[1].1))],
        ),
    ];
    for (named, edits) in cases {
        for (seq, value) in edits {
            runtime.block_on(store.audit_set_raw(seq, value)).unwrap();
        }
        let run = mesh.replicas[0].cli(&["audit", "verify"]);
        assert_eq!(run.code, 1, "{named}: {}{}", run.stdout, run.stderr);
        assert_eq!(run.stderr.trim(), format!("audit trail broken: {named}"));
        restore(&store);
    }
    let run = mesh.replicas[0].cli(&["audit", "verify"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // Flows reported to one replica are counted in a report another makes, once the first has
    // written its roll-up to etcd (each minute, and when it stops).
    let db = runtime.block_on(sidewall_control_plane::testing::enroll(
        &mesh.replicas[2].data_dir,
        &mesh.url(2),
        &sidewall_policies::TrustDomain::new("sidewall.local").unwrap(),
        &format!("{TD}/db"),
    ));
    runtime.block_on(db.report_flows(serde_json::json!([
        {"peer": format!("{TD}/web"), "port": 5432, "count": 4, "deny": 4, "last_denial": "default deny"},
    ])));
    assert_eq!(mesh.replicas[2].stop(), Some(0));

    // A segmentation report from another replica reads the same history, trail and flows from
    // etcd, and its signing is one more record of the one chain.
    let out = mesh.path().join("report");
    let run = mesh.replicas[1].cli(&["report", "--since", "1h", "--out", out.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let versions: Vec<String> = report["changes"]["policy_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{} {}", v["version"], v["in_force"]))
        .collect();
    assert_eq!(versions, ["1 false", "2 false", "3 true"], "{report}");
    assert_eq!(report["segmentation"]["denied_attempts"], 4, "{report}");
    assert_eq!(
        report["observed"]["denied"],
        serde_json::json!([{"source": format!("{TD}/web"), "target": format!("{TD}/db"), "attempts": 4}])
    );
    let trail = &report["changes"]["audit_trail"];
    assert_eq!(trail["verified"], true, "{trail}");
    let log = mesh.replicas[0].cli(&["audit", "log", "--json"]);
    let records: Vec<serde_json::Value> = log
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The report's own record follows the head it states.
    let signed = records
        .iter()
        .rposition(|r| r["action"] == "report.signed")
        .expect("a report.signed record");
    assert_eq!(trail["records"], signed, "{trail}");
    assert_eq!(trail["head_hash"], records[signed - 1]["hash"], "{trail}");
    let run = mesh.replicas[1].cli(&["audit", "verify"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // The roll-up the stopped replica wrote is one chunk of today, removed by a retention cut
    // after today; a backup does not carry it.
    use sidewall_control_plane::store::Store;
    let today =
        sidewall_control_plane::distribution::rollups::day_of(sidewall_control_plane::now_unix());
    let chunks = runtime.block_on(store.rollups(today, today)).unwrap();
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0].replica, mesh.url(2));
    assert_eq!(chunks[0].flows[0].stats.deny, 4);
    let records = runtime.block_on(store.records()).unwrap();
    assert!(!records.audit.is_empty() && !records.certificates.is_empty());
    assert_eq!(runtime.block_on(store.prune_rollups(today)).unwrap(), 0);
    assert_eq!(runtime.block_on(store.prune_rollups(today + 1)).unwrap(), 1);
    assert!(
        runtime
            .block_on(store.rollups(0, today))
            .unwrap()
            .is_empty()
    );
}

/// Retention on etcd: the cut removes the oldest keys and the trail verifies from the first
/// record kept.
#[test]
fn a_retention_cut_on_etcd_keeps_the_trail_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = EtcdCluster::start(&dir.path().join("etcd"), 1, "etcd::retention") else {
        return;
    };
    let kek = kek_file(&dir.path().join("secrets"));
    let config = dir.path().join("cp.yaml");
    std::fs::write(
        &config,
        "audit: {checkpointInterval: 1s, retention: {maxRecords: 10}}\n",
    )
    .unwrap();
    let store = cluster.store_url();
    let args = [
        "--store",
        store.as_str(),
        "--ca-kek-file",
        kek.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &args);
    for _ in 0..12 {
        let run = cp.cli(&["token", "create", "--identity", &format!("{TD}/api")]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    eventually(30, "the trail to be cut", || {
        cp.cli(&["audit", "log", "--json"])
            .stdout
            .contains("\"action\":\"audit.pruned\"")
    });
    let run = cp.cli(&["audit", "verify"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.starts_with("audit trail intact: records 1 to "),
        "{}",
        run.stdout
    );
    let log = cp.cli(&["audit", "log", "--json"]);
    assert!(log.stdout.lines().count() <= 10, "{}", log.stdout);
}

/// The action of each audit record, oldest first, as `sidewall audit log --json` prints them.
fn audit_actions(cp: &ControlPlaneProcess) -> Vec<String> {
    let run = cp.cli(&["audit", "log", "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.stdout
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            record["action"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Segmentation testing with the etcd store: a run held by the replica the sidecars watch,
/// from the registrations and policy in etcd; its record is in the one shared trail.
#[test]
fn verify_segmentation_runs_on_etcd() {
    let Some(mesh) = Replicated::start("etcd::verify") else {
        return;
    };
    // The source sidecar is connected to another replica than the one running the test:
    // its probes are ordered and its answers taken there, through the store.
    let api = mesh.sidecar("api", &[1, 0, 2]);
    let web = mesh.sidecar("web", &[2, 0, 1]);
    assert_eq!(connected_to(&api), Some(mesh.url(1)));
    assert_eq!(connected_to(&web), Some(mesh.url(2)));
    // Only batch may reach api: web → api:8080 must be denied.
    let run = mesh.apply(0, "v1", "batch");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    // Replica 1 learns from replica 2's summary that web's sidecar probes.
    std::thread::sleep(Duration::from_secs(1));
    let run = mesh.replicas[1].cli(&["verify", "segmentation", "--timeout", "30s"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let pairs: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("spiffe://"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        pairs,
        [[
            &format!("{TD}/web")[..],
            &format!("{TD}/api")[..],
            "8080",
            "refused"
        ]],
        "{}",
        run.stdout
    );
    // Allowed at another replica: once replica 1 has it, nothing is left to test.
    let run = mesh.apply(2, "v2", "web");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    eventually(30, "replica 1 to put version 2 in force", || {
        let run = mesh.replicas[1].cli(&["verify", "segmentation", "--timeout", "30s"]);
        run.code == 0 && run.stdout.contains("nothing to test")
    });
    let actions = audit_actions(&mesh.replicas[2]);
    assert!(
        actions
            .iter()
            .filter(|a| *a == "segmentation.verified")
            .count()
            >= 2,
        "{actions:?}"
    );
}

/// `ca rotate` on etcd: a step taken at one replica is in force at every replica and reaches
/// sidecars connected to the others; `activate` at replica 0 waits for the sidecars of replicas
/// 1 and 2 (through their summaries); a backup is refused mid-rotation; traffic never fails.
#[test]
fn the_ca_rotates_across_replicas_under_traffic() {
    // Certificates of two minutes: sidecars renew early within 12 s of activate.
    let lifetime = "certificates: {workloadLifetime: 120s}\n";
    let Some(mesh) = Replicated::configured("etcd::ca_rotation", Some(lifetime)) else {
        return;
    };
    let api = mesh.sidecar("api", &[2, 0, 1]);
    let _web = mesh.sidecar("web", &[1, 0, 2]);
    let run = mesh.apply(0, "v1", "web");
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    eventually(30, "version 1 to be enforced", || mesh.allowed());
    let status = |replica: usize| -> serde_json::Value {
        let run = mesh.replicas[replica].cli(&["ca", "status", "--json"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        serde_json::from_str(&run.stdout).unwrap()
    };
    let step_when_unblocked = |replica: usize, step: &str| {
        let started = Instant::now();
        loop {
            let run = mesh.replicas[replica].cli(&["ca", "rotate", step]);
            if run.code == 0 {
                return started.elapsed();
            }
            assert!(
                run.stderr.contains("is blocked by") || run.stderr.contains("ca_conflict"),
                "{step}: {}",
                run.stderr
            );
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{step} still refused: {}",
                run.stderr
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };

    // A sidecar of replica 2 that has not applied the new bundle holds activate at replica 0:
    // `api` is frozen from before prepare until after the refusal.
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &api.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP");
    let run = mesh.replicas[0].cli(&["ca", "rotate", "prepare"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for replica in [1, 2] {
        eventually(10, "every replica to follow the prepared CA", || {
            status(replica)["stage"] == "prepared"
        });
    }
    let new_root = status(0)["roots"][1]["sha256"].as_str().unwrap().to_owned();
    // Replica 0 lists the positions of the sidecars connected to the others.
    eventually(
        10,
        "replica 0 to list api (on replica 2) and web (on replica 1)",
        || {
            let sidecars = status(0)["sidecars"].clone();
            [("api", 2), ("web", 1)].iter().all(|(name, replica)| {
                sidecars.as_array().into_iter().flatten().any(|s| {
                    s["identity"] == format!("{TD}/{name}").as_str()
                        && s["replica"] == mesh.url(*replica).as_str()
                })
            })
        },
    );
    let held = mesh.replicas[0].cli(&["ca", "rotate", "activate"]);
    signal("-CONT");
    assert_ne!(held.code, 0, "activate must wait for api");
    assert!(
        held.stderr.contains(&format!("{TD}/api")),
        "the frozen sidecar on another replica is named: {}",
        held.stderr
    );
    let traffic = Traffic::start(mesh.web_route);
    let export = |file: &str| {
        support::sidewall([
            "control-plane",
            "export",
            "--out",
            mesh.path().join(file).to_str().unwrap(),
            "--store",
            &mesh.cluster.store_url(),
            "--ca-kek-file",
            mesh.kek.to_str().unwrap(),
        ])
    };
    let export_mid = export("mid.json");
    assert_ne!(export_mid.code, 0, "no backup mid-rotation");
    assert!(
        export_mid.stderr.contains("rotation is under way"),
        "{}",
        export_mid.stderr
    );
    let activate = step_when_unblocked(0, "activate");
    eventually(10, "replica 2 to sign with the new CA", || {
        status(2)["roots"][0]["sha256"] == new_root.as_str()
    });
    let retire = step_when_unblocked(1, "retire");
    for replica in 0..3 {
        eventually(10, "every replica to settle on the new root", || {
            let s = status(replica);
            s["stage"] == "settled" && s["roots"].as_array().map(Vec::len) == Some(1)
        });
    }
    let (ok, failed) = traffic.finish();
    eprintln!(
        "etcd rotation: activate possible {activate:?} after the frozen sidecar resumed, retire {retire:?} after activate; {ok} exchanges, {failed} failed"
    );
    assert_eq!(failed, 0, "no exchange failed ({ok} succeeded)");
    assert!(mesh.allowed());
    let export_after = export("after.json");
    assert_eq!(export_after.code, 0, "{}", export_after.stderr);
    let backup = std::fs::read_to_string(mesh.path().join("after.json")).unwrap();
    let ca: serde_json::Value = serde_json::from_str(&backup).unwrap();
    let root_file = mesh.path().join("backup-root.pem");
    std::fs::write(&root_file, ca["ca"]["root_pem"].as_str().unwrap()).unwrap();
    let fingerprint =
        support::sidewall(["ca", "fingerprint", "--bundle", root_file.to_str().unwrap()]);
    assert_eq!(
        fingerprint.stdout.trim(),
        new_root,
        "the backup carries the CA that signs"
    );
}
