//! Every metric the sidecar exports: its name once, and its help text for `/metrics`
//! ([`describe`]). Labels and their values are in docs/proxy.md.

use metrics::{describe_counter, describe_gauge, describe_histogram};

/// What `/metrics` answers: the exposition text, rendered at each scrape (the binary refreshes
/// the `process_*` gauges from `/proc` first, as Prometheus client libraries do).
pub type Render = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Connections accepted, by `direction`.
pub(crate) const CONNECTIONS_OPENED: &str = "sidewall_proxy_connections_opened_total";
/// Connections open now, by `direction` (gauge).
pub(crate) const CONNECTIONS_OPEN: &str = "sidewall_proxy_connections_open";
/// Connections closed because their budget was full, by `direction` and `reason`.
pub(crate) const CONNECTIONS_REFUSED: &str = "sidewall_proxy_connections_refused_total";
/// Failed accepts, by `direction`.
pub(crate) const ACCEPT_ERRORS: &str = "sidewall_proxy_accept_errors_total";
/// Connections refused before a decision, and failed outbound handshakes.
pub(crate) const HANDSHAKE_FAILURES: &str = "sidewall_proxy_handshake_failures_total";
/// Connection-level decisions, by `outcome` and `policy`.
pub(crate) const AUTHORIZATIONS: &str = "sidewall_proxy_authorizations_total";
/// Connections the sidecar closed, by `reason`.
pub(crate) const CONNECTIONS_CLOSED: &str = "sidewall_proxy_connections_closed_total";
/// Snapshot watches taken for dead.
pub(crate) const WATCH_SILENT: &str = "sidewall_proxy_watch_silent_total";
/// Bytes forwarded, by `direction`.
pub(crate) const BYTES: &str = "sidewall_proxy_bytes_total";
/// Outbound connections that did not get through, by `reason`.
pub(crate) const OUTBOUND_FAILURES: &str = "sidewall_proxy_outbound_failures_total";
/// Connections let through to an egress destination.
pub(crate) const EGRESS_CONNECTIONS: &str = "sidewall_proxy_egress_connections_total";
/// Plaintext connections accepted on a permissive port, by `port`.
pub(crate) const PLAINTEXT_ACCEPTED: &str = "sidewall_proxy_plaintext_accepted_total";
/// Segmentation probes, by `side` (`made`, `answered`) and `answer`.
pub(crate) const PROBES: &str = "sidewall_proxy_probes_total";
/// HTTP requests answered, by `outcome` and `policy`.
pub(crate) const HTTP_REQUESTS: &str = "sidewall_proxy_http_requests_total";
/// App connections arriving as streams of shared connections, by `outcome`.
pub(crate) const CARRIED_CONNECTIONS: &str = "sidewall_proxy_carried_connections_total";
/// The app's requests to HTTP ports of other services, by `outcome`.
pub(crate) const OUTBOUND_HTTP_REQUESTS: &str = "sidewall_proxy_outbound_http_requests_total";
/// Shared and pooled HTTP/2 connections, by `event`.
pub(crate) const H2_POOL: &str = "sidewall_proxy_h2_pool_total";
/// HTTP requests denied, by `policy`.
pub(crate) const HTTP_DENIALS: &str = "sidewall_proxy_http_denials_total";
/// Time from a request's arrival to the app's response head (histogram).
pub(crate) const HTTP_REQUEST_SECONDS: &str = "sidewall_proxy_http_request_seconds";
/// Outbound connections ended by a revocation or an expiry, by `reason` and `connection`.
pub(crate) const OUTBOUND_CLOSED: &str = "sidewall_proxy_outbound_closed_total";
/// Certificates obtained.
pub(crate) const CERTIFICATES_OBTAINED: &str = "sidewall_proxy_certificates_obtained_total";
/// Failed join or renewal attempts.
pub(crate) const CERTIFICATE_FAILURES: &str = "sidewall_proxy_certificate_failures_total";
/// Seconds until the certificate expires (gauge).
pub(crate) const CERTIFICATE_EXPIRY: &str = "sidewall_proxy_certificate_expiry_seconds";
/// Snapshots applied.
pub(crate) const SNAPSHOTS_APPLIED: &str = "sidewall_proxy_snapshots_applied_total";
/// Snapshots rejected.
pub(crate) const SNAPSHOTS_REJECTED: &str = "sidewall_proxy_snapshots_rejected_total";
/// The counter of the snapshot in force (gauge).
pub(crate) const SNAPSHOT_VERSION: &str = "sidewall_proxy_snapshot_version";
/// Observed flows not counted for the next report, by `reason`.
pub(crate) const FLOWS_DROPPED: &str = "sidewall_proxy_flows_dropped_total";
/// Flow report bodies refused or not delivered.
pub(crate) const FLOW_REPORTS_FAILED: &str = "sidewall_proxy_flow_reports_failed_total";
/// Registrations the control plane refused, by `reason`.
pub(crate) const REGISTRATIONS_REFUSED: &str = "sidewall_proxy_registrations_refused_total";

/// Gives every metric its help text; call once the recorder is installed.
pub fn describe() {
    describe_counter!(
        CONNECTIONS_OPENED,
        "Connections accepted (outbound: on routes and the transparent listener)."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Connections open now (outbound: explicit routes only)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed because their budget (connections, handshakes, handshakes per source) was full."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts (EMFILE and the like); the listener backs off 100 ms."
    );
    describe_counter!(
        HANDSHAKE_FAILURES,
        "Inbound connections refused before a policy decision, and outbound handshakes that failed."
    );
    describe_counter!(
        AUTHORIZATIONS,
        "Connection-level decisions (direct and carried connections), with the deciding policy."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections the sidecar closed, by reason (inbound ones, and the app's HTTP connections to a route)."
    );
    describe_counter!(
        WATCH_SILENT,
        "Snapshot watches taken for dead after three missed keep-alive lines."
    );
    describe_counter!(BYTES, "Bytes forwarded, counted when a connection ends.");
    describe_counter!(
        OUTBOUND_FAILURES,
        "Outbound connections that did not get through."
    );
    describe_counter!(
        EGRESS_CONNECTIONS,
        "Connections let through to an egress destination."
    );
    describe_counter!(
        PLAINTEXT_ACCEPTED,
        "Plaintext connections accepted on a permissive port."
    );
    describe_counter!(
        PROBES,
        "Segmentation probes made (side=made) and answered (side=answered), by answer."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, with the deciding policy."
    );
    describe_counter!(
        CARRIED_CONNECTIONS,
        "App connections arriving as streams of shared connections, by what happened to them before the policy."
    );
    describe_counter!(
        OUTBOUND_HTTP_REQUESTS,
        "The app's requests to HTTP ports of other services, on their way out."
    );
    describe_counter!(
        H2_POOL,
        "Shared and pooled HTTP/2 connections opened, reused, abandoned and timed out."
    );
    describe_counter!(
        HTTP_DENIALS,
        "HTTP requests denied, by deciding policy (- for the default deny)."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time from a request's arrival to the app's response head (or the refusal)."
    );
    describe_counter!(
        OUTBOUND_CLOSED,
        "Outbound connections the sidecar ended because their server was revoked or a certificate expired."
    );
    describe_counter!(
        CERTIFICATES_OBTAINED,
        "Certificates obtained (joins and renewals)."
    );
    describe_counter!(CERTIFICATE_FAILURES, "Failed join or renewal attempts.");
    describe_gauge!(
        CERTIFICATE_EXPIRY,
        metrics::Unit::Seconds,
        "Seconds until the certificate expires."
    );
    describe_counter!(
        SNAPSHOTS_APPLIED,
        "Snapshots applied (control plane or local files)."
    );
    describe_counter!(
        SNAPSHOTS_REJECTED,
        "Snapshots rejected (the last good one stayed)."
    );
    describe_gauge!(SNAPSHOT_VERSION, "The counter of the snapshot in force.");
    describe_counter!(
        FLOWS_DROPPED,
        "Observed flows not counted for the next report to the control plane."
    );
    describe_counter!(
        FLOW_REPORTS_FAILED,
        "Flow report bodies the control plane refused or that were not delivered."
    );
    describe_counter!(
        REGISTRATIONS_REFUSED,
        "Registrations the control plane refused."
    );
}
