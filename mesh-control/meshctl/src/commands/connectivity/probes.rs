//! Placing probes in pods: meshctl re-executes itself inside a pod's netns and inside a cgroup
//! it creates under the node's pods cgroup (`meshctl-conntest-<pid>-<ns>-<pod>`), exactly as an
//! app of the pod would run, so the node's capture applies. [`Probes`] owns every process and
//! cgroup it made and removes them on every exit path (its `Drop`); a probe also dies with
//! meshctl (`PR_SET_PDEATHSIG`), and a server when its stdin closes.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    interrupted,
    pods::MeshPod,
    probe::{ClientReport, ServerEvent},
};

/// What every cgroup and file of connectivity-test is named after.
pub const PREFIX: &str = "meshctl-conntest";
/// How long a server may take to listen.
const SERVER_START: Duration = Duration::from_secs(5);

/// Where a probe runs.
#[derive(Clone, Debug)]
pub struct Placement {
    pub pod: MeshPod,
    pub pods_cgroup: PathBuf,
}

struct Server {
    pod: String,
    child: Child,
    /// Held open: the server exits when it closes.
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    events: Vec<ServerEvent>,
}

/// The probes and cgroups of one run.
pub struct Probes {
    /// The run's token: servers echo only streams that carry it.
    token: String,
    cgroups: BTreeMap<String, PathBuf>,
    servers: Vec<Server>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").field("cgroups", &self.cgroups).finish_non_exhaustive()
    }
}

/// A started server probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerId(usize);

impl Probes {
    pub fn new(token: String) -> Self {
        Probes { token, cgroups: BTreeMap::new(), servers: Vec::new() }
    }

    /// Returns the run's cgroup in the pod (created on first use).
    fn cgroup(&mut self, placement: &Placement) -> anyhow::Result<PathBuf> {
        let key = placement.pod.key();
        if let Some(dir) = self.cgroups.get(&key) {
            return Ok(dir.clone());
        }
        let name =
            format!("{PREFIX}-{}-{}-{}", std::process::id(), placement.pod.namespace, placement.pod.name);
        let dir = placement.pods_cgroup.join(name);
        std::fs::create_dir(&dir).with_context(|| {
            format!("creating the probe cgroup {} (under the node's pods cgroup)", dir.display())
        })?;
        self.cgroups.insert(key, dir.clone());
        Ok(dir)
    }

    /// Returns meshctl's own binary placed in the pod (netns and cgroup joined before exec).
    fn command(&mut self, placement: &Placement) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("locating meshctl's own binary")?;
        let cgroup = self.cgroup(placement)?;
        let mut cmd = Command::new(exe);
        cmd.arg("connectivity-test").arg("probe");
        place(&mut cmd, &placement.pod.netns, &cgroup)?;
        Ok(cmd)
    }

    /// Starts an echo server in the pod and waits until it listens.
    pub fn start_server(&mut self, placement: &Placement, port: u16) -> anyhow::Result<ServerId> {
        let mut cmd = self.command(placement)?;
        cmd.args(["serve", "--port", &port.to_string(), "--token", &self.token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            cmd.spawn().with_context(|| format!("starting a probe in {}", placement.pod.key()))?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        if let Some(mut stderr) = stderr {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                let _ = err_tx.send(text);
            });
        }
        let server =
            Server { pod: placement.pod.key(), stdin: child.stdin.take(), child, lines, events: Vec::new() };
        self.servers.push(server);
        let id = ServerId(self.servers.len() - 1);
        let server = &mut self.servers[id.0];
        match server.lines.recv_timeout(SERVER_START) {
            Ok(line) if line.starts_with("LISTENING") => Ok(id),
            Ok(line) => bail!("the probe in {} said {line:?} instead of listening", server.pod),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = server.child.wait();
                let why = err_rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
                bail!("the probe in {} did not start: {}", server.pod, last_line(&why))
            }
            Err(RecvTimeoutError::Timeout) => {
                bail!("the probe in {} did not listen within {SERVER_START:?}", server.pod)
            }
        }
    }

    /// Waits up to `within` for the server's record of connection `id`.
    pub fn server_event(&mut self, server: ServerId, id: u64, within: Duration) -> Option<ServerEvent> {
        let deadline = Instant::now() + within;
        let server = &mut self.servers[server.0];
        loop {
            if let Some(event) = server.events.iter().find(|e| e.id == Some(id)) {
                return Some(event.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || interrupted() {
                return None;
            }
            match server.lines.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => server.events.extend(serde_json::from_str::<ServerEvent>(&line).ok()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Runs a client probe in the pod: connects to `to`, sends `bytes` of `marker` (hex)
    /// repeated, verifies the echo. Bounded: the probe is killed if it overruns its timeouts.
    pub fn connect(
        &mut self,
        placement: &Placement,
        to: SocketAddr,
        id: u64,
        bytes: usize,
        marker: &str,
        timeout: Duration,
    ) -> anyhow::Result<ClientReport> {
        let mut cmd = self.command(placement)?;
        cmd.args(["connect", "--to", &to.to_string(), "--token", &self.token, "--id", &id.to_string()])
            .args(["--bytes", &bytes.to_string(), "--marker", marker])
            .args(["--timeout-ms", &timeout.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            cmd.spawn().with_context(|| format!("starting a probe in {}", placement.pod.key()))?;
        // Connect, then each read and write, are bounded by `timeout`; a probe past all of
        // them together is stuck.
        let deadline = Instant::now() + timeout * 3 + Duration::from_secs(2);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline || interrupted() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the client probe in {} did not finish in time and was killed", placement.pod.key());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut stdout) = child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        if let Some(mut stderr) = child.stderr.take() {
            stderr.read_to_string(&mut err)?;
        }
        if !status.success() {
            bail!("the client probe in {} failed ({status}): {}", placement.pod.key(), last_line(&err));
        }
        serde_json::from_str(out.trim())
            .with_context(|| format!("the client probe in {} printed {:?}", placement.pod.key(), out.trim()))
    }

    /// Kills every server (by PID) and removes every cgroup of the run; returns what could not
    /// be removed.
    pub fn cleanup(&mut self) -> Vec<String> {
        for mut server in self.servers.drain(..) {
            drop(server.stdin.take());
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        let mut left = Vec::new();
        for (_, dir) in std::mem::take(&mut self.cgroups) {
            if let Err(err) = remove_cgroup(&dir) {
                left.push(format!("cgroup {}: {err}", dir.display()));
            }
        }
        left
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for problem in self.cleanup() {
            eprintln!("meshctl: could not remove {problem}");
        }
    }
}

/// Removes a cgroup of this run. Every process in it is one of our probes; one still there
/// (a client killed at the deadline may take a moment to leave) is killed through
/// `cgroup.kill`, which only reaches this cgroup.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    let mut last = Ok(());
    for attempt in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => last = Err(err),
        }
        if attempt == 5 {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last
}

/// Removes what an earlier, interrupted run left in a pods cgroup: cgroups named after a
/// meshctl process that no longer exists. Returns the ones removed.
pub fn sweep_stale_cgroups(pods_cgroup: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pods_cgroup) else { return removed };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&format!("{PREFIX}-")).and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && remove_cgroup(&entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

/// Prepares `cmd` to start inside `netns` and `cgroup`, both joined before exec (no socket of
/// the probe ever exists outside them), and to die with meshctl.
fn place(cmd: &mut Command, netns: &Path, cgroup: &Path) -> anyhow::Result<()> {
    let ns =
        std::fs::File::open(netns).with_context(|| format!("opening the pod's netns {}", netns.display()))?;
    let procs = CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
        .context("the cgroup path contains NUL")?;
    // SAFETY: the closure only makes async-signal-safe calls (prctl, setns, open, write,
    // close) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn last_line(text: &str) -> &str {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(nothing on stderr)").trim()
}
