//! One run: certificates, the server, then rounds in which every contender in turn is started,
//! measured on every workload and stopped (A B C A B C …), then the report.
//!
//! Each contender is restarted for every round, so its idle memory is that of a fresh start and
//! one contender's leftovers (connections in TIME_WAIT, grown heaps) never burden the next. A
//! workload that fails is noted and the others go on; a contender whose process dies is marked
//! failed with the end of its log, and the run goes on without it.
//!
//! In target mode ([`crate::target`]) nothing is started: the rounds alternate `direct` (the
//! app at `--direct`) and `target` (the deployment), and the sidecars' metrics are scraped
//! around every workload on `target`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sidewall_bench::exposition;
use sidewall_bench::goals;
use sidewall_bench::model::{Contender, Metric, Workload};
use sidewall_bench::pki::Pki;
use sidewall_bench::plot;
use sidewall_bench::report::{
    self, ContenderStatus, Machine, Report, Row, Scrape, Settings, TargetRun,
};

use crate::contenders::{self, Chain, Env, Plan};
use crate::load::{self, Framing, Reading, Window};
use crate::procs::raise_file_limit;
use crate::progress::Progress;
use crate::server::Server;
use crate::target::{self, Endpoint, Target};

/// What the command line asked for.
pub(crate) struct Options {
    /// `--quick`.
    pub(crate) quick: bool,
    /// `--only` (direct is added: every figure is a ratio to it).
    pub(crate) only: Vec<Contender>,
    /// `--out`.
    pub(crate) out: Option<PathBuf>,
    /// `--rounds`.
    pub(crate) rounds: Option<u32>,
    /// `--sidewall`.
    pub(crate) sidewall: Option<PathBuf>,
    /// `--workloads` (empty: all).
    pub(crate) workloads: Vec<Workload>,
    /// The command line, for the report.
    pub(crate) command: String,
    /// `--target` and its companions: load the user's deployment instead.
    pub(crate) target: Option<Target>,
}

/// The settings of a full run, or of `--quick`.
fn settings(options: &Options) -> Settings {
    let quick = options.quick;
    Settings {
        command: options.command.clone(),
        quick,
        rounds: options.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        warmup_s: if quick { 0.25 } else { 1.0 },
        duration_s: if quick { 1.0 } else { 5.0 },
        settle_s: if quick { 0.2 } else { 0.5 },
        idle_connections: if quick { 1_000 } else { 10_000 },
        fixed_rate_rps: 2_000,
        fixed_rate_connections: 16,
        connect_workers: 8,
    }
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn timestamp() -> (String, String) {
    let t = time::OffsetDateTime::now_utc();
    let date = format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day());
    (
        format!("{date}T{:02}{:02}{:02}Z", t.hour(), t.minute(), t.second()),
        format!("{date} {:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()),
    )
}

fn status(
    contender: Contender,
    status: &str,
    reason: Option<String>,
    version: Option<String>,
) -> ContenderStatus {
    ContenderStatus {
        contender: contender.name().to_owned(),
        mode: contender.mode().name().to_owned(),
        status: status.to_owned(),
        reason,
        version,
    }
}

/// Runs everything and writes the report; returns the output directory.
pub(crate) async fn run(options: Options) -> Result<PathBuf> {
    let mut settings = settings(&options);
    let (stamp, started) = timestamp();
    let out = options.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(&stamp)
    });
    let work = out.join("work");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| logs.display().to_string())?;
    let mut notes = Vec::new();

    // This process holds both ends of every direct idle connection, and each proxy holds two
    // descriptors per connection; the proxies inherit the limit raised here.
    let files = raise_file_limit(262_144);
    let fit = usize::try_from(files.saturating_sub(1_000) / 2).unwrap_or(0);
    if fit < settings.idle_connections {
        notes.push(format!(
            "the open-file limit here is {files} and cannot be raised (no CAP_SYS_RESOURCE); a \
             proxy holds two descriptors per connection, so idle-10k opens {fit} connections \
             instead of {}",
            settings.idle_connections
        ));
        settings.idle_connections = fit;
    }
    if options.target.is_some() && settings.idle_connections > TARGET_IDLE {
        notes.push(format!(
            "target mode: idle-10k opens {TARGET_IDLE} connections, not {}: a sidecar's default \
             limits.maxConnections is 10,000, and the deployment is not this run's to raise",
            settings.idle_connections
        ));
        settings.idle_connections = TARGET_IDLE;
    }
    if settings.quick {
        notes.push(format!(
            "--quick: {} idle connections instead of 10,000, {} s per workload, {} round(s); \
             a smoke test of the harness, not figures to quote",
            settings.idle_connections, settings.duration_s, settings.rounds
        ));
    }

    let load_before = load_average();
    let (setup, mut statuses, runnable, target_run) = match options.target {
        Some(target) => {
            let (statuses, runnable, target_run) = target_contenders(&target).await?;
            (Setup::Target(target), statuses, runnable, Some(target_run))
        }
        None => {
            let (setup, statuses, runnable) = local_contenders(&options, work, logs, files).await?;
            (setup, statuses, runnable, None)
        }
    };

    if !options.workloads.is_empty() {
        let names: Vec<_> = options.workloads.iter().map(|w| w.name()).collect();
        notes.push(format!(
            "only these workloads ran (--workloads): {}",
            names.join(", ")
        ));
    }
    if runnable.contains(&Contender::SidewallHttp) {
        notes.push(
            "sidewall-http is loaded with HTTP/1.1 (POST /echo with 1 KiB bodies, POST /sink for \
             bulk; about 80 bytes of head each way); every other contender, direct included, \
             with raw bytes. Its ratios to direct therefore include HTTP framing at both ends."
                .into(),
        );
    }
    // The crypto floor, on one core, before any contender runs; the limit it sets is that of
    // the chains started here, so target mode has none.
    let crypto = match &setup {
        Setup::Target(_) => None,
        Setup::Local { .. } => match sidewall_bench::floor::CryptoFloor::measure(
            Duration::from_millis(if settings.quick { 100 } else { 1000 }),
        ) {
            Ok(floor) => Some(floor),
            Err(error) => {
                notes.push(format!("the crypto floor was not measured: {error}"));
                None
            }
        },
    };
    let block = Duration::from_secs_f64(
        7.0 * (settings.warmup_s + settings.duration_s)
            + settings.idle_connections as f64 / 500.0
            + 4.0,
    );
    let mut progress = Progress::new(runnable.len() * settings.rounds as usize, block);
    let mut measured = Measured {
        notes,
        ..Measured::default()
    };
    let mut failed = BTreeSet::new();
    for round in 1..=settings.rounds {
        for &contender in &runnable {
            if failed.contains(&contender) {
                progress.block_done();
                continue;
            }
            let block = Block {
                contender,
                workloads: &options.workloads,
                round,
                settings: &settings,
                started: Instant::now(),
                progress: &progress,
            };
            if let Err(error) = block.run(&setup, &mut measured).await {
                progress.finish();
                eprintln!("{contender} failed in round {round}: {error:#}");
                failed.insert(contender);
                if let Some(s) = statuses
                    .iter_mut()
                    .find(|s| s.contender == contender.name())
                {
                    s.status = "failed".into();
                    s.reason = Some(format!("round {round}: {error:#}"));
                }
            }
            progress.block_done();
        }
    }
    progress.finish();
    let Measured {
        rows,
        mut notes,
        scrapes,
    } = measured;
    notes.push(format!(
        "load average (1, 5, 15 min) at the start {load_before}, at the end {}: the machine is \
         shared, so anything above what the run itself puts on its cores came from elsewhere",
        load_average()
    ));

    let summary = report::summarize(&rows);
    let machine = Machine::describe();
    let report = Report {
        started,
        goals: match &setup {
            Setup::Local { .. } => goals::evaluate(&summary, crypto.as_ref(), machine.nproc),
            Setup::Target(_) => Vec::new(),
        },
        machine,
        settings,
        contenders: statuses,
        notes,
        rows,
        summary,
        crypto,
        target: target_run.map(|t| TargetRun { scrapes, ..t }),
    };
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let plots = plot::write_all(&out.join("plots"), &report.summary).map_err(anyhow::Error::msg)?;
    std::fs::write(out.join("report.md"), report::markdown(&report, &plots))?;
    if let Setup::Target(_) = setup
        && let Some(failed) = report.contenders.iter().find(|s| s.status == "failed")
    {
        anyhow::bail!(
            "{} failed ({}); the report of what ran is {}",
            failed.contender,
            failed.reason.as_deref().unwrap_or("no reason"),
            out.join("report.md").display()
        );
    }
    Ok(out)
}

/// Idle connections target mode opens at most.
const TARGET_IDLE: usize = 1_000;

/// The certificates, the server and the contenders this harness starts; which can run here.
async fn local_contenders(
    options: &Options,
    work: PathBuf,
    logs: PathBuf,
    files: u64,
) -> Result<(Setup, Vec<ContenderStatus>, Vec<Contender>)> {
    let pki = Pki::generate().context("generating certificates")?;
    contenders::write_peer_certificates(&pki, &work.join("certs"))?;
    let server = Server::start()
        .await
        .context("starting the echo/sink server")?;
    let selected: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| options.only.is_empty() || *c == Contender::Direct || options.only.contains(c))
        .collect();
    let sidewall = if selected.iter().any(|c| c.is_sidewall()) {
        contenders::locate_sidewall(options.sidewall.as_deref())
    } else {
        Err("not selected".to_owned())
    };
    let env = Env {
        work,
        logs,
        pki,
        server: server.addr,
        self_exe: std::env::current_exe()?,
        sidewall,
        files,
    };
    let mut statuses = Vec::new();
    let mut runnable = Vec::new();
    for contender in Contender::ALL {
        if !selected.contains(&contender) {
            statuses.push(status(
                contender,
                "skipped",
                Some("not selected (--only)".into()),
                None,
            ));
            continue;
        }
        match contenders::plan(contender, &env) {
            Plan::Run(version) => {
                runnable.push(contender);
                statuses.push(status(contender, "ran", None, version));
            }
            Plan::Skip(reason) => {
                eprintln!("skipping {contender}: {reason}");
                statuses.push(status(contender, "skipped", Some(reason), None));
            }
        }
    }
    Ok((
        Setup::Local {
            env: Box::new(env),
            server,
        },
        statuses,
        runnable,
    ))
}

/// Target mode's contenders: `direct` if `--direct` was given, then `target`. Every metrics
/// endpoint must answer before the run starts.
async fn target_contenders(
    target: &Target,
) -> Result<(Vec<ContenderStatus>, Vec<Contender>, TargetRun)> {
    for endpoint in &target.metrics {
        endpoint.scrape().await?;
    }
    target_chain(target, Contender::Target).await?;
    if target.direct.is_some() {
        target_chain(target, Contender::Direct).await?;
    }
    let mut statuses = Vec::new();
    let mut runnable = Vec::new();
    match &target.direct {
        Some((given, _)) => {
            runnable.push(Contender::Direct);
            statuses.push(status(
                Contender::Direct,
                "ran",
                None,
                Some(format!("the app at {given}")),
            ));
        }
        None => statuses.push(status(
            Contender::Direct,
            "skipped",
            Some("no --direct given".into()),
            None,
        )),
    }
    runnable.push(Contender::Target);
    statuses.push(status(
        Contender::Target,
        "ran",
        None,
        Some(format!("the deployment at {}", target.given)),
    ));
    let run = TargetRun {
        target: target.given.clone(),
        direct: target.direct.as_ref().map(|(given, _)| given.clone()),
        framing: match target.framing {
            Framing::Raw => "raw",
            Framing::Http => "http",
        }
        .to_owned(),
        metrics: target.metrics.iter().map(|e| e.url.clone()).collect(),
        scrapes: Vec::new(),
    };
    Ok((statuses, runnable, run))
}

/// Where the chains come from: started here, or the user's deployment.
enum Setup {
    /// Contenders this harness starts, ending at its in-process server.
    Local { env: Box<Env>, server: Server },
    /// `--target`: the user's deployment and, with `--direct`, its app without it.
    Target(Target),
}

impl Setup {
    /// Starts (or, in target mode, checks) `contender`'s chain.
    async fn chain(&self, contender: Contender) -> Result<Chain> {
        match self {
            Setup::Local { env, .. } => contenders::start(contender, env).await,
            Setup::Target(target) => target_chain(target, contender).await,
        }
    }

    /// How the load speaks to `contender`.
    fn framing(&self, contender: Contender) -> Framing {
        match self {
            Setup::Local { .. } => Framing::of(contender),
            Setup::Target(target) => target.framing,
        }
    }

    /// The metrics endpoints scraped around `contender`'s workloads (target only).
    fn endpoints(&self, contender: Contender) -> &[Endpoint] {
        match self {
            Setup::Target(target) if contender == Contender::Target => &target.metrics,
            _ => &[],
        }
    }
}

/// The chain of `direct` (`--direct`) or `target`, once an echo came back through it.
async fn target_chain(target: &Target, contender: Contender) -> Result<Chain> {
    let (entry, what) = match (contender, &target.direct) {
        (Contender::Direct, Some((given, addr))) => (*addr, format!("--direct {given}")),
        _ => (target.entry, format!("--target {}", target.given)),
    };
    let mut chain = Chain {
        entry,
        group: crate::procs::Group::default(),
    };
    contenders::wait_ready(&mut chain, target.framing, Duration::from_secs(10))
        .await
        .with_context(|| {
            format!(
                "{what}: no echo came back through it; is `sidewall-bench serve` the app behind \
                 it, and does the policy allow this client there?"
            )
        })?;
    Ok(chain)
}

/// One contender in one round.
struct Block<'a> {
    contender: Contender,
    /// The workloads to run (empty: all).
    workloads: &'a [Workload],
    round: u32,
    settings: &'a Settings,
    started: Instant,
    progress: &'a Progress,
}

impl Block<'_> {
    fn show(&self, what: &str) {
        let what = format!("{}: {what}", self.contender);
        self.progress.show(
            self.round,
            self.settings.rounds,
            &what,
            self.started.elapsed(),
        );
    }

    /// A pause before reading memory, so that the proxies have finished what was just asked.
    fn settle(&self) -> Duration {
        Duration::from_secs_f64(self.settings.settle_s)
    }

    fn wants(&self, workload: Workload) -> bool {
        self.workloads.is_empty() || self.workloads.contains(&workload)
    }

    fn row(&self, workload: Workload, metric: Metric, value: f64) -> Row {
        Row::new(self.contender, workload, metric, value, self.round)
    }

    /// Starts the contender, measures every workload, stops it.
    async fn run(&self, setup: &Setup, measured: &mut Measured) -> Result<()> {
        self.show("starting");
        let mut chain = setup.chain(self.contender).await?;
        let result = self.measure(&mut chain, setup, measured).await;
        chain.group.stop().await;
        result
    }

    fn failed(&self, notes: &mut Vec<String>, workload: Workload, error: &anyhow::Error) {
        let note = format!(
            "{} round {}: {} failed: {error:#}",
            self.contender,
            self.round,
            workload.name()
        );
        eprintln!("{note}");
        notes.push(note);
    }

    /// The proxies' resident memory, KiB, and how many proxies: the started processes, or in
    /// target mode what the `--metrics` endpoints say. `None` without proxies.
    async fn rss_kib(&self, chain: &Chain, setup: &Setup) -> Result<Option<(f64, usize)>> {
        let endpoints = setup.endpoints(self.contender);
        if !endpoints.is_empty() {
            let scrapes = target::scrape_all(endpoints).await?;
            return Ok(target::total(&scrapes, "process_resident_memory_bytes")
                .map(|bytes| (bytes / 1024.0, endpoints.len())));
        }
        let proxies = chain.group.len();
        Ok((proxies > 0).then(|| (chain.group.rss_kib() as f64, proxies)))
    }

    /// What a bulk window reads at its ends: bytes at the server, CPU of the proxies.
    async fn reading(&self, chain: &Chain, setup: &Setup) -> Result<Reading> {
        let sunk = match setup {
            Setup::Local { server, .. } => server.sunk.load(Ordering::Relaxed),
            Setup::Target(target) => target::remote_count(target.framing, chain.entry).await?,
        };
        let endpoints = setup.endpoints(self.contender);
        let cpu = if !endpoints.is_empty() {
            let scrapes = target::scrape_all(endpoints).await?;
            target::total(&scrapes, "process_cpu_seconds_total")
        } else {
            (chain.group.len() > 0).then(|| chain.group.cpu_seconds())
        };
        Ok(Reading { sunk, cpu })
    }

    async fn measure(&self, chain: &mut Chain, setup: &Setup, out: &mut Measured) -> Result<()> {
        tokio::time::sleep(self.settle()).await;
        if self.wants(Workload::Idle10k) {
            match self.rss_kib(chain, setup).await {
                Ok(Some((kib, proxies))) => out.rows.push(self.row(
                    Workload::Idle10k,
                    Metric::RssMib,
                    kib / 1024.0 / proxies as f64,
                )),
                Ok(None) => {}
                Err(error) => self.failed(&mut out.notes, Workload::Idle10k, &error),
            }
        }
        for workload in Workload::ALL {
            if !self.wants(workload) {
                continue;
            }
            let endpoints = setup.endpoints(self.contender);
            let before = if endpoints.is_empty() {
                None
            } else {
                match target::scrape_all(endpoints).await {
                    Ok(scrapes) => Some((Instant::now(), scrapes)),
                    Err(error) => {
                        self.failed(&mut out.notes, workload, &error);
                        None
                    }
                }
            };
            self.workload(workload, chain, setup, out).await;
            if let Some((at, before)) = before {
                // Sidecars count a connection's bytes when it ends: let the workload's closes
                // land first.
                tokio::time::sleep(self.settle()).await;
                match target::scrape_all(endpoints).await {
                    Ok(after) => {
                        for ((endpoint, before), after) in endpoints.iter().zip(&before).zip(&after)
                        {
                            out.scrapes.push(Scrape {
                                endpoint: endpoint.url.clone(),
                                workload: workload.name().to_owned(),
                                round: self.round,
                                seconds: at.elapsed().as_secs_f64(),
                                changes: exposition::changes(before, after),
                            });
                        }
                    }
                    Err(error) => self.failed(&mut out.notes, workload, &error),
                }
            }
            chain.group.check_alive()?;
        }
        Ok(())
    }

    /// Runs one workload, its rows and notes into `out`.
    async fn workload(&self, workload: Workload, chain: &Chain, setup: &Setup, out: &mut Measured) {
        let s = self.settings;
        let window = Window {
            warmup: Duration::from_secs_f64(s.warmup_s),
            duration: Duration::from_secs_f64(s.duration_s),
        };
        let (entry, framing) = (chain.entry, setup.framing(self.contender));
        self.show(workload.name());
        match workload {
            Workload::Throughput1 | Workload::Throughput8 => {
                let streams = if workload == Workload::Throughput1 {
                    1
                } else {
                    8
                };
                let read = || self.reading(chain, setup);
                match load::throughput(framing, entry, streams, window, read).await {
                    Ok(bulk) => {
                        out.rows.push(self.row(workload, Metric::Gbps, bulk.gbps));
                        if let Some(cpu) = bulk.cpu_s_per_gb {
                            out.rows.push(self.row(workload, Metric::CpuSPerGb, cpu));
                        }
                    }
                    Err(error) => self.failed(&mut out.notes, workload, &error),
                }
            }
            Workload::RrC1 | Workload::RrC16 | Workload::RrC64 | Workload::RrFixedRate => {
                let result = match workload {
                    Workload::RrFixedRate => {
                        load::open_loop(
                            framing,
                            entry,
                            s.fixed_rate_rps,
                            s.fixed_rate_connections,
                            window,
                        )
                        .await
                    }
                    Workload::RrC1 => load::closed_loop(framing, entry, 1, window).await,
                    Workload::RrC16 => load::closed_loop(framing, entry, 16, window).await,
                    _ => load::closed_loop(framing, entry, 64, window).await,
                };
                match result {
                    Ok(l) => out.rows.extend([
                        self.row(workload, Metric::Rps, l.rps),
                        self.row(workload, Metric::P50Us, l.p50_us),
                        self.row(workload, Metric::P99Us, l.p99_us),
                        self.row(workload, Metric::P999Us, l.p999_us),
                    ]),
                    Err(error) => self.failed(&mut out.notes, workload, &error),
                }
            }
            Workload::ConnectRate => {
                match load::connect_rate(framing, entry, s.connect_workers, window).await {
                    Ok((rate, failures)) => {
                        out.rows.push(self.row(workload, Metric::Rps, rate));
                        if failures > 0 {
                            out.notes.push(format!(
                                "{} round {}: connect-rate saw {failures} failed attempts",
                                self.contender, self.round
                            ));
                        }
                    }
                    Err(error) => self.failed(&mut out.notes, workload, &error),
                }
            }
            Workload::Idle10k => self.idle(chain, setup, framing, out).await,
        }
    }

    /// Opens the idle connections and reads the pair's memory growth per connection.
    async fn idle(&self, chain: &Chain, setup: &Setup, framing: Framing, out: &mut Measured) {
        let wanted = self.settings.idle_connections;
        self.show(&format!("idle-10k: opening {wanted} connections"));
        // Let connections from connect-rate finish closing first.
        tokio::time::sleep(self.settle()).await;
        let before = self.rss_kib(chain, setup).await;
        let (open, failures) = load::open_idle(framing, chain.entry, wanted, 64).await;
        tokio::time::sleep(self.settle() * 2).await;
        let with = self.rss_kib(chain, setup).await;
        match (before, with) {
            (Ok(Some((before, _))), Ok(Some((with, _)))) if !open.is_empty() => {
                let per = (with - before).max(0.0) / open.len() as f64;
                out.rows
                    .push(self.row(Workload::Idle10k, Metric::RssKibPerConn, per));
            }
            (Err(error), _) | (_, Err(error)) => {
                self.failed(&mut out.notes, Workload::Idle10k, &error);
            }
            _ => {}
        }
        if open.len() < wanted {
            out.notes.push(format!(
                "{} round {}: idle-10k held {} of {wanted} connections ({failures} failed to open)",
                self.contender,
                self.round,
                open.len()
            ));
        }
        drop(open);
    }
}

/// What the blocks of a run produce.
#[derive(Default)]
struct Measured {
    rows: Vec<Row>,
    notes: Vec<String>,
    scrapes: Vec<Scrape>,
}
