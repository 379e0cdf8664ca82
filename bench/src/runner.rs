//! One run: certificates, the server, then rounds in which every contender in turn is started,
//! measured on every workload and stopped (A B C A B C …), then the report.
//!
//! Each contender is restarted for every round, so its idle memory is that of a fresh start and
//! one contender's leftovers (connections in TIME_WAIT, grown heaps) never burden the next. A
//! workload that fails is noted and the others go on; a contender whose process dies is marked
//! failed with the end of its log, and the run goes on without it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sidewall_bench::goals;
use sidewall_bench::model::{Contender, Metric, Workload};
use sidewall_bench::pki::Pki;
use sidewall_bench::plot;
use sidewall_bench::report::{self, ContenderStatus, Machine, Report, Row, Settings};

use crate::contenders::{self, Chain, Env, Plan};
use crate::load::{self, Framing, Window};
use crate::procs::raise_file_limit;
use crate::progress::Progress;
use crate::server::Server;

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
    if settings.quick {
        notes.push(format!(
            "--quick: {} idle connections instead of 10,000, {} s per workload, {} round(s); \
             a smoke test of the harness, not figures to quote",
            settings.idle_connections, settings.duration_s, settings.rounds
        ));
    }

    let load_before = load_average();
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
    // The crypto floor, on one core, before any contender runs.
    let crypto = match sidewall_bench::floor::CryptoFloor::measure(Duration::from_millis(
        if settings.quick { 100 } else { 1000 },
    )) {
        Ok(floor) => Some(floor),
        Err(error) => {
            notes.push(format!("the crypto floor was not measured: {error}"));
            None
        }
    };
    let block = Duration::from_secs_f64(
        7.0 * (settings.warmup_s + settings.duration_s)
            + settings.idle_connections as f64 / 500.0
            + 4.0,
    );
    let mut progress = Progress::new(runnable.len() * settings.rounds as usize, block);
    let mut rows = Vec::new();
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
            match block.run(&env, &server, &mut notes).await {
                Ok(mut measured) => rows.append(&mut measured),
                Err(error) => {
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
            }
            progress.block_done();
        }
    }
    progress.finish();
    notes.push(format!(
        "load average (1, 5, 15 min) at the start {load_before}, at the end {}: the machine is \
         shared, so anything above what the run itself puts on its cores came from elsewhere",
        load_average()
    ));

    let summary = report::summarize(&rows);
    let machine = Machine::describe();
    let report = Report {
        started,
        goals: goals::evaluate(&summary, crypto.as_ref(), machine.nproc),
        machine,
        settings,
        contenders: statuses,
        notes,
        rows,
        summary,
        crypto,
    };
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let plots = plot::write_all(&out.join("plots"), &report.summary).map_err(anyhow::Error::msg)?;
    std::fs::write(out.join("report.md"), report::markdown(&report, &plots))?;
    Ok(out)
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
    async fn run(&self, env: &Env, server: &Server, notes: &mut Vec<String>) -> Result<Vec<Row>> {
        self.show("starting");
        let mut chain = contenders::start(self.contender, env).await?;
        let result = self.measure(&mut chain, server, notes).await;
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

    async fn measure(
        &self,
        chain: &mut Chain,
        server: &Server,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Row>> {
        let s = self.settings;
        let window = Window {
            warmup: Duration::from_secs_f64(s.warmup_s),
            duration: Duration::from_secs_f64(s.duration_s),
        };
        let entry = chain.entry;
        let framing = Framing::of(self.contender);
        let proxies = chain.group.len();
        let mut rows = Vec::new();
        tokio::time::sleep(self.settle()).await;
        if proxies > 0 && self.wants(Workload::Idle10k) {
            let idle = chain.group.rss_kib() as f64 / 1024.0 / proxies as f64;
            rows.push(self.row(Workload::Idle10k, Metric::RssMib, idle));
        }
        for (workload, streams) in [(Workload::Throughput1, 1), (Workload::Throughput8, 8)] {
            if !self.wants(workload) {
                continue;
            }
            self.show(workload.name());
            let group = &chain.group;
            let cpu = || (proxies > 0).then(|| group.cpu_seconds());
            match load::throughput(framing, entry, streams, window, &server.sunk, cpu).await {
                Ok(bulk) => {
                    rows.push(self.row(workload, Metric::Gbps, bulk.gbps));
                    if let Some(cpu) = bulk.cpu_s_per_gb {
                        rows.push(self.row(workload, Metric::CpuSPerGb, cpu));
                    }
                }
                Err(error) => self.failed(notes, workload, &error),
            }
            chain.group.check_alive()?;
        }
        let latency_workloads = [
            (Workload::RrC1, 1),
            (Workload::RrC16, 16),
            (Workload::RrC64, 64),
            (Workload::RrFixedRate, s.fixed_rate_connections),
        ];
        for (workload, connections) in latency_workloads {
            if !self.wants(workload) {
                continue;
            }
            self.show(workload.name());
            let result = if workload == Workload::RrFixedRate {
                load::open_loop(framing, entry, s.fixed_rate_rps, connections, window).await
            } else {
                load::closed_loop(framing, entry, connections, window).await
            };
            match result {
                Ok(l) => rows.extend([
                    self.row(workload, Metric::Rps, l.rps),
                    self.row(workload, Metric::P50Us, l.p50_us),
                    self.row(workload, Metric::P99Us, l.p99_us),
                    self.row(workload, Metric::P999Us, l.p999_us),
                ]),
                Err(error) => self.failed(notes, workload, &error),
            }
            chain.group.check_alive()?;
        }
        if self.wants(Workload::ConnectRate) {
            self.connect_rate(chain, framing, window, &mut rows, notes)
                .await;
        }
        chain.group.check_alive()?;
        if self.wants(Workload::Idle10k) {
            self.idle(chain, framing, &mut rows, notes).await;
        }
        chain.group.check_alive()?;
        Ok(rows)
    }

    async fn connect_rate(
        &self,
        chain: &Chain,
        framing: Framing,
        window: Window,
        rows: &mut Vec<Row>,
        notes: &mut Vec<String>,
    ) {
        let s = self.settings;
        self.show(Workload::ConnectRate.name());
        match load::connect_rate(framing, chain.entry, s.connect_workers, window).await {
            Ok((rate, failures)) => {
                rows.push(self.row(Workload::ConnectRate, Metric::Rps, rate));
                if failures > 0 {
                    notes.push(format!(
                        "{} round {}: connect-rate saw {failures} failed attempts",
                        self.contender, self.round
                    ));
                }
            }
            Err(error) => self.failed(notes, Workload::ConnectRate, &error),
        }
    }

    /// Opens the idle connections and reads the pair's memory growth per connection.
    async fn idle(
        &self,
        chain: &Chain,
        framing: Framing,
        rows: &mut Vec<Row>,
        notes: &mut Vec<String>,
    ) {
        let wanted = self.settings.idle_connections;
        self.show(&format!("idle-10k: opening {wanted} connections"));
        // Let connections from connect-rate finish closing first.
        tokio::time::sleep(self.settle()).await;
        let before = chain.group.rss_kib();
        let (open, failures) = load::open_idle(framing, chain.entry, wanted, 64).await;
        tokio::time::sleep(self.settle() * 2).await;
        let with = chain.group.rss_kib();
        if chain.group.len() > 0 && !open.is_empty() {
            let per = with.saturating_sub(before) as f64 / open.len() as f64;
            rows.push(self.row(Workload::Idle10k, Metric::RssKibPerConn, per));
        }
        if open.len() < wanted {
            notes.push(format!(
                "{} round {}: idle-10k held {} of {wanted} connections ({failures} failed to open)",
                self.contender,
                self.round,
                open.len()
            ));
        }
        drop(open);
    }
}
