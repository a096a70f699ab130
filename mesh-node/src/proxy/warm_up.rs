//! The first moments of a plain TCP connection, relayed by the proxy before the kernel relay
//! ([`super::kernel_relay`]) may take it. Most connections are short (a request, a response,
//! closed), and handing one to the kernel costs more system calls than relaying it whole; one
//! still open after [`WARM_UP`] is worth it. A connection that moves a lot meanwhile is a bulk
//! transfer, which the splice relay moves faster than the kernel relay's work item.
//!
//! The loop waits on readiness only and reads only what it can write before reading again, so
//! it can stop between any two steps with nothing in flight.

use std::{io, ops::Range, os::fd::AsFd, time::Duration};

use tokio::net::TcpStream;

use super::relay::Meter;

/// How long a connection is relayed by the proxy before it may go to the kernel.
pub const WARM_UP: Duration = Duration::from_millis(20);
/// Bytes moved during the warm-up past which a connection counts as a bulk transfer.
const BULK: u64 = 1024 * 1024;
/// Read size of each direction.
const BUFFER_SIZE: usize = 16 * 1024;

/// How the warm-up ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// Both directions ended (the connection is over).
    Ended,
    /// Open and quiet: nothing in flight, nothing unread. The kernel may take it.
    Idle,
    /// A bulk transfer, or a direction already half-closed: the splice relay carries on.
    Busy,
}

/// One direction's bytes between a read and its write. The buffer is taken at the first read:
/// a connection that never sends in its warm-up costs none.
struct Flow {
    buffer: Vec<u8>,
    pending: Range<usize>,
    ended: bool,
    moved: u64,
}

impl Flow {
    fn new() -> Self {
        Flow { buffer: Vec::new(), pending: 0..0, ended: false, moved: 0 }
    }

    fn wants_read(&self) -> bool {
        !self.ended && self.pending.is_empty()
    }

    fn wants_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reads what `from` has (an end of stream is passed on as a half-close), then writes as
    /// much of it as `to` takes.
    fn read<M: Meter>(&mut self, from: &TcpStream, to: &TcpStream, meter: &M) -> io::Result<()> {
        if self.buffer.is_empty() {
            self.buffer = vec![0; BUFFER_SIZE];
        }
        match from.try_read(&mut self.buffer) {
            Ok(0) => {
                self.ended = true;
                super::kernel_relay::shutdown_write(to.as_fd())
            }
            Ok(n) => {
                self.pending = 0..n;
                self.write(to, meter)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn write<M: Meter>(&mut self, to: &TcpStream, meter: &M) -> io::Result<()> {
        match to.try_write(&self.buffer[self.pending.clone()]) {
            Ok(n) => {
                self.pending.start += n;
                self.moved += n as u64;
                meter.add(n as u64);
                Ok(())
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// Relays `a` ↔ `b` until the connection ends, or, after [`WARM_UP`], until it is idle or
/// shows itself a bulk transfer. Returns how it ended and the bytes moved (a→b, b→a).
pub async fn warm_up<M: Meter, N: Meter>(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &M,
    b_to_a: &N,
) -> io::Result<(Settled, [u64; 2])> {
    let (mut ab, mut ba) = (Flow::new(), Flow::new());
    let deadline = tokio::time::sleep(WARM_UP);
    tokio::pin!(deadline);
    let mut expired = false;
    loop {
        let quiet = ab.pending.is_empty() && ba.pending.is_empty();
        let moved = [ab.moved, ba.moved];
        if ab.ended && ba.ended && quiet {
            return Ok((Settled::Ended, moved));
        }
        if expired && quiet {
            if ab.ended || ba.ended || ab.moved + ba.moved > BULK {
                return Ok((Settled::Busy, moved));
            }
            let unread = |socket: &TcpStream| super::kernel_relay::unread_bytes(socket.as_fd());
            if unread(a)? == 0 && unread(b)? == 0 {
                return Ok((Settled::Idle, moved));
            }
        }
        tokio::select! {
            ready = a.readable(), if ab.wants_read() => { ready?; ab.read(a, b, a_to_b)?; }
            ready = b.writable(), if ab.wants_write() => { ready?; ab.write(b, a_to_b)?; }
            ready = b.readable(), if ba.wants_read() => { ready?; ba.read(b, a, b_to_a)?; }
            ready = a.writable(), if ba.wants_write() => { ready?; ba.write(a, b_to_a)?; }
            () = &mut deadline, if !expired => expired = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::test_support::tcp_pair;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn a_short_exchange_ends_in_the_warm_up_and_a_quiet_one_settles_idle() {
        let (mut client, proxy_a) = tcp_pair().await;
        let (proxy_b, mut server) = tcp_pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let relay = tokio::spawn({
            let (up, down) = (up.clone(), down.clone());
            async move { warm_up(&proxy_a, &proxy_b, &up, &down).await.map(|(s, m)| (s, m, proxy_a, proxy_b)) }
        });
        client.write_all(b"request").await.expect("write");
        let mut request = [0u8; 7];
        server.read_exact(&mut request).await.expect("read");
        server.write_all(b"response!").await.expect("write back");
        let mut response = [0u8; 9];
        client.read_exact(&mut response).await.expect("read back");
        assert_eq!((&request, &response), (b"request", b"response!"));
        let (settled, moved, _a, _b) = relay.await.expect("join").expect("warm-up");
        assert_eq!((settled, moved), (Settled::Idle, [7, 9]), "open and quiet after the warm-up");
        assert_eq!((up.get(), down.get()), (7, 9));

        let (mut client, proxy_a) = tcp_pair().await;
        let (proxy_b, mut server) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            let (up, down) = (Counter::default(), Counter::default());
            warm_up(&proxy_a, &proxy_b, &up, &down).await
        });
        client.write_all(b"bye").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read to the end");
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("end");
        let (settled, moved) = relay.await.expect("join").expect("warm-up");
        assert_eq!((got.as_slice(), settled, moved), (&b"bye"[..], Settled::Ended, [3, 0]));
    }
}
