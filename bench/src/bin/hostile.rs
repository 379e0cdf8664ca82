//! The hostile-load suite (issue 18): a sidecar, and the control plane, under attack keep
//! serving their allowed clients.
//!
//! For the sidecar attacks it starts two real `sidewall proxy` processes (A, the client side,
//! with a route to B; B, the server side, with the default limits and an echo app), keeps an
//! allowed client calling through A at a fixed rate (a new connection per call: 32 bytes there
//! and back), and runs each attack below against B's inbound port from other loopback addresses
//! (127.0.0.2 and up). For every attack it reports the allowed client's success rate and p99
//! before (quiet) and during the attack, the attacked process's peak RSS, and how long after the
//! attack the client was back to quiet latency (recovery).
//!
//! | attack | what it does |
//! |---|---|
//! | `idle-tcp` | opens TCP connections at 1,000/s and sends nothing |
//! | `tls-no-cert` | TLS handshakes as fast as 64 loops can, without a client certificate |
//! | `tls-denied` | the same with a valid certificate of an identity no policy allows, then the port header |
//! | `slow-hello` | 5,000 connections each sending a ClientHello one byte per second |
//! | `slow-header` | 1,000 TLS connections with a valid certificate sending the port header one byte per second |
//! | `h2-rapid-reset` | an allowed peer on B's HTTP port opening and cancelling streams in bursts (CVE-2023-44487), 16 connections |
//! | `h2-continuation` | the same peer sending one request's headers as endless CONTINUATION frames, 16 connections |
//! | `h2-ping-flood` | the same peer sending PINGs in bursts of 1,000, 16 connections, each replaced when closed |
//! | `h2-settings-flood` | the same peer sending SETTINGS (a new initial window each time) in bursts of 1,000, 16 connections |
//! | `h2-hpack-bomb` | the same peer putting a 4 KiB header in the HPACK table and referring to it 12,000 times per request (48 MiB of headers from 16 KiB), 16 connections |
//! | `cp-idle-tls` | 20,000 TLS connections to the control plane's API without a client certificate, then silence |
//! | `cp-csr-flood` | certificate requests with made-up join tokens, as fast as 16 loops can |
//! | `cp-watch-loop` | a valid workload opening snapshot watches and registrations under new instance ids, 8 loops |
//! | `impact-denials` | 100,000 denied HTTP requests, each to a path of its own, from one peer to a sidecar of the control plane, while an operator asks `policy impact` about another peer's flow ten times a second |
//!
//! For the control-plane attacks the allowed client is a workload acknowledging a snapshot on a
//! new mTLS connection each time (as sidecars do), 50 times a second, and the RSS is the control
//! plane's.
//!
//! The attacks run on a runtime and thread of their own, apart from the allowed client and the
//! echo app (as another machine would); all of it shares the machine's cores with A and B.
//!
//! Nothing is asserted: the figures are printed (Markdown) and written as JSON with `--out`.
//! Every attack's traffic goes to loopback only, bounded in count and time.
//!
//! `cargo run --release -p sidewall-bench --bin hostile -- [--quick] [--only ATTACK] [--out DIR]`

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use serde::Serialize;
use sidewall_bench::host::free_port;
use sidewall_bench::pki::{Leaf, Pki, seed_state_dir, spiffe_id};
use sidewall_control_plane::client::{Client, key_and_csr};
use sidewall_policies::TrustDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Flags of the hostile-load suite.
#[derive(Parser)]
#[command(
    about = "Attack a sidecar on loopback while an allowed client keeps calling; report what it sees"
)]
struct Args {
    /// Short phases and small attacks (CI): checks the suite runs, not the figures.
    #[arg(long)]
    quick: bool,
    /// Run only these attacks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write `hostile.json` here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The allowed client's calls per second through the sidecars.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// The allowed workload's calls per second to the control plane (a new mTLS connection
    /// each, as a sidecar's acks and renewals).
    #[arg(long, default_value_t = 50)]
    cp_rate: u32,
    /// The `sidewall` binary (default: next to this one).
    #[arg(long)]
    sidewall: Option<PathBuf>,
}

/// Attacks on a sidecar's inbound port.
const SIDECAR_ATTACKS: [&str; 10] = [
    "idle-tcp",
    "tls-no-cert",
    "tls-denied",
    "slow-hello",
    "slow-header",
    "h2-rapid-reset",
    "h2-continuation",
    "h2-ping-flood",
    "h2-settings-flood",
    "h2-hpack-bomb",
];

/// Attacks on the control plane's API.
const CONTROL_PLANE_ATTACKS: [&str; 3] = ["cp-idle-tls", "cp-csr-flood", "cp-watch-loop"];

/// Denied requests from one peer while an operator asks `policy impact` about another: the
/// control plane's flow table under poisoning (see [`impact_under_denials`]).
const IMPACT_ATTACK: &str = "impact-denials";

/// The service port B serves.
const PORT: u16 = 8080;
/// B's HTTP port (the same app), which the HTTP/2 attacks use as an allowed peer.
const HTTP_PORT: u16 = 8081;

/// How long each phase lasts and how big each attack is.
#[derive(Clone, Copy)]
struct Scale {
    quiet: Duration,
    attack: Duration,
    after: Duration,
    idle_connections: usize,
    cp_idle_connections: usize,
    flood_loops: usize,
    slow_hello: usize,
    slow_header: usize,
    handshake_timeout: Duration,
}

impl Scale {
    fn of(quick: bool) -> Self {
        if quick {
            Self {
                quiet: Duration::from_secs(2),
                attack: Duration::from_secs(3),
                after: Duration::from_secs(2),
                idle_connections: 300,
                cp_idle_connections: 300,
                flood_loops: 8,
                slow_hello: 300,
                slow_header: 100,
                handshake_timeout: Duration::from_secs(2),
            }
        } else {
            Self {
                quiet: Duration::from_secs(5),
                attack: Duration::from_secs(15),
                after: Duration::from_secs(5),
                idle_connections: 5_000,
                cp_idle_connections: 20_000,
                flood_loops: 64,
                slow_hello: 5_000,
                slow_header: 1_000,
                handshake_timeout: Duration::from_secs(10),
            }
        }
    }
}

/// What the allowed client saw in one phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Calls {
    ok: u64,
    failed: u64,
    p50_us: u64,
    p99_us: u64,
}

impl Calls {
    fn success(&self) -> f64 {
        let all = self.ok + self.failed;
        if all == 0 {
            0.0
        } else {
            self.ok as f64 * 100.0 / all as f64
        }
    }
}

/// One attack's figures.
#[derive(Debug, Serialize)]
struct Outcome {
    attack: String,
    quiet: Calls,
    during: Calls,
    after: Calls,
    /// B's largest RSS during the attack, KiB (and before it).
    rss_quiet_kib: u64,
    rss_peak_kib: u64,
    /// From the end of the attack to ten calls in a row at quiet latency, ms.
    recovery_ms: Option<u64>,
    /// What the attacker managed: attempts, and how many of them the sidecar closed or
    /// refused.
    attempts: u64,
    closed_by_sidecar: u64,
}

/// The processes and addresses of one run.
struct Mesh {
    children: Vec<Child>,
    b_pid: u32,
    b_inbound: SocketAddr,
    route: SocketAddr,
    intruder: Leaf,
    /// A's certificate again: the HTTP/2 attacks come from an allowed (compromised) peer.
    allowed: Leaf,
    dir: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rss_kib(pid: u32) -> u64 {
    sidewall_bench::host::rss_kib(pid).unwrap_or(0)
}

fn sidewall_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let next = exe.with_file_name("sidewall");
    if next.is_file() {
        return Ok(next);
    }
    bail!(
        "no sidewall binary at {}: build it (`cargo build --release --bin sidewall`) or give --sidewall",
        next.display()
    )
}

/// An echo app on loopback.
async fn echo_app() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    Ok(address)
}

/// Starts B (server, default limits but `handshakeTimeout`) and A (client, a route to B).
async fn start(binary: &Path, scale: Scale) -> anyhow::Result<Mesh> {
    let dir = std::env::temp_dir().join(format!("sidewall-hostile-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs"))?;
    let pki = Pki::generate()?;
    let app = echo_app().await?;
    let [route, a_inbound, a_admin, b_inbound, b_admin] = [
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    ];
    let (a, b) = (spiffe_id("a"), spiffe_id("b"));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join("allow.yaml"),
        format!(
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata:\n  name: a-to-b\nspec:\n  \
             target: {b}\n  rules:\n    - action: allow\n      from: [{a}]\n      ports: [{PORT}, {HTTP_PORT}]\n"
        ),
    )?;
    for name in ["a", "b"] {
        seed_state_dir(
            &dir.join(format!("state-{name}")),
            &pki.svid(name)?,
            pki.root_pem(),
        )?;
    }
    let handshake = format!("{}s", scale.handshake_timeout.as_secs());
    let common = |name: &str, admin: u16| {
        format!(
            "identity: {id}\ncontrolPlane:\n  urls: [https://127.0.0.1:1]\n\
             stateDir: {dir}/state-{name}\nadmin:\n  listen: 127.0.0.1:{admin}\n\
             workerThreads: 1\nlimits: {{handshakeTimeout: {handshake}}}\n",
            id = spiffe_id(name),
            dir = dir.display(),
        )
    };
    let config_b = format!(
        "{}inbound:\n  listen: 127.0.0.1:{b_inbound}\n  ports:\n    \
         - {{port: {PORT}, protocol: tcp, app: {app}}}\n    \
         - {{port: {HTTP_PORT}, protocol: http, app: {app}}}\nlocal:\n  policies: [{policies}]\n",
        common("b", b_admin),
        policies = policies.display(),
    );
    let config_a = format!(
        "{}inbound:\n  listen: 127.0.0.1:{a_inbound}\noutbound:\n  routes:\n    \
         - {{listen: 127.0.0.1:{route}, service: {b}, port: {PORT}}}\n\
         local:\n  policies: [{policies}]\n  directory:\n    \
         - {{identity: {b}, endpoints: [127.0.0.1:{b_inbound}], ports: [{{port: {PORT}}}]}}\n",
        common("a", a_admin),
        policies = policies.display(),
    );
    let mut children = Vec::new();
    let mut b_pid = 0;
    for (name, config, admin) in [("b", config_b, b_admin), ("a", config_a, a_admin)] {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, config)?;
        let log = std::fs::File::create(dir.join("logs").join(format!("{name}.log")))?;
        let child = Command::new(binary)
            .arg("proxy")
            .arg("--config")
            .arg(&file)
            .env("SIDEWALL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        if name == "b" {
            b_pid = child.id();
        }
        children.push(child);
        wait_ready(admin).await?;
    }
    Ok(Mesh {
        children,
        b_pid,
        b_inbound: SocketAddr::from(([127, 0, 0, 1], b_inbound)),
        route: SocketAddr::from(([127, 0, 0, 1], route)),
        intruder: pki.svid("intruder")?,
        allowed: pki.svid("a")?,
        dir,
    })
}

async fn wait_ready(admin: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", admin)).await {
            let _ = stream
                .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            if answer.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("a sidecar was not ready within 20 s")
}

/// One allowed call: a new connection through A, 32 bytes there and back.
async fn call(route: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(route).await.ok()?;
        stream.write_all(&[7u8; 32]).await.ok()?;
        let mut answer = [0u8; 32];
        stream.read_exact(&mut answer).await.ok()?;
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .map(|()| started.elapsed())
}

/// One allowed call, made anew each time: its latency, or `None` when it failed.
type Call = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<Duration>> + Send>> + Send + Sync>;

/// The allowed client at `rate` calls per second for `length` (open loop: a late call does not
/// delay the next).
async fn calls(call: &Call, rate: u32, length: Duration) -> Calls {
    let mut tasks = tokio::task::JoinSet::new();
    let interval = Duration::from_secs(1) / rate.max(1);
    let started = Instant::now();
    let mut next = started;
    while next < started + length {
        tokio::time::sleep_until(next.into()).await;
        tasks.spawn(call());
        next += interval;
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    while let Some(result) = tasks.join_next().await {
        match result.ok().flatten() {
            Some(latency) => latencies.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)),
            None => failed += 1,
        }
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Calls {
        ok: latencies.len() as u64,
        failed,
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

/// Time until ten calls in a row succeed within `bound` each, polling for up to a minute.
async fn recovery(call: &Call, bound: Duration) -> Option<u64> {
    let started = Instant::now();
    let mut streak = 0;
    while started.elapsed() < Duration::from_secs(60) {
        match call().await {
            Some(latency) if latency <= bound => streak += 1,
            _ => streak = 0,
        }
        if streak >= 10 {
            return u64::try_from(started.elapsed().as_millis()).ok();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A connection from `127.0.0.(2 + n % 200)`, so that attacks come from many sources.
async fn connect_from(n: usize, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let last = u8::try_from(2 + n % 200).unwrap_or(2);
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
        0,
    ))?;
    socket.connect(target).await
}

/// Accepts any server certificate: an attacker does not care who it floods.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_client(certificate: Option<&Leaf>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    tls_client_with(certificate, b"sidewall-l4/1")
}

fn tls_client_with(
    certificate: Option<&Leaf>,
    alpn: &[u8],
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match certificate {
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// What an attack counts while it runs.
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    closed: AtomicU64,
}

/// Waits for the server to close `stream` (or for `stop`), counting a close.
async fn watch_close<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    stop: &AtomicBool,
    tally: &Tally,
) {
    let mut byte = [0u8; 1];
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(250), stream.read(&mut byte)).await
        {
            tally.closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Where an attack goes, and its TLS clients.
#[derive(Clone)]
struct Attacker {
    target: SocketAddr,
    without_certificate: tokio_rustls::TlsConnector,
    /// With the certificate of an identity no policy allows.
    denied: tokio_rustls::TlsConnector,
    /// With an allowed identity's certificate, ALPN `sidewall-h2/1`.
    allowed_h2: tokio_rustls::TlsConnector,
}

/// An HTTP/2 frame: 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// `GET /` for `sidewall`, HPACK: static `:method GET`, `:scheme https`, `:path /`, and
/// `:authority` as a literal with the static name.
const REQUEST_BLOCK: [u8; 13] = [
    0x82, 0x87, 0x84, 0x01, 0x08, b's', b'i', b'd', b'e', b'w', b'a', b'l', b'l',
];

/// One HTTP/2 abuse connection: TLS as an allowed peer, the port header for the HTTP port, the
/// preface, then `attack`'s frames over and over until B closes it or the attack stops.
/// Returns whether B closed it.
async fn h2_abuse(
    connector: &tokio_rustls::TlsConnector,
    n: usize,
    target: SocketAddr,
    attack: &str,
    stop: &AtomicBool,
) -> bool {
    let Ok(stream) = connect_from(n, target).await else {
        return false;
    };
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let Ok(mut tls) = connector.connect(name, stream).await else {
        return true;
    };
    let [high, low] = HTTP_PORT.to_be_bytes();
    let mut status = [0u8; 1];
    if tls.write_all(&[0x53, 0x57, 0x01, high, low]).await.is_err()
        || tls.read_exact(&mut status).await.is_err()
        || status[0] != 0
    {
        return true;
    }
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(4, 0, 0, &[]));
    if tls.write_all(&opening).await.is_err() {
        return true;
    }
    let (mut read, mut write) = tokio::io::split(tls);
    // Whatever B sends is read and dropped, so that only B's limits end the connection.
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let mut stream_id = 1u32;
    let mut burst = Vec::with_capacity(64 * 1024);
    let closed = loop {
        if stop.load(Ordering::Relaxed) {
            break false;
        }
        burst.clear();
        match attack {
            "h2-rapid-reset" => {
                // A request, then its cancellation, 100 times per write.
                for _ in 0..100 {
                    burst.extend(frame(1, 0x5, stream_id, &REQUEST_BLOCK));
                    burst.extend(frame(3, 0, stream_id, &8u32.to_be_bytes()));
                    stream_id = stream_id.wrapping_add(2);
                }
            }
            "h2-continuation" => {
                // One request's headers that never end: CONTINUATION frames of 1 KiB of
                // literal headers, 32 per write.
                if stream_id == 1 {
                    burst.extend(frame(1, 0x1, 1, &REQUEST_BLOCK));
                    stream_id = 3;
                }
                let mut block = Vec::with_capacity(1024);
                while block.len() < 1000 {
                    block.extend_from_slice(&[0x00, 0x01, b'x', 0x10]);
                    block.extend_from_slice(&[b'a'; 16]);
                }
                for _ in 0..32 {
                    burst.extend(frame(9, 0, 1, &block));
                }
            }
            "h2-settings-flood" => {
                // SETTINGS, each changing the initial stream window (every open stream's
                // window must be adjusted), 1,000 per write.
                for k in 0..1000u32 {
                    let mut setting = vec![0x00, 0x04];
                    setting.extend_from_slice(&(65_535 + (k % 2)).to_be_bytes());
                    burst.extend(frame(4, 0, 0, &setting));
                }
            }
            "h2-hpack-bomb" => {
                // The first request adds `x-bomb: <4,050 bytes>` to the HPACK dynamic table
                // (literal with incremental indexing, new name); every request then refers to
                // it (index 62, one byte) 12,000 times: 48 MiB of headers from 16 KiB.
                for _ in 0..16 {
                    let mut block = REQUEST_BLOCK.to_vec();
                    if stream_id == 1 {
                        block.extend_from_slice(&[0x40, 0x06]);
                        block.extend_from_slice(b"x-bomb");
                        // Value length 4,050: HPACK integer, 7-bit prefix (127 + 3,923).
                        block.extend_from_slice(&[0x7f, 0xd3, 0x1e]);
                        block.extend(std::iter::repeat_n(b'b', 4050));
                    }
                    block.extend(std::iter::repeat_n(0xbe, 12_000));
                    burst.extend(frame(1, 0x5, stream_id, &block));
                    stream_id = stream_id.wrapping_add(2);
                }
            }
            _ => {
                // PINGs, 1,000 per write, their answers never awaited.
                for k in 0..1000u64 {
                    burst.extend(frame(6, 0, 0, &k.to_be_bytes()));
                }
            }
        }
        if write.write_all(&burst).await.is_err() {
            break true;
        }
        tokio::task::yield_now().await;
    };
    drain.abort();
    closed
}

async fn attack(
    name: &str,
    attacker: Attacker,
    scale: Scale,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> anyhow::Result<()> {
    let target = attacker.target;
    let mut tasks = tokio::task::JoinSet::new();
    match name {
        "idle-tcp" => {
            // 1,000 new connections a second, each held silent until the attack ends.
            for n in 0..scale.idle_connections {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (stop, tally) = (stop.clone(), tally.clone());
                tasks.spawn(async move {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut stream) = connect_from(n, target).await {
                        watch_close(&mut stream, &stop, &tally).await;
                    }
                });
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        "tls-no-cert" | "tls-denied" => {
            let connector = if name == "tls-denied" {
                attacker.denied.clone()
            } else {
                attacker.without_certificate.clone()
            };
            for n in 0..scale.flood_loops {
                let (stop, tally, connector) = (stop.clone(), tally.clone(), connector.clone());
                tasks.spawn(async move {
                    let mut k = n;
                    while !stop.load(Ordering::Relaxed) {
                        tally.attempts.fetch_add(1, Ordering::Relaxed);
                        k += scale.flood_loops;
                        let Ok(stream) = connect_from(k, target).await else {
                            continue;
                        };
                        let name = ServerName::try_from("sidewall")
                            .unwrap_or_else(|_| ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()));
                        let handshake = tokio::time::timeout(
                            Duration::from_secs(5),
                            connector.connect(name, stream),
                        );
                        // Refused: the handshake fails (TLS 1.3 lets the client finish first,
                        // so without a certificate it fails at the first read), or the port
                        // header is answered with anything but `Allowed` (0).
                        let refused = match handshake.await {
                            Ok(Ok(mut tls)) => {
                                let _ = tls.write_all(&[0x53, 0x57, 0x01, 0x1f, 0x90]).await;
                                let mut status = [0u8; 1];
                                let read = tokio::time::timeout(
                                    Duration::from_secs(5),
                                    tls.read(&mut status),
                                )
                                .await;
                                !matches!(read, Ok(Ok(1)) if status[0] == 0)
                            }
                            _ => true,
                        };
                        if refused {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
        "slow-hello" => {
            // A TLS record header, then one byte of a ClientHello a second.
            for n in 0..scale.slow_hello {
                let (stop, tally) = (stop.clone(), tally.clone());
                tasks.spawn(async move {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut stream) = connect_from(n, target).await else {
                        return;
                    };
                    if stream
                        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
                        .await
                        .is_err()
                    {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if stream.write_all(&[0x01]).await.is_err() {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                });
                if n % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        "h2-rapid-reset" | "h2-continuation" | "h2-ping-flood" | "h2-settings-flood"
        | "h2-hpack-bomb" => {
            // 16 allowed-peer connections at a time, each replaced when B closes it.
            for n in 0..16 {
                let (stop, tally, connector) =
                    (stop.clone(), tally.clone(), attacker.allowed_h2.clone());
                let attack = name.to_owned();
                tasks.spawn(async move {
                    let mut k = n;
                    while !stop.load(Ordering::Relaxed) {
                        tally.attempts.fetch_add(1, Ordering::Relaxed);
                        if h2_abuse(&connector, k, target, &attack, &stop).await {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                        }
                        k += 16;
                    }
                });
            }
        }
        "slow-header" => {
            let connector = attacker.denied.clone();
            for n in 0..scale.slow_header {
                let (stop, tally, connector) = (stop.clone(), tally.clone(), connector.clone());
                tasks.spawn(async move {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let Ok(stream) = connect_from(n, target).await else {
                        return;
                    };
                    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
                    let Ok(mut tls) = connector.connect(name, stream).await else {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    for byte in [0x53, 0x57, 0x01, 0x1f] {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if tls.write_all(&[byte]).await.is_err() || tls.flush().await.is_err() {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    watch_close(&mut tls, &stop, &tally).await;
                });
                if n % 50 == 49 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        other => bail!("no sidecar attack {other:?}"),
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// What is attacked, and how the allowed client reaches it.
struct Target {
    /// The attacked process.
    pid: u32,
    /// The allowed client's call.
    call: Call,
    /// Its calls per second.
    rate: u32,
}

/// One attack: quiet, then the attack with the client measured and the target's RSS sampled,
/// then recovery and after.
async fn run_attack(
    name: &str,
    target: &Target,
    scale: Scale,
    start_attack: impl FnOnce(
        Arc<AtomicBool>,
        Arc<Tally>,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<Outcome> {
    let (call, rate) = (&target.call, target.rate);
    // What the attack before left (connections closing at their deadline) settles first.
    tokio::time::sleep(scale.handshake_timeout).await;
    let quiet = calls(call, rate, scale.quiet).await;
    let rss_quiet_kib = rss_kib(target.pid);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let running = start_attack(stop.clone(), tally.clone());
    // RSS sampled every 100 ms while the client measures.
    let peak = Arc::new(AtomicU64::new(rss_quiet_kib));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), target.pid);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = calls(call, rate, scale.attack).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let bound = Duration::from_micros(quiet.p99_us.max(1_000) * 2);
    let recovery_ms = recovery(call, bound).await;
    let attacked = running.await.context("the attack task")?;
    attacked?;
    let after = calls(call, rate, scale.after).await;
    Ok(Outcome {
        attack: name.to_owned(),
        quiet,
        during,
        after,
        rss_quiet_kib,
        rss_peak_kib: peak.load(Ordering::Relaxed),
        recovery_ms,
        attempts: tally.attempts.load(Ordering::Relaxed),
        closed_by_sidecar: tally.closed.load(Ordering::Relaxed),
    })
}

/// A control plane, an allowed workload and an attacking one (a valid identity no policy
/// concerns), each with a certificate the control plane issued.
struct ControlPlane {
    child: Child,
    api: SocketAddr,
    allowed: Client,
    intruder: Client,
    anonymous: Client,
    operator: Client,
    /// The certificates of `allowed` and `intruder`, for TLS to a sidecar.
    allowed_leaf: Leaf,
    intruder_leaf: Leaf,
    dir: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_control_plane(binary: &Path, scale: Scale) -> anyhow::Result<ControlPlane> {
    let dir = std::env::temp_dir().join(format!("sidewall-hostile-cp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("cp.yaml");
    std::fs::write(
        &config,
        format!(
            "limits:\n  requestTimeout: {}s\n",
            scale.handshake_timeout.as_secs()
        ),
    )?;
    let data = dir.join("data");
    let (mut command, api) = sidewall_bench::host::control_plane_command(binary, &data)?;
    let child = command
        .arg("--config")
        .arg(&config)
        .env("SIDEWALL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("cp.log"))?)
        .spawn()
        .context("starting the control plane")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("control-plane.json").exists() {
        if Instant::now() > deadline {
            bail!("the control plane did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("https://127.0.0.1:{api}");
    let operator = Client::operator(&data, "admin", Some(&url))?;
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&std::fs::read(data.join("trust-bundle.pem"))?)
            .collect::<Result<_, _>>()?;
    let td = TrustDomain::default();
    let anonymous = Client::new(&url, &td, roots.clone(), None)?;
    let mut enrolled = Vec::new();
    for name in ["allowed", "intruder"] {
        let token = join_token(
            &operator,
            &format!("spiffe://sidewall.local/ns/hostile/svc/{name}"),
        )
        .await?;
        let (key, csr) = key_and_csr()?;
        let (status, body) = anonymous
            .call(
                hyper::Method::POST,
                "/v1/certificates",
                Some(&serde_json::json!({"csr": csr, "token": token})),
            )
            .await?;
        if !status.is_success() {
            bail!("certificate for {name}: {status} {body}");
        }
        let chain = CertificateDer::pem_slice_iter(
            body["certificate_chain"]
                .as_str()
                .unwrap_or_default()
                .as_bytes(),
        )
        .collect::<Result<Vec<_>, _>>()?;
        let leaf = Leaf {
            leaf_pem: String::new(),
            chain_pem: body["certificate_chain"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            key_pem: key.serialize_pem(),
        };
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
        enrolled.push((
            Client::new(&url, &td, roots.clone(), Some((chain, key)))?,
            leaf,
        ));
    }
    let (intruder, intruder_leaf) = enrolled.pop().context("two workloads")?;
    let (allowed, allowed_leaf) = enrolled.pop().context("two workloads")?;
    Ok(ControlPlane {
        child,
        api: SocketAddr::from(([127, 0, 0, 1], api)),
        allowed,
        intruder,
        anonymous,
        operator,
        allowed_leaf,
        intruder_leaf,
        dir,
    })
}

/// The allowed workload's call: an ack, on a new mTLS connection.
fn ack_call(client: Client) -> Call {
    Arc::new(move || {
        let client = client.clone();
        Box::pin(async move {
            let started = Instant::now();
            let body = serde_json::json!({"instance": "allowed-1", "version": {"epoch": "e", "counter": 1}, "status": "applied"});
            match client
                .call(hyper::Method::POST, "/v1/acks", Some(&body))
                .await
            {
                Ok((status, _)) if status.is_success() => Some(started.elapsed()),
                _ => None,
            }
        })
    })
}

/// A join token for `identity` (an hour), made by the operator.
async fn join_token(operator: &Client, identity: &str) -> anyhow::Result<String> {
    let (status, body) = operator
        .call(
            hyper::Method::POST,
            "/v1/tokens",
            Some(&serde_json::json!({"identity": identity, "ttl_seconds": 3600})),
        )
        .await?;
    match body["token"].as_str() {
        Some(token) if status.is_success() => Ok(token.to_owned()),
        _ => bail!("token for {identity}: {status} {body}"),
    }
}

/// B's HTTP port in the impact attack.
const IMPACT_PORT: u16 = 8081;

/// The flow-table attack: sidecar B, joined to the control plane, serves an HTTP port; the
/// allowed workload makes one request to it, which B reports as a flow. Then the intruder (a
/// valid identity allowed `/health` only) sends 100,000 denied requests to B, each to a path of its
/// own (pipelined, 16 connections), while an operator asks `policy impact` ten times a second
/// what a candidate denying the allowed workload would flip. An answer counts as a success when
/// it still lists the allowed workload's flow; the RSS is the control plane's.
async fn impact_under_denials(
    binary: &Path,
    cp: &ControlPlane,
    scale: Scale,
    quick: bool,
    attackers: &tokio::runtime::Handle,
) -> anyhow::Result<Outcome> {
    let b = "spiffe://sidewall.local/ns/hostile/svc/b";
    let allowed = "spiffe://sidewall.local/ns/hostile/svc/allowed";
    let intruder = "spiffe://sidewall.local/ns/hostile/svc/intruder";
    // The intruder may reach `/health` only: its connections are admitted, and every other
    // request on them is denied one by one (a peer no rule mentions is refused per connection).
    let policy = |from: &str| {
        serde_json::json!({"files": [{"name": "b.yaml", "text": format!(
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: b}}\nspec:\n  target: {b}\n  rules:\n    - action: allow\n      from: [{from}]\n      ports: [{IMPACT_PORT}]\n      http: {{paths: [\"/**\"]}}\n    - action: allow\n      from: [{intruder}]\n      ports: [{IMPACT_PORT}]\n      http: {{paths: [/health]}}\n"
        )}]})
    };
    let (status, body) = cp
        .operator
        .call(hyper::Method::POST, "/v1/policies", Some(&policy(allowed)))
        .await?;
    if !status.is_success() {
        bail!("applying B's policy: {status} {body}");
    }
    std::fs::write(cp.dir.join("b.token"), join_token(&cp.operator, b).await?)?;
    let app = echo_app().await?;
    let (inbound, admin) = (free_port()?, free_port()?);
    let config = cp.dir.join("b.yaml");
    std::fs::write(
        &config,
        format!(
            "identity: {b}\ncontrolPlane:\n  urls: [https://{api}]\n  tokenFile: {dir}/b.token\n\
             stateDir: {dir}/state-b\ninbound:\n  listen: 127.0.0.1:{inbound}\n  ports:\n    \
             - {{port: {IMPACT_PORT}, protocol: http, app: {app}}}\nadmin:\n  listen: 127.0.0.1:{admin}\n\
             workerThreads: 1\n",
            api = cp.api,
            dir = cp.dir.display(),
        ),
    )?;
    let mut child = Command::new(binary)
        .arg("proxy")
        .arg("--config")
        .arg(&config)
        .env("SIDEWALL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cp.dir.join("b.log"))?)
        .spawn()
        .context("starting sidecar B")?;
    let outcome = async {
        wait_ready(admin).await?;
        let target = SocketAddr::from(([127, 0, 0, 1], inbound));
        let allowed_tls = tls_client_with(Some(&cp.allowed_leaf), b"sidewall-l4/1")?;
        let intruder_tls = tls_client_with(Some(&cp.intruder_leaf), b"sidewall-l4/1")?;
        // The allowed flow, reported by B within its report interval (5 s).
        let mut stream = http_to(&allowed_tls, 0, target).await?;
        stream
            .write_all(b"GET /orders/1 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            .await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
        let call = impact_call(
            cp.operator.clone(),
            policy("spiffe://sidewall.local/ns/hostile/svc/nobody"),
            allowed,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while call().await.is_none() {
            if Instant::now() > deadline {
                bail!("the allowed flow never reached `policy impact`");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let requests: u64 = if quick { 5_000 } else { 100_000 };
        let target_calls = Target {
            pid: cp.child.id(),
            call,
            rate: 10,
        };
        let outcome = run_attack(IMPACT_ATTACK, &target_calls, scale, |stop, tally| {
            attackers.spawn(async move {
                denied_requests(intruder_tls, target, requests, stop, tally).await;
                Ok(())
            })
        })
        .await?;
        // What the flood left in the flow table: the intruder's flows kept, and those dropped.
        let (_, flows) = cp.operator.call(hyper::Method::GET, "/v1/flows", None).await?;
        let theirs: Vec<_> = flows["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["flow"]["peer"] == intruder)
            .collect();
        let denied: u64 = theirs.iter().filter_map(|f| f["stats"]["deny"].as_u64()).sum();
        let (_, answer) = cp
            .operator
            .call(
                hyper::Method::POST,
                "/v1/policies/impact",
                Some(&policy("spiffe://sidewall.local/ns/hostile/svc/nobody")),
            )
            .await?;
        let decided = denials(admin).await;
        eprintln!(
            "hostile: {IMPACT_ATTACK}: B denied {decided} requests; the control plane holds {} of the intruder's flows ({denied} denials counted); dropped: {}",
            theirs.len(),
            answer["flows_dropped"]
        );
        anyhow::Ok(outcome)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// The HTTP requests a sidecar denied (`sidewall_proxy_http_denials_total`), from its admin
/// listener.
async fn denials(admin: u16) -> u64 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", admin)).await else {
        return 0;
    };
    let _ = stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text.lines()
        .filter(|l| l.starts_with("sidewall_proxy_http_denials_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// TLS to a sidecar as a peer, with the port header for [`IMPACT_PORT`] answered `Allowed`.
async fn http_to(
    connector: &tokio_rustls::TlsConnector,
    n: usize,
    target: SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = connect_from(n, target).await?;
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut tls = connector.connect(name, stream).await?;
    let [high, low] = IMPACT_PORT.to_be_bytes();
    tls.write_all(&[0x53, 0x57, 0x01, high, low]).await?;
    let mut status = [0u8; 1];
    tls.read_exact(&mut status).await?;
    if status[0] != 0 {
        bail!("port header answered {}", status[0]);
    }
    Ok(tls)
}

/// `requests` denied requests, each to a path of its own, pipelined 100 at a time on 16
/// connections (a connection B closes is replaced); answers are read and dropped.
async fn denied_requests(
    connector: tokio_rustls::TlsConnector,
    target: SocketAddr,
    requests: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..16usize {
        let (connector, stop, tally) = (connector.clone(), stop.clone(), tally.clone());
        tasks.spawn(async move {
            let mut k = n;
            while !stop.load(Ordering::Relaxed) && tally.attempts.load(Ordering::Relaxed) < requests
            {
                k += 16;
                let Ok(tls) = http_to(&connector, k, target).await else {
                    continue;
                };
                let (mut read, mut write) = tokio::io::split(tls);
                let drain = tokio::spawn(async move {
                    let mut sink = vec![0u8; 64 * 1024];
                    while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
                });
                let mut burst = Vec::with_capacity(100 * 64);
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let first = tally.attempts.fetch_add(100, Ordering::Relaxed);
                    if first >= requests {
                        break;
                    }
                    burst.clear();
                    for i in first..first + 100 {
                        burst.extend_from_slice(
                            format!("GET /p{i}/x HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes(),
                        );
                    }
                    if write.write_all(&burst).await.is_err() {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = write.shutdown().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// `policy impact` of `candidate` as the operator: its latency when the answer still lists
/// `peer`'s flow among the flips.
fn impact_call(operator: Client, candidate: serde_json::Value, peer: &str) -> Call {
    let peer = peer.to_owned();
    Arc::new(move || {
        let (operator, candidate, peer) = (operator.clone(), candidate.clone(), peer.clone());
        Box::pin(async move {
            let started = Instant::now();
            match operator
                .call(hyper::Method::POST, "/v1/policies/impact", Some(&candidate))
                .await
            {
                Ok((status, body))
                    if status.is_success()
                        && body["flips"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|f| f["peer"] == peer.as_str())) =>
                {
                    Some(started.elapsed())
                }
                _ => None,
            }
        })
    })
}

async fn control_plane_attack(
    name: &str,
    cp: (SocketAddr, Client, Client),
    scale: Scale,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> anyhow::Result<()> {
    let (target, anonymous, intruder) = cp;
    let mut tasks = tokio::task::JoinSet::new();
    match name {
        "cp-idle-tls" => {
            // TLS without a client certificate, then silence, on up to 20,000 connections.
            let connector = tls_client(None)?;
            for n in 0..scale.cp_idle_connections {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (stop, tally, connector) = (stop.clone(), tally.clone(), connector.clone());
                tasks.spawn(async move {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let Ok(stream) = connect_from(n, target).await else {
                        return;
                    };
                    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
                    match connector.connect(name, stream).await {
                        Ok(mut tls) => watch_close(&mut tls, &stop, &tally).await,
                        Err(_) => {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                if n % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        "cp-csr-flood" => {
            // Certificate requests with made-up tokens, as fast as 16 loops can.
            for _ in 0..16 {
                let (stop, tally, anonymous) = (stop.clone(), tally.clone(), anonymous.clone());
                tasks.spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        tally.attempts.fetch_add(1, Ordering::Relaxed);
                        let Ok((_, csr)) = key_and_csr() else {
                            continue;
                        };
                        let body = serde_json::json!({"csr": csr, "token": "swt_madeupmadeupmadeupmadeup"});
                        let answer = anonymous
                            .call(hyper::Method::POST, "/v1/certificates", Some(&body))
                            .await;
                        if !matches!(answer, Ok((status, _)) if status.is_success()) {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
        "cp-watch-loop" => {
            // A valid workload opening watches and registrations under new instance ids.
            for loop_number in 0..8u32 {
                let (stop, tally, intruder) = (stop.clone(), tally.clone(), intruder.clone());
                tasks.spawn(async move {
                    let mut k = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        tally.attempts.fetch_add(1, Ordering::Relaxed);
                        let instance = format!("x{loop_number}-{k}");
                        let answer = if k.is_multiple_of(2) {
                            let port = 10_000 + (loop_number * 5_000 + k) % 50_000;
                            let body = serde_json::json!({"instance": instance, "endpoint": format!("127.0.0.1:{port}"), "ports": [{"port": 80}]});
                            intruder
                                .call(hyper::Method::POST, "/v1/registrations", Some(&body))
                                .await
                                .map(|(status, _)| status)
                        } else {
                            // The watch's first line comes at once; the stream is then left.
                            let path = format!("/v1/snapshots/watch?instance={instance}");
                            match tokio::time::timeout(
                                Duration::from_millis(300),
                                intruder.call(hyper::Method::GET, &path, None),
                            )
                            .await
                            {
                                Ok(result) => result.map(|(status, _)| status),
                                Err(_) => Ok(hyper::StatusCode::OK),
                            }
                        };
                        if !matches!(answer, Ok(status) if status.is_success()) {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
        other => bail!("no control-plane attack {other:?}"),
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One table of outcomes, under `heading` (who is attacked, and the allowed client).
fn report(heading: &str, outcomes: &[Outcome], scale: Scale) -> String {
    let mut text = format!(
        "{heading} Phases: quiet {} s, attack {} s, after {} s; handshake or request deadline {} s.\n\n\
         | attack | quiet p99 | during: success | during: p99 (× quiet) | after: success | recovery | RSS quiet → peak | attacker's attempts | closed or refused |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        scale.quiet.as_secs(),
        scale.attack.as_secs(),
        scale.after.as_secs(),
        scale.handshake_timeout.as_secs(),
    );
    for o in outcomes {
        let ratio = o.during.p99_us as f64 / o.quiet.p99_us.max(1) as f64;
        text.push_str(&format!(
            "| {} | {:.2} ms | {:.2} % ({} of {}) | {:.2} ms (×{ratio:.1}) | {:.2} % | {} | {:.1} → {:.1} MiB | {} ({:.0}/s) | {} |\n",
            o.attack,
            o.quiet.p99_us as f64 / 1000.0,
            o.during.success(),
            o.during.ok,
            o.during.ok + o.during.failed,
            o.during.p99_us as f64 / 1000.0,
            o.after.success(),
            o.recovery_ms
                .map_or("not within 60 s".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
            o.rss_quiet_kib as f64 / 1024.0,
            o.rss_peak_kib as f64 / 1024.0,
            o.attempts,
            o.attempts as f64 / (scale.attack.as_secs_f64() + 1.0),
            o.closed_by_sidecar,
        ));
    }
    text
}

fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = hard.max(65_536);
        if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let known = || {
        SIDECAR_ATTACKS
            .iter()
            .chain(&CONTROL_PLANE_ATTACKS)
            .chain(&[IMPACT_ATTACK])
    };
    for name in &args.only {
        if !known().any(|a| a == name) {
            bail!(
                "--only {name}: no such attack (the attacks are {})",
                known().copied().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let chosen = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let binary = sidewall_binary(args.sidewall.clone())?;
    raise_file_limit();
    let scale = Scale::of(args.quick);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The attacks run on a runtime (and thread) of their own: an attacker is another machine,
    // and its client-side work must not queue the allowed client's calls or the echo app.
    let attacker_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hostile-attacker")
        .enable_all()
        .build()?;
    let attackers = attacker_runtime.handle().clone();
    let (sidecar, control_plane, impact) = runtime.block_on(async {
        let mut sidecar = Vec::new();
        if SIDECAR_ATTACKS.iter().any(|a| chosen(a)) {
            let mesh = start(&binary, scale).await?;
            let route = mesh.route;
            let target = Target {
                pid: mesh.b_pid,
                call: Arc::new(move || Box::pin(call(route))),
                rate: args.rate,
            };
            for name in SIDECAR_ATTACKS.into_iter().filter(|a| chosen(a)) {
                eprintln!("hostile: {name}…");
                let attacker = Attacker {
                    target: mesh.b_inbound,
                    without_certificate: tls_client(None)?,
                    denied: tls_client(Some(&mesh.intruder))?,
                    allowed_h2: tls_client_with(Some(&mesh.allowed), b"sidewall-h2/1")?,
                };
                let outcome = run_attack(name, &target, scale, |stop, tally| {
                    attackers.spawn(async move { attack(name, attacker, scale, stop, tally).await })
                })
                .await?;
                eprintln!(
                    "hostile: {name}: {:.2} % of allowed calls succeeded during the attack",
                    outcome.during.success()
                );
                sidecar.push(outcome);
            }
        }
        let mut control_plane = Vec::new();
        let mut impact = Vec::new();
        if CONTROL_PLANE_ATTACKS.iter().any(|a| chosen(a)) || chosen(IMPACT_ATTACK) {
            let cp = start_control_plane(&binary, scale).await?;
            let target = Target {
                pid: cp.child.id(),
                call: ack_call(cp.allowed.clone()),
                rate: args.cp_rate,
            };
            for name in CONTROL_PLANE_ATTACKS.into_iter().filter(|a| chosen(a)) {
                eprintln!("hostile: {name}…");
                let parts = (cp.api, cp.anonymous.clone(), cp.intruder.clone());
                let outcome = run_attack(name, &target, scale, |stop, tally| {
                    attackers.spawn(async move {
                        control_plane_attack(name, parts, scale, stop, tally).await
                    })
                })
                .await?;
                eprintln!(
                    "hostile: {name}: {:.2} % of allowed calls succeeded during the attack",
                    outcome.during.success()
                );
                control_plane.push(outcome);
            }
            if chosen(IMPACT_ATTACK) {
                eprintln!("hostile: {IMPACT_ATTACK}…");
                let outcome =
                    impact_under_denials(&binary, &cp, scale, args.quick, &attackers).await?;
                eprintln!(
                    "hostile: {IMPACT_ATTACK}: {:.2} % of impact answers listed the allowed flow during the attack",
                    outcome.during.success()
                );
                impact.push(outcome);
            }
        }
        anyhow::Ok((sidecar, control_plane, impact))
    })?;
    let mut text = String::new();
    if !sidecar.is_empty() {
        text.push_str(&report(
            &format!(
                "Sidecar B under attack; allowed client: {} calls/s through A to B, a new app connection each.",
                args.rate
            ),
            &sidecar,
            scale,
        ));
    }
    if !control_plane.is_empty() {
        text.push_str(&report(
            &format!(
                "\nControl plane under attack; allowed workload: {} acks/s, a new mTLS connection each.",
                args.cp_rate
            ),
            &control_plane,
            scale,
        ));
    }
    if !impact.is_empty() {
        text.push_str(&report(
            "\nThe control plane's flow table under poisoning; allowed client: an operator's `policy impact`, 10 a second, a success when the answer lists the allowed peer's flow.",
            &impact,
            scale,
        ));
    }
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        let json = serde_json::json!({"sidecar": sidecar, "control_plane": control_plane, "impact": impact});
        std::fs::write(out.join("hostile.json"), serde_json::to_vec_pretty(&json)?)?;
        std::fs::write(out.join("hostile.md"), &text)?;
    }
    Ok(())
}
