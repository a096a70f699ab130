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

#[cfg(test)]
mod tests;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use hyper::{
    HeaderMap,
    header::{HeaderName, HeaderValue},
};
use mesh_api::SpiffeId;
use mesh_manifests::{MtlsMode, PodKey};
use mesh_policy::{
    authz::{self, Decision, Evaluation},
    route::{self, RouteRequest},
};
use serde::Serialize;

use crate::{
    desired::MeshView,
    proxy::{
        authz::{
            Caller, Detail, Workload, decide_connection, decide_request, inbound_parsing, refuses_plaintext,
        },
        http::outbound::{Failure, backend_target, upstream_headers},
        protocol::{self, Protocol},
    },
    traffic::{AppProtocol, ServiceEntry, Traffic},
};

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

fn parse_port(text: &str) -> Result<u16, String> {
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
    fn allowed(reason: impl Into<String>) -> Self {
        VerdictView { allowed: Some(true), by: None, effect: Effect::Forwarded, reason: reason.into() }
    }

    fn failed(effect: Effect, by: Option<String>, reason: impl Into<String>) -> Self {
        VerdictView { allowed: Some(false), by, effect, reason: reason.into() }
    }

    fn of_failure((status, flags, message): Failure) -> Self {
        let effect = match status.as_u16() {
            400 => Effect::BadRequest,
            500 => Effect::ServerError,
            _ => Effect::Unavailable,
        };
        VerdictView::failed(effect, None, format!("{status} ({flags}) from the source proxy: {message}"))
    }
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

/// A pod as the config describes it.
#[derive(Clone, Debug)]
struct Pod {
    key: PodKey,
    ip: Option<Ipv4Addr>,
    meshed: bool,
    node: Option<String>,
    mtls_mode: Option<MtlsMode>,
}

fn pods(view: &MeshView) -> Vec<Pod> {
    let mut pods: Vec<Pod> = view
        .workloads
        .iter()
        .map(|w| Pod {
            key: w.key.clone(),
            ip: w.ip,
            meshed: true,
            node: Some(w.node.clone()),
            mtls_mode: Some(w.mtls_mode),
        })
        .collect();
    for endpoint in &view.traffic.endpoints {
        if !pods.iter().any(|p| p.key == endpoint.key) {
            pods.push(Pod {
                key: endpoint.key.clone(),
                ip: Some(endpoint.ip),
                meshed: false,
                node: None,
                mtls_mode: None,
            });
        }
    }
    pods
}

/// Finds a pod by `<namespace>/<name>`, or by a name only one namespace has.
fn find_pod(pods: &[Pod], name: &str) -> Result<Pod, ExplainError> {
    if let Some((namespace, pod)) = name.split_once('/') {
        return pods
            .iter()
            .find(|p| p.key.namespace == namespace && p.key.name == pod)
            .cloned()
            .ok_or_else(|| ExplainError::UnknownPod(name.into()));
    }
    let found: Vec<&Pod> = pods.iter().filter(|p| p.key.name == name).collect();
    match found.as_slice() {
        [] => Err(ExplainError::UnknownPod(name.into())),
        [one] => Ok((*one).clone()),
        many => Err(ExplainError::AmbiguousPod {
            name: name.into(),
            candidates: many.iter().map(|p| p.key.to_string()).collect::<Vec<_>>().join(", "),
        }),
    }
}

enum Target {
    Service { service: Arc<ServiceEntry>, vip: IpAddr, host: String },
    Pod(Pod, IpAddr),
    Ip(IpAddr),
}

/// Resolves the destination as DNS and the connect() would: a hostname to the service's
/// cluster IP; then the address as the proxy sees it (a service's cluster IP, a pod, or other).
fn resolve(
    state: &NodeState<'_>,
    pods: &[Pod],
    to: &str,
    port: Option<u16>,
) -> Result<(Target, u16), ExplainError> {
    let (host, written_port) = split_port(to);
    let written_port = match written_port {
        Some(p) => {
            Some(parse_port(p).map_err(|why| ExplainError::Invalid { name: "to", value: to.into(), why })?)
        }
        None => None,
    };
    let port = match (written_port, port) {
        (Some(a), Some(b)) if a != b => return Err(ExplainError::TwoPorts { to: to.into(), port: b }),
        (a, b) => a.or(b),
    };
    let by_ip = |ip: IpAddr, host: String| -> Target {
        if let Some(service) = state.traffic.service_at(ip) {
            return Target::Service { service: service.clone(), vip: ip, host };
        }
        match pods.iter().find(|p| p.ip.map(IpAddr::V4) == Some(ip)) {
            Some(pod) => Target::Pod(pod.clone(), ip),
            None => Target::Ip(ip),
        }
    };
    let target = if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        by_ip(crate::traffic::unmap(ip), host.to_owned())
    } else if host.contains('/') {
        let pod = find_pod(pods, host)?;
        let ip = pod.ip.ok_or_else(|| ExplainError::NoAddress(pod.key.to_string()))?;
        Target::Pod(pod, IpAddr::V4(ip))
    } else if let Some(service) = service_by_host(state, host) {
        let vip = *service.vips.first().ok_or_else(|| ExplainError::Headless(service.key.clone()))?;
        Target::Service { service, vip, host: host.to_owned() }
    } else {
        match find_pod(pods, host) {
            Ok(pod) => {
                let ip = pod.ip.ok_or_else(|| ExplainError::NoAddress(pod.key.to_string()))?;
                Target::Pod(pod, IpAddr::V4(ip))
            }
            Err(ExplainError::UnknownPod(_)) => return Err(ExplainError::UnknownDestination(to.into())),
            Err(other) => return Err(other),
        }
    };
    let port = match (&target, port) {
        (_, Some(port)) => port,
        (Target::Service { service, .. }, None) if service.ports.len() == 1 => service.ports[0].port,
        (Target::Service { service, .. }, None) => {
            let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
            return Err(ExplainError::NoPort(format!(
                "service {} has ports {}",
                service.key,
                ports.join(", ")
            )));
        }
        (_, None) => return Err(ExplainError::NoPort(to.into())),
    };
    Ok((target, port))
}

/// Splits `host:port` (and `[v6]:port`); a bare IPv6 address has no port.
fn split_port(to: &str) -> (&str, Option<&str>) {
    if let Some(rest) = to.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (to, None),
        };
    }
    match to.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (to, None),
    }
}

/// A service by hostname: its full name, `<name>.<namespace>` or `<name>.<namespace>.svc`.
fn service_by_host(state: &NodeState<'_>, host: &str) -> Option<Arc<ServiceEntry>> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let mut found: Vec<&Arc<ServiceEntry>> = state
        .traffic
        .services()
        .filter(|s| {
            let short = format!("{}.{}", s.name, s.namespace);
            let hostname = s.key.split_once('/').map_or("", |(_, h)| h);
            hostname == host || short == host || format!("{short}.svc") == host
        })
        .collect();
    found.sort_by(|a, b| a.key.cmp(&b.key));
    found.first().map(|s| (*s).clone())
}

/// The HTTP request as the proxies will read it.
struct Http {
    method: String,
    path: String,
    query: Option<String>,
    host: String,
    headers: HeaderMap,
}

impl Http {
    fn attributes(&self) -> authz::Request<'_> {
        authz::Request { method: &self.method, path: &self.path, host: &self.host, headers: &self.headers }
    }

    fn first_bytes(&self) -> Vec<u8> {
        format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes()
    }
}

fn http_request(query: &HttpQuery, host: &str, port: u16) -> Result<Http, ExplainError> {
    let invalid =
        |name, value: &str, why: &str| ExplainError::Invalid { name, value: value.into(), why: why.into() };
    let method = &query.method;
    if method.is_empty()
        || method.bytes().any(|b| b.is_ascii_lowercase())
        || hyper::Method::from_bytes(method.as_bytes()).is_err()
    {
        return Err(invalid("method", method, "not an HTTP method (uppercase token)"));
    }
    if !query.path.starts_with('/')
        || query.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(invalid("path", &query.path, "must start with / and hold no spaces"));
    }
    let (path, query_string) = match query.path.split_once('?') {
        Some((path, q)) => (path.to_owned(), Some(q.to_owned())),
        None => (query.path.clone(), None),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &query.headers {
        let header = format!("{name}:{value}");
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| invalid("header", &header, "not a valid header name"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid("header", &header, "not a valid header value"))?;
        headers.append(name, value);
    }
    // As curl writes it: the URL's host, with the port unless it is 80.
    if !headers.contains_key(hyper::header::HOST) {
        let default = if port == 80 { host.to_owned() } else { format!("{host}:{port}") };
        let value =
            HeaderValue::from_str(&default).map_err(|_| invalid("to", host, "not usable as a Host"))?;
        headers.insert(hyper::header::HOST, value);
    }
    let host = headers.get(hyper::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    Ok(Http { method: method.clone(), path, query: query_string, host, headers })
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
    let cx = Context { state, pods: &pods, caller: &caller, hbone_source, sniffed };

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

fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
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

/// What every step shares.
struct Context<'a> {
    state: &'a NodeState<'a>,
    pods: &'a [Pod],
    caller: &'a Caller,
    hbone_source: bool,
    sniffed: Option<Protocol>,
}

impl Context<'_> {
    fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ip.map(IpAddr::V4) == Some(ip))
    }

    /// The source proxy's handling of a connection to a service's cluster IP (`to_service`, then
    /// HTTP routing when it parses HTTP).
    fn through_service(
        &self,
        out: &mut Explanation,
        service: &Arc<ServiceEntry>,
        port: u16,
        request: Option<&Http>,
    ) {
        let Some(service_port) = service.port(port) else {
            out.outbound.handled_as = "tcp";
            out.outbound.note = format!("captured; service {} has no port {port}", service.key);
            out.failures.push(VerdictView::failed(
                Effect::Reset,
                None,
                format!("service {} has no port {port}: the source proxy resets the connection", service.key),
            ));
            return;
        };
        let parsing = self.state.traffic.outbound_parsing(service, service_port);
        let read_as = protocol::decide(parsing, self.sniffed);
        let traffic = self.state.traffic;
        if !read_as.is_http() {
            out.outbound.handled_as = "tcp";
            out.outbound.note = format!(
                "captured; service {} port {port} ({parsing:?}) read as TCP: one endpoint per connection, no routes",
                service.key
            );
            let endpoints = service.endpoints(port);
            if endpoints.is_empty() {
                out.failures.push(VerdictView::failed(
                    Effect::Reset,
                    None,
                    format!(
                        "service {} port {port} has no endpoints: the source proxy resets the connection",
                        service.key
                    ),
                ));
            }
            for endpoint in endpoints {
                // As `to_service`: HBONE to an endpoint with an identity when the node has a CA.
                let expected = endpoint.identity.clone().filter(|_| self.hbone_source);
                let view = self.endpoint(
                    Some(&service.key),
                    None,
                    Some(endpoint.workload.clone()),
                    endpoint.addr,
                    expected,
                    request,
                    false,
                );
                out.endpoints.push(view);
            }
            return;
        }
        out.outbound.handled_as = "http";
        let Some(request) = request else {
            out.outbound.note = format!("captured; service {} port {port} is declared HTTP", service.key);
            out.failures.push(VerdictView::failed(
                Effect::BadRequest,
                None,
                "the port is declared HTTP and the bytes are not: the source proxy answers 400",
            ));
            return;
        };
        out.outbound.note = format!(
            "captured; service {} port {port} ({parsing:?}) read as HTTP: routed, balanced and retried request by request",
            service.key
        );
        let attributes = RouteRequest {
            method: &request.method,
            path: &request.path,
            query: request.query.as_deref(),
            host: &request.host,
            headers: &request.headers,
        };
        let matched = route::select(traffic.routes(), &service.key, port, &attributes);
        let mut upstream = request.headers.clone();
        upstream_headers(&mut upstream, matched.as_ref());
        let forwarded = Http {
            method: request.method.clone(),
            path: request.path.clone(),
            query: request.query.clone(),
            host: request.host.clone(),
            headers: upstream,
        };
        // The backends the rule may pick, with their share of requests.
        let mut choices: Vec<(Option<&route::Backend>, Option<f64>)> = vec![(None, None)];
        if let Some(m) = &matched {
            let total: u64 = m.rule.backends.iter().map(|b| u64::from(b.weight)).sum();
            out.route = Some(RouteView {
                route: m.route.key().to_owned(),
                rule: m.rule_index,
                backends: m
                    .rule
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        service: b.service.clone(),
                        port: if b.port == 0 { port } else { b.port },
                        weight: b.weight,
                        share: if total == 0 { 0.0 } else { f64::from(b.weight) / total as f64 },
                    })
                    .collect(),
            });
            if !m.rule.backends.is_empty() {
                choices = m
                    .rule
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .map(|b| (Some(b), Some(f64::from(b.weight) / total as f64)))
                    .collect();
                if choices.is_empty() {
                    out.failures.push(VerdictView::of_failure((
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        "NR",
                        format!("route {} rule {}: every backend has weight 0", m.route.key(), m.rule_index),
                    )));
                }
            }
        }
        for (backend, share) in choices {
            let (target, target_port) =
                match backend_target(traffic, service, port, matched.as_ref(), backend) {
                    Ok(target) => target,
                    Err(failure) => {
                        out.failures.push(VerdictView::of_failure(failure));
                        continue;
                    }
                };
            let endpoints = target.endpoints(target_port);
            if endpoints.is_empty() {
                out.failures.push(VerdictView::of_failure((
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    format!("{} port {target_port} has no endpoints", target.key),
                )));
            }
            for endpoint in endpoints {
                // As the pooled upstream connector: HBONE to meshed addresses.
                let expected =
                    if self.hbone_source { (self.state.identity_of)(endpoint.addr.ip()) } else { None };
                let view = self.endpoint(
                    Some(&target.key),
                    share,
                    Some(endpoint.workload.clone()),
                    endpoint.addr,
                    expected,
                    Some(&forwarded),
                    true,
                );
                out.endpoints.push(view);
            }
        }
    }

    /// One endpoint: how the source reaches it and what its destination proxy decides.
    /// `expected`: the identity it must present (HBONE), none for plaintext. `source_http`: the
    /// source proxy itself sends the request (so a refused stream becomes its 503).
    #[allow(clippy::too_many_arguments, reason = "one endpoint's whole context, used by three callers")]
    fn endpoint(
        &self,
        service: Option<&str>,
        share: Option<f64>,
        workload: Option<String>,
        addr: SocketAddr,
        expected: Option<SpiffeId>,
        request: Option<&Http>,
        source_http: bool,
    ) -> EndpointView {
        let pod = self.pod_at(addr.ip());
        let hbone = expected.is_some();
        let (inbound, verdict) = self.inbound(pod, addr, hbone, request, source_http);
        EndpointView {
            service: service.map(str::to_owned),
            share,
            workload: workload.or_else(|| pod.map(|p| p.key.to_string())),
            address: addr,
            node: pod.and_then(|p| p.node.clone()),
            identity: expected.as_ref().map(ToString::to_string),
            transport: if hbone { "hbone" } else { "plaintext" },
            inbound,
            verdict,
        }
    }

    /// The destination's proxy (`hbone_inbound` / `inbound`, then `http::inbound` per request).
    fn inbound(
        &self,
        pod: Option<&Pod>,
        addr: SocketAddr,
        hbone: bool,
        request: Option<&Http>,
        source_http: bool,
    ) -> (InboundView, VerdictView) {
        let caller_principal = if hbone { self.caller.principal() } else { None };
        let mut view = InboundView {
            node: self.state.node.to_owned(),
            enforced: false,
            caller_ip: self.caller.ip,
            caller_principal: caller_principal.clone(),
            mtls_mode: pod.and_then(|p| p.mtls_mode).map(|m| match m {
                MtlsMode::Strict => "STRICT",
                MtlsMode::Permissive => "PERMISSIVE",
            }),
            parsed_as: "none",
            policies: Vec::new(),
            decision: None,
            notes: Vec::new(),
        };
        let Some(pod) = pod.filter(|p| p.meshed) else {
            view.notes.push("the destination is not in the mesh: no proxy enforces policies there".into());
            return (view, VerdictView::allowed("the destination is outside the mesh: delivered as is"));
        };
        view.enforced = true;
        let caller = Caller {
            ip: self.caller.ip,
            identity: if hbone { self.caller.identity.clone() } else { None },
            workload: self.caller.workload.clone(),
        };
        if !hbone && refuses_plaintext(self.state.mesh_ca, pod.mtls_mode.unwrap_or_default()) {
            view.notes.push("plaintext reaches a STRICT pod's inbound listener: refused".into());
            let reason = format!(
                "{} is STRICT mTLS and the connection arrives in plaintext (the source is not captured): reset",
                pod.key
            );
            return (view, VerdictView::failed(Effect::Reset, None, reason));
        }
        let workload = Workload { ip: addr.ip(), namespace: &pod.key.namespace };
        let traffic = self.state.traffic;
        let parsing = inbound_parsing(traffic, workload, addr.port());
        let read_as = parsing.map_or(Protocol::Tcp, |declared| protocol::decide(declared, self.sniffed));
        if let Some(declared) = parsing {
            view.notes.push(format!(
                "parsed: {} (port {} declared {declared:?})",
                if traffic.policies_for(addr.ip(), &pod.key.namespace).iter().any(|p| p.has_l7()) {
                    "a policy has HTTP rules"
                } else {
                    "the port is declared HTTP"
                },
                addr.port()
            ));
        }
        if read_as.is_http() {
            view.parsed_as = "http";
            let Some(request) = request else {
                return (
                    view,
                    VerdictView::failed(
                        Effect::BadRequest,
                        None,
                        "the port is declared HTTP and the bytes are not: the destination proxy answers 400",
                    ),
                );
            };
            let decision = decide_request(
                traffic,
                workload,
                &caller,
                addr.port(),
                &request.attributes(),
                Detail::Explained,
            );
            let verdict = if decision.verdict == authz::Verdict::Deny {
                VerdictView::failed(
                    Effect::Forbidden,
                    decision.policy.clone(),
                    format!("403 RBAC: access denied: {}", decision.reason),
                )
            } else {
                VerdictView::allowed(decision.reason.clone())
            };
            record(&mut view, decision);
            return (view, verdict);
        }
        view.parsed_as = "tcp";
        let decision = decide_connection(traffic, workload, &caller, addr.port(), false, Detail::Explained);
        if traffic.policies_for(addr.ip(), &pod.key.namespace).iter().any(|p| p.has_l7()) {
            view.notes.push(
                "needs HTTP: rules with HTTP parts cannot be checked on a connection that is not HTTP; \
                 DENY ones count as matching, ALLOW ones never match (fail closed)"
                    .into(),
            );
        }
        let verdict = if decision.verdict == authz::Verdict::Deny {
            let (effect, how) = match (source_http, parsing.is_some(), hbone) {
                (true, _, _) => (Effect::Unavailable, "the source proxy's request fails: 503"),
                (false, false, _) => (Effect::Reset, "refused at once: the client's connection is reset"),
                (false, true, true) => (Effect::Closed, "refused after detection: the stream is closed"),
                (false, true, false) => (Effect::Reset, "refused after detection: the connection is reset"),
            };
            VerdictView::failed(effect, decision.policy.clone(), format!("{}: {how}", decision.reason))
        } else {
            VerdictView::allowed(decision.reason.clone())
        };
        record(&mut view, decision);
        (view, verdict)
    }
}

fn record(view: &mut InboundView, decision: Decision) {
    view.policies = decision.evaluated;
    view.decision = Some(DecisionView {
        verdict: decision.verdict,
        policy: decision.policy,
        reason: decision.reason,
        audited: decision.audited,
    });
}
