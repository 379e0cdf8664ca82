//! `sidewall up [MESH]`: a whole mesh on loopback — the control plane, a demo app and a sidecar
//! per service — with the mesh's policies applied and a live view of every flow. `--check`
//! runs until every expectation has been observed and exits 0, or 1 with what failed.
//!
//! However `up` ends, what it started ends too: Ctrl-C, SIGTERM and SIGHUP stop its children and
//! remove its private work directory, and every child asks the kernel for SIGTERM when `up` dies
//! (even by SIGKILL: [`exit_with_parent`]).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;
use sidewall_control_plane::client::Client;
use sidewall_policies::Protocol;
use sidewall_policies::load::{LoadOptions, read_sources};
use sidewall_policies::mesh::{ExpectedOutcome, Mesh};
use sidewall_policies::wire::operator::{
    Applied, Fleet, FlowRow, Flows, TokenCreated, TokenRequest,
};

use super::demo_app::Stats;

/// Flags of `sidewall up`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The mesh description (a file, or a directory holding mesh.yaml).
    #[arg(default_value = "examples/three-tier")]
    mesh: PathBuf,
    /// Run until every expectation is observed, print the table, exit 0 (or 1 with what
    /// failed) instead of showing the live view.
    #[arg(long)]
    check: bool,
    /// How long --check waits for the expectations.
    #[arg(long, default_value = "90")]
    timeout_seconds: u64,
}

/// A loopback port free now and not handed out before by this `up`: the kernel may give the
/// same ephemeral port to two `bind(0)` calls once the first listener is closed, and two
/// sidecars then fight for one address.
fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port found that was not already given out")
}

/// Set on every process `up` starts: the pid of the `up` that started it.
const PARENT_ENV: &str = "SIDEWALL_UP_PARENT";

/// In a process started by `sidewall up`: asks for SIGTERM when that parent dies, so that
/// nothing it started outlives it even when it is killed with SIGKILL. `false` if the parent is
/// already gone (the process should exit at once). Always `true` in any other process.
pub(crate) fn exit_with_parent() -> bool {
    let Ok(parent) = std::env::var(PARENT_ENV) else {
        return true;
    };
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    // The parent may have died before the request took effect.
    if nix::unistd::getppid().as_raw().to_string() != parent {
        eprintln!("error: the `sidewall up` that started this process is gone");
        return false;
    }
    true
}

/// Resolves when `up` is asked to stop (Ctrl-C, SIGTERM from `kill`, systemd or a CI runner,
/// SIGHUP when the terminal goes) and names the signal.
async fn stop_requested() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    async fn on(kind: SignalKind, name: &'static str) -> &'static str {
        match signal(kind) {
            Ok(mut stream) => {
                stream.recv().await;
                name
            }
            Err(error) => {
                eprintln!("warning: cannot watch {name}: {error}");
                std::future::pending().await
            }
        }
    }
    tokio::select! {
        name = on(SignalKind::interrupt(), "SIGINT") => name,
        name = on(SignalKind::terminate(), "SIGTERM") => name,
        name = on(SignalKind::hangup(), "SIGHUP") => name,
    }
}

/// A new work directory only this user can enter, under a name no one can guess or take first.
fn private_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "sidewall-up-{}",
        sidewall_control_plane::random::hex_token(8)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes a secret into a new file readable by this user only.
fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(secret.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// Everything `up` started; stopped and removed on drop.
struct Running {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Running {
    fn spawn(&mut self, name: &str, command: &mut Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        // Flags fix everything a child needs; settings the user's shell holds for a
        // deployment of their own (SIDEWALL_STORE, SIDEWALL_LISTEN, ...) must not leak in.
        for (name, _) in std::env::vars_os() {
            if name
                .to_str()
                .is_some_and(|n| n.starts_with("SIDEWALL_") && n != "SIDEWALL_LOG")
            {
                command.env_remove(name);
            }
        }
        let child = command
            .env(PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// The last lines of a child's log.
    fn tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                // Drop is synchronous: a short blocking wait is the only way to let children
                // exit cleanly before the forced kill.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Per service: its sidecar's admin port, its app's stats file, and its route ports.
struct Layout {
    cp_api: u16,
    cp_admin: u16,
    cp_ui: u16,
    admin: BTreeMap<String, u16>,
    /// (caller, callee, port) → the caller's local route port.
    routes: BTreeMap<(String, String, u16), u16>,
}

pub(crate) fn run(args: Args) -> ExitCode {
    super::block_on(async move {
        let file = if args.mesh.is_dir() {
            args.mesh.join("mesh.yaml")
        } else {
            args.mesh.clone()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mesh = Mesh::parse(&file.display().to_string(), &text)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let policies = read_sources(&[base.join(&mesh.policies)], &LoadOptions::default())?;
        let binary = std::env::current_exe().context("finding the sidewall binary")?;
        let dir = private_dir()?;
        let mut running = Running {
            dir: dir.clone(),
            children: Vec::new(),
        };
        let work = async {
            let layout = start(&mesh, &binary, &mut running, &policies).await?;
            let client = Client::operator(
                &dir.join("cp"),
                "admin",
                Some(&format!("https://127.0.0.1:{}", layout.cp_api)),
            )?;
            if args.check {
                check(
                    &mesh,
                    &layout,
                    &client,
                    &running,
                    Duration::from_secs(args.timeout_seconds),
                )
                .await
            } else {
                live(&mesh, &layout, &client, &running).await
            }
        };
        // `running` is dropped after this, whichever way it ends: children stopped, files gone.
        tokio::select! {
            result = work => result,
            signal = stop_requested() => {
                println!("\n{signal}: stopping everything `sidewall up` started…");
                if args.check {
                    bail!("stopped by {signal} before every expectation was observed");
                }
                Ok(())
            }
        }
    })
}

async fn start(
    mesh: &Mesh,
    binary: &Path,
    running: &mut Running,
    policies: &[sidewall_policies::load::Source],
) -> anyhow::Result<Layout> {
    let dir = running.dir.clone();
    let (cp_api, cp_admin, cp_ui) = (free_port()?, free_port()?, free_port()?);
    running.spawn(
        "control-plane",
        Command::new(binary)
            .args(["control-plane", "--data-dir"])
            .arg(dir.join("cp"))
            .args([
                "--listen",
                &format!("127.0.0.1:{cp_api}"),
                "--admin-listen",
                &format!("127.0.0.1:{cp_admin}"),
                "--ui-listen",
                &format!("127.0.0.1:{cp_ui}"),
            ])
            .args(["--trust-domain", mesh.trust_domain.as_str()]),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("cp/control-plane.json").exists() {
        if Instant::now() > deadline {
            bail!(
                "the control plane did not start:\n{}",
                running.tail("control-plane")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = Client::operator(
        &dir.join("cp"),
        "admin",
        Some(&format!("https://127.0.0.1:{cp_api}")),
    )?;
    let set = super::policy_remote::policy_set(policies.to_vec())?;
    let (status, body) = client
        .call(Method::POST, "/v1/policies", Some(&set))
        .await?;
    super::answer::<Applied>("POST /v1/policies", status, body)?;

    let mut layout = Layout {
        cp_api,
        cp_admin,
        cp_ui,
        admin: BTreeMap::new(),
        routes: BTreeMap::new(),
    };
    let inbound: BTreeMap<&str, u16> = mesh
        .services
        .iter()
        .map(|s| Ok((s.name.as_str(), free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    for service in &mesh.services {
        let identity = mesh.identity(&service.name)?;
        let request = serde_json::to_value(TokenRequest {
            identity: identity.to_string(),
            ttl_seconds: Some(600),
            uses: None,
        })?;
        let (status, body) = client
            .call(Method::POST, "/v1/tokens", Some(&request))
            .await?;
        let created: TokenCreated = super::answer("POST /v1/tokens", status, body)?;
        write_secret(&dir.join(format!("{}.token", service.name)), &created.token)?;
        let mut ports = Vec::new();
        let mut serve = Vec::new();
        for port in &service.ports {
            let app = free_port()?;
            ports.push(format!(
                "{{port: {}, protocol: {}, app: 127.0.0.1:{app}}}",
                port.port, port.protocol
            ));
            serve.push(format!(
                "{}:127.0.0.1:{app}",
                if port.protocol == Protocol::Http {
                    "http"
                } else {
                    "tcp"
                }
            ));
        }
        let mut routes = Vec::new();
        let mut calls = Vec::new();
        for call in &service.calls {
            let key = (service.name.clone(), call.to.clone(), call.port);
            let route = match layout.routes.get(&key) {
                Some(route) => *route,
                None => {
                    let route = free_port()?;
                    routes.push(format!(
                        "{{listen: 127.0.0.1:{route}, service: {}, port: {}}}",
                        mesh.identity(&call.to)?,
                        call.port
                    ));
                    layout.routes.insert(key, route);
                    route
                }
            };
            let http = mesh
                .service(&call.to)
                .and_then(|s| s.ports.iter().find(|p| p.port == call.port))
                .is_some_and(|p| p.protocol == Protocol::Http);
            let label = format!("{}:{}", call.to, call.port);
            let every = format!("{}ms", call.interval().as_millis());
            calls.push(if http {
                let method = call.method.as_ref().map_or("GET", |m| m.as_str());
                let path = call.path.as_deref().unwrap_or("/").trim_start_matches('/');
                format!("{label} {method} /{path}=http://127.0.0.1:{route}/{path}@{method}@{every}")
            } else {
                format!("{label}=tcp://127.0.0.1:{route}@{every}")
            });
        }
        let admin = free_port()?;
        layout.admin.insert(service.name.clone(), admin);
        let config = format!(
            "identity: {identity}\ncontrolPlane:\n  urls: [https://127.0.0.1:{cp_api}]\n  tokenFile: {name}.token\nstateDir: state/{name}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  ports: [{ports}]\noutbound:\n  routes: [{routes}]\nadmin:\n  listen: 127.0.0.1:{admin}\nworkerThreads: 1\nlimits: {{drainTimeout: 1s}}\n",
            name = service.name,
            inbound = inbound[service.name.as_str()],
            ports = ports.join(", "),
            routes = routes.join(", "),
        );
        let config_file = dir.join(format!("{}.yaml", service.name));
        std::fs::write(&config_file, config)?;
        running.spawn(
            &format!("{}-sidecar", service.name),
            Command::new(binary)
                .args(["proxy", "--config"])
                .arg(&config_file),
        )?;
        let mut app = Command::new(binary);
        app.args(["demo-app", "--name", &service.name, "--stats"])
            .arg(dir.join(format!("{}.stats.json", service.name)));
        for spec in &serve {
            app.args(["--serve", spec]);
        }
        for spec in &calls {
            app.args(["--call", spec]);
        }
        running.spawn(&format!("{}-app", service.name), &mut app)?;
    }
    Ok(layout)
}

/// What was observed for one caller → callee:port flow.
#[derive(Default)]
struct Observed {
    ok: u64,
    denied: u64,
    refused: u64,
    allow: u64,
    deny: u64,
    audit: u64,
    last: String,
    reason: String,
}

async fn observe(
    mesh: &Mesh,
    running: &Running,
    client: &Client,
) -> BTreeMap<(String, String, u16), Observed> {
    let mut table: BTreeMap<(String, String, u16), Observed> = BTreeMap::new();
    for service in &mesh.services {
        let stats: Stats = std::fs::read(running.dir.join(format!("{}.stats.json", service.name)))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (label, s) in &stats.calls {
            let target = label.split(' ').next().unwrap_or_default();
            let Some((to, port)) = target.split_once(':') else {
                continue;
            };
            let entry = table
                .entry((
                    service.name.clone(),
                    to.to_owned(),
                    port.parse().unwrap_or(0),
                ))
                .or_default();
            entry.ok += s.ok;
            entry.denied += s.denied;
            entry.refused += s.refused;
            if s.denied + s.refused > 0 {
                entry.last = format!("{label}: {}", s.last);
            }
        }
    }
    let name_of = |id: &str| id.rsplit('/').next().unwrap_or(id).to_owned();
    if let Ok((status, body)) = client.call(Method::GET, "/v1/flows", None).await
        && let Ok(flows) = super::answer::<Flows>("GET /v1/flows", status, body)
    {
        for FlowRow { flow, stats } in flows.flows {
            let key = (name_of(&flow.peer), name_of(&flow.target), flow.port);
            let entry = table.entry(key).or_default();
            entry.allow += stats.allow;
            entry.deny += stats.deny;
            entry.audit += stats.audit;
            if let Some(reason) = stats.last_denial {
                let request = match (flow.method, flow.path) {
                    (Some(m), Some(p)) => format!("{m} {p}: "),
                    _ => String::new(),
                };
                entry.reason = format!("{request}{reason}");
            }
        }
    }
    for entry in table.values_mut() {
        if entry.reason.is_empty() && entry.refused > 0 && entry.deny == 0 && entry.ok == 0 {
            entry.reason =
                "refused by the caller's sidecar: no policy lets it call this service".into();
        }
    }
    table
}

fn render(table: &BTreeMap<(String, String, u16), Observed>) -> String {
    let mut out = format!(
        "{:<30} {:>6} {:>7} {:>8}  {:>6} {:>5} {:>6}  LAST DENIAL\n",
        "FLOW", "OK", "DENIED", "REFUSED", "ALLOW", "DENY", "AUDIT"
    );
    for ((from, to, port), o) in table {
        out.push_str(&format!(
            "{:<30} {:>6} {:>7} {:>8}  {:>6} {:>5} {:>6}  {}\n",
            format!("{from} -> {to}:{port}"),
            o.ok,
            o.denied,
            o.refused,
            o.allow,
            o.deny,
            o.audit,
            if o.reason.is_empty() { "-" } else { &o.reason }
        ));
    }
    out
}

async fn fleet_lines(client: &Client) -> String {
    let Ok((status, body)) = client.call(Method::GET, "/v1/fleet", None).await else {
        return "control plane unreachable\n".into();
    };
    let fleet: Fleet = match super::answer("GET /v1/fleet", status, body) {
        Ok(fleet) => fleet,
        Err(error) => return format!("fleet: {error}\n"),
    };
    let now = sidewall_control_plane::now_unix();
    let mut out = format!("policy version {} in force\n", fleet.policy_version);
    for p in &fleet.proxies {
        let expiry = p.certificate_expires_at.map_or("-".into(), |t| {
            format!("{}h{:02}m", (t - now) / 3600, ((t - now) % 3600) / 60)
        });
        out.push_str(&format!(
            "  {:<44} snapshot {:<14} {}  certificate expires in {expiry}\n",
            p.identity,
            p.applied.map_or("-".into(), |v| v.to_string()),
            if p.connected {
                "connected"
            } else {
                "disconnected"
            },
        ));
    }
    out
}

async fn live(
    mesh: &Mesh,
    layout: &Layout,
    client: &Client,
    running: &Running,
) -> anyhow::Result<()> {
    loop {
        let table = observe(mesh, running, client).await;
        let mut screen = String::from("\x1b[2J\x1b[H");
        screen.push_str("Sidewall: a mesh on loopback, every hop mutual TLS, deny by default. Ctrl-C stops it.\n\n");
        screen.push_str(&render(&table));
        screen.push('\n');
        screen.push_str(&fleet_lines(client).await);
        screen.push_str(&format!(
            "\ndashboard: http://127.0.0.1:{}/\ncontrol plane metrics: http://127.0.0.1:{}/metrics   sidecar metrics: {}\nfiles and logs: {}\n",
            layout.cp_ui,
            layout.cp_admin,
            layout.admin.iter().map(|(n, p)| format!("{n} http://127.0.0.1:{p}/metrics")).collect::<Vec<_>>().join("  "),
            running.dir.display(),
        ));
        print!("{screen}");
        // Flushed each round: the view also goes to pipes and files, not only terminals.
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn satisfied(expect: ExpectedOutcome, o: &Observed) -> bool {
    match expect {
        ExpectedOutcome::Allow => o.ok > 0 && o.allow > 0,
        ExpectedOutcome::Deny => {
            o.ok == 0 && o.allow == 0 && o.audit == 0 && (o.refused + o.denied) > 0
        }
        ExpectedOutcome::Audit => o.ok > 0 && o.audit > 0,
    }
}

async fn check(
    mesh: &Mesh,
    _layout: &Layout,
    client: &Client,
    running: &Running,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let table = observe(mesh, running, client).await;
        let failing: Vec<String> = mesh
            .expectations
            .iter()
            .filter(|e| {
                let empty = Observed::default();
                let observed = table
                    .get(&(e.from.clone(), e.to.clone(), e.port))
                    .unwrap_or(&empty);
                !satisfied(e.expect, observed)
            })
            .map(|e| format!("{} -> {}:{} expected {:?}", e.from, e.to, e.port, e.expect))
            .collect();
        if failing.is_empty() {
            print!("{}", render(&table));
            println!(
                "\nall {} expectations observed in {} s",
                mesh.expectations.len(),
                started.elapsed().as_secs()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            print!("{}", render(&table));
            let logs: Vec<String> = running
                .children
                .iter()
                .map(|(n, _)| format!("--- {n}\n{}", running.tail(n)))
                .collect();
            bail!(
                "not observed within {} s:\n  {}\n\nlast log lines:\n{}",
                timeout.as_secs(),
                failing.join("\n  "),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
