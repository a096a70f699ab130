//! Counting the bytes a connection carries: the relays' [`Meter`], and [`Metered`] streams for
//! connections the proxy serves itself.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
