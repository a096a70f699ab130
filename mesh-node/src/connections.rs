//! Every proxied connection while it is open: the live table behind the admin endpoint's
//! `/connections`, Istio's standard TCP metrics, and one structured log event per connection
//! when it closes.
//!
//! A connection is registered by the proxy path that accepts it ([`Connections::open`]) and
//! is represented by a [`Tracked`] guard: dropping the guard, on whatever exit path, removes
//! the entry, counts the close and logs the connection. Bytes are counted by the relay loop
//! (or the HTTP stream wrapper) per read or write, with atomics only: no lock on the data path.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;

use crate::{
    metrics::Direction,
    proxy::{ProxyError, protocol::Protocol, relay::Meter},
};

/// Istio's `reporter` label: which end's proxy counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The client's node proxy (outbound connections).
    Source,
    /// The server's node proxy (inbound connections).
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        })
    }
}

/// Istio's `connection_security_policy` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        })
    }
}

/// Istio's TCP metric labels (the same conventions as the request metrics in
/// `proxy::http::telemetry`: workloads are pod names, principals full SPIFFE URIs, "unknown"
/// for what the reporting proxy cannot know or was not proven).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// Always "tcp": these count connections, whatever they carry.
    pub request_protocol: &'static str,
    /// Envoy-style: "-" none, "UF" upstream connect failure, "UO" circuit open, "UH" no healthy
    /// endpoint, "NR" not routable (capture failure), "RBAC" denied by policy or mTLS mode.
    pub response_flags: &'static str,
    pub connection_security_policy: SecurityPolicy,
}

/// Istio's standard TCP metrics, unprefixed. Both reporters count in Istio's directions:
/// `istio_tcp_received_bytes_total` is what the client sent to the server (the request
/// direction) and `istio_tcp_sent_bytes_total` what the server sent back (the response
/// direction), whichever end reports. From a pod's point of view that means: on the source
/// side, the pod's sent bytes are "received"; on the destination side, the pod's sent bytes
/// (the app's replies) are "sent".
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    /// Registers the families under Istio's names in `registry` (which must be unprefixed).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = TcpMetrics::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened through the node proxy",
            metrics.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed through the node proxy",
            metrics.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes the destination sent back to the source (response direction)",
            metrics.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the source sent to the destination (request direction)",
            metrics.received_bytes.clone(),
        );
        metrics
    }
}

/// Why a captured connection could not be handled as captured.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CaptureFailure {
    /// Accepted on 15001 with no original destination recorded for it.
    NoOriginalDestination,
    /// A 15006 accept from one of the proxy's own deliveries (a capture loop).
    CaptureLoop,
    /// The delivery could not be registered with sk_lookup.
    DeliveryRegistration,
}

impl CaptureFailure {
    pub fn label(self) -> &'static str {
        match self {
            CaptureFailure::NoOriginalDestination => "no_original_destination",
            CaptureFailure::CaptureLoop => "capture_loop",
            CaptureFailure::DeliveryRegistration => "delivery_registration",
        }
    }

    fn of(error: &ProxyError) -> Option<Self> {
        match error {
            ProxyError::NoOriginalDestination => Some(CaptureFailure::NoOriginalDestination),
            ProxyError::Loop { .. } => Some(CaptureFailure::CaptureLoop),
            ProxyError::Capture(_) => Some(CaptureFailure::DeliveryRegistration),
            _ => None,
        }
    }
}

impl EncodeLabelValue for CaptureFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureFailureLabels {
    pub reason: CaptureFailure,
}

/// How the connection travels between the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Hbone,
    Plaintext,
}

/// What the destination's policies made of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyResult {
    Allow,
    Deny,
    /// Parsed as HTTP: each request is decided on its own.
    PerRequest,
}

impl PolicyResult {
    fn as_str(self) -> &'static str {
        match self {
            PolicyResult::Allow => "allow",
            PolicyResult::Deny => "deny",
            PolicyResult::PerRequest => "per_request",
        }
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
    }
}

/// What is learnt about a connection as it is set up (changes a few times per connection,
/// never per byte).
#[derive(Clone, Debug)]
struct Details {
    /// The peer's end: the client for inbound, the destination for outbound.
    source: SocketAddr,
    destination: Option<SocketAddr>,
    /// SPIFFE IDs proven by mutual TLS on this connection (none for plaintext).
    local_identity: Option<String>,
    remote_identity: Option<String>,
    /// `ns/name` of the workload at the other end, when the node knows it.
    remote_workload: Option<String>,
    service: Option<String>,
    transport: Transport,
    protocol: Protocol,
    policy: Option<PolicyResult>,
    response_flags: &'static str,
    error: Option<String>,
}

/// One open connection.
#[derive(Debug)]
struct Connection {
    id: u64,
    direction: Direction,
    namespace: Arc<str>,
    name: Arc<str>,
    opened_at: SystemTime,
    started: Instant,
    details: Mutex<Details>,
    /// From the pod's point of view.
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

/// One row of `/connections`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ConnectionView {
    pub id: u64,
    pub direction: &'static str,
    pub pod: String,
    pub source: String,
    pub destination: Option<String>,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    pub service: Option<String>,
    pub transport: Transport,
    pub protocol: &'static str,
    pub policy: Option<PolicyResult>,
    pub opened_at: String,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Connection {
    fn view(&self, now: Instant) -> ConnectionView {
        let d = lock(&self.details).clone();
        let (source, destination, source_identity, destination_identity) = match self.direction {
            Direction::Outbound => (d.source, d.destination, d.local_identity, d.remote_identity),
            Direction::Inbound => (d.source, d.destination, d.remote_identity, d.local_identity),
        };
        ConnectionView {
            id: self.id,
            direction: direction_name(self.direction),
            pod: format!("{}/{}", self.namespace, self.name),
            source: source.to_string(),
            destination: destination.map(|a| a.to_string()),
            source_identity,
            destination_identity,
            service: d.service,
            transport: d.transport,
            protocol: protocol_name(d.protocol),
            policy: d.policy,
            opened_at: rfc3339(self.opened_at),
            duration_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
        }
    }

    /// Istio's labels for this connection as known now.
    fn labels(&self) -> TcpLabels {
        let d = lock(&self.details);
        let unknown = || "unknown".to_owned();
        let (remote_ns, remote_name) = match d.remote_workload.as_deref().and_then(|w| w.split_once('/')) {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (unknown(), unknown()),
        };
        let local_principal = d.local_identity.clone().unwrap_or_else(unknown);
        let remote_principal = d.remote_identity.clone().unwrap_or_else(unknown);
        let service = d
            .service
            .as_deref()
            .map(|key| key.split_once('/').map_or(key, |(_, host)| host).to_owned())
            .unwrap_or_else(unknown);
        let security = match d.transport {
            Transport::Hbone => SecurityPolicy::MutualTls,
            Transport::Plaintext => SecurityPolicy::None,
        };
        let (local_ns, local_name) = (self.namespace.to_string(), self.name.to_string());
        match self.direction {
            Direction::Outbound => TcpLabels {
                reporter: Reporter::Source,
                source_workload: local_name,
                source_workload_namespace: local_ns,
                source_principal: local_principal,
                destination_workload: remote_name,
                destination_workload_namespace: remote_ns,
                destination_principal: remote_principal,
                destination_service: service,
                request_protocol: "tcp",
                response_flags: d.response_flags,
                connection_security_policy: security,
            },
            Direction::Inbound => TcpLabels {
                reporter: Reporter::Destination,
                source_workload: remote_name,
                source_workload_namespace: remote_ns,
                source_principal: remote_principal,
                destination_workload: local_name,
                destination_workload_namespace: local_ns,
                destination_principal: local_principal,
                destination_service: service,
                request_protocol: "tcp",
                response_flags: d.response_flags,
                connection_security_policy: security,
            },
        }
    }
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

/// The node's open connections and the metrics they feed.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Connection>>>,
    tcp: TcpMetrics,
    capture_failures: Family<CaptureFailureLabels, Counter>,
}

impl Connections {
    /// Returns an empty table feeding `tcp`.
    pub fn new(tcp: TcpMetrics) -> Self {
        Connections { tcp, ..Default::default() }
    }

    /// Registers a connection of the pod `namespace/name` accepted from `source` (for
    /// outbound, the pod's own address in the mesh). It stays listed until the guard drops.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        namespace: &Arc<str>,
        name: &Arc<str>,
        source: SocketAddr,
        counters: (Counter, Counter),
    ) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let connection = Arc::new(Connection {
            id,
            direction,
            namespace: namespace.clone(),
            name: name.clone(),
            opened_at: SystemTime::now(),
            started: Instant::now(),
            details: Mutex::new(Details {
                source,
                destination: None,
                local_identity: None,
                remote_identity: None,
                remote_workload: None,
                service: None,
                transport: Transport::Plaintext,
                protocol: Protocol::Tcp,
                policy: None,
                response_flags: "-",
                error: None,
            }),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        });
        lock(&self.live).insert(id, connection.clone());
        tracing::debug!(
            target: "connection", id, direction = direction_name(direction), pod = %format!("{namespace}/{name}"),
            src.addr = %source, "connection opened"
        );
        Tracked {
            connection,
            table: self.clone(),
            pod_sent: counters.0,
            pod_received: counters.1,
            istio: Mutex::new(None),
        }
    }

    /// Returns the open connections, oldest first.
    pub fn list(&self) -> Vec<ConnectionView> {
        let live: Vec<Arc<Connection>> = lock(&self.live).values().cloned().collect();
        let now = Instant::now();
        let mut views: Vec<ConnectionView> = live.iter().map(|c| c.view(now)).collect();
        views.sort_by_key(|v| v.id);
        views
    }

    /// The counts of captured connections the proxy could not handle, by reason.
    pub fn capture_failures(&self) -> &Family<CaptureFailureLabels, Counter> {
        &self.capture_failures
    }
}

/// The Istio counters of one connection, fixed once its labels are known.
#[derive(Debug, Clone)]
struct IstioCounters {
    /// The labels the open was counted with; the close is counted with the same ones, so
    /// opened and closed match per series.
    labels: TcpLabels,
    /// Pod sent / pod received, mapped to Istio's request/response directions.
    pod_sent: Counter,
    pod_received: Counter,
}

/// An open connection; dropping it closes the entry (listing, metrics, log).
#[derive(Debug)]
pub struct Tracked {
    connection: Arc<Connection>,
    table: Arc<Connections>,
    pod_sent: Counter,
    pod_received: Counter,
    istio: Mutex<Option<IstioCounters>>,
}

/// Counts one direction of a connection: the pod's counter, the connection's live count and
/// Istio's byte counter, one atomic add each per chunk.
#[derive(Debug)]
pub struct FlowMeter {
    pod: Counter,
    istio: Counter,
    connection: Arc<Connection>,
    sent: bool,
}

impl Meter for FlowMeter {
    fn add(&self, bytes: u64) {
        self.pod.inc_by(bytes);
        self.istio.inc_by(bytes);
        let live = if self.sent { &self.connection.bytes_sent } else { &self.connection.bytes_received };
        live.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Tracked {
    fn details(&self) -> std::sync::MutexGuard<'_, Details> {
        lock(&self.connection.details)
    }

    pub fn set_source(&self, source: SocketAddr) {
        self.details().source = source;
    }

    pub fn set_destination(&self, destination: SocketAddr) {
        self.details().destination = Some(destination);
    }

    /// Records the workload (`ns/name`) at the other end, when the node knows it.
    pub fn set_remote_workload(&self, workload: Option<String>) {
        self.details().remote_workload = workload;
    }

    /// Records the service (`ns/hostname`) the connection was addressed to.
    pub fn set_service(&self, service: &str) {
        self.details().service = Some(service.to_owned());
    }

    /// Records that the connection travels over HBONE, with the identities mutual TLS proves.
    pub fn set_mtls(&self, local: String, remote: String) {
        let mut d = self.details();
        d.transport = Transport::Hbone;
        d.local_identity = Some(local);
        d.remote_identity = Some(remote);
    }

    pub fn set_protocol(&self, protocol: Protocol) {
        self.details().protocol = protocol;
    }

    pub fn set_policy(&self, policy: PolicyResult) {
        self.details().policy = Some(policy);
    }

    /// Sets the response flags explicitly (before [`Tracked::fail`], which keeps them).
    pub fn set_flags(&self, flags: &'static str) {
        self.details().response_flags = flags;
    }

    /// Records why the connection failed; counts capture failures.
    pub fn fail(&self, error: &ProxyError) {
        if let Some(reason) = CaptureFailure::of(error) {
            self.table.capture_failures.get_or_create(&CaptureFailureLabels { reason }).inc();
        }
        let mut d = self.details();
        if d.response_flags == "-" {
            d.response_flags = match error {
                ProxyError::NoOriginalDestination | ProxyError::Loop { .. } => "NR",
                ProxyError::Denied(_) | ProxyError::PlaintextRefused { .. } => "RBAC",
                _ => "UF",
            };
        }
        if matches!(error, ProxyError::Denied(_) | ProxyError::PlaintextRefused { .. }) {
            d.policy = Some(PolicyResult::Deny);
        }
        d.error = Some(error.to_string());
    }

    /// Records a failure that is not a [`ProxyError`] (e.g. an I/O error on an HBONE stream).
    pub fn fail_with(&self, flags: &'static str, error: String) {
        let mut d = self.details();
        if d.response_flags == "-" {
            d.response_flags = flags;
        }
        d.error = Some(error);
    }

    /// Counts the connection as opened in Istio's metrics (once, with the labels known now)
    /// and returns its two byte meters: (the pod sends, the pod receives).
    pub fn meters(&self) -> (FlowMeter, FlowMeter) {
        let counters = self.istio_counters();
        let meter = |pod: &Counter, istio: Counter, sent| FlowMeter {
            pod: pod.clone(),
            istio,
            connection: self.connection.clone(),
            sent,
        };
        (
            meter(&self.pod_sent, counters.pod_sent, true),
            meter(&self.pod_received, counters.pod_received, false),
        )
    }

    fn istio_counters(&self) -> IstioCounters {
        let mut istio = lock(&self.istio);
        if let Some(counters) = istio.as_ref() {
            return counters.clone();
        }
        let labels = self.connection.labels();
        let tcp = &self.table.tcp;
        tcp.opened.get_or_create(&labels).inc();
        let sent = tcp.sent_bytes.get_or_create(&labels).clone();
        let received = tcp.received_bytes.get_or_create(&labels).clone();
        // Istio: received = request direction (client → server), sent = response direction.
        let (pod_sent, pod_received) = match self.connection.direction {
            Direction::Outbound => (received, sent),
            Direction::Inbound => (sent, received),
        };
        let counters = IstioCounters { labels, pod_sent, pod_received };
        *istio = Some(counters.clone());
        counters
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.table.live).remove(&self.connection.id);
        let c = &self.connection;
        let d = lock(&c.details).clone();
        // A connection that never got as far as its destination is no Istio connection.
        if d.destination.is_some() {
            let opened = lock(&self.istio).as_ref().map(|counters| counters.labels.clone());
            let labels = opened.unwrap_or_else(|| {
                let labels = c.labels();
                self.table.tcp.opened.get_or_create(&labels).inc();
                labels
            });
            self.table.tcp.closed.get_or_create(&labels).inc();
        }
        let view = c.view(Instant::now());
        let none = "-";
        let policy = d.policy.map_or(none, PolicyResult::as_str);
        let destination = view.destination.as_deref().unwrap_or(none);
        let src_identity = view.source_identity.as_deref().unwrap_or(none);
        let dst_identity = view.destination_identity.as_deref().unwrap_or(none);
        let service = view.service.as_deref().unwrap_or(none);
        let transport = match d.transport {
            Transport::Hbone => "hbone",
            Transport::Plaintext => "plaintext",
        };
        match &d.error {
            None => tracing::info!(
                target: "connection", id = c.id, direction = view.direction, pod = %view.pod,
                src.addr = %view.source, dst.addr = destination, src.identity = src_identity,
                dst.identity = dst_identity, service, transport, protocol = view.protocol,
                bytes.sent = view.bytes_sent, bytes.received = view.bytes_received,
                duration_ms = view.duration_ms, policy, flags = d.response_flags, "connection closed"
            ),
            Some(error) => tracing::warn!(
                target: "connection", id = c.id, direction = view.direction, pod = %view.pod,
                src.addr = %view.source, dst.addr = destination, src.identity = src_identity,
                dst.identity = dst_identity, service, transport, protocol = view.protocol,
                bytes.sent = view.bytes_sent, bytes.received = view.bytes_received,
                duration_ms = view.duration_ms, policy, flags = d.response_flags, error = %error,
                "connection failed"
            ),
        }
    }
}

/// Formats a time as RFC 3339 in UTC with milliseconds (`2026-11-01T12:34:56.789Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::with_capacity(24);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    );
    out
}

#[cfg(test)]
mod tests;
