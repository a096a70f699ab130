//! Prometheus metrics of the node proxy (served on `:15020/metrics`).

use std::fmt::Write as _;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Bytes are counted from the pod's point of view.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Flow {
    Sent,
    Received,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

impl EncodeLabelValue for Flow {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Flow::Sent => "sent",
            Flow::Received => "received",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub namespace: String,
    pub pod: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub namespace: String,
    pub pod: String,
    pub direction: Direction,
    pub flow: Flow,
}

/// The node proxy's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    active: Family<TrafficLabels, Gauge>,
    bytes: Family<ByteLabels, Counter>,
    pods_enrolled: Gauge,
    /// 1 while the xDS stream to mesh-control is open.
    pub xds_connected: Gauge,
    xds_updates: Family<XdsUpdateLabels, Counter>,
    cni_requests: Family<CniLabels, Counter>,
    /// Meshed pods of this node still waiting for the CNI plugin (address or netns unknown).
    pub pods_awaiting_cni: Gauge,
    /// Istio's standard request metrics, unprefixed.
    istio: Registry,
    pub requests: crate::proxy::http::telemetry::RequestMetrics,
    /// Endpoints ejected by outlier detection.
    pub outlier_ejections: Counter,
    /// Connections and requests refused by authorization policy, by layer.
    denied: Family<DeniedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    /// "connection" or "request".
    layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    /// "add", "del", "check".
    command: &'static str,
    /// "enrolled", "outside", "failed", "removed", …
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdsUpdateLabels {
    type_url: String,
    /// "ack" or "nack".
    outcome: &'static str,
}

impl Metrics {
    pub fn count_cni_request(&self, command: &'static str, outcome: &'static str) {
        self.cni_requests.get_or_create(&CniLabels { command, outcome }).inc();
    }

    /// Creates the families; `cert_expiry` (from the identity manager) is registered when given.
    pub fn new(cert_expiry: Option<Family<Vec<(String, String)>, Gauge>>) -> Self {
        let mut registry = Registry::with_prefix("nodemesh");
        let connections = Family::<TrafficLabels, Counter>::default();
        let failed = Family::<TrafficLabels, Counter>::default();
        let active = Family::<TrafficLabels, Gauge>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let pods_enrolled = Gauge::default();
        registry.register(
            "proxy_connections",
            "Captured connections accepted by the node proxy",
            connections.clone(),
        );
        registry.register(
            "proxy_connections_failed",
            "Captured connections the proxy could not complete",
            failed.clone(),
        );
        registry.register("proxy_connections_active", "Captured connections currently open", active.clone());
        registry.register(
            "proxy_bytes",
            "Bytes relayed for captured connections, from the pod's point of view",
            bytes.clone(),
        );
        registry.register("pods_enrolled", "Pods whose traffic this node captures", pods_enrolled.clone());
        let xds_connected = Gauge::default();
        let xds_updates = Family::<XdsUpdateLabels, Counter>::default();
        registry.register(
            "xds_connected",
            "1 while the xDS stream to mesh-control is open",
            xds_connected.clone(),
        );
        registry.register("xds_updates", "xDS updates applied, by type and ACK or NACK", xds_updates.clone());
        let cni_requests = Family::<CniLabels, Counter>::default();
        let pods_awaiting_cni = Gauge::default();
        registry.register(
            "cni_requests",
            "Requests from the CNI plugin, by command and outcome",
            cni_requests.clone(),
        );
        registry.register(
            "pods_awaiting_cni",
            "Meshed pods of this node whose address or netns the CNI plugin has not reported yet",
            pods_awaiting_cni.clone(),
        );
        let outlier_ejections = Counter::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected after consecutive failures (outlier detection)",
            outlier_ejections.clone(),
        );
        let denied = Family::<DeniedLabels, Counter>::default();
        registry.register(
            "authz_denied",
            "Connections and requests denied by authorization policy",
            denied.clone(),
        );
        let mut istio = Registry::default();
        let requests = crate::proxy::http::telemetry::RequestMetrics::register(&mut istio);
        if let Some(family) = cert_expiry {
            registry.register(
                "workload_cert_expiry_timestamp_seconds",
                "When each served identity's current certificate expires (Unix time)",
                family,
            );
        }
        Metrics {
            registry,
            connections,
            failed,
            active,
            bytes,
            pods_enrolled,
            xds_connected,
            xds_updates,
            cni_requests,
            pods_awaiting_cni,
            istio,
            requests,
            outlier_ejections,
            denied,
        }
    }

    /// The counter of denials by policy at `layer` ("connection" or "request").
    pub fn denied(&self, layer: &'static str) -> Counter {
        self.denied.get_or_create(&DeniedLabels { layer }).clone()
    }

    /// Returns the counters of one pod and direction (created on first use).
    pub fn traffic(&self, namespace: &str, pod: &str, direction: Direction) -> TrafficCounters {
        let labels = TrafficLabels { namespace: namespace.to_owned(), pod: pod.to_owned(), direction };
        let bytes = |flow| {
            self.bytes
                .get_or_create(&ByteLabels {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    direction,
                    flow,
                })
                .clone()
        };
        TrafficCounters {
            connections: self.connections.get_or_create(&labels).clone(),
            failed: self.failed.get_or_create(&labels).clone(),
            active: self.active.get_or_create(&labels).clone(),
            bytes_sent: bytes(Flow::Sent),
            bytes_received: bytes(Flow::Received),
        }
    }

    /// Drops a withdrawn pod's series so metrics do not grow with pod churn.
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        for direction in [Direction::Outbound, Direction::Inbound] {
            let labels = TrafficLabels { namespace: namespace.to_owned(), pod: pod.to_owned(), direction };
            self.connections.remove(&labels);
            self.failed.remove(&labels);
            self.active.remove(&labels);
            for flow in [Flow::Sent, Flow::Received] {
                self.bytes.remove(&ByteLabels {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    direction,
                    flow,
                });
            }
        }
    }

    pub fn set_pods_enrolled(&self, n: usize) {
        self.pods_enrolled.set(n as i64);
    }

    /// Renders the registry plus the kernel programs' counters in the text exposition format.
    pub fn count_xds_update(&self, type_url: &str, accepted: bool) {
        let outcome = if accepted { "ack" } else { "nack" };
        self.xds_updates.get_or_create(&XdsUpdateLabels { type_url: type_url.to_owned(), outcome }).inc();
    }

    pub fn render(&self, kernel_stats: &std::collections::BTreeMap<&'static str, u64>) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        let mut out = out.strip_suffix("# EOF\n").unwrap_or(&out).to_owned();
        let mut istio = String::new();
        if encode(&mut istio, &self.istio).is_ok() {
            out.push_str(istio.strip_suffix("# EOF\n").unwrap_or(&istio));
        }
        let _ = writeln!(
            out,
            "# HELP nodemesh_ebpf_events Events counted by the capture programs in the kernel."
        );
        let _ = writeln!(out, "# TYPE nodemesh_ebpf_events counter");
        for (event, value) in kernel_stats {
            let _ = writeln!(out, "nodemesh_ebpf_events_total{{event=\"{event}\"}} {value}");
        }
        out.push_str("# EOF\n");
        out
    }
}

/// Live counters of one pod and direction, shared by the proxy tasks.
#[derive(Clone, Debug)]
pub struct TrafficCounters {
    pub connections: Counter,
    pub failed: Counter,
    pub active: Gauge,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
}

impl TrafficCounters {
    /// Counts a new connection; the returned guard keeps it counted as active until dropped,
    /// so every exit path is accounted for.
    pub fn open(&self) -> ActiveConnection {
        self.connections.inc();
        self.active.inc();
        ActiveConnection { active: self.active.clone() }
    }

    pub fn snapshot(&self) -> TrafficSnapshot {
        TrafficSnapshot {
            connections: self.connections.get(),
            active: self.active.get(),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
            failed: self.failed.get(),
        }
    }
}

/// Decrements the active gauge when the connection ends, however it ends.
#[derive(Debug)]
pub struct ActiveConnection {
    active: Gauge,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// A point-in-time copy of [`TrafficCounters`] for the admin endpoint.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TrafficSnapshot {
    pub connections: u64,
    pub active: i64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pod_counters_and_kernel_events() {
        let m = Metrics::new(None);
        let t = m.traffic("demo", "a1", Direction::Outbound);
        let guard = t.open();
        t.bytes_sent.inc_by(42);
        let stats = [("outbound_redirected", 7u64)].into_iter().collect();
        let text = m.render(&stats);
        assert!(
            text.contains(
                r#"nodemesh_proxy_connections_total{namespace="demo",pod="a1",direction="outbound"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"nodemesh_proxy_bytes_total{namespace="demo",pod="a1",direction="outbound",flow="sent"} 42"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"nodemesh_proxy_connections_active{namespace="demo",pod="a1",direction="outbound"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"nodemesh_ebpf_events_total{event="outbound_redirected"} 7"#), "{text}");
        assert!(text.ends_with("# EOF\n"));
        drop(guard);
        assert_eq!(t.snapshot().active, 0);
        m.forget_pod("demo", "a1");
        assert!(!m.render(&Default::default()).contains("a1"));
    }
}
