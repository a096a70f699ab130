//! Destination side of L7: an HTTP connection to a pod (arriving through HBONE, or plaintext
//! for PERMISSIVE pods) is parsed so every request is authorized on its own: a denied request
//! gets 403 naming the policy, the connection stays open for the next one. Allowed requests go
//! to the app over one connection delivered from the caller's address, like L4 traffic.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_policy::authz::{self, Verdict};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};

use super::{
    Counted, ProxyBody, failure_response, smuggling_risk, strip_hop_by_hop, telemetry::RequestLabels,
};
use crate::{
    pod::PodContext,
    proxy::{ProxyError, authz::Caller, inbound::deliver, protocol::Protocol, trace_context::TraceContext},
};

/// The connection to the app behind one client connection, opened on the first allowed request
/// (a client denied everything never reaches the app) and again if the app closes it.
enum AppSender {
    None,
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

struct Connection {
    pod: Arc<PodContext>,
    caller: Caller,
    /// The address the client connected to (the pod's IP and the app's port).
    target: SocketAddr,
    protocol: Protocol,
    /// Istio's request labels of this connection (the response code and flags are filled
    /// per request): who calls whom does not change between its requests.
    labels: RequestLabels,
    app: Mutex<AppSender>,
}

/// The destination side's request labels for a connection from `caller` to `pod`'s `target`.
fn connection_labels(
    pod: &PodContext,
    caller: &Caller,
    target: SocketAddr,
    protocol: Protocol,
    mtls: bool,
) -> RequestLabels {
    let caller_workload = caller.workload.as_deref().and_then(|w| w.split_once('/'));
    RequestLabels {
        reporter: "destination",
        source_workload: caller_workload.map_or("unknown", |(_, name)| name).to_owned(),
        source_workload_namespace: caller_workload.map_or("unknown", |(ns, _)| ns).to_owned(),
        source_principal: caller.identity.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string),
        destination_workload: pod.key.name.clone(),
        destination_workload_namespace: pod.key.namespace.clone(),
        destination_principal: pod.identity.to_string(),
        destination_service: pod
            .mesh
            .traffic()
            .service_serving(target.ip(), target.port())
            .map_or("unknown", |key| key.split_once('/').map_or(key, |(_, host)| host))
            .to_owned(),
        request_protocol: protocol.label(),
        response_code: 0,
        response_flags: "-",
        connection_security_policy: if mtls { "mutual_tls" } else { "none" },
    }
}

/// Serves one inbound HTTP connection.
pub async fn serve<S>(
    pod: Arc<PodContext>,
    client: S,
    protocol: Protocol,
    caller: Caller,
    target: SocketAddr,
    mtls: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let labels = connection_labels(&pod, &caller, target, protocol, mtls);
    let connection =
        Arc::new(Connection { pod, caller, target, protocol, labels, app: Mutex::new(AppSender::None) });
    let handler = move |request| {
        let connection = connection.clone();
        async move { connection.handle(request).await }
    };
    super::serve_connection(client, protocol, handler, "inbound").await;
}

impl Connection {
    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let pod = &self.pod;
        let mut labels = self.labels.clone();
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let trace = TraceContext::continue_from(request.headers());
        let response = match self.authorize_and_forward(request, &trace).await {
            Ok(response) => response,
            Err((status, flags, message)) => {
                labels.response_flags = flags;
                failure_response(status, flags, &message, self.protocol)
            }
        };
        labels.response_code = response.status().as_u16();
        let metrics = pod.requests.clone();
        let status = labels.response_code;
        let (parts, body) = response.into_parts();
        let counted = Counted::new(body, move |bytes, ended| {
            let duration = ended.duration_since(started);
            metrics.record(&labels, duration, 0, bytes);
            tracing::info!(
                target: "access", reporter = "destination", method = %method, path = %path, status,
                src.principal = %labels.source_principal, dst.workload = %labels.destination_workload,
                flags = labels.response_flags, bytes.response = bytes, trace_id = %trace.trace_id_hex(),
                duration_ms = duration.as_secs_f64() * 1000.0, "request"
            );
        });
        Response::from_parts(parts, counted.boxed())
    }

    async fn authorize_and_forward(
        &self,
        request: Request<Incoming>,
        trace: &TraceContext,
    ) -> Result<Response<ProxyBody>, (StatusCode, &'static str, String)> {
        if let Some(risk) = smuggling_risk(request.headers()) {
            return Err((StatusCode::BAD_REQUEST, "DPE", format!("malformed request: {risk}")));
        }
        let traffic = self.pod.mesh.traffic();
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default()
            .to_owned();
        let attributes = authz::Request {
            method: request.method().as_str(),
            path: request.uri().path(),
            host: &host,
            headers: request.headers(),
        };
        let port = self.target.port();
        let decision =
            crate::proxy::authz::check_request(&self.pod, &traffic, &self.caller, port, &attributes);
        crate::proxy::authz::log_decision(&decision, &self.caller, &self.pod, port, "request");
        if decision.verdict == Verdict::Deny {
            self.pod.denied_requests.inc();
            return Err((StatusCode::FORBIDDEN, "RBAC", format!("RBAC: access denied: {}", decision.reason)));
        }
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(value) = HeaderValue::from_str(&trace.to_string()) {
            parts.headers.insert("traceparent", value);
        }
        let request = Request::from_parts(parts, body.map_err(Into::into).boxed());
        let response = self.send(request).await.map_err(|err| {
            (StatusCode::SERVICE_UNAVAILABLE, "UF", format!("app at {} unreachable: {err}", self.target))
        })?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.map_err(Into::into).boxed()))
    }

    /// Sends a request to the app, connecting (again) if needed.
    async fn send(&self, request: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        let mut app = self.app.lock().await;
        let closed = match &*app {
            AppSender::None => true,
            AppSender::Http1(sender) => sender.is_closed(),
            AppSender::Http2(sender) => sender.is_closed(),
        };
        if closed {
            *app = self.connect().await?;
        }
        let tunnel = |e: hyper::Error| ProxyError::Tunnel(format!("app: {e}"));
        match &mut *app {
            AppSender::Http1(sender) => {
                sender.ready().await.map_err(tunnel)?;
                let response = sender.send_request(request);
                drop(app);
                response.await.map_err(tunnel)
            }
            AppSender::Http2(sender) => {
                let mut sender = sender.clone();
                drop(app);
                sender.ready().await.map_err(tunnel)?;
                sender.send_request(request).await.map_err(tunnel)
            }
            AppSender::None => Err(ProxyError::Tunnel("no app connection".into())),
        }
    }

    async fn connect(&self) -> Result<AppSender, ProxyError> {
        let stream = deliver(&self.pod, SocketAddr::new(self.caller.ip, 0), self.target).await?;
        let io = TokioIo::new(stream);
        let handshake = |e: hyper::Error| ProxyError::Tunnel(format!("HTTP handshake with the app: {e}"));
        if self.protocol == Protocol::Http2 {
            let (sender, connection) =
                http2::Builder::new(TokioExecutor::new()).handshake(io).await.map_err(handshake)?;
            tokio::spawn(connection);
            Ok(AppSender::Http2(sender))
        } else {
            let (sender, connection) = http1::Builder::new().handshake(io).await.map_err(handshake)?;
            tokio::spawn(connection);
            Ok(AppSender::Http1(sender))
        }
    }
}
