//! The bench run itself (`xtask-bench run`): starts a test bed per mode, runs every measurement
//! round after round with the modes interleaved (direct, L4, mTLS, direct, L4, mTLS, …), then
//! the memory measurements, and writes the report.

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    connections::ConnectReport,
    latency::LoadReport,
    modes::{Bed, ECHO_PORT},
    report, resources,
    results::{ConnectRun, Held, LatencyRun, Machine, MemoryRun, Meta, Mode, Results, summarize},
    throughput,
};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// A couple of seconds per mode: checks the harness and that every byte arrives; the
    /// numbers mean nothing.
    pub smoke: bool,
    /// Rounds (runs per mode of each measurement); the default is 5, or 1 for a smoke run.
    pub rounds: Option<u32>,
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
    connect: Duration,
    connect_workers: u32,
    /// Cap on connections per connection-rate run (TIME_WAIT sockets pile up otherwise).
    connect_max: u64,
    held: Vec<u32>,
}

impl Plan {
    fn new(options: Options) -> Plan {
        if options.smoke {
            Plan {
                rounds: options.rounds.unwrap_or(1),
                throughput: Duration::from_millis(500),
                streams: vec![1, 4],
                latency: Duration::from_secs(1),
                rates: vec![1000],
                latency_conns: 16,
                request_bytes: 1024,
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
                connect: Duration::from_secs(3),
                connect_workers: 8,
                connect_max: 8000,
                held: vec![1000, 10_000],
            }
        }
    }

    /// The measurements each round runs, for the progress bar.
    fn steps(&self, modes: usize) -> u64 {
        let per_round = (self.streams.len() + self.rates.len()) * modes + modes + 1;
        (u64::from(self.rounds) * per_round as u64) + (modes as u64 + 1) + (self.held.len() * 2) as u64 + 1
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
    let output = bed.in_client_pod(args)?.output().context("running xtask-bench in the client pod")?;
    anyhow::ensure!(
        output.status.success(),
        "{}: xtask-bench {} failed: {}",
        bed.mode.label(),
        args.first().map_or("", String::as_str),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("parsing the report {:?}", String::from_utf8_lossy(&output.stdout)))
}

fn latency_run(bed: &Bed, plan: &Plan, round: u32, rate: u32) -> anyhow::Result<LatencyRun> {
    let args: Vec<String> = [
        "load".into(),
        "--to".into(),
        bed.server(ECHO_PORT).to_string(),
        "--rate".into(),
        rate.to_string(),
        "--conns".into(),
        plan.latency_conns.to_string(),
        "--duration-ms".into(),
        plan.latency.as_millis().to_string(),
        "--size".into(),
        plan.request_bytes.to_string(),
    ]
    .to_vec();
    bed.settle(Duration::from_secs(2));
    let before = bed.sample_proxies()?;
    let report: LoadReport = in_pod(bed, &args)?;
    let after = bed.sample_proxies()?;
    anyhow::ensure!(
        report.completed == report.sent && report.sent > 0,
        "{}: {} of {} responses arrived",
        bed.mode.label(),
        report.completed,
        report.sent
    );
    let proxy_cpu_secs = bed
        .mode
        .has_proxies()
        .then(|| resources::cpu_between(&before, &after, resources::ticks_per_second()).as_secs_f64());
    let discarded = report.rate_miss();
    Ok(LatencyRun { mode: bed.mode, round, report, proxy_cpu_secs, discarded })
}

fn connect_run(bed: &Bed, plan: &Plan, round: u32) -> anyhow::Result<ConnectRun> {
    let args: Vec<String> = [
        "connect".into(),
        "--to".into(),
        bed.server(ECHO_PORT).to_string(),
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
        bed.server(ECHO_PORT).to_string(),
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
pub fn run(options: Options) -> anyhow::Result<()> {
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
    let prefix = if options.smoke { "bench-smoke" } else { "bench" };
    let _lock = lock(prefix)?;
    let compared = Mode::COMPARED;
    let mut progress = Progress::new(plan.steps(compared.len()));

    let mut beds = Vec::new();
    for mode in compared.iter().copied().chain([Mode::MtlsFreshTunnels]) {
        progress.start(&format!("starting the {} test bed", mode.label()));
        beds.push(
            Bed::start(mode, prefix).with_context(|| format!("starting the {} test bed", mode.label()))?,
        );
        progress.finish_one();
    }
    // Right after start-up, before any measurement traffic (the check's one echo aside).
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
        for &rate in &plan.rates {
            for &mode in &compared {
                progress.start(&format!("round {r}: latency at {rate} req/s, {}", mode.label()));
                let run = latency_run(bed(mode)?, &plan, round, rate)?;
                if let Some(why) = &run.discarded {
                    progress.say(&format!("round {r}, {} at {rate} req/s discarded: {why}", mode.label()));
                }
                results.latency.push(run);
                progress.finish_one();
            }
        }
        for mode in compared.iter().copied().chain([Mode::MtlsFreshTunnels]) {
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

    for &mode in compared.iter().filter(|m| m.has_proxies()) {
        let bed = bed(mode)?;
        bed.settle(Duration::from_secs(3));
        let before_hold_kib = bed.sample_proxies()?.iter().map(|s| s.rss_kib).sum();
        let mut held = Vec::new();
        for &conns in &plan.held {
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
