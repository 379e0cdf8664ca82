//! The sidecar as users run it: real control plane, real sidecars, real certificates, and
//! clients no one here wrote (`openssl s_client`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{
    ControlPlaneProcess, EchoApp, ProxyProcess, eventually, exchange, free_port, metric,
};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

/// A control plane, a policy directory and an echo app behind the `api` sidecar.
struct Mesh {
    dir: tempfile::TempDir,
    cp: ControlPlaneProcess,
    app: EchoApp,
    api_inbound: u16,
    /// More `limits` for api's sidecar (`, key: value…`).
    api_limits: String,
}

impl Mesh {
    fn new(cp_config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let config = dir.path().join("cp.yaml");
        std::fs::write(&config, cp_config).unwrap();
        let cp = ControlPlaneProcess::start(
            &dir.path().join("cp"),
            &["--config", config.to_str().unwrap()],
        );
        Self {
            dir,
            cp,
            app: EchoApp::start(),
            api_inbound: free_port(),
            api_limits: String::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn policy(&self, name: &str, yaml: &str) {
        std::fs::write(
            self.path().join("policies").join(format!("{name}.yaml")),
            yaml,
        )
        .unwrap();
    }

    fn token(&self, name: &str) -> PathBuf {
        let run = self
            .cp
            .cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let path = self.path().join(format!("{name}.token"));
        std::fs::write(&path, run.stdout.lines().last().unwrap()).unwrap();
        path
    }

    /// A sidecar for `name`; `api` serves the echo app on service port 8080, others get a
    /// route to api:8080 on `route_port` (and `extra` directory entries).
    fn sidecar(&self, name: &str, route_port: u16, extra_directory: &str) -> ProxyProcess {
        self.sidecar_with(name, route_port, extra_directory, "")
    }

    /// The same, with `outbound_extra` lines under `outbound:`.
    fn sidecar_with(
        &self,
        name: &str,
        route_port: u16,
        extra_directory: &str,
        outbound_extra: &str,
    ) -> ProxyProcess {
        self.token(name);
        let (inbound, ports) = if name == "api" {
            (
                self.api_inbound,
                format!(
                    "{{port: 8080, protocol: tcp, app: 127.0.0.1:{}}}",
                    self.app.port
                ),
            )
        } else {
            (free_port(), String::new())
        };
        let routes = if name == "api" {
            String::new()
        } else {
            format!("{{listen: 127.0.0.1:{route_port}, service: {TD}/api, port: 8080}}")
        };
        let admin = free_port();
        let limits = if name == "api" {
            self.api_limits.as_str()
        } else {
            ""
        };
        let config = format!(
            "identity: {TD}/{name}\ncontrolPlane:\n  urls: [https://127.0.0.1:{cp}]\n  tokenFile: {name}.token\nstateDir: state/{name}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  ports: [{ports}]\noutbound:\n  routes: [{routes}]\n{outbound_extra}admin:\n  listen: 127.0.0.1:{admin}\nlocal:\n  policies: [policies]\n  directory:\n    - {{identity: {TD}/api, endpoints: [127.0.0.1:{api}], ports: [{{port: 8080}}]}}\n{extra_directory}workerThreads: 1\nlimits: {{drainTimeout: 2s{limits}}}\n",
            cp = self.cp.api_port,
            api = self.api_inbound,
        );
        let proxy = ProxyProcess::start(self.path(), name, &config, admin);
        proxy.wait_ready();
        proxy
    }
}

const ALLOW_WEB: &str = "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {name: api-from-web}\nspec:\n  target: spiffe://sidewall.local/ns/demo/svc/api\n  onRevoke: terminate\n  rules:\n    - {action: allow, from: [spiffe://sidewall.local/ns/demo/svc/web], ports: [8080]}\n";

#[test]
fn app_connections_share_one_sidecar_connection_and_each_is_decided_on_its_own() {
    let mesh = Mesh::new("{}");
    let allow = |names: &str| {
        format!(
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: api-callers}}\nspec:\n  target: {TD}/api\n  rules:\n    - {{action: allow, from: [{names}], ports: [8080]}}\n"
        )
    };
    mesh.policy("api", &allow(&format!("{TD}/web, {TD}/legacy")));
    let api = mesh.sidecar("api", 0, "");
    let (web_route, batch_route, legacy_route) = (free_port(), free_port(), free_port());
    let web = mesh.sidecar("web", web_route, "");
    let batch = mesh.sidecar("batch", batch_route, "");
    let legacy = mesh.sidecar_with(
        "legacy",
        legacy_route,
        "",
        "  sidecarConnections: perConnection\n",
    );

    // Twenty app connections, one sidecar-to-sidecar connection, twenty decisions.
    for i in 0..20 {
        let payload = format!("carried {i}");
        assert_eq!(
            exchange(web_route, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes())
        );
    }
    let pool = |p: &ProxyProcess, event: &str| {
        metric(
            &p.metrics(),
            "sidewall_proxy_h2_pool_total",
            &[("event", event)],
        )
    };
    assert_eq!(pool(&web, "opened"), 1, "{}", web.metrics());
    // Each series says what it counts.
    assert!(
        web.metrics()
            .contains("# HELP sidewall_proxy_h2_pool_total Shared and pooled"),
        "{}",
        web.metrics()
    );
    assert_eq!(pool(&web, "reused"), 19);
    let carried = |outcome: &str| {
        metric(
            &api.metrics(),
            "sidewall_proxy_carried_connections_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(carried("allowed"), 20, "{}", api.metrics());

    // A denied workload's carried connection never reaches the app.
    let before = mesh.app.accepted();
    assert_eq!(exchange(batch_route, b"denied"), None);
    assert_eq!(mesh.app.accepted(), before);
    assert!(batch.log().contains("status=\"denied\"") || batch.log().contains("status=denied"));

    // One connection per app connection still works when configured.
    assert_eq!(
        exchange(legacy_route, b"own connection").as_deref(),
        Some(&b"own connection"[..])
    );
    assert_eq!(pool(&legacy, "opened"), 0);
    // … and carries a bulk transfer whole both ways (its TLS legs read ahead while it lasts).
    let bulk: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert!(exchange(legacy_route, &bulk).as_deref() == Some(&bulk[..]));

    // A stream whose reader is stuck does not stall the others on the same connection.
    let mut stuck = std::net::TcpStream::connect(("127.0.0.1", web_route)).unwrap();
    let writer = std::thread::spawn(move || {
        // The echo comes back to a client that never reads: both directions fill up.
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..16 * 1024 {
            if let Err(error) = std::io::Write::write_all(&mut stuck, &chunk) {
                return Some(error.to_string());
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        let payload = format!("beside a stuck stream {i}");
        assert_eq!(
            exchange(web_route, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes())
        );
    }
    assert_eq!(
        pool(&web, "opened"),
        1,
        "the stuck stream shares the connection"
    );
    assert!(
        !writer.is_finished(),
        "the stuck stream is held by flow control"
    );

    // A policy change applies to the next carried connection on the same shared connection.
    // An exchange in flight while the api's sidecar applies it is allowed, then closed by the
    // re-check of open connections: its `None` is no denial. Wait for a denial counted (once
    // the refused app connection is closed: a later round reads it).
    mesh.policy("api", &allow(&format!("{TD}/legacy")));
    let denied = || {
        metric(
            &web.metrics(),
            "sidewall_proxy_outbound_failures_total",
            &[("reason", "denied")],
        )
    };
    eventually(20, "web to be denied, and count it", || {
        exchange(web_route, b"after").is_none() && denied() >= 1
    });
    assert_eq!(pool(&web, "opened"), 1, "{}", web.log());
}

#[test]
fn allowed_peers_reach_the_app_and_denied_peers_never_do() {
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let (web_route, batch_route) = (free_port(), free_port());
    let web = mesh.sidecar("web", web_route, "");
    let batch = mesh.sidecar("batch", batch_route, "");

    assert_eq!(
        exchange(web_route, b"hello through two sidecars").as_deref(),
        Some(&b"hello through two sidecars"[..])
    );
    assert_eq!(mesh.app.accepted(), 1);
    // Bulk, on the shared connection: every byte back, in order (a pattern that is not a
    // multiple of any frame or record size shows a lost, doubled or reordered piece).
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert!(exchange(web_route, &big).as_deref() == Some(&big[..]));

    let before = mesh.app.accepted();
    assert_eq!(
        exchange(batch_route, b"let me in"),
        None,
        "denied peer gets nothing back"
    );
    assert_eq!(
        mesh.app.accepted(),
        before,
        "the app never saw the denied peer"
    );
    let metrics = api.metrics();
    assert_eq!(
        metric(
            &metrics,
            "sidewall_proxy_authorizations_total",
            &[("outcome", "deny"), ("policy", "-")]
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "sidewall_proxy_authorizations_total",
            &[("outcome", "allow"), ("policy", "api-from-web")]
        ),
        2
    );
    assert!(api.log().contains("connection denied"), "{}", api.log());
    assert!(
        batch.log().contains("status=\"denied\"") || batch.log().contains("status=denied"),
        "{}",
        batch.log()
    );
    let (_, config) = support::http_get(web.admin_port, "/config");
    assert!(
        config.contains(&format!("\"identity\": \"{TD}/web\"")),
        "{config}"
    );
    assert!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(mesh.path().join("state/web/key.pem"))
                .unwrap()
                .permissions()
        ) & 0o077
            == 0
    );
}

#[test]
fn a_server_with_the_wrong_identity_is_refused() {
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let _api = mesh.sidecar("api", 0, "");
    // The directory claims the db lives at the api's address: the api presents its own
    // identity, not the db's, so the web sidecar must refuse it.
    let db_route = free_port();
    let extra = format!(
        "    - {{identity: {TD}/db, endpoints: [127.0.0.1:{}], ports: [{{port: 8080}}]}}\n",
        mesh.api_inbound
    );
    let web_route = free_port();
    let web = mesh.sidecar("web", web_route, &extra);
    let config = std::fs::read_to_string(mesh.path().join("web.yaml")).unwrap();
    let config = config.replace(
        "  routes: [",
        &format!("  routes: [{{listen: 127.0.0.1:{db_route}, service: {TD}/db, port: 8080}}, "),
    );
    drop(web);
    let web = ProxyProcess::start(mesh.path(), "web2", &config, free_port_from(&config));
    web.wait_ready();
    let before = mesh.app.accepted();
    assert_eq!(exchange(db_route, b"secret"), None);
    assert_eq!(mesh.app.accepted(), before);
    let metrics = web.metrics();
    assert_eq!(
        metric(
            &metrics,
            "sidewall_proxy_handshake_failures_total",
            &[("direction", "outbound"), ("reason", "unexpected_identity")]
        ),
        1,
        "{metrics}"
    );
    assert!(
        web.log()
            .contains("expected=spiffe://sidewall.local/ns/demo/svc/db"),
        "{}",
        web.log()
    );
    assert!(
        exchange(web_route, b"ok").is_some(),
        "the right identity still works"
    );
}

/// The admin port written in a sidecar config.
fn free_port_from(config: &str) -> u16 {
    let admin = config.split("admin:\n  listen: 127.0.0.1:").nth(1).unwrap();
    admin.lines().next().unwrap().parse().unwrap()
}

#[test]
fn a_policy_change_closes_open_connections_per_on_revoke() {
    use std::io::{Read, Write};
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let _api = mesh.sidecar("api", 0, "");
    let web_route = free_port();
    let _web = mesh.sidecar("web", web_route, "");
    let mut open = std::net::TcpStream::connect(("127.0.0.1", web_route)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    open.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    let started = Instant::now();
    mesh.policy("api", &ALLOW_WEB.replace("svc/web]", "svc/someone-else]"));
    // The open connection is cut (terminate): the read ends.
    let n = open.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the connection was closed");
    eprintln!(
        "policy change to closed connection: {:?}",
        started.elapsed()
    );
    assert_eq!(
        exchange(web_route, b"again"),
        None,
        "new connections are denied too"
    );
}

#[test]
fn bad_client_certificates_are_refused_each_with_its_reason() {
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let cp_dir = mesh.path().join("cp");
    let intermediate_pem = std::fs::read_to_string(cp_dir.join("ca/intermediate.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &intermediate_pem,
        rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(cp_dir.join("ca/intermediate.key")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let web = format!("{TD}/web");
    let now = time::OffsetDateTime::now_utc();
    let leaf = |tweak: &dyn Fn(&mut rcgen::CertificateParams)| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(web.as_str().try_into().unwrap())];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + Duration::from_secs(3600);
        tweak(&mut params);
        let chain = format!(
            "{}{intermediate_pem}",
            params.signed_by(&key, &issuer).unwrap().pem()
        );
        (chain, key.serialize_pem())
    };
    let other_ca = rcgen::Issuer::new(
        {
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        },
        rcgen::KeyPair::generate().unwrap(),
    );
    let foreign = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(web.as_str().try_into().unwrap())];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (
            params.signed_by(&key, &other_ca).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    type Credential = Option<(String, String)>;
    let cases: Vec<(&str, Credential, &str)> = vec![
        (
            "two URI SANs",
            Some(leaf(&|p| {
                p.subject_alt_names.push(rcgen::SanType::URI(
                    format!("{TD}/other").as_str().try_into().unwrap(),
                ))
            })),
            "multiple_uri_sans",
        ),
        (
            "CA:true leaf",
            Some(leaf(&|p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
            })),
            "ca_leaf",
        ),
        (
            "keyCertSign leaf",
            Some(leaf(&|p| {
                p.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign)
            })),
            "key_cert_sign_leaf",
        ),
        (
            "no URI SAN",
            Some(leaf(&|p| {
                p.subject_alt_names = vec![rcgen::SanType::DnsName("web.demo".try_into().unwrap())]
            })),
            "no_uri_san",
        ),
        (
            "server-only EKU",
            Some(leaf(&|p| {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]
            })),
            "wrong_extended_key_usage",
        ),
        (
            "expired certificate",
            Some(leaf(&|p| {
                p.not_before = now - Duration::from_secs(7200);
                p.not_after = now - Duration::from_secs(3600);
            })),
            "certificate_expired",
        ),
        ("another CA's certificate", Some(foreign), "unknown_issuer"),
        (
            "reserved identity",
            Some(leaf(&|p| {
                p.subject_alt_names = vec![rcgen::SanType::URI(
                    "spiffe://sidewall.local/sidewall/operator/admin"
                        .try_into()
                        .unwrap(),
                )]
            })),
            "reserved_identity",
        ),
        ("no client certificate", None, "no_certificate"),
    ];
    let bundle = std::fs::read_to_string(cp_dir.join("trust-bundle.pem")).unwrap();
    let before = mesh.app.accepted();
    for (name, identity, reason) in &cases {
        let answered = tls_exchange(mesh.api_inbound, &bundle, identity.as_ref(), 8080);
        assert!(answered.is_err(), "{name}: accepted: {answered:?}");
        let metrics = api.metrics();
        let counted = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            metric(
                &api.metrics(),
                "sidewall_proxy_handshake_failures_total",
                &[("direction", "inbound"), ("reason", reason)],
            ) >= 1
        });
        assert!(
            counted,
            "{name}: not counted as {reason}:\n{}",
            api.metrics()
        );
        let _ = metrics;
    }
    // Non-TLS bytes.
    let _ = exchange(mesh.api_inbound, b"GET / HTTP/1.1\r\nHost: api\r\n\r\n");
    eventually(5, "plaintext counted", || {
        metric(
            &api.metrics(),
            "sidewall_proxy_handshake_failures_total",
            &[("reason", "not_tls")],
        ) >= 1
    });
    assert_eq!(mesh.app.accepted(), before, "the app saw none of them");

    // The same client with a valid certificate for web gets through: the refusals above
    // were about the certificates.
    let good = leaf(&|_| {});
    assert_eq!(
        tls_exchange(mesh.api_inbound, &bundle, Some(&good), 8080).unwrap(),
        b"\x00ping"
    );
}

/// A TLS client from this test: presents `identity`, sends the port header and "ping", and
/// returns what came back.
fn tls_exchange(
    port: u16,
    bundle: &str,
    identity: Option<&(String, String)>,
    service_port: u16,
) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let roots: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes())
        .map(Result::unwrap)
        .collect();
    let mut bundles = sidewall_policies::svid::TrustBundles::default();
    bundles
        .add(
            sidewall_policies::TrustDomain::new("sidewall.local").unwrap(),
            roots,
        )
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let expected = sidewall_policies::SpiffeId::parse(&format!("{TD}/api")).unwrap();
    let verifier =
        sidewall_policies::svid::SpiffeServerVerifier::new(expected, bundles, &provider, None);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier));
    let config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let mut connection = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        "api.invalid".try_into().unwrap(),
    )
    .unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::Stream::new(&mut connection, &mut tcp);
    let [high, low] = service_port.to_be_bytes();
    tls.write_all(&[0x53, 0x57, 0x01, high, low])
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping").map_err(|e| e.to_string())?;
    tls.conn.send_close_notify();
    tls.flush().map_err(|e| e.to_string())?;
    let _ = tls.sock.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) if !answer.is_empty() => Ok(answer),
        Ok(_) => Err("closed without an answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn certificates_rotate_under_traffic_without_a_failed_exchange() {
    let mesh = Mesh::new("certificates: {workloadLifetime: 5s}\n");
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let web_route = free_port();
    let web = mesh.sidecar("web", web_route, "");
    // A connection opened now is authorized with certificates that expire within 5 s: it must
    // not outlive them, however busy it is.
    let mut long_lived = std::net::TcpStream::connect(("127.0.0.1", web_route)).unwrap();
    std::io::Write::write_all(&mut long_lived, b"held").unwrap();
    let started = Instant::now();
    let (mut exchanges, mut failures) = (0, 0);
    while started.elapsed() < Duration::from_secs(14) {
        let payload = format!("exchange {exchanges}");
        if exchange(web_route, payload.as_bytes()).as_deref() != Some(payload.as_bytes()) {
            failures += 1;
        }
        exchanges += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let renewed = |p: &ProxyProcess| {
        metric(
            &p.metrics(),
            "sidewall_proxy_certificates_obtained_total",
            &[],
        )
    };
    eprintln!(
        "{exchanges} exchanges, {failures} failed; certificates: api {}, web {}",
        renewed(&api),
        renewed(&web)
    );
    assert_eq!(failures, 0, "{exchanges} exchanges");
    assert!(exchanges > 100);
    assert!(
        renewed(&api) >= 3 && renewed(&web) >= 3,
        "each sidecar renewed at least twice"
    );
    assert!(web.log().contains("certificate obtained"));
    long_lived
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut echoed = Vec::new();
    let read = std::io::Read::read_to_end(&mut long_lived, &mut echoed);
    assert!(
        read.is_ok(),
        "closed by the sidecar, not by a timeout: {read:?}"
    );
    assert_eq!(echoed, b"held");
    // Either the carried connection itself or the shared connection carrying it.
    let closed = |log: String| {
        log.contains("peer certificate expired: connection closed")
            || log.contains("peer certificate expired: shared connection closed")
    };
    assert!(closed(api.log()) || closed(web.log()));
}

#[test]
fn sidecars_keep_serving_while_the_control_plane_is_down_and_restart_from_their_state() {
    let mut mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let mut api = mesh.sidecar("api", 0, "");
    let web_route = free_port();
    let _web = mesh.sidecar("web", web_route, "");
    assert!(exchange(web_route, b"before").is_some());
    assert_eq!(mesh.cp.stop(), Some(0));
    assert_eq!(
        exchange(web_route, b"while down").as_deref(),
        Some(&b"while down"[..])
    );

    // The api sidecar restarts with the control plane still down: it serves from its state.
    api.stop();
    let config = std::fs::read_to_string(mesh.path().join("api.yaml")).unwrap();
    std::fs::remove_file(mesh.path().join("api.token")).unwrap();
    let api = ProxyProcess::start(mesh.path(), "api", &config, free_port_from(&config));
    api.wait_ready();
    assert_eq!(
        exchange(web_route, b"after restart").as_deref(),
        Some(&b"after restart"[..])
    );
    assert!(
        !api.log().contains("certificate obtained"),
        "it used the saved certificate"
    );
}

#[test]
fn openssl_s_client_is_accepted_or_refused_as_policy_says() {
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let _api = mesh.sidecar("api", 0, "");
    let _web = mesh.sidecar("web", free_port(), "");
    let _batch = mesh.sidecar("batch", free_port(), "");
    let bundle = mesh.path().join("cp/trust-bundle.pem");
    let s_client = |name: &str| {
        let state = mesh.path().join("state").join(name);
        let cert = state.join("certificate.pem");
        let script = format!(
            "(printf '\\123\\127\\001\\037\\220ping'; sleep 2) | timeout 5 openssl s_client -quiet -connect 127.0.0.1:{} -cert {} -cert_chain {} -key {} -CAfile {} -verify_return_error",
            mesh.api_inbound,
            cert.display(),
            cert.display(),
            state.join("key.pem").display(),
            bundle.display()
        );
        let output = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        output.stdout
    };
    let before = mesh.app.accepted();
    assert_eq!(
        s_client("web"),
        b"\x00ping",
        "web is allowed: status 0, then the echo"
    );
    assert_eq!(mesh.app.accepted(), before + 1);
    assert_eq!(
        s_client("batch"),
        b"\x01",
        "batch is denied: status 1, then close"
    );
    assert_eq!(mesh.app.accepted(), before + 1);
}

/// Review H1: one connection budget covered everything, and a permit was taken at accept,
/// before anything was known about the client: idle TCP connections (1,000 per second from one
/// laptop) kept a sidecar full, and its authenticated peers and its own app's outbound calls
/// were refused. Connections not yet authenticated now have their own budget, capped per
/// source address and timed; authenticated inbound and outbound connections each have theirs.
#[test]
fn h1_idle_unauthenticated_connections_do_not_take_the_authenticated_budget() {
    let mut mesh = Mesh::new("{}");
    mesh.api_limits = ", maxConnections: 20, handshakesPerSource: 50".into();
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let route = free_port();
    let _web = mesh.sidecar("web", route, "");
    assert_eq!(exchange(route, b"before").as_deref(), Some(&b"before"[..]));

    // 80 idle TCP connections to api's inbound port: four times its authenticated budget, and
    // 30 over what one source address may hold before authenticating.
    let idle: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", mesh.api_inbound)).unwrap())
        .collect();
    eventually(
        10,
        "api to refuse the connections over the per-source cap",
        || {
            metric(
                &api.metrics(),
                "sidewall_proxy_connections_refused_total",
                &[("direction", "inbound"), ("reason", "source_limit")],
            ) >= 30
        },
    );
    for i in 0..5 {
        let payload = format!("during {i}");
        assert_eq!(
            exchange(route, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes()),
            "web's app connection was refused while idle connections held api's budget"
        );
    }
    drop(idle);
}

/// Opens `COUNT` TLS connections to 127.0.0.1:`PORT` with the certificate `CERT` and key `KEY`,
/// ALPN `sidewall-mux/1`, sends nothing, and prints `held` (then [`support::WAIT_FOR_CLOSE`]
/// prints how many the sidecar closed within 20 s).
const HOLD_MUX: &str = r#"
import socket, ssl, sys, threading
port, cert, key, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.load_cert_chain(cert, key)
context.set_alpn_protocols(["sidewall-mux/1"])
held = [context.wrap_socket(socket.create_connection(("127.0.0.1", port))) for _ in range(count)]
print("held", flush=True)
"#;

/// Review M8: a peer that no policy allows completed TLS with ALPN `sidewall-mux/1`, never sent
/// the HTTP/2 preface, and kept the shared connection (and its permit) until its certificate
/// expired: a handful of them filled api's budget. Now such a peer's shared connection stays in
/// the handshake budget and is closed at `limits.handshakeTimeout`, and any shared connection
/// must send its preface and first stream within it.
#[test]
fn m8_shared_connections_from_peers_no_policy_allows_are_closed() {
    let mut mesh = Mesh::new("{}");
    mesh.api_limits = ", maxConnections: 20, handshakeTimeout: 2s".into();
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let route = free_port();
    let _web = mesh.sidecar("web", route, "");
    let _intruder = mesh.sidecar("intruder", free_port(), "");
    let hold = |name: &str, count: usize| {
        let state = mesh.path().join("state").join(name);
        let args = [
            mesh.api_inbound.to_string().into(),
            state.join("certificate.pem").into_os_string(),
            state.join("key.pem").into_os_string(),
            count.to_string().into(),
        ];
        support::Helper::start(
            &format!("{HOLD_MUX}{}", support::WAIT_FOR_CLOSE),
            &args,
            "held",
        )
    };
    // 30 silent shared connections from a peer no policy allows: more than api's budget.
    let mut intruder = hold("intruder", 30);
    for i in 0..3 {
        let payload = format!("while held {i}");
        assert_eq!(
            exchange(route, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes()),
            "web was refused while the intruder held shared connections"
        );
    }
    assert_eq!(
        intruder.line(),
        "30",
        "the intruder's connections stayed open"
    );
    // Closed at the handshake deadline, as having no policy or as having sent no preface.
    let metrics = api.metrics();
    let closed = metric(
        &metrics,
        "sidewall_proxy_connections_closed_total",
        &[("reason", "shared_no_policy")],
    ) + metric(
        &metrics,
        "sidewall_proxy_handshake_failures_total",
        &[("direction", "inbound"), ("reason", "timeout")],
    );
    assert!(closed >= 30, "{metrics}");
    // An allowed peer's silent shared connection is closed after the deadline too.
    assert_eq!(
        hold("web", 1).line(),
        "1",
        "a silent shared connection stayed open"
    );
}

/// Hostile suite `h2-ping-flood`: an allowed peer streaming `PING`s (or `SETTINGS`) on a shared
/// connection kept a worker answering them, with no limit; other peers' requests waited 50
/// times longer. Now a connection that sends more than a burst of 100 control frames (refilled
/// at 10 a second) is closed and counted, and the peer's next connection works.
#[test]
fn control_frame_floods_close_the_shared_connection() {
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let route = free_port();
    let _web = mesh.sidecar("web", route, "");
    // web's sidecar opens its shared connection (and so has its SVID on disk).
    assert_eq!(exchange(route, b"before").as_deref(), Some(&b"before"[..]));
    let peer_state = mesh.path().join("state/web");
    let target = support::FloodTarget {
        port: mesh.api_inbound,
        control_plane: &mesh.path().join("cp"),
        peer_state: &peer_state,
        server: &format!("{TD}/api"),
        alpn: "sidewall-mux/1",
        port_header: None,
    };
    for (kind, name) in [(6, "PING"), (4, "SETTINGS")] {
        let sent = support::h2_control_flood(&target, kind);
        assert!(
            sent.is_some_and(|sent| sent <= 10_000),
            "a {name} flood was still served after {sent:?} frames"
        );
    }
    let metrics = api.metrics();
    assert_eq!(
        metric(
            &metrics,
            "sidewall_proxy_connections_closed_total",
            &[("reason", "control_flood")]
        ),
        2,
        "{metrics}"
    );
    assert!(
        api.log()
            .contains("more HTTP/2 PING and SETTINGS frames than allowed")
    );
    assert_eq!(exchange(route, b"after").as_deref(), Some(&b"after"[..]));
}

/// Review L9: every refused stream of an authenticated peer wrote a warning, at stream rate.
/// Refusals from one peer on one port, for one reason, are now one line per 10 s with how many
/// were folded into it; the metrics count each.
#[test]
fn l9_denials_from_one_peer_are_logged_once_per_window() {
    let mesh = Mesh::new("{}");
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    let route = free_port();
    let _batch = mesh.sidecar("batch", route, "");
    for _ in 0..30 {
        assert_eq!(exchange(route, b"denied"), None);
    }
    let metrics = api.metrics();
    let refused = metric(
        &metrics,
        "sidewall_proxy_authorizations_total",
        &[("outcome", "deny"), ("policy", "-")],
    );
    assert!(refused >= 30, "{metrics}");
    let log = api.log();
    let lines = log.matches("connection denied").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} lines for {refused} refusals:\n{log}"
    );
}

/// Review L3: the sidecar's admin listener (probes, metrics) took any number of connections
/// and kept one that sent nothing (or half a request) for ever, so a few hundred idle
/// connections to it failed the kubelet's probes. Now it holds 64 at most and closes one whose
/// request head is not in within `limits.handshakeTimeout`.
#[test]
fn l3_the_admin_listener_is_capped_and_timed() {
    let mut mesh = Mesh::new("{}");
    mesh.api_limits = ", handshakeTimeout: 2s".into();
    mesh.policy("api", ALLOW_WEB);
    let api = mesh.sidecar("api", 0, "");
    assert_eq!(support::hold_plain(api.admin_port, "nothing", 1), 1);
    assert_eq!(support::hold_plain(api.admin_port, "byte", 1), 1);
    // 70 at once: 64 held until the deadline, 6 closed at once.
    assert_eq!(support::hold_plain(api.admin_port, "nothing", 70), 70);
    let metrics = api.metrics();
    assert_eq!(
        metric(
            &metrics,
            "sidewall_proxy_connections_refused_total",
            &[("direction", "admin"), ("reason", "limit")]
        ),
        6,
        "{metrics}"
    );
    assert_eq!(
        support::http_get(api.admin_port, "/live"),
        (200, "ok\n".to_owned())
    );
}
