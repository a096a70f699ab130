//! A deliberately lenient HTTP/1.1 connection for `http-serve --framing`, standing for a
//! backend that frames request bodies differently from the proxy in front of it. hyper refuses
//! two different `Content-Length`s and closes the connection after a request carrying both
//! `Content-Length` and `Transfer-Encoding`, so behind hyper a proxy that forwards such a
//! request as-is would look safe; behind this, the request hidden in the body is served, and
//! the server's stats show it. Never use it for anything but that test.

use std::{io, net::SocketAddr};

use hyper::StatusCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::server::{Framing, Seen, State};

/// The longest request head it reads.
const MAX_HEAD: usize = 64 * 1024;

/// Serves requests on one connection, framed as `framing` says, until the peer closes.
pub(super) async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: &State,
    framing: Framing,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end;
            }
            if buf.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
            }
            if read_more(&mut stream, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let (method, target, version) =
            (request_line.next().unwrap_or(""), request_line.next().unwrap_or("/"), request_line.next());
        let version = version.unwrap_or("HTTP/1.0").to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let first = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let length = first("content-length").and_then(|l| l.parse::<usize>().ok()).unwrap_or(0);
        let chunked = framing == Framing::ChunkedKeepAlive
            && first("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        let body_bytes = loop {
            let framed =
                if chunked { chunked_body(&buf) } else { (buf.len() >= length).then_some((length, length)) };
            if let Some((body_bytes, used)) = framed {
                buf.drain(..used);
                break body_bytes;
            }
            if read_more(&mut stream, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut joined = std::collections::BTreeMap::<String, String>::new();
        for (name, value) in &headers {
            joined
                .entry(name.clone())
                .and_modify(|v| *v = format!("{v}, {value}"))
                .or_insert_with(|| value.clone());
        }
        let seen = Seen {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            version: version.clone(),
            headers: joined,
            peer,
        };
        let (status, body) = match path.strip_prefix("/admin/") {
            Some(admin) => state.admin(admin, query),
            None => {
                let failing = state.arrived(&seen);
                let delay = state.delay(&seen);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                state.answer(&seen, failing, body_bytes)
            }
        };
        let body = body.to_string();
        let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nx-server: {}\r\ncontent-length: {}\r\n\r\n{body}",
            state.name(),
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        if version != "HTTP/1.1" || first("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            return stream.shutdown().await;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Returns (body length, bytes used) of a complete chunked body at the start of `bytes`, or
/// `None` while it is incomplete.
fn chunked_body(bytes: &[u8]) -> Option<(usize, usize)> {
    let (mut at, mut length) = (0, 0);
    loop {
        let line_end = find(&bytes[at..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&bytes[at..at + line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).ok()?;
        at += line_end + 2;
        if size == 0 {
            let tail = &bytes[at..];
            let used = if tail.starts_with(b"\r\n") { 2 } else { find(tail, b"\r\n\r\n")? + 4 };
            return Some((length, at + used));
        }
        if bytes.len() < at + size + 2 {
            return None;
        }
        (at, length) = (at + size + 2, length + size);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::chunked_body;

    #[test]
    fn chunked_bodies_are_complete_only_with_their_terminator() {
        assert_eq!(chunked_body(b"0\r\n\r\nGET /next"), Some((0, 5)));
        assert_eq!(chunked_body(b"3\r\nabc\r\n0\r\n\r\n"), Some((3, 13)));
        assert_eq!(chunked_body(b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\nrest"), Some((3, 21)));
        assert_eq!(chunked_body(b"3\r\nab"), None);
        assert_eq!(chunked_body(b"3\r\nabc\r\n0\r\n"), None);
    }
}
