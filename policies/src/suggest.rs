//! Learning mode: from the flows the sidecars observed, the smallest allow-list that admits
//! every observed allowed flow, one policy per target, with a `PolicyTest` document that lists
//! each of those flows as an expectation.
//!
//! What is kept: flows with at least one decision that let the traffic through (`allow`, or
//! `audit`: allowed by an audit policy that would deny it). Flows only ever denied stay denied.
//!
//! How far it generalizes, and no further:
//! - sources are never widened into patterns: each rule names the peers that were seen, and
//!   peers seen with exactly the same access share a rule;
//! - TCP ports are listed as seen;
//! - an HTTP flow records its method and the first two segments of its path (the sidecar
//!   keeps no more). A one-segment path (`/health`) was the whole path and is allowed exactly;
//!   a two-segment path (`/v1/orders`) may have been longer, so it is allowed with everything
//!   under it (`/v1/orders`, `/v1/orders/**`);
//! - when [`Options::generalize_after`] or more distinct second segments were seen under one
//!   first segment on one port of a target (`/users/17`, `/users/42`, …), that segment becomes
//!   `*` (`/users/*`, `/users/*/**`) and the suggestion says so;
//! - methods are never generalized: a path allows the methods seen on it, and paths seen with
//!   the same methods share a rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::identity::SpiffeId;
use crate::policy::Protocol;
use crate::wire::operator::{FlowKey, FlowStats};

/// How far the suggestion generalizes.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Distinct second path segments under one first segment (on one port of one target)
    /// from which that segment becomes `*`. Default is 5.
    pub generalize_after: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            generalize_after: 5,
        }
    }
}

/// The suggested policy for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggested {
    /// The target identity.
    pub target: SpiffeId,
    /// The policy's name (`suggested-` and the target's path).
    pub name: String,
    /// One YAML file: the policy, then its `PolicyTest` document.
    pub yaml: String,
    /// The flows it admits (the `PolicyTest` cases).
    pub flows: usize,
    /// What was generalized, one line each.
    pub notes: Vec<String>,
}

/// What one peer was seen doing on one target.
#[derive(Default)]
struct Access {
    tcp_ports: BTreeSet<u16>,
    /// Port → path pattern (as seen or generalized) → methods.
    http: BTreeMap<u16, BTreeMap<String, BTreeSet<String>>>,
}

/// One rule's shape; peers with the same shapes share rules.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    Tcp(Vec<u16>),
    Http {
        port: u16,
        methods: Vec<String>,
        paths: Vec<String>,
    },
}

/// A test case.
struct Case {
    peer: String,
    port: u16,
    request: Option<(String, String)>,
}

/// Suggests one policy per target seen in `flows` (all of them, or those in `targets`).
pub fn suggest(
    flows: &[(FlowKey, FlowStats)],
    targets: &[SpiffeId],
    options: Options,
) -> Vec<Suggested> {
    let mut by_target: BTreeMap<String, Vec<&FlowKey>> = BTreeMap::new();
    for (key, stats) in flows {
        let passed = stats.allow > 0 || stats.audit > 0;
        let wanted = targets.is_empty() || targets.iter().any(|t| t.as_str() == key.target);
        if passed && wanted {
            by_target.entry(key.target.clone()).or_default().push(key);
        }
    }
    by_target
        .into_iter()
        .filter_map(|(target, keys)| {
            let target = SpiffeId::parse(&target).ok()?;
            Some(for_target(target, &keys, options))
        })
        .collect()
}

/// The segments of a recorded path, and whether it may have been cut (two segments: the
/// sidecar keeps no more).
fn segments(path: &str) -> (Vec<&str>, bool) {
    let parts: Vec<&str> = path.split('/').skip(1).filter(|s| !s.is_empty()).collect();
    let cut = parts.len() >= 2;
    (parts, cut)
}

fn for_target(target: SpiffeId, keys: &[&FlowKey], options: Options) -> Suggested {
    let mut notes = Vec::new();
    let wide = wide_segments(keys, options, &mut notes);
    let (access, cases, connection_only) = observe(keys, &wide);
    if connection_only > 0 {
        notes.push(format!(
            "{connection_only} connection(s) to HTTP ports without a request seen: no rule for them"
        ));
    }
    let name = policy_name(&target);
    let yaml = render(&target, &name, &shapes(&access), &cases, keys.len());
    Suggested {
        target,
        name,
        yaml,
        flows: cases.len(),
        notes,
    }
}

/// The (port, first segment) pairs under which at least `generalize_after` distinct second
/// segments were seen: that segment becomes `*`. Each is said in `notes`.
fn wide_segments(
    keys: &[&FlowKey],
    options: Options,
    notes: &mut Vec<String>,
) -> BTreeSet<(u16, String)> {
    let mut seconds: BTreeMap<(u16, String), BTreeSet<String>> = BTreeMap::new();
    for key in keys {
        if let (Protocol::Http, Some(path)) = (key.protocol, &key.path) {
            let (parts, _) = segments(path);
            if let [first, second, ..] = parts.as_slice() {
                seconds
                    .entry((key.port, (*first).to_owned()))
                    .or_default()
                    .insert((*second).to_owned());
            }
        }
    }
    seconds
        .into_iter()
        .filter(|(_, values)| values.len() >= options.generalize_after)
        .map(|((port, first), values)| {
            notes.push(format!(
                "port {port}: /{first}/* ({} distinct segments seen after /{first}, at least {} make a wildcard)",
                values.len(),
                options.generalize_after
            ));
            (port, first)
        })
        .collect()
}

/// What each peer was seen doing, the test cases, and how many HTTP connections sent no
/// request.
fn observe(
    keys: &[&FlowKey],
    wide: &BTreeSet<(u16, String)>,
) -> (BTreeMap<String, Access>, Vec<Case>, usize) {
    let mut access: BTreeMap<String, Access> = BTreeMap::new();
    let mut cases = Vec::new();
    let mut connection_only = 0;
    for key in keys {
        let peer = access.entry(key.peer.clone()).or_default();
        let request = match (key.protocol, &key.method, &key.path) {
            (Protocol::Http, Some(method), Some(path)) => {
                let patterns = peer.http.entry(key.port).or_default();
                for pattern in path_patterns(path, key.port, wide) {
                    patterns.entry(pattern).or_default().insert(method.clone());
                }
                Some((method.clone(), path.clone()))
            }
            (Protocol::Http, ..) => {
                connection_only += 1;
                continue;
            }
            (Protocol::Tcp, ..) => {
                peer.tcp_ports.insert(key.port);
                None
            }
        };
        cases.push(Case {
            peer: key.peer.clone(),
            port: key.port,
            request,
        });
    }
    (access, cases, connection_only)
}

/// The patterns that admit a recorded `path`: itself (with its second segment as `*` where
/// `wide` says so), and everything under it when the sidecar may have cut it.
fn path_patterns(path: &str, port: u16, wide: &BTreeSet<(u16, String)>) -> Vec<String> {
    let (parts, cut) = segments(path);
    let mut shown: Vec<&str> = parts;
    if let [first, _, ..] = shown.as_slice()
        && wide.contains(&(port, (*first).to_owned()))
    {
        shown[1] = "*";
    }
    let base = format!("/{}", shown.join("/"));
    if cut {
        vec![format!("{base}/**"), base]
    } else {
        vec![base]
    }
}

/// The rules: each shape of access, with the peers that have it.
fn shapes(access: &BTreeMap<String, Access>) -> BTreeMap<Shape, BTreeSet<String>> {
    let mut rules: BTreeMap<Shape, BTreeSet<String>> = BTreeMap::new();
    for (peer, seen) in access {
        if !seen.tcp_ports.is_empty() {
            let ports = seen.tcp_ports.iter().copied().collect();
            rules
                .entry(Shape::Tcp(ports))
                .or_default()
                .insert(peer.clone());
        }
        for (port, patterns) in &seen.http {
            let mut by_methods: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
            for (path, methods) in patterns {
                by_methods
                    .entry(methods.iter().cloned().collect())
                    .or_default()
                    .push(path.clone());
            }
            for (methods, paths) in by_methods {
                let shape = Shape::Http {
                    port: *port,
                    methods,
                    paths,
                };
                rules.entry(shape).or_default().insert(peer.clone());
            }
        }
    }
    rules
}

/// `suggested-` and the target's path, in the characters a policy name allows.
fn policy_name(target: &SpiffeId) -> String {
    let path: String = target
        .path()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("suggested-{}", if path.is_empty() { "root" } else { &path })
}

/// A YAML flow scalar: JSON's quoting is valid YAML.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

fn render(
    target: &SpiffeId,
    name: &str,
    rules: &BTreeMap<Shape, BTreeSet<String>>,
    cases: &[Case],
    flows: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Suggested by `sidewall policy suggest` from {flows} observed flow(s) to {target}.\n\
         # Review it, then apply it: every flow it was made from is a case of the test below."
    );
    let _ = writeln!(
        out,
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n  target: {}\n  mode: enforce\n  rules:",
        quoted(target.as_str())
    );
    if rules.is_empty() {
        out.truncate(out.len() - 1);
        out.push_str(" []\n");
    }
    for (shape, peers) in rules {
        let _ = writeln!(out, "    - action: allow");
        let _ = writeln!(out, "      from: {}", list(peers.iter().map(|p| quoted(p))));
        match shape {
            Shape::Tcp(ports) => {
                let _ = writeln!(
                    out,
                    "      ports: {}",
                    list(ports.iter().map(u16::to_string))
                );
            }
            Shape::Http {
                port,
                methods,
                paths,
            } => {
                let _ = writeln!(out, "      ports: [{port}]");
                let _ = writeln!(
                    out,
                    "      http:\n        methods: {}\n        paths: {}",
                    list(methods.iter().map(|m| quoted(m))),
                    list(paths.iter().map(|p| quoted(p)))
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "---\napiVersion: sidewall.dev/v1\nkind: PolicyTest\nmetadata:\n  name: {name}-observed\nspec:\n  cases:"
    );
    if cases.is_empty() {
        out.truncate(out.len() - 1);
        out.push_str(" []\n");
    }
    for case in cases {
        let request = match &case.request {
            Some((method, path)) => {
                format!(", method: {}, path: {}", quoted(method), quoted(path))
            }
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "    - {{from: {}, to: {}, port: {}{request}, expect: allow}}",
            quoted(&case.peer),
            quoted(target.as_str()),
            case.port
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::load::{LoadOptions, load_str};

    fn flow(
        peer: &str,
        target: &str,
        port: u16,
        request: Option<(&str, &str)>,
        allow: u64,
        deny: u64,
    ) -> (FlowKey, FlowStats) {
        (
            FlowKey {
                peer: format!("spiffe://td/{peer}"),
                target: format!("spiffe://td/{target}"),
                port,
                protocol: if request.is_some() {
                    Protocol::Http
                } else {
                    Protocol::Tcp
                },
                method: request.map(|(m, _)| m.to_owned()),
                path: request.map(|(_, p)| p.to_owned()),
            },
            FlowStats {
                count: allow + deny,
                allow,
                deny,
                ..FlowStats::default()
            },
        )
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td/{path}")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A query and whether it must be allowed: peer, port, request (method, path).
    type Expected<'a> = (&'a str, u16, Option<(&'a str, &'a str)>, bool);

    /// The suggestion loads, its tests pass, and it decides `expected` for each query.
    fn check(suggested: &Suggested, expected: &[Expected<'_>]) {
        let options = LoadOptions {
            tests: true,
            ..LoadOptions::default()
        };
        let loaded = load_str("suggested.yaml", &suggested.yaml, &options)
            .unwrap_or_else(|e| panic!("{e}\n{}", suggested.yaml));
        let engine = Engine::new(loaded.policies);
        let report = crate::testing::run(&engine, &loaded.tests);
        assert!(
            report.failures.is_empty(),
            "{:?}\n{}",
            report.failures,
            suggested.yaml
        );
        assert_eq!(report.cases, suggested.flows);
        for (peer, port, request, allowed) in expected {
            let peer = id(peer);
            let subject = match request {
                Some((method, path)) => crate::engine::Subject::Request(crate::engine::Request {
                    method,
                    path,
                    host: None,
                }),
                None => crate::engine::Subject::Connection(Protocol::Tcp),
            };
            let decision = engine.decide(&crate::engine::Query {
                peer: &peer,
                target: &suggested.target,
                port: *port,
                subject,
            });
            assert_eq!(
                decision.outcome == crate::engine::Outcome::Allow,
                *allowed,
                "{peer} port {port} {request:?}\n{}",
                suggested.yaml
            );
        }
    }

    #[test]
    fn admits_what_was_allowed_and_nothing_else() {
        let flows = [
            flow("web", "api", 8080, Some(("GET", "/v1/orders")), 3, 0),
            flow("web", "api", 8080, Some(("POST", "/v1/orders")), 1, 0),
            flow("web", "api", 8080, Some(("GET", "/health")), 9, 0),
            flow("batch", "api", 8080, Some(("GET", "/health")), 2, 0),
            flow("batch", "api", 8080, Some(("DELETE", "/v1/orders")), 0, 4),
            flow("web", "db", 5432, None, 5, 0),
            flow("batch", "db", 5432, None, 0, 1),
            flow("web", "db", 5433, None, 1, 0),
        ];
        let suggested = suggest(&flows, &[], Options::default());
        assert_eq!(suggested.len(), 2);
        let api = &suggested[0];
        assert_eq!(api.name, "suggested-api");
        assert_eq!(api.flows, 4, "the denied flow is not a case");
        check(
            api,
            &[
                ("web", 8080, Some(("GET", "/v1/orders/17/items")), true),
                ("web", 8080, Some(("POST", "/v1/orders")), true),
                ("web", 8080, Some(("DELETE", "/v1/orders")), false),
                ("web", 8080, Some(("GET", "/health/deep")), false),
                ("web", 8080, Some(("GET", "/admin")), false),
                ("batch", 8080, Some(("GET", "/health")), true),
                ("batch", 8080, Some(("GET", "/v1/orders")), false),
                ("batch", 8080, Some(("DELETE", "/v1/orders")), false),
                ("other", 8080, Some(("GET", "/health")), false),
            ],
        );
        let db = &suggested[1];
        check(
            db,
            &[
                ("web", 5432, None, true),
                ("web", 5433, None, true),
                ("web", 5434, None, false),
                ("batch", 5432, None, false),
            ],
        );
        // Only the targets asked for.
        let only = suggest(&flows, &[id("db")], Options::default());
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].target, id("db"));
    }

    #[test]
    fn many_values_of_a_segment_become_a_wildcard_and_the_note_says_so() {
        let mut flows: Vec<_> = (0..5)
            .map(|i| {
                flow(
                    "web",
                    "users",
                    80,
                    Some(("GET", &format!("/users/{i}"))),
                    1,
                    0,
                )
            })
            .collect();
        flows.push(flow("web", "users", 80, Some(("GET", "/teams/1")), 1, 0));
        let suggested = suggest(&flows, &[], Options::default());
        let users = &suggested[0];
        assert_eq!(users.notes.len(), 1, "{:?}", users.notes);
        assert!(users.notes[0].contains("/users/*"), "{:?}", users.notes);
        check(
            users,
            &[
                ("web", 80, Some(("GET", "/users/99")), true),
                ("web", 80, Some(("GET", "/users/99/orders")), true),
                ("web", 80, Some(("GET", "/teams/1")), true),
                ("web", 80, Some(("GET", "/teams/2")), false),
            ],
        );
        // With a higher threshold, nothing is generalized.
        let strict = suggest(
            &flows,
            &[],
            Options {
                generalize_after: 6,
            },
        );
        assert!(strict[0].notes.is_empty());
        check(
            &strict[0],
            &[("web", 80, Some(("GET", "/users/99")), false)],
        );
    }

    #[test]
    fn peers_with_the_same_access_share_a_rule() {
        let flows = [
            flow("a", "db", 5432, None, 1, 0),
            flow("b", "db", 5432, None, 1, 0),
            flow("c", "db", 5432, None, 1, 0),
            flow("c", "db", 9187, None, 1, 0),
        ];
        let suggested = suggest(&flows, &[], Options::default());
        assert_eq!(
            suggested[0].yaml.matches("- action: allow").count(),
            2,
            "{}",
            suggested[0].yaml
        );
        check(
            &suggested[0],
            &[("a", 9187, None, false), ("c", 9187, None, true)],
        );
    }
}
