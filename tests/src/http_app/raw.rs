//! `pod-app raw`: writes bytes exactly as given on one TCP connection and reports what came
//! back, parsed into HTTP/1.x responses. For requests no HTTP library would send, such as the
//! ambiguous framings of request smuggling ([`content_length_and_chunked`],
//! [`two_content_lengths`]).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::report::{RawReport, RawResponse};

/// The path of the request hidden in the smuggling requests below: a server that ever sees it
/// was fooled.
pub const SMUGGLED_PATH: &str = "/smuggled";

/// Returns a `GET path` request for `host`.
pub fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// Returns a POST to `path` whose framing is ambiguous: `Content-Length` covers the whole rest
/// (a chunked terminator, then a GET of [`SMUGGLED_PATH`]), while `Transfer-Encoding: chunked`
/// ends the body at the terminator, which makes the GET a second request. A reader that
/// frames by length and one that frames by chunks disagree on how many requests there are.
pub fn content_length_and_chunked(path: &str, host: &str) -> String {
    let body = format!("0\r\n\r\n{}", get(SMUGGLED_PATH, host));
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    )
}

/// Returns a POST to `path` with two different `Content-Length`s: 0, which makes what follows
/// a GET of [`SMUGGLED_PATH`], and the length of that GET, which makes it the body.
pub fn two_content_lengths(path: &str, host: &str) -> String {
    let body = get(SMUGGLED_PATH, host);
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Connects to `to`, writes `request`, and reads until the peer closes, resets, nothing
/// arrives for `idle`, or `overall` passes.
pub async fn exchange(to: SocketAddr, request: &[u8], idle: Duration, overall: Duration) -> RawReport {
    let mut report = RawReport::default();
    let mut stream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            report.reset = err.kind() == std::io::ErrorKind::ConnectionReset;
            report.error = Some(format!("connect {to}: {err}"));
            return report;
        }
        Err(_) => {
            report.error = Some(format!("connect {to}: timed out"));
            return report;
        }
    };
    report.connected = true;
    if let Err(err) = stream.write_all(request).await {
        report.reset = err.kind() == std::io::ErrorKind::ConnectionReset;
        report.error = Some(format!("write: {err}"));
        return report;
    }
    report.sent = request.len();
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + overall;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) => {
                report.closed = true;
                break;
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(err)) => {
                report.reset = err.kind() == std::io::ErrorKind::ConnectionReset;
                if !report.reset {
                    report.error = Some(format!("read: {err}"));
                }
                break;
            }
            Err(_) => break, // idle, or out of time
        }
    }
    report.responses = parse_responses(&received);
    report.received = String::from_utf8_lossy(&received).into_owned();
    report
}

/// Parses consecutive HTTP/1.x responses (bodies framed by `Content-Length` or chunks; one
/// without either runs to the end). Stops at the first thing that is not a response.
pub fn parse_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut responses = Vec::new();
    while let Some(head_end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let Some(status) = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let rest = &bytes[head_end + 4..];
        let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
            (Vec::new(), 0)
        } else if value("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            dechunk(rest)
        } else if let Some(length) = value("content-length").and_then(|l| l.parse::<usize>().ok()) {
            let length = length.min(rest.len());
            (rest[..length].to_vec(), length)
        } else {
            (rest.to_vec(), rest.len())
        };
        responses.push(RawResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() });
        bytes = &rest[used..];
    }
    responses
}

/// Decodes a chunked body; returns it and how many bytes it took (all of them if unfinished).
fn dechunk(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut body = Vec::new();
    let mut at = 0;
    while let Some(line_end) = find(&bytes[at..], b"\r\n") {
        let size_text = String::from_utf8_lossy(&bytes[at..at + line_end]).into_owned();
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        at += line_end + 2;
        if size == 0 {
            // No trailers: an empty line; else the trailers end with one.
            let tail = &bytes[at..];
            let used = if tail.starts_with(b"\r\n") {
                2
            } else {
                find(tail, b"\r\n\r\n").map_or(tail.len(), |end| end + 4)
            };
            return (body, at + used);
        }
        let end = (at + size).min(bytes.len());
        body.extend_from_slice(&bytes[at..end]);
        at = (end + 2).min(bytes.len());
    }
    (body, bytes.len())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::{SMUGGLED_PATH, content_length_and_chunked, parse_responses, two_content_lengths};

    #[test]
    fn pipelined_responses_are_split_by_their_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Server: b1\r\n\r\nhi\
HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndeny\r\n3\r\n ab\r\n0\r\n\r\n\
HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\nbad";
        let responses = parse_responses(raw);
        let got: Vec<(u16, &str)> = responses.iter().map(|r| (r.status, r.body.as_str())).collect();
        assert_eq!(got, [(200, "hi"), (403, "deny ab"), (400, "bad")]);
        assert_eq!(responses[0].headers[1], ("x-server".to_owned(), "b1".to_owned()));
    }

    #[test]
    fn garbage_and_partial_heads_are_not_responses() {
        assert!(parse_responses(b"").is_empty());
        assert!(parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n").is_empty());
        assert!(parse_responses(b"SSH-2.0-x\r\n\r\n").is_empty());
    }

    #[test]
    fn smuggling_requests_hide_a_second_request_in_an_ambiguous_body() {
        let te = content_length_and_chunked("/first", "web");
        let (head, body) = te.split_once("\r\n\r\n").unwrap();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
        assert_eq!(length, body.len(), "by length, the GET is part of the body");
        assert!(body.starts_with("0\r\n\r\nGET /smuggled HTTP/1.1\r\n"), "by chunks, it is a request");

        let cl = two_content_lengths("/first", "web");
        let (head, body) = cl.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("Content-Length: 0\r\n"));
        assert!(head.ends_with(&format!("Content-Length: {}", body.len())));
        assert!(body.starts_with(&format!("GET {SMUGGLED_PATH} ")));
    }
}
