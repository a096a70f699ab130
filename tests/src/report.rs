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
