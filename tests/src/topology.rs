//! A two-node topology of network namespaces running real mesh-node processes.
//!
//! ```text
//!   pods a1 a2 a3 ── br0 [node-a] eth1 ═══ eth1 [node-b] br0 ── pods b1 b2 b3
//!   10.1.1.2-4      10.1.1.1   10.0.0.1/30     10.0.0.2   10.1.2.1     10.1.2.2-4
//!                                                 └─ eth2 10.9.0.1 ═══ ext 10.9.0.2 (outside the mesh)
//! ```

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    netns,
    process::{find_binary, place, terminate},
    report::{ClientReport, PodsReport},
};

const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
const STATE_ROOT: &str = "/tmp/nodemesh-test";
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const READY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeId {
    A,
    B,
}

impl NodeId {
    pub const ALL: [NodeId; 2] = [NodeId::A, NodeId::B];

    /// Returns the Kubernetes node name.
    pub fn name(self) -> &'static str {
        match self {
            NodeId::A => "node-a",
            NodeId::B => "node-b",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            NodeId::A => "na",
            NodeId::B => "nb",
        }
    }

    fn link_ip(self) -> Ipv4Addr {
        match self {
            NodeId::A => Ipv4Addr::new(10, 0, 0, 1),
            NodeId::B => Ipv4Addr::new(10, 0, 0, 2),
        }
    }

    fn pod_subnet(self) -> u8 {
        match self {
            NodeId::A => 1,
            NodeId::B => 2,
        }
    }
}

/// A pod of the topology.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub node: NodeId,
    pub ip: Ipv4Addr,
    pub enrolled: bool,
}

/// The external host, outside the mesh.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

/// The topology; everything it made is removed when it is dropped.
pub struct Topology {
    name: String,
    state_dir: PathBuf,
    bpffs: PathBuf,
    cgroup_root: PathBuf,
    pods: Vec<PodSpec>,
    nodes: Mutex<BTreeMap<NodeId, Child>>,
    apps: Mutex<Vec<Child>>,
    control_plane: Mutex<Option<Child>>,
    /// Extra pod annotations written into the manifests (pod name → YAML lines).
    annotations: BTreeMap<String, String>,
}

/// Where mesh-control listens: node-a's link address (like a control-plane pod on host network).
pub const CONTROL_PLANE: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 15012);

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology").field("name", &self.name).finish_non_exhaustive()
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output().context("running `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Returns a short, netns-safe form of a test name.
fn sanitize(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    s.chars().take(40).collect()
}

impl Topology {
    /// Builds the default topology: a1, a2, a3 on node-a and b1, b2, b3 on node-b; a3 and b3
    /// are not enrolled.
    pub fn build(test_name: &str) -> anyhow::Result<Self> {
        let pods = [("a1", NodeId::A, true), ("a2", NodeId::A, true), ("a3", NodeId::A, false)]
            .into_iter()
            .chain([("b1", NodeId::B, true), ("b2", NodeId::B, true), ("b3", NodeId::B, false)])
            .map(|(name, node, enrolled)| (name.to_owned(), node, enrolled))
            .collect::<Vec<_>>();
        Self::build_with(test_name, &pods)
    }

    /// Builds a topology with the given pods (name, node, enrolled).
    pub fn build_with(test_name: &str, pods: &[(String, NodeId, bool)]) -> anyhow::Result<Self> {
        crate::require_root()?;
        let name = sanitize(test_name);
        let mut next_host: BTreeMap<NodeId, u8> = BTreeMap::new();
        let pods = pods
            .iter()
            .map(|(pod, node, enrolled)| {
                let host = next_host.entry(*node).or_insert(2);
                let spec = PodSpec {
                    name: pod.clone(),
                    node: *node,
                    ip: Ipv4Addr::new(10, 1, node.pod_subnet(), *host),
                    enrolled: *enrolled,
                };
                *host += 1;
                spec
            })
            .collect();
        let topology = Topology {
            state_dir: Path::new(STATE_ROOT).join(&name),
            bpffs: Path::new(STATE_ROOT).join(&name).join("bpffs"),
            cgroup_root: Path::new(CGROUP2_ROOT).join("nodemesh-test").join(&name),
            name,
            pods,
            nodes: Mutex::new(BTreeMap::new()),
            apps: Mutex::new(Vec::new()),
            control_plane: Mutex::new(None),
            annotations: BTreeMap::new(),
        };
        // An interrupted earlier run of the same test may have left all of this behind; its logs
        // and manifests go too, so this run's logs hold only this run.
        topology.teardown();
        let _ = std::fs::remove_dir_all(&topology.state_dir);
        topology.create().with_context(|| format!("building topology {}", topology.name))?;
        Ok(topology)
    }

    /// Returns the netns name of a pod, a node (`na`/`nb`) or `ext`.
    pub fn netns_name(&self, suffix: &str) -> String {
        format!("nmt-{}-{suffix}", self.name)
    }

    pub fn node_netns(&self, node: NodeId) -> String {
        self.netns_name(node.suffix())
    }

    pub fn pod(&self, name: &str) -> &PodSpec {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name} in the topology"))
    }

    pub fn pods(&self) -> &[PodSpec] {
        &self.pods
    }

    fn pod_cgroup(&self, pod: &PodSpec) -> PathBuf {
        self.cgroup_root.join(pod.node.name()).join("pods").join(&pod.name)
    }

    /// Returns the directory holding logs and manifests of this topology.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn netns_names(&self) -> Vec<String> {
        let mut names: Vec<String> = NodeId::ALL.iter().map(|n| self.node_netns(*n)).collect();
        names.push(self.netns_name("ext"));
        names.extend(self.pods.iter().map(|p| self.netns_name(&p.name)));
        names
    }

    fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.bpffs)?;
        for ns in self.netns_names() {
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (na, nb, ext) = (self.node_netns(NodeId::A), self.node_netns(NodeId::B), self.netns_name("ext"));
        ip(&["link", "add", "eth1", "netns", &na, "type", "veth", "peer", "name", "eth1", "netns", &nb])?;
        for node in NodeId::ALL {
            let ns = self.node_netns(node);
            netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/30", node.link_ip()), "dev", "eth1"])?;
            ip(&["-n", &ns, "link", "set", "eth1", "up"])?;
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.1.{}.1/24", node.pod_subnet()), "dev", "br0"])?;
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        }
        ip(&["-n", &na, "route", "add", "10.1.2.0/24", "via", "10.0.0.2"])?;
        ip(&["-n", &nb, "route", "add", "10.1.1.0/24", "via", "10.0.0.1"])?;
        // The external host hangs off node-b.
        ip(&["link", "add", "eth2", "netns", &nb, "type", "veth", "peer", "name", "eth0", "netns", &ext])?;
        ip(&["-n", &nb, "addr", "add", "10.9.0.1/30", "dev", "eth2"])?;
        ip(&["-n", &nb, "link", "set", "eth2", "up"])?;
        ip(&["-n", &ext, "addr", "add", &format!("{EXT_IP}/30"), "dev", "eth0"])?;
        ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ext, "route", "add", "default", "via", "10.9.0.1"])?;
        ip(&["-n", &na, "route", "add", "10.9.0.0/30", "via", "10.0.0.2"])?;
        for pod in &self.pods {
            let (node_ns, pod_ns) = (self.node_netns(pod.node), self.netns_name(&pod.name));
            let veth = format!("v-{}", pod.name);
            ip(&[
                "link", "add", &veth, "netns", &node_ns, "type", "veth", "peer", "name", "eth0", "netns",
                &pod_ns,
            ])?;
            ip(&["-n", &node_ns, "link", "set", &veth, "master", "br0"])?;
            ip(&["-n", &node_ns, "link", "set", &veth, "up"])?;
            ip(&["-n", &pod_ns, "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
            ip(&["-n", &pod_ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &pod_ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.1.{}.1", pod.node.pod_subnet()),
            ])?;
            std::fs::create_dir_all(self.pod_cgroup(pod))
                .with_context(|| format!("creating cgroup {}", self.pod_cgroup(pod).display()))?;
        }
        for node in NodeId::ALL {
            std::fs::create_dir_all(self.cgroup_root.join(node.name()).join("pods"))?;
            self.write_manifests(node)?;
        }
        let target = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes())?;
        // SAFETY: NUL-terminated strings that outlive the call.
        if unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) } != 0
        {
            return Err(std::io::Error::last_os_error()).context("mounting a private bpffs");
        }
        Ok(())
    }

    fn manifest_path(&self, node: NodeId) -> PathBuf {
        self.state_dir.join(format!("{}-pods.yaml", node.name()))
    }

    /// Writes a node's pod manifests (atomically, so mesh-node never reads half a file).
    fn write_manifests(&self, node: NodeId) -> anyhow::Result<()> {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    nodemesh.io/dataplane-mode: ambient\n",
        );
        for pod in self.pods.iter().filter(|p| p.node == node) {
            let mut extra_annotations = if pod.enrolled {
                String::new()
            } else {
                "    nodemesh.io/dataplane-mode: none\n".to_owned()
            };
            if let Some((key, value)) = self.annotations.get(&pod.name).and_then(|a| a.split_once(": ")) {
                extra_annotations.push_str(&format!("    {key}: {value}\n"));
            }
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations:\n    nodemesh.io/netns: {netns}\n{extra_annotations}spec:\n  nodeName: {node}\n  serviceAccountName: {name}\nstatus:\n  podIP: {ip}\n",
                name = pod.name,
                netns = netns::path(&self.netns_name(&pod.name)).display(),
                node = node.name(),
                ip = pod.ip,
            ));
        }
        self.write_raw_manifests(node, &yaml)
    }

    /// Replaces a node's manifests with arbitrary text (to test bad input).
    pub fn write_raw_manifests(&self, node: NodeId, yaml: &str) -> anyhow::Result<()> {
        let path = self.manifest_path(node);
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Rewrites a node's manifests from the topology (undoing [`Topology::write_raw_manifests`]).
    pub fn restore_manifests(&self, node: NodeId) -> anyhow::Result<()> {
        self.write_manifests(node)
    }

    /// Sets an annotation (`key: value`) on a pod and rewrites its node's manifests.
    pub fn annotate(&mut self, pod: &str, annotation: &str) -> anyhow::Result<()> {
        let node = self.pods.iter().find(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?.node;
        self.annotations.insert(pod.to_owned(), annotation.to_owned());
        self.write_manifests(node)
    }

    /// Enrols or withdraws a pod by rewriting its node's manifests.
    pub fn set_enrolled(&mut self, pod: &str, enrolled: bool) -> anyhow::Result<()> {
        let spec = self.pods.iter_mut().find(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?;
        spec.enrolled = enrolled;
        let node = spec.node;
        self.write_manifests(node)
    }

    fn control_dir(&self) -> PathBuf {
        self.state_dir.join("control")
    }

    /// Starts mesh-control (its CA) in node-a's netns, reading every node's manifests, and
    /// waits until it serves and has written a token for each node. Nodes started afterwards
    /// request workload certificates from it.
    pub fn start_control_plane(&self) -> anyhow::Result<()> {
        let binary = find_binary("mesh-control")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("mesh-control.log"))?;
        let mut cmd = Command::new(&binary);
        cmd.arg("--config-dir")
            .arg(&self.state_dir)
            .arg("--state-dir")
            .arg(self.control_dir())
            .args(["--listen", &CONTROL_PLANE.to_string(), "--reload-interval-ms", "200"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        place(&mut cmd, &netns::path(&self.node_netns(NodeId::A)), None)?;
        let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        *self.control_plane.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let ns = self.node_netns(NodeId::A);
        loop {
            let tokens = NodeId::ALL.iter().all(|n| self.node_token(*n).exists());
            let listening = netns::run_in(&ns, || {
                std::net::TcpStream::connect_timeout(&CONTROL_PLANE, Duration::from_millis(200)).is_ok()
            })?;
            if tokens && listening {
                return Ok(());
            }
            if let Some(child) = self.control_plane.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "mesh-control exited ({status}): see {}",
                    self.state_dir.join("mesh-control.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("mesh-control not serving after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn node_token(&self, node: NodeId) -> PathBuf {
        self.control_dir().join("nodes").join(format!("{}.token", node.name()))
    }

    /// Starts the node's mesh-node and waits until it reports ready.
    pub fn start_node(&self, node: NodeId) -> anyhow::Result<()> {
        let binary = find_binary("mesh-node")?;
        let log_path = self.node_log(node);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let node_cgroup = self.cgroup_root.join(node.name());
        let mut cmd = Command::new(&binary);
        cmd.args(["run", "--node-name", node.name()])
            // The whole cluster's manifests: the node enrols its own pods and learns its peers.
            .arg("--pods")
            .arg(&self.state_dir)
            .arg("--pods-cgroup")
            .arg(node_cgroup.join("pods"))
            .arg("--proxy-cgroup")
            .arg(node_cgroup.join("proxy"))
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["--reload-interval-ms", "200"]);
        if self.control_plane.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            cmd.args(["--ca-address", &format!("https://{CONTROL_PLANE}")])
                .arg("--ca-trust-roots")
                .arg(self.control_dir().join("ca/root-cert.pem"))
                .arg("--node-token-file")
                .arg(self.node_token(node));
        }
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        place(&mut cmd, &netns::path(&self.node_netns(node)), None)?;
        let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).insert(node, child);
        self.wait_ready(node)
    }

    fn node_log(&self, node: NodeId) -> PathBuf {
        self.state_dir.join(format!("{}.log", node.name()))
    }

    /// Returns a node's whole log.
    pub fn node_log_text(&self, node: NodeId) -> String {
        std::fs::read_to_string(self.node_log(node)).unwrap_or_default()
    }

    /// Returns the last lines of a node's log, for error messages.
    pub fn node_log_tail(&self, node: NodeId, lines: usize) -> String {
        let text = std::fs::read_to_string(self.node_log(node)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn wait_ready(&self, node: NodeId) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((node.link_ip(), 15021));
        loop {
            if let Some(child) = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&node)
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("mesh-node of {} exited ({status}):\n{}", node.name(), self.node_log_tail(node, 20));
            }
            if let Ok((200, _)) = netns::http_get(&self.node_netns(node), addr, "/healthz/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-node of {} not ready after {READY_TIMEOUT:?}:\n{}",
                    node.name(),
                    self.node_log_tail(node, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills the node's mesh-node with SIGKILL (as a crash would) and waits for it.
    pub fn kill_node(&self, node: NodeId) -> anyhow::Result<()> {
        let mut child =
            self.nodes.lock().unwrap_or_else(|e| e.into_inner()).remove(&node).context("node not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Fetches a node's `GET /pods` from its admin endpoint.
    pub fn node_pods(&self, node: NodeId) -> anyhow::Result<PodsReport> {
        let (status, body) = netns::http_get(&self.node_netns(node), ADMIN, "/pods")?;
        anyhow::ensure!(status == 200, "admin /pods answered {status}: {body}");
        serde_json::from_str(&body).with_context(|| format!("parsing /pods: {body}"))
    }

    /// Starts capturing the node-to-node link (node-a's side).
    pub fn sniff_node_link(&self) -> anyhow::Result<crate::sniff::Sniffer> {
        crate::sniff::Sniffer::start(&self.node_netns(NodeId::A), "eth1")
    }

    /// Fetches a node's Prometheus endpoint (`:15020/metrics`).
    pub fn node_metrics(&self, node: NodeId) -> anyhow::Result<String> {
        let (status, body) =
            netns::http_get(&self.node_netns(node), SocketAddr::from((node.link_ip(), 15020)), "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(body)
    }

    /// Fetches a node's admin endpoint at `path` (e.g. `/ebpf`, `/metrics`).
    pub fn node_admin(&self, node: NodeId, path: &str) -> anyhow::Result<String> {
        let (status, body) = netns::http_get(&self.node_netns(node), ADMIN, path)?;
        anyhow::ensure!(status == 200, "admin {path} answered {status}: {body}");
        Ok(body)
    }

    fn app_command(&self, netns_suffix: &str, cgroup: Option<PathBuf>) -> anyhow::Result<Command> {
        let binary = find_binary("pod-app")?;
        let mut cmd = Command::new(binary);
        place(&mut cmd, &netns::path(&self.netns_name(netns_suffix)), cgroup.as_deref())?;
        Ok(cmd)
    }

    /// Starts an echo server in a pod (or `ext`) and waits until it listens.
    pub fn serve(&self, pod_or_ext: &str, port: u16) -> anyhow::Result<()> {
        let cgroup = self.pods.iter().find(|p| p.name == pod_or_ext).map(|p| self.pod_cgroup(p));
        let mut cmd = self.app_command(pod_or_ext, cgroup)?;
        cmd.args(["serve", "--port", &port.to_string()]).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting pod-app serve")?;
        let stdout = child.stdout.take().context("pod-app stdout")?;
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::ensure!(
            line.starts_with("LISTENING"),
            "pod-app serve in {pod_or_ext} did not start: {line:?}"
        );
        Ok(())
    }

    /// Runs a verifying client in a pod (or `ext`) and returns its report.
    pub fn client(&self, from: &str, to: SocketAddr, bytes: u64, conns: u32) -> anyhow::Result<ClientReport> {
        self.client_with(from, to, bytes, conns, Duration::from_secs(5))
    }

    /// Like [`Topology::client`] with a connect timeout.
    pub fn client_with(
        &self,
        from: &str,
        to: SocketAddr,
        bytes: u64,
        conns: u32,
        connect_timeout: Duration,
    ) -> anyhow::Result<ClientReport> {
        let cgroup = self.pods.iter().find(|p| p.name == from).map(|p| self.pod_cgroup(p));
        let mut cmd = self.app_command(from, cgroup)?;
        cmd.args([
            "client",
            "--to",
            &to.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--conns",
            &conns.to_string(),
        ])
        .args(["--connect-timeout-ms", &connect_timeout.as_millis().to_string()]);
        let output = cmd.output().context("running pod-app client")?;
        anyhow::ensure!(
            output.status.success(),
            "pod-app client in {from} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("parsing client report {:?}", String::from_utf8_lossy(&output.stdout)))
    }

    /// Removes everything: processes (by PID), the bpffs mount, netns, cgroups. Idempotent.
    pub fn teardown(&self) {
        for (_, mut child) in std::mem::take(&mut *self.nodes.lock().unwrap_or_else(|e| e.into_inner())) {
            terminate(&mut child, Duration::from_secs(2));
        }
        if let Some(mut child) = self.control_plane.lock().unwrap_or_else(|e| e.into_inner()).take() {
            terminate(&mut child, Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(self.control_dir());
        for mut child in std::mem::take(&mut *self.apps.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(target) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: NUL-terminated path; a missing mount just fails.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.bpffs);
        for ns in self.netns_names() {
            if netns::path(&ns).exists() {
                let _ = ip(&["netns", "del", &ns]);
            }
        }
        remove_cgroup_tree(&self.cgroup_root);
        let _ = std::fs::remove_dir(self.cgroup_root.parent().unwrap_or(Path::new("/nonexistent")));
    }

    /// Returns what the topology still has on the machine (for the cleanup test).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .netns_names()
            .into_iter()
            .filter(|ns| netns::path(ns).exists())
            .map(|ns| format!("netns {ns}"))
            .collect();
        if self.cgroup_root.exists() {
            left.push(format!("cgroup {}", self.cgroup_root.display()));
        }
        if crate::topology::is_mounted(&self.bpffs) {
            left.push(format!("bpffs {}", self.bpffs.display()));
        }
        left
    }
}

/// Returns whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let wanted = path.display().to_string();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(wanted.as_str()))
}

/// Removes a cgroup directory tree bottom-up, killing processes left inside (ours only: the tree
/// is created by the test bed).
fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}
