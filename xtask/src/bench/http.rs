//! The HTTP/1.1 side of the bench: the wire format the load generator speaks in HTTP mode
//! ([`request_head`], [`read_response`]), the server it talks to (`xtask-bench http-echo`,
//! [`serve`]: answers every request with `200` and the request's body, so each response is as
//! big as its request and checkable), and the AuthorizationPolicy of the L7 modes
//! ([`policy_yaml`], [`request_path`]).
//!
//! Written by hand, blocking, one thread per connection: the bench controls every byte on the
//! wire, and the server costs the same in every mode (it is measured in the direct mode too).
//! The proxies may re-frame a message (e.g. `Transfer-Encoding: chunked` instead of
//! `Content-Length`), so both framings are read.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write as _},
    net::{TcpListener, TcpStream},
};

use anyhow::{Context as _, bail};

/// The label the L7 modes' policy selects the server pod by (`app: <this>`).
pub const SERVER_APP: &str = "bench-server";
/// The method every bench request uses (the policy's rules allow only it).
pub const METHOD: &str = "POST";
/// Longest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest body accepted (the bench sends 1 KiB).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Returns the path the bench requests with `rules` ALLOW rules in force: the one only the last
/// rule allows, so every rule before it is evaluated and fails (`/bench/0/echo` without rules).
pub fn request_path(rules: u32) -> String {
    format!("/bench/{}/echo", rules.saturating_sub(1))
}

/// Returns the path prefix rule `i` allows (`/bench/<i>/*`).
pub fn rule_path(i: u32) -> String {
    format!("/bench/{i}/*")
}

/// Returns a local-mode AuthorizationPolicy for the L7 modes: one ALLOW policy on the pods
/// labelled `app: bench-server` in `namespace`, with `rules` rules, rule `i` allowing
/// [`METHOD`] on [`rule_path`]`(i)`. One policy rather than `rules` policies: every rule of it
/// is evaluated in order until one matches, which is the cost the mode measures.
pub fn policy_yaml(namespace: &str, rules: u32) -> String {
    let mut yaml = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: bench-allow\n  \
         namespace: {namespace}\nspec:\n  selector:\n    matchLabels:\n      app: {SERVER_APP}\n  \
         action: ALLOW\n  rules:\n"
    );
    for i in 0..rules {
        let _ = write!(
            yaml,
            "  - to:\n    - operation:\n        methods: [\"{METHOD}\"]\n        paths: [\"{}\"]\n",
            rule_path(i)
        );
    }
    yaml
}

/// Returns the head of a bench request: `POST <path>` with a body of `body_len` bytes, keep-alive.
pub fn request_head(path: &str, host: &str, body_len: usize) -> Vec<u8> {
    format!(
        "{METHOD} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\n\
         content-length: {body_len}\r\n\r\n"
    )
    .into_bytes()
}

/// How a message's body is framed, from its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
}

/// A parsed message head: the start line's fields, the body's framing, whether the sender
/// closes after it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Head {
    start: String,
    framing: Framing,
    close: bool,
}

/// Reads one line ending in CRLF (or LF) into `line`, without the line end. Returns false on a
/// clean end of stream before any byte.
fn read_line(reader: &mut impl BufRead, line: &mut String, budget: &mut usize) -> anyhow::Result<bool> {
    line.clear();
    let read = reader.read_line(line)?;
    if read == 0 {
        return Ok(false);
    }
    *budget = budget.checked_sub(read).context("message head too long")?;
    anyhow::ensure!(line.ends_with('\n'), "the stream ended inside a message head");
    let trimmed = line.trim_end_matches(['\r', '\n']).len();
    line.truncate(trimmed);
    Ok(true)
}

/// Reads a message head. `None` on a clean end of stream before it (the peer closed between
/// messages).
fn read_head(reader: &mut impl BufRead) -> anyhow::Result<Option<Head>> {
    let mut budget = MAX_HEAD;
    let mut start = String::new();
    if !read_line(reader, &mut start, &mut budget)? {
        return Ok(None);
    }
    let (mut length, mut chunked, mut close) = (None, false, false);
    let mut line = String::new();
    loop {
        anyhow::ensure!(read_line(reader, &mut line, &mut budget)?, "the stream ended inside a message head");
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').with_context(|| format!("malformed header {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().with_context(|| format!("bad content-length {value:?}"))?;
            anyhow::ensure!(length.is_none_or(|l| l == n), "two different content-lengths");
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().split(',').any(|c| c.trim() == "chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.to_ascii_lowercase().split(',').any(|c| c.trim() == "close");
        }
    }
    // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length.
    let framing = if chunked { Framing::Chunked } else { Framing::Length(length.unwrap_or(0)) };
    Ok(Some(Head { start, framing, close }))
}

/// Reads a body framed as `framing` into `body` (replacing what it held).
fn read_body(reader: &mut impl BufRead, framing: Framing, body: &mut Vec<u8>) -> anyhow::Result<()> {
    body.clear();
    match framing {
        Framing::Length(n) => {
            anyhow::ensure!(n <= MAX_BODY, "body of {n} bytes is too long");
            body.resize(n, 0);
            reader.read_exact(body).context("the stream ended inside a body")?;
        }
        Framing::Chunked => {
            let mut line = String::new();
            loop {
                let mut budget = MAX_HEAD;
                anyhow::ensure!(read_line(reader, &mut line, &mut budget)?, "the stream ended inside a body");
                let size = line.split(';').next().unwrap_or_default().trim();
                let size =
                    usize::from_str_radix(size, 16).with_context(|| format!("bad chunk size {line:?}"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        anyhow::ensure!(
                            read_line(reader, &mut line, &mut budget)?,
                            "the stream ended inside trailers"
                        );
                        if line.is_empty() {
                            return Ok(());
                        }
                    }
                }
                anyhow::ensure!(body.len() + size <= MAX_BODY, "chunked body too long");
                let at = body.len();
                body.resize(at + size, 0);
                reader.read_exact(&mut body[at..]).context("the stream ended inside a chunk")?;
                anyhow::ensure!(
                    read_line(reader, &mut line, &mut budget)? && line.is_empty(),
                    "no CRLF after a chunk"
                );
            }
        }
    }
    Ok(())
}

/// Reads one response into `body`; returns its status code. An end of stream is an error (the
/// bench never asks the server to close).
pub fn read_response(reader: &mut impl BufRead, body: &mut Vec<u8>) -> anyhow::Result<u16> {
    let head = read_head(reader)?.context("the connection closed before the response")?;
    let mut parts = head.start.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    anyhow::ensure!(version.starts_with("HTTP/1."), "not an HTTP/1 response: {:?}", head.start);
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {:?}", head.start))?;
    read_body(reader, head.framing, body)?;
    Ok(status)
}

/// A request as the echo server read it.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    close: bool,
}

/// Reads one request into `body`; `None` when the client closed between requests.
fn read_request(reader: &mut impl BufRead, body: &mut Vec<u8>) -> anyhow::Result<Option<Request>> {
    let Some(head) = read_head(reader)? else { return Ok(None) };
    let mut parts = head.start.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed request line {:?}", head.start);
    };
    anyhow::ensure!(version == "HTTP/1.1", "only HTTP/1.1 is served, not {version:?}");
    read_body(reader, head.framing, body)?;
    Ok(Some(Request { method: method.to_owned(), path: path.to_owned(), close: head.close }))
}

/// Appends the echo server's answer to a request with `body` to `out`.
fn echo_response(body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(body);
}

/// Answers one connection's requests until it closes.
fn echo_connection(stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let (mut body, mut out) = (Vec::new(), Vec::new());
    while let Some(request) = read_request(&mut reader, &mut body)? {
        echo_response(&body, &mut out);
        // One write per response: head and body in the same segment.
        writer.write_all(&out)?;
        if request.close {
            break;
        }
    }
    Ok(())
}

/// Serves HTTP/1.1 on `listener` until the process ends: every request is answered `200` with
/// its own body. Prints `LISTENING <addr>` once it accepts connections.
pub fn serve(listener: TcpListener) -> anyhow::Result<()> {
    println!("LISTENING {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("http-echo: accept: {err}");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(err) = echo_connection(stream) {
                eprintln!("http-echo: connection from {peer}: {err:#}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufReader, Cursor, Write as _},
        net::{TcpListener, TcpStream},
    };

    use super::{
        Framing, echo_response, policy_yaml, read_head, read_request, read_response, request_head,
        request_path, rule_path,
    };

    /// Istio's path match for the patterns the policy uses: `prefix*` or exact.
    fn allows(pattern: &str, path: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => pattern == path,
        }
    }

    #[test]
    fn only_the_last_rule_allows_the_request() {
        for rules in [1, 2, 11, 100, 10_000] {
            let path = request_path(rules);
            let matching: Vec<u32> = (0..rules).filter(|i| allows(&rule_path(*i), &path)).collect();
            assert_eq!(matching, [rules - 1], "{rules} rules, {path}");
        }
        assert_eq!(request_path(0), "/bench/0/echo", "no policy: the same shape of path");
        assert!(!allows(&rule_path(1), "/bench/10/echo"), "a rule's prefix ends with a slash");
    }

    #[test]
    fn the_policy_has_one_rule_per_path_in_order() {
        let yaml = policy_yaml("demo", 3);
        assert!(yaml.starts_with("apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n"), "{yaml}");
        assert!(yaml.contains("  namespace: demo\n") && yaml.contains("      app: bench-server\n"), "{yaml}");
        assert!(yaml.contains("  action: ALLOW\n"), "{yaml}");
        assert_eq!(yaml.matches("  - to:\n").count(), 3);
        let paths: Vec<&str> =
            yaml.lines().filter_map(|l| l.trim().strip_prefix("paths: [\"")?.strip_suffix("\"]")).collect();
        assert_eq!(paths, ["/bench/0/*", "/bench/1/*", "/bench/2/*"]);
        assert_eq!(yaml.matches("methods: [\"POST\"]").count(), 3);
    }

    #[test]
    fn heads_say_how_the_body_is_framed() {
        let head = |text: &str| read_head(&mut Cursor::new(text.as_bytes().to_vec())).unwrap().unwrap();
        assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").framing, Framing::Length(5));
        assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n").framing, Framing::Length(0));
        let chunked = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked, "transfer-encoding wins");
        assert!(head("HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\n\r\n").close);
        assert!(read_head(&mut Cursor::new(Vec::new())).unwrap().is_none(), "closed between messages");
        assert!(read_head(&mut Cursor::new(b"HTTP/1.1 200 OK\r\nx: 1\r\n".to_vec())).is_err(), "cut short");
        let two = "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n";
        assert!(read_head(&mut Cursor::new(two.as_bytes().to_vec())).is_err());
    }

    #[test]
    fn responses_are_read_with_either_framing() {
        let mut body = Vec::new();
        let mut wire = Cursor::new(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n\
              4;x=y\r\nRBAC\r\n3\r\n: n\r\n0\r\ntrailer: t\r\n\r\n"
                .to_vec(),
        );
        assert_eq!(read_response(&mut wire, &mut body).unwrap(), 200);
        assert_eq!(body, b"abc");
        assert_eq!(read_response(&mut wire, &mut body).unwrap(), 403);
        assert_eq!(body, b"RBAC: n");
        assert!(read_response(&mut wire, &mut body).is_err(), "no more responses: the connection closed");
        let mut cut = Cursor::new(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc".to_vec());
        assert!(read_response(&mut cut, &mut body).is_err(), "a short body is an error");
    }

    #[test]
    fn the_echo_server_answers_each_request_with_its_body() {
        let mut request = request_head("/bench/0/echo", "10.1.2.2:8081", 4);
        request.extend_from_slice(b"\x00\x01\x02\x03");
        let mut wire = Cursor::new(request.clone());
        let mut body = Vec::new();
        let seen = read_request(&mut wire, &mut body).unwrap().unwrap();
        assert_eq!((seen.method.as_str(), seen.path.as_str(), seen.close), ("POST", "/bench/0/echo", false));
        assert_eq!(body, b"\x00\x01\x02\x03");
        assert!(read_request(&mut wire, &mut body).unwrap().is_none());
        let mut out = Vec::new();
        echo_response(&body, &mut out);
        assert_eq!(read_response(&mut Cursor::new(out), &mut body).unwrap(), 200);
        assert_eq!(body, b"\x00\x01\x02\x03");
    }

    #[test]
    fn the_echo_server_keeps_connections_alive_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || super::echo_connection(stream));
            }
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut body = Vec::new();
        // Pipelined: both requests written before either response is read.
        for n in [1_u8, 2] {
            let mut request = request_head(&request_path(n.into()), &addr.to_string(), 1024);
            request.extend(std::iter::repeat_n(n, 1024));
            stream.write_all(&request).unwrap();
        }
        for n in [1_u8, 2] {
            assert_eq!(read_response(&mut reader, &mut body).unwrap(), 200);
            assert_eq!(body, vec![n; 1024]);
        }
    }
}
