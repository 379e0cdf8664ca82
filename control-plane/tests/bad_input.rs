//! Bad input of every kind gets a clear error, issues nothing, stores nothing, and is counted.
//! One test, run in order, so that the refusal counters can be checked exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use sidewall_control_plane::client::Client;
use sidewall_control_plane::testing::TestControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn csr(key: &KeyPair) -> String {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn csr_der(key: &KeyPair) -> Vec<u8> {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

fn openssl_csr(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("openssl")
        .args([
            "req", "-new", "-nodes", "-subj", "/CN=x", "-keyout", "k.pem", "-out", "r.csr",
        ])
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(dir.path().join("r.csr")).unwrap()
}

/// A leaf for `identity` signed by `issuer`, valid from `from` to `until` (Unix seconds).
fn leaf(issuer: &Issuer<'_, KeyPair>, identity: &str, from: i64, until: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Case {
    name: &'static str,
    client: Client,
    body: Bytes,
    path: &'static str,
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_counted_and_nothing_is_issued() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |c| {
        c.issuance_per_minute = 2;
        c.request_timeout = Duration::from_secs(1);
    })
    .await;
    let operator = cp.operator();
    let anonymous = cp.anonymous();
    let mut next_service = 0;
    let mut token = |uses: u32| {
        next_service += 1;
        let identity = format!("spiffe://sidewall.local/ns/bad/svc/s{next_service}");
        let operator = operator.clone();
        async move {
            let (status, body) = operator
                .call(
                    Method::POST,
                    "/v1/tokens",
                    Some(&json!({"identity": identity, "uses": uses})),
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::CREATED, "{body}");
            (body["token"].as_str().unwrap().to_owned(), identity)
        }
    };
    let body =
        |csr: &str, token: &str| Bytes::from(json!({"csr": csr, "token": token}).to_string());
    let key = KeyPair::generate().unwrap();
    let good_csr = csr(&key);

    // A workload certificate for identity B, and certificates the CA never issued or that expired.
    let (token_b, identity_b) = token(1).await;
    let (status, issued_b) = anonymous
        .call(
            Method::POST,
            "/v1/certificates",
            Some(&json!({"csr": good_csr, "token": token_b})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let cert_b = issued_b["certificate_chain"].as_str().unwrap().to_owned();
    let as_b = cp.with_identity(&cert_b, &key.serialize_pem());
    let intermediate = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.path().join("ca/intermediate.pem")).unwrap(),
        KeyPair::from_pem(
            &std::fs::read_to_string(dir.path().join("ca/intermediate.key")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (expired_cert, expired_key) = leaf(
        &intermediate,
        "spiffe://sidewall.local/ns/bad/svc/old",
        now - 7200,
        now - 3600,
    );
    let other_ca_key = KeyPair::generate().unwrap();
    let mut other_ca_params = CertificateParams::default();
    other_ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = Issuer::new(other_ca_params, other_ca_key);
    let (foreign_cert, foreign_key) = leaf(
        &other_ca,
        "spiffe://sidewall.local/ns/bad/svc/foreign",
        now - 60,
        now + 3600,
    );

    // Revoked identity and serial, for renewals.
    let (token_r, identity_r) = token(1).await;
    let key_r = KeyPair::generate().unwrap();
    let (_, issued_r) = anonymous
        .call(
            Method::POST,
            "/v1/certificates",
            Some(&json!({"csr": csr(&key_r), "token": token_r})),
        )
        .await
        .unwrap();
    let as_revoked = cp.with_identity(
        issued_r["certificate_chain"].as_str().unwrap(),
        &key_r.serialize_pem(),
    );
    let (status, _) = operator
        .call(
            Method::POST,
            "/v1/revocations",
            Some(&json!({"identity": identity_r})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (token_s, _) = token(1).await;
    let key_s = KeyPair::generate().unwrap();
    let (_, issued_s) = anonymous
        .call(
            Method::POST,
            "/v1/certificates",
            Some(&json!({"csr": csr(&key_s), "token": token_s})),
        )
        .await
        .unwrap();
    let as_revoked_serial = cp.with_identity(
        issued_s["certificate_chain"].as_str().unwrap(),
        &key_s.serialize_pem(),
    );
    let (status, _) = operator
        .call(
            Method::POST,
            "/v1/revocations",
            Some(&json!({"serial": issued_s["serial"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // Tokens in each bad state.
    let (used_token, _) = token(1).await;
    anonymous
        .call(
            Method::POST,
            "/v1/certificates",
            Some(&json!({"csr": csr(&KeyPair::generate().unwrap()), "token": used_token})),
        )
        .await
        .unwrap();
    let (revoked_token, _) = token(1).await;
    operator
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{}", revoked_token.split('.').nth(1).unwrap()),
            None,
        )
        .await
        .unwrap();
    let (status, short) = operator
        .call(
            Method::POST,
            "/v1/tokens",
            Some(
                &json!({"identity": "spiffe://sidewall.local/ns/bad/svc/short", "ttl_seconds": 1}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let expired_token = short["token"].as_str().unwrap().to_owned();
    let (fresh, _) = token(1).await;
    let parts: Vec<&str> = fresh.split('.').collect();
    let wrong_secret = format!("swt1.{}.{}.{}", parts[1], "0".repeat(32), parts[3]);
    let other_ca_token = format!("swt1.{}.{}.{}", parts[1], parts[2], "ab".repeat(32));
    let (token_a, _) = token(1).await;
    let (rate_token, _) = token(5).await;

    // CSRs of every broken kind.
    let der = csr_der(&key);
    let mut bad_signature = der.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    let mut trailing = der.clone();
    trailing.extend_from_slice(&[0, 0]);
    let huge = format!("{}{}", "#".repeat(70 * 1024), good_csr);
    let rsa1024 = openssl_csr(&["-newkey", "rsa:1024"]);
    let secp256k1 = openssl_csr(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"]);
    let certificate_pem = cert_b
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .to_owned();

    tokio::time::sleep(Duration::from_millis(1100)).await; // lets the 1 s token expire

    let c = |client: &Client| client.clone();
    let cert = "/v1/certificates";
    #[rustfmt::skip]
    let cases = vec![
        Case { name: "body not JSON", client: c(&anonymous), body: Bytes::from_static(b"csr=abc"), path: cert, status: StatusCode::BAD_REQUEST, code: "invalid_json", message: "body is not the expected JSON" },
        Case { name: "JSON without csr", client: c(&anonymous), body: Bytes::from_static(b"{\"token\": \"x\"}"), path: cert, status: StatusCode::BAD_REQUEST, code: "invalid_json", message: "missing field `csr`" },
        Case { name: "CSR not PEM", client: c(&anonymous), body: body("hello", &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_not_pem", message: "no PEM CERTIFICATE REQUEST block" },
        Case { name: "PEM not a CSR", client: c(&anonymous), body: body(&certificate_pem, &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_not_pem", message: "no PEM CERTIFICATE REQUEST block" },
        Case { name: "truncated DER", client: c(&anonymous), body: body(&pem("CERTIFICATE REQUEST", &der[..der.len() / 2]), &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_malformed", message: "CSR does not parse" },
        Case { name: "trailing bytes after the DER", client: c(&anonymous), body: body(&pem("CERTIFICATE REQUEST", &trailing), &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_trailing_bytes", message: "2 bytes after the CSR" },
        Case { name: "two CSRs in one PEM", client: c(&anonymous), body: body(&format!("{good_csr}{good_csr}"), &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_several", message: "2 CSRs in one request" },
        Case { name: "CSR over 64 KiB", client: c(&anonymous), body: body(&huge, &fresh), path: cert, status: StatusCode::PAYLOAD_TOO_LARGE, code: "csr_too_large", message: "over the 65536-byte limit" },
        Case { name: "bad CSR signature", client: c(&anonymous), body: body(&pem("CERTIFICATE REQUEST", &bad_signature), &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_bad_signature", message: "signature does not verify" },
        Case { name: "RSA-1024", client: c(&anonymous), body: body(&rsa1024, &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_weak_key", message: "RSA key of 1024 bits is too small" },
        Case { name: "unsupported curve", client: c(&anonymous), body: body(&secp256k1, &fresh), path: cert, status: StatusCode::BAD_REQUEST, code: "csr_unsupported_key", message: "unsupported key type EC curve" },
        Case { name: "missing token", client: c(&anonymous), body: Bytes::from(json!({"csr": good_csr}).to_string()), path: cert, status: StatusCode::UNAUTHORIZED, code: "token_missing", message: "first contact needs a join token" },
        Case { name: "malformed token", client: c(&anonymous), body: body(&good_csr, "let-me-in"), path: cert, status: StatusCode::BAD_REQUEST, code: "token_malformed", message: "malformed join token" },
        Case { name: "wrong secret", client: c(&anonymous), body: body(&good_csr, &wrong_secret), path: cert, status: StatusCode::UNAUTHORIZED, code: "token_unknown", message: "unknown join token" },
        Case { name: "token pinned to another CA", client: c(&anonymous), body: body(&good_csr, &other_ca_token), path: cert, status: StatusCode::UNAUTHORIZED, code: "token_other_ca", message: "issued by another control plane" },
        Case { name: "expired token", client: c(&anonymous), body: body(&good_csr, &expired_token), path: cert, status: StatusCode::UNAUTHORIZED, code: "token_expired", message: "join token expired" },
        Case { name: "reused token", client: c(&anonymous), body: body(&good_csr, &used_token), path: cert, status: StatusCode::UNAUTHORIZED, code: "token_used", message: "join token already used" },
        Case { name: "revoked token", client: c(&anonymous), body: body(&good_csr, &revoked_token), path: cert, status: StatusCode::UNAUTHORIZED, code: "token_revoked", message: "join token revoked" },
        Case { name: "token for A with a certificate for B", client: c(&as_b), body: body(&good_csr, &token_a), path: cert, status: StatusCode::FORBIDDEN, code: "identity_mismatch", message: "but the client certificate is for spiffe://sidewall.local/ns/bad/svc/s1" },
        Case { name: "renewal of a revoked identity", client: c(&as_revoked), body: Bytes::from(json!({"csr": good_csr}).to_string()), path: cert, status: StatusCode::FORBIDDEN, code: "revoked", message: "is revoked" },
        Case { name: "renewal of a revoked serial", client: c(&as_revoked_serial), body: Bytes::from(json!({"csr": good_csr}).to_string()), path: cert, status: StatusCode::FORBIDDEN, code: "revoked", message: "is revoked" },
        Case { name: "renewal as an operator", client: c(&operator), body: Bytes::from(json!({"csr": good_csr}).to_string()), path: cert, status: StatusCode::FORBIDDEN, code: "not_a_workload", message: "only workload identities are issued" },
        Case { name: "token for a reserved identity", client: c(&operator), body: Bytes::from(json!({"identity": "spiffe://sidewall.local/sidewall/control-plane"}).to_string()), path: "/v1/tokens", status: StatusCode::BAD_REQUEST, code: "not_a_workload", message: "never issued to workloads" },
        Case { name: "token for another trust domain", client: c(&operator), body: Bytes::from(json!({"identity": "spiffe://evil.org/ns/a/svc/b"}).to_string()), path: "/v1/tokens", status: StatusCode::BAD_REQUEST, code: "foreign_trust_domain", message: "is not in trust domain sidewall.local" },
        Case { name: "token TTL over the cap", client: c(&operator), body: Bytes::from(json!({"identity": "spiffe://sidewall.local/ns/a/svc/b", "ttl_seconds": 86_401}).to_string()), path: "/v1/tokens", status: StatusCode::BAD_REQUEST, code: "ttl_out_of_range", message: "ttl must be from 1 s to 86400 s" },
        Case { name: "operator route without a certificate", client: c(&anonymous), body: Bytes::from(json!({"identity": "spiffe://sidewall.local/ns/a/svc/b"}).to_string()), path: "/v1/tokens", status: StatusCode::UNAUTHORIZED, code: "operator_credential_required", message: "needs an operator certificate" },
        Case { name: "operator route with a workload certificate", client: c(&as_b), body: Bytes::from(json!({"identity": "spiffe://sidewall.local/ns/a/svc/b"}).to_string()), path: "/v1/tokens", status: StatusCode::FORBIDDEN, code: "not_an_operator", message: "is not an operator identity" },
        Case { name: "operator name with a slash", client: c(&operator), body: Bytes::from(json!({"name": "a/b", "csr": good_csr}).to_string()), path: "/v1/operators", status: StatusCode::BAD_REQUEST, code: "invalid_name", message: "must be one segment" },
    ];
    assert!(cases.len() >= 25);
    let before = metrics.render();
    let issued_before = metric(
        &before,
        "sidewall_control_plane_certificates_issued_total",
        &[],
    );
    let mut expected_refusals: std::collections::BTreeMap<&str, u64> = Default::default();
    for case in &cases {
        let (status, answer): (StatusCode, Value) = case
            .client
            .call_bytes(Method::POST, case.path, case.body.clone())
            .await
            .unwrap();
        assert_eq!(status, case.status, "{}: {answer}", case.name);
        assert_eq!(answer["error"], case.code, "{}: {answer}", case.name);
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(case.message), "{}: {message}", case.name);
        *expected_refusals.entry(case.code).or_default() += 1;
    }

    // Rate limit: two certificates a minute per identity, the third is refused.
    for (i, expected) in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ]
    .into_iter()
    .enumerate()
    {
        let key = KeyPair::generate().unwrap();
        let (status, answer) = anonymous
            .call(
                Method::POST,
                cert,
                Some(&json!({"csr": csr(&key), "token": rate_token})),
            )
            .await
            .unwrap();
        assert_eq!(status, expected, "rate limit attempt {}: {answer}", i + 1);
    }
    *expected_refusals.entry("rate_limited").or_default() += 1;

    let after = metrics.render();
    for (code, count) in &expected_refusals {
        let delta = metric(
            &after,
            "sidewall_control_plane_refusals_total",
            &[("reason", code)],
        ) - metric(
            &before,
            "sidewall_control_plane_refusals_total",
            &[("reason", code)],
        );
        assert_eq!(delta, *count, "refusals counted for {code}");
    }
    // Only the two rate-limit probes were issued; no refused request issued anything.
    assert_eq!(
        metric(
            &after,
            "sidewall_control_plane_certificates_issued_total",
            &[]
        ) - issued_before,
        2
    );
    // A refused CSR spends no token use.
    let (_, tokens) = operator
        .call(Method::GET, "/v1/tokens", None)
        .await
        .unwrap();
    let fresh_id = fresh.split('.').nth(1).unwrap();
    let fresh_state = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == fresh_id)
        .unwrap();
    assert_eq!(
        (fresh_state["used"].as_u64(), fresh_state["state"].as_str()),
        (Some(0), Some("active"))
    );

    // Handshake-level refusals: expired certificate, another CA's certificate, non-TLS bytes.
    for (name, client, reason) in [
        (
            "expired certificate",
            cp.with_identity(&expired_cert, &expired_key),
            "certificate_expired",
        ),
        (
            "another CA's certificate",
            cp.with_identity(&foreign_cert, &foreign_key),
            "unknown_issuer",
        ),
    ] {
        let result = client
            .call(Method::POST, cert, Some(&json!({"csr": good_csr})))
            .await;
        assert!(result.is_err(), "{name}: {result:?}");
        // The server counts the failure after the client has seen it: wait for the count.
        let counted = async {
            loop {
                let text = metrics.render();
                let name = "sidewall_control_plane_tls_handshake_failures_total";
                if metric(&text, name, &[("reason", reason)]) >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), counted)
            .await
            .unwrap_or_else(|_| panic!("{name}: no handshake failure counted as {reason}"));
    }

    // A body declared over 1 MiB is refused from its headers, before it is read.
    let tls = tokio_rustls::TlsConnector::from(anonymous.tls());
    let tcp = tokio::net::TcpStream::connect(cp.api).await.unwrap();
    let mut stream = tls
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    stream
        .write_all(b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n{")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"error\":\"body_too_large\""), "{text}");
    drop(stream);
    let mut raw = tokio::net::TcpStream::connect(cp.api).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        n == 0 || !buf[..n].starts_with(b"HTTP/1.1 200"),
        "plaintext must not be served"
    );

    // A slow client that never finishes its body is cut off after the request timeout.
    let tls = tokio_rustls::TlsConnector::from(anonymous.tls());
    let tcp = tokio::net::TcpStream::connect(cp.api).await.unwrap();
    let mut stream = tls
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"csr\"",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .ok();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"body_timeout\""), "{text}");

    // Headers that never finish: the connection is closed.
    let tcp = tokio::net::TcpStream::connect(cp.api).await.unwrap();
    let mut stream = tls
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    stream
        .write_all(b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "slow headers must be cut off");
    let _ = identity_b;
    cp.stop().await;
}
