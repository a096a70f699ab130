//! Inbound: sk_lookup steers a connection for the pod's address to the pod's 15006 listener;
//! the proxy delivers it to the app from inside the pod netns, bound to the client's own
//! address, so the app sees the real client IP.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_ebpf_common::{DELIVERY_MARK, DeliveryKey};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use mesh_policy::authz::Verdict;

use super::{
    ProxyError,
    authz::{self, Caller},
    connect,
    protocol::{Prefixed, Protocol, detect},
    relay::Metered,
    reset, set_reset_on_close,
    splice::relay_tcp,
};
use crate::{
    capture::ip_addr,
    connections::{PolicyResult, Tracked},
    pod::{PodContext, lock},
};

/// Attempts at a delivery source port that does not collide with a live connection.
const PORT_ATTEMPTS: u32 = 8;

pub async fn accept_loop(pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let span = tracing::debug_span!("inbound", src = %peer);
                tokio::spawn(handle(pod.clone(), client, peer).instrument(span));
            }
            Err(err) => {
                tracing::warn!(error = %err, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Removes the live-connection entry however the connection ends.
struct LiveInbound<'a> {
    pod: &'a PodContext,
    key: (SocketAddr, SocketAddr),
}

impl Drop for LiveInbound<'_> {
    fn drop(&mut self) {
        lock(&self.pod.live_inbound).remove(&self.key);
    }
}

async fn handle(pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
    let _active = pod.inbound.open();
    // Listed, counted and logged (once, when it closes) through `conn`.
    let conn = pod.inbound.track(peer);
    let result = tokio::select! {
        r = deliver_and_relay(&pod, &conn, client, peer) => r,
        () = pod.withdrawn.cancelled() => Ok(None),
    };
    if let Err(err) = result {
        pod.inbound.failed.inc();
        conn.fail(&err);
    }
}

async fn deliver_and_relay(
    pod: &Arc<PodContext>,
    conn: &Tracked,
    client: TcpStream,
    peer: SocketAddr,
) -> Result<Option<(SocketAddr, u64, u64)>, ProxyError> {
    let orig = match client.local_addr() {
        Ok(addr) => addr,
        Err(source) => return Err(ProxyError::Socket(source)),
    };
    conn.set_destination(orig);
    if lock(&pod.deliveries_in_flight).contains(&peer) {
        reset(client);
        return Err(ProxyError::Loop { peer });
    }
    // With a mesh CA, meshed peers arrive through HBONE (:15008); what reaches this listener
    // is plaintext from outside the mesh, which a STRICT pod refuses.
    if authz::refuses_plaintext(pod.identities.is_some(), pod.mtls_mode) {
        reset(client);
        return Err(ProxyError::PlaintextRefused { peer });
    }
    let _live = {
        let key = (peer, orig);
        lock(&pod.live_inbound).insert(key);
        LiveInbound { pod, key }
    };
    // Plaintext: the caller proves no identity, so only address-based rules can match it.
    let traffic = pod.mesh.traffic();
    let caller = Caller::new(&traffic, peer.ip(), None);
    conn.set_remote_workload(caller.workload.clone());
    if let Some(service) = traffic.service_serving(orig.ip(), orig.port()) {
        conn.set_service(service);
    }
    let parsing = authz::inbound_parsing(&traffic, authz::Workload::of(pod), orig.port());
    let _ = client.set_nodelay(true);
    let (protocol, client) = match parsing {
        Some(declared) => {
            detect(client, declared).await.map_err(|source| ProxyError::Connect { dst: orig, source })?
        }
        None => (Protocol::Tcp, Prefixed::new(bytes::Bytes::new(), client)),
    };
    conn.set_protocol(protocol);
    if protocol.is_http() {
        // Every request is decided on its own (a denied one gets 403, L4 rules included).
        conn.set_policy(PolicyResult::PerRequest);
        let (pod_sent, pod_received) = conn.meters();
        let client = Metered::new(client, pod_received, pod_sent);
        super::http::inbound::serve(pod.clone(), client, protocol, caller, orig, false).await;
        return Ok(None);
    }
    let decision = authz::check_connection(pod, &traffic, &caller, orig.port(), false);
    authz::log_decision(&decision, &caller, pod, orig.port(), "connection");
    conn.set_policy(if decision.verdict == Verdict::Deny { PolicyResult::Deny } else { PolicyResult::Allow });
    if decision.verdict == Verdict::Deny {
        pod.denied_connections.inc();
        set_reset_on_close(client.get_ref());
        return Err(ProxyError::Denied(decision.reason));
    }
    let app = deliver(pod, peer, orig).await?;
    let (pod_sent, pod_received) = conn.meters();
    let relayed = tokio::select! {
        relayed = relay_tcp(client, app, pod.capture.kernel_relay(), &pod_received, &pod_sent) => relayed,
        decision = authz::until_revoked(pod, &caller, orig.port()) => {
            pod.denied_connections.inc();
            // The relay future (owning the sockets) is dropped here: the client sees a close.
            return Err(ProxyError::Denied(format!("revoked by a policy change: {}", decision.reason)));
        }
    };
    let (received, sent) = relayed.map_err(|source| ProxyError::Connect { dst: orig, source })?;
    Ok(Some((orig, received, sent)))
}

/// Connects to the app at `orig` from the client's address, inside the pod netns.
pub(super) async fn deliver(
    pod: &PodContext,
    client: SocketAddr,
    orig: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    let client_ip = client.ip();
    for _ in 0..PORT_ATTEMPTS {
        let socket = pod
            .worker
            .run(move || -> std::io::Result<socket2::Socket> {
                let s =
                    socket2::Socket::new(socket2::Domain::for_address(orig), socket2::Type::STREAM, None)?;
                s.set_ip_transparent_v4(true)?;
                s.set_mark(DELIVERY_MARK)?;
                s.bind(&SocketAddr::new(client_ip, 0).into())?;
                Ok(s)
            })
            .await?
            .map_err(ProxyError::Socket)?;
        let Some(source) = socket.local_addr().map_err(ProxyError::Socket)?.as_socket() else {
            return Err(ProxyError::Socket(std::io::ErrorKind::AddrNotAvailable.into()));
        };
        if lock(&pod.live_inbound).contains(&(source, orig)) {
            // The kernel picked the port of a live captured connection from the same client to
            // the same destination: the app could not tell the two apart.
            continue;
        }
        let key = DeliveryKey {
            remote: ip_addr(source.ip()),
            local: ip_addr(orig.ip()),
            remote_port: source.port(),
            local_port: orig.port(),
            _pad: 0,
        };
        pod.capture.allow_delivery(key)?;
        lock(&pod.deliveries_in_flight).insert(source);
        let result = connect(socket, orig).await;
        // The SYN has passed sk_lookup (or the connect failed): the entries are done.
        pod.capture.forget_delivery(&key);
        lock(&pod.deliveries_in_flight).remove(&source);
        return result;
    }
    Err(ProxyError::NoFreePort)
}
