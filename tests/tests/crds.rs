//! The generated CRDs in `deploy/crds/` against a real kube-apiserver (v1.20, apiextensions v1):
//! they are accepted and Established, and objects of every field the Rust types know are stored
//! and read back unchanged (nothing pruned by the schema, nothing refused by it).

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use mesh_manifests::crd::{AuthorizationPolicy, HttpRoute};
use nodemesh_testbed::{deploy, kube_apiserver::KubeApiServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_accepts_the_crds_and_stores_every_field() {
    let api = KubeApiServer::start("deploy-crds").expect("kube-apiserver");
    let client = api.client().expect("client");
    deploy::apply_dir(&client, "crds").await.expect("the API server accepts deploy/crds/");
    deploy::wait_established(
        &client,
        &["authorizationpolicies.nodemesh.io", "httproutes.gateway.networking.k8s.io"],
        Duration::from_secs(20),
    )
    .await
    .expect("both CRDs are served");

    let namespace = serde_json::from_value(json!({"metadata": {"name": "demo"}})).expect("valid");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");

    // Every field of the spec set, so a field the schema did not describe would be pruned (or a
    // value it described wrongly refused) and the comparison below would show it.
    let policy: AuthorizationPolicy = serde_json::from_value(json!({
        "apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-admin", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {
                    "principals": ["cluster.local/ns/demo/sa/web"], "notPrincipals": ["*/sa/admin"],
                    "namespaces": ["demo"], "notNamespaces": ["prod"],
                    "ipBlocks": ["10.1.0.0/16"], "notIpBlocks": ["10.1.1.9"]
                }}],
                "to": [{"operation": {
                    "ports": ["8080"], "notPorts": ["9090"], "methods": ["POST"], "notMethods": ["GET"],
                    "paths": ["/admin*"], "notPaths": ["/admin/health"], "hosts": ["db.demo"], "notHosts": ["*.prod"]
                }}],
                "when": [{"key": "request.headers[x-user]", "values": ["mallory"], "notValues": ["alice"]}]
            }]
        }
    }))
    .expect("valid policy");
    let policies: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), "demo");
    policies.create(&PostParams::default(), &policy).await.expect("the API server stores the policy");
    let read = policies.get("deny-admin").await.expect("read back");
    assert_eq!(read.spec, policy.spec, "the policy came back changed (pruned or defaulted?)");

    let route: HttpRoute = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "reviews", "namespace": "demo"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "namespace": "demo", "port": 8080}],
            "hostnames": ["reviews.demo.svc.cluster.local"],
            "rules": [{
                "matches": [{
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "headers": [{"type": "Exact", "name": "x-canary", "value": "1"}],
                    "queryParams": [{"type": "RegularExpression", "name": "v", "value": "2.*"}],
                    "method": "GET"
                }],
                "filters": [{
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "add": [{"name": "x-b", "value": "2"}], "remove": ["x-c"]},
                    "responseHeaderModifier": {"remove": ["server"]}
                }],
                "backendRefs": [
                    {"name": "reviews-v1", "namespace": "demo", "port": 8080, "weight": 90},
                    {"name": "reviews-v2", "port": 8080, "weight": 10}
                ],
                "timeouts": {"request": "2s", "backendRequest": "500ms"},
                "retry": {"codes": [502, 503], "attempts": 3, "backoff": "100ms"}
            }]
        }
    }))
    .expect("valid route");
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), "demo");
    routes.create(&PostParams::default(), &route).await.expect("the API server stores the route");
    let read = routes.get("reviews").await.expect("read back");
    assert_eq!(read.spec, route.spec, "the route came back changed (pruned or defaulted?)");

    // The schema is enforced, not merely present: a value outside it is refused.
    let mut bad = serde_json::to_value(&policy).expect("serializes");
    bad["metadata"]["name"] = json!("bad");
    bad["spec"]["action"] = json!("MAYBE");
    let untyped = ApiResource::erase::<AuthorizationPolicy>(&());
    let refused = Api::<DynamicObject>::namespaced_with(client, "demo", &untyped)
        .create(&PostParams::default(), &serde_json::from_value(bad).expect("an object"))
        .await
        .expect_err("an action outside the enum is refused");
    assert!(refused.to_string().contains("spec.action: Unsupported value: \"MAYBE\""), "{refused}");
}
