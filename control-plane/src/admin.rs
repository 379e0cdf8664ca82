//! The admin listener: `/live`, `/ready` and `/metrics` only. It may be exposed to health
//! probes, so it reveals no policy, token or fleet data.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

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

/// Serves the admin routes until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let metrics = metrics.clone();
        let ready = stop.clone();
        tokio::spawn(async move {
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
                            Some(handle) => {
                                reply(StatusCode::OK, METRICS_CONTENT_TYPE, handle.render())
                            }
                            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n".into()),
                        },
                        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
