//! Transparent interception: the netfilter rules that make an app's TCP go through its sidecar
//! (`sidewall iptables install | uninstall`, what an init container does).
//!
//! In the network namespace where it runs (the app's and its sidecar's):
//! - **Inbound**: new TCP connections arriving for the app's ports go to the sidecar's inbound
//!   listener (default 4643). The app's ports are every port but the excluded ones and the
//!   sidecar's own inbound and admin ports, or only `--inbound-ports`. Chain
//!   [`INBOUND_CHAIN`], jumped to from `nat PREROUTING`.
//! - **Outbound**: new TCP connections the app opens to anything outside the namespace go to
//!   the sidecar's outbound listener (`outbound.transparent`, default 4640), which reads the
//!   original destination with `SO_ORIGINAL_DST`. Loopback and the namespace's own addresses
//!   (everything routed through `lo`) and the excluded ports are left alone. Chains
//!   [`OUTBOUND_CHAIN`] (jumped to from `nat OUTPUT`) and [`REDIRECT_CHAIN`].
//! - **The sidecar's own sockets** are exempt, and only they: by the dedicated UID the sidecar
//!   runs as (`--proxy-uid`) or by a socket mark it sets (`--proxy-mark`, `SO_MARK`). Never by a
//!   UID the app could also run as: UID 0 and mark 0 are refused, since they would exempt every
//!   root process or every unmarked socket.
//! - **IPv6** gets the same rules through `ip6tables`. Where IPv6 `nat` is unavailable, the same
//!   chains go into the `filter` table instead and *refuse* (TCP reset) the new IPv6
//!   connections they would have redirected, so IPv6 can never go around the sidecar.
//! - **UDP** (and every protocol but TCP) is out of scope: neither redirected nor blocked. DNS
//!   over UDP keeps working; an app speaking UDP (QUIC, DNS to a peer) reaches it directly.
//!   Block UDP elsewhere (host firewall, network policy) where that matters.
//!
//! # What the sidecar must do
//! - Listen for redirected outbound connections on loopback, both families: `REDIRECT` from
//!   `OUTPUT` rewrites the destination to `127.0.0.1` or `::1`. Loopback only: the outbound
//!   port is deliberately not excluded from inbound redirection, so a remote peer dialing it
//!   lands on the inbound listener (mTLS), never on the outbound one.
//! - Listen for inbound on the wildcard addresses (`0.0.0.0`, `[::]`): `REDIRECT` from
//!   `PREROUTING` rewrites the destination to the receiving interface's first address.
//! - Read `SO_ORIGINAL_DST` (`SOL_IP`/`SOL_IPV6`, option 80) on each accepted socket. A
//!   connection that was not redirected has no conntrack entry (`ENOENT`) or its original
//!   destination is the listener itself: treat it as not redirected, never as a destination.
//! - Run as the UID given to `--proxy-uid` (no other process may), or set the `--proxy-mark`
//!   mark with `SO_MARK` on every socket it connects from, before `connect`. Otherwise its own
//!   connections come back to it, in a loop.
//!
//! # Why iptables (nft backend) rather than nftables
//! The `iptables` command is what init containers and CNI plugins already use (Istio's and
//! Linkerd's, kube-proxy), packaged everywhere with the nf_tables backend as the default
//! (Debian 11+, RHEL 8+), so our rules sit beside theirs and read the same way; whichever
//! backend `iptables` is set to, the rules are the same. `iptables-restore --noflush` rewrites
//! our chains atomically, and `REDIRECT`, `-m owner` and `-m mark` are well-trodden. The `nft`
//! command is rarer in images, and a native nftables table of ours would order against
//! iptables-nft rules only by hook priority, harder to reason about than one chain order.
//!
//! # Limits
//! The exemption holds against an app that cannot become the sidecar: an app with
//! `CAP_SETUID` can take the sidecar's UID, and one with `CAP_NET_ADMIN` (or `CAP_NET_RAW`,
//! since Linux 5.17) can set the sidecar's mark; `CAP_NET_ADMIN` can also rewrite the rules.
//! Containers run without `CAP_NET_ADMIN` by default but with `CAP_NET_RAW`, so prefer
//! `--proxy-uid`, and drop `CAP_SETUID` from apps that do not need it.
//!
//! [`RedirectPlan`] is pure rule generation; [`install`] and [`uninstall`] apply it through a
//! [`Netfilter`], which is [`SystemNetfilter`] (the commands, via `std::process::Command`) or a
//! double in tests.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sidewall_policies::policy::PortRange;

mod apply;

pub use apply::{CommandOutput, Ipv6Choice, Netfilter, SystemNetfilter, install, uninstall};

/// The sidecar's inbound listener unless the config says otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 4643;
/// The sidecar's transparent outbound listener unless the config says otherwise.
pub const DEFAULT_OUTBOUND_PORT: u16 = 4640;
/// The sidecar's admin listener unless the config says otherwise.
pub const DEFAULT_ADMIN_PORT: u16 = 4691;

/// Decides which inbound connections are redirected (jumped to from `PREROUTING`).
pub const INBOUND_CHAIN: &str = "SIDEWALL_INBOUND";
/// Decides which outbound connections are redirected (jumped to from `OUTPUT`).
pub const OUTBOUND_CHAIN: &str = "SIDEWALL_OUTBOUND";
/// Sends outbound connections to the outbound listener (`nat` table only).
pub const REDIRECT_CHAIN: &str = "SIDEWALL_REDIRECT";
/// Every chain `install` may create, in any table.
pub const CHAINS: [&str; 3] = [INBOUND_CHAIN, OUTBOUND_CHAIN, REDIRECT_CHAIN];

/// Why rules cannot be planned or applied.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// Neither or both of `--proxy-uid` and `--proxy-mark`.
    #[error(
        "give exactly one of --proxy-uid or --proxy-mark: the sidecar's own traffic must be exempt, and only it"
    )]
    Exemption,
    /// `--proxy-uid 0`.
    #[error(
        "--proxy-uid 0 would exempt every process running as root, the app included: run the sidecar as a dedicated UID that nothing else uses"
    )]
    RootUid,
    /// `--proxy-mark 0`.
    #[error(
        "--proxy-mark 0 is the mark of every unmarked socket: choose a non-zero mark that only the sidecar sets"
    )]
    ZeroMark,
    /// A listener port is zero, or two listeners share a port.
    #[error("sidecar listener ports: {0}")]
    Listeners(String),
    /// `--inbound-ports` names one of the sidecar's own ports.
    #[error("--inbound-ports: port {port} is the sidecar's own {listener} port, not an app port")]
    OwnPort {
        /// The port.
        port: u16,
        /// Which listener has it.
        listener: &'static str,
    },
    /// The sidecar config cannot be read.
    #[error("{0}: {1}")]
    ConfigRead(PathBuf, std::io::Error),
    /// The sidecar config does not parse.
    #[error("{0}")]
    Config(#[from] sidewall_policies::load::LoadError),
    /// A command is not installed.
    #[error("{program} not found: install iptables (nft backend), e.g. `apt-get install iptables`")]
    Missing {
        /// The command.
        program: String,
    },
    /// A command cannot be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The command.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not allowed to change netfilter rules here.
    #[error(
        "changing netfilter rules needs CAP_NET_ADMIN in this network namespace: run as root, like an init container"
    )]
    NotPermitted,
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// IPv6 is on, and neither redirecting nor refusing it works.
    #[error(
        "IPv6 is enabled in this namespace, but ip6tables cannot install rules ({reason}); IPv6 would bypass the sidecar. Install ip6tables, or disable IPv6 here (sysctl net.ipv6.conf.all.disable_ipv6=1)"
    )]
    Ipv6Unguarded {
        /// Why ip6tables failed.
        reason: String,
    },
}

/// The sidecar's listener ports: where redirected connections go, and which ports are its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerPorts {
    /// `inbound.listen`. Default is 4643.
    pub inbound: u16,
    /// `outbound.transparent`. Default is 4640.
    pub outbound: u16,
    /// `admin.listen`. Default is 4691.
    pub admin: u16,
}

impl Default for ListenerPorts {
    fn default() -> Self {
        Self {
            inbound: DEFAULT_INBOUND_PORT,
            outbound: DEFAULT_OUTBOUND_PORT,
            admin: DEFAULT_ADMIN_PORT,
        }
    }
}

/// Just the listener addresses of a sidecar config; every other field is ignored, since
/// `sidewall proxy` validates the file itself.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SidecarListeners {
    inbound: Listen,
    outbound: OutboundListen,
    admin: Listen,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Listen {
    listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutboundListen {
    transparent: Option<Transparent>,
}

/// `outbound.transparent` as `true`, as an address, or as a mapping with `listen`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Transparent {
    Enabled(#[allow(dead_code)] bool), // on or off, the port is the default
    Address(SocketAddr),
    Listener(Listen),
}

impl ListenerPorts {
    /// The ports of the sidecar config at `path` (`inbound.listen`, `outbound.transparent`,
    /// `admin.listen`), defaults for those it does not set.
    pub fn from_config(path: &Path) -> Result<Self, RedirectError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RedirectError::ConfigRead(path.to_path_buf(), e))?;
        Self::from_yaml(&path.display().to_string(), &text)
    }

    /// The ports of a sidecar config's text; `name` is used in errors.
    pub fn from_yaml(name: &str, text: &str) -> Result<Self, RedirectError> {
        let config: SidecarListeners = sidewall_policies::load::config_from_yaml(name, text)?;
        let defaults = Self::default();
        let port = |addr: Option<SocketAddr>, default: u16| addr.map_or(default, |a| a.port());
        let outbound = match config.outbound.transparent {
            Some(Transparent::Address(addr)) => addr.port(),
            Some(Transparent::Listener(listen)) => port(listen.listen, defaults.outbound),
            Some(Transparent::Enabled(_)) | None => defaults.outbound,
        };
        let ports = Self {
            inbound: port(config.inbound.listen, defaults.inbound),
            outbound,
            admin: port(config.admin.listen, defaults.admin),
        };
        ports
            .check()
            .map_err(|message| RedirectError::Listeners(format!("{name}: {message}")))?;
        Ok(ports)
    }

    fn check(&self) -> Result<(), String> {
        let named = [
            ("inbound", self.inbound),
            ("outbound", self.outbound),
            ("admin", self.admin),
        ];
        for (i, (name, port)) in named.iter().enumerate() {
            if *port == 0 {
                return Err(format!(
                    "the {name} listener has port 0; transparent mode needs a fixed port"
                ));
            }
            if let Some((other, _)) = named[i + 1..].iter().find(|(_, p)| p == port) {
                return Err(format!(
                    "the {name} and {other} listeners share port {port}"
                ));
            }
        }
        Ok(())
    }
}

/// How the sidecar's own sockets are told apart from the app's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exemption {
    /// Sockets owned by this UID (the sidecar runs as it, and nothing else does).
    Uid(u32),
    /// Sockets carrying this mark (the sidecar sets it with `SO_MARK`).
    Mark(u32),
}

impl Exemption {
    fn matcher(self) -> Vec<String> {
        match self {
            Exemption::Uid(uid) => args(&["-m", "owner", "--uid-owner", &uid.to_string()]),
            Exemption::Mark(mark) => args(&["-m", "mark", "--mark", &format!("{mark:#x}")]),
        }
    }
}

impl fmt::Display for Exemption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exemption::Uid(uid) => write!(f, "uid {uid}"),
            Exemption::Mark(mark) => write!(f, "mark {mark:#x}"),
        }
    }
}

/// What `install` is asked for, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The sidecar's listener ports.
    pub listeners: ListenerPorts,
    /// The app ports whose inbound connections are redirected. Default (`None`): every port
    /// but the excluded ones and the sidecar's own.
    pub inbound_ports: Option<Vec<PortRange>>,
    /// Inbound ports never redirected. Default is none.
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Destination ports the app reaches directly. Default is none.
    pub exclude_outbound_ports: Vec<PortRange>,
    /// The sidecar's dedicated UID (exactly one of this and `proxy_mark`; never 0).
    pub proxy_uid: Option<u32>,
    /// The mark the sidecar sets on its sockets (exactly one of this and `proxy_uid`; never 0).
    pub proxy_mark: Option<u32>,
}

/// An IP version: which command family applies the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    Ipv4,
    /// `ip6tables`.
    Ipv6,
}

impl Family {
    /// The rule command.
    pub fn program(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }

    /// The batch command.
    pub fn restore_program(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables-restore",
            Family::Ipv6 => "ip6tables-restore",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// What happens to a connection the rules catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Redirected to the sidecar (`nat` table).
    Redirect,
    /// Refused with a TCP reset (`filter` table): IPv6 where its `nat` table is unavailable.
    Refuse,
}

impl Treatment {
    /// The table its rules live in.
    pub fn table(self) -> &'static str {
        match self {
            Treatment::Redirect => "nat",
            Treatment::Refuse => "filter",
        }
    }

    /// The built-in chains that jump to ours: (inbound, outbound).
    fn hooks(self) -> (&'static str, &'static str) {
        match self {
            Treatment::Redirect => ("PREROUTING", "OUTPUT"),
            Treatment::Refuse => ("INPUT", "OUTPUT"),
        }
    }
}

/// One rule: `-A <chain> <spec>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain it is appended to.
    pub chain: &'static str,
    /// Matches and target, as iptables arguments.
    pub spec: Vec<String>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec.join(" "))
    }
}

/// The rules of one family and table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The IP version.
    pub family: Family,
    /// Redirect (`nat`) or refuse (`filter`).
    pub treatment: Treatment,
    /// Our chains, created (or flushed) and filled.
    pub chains: Vec<&'static str>,
    /// The rules in our chains, in order.
    pub rules: Vec<Rule>,
    /// The rules in built-in chains that jump to ours (inserted first in their chain).
    pub jumps: Vec<Rule>,
}

impl Ruleset {
    /// `iptables-restore --noflush` input that rewrites our chains (declaring a chain flushes
    /// it) and inserts the given jumps, in one transaction.
    pub fn restore_input(&self, jumps: &[&Rule]) -> String {
        let mut text = format!("*{}\n", self.treatment.table());
        for chain in &self.chains {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in &self.rules {
            text.push_str(&format!("{rule}\n"));
        }
        for jump in jumps {
            text.push_str(&format!("-I {} 1 {}\n", jump.chain, jump.spec.join(" ")));
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// A validated request: one exemption that cannot match everything, ports that do not collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectPlan {
    listeners: ListenerPorts,
    inbound_ports: Option<Vec<PortRange>>,
    exclude_inbound_ports: Vec<PortRange>,
    exclude_outbound_ports: Vec<PortRange>,
    exemption: Exemption,
}

impl RedirectPlan {
    /// Checks `options`.
    pub fn new(options: Options) -> Result<Self, RedirectError> {
        let exemption = match (options.proxy_uid, options.proxy_mark) {
            (Some(0), None) => return Err(RedirectError::RootUid),
            (None, Some(0)) => return Err(RedirectError::ZeroMark),
            (Some(uid), None) => Exemption::Uid(uid),
            (None, Some(mark)) => Exemption::Mark(mark),
            _ => return Err(RedirectError::Exemption),
        };
        let listeners = options.listeners;
        listeners.check().map_err(RedirectError::Listeners)?;
        for range in options.inbound_ports.iter().flatten() {
            for (port, listener) in [(listeners.inbound, "inbound"), (listeners.admin, "admin")] {
                if range.contains(port) {
                    return Err(RedirectError::OwnPort { port, listener });
                }
            }
        }
        Ok(Self {
            listeners,
            inbound_ports: options.inbound_ports,
            exclude_inbound_ports: options.exclude_inbound_ports,
            exclude_outbound_ports: options.exclude_outbound_ports,
            exemption,
        })
    }

    /// How the sidecar's sockets are exempt.
    pub fn exemption(&self) -> Exemption {
        self.exemption
    }

    /// The listener ports the rules point at.
    pub fn listeners(&self) -> ListenerPorts {
        self.listeners
    }

    /// The rules for one IP version and treatment.
    pub fn rules(&self, family: Family, treatment: Treatment) -> Ruleset {
        let mut rules = self.inbound_rules(treatment);
        rules.extend(self.outbound_rules(treatment));
        let (inbound_hook, outbound_hook) = treatment.hooks();
        let jump = |chain, to| Rule {
            chain,
            spec: args(&["-p", "tcp", "-j", to]),
        };
        Ruleset {
            family,
            treatment,
            chains: match treatment {
                Treatment::Redirect => CHAINS.to_vec(),
                Treatment::Refuse => vec![INBOUND_CHAIN, OUTBOUND_CHAIN],
            },
            rules,
            jumps: vec![
                jump(inbound_hook, INBOUND_CHAIN),
                jump(outbound_hook, OUTBOUND_CHAIN),
            ],
        }
    }

    /// [`INBOUND_CHAIN`]: the sidecar's own ports and the excluded ones pass, the app's ports
    /// are caught.
    fn inbound_rules(&self, treatment: Treatment) -> Vec<Rule> {
        let rule = |spec| Rule {
            chain: INBOUND_CHAIN,
            spec,
        };
        let mut rules = Vec::new();
        // `filter INPUT` sees loopback traffic (the sidecar → app hop); `nat PREROUTING` never
        // does.
        if treatment == Treatment::Refuse {
            rules.push(rule(args(&["-i", "lo", "-j", "RETURN"])));
        }
        let own = [self.listeners.inbound, self.listeners.admin].map(PortRange::single);
        for range in own.iter().flatten().chain(&self.exclude_inbound_ports) {
            rules.push(rule(dport(*range, &["-j", "RETURN"])));
        }
        let caught = catch(treatment, self.listeners.inbound);
        match &self.inbound_ports {
            None => rules.push(rule([args(&["-p", "tcp"]), caught].concat())),
            Some(ports) => {
                for range in ports {
                    rules.push(rule([dport(*range, &[]), caught.clone()].concat()));
                }
            }
        }
        rules
    }

    /// [`OUTBOUND_CHAIN`] (and [`REDIRECT_CHAIN`]): the sidecar's sockets pass first, then
    /// what stays in the namespace and the excluded ports; the rest is caught.
    fn outbound_rules(&self, treatment: Treatment) -> Vec<Rule> {
        let rule = |spec| Rule {
            chain: OUTBOUND_CHAIN,
            spec,
        };
        let mut rules = vec![
            rule([self.exemption.matcher(), args(&["-j", "RETURN"])].concat()),
            rule(args(&["-o", "lo", "-j", "RETURN"])),
        ];
        for range in &self.exclude_outbound_ports {
            rules.push(rule(dport(*range, &["-j", "RETURN"])));
        }
        let caught = catch(treatment, self.listeners.outbound);
        match treatment {
            Treatment::Redirect => {
                rules.push(rule(args(&["-j", REDIRECT_CHAIN])));
                rules.push(Rule {
                    chain: REDIRECT_CHAIN,
                    spec: [args(&["-p", "tcp"]), caught].concat(),
                });
            }
            Treatment::Refuse => rules.push(rule([args(&["-p", "tcp"]), caught].concat())),
        }
        rules
    }
}

/// The end of a rule that catches a connection: redirect it to `port`, or refuse it. Only new
/// connections are refused, so replies on excluded ports and to the sidecar pass (`nat` sees
/// only the first packet of a connection anyway).
fn catch(treatment: Treatment, port: u16) -> Vec<String> {
    match treatment {
        Treatment::Redirect => args(&["-j", "REDIRECT", "--to-ports", &port.to_string()]),
        Treatment::Refuse => args(&["--syn", "-j", "REJECT", "--reject-with", "tcp-reset"]),
    }
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `-p tcp --dport P` (or `A:B`) followed by `rest`.
fn dport(range: PortRange, rest: &[&str]) -> Vec<String> {
    let ports = if range.start() == range.end() {
        range.start().to_string()
    } else {
        format!("{}:{}", range.start(), range.end())
    };
    [args(&["-p", "tcp", "--dport", &ports]), args(rest)].concat()
}

#[cfg(test)]
mod tests;
