//! The Sidewall sidecar: the only way into and out of a service.
//!
//! - [`config`]: the strict YAML configuration.
//! - [`identity`]: the key pair generated here (only a CSR leaves), joining with a token
//!   (pinning the CA), renewal between 60 % and 75 % of the lifetime with a new key each time, the state directory.
//! - [`distribution`]: snapshots from the control plane (register, watch, ack, flow reports).
//! - [`flows`]: what was decided, by flow, between two reports.
//! - [`snapshot`]: the snapshot enforced, or built from local files (`local:`).
//! - [`tls`]: rustls configurations from the credential and the snapshot; strict SVID checks.
//! - [`inbound`]: the mTLS listener; a decision before any byte reaches the app.
//! - [`http`]: HTTP ports: request checks, normalization, a decision per request.
//! - [`outbound`]: explicit routes to other services, verifying the expected identity.
//! - [`transport`]: the port header between sidecars and the forwarding copy.
//! - [`admit`]: the one admission path: a peer connection decided on the snapshot in force.
//! - [`connections`]: open connections, re-checked when the snapshot changes (`onRevoke`).
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/config`; [`metric`]: every metric's name and
//!   help text.
//! - [`redirect`]: the iptables rules of transparent mode (`sidewall iptables install`).
//! - [`process`]: logging, the metrics recorder with the `process_*` gauges, the open-files
//!   limit, shutdown signals, and `sidewall proxy` itself ([`process::run_sidecar`]), shared by
//!   both binaries that run a sidecar.
//!
//! [`Context`] is what every task shares (`context.rs`); [`run`] (`sidecar.rs`) takes bound
//! listeners and a shutdown future. It depends on `sidewall-policies` for
//! the engine, the snapshot and the SVID rules, and never on the control plane.

pub mod admin;
pub mod admit;
pub mod config;
pub mod connections;
pub mod distribution;
pub mod flows;
pub mod h2frames;
mod handshakes;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod listen;
pub mod lograte;
pub mod metric;
mod mux;
pub mod outbound;
mod pool;
mod probe;
pub mod process;
pub mod redirect;
pub mod snapshot;
pub mod tls;
pub mod transport;

/// Entry points for the fuzz targets in `fuzz/` into what is not public otherwise; not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Feeds `input` to the HTTP/1 request framing scanner in pieces of `step` bytes; which of
    /// the first `count` requests it would refuse.
    pub fn http_framing(input: &[u8], step: usize, count: usize) -> Vec<bool> {
        crate::http::framing::refused(input, step, count)
    }
}

mod context;
mod sidecar;

pub use context::Context;
pub use sidecar::{Listeners, bind, run};
