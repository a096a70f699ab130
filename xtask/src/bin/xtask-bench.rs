//! The bench harness, run by `cargo xtask bench` once everything it needs is built (it finds
//! the binaries through `MESH_NODE_BIN`, `MESH_CONTROL_BIN`, `POD_APP_BIN` and
//! `NODEMESH_BPF_OBJECT`). `run` is the bench and `scale` the control plane at scale; the hidden
//! subcommands are the clients it starts inside the client pod and the HTTP server it starts in
//! the server pod.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;

use clap::{Parser, Subcommand};
use xtask::bench::{chart, connections, http, latency, report, resources, results, scale, suite};

#[derive(Debug, Parser)]
#[command(name = "xtask-bench", about = "nodemesh benchmarks (run through `cargo xtask bench`)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the benchmarks and writes the report to target/bench/.
    Run {
        /// A couple of seconds per mode: checks the harness, no timing.
        #[arg(long)]
        smoke: bool,
        /// Runs per mode of each measurement (default 5; 1 with --smoke).
        #[arg(long)]
        rounds: Option<u32>,
        /// Only the HTTP latency (direct, L4, mTLS and the L7 modes) and idle memory.
        #[arg(long)]
        http_only: bool,
        /// Only these modes, comma-separated (direct, the baseline, always runs).
        #[arg(long, value_enum, value_delimiter = ',')]
        modes: Vec<results::Mode>,
        /// Only these measurements, comma-separated (memory at rest is always read).
        #[arg(long, value_enum, value_delimiter = ',')]
        measure: Vec<suite::Measure>,
    },
    /// Throughput only (every compared mode: direct, L4, mTLS, Envoy), for profiling the data path: prints Gbit/s per run
    /// and the median per mode, and the ratio to direct. Keeps no report.
    #[command(hide = true)]
    Throughput {
        /// Streams per run.
        #[arg(long, default_value_t = 1)]
        streams: u32,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Before each run, print the proxies' PIDs and wait this long (to attach a profiler).
        #[arg(long, default_value_t = 0)]
        pause_secs: u64,
    },
    /// Measures mesh-control at scale: convergence and memory with 100 simulated nodes.
    Scale {
        /// 100 workloads, 5 nodes, 10 changes: checks that every change converges, no timing.
        #[arg(long)]
        smoke: bool,
    },
    /// Prints a saved run (`target/bench/<time>.json`) as Markdown, and writes its chart.
    Render {
        /// The run's JSON.
        json: PathBuf,
        /// Where to write the SVG chart.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Open-loop load at a fixed rate against pod-app's echo (or, with --http-path, HTTP/1.1
    /// POSTs to `http-echo`); prints a JSON report.
    #[command(hide = true)]
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: u32,
        #[arg(long, default_value_t = 16)]
        conns: u32,
        #[arg(long)]
        duration_ms: u64,
        /// Request size in bytes (the body's, over HTTP).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Speak HTTP/1.1: keep-alive POSTs to this path.
        #[arg(long)]
        http_path: Option<String>,
    },
    /// HTTP/1.1 server answering every request 200 with its own body; prints `LISTENING`.
    #[command(hide = true)]
    HttpEcho {
        #[arg(long)]
        port: u16,
    },
    /// New connections back to back against pod-app's echo; prints a JSON report.
    #[command(hide = true)]
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 8)]
        workers: u32,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = u64::MAX)]
        max: u64,
    },
    /// Opens connections, prints `HELD <n>`, keeps them until standard input closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: u32,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Cmd::Run { smoke, rounds, http_only, modes, measure } => {
            suite::run(&suite::Options { smoke, rounds, http_only, modes, measure })
        }
        Cmd::Throughput { streams, secs, rounds, pause_secs } => {
            throughput_only(streams, secs, rounds, pause_secs)
        }
        Cmd::Scale { smoke } => scale::run::run(smoke),
        Cmd::Render { json, svg } => render(&json, svg.as_deref()),
        Cmd::Load { to, rate, conns, duration_ms, size, http_path } => {
            let duration = Duration::from_millis(duration_ms);
            let spec = latency::LoadSpec { to, rate, conns, duration, size, http_path };
            latency::run(spec)
                .and_then(|report| Ok(serde_json::to_string(&report)?))
                .map(|json| println!("{json}"))
        }
        Cmd::HttpEcho { port } => std::net::TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("listening on port {port}"))
            .and_then(http::serve),
        Cmd::Connect { to, workers, duration_ms, max } => {
            let report = connections::rate(to, workers, Duration::from_millis(duration_ms), max);
            serde_json::to_string(&report).map(|json| println!("{json}")).map_err(Into::into)
        }
        Cmd::Hold { to, conns } => {
            resources::raise_fd_limit(u64::from(conns) + 1024);
            connections::hold(to, conns)
        }
    };
    xtask::exit_code(result)
}

/// Runs only the throughput measurement, interleaving the modes round after round.
fn throughput_only(streams: u32, secs: u64, rounds: u32, pause_secs: u64) -> anyhow::Result<()> {
    use xtask::bench::{modes::Bed, results::Mode, throughput};
    // Its own bed names ("tput-…"): a full bench run may be going on beside it.
    let beds = [Mode::Direct, Mode::L4, Mode::Mtls]
        .iter()
        .map(|&mode| Bed::start(mode, "tput").with_context(|| format!("starting the {} bed", mode.label())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut rates: Vec<(Mode, Vec<f64>)> = beds.iter().map(|b| (b.mode, Vec::new())).collect();
    for round in 0..rounds {
        for (bed, (_, got)) in beds.iter().zip(rates.iter_mut()) {
            if pause_secs > 0 && bed.mode.has_proxies() {
                eprintln!("{}: proxies {:?}", bed.mode.label(), bed.proxy_pids());
                std::thread::sleep(Duration::from_secs(pause_secs));
            }
            let run = throughput::run(bed, round, streams, Duration::from_secs(secs))?;
            eprintln!("round {}: {} {:.2} Gbit/s", round + 1, bed.mode.label(), run.gbit_per_s);
            got.push(run.gbit_per_s);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let direct = median(&rates[0].1);
    for (mode, got) in &rates {
        let m = median(got);
        println!(
            "{:<8} {streams} stream(s): median {m:.2} Gbit/s ({:.2}x direct) runs {got:.2?}",
            mode.label(),
            m / direct
        );
    }
    Ok(())
}

/// Re-renders a saved run: the Markdown on standard output, the chart to `svg`.
fn render(json: &std::path::Path, svg: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let run: results::Results =
        serde_json::from_str(&text).with_context(|| format!("{} is not a bench run", json.display()))?;
    if let Some(path) = svg {
        let chart = chart::svg(&run.meta, &results::summarize(&run));
        std::fs::write(path, chart).with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", report::markdown(&run));
    Ok(())
}
