//! The snapshot the sidecar enforces, and where it comes from.
//!
//! Normally snapshots come from the control plane ([`crate::distribution`]). With `local:` in
//! the config they are built from local files instead: the policy files are loaded with the
//! same strict loader as `sidewall policy validate`, re-read when they change, and a set that
//! does not load never replaces the last good one.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sidewall_policies::load::{LoadOptions, load_paths};
use sidewall_policies::snapshot::{
    Revocations, Schema, ServiceEntry, ServicePort, Snapshot, SnapshotVersion,
};
use sidewall_policies::{Engine, SpiffeId};
use tokio::sync::watch;

use crate::config::LocalConfig;

/// How often local files are checked for changes.
const POLL: Duration = Duration::from_millis(500);

/// A snapshot and the engine compiled from it.
#[derive(Debug)]
pub struct Active {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Its policies, compiled.
    pub engine: Engine,
    /// Its directory's addresses, parsed once (index = the directory entry's).
    pub hosts: Vec<Hosts>,
}

/// Where one directory entry's service can be reached: its endpoints' hosts with the ports it
/// serves, and the extra addresses (virtual IPs) declared for it.
#[derive(Debug, Default)]
pub struct Hosts {
    /// The endpoints' IP addresses.
    pub ips: HashSet<IpAddr>,
    /// The ports the service serves.
    pub ports: HashSet<u16>,
    /// Its extra addresses.
    pub addresses: HashSet<SocketAddr>,
}

impl Hosts {
    fn of(entry: &ServiceEntry) -> Self {
        Self {
            ips: entry
                .endpoints
                .iter()
                .filter_map(|e| e.parse::<SocketAddr>().ok())
                .map(|a| a.ip())
                .collect(),
            ports: entry.ports.iter().map(|p| p.port).collect(),
            addresses: entry
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
        }
    }

    /// Whether `destination` is this service: one of its ports on one of its endpoints' hosts,
    /// or one of its addresses.
    pub fn claims(&self, destination: SocketAddr) -> bool {
        (self.ports.contains(&destination.port()) && self.ips.contains(&destination.ip()))
            || self.addresses.contains(&destination)
    }
}

impl Active {
    /// Compiles a snapshot's policies and parses its directory's addresses.
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            engine: Engine::new(snapshot.policies.clone()),
            hosts: snapshot.directory.iter().map(Hosts::of).collect(),
            snapshot,
        }
    }
}

/// The current snapshot, `None` until the first one loads.
pub type SnapshotWatch = watch::Receiver<Option<Arc<Active>>>;

fn build(local: &LocalConfig, workload: &SpiffeId, counter: u64) -> Result<Active, String> {
    let loaded = load_paths(&local.policies, &LoadOptions::default()).map_err(|e| e.to_string())?;
    let policies = Engine::new(loaded.policies).set_for(workload);
    let directory = local
        .directory
        .iter()
        .map(|service| ServiceEntry {
            identity: service.identity.clone(),
            endpoints: service.endpoints.clone(),
            ports: service
                .ports
                .iter()
                .map(|p| ServicePort {
                    port: p.port,
                    protocol: p.protocol,
                    path_parameters: p.path_parameters,
                })
                .collect(),
            addresses: Vec::new(),
        })
        .collect();
    let snapshot = Snapshot {
        schema: Schema::default(),
        version: SnapshotVersion {
            epoch: "local".into(),
            counter,
        },
        workload: workload.clone(),
        policies,
        trust_bundles: BTreeMap::new(),
        signing_ca: None,
        revocations: Revocations::default(),
        directory,
    };
    Ok(Active::new(snapshot))
}

/// Sizes and modification times of the files under the policy paths.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    fn walk(path: &std::path::Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
        let Ok(metadata) = std::fs::metadata(path) else {
            out.push((path.to_path_buf(), 0, None));
            return;
        };
        if metadata.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                let mut entries: Vec<_> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                entries.sort();
                for entry in entries {
                    walk(&entry, out);
                }
            }
        } else {
            out.push((path.to_path_buf(), metadata.len(), metadata.modified().ok()));
        }
    }
    let mut out = Vec::new();
    for path in paths {
        walk(path, &mut out);
    }
    out
}

/// Loads the local snapshot, then reloads it whenever the files change, until `stop`.
pub async fn watch_local(
    local: LocalConfig,
    workload: SpiffeId,
    sender: watch::Sender<Option<Arc<Active>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = Vec::new();
    let mut counter = 0;
    loop {
        let now = fingerprint(&local.policies);
        if now != seen {
            seen = now;
            match build(&local, &workload, counter + 1) {
                Ok(active) => {
                    counter += 1;
                    tracing::info!(
                        version = counter,
                        policies = active.snapshot.policies.policies().len(),
                        "snapshot applied"
                    );
                    metrics::gauge!(crate::metric::SNAPSHOT_VERSION).set(counter as f64);
                    metrics::counter!(crate::metric::SNAPSHOTS_APPLIED).increment(1);
                    let _ = sender.send(Some(Arc::new(active)));
                }
                Err(errors) => {
                    metrics::counter!(crate::metric::SNAPSHOTS_REJECTED).increment(1);
                    tracing::error!(%errors, "policy files do not load; keeping the last good snapshot");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}
