//! `sidewall-proxy`: the sidecar alone, for hosts and images that run nothing else. It does
//! what `sidewall proxy` does (the same code: [`sidewall_proxy::process::run_sidecar`]) in a
//! binary without the control plane, its stores, the dashboard and the CLI: 9.9 MB stripped
//! against 16.9, and about 3 MiB less resident per idle sidecar, since a sidecar's idle memory
//! is mostly the binary's code pages it maps (bench/RESULTS.md). Its four flags are read by
//! hand, so that no argument parser's code is among those pages.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
The Sidewall sidecar alone (the same as `sidewall proxy`, in a smaller binary).

Usage: sidewall-proxy --config FILE [--check] [--log-format human|json]

Options:
      --config FILE        The sidecar's YAML configuration (docs/proxy.md describes every
                           field) [env: SIDEWALL_PROXY_CONFIG]
      --check              Only check the configuration: print a summary and exit 0, or the
                           error and exit 2
      --log-format FORMAT  human (readable lines) or json (one object per line)
                           [env: SIDEWALL_LOG_FORMAT] [default: human]
  -h, --help               Print this help
  -V, --version            Print the version
";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
struct Args {
    config: PathBuf,
    check: bool,
    json: bool,
}

/// Help or version asked for, or a usage error: what to print and the exit code.
#[derive(Debug, PartialEq)]
struct Stop(String, u8);

fn parse(
    mut args: impl Iterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Args, Stop> {
    let usage_error = |what: String| {
        Stop(
            format!(
                "error: {what}\n\nUsage: sidewall-proxy --config FILE [--check] [--log-format human|json]\n\nFor more information, try '--help'.\n"
            ),
            2,
        )
    };
    let (mut config, mut check, mut format) = (None, false, None);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| usage_error(format!("{name} needs a value")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Err(Stop(USAGE.to_owned(), 0)),
            "-V" | "--version" => {
                return Err(Stop(
                    format!("sidewall-proxy {}\n", env!("CARGO_PKG_VERSION")),
                    0,
                ));
            }
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--check" if inline.is_none() => check = true,
            "--log-format" => format = Some(value("--log-format")?),
            _ => return Err(usage_error(format!("unexpected argument '{arg}'"))),
        }
    }
    let config = config
        .or_else(|| env("SIDEWALL_PROXY_CONFIG").map(PathBuf::from))
        .ok_or_else(|| usage_error("--config FILE is required".into()))?;
    let json = match format.or_else(|| env("SIDEWALL_LOG_FORMAT")).as_deref() {
        None | Some("human") => false,
        Some("json") => true,
        Some(other) => {
            return Err(usage_error(format!(
                "--log-format {other}: say human or json"
            )));
        }
    };
    Ok(Args {
        config,
        check,
        json,
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1), |name| std::env::var(name).ok()) {
        Ok(args) => args,
        Err(Stop(text, 0)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(Stop(text, code)) => {
            eprint!("{text}");
            return ExitCode::from(code);
        }
    };
    // One crypto provider for the whole process (aws-lc-rs); failure means one is installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    sidewall_proxy::process::init_logging(args.json);
    sidewall_proxy::process::run_sidecar(&args.config, args.check)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Args, Stop> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse(args.iter().map(|a| (*a).to_owned()), move |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn flags_env_and_errors() {
        let args = run(&["--config", "a.yaml", "--check"], &[]).unwrap();
        assert_eq!(
            args,
            Args {
                config: "a.yaml".into(),
                check: true,
                json: false
            }
        );
        let args = run(&["--config=b.yaml", "--log-format=json"], &[]).unwrap();
        assert!(args.json && args.config == std::path::Path::new("b.yaml"));
        let args = run(
            &[],
            &[
                ("SIDEWALL_PROXY_CONFIG", "c.yaml"),
                ("SIDEWALL_LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert!(args.json && args.config == std::path::Path::new("c.yaml"));
        let Err(Stop(help, 0)) = run(&["--help"], &[]) else {
            panic!("help")
        };
        assert!(help.contains("--config FILE") && help.contains("SIDEWALL_PROXY_CONFIG"));
        for (bad, says) in [
            (&["--check"][..], "--config FILE is required"),
            (&["--config"][..], "--config needs a value"),
            (
                &["--config", "a", "--log-format", "xml"][..],
                "say human or json",
            ),
            (
                &["--config", "a", "--verbose"][..],
                "unexpected argument '--verbose'",
            ),
            (
                &["--config", "a", "--check=yes"][..],
                "unexpected argument '--check=yes'",
            ),
        ] {
            let Err(Stop(text, 2)) = run(bad, &[]) else {
                panic!("{bad:?} accepted")
            };
            assert!(text.contains(says), "{bad:?}: {text}");
        }
    }
}
