//! The control plane's Prometheus metrics.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
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

/// How a node answered an xDS response.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum XdsOutcome {
    Ack,
    Nack,
}

impl EncodeLabelValue for XdsOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            XdsOutcome::Ack => "ack",
            XdsOutcome::Nack => "nack",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsTypeLabels {
    pub type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsReplyLabels {
    pub type_url: String,
    pub outcome: XdsOutcome,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ca_requests: Family<CaLabels, Counter>,
    pub xds_connected: Gauge,
    pub xds_pushes: Family<XdsTypeLabels, Counter>,
    pub xds_replies: Family<XdsReplyLabels, Counter>,
    pub config_errors: Counter,
    pub config_resources: Family<XdsTypeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nodemesh");
        let metrics = Metrics {
            ca_requests: Family::default(),
            xds_connected: Gauge::default(),
            xds_pushes: Family::default(),
            xds_replies: Family::default(),
            config_errors: Counter::default(),
            config_resources: Family::default(),
            registry: Registry::default(),
        };
        registry.register("ca_requests", "Certificate requests by outcome", metrics.ca_requests.clone());
        registry.register(
            "xds_connected_nodes",
            "Nodes with an open xDS stream",
            metrics.xds_connected.clone(),
        );
        registry.register("xds_pushes", "xDS responses sent, by type", metrics.xds_pushes.clone());
        registry.register("xds_replies", "Node ACKs and NACKs, by type", metrics.xds_replies.clone());
        registry.register(
            "config_errors",
            "Reloads of the manifests that failed (the last good state stays)",
            metrics.config_errors.clone(),
        );
        registry.register("config_resources", "Resources served, by type", metrics.config_resources.clone());
        Metrics { registry, ..metrics }
    }
}

impl Metrics {
    pub fn count(&self, outcome: CaOutcome) {
        self.ca_requests.get_or_create(&CaLabels { outcome }).inc();
    }

    pub fn requests(&self, outcome: CaOutcome) -> u64 {
        self.ca_requests.get_or_create(&CaLabels { outcome }).get()
    }

    pub fn count_push(&self, type_url: &str) {
        self.xds_pushes.get_or_create(&XdsTypeLabels { type_url: type_url.to_owned() }).inc();
    }

    pub fn count_reply(&self, type_url: &str, outcome: XdsOutcome) {
        self.xds_replies.get_or_create(&XdsReplyLabels { type_url: type_url.to_owned(), outcome }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
