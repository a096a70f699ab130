//! The checks. Each sends real traffic between probes in pods and returns a [`Verdict`] with
//! one line of detail; every wait is bounded, so a check never hangs.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    Interrupted, interrupted,
    objects::{self, DENY_POLICY, SERVICE, SERVICE_PORT, TestObjects},
    pods::{Discovery, MeshPod, Plan},
    probe::{ClientReport, Outcome, to_hex},
    probes::{Placement, Probes, ServerId},
    progress::Progress,
    wire::{self, HBONE_PORT, WireFilter},
};
use crate::{client, context::Endpoint};

/// Bounds a probe's connect, and then each read and write.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node may take to receive a written object (or its removal).
const CONFIG_WAIT: Duration = Duration::from_secs(20);
/// How long a policy change may take to show in connections once the node has it.
const POLICY_EFFECT: Duration = Duration::from_secs(10);
/// The stream of the plain reachability checks.
const SMALL: usize = 64 * 1024;
/// The stream the wire is watched for.
const LARGE: usize = 256 * 1024;

/// A check's outcome and its one line of detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    Skip(String),
}

/// What the checks share: the pods, the probes, the test objects.
pub struct Runner<'a> {
    pub control: Endpoint,
    pub discovery: Discovery,
    pub plan: Plan,
    pub probes: Probes,
    pub objects: TestObjects,
    pub config_dir: PathBuf,
    pub port: u16,
    pub service_ip: Option<Ipv4Addr>,
    pub progress: &'a mut Progress,
    servers: BTreeMap<String, ServerId>,
    next_id: u64,
}

impl<'a> Runner<'a> {
    #[allow(clippy::too_many_arguments, reason = "built once, by `run`")]
    pub fn new(
        control: Endpoint,
        discovery: Discovery,
        plan: Plan,
        probes: Probes,
        objects: TestObjects,
        config_dir: PathBuf,
        port: u16,
        service_ip: Option<Ipv4Addr>,
        progress: &'a mut Progress,
    ) -> Self {
        Runner {
            control,
            discovery,
            plan,
            probes,
            objects,
            config_dir,
            port,
            service_ip,
            progress,
            servers: BTreeMap::new(),
            next_id: 0,
        }
    }

    fn placement(&self, pod: &MeshPod) -> anyhow::Result<Placement> {
        let node = self.discovery.node(&pod.node)?;
        Ok(Placement { pod: pod.clone(), pods_cgroup: node.pods_cgroup.clone() })
    }

    /// Returns the server probe of `pod`, starting it on first use.
    fn server(&mut self, pod: &MeshPod) -> anyhow::Result<ServerId> {
        if let Some(id) = self.servers.get(&pod.key()) {
            return Ok(*id);
        }
        self.progress.step(&format!("starting a probe server in {} on port {}", pod.key(), self.port));
        let placement = self.placement(pod)?;
        let id = self.probes.start_server(&placement, self.port)?;
        self.servers.insert(pod.key(), id);
        Ok(id)
    }

    /// Sends `bytes` of `marker` repeated from the client to `to`; returns the connection's id
    /// and the client's report.
    fn exchange(
        &mut self,
        to: SocketAddr,
        bytes: usize,
        marker: &[u8],
    ) -> anyhow::Result<(u64, ClientReport)> {
        self.next_id += 1;
        let placement = self.placement(&self.plan.client)?;
        let report =
            self.probes.connect(&placement, to, self.next_id, bytes, &to_hex(marker), PROBE_TIMEOUT)?;
        Ok((self.next_id, report))
    }

    /// The client pod's outbound connection count on its node (the proxy counts what it captured).
    fn captured_connections(&self) -> anyhow::Result<u64> {
        let node = self.discovery.node(&self.plan.client.node)?;
        let pods = client::get_json(&node.endpoint, "/pods")?;
        let pod = pods["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["namespace"] == self.plan.client.namespace && p["name"] == self.plan.client.name)
            .with_context(|| format!("{} is no longer enrolled on {}", self.plan.client.key(), node.name))?;
        Ok(pod["outbound"]["connections"].as_u64().unwrap_or(0))
    }

    /// Checks that a stream from the client reaches `server` through the mesh: echoed intact,
    /// from the client pod's address, counted by the client's node.
    pub fn pod_to_pod(&mut self, server: Option<MeshPod>, missing: &str) -> anyhow::Result<Verdict> {
        let Some(server) = server else { return Ok(Verdict::Skip(missing.to_owned())) };
        let to = SocketAddr::from((server.ip, self.port));
        self.reach(&server, to, &format!("{} → {} ({to})", self.plan.client.key(), server.key()))
    }

    fn reach(&mut self, server: &MeshPod, to: SocketAddr, what: &str) -> anyhow::Result<Verdict> {
        let id = self.server(server)?;
        let before = self.captured_connections()?;
        self.progress.step(&format!("{what}: sending {} KiB", SMALL / 1024));
        let (conn, report) = self.exchange(to, SMALL, &random_bytes(16)?)?;
        if report.outcome != Outcome::Echoed {
            return Ok(Verdict::Fail(format!("{what}: {}", describe(&report))));
        }
        let client = self.plan.client.clone();
        let Some(event) = self.probes.server_event(id, conn, Duration::from_secs(3)) else {
            return Ok(Verdict::Fail(format!(
                "{what}: echoed, but not by the probe in {} (something else answered)",
                server.key()
            )));
        };
        let peer_ip =
            event.peer.parse::<SocketAddr>().map(|a| a.ip().to_string()).unwrap_or(event.peer.clone());
        if peer_ip != client.ip.to_string() {
            return Ok(Verdict::Fail(format!(
                "{what}: the server saw {peer_ip}, not the client pod's {}: the source address was not kept",
                client.ip
            )));
        }
        let node = client.node.clone();
        let counted =
            poll(Duration::from_secs(3), || Ok(self.captured_connections()?.gt(&before).then_some(())))?;
        if counted.is_err() {
            return Ok(Verdict::Fail(format!(
                "{what}: echoed, but {node} did not count a connection of {}: the probe was not captured",
                client.key()
            )));
        }
        Ok(Verdict::Pass(format!(
            "{what}: {} KiB echoed in {} ms, server saw {peer_ip}, captured by {node}",
            SMALL / 1024,
            report.total_ms
        )))
    }

    /// Writes a Service selecting the server and connects to its cluster IP.
    pub fn pod_to_service(&mut self) -> anyhow::Result<Verdict> {
        let server = self.plan.primary().clone();
        let Some(selector) = server.selector.clone() else {
            let why = match &self.discovery.labels_error {
                Some(err) => format!("the manifests could not be read for labels ({err})"),
                None => format!("{} has no labels that select it alone", server.key()),
            };
            return Ok(Verdict::Skip(format!(
                "{why}: no Service can target it (label it, or name a labelled --server)"
            )));
        };
        let vip = match self.service_ip {
            Some(vip) => vip,
            None => objects::pick_vip(&objects::used_addresses(&self.config_dir)?)?,
        };
        let yaml = objects::service_yaml(&server.namespace, vip, &selector, self.port);
        self.progress.step(&format!(
            "writing Service {}/{SERVICE} ({vip}:{SERVICE_PORT} → {})",
            server.namespace,
            server.key()
        ));
        let written = Instant::now();
        self.objects.write(SERVICE, &yaml)?;
        let node = self.discovery.node(&self.plan.client.node)?.clone();
        let key = format!("{0}/{SERVICE}.{0}.svc.cluster.local", server.namespace);
        let endpoint = SocketAddr::from((server.ip, self.port)).to_string();
        self.progress.step(&format!("waiting until {} routes the Service", node.name));
        let arrived = self.wait_config(&node.endpoint, SERVICE, |traffic| {
            traffic["services"].as_array().into_iter().flatten().any(|s| {
                s["service"]["key"] == key
                    && s["service"]["endpoints"][SERVICE_PORT.to_string()]
                        .as_array()
                        .is_some_and(|eps| eps.iter().any(|e| e["addr"] == endpoint))
            })
        })?;
        if let Err(why) = arrived {
            self.objects.remove(SERVICE)?;
            return Ok(Verdict::Fail(format!(
                "Service {key} with endpoint {endpoint} never reached {}: {why}",
                node.name
            )));
        }
        let took = written.elapsed();
        let to = SocketAddr::from((vip, SERVICE_PORT));
        let verdict = self.reach(
            &server,
            to,
            &format!("{} → {SERVICE}.{} ({to})", self.plan.client.key(), server.namespace),
        );
        self.objects.remove(SERVICE)?;
        Ok(match verdict? {
            Verdict::Pass(detail) => Verdict::Pass(format!(
                "{detail}; {} routed it {} ms after it was written",
                node.name,
                took.as_millis()
            )),
            other => other,
        })
    }

    /// Captures the client node's interfaces while a marked stream crosses to the server.
    pub fn mtls_on_the_wire(&mut self) -> anyhow::Result<Verdict> {
        let server = self.plan.primary().clone();
        let client = self.plan.client.clone();
        let node = self.discovery.node(&client.node)?.clone();
        if !node.has_ca {
            return Ok(Verdict::Fail(format!(
                "{} has no CA: its pods talk plain TCP, nothing is encrypted",
                node.name
            )));
        }
        self.server(&server)?;
        let marker = random_bytes(16)?;
        self.progress.step(&format!("capturing packets in {}'s netns", node.name));
        let filter = WireFilter { client: client.ip, server: server.ip, marker: marker.clone() };
        let capture = wire::Capture::start(node.endpoint.netns.as_deref(), filter)?;
        let to = SocketAddr::from((server.ip, self.port));
        self.progress.step(&format!(
            "{} → {} ({to}): sending {} KiB with a random marker",
            client.key(),
            server.key(),
            LARGE / 1024
        ));
        let exchanged = self.exchange(to, LARGE, &marker);
        let summary = capture.stop()?;
        let (_, report) = exchanged?;
        let what = format!("{} → {} on {}", client.key(), server.key(), node.name);
        if report.outcome != Outcome::Echoed {
            return Ok(Verdict::Fail(format!("{what}: {}", describe(&report))));
        }
        Ok(if summary.dropped > 0 {
            Verdict::Fail(format!(
                "{what}: the capture missed {} packets (the machine is busy?), so it proves nothing: run again",
                summary.dropped
            ))
        } else if summary.marker_in_clear > 0 {
            Verdict::Fail(format!(
                "{what}: the payload crossed in clear ({} packets hold the marker)",
                summary.marker_in_clear
            ))
        } else if !summary.other_ports.is_empty() {
            let ports: Vec<String> = summary.other_ports.iter().map(u16::to_string).collect();
            Verdict::Fail(format!(
                "{what}: plain TCP between the pods to port(s) {}, not only HBONE :{HBONE_PORT}",
                ports.join(",")
            ))
        } else if summary.tunnel_bytes < LARGE as u64 {
            Verdict::Fail(format!(
                "{what}: only {} bytes went to :{HBONE_PORT} for {LARGE} sent (captured {} packets between the pods)",
                summary.tunnel_bytes, summary.between
            ))
        } else if summary.tls_records == 0 {
            Verdict::Fail(format!("{what}: traffic to :{HBONE_PORT} carries no TLS records"))
        } else {
            Verdict::Pass(format!(
                "{what}: {} KiB crossed only as TLS to :{HBONE_PORT} ({} records seen), marker never in clear",
                LARGE / 1024,
                summary.tls_records
            ))
        })
    }

    /// Denies the client's principal on the server, checks it is refused, removes the policy,
    /// checks traffic flows again.
    pub fn deny_policy(&mut self) -> anyhow::Result<Verdict> {
        let server = self.plan.primary().clone();
        let client = self.plan.client.clone();
        let Some(principal) = client.principal().map(str::to_owned) else {
            return Ok(Verdict::Fail(format!(
                "{} has no workload certificate on {}: without mTLS there is no principal to deny",
                client.key(),
                client.node
            )));
        };
        self.server(&server)?;
        let node = self.discovery.node(&server.node)?.clone();
        let yaml =
            objects::deny_policy_yaml(&server.namespace, server.selector.as_ref(), &principal, self.port);
        let key = format!("{}/{DENY_POLICY}", server.namespace);
        let has_policy = |traffic: &serde_json::Value| {
            traffic["policies"].as_array().into_iter().flatten().any(|p| p["policy"] == key)
        };
        self.progress
            .step(&format!("writing AuthorizationPolicy {key}: DENY {principal} on port {}", self.port));
        let written = Instant::now();
        self.objects.write(DENY_POLICY, &yaml)?;
        if let Err(why) = self.wait_config(&node.endpoint, DENY_POLICY, has_policy)? {
            self.objects.remove(DENY_POLICY)?;
            return Ok(Verdict::Fail(format!("policy {key} never reached {}: {why}", node.name)));
        }
        let arrived = written.elapsed();
        let to = SocketAddr::from((server.ip, self.port));
        self.progress.step(&format!("{} → {} ({to}) must now be refused", client.key(), server.key()));
        let denied = self.until(POLICY_EFFECT, to, |r| r.outcome.is_refusal(r.bytes_echoed));
        self.objects.remove(DENY_POLICY)?;
        let denied = match denied? {
            Ok(report) => report,
            Err(last) => {
                return Ok(Verdict::Fail(format!(
                    "{} → {}: not refused {} s after {} had the DENY policy (last: {last})",
                    client.key(),
                    server.key(),
                    POLICY_EFFECT.as_secs(),
                    node.name
                )));
            }
        };
        self.progress.step(&format!("policy removed: waiting until {} drops it", node.name));
        if let Err(why) = self.wait_config(&node.endpoint, DENY_POLICY, |t| !has_policy(t))? {
            return Ok(Verdict::Fail(format!(
                "denied as expected, but the removed policy stayed on {}: {why}",
                node.name
            )));
        }
        self.progress.step(&format!("{} → {} ({to}) must flow again", client.key(), server.key()));
        if let Err(last) = self.until(POLICY_EFFECT, to, |r| r.outcome == Outcome::Echoed)? {
            return Ok(Verdict::Fail(format!(
                "denied as expected, but traffic did not flow again after the policy was removed (last: {last})"
            )));
        }
        Ok(Verdict::Pass(format!(
            "{} → {}: {} while DENY {principal} was in force on {} ({} ms after it was written); flows again after removal",
            client.key(),
            server.key(),
            outcome_name(denied.outcome),
            node.name,
            arrived.as_millis()
        )))
    }

    /// Connects every 200 ms until `done` holds for a report; returns it, or the last report
    /// described.
    fn until(
        &mut self,
        within: Duration,
        to: SocketAddr,
        done: impl Fn(&ClientReport) -> bool,
    ) -> anyhow::Result<Result<ClientReport, String>> {
        let deadline = Instant::now() + within;
        loop {
            let (_, report) = self.exchange(to, 4096, &random_bytes(16)?)?;
            if done(&report) {
                return Ok(Ok(report));
            }
            if Instant::now() > deadline {
                return Ok(Err(describe(&report)));
            }
            if interrupted() {
                return Err(Interrupted.into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until a node's `/traffic` satisfies `ready`. Fails early if mesh-control refuses
    /// the manifests because of `object`'s file: a refusal lasts until the file goes, while an
    /// error naming it that clears within a second was a reload racing a write or a removal.
    fn wait_config(
        &self,
        node: &Endpoint,
        object: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<Result<(), String>> {
        enum Waited {
            Ready,
            Refused(String),
        }
        let control = self.control.clone();
        let file = format!("{object}.yaml");
        let mut ours_since: Option<Instant> = None;
        let mut ignoring = None;
        let outcome = poll(CONFIG_WAIT, || {
            if ready(&client::get_json(node, "/traffic")?) {
                return Ok(Some(Waited::Ready));
            }
            let config = client::get_json(&control, "/debug/config")?;
            match config["error"].as_str() {
                Some(error) if error.contains(&file) => {
                    let since = *ours_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_secs(1) {
                        return Ok(Some(Waited::Refused(error.to_owned())));
                    }
                }
                Some(error) => (ours_since, ignoring) = (None, Some(error.to_owned())),
                None => (ours_since, ignoring) = (None, None),
            }
            Ok(None)
        })?;
        Ok(match (outcome, ignoring) {
            (Ok(Waited::Ready), _) => Ok(()),
            (Ok(Waited::Refused(error)), _) => Err(format!("mesh-control refused it: {error}")),
            (Err(last), Some(error)) => {
                Err(format!("mesh-control is ignoring the manifests ({error}); last: {last}"))
            }
            (Err(last), None) => Err(last),
        })
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `within` passes. Errors count as "not
/// yet" (an admin endpoint may be briefly busy); the last one is the timeout's reason.
pub fn poll<T>(
    within: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Result<T, String>> {
    let deadline = Instant::now() + within;
    let mut last = format!("not within {} s", within.as_secs());
    loop {
        match f() {
            Ok(Some(value)) => return Ok(Ok(value)),
            Ok(None) => {}
            Err(err) => last = format!("{err:#}"),
        }
        if interrupted() {
            return Err(Interrupted.into());
        }
        if Instant::now() > deadline {
            return Ok(Err(last));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn outcome_name(outcome: Outcome) -> String {
    serde_json::to_value(outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Describes a failed exchange in a few words.
pub fn describe(report: &ClientReport) -> String {
    let mut text = outcome_name(report.outcome);
    if let Some(error) = &report.error {
        text = format!("{text} ({error})");
    }
    if report.outcome == Outcome::Echoed {
        text = format!("echoed {} bytes", report.bytes_echoed);
    }
    text
}

/// Returns `n` random bytes (the kernel's generator).
pub fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}
