//! Every metric the control plane exports: its name once, and its help text for `/metrics`
//! ([`describe`]). Labels and their values are in docs/api.md.

use metrics::{describe_counter, describe_gauge};

/// What `/metrics` answers: the exposition text, rendered at each scrape (the binary refreshes
/// the `process_*` gauges from `/proc` first, as Prometheus client libraries do).
pub type Render = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// API requests answered, by `route` and `status`.
pub(crate) const REQUESTS: &str = "sidewall_control_plane_requests_total";
/// Refused API requests, by `route` and `reason` (the error code).
pub(crate) const REFUSALS: &str = "sidewall_control_plane_refusals_total";
/// Certificates issued through the API, by `kind`.
pub(crate) const CERTIFICATES_ISSUED: &str = "sidewall_control_plane_certificates_issued_total";
/// Join tokens created.
pub(crate) const TOKENS_CREATED: &str = "sidewall_control_plane_tokens_created_total";
/// Refused TLS handshakes on the API port, by `reason`.
pub(crate) const TLS_HANDSHAKE_FAILURES: &str =
    "sidewall_control_plane_tls_handshake_failures_total";
/// Connections closed because their budget was full, by `reason`.
pub(crate) const CONNECTIONS_REFUSED: &str = "sidewall_control_plane_connections_refused_total";
/// Failed accepts, by `listener`.
pub(crate) const ACCEPT_ERRORS: &str = "sidewall_control_plane_accept_errors_total";
/// Connections closed for want of a request, by `reason`.
pub(crate) const CONNECTIONS_CLOSED: &str = "sidewall_control_plane_connections_closed_total";
/// Reported flows not kept, by `reason`.
pub(crate) const FLOWS_DROPPED: &str = "sidewall_control_plane_flows_dropped_total";
/// Registrations removed because their sidecar stopped watching, by `reason`.
pub(crate) const REGISTRATIONS_EXPIRED: &str = "sidewall_control_plane_registrations_expired_total";
/// Requests refused by a per-identity limit, by `limit`.
pub(crate) const IDENTITY_LIMIT: &str = "sidewall_control_plane_identity_limit_total";
/// Fleet rows removed, by `reason`.
pub(crate) const FLEET_ROWS_FORGOTTEN: &str = "sidewall_control_plane_fleet_rows_forgotten_total";
/// Snapshot watches ended because the same instance opened another.
pub(crate) const WATCHES_REPLACED: &str = "sidewall_control_plane_watches_replaced_total";
/// Registered addresses callers are not sent to, by `reason`.
pub(crate) const ADDRESSES_REFUSED: &str = "sidewall_control_plane_addresses_refused_total";
/// Times the policy directory was found invalid.
pub(crate) const POLICY_SOURCE_ERRORS: &str = "sidewall_control_plane_policy_source_errors_total";
/// The policy version in force (gauge).
pub(crate) const POLICY_VERSION: &str = "sidewall_control_plane_policy_version";
/// Sidecars with an open watch stream (gauge).
pub(crate) const PROXIES_CONNECTED: &str = "sidewall_control_plane_proxies_connected";
/// Connected sidecars that have not applied the last snapshot sent to them (gauge).
pub(crate) const PROXIES_BEHIND: &str = "sidewall_control_plane_proxies_behind";
/// Time from applying the policy version in force to the latest ack of it (gauge).
pub(crate) const PROPAGATION_SECONDS: &str = "sidewall_control_plane_propagation_seconds";
/// Times the store's change feed failed.
pub(crate) const STORE_WATCH_FAILURES: &str = "sidewall_control_plane_store_watch_failures_total";
/// Alerts raised by detection, by `signal`.
pub(crate) const ALERTS: &str = "sidewall_control_plane_alerts_total";
/// Replicated writes retried after a concurrent change.
pub(crate) const STORE_CONFLICTS: &str = "sidewall_control_plane_store_conflicts_total";
/// Audit records appended, by `action`.
pub(crate) const AUDIT_RECORDS: &str = "sidewall_control_plane_audit_records_total";
/// Audit records that could not be appended (the change itself stands), by `action`.
pub(crate) const AUDIT_FAILURES: &str = "sidewall_control_plane_audit_failures_total";
/// Segmentation reports signed.
pub(crate) const REPORTS_SIGNED: &str = "sidewall_control_plane_reports_signed_total";
/// Fetches of the service-account issuer's keys, by `result` (`fetched`, `failed`).
pub(crate) const ISSUER_KEY_FETCHES: &str = "sidewall_control_plane_issuer_key_fetches_total";
/// Flow roll-up chunks written to the store, by `result` (`written`, `failed`).
pub(crate) const ROLLUP_WRITES: &str = "sidewall_control_plane_rollup_writes_total";
/// CA rotation steps taken, by `step` and `forced` (`true`, `false`).
pub(crate) const CA_ROTATION_STEPS: &str = "sidewall_control_plane_ca_rotation_steps_total";
/// CA rotation steps refused, by `step` and `reason` (the error code).
pub(crate) const CA_ROTATION_REFUSED: &str = "sidewall_control_plane_ca_rotation_refused_total";
/// Times a CA rotation record from the store could not be put in force here.
pub(crate) const CA_FOLLOW_FAILURES: &str = "sidewall_control_plane_ca_follow_failures_total";
/// The CA rotation stage in force (0 settled, 1 prepared, 2 activated).
pub(crate) const CA_STAGE: &str = "sidewall_control_plane_ca_rotation_stage";

/// Gives every metric its help text; call once the recorder is installed.
pub fn describe() {
    describe_counter!(REQUESTS, "API requests answered, by route and HTTP status.");
    describe_counter!(REFUSALS, "Refused API requests; reason is the error code.");
    describe_counter!(CERTIFICATES_ISSUED, "Certificates issued through the API.");
    describe_counter!(TOKENS_CREATED, "Join tokens created.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Refused TLS handshakes on the API port."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed because their budget was full."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts (EMFILE and the like); the listener backs off."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections closed because no request started in time, or none was in flight for the idle timeout."
    );
    describe_counter!(
        FLOWS_DROPPED,
        "Reported flows not kept: over a quota, or evicted to make room."
    );
    describe_counter!(
        REGISTRATIONS_EXPIRED,
        "Registrations removed because their sidecar stopped watching."
    );
    describe_counter!(
        IDENTITY_LIMIT,
        "Requests refused because one workload identity held as much as its limit."
    );
    describe_counter!(
        FLEET_ROWS_FORGOTTEN,
        "Fleet rows removed (identity limit, retention)."
    );
    describe_counter!(
        WATCHES_REPLACED,
        "Snapshot watches ended because the same instance opened another."
    );
    describe_counter!(
        ADDRESSES_REFUSED,
        "Registered addresses callers are not sent to."
    );
    describe_counter!(
        POLICY_SOURCE_ERRORS,
        "Times the policy directory was found invalid."
    );
    describe_gauge!(POLICY_VERSION, "The policy version in force.");
    describe_gauge!(PROXIES_CONNECTED, "Sidecars with an open watch stream.");
    describe_gauge!(
        PROXIES_BEHIND,
        "Connected sidecars that have not applied the last snapshot sent to them."
    );
    describe_gauge!(
        PROPAGATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from applying the policy version in force to the latest ack of it."
    );
    describe_counter!(
        STORE_WATCH_FAILURES,
        "Times the store's change feed failed; the state in memory is served meanwhile."
    );
    describe_counter!(
        ALERTS,
        "Alerts raised by detection (denial_burst, new_edge, path_scan, untrusted_identity, plaintext)."
    );
    describe_counter!(
        STORE_CONFLICTS,
        "Replicated store writes retried after a concurrent change."
    );
    describe_counter!(AUDIT_RECORDS, "Audit records appended, by action.");
    describe_counter!(
        AUDIT_FAILURES,
        "Audit records that could not be appended (the change itself stands), by action."
    );
    describe_counter!(REPORTS_SIGNED, "Segmentation reports signed.");
    describe_counter!(
        ISSUER_KEY_FETCHES,
        "Fetches of the service-account issuer's keys (attestation.kubernetes.jwksUrl), by result."
    );
    describe_counter!(
        ROLLUP_WRITES,
        "Daily flow roll-up chunks written to the store, by result (written, failed: kept and retried)."
    );
    describe_counter!(
        CA_ROTATION_STEPS,
        "CA rotation steps taken, by step and forced."
    );
    describe_counter!(
        CA_ROTATION_REFUSED,
        "CA rotation steps refused, by step and reason (wrong stage, blocked, root key offline, conflict)."
    );
    describe_counter!(
        CA_FOLLOW_FAILURES,
        "CA rotation records from the store that could not be put in force (the CA set in force stays)."
    );
    describe_gauge!(
        CA_STAGE,
        "The CA rotation stage in force: 0 settled, 1 prepared, 2 activated."
    );
}
