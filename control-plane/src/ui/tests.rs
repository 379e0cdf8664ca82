//! The graph's aggregation as a table, and the `Host` check.

use super::*;

const FRONTEND: &str = "spiffe://sidewall.local/ns/demo/svc/frontend";
const API: &str = "spiffe://sidewall.local/ns/demo/svc/api";
const DB: &str = "spiffe://sidewall.local/ns/demo/svc/db";

fn flow(
    peer: &str,
    target: &str,
    method: Option<&str>,
    (allow, deny, audit): (u64, u64, u64),
    last_denial: Option<&str>,
    last_seen: i64,
) -> (FlowKey, FlowStats) {
    (
        FlowKey {
            peer: peer.into(),
            target: target.into(),
            port: 8080,
            protocol: Protocol::Http,
            method: method.map(Into::into),
            path: method.map(|_| "/v1/orders".into()),
        },
        FlowStats {
            count: allow + deny + audit,
            allow,
            deny,
            audit,
            last_denial: last_denial.map(Into::into),
            last_seen,
        },
    )
}

#[test]
fn flows_fold_over_methods_and_peers_become_nodes() {
    let flows = [
        flow(FRONTEND, API, Some("GET"), (5, 0, 0), None, 10),
        flow(
            FRONTEND,
            API,
            Some("DELETE"),
            (0, 2, 0),
            Some("default deny"),
            20,
        ),
        flow(FRONTEND, API, Some("PUT"), (0, 1, 0), Some("older"), 15),
        flow(API, DB, None, (0, 0, 3), None, 10),
    ];
    let registrations = [RegistrationRecord {
        instance: "api-1".into(),
        identity: API.into(),
        endpoint: "127.0.0.1:4643".into(),
        ports: Vec::new(),
        addresses: Vec::new(),
        registered_at: 0,
    }];
    let fleet = [FleetEntry {
        instance: "api-1".into(),
        identity: API.into(),
        endpoint: Some("127.0.0.1:4643".into()),
        connected: true,
        since: 0,
        replica: String::new(),
        sent: Some(2),
        applied: Some(2),
        last_ack_at: None,
        last_rejection: None,
        certificate_expires_at: None,
        certificate_serial: None,
        addresses_refused: Vec::new(),
        keepalive: None,
        stale: false,
        sidecar: None,
        processed: 0,
    }];
    let graph = graph(&flows, &fleet, &registrations);
    let nodes: Vec<_> = graph
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.connected, n.endpoint.as_deref()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("api", true, Some("127.0.0.1:4643")),
            ("db", false, None),
            ("frontend", false, None),
        ]
    );
    let edges: Vec<_> = graph
        .edges
        .iter()
        .map(|e| {
            (
                service_name(&e.from),
                service_name(&e.to),
                (e.allow, e.deny, e.audit),
                e.last_denial.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            ("api".into(), "db".into(), (0, 0, 3), None),
            (
                "frontend".into(),
                "api".into(),
                (5, 3, 0),
                Some("default deny")
            ),
        ]
    );
}

#[test]
fn host_names() {
    let dashboard = Dashboard {
        distribution: Arc::new(Distribution::for_tests()),
        server_names: vec!["cp.example.org".into()],
    };
    let cases = [
        (Some("127.0.0.1:4680"), true),
        (Some("[::1]:4680"), true),
        (Some("localhost:4680"), true),
        (Some("LOCALHOST"), true),
        (Some("cp.example.org:4680"), true),
        (None, true),
        (Some("attacker.example:4680"), false),
        (Some("localhost.attacker.example"), false),
    ];
    for (host, allowed) in cases {
        let mut request = Request::builder().uri("/api/graph");
        if let Some(host) = host {
            request = request.header(header::HOST, host);
        }
        let request = request.body(()).unwrap();
        let status = dashboard.answer(&request).status();
        assert_eq!(status == StatusCode::OK, allowed, "{host:?}: {status}");
    }
}
