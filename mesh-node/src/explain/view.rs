//! The explanation's shape: what `GET /explain` answers and `meshctl explain -o json` prints.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh_policy::authz::{self, Evaluation};
use serde::Serialize;

use crate::{proxy::http::outbound::Failure, traffic::AppProtocol};

/// The explanation: what each step decided, and the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The node that computed it.
    pub node: String,
    pub source: SourceView,
    pub destination: DestinationView,
    /// The request as the client sends it; `None` for a connection whose bytes are not HTTP.
    pub request: Option<RequestView>,
    pub outbound: OutboundView,
    /// The HTTPRoute rule that took the request, if one did.
    pub route: Option<RouteView>,
    /// Where the traffic may end up: one entry per endpoint the source proxy may pick (the
    /// load balancer decides among them at run time), each with its destination's decision.
    pub endpoints: Vec<EndpointView>,
    /// Failures of the source proxy before any endpoint (no such service port, no endpoints,
    /// a backend that does not exist, a non-HTTP connection to a port declared HTTP).
    pub failures: Vec<VerdictView>,
    pub verdict: VerdictView,
}

#[derive(Clone, Debug, Serialize)]
pub struct SourceView {
    pub pod: String,
    pub ip: Ipv4Addr,
    /// Its node, when it is in the mesh (the config names nodes for meshed workloads).
    pub node: Option<String>,
    pub identity: Option<String>,
    pub meshed: bool,
    /// Whether its connections are captured (meshed and enrolled on its node).
    pub captured: bool,
    /// How `captured` is known: from this node's enrolment, or assumed from the config.
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DestinationView {
    /// `service`, `pod` or `ip`.
    pub kind: &'static str,
    /// What the client connects to.
    pub address: SocketAddr,
    /// `<namespace>/<hostname>` of the service.
    pub service: Option<String>,
    pub pod: Option<String>,
    pub port: u16,
    /// The declared protocol of the service port, or of the pod's port.
    pub protocol: AppProtocol,
    pub meshed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestView {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OutboundView {
    pub captured: bool,
    /// How the source proxy reads the connection: `http` (routed request by request), `tcp`
    /// (relayed whole), or `none` (not captured).
    pub handled_as: &'static str,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteView {
    pub route: String,
    pub rule: usize,
    /// The rule's backends with their share of requests; empty: the parent service itself.
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    pub service: String,
    pub port: u16,
    pub weight: u32,
    /// Fraction of requests it receives.
    pub share: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    /// The service whose endpoint this is (`None` for a pod or IP destination).
    pub service: Option<String>,
    /// Share of requests that go to that service (route weights), when routed.
    pub share: Option<f64>,
    pub workload: Option<String>,
    pub address: SocketAddr,
    /// The node hosting it, when it is in the mesh.
    pub node: Option<String>,
    /// The SPIFFE ID it must present (HBONE only).
    pub identity: Option<String>,
    /// `hbone` (mutual TLS) or `plaintext`.
    pub transport: &'static str,
    pub inbound: InboundView,
    pub verdict: VerdictView,
}

#[derive(Clone, Debug, Serialize)]
pub struct InboundView {
    /// The node whose config decided this half.
    pub node: String,
    /// Whether a mesh proxy handles the destination's inbound traffic at all.
    pub enforced: bool,
    /// The caller as the destination sees it: its address and the principal its certificate
    /// proves (none for plaintext).
    pub caller_ip: IpAddr,
    pub caller_principal: Option<String>,
    /// `STRICT` or `PERMISSIVE`, for a meshed destination.
    pub mtls_mode: Option<&'static str>,
    /// `http` (each request decided), `tcp` (the connection decided), `none` (not enforced).
    pub parsed_as: &'static str,
    /// Every policy that applies to the destination workload: whether and why it matched.
    pub policies: Vec<Evaluation>,
    pub decision: Option<DecisionView>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecisionView {
    pub verdict: authz::Verdict,
    pub policy: Option<String>,
    pub reason: String,
    pub audited: Vec<String>,
}

/// What the client sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Effect {
    /// Reaches the app.
    #[serde(rename = "forwarded")]
    Forwarded,
    /// An HTTP 403 from the destination's proxy, naming the policy.
    #[serde(rename = "403")]
    Forbidden,
    /// The connection is reset.
    #[serde(rename = "reset")]
    Reset,
    /// The connection opens, then closes without reaching the app.
    #[serde(rename = "closed")]
    Closed,
    /// 400 from a proxy: bytes that are not HTTP on a port declared HTTP.
    #[serde(rename = "400")]
    BadRequest,
    /// 500 from the source proxy (a route with no usable backend).
    #[serde(rename = "500")]
    ServerError,
    /// 503 from the source proxy (no endpoints, or the endpoint refused the stream).
    #[serde(rename = "503")]
    Unavailable,
    /// Depends on the endpoint the load balancer picks.
    #[serde(rename = "varies")]
    Varies,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerdictView {
    /// `None` when it depends on the endpoint.
    pub allowed: Option<bool>,
    /// The DENY policy that denied, if one did.
    pub by: Option<String>,
    pub effect: Effect,
    pub reason: String,
}

impl VerdictView {
    pub(crate) fn allowed(reason: impl Into<String>) -> Self {
        VerdictView { allowed: Some(true), by: None, effect: Effect::Forwarded, reason: reason.into() }
    }

    pub(crate) fn failed(effect: Effect, by: Option<String>, reason: impl Into<String>) -> Self {
        VerdictView { allowed: Some(false), by, effect, reason: reason.into() }
    }

    pub(crate) fn of_failure((status, flags, message): Failure) -> Self {
        let effect = match status.as_u16() {
            400 => Effect::BadRequest,
            500 => Effect::ServerError,
            _ => Effect::Unavailable,
        };
        VerdictView::failed(effect, None, format!("{status} ({flags}) from the source proxy: {message}"))
    }
}
