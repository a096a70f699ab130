//! The shared node proxy's plaintext paths: outbound (15001) and inbound (15006) per pod.

pub mod authz;
pub mod balancer;
pub mod hangup;
pub mod hbone;
pub mod hbone_inbound;
pub mod hbone_outbound;
pub mod hbone_stream;
pub mod http;
pub mod inbound;
pub mod kernel_relay;
pub mod outbound;
pub mod protocol;
pub mod relay;
pub mod splice;
pub mod trace_context;
pub mod warm_up;

use std::{io, net::SocketAddr, time::Duration};

/// How long the proxy waits for a TCP connect before failing the captured connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no original destination recorded for this connection (not captured by nodemesh)")]
    NoOriginalDestination,
    #[error("cannot create a socket in the pod's network namespace: {0}")]
    Socket(#[source] io::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("connect to {dst} failed: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("connect to {dst} timed out after {timeout:?}")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error("refusing a connection from {peer}: it is one of the proxy's own deliveries (capture loop)")]
    Loop { peer: SocketAddr },
    #[error("cannot find a delivery source port that does not collide with a live connection")]
    NoFreePort,
    #[error("plaintext from {peer} refused: the pod is STRICT (mutual TLS only)")]
    PlaintextRefused { peer: SocketAddr },
    #[error("denied by authorization policy: {0}")]
    Denied(String),
    #[error("HBONE: {0}")]
    Tunnel(String),
    #[error("cannot register the delivery with sk_lookup: {0}")]
    Capture(#[from] crate::capture::CaptureError),
}

/// Closes a captured connection with a reset, so the app sees a failure, not an empty reply.
pub fn reset(stream: tokio::net::TcpStream) {
    set_reset_on_close(&stream);
}

/// Makes closing the connection send a reset (used where the stream is owned elsewhere).
pub fn set_reset_on_close(stream: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Connects to `dst` from inside the pod's netns (the destination sees the pod's address), with
/// the proxy's mark so the capture programs leave the connection alone.
pub async fn connect_from_pod(
    pod: &crate::pod::PodContext,
    dst: SocketAddr,
) -> Result<tokio::net::TcpStream, ProxyError> {
    let socket = pod
        .worker
        .run(move || -> io::Result<socket2::Socket> {
            let s = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, None)?;
            s.set_mark(mesh_ebpf_common::PROXY_MARK)?;
            Ok(s)
        })
        .await?
        .map_err(ProxyError::Socket)?;
    connect(socket, dst).await
}

/// Connects a socket that was created (in some pod's netns) and configured already.
pub async fn connect(socket: socket2::Socket, dst: SocketAddr) -> Result<tokio::net::TcpStream, ProxyError> {
    socket.set_nonblocking(true).map_err(ProxyError::Socket)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => Err(ProxyError::Connect { dst, source }),
        Err(_) => Err(ProxyError::ConnectTimeout { dst, timeout: CONNECT_TIMEOUT }),
    }
}

/// Helpers the proxy's unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use tokio::{
        io::AsyncWriteExt,
        net::{TcpListener, TcpStream},
        task::JoinHandle,
    };

    /// Two connected loopback sockets.
    pub async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    /// Writes `payload` and half-closes, on a task of its own; gives the socket back.
    pub fn write_and_half_close(mut socket: TcpStream, payload: Vec<u8>) -> JoinHandle<TcpStream> {
        tokio::spawn(async move {
            socket.write_all(&payload).await.expect("write");
            socket.shutdown().await.expect("half-close");
            socket
        })
    }
}
