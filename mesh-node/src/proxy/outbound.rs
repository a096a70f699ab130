//! Outbound: a pod's connection captured by connect4/6 arrives on the pod's 15001 listener and
//! is carried to its original destination from inside the pod's netns (source IP preserved).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use bytes::Bytes;

use super::{
    ProxyError,
    balancer::{HealthChange, Outcome},
    connect_from_pod, http,
    protocol::{Prefixed, detect},
    relay::Metered,
    reset, set_reset_on_close,
    splice::relay_tcp,
};
use crate::{
    connections::Tracked,
    pod::PodContext,
    traffic::{ServiceEntry, Traffic},
};

/// The sock_ops program records the original destination when the client's side of the
/// connection is established, which precedes our accept; a few short retries cover the rare
/// case where the accept wins the race on another CPU.
const LOOKUP_ATTEMPTS: u32 = 3;

pub async fn accept_loop(pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let span = tracing::debug_span!("outbound", src = %peer);
                tokio::spawn(handle(pod.clone(), client, peer).instrument(span));
            }
            Err(err) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %err, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn handle(pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
    let _active = pod.outbound.open();
    // The app connected from loopback (to 15001); its address in the mesh is the pod's IP.
    // The connection is listed, counted and logged (once, when it closes) through `conn`.
    let conn = pod.outbound.track(SocketAddr::new(std::net::IpAddr::V4(pod.ip), peer.port()));
    let result = tokio::select! {
        r = forward(&pod, &conn, client, peer) => r,
        () = pod.withdrawn.cancelled() => Ok(None),
    };
    if let Err(err) = result {
        pod.outbound.failed.inc();
        conn.fail(&err);
    }
}

/// Returns the original destination and the bytes relayed each way.
async fn forward(
    pod: &Arc<PodContext>,
    conn: &Tracked,
    client: TcpStream,
    peer: SocketAddr,
) -> Result<Option<(SocketAddr, u64, u64)>, ProxyError> {
    let mut dst = None;
    for attempt in 0..LOOKUP_ATTEMPTS {
        dst = pod.capture.take_original_destination(pod.netns_cookie, peer.port());
        if dst.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(u64::from(attempt) + 1)).await;
    }
    let Some(dst) = dst else {
        reset(client);
        return Err(ProxyError::NoOriginalDestination);
    };
    conn.set_destination(dst);
    let traffic = pod.mesh.traffic();
    if let Some(service) = traffic.service_at(dst.ip()) {
        conn.set_service(&service.key);
        return to_service(pod, conn, &traffic, client, peer, dst, service.clone()).await;
    }
    conn.set_remote_workload(traffic.workload_at(dst.ip()).map(ToString::to_string));
    let client = Prefixed::new(Bytes::new(), client);
    if pod.identities.is_some()
        && let Some(expected) = pod.mesh.identity_of(dst.ip())
    {
        // The app connected from loopback (to 15001); its address in the mesh is the pod's IP.
        let source = SocketAddr::new(std::net::IpAddr::V4(pod.ip), peer.port());
        return super::hbone_outbound::forward(pod, conn, client, source, dst, expected).await;
    }
    let upstream = match connect_from_pod(pod, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            set_reset_on_close(client.get_ref());
            return Err(err);
        }
    };
    let _ = client.get_ref().set_nodelay(true);
    let (pod_sent, pod_received) = conn.meters();
    let (sent, received) = relay_tcp(client, upstream, pod.capture.kernel_relay(), &pod_sent, &pod_received)
        .await
        .map_err(|source| ProxyError::Connect { dst, source })?;
    Ok(Some((dst, sent, received)))
}

/// A connection to a service's cluster IP: HTTP is served request by request (routes, load
/// balancing, retries); anything else goes whole to one endpoint the balancer picks.
#[allow(clippy::too_many_arguments, reason = "one connection's context, used once")]
async fn to_service(
    pod: &Arc<PodContext>,
    conn: &Tracked,
    traffic: &Traffic,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    service: Arc<ServiceEntry>,
) -> Result<Option<(SocketAddr, u64, u64)>, ProxyError> {
    let Some(port) = service.port(dst.port()).cloned() else {
        reset(client);
        return Err(ProxyError::Tunnel(format!("service {} has no port {}", service.key, dst.port())));
    };
    let (protocol, client) = detect(client, traffic.outbound_parsing(&service, &port))
        .await
        .map_err(|source| ProxyError::Connect { dst, source })?;
    let _ = client.get_ref().set_nodelay(true);
    conn.set_protocol(protocol);
    if protocol.is_http() {
        tracing::debug!(service = %service.key, port = port.port, ?protocol, "serving HTTP to a service");
        let (pod_sent, pod_received) = conn.meters();
        let client = Metered::new(client, pod_sent, pod_received);
        http::outbound::serve(pod.clone(), client, protocol, service, port.port).await;
        return Ok(Some((dst, 0, 0)));
    }
    let balancer = pod.mesh.balancers.get(&service.key);
    let endpoints = service.endpoints(port.port);
    let Some(_slot) = balancer.admit_connection(&service.resilience) else {
        conn.set_flags("UO");
        set_reset_on_close(client.get_ref());
        return Err(ProxyError::Tunnel(format!("{}: too many connections (circuit breaker)", service.key)));
    };
    let picked =
        balancer.pick(endpoints, &service.resilience, (fastrand::u32(..), fastrand::u32(..)), Instant::now());
    let Some((endpoint, _in_flight)) = picked else {
        conn.set_flags("UH");
        set_reset_on_close(client.get_ref());
        return Err(ProxyError::Tunnel(format!(
            "service {} port {} has no endpoints",
            service.key, port.port
        )));
    };
    tracing::debug!(service = %service.key, endpoint = %endpoint.addr, "connection to a service");
    conn.set_destination(endpoint.addr);
    conn.set_remote_workload(Some(endpoint.workload.clone()));
    let source = SocketAddr::new(std::net::IpAddr::V4(pod.ip), peer.port());
    let result = match (&endpoint.identity, pod.identities.is_some()) {
        (Some(identity), true) => {
            super::hbone_outbound::forward(pod, conn, client, source, endpoint.addr, identity.clone()).await
        }
        _ => match connect_from_pod(pod, endpoint.addr).await {
            Ok(upstream) => {
                let (pod_sent, pod_received) = conn.meters();
                relay_tcp(client, upstream, pod.capture.kernel_relay(), &pod_sent, &pod_received)
                    .await
                    .map(|(sent, received)| Some((endpoint.addr, sent, received)))
                    .map_err(|source| ProxyError::Connect { dst: endpoint.addr, source })
            }
            Err(err) => {
                set_reset_on_close(client.get_ref());
                Err(err)
            }
        },
    };
    let outcome = match &result {
        Err(ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::Tunnel(_)) => {
            Outcome::Failure
        }
        _ => Outcome::Success,
    };
    if let HealthChange::Ejected { for_ms } =
        balancer.report(endpoint.addr, outcome, endpoints, &service.resilience, Instant::now())
    {
        pod.outlier_ejections.inc();
        tracing::warn!(service = %service.key, endpoint = %endpoint.addr, ejected_for_ms = for_ms, "endpoint ejected");
    }
    result
}
