//! The read-only dashboard: one page (HTML, CSS and JavaScript embedded in the binary, no build
//! step, no external resources) and the three JSON documents it is fed by, on their own plain
//! HTTP address (`uiListen`, default `127.0.0.1:4680`), never on the admin address.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` , `/app.js`, `/style.css` | the page |
//! | `GET /api/graph` | [`Graph`]: workloads and the flows observed between them |
//! | `GET /api/fleet` | [`Fleet`](sidewall_policies::wire::operator::Fleet), as `GET /v1/fleet` |
//! | `GET /api/policies` | the policy set in force ([`policies`]) |
//! | `GET /api/alerts` | [`Alerts`]: what detection raised recently |
//! | `GET /report` | the newest segmentation report this process signed, as its page, without its certificates section |
//!
//! Anything else is `404`. The dashboard sees only the [`Distribution`] state (never the
//! store, the CA or the API, but for the report page a report leaves it, rendered without its
//! certificates section), so no token, key or certificate can reach its answers. It shows
//! policy and fleet data without authentication, so it is bound to loopback by default, and
//! it refuses requests whose `Host` is a DNS name it does not know, so that a web page cannot
//! read it through DNS rebinding.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use sidewall_policies::Protocol;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::distribution::{Distribution, FleetEntry, FlowKey, FlowStats};
use crate::store::RegistrationRecord;

/// Most dashboard connections at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// The page loads only its own script, style sheet and JSON; nothing inline, nothing remote.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The report's page: its own inline style, nothing else.
const REPORT_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// What the dashboard serves from: the distribution state and the names it may be called by.
pub struct Dashboard {
    distribution: Arc<Distribution>,
    server_names: Vec<String>,
}

impl Dashboard {
    /// A dashboard over `distribution`. Requests are answered when their `Host` is an IP
    /// address, `localhost`, or one of `server_names` (the `serverNames` of the config).
    pub fn new(distribution: Arc<Distribution>, server_names: Vec<String>) -> Self {
        Self {
            distribution,
            server_names,
        }
    }

    /// Answers one request (never fails: errors are statuses).
    pub fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if !self.host_allowed(request) {
            return text(StatusCode::FORBIDDEN, "unknown host\n");
        }
        if request.method() != Method::GET {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        let distribution = &self.distribution;
        match request.uri().path() {
            "/" => asset(INDEX_HTML, "text/html; charset=utf-8"),
            "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
            "/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
            "/api/graph" => {
                let mut graph = graph(
                    &distribution.flows(),
                    &distribution.fleet(),
                    &distribution.registrations(),
                );
                graph.flows_dropped = distribution.flows_dropped();
                json(&graph)
            }
            "/api/fleet" => json(&distribution.fleet_view()),
            "/api/policies" => json(&policies(distribution)),
            "/api/alerts" => json(&Alerts {
                alerts: distribution.alerts(),
            }),
            "/report" => match distribution.latest_report() {
                Some(page) => {
                    let mut response =
                        with_headers(Response::new(Full::new(page)), "text/html; charset=utf-8");
                    // The report's page carries its style inline.
                    response.headers_mut().insert(
                        header::CONTENT_SECURITY_POLICY,
                        HeaderValue::from_static(REPORT_POLICY),
                    );
                    response
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    "No segmentation report was made since this control plane started: \
                     `sidewall report --out DIR` makes one (docs/compliance.md).\n",
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Whether `Host` names this server: an IP literal, `localhost` or a configured name. A
    /// request without one (HTTP/1.0) is not from a browser and is allowed.
    fn host_allowed<B>(&self, request: &Request<B>) -> bool {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().host());
        let Some(host) = host else {
            return true;
        };
        let name = host_name(host).trim_end_matches('.');
        name.parse::<IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self
                .server_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// `GET /api/alerts`: the alerts detection raised recently, oldest first (at most
/// [`crate::detection::KEPT`]).
#[derive(Debug, Serialize)]
pub struct Alerts {
    /// The alerts.
    pub alerts: Vec<crate::detection::Alert>,
}

/// The host part of a `Host` header value (`[::1]:4680` → `::1`, `a.b:80` → `a.b`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn with_headers(
    mut response: Response<Full<Bytes>>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    with_headers(response, "text/plain; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    with_headers(
        Response::new(Full::new(Bytes::from_static(body.as_bytes()))),
        content_type,
    )
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => with_headers(
            Response::new(Full::new(Bytes::from(body))),
            "application/json",
        ),
        Err(error) => {
            tracing::error!(%error, "dashboard: cannot encode an answer");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

/// The service graph: every workload known from registrations, the fleet or a flow, and the
/// observed flows between them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Graph {
    /// Workloads, by identity.
    pub nodes: Vec<Node>,
    /// Flows, by (from, to, port, protocol).
    pub edges: Vec<Edge>,
    /// Reported flows the control plane did not keep, by reason (quota or eviction): the
    /// graph and `policy impact` do not show them.
    pub flows_dropped: BTreeMap<String, u64>,
}

/// One workload in the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Its SPIFFE ID.
    pub identity: String,
    /// The last segment of its path (the service name).
    pub name: String,
    /// Whether any of its sidecars has a snapshot watch open now.
    pub connected: bool,
    /// The first endpoint registered for it, if any.
    pub endpoint: Option<String>,
}

/// The flows observed from one workload to another on one port, summed over HTTP methods and
/// paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    /// The calling identity.
    pub from: String,
    /// The called identity (whose sidecar reported the flow).
    pub to: String,
    /// The service port.
    pub port: u16,
    /// The port's protocol.
    pub protocol: Protocol,
    /// Decisions that allowed.
    pub allow: u64,
    /// Decisions that denied.
    pub deny: u64,
    /// Decisions allowed only because the policy is in audit mode ("would deny").
    pub audit: u64,
    /// The rule (or "default deny") behind the most recent denial.
    pub last_denial: Option<String>,
}

fn service_name(identity: &str) -> String {
    identity.rsplit('/').next().unwrap_or(identity).to_owned()
}

/// Builds the graph (a pure function of the distribution state, so it is tested as a table).
pub fn graph(
    flows: &[(FlowKey, FlowStats)],
    fleet: &[FleetEntry],
    registrations: &[RegistrationRecord],
) -> Graph {
    fn node<'a>(nodes: &'a mut BTreeMap<String, Node>, identity: &str) -> &'a mut Node {
        nodes.entry(identity.to_owned()).or_insert_with(|| Node {
            identity: identity.to_owned(),
            name: service_name(identity),
            connected: false,
            endpoint: None,
        })
    }
    let mut nodes = BTreeMap::new();
    for registration in registrations {
        node(&mut nodes, &registration.identity)
            .endpoint
            .get_or_insert_with(|| registration.endpoint.clone());
    }
    for entry in fleet.iter().filter(|e| !e.identity.is_empty()) {
        let node = node(&mut nodes, &entry.identity);
        node.connected |= entry.connected;
        if node.endpoint.is_none() {
            node.endpoint.clone_from(&entry.endpoint);
        }
    }
    // Several flow keys (HTTP method and path) fold into one edge; the last denial is the one
    // reported most recently.
    let mut edges: BTreeMap<(&str, &str, u16, Protocol), (Edge, i64)> = BTreeMap::new();
    for (key, stats) in flows {
        node(&mut nodes, &key.peer);
        node(&mut nodes, &key.target);
        let (edge, denial_seen) = edges
            .entry((&key.peer, &key.target, key.port, key.protocol))
            .or_insert_with(|| {
                (
                    Edge {
                        from: key.peer.clone(),
                        to: key.target.clone(),
                        port: key.port,
                        protocol: key.protocol,
                        allow: 0,
                        deny: 0,
                        audit: 0,
                        last_denial: None,
                    },
                    i64::MIN,
                )
            });
        edge.allow = edge.allow.saturating_add(stats.allow);
        edge.deny = edge.deny.saturating_add(stats.deny);
        edge.audit = edge.audit.saturating_add(stats.audit);
        if stats.last_denial.is_some() && stats.last_seen >= *denial_seen {
            edge.last_denial.clone_from(&stats.last_denial);
            *denial_seen = stats.last_seen;
        }
    }
    Graph {
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().map(|(edge, _)| edge).collect(),
        flows_dropped: BTreeMap::new(),
    }
}

/// The policy set in force: `{version, applied_by, policies: [{name, target, mode, rules}]}`.
pub fn policies(distribution: &Distribution) -> serde_json::Value {
    let (version, applied_by, engine, _) = distribution.current();
    let policies: Vec<_> = engine
        .policy_set()
        .policies()
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "target": p.target,
                "mode": p.mode,
                "rules": p.rules,
            })
        })
        .collect();
    serde_json::json!({
        "version": version,
        "applied_by": applied_by,
        "policies": policies,
    })
}

/// Serves the dashboard until `stop` turns true, then gives open requests a second to finish.
pub async fn serve(listener: TcpListener, dashboard: Dashboard, mut stop: watch::Receiver<bool>) {
    let dashboard = Arc::new(dashboard);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    metrics::counter!(crate::metric::ACCEPT_ERRORS, "listener" => "dashboard").increment(1);
                    tracing::warn!(%error, "dashboard: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "reason" => "dashboard_limit")
                .increment(1);
            continue;
        };
        let dashboard = dashboard.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = dashboard.answer(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "dashboard connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

#[cfg(test)]
mod tests;
