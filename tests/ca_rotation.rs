//! Staged CA rotation end to end: a control plane and three sidecars as processes, traffic
//! between them the whole time, the root rotated twice with `sidewall ca rotate`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{
    ControlPlaneProcess, EchoApp, ProxyProcess, Run, eventually, exchange, free_port, metric,
};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

/// Writes a join token for `name` into `<dir>/<name>.token`.
fn token(dir: &Path, cp: &ControlPlaneProcess, name: &str) {
    let run = cp.cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    std::fs::write(
        dir.join(format!("{name}.token")),
        run.stdout.lines().last().unwrap(),
    )
    .unwrap();
}

/// A sidecar (with a new token unless one was written): `api` serves the echo app on 8080;
/// the others route to it.
fn sidecar(dir: &Path, cp: &ControlPlaneProcess, name: &str, port: u16, app: u16) -> ProxyProcess {
    if !dir.join(format!("{name}.token")).exists() {
        token(dir, cp, name);
    }
    let (ports, routes) = if name == "api" {
        (
            format!("{{port: 8080, app: 127.0.0.1:{app}}}"),
            String::new(),
        )
    } else {
        (
            String::new(),
            format!("{{listen: 127.0.0.1:{port}, service: {TD}/api, port: 8080}}"),
        )
    };
    let inbound = if name == "api" { port } else { free_port() };
    let admin = free_port();
    let config = format!(
        "identity: {TD}/{name}\ncontrolPlane:\n  urls: [https://127.0.0.1:{}]\n  tokenFile: {name}.token\nstateDir: state/{name}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  ports: [{ports}]\noutbound:\n  routes: [{routes}]\nadmin:\n  listen: 127.0.0.1:{admin}\nworkerThreads: 1\nlimits: {{drainTimeout: 1s}}\n",
        cp.api_port
    );
    let proxy = ProxyProcess::start(dir, name, &config, admin);
    proxy.wait_ready();
    proxy
}

fn restart(dir: &Path, name: &str, old: &mut ProxyProcess) -> ProxyProcess {
    old.stop();
    let config = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
    let proxy = ProxyProcess::start(dir, name, &config, old.admin_port);
    proxy.wait_ready();
    proxy
}

fn status(cp: &ControlPlaneProcess) -> serde_json::Value {
    let run = cp.cli(&["ca", "status", "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

/// Takes `step` as soon as nothing blocks it (at most `seconds`); returns how long that took
/// and the last refusal seen before.
fn step_when_unblocked(cp: &ControlPlaneProcess, step: &str, seconds: u64) -> (Duration, String) {
    let started = Instant::now();
    let mut refused = String::new();
    loop {
        let run = cp.cli(&["ca", "rotate", step]);
        if run.code == 0 {
            return (started.elapsed(), refused);
        }
        assert!(
            run.stderr.contains("rotation_blocked") || run.stderr.contains("is blocked by"),
            "{step} refused for another reason: {}",
            run.stderr
        );
        refused = run.stderr;
        assert!(
            started.elapsed() < Duration::from_secs(seconds),
            "{step} still blocked after {seconds} s: {refused}\n{}",
            cp.cli(&["ca", "status"]).stdout
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn roots_of(snapshot_file: &Path) -> Vec<String> {
    let snapshot: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snapshot_file).unwrap()).unwrap();
    snapshot["trust_bundles"]["sidewall.local"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

fn fingerprints(cp: &ControlPlaneProcess) -> Vec<String> {
    let run: Run = cp.cli(&["ca", "fingerprint"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.stdout.lines().map(str::to_owned).collect()
}

/// Continuous exchanges through one route: (sent, failed) once `stop` is set.
fn traffic(
    route: u16,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut failed = 0;
        while !stop.load(Ordering::SeqCst) {
            if exchange(route, b"rotating").as_deref() != Some(&b"rotating"[..]) {
                failed += 1;
                eprintln!("exchange failed at {:?}", std::time::SystemTime::now());
            }
            sent.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
        }
        failed
    })
}

#[test]
fn the_root_rotates_twice_under_traffic_and_an_offline_sidecar_blocks_activation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let config = path.join("cp.yaml");
    // Certificates of two minutes: renewals happen during the test, early ones within 12 s.
    std::fs::write(&config, "certificates: {workloadLifetime: 120s}\n").unwrap();
    let config_arg = config.display().to_string();
    let cp_args = ["--config", config_arg.as_str()];
    let mut cp = ControlPlaneProcess::start(&path.join("cp"), &cp_args);
    let app = EchoApp::start();
    let (api_port, web_route, batch_route) = (free_port(), free_port(), free_port());
    let api = sidecar(path, &cp, "api", api_port, app.port);
    let mut web = sidecar(path, &cp, "web", web_route, 0);
    let mut batch = sidecar(path, &cp, "batch", batch_route, 0);
    let policies = path.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("api.yaml"),
        format!(
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: api}}\nspec:\n  target: {TD}/api\n  rules:\n    - {{action: allow, from: [{TD}/web, {TD}/batch], ports: [8080]}}\n"
        ),
    )
    .unwrap();
    let applied = cp.cli(&["policy", "apply", policies.to_str().unwrap(), "--wait"]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert_eq!(exchange(batch_route, b"hi").as_deref(), Some(&b"hi"[..]));
    let first_root = fingerprints(&cp);
    assert_eq!(first_root.len(), 1);
    assert_eq!(status(&cp)["stage"], "settled");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let web_traffic = traffic(web_route, stop.clone(), sent.clone());
    let started = Instant::now();
    let mut figures = Vec::new();

    // Rotation 1. batch goes away before prepare: activate names it until it is back.
    batch.stop();
    token(path, &cp, "early"); // pins the first root
    let prepared = cp.cli(&["ca", "rotate", "prepare"]);
    assert_eq!(prepared.code, 0, "{}", prepared.stderr);
    // Mid-rotation, sidecars join with a token pinning the old root (the control plane's
    // certificate reaches it through the cross-signed root) and with one pinning the new.
    let _early = sidecar(path, &cp, "early", free_port(), 0);
    let _late = sidecar(path, &cp, "late", free_port(), 0);
    let roots = fingerprints(&cp);
    assert_eq!(roots.len(), 2, "both roots in the bundle: {roots:?}");
    assert_eq!(roots[0], first_root[0], "the old root still signs");
    let second_root = roots[1].clone();
    // A control-plane restart mid-rotation keeps the stage.
    assert_eq!(cp.stop(), Some(0));
    cp.restart(&cp_args);
    let after_restart = status(&cp);
    assert_eq!(after_restart["stage"], "prepared", "{after_restart}");
    let fleet = cp.cli(&["status"]);
    assert!(
        fleet
            .stdout
            .contains("CA rotation 1 under way (prepared): next step activate, blocked by"),
        "{}",
        fleet.stdout
    );
    let blocked_at = Instant::now();
    let refused = cp.cli(&["ca", "rotate", "activate"]);
    assert_ne!(refused.code, 0, "activate must wait for batch");
    assert!(
        refused.stderr.contains(&format!("{TD}/batch")),
        "the offline sidecar is named: {}",
        refused.stderr
    );
    let listed = status(&cp);
    assert!(
        listed["blockers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["subject"].as_str().unwrap().contains("/batch")),
        "{listed}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let _batch = restart(path, "batch", &mut batch);
    let (waited, _) = step_when_unblocked(&cp, "activate", 60);
    figures.push(format!(
        "rotation 1: activate blocked by the offline sidecar for {:.1} s, taken {:.1} s after it returned",
        blocked_at.elapsed().as_secs_f64() - waited.as_secs_f64(),
        waited.as_secs_f64()
    ));
    let activated_at = Instant::now();
    let (waited, _) = step_when_unblocked(&cp, "retire", 90);
    figures.push(format!(
        "rotation 1: retire possible {:.1} s after activate (every live certificate renewed from the new CA)",
        waited.as_secs_f64()
    ));
    let _ = activated_at;
    assert_eq!(fingerprints(&cp), vec![second_root.clone()]);
    // web's certificate from the second root, kept aside (valid for two minutes): the next
    // rotation retires that root, which every sidecar's last renewal answer still listed.
    let stale = path.join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    for file in ["certificate.pem", "key.pem"] {
        std::fs::copy(path.join("state/web").join(file), stale.join(file)).unwrap();
    }
    assert_eq!(
        exchange(batch_route, b"after").as_deref(),
        Some(&b"after"[..])
    );

    // Rotation 2, with a control-plane restart while activated.
    let prepared_at = Instant::now();
    let prepared = cp.cli(&["ca", "rotate", "prepare"]);
    assert_eq!(prepared.code, 0, "{}", prepared.stderr);
    let third_root = fingerprints(&cp)[1].clone();
    let (waited, _) = step_when_unblocked(&cp, "activate", 60);
    figures.push(format!(
        "rotation 2: activate possible {:.1} s after prepare (every sidecar acked the bundle)",
        waited.as_secs_f64()
    ));
    assert_eq!(cp.stop(), Some(0));
    cp.restart(&cp_args);
    assert_eq!(status(&cp)["stage"], "activated");
    let (waited, _) = step_when_unblocked(&cp, "retire", 90);
    figures.push(format!(
        "rotation 2: retire possible {:.1} s after activate (a control-plane restart between)",
        waited.as_secs_f64()
    ));
    let _ = prepared_at;
    assert_eq!(fingerprints(&cp), vec![third_root.clone()]);

    // Traffic keeps flowing a little longer on the new root, then the count.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let failed = web_traffic.join().unwrap();
    let sent = sent.load(Ordering::SeqCst);
    for figure in &figures {
        eprintln!("{figure}");
    }
    eprintln!(
        "{sent} exchanges web -> api over {:.1} s and two rotations, {failed} failed",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failed, 0, "no exchange may fail during a rotation");
    assert!(sent > 100, "{sent}");
    assert_eq!(exchange(batch_route, b"end").as_deref(), Some(&b"end"[..]));
    // A fresh process makes fresh handshakes: on the newest root alone, both ends.
    let _web = restart(path, "web", &mut web);
    assert_eq!(
        exchange(web_route, b"fresh").as_deref(),
        Some(&b"fresh"[..])
    );

    // Every sidecar holds a certificate from the newest CA and trusts its root alone.
    let end = status(&cp);
    assert_eq!(end["stage"], "settled");
    assert_eq!(end["rotation"], 2);
    for sidecar in end["sidecars"].as_array().unwrap() {
        if sidecar["connected"] == true {
            assert_eq!(sidecar["certificate_ca"], "signing", "{end}");
        }
    }
    for name in ["api", "web", "batch", "early", "late"] {
        let roots = roots_of(&path.join("state").join(name).join("snapshot.json"));
        assert_eq!(roots.len(), 1, "{name} trusts only the newest root");
    }
    // A certificate from a retired root is refused at the handshake, although it has not
    // expired: the snapshot's bundle no longer holds its root.
    let refused = |p: &ProxyProcess| {
        metric(
            &p.metrics(),
            "sidewall_proxy_handshake_failures_total",
            &[("direction", "inbound"), ("reason", "unknown_issuer")],
        )
    };
    let before = refused(&api);
    let _ = std::process::Command::new("timeout")
        .args(["5", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("-cert")
        .arg(stale.join("certificate.pem"))
        .arg("-key")
        .arg(stale.join("key.pem"))
        // The intermediate too (`-cert` sends the leaf alone).
        .arg("-cert_chain")
        .arg(stale.join("certificate.pem"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    eventually(10, "api to refuse the retired root's certificate", || {
        refused(&api) > before
    });

    // The audit trail records each step with both roots.
    let audit = cp.cli(&["audit", "log", "--json"]);
    assert_eq!(audit.code, 0, "{}", audit.stderr);
    for action in [
        "ca.rotation.prepared",
        "ca.rotation.activated",
        "ca.rotation.retired",
    ] {
        assert_eq!(
            audit.stdout.matches(action).count(),
            2,
            "{action} twice in the trail"
        );
    }
    assert!(audit.stdout.contains(&third_root));
    // The segmentation report lists the steps for the auditor, and its signature checks
    // against the bundle in force.
    let out = path.join("report");
    let report = cp.cli(&["report", "--since", "1d", "--out", out.to_str().unwrap()]);
    assert_eq!(report.code, 0, "{}", report.stderr);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let steps: Vec<(String, String)> = json["certificates"]["ca_rotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["rotation"].as_str().unwrap().to_owned(),
                s["step"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["1", "2"]
        .iter()
        .flat_map(|n| {
            ["prepared", "activated", "retired"].map(|step| (n.to_string(), step.to_owned()))
        })
        .collect();
    assert_eq!(steps, expected);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("CA rotations") && html.contains(&third_root));

    // Checkpoints signed under the retired roots still verify.
    let verified = cp.cli(&["audit", "verify"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
}
