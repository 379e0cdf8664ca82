//! Decisions per second with 1, 100 and 10,000 policies.
//!
//! Policy `K*100+J` targets its own service `spiffe://example.org/ns/nsK/svc/sJ`, exactly, with
//! `/*` or with `/**` (by index modulo 3), and has four or five rules, two with `http`. Each
//! size is measured on a TCP connection, an HTTP connection and a request aimed at the policy in
//! the middle of the set (each allowed by a rule, after every rule of the policy is checked),
//! and on a target no policy matches (default deny). The sets are built from YAML text with the
//! real loader; building them is not measured. Goal (issue 2): under 1 µs per decision at
//! 10,000 policies.
//!
//! Run: `cargo bench -p sidewall-policies --bench decide`.

// A benchmark is not a test, so clippy's allow-expect-in-tests does not cover it; a fixture
// that fails to load is a bug in this file and should stop the run loudly.
#![allow(clippy::expect_used, reason = "fixture set-up in a benchmark")]

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sidewall_policies::engine::Request;
use sidewall_policies::load::{LoadOptions, load_str};
use sidewall_policies::{Engine, Outcome, Protocol, SpiffeId};

const SIZES: [usize; 3] = [1, 100, 10_000];

/// The service a policy protects: `ns/nsK/svc/sJ` for policy `K*100+J`.
fn service(i: usize) -> String {
    format!("spiffe://example.org/ns/ns{}/svc/s{}", i / 100, i % 100)
}

/// The target pattern of policy `i` and an ID it matches.
fn target(i: usize) -> (String, String) {
    let service = service(i);
    match i % 3 {
        0 => (service.clone(), service),
        1 => (format!("{service}/*"), format!("{service}/v1")),
        _ => (format!("{service}/**"), format!("{service}/v1/pod-0")),
    }
}

/// The YAML of `n` policies.
fn policies_yaml(n: usize) -> String {
    let mut yaml = String::with_capacity(n * 900);
    for i in 0..n {
        let ns = i / 100;
        let (pattern, _) = target(i);
        // Writing to a String cannot fail.
        let _ = write!(
            yaml,
            r#"---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {{name: policy-{i}}}
spec:
  target: "{pattern}"
  rules:
    - action: deny
      from: ["spiffe://example.org/ns/quarantine/**"]
    - action: allow
      from: ["spiffe://example.org/ns/ns{ns}/svc/*"]
      ports: [8080]
      http:
        methods: [GET, POST]
        paths: [/v1/orders, "/v1/orders/*/items", "/static/**"]
        hosts: [api.shop, "*.shop"]
    - action: allow
      from: ["spiffe://example.org/ns/ops/**"]
      ports: ["9000-9010"]
    - action: allow
      from: [spiffe://example.org/ns/ns{ns}/svc/frontend]
      ports: [5432]
"#
        );
        if i % 2 == 0 {
            yaml.push_str(
                "    - action: deny\n      from: [\"spiffe://example.org/ns/ops/**\"]\n      http: {paths: [\"/admin/**\"]}\n",
            );
        }
    }
    yaml
}

fn engine(n: usize) -> Engine {
    let options = LoadOptions {
        // 10,000 policies are about 7 MB of YAML, over the default 1 MiB file cap.
        max_file_bytes: u64::MAX,
        ..LoadOptions::default()
    };
    let loaded = load_str("bench.yaml", &policies_yaml(n), &options).expect("bench policies load");
    assert_eq!(loaded.policies.policies().len(), n);
    Engine::new(loaded.policies)
}

fn id(text: &str) -> SpiffeId {
    SpiffeId::parse(text).expect("bench identity is valid")
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let engine = engine(n);
        let middle = n / 2;
        let (_, target) = target(middle);
        let target = id(&target);
        let peer = id(&format!(
            "spiffe://example.org/ns/ns{}/svc/frontend",
            middle / 100
        ));
        let unmatched = id("spiffe://example.org/ns/none/svc/nobody");
        let request = Request {
            method: "GET",
            path: "/v1/orders/17/items",
            host: Some("api.shop"),
        };

        // Each query is checked once, so the figures are for the decisions described above.
        let tcp = || engine.decide_connection(&peer, &target, 5432, Protocol::Tcp);
        let http = || engine.decide_connection(&peer, &target, 8080, Protocol::Http);
        let req = || engine.decide_request(&peer, &target, 8080, request);
        let none = || engine.decide_connection(&peer, &unmatched, 5432, Protocol::Tcp);
        assert_eq!(tcp().outcome, Outcome::Allow, "{}", tcp());
        assert_eq!(http().outcome, Outcome::Allow, "{}", http());
        assert_eq!(req().outcome, Outcome::Allow, "{}", req());
        assert_eq!(none().outcome, Outcome::Deny, "{}", none());
        assert!(none().reason.is_none());

        group.bench_function(BenchmarkId::new("tcp_connection", n), |b| {
            b.iter(|| {
                engine.decide_connection(black_box(&peer), black_box(&target), 5432, Protocol::Tcp)
            })
        });
        group.bench_function(BenchmarkId::new("http_connection", n), |b| {
            b.iter(|| {
                engine.decide_connection(black_box(&peer), black_box(&target), 8080, Protocol::Http)
            })
        });
        group.bench_function(BenchmarkId::new("request", n), |b| {
            b.iter(|| {
                engine.decide_request(
                    black_box(&peer),
                    black_box(&target),
                    8080,
                    black_box(request),
                )
            })
        });
        group.bench_function(BenchmarkId::new("unmatched_target", n), |b| {
            b.iter(|| {
                engine.decide_connection(
                    black_box(&peer),
                    black_box(&unmatched),
                    5432,
                    Protocol::Tcp,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
