//! examples/compose brought up for real with Docker Compose, with the commands its README gives,
//! on the image `scripts/image` builds from this test's own binary. It checks what a user would
//! see: allowed calls succeed, denied ones never reach the app, a container with no sidecar on
//! the Compose network reaches no app port, a capture on that network finds no plaintext,
//! restarting the control plane costs no request, and `down -v` leaves nothing behind. Needs
//! Docker and docker-compose (and tshark: `scripts/test-deps`); without them it says SKIPPED (or
//! fails, with `SIDEWALL_REQUIRE_DOCKER` set, as in CI).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{output_text as text, repo_root};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

/// Copies `from` into `to`, recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// One Compose project, in a copy of the example; brought down and its image removed when
/// dropped.
struct Project {
    name: String,
    image: String,
    dir: PathBuf,
    _copy: tempfile::TempDir,
}

impl Project {
    /// `docker-compose ARGS` in the example's directory, as the README runs it.
    fn compose(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .args(["-p", &self.name])
            .args(args)
            .env("SIDEWALL_IMAGE", &self.image)
            .current_dir(&self.dir)
            .output()
            .unwrap()
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        let run = self.compose(args);
        assert!(
            run.status.success(),
            "docker-compose {args:?}: {}",
            text(&run)
        );
        text(&run)
    }

    /// What `service`'s demo app wrote in /tmp/stats.json.
    fn stats(&self, service: &str) -> Value {
        let id = self.compose_ok(&["ps", "-q", service]);
        let file = self.dir.join(format!("{service}.stats.json"));
        let copied = Command::new("docker")
            .args(["cp", &format!("{}:/tmp/stats.json", id.trim())])
            .arg(&file)
            .output()
            .unwrap();
        if !copied.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap_or(Value::Null)
    }

    /// Things with this project's label: containers, volumes and networks.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.name);
        let mut found = Vec::new();
        for kind in [
            &["ps", "-a", "-q", "--filter"][..],
            &["volume", "ls", "-q", "--filter"],
            &["network", "ls", "-q", "--filter"],
        ] {
            let listed = Command::new("docker")
                .args(kind)
                .arg(&label)
                .output()
                .unwrap();
            found.extend(
                String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .map(|l| format!("{}: {l}", kind[0])),
            );
        }
        found
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--timeout", "2"]);
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

fn count(stats: &Value, call: &str, outcome: &str) -> u64 {
    stats["calls"][call][outcome].as_u64().unwrap_or(0)
}

/// `docker run` of the image on the project's network, no sidecar: `sidewall probe URL`'s exit.
fn probe_from_outside(project: &Project, url: &str) -> Option<i32> {
    Command::new("docker")
        .args(["run", "--rm", "--network"])
        .arg(format!("{}_mesh", project.name))
        .arg(&project.image)
        .args(["probe", url])
        .output()
        .unwrap()
        .status
        .code()
}

#[test]
fn the_compose_example_comes_up_segmented_encrypted_and_leaves_nothing_behind() {
    if !support::docker_available("compose", true) {
        return;
    }
    let name = format!("sidewall-compose-{}", std::process::id());
    let image = format!("{name}:test");
    let copy = tempfile::tempdir().unwrap();
    copy_tree(
        &repo_root().join("examples/compose"),
        &copy.path().join("compose"),
    );
    copy_tree(
        &repo_root().join("examples/three-tier/policies"),
        &copy.path().join("three-tier/policies"),
    );
    let project = Project {
        name,
        image,
        dir: copy.path().join("compose"),
        _copy: copy,
    };
    support::build_image(&project.image);

    // The README's steps: the control plane, one token per service, then everything.
    for service in ["frontend", "api", "db"] {
        std::fs::write(project.dir.join(format!("tokens/{service}.token")), "").unwrap();
    }
    project.compose_ok(&["up", "-d", "control-plane"]);
    for service in ["frontend", "api", "db"] {
        let identity = format!("{TD}/{service}");
        let create = [
            "exec",
            "-T",
            "control-plane",
            "sidewall",
            "token",
            "create",
            "--data-dir",
            "/var/lib/sidewall",
            "--identity",
            &identity,
            "--ttl",
            "1h",
        ];
        let started = Instant::now();
        let token = loop {
            let run = project.compose(&create);
            if run.status.success() || started.elapsed() > Duration::from_secs(30) {
                break run;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert!(token.status.success(), "token create: {}", text(&token));
        let line = String::from_utf8_lossy(&token.stdout)
            .lines()
            .last()
            .unwrap()
            .to_owned();
        std::fs::write(
            project.dir.join(format!("tokens/{service}.token")),
            format!("{line}\n"),
        )
        .unwrap();
    }
    let up = Instant::now();
    project.compose_ok(&["up", "-d"]);
    let first_allowed = loop {
        if count(&project.stats("frontend"), "api", "ok") > 0 {
            break up.elapsed();
        }
        assert!(
            up.elapsed() < Duration::from_secs(90),
            "no allowed request within 90 s: {}\n{}",
            project.stats("frontend"),
            text(&project.compose(&["logs", "--tail", "20"]))
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "compose: first allowed request {:.1} s after `up -d`",
        first_allowed.as_secs_f64()
    );

    // Long enough for a few denied DELETEs (one every 3 s).
    std::thread::sleep(Duration::from_secs(15));
    let frontend = project.stats("frontend");
    let api = project.stats("api");
    let db = project.stats("db");
    assert!(count(&frontend, "api", "ok") >= 5, "{frontend}");
    let deletes = count(&frontend, "api-delete", "denied");
    assert!(deletes >= 4, "DELETE must be refused by policy: {frontend}");
    assert_eq!(count(&frontend, "api-delete", "ok"), 0, "{frontend}");
    assert_eq!(
        count(&frontend, "db", "ok"),
        0,
        "frontend -> db: {frontend}"
    );
    assert!(count(&frontend, "db", "refused") > 0, "{frontend}");
    assert!(count(&api, "db", "ok") >= 5, "api -> db: {api}");
    // Denied requests never reached the api: it received (about) the allowed GETs only.
    let received = api["received"][format!("{TD}/frontend")]
        .as_u64()
        .unwrap_or(0);
    let allowed = count(&frontend, "api", "ok");
    assert!(
        received > 0 && received <= allowed + 2,
        "the api app received {received} requests from the frontend, which had {allowed} allowed and {deletes} denied"
    );
    assert!(db["received"]["tcp"].as_u64().unwrap_or(0) > 0, "{db}");

    // A container on the same network without a sidecar reaches no app port.
    for url in [
        "http://172.28.0.21:8080/v1/orders/42",
        "http://172.28.0.21:4643/v1/orders/42",
        "http://172.28.0.22:5432/",
        "http://172.28.0.20:8080/",
    ] {
        assert_eq!(
            probe_from_outside(&project, url),
            Some(1),
            "{url} answered a container with no sidecar"
        );
    }

    // A capture on the Compose network: mTLS between sidecars, no request in plaintext.
    let network = Command::new("docker")
        .args(["network", "inspect", "-f", "{{.Id}}"])
        .arg(format!("{}_mesh", project.name))
        .output()
        .unwrap();
    let bridge = format!("br-{}", &String::from_utf8_lossy(&network.stdout)[..12]);
    let capture = project.dir.join("mesh.pcap");
    let captured = Command::new("tshark")
        .args(["-i", &bridge, "-a", "duration:6", "-q", "-w"])
        .arg(&capture)
        .output()
        .expect("tshark (scripts/test-deps installs it)");
    assert!(captured.status.success(), "{}", text(&captured));
    let frames = |filter: &str| {
        let read = Command::new("tshark")
            .arg("-r")
            .arg(&capture)
            .args(["-Y", filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&read.stdout).lines().count()
    };
    assert!(
        frames("tcp.port == 4643") > 10,
        "no traffic between sidecars was captured"
    );
    assert_eq!(
        frames("frame contains \"orders\""),
        0,
        "a request path crossed in plaintext"
    );
    assert_eq!(frames("http"), 0, "plaintext HTTP on the Compose network");

    // Restarting the control plane costs no request.
    let before = project.stats("frontend");
    project.compose_ok(&["restart", "control-plane"]);
    std::thread::sleep(Duration::from_secs(8));
    let after = project.stats("frontend");
    assert!(
        count(&after, "api", "ok") > count(&before, "api", "ok"),
        "{after}"
    );
    for outcome in ["error", "refused", "denied"] {
        assert_eq!(
            count(&after, "api", outcome),
            count(&before, "api", outcome),
            "frontend -> api {outcome} while the control plane restarted: {before} then {after}"
        );
    }

    // `down -v` leaves nothing of the project.
    project.compose_ok(&["down", "-v", "--timeout", "5"]);
    let left = project.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
