//! Control-plane replicas over a real 3-member etcd cluster, in process: they share the CA,
//! agree on snapshot versions, see each other's writes, and spend a join token once even when
//! it is raced at two of them. Skipped (loudly) without the `etcd` binary unless
//! `SIDEWALL_REQUIRE_ETCD` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sidewall_control_plane::config::{Config, Overrides};
use sidewall_control_plane::testing::etcd::EtcdCluster;
use sidewall_control_plane::testing::{TestControlPlane, enroll, kek_file, use_etcd, watch};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

fn policy(from: &str) -> String {
    format!(
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: api}}\nspec:\n  target: {TD}/api\n  rules:\n    - {{action: allow, from: [{TD}/{from}], ports: [8080]}}\n"
    )
}

async fn apply(cp: &TestControlPlane, text: &str) -> (StatusCode, Value) {
    cp.operator()
        .call(
            Method::POST,
            "/v1/policies",
            Some(&json!({"files": [{"name": "p.yaml", "text": text}]})),
        )
        .await
        .unwrap()
}

async fn replica(
    dir: &std::path::Path,
    cluster: &EtcdCluster,
    kek: &std::path::Path,
) -> TestControlPlane {
    TestControlPlane::start(dir, |config| use_etcd(config, cluster, kek)).await
}

/// The first snapshot a fresh watch at `cp` gets for `identity` (enrolled there).
async fn snapshot_at(cp: &TestControlPlane, identity: &str, instance: &str) -> Value {
    let workload = enroll(&cp.data_dir, &cp.url(), &cp.trust_domain, identity).await;
    watch(&workload.client, instance).await.snapshot.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_ca_and_agree_on_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = EtcdCluster::start(&dir.path().join("etcd"), 3, "replicas_share") else {
        return;
    };
    let kek = kek_file(&dir.path().join("secrets"));
    let one = replica(&dir.path().join("one"), &cluster, &kek).await;
    let two = replica(&dir.path().join("two"), &cluster, &kek).await;
    assert_eq!(
        one.roots(),
        two.roots(),
        "one trust bundle for every replica"
    );

    let (status, body) = apply(&one, &policy("frontend")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 1);
    // Applied through `one`: `two` puts it in force from its etcd watch.
    let applied = Instant::now();
    let (mut at_one, mut at_two);
    loop {
        at_one = snapshot_at(&one, &format!("{TD}/api"), "api-1").await;
        at_two = snapshot_at(&two, &format!("{TD}/api"), "api-2").await;
        if at_one == at_two || applied.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("replica two agreed after {:?}", applied.elapsed());
    assert_eq!(
        at_one, at_two,
        "the same snapshot, version included, from both replicas"
    );
    let text = at_two.to_string();
    assert!(text.contains(&format!("{TD}/frontend")), "{text}");
    // A replica started later, after many writes that do not change snapshots (tokens,
    // certificate records, replica summaries), still sends the same version.
    let three = replica(&dir.path().join("three"), &cluster, &kek).await;
    let at_three = snapshot_at(&three, &format!("{TD}/api"), "api-4").await;
    assert_eq!(
        at_three,
        snapshot_at(&one, &format!("{TD}/api"), "api-5").await,
        "the same version for the same content from a replica started later"
    );
    three.stop().await;

    // The history is shared; a second apply through `two` is version 2 everywhere.
    let (status, body) = apply(&two, &policy("web")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    let (status, history) = one
        .operator()
        .call(Method::GET, "/v1/policies", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        history["versions"].as_array().unwrap().len(),
        2,
        "{history}"
    );
    let newer = snapshot_at(&one, &format!("{TD}/api"), "api-3").await;
    assert!(newer.to_string().contains(&format!("{TD}/web")), "{newer}");
    assert_eq!(newer["version"]["epoch"], at_one["version"]["epoch"]);
    assert!(
        newer["version"]["counter"].as_u64() > at_one["version"]["counter"].as_u64(),
        "{newer} after {at_one}"
    );
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_raced_at_two_replicas_issues_one_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = EtcdCluster::start(&dir.path().join("etcd"), 3, "token_race") else {
        return;
    };
    let kek = kek_file(&dir.path().join("secrets"));
    let one = replica(&dir.path().join("one"), &cluster, &kek).await;
    let two = replica(&dir.path().join("two"), &cluster, &kek).await;
    for round in 0..10 {
        let (status, token) = one
            .operator()
            .call(
                Method::POST,
                "/v1/tokens",
                Some(&json!({"identity": format!("{TD}/race{round}"), "uses": 1})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{token}");
        let ask = |cp: &TestControlPlane| {
            let client = cp.anonymous();
            let token = token["token"].clone();
            async move {
                let (_key, csr) = sidewall_control_plane::client::key_and_csr().unwrap();
                client
                    .call(
                        Method::POST,
                        "/v1/certificates",
                        Some(&json!({"csr": csr, "token": token})),
                    )
                    .await
                    .unwrap()
            }
        };
        let (a, b) = tokio::join!(ask(&one), ask(&two));
        let issued = [&a, &b]
            .iter()
            .filter(|(status, _)| *status == StatusCode::OK)
            .count();
        assert_eq!(
            issued, 1,
            "round {round}: exactly one certificate, got answers {} {} and {} {}",
            a.0, a.1["error"], b.0, b.1["error"]
        );
        let refused = if a.0 == StatusCode::OK { &b } else { &a };
        assert_eq!(refused.0, StatusCode::UNAUTHORIZED, "{refused:?}");
        assert_eq!(refused.1["error"], "token_used", "{refused:?}");
    }
    one.stop().await;
    two.stop().await;
}

fn etcd_config(dir: &std::path::Path, cluster: &EtcdCluster, kek: &std::path::Path) -> Config {
    let mut config = Config::load(
        None,
        Overrides {
            data_dir: Some(dir.to_path_buf()),
            ..Overrides::default()
        },
    )
    .unwrap();
    use_etcd(&mut config, cluster, kek);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_kek_or_no_etcd_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = EtcdCluster::start(&dir.path().join("etcd"), 3, "kek") else {
        return;
    };
    let kek = kek_file(&dir.path().join("secrets"));
    let one = replica(&dir.path().join("one"), &cluster, &kek).await;
    let other = kek_file(&dir.path().join("other"));
    let error = sidewall_control_plane::server::prepare(etcd_config(
        &dir.path().join("two"),
        &cluster,
        &other,
    ))
    .await
    .err()
    .expect("another KEK cannot open the CA")
    .to_string();
    assert!(error.contains("does not open the CA"), "{error}");

    let mut config = etcd_config(&dir.path().join("three"), &cluster, &kek);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    if let sidewall_control_plane::config::StoreConfig::Etcd(etcd) = &mut config.store {
        etcd.endpoints = vec![nowhere.clone()];
    }
    let error = sidewall_control_plane::server::prepare(config)
        .await
        .err()
        .expect("no etcd there")
        .to_string();
    assert!(
        error.contains(&format!("cannot reach etcd at {nowhere}")),
        "{error}"
    );
    one.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_moves_everything_from_the_embedded_store_to_etcd_and_back() {
    use sidewall_control_plane::backup;
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = EtcdCluster::start(&dir.path().join("etcd"), 3, "backup") else {
        return;
    };
    let kek = kek_file(&dir.path().join("secrets"));
    // An embedded control plane with some of everything.
    let embedded_dir = dir.path().join("embedded");
    let cp = TestControlPlane::start(&embedded_dir, |_| {}).await;
    assert_eq!(apply(&cp, &policy("frontend")).await.0, StatusCode::OK);
    assert_eq!(apply(&cp, &policy("web")).await.0, StatusCode::OK);
    let workload = cp.workload(&format!("{TD}/api")).await;
    workload.register(18080, "tcp").await;
    let (status, _) = cp
        .operator()
        .call(
            Method::POST,
            "/v1/revocations",
            Some(&json!({"identity": format!("{TD}/old")})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let roots = cp.roots();
    cp.stop().await;

    let mut embedded = Config::load(
        None,
        Overrides {
            data_dir: Some(embedded_dir.clone()),
            ..Overrides::default()
        },
    )
    .unwrap();
    embedded.ca_kek_file = Some(kek.clone());
    let copy = backup::export(&embedded).await.unwrap();
    let records = copy.records.clone();
    assert_eq!(records.policy_versions.len(), 2);
    assert_eq!(records.tokens.len(), 1);
    assert!(!records.certificates.is_empty());
    assert_eq!(records.revocations.len(), 1);
    assert_eq!(records.registrations.len(), 1);
    let json = serde_json::to_string(&copy).unwrap();
    let intermediate_key =
        std::fs::read_to_string(embedded_dir.join("ca/intermediate.key")).unwrap();
    let key_body = intermediate_key.lines().nth(1).unwrap();
    assert!(!json.contains(key_body), "no CA key in clear in the backup");

    // Into etcd: the same records, and a replica started on it serves the same CA and history.
    let etcd = etcd_config(&dir.path().join("replica"), &cluster, &kek);
    let restored = backup::import(&etcd, copy.clone()).await.unwrap();
    assert_eq!(restored.policy_versions, 2);
    let again = backup::export(&etcd).await.unwrap();
    assert_eq!(
        again.records, records,
        "etcd holds exactly what was exported"
    );
    let error = backup::import(&etcd, copy.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("the target store is not empty"), "{error}");

    let replica = replica(&dir.path().join("replica"), &cluster, &kek).await;
    assert_eq!(replica.roots(), roots, "the same CA after the move");
    let (status, history) = replica
        .operator()
        .call(Method::GET, "/v1/policies", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        history["versions"].as_array().unwrap().len(),
        2,
        "{history}"
    );
    replica.stop().await;

    // And back into a new embedded data directory.
    let mut back = Config::load(
        None,
        Overrides {
            data_dir: Some(dir.path().join("back")),
            ..Overrides::default()
        },
    )
    .unwrap();
    back.ca_kek_file = Some(kek.clone());
    backup::import(&back, again).await.unwrap();
    assert_eq!(backup::export(&back).await.unwrap().records, records);
    let other = kek_file(&dir.path().join("other"));
    let mut wrong = etcd_config(&dir.path().join("x"), &cluster, &other);
    if let sidewall_control_plane::config::StoreConfig::Etcd(etcd) = &mut wrong.store {
        etcd.prefix = "/elsewhere".into();
    }
    let error = backup::import(&wrong, copy).await.unwrap_err().to_string();
    assert!(error.contains("does not open the CA"), "{error}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, PEM files in `dir`.
fn etcd_certificates(
    dir: &std::path::Path,
) -> (
    sidewall_control_plane::testing::etcd::EtcdTls,
    (std::path::PathBuf, std::path::PathBuf),
) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: String| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![purpose];
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(vec!["sidewall".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let tls = sidewall_control_plane::testing::etcd::EtcdTls {
        ca: write("ca.pem", ca_cert.pem()),
        cert: write("server.pem", server),
        key: write("server.key", server_key),
    };
    (
        tls,
        (write("client.pem", client), write("client.key", client_key)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_talks_mutual_tls_and_authenticates_to_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, (cert, key)) = etcd_certificates(&dir.path().join("pki"));
    let Some(cluster) =
        EtcdCluster::start_with(&dir.path().join("etcd"), 1, "etcd_tls", Some(tls.clone()))
    else {
        return;
    };
    // Turn on etcd authentication, as an etcd operator would.
    let url = format!("https://{}", cluster.endpoints()[0]);
    let options = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(
                std::fs::read(&tls.ca).unwrap(),
            ))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(&cert).unwrap(),
                std::fs::read(&key).unwrap(),
            )),
    );
    let mut admin = etcd_client::Client::connect([url], Some(options))
        .await
        .unwrap();
    admin.user_add("root", "s3cret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let password = dir.path().join("pki/password");
    std::fs::write(&password, "s3cret\n").unwrap();

    let kek = kek_file(&dir.path().join("secrets"));
    let configure = |config: &mut Config, password_file: &std::path::Path| {
        use_etcd(config, &cluster, &kek);
        if let sidewall_control_plane::config::StoreConfig::Etcd(etcd) = &mut config.store {
            etcd.ca = Some(tls.ca.clone());
            etcd.identity = Some((cert.clone(), key.clone()));
            etcd.user = Some("root".into());
            etcd.password_file = Some(password_file.to_path_buf());
        }
    };
    let cp = TestControlPlane::start(&dir.path().join("one"), |config| {
        configure(config, &password)
    })
    .await;
    let (status, body) = apply(&cp, &policy("frontend")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cp.stop().await;

    // A wrong password or no TLS: the replica does not start, and says why.
    let wrong = dir.path().join("pki/wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let mut config = etcd_config(&dir.path().join("two"), &cluster, &kek);
    configure(&mut config, &wrong);
    let error = sidewall_control_plane::server::prepare(config)
        .await
        .err()
        .expect("a wrong password")
        .to_string();
    assert!(error.contains("authentication failed"), "{error}");
    let config = etcd_config(&dir.path().join("three"), &cluster, &kek);
    let error = sidewall_control_plane::server::prepare(config)
        .await
        .err()
        .expect("plain HTTP/2 to a TLS member")
        .to_string();
    assert!(error.contains("cannot reach etcd at"), "{error}");
}
