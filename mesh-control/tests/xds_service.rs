//! Delta xDS over the real gRPC + TLS listener: subscription, changes only, removals, resume
//! from held versions, ACK / NACK bookkeeping, refusals.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{Harness, MANIFESTS, start, token};
use mesh_api::{
    workload::v1::{ADDRESS_TYPE, Address, MESH_CONFIG_TYPE, address},
    xds::v1::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as XdsStatus,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use mesh_control::{metrics::XdsOutcome, service::NODE_HEADER};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{Code, Request, Streaming};

/// One node's xDS stream.
struct NodeStream {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

async fn open(h: &Harness, node: &str, token: &str) -> Result<NodeStream, tonic::Status> {
    let (requests, rx) = mpsc::channel(8);
    let outgoing = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut request = Request::new(outgoing);
    request.metadata_mut().insert(NODE_HEADER, node.parse().expect("ascii"));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    let responses =
        AggregatedDiscoveryServiceClient::new(h.channel.clone()).delta_aggregated_resources(request).await?;
    Ok(NodeStream { requests, responses: responses.into_inner() })
}

fn subscribe(node: &str, type_url: &str, have: HashMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node { id: node.into() }),
        type_url: type_url.into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: have,
        ..Default::default()
    }
}

fn reply(type_url: &str, nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| XdsStatus { code: 3, message: m.into() }),
        ..Default::default()
    }
}

impl NodeStream {
    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.expect("stream open");
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.responses.message())
            .await
            .expect("a response within 5 s")
            .expect("no stream error")
            .expect("stream open")
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

fn ip_of(response: &DeltaDiscoveryResponse, name: &str) -> Vec<u8> {
    let resource = response.resources.iter().find(|r| r.name == name).expect("resource");
    match Address::decode(resource.resource.as_slice()).expect("decodes").r#type {
        Some(address::Type::Workload(w)) => w.addresses[0].clone(),
        other => panic!("not a workload: {other:?}"),
    }
}

fn versions(response: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    response.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect()
}

/// Waits until the control plane has recorded `node`'s ACK of `nonce` (an ACK that crosses a
/// newer push is stale and ignored, so tests wait before changing things).
async fn acked(h: &Harness, node: &str, nonce: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = h.plane.xds.status.lock().expect("status").get(node).cloned().unwrap_or_default();
        if status.acked.get(ADDRESS_TYPE).map(String::as_str) == Some(nonce) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "ACK of {nonce} never recorded: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const A1: &str = "Kubernetes//Pod/demo/a1";
const B1: &str = "Kubernetes//Pod/demo/b1";
const C1: &str = "Kubernetes//Pod/demo/c1";

#[tokio::test]
async fn a_node_receives_every_workload_then_only_what_changes() {
    let h = start("xds-changes").await;
    let mut node = open(&h, "node-a", &token(&h, "node-a")).await.expect("stream");
    node.send(subscribe("node-a", ADDRESS_TYPE, HashMap::new())).await;
    let first = node.next().await;
    assert_eq!(first.type_url, ADDRESS_TYPE);
    assert_eq!(names(&first), [A1, B1], "every workload of the mesh, the other node's too");
    assert_eq!(ip_of(&first, B1), [10, 1, 2, 2]);
    node.send(reply(ADDRESS_TYPE, &first.nonce, None)).await;
    acked(&h, "node-a", &first.nonce).await;

    // b1 moves, c1 appears: only those two are sent.
    let changed = MANIFESTS.replace("10.1.2.2", "10.1.2.9")
        + "---\nkind: Pod\nmetadata: {name: c1, namespace: demo, annotations: {nodemesh.io/netns: /run/netns/c1}}\n\
           spec: {nodeName: node-b}\nstatus: {podIP: 10.1.2.3}\n";
    std::fs::write(h.dir.join("config/pods.yaml"), &changed).expect("write");
    h.plane.reload().expect("reload");
    let second = node.next().await;
    assert_eq!(names(&second), [B1, C1]);
    assert_eq!(ip_of(&second, B1), [10, 1, 2, 9]);
    assert!(second.removed_resources.is_empty());
    assert_ne!(second.nonce, first.nonce);
    node.send(reply(ADDRESS_TYPE, &second.nonce, None)).await;
    acked(&h, "node-a", &second.nonce).await;

    // a1 deleted: a removal and nothing else.
    std::fs::write(
        h.dir.join("config/pods.yaml"),
        changed.replacen("kind: Pod\nmetadata: {name: a1", "kind: Other\nmetadata: {name: a1", 1),
    )
    .expect("write");
    h.plane.reload().expect("reload");
    let third = node.next().await;
    assert!(third.resources.is_empty(), "{:?}", names(&third));
    assert_eq!(third.removed_resources, [A1]);
    node.send(reply(ADDRESS_TYPE, &third.nonce, None)).await;
    acked(&h, "node-a", &third.nonce).await;
    let status = h.plane.xds.status.lock().expect("status").get("node-a").cloned().expect("node-a status");
    assert!(status.connected);
    assert_eq!(status.acked.get(ADDRESS_TYPE), Some(&third.nonce));
    assert_eq!(status.last_nack, None);
    let acks = h.plane.service.metrics.xds_replies.get_or_create(&mesh_control::metrics::XdsReplyLabels {
        type_url: ADDRESS_TYPE.into(),
        outcome: XdsOutcome::Ack,
    });
    assert_eq!(acks.get(), 3);
}

#[tokio::test]
async fn a_node_resuming_with_what_it_holds_is_sent_nothing_new() {
    let h = start("xds-resume").await;
    let mut node = open(&h, "node-b", &token(&h, "node-b")).await.expect("stream");
    node.send(subscribe("node-b", ADDRESS_TYPE, HashMap::new())).await;
    let held = versions(&node.next().await);
    drop(node);

    // As after a restart from persisted config: one stale entry and one that no longer exists.
    let mut have = held.clone();
    have.insert(B1.into(), "stale".into());
    have.insert("Kubernetes//Pod/demo/gone".into(), "v".into());
    let mut resumed = open(&h, "node-b", &token(&h, "node-b")).await.expect("stream");
    resumed.send(subscribe("node-b", ADDRESS_TYPE, have)).await;
    let delta = resumed.next().await;
    assert_eq!(names(&delta), [B1], "only the stale resource");
    assert_eq!(delta.removed_resources, ["Kubernetes//Pod/demo/gone"]);

    // Fully up to date: an empty answer, so the node knows it is in sync.
    let mut synced = open(&h, "node-b", &token(&h, "node-b")).await.expect("stream");
    synced.send(subscribe("node-b", ADDRESS_TYPE, held)).await;
    let empty = synced.next().await;
    assert!(empty.resources.is_empty() && empty.removed_resources.is_empty());
    synced.send(subscribe("node-b", MESH_CONFIG_TYPE, HashMap::new())).await;
    assert_eq!(names(&synced.next().await), ["mesh"]);
}

#[tokio::test]
async fn a_nack_is_recorded_with_its_reason() {
    let h = start("xds-nack").await;
    let mut node = open(&h, "node-a", &token(&h, "node-a")).await.expect("stream");
    node.send(subscribe("node-a", ADDRESS_TYPE, HashMap::new())).await;
    let first = node.next().await;
    node.send(reply(ADDRESS_TYPE, &first.nonce, Some("Kubernetes//Pod/demo/b1: netns is not absolute")))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = h.plane.xds.status.lock().expect("status").get("node-a").cloned().unwrap_or_default();
        if let Some(nack) = status.last_nack {
            assert!(nack.contains("netns is not absolute"), "{nack}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "NACK never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.plane.service.metrics.render().contains("outcome=\"nack\"} 1"));
}

#[tokio::test]
async fn strangers_wrong_names_and_unknown_types_are_refused() {
    let h = start("xds-refuse").await;
    let stranger = open(&h, "node-a", "not-the-token").await;
    assert_eq!(stranger.err().map(|s| s.code()), Some(Code::Unauthenticated));

    let mut impostor = open(&h, "node-a", &token(&h, "node-a")).await.expect("stream");
    impostor.send(subscribe("node-b", ADDRESS_TYPE, HashMap::new())).await;
    let err = impostor.responses.message().await.expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let mut confused = open(&h, "node-a", &token(&h, "node-a")).await.expect("stream");
    confused
        .send(subscribe("node-a", "type.googleapis.com/envoy.config.cluster.v3.Cluster", HashMap::new()))
        .await;
    let err = confused.responses.message().await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unknown resource type"), "{err}");
}
