//! `sidewall up --check` runs the three-tier example until every expectation in its mesh
//! description has been observed: allowed flows succeed, denied ones are refused and never
//! reach the app, the audited one is allowed and recorded. However `up` ends, nothing it
//! started is left running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use support::sidewall;

#[test]
fn the_three_tier_example_meets_its_expectations() {
    let run = sidewall([
        "up",
        "--check",
        "--timeout-seconds",
        "120",
        "examples/three-tier",
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("all 5 expectations observed"),
        "{}",
        run.stdout
    );
    let row = |flow: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(flow))
            .unwrap_or_else(|| panic!("no row for {flow}:\n{}", run.stdout))
            .to_owned()
    };
    // The denied flow carries its reason.
    assert!(
        row("frontend -> db:5432").contains("no policy lets it call this service"),
        "{}",
        run.stdout
    );
    // Requests denied per request name the default deny.
    assert!(
        row("frontend -> api:8080").contains("DELETE /v1/orders: default deny"),
        "{}",
        run.stdout
    );
    // It cleans up after itself: the work directory it names is gone.
    assert!(!run.stdout.contains("panicked"));
}

/// The pids of `parent`'s children, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the command may hold spaces, so split after the ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// Whether `pid` has ended (gone, or a zombie waiting for its new parent to reap it).
fn ended(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("Z")
    })
}

/// Review (issue 17): `sidewall up` stopped by SIGTERM (`kill`, `timeout`, systemd, a CI runner)
/// left its control plane, four sidecars and four demo apps running; Ctrl-C alone cleaned up.
/// Now every way it ends (SIGTERM, SIGHUP, SIGINT, and SIGKILL, which it cannot catch) ends its
/// children too, and a signal it can catch also removes its work directory.
#[test]
fn every_way_up_ends_its_children_end_too() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    for signal in ["TERM", "HUP", "INT", "KILL"] {
        let mut up = Command::new(env!("CARGO_BIN_EXE_sidewall"))
            .args(["up", "examples/three-tier"])
            .current_dir(support::repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The live view names its work directory once everything has started; keep reading so
        // that the pipe never fills.
        let (tell, told) = std::sync::mpsc::channel();
        let stdout = up.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(dir) = line.strip_prefix("files and logs: ") {
                    let _ = tell.send(dir.to_owned());
                }
            }
        });
        let dir = told
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the live view to show");
        let children = children_of(up.id());
        assert_eq!(children.len(), 9, "control plane, 4 sidecars, 4 apps");
        let mode = std::fs::metadata(&dir).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700,
            "{dir}"
        );
        let token = std::path::Path::new(&dir).join("api.token");
        let mode = std::fs::metadata(&token).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let status = Command::new("kill")
            .args([&format!("-{signal}"), &up.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = up.wait();
        support::eventually(15, &format!("every child to end after SIG{signal}"), || {
            children.iter().all(|&pid| ended(pid))
        });
        if signal == "KILL" {
            // Nothing could remove it; no process of `up` is left to use it either.
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            assert!(
                !std::path::Path::new(&dir).exists(),
                "{dir} left after SIG{signal}"
            );
        }
    }
}
