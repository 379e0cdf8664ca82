//! The control plane's data directory, one place for its layout:
//!
//! ```text
//! <data-dir>/
//!   control-plane.json   where the API listens and the trust domain, for the CLI (Record)
//!   trust-bundle.pem     the roots, for the CLI to verify the control plane
//!   operators/NAME.pem   operator credentials (NAME.key 0600); `admin` is made at start
//!   ca/                  the CA's certificates and keys (crate::ca::ca_dir)
//!   store.redb           the embedded store (not with --store etcd://)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the control plane records in its data directory so the CLI can find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `https://host:port` of the API.
    pub api_url: String,
    /// The trust domain.
    pub trust_domain: String,
    /// The process id.
    pub pid: u32,
}

/// The file the control plane records itself in.
pub fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control-plane.json")
}

/// The operator credential files for `name`.
pub fn operator_paths(data_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = operators_dir(data_dir);
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// The trust bundle file the CLI uses to verify the control plane.
pub fn bundle_path(data_dir: &Path) -> PathBuf {
    data_dir.join("trust-bundle.pem")
}

/// The roots CA rotations retired (PEM): trusted for nothing but checking audit checkpoints
/// they signed before (`sidewall audit verify`).
pub fn retired_roots_path(data_dir: &Path) -> PathBuf {
    data_dir.join("retired-roots.pem")
}

/// The directory of operator credentials.
pub fn operators_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("operators")
}

/// The embedded store's file.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.redb")
}
