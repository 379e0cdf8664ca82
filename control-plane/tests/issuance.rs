//! Issuance end to end against an in-process control plane on loopback: every certificate is
//! checked by an independent parser and by `openssl verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

use std::process::Command;
use std::time::Duration;

use hyper::{Method, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use serde_json::{Value, json};
use sidewall_control_plane::client::Client;
use sidewall_control_plane::testing::{TestControlPlane, assert_svid};

const DAY: Duration = Duration::from_secs(86_400);

async fn token(cp: &TestControlPlane, identity: &str, uses: u32) -> String {
    let (status, body) = cp
        .operator()
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&json!({"identity": identity, "uses": uses})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

async fn redeem(client: &Client, csr: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut body = json!({ "csr": csr });
    if let Some(token) = token {
        body["token"] = token.into();
    }
    client
        .call(Method::POST, "/v1/certificates", Some(&body))
        .await
        .unwrap()
}

fn csr_for(key: &KeyPair, params: CertificateParams) -> String {
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn openssl_verify(dir: &std::path::Path, chain_pem: &str, bundle: &str) {
    let mut certs = chain_pem.split_inclusive("-----END CERTIFICATE-----\n");
    let (leaf, intermediate) = (certs.next().unwrap(), certs.next().unwrap());
    std::fs::write(dir.join("leaf.pem"), leaf).unwrap();
    std::fs::write(dir.join("intermediate.pem"), intermediate).unwrap();
    std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let output = Command::new("openssl")
            .args([
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                "bundle.pem",
                "-untrusted",
                "intermediate.pem",
                "leaf.pem",
            ])
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("leaf.pem: OK"),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_key_type_gets_a_valid_svid() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let algorithms: [(&str, &'static rcgen::SignatureAlgorithm); 3] = [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ];
    let mut keys: Vec<(String, KeyPair)> = algorithms
        .iter()
        .map(|(name, alg)| (name.to_string(), KeyPair::generate_for(alg).unwrap()))
        .collect();
    keys.push((
        "rsa2048".into(),
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap(),
    ));
    for (name, key) in keys {
        let identity = format!("spiffe://sidewall.local/ns/keys/svc/{name}");
        let token = token(&cp, &identity, 1).await;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ignored");
        let (status, body) = redeem(&cp.anonymous(), &csr_for(&key, params), Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        let chain = body["certificate_chain"].as_str().unwrap();
        assert_svid(chain, &identity, DAY);
        assert_eq!(body["identity"], identity.as_str());
        assert!(body["expires_at"].as_str().unwrap().ends_with('Z'));
        let work = tempfile::tempdir().unwrap();
        openssl_verify(work.path(), chain, body["trust_bundle"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_sans_and_ca_bits_are_ignored_never_copied() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let identity = "spiffe://sidewall.local/ns/shop/svc/api";
    let token = token(&cp, identity, 2).await;

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(
        (0..1000)
            .map(|i| format!("host{i}.evil.example"))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://sidewall.local/sidewall/control-plane"
            .try_into()
            .unwrap(),
    ));
    let (status, body) = redeem(&cp.anonymous(), &csr_for(&key, params), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_svid(body["certificate_chain"].as_str().unwrap(), identity, DAY);

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (status, body) = redeem(&cp.anonymous(), &csr_for(&key, params), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_svid(body["certificate_chain"].as_str().unwrap(), identity, DAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_with_the_current_certificate_and_idempotent_redemption() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |c| {
        c.workload_lifetime = Duration::from_secs(3600)
    })
    .await;
    let identity = "spiffe://sidewall.local/ns/shop/svc/db";
    let token = token(&cp, identity, 1).await;
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&key, CertificateParams::default());
    let (status, first) = redeem(&cp.anonymous(), &csr, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // A sidecar that crashed before saving its certificate retries with the same key.
    let (status, again) = redeem(&cp.anonymous(), &csr, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_ne!(first["serial"], again["serial"]);
    assert_svid(
        again["certificate_chain"].as_str().unwrap(),
        identity,
        Duration::from_secs(3600),
    );

    // Renewal: present the current certificate, send a CSR for a new key, no token.
    let client = cp.with_identity(
        first["certificate_chain"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    let new_key = KeyPair::generate().unwrap();
    let (status, renewed) = redeem(
        &client,
        &csr_for(&new_key, CertificateParams::default()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert_svid(
        renewed["certificate_chain"].as_str().unwrap(),
        identity,
        Duration::from_secs(3600),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_root_the_tokens_and_the_serials() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let bundle = std::fs::read_to_string(dir.path().join("trust-bundle.pem")).unwrap();
    let identity = "spiffe://sidewall.local/ns/shop/svc/web";
    let token = token(&cp, identity, 2).await;
    let key_a = KeyPair::generate().unwrap();
    let csr_a = csr_for(&key_a, CertificateParams::default());
    let (status, _) = redeem(&cp.anonymous(), &csr_a, Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let revoked = token_for_revocation(&cp).await;
    cp.stop().await;

    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("trust-bundle.pem")).unwrap(),
        bundle
    );
    // The token's first use survived: a second key takes the second use, a third is refused.
    let (status, body) = redeem(
        &cp.anonymous(),
        &csr_for(&KeyPair::generate().unwrap(), CertificateParams::default()),
        Some(&token),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = redeem(
        &cp.anonymous(),
        &csr_for(&KeyPair::generate().unwrap(), CertificateParams::default()),
        Some(&token),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_used")),
        "{body}"
    );
    // The revocation survived.
    let (status, body) = redeem(&cp.anonymous(), &csr_a, Some(&revoked)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_revoked")),
        "{body}"
    );
    // The issued serials survived: the operator list still shows the token as used.
    let (_, list) = cp
        .operator()
        .call(Method::GET, "/v1/tokens", None)
        .await
        .unwrap();
    let used: Vec<_> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["state"].as_str().unwrap().to_owned(),
                t["used"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(used.contains(&("used".to_owned(), 2)), "{list}");
}

async fn token_for_revocation(cp: &TestControlPlane) -> String {
    let token = token(cp, "spiffe://sidewall.local/ns/shop/svc/gone", 1).await;
    let id = token.split('.').nth(1).unwrap();
    let (status, _) = cp
        .operator()
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_issue_operators_and_workloads_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    let key = KeyPair::generate().unwrap();
    let body = json!({"name": "alice", "role": "admin", "csr": csr_for(&key, CertificateParams::default())});
    let (status, issued) = cp
        .operator()
        .call(Method::POST, "/v1/operators", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{issued}");
    assert_eq!(
        issued["identity"],
        "spiffe://sidewall.local/sidewall/operator/alice"
    );
    let alice = cp.with_identity(
        issued["certificate_chain"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    let (status, _) = alice.call(Method::GET, "/v1/tokens", None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugged_in_ca_signs_and_its_root_key_stays_out() {
    // The operator's own root (its key never given to Sidewall) and an intermediate.
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str, path_len: Option<u8>| {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.subject_alt_names =
            vec![SanType::URI("spiffe://sidewall.local".try_into().unwrap())];
        params.is_ca = IsCa::Ca(path_len.map_or(
            BasicConstraints::Unconstrained,
            BasicConstraints::Constrained,
        ));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca("My root", None);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, &root_key);
    let intermediate_key = KeyPair::generate().unwrap();
    let intermediate = ca("My intermediate", Some(0))
        .signed_by(&intermediate_key, &root_issuer)
        .unwrap();
    let files = dir.path().join("pki");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("root.pem"), root.pem()).unwrap();
    std::fs::write(files.join("intermediate.pem"), intermediate.pem()).unwrap();
    std::fs::write(
        files.join("intermediate.key"),
        intermediate_key.serialize_pem(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        files.join("intermediate.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let data = dir.path().join("data");
    let plug_in = sidewall_control_plane::ca::PlugIn {
        root_cert: files.join("root.pem"),
        intermediate_cert: files.join("intermediate.pem"),
        intermediate_key: files.join("intermediate.key"),
    };
    let cp = TestControlPlane::start(&data, |c| c.plug_in = Some(plug_in)).await;
    assert_eq!(
        std::fs::read_to_string(data.join("trust-bundle.pem")).unwrap(),
        root.pem(),
        "the bundle is the plugged-in root"
    );
    assert!(
        !data.join("ca/root.key").exists() && !data.join("ca/root.pem").exists(),
        "no CA of its own was generated"
    );
    let identity = "spiffe://sidewall.local/ns/shop/svc/pay";
    let token = token(&cp, identity, 1).await;
    let key = KeyPair::generate().unwrap();
    let (status, body) = redeem(
        &cp.anonymous(),
        &csr_for(&key, CertificateParams::default()),
        Some(&token),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chain = body["certificate_chain"].as_str().unwrap();
    assert_svid(chain, identity, DAY);
    let work = tempfile::tempdir().unwrap();
    openssl_verify(work.path(), chain, &root.pem());
    // The audit trail says which CA is in use: this plug-in, by its root.
    let (status, page) = cp
        .operator()
        .call(hyper::Method::GET, "/v1/audit", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    let started = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "control-plane.started")
        .unwrap_or_else(|| panic!("no start record: {page}"));
    assert_eq!(started["details"]["ca"], "plug-in", "{started}");
    assert_eq!(
        started["details"]["ca_root_sha256"],
        sidewall_control_plane::random::sha256_hex(root.der()),
        "{started}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path(), |_| {}).await;
    cp.stop().await;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("ca/intermediate.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = sidewall_control_plane::config::Config::load(
        None,
        sidewall_control_plane::config::Overrides {
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap();
    let error = sidewall_control_plane::server::prepare(config)
        .await
        .err()
        .expect("refused");
    assert!(
        error
            .to_string()
            .contains("private key is readable by group or others"),
        "{error}"
    );
}
