//! Snapshots from the control plane: register, watch, apply, ack, report flows.
//!
//! One HTTP/2 connection (mTLS with the sidecar's own certificate; the control plane must be
//! `spiffe://<td>/sidewall/control-plane`) carries the registration, the long-lived watch
//! stream of newline-delimited JSON snapshots, the acks and the flow reports. A snapshot that
//! does not parse or is not for this workload is rejected (and the rejection acked); the last
//! good one stays in force and on disk. The connection is re-made with capped, jittered
//! backoff, over every URL in turn, and after each certificate renewal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use sidewall_policies::snapshot::{ServicePort, Snapshot, SnapshotVersion};
use sidewall_policies::wire;
use tokio::sync::watch;

use crate::Context;
use crate::identity::control_plane::{authority, verified_config};
use crate::identity::state::write_atomic;
use crate::identity::{Credential, CredentialWatch};
use crate::snapshot::Active;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often observed flows are reported.
const FLOW_REPORT: Duration = Duration::from_secs(5);
/// Flow records per report body: at most about 2.7 KB each once sanitized (a SPIFFE ID of
/// 2,048 bytes, a path of 256), so a body stays well under the control plane's 1 MiB.
const FLOWS_PER_BODY: usize = 300;
/// The file the last good snapshot is kept in.
const SNAPSHOT_FILE: &str = "snapshot.json";
/// How often a registration refused for a taken endpoint is tried again.
const REGISTRATION_RETRY: Duration = Duration::from_secs(5);

/// Loads the last good snapshot from the state directory.
pub fn load_saved(dir: &Path, workload: &sidewall_policies::SpiffeId) -> Option<Active> {
    let bytes = std::fs::read(dir.join(SNAPSHOT_FILE)).ok()?;
    match Snapshot::from_json(&bytes) {
        Ok(snapshot) if &snapshot.workload == workload => {
            tracing::info!(version = %snapshot.version, "enforcing the saved snapshot until the control plane answers");
            Some(Active::new(snapshot))
        }
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(%error, "saved snapshot unusable");
            None
        }
    }
}

/// A little jitter (0–25 %) so that many sidecars do not reconnect in step.
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    base + base.mul_f64(f64::from(byte[0]) / 1024.0)
}

/// Keeps a watch open until `stop` turns true.
pub async fn run(
    context: Arc<Context>,
    mut credential: CredentialWatch,
    snapshot: watch::Sender<Option<Arc<Active>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut attempt = 0usize;
    loop {
        let current = credential.borrow_and_update().clone();
        let Some(current) = current else {
            tokio::select! {
                _ = credential.changed() => continue,
                _ = stop.changed() => return,
            }
        };
        let urls = &context.config.control_plane.urls;
        let url = urls[attempt % urls.len()].clone();
        let session = session(&context, &url, &current, &snapshot);
        let ended = tokio::select! {
            result = session => result,
            _ = credential.changed() => Ok(()),
            _ = stop.changed() => {
                deregister(&context, &url, &current).await;
                return;
            }
        };
        match ended {
            Ok(()) => backoff = Duration::from_millis(250),
            Err(error) => {
                tracing::warn!(url, %error, retry_in_ms = backoff.as_millis() as u64, "control plane stream lost; enforcing the last good snapshot");
                attempt += 1;
                tokio::select! {
                    () = tokio::time::sleep(jitter(backoff)) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        *context
            .control_plane
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// Why a session with the control plane ended (the sidecar reconnects, enforcing what it
/// has). The message carries the cause's; `source()` gives the cause itself.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// This sidecar's credential or the URL cannot make a TLS client.
    #[error("{0}")]
    Setup(#[source] Cause),
    /// Connecting, the handshake or a request failed.
    #[error("{0}")]
    Transport(#[source] Cause),
    /// A step did not finish in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The control plane refused the watch.
    #[error("watch refused ({status}): {answer}")]
    Refused {
        /// The HTTP status.
        status: hyper::StatusCode,
        /// The answer's body.
        answer: String,
    },
    /// No line, not even a keep-alive, for three keep-alive periods.
    #[error(
        "the watch was silent for {} s (keep-alive every {} s): taken for dead",
        .silence.as_secs(),
        .keepalive.as_secs()
    )]
    Silent {
        /// How long.
        silence: Duration,
        /// The keep-alive period asked for.
        keepalive: Duration,
    },
    /// The control plane ended the stream.
    #[error("stream ended")]
    Ended,
    /// A line longer than any snapshot may be.
    #[error("snapshot line over 64 MiB")]
    LineTooLong,
}

/// A cause kept as it is.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

fn transport(error: impl Into<Cause>) -> SessionError {
    SessionError::Transport(error.into())
}

async fn connect(
    url: &str,
    credential: &Credential,
    alpn_h2: bool,
) -> Result<Sender, SessionError> {
    let key = PrivateKeyDer::from_pem_slice(credential.key_pem.as_bytes())
        .map_err(|e| SessionError::Setup(e.into()))?;
    let tls = verified_config(
        &credential.svid.id,
        &credential.bundle_pem,
        Some((credential.certified_key.cert.clone(), key)),
    )
    .map_err(|e| SessionError::Setup(e.into()))?;
    let mut tls = (*tls).clone();
    if alpn_h2 {
        tls.alpn_protocols = vec![b"h2".to_vec()];
    }
    let (authority, host) = authority(url).map_err(|e| SessionError::Setup(e.into()))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        crate::transport::connect_authority(&authority),
    )
    .await
    .map_err(|_| SessionError::Timeout("connect"))?
    .map_err(transport)?;
    let name = ServerName::try_from(host).map_err(|e| SessionError::Setup(e.into()))?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| SessionError::Timeout("handshake"))?
    .map_err(transport)?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(transport)?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn post<T: serde::Serialize>(
    sender: &mut Sender,
    path: &str,
    body: &T,
) -> Result<(u16, Bytes), SessionError> {
    let body = serde_json::to_vec(body).map_err(transport)?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(transport)?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| SessionError::Timeout("request"))?
        .map_err(transport)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(transport)?
        .to_bytes();
    Ok((status, body))
}

fn registration(context: &Context) -> Option<wire::Registration> {
    let config = &context.config;
    let endpoint = config.inbound.advertise.or_else(|| {
        let listen = config.inbound.listen;
        (!listen.ip().is_unspecified()).then_some(listen)
    })?;
    let ports: Vec<_> = config
        .inbound
        .ports
        .iter()
        .map(|p| ServicePort {
            port: p.port,
            protocol: p.protocol,
            path_parameters: p.path_parameters,
        })
        .collect();
    Some(wire::Registration {
        instance: context.instance.clone(),
        endpoint: endpoint.to_string(),
        ports,
        addresses: config.inbound.addresses.clone(),
    })
}

async fn session(
    context: &Arc<Context>,
    url: &str,
    credential: &Arc<Credential>,
    snapshot: &watch::Sender<Option<Arc<Active>>>,
) -> Result<(), SessionError> {
    let mut sender = connect(url, credential, true).await?;
    let mut registered = register(context, &mut sender).await?;
    // The control plane sends a keep-alive line this often; three missed and the watch is
    // taken for dead (a frozen or partitioned control plane whose kernel still acknowledges).
    let keepalive = context.config.control_plane.watch_keepalive.0;
    let silence = keepalive * 3;
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!(
            "/v1/snapshots/watch?instance={}&keepalive={}",
            context.instance,
            keepalive.as_secs()
        ))
        .body(Full::new(Bytes::new()))
        .map_err(transport)?;
    let response = sender.send_request(request).await.map_err(transport)?;
    if response.status() != 200 {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(SessionError::Refused {
            status,
            answer: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    *context
        .control_plane
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(url.to_owned());
    tracing::info!(url, "watching snapshots");
    let mut body = response.into_body();
    let mut buffer = BytesMut::new();
    let mut scanned = 0;
    let mut reports = tokio::time::interval(FLOW_REPORT);
    let mut retry = tokio::time::interval(REGISTRATION_RETRY);
    loop {
        tokio::select! {
            // An endpoint still held by a stale registration frees up when that lease ends.
            _ = retry.tick(), if !registered => registered = register(context, &mut sender).await?,
            frame = tokio::time::timeout(silence, body.frame()) => {
                let Ok(frame) = frame else {
                    metrics::counter!(crate::metric::WATCH_SILENT).increment(1);
                    return Err(SessionError::Silent { silence, keepalive });
                };
                let Some(frame) = frame else { return Err(SessionError::Ended) };
                let frame = frame.map_err(transport)?;
                let Ok(data) = frame.into_data() else { continue };
                buffer.extend_from_slice(&data);
                if buffer.len() > 64 * 1024 * 1024 {
                    return Err(SessionError::LineTooLong);
                }
                // Only the bytes not yet searched: a line arriving in many frames is scanned once.
                while let Some(end) = buffer[scanned..].iter().position(|&b| b == b'\n') {
                    let line = buffer.split_to(scanned + end + 1);
                    scanned = 0;
                    if line.starts_with(b"{\"probes\"") {
                        start_probes(context, url, credential, &line[..line.len() - 1]);
                    } else if line.len() > 1 {
                        apply_line(context, &mut sender, &line[..line.len() - 1], credential, snapshot).await;
                    } else {
                        // A keep-alive line: answered with an ack of the version in force,
                        // so the control plane sees the watch alive (stale otherwise).
                        let current = snapshot.borrow().as_ref().map(|a| a.snapshot.version.clone());
                        if let Some(version) = current {
                            ack(context, &mut sender, credential, &version, None).await;
                        }
                    }
                }
                scanned = buffer.len();
            }
            _ = reports.tick() => report_flows(context, &mut sender).await,
        }
    }
}

/// Makes the probes of a probe order line in the background, then posts what the targets
/// answered (`POST /v1/probes`) on a connection of its own.
fn start_probes(context: &Arc<Context>, url: &str, credential: &Arc<Credential>, line: &[u8]) {
    let order = match serde_json::from_slice::<wire::ProbeOrder>(line) {
        Ok(order) => order,
        Err(error) => {
            tracing::warn!(%error, "a probe order that does not parse; ignored");
            return;
        }
    };
    let probes: Vec<_> = order
        .probes
        .into_iter()
        .take(wire::ProbeOrder::MAX)
        .collect();
    let deadline = order.deadline;
    let (context, url, credential) = (context.clone(), url.to_owned(), credential.clone());
    let runner = tokio::spawn(async move {
        // Answers go back a second's worth at a time, so a slow target costs only its own.
        let mut sender = None;
        for batch in probes.chunks(20) {
            if deadline.is_some_and(|d| crate::identity::now_unix() >= d) {
                tracing::warn!(
                    "the segmentation test's time is up: the remaining probes are not made"
                );
                break;
            }
            let results = crate::probe::run(&context, batch.to_vec()).await;
            let body = wire::ProbeResults {
                instance: context.instance.clone(),
                results,
            };
            for _attempt in 0..2 {
                let posted = async {
                    if sender.is_none() {
                        sender = Some(connect(&url, &credential, true).await?);
                    }
                    match sender.as_mut() {
                        Some(sender) => post(sender, "/v1/probes", &body).await,
                        None => Err(SessionError::Ended),
                    }
                };
                match posted.await {
                    Ok((200, _)) => break,
                    Ok((status, answer)) => {
                        tracing::warn!(status, answer = %String::from_utf8_lossy(&answer), "probe results refused");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "probe results not delivered; trying again");
                        sender = None;
                    }
                }
            }
        }
    });
    // One test at a time: a newer order replaces what is left of an older one.
    let mut current = PROBE_RUNNER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(previous) = current.replace(runner.abort_handle()) {
        previous.abort();
    }
}

/// The task making the newest probe order's probes.
static PROBE_RUNNER: std::sync::Mutex<Option<tokio::task::AbortHandle>> =
    std::sync::Mutex::new(None);

/// Registers this sidecar's endpoint. `Ok(false)`: refused for now (the endpoint is still held
/// by another identity's registration, which expires when its sidecar stops watching): try
/// again later. Any other refusal is logged and not retried.
async fn register(context: &Context, sender: &mut Sender) -> Result<bool, SessionError> {
    let Some(body) = registration(context) else {
        return Ok(true);
    };
    let (status, answer) = post(sender, "/v1/registrations", &body).await?;
    let answer_text = String::from_utf8_lossy(&answer);
    if status == 409 && answer_text.contains("endpoint_taken") {
        metrics::counter!(crate::metric::REGISTRATIONS_REFUSED, "reason" => "endpoint_taken")
            .increment(1);
        tracing::warn!(answer = %answer_text, retry_in = ?REGISTRATION_RETRY, "registration refused: the endpoint is held by another registration; retrying (it expires when its sidecar stops watching, or an operator removes it: sidewall workload deregister)");
        return Ok(false);
    }
    if status != 200 {
        // Not fatal for enforcement: log loudly and keep watching.
        metrics::counter!(crate::metric::REGISTRATIONS_REFUSED, "reason" => "refused").increment(1);
        tracing::error!(status, answer = %answer_text, "registration refused");
        return Ok(true);
    }
    match serde_json::from_slice::<wire::Registered>(&answer) {
        Ok(answer) => {
            for refused in answer.addresses_refused {
                tracing::warn!(
                    address = refused.address,
                    reason = refused.reason.as_str(),
                    "inbound.addresses: the control plane does not send callers to this address (an operator declares a service's addresses in a policy's spec.addresses)"
                );
            }
        }
        Err(error) => {
            tracing::warn!(%error, answer = %answer_text, "the registration's answer is not what this sidecar expects")
        }
    }
    tracing::info!("registered");
    Ok(true)
}

async fn apply_line(
    context: &Context,
    sender: &mut Sender,
    line: &[u8],
    credential: &Credential,
    snapshot: &watch::Sender<Option<Arc<Active>>>,
) {
    let workload = &context.config.identity;
    let parsed = Snapshot::from_json(line)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            if &s.workload == workload {
                Ok(s)
            } else {
                Err(format!("snapshot is for {}, not {workload}", s.workload))
            }
        });
    let (version, outcome) = match parsed {
        Ok(next) => {
            let version = next.version.clone();
            let current = snapshot
                .borrow()
                .as_ref()
                .map(|a| a.snapshot.version.clone());
            // An older version of the same store is not applied, and not acked as applied:
            // the control plane's counters went back, and `status` must show it.
            if let Some(current) = current
                .as_ref()
                .filter(|c| c.epoch == version.epoch && version.counter < c.counter)
            {
                metrics::counter!(crate::metric::SNAPSHOTS_REJECTED).increment(1);
                tracing::error!(%version, %current, "snapshot older than the one in force; keeping it");
                let reason = format!("stale: version {version} is older than {current} in force");
                return ack(context, sender, credential, &version, Some(reason)).await;
            }
            if current
                .as_ref()
                .is_none_or(|c| c.is_superseded_by(&version))
            {
                if let Err(error) =
                    write_atomic(&context.config.state_dir.join(SNAPSHOT_FILE), line, 0o644)
                {
                    tracing::error!(%error, "cannot save the snapshot");
                }
                tracing::info!(%version, policies = next.policies.policies().len(), directory = next.directory.len(), "snapshot applied");
                metrics::gauge!(crate::metric::SNAPSHOT_VERSION).set(version.counter as f64);
                metrics::counter!(crate::metric::SNAPSHOTS_APPLIED).increment(1);
                snapshot.send_replace(Some(Arc::new(Active::new(next))));
            }
            (version, None)
        }
        Err(reason) => {
            metrics::counter!(crate::metric::SNAPSHOTS_REJECTED).increment(1);
            tracing::error!(reason, "snapshot rejected; keeping the last good one");
            let version = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| serde_json::from_value(v["version"].clone()).ok())
                .unwrap_or(sidewall_policies::snapshot::SnapshotVersion {
                    epoch: String::new(),
                    counter: 0,
                });
            (version, Some(reason))
        }
    };
    ack(context, sender, credential, &version, outcome).await;
}

/// Acknowledges `version`: applied, or rejected with the reason.
async fn ack(
    context: &Context,
    sender: &mut Sender,
    credential: &Credential,
    version: &SnapshotVersion,
    rejection: Option<String>,
) {
    let body = wire::Ack {
        instance: context.instance.clone(),
        version: version.clone(),
        status: if rejection.is_none() {
            wire::AckStatus::Applied
        } else {
            wire::AckStatus::Rejected
        },
        reason: rejection,
        certificate_expires_at: Some(credential.svid.not_after),
        certificate_serial: Some(credential.svid.serial.clone()),
        sidecar: Some(facts(context)),
    };
    if let Err(error) = post(sender, "/v1/acks", &body).await {
        tracing::warn!(%error, "ack not delivered");
    }
}

/// What this sidecar runs with, for the control plane's fleet view and reports.
fn facts(context: &Context) -> wire::SidecarFacts {
    let config = &context.config;
    wire::SidecarFacts {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        permissive_ports: config
            .inbound
            .ports
            .iter()
            .filter(|p| p.permissive)
            .map(|p| p.port)
            .take(wire::SidecarFacts::MAX_ENTRIES)
            .collect(),
        egress: config
            .outbound
            .egress
            .iter()
            .take(wire::SidecarFacts::MAX_ENTRIES)
            .cloned()
            .collect(),
        allow_tls12: config.tls.allow_tls12,
        probes: true,
    }
}

async fn report_flows(context: &Context, sender: &mut Sender) {
    let mut report = context.flows.take_report();
    // In bodies the control plane accepts: one too large would be refused whole, with every
    // peer's flows in it. The rest goes with the first.
    while !report.is_empty() {
        let rest = report
            .flows
            .split_off(report.flows.len().min(FLOWS_PER_BODY));
        let body = wire::FlowReport {
            flows: std::mem::replace(&mut report.flows, rest),
            refusals: std::mem::take(&mut report.refusals),
            tls: std::mem::take(&mut report.tls),
            plaintext: std::mem::take(&mut report.plaintext),
            outbound: std::mem::take(&mut report.outbound),
        };
        match post(sender, "/v1/flows", &body).await {
            Ok((200, _)) => {}
            Ok((status, answer)) => {
                metrics::counter!(crate::metric::FLOW_REPORTS_FAILED).increment(1);
                tracing::warn!(status, answer = %String::from_utf8_lossy(&answer), "flow report refused");
            }
            Err(error) => {
                metrics::counter!(crate::metric::FLOW_REPORTS_FAILED).increment(1);
                tracing::debug!(%error, "flow report not delivered");
            }
        }
    }
}

async fn deregister(context: &Context, url: &str, credential: &Credential) {
    if registration(context).is_none() {
        return;
    }
    let attempt = async {
        let mut sender = connect(url, credential, true).await?;
        let request = Request::builder()
            .method(Method::DELETE)
            .uri(format!("/v1/registrations/{}", context.instance))
            .body(Full::new(Bytes::new()))
            .map_err(transport)?;
        sender.send_request(request).await.map_err(transport)?;
        Ok::<_, SessionError>(())
    };
    if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
        tracing::debug!(%error, "deregistration not delivered");
    }
}
