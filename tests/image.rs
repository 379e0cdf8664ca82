//! The OCI image (`scripts/image`), built from this test's own `sidewall` binary with nothing
//! pulled from a registry, run under Docker the way a user runs it: as a non-root user on a
//! read-only root filesystem, the control plane healthy by `sidewall probe` (there is no curl or
//! shell in the image), and the init step writing the redirect rules with no capability but
//! NET_ADMIN and NET_RAW, and refused clearly without them. Needs Docker; without a reachable
//! daemon it says SKIPPED (or fails, with `SIDEWALL_REQUIRE_DOCKER` set, as in CI).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::output_text as text;

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

/// The image and the containers of one test run, removed when dropped.
struct Built {
    image: String,
    containers: Vec<String>,
}

impl Built {
    /// Runs a detached container named `name` (removed at the end) with `args` before the image.
    fn start(&mut self, name: &str, docker_args: &[&str], command: &[&str]) {
        let name = format!("{}-{name}", self.image.replace([':', '/'], "-"));
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(docker_args);
        args.push(&self.image);
        args.extend_from_slice(command);
        let run = docker(&args);
        assert!(run.status.success(), "docker {args:?}: {}", text(&run));
        self.containers.push(name);
    }

    /// `docker run --rm` in the network namespace of container `pod`.
    fn run_in(&self, pod: &str, docker_args: &[&str], command: &[&str]) -> Output {
        let network = format!("container:{}", self.container(pod));
        let mut args = vec!["run", "--rm", "--network", &network];
        args.extend_from_slice(docker_args);
        args.push(&self.image);
        args.extend_from_slice(command);
        docker(&args)
    }

    fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.image.replace([':', '/'], "-"))
    }
}

impl Drop for Built {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = docker(&["rm", "-f", container]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

#[test]
fn the_image_runs_unprivileged_probes_without_curl_and_its_init_step_needs_only_net_admin() {
    if !support::docker_available("image", false) {
        return;
    }
    let image = format!("sidewall-test:{}", std::process::id());
    let mut built = Built {
        image: image.clone(),
        containers: Vec::new(),
    };
    support::build_image(&image);

    // Non-root by default, and nothing but what it needs: no shell.
    let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", &image]);
    assert_eq!(text(&user).trim(), "65532:65532");
    let version = docker(&["run", "--rm", &image, "--version"]);
    assert!(
        text(&version).starts_with("sidewall "),
        "{}",
        text(&version)
    );
    let shell = docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        &image,
        "-c",
        "true",
    ]);
    assert!(!shell.status.success(), "the image has a shell");

    // The control plane as the default user on a read-only root, its state on a tmpfs.
    built.start(
        "cp",
        &["--read-only", "--tmpfs", "/data:uid=65532,gid=65532"],
        &[
            "control-plane",
            "--data-dir",
            "/data",
            "--listen",
            "0.0.0.0:4600",
            "--admin-listen",
            "127.0.0.1:4690",
            "--ui-listen",
            "127.0.0.1:4680",
        ],
    );
    let started = Instant::now();
    let probe = loop {
        let probe = built.run_in("cp", &[], &["probe", "http://127.0.0.1:4690/ready"]);
        if probe.status.success() || started.elapsed() > Duration::from_secs(30) {
            break probe;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(probe.status.success(), "{}", text(&probe));
    let closed = built.run_in("cp", &[], &["probe", "http://127.0.0.1:4699/ready"]);
    assert_eq!(closed.status.code(), Some(1), "{}", text(&closed));

    // A pod: an app alone in its network namespace; the init step redirects its TCP through
    // the sidecar's ports, as root with only NET_ADMIN and NET_RAW.
    built.start(
        "app",
        &[],
        &[
            "demo-app",
            "--name",
            "app",
            "--serve",
            "http:0.0.0.0:8080",
            "--stats",
            "/tmp/stats.json",
        ],
    );
    let init = [
        "--user",
        "0",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_RAW",
    ];
    let installed = built.run_in(
        "app",
        &init,
        &["iptables", "install", "--proxy-uid", "65532"],
    );
    assert!(installed.status.success(), "{}", text(&installed));
    let mut save = init.to_vec();
    save.extend(["--entrypoint", "/usr/sbin/iptables-save"]);
    let rules = built.run_in("app", &save, &["-t", "nat"]);
    let rules = text(&rules);
    for rule in [
        "-A PREROUTING -p tcp -j SIDEWALL_INBOUND",
        "-A SIDEWALL_INBOUND -p tcp -j REDIRECT --to-ports 4643",
        "-A SIDEWALL_OUTBOUND -m owner --uid-owner 65532 -j RETURN",
        "-A SIDEWALL_REDIRECT -p tcp -j REDIRECT --to-ports 4640",
    ] {
        assert!(rules.contains(rule), "{rule} missing from:\n{rules}");
    }
    // Without the capability: a clear refusal, not a stack of iptables errors.
    let refused = built.run_in(
        "app",
        &["--cap-drop", "ALL"],
        &["iptables", "install", "--proxy-uid", "65532"],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("needs CAP_NET_ADMIN"),
        "{}",
        text(&refused)
    );
}
