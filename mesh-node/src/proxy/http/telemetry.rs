//! Per-request telemetry with Istio's standard metric names and labels (so existing dashboards
//! work) and one JSON-able access log line per request.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// "source" (the client's node proxy) or "destination" (the server's).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Envoy-style flags for what the proxy did: "-" none, "UF" upstream connect failure, "UT"
    /// timeout, "UO" overflow (circuit open), "NR" no route/backend, "UH" no healthy endpoint,
    /// "RBAC" denied by policy.
    pub response_flags: &'static str,
    /// "mutual_tls" or "none".
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration_ms: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
}

const DURATION_BUCKETS_MS: [f64; 15] =
    [0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0];
const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100_000.0, 1_000_000.0, 10_000_000.0];

impl RequestMetrics {
    /// Registers the families (unprefixed: Istio's names) in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = RequestMetrics {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_MS)),
            request_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
            response_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS)),
        };
        registry.register("istio_requests", "Requests handled by the node proxy", metrics.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration as the proxy saw it",
            metrics.duration_ms.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes", metrics.request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", metrics.response_bytes.clone());
        metrics
    }

    pub fn record(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration_ms.get_or_create(labels).observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.get_or_create(labels).observe(request_bytes as f64);
        self.response_bytes.get_or_create(labels).observe(response_bytes as f64);
    }
}
