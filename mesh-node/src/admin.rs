//! HTTP endpoints: admin (`127.0.0.1:15000`), metrics (`:15020`) and readiness (`:15021`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
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

type Body = Full<Bytes>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn json_response(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(err) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", err.to_string()),
    }
}

async fn route(node: &Node, endpoint: Endpoint, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is supported\n");
    }
    match (endpoint, req.uri().path()) {
        (Endpoint::Admin, "/pods") => json_response(&node.status().await),
        (Endpoint::Admin, "/certs") => json_response(&json!({
            "ca": node.identities.is_some(),
            "certificates": node.certificates(),
        })),
        (Endpoint::Admin, "/ebpf") => json_response(&json!({
            "links": node.capture.link_names(),
            "stats": node.capture.stats(),
        })),
        (Endpoint::Admin, "/") => respond(
            StatusCode::OK,
            "text/plain",
            "mesh-node admin: /pods /certs /ebpf /metrics /healthz/ready\n",
        ),
        (Endpoint::Admin | Endpoint::Metrics, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.metrics.render(&node.capture.stats()),
        ),
        (Endpoint::Admin | Endpoint::Readiness, "/healthz/ready") => {
            if node.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: capture is being installed\n",
                )
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Binds an endpoint; binding happens before the node reports ready, so errors surface early.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `endpoint` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, node: Arc<Node>, endpoint: Endpoint) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, ?endpoint, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(&node, endpoint, &req).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        });
    }
}
