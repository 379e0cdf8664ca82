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
//!   requestTimeout: 10s            # TLS handshake, request headers, body: each; default 10s
//! policiesDir: ./policies          # optional: watch this directory and apply it (GitOps)
//! serverNames: [cp.example.org]    # extra DNS names on the API certificate (for curl & co.)
//! ca:                              # optional: plug in your own CA (root key stays offline)
//!   rootCert: /etc/sidewall/root.pem
//!   intermediateCert: /etc/sidewall/intermediate.pem
//!   intermediateKey: /etc/sidewall/intermediate.key   # mode 0600
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sidewall_policies::TrustDomain;
pub use sidewall_policies::policy::ConfigDuration;
use sidewall_policies::policy::format_duration;

use crate::ca::PlugIn;

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
    server_names: Vec<String>,
    policies_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LimitsSection {
    request_timeout: Option<ConfigDuration>,
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
    /// Lifetime of the control plane's own serving certificate (renewed at 70 %). 24 h.
    pub server_lifetime: Duration,
    /// A plugged-in CA, if configured.
    pub plug_in: Option<PlugIn>,
    /// How long a client may take for its TLS handshake, its request headers and its body,
    /// each. Default is 10 s.
    pub request_timeout: Duration,
    /// DNS names added to the serving certificate beside its SPIFFE ID, so that ordinary
    /// HTTPS clients (curl) can verify it too. `localhost` and the listen IP are always added.
    pub server_names: Vec<String>,
    /// A directory of policy files to watch and apply (GitOps), if any.
    pub policies_dir: Option<PathBuf>,
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
}

impl Config {
    /// Reads the file (if any) and applies the overrides.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
                sidewall_policies::load::config_from_yaml::<FileConfig>(
                    &path.display().to_string(),
                    &text,
                )?
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
        Ok(Self {
            trust_domain: overrides
                .trust_domain
                .or(file.trust_domain)
                .unwrap_or(default_td),
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
            server_names: file.server_names,
            policies_dir: overrides.policies_dir.or(file.policies_dir),
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
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}");
        }
        assert!(parse("certificates: {issuancePerMinute: 0}\n").is_err());
    }
}
