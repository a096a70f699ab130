//! HBONE server: each enrolled pod's `:15008`. Terminates mutual TLS with the pod's own
//! certificate, requires a client certificate from the trust bundle, and turns each HTTP/2
//! CONNECT stream into a connection to the app, delivered from the tunnel's source address (the
//! source pod's IP) like captured plaintext.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use mesh_api::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use mesh_policy::authz::Verdict;

use super::{
    authz::{self, Caller},
    hbone::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, MAX_STREAMS_PER_TUNNEL, STREAM_WINDOW},
    hbone_stream::{HboneStream, relay_hbone},
    inbound::deliver,
    protocol::{Prefixed, detect},
    relay::Metered,
    trace_context::TraceContext,
};
use crate::{
    connections::{PolicyResult, Tracked},
    pod::PodContext,
    proxy::ProxyError,
    tls,
    traffic::AppProtocol,
};

/// A TLS handshake must finish within this, or the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn accept_loop(pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let span = tracing::debug_span!("hbone_inbound", src.addr = %peer);
                tokio::spawn(serve_tunnel(pod.clone(), tcp, peer).instrument(span));
            }
            Err(err) => {
                tracing::warn!(error = %err, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_tunnel(pod: Arc<PodContext>, tcp: TcpStream, peer: SocketAddr) {
    // Handshake flights and HTTP/2 control frames are small writes: without this, Nagle holds
    // them back until the peer's delayed ACK (40 ms), for every new tunnel.
    let _ = tcp.set_nodelay(true);
    let Some(own) = pod.identities.as_ref().and_then(|i| i.current(&pod.identity)) else {
        // No valid certificate for this pod: refuse rather than serve unauthenticated.
        tracing::warn!(dst.identity = %pod.identity, "HBONE connection refused: no certificate yet");
        return;
    };
    let config = match tls::server_config(&own) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(error = %err, "HBONE TLS configuration failed");
            return;
        }
    };
    let handshake =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(Arc::new(config)).accept(tcp)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            pod.inbound.failed.inc();
            tracing::warn!(src.addr = %peer, error = %err, "HBONE mTLS handshake refused");
            return;
        }
        Err(_) => {
            pod.inbound.failed.inc();
            tracing::warn!(src.addr = %peer, "HBONE mTLS handshake timed out");
            return;
        }
    };
    let Some(client_cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned() else {
        return;
    };
    let client_identity = match tls::spiffe_id_of(&client_cert) {
        Ok(id) => id,
        Err(err) => {
            tracing::warn!(src.addr = %peer, error = %err, "HBONE client certificate has no usable identity");
            return;
        }
    };
    tracing::info!(
        src.identity = %client_identity, src.addr = %peer, src.serial = %tls::serial_of(&client_cert),
        dst.identity = %pod.identity, "HBONE tunnel accepted"
    );
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_STREAMS_PER_TUNNEL)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(tls)
        .await;
    let mut connection = match handshake {
        Ok(connection) => connection,
        Err(err) => {
            tracing::warn!(src.addr = %peer, error = %err, "HBONE HTTP/2 handshake failed");
            return;
        }
    };
    // Accepting also drives the connection (every stream's frames), so it runs until the
    // tunnel ends; each stream is served on a task of its own.
    while let Some(accepted) = connection.accept().await {
        match accepted {
            Ok((request, respond)) => {
                let serve = stream(pod.clone(), client_identity.clone(), peer, request, respond);
                tokio::spawn(serve.in_current_span());
            }
            Err(err) => {
                tracing::debug!(error = %err, "HBONE tunnel ended");
                return;
            }
        }
    }
}

/// Longest `baggage` value that is logged; longer ones are cut (the header is the client's).
const MAX_LOGGED_BAGGAGE: usize = 256;

/// Returns the stream's trace ID and the client's baggage, for logs. A malformed
/// `traceparent` is logged and ignored: it is telemetry, the tunnel is already authenticated.
fn trace_of(headers: &HeaderMap) -> (String, String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = match header("traceparent").map(TraceContext::parse) {
        Some(Ok(context)) => context.trace_id_hex(),
        Some(Err(err)) => {
            tracing::warn!(error = %err, "ignoring a malformed traceparent");
            String::new()
        }
        None => String::new(),
    };
    let baggage: String = header("baggage").unwrap_or_default().chars().take(MAX_LOGGED_BAGGAGE).collect();
    (trace_id, baggage)
}

/// Answers a CONNECT that is refused: the status, and the end of the stream.
fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(err) = respond.send_response(response, true) {
        tracing::debug!(error = %err, "the refused stream was already gone");
    }
}

/// Handles one CONNECT stream of a tunnel.
async fn stream(
    pod: Arc<PodContext>,
    client_identity: SpiffeId,
    tunnel_peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if request.method() != Method::CONNECT {
        return refuse(respond, StatusCode::BAD_REQUEST);
    }
    let Some(target) = request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()) else {
        return refuse(respond, StatusCode::BAD_REQUEST);
    };
    if target.ip() != std::net::IpAddr::V4(pod.ip) {
        // A tunnel to this pod only reaches this pod.
        tracing::warn!(src.identity = %client_identity, dst.addr = %target, "CONNECT for another address refused");
        return refuse(respond, StatusCode::BAD_REQUEST);
    }
    let active = pod.inbound.open();
    // Each stream is a connection: listed, counted and logged (once, when it ends) via `conn`.
    let conn = pod.inbound.track(tunnel_peer);
    conn.set_destination(target);
    conn.set_mtls(pod.identity.to_string(), client_identity.to_string());
    let (trace_id, baggage) = trace_of(request.headers());
    let traffic = pod.mesh.traffic();
    let caller = Caller::new(&traffic, tunnel_peer.ip(), Some(client_identity.clone()));
    conn.set_remote_workload(caller.workload.clone());
    if let Some(service) = traffic.service_serving(target.ip(), target.port()) {
        conn.set_service(service);
    }
    let port = target.port();
    let parsing = authz::inbound_parsing(&traffic, authz::Workload::of(&pod), port);
    let parse = parsing.is_some();
    let declared = parsing.unwrap_or(AppProtocol::Opaque);
    if !parse {
        // Plain L4: decided now, and the CONNECT is refused when denied (the source resets its
        // client's connection).
        let decision = authz::check_connection(&pod, &traffic, &caller, port, false);
        authz::log_decision(&decision, &caller, &pod, port, "connection");
        if decision.verdict == Verdict::Deny {
            pod.denied_connections.inc();
            conn.fail(&ProxyError::Denied(decision.reason));
            return refuse(respond, StatusCode::FORBIDDEN);
        }
        conn.set_policy(PolicyResult::Allow);
    }
    let app = if parse {
        None // delivered per request by the HTTP server, or after detection
    } else {
        match deliver(&pod, SocketAddr::new(tunnel_peer.ip(), 0), target).await {
            Ok(app) => {
                if let Ok(source) = app.local_addr() {
                    conn.set_source(source); // the caller's address as the app sees it
                }
                Some(app)
            }
            Err(err) => {
                pod.inbound.failed.inc();
                tracing::warn!(src.identity = %client_identity, dst.addr = %target, error = %err, "app unreachable");
                conn.fail(&err);
                return refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            }
        }
    };
    tracing::info!(
        src.identity = %client_identity, dst.identity = %pod.identity, src.addr = %tunnel_peer.ip(), dst.addr = %target,
        trace_id = %trace_id, baggage = %baggage, "HBONE stream accepted"
    );
    let _active = active;
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(err) => {
            pod.inbound.failed.inc();
            tracing::debug!(error = %err, "HBONE stream failed before it opened");
            conn.fail_with("UF", format!("HBONE stream failed before it opened: {err}"));
            return;
        }
    };
    let stream = HboneStream::new(send, request.into_body());
    let served = tokio::select! {
        r = serve_stream(&pod, &conn, stream, app, caller, target, declared) => r,
        () = pod.withdrawn.cancelled() => Ok(None),
    };
    match served {
        Ok(Some((received, sent))) => {
            tracing::debug!(bytes.received = received, bytes.sent = sent, "HBONE stream closed")
        }
        Ok(None) => {}
        Err(err) => {
            pod.inbound.failed.inc();
            conn.fail_with("UF", err.to_string());
        }
    }
}

/// Carries one opened stream: parsed as HTTP when policies or the port call for it, else
/// relayed to the app until either side closes or a policy change revokes it. Returns the bytes
/// relayed each way (`None` for HTTP, which counts per request).
async fn serve_stream(
    pod: &Arc<PodContext>,
    conn: &Tracked,
    stream: HboneStream,
    app: Option<TcpStream>,
    caller: Caller,
    target: SocketAddr,
    declared: AppProtocol,
) -> std::io::Result<Option<(u64, u64)>> {
    let port = target.port();
    let (stream, app) = match app {
        Some(app) => (Prefixed::new(Bytes::new(), stream), app),
        None => {
            let (protocol, stream) = detect(stream, declared).await?;
            conn.set_protocol(protocol);
            if protocol.is_http() {
                // Every request is decided on its own (a denied one gets 403, L4 rules included).
                conn.set_policy(PolicyResult::PerRequest);
                let (pod_sent, pod_received) = conn.meters();
                let stream = Metered::new(stream, pod_received, pod_sent);
                super::http::inbound::serve(pod.clone(), stream, protocol, caller, target, true).await;
                return Ok(None);
            }
            let traffic = pod.mesh.traffic();
            let decision = authz::check_connection(pod, &traffic, &caller, port, false);
            authz::log_decision(&decision, &caller, pod, port, "connection");
            if decision.verdict == Verdict::Deny {
                pod.denied_connections.inc();
                conn.fail(&ProxyError::Denied(decision.reason.clone()));
                return Err(std::io::Error::other(format!("denied: {}", decision.reason)));
            }
            conn.set_policy(PolicyResult::Allow);
            let app =
                deliver(pod, SocketAddr::new(caller.ip, 0), target).await.map_err(std::io::Error::other)?;
            if let Ok(source) = app.local_addr() {
                conn.set_source(source);
            }
            (stream, app)
        }
    };
    let (pod_sent, pod_received) = conn.meters();
    tokio::select! {
        relayed = relay_hbone(Prefixed::new(Bytes::new(), app), stream, &pod_sent, &pod_received) => {
            relayed.map(|(sent, received)| Some((received, sent)))
        }
        decision = authz::until_revoked(pod, &caller, port) => {
            pod.denied_connections.inc();
            tracing::warn!(reason = %decision.reason, "open connection closed: a policy change denies it");
            conn.fail(&ProxyError::Denied(format!("revoked by a policy change: {}", decision.reason)));
            Err(std::io::Error::other(format!("revoked: {}", decision.reason)))
        }
    }
}
