//! The small HTTP/1.1 server both mesh-control and mesh-node use for their admin, metrics and
//! readiness endpoints: GET-only, each route a function of the path.

use std::{convert::Infallible, future::Future};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub type Body = Full<Bytes>;

/// The Prometheus/OpenMetrics text content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(err) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", err.to_string()),
    }
}

pub fn not_found() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// Serves GET requests on `listener` with `route(path)` until the task is dropped.
pub async fn serve<R, F>(listener: TcpListener, name: &'static str, route: R)
where
    R: Fn(String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, endpoint = name, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let route = route.clone();
                async move {
                    if req.method() != Method::GET {
                        return Ok::<_, Infallible>(respond(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "only GET is supported\n",
                        ));
                    }
                    Ok(route(req.uri().path().to_owned()).await)
                }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, endpoint = name, "HTTP connection ended with an error");
            }
        });
    }
}
