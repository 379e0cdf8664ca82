//! The control plane's configuration: a strict YAML file, then command-line flags on top.
//!
//! ```yaml
//! trustDomain: sidewall.local      # default sidewall.local
//! dataDir: ./sidewall-data         # default ./sidewall-data
//! listen: 127.0.0.1:4600           # mTLS API for proxies and operators
//! adminListen: 127.0.0.1:4690      # /live, /ready, /metrics only
//! uiListen: 127.0.0.1:4680         # read-only dashboard: shows policy and fleet data
//! certificates:
//!   workloadLifetime: 24h          # default 24h, at most 30d
//!   issuancePerMinute: 60          # per identity; default 60
//! tokens:
//!   maxTtl: 24h                    # cap on `token create --ttl`; default 24h, at most 30d
//! limits:
//!   requestTimeout: 10s            # TLS handshake, first request, request headers, body: each
//!   idleTimeout: 5m                # a connection with no request in flight; default 5m
//!   unauthenticatedPerSource: 64   # connections without a client certificate per address
//!   instancesPerIdentity: 1024     # sidecar processes (fleet rows, watches, registrations) per identity
//!   addressesPerIdentity: 64       # distinct extra addresses across one identity's registrations
//!   disconnectedRetention: 1h      # a sidecar disconnected this long leaves the fleet view
//! registrations:
//!   lease: 30s                     # a registration outlives its sidecar's watch by this; default 30s
//! audit:                           # the audit trail (docs/audit.md)
//!   checkpointInterval: 60s        # its head is signed this often when it moved
//!   retention: {maxRecords: 1000000, maxAge: 400d}   # optional; default: keep everything
//! detection:                       # alerts (see docs/detection.md); the defaults:
//!   window: 60s                    # denials and scanned paths are counted within this
//!   denials: 20                    # more denials of one peer at one target: denial_burst
//!   scanPaths: 10                  # this many paths no policy mentions denied: path_scan
//!   baseline: 1h                   # edges seen this long after start are normal; later: new_edge
//! attestation:                     # optional: sidecars may join with Kubernetes service-account
//!   kubernetes:                    # tokens (docs/control-plane.md#kubernetes-service-account-attestation)
//!     issuer: https://kubernetes.default.svc.cluster.local
//!     jwksFile: /etc/sidewall/k8s-jwks.json      # kubectl get --raw /openid/v1/jwks; or:
//!     # jwksUrl: https://kubernetes.default.svc/openid/v1/jwks   (or an OIDC discovery URL)
//!     # caFile: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
//!     # bearerTokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
//!     # tokenReviewUrl: https://kubernetes.default.svc   # optional: a TokenReview per token
//!     audience: sidewall           # default sidewall
//!     identity: /ns/{namespace}/svc/{serviceaccount}   # the default
//!     namespaces: [shop]           # default: any
//!     serviceAccounts: [shop/api]  # namespace/name; default: any in those namespaces
//! policiesDir: ./policies          # optional: watch this directory and apply it (GitOps)
//! serverNames: [cp.example.org]    # extra DNS names on the API certificate (for curl & co.)
//! ca:                              # optional: plug in your own CA (root key stays offline)
//!   rootCert: /etc/sidewall/root.pem
//!   intermediateCert: /etc/sidewall/intermediate.pem
//!   intermediateKey: /etc/sidewall/intermediate.key   # mode 0600
//! store: etcd://10.0.0.1:2379,10.0.0.2:2379  # default `embedded` (redb in dataDir)
//! etcd:                            # only with an etcd store
//!   prefix: /sidewall              # default /sidewall
//!   ca: /etc/sidewall/etcd-ca.pem  # TLS to etcd (then also cert + key for mutual TLS)
//!   cert: /etc/sidewall/etcd-client.pem
//!   key: /etc/sidewall/etcd-client.key
//!   user: sidewall                 # etcd authentication; password from passwordFile or
//!   passwordFile: /etc/sidewall/etcd-password  # $SIDEWALL_ETCD_PASSWORD
//! caKekFile: /etc/sidewall/ca.kek  # required with etcd: seals the CA keys stored there
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sidewall_policies::TrustDomain;
pub use sidewall_policies::policy::ConfigDuration;
use sidewall_policies::policy::format_duration;

use crate::attestation::kubernetes::{
    DEFAULT_AUDIENCE, DEFAULT_IDENTITY, KeySource, KubernetesConfig, TokenReview,
};
use crate::ca::PlugIn;
use crate::detection::DetectionConfig;

/// Longest workload certificate lifetime or token TTL that may be configured.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// The configuration file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    trust_domain: Option<TrustDomain>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    ui_listen: Option<SocketAddr>,
    #[serde(default)]
    certificates: CertificatesSection,
    #[serde(default)]
    tokens: TokensSection,
    ca: Option<PlugInSection>,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    registrations: RegistrationsSection,
    #[serde(default)]
    audit: AuditSection,
    #[serde(default)]
    detection: DetectionSection,
    #[serde(default)]
    attestation: AttestationSection,
    #[serde(default)]
    server_names: Vec<String>,
    policies_dir: Option<PathBuf>,
    store: Option<StoreUrl>,
    #[serde(default)]
    etcd: EtcdSection,
    ca_kek_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EtcdSection {
    prefix: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
}

/// `--store`: `embedded` or `etcd://HOST:PORT[,HOST:PORT...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The redb file in the data directory.
    Embedded,
    /// etcd members, `host:port` each.
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "embedded" {
            return Ok(Self::Embedded);
        }
        let Some(list) = text.strip_prefix("etcd://") else {
            return Err(format!(
                "store {text:?}: expected `embedded` or `etcd://HOST:PORT[,HOST:PORT...]`"
            ));
        };
        let mut endpoints = Vec::new();
        for endpoint in list.split(',') {
            let valid = endpoint.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid {
                return Err(format!(
                    "store {text:?}: {endpoint:?} is not HOST:PORT (etcd://HOST:PORT[,HOST:PORT...])"
                ));
            }
            endpoints.push(endpoint.to_owned());
        }
        Ok(Self::Etcd(endpoints))
    }
}

impl<'de> Deserialize<'de> for StoreUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StoreUrl;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`embedded` or `etcd://HOST:PORT[,HOST:PORT...]`")
            }
            // Checked inside the visitor so that the error carries the value's position.
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<StoreUrl, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// The etcd store's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix. Default is `/sidewall`.
    pub prefix: String,
    /// CA certificate (PEM) of the members' certificates: turns on TLS. Default: plain.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS. Default: none.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// User for etcd authentication. Default: none.
    pub user: Option<String>,
    /// Where the user's password is (`passwordFile`). Default: `$SIDEWALL_ETCD_PASSWORD`.
    pub password_file: Option<PathBuf>,
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The redb file `<dataDir>/store.redb` (the default).
    Embedded,
    /// etcd, for several replicas.
    Etcd(EtcdConfig),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LimitsSection {
    request_timeout: Option<ConfigDuration>,
    idle_timeout: Option<ConfigDuration>,
    unauthenticated_per_source: Option<usize>,
    instances_per_identity: Option<usize>,
    addresses_per_identity: Option<usize>,
    disconnected_retention: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RegistrationsSection {
    lease: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AuditSection {
    checkpoint_interval: Option<ConfigDuration>,
    #[serde(default)]
    retention: RetentionSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetentionSection {
    max_records: Option<u64>,
    max_age: Option<RetentionAge>,
}

/// `audit.retention.maxAge`: like other durations, but up to ten years (audit trails are kept
/// for a year or more).
#[derive(Debug)]
struct RetentionAge(Duration);

impl<'de> Deserialize<'de> for RetentionAge {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        sidewall_policies::policy::parse_duration_within(&text, Duration::from_secs(3653 * 86_400))
            .map(RetentionAge)
            .map_err(|_| {
                serde::de::Error::custom(format_args!(
                    "duration {text:?} must be like 24h, 90d or 400d, at most 3653d"
                ))
            })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AttestationSection {
    kubernetes: Option<KubernetesSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KubernetesSection {
    issuer: String,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    ca_file: Option<PathBuf>,
    bearer_token_file: Option<PathBuf>,
    token_review_url: Option<String>,
    audience: Option<String>,
    identity: Option<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
}

/// The `attestation.kubernetes` section, checked.
fn kubernetes(
    section: &KubernetesSection,
    trust_domain: &TrustDomain,
) -> Result<KubernetesConfig, ConfigError> {
    let bad = |what: &str| Err(ConfigError::Value(format!("attestation.kubernetes.{what}")));
    if section.issuer.trim().is_empty() {
        return bad("issuer must name the cluster's service-account issuer");
    }
    let keys = match (&section.jwks_file, &section.jwks_url) {
        (Some(path), None) => {
            let calls = section.token_review_url.is_some();
            if !calls && (section.ca_file.is_some() || section.bearer_token_file.is_some()) {
                return bad("caFile and bearerTokenFile go with jwksUrl or tokenReviewUrl");
            }
            KeySource::File(path.clone())
        }
        (None, Some(url)) => {
            if !url.starts_with("https://") || url.parse::<hyper::Uri>().is_err() {
                return bad(&format!(
                    "jwksUrl: {url:?} is not an https URL (the issuer's keys are fetched over HTTPS only)"
                ));
            }
            let Some(ca_file) = section.ca_file.clone() else {
                return bad(
                    "caFile: with jwksUrl, name the CA certificates the server is checked against \
                     (in a pod: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt)",
                );
            };
            KeySource::Url {
                url: url.clone(),
                ca_file,
                bearer_token_file: section.bearer_token_file.clone(),
            }
        }
        (Some(_), Some(_)) => return bad("give jwksFile or jwksUrl, not both"),
        (None, None) => {
            return bad(
                "jwksFile or jwksUrl: where the issuer's keys are (a JWKS file, or a JWKS or OIDC discovery URL)",
            );
        }
    };
    let token_review = match &section.token_review_url {
        None => None,
        Some(url) if !url.starts_with("https://") || url.parse::<hyper::Uri>().is_err() => {
            return bad(&format!(
                "tokenReviewUrl: {url:?} is not an https URL (the API server, e.g. https://kubernetes.default.svc)"
            ));
        }
        Some(url) => Some(TokenReview {
            url: url.clone(),
            ca_file: match &section.ca_file {
                Some(ca) => ca.clone(),
                None => {
                    return bad(
                        "caFile: with tokenReviewUrl, name the CA certificates the API server is checked against",
                    );
                }
            },
            bearer_token_file: section.bearer_token_file.clone(),
        }),
    };
    let config = KubernetesConfig {
        issuer: section.issuer.clone(),
        keys,
        token_review,
        audience: section
            .audience
            .clone()
            .unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned()),
        identity: section
            .identity
            .clone()
            .unwrap_or_else(|| DEFAULT_IDENTITY.to_owned()),
        namespaces: section.namespaces.clone(),
        service_accounts: section.service_accounts.clone(),
    };
    if config.audience.is_empty() {
        return bad("audience must not be empty");
    }
    if !config.identity.contains("{serviceaccount}") {
        return bad(
            "identity must contain {serviceaccount}, or every service account would share one identity",
        );
    }
    if let Err(error) = config.identity_of(trust_domain, "namespace", "serviceaccount") {
        return bad(&format!(
            "identity {:?} does not make a workload identity: {error}",
            config.identity
        ));
    }
    if let Some(odd) = config
        .service_accounts
        .iter()
        .find(|s| s.split('/').count() != 2)
    {
        return bad(&format!("serviceAccounts: {odd:?} is not namespace/name"));
    }
    Ok(config)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DetectionSection {
    window: Option<ConfigDuration>,
    denials: Option<u64>,
    scan_paths: Option<usize>,
    baseline: Option<ConfigDuration>,
}

/// `value` when it is within `range`, otherwise an error saying the setting's bounds.
fn within<T: PartialOrd>(
    value: T,
    range: std::ops::RangeInclusive<T>,
    bounds: &str,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Value(bounds.to_owned()))
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// The `detection` section, checked.
fn detection(section: &DetectionSection) -> Result<DetectionConfig, ConfigError> {
    let defaults = DetectionConfig::default();
    Ok(DetectionConfig {
        window: within(
            section.window.map_or(defaults.window, |d| d.0),
            SECOND..=Duration::from_secs(86_400),
            "detection.window must be between 1s and 24h",
        )?,
        denials: within(
            section.denials.unwrap_or(defaults.denials),
            1..=1_000_000,
            "detection.denials must be between 1 and 1000000",
        )?,
        scan_paths: within(
            section.scan_paths.unwrap_or(defaults.scan_paths),
            2..=10_000,
            "detection.scanPaths must be between 2 and 10000",
        )?,
        baseline: within(
            section.baseline.map_or(defaults.baseline, |d| d.0),
            SECOND..=MAX_LIFETIME,
            "detection.baseline must be between 1s and 30d",
        )?,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificatesSection {
    workload_lifetime: Option<ConfigDuration>,
    issuance_per_minute: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokensSection {
    max_ttl: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PlugInSection {
    root_cert: PathBuf,
    intermediate_cert: PathBuf,
    intermediate_key: PathBuf,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `--ui-listen`.
    pub ui_listen: Option<SocketAddr>,
    /// `--trust-domain`.
    pub trust_domain: Option<TrustDomain>,
    /// `--policies-dir`.
    pub policies_dir: Option<PathBuf>,
    /// `--store`.
    pub store: Option<StoreUrl>,
    /// `--etcd-prefix`.
    pub etcd_prefix: Option<String>,
    /// `--etcd-ca`.
    pub etcd_ca: Option<PathBuf>,
    /// `--etcd-cert`.
    pub etcd_cert: Option<PathBuf>,
    /// `--etcd-key`.
    pub etcd_key: Option<PathBuf>,
    /// `--etcd-user`.
    pub etcd_user: Option<String>,
    /// `--etcd-password-file`.
    pub etcd_password_file: Option<PathBuf>,
    /// `--ca-kek-file`.
    pub ca_kek_file: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The trust domain served. Default is `sidewall.local`.
    pub trust_domain: TrustDomain,
    /// Where the CA, the store and the operator credentials live. Default is `./sidewall-data`.
    pub data_dir: PathBuf,
    /// The mTLS API address. Default is `127.0.0.1:4600`.
    pub listen: SocketAddr,
    /// The probe and metrics address. Default is `127.0.0.1:4690`.
    pub admin_listen: SocketAddr,
    /// The read-only dashboard and its JSON (policy and fleet data: keep it on loopback or
    /// behind an authenticating proxy). Never the same as the admin or API address.
    /// Default is `127.0.0.1:4680`.
    pub ui_listen: SocketAddr,
    /// Lifetime of workload certificates. Default is 24 h, at most 30 days.
    pub workload_lifetime: Duration,
    /// Certificates issued per identity per minute before `429`. Default is 60.
    pub issuance_per_minute: u32,
    /// Longest join-token TTL. Default is 24 h, at most 30 days.
    pub token_max_ttl: Duration,
    /// Lifetime of operator credentials. Fixed at 90 days.
    pub operator_lifetime: Duration,
    /// Lifetime of the control plane's own serving certificate (renewed between 60 % and 75 %). 24 h.
    pub server_lifetime: Duration,
    /// A plugged-in CA, if configured.
    pub plug_in: Option<PlugIn>,
    /// How long a client may take for its TLS handshake, to start its first request, its
    /// request headers and its body, each. Default is 10 s.
    pub request_timeout: Duration,
    /// How long a connection may stay without a request in flight. Default is 5 min.
    pub idle_timeout: Duration,
    /// Connections without a client certificate one source address may hold. Default is 64.
    pub unauthenticated_per_source: usize,
    /// What one workload identity may hold in the control plane (review M4).
    pub identity_limits: crate::distribution::IdentityLimits,
    /// Detection's thresholds and windows.
    pub detection: DetectionConfig,
    /// Kubernetes service-account attestation, if configured.
    pub kubernetes: Option<KubernetesConfig>,
    /// DNS names added to the serving certificate beside its SPIFFE ID, so that ordinary
    /// HTTPS clients (curl) can verify it too. `localhost` and the listen IP are always added.
    pub server_names: Vec<String>,
    /// A directory of policy files to watch and apply (GitOps), if any.
    pub policies_dir: Option<PathBuf>,
    /// How long a registration outlives its sidecar's snapshot watch (closed, not reopened)
    /// before it is removed and its endpoint freed. Default is 30 s, at most 1 h.
    pub registration_lease: Duration,
    /// How often the audit trail's head is signed when records were added since the last
    /// signature (and at shutdown). Default is 60 s, from 1 s to 1 h.
    pub audit_checkpoint_interval: Duration,
    /// The audit trail keeps at most this many records (the oldest go first). Default: no
    /// limit; at least 10.
    pub audit_max_records: Option<u64>,
    /// The audit trail drops records older than this. Default: no limit; at least 1 h.
    pub audit_max_age: Option<Duration>,
    /// Where the state lives. Default is the embedded store.
    pub store: StoreConfig,
    /// The key-encryption key that seals the CA's keys in a replicated store (64 hex digits,
    /// not readable by others). Required with etcd; unused otherwise.
    pub ca_kek_file: Option<PathBuf>,
}

/// `limits.instancesPerIdentity`, `limits.addressesPerIdentity` and
/// `limits.disconnectedRetention`, checked.
fn identity_limits(
    limits: &LimitsSection,
) -> Result<crate::distribution::IdentityLimits, ConfigError> {
    let defaults = crate::distribution::IdentityLimits::default();
    Ok(crate::distribution::IdentityLimits {
        instances: within(
            limits.instances_per_identity.unwrap_or(defaults.instances),
            1..=100_000,
            "limits.instancesPerIdentity must be between 1 and 100000",
        )?,
        addresses: within(
            limits.addresses_per_identity.unwrap_or(defaults.addresses),
            1..=4096,
            "limits.addressesPerIdentity must be between 1 and 4096",
        )?,
        retention: within(
            limits
                .disconnected_retention
                .map_or(defaults.retention, |d| d.0),
            SECOND..=MAX_LIFETIME,
            "limits.disconnectedRetention must be between 1s and 30d",
        )?,
    })
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file does not parse or validate.
    #[error("{0}")]
    Invalid(#[from] sidewall_policies::load::LoadError),
    /// A value is out of range.
    #[error("{0}")]
    Value(String),
    /// The configuration asks for the etcd store, and this build does not have it.
    #[error("{ETCD_NOT_BUILT}")]
    EtcdNotBuilt,
}

/// What a build without the cargo feature `etcd` answers to `--store etcd://…`.
pub const ETCD_NOT_BUILT: &str = "this sidewall was built without the etcd store (cargo feature `etcd`): install protoc (`apt-get install protobuf-compiler libprotobuf-dev`) and build with `cargo install --path . --features etcd`, or use the image (scripts/image)";

impl Config {
    /// Reads the file (if any) and applies the overrides.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
                let name = path.display().to_string();
                let text = sidewall_policies::load::expand_variables(&name, &text, |variable| {
                    std::env::var(variable).ok()
                })?;
                sidewall_policies::load::config_from_yaml::<FileConfig>(&name, &text)?
            }
            None => FileConfig::default(),
        };
        Self::resolve(parsed, overrides)
    }

    fn resolve(file: FileConfig, overrides: Overrides) -> Result<Self, ConfigError> {
        let default_td =
            TrustDomain::new("sidewall.local").map_err(|e| ConfigError::Value(e.to_string()))?;
        let issuance_per_minute = file.certificates.issuance_per_minute.unwrap_or(60);
        if issuance_per_minute == 0 {
            return Err(ConfigError::Value(
                "certificates.issuancePerMinute must be at least 1".into(),
            ));
        }
        let listen = overrides
            .listen
            .or(file.listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 4600)));
        let admin_listen = overrides
            .admin_listen
            .or(file.admin_listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 4690)));
        let ui_listen = overrides
            .ui_listen
            .or(file.ui_listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 4680)));
        // The dashboard shows policy and fleet data; the admin address may be exposed to
        // probes, so the two must never share a socket (port 0 asks for a fresh port each).
        for (other, name) in [(admin_listen, "adminListen"), (listen, "listen")] {
            let same_ip = ui_listen.ip() == other.ip()
                || ui_listen.ip().is_unspecified()
                || other.ip().is_unspecified();
            if same_ip && ui_listen.port() == other.port() && ui_listen.port() != 0 {
                return Err(ConfigError::Value(format!(
                    "uiListen {ui_listen} must differ from {name}"
                )));
            }
        }
        let unauthenticated_per_source = file.limits.unauthenticated_per_source.unwrap_or(64);
        if unauthenticated_per_source == 0 {
            return Err(ConfigError::Value(
                "limits.unauthenticatedPerSource must be at least 1".into(),
            ));
        }
        let identity_limits = identity_limits(&file.limits)?;
        let detection = detection(&file.detection)?;
        let registration_lease = file
            .registrations
            .lease
            .map_or(Duration::from_secs(30), |d| d.0);
        if registration_lease < Duration::from_secs(1)
            || registration_lease > Duration::from_secs(3600)
        {
            return Err(ConfigError::Value(
                "registrations.lease must be between 1s and 1h".into(),
            ));
        }
        let audit_checkpoint_interval = file
            .audit
            .checkpoint_interval
            .map_or(Duration::from_secs(60), |d| d.0);
        if audit_checkpoint_interval < Duration::from_secs(1)
            || audit_checkpoint_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError::Value(
                "audit.checkpointInterval must be between 1s and 1h".into(),
            ));
        }
        let audit_max_records = file.audit.retention.max_records;
        if audit_max_records.is_some_and(|n| n < 10) {
            return Err(ConfigError::Value(
                "audit.retention.maxRecords must be at least 10".into(),
            ));
        }
        let audit_max_age = file.audit.retention.max_age.as_ref().map(|d| d.0);
        if audit_max_age.is_some_and(|d| d < Duration::from_secs(3600)) {
            return Err(ConfigError::Value(
                "audit.retention.maxAge must be at least 1h".into(),
            ));
        }
        let store = resolve_store(&file, &overrides)?;
        if matches!(store, StoreConfig::Etcd(_)) && !cfg!(feature = "etcd") {
            return Err(ConfigError::EtcdNotBuilt);
        }
        let ca_kek_file = overrides.ca_kek_file.clone().or(file.ca_kek_file.clone());
        if matches!(store, StoreConfig::Etcd(_)) && ca_kek_file.is_none() {
            return Err(ConfigError::Value(
                "the etcd store needs caKekFile (--ca-kek-file): the CA's keys are stored in etcd sealed with it; create one with `openssl rand -hex 32 > ca.kek && chmod 600 ca.kek` and give every replica the same file".into(),
            ));
        }
        let trust_domain = overrides
            .trust_domain
            .or(file.trust_domain)
            .unwrap_or(default_td);
        let kubernetes = file
            .attestation
            .kubernetes
            .as_ref()
            .map(|section| kubernetes(section, &trust_domain))
            .transpose()?;
        Ok(Self {
            store,
            ca_kek_file,
            trust_domain,
            data_dir: overrides
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("sidewall-data")),
            listen,
            admin_listen,
            ui_listen,
            workload_lifetime: file
                .certificates
                .workload_lifetime
                .map_or(Duration::from_secs(86_400), |d| d.0),
            issuance_per_minute,
            token_max_ttl: file
                .tokens
                .max_ttl
                .map_or(Duration::from_secs(86_400), |d| d.0),
            operator_lifetime: Duration::from_secs(90 * 86_400),
            server_lifetime: Duration::from_secs(86_400),
            request_timeout: file
                .limits
                .request_timeout
                .map_or(Duration::from_secs(10), |d| d.0),
            idle_timeout: file
                .limits
                .idle_timeout
                .map_or(Duration::from_secs(300), |d| d.0),
            unauthenticated_per_source,
            identity_limits,
            detection,
            kubernetes,
            server_names: file.server_names,
            policies_dir: overrides.policies_dir.or(file.policies_dir),
            registration_lease,
            audit_checkpoint_interval,
            audit_max_records,
            audit_max_age,
            plug_in: file.ca.map(|ca| PlugIn {
                root_cert: ca.root_cert,
                intermediate_cert: ca.intermediate_cert,
                intermediate_key: ca.intermediate_key,
            }),
        })
    }

    /// A one-line summary for the startup log.
    pub fn summary(&self) -> String {
        format!(
            "trust domain {}, data dir {}, api {}, admin {}, dashboard {}, workload certificates {}",
            self.trust_domain,
            self.data_dir.display(),
            self.listen,
            self.admin_listen,
            self.ui_listen,
            format_duration(self.workload_lifetime)
        )
    }
}

fn resolve_store(file: &FileConfig, overrides: &Overrides) -> Result<StoreConfig, ConfigError> {
    let url = overrides
        .store
        .clone()
        .or(file.store.clone())
        .unwrap_or(StoreUrl::Embedded);
    let endpoints = match url {
        StoreUrl::Embedded => return Ok(StoreConfig::Embedded),
        StoreUrl::Etcd(endpoints) => endpoints,
    };
    let prefix = overrides
        .etcd_prefix
        .clone()
        .or(file.etcd.prefix.clone())
        .unwrap_or_else(|| "/sidewall".into());
    let valid_prefix = prefix.starts_with('/')
        && prefix.len() > 1
        && !prefix.ends_with('/')
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b));
    if !valid_prefix {
        return Err(ConfigError::Value(format!(
            "etcd prefix {prefix:?} must start with `/`, not end with `/`, and use only a-z A-Z 0-9 / - _ ."
        )));
    }
    let cert = overrides.etcd_cert.clone().or(file.etcd.cert.clone());
    let key = overrides.etcd_key.clone().or(file.etcd.key.clone());
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(ConfigError::Value(
                "etcd cert and key (--etcd-cert, --etcd-key) go together".into(),
            ));
        }
    };
    Ok(StoreConfig::Etcd(EtcdConfig {
        endpoints,
        prefix,
        ca: overrides.etcd_ca.clone().or(file.etcd.ca.clone()),
        identity,
        user: overrides.etcd_user.clone().or(file.etcd.user.clone()),
        password_file: overrides
            .etcd_password_file
            .clone()
            .or(file.etcd.password_file.clone()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let file = sidewall_policies::load::config_from_yaml::<FileConfig>("cp.yaml", text)?;
        Config::resolve(file, Overrides::default())
    }

    #[test]
    fn defaults_and_values() {
        let config = parse("{}").unwrap();
        assert_eq!(config.trust_domain.as_str(), "sidewall.local");
        assert_eq!(config.listen.to_string(), "127.0.0.1:4600");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:4690");
        assert_eq!(config.ui_listen.to_string(), "127.0.0.1:4680");
        let config = parse("uiListen: 127.0.0.1:9000\n").unwrap();
        assert_eq!(config.ui_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(config.workload_lifetime, Duration::from_secs(86_400));
        let config =
            parse("trustDomain: example.org\ncertificates:\n  workloadLifetime: 1h\n").unwrap();
        assert_eq!(config.trust_domain.as_str(), "example.org");
        assert_eq!(config.workload_lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let cases = [
            (
                "trustDomain: Example.org\n",
                "cp.yaml:1:14: trustDomain: invalid trust domain",
            ),
            (
                "listen: nowhere\n",
                "cp.yaml:1:9: listen: invalid socket address syntax",
            ),
            (
                "certificates:\n  workloadLifetime: 31d\n",
                "cp.yaml:2:21: certificates.workloadLifetime: duration \"31d\"",
            ),
            ("lissen: 1.2.3.4:5\n", "cp.yaml:1:1: unknown field `lissen`"),
            (
                "uiListen: localhost\n",
                "cp.yaml:1:11: uiListen: invalid socket address syntax",
            ),
            (
                "uiListen: 0.0.0.0:4690\n",
                "uiListen 0.0.0.0:4690 must differ from adminListen",
            ),
            (
                "listen: 127.0.0.1:7000\nuiListen: 127.0.0.1:7000\n",
                "uiListen 127.0.0.1:7000 must differ from listen",
            ),
            (
                "audit: {checkpointInterval: 2h}\n",
                "audit.checkpointInterval must be between 1s and 1h",
            ),
            (
                "audit: {retention: {maxRecords: 3}}\n",
                "audit.retention.maxRecords must be at least 10",
            ),
            (
                "audit: {checkpointEvery: 1m}\n",
                "cp.yaml:1:9: audit: unknown field `checkpointEvery`",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}");
        }
        assert!(parse("certificates: {issuancePerMinute: 0}\n").is_err());
        let audit = parse("audit: {retention: {maxRecords: 1000000, maxAge: 400d}}\n").unwrap();
        assert_eq!(audit.audit_max_records, Some(1_000_000));
        assert_eq!(audit.audit_max_age, Some(Duration::from_secs(400 * 86_400)));
        assert_eq!(audit.audit_checkpoint_interval, Duration::from_secs(60));
    }

    #[test]
    fn store_choice() {
        assert_eq!(parse("{}").unwrap().store, StoreConfig::Embedded);
        let cases = [
            (
                "store: mysql://x\n",
                "cp.yaml:1:8: store: store \"mysql://x\": expected",
            ),
            (
                "store: etcd://a:2379,b\n",
                "cp.yaml:1:8: store: store \"etcd://a:2379,b\": \"b\" is not HOST:PORT",
            ),
            (
                "store: etcd://a:1\ncaKekFile: k\netcd: {prefix: sidewall}\n",
                "etcd prefix \"sidewall\" must start with `/`",
            ),
            (
                "store: etcd://a:1\ncaKekFile: k\netcd: {cert: c}\n",
                "etcd cert and key",
            ),
            (
                "etcd: {passwd: x}\n",
                "cp.yaml:1:8: etcd: unknown field `passwd`",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}");
        }
    }

    #[test]
    fn kubernetes_attestation() {
        assert_eq!(parse("{}").unwrap().kubernetes, None);
        let k = "attestation:\n  kubernetes:\n    issuer: https://k\n    jwksFile: /j\n";
        let config = parse(k).unwrap().kubernetes.unwrap();
        assert_eq!(
            (config.audience.as_str(), config.identity.as_str()),
            ("sidewall", "/ns/{namespace}/svc/{serviceaccount}")
        );
        let cases = [
            (
                "attestation: {kubernetes: {issuer: https://k}}\n",
                "attestation.kubernetes.jwksFile or jwksUrl: where the issuer's keys are",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, jwksUrl: 'https://k/j'}}\n",
                "give jwksFile or jwksUrl, not both",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksUrl: 'http://k/j', caFile: /c}}\n",
                "is not an https URL",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksUrl: 'https://k/j'}}\n",
                "attestation.kubernetes.caFile: with jwksUrl",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, caFile: /c}}\n",
                "caFile and bearerTokenFile go with jwksUrl or tokenReviewUrl",
            ),
            (
                "attestation: {kubernetes: {issuer: ' ', jwksFile: /j}}\n",
                "attestation.kubernetes.issuer must name",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, identity: '/ns/{namespace}/svc/api'}}\n",
                "attestation.kubernetes.identity must contain {serviceaccount}",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, identity: '/sidewall/{serviceaccount}'}}\n",
                "does not make a workload identity",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, serviceAccounts: [api]}}\n",
                "serviceAccounts: \"api\" is not namespace/name",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, audience: ''}}\n",
                "attestation.kubernetes.audience must not be empty",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let fetched = parse(
            "attestation: {kubernetes: {issuer: k, jwksUrl: 'https://kubernetes.default.svc/.well-known/openid-configuration', caFile: /c, bearerTokenFile: /t}}\n",
        )
        .unwrap()
        .kubernetes
        .unwrap();
        assert_eq!(fetched.token_review, None);
        let reviewed = parse(
            "attestation: {kubernetes: {issuer: k, jwksFile: /j, tokenReviewUrl: 'https://kubernetes.default.svc', caFile: /c}}\n",
        )
        .unwrap()
        .kubernetes
        .unwrap();
        assert_eq!(
            reviewed.token_review,
            Some(TokenReview {
                url: "https://kubernetes.default.svc".into(),
                ca_file: "/c".into(),
                bearer_token_file: None,
            })
        );
        for (text, expected) in [
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, tokenReviewUrl: 'https://k'}}\n",
                "caFile: with tokenReviewUrl",
            ),
            (
                "attestation: {kubernetes: {issuer: k, jwksFile: /j, tokenReviewUrl: 'http://k', caFile: /c}}\n",
                "tokenReviewUrl: \"http://k\" is not an https URL",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert_eq!(
            fetched.keys,
            KeySource::Url {
                url: "https://kubernetes.default.svc/.well-known/openid-configuration".into(),
                ca_file: "/c".into(),
                bearer_token_file: Some("/t".into()),
            }
        );
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_store() {
        let config = parse(
            "store: etcd://10.0.0.1:2379,etcd-2:2379\netcd: {prefix: /prod/sidewall}\ncaKekFile: /k\n",
        )
        .unwrap();
        let StoreConfig::Etcd(etcd) = config.store else {
            panic!("not etcd")
        };
        assert_eq!(etcd.endpoints, ["10.0.0.1:2379", "etcd-2:2379"]);
        assert_eq!(etcd.prefix, "/prod/sidewall");
        let error = parse("store: etcd://a:1\n").unwrap_err().to_string();
        assert!(
            error.starts_with("the etcd store needs caKekFile"),
            "{error}"
        );
    }

    /// A build without the feature refuses every etcd store, saying how to get one.
    #[cfg(not(feature = "etcd"))]
    #[test]
    fn etcd_store() {
        for text in ["store: etcd://a:1\n", "store: etcd://a:1\ncaKekFile: /k\n"] {
            let error = parse(text).unwrap_err().to_string();
            assert_eq!(error, ETCD_NOT_BUILT);
        }
    }
}
