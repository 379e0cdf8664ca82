//! Test helpers shared by the control plane's tests and the end-to-end tests (feature
//! `test-util`): an in-process control plane on loopback, clients with any identity, and an
//! independent check of the X.509-SVID rules on issued certificates.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test support code

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sidewall_policies::TrustDomain;
use tokio::sync::oneshot;

/// A free loopback port, bound and released, and never handed out twice in this process: the
/// kernel may give the same ephemeral port to two `bind(0)` calls once the first listener is
/// closed, and two parallel tests (or two members of one etcd cluster) then fight for it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a loopback port");
        if given.insert(port) {
            return port;
        }
    }
}
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

pub mod etcd;

use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::server::{self, Listeners};

/// Writes a key-encryption key file (mode 0600) into `dir` and returns its path.
pub fn kek_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("ca.kek");
    std::fs::write(&path, format!("{}\n", crate::random::hex_token(32))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Points `config` at an etcd cluster (prefix `/sidewall`) with the KEK file `kek`.
pub fn use_etcd(config: &mut Config, cluster: &etcd::EtcdCluster, kek: &Path) {
    config.store = crate::config::StoreConfig::Etcd(crate::config::EtcdConfig {
        endpoints: cluster.endpoints(),
        prefix: "/sidewall".into(),
        ca: None,
        identity: None,
        user: None,
        password_file: None,
    });
    config.ca_kek_file = Some(kek.to_path_buf());
}

/// A control plane running in this process on loopback ports.
pub struct TestControlPlane {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The dashboard (plain HTTP).
    pub ui: SocketAddr,
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestControlPlane {
    /// Starts one in `data_dir`, letting `tweak` change the configuration first.
    pub async fn start(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::load(
            None,
            Overrides {
                data_dir: Some(data_dir.to_path_buf()),
                ..Overrides::default()
            },
        )
        .unwrap();
        tweak(&mut config);
        let trust_domain = config.trust_domain.clone();
        let prepared = server::prepare(config).await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ui = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (api_addr, admin_addr) = (api.local_addr().unwrap(), admin.local_addr().unwrap());
        let ui_addr = ui.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(prepared, Listeners { api, admin, ui }, None, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            api: api_addr,
            admin: admin_addr,
            ui: ui_addr,
            data_dir: data_dir.to_path_buf(),
            trust_domain,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.api)
    }

    /// The trust bundle the control plane wrote.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(crate::data_dir::bundle_path(&self.data_dir)).unwrap();
        CertificateDer::pem_slice_iter(&pem)
            .map(Result::unwrap)
            .collect()
    }

    /// A client without a certificate (first contact).
    pub fn anonymous(&self) -> Client {
        Client::new(&self.url(), &self.trust_domain, self.roots(), None).unwrap()
    }

    /// A client presenting `chain` with `key`.
    pub fn with_identity(&self, chain_pem: &str, key_pem: &str) -> Client {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        Client::new(
            &self.url(),
            &self.trust_domain,
            self.roots(),
            Some((chain, key)),
        )
        .unwrap()
    }

    /// Enrolls a workload with a join token, as a sidecar does on first start.
    pub async fn workload(&self, identity: &str) -> Workload {
        enroll(&self.data_dir, &self.url(), &self.trust_domain, identity).await
    }

    /// The admin operator.
    pub fn operator(&self) -> Client {
        Client::operator(&self.data_dir, "admin", Some(&self.url())).unwrap()
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A workload enrolled as sidecars do: a join token created by the `admin` operator, a fresh
/// key, a certificate for it, and a client presenting that certificate.
pub struct Workload {
    pub identity: String,
    pub client: Client,
    /// When its certificate expires, Unix seconds.
    pub expires_at: i64,
}

impl Workload {
    /// The service name (the last segment of the identity).
    pub fn name(&self) -> &str {
        self.identity.rsplit('/').next().unwrap()
    }

    /// The sidecar instance these helpers use: `<name>-1`.
    pub fn instance(&self) -> String {
        format!("{}-1", self.name())
    }

    /// POSTs `body` to `path` with the workload's certificate and expects `200`.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, answer) = self
            .client
            .call(hyper::Method::POST, path, Some(&body))
            .await
            .unwrap();
        assert_eq!(status, hyper::StatusCode::OK, "{path}: {answer}");
        answer
    }

    /// Registers sidecar [`Self::instance`] at `127.0.0.1:<port>`, serving `port` over
    /// `protocol` (`tcp` or `http`).
    pub async fn register(&self, port: u16, protocol: &str) {
        self.post(
            "/v1/registrations",
            serde_json::json!({"instance": self.instance(), "endpoint": format!("127.0.0.1:{port}"),
                               "ports": [{"port": port, "protocol": protocol}]}),
        )
        .await;
    }

    /// Opens the snapshot watch of [`Self::instance`] and acknowledges the first snapshot with
    /// the certificate's expiry, as a sidecar does. Call it once every registration is in, so
    /// that no later change makes a newer snapshot this one never acknowledges.
    pub async fn watch_and_ack(&self) -> Watch {
        self.watch_and_ack_as(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
            .await
    }

    /// [`Self::watch_and_ack`], the ack saying the sidecar runs with `sidecar`
    /// ([`sidewall_policies::wire::SidecarFacts`] as JSON).
    pub async fn watch_and_ack_as(&self, sidecar: serde_json::Value) -> Watch {
        let stream = watch(&self.client, &self.instance()).await;
        self.post(
            "/v1/acks",
            serde_json::json!({"instance": self.instance(), "version": stream.snapshot["version"],
                               "status": "applied", "certificate_expires_at": self.expires_at,
                               "sidecar": sidecar}),
        )
        .await;
        stream
    }

    /// Reports flows (`POST /v1/flows`) as this workload's sidecar, the target of each.
    pub async fn report_flows(&self, flows: serde_json::Value) {
        self.post("/v1/flows", serde_json::json!({ "flows": flows }))
            .await;
    }
}

/// Enrolls `identity` with the control plane at `url` whose data directory is `data_dir`
/// (for the operator credential and the trust bundle).
pub async fn enroll(
    data_dir: &Path,
    url: &str,
    trust_domain: &TrustDomain,
    identity: &str,
) -> Workload {
    let operator = Client::operator(data_dir, "admin", Some(url)).unwrap();
    let (status, body) = operator
        .call(
            hyper::Method::POST,
            "/v1/tokens",
            Some(&serde_json::json!({"identity": identity, "uses": 1})),
        )
        .await
        .unwrap();
    assert_eq!(status, hyper::StatusCode::CREATED, "{body}");
    let pem = std::fs::read(crate::data_dir::bundle_path(data_dir)).unwrap();
    let roots: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .map(Result::unwrap)
        .collect();
    let anonymous = Client::new(url, trust_domain, roots.clone(), None).unwrap();
    let (key, csr) = crate::client::key_and_csr().unwrap();
    let (status, issued) = anonymous
        .call(
            hyper::Method::POST,
            "/v1/certificates",
            Some(&serde_json::json!({"csr": csr, "token": body["token"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, hyper::StatusCode::OK, "{issued}");
    let chain_pem = issued["certificate_chain"].as_str().unwrap();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let svid =
        sidewall_policies::svid::Svid::from_der(&chain[0], sidewall_policies::svid::Usage::Client)
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    Workload {
        identity: identity.to_owned(),
        client: Client::new(url, trust_domain, roots, Some((chain, key))).unwrap(),
        expires_at: svid.not_after,
    }
}

/// An open `GET /v1/snapshots/watch` stream (closed when dropped), with the first snapshot.
pub struct Watch {
    pub snapshot: serde_json::Value,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens the snapshot watch of `client`'s workload as sidecar `instance` and waits for the
/// first snapshot; the stream stays open (so the fleet shows it connected) until dropped.
pub async fn watch(client: &Client, instance: &str) -> Watch {
    use http_body_util::BodyExt;
    let authority = client.url().strip_prefix("https://").unwrap().to_owned();
    let host = authority
        .rsplit_once(':')
        .unwrap()
        .0
        .trim_matches(['[', ']']);
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.tls())
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let request = hyper::Request::get(format!("/v1/snapshots/watch?instance={instance}"))
        .header(hyper::header::HOST, &authority)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), hyper::StatusCode::OK);
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let snapshot = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a snapshot within 10 s")
            .expect("the stream stays open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
        let line_end = buffer.iter().position(|b| *b == b'\n');
        if let Some(end) = line_end {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if line.len() > 1 {
                break serde_json::from_slice(&line).unwrap();
            }
        }
    };
    let task = tokio::spawn(async move {
        let _sender = sender;
        while let Some(Ok(_)) = body.frame().await {}
        connection.abort();
    });
    Watch { snapshot, task }
}

/// One plain-HTTP/1.1 request (for the admin and dashboard listeners): the status, the
/// response head (lowercase) and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut text))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&text).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Checks, with x509-parser and independently of the code that built it, that `leaf_pem` is
/// an X.509-SVID for `identity`: exactly one URI SAN, cA=false, key usage digitalSignature
/// only and critical, EKU serverAuth + clientAuth, subject and authority key identifiers, a
/// 128-bit serial, and a lifetime of `lifetime` (give or take the 60 s backdating).
pub fn assert_svid(leaf_pem: &str, identity: &str, lifetime: Duration) {
    let der = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).unwrap();
    let (rest, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(rest.is_empty());
    let mut uris = Vec::new();
    let mut other_sans = 0;
    let (mut bc_ok, mut ku_ok, mut eku_ok, mut ski, mut aki) = (false, false, false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        _ => other_sans += 1,
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => bc_ok = !bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                ku_ok = ext.critical
                    && ku.digital_signature()
                    && !ku.key_cert_sign()
                    && !ku.crl_sign()
                    && !ku.key_encipherment();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                eku_ok = eku.server_auth && eku.client_auth && !eku.any;
            }
            ParsedExtension::SubjectKeyIdentifier(_) => ski = true,
            ParsedExtension::AuthorityKeyIdentifier(_) => aki = true,
            _ => {}
        }
    }
    assert_eq!(uris, vec![identity.to_owned()], "exactly one URI SAN");
    assert_eq!(other_sans, 0, "no other SANs on a workload SVID");
    assert!(bc_ok, "basicConstraints present with cA=false");
    assert!(ku_ok, "key usage: digitalSignature only, critical");
    assert!(eku_ok, "EKU serverAuth + clientAuth");
    assert!(ski && aki, "subject and authority key identifiers");
    let serial = cert.raw_serial();
    assert!(
        (15..=16).contains(&serial.len()),
        "128-bit serial, got {} bytes",
        serial.len()
    );
    let validity = cert.validity();
    let seconds = validity.not_after.timestamp() - validity.not_before.timestamp();
    let expected = i64::try_from(lifetime.as_secs()).unwrap();
    assert!(
        (expected..=expected + 61).contains(&seconds),
        "lifetime {seconds} s, expected {expected}"
    );
    let subject = cert.subject().to_string();
    assert!(
        !subject.contains("CN="),
        "subject copied from the request: {subject}"
    );
}

/// A Kubernetes service-account issuer as the API server is one: an ES256 key (key id `kid`),
/// its JWKS, its URL; it signs tokens as the kubelet asks for them.
pub struct TestIssuer {
    pub url: String,
    pub kid: String,
    key: rcgen::KeyPair,
}

impl TestIssuer {
    pub fn new(kid: &str) -> Self {
        Self {
            url: "https://kubernetes.default.svc.cluster.local".into(),
            kid: kid.into(),
            key: rcgen::KeyPair::generate().unwrap(),
        }
    }

    fn encoding(key: &rcgen::KeyPair) -> jsonwebtoken::EncodingKey {
        jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der())
    }

    /// The issuer's public keys, as `kubectl get --raw /openid/v1/jwks` prints them.
    pub fn jwks(&self) -> String {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
            &Self::encoding(&self.key),
            jsonwebtoken::Algorithm::ES256,
        )
        .unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        serde_json::json!({"keys": [jwk]}).to_string()
    }

    /// The claims of a projected token for `pod` of service account `namespace/account`, for
    /// `audience`, valid for `seconds` from now.
    pub fn claims(
        &self,
        namespace: &str,
        account: &str,
        pod: &str,
        audience: &str,
        seconds: u64,
    ) -> serde_json::Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        serde_json::json!({
            "aud": [audience], "iss": self.url, "iat": now, "nbf": now, "exp": now + seconds,
            "sub": format!("system:serviceaccount:{namespace}:{account}"),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod, "uid": "7c4e0b1a"},
                "serviceaccount": {"name": account, "uid": "1f2e3d4c"},
            },
        })
    }

    /// `claims` signed with ES256 by `key` (the issuer's when `None`) under key id `kid`.
    pub fn sign(
        &self,
        claims: &serde_json::Value,
        key: Option<&rcgen::KeyPair>,
        kid: &str,
    ) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &Self::encoding(key.unwrap_or(&self.key))).unwrap()
    }

    /// A projected token, signed by the issuer.
    pub fn token(
        &self,
        namespace: &str,
        account: &str,
        pod: &str,
        audience: &str,
        seconds: u64,
    ) -> String {
        self.sign(
            &self.claims(namespace, account, pod, audience, seconds),
            None,
            &self.kid,
        )
    }
}

/// A Kubernetes API server as far as TokenReview goes (`POST
/// /apis/authentication.k8s.io/v1/tokenreviews`): Python's HTTPS server on loopback, with a
/// certificate for 127.0.0.1 from a CA of its own (`ca_file`), answering for the tokens
/// [`ReviewServer::allow`] lists that they authenticate their service account and pod, and for
/// any other that it is not valid (as for a deleted pod's token). Stopped when dropped.
pub struct ReviewServer {
    child: std::process::Child,
    /// Its base URL (`tokenReviewUrl`).
    pub url: String,
    /// Its CA certificate (`caFile`).
    pub ca_file: PathBuf,
    reviews: PathBuf,
}

const REVIEW_SERVER: &str = r#"
import http.server, json, ssl, sys
port, cert, key, reviews = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(reviews) as f:
            known = json.load(f)
        status = known.get(body["spec"]["token"], {"authenticated": False, "error": "[invalid bearer token, pod not found]"})
        out = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"#;

impl ReviewServer {
    /// Starts one with its files in `dir`.
    pub fn start(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca_params.clone().self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        let leaf = params.signed_by(&key, &issuer).unwrap().pem();
        let (ca_file, cert, key_file, reviews) = (
            dir.join("review-ca.pem"),
            dir.join("review.pem"),
            dir.join("review.key"),
            dir.join("reviews.json"),
        );
        std::fs::write(&ca_file, ca_pem).unwrap();
        std::fs::write(&cert, leaf).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::write(&reviews, "{}").unwrap();
        let port = free_port();
        let mut child = std::process::Command::new("python3")
            .args(["-c", REVIEW_SERVER, &port.to_string()])
            .args([&cert, &key_file, &reviews])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        // It says "ready" once it listens (or ends, and the line is empty).
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            use std::io::BufRead;
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        }
        assert_eq!(line.trim(), "ready", "the review server did not start");
        Self {
            child,
            url: format!("https://127.0.0.1:{port}"),
            ca_file,
            reviews,
        }
    }

    /// From now on `token` is valid, for pod `pod` of service account `namespace/account`.
    pub fn allow(&self, token: &str, namespace: &str, account: &str, pod: &str) {
        let mut known: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.reviews).unwrap()).unwrap();
        known[token] = serde_json::json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{namespace}:{account}"),
                "extra": {"authentication.kubernetes.io/pod-name": [pod]},
            },
        });
        std::fs::write(&self.reviews, known.to_string()).unwrap();
    }
}

impl Drop for ReviewServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
