//! Doing things inside a network namespace from the test process.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

/// Returns the path of a named netns (`ip netns add` puts them there).
pub fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a fresh thread inside the named netns (the calling thread never moves).
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        // SAFETY: changes only this new thread's netns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Sends `GET path` over HTTP/1.0 from inside the netns; returns (status, body).
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(netns, addr, "GET", path)
}

/// Sends `METHOD path` (no body) over HTTP/1.0 from inside the netns; returns (status, body).
pub fn http_request(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    let raw = run_in(netns, move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?
    .with_context(|| format!("{method} http://{addr}{path} in netns {netns}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Writes a sysctl inside the named netns (`/proc/sys/net` follows the thread's netns).
pub fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let file = Path::new("/proc/sys").join(key.replace('.', "/"));
    let value = value.to_owned();
    run_in(netns, move || {
        std::fs::write(&file, value).with_context(|| format!("writing {}", file.display()))
    })?
}
