//! The scale run (`xtask-bench scale`): per size, a fresh config directory and mesh-control
//! (`MESH_CONTROL_BIN`, local mode, loopback only), the simulated nodes, the initial sync, then
//! the changes one at a time; the report goes to `target/bench/scale-*`. mesh-control is ended
//! by its PID and the directory removed when a size is done, also on failure.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    ChangeRun, ControlUsage, Plan, ScaleMeta, ScaleResults, SizeRun,
    client::Fleet,
    cluster::{self, Cluster},
    summarize, tables, write_files,
};
use crate::bench::{report, resources, suite};

/// What mesh-control logs when it publishes a new configuration.
const CHANGED_LOG: &str = "configuration changed";
/// mesh-control's default `--reload-interval-ms`: the bench runs it as shipped.
const RELOAD_INTERVAL_MS: u64 = 1000;

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("nodemesh-scale-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("config"))
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mesh-control process: killed (by its PID, through its `Child`) on drop. A thread copies
/// its log to a file and timestamps each "configuration changed" line as it is written.
struct ControlPlane {
    child: Child,
    changed: mpsc::Receiver<Instant>,
    log: PathBuf,
    listen: SocketAddr,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns a loopback port free right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").context("finding a free port")?.local_addr()?.port())
}

impl ControlPlane {
    /// Starts mesh-control on `dir/config` and waits until it serves and has written a token
    /// for each of `nodes`.
    fn start(binary: &Path, dir: &Path, nodes: &[String]) -> anyhow::Result<ControlPlane> {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut child = Command::new(binary)
            .arg("--config-dir")
            .arg(dir.join("config"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
            .args(["--reload-interval-ms", &RELOAD_INTERVAL_MS.to_string()])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("mesh-control's standard error")?;
        let log = dir.join("mesh-control.log");
        let mut file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let (tx, changed) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(CHANGED_LOG) {
                    let _ = tx.send(Instant::now());
                }
                let _ = writeln!(file, "{line}");
            }
        });
        let mut control = ControlPlane { child, changed, log, listen };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let tokens = nodes.iter().all(|n| control.token_path(dir, n).exists());
            if tokens && TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
                return Ok(control);
            }
            if let Ok(Some(status)) = control.child.try_wait() {
                bail!("mesh-control exited ({status}): {}", control.log_tail());
            }
            if Instant::now() > deadline {
                bail!("mesh-control not serving after 60 s: {}", control.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn token_path(&self, dir: &Path, node: &str) -> PathBuf {
        dir.join("state").join("nodes").join(format!("{node}.token"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("last lines of its log:\n{}", lines[lines.len().saturating_sub(10)..].join("\n"))
    }

    /// Returns (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let rss = resources::parse_status_kib(&status, "VmRSS").context("no VmRSS")?;
        let hwm = resources::parse_status_kib(&status, "VmHWM").context("no VmHWM")?;
        Ok((rss, hwm))
    }

    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        Ok(resources::sample(self.pid())?.cpu_ticks)
    }

    /// The first "configuration changed" logged at or after `since`, dropping older ones.
    fn noticed_since(&self, since: Instant) -> Option<Instant> {
        self.changed.try_iter().find(|at| *at >= since)
    }
}

/// Writes `content` to `dir/name` by renaming a temporary file into place (mesh-control never
/// sees half a file); returns the moment just before the rename.
fn replace_file(dir: &Path, name: &str, content: &str) -> anyhow::Result<Instant> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    let at = Instant::now();
    std::fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(at)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Measures one size.
async fn run_size(
    binary: &Path,
    plan: &Plan,
    size: super::Size,
    say: &dyn Fn(&str),
) -> anyhow::Result<SizeRun> {
    let dir = TempDir::new(&size.workloads.to_string())?;
    let config = dir.0.join("config");
    let mut cluster = Cluster::new(size.workloads, size.services, plan.nodes);
    for (name, content) in cluster.files() {
        std::fs::write(config.join(&name), content).with_context(|| format!("writing {name}"))?;
    }
    let nodes: Vec<String> = (0..plan.nodes).map(cluster::node_name).collect();
    let control = ControlPlane::start(binary, &dir.0, &nodes)?;
    let fail = |err: anyhow::Error| err.context(control.log_tail());
    let (started_kib, _) = control.memory()?;
    let root =
        std::fs::read_to_string(dir.0.join("state/ca/root-cert.pem")).context("reading the mesh root")?;
    let credentials = nodes
        .iter()
        .map(|n| {
            let token =
                std::fs::read_to_string(control.token_path(&dir.0, n)).context("reading a node token")?;
            Ok((n.clone(), token.trim().to_owned()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addresses = cluster.expected_addresses().len();

    say(&format!("{} workloads: {} nodes connecting", size.workloads, plan.nodes));
    let cpu_before_sync = control.cpu_ticks()?;
    let connecting = Instant::now();
    let fleet = Fleet::connect(control.listen.port(), &root, credentials, addresses)?;
    let synced = fleet.synced(plan.sync_timeout).await.map_err(fail)?;
    let initial_sync_us = micros(synced - connecting);
    let cpu_after_sync = control.cpu_ticks()?;
    let (synced_kib, _) = control.memory()?;
    say(&format!(
        "{} workloads: all {} nodes in sync after {:.2} s",
        size.workloads,
        plan.nodes,
        (synced - connecting).as_secs_f64()
    ));

    let mut changes = Vec::with_capacity(plan.changes as usize);
    for i in 0..plan.changes {
        tokio::time::sleep(plan.gap_before(i)).await;
        let change = cluster.change(i);
        fleet.expect(change.watch.clone());
        let written = replace_file(&config, &change.file, &change.content)?;
        let (first, last) = fleet
            .converged(plan.change_timeout)
            .await
            .map_err(|e| fail(e.context(format!("change {i} ({})", change.kind.label()))))?;
        let noticed = control.noticed_since(written);
        changes.push(ChangeRun {
            kind: change.kind,
            noticed_us: noticed.map(|n| micros(n.saturating_duration_since(written))),
            first_us: micros(first.saturating_duration_since(written)),
            converged_us: micros(last.saturating_duration_since(written)),
        });
    }
    let cpu_after_changes = control.cpu_ticks()?;
    // Steady state: everything delivered, nodes connected and idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (steady_kib, peak_kib) = control.memory()?;
    let differences = fleet.differences(&cluster.expected_addresses());
    anyhow::ensure!(
        differences.is_empty(),
        "after the changes the nodes do not hold what the manifests say: {}",
        differences.join("; ")
    );
    drop(fleet);
    drop(control);
    let ticks = resources::ticks_per_second() as f64;
    Ok(SizeRun {
        size,
        nodes: plan.nodes,
        addresses,
        initial_sync_us,
        changes,
        usage: ControlUsage {
            started_kib,
            synced_kib,
            steady_kib,
            peak_kib,
            sync_cpu_secs: cpu_after_sync.saturating_sub(cpu_before_sync) as f64 / ticks,
            changes_cpu_secs: cpu_after_changes.saturating_sub(cpu_after_sync) as f64 / ticks,
        },
    })
}

/// Runs the scale bench and writes its report.
pub fn run(smoke: bool) -> anyhow::Result<()> {
    let binary = PathBuf::from(std::env::var_os("MESH_CONTROL_BIN").context("MESH_CONTROL_BIN is not set")?);
    let plan = Plan::new(smoke);
    let _lock = suite::lock(if smoke { "scale-smoke" } else { "scale" })?;
    // 100 connections, and mesh-control's files: well within any limit, but say so if not.
    let fd_limit = resources::raise_fd_limit(4096);
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut results = ScaleResults {
        meta: ScaleMeta {
            started: report::iso_utc(started),
            smoke,
            release: !binary.components().any(|c| c.as_os_str() == "debug"),
            machine: suite::machine(fd_limit),
            nodes: plan.nodes,
            changes: plan.changes,
            reload_interval_ms: RELOAD_INTERVAL_MS,
            notes: Vec::new(),
        },
        runs: Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let say = |line: &str| eprintln!("  {line}");
    for &size in &plan.sizes {
        eprintln!(
            "scale: {} workloads, {} services, {} nodes, {} changes",
            report::thousands(size.workloads.into()),
            report::thousands(size.services.into()),
            plan.nodes,
            plan.changes
        );
        let run = runtime
            .block_on(run_size(&binary, &plan, size, &say))
            .with_context(|| format!("scale run with {} workloads", size.workloads))?;
        results.runs.push(run);
    }
    drop(runtime);

    println!();
    for table in tables(&results.meta, &summarize(&results)) {
        println!("{}", table.to_text());
    }
    let dir = crate::target_dir().join("bench");
    let written = write_files(&dir, &results)?;
    println!(
        "\nwritten: {} (and scale-latest.json, scale-latest.md in {})",
        written.display(),
        dir.display()
    );
    if smoke {
        println!("smoke run: every node converged on every change; the numbers above are not measurements");
    }
    Ok(())
}
