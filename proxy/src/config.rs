//! The sidecar's configuration: one strict YAML file (`sidewall proxy --config FILE`).
//!
//! ```yaml
//! identity: spiffe://example.org/ns/shop/svc/api
//! controlPlane:
//!   urls: [https://127.0.0.1:4600]  # tried in order
//!   tokenFile: ./api.token          # used until the first certificate is saved
//!   # or, on Kubernetes, the pod's projected service-account token (audience sidewall), read
//!   # at every join, with the SHA-256 of the CA root to pin (a join token carries its own):
//!   # serviceAccountTokenFile: /var/run/secrets/sidewall/token
//!   # caFingerprint: 3b5f…(64 hex digits)
//!   # pod: ${POD_NAME}              # named in the request: a token of another pod is refused
//!   watchKeepalive: 15s             # keep-alive asked of the watch; 3 missed = dead, next URL
//! stateDir: ./state/api             # certificate, key (0600), trust bundle
//! inbound:
//!   listen: 0.0.0.0:4643            # mTLS from peer sidecars
//!   advertise: 10.0.0.7:4643        # what other sidecars dial (default: listen, if specific)
//!   addresses: [10.96.0.10:8080]    # extra addresses clients may dial for this service
//!   ports:                          # the app ports behind this sidecar
//!     - {port: 8080, protocol: tcp, app: 127.0.0.1:8080}
//!     - {port: 9090, protocol: http, app: 127.0.0.1:9090, appProtocol: http2}  # h2c to the app
//!     - {port: 8081, protocol: http, app: 127.0.0.1:8081, pathParameters: strip}  # apps using ;jsessionid
//! outbound:
//!   transparent: {listen: 127.0.0.1:4640}   # transparent mode (with `sidewall iptables`)
//!   egress: [203.0.113.7:443]       # plaintext destinations outside the mesh, allowed through
//!   sidecarConnections: shared      # or perConnection: one mTLS connection per app connection
//!   routes:                         # local ports that lead to other services
//!     - {listen: 127.0.0.1:7001, service: spiffe://example.org/ns/shop/svc/db, port: 5432}
//! admin:
//!   listen: 127.0.0.1:4691
//! # Without `local`, snapshots come from the control plane. With it, from local files:
//! local:                            # (re-read when they change)
//!   policies: [./policies]
//!   directory:
//!     - {identity: spiffe://example.org/ns/shop/svc/db, endpoints: [127.0.0.1:5643], ports: [{port: 5432, protocol: tcp}]}
//! workerThreads: 2
//! limits: {maxConnections: 10000, maxHandshakes: 1024, handshakesPerSource: 256, handshakeTimeout: 10s, connectTimeout: 5s, idleTimeout: 1h, drainTimeout: 30s, keepalive: 10s}
//! tls: {allowTls12: false}
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sidewall_policies::http::PathParameters;
pub use sidewall_policies::policy::ConfigDuration;
use sidewall_policies::{Protocol, SpiffeId};

/// Where the control plane is and how to join it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlPlaneConfig {
    /// API URLs, `https://host:port`, tried in order.
    pub urls: Vec<String>,
    /// A file holding the join token, used until the first certificate is saved.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Instead of a join token: the pod's projected Kubernetes service-account token, read
    /// at every join (the kubelet rotates it).
    #[serde(default)]
    pub service_account_token_file: Option<PathBuf>,
    /// The SHA-256 of the CA root (64 hex digits), pinned on first contact when joining with
    /// a service-account token.
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
    /// The pod this sidecar runs in, named when joining with a service-account token.
    #[serde(default)]
    pub pod: Option<String>,
    /// How often the control plane sends a keep-alive line on an idle snapshot watch (1 s to
    /// 60 s); a watch silent for three of them is taken for dead and the next URL is tried.
    /// Default is 15 s.
    #[serde(default = "default_watch_keepalive")]
    pub watch_keepalive: ConfigDuration,
}

fn default_watch_keepalive() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(15))
}

/// One app port behind the sidecar.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundPort {
    /// The service port peers ask for.
    pub port: u16,
    /// How the port is served. Default is `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the app listens (normally loopback).
    pub app: SocketAddr,
    /// Also accept plaintext from workloads without a sidecar on this port (transparent mode
    /// only): unauthenticated, not authorized, logged and counted; the peer identity header is
    /// still stripped. Default is false: plaintext is refused.
    #[serde(default)]
    pub permissive: bool,
    /// How the sidecar talks to the app on an HTTP port: `http1` (default; keep-alive
    /// connections) or `http2` (cleartext HTTP/2 with prior knowledge, one multiplexed
    /// connection). Peers may use either version; the sidecar translates.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// HTTP ports only: `refuse` (default) answers `400` to a path with `;` parameters;
    /// `strip` removes them before the path is matched and forwarded, for apps that use them
    /// (a segment `..;` is refused either way). Registered, so client sidecars know.
    #[serde(default)]
    pub path_parameters: PathParameters,
}

/// The HTTP version the sidecar speaks to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext, prior knowledge (h2c without upgrade).
    Http2,
}

/// The inbound side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundConfig {
    /// The mTLS listener. Default is `0.0.0.0:4643`.
    #[serde(default = "default_inbound")]
    pub listen: SocketAddr,
    /// The app ports.
    #[serde(default)]
    pub ports: Vec<InboundPort>,
    /// The address other sidecars dial, registered with the control plane. Default: `listen`
    /// when it is a specific address.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Extra addresses clients may dial for this service (a virtual IP), registered as well.
    #[serde(default)]
    pub addresses: Vec<String>,
}

fn default_inbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4643))
}

/// One explicit outbound route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// The local address the app connects to.
    pub listen: SocketAddr,
    /// The service it leads to.
    pub service: SpiffeId,
    /// The service port.
    pub port: u16,
}

/// The outbound side.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundConfig {
    /// Explicit routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Transparent mode: the listener `sidewall iptables install` redirects the app's
    /// outbound TCP to. Off unless set.
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
    /// Plaintext destinations outside the mesh the app may reach in transparent mode
    /// (`IP:PORT`, or `IP` for any port). Everything else outside the mesh is refused.
    #[serde(default)]
    pub egress: Vec<String>,
    /// A socket mark (SO_MARK) set on every connection the sidecar opens, so that
    /// `sidewall iptables install --proxy-mark MARK` exempts them. Needs CAP_NET_ADMIN.
    #[serde(default)]
    pub mark: Option<u32>,
    /// How the app's connections to other services' TCP ports travel to their sidecars:
    /// `shared` (default: as streams of one long-lived mTLS connection per service, no
    /// handshake per app connection) or `perConnection` (an mTLS connection each).
    #[serde(default)]
    pub sidecar_connections: SidecarConnections,
}

/// How app connections to TCP ports are carried between sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SidecarConnections {
    /// Streams of one long-lived connection per service (ALPN `sidewall-mux/1`).
    #[default]
    Shared,
    /// One mTLS connection per app connection (ALPN `sidewall-l4/1`).
    PerConnection,
}

/// The transparent outbound listener.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TransparentConfig {
    /// Where redirected connections arrive. Default is `127.0.0.1:4640`.
    #[serde(default = "default_transparent")]
    pub listen: SocketAddr,
}

fn default_transparent() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4640))
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminConfig {
    /// Address of `/live`, `/ready`, `/metrics`, `/config`. Default is `127.0.0.1:4691`.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4691))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

/// A directory entry in a local snapshot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalService {
    /// The service identity.
    pub identity: SpiffeId,
    /// Its sidecars' inbound endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Its ports and protocols.
    #[serde(default)]
    pub ports: Vec<LocalPort>,
}

/// A port of a service in a local directory.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalPort {
    /// The port.
    pub port: u16,
    /// Its protocol. Default is `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// What its sidecar does with `;` path parameters (see [`InboundPort::path_parameters`]).
    #[serde(default)]
    pub path_parameters: PathParameters,
}

/// A snapshot built from local files instead of the control plane's distribution.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalConfig {
    /// Policy files or directories (re-read when they change).
    pub policies: Vec<PathBuf>,
    /// The services this sidecar may call.
    #[serde(default)]
    pub directory: Vec<LocalService>,
}

/// Limits and timeouts.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    /// Authenticated inbound connections (and app connections carried on shared ones) at
    /// most, and, separately, outbound connections at most. Default is 10,000 each.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Inbound connections not yet authenticated (TLS handshake and port header under way) at
    /// most. Default is 1,024.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Of those, from one source address at most. Default is 256.
    #[serde(default = "default_handshakes_per_source")]
    pub handshakes_per_source: usize,
    /// TLS handshake plus the port header. Default is 10 s.
    #[serde(default = "default_handshake")]
    pub handshake_timeout: ConfigDuration,
    /// Connecting to an app or a peer sidecar. Default is 5 s.
    #[serde(default = "default_connect")]
    pub connect_timeout: ConfigDuration,
    /// A connection with no bytes either way for this long is closed. Default is 1 h.
    #[serde(default = "default_idle")]
    pub idle_timeout: ConfigDuration,
    /// On SIGTERM, open connections get this long to finish. Default is 30 s.
    #[serde(default = "default_drain")]
    pub drain_timeout: ConfigDuration,
    /// A shared connection to a peer sidecar is pinged this often, and closed (with every app
    /// connection it carries) when a ping is not answered within it. Default is 10 s.
    #[serde(default = "default_keepalive")]
    pub keepalive: ConfigDuration,
}

fn default_max_connections() -> usize {
    10_000
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_handshakes_per_source() -> usize {
    256
}
fn default_handshake() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_connect() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}
fn default_idle() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(3600))
}
fn default_keepalive() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_drain() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_handshakes: default_max_handshakes(),
            handshakes_per_source: default_handshakes_per_source(),
            handshake_timeout: default_handshake(),
            connect_timeout: default_connect(),
            idle_timeout: default_idle(),
            drain_timeout: default_drain(),
            keepalive: default_keepalive(),
        }
    }
}

/// TLS options.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsOptions {
    /// Also accept and offer TLS 1.2 (TLS 1.3 only by default).
    #[serde(default)]
    pub allow_tls12: bool,
}

/// The whole sidecar configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// This workload's identity.
    pub identity: SpiffeId,
    /// The control plane.
    pub control_plane: ControlPlaneConfig,
    /// Where the certificate, key and trust bundle are kept.
    pub state_dir: PathBuf,
    /// Inbound mTLS.
    pub inbound: InboundConfig,
    /// Outbound routes.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The snapshot from local files.
    #[serde(default)]
    pub local: Option<LocalConfig>,
    /// Runtime worker threads. Default is 2.
    #[serde(default = "default_workers")]
    pub worker_threads: usize,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// TLS options.
    #[serde(default)]
    pub tls: TlsOptions,
}

fn default_workers() -> usize {
    2
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// It does not parse.
    #[error("{0}")]
    Invalid(#[from] sidewall_policies::load::LoadError),
    /// A value is out of range or inconsistent.
    #[error("{file}: {message}")]
    Value {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates a file. Relative paths in it are taken relative to the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let name = path.display().to_string();
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_text(&name, &text, base, |variable| std::env::var(variable).ok())
    }

    /// Parses and validates the text of a file named `name` (for messages), with `${VAR}`
    /// references looked up by `lookup` and relative paths taken relative to `base`.
    pub fn from_text(
        name: &str,
        text: &str,
        base: &Path,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = sidewall_policies::load::expand_variables(name, text, lookup)?;
        let mut config: Config = sidewall_policies::load::config_from_yaml(name, &text)?;
        config.resolve_paths(base);
        config.validate().map_err(|message| ConfigError::Value {
            file: name.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.state_dir);
        if let Some(token) = &mut self.control_plane.token_file {
            fix(token);
        }
        if let Some(token) = &mut self.control_plane.service_account_token_file {
            fix(token);
        }
        if let Some(local) = &mut self.local {
            local.policies.iter_mut().for_each(fix);
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.identity.is_reserved() {
            return Err(format!(
                "identity {} is reserved for the system",
                self.identity
            ));
        }
        if self.control_plane.urls.is_empty() {
            return Err("controlPlane.urls: give at least one https:// URL".into());
        }
        let cp = &self.control_plane;
        if cp.token_file.is_some() && cp.service_account_token_file.is_some() {
            return Err("controlPlane: give tokenFile or serviceAccountTokenFile, not both".into());
        }
        if cp.service_account_token_file.is_some()
            && !cp.ca_fingerprint.as_deref().is_some_and(|f| {
                f.len() == 64 && f.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
        {
            return Err("controlPlane.caFingerprint: with serviceAccountTokenFile, give the SHA-256 of the CA root as 64 lowercase hex digits (`sidewall ca fingerprint` on the control plane's machine, or the last part of a join token)".into());
        }
        for url in &self.control_plane.urls {
            if !url.starts_with("https://") {
                return Err(format!(
                    "controlPlane.urls: {url:?} must start with https://"
                ));
            }
        }
        let mut ports = std::collections::HashSet::new();
        for port in &self.inbound.ports {
            if port.port == 0 || !ports.insert(port.port) {
                return Err(format!(
                    "inbound.ports: port {} is zero or listed twice",
                    port.port
                ));
            }
            if !port.path_parameters.is_refuse() && port.protocol != Protocol::Http {
                return Err(format!(
                    "inbound.ports: port {} has pathParameters, which needs protocol: http",
                    port.port
                ));
            }
            if port.app_protocol == AppProtocol::Http2 && port.protocol != Protocol::Http {
                return Err(format!(
                    "inbound.ports: port {} has appProtocol: http2, which needs protocol: http",
                    port.port
                ));
            }
        }
        if self.local.is_none()
            && self.inbound.advertise.is_none()
            && self.inbound.listen.ip().is_unspecified()
        {
            return Err(format!(
                "inbound.advertise: the inbound listener {} is a wildcard address; say which address other sidecars should dial",
                self.inbound.listen
            ));
        }
        for address in &self.inbound.addresses {
            if address.parse::<SocketAddr>().is_err() {
                return Err(format!("inbound.addresses: {address:?} must be IP:PORT"));
            }
        }
        for entry in &self.outbound.egress {
            let valid =
                entry.parse::<SocketAddr>().is_ok() || entry.parse::<std::net::IpAddr>().is_ok();
            if !valid {
                return Err(format!("outbound.egress: {entry:?} must be IP:PORT or IP"));
            }
        }
        if self.inbound.ports.iter().any(|p| p.permissive) {
            tracing::warn!(
                "inbound ports marked permissive accept plaintext without authentication"
            );
        }
        let keepalive = self.control_plane.watch_keepalive.0;
        if keepalive < Duration::from_secs(1) || keepalive > Duration::from_secs(60) {
            return Err("controlPlane.watchKeepalive must be from 1s to 60s".into());
        }
        let keepalive = self.limits.keepalive.0;
        if keepalive < Duration::from_secs(1) || keepalive > Duration::from_secs(300) {
            return Err("limits.keepalive must be from 1s to 300s".into());
        }
        if !(1..=64).contains(&self.worker_threads) {
            return Err("workerThreads must be from 1 to 64".into());
        }
        if self.limits.max_connections == 0 {
            return Err("limits.maxConnections must be at least 1".into());
        }
        if self.limits.max_handshakes == 0 || self.limits.handshakes_per_source == 0 {
            return Err(
                "limits.maxHandshakes and limits.handshakesPerSource must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The inbound port entry for a service port.
    pub fn inbound_port(&self, port: u16) -> Option<&InboundPort> {
        self.inbound.ports.iter().find(|p| p.port == port)
    }
}
