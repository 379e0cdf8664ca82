//! The fleet simulator: many lightweight sidecars in one process against a real control plane
//! (`sidewall control-plane`), each with a certificate the control plane issued, a real TLS +
//! HTTP/2 snapshot watch, and acks. It measures what the distribution issue asks:
//! issuance rate, control-plane memory with N proxies connected, and the time from
//! `policy apply` to each proxy's new snapshot (p50, p99) and to the last ack.
//!
//! With `--etcd`, it starts a 3-member etcd cluster on loopback and `--replicas` control planes
//! over it (`--store etcd://…`), and spreads the simulated sidecars (issuance and watches) over
//! the replicas round-robin; a policy is applied through the first replica and the last ack is
//! when every replica reports its own sidecars done.
//!
//! `cargo run --release -p sidewall-bench --bin fleet -- --proxies 1000 [--etcd --replicas 3]`

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use sidewall_control_plane::client::{Client, key_and_csr};
use sidewall_policies::TrustDomain;
use tokio::sync::{Semaphore, mpsc};

/// Flags of the fleet simulator.
#[derive(Parser)]
#[command(about = "Simulate N sidecars against a real control plane and measure it")]
struct Args {
    /// How many simulated sidecars.
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Concurrent enrollments.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How many policy applies to time.
    #[arg(long, default_value_t = 3)]
    applies: usize,
    /// The `sidewall` binary (default: next to this one).
    #[arg(long)]
    sidewall: Option<PathBuf>,
    /// Run the replicas over a 3-member etcd cluster on loopback (needs `etcd`).
    #[arg(long)]
    etcd: bool,
    /// Control-plane replicas (with `--etcd`; the embedded store serves one).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
}

/// Stops the control plane on drop.
struct ControlPlane(Child);

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    sidewall_bench::host::rss_kib(pid).unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn raise_file_limit(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_file_limit((args.proxies as u64) * 3 + 1024);
    let sidewall = match args.sidewall.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("sidewall"),
    };
    if !sidewall.exists() {
        bail!(
            "{} not found: build it (cargo build --release --bin sidewall) or pass --sidewall",
            sidewall.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("sidewall-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &sidewall, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Starts one control plane in `data` with `extra` flags; returns it, its pid and API port.
async fn start_control_plane(
    sidewall: &Path,
    data: &Path,
    log: &Path,
    extra: &[String],
) -> anyhow::Result<(ControlPlane, u32, u16)> {
    let (mut command, api) = sidewall_bench::host::control_plane_command(sidewall, data)?;
    let child = command
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting the control plane")?;
    let pid = child.id();
    let cp = ControlPlane(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("control-plane.json").exists() {
        if Instant::now() > deadline {
            bail!("the control plane did not start (see {})", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((cp, pid, api))
}

async fn run(args: &Args, sidewall: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    let _cluster = if args.etcd {
        let cluster = sidewall_control_plane::testing::etcd::EtcdCluster::start(
            &dir.join("etcd"),
            3,
            "fleet --etcd",
        )
        .context("the `etcd` binary is needed for --etcd")?;
        let kek = sidewall_control_plane::testing::kek_file(&dir.join("secrets"));
        extra = vec![
            "--store".to_owned(),
            cluster.store_url(),
            "--ca-kek-file".to_owned(),
            kek.display().to_string(),
        ];
        Some(cluster)
    } else {
        None
    };
    let count = if args.etcd { args.replicas.max(1) } else { 1 };
    let mut replicas = Vec::new();
    for r in 0..count {
        replicas.push(
            start_control_plane(
                sidewall,
                &dir.join(format!("cp{r}")),
                &dir.join(format!("cp{r}.log")),
                &extra,
            )
            .await?,
        );
    }
    let pids: Vec<u32> = replicas.iter().map(|(_, pid, _)| *pid).collect();
    let ports: Vec<u16> = replicas.iter().map(|(_, _, port)| *port).collect();
    let rss = || pids.iter().map(|pid| rss_kib(*pid)).sum::<u64>();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let data = dir.join("cp0");
    let url_of = |r: usize| format!("https://127.0.0.1:{}", ports[r % ports.len()]);
    let url = url_of(0);
    let operator = Client::operator(&data, "admin", Some(&url))?;
    let operators: Vec<Client> = (0..count)
        .map(|r| Client::operator(&dir.join(format!("cp{r}")), "admin", Some(&url_of(r))))
        .collect::<Result<_, _>>()?;
    let td = TrustDomain::default();
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&std::fs::read(data.join("trust-bundle.pem"))?)
            .collect::<Result<_, _>>()?;
    let idle_rss = rss();

    // Tokens, then certificates (timed: the issuance rate).
    eprintln!("fleet: creating {} join tokens", args.proxies);
    let mut tokens = Vec::with_capacity(args.proxies);
    for i in 0..args.proxies {
        let identity = format!("spiffe://sidewall.local/ns/sim/svc/s{i}");
        let (status, body) = operator
            .call(
                Method::POST,
                "/v1/tokens",
                Some(&json!({"identity": identity, "ttl_seconds": 3600})),
            )
            .await?;
        if !status.is_success() {
            bail!("token: {status} {body}");
        }
        tokens.push((
            identity,
            body["token"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    eprintln!(
        "fleet: issuing {} certificates ({} at a time)",
        args.proxies, args.concurrency
    );
    let anonymous: Vec<Client> = (0..count)
        .map(|r| Client::new(&url_of(r), &td, roots.clone(), None))
        .collect::<Result<_, _>>()?;
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (identity, token)) in tokens.into_iter().enumerate() {
        let (anonymous, permits) = (anonymous[i % count].clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let (key, csr) = key_and_csr()?;
            let (status, body) = anonymous
                .call(
                    Method::POST,
                    "/v1/certificates",
                    Some(&json!({"csr": csr, "token": token})),
                )
                .await?;
            if !status.is_success() {
                bail!("issuance for {identity}: {status} {body}");
            }
            Ok::<_, anyhow::Error>((
                identity,
                body["certificate_chain"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                key.serialize_pem(),
            ))
        }));
    }
    let mut credentials = Vec::with_capacity(args.proxies);
    for task in tasks {
        credentials.push(task.await??);
    }
    let issuance_seconds = started.elapsed().as_secs_f64();
    let issuance_rate = args.proxies as f64 / issuance_seconds;
    eprintln!("fleet: {issuance_rate:.0} certificates/s");

    // N watches over TLS + HTTP/2, each acking what it receives.
    eprintln!("fleet: opening {} snapshot watches", args.proxies);
    let (events, mut arrivals) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut connected = 0;
    let mut watchers = Vec::new();
    for (i, (identity, chain, key)) in credentials.into_iter().enumerate() {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
        let client = Client::new(&url_of(i), &td, roots.clone(), Some((chain, key)))?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let events = events.clone();
        let address = format!("127.0.0.1:{}", ports[i % count]);
        watchers.push(tokio::spawn(async move {
            watch(i, identity, client, address, ready_tx, events).await
        }));
        if ready_rx.await.is_ok() {
            connected += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    while arrivals.try_recv().is_ok() {}
    let connected_rss = rss();
    eprintln!(
        "fleet: {connected} watches open; control plane RSS {} MiB",
        connected_rss / 1024
    );

    // Policy applies: every simulated proxy's snapshot changes each time.
    let mut latencies = Vec::new();
    let mut last_ack = Vec::new();
    for round in 0..args.applies {
        let policy = format!(
            "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: sim}}\nspec:\n  target: spiffe://sidewall.local/ns/sim/**\n  rules:\n    - {{action: allow, from: [spiffe://sidewall.local/ns/client/**], ports: [{}]}}\n",
            8000 + round
        );
        let started = Instant::now();
        let (status, body) = operator
            .call(
                Method::POST,
                "/v1/policies",
                Some(&json!({"files": [{"name": "sim.yaml", "text": policy}]})),
            )
            .await?;
        if !status.is_success() {
            bail!("apply: {status} {body}");
        }
        let version = body["version"].as_u64().unwrap_or(0);
        let mut seen = vec![false; args.proxies];
        let mut count = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while count < connected && Instant::now() < deadline {
            if let Ok(Some((i, at))) =
                tokio::time::timeout(Duration::from_secs(1), arrivals.recv()).await
                && !seen[i]
            {
                seen[i] = true;
                count += 1;
                latencies.push(at.duration_since(started).as_secs_f64() * 1000.0);
            }
        }
        // Each replica knows its own sidecars' acks: done when every replica is.
        let mut pending: Vec<&Client> = operators.iter().collect();
        loop {
            let mut still = Vec::new();
            for operator in pending {
                let (status, body) = operator
                    .call(Method::GET, &format!("/v1/policies/{version}/status"), None)
                    .await?;
                if !(status.is_success() && body["done"] == true) {
                    still.push(operator);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("version {version} not acked by every proxy within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        last_ack.push(started.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "fleet: apply {} reached {count} proxies; every ack in {:.0} ms",
            round + 1,
            last_ack[round]
        );
    }
    latencies.sort_by(f64::total_cmp);
    last_ack.sort_by(f64::total_cmp);
    let report = json!({
        "store": if args.etcd { "etcd (3 members)" } else { "embedded" },
        "replicas": count,
        "proxies": args.proxies,
        "connected": connected,
        "issuance_per_second": issuance_rate,
        "control_plane_rss_mib": {"idle": idle_rss / 1024, "connected": connected_rss / 1024},
        "propagation_ms": {"p50": percentile(&latencies, 50.0), "p99": percentile(&latencies, 99.0), "max": latencies.last()},
        "apply_to_last_ack_ms": {"median": percentile(&last_ack, 50.0), "max": last_ack.last()},
        "applies": args.applies,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    for watcher in watchers {
        watcher.abort();
    }
    Ok(())
}

/// One simulated sidecar: a watch over HTTP/2; each snapshot after the first is reported as an
/// arrival and acknowledged on the same connection.
async fn watch(
    i: usize,
    identity: String,
    client: Client,
    address: String,
    ready: tokio::sync::oneshot::Sender<()>,
    events: mpsc::UnboundedSender<(usize, Instant)>,
) -> anyhow::Result<()> {
    let mut tls = (*client.tls()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(&address).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let instance = format!("sim-{i}");
    let request = Request::get(format!("/v1/snapshots/watch?instance={instance}"))
        .body(Full::new(Bytes::new()))?;
    let response = sender.clone().send_request(request).await?;
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut first = true;
    let mut ready = Some(ready);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if line.len() <= 1 {
                continue;
            }
            let arrived = Instant::now();
            let snapshot: Value = serde_json::from_slice(&line)?;
            if !first {
                let _ = events.send((i, arrived));
            }
            let ack =
                json!({"instance": instance, "version": snapshot["version"], "status": "applied"});
            let mut sender = sender.clone();
            let request = Request::post("/v1/acks")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(ack.to_string())))?;
            let answer = sender.send_request(request).await?;
            let _ = answer.into_body().collect().await;
            if first {
                first = false;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
    }
    bail!("{identity}: watch ended")
}
