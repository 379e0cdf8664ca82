//! The copy loop between full runs: bytes per second through one in-memory mTLS pair.
//!
//! ```text
//! writer ─duplex─ forward(A) ─TLS client═duplex═TLS server─ forward(B) ─duplex─ reader
//! ```
//!
//! Both sides use the sidecar's real pieces: `sidewall_proxy::transport::forward` (the one
//! place bytes move) and the rustls configurations of `sidewall_proxy::tls::TlsSet` built from
//! SVIDs of a fresh CA, as on the wire between two sidecars. Everything runs on one thread
//! (a sidecar's budget); the handshake happens once, outside the measurement. Each iteration
//! moves 4 MiB from writer to reader, in 64 KiB writes (bulk) and 1 KiB writes (chatty).
//!
//! Two TLS engines, same configurations: `buffered` is the sidecar's (tokio-rustls over
//! rustls' buffered connections); `unbuffered` is `sidewall_bench::unbuffered::forward`, the
//! same copy on rustls' unbuffered API (issue 8 asks for both to be measured).
//!
//! Run: `cargo bench -p sidewall-bench --bench copy_loop`.

// A benchmark is not a test, so clippy's allow-expect-in-tests does not cover it; a fixture
// that fails to build is a bug in this file and should stop the run loudly.
#![allow(clippy::expect_used, reason = "fixture set-up in a benchmark")]

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls_pki_types::ServerName;
use sidewall_bench::pki::{Pki, spiffe_id};
use sidewall_bench::unbuffered;
use sidewall_policies::SpiffeId;
use sidewall_policies::snapshot::Revocations;
use sidewall_proxy::identity::Credential;
use sidewall_proxy::tls::TlsSet;
use sidewall_proxy::transport::forward;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::runtime::Runtime;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bytes moved per iteration.
const PER_ITERATION: usize = 4 * 1024 * 1024;
/// In-memory pipe capacity, about a loopback socket's buffer.
const PIPE: usize = 256 * 1024;

fn tls_set(pki: &Pki, name: &str) -> (SpiffeId, TlsSet) {
    let leaf = pki.svid(name).expect("svid");
    let id = SpiffeId::parse(&spiffe_id(name)).expect("id");
    let credential =
        Credential::from_pem(&id, leaf.chain_pem, leaf.key_pem, pki.root_pem().to_owned())
            .expect("credential");
    // No extra trust bundles from a snapshot: the credential's own trust domain only.
    let set = TlsSet::new(
        Arc::new(credential),
        Revocations::default(),
        &Default::default(),
        false,
    )
    .expect("tls");
    (id, set)
}

/// The two ends the application sees, with both sidecars forwarding in between.
struct Pair {
    writer: WriteHalf<DuplexStream>,
    reader: ReadHalf<DuplexStream>,
}

/// Which TLS engine both sidecars of a pair run.
#[derive(Clone, Copy)]
enum Engine {
    /// tokio-rustls and `transport::forward`: the sidecar's.
    Buffered,
    /// rustls' unbuffered API: `sidewall_bench::unbuffered::forward`.
    Unbuffered,
}

async fn pair(pki: &Pki, engine: Engine) -> Pair {
    let (_, a) = tls_set(pki, "a");
    let (b_id, b) = tls_set(pki, "b");
    let (client_app, a_app) = tokio::io::duplex(PIPE);
    let (a_wire, b_wire) = tokio::io::duplex(PIPE);
    let (b_app, server_app) = tokio::io::duplex(PIPE);
    let client_config = a.client(&b_id).expect("client config");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    match engine {
        Engine::Buffered => {
            let connector = TlsConnector::from(client_config);
            let acceptor = TlsAcceptor::from(b.server.clone());
            let (client, server) =
                tokio::join!(connector.connect(name, a_wire), acceptor.accept(b_wire));
            let (client, server) = (
                client.expect("client handshake"),
                server.expect("server handshake"),
            );
            let idle = Duration::from_secs(3600);
            tokio::spawn(forward(a_app, client, idle));
            tokio::spawn(forward(server, b_app, idle));
        }
        Engine::Unbuffered => {
            // The handshake runs inside the loops, before the first measured bytes arrive
            // (criterion's warm-up covers it).
            let client =
                UnbufferedClientConnection::new(client_config, name).expect("client connection");
            let server =
                UnbufferedServerConnection::new(b.server.clone()).expect("server connection");
            tokio::spawn(unbuffered::forward(client, a_app, a_wire));
            tokio::spawn(unbuffered::forward(server, b_app, b_wire));
        }
    }
    let (_, writer) = tokio::io::split(client_app);
    let (reader, _) = tokio::io::split(server_app);
    Pair { writer, reader }
}

async fn transfer(pair: &mut Pair, chunk: &[u8], sink: &mut [u8]) {
    let write = async {
        for _ in 0..PER_ITERATION / chunk.len() {
            pair.writer.write_all(chunk).await.expect("write");
        }
    };
    let read = async {
        let mut left = PER_ITERATION;
        while left > 0 {
            let n = pair.reader.read(sink).await.expect("read");
            assert!(n > 0, "the pair closed early");
            left -= n;
        }
    };
    tokio::join!(write, read);
}

fn copy_loop(c: &mut Criterion) {
    let runtime: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pki = Pki::generate().expect("pki");
    let mut group = c.benchmark_group("copy_loop_mtls_pair");
    group.throughput(Throughput::Bytes(PER_ITERATION as u64));
    group.sample_size(20);
    for (engine, label) in [
        (Engine::Buffered, "buffered"),
        (Engine::Unbuffered, "unbuffered"),
    ] {
        for chunk_size in [64 * 1024, 1024] {
            let mut pair = runtime.block_on(pair(&pki, engine));
            let chunk = vec![0x5a; chunk_size];
            let mut sink = vec![0; 64 * 1024];
            let id = BenchmarkId::new(format!("{label}/write"), chunk_size);
            group.bench_function(id, |b| {
                b.iter(|| runtime.block_on(transfer(&mut pair, &chunk, &mut sink)));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, copy_loop);
criterion_main!(benches);
