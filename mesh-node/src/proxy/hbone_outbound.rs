//! HBONE client: carries a captured connection to a meshed destination as an HTTP/2 CONNECT
//! stream over mutual TLS to the destination pod's `:15008`.
//!
//! Tunnels are pooled per (destination identity, destination address) inside each source pod's
//! context, so every tunnel leaves from its source pod's netns (the destination sees the pod's
//! IP) and carries only that pod's streams, multiplexed.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, StatusCode};
use mesh_api::SpiffeId;
use mesh_ebpf_common::HBONE_PORT;
use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::{net::TcpStream, sync::Mutex};
use tokio_rustls::TlsConnector;

use super::{
    ProxyError, connect_from_pod,
    hbone::{
        CERT_WAIT, CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, MAX_STREAMS_PER_TUNNEL,
        STREAM_WINDOW,
    },
    hbone_stream::{HboneStream, relay_hbone},
    protocol::Prefixed,
    set_reset_on_close,
    trace_context::TraceContext,
};
use crate::{connections::Tracked, identity::WorkloadCert, pod::PodContext, tls};

type Sender = SendRequest<Bytes>;

/// An open tunnel and how many streams it carries now.
#[derive(Debug, Clone)]
struct Tunnel {
    sender: Sender,
    /// Set when the connection has ended (its task returned).
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    /// Serial of the source pod's certificate the tunnel was authenticated with.
    opened_with: String,
    /// When either side's certificate expires.
    expires: OffsetDateTime,
}

impl Tunnel {
    /// A tunnel takes new streams only while it is open and authenticated with the pod's
    /// current, unexpired certificate. Once the certificate rotates (or either side's expires),
    /// new streams go to a fresh tunnel and this one closes when its last stream ends.
    fn usable_for(&self, own: &WorkloadCert, now: OffsetDateTime) -> bool {
        !self.closed.load(Ordering::Acquire) && self.opened_with == own.serial && now < self.expires
    }
}

/// Holds a stream slot on a tunnel until the stream ends.
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<AtomicUsize>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One source pod's open tunnels: every tunnel to a destination is kept and reused while it
/// carries fewer than [`MAX_STREAMS_PER_TUNNEL`] streams; a new one opens when all are full.
///
/// Concurrent streams are also spread over up to [`TunnelPool::spread`] tunnels per destination
/// (one per runtime worker): a tunnel's TLS and HTTP/2 framing run on one task, so busy streams
/// sharing a single tunnel would be bound to one core while the others idle.
#[derive(Debug)]
pub struct TunnelPool {
    tunnels: Mutex<HashMap<(SpiffeId, IpAddr), Vec<Tunnel>>>,
    spread: usize,
    /// Whether tunnels are pooled. Off only to measure tunnel setup (`cargo xtask bench`): each
    /// stream then gets a fresh tunnel of its own, which closes when the stream ends.
    reuse: bool,
}

impl TunnelPool {
    /// Returns an empty pool; `reuse` false opens a tunnel per stream (see the field).
    pub fn new(reuse: bool) -> Self {
        let spread = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_SPREAD);
        TunnelPool { tunnels: Mutex::default(), spread, reuse }
    }

    /// Returns a tunnel to `ip` (expected to be `peer`) with a stream slot reserved on it,
    /// opening a tunnel if every open one is full.
    async fn get(
        &self,
        pod: &PodContext,
        own: &WorkloadCert,
        peer: &SpiffeId,
        ip: IpAddr,
    ) -> Result<(Sender, StreamSlot), ProxyError> {
        if !self.reuse {
            // Never pooled: once the stream's sender is dropped, h2 closes the connection when
            // its last (only) stream ends.
            let tunnel = open_tunnel(pod, own, peer, ip).await?;
            tunnel.streams.fetch_add(1, Ordering::AcqRel);
            return Ok((tunnel.sender, StreamSlot { streams: tunnel.streams }));
        }
        let mut tunnels = self.tunnels.lock().await;
        let open = tunnels.entry((peer.clone(), ip)).or_default();
        let now = OffsetDateTime::now_utc();
        open.retain(|t| t.usable_for(own, now));
        let streams: Vec<usize> = open.iter().map(|t| t.streams.load(Ordering::Acquire)).collect();
        let tunnel = match pick(&streams, self.spread) {
            Some(index) => open[index].clone(),
            None => {
                let tunnel = open_tunnel(pod, own, peer, ip).await?;
                open.push(tunnel.clone());
                tunnel
            }
        };
        tunnel.streams.fetch_add(1, Ordering::AcqRel);
        Ok((tunnel.sender, StreamSlot { streams: tunnel.streams }))
    }
}

/// Tunnels per destination that concurrent streams are spread over, at most.
const MAX_SPREAD: usize = 4;

/// Which open tunnel (by index) a new stream should take, given each one's current streams: the
/// least busy, unless it already carries a stream while fewer than `spread` are open, or every
/// tunnel is full; `None` means open another.
fn pick(streams: &[usize], spread: usize) -> Option<usize> {
    let (index, &least) = streams.iter().enumerate().min_by_key(|(_, n)| **n)?;
    let spreading = least > 0 && streams.len() < spread;
    (!spreading && least < MAX_STREAMS_PER_TUNNEL as usize).then_some(index)
}

async fn open_tunnel(
    pod: &PodContext,
    own: &WorkloadCert,
    peer: &SpiffeId,
    ip: IpAddr,
) -> Result<Tunnel, ProxyError> {
    let dst = SocketAddr::new(ip, HBONE_PORT);
    let tcp = connect_from_pod(pod, dst).await?;
    let config = tls::client_config(own, peer).map_err(|e| ProxyError::Tunnel(e.to_string()))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(ip.into()), tcp)
        .await
        .map_err(|e| ProxyError::Tunnel(format!("mTLS handshake with {dst} (expecting {peer}): {e}")))?;
    let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let peer_serial = peer_cert.map(tls::serial_of).unwrap_or_default();
    let expires = peer_cert.and_then(tls::not_after_of).map_or(own.not_after, |t| t.min(own.not_after));
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake(tls)
        .await
        .map_err(|e| ProxyError::Tunnel(format!("HTTP/2 handshake with {dst}: {e}")))?;
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let closed = closed.clone();
        async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "HBONE tunnel closed");
            }
            closed.store(true, Ordering::Release);
        }
    });
    tracing::info!(
        dst.addr = %dst, dst.identity = %peer, dst.serial = %peer_serial, src.identity = %own.identity,
        src.serial = %own.serial, "HBONE tunnel opened"
    );
    Ok(Tunnel { sender, closed, streams: Arc::default(), opened_with: own.serial.clone(), expires })
}

/// Forwards a captured connection to `dst` through HBONE. Returns the bytes relayed each way.
pub async fn forward(
    pod: &PodContext,
    conn: &Tracked,
    client: Prefixed<TcpStream>,
    client_addr: SocketAddr,
    dst: SocketAddr,
    peer: SpiffeId,
) -> Result<Option<(SocketAddr, u64, u64)>, ProxyError> {
    let trace = TraceContext::start();
    let (stream, _slot) = match open_stream(pod, client_addr, dst, &peer, &trace).await {
        Ok(opened) => opened,
        Err(err) => {
            set_reset_on_close(client.get_ref());
            return Err(err);
        }
    };
    tracing::info!(
        src.identity = %pod.identity, dst.identity = %peer, dst.addr = %dst, trace_id = %trace.trace_id_hex(),
        "HBONE stream opened"
    );
    let _ = client.get_ref().set_nodelay(true);
    conn.set_mtls(pod.identity.to_string(), peer.to_string());
    let (pod_sent, pod_received) = conn.meters();
    let stream = Prefixed::new(Bytes::new(), stream);
    let (sent, received) = relay_hbone(client, stream, &pod_sent, &pod_received)
        .await
        .map_err(|source| ProxyError::Connect { dst, source })?;
    Ok(Some((dst, sent, received)))
}

pub(crate) async fn open_stream(
    pod: &PodContext,
    client_addr: SocketAddr,
    dst: SocketAddr,
    peer: &SpiffeId,
    trace: &TraceContext,
) -> Result<(HboneStream, StreamSlot), ProxyError> {
    let identities = pod.identities.as_ref().ok_or_else(|| ProxyError::Tunnel("no CA configured".into()))?;
    let own =
        identities.wait_for(&pod.identity, CERT_WAIT).await.map_err(|e| ProxyError::Tunnel(e.to_string()))?;
    let (sender, slot) = pod.tunnels.get(pod, &own, peer, dst.ip()).await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(dst.to_string())
        .header("forwarded", format!("for={}", client_addr.ip()))
        .header("traceparent", trace.to_string())
        .header("baggage", &pod.baggage)
        .body(())
        .map_err(|e| ProxyError::Tunnel(e.to_string()))?;
    let failed = |e: h2::Error| ProxyError::Tunnel(format!("CONNECT {dst}: {e}"));
    // Waits while the tunnel is at the peer's concurrent-stream limit.
    let mut sender = sender.ready().await.map_err(failed)?;
    let (response, send) = sender.send_request(request, false).map_err(failed)?;
    let response = response.await.map_err(failed)?;
    if response.status() != StatusCode::OK {
        return Err(ProxyError::Tunnel(format!("CONNECT {dst} answered {}", response.status())));
    }
    Ok((HboneStream::new(send, response.into_body()), slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_streams_spread_over_tunnels_then_fill_them() {
        let full = MAX_STREAMS_PER_TUNNEL as usize;
        assert_eq!(pick(&[], 2), None, "nothing open: open one");
        assert_eq!(pick(&[0], 2), Some(0), "an idle tunnel is reused");
        assert_eq!(pick(&[1], 2), None, "a busy tunnel: spread to a second");
        assert_eq!(pick(&[1], 1), Some(0), "no spreading on one worker");
        assert_eq!(pick(&[3, 2], 2), Some(1), "the least busy of the spread");
        assert_eq!(pick(&[full, full - 1], 2), Some(1));
        assert_eq!(pick(&[full, full], 2), None, "all full: open another");
        assert_eq!(pick(&[full, 0, full], 2), Some(1));
    }
}
