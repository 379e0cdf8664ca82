//! A human-readable trace of a decision: every policy considered, every rule, and why each
//! matched or not. Slow by design (it allocates); `sidewall policy check --explain` prints it.

use std::fmt;

use super::{Decision, Engine, Miss, Query, Subject, check_rule};
use crate::policy::{Action, Mode, PolicyName};

/// How one rule fared.
#[derive(Debug, Clone)]
pub struct RuleTrace {
    /// 1-based rule number.
    pub rule: usize,
    /// The rule's action.
    pub action: Action,
    /// `Ok` when it matched, otherwise the first reason it did not.
    pub result: Result<(), Miss>,
}

/// How one policy whose target matched fared.
#[derive(Debug, Clone)]
pub struct PolicyTrace {
    /// The policy.
    pub policy: PolicyName,
    /// Its target pattern as written.
    pub target: String,
    /// Its mode.
    pub mode: Mode,
    /// Each rule in order.
    pub rules: Vec<RuleTrace>,
}

/// The trace of one decision.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The question, in words.
    pub query: String,
    /// The policies whose target matched, sorted by name.
    pub policies: Vec<PolicyTrace>,
    /// The decision the engine made.
    pub decision: Decision,
}

impl Engine {
    /// Decides `query` and records why.
    pub fn explain(&self, query: &Query<'_>) -> Explanation {
        let policies = self
            .policies_for(query.target)
            .into_iter()
            .map(|policy| PolicyTrace {
                policy: policy.name.clone(),
                target: policy.target.to_string(),
                mode: policy.mode,
                rules: policy
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| RuleTrace {
                        rule: i + 1,
                        action: rule.action,
                        result: check_rule(rule, query),
                    })
                    .collect(),
            })
            .collect();
        let subject = match query.subject {
            Subject::Connection(protocol) => format!("connection to a {protocol} port"),
            Subject::Request(r) => format!(
                "request {} {} host={}",
                r.method,
                r.path,
                r.host.unwrap_or("-")
            ),
        };
        Explanation {
            query: format!(
                "{} -> {} port {}: {subject}",
                query.peer, query.target, query.port
            ),
            policies,
            decision: self.decide(query),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "explain: {}", self.query)?;
        if self.policies.is_empty() {
            writeln!(f, "  no policy targets this identity: default deny")?;
        }
        for policy in &self.policies {
            let mode = match policy.mode {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            };
            writeln!(
                f,
                "  policy {} (target {}, {mode})",
                policy.policy, policy.target
            )?;
            if policy.rules.is_empty() {
                writeln!(f, "    (no rules)")?;
            }
            for rule in &policy.rules {
                match rule.result {
                    Ok(()) => writeln!(f, "    rule {} {}: matches", rule.rule, rule.action)?,
                    Err(miss) => writeln!(
                        f,
                        "    rule {} {}: no match: {miss}",
                        rule.rule, rule.action
                    )?,
                }
            }
        }
        let decision = self.decision.to_string().replace('\n', "\n  ");
        write!(f, "  decision: {decision}")
    }
}
