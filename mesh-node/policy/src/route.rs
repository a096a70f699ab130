//! HTTP routing with Gateway API `HTTPRoute` attached to a Service (GAMMA), as pure functions:
//! which rule takes a request, which weighted backend gets it, and the header changes, timeouts
//! and retries that come with the rule.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use mesh_api::workload::v1::{HeaderModifier, HttpRoute, HttpRouteMatch, PathMatchKind, ValueMatch};
use regex::Regex;

use crate::{PolicyError, host_without_port, is_method, object_key};

/// A compiled route.
#[derive(Clone, Debug)]
pub struct Route {
    key: String,
    created: String,
    parents: Vec<(String, u16)>,
    hostnames: Vec<String>,
    rules: Vec<(Vec<Match>, RouteRule)>,
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == value,
            ValueMatcher::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Clone, Debug)]
struct Match {
    path: PathMatch,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<Method>,
}

/// A full-string regex (Gateway API regexes match the whole value).
fn anchored(object: &str, field: &str, pattern: &str) -> Result<Regex, PolicyError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| PolicyError::BadRegex {
        object: object.into(),
        field: field.into(),
        value: pattern.into(),
        reason: e.to_string(),
    })
}

impl Match {
    fn compile(object: &str, field: &str, m: &HttpRouteMatch) -> Result<Self, PolicyError> {
        let path = match &m.path {
            None => PathMatch::Prefix("/".into()),
            Some(p) => {
                let value = if p.value.is_empty() { "/".to_owned() } else { p.value.clone() };
                match PathMatchKind::try_from(p.kind) {
                    Ok(PathMatchKind::RegularExpression) => {
                        PathMatch::Regex(anchored(object, &format!("{field}.path.value"), &value)?)
                    }
                    Ok(kind) => {
                        if !value.starts_with('/') {
                            return Err(PolicyError::BadPath {
                                object: object.into(),
                                field: format!("{field}.path.value"),
                                value,
                            });
                        }
                        if kind == PathMatchKind::Exact {
                            PathMatch::Exact(value)
                        } else {
                            let trimmed = value.trim_end_matches('/');
                            PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
                        }
                    }
                    Err(_) => {
                        return Err(PolicyError::UnknownEnum {
                            object: object.into(),
                            field: format!("{field}.path.type"),
                            value: p.kind,
                        });
                    }
                }
            }
        };
        let matcher = |field: String, v: &ValueMatch| -> Result<ValueMatcher, PolicyError> {
            if v.regex {
                Ok(ValueMatcher::Regex(anchored(object, &field, &v.value)?))
            } else {
                Ok(ValueMatcher::Exact(v.value.clone()))
            }
        };
        let mut headers = Vec::new();
        for (i, h) in m.headers.iter().enumerate() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| PolicyError::BadHeaderName {
                object: object.into(),
                field: format!("{field}.headers[{i}].name"),
                value: h.name.clone(),
            })?;
            headers.push((name, matcher(format!("{field}.headers[{i}].value"), h)?));
        }
        let mut query = Vec::new();
        for (i, q) in m.query_params.iter().enumerate() {
            if q.name.is_empty() {
                return Err(PolicyError::Empty {
                    object: object.into(),
                    field: format!("{field}.queryParams[{i}].name"),
                });
            }
            query.push((q.name.clone(), matcher(format!("{field}.queryParams[{i}].value"), q)?));
        }
        let method = match m.method.as_str() {
            "" => None,
            method if is_method(method) => Method::from_bytes(method.as_bytes()).ok(),
            other => {
                return Err(PolicyError::BadMethod {
                    object: object.into(),
                    field: format!("{field}.method"),
                    value: other.into(),
                });
            }
        };
        Ok(Match { path, headers, query, method })
    }

    fn matches(&self, request: &RouteRequest<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => request.path == p,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => request
                .path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(r) => r.is_match(request.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m.as_str() == request.method)
            && self.headers.iter().all(|(name, v)| {
                request.headers.get(name).and_then(|h| h.to_str().ok()).is_some_and(|h| v.matches(h))
            })
            && self.query.iter().all(|(name, v)| {
                request.query.is_some_and(|q| {
                    q.split('&')
                        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                        .any(|(k, val)| k == name && v.matches(val))
                })
            })
    }

    /// Gateway API precedence, larger first: exact path, then prefix length, then a regex (where
    /// the spec leaves it to implementations; here above only the catch-all prefix "/"), then
    /// method, header count, query count.
    fn rank(&self) -> Rank {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Prefix(p) if p == "/" => (0, 1),
            PathMatch::Prefix(p) => (2, p.len()),
            PathMatch::Regex(_) => (1, 0),
        };
        (kind, len, self.method.is_some(), self.headers.len(), self.query.len())
    }
}

/// Precedence of a match: path kind, path length, has a method, headers, query parameters.
type Rank = (u8, usize, bool, usize, usize);

/// Backends of a rule, by weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `ns/hostname`.
    pub service: String,
    /// 0: the requested port.
    pub port: u16,
    pub weight: u32,
}

/// A compiled header modifier.
#[derive(Clone, Debug, Default)]
pub struct HeaderChanges {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderChanges {
    fn compile(object: &str, field: &str, m: Option<&HeaderModifier>) -> Result<Self, PolicyError> {
        let Some(m) = m else { return Ok(Self::default()) };
        let name = |f: String, n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| PolicyError::BadHeaderName {
                object: object.into(),
                field: f,
                value: n.into(),
            })
        };
        let pairs = |list: &[mesh_api::workload::v1::Header], what: &str| {
            list.iter()
                .enumerate()
                .map(|(i, h)| {
                    let value = HeaderValue::from_str(&h.value).map_err(|_| PolicyError::BadHeaderValue {
                        object: object.into(),
                        field: format!("{field}.{what}[{i}].value"),
                        value: h.value.clone(),
                    })?;
                    Ok((name(format!("{field}.{what}[{i}].name"), &h.name)?, value))
                })
                .collect::<Result<Vec<_>, PolicyError>>()
        };
        Ok(HeaderChanges {
            set: pairs(&m.set, "set")?,
            add: pairs(&m.add, "add")?,
            remove: m
                .remove
                .iter()
                .enumerate()
                .map(|(i, n)| name(format!("{field}.remove[{i}]"), n))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug)]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
    pub retry_non_idempotent: bool,
}

impl Retry {
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.contains(&status)
    }

    /// Idempotent methods are always retried; others only without a body, or when the route
    /// says so (a POST that reached the app may have had its effect).
    pub fn may_retry(&self, method: &Method, has_body: bool) -> bool {
        let idempotent = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        idempotent || !has_body || self.retry_non_idempotent
    }
}

#[derive(Clone, Debug)]
pub struct RouteRule {
    pub backends: Vec<Backend>,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

impl RouteRule {
    /// The backend for `roll` (uniform over u32), by weight; `None` without backends or when
    /// every weight is 0.
    pub fn pick_backend(&self, roll: u32) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = u64::from(roll) * total / (u64::from(u32::MAX) + 1);
        for backend in &self.backends {
            if point < u64::from(backend.weight) {
                return Some(backend);
            }
            point -= u64::from(backend.weight);
        }
        self.backends.iter().rev().find(|b| b.weight > 0)
    }
}

fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl Route {
    pub fn compile(r: &HttpRoute) -> Result<Route, PolicyError> {
        let key = object_key(&r.namespace, &r.name);
        let mut parents = Vec::new();
        for (i, p) in r.parents.iter().enumerate() {
            if !p.service.contains('/') {
                return Err(PolicyError::BadService {
                    object: key,
                    field: format!("parentRefs[{i}]"),
                    value: p.service.clone(),
                });
            }
            let port = u16::try_from(p.port).map_err(|_| PolicyError::OutOfRange {
                object: key.clone(),
                field: format!("parentRefs[{i}].port"),
                value: u64::from(p.port),
                min: 0,
                max: 65535,
            })?;
            parents.push((p.service.clone(), port));
        }
        let mut rules = Vec::new();
        for (i, rule) in r.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            let matches = if rule.matches.is_empty() {
                vec![Match {
                    path: PathMatch::Prefix("/".into()),
                    headers: vec![],
                    query: vec![],
                    method: None,
                }]
            } else {
                rule.matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| Match::compile(&key, &format!("{field}.matches[{j}]"), m))
                    .collect::<Result<_, _>>()?
            };
            let mut backends = Vec::new();
            for (j, b) in rule.backends.iter().enumerate() {
                if !b.service.contains('/') {
                    return Err(PolicyError::BadService {
                        object: key,
                        field: format!("{field}.backendRefs[{j}]"),
                        value: b.service.clone(),
                    });
                }
                let port = u16::try_from(b.port).map_err(|_| PolicyError::OutOfRange {
                    object: key.clone(),
                    field: format!("{field}.backendRefs[{j}].port"),
                    value: u64::from(b.port),
                    min: 0,
                    max: 65535,
                })?;
                backends.push(Backend { service: b.service.clone(), port, weight: b.weight });
            }
            let (request_timeout, backend_request_timeout) =
                (millis(rule.request_timeout_ms), millis(rule.backend_request_timeout_ms));
            if let (Some(request), Some(backend)) = (request_timeout, backend_request_timeout)
                && backend > request
            {
                return Err(PolicyError::TimeoutOrder {
                    object: key,
                    field: format!("{field}.timeouts.backendRequest"),
                    backend_ms: backend.as_millis() as u64,
                    request_ms: request.as_millis() as u64,
                });
            }
            let mut codes = Vec::new();
            if let Some(retry) = &rule.retry {
                for (j, code) in retry.codes.iter().enumerate() {
                    if !(100..=599).contains(code) {
                        return Err(PolicyError::OutOfRange {
                            object: key,
                            field: format!("{field}.retry.codes[{j}]"),
                            value: u64::from(*code),
                            min: 100,
                            max: 599,
                        });
                    }
                    codes.push(*code as u16);
                }
            }
            let retry = rule.retry.as_ref().filter(|r| r.attempts > 0).map(|r| Retry {
                attempts: r.attempts,
                codes,
                backoff: Duration::from_millis(r.backoff_ms),
                retry_non_idempotent: r.retry_non_idempotent,
            });
            rules.push((
                matches,
                RouteRule {
                    backends,
                    request_headers: HeaderChanges::compile(
                        &key,
                        &format!("{field}.filters.requestHeaderModifier"),
                        rule.request_headers.as_ref(),
                    )?,
                    response_headers: HeaderChanges::compile(
                        &key,
                        &format!("{field}.filters.responseHeaderModifier"),
                        rule.response_headers.as_ref(),
                    )?,
                    request_timeout,
                    backend_request_timeout,
                    retry,
                },
            ));
        }
        Ok(Route {
            key,
            created: r.created.clone(),
            parents,
            hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            rules,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the route applies to traffic for `service` (`ns/hostname`) on `port`.
    pub fn attaches_to(&self, service: &str, port: u16) -> bool {
        self.parents.iter().any(|(s, p)| s == service && (*p == 0 || *p == port))
    }

    fn host_matches(&self, host: &str) -> bool {
        if self.hostnames.is_empty() {
            return true;
        }
        let host = host_without_port(host).to_ascii_lowercase();
        self.hostnames.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => {
                host.strip_suffix(suffix).is_some_and(|rest| rest.ends_with('.') && rest.len() > 1)
            }
            None => *h == host,
        })
    }
}

pub struct RouteRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

pub struct RouteMatch<'a> {
    pub route: &'a Route,
    pub rule_index: usize,
    pub rule: &'a RouteRule,
}

/// The rule that takes a request among the routes attached to (`service`, `port`), by Gateway
/// API precedence; ties go to the oldest route, then by name, then rule order.
pub fn select<'a>(
    routes: &'a [Route],
    service: &str,
    port: u16,
    request: &RouteRequest<'_>,
) -> Option<RouteMatch<'a>> {
    let mut best: Option<(Rank, &Route, usize)> = None;
    for route in routes.iter().filter(|r| r.attaches_to(service, port) && r.host_matches(request.host)) {
        for (index, (matches, _)) in route.rules.iter().enumerate() {
            for m in matches.iter().filter(|m| m.matches(request)) {
                let rank = m.rank();
                let better = match &best {
                    None => true,
                    Some((best_rank, best_route, best_index)) => {
                        rank > *best_rank
                            || (rank == *best_rank
                                && (route.created.as_str(), route.key.as_str(), index)
                                    < (best_route.created.as_str(), best_route.key.as_str(), *best_index))
                    }
                };
                if better {
                    best = Some((rank, route, index));
                }
            }
        }
    }
    best.map(|(_, route, rule_index)| RouteMatch { route, rule_index, rule: &route.rules[rule_index].1 })
}

#[cfg(test)]
mod tests;
