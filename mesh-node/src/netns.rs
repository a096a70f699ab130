//! Network-namespace plumbing: a worker thread per pod netns, and netns cookies.
//!
//! A socket belongs to the netns of the thread that created it, and tokio moves tasks between
//! threads, so sockets for a pod are created on a dedicated OS thread that entered the pod's
//! netns once. Everything else (bind, connect, I/O) works from any thread afterwards.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::mpsc,
};

use tokio::sync::oneshot;

/// `SO_NETNS_COOKIE` (Linux 5.14+): the 64-bit cookie the kernel's BPF helpers also report.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot start the worker thread for {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("the worker thread of network namespace {path} has stopped")]
    WorkerGone { path: PathBuf },
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living inside one network namespace, running the jobs it is sent.
#[derive(Debug)]
pub struct NetnsWorker {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl NetnsWorker {
    /// Starts a thread that enters the netns at `path` and waits for jobs.
    pub fn spawn(path: &Path, name: &str) -> Result<Self, NetnsError> {
        let target = File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        let owned_path = path.to_owned();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                // SAFETY: setns only changes this thread's netns; the fd is valid for the call.
                let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if ok {
                    // Runs until every sender is dropped (the pod is withdrawn).
                    for job in queue {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Spawn { path: owned_path.clone(), source })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(NetnsWorker { path: owned_path, jobs }),
            Ok(Err(source)) => Err(NetnsError::Enter { path: owned_path, source }),
            Err(_) => Err(NetnsError::WorkerGone { path: owned_path }),
        }
    }

    /// Runs `f` inside the netns and returns its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(move || {
            let _ = tx.send(f());
        })?;
        rx.await.map_err(|_| NetnsError::WorkerGone { path: self.path.clone() })
    }

    fn submit(&self, f: impl FnOnce() + Send + 'static) -> Result<(), NetnsError> {
        self.jobs.send(Box::new(f)).map_err(|_| NetnsError::WorkerGone { path: self.path.clone() })
    }
}

/// Returns the cookie of the netns a socket lives in.
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn worker_in_own_netns_reports_same_cookie_as_caller() {
        let worker = NetnsWorker::spawn(Path::new("/proc/self/ns/net"), "self").expect("worker");
        let theirs = worker
            .run(|| netns_cookie(&std::net::TcpListener::bind("127.0.0.1:0").expect("bind")))
            .await
            .expect("job ran")
            .expect("cookie");
        let ours = netns_cookie(&std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).expect("cookie");
        assert_eq!(theirs, ours);
    }

    #[test]
    fn missing_netns_is_a_clear_error() {
        let err = NetnsWorker::spawn(Path::new("/nonexistent/netns"), "x").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
