//! `PolicyTest` documents: expectations a team writes next to its policies, and the runner
//! that checks them against the engine (`sidewall policy test`).
//!
//! A case with `method`, `path` or `host` is a request decision on an HTTP port (a missing
//! method means `GET`, a missing path `/`); `protocol: http` without them is a connection
//! decision on an HTTP port; anything else is a connection decision on a TCP port. Paths are
//! normalized exactly as the sidecar normalizes them.

use std::fmt;

use crate::engine::{Decision, Engine, Outcome, Query, Request, Subject};
use crate::http::{normalize_path, valid_host};
use crate::identity::SpiffeId;
use crate::policy::Protocol;

/// The outcome a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// `ALLOW`.
    Allow,
    /// `DENY`.
    Deny,
    /// `AUDIT` (allowed, recorded as "would deny").
    Audit,
}

impl Expectation {
    fn outcome(self) -> Outcome {
        match self {
            Expectation::Allow => Outcome::Allow,
            Expectation::Deny => Outcome::Deny,
            Expectation::Audit => Outcome::Audit,
        }
    }
}

/// Why a test case is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaseError {
    /// `protocol: tcp` together with request facts.
    #[error("a case with method, path or host is an HTTP request; it cannot say protocol: tcp")]
    RequestOnTcp,
    /// The method is not an HTTP token.
    #[error("{0:?} is not an HTTP method")]
    Method(String),
}

/// The request part of a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseRequest {
    /// Method (default `GET`).
    pub method: String,
    /// Path as written (default `/`); normalized when the case runs.
    pub path: String,
    /// Host, if any.
    pub host: Option<String>,
}

/// One expectation: a question for the engine and the outcome it must give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCase {
    /// The peer.
    pub from: SpiffeId,
    /// The target.
    pub to: SpiffeId,
    /// The target's port.
    pub port: u16,
    /// The port's protocol.
    pub protocol: Protocol,
    /// Set for request decisions.
    pub request: Option<CaseRequest>,
    /// The expected outcome.
    pub expect: Expectation,
}

impl TestCase {
    /// Builds a case from the fields of a `PolicyTest` document.
    #[allow(clippy::too_many_arguments)] // mirrors the document's fields one to one
    pub fn new(
        from: SpiffeId,
        to: SpiffeId,
        port: u16,
        protocol: Option<Protocol>,
        method: Option<String>,
        path: Option<String>,
        host: Option<String>,
        expect: Expectation,
    ) -> Result<Self, CaseError> {
        let request = if method.is_some() || path.is_some() || host.is_some() {
            if protocol == Some(Protocol::Tcp) {
                return Err(CaseError::RequestOnTcp);
            }
            let method = method.unwrap_or_else(|| "GET".to_owned());
            if method.is_empty()
                || !method
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                return Err(CaseError::Method(method));
            }
            Some(CaseRequest {
                method,
                path: path.unwrap_or_else(|| "/".to_owned()),
                host,
            })
        } else {
            None
        };
        let protocol = if request.is_some() {
            Protocol::Http
        } else {
            protocol.unwrap_or_default()
        };
        Ok(Self {
            from,
            to,
            port,
            protocol,
            request,
            expect,
        })
    }

    /// Runs the case: the engine's decision, or why the sidecar would refuse the request
    /// before any policy (an invalid path gets `400`).
    pub fn decide(&self, engine: &Engine) -> Result<Decision, String> {
        let subject_path;
        let subject = match &self.request {
            None => Subject::Connection(self.protocol),
            Some(request) => {
                subject_path = normalize_path(&request.path)
                    .map_err(|e| format!("path {:?} is refused with 400: {e}", request.path))?;
                if let Some(host) = request.host.as_deref().filter(|h| !valid_host(h)) {
                    return Err(format!("host {host:?} is refused with 400"));
                }
                Subject::Request(Request {
                    method: &request.method,
                    path: &subject_path,
                    host: request.host.as_deref(),
                })
            }
        };
        Ok(engine.decide(&Query {
            peer: &self.from,
            target: &self.to,
            port: self.port,
            subject,
        }))
    }
}

impl fmt::Display for TestCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} port {}", self.from, self.to, self.port)?;
        match &self.request {
            Some(r) => {
                write!(f, " {} {}", r.method, r.path)?;
                if let Some(host) = &r.host {
                    write!(f, " host={host}")?;
                }
                Ok(())
            }
            None => write!(f, " ({} connection)", self.protocol),
        }
    }
}

/// A `PolicyTest` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    /// `metadata.name`.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// The cases, in order.
    pub cases: Vec<TestCase>,
}

/// A case whose outcome was not the expected one.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The test's name and file.
    pub test: String,
    /// 1-based case number within its test.
    pub case: usize,
    /// The case itself, in words.
    pub description: String,
    /// What was expected.
    pub expected: Expectation,
    /// What the engine said (its decision line), or why the request would be refused.
    pub actual: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected = match self.expected {
            Expectation::Allow => "ALLOW",
            Expectation::Deny => "DENY",
            Expectation::Audit => "AUDIT",
        };
        write!(
            f,
            "FAIL {} case {}: {}: expected {expected}, got {}",
            self.test,
            self.case,
            self.description,
            self.actual.replace('\n', "; ")
        )
    }
}

/// The result of running tests.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Cases run.
    pub cases: usize,
    /// Those that failed.
    pub failures: Vec<Failure>,
}

/// Runs every case of every test against `engine`.
pub fn run(engine: &Engine, tests: &[PolicyTest]) -> Report {
    let mut report = Report::default();
    for test in tests {
        for (i, case) in test.cases.iter().enumerate() {
            report.cases += 1;
            let actual = case.decide(engine);
            let passed = matches!(&actual, Ok(d) if d.outcome == case.expect.outcome());
            if !passed {
                report.failures.push(Failure {
                    test: format!("{} ({})", test.name, test.file),
                    case: i + 1,
                    description: case.to_string(),
                    expected: case.expect,
                    actual: match actual {
                        Ok(decision) => decision.to_string(),
                        Err(refused) => refused,
                    },
                });
            }
        }
    }
    report
}
