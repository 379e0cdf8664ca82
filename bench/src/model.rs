//! The names a report uses, fixed by issue 8 so reports stay comparable across versions:
//! contenders, modes, workloads and metrics, with their units and which direction is better.

use std::fmt;

/// Something that forwards the load (or `direct`: nothing does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Contender {
    /// Client straight to server: the limit.
    Direct,
    /// Two hops of a minimal tokio `copy_bidirectional` relay, plaintext.
    CopyBaseline,
    /// Two hops that move bytes with `splice(2)` only (no user-space copy), plaintext: the
    /// upper bound for any proxy chain here.
    SpliceBaseline,
    /// HAProxy, TCP mode, mTLS between the hops.
    Haproxy,
    /// nginx stream module, mTLS between the hops.
    Nginx,
    /// stunnel, client mode then server mode.
    Stunnel,
    /// Two Sidewall sidecars, L4 (outbound route → mTLS → inbound port), as configured by
    /// default: app connections carried as streams of one shared sidecar connection.
    SidewallL4,
    /// The same with `sidecarConnections: perConnection`: one mTLS connection (resumed
    /// session) per app connection. Not one of the issue's names: it shows what sharing buys.
    SidewallL4Dedicated,
    /// Two Sidewall sidecars forwarding HTTP with per-request authorization.
    SidewallHttp,
    /// A user's own deployment (`--target HOST:PORT`): whatever stands between that address
    /// and the `sidewall-bench serve` app behind it. Not in [`Contender::ALL`]: it runs only in
    /// target mode, beside `direct` (`--direct`) and nothing else.
    Target,
}

impl Contender {
    /// Every contender, in report order.
    pub const ALL: [Contender; 9] = [
        Contender::Direct,
        Contender::CopyBaseline,
        Contender::SpliceBaseline,
        Contender::Haproxy,
        Contender::Nginx,
        Contender::Stunnel,
        Contender::SidewallL4,
        Contender::SidewallL4Dedicated,
        Contender::SidewallHttp,
    ];

    /// The peers Sidewall is compared with.
    pub const PEERS: [Contender; 3] = [Contender::Haproxy, Contender::Nginx, Contender::Stunnel];

    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::CopyBaseline => "copy-baseline",
            Contender::SpliceBaseline => "splice-baseline",
            Contender::Haproxy => "haproxy",
            Contender::Nginx => "nginx",
            Contender::Stunnel => "stunnel",
            Contender::SidewallL4 => "sidewall-l4",
            Contender::SidewallL4Dedicated => "sidewall-l4-dedicated",
            Contender::SidewallHttp => "sidewall-http",
            Contender::Target => "target",
        }
    }

    /// The contender called `name` (`target` included).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([Contender::Target])
            .find(|c| c.name() == name)
    }

    /// `plain` for the baselines, `mtls` for everything that encrypts between its hops.
    pub fn mode(self) -> Mode {
        match self {
            Contender::Direct | Contender::CopyBaseline | Contender::SpliceBaseline => Mode::Plain,
            Contender::Target => Mode::Deployment,
            _ => Mode::Mtls,
        }
    }

    /// Whether this is one of the peer proxies.
    pub fn is_peer(self) -> bool {
        Self::PEERS.contains(&self)
    }

    /// Whether this is Sidewall.
    pub fn is_sidewall(self) -> bool {
        matches!(
            self,
            Contender::SidewallL4 | Contender::SidewallL4Dedicated | Contender::SidewallHttp
        )
    }
}

impl fmt::Display for Contender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What travels between the two hops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plaintext TCP (or no hop at all).
    Plain,
    /// TLS 1.3 with certificates both ways.
    Mtls,
    /// Whatever the user's deployment does between the address given and its app.
    Deployment,
}

impl Mode {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Mtls => "mtls",
            Mode::Deployment => "deployment",
        }
    }
}

/// A kind of load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// One bulk stream, client to server.
    Throughput1,
    /// Eight bulk streams at once.
    Throughput8,
    /// 1 KiB request, 1 KiB response, one connection, closed loop.
    RrC1,
    /// The same on 16 connections.
    RrC16,
    /// The same on 64 connections.
    RrC64,
    /// Open loop: requests sent on a fixed schedule, latency from the scheduled time.
    RrFixedRate,
    /// New connection, one exchange, close.
    ConnectRate,
    /// Memory idle, and with many idle connections open.
    Idle10k,
}

impl Workload {
    /// Every workload, in the order a contender runs them.
    pub const ALL: [Workload; 8] = [
        Workload::Throughput1,
        Workload::Throughput8,
        Workload::RrC1,
        Workload::RrC16,
        Workload::RrC64,
        Workload::RrFixedRate,
        Workload::ConnectRate,
        Workload::Idle10k,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Throughput1 => "throughput-1",
            Workload::Throughput8 => "throughput-8",
            Workload::RrC1 => "rr-c1",
            Workload::RrC16 => "rr-c16",
            Workload::RrC64 => "rr-c64",
            Workload::RrFixedRate => "rr-fixed-rate",
            Workload::ConnectRate => "connect-rate",
            Workload::Idle10k => "idle-10k",
        }
    }

    /// The workload called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == name)
    }
}

/// A measured quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Gigabits per second delivered to the server.
    Gbps,
    /// Requests (or connections) completed per second.
    Rps,
    /// Median latency.
    P50Us,
    /// 99th percentile latency.
    P99Us,
    /// 99.9th percentile latency.
    P999Us,
    /// CPU seconds of the proxy processes per 10^9 bytes delivered.
    CpuSPerGb,
    /// Resident memory per proxy process tree, idle.
    RssMib,
    /// Resident memory of the pair per idle connection open through it.
    RssKibPerConn,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 8] = [
        Metric::Gbps,
        Metric::Rps,
        Metric::P50Us,
        Metric::P99Us,
        Metric::P999Us,
        Metric::CpuSPerGb,
        Metric::RssMib,
        Metric::RssKibPerConn,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Gbps => "gbps",
            Metric::Rps => "rps",
            Metric::P50Us => "p50_us",
            Metric::P99Us => "p99_us",
            Metric::P999Us => "p999_us",
            Metric::CpuSPerGb => "cpu_s_per_gb",
            Metric::RssMib => "rss_mib",
            Metric::RssKibPerConn => "rss_kib_per_conn",
        }
    }

    /// The metric called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The unit of its values.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Gbps => "Gbit/s",
            Metric::Rps => "1/s",
            Metric::P50Us | Metric::P99Us | Metric::P999Us => "us",
            Metric::CpuSPerGb => "s/GB",
            Metric::RssMib => "MiB",
            Metric::RssKibPerConn => "KiB",
        }
    }

    /// Whether a larger value is better (throughput, rates) or worse (latency, cost).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Gbps | Metric::Rps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_issue() {
        let contenders: Vec<_> = Contender::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(
            contenders,
            [
                "direct",
                "copy-baseline",
                "splice-baseline",
                "haproxy",
                "nginx",
                "stunnel",
                "sidewall-l4",
                "sidewall-l4-dedicated",
                "sidewall-http"
            ]
        );
        for c in Contender::ALL {
            assert_eq!(Contender::from_name(c.name()), Some(c));
        }
        for w in Workload::ALL {
            assert_eq!(Workload::from_name(w.name()), Some(w));
        }
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
        }
        assert_eq!(Contender::from_name("envoy"), None);
        assert_eq!(Contender::from_name("target"), Some(Contender::Target));
        assert!(!Contender::ALL.contains(&Contender::Target));
    }
}
