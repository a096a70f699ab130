//! Running `curl` as a pod's app would (see [`crate::Topology::curl`]) and reading what it
//! printed: status, headers and body of the final response, or why there was none.

/// Ends curl's output (`--write-out`), after the body: the status and the total time.
pub(crate) const WRITE_OUT_MARKER: &str = "\n@@nodemesh-curl@@";

/// The arguments that make curl print what [`parse`] reads; the caller's come after them.
pub(crate) fn base_args() -> Vec<String> {
    [
        // No ~/.curlrc, no proxies from the environment, no progress meter but errors.
        "-q",
        "--noproxy",
        "*",
        "-sS",
        "--include",
        "--max-time",
        "10",
        "--write-out",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("{WRITE_OUT_MARKER} %{{http_code}} %{{time_total}}")])
    .collect()
}

/// What `curl` got.
#[derive(Clone, Debug, Default)]
pub struct CurlResponse {
    /// curl's exit code: 0, or e.g. 7 (refused), 28 (timed out), 52 (empty reply), 56 (reset).
    pub exit_code: i32,
    /// The final response's status; 0 when there was none.
    pub status: u16,
    /// Its headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// What curl wrote to stderr (its error message).
    pub stderr: String,
    /// From start to the end of the transfer, in seconds.
    pub time_total: f64,
}

impl CurlResponse {
    /// Returns the first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads curl's stdout (`--include` heads, body, then the write-out) into a response.
pub(crate) fn parse(stdout: &str, stderr: &str, exit_code: i32) -> CurlResponse {
    let mut response =
        CurlResponse { exit_code, stderr: stderr.trim().to_owned(), ..CurlResponse::default() };
    let (mut rest, trailer) = stdout.rsplit_once(WRITE_OUT_MARKER).unwrap_or((stdout, ""));
    let mut fields = trailer.split_whitespace();
    response.status = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    response.time_total = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    // Interim (1xx) heads come first; the last head is the final response's.
    while rest.starts_with("HTTP/") {
        let Some((head, after)) = rest.split_once("\r\n\r\n") else { break };
        let mut lines = head.split("\r\n");
        let interim =
            lines.next().and_then(|l| l.split_whitespace().nth(1)).is_some_and(|c| c.starts_with('1'));
        response.headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        rest = after;
        if !interim {
            break;
        }
    }
    response.body = rest.to_owned();
    response
}

#[cfg(test)]
mod tests {
    use super::{WRITE_OUT_MARKER, parse};

    #[test]
    fn the_final_head_and_the_body_are_read_from_the_output() {
        let out = format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\nX-Policy: deny-a1\r\n\r\nRBAC: denied by demo/deny-a1{WRITE_OUT_MARKER} 403 0.012345"
        );
        let response = parse(&out, "", 0);
        assert_eq!(response.status, 403);
        assert_eq!(response.header("x-policy"), Some("deny-a1"));
        assert_eq!(response.headers[0], ("content-type".to_owned(), "text/plain".to_owned()));
        assert_eq!(response.body, "RBAC: denied by demo/deny-a1");
        assert!((response.time_total - 0.012345).abs() < 1e-9);
    }

    #[test]
    fn http2_heads_and_failures_read_too() {
        let out = format!("HTTP/2 200 \r\nx-server: b1\r\n\r\n{{}}{WRITE_OUT_MARKER} 200 0.001");
        let response = parse(&out, "", 0);
        assert_eq!(
            (response.status, response.header("x-server"), response.body.as_str()),
            (200, Some("b1"), "{}")
        );

        let reset = parse(
            &format!("{WRITE_OUT_MARKER} 000 0.002"),
            "curl: (56) Recv failure: Connection reset by peer\n",
            56,
        );
        assert_eq!((reset.status, reset.exit_code, reset.body.as_str()), (0, 56, ""));
        assert_eq!(reset.stderr, "curl: (56) Recv failure: Connection reset by peer");
    }
}
