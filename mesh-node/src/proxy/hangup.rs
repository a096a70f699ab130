//! Waits for sockets' end-of-stream and errors without being woken for their data.
//!
//! A socket whose bytes the kernel relays must not stay registered with tokio: every arriving
//! segment would still wake the runtime. These sockets are instead registered with one epoll
//! instance of our own for `EPOLLRDHUP` (and the `EPOLLERR`/`EPOLLHUP` epoll always reports)
//! only: epoll filters out the data wake-ups, which carry `EPOLLIN`. One task reads that epoll
//! and wakes the connection concerned.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};

/// The peer shut its sending side down (our read side has reached its end).
pub const END_OF_STREAM: u32 = libc::EPOLLRDHUP as u32;
/// The connection failed (reset, timed out); reported whether asked for or not.
pub const ERROR: u32 = libc::EPOLLERR as u32;
/// Both sides of the socket are shut; reported whether asked for or not.
#[cfg(test)]
pub const HANG_UP: u32 = libc::EPOLLHUP as u32;

/// Events read at once by the dispatching task.
const BATCH: usize = 64;

/// The shared epoll instance and who waits on it.
#[derive(Clone)]
pub struct Hangups {
    inner: Arc<Inner>,
}

struct Inner {
    epoll: AsyncFd<OwnedFd>,
    waiting: Mutex<HashMap<u64, Arc<Slot>>>,
    next_token: AtomicU64,
}

/// What one registered socket has been reported, and who to wake.
#[derive(Default)]
struct Slot {
    events: AtomicU32,
    notify: Notify,
}

impl Hangups {
    /// Creates the epoll instance and spawns its dispatching task on the current runtime.
    pub fn start() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else; the `OwnedFd` keeps it open for as
        // long as the `AsyncFd` lives.
        let epoll = unsafe { AsyncFd::register_with_interest(OwnedFd::from_raw_fd(fd), Interest::READABLE) }
            .map_err(|err| err.into_parts().1)?;
        let inner = Arc::new(Inner { epoll, waiting: Mutex::default(), next_token: AtomicU64::new(1) });
        tokio::spawn(dispatch(Arc::downgrade(&inner)));
        Ok(Hangups { inner })
    }

    /// Registers a socket, reporting nothing until [`Watch::next`] asks.
    pub fn watch(&self, socket: BorrowedFd<'_>) -> io::Result<Watch> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        lock(&self.inner.waiting).insert(token, slot.clone());
        let watch = Watch { hangups: self.inner.clone(), fd: socket.as_raw_fd(), token, slot };
        // Registered disarmed (one-shot, already fired); `next` arms it with what it waits for.
        watch.control(libc::EPOLL_CTL_ADD, libc::EPOLLONESHOT as u32)?;
        Ok(watch)
    }

    /// Sockets registered now.
    #[cfg(test)]
    pub fn registered(&self) -> usize {
        lock(&self.inner.waiting).len()
    }
}

/// One socket's registration; removed from epoll when dropped. The socket must outlive it.
pub struct Watch {
    hangups: Arc<Inner>,
    fd: i32,
    token: u64,
    slot: Arc<Slot>,
}

impl Watch {
    /// Waits until the socket reports one of `events` (or an error or hang-up, which epoll
    /// always reports) and returns what it reported. Cancel-safe: an event that arrives after
    /// the caller stopped waiting is returned by the next call.
    pub async fn next(&mut self, events: u32) -> io::Result<u32> {
        loop {
            let seen = self.slot.events.swap(0, Ordering::AcqRel);
            if seen != 0 {
                return Ok(seen);
            }
            self.control(libc::EPOLL_CTL_MOD, events | libc::EPOLLONESHOT as u32)?;
            self.slot.notify.notified().await;
        }
    }

    fn control(&self, op: libc::c_int, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: self.token };
        // SAFETY: both descriptors are open (the socket outlives its watch); `event` is valid.
        let rc =
            unsafe { libc::epoll_ctl(self.hangups.epoll.get_ref().as_raw_fd(), op, self.fd, &mut event) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut unused = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `control`; a failure only means the registration is already gone.
        unsafe {
            libc::epoll_ctl(
                self.hangups.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.fd,
                &mut unused,
            )
        };
        lock(&self.hangups.waiting).remove(&self.token);
    }
}

/// Reads the epoll instance and hands each event to its socket's waiter, for as long as any
/// [`Hangups`] handle lives.
async fn dispatch(inner: std::sync::Weak<Inner>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    loop {
        let Some(hangups) = inner.upgrade() else { return };
        let mut ready = match hangups.epoll.readable().await {
            Ok(ready) => ready,
            Err(err) => {
                tracing::error!(error = %err, "hang-up watcher stopped");
                return;
            }
        };
        // SAFETY: `events` has room for BATCH entries; a zero timeout never blocks.
        let n = unsafe {
            libc::epoll_wait(hangups.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0)
        };
        if n <= 0 {
            ready.clear_ready();
            continue;
        }
        let waiting = lock(&hangups.waiting);
        for event in &events[..n as usize] {
            let (token, reported) = (event.u64, event.events);
            if let Some(slot) = waiting.get(&token) {
                slot.events.fetch_or(reported, Ordering::AcqRel);
                slot.notify.notify_one();
            }
        }
        // A full batch may have left more behind: read again before waiting for readiness.
        if (n as usize) < BATCH {
            ready.clear_ready();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsFd, time::Duration};

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::proxy::test_support::tcp_pair;

    #[tokio::test]
    async fn reports_end_of_stream_and_errors_but_not_data() {
        let hangups = Hangups::start().expect("epoll");
        let (mut client, server) = tcp_pair().await;
        let server = server.into_std().expect("deregister");
        let mut watch = hangups.watch(server.as_fd()).expect("watch");
        assert_eq!(hangups.registered(), 1);

        client.write_all(b"data is not an event").await.expect("write");
        let waited = tokio::time::timeout(Duration::from_millis(200), watch.next(END_OF_STREAM)).await;
        assert!(waited.is_err(), "data must not wake the watcher: {waited:?}");

        client.shutdown().await.expect("half-close");
        let events = tokio::time::timeout(Duration::from_secs(5), watch.next(END_OF_STREAM))
            .await
            .expect("end of stream reported")
            .expect("watch");
        assert_ne!(events & END_OF_STREAM, 0, "events {events:#x}");

        // Now only errors: a reset from the peer.
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(client);
        let events = tokio::time::timeout(Duration::from_secs(5), watch.next(0))
            .await
            .expect("reset reported")
            .expect("watch");
        assert_ne!(events & (ERROR | HANG_UP), 0, "events {events:#x}");

        drop(watch);
        assert_eq!(hangups.registered(), 0, "a dropped watch leaves nothing behind");
    }
}
