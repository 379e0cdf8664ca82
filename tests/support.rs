//! Helpers shared by the end-to-end tests: run the real `sidewall` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test support: panics are the failure report; blocking waits are fine outside async
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a finished `sidewall` process printed and how it exited.
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `sidewall ARGS...` from the repository root.
pub(crate) fn sidewall<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = Command::new(env!("CARGO_BIN_EXE_sidewall"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run sidewall");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A free loopback port, never handed out twice in this test binary.
pub(crate) fn free_port() -> u16 {
    sidewall_control_plane::testing::free_port()
}

/// A `sidewall control-plane` process on loopback, stopped (SIGTERM) when dropped.
pub(crate) struct ControlPlaneProcess {
    pub(crate) child: std::process::Child,
    pub(crate) data_dir: PathBuf,
    pub(crate) api_port: u16,
    pub(crate) admin_port: u16,
    /// The dashboard (`--ui-listen`); a fresh port on every start, so that parallel tests
    /// never contend for the default 4680.
    pub(crate) ui_port: u16,
}

impl ControlPlaneProcess {
    /// Starts one on free ports; if it exits before serving (another process took a port
    /// between `free_port` and its bind), tries again on new ones.
    pub(crate) fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_under(data_dir, extra, "127.0.0.1", &[])
    }

    /// Like [`Self::start`], with the API listening on `ip` (`[::]` for dual stack; clients
    /// still reach it at 127.0.0.1) and run by `wrapper` (e.g. `faketime -f +45s`) if any. A
    /// restart runs it plainly on 127.0.0.1.
    pub(crate) fn start_under(data_dir: &Path, extra: &[&str], ip: &str, wrapper: &[&str]) -> Self {
        let launch = Launch { extra, ip, wrapper };
        for _ in 0..2 {
            if let Some(started) = launch.try_start(data_dir, free_port(), free_port()) {
                return started;
            }
        }
        launch.start(data_dir, free_port(), free_port())
    }

    /// Starts again on the same ports and data directory (after [`Self::stop`]).
    pub(crate) fn restart(&mut self, extra: &[&str]) {
        let _ = std::fs::remove_file(self.data_dir.join("control-plane.json"));
        let launch = Launch {
            extra,
            ip: "127.0.0.1",
            wrapper: &[],
        };
        let fresh = launch.start(&self.data_dir, self.api_port, self.admin_port);
        let mut old = std::mem::replace(self, fresh);
        let _ = old.child.wait();
    }

    /// Runs a `sidewall` CLI command against this control plane.
    pub(crate) fn cli(&self, args: &[&str]) -> Run {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--data-dir".into());
        all.push(self.data_dir.display().to_string());
        sidewall(all)
    }

    /// Sends SIGTERM and waits; returns the exit code.
    pub(crate) fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

/// How a control plane process is started.
struct Launch<'a> {
    extra: &'a [&'a str],
    ip: &'a str,
    wrapper: &'a [&'a str],
}

impl Launch<'_> {
    fn start(&self, data_dir: &Path, api_port: u16, admin_port: u16) -> ControlPlaneProcess {
        self.try_start(data_dir, api_port, admin_port)
            .unwrap_or_else(|| {
                let log =
                    std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default();
                panic!("the control plane exited before serving:\n{log}")
            })
    }

    /// `None` if the process exited before serving (its stderr is `<data_dir>.log`).
    fn try_start(
        &self,
        data_dir: &Path,
        api_port: u16,
        admin_port: u16,
    ) -> Option<ControlPlaneProcess> {
        let ui_port = free_port();
        let log = std::fs::File::create(data_dir.with_extension("log")).unwrap();
        let binary = env!("CARGO_BIN_EXE_sidewall");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("control-plane")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("{}:{api_port}", self.ip)])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--ui-listen", &format!("127.0.0.1:{ui_port}")])
            .args(self.extra)
            .stderr(log)
            .spawn()
            .expect("start the control plane");
        let mut process = ControlPlaneProcess {
            child,
            data_dir: data_dir.to_path_buf(),
            api_port,
            admin_port,
            ui_port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err()
            || !data_dir.join("control-plane.json").exists()
        {
            if matches!(process.child.try_wait(), Ok(Some(_))) {
                return None;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "control plane did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Some(process)
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP GET on loopback (for admin endpoints): (status, body).
pub(crate) fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The sum of a Prometheus metric's samples whose labels include all of `labels`.
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until `check` holds, polling every 50 ms, or panics with `what` after `seconds`.
pub(crate) fn eventually(seconds: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A TCP echo app on loopback that counts the connections it accepts.
pub(crate) struct EchoApp {
    pub(crate) port: u16,
    pub(crate) accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EchoApp {
    pub(crate) fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    let _ = std::io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { port, accepted }
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Sends `payload` on a new connection to `port`, half-closes, and returns what came back
/// (`None` if the connection failed or was closed without an answer).
pub(crate) fn exchange(port: u16, payload: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    stream.write_all(payload).ok()?;
    stream.shutdown(std::net::Shutdown::Write).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

/// A `sidewall proxy` process, killed when dropped.
pub(crate) struct ProxyProcess {
    pub(crate) child: std::process::Child,
    pub(crate) admin_port: u16,
    pub(crate) log: PathBuf,
}

impl ProxyProcess {
    /// Writes `config` to `<dir>/<name>.yaml` and starts a sidecar with it (`sidewall proxy`).
    pub(crate) fn start(dir: &Path, name: &str, config: &str, admin_port: u16) -> Self {
        Self::start_with(
            &[env!("CARGO_BIN_EXE_sidewall"), "proxy"],
            dir,
            name,
            config,
            admin_port,
        )
    }

    /// The same with the lean binary, `sidewall-proxy`.
    pub(crate) fn start_lean(dir: &Path, name: &str, config: &str, admin_port: u16) -> Self {
        Self::start_with(
            &[env!("CARGO_BIN_EXE_sidewall-proxy")],
            dir,
            name,
            config,
            admin_port,
        )
    }

    /// `command` (program and arguments before `--config`) with `config`.
    fn start_with(command: &[&str], dir: &Path, name: &str, config: &str, admin_port: u16) -> Self {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(command[0])
            .args(&command[1..])
            .arg("--config")
            .arg(&file)
            .env("SIDEWALL_LOG", "info,sidewall_proxy=debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the sidecar");
        Self {
            child,
            admin_port,
            log,
        }
    }

    pub(crate) fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while http_get(self.admin_port, "/ready").0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sidecar is not ready after 30 s; /ready says {:?}; its log:\n{}",
                http_get(self.admin_port, "/ready"),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub(crate) fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").1
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A Python helper (`python3 -c SCRIPT ARGS…`) that prints `first` on its first line once it
/// is set up; returns it, killed when dropped, with the rest of its output to read.
pub(crate) struct Helper {
    pub(crate) child: std::process::Child,
    pub(crate) out: std::io::BufReader<std::process::ChildStdout>,
}

impl Helper {
    pub(crate) fn start<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S], first: &str) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 (scripts/test-deps installs it)");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), first, "the helper did not start");
        Self { child, out }
    }

    /// The next line it prints, trimmed.
    pub(crate) fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// Writes a line to its standard input.
    pub(crate) fn say(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python that waits up to 20 s for the server to close each socket in `held` and prints how
/// many it closed (after a script that opened them).
pub(crate) const WAIT_FOR_CLOSE: &str = r#"
closed = []
def wait(s):
    s.settimeout(20)
    try:
        while s.recv(65536):
            pass
        closed.append(1)
    except socket.timeout:
        pass
    except OSError:
        closed.append(1)
threads = [threading.Thread(target=wait, args=(s,)) for s in held]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(closed), flush=True)
"#;

/// Opens `count` plain TCP connections to 127.0.0.1:`port`, sends nothing (`nothing`) or one
/// byte of a request (`byte`) on each, and returns how many the server closed within 20 s.
pub(crate) fn hold_plain(port: u16, send: &str, count: usize) -> usize {
    const HOLD_PLAIN: &str = r#"
import socket, sys, threading
port, send, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
for s in held:
    if send == "byte":
        s.sendall(b"G")
"#;
    let output = Command::new("python3")
        .args(["-c", &format!("{HOLD_PLAIN}{WAIT_FOR_CLOSE}")])
        .args([&port.to_string(), send, &count.to_string()])
        .output()
        .expect("python3 (scripts/test-deps installs it)");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)))
}

/// Where [`h2_control_flood`] connects, and as whom.
pub(crate) struct FloodTarget<'a> {
    /// The sidecar's inbound port.
    pub(crate) port: u16,
    /// The control plane's data directory (for `trust-bundle.pem`).
    pub(crate) control_plane: &'a Path,
    /// The sidecar state directory of the peer the flood comes from (its SVID and key).
    pub(crate) peer_state: &'a Path,
    /// The target sidecar's SPIFFE ID.
    pub(crate) server: &'a str,
    /// `sidewall-mux/1` (a shared connection) or `sidewall-h2/1` (an HTTP port).
    pub(crate) alpn: &'a str,
    /// The port header to send first (an HTTP port), or none (a shared connection).
    pub(crate) port_header: Option<u16>,
}

/// Opens an HTTP/2 connection to `target` as its peer, sends the preface, then control frames
/// of `kind` (4 `SETTINGS`, 6 `PING`) in writes of 500, reading (and dropping) whatever comes
/// back, for at most 10 s or 100,000 frames. Returns the frames sent before the sidecar closed
/// the connection, `None` if it was still open.
pub(crate) fn h2_control_flood(target: &FloodTarget<'_>, kind: u8) -> Option<usize> {
    use rustls_pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let pem = |path: PathBuf| std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let roots: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem(target
        .control_plane
        .join("trust-bundle.pem")))
    .map(Result::unwrap)
    .collect();
    let mut bundles = sidewall_policies::svid::TrustBundles::default();
    let domain = sidewall_policies::SpiffeId::parse(target.server).unwrap();
    bundles.add(domain.trust_domain(), roots).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        sidewall_policies::svid::SpiffeServerVerifier::new(domain, bundles, &provider, None);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_client_auth_cert(
            rustls_pki_types::CertificateDer::pem_slice_iter(&pem(target
                .peer_state
                .join("certificate.pem")))
            .map(Result::unwrap)
            .collect(),
            rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem(target
                .peer_state
                .join("key.pem")))
            .unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![target.alpn.as_bytes().to_vec()];
    let mut connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "sidewall".try_into().unwrap())
            .unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", target.port)).unwrap();
    tcp.set_write_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut connection, &mut tcp);
    let frame = |kind: u8, payload: &[u8]| {
        let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut bytes = vec![length[1], length[2], length[3], kind, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(payload);
        bytes
    };
    if let Some(port) = target.port_header {
        let [high, low] = port.to_be_bytes();
        tls.write_all(&[0x53, 0x57, 0x01, high, low]).unwrap();
        let mut status = [0u8];
        tls.read_exact(&mut status).unwrap();
        assert_eq!(status[0], 0, "the port header was refused");
    }
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(4, &[]));
    tls.write_all(&opening).unwrap();
    let payload: &[u8] = if kind == 6 { &[0; 8] } else { &[] };
    let burst: Vec<u8> = (0..500).flat_map(|_| frame(kind, payload)).collect();
    let started = std::time::Instant::now();
    let mut sent = 0;
    let mut sink = vec![0u8; 64 * 1024];
    while started.elapsed() < std::time::Duration::from_secs(10) && sent < 100_000 {
        if tls.write_all(&burst).and_then(|()| tls.flush()).is_err() {
            return Some(sent);
        }
        sent += 500;
        // Read what the sidecar answered so far, so that only its limits end the connection.
        tls.sock
            .set_read_timeout(Some(std::time::Duration::from_millis(1)))
            .unwrap();
        loop {
            match tls.read(&mut sink) {
                Ok(0) => return Some(sent),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(_) => return Some(sent),
            }
        }
    }
    None
}

/// Whether this test can use Docker (and docker-compose, with `compose`). When it cannot, says
/// `SKIPPED` on the terminal, or fails when `SIDEWALL_REQUIRE_DOCKER` is set (CI).
pub(crate) fn docker_available(test: &str, compose: bool) -> bool {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let reason = if !works("docker", &["info", "--format", "{{.ServerVersion}}"]) {
        "no reachable Docker daemon"
    } else if compose && !works("docker-compose", &["version"]) {
        "no docker-compose"
    } else {
        return true;
    };
    if std::env::var_os("SIDEWALL_REQUIRE_DOCKER").is_some_and(|v| v != "0") {
        panic!("{test} cannot run and SIDEWALL_REQUIRE_DOCKER is set: {reason}");
    }
    // Written to the terminal directly: libtest captures `eprintln!` of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {reason}");
    false
}

/// Builds the image (`scripts/image`) from this test binary's `sidewall`, tagged `tag`.
pub(crate) fn build_image(tag: &str) {
    let build = Command::new(repo_root().join("scripts/image"))
        .args(["--binary", env!("CARGO_BIN_EXE_sidewall"), "--tag", tag])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    assert!(build.status.success(), "scripts/image: {said}");
    assert!(said.contains(&format!("built {tag}, ")), "{said}");
}

/// A finished command's stdout then stderr, for a failure message.
pub(crate) fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// What `kubectl kustomize examples/kubernetes/NAME` renders (what `kubectl apply -k`
/// applies), as YAML. `scripts/test-deps` makes sure kubectl is there.
pub(crate) fn kustomize(name: &str) -> String {
    let dir = repo_root().join("examples/kubernetes").join(name);
    let run = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl (scripts/test-deps installs it)");
    assert!(
        run.status.success(),
        "kubectl kustomize {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8(run.stdout).expect("kustomize writes UTF-8")
}

/// Whether Debian's `chromium` is on the PATH (`scripts/test-deps` installs it).
pub(crate) fn chromium_installed() -> bool {
    Command::new("sh")
        .args(["-c", "command -v chromium"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs headless Chromium on `url` with `extra` arguments (`--dump-dom` or `--screenshot`)
/// and returns its standard output; kills it after 90 s.
pub(crate) fn chromium(work: &Path, url: &str, extra: &[&str]) -> String {
    let out = work.join("chromium.out");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.join("profile").display()
        ))
        .arg("--virtual-time-budget=5000")
        .args(extra)
        .arg(url)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::read_to_string(&out).unwrap()
}
