//! `sidewall probe URL`: a health check for images without curl (Docker `HEALTHCHECK`,
//! Kubernetes exec probes). One plain HTTP/1.1 `GET` (the admin listeners speak plain HTTP):
//! exit 0 on a 2xx answer within the timeout, 1 on anything else (refused, timed out, another
//! status), 2 on a URL it cannot use.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Flags of `sidewall probe`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// What to check: `http://HOST:PORT/PATH`, e.g. `http://127.0.0.1:4691/ready` (a sidecar)
    /// or `http://127.0.0.1:4690/ready` (a control plane).
    url: String,
    /// How long the whole check may take, connect and answer included.
    #[arg(long, default_value = "2", value_name = "SECONDS", env = "SIDEWALL_PROBE_TIMEOUT_SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=300))]
    timeout_seconds: u64,
}

/// `http://host:port/path` → (`host:port`, `path`).
fn split(url: &str) -> Result<(&str, &str), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("{url:?}: only http:// URLs (the admin listeners speak plain HTTP)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let valid = !authority.is_empty()
        && authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        })
        && path.bytes().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(format!("{url:?}: expected http://HOST:PORT/PATH"));
    }
    Ok((authority, path))
}

/// The status code of one `GET`, or why there is none.
fn status(authority: &str, path: &str, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let addresses: Vec<_> = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .collect();
    let mut last = format!("no address for {authority}");
    for address in addresses {
        let mut stream =
            match TcpStream::connect_timeout(&address, left().max(Duration::from_millis(1))) {
                Ok(stream) => stream,
                Err(error) => {
                    last = format!("{address}: {error}");
                    continue;
                }
            };
        let io = |e: std::io::Error| format!("{address}: {e}");
        stream
            .set_write_timeout(Some(left().max(Duration::from_millis(1))))
            .map_err(io)?;
        stream
            .set_read_timeout(Some(left().max(Duration::from_millis(1))))
            .map_err(io)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sidewall-probe\r\nConnection: close\r\n\r\n"
        )
        .map_err(io)?;
        let mut line = String::new();
        BufReader::new(stream.take(1024))
            .read_line(&mut line)
            .map_err(io)?;
        return line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| format!("{address}: not an HTTP answer: {:?}", line.trim_end()));
    }
    Err(last)
}

pub(crate) fn run(args: Args) -> ExitCode {
    let (authority, path) = match split(&args.url) {
        Ok(parts) => parts,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    match status(authority, path, Duration::from_secs(args.timeout_seconds)) {
        Ok(code) if (200..300).contains(&code) => {
            println!("{} {code}", args.url);
            ExitCode::SUCCESS
        }
        Ok(code) => {
            eprintln!("unhealthy: {} answered {code}", args.url);
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("unhealthy: {error}");
            ExitCode::from(1)
        }
    }
}
