//! The real kube-apiserver tier on its own: kube-rs reflectors see pods come, get their IP from
//! the status subresource and go, in an exact order; Services get cluster IPs; namespace labels
//! select; RBAC refuses what is not bound and allows what is. Later tests run nodemesh's
//! Kubernetes discovery against this same server.

use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{reflector, watcher},
};
use nodemesh_testbed::{KubeApiServer, TokenUser, kube_apiserver::SERVICE_CIDR};
use serde_json::json;

const NAMESPACE: &str = "shop";
const POD_IP: &str = "10.1.1.2";

/// Waits for one watcher event; the server is local, so seconds mean something is wrong.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A watcher event reduced to what the assertions compare.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply { name: String, ip: Option<String> },
    InitDone,
    Apply { name: String, ip: Option<String>, deleting: bool },
    Delete { name: String },
}

fn seen(event: watcher::Event<Pod>) -> Seen {
    let ip = |pod: &Pod| pod.status.as_ref().and_then(|s| s.pod_ip.clone());
    match event {
        watcher::Event::Init => Seen::Init,
        watcher::Event::InitApply(pod) => Seen::InitApply { ip: ip(&pod), name: pod.name_any() },
        watcher::Event::InitDone => Seen::InitDone,
        watcher::Event::Apply(pod) => Seen::Apply {
            ip: ip(&pod),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            name: pod.name_any(),
        },
        watcher::Event::Delete(pod) => Seen::Delete { name: pod.name_any() },
    }
}

async fn create_namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let namespace: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
}

/// Returns the HTTP status of a failed API call (403 Forbidden, 401 Unauthorized, ...).
fn status_code<T: std::fmt::Debug>(result: kube::Result<T>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reflector_sees_a_pod_created_given_an_ip_and_deleted_in_order() {
    let server = KubeApiServer::start("reflector").expect("kube-apiserver");
    let client = server.client().expect("client");

    create_namespace(&client, NAMESPACE, json!({ "nodemesh.io/dataplane-mode": "ambient" })).await;
    create_namespace(&client, "legacy", json!({})).await;
    let ambient = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels("nodemesh.io/dataplane-mode=ambient"))
        .await
        .expect("list namespaces by label");
    assert_eq!(ambient.items.iter().map(|ns| ns.name_any()).collect::<Vec<_>>(), [NAMESPACE]);

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web-0", "labels": { "app": "web" } },
        "spec": {
            "nodeName": "node-a",
            "serviceAccountName": "web",
            "containers": [{ "name": "web", "image": "web:1", "ports": [{ "name": "http", "containerPort": 8080 }] }],
        },
    }))
    .expect("pod");
    let created = pods.create(&PostParams::default(), &pod).await.expect("create pod");
    assert_eq!(created.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("node-a"));
    assert_eq!(created.spec.as_ref().and_then(|s| s.service_account_name.as_deref()), Some("web"));

    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80, "targetPort": "http" }] },
    }))
    .expect("service");
    let service =
        Api::<Service>::namespaced(client.clone(), NAMESPACE).create(&PostParams::default(), &service).await;
    let cluster_ip = service.expect("create service").spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    assert!(cluster_ip.starts_with("10.96."), "cluster IP {cluster_ip:?} not from {SERVICE_CIDR}");

    let (store, writer) = reflector::store();
    let mut events = reflector(writer, watcher(pods.clone(), watcher::Config::default())).boxed();
    let mut next = async || {
        let event = tokio::time::timeout(EVENT_TIMEOUT, events.try_next()).await;
        seen(event.expect("a watcher event in time").expect("watch error").expect("stream ended"))
    };

    assert_eq!(next().await, Seen::Init);
    assert_eq!(next().await, Seen::InitApply { name: "web-0".into(), ip: None });
    assert_eq!(next().await, Seen::InitDone);
    assert_eq!(store.state().len(), 1);

    // What the kubelet would do: the pod's IP arrives through the status subresource.
    let status = json!({ "status": { "phase": "Running", "podIP": POD_IP, "podIPs": [{ "ip": POD_IP }] } });
    pods.patch_status("web-0", &PatchParams::default(), &Patch::Merge(&status)).await.expect("patch status");
    assert_eq!(next().await, Seen::Apply { name: "web-0".into(), ip: Some(POD_IP.into()), deleting: false });
    let cached = store.state();
    assert_eq!(cached.len(), 1);
    assert_eq!(cached[0].status.as_ref().and_then(|s| s.pod_ip.as_deref()), Some(POD_IP));

    // Grace period 0, since no kubelet would confirm a graceful deletion. Even so the server
    // first marks the pod as terminating (deletionTimestamp set, one more event), then removes it.
    let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    pods.delete("web-0", &now).await.expect("delete pod");
    assert_eq!(next().await, Seen::Apply { name: "web-0".into(), ip: Some(POD_IP.into()), deleting: true });
    assert_eq!(next().await, Seen::Delete { name: "web-0".into() });
    assert!(store.state().is_empty(), "the store still holds {:?}", store.state());

    // Nothing else happens to the pod: no controllers run here.
    let quiet = tokio::time::timeout(Duration::from_secs(2), events.try_next()).await;
    assert!(quiet.is_err(), "unexpected event after the deletion: {quiet:?}");
    drop(events);
    server.stop();
}

#[tokio::test]
async fn rbac_refuses_unbound_users_and_allows_exactly_what_a_role_grants() {
    let viewer = TokenUser::new("pod-viewer", &["nodemesh:testers"]);
    let server =
        KubeApiServer::start_with_users("rbac", std::slice::from_ref(&viewer)).expect("kube-apiserver");
    let admin = server.client().expect("client");
    create_namespace(&admin, NAMESPACE, json!({})).await;

    let as_viewer = server.client_with_token(&viewer.token).expect("client");
    let viewer_pods: Api<Pod> = Api::namespaced(as_viewer.clone(), NAMESPACE);
    assert_eq!(status_code(viewer_pods.list(&ListParams::default()).await), 403, "no binding yet");
    let stranger = server.client_with_token("not-a-known-token").expect("client");
    assert_eq!(
        status_code(Api::<Pod>::namespaced(stranger, NAMESPACE).list(&ListParams::default()).await),
        401
    );

    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "pod-reader" },
        "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"] }],
    }))
    .expect("role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "pod-viewer-reads-pods" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "pod-viewer" }],
    }))
    .expect("role binding");
    Api::<Role>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &role)
        .await
        .expect("role");
    Api::<RoleBinding>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &binding)
        .await
        .expect("role binding");

    // The authorizer learns of the binding through its own watch: a moment, not at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Err(err) = viewer_pods.list(&ListParams::default()).await {
        assert!(tokio::time::Instant::now() < deadline, "the binding never took effect: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only what the role grants, only where it is bound.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web-0" },
        "spec": { "containers": [{ "name": "web", "image": "web:1" }] },
    }))
    .expect("pod");
    assert_eq!(
        status_code(viewer_pods.create(&PostParams::default(), &pod).await),
        403,
        "create not granted"
    );
    let elsewhere = Api::<Pod>::namespaced(as_viewer, "default").list(&ListParams::default()).await;
    assert_eq!(status_code(elsewhere), 403, "bound in {NAMESPACE} only");

    // The kubeconfig written for a user works as a client configuration too.
    let path = server.write_kubeconfig(&viewer).expect("kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    let from_file = Client::try_from(config).expect("client from kubeconfig");
    assert!(Api::<Pod>::namespaced(from_file, NAMESPACE).list(&ListParams::default()).await.is_ok());
    server.stop();
}
