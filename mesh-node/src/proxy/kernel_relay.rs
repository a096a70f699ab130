//! Relays an authorized plain TCP connection inside the kernel: the `relay_in_kernel` program
//! (sk_skb stream verdict) moves what each socket receives to its partner's send queue, so the
//! proxy is not woken for the connection's bytes at all, only for its ends.
//!
//! Handing a connection over is safe only at a byte boundary the kernel agrees on: the program
//! sees whole received segments, so nothing may be half-read by the proxy. The connection comes
//! from its warm-up ([`super::warm_up`]) with nothing unread on either socket. After the
//! hand-over the proxy only watches for ends and errors ([`super::hangup`]).
//!
//! The kernel moves bytes asynchronously (a work item per socket), so an end of stream can be
//! seen before the last bytes have left. A half-close is passed on only once the partner has
//! taken every byte the socket received (`TCP_INFO`: received on one side, written on the
//! other), or bytes would be cut off.
//!
//! The kernel acknowledges relayed bytes at once, so nothing but a budget holds back a sender
//! whose receiver is slow. Each direction may run [`RELAY_BUDGET`] ahead of what its partner
//! has sent on; at the low-water mark the program tells the proxy, which extends the limit if
//! the partner keeps up. If it does not (a slow receiver, or a bulk transfer, which the proxy's
//! splice relay moves faster than the kernel's work item), the program reports the overrun and
//! the proxy takes that direction back, with the ordinary backpressure of a receive buffer.

use std::{
    collections::HashMap as StdHashMap,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use mesh_ebpf_common::{RELAY_BUDGET, RELAY_LOW_WATER, RelayProgress};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};

use super::{
    hangup::{self, Hangups},
    relay::Meter,
};

/// How often byte counters of a kernel-relayed connection are brought up to date.
const METER_REFRESH: Duration = Duration::from_secs(5);
/// The longest pause between checks that a direction has drained.
const DRAIN_POLL_MAX: Duration = Duration::from_millis(20);

/// The relay maps (the program is attached to `receivers`) and this node's counts.
pub struct KernelRelay {
    receivers: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    limits: Mutex<HashMap<MapData, u64, u64>>,
    progress: Mutex<HashMap<MapData, u64, RelayProgress>>,
    budget_events: Arc<BudgetEvents>,
    hangups: Hangups,
    counts: RelayCounts,
}

/// Connections by how they were relayed.
#[derive(Debug, Default)]
struct RelayCounts {
    active: AtomicU64,
    kernel: AtomicU64,
    proxy: AtomicU64,
    failed: AtomicU64,
    taken_over: AtomicU64,
}

/// A snapshot of the relay's counts, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayedConnections {
    /// Open now in the kernel relay.
    pub active: u64,
    /// Handed to the kernel.
    pub kernel: u64,
    /// Relayed whole by the proxy: over within the warm-up, or a bulk transfer.
    pub proxy: u64,
    /// Refused by the maps (full): relayed by the proxy, or reset when half handed over.
    pub failed: u64,
    /// Directions the proxy took back from the kernel (slow receiver or bulk transfer).
    pub taken_over: u64,
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
    /// Not handed over (the maps are full): relay it in user space.
    Declined(TcpStream, TcpStream),
}

/// The relay maps, taken from the loaded object.
pub struct RelayMaps {
    pub receivers: SockHash<MapData, u64>,
    pub targets: SockHash<MapData, u64>,
    pub limits: HashMap<MapData, u64, u64>,
    pub progress: HashMap<MapData, u64, RelayProgress>,
    pub events: RingBuf<MapData>,
}

impl KernelRelay {
    /// Needs a tokio runtime (the watchers' tasks run on it).
    pub fn new(maps: RelayMaps) -> io::Result<Self> {
        Ok(KernelRelay {
            receivers: Mutex::new(maps.receivers),
            targets: Mutex::new(maps.targets),
            limits: Mutex::new(maps.limits),
            progress: Mutex::new(maps.progress),
            budget_events: BudgetEvents::start(maps.events)?,
            hangups: Hangups::start()?,
            counts: RelayCounts::default(),
        })
    }

    /// Counts a connection the proxy relayed whole (it never came here).
    pub fn relayed_by_proxy(&self) {
        self.counts.proxy.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RelayedConnections {
        let counts = &self.counts;
        RelayedConnections {
            active: counts.active.load(Ordering::Relaxed),
            kernel: counts.kernel.load(Ordering::Relaxed),
            proxy: counts.proxy.load(Ordering::Relaxed),
            failed: counts.failed.load(Ordering::Relaxed),
            taken_over: counts.taken_over.load(Ordering::Relaxed),
        }
    }

    /// Relays `a` ↔ `b` in the kernel until both directions end. The connection must be at a
    /// clean boundary (nothing half-read: see [`super::warm_up`]); `before`: the bytes the
    /// proxy has moved so far (a→b, b→a), already counted.
    pub async fn relay<M: Meter, N: Meter>(
        &self,
        a: TcpStream,
        b: TcpStream,
        before: [u64; 2],
        a_to_b: &M,
        b_to_a: &N,
    ) -> Handover {
        let cookie = |socket: &TcpStream| socket2::SockRef::from(socket).cookie();
        let cookies = match (cookie(&a), cookie(&b)) {
            (Ok(a), Ok(b)) => [a, b],
            (Err(err), _) | (_, Err(err)) => return Handover::Relayed(Err(err)),
        };
        // Before the kernel writes anything: what each partner has been given so far.
        let written_bases = match (tcp_counters(b.as_fd()), tcp_counters(a.as_fd())) {
            (Ok(b_counters), Ok(a_counters)) => {
                [b_counters.written.saturating_sub(before[0]), a_counters.written.saturating_sub(before[1])]
            }
            (Err(err), _) | (_, Err(err)) => return Handover::Relayed(Err(err)),
        };
        // Registered first: the program may report a budget event as soon as it runs.
        let mut registration = Registration::new(self, cookies);
        if let Err(err) = self.hand_over(&a, &b, cookies) {
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
        registration.mark_active();
        // Off tokio's epoll: from here on, the sockets' data must wake nobody.
        let (a, b) = match (a.into_std(), b.into_std()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(err), _) | (_, Err(err)) => return Handover::Relayed(Err(err)),
        };
        // Direction `i` reads socket `i` and writes the other one.
        let sockets = [&a, &b];
        let direction = |i: usize| -> io::Result<Direction<'_>> {
            Ok(Direction {
                from: sockets[i],
                to: sockets[1 - i],
                cookie: cookies[i],
                before: before[i],
                written_base: written_bases[i],
                budget: &registration.events[i],
                watch: self.hangups.watch(sockets[i].as_fd())?,
                counted: before[i],
            })
        };
        let (ab, ba) = (direction(0), direction(1));
        let result = match (ab, ba) {
            (Ok(ab), Ok(ba)) => self.watch_ends(ab, ba, a_to_b, b_to_a).await,
            (Err(err), _) | (_, Err(err)) => Err(err),
        };
        if result.is_err() {
            reset_both(&a, &b);
        }
        Handover::Relayed(result)
    }

    /// Gives both sockets their budget, then adds them to the maps: targets first (no effect
    /// on their traffic), then receivers, each of which starts the kernel relaying what that
    /// socket receives.
    fn hand_over(
        &self,
        a: &TcpStream,
        b: &TcpStream,
        [a_cookie, b_cookie]: [u64; 2],
    ) -> Result<(), HandoverError> {
        let untouched = |err: aya::maps::MapError| HandoverError::Untouched(io::Error::other(err));
        for cookie in [a_cookie, b_cookie] {
            lock(&self.progress).insert(cookie, RelayProgress::default(), 0).map_err(untouched)?;
            lock(&self.limits).insert(cookie, RELAY_BUDGET, 0).map_err(untouched)?;
        }
        {
            let mut targets = lock(&self.targets);
            targets.insert(a_cookie, b.as_raw_fd(), 0).map_err(untouched)?;
            if let Err(err) = targets.insert(b_cookie, a.as_raw_fd(), 0) {
                let _ = targets.remove(&a_cookie);
                return Err(untouched(err));
            }
        }
        {
            let mut receivers = lock(&self.receivers);
            if let Err(err) = receivers.insert(a_cookie, a.as_raw_fd(), 0) {
                let mut targets = lock(&self.targets);
                let _ = (targets.remove(&a_cookie), targets.remove(&b_cookie));
                return Err(untouched(err));
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

    /// Runs both directions to their ends and returns the byte counts. Each direction waits on
    /// its own (a drain or a taken-over copy must never hold the other one up: an echoing peer
    /// would deadlock); an error in either ends both.
    async fn watch_ends<M: Meter, N: Meter>(
        &self,
        ab: Direction<'_>,
        ba: Direction<'_>,
        a_to_b: &M,
        b_to_a: &N,
    ) -> io::Result<(u64, u64)> {
        tokio::try_join!(self.run_direction(ab, a_to_b), self.run_direction(ba, b_to_a))
    }

    /// One direction: the kernel relays it until its end of stream (passed on once drained) or
    /// until its budget is spent (then the proxy copies the rest). Returns its byte count.
    async fn run_direction<M: Meter>(&self, mut direction: Direction<'_>, meter: &M) -> io::Result<u64> {
        let mut refresh = tokio::time::interval(METER_REFRESH);
        refresh.tick().await;
        loop {
            tokio::select! {
                events = direction.watch.next(hangup::END_OF_STREAM) => {
                    let events = events?;
                    if events & hangup::ERROR != 0 {
                        return Err(socket_error(direction.from.as_fd()));
                    }
                    // End of stream (or hang-up): it took one sequence number, the rest are bytes.
                    let received = tcp_counters(direction.from.as_fd())?.received.saturating_sub(1);
                    wait_written(direction.to.as_fd(), direction.written_base, received).await?;
                    shutdown_write(direction.to.as_fd())?;
                    meter.add(received.saturating_sub(direction.counted));
                    return Ok(received.max(direction.counted));
                }
                () = direction.budget.notified() => {
                    if self.budget_spent(&direction)? {
                        break;
                    }
                }
                _ = refresh.tick() => direction.refresh(meter)?,
            }
        }
        self.take_over(direction, meter).await
    }

    /// Answers the program's report that the direction's budget runs low or is spent: extends
    /// it while the partner keeps up; returns whether it is spent (the proxy takes over).
    fn budget_spent(&self, direction: &Direction<'_>) -> io::Result<bool> {
        let progress = self.progress_of(direction.cookie)?;
        if progress.spent != 0 {
            return Ok(true);
        }
        let relayed = direction.before + progress.redirected;
        let written = tcp_counters(direction.to.as_fd())?.written.saturating_sub(direction.written_base);
        if relayed.saturating_sub(written) <= RELAY_LOW_WATER {
            // Keeping up: another budget's worth. The limit only ever grows.
            let limit = progress.redirected + RELAY_BUDGET;
            let mut limits = lock(&self.limits);
            let current = limits.get(&direction.cookie, 0).unwrap_or(0);
            if limit > current {
                limits.insert(direction.cookie, limit, 0).map_err(io::Error::other)?;
            }
        }
        Ok(false)
    }

    /// Takes a direction whose budget is spent over from the kernel: its socket leaves the
    /// receivers (new bytes wait in its receive buffer, which holds the sender back), and once
    /// the partner has taken what the kernel relayed, the proxy's splice relay moves the rest.
    /// Returns the direction's byte count.
    async fn take_over<M: Meter>(&self, direction: Direction<'_>, meter: &M) -> io::Result<u64> {
        lock(&self.receivers).remove(&direction.cookie).map_err(io::Error::other)?;
        // The program runs under the socket's lock: once a call that takes the lock returns,
        // no run is in flight and `redirected` is final. (This one also tells epoll the bytes
        // now queued are readable.)
        set_rcvlowat(direction.from.as_fd(), 1)?;
        let relayed = direction.before + self.progress_of(direction.cookie)?.redirected;
        wait_written(direction.to.as_fd(), direction.written_base, relayed).await?;
        meter.add(relayed.saturating_sub(direction.counted));
        self.counts.taken_over.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(relayed, "kernel relay budget spent; the proxy takes the direction over");
        // Errors now surface in the copy; the watch would only report them twice.
        drop(direction.watch);
        // Registered with tokio through duplicates, which go when the copy ends.
        let from = TcpStream::from_std(direction.from.try_clone()?)?;
        let to = TcpStream::from_std(direction.to.try_clone()?)?;
        let copied = copy_to_end(from, to, meter).await?;
        Ok(relayed.max(direction.counted) + copied)
    }

    fn progress_of(&self, cookie: u64) -> io::Result<RelayProgress> {
        lock(&self.progress).get(&cookie, 0).map_err(io::Error::other)
    }
}

/// Copies what is left of a taken-over direction (the splice relay's copy, half-close
/// included); returns the bytes it copied.
async fn copy_to_end<M: Meter>(mut from: TcpStream, mut to: TcpStream, meter: &M) -> io::Result<u64> {
    let (read, _) = from.split();
    let (_, write) = to.split();
    super::splice::copy(read, write, meter).await
}

/// Why a hand-over failed: before any socket was relaying (the proxy can take over), or after
/// one was (the connection cannot be saved).
enum HandoverError {
    Untouched(io::Error),
    Partial(io::Error),
}

/// One direction of a kernel-relayed connection: what `from` receives goes to `to`.
struct Direction<'a> {
    from: &'a std::net::TcpStream,
    to: &'a std::net::TcpStream,
    cookie: u64,
    /// Bytes the proxy wrote to `to` itself before the hand-over.
    before: u64,
    /// `to`'s [`TcpCounters::written`] less everything of this direction written to it.
    written_base: u64,
    budget: &'a Notify,
    watch: hangup::Watch,
    /// Bytes already added to the meter.
    counted: u64,
}

impl Direction<'_> {
    fn refresh<M: Meter>(&mut self, meter: &M) -> io::Result<()> {
        let received = tcp_counters(self.from.as_fd())?.received;
        meter.add(received.saturating_sub(self.counted));
        self.counted = self.counted.max(received);
        Ok(())
    }
}

/// A connection's entries in the budget maps and its event waiters, removed when it ends (the
/// sockets leave the socket maps by themselves when they close), and its place in the count of
/// active connections once handed over.
struct Registration<'r> {
    relay: &'r KernelRelay,
    cookies: [u64; 2],
    events: [Arc<Notify>; 2],
    active: bool,
}

impl<'r> Registration<'r> {
    fn new(relay: &'r KernelRelay, cookies: [u64; 2]) -> Self {
        let events = cookies.map(|cookie| relay.budget_events.register(cookie));
        Registration { relay, cookies, events, active: false }
    }

    fn mark_active(&mut self) {
        self.relay.counts.active.fetch_add(1, Ordering::Relaxed);
        self.active = true;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.active {
            self.relay.counts.active.fetch_sub(1, Ordering::Relaxed);
        }
        for cookie in self.cookies {
            self.relay.budget_events.unregister(cookie);
            let _ = lock(&self.relay.limits).remove(&cookie);
            let _ = lock(&self.relay.progress).remove(&cookie);
        }
    }
}

/// Reads the program's budget events (socket cookies) and wakes the connection concerned.
struct BudgetEvents {
    waiting: Mutex<StdHashMap<u64, Arc<Notify>>>,
}

impl BudgetEvents {
    fn start(ring: RingBuf<MapData>) -> io::Result<Arc<Self>> {
        // SAFETY: the ring buffer owns its map descriptor, open for as long as it lives, which
        // is as long as the `AsyncFd`.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|err| err.into_parts().1)?;
        let events = Arc::new(BudgetEvents { waiting: Mutex::default() });
        tokio::spawn(read_budget_events(ring, Arc::downgrade(&events)));
        Ok(events)
    }

    fn register(&self, cookie: u64) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        lock(&self.waiting).insert(cookie, notify.clone());
        notify
    }

    fn unregister(&self, cookie: u64) {
        lock(&self.waiting).remove(&cookie);
    }
}

async fn read_budget_events(mut ring: AsyncFd<RingBuf<MapData>>, events: std::sync::Weak<BudgetEvents>) {
    loop {
        let mut ready = match ring.readable_mut().await {
            Ok(ready) => ready,
            Err(err) => {
                tracing::error!(error = %err, "kernel relay budget events stopped");
                return;
            }
        };
        let Some(events) = events.upgrade() else { return };
        let ring = ready.get_inner_mut();
        while let Some(item) = ring.next() {
            let Ok(cookie) = <[u8; 8]>::try_from(&item[..]).map(u64::from_ne_bytes) else { continue };
            if let Some(notify) = lock(&events.waiting).get(&cookie) {
                notify.notify_one();
            }
        }
        ready.clear_ready();
    }
}

/// Waits until `to` has been given `bytes` in all (counted from `base`, its
/// [`TcpCounters::written`] before any of them), or fails when it can no longer take them.
async fn wait_written(to: BorrowedFd<'_>, base: u64, bytes: u64) -> io::Result<()> {
    let mut pause = Duration::from_micros(200);
    loop {
        let counters = tcp_counters(to)?;
        if counters.written.saturating_sub(base) >= bytes {
            return Ok(());
        }
        if !counters.can_send() {
            return Err(socket_error(to));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(DRAIN_POLL_MAX);
    }
}

pub(super) fn shutdown_write(socket: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an open socket.
    if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) } != 0 {
        let err = io::Error::last_os_error();
        // The peer may already be gone, which is not an error here.
        if err.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(err);
        }
    }
    Ok(())
}

fn reset_both(a: &impl AsFd, b: &impl AsFd) {
    super::set_reset_on_close(a);
    super::set_reset_on_close(b);
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
pub(super) fn unread_bytes(socket: BorrowedFd<'_>) -> io::Result<usize> {
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
    /// Sequence space written to the socket: acknowledged plus still queued (`SIOCOUTQ`),
    /// which is exact however often segments were sent; it includes the SYN on a connecting
    /// socket, hence [`Direction::written_base`].
    written: u64,
}

impl TcpCounters {
    /// Whether the socket can still send (established, or the peer has half-closed).
    fn can_send(&self) -> bool {
        matches!(self.state, 1 | 8) // TCP_ESTABLISHED, TCP_CLOSE_WAIT
    }
}

/// The leading part of the kernel's `struct tcp_info` (uapi/linux/tcp.h), through
/// `tcpi_bytes_received`; the kernel fills what both sides know.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    _flags: [u8; 7],
    _u32s: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
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
        return Err(io::Error::other("TCP_INFO is too short for byte counters (kernel older than 4.1)"));
    }
    // Read after TCP_INFO: an acknowledgement in between only makes the sum smaller, so a wait
    // for bytes to be written never ends early.
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpCounters {
        state: info.state,
        received: info.bytes_received,
        written: info.bytes_acked + u64::try_from(queued).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::test_support::tcp_pair;

    #[tokio::test]
    async fn tcp_counters_count_bytes_written_and_received_with_the_end_of_stream() {
        let (mut client, mut server) = tcp_pair().await;
        let fresh = tcp_counters(client.as_fd()).expect("tcp_info");
        assert_eq!(fresh.received, 0);
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
        let written = tcp_counters(client.as_fd()).expect("tcp_info").written - fresh.written;
        assert_eq!(written, 300_001, "the bytes, and the FIN once shut down");
        let server_counters = tcp_counters(server.as_fd()).expect("tcp_info");
        assert_eq!(server_counters.received, 300_001, "the FIN takes one sequence number");
        assert!(server_counters.can_send(), "a half-closed peer can still be written to");
        assert_eq!(unread_bytes(server.as_fd()).expect("inq"), 0);
    }
}
