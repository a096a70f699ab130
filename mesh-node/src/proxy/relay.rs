//! Copies bytes both ways between two sockets, counting as it goes.

use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-direction buffer; small enough that thousands of idle connections stay cheap.
const BUFFER_SIZE: usize = 16 * 1024;

/// Relays until both directions have ended. A half-close in one direction is passed on and the
/// other keeps flowing; an error in either ends both. Returns (a→b, b→a) byte counts.
/// Works over any pair of streams: TCP sockets, or an HBONE stream on one side.
pub async fn relay<A, B>(a: A, b: B, a_to_b: &Counter, b_to_a: &Counter) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    tokio::try_join!(copy(a_read, b_write, a_to_b), copy(b_read, a_write, b_to_a))
}

async fn copy<R, W>(mut from: R, mut to: W, counter: &Counter) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
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
        counter.inc_by(n as u64);
        total += n as u64;
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
}
