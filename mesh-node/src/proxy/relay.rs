//! Copies bytes both ways between two sockets, counting as it goes.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Per-direction buffer a connection starts with; small enough that thousands of idle
/// connections stay cheap.
const BUFFER_SIZE: usize = 16 * 1024;
/// What a direction's buffer grows to once a read fills it (the stream is busy): fewer, larger
/// reads and writes per byte (syscalls, wake-ups, HTTP/2 frames and full-size TLS records).
const BULK_BUFFER_SIZE: usize = 256 * 1024;

/// Counts the bytes of one direction as they are copied (atomics only: called per chunk).
pub trait Meter: Sync {
    fn add(&self, bytes: u64);
}

impl Meter for Counter {
    fn add(&self, bytes: u64) {
        self.inc_by(bytes);
    }
}

/// Relays until both directions have ended. A half-close in one direction is passed on and the
/// other keeps flowing; an error in either ends both. Returns (a→b, b→a) byte counts.
/// Works over any pair of streams: TCP sockets, or an HBONE stream on one side.
pub async fn relay<A, B, M, N>(a: A, b: B, a_to_b: &M, b_to_a: &N) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
    M: Meter,
    N: Meter,
{
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    tokio::try_join!(copy(a_read, b_write, a_to_b), copy(b_read, a_write, b_to_a))
}

async fn copy<R, W, M>(mut from: R, mut to: W, counter: &M) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    M: Meter,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the peer may already be gone, which is not an error here.
            let _ = to.shutdown().await;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        counter.add(n as u64);
        total += n as u64;
        if n == buf.len() && buf.len() < BULK_BUFFER_SIZE {
            buf.resize(BULK_BUFFER_SIZE, 0);
        }
    }
}

/// A stream that counts what is read from it and written to it, for connections the proxy
/// serves itself (HTTP) rather than relaying: `read` counts bytes read from the peer, `write`
/// bytes written to it.
pub struct Metered<S, R, W> {
    inner: S,
    read: R,
    write: W,
}

impl<S, R, W> Metered<S, R, W> {
    pub fn new(inner: S, read: R, write: W) -> Self {
        Metered { inner, read, write }
    }
}

impl<S: AsyncRead + Unpin, R: Meter + Unpin, W: Unpin> AsyncRead for Metered<S, R, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read.add(n as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin, R: Unpin, W: Meter + Unpin> AsyncWrite for Metered<S, R, W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            self.write.add(*n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.write.add(*n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, proxy_a) = pair().await;
        let (proxy_b, mut server) = pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let relay = tokio::spawn({
            let (up, down) = (up.clone(), down.clone());
            async move { relay(proxy_a, proxy_b, &up, &down).await }
        });
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&payload).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(got, payload);
        server.write_all(b"reply after half-close").await.expect("write back");
        drop(server);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("client reads reply");
        assert_eq!(reply, b"reply after half-close");
        let (sent, received) = relay.await.expect("join").expect("relay");
        assert_eq!((sent, received), (300_000, 22));
        assert_eq!((up.get(), down.get()), (300_000, 22));
    }

    #[tokio::test]
    async fn metered_streams_count_reads_and_writes() {
        let (client, server) = pair().await;
        let (read, written) = (Counter::default(), Counter::default());
        let mut metered = Metered::new(server, read.clone(), written.clone());
        let mut client = client;
        client.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        metered.read_exact(&mut buf).await.expect("read");
        metered.write_all(b"world!").await.expect("write back");
        assert_eq!((read.get(), written.get()), (5, 6));
    }
}
