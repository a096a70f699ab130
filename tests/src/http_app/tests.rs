//! The HTTP tools against each other over loopback, in-process: what the end-to-end tests
//! read from them has to be right before it can say anything about the mesh.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;

use super::{
    client::{self, ClientConfig},
    raw::{self, SMUGGLED_PATH},
    server::{self, Framing, ServerConfig},
};
use crate::report::{HttpReport, ServerStats};

async fn start(config: ServerConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(listener, config));
    addr
}

fn named(name: &str) -> ServerConfig {
    ServerConfig { name: name.to_owned(), ..ServerConfig::default() }
}

async fn run(addr: SocketAddr, path: &str, change: impl FnOnce(&mut ClientConfig)) -> HttpReport {
    let mut config = ClientConfig::for_url(&format!("http://{addr}{path}")).unwrap();
    change(&mut config);
    client::run(config).await
}

async fn stats(addr: SocketAddr) -> ServerStats {
    let report = run(addr, "/admin/stats", |_| {}).await;
    serde_json::from_str(&report.first_response.unwrap().body).unwrap()
}

#[tokio::test]
async fn http1_requests_share_one_keep_alive_connection_per_worker() {
    let addr = start(named("s1")).await;
    let report = run(addr, "/hello?x=1", |c| c.requests = 50).await;
    assert!(report.all(200), "{report:?}");
    assert_eq!((report.connections_opened, report.served_by("s1")), (1, 50), "{report:?}");
    assert_eq!(report.server_versions.get("HTTP/1.1"), Some(&50));
    let first = report.first_response.as_ref().unwrap();
    assert_eq!((first.version.as_str(), first.header("x-server")), ("HTTP/1.1", Some("s1")));
    let body: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!((body["path"].as_str(), body["query"].as_str()), (Some("/hello"), Some("x=1")));
    assert_eq!(body["headers"]["host"].as_str(), Some(addr.to_string().as_str()));
    assert!(body["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    let four = run(addr, "/", |c| (c.requests, c.concurrency) = (40, 4)).await;
    assert!(four.all(200), "{four:?}");
    assert_eq!(four.connections_opened, 4, "one connection per worker");
    let stats = stats(addr).await;
    assert_eq!((stats.requests, stats.path("/hello"), stats.path("/")), (90, 50, 40), "admin not counted");
    assert_eq!(stats.connections, 1 + 4 + 1, "the admin request had its own connection");
}

#[tokio::test]
async fn http2_multiplexes_concurrent_requests_over_one_connection() {
    let addr = start(named("s2")).await;
    let report = run(addr, "/", |c| (c.requests, c.concurrency, c.http2) = (200, 20, true)).await;
    assert!(report.all(200), "{report:?}");
    assert_eq!(report.connections_opened, 1);
    assert_eq!(report.server_versions.get("HTTP/2.0"), Some(&200));
    assert_eq!(report.first_response.unwrap().version, "HTTP/2.0");
    assert_eq!(stats(addr).await.by_version.get("HTTP/2.0"), Some(&200));
}

#[tokio::test]
async fn methods_headers_and_bodies_reach_the_server() {
    let addr = start(named("s3")).await;
    let report = run(addr, "/upload", |c| {
        c.method = hyper::Method::PUT;
        c.body_bytes = 100_000;
        c.add_header("x-canary: 1").unwrap();
        c.verbose = true;
    })
    .await;
    let body: serde_json::Value = serde_json::from_str(&report.first_response.unwrap().body).unwrap();
    assert_eq!((body["method"].as_str(), body["body_bytes"].as_u64()), (Some("PUT"), Some(100_000)));
    assert_eq!(body["headers"]["x-canary"].as_str(), Some("1"));
    assert_eq!(report.records.len(), 1);
    assert_eq!((report.records[0].status, report.records[0].server.as_deref()), (Some(200), Some("s3")));
}

#[tokio::test]
async fn fail_first_counts_per_fail_key() {
    let addr = start(ServerConfig { fail_first: 1, ..named("flaky") }).await;
    let keyed = run(addr, "/", |c| {
        c.requests = 3;
        c.add_header("x-fail-key: k1").unwrap();
    })
    .await;
    assert_eq!((keyed.count(503), keyed.count(200)), (1, 2), "{keyed:?}");
    assert_eq!(keyed.first_response.unwrap().status, 503, "the first one fails");
    let other = run(addr, "/", |c| c.add_header("x-fail-key: k2").unwrap()).await;
    assert_eq!(other.count(503), 1, "a new key fails first too");
    let stats = stats(addr).await;
    assert_eq!((stats.by_fail_key["k1"], stats.by_fail_key["k2"]), (3, 1));
    assert_eq!((stats.responses[&503], stats.responses[&200]), (2, 2));
}

#[tokio::test]
async fn delays_are_per_server_or_per_request_and_the_client_times_out() {
    let addr = start(ServerConfig { delay: Duration::from_millis(400), ..named("slow") }).await;
    let late = run(addr, "/", |c| c.timeout = Duration::from_millis(100)).await;
    assert_eq!(late.error_count(), 1, "{late:?}");
    assert!(late.errors.keys().next().unwrap().contains("timed out"), "{late:?}");
    let slow = run(addr, "/", |_| {}).await;
    assert!(slow.all(200) && slow.latency_ms.min >= 400.0, "{slow:?}");
    let fast = run(addr, "/", |c| c.add_header("x-delay-ms: 0").unwrap()).await;
    assert!(fast.all(200) && fast.latency_ms.max < 300.0, "{fast:?}");
    assert_eq!(stats(addr).await.requests, 3, "the abandoned request was counted on arrival");
}

#[tokio::test]
async fn the_status_is_switched_at_run_time() {
    let addr = start(ServerConfig { status: 500, ..named("bad") }).await;
    assert!(run(addr, "/", |c| c.requests = 3).await.all(500));
    assert!(run(addr, "/admin/status?code=200", |_| {}).await.all(200));
    assert!(run(addr, "/", |c| c.requests = 3).await.all(200));
    assert_eq!(run(addr, "/admin/status?code=abc", |_| {}).await.count(400), 1);
    let stats = stats(addr).await;
    assert_eq!((stats.requests, stats.status), (6, 200));
}

#[tokio::test]
async fn a_run_ends_at_its_deadline_and_counts_what_it_did_not_send() {
    let addr = start(ServerConfig { delay: Duration::from_millis(300), ..named("slow") }).await;
    let started = std::time::Instant::now();
    let report = run(addr, "/", |c| (c.requests, c.deadline) = (100, Duration::from_millis(700))).await;
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    assert_eq!(report.count(200), 2, "{report:?}");
    assert_eq!(report.error_count(), 98, "one timed out at the deadline, 97 never sent: {report:?}");
    assert!(report.errors.keys().any(|e| e.starts_with("not sent")), "{report:?}");
}

#[tokio::test]
async fn connection_failures_are_errors_not_responses() {
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let report = run(unused, "/", |c| c.requests = 2).await;
    assert_eq!((report.error_count(), report.connections_opened), (2, 0), "{report:?}");
    assert!(report.errors.keys().all(|e| e.contains("refused")), "{report:?}");
    assert!(report.statuses.is_empty() && report.first_response.is_none());
}

#[tokio::test]
async fn raw_pipelined_requests_get_one_response_each() {
    let addr = start(named("s4")).await;
    let request = format!("{}{}", raw::get("/one", "x"), raw::get("/two", "x"));
    let report =
        raw::exchange(addr, request.as_bytes(), Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_eq!(report.statuses(), [200, 200], "{report:?}");
    let stats = stats(addr).await;
    assert_eq!((stats.path("/one"), stats.path("/two")), (1, 1));
}

/// What each backend does with the smuggling requests when nothing stands in between: hyper
/// is safe on its own, the lenient framings are fooled (which is what makes them useful
/// behind a proxy that might forward such requests as they are).
#[tokio::test]
async fn smuggling_requests_fool_only_the_lenient_framings() {
    let exchange = |addr, request: String| async move {
        raw::exchange(addr, request.as_bytes(), Duration::from_millis(300), Duration::from_secs(5)).await
    };
    let hyper = start(named("hyper")).await;
    let both = exchange(hyper, raw::content_length_and_chunked("/first", "x")).await;
    assert_eq!(both.statuses(), [200], "hyper frames by chunks and closes: {both:?}");
    assert!(both.closed, "{both:?}");
    let two = exchange(hyper, raw::two_content_lengths("/first", "x")).await;
    assert_eq!(two.statuses(), [400], "{two:?}");
    assert_eq!(stats(hyper).await.path(SMUGGLED_PATH), 0);

    let by_length = start(ServerConfig { framing: Framing::FirstContentLength, ..named("cl") }).await;
    let two = exchange(by_length, raw::two_content_lengths("/first", "x")).await;
    assert_eq!(two.statuses(), [200, 200], "{two:?}");
    assert_eq!(stats(by_length).await.path(SMUGGLED_PATH), 1, "fooled by two lengths");

    let by_chunks = start(ServerConfig { framing: Framing::ChunkedKeepAlive, ..named("te") }).await;
    let both = exchange(by_chunks, raw::content_length_and_chunked("/first", "x")).await;
    assert_eq!(both.statuses(), [200, 200], "{both:?}");
    let stats = stats(by_chunks).await;
    assert_eq!((stats.path("/first"), stats.path(SMUGGLED_PATH)), (1, 1), "fooled by both headers");
    let body: serde_json::Value = serde_json::from_str(&both.responses[1].body).unwrap();
    assert_eq!(body["server"].as_str(), Some("te"));
}
