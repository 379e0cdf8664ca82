//! A real etcd cluster on loopback for tests: members on free ports, data in a directory the
//! caller owns, each member stoppable and restartable on its own.
//!
//! Tests call [`EtcdCluster::start`], which returns `None` (after a loud `SKIPPED` line) when
//! the `etcd` binary is missing, unless `SIDEWALL_REQUIRE_ETCD` or `SIDEWALL_REQUIRE_NETNS` is
//! set (CI): then a missing etcd fails the test.

#![allow(clippy::disallowed_methods)] // blocking waits on child processes, outside async code

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// One member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` (and `/metrics`), also when clients must use TLS.
    health_port: u16,
    child: Option<Child>,
}

/// TLS for the members' client URLs: their certificate and key, and the CA client
/// certificates must chain to (mutual TLS). PEM files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running cluster; every member is killed when dropped.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<EtcdTls>,
}

/// Whether tests may use etcd; prints why not (and panics where it is required).
pub fn etcd_available(test: &str) -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let required = ["SIDEWALL_REQUIRE_ETCD", "SIDEWALL_REQUIRE_NETNS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    assert!(
        !required,
        "{test}: etcd is required here (SIDEWALL_REQUIRE_ETCD) but the `etcd` binary is missing: run scripts/test-deps"
    );
    eprintln!(
        "\n*** SKIPPED {test}: the `etcd` binary is missing (scripts/test-deps installs etcd-server) ***\n"
    );
    false
}

impl EtcdCluster {
    /// Starts `size` members in `dir` and waits until the cluster is healthy; `None` if etcd
    /// is not installed (see the module doc).
    pub fn start(dir: &Path, size: usize, test: &str) -> Option<Self> {
        Self::start_with(dir, size, test, None)
    }

    /// Like [`Self::start`], with clients talking mutual TLS to the members when `tls` is set.
    pub fn start_with(dir: &Path, size: usize, test: &str, tls: Option<EtcdTls>) -> Option<Self> {
        if !etcd_available(test) {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        // Ports are picked free, then bound by etcd a moment later: another process may take
        // one in between (or a loaded machine may be slow to elect). A cluster that is not
        // healthy in time, or a member that exits, is started again on fresh ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cluster = Self::spawn_all(dir, size, tls.clone(), attempt);
            match cluster.healthy_within(&(0..size).collect::<Vec<_>>(), Duration::from_secs(40)) {
                Ok(()) => return Some(cluster),
                Err(why) if attempt < 3 => {
                    eprintln!(
                        "etcd test cluster, attempt {attempt}: {why}; starting it again on fresh ports"
                    );
                    drop(cluster);
                }
                Err(why) => panic!("etcd test cluster: {why}; logs in {}", dir.display()),
            }
        }
    }

    fn spawn_all(dir: &Path, size: usize, tls: Option<EtcdTls>, attempt: usize) -> Self {
        let dir = dir.join(format!("attempt-{attempt}"));
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                health_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            dir,
            members,
            initial_cluster,
            tls,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster
    }

    /// Waits until the members `which` are healthy; an error when one of them exits or
    /// `timeout` passes first.
    fn healthy_within(&mut self, which: &[usize], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !which.iter().all(|&i| self.healthy(i)) {
            for &i in which {
                if let Some(child) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(format!("member {i} exited ({status})"));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("members {which:?} not healthy after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let data = self.dir.join(&member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", member.name)))
            .unwrap();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let health = format!("http://127.0.0.1:{}", member.health_port);
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-metrics-urls", &health])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "sidewall-test"])
            // etcd's defaults, spelled out: shorter elections flap on a loaded 2-core machine.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://…` for `--store`.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Kills member `i` (as a crash would).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its ports and data.
    pub fn start_member(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
    }

    /// Whether member `i` answers `/health` as healthy (it has a leader).
    pub fn healthy(&self, i: usize) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) =
            std::net::TcpStream::connect(("127.0.0.1", self.members[i].health_port))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = write!(stream, "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text.contains("\"health\":\"true\"")
    }

    /// Waits (up to 60 s) until the members `which` are healthy.
    pub fn wait_healthy(&self, which: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !which.iter().all(|&i| self.healthy(i)) {
            assert!(
                Instant::now() < deadline,
                "etcd members {which:?} did not become healthy; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}
