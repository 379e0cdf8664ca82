//! Inbound TLS handshakes on a thread of their own.
//!
//! A handshake costs the server a key exchange and a signature, about a hundred times the
//! work of forwarding a small request. When they ran on the worker threads that also forward
//! authenticated traffic, a flood of handshakes from anyone who can reach the port (no
//! certificate needed) queued every allowed peer's requests behind them: the hostile suite
//! measured the allowed client's p99 at 30 to 60 times quiet under `tls-no-cert` and
//! `tls-denied`.
//!
//! Now the TLS handshake and the port header of every inbound connection run on one thread of
//! their own (a current-thread runtime), and only an authenticated connection comes back to the
//! workers. Under a flood that thread is busy while the workers stay free for the peers already
//! connected (the OS scheduler shares the cores between them; a thread that mostly waits, as the
//! workers then do, is run promptly when it wakes). New connections from allowed peers wait in
//! the same line as the flood: what holds there is the per-source and total handshake budgets
//! (`limits.handshakesPerSource`, `limits.maxHandshakes`).
//!
//! The sockets stay registered with the workers' runtime, which delivers their readiness; only
//! the handshake's computation moves. If the thread cannot be started, handshakes run where they
//! used to (logged once).

use std::future::Future;
use std::sync::OnceLock;

/// The handshake thread's runtime, started on first use (one per process).
fn handle() -> Option<&'static tokio::runtime::Handle> {
    static HANDLE: OnceLock<Option<tokio::runtime::Handle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match start() {
            Ok(handle) => Some(handle),
            Err(error) => {
                tracing::warn!(%error, "no handshake thread: TLS handshakes share the worker threads");
                None
            }
        })
        .as_ref()
}

fn start() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("sidewall-handshakes".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Runs `future` (a handshake) on the handshake thread and returns its output; `None` if it
/// was lost there (a panic). Dropping the returned future cancels the handshake.
pub(crate) async fn run<F>(future: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(handle) = handle() else {
        return Some(future.await);
    };
    let task = handle.spawn(future);
    let _cancel = CancelOnDrop(task.abort_handle());
    task.await.ok()
}

/// Aborts the handshake when the connection's task ends first (shutdown).
struct CancelOnDrop(tokio::task::AbortHandle);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
