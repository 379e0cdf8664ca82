//! Outbound routes: the app connects to a local port; the sidecar opens mTLS to one of the
//! service's sidecars from the snapshot's directory, requires the server to be exactly the
//! service's SPIFFE ID, names the service port in the header, and forwards. A port the
//! directory lists as `protocol: http` goes through [`http`] instead: the app's requests ride
//! one pooled HTTP/2 connection per service and port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use sidewall_policies::SpiffeId;
use sidewall_policies::svid::{Usage, peer_svid};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::Context;
use crate::config::Route;
use crate::config::SidecarConnections;
use crate::identity::now_unix;
use crate::snapshot::Active;
use crate::tls::{ALPN_L4, ALPN_MUX};
use crate::transport::{ReadAhead, Status, forward, request_port};

pub(crate) mod http;

/// Accepts app connections on one route until `stop` turns true.
pub(crate) async fn serve(
    context: Arc<Context>,
    route: Route,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let route = Arc::new(route);
    crate::listen::accept_loop(
        context,
        listener,
        stop,
        crate::listen::Budget::Outbound,
        move |context, app, _, pending| {
            let route = route.clone();
            async move {
                let _pending = pending;
                if let Err(reason) = handle(&context, &route, app).await {
                    metrics::counter!(crate::metric::OUTBOUND_FAILURES, "reason" => reason)
                        .increment(1);
                }
            }
        },
    )
    .await;
}

fn server_name(endpoint: &str) -> Option<ServerName<'static>> {
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_matches(['[', ']']);
    ServerName::try_from(host.to_owned()).ok()
}

/// The peer sidecar an outbound connection was opened to, as its handshake verified it, with
/// the snapshot that says whether it is still trusted. Every outbound connection (one per app
/// connection, shared, pooled HTTP/2, tunnels) ends when [`Server::gone`] resolves, and a pooled
/// one takes no new stream or request once [`Server::revoked`] holds.
#[derive(Clone)]
pub(crate) struct Server {
    id: SpiffeId,
    serial: String,
    /// How long the connection may live: until the first of the two certificates it was made
    /// with expires (the server closes it at ours).
    pub(crate) lifetime: Duration,
    snapshot: watch::Receiver<Option<Arc<Active>>>,
}

/// Why an outbound connection was ended on this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// A certificate it was made with expired.
    Expired,
    /// The snapshot in force revokes the server's identity or certificate.
    Revoked,
}

/// Which kind of outbound connection ended (a label for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carrier {
    /// One app connection's own mTLS connection (`perConnection`).
    Dedicated,
    /// The shared connection carrying app connections as streams.
    Shared,
    /// A pooled HTTP/2 connection between sidecars.
    Pooled,
    /// A WebSocket or `CONNECT` tunnel.
    Tunnel,
}

impl Gone {
    /// Logs and counts the end of a connection to `service`.
    pub(crate) fn record(self, service: &SpiffeId, carrier: Carrier) {
        let (reason, connection) = (
            match self {
                Self::Expired => "peer_certificate_expired",
                Self::Revoked => "peer_revoked",
            },
            match carrier {
                Carrier::Dedicated => "dedicated",
                Carrier::Shared => "shared",
                Carrier::Pooled => "pooled",
                Carrier::Tunnel => "tunnel",
            },
        );
        metrics::counter!(crate::metric::OUTBOUND_CLOSED, "reason" => reason, "connection" => connection)
            .increment(1);
        match (self, carrier) {
            (Self::Revoked, _) => {
                tracing::warn!(%service, connection, "the server is revoked: outbound connection closed");
            }
            (Self::Expired, Carrier::Shared) => {
                tracing::info!(%service, "peer certificate expired: shared connection closed");
            }
            (Self::Expired, Carrier::Pooled) => {
                tracing::info!(%service, "peer certificate expired: pooled connection closed");
            }
            (Self::Expired, _) => {
                tracing::info!(%service, connection, "peer certificate expired: connection closed");
            }
        }
    }
}

impl Server {
    /// Whether the snapshot in force revokes this server.
    pub(crate) fn revoked(&self) -> bool {
        self.snapshot.borrow().as_ref().is_some_and(|active| {
            active
                .snapshot
                .revocations
                .is_revoked(&self.id, &self.serial)
        })
    }

    /// Resolves when a connection to this server must end: at expiry, or as soon as a snapshot
    /// revokes it.
    pub(crate) async fn gone(mut self) -> Gone {
        let expiry = tokio::time::sleep(self.lifetime);
        tokio::pin!(expiry);
        loop {
            if self.revoked() {
                return Gone::Revoked;
            }
            tokio::select! {
                () = &mut expiry => return Gone::Expired,
                changed = self.snapshot.changed() => if changed.is_err() {
                    // No more snapshots (shutting down): only expiry is left.
                    (&mut expiry).await;
                    return Gone::Expired;
                },
            }
        }
    }
}

async fn handle(context: &Arc<Context>, route: &Route, app: TcpStream) -> Result<(), &'static str> {
    dial(context, &route.service, route.port, app).await
}

/// Sends `app` to `service`'s `port`: through [`http`] when the directory says the port speaks
/// HTTP, otherwise as bytes, carried on the shared connection or over one of its own.
async fn dial(
    context: &Arc<Context>,
    service: &SpiffeId,
    port: u16,
    app: TcpStream,
) -> Result<(), &'static str> {
    let _ = app.set_nodelay(true);
    let http = {
        let active = context.snapshot.borrow().clone().ok_or("no_snapshot")?;
        let Some(entry) = active.snapshot.service(service) else {
            // The directory holds the services a policy lets this workload call: a call to
            // any other is refused here, and counted for the segmentation report.
            tracing::warn!(%service, port, "service is not in the directory (no policy lets this workload call it): refused");
            context.flows.outbound_refused(
                sidewall_policies::wire::OutboundReason::UnknownService,
                service,
                port,
            );
            return Err("unknown_service");
        };
        entry
            .ports
            .iter()
            .any(|p| p.port == port && p.protocol == sidewall_policies::Protocol::Http)
    };
    if http {
        // The less common branches are boxed: an app connection's task is as large as its
        // largest branch for its whole life, and the shared path is the small one.
        Box::pin(http::serve(context.clone(), app, service.clone(), port)).await;
        return Ok(());
    }
    if context.config.outbound.sidecar_connections == SidecarConnections::Shared {
        return carry(context, service, port, app).await;
    }
    Box::pin(dedicated(context, service, port, app)).await
}

/// `app` over an mTLS connection of its own (`sidecarConnections: perConnection`).
async fn dedicated(
    context: &Arc<Context>,
    service: &SpiffeId,
    port: u16,
    app: TcpStream,
) -> Result<(), &'static str> {
    let (stream, server) = open(context, service, Some(port), ALPN_L4).await?;
    tokio::select! {
        result = forward(app, stream, context.config.limits.idle_timeout.0) => {
            if let Ok(counts) = result {
                metrics::counter!(crate::metric::BYTES, "direction" => "outbound").increment(counts.a_to_b + counts.b_to_a);
            }
        }
        gone = server.gone() => gone.record(service, Carrier::Dedicated),
    }
    Ok(())
}

/// Carries `app` as one stream of the shared connection to `service`'s sidecars: `CONNECT
/// sidewall:<port>`, authorized by the server on its own, then bytes both ways.
async fn carry(
    context: &Arc<Context>,
    service: &SpiffeId,
    port: u16,
    app: TcpStream,
) -> Result<(), &'static str> {
    let connect = || connect_shared(context, service);
    // The server connects its app (within its connectTimeout) before it answers.
    let answer_within = context.config.limits.connect_timeout.0 * 2;
    let (send, recv, _carried) =
        crate::mux::open(&context.peers_mux, service, port, answer_within, connect).await?;
    if let Ok(counts) =
        crate::mux::forward(app, send, recv, context.config.limits.idle_timeout.0).await
    {
        metrics::counter!(crate::metric::BYTES, "direction" => "outbound")
            .increment(counts.a_to_b + counts.b_to_a);
    }
    Ok(())
}

/// Opens the shared connection to `service`'s sidecars.
async fn connect_shared(
    context: &Context,
    service: &SpiffeId,
) -> Result<crate::mux::Opened, &'static str> {
    let (stream, server) = open(context, service, None, ALPN_MUX).await?;
    let (sender, connection) = crate::mux::client_builder()
        .handshake(stream)
        .await
        .map_err(|_| "h2_handshake")?;
    let closed = crate::mux::drive(
        connection,
        server.clone().gone(),
        service.clone(),
        context.config.limits.keepalive.0,
    );
    let until = std::time::Instant::now() + server.lifetime / 2;
    Ok(crate::mux::Opened::new(
        sender,
        Some(until),
        Some(server),
        closed,
    ))
}

/// Opens mTLS to one of `service`'s sidecars (verifying it is exactly `service`) with `alpn`;
/// with a `port`, names it in the header and waits for the answer. Returns the stream, ready
/// for bytes (or HTTP/2), and the [`Server`] it reached.
pub(crate) async fn open(
    context: &Context,
    service: &SpiffeId,
    port: Option<u16>,
    alpn: &'static [u8],
) -> Result<
    (
        tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>,
        Server,
    ),
    &'static str,
> {
    let route = Route {
        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
        service: service.clone(),
        port: port.unwrap_or(0),
    };
    let config = &context.config;
    let tls = context.tls.borrow().clone().ok_or_else(|| {
        tracing::warn!(service = %route.service, "no certificate yet: outbound refused");
        "no_local_certificate"
    })?;
    let active = context.snapshot.borrow().clone().ok_or("no_snapshot")?;
    let Some(entry) = active.snapshot.service(&route.service) else {
        tracing::warn!(service = %route.service, "service is not in the directory");
        return Err("unknown_service");
    };
    let client = tls
        .client_for(&route.service, alpn)
        .map_err(|_| "tls_config")?;
    let connector = TlsConnector::from(client);
    let timeout = config.limits.handshake_timeout.0;
    let mut last = "no_endpoint";
    for endpoint in &entry.endpoints {
        let Ok(address) = tokio::net::lookup_host(endpoint.as_str())
            .await
            .map(|mut a| a.next())
        else {
            last = "endpoint_unresolvable";
            continue;
        };
        let (Some(address), Some(name)) = (address, server_name(endpoint)) else {
            last = "endpoint_unresolvable";
            continue;
        };
        let tcp = match tokio::time::timeout(
            config.limits.connect_timeout.0,
            crate::transport::connect(address, config.outbound.mark),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            _ => {
                tracing::warn!(%endpoint, service = %route.service, "peer sidecar unreachable; trying the next endpoint");
                last = "peer_unreachable";
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tcp = ReadAhead::new(tcp);
        let mut stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => stream,
            // A stale directory entry (its address now serves another identity) or a sidecar
            // that refuses us: counted, and the next endpoint is tried.
            Ok(Err(error)) => {
                let reason = sidewall_policies::svid::io_failure_label(&error);
                metrics::counter!(crate::metric::HANDSHAKE_FAILURES, "direction" => "outbound", "reason" => reason).increment(1);
                tracing::warn!(%endpoint, expected = %route.service, reason, %error, "peer sidecar refused or is not who it should be; trying the next endpoint");
                last = reason;
                continue;
            }
            Err(_) => {
                tracing::warn!(%endpoint, expected = %route.service, "peer sidecar handshake timed out; trying the next endpoint");
                last = "handshake_timeout";
                continue;
            }
        };
        if alpn == ALPN_L4 {
            // A connection per app connection: read ahead only while it carries a bulk transfer.
            stream.get_mut().0.adapt();
        } else {
            // A long-lived shared connection: worth gathering reads and writes.
            stream.get_mut().0.enable();
        }
        // Verified in the handshake; a certificate that does not parse again lives no time.
        let (server_expiry, serial) =
            peer_svid(stream.get_ref().1.peer_certificates(), Usage::Server)
                .map_or((0, String::new()), |svid| (svid.not_after, svid.serial));
        if let Some(port) = port {
            match request_port(&mut stream, port, timeout).await {
                Ok(Some(Status::Allowed)) => {}
                Ok(Some(status)) => {
                    tracing::warn!(service = %route.service, port, status = status.label(), "peer sidecar refused the connection");
                    return Err(status.label());
                }
                Ok(None) | Err(_) => return Err("bad_status"),
            }
        }
        // The connection is good until either certificate it was made with expires (the server
        // closes it at ours).
        let until = server_expiry.min(tls.credential().svid.not_after);
        let server = Server {
            id: route.service.clone(),
            serial,
            lifetime: Duration::from_secs(u64::try_from(until - now_unix()).unwrap_or(0)),
            snapshot: context.snapshot.clone(),
        };
        return Ok((stream, server));
    }
    tracing::warn!(service = %route.service, reason = last, "no endpoint of the service could be reached");
    Err(last)
}

/// The local address of a route (for logs).
pub(crate) fn describe(route: &Route) -> String {
    let listen: SocketAddr = route.listen;
    format!("{listen} -> {}:{}", route.service, route.port)
}

/// Transparent mode: accepts the app's connections that iptables redirected here, finds where
/// each was headed (`SO_ORIGINAL_DST`), and sends it to that service over mTLS, through as
/// plaintext if the destination is on the egress list, or refuses it.
pub(crate) async fn serve_transparent(
    context: Arc<Context>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let own = listener.local_addr().ok();
    crate::listen::accept_loop(context, listener, stop, crate::listen::Budget::Outbound, move |context, app, _, pending| async move {
        let _pending = pending;
        let result = match crate::transport::original_destination(&app) {
            Ok(destination) if Some(destination) != own => Box::pin(transparent(&context, destination, app)).await,
            Ok(_) => Err("not_redirected"),
            Err(error) => {
                tracing::warn!(%error, "no original destination: was the connection redirected by iptables?");
                Err("no_original_destination")
            }
        };
        if let Err(reason) = result {
            metrics::counter!(crate::metric::OUTBOUND_FAILURES, "reason" => reason).increment(1);
        }
    })
    .await;
}

/// The mesh service a destination belongs to: a sidecar endpoint's host with one of the
/// service's ports, or one of the extra addresses declared for it (a virtual IP). `Err` when
/// more than one service, or a service and the egress list, claim it: never first match.
fn resolve(
    active: &crate::snapshot::Active,
    egress: &[String],
    destination: SocketAddr,
) -> Result<Option<SpiffeId>, &'static str> {
    let mut claimants = active
        .snapshot
        .directory
        .iter()
        .zip(&active.hosts)
        .filter(|(_, hosts)| hosts.claims(destination))
        .map(|(entry, _)| entry);
    let Some(first) = claimants.next() else {
        return Ok(None);
    };
    let second = claimants.next();
    if second.is_some() || on_egress(egress, destination) {
        tracing::warn!(%destination, service = %first.identity, other = ?second.map(|e| e.identity.as_str()), "destination claimed twice (two services, or a service and outbound.egress): refused");
        return Err("ambiguous_destination");
    }
    Ok(Some(first.identity.clone()))
}

/// Whether `outbound.egress` lists the destination (as `IP:port` or as an IP).
fn on_egress(egress: &[String], destination: SocketAddr) -> bool {
    egress.iter().any(|entry| {
        entry.parse::<SocketAddr>().is_ok_and(|a| a == destination)
            || entry
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip == destination.ip())
    })
}

async fn transparent(
    context: &Arc<Context>,
    destination: SocketAddr,
    app: TcpStream,
) -> Result<(), &'static str> {
    let active = context.snapshot.borrow().clone().ok_or("no_snapshot")?;
    let config = &context.config;
    if let Some(service) = resolve(&active, &config.outbound.egress, destination)? {
        return dial(context, &service, destination.port(), app).await;
    }
    if !on_egress(&config.outbound.egress, destination) {
        tracing::warn!(%destination, "destination is not in the mesh and not on the egress list: refused");
        context.flows.outbound_refused(
            sidewall_policies::wire::OutboundReason::NotInMesh,
            destination,
            destination.port(),
        );
        return Err("not_in_mesh");
    }
    metrics::counter!(crate::metric::EGRESS_CONNECTIONS).increment(1);
    let upstream = tokio::time::timeout(
        config.limits.connect_timeout.0,
        crate::transport::connect(destination, config.outbound.mark),
    )
    .await
    .map_err(|_| "egress_timeout")?
    .map_err(|_| "egress_unreachable")?;
    // Plain TCP on both sides: the bytes never enter the process.
    crate::transport::forward_spliced(app, upstream, config.limits.idle_timeout.0)
        .await
        .map_err(|_| "egress_error")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidewall_policies::snapshot::{
        Schema, ServiceEntry, ServicePort, Snapshot, SnapshotVersion,
    };

    fn service(name: &str, endpoint: &str, port: u16, addresses: &[&str]) -> ServiceEntry {
        ServiceEntry {
            identity: SpiffeId::parse(&format!("spiffe://example.org/ns/a/svc/{name}")).unwrap(),
            endpoints: vec![endpoint.into()],
            ports: vec![ServicePort {
                port,
                protocol: sidewall_policies::Protocol::Tcp,
                path_parameters: Default::default(),
            }],
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// Review H8: the first service listing a destination won, so a workload registering
    /// another's address (or an egress destination) captured its traffic. A destination claimed
    /// twice is refused instead.
    #[test]
    fn a_destination_claimed_twice_is_refused_not_first_match() {
        let active = |directory: Vec<ServiceEntry>| {
            crate::snapshot::Active::new(Snapshot {
                schema: Schema::default(),
                version: SnapshotVersion {
                    epoch: "t".into(),
                    counter: 1,
                },
                workload: SpiffeId::parse("spiffe://example.org/ns/a/svc/web").unwrap(),
                policies: Default::default(),
                trust_bundles: Default::default(),
                signing_ca: None,
                revocations: Default::default(),
                directory,
            })
        };
        let name = |r: Result<Option<SpiffeId>, &'static str>| {
            r.map(|id| id.map(|id| id.path().rsplit('/').next().unwrap().to_owned()))
        };
        let db = "10.0.0.7:5432".parse().unwrap();
        let vip = "10.96.0.10:80".parse().unwrap();
        let alone = active(vec![
            service("db", "10.0.0.7:4643", 5432, &[]),
            service("api", "10.0.0.2:4643", 80, &["10.96.0.10:80"]),
        ]);
        assert_eq!(name(resolve(&alone, &[], db)), Ok(Some("db".into())));
        assert_eq!(name(resolve(&alone, &[], vip)), Ok(Some("api".into())));
        assert_eq!(
            name(resolve(&alone, &[], "10.0.0.9:80".parse().unwrap())),
            Ok(None)
        );
        // An address that is also db's endpoint host and port.
        let squatted = active(vec![
            service("aaa", "10.0.0.3:4643", 9, &["10.0.0.7:5432"]),
            service("db", "10.0.0.7:4643", 5432, &[]),
        ]);
        assert_eq!(
            name(resolve(&squatted, &[], db)),
            Err("ambiguous_destination")
        );
        // An address that is also on the egress list, as IP:port or as an IP.
        for egress in ["10.96.0.10:80", "10.96.0.10"] {
            assert_eq!(
                name(resolve(&alone, &[egress.into()], vip)),
                Err("ambiguous_destination")
            );
        }
    }
}
