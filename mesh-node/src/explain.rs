//! `meshctl explain`: why a connection or request from a pod to a destination is allowed or
//! denied, and where it goes, computed from what this node holds with the proxy's own decision
//! functions (destination lookup, protocol detection, route selection, backend resolution,
//! header changes, the authorization checks), so the answer cannot drift from what traffic gets.
//!
//! Every node receives the whole mesh (xDS is not filtered per node), so one node can explain
//! any pair. The source's node is authoritative for the outbound half (capture, routing, the
//! transport) and each destination's node for its inbound half (its policies, its CA): `meshctl`
//! asks both and merges, so version skew between nodes shows up as it would in traffic.
//! Everything here is pure: [`explain`] reads a [`NodeState`] and returns a value.

mod resolve;
mod steps;
#[cfg(test)]
mod tests;
mod view;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use hyper::HeaderMap;

use mesh_api::SpiffeId;
use mesh_manifests::PodKey;

pub use view::*;

use crate::{
    desired::MeshView,
    proxy::{
        authz::Caller,
        protocol::{self, Protocol},
    },
    traffic::{AppProtocol, Traffic},
};
use resolve::{Target, find_pod, http_request, pods, resolve};
use steps::Context;

/// What to explain: `GET /explain?from=<ns/pod>&to=<dest>[&port=P][&method=M&path=/p][&header=k:v…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The source pod: `<namespace>/<name>`, or a name only one namespace has.
    pub from: String,
    /// A pod (`<namespace>/<name>`), a service hostname (`web.demo.svc.cluster.local`,
    /// `web.demo`), or an IP address, optionally with `:port`.
    pub to: String,
    pub port: Option<u16>,
    /// The request, when the client speaks HTTP/1.1; `None`: bytes that are not HTTP.
    pub http: Option<HttpQuery>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpQuery {
    pub method: String,
    /// With the query string, if any.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Why a query cannot be explained; each is one line naming the input at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("missing parameter {0:?}")]
    Missing(&'static str),
    #[error("{name} {value:?}: {why}")]
    Invalid { name: &'static str, value: String, why: String },
    #[error("unknown pod {0:?}: no workload of that name in the mesh config")]
    UnknownPod(String),
    #[error("pod name {name:?} is ambiguous: {candidates} (write <namespace>/<name>)")]
    AmbiguousPod { name: String, candidates: String },
    #[error("pod {0} has no address yet")]
    NoAddress(String),
    #[error(
        "unknown destination {0:?}: not a pod (<namespace>/<name>), a service hostname \
         (<name>.<namespace>[.svc.cluster.local]) or an IP address"
    )]
    UnknownDestination(String),
    #[error("service {0} is headless (no cluster IP): explain one of its pods instead")]
    Headless(String),
    #[error("{0}: which port? give --port")]
    NoPort(String),
    #[error("two ports: {to} and --port {port}")]
    TwoPorts { to: String, port: u16 },
}

impl Query {
    /// Reads the admin endpoint's query parameters.
    pub fn from_params(params: &[(String, String)]) -> Result<Query, ExplainError> {
        let one = |name: &'static str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let required = |name: &'static str| {
            one(name).filter(|v| !v.is_empty()).map(str::to_owned).ok_or(ExplainError::Missing(name))
        };
        let port = match one("port") {
            None | Some("") => None,
            Some(p) => Some(parse_port(p).map_err(|why| ExplainError::Invalid {
                name: "port",
                value: p.into(),
                why,
            })?),
        };
        let headers = params
            .iter()
            .filter(|(k, _)| k == "header")
            .map(|(_, v)| {
                let (name, value) = v.split_once(':').ok_or_else(|| ExplainError::Invalid {
                    name: "header",
                    value: v.clone(),
                    why: "not <name>:<value>".into(),
                })?;
                Ok((name.trim().to_owned(), value.trim().to_owned()))
            })
            .collect::<Result<Vec<_>, ExplainError>>()?;
        let http = match (one("method"), one("path")) {
            (None, None) if headers.is_empty() => None,
            (None, None) => {
                return Err(ExplainError::Invalid {
                    name: "header",
                    value: format!("{}:{}", headers[0].0, headers[0].1),
                    why: "headers need an HTTP request (method and path)".into(),
                });
            }
            (method, path) => Some(HttpQuery {
                method: method.unwrap_or("GET").to_owned(),
                path: path.unwrap_or("/").to_owned(),
                headers,
            }),
        };
        Ok(Query { from: required("from")?, to: required("to")?, port, http })
    }
}

pub(crate) fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err("not a port (1-65535)".into()),
        Ok(port) => Ok(port),
    }
}

/// What the node holds, gathered by the admin endpoint.
pub struct NodeState<'a> {
    /// This node's name.
    pub node: &'a str,
    /// Whether this node has a mesh CA (then meshed pods talk HBONE).
    pub mesh_ca: bool,
    pub view: &'a MeshView,
    pub traffic: &'a Traffic,
    /// The identity a meshed address must present (the proxy's mesh view).
    pub identity_of: &'a dyn Fn(IpAddr) -> Option<SpiffeId>,
    /// The pods this node has enrolled (captured) right now.
    pub enrolled_here: &'a BTreeSet<PodKey>,
}

/// Returns one verdict for all the outcomes traffic may meet: theirs when they agree (allowed,
/// effect and policy), else "varies" (the endpoint the load balancer picks decides). `meshctl`
/// uses the same rule after merging each destination node's inbound half.
pub fn combine<'a>(outcomes: impl IntoIterator<Item = &'a VerdictView>) -> VerdictView {
    let outcomes: Vec<&VerdictView> = outcomes.into_iter().collect();
    let Some(first) = outcomes.first() else {
        return VerdictView::failed(Effect::Unavailable, None, "nowhere to go");
    };
    let same = |v: &&VerdictView| v.allowed == first.allowed && v.effect == first.effect && v.by == first.by;
    if outcomes.iter().all(same) {
        return (*first).clone();
    }
    VerdictView {
        allowed: None,
        by: None,
        effect: Effect::Varies,
        reason: "depends on the endpoint the request goes to (see each endpoint)".into(),
    }
}

/// Explains `query` from what the node holds.
pub fn explain(state: &NodeState<'_>, query: &Query) -> Result<Explanation, ExplainError> {
    let pods = pods(state.view);
    let source = find_pod(&pods, &query.from)?;
    let source_ip = source.ip.ok_or_else(|| ExplainError::NoAddress(source.key.to_string()))?;
    let (target, port) = resolve(state, &pods, &query.to, query.port)?;
    let host = match &target {
        Target::Service { host, .. } => host.clone(),
        Target::Pod(_, ip) | Target::Ip(ip) => ip.to_string(),
    };
    let request = query.http.as_ref().map(|h| http_request(h, &host, port)).transpose()?;
    // What the proxies' sniffing finds in the client's first bytes.
    let sniffed = Some(
        request
            .as_ref()
            .map_or(Protocol::Tcp, |r| protocol::classify(&r.first_bytes()).unwrap_or(Protocol::Tcp)),
    );

    let (captured, note) = match (&source.node, source.meshed) {
        (_, false) => (false, "not in the mesh: its traffic is not captured".to_owned()),
        (Some(node), true) if node == state.node => {
            let enrolled = state.enrolled_here.contains(&source.key);
            let note = if enrolled {
                format!("enrolled on {node}: captured")
            } else {
                format!("meshed but not enrolled on {node} (see /pods failed_pods): not captured")
            };
            (enrolled, note)
        }
        (node, true) => (
            true,
            format!(
                "meshed on {}: captured (as the config says; its node knows for sure)",
                node.as_deref().unwrap_or("?")
            ),
        ),
    };
    let source_identity = if source.meshed { (state.identity_of)(IpAddr::V4(source_ip)) } else { None };
    let source_view = SourceView {
        pod: source.key.to_string(),
        ip: source_ip,
        node: source.node.clone(),
        identity: source_identity.as_ref().map(ToString::to_string),
        meshed: source.meshed,
        captured,
        note,
    };
    let destination = destination_view(state, &target, port);
    // HBONE when this node has a CA and the source is captured (its proxy holds the source's
    // certificate); the caller then proves the source's identity.
    let hbone_source = captured && state.mesh_ca;
    let caller =
        Caller::new(state.traffic, IpAddr::V4(source_ip), if hbone_source { source_identity } else { None });
    let cx = Context {
        state,
        pods: &pods,
        caller: &caller,
        hbone_source,
        sniffed,
        source_namespace: &source.key.namespace,
    };

    let mut explanation = Explanation {
        node: state.node.to_owned(),
        source: source_view,
        destination,
        request: request.as_ref().map(|r| RequestView {
            method: r.method.clone(),
            path: r.query.as_ref().map_or_else(|| r.path.clone(), |q| format!("{}?{q}", r.path)),
            host: r.host.clone(),
            headers: header_list(&r.headers),
        }),
        outbound: OutboundView { captured, handled_as: "none", note: String::new() },
        route: None,
        endpoints: Vec::new(),
        failures: Vec::new(),
        verdict: VerdictView::allowed(""),
    };
    match target {
        Target::Service { service, .. } if captured => {
            cx.through_service(&mut explanation, &service, port, request.as_ref());
        }
        Target::Service { service, .. } => {
            explanation.outbound.note = "not captured: the cluster IP is the cluster's service proxy's \
                (kube-proxy) to handle, not the mesh's; no HTTPRoute applies"
                .into();
            let endpoints = service.endpoints(port);
            if endpoints.is_empty() {
                explanation.failures.push(VerdictView::failed(
                    Effect::Reset,
                    None,
                    format!("service {} port {port} has no endpoints", service.key),
                ));
            }
            for endpoint in endpoints {
                let view = cx.endpoint(
                    Some(&service.key),
                    None,
                    Some(endpoint.workload.clone()),
                    endpoint.addr,
                    None,
                    request.as_ref(),
                    false,
                );
                explanation.endpoints.push(view);
            }
        }
        Target::Pod(_, ip) | Target::Ip(ip) => {
            let addr = SocketAddr::new(ip, port);
            let workload = cx.pod_at(ip).map(|p| p.key.to_string());
            // As the outbound proxy decides: HBONE to meshed addresses when it has a CA.
            let expected = if hbone_source { (state.identity_of)(ip) } else { None };
            explanation.outbound.handled_as = if captured { "tcp" } else { "none" };
            explanation.outbound.note = match (captured, &expected) {
                (false, _) => "not captured: the connection goes out as the app made it".into(),
                (true, Some(id)) => format!("captured; a meshed destination: HBONE, expecting {id}"),
                (true, None) => {
                    "captured; the destination is outside the mesh: plain TCP from the pod".into()
                }
            };
            let view = cx.endpoint(None, None, workload, addr, expected, request.as_ref(), false);
            explanation.endpoints.push(view);
        }
    }
    explanation.verdict =
        combine(explanation.endpoints.iter().map(|e| &e.verdict).chain(explanation.failures.iter()));
    Ok(explanation)
}

pub(crate) fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect()
}

fn destination_view(state: &NodeState<'_>, target: &Target, port: u16) -> DestinationView {
    match target {
        Target::Service { service, vip, .. } => DestinationView {
            kind: "service",
            address: SocketAddr::new(*vip, port),
            service: Some(service.key.clone()),
            pod: None,
            port,
            protocol: service.port(port).map_or(AppProtocol::Detect, |p| p.protocol),
            meshed: false,
        },
        Target::Pod(pod, ip) => DestinationView {
            kind: "pod",
            address: SocketAddr::new(*ip, port),
            service: None,
            pod: Some(pod.key.to_string()),
            port,
            protocol: state.traffic.declared_protocol(*ip, port),
            meshed: pod.meshed,
        },
        Target::Ip(ip) => DestinationView {
            kind: "ip",
            address: SocketAddr::new(*ip, port),
            service: None,
            pod: None,
            port,
            protocol: state.traffic.declared_protocol(*ip, port),
            meshed: false,
        },
    }
}
