//! `sidewall iptables install | uninstall`: transparent interception in the current network
//! namespace (what an init container runs). The rules and their reasons live in
//! `sidewall_proxy::redirect`.

use std::path::PathBuf;
use std::process::ExitCode;

use sidewall_policies::policy::PortRange;
use sidewall_proxy::redirect::{
    self, Family, Ipv6Choice, ListenerPorts, Options, RedirectPlan, SystemNetfilter, Treatment,
};

/// The `iptables` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum IptablesCommand {
    /// Send the app's TCP through its sidecar in this network namespace: inbound to the
    /// inbound listener, outbound to the transparent outbound listener. Run as root before the
    /// app starts. Installing again rewrites the same rules.
    Install(InstallArgs),
    /// Remove exactly what `install` added (its chains and the jumps to them); succeeds when
    /// nothing is installed.
    Uninstall,
}

/// Flags of `sidewall iptables install`.
#[derive(clap::Args)]
pub(crate) struct InstallArgs {
    /// The sidecar's config: the inbound, transparent outbound and admin listener ports are
    /// read from it (default 4643, 4640 and 4691).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// App ports whose inbound connections go to the sidecar, e.g. 8080,9000-9010 (default:
    /// every port but the excluded ones and the sidecar's own).
    #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port_range)]
    inbound_ports: Option<Vec<PortRange>>,
    /// Inbound ports that reach the app directly.
    #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port_range)]
    exclude_inbound_ports: Vec<PortRange>,
    /// Destination ports the app reaches directly.
    #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port_range)]
    exclude_outbound_ports: Vec<PortRange>,
    /// The dedicated UID the sidecar runs as; its sockets are not redirected (never 0).
    #[arg(long, value_name = "UID")]
    proxy_uid: Option<u32>,
    /// The mark the sidecar sets on its sockets (SO_MARK), decimal or 0x-hex; marked sockets
    /// are not redirected (never 0).
    #[arg(long, value_name = "MARK", value_parser = mark)]
    proxy_mark: Option<u32>,
    /// IPv6: redirect, or refuse new connections; `auto` refuses where IPv6 nat is unavailable.
    #[arg(long, value_enum, default_value_t = Ipv6Arg::Auto)]
    ipv6: Ipv6Arg,
    /// Print the iptables-restore input instead of applying it (needs no privileges).
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Ipv6Arg {
    Auto,
    Redirect,
    Refuse,
}

fn port_range(text: &str) -> Result<PortRange, String> {
    PortRange::parse(text).map_err(|e| e.to_string())
}

fn mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a 32-bit mark (decimal or 0x-hex)"))
}

pub(crate) fn run(command: IptablesCommand) -> ExitCode {
    let report = match command {
        IptablesCommand::Install(args) => {
            let plan = match plan(&args) {
                Ok(plan) => plan,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(2);
                }
            };
            if args.dry_run {
                print!("{}", dry_run(&plan, args.ipv6));
                return ExitCode::SUCCESS;
            }
            let choice = match args.ipv6 {
                Ipv6Arg::Auto => Ipv6Choice::Auto,
                Ipv6Arg::Redirect => Ipv6Choice::Redirect,
                Ipv6Arg::Refuse => Ipv6Choice::Refuse,
            };
            SystemNetfilter::new().and_then(|mut net| redirect::install(&plan, choice, &mut net))
        }
        IptablesCommand::Uninstall => {
            SystemNetfilter::new().and_then(|mut net| redirect::uninstall(&mut net))
        }
    };
    match report {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

fn plan(args: &InstallArgs) -> Result<RedirectPlan, redirect::RedirectError> {
    let listeners = match &args.config {
        Some(path) => ListenerPorts::from_config(path)?,
        None => ListenerPorts::default(),
    };
    RedirectPlan::new(Options {
        listeners,
        inbound_ports: args.inbound_ports.clone(),
        exclude_inbound_ports: args.exclude_inbound_ports.clone(),
        exclude_outbound_ports: args.exclude_outbound_ports.clone(),
        proxy_uid: args.proxy_uid,
        proxy_mark: args.proxy_mark,
    })
}

fn dry_run(plan: &RedirectPlan, ipv6: Ipv6Arg) -> String {
    let v6 = match ipv6 {
        Ipv6Arg::Refuse => Treatment::Refuse,
        Ipv6Arg::Auto | Ipv6Arg::Redirect => Treatment::Redirect,
    };
    let mut text = String::new();
    for (family, treatment) in [(Family::Ipv4, Treatment::Redirect), (Family::Ipv6, v6)] {
        let ruleset = plan.rules(family, treatment);
        text.push_str(&format!(
            "# {family}: {} --noflush (jumps are inserted only where missing)\n",
            family.restore_program()
        ));
        if let (Family::Ipv6, Ipv6Arg::Auto) = (family, ipv6) {
            text.push_str("# (where IPv6 nat is unavailable: the filter table, refusing)\n");
        }
        text.push_str(&ruleset.restore_input(&ruleset.jumps.iter().collect::<Vec<_>>()));
    }
    text
}
