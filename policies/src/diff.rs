//! What changed between two policy sets, policy by policy, as readable line diffs of their
//! YAML (`sidewall policy diff V1 V2`).

use std::fmt;

use crate::load::to_yaml;
use crate::policy::{Policy, PolicySet};

/// One policy's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Only in the new set.
    Added(String),
    /// Only in the old set.
    Removed(String),
    /// In both, different: the line diff of its YAML (`-`, `+` or ` ` first).
    Changed(String, Vec<String>),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added(name) => write!(f, "+ policy {name} (added)"),
            Change::Removed(name) => write!(f, "- policy {name} (removed)"),
            Change::Changed(name, lines) => {
                write!(f, "~ policy {name} (changed)")?;
                for line in lines {
                    write!(f, "\n    {line}")?;
                }
                Ok(())
            }
        }
    }
}

fn yaml_of(policy: &Policy) -> String {
    // A set of one policy: unique names hold trivially.
    let set = PolicySet::new(vec![policy.clone()]).unwrap_or_default();
    to_yaml(&set)
}

/// The policies added, removed and changed from `old` to `new`, in name order.
pub fn diff(old: &PolicySet, new: &PolicySet) -> Vec<Change> {
    let mut changes = Vec::new();
    for policy in old.policies() {
        match new.get(policy.name.as_str()) {
            None => changes.push(Change::Removed(policy.name.to_string())),
            Some(other) if other != policy => {
                let lines = line_diff(&yaml_of(policy), &yaml_of(other));
                changes.push(Change::Changed(policy.name.to_string(), lines));
            }
            Some(_) => {}
        }
    }
    for policy in new.policies() {
        if old.get(policy.name.as_str()).is_none() {
            changes.push(Change::Added(policy.name.to_string()));
        }
    }
    changes.sort_by(|a, b| name(a).cmp(name(b)));
    changes
}

fn name(change: &Change) -> &str {
    match change {
        Change::Added(n) | Change::Removed(n) | Change::Changed(n, _) => n,
    }
}

/// A line diff by longest common subsequence; changed lines only, with one line of context.
fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut all = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            all.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            all.push(('+', b[j]));
            j += 1;
        } else {
            all.push(('-', a[i]));
            i += 1;
        }
    }
    let near_change = |k: usize| {
        all[k.saturating_sub(1)..(k + 2).min(all.len())]
            .iter()
            .any(|(mark, _)| *mark != ' ')
    };
    (0..all.len())
        .filter(|&k| near_change(k))
        .map(|k| format!("{} {}", all[k].0, all[k].1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{LoadOptions, load_str};

    fn set(text: &str) -> PolicySet {
        load_str("t.yaml", text, &LoadOptions::default())
            .unwrap()
            .policies
    }

    #[test]
    fn added_removed_and_changed_policies() {
        let policy = |name: &str, port: u16| {
            format!(
                "---\napiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n  target: spiffe://e.org/db\n  rules:\n    - {{action: allow, from: [spiffe://e.org/api], ports: [{port}]}}\n"
            )
        };
        let old = set(&format!("{}{}", policy("a", 1), policy("b", 1)));
        let new = set(&format!("{}{}", policy("b", 2), policy("c", 1)));
        let changes = diff(&old, &new);
        assert_eq!(changes[0], Change::Removed("a".into()));
        assert_eq!(changes[2], Change::Added("c".into()));
        let Change::Changed(name, lines) = &changes[1] else {
            panic!("{changes:?}")
        };
        assert_eq!(name, "b");
        assert!(lines.contains(&"-     - 1".to_owned()), "{lines:?}");
        assert!(lines.contains(&"+     - 2".to_owned()), "{lines:?}");
        assert!(diff(&old, &old).is_empty());
    }
}
