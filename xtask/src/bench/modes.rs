//! The test beds the modes run on: one two-node topology per mode, all up at once so rounds can
//! interleave them, each with an echo server, a sink and the bench's HTTP echo in the server
//! pod (the L7 modes' beds only the HTTP echo: their policy allows only HTTP). The client pod is
//! a1 on node-a and the server pod b1 on node-b, so in the meshed modes both node proxies are on
//! the path. The Envoy bed runs no mesh-node: an Envoy on each node ([`envoy`]), the client
//! pointed at node-a's (see [`Bed::target`]).

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodemesh_testbed::{NodeId, Topology, manifest::NAMESPACE, netns, process::place};

use super::{
    envoy, http,
    latency::LoadReport,
    resources::{self, Sample},
    results::Mode,
};

/// pod-app's echo server (latency, connections, memory).
pub const ECHO_PORT: u16 = 8080;
/// pod-app's sink (throughput).
pub const SINK_PORT: u16 = 9000;
/// The bench's HTTP echo (`xtask-bench http-echo`, HTTP latency).
pub const HTTP_PORT: u16 = 8081;
const CLIENT: &str = "a1";
const SERVER: &str = "b1";
/// How long an L7 bed may take until its policy is enforced (10,000 rules to compile and send).
const POLICY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an Envoy may take to load its configuration and start its workers.
const ENVOY_TIMEOUT: Duration = Duration::from_secs(30);

/// A mode's topology, started and checked.
pub struct Bed {
    pub mode: Mode,
    pub topology: Topology,
    /// The HTTP echo in the server pod (this process's child; ended by PID when the bed goes).
    http_server: Option<Child>,
    /// The Envoy bed's Envoys, node-a's first (this process's children, ended by PID), and the
    /// directory of their certificates, configurations and logs.
    envoys: Vec<Child>,
    envoy_dir: Option<PathBuf>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for mut child in self.http_server.take().into_iter().chain(self.envoys.drain(..)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.envoy_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Bed {
    /// Builds the mode's topology, starts what the mode runs (nothing, standalone mesh-nodes,
    /// or mesh-control and meshed mesh-nodes, with the L7 modes' policy) and the servers, and
    /// checks the path: one verified echo (which, for mTLS, also opens the pooled tunnel) and
    /// HTTP requests answered 200; in an L7 mode also a request the policy denies (403), which
    /// proves the policy is in force.
    pub fn start(mode: Mode, prefix: &str) -> anyhow::Result<Bed> {
        let mut topology = Topology::build(&format!("{prefix}-{}", mode.bed_name()))?;
        let rules = mode.l7_rules();
        if rules > 0 {
            topology.label(SERVER, &format!("app: {}", http::SERVER_APP))?;
            topology.write_config("bench-l7-policy", &http::policy_yaml(NAMESPACE, rules))?;
        }
        let mut bed = Bed { mode, topology, http_server: None, envoys: Vec::new(), envoy_dir: None };
        match mode {
            Mode::Direct => {}
            Mode::L4 => {
                for node in NodeId::ALL {
                    bed.topology.start_node(node)?;
                }
            }
            Mode::Mtls | Mode::MtlsL7One | Mode::MtlsL7Hundred | Mode::MtlsL7TenThousand => {
                bed.topology.start_meshed(&[])?;
            }
            Mode::MtlsFreshTunnels => bed.topology.start_meshed_with(&[], &["--hbone-tunnel-reuse=false"])?,
            Mode::Envoy | Mode::EnvoyHttp => bed.start_envoys()?,
        }
        for pod in [CLIENT, SERVER] {
            // Connection-rate runs leave many sockets in TIME_WAIT: widen the ports of these
            // test pods (their own netns only) and let the client reuse TIME_WAIT ports.
            netns::sysctl(&bed.topology.netns_name(pod), "net.ipv4.ip_local_port_range", "10000 65000")?;
        }
        netns::sysctl(&bed.topology.netns_name(CLIENT), "net.ipv4.tcp_tw_reuse", "1")?;
        if rules == 0 {
            bed.topology.serve(SERVER, ECHO_PORT)?;
            bed.topology.sink(SERVER, SINK_PORT)?;
            let check = bed.topology.client(CLIENT, bed.target(ECHO_PORT), 64 * 1024, 2)?;
            anyhow::ensure!(check.ok, "{}: the path does not work: {:?}", mode.label(), check.errors);
            if mode.is_envoy() {
                // The tunnel must be TLS: plaintext straight to node-b's Envoy gets no echo.
                let tunnel = SocketAddr::from((NodeId::B.link_ip(), ECHO_PORT + envoy::TUNNEL_PORT_OFFSET));
                let plain = bed.topology.client(CLIENT, tunnel, 1024, 1);
                anyhow::ensure!(
                    plain.as_ref().is_ok_and(|r| !r.ok),
                    "{}: plaintext to node-b's Envoy at {tunnel} was not refused: {plain:?}",
                    mode.label()
                );
            }
        }
        if mode != Mode::MtlsFreshTunnels {
            bed.start_http_server()?;
            if rules > 0 {
                bed.wait_for_policy()?;
            }
            let check = bed.http_probe(&http::request_path(rules))?;
            anyhow::ensure!(
                check.statuses.keys().eq([&200]) && check.completed == check.sent,
                "{}: HTTP requests to {} are not all answered 200: {:?} {}",
                mode.label(),
                http::request_path(rules),
                check.statuses,
                check.unexpected.as_deref().unwrap_or_default()
            );
        }
        Ok(bed)
    }

    /// Node-a's address on its pod bridge: the client pod's gateway, where node-a's Envoy
    /// listens.
    fn client_gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.topology.pod(CLIENT).ip.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Writes the certificates and both Envoys' configurations, starts node-b's Envoy and then
    /// node-a's, each in its node's netns, and waits until both run their workers.
    fn start_envoys(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var_os(envoy::ENV_VAR).map_or_else(envoy::default_bin, PathBuf::from);
        anyhow::ensure!(
            bin.is_file(),
            "no Envoy at {} (set {} or run `cargo xtask bench`, which installs it)",
            bin.display(),
            envoy::ENV_VAR
        );
        let dir = std::env::temp_dir().join(format!("nodemesh-bench-{}", self.topology.name()));
        let _ = std::fs::remove_dir_all(&dir);
        self.envoy_dir = Some(dir.clone());
        let certs = envoy::write_certs(&dir)?;
        let ports = [ECHO_PORT, SINK_PORT, HTTP_PORT];
        let peer = NodeId::B.link_ip();
        let http: &[u16] = if self.mode == Mode::EnvoyHttp { &[HTTP_PORT] } else { &[] };
        let server = envoy::server_config(peer, self.topology.pod(SERVER).ip, &ports, http, &certs);
        let client = envoy::client_config(self.client_gateway(), peer, &ports, http, &certs);
        for (node, config) in [(NodeId::B, server), (NodeId::A, client)] {
            let name = node.name();
            let config_path = dir.join(format!("{name}.yaml"));
            std::fs::write(&config_path, config)
                .with_context(|| format!("writing {}", config_path.display()))?;
            let log = dir.join(format!("{name}.log"));
            let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("-c")
                .arg(&config_path)
                .args(["--concurrency", &envoy::CONCURRENCY.to_string(), "--disable-hot-restart"])
                .args(["--log-level", "info", "--service-node", name, "--service-cluster", "bench"])
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            place(&mut cmd, &netns::path(&self.topology.node_netns(node)), None)?;
            let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
            self.envoys.push(child);
            self.wait_for_envoy(&log, name)?;
        }
        // node-a's first, as the proxies are listed for the mesh-nodes.
        self.envoys.reverse();
        Ok(())
    }

    /// Waits until the Envoy writing `log` says its workers run; fails with its log if it exits.
    fn wait_for_envoy(&mut self, log: &Path, node: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + ENVOY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("starting main dispatch loop") {
                return Ok(());
            }
            let last = self.envoys.last_mut().context("no Envoy started")?;
            let tail =
                || text.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>();
            if let Some(status) = last.try_wait()? {
                bail!("{node}'s Envoy exited ({status}): {}", tail().join("\n"));
            }
            if Instant::now() > deadline {
                bail!("{node}'s Envoy is not up after {ENVOY_TIMEOUT:?}: {}", tail().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `xtask-bench http-echo` in the server pod (its netns and cgroup, like any app)
    /// and waits until it listens.
    fn start_http_server(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating xtask-bench")?;
        let mut cmd = Command::new(exe);
        cmd.args(["http-echo", "--port", &HTTP_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let pod = self.topology.pod(SERVER);
        place(
            &mut cmd,
            &netns::path(&self.topology.netns_name(SERVER)),
            Some(&self.topology.pod_cgroup(pod)),
        )?;
        let mut child = cmd.spawn().context("starting xtask-bench http-echo")?;
        let stdout = child.stdout.take().context("http-echo's stdout")?;
        let stderr = child.stderr.take().context("http-echo's stderr")?;
        self.http_server = Some(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("LISTENING") {
            let mut why = String::new();
            let _ = BufReader::new(stderr).read_line(&mut why);
            bail!("{}: http-echo did not start: {}", self.mode.label(), why.trim());
        }
        // Drain its per-connection errors so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink()));
        Ok(())
    }

    /// Waits until the server pod's node enforces the L7 policy: a request to a path no rule
    /// allows is refused with 403. (Before the policy arrives every request would be allowed,
    /// so a 200 alone proves nothing.)
    fn wait_for_policy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + POLICY_TIMEOUT;
        loop {
            let probe = self.http_probe("/bench/not-allowed")?;
            if probe.statuses.keys().eq([&403]) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: the L7 policy is not enforced after {POLICY_TIMEOUT:?} (a request no rule allows got {:?}); \
                     mesh-control's /policies: {}",
                    self.mode.label(),
                    probe.statuses,
                    self.topology.control_admin("/policies").unwrap_or_else(|e| format!("{e:#}"))
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends a few HTTP requests to `path` from the client pod and returns what came back.
    pub fn http_probe(&self, path: &str) -> anyhow::Result<LoadReport> {
        let args = [
            "load",
            "--to",
            &self.target(HTTP_PORT).to_string(),
            "--rate",
            "100",
            "--conns",
            "1",
            "--duration-ms",
            "50",
            "--http-path",
            path,
        ]
        .map(String::from);
        self.run_in_client_pod(&args)
    }

    /// Runs this binary (`xtask-bench <args>`) in the client pod and parses its JSON report.
    pub fn run_in_client_pod<T: serde::de::DeserializeOwned>(&self, args: &[String]) -> anyhow::Result<T> {
        let output = self.in_client_pod(args)?.output().context("running xtask-bench in the client pod")?;
        anyhow::ensure!(
            output.status.success(),
            "{}: xtask-bench {} failed: {}",
            self.mode.label(),
            args.first().map_or("", String::as_str),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("parsing the report {:?}", String::from_utf8_lossy(&output.stdout)))
    }

    /// Returns the client pod's name.
    pub fn client(&self) -> &'static str {
        CLIENT
    }

    /// Returns the server pod's address at `port`.
    pub fn server(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.topology.pod(SERVER).ip, port))
    }

    /// Returns where the client connects to reach the server pod at `port`: the server pod's
    /// address, or in the Envoy bed node-a's Envoy listener for that port.
    pub fn target(&self, port: u16) -> SocketAddr {
        if self.mode.is_envoy() { SocketAddr::from((self.client_gateway(), port)) } else { self.server(port) }
    }

    /// Returns the PIDs of the mode's proxies: its mesh-nodes, or its Envoys (none for direct).
    pub fn proxy_pids(&self) -> Vec<u32> {
        if self.mode.is_envoy() {
            return self.envoys.iter().map(Child::id).collect();
        }
        NodeId::ALL.iter().filter_map(|n| self.topology.node_pid(*n)).collect()
    }

    /// Reads CPU time and memory of the mode's proxies.
    pub fn sample_proxies(&self) -> anyhow::Result<Vec<Sample>> {
        self.proxy_pids().into_iter().map(resources::sample).collect()
    }

    /// Returns a command running this binary (`xtask-bench <args>`) inside the client pod: its
    /// netns and cgroup, joined before exec, so the mesh captures it like any app.
    pub fn in_client_pod(&self, args: &[String]) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("locating xtask-bench")?;
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let pod = self.topology.pod(CLIENT);
        place(
            &mut cmd,
            &netns::path(&self.topology.netns_name(CLIENT)),
            Some(&self.topology.pod_cgroup(pod)),
        )?;
        Ok(cmd)
    }

    /// Returns how many HBONE tunnels node-a has opened so far (from its log).
    pub fn tunnels_opened(&self) -> u64 {
        self.topology.node_log_text(NodeId::A).lines().filter(|l| l.contains("HBONE tunnel opened")).count()
            as u64
    }

    /// Waits (up to `limit`) until the proxies' CPU use settles, so a measurement does not pay
    /// for the previous one's stragglers (closing tunnels, TIME_WAIT timers are the kernel's).
    pub fn settle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let ticks = |s: &[Sample]| s.iter().map(|s| s.cpu_ticks).sum::<u64>();
        let mut last = self.sample_proxies().map(|s| ticks(&s)).unwrap_or(0);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.sample_proxies().map(|s| ticks(&s)).unwrap_or(0);
            if now.saturating_sub(last) <= 1 {
                return;
            }
            last = now;
        }
    }
}
