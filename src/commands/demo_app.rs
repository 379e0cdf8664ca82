//! `sidewall demo-app`: the small app `sidewall up` runs behind each sidecar. It serves HTTP
//! (answering every request, counting them by the `x-sidewall-peer-identity` the sidecar
//! adds) or TCP (echo), calls the services it depends on at a steady rate through its sidecar's
//! local routes, and writes what happened to a JSON stats file every second.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Flags of `sidewall demo-app`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The service name (for answers and logs).
    #[arg(long)]
    name: String,
    /// Where to serve (repeatable), `tcp:ADDR` or `http:ADDR`.
    #[arg(long = "serve", value_name = "PROTO:ADDR")]
    serve: Vec<String>,
    /// A call to make at a steady rate (repeatable): `LABEL=http://ADDR/path@METHOD@1s` or
    /// `LABEL=tcp://ADDR@2s`.
    #[arg(long = "call", value_name = "SPEC")]
    calls: Vec<String>,
    /// Where to write the stats (JSON, rewritten every second).
    #[arg(long, value_name = "FILE")]
    stats: PathBuf,
}

/// One `--call`'s outcomes so far.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct CallStats {
    /// Answered by the app.
    pub(crate) ok: u64,
    /// Refused by policy (`403`, or the sidecar's status byte).
    pub(crate) denied: u64,
    /// Refused before a decision (no route, connection refused).
    pub(crate) refused: u64,
    /// Anything else.
    pub(crate) error: u64,
    /// The last refusal or error, as the call saw it.
    pub(crate) last: String,
}

/// The `--stats` file: what `sidewall up` reads every second for its live view.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stats {
    /// By the call's label.
    pub(crate) calls: BTreeMap<String, CallStats>,
    /// Requests and connections served, by caller identity (`tcp` for TCP ports).
    pub(crate) received: BTreeMap<String, u64>,
}

type Shared = Arc<Mutex<Stats>>;

fn lock(stats: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn run(args: Args) -> ExitCode {
    super::block_on(async move {
        let stats: Shared = Arc::default();
        for spec in &args.serve {
            let (protocol, addr) = spec.split_once(':').context("--serve is PROTO:ADDR")?;
            let addr: SocketAddr = addr.parse().with_context(|| format!("--serve {spec}"))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let (stats, name, http) = (stats.clone(), args.name.clone(), protocol == "http");
            tokio::spawn(async move { serve(listener, http, name, stats).await });
        }
        for spec in &args.calls {
            let call = parse_call(spec).with_context(|| format!("--call {spec}"))?;
            lock(&stats)
                .calls
                .insert(call.label.clone(), CallStats::default());
            tokio::spawn(call_loop(call, stats.clone()));
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let snapshot = serde_json::to_string(&*lock(&stats))?;
            let temporary = args.stats.with_extension("tmp");
            if std::fs::write(&temporary, snapshot).is_ok() {
                let _ = std::fs::rename(&temporary, &args.stats);
            }
        }
    })
}

struct Call {
    label: String,
    http: Option<(String, String)>,
    addr: SocketAddr,
    every: Duration,
}

fn parse_call(spec: &str) -> anyhow::Result<Call> {
    let (label, rest) = spec.split_once('=').context("LABEL=URL@...")?;
    let mut parts = rest.split('@');
    let url = parts.next().unwrap_or_default();
    let (http, addr) = if let Some(rest) = url.strip_prefix("http://") {
        let (addr, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
        let method = parts.next().unwrap_or("GET").to_owned();
        (Some((method, path)), addr)
    } else if let Some(addr) = url.strip_prefix("tcp://") {
        (None, addr)
    } else {
        anyhow::bail!("URL must start with http:// or tcp://");
    };
    let every = parts
        .next()
        .map(|e| sidewall_policies::policy::parse_duration_within(e, Duration::from_secs(3600)))
        .transpose()?
        .unwrap_or(Duration::from_secs(1));
    Ok(Call {
        label: label.to_owned(),
        http,
        addr: addr.parse()?,
        every,
    })
}

async fn call_loop(call: Call, stats: Shared) {
    loop {
        let outcome = tokio::time::timeout(Duration::from_secs(5), call_once(&call))
            .await
            .unwrap_or(Outcome::Error("timed out".into()));
        {
            let mut stats = lock(&stats);
            let entry = stats.calls.entry(call.label.clone()).or_default();
            match outcome {
                Outcome::Ok(text) => {
                    entry.ok += 1;
                    entry.last = text;
                }
                Outcome::Denied(text) => {
                    entry.denied += 1;
                    entry.last = text;
                }
                Outcome::Refused(text) => {
                    entry.refused += 1;
                    entry.last = text;
                }
                Outcome::Error(text) => {
                    entry.error += 1;
                    entry.last = text;
                }
            }
        }
        tokio::time::sleep(call.every).await;
    }
}

enum Outcome {
    Ok(String),
    Denied(String),
    Refused(String),
    Error(String),
}

async fn call_once(call: &Call) -> Outcome {
    let mut stream = match tokio::net::TcpStream::connect(call.addr).await {
        Ok(stream) => stream,
        Err(error) => return Outcome::Error(format!("connect: {error}")),
    };
    let request = match &call.http {
        Some((method, path)) => format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            call.label.split(':').next().unwrap_or("app")
        ),
        None => "ping\n".to_owned(),
    };
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Outcome::Refused("connection closed by the sidecar".into());
    }
    if call.http.is_none() {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    match (&call.http, text.split(' ').nth(1)) {
        (_, _) if answer.is_empty() => {
            Outcome::Refused("closed by the sidecar (no policy allows it)".into())
        }
        (Some(_), Some(status)) if status.starts_with('2') => Outcome::Ok(format!("HTTP {status}")),
        (Some(_), Some("403")) => Outcome::Denied("HTTP 403 (denied by policy)".into()),
        (Some(_), Some(status)) => Outcome::Error(format!("HTTP {status}")),
        (Some(_), None) => Outcome::Error("not HTTP".into()),
        (None, _) => Outcome::Ok("echo".into()),
    }
}

async fn serve(listener: tokio::net::TcpListener, http: bool, name: String, stats: Shared) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let (stats, name) = (stats.clone(), name.clone());
        tokio::spawn(async move {
            if !http {
                *lock(&stats).received.entry("tcp".into()).or_default() += 1;
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                return;
            }
            // One request per connection is all the demo needs; keep-alive is the sidecar's job.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let peer = text
                .lines()
                .find_map(|l| l.strip_prefix("x-sidewall-peer-identity:"))
                .map_or_else(|| "unknown".to_owned(), |v| v.trim().to_owned());
            *lock(&stats).received.entry(peer).or_default() += 1;
            let body = format!("hello from {name}\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
