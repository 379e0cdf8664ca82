//! `sidewall-bench`: the side-by-side benchmark of the forwarding path.
//!
//! This crate is not filled in yet. It will own the load generator (open- and closed-loop,
//! HDR histograms), the runner that starts `direct`, `copy-baseline`, `haproxy`, `nginx`,
//! `stunnel`, `sidewall-l4` and `sidewall-http` in interleaved rounds, and the report
//! (`report.md`, `report.json`, SVG plots) in which every figure is a ratio against the direct
//! baseline measured in the same run. Timings are never asserted in tests.
