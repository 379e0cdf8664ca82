//! `sidewall-policies`: the pure core that the sidecar and the control plane share.
//!
//! Nothing here does I/O beyond reading policy files in [`load`], spawns tasks, or knows about
//! sockets: every decision is a function of its inputs, so it can be tested as a table and
//! reproduced exactly by `sidewall policy check`.
//!
//! - [`identity`]: SPIFFE trust domains, IDs and the identity patterns policies use.
//! - [`http`]: HTTP request facts: methods, path and host patterns, and the path normalization
//!   the sidecar applies before matching.
//! - [`policy`]: the validated policy model (`Policy`, `Rule`, ports, modes, `onRevoke`).
//! - [`load`]: the only module that reads YAML: file discovery, multi-document files, strict
//!   parsing with `file:line:column` errors, duplicate names, size and rule caps.
//! - [`engine`]: the decision engine compiled from a policy set, indexed by target, with
//!   [`engine::Engine::explain`] for humans.
//! - [`testing`]: `PolicyTest` expectation documents and their runner.
//! - [`diff`]: what changed between two policy sets, policy by policy.
//! - [`mesh`]: the mesh description `sidewall up` runs.
//! - [`snapshot`]: the versioned snapshot the control plane sends each proxy (JSON).
//! - [`suggest`]: learning mode, the smallest allow-list that admits the observed flows.
//! - `svid` (feature `x509`): the X.509-SVID rules and the strict rustls verifiers built on
//!   them, shared by the sidecar and the control plane.

/// Implements `Display`, `Debug`, `FromStr`, `Serialize` and a validating `Deserialize` for a
/// type that is written as one string.
///
/// Validation happens inside the visitor so that errors carry the position of the offending
/// value: serde_yaml attaches line and column only to errors raised there.
macro_rules! text_type {
    ($type:ident, $parse:path, $error:ty, $expecting:literal) => {
        impl ::std::fmt::Display for $type {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::fmt::Debug for $type {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                write!(f, "{}({:?})", stringify!($type), self.as_str())
            }
        }

        impl ::std::str::FromStr for $type {
            type Err = $error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $parse(s)
            }
        }

        impl ::serde::Serialize for $type {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $type {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<Self, D::Error> {
                struct TextVisitor;
                impl ::serde::de::Visitor<'_> for TextVisitor {
                    type Value = $type;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        f.write_str(concat!("a ", $expecting))
                    }
                    fn visit_str<E: ::serde::de::Error>(self, v: &str) -> Result<$type, E> {
                        $parse(v).map_err(|e| {
                            E::custom(format_args!(
                                concat!("invalid ", $expecting, " {:?}: {}"),
                                v, e
                            ))
                        })
                    }
                }
                deserializer.deserialize_str(TextVisitor)
            }
        }
    };
}
pub(crate) use text_type;

pub mod diff;
pub mod engine;
pub mod http;
pub mod identity;
pub mod load;
pub mod mesh;
pub mod policy;
pub mod snapshot;
pub mod suggest;
#[cfg(feature = "x509")]
pub mod svid;
pub mod testing;
pub mod wire;

pub use engine::{Decision, Engine, Outcome};
pub use identity::{IdentityError, IdentityPattern, SpiffeId, TrustDomain};
pub use policy::{Policy, PolicySet, Protocol};
