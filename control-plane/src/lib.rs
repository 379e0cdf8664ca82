//! The Sidewall control plane: the root of trust of the mesh.
//!
//! - [`config`]: the strict YAML configuration and its defaults.
//! - [`ca`]: the certificate authority (root → intermediate → X.509-SVIDs built from scratch,
//!   taking only the public key from a CSR) and [`ca::csr`], the CSR checks.
//! - [`attestation`]: single-use join tokens bound to an identity, stored only as hashes.
//! - [`store`]: the `Store` trait, the embedded single-file store (redb) and the etcd store
//!   for several replicas (transactions, change feed).
//! - [`backup`]: `control-plane export / import`, a consistent copy of a store with the CA
//!   sealed, restorable into either store.
//! - [`api`]: the mTLS HTTP API (`/v1/certificates`, tokens, operators, revocations), with
//!   every error mapped to a JSON answer in one place.
//! - [`tls`]: the control plane's own rotating certificate and its rustls configuration.
//! - [`server`]: [`server::prepare`] (everything that can fail before a port is bound) and
//!   [`server::run`] (listeners and shutdown passed in).
//! - [`distribution`]: the policy set in force, followed from the store's change feed,
//!   per-workload snapshots, acks, the fleet view, observed flows; [`gitops`] watches a policy
//!   directory.
//! - [`detection`]: alerts on signs of lateral movement in what the sidecars report.
//! - [`admin`]: `/live`, `/ready`, `/metrics`; [`metric`]: every metric's name and help text.
//! - [`ui`]: the read-only dashboard (service graph, fleet, policies) and its JSON, on its own
//!   address.
//! - [`client`]: the operator's client for the API (used by the `sidewall` CLI).
//!
//! It depends on `sidewall-policies` for identities and SVID checks, and never on the proxy.

pub mod admin;
pub mod api;
pub mod attestation;
pub mod audit;
pub mod backup;
pub mod ca;
pub mod client;
pub mod config;
mod connection;
pub mod data_dir;
pub mod detection;
pub mod distribution;
pub mod gitops;
pub mod metric;
pub mod random;
pub mod ratelimit;
pub mod report;
pub mod server;
pub mod store;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;
pub mod ui;

/// The control plane's one clock: Unix seconds now (0 before 1970, saturating far ahead).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
