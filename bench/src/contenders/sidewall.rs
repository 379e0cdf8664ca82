//! `sidewall-l4` and `sidewall-http`: two sidecar processes (`sidewall-proxy`, the lean binary,
//! unless `--sidewall` names another build), one worker thread each.
//!
//! ```text
//! client → A's outbound route (127.0.0.1:front → service b, port 8080)
//!        → mTLS, port header → B's inbound (port 8080 → app 127.0.0.1:server) → server
//! ```
//!
//! For `sidewall-http` B declares port 8080 `protocol: http` (and A's directory says so): B
//! then parses each request, authorizes it, and forwards it over its pool of app connections.
//!
//! Each sidecar's state directory is seeded with an SVID from the run's CA, so it starts
//! without a control plane (`controlPlane.urls` points at a closed port it never needs before
//! 70 % of the 24 h lifetime). The snapshot comes from local files: a policy allowing A on B's
//! port 8080, and a directory entry for B. `limits.maxConnections` is raised from 10,000 to
//! 30,000 so that 10,000 idle connections fit beside the ones still closing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};
use sidewall_bench::pki::{seed_state_dir, spiffe_id};

use super::{Chain, Env, free_ports};
use crate::procs::Group;

/// The service port B serves and A's route asks for.
const PORT: u16 = 8080;

/// Finds the sidecar binary: `explicit` (`sidewall` or the lean `sidewall-proxy`), or the lean
/// `sidewall-proxy` next to this executable (the same `target/<profile>/`), building it there
/// with cargo if it is missing.
pub(crate) fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("--sidewall {}: no such file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| "this executable has no directory".to_owned())?;
    let binary = dir.join("sidewall-proxy");
    if binary.is_file() {
        return Ok(binary);
    }
    // target/<profile>/: "debug" is cargo's `dev` profile.
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let profile = if profile == "debug" { "dev" } else { profile };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!("building the sidewall-proxy binary (profile {profile}) next to this one…");
    let status = Command::new(cargo)
        .args(["build", "--bin", "sidewall-proxy", "--profile", profile])
        .current_dir(&workspace)
        .status()
        .map_err(|e| format!("cannot run cargo to build sidewall: {e}"))?;
    if status.success() && binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "sidewall-proxy is not at {} and `cargo build --bin sidewall-proxy --profile {profile}` did not put it there ({status})",
            binary.display()
        ))
    }
}

/// Whether `binary` is the lean `sidewall-proxy` (run as `sidewall-proxy --config`) rather than
/// `sidewall` (`sidewall proxy --config`).
pub(crate) fn is_lean(binary: &Path) -> bool {
    binary
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("sidewall-proxy"))
}

/// Starts B, then A; `protocol` is B's port protocol, `tcp` or `http`; `connections` is A's
/// `outbound.sidecarConnections` (`shared` or `perConnection`).
pub(super) fn start(env: &Env, dir: &Path, protocol: &str, connections: &str) -> Result<Chain> {
    let binary = match &env.sidewall {
        Ok(binary) => binary,
        Err(reason) => bail!("{reason}"),
    };
    let [front, a_inbound, a_admin, b_inbound, b_admin] = free_ports(5)?[..] else {
        bail!("five ports expected");
    };
    let (a, b) = (spiffe_id("a"), spiffe_id("b"));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join("bench.yaml"),
        format!(
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata:\n  name: bench-a-to-b\nspec:\n  \
             target: {b}\n  rules:\n    - action: allow\n      from: [{a}]\n      ports: [{PORT}]\n"
        ),
    )?;
    for (name, leaf) in [("a", env.pki.svid("a")?), ("b", env.pki.svid("b")?)] {
        seed_state_dir(
            &dir.join(format!("state-{name}")),
            &leaf,
            env.pki.root_pem(),
        )?;
    }
    let common = |name: &str, admin: u16| {
        format!(
            "identity: {id}\ncontrolPlane:\n  urls: [https://127.0.0.1:1]\n\
             stateDir: {dir}/state-{name}\nadmin:\n  listen: 127.0.0.1:{admin}\n\
             workerThreads: 1\nlimits: {{maxConnections: 30000}}\n",
            id = spiffe_id(name),
            dir = dir.display(),
        )
    };
    let config_b = format!(
        "{}inbound:\n  listen: 127.0.0.1:{b_inbound}\n  ports:\n    \
         - {{port: {PORT}, protocol: {protocol}, app: {server}}}\n\
         local:\n  policies: [{policies}]\n",
        common("b", b_admin),
        server = env.server,
        policies = policies.display(),
    );
    let config_a = format!(
        "{}inbound:\n  listen: 127.0.0.1:{a_inbound}\noutbound:\n  routes:\n    \
         - {{listen: 127.0.0.1:{front}, service: {b}, port: {PORT}}}\n  \
         sidecarConnections: {connections}\n\
         local:\n  policies: [{policies}]\n  directory:\n    \
         - {{identity: {b}, endpoints: [127.0.0.1:{b_inbound}], ports: [{{port: {PORT}, protocol: {protocol}}}]}}\n",
        common("a", a_admin),
        policies = policies.display(),
    );
    let mut group = Group::default();
    for (name, config) in [("sidewall-b", config_b), ("sidewall-a", config_a)] {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, config)?;
        let mut command = Command::new(binary);
        if !is_lean(binary) {
            command.arg("proxy");
        }
        command.arg("--config").arg(&file);
        group.spawn(name, command, &env.logs)?;
    }
    Ok(Chain {
        entry: std::net::SocketAddr::from(([127, 0, 0, 1], front)),
        group,
    })
}
