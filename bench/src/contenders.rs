//! Starting each contender as a two-hop chain client → A → B → server, and knowing whether it
//! can run here at all.
//!
//! - `direct`: no process; the client dials the server.
//! - `copy-baseline`: this binary, twice, as `relay` (tokio `copy_bidirectional`, one thread).
//! - `splice-baseline`: the same with `relay --splice` (the sidecar's own `splice(2)` relay:
//!   the kernel moves the bytes through a pipe, none is copied to user space).
//! - `haproxy`, `nginx`, `stunnel` ([`peers`]): configured as `shared/peers/contenders.sh`
//!   configured them for the reference figures.
//! - `sidewall-l4` ([`sidewall`]): two `sidewall proxy` processes, pre-seeded certificates.
//! - `sidewall-http`: the same chain with B's port declared `http`, so every request is parsed
//!   and authorized on its own; the load speaks HTTP/1.1 to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sidewall_bench::model::Contender;
use sidewall_bench::pki::{Pki, write_file};
use tokio::net::TcpStream;

use crate::load::Framing;
use crate::procs::Group;
use crate::server::ECHO;

mod peers;
mod sidewall;

pub(crate) use sidewall::locate as locate_sidewall;

/// What every contender's start needs.
pub(crate) struct Env {
    /// Scratch files (configurations, state, certificates) for this run.
    pub(crate) work: PathBuf,
    /// Process logs.
    pub(crate) logs: PathBuf,
    /// The run's certificates.
    pub(crate) pki: Pki,
    /// The in-process server at the end of every chain.
    pub(crate) server: SocketAddr,
    /// This executable (the copy-baseline relay is its hidden `relay` command).
    pub(crate) self_exe: PathBuf,
    /// The `sidewall` binary, or why there is none.
    pub(crate) sidewall: Result<PathBuf, String>,
    /// The open-file limit every started process inherits.
    pub(crate) files: u64,
}

/// A started chain: where the client connects, and the proxy processes.
pub(crate) struct Chain {
    /// The chain's entry.
    pub(crate) entry: SocketAddr,
    /// The proxies (empty for `direct`).
    pub(crate) group: Group,
}

/// Whether a contender can run here.
pub(crate) enum Plan {
    /// It can; the version it reports, if any.
    Run(Option<String>),
    /// It cannot, and why.
    Skip(String),
}

/// The first line of a program's output (stdout, then stderr) for `args` that contains
/// `marker`, or else the first non-empty one: its version, in practice.
fn version_line(program: &Path, args: &[&str], marker: &str) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.contains(marker))
        .or_else(|| lines().next())
        .map(str::to_owned)
}

/// The first of `names` found on `PATH` or in the sbin directories (where Debian puts daemons).
pub(crate) fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Decides whether `contender` can run here.
pub(crate) fn plan(contender: Contender, env: &Env) -> Plan {
    match contender {
        Contender::Direct => Plan::Run(None),
        Contender::CopyBaseline => Plan::Run(Some(
            "tokio::io::copy_bidirectional, 8 KiB buffers, one thread per hop".into(),
        )),
        Contender::SpliceBaseline => Plan::Run(Some(
            "splice(2) through a pipe per direction, no user-space copy, one thread per hop".into(),
        )),
        Contender::Haproxy | Contender::Nginx | Contender::Stunnel => peers::plan(contender),
        Contender::SidewallL4 | Contender::SidewallL4Dedicated | Contender::SidewallHttp => {
            match &env.sidewall {
                Ok(binary) => {
                    let size = std::fs::metadata(binary).map_or(0, |m| m.len());
                    Plan::Run(version_line(binary, &["--version"], "sidewall").map(|v| {
                        let name = binary.file_name().map_or_else(
                            || binary.display().to_string(),
                            |n| n.to_string_lossy().into_owned(),
                        );
                        format!("{v} ({name}, {:.1} MB as built)", size as f64 / 1e6)
                    }))
                }
                Err(reason) => Plan::Skip(reason.clone()),
            }
        }
        Contender::Target => Plan::Skip("runs only in target mode (--target)".into()),
    }
}

/// `n` distinct free loopback ports (bound together, then released).
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Starts `contender` and waits until an echo makes it through the whole chain.
pub(crate) async fn start(contender: Contender, env: &Env) -> Result<Chain> {
    let dir = env.work.join(contender.name());
    std::fs::create_dir_all(&dir)?;
    let mut chain = match contender {
        Contender::Direct => Chain {
            entry: env.server,
            group: Group::default(),
        },
        Contender::CopyBaseline | Contender::SpliceBaseline => {
            let [front, hop] = free_ports(2)?[..] else {
                bail!("two ports expected");
            };
            let splice = contender == Contender::SpliceBaseline;
            let prefix = if splice { "splice" } else { "copy" };
            let mut group = Group::default();
            for (hop_name, listen, to) in [
                ("b", format!("127.0.0.1:{hop}"), env.server.to_string()),
                (
                    "a",
                    format!("127.0.0.1:{front}"),
                    format!("127.0.0.1:{hop}"),
                ),
            ] {
                let mut command = Command::new(&env.self_exe);
                command.args(["relay", "--listen", &listen, "--to", &to]);
                if splice {
                    command.arg("--splice");
                }
                group.spawn(&format!("{prefix}-{hop_name}"), command, &env.logs)?;
            }
            Chain {
                entry: SocketAddr::from(([127, 0, 0, 1], front)),
                group,
            }
        }
        Contender::Haproxy | Contender::Nginx | Contender::Stunnel => {
            peers::start(contender, env, &dir)?
        }
        Contender::SidewallL4 => sidewall::start(env, &dir, "tcp", "shared")?,
        Contender::SidewallL4Dedicated => sidewall::start(env, &dir, "tcp", "perConnection")?,
        Contender::SidewallHttp => sidewall::start(env, &dir, "http", "shared")?,
        Contender::Target => bail!("target mode starts nothing; its chain is the user's"),
    };
    wait_ready(&mut chain, Framing::of(contender), Duration::from_secs(30)).await?;
    Ok(chain)
}

/// One echo through the chain, in the contender's framing, within a second.
async fn probe(entry: SocketAddr, framing: Framing) -> Result<()> {
    let attempt = async {
        let mut stream = framing.open(entry, ECHO).await?;
        let mut buffer = Vec::new();
        framing
            .exchange(&mut stream, &framing.request(4), 4, &mut buffer)
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no echo within 1 s")))
}

/// Waits until an echo makes it end to end, failing early if a proxy exits.
pub(crate) async fn wait_ready(chain: &mut Chain, framing: Framing, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        chain.group.check_alive()?;
        let error = match probe(chain.entry, framing).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if tokio::time::Instant::now() > deadline {
            return Err(error).context(format!("the chain at {} never echoed", chain.entry));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the certificates the peers read, in the file names `shared/peers/` used.
pub(crate) fn write_peer_certificates(pki: &Pki, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    write_file(&dir.join("ca.pem"), pki.root_pem(), 0o644)?;
    for (name, leaf) in [
        ("client", pki.peer("proxy-a")?),
        ("server", pki.peer("proxy-b")?),
    ] {
        write_file(&dir.join(format!("{name}.pem")), &leaf.chain_pem, 0o644)?;
        write_file(&dir.join(format!("{name}.key")), &leaf.key_pem, 0o600)?;
        let bundle = format!("{}{}", leaf.chain_pem, leaf.key_pem);
        write_file(&dir.join(format!("{name}-bundle.pem")), &bundle, 0o600)?;
    }
    Ok(())
}

/// The `copy-baseline` hop: accept on `listen`, connect `to`, `copy_bidirectional` (or, with
/// `splice`, the sidecar's `splice(2)` relay: the `splice-baseline` hop), on one thread. Runs
/// until killed.
pub(crate) fn relay(listen: SocketAddr, to: SocketAddr, splice: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect(to).await?;
                inbound.set_nodelay(true)?;
                outbound.set_nodelay(true)?;
                if splice {
                    sidewall_proxy::transport::forward_spliced(
                        inbound,
                        outbound,
                        Duration::from_secs(3600),
                    )
                    .await?;
                } else {
                    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    })
}
