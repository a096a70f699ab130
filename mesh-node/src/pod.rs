//! One enrolled pod: its netns worker, its capture listeners, its counters.

pub mod routing;

use std::{
    collections::HashSet,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use mesh_api::SpiffeId;
use mesh_ebpf_common::{HBONE_PORT, INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT};
use mesh_manifests::{EnrolledPodSpec, MtlsMode};
use serde::Serialize;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    capture::{Capture, CaptureError, LinkName},
    identity::IdentityManager,
    mesh::MeshDirectory,
    metrics::{Direction, Metrics, TrafficCounters, TrafficSnapshot},
    netns::{NetnsError, NetnsWorker, netns_cookie},
    proxy::{self, hbone_outbound::TunnelPool},
};

/// Backlog of the capture listeners: a burst of connects from a pod must not be refused.
const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot open the capture listener {addr} in the pod netns: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot read the pod's netns cookie: {0}")]
    Cookie(#[source] io::Error),
    #[error("cannot open a netlink socket in the pod netns: {0}")]
    Netlink(#[source] io::Error),
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("the pod has no valid workload identity: {0}")]
    Identity(#[from] mesh_api::IdentityError),
}

/// What the proxy tasks of one pod share.
#[derive(Debug)]
pub struct PodContext {
    pub key: mesh_manifests::PodKey,
    pub ip: Ipv4Addr,
    pub identity: SpiffeId,
    pub mtls_mode: MtlsMode,
    pub netns_cookie: u64,
    pub worker: NetnsWorker,
    pub capture: Arc<Capture>,
    pub outbound: TrafficCounters,
    pub inbound: TrafficCounters,
    /// Source addresses of the proxy's in-flight delivery connects into this pod.
    pub deliveries_in_flight: Mutex<HashSet<SocketAddr>>,
    /// (client, original destination) of live captured inbound connections: a delivery must
    /// not reuse such a 4-tuple.
    pub live_inbound: Mutex<HashSet<(SocketAddr, SocketAddr)>>,
    /// Cancelled when the pod is withdrawn: its proxied connections end.
    pub withdrawn: CancellationToken,
    /// Workload certificates; `None` without a CA (then traffic stays plain TCP).
    pub identities: Option<Arc<IdentityManager>>,
    pub mesh: Arc<MeshDirectory>,
    /// This pod's HBONE tunnels to meshed destinations.
    pub tunnels: TunnelPool,
    /// Who this pod is, sent as `baggage` on its HBONE streams.
    pub baggage: String,
    /// This pod's pooled HTTP connections to endpoints (L7 outbound).
    pub upstream: proxy::http::upstream::Upstream,
    /// Istio-standard request metrics (shared by the node).
    pub requests: proxy::http::telemetry::RequestMetrics,
    /// Endpoints ejected by this pod's requests (outlier detection).
    pub outlier_ejections: prometheus_client::metrics::counter::Counter,
    /// Connections and HTTP requests refused by authorization policy.
    pub denied_connections: prometheus_client::metrics::counter::Counter,
    pub denied_requests: prometheus_client::metrics::counter::Counter,
}

/// What a pod's runtime needs from its node.
#[derive(Clone, Debug)]
pub struct NodeServices {
    pub capture: Arc<Capture>,
    pub identities: Option<Arc<IdentityManager>>,
    pub mesh: Arc<MeshDirectory>,
    pub trust_domain: String,
    /// Whether HBONE tunnels are pooled (`--hbone-tunnel-reuse`).
    pub tunnel_reuse: bool,
}

/// Locks a set shared by proxy tasks; a panic elsewhere cannot leave a set half-updated.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An enrolled pod with its listeners running.
#[derive(Debug)]
pub struct PodRuntime {
    pub spec: EnrolledPodSpec,
    pub ctx: Arc<PodContext>,
    netlink: rtnetlink::Handle,
    accept_loops: Vec<JoinHandle<()>>,
}

/// The state of one pod, for the admin endpoint.
#[derive(Debug, Serialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub netns_cookie: u64,
    pub service_account: String,
    pub outbound: TrafficSnapshot,
    pub inbound: TrafficSnapshot,
}

fn listen(addr: SocketAddr) -> Result<std::net::TcpListener, PodError> {
    let err = |source| PodError::Listen { addr, source };
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

type NetlinkConnection = rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>;

/// What the pod's netns worker opens for a new pod.
struct PodSockets {
    outbound: std::net::TcpListener,
    inbound: std::net::TcpListener,
    hbone: Option<std::net::TcpListener>,
    cookie: u64,
    netlink: (NetlinkConnection, rtnetlink::Handle),
}

impl PodRuntime {
    /// Enrols a pod: opens its listeners inside its netns, sets up delivery routing, puts it
    /// into the capture maps and attaches sk_lookup, then starts accepting.
    pub async fn start(
        spec: EnrolledPodSpec,
        index: u32,
        services: &NodeServices,
        metrics: &Metrics,
    ) -> Result<Self, PodError> {
        let identity = SpiffeId::new(&services.trust_domain, &spec.key.namespace, &spec.service_account)?;
        let capture = services.capture.clone();
        let worker = NetnsWorker::spawn(&spec.netns, &spec.key.name)?;
        let runtime = tokio::runtime::Handle::current();
        let with_hbone = services.identities.is_some();
        let sockets = worker
            .run(move || -> Result<PodSockets, PodError> {
                let outbound = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_CAPTURE_PORT)))?;
                let inbound = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, INBOUND_CAPTURE_PORT)))?;
                let hbone = if with_hbone {
                    Some(listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)))?)
                } else {
                    None
                };
                let cookie = netns_cookie(&outbound).map_err(PodError::Cookie)?;
                routing::enable_mark_inheritance()?;
                // The netlink socket is created here, in the pod netns, and registered with the
                // main runtime so it can be driven from there.
                let _entered = runtime.enter();
                let (connection, handle, _) = rtnetlink::new_connection().map_err(PodError::Netlink)?;
                Ok(PodSockets { outbound, inbound, hbone, cookie, netlink: (connection, handle) })
            })
            .await??;
        let (connection, netlink) = sockets.netlink;
        tokio::spawn(connection);
        routing::install(&netlink).await?;
        if let Err(err) = capture.enrol(
            &LinkName::pod(&spec.key.namespace, &spec.key.name),
            &spec.netns,
            sockets.cookie,
            spec.ip,
            &sockets.inbound,
            index,
        ) {
            let _ = routing::remove(&netlink).await;
            return Err(err.into());
        }

        let ctx = Arc::new_cyclic(|weak| PodContext {
            key: spec.key.clone(),
            upstream: proxy::http::upstream::Upstream::new(weak.clone()),
            requests: metrics.requests.clone(),
            outlier_ejections: metrics.outlier_ejections.clone(),
            denied_connections: metrics.denied("connection"),
            denied_requests: metrics.denied("request"),
            ip: spec.ip,
            identity,
            mtls_mode: spec.mtls_mode,
            identities: services.identities.clone(),
            mesh: services.mesh.clone(),
            tunnels: TunnelPool::new(services.tunnel_reuse),
            baggage: crate::proxy::trace_context::baggage(&spec.key.namespace, &spec.key.name, &spec.node),
            netns_cookie: sockets.cookie,
            worker,
            capture,
            outbound: metrics.traffic(&spec.key.namespace, &spec.key.name, Direction::Outbound),
            inbound: metrics.traffic(&spec.key.namespace, &spec.key.name, Direction::Inbound),
            deliveries_in_flight: Mutex::new(HashSet::new()),
            live_inbound: Mutex::new(HashSet::new()),
            withdrawn: CancellationToken::new(),
        });
        let span = tracing::info_span!("pod", pod = %spec.key);
        let outbound = TcpListener::from_std(sockets.outbound).map_err(|source| PodError::Listen {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_CAPTURE_PORT)),
            source,
        })?;
        let inbound = TcpListener::from_std(sockets.inbound).map_err(|source| PodError::Listen {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, INBOUND_CAPTURE_PORT)),
            source,
        })?;
        let mut accept_loops = vec![
            tokio::spawn(proxy::outbound::accept_loop(ctx.clone(), outbound).instrument(span.clone())),
            tokio::spawn(proxy::inbound::accept_loop(ctx.clone(), inbound).instrument(span.clone())),
        ];
        if let Some(hbone) = sockets.hbone {
            let hbone = TcpListener::from_std(hbone).map_err(|source| PodError::Listen {
                addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)),
                source,
            })?;
            accept_loops
                .push(tokio::spawn(proxy::hbone_inbound::accept_loop(ctx.clone(), hbone).instrument(span)));
        }
        tracing::info!(pod = %spec.key, ip = %spec.ip, netns = %spec.netns.display(), netns_cookie = sockets.cookie, "pod enrolled");
        Ok(PodRuntime { spec, ctx, netlink, accept_loops })
    }

    /// Withdraws the pod: capture stops first (so nothing is dropped for lack of a listener),
    /// then listeners and proxied connections close and delivery routing is removed.
    pub async fn stop(self, metrics: &Metrics) -> Result<(), PodError> {
        let key = &self.spec.key;
        let result = self.ctx.capture.withdraw(
            Some(&LinkName::pod(&key.namespace, &key.name)),
            Some(self.ctx.netns_cookie),
            Some(self.spec.ip),
        );
        for task in &self.accept_loops {
            task.abort();
        }
        self.ctx.withdrawn.cancel();
        let routing = routing::remove(&self.netlink).await;
        metrics.forget_pod(&key.namespace, &key.name);
        tracing::info!(pod = %key, "pod withdrawn");
        result?;
        routing?;
        Ok(())
    }

    pub fn status(&self) -> PodStatus {
        PodStatus {
            namespace: self.spec.key.namespace.clone(),
            name: self.spec.key.name.clone(),
            ip: self.spec.ip,
            netns: self.spec.netns.display().to_string(),
            netns_cookie: self.ctx.netns_cookie,
            service_account: self.spec.service_account.clone(),
            outbound: self.ctx.outbound.snapshot(),
            inbound: self.ctx.inbound.snapshot(),
        }
    }
}
