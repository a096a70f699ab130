//! The delta xDS server: each authenticated node subscribes to resource types and receives only
//! what changed since what it holds (its persisted config counts after a restart), debounced on
//! the leading edge; it ACKs or NACKs every response by nonce.

pub mod snapshot;

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::Stream;
use mesh_api::xds::v1::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use serde::Serialize;
use snapshot::Snapshot;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::{
    metrics::{Metrics, XdsOutcome},
    node_auth::NodeAuth,
};

/// The quiet period of a node's pushes: a change after at least this long without a push goes
/// out at once; changes following a push within it wait for its end and go out together, so a
/// burst of edits costs a node at most one push per period.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Returns how long to hold back a push of a change seen at `now`, the last change having been
/// pushed at `last_push`: nothing after a quiet period, otherwise until the period ends.
pub fn push_delay(last_push: Option<Instant>, now: Instant) -> Duration {
    last_push.map_or(Duration::ZERO, |last| (last + DEBOUNCE).saturating_duration_since(now))
}

/// What the control plane knows about each node's xDS session, for the admin endpoint.
#[derive(Debug, Default, Clone, Serialize)]
pub struct NodeSyncStatus {
    pub connected: bool,
    pub sessions: u64,
    /// Type URL → last nonce the node ACKed.
    pub acked: BTreeMap<String, String>,
    /// The last NACK's type URL and reason, if the node rejected something.
    pub last_nack: Option<String>,
    pub pushes: u64,
    /// Type URL → where the node stands with that type (`meshctl status`).
    pub types: BTreeMap<String, TypeSyncStatus>,
    /// The snapshot version the node holds entirely: every type answered with an ACK and none
    /// awaiting an answer. `None` while it is catching up or has NACKed something.
    pub synced_version: Option<String>,
}

/// One node's state for one resource type.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TypeSyncStatus {
    /// Nonce and snapshot version of the last response the node ACKed.
    pub acked_nonce: Option<String>,
    pub acked_version: Option<String>,
    /// Nonce of a response sent and not answered yet.
    pub pending_nonce: Option<String>,
    /// Why the node rejected the last response it answered, if it did (cleared by an ACK).
    pub nack: Option<String>,
}

/// The server: one session task per connected node.
#[derive(Debug, Clone)]
pub struct XdsServer {
    pub nodes: NodeAuth,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub status: Arc<Mutex<BTreeMap<String, NodeSyncStatus>>>,
    pub metrics: Arc<Metrics>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = self.nodes.authenticate(request.metadata()).await.map_err(|problem| {
            tracing::warn!(error = %problem, "xDS stream refused");
            Status::unauthenticated(problem)
        })?;
        let (tx, rx) = mpsc::channel(16);
        let session = Session {
            node: node.clone(),
            server: self.clone(),
            snapshot: self.snapshots.borrow().clone(),
            subscriptions: HashMap::new(),
            nonce: 0,
        };
        tokio::spawn(
            session.run(request.into_inner(), tx).instrument(tracing::info_span!("xds", node = %node)),
        );
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// One node's subscription to one type.
#[derive(Debug, Default)]
struct Subscription {
    /// What the node holds (or will once it applies what was sent).
    holds: Holdings,
    /// Nonce of the last response not yet ACKed or NACKed.
    pending: Option<String>,
    /// The snapshot version that response carried.
    pending_version: Option<String>,
}

/// What a node holds of one type.
#[derive(Debug)]
enum Holdings {
    /// Name → version, as the node listed them when it subscribed.
    Listed(HashMap<String, String>),
    /// Exactly that snapshot's resources of the type: after a push, the snapshot itself is kept
    /// rather than a copy of its names and versions, which at 10,000 workloads was rebuilt for
    /// every node on every change.
    Snapshot(Arc<Snapshot>),
}

impl Default for Holdings {
    fn default() -> Self {
        Holdings::Listed(HashMap::new())
    }
}

struct Session {
    node: String,
    server: XdsServer,
    snapshot: Arc<Snapshot>,
    subscriptions: HashMap<String, Subscription>,
    nonce: u64,
}

type Sender = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

impl Session {
    async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>, tx: Sender) {
        self.update_status(|s| {
            s.connected = true;
            s.sessions += 1;
        });
        self.server.metrics.xds_connected.inc();
        tracing::info!("node connected");
        let mut snapshots = self.server.snapshots.clone();
        let mut last_push = None;
        let reason = loop {
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if let Err(status) = self.on_request(request, &tx).await {
                            let _ = tx.send(Err(status.clone())).await;
                            break status.message().to_owned();
                        }
                    }
                    Ok(None) => break "the node closed the stream".to_owned(),
                    Err(status) => break status.message().to_owned(),
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break "the control plane is shutting down".to_owned();
                    }
                    // Leading edge: at once after a quiet period; within one, the latest state
                    // when it ends (what else changed meanwhile goes in the same push).
                    let delay = push_delay(last_push, Instant::now());
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    last_push = Some(Instant::now());
                    self.snapshot = snapshots.borrow_and_update().clone();
                    let types: Vec<String> = self.subscriptions.keys().cloned().collect();
                    for type_url in types {
                        if self.push(&type_url, false, &tx).await.is_err() {
                            break;
                        }
                    }
                    // Nothing sent (no type changed for this node): it holds this version too.
                    self.note_sync();
                }
            }
        };
        self.update_status(|s| {
            s.connected = false;
            // Never answered now: the next session sends afresh.
            s.types.values_mut().for_each(|t| t.pending_nonce = None);
        });
        self.server.metrics.xds_connected.dec();
        tracing::info!(reason = %reason, "node disconnected");
    }

    async fn on_request(&mut self, request: DeltaDiscoveryRequest, tx: &Sender) -> Result<(), Status> {
        if let Some(claimed) = request.node.as_ref().map(|n| n.id.as_str())
            && !claimed.is_empty()
            && claimed != self.node
        {
            return Err(Status::permission_denied(format!(
                "authenticated as node {:?} but the request names node {claimed:?}",
                self.node
            )));
        }
        let type_url = request.type_url.clone();
        if !Snapshot::serves(&type_url) {
            return Err(Status::invalid_argument(format!("unknown resource type {type_url:?}")));
        }
        if !request.response_nonce.is_empty() {
            self.on_reply(&type_url, &request);
            return Ok(());
        }
        // A (re)subscription: start from what the node says it holds.
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        let listed = request.initial_resource_versions;
        tracing::debug!(type_url = %type_url, holds = listed.len(), "subscribed");
        subscription.holds = Holdings::Listed(listed);
        subscription.pending = None;
        // Always answer a subscription, even with nothing new, so the node knows it is in sync.
        self.push(&type_url, true, tx).await.map_err(|_| Status::cancelled("stream closed"))
    }

    /// Handles an ACK or NACK.
    fn on_reply(&mut self, type_url: &str, request: &DeltaDiscoveryRequest) {
        let Some(subscription) = self.subscriptions.get_mut(type_url) else { return };
        if subscription.pending.as_deref() != Some(request.response_nonce.as_str()) {
            // A reply to an older response: a newer one is already on its way.
            return;
        }
        subscription.pending = None;
        let version = subscription.pending_version.take();
        match &request.error_detail {
            Some(error) => {
                self.server.metrics.count_reply(type_url, XdsOutcome::Nack);
                tracing::warn!(type_url, nonce = %request.response_nonce, error = %error.message, "node rejected resources (NACK)");
                let message = format!("{type_url}: {}", error.message);
                self.update_status(|s| {
                    s.last_nack = Some(message);
                    let state = s.types.entry(type_url.to_owned()).or_default();
                    state.pending_nonce = None;
                    state.nack = Some(error.message.clone());
                });
            }
            None => {
                self.server.metrics.count_reply(type_url, XdsOutcome::Ack);
                let nonce = request.response_nonce.clone();
                self.update_status(|s| {
                    s.acked.insert(type_url.to_owned(), nonce.clone());
                    let state = s.types.entry(type_url.to_owned()).or_default();
                    state.pending_nonce = None;
                    state.acked_nonce = Some(nonce);
                    state.acked_version = version;
                    state.nack = None;
                });
            }
        }
        self.note_sync();
    }

    /// Records the snapshot version as the node's when it subscribed to every type, nothing
    /// is awaiting an answer and every type's last answer was an ACK (a type with nothing new
    /// was not sent again, and what the node holds of it is still current).
    fn note_sync(&self) {
        let waiting =
            snapshot::TYPES.iter().any(|t| self.subscriptions.get(*t).is_none_or(|s| s.pending.is_some()));
        let version = self.snapshot.version().to_owned();
        self.update_status(|s| {
            let nacked = s.types.values().any(|t| t.nack.is_some());
            s.synced_version = (!waiting && !nacked).then_some(version);
        });
    }

    /// Sends what changed for `type_url`; with `always`, sends even an empty response.
    async fn push(&mut self, type_url: &str, always: bool, tx: &Sender) -> Result<(), ()> {
        let Some(subscription) = self.subscriptions.get_mut(type_url) else { return Ok(()) };
        let delta = match &subscription.holds {
            Holdings::Listed(versions) => self.snapshot.delta(type_url, versions),
            Holdings::Snapshot(held) => self.snapshot.delta_from(held, type_url),
        };
        if delta.is_empty() && !always {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        subscription.holds = Holdings::Snapshot(self.snapshot.clone());
        subscription.pending = Some(nonce.clone());
        subscription.pending_version = Some(self.snapshot.version().to_owned());
        tracing::debug!(type_url, nonce = %nonce, resources = delta.resources.len(), removed = delta.removed.len(), "push");
        let response = DeltaDiscoveryResponse {
            system_version_info: self.snapshot.version().to_owned(),
            resources: delta.resources,
            type_url: type_url.to_owned(),
            removed_resources: delta.removed,
            nonce,
        };
        self.server.metrics.count_push(type_url);
        self.update_status(|s| {
            s.pushes += 1;
            s.synced_version = None;
            s.types.entry(type_url.to_owned()).or_default().pending_nonce = Some(response.nonce.clone());
        });
        tx.send(Ok(response)).await.map_err(|_| ())
    }

    fn update_status(&self, change: impl FnOnce(&mut NodeSyncStatus)) {
        let mut status = self.server.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        change(status.entry(self.node.clone()).or_default());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{DEBOUNCE, push_delay};

    #[test]
    fn a_change_after_a_quiet_period_is_pushed_at_once() {
        let now = Instant::now();
        assert_eq!(push_delay(None, now), Duration::ZERO, "the first change");
        assert_eq!(push_delay(Some(now - DEBOUNCE), now), Duration::ZERO, "exactly one period later");
        assert_eq!(push_delay(Some(now - Duration::from_secs(5)), now), Duration::ZERO);
    }

    #[test]
    fn changes_soon_after_a_push_wait_for_the_end_of_its_period() {
        let pushed = Instant::now();
        assert_eq!(push_delay(Some(pushed), pushed), DEBOUNCE);
        let later = pushed + Duration::from_millis(30);
        assert_eq!(push_delay(Some(pushed), later), DEBOUNCE - Duration::from_millis(30));
        // Every change in the period is released at the same moment: one push for the burst.
        for ms in [1, 40, 99] {
            let seen = pushed + Duration::from_millis(ms);
            assert_eq!(seen + push_delay(Some(pushed), seen), pushed + DEBOUNCE);
        }
    }
}
