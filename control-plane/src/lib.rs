//! The Sidewall control plane: the root of trust of the mesh.
//!
//! This crate is not filled in yet. It will own, as `ARCHITECTURE.md` lays out:
//!
//! - `ca`: the certificate authority (root → intermediate → workload X.509-SVIDs built from
//!   scratch with rcgen, taking only the public key from a CSR);
//! - `attestation`: single-use join tokens bound to an identity, stored only as hashes;
//! - `store`: the `Store` trait with an embedded single-file store (default) and etcd;
//! - `api`: the mTLS HTTP API (`/v1/certificates`, `/v1/snapshots/watch`, `/v1/acks`, operator
//!   routes) and the admin listener (`/live`, `/ready`, `/metrics`);
//! - `distribution`: versioned [`sidewall_policies::snapshot::Snapshot`]s per workload, acks and
//!   the fleet view.
//!
//! It depends on `sidewall-policies` for identities, policies and the snapshot contract, and
//! never on the proxy.
