//! Registration: a sidecar may only advertise the address it connects from, and may not take
//! an endpoint another identity holds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic to report failures

use hyper::{Method, StatusCode};
use serde_json::json;
use sidewall_control_plane::testing::TestControlPlane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_checked_against_the_source_and_other_identities() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let api = cp.workload("spiffe://sidewall.local/ns/shop/svc/api").await;
    let evil = cp
        .workload("spiffe://sidewall.local/ns/shop/svc/evil")
        .await;
    let register = |endpoint: &str, instance: &str| json!({"instance": instance, "endpoint": endpoint, "ports": [{"port": 8080, "protocol": "http"}]});

    let (status, body) = api
        .client
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&register("127.0.0.1:4643", "api-1")),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // Another instance of the same identity may share the endpoint's host on another port.
    let (status, _) = api
        .client
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&register("127.0.0.1:4644", "api-2")),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // Another identity cannot capture it...
    let (status, body) = evil
        .client
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&register("127.0.0.1:4643", "evil-1")),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("endpoint_taken")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("registered to spiffe://sidewall.local/ns/shop/svc/api")
    );
    // ...nor advertise an address it does not connect from.
    let (status, body) = evil
        .client
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&register("10.1.2.3:4643", "evil-1")),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("endpoint_not_yours")),
        "{body}"
    );
    let (status, body) = evil
        .client
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&json!({"instance": "evil-1", "endpoint": "api.shop:4643"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("endpoint_invalid")),
        "{body}"
    );

    // A virtual IP nobody declared is registered but refused: callers are not sent there.
    let with_vip = |endpoint: &str, instance: &str| json!({"instance": instance, "endpoint": endpoint, "ports": [{"port": 8080}], "addresses": ["10.96.0.10:8080"]});
    let (status, body) = evil
        .client
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&with_vip("127.0.0.1:4699", "evil-2")),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["addresses_refused"],
        json!([{"address": "10.96.0.10:8080", "reason": "not_declared"}]),
        "{body}"
    );

    // An operator is not a workload.
    let (status, body) = cp
        .operator()
        .call(
            Method::POST,
            "/v1/registrations",
            Some(&register("127.0.0.1:4650", "op-1")),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("not_a_workload")),
        "{body}"
    );

    // The directory shows the two api instances, and evil's (reached at its endpoint only).
    let (_, directory) = cp
        .operator()
        .call(Method::GET, "/v1/directory", None)
        .await
        .unwrap();
    let endpoints: Vec<&str> = directory["registrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        endpoints,
        ["127.0.0.1:4643", "127.0.0.1:4644", "127.0.0.1:4699"]
    );
}
