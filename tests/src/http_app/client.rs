//! `pod-app http-client`: sends N requests over C workers and reports what came back.
//!
//! HTTP/1.1: each worker keeps one keep-alive connection and opens another only when the
//! server closed it or a request on it failed. HTTP/2 (`--http2`, prior knowledge, h2c): all
//! workers multiplex their requests over one shared connection. The report counts the TCP
//! connections opened, so a test can tell keep-alive and multiplexing from reconnecting.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
    header::{HOST, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};

use crate::report::{HttpReport, LatencySummary, RequestRecord, ResponseSample};

/// The most of a body kept in a report.
const BODY_SAMPLE: usize = 4096;
/// The most of a body kept per status code.
const STATUS_BODY_SAMPLE: usize = 1024;

/// What to send, how often, and how.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Where to connect (the URL's `ip:port`; names are not resolved).
    pub target: SocketAddr,
    /// The URL's authority, sent as `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub authority: String,
    /// The URL's path and query.
    pub path: String,
    pub requests: u32,
    /// Requests in flight at once (workers).
    pub concurrency: u32,
    /// Prior-knowledge HTTP/2 over one connection instead of HTTP/1.1 keep-alive.
    pub http2: bool,
    pub method: Method,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A body of this many bytes (`x`) with every request.
    pub body_bytes: usize,
    /// Per request, from taking a connection to the end of the response body.
    pub timeout: Duration,
    /// For the whole run: requests not started by then are not sent (and count as errors), so
    /// a run against a black hole ends in bounded time.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// Report every request (`records`).
    pub verbose: bool,
}

impl ClientConfig {
    /// Returns the config for `url` (`http://ip:port/path?query`) with one GET and defaults.
    pub fn for_url(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let target: SocketAddr = match authority.parse() {
            Ok(addr) => addr,
            Err(_) => format!("{authority}:80")
                .parse()
                .map_err(|_| format!("{url}: the host must be an IP address (and port)"))?,
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        Ok(ClientConfig {
            target,
            authority: authority.to_owned(),
            path,
            requests: 1,
            concurrency: 1,
            http2: false,
            method: Method::GET,
            headers: Vec::new(),
            body_bytes: 0,
            timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            verbose: false,
        })
    }

    /// Adds a request header given as `name:value`.
    pub fn add_header(&mut self, header: &str) -> Result<(), String> {
        let (name, value) =
            header.split_once(':').ok_or_else(|| format!("header {header:?} is not name:value"))?;
        let name = HeaderName::try_from(name.trim()).map_err(|e| format!("header name {name:?}: {e}"))?;
        let value =
            HeaderValue::try_from(value.trim()).map_err(|e| format!("header value {value:?}: {e}"))?;
        self.headers.push((name, value));
        Ok(())
    }
}

/// What one request came to.
struct Outcome {
    index: u32,
    connection: u32,
    latency: Duration,
    result: Result<Answer, String>,
}

struct Answer {
    sample: ResponseSample,
    /// The HTTP version the server says it saw (pod-app's JSON `version`).
    server_version: Option<String>,
}

/// Runs the requests and returns the report.
pub async fn run(config: ClientConfig) -> HttpReport {
    let config = Arc::new(config);
    let started = Instant::now();
    let deadline = started + config.deadline;
    let next = Arc::new(AtomicU32::new(0));
    let opened = Arc::new(AtomicU32::new(0));
    let shared_h2 = Arc::new(Mutex::new(None));
    let workers: Vec<_> = (0..config.concurrency.max(1))
        .map(|_| {
            let (config, next, opened) = (config.clone(), next.clone(), opened.clone());
            let shared_h2 = shared_h2.clone();
            tokio::spawn(async move {
                if config.http2 {
                    h2_worker(&config, deadline, &next, &opened, &shared_h2).await
                } else {
                    h1_worker(&config, deadline, &next, &opened).await
                }
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(config.requests as usize);
    for worker in workers {
        match worker.await {
            Ok(done) => outcomes.extend(done),
            Err(err) => eprintln!("pod-app: a client worker failed: {err}"),
        }
    }
    outcomes.sort_by_key(|o| o.index);
    let mut report = summarize(&config, outcomes);
    report.connections_opened = opened.load(Ordering::Relaxed);
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

async fn connect(config: &ClientConfig, opened: &AtomicU32) -> Result<(u32, TokioIo<TcpStream>), String> {
    let target = config.target;
    let stream = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(format!("connect {target}: {err}")),
        Err(_) => return Err(format!("connect {target}: timed out after {:?}", config.connect_timeout)),
    };
    let _ = stream.set_nodelay(true);
    Ok((opened.fetch_add(1, Ordering::Relaxed), TokioIo::new(stream)))
}

/// One worker's HTTP/1.1 keep-alive connection.
type H1 = (u32, http1::SendRequest<Full<Bytes>>);

async fn h1_worker(
    config: &ClientConfig,
    deadline: Instant,
    next: &AtomicU32,
    opened: &AtomicU32,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut current: Option<H1> = None;
    loop {
        let started = Instant::now();
        if started >= deadline {
            return outcomes;
        }
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= config.requests {
            return outcomes;
        }
        let timeout = config.timeout.min(deadline - started);
        let mut connection = u32::MAX;
        let attempt = async {
            if let Some((_, sender)) = current.as_mut()
                && sender.ready().await.is_err()
            {
                current = None; // the server closed it: open another
            }
            let (id, sender) = match current.as_mut() {
                Some(held) => held,
                None => current.insert(open_h1(config, opened).await?),
            };
            connection = *id;
            let response = sender.send_request(request(config, false)).await.map_err(|e| describe(&e))?;
            read_answer(response).await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        if result.is_err() {
            current = None; // a failed or abandoned exchange leaves the connection unusable
        }
        outcomes.push(Outcome { index, connection, latency: started.elapsed(), result });
    }
}

async fn open_h1(config: &ClientConfig, opened: &AtomicU32) -> Result<H1, String> {
    let (id, io) = connect(config, opened).await?;
    let (sender, connection) = http1::handshake(io).await.map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("pod-app: HTTP/1.1 connection {id}: {}", describe(&err));
        }
    });
    Ok((id, sender))
}

/// The HTTP/2 connection all workers share.
type H2 = (u32, http2::SendRequest<Full<Bytes>>);

async fn h2_worker(
    config: &ClientConfig,
    deadline: Instant,
    next: &AtomicU32,
    opened: &AtomicU32,
    shared: &Mutex<Option<H2>>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    loop {
        let started = Instant::now();
        if started >= deadline {
            return outcomes;
        }
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= config.requests {
            return outcomes;
        }
        let timeout = config.timeout.min(deadline - started);
        let mut connection = u32::MAX;
        let attempt = async {
            let (id, mut sender) = {
                let mut held = shared.lock().await;
                if held.as_ref().is_none_or(|(_, sender)| sender.is_closed()) {
                    *held = Some(open_h2(config, opened).await?);
                }
                held.clone().ok_or("no HTTP/2 connection")?
            };
            connection = id;
            sender.ready().await.map_err(|e| describe(&e))?;
            let response = sender.send_request(request(config, true)).await.map_err(|e| describe(&e))?;
            read_answer(response).await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        outcomes.push(Outcome { index, connection, latency: started.elapsed(), result });
    }
}

async fn open_h2(config: &ClientConfig, opened: &AtomicU32) -> Result<H2, String> {
    let (id, io) = connect(config, opened).await?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await.map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("pod-app: HTTP/2 connection {id}: {}", describe(&err));
        }
    });
    Ok((id, sender))
}

fn request(config: &ClientConfig, http2: bool) -> Request<Full<Bytes>> {
    // HTTP/2 needs the scheme and authority for its pseudo-headers; HTTP/1.1 sends the
    // origin form and a Host header.
    let uri = if http2 { format!("http://{}{}", config.authority, config.path) } else { config.path.clone() };
    let mut request = Request::new(Full::new(Bytes::from(vec![b'x'; config.body_bytes])));
    *request.method_mut() = config.method.clone();
    *request.uri_mut() = uri.parse().unwrap_or_default();
    let headers = request.headers_mut();
    if !http2
        && !config.headers.iter().any(|(name, _)| name == HOST)
        && let Ok(host) = HeaderValue::from_str(&config.authority)
    {
        headers.insert(HOST, host);
    }
    for (name, value) in &config.headers {
        headers.append(name.clone(), value.clone());
    }
    request
}

async fn read_answer(response: Response<Incoming>) -> Result<Answer, String> {
    let (head, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("reading the body: {}", describe(&e)))?.to_bytes();
    let server_version = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json["version"].as_str().map(str::to_owned));
    let headers = head
        .headers
        .iter()
        .map(|(name, value)| {
            (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
        })
        .collect();
    let body = String::from_utf8_lossy(&body[..body.len().min(BODY_SAMPLE)]).into_owned();
    let sample = ResponseSample {
        status: head.status.as_u16(),
        version: format!("{:?}", head.version),
        headers,
        body,
    };
    Ok(Answer { sample, server_version })
}

/// Returns an error with its causes, `outer: inner: …`.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn summarize(config: &ClientConfig, outcomes: Vec<Outcome>) -> HttpReport {
    let mut report = HttpReport { total: config.requests, ..HttpReport::default() };
    let unsent = config.requests.saturating_sub(outcomes.len() as u32);
    if unsent > 0 {
        report.errors.insert(format!("not sent: the run's deadline ({:?}) passed", config.deadline), unsent);
    }
    let mut latencies = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let latency_ms = outcome.latency.as_secs_f64() * 1000.0;
        let mut record = RequestRecord {
            index: outcome.index,
            connection: outcome.connection,
            latency_ms,
            ..RequestRecord::default()
        };
        match outcome.result {
            Ok(answer) => {
                let status = answer.sample.status;
                let server = answer.sample.header("x-server").unwrap_or("-").to_owned();
                latencies.push(latency_ms);
                *report.statuses.entry(status).or_default() += 1;
                *report.servers.entry(server.clone()).or_default() += 1;
                if let Some(version) = answer.server_version {
                    *report.server_versions.entry(version).or_default() += 1;
                }
                report.bodies.entry(status).or_insert_with(|| {
                    let body = &answer.sample.body;
                    body[..body.floor_char_boundary(STATUS_BODY_SAMPLE)].to_owned()
                });
                (record.status, record.server) = (Some(status), Some(server));
                if report.first_response.is_none() {
                    report.first_response = Some(answer.sample);
                }
            }
            Err(error) => {
                *report.errors.entry(error.clone()).or_default() += 1;
                record.error = Some(error);
            }
        }
        if config.verbose {
            report.records.push(record);
        }
    }
    report.latency_ms = latency_summary(&mut latencies);
    report
}

/// Returns min, nearest-rank p50 and p99, and max.
fn latency_summary(latencies: &mut [f64]) -> LatencySummary {
    if latencies.is_empty() {
        return LatencySummary::default();
    }
    latencies.sort_by(f64::total_cmp);
    let rank =
        |q: f64| latencies[((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1];
    LatencySummary { min: latencies[0], p50: rank(0.5), p99: rank(0.99), max: latencies[latencies.len() - 1] }
}

#[cfg(test)]
mod tests {
    use super::{ClientConfig, latency_summary};

    #[test]
    fn urls_name_an_address_a_host_header_and_a_path() {
        let config = ClientConfig::for_url("http://10.96.0.10:80/public/x?a=1").unwrap();
        assert_eq!(config.target.to_string(), "10.96.0.10:80");
        assert_eq!((config.authority.as_str(), config.path.as_str()), ("10.96.0.10:80", "/public/x?a=1"));
        let config = ClientConfig::for_url("http://10.1.2.2").unwrap();
        assert_eq!((config.target.to_string().as_str(), config.path.as_str()), ("10.1.2.2:80", "/"));
        assert_eq!(ClientConfig::for_url("http://10.1.2.2:8080?x").unwrap().path, "/?x");
        assert!(ClientConfig::for_url("https://10.1.2.2/").is_err());
        assert!(ClientConfig::for_url("http://web.demo/").is_err(), "no name resolution");
    }

    #[test]
    fn headers_are_name_colon_value() {
        let mut config = ClientConfig::for_url("http://127.0.0.1:1/").unwrap();
        config.add_header("x-canary: 1").unwrap();
        assert_eq!((config.headers[0].0.as_str(), config.headers[0].1.to_str().unwrap()), ("x-canary", "1"));
        assert!(config.add_header("no colon").is_err());
        assert!(config.add_header("bad name: v").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut latencies: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let summary = latency_summary(&mut latencies);
        assert_eq!((summary.min, summary.p50, summary.p99, summary.max), (1.0, 50.0, 99.0, 100.0));
        assert_eq!(latency_summary(&mut [7.0]).p99, 7.0);
        assert_eq!(latency_summary(&mut []).max, 0.0);
    }
}
