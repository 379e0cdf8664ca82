//! First contact: what a joining sidecar trusts before it hands over its join token.
//!
//! The token pins the CA by its root's SHA-256. An impostor on the path answers the unverified
//! trust-bundle fetch with the genuine root *plus* one of its own, and presents a control-plane
//! certificate signed by its own root (security review H3). The sidecar must trust only the
//! pinned root for the join, so the handshake fails and the token never leaves the process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use sidewall_control_plane::testing::TestIssuer;
use support::{ControlPlaneProcess, ProxyProcess, eventually, free_port, http_get};

const TD: &str = "spiffe://sidewall.local";

/// An HTTPS server that serves `GET /v1/trust-bundle` from a file and writes every request it
/// gets (and the body of every POST) to a log, one line each. Prints its port.
const IMPOSTOR: &str = r#"
import http.server, ssl, sys
bundle_file, log_file, cert, key = sys.argv[1:5]
def note(line):
    with open(log_file, "a") as log:
        log.write(line + "\n")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        note("GET " + self.path)
        body = open(bundle_file, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        note("POST " + self.path + " " + body.decode(errors="replace"))
        self.send_error(503)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// A CA of the impostor's own and a certificate for the control plane's SPIFFE ID (and
/// 127.0.0.1) signed by it: (root PEM, leaf chain PEM, leaf key PEM).
fn impostor_credential() -> (String, String, String) {
    credential(vec![
        rcgen::SanType::URI(
            format!("{TD}/sidewall/control-plane")
                .as_str()
                .try_into()
                .unwrap(),
        ),
        rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
    ])
}

/// A new CA and a server certificate for `names` signed by it: (root PEM, leaf PEM, leaf key
/// PEM).
fn credential(names: Vec<rcgen::SanType>) -> (String, String, String) {
    let now = time::OffsetDateTime::now_utc();
    let mut root_params = rcgen::CertificateParams::default();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    root_params.not_before = now - Duration::from_secs(60);
    root_params.not_after = now + Duration::from_secs(86_400);
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_pem = root_params.clone().self_signed(&root_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(root_params, root_key);

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = names;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + Duration::from_secs(3600);
    let leaf = params.signed_by(&key, &issuer).unwrap().pem();
    (root_pem, leaf, key.serialize_pem())
}

/// A join token for the api identity, written to `<dir>/api.token`; returns the token.
fn api_token(cp: &ControlPlaneProcess, dir: &std::path::Path) -> String {
    let created = cp.cli(&[
        "token",
        "create",
        "--identity",
        &format!("{TD}/ns/shop/svc/api"),
    ]);
    assert_eq!(created.code, 0, "{}", created.stderr);
    let token = created.stdout.lines().last().unwrap().trim().to_owned();
    std::fs::write(dir.join("api.token"), format!("{token}\n")).unwrap();
    token
}

/// The api sidecar's config: joining the control plane on `port`, admin on `admin`.
fn api_config(port: u16, admin: u16) -> String {
    format!(
        "identity: {TD}/ns/shop/svc/api\ncontrolPlane:\n  urls: [https://127.0.0.1:{port}]\n  tokenFile: api.token\nstateDir: state/api\ninbound:\n  listen: 127.0.0.1:{}\n  ports: [{{port: 8080, protocol: tcp, app: 127.0.0.1:{}}}]\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        free_port(),
        free_port(),
    )
}

#[test]
fn a_bundle_with_an_extra_root_gets_no_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    let identity = format!("{TD}/ns/shop/svc/api");
    let token = api_token(&cp, dir.path());

    // The impostor's bundle: the genuine root (so the pin matches) and its own.
    let (evil_root, cert, key) = impostor_credential();
    let genuine = std::fs::read_to_string(cp.data_dir.join("trust-bundle.pem")).unwrap();
    let files = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let bundle = files("bundle.pem", &format!("{genuine}{evil_root}"));
    let cert = files("impostor.pem", &cert);
    let key = files("impostor.key", &key);
    let log = dir.path().join("impostor.log");
    let mut impostor = Command::new("python3")
        .arg("-c")
        .arg(IMPOSTOR)
        .args([&bundle, &log, &cert, &key])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 (scripts/test-deps installs it)");
    let mut port = String::new();
    BufReader::new(impostor.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port: u16 = port.trim().parse().expect("the impostor's port");

    let admin = free_port();
    let mut sidecar = ProxyProcess::start(dir.path(), "api", &api_config(port, admin), admin);
    // The sidecar fetched the bundle, tried the join and gave up on that control plane...
    let seen = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(30, "the sidecar to fetch the trust bundle", || {
        seen().contains("GET /v1/trust-bundle")
    });
    eventually(
        30,
        "the sidecar to give up on the impostor, or to send it the token",
        || {
            sidecar
                .log()
                .contains("does not chain to a root this sidecar trusts")
                || seen().contains("POST")
        },
    );
    assert_ne!(
        http_get(admin, "/ready").0,
        200,
        "the sidecar says it is ready"
    );
    sidecar.stop();
    let _ = impostor.kill();
    let _ = impostor.wait();

    // ...without sending anything to it: no token, no CSR, and no certificate or bundle saved.
    let requests = seen();
    assert!(!requests.contains("POST"), "{requests}");
    assert!(!requests.contains(&token), "the token leaked: {requests}");
    assert!(
        !dir.path().join("state/api/trust-bundle.pem").exists(),
        "a trust bundle was saved"
    );

    // The token is still good at the genuine control plane: the impostor could not spend it.
    let listed = cp.cli(&["token", "list"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let row = listed
        .stdout
        .lines()
        .find(|l| l.ends_with(&identity))
        .unwrap_or_else(|| panic!("no token for {identity}:\n{}", listed.stdout));
    assert!(row.contains("active") && row.contains("0/1"), "{row}");
}

/// Review L6, in the sidecar's state directory: a leftover `key.tmp` that someone else holds
/// open never receives the workload's private key.
#[test]
fn l6_a_leftover_temporary_file_in_the_state_directory_gets_no_key() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    api_token(&cp, dir.path());
    let state = dir.path().join("state/api");
    std::fs::create_dir_all(&state).unwrap();
    let leftover = state.join("key.tmp");
    std::fs::write(&leftover, "").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut watcher = std::fs::File::open(&leftover).unwrap();

    let admin = free_port();
    let config = api_config(cp.api_port, admin);
    let _sidecar = ProxyProcess::start(dir.path(), "api", &config, admin);
    eventually(30, "the sidecar to save its certificate", || {
        state.join("certificate.pem").exists()
    });
    let mut seen = String::new();
    watcher.read_to_string(&mut seen).unwrap();
    assert!(
        !seen.contains("PRIVATE KEY"),
        "the workload key went through a file another user held open"
    );
    let key = std::fs::metadata(state.join("key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

/// A TCP relay to `target` that passes every connection through, except the `cut`-th
/// (counting from 1): on that one, once the client has sent its second flight (its TLS
/// Finished and its request), nothing more from the server reaches the client, and both sides
/// are closed a second later. The server has the whole request and answers it; the client
/// never hears the answer. Returns the relay's port.
fn relay_losing_an_answer(target: u16, cut: usize) -> u16 {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (index, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let losing = index + 1 == cut;
            let answered = Arc::new(AtomicBool::new(true));
            let (mut c_read, mut c_write) = (client.try_clone().unwrap(), client);
            let (mut s_read, mut s_write) = (server.try_clone().unwrap(), server);
            let to_client = answered.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = s_read.read(&mut buffer) {
                    if to_client.load(Ordering::SeqCst) && c_write.write_all(&buffer[..n]).is_err()
                    {
                        break;
                    }
                }
                let _ = c_write.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buffer = [0u8; 16 * 1024];
                let mut reads = 0;
                while let Ok(n @ 1..) = c_read.read(&mut buffer) {
                    reads += 1;
                    if s_write.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                    if losing && reads >= 2 && answered.swap(false, Ordering::SeqCst) {
                        // The handshake is done and the request follows: everything the
                        // client sends still goes through, the server answers into the void,
                        // and the client's connection is closed once the answer is in.
                        let client = c_read.try_clone().unwrap();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(1500));
                            let _ = client.shutdown(Shutdown::Both);
                        });
                    }
                }
                let _ = s_write.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// A sidecar whose first certificate request reached the control plane, but whose answer was
/// lost on the way back (a timeout, a cut connection), joins on its next attempt with the same
/// single-use token: it asks again for the key the token was redeemed with, which the control
/// plane accepts again, instead of a new key that finds the token used up.
#[test]
fn a_join_whose_answer_was_lost_is_retried_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    api_token(&cp, dir.path());
    // Connection 1 fetches the trust bundle; connection 2 carries the certificate request.
    let relay = relay_losing_an_answer(cp.api_port, 2);
    let admin = free_port();
    let sidecar = ProxyProcess::start(dir.path(), "api", &api_config(relay, admin), admin);
    // The first attempt fails (its answer never comes); the retry follows within seconds.
    let joined = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        http_get(admin, "/ready").0 == 200
    });
    let tokens = cp.cli(&["token", "list"]);
    assert!(
        joined,
        "the sidecar never joined after its first answer was lost\ntokens:\n{}\nlog:\n{}",
        tokens.stdout,
        sidecar.log()
    );
    // One redemption: the retry asked for the key the token was already spent on.
    assert!(
        tokens
            .stdout
            .lines()
            .any(|l| l.contains(" used ") && l.contains("1/1")),
        "{}",
        tokens.stdout
    );
    assert!(sidecar.log().contains("certificate"), "{}", sidecar.log());
}

/// Issue 19, part 1: a sidecar joins with its pod's Kubernetes service-account token instead
/// of a join token. The cluster here is a key this test makes (its JWKS in a file, as
/// `kubectl get --raw /openid/v1/jwks` writes it) and tokens signed with it as the kubelet
/// projects them. The sidecar pins the CA by `caFingerprint` (computed with openssl, as the
/// docs say) and reads the token file at every attempt: a token of another pod is refused and
/// counted, and once the file holds the pod's own token the next attempt joins.
#[test]
fn a_sidecar_joins_with_its_pods_service_account_token() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestIssuer::new("cluster-1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, cluster.jwks()).unwrap();
    let issuer = cluster.url.clone();
    let config = dir.path().join("cp.yaml");
    std::fs::write(
        &config,
        format!(
            "attestation:\n  kubernetes:\n    issuer: {issuer}\n    jwksFile: {}\n    namespaces: [shop]\n",
            jwks.display()
        ),
    )
    .unwrap();
    let cp = ControlPlaneProcess::start(
        &dir.path().join("cp"),
        &["--config", config.to_str().unwrap()],
    );
    let token_for = |pod: &str| cluster.token("shop", "api", pod, "sidewall", 3600);
    let fingerprint = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in {} -outform der | sha256sum",
            cp.data_dir.join("trust-bundle.pem").display()
        ))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8(fingerprint.stdout).unwrap();
    let fingerprint = fingerprint.split_whitespace().next().unwrap();
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    // The control plane's CLI gives the same, from its data directory.
    let printed = Command::new(env!("CARGO_BIN_EXE_sidewall"))
        .args(["ca", "fingerprint", "--data-dir"])
        .arg(&cp.data_dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        fingerprint,
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );

    // What a wrong configuration gets, before anything starts.
    let sidewall = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_sidewall"))
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = sidewall(&["ca", "fingerprint", "--data-dir", "/nowhere"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("/nowhere/trust-bundle.pem: No such file"),
        "{stderr}"
    );
    let bad = dir.path().join("bad.yaml");
    let base = format!(
        "identity: {TD}/ns/shop/svc/api\nstateDir: s\ninbound: {{listen: 127.0.0.1:4643, ports: []}}\nadmin: {{listen: 127.0.0.1:4691}}\n"
    );
    for (control_plane, expected) in [
        (
            "{urls: [https://cp:4600], tokenFile: t, serviceAccountTokenFile: s}",
            "give tokenFile or serviceAccountTokenFile, not both",
        ),
        (
            "{urls: [https://cp:4600], serviceAccountTokenFile: s}",
            "controlPlane.caFingerprint: with serviceAccountTokenFile, give the SHA-256",
        ),
        (
            "{urls: [https://cp:4600], serviceAccountTokenFile: s, caFingerprint: ABC}",
            "64 lowercase hex digits",
        ),
    ] {
        std::fs::write(&bad, format!("{base}controlPlane: {control_plane}\n")).unwrap();
        let (code, stderr) = sidewall(&["proxy", "--config", bad.to_str().unwrap(), "--check"]);
        assert_eq!(code, Some(2), "{control_plane}: {stderr}");
        assert!(stderr.contains(expected), "{control_plane}: {stderr}");
    }
    std::fs::write(
        &bad,
        format!("attestation: {{kubernetes: {{issuer: {issuer}, jwksFile: /nowhere.json}}}}\n"),
    )
    .unwrap();
    let data = dir.path().join("never");
    let (code, stderr) = sidewall(&[
        "control-plane",
        "--config",
        bad.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("attestation.kubernetes.jwksFile: /nowhere.json: No such file"),
        "{stderr}"
    );

    // Another pod's token first.
    let token_file = dir.path().join("sa-token");
    std::fs::write(&token_file, token_for("api-9")).unwrap();
    let admin = free_port();
    let config = format!(
        "identity: {TD}/ns/shop/svc/api\ncontrolPlane:\n  urls: [https://127.0.0.1:{}]\n  serviceAccountTokenFile: sa-token\n  caFingerprint: {fingerprint}\n  pod: api-1\nstateDir: state/api\ninbound:\n  listen: 127.0.0.1:{}\n  ports: [{{port: 8080, protocol: tcp, app: 127.0.0.1:{}}}]\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        cp.api_port,
        free_port(),
        free_port(),
    );
    let sidecar = ProxyProcess::start(dir.path(), "api", &config, admin);
    eventually(30, "the other pod's token refused", || {
        sidecar
            .log()
            .contains("belongs to pod api-9, not to pod api-1")
    });
    assert_ne!(http_get(admin, "/ready").0, 200, "not joined");
    let metrics = http_get(cp.admin_port, "/metrics").1;
    assert!(
        support::metric(
            &metrics,
            "sidewall_control_plane_refusals_total",
            &[("route", "certificates"), ("reason", "sa_token_other_pod")]
        ) >= 1,
        "{metrics}"
    );

    // The kubelet's own token for this pod: the next attempt reads it and joins.
    std::fs::write(&token_file, token_for("api-1")).unwrap();
    sidecar.wait_ready();
    let fleet = cp.cli(&["status"]);
    assert!(
        fleet.stdout.contains(&format!("{TD}/ns/shop/svc/api")),
        "{}\n{}",
        fleet.stdout,
        fleet.stderr
    );
}

/// `openssl s_server -WWW` serving a directory over HTTPS on loopback (as `localhost`, with a
/// certificate of a CA of its own, in `ca.pem` there), stopped when dropped.
struct Https {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl Https {
    fn serve(root: &std::path::Path) -> Self {
        let port = free_port();
        let (ca, leaf, key) = credential(vec![rcgen::SanType::DnsName(
            "localhost".try_into().unwrap(),
        )]);
        std::fs::write(root.join("ca.pem"), ca).unwrap();
        std::fs::write(root.join("server.pem"), leaf).unwrap();
        std::fs::write(root.join("server.key"), key).unwrap();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-cert", "server.pem", "-key", "server.key"])
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually(10, "openssl s_server listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            child,
            port,
            ca: root.join("ca.pem"),
        }
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 19, part 1: the issuer's keys fetched from its OIDC discovery URL over HTTPS (here
/// `openssl s_server`, checked against a CA file, as a pod checks the API server against its
/// service account's `ca.crt`), and fetched again as soon as a token names a key the control
/// plane lacks: a sidecar joins with a token of the issuer's key, the issuer rotates to a new
/// key, and a sidecar with a token of the new one joins too, with no restart and no file. Each
/// token is also confirmed with the API server (a TokenReview, answered here by a small HTTPS
/// server): api's is refused until the API server knows it.
#[test]
fn the_issuer_keys_come_from_its_discovery_url_and_follow_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(www.join(".well-known")).unwrap();
    std::fs::create_dir_all(www.join("openid/v1")).unwrap();
    let https = Https::serve(&www);
    let base = format!("https://localhost:{}", https.port);
    std::fs::write(
        www.join(".well-known/openid-configuration"),
        format!(r#"{{"issuer": "https://kubernetes.default.svc.cluster.local", "jwks_uri": "{base}/openid/v1/jwks"}}"#),
    )
    .unwrap();
    let first = TestIssuer::new("key-1");
    std::fs::write(www.join("openid/v1/jwks"), first.jwks()).unwrap();
    let reviews = sidewall_control_plane::testing::ReviewServer::start(dir.path());
    // One CA file for both (one API server would have one CA).
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        [&https.ca, &reviews.ca_file]
            .map(|f| std::fs::read_to_string(f).unwrap())
            .concat(),
    )
    .unwrap();
    let config = dir.path().join("cp.yaml");
    std::fs::write(
        &config,
        format!(
            "attestation:\n  kubernetes:\n    issuer: {}\n    jwksUrl: {base}/.well-known/openid-configuration\n    tokenReviewUrl: {}\n    caFile: {}\n    namespaces: [shop]\n",
            first.url,
            reviews.url,
            ca.display()
        ),
    )
    .unwrap();
    let cp = ControlPlaneProcess::start(
        &dir.path().join("cp"),
        &["--config", config.to_str().unwrap()],
    );
    let fingerprint = cp.cli(&["ca", "fingerprint"]);
    assert_eq!(fingerprint.code, 0, "{}", fingerprint.stderr);
    let sidecar = |name: &str, token: String, ready: bool| {
        std::fs::write(dir.path().join(format!("{name}.sa")), token).unwrap();
        let admin = free_port();
        let config = format!(
            "identity: {TD}/ns/shop/svc/{name}\ncontrolPlane:\n  urls: [https://127.0.0.1:{}]\n  serviceAccountTokenFile: {name}.sa\n  caFingerprint: {}\n  pod: {name}-1\nstateDir: state/{name}\ninbound:\n  listen: 127.0.0.1:{}\n  ports: [{{port: 8080, protocol: tcp, app: 127.0.0.1:{}}}]\nadmin:\n  listen: 127.0.0.1:{admin}\n",
            cp.api_port,
            fingerprint.stdout.trim(),
            free_port(),
            free_port(),
        );
        let proxy = ProxyProcess::start(dir.path(), name, &config, admin);
        if ready {
            proxy.wait_ready();
        }
        proxy
    };
    let api_token = first.token("shop", "api", "api-1", "sidewall", 3600);
    let api = sidecar("api", api_token.clone(), false);
    eventually(30, "api's token refused by the TokenReview", || {
        api.log()
            .contains("the API server refused the service-account token")
    });
    reviews.allow(&api_token, "shop", "api", "api-1");
    api.wait_ready();

    // The issuer rotates: its JWKS now holds only the new key.
    let second = TestIssuer::new("key-2");
    std::fs::write(www.join("openid/v1/jwks"), second.jwks()).unwrap();
    let web_token = second.token("shop", "web", "web-1", "sidewall", 3600);
    reviews.allow(&web_token, "shop", "web", "web-1");
    let _web = sidecar("web", web_token, true);
    let metrics = http_get(cp.admin_port, "/metrics").1;
    assert!(
        support::metric(
            &metrics,
            "sidewall_control_plane_issuer_key_fetches_total",
            &[("result", "fetched")]
        ) >= 2,
        "{metrics}"
    );
    // web's first attempt named a key the control plane did not have yet: refused, and the
    // keys fetched again at once (the next periodic fetch is minutes away).
    assert!(
        support::metric(
            &metrics,
            "sidewall_control_plane_refusals_total",
            &[
                ("route", "certificates"),
                ("reason", "sa_token_key_unknown")
            ]
        ) >= 1,
        "{metrics}"
    );
}
