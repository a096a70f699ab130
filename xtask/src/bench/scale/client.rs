//! Simulated node clients: each authenticates as its node (name + local token, over TLS checked
//! against the mesh root, as mesh-node does), subscribes to every type with nothing held, keeps
//! the names and versions of the addresses it was sent, and ACKs every response at once. They
//! record when they first held the whole state and when the watched change reached them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_api::{
    workload::v1::{ADDRESS_TYPE, MESH_CONFIG_TYPE},
    xds::v1::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::cluster::Watch;

/// The name mesh-control's serving certificate carries.
const SERVER_NAME: &str = "mesh-control";
/// Metadata naming the calling node (mesh-control's `NODE_HEADER`).
const NODE_HEADER: &str = "x-nodemesh-node";

/// What every client reports, and what the runner waits on.
#[derive(Debug, Default)]
struct ProbeState {
    /// Per client: when it first held `expected` addresses.
    synced: Vec<Option<Instant>>,
    expected: usize,
    /// The change being waited for, and per client when its resource arrived.
    watch: Option<Watch>,
    seen: Vec<Option<Instant>>,
    /// Per client: the addresses it holds (name → version).
    held: Vec<HashMap<String, String>>,
    /// Why clients stopped, if any did.
    errors: Vec<String>,
}

#[derive(Debug, Default)]
struct Probe {
    state: Mutex<ProbeState>,
    wake: tokio::sync::Notify,
}

impl Probe {
    fn lock(&self) -> MutexGuard<'_, ProbeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one response of client `id`, received at `at`.
    fn record(&self, id: usize, at: Instant, response: &DeltaDiscoveryResponse) {
        let mut state = self.lock();
        let state = &mut *state;
        if response.type_url == ADDRESS_TYPE {
            let held = &mut state.held[id];
            for resource in &response.resources {
                held.insert(resource.name.clone(), resource.version.clone());
            }
            for name in &response.removed_resources {
                held.remove(name);
            }
            if state.synced[id].is_none() && held.len() == state.expected {
                state.synced[id] = Some(at);
                self.wake.notify_one();
            }
        }
        if let Some(watch) = &state.watch
            && state.seen[id].is_none()
            && response.type_url == ADDRESS_TYPE
        {
            let arrived = if watch.removed {
                response.removed_resources.contains(&watch.name)
            } else {
                response.resources.iter().any(|r| r.name == watch.name)
            };
            if arrived {
                state.seen[id] = Some(at);
                self.wake.notify_one();
            }
        }
    }

    fn fail(&self, node: &str, error: String) {
        self.lock().errors.push(format!("{node}: {error}"));
        self.wake.notify_one();
    }

    /// Waits until `done` holds for the state, a client fails, or `timeout` passes.
    async fn wait(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&ProbeState) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let state = self.lock();
                if let Some(error) = state.errors.first() {
                    anyhow::bail!("a node client stopped while waiting for {what}: {error}");
                }
                if done(&state) {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, self.wake.notified()).await.is_err() {
                let state = self.lock();
                anyhow::bail!(
                    "{what}: not done after {timeout:?} ({} of {} nodes synced, {} of them saw the change)",
                    state.synced.iter().flatten().count(),
                    state.synced.len(),
                    state.seen.iter().flatten().count()
                );
            }
        }
    }
}

/// The simulated nodes; their tasks end when this is dropped.
pub struct Fleet {
    probe: Arc<Probe>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Fleet {
    /// Connects one client per `(node, token)` to mesh-control at `port` on loopback, verifying
    /// it with `root_pem`; they are in sync once they hold `expected` addresses.
    pub fn connect(
        port: u16,
        root_pem: &str,
        nodes: Vec<(String, String)>,
        expected: usize,
    ) -> anyhow::Result<Fleet> {
        let count = nodes.len();
        let probe = Arc::new(Probe::default());
        {
            let mut state = probe.lock();
            state.expected = expected;
            state.synced = vec![None; count];
            state.seen = vec![None; count];
            state.held = vec![HashMap::new(); count];
        }
        let tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root_pem)).domain_name(SERVER_NAME);
        let mut tasks = Vec::with_capacity(count);
        for (id, (node, token)) in nodes.into_iter().enumerate() {
            // One connection per node, as real nodes have.
            let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
                .context("mesh-control's address")?
                .connect_timeout(Duration::from_secs(10))
                .tls_config(tls.clone())
                .context("TLS settings")?
                .connect_lazy();
            let probe = probe.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = session(id, &node, &token, channel, &probe).await {
                    probe.fail(&node, format!("{error:#}"));
                }
            }));
        }
        Ok(Fleet { probe, tasks })
    }

    /// Waits until every client holds the full state; returns when the last one did.
    pub async fn synced(&self, timeout: Duration) -> anyhow::Result<Instant> {
        self.probe.wait(timeout, "the initial sync", |s| s.synced.iter().all(Option::is_some)).await?;
        let state = self.probe.lock();
        state.synced.iter().flatten().max().copied().context("no node clients")
    }

    /// Starts waiting for `watch` (before the change is made).
    pub fn expect(&self, watch: Watch) {
        let mut state = self.probe.lock();
        state.watch = Some(watch);
        state.seen.iter_mut().for_each(|s| *s = None);
    }

    /// Waits until every client received the expected change; returns (first, last) arrival.
    pub async fn converged(&self, timeout: Duration) -> anyhow::Result<(Instant, Instant)> {
        self.probe.wait(timeout, "the change", |s| s.seen.iter().all(Option::is_some)).await?;
        let mut state = self.probe.lock();
        state.watch = None;
        let seen = state.seen.iter().flatten();
        let first = seen.clone().min().copied().context("no node clients")?;
        Ok((first, seen.max().copied().unwrap_or(first)))
    }

    /// Returns, for each client, the address names it holds that differ from `expected`
    /// (missing or extra), at most a few per client.
    pub fn differences(&self, expected: &std::collections::BTreeSet<String>) -> Vec<String> {
        let state = self.probe.lock();
        let mut out = Vec::new();
        for (id, held) in state.held.iter().enumerate() {
            let missing = expected.iter().filter(|n| !held.contains_key(*n));
            let extra = held.keys().filter(|n| !expected.contains(*n));
            for name in missing.take(3) {
                out.push(format!("client {id} lacks {name}"));
            }
            for name in extra.take(3) {
                out.push(format!("client {id} still holds {name}"));
            }
        }
        out
    }
}

/// One node's stream: subscribes, then records and ACKs every response until it ends.
async fn session(id: usize, node: &str, token: &str, channel: Channel, probe: &Probe) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    for type_url in [ADDRESS_TYPE, MESH_CONFIG_TYPE] {
        let subscribe = DeltaDiscoveryRequest {
            node: Some(Node { id: node.to_owned() }),
            type_url: type_url.to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            ..Default::default()
        };
        let _ = tx.send(subscribe);
    }
    let outgoing = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut request = tonic::Request::new(outgoing);
    let metadata = request.metadata_mut();
    metadata.insert(NODE_HEADER, node.parse().context("node name as metadata")?);
    metadata.insert("authorization", format!("Bearer {token}").parse().context("token as metadata")?);
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .delta_aggregated_resources(request)
        .await
        .context("opening the xDS stream")?
        .into_inner();
    while let Some(response) = responses.message().await.context("receiving")? {
        probe.record(id, Instant::now(), &response);
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            ..Default::default()
        };
        if tx.send(ack).is_err() {
            break;
        }
    }
    anyhow::bail!("mesh-control ended the stream")
}
