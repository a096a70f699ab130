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

mod http;
mod meshctl;

pub use meshctl::MeshctlRun;

use crate::{
    manifest::{self, PodEntry},
    netns,
    process::{find_binary, place, terminate},
    report::{ClientReport, PodsReport, SendReport},
};

const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
const STATE_ROOT: &str = "/tmp/nodemesh-test";
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One of the topology's two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeId {
    /// `node-a`: pods in 10.1.1.0/24, link address 10.0.0.1.
    A,
    /// `node-b`: pods in 10.1.2.0/24, link address 10.0.0.2; the external host hangs off it.
    B,
}

impl NodeId {
    /// Both nodes, in order.
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

    /// Returns the node's address on the node-to-node link (where readiness and metrics listen).
    pub fn link_ip(self) -> Ipv4Addr {
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
    /// The pod's name (also its service account and the suffix of its netns name).
    pub name: String,
    /// The node it is scheduled on.
    pub node: NodeId,
    /// Its address on the node's pod bridge.
    pub ip: Ipv4Addr,
    /// Whether its manifest enrols it (else it carries `nodemesh.io/dataplane-mode: none`).
    pub enrolled: bool,
}

/// A pod-app server started by [`Topology::serve`]. The topology owns the process (dropping the
/// handle leaves it running until teardown); [`Topology::stop_server`] ends it early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHandle {
    /// Where it runs: a pod name or `ext`.
    pub place: String,
    /// The port it listens on (all addresses).
    pub port: u16,
    /// Its process ID.
    pub pid: u32,
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
    /// Set once mesh-control was started: nodes started afterwards use it, even while it is
    /// stopped (they must then serve from their persisted state).
    meshed: std::sync::atomic::AtomicBool,
    /// Extra pod annotations written into the manifests (pod name → (key, value)s).
    annotations: BTreeMap<String, Vec<(String, String)>>,
    /// Pod labels written into the manifests (pod name → (key, value)s).
    labels: BTreeMap<String, Vec<(String, String)>>,
    /// Pods left out of the manifests: the test describes them itself (e.g. a pod being
    /// created, which the CNI plugin enrols).
    unlisted: std::collections::BTreeSet<String>,
    /// Extra arguments for every mesh-node started from now on (see [`Topology::set_node_args`]).
    node_args: Mutex<Vec<String>>,
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

/// The longest sanitized name; netns names are `nmt-<name>-<suffix>`, state lives under
/// `/tmp/nodemesh-test/<name>`.
const MAX_NAME: usize = 40;

/// Returns a short, netns-safe form of a test name. Long names keep a prefix and gain a hash of
/// the whole name, so two long test names sharing a prefix never share a topology.
fn sanitize(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    if s.len() <= MAX_NAME {
        return s;
    }
    // FNV-1a: stable across runs and Rust versions (an interrupted run must map to the same name).
    let hash =
        name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}-{:08x}", &s[..MAX_NAME - 9], hash as u32)
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

    /// Builds a topology with the given pods (name, node, enrolled); pods get addresses in their
    /// node's subnet in order, from .2 up.
    pub fn build_with(test_name: &str, pods: &[(String, NodeId, bool)]) -> anyhow::Result<Self> {
        crate::require_root()?;
        check_pods(pods)?;
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
            meshed: std::sync::atomic::AtomicBool::new(false),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            unlisted: std::collections::BTreeSet::new(),
            node_args: Mutex::new(Vec::new()),
        };
        // An interrupted earlier run of the same test may have left all of this behind; its logs
        // and manifests go too, so this run's logs hold only this run.
        topology.teardown();
        let _ = std::fs::remove_dir_all(&topology.state_dir);
        topology.create().with_context(|| format!("building topology {}", topology.name))?;
        Ok(topology)
    }

    /// Returns the sanitized name everything of this topology is named after.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the netns name of a pod, a node (`na`/`nb`) or `ext`.
    pub fn netns_name(&self, suffix: &str) -> String {
        format!("nmt-{}-{suffix}", self.name)
    }

    /// Returns the netns name of a node.
    pub fn node_netns(&self, node: NodeId) -> String {
        self.netns_name(node.suffix())
    }

    /// Returns a pod of the topology.
    ///
    /// # Panics
    /// If there is no such pod (a mistake in the test, not in the system under test).
    pub fn pod(&self, name: &str) -> &PodSpec {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name} in the topology"))
    }

    /// Returns every pod of the topology.
    pub fn pods(&self) -> &[PodSpec] {
        &self.pods
    }

    /// Returns the cgroup of a pod: its apps run there, mesh-node's programs attach to its parent.
    pub fn pod_cgroup(&self, pod: &PodSpec) -> PathBuf {
        self.cgroup_root.join(pod.node.name()).join("pods").join(&pod.name)
    }

    /// Returns the cgroup a pod-app in `place` (a pod or `ext`) runs in. Processes outside pods
    /// get cgroups of the topology too, so a rerun after a crash can end them (`cgroup.kill`).
    fn app_cgroup(&self, place: &str) -> PathBuf {
        match self.pods.iter().find(|p| p.name == place) {
            Some(pod) => self.pod_cgroup(pod),
            None => self.cgroup_root.join(place),
        }
    }

    /// Returns the topology's own cgroup (holding `node-a/`, `node-b/`, `ext/`, `control/`).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Returns the mount point of the topology's private bpffs (mesh-node's `--bpffs`).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
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
            create_cgroup(&self.pod_cgroup(pod))?;
        }
        for node in NodeId::ALL {
            create_cgroup(&self.cgroup_root.join(node.name()).join("pods"))?;
            self.write_manifests(node)?;
        }
        create_cgroup(&self.cgroup_root.join("ext"))?;
        create_cgroup(&self.cgroup_root.join("control"))?;
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
        let paths: Vec<(&PodSpec, PathBuf)> = self
            .pods
            .iter()
            .filter(|p| p.node == node && !self.unlisted.contains(&p.name))
            .map(|p| (p, netns::path(&self.netns_name(&p.name))))
            .collect();
        let yaml = manifest::render(
            node.name(),
            paths.iter().map(|(pod, netns)| PodEntry {
                name: &pod.name,
                ip: pod.ip,
                netns,
                enrolled: pod.enrolled,
                annotations: self.annotations.get(&pod.name).map_or(&[], Vec::as_slice),
                labels: self.labels.get(&pod.name).map_or(&[], Vec::as_slice),
            }),
        );
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
        let (key, value) = key_value(annotation)
            .with_context(|| format!("annotation {annotation:?} is not `key: value`"))?;
        let annotations = self.annotations.entry(pod.to_owned()).or_default();
        annotations.retain(|(k, _)| *k != key);
        annotations.push((key, value));
        self.write_manifests(node)
    }

    /// Sets a label (`key: value`) on a pod, as Services and policies select it, and rewrites
    /// its node's manifests.
    pub fn label(&mut self, pod: &str, label: &str) -> anyhow::Result<()> {
        let node = self.pods.iter().find(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?.node;
        let (key, value) =
            key_value(label).with_context(|| format!("label {label:?} is not `key: value`"))?;
        let labels = self.labels.entry(pod.to_owned()).or_default();
        labels.retain(|(k, _)| *k != key);
        labels.push((key, value));
        self.write_manifests(node)
    }

    /// Lists a pod in its node's manifests (the default) or leaves it out, for a test that
    /// writes its own manifest for it into [`Topology::state_dir`].
    pub fn set_listed(&mut self, pod: &str, listed: bool) -> anyhow::Result<()> {
        let node = self.pods.iter().find(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?.node;
        if listed {
            self.unlisted.remove(pod);
        } else {
            self.unlisted.insert(pod.to_owned());
        }
        self.write_manifests(node)
    }

    /// Enrols or withdraws a pod by rewriting its node's manifests.
    pub fn set_enrolled(&mut self, pod: &str, enrolled: bool) -> anyhow::Result<()> {
        let spec = self.pods.iter_mut().find(|p| p.name == pod).with_context(|| format!("no pod {pod}"))?;
        spec.enrolled = enrolled;
        let node = spec.node;
        self.write_manifests(node)
    }

    /// Returns mesh-control's admin endpoint response for `path` (it listens in node-a's netns).
    pub fn control_admin(&self, path: &str) -> anyhow::Result<String> {
        let (status, body) =
            netns::http_get(&self.node_netns(NodeId::A), SocketAddr::from(([127, 0, 0, 1], 15014)), path)?;
        anyhow::ensure!(status == 200, "mesh-control {path} answered {status}: {body}");
        Ok(body)
    }

    fn control_dir(&self) -> PathBuf {
        self.state_dir.join("control")
    }

    /// Starts mesh-control (its CA) in node-a's netns, reading every node's manifests, and
    /// waits until it serves and has written a token for each node. Nodes started afterwards
    /// request workload certificates from it.
    pub fn start_control_plane(&self) -> anyhow::Result<()> {
        self.start_control_plane_with(&[])
    }

    /// Like [`Topology::start_control_plane`], with extra mesh-control arguments.
    pub fn start_control_plane_with(&self, extra_args: &[&str]) -> anyhow::Result<()> {
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
            .args(extra_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let cgroup = self.cgroup_root.join("control");
        place(&mut cmd, &netns::path(&self.node_netns(NodeId::A)), Some(&cgroup))?;
        let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        self.write_meshctl_context()?;
        *self.control_plane.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        self.meshed.store(true, std::sync::atomic::Ordering::Release);
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

    /// Starts mesh-control (with `control_args`) and every node, and waits until each node holds
    /// a certificate for each of its enrolled identities.
    pub fn start_meshed(&self, control_args: &[&str]) -> anyhow::Result<()> {
        self.start_meshed_with(control_args, &[])
    }

    /// Like [`Topology::start_meshed`], with extra mesh-node arguments for both nodes (kept for
    /// nodes restarted later, see [`Topology::set_node_args`]).
    pub fn start_meshed_with(&self, control_args: &[&str], node_args: &[&str]) -> anyhow::Result<()> {
        self.set_node_args(node_args);
        self.start_control_plane_with(control_args)?;
        for node in NodeId::ALL {
            self.start_node(node)?;
            let enrolled = self
                .pods
                .iter()
                .filter(|p| p.node == node && p.enrolled && !self.unlisted.contains(&p.name))
                .count();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let body = self.node_admin(node, "/certs")?;
                let json: serde_json::Value = serde_json::from_str(&body)?;
                let certs = json["certificates"].as_array().cloned().unwrap_or_default();
                if certs.len() == enrolled && certs.iter().all(|c| c["serial"].is_string()) {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "certificates not issued on {}: {body}",
                    node.name()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Stops mesh-control (SIGKILL; it keeps no state that a restart would miss) and waits for it.
    /// Nodes keep serving their last config, reconnect when it is back, and nodes started
    /// meanwhile still point at it.
    pub fn stop_control_plane(&self) -> anyhow::Result<()> {
        let child = self.control_plane.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut child = child.context("mesh-control is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The directory holding mesh-control's signing root, as the nodes were told to trust it.
    pub fn control_root_dir(&self) -> PathBuf {
        self.control_dir().join("ca")
    }

    fn node_token(&self, node: NodeId) -> PathBuf {
        self.control_dir().join("nodes").join(format!("{}.token", node.name()))
    }

    /// Sets extra arguments for every mesh-node started from now on (e.g. the benchmarks'
    /// `--hbone-tunnel-reuse=false`); `{node}` in an argument becomes the node's name.
    pub fn set_node_args(&self, args: &[&str]) {
        *self.node_args.lock().unwrap_or_else(|e| e.into_inner()) =
            args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Starts the node's mesh-node and waits until it reports ready.
    pub fn start_node(&self, node: NodeId) -> anyhow::Result<()> {
        let binary = find_binary("mesh-node")?;
        let log_path = self.node_log(node);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let node_cgroup = self.cgroup_root.join(node.name());
        let mut cmd = Command::new(&binary);
        cmd.args(["run", "--node-name", node.name()])
            .arg("--pods-cgroup")
            .arg(node_cgroup.join("pods"))
            .arg("--proxy-cgroup")
            .arg(node_cgroup.join("proxy"))
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["--reload-interval-ms", "200"]);
        if self.meshed.load(std::sync::atomic::Ordering::Acquire) {
            // Config over xDS and certificates from mesh-control; state kept across restarts.
            cmd.args(["--control-plane", &format!("https://{CONTROL_PLANE}")])
                .arg("--control-plane-roots")
                .arg(self.control_root_dir().join("root-cert.pem"))
                .arg("--node-token-file")
                .arg(self.node_token(node))
                .arg("--state-dir")
                .arg(self.node_state_dir());
        } else {
            // Standalone: the whole cluster's manifests; the node enrols its own pods.
            cmd.arg("--pods").arg(&self.state_dir);
        }
        cmd.args(
            self.node_args
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|a| a.replace("{node}", node.name())),
        );
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

    /// Where mesh-nodes keep their private state (`<this>/<node>`), as `/run/nodemesh` would be.
    pub fn node_state_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    fn node_log(&self, node: NodeId) -> PathBuf {
        self.state_dir.join(format!("{}.log", node.name()))
    }

    /// Counts the node's log lines that contain every one of `needles`.
    pub fn node_log_count(&self, node: NodeId, needles: &[&str]) -> usize {
        self.node_log_text(node).lines().filter(|l| needles.iter().all(|n| l.contains(n))).count()
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
        let mut child = self.take_node(node)?;
        let killed = child.kill();
        child.wait()?;
        Ok(killed?)
    }

    /// Stops the node's mesh-node with SIGTERM (a graceful shutdown) and returns its exit status;
    /// after `grace` it is killed, and that is an error.
    pub fn stop_node(&self, node: NodeId, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.take_node(node)?;
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mesh-node of {} did not exit within {grace:?} of SIGTERM", node.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `mesh-node cleanup` for the node (uninstall: detach and unpin everything) inside its
    /// netns and returns what it printed.
    pub fn cleanup_node(&self, node: NodeId) -> anyhow::Result<String> {
        let binary = find_binary("mesh-node")?;
        let mut cmd = Command::new(&binary);
        cmd.args(["cleanup", "--node-name", node.name()])
            .arg("--bpffs")
            .arg(&self.bpffs)
            .env("NO_COLOR", "1");
        place(&mut cmd, &netns::path(&self.node_netns(node)), None)?;
        let output = cmd.output().with_context(|| format!("running {} cleanup", binary.display()))?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        anyhow::ensure!(output.status.success(), "mesh-node cleanup for {} failed: {text}", node.name());
        Ok(text)
    }

    /// Returns the PID of the node's running mesh-node, if the topology started one.
    pub fn node_pid(&self, node: NodeId) -> Option<u32> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).get(&node).map(Child::id)
    }

    fn take_node(&self, node: NodeId) -> anyhow::Result<Child> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node)
            .with_context(|| format!("mesh-node of {} is not running", node.name()))
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

    /// Returns a pod-app command that starts in `place` (a pod or `ext`): its netns and cgroup,
    /// both joined before exec, so the app never has a socket outside them.
    fn app_command(&self, place_name: &str) -> anyhow::Result<Command> {
        self.command_in(place_name, find_binary("pod-app")?)
    }

    /// Returns a command for `program` that starts in `place` (a pod or `ext`) as a pod's app
    /// would: in its netns and its cgroup (so the node's capture programs see its connects).
    fn command_in(&self, place_name: &str, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        anyhow::ensure!(
            place_name == "ext" || self.pods.iter().any(|p| p.name == place_name),
            "no pod {place_name} in the topology (nor `ext`)"
        );
        let mut cmd = Command::new(program);
        place(&mut cmd, &netns::path(&self.netns_name(place_name)), Some(&self.app_cgroup(place_name)))?;
        Ok(cmd)
    }

    /// Starts an echo server in a pod (or `ext`) and waits until it listens.
    pub fn serve(&self, pod_or_ext: &str, port: u16) -> anyhow::Result<ServerHandle> {
        self.start_server(pod_or_ext, "serve", port, &[])
    }

    /// Starts a sink (`pod-app sink`: verifies the one-way streams of [`Topology::send`]) in a
    /// pod (or `ext`) and waits until it listens.
    pub fn sink(&self, pod_or_ext: &str, port: u16) -> anyhow::Result<ServerHandle> {
        self.start_server(pod_or_ext, "sink", port, &[])
    }

    /// A [`Topology::sink`] that stops reading for `stall` after each stream's header.
    pub fn stalling_sink(
        &self,
        pod_or_ext: &str,
        port: u16,
        stall: Duration,
    ) -> anyhow::Result<ServerHandle> {
        self.start_server(pod_or_ext, "sink", port, &["--stall-ms", &stall.as_millis().to_string()])
    }

    fn start_server(
        &self,
        pod_or_ext: &str,
        mode: &str,
        port: u16,
        extra_args: &[&str],
    ) -> anyhow::Result<ServerHandle> {
        let mut cmd = self.app_command(pod_or_ext)?;
        cmd.args([mode, "--port", &port.to_string()])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting pod-app {mode}"))?;
        let stdout = child.stdout.take().context("pod-app stdout")?;
        let stderr = child.stderr.take().context("pod-app stderr")?;
        let pid = child.id();
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("LISTENING") {
            let mut why = String::new();
            let _ = BufReader::new(stderr).read_line(&mut why);
            bail!("pod-app {mode} in {pod_or_ext} did not start: {}", why.trim());
        }
        // Keep draining stderr (per-connection errors) so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink()));
        Ok(ServerHandle { place: pod_or_ext.to_owned(), port, pid })
    }

    /// Kills a server started by [`Topology::serve`] (SIGKILL by PID) and waits for it.
    pub fn stop_server(&self, server: &ServerHandle) -> anyhow::Result<()> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let at = apps
            .iter()
            .position(|c| c.id() == server.pid)
            .with_context(|| format!("server {} in {} is not running", server.pid, server.place))?;
        let mut child = apps.swap_remove(at);
        drop(apps);
        let killed = child.kill();
        child.wait()?;
        Ok(killed?)
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
        self.client_spread(from, to, bytes, conns, connect_timeout, Duration::ZERO)
    }

    /// Like [`Topology::client_with`], sending slowly over `spread` (a long-lived stream).
    pub fn client_spread(
        &self,
        from: &str,
        to: SocketAddr,
        bytes: u64,
        conns: u32,
        connect_timeout: Duration,
        spread: Duration,
    ) -> anyhow::Result<ClientReport> {
        let mut cmd = self.app_command(from)?;
        cmd.args([
            "client",
            "--to",
            &to.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--conns",
            &conns.to_string(),
        ])
        .args(["--connect-timeout-ms", &connect_timeout.as_millis().to_string()])
        .args(["--duration-ms", &spread.as_millis().to_string()]);
        let output = cmd.output().context("running pod-app client")?;
        anyhow::ensure!(
            output.status.success(),
            "pod-app client in {from} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("parsing client report {:?}", String::from_utf8_lossy(&output.stdout)))
    }

    /// Streams a seeded pattern from a pod (or `ext`) to a [`Topology::sink`] on `conns`
    /// connections for `duration` each, and returns the report (bytes the sink verified, time).
    pub fn send(
        &self,
        from: &str,
        to: SocketAddr,
        conns: u32,
        duration: Duration,
    ) -> anyhow::Result<SendReport> {
        self.send_after(from, to, conns, Duration::ZERO, duration)
    }

    /// Like [`Topology::send`], quiet for `pause` after each stream's header.
    pub fn send_after(
        &self,
        from: &str,
        to: SocketAddr,
        conns: u32,
        pause: Duration,
        duration: Duration,
    ) -> anyhow::Result<SendReport> {
        let mut cmd = self.app_command(from)?;
        cmd.args(["send", "--to", &to.to_string(), "--conns", &conns.to_string()])
            .args(["--duration-ms", &duration.as_millis().to_string()])
            .args(["--pause-ms", &pause.as_millis().to_string()]);
        let output = cmd.output().context("running pod-app send")?;
        anyhow::ensure!(
            output.status.success(),
            "pod-app send in {from} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("parsing send report {:?}", String::from_utf8_lossy(&output.stdout)))
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

/// Splits `key: value` (both trimmed, neither empty).
fn key_value(text: &str) -> Option<(String, String)> {
    text.split_once(':')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
}

/// Rejects pod lists the topology cannot build: names must fit in an interface name (`v-<pod>`),
/// be unique and not clash with the node and external netns suffixes.
fn check_pods(pods: &[(String, NodeId, bool)]) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for (pod, _, _) in pods {
        anyhow::ensure!(
            !pod.is_empty()
                && pod.len() <= 13
                && pod.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "pod name {pod:?} must be 1-13 lowercase letters or digits"
        );
        anyhow::ensure!(
            !["na", "nb", "ext", "control"].contains(&pod.as_str()),
            "pod name {pod:?} is reserved"
        );
        anyhow::ensure!(seen.insert(pod), "pod {pod} is listed twice");
    }
    for node in NodeId::ALL {
        let count = pods.iter().filter(|(_, n, _)| *n == node).count();
        anyhow::ensure!(count <= 250, "{count} pods on {} do not fit its /24", node.name());
    }
    Ok(())
}

/// Returns whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let wanted = path.display().to_string();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(wanted.as_str()))
}

/// Creates a cgroup (and its parents) of the test bed. Retries once on a parent that vanished:
/// a parallel test's teardown may remove the shared, momentarily empty `nodemesh-test/`.
fn create_cgroup(dir: &Path) -> anyhow::Result<()> {
    let mut result = std::fs::create_dir_all(dir);
    for _ in 0..3 {
        match &result {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => result = std::fs::create_dir_all(dir),
            _ => break,
        }
    }
    result.with_context(|| format!("creating cgroup {}", dir.display()))
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

#[cfg(test)]
mod tests {
    use super::{MAX_NAME, NodeId, check_pods, sanitize};

    #[test]
    fn names_are_sanitized_short_and_distinct() {
        assert_eq!(sanitize("capture::Cross_Node"), "capture--cross-node");
        let long_a = sanitize("a_very_long_test_name_that_goes_on_and_on_and_on_variant_one");
        let long_b = sanitize("a_very_long_test_name_that_goes_on_and_on_and_on_variant_two");
        assert!(long_a.len() <= MAX_NAME && long_b.len() <= MAX_NAME, "{long_a} {long_b}");
        assert_ne!(long_a, long_b, "a shared prefix does not mean a shared topology");
        assert_eq!(
            long_a,
            sanitize("a_very_long_test_name_that_goes_on_and_on_and_on_variant_one"),
            "stable"
        );
    }

    #[test]
    fn pod_lists_that_cannot_be_built_are_refused() {
        let pods = |names: &[&str]| -> Vec<(String, NodeId, bool)> {
            names.iter().map(|n| ((*n).to_owned(), NodeId::A, true)).collect()
        };
        assert!(check_pods(&pods(&["a1", "web2"])).is_ok());
        for bad in [&["a1", "a1"][..], &["ext"], &["Web"], &["a-1"], &["fourteen-chars"], &[""]] {
            assert!(check_pods(&pods(bad)).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..251).map(|i| format!("p{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check_pods(&pods(&many)).is_err(), "251 pods do not fit a /24");
    }
}
