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

/// `sidewall probe URL` in the network namespace of `cp`, until it succeeds or 30 s pass.
fn ready(built: &Built, url: &str) -> Output {
    let started = Instant::now();
    loop {
        let probe = built.run_in("cp", &[], &["probe", url]);
        if probe.status.success() || started.elapsed() > Duration::from_secs(30) {
            return probe;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Issue 19, part 1, in containers: the control plane checks Kubernetes service-account
/// tokens against a test issuer's keys (a JWKS file this test makes, mounted read-only), and a
/// sidecar container, as UID 65532 on a read-only root, joins with the token mounted beside its
/// config, pinning the CA by the fingerprint `sidewall ca fingerprint` gives in the control
/// plane's container.
#[test]
fn a_sidecar_container_joins_with_a_service_account_token_from_a_test_issuer() {
    if !support::docker_available("image", false) {
        return;
    }
    let image = format!("sidewall-test-sa:{}", std::process::id());
    let mut built = Built {
        image: image.clone(),
        containers: Vec::new(),
    };
    support::build_image(&image);

    // The test issuer: a key, its JWKS, a token for pod api-1 of service account shop/api.
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path();
    let readable = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    readable(shared, 0o755);
    let cluster = sidewall_control_plane::testing::TestIssuer::new("test-issuer");
    let issuer = cluster.url.clone();
    let files = [
        ("jwks.json", cluster.jwks()),
        (
            "cp.yaml",
            format!(
                "attestation:\n  kubernetes:\n    issuer: {issuer}\n    jwksFile: /etc/sidewall/jwks.json\n    namespaces: [shop]\n"
            ),
        ),
        (
            "token",
            cluster.token("shop", "api", "api-1", "sidewall", 3600),
        ),
    ];
    for (name, content) in files {
        std::fs::write(shared.join(name), content).unwrap();
        readable(&shared.join(name), 0o644);
    }
    let mount = format!("{}:/etc/sidewall:ro", shared.display());

    built.start(
        "cp",
        &[
            "--read-only",
            "--tmpfs",
            "/data:uid=65532,gid=65532",
            "-v",
            &mount,
        ],
        &[
            "control-plane",
            "--config",
            "/etc/sidewall/cp.yaml",
            "--data-dir",
            "/data",
            "--listen",
            "127.0.0.1:4600",
            "--admin-listen",
            "127.0.0.1:4690",
            "--ui-listen",
            "127.0.0.1:4680",
        ],
    );
    let probe = ready(&built, "http://127.0.0.1:4690/ready");
    assert!(probe.status.success(), "{}", text(&probe));
    // The CA fingerprint, as the control plane's CLI gives it (the image has no shell).
    let printed = docker(&[
        "exec",
        &built.container("cp"),
        "sidewall",
        "ca",
        "fingerprint",
        "--data-dir",
        "/data",
    ]);
    assert!(printed.status.success(), "{}", text(&printed));
    let fingerprint = String::from_utf8_lossy(&printed.stdout).trim().to_owned();
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");

    // The sidecar, in the control plane's network namespace, as the image's user.
    let config = format!(
        "identity: spiffe://sidewall.local/ns/shop/svc/api\ncontrolPlane:\n  urls: [https://127.0.0.1:4600]\n  serviceAccountTokenFile: /etc/sidewall/token\n  caFingerprint: {fingerprint}\n  pod: api-1\nstateDir: /state\ninbound:\n  listen: 127.0.0.1:4643\n  ports: []\nadmin:\n  listen: 127.0.0.1:4691\n"
    );
    std::fs::write(shared.join("sidecar.yaml"), config).unwrap();
    readable(&shared.join("sidecar.yaml"), 0o644);
    let network = format!("container:{}", built.container("cp"));
    built.start(
        "sidecar",
        &[
            "--network",
            &network,
            "--read-only",
            "--tmpfs",
            "/state:uid=65532,gid=65532",
            "-v",
            &mount,
        ],
        &["proxy", "--config", "/etc/sidewall/sidecar.yaml"],
    );
    let probe = ready(&built, "http://127.0.0.1:4691/ready");
    let logs = docker(&["logs", &built.container("sidecar")]);
    assert!(
        probe.status.success(),
        "the sidecar did not join: {}\n{}",
        text(&probe),
        text(&logs)
    );
    let cp_logs = text(&docker(&["logs", &built.container("cp")]));
    assert!(
        cp_logs.contains("certificate issued for a service-account token")
            && cp_logs.contains("spiffe://sidewall.local/ns/shop/svc/api"),
        "{cp_logs}"
    );
}
