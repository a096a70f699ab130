//! Pooled HTTP connections from one pod to endpoints. A meshed endpoint is reached through an
//! HBONE stream (over the pod's pooled mTLS tunnel), any other in plain TCP from the pod's
//! netns; either way the endpoint sees the pod's address. HTTP/1.1 connections are kept alive
//! and reused, HTTP/2 ones multiplexed.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Weak,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{Request, Response, Uri, body::Incoming};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpStream;

use super::{BoxError, ProxyBody};
use crate::{
    pod::PodContext,
    proxy::{ProxyError, connect_from_pod, hbone_outbound::StreamSlot, trace_context::TraceContext},
};

/// Idle pooled connections are closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One pod's HTTP clients.
#[derive(Clone)]
pub struct Upstream {
    http1: Client<PodConnector, ProxyBody>,
    http2: Client<PodConnector, ProxyBody>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

impl Upstream {
    pub fn new(pod: Weak<PodContext>) -> Self {
        let connector = PodConnector { pod };
        let mut http1 = Client::builder(TokioExecutor::new());
        http1.pool_idle_timeout(POOL_IDLE_TIMEOUT).set_host(false);
        let mut http2 = Client::builder(TokioExecutor::new());
        http2.pool_idle_timeout(POOL_IDLE_TIMEOUT).http2_only(true).set_host(false);
        Upstream { http1: http1.build(connector.clone()), http2: http2.build(connector) }
    }

    /// Sends `request` (its URI names the endpoint: `http://ip:port/path`) in HTTP/2 or 1.1.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Incoming>, BoxError> {
        let client = if http2 { &self.http2 } else { &self.http1 };
        client.request(request).await.map_err(|e| {
            // The legacy client wraps the interesting cause (connect refused, reset) one level down.
            let message = match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            };
            BoxError::from(message)
        })
    }
}

/// Opens connections to endpoints for one pod.
#[derive(Clone)]
struct PodConnector {
    pod: Weak<PodContext>,
}

impl tower_service::Service<Uri> for PodConnector {
    type Response = UpstreamIo;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let pod = self.pod.clone();
        Box::pin(async move {
            let pod = pod.upgrade().ok_or_else(|| ProxyError::Tunnel("the pod was withdrawn".into()))?;
            let dst: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| ProxyError::Tunnel(format!("endpoint URI {uri} has no address")))?;
            match pod.mesh.identity_of(dst.ip()) {
                Some(peer) => {
                    let source = SocketAddr::new(std::net::IpAddr::V4(pod.ip), 0);
                    let (stream, slot) = crate::proxy::hbone_outbound::open_stream(
                        &pod,
                        source,
                        dst,
                        &peer,
                        &TraceContext::start(),
                    )
                    .await?;
                    Ok(UpstreamIo::Tunnel { io: stream.into_inner(), _slot: slot })
                }
                None => Ok(UpstreamIo::Plain(TokioIo::new(connect_from_pod(&pod, dst).await?))),
            }
        })
    }
}

/// A connection to an endpoint: an HBONE stream (holding its tunnel slot) or plain TCP.
pub enum UpstreamIo {
    Tunnel { io: hyper::upgrade::Upgraded, _slot: StreamSlot },
    Plain(TokioIo<TcpStream>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tunnel { io, .. } => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tunnel { io, .. } => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tunnel { io, .. } => Pin::new(io).poll_flush(cx),
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tunnel { io, .. } => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
