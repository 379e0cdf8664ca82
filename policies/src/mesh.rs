//! The mesh description `sidewall up` runs: services, their ports and protocols, whom they
//! call, where the policies are, and what must be observed. Parsed as strictly as policies
//! (unknown fields, bad identities and dangling references are errors with a position).

use std::time::Duration;

use serde::Deserialize;

use crate::http::Method;
use crate::identity::{SpiffeId, TrustDomain};
use crate::load::{LoadError, config_from_yaml};
use crate::policy::{Protocol, parse_duration_within};

/// A whole mesh description document (`kind: Mesh`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshDocument {
    /// Must be `sidewall.dev/v1`.
    pub api_version: String,
    /// Must be `Mesh`.
    pub kind: String,
    /// `name`.
    pub metadata: MeshMetadata,
    /// The mesh.
    pub spec: Mesh,
}

/// The mesh's name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshMetadata {
    /// A name for humans.
    pub name: String,
}

/// Services, policies and expectations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mesh {
    /// The trust domain. Default is `sidewall.local`.
    #[serde(default)]
    pub trust_domain: TrustDomain,
    /// The namespace every service lives in. Default is `demo`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The policy directory, relative to the mesh file.
    pub policies: String,
    /// The services.
    pub services: Vec<Service>,
    /// What `up --check` must observe.
    #[serde(default)]
    pub expectations: Vec<Expectation>,
}

fn default_namespace() -> String {
    "demo".to_owned()
}

/// One service of the mesh.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    /// Its name: the last segment of its identity.
    pub name: String,
    /// The ports it serves.
    pub ports: Vec<ServicePort>,
    /// The calls its demo app makes, at a steady rate.
    #[serde(default)]
    pub calls: Vec<Call>,
}

/// A port a service serves.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port.
    pub port: u16,
    /// Its protocol. Default is `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A call one service's app makes to another.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Call {
    /// The callee's name.
    pub to: String,
    /// The callee's port.
    pub port: u16,
    /// For HTTP ports: the method. Default is GET.
    #[serde(default)]
    pub method: Option<Method>,
    /// For HTTP ports: the path. Default is `/`.
    #[serde(default)]
    pub path: Option<String>,
    /// How often, e.g. `1s`. Default is 1 s.
    #[serde(default)]
    pub every: Option<String>,
}

impl Call {
    /// The interval between calls.
    pub fn interval(&self) -> Duration {
        self.every
            .as_deref()
            .and_then(|e| parse_duration_within(e, Duration::from_secs(3600)).ok())
            .unwrap_or(Duration::from_secs(1))
    }
}

/// One expectation: a flow and the outcome `up --check` must observe for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// The caller's name.
    pub from: String,
    /// The callee's name.
    pub to: String,
    /// The callee's port.
    pub port: u16,
    /// `allow`, `deny` or `audit`.
    pub expect: ExpectedOutcome,
}

/// What an expectation expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpectedOutcome {
    /// The calls succeed.
    Allow,
    /// The calls are refused and never reach the callee's app.
    Deny,
    /// The calls succeed and are recorded as "would deny".
    Audit,
}

/// Why a mesh description is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// It does not parse.
    #[error("{0}")]
    Parse(#[from] LoadError),
    /// It parses but is inconsistent.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

impl Mesh {
    /// Parses and checks a mesh description.
    pub fn parse(name: &str, text: &str) -> Result<Mesh, MeshError> {
        let document: MeshDocument = config_from_yaml(name, text)?;
        let invalid = |message: String| MeshError::Invalid {
            file: name.to_owned(),
            message,
        };
        if document.api_version != "sidewall.dev/v1" || document.kind != "Mesh" {
            return Err(invalid(
                "expected apiVersion: sidewall.dev/v1 and kind: Mesh".into(),
            ));
        }
        let mesh = document.spec;
        let mut names = std::collections::HashSet::new();
        for service in &mesh.services {
            mesh.identity(&service.name)
                .map_err(|e| invalid(format!("service {:?}: {e}", service.name)))?;
            if !names.insert(service.name.as_str()) {
                return Err(invalid(format!(
                    "service {:?} is listed twice",
                    service.name
                )));
            }
            if service.ports.is_empty() && service.calls.is_empty() {
                return Err(invalid(format!(
                    "service {:?} serves no port and calls nothing",
                    service.name
                )));
            }
        }
        let port_of = |name: &str, port: u16| {
            mesh.services
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.ports.iter().find(|p| p.port == port))
        };
        for service in &mesh.services {
            for call in &service.calls {
                if port_of(&call.to, call.port).is_none() {
                    return Err(invalid(format!(
                        "{} calls {}:{}, which no service serves",
                        service.name, call.to, call.port
                    )));
                }
                if let Some(every) = &call.every {
                    parse_duration_within(every, Duration::from_secs(3600))
                        .map_err(|e| invalid(format!("{} -> {}: {e}", service.name, call.to)))?;
                }
            }
        }
        for expectation in &mesh.expectations {
            let caller = mesh.services.iter().find(|s| s.name == expectation.from);
            let calls = caller.is_some_and(|s| {
                s.calls
                    .iter()
                    .any(|c| c.to == expectation.to && c.port == expectation.port)
            });
            if !calls {
                return Err(invalid(format!(
                    "expectation {} -> {}:{} has no matching call in the services",
                    expectation.from, expectation.to, expectation.port
                )));
            }
        }
        Ok(mesh)
    }

    /// The identity of a service: `spiffe://<td>/ns/<namespace>/svc/<name>`.
    pub fn identity(&self, name: &str) -> Result<SpiffeId, crate::IdentityError> {
        self.trust_domain
            .id(&format!("/ns/{}/svc/{name}", self.namespace))
    }

    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "apiVersion: sidewall.dev/v1\nkind: Mesh\nmetadata: {name: t}\nspec:\n  policies: policies\n  services:\n    - {name: a, ports: [{port: 80, protocol: http}], calls: [{to: b, port: 5432, every: 2s}]}\n    - {name: b, ports: [{port: 5432}]}\n  expectations:\n    - {from: a, to: b, port: 5432, expect: deny}\n";

    #[test]
    fn parses_and_checks_references() {
        let mesh = Mesh::parse("m.yaml", MESH).unwrap();
        assert_eq!(
            mesh.identity("a").unwrap().as_str(),
            "spiffe://sidewall.local/ns/demo/svc/a"
        );
        assert_eq!(mesh.services[0].calls[0].interval(), Duration::from_secs(2));
        let dangling = MESH.replace("to: b, port: 5432, every", "to: c, port: 5432, every");
        assert!(
            Mesh::parse("m.yaml", &dangling)
                .unwrap_err()
                .to_string()
                .contains("a calls c:5432, which no service serves")
        );
        let unknown = MESH.replace("policies: policies", "policies: policies\n  colour: red");
        assert!(
            Mesh::parse("m.yaml", &unknown)
                .unwrap_err()
                .to_string()
                .starts_with("m.yaml:6:3: spec: unknown field `colour`")
        );
        let bad_name = MESH.replace("name: b,", "name: B/x,");
        assert!(Mesh::parse("m.yaml", &bad_name).is_err());
    }
}
