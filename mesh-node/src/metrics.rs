//! Prometheus metrics of the node proxy (served on `:15020/metrics`).
//!
//! Families under `nodemesh_` (the proxy's own: per-pod traffic, xDS, CNI, capture and the
//! kernel side) and Istio's standard ones, unprefixed (requests in `proxy::http::telemetry`,
//! TCP connections in `connections`).

use std::{
    fmt::Write as _,
    sync::{Arc, atomic::AtomicU64},
    time::SystemTime,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;

use crate::{
    capture::KernelUsage,
    connections::{Connections, TcpMetrics, Tracked},
};

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
    connections_opened: Family<TrafficLabels, Counter>,
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
    /// When each xDS type last had an update applied (Unix seconds).
    xds_last_update: Family<XdsTypeLabels, Gauge<f64, AtomicU64>>,
    /// Every open proxied connection (`/connections`), feeding Istio's TCP metrics.
    pub connections: Arc<Connections>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdsTypeLabels {
    type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
    attach_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    relay: &'static str,
}

/// Where a capture failure was seen.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum FailureSide {
    /// Counted by the kernel programs (the connection was refused or dropped there).
    Kernel,
    /// Counted by the proxy on a captured connection it could not handle.
    Proxy,
}

impl EncodeLabelValue for FailureSide {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            FailureSide::Kernel => "kernel",
            FailureSide::Proxy => "proxy",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaptureFailureLabels {
    reason: &'static str,
    side: FailureSide,
}

/// The kernel events that are capture failures (each refuses or drops a connection).
const KERNEL_FAILURES: [&str; 3] =
    ["outbound_record_failed", "inbound_dropped_no_listener", "inbound_assign_failed"];

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
        let connections_opened = Family::<TrafficLabels, Counter>::default();
        let failed = Family::<TrafficLabels, Counter>::default();
        let active = Family::<TrafficLabels, Gauge>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let pods_enrolled = Gauge::default();
        registry.register(
            "proxy_connections",
            "Captured connections accepted by the node proxy",
            connections_opened.clone(),
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
        let xds_last_update = Family::<XdsTypeLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "xds_last_update_timestamp_seconds",
            "When an update of each xDS type was last applied (Unix time)",
            xds_last_update.clone(),
        );
        let mut istio = Registry::default();
        let requests = crate::proxy::http::telemetry::RequestMetrics::register(&mut istio);
        let connections = Arc::new(Connections::new(TcpMetrics::register(&mut istio)));
        if let Some(family) = cert_expiry {
            registry.register(
                "workload_cert_expiry_timestamp_seconds",
                "When each served identity's current certificate expires (Unix time)",
                family,
            );
        }
        Metrics {
            registry,
            connections_opened,
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
            xds_last_update,
            connections,
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
            connections: self.connections_total(&labels),
            failed: self.failed.get_or_create(&labels).clone(),
            active: self.active.get_or_create(&labels).clone(),
            bytes_sent: bytes(Flow::Sent),
            bytes_received: bytes(Flow::Received),
            table: self.connections.clone(),
            namespace: namespace.into(),
            pod: pod.into(),
            direction,
        }
    }

    fn connections_total(&self, labels: &TrafficLabels) -> Counter {
        self.connections_opened.get_or_create(labels).clone()
    }

    /// Drops a withdrawn pod's series so metrics do not grow with pod churn.
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        for direction in [Direction::Outbound, Direction::Inbound] {
            let labels = TrafficLabels { namespace: namespace.to_owned(), pod: pod.to_owned(), direction };
            self.connections_opened.remove(&labels);
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

    /// Counts an xDS update the node ACKed or NACKed; an ACKed one also sets the type's
    /// last-update time (the age of the config in force shows as `time() - …`).
    pub fn count_xds_update(&self, type_url: &str, accepted: bool) {
        let outcome = if accepted { "ack" } else { "nack" };
        self.xds_updates.get_or_create(&XdsUpdateLabels { type_url: type_url.to_owned(), outcome }).inc();
        if accepted {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            self.xds_last_update
                .get_or_create(&XdsTypeLabels { type_url: type_url.to_owned() })
                .set(now.as_secs_f64());
        }
    }

    /// Renders every family in the OpenMetrics text format: the node's own, Istio's, and the
    /// kernel side's (read at scrape time into a registry of their own, so the whole
    /// exposition is encoded by the same encoder and is valid by construction).
    pub fn render(&self, kernel: &KernelUsage) -> String {
        let mut out = String::new();
        for registry in [&self.registry, &self.istio, &self.kernel_registry(kernel)] {
            let mut text = String::new();
            if encode(&mut text, registry).is_ok() {
                out.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
            }
        }
        out.push_str("# EOF\n");
        out
    }

    fn kernel_registry(&self, kernel: &KernelUsage) -> Registry {
        let mut registry = Registry::with_prefix("nodemesh");
        let events = Family::<EventLabels, Counter>::default();
        for (event, value) in &kernel.events {
            events.get_or_create(&EventLabels { event }).inc_by(*value);
        }
        registry.register("ebpf_events", "Events counted by the capture programs in the kernel", events);
        let failures = Family::<CaptureFailureLabels, Counter>::default();
        for reason in KERNEL_FAILURES {
            let value = kernel.events.get(reason).copied().unwrap_or(0);
            failures.get_or_create(&CaptureFailureLabels { reason, side: FailureSide::Kernel }).inc_by(value);
        }
        for reason in [
            crate::connections::CaptureFailure::NoOriginalDestination,
            crate::connections::CaptureFailure::CaptureLoop,
            crate::connections::CaptureFailure::DeliveryRegistration,
        ] {
            let value = self
                .connections
                .capture_failures()
                .get_or_create(&crate::connections::CaptureFailureLabels { reason })
                .get();
            failures
                .get_or_create(&CaptureFailureLabels { reason: reason.label(), side: FailureSide::Proxy })
                .inc_by(value);
        }
        registry.register(
            "capture_failures",
            "Captured connections refused or dropped because capture could not complete, by reason",
            failures,
        );
        let entries = Family::<MapLabels, Gauge>::default();
        let max_entries = Family::<MapLabels, Gauge>::default();
        for fill in &kernel.maps {
            let labels = MapLabels { map: fill.map };
            entries.get_or_create(&labels).set(i64::try_from(fill.entries).unwrap_or(i64::MAX));
            max_entries.get_or_create(&labels).set(i64::try_from(fill.max_entries).unwrap_or(i64::MAX));
        }
        registry.register(
            "ebpf_map_entries",
            "Entries in each BPF map (approximate while it changes)",
            entries,
        );
        registry.register("ebpf_map_max_entries", "Capacity of each BPF map", max_entries);
        let programs = Family::<ProgramLabels, Gauge>::default();
        for attached in &kernel.programs {
            programs
                .get_or_create(&ProgramLabels {
                    program: attached.program,
                    attach_type: attached.attach_type,
                })
                .set(i64::try_from(attached.links).unwrap_or(i64::MAX));
        }
        registry.register(
            "ebpf_programs_attached",
            "Links attaching each kernel program (sk_lookup: one per enrolled pod)",
            programs,
        );
        if let Some(relayed) = kernel.relayed {
            let connections = Family::<RelayLabels, Counter>::default();
            for (relay, value) in [
                ("kernel", relayed.kernel),
                ("proxy", relayed.proxy),
                ("failed", relayed.failed),
                ("taken_over", relayed.taken_over),
            ] {
                connections.get_or_create(&RelayLabels { relay }).inc_by(value);
            }
            registry.register(
                "plaintext_relay_connections",
                "Plain TCP connections by who relayed their bytes: the kernel (sk_skb redirect), the \
                 proxy (over within the warm-up, or bulk), or failed (relay maps full); and \
                 taken_over: directions the proxy took back from the kernel (slow receiver, bulk)",
                connections,
            );
            let active = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
            active.set(i64::try_from(relayed.active).unwrap_or(i64::MAX));
            registry.register(
                "plaintext_relay_kernel_active",
                "Plain TCP connections open in the kernel relay",
                active,
            );
        }
        registry
    }
}

/// Live counters of one pod and direction, shared by the proxy tasks, and the node's table of
/// open connections they register in.
#[derive(Clone, Debug)]
pub struct TrafficCounters {
    pub connections: Counter,
    pub failed: Counter,
    pub active: Gauge,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    table: Arc<Connections>,
    namespace: Arc<str>,
    pod: Arc<str>,
    direction: Direction,
}

impl TrafficCounters {
    /// Registers a new connection of this pod and direction, from `source` (for outbound,
    /// the pod's own address in the mesh); it is listed, counted and logged until dropped.
    pub fn track(&self, source: std::net::SocketAddr) -> Tracked {
        self.table.open(
            self.direction,
            &self.namespace,
            &self.pod,
            source,
            (self.bytes_sent.clone(), self.bytes_received.clone()),
        )
    }

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
        let kernel = KernelUsage {
            events: [("outbound_redirected", 7u64), ("inbound_dropped_no_listener", 2)].into_iter().collect(),
            maps: vec![crate::capture::usage::MapFill { map: "DELIVERIES", entries: 3, max_entries: 65536 }],
            programs: vec![crate::capture::usage::Attached {
                program: "capture_inbound",
                attach_type: "sk_lookup",
                links: 2,
            }],
            relayed: Some(crate::proxy::kernel_relay::RelayedConnections {
                active: 2,
                kernel: 5,
                proxy: 1,
                failed: 0,
                taken_over: 3,
            }),
        };
        let text = m.render(&kernel);
        assert!(text.contains(r#"nodemesh_plaintext_relay_connections_total{relay="kernel"} 5"#), "{text}");
        assert!(text.contains("nodemesh_plaintext_relay_kernel_active 2"), "{text}");
        assert!(
            text.contains(r#"nodemesh_plaintext_relay_connections_total{relay="taken_over"} 3"#),
            "{text}"
        );
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
        assert!(
            text.contains(
                r#"nodemesh_capture_failures_total{reason="inbound_dropped_no_listener",side="kernel"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"nodemesh_ebpf_map_entries{map="DELIVERIES"} 3"#), "{text}");
        assert!(text.contains(r#"nodemesh_ebpf_map_max_entries{map="DELIVERIES"} 65536"#), "{text}");
        assert!(
            text.contains(
                r#"nodemesh_ebpf_programs_attached{program="capture_inbound",attach_type="sk_lookup"} 2"#
            ),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"));
        drop(guard);
        assert_eq!(t.snapshot().active, 0);
        m.forget_pod("demo", "a1");
        assert!(!m.render(&Default::default()).contains("a1"));
    }
}
