//! The decision table of [`admit`]: every refusal, for each way a connection arrives, on a real
//! configuration, a compiled policy set and a real connection table; then re-evaluation, which
//! closes an admitted connection when a later snapshot no longer allows it.

use std::path::Path;

use sidewall_policies::load::{LoadOptions, Source, load_sources};
use sidewall_policies::snapshot::{Revocations, Schema, Snapshot, SnapshotVersion};
use tokio::sync::watch;

use super::*;
use crate::config::Config;

const TARGET: &str = "spiffe://sidewall.local/ns/demo/svc/db";
const CALLER: &str = "spiffe://sidewall.local/ns/demo/svc/api";
const STRANGER: &str = "spiffe://sidewall.local/ns/demo/svc/web";
/// A plain TCP port and an HTTP port, both open to CALLER.
const TCP: u16 = 5432;
const HTTP: u16 = 8080;
const NOT_SERVED: u16 = 7000;

const DIRECT: Arrival = Arrival::Direct { h2: false };
const DIRECT_H2: Arrival = Arrival::Direct { h2: true };
const CARRIED: Arrival = Arrival::Carried;

fn id(text: &str) -> SpiffeId {
    SpiffeId::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn config() -> Config {
    let text = format!(
        "identity: {TARGET}\n\
         controlPlane: {{urls: [\"https://127.0.0.1:4600\"]}}\n\
         stateDir: state\n\
         inbound:\n  listen: 127.0.0.1:4643\n  ports:\n\
         \x20   - {{port: {TCP}, app: 127.0.0.1:15432}}\n\
         \x20   - {{port: {HTTP}, protocol: http, app: 127.0.0.1:18080}}\n"
    );
    Config::from_text("sidecar.yaml", &text, Path::new("/tmp"), |_| None)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The snapshot in force: `allow_caller` decides whether CALLER may reach both ports.
fn active(counter: u64, allow_caller: bool, revocations: Revocations) -> Arc<Active> {
    let rules = if allow_caller {
        format!(
            "    - action: allow\n      from: [{CALLER}]\n      ports: [{TCP}]\n\
             \x20   - action: allow\n      from: [{CALLER}]\n      ports: [{HTTP}]\n      http: {{methods: [GET], paths: [\"/**\"]}}\n"
        )
    } else {
        format!("    - action: allow\n      from: [{STRANGER}]\n      ports: [{TCP}]\n")
    };
    let text = format!(
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: db}}\nspec:\n  target: {TARGET}\n  rules:\n{rules}"
    );
    let loaded = load_sources(
        &[Source {
            name: "db.yaml".into(),
            text,
        }],
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Active::new(Snapshot {
        schema: Schema::default(),
        version: SnapshotVersion {
            epoch: "test".into(),
            counter,
        },
        workload: id(TARGET),
        policies: loaded.policies,
        trust_bundles: Default::default(),
        signing_ca: None,
        revocations,
        directory: Vec::new(),
    }))
}

fn svid(peer: &str, not_after: i64) -> Svid {
    Svid {
        id: id(peer),
        serial: "7f01".into(),
        not_before: 0,
        not_after,
    }
}

/// A sidecar's context with `snapshot` in force; the sender applies the next one.
fn context(snapshot: Option<Arc<Active>>) -> (Context, watch::Sender<Option<Arc<Active>>>) {
    let (_, tls) = watch::channel(None);
    let (sender, receiver) = watch::channel(snapshot);
    let (_, stopping) = watch::channel(false);
    (
        Context::new(Arc::new(config()), tls, receiver, stopping),
        sender,
    )
}

fn outcome(
    context: &Context,
    peer: &Svid,
    port: u16,
    redirected: Option<u16>,
    arrival: Arrival,
) -> Result<u16, Refusal> {
    admit(context, peer, port, redirected, arrival).map(|admission| admission.entry.port)
}

#[test]
fn every_refusal_for_every_way_a_connection_arrives() {
    let later = now_unix() + 3600;
    let caller = svid(CALLER, later);
    let (allowing, _sender) = context(Some(active(1, true, Revocations::default())));
    let (empty, _no_snapshot) = context(None);
    let (revoking_identity, _a) = context(Some(active(
        1,
        true,
        Revocations {
            identities: vec![id(CALLER)],
            serials: Vec::new(),
        },
    )));
    let (revoking_serial, _b) = context(Some(active(
        1,
        true,
        Revocations {
            identities: Vec::new(),
            serials: vec!["7f01".into()],
        },
    )));

    // (case, context, peer, port, redirected, [direct, direct h2, carried])
    type Row<'a> = (
        &'a str,
        &'a Context,
        Svid,
        u16,
        Option<u16>,
        [Result<u16, Refusal>; 3],
    );
    use Refusal::*;
    let rows: Vec<Row<'_>> = vec![
        (
            "allowed, TCP port",
            &allowing,
            caller.clone(),
            TCP,
            None,
            [Ok(TCP), Err(NotHttp), Ok(TCP)],
        ),
        (
            "allowed, HTTP port",
            &allowing,
            caller.clone(),
            HTTP,
            None,
            [Ok(HTTP), Ok(HTTP), Err(NotTcp)],
        ),
        (
            "transparent, the port redirected to",
            &allowing,
            caller.clone(),
            TCP,
            Some(TCP),
            [Ok(TCP), Err(NotHttp), Ok(TCP)],
        ),
        (
            "expired certificate",
            &allowing,
            svid(CALLER, now_unix() - 1),
            TCP,
            None,
            [Err(CertificateExpired); 3],
        ),
        (
            "transparent, another port asked for than redirected to",
            &allowing,
            caller.clone(),
            TCP,
            Some(HTTP),
            [Err(PortMismatch); 3],
        ),
        (
            "a port this sidecar does not serve",
            &allowing,
            caller.clone(),
            NOT_SERVED,
            None,
            [Err(UnknownPort); 3],
        ),
        (
            "no snapshot yet",
            &empty,
            caller.clone(),
            TCP,
            None,
            [Err(NoSnapshot), Err(NotHttp), Err(NoSnapshot)],
        ),
        (
            "identity revoked",
            &revoking_identity,
            caller.clone(),
            TCP,
            None,
            [Err(Revoked), Err(NotHttp), Err(Revoked)],
        ),
        (
            "certificate revoked by serial",
            &revoking_serial,
            caller.clone(),
            HTTP,
            None,
            [Err(Revoked), Err(Revoked), Err(NotTcp)],
        ),
        (
            "no policy allows the peer",
            &allowing,
            svid(STRANGER, later),
            HTTP,
            None,
            [Err(Denied), Err(Denied), Err(NotTcp)],
        ),
    ];
    for (case, context, peer, port, redirected, expected) in rows {
        for (arrival, want) in [DIRECT, DIRECT_H2, CARRIED].into_iter().zip(expected) {
            assert_eq!(
                outcome(context, &peer, port, redirected, arrival),
                want,
                "{case}, {arrival:?}"
            );
        }
        // A refused connection leaves nothing registered.
        assert_eq!(context.connections.len(), 0, "{case}");
    }
}

#[test]
fn one_table_answers_each_refusal() {
    use Refusal::*;
    // (refusal, status byte on a direct connection, HTTP status of a carried stream)
    let table = [
        (CertificateExpired, None, StatusCode::FORBIDDEN),
        (PortMismatch, None, StatusCode::FORBIDDEN),
        (NoSnapshot, None, StatusCode::SERVICE_UNAVAILABLE),
        (
            UnknownPort,
            Some(Status::UnknownPort),
            StatusCode::NOT_FOUND,
        ),
        (
            NotHttp,
            Some(Status::NotHttp),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (
            NotTcp,
            Some(Status::NotHttp),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (Revoked, Some(Status::Denied), StatusCode::FORBIDDEN),
        (Denied, Some(Status::Denied), StatusCode::FORBIDDEN),
    ];
    let mut labels = std::collections::HashSet::new();
    for (refusal, status, http) in table {
        assert_eq!(refusal.status(), status, "{refusal:?}");
        assert_eq!(refusal.http_status(), http, "{refusal:?}");
        assert!(labels.insert(refusal.label()), "{refusal:?}: label reused");
    }
}

#[test]
fn an_admitted_connection_is_closed_when_a_later_snapshot_no_longer_allows_it() {
    let caller = svid(CALLER, now_unix() + 3600);
    let (context, sender) = context(Some(active(1, true, Revocations::default())));
    let admission = admit(&context, &caller, TCP, None, CARRIED)
        .unwrap_or_else(|refusal| panic!("{refusal:?}"));
    assert_eq!(context.connections.len(), 1);
    let closed = admission.registration.closed.clone();
    // Still allowed: nothing closes.
    assert_eq!(
        context
            .connections
            .reevaluate(&id(TARGET), &active(2, true, Revocations::default())),
        0
    );
    assert!(closed.borrow().is_none());
    // The policy no longer lets the caller in: the follower's re-evaluation closes it.
    let denying = active(3, false, Revocations::default());
    let _ = sender.send(Some(denying.clone()));
    assert_eq!(context.connections.reevaluate(&id(TARGET), &denying), 1);
    assert!(
        closed.borrow().is_some(),
        "the connection was not told to close"
    );
    drop(admission);
    assert_eq!(context.connections.len(), 0);
}
