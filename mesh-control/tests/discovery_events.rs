//! The Kubernetes source against kube-rs's mock service: precise event sequences in, complete
//! object sets out (published once the core kinds are listed, one publication per burst of
//! changes, missing CRDs tolerated).

use std::{collections::HashMap, convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use mesh_control::discovery;
use mesh_manifests::ClusterObjects;
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

fn body(bytes: Vec<u8>) -> Body {
    http_body_util::Full::new(Bytes::from(bytes)).boxed()
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body(serde_json::to_vec(value).expect("json")))
        .expect("response")
}

/// Which kind a request path is about.
fn kind_of(path: &str) -> &'static str {
    match path {
        "/api/v1/namespaces" => "Namespace",
        "/api/v1/pods" => "Pod",
        "/api/v1/services" => "Service",
        "/apis/nodemesh.io/v1alpha1/authorizationpolicies" => "AuthorizationPolicy",
        "/apis/gateway.networking.k8s.io/v1/httproutes" => "HTTPRoute",
        _ => "?",
    }
}

/// A fake API server: lists what it was given, answers 404 for the CRDs (not installed), and
/// holds each watch open, streaming the events the test pushes.
struct FakeApi {
    watches: mpsc::UnboundedReceiver<(&'static str, mpsc::UnboundedSender<Value>)>,
}

fn serve(
    mut handle: tower_test::mock::Handle<Request<kube::client::Body>, Response<Body>>,
    lists: HashMap<&'static str, Vec<Value>>,
) -> FakeApi {
    let (watch_tx, watches) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let kind = kind_of(&path);
            let response = match (kind, query.contains("watch=true")) {
                ("AuthorizationPolicy" | "HTTPRoute" | "?", _) => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"}),
                ),
                (kind, false) => json_response(
                    StatusCode::OK,
                    &json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": lists.get(kind).cloned().unwrap_or_default()}),
                ),
                (kind, true) => {
                    let (events, rx) = mpsc::unbounded_channel::<Value>();
                    let _ = watch_tx.send((kind, events));
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        let event = rx.recv().await?;
                        let mut line = serde_json::to_vec(&event).expect("json");
                        line.push(b'\n');
                        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx))
                    });
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(StreamBody::new(stream).boxed())
                        .expect("response")
                }
            };
            respond.send_response(response);
        }
    });
    FakeApi { watches }
}

impl FakeApi {
    /// Waits for the watches of the three core kinds; returns their event senders.
    async fn core_watches(&mut self) -> HashMap<&'static str, mpsc::UnboundedSender<Value>> {
        let mut watches = HashMap::new();
        while watches.len() < 3 {
            let (kind, sender) = tokio::time::timeout(Duration::from_secs(5), self.watches.recv())
                .await
                .expect("watches opened")
                .expect("server running");
            watches.insert(kind, sender);
        }
        watches
    }
}

fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "resourceVersion": "1", "labels": {"nodemesh.io/dataplane-mode": "ambient"}}})
}

fn pod(resource_version: &str, ip: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "demo", "uid": "u1", "resourceVersion": resource_version, "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]}
    });
    if let Some(ip) = ip {
        pod["status"] = json!({"phase": "Running", "podIP": ip});
    }
    pod
}

fn service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo", "uid": "s1", "resourceVersion": "3"},
           "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"port": 80}]}})
}

async fn next(published: &mut mpsc::UnboundedReceiver<ClusterObjects>) -> ClusterObjects {
    tokio::time::timeout(Duration::from_secs(5), published.recv())
        .await
        .expect("a publication")
        .expect("running")
}

fn pod_ip(objects: &ClusterObjects) -> Option<String> {
    objects.pods.first().and_then(|p| p.status.as_ref()).and_then(|s| s.pod_ip.clone())
}

#[tokio::test]
async fn lists_then_one_publication_per_burst_of_events() {
    let (service_mock, handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
    let lists = HashMap::from([("Namespace", vec![namespace()]), ("Pod", vec![pod("1", None)])]);
    let mut api = serve(handle, lists);
    let client = kube::Client::new(service_mock, "default");
    let (publish, mut published) = mpsc::unbounded_channel();
    let source = tokio::spawn(discovery::kubernetes(client, move |objects| {
        let _ = publish.send(objects);
    }));

    // 1. After the lists: the namespace and the pod (no address yet); the CRDs are absent.
    let first = next(&mut published).await;
    assert_eq!((first.namespaces.len(), first.pods.len(), first.services.len()), (1, 1, 0));
    assert_eq!(pod_ip(&first), None);
    assert!(first.authorization_policies.is_empty() && first.http_routes.is_empty());

    // 2. The pod gets its address and a service appears, in one burst: one publication.
    let watches = api.core_watches().await;
    watches["Pod"].send(json!({"type": "MODIFIED", "object": pod("2", Some("10.1.1.2"))})).expect("push");
    watches["Service"].send(json!({"type": "ADDED", "object": service()})).expect("push");
    let burst = next(&mut published).await;
    assert_eq!(pod_ip(&burst).as_deref(), Some("10.1.1.2"));
    assert_eq!(burst.services.len(), 1);
    let quiet = tokio::time::timeout(Duration::from_millis(400), published.recv()).await;
    assert!(quiet.is_err(), "one burst, one publication: {:?}", quiet.ok().flatten().map(|o| o.pods.len()));

    // 3. The pod is deleted: the next set has no pods and still the service.
    watches["Pod"].send(json!({"type": "DELETED", "object": pod("4", Some("10.1.1.2"))})).expect("push");
    let deleted = next(&mut published).await;
    assert!(deleted.pods.is_empty());
    assert_eq!(deleted.services.len(), 1);
    source.abort();
}
