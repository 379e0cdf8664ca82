//! The admin listener: `/live`, `/ready` and `/metrics` only. It may be exposed to health
//! probes, so it reveals no policy, token or fleet data.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use tokio::net::TcpListener;

use tokio::sync::{Semaphore, watch};

/// The Prometheus text exposition format; a scrape of a body without it fails on current
/// Prometheus.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

/// Admin connections at once; more are closed on accept (review L3).
const MAX_CONNECTIONS: usize = 64;

/// Serves the admin routes until `stop` turns true: HTTP/1.1 (probes and Prometheus speak it),
/// at most [`MAX_CONNECTIONS`] at once, each request head within `header_timeout`
/// (`limits.requestTimeout`).
pub async fn serve(
    listener: TcpListener,
    metrics: Option<crate::metric::Render>,
    header_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    metrics::counter!(crate::metric::ACCEPT_ERRORS, "listener" => "admin").increment(1);
                    tracing::warn!(%error, "admin: accept failed; backing off");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "reason" => "admin_limit")
                .increment(1);
            continue;
        };
        let metrics = metrics.clone();
        let ready = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let stopping = *ready.borrow();
                async move {
                    Ok::<_, Infallible>(match request.uri().path() {
                        "/live" => text(StatusCode::OK, "ok\n".into()),
                        "/ready" if stopping => {
                            text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into())
                        }
                        "/ready" => text(StatusCode::OK, "ready\n".into()),
                        "/metrics" => match &metrics {
                            Some(render) => reply(StatusCode::OK, METRICS_CONTENT_TYPE, render()),
                            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n".into()),
                        },
                        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
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
