//! Containers for end-to-end tests: one network namespace per container, all on one bridge.
//!
//! A [`Topology`] owns a private "switch" namespace holding a Linux bridge, and one namespace
//! per container ([`Host`]) with loopback up and an `eth0` veth into the bridge, addressed
//! `10.249.<subnet>.<n>/24` and `fd53:5749:<subnet>::<n>/64`. Only these namespaces have those
//! addresses and nothing routes anywhere else. The bridge sits in its own namespace rather
//! than the host's, so the host's firewall (bridge netfilter with a `FORWARD DROP` policy, as
//! Docker leaves it) never sees the test traffic, and the host's interfaces never change.
//!
//! Processes run inside a namespace as root, as root without `CAP_NET_ADMIN` (what a container
//! gets), or under a UID ([`User`]). On drop, also when a test panics, every process started
//! here is killed (its whole process group), then the veths, the bridge and the namespaces
//! are deleted.
//!
//! Without root or `ip netns`, [`topology`] prints `SKIPPED: <test>: <reason>` straight to the
//! terminal (past libtest's capture) and returns `None`; with `SIDEWALL_REQUIRE_NETNS=1` (CI)
//! it fails the test instead.
#![allow(dead_code)] // each test binary uses a different part

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `sidewall` binary under test.
pub(crate) const SIDEWALL: &str = env!("CARGO_BIN_EXE_sidewall");

/// A dual-stack TCP echo server: `python3 -c ECHO_SERVER PORT`.
pub(crate) const ECHO_SERVER: &str = r#"
import socket, sys, threading
server = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"#;

/// A TCP client: `python3 -c TCP_CLIENT HOST PORT PAYLOAD` sends the payload, half-closes and
/// prints everything it receives; errors end in a Python exception on stderr.
pub(crate) const TCP_CLIENT: &str = r#"
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(sys.argv[3].encode())
    conn.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
sys.stdout.write(reply.decode(errors="replace"))
"#;

/// Who a process runs as inside its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum User {
    /// Root with every capability (the test itself; what sets up iptables).
    Root,
    /// Root with Docker's default capabilities: no `CAP_NET_ADMIN`, so it cannot change the
    /// namespace's routes or netfilter rules (an app "running as root" in a container).
    ContainerRoot,
    /// This UID and GID, no supplementary groups, no capabilities.
    Uid(u32),
}

/// Docker's default capability set (moby `oci/caps/defaults.go`).
const CONTAINER_CAPS: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,\
+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";

impl User {
    fn prefix(self) -> Vec<String> {
        match self {
            User::Root => vec![],
            User::ContainerRoot => vec![
                "setpriv".into(),
                format!("--bounding-set={CONTAINER_CAPS}"),
                "--".into(),
            ],
            User::Uid(uid) => vec![
                "setpriv".into(),
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--".into(),
            ],
        }
    }
}

/// One container: a network namespace on the bridge.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    /// The name the test gave it.
    pub(crate) name: String,
    /// The network namespace (`ip netns exec <netns>`).
    pub(crate) netns: String,
    /// Its address on the bridge.
    pub(crate) ipv4: Ipv4Addr,
    /// Its IPv6 (ULA) address on the bridge.
    pub(crate) ipv6: Ipv6Addr,
}

impl Host {
    /// Its address of one family, for `host:port` arguments (IPv6 unbracketed).
    pub(crate) fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub(crate) struct Run {
    /// Exit code (-1 when killed by a signal).
    pub(crate) code: i32,
    /// Standard output.
    pub(crate) stdout: String,
    /// Standard error.
    pub(crate) stderr: String,
}

impl Run {
    /// Its stdout, or a panic showing everything when it failed.
    pub(crate) fn ok(self, what: &str) -> String {
        assert_eq!(
            self.code, 0,
            "{what} failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.stdout
    }
}

/// A bridge and the namespaces on it; everything is removed on drop.
pub(crate) struct Topology {
    subnet: u8,
    switch: String,
    bridge: String,
    hosts: Vec<Host>,
    processes: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

/// Whether this machine can run namespace tests, and why not.
fn unavailable() -> Option<String> {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2)?.parse::<u32>().ok()
        });
    if euid != Some(0) {
        return Some("not running as root (network namespaces need root)".into());
    }
    if !installed("ip") {
        return Some("`ip` (iproute2) is not installed; scripts/test-deps installs it".into());
    }
    let probe = format!("sw{}-probe", token());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(out) if out.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            None
        }
        Ok(out) => Some(format!(
            "cannot create a network namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(error) => Some(format!("cannot run `ip netns add`: {error}")),
    }
}

/// Whether `program` is on the PATH.
pub(crate) fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Reports a test that cannot run here: a `SKIPPED` line on the terminal, or a failure when
/// `SIDEWALL_REQUIRE_NETNS` is set.
pub(crate) fn skip(test: &str, reason: &str) {
    if std::env::var_os("SIDEWALL_REQUIRE_NETNS").is_some_and(|v| v != "0") {
        panic!("{test} cannot run and SIDEWALL_REQUIRE_NETNS is set: {reason}");
    }
    // Written to the terminal directly: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {reason}");
}

/// A new topology, or `None` (after saying why) when this machine cannot have one or lacks
/// one of `programs`.
pub(crate) fn topology(test: &str, programs: &[&str]) -> Option<Topology> {
    let reason = unavailable().or_else(|| {
        let missing: Vec<&str> = programs.iter().copied().filter(|p| !installed(p)).collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{} not installed; scripts/test-deps installs it",
                missing.join(", ")
            )
        })
    });
    match reason {
        Some(reason) => {
            skip(test, &reason);
            None
        }
        None => Some(Topology::new()),
    }
}

/// Six hex digits unique to this topology among those running on the machine now.
fn token() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed = (std::process::id() as u64) << 32
        ^ u64::from(nanos)
        ^ u64::from(COUNTER.fetch_add(1, Ordering::SeqCst)) << 20;
    // A 64-bit finalizer (splitmix64), so nearby inputs give unrelated names.
    let mut z = mixed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:06x}", (z ^ (z >> 31)) & 0xff_ffff)
}

/// Runs `ip ARGS` (split on spaces), panicking with its stderr on failure.
fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Topology {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        // Creating the switch namespace claims the token; retry on the (unlikely) clash.
        let token = (0..5)
            .map(|_| token())
            .find(|token| {
                Command::new("ip")
                    .args(["netns", "add", &format!("sw{token}-switch")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("create a switch namespace");
        let topology = Self {
            subnet: u8::from_str_radix(&token[..2], 16).unwrap_or(0) % 254 + 1,
            switch: format!("sw{token}-switch"),
            bridge: format!("swbr{token}"),
            hosts: Vec::new(),
            processes: Vec::new(),
            dir,
        };
        // From here on, Drop cleans up whatever exists.
        let (switch, bridge) = (&topology.switch, &topology.bridge);
        ip(&format!("-n {switch} link set lo up"));
        ip(&format!("-n {switch} link add {bridge} type bridge"));
        ip(&format!("-n {switch} link set {bridge} up"));
        topology
    }

    /// The bridge's name (in the switch namespace).
    pub(crate) fn bridge(&self) -> &str {
        &self.bridge
    }

    /// A scratch directory removed with the topology.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a container on the bridge.
    pub(crate) fn add(&mut self, name: &str) -> Host {
        let n = self.hosts.len() as u8 + 2;
        let host = Host {
            name: name.to_owned(),
            netns: self.switch.replace("-switch", &format!("-{name}")),
            ipv4: Ipv4Addr::new(10, 249, self.subnet, n),
            ipv6: Ipv6Addr::new(0xfd53, 0x5749, self.subnet.into(), 0, 0, 0, 0, n.into()),
        };
        let (ns, switch, bridge) = (&host.netns, &self.switch, &self.bridge);
        ip(&format!("netns add {ns}"));
        self.hosts.push(host.clone());
        ip(&format!(
            "link add eth0 netns {ns} type veth peer name v{n} netns {switch}"
        ));
        ip(&format!("-n {switch} link set v{n} master {bridge} up"));
        ip(&format!("-n {ns} link set lo up"));
        // Keep the IPv6 address across link down/up, as the IPv4 one is kept.
        let keep = "echo 1 > /proc/sys/net/ipv6/conf/eth0/keep_addr_on_down";
        self.exec(&host, User::Root, &["sh", "-c", keep])
            .ok("keep_addr_on_down");
        ip(&format!("-n {ns} addr add {}/24 dev eth0", host.ipv4));
        // `nodad`: usable at once, rather than after duplicate address detection.
        ip(&format!("-n {ns} addr add {}/64 dev eth0 nodad", host.ipv6));
        ip(&format!("-n {ns} link set eth0 up"));
        host
    }

    /// `ip netns exec <host> [setpriv ...] PROGRAM`, ready for more arguments.
    pub(crate) fn command(&self, host: &Host, user: User, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &host.netns])
            .args(user.prefix())
            .arg(program);
        command
    }

    /// Runs `argv` in `host` as `user` to completion (killed after 60 s).
    pub(crate) fn exec(&self, host: &Host, user: User, argv: &[&str]) -> Run {
        let output = self
            .command(host, user, "timeout")
            .args(["-k", "5", "60"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts `command` (from [`Self::command`]) in its own process group, its output going to
    /// `<dir>/<label>.log`; it is killed when the topology drops. Returns its pid.
    pub(crate) fn spawn(&mut self, label: &str, mut command: Command) -> u32 {
        let log = std::fs::File::create(self.log_path(label)).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn in namespace");
        let pid = child.id();
        self.processes.push((label.to_owned(), child));
        pid
    }

    fn log_path(&self, label: &str) -> PathBuf {
        self.dir.path().join(format!("{label}.log"))
    }

    /// What the process started as `label` has printed so far.
    pub(crate) fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.log_path(label)).unwrap_or_default()
    }

    /// Stops the process started as `label` (SIGTERM to its group, SIGKILL after 5 s).
    pub(crate) fn stop(&mut self, label: &str) {
        let Some(at) = self.processes.iter().position(|(l, _)| l == label) else {
            return;
        };
        let (_, mut child) = self.processes.remove(at);
        signal_group(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_group(&child, "KILL");
        let _ = child.wait();
    }

    /// Starts [`ECHO_SERVER`] on `port` (IPv4 and IPv6) in `host` and waits until it listens.
    pub(crate) fn echo_server(&mut self, host: &Host, port: u16) {
        let mut command = self.command(host, User::Root, python());
        command.args(["-c", ECHO_SERVER, &port.to_string()]);
        self.spawn(&format!("echo-{}-{port}", host.name), command);
        self.wait_listening(host, port);
    }

    /// Runs [`TCP_CLIENT`] in `host` as `user`: the reply, or the error's last line.
    pub(crate) fn call(
        &self,
        host: &Host,
        user: User,
        to: IpAddr,
        port: u16,
        payload: &str,
    ) -> Result<String, String> {
        let run = self.exec(
            host,
            user,
            &[
                python(),
                "-c",
                TCP_CLIENT,
                &to.to_string(),
                &port.to_string(),
                payload,
            ],
        );
        if run.code == 0 {
            Ok(run.stdout)
        } else {
            let last = run.stderr.lines().last().unwrap_or("").to_owned();
            Err(format!("exit {}: {last}", run.code))
        }
    }

    /// Waits (up to 10 s) until something in `host` listens on TCP `port`.
    pub(crate) fn wait_listening(&self, host: &Host, port: u16) {
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let run = self.exec(host, User::Root, &["ss", "-Hltn", &filter]);
            if !run.stdout.trim().is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on port {port} in {}",
                host.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes `host`'s link to the bridge down (its addresses stay).
    pub(crate) fn link_down(&self, host: &Host) {
        ip(&format!("-n {} link set eth0 down", host.netns));
    }

    /// Brings `host`'s link to the bridge back up.
    pub(crate) fn link_up(&self, host: &Host) {
        ip(&format!("-n {} link set eth0 up", host.netns));
    }

    /// Starts capturing every frame on the bridge (tshark, else tcpdump) and waits until the
    /// capture runs.
    pub(crate) fn capture(&self) -> Capture {
        let file = self.dir.path().join(format!("capture-{}.pcapng", token()));
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.switch]);
        let tool = if installed("tshark") {
            command
                .args(["tshark", "-i", &self.bridge, "-w"])
                .arg(&file);
            "tshark"
        } else {
            command
                .args(["tcpdump", "-i", &self.bridge, "-s", "0", "-U", "-w"])
                .arg(&file);
            "tcpdump"
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {tool}: {e}"));
        // Both say so on stderr once packets are being written: tshark's "Capturing on" comes
        // earlier, before its dumpcap has started.
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Capture started") || line.contains("listening on") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let capture = Capture { child, file };
        assert!(
            ready_rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "{tool} did not start capturing on {}",
            self.bridge
        );
        capture
    }
}

/// Sends SIG`signal` to the process group `child` leads (spawned with `process_group(0)`),
/// through the shell's `kill` (always there, unlike procps').
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -s {signal} -- -{}", child.id())])
        .stderr(Stdio::null())
        .status();
}

/// The Python interpreter, the system one when there is one (readable by any UID, unlike a
/// shim under root's home).
pub(crate) fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            signal_group(child, "KILL");
            let _ = child.wait();
        }
        for host in &self.hosts {
            // Deleting one end of a veth deletes both.
            let _ = Command::new("ip")
                .args(["-n", &host.netns, "link", "del", "eth0"])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["-n", &self.switch, "link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}

/// A packet capture on the bridge; stopped (or killed, if never stopped) on drop.
pub(crate) struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Stops the capture and returns the capture file's raw bytes.
    pub(crate) fn stop(mut self) -> Vec<u8> {
        // libpcap hands packets over in blocks with a read timeout (dumpcap: 250 ms), and a
        // block not yet handed over when the signal arrives is lost.
        std::thread::sleep(Duration::from_secs(1));
        // SIGINT lets tshark (and its dumpcap) or tcpdump flush and close the file.
        signal_group(&self.child, "INT");
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read(&self.file).expect("read the capture file")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        signal_group(&self.child, "KILL");
        let _ = self.child.wait();
    }
}

/// How many times `marker` occurs in `bytes` (non-overlapping).
pub(crate) fn count(bytes: &[u8], marker: &[u8]) -> usize {
    if marker.is_empty() {
        return 0;
    }
    let mut found = 0;
    let mut at = 0;
    while at + marker.len() <= bytes.len() {
        if &bytes[at..at + marker.len()] == marker {
            found += 1;
            at += marker.len();
        } else {
            at += 1;
        }
    }
    found
}

/// A UID no account on this machine has: the sidecar's dedicated UID in a test (no account is
/// needed to run as it through `setpriv`).
pub(crate) fn unused_uid() -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken: std::collections::HashSet<u32> = passwd
        .lines()
        .filter_map(|line| line.split(':').nth(2)?.parse().ok())
        .collect();
    (46_400..)
        .find(|uid| !taken.contains(uid))
        .expect("a free UID")
}
