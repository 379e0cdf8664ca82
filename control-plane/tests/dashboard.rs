//! The dashboard's JSON and routes against an in-process control plane, fed the way sidecars
//! feed it: workloads enrolled with join tokens, registered, watching their snapshots and
//! acknowledging them, and reporting flows over the mTLS API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sidewall_control_plane::testing::{TestControlPlane, http_request};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

const POLICIES: &str = "\
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api-from-frontend}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/api
  rules:
    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/frontend], ports: [8080], http: {methods: [GET, POST], paths: [/v1/orders]}}
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: db-from-api}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/db
  rules:
    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/api], ports: [5432]}
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: frontend-metrics}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/frontend
  mode: audit
  rules:
    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/monitor], ports: [9090]}
";

async fn get_json(cp: &TestControlPlane, path: &str) -> (Value, String) {
    let (status, head, body) = http_request(cp.ui, "GET", path, "127.0.0.1").await;
    assert_eq!(status, 200, "{path}: {body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    (serde_json::from_str(&body).unwrap(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_json_shows_the_graph_the_fleet_and_the_policies() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let (status, applied) = cp
        .operator()
        .call(
            Method::POST,
            "/v1/policies",
            Some(&json!({"files": [{"name": "demo.yaml", "text": POLICIES}]})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{applied}");

    let frontend = cp.workload(&format!("{TD}/frontend")).await;
    let api = cp.workload(&format!("{TD}/api")).await;
    let db = cp.workload(&format!("{TD}/db")).await;
    frontend.register(9090, "tcp").await;
    api.register(8080, "http").await;
    db.register(5432, "tcp").await;
    let watches = [
        frontend.watch_and_ack().await,
        api.watch_and_ack().await,
        db.watch_and_ack().await,
    ];
    // Each target's sidecar reports what it decided about its callers; HTTP flows come per
    // method and path and fold into one edge.
    api.report_flows(json!([
        {"peer": frontend.identity, "port": 8080, "protocol": "http", "method": "GET", "path": "/v1/orders", "count": 5, "allow": 5},
        {"peer": frontend.identity, "port": 8080, "protocol": "http", "method": "POST", "path": "/v1/orders", "count": 2, "allow": 2},
    ])).await;
    db.report_flows(json!([
        {"peer": api.identity, "port": 5432, "count": 3, "allow": 3},
        {"peer": frontend.identity, "port": 5432, "count": 2, "deny": 2, "last_denial": "default deny"},
    ])).await;
    frontend
        .report_flows(json!([{"peer": api.identity, "port": 9090, "count": 4, "audit": 4}]))
        .await;

    let (graph, graph_text) = get_json(&cp, "/api/graph").await;
    let nodes: Vec<_> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap(),
                n["connected"].as_bool().unwrap(),
                n["endpoint"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("api", true, "127.0.0.1:8080"),
            ("db", true, "127.0.0.1:5432"),
            ("frontend", true, "127.0.0.1:9090"),
        ]
    );
    let edges: Vec<_> = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = |v: &Value| v.as_str().unwrap().rsplit('/').next().unwrap().to_owned();
            (
                name(&e["from"]),
                name(&e["to"]),
                e["port"].as_u64().unwrap(),
                e["protocol"].as_str().unwrap().to_owned(),
                (
                    e["allow"].as_u64().unwrap(),
                    e["deny"].as_u64().unwrap(),
                    e["audit"].as_u64().unwrap(),
                ),
                e["last_denial"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let edge = |from: &str, to: &str, port, protocol: &str, counts, denial: Option<&str>| {
        (
            from.to_owned(),
            to.to_owned(),
            port,
            protocol.to_owned(),
            counts,
            denial.map(str::to_owned),
        )
    };
    assert_eq!(
        edges,
        [
            edge("api", "db", 5432, "tcp", (3, 0, 0), None),
            edge("api", "frontend", 9090, "tcp", (0, 0, 4), None),
            edge("frontend", "api", 8080, "http", (7, 0, 0), None),
            edge(
                "frontend",
                "db",
                5432,
                "tcp",
                (0, 2, 0),
                Some("default deny")
            ),
        ]
    );

    // The fleet: the same fields as the operator's GET /v1/fleet.
    let (fleet, fleet_text) = get_json(&cp, "/api/fleet").await;
    let (status, operator_fleet) = cp
        .operator()
        .call(Method::GET, "/v1/fleet", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fleet, operator_fleet);
    let proxies = fleet["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 3, "{fleet}");
    for proxy in proxies {
        assert_eq!(proxy["connected"], true, "{proxy}");
        assert!(proxy["applied"].as_u64().is_some(), "{proxy}");
        assert_eq!(proxy["applied"], proxy["sent"], "{proxy}");
        assert!(proxy["last_ack_at"].as_i64().is_some(), "{proxy}");
    }
    assert_eq!(proxies[0]["certificate_expires_at"], api.expires_at);

    let (policies, policies_text) = get_json(&cp, "/api/policies").await;
    assert_eq!(policies["version"], applied["version"]);
    assert_eq!(
        policies["applied_by"],
        "spiffe://sidewall.local/sidewall/operator/admin"
    );
    let summary: Vec<_> = policies["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["mode"].as_str().unwrap(),
                p["target"].as_str().unwrap().rsplit('/').next().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("api-from-frontend", "enforce", "api"),
            ("db-from-api", "enforce", "db"),
            ("frontend-metrics", "audit", "frontend"),
        ]
    );
    let rule = &policies["policies"][0]["rules"][0];
    assert_eq!(rule["action"], "allow");
    assert_eq!(rule["from"], json!([frontend.identity]));
    assert_eq!(rule["ports"], json!([8080]));
    assert_eq!(rule["http"]["methods"], json!(["GET", "POST"]));

    // No secret ever: no token, key or certificate in any answer.
    for text in [&graph_text, &fleet_text, &policies_text] {
        for secret in ["token", "PRIVATE KEY", "BEGIN CERTIFICATE", "secret"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    drop(watches);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_serves_only_get_on_its_paths_and_only_on_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let (status, head, page) = http_request(cp.ui, "GET", "/", "127.0.0.1").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    assert!(
        page.contains(r#"<svg id="graph""#) && page.contains(r#"src="/app.js""#),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external resource"
    );
    for (path, kind) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let (status, head, body) = http_request(cp.ui, "GET", path, "localhost").await;
        assert_eq!(status, 200, "{path}");
        assert!(head.contains(&format!("content-type: {kind}")), "{head}");
        assert!(!body.is_empty());
    }
    // An empty control plane: no nodes, no policy.
    let (status, _, body) = http_request(cp.ui, "GET", "/api/graph?x=1", "[::1]:4680").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"nodes":[],"edges":[],"flows_dropped":{}}"#)
    );

    let refused = [
        ("POST", "/api/graph", "127.0.0.1", 404),
        ("DELETE", "/api/policies", "127.0.0.1", 404),
        ("PUT", "/", "127.0.0.1", 404),
        ("GET", "/v1/fleet", "127.0.0.1", 404),
        ("GET", "/api/tokens", "127.0.0.1", 404),
        ("GET", "/index.html/../api", "127.0.0.1", 404),
        // DNS rebinding: a page on another origin whose name now points at 127.0.0.1.
        ("GET", "/api/policies", "attacker.example", 403),
        ("GET", "/api/fleet", "attacker.example:4680", 403),
    ];
    for (method, path, host, expected) in refused {
        let (status, _, _) = http_request(cp.ui, method, path, host).await;
        assert_eq!(status, expected, "{method} {path} Host: {host}");
    }
    // Never on the admin (probe) address.
    for path in ["/", "/api/graph", "/api/fleet", "/api/policies"] {
        let (status, _, _) = http_request(cp.admin, "GET", path, "127.0.0.1").await;
        assert_eq!(status, 404, "admin {path}");
    }
    cp.stop().await;
}
