//! The test beds the modes run on: one two-node topology per mode, all up at once so rounds can
//! interleave them, each with an echo server and a sink in the server pod. The client pod is a1
//! on node-a and the server pod b1 on node-b, so in the meshed modes both node proxies are on
//! the path.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nodemesh_testbed::{NodeId, Topology, netns, process::place};

use super::{
    resources::{self, Sample},
    results::Mode,
};

/// pod-app's echo server (latency, connections, memory).
pub const ECHO_PORT: u16 = 8080;
/// pod-app's sink (throughput).
pub const SINK_PORT: u16 = 9000;
const CLIENT: &str = "a1";
const SERVER: &str = "b1";

/// A mode's topology, started and checked.
pub struct Bed {
    pub mode: Mode,
    pub topology: Topology,
}

impl Bed {
    /// Builds the mode's topology, starts what the mode runs (nothing, standalone mesh-nodes,
    /// or mesh-control and meshed mesh-nodes) and the servers, and checks the path with one
    /// verified echo (which, for mTLS, also opens the pooled tunnel).
    pub fn start(mode: Mode, prefix: &str) -> anyhow::Result<Bed> {
        let name = match mode {
            Mode::Direct => "direct",
            Mode::L4 => "l4",
            Mode::Mtls => "mtls",
            Mode::MtlsFreshTunnels => "mtls-fresh",
        };
        let topology = Topology::build(&format!("{prefix}-{name}"))?;
        match mode {
            Mode::Direct => {}
            Mode::L4 => {
                for node in NodeId::ALL {
                    topology.start_node(node)?;
                }
            }
            Mode::Mtls => topology.start_meshed(&[])?,
            Mode::MtlsFreshTunnels => topology.start_meshed_with(&[], &["--hbone-tunnel-reuse=false"])?,
        }
        for pod in [CLIENT, SERVER] {
            // Connection-rate runs leave many sockets in TIME_WAIT: widen the ports of these
            // test pods (their own netns only) and let the client reuse TIME_WAIT ports.
            netns::sysctl(&topology.netns_name(pod), "net.ipv4.ip_local_port_range", "10000 65000")?;
        }
        netns::sysctl(&topology.netns_name(CLIENT), "net.ipv4.tcp_tw_reuse", "1")?;
        topology.serve(SERVER, ECHO_PORT)?;
        topology.sink(SERVER, SINK_PORT)?;
        let bed = Bed { mode, topology };
        let check = bed.topology.client(CLIENT, bed.server(ECHO_PORT), 64 * 1024, 2)?;
        anyhow::ensure!(check.ok, "{}: the path does not work: {:?}", mode.label(), check.errors);
        Ok(bed)
    }

    /// Returns the client pod's name.
    pub fn client(&self) -> &'static str {
        CLIENT
    }

    /// Returns the server pod's address at `port`.
    pub fn server(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.topology.pod(SERVER).ip, port))
    }

    /// Returns the PIDs of the mode's mesh-nodes (none for direct).
    pub fn proxy_pids(&self) -> Vec<u32> {
        NodeId::ALL.iter().filter_map(|n| self.topology.node_pid(*n)).collect()
    }

    /// Reads CPU time and memory of the mode's mesh-nodes.
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
