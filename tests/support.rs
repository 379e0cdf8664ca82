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

/// A free loopback port (bound and released; good enough for tests on one machine).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `sidewall control-plane` process on loopback, stopped (SIGTERM) when dropped.
pub(crate) struct ControlPlaneProcess {
    pub(crate) child: std::process::Child,
    pub(crate) data_dir: PathBuf,
    pub(crate) api_port: u16,
    pub(crate) admin_port: u16,
}

impl ControlPlaneProcess {
    pub(crate) fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let (api_port, admin_port) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_sidewall"))
            .arg("control-plane")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(extra)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the control plane");
        let process = Self {
            child,
            data_dir: data_dir.to_path_buf(),
            api_port,
            admin_port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err()
            || !data_dir.join("control-plane.json").exists()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "control plane did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        process
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

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
