//! JSON shapes shared with pod-app and mesh-node's admin endpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What `pod-app client` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub ok: bool,
    pub conns: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Peer addresses the server reported seeing (`ip:port`), deduplicated.
    pub peers_seen: Vec<String>,
    pub errors: Vec<String>,
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

/// mesh-node's `GET /pods`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PodsReport {
    pub node: String,
    pub ready: bool,
    pub pods: Vec<PodReport>,
    #[serde(default)]
    pub failed_pods: BTreeMap<String, String>,
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

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PodReport {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub netns_cookie: u64,
    pub outbound: Traffic,
    pub inbound: Traffic,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Traffic {
    pub connections: u64,
    pub active: i64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub failed: u64,
}
