//! Outbound: a pod's connection captured by connect4/6 arrives on the pod's 15001 listener and
//! is carried to its original destination from inside the pod's netns (source IP preserved).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::{ProxyError, connect_from_pod, relay::relay, reset};
use crate::pod::PodContext;

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
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = forward(&pod, client, peer) => r,
        () = pod.withdrawn.cancelled() => Ok(None),
    };
    match result {
        Ok(Some((dst, sent, received))) => tracing::debug!(
            dst.addr = %dst, bytes.sent = sent, bytes.received = received,
            duration_ms = started.elapsed().as_millis() as u64, "outbound connection closed"
        ),
        Ok(None) => tracing::debug!("outbound connection closed: pod withdrawn"),
        Err(err) => {
            pod.outbound.failed.inc();
            tracing::warn!(error = %err, "outbound connection failed");
        }
    }
}

/// Returns the original destination and the bytes relayed each way.
async fn forward(
    pod: &PodContext,
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
    if pod.identities.is_some()
        && let Some(expected) = pod.mesh.identity_of(dst.ip())
    {
        // The app connected from loopback (to 15001); its address in the mesh is the pod's IP.
        let source = SocketAddr::new(std::net::IpAddr::V4(pod.ip), peer.port());
        return super::hbone_outbound::forward(pod, client, source, dst, expected).await;
    }
    let upstream = match connect_from_pod(pod, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            reset(client);
            return Err(err);
        }
    };
    let _ = client.set_nodelay(true);
    let (sent, received) = relay(client, upstream, &pod.outbound.bytes_sent, &pod.outbound.bytes_received)
        .await
        .map_err(|source| ProxyError::Connect { dst, source })?;
    Ok(Some((dst, sent, received)))
}
