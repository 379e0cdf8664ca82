//! Applying a [`RedirectPlan`]: the commands run, what they are asked, and the report of what
//! changed.

use std::io::Write;
use std::process::{Command, Stdio};

use super::{CHAINS, Family, RedirectError, RedirectPlan, Ruleset, Treatment};

/// What a finished command printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Where rules are applied: [`SystemNetfilter`], or a double in tests.
pub trait Netfilter {
    /// Runs `program args`, with `input` on its standard input.
    fn run(
        &mut self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<CommandOutput, RedirectError>;

    /// Whether this kernel has IPv6 at all.
    fn has_ipv6(&self) -> bool;
}

/// The real commands, in the current network namespace.
#[derive(Debug)]
pub struct SystemNetfilter(());

impl SystemNetfilter {
    /// Checks that this process may change netfilter rules (`CAP_NET_ADMIN`).
    pub fn new() -> Result<Self, RedirectError> {
        // CAP_NET_ADMIN is bit 12 of the effective set. Without /proc, let the commands say.
        let effective = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
                u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
            });
        match effective {
            Some(caps) if caps & (1 << 12) == 0 => Err(RedirectError::NotPermitted),
            _ => Ok(Self(())),
        }
    }
}

impl Netfilter for SystemNetfilter {
    fn run(
        &mut self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<CommandOutput, RedirectError> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => RedirectError::Missing {
                    program: program.to_owned(),
                },
                _ => RedirectError::Spawn {
                    program: program.to_owned(),
                    source,
                },
            })?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            // A write error means the command exited early; its status and stderr say why.
            let _ = stdin.write_all(text.as_bytes());
        }
        let output = child
            .wait_with_output()
            .map_err(|source| RedirectError::Spawn {
                program: program.to_owned(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if !output.status.success()
            && (stderr.contains("Permission denied") || stderr.contains("must be root"))
        {
            return Err(RedirectError::NotPermitted);
        }
        Ok(CommandOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr,
        })
    }

    fn has_ipv6(&self) -> bool {
        std::path::Path::new("/proc/net/if_inet6").exists()
    }
}

/// What `install` does with IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv6Choice {
    /// Redirect like IPv4; where IPv6 `nat` is unavailable, refuse. The default.
    #[default]
    Auto,
    /// Redirect like IPv4, or fail.
    Redirect,
    /// Refuse the new IPv6 connections that would be redirected.
    Refuse,
}

/// Installs `plan` in the current network namespace: IPv4 redirected, IPv6 per `ipv6`. Our
/// chains are rewritten in one transaction per table and the jumps to them added only where
/// missing, so installing twice leaves the same rules. Returns what it did, line by line.
pub fn install(
    plan: &RedirectPlan,
    ipv6: Ipv6Choice,
    net: &mut impl Netfilter,
) -> Result<Vec<String>, RedirectError> {
    let mut report = Vec::new();
    apply(
        &plan.rules(Family::Ipv4, Treatment::Redirect),
        net,
        &mut report,
    )?;

    if !net.has_ipv6() {
        report.push("IPv6: not available in this kernel; nothing to intercept".to_owned());
    } else {
        let redirect = plan.rules(Family::Ipv6, Treatment::Redirect);
        let refuse = plan.rules(Family::Ipv6, Treatment::Refuse);
        let unguarded = |error: RedirectError| match error {
            RedirectError::Failed { stderr, .. } => RedirectError::Ipv6Unguarded { reason: stderr },
            RedirectError::Missing { program } => RedirectError::Ipv6Unguarded {
                reason: format!("{program} not found"),
            },
            other => other,
        };
        match ipv6 {
            Ipv6Choice::Redirect => apply(&redirect, net, &mut report)?,
            Ipv6Choice::Refuse => apply(&refuse, net, &mut report).map_err(unguarded)?,
            Ipv6Choice::Auto => match write(&redirect, net, &mut report) {
                Ok(()) => remove_other(&redirect, net, &mut report)?,
                Err(RedirectError::Failed { stderr, .. }) => {
                    report.push(format!(
                        "IPv6: the nat table is unavailable ({stderr}); refusing new IPv6 TCP connections instead of redirecting them"
                    ));
                    apply(&refuse, net, &mut report).map_err(unguarded)?;
                }
                Err(error) => return Err(unguarded(error)),
            },
        }
    }
    report.push(format!(
        "the sidecar's own sockets ({}) are exempt; UDP is not intercepted",
        plan.exemption()
    ));
    Ok(report)
}

/// Writes one ruleset, then removes our chains from the other table of its family.
fn apply(
    ruleset: &Ruleset,
    net: &mut impl Netfilter,
    report: &mut Vec<String>,
) -> Result<(), RedirectError> {
    write(ruleset, net, report)?;
    remove_other(ruleset, net, report)
}

/// Rewrites our chains in the ruleset's table and adds the missing jumps, in one transaction.
fn write(
    ruleset: &Ruleset,
    net: &mut impl Netfilter,
    report: &mut Vec<String>,
) -> Result<(), RedirectError> {
    let family = ruleset.family;
    let table = ruleset.treatment.table();
    let mut missing = Vec::new();
    for jump in &ruleset.jumps {
        let mut check = vec!["-w", "-t", table, "-C", jump.chain];
        check.extend(jump.spec.iter().map(String::as_str));
        // `-C` fails when the rule, or our chain, is absent; either way the jump is added.
        if !net.run(family.program(), &check, None)?.success {
            missing.push(jump);
        }
    }
    run_checked(
        net,
        family.restore_program(),
        &["-w", "--noflush"],
        Some(&ruleset.restore_input(&missing)),
    )?;
    report.push(format!(
        "{family}: wrote chains {} in the {} table ({} rules):",
        ruleset.chains.join(", "),
        table,
        ruleset.rules.len(),
    ));
    report.extend(ruleset.rules.iter().map(|rule| format!("  {rule}")));
    report.extend(ruleset.jumps.iter().map(|jump| {
        let state = if missing.contains(&jump) {
            "added"
        } else {
            "already present"
        };
        format!("  {jump} ({state})")
    }));
    Ok(())
}

/// Removes our chains from the table of the family that `ruleset` does not use (left by an
/// install with the other IPv6 treatment).
fn remove_other(
    ruleset: &Ruleset,
    net: &mut impl Netfilter,
    report: &mut Vec<String>,
) -> Result<(), RedirectError> {
    let other = match ruleset.treatment {
        Treatment::Redirect => Treatment::Refuse,
        Treatment::Refuse => Treatment::Redirect,
    };
    remove(net, ruleset.family, other.table(), report)
}

/// Removes every jump to our chains and our chains themselves, IPv4 and IPv6, `nat` and
/// `filter`; nothing else. Succeeds, saying so, when nothing is installed.
pub fn uninstall(net: &mut impl Netfilter) -> Result<Vec<String>, RedirectError> {
    let mut report = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let before = report.len();
        for table in ["nat", "filter"] {
            match remove(net, family, table, &mut report) {
                Ok(()) => {}
                Err(RedirectError::Missing { program }) => {
                    report.push(format!("{family}: {program} not found; nothing to remove"));
                    break;
                }
                Err(error) => return Err(error),
            }
        }
        if report.len() == before {
            report.push(format!(
                "{family}: no Sidewall rules installed; nothing to remove"
            ));
        }
    }
    Ok(report)
}

/// Removes our jumps and chains from one table, reporting each removal.
fn remove(
    net: &mut impl Netfilter,
    family: Family,
    table: &str,
    report: &mut Vec<String>,
) -> Result<(), RedirectError> {
    let listing = net.run(family.program(), &["-w", "-t", table, "-S"], None)?;
    if !listing.success {
        // A table that cannot be listed holds nothing of ours.
        return Ok(());
    }
    let ours = |name: &str| CHAINS.contains(&name);
    let mut chains = Vec::new();
    for line in listing.stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["-N", chain] if ours(chain) => chains.push(*chain),
            ["-A", chain, .., "-j", target] if !ours(chain) && ours(target) => {
                if line.contains('"') {
                    return Err(RedirectError::Failed {
                        command: format!("{} -t {table} -D", family.program()),
                        stderr: format!("cannot safely delete `{line}`; remove it by hand"),
                    });
                }
                let mut delete = vec!["-w", "-t", table, "-D"];
                delete.extend(&words[1..]);
                run_checked(net, family.program(), &delete, None)?;
                report.push(format!("{family}: removed {line} from the {table} table"));
            }
            _ => {}
        }
    }
    // Flush all before deleting any: one of our chains jumps to another.
    for flag in ["-F", "-X"] {
        for chain in &chains {
            run_checked(
                net,
                family.program(),
                &["-w", "-t", table, flag, chain],
                None,
            )?;
        }
    }
    if !chains.is_empty() {
        report.push(format!(
            "{family}: deleted chains {} from the {table} table",
            chains.join(", ")
        ));
    }
    Ok(())
}

/// Runs a command that must succeed.
fn run_checked(
    net: &mut impl Netfilter,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<CommandOutput, RedirectError> {
    let output = net.run(program, args, input)?;
    if output.success {
        Ok(output)
    } else {
        Err(RedirectError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: output.stderr,
        })
    }
}
