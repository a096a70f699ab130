//! What the relays share: reading a socket chunk by chunk ([`ChunkReader`]), counting the bytes
//! a connection carries ([`Meter`]), and [`Metered`] streams for connections the proxy serves
//! itself.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::tcp::ReadHalf,
};

/// Reads one direction of a relayed socket in chunks, holding a buffer only while there are
/// bytes to move: most of a node's connections are idle most of the time.
pub struct ChunkReader {
    size: usize,
    /// What is left of the last allocation while the socket stays busy.
    spare: BytesMut,
}

impl ChunkReader {
    /// Reads at most `size` bytes at a time.
    pub fn new(size: usize) -> Self {
        ChunkReader { size, spare: BytesMut::new() }
    }

    /// The most one read takes; a chunk this long means the socket is busy.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn set_size(&mut self, size: usize) {
        self.size = size;
    }

    /// The next chunk the socket has (empty at its end), waiting for it without a buffer.
    pub async fn next(&mut self, socket: &mut ReadHalf<'_>) -> io::Result<Bytes> {
        socket.as_ref().readable().await?;
        self.spare.reserve(self.size);
        // `read_buf` (not `try_read_buf`): a short read tells tokio the socket is drained, which
        // saves a system call per chunk of request/response traffic.
        let n = socket.read_buf(&mut self.spare).await?;
        let chunk = self.spare.split().freeze();
        if n < self.size {
            // Drained: the allocation goes with the chunk once it has been written on.
            self.spare = BytesMut::new();
        }
        Ok(chunk)
    }
}

/// Counts the bytes of one direction as they are copied (atomics only: called per chunk).
pub trait Meter: Sync {
    fn add(&self, bytes: u64);
}

impl Meter for Counter {
    fn add(&self, bytes: u64) {
        self.inc_by(bytes);
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
    use crate::proxy::test_support::tcp_pair;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn metered_streams_count_reads_and_writes() {
        let (client, server) = tcp_pair().await;
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
