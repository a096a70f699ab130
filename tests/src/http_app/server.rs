//! `pod-app http-serve`: HTTP/1.1 and prior-knowledge HTTP/2 (h2c) on one port, detected per
//! connection. Every answer is JSON naming the server and echoing what it saw (method, path,
//! query, headers, peer, version) with an `x-server` header, so a client behind the mesh can
//! tell which endpoint answered and what the proxies changed.
//!
//! Behaviours for the tests: `--fail-first N` answers 503 to the first N requests (counted per
//! `x-fail-key` header), `--delay-ms` (or a request's `x-delay-ms`) delays answers, `--status`
//! sets the status of every other answer. `/admin/status?code=S` changes that status at run
//! time and `/admin/stats` returns [`ServerStats`]; admin requests are not counted.
//! `--framing` swaps hyper for a deliberately lenient HTTP/1.1 parser ([`super::lenient`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, header::HeaderValue, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use tokio::net::TcpListener;

use crate::report::ServerStats;

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Its name, in the `x-server` header and the body.
    pub name: String,
    /// Answer 503 to the first this many requests of each `x-fail-key` (no header: key `""`).
    pub fail_first: u64,
    /// Delay before every answer, unless the request's `x-delay-ms` says otherwise.
    pub delay: Duration,
    /// The status of every answer that is not a `fail_first` failure.
    pub status: u16,
    /// How request bodies are framed.
    pub framing: Framing,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: "pod-app".to_owned(),
            fail_first: 0,
            delay: Duration::ZERO,
            status: 200,
            framing: Framing::Standard,
        }
    }
}

/// How the server frames HTTP/1.1 request bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// hyper: RFC 9112 (HTTP/1.1 and h2c), refusing ambiguous framing or closing after it.
    Standard,
    /// Lenient: the first `Content-Length` frames the body; `Transfer-Encoding` and further
    /// lengths are ignored (fooled by two different lengths).
    FirstContentLength,
    /// Lenient: `Transfer-Encoding: chunked` frames the body and `Content-Length` is ignored,
    /// and the connection stays open afterwards (fooled by both headers at once).
    ChunkedKeepAlive,
}

impl FromStr for Framing {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "standard" => Ok(Framing::Standard),
            "first-content-length" => Ok(Framing::FirstContentLength),
            "chunked-keep-alive" => Ok(Framing::ChunkedKeepAlive),
            other => {
                Err(format!("framing {other:?}: one of standard, first-content-length, chunked-keep-alive"))
            }
        }
    }
}

/// A request as the server saw it.
pub(super) struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    /// Lower-case names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub peer: SocketAddr,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What the server shares between connections.
pub(super) struct State {
    config: ServerConfig,
    status: AtomicU16,
    stats: Mutex<ServerStats>,
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, ServerStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request on arrival (a request the mesh gives up on, e.g. on a timeout, was
    /// still seen) and returns whether it is one of the `fail_first`.
    pub(super) fn arrived(&self, seen: &Seen) -> bool {
        let mut stats = self.stats();
        stats.requests += 1;
        *stats.by_path.entry(seen.path.clone()).or_default() += 1;
        *stats.by_method.entry(seen.method.clone()).or_default() += 1;
        *stats.by_version.entry(seen.version.clone()).or_default() += 1;
        let key = seen.header("x-fail-key").unwrap_or_default().to_owned();
        let count = stats.by_fail_key.entry(key).or_default();
        *count += 1;
        *count <= self.config.fail_first
    }

    /// Returns how long to wait before answering `seen`.
    pub(super) fn delay(&self, seen: &Seen) -> Duration {
        seen.header("x-delay-ms")
            .and_then(|ms| ms.parse().ok())
            .map_or(self.config.delay, Duration::from_millis)
    }

    /// Returns the answer to `seen`: its status and JSON body.
    pub(super) fn answer(&self, seen: &Seen, failing: bool, body_bytes: usize) -> (u16, serde_json::Value) {
        let status = if failing { 503 } else { self.status.load(Ordering::Relaxed) };
        *self.stats().responses.entry(status).or_default() += 1;
        let body = json!({
            "server": self.config.name,
            "method": seen.method,
            "path": seen.path,
            "query": seen.query,
            "headers": seen.headers,
            "peer": seen.peer.to_string(),
            "version": seen.version,
            "body_bytes": body_bytes,
            "status": status,
        });
        (status, body)
    }

    /// Answers `/admin/<what>?<query>`: `stats`, or `status?code=S`.
    pub(super) fn admin(&self, what: &str, query: &str) -> (u16, serde_json::Value) {
        match what {
            "stats" => (200, serde_json::to_value(&*self.stats()).unwrap_or_default()),
            "status" => {
                let code = query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("code="))
                    .and_then(|code| code.parse::<u16>().ok())
                    .filter(|code| StatusCode::from_u16(*code).is_ok());
                match code {
                    Some(code) => {
                        self.status.store(code, Ordering::Relaxed);
                        self.stats().status = code;
                        (200, json!({ "status": code }))
                    }
                    None => (400, json!({ "error": "want /admin/status?code=<100-999>" })),
                }
            }
            _ => (404, json!({ "error": format!("no admin path /admin/{what}") })),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.config.name
    }
}

/// Serves HTTP on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: ServerConfig) -> std::io::Result<()> {
    let stats = ServerStats { name: config.name.clone(), status: config.status, ..ServerStats::default() };
    let state = Arc::new(State { status: AtomicU16::new(config.status), config, stats: Mutex::new(stats) });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("pod-app: accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        state.stats().connections += 1;
        let state = state.clone();
        tokio::spawn(async move {
            let framing = state.config.framing;
            let served = match framing {
                Framing::Standard => {
                    let service = service_fn(move |request| handle(state.clone(), peer, request));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    builder.serve_connection(TokioIo::new(stream), service).await.map_err(|e| e.to_string())
                }
                lenient => super::lenient::serve_connection(stream, peer, &state, lenient)
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(err) = served {
                eprintln!("pod-app: HTTP connection from {peer}: {err}");
            }
        });
    }
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = request.into_parts();
    let query = head.uri.query().unwrap_or("").to_owned();
    if let Some(admin) = head.uri.path().strip_prefix("/admin/") {
        let (status, body) = state.admin(admin, &query);
        return Ok(json_response(&state, status, &body));
    }
    let headers = head
        .headers
        .keys()
        .map(|name| {
            let values: Vec<&str> =
                head.headers.get_all(name).iter().map(|v| v.to_str().unwrap_or("<binary>")).collect();
            (name.as_str().to_owned(), values.join(", "))
        })
        .collect();
    let seen = Seen {
        method: head.method.to_string(),
        path: head.uri.path().to_owned(),
        query,
        version: format!("{:?}", head.version),
        headers,
        peer,
    };
    let failing = state.arrived(&seen);
    let body_bytes = match body.collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(err) => {
            eprintln!("pod-app: reading the body of {} {} from {peer}: {err}", seen.method, seen.path);
            0
        }
    };
    let delay = state.delay(&seen);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, body) = state.answer(&seen, failing, body_bytes);
    Ok(json_response(&state, status, &body))
}

fn json_response(state: &State, status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(name) = HeaderValue::from_str(state.name()) {
        headers.insert("x-server", name);
    }
    response
}
