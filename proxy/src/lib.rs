//! The Sidewall sidecar: the only way into and out of a service.
//!
//! This crate is not filled in yet. It will own, as `ARCHITECTURE.md` lays out:
//!
//! - `inbound`: the mTLS listener; strict SPIFFE X.509-SVID verification of the peer, then a
//!   connection decision from [`sidewall_policies::engine::Engine`] before a byte reaches the app;
//! - `outbound`: local routes (explicit or transparent) to other services over mTLS, checking
//!   that the server presents the identity expected for that service;
//! - `identity`: the key pair generated here (only a CSR leaves), renewal at 70 % of the
//!   lifetime, and the watch channel that swaps rustls configs;
//! - `transport`: the forwarding copy loop behind one small interface (the fast path);
//! - `admin`: `/live`, `/ready`, `/metrics`, `/config`.
//!
//! It depends on `sidewall-policies` for the decision engine and the snapshot contract, and
//! never on the control plane.
