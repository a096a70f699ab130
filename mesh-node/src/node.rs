//! The node: its capture, its enrolled pods, and reconciliation against the desired pods.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use mesh_api::SpiffeId;
use mesh_manifests::{EnrolledPodSpec, PodKey};
use serde::Serialize;
use tokio::sync::{Mutex, watch};

use crate::{
    capture::{Capture, LinkName},
    desired::{CniBinding, CniDecision, MeshView, cni_decision, resolve},
    identity::{CertStatus, IdentityManager},
    mesh::MeshDirectory,
    metrics::Metrics,
    pod::{NodeServices, PodRuntime, PodStatus},
    state_dir::StateDir,
    xds::XdsClient,
};

/// The state-directory file with what the CNI plugin reported, so a restarted mesh-node
/// re-adopts the pods it captured in Kubernetes.
const CNI_BINDINGS_FILE: &str = "cni_pods.json";

/// One node's agent state, shared by the reconciler and the HTTP endpoints.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    /// Where the pods come from: a manifest path (standalone) or mesh-control's address.
    pub source: String,
    /// The xDS client, when mesh-control is the source.
    pub xds: Option<Arc<XdsClient>>,
    pub capture: Arc<Capture>,
    pub metrics: Metrics,
    /// Workload certificates, when a CA is configured.
    pub identities: Option<Arc<IdentityManager>>,
    pub mesh: Arc<MeshDirectory>,
    trust_domain: String,
    /// Whether HBONE tunnels are pooled (see `TunnelPool`).
    tunnel_reuse: bool,
    pods: Mutex<BTreeMap<PodKey, PodRuntime>>,
    /// The mesh as the source last described it (`None` before the first config).
    view: std::sync::Mutex<Option<Arc<MeshView>>>,
    /// What the CNI plugin reported about this node's pods, by pod.
    cni: std::sync::Mutex<BTreeMap<PodKey, CniBinding>>,
    /// Where the CNI bindings are persisted (with mesh-control; none standalone).
    state: Option<StateDir>,
    /// Meshed pods of this node still waiting for the CNI plugin.
    awaiting_cni: std::sync::Mutex<Vec<PodKey>>,
    /// One reconciliation at a time, so an older view never lands after a newer one.
    reconciling: Mutex<()>,
    /// Bumped after each reconciliation; the CNI plugin's requests wait on it.
    reconciled: watch::Sender<u64>,
    /// Pods that should be enrolled but could not be, with the reason (retried every reload).
    failures: std::sync::Mutex<BTreeMap<PodKey, String>>,
    /// The last error reading the pod source, if the last read failed.
    source_error: std::sync::Mutex<Option<String>>,
    ready: AtomicBool,
    /// Whether a first config has been applied (and leftovers pruned against it).
    configured: AtomicBool,
    next_index: AtomicU32,
}

/// The node as the admin endpoint shows it.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub ready: bool,
    pub pods: Vec<PodStatus>,
    pub failed_pods: BTreeMap<String, String>,
    /// Meshed pods of this node whose address or netns the CNI plugin has not reported yet.
    pub awaiting_cni: Vec<String>,
    pub source: String,
    pub source_error: Option<String>,
    /// The cgroup capture is attached to: a pod's process is captured when it runs in this
    /// subtree and in the pod's netns (`meshctl connectivity-test` places its probes there).
    pub pods_cgroup: String,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        source: String,
        xds: Option<Arc<XdsClient>>,
        capture: Arc<Capture>,
        identities: Option<Arc<IdentityManager>>,
        state: Option<StateDir>,
        trust_domain: String,
        tunnel_reuse: bool,
    ) -> Self {
        let metrics = Metrics::new(identities.as_ref().map(|i| i.expiry_gauge()));
        let cni = state.as_ref().map(load_cni_bindings).unwrap_or_default();
        Node {
            name,
            source,
            xds,
            capture,
            metrics,
            identities,
            mesh: Arc::new(MeshDirectory::default()),
            trust_domain,
            tunnel_reuse,
            pods: Mutex::new(BTreeMap::new()),
            view: std::sync::Mutex::new(None),
            cni: std::sync::Mutex::new(cni),
            state,
            awaiting_cni: std::sync::Mutex::new(Vec::new()),
            reconciling: Mutex::new(()),
            reconciled: watch::Sender::new(0),
            failures: std::sync::Mutex::new(BTreeMap::new()),
            source_error: std::sync::Mutex::new(None),
            ready: AtomicBool::new(false),
            configured: AtomicBool::new(false),
            next_index: AtomicU32::new(0),
        }
    }

    /// Ready once a config is in force and every enrolled identity has its certificate.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.identities.as_ref().is_none_or(|i| i.all_certified())
    }

    /// Why the node is not ready, for the readiness endpoint.
    pub fn not_ready_reason(&self) -> &'static str {
        if !self.ready.load(Ordering::Acquire) {
            "no configuration yet (capture is being installed or mesh-control has not answered)"
        } else {
            "waiting for workload certificates"
        }
    }

    /// Applies a whole mesh (every node's meshed workloads): the view for outbound decisions,
    /// and this node's pods. The first time, leftovers of a previous mesh-node are pruned
    /// against it and the node becomes ready.
    pub async fn apply_mesh(&self, view: MeshView) {
        *lock(&self.view) = Some(Arc::new(view));
        let enrolled = self.reconcile().await;
        if !self.configured.swap(true, Ordering::AcqRel) {
            self.prune_leftovers().await;
            self.set_ready();
            tracing::info!(pods = enrolled, "ready");
        }
    }

    /// Enrols what the last view and the CNI bindings call for; returns how many pods are
    /// enrolled.
    async fn reconcile(&self) -> usize {
        let _one_at_a_time = self.reconciling.lock().await;
        let Some(view) = lock(&self.view).clone() else { return 0 };
        let resolved = resolve(&view, &lock(&self.cni), &self.name);
        self.mesh.replace(&resolved.mesh, &self.trust_domain);
        self.mesh.replace_traffic(&view.traffic, &self.trust_domain);
        self.apply(&resolved.mine).await;
        self.metrics.pods_awaiting_cni.set(resolved.awaiting_cni.len() as i64);
        *lock(&self.awaiting_cni) = resolved.awaiting_cni;
        self.reconciled.send_modify(|generation| *generation += 1);
        resolved.mine.len()
    }

    /// The CNI plugin's ADD: records where the pod lives, then returns once it is captured
    /// (`Ok(true)`) or known to be outside the mesh (`Ok(false)`); an error (the pod must not
    /// start) when it cannot be captured or nothing decides within `timeout`.
    pub async fn cni_add(&self, key: PodKey, binding: CniBinding, timeout: Duration) -> Result<bool, String> {
        tracing::info!(pod = %key, netns = %binding.netns.display(), ip = %binding.ip, "CNI: pod being created");
        let netns = binding.netns.clone();
        lock(&self.cni).insert(key.clone(), binding);
        self.persist_cni_bindings();
        let mut reconciled = self.reconciled.subscribe();
        self.reconcile().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.cni_decision(&key, Some(&netns)).await {
                CniDecision::Enrolled => return Ok(true),
                CniDecision::Outside => return Ok(false),
                CniDecision::Failed(why) => return Err(why),
                CniDecision::Waiting(why) => {
                    if tokio::time::timeout_at(deadline, reconciled.changed()).await.is_err() {
                        return Err(format!("{why} (waited {timeout:?})"));
                    }
                }
            }
        }
    }

    /// The CNI plugin's DEL: forgets the sandbox (only this one: an older sandbox's DEL may
    /// arrive after the pod was re-created) and withdraws the pod if nothing else enrols it.
    pub async fn cni_del(&self, key: &PodKey, container_id: &str) -> bool {
        let removed = {
            let mut bindings = lock(&self.cni);
            let matches = bindings.get(key).is_some_and(|b| b.container_id == container_id);
            matches && bindings.remove(key).is_some()
        };
        if removed {
            tracing::info!(pod = %key, "CNI: pod sandbox deleted");
            self.persist_cni_bindings();
            self.reconcile().await;
        }
        removed
    }

    /// The CNI plugin's CHECK: whether a meshed pod is still captured.
    pub async fn cni_check(&self, key: &PodKey) -> Result<bool, String> {
        match self.cni_decision(key, None).await {
            CniDecision::Enrolled => Ok(true),
            CniDecision::Outside => Ok(false),
            CniDecision::Failed(why) | CniDecision::Waiting(why) => Err(why),
        }
    }

    /// Decides for the CNI plugin; with `netns`, enrolled means enrolled in that netns (not
    /// an earlier sandbox's).
    async fn cni_decision(&self, key: &PodKey, netns: Option<&std::path::Path>) -> CniDecision {
        let pods = self.pods.lock().await;
        let enrolled = pods.get(key).is_some_and(|p| netns.is_none_or(|n| p.spec.netns == n));
        let failure = lock(&self.failures).get(key).cloned();
        cni_decision(lock(&self.view).as_deref(), key, &self.name, enrolled, failure.as_deref())
    }

    fn persist_cni_bindings(&self) {
        let Some(state) = &self.state else { return };
        let bindings: Vec<(PodKey, CniBinding)> =
            lock(&self.cni).iter().map(|(k, b)| (k.clone(), b.clone())).collect();
        let written = serde_json::to_vec(&bindings)
            .map_err(|e| e.to_string())
            .and_then(|json| state.write(CNI_BINDINGS_FILE, &json).map_err(|e| e.to_string()));
        if let Err(err) = written {
            tracing::warn!(error = %err, "cannot persist what the CNI plugin reported");
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn set_source_error(&self, error: Option<String>) {
        *lock(&self.source_error) = error;
    }

    /// Brings the enrolled pods in line with `desired`: withdraws pods no longer wanted (or
    /// whose address or netns changed), then enrols new ones. A pod that fails is recorded and
    /// retried on the next call; the others are not held up.
    pub async fn apply(&self, desired: &[EnrolledPodSpec]) {
        let mut pods = self.pods.lock().await;
        let wanted: BTreeMap<&PodKey, &EnrolledPodSpec> = desired.iter().map(|p| (&p.key, p)).collect();
        let stale: Vec<PodKey> = pods
            .iter()
            .filter(|(key, runtime)| wanted.get(key).is_none_or(|spec| **spec != runtime.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(runtime) = pods.remove(&key) {
                self.use_identity(&runtime.spec, false);
                if let Err(err) = runtime.stop(&self.metrics).await {
                    tracing::error!(pod = %key, error = %err, "withdrawing pod left something behind");
                }
            }
        }
        lock(&self.failures).retain(|key, _| wanted.contains_key(key));
        for spec in desired {
            if pods.contains_key(&spec.key) {
                continue;
            }
            let index = self.next_index.fetch_add(1, Ordering::Relaxed);
            let services = NodeServices {
                capture: self.capture.clone(),
                identities: self.identities.clone(),
                mesh: self.mesh.clone(),
                trust_domain: self.trust_domain.clone(),
                tunnel_reuse: self.tunnel_reuse,
            };
            match PodRuntime::start(spec.clone(), index, &services, &self.metrics).await {
                Ok(runtime) => {
                    lock(&self.failures).remove(&spec.key);
                    self.use_identity(spec, true);
                    pods.insert(spec.key.clone(), runtime);
                }
                Err(err) => {
                    let message = err.to_string();
                    let previous = lock(&self.failures).insert(spec.key.clone(), message.clone());
                    if previous.as_ref() != Some(&message) {
                        tracing::error!(pod = %spec.key, error = %message, "cannot enrol pod; retrying every reload");
                    }
                    // Drop what an earlier mesh-node left enrolled for this pod, so nothing
                    // half-works while it cannot be enrolled.
                    let _ = self.capture.withdraw(
                        Some(&LinkName::pod(&spec.key.namespace, &spec.key.name)),
                        None,
                        Some(spec.ip),
                    );
                }
            }
        }
        self.metrics.set_pods_enrolled(pods.len());
    }

    /// Starts (or stops) using the pod's workload identity.
    fn use_identity(&self, spec: &EnrolledPodSpec, used: bool) {
        let Some(identities) = &self.identities else { return };
        match SpiffeId::new(&self.trust_domain, &spec.key.namespace, &spec.service_account) {
            Ok(id) if used => identities.acquire(&id),
            Ok(id) => identities.release(&id),
            Err(err) => tracing::error!(pod = %spec.key, error = %err, "pod has no valid workload identity"),
        }
    }

    /// Returns the workload certificates' status (empty without a CA).
    pub fn certificates(&self) -> Vec<CertStatus> {
        self.identities.as_ref().map(|i| i.status()).unwrap_or_default()
    }

    /// Removes what a previous mesh-node left enrolled for pods that are no longer wanted.
    /// Runs once, after the first [`Node::apply`], when every wanted pod has been re-adopted.
    pub async fn prune_leftovers(&self) {
        let pods = self.pods.lock().await;
        let cookies: HashSet<u64> = pods.values().map(|p| p.ctx.netns_cookie).collect();
        let ips: HashSet<_> = pods.values().map(|p| p.spec.ip).collect();
        let links: HashSet<LinkName> = pods.keys().map(|k| LinkName::pod(&k.namespace, &k.name)).collect();
        let leftovers = self.capture.leftovers();
        for cookie in leftovers.netns_cookies.into_iter().filter(|c| !cookies.contains(c)) {
            tracing::info!(
                netns_cookie = cookie,
                "removing a pod netns left enrolled by a previous mesh-node"
            );
            let _ = self.capture.withdraw(None, Some(cookie), None);
        }
        for ip in leftovers.addrs.into_iter().filter(|ip| !ips.contains(ip)) {
            tracing::info!(ip = %ip, "removing a pod address left enrolled by a previous mesh-node");
            let _ = self.capture.withdraw(None, None, Some(ip));
        }
        match self.capture.pinned_pod_links() {
            Ok(pinned) => {
                for link in pinned.into_iter().filter(|l| !links.contains(l)) {
                    tracing::info!(link = %link, "detaching a pod link left by a previous mesh-node");
                    let _ = self.capture.withdraw(Some(&link), None, None);
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot list pinned links"),
        }
    }

    pub async fn status(&self) -> NodeStatus {
        let pods = self.pods.lock().await;
        NodeStatus {
            node: self.name.clone(),
            ready: self.is_ready(),
            pods: pods.values().map(PodRuntime::status).collect(),
            failed_pods: lock(&self.failures).iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            awaiting_cni: lock(&self.awaiting_cni).iter().map(ToString::to_string).collect(),
            source: self.source.clone(),
            source_error: lock(&self.source_error).clone(),
            pods_cgroup: self.capture.pods_cgroup().display().to_string(),
        }
    }
}

/// Reads the persisted CNI bindings, dropping those whose netns is gone (the sandbox was
/// deleted while mesh-node was down). An unreadable file is logged and ignored.
fn load_cni_bindings(state: &StateDir) -> BTreeMap<PodKey, CniBinding> {
    let bytes = match state.read(CNI_BINDINGS_FILE) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return BTreeMap::new(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the persisted CNI bindings");
            return BTreeMap::new();
        }
    };
    match serde_json::from_slice::<Vec<(PodKey, CniBinding)>>(&bytes) {
        Ok(bindings) => bindings
            .into_iter()
            .filter(|(key, binding)| {
                let alive = binding.netns.exists();
                if !alive {
                    tracing::info!(pod = %key, netns = %binding.netns.display(), "forgetting a pod whose netns is gone");
                }
                alive
            })
            .collect(),
        Err(err) => {
            tracing::warn!(file = %state.path(CNI_BINDINGS_FILE).display(), error = %err, "ignoring the persisted CNI bindings");
            BTreeMap::new()
        }
    }
}
