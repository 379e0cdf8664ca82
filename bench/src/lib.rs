//! `sidewall-bench`: the side-by-side benchmark of Sidewall's forwarding path against direct
//! connections and peer proxies (issue 8). Run it with
//! `cargo run --release -p sidewall-bench -- [--quick] [--only CONTENDER] [--out DIR] [--rounds N]`.
//!
//! The library holds what has no processes or sockets in it, so it can be unit-tested and used by
//! the criterion benchmark; the binary (`src/main.rs`) holds the runner, the contenders and the
//! load generator.
//!
//! - [`model`]: the names issue 8 fixes (contenders, modes, workloads, metrics) and their units.
//! - [`pki`]: a fresh root → intermediate → leaf chain per run (rcgen, ECDSA P-256); SVIDs
//!   seeded into sidecar state directories, peer certificates with the DNS name they check.
//! - [`report`]: rows `{contender, mode, workload, metric, value, unit, round}`, the summary
//!   (median, min, max), the machine, `report.json` and `report.md` with ratios to `direct`.
//! - [`goals`]: Sidewall's goals from the issue, judged on a summary.
//! - [`plot`]: one SVG bar chart per (workload, metric).
//! - [`exposition`]: Prometheus text read into samples, and what changed between two scrapes
//!   (target mode's "where time went").
//! - [`unbuffered`]: the copy loop on rustls' unbuffered API, measured against the sidecar's
//!   buffered one by the criterion benchmark.
//!
//! - [`host`]: a process's resident size and a free loopback port, for every binary here.
//!
//! Timings are never asserted in tests: a test checks the arithmetic and the shapes.

pub mod exposition;
pub mod floor;
pub mod goals;
pub mod host;
pub mod model;
pub mod pki;
pub mod plot;
pub mod report;
pub mod unbuffered;
