//! Relays an authorized plain TCP connection inside the kernel: the `relay_in_kernel` program
//! (sk_skb stream verdict) moves what each socket receives to its partner's send queue, so the
//! proxy is not woken for the connection's bytes at all, only for its ends.
//!
//! Handing a connection over is safe only at a byte boundary the kernel agrees on: the program
//! sees whole received segments, so nothing may be half-read by the proxy. A socket the proxy
//! never read is clean; one it has read from (protocol sniffing) is clean once nothing unread is
//! queued. After the hand-over the proxy only watches for ends and errors ([`super::hangup`]).
//!
//! The kernel moves bytes asynchronously (a work item per socket), so an end of stream can be
//! seen before the last bytes have left. A half-close is passed on only once the partner has
//! taken every byte the socket received (`TCP_INFO`: received on one side, written on the
//! other), or bytes would be cut off.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, SockHash};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    hangup::{self, Hangups},
    relay::Meter,
};

/// Reads of the receive queue tried to reach a clean boundary before giving the connection to
/// the user-space relay instead.
const CLEAN_ATTEMPTS: usize = 4;
/// Bytes read at most per attempt.
const CLEAN_CHUNK: usize = 64 * 1024;
/// How often byte counters of a kernel-relayed connection are brought up to date.
const METER_REFRESH: Duration = Duration::from_secs(5);
/// The longest pause between checks that a half-closed direction has drained.
const DRAIN_POLL_MAX: Duration = Duration::from_millis(20);

/// The relay maps (the program is attached to `receivers`) and this node's counts.
pub struct KernelRelay {
    receivers: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    hangups: Hangups,
    counts: RelayCounts,
}

/// Connections by how they were relayed.
#[derive(Debug, Default)]
pub struct RelayCounts {
    /// Handed to the kernel.
    pub kernel: AtomicU64,
    /// Relayed by the proxy: unread bytes kept the receive queue from a clean boundary.
    pub proxy: AtomicU64,
    /// Refused by the maps (full): relayed by the proxy, or reset when half handed over.
    pub failed: AtomicU64,
}

/// A snapshot of [`RelayCounts`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayedConnections {
    /// Open now in the kernel relay.
    pub active: u64,
    pub kernel: u64,
    pub proxy: u64,
    pub failed: u64,
}

impl KernelRelay {
    pub fn snapshot(&self) -> RelayedConnections {
        let counts = &self.counts;
        RelayedConnections {
            // Each relayed connection watches its two sockets.
            active: (self.hangups.registered() / 2) as u64,
            kernel: counts.kernel.load(Ordering::Relaxed),
            proxy: counts.proxy.load(Ordering::Relaxed),
            failed: counts.failed.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRelay").field("counts", &self.counts).finish_non_exhaustive()
    }
}

/// What [`KernelRelay::relay`] did with a connection.
pub enum Handover {
    /// The kernel relayed it to its end: (a→b, b→a) byte counts, or the error that ended it.
    Relayed(io::Result<(u64, u64)>),
    /// Not handed over (no clean boundary, or the maps are full): relay it in user space.
    Declined(TcpStream, TcpStream),
}

impl KernelRelay {
    /// Needs a tokio runtime (the hang-up watcher's task runs on it).
    pub fn new(receivers: SockHash<MapData, u64>, targets: SockHash<MapData, u64>) -> io::Result<Self> {
        Ok(KernelRelay {
            receivers: Mutex::new(receivers),
            targets: Mutex::new(targets),
            hangups: Hangups::start()?,
            counts: RelayCounts::default(),
        })
    }

    /// Relays `a` ↔ `b` in the kernel until both directions end, if the connection can be
    /// handed over. `a_read`: bytes the proxy has already read from `a` (sniffing), written to
    /// `b` and counted; then `a`'s queue must be emptied to a boundary first.
    pub async fn relay<M: Meter, N: Meter>(
        &self,
        mut a: TcpStream,
        mut b: TcpStream,
        mut a_read: u64,
        a_to_b: &M,
        b_to_a: &N,
    ) -> Handover {
        if a_read > 0 {
            match read_to_boundary(&mut a, &mut b, a_to_b).await {
                Ok(Some(read)) => a_read += read,
                Ok(None) => {
                    self.counts.proxy.fetch_add(1, Ordering::Relaxed);
                    return Handover::Declined(a, b);
                }
                Err(err) => return Handover::Relayed(Err(err)),
            }
        }
        if let Err(err) = self.hand_over(&a, &b) {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            return match err {
                HandoverError::Untouched(err) => {
                    tracing::warn!(error = %err, "kernel relay maps refused a connection; relaying it in the proxy");
                    Handover::Declined(a, b)
                }
                HandoverError::Partial(err) => {
                    reset_both(&a, &b);
                    Handover::Relayed(Err(io::Error::other(format!(
                        "kernel relay maps refused half of the connection, which is reset: {err}"
                    ))))
                }
            };
        }
        self.counts.kernel.fetch_add(1, Ordering::Relaxed);
        // Off tokio's epoll: from here on, the sockets' data must wake nobody.
        let (a, b) = match (a.into_std(), b.into_std()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(err), _) | (_, Err(err)) => return Handover::Relayed(Err(err)),
        };
        let result = self.watch_ends(a.as_fd(), b.as_fd(), a_read, a_to_b, b_to_a).await;
        if result.is_err() {
            reset_both(&a, &b);
        }
        Handover::Relayed(result)
    }

    /// Adds both sockets to the maps: targets first (no effect on their traffic), then
    /// receivers, each of which starts the kernel relaying what that socket receives.
    fn hand_over(&self, a: &TcpStream, b: &TcpStream) -> Result<(), HandoverError> {
        let (a_cookie, b_cookie) = (
            socket_cookie(a.as_fd()).map_err(HandoverError::Untouched)?,
            socket_cookie(b.as_fd()).map_err(HandoverError::Untouched)?,
        );
        {
            let mut targets = lock(&self.targets);
            targets
                .insert(a_cookie, b.as_raw_fd(), 0)
                .map_err(|e| HandoverError::Untouched(io::Error::other(e)))?;
            if let Err(err) = targets.insert(b_cookie, a.as_raw_fd(), 0) {
                let _ = targets.remove(&a_cookie);
                return Err(HandoverError::Untouched(io::Error::other(err)));
            }
        }
        {
            let mut receivers = lock(&self.receivers);
            if let Err(err) = receivers.insert(a_cookie, a.as_raw_fd(), 0) {
                let mut targets = lock(&self.targets);
                let _ = (targets.remove(&a_cookie), targets.remove(&b_cookie));
                return Err(HandoverError::Untouched(io::Error::other(err)));
            }
            receivers
                .insert(b_cookie, b.as_raw_fd(), 0)
                .map_err(|e| HandoverError::Partial(io::Error::other(e)))?;
        }
        // Bytes that arrived before the sockets joined the receivers wait in their queues until
        // the next segment; setting the low-water mark makes the kernel pass them on now.
        for socket in [a.as_fd(), b.as_fd()] {
            set_rcvlowat(socket, 1).map_err(HandoverError::Partial)?;
        }
        Ok(())
    }

    /// Waits for each direction's end, passes it on once drained, and returns the byte counts.
    /// `a_counted`: bytes from `a` already counted (read by the proxy).
    async fn watch_ends<M: Meter, N: Meter>(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        a_counted: u64,
        a_to_b: &M,
        b_to_a: &N,
    ) -> io::Result<(u64, u64)> {
        let mut ab =
            Direction { from: a, to: b, watch: self.hangups.watch(a)?, open: true, counted: a_counted };
        let mut ba = Direction { from: b, to: a, watch: self.hangups.watch(b)?, open: true, counted: 0 };
        let mut refresh = tokio::time::interval(METER_REFRESH);
        refresh.tick().await;
        while ab.open || ba.open {
            tokio::select! {
                events = ab.watch.next(ab.asks()) => ab.on(events?, a_to_b).await?,
                events = ba.watch.next(ba.asks()) => ba.on(events?, b_to_a).await?,
                _ = refresh.tick() => {
                    ab.refresh(a_to_b)?;
                    ba.refresh(b_to_a)?;
                }
            }
        }
        Ok((ab.counted, ba.counted))
    }
}

/// Why a hand-over failed: before any socket was relaying (the proxy can take over), or after
/// one was (the connection cannot be saved).
enum HandoverError {
    Untouched(io::Error),
    Partial(io::Error),
}

/// One direction of a kernel-relayed connection: what `from` receives goes to `to`.
struct Direction<'a> {
    from: BorrowedFd<'a>,
    to: BorrowedFd<'a>,
    watch: hangup::Watch,
    open: bool,
    /// Bytes already added to the meter (the proxy's own reads included).
    counted: u64,
}

impl Direction<'_> {
    /// While open, the end of `from`'s stream; after that only errors.
    fn asks(&self) -> u32 {
        if self.open { hangup::END_OF_STREAM } else { 0 }
    }

    async fn on<M: Meter>(&mut self, events: u32, meter: &M) -> io::Result<()> {
        if events & hangup::ERROR != 0 {
            return Err(socket_error(self.from));
        }
        if self.open && events & (hangup::END_OF_STREAM | hangup::HANG_UP) != 0 {
            // The end of stream took one sequence number; the rest are bytes.
            let received = tcp_counters(self.from)?.received.saturating_sub(1);
            drain(self.to, received).await?;
            // SAFETY: plain syscall on an open socket.
            if unsafe { libc::shutdown(self.to.as_raw_fd(), libc::SHUT_WR) } != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::ENOTCONN) {
                    return Err(err);
                }
            }
            meter.add(received.saturating_sub(self.counted));
            self.counted = self.counted.max(received);
            self.open = false;
        }
        Ok(())
    }

    fn refresh<M: Meter>(&mut self, meter: &M) -> io::Result<()> {
        if self.open {
            let received = tcp_counters(self.from)?.received;
            meter.add(received.saturating_sub(self.counted));
            self.counted = self.counted.max(received);
        }
        Ok(())
    }
}

/// Waits until `to` has been given `bytes` in all (by the proxy before the hand-over and by the
/// kernel since), or fails when `to` can no longer take them.
async fn drain(to: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    let mut pause = Duration::from_micros(200);
    loop {
        let counters = tcp_counters(to)?;
        if counters.written >= bytes {
            return Ok(());
        }
        if !counters.can_send() {
            return Err(socket_error(to));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(DRAIN_POLL_MAX);
    }
}

/// Reads what `a` has queued and writes it to `b` until nothing is left unread (a clean
/// boundary); returns the bytes moved, or `None` when data kept arriving.
async fn read_to_boundary<M: Meter>(
    a: &mut TcpStream,
    b: &mut TcpStream,
    meter: &M,
) -> io::Result<Option<u64>> {
    let mut buffer = Vec::new();
    let mut moved = 0u64;
    for _ in 0..CLEAN_ATTEMPTS {
        let queued = unread_bytes(a.as_fd())?;
        if queued == 0 {
            return Ok(Some(moved));
        }
        buffer.resize(queued.min(CLEAN_CHUNK), 0);
        let n = match a.try_read(&mut buffer) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => return Err(err),
        };
        b.write_all(&buffer[..n]).await?;
        meter.add(n as u64);
        moved += n as u64;
    }
    Ok(None)
}

fn reset_both(a: &impl AsFd, b: &impl AsFd) {
    for socket in [a.as_fd(), b.as_fd()] {
        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn socket_error(socket: BorrowedFd<'_>) -> io::Error {
    match socket2::SockRef::from(&socket).take_error() {
        Ok(Some(err)) => err,
        Ok(None) => io::Error::new(io::ErrorKind::ConnectionAborted, "the connection closed"),
        Err(err) => err,
    }
}

fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(cookie) }
}

fn set_rcvlowat(socket: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: the value is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Bytes received and not yet read (`SIOCINQ`).
fn unread_bytes(socket: BorrowedFd<'_>) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one c_int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

/// The byte counters of one socket, from `TCP_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpCounters {
    state: u8,
    /// Sequence space received in order: the bytes, plus one once the peer's FIN is in.
    received: u64,
    /// Bytes written to the socket (sent once, or still queued unsent).
    written: u64,
}

impl TcpCounters {
    /// Whether the socket can still send (established, or the peer has half-closed).
    fn can_send(&self) -> bool {
        matches!(self.state, 1 | 8) // TCP_ESTABLISHED, TCP_CLOSE_WAIT
    }
}

/// The leading part of the kernel's `struct tcp_info` (uapi/linux/tcp.h), through
/// `tcpi_bytes_retrans`; the kernel fills what both sides know.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    _flags: [u8; 7],
    _u32s: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    _bytes_acked: u64,
    bytes_received: u64,
    _segs: [u32; 2],
    notsent_bytes: u32,
    _u32s_2: [u32; 3],
    _delivery_rate: u64,
    _busy_times: [u64; 3],
    _delivered: [u32; 2],
    bytes_sent: u64,
    bytes_retrans: u64,
}

fn tcp_counters(socket: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    let mut info = TcpInfo::default();
    let mut len = size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is plain data of `len` bytes for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<TcpInfo>() {
        return Err(io::Error::other("TCP_INFO is too short for byte counters (kernel older than 4.19)"));
    }
    Ok(TcpCounters {
        state: info.state,
        received: info.bytes_received,
        written: info.bytes_sent.saturating_sub(info.bytes_retrans) + u64::from(info.notsent_bytes),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::proxy::test_support::tcp_pair;

    #[tokio::test]
    async fn tcp_counters_count_bytes_written_and_received_with_the_end_of_stream() {
        let (mut client, mut server) = tcp_pair().await;
        let fresh = tcp_counters(client.as_fd()).expect("tcp_info");
        assert_eq!((fresh.received, fresh.written), (0, 0));
        assert!(fresh.can_send());
        let payload = vec![7u8; 300_000];
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.expect("write");
            client.shutdown().await.expect("half-close");
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        let client = writer.await.expect("writer");
        assert_eq!(got.len(), 300_000);
        assert_eq!(tcp_counters(client.as_fd()).expect("tcp_info").written, 300_000);
        let server_counters = tcp_counters(server.as_fd()).expect("tcp_info");
        assert_eq!(server_counters.received, 300_001, "the FIN takes one sequence number");
        assert!(server_counters.can_send(), "a half-closed peer can still be written to");
        assert_eq!(unread_bytes(server.as_fd()).expect("inq"), 0);
    }
}
