use super::*;
use crate::load::{LoadOptions, load_str};

const FIXTURE: &str = r#"
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api}
spec:
  target: spiffe://example.org/ns/shop/svc/api
  rules:
    - action: allow                                   # 1
      from: [spiffe://example.org/ns/shop/svc/frontend]
      ports: [8080]
      http:
        methods: [GET, POST]
        paths: [/v1/orders, "/v1/orders/*/items", "/static/**"]
        hosts: [api.shop, "*.shop"]
    - action: allow                                   # 2
      from: ["spiffe://example.org/ns/ops/**"]
      ports: ["9000-9010"]
    - action: deny                                    # 3
      from: [spiffe://example.org/ns/ops/svc/intruder]
    - action: deny                                    # 4
      from: [spiffe://example.org/ns/shop/svc/frontend]
      http: {paths: ["/admin/**"]}
    - action: allow                                   # 5
      from: ["spiffe://example.org/ns/prod/*"]
      ports: [8080]
    - action: allow                                   # 6
      from: [spiffe://example.org/ns/shop/svc/batch]
      ports: [8080]
      http: {methods: [CONNECT]}
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: shop-quarantine}
spec:
  target: spiffe://example.org/ns/shop/svc/*
  rules:
    - action: deny
      from: ["spiffe://example.org/ns/quarantine/**"]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: db}
spec:
  target: spiffe://example.org/ns/data/svc/db
  rules:
    - action: allow
      from: [spiffe://example.org/ns/shop/svc/api]
      ports: [5432]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: db-audit}
spec:
  target: spiffe://example.org/ns/data/svc/db
  mode: audit
  rules:
    - action: deny
      from: [spiffe://example.org/ns/shop/svc/api]
      ports: [5432]
    - action: allow
      from: [spiffe://example.org/ns/analytics/svc/reports]
      ports: [5432]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: reports}
spec:
  target: spiffe://example.org/ns/analytics/svc/reports
  mode: audit
  rules:
    - action: allow
      from: [spiffe://example.org/ns/shop/svc/frontend]
      ports: [8080]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: wild}
spec:
  target: spiffe://example.org/ns/edge/*
  rules:
    - action: allow
      from: ["spiffe://other.org/**"]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: deep}
spec:
  target: spiffe://example.org/ns/batch/**
  rules:
    - action: allow
      from: [spiffe://example.org/ns/shop/svc/api]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: locked}
spec:
  target: spiffe://example.org/ns/locked/svc/vault
  rules: []
"#;

fn engine() -> Engine {
    let loaded = load_str("fixture.yaml", FIXTURE, &LoadOptions::default()).unwrap();
    Engine::new(loaded.policies)
}

/// `frontend` → `spiffe://example.org/ns/shop/svc/frontend`; `ns/x/y` → under example.org;
/// full IDs are kept.
fn id(short: &str) -> SpiffeId {
    let text = if short.starts_with("spiffe://") {
        short.to_owned()
    } else if short.starts_with("ns/") {
        format!("spiffe://example.org/{short}")
    } else {
        format!("spiffe://example.org/ns/shop/svc/{short}")
    };
    SpiffeId::parse(&text).unwrap()
}

/// `tcp`, `http`, or `METHOD /path [host]` (host `-` for none).
fn decide(engine: &Engine, peer: &str, target: &str, port: u16, subject: &str) -> String {
    let (peer, target) = (id(peer), id(target));
    let decision = match subject {
        "tcp" => engine.decide_connection(&peer, &target, port, Protocol::Tcp),
        "http" => engine.decide_connection(&peer, &target, port, Protocol::Http),
        request => {
            let mut parts = request.split(' ');
            let method = parts.next().unwrap();
            let path = parts.next().unwrap();
            let host = parts.next().filter(|h| *h != "-");
            engine.decide_request(&peer, &target, port, Request { method, path, host })
        }
    };
    decision.to_string()
}

#[test]
fn decision_table() {
    const DEFAULT: &str = "DENY policy=- rule=-";
    #[rustfmt::skip]
    let rows: &[(&str, &str, u16, &str, &str)] = &[
        // default deny
        ("frontend", "unknown", 80, "tcp", DEFAULT),
        ("frontend", "ns/locked/svc/vault", 443, "tcp", DEFAULT),
        ("frontend", "ns/locked/svc/vault", 443, "GET / -", DEFAULT),
        // port ranges, `**` in `from`, segment boundaries, trust domains
        ("ns/ops/svc/monitor", "api", 9000, "tcp", "ALLOW policy=api rule=2"),
        ("ns/ops/svc/monitor", "api", 9010, "tcp", "ALLOW policy=api rule=2"),
        ("ns/ops/svc/monitor", "api", 9011, "tcp", DEFAULT),
        ("ns/ops/svc/monitor", "api", 8999, "tcp", DEFAULT),
        ("ns/ops/team/svc/x", "api", 9005, "tcp", "ALLOW policy=api rule=2"),
        ("ns/ops", "api", 9000, "tcp", DEFAULT),
        ("ns/ops-evil/svc/x", "api", 9000, "tcp", DEFAULT),
        ("spiffe://other.org/ns/ops/svc/monitor", "api", 9000, "tcp", DEFAULT),
        // deny beats allow
        ("ns/ops/svc/intruder", "api", 9000, "tcp", "DENY policy=api rule=3"),
        ("ns/quarantine/svc/x", "api", 9000, "tcp", "DENY policy=shop-quarantine rule=1"),
        ("ns/quarantine/svc/x", "api", 8080, "http", "DENY policy=shop-quarantine rule=1"),
        // an HTTP rule never opens a TCP port; a deny with `http` still denies TCP
        ("frontend", "api", 8080, "tcp", "DENY policy=api rule=4"),
        ("batch", "api", 8080, "tcp", DEFAULT),
        // `*` is exactly one segment
        ("ns/prod/web", "api", 8080, "tcp", "ALLOW policy=api rule=5"),
        ("ns/prod/web/extra", "api", 8080, "tcp", DEFAULT),
        ("ns/prod-evil/svc/x", "api", 8080, "tcp", DEFAULT),
        ("ns/prod", "api", 8080, "tcp", DEFAULT),
        ("ns/prod/web", "api", 8081, "tcp", DEFAULT),
        // connections on an HTTP port
        ("frontend", "api", 8080, "http", "ALLOW policy=api rule=1"),
        ("ns/ops/svc/intruder", "api", 8080, "http", "DENY policy=api rule=3"),
        ("frontend", "api", 9000, "http", DEFAULT),
        ("batch", "api", 8080, "http", "ALLOW policy=api rule=6"),
        ("ns/prod/web", "api", 8080, "http", "ALLOW policy=api rule=5"),
        // requests: methods
        ("frontend", "api", 8080, "GET /v1/orders api.shop", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "POST /v1/orders api.shop", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "DELETE /v1/orders api.shop", DEFAULT),
        ("frontend", "api", 8080, "get /v1/orders api.shop", DEFAULT),
        // requests: paths
        ("frontend", "api", 8080, "GET /v1/orders/7/items api.shop", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "GET /v1/orders/7/8/items api.shop", DEFAULT),
        ("frontend", "api", 8080, "GET /v1/orders/ api.shop", DEFAULT),
        ("frontend", "api", 8080, "GET /static/css/a.css api.shop", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "GET /static api.shop", DEFAULT),
        ("frontend", "api", 8080, "GET /V1/orders api.shop", DEFAULT),
        ("frontend", "api", 8080, "GET /admin/users api.shop", "DENY policy=api rule=4"),
        ("frontend", "api", 8080, "GET /admin api.shop", DEFAULT),
        // requests: hosts
        ("frontend", "api", 8080, "GET /v1/orders API.SHOP.", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "GET /v1/orders api.shop:8443", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "GET /v1/orders x.y.shop", "ALLOW policy=api rule=1"),
        ("frontend", "api", 8080, "GET /v1/orders shop", DEFAULT),
        ("frontend", "api", 8080, "GET /v1/orders evil.com", DEFAULT),
        ("frontend", "api", 8080, "GET /v1/orders api.shop.evil.com", DEFAULT),
        ("frontend", "api", 8080, "GET /v1/orders -", DEFAULT),
        // requests: rules without `http`, CONNECT, ports
        ("ns/ops/svc/intruder", "api", 8080, "GET / -", "DENY policy=api rule=3"),
        ("ns/prod/web", "api", 8080, "DELETE /anything -", "ALLOW policy=api rule=5"),
        ("ns/prod/web", "api", 8080, "CONNECT / -", DEFAULT),
        ("batch", "api", 8080, "CONNECT / -", "ALLOW policy=api rule=6"),
        ("batch", "api", 8080, "GET / -", DEFAULT),
        ("frontend", "api", 9000, "GET /v1/orders api.shop", DEFAULT),
        // enforce + audit on one target: audit never changes the outcome
        ("api", "ns/data/svc/db", 5432, "tcp", "ALLOW policy=db rule=1\naudit: would deny policy=db-audit rule=1"),
        ("ns/analytics/svc/reports", "ns/data/svc/db", 5432, "tcp", "DENY policy=- rule=-\naudit: would allow policy=db-audit rule=2"),
        ("frontend", "ns/data/svc/db", 5432, "tcp", DEFAULT),
        ("api", "ns/data/svc/db", 5433, "tcp", DEFAULT),
        // a target only audit policies cover is not enforced yet
        ("frontend", "ns/analytics/svc/reports", 8080, "tcp", "ALLOW policy=reports rule=1"),
        ("api", "ns/analytics/svc/reports", 8080, "tcp", "AUDIT policy=- rule=-"),
        ("frontend", "ns/analytics/svc/reports", 9090, "tcp", "AUDIT policy=- rule=-"),
        ("frontend", "ns/analytics/svc/reports", 8080, "GET /x -", "ALLOW policy=reports rule=1"),
        // target patterns, and trust domains never crossing
        ("spiffe://other.org/ns/x/svc/y", "ns/edge/gateway", 443, "tcp", "ALLOW policy=wild rule=1"),
        ("frontend", "ns/edge/gateway", 443, "tcp", DEFAULT),
        ("spiffe://other.org/ns/x/svc/y", "ns/edge/gateway/sub", 443, "tcp", DEFAULT),
        ("spiffe://other.org", "ns/edge/gateway", 443, "tcp", DEFAULT),
        ("api", "ns/batch/jobs/svc/runner", 1, "tcp", "ALLOW policy=deep rule=1"),
        ("api", "ns/batch", 1, "tcp", DEFAULT),
        ("api", "ns/batch-evil/x", 1, "tcp", DEFAULT),
        ("api", "spiffe://other.org/ns/batch/x", 1, "tcp", DEFAULT),
    ];
    assert!(rows.len() >= 60, "{} rows", rows.len());
    let engine = engine();
    let mut failures = Vec::new();
    for (i, (peer, target, port, subject, expected)) in rows.iter().enumerate() {
        let actual = decide(&engine, peer, target, *port, subject);
        if actual != *expected {
            failures.push(format!(
                "row {}: {peer} -> {target}:{port} {subject}\n  expected {expected:?}\n  actual   {actual:?}",
                i + 1
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn candidates_are_only_matching_targets() {
    let engine = engine();
    let names = |target: &str| -> Vec<String> {
        engine
            .policies_for(&id(target))
            .iter()
            .map(|p| p.name.to_string())
            .collect()
    };
    assert_eq!(names("api"), ["api", "shop-quarantine"]);
    assert_eq!(names("ns/data/svc/db"), ["db", "db-audit"]);
    assert_eq!(names("ns/batch/a/b/c"), ["deep"]);
    assert!(names("ns/batch").is_empty());
    assert!(names("ns/edge/a/b").is_empty());
}

#[test]
fn explain_traces_each_rule() {
    let engine = engine();
    let (peer, target) = (id("frontend"), id("api"));
    let explanation = engine.explain(&Query {
        peer: &peer,
        target: &target,
        port: 8080,
        subject: Subject::Connection(Protocol::Tcp),
    });
    let text = explanation.to_string();
    for line in [
        "explain: spiffe://example.org/ns/shop/svc/frontend -> spiffe://example.org/ns/shop/svc/api port 8080: connection to a tcp port",
        "  policy api (target spiffe://example.org/ns/shop/svc/api, enforce)",
        "    rule 1 allow: no match: rule has `http`, which never opens a TCP port",
        "    rule 2 allow: no match: peer not in `from`",
        "    rule 4 deny: matches",
        "    rule 5 allow: no match: peer not in `from`",
        "  policy shop-quarantine (target spiffe://example.org/ns/shop/svc/*, enforce)",
        "  decision: DENY policy=api rule=4",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let nothing = engine.explain(&Query {
        peer: &peer,
        target: &id("ns/none/svc/x"),
        port: 1,
        subject: Subject::Connection(Protocol::Tcp),
    });
    assert!(
        nothing
            .to_string()
            .contains("no policy targets this identity: default deny")
    );
}

#[test]
fn empty_engine_denies() {
    let engine = Engine::default();
    let d = engine.decide_connection(&id("a"), &id("b"), 1, Protocol::Tcp);
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(!d.permits());
}
