//! `sidewall control-plane`: load and check the configuration, then bind and serve; its
//! `export` and `import` subcommands copy the whole state out of and into a store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sidewall_control_plane::config::{Config, Overrides, StoreUrl};
use sidewall_control_plane::server::{self, Listeners};
use sidewall_policies::TrustDomain;

/// Flags of `sidewall control-plane`; each overrides the same setting in the file. The
/// configuration and store flags also apply to `export` and `import`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    backup: Option<BackupCommand>,
    /// YAML configuration file (docs/control-plane.md describes every field).
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        env = "SIDEWALL_CONTROL_PLANE_CONFIG"
    )]
    config: Option<PathBuf>,
    /// Data directory: CA, store, operator credentials. [default: ./sidewall-data]
    #[arg(long, value_name = "DIR", env = "SIDEWALL_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// mTLS API address. [default: 127.0.0.1:4600]
    #[arg(long, value_name = "ADDR", env = "SIDEWALL_LISTEN")]
    listen: Option<SocketAddr>,
    /// Probe and metrics address (/live, /ready, /metrics). [default: 127.0.0.1:4690]
    #[arg(long, value_name = "ADDR", env = "SIDEWALL_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Read-only dashboard address (shows policy and fleet data; keep it on loopback or
    /// behind an authenticating proxy). [default: 127.0.0.1:4680]
    #[arg(long, value_name = "ADDR", env = "SIDEWALL_UI_LISTEN")]
    ui_listen: Option<SocketAddr>,
    /// Trust domain. [default: sidewall.local]
    #[arg(long, value_name = "TD", value_parser = parse_trust_domain, global = true, env = "SIDEWALL_TRUST_DOMAIN")]
    trust_domain: Option<TrustDomain>,
    /// Watch this directory of policy files and apply it whenever it is valid as a whole.
    #[arg(long, value_name = "DIR", env = "SIDEWALL_POLICIES_DIR")]
    policies_dir: Option<PathBuf>,
    /// Where the state lives: `embedded` (a file in the data directory) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` for several replicas. [default: embedded]
    #[arg(long, value_name = "URL", value_parser = parse_store, global = true, env = "SIDEWALL_STORE")]
    store: Option<StoreUrl>,
    /// Key prefix in etcd. [default: /sidewall]
    #[arg(
        long,
        value_name = "PREFIX",
        global = true,
        env = "SIDEWALL_ETCD_PREFIX"
    )]
    etcd_prefix: Option<String>,
    /// CA certificate (PEM) of the etcd members: talk TLS to etcd.
    #[arg(long, value_name = "FILE", global = true, env = "SIDEWALL_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with etcd (with --etcd-key).
    #[arg(long, value_name = "FILE", global = true, env = "SIDEWALL_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS with etcd.
    #[arg(long, value_name = "FILE", global = true, env = "SIDEWALL_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// etcd user; the password comes from --etcd-password-file or $SIDEWALL_ETCD_PASSWORD.
    #[arg(long, value_name = "USER", global = true, env = "SIDEWALL_ETCD_USER")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        env = "SIDEWALL_ETCD_PASSWORD_FILE"
    )]
    etcd_password_file: Option<PathBuf>,
    /// Key-encryption key (64 hex digits, not readable by others) that seals the CA's keys in etcd; the
    /// same file on every replica. Required with an etcd store.
    #[arg(long, value_name = "FILE", global = true, env = "SIDEWALL_CA_KEK_FILE")]
    ca_kek_file: Option<PathBuf>,
}

/// `export` and `import`.
#[derive(clap::Subcommand)]
enum BackupCommand {
    /// Write a consistent copy of the whole state (policy history, tokens, issued
    /// certificates, revocations, registrations, the audit trail; the CA with its keys sealed by
    /// --ca-kek-file) to a file. The embedded store must not be in use (stop the control
    /// plane); etcd is read live at one revision.
    Export {
        /// The backup file to write (mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup into a new, empty store (embedded or etcd), with the same
    /// --ca-kek-file it was exported with. Run it before the control plane starts.
    Import {
        /// The backup file to read.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
    },
}

fn parse_store(text: &str) -> Result<StoreUrl, String> {
    text.parse()
}

fn parse_trust_domain(text: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(text).map_err(|e| e.to_string())
}

pub(crate) fn run(args: Args) -> ExitCode {
    let overrides = Overrides {
        data_dir: args.data_dir,
        listen: args.listen,
        admin_listen: args.admin_listen,
        ui_listen: args.ui_listen,
        trust_domain: args.trust_domain,
        policies_dir: args.policies_dir,
        store: args.store,
        etcd_prefix: args.etcd_prefix,
        etcd_ca: args.etcd_ca,
        etcd_cert: args.etcd_cert,
        etcd_key: args.etcd_key,
        etcd_user: args.etcd_user,
        etcd_password_file: args.etcd_password_file,
        ca_kek_file: args.ca_kek_file,
    };
    // Configuration errors end here, before any port is bound.
    let config = match Config::load(args.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = args.backup {
        return backup(command, &config);
    }
    sidewall_proxy::process::raise_open_files_limit(
        sidewall_control_plane::server::MAX_CONNECTIONS as u64 + 256,
        "20000 API connections + 256",
    );
    let metrics =
        sidewall_proxy::process::install("control-plane", sidewall_control_plane::metric::describe);
    super::run_on(Some(2), serve(config, metrics))
}

fn backup(command: BackupCommand, config: &Config) -> ExitCode {
    super::block_on(async {
        match command {
            BackupCommand::Export { out } => {
                let backup = sidewall_control_plane::backup::export(config).await?;
                let json = serde_json::to_vec_pretty(&backup)?;
                sidewall_control_plane::ca::write_private(&out, &json, 0o600)?;
                let r = &backup.records;
                println!(
                    "exported {} policy versions, {} tokens, {} certificates, {} revocations, {} registrations, {} audit records and the CA (keys sealed) to {}",
                    r.policy_versions.len(),
                    r.tokens.len(),
                    r.certificates.len(),
                    r.revocations.len(),
                    r.registrations.len(),
                    r.audit.len(),
                    out.display()
                );
            }
            BackupCommand::Import { input } => {
                let text = std::fs::read(&input)
                    .with_context(|| format!("cannot read {}", input.display()))?;
                let backup = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not a Sidewall backup", input.display()))?;
                let r = sidewall_control_plane::backup::import(config, backup).await?;
                println!(
                    "imported {} policy versions, {} tokens, {} certificates, {} revocations, {} registrations, {} audit records and the CA",
                    r.policy_versions,
                    r.tokens,
                    r.certificates,
                    r.revocations,
                    r.registrations,
                    r.audit
                );
            }
        }
        anyhow::Ok(())
    })
}

async fn serve(
    config: Config,
    metrics: Option<sidewall_control_plane::metric::Render>,
) -> anyhow::Result<()> {
    tracing::info!("starting: {}", config.summary());
    // First, so that a signal during the start (the CA's creation among it) is a clean stop.
    let shutdown = sidewall_proxy::process::shutdown_signal();
    let (listen, admin_listen, ui_listen) = (config.listen, config.admin_listen, config.ui_listen);
    let prepared = server::prepare(config).await.context("cannot start")?;
    let api = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("cannot listen on {admin_listen}"))?;
    let ui = tokio::net::TcpListener::bind(ui_listen)
        .await
        .with_context(|| format!("cannot listen on {ui_listen}"))?;
    server::run(prepared, Listeners { api, admin, ui }, metrics, shutdown).await?;
    Ok(())
}
