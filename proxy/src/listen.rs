//! The accept loop every listener of the sidecar shares: the connection limit, the counters
//! and gauges by direction, and a clean stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Context;

/// Accepts on `listener` until `stop` turns true, running `handle` for each connection in its
/// own task while it holds one of the sidecar's connection permits.
pub(crate) async fn accept_loop<F, Fut>(
    context: Arc<Context>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    direction: &'static str,
    handle: F,
) where
    F: Fn(Arc<Context>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, direction, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = context.permits.clone().try_acquire_owned() else {
            metrics::counter!("sidewall_proxy_connections_refused_total", "direction" => direction, "reason" => "limit").increment(1);
            continue;
        };
        let work = handle(context.clone(), stream, remote);
        tokio::spawn(async move {
            let _permit = permit;
            metrics::counter!("sidewall_proxy_connections_opened_total", "direction" => direction)
                .increment(1);
            metrics::gauge!("sidewall_proxy_connections_open", "direction" => direction)
                .increment(1.0);
            work.await;
            metrics::gauge!("sidewall_proxy_connections_open", "direction" => direction)
                .decrement(1.0);
        });
    }
}
