//! mesh-control in Kubernetes mode against a real kube-apiserver (v1.20, with etcd, on
//! loopback): objects created, patched and deleted through the API reach a connected node as
//! delta xDS resources; AuthorizationPolicies and HTTPRoutes get their status written back.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::{
    workload::v1::{ADDRESS_TYPE, AUTHORIZATION_TYPE, Address, Authorization, HTTP_ROUTE_TYPE, address},
    xds::v1::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use mesh_manifests::crd::{AuthorizationPolicy, HttpRoute};
use nodemesh_testbed::{deploy, kube_apiserver::KubeApiServer, process::find_binary};
use prost::Message as _;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// mesh-control, started by this test and killed (by PID) when dropped.
struct MeshControl {
    child: Child,
    state: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Drop for MeshControl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

fn start_mesh_control(api: &KubeApiServer) -> MeshControl {
    let state = api.dir().join("mesh-control");
    let (listen, admin) = (free_port(), free_port());
    let log = std::fs::File::create(api.dir().join("mesh-control.log")).expect("log");
    let child = Command::new(find_binary("mesh-control").expect("mesh-control binary"))
        .arg("--kubernetes")
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
        .env("KUBECONFIG", api.kubeconfig())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start mesh-control");
    MeshControl { child, state, listen, admin }
}

/// Polls `check` until it returns `Some`, for up to 20 s.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin_get(control: &MeshControl, path: &str) -> Option<serde_json::Value> {
    let mut stream = tokio::net::TcpStream::connect(control.admin).await.ok()?;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
}

/// The workloads and services a node holds, by name, and the encoded resources of the other
/// types, by type and name.
#[derive(Default)]
struct NodeView {
    addresses: HashMap<String, address::Type>,
    others: HashMap<String, HashMap<String, Vec<u8>>>,
}

impl NodeView {
    fn apply(&mut self, response: &DeltaDiscoveryResponse) {
        if response.type_url != ADDRESS_TYPE {
            let held = self.others.entry(response.type_url.clone()).or_default();
            for resource in &response.resources {
                held.insert(resource.name.clone(), resource.resource.clone());
            }
            for name in &response.removed_resources {
                held.remove(name);
            }
            return;
        }
        for resource in &response.resources {
            let decoded = Address::decode(resource.resource.as_slice()).expect("decodes");
            self.addresses.insert(resource.name.clone(), decoded.r#type.expect("typed"));
        }
        for name in &response.removed_resources {
            self.addresses.remove(name);
        }
    }

    fn authorization(&self, name: &str) -> Option<Authorization> {
        let bytes = self.others.get(AUTHORIZATION_TYPE)?.get(name)?;
        Some(Authorization::decode(bytes.as_slice()).expect("decodes"))
    }
}

/// A node's end of the xDS stream: applies and ACKs each response.
struct NodeStream {
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
    tx: tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    view: NodeView,
}

impl NodeStream {
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = tokio::time::timeout(Duration::from_secs(20), self.responses.message())
            .await
            .expect("an update within 20 s")
            .expect("no stream error")
            .expect("stream open");
        self.view.apply(&response);
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        self.tx.send(ack).await.expect("stream open");
        response
    }
}

impl NodeStream {
    /// Subscribes to another type too.
    async fn subscribe(&self, node: &str, type_url: &str) {
        let subscribe = DeltaDiscoveryRequest {
            node: Some(Node { id: node.into() }),
            type_url: type_url.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        self.tx.send(subscribe).await.expect("stream open");
    }

    /// Applies responses until `check` holds for what the node holds.
    async fn until(&mut self, what: &str, check: impl Fn(&NodeView) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check(&self.view) {
            assert!(Instant::now() < deadline, "{what}: not within 20 s");
            self.next().await;
        }
    }
}

/// Opens an xDS stream to mesh-control as `node` with `token`, subscribed to addresses.
async fn connect(control: &MeshControl, node: &str, token: &str) -> Result<NodeStream, tonic::Status> {
    let root = std::fs::read_to_string(control.state.join("ca/root-cert.pem")).expect("root");
    let channel = Channel::from_shared(format!("https://{}", control.listen))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name("mesh-control"),
        )
        .expect("tls")
        .connect()
        .await
        .expect("TLS to mesh-control");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let subscribe = DeltaDiscoveryRequest {
        node: Some(Node { id: node.into() }),
        type_url: ADDRESS_TYPE.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    tx.send(subscribe).await.expect("queued");
    let outgoing = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut request = tonic::Request::new(outgoing);
    request.metadata_mut().insert("x-nodemesh-node", node.parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", token.trim()).parse().expect("ascii"));
    let responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    Ok(NodeStream { responses, tx, view: NodeView::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_in_the_api_server_reach_a_node_over_xds() {
    let api = KubeApiServer::start("discovery").expect("kube-apiserver");
    let client = api.client().expect("client");
    let control = start_mesh_control(&api);

    // A namespace in ambient mode, a pod scheduled on node-a, and a Service selecting it.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace =
        json!({"metadata": {"name": "demo", "labels": {"nodemesh.io/dataplane-mode": "ambient"}}});
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(namespace).expect("valid"))
        .await
        .expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod = json!({
        "metadata": {"name": "web-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "example/web", "ports": [{"name": "http", "containerPort": 8080}]}]}
    });
    pods.create(&PostParams::default(), &serde_json::from_value(pod).expect("valid")).await.expect("pod");
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let service = json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    });
    let service = services
        .create(&PostParams::default(), &serde_json::from_value(service).expect("valid"))
        .await
        .expect("service");
    let cluster_ip: std::net::Ipv4Addr = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the API server assigns a cluster IP")
        .parse()
        .expect("IPv4");

    // No kubelet here: the test plays it and reports the pod's address.
    let status = json!({"status": {"phase": "Running", "podIP": "10.1.1.2", "podIPs": [{"ip": "10.1.1.2"}]}});
    pods.patch_status("web-1", &PatchParams::default(), &Patch::Merge(&status)).await.expect("status");

    let config = eventually("mesh-control translated the cluster", async || {
        let config = admin_get(&control, "/debug/config").await?;
        // web, and the API server's own `kubernetes` service in `default`.
        (config["workloads"] == 1 && config["services"] == 2).then_some(config)
    })
    .await;
    assert_eq!(config["problems"], json!([]), "{config}");

    // A node connects (with the token mesh-control made for the node that has pods: with no
    // node agent service account in this cluster, the review fails and local tokens do not count).
    let token = std::fs::read_to_string(control.state.join("nodes/node-a.token")).unwrap_or_default();
    let refused = connect(&control, "node-a", &token).await.err().expect("refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    let token = node_agent_token(&api, "node-a").await;
    let mut node = connect(&control, "node-a", &token).await.expect("xDS stream");
    node.next().await;
    let view = &node.view;

    let Some(address::Type::Workload(workload)) = view.addresses.get("Kubernetes//Pod/demo/web-1") else {
        panic!("web-1 is not a workload: {:?}", view.addresses.keys());
    };
    assert_eq!(workload.addresses, [vec![10, 1, 1, 2]]);
    assert_eq!((workload.node.as_str(), workload.service_account.as_str()), ("node-a", "web"));
    assert_eq!(workload.tunnel_protocol, 1, "meshed: HBONE");
    let ports = &workload.services["demo/web.demo.svc.cluster.local"].ports;
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080), "the named target port resolved");
    let Some(address::Type::Service(service)) = view.addresses.get("demo/web.demo.svc.cluster.local") else {
        panic!("no service: {:?}", view.addresses.keys());
    };
    assert_eq!(service.addresses[0].address, cluster_ip.octets());
    assert_eq!(service.ports[0].app_protocol, "http", "from the port name");

    // Deleting the pod removes the workload from the node (and its endpoint from the service).
    pods.delete("web-1", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("delete");
    let removed = node.next().await;
    assert_eq!(removed.removed_resources, ["Kubernetes//Pod/demo/web-1"]);
    assert!(!node.view.addresses.contains_key("Kubernetes//Pod/demo/web-1"));
}

/// Creates the node agent's service account and a pod of it on `node`, and returns a token
/// bound to that pod (what a projected service-account token volume gives the agent).
async fn node_agent_token(api: &KubeApiServer, node: &str) -> String {
    bound_token(api, "mesh-node", &format!("mesh-node-{node}"), node).await
}

async fn bound_token(api: &KubeApiServer, service_account: &str, pod: &str, node: &str) -> String {
    use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
    let client = api.client().expect("client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let system = serde_json::from_value(json!({"metadata": {"name": "nodemesh-system"}})).expect("valid");
    let _ = namespaces.create(&PostParams::default(), &system).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "nodemesh-system");
    let account = serde_json::from_value(json!({"metadata": {"name": service_account}})).expect("valid");
    let _ = accounts.create(&PostParams::default(), &account).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "nodemesh-system");
    let agent = json!({
        "metadata": {"name": pod},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "containers": [{"name": "agent", "image": "nodemesh/mesh-node"}]}
    });
    let created = pods
        .create(&PostParams::default(), &serde_json::from_value(agent).expect("valid"))
        .await
        .expect("agent pod");
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": created.metadata.uid}}
    }))
    .expect("valid");
    let issued = accounts
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .expect("token");
    issued.status.expect("status").token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_authenticate_with_service_account_tokens_bound_to_their_own_pod() {
    let api = KubeApiServer::start("node-auth").expect("kube-apiserver");
    let control = start_mesh_control(&api);
    let node_a = node_agent_token(&api, "node-a").await;
    let other = bound_token(&api, "intruder", "intruder-a", "node-a").await;

    let mut accepted = connect(&control, "node-a", &node_a).await.expect("node-a with its own token");
    accepted.next().await;
    let cases = [
        ("node-b", node_a.as_str(), "the token is bound to a node agent on node-a, not on node-b"),
        ("node-a", other.as_str(), "belongs to system:serviceaccount:nodemesh-system:intruder"),
        ("node-a", "not-a-token", "the Kubernetes API rejected the token"),
    ];
    for (node, token, reason) in cases {
        let refused = connect(&control, node, token).await.err().expect("refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
        assert!(refused.message().contains(reason), "expected {reason:?} in {:?}", refused.message());
    }
}

/// The condition of `type_` in `conditions`, as (status, reason, message, observedGeneration).
fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String, Option<i64>)> {
    let c = conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_routes_reach_nodes_and_get_their_status_written_back() {
    let api = KubeApiServer::start("policy-status").expect("kube-apiserver");
    let client = api.client().expect("client");
    deploy::apply_dir(&client, "crds").await.expect("deploy/crds/ applies");
    deploy::wait_established(
        &client,
        &["authorizationpolicies.nodemesh.io", "httproutes.gateway.networking.k8s.io"],
        Duration::from_secs(20),
    )
    .await
    .expect("CRDs served");
    let control = start_mesh_control(&api);

    // db-1 serves Postgres (declared tcp) and HTTP; a policy puts HTTP paths on the Postgres
    // port; a route attaches to a Service that does not exist yet.
    let create = PostParams::default();
    let namespace =
        json!({"metadata": {"name": "demo", "labels": {"nodemesh.io/dataplane-mode": "ambient"}}});
    Api::<Namespace>::all(client.clone())
        .create(&create, &serde_json::from_value(namespace).expect("valid"))
        .await
        .expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod = json!({
        "metadata": {"name": "db-1", "labels": {"app": "db"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "db", "image": "example/db"}]}
    });
    pods.create(&create, &serde_json::from_value(pod).expect("valid")).await.expect("pod");
    let status = json!({"status": {"phase": "Running", "podIP": "10.1.1.3", "podIPs": [{"ip": "10.1.1.3"}]}});
    pods.patch_status("db-1", &PatchParams::default(), &Patch::Merge(&status)).await.expect("status");
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let service = |name: &str| {
        serde_json::from_value::<Service>(json!({
            "metadata": {"name": name},
            "spec": {"selector": {"app": "db"}, "ports": [
                {"name": "postgres", "port": 5432, "appProtocol": "tcp"}, {"name": "http", "port": 8080}]}
        }))
        .expect("valid")
    };
    services.create(&create, &service("db")).await.expect("service");
    let policies: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), "demo");
    let policy = json!({
        "apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "db-admin"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"ports": ["5432"], "paths": ["/admin*"]}}]}]}
    });
    policies.create(&create, &serde_json::from_value(policy).expect("valid")).await.expect("policy");
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), "demo");
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "db-route"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "db-v2", "port": 8080}],
                 "rules": [{"backendRefs": [{"name": "db", "port": 8080}]}]}
    });
    routes.create(&create, &serde_json::from_value(route).expect("valid")).await.expect("route");

    // The policy is not accepted, and says why; it is still distributed (the node fails closed).
    let unenforceable = "rules[0]: HTTP conditions (paths) can never apply: port 5432 is declared \"tcp\"";
    eventually("the policy's Accepted=False is written", async || {
        let conditions = policies.get("db-admin").await.ok()?.status?.conditions;
        (condition(&conditions, "Accepted")?
            == ("False".into(), "UnenforceableHTTPRule".into(), unenforceable.into(), Some(1)))
            .then_some(())
    })
    .await;
    let parent_accepted = async |expected: (&str, &str)| {
        eventually(&format!("the route's parent is {expected:?}"), async || {
            let parents = routes.get("db-route").await.ok()?.status?.parents;
            let [parent] = parents.as_slice() else { return None };
            let (status, reason, ..) = condition(&parent.conditions, "Accepted")?;
            (parent.controller_name == "nodemesh.io/mesh-control"
                && (status.as_str(), reason.as_str()) == expected
                && condition(&parent.conditions, "ResolvedRefs")?.0 == "True")
                .then_some(())
        })
        .await
    };
    parent_accepted(("False", "NoMatchingParent")).await;
    let config = admin_get(&control, "/policies").await.expect("/policies");
    assert_eq!(config["policies"][0]["accepted"]["reason"], "UnenforceableHTTPRule", "{config}");

    let token = node_agent_token(&api, "node-a").await;
    let mut node = connect(&control, "node-a", &token).await.expect("xDS stream");
    node.subscribe("node-a", AUTHORIZATION_TYPE).await;
    node.subscribe("node-a", HTTP_ROUTE_TYPE).await;
    node.until("the node holds the policy, the route and db-1 listing the policy", |view| {
        let listed = match view.addresses.get("Kubernetes//Pod/demo/db-1") {
            Some(address::Type::Workload(w)) => w.authorization_policies == ["demo/db-admin"],
            _ => false,
        };
        let route = view.others.get(HTTP_ROUTE_TYPE).is_some_and(|r| r.contains_key("demo/db-route"));
        listed && route && view.authorization("demo/db-admin").is_some()
    })
    .await;
    let held = node.view.authorization("demo/db-admin").expect("policy");
    assert_eq!(held.rules[0].to[0].paths, ["/admin*"], "as written: the node fails closed on it");

    // Fixed (HTTP paths on the HTTP port): accepted, for the new generation; the node gets it.
    let fix =
        json!({"spec": {"rules": [{"to": [{"operation": {"ports": ["8080"], "paths": ["/admin*"]}}]}]}});
    policies.patch("db-admin", &PatchParams::default(), &Patch::Merge(&fix)).await.expect("fix");
    eventually("the policy's Accepted=True is written", async || {
        let conditions = policies.get("db-admin").await.ok()?.status?.conditions;
        let (status, reason, _, generation) = condition(&conditions, "Accepted")?;
        (status == "True" && reason == "Accepted" && generation == Some(2)).then_some(())
    })
    .await;
    node.until("the node holds the fixed policy", |view| {
        view.authorization("demo/db-admin").is_some_and(|p| p.rules[0].to[0].ports == [8080])
    })
    .await;

    // The missing parent appears: the route's parent is accepted.
    services.create(&create, &service("db-v2")).await.expect("service");
    parent_accepted(("True", "Accepted")).await;
    let log = std::fs::read_to_string(api.dir().join("mesh-control.log")).unwrap_or_default();
    assert!(!log.contains("status write failed"), "{log}");
}
