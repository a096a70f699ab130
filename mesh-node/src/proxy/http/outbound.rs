//! Source side of L7: a pod's HTTP connection to a service is served by the proxy, and each
//! request is routed (HTTPRoute), sent to an endpoint chosen by the load balancer, retried and
//! timed out as the route says. The client's connection stays with the proxy; requests on it
//! may go to different endpoints.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::{
    Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderValue},
};
use mesh_policy::route::{self, RouteRequest};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument as _;

use super::{
    Counted, ProxyBody, failure_response, full, smuggling_risk, strip_hop_by_hop, telemetry::RequestLabels,
};
use crate::{
    pod::PodContext,
    proxy::{
        balancer::{HealthChange, Outcome},
        protocol::Protocol,
        trace_context::TraceContext,
    },
    traffic::{ServiceEntry, Traffic},
};

/// Largest request body kept for a retry; a larger one is sent once, not retried.
const MAX_RETRY_BODY: usize = 1024 * 1024;
/// Retries in flight per service may reach this share of its requests in flight (a retry
/// storm must not multiply an overload), and at least [`MIN_RETRY_BUDGET`].
const RETRY_BUDGET_PERCENT: usize = 20;
const MIN_RETRY_BUDGET: usize = 3;

/// Serves one captured HTTP connection from `pod` to `service`:`port`.
pub async fn serve<S>(
    pod: Arc<PodContext>,
    client: S,
    protocol: Protocol,
    service: Arc<ServiceEntry>,
    port: u16,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = move |request| {
        let (pod, service) = (pod.clone(), service.clone());
        async move { handle(pod, service, port, protocol, request).await }
    };
    super::serve_connection(client, protocol, handler, "outbound").await;
}

/// Where a request goes: the backend service and port, and the route rule that said so.
struct Target<'a> {
    service: Arc<ServiceEntry>,
    port: u16,
    rule: Option<route::RouteMatch<'a>>,
}

async fn handle(
    pod: Arc<PodContext>,
    parent: Arc<ServiceEntry>,
    port: u16,
    protocol: Protocol,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let traffic = pod.mesh.traffic();
    let trace = TraceContext::continue_from(request.headers());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut labels = RequestLabels {
        reporter: "source",
        source_workload: pod.key.name.clone(),
        source_workload_namespace: pod.key.namespace.clone(),
        source_principal: pod.identity.to_string(),
        destination_workload: "unknown".into(),
        destination_workload_namespace: parent.namespace.clone(),
        destination_principal: "unknown".into(),
        destination_service: parent.key.split_once('/').map_or(parent.key.clone(), |(_, h)| h.to_owned()),
        request_protocol: protocol.label(),
        response_code: 0,
        response_flags: "-",
        connection_security_policy: "unknown",
    };
    let span = tracing::info_span!(
        "http_request", method = %method, path = %path, service = %parent.key, trace_id = %trace.trace_id_hex()
    );
    let routed = route_and_send(&pod, &traffic, &parent, port, protocol, request, &trace, &mut labels);
    let response = match routed.instrument(span).await {
        Ok(response) => response,
        Err((status, flags, message)) => {
            labels.response_flags = flags;
            tracing::warn!(status = status.as_u16(), flags, reason = %message, "request failed at the source proxy");
            failure_response(status, flags, &message, protocol)
        }
    };
    labels.response_code = response.status().as_u16();
    let metrics = pod.requests.clone();
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let counted = Counted::new(body, move |bytes, ended| {
        let duration = ended.duration_since(started);
        metrics.record(&labels, duration, 0, bytes);
        tracing::info!(
            target: "access", reporter = "source", method = %method, path = %path, status,
            src.workload = %labels.source_workload, dst.workload = %labels.destination_workload,
            dst.service = %labels.destination_service, flags = labels.response_flags, bytes.response = bytes,
            duration_ms = duration.as_secs_f64() * 1000.0, "request"
        );
    });
    Response::from_parts(parts, counted.boxed())
}

/// A request the source proxy fails itself: status, response flag, message.
pub type Failure = (StatusCode, &'static str, String);

#[allow(clippy::too_many_arguments, reason = "one request's whole context, used once")]
async fn route_and_send(
    pod: &Arc<PodContext>,
    traffic: &Traffic,
    parent: &Arc<ServiceEntry>,
    port: u16,
    protocol: Protocol,
    request: Request<Incoming>,
    trace: &TraceContext,
    labels: &mut RequestLabels,
) -> Result<Response<ProxyBody>, Failure> {
    if let Some(risk) = smuggling_risk(request.headers()) {
        return Err((StatusCode::BAD_REQUEST, "DPE", format!("malformed request: {risk}")));
    }
    let target = target(traffic, parent, port, &pod.key.namespace, &request)?;
    let (mut parts, body) = request.into_parts();
    upstream_headers(&mut parts.headers, target.rule.as_ref());
    if let Ok(value) = HeaderValue::from_str(&trace.to_string()) {
        parts.headers.insert("traceparent", value);
    }
    let rule = target.rule.as_ref().map(|m| m.rule);
    let retry = rule.and_then(|r| r.retry.clone());
    let has_body = !hyper::body::Body::is_end_stream(&body);
    let retryable = retry.as_ref().is_some_and(|r| r.attempts > 0 && r.may_retry(&parts.method, has_body));
    // A body is buffered only when it may have to be sent again.
    let mut body = if retryable {
        match Limited::new(body, MAX_RETRY_BODY).collect().await {
            Ok(collected) => Payload::Buffered(collected.to_bytes()),
            Err(err) => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "DPE",
                    format!("request body not readable: {err}"),
                ));
            }
        }
    } else {
        Payload::Streamed(Some(body))
    };
    let deadline = rule.and_then(|r| r.request_timeout).map(|t| tokio::time::Instant::now() + t);
    let per_try = rule.and_then(|r| r.backend_request_timeout);
    let attempts = 1 + retry.as_ref().filter(|_| retryable).map_or(0, |r| r.attempts);
    let balancer = pod.mesh.balancers.get(&target.service.key);
    let resilience = &target.service.resilience;
    let endpoints = target.service.endpoints(target.port);
    let Some(_pending) = balancer.admit_request(resilience) else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "UO",
            format!("{}: too many pending requests (circuit breaker)", target.service.key),
        ));
    };
    let mut last_failure = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            let in_flight = balancer.retries_in_flight();
            if in_flight >= MIN_RETRY_BUDGET.max(balancer.pending() * RETRY_BUDGET_PERCENT / 100) {
                tracing::warn!(service = %target.service.key, "retry budget exhausted; not retrying");
                break;
            }
            let backoff = retry.as_ref().map_or(Duration::ZERO, |r| r.backoff) * attempt;
            if sleep_until_deadline(backoff, deadline).await.is_err() {
                break;
            }
        }
        let Some((endpoint, _in_flight)) =
            balancer.pick(endpoints, resilience, (fastrand::u32(..), fastrand::u32(..)), Instant::now())
        else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                format!("{} port {} has no endpoints", target.service.key, target.port),
            ));
        };
        let _retrying = (attempt > 0).then(|| balancer.retrying());
        labels.destination_workload = endpoint.workload.rsplit('/').next().unwrap_or_default().to_owned();
        labels.destination_workload_namespace =
            endpoint.workload.split('/').next().unwrap_or_default().to_owned();
        labels.destination_principal =
            endpoint.identity.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string);
        labels.connection_security_policy = if endpoint.identity.is_some() { "mutual_tls" } else { "none" };
        let Some(attempt_body) = body.next() else { break };
        let uri = Uri::builder()
            .scheme("http")
            .authority(endpoint.addr.to_string())
            .path_and_query(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            .build()
            .map_err(|e| (StatusCode::BAD_REQUEST, "DPE", format!("request URI: {e}")))?;
        let mut upstream_request = Request::new(attempt_body);
        *upstream_request.method_mut() = parts.method.clone();
        *upstream_request.uri_mut() = uri;
        *upstream_request.headers_mut() = parts.headers.clone();
        let sent = pod.upstream.send(
            upstream_request,
            protocol == Protocol::Http2,
            resilience.max_requests_per_connection,
        );
        let result = match (per_try, deadline) {
            (None, None) => Ok(sent.await),
            (per_try, deadline) => {
                let per_try_deadline = per_try.map(|t| tokio::time::Instant::now() + t);
                let until = [per_try_deadline, deadline].into_iter().flatten().min().expect("one is set");
                tokio::time::timeout_at(until, sent).await
            }
        };
        let now = Instant::now();
        let (outcome, retry_it) = match &result {
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let failed = response.status().is_server_error();
                (
                    if failed { Outcome::Failure } else { Outcome::Success },
                    retry.as_ref().is_some_and(|r| r.retries_status(status)),
                )
            }
            Ok(Err(_)) => (Outcome::Failure, true),
            Err(_) => (Outcome::Failure, false),
        };
        if let HealthChange::Ejected { for_ms } =
            balancer.report(endpoint.addr, outcome, endpoints, resilience, now)
        {
            pod.outlier_ejections.inc();
            tracing::warn!(
                service = %target.service.key, endpoint = %endpoint.addr, ejected_for_ms = for_ms,
                "endpoint ejected after consecutive failures"
            );
        }
        match result {
            Ok(Ok(response)) if !(retry_it && attempt + 1 < attempts && body.can_repeat()) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(matched) = &target.rule {
                    matched.rule.response_headers.apply(&mut parts.headers);
                }
                return Ok(Response::from_parts(parts, body.map_err(Into::into).boxed()));
            }
            Ok(Ok(response)) => {
                tracing::info!(endpoint = %endpoint.addr, status = response.status().as_u16(), attempt, "retrying");
                last_failure = Some((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "URX",
                    format!("{} answered {}", endpoint.addr, response.status()),
                ));
                drop(response);
            }
            Ok(Err(err)) => {
                tracing::info!(endpoint = %endpoint.addr, error = %err, attempt, "upstream request failed");
                last_failure = Some((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UF",
                    format!("upstream {} failed: {err}", endpoint.addr),
                ));
                if !body.can_repeat() {
                    break;
                }
            }
            Err(_) => {
                let whole = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                let message = if whole {
                    "request timeout (route timeouts.request)".to_owned()
                } else {
                    format!(
                        "upstream {} did not answer in time (route timeouts.backendRequest)",
                        endpoint.addr
                    )
                };
                last_failure = Some((StatusCode::GATEWAY_TIMEOUT, "UT", message));
                if whole || !body.can_repeat() {
                    break;
                }
            }
        }
    }
    Err(last_failure.unwrap_or((StatusCode::SERVICE_UNAVAILABLE, "UF", "no attempt could be made".into())))
}

/// Chooses the backend service and port for a request.
fn target<'t>(
    traffic: &'t Traffic,
    parent: &Arc<ServiceEntry>,
    port: u16,
    from_namespace: &str,
    request: &Request<Incoming>,
) -> Result<Target<'t>, Failure> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let attributes = RouteRequest {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query(),
        host,
        headers: request.headers(),
    };
    let matched = route::select(traffic.routes(), &parent.key, port, from_namespace, &attributes);
    let backend = match &matched {
        Some(m) if !m.rule.backends.is_empty() => {
            let Some(backend) = m.rule.pick_backend(fastrand::u32(..)) else {
                return Err((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "NR",
                    format!("route {} rule {}: every backend has weight 0", m.route.key(), m.rule_index),
                ));
            };
            Some(backend)
        }
        _ => None,
    };
    let (service, port) = backend_target(traffic, parent, port, matched.as_ref(), backend)?;
    Ok(Target { service, port, rule: matched })
}

/// Returns the service and port a request goes to: the parent's (no route, or a rule without
/// backends) or those of `backend`, a backend of the matched rule (port 0: the requested one).
/// A backend naming a service that does not exist answers 500, as Gateway API says; so does one
/// the route may not send to ([`route::Route::may_send_to`]: another namespace's Service
/// needs a ReferenceGrant, which nodemesh does not read yet).
pub fn backend_target(
    traffic: &Traffic,
    parent: &Arc<ServiceEntry>,
    port: u16,
    matched: Option<&route::RouteMatch<'_>>,
    backend: Option<&route::Backend>,
) -> Result<(Arc<ServiceEntry>, u16), Failure> {
    let (Some(matched), Some(backend)) = (matched, backend) else {
        return Ok((parent.clone(), port));
    };
    if !matched.route.may_send_to(&backend.service) {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            format!(
                "route {}: backend service {} is in another namespace (RefNotPermitted: no ReferenceGrant support)",
                matched.route.key(),
                backend.service
            ),
        ));
    }
    let Some(service) = traffic.service(&backend.service) else {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            format!("route {}: backend service {} does not exist", matched.route.key(), backend.service),
        ));
    };
    Ok((service.clone(), if backend.port == 0 { port } else { backend.port }))
}

/// Prepares a request's headers for the endpoint: hop-by-hop headers out, then the matched
/// rule's request header changes. What the destination's policies see.
pub fn upstream_headers(headers: &mut hyper::HeaderMap, matched: Option<&route::RouteMatch<'_>>) {
    strip_hop_by_hop(headers);
    if let Some(matched) = matched {
        matched.rule.request_headers.apply(headers);
    }
}

/// The request body for each attempt: buffered (repeatable) or streamed once.
enum Payload {
    Buffered(Bytes),
    Streamed(Option<Incoming>),
}

impl Payload {
    fn next(&mut self) -> Option<ProxyBody> {
        match self {
            Payload::Buffered(bytes) => Some(full(bytes.clone())),
            Payload::Streamed(body) => body.take().map(|b| b.map_err(Into::into).boxed()),
        }
    }

    fn can_repeat(&self) -> bool {
        matches!(self, Payload::Buffered(_))
    }
}

/// Sleeps `backoff`, or fails if the request's deadline comes first.
async fn sleep_until_deadline(backoff: Duration, deadline: Option<tokio::time::Instant>) -> Result<(), ()> {
    let wake = tokio::time::Instant::now() + backoff;
    match deadline {
        Some(deadline) if deadline <= wake => Err(()),
        _ => {
            tokio::time::sleep_until(wake).await;
            Ok(())
        }
    }
}
