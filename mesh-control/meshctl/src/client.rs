//! A small HTTP/1.0 client for the admin endpoints, able to connect from inside a netns.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd as _,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::context::Endpoint;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `f` on a fresh thread inside the netns at `netns` (the calling thread never moves).
pub fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let Some(netns) = netns else { return Ok(f()) };
    let file = std::fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let shown = netns.display().to_string();
    std::thread::spawn(move || -> anyhow::Result<T> {
        // SAFETY: setns on this new thread only; `file` is an open netns file.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let err = std::io::Error::last_os_error();
            bail!("entering netns {shown}: {err} (meshctl needs root to reach an endpoint inside a netns)");
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread inside the netns panicked"))?
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends `method target` (target = path and query) and reads the whole response.
pub fn request(endpoint: &Endpoint, method: &str, target: &str) -> anyhow::Result<Response> {
    let addr = endpoint.admin;
    let raw = format!("{method} {target} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    let bytes = in_netns(endpoint.netns.as_deref(), move || -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.write_all(raw.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(response)
    })?
    .with_context(|| format!("{method} http://{addr}{target}{}", where_(endpoint)))?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response from {addr}: {:?}", truncate(&text)))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line from {addr}: {:?}", truncate(head)))?;
    Ok(Response { status, body: body.to_owned() })
}

/// GETs `target` and parses the JSON body; a non-200 answer is an error carrying its text.
pub fn get_json(endpoint: &Endpoint, target: &str) -> anyhow::Result<serde_json::Value> {
    let response = request(endpoint, "GET", target)?;
    if response.status != 200 {
        bail!("{target} answered {}: {}", response.status, response.body.trim());
    }
    serde_json::from_str(&response.body)
        .with_context(|| format!("{target} did not answer JSON: {:?}", truncate(&response.body)))
}

fn where_(endpoint: &Endpoint) -> String {
    endpoint.netns.as_ref().map(|n| format!(" (in netns {})", n.display())).unwrap_or_default()
}

fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(200).map_or(text.len(), |(i, _)| i);
    &text[..end]
}
