//! Pooled HTTP connections from one pod to endpoints. A meshed endpoint is reached through an
//! HBONE stream (over the pod's pooled mTLS tunnel), any other in plain TCP from the pod's
//! netns; either way the endpoint sees the pod's address. HTTP/1.1 connections are kept alive
//! and reused, HTTP/2 ones multiplexed.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{Request, Response, Uri, body::Incoming};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection, capture_connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpStream;

use super::{BoxError, ProxyBody};
use crate::{
    pod::PodContext,
    proxy::{
        ProxyError, connect_from_pod, hbone_outbound::StreamSlot, hbone_stream::HboneStream,
        trace_context::TraceContext,
    },
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
    /// A connection that has carried `max_requests_per_connection` requests (0: no limit) is
    /// not reused: it closes once its last response is done and the next request opens another.
    pub async fn send(
        &self,
        mut request: Request<ProxyBody>,
        http2: bool,
        max_requests_per_connection: usize,
    ) -> Result<Response<Incoming>, BoxError> {
        let client = if http2 { &self.http2 } else { &self.http1 };
        let captured = (max_requests_per_connection > 0).then(|| capture_connection(&mut request));
        let response = client.request(request).await.map_err(|e| {
            // The legacy client wraps the interesting cause (connect refused, reset) one level down.
            let message = match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            };
            BoxError::from(message)
        })?;
        if let Some(captured) = captured
            && let Some(count) = response.extensions().get::<RequestCount>()
            && count.0.fetch_add(1, Ordering::Relaxed) + 1 >= max_requests_per_connection
            && let Some(connection) = captured.connection_metadata().as_ref()
        {
            connection.poison();
        }
        Ok(response)
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
                    Ok(UpstreamIo {
                        io: Io::Tunnel { io: TokioIo::new(stream), _slot: slot },
                        requests: RequestCount::default(),
                    })
                }
                None => Ok(UpstreamIo {
                    io: Io::Plain(TokioIo::new(connect_from_pod(&pod, dst).await?)),
                    requests: RequestCount::default(),
                }),
            }
        })
    }
}

/// A connection to an endpoint, and how many requests it has carried.
pub struct UpstreamIo {
    io: Io,
    requests: RequestCount,
}

/// An HBONE stream (holding its tunnel slot) or plain TCP.
enum Io {
    Tunnel { io: TokioIo<HboneStream>, _slot: StreamSlot },
    Plain(TokioIo<TcpStream>),
}

/// Requests sent on one pooled connection: the pool hands it to every response on that
/// connection (a connection "extra"), which is how [`Upstream::send`] counts per connection.
#[derive(Clone, Debug, Default)]
struct RequestCount(Arc<AtomicUsize>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.requests.clone())
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tunnel { io, .. } => Pin::new(io).poll_read(cx, buf),
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tunnel { io, .. } => Pin::new(io).poll_write(cx, buf),
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tunnel { io, .. } => Pin::new(io).poll_flush(cx),
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tunnel { io, .. } => Pin::new(io).poll_shutdown(cx),
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
