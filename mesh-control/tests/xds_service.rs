//! Delta xDS over the real gRPC + TLS listener: subscription, changes only, removals, resume
//! from held versions, ACK / NACK bookkeeping, refusals.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{Harness, MANIFESTS, start, token};
use mesh_api::{
    workload::v1::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE, Address, Authorization, AuthorizationAction, HTTP_ROUTE_TYPE,
        HttpRoute, MESH_CONFIG_TYPE, address,
    },
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
    acked_type(h, node, ADDRESS_TYPE, nonce).await;
}

async fn acked_type(h: &Harness, node: &str, type_url: &str, nonce: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = h.plane.xds.status.lock().expect("status").get(node).cloned().unwrap_or_default();
        if status.acked.get(type_url).map(String::as_str) == Some(nonce) {
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
    let address = &status.types[ADDRESS_TYPE];
    assert_eq!(address.acked_nonce.as_ref(), Some(&third.nonce));
    assert_eq!(address.acked_version.as_deref(), Some(third.system_version_info.as_str()));
    assert_eq!((address.pending_nonce.as_ref(), address.nack.as_ref()), (None, None));
    assert_eq!(status.synced_version, None, "the node subscribed to one type of four");
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
            let address = &status.types[ADDRESS_TYPE];
            assert!(
                address.nack.as_ref().is_some_and(|n| n.contains("netns is not absolute")),
                "{address:?}"
            );
            assert_eq!((address.acked_nonce.as_ref(), address.pending_nonce.as_ref()), (None, None));
            assert_eq!(status.synced_version, None);
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

/// A Service for a1, an AuthorizationPolicy selecting it and an HTTPRoute attached to the
/// Service; `action` and `backend` vary what changes.
fn policy_and_route(action: &str, backend: &str) -> String {
    format!(
        "{}---\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
         ---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web-policy, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: web}}}}, action: {action}, rules: [{{to: [{{operation: {{ports: [\"8080\"], methods: [POST]}}}}]}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-route, namespace: demo}}\n\
         spec: {{parentRefs: [{{kind: Service, name: web, port: 80}}], rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]}}\n",
        MANIFESTS.replace(
            "metadata: {name: a1, namespace: demo,",
            "metadata: {name: a1, namespace: demo, labels: {app: web},"
        )
    )
}

#[tokio::test]
async fn policies_and_routes_are_added_changed_and_removed_like_any_resource() {
    let h = start("xds-policies").await;
    let mut node = open(&h, "node-b", &token(&h, "node-b")).await.expect("stream");
    for type_url in [AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE] {
        node.send(subscribe("node-b", type_url, HashMap::new())).await;
        let empty = node.next().await;
        assert_eq!(empty.type_url, type_url);
        assert!(empty.resources.is_empty(), "nothing yet, but an answer: {:?}", names(&empty));
        node.send(reply(type_url, &empty.nonce, None)).await;
        acked_type(&h, "node-b", type_url, &empty.nonce).await;
    }

    // Added: node-b receives a1's policy too (every node gets every one).
    std::fs::write(h.dir.join("config/pods.yaml"), policy_and_route("DENY", "web")).expect("write");
    h.plane.reload().expect("reload");
    let mut pushed = HashMap::new();
    for _ in 0..2 {
        let response = node.next().await;
        node.send(reply(&response.type_url, &response.nonce, None)).await;
        acked_type(&h, "node-b", &response.type_url, &response.nonce).await;
        pushed.insert(response.type_url.clone(), response);
    }
    let policies = &pushed[AUTHORIZATION_TYPE];
    assert_eq!(names(policies), ["demo/web-policy"]);
    let policy = Authorization::decode(policies.resources[0].resource.as_slice()).expect("decodes");
    assert_eq!(
        (policy.action(), policy.rules[0].to[0].ports.as_slice()),
        (AuthorizationAction::Deny, &[8080][..])
    );
    let routes = &pushed[HTTP_ROUTE_TYPE];
    assert_eq!(names(routes), ["demo/web-route"]);
    let route = HttpRoute::decode(routes.resources[0].resource.as_slice()).expect("decodes");
    assert_eq!(route.rules[0].backends[0].service, "demo/web.demo.svc.cluster.local");

    // The policy changes, the route does not: one push, of the policy alone.
    std::fs::write(h.dir.join("config/pods.yaml"), policy_and_route("ALLOW", "web")).expect("write");
    h.plane.reload().expect("reload");
    let changed = node.next().await;
    assert_eq!((changed.type_url.as_str(), names(&changed)), (AUTHORIZATION_TYPE, vec!["demo/web-policy"]));
    assert_ne!(changed.resources[0].version, policies.resources[0].version);
    node.send(reply(AUTHORIZATION_TYPE, &changed.nonce, None)).await;
    acked_type(&h, "node-b", AUTHORIZATION_TYPE, &changed.nonce).await;

    // The route's backend changes: the route alone.
    std::fs::write(h.dir.join("config/pods.yaml"), policy_and_route("ALLOW", "web-v2")).expect("write");
    h.plane.reload().expect("reload");
    let changed = node.next().await;
    assert_eq!((changed.type_url.as_str(), names(&changed)), (HTTP_ROUTE_TYPE, vec!["demo/web-route"]));
    node.send(reply(HTTP_ROUTE_TYPE, &changed.nonce, None)).await;
    acked_type(&h, "node-b", HTTP_ROUTE_TYPE, &changed.nonce).await;

    // Both removed: removals, and a NACK of one type is recorded against it.
    std::fs::write(h.dir.join("config/pods.yaml"), MANIFESTS).expect("write");
    h.plane.reload().expect("reload");
    let mut removed = HashMap::new();
    for _ in 0..2 {
        let response = node.next().await;
        assert!(response.resources.is_empty(), "{:?}", names(&response));
        removed.insert(response.type_url.clone(), (response.removed_resources.clone(), response.nonce));
    }
    assert_eq!(removed[AUTHORIZATION_TYPE].0, ["demo/web-policy"]);
    assert_eq!(removed[HTTP_ROUTE_TYPE].0, ["demo/web-route"]);
    node.send(reply(HTTP_ROUTE_TYPE, &removed[HTTP_ROUTE_TYPE].1, Some("demo/web-route: no such backend")))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = h.plane.xds.status.lock().expect("status").get("node-b").cloned().unwrap_or_default();
        if let Some(nack) = status.last_nack {
            assert!(nack.starts_with(HTTP_ROUTE_TYPE) && nack.contains("no such backend"), "{nack}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "NACK never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_node_resuming_with_a_policy_it_holds_is_sent_only_what_changed() {
    let h = start("xds-policies-resume").await;
    std::fs::write(h.dir.join("config/pods.yaml"), policy_and_route("DENY", "web")).expect("write");
    h.plane.reload().expect("reload");
    let mut node = open(&h, "node-a", &token(&h, "node-a")).await.expect("stream");
    node.send(subscribe("node-a", AUTHORIZATION_TYPE, HashMap::new())).await;
    let held = versions(&node.next().await);
    drop(node);

    let mut have = held.clone();
    have.insert("demo/deleted-meanwhile".into(), "v".into());
    let mut resumed = open(&h, "node-a", &token(&h, "node-a")).await.expect("stream");
    resumed.send(subscribe("node-a", AUTHORIZATION_TYPE, have)).await;
    let delta = resumed.next().await;
    assert!(delta.resources.is_empty(), "the policy held is current: {:?}", names(&delta));
    assert_eq!(delta.removed_resources, ["demo/deleted-meanwhile"]);
}
