//! JSON shapes shared with pod-app and mesh-node's admin endpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What `pod-app client` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientReport {
    /// Whether every connection succeeded and echoed every byte back intact.
    pub ok: bool,
    /// Connections attempted.
    pub conns: u32,
    /// Connections that completed with a verified echo.
    pub succeeded: u32,
    /// Connections that failed (connect, transfer, verification or timeout).
    pub failed: u32,
    /// Payload bytes sent over the succeeded connections.
    pub bytes_sent: u64,
    /// Echoed bytes received and verified over the succeeded connections.
    pub bytes_received: u64,
    /// Peer addresses the server reported seeing (`ip:port`), deduplicated.
    pub peers_seen: Vec<String>,
    /// The first few errors, as text.
    pub errors: Vec<String>,
    /// Wall time of the whole run.
    pub elapsed_ms: u64,
}

impl ClientReport {
    /// Returns the distinct peer IPs the server saw.
    pub fn peer_ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self
            .peers_seen
            .iter()
            .map(|p| p.rsplit_once(':').map_or(p.as_str(), |(ip, _)| ip).to_owned())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

/// What `pod-app send` prints: a one-way stream per connection, checked by `pod-app sink`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SendReport {
    /// Whether every connection's bytes all arrived, verified by the receiver.
    pub ok: bool,
    /// Connections attempted.
    pub conns: u32,
    /// Connections whose every byte the receiver verified.
    pub succeeded: u32,
    /// Connections that failed (connect, send, verification or timeout).
    pub failed: u32,
    /// Bytes sent over the succeeded connections.
    pub bytes_sent: u64,
    /// Bytes the receiver verified over the succeeded connections.
    pub bytes_verified: u64,
    /// From the first connect to the last receiver's verdict, in microseconds.
    pub elapsed_us: u64,
    /// The first few errors, as text.
    pub errors: Vec<String>,
}

/// mesh-node's `GET /pods`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PodsReport {
    /// The node's name.
    pub node: String,
    /// Whether the node reports ready.
    pub ready: bool,
    /// The enrolled pods with their counters.
    pub pods: Vec<PodReport>,
    /// Pods that could not be enrolled (`namespace/name` → why).
    #[serde(default)]
    pub failed_pods: BTreeMap<String, String>,
    /// Why the last manifest reload failed, while it does (the last good state stays applied).
    #[serde(default)]
    pub source_error: Option<String>,
}

impl PodsReport {
    /// Returns the pod's counters, if it is enrolled.
    pub fn pod(&self, name: &str) -> Option<&PodReport> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Returns the sum of every pod's counters in both directions.
    pub fn total_connections(&self) -> u64 {
        self.pods.iter().map(|p| p.outbound.connections + p.inbound.connections).sum()
    }
}

/// One enrolled pod in `GET /pods`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PodReport {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod IP.
    pub ip: String,
    /// The cookie of the pod's netns (the key of the capture maps).
    pub netns_cookie: u64,
    /// Connections the pod opened, captured by the node proxy.
    pub outbound: Traffic,
    /// Connections to the pod, captured by the node proxy.
    pub inbound: Traffic,
}

/// A pod's counters in one direction, with bytes from the pod's point of view
/// (`outbound.bytes_sent` is what the pod sent as a client, `inbound.bytes_received` what it
/// received as a server).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Traffic {
    /// Connections captured.
    pub connections: u64,
    /// Connections open now.
    pub active: i64,
    /// Bytes the pod sent.
    pub bytes_sent: u64,
    /// Bytes the pod received.
    pub bytes_received: u64,
    /// Captured connections that failed (e.g. the destination refused).
    pub failed: u64,
}

/// What `pod-app http-client` prints: the outcome of every request of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpReport {
    /// Requests attempted.
    pub total: u32,
    /// Responses by status code (a request with no response counts under `errors` instead).
    pub statuses: BTreeMap<u16, u32>,
    /// Responses by the `x-server` header (the pod-app that answered; `-` when absent).
    pub servers: BTreeMap<String, u32>,
    /// The HTTP version each answering server reports it saw (`HTTP/1.1`, `HTTP/2.0`), from
    /// the JSON body of pod-app `http-serve`.
    pub server_versions: BTreeMap<String, u32>,
    /// Requests that got no response, by error message.
    pub errors: BTreeMap<String, u32>,
    /// TCP connections the client opened (successful connects).
    pub connections_opened: u32,
    /// Latencies of the requests that got a response, in milliseconds.
    pub latency_ms: LatencySummary,
    /// Wall time of the whole run, in milliseconds.
    pub elapsed_ms: u64,
    /// The first response: status, headers and body.
    pub first_response: Option<ResponseSample>,
    /// The first body seen for each status code (at most 1 KiB each), to say why it failed.
    pub bodies: BTreeMap<u16, String>,
    /// Every request, with `--verbose`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<RequestRecord>,
}

impl HttpReport {
    /// Returns how many responses had `status`.
    pub fn count(&self, status: u16) -> u32 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Returns how many responses came from the server named `name` (its `x-server`).
    pub fn served_by(&self, name: &str) -> u32 {
        self.servers.get(name).copied().unwrap_or(0)
    }

    /// Returns how many requests got no response at all.
    pub fn error_count(&self) -> u32 {
        self.errors.values().sum()
    }

    /// Returns whether every request got a response with `status`.
    pub fn all(&self, status: u16) -> bool {
        self.total > 0 && self.count(status) == self.total
    }
}

/// Latency percentiles, in milliseconds (0 when nothing was measured).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// One response as the client received it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ResponseSample {
    pub status: u16,
    /// `HTTP/1.1` or `HTTP/2.0`, as received.
    pub version: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, at most 4 KiB of it, as UTF-8 (lossy).
    pub body: String,
}

impl ResponseSample {
    /// Returns the first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One request of a `--verbose` run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Its position in the run (0-based).
    pub index: u32,
    /// Which of the client's connections carried it (0-based, in the order opened).
    pub connection: u32,
    pub status: Option<u16>,
    /// The response's `x-server`.
    pub server: Option<String>,
    pub latency_ms: f64,
    pub error: Option<String>,
}

/// What `pod-app http-serve` answers on `/admin/stats`: every request it received (admin
/// requests aside), counted when it arrived, before any delay or failure.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerStats {
    /// The server's `--name`.
    pub name: String,
    pub requests: u64,
    pub by_path: BTreeMap<String, u64>,
    pub by_method: BTreeMap<String, u64>,
    /// By the HTTP version the server saw (`HTTP/1.1`, `HTTP/2.0`).
    pub by_version: BTreeMap<String, u64>,
    /// By the request's `x-fail-key` header (requests without one count under `""`).
    pub by_fail_key: BTreeMap<String, u64>,
    /// Responses it sent, by status code.
    pub responses: BTreeMap<u16, u64>,
    /// TCP connections it accepted.
    pub connections: u64,
    /// The status it currently answers with (`--status`, or `/admin/status?code=`).
    pub status: u16,
}

impl ServerStats {
    /// Returns how many requests for `path` arrived.
    pub fn path(&self, path: &str) -> u64 {
        self.by_path.get(path).copied().unwrap_or(0)
    }
}

/// What `pod-app raw` prints: bytes written as-is on one TCP connection, and what came back.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RawReport {
    /// Whether the connection was established.
    pub connected: bool,
    /// Bytes written.
    pub sent: usize,
    /// Everything received, as UTF-8 (lossy).
    pub received: String,
    /// The HTTP/1.x responses parsed from what was received, in order.
    pub responses: Vec<RawResponse>,
    /// The peer closed the connection (EOF) before the idle time ran out.
    pub closed: bool,
    /// The peer reset the connection.
    pub reset: bool,
    /// Any other error (connect, write, read), as text.
    pub error: Option<String>,
}

impl RawReport {
    /// Returns the status codes of the responses, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }
}

/// One HTTP/1.x response parsed from raw bytes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}
