//! The processes a run starts, and what the kernel says they cost.
//!
//! Each proxy is spawned in its own process group, with its output in a log file, so stopping
//! it reaches every process it forked (nginx's worker) and nothing else. [`Group::stop`] sends
//! SIGTERM, waits, then SIGKILL; dropping a [`Group`] (an error, Ctrl-C) sends SIGKILL at once.
//! CPU time and RSS are read from `/proc` for each started process and all its descendants.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sidewall_bench::host::rss_kib;

/// Clock ticks per second in `/proc/<pid>/stat`: USER_HZ, fixed at 100 by the Linux ABI on
/// every architecture this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// One started process.
struct Started {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The processes of one contender.
#[derive(Default)]
pub(crate) struct Group {
    started: Vec<Started>,
}

impl Group {
    /// Starts `command` in its own process group, stdout and stderr to `<logs>/<name>.log`.
    pub(crate) fn spawn(&mut self, name: &str, mut command: Command, logs: &Path) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {:?}", command.get_program()))?;
        self.started.push(Started {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(())
    }

    /// How many processes were started (each may fork more).
    pub(crate) fn len(&self) -> usize {
        self.started.len()
    }

    /// Fails with the end of its log if a started process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for started in &mut self.started {
            if let Some(status) = started.child.try_wait()? {
                let log = std::fs::read_to_string(&started.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{} exited ({status}); end of {}:\n{}",
                    started.name,
                    started.log.display(),
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    /// Every live process of the group: the started ones and their descendants.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let roots: Vec<u32> = self.started.iter().map(|s| s.child.id()).collect();
        with_descendants(&roots)
    }

    /// CPU seconds (user + system, including reaped children) of the whole group so far.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().filter_map(cpu_ticks).sum::<u64>() as f64 / TICKS_PER_SECOND
    }

    /// Resident memory of the whole group, KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(rss_kib).sum()
    }

    /// SIGTERM to each process group, up to 3 s to exit, then SIGKILL.
    pub(crate) async fn stop(mut self) {
        for started in &self.started {
            let _ = killpg(group_of(&started.child), Signal::SIGTERM);
        }
        for _ in 0..60 {
            let all_done = self
                .started
                .iter_mut()
                .all(|s| matches!(s.child.try_wait(), Ok(Some(_))));
            if all_done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop sends SIGKILL to whatever is left (an nginx worker, a stuck proxy).
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for started in &mut self.started {
            let _ = killpg(group_of(&started.child), Signal::SIGKILL);
            let _ = started.child.wait();
        }
    }
}

fn group_of(child: &Child) -> Pid {
    // A pid always fits in i32 on Linux (pid_max ≤ 2^22).
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime + cutime + cstime (fields 14 to 17; the list starts at field 3).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum()
}

/// `roots` and every process descending from them.
fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok());
            if let Some(parent) = parent {
                children.entry(parent).or_default().push(pid);
            }
        }
    }
    let mut all = Vec::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        if all.contains(&pid) {
            continue;
        }
        all.push(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    all
}

/// Raises the open-file limit as far as allowed (children inherit it) and returns the soft
/// limit in force.
pub(crate) fn raise_file_limit(wanted: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= wanted {
        return soft;
    }
    // Root may raise the hard limit too; others can go up to the hard limit.
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted.max(hard)).is_ok() {
        return wanted;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_memory_and_no_lost_descendants() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert!(with_descendants(&[me]).contains(&me));
    }

    #[tokio::test]
    async fn a_group_is_measured_and_stopped() {
        let logs = std::env::temp_dir();
        let mut group = Group::default();
        let mut command = Command::new("sleep");
        command.arg("30");
        group.spawn("bench-test-sleep", command, &logs).unwrap();
        group.check_alive().unwrap();
        assert_eq!(group.pids().len(), 1);
        assert!(group.rss_kib() > 0);
        let pid = group.started[0].child.id();
        group.stop().await;
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "stopped and reaped"
        );
    }
}
