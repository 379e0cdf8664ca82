//! Starting and running the control plane: everything that can fail because of configuration
//! happens in [`prepare`], before any port is bound; [`run`] takes bound listeners and a
//! shutdown future, so tests bind `127.0.0.1:0` and stop it when they like.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::api::{Api, Peer};
use crate::attestation::kubernetes::Kubernetes;
use crate::ca::rotation::{CaSet, KeyHome};
#[cfg(feature = "etcd")]
use crate::ca::sealed::{Kek, SealedCa, kek_path_required};
use crate::ca::{Authority, CaError, ca_dir, write_private};
#[cfg(feature = "etcd")]
use crate::config::EtcdConfig;
use crate::config::{Config, ConfigError, StoreConfig};
use crate::data_dir::{Record, bundle_path, operator_paths, record_path};
use crate::distribution::Distribution;
use crate::now_unix;
use crate::ratelimit::RateLimiter;
use crate::store::embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
use crate::store::etcd::{EtcdOptions, EtcdStore};
use crate::store::{Store, StoreError};
use crate::tls::{ClientRoots, ServingCertificate, TlsError, server_config};
use crate::{admin, ui};
use sidewall_policies::wire::operator::Role;

/// Most API connections at once.
pub const MAX_CONNECTIONS: usize = 20_000;

/// Why the control plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// CA files unusable.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Writing a file into the data directory failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The etcd settings are unusable.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The configuration cannot be served by this build (an etcd store without the feature).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A control plane ready to bind: CA loaded, store open, files written.
pub struct Prepared {
    api: Arc<Api>,
    certificate: Arc<ServingCertificate>,
    /// When to renew it first (Unix seconds).
    renew_at: i64,
    tls: Arc<rustls::ServerConfig>,
    roots: Arc<ClientRoots>,
}

/// Loads or creates the CA, opens the store, issues the serving certificate and, on first
/// start (or when it nears expiry), the `admin` operator credential.
pub async fn prepare(config: Config) -> Result<Prepared, StartError> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| StartError::Io(data_dir.clone(), e))?;
    let (ca, store, home): (Authority, Arc<dyn Store>, KeyHome) = match &config.store {
        StoreConfig::Embedded => (
            Authority::load_or_create(
                &ca_dir(&data_dir),
                &config.trust_domain,
                config.plug_in.as_ref(),
            )?,
            Arc::new(EmbeddedStore::open(&crate::data_dir::store_path(
                &data_dir,
            ))?),
            KeyHome::Files(ca_dir(&data_dir)),
        ),
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(etcd) => {
            let store = EtcdStore::connect(&etcd_options(etcd)?).await?;
            let (ca, kek) = shared_ca(&config, &store).await?;
            (ca, Arc::new(store), KeyHome::Sealed(Arc::new(kek)))
        }
        // `Config::load` refuses it already; a configuration built in code ends here.
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => return Err(ConfigError::EtcdNotBuilt.into()),
    };
    let first_bundle = ca.trust_bundle_pem().to_owned();
    // Once a rotation has begun, its record says which CAs are in force.
    let ca = match store.ca_record().await? {
        Some((record, _)) => CaSet::from_record(&config.trust_domain, record, &home)?,
        None => CaSet::single(ca),
    };
    metrics::gauge!(crate::metric::CA_STAGE).set(crate::api::ca::stage_gauge(ca.stage()));
    write_files(&data_dir, &ca)?;
    ensure_operator(&ca, store.as_ref(), &data_dir, config.operator_lifetime).await?;
    let (certificate, issued) =
        ServingCertificate::new(&ca, config.server_lifetime, &server_names(&config))?;
    let renew_at = renewal_at(&issued);
    let certificate = Arc::new(certificate);
    let roots = Arc::new(ClientRoots::new(&ca)?);
    let tls = Arc::new(server_config(roots.clone(), certificate.clone())?);
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(0);
    // Embedded, counters continue above every earlier process's; with etcd they are its
    // revisions, the same on every replica.
    store.reserve_counters(now_ms).await?;
    let distribution = Arc::new(
        Distribution::new(
            store.epoch().await?,
            ca.trust_domain().clone(),
            first_bundle,
            store.load().await?,
            store.replicated(),
        )
        .with_limits(config.identity_limits)
        .with_detection(config.detection),
    );
    let kubernetes = config
        .kubernetes
        .clone()
        .map(|k| Kubernetes::new(k, config.trust_domain.clone()))
        .transpose()
        .map_err(|e| ConfigError::Value(format!("attestation.kubernetes.jwksFile: {e}")))?;
    // (A URL source is fetched once serving: `refresh_issuer_keys`.)
    let api = Arc::new(Api {
        kubernetes,
        refusals: crate::audit::Refusals::default(),
        certificate: certificate.clone(),
        reports: tokio::sync::Mutex::new(()),
        limiter: RateLimiter::new(config.issuance_per_minute),
        store,
        ca_set: crate::ca::rotation::CaCell::new(ca),
        ca_keys: home,
        config,
        distribution,
    });
    Ok(Prepared {
        api,
        certificate,
        renew_at,
        tls,
        roots,
    })
}

/// Reads the files the etcd settings name (certificates, password) into client options.
#[cfg(feature = "etcd")]
pub(crate) fn etcd_options(etcd: &EtcdConfig) -> Result<EtcdOptions, StartError> {
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| StartError::Io(path.clone(), e));
    let password = match (&etcd.user, &etcd.password_file) {
        (None, _) => None,
        (Some(_), Some(path)) => Some(
            String::from_utf8_lossy(&read(path)?)
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (Some(user), None) => Some(std::env::var("SIDEWALL_ETCD_PASSWORD").map_err(|_| {
            StartError::Etcd(format!(
                "user {user} needs a password: --etcd-password-file or $SIDEWALL_ETCD_PASSWORD"
            ))
        })?),
    };
    Ok(EtcdOptions {
        endpoints: etcd.endpoints.clone(),
        prefix: etcd.prefix.clone(),
        ca_pem: etcd.ca.as_ref().map(read).transpose()?,
        identity_pem: match &etcd.identity {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        },
        user: etcd.user.clone().zip(password),
    })
}

/// The CA every replica shares: opened from etcd with the key-encryption key, or, on the very
/// first start, taken from the configuration or data directory (or generated), sealed and
/// stored there (the first replica to store one wins a race).
#[cfg(feature = "etcd")]
async fn shared_ca(config: &Config, store: &EtcdStore) -> Result<(Authority, Kek), StartError> {
    let kek = Kek::load(kek_path_required(config.ca_kek_file.as_ref())?)?;
    let sealed = match store.sealed_ca().await? {
        Some(sealed) => sealed,
        None => {
            let material = Authority::initial_material(
                &ca_dir(&config.data_dir),
                &config.trust_domain,
                config.plug_in.as_ref(),
            )?;
            let sealed = SealedCa::seal(&material, &config.trust_domain, &kek)?;
            store.create_sealed_ca(sealed.to_json()).await?
        }
    };
    let material = SealedCa::from_json(&sealed)?.open(&config.trust_domain, &kek)?;
    Ok((
        Authority::from_material(&config.trust_domain, &material)?,
        kek,
    ))
}

/// Writes the CA set's trust bundle (and the roots rotations retired, if any) into the data
/// directory, where the CLI reads them.
fn write_files(data_dir: &Path, ca: &CaSet) -> Result<(), StartError> {
    write_private(
        &bundle_path(data_dir),
        ca.trust_bundle_pem().as_bytes(),
        0o644,
    )?;
    let retired = ca.retired_pem();
    if !retired.is_empty() {
        write_private(
            &crate::data_dir::retired_roots_path(data_dir),
            retired.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// The DNS names and IPs on the serving certificate: `localhost`, the listen IP (when it is
/// specific) and the configured names.
fn server_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        advertised(config.listen).ip().to_string(),
    ];
    names.extend(config.server_names.iter().cloned());
    names.dedup();
    names
}

/// Writes `operators/admin.{pem,key}` unless an admin credential with more than a third of
/// its lifetime left is there already, and records a new one in the store.
async fn ensure_operator(
    ca: &CaSet,
    store: &dyn Store,
    data_dir: &Path,
    lifetime: Duration,
) -> Result<(), StartError> {
    let (cert_path, key_path) = operator_paths(data_dir, "admin");
    if let Ok(pem) = std::fs::read(&cert_path)
        && let Ok(der) =
            <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
                &pem,
            )
        && let Ok(svid) =
            sidewall_policies::svid::Svid::from_der(&der, sidewall_policies::svid::Usage::Client)
        && svid.remaining(now_unix()) > lifetime / 3
        // One written before roles is replaced.
        && crate::ca::operator_role(&der) == Some(Role::Admin)
        // So is one from a CA that no longer signs (a rotation's activate stage).
        && String::from_utf8_lossy(&pem).contains(ca.signing().intermediate_pem().trim())
    {
        return Ok(());
    }
    let dir = crate::data_dir::operators_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| StartError::Io(dir.clone(), e))?;
    let id = ca
        .trust_domain()
        .id("/sidewall/operator/admin")
        .map_err(|e| StartError::Io(cert_path.clone(), std::io::Error::other(e)))?;
    let key = rcgen::KeyPair::generate().map_err(CaError::from)?;
    let issued = ca.issue_operator(
        &id,
        &rcgen::PublicKeyData::subject_public_key_info(&key),
        lifetime,
        Role::Admin,
    )?;
    store
        .put_certificate(issued.record(
            "control-plane",
            Some(Role::Admin),
            "ECDSA P-256",
            &ca.root_fingerprint(),
        ))
        .await?;
    let event = crate::audit::AuditEvent::new("control-plane", "operator.issued", id.as_str())
        .with("role", Role::Admin)
        .with("serial", &issued.serial);
    if let Err(error) = store.append_audit(event, now_unix()).await {
        metrics::counter!(crate::metric::AUDIT_FAILURES, "action" => "operator.issued")
            .increment(1);
        tracing::error!(%error, "audit record not appended; the change stands");
    }
    write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert_path, issued.chain_pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), "wrote the admin operator credential");
    Ok(())
}

/// The bound sockets.
pub struct Listeners {
    /// The mTLS API.
    pub api: TcpListener,
    /// `/live`, `/ready`, `/metrics`.
    pub admin: TcpListener,
    /// The read-only dashboard and its JSON ([`crate::ui`]).
    pub ui: TcpListener,
}

/// Serves until `shutdown` resolves, then stops accepting and gives open requests a few
/// seconds to finish.
pub async fn run(
    prepared: Prepared,
    listeners: Listeners,
    metrics: Option<crate::metric::Render>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let Prepared {
        api,
        certificate,
        renew_at,
        tls,
        roots,
    } = prepared;
    let api_addr = listeners
        .api
        .local_addr()
        .map_err(|e| StartError::Io("api listener".into(), e))?;
    let data_dir = api.config.data_dir.clone();
    let record = Record {
        api_url: format!("https://{}", advertised(api_addr)),
        trust_domain: api.ca().trust_domain().to_string(),
        pid: std::process::id(),
    };
    api.distribution.set_replica(record.api_url.clone());
    let record_json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    write_private(&record_path(&data_dir), &record_json, 0o644)?;
    tracing::info!(api = %api_addr, admin = ?listeners.admin.local_addr().ok(), dashboard = ?listeners.ui.local_addr().ok(), "control plane serving");
    // The configuration's hash: every setting after defaults and flags, so a restart with a
    // changed configuration shows in the trail.
    let settings = format!("{:?}", api.config);
    api.audit(
        crate::audit::AuditEvent::new("control-plane", "control-plane.started", &record.api_url)
            .with("version", env!("CARGO_PKG_VERSION"))
            .with(
                "config_sha256",
                crate::random::sha256_hex(settings.as_bytes()),
            )
            // The CA in use: a plugged-in one or the one this control plane made, by its root.
            .with(
                "ca",
                if api.config.plug_in.is_some() {
                    "plug-in"
                } else {
                    "generated"
                },
            )
            .with("ca_root_sha256", api.ca().root_fingerprint()),
    )
    .await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let checkpoints = tokio::spawn(sign_audit_trail(
        api.clone(),
        certificate.clone(),
        stop_rx.clone(),
    ));
    let rollups = tokio::spawn(keep_rollups(api.clone(), stop_rx.clone()));
    let issuer_keys = tokio::spawn(refresh_issuer_keys(api.clone(), stop_rx.clone()));
    let shared_runs = api
        .store
        .replicated()
        .then(|| tokio::spawn(follow_shared_runs(api.clone(), stop_rx.clone())));
    let ca_follower = tokio::spawn(follow_ca(
        api.clone(),
        certificate.clone(),
        roots,
        stop_rx.clone(),
    ));
    let renewal = tokio::spawn(renew_serving_certificate(
        api.clone(),
        certificate,
        renew_at,
        stop_rx.clone(),
    ));
    let admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        metrics,
        api.config.request_timeout,
        stop_rx.clone(),
    ));
    let expiry = tokio::spawn(crate::api::distribution::expire_unclaimed(
        api.clone(),
        crate::api::now_unix(),
    ));
    // The dashboard gets the distribution state only (never the store, the CA or the API),
    // so nothing it serves can reach a token or a key.
    let ui_task = tokio::spawn(ui::serve(
        listeners.ui,
        ui::Dashboard::new(api.distribution.clone(), api.config.server_names.clone()),
        stop_rx.clone(),
    ));
    // Distribution follows the store's change feed; a replica publishes its summary.
    let follow_task = tokio::spawn(api.store.follow(api.distribution.clone(), stop_rx.clone()));
    let publish_task = tokio::spawn(api.store.publish(api.distribution.clone(), stop_rx.clone()));
    let policies_task = api
        .config
        .policies_dir
        .clone()
        .map(|dir| tokio::spawn(crate::gitops::watch(api.clone(), dir, stop_rx.clone())));
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Arc::new(crate::connection::Sources::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listeners.api.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                metrics::counter!(crate::metric::ACCEPT_ERRORS, "listener" => "api").increment(1);
                tracing::warn!(%error, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small request/response exchanges (acks, snapshots): no Nagle delay.
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "reason" => "limit").increment(1);
            continue;
        };
        let acceptor = acceptor.clone();
        let api = api.clone();
        let sources = sources.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = api.config.request_timeout;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    let reason = sidewall_policies::svid::io_failure_label(&error);
                    metrics::counter!(crate::metric::TLS_HANDSHAKE_FAILURES, "reason" => reason)
                        .increment(1);
                    tracing::info!(%remote, reason, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics::counter!(crate::metric::TLS_HANDSHAKE_FAILURES, "reason" => "timeout")
                        .increment(1);
                    return;
                }
            };
            let certificates = tls.get_ref().1.peer_certificates();
            let svid = sidewall_policies::svid::peer_svid(
                certificates,
                sidewall_policies::svid::Usage::Client,
            );
            // Read only from operators' certificates (the API checks who is one).
            let role = svid
                .as_ref()
                .filter(|s| s.id.path().starts_with(crate::api::OPERATOR_PATH))
                .and_then(|_| crate::ca::operator_role(certificates?.first()?));
            let peer = Arc::new(Peer {
                remote: Some(remote),
                svid,
                role,
            });
            // Clients without a certificate (joining sidecars, the public trust bundle): a
            // few connections per source address.
            let _counted = if peer.svid.is_none() {
                match sources.admit(remote.ip(), api.config.unauthenticated_per_source) {
                    Some(counted) => Some(counted),
                    None => {
                        metrics::counter!(crate::metric::CONNECTIONS_REFUSED, "reason" => "unauthenticated_per_source").increment(1);
                        tracing::info!(%remote, "connection without a client certificate refused: too many from this address");
                        return;
                    }
                }
            } else {
                None
            };
            let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            crate::connection::serve(api, tls, http2, peer, watcher).await;
        });
    }
    let _ = stop_tx.send(true);
    // Long-lived snapshot watches would hold the graceful shutdown open: end them now (the
    // sidecars reconnect, to this replica when it is back or to another one).
    api.distribution.close_watches();
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open requests did not finish within 5 s");
    }
    renewal.abort();
    let _ = checkpoints.await;
    let _ = rollups.await;
    let _ = issuer_keys.await;
    let _ = ca_follower.await;
    if let Some(task) = shared_runs {
        let _ = task.await;
    }
    let _ = expiry.await;
    let _ = admin_task.await;
    let _ = ui_task.await;
    if let Some(task) = policies_task {
        let _ = task.await;
    }
    let _ = publish_task.await;
    let _ = follow_task.await;
    // Connection tasks still finishing hold the API (and through it the store's file lock);
    // wait for them so that a restart in the same process can open the store again.
    let deadline =
        tokio::time::Instant::now() + api.config.request_timeout + Duration::from_secs(1);
    while Arc::strong_count(&api) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// The address to advertise: a wildcard bind is advertised as loopback.
fn advertised(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = if addr.is_ipv4() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

/// When to renew a serving certificate issued now: between 60 % and 75 % of its lifetime, at
/// a point fixed by its serial, as sidecars do, so replicas started together do not renew
/// together.
fn renewal_at(issued: &crate::ca::Issued) -> i64 {
    let now = now_unix();
    let not_after = issued
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(now, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    sidewall_policies::svid::renewal_point(now, not_after, &issued.serial)
}

/// Re-issues the serving certificate at `renew_at` (Unix seconds), and each new one at its own
/// [`renewal_at`]; a failure is retried a minute later.
/// Signs the audit trail's head every `audit.checkpointInterval` when it moved, and once more
/// when the control plane stops ([`crate::audit::checkpoint`]). It signs only a trail that
/// verifies whole (links, hashes, every earlier checkpoint) and still holds the record it signed
/// last: a trail changed in the store is left unsigned, which `sidewall audit verify` reports.
async fn sign_audit_trail(
    api: Arc<Api>,
    certificate: Arc<ServingCertificate>,
    mut stop: watch::Receiver<bool>,
) {
    let actor = api
        .ca()
        .trust_domain()
        .id(crate::tls::CONTROL_PLANE_PATH)
        .map(|id| id.to_string())
        .unwrap_or_default();
    let mut signed: Option<(u64, String)> = None;
    let interval = api.config.audit_checkpoint_interval;
    let mut since = tokio::time::Instant::now();
    loop {
        // At least once a minute: the refused registrations folded in it are recorded then.
        let stopping = tokio::select! {
            () = tokio::time::sleep(interval.min(Duration::from_secs(60))) => false,
            _ = stop.changed() => true,
        };
        if let Some(event) = api.refusals.flush(stopping) {
            api.audit(event).await;
        }
        let unchanged = match prune_audit_trail(&api, &actor).await {
            Ok(unchanged) => unchanged,
            Err(error) => {
                metrics::counter!(crate::metric::AUDIT_FAILURES, "action" => crate::audit::PRUNED)
                    .increment(1);
                tracing::error!(%error, "the audit trail is not cut to its retention");
                None
            }
        };
        if !stopping && since.elapsed() < interval {
            continue;
        }
        since = tokio::time::Instant::now();
        match sign_head(&api, &actor, &certificate, signed.as_ref(), unchanged).await {
            Ok(Some(head)) => signed = Some(head),
            Ok(None) => {}
            Err(error) => {
                metrics::counter!(crate::metric::AUDIT_FAILURES, "action" => crate::audit::CHECKPOINT).increment(1);
                tracing::error!(%error, "the audit trail is not signed");
            }
        }
        if stopping {
            return;
        }
    }
}

/// Fetches the service-account issuer's keys when they come from a URL
/// (`attestation.kubernetes.jwksUrl`): at start, every 5 minutes, and when a token names a key
/// the set lacks (the issuer rotated its key); after a failure again 5 s later, doubling up to
/// a minute. A failure keeps the last good keys.
/// With a replicated store: installs the segmentation test another replica started, once a
/// second at most after it was stored, so that the sidecars connected here get their probes
/// ([`crate::distribution::SharedRun`]). A failed read is retried at the next tick.
async fn follow_shared_runs(api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    let own = api.distribution.replica().to_owned();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        match api.store.shared_run().await {
            Ok(Some(run)) if run.replica != own => {
                let id = run.verification.id.clone();
                if api.distribution.install_shared_run(run, now_unix()) {
                    tracing::info!(
                        id,
                        "segmentation verification started at another replica: ordering the probes of the sidecars connected here"
                    );
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "reading the shared segmentation test failed"),
        }
    }
}

/// Follows the CA rotation record through the store's change feed: when it changes (a stage
/// taken here or on another replica), opens the CA set it describes and puts it in force: the
/// API's signing CA and client roots, a serving certificate from the newest CA, the data
/// directory's trust bundle and, when the signing CA changed, a new `admin` credential.
async fn follow_ca(
    api: Arc<Api>,
    certificate: Arc<ServingCertificate>,
    roots: Arc<ClientRoots>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = api.distribution.subscribe();
    loop {
        let (record, _) = api.distribution.ca();
        if record.is_some() && record.as_ref() != api.ca().record() {
            match put_ca_in_force(&api, &certificate, &roots, record).await {
                Ok(stage) => tracing::info!(stage, "CA set changed: now in force"),
                Err(error) => {
                    metrics::counter!(crate::metric::CA_FOLLOW_FAILURES).increment(1);
                    tracing::error!(%error, "the CA rotation record cannot be put in force; the CA set in force stays");
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Opens the CA set `record` describes and puts it in force; returns its stage.
pub(crate) async fn put_ca_in_force(
    api: &Api,
    certificate: &ServingCertificate,
    roots: &ClientRoots,
    record: Option<crate::ca::rotation::CaRecord>,
) -> Result<&'static str, StartError> {
    let Some(record) = record else {
        return Ok(api.ca().stage().as_str());
    };
    let set = CaSet::from_record(&api.config.trust_domain, record, &api.ca_keys)?;
    roots.set(&set)?;
    let (key, _) =
        ServingCertificate::issue(&set, api.config.server_lifetime, &server_names(&api.config))?;
    let stage = set.stage().as_str();
    let data_dir = &api.config.data_dir;
    write_files(data_dir, &set)?;
    ensure_operator(
        &set,
        api.store.as_ref(),
        data_dir,
        api.config.operator_lifetime,
    )
    .await?;
    metrics::gauge!(crate::metric::CA_STAGE).set(crate::api::ca::stage_gauge(set.stage()));
    api.ca_set.replace(set);
    certificate.replace(key);
    Ok(stage)
}

async fn refresh_issuer_keys(api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    let Some(kubernetes) = api.kubernetes.as_ref().filter(|k| k.fetches_keys()) else {
        return;
    };
    let mut backoff = Duration::from_secs(5);
    let mut held = 0;
    loop {
        let fetched_at = tokio::time::Instant::now();
        let wait = match kubernetes.fetch_keys().await {
            Ok(keys) => {
                metrics::counter!(crate::metric::ISSUER_KEY_FETCHES, "result" => "fetched")
                    .increment(1);
                if keys != held {
                    tracing::info!(keys, "service-account issuer keys fetched");
                }
                held = keys;
                backoff = Duration::from_secs(5);
                crate::attestation::kubernetes::REFRESH
            }
            Err(error) => {
                metrics::counter!(crate::metric::ISSUER_KEY_FETCHES, "result" => "failed")
                    .increment(1);
                tracing::warn!(%error, "service-account issuer keys not fetched; the last good ones stay");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = kubernetes.keys_wanted() => {
                // However many tokens name an unknown key, one fetch per NUDGE_EVERY.
                let soonest = fetched_at + crate::attestation::kubernetes::NUDGE_EVERY;
                tokio::select! {
                    () = tokio::time::sleep_until(soonest) => {}
                    _ = stop.changed() => return,
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// How often this process writes what its sidecars reported to its daily roll-ups.
const ROLLUP_INTERVAL: Duration = Duration::from_secs(60);
/// How long roll-ups are kept when `audit.retention.maxAge` is not set: 400 days, over the
/// year of history PCI DSS 10.5.1 asks for.
const ROLLUP_RETENTION: Duration = Duration::from_secs(400 * 86_400);

/// Writes this process's flow roll-ups ([`crate::distribution::rollups`]) to the store once a
/// minute and when the control plane stops, and removes the days past their retention
/// (`audit.retention.maxAge`, or 400 days) once an hour.
async fn keep_rollups(api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    let mut pruned: Option<tokio::time::Instant> = None;
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(ROLLUP_INTERVAL) => false,
            _ = stop.changed() => true,
        };
        if let Err(error) = api.distribution.write_rollups(api.store.as_ref()).await {
            tracing::warn!(%error, "flow roll-ups not written; they are kept for the next attempt");
        }
        if stopping {
            return;
        }
        if pruned.is_some_and(|at| at.elapsed() < Duration::from_secs(3600)) {
            continue;
        }
        pruned = Some(tokio::time::Instant::now());
        let keep = api.config.audit_max_age.unwrap_or(ROLLUP_RETENTION);
        let oldest = now_unix().saturating_sub(i64::try_from(keep.as_secs()).unwrap_or(i64::MAX));
        match api
            .store
            .prune_rollups(crate::distribution::rollups::day_of(oldest))
            .await
        {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "flow roll-ups past their retention removed"),
            Err(error) => tracing::warn!(%error, "flow roll-ups past their retention not removed"),
        }
    }
}

/// The whole trail, page by page.
pub(crate) async fn read_trail(
    api: &Api,
) -> Result<Vec<sidewall_policies::wire::operator::AuditRecord>, String> {
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .store
            .audit_records(after, crate::api::AUDIT_PAGE)
            .await
            .map_err(|e| format!("cannot read it: {e}"))?;
        let full = page.len() == crate::api::AUDIT_PAGE;
        after = page.last().map_or(after, |(key, _)| *key);
        records.extend(page.into_iter().map(|(_, record)| record));
        if !full {
            return Ok(records);
        }
    }
}

/// Cuts the oldest records past `audit.retention` (a trail that verifies only: a cut would hide
/// a break), recording the cut first as an `audit.pruned` record that names the last record
/// removed and its hash, so the trail still verifies from the first record kept. It cuts
/// below the limit by a tenth (at least five records), so that its own record and the next
/// checkpoint do not cut again. The trail as read when nothing was cut (so that signing need
/// not read it again).
async fn prune_audit_trail(
    api: &Api,
    actor: &str,
) -> Result<Option<Vec<sidewall_policies::wire::operator::AuditRecord>>, String> {
    let (max_records, max_age) = (api.config.audit_max_records, api.config.audit_max_age);
    if max_records.is_none() && max_age.is_none() {
        return Ok(None);
    }
    let records = read_trail(api).await?;
    let mut cut = 0;
    if let Some(max) = max_records.and_then(|m| usize::try_from(m).ok())
        && records.len() > max
    {
        let keep = max - (max / 10).max(5);
        cut = records.len() - keep;
    }
    if let Some(age) = max_age {
        let oldest = now_unix() - i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        cut = cut.max(records.iter().take_while(|r| r.time < oldest).count());
    }
    // The newest record always stays: the cut's own record links to it.
    let cut = cut.min(records.len().saturating_sub(1));
    let Some(last) = cut.checked_sub(1).and_then(|i| records.get(i)) else {
        return Ok(Some(records));
    };
    crate::audit::verify(&records).map_err(|e| format!("it does not verify: {e}"))?;
    let event = crate::audit::AuditEvent::new(actor, crate::audit::PRUNED, last.seq.to_string())
        .with("hash", &last.hash)
        .with("records", cut);
    api.store
        .append_audit(event, now_unix())
        .await
        .map_err(|e| format!("cannot record the cut: {e}"))?;
    let removed = api
        .store
        .prune_audit(last.seq)
        .await
        .map_err(|e| format!("cannot cut it: {e}"))?;
    tracing::info!(
        through = last.seq,
        removed,
        "audit trail cut to its retention"
    );
    Ok(None)
}

/// One look at the trail (`read`, if the caller has just read it; read here otherwise): signs
/// its head if it moved and the whole trail verifies. The record signed, if any.
async fn sign_head(
    api: &Api,
    actor: &str,
    certificate: &ServingCertificate,
    last: Option<&(u64, String)>,
    read: Option<Vec<sidewall_policies::wire::operator::AuditRecord>>,
) -> Result<Option<(u64, String)>, String> {
    let records = match read {
        Some(records) => records,
        None => read_trail(api).await?,
    };
    let Some(head) = records
        .last()
        .filter(|r| r.action != crate::audit::CHECKPOINT)
    else {
        return Ok(None);
    };
    let ca = api.ca();
    crate::audit::verify(&records)
        .and_then(|_| {
            crate::audit::verify_checkpoints(
                &records,
                ca.trust_domain(),
                &ca.history_bundle_pem(),
                0,
                i64::MAX,
            )
        })
        .map_err(|e| format!("it does not verify: {e}"))?;
    if let Some((seq, hash)) = last
        && *seq >= crate::audit::first(&records)
        && !records.iter().any(|r| r.seq == *seq && r.hash == *hash)
    {
        return Err(format!(
            "record {seq}, signed by this control plane, is no longer in the store as it was"
        ));
    }
    let time = now_unix();
    let event =
        crate::audit::checkpoint(actor, ca.trust_domain(), head, time, &certificate.current())?;
    let covered = (head.seq, head.hash.clone());
    api.audit_at(event, time).await;
    tracing::info!(seq = covered.0, hash = %covered.1, "audit trail signed");
    Ok(Some(covered))
}

async fn renew_serving_certificate(
    api: Arc<Api>,
    certificate: Arc<ServingCertificate>,
    mut renew_at: i64,
    mut stop: watch::Receiver<bool>,
) {
    let lifetime = api.config.server_lifetime;
    loop {
        let wait = Duration::from_secs(u64::try_from(renew_at - now_unix()).unwrap_or(0));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        match ServingCertificate::issue(&api.ca(), lifetime, &server_names(&api.config)) {
            Ok((key, issued)) => {
                certificate.replace(key);
                renew_at = renewal_at(&issued);
                tracing::info!(serial = %issued.serial, renew_at, "renewed the control plane's certificate");
            }
            Err(error) => {
                renew_at = now_unix() + 60;
                tracing::error!(%error, "renewing the control plane's certificate failed; retrying in a minute")
            }
        }
    }
}
