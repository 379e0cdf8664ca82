//! Kubernetes service-account attestation: a sidecar presents the projected service-account
//! token the kubelet mounted for its pod (audience `sidewall`), and the control plane checks it
//! offline against the cluster's issuer keys (a JWKS file, re-read when it changes, or fetched
//! from the issuer over HTTPS every 5 minutes and when a token names a key it lacks: [`fetch`]): the
//! signature with an asymmetric algorithm the key allows, the issuer, the audience, the expiry
//! and not-before, and the `kubernetes.io` claims. The namespace and service account become the
//! workload identity by a template; an operator may restrict which ones may attest.
//!
//! No call to the cluster is made: a token is as good as its signature until it expires (the
//! kubelet's are short-lived and bound to their pod). docs/control-plane.md#kubernetes-service-account-attestation says what that trades.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sidewall_policies::{SpiffeId, TrustDomain};

use super::workload_identity;

mod fetch;

/// How often fetched keys are fetched again.
pub const REFRESH: Duration = Duration::from_secs(300);
/// Fetches a token naming an unknown key may cause: at most one in this long.
pub const NUDGE_EVERY: Duration = Duration::from_secs(10);

/// Where the issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS file (`kubectl get --raw /openid/v1/jwks`), re-read when it changes.
    File(PathBuf),
    /// Fetched over HTTPS: a JWKS URL, or the issuer's OIDC discovery document (a URL ending
    /// in `/.well-known/openid-configuration`) whose `jwks_uri` is then fetched.
    Url {
        /// The URL.
        url: String,
        /// The CA certificates the server is checked against.
        ca_file: PathBuf,
        /// A bearer token to present (re-read on every fetch), if the server wants one.
        bearer_token_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "jwksFile {}", path.display()),
            Self::Url { url, .. } => write!(f, "jwksUrl {url}"),
        }
    }
}

/// The identity template's default: Sidewall's workload form, the service account as service.
pub const DEFAULT_IDENTITY: &str = "/ns/{namespace}/svc/{serviceaccount}";

/// The audience a token must be for, by default.
pub const DEFAULT_AUDIENCE: &str = "sidewall";

/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY: u64 = 30;

/// The signature algorithms accepted: asymmetric only (a shared-secret HS* or `none` never).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// `attestation.kubernetes.tokenReviewUrl`: the API server that confirms each token (the pod
/// still exists, the token is not revoked) before a certificate is issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReview {
    /// The API server's base URL (`https://kubernetes.default.svc`).
    pub url: String,
    /// The CA certificates it is checked against.
    pub ca_file: PathBuf,
    /// The control plane's own token (it needs `tokenreviews/create`), re-read every call.
    pub bearer_token_file: Option<PathBuf>,
}

/// The `attestation.kubernetes` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The service-account issuer (`--service-account-issuer` of the API server).
    pub issuer: String,
    /// Where the issuer's public keys come from.
    pub keys: KeySource,
    /// A TokenReview after the offline checks, if configured.
    pub token_review: Option<TokenReview>,
    /// The audience tokens must carry. Default is `sidewall`.
    pub audience: String,
    /// The identity's path, with `{namespace}` and `{serviceaccount}`.
    pub identity: String,
    /// Namespaces that may attest; empty: any.
    pub namespaces: Vec<String>,
    /// Service accounts (`namespace/name`) that may attest; empty: any in those namespaces.
    pub service_accounts: Vec<String>,
}

impl KubernetesConfig {
    /// The identity of service account `name` in `namespace`.
    pub fn identity_of(
        &self,
        trust_domain: &TrustDomain,
        namespace: &str,
        name: &str,
    ) -> Result<SpiffeId, String> {
        let path = self
            .identity
            .replace("{namespace}", namespace)
            .replace("{serviceaccount}", name);
        let id = trust_domain.id(&path).map_err(|e| e.to_string())?;
        workload_identity(&id).map_err(str::to_owned)?;
        Ok(id)
    }
}

/// Why a service-account token is refused. Each has a stable code for the API and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceAccountError {
    /// This control plane has no `attestation.kubernetes`.
    #[error(
        "service-account attestation is not configured on this control plane (attestation.kubernetes)"
    )]
    NotConfigured,
    /// Not a JWT.
    #[error("the service-account token is not a JWT")]
    Malformed,
    /// `none`, a shared-secret algorithm, or one the key is not for.
    #[error(
        "the service-account token is signed with {0}, which is not accepted (asymmetric RS, PS or ES only)"
    )]
    Algorithm(String),
    /// No issuer key with the token's key id.
    #[error(
        "no key of the issuer has the token's key id {0:?} (are the issuer's keys current? see attestation.kubernetes and the control plane's log)"
    )]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the service-account token's signature does not verify")]
    Signature,
    /// Another issuer.
    #[error("the service-account token is from another issuer (expected {0})")]
    Issuer(String),
    /// Not for this audience.
    #[error("the service-account token is not for audience {0:?} (project one with that audience)")]
    Audience(String),
    /// Past its expiry.
    #[error("the service-account token has expired")]
    Expired,
    /// Before its not-before.
    #[error("the service-account token is not valid yet")]
    NotYetValid,
    /// A claim is missing or of the wrong shape.
    #[error("the service-account token lacks {0}")]
    Claims(String),
    /// The namespace or service account may not attest here.
    #[error("{0} may not attest here (attestation.kubernetes.namespaces / serviceAccounts)")]
    NotAllowed(String),
    /// The API server's TokenReview says the token is not (or no longer) valid.
    #[error("the API server refused the service-account token: {0}")]
    ReviewRefused(String),
    /// The TokenReview could not be made.
    #[error(
        "the service-account token could not be reviewed by the API server, so it is refused: {0}"
    )]
    ReviewUnavailable(String),
    /// The token is bound to another pod than the one asking.
    #[error("the service-account token belongs to pod {token}, not to pod {asking}")]
    OtherPod {
        /// The pod in the token.
        token: String,
        /// The pod the request names.
        asking: String,
    },
}

impl ServiceAccountError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured => "sa_attestation_off",
            Self::Malformed => "sa_token_malformed",
            Self::Algorithm(_) => "sa_token_algorithm",
            Self::UnknownKey(_) => "sa_token_key_unknown",
            Self::Signature => "sa_token_signature",
            Self::Issuer(_) => "sa_token_issuer",
            Self::Audience(_) => "sa_token_audience",
            Self::Expired => "sa_token_expired",
            Self::NotYetValid => "sa_token_not_yet_valid",
            Self::Claims(_) => "sa_token_claims",
            Self::NotAllowed(_) => "sa_not_allowed",
            Self::OtherPod { .. } => "sa_token_other_pod",
            Self::ReviewRefused(_) => "sa_token_review_refused",
            Self::ReviewUnavailable(_) => "sa_token_review_unavailable",
        }
    }
}

/// What a valid token attests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// The workload identity it maps to.
    pub identity: SpiffeId,
    /// Its namespace.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
    /// The pod it is bound to, if any.
    pub pod: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<Named>,
    pod: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// The issuer keys, as last read, and when the file was.
struct Keys {
    modified: Option<SystemTime>,
    set: Arc<JwkSet>,
}

/// The validator: the settings and the issuer's keys.
pub struct Kubernetes {
    config: KubernetesConfig,
    trust_domain: TrustDomain,
    keys: Mutex<Keys>,
    /// Woken when a token names a key the set lacks (fetched keys only).
    wanted: tokio::sync::Notify,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn read_keys(path: &Path) -> Result<(Option<SystemTime>, JwkSet), String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a JWKS document: {e}", path.display()))?;
    if set.keys.is_empty() {
        return Err(format!("{}: the JWKS has no key", path.display()));
    }
    Ok((modified, set))
}

impl Kubernetes {
    /// Reads the issuer's keys from a file (fails when it is not a JWKS with at least one
    /// key); fetched keys start empty, for [`Kubernetes::fetch_keys`].
    pub fn new(config: KubernetesConfig, trust_domain: TrustDomain) -> Result<Self, String> {
        let (modified, set) = match &config.keys {
            KeySource::File(path) => read_keys(path)?,
            KeySource::Url { .. } => (None, JwkSet { keys: Vec::new() }),
        };
        Ok(Self {
            config,
            trust_domain,
            keys: Mutex::new(Keys {
                modified,
                set: Arc::new(set),
            }),
            wanted: tokio::sync::Notify::new(),
        })
    }

    /// Whether the keys are fetched (and [`Kubernetes::fetch_keys`] must be run).
    pub fn fetches_keys(&self) -> bool {
        matches!(self.config.keys, KeySource::Url { .. })
    }

    /// Fetches the issuer's keys and puts them in place; a failure keeps the last good ones.
    /// The number of keys.
    pub async fn fetch_keys(&self) -> Result<usize, String> {
        let set = fetch::keys(&self.config.keys).await?;
        let count = set.keys.len();
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).set = Arc::new(set);
        Ok(count)
    }

    /// Resolves when a token named a key the fetched set lacks.
    pub async fn keys_wanted(&self) {
        self.wanted.notified().await;
    }

    /// The keys, re-read first if the file changed. A file that became unreadable or invalid
    /// keeps the last good keys (and says so in the log).
    fn keys(&self) -> Arc<JwkSet> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let KeySource::File(path) = &self.config.keys else {
            return keys.set.clone();
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != keys.modified {
            match read_keys(path) {
                Ok((modified, set)) => {
                    tracing::info!(path = %path.display(), keys = set.keys.len(), "service-account issuer keys re-read");
                    *keys = Keys {
                        modified,
                        set: Arc::new(set),
                    };
                }
                Err(error) => {
                    tracing::warn!(%error, "service-account issuer keys not re-read; the last good ones stay");
                    keys.modified = modified;
                }
            }
        }
        keys.set.clone()
    }

    /// A token named a key the set lacks (the issuer may have rotated its key): fetched keys
    /// are fetched again, at most once every [`NUDGE_EVERY`] however many tokens ask.
    fn nudge(&self) {
        if self.fetches_keys() {
            self.wanted.notify_one();
        }
    }

    /// With `tokenReviewUrl`: asks the API server whether `token`, which passed the offline
    /// checks as `attested`, is still valid, and for whom; refused unless it says yes for the
    /// same service account (and pod). Without it: nothing to ask.
    pub async fn review(
        &self,
        token: &str,
        attested: &Attested,
    ) -> Result<(), ServiceAccountError> {
        let Some(review) = &self.config.token_review else {
            return Ok(());
        };
        let status = fetch::review(review, token.trim(), &self.config.audience)
            .await
            .map_err(ServiceAccountError::ReviewUnavailable)?;
        if !status.authenticated {
            return Err(ServiceAccountError::ReviewRefused(
                if status.error.is_empty() {
                    "not authenticated".to_owned()
                } else {
                    status.error.chars().take(200).collect()
                },
            ));
        }
        let expected = format!(
            "system:serviceaccount:{}:{}",
            attested.namespace, attested.service_account
        );
        if status.user.username != expected {
            return Err(ServiceAccountError::ReviewRefused(format!(
                "it names {:?}, not {expected}",
                status.user.username.chars().take(200).collect::<String>()
            )));
        }
        let pods = status
            .user
            .extra
            .get("authentication.kubernetes.io/pod-name");
        if let (Some(pod), Some(pods)) = (&attested.pod, pods)
            && !pods.iter().any(|p| p == pod)
        {
            return Err(ServiceAccountError::ReviewRefused(format!(
                "its pod is not {pod}"
            )));
        }
        Ok(())
    }

    /// Checks `token` and maps it to a workload identity. `pod` is the pod the request says it
    /// comes from, if it says.
    pub fn attest(&self, token: &str, pod: Option<&str>) -> Result<Attested, ServiceAccountError> {
        use ServiceAccountError as E;
        let token = token.trim();
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // An `alg` the library has no name for, `none` among them.
            ErrorKind::Json(json) if json.to_string().contains("unknown variant") => {
                E::Algorithm(if json.to_string().contains("`none`") {
                    "none".into()
                } else {
                    "an algorithm it does not know".into()
                })
            }
            _ => E::Malformed,
        })?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(E::Algorithm(format!("{:?}", header.alg)));
        }
        let keys = self.keys();
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| {
            self.nudge();
            E::UnknownKey(header.kid.clone().unwrap_or_default())
        })?;
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|_| E::UnknownKey(header.kid.clone().unwrap_or_default()))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => E::Signature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_) => E::Algorithm(format!("{:?}", header.alg)),
            ErrorKind::InvalidIssuer => E::Issuer(self.config.issuer.clone()),
            ErrorKind::InvalidAudience => E::Audience(self.config.audience.clone()),
            ErrorKind::ExpiredSignature => E::Expired,
            ErrorKind::ImmatureSignature => E::NotYetValid,
            ErrorKind::MissingRequiredClaim(claim) => E::Claims(format!("the {claim} claim")),
            ErrorKind::InvalidClaimFormat(claim) => {
                E::Claims(format!("a well-formed {claim} claim"))
            }
            _ => E::Malformed,
        })?;
        let claims = data
            .claims
            .kubernetes
            .ok_or_else(|| E::Claims("the kubernetes.io claim".into()))?;
        let namespace = claims
            .namespace
            .ok_or_else(|| E::Claims("kubernetes.io.namespace".into()))?;
        let service_account = claims
            .serviceaccount
            .ok_or_else(|| E::Claims("kubernetes.io.serviceaccount".into()))?
            .name;
        let named = format!("{namespace}/{service_account}");
        let config = &self.config;
        if (!config.namespaces.is_empty() && !config.namespaces.contains(&namespace))
            || (!config.service_accounts.is_empty() && !config.service_accounts.contains(&named))
        {
            return Err(E::NotAllowed(format!("service account {named}")));
        }
        let token_pod = claims.pod.map(|p| p.name);
        if let (Some(token), Some(asking)) = (&token_pod, pod)
            && token != asking
        {
            return Err(E::OtherPod {
                token: token.clone(),
                asking: asking.to_owned(),
            });
        }
        let identity = config
            .identity_of(&self.trust_domain, &namespace, &service_account)
            .map_err(|e| E::Claims(format!("names that make a workload identity ({e})")))?;
        Ok(Attested {
            identity,
            namespace,
            service_account,
            pod: token_pod,
        })
    }
}
