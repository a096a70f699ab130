//! Relays plain TCP to plain TCP (the L4 plaintext path) without copying the bytes through the
//! proxy: once a direction is busy, `splice(2)` moves them socket → pipe → socket inside the
//! kernel.
//!
//! A direction starts with a read/write copy through a small buffer, taken only while there are
//! bytes to move, so the thousands of idle or chatty connections a node holds cost neither
//! memory nor pipes (two file descriptors each); only when a read fills the buffer does the
//! direction take a pipe. Without one (the process is out of file descriptors) it goes on
//! copying, with larger reads.
//!
//! Where the kernel relay is available ([`super::kernel_relay`]), a connection still open and
//! quiet after its warm-up ([`super::warm_up`]) goes there instead; this relay carries bulk
//! transfers and is the fallback.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{
    kernel_relay::{Handover, KernelRelay},
    protocol::Prefixed,
    relay::{ChunkReader, Meter},
    warm_up::{Settled, warm_up},
};

/// Buffer of a direction before it is busy.
const BUFFER_SIZE: usize = 16 * 1024;
/// A busy direction's pipe capacity: the most one splice moves (fewer, larger moves per byte).
const PIPE_SIZE: usize = 256 * 1024;

/// Relays until both directions have ended: a half-close is passed on and the other direction
/// keeps flowing; an error in either direction ends both. Returns (a→b, b→a) byte counts.
pub async fn relay_tcp<M: Meter, N: Meter>(
    a: Prefixed<TcpStream>,
    mut b: TcpStream,
    kernel: Option<&KernelRelay>,
    a_to_b: &M,
    b_to_a: &N,
) -> io::Result<(u64, u64)> {
    let (prefix, mut a) = a.into_parts();
    b.write_all(&prefix).await?;
    a_to_b.add(prefix.len() as u64);
    let mut before = [prefix.len() as u64, 0];
    if let Some(kernel) = kernel {
        let (settled, moved) = warm_up(&a, &b, a_to_b, b_to_a).await?;
        before = [before[0] + moved[0], moved[1]];
        if settled != Settled::Idle {
            kernel.relayed_by_proxy();
        }
        match settled {
            Settled::Ended => return Ok((before[0], before[1])),
            Settled::Busy => {}
            Settled::Idle => match kernel.relay(a, b, before, a_to_b, b_to_a).await {
                Handover::Relayed(result) => return result,
                Handover::Declined(declined_a, declined_b) => (a, b) = (declined_a, declined_b),
            },
        }
    }
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    let (sent, received) = tokio::try_join!(copy(a_read, b_write, a_to_b), copy(b_read, a_write, b_to_a))?;
    Ok((sent + before[0], received + before[1]))
}

/// Copies one direction until its end, which is passed on as a half-close.
pub(super) async fn copy<M: Meter>(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    meter: &M,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut reader = ChunkReader::new(BUFFER_SIZE);
    let mut pipe = None;
    loop {
        let n = match &pipe {
            Some(pipe) => splice_chunk(from.as_ref(), to.as_ref(), pipe).await?,
            None => {
                let chunk = reader.next(&mut from).await?;
                to.write_all(&chunk).await?;
                chunk.len()
            }
        };
        if n == 0 {
            // The peer may already be gone, which is not an error here.
            let _ = to.shutdown().await;
            return Ok(total);
        }
        meter.add(n as u64);
        total += n as u64;
        if pipe.is_none() && n >= reader.size() {
            match Pipe::new() {
                Ok(busy) => pipe = Some(busy),
                Err(err) => {
                    tracing::debug!(error = %err, "no pipe for splice; copying instead");
                    reader.set_size(PIPE_SIZE);
                }
            }
        }
    }
}

/// Splices what `from` has (up to the pipe's size) into the pipe, then all of it out to `to`;
/// returns the bytes moved (0 at the end).
async fn splice_chunk(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    let n = loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE))
        {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            moved => break moved?,
        }
    };
    let mut left = n;
    while left > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            moved => left -= moved?,
        }
    }
    Ok(n)
}

/// One `splice(2)` call, never blocking (the sockets are non-blocking, and so is the pipe).
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both descriptors are open for the call (owned by the caller's sockets and pipe);
    // null offsets are required for sockets and pipes.
    let moved = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

/// A non-blocking pipe, both ends closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per call; the default (64 KiB) still works if this fails.
        // SAFETY: F_SETPIPE_SZ on a pipe we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { read, write })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::proxy::test_support::{tcp_pair, write_and_half_close};
    use bytes::Bytes;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn splices_a_busy_direction_with_prefix_half_close_and_counts() {
        let (client, proxy_a) = tcp_pair().await;
        let (proxy_b, mut server) = tcp_pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let relay = tokio::spawn({
            let (up, down) = (up.clone(), down.clone());
            let a = Prefixed::new(Bytes::from_static(b"sniffed:"), proxy_a);
            async move { relay_tcp(a, proxy_b, None, &up, &down).await }
        });
        // Several megabytes: past the first full buffer, so most of it is spliced.
        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = write_and_half_close(client, payload.clone());
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(&got[..8], b"sniffed:");
        assert!(got[8..] == payload[..], "every byte, in order");
        server.write_all(b"reply after half-close").await.expect("write back");
        drop(server);
        let mut client = writer.await.expect("writer");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("client reads reply");
        assert_eq!(reply, b"reply after half-close");
        let (sent, received) = relay.await.expect("join").expect("relay");
        assert_eq!((sent, received), (5_000_008, 22));
        assert_eq!((up.get(), down.get()), (5_000_008, 22));
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (mut client, proxy_a) = tcp_pair().await;
        let (proxy_b, server) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            let (up, down) = (Counter::default(), Counter::default());
            relay_tcp(Prefixed::new(Bytes::new(), proxy_a), proxy_b, None, &up, &down).await
        });
        socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).expect("linger");
        drop(server); // RST
        let _ = client.write_all(&[7u8; 1 << 20]).await;
        let result =
            tokio::time::timeout(std::time::Duration::from_secs(5), relay).await.expect("relay ends");
        assert!(result.expect("join").is_err(), "a reset is an error, not a clean end");
    }
}
