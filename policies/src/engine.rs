//! The decision engine: a policy set compiled for fast, pure decisions.
//!
//! [`Engine::decide`] is a function of (policies, peer, target, port, protocol or request) and
//! nothing else. Policies are indexed by target, so one decision only looks at the policies
//! whose target pattern can match: the exact target, and the `/*` and `/**` patterns at each of
//! its ancestors. One pass over those rules computes both the enforced decision and the shadow
//! decision of audit policies; nothing is allocated unless a rule decides (a name is cloned).
//!
//! Semantics (docs/policy.md is the reference):
//! - TCP port, connection: any matching deny rule denies (with or without `http`); otherwise a
//!   matching allow rule *without* `http` allows; otherwise deny.
//! - HTTP port, connection: a matching deny rule without `http` denies; otherwise any matching
//!   allow rule admits the connection, whose requests are then decided one by one.
//! - Request: any matching deny rule denies; otherwise any matching allow rule allows.
//! - Modes: enforce policies decide; audit policies only add a shadow decision. A target that
//!   only audit policies match is not enforced yet: allowed, and recorded as `Audit` when the
//!   shadow decision denies. A target no policy matches is denied.

use std::collections::HashMap;
use std::fmt;

use crate::identity::{SpiffeId, Wildcard};
use crate::policy::{Action, HttpMismatch, Mode, Policy, PolicyName, PolicySet, Protocol, Rule};

mod explain;
pub use explain::{Explanation, PolicyTrace, RuleTrace};

/// The facts of an HTTP request, as the sidecar sees them after normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method, case-sensitive (`GET`).
    pub method: &'a str,
    /// The normalized path without query ([`crate::http::normalize_path`]).
    pub path: &'a str,
    /// The Host header or `:authority`, if any.
    pub host: Option<&'a str>,
}

/// What is being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A new connection to a port the target serves as `protocol`.
    Connection(Protocol),
    /// One request on an HTTP port.
    Request(Request<'a>),
}

/// One question for the engine: may `peer` reach `target` on `port` for `subject`?
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The authenticated peer identity.
    pub peer: &'a SpiffeId,
    /// The identity of the service being reached.
    pub target: &'a SpiffeId,
    /// The target's service port.
    pub port: u16,
    /// A connection or a request.
    pub subject: Subject<'a>,
}

/// The outcome a sidecar acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Forward.
    Allow,
    /// Refuse.
    Deny,
    /// Forward, but record that policy would deny (the target is only covered by audit
    /// policies).
    Audit,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Allow => "ALLOW",
            Outcome::Deny => "DENY",
            Outcome::Audit => "AUDIT",
        })
    }
}

/// Allow or deny, as a rule set decides before modes are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Some allow rule matched and no deny rule did.
    Allow,
    /// A deny rule matched, or nothing allowed (default deny).
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// The rule that decided: a policy name and a 1-based rule number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// The policy.
    pub policy: PolicyName,
    /// The rule, numbered from 1 as written.
    pub rule: usize,
}

/// A shadow decision (enforce and audit policies together) that differs from the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shadow {
    /// What the audit policies would make of it.
    pub verdict: Verdict,
    /// The deciding rule, or `None` for the default deny.
    pub reason: Option<RuleRef>,
}

/// A decision: the outcome, the rule that decided it (`None`: default deny) and, when audit
/// policies would decide differently, their shadow decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decision {
    /// What the sidecar does.
    pub outcome: Outcome,
    /// The deciding rule; `None` means default deny.
    pub reason: Option<RuleRef>,
    /// Set when the shadow decision differs from the outcome.
    pub shadow: Option<Shadow>,
}

impl Decision {
    /// Whether traffic is forwarded (`Allow` or `Audit`).
    pub fn permits(&self) -> bool {
        self.outcome != Outcome::Deny
    }
}

fn write_reason(f: &mut fmt::Formatter<'_>, reason: &Option<RuleRef>) -> fmt::Result {
    match reason {
        Some(r) => write!(f, "policy={} rule={}", r.policy, r.rule),
        None => f.write_str("policy=- rule=-"),
    }
}

/// `ALLOW policy=<name> rule=<n>`, then `audit: would <x> policy=<name> rule=<n>` on its own
/// line when the shadow decision differs.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.outcome)?;
        write_reason(f, &self.reason)?;
        if let Some(shadow) = &self.shadow {
            write!(f, "\naudit: would {} ", shadow.verdict)?;
            write_reason(f, &shadow.reason)?;
        }
        Ok(())
    }
}

/// Why a rule did not match a query (used by [`Engine::explain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The peer matches none of the rule's `from` patterns.
    Peer,
    /// The port is not in the rule's `ports`.
    Port,
    /// An allow rule with `http` never opens a plain TCP port.
    HttpRuleOnTcpPort,
    /// A deny rule with `http` is applied per request, not to the connection.
    DecidedPerRequest,
    /// The request does not match the rule's `http` part.
    Http(HttpMismatch),
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Miss::Peer => "peer not in `from`",
            Miss::Port => "port not in `ports`",
            Miss::HttpRuleOnTcpPort => "rule has `http`, which never opens a TCP port",
            Miss::DecidedPerRequest => "deny rule with `http` applies per request",
            Miss::Http(HttpMismatch::Method) => "method not in `methods`",
            Miss::Http(HttpMismatch::ConnectNotNamed) => "CONNECT must be named in `methods`",
            Miss::Http(HttpMismatch::Path) => "path matches no pattern in `paths`",
            Miss::Http(HttpMismatch::Host) => "host matches no pattern in `hosts`",
        })
    }
}

/// Whether `rule` applies to `query`; the single definition shared by decisions and traces.
fn check_rule(rule: &Rule, query: &Query<'_>) -> Result<(), Miss> {
    if !rule.from.iter().any(|pattern| pattern.matches(query.peer)) {
        return Err(Miss::Peer);
    }
    if !rule.covers_port(query.port) {
        return Err(Miss::Port);
    }
    match (query.subject, &rule.http, rule.action) {
        (Subject::Connection(Protocol::Tcp), Some(_), Action::Allow) => {
            Err(Miss::HttpRuleOnTcpPort)
        }
        (Subject::Connection(Protocol::Http), Some(_), Action::Deny) => {
            Err(Miss::DecidedPerRequest)
        }
        (Subject::Connection(_), _, _) => Ok(()),
        (Subject::Request(request), Some(http), _) => http
            .check(request.method, request.path, request.host)
            .map_err(Miss::Http),
        (Subject::Request(request), None, Action::Allow) if request.method == "CONNECT" => {
            Err(Miss::Http(HttpMismatch::ConnectNotNamed))
        }
        (Subject::Request(_), None, _) => Ok(()),
    }
}

/// The lowest (policy, rule) position of a matching deny and allow rule.
#[derive(Default, Clone, Copy)]
struct Best {
    deny: Option<(u32, u32)>,
    allow: Option<(u32, u32)>,
}

impl Best {
    fn record(&mut self, action: Action, at: (u32, u32)) {
        let slot = match action {
            Action::Deny => &mut self.deny,
            Action::Allow => &mut self.allow,
        };
        if slot.is_none_or(|current| at < current) {
            *slot = Some(at);
        }
    }

    fn verdict(&self) -> (Verdict, Option<(u32, u32)>) {
        match (self.deny, self.allow) {
            (Some(deny), _) => (Verdict::Deny, Some(deny)),
            (None, Some(allow)) => (Verdict::Allow, Some(allow)),
            (None, None) => (Verdict::Deny, None),
        }
    }
}

/// Policies whose target pattern has one fixed prefix, by wildcard.
#[derive(Default)]
struct Slot {
    exact: Vec<u32>,
    one: Vec<u32>,
    many: Vec<u32>,
}

/// A compiled policy set. Build one per snapshot; deciding takes `&self` only.
pub struct Engine {
    set: PolicySet,
    /// Target prefix (`spiffe://td/ns/a`) → policies whose target has that fixed part.
    index: HashMap<Box<str>, Slot>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("policies", &self.set.policies().len())
            .finish()
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(PolicySet::default())
    }
}

impl Engine {
    /// Compiles a policy set.
    pub fn new(set: PolicySet) -> Self {
        let mut index: HashMap<Box<str>, Slot> = HashMap::new();
        for (i, policy) in set.policies().iter().enumerate() {
            // A policy set never holds more than u32::MAX policies: the loader caps rules (and
            // so policies that matter) far below that. Saturating keeps this total anyway.
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let slot = index.entry(policy.target.prefix().into()).or_default();
            match policy.target.wildcard() {
                Wildcard::None => slot.exact.push(i),
                Wildcard::One => slot.one.push(i),
                Wildcard::Many => slot.many.push(i),
            }
        }
        Self { set, index }
    }

    /// The policy set this engine was compiled from.
    pub fn policy_set(&self) -> &PolicySet {
        &self.set
    }

    /// Calls `f` with the index of every policy whose target matches `target`.
    fn for_each_candidate(&self, target: &SpiffeId, mut f: impl FnMut(usize)) {
        let id = target.as_str();
        let mut visit = |indices: &[u32]| indices.iter().for_each(|&i| f(i as usize));
        if let Some(slot) = self.index.get(id) {
            visit(&slot.exact);
        }
        let path_start = id.len() - target.path().len();
        let mut end = id.len();
        let mut segments_below = 0;
        while let Some(slash) = id[path_start..end].rfind('/') {
            let prefix_end = path_start + slash;
            segments_below += 1;
            if let Some(slot) = self.index.get(&id[..prefix_end]) {
                if segments_below == 1 {
                    visit(&slot.one);
                }
                visit(&slot.many);
            }
            end = prefix_end;
        }
    }

    /// The policies whose target matches `target`, sorted by name.
    pub fn policies_for(&self, target: &SpiffeId) -> Vec<&Policy> {
        let mut indices = Vec::new();
        self.for_each_candidate(target, |i| indices.push(i));
        indices.sort_unstable();
        indices
            .into_iter()
            .map(|i| &self.set.policies()[i])
            .collect()
    }

    /// The policies that apply to `workload`, as a set of their own (what its snapshot
    /// carries).
    pub fn set_for(&self, workload: &SpiffeId) -> PolicySet {
        let mine: Vec<Policy> = self.policies_for(workload).into_iter().cloned().collect();
        // A subset of a valid set has unique names.
        PolicySet::new(mine).unwrap_or_default()
    }

    /// Whether some policy for `target` has an HTTP path pattern that mentions `path`
    /// ([`crate::http::PathPattern::mentions`]).
    pub fn mentions_path(&self, target: &SpiffeId, path: &str) -> bool {
        self.policies_for(target).iter().any(|policy| {
            policy.rules.iter().any(|rule| {
                rule.http
                    .as_ref()
                    .and_then(|http| http.paths.as_ref())
                    .is_some_and(|paths| paths.as_slice().iter().any(|p| p.mentions(path)))
            })
        })
    }

    /// Whether `workload` may call `service` at all, so that its snapshot lists the service:
    /// some allow rule's `from` matches it, or the service is covered only by audit policies
    /// (not enforced yet, so anyone may reach it).
    pub fn may_call(&self, workload: &SpiffeId, service: &SpiffeId) -> bool {
        let policies = self.policies_for(service);
        let audit_only = !policies.is_empty() && policies.iter().all(|p| p.mode == Mode::Audit);
        audit_only
            || policies.iter().any(|policy| {
                policy.rules.iter().any(|rule| {
                    rule.action == Action::Allow && rule.from.iter().any(|p| p.matches(workload))
                })
            })
    }

    fn rule_ref(&self, at: Option<(u32, u32)>) -> Option<RuleRef> {
        at.map(|(policy, rule)| RuleRef {
            policy: self.set.policies()[policy as usize].name.clone(),
            rule: rule as usize + 1,
        })
    }

    /// Decides a query.
    pub fn decide(&self, query: &Query<'_>) -> Decision {
        let mut enforced = Best::default();
        let mut all = Best::default();
        let (mut has_enforce, mut has_audit) = (false, false);
        let policies = self.set.policies();
        self.for_each_candidate(query.target, |i| {
            let policy = &policies[i];
            let audit = policy.mode == Mode::Audit;
            has_audit |= audit;
            has_enforce |= !audit;
            for (r, rule) in policy.rules.iter().enumerate() {
                if check_rule(rule, query).is_ok() {
                    // Positions fit in u32: see `Engine::new`.
                    let at = (i as u32, u32::try_from(r).unwrap_or(u32::MAX));
                    all.record(rule.action, at);
                    if !audit {
                        enforced.record(rule.action, at);
                    }
                }
            }
        });
        if has_enforce {
            let (verdict, at) = enforced.verdict();
            let shadow = if has_audit {
                let (shadow_verdict, shadow_at) = all.verdict();
                (shadow_verdict != verdict).then(|| Shadow {
                    verdict: shadow_verdict,
                    reason: self.rule_ref(shadow_at),
                })
            } else {
                None
            };
            let outcome = match verdict {
                Verdict::Allow => Outcome::Allow,
                Verdict::Deny => Outcome::Deny,
            };
            Decision {
                outcome,
                reason: self.rule_ref(at),
                shadow,
            }
        } else if has_audit {
            let (verdict, at) = all.verdict();
            Decision {
                outcome: match verdict {
                    Verdict::Allow => Outcome::Allow,
                    Verdict::Deny => Outcome::Audit,
                },
                reason: self.rule_ref(at),
                shadow: None,
            }
        } else {
            Decision {
                outcome: Outcome::Deny,
                reason: None,
                shadow: None,
            }
        }
    }

    /// Decides a new connection to `target:port`, a port the target serves as `protocol`.
    pub fn decide_connection(
        &self,
        peer: &SpiffeId,
        target: &SpiffeId,
        port: u16,
        protocol: Protocol,
    ) -> Decision {
        self.decide(&Query {
            peer,
            target,
            port,
            subject: Subject::Connection(protocol),
        })
    }

    /// Decides one HTTP request on an HTTP port of `target`.
    pub fn decide_request(
        &self,
        peer: &SpiffeId,
        target: &SpiffeId,
        port: u16,
        request: Request<'_>,
    ) -> Decision {
        self.decide(&Query {
            peer,
            target,
            port,
            subject: Subject::Request(request),
        })
    }
}

#[cfg(test)]
mod tests;
