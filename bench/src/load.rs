//! The load generator (tokio, in this process): bulk streams, request/response closed-loop and
//! open-loop, connection rate, and idle connections.
//!
//! Every timed workload runs a warm-up, then a measured window; only what happens inside the
//! window counts. Latencies go into HDR histograms in nanoseconds (3 significant digits).
//! Open loop ([`open_loop`]) has no coordinated omission: each request has a scheduled send
//! time, and when the system is behind, its latency counts from that time, not from when the
//! generator got round to sending it. Every workload speaks raw bytes ([`Framing::Raw`]) or,
//! for the `sidewall-http` chain, HTTP/1.1 with the same payload sizes ([`Framing::Http`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use hdrhistogram::Histogram;
use sidewall_bench::model::Contender;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::http1;
use crate::server::{ECHO, SINK};

/// Request and response size of the request/response workloads.
pub(crate) const MESSAGE: usize = 1024;
/// The longest a single connect + exchange may take before it counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// A warm-up and a measured window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Unmeasured lead-in.
    pub(crate) warmup: Duration,
    /// The measured part.
    pub(crate) duration: Duration,
}

/// What a bulk workload delivered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bulk {
    /// Gigabits per second delivered to the server.
    pub(crate) gbps: f64,
    /// CPU seconds of the proxies per 10^9 bytes delivered, if there are proxies.
    pub(crate) cpu_s_per_gb: Option<f64>,
}

/// Latency figures of a request/response workload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    /// Requests completed per second in the window.
    pub(crate) rps: f64,
    /// Median, µs.
    pub(crate) p50_us: f64,
    /// 99th percentile, µs.
    pub(crate) p99_us: f64,
    /// 99.9th percentile, µs.
    pub(crate) p999_us: f64,
}

#[allow(
    clippy::expect_used,
    reason = "constant bounds hdrhistogram accepts: 1 <= low, 2 * low <= high, 3 digits <= 5"
)]
fn histogram() -> Histogram<u64> {
    // 1 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid constant bounds")
}

/// Percentiles of `histogram` (ns) in µs, and the rate of `count` requests over `seconds`.
pub(crate) fn latency(histogram: &Histogram<u64>, count: u64, seconds: f64) -> Latency {
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        rps: count as f64 / seconds,
        p50_us: us(0.50),
        p99_us: us(0.99),
        p999_us: us(0.999),
    }
}

/// How requests are framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Bytes as they are: a first byte naming sink or echo, then payloads.
    Raw,
    /// HTTP/1.1 requests and responses carrying the same payloads ([`http1`]).
    Http,
}

impl Framing {
    /// HTTP for `sidewall-http`, whose inbound port parses requests; raw bytes for the others.
    pub(crate) fn of(contender: Contender) -> Self {
        if contender == Contender::SidewallHttp {
            Framing::Http
        } else {
            Framing::Raw
        }
    }

    /// Connects and announces a sink or echo connection.
    pub(crate) async fn open(self, target: SocketAddr, kind: u8) -> Result<TcpStream> {
        let mut stream = TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        match (self, kind) {
            (Framing::Raw, _) => stream.write_all(&[kind]).await?,
            (Framing::Http, SINK) => stream.write_all(&http1::sink_head()).await?,
            (Framing::Http, _) => {}
        }
        Ok(stream)
    }

    /// The bytes of one request carrying `payload` bytes.
    pub(crate) fn request(self, payload: usize) -> Vec<u8> {
        match self {
            Framing::Raw => vec![7u8; payload],
            Framing::Http => http1::request("/echo", &vec![7u8; payload]),
        }
    }

    /// The first request of a fresh connection (raw: the echo byte in the same write).
    fn first_request(self, payload: usize) -> Vec<u8> {
        match self {
            Framing::Raw => {
                let mut message = vec![7u8; payload + 1];
                message[0] = ECHO;
                message
            }
            Framing::Http => self.request(payload),
        }
    }

    /// Sends `request` and reads a response of `payload` bytes: in raw bytes the echo of the
    /// request's payload (anything else, an HTTP error page from a port that speaks HTTP for
    /// instance, is an error), within [`EXCHANGE_TIMEOUT`] (a deployment that swallows the
    /// request fails the workload instead of stalling the run).
    pub(crate) async fn exchange(
        self,
        stream: &mut TcpStream,
        request: &[u8],
        payload: usize,
        buffer: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let one = async {
            stream.write_all(request).await?;
            match self {
                Framing::Raw => {
                    buffer.resize(payload, 0);
                    stream.read_exact(&mut buffer[..payload]).await?;
                    if request.get(request.len().saturating_sub(payload)..) != Some(&buffer[..]) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the answer is not the echo of the request",
                        ));
                    }
                }
                Framing::Http => http1::read_response(stream, buffer, payload).await?,
            }
            Ok(())
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, one)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {EXCHANGE_TIMEOUT:?}"),
                ))
            })
    }
}

/// What a bulk workload reads at both ends of its window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    /// Bytes the server has received so far.
    pub(crate) sunk: u64,
    /// CPU seconds the proxies have spent so far (None: no proxy, or not known).
    pub(crate) cpu: Option<f64>,
}

/// `streams` connections write as fast as they can; throughput is what the server received
/// in the window, as `read` tells at its start and end.
pub(crate) async fn throughput<F, R>(
    framing: Framing,
    target: SocketAddr,
    streams: usize,
    window: Window,
    read: F,
) -> Result<Bulk>
where
    F: Fn() -> R,
    R: std::future::Future<Output = Result<Reading>>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = JoinSet::new();
    for _ in 0..streams {
        let stop = stop.clone();
        writers.spawn(async move {
            let mut stream = framing.open(target, SINK).await?;
            let chunk = vec![0x5au8; 128 * 1024];
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(&chunk).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    tokio::time::sleep(window.warmup).await;
    if let Some(Ok(Err(error))) = writers.try_join_next() {
        return Err(error.context("bulk stream failed"));
    }
    let (before, start) = (read().await?, Instant::now());
    tokio::time::sleep(window.duration).await;
    let after = read().await?;
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(Ok(Err(error))) = writers.try_join_next() {
        return Err(error.context("bulk stream failed"));
    }
    writers.abort_all();
    let bytes = after.sunk.saturating_sub(before.sunk) as f64;
    if bytes == 0.0 {
        bail!("nothing reached the server in {seconds:.1} s");
    }
    let cpu_s_per_gb = match (before.cpu, after.cpu) {
        (Some(before), Some(after)) => Some((after - before) / (bytes / 1e9)),
        _ => None,
    };
    Ok(Bulk {
        gbps: bytes * 8.0 / seconds / 1e9,
        cpu_s_per_gb,
    })
}

/// Closed loop: `connections` connections each send a request as soon as the previous
/// response arrived.
pub(crate) async fn closed_loop(
    framing: Framing,
    target: SocketAddr,
    connections: usize,
    window: Window,
) -> Result<Latency> {
    let start = Instant::now();
    let (from, end) = (
        start + window.warmup,
        start + window.warmup + window.duration,
    );
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(async move {
            let mut stream = framing.open(target, ECHO).await?;
            let (request, mut buffer) = (framing.request(MESSAGE), Vec::new());
            let (mut recorded, mut count) = (histogram(), 0u64);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return Ok::<_, anyhow::Error>((recorded, count));
                }
                framing
                    .exchange(&mut stream, &request, MESSAGE, &mut buffer)
                    .await?;
                let done = Instant::now();
                if sent >= from && done <= end {
                    recorded.saturating_record(nanos(done - sent));
                    count += 1;
                }
            }
        });
    }
    let (recorded, count) = gather(tasks).await?;
    Ok(latency(&recorded, count, window.duration.as_secs_f64()))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

async fn gather(
    mut tasks: JoinSet<Result<(Histogram<u64>, u64)>>,
) -> Result<(Histogram<u64>, u64)> {
    let (mut all, mut count) = (histogram(), 0);
    while let Some(joined) = tasks.join_next().await {
        let (recorded, n) = joined.map_err(|e| anyhow!("load task: {e}"))??;
        all.add(&recorded)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        count += n;
    }
    Ok((all, count))
}

/// When request `j` of connection `k` is due, from the start: `rate` requests per second in
/// all, spread round-robin over `connections`, so the whole schedule is evenly spaced.
pub(crate) fn due(k: usize, j: u64, connections: usize, rate: u32) -> Duration {
    let index = k as f64 + j as f64 * connections as f64;
    Duration::from_secs_f64(index / f64::from(rate.max(1)))
}

/// Where a request's latency starts. If the generator slept until the scheduled time, the
/// system was idle and the timer's wake-up slack (up to a millisecond in tokio) is the
/// generator's, so the clock starts at the send; if the request is late because the previous
/// response came late, the delay is the system's and the clock starts at the schedule.
pub(crate) fn origin(scheduled: Instant, sent: Instant, slept: bool) -> Instant {
    if slept { sent } else { scheduled.min(sent) }
}

/// Open loop: `rate` requests per second on a fixed schedule over `connections` connections.
pub(crate) async fn open_loop(
    framing: Framing,
    target: SocketAddr,
    rate: u32,
    connections: usize,
    window: Window,
) -> Result<Latency> {
    let mut streams = Vec::new();
    for _ in 0..connections {
        streams.push(framing.open(target, ECHO).await?);
    }
    let start = Instant::now();
    let (from, end) = (
        start + window.warmup,
        start + window.warmup + window.duration,
    );
    let mut tasks = JoinSet::new();
    for (k, mut stream) in streams.into_iter().enumerate() {
        tasks.spawn(async move {
            let (request, mut buffer) = (framing.request(MESSAGE), Vec::new());
            let (mut recorded, mut count) = (histogram(), 0u64);
            for j in 0.. {
                let scheduled = start + due(k, j, connections, rate);
                if scheduled >= end {
                    break;
                }
                let slept = Instant::now() < scheduled;
                if slept {
                    tokio::time::sleep_until(scheduled).await;
                }
                let began = origin(scheduled, Instant::now(), slept);
                framing
                    .exchange(&mut stream, &request, MESSAGE, &mut buffer)
                    .await?;
                if scheduled >= from {
                    recorded.saturating_record(nanos(began.elapsed()));
                    count += 1;
                }
            }
            Ok::<_, anyhow::Error>((recorded, count))
        });
    }
    let (recorded, count) = gather(tasks).await?;
    Ok(latency(&recorded, count, window.duration.as_secs_f64()))
}

/// New connection, one 1 KiB exchange, close: completed per second, and the failures seen.
pub(crate) async fn connect_rate(
    framing: Framing,
    target: SocketAddr,
    workers: usize,
    window: Window,
) -> Result<(f64, u64)> {
    let start = Instant::now();
    let (from, end) = (
        start + window.warmup,
        start + window.warmup + window.duration,
    );
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let failures = failures.clone();
        tasks.spawn(async move {
            let (message, mut buffer) = (framing.first_request(MESSAGE), Vec::new());
            let mut count = 0u64;
            while Instant::now() < end {
                let one = async {
                    let mut stream = TcpStream::connect(target).await?;
                    stream.set_nodelay(true)?;
                    framing
                        .exchange(&mut stream, &message, MESSAGE, &mut buffer)
                        .await
                };
                match tokio::time::timeout(EXCHANGE_TIMEOUT, one).await {
                    Ok(Ok(())) => {
                        let now = Instant::now();
                        if now >= from && now <= end {
                            count += 1;
                        }
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            count
        });
    }
    let mut count = 0;
    while let Some(joined) = tasks.join_next().await {
        count += joined.map_err(|e| anyhow!("load task: {e}"))?;
    }
    Ok((
        count as f64 / window.duration.as_secs_f64(),
        failures.load(Ordering::Relaxed),
    ))
}

/// Opens up to `n` echo connections through the chain (`parallel` at a time), each proved
/// end to end by a 16-byte exchange, and returns those that opened and the failure count.
pub(crate) async fn open_idle(
    framing: Framing,
    target: SocketAddr,
    n: usize,
    parallel: usize,
) -> (Vec<TcpStream>, usize) {
    let open_one = move || async move {
        let one = async {
            let mut stream = framing.open(target, ECHO).await?;
            let (request, mut buffer) = (framing.request(16), Vec::new());
            framing
                .exchange(&mut stream, &request, 16, &mut buffer)
                .await?;
            Ok::<_, anyhow::Error>(stream)
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, one).await
    };
    let (mut open, mut failures, mut started) = (Vec::with_capacity(n), 0usize, 0usize);
    let mut tasks = JoinSet::new();
    while started < n.min(parallel) {
        tasks.spawn(open_one());
        started += 1;
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(Ok(stream))) => open.push(stream),
            _ => failures += 1,
        }
        // Stop early once failing is all the chain does: it has reached its limit.
        if started < n && failures < 200 {
            tasks.spawn(open_one());
            started += 1;
        }
    }
    (open, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_evenly_spaced_across_connections() {
        // 1000/s over 4 connections: request i of the whole schedule is due at i ms.
        let mut all: Vec<Duration> = (0..4)
            .flat_map(|k| (0..5).map(move |j| due(k, j, 4, 1000)))
            .collect();
        all.sort();
        for (i, at) in all.iter().enumerate() {
            let expected = Duration::from_millis(i as u64);
            let error = at.abs_diff(expected);
            assert!(error < Duration::from_nanos(10), "{i}: {at:?}");
        }
    }

    #[test]
    fn latency_counts_from_the_schedule_when_the_system_was_late() {
        let scheduled = Instant::now();
        let late = scheduled + Duration::from_millis(30);
        assert_eq!(
            origin(scheduled, late, false),
            scheduled,
            "behind: from the schedule"
        );
        assert_eq!(
            origin(scheduled, late, true),
            late,
            "timer slack is not the system's"
        );
    }

    #[test]
    fn percentiles_are_read_in_microseconds() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = latency(&h, 1000, 2.0);
        assert_eq!(l.rps, 500.0);
        assert!((l.p50_us - 500.0).abs() <= 1.0, "{}", l.p50_us);
        assert!((l.p99_us - 990.0).abs() <= 1.0, "{}", l.p99_us);
        assert!((l.p999_us - 999.0).abs() <= 1.0, "{}", l.p999_us);
    }

    #[tokio::test]
    async fn every_workload_runs_against_the_server() {
        let server = crate::server::Server::start().await.unwrap();
        let window = Window {
            warmup: Duration::from_millis(20),
            duration: Duration::from_millis(100),
        };
        for framing in [Framing::Raw, Framing::Http] {
            let read = || async {
                Ok(Reading {
                    sunk: server.sunk.load(Ordering::Relaxed),
                    cpu: None,
                })
            };
            let bulk = throughput(framing, server.addr, 2, window, read)
                .await
                .unwrap();
            assert!(bulk.gbps > 0.0 && bulk.cpu_s_per_gb.is_none());
            let closed = closed_loop(framing, server.addr, 2, window).await.unwrap();
            assert!(closed.rps > 0.0 && closed.p50_us > 0.0);
            let open = open_loop(framing, server.addr, 200, 2, window)
                .await
                .unwrap();
            assert!(open.rps > 0.0);
            let (rate, failures) = connect_rate(framing, server.addr, 2, window).await.unwrap();
            assert!(rate > 0.0 && failures == 0, "{framing:?}");
            let (idle, failures) = open_idle(framing, server.addr, 20, 4).await;
            assert_eq!((idle.len(), failures), (20, 0), "{framing:?}");
        }
    }
}
