//! One module per `sidewall` subcommand.

pub(crate) mod policy;
