//! Local mode: a policy that cannot be enforced as written keeps the manifests from loading
//! (the last good state stays), and the admin endpoint's `/policies` and `/routes` say which
//! one and why.

mod common;

use std::net::SocketAddr;

use common::{MANIFESTS, start};
use mesh_api::workload::v1::AUTHORIZATION_TYPE;
use serde_json::Value;

async fn admin_get(admin: SocketAddr, path: &str) -> Value {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("admin");
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    let body = response.split_once("\r\n\r\n").expect("a body").1;
    serde_json::from_str(body).expect("JSON")
}

/// a1 serving Postgres (`tcp`), a policy on it with `paths` on port `port`, a route to it.
fn manifests(port: u16) -> String {
    format!(
        "{}---\nkind: Service\nmetadata: {{name: db, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.11, selector: {{app: db}}, ports: [{{port: 5432, appProtocol: tcp}}, {{name: http, port: 8080}}]}}\n\
         ---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: db-admin, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: db}}}}, action: DENY, rules: [{{to: [{{operation: {{ports: [\"{port}\"], paths: [/admin]}}}}]}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: db-route, namespace: demo}}\n\
         spec: {{parentRefs: [{{kind: Service, name: db, port: 8080}}, {{kind: Service, name: gone}}]}}\n",
        MANIFESTS.replace(
            "metadata: {name: a1, namespace: demo,",
            "metadata: {name: a1, namespace: demo, labels: {app: db},"
        )
    )
}

#[tokio::test]
async fn a_rejected_policy_is_shown_with_its_reason_and_nodes_keep_the_last_good_state() {
    let h = start("policy-reports").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = listener.local_addr().expect("addr");
    tokio::spawn(h.plane.clone().serve_admin(listener));

    std::fs::write(h.dir.join("config/pods.yaml"), manifests(8080)).expect("write");
    h.plane.reload().expect("paths on the HTTP port are enforceable");
    let policies = admin_get(admin, "/policies").await;
    assert_eq!(policies["served"], true);
    assert_eq!(policies["policies"][0]["name"], "db-admin");
    assert_eq!(policies["policies"][0]["scope"], "WORKLOAD_SELECTOR");
    assert_eq!(policies["policies"][0]["accepted"]["status"], true);
    let served = h.plane.xds.snapshots.borrow().clone();
    assert_eq!(served.count(AUTHORIZATION_TYPE), 1);

    // The same paths on the Postgres port: refused, the error names file, line and rule.
    std::fs::write(h.dir.join("config/pods.yaml"), manifests(5432)).expect("write");
    let err = format!("{:#}", h.plane.reload().expect_err("refused"));
    assert!(
        err.contains("pods.yaml:")
            && err.contains("AuthorizationPolicy demo/db-admin: rules[0]: HTTP conditions (paths) can never apply: port 5432 is declared \"tcp\""),
        "{err}"
    );
    let policies = admin_get(admin, "/policies").await;
    assert_eq!(policies["served"], false, "{policies}");
    let policy = &policies["policies"][0];
    assert_eq!(policy["accepted"]["status"], false);
    assert_eq!(policy["accepted"]["reason"], "UnenforceableHTTPRule");
    assert_eq!(
        policy["accepted"]["message"],
        "rules[0]: HTTP conditions (paths) can never apply: port 5432 is declared \"tcp\""
    );
    let config = admin_get(admin, "/debug/config").await;
    assert!(config["error"].as_str().is_some_and(|e| e.contains("can never apply")), "{config}");
    assert_eq!(*h.plane.xds.snapshots.borrow(), served, "nodes keep the last good state");

    // Routes: one parent accepted, one missing.
    let routes = admin_get(admin, "/routes").await;
    let parents = &routes["routes"][0]["parents"];
    assert_eq!(routes["routes"][0]["distributed"], true);
    assert_eq!(parents[0]["service"], "demo/db:8080");
    assert_eq!(parents[0]["accepted"]["status"], true);
    assert_eq!(parents[1]["service"], "demo/gone");
    assert_eq!(parents[1]["accepted"]["reason"], "NoMatchingParent");
}
