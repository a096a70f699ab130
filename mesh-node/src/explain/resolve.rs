//! Finding what the question names: pods, the destination (as DNS and the proxy would see
//! it), and the HTTP request as the proxies will read it.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use hyper::{
    HeaderMap,
    header::{HeaderName, HeaderValue},
};
use mesh_manifests::{MtlsMode, PodKey};
use mesh_policy::authz;

use super::{ExplainError, HttpQuery, NodeState, parse_port};
use crate::{desired::MeshView, traffic::ServiceEntry};

/// A pod as the config describes it.
#[derive(Clone, Debug)]
pub(super) struct Pod {
    pub(super) key: PodKey,
    pub(super) ip: Option<Ipv4Addr>,
    pub(super) meshed: bool,
    pub(super) node: Option<String>,
    pub(super) mtls_mode: Option<MtlsMode>,
}

pub(super) fn pods(view: &MeshView) -> Vec<Pod> {
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
pub(super) fn find_pod(pods: &[Pod], name: &str) -> Result<Pod, ExplainError> {
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

pub(super) enum Target {
    Service { service: Arc<ServiceEntry>, vip: IpAddr, host: String },
    Pod(Pod, IpAddr),
    Ip(IpAddr),
}

/// Resolves the destination as DNS and the connect() would: a hostname to the service's
/// cluster IP; then the address as the proxy sees it (a service's cluster IP, a pod, or other).
pub(super) fn resolve(
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
pub(super) fn split_port(to: &str) -> (&str, Option<&str>) {
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
pub(super) fn service_by_host(state: &NodeState<'_>, host: &str) -> Option<Arc<ServiceEntry>> {
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
pub(super) struct Http {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: Option<String>,
    pub(super) host: String,
    pub(super) headers: HeaderMap,
}

impl Http {
    pub(super) fn attributes(&self) -> authz::Request<'_> {
        authz::Request { method: &self.method, path: &self.path, host: &self.host, headers: &self.headers }
    }

    pub(super) fn first_bytes(&self) -> Vec<u8> {
        format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes()
    }
}

pub(super) fn http_request(query: &HttpQuery, host: &str, port: u16) -> Result<Http, ExplainError> {
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
