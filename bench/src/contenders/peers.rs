//! HAProxy, nginx and stunnel, each as two processes: A takes plaintext and originates TLS 1.3
//! with a client certificate, verifying B as `proxy-b`; B requires and verifies the client
//! certificate and forwards plaintext. The configuration lines are those of
//! `shared/peers/contenders.sh` (`verify required`, `proxy_ssl_verify on`,
//! `ssl_verify_client on`, `verifyChain`/`requireCert`, TLS 1.3 only, one worker), with three
//! changes the report also states: one listener per proxy (the server tells sink from echo by
//! the first byte), the certificate chain has an intermediate like Sidewall's (so nginx verifies
//! to depth 2), and connection caps follow the open-file limit so the idle workload fits
//! (HAProxy `maxconn` 4,000 → half the limit; nginx `worker_connections` 10,000 → the limit,
//! each proxied connection holding two).

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};
use sidewall_bench::model::Contender;

use super::{Chain, Env, Plan, find_program, free_ports, version_line};
use crate::procs::Group;

/// Where Debian's `libnginx-mod-stream` puts the module.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

const HAPROXY: [&str; 1] = ["haproxy"];
const NGINX: [&str; 1] = ["nginx"];
const STUNNEL: [&str; 2] = ["stunnel4", "stunnel"];

fn missing(what: &str) -> Plan {
    Plan::Skip(format!(
        "{what} is not installed (run bench/install-peers.sh)"
    ))
}

/// How nginx gets its stream module: `Some(line)` to load it, `Some("")` if built in.
fn nginx_stream(binary: &Path) -> Option<String> {
    if Path::new(NGINX_STREAM_MODULE).is_file() {
        return Some(format!("load_module {NGINX_STREAM_MODULE};"));
    }
    let output = Command::new(binary).arg("-V").output().ok()?;
    let configure = String::from_utf8_lossy(&output.stderr).into_owned();
    (configure.contains("--with-stream ") || configure.ends_with("--with-stream")).then(String::new)
}

/// Whether a peer can run here, and its version.
pub(super) fn plan(contender: Contender) -> Plan {
    match contender {
        Contender::Haproxy => match find_program(&HAPROXY) {
            Some(binary) => Plan::Run(version_line(&binary, &["-v"], "version")),
            None => missing("haproxy"),
        },
        Contender::Nginx => match find_program(&NGINX) {
            Some(binary) if nginx_stream(&binary).is_some() => {
                Plan::Run(version_line(&binary, &["-v"], "version"))
            }
            Some(_) => Plan::Skip(
                "nginx has no stream module (install libnginx-mod-stream; bench/install-peers.sh does)"
                    .into(),
            ),
            None => missing("nginx"),
        },
        Contender::Stunnel => match find_program(&STUNNEL) {
            Some(binary) => Plan::Run(version_line(&binary, &["-version"], "stunnel ")),
            None => missing("stunnel4"),
        },
        _ => Plan::Skip("not a peer".into()),
    }
}

/// Starts both hops of a peer; ports are fresh for every start.
pub(super) fn start(contender: Contender, env: &Env, dir: &Path) -> Result<Chain> {
    let [front, hop] = free_ports(2)?[..] else {
        bail!("two ports expected");
    };
    let back = env.server.port();
    let certs = env.work.join("certs");
    let certs = certs.display();
    // Two descriptors per proxied connection, a few for listeners and logs.
    let connections = env.files.saturating_sub(200).min(60_000);
    let mut group = Group::default();
    match contender {
        Contender::Haproxy => {
            let binary = find_program(&HAPROXY).unwrap_or_else(|| "haproxy".into());
            let a = format!(
                "ssl crt {certs}/client-bundle.pem ca-file {certs}/ca.pem verify required \
                 verifyhost proxy-b sni str(proxy-b) ssl-min-ver TLSv1.3"
            );
            let b = format!(
                "ssl crt {certs}/server-bundle.pem ca-file {certs}/ca.pem verify required \
                 ssl-min-ver TLSv1.3"
            );
            // B first, so A's first connection finds it.
            for (name, listen, target, bind_tls, server_tls) in [
                ("haproxy-b", hop, back, b.as_str(), ""),
                ("haproxy-a", front, hop, "", a.as_str()),
            ] {
                let file = dir.join(format!("{name}.cfg"));
                let config = haproxy_config(connections / 2, listen, target, bind_tls, server_tls);
                std::fs::write(&file, config)?;
                let mut command = Command::new(&binary);
                command.arg("-db").arg("-f").arg(&file);
                group.spawn(name, command, &env.logs)?;
            }
        }
        Contender::Nginx => {
            let binary = find_program(&NGINX).unwrap_or_else(|| "nginx".into());
            let load = nginx_stream(&binary).unwrap_or_default();
            let a = format!(
                "proxy_ssl on; proxy_ssl_certificate {certs}/client.pem; \
                 proxy_ssl_certificate_key {certs}/client.key; \
                 proxy_ssl_trusted_certificate {certs}/ca.pem; proxy_ssl_verify on; \
                 proxy_ssl_verify_depth 2; proxy_ssl_name proxy-b; proxy_ssl_server_name on; \
                 proxy_ssl_protocols TLSv1.3;"
            );
            let b = format!(
                "ssl_certificate {certs}/server.pem; ssl_certificate_key {certs}/server.key; \
                 ssl_client_certificate {certs}/ca.pem; ssl_verify_client on; \
                 ssl_verify_depth 2; ssl_protocols TLSv1.3;"
            );
            for (name, listen, target, ssl, body) in [
                ("nginx-b", hop, back, " ssl", b.as_str()),
                ("nginx-a", front, hop, "", a.as_str()),
            ] {
                let prefix = dir.join(name);
                std::fs::create_dir_all(prefix.join("logs"))?;
                let config = format!(
                    "{load}\nworker_processes 1;\nerror_log {p}/logs/error.log warn;\n\
                     pid {p}/nginx.pid;\nworker_rlimit_nofile {files};\n\
                     events {{ worker_connections {connections}; }}\n\
                     stream {{\n    proxy_timeout 300s;\n    server {{ listen 127.0.0.1:{listen}{ssl}; \
                     proxy_pass 127.0.0.1:{target}; {body} }}\n}}\n",
                    p = prefix.display(),
                    files = env.files,
                );
                let file = prefix.join("nginx.conf");
                std::fs::write(&file, config)?;
                let mut command = Command::new(&binary);
                command
                    .arg("-p")
                    .arg(&prefix)
                    .arg("-e")
                    .arg(prefix.join("logs/error.log"))
                    .arg("-c")
                    .arg(&file)
                    .args(["-g", "daemon off;"]);
                group.spawn(name, command, &env.logs)?;
            }
        }
        Contender::Stunnel => {
            let binary = find_program(&STUNNEL).unwrap_or_else(|| "stunnel4".into());
            let a = format!(
                "client = yes\naccept = 127.0.0.1:{front}\nconnect = 127.0.0.1:{hop}\n\
                 cert = {certs}/client.pem\nkey = {certs}/client.key\nCAfile = {certs}/ca.pem\n\
                 verifyChain = yes\ncheckHost = proxy-b\nsni = proxy-b\nsslVersionMin = TLSv1.3\n"
            );
            let b = format!(
                "accept = 127.0.0.1:{hop}\nconnect = 127.0.0.1:{back}\n\
                 cert = {certs}/server.pem\nkey = {certs}/server.key\nCAfile = {certs}/ca.pem\n\
                 verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n"
            );
            for (name, service) in [("stunnel-b", b), ("stunnel-a", a)] {
                let file = dir.join(format!("{name}.conf"));
                std::fs::write(&file, format!("foreground = yes\npid =\n[tp]\n{service}"))?;
                let mut command = Command::new(&binary);
                command.arg(&file);
                group.spawn(name, command, &env.logs)?;
            }
        }
        _ => bail!("{contender} is not a peer"),
    }
    Ok(Chain {
        entry: std::net::SocketAddr::from(([127, 0, 0, 1], front)),
        group,
    })
}

fn haproxy_config(
    maxconn: u64,
    listen: u16,
    target: u16,
    bind_tls: &str,
    server_tls: &str,
) -> String {
    format!(
        "global\n    nbthread 1\n    maxconn {maxconn}\n    tune.ssl.default-dh-param 2048\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 300s\n    \
         timeout server 300s\n\
         listen tp\n    bind 127.0.0.1:{listen} {bind_tls}\n    \
         server s1 127.0.0.1:{target} {server_tls}\n"
    )
}
