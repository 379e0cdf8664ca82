//! Property tests of the policy language and the decision engine.
//!
//! The strategies build only valid values (identities, patterns, ports, HTTP matches, modes,
//! `onRevoke`), drawn from two trust domains and a small alphabet of segments, ports, labels
//! and methods, so that generated peers and targets really do match generated patterns.
//!
//! - Any valid policy set written back with `load::to_yaml` loads to an equal set.
//! - The JSON (snapshot) form of a policy set round-trips.
//! - A set without allow rules never allows. Precisely: with enforce policies only, every
//!   outcome is `Deny`; with audit policies, a target matched only by audit policies gets
//!   `Audit` (forwarded, recorded as "would deny") and every other target `Deny`.
//! - The target index finds exactly the policies whose target matches, and `decide` agrees with
//!   a direct, unindexed reading of the semantics in docs/policy.md (outcome, reason, shadow).

// clippy's allow-unwrap-in-tests covers `#[test]` functions only, not the strategy helpers
// below; an `unwrap` there fails on a value the generator should never build, which is a bug
// in this file and must fail the test run.
#![allow(
    clippy::unwrap_used,
    reason = "generators of valid values in a test crate"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use sidewall_policies::engine::{Query, Request, Shadow, Subject, Verdict};
use sidewall_policies::http::{HostPattern, Method, PathPattern, normalize_path};
use sidewall_policies::identity::Wildcard;
use sidewall_policies::load::{self, LoadOptions};
use sidewall_policies::policy::{
    Action, DrainPeriod, HttpMatch, Mode, NonEmpty, OnRevoke, PolicyName, PortRange, Rule,
};
use sidewall_policies::snapshot::{Schema, Snapshot, SnapshotVersion};
use sidewall_policies::{
    Engine, IdentityPattern, Outcome, Policy, PolicySet, Protocol, SpiffeId, TrustDomain,
};

// ---------------------------------------------------------------------------------------------
// Alphabets: small on purpose, so that generated values collide and patterns match.

const TRUST_DOMAINS: [&str; 2] = ["example.org", "other.org"];
/// Identity path segments; `x-1.y` keeps the less common valid characters in play.
const ID_SEGMENTS: [&str; 3] = ["a", "b", "x-1.y"];
/// Service ports that rules and queries share, with the extremes of the valid range.
const PORTS: [u16; 8] = [1, 80, 443, 8080, 9000, 9001, 9005, 65535];
/// Path segments of rule patterns (normalized form; `%20` is a kept encoding).
const PATH_SEGMENTS: [&str; 6] = ["v1", "orders", "admin", "*", "a%20b", "x:y@"];
/// Raw request path segments, normalized before deciding (`%61dmin` is `admin`).
const REQUEST_PATH_SEGMENTS: [&str; 10] = [
    "v1", "orders", "admin", "%61dmin", "a%20b", "x:y@", ".", "..", "", "17",
];
/// Host labels; `1`, `null` and `true` make YAML quoting matter.
const HOST_LABELS: [&str; 6] = ["api", "shop", "x-y", "1", "null", "true"];
/// Request methods, including lowercase `get` (never matches `GET`) and `CONNECT`.
const REQUEST_METHODS: [&str; 6] = ["GET", "POST", "DELETE", "CONNECT", "PURGE", "get"];
/// Policy names that YAML would read as something other than a string if written bare.
const TRICKY_NAMES: [&str; 10] = [
    "null", "true", "no", "1", "123", "0x1F", "1e3", "1.5", "0o17", "NaN",
];

// ---------------------------------------------------------------------------------------------
// Value strategies.

fn trust_domain() -> impl Strategy<Value = &'static str> {
    select(&TRUST_DOMAINS[..])
}

fn id_path(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(select(&ID_SEGMENTS[..]), min..=max)
        .prop_map(|segments| segments.iter().map(|s| format!("/{s}")).collect())
}

fn spiffe_id() -> impl Strategy<Value = SpiffeId> {
    (trust_domain(), id_path(0, 3)).prop_map(|(td, path)| {
        TrustDomain::new(td)
            .and_then(|td| td.id(&path))
            .unwrap_or_else(|e| panic!("generated an invalid ID {td}{path}: {e}"))
    })
}

fn identity_pattern() -> impl Strategy<Value = IdentityPattern> {
    let wildcard = select(&["", "/*", "/**"][..]);
    (trust_domain(), id_path(0, 2), wildcard).prop_map(|(td, path, wildcard)| {
        let text = format!("spiffe://{td}{path}{wildcard}");
        IdentityPattern::parse(&text)
            .unwrap_or_else(|e| panic!("generated an invalid pattern {text}: {e}"))
    })
}

fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        3 => select(&PORTS[..]).prop_map(|p| PortRange::single(p).unwrap()),
        2 => (select(&PORTS[..]), select(&PORTS[..]))
            .prop_map(|(a, b)| PortRange::new(a.min(b), a.max(b)).unwrap()),
        1 => (1u16..=u16::MAX, 1u16..=u16::MAX)
            .prop_map(|(a, b)| PortRange::new(a.min(b), a.max(b)).unwrap()),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        select(&["GET", "POST", "PUT", "DELETE", "CONNECT", "PURGE"][..]).prop_map(String::from),
        // Any uppercase token, including YAML indicators such as `*`, `&`, `!`, `|` and `~`.
        "[A-Z0-9!#$%&'*+.^_`|~-]{1,8}",
    ]
    .prop_map(|text| Method::parse(&text).unwrap())
}

fn path_pattern() -> impl Strategy<Value = PathPattern> {
    let tail = select(&["", "/**", "/"][..]);
    (
        prop::collection::vec(select(&PATH_SEGMENTS[..]), 0..=3),
        tail,
    )
        .prop_map(|(segments, tail)| {
            let mut text: String = segments.iter().map(|s| format!("/{s}")).collect();
            match tail {
                "/" | "" if text.is_empty() => text.push('/'),
                _ => text.push_str(tail),
            }
            PathPattern::parse(&text)
                .unwrap_or_else(|e| panic!("generated an invalid path pattern {text}: {e}"))
        })
}

fn host_pattern() -> impl Strategy<Value = HostPattern> {
    let name = (
        any::<bool>(),
        prop::collection::vec(select(&HOST_LABELS[..]), 1..=3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(wildcard, labels, upper, trailing_dot)| {
            let mut name = labels.join(".");
            if upper {
                name = name.to_ascii_uppercase();
            }
            if trailing_dot {
                name.push('.');
            }
            if wildcard {
                name.insert_str(0, "*.");
            }
            name
        });
    let literal = select(&["10.0.0.1", "[::1]", "[fe80::1]"][..]).prop_map(String::from);
    let port = prop::option::of(prop_oneof![select(&PORTS[..]), 1u16..=u16::MAX]);
    (prop_oneof![4 => name, 1 => literal], port).prop_map(|(host, port)| {
        let text = match port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        };
        HostPattern::parse(&text)
            .unwrap_or_else(|e| panic!("generated an invalid host pattern {text}: {e}"))
    })
}

fn non_empty<T: std::fmt::Debug>(
    item: impl Strategy<Value = T>,
    max: usize,
) -> impl Strategy<Value = NonEmpty<T>> {
    prop::collection::vec(item, 1..=max).prop_map(|items| NonEmpty::new(items).unwrap())
}

fn http_match() -> impl Strategy<Value = HttpMatch> {
    (
        prop::option::of(non_empty(method(), 3)),
        prop::option::of(non_empty(path_pattern(), 3)),
        prop::option::of(non_empty(host_pattern(), 3)),
    )
        .prop_map(|(methods, paths, hosts)| HttpMatch {
            methods,
            paths,
            hosts,
        })
}

fn rule(action: BoxedStrategy<Action>) -> impl Strategy<Value = Rule> {
    (
        action,
        non_empty(identity_pattern(), 3),
        prop::option::of(non_empty(port_range(), 3)),
        prop::option::of(http_match()),
    )
        .prop_map(|(action, from, ports, http)| Rule {
            action,
            from,
            ports,
            http,
        })
}

fn any_action() -> BoxedStrategy<Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny)].boxed()
}

fn any_mode() -> BoxedStrategy<Mode> {
    prop_oneof![Just(Mode::Enforce), Just(Mode::Audit)].boxed()
}

fn on_revoke() -> impl Strategy<Value = OnRevoke> {
    let max_ms = 24 * 3600 * 1000;
    prop_oneof![
        Just(OnRevoke::Terminate),
        Just(OnRevoke::Keep),
        // Whole units as people write them, and any millisecond count up to the 24 h cap.
        (1u64..=24, select(&[1u64, 60, 3600][..])).prop_map(|(n, unit)| OnRevoke::Drain(
            DrainPeriod::new(Duration::from_secs(n * unit)).unwrap()
        )),
        (1u64..=max_ms)
            .prop_map(|ms| OnRevoke::Drain(DrainPeriod::new(Duration::from_millis(ms)).unwrap())),
    ]
}

fn policy_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9][a-zA-Z0-9._-]{0,15}",
        1 => select(&TRICKY_NAMES[..]).prop_map(String::from),
    ]
}

/// A policy set with up to `max` policies whose rules take their actions from `action` and
/// whose modes come from `mode`.
fn policy_set(
    action: BoxedStrategy<Action>,
    mode: BoxedStrategy<Mode>,
    max: usize,
) -> impl Strategy<Value = PolicySet> {
    let body = (
        identity_pattern(),
        mode,
        on_revoke(),
        prop::collection::vec(rule(action), 0..=4),
    );
    prop::collection::btree_map(policy_name(), body, 0..=max).prop_map(
        |policies: BTreeMap<String, _>| {
            let policies = policies
                .into_iter()
                .map(|(name, (target, mode, on_revoke, rules))| Policy {
                    name: PolicyName::new(&name).unwrap(),
                    target,
                    mode,
                    on_revoke,
                    addresses: Vec::new(),
                    rules,
                })
                .collect();
            PolicySet::new(policies).unwrap()
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Queries.

/// What is asked, with owned request facts (the path already normalized).
#[derive(Debug, Clone)]
enum Asked {
    Connection(Protocol),
    Request {
        method: String,
        path: String,
        host: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct Case {
    peer: SpiffeId,
    target: SpiffeId,
    port: u16,
    asked: Asked,
}

impl Case {
    fn query(&self) -> Query<'_> {
        Query {
            peer: &self.peer,
            target: &self.target,
            port: self.port,
            subject: match &self.asked {
                Asked::Connection(protocol) => Subject::Connection(*protocol),
                Asked::Request { method, path, host } => Subject::Request(Request {
                    method,
                    path,
                    host: host.as_deref(),
                }),
            },
        }
    }
}

fn request_host() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(select(&HOST_LABELS[..]), 1..=3),
        any::<bool>(),
        prop::option::of(select(&PORTS[..])),
    )
        .prop_map(|(labels, upper, port)| {
            let mut host = labels.join(".");
            if upper {
                host = host.to_ascii_uppercase();
            }
            if let Some(port) = port {
                host.push_str(&format!(":{port}"));
            }
            host
        })
}

fn asked() -> impl Strategy<Value = Asked> {
    let request = (
        prop_oneof![
            3 => select(&REQUEST_METHODS[..]).prop_map(String::from),
            1 => method().prop_map(|m| m.as_str().to_owned()),
        ],
        prop::collection::vec(select(&REQUEST_PATH_SEGMENTS[..]), 0..=4),
        prop::option::of(request_host()),
    )
        .prop_filter_map(
            "request path refused by normalization",
            |(method, segments, host)| {
                let raw: String = segments.iter().map(|s| format!("/{s}")).collect();
                let raw = if raw.is_empty() { "/".to_owned() } else { raw };
                let path = normalize_path(&raw).ok()?.into_owned();
                Some(Asked::Request { method, path, host })
            },
        );
    prop_oneof![
        1 => Just(Asked::Connection(Protocol::Tcp)),
        1 => Just(Asked::Connection(Protocol::Http)),
        3 => request,
    ]
}

/// An ID the pattern matches (the pattern itself when exact).
fn instance(pattern: &IdentityPattern) -> SpiffeId {
    let suffix = match pattern.wildcard() {
        Wildcard::None => "",
        Wildcard::One => "/a",
        Wildcard::Many => "/a/b",
    };
    SpiffeId::parse(&format!("{}{suffix}", pattern.prefix())).unwrap()
}

/// An ID from the alphabet, or one that a pattern of the set certainly matches.
fn id_near(patterns: Vec<SpiffeId>) -> BoxedStrategy<SpiffeId> {
    if patterns.is_empty() {
        spiffe_id().boxed()
    } else {
        prop_oneof![1 => spiffe_id(), 3 => select(patterns)].boxed()
    }
}

/// Questions aimed at each rule of the set: its target, a peer of its `from`, a port of its
/// `ports`, and a request its `http` part matches (when the rule has one), on a TCP port, on
/// an HTTP port and as a request. Other rules may still decide them, which is the point.
fn aimed_cases(set: &PolicySet) -> Vec<Case> {
    let mut cases = Vec::new();
    for policy in set.policies() {
        let target = instance(&policy.target);
        for rule in &policy.rules {
            let peer = instance(&rule.from.as_slice()[0]);
            let port = rule.ports.as_ref().map_or(8080, |p| p.as_slice()[0].end());
            let request = match &rule.http {
                Some(http) => Asked::Request {
                    method: http
                        .methods
                        .as_ref()
                        .map_or("GET".to_owned(), |m| m.as_slice()[0].as_str().to_owned()),
                    path: http.paths.as_ref().map_or("/".to_owned(), |p| {
                        p.as_slice()[0]
                            .as_str()
                            .split('/')
                            .map(|s| match s {
                                "*" => "17",
                                "**" => "a/b",
                                other => other,
                            })
                            .collect::<Vec<_>>()
                            .join("/")
                    }),
                    host: http.hosts.as_ref().map(|h| {
                        let host = h.as_slice()[0].as_str();
                        host.strip_prefix('*')
                            .map_or(host.to_owned(), |rest| format!("x{rest}"))
                    }),
                },
                None => Asked::Request {
                    method: "GET".to_owned(),
                    path: "/".to_owned(),
                    host: None,
                },
            };
            for asked in [
                Asked::Connection(Protocol::Tcp),
                Asked::Connection(Protocol::Http),
                request,
            ] {
                cases.push(Case {
                    peer: peer.clone(),
                    target: target.clone(),
                    port,
                    asked,
                });
            }
        }
    }
    cases
}

/// A set and up to 16 questions about it: half aimed at its rules, half drawn from the
/// alphabets with peers and targets biased toward the set's own patterns.
fn set_and_cases(
    set: impl Strategy<Value = PolicySet>,
) -> impl Strategy<Value = (PolicySet, Vec<Case>)> {
    set.prop_flat_map(|set| {
        let targets: Vec<SpiffeId> = set.policies().iter().map(|p| instance(&p.target)).collect();
        let peers: Vec<SpiffeId> = set
            .policies()
            .iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| r.from.iter().map(instance))
            .collect();
        let port = prop_oneof![3 => select(&PORTS[..]), 1 => 1u16..=u16::MAX];
        let drawn = (id_near(peers), id_near(targets), port, asked()).prop_map(
            |(peer, target, port, asked)| Case {
                peer,
                target,
                port,
                asked,
            },
        );
        let aimed = aimed_cases(&set);
        let case = if aimed.is_empty() {
            drawn.boxed()
        } else {
            prop_oneof![drawn, select(aimed)].boxed()
        };
        (Just(set), prop::collection::vec(case, 1..=16))
    })
}

// ---------------------------------------------------------------------------------------------
// A direct reading of the semantics (docs/policy.md, "How a decision is made" and "Modes"),
// without the engine's index: used as the reference the engine must agree with.

/// Whether `rule` counts for `case`, and so whether its action applies.
fn rule_applies(rule: &Rule, case: &Case) -> bool {
    let peer = rule.from.iter().any(|p| p.matches(&case.peer));
    if !peer || !rule.covers_port(case.port) {
        return false;
    }
    match (&case.asked, &rule.http, rule.action) {
        // Plain TCP: deny rules with or without `http`; allow rules only without.
        (Asked::Connection(Protocol::Tcp), http, action) => {
            action == Action::Deny || http.is_none()
        }
        // HTTP port: deny rules only without `http`; allow rules with or without.
        (Asked::Connection(Protocol::Http), http, action) => {
            action == Action::Allow || http.is_none()
        }
        (Asked::Request { method, path, host }, Some(http), _) => {
            http.check(method, path, host.as_deref()).is_ok()
        }
        // Without `http` a rule matches every request on its ports, except that CONNECT must
        // be named by a rule to be allowed.
        (Asked::Request { method, .. }, None, action) => {
            action == Action::Deny || method != "CONNECT"
        }
    }
}

/// The verdict of `policies` (in name order) and the first rule of the deciding action.
fn reference_verdict(policies: &[&Policy], case: &Case) -> (Verdict, Option<(String, usize)>) {
    let first = |action: Action| {
        policies.iter().find_map(|policy| {
            policy
                .rules
                .iter()
                .position(|rule| rule.action == action && rule_applies(rule, case))
                .map(|i| (policy.name.to_string(), i + 1))
        })
    };
    if let Some(at) = first(Action::Deny) {
        (Verdict::Deny, Some(at))
    } else if let Some(at) = first(Action::Allow) {
        (Verdict::Allow, Some(at))
    } else {
        (Verdict::Deny, None)
    }
}

/// The reference decision: (outcome, reason, shadow verdict and reason when it differs).
type ReferenceDecision = (
    Outcome,
    Option<(String, usize)>,
    Option<(Verdict, Option<(String, usize)>)>,
);

fn reference_decision(set: &PolicySet, case: &Case) -> ReferenceDecision {
    let matching: Vec<&Policy> = set
        .policies()
        .iter()
        .filter(|p| p.target.matches(&case.target))
        .collect();
    let enforce: Vec<&Policy> = matching
        .iter()
        .copied()
        .filter(|p| p.mode == Mode::Enforce)
        .collect();
    let (shadow, shadow_at) = reference_verdict(&matching, case);
    if enforce.is_empty() && matching.is_empty() {
        return (Outcome::Deny, None, None);
    }
    if enforce.is_empty() {
        let outcome = match shadow {
            Verdict::Allow => Outcome::Allow,
            Verdict::Deny => Outcome::Audit,
        };
        return (outcome, shadow_at, None);
    }
    let (verdict, at) = reference_verdict(&enforce, case);
    let outcome = match verdict {
        Verdict::Allow => Outcome::Allow,
        Verdict::Deny => Outcome::Deny,
    };
    let differs = (shadow != verdict).then_some((shadow, shadow_at));
    (outcome, at, differs)
}

fn reason_of(decision: &sidewall_policies::Decision) -> Option<(String, usize)> {
    decision
        .reason
        .as_ref()
        .map(|r| (r.policy.to_string(), r.rule))
}

fn shadow_of(shadow: &Option<Shadow>) -> Option<(Verdict, Option<(String, usize)>)> {
    shadow.as_ref().map(|s| {
        (
            s.verdict,
            s.reason.as_ref().map(|r| (r.policy.to_string(), r.rule)),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) YAML: what `to_yaml` writes, the loader reads back as the same set, and writing
    /// that again gives the same text.
    #[test]
    fn yaml_round_trip(set in policy_set(any_action(), any_mode(), 6)) {
        let yaml = load::to_yaml(&set);
        let loaded = load::load_str("generated.yaml", &yaml, &LoadOptions::default())
            .map_err(|e| TestCaseError::fail(format!("{e}\n--- YAML ---\n{yaml}")))?;
        prop_assert_eq!(&loaded.policies, &set, "YAML:\n{}", yaml);
        prop_assert!(loaded.skipped.is_empty() && loaded.tests.is_empty());
        prop_assert_eq!(load::to_yaml(&loaded.policies), yaml);
    }

    /// (c) JSON: the snapshot (wire) form of a set round-trips, on its own and inside a
    /// `Snapshot`.
    #[test]
    fn json_round_trip(set in policy_set(any_action(), any_mode(), 6), workload in spiffe_id()) {
        let json = serde_json::to_string(&set).unwrap();
        let parsed: PolicySet = serde_json::from_str(&json)
            .map_err(|e| TestCaseError::fail(format!("{e}\n--- JSON ---\n{json}")))?;
        prop_assert_eq!(&parsed, &set);

        let snapshot = Snapshot {
            schema: Schema::default(),
            version: SnapshotVersion { epoch: "e1".into(), counter: 1 },
            workload,
            policies: set,
            trust_bundles: BTreeMap::new(),
            signing_ca: None,
            revocations: Default::default(),
            directory: Vec::new(),
        };
        let parsed = Snapshot::from_json(&snapshot.to_json())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed, snapshot);
    }

    /// (b) Enforce policies without allow rules never allow: every outcome is `Deny`.
    #[test]
    fn enforce_deny_only_never_allows(
        (set, cases) in set_and_cases(policy_set(Just(Action::Deny).boxed(), Just(Mode::Enforce).boxed(), 6))
    ) {
        let engine = Engine::new(set);
        for case in &cases {
            let decision = engine.decide(&case.query());
            prop_assert_eq!(decision.outcome, Outcome::Deny, "{:?}: {}", case, decision);
            prop_assert!(decision.shadow.is_none(), "{:?}: {}", case, decision);
        }
    }

    /// (b) With audit policies, a set without allow rules still never allows. Precisely: a
    /// target matched only by audit policies gets `Audit` (forwarded, recorded as "would
    /// deny"), any other target `Deny`; no shadow decision differs; a named reason is a deny
    /// rule of a policy whose target matches (an enforce one when the outcome is `Deny`).
    #[test]
    fn deny_only_with_audit_never_allows(
        (set, cases) in set_and_cases(policy_set(Just(Action::Deny).boxed(), any_mode(), 6))
    ) {
        let engine = Engine::new(set);
        let set = engine.policy_set();
        for case in &cases {
            let decision = engine.decide(&case.query());
            prop_assert_ne!(decision.outcome, Outcome::Allow, "{:?}: {}", case, decision);
            let matches = |mode| set.policies().iter().any(|p| p.mode == mode && p.target.matches(&case.target));
            let only_audit = matches(Mode::Audit) && !matches(Mode::Enforce);
            let expected = if only_audit { Outcome::Audit } else { Outcome::Deny };
            prop_assert_eq!(decision.outcome, expected, "{:?}: {}", case, decision);
            prop_assert!(decision.shadow.is_none(), "{:?}: {}", case, decision);
            if let Some(reason) = &decision.reason {
                let policy = set.get(reason.policy.as_str()).unwrap();
                prop_assert!(policy.target.matches(&case.target));
                prop_assert_eq!(policy.rules[reason.rule - 1].action, Action::Deny);
                if !only_audit {
                    prop_assert_eq!(policy.mode, Mode::Enforce);
                }
            }
        }
    }

    /// The target index finds exactly the policies whose target pattern matches, and every
    /// decision (outcome, reason, shadow) agrees with the unindexed reference above.
    #[test]
    fn decide_agrees_with_the_reference(
        (set, cases) in set_and_cases(policy_set(any_action(), any_mode(), 6))
    ) {
        let engine = Engine::new(set);
        let set = engine.policy_set();
        for case in &cases {
            let indexed: Vec<&str> = engine.policies_for(&case.target).iter().map(|p| p.name.as_str()).collect();
            let scanned: Vec<&str> = set
                .policies()
                .iter()
                .filter(|p| p.target.matches(&case.target))
                .map(|p| p.name.as_str())
                .collect();
            prop_assert_eq!(indexed, scanned, "target {}", case.target);

            let decision = engine.decide(&case.query());
            let (outcome, reason, shadow) = reference_decision(set, case);
            prop_assert_eq!(decision.outcome, outcome, "{:?}: {}", case, decision);
            prop_assert_eq!(reason_of(&decision), reason, "{:?}: {}", case, decision);
            prop_assert_eq!(shadow_of(&decision.shadow), shadow, "{:?}: {}", case, decision);
        }
    }
}

/// Guards the generators against drifting into vacuity: the "never allows" properties are
/// only worth something if generated queries reach deny rules, and the reference comparison
/// only if all three outcomes occur.
#[test]
fn generated_queries_reach_rules() {
    let mut runner = TestRunner::new(Config::default());
    let strategy = set_and_cases(policy_set(any_action(), any_mode(), 6));
    let (mut by_rule, mut total) = (0usize, 0usize);
    let mut outcomes = std::collections::HashSet::new();
    for _ in 0..200 {
        let (set, cases) = strategy.new_tree(&mut runner).unwrap().current();
        let engine = Engine::new(set);
        for case in &cases {
            let decision = engine.decide(&case.query());
            total += 1;
            by_rule += usize::from(decision.reason.is_some());
            outcomes.insert(decision.outcome);
        }
    }
    eprintln!("{by_rule} of {total} generated decisions rested on a rule");
    assert!(
        by_rule * 4 >= total,
        "only {by_rule} of {total} generated decisions rested on a rule"
    );
    assert_eq!(outcomes.len(), 3, "outcomes seen: {outcomes:?}");
}
