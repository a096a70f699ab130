//! The node's delta xDS client: subscribes with what it holds, applies each update atomically
//! (invalid resources are NACKed with the reason, the rest applied), persists the result, and
//! reconnects with backoff. While mesh-control is away the node serves its last good config.

pub mod store;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::{
    workload::v1::ADDRESS_TYPE,
    xds::v1::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node as XdsNode, Status,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use serde::Serialize;
use store::{ConfigStore, TYPES};
use tokio::sync::mpsc;

use crate::{control_plane::ControlPlane, node::Node};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// gRPC's INVALID_ARGUMENT, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// What the admin endpoint shows about the node's config source.
#[derive(Debug, Default, Clone, Serialize)]
pub struct XdsStatus {
    pub control_plane: String,
    pub connected: bool,
    /// Whether a config is in force (received, or restored from the state directory).
    pub has_config: bool,
    pub restored_from_disk: bool,
    pub updates: u64,
    pub nacks: u64,
    /// The last rejected resources and why.
    pub last_nack: Option<String>,
    pub last_error: Option<String>,
    pub workloads: usize,
    pub persisted_at: Option<String>,
}

/// The client's shared state.
#[derive(Debug)]
pub struct XdsClient {
    control: ControlPlane,
    pub store: tokio::sync::Mutex<ConfigStore>,
    pub status: Mutex<XdsStatus>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl XdsClient {
    pub fn new(control: ControlPlane, store: ConfigStore) -> Arc<Self> {
        let status = XdsStatus {
            control_plane: control.address().to_owned(),
            has_config: !store.is_empty(),
            restored_from_disk: !store.is_empty(),
            workloads: store.count(ADDRESS_TYPE),
            persisted_at: store.persisted_at().map(|p| p.display().to_string()),
            ..Default::default()
        };
        Arc::new(XdsClient { control, store: tokio::sync::Mutex::new(store), status: Mutex::new(status) })
    }

    pub fn status(&self) -> XdsStatus {
        lock(&self.status).clone()
    }

    /// Keeps the node in sync with mesh-control until the task is dropped.
    pub async fn run(self: Arc<Self>, node: Arc<Node>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let result = self.session(&node).await;
            lock(&self.status).connected = false;
            node.metrics.xds_connected.set(0);
            match result {
                Ok(received) => {
                    tracing::warn!("xDS stream ended; reconnecting");
                    if received {
                        backoff = MIN_BACKOFF;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "xDS unavailable; serving the last good config");
                    lock(&self.status).last_error = Some(err.to_string());
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One stream: returns whether anything was received before it ended.
    async fn session(&self, node: &Arc<Node>) -> Result<bool, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        {
            let store = self.store.lock().await;
            for type_url in TYPES {
                let subscribe = DeltaDiscoveryRequest {
                    node: Some(XdsNode { id: self.control.node().to_owned() }),
                    type_url: type_url.to_owned(),
                    resource_names_subscribe: vec!["*".to_owned()],
                    initial_resource_versions: store.versions(type_url),
                    ..Default::default()
                };
                // The channel holds more than two; this cannot block.
                let _ = tx.try_send(subscribe);
            }
        }
        let outgoing =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut request = tonic::Request::new(outgoing);
        self.control.authorize(&mut request);
        let mut responses = AggregatedDiscoveryServiceClient::new(self.control.channel())
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        {
            let mut status = lock(&self.status);
            status.connected = true;
            status.last_error = None;
        }
        node.metrics.xds_connected.set(1);
        tracing::info!(control_plane = %self.control.address(), "xDS connected");
        let mut received = false;
        while let Some(response) = responses.message().await? {
            received = true;
            let reply = self.apply(node, &response).await;
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        Ok(received)
    }

    /// Applies one response to the store and the node; returns the ACK or NACK.
    async fn apply(&self, node: &Arc<Node>, response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let (rejected, view, workloads) = {
            let mut store = self.store.lock().await;
            let rejected = store.apply(response);
            store.persist();
            (rejected, store.view(), store.count(ADDRESS_TYPE))
        };
        tracing::info!(
            type_url = %response.type_url, nonce = %response.nonce, updated = response.resources.len(),
            removed = response.removed_resources.len(), rejected = rejected.len(), "xDS update"
        );
        node.apply_mesh(view).await;
        let error_detail = (!rejected.is_empty()).then(|| {
            let message = rejected.iter().map(|(name, problem)| format!("{name}: {problem}")).collect::<Vec<_>>().join("; ");
            tracing::warn!(type_url = %response.type_url, error = %message, "rejecting invalid resources (NACK); the rest is applied");
            Status { code: INVALID_ARGUMENT, message }
        });
        node.metrics.count_xds_update(&response.type_url, error_detail.is_none());
        {
            let mut status = lock(&self.status);
            status.updates += 1;
            status.has_config = true;
            status.workloads = workloads;
            if let Some(error) = &error_detail {
                status.nacks += 1;
                status.last_nack = Some(error.message.clone());
            }
        }
        DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail,
            ..Default::default()
        }
    }
}
