//! The small HTTP/1.1 server both mesh-control and mesh-node use for their admin, metrics and
//! readiness endpoints: each route a function of the method, path and query parameters. State
//! changes (e.g. the log level) take POST, so a stray GET or a prefetch never changes anything.

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

/// What a route sees of a request: no bodies, parameters travel in the query string.
#[derive(Clone, Debug)]
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
}

impl AdminRequest {
    /// Parses `path?query` (tests and clients build requests the same way).
    pub fn new(method: Method, path_and_query: &str) -> Self {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let query =
            form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        AdminRequest { method, path: path.to_owned(), query }
    }

    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn is_get(&self) -> bool {
        self.method == Method::GET
    }
}

/// The answer to a request whose method the route does not take.
pub fn method_not_allowed(allowed: &str) -> Response<Body> {
    let mut response =
        respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", format!("use {allowed} for this endpoint\n"));
    if let Ok(value) = header::HeaderValue::from_str(allowed) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// Serves requests on `listener` with `route(request)` until the task is dropped. Only GET and
/// POST reach a route; a GET route answers POST with 405 through [`method_not_allowed`].
pub async fn serve<R, F>(listener: TcpListener, name: &'static str, route: R)
where
    R: Fn(AdminRequest) -> F + Clone + Send + Sync + 'static,
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
                    if req.method() != Method::GET && req.method() != Method::POST {
                        return Ok::<_, Infallible>(method_not_allowed("GET, POST"));
                    }
                    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
                    Ok(route(AdminRequest::new(req.method().clone(), target)).await)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let request = AdminRequest::new(Method::GET, "/explain?from=demo%2Fa1&http=GET+%2Fadmin&port=80");
        assert_eq!(request.path, "/explain");
        assert_eq!(request.param("from"), Some("demo/a1"));
        assert_eq!(request.param("http"), Some("GET /admin"));
        assert_eq!(request.param("port"), Some("80"));
        assert_eq!(request.param("missing"), None);
        assert!(AdminRequest::new(Method::GET, "/pods").query.is_empty());
    }
}
