//! The bench run itself (`xtask-bench run`): starts a test bed per mode, runs every measurement
//! round after round with the modes interleaved (direct, L4, mTLS, Envoy, direct, …; the
//! HTTP latency also through the L7 modes), then the memory measurements, and writes the report.

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    connections::ConnectReport,
    http,
    latency::LoadReport,
    modes::{Bed, ECHO_PORT, HTTP_PORT},
    report, resources,
    results::{ConnectRun, Held, LatencyRun, Machine, MemoryRun, Meta, Mode, Results, summarize},
    throughput,
};

/// A measurement a run can be limited to (`--measure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Measure {
    /// Throughput, 1 and 4 streams.
    Throughput,
    /// Raw latency at fixed rates (and the proxies' CPU during it).
    Latency,
    /// HTTP latency at fixed rates (and the L7 modes).
    Http,
    /// New connections per second, and memory with connections held open.
    Connect,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A couple of seconds per mode: checks the harness and that every byte arrives; the
    /// numbers mean nothing.
    pub smoke: bool,
    /// Rounds (runs per mode of each measurement); the default is 5, or 1 for a smoke run.
    pub rounds: Option<u32>,
    /// Only the HTTP latency (every mode, L7 included) and the proxies' idle memory: skips
    /// throughput, raw latency, connection setup and held connections.
    pub http_only: bool,
    /// Only these modes (direct, the baseline, always runs); empty: every mode.
    pub modes: Vec<Mode>,
    /// Only these measurements (memory at rest is always read); empty: every one.
    pub measure: Vec<Measure>,
}

/// How long and how hard each measurement runs.
#[derive(Clone, Debug)]
struct Plan {
    rounds: u32,
    throughput: Duration,
    streams: Vec<u32>,
    latency: Duration,
    rates: Vec<u32>,
    latency_conns: u32,
    request_bytes: usize,
    http_rates: Vec<u32>,
    http_conns: u32,
    http_body_bytes: usize,
    /// The compared modes to start beds for, direct first.
    compared: Vec<Mode>,
    /// The L7 modes to start beds for (they run the HTTP latency only).
    l7_modes: Vec<Mode>,
    /// Whether the fresh-tunnel bed runs (with the connection measurement).
    fresh_tunnels: bool,
    connect: Duration,
    connect_workers: u32,
    /// Cap on connections per connection-rate run (TIME_WAIT sockets pile up otherwise).
    connect_max: u64,
    held: Vec<u32>,
}

impl Plan {
    fn new(options: &Options) -> Plan {
        let mut plan = Plan::sized(options);
        let measure = if options.http_only { vec![Measure::Http] } else { options.measure.clone() };
        let wants = |m: Measure| measure.is_empty() || measure.contains(&m);
        let listed = |m: &Mode| options.modes.is_empty() || options.modes.contains(m);
        if !wants(Measure::Throughput) {
            plan.streams.clear();
        }
        if !wants(Measure::Latency) {
            plan.rates.clear();
        }
        if !wants(Measure::Http) {
            plan.http_rates.clear();
            plan.l7_modes.clear();
        }
        if !wants(Measure::Connect) {
            plan.held.clear();
        }
        plan.compared.retain(|m| *m == Mode::Direct || listed(m));
        plan.l7_modes.retain(listed);
        plan.fresh_tunnels = plan.connects() && listed(&Mode::MtlsFreshTunnels);
        plan
    }

    fn sized(options: &Options) -> Plan {
        if options.smoke {
            Plan {
                rounds: options.rounds.unwrap_or(1),
                throughput: Duration::from_millis(500),
                streams: vec![1, 4],
                latency: Duration::from_secs(1),
                rates: vec![1000],
                latency_conns: 16,
                request_bytes: 1024,
                http_rates: vec![1000],
                http_conns: 16,
                http_body_bytes: 1024,
                // 10,000 rules take a while to load and to evaluate in a debug build.
                compared: Mode::COMPARED.to_vec(),
                l7_modes: vec![Mode::MtlsL7One, Mode::MtlsL7Hundred, Mode::EnvoyHttp],
                fresh_tunnels: true,
                connect: Duration::from_millis(500),
                connect_workers: 8,
                connect_max: 2000,
                held: vec![200],
            }
        } else {
            Plan {
                rounds: options.rounds.unwrap_or(5),
                throughput: Duration::from_secs(5),
                streams: vec![1, 4],
                latency: Duration::from_secs(10),
                rates: vec![1000, 5000],
                latency_conns: 16,
                request_bytes: 1024,
                http_rates: vec![1000, 5000],
                http_conns: 16,
                http_body_bytes: 1024,
                compared: Mode::COMPARED.to_vec(),
                l7_modes: Mode::L7.to_vec(),
                fresh_tunnels: true,
                connect: Duration::from_secs(3),
                connect_workers: 8,
                connect_max: 8000,
                held: vec![1000, 10_000],
            }
        }
    }

    /// Whether the connection-setup measurement (and its fresh-tunnel bed) runs.
    fn connects(&self) -> bool {
        !self.held.is_empty()
    }

    /// The modes the HTTP latency runs in, in the order each round runs them.
    fn http_modes(&self) -> Vec<Mode> {
        self.compared.iter().chain(&self.l7_modes).copied().collect()
    }

    /// The measurements the run makes, for the progress bar.
    fn steps(&self, modes: usize) -> u64 {
        let http = self.http_rates.len() * self.http_modes().len();
        let fresh = usize::from(self.fresh_tunnels);
        let connect = if self.connects() { modes + fresh } else { 0 };
        let per_round = (self.streams.len() + self.rates.len()) * modes + http + connect;
        let beds = modes + fresh + self.l7_modes.len();
        (u64::from(self.rounds) * per_round as u64)
            + beds as u64
            + (self.held.len() * (modes - 1)) as u64
            + self.l7_modes.len() as u64
            + 1
    }
}

/// A progress bar on a terminal, numbered lines otherwise (CI logs).
struct Progress {
    bar: Option<ProgressBar>,
    done: u64,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar, done: 0, total }
    }

    /// Shows what runs now.
    fn start(&mut self, what: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(what.to_owned()),
            None => eprintln!("[{}/{}] {what}", self.done + 1, self.total),
        }
    }

    fn finish_one(&mut self) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Prints a line above the bar.
    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("    {line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Describes this machine for a report.
pub(crate) fn machine(fd_limit: u64) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_owned(),
        fd_limit,
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs a subcommand of this binary in the bed's client pod and parses its JSON report.
fn in_pod<T: serde::de::DeserializeOwned>(bed: &Bed, args: &[String]) -> anyhow::Result<T> {
    bed.run_in_client_pod(args)
}

/// The two workloads of the fixed-rate latency measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// Raw bytes to pod-app's echo.
    Raw,
    /// HTTP/1.1 POSTs to the bench's HTTP echo, at the path only the last L7 rule allows.
    Http,
}

/// Runs the load generator once in the bed at `rate` and reads the proxies' CPU around it. A
/// run that stalled, lost responses, got a status other than 200 or missed its rate is kept as
/// discarded (with the reason); a smoke run fails on anything but a missed rate.
fn latency_run(
    bed: &Bed,
    plan: &Plan,
    round: u32,
    rate: u32,
    wire: Wire,
    smoke: bool,
) -> anyhow::Result<LatencyRun> {
    let (port, conns, size) = match wire {
        Wire::Raw => (ECHO_PORT, plan.latency_conns, plan.request_bytes),
        Wire::Http => (HTTP_PORT, plan.http_conns, plan.http_body_bytes),
    };
    let duration = plan.latency;
    let mut args: Vec<String> = [
        "load".into(),
        "--to".into(),
        bed.target(port).to_string(),
        "--rate".into(),
        rate.to_string(),
        "--conns".into(),
        conns.to_string(),
        "--duration-ms".into(),
        duration.as_millis().to_string(),
        "--size".into(),
        size.to_string(),
    ]
    .to_vec();
    if wire == Wire::Http {
        args.extend(["--http-path".into(), http::request_path(bed.mode.l7_rules())]);
    }
    bed.settle(Duration::from_secs(2));
    let before = bed.sample_proxies()?;
    let machine_before = resources::machine_busy_ticks()?;
    let report: LoadReport = in_pod(bed, &args)?;
    let machine_after = resources::machine_busy_ticks()?;
    let after = bed.sample_proxies()?;
    let discarded = report.discard_reason();
    if smoke && discarded.is_some() && discarded != report.rate_miss() {
        bail!("{} at {rate} req/s ({wire:?}): {}", bed.mode.label(), discarded.unwrap_or_default());
    }
    let proxy_cpu_secs = bed
        .mode
        .has_proxies()
        .then(|| resources::cpu_between(&before, &after, resources::ticks_per_second()).as_secs_f64());
    let machine_cpu_secs =
        Some(machine_after.saturating_sub(machine_before) as f64 / resources::ticks_per_second() as f64);
    Ok(LatencyRun { mode: bed.mode, round, report, proxy_cpu_secs, machine_cpu_secs, discarded })
}

fn connect_run(bed: &Bed, plan: &Plan, round: u32) -> anyhow::Result<ConnectRun> {
    let args: Vec<String> = [
        "connect".into(),
        "--to".into(),
        bed.target(ECHO_PORT).to_string(),
        "--workers".into(),
        plan.connect_workers.to_string(),
        "--duration-ms".into(),
        plan.connect.as_millis().to_string(),
        "--max".into(),
        plan.connect_max.to_string(),
    ]
    .to_vec();
    bed.settle(Duration::from_secs(2));
    let tunnels_before = bed.tunnels_opened();
    let report: ConnectReport = in_pod(bed, &args)?;
    let tunnels = matches!(bed.mode, Mode::Mtls | Mode::MtlsFreshTunnels)
        .then(|| bed.tunnels_opened() - tunnels_before);
    anyhow::ensure!(
        report.completed > 0,
        "{}: no connection completed: {:?}",
        bed.mode.label(),
        report.errors
    );
    if bed.mode == Mode::MtlsFreshTunnels {
        // The log is written as tunnels open; every connection must have had its own.
        let opened = tunnels.unwrap_or(0);
        anyhow::ensure!(
            opened >= report.completed,
            "{}: {} connections but only {opened} tunnels opened: pooling was not defeated",
            bed.mode.label(),
            report.completed
        );
    }
    Ok(ConnectRun { mode: bed.mode, round, report, tunnels_opened: tunnels })
}

/// Opens `conns` connections from the client pod, reads the proxies' memory while they are
/// open, then closes them.
fn held_rss(bed: &Bed, conns: u32) -> anyhow::Result<u64> {
    let args = [
        "hold".to_owned(),
        "--to".into(),
        bed.target(ECHO_PORT).to_string(),
        "--conns".into(),
        conns.to_string(),
    ];
    let mut child = bed
        .in_client_pod(&args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting xtask-bench hold")?;
    let stdout = child.stdout.take().context("hold's stdout")?;
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let result = match read {
        Ok(_) if line.trim() == format!("HELD {conns}") => {
            // Let the proxies finish allocating for the last connections.
            std::thread::sleep(Duration::from_millis(500));
            bed.sample_proxies().map(|s| s.iter().map(|s| s.rss_kib).sum())
        }
        _ => Err(anyhow::anyhow!("could not hold {conns} connections ({})", line.trim())),
    };
    drop(child.stdin.take());
    let output = child.wait_with_output().context("waiting for xtask-bench hold")?;
    match result {
        Err(err) => Err(err.context(String::from_utf8_lossy(&output.stderr).trim().to_owned())),
        ok => ok,
    }
}

/// Takes the lock of the runs with this prefix: two at once would tear down each other's test
/// beds (same names) and disturb each other's measurements. Held until the file is dropped.
pub(crate) fn lock(prefix: &str) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(".{prefix}.lock"));
    let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; the lock goes with the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `cargo xtask bench{}{}` is running on this machine: wait for it to finish",
            if prefix.starts_with("scale") { " --scale" } else { "" },
            if prefix.ends_with("smoke") { " --smoke" } else { "" }
        );
    }
    Ok(file)
}

/// Runs the whole bench and writes its report.
pub fn run(options: &Options) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the benchmarks need root (BPF, network namespaces, cgroups): run `sudo cargo xtask bench`");
    }
    let plan = Plan::new(options);
    // Every proxied connection holds two sockets in each mesh-node: 10,000 need ~20,000 files.
    let fd_limit = resources::raise_fd_limit(65_536);
    let started = now_unix();
    let mut results = Results {
        meta: Meta {
            started: report::iso_utc(started),
            smoke: options.smoke,
            rounds: plan.rounds,
            release: !cfg!(debug_assertions),
            machine: machine(fd_limit),
            throughput_secs: plan.throughput.as_secs_f64(),
            latency_secs: plan.latency.as_secs_f64(),
            latency_conns: plan.latency_conns,
            request_bytes: plan.request_bytes,
            connect_secs: plan.connect.as_secs_f64(),
            connect_workers: plan.connect_workers,
            http_body_bytes: plan.http_body_bytes,
            http_conns: plan.http_conns,
            notes: Vec::new(),
        },
        ..Results::default()
    };
    if !options.smoke && plan.rounds < 5 {
        results
            .meta
            .notes
            .push(format!("only {} rounds: medians of fewer than 5 runs are rough", plan.rounds));
    }
    if options.http_only {
        results.meta.notes.push(
            "--http-only: HTTP latency and idle memory only (no throughput, raw latency, connection setup or \
             held connections)"
                .into(),
        );
    }
    let prefix = if options.smoke { "bench-smoke" } else { "bench" };
    let _lock = lock(prefix)?;
    if !options.modes.is_empty() || !options.measure.is_empty() {
        let names = |v: Vec<String>| if v.is_empty() { "all".to_owned() } else { v.join(", ") };
        results.meta.notes.push(format!(
            "a partial run: modes {}; measurements {}",
            names(plan.compared.iter().chain(&plan.l7_modes).map(|m| m.label().to_owned()).collect()),
            names(options.measure.iter().map(|m| format!("{m:?}").to_lowercase()).collect())
        ));
    }
    let compared = plan.compared.clone();
    let http_modes = plan.http_modes();
    let mut progress = Progress::new(plan.steps(compared.len()));

    let mut beds = Vec::new();
    let fresh = plan.fresh_tunnels.then_some(Mode::MtlsFreshTunnels);
    for mode in compared.iter().copied().chain(fresh).chain(plan.l7_modes.iter().copied()) {
        progress.start(&format!("starting the {} test bed", mode.label()));
        beds.push(
            Bed::start(mode, prefix).with_context(|| format!("starting the {} test bed", mode.label()))?,
        );
        progress.finish_one();
    }
    // Right after start-up, before any measurement traffic (the checks' few requests aside).
    let idle: Vec<(Mode, u64)> = beds
        .iter()
        .filter(|b| b.mode.has_proxies())
        .map(|b| Ok((b.mode, b.sample_proxies()?.iter().map(|s| s.rss_kib).sum())))
        .collect::<anyhow::Result<_>>()?;
    let bed = |mode: Mode| beds.iter().find(|b| b.mode == mode).context("no test bed for the mode");

    for round in 0..plan.rounds {
        let r = round + 1;
        for &streams in &plan.streams {
            for &mode in &compared {
                progress.start(&format!("round {r}: throughput, {streams} stream(s), {}", mode.label()));
                results.throughput.push(throughput::run(bed(mode)?, round, streams, plan.throughput)?);
                progress.finish_one();
            }
        }
        for (wire, rates, modes) in [
            (Wire::Raw, &plan.rates, compared.as_slice()),
            (Wire::Http, &plan.http_rates, http_modes.as_slice()),
        ] {
            let what = if wire == Wire::Http { "HTTP latency" } else { "latency" };
            // Modes that fell behind at a lower rate this round: (mode, why); higher rates would
            // only queue longer, and leave a backlog that disturbs the next runs.
            let mut saturated: Vec<(Mode, String)> = Vec::new();
            for &rate in rates {
                for &mode in modes {
                    progress.start(&format!("round {r}: {what} at {rate} req/s, {}", mode.label()));
                    if let Some((_, why)) = saturated.iter().find(|(m, _)| *m == mode) {
                        let report = LoadReport { target_rps: rate, ..LoadReport::default() };
                        let discarded = Some(format!("not run: {why}"));
                        let run = LatencyRun {
                            mode,
                            round,
                            report,
                            proxy_cpu_secs: None,
                            machine_cpu_secs: None,
                            discarded,
                        };
                        match wire {
                            Wire::Raw => results.latency.push(run),
                            Wire::Http => results.http_latency.push(run),
                        }
                        progress.finish_one();
                        continue;
                    }
                    let run = latency_run(bed(mode)?, &plan, round, rate, wire, options.smoke)?;
                    if let Some(why) = run.report.saturated().filter(|_| run.discarded.is_none()) {
                        let line = format!("round {r}, {what}, {} at {rate} req/s: {why}", mode.label());
                        progress.say(&line);
                        results.meta.notes.push(line);
                        saturated.push((mode, format!("saturated at {rate} req/s in this round")));
                    }
                    if let Some(why) = &run.discarded {
                        let line =
                            format!("round {r}, {what}, {} at {rate} req/s discarded: {why}", mode.label());
                        progress.say(&line);
                        if run.report.wrong_status().is_some() || run.report.stalled.is_some() {
                            results.meta.notes.push(line);
                        }
                    }
                    match wire {
                        Wire::Raw => results.latency.push(run),
                        Wire::Http => results.http_latency.push(run),
                    }
                    progress.finish_one();
                }
            }
        }
        let connect_modes =
            if plan.connects() { compared.iter().copied().chain(fresh).collect() } else { Vec::new() };
        for mode in connect_modes {
            progress.start(&format!("round {r}: new connections per second, {}", mode.label()));
            let run = connect_run(bed(mode)?, &plan, round)?;
            if run.report.failed > 0 {
                let why = format!(
                    "round {r}, {}: {} of {} new connections failed (run not counted): {:?}",
                    mode.label(),
                    run.report.failed,
                    run.report.failed + run.report.completed,
                    run.report.errors
                );
                anyhow::ensure!(!options.smoke, "{why}");
                progress.say(&why);
                results.meta.notes.push(why);
            }
            results.connect.push(run);
            progress.finish_one();
        }
    }

    // Memory: every mode with proxies after the runs; the L7 modes hold no connections (their
    // policy allows only HTTP), so they show what the policy itself costs at rest.
    for &mode in compared.iter().chain(&plan.l7_modes).filter(|m| m.has_proxies()) {
        let bed = bed(mode)?;
        bed.settle(Duration::from_secs(3));
        let before_hold_kib = bed.sample_proxies()?.iter().map(|s| s.rss_kib).sum();
        let mut held = Vec::new();
        let http_only_mode = plan.l7_modes.contains(&mode);
        let to_hold = if http_only_mode { &[][..] } else { plan.held.as_slice() };
        for &conns in to_hold {
            progress.start(&format!(
                "memory with {} open connections, {}",
                report::thousands(conns.into()),
                mode.label()
            ));
            let needed = mode.files_to_hold(conns);
            if fd_limit < needed {
                let why = format!(
                    "open-files limit {fd_limit} < {needed} needed (the hard limit cannot be raised here)"
                );
                results.meta.notes.push(format!(
                    "{}: {} connections not measured: {why}",
                    mode.label(),
                    report::thousands(conns.into())
                ));
                held.push(Held { conns, rss_kib: None, skipped: Some(why) });
            } else {
                let rss = held_rss(bed, conns)
                    .with_context(|| format!("{}: holding {conns} connections", mode.label()))?;
                held.push(Held { conns, rss_kib: Some(rss), skipped: None });
            }
            progress.finish_one();
        }
        if http_only_mode {
            progress.start(&format!("memory at rest, {}", mode.label()));
            progress.finish_one();
        }
        let idle_kib = idle.iter().find(|(m, _)| *m == mode).map_or(0, |(_, kib)| *kib);
        results.memory.push(MemoryRun { mode, idle_kib, before_hold_kib, held });
    }
    progress.start("removing the test beds");
    drop(beds);
    progress.finish_one();
    drop(progress);

    let summary = summarize(&results);
    println!();
    for table in report::tables(&results.meta, &summary) {
        println!("{}", table.to_text());
    }
    for note in &results.meta.notes {
        println!("note: {note}");
    }
    let dir = crate::target_dir().join("bench");
    let written = report::write_files(&dir, &results)?;
    println!(
        "\nwritten: {} (and latest.json, latest.svg, latest.md in {})",
        written.display(),
        dir.display()
    );
    if options.smoke {
        println!(
            "smoke run: the harness works and every byte arrived; the numbers above are not measurements"
        );
    }
    Ok(())
}
