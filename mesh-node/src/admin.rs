//! HTTP endpoints: admin (`127.0.0.1:15000`), metrics (`:15020`) and readiness (`:15021`).

use std::{net::SocketAddr, sync::Arc};

use hyper::{Response, StatusCode};
use mesh_api::http::{AdminRequest, Body, OPENMETRICS, json, method_not_allowed, not_found, respond};
use mesh_manifests::PodKey;
use serde_json::json;
use tokio::net::TcpListener;

use crate::node::Node;

/// Which set of routes a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

async fn route(node: &Node, endpoint: Endpoint, request: &AdminRequest) -> Response<Body> {
    if matches!(endpoint, Endpoint::Admin) && request.path == "/logging" {
        return mesh_api::logging::serve(request); // GET shows, POST changes the log filter
    }
    if !request.is_get() {
        return method_not_allowed("GET");
    }
    match (endpoint, request.path.as_str()) {
        (Endpoint::Admin, "/pods") => json(&node.status().await),
        (Endpoint::Admin, "/certs") => json(&json!({
            "ca": node.identities.is_some(),
            "certificates": node.certificates(),
        })),
        (Endpoint::Admin, "/ebpf") => json(&json!({
            "links": node.capture.link_names(),
            "stats": node.capture.stats(),
        })),
        (Endpoint::Admin, "/config") => {
            let (view, rejected, xds) = match &node.xds {
                Some(xds) => {
                    let store = xds.store.lock().await;
                    (store.view(), store.rejected(), Some(xds.status()))
                }
                None => (Default::default(), Vec::new(), None),
            };
            let rejected: Vec<_> =
                rejected.iter().map(|(name, why)| json!({"resource": name, "reason": why})).collect();
            let workloads: Vec<_> = view
                .workloads
                .iter()
                .map(|p| json!({"pod": p.key.to_string(), "node": p.node, "ip": p.ip, "service_account": p.service_account}))
                .collect();
            json(&json!({
                "source": node.source, "xds": xds, "workloads": workloads, "rejected": rejected,
                "ambient_namespaces": view.ambient_namespaces,
            }))
        }
        (Endpoint::Admin, "/connections") => json(&json!({ "connections": node.metrics.connections.list() })),
        (Endpoint::Admin, "/explain") => explain(node, request).await,
        (Endpoint::Admin, "/traffic") => {
            let health = node.mesh.balancers.snapshot(std::time::Instant::now());
            json(&node.mesh.traffic().dump(&health))
        }
        (Endpoint::Admin, "/") => respond(
            StatusCode::OK,
            "text/plain",
            "mesh-node admin: /pods /certs /config /traffic /explain /connections /ebpf /logging /metrics /healthz/ready\n",
        ),
        (Endpoint::Admin | Endpoint::Metrics, "/metrics") => {
            // Reading the maps' fill takes syscalls per entry: off the runtime's workers.
            let capture = node.capture.clone();
            let kernel = tokio::task::spawn_blocking(move || capture.usage()).await.unwrap_or_default();
            respond(StatusCode::OK, OPENMETRICS, node.metrics.render(&kernel))
        }
        (Endpoint::Admin | Endpoint::Readiness, "/healthz/ready") => {
            if node.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", node.not_ready_reason()),
                )
            }
        }
        _ => not_found(),
    }
}

/// `meshctl explain`'s question answered from this node's config (see [`crate::explain`]): 400
/// with one line for a question it cannot answer (unknown pod, bad port, …).
async fn explain(node: &Node, request: &AdminRequest) -> Response<Body> {
    let query = match crate::explain::Query::from_params(&request.query) {
        Ok(query) => query,
        Err(err) => return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{err}\n")),
    };
    let view = match &node.xds {
        Some(xds) => xds.store.lock().await.view(),
        None => Default::default(),
    };
    let enrolled_here = node
        .status()
        .await
        .pods
        .into_iter()
        .map(|p| PodKey { namespace: p.namespace, name: p.name })
        .collect();
    let traffic = node.mesh.traffic();
    let identity_of = |ip| node.mesh.identity_of(ip);
    let state = crate::explain::NodeState {
        node: &node.name,
        mesh_ca: node.identities.is_some(),
        view: &view,
        traffic: &traffic,
        identity_of: &identity_of,
        enrolled_here: &enrolled_here,
    };
    match crate::explain::explain(&state, &query) {
        Ok(explanation) => json(&explanation),
        Err(err) => {
            tracing::debug!(error = %err, "explain: question not answerable");
            respond(StatusCode::BAD_REQUEST, "text/plain", format!("{err}\n"))
        }
    }
}

/// Binds an endpoint; binding happens before the node reports ready, so errors surface early.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `endpoint` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, node: Arc<Node>, endpoint: Endpoint) {
    let name = match endpoint {
        Endpoint::Admin => "admin",
        Endpoint::Metrics => "metrics",
        Endpoint::Readiness => "readiness",
    };
    mesh_api::http::serve(listener, name, move |request| {
        let node = node.clone();
        async move { route(&node, endpoint, &request).await }
    })
    .await;
}
