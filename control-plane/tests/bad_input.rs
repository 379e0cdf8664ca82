//! Bad input of every kind gets a clear error, issues nothing, stores nothing, and is counted.
//! One test, run in order, so that the refusal counters can be checked exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use sidewall_control_plane::client::Client;
use sidewall_control_plane::testing::{TestControlPlane, TestIssuer};
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

/// Base64url without padding, as JWTs use it.
fn base64url(bytes: &[u8]) -> String {
    base64_encode(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// The cluster the service-account cases come from: an issuer (key id `k1`) with its JWKS
/// written as a file, and claims as a kubelet projects them for pod `api-1` of service account
/// `shop/api` with audience `sidewall`.
struct Cluster {
    issuer: TestIssuer,
    jwks: std::path::PathBuf,
}

impl Cluster {
    fn new(dir: &std::path::Path) -> Self {
        let issuer = TestIssuer::new("k1");
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, issuer.jwks()).unwrap();
        Self { issuer, jwks }
    }

    fn config(&self) -> sidewall_control_plane::attestation::kubernetes::KubernetesConfig {
        sidewall_control_plane::attestation::kubernetes::KubernetesConfig {
            issuer: self.issuer.url.clone(),
            keys: sidewall_control_plane::attestation::kubernetes::KeySource::File(
                self.jwks.clone(),
            ),
            token_review: None,
            audience: "sidewall".into(),
            identity: sidewall_control_plane::attestation::kubernetes::DEFAULT_IDENTITY.into(),
            namespaces: vec!["shop".into()],
            service_accounts: vec![],
        }
    }

    fn claims(&self) -> Value {
        self.issuer.claims("shop", "api", "api-1", "sidewall", 600)
    }

    /// A token with `claims`, signed by `key` (the cluster's when `None`) with key id `kid`.
    fn token_by(&self, claims: &Value, key: Option<&KeyPair>, kid: &str) -> String {
        self.issuer.sign(claims, key, kid)
    }

    /// A token with the usual claims changed by `change`.
    fn token(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = self.claims();
        change(&mut claims);
        self.token_by(&claims, None, "k1")
    }
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

/// A certificate from `path` (`/v1/certificates` or `/v1/operators`) for `key`, asked by
/// `client` with `body`: the answer, and a client presenting it.
async fn credential(
    cp: &TestControlPlane,
    client: &Client,
    path: &str,
    body: Value,
    key: &KeyPair,
) -> (Value, Client) {
    let (status, issued) = client.call(Method::POST, path, Some(&body)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{issued}");
    let presenting = cp.with_identity(
        issued["certificate_chain"].as_str().unwrap(),
        &key.serialize_pem(),
    );
    (issued, presenting)
}

/// Revokes the `identity` or `serial` in `body`, as `operator`.
async fn revoke(operator: &Client, body: Value) {
    let (status, answer) = operator
        .call(Method::POST, "/v1/revocations", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
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

/// One refused request: what is sent, to which operation of docs/openapi.yaml, and the answer
/// it must get.
struct Case {
    name: String,
    client: Client,
    /// The operation: method and path template, as in docs/openapi.yaml.
    op: String,
    /// The path requested, when it is not the operation's own (parameters, a query).
    path: Option<String>,
    body: Bytes,
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

impl Case {
    fn new(
        name: impl Into<String>,
        client: &Client,
        op: impl Into<String>,
        body: impl Into<Bytes>,
        (status, code, message): (StatusCode, &'static str, &'static str),
    ) -> Self {
        Self {
            name: name.into(),
            client: client.clone(),
            op: op.into(),
            path: None,
            body: body.into(),
            status,
            code,
            message,
        }
    }

    fn at(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

const CERT: &str = "POST /v1/certificates";

/// Every error answer docs/openapi.yaml documents: operation (`METHOD /path`) to the set of
/// (status, code).
fn documented() -> BTreeMap<String, BTreeSet<(u16, String)>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let description: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut documented = BTreeMap::new();
    for (path, operations) in description["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let answers: &mut BTreeSet<(u16, String)> = documented
                .entry(format!("{} {path}", method.to_uppercase()))
                .or_default();
            for (status, response) in operation["responses"].as_object().unwrap() {
                let status: u16 = status.parse().unwrap();
                if status < 400 {
                    continue;
                }
                let codes = &response["content"]["application/json"]["schema"]["allOf"][1]["properties"]
                    ["error"]["enum"];
                for code in codes.as_array().unwrap() {
                    answers.insert((status, code.as_str().unwrap().to_owned()));
                }
            }
        }
    }
    documented
}

/// Every code in the table of docs/api.md#errors.
fn codes_in_the_reference() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let text = std::fs::read_to_string(path).unwrap();
    let section = text.split("\n## Errors\n").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
        .map(|(code, _)| code.to_owned())
        .collect()
}

/// The operations of `documented` whose answers include `(status, code)`.
fn operations_answering(
    documented: &BTreeMap<String, BTreeSet<(u16, String)>>,
    status: u16,
    code: &str,
) -> Vec<String> {
    documented
        .iter()
        .filter(|(_, answers)| answers.contains(&(status, code.to_owned())))
        .map(|(op, _)| op.clone())
        .collect()
}

/// The path of `op` with its parameters filled in.
fn path_of(op: &str) -> String {
    op.split_once(' ')
        .unwrap()
        .1
        .replace("{id}", "x")
        .replace("{instance}", "x")
        .replace("{name}", "x")
        .replace("{version}", "current")
}

/// A TLS connection to the API as `client`.
async fn connect(
    client: &Client,
    api: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = tokio_rustls::TlsConnector::from(client.tls());
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    tls.connect(
        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
        tcp,
    )
    .await
    .unwrap()
}

/// Sends a request head and the start of a body over TLS as `client`; returns what the server
/// answered before closing (or `wait` passed).
async fn send_raw(
    client: &Client,
    api: std::net::SocketAddr,
    request: String,
    wait: Duration,
) -> String {
    let mut stream = connect(client, api).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_counted_and_nothing_is_issued() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path());
    let cp = TestControlPlane::start(&dir.path().join("cp"), |c| {
        c.kubernetes = Some(cluster.config());
        c.issuance_per_minute = 2;
        c.identity_limits.instances = 1;
        c.identity_limits.addresses = 1;
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
        &std::fs::read_to_string(cp.data_dir.join("ca/intermediate.pem")).unwrap(),
        KeyPair::from_pem(
            &std::fs::read_to_string(cp.data_dir.join("ca/intermediate.key")).unwrap(),
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
    let asked = json!({"csr": csr(&key_r), "token": token_r});
    let (_, as_revoked) = credential(&cp, &anonymous, "/v1/certificates", asked, &key_r).await;
    revoke(&operator, json!({"identity": identity_r})).await;
    let (token_s, _) = token(1).await;
    let key_s = KeyPair::generate().unwrap();
    let asked = json!({"csr": csr(&key_s), "token": token_s});
    let (issued_s, as_revoked_serial) =
        credential(&cp, &anonymous, "/v1/certificates", asked, &key_s).await;
    revoke(&operator, json!({"serial": issued_s["serial"]})).await;

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

    // Two workloads for the distribution routes: W's one sidecar instance (the limit is 1),
    // `w-1`, registered at 127.0.0.1:5001 and watching; V with none yet.
    let w = cp.workload("spiffe://sidewall.local/ns/bad/svc/w").await;
    w.register(5001, "tcp").await;
    let _w_watch = w.watch_and_ack().await;
    let v = cp.workload("spiffe://sidewall.local/ns/bad/svc/v").await;
    // U's sidecar watches too, so a segmentation test has a pair to probe (U → W:5001, which
    // no policy allows) and stays under way: this U never answers its probe.
    let u = cp.workload("spiffe://sidewall.local/ns/bad/svc/u").await;
    let _u_watch = u
        .watch_and_ack_as(json!({"version": "0.1.0", "probes": true}))
        .await;
    let (status, run) = operator
        .call(Method::POST, "/v1/verifications", Some(&json!({})))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["pairs"].as_array().unwrap().len(), 1, "{run}");
    // An operator whose credential was revoked.
    let gone_key = KeyPair::generate().unwrap();
    let asked = json!({"name": "gone", "role": "viewer", "csr": csr(&gone_key)});
    let (gone, as_gone) = credential(&cp, &operator, "/v1/operators", asked, &gone_key).await;
    revoke(&operator, json!({"identity": gone["identity"]})).await;
    // An operator who may only read.
    let viewer_key = KeyPair::generate().unwrap();
    let asked = json!({"name": "watcher", "role": "viewer", "csr": csr(&viewer_key)});
    let (_, as_viewer) = credential(&cp, &operator, "/v1/operators", asked, &viewer_key).await;

    let documented = documented();
    let needs = |op: &str, code: &str| documented[op].contains(&(401, code.to_owned()));
    // Who may get past the credential check of `op`.
    let caller = |op: &str| {
        if needs(op, "operator_credential_required") {
            &operator
        } else if needs(op, "workload_credential_required") {
            &w.client
        } else {
            &anonymous
        }
    };
    let to_json = |value: Value| Bytes::from(value.to_string());
    let ack = |instance: &str, status: &str| {
        to_json(
            json!({"instance": instance, "version": {"epoch": "e", "counter": 1}, "status": status}),
        )
    };
    let register = |instance: &str, endpoint: &str, extra: Value| {
        let mut body = json!({"instance": instance, "endpoint": endpoint, "ports": [{"port": 5001, "protocol": "tcp"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        to_json(body)
    };
    let files = |count: usize, text: &str| {
        let files: Vec<Value> = (0..count)
            .map(|i| json!({"name": format!("f{i}.yaml"), "text": text}))
            .collect();
        to_json(json!({ "files": files }))
    };
    let flows: Vec<Value> = (0..10_001)
        .map(|i| json!({"peer": "spiffe://sidewall.local/ns/bad/svc/x", "port": i % 60_000 + 1, "count": 1}))
        .collect();

    let c = |client: &Client| client.clone();
    const BAD: StatusCode = StatusCode::BAD_REQUEST;
    const NOT_FOUND: StatusCode = StatusCode::NOT_FOUND;
    const CONFLICT: StatusCode = StatusCode::CONFLICT;
    const TOO_MANY: StatusCode = StatusCode::TOO_MANY_REQUESTS;
    const REGISTER: &str = "POST /v1/registrations";
    const ACK: &str = "POST /v1/acks";
    const WATCH: &str = "GET /v1/snapshots/watch";
    // Service-account tokens of every bad kind.
    let sa =
        |jwt: &str| to_json(json!({"csr": good_csr, "service_account_token": jwt, "pod": "api-1"}));
    let valid = cluster.token(|_| {});
    let (_, rest) = valid.split_once('.').unwrap();
    let none_header = base64url(br#"{"alg":"none","kid":"k1"}"#);
    let unsigned = format!("{none_header}.{}.", rest.split_once('.').unwrap().0);
    let hmac = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &cluster.claims(),
        &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(&cluster.jwks).unwrap()).unwrap(),
    )
    .unwrap();
    let stranger = KeyPair::generate().unwrap();
    let now = cluster.claims()["iat"].as_u64().unwrap();
    let other_cp_dir = tempfile::tempdir().unwrap();
    let no_kubernetes = TestControlPlane::start(other_cp_dir.path(), |_| {}).await;
    // Two more with a TokenReview after the offline checks: an API server that no longer knows
    // the (otherwise valid) token, and one that cannot be reached.
    let review_server = sidewall_control_plane::testing::ReviewServer::start(dir.path());
    let with_review = |url: String| {
        let mut config = cluster.config();
        config.token_review = Some(
            sidewall_control_plane::attestation::kubernetes::TokenReview {
                url,
                ca_file: review_server.ca_file.clone(),
                bearer_token_file: None,
            },
        );
        config
    };
    let reviewed_dir = tempfile::tempdir().unwrap();
    let reviewed_config = with_review(review_server.url.clone());
    let reviewed = TestControlPlane::start(reviewed_dir.path(), |c| {
        c.kubernetes = Some(reviewed_config)
    })
    .await;
    let unreviewable_dir = tempfile::tempdir().unwrap();
    let unreviewable_config = with_review(format!(
        "https://127.0.0.1:{}",
        sidewall_control_plane::testing::free_port()
    ));
    let unreviewable = TestControlPlane::start(unreviewable_dir.path(), |c| {
        c.kubernetes = Some(unreviewable_config)
    })
    .await;
    #[rustfmt::skip]
    let sa_cases = [
        ("not a JWT", "let-me-in".to_owned(), (BAD, "sa_token_malformed", "is not a JWT")),
        ("algorithm none", unsigned, (StatusCode::UNAUTHORIZED, "sa_token_algorithm", "signed with none, which is not accepted")),
        ("a shared-secret algorithm", hmac, (StatusCode::UNAUTHORIZED, "sa_token_algorithm", "HS256, which is not accepted")),
        ("a key id the issuer does not have", cluster.token_by(&cluster.claims(), None, "k9"), (StatusCode::UNAUTHORIZED, "sa_token_key_unknown", "key id \"k9\"")),
        ("signed by another key", cluster.token_by(&cluster.claims(), Some(&stranger), "k1"), (StatusCode::UNAUTHORIZED, "sa_token_signature", "signature does not verify")),
        ("another issuer", cluster.token(|c| c["iss"] = json!("https://evil.example")), (StatusCode::UNAUTHORIZED, "sa_token_issuer", "from another issuer")),
        ("another audience", cluster.token(|c| c["aud"] = json!(["https://kubernetes.default.svc"])), (StatusCode::UNAUTHORIZED, "sa_token_audience", "not for audience \"sidewall\"")),
        ("expired", cluster.token(|c| c["exp"] = json!(now - 120)), (StatusCode::UNAUTHORIZED, "sa_token_expired", "has expired")),
        ("not valid yet", cluster.token(|c| c["nbf"] = json!(now + 600)), (StatusCode::UNAUTHORIZED, "sa_token_not_yet_valid", "not valid yet")),
        ("no kubernetes.io claims", cluster.token(|c| { c.as_object_mut().unwrap().remove("kubernetes.io"); }), (StatusCode::UNAUTHORIZED, "sa_token_claims", "lacks the kubernetes.io claim")),
        ("a namespace not allowed", cluster.token(|c| c["kubernetes.io"]["namespace"] = json!("dev")), (StatusCode::FORBIDDEN, "sa_not_allowed", "service account dev/api may not attest")),
        ("another pod's token", cluster.token(|c| c["kubernetes.io"]["pod"]["name"] = json!("api-2")), (StatusCode::FORBIDDEN, "sa_token_other_pod", "belongs to pod api-2, not to pod api-1")),
    ];
    #[rustfmt::skip]
    let mut cases = vec![
        Case::new("a join token and a service-account token", &anonymous, CERT, to_json(json!({"csr": good_csr, "token": "x", "service_account_token": valid})), (BAD, "attestation_ambiguous", "not both")),
        Case::new("a service-account token where none is configured", &no_kubernetes.anonymous(), CERT, sa(&valid), (BAD, "sa_attestation_off", "attestation.kubernetes")),
        Case::new("a token the API server no longer accepts", &reviewed.anonymous(), CERT, sa(&valid), (StatusCode::UNAUTHORIZED, "sa_token_review_refused", "pod not found")),
        Case::new("a token the API server cannot be asked about", &unreviewable.anonymous(), CERT, sa(&valid), (StatusCode::SERVICE_UNAVAILABLE, "sa_token_review_unavailable", "could not be reviewed by the API server")),
        Case { name: "body not JSON".into(), client: c(&anonymous), op: CERT.into(), path: None, body: Bytes::from_static(b"csr=abc"), status: StatusCode::BAD_REQUEST, code: "invalid_json", message: "body is not the expected JSON" },
        Case { name: "JSON without csr".into(), client: c(&anonymous), op: CERT.into(), path: None, body: Bytes::from_static(b"{\"token\": \"x\"}"), status: StatusCode::BAD_REQUEST, code: "invalid_json", message: "missing field `csr`" },
        Case { name: "missing token".into(), client: c(&anonymous), op: CERT.into(), path: None, body: Bytes::from(json!({"csr": good_csr}).to_string()), status: StatusCode::UNAUTHORIZED, code: "token_missing", message: "first contact needs a join token" },
        Case { name: "malformed token".into(), client: c(&anonymous), op: CERT.into(), path: None, body: body(&good_csr, "let-me-in"), status: StatusCode::BAD_REQUEST, code: "token_malformed", message: "malformed join token" },
        Case { name: "wrong secret".into(), client: c(&anonymous), op: CERT.into(), path: None, body: body(&good_csr, &wrong_secret), status: StatusCode::UNAUTHORIZED, code: "token_unknown", message: "unknown join token" },
        Case { name: "token pinned to another CA".into(), client: c(&anonymous), op: CERT.into(), path: None, body: body(&good_csr, &other_ca_token), status: StatusCode::UNAUTHORIZED, code: "token_other_ca", message: "issued by another control plane" },
        Case { name: "expired token".into(), client: c(&anonymous), op: CERT.into(), path: None, body: body(&good_csr, &expired_token), status: StatusCode::UNAUTHORIZED, code: "token_expired", message: "join token expired" },
        Case { name: "reused token".into(), client: c(&anonymous), op: CERT.into(), path: None, body: body(&good_csr, &used_token), status: StatusCode::UNAUTHORIZED, code: "token_used", message: "join token already used" },
        Case { name: "revoked token".into(), client: c(&anonymous), op: CERT.into(), path: None, body: body(&good_csr, &revoked_token), status: StatusCode::UNAUTHORIZED, code: "token_revoked", message: "join token revoked" },
        Case { name: "token for A with a certificate for B".into(), client: c(&as_b), op: CERT.into(), path: None, body: body(&good_csr, &token_a), status: StatusCode::FORBIDDEN, code: "identity_mismatch", message: "but the client certificate is for spiffe://sidewall.local/ns/bad/svc/s1" },
        Case { name: "renewal of a revoked identity".into(), client: c(&as_revoked), op: CERT.into(), path: None, body: Bytes::from(json!({"csr": good_csr}).to_string()), status: StatusCode::FORBIDDEN, code: "revoked", message: "is revoked" },
        Case { name: "renewal of a revoked serial".into(), client: c(&as_revoked_serial), op: CERT.into(), path: None, body: Bytes::from(json!({"csr": good_csr}).to_string()), status: StatusCode::FORBIDDEN, code: "revoked", message: "is revoked" },
        Case { name: "renewal as an operator".into(), client: c(&operator), op: CERT.into(), path: None, body: Bytes::from(json!({"csr": good_csr}).to_string()), status: StatusCode::FORBIDDEN, code: "not_a_workload", message: "only workload identities are issued" },
        Case { name: "token for a reserved identity".into(), client: c(&operator), op: "POST /v1/tokens".into(), path: None, body: Bytes::from(json!({"identity": "spiffe://sidewall.local/sidewall/control-plane"}).to_string()), status: StatusCode::BAD_REQUEST, code: "not_a_workload", message: "never issued to workloads" },
        Case { name: "token for another trust domain".into(), client: c(&operator), op: "POST /v1/tokens".into(), path: None, body: Bytes::from(json!({"identity": "spiffe://evil.org/ns/a/svc/b"}).to_string()), status: StatusCode::BAD_REQUEST, code: "foreign_trust_domain", message: "is not in trust domain sidewall.local" },
        Case { name: "token TTL over the cap".into(), client: c(&operator), op: "POST /v1/tokens".into(), path: None, body: Bytes::from(json!({"identity": "spiffe://sidewall.local/ns/a/svc/b", "ttl_seconds": 86_401}).to_string()), status: StatusCode::BAD_REQUEST, code: "ttl_out_of_range", message: "ttl must be from 1 s to 86400 s" },
        Case { name: "operator name with a slash".into(), client: c(&operator), op: "POST /v1/operators".into(), path: None, body: Bytes::from(json!({"name": "a/b", "role": "viewer", "csr": good_csr}).to_string()), status: StatusCode::BAD_REQUEST, code: "invalid_name", message: "must be one segment" },
        Case::new("token for no SPIFFE ID", &operator, "POST /v1/tokens", to_json(json!({"identity": "nope"})), (BAD, "invalid_identity", "identity \"nope\"")),
        Case::new("token for a revoked identity", &operator, "POST /v1/tokens", to_json(json!({"identity": identity_r})), (BAD, "revoked", "no token can be made for it")),
        Case::new("token with no uses", &operator, "POST /v1/tokens", to_json(json!({"identity": "spiffe://sidewall.local/ns/a/svc/b", "uses": 0})), (BAD, "uses_out_of_range", "uses must be from 1 to 10000")),
        Case::new("revoking an unknown token", &operator, "DELETE /v1/tokens/{id}", "", (NOT_FOUND, "token_not_found", "no token nope")).at("/v1/tokens/nope"),
        Case::new("issuing a revoked operator's name", &operator, "POST /v1/operators", to_json(json!({"name": "gone", "role": "viewer", "csr": good_csr})), (CONFLICT, "name_revoked", "operator gone was revoked")),
        Case::new("an audit page of no records", &operator, "GET /v1/audit", "", (BAD, "invalid_query", "out of range")).at("/v1/audit?limit=0"),
        Case::new("a segmentation test of no pair", &operator, "POST /v1/verifications", to_json(json!({"sample": 0})), (BAD, "invalid_sample", "sample must be at least 1")),
        Case::new("a segmentation test while one is under way", &operator, "POST /v1/verifications", to_json(json!({})), (CONFLICT, "verification_running", "is under way")),
        Case::new("a segmentation test that never ran", &operator, "GET /v1/verifications/{id}", "", (NOT_FOUND, "verification_unknown", "no verification \"nope\"")).at("/v1/verifications/nope"),
        Case::new("probe results of a bad instance id", &w.client, "POST /v1/probes", to_json(json!({"instance": "a b", "results": []})), (BAD, "instance_invalid", "instance must be 1-64")),
        Case::new("probe results of another workload's instance", &v.client, "POST /v1/probes", to_json(json!({"instance": "w-1", "results": []})), (CONFLICT, "instance_taken", "belongs to another workload")),
        Case::new("probe results of one instance too many", &w.client, "POST /v1/probes", to_json(json!({"instance": "w-2", "results": []})), (TOO_MANY, "instances_exceeded", "sidecars connected")),
        Case::new("too many probe results", &w.client, "POST /v1/probes", to_json(json!({"instance": "w-1", "results": vec![json!({"run": "r", "target": "t", "endpoint": "e", "port": 1, "answer": "refused"}); 1001]})), (BAD, "too_many_results", "at most 1000 probe results")),
        Case::new("a report from the future", &operator, "POST /v1/reports", to_json(json!({"since": 99_999_999_999_i64})), (BAD, "invalid_period", "is not within the last 3660 days")),
        Case::new("a report from 1970", &operator, "POST /v1/reports", to_json(json!({"since": 0})), (BAD, "invalid_period", "is not within the last 3660 days")),
        Case::new("a report with an unknown field", &operator, "POST /v1/reports", to_json(json!({"since": 0, "until": 1})), (BAD, "invalid_json", "unknown field `until`")),
        Case::new("revoking an operator never issued", &operator, "DELETE /v1/operators/{name}", "", (NOT_FOUND, "operator_not_found", "no operator nobody")).at("/v1/operators/nobody"),
        Case::new("revoking oneself", &operator, "DELETE /v1/operators/{name}", "", (CONFLICT, "self_revocation", "cannot revoke its own credential")).at("/v1/operators/admin"),
        Case::new("revoking an operator name with a slash", &operator, "DELETE /v1/operators/{name}", "", (BAD, "invalid_name", "must be one segment")).at("/v1/operators/a/b"),
        Case::new("revoking one's own identity", &operator, "POST /v1/revocations", to_json(json!({"identity": "spiffe://sidewall.local/sidewall/operator/admin"})), (CONFLICT, "self_revocation", "cannot revoke its own credential")),
        Case::new("revoking no SPIFFE ID", &operator, "POST /v1/revocations", to_json(json!({"identity": "nope"})), (BAD, "invalid_identity", "identity \"nope\"")),
        Case::new("revoking a serial that is not hex", &operator, "POST /v1/revocations", to_json(json!({"serial": "xyz"})), (BAD, "invalid_serial", "serial must be hex")),
        Case::new("revoking nothing", &operator, "POST /v1/revocations", to_json(json!({})), (BAD, "identity_or_serial", "give exactly one of identity and serial")),
        Case::new("watch without an instance", &w.client, WATCH, "", (BAD, "instance_missing", "give ?instance=")),
        Case::new("watch of another workload's instance", &v.client, WATCH, "", (CONFLICT, "instance_taken", "belongs to another workload")).at("/v1/snapshots/watch?instance=w-1"),
        Case::new("watch of one instance too many", &w.client, WATCH, "", (TOO_MANY, "instances_exceeded", "sidecars connected")).at("/v1/snapshots/watch?instance=w-2"),
        Case::new("registration of a bad instance id", &w.client, REGISTER, register("a b", "127.0.0.1:5001", json!({})), (BAD, "instance_invalid", "instance must be 1-64")),
        Case::new("registration of another workload's instance", &v.client, REGISTER, register("w-1", "127.0.0.1:5001", json!({})), (CONFLICT, "instance_taken", "belongs to another workload")),
        Case::new("registration of one instance too many", &w.client, REGISTER, register("w-2", "127.0.0.1:5001", json!({})), (TOO_MANY, "instances_exceeded", "sidecars connected")),
        Case::new("registration of no endpoint", &w.client, REGISTER, register("w-1", "nowhere", json!({})), (BAD, "endpoint_invalid", "must be IP:port")),
        Case::new("registration of someone else's address", &w.client, REGISTER, register("w-1", "10.9.9.9:80", json!({})), (StatusCode::FORBIDDEN, "endpoint_not_yours", "is not the address this connection comes from")),
        Case::new("registration of port 0", &w.client, REGISTER, register("w-1", "127.0.0.1:5001", json!({"ports": [{"port": 0, "protocol": "tcp"}]})), (BAD, "ports_invalid", "ports must be 1-65535")),
        Case::new("registration of an address that is not one", &w.client, REGISTER, register("w-1", "127.0.0.1:5001", json!({"addresses": ["somewhere"]})), (BAD, "address_invalid", "must be IP:port")),
        Case::new("registration at a second endpoint", &w.client, REGISTER, register("w-1", "127.0.0.1:5002", json!({})), (TOO_MANY, "registrations_exceeded", "limits.instancesPerIdentity")),
        Case::new("registration of too many addresses", &w.client, REGISTER, register("w-1", "127.0.0.1:5001", json!({"addresses": ["10.0.0.1:80", "10.0.0.2:80"]})), (TOO_MANY, "addresses_exceeded", "limits.addressesPerIdentity")),
        Case::new("registration at another workload's endpoint", &v.client, REGISTER, register("v-1", "127.0.0.1:5001", json!({})), (CONFLICT, "endpoint_taken", "is registered to spiffe://sidewall.local/ns/bad/svc/w")),
        Case::new("removing another workload's registration", &v.client, "DELETE /v1/registrations/{instance}", "", (NOT_FOUND, "registration_not_found", "no registration w-1")).at("/v1/registrations/w-1"),
        Case::new("ack of a bad instance id", &w.client, ACK, ack("a b", "applied"), (BAD, "instance_invalid", "instance must be 1-64")),
        Case::new("ack of no known status", &w.client, ACK, ack("w-1", "bogus"), (BAD, "status_invalid", "status must be applied or rejected")),
        Case::new("ack of another workload's instance", &v.client, ACK, ack("w-1", "applied"), (CONFLICT, "instance_taken", "belongs to another workload")),
        Case::new("ack of one instance too many", &w.client, ACK, ack("w-2", "applied"), (TOO_MANY, "instances_exceeded", "sidecars connected")),
        Case::new("10,001 flows in one report", &w.client, "POST /v1/flows", to_json(json!({ "flows": flows })), (BAD, "too_many_flows", "at most 10000 flows")),
        Case::new("policies that do not load", &operator, "POST /v1/policies", files(1, "kind: ["), (BAD, "policy_invalid", "f0.yaml:")),
        Case::new("1,001 policy files", &operator, "POST /v1/policies", files(1001, ""), (BAD, "too_many_files", "at most 1000 files")),
        Case::new("impact of policies that do not load", &operator, "POST /v1/policies/impact", files(1, "kind: ["), (BAD, "policy_invalid", "f0.yaml:")),
        Case::new("impact of 1,001 policy files", &operator, "POST /v1/policies/impact", files(1001, ""), (BAD, "too_many_files", "at most 1000 files")),
        Case::new("policy version that is no number", &operator, "GET /v1/policies/{version}", "", (BAD, "version_invalid", "is not a version")).at("/v1/policies/abc"),
        Case::new("policy version never applied", &operator, "GET /v1/policies/{version}", "", (NOT_FOUND, "version_unknown", "no policy version 999")).at("/v1/policies/999"),
        Case::new("rollout of a version that is no number", &operator, "GET /v1/policies/{version}/status", "", (BAD, "version_invalid", "is not a version")).at("/v1/policies/abc/status"),
        Case::new("rollout of a version never applied", &operator, "GET /v1/policies/{version}/status", "", (NOT_FOUND, "version_unknown", "has not been applied")).at("/v1/policies/999/status"),
        Case::new("removing an unknown registration", &operator, "DELETE /v1/directory/{instance}", "", (NOT_FOUND, "registration_not_found", "no registration with instance")).at("/v1/directory/nope"),
        Case::new("a path that is no route", &operator, "GET /v1/nothing", "", (NOT_FOUND, "not_found", "no route /v1/nothing")),
        Case::new("a method the route does not take", &operator, "PUT /v1/tokens", "", (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "PUT is not allowed on /v1/tokens")),
    ];

    for (name, jwt, answer) in sa_cases {
        cases.push(Case::new(
            format!("service-account token: {name}"),
            &anonymous,
            CERT,
            sa(&jwt),
            answer,
        ));
    }
    // Every broken CSR, on both routes that take one.
    #[rustfmt::skip]
    let broken_csrs = [
        ("CSR not PEM", "hello".to_owned(), (BAD, "csr_not_pem", "no PEM CERTIFICATE REQUEST block")),
        ("PEM not a CSR", certificate_pem.clone(), (BAD, "csr_not_pem", "no PEM CERTIFICATE REQUEST block")),
        ("truncated DER", pem("CERTIFICATE REQUEST", &der[..der.len() / 2]), (BAD, "csr_malformed", "CSR does not parse")),
        ("trailing bytes after the DER", pem("CERTIFICATE REQUEST", &trailing), (BAD, "csr_trailing_bytes", "2 bytes after the CSR")),
        ("two CSRs in one PEM", format!("{good_csr}{good_csr}"), (BAD, "csr_several", "2 CSRs in one request")),
        ("CSR over 64 KiB", huge.clone(), (StatusCode::PAYLOAD_TOO_LARGE, "csr_too_large", "over the 65536-byte limit")),
        ("bad CSR signature", pem("CERTIFICATE REQUEST", &bad_signature), (BAD, "csr_bad_signature", "signature does not verify")),
        ("RSA-1024", rsa1024.clone(), (BAD, "csr_weak_key", "RSA key of 1024 bits is too small")),
        ("unsupported curve", secp256k1.clone(), (BAD, "csr_unsupported_key", "unsupported key type EC curve")),
    ];
    for (name, broken, answer) in &broken_csrs {
        cases.push(Case::new(
            format!("{name}, for a workload"),
            &anonymous,
            CERT,
            body(broken, &fresh),
            *answer,
        ));
        let operator_body = to_json(json!({"name": "probe", "role": "viewer", "csr": broken}));
        cases.push(Case::new(
            format!("{name}, for an operator"),
            &operator,
            "POST /v1/operators",
            operator_body,
            *answer,
        ));
    }
    // The credential checks, on every operation that has them.
    for op in operations_answering(&documented, 401, "operator_credential_required") {
        #[rustfmt::skip]
        let callers = [
            ("no certificate", &anonymous, (StatusCode::UNAUTHORIZED, "operator_credential_required", "needs an operator certificate")),
            ("a workload's certificate", &as_b, (StatusCode::FORBIDDEN, "not_an_operator", "is not an operator identity")),
            ("a revoked operator's certificate", &as_gone, (StatusCode::FORBIDDEN, "revoked", "is revoked")),
        ];
        for (who, client, answer) in callers {
            let case = Case::new(format!("{op} with {who}"), client, op.clone(), "", answer);
            cases.push(case.at(path_of(&op)));
        }
    }
    // The role checks, on every operation that needs more than a viewer's.
    for op in operations_answering(&documented, 403, "role_insufficient") {
        let answer = (
            StatusCode::FORBIDDEN,
            "role_insufficient",
            "has the viewer role",
        );
        let case = Case::new(
            format!("{op} as a viewer"),
            &as_viewer,
            op.clone(),
            "",
            answer,
        );
        cases.push(case.at(path_of(&op)));
    }
    for op in operations_answering(&documented, 401, "workload_credential_required") {
        // The workload routes with a body read it first: a valid one.
        let body = match op.as_str() {
            REGISTER => register("w-1", "127.0.0.1:5001", json!({})),
            ACK => ack("w-1", "applied"),
            "POST /v1/flows" => to_json(json!({"flows": []})),
            "POST /v1/probes" => to_json(json!({"instance": "w-1", "results": []})),
            _ => Bytes::new(),
        };
        #[rustfmt::skip]
        let callers = [
            ("no certificate", &anonymous, (StatusCode::UNAUTHORIZED, "workload_credential_required", "needs the workload's certificate")),
            ("an operator's certificate", &operator, (StatusCode::FORBIDDEN, "not_a_workload", "belong to the system")),
            ("a revoked workload's certificate", &as_revoked, (StatusCode::FORBIDDEN, "revoked", "is revoked")),
        ];
        for (who, client, answer) in callers {
            let case = Case::new(
                format!("{op} with {who}"),
                client,
                op.clone(),
                body.clone(),
                answer,
            );
            cases.push(case.at(path_of(&op)));
        }
    }
    // A body that is not JSON, on every operation that takes one.
    for op in operations_answering(&documented, 400, "invalid_json") {
        let answer = (BAD, "invalid_json", "body is not the expected JSON");
        let case = Case::new(
            format!("{op} with a body that is not JSON"),
            caller(&op),
            op.clone(),
            "nope",
            answer,
        );
        cases.push(case.at(path_of(&op)));
    }
    assert!(cases.len() >= 140, "{}", cases.len());
    let before = metrics.render();
    let issued_before = metric(
        &before,
        "sidewall_control_plane_certificates_issued_total",
        &[],
    );
    let mut expected_refusals: BTreeMap<&str, u64> = Default::default();
    // (operation, status, code) answered.
    let mut reached: BTreeSet<(String, u16, String)> = BTreeSet::new();
    for case in &cases {
        let (method, template) = case.op.split_once(' ').unwrap();
        let path = case.path.as_deref().unwrap_or(template);
        let (status, answer): (StatusCode, Value) = case
            .client
            .call_bytes(method.parse().unwrap(), path, case.body.clone())
            .await
            .unwrap();
        assert_eq!(status, case.status, "{}: {answer}", case.name);
        assert_eq!(answer["error"], case.code, "{}: {answer}", case.name);
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(case.message), "{}: {message}", case.name);
        *expected_refusals.entry(case.code).or_default() += 1;
        let answered = (status.as_u16(), case.code.to_owned());
        match documented.get(&case.op) {
            Some(answers) => assert!(
                answers.contains(&answered),
                "{}: {answered:?} is not documented for {} in docs/openapi.yaml",
                case.name,
                case.op
            ),
            None => assert!(
                ["not_found", "method_not_allowed"].contains(&case.code),
                "{}: {} is no operation",
                case.name,
                case.op
            ),
        }
        reached.insert((case.op.clone(), answered.0, answered.1));
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
                "/v1/certificates",
                Some(&json!({"csr": csr(&key), "token": rate_token})),
            )
            .await
            .unwrap();
        assert_eq!(status, expected, "rate limit attempt {}: {answer}", i + 1);
    }
    *expected_refusals.entry("rate_limited").or_default() += 1;
    reached.insert((CERT.to_owned(), 429, "rate_limited".to_owned()));

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
            .call(
                Method::POST,
                "/v1/certificates",
                Some(&json!({"csr": good_csr})),
            )
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

    // On every operation with a body: a body declared over 1 MiB is refused from its headers,
    // before it is read, and one that never finishes is cut off after the request timeout.
    let mut probes = Vec::new();
    for op in operations_answering(&documented, 413, "body_too_large") {
        let (client, api) = (caller(&op).clone(), cp.api);
        probes.push(tokio::spawn(async move {
            let method = op.split_once(' ').unwrap().0;
            let head = format!(
                "{method} {} HTTP/1.1\r\nHost: x\r\nContent-Length",
                path_of(&op)
            );
            let wait = Duration::from_secs(10);
            let too_large =
                send_raw(&client, api, format!("{head}: 1048577\r\n\r\n{{"), wait).await;
            let slow = send_raw(&client, api, format!("{head}: 100\r\n\r\n{{\"csr\""), wait).await;
            (op, too_large, slow)
        }));
    }
    for probe in probes {
        let (op, too_large, slow) = probe.await.unwrap();
        assert!(too_large.starts_with("HTTP/1.1 413"), "{op}: {too_large}");
        assert!(
            too_large.contains("\"error\":\"body_too_large\""),
            "{op}: {too_large}"
        );
        assert!(slow.starts_with("HTTP/1.1 408"), "{op}: {slow}");
        assert!(slow.contains("\"error\":\"body_timeout\""), "{op}: {slow}");
        reached.insert((op.clone(), 413, "body_too_large".to_owned()));
        reached.insert((op, 408, "body_timeout".to_owned()));
    }

    // The CA rotation's refusals, in the order a rotation meets them; one control plane's CA
    // is plugged in (another's, without its root key).
    let ca_files = other_cp_dir.path().join("ca");
    let plug_dir = tempfile::tempdir().unwrap();
    let plugged = TestControlPlane::start(plug_dir.path(), |c| {
        c.plug_in = Some(sidewall_control_plane::ca::PlugIn {
            root_cert: ca_files.join("root.pem"),
            intermediate_cert: ca_files.join("intermediate.pem"),
            intermediate_key: ca_files.join("intermediate.key"),
        })
    })
    .await;
    let plugged_operator = plugged.operator();
    let rotate = |step: &str| Bytes::from(json!({"step": step}).to_string());
    let conflict = StatusCode::CONFLICT;
    #[rustfmt::skip]
    let steps = [
        ("an unknown step", &operator, rotate("rotate"), (BAD, "step_invalid", "is not one of prepare")),
        ("activate before prepare", &operator, rotate("activate"), (conflict, "stage_mismatch", "the next step is prepare")),
        ("prepare with the root key offline", &plugged_operator, rotate("prepare"), (conflict, "root_key_offline", "private key is not with the control plane")),
        ("prepare", &operator, rotate("prepare"), (StatusCode::OK, "", "")),
        ("prepare again", &operator, rotate("prepare"), (conflict, "stage_mismatch", "the next step is activate")),
        ("activate while certificates are held by no sidecar with the new root", &operator, rotate("activate"), (conflict, "rotation_blocked", "activate is blocked by")),
    ];
    for (name, client, body, (status, code, message)) in steps {
        let (answered, answer) = client
            .call_bytes(Method::POST, "/v1/ca/rotation", body)
            .await
            .unwrap();
        assert_eq!(answered, status, "{name}: {answer}");
        if status == StatusCode::OK {
            assert_eq!(answer["stage"], "prepared", "{name}: {answer}");
            continue;
        }
        assert_eq!(answer["error"], code, "{name}: {answer}");
        let text = answer["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{name}: {text}");
        reached.insert((
            "POST /v1/ca/rotation".to_owned(),
            status.as_u16(),
            code.to_owned(),
        ));
    }
    plugged.stop().await;

    // Every answer docs/openapi.yaml documents was given, on its operation. Two exceptions:
    // `store_unavailable` needs a store that fails (tests/etcd.rs, root, takes etcd's quorum
    // away for it), and `ca_conflict` two rotation steps racing.
    let unreached: Vec<String> = documented
        .iter()
        .flat_map(|(op, answers)| {
            answers
                .iter()
                .map(move |(s, c)| (op.clone(), *s, c.clone()))
        })
        .filter(|(_, _, code)| code != "store_unavailable" && code != "ca_conflict")
        .filter(|answer| !reached.contains(answer))
        .map(|(op, status, code)| format!("{op}: {status} {code}"))
        .collect();
    assert!(
        unreached.is_empty(),
        "documented in docs/openapi.yaml, never answered here:\n{}",
        unreached.join("\n")
    );
    // And the reference agrees with the description: the codes only the reference lists are
    // those of no operation (no route, another method), of a client already gone, and of a
    // fault of the server.
    let described: BTreeSet<String> = documented
        .values()
        .flatten()
        .map(|(_, code)| code.clone())
        .collect();
    let referenced = codes_in_the_reference();
    let only_referenced: Vec<&String> = referenced.difference(&described).collect();
    assert_eq!(
        only_referenced,
        [
            "body_unreadable",
            "internal",
            "method_not_allowed",
            "not_found"
        ],
        "codes in docs/api.md#errors and not in docs/openapi.yaml"
    );
    let only_described: Vec<&String> = described.difference(&referenced).collect();
    assert!(
        only_described.is_empty(),
        "not in docs/api.md#errors: {only_described:?}"
    );

    // Headers that never finish: the connection is closed.
    let mut stream = connect(&anonymous, cp.api).await;
    stream
        .write_all(b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "slow headers must be cut off");
    let _ = identity_b;
    no_kubernetes.stop().await;
    reviewed.stop().await;
    unreviewable.stop().await;
    cp.stop().await;
}
