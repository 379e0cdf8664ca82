//! The sidecar's copy loop rebuilt on rustls' unbuffered API, to measure it against the
//! buffered one (tokio-rustls) that the sidecar uses (issue 8: "measure tokio-rustls with
//! large, adaptive buffers against rustls' unbuffered API; keep the faster and the numbers").
//!
//! [`forward`] drives one `UnbufferedClientConnection` or `UnbufferedServerConnection` between
//! a plaintext stream and the TLS wire: the handshake, then both directions until both sides
//! have sent `close_notify`. TLS bytes are read into one buffer of ours and handed to rustls
//! there; application data is encrypted straight into our outgoing buffer and written from it;
//! each decrypted record is written to the plaintext side from the slice rustls hands out,
//! without a copy of ours.
//!
//! It serves the criterion benchmark (`benches/copy_loop.rs`) and is written for that: one task,
//! one direction busy at a time. While a decrypted record is being written to the plaintext
//! side nothing is read from it, so two apps that both write without reading could stall each
//! other — the sidecar's copy loop does not have that limit, and this one is not used there.

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// TLS bytes read per call, plus room for one partial record left from the previous read.
const INCOMING: usize = 64 * 1024 + 17 * 1024;
/// Plaintext read from the app per call; encrypted as one batch of records.
const PLAINTEXT: usize = 64 * 1024;
/// Encrypted output of one batch (four full records and their overhead), grown if ever short.
const OUTGOING: usize = 80 * 1024;

/// Why the unbuffered copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rustls refused the handshake or a record.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Reading or writing one of the streams failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the TCP stream without `close_notify`, or in the handshake.
    #[error("the TLS peer closed the stream without close_notify")]
    Truncated,
    /// A state this loop does not expect (early data, a record in a state that forbids it).
    #[error("unexpected TLS state: {0}")]
    Unexpected(&'static str),
}

/// Both kinds of unbuffered connection (the sidecar that dials, the one that accepts), behind
/// one `process_tls_records`.
pub trait Unbuffered {
    /// The side's connection data.
    type Data;
    /// `process_tls_records` of the connection.
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// The part of a state this loop acts on, taken out so that no borrow of the connection
/// outlives the `match` that made it (every state is acted on before the next call).
enum Step {
    /// Handshake bytes were encoded into the outgoing buffer (`n` of them).
    Encoded(usize),
    /// Send the outgoing buffer, then tell rustls.
    Transmit,
    /// More TLS bytes are needed.
    Blocked,
    /// Application data was decrypted and written out; `discard` more bytes are consumed.
    Read,
    /// Traffic keys are ready: wait for either side.
    Traffic,
    /// The peer sent `close_notify`.
    PeerClosed,
    /// Both sides sent `close_notify`.
    Closed,
}

/// Counts of a finished copy: (plaintext → wire, wire → plaintext) in application bytes.
pub type Moved = (u64, u64);

/// Copies between `plain` and the TLS `wire` through `connection` until both directions have
/// closed cleanly.
pub async fn forward<C, P, W>(mut connection: C, plain: P, wire: W) -> Result<Moved, Error>
where
    C: Unbuffered,
    P: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    let (mut plain_read, mut plain_write) = tokio::io::split(plain);
    let (mut wire_read, mut wire_write) = tokio::io::split(wire);
    let mut incoming = vec![0u8; INCOMING];
    let mut filled = 0usize;
    let mut outgoing = vec![0u8; OUTGOING];
    let mut encoded = 0usize;
    let mut plaintext = vec![0u8; PLAINTEXT];
    let mut plain_open = true;
    let mut moved: Moved = (0, 0);
    loop {
        let mut discard;
        let step = {
            let UnbufferedStatus {
                discard: consumed,
                state,
            } = connection.process(&mut incoming[..filled]);
            discard = consumed;
            match state? {
                ConnectionState::EncodeTlsData(mut state) => {
                    let n = loop {
                        match state.encode(&mut outgoing[encoded..]) {
                            Ok(n) => break n,
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => outgoing.resize(encoded + required_size, 0),
                            Err(EncodeError::AlreadyEncoded) => {
                                return Err(Error::Unexpected("handshake record encoded twice"));
                            }
                        }
                    };
                    Step::Encoded(n)
                }
                ConnectionState::TransmitTlsData(state) => {
                    wire_write.write_all(&outgoing[..encoded]).await?;
                    wire_write.flush().await?;
                    state.done();
                    Step::Transmit
                }
                ConnectionState::BlockedHandshake => Step::Blocked,
                ConnectionState::ReadTraffic(mut state) => {
                    while let Some(record) = state.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain_write.write_all(record.payload).await?;
                        moved.1 += record.payload.len() as u64;
                    }
                    plain_write.flush().await?;
                    Step::Read
                }
                ConnectionState::WriteTraffic(mut state) => {
                    if plain_open {
                        // Wait for whichever side has bytes first. A read from the wire only
                        // appends past `filled`, so the pending discard stays valid.
                        tokio::select! {
                            n = wire_read.read(&mut incoming[filled..]) => {
                                let n = n?;
                                if n == 0 {
                                    return Err(Error::Truncated);
                                }
                                filled += n;
                            }
                            n = plain_read.read(&mut plaintext) => {
                                let n = n?;
                                let sent = if n == 0 {
                                    plain_open = false;
                                    encrypt(&mut outgoing, |out| state.queue_close_notify(out))?
                                } else {
                                    moved.0 += n as u64;
                                    encrypt(&mut outgoing, |out| state.encrypt(&plaintext[..n], out))?
                                };
                                wire_write.write_all(&outgoing[..sent]).await?;
                                wire_write.flush().await?;
                            }
                        }
                    } else {
                        let n = wire_read.read(&mut incoming[filled..]).await?;
                        if n == 0 {
                            return Err(Error::Truncated);
                        }
                        filled += n;
                    }
                    Step::Traffic
                }
                ConnectionState::PeerClosed => Step::PeerClosed,
                ConnectionState::Closed => Step::Closed,
                ConnectionState::ReadEarlyData(_) => {
                    return Err(Error::Unexpected("early data"));
                }
                _ => return Err(Error::Unexpected("a state this rustls version added")),
            }
        };
        match step {
            Step::Encoded(n) => encoded += n,
            Step::Transmit => encoded = 0,
            Step::Blocked => {
                if filled == incoming.len() {
                    return Err(Error::Unexpected(
                        "a handshake message larger than the buffer",
                    ));
                }
                let n = wire_read.read(&mut incoming[filled..]).await?;
                if n == 0 {
                    return Err(Error::Truncated);
                }
                filled += n;
            }
            Step::PeerClosed => plain_write.shutdown().await?,
            Step::Closed => return Ok(moved),
            Step::Read | Step::Traffic => {}
        }
        if discard > 0 {
            incoming.copy_within(discard..filled, 0);
            filled -= discard;
        }
    }
}

/// Runs `write` (an encryption into the outgoing buffer), growing the buffer once if it is short.
fn encrypt(
    outgoing: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<usize, Error> {
    match write(outgoing) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            outgoing.resize(required_size, 0);
            write(outgoing).map_err(|_| Error::Unexpected("encryption failed after growing"))
        }
        Err(EncryptError::EncryptExhausted) => Err(Error::Unexpected("traffic keys exhausted")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use rustls::client::UnbufferedClientConnection;
    use rustls::server::UnbufferedServerConnection;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::pki::Pki;

    /// Plain rustls configurations (one CA, server authentication) — the loop is what is
    /// under test here; the benchmark uses the sidecar's own mTLS configurations.
    fn configs(pki: &Pki) -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        let leaf = pki.peer("unbuffered.test").unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(pki.root_pem().as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        (Arc::new(client), Arc::new(server))
    }

    #[tokio::test]
    async fn carries_every_byte_both_ways_and_closes_cleanly() {
        let pki = Pki::generate().unwrap();
        let (client_config, server_config) = configs(&pki);
        let name = ServerName::try_from("unbuffered.test").unwrap();
        let client = UnbufferedClientConnection::new(client_config, name).unwrap();
        let server = UnbufferedServerConnection::new(server_config).unwrap();
        let (app_a, plain_a) = tokio::io::duplex(64 * 1024);
        let (wire_a, wire_b) = tokio::io::duplex(64 * 1024);
        let (plain_b, app_b) = tokio::io::duplex(64 * 1024);
        let a = tokio::spawn(forward(client, plain_a, wire_a));
        let b = tokio::spawn(forward(server, plain_b, wire_b));
        let (mut a_read, mut a_write) = tokio::io::split(app_a);
        let (mut b_read, mut b_write) = tokio::io::split(app_b);
        let there: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let back: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (sent_there, sent_back) = (there.clone(), back.clone());
        let writer_a = tokio::spawn(async move {
            for piece in sent_there.chunks(10_000) {
                a_write.write_all(piece).await.unwrap();
            }
            a_write.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        b_read.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, there, "every byte, in order, then EOF");
        writer_a.await.unwrap();
        // The other direction still flows after the first one closed.
        let writer_b = tokio::spawn(async move {
            b_write.write_all(&sent_back).await.unwrap();
            b_write.shutdown().await.unwrap();
        });
        let mut returned = Vec::new();
        a_read.read_to_end(&mut returned).await.unwrap();
        writer_b.await.unwrap();
        assert_eq!(returned, back);
        let a = a.await.unwrap().unwrap();
        let b = b.await.unwrap().unwrap();
        assert_eq!(a, (1_000_000, 300_000));
        assert_eq!(b, (300_000, 1_000_000));
    }

    #[tokio::test]
    async fn a_wrong_server_name_fails_the_handshake() {
        let pki = Pki::generate().unwrap();
        let (client_config, server_config) = configs(&pki);
        let name = ServerName::try_from("someone-else.test").unwrap();
        let client = UnbufferedClientConnection::new(client_config, name).unwrap();
        let server = UnbufferedServerConnection::new(server_config).unwrap();
        let (_app_a, plain_a) = tokio::io::duplex(1024);
        let (wire_a, wire_b) = tokio::io::duplex(64 * 1024);
        let (plain_b, _app_b) = tokio::io::duplex(1024);
        let b = tokio::spawn(forward(server, plain_b, wire_b));
        let a = forward(client, plain_a, wire_a).await;
        assert!(
            matches!(a, Err(Error::Tls(rustls::Error::InvalidCertificate(_)))),
            "{a:?}"
        );
        drop(b);
    }
}
