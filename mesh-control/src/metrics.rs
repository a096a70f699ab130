//! The control plane's Prometheus metrics.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// How a certificate request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CaOutcome {
    Issued,
    Unauthenticated,
    NotOnNode,
    InvalidRequest,
    Internal,
}

impl EncodeLabelValue for CaOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            CaOutcome::Issued => "issued",
            CaOutcome::Unauthenticated => "unauthenticated",
            CaOutcome::NotOnNode => "not_on_node",
            CaOutcome::InvalidRequest => "invalid_request",
            CaOutcome::Internal => "internal",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    pub outcome: CaOutcome,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ca_requests: Family<CaLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nodemesh");
        let ca_requests = Family::<CaLabels, Counter>::default();
        registry.register("ca_requests", "Certificate requests by outcome", ca_requests.clone());
        Metrics { registry, ca_requests }
    }
}

impl Metrics {
    pub fn count(&self, outcome: CaOutcome) {
        self.ca_requests.get_or_create(&CaLabels { outcome }).inc();
    }

    pub fn requests(&self, outcome: CaOutcome) -> u64 {
        self.ca_requests.get_or_create(&CaLabels { outcome }).get()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
