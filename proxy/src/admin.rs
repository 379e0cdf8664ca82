//! The sidecar's admin listener: `/live`, `/ready` (a valid certificate and a snapshot),
//! `/metrics` (Prometheus) and `/config` (identity, certificate, snapshot version, listeners).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::Context;
use crate::outbound::describe;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Why the sidecar is not ready, if it is not.
pub(crate) fn not_ready(context: &Context) -> Option<&'static str> {
    let tls = context.tls.borrow().clone();
    match tls {
        None => return Some("no certificate yet"),
        Some(tls) if tls.credential().seconds_left() <= 0 => return Some("certificate expired"),
        Some(_) => {}
    }
    if context.snapshot.borrow().is_none() {
        return Some("no policy snapshot yet");
    }
    if *context.stopping.borrow() {
        return Some("shutting down");
    }
    None
}

fn config_view(context: &Context) -> serde_json::Value {
    let config = &context.config;
    let credential = context
        .tls
        .borrow()
        .as_ref()
        .map(|tls| tls.credential().clone());
    let snapshot = context.snapshot.borrow().clone();
    json!({
        "identity": config.identity.to_string(),
        "certificate": credential.map(|c| json!({
            "serial": c.svid.serial,
            "not_after": c.svid.not_after,
            "expires_in_seconds": c.seconds_left(),
        })),
        "snapshot_version": snapshot.as_ref().map(|s| s.snapshot.version.to_string()),
        "policies": snapshot.as_ref().map(|s| s.snapshot.policies.policies().iter().map(|p| p.name.to_string()).collect::<Vec<_>>()),
        "inbound": {
            "listen": config.inbound.listen.to_string(),
            "ports": config.inbound.ports.iter().map(|p| json!({"port": p.port, "protocol": p.protocol.to_string(), "app": p.app.to_string()})).collect::<Vec<_>>(),
        },
        "outbound": config.outbound.routes.iter().map(describe).collect::<Vec<_>>(),
        "open_inbound_connections": context.connections.len(),
        "instance": context.instance,
        "control_plane": context.control_plane.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    })
}

/// Admin connections at once; more are closed on accept (review L3).
const MAX_CONNECTIONS: usize = 64;

/// Serves until `stop` turns true: HTTP/1.1 (probes and Prometheus speak it), at most
/// [`MAX_CONNECTIONS`] at once, each request head within `limits.handshakeTimeout`.
pub(crate) async fn serve(
    context: Arc<Context>,
    listener: TcpListener,
    metrics: Option<crate::metric::Render>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let header_timeout = context.config.limits.handshake_timeout.0;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    metrics::counter!(crate::metric::ACCEPT_ERRORS, "direction" => "admin").increment(1);
                    tracing::warn!(%error, "admin: accept failed; backing off");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "direction" => "admin", "reason" => "limit").increment(1);
            continue;
        };
        let (context, metrics) = (context.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let (context, metrics) = (context.clone(), metrics.clone());
                async move {
                    if let Some(tls) = context.tls.borrow().as_ref() {
                        metrics::gauge!(crate::metric::CERTIFICATE_EXPIRY)
                            .set(tls.credential().seconds_left() as f64);
                    }
                    Ok::<_, Infallible>(match request.uri().path() {
                        "/live" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                        "/ready" => match not_ready(&context) {
                            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                            Some(why) => reply(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                format!("not ready: {why}\n"),
                            ),
                        },
                        "/metrics" => match &metrics {
                            Some(render) => {
                                reply(StatusCode::OK, "text/plain; version=0.0.4", render())
                            }
                            None => reply(
                                StatusCode::NOT_FOUND,
                                "text/plain",
                                "metrics are not enabled\n".into(),
                            ),
                        },
                        "/config" => reply(
                            StatusCode::OK,
                            "application/json",
                            format!("{:#}\n", config_view(&context)),
                        ),
                        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
