//! Segmentation probes (`sidewall verify segmentation`; docs/compliance.md): the control plane
//! asks a sidecar, over its snapshot watch, to dial pairs the policies in force must deny, as
//! itself, past its own outbound checks; the target's sidecar answers each with the status byte
//! the connection would get and closes it. A probe never reaches an app, and is counted apart
//! from connections (`sidewall_proxy_probes_total`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sidewall_policies::SpiffeId;
use sidewall_policies::svid::{Usage, peer_svid};
use sidewall_policies::wire::{Probe, ProbeAnswer, ProbeResult};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::Context;
use crate::transport::{ReadAhead, Status, request_port, write_status};

/// Probes a sidecar answers per second from one peer at most (a prober makes 20); more are
/// closed unanswered.
const ANSWERS_PER_SECOND: u32 = 50;
/// Peers whose answer count is kept; past this, the counts start again.
const PEERS_COUNTED: usize = 4096;
/// The pause between two probes this sidecar makes (at most 20 a second).
const BETWEEN_PROBES: Duration = Duration::from_millis(50);
/// How long a probe may take to connect, to finish its handshake, and to be answered: the
/// targets are sidecars close by, and a dead one must not hold the probes after it.
const CONNECT_WITHIN: Duration = Duration::from_secs(2);
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(3);
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// Probes answered in the current second, by peer, for [`ANSWERS_PER_SECOND`].
static ANSWERED: Mutex<Option<HashMap<String, (Instant, u32)>>> = Mutex::new(None);

fn may_answer(peer: &str) -> bool {
    let mut counts = ANSWERED.lock().unwrap_or_else(|p| p.into_inner());
    let counts = counts.get_or_insert_with(HashMap::new);
    if counts.len() >= PEERS_COUNTED && !counts.contains_key(peer) {
        counts.clear();
    }
    let now = Instant::now();
    let (start, count) = counts.entry(peer.to_owned()).or_insert((now, 0));
    if now.duration_since(*start) >= Duration::from_secs(1) {
        (*start, *count) = (now, 0);
    }
    *count += 1;
    *count <= ANSWERS_PER_SECOND
}

/// Answers a probe of `port` that arrived on `stream` (ALPN `sidewall-probe/1`): the status byte
/// [`crate::admit::probe`] gives, then the connection closes.
pub(crate) async fn answer<S>(
    context: &Context,
    mut stream: tokio_rustls::server::TlsStream<S>,
    port: u16,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(peer) = peer_svid(stream.get_ref().1.peer_certificates(), Usage::Client) else {
        return;
    };
    if !may_answer(peer.id.as_str()) {
        metrics::counter!(crate::metric::PROBES, "side" => "answered", "answer" => "rate_limited")
            .increment(1);
        return;
    }
    let status = crate::admit::probe(context, &peer, port);
    metrics::counter!(crate::metric::PROBES, "side" => "answered", "answer" => status.label())
        .increment(1);
    tracing::info!(peer = %peer.id, port, answer = status.label(), "segmentation probe answered");
    let _ = write_status(&mut stream, status).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
}

/// Makes `probes` one after the other, as this sidecar, and says what each target answered.
pub(crate) async fn run(context: &Context, probes: Vec<Probe>) -> Vec<ProbeResult> {
    let mut results = Vec::with_capacity(probes.len());
    for probe in probes {
        let answer = dial(context, &probe).await;
        metrics::counter!(crate::metric::PROBES, "side" => "made", "answer" => label(answer))
            .increment(1);
        tracing::info!(
            target = probe.target,
            endpoint = probe.endpoint,
            port = probe.port,
            answer = label(answer),
            "segmentation probe made"
        );
        results.push(ProbeResult { probe, answer });
        tokio::time::sleep(BETWEEN_PROBES).await;
    }
    results
}

fn label(answer: ProbeAnswer) -> &'static str {
    match answer {
        ProbeAnswer::Pending => "pending",
        ProbeAnswer::Refused => "refused",
        ProbeAnswer::Admitted => "admitted",
        ProbeAnswer::NoAnswer => "no_answer",
    }
}

/// One probe: mutual TLS to the target's sidecar (which must prove it is the target), the port
/// header, and the status byte it answers.
async fn dial(context: &Context, probe: &Probe) -> ProbeAnswer {
    let (Ok(target), Ok(address)) = (
        SpiffeId::parse(&probe.target),
        probe.endpoint.parse::<SocketAddr>(),
    ) else {
        return ProbeAnswer::NoAnswer;
    };
    let Some(tls) = context.tls.borrow().clone() else {
        return ProbeAnswer::NoAnswer;
    };
    let Ok(client) = tls.probe_client(&target) else {
        return ProbeAnswer::NoAnswer;
    };
    let exchange = async {
        let tcp = tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect(address))
            .await
            .ok()?
            .ok()?;
        let name = rustls_pki_types::ServerName::IpAddress(address.ip().into());
        let mut stream = tokio::time::timeout(
            HANDSHAKE_WITHIN,
            TlsConnector::from(client).connect(name, ReadAhead::new(tcp)),
        )
        .await
        .ok()?
        .ok()?;
        request_port(&mut stream, probe.port, ANSWER_WITHIN)
            .await
            .ok()
            .flatten()
    };
    match exchange.await {
        Some(Status::Allowed) => ProbeAnswer::Admitted,
        Some(_) => ProbeAnswer::Refused,
        None => ProbeAnswer::NoAnswer,
    }
}
