//! HTTP routing with Gateway API `HTTPRoute` attached to a Service (GAMMA): which rule takes a
//! request, which weighted backend gets it, and the header changes, timeouts and retries that
//! come with the rule. Randomness is the caller's: [`RouteRule::pick_backend`] takes the roll.

mod created;
mod matcher;
#[cfg(test)]
mod tests;

use std::{cmp::Ordering, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use mesh_api::workload::v1::{Header, HeaderModifier, HttpRoute, HttpRouteRule};

use crate::{PolicyError, host_without_port, object_key};
use matcher::{Match, Rank};

/// A compiled route: regexes built, durations converted, creation time parsed.
#[derive(Clone, Debug)]
pub struct Route {
    key: String,
    namespace: String,
    /// None when missing or not RFC 3339: such a route loses creation-time ties.
    created: Option<created::Instant>,
    parents: Vec<(String, u16)>,
    hostnames: Vec<Hostname>,
    rules: Vec<RouteRule>,
    /// Per rule, its matches (a rule without matches has the catch-all one).
    matches: Vec<Vec<Match>>,
}

/// A route hostname, lowercased.
#[derive(Clone, Debug)]
enum Hostname {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any number of labels before the suffix.
    Wildcard(String),
}

/// A rule's backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `<namespace>/<hostname>`.
    pub service: String,
    /// 0: the requested port.
    pub port: u16,
    /// 0 receives nothing.
    pub weight: u32,
}

/// A compiled header modifier, with names and values already valid for [`HeaderMap`].
#[derive(Clone, Debug, Default)]
pub struct HeaderChanges {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderChanges {
    fn compile(object: &str, field: &str, m: Option<&HeaderModifier>) -> Result<Self, PolicyError> {
        let Some(m) = m else { return Ok(Self::default()) };
        let name = |field: String, n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| PolicyError::BadHeaderName {
                object: object.into(),
                field,
                value: n.into(),
            })
        };
        let pairs = |list: &[Header], what: &str| {
            let one = |(i, h): (usize, &Header)| {
                let value = HeaderValue::from_str(&h.value).map_err(|_| PolicyError::BadHeaderValue {
                    object: object.into(),
                    field: format!("{field}.{what}[{i}].value"),
                    value: h.value.clone(),
                })?;
                Ok((name(format!("{field}.{what}[{i}].name"), &h.name)?, value))
            };
            list.iter().enumerate().map(one).collect::<Result<Vec<_>, PolicyError>>()
        };
        let remove = m.remove.iter().enumerate().map(|(i, n)| name(format!("{field}.remove[{i}]"), n));
        Ok(HeaderChanges {
            set: pairs(&m.set, "set")?,
            add: pairs(&m.add, "add")?,
            remove: remove.collect::<Result<_, _>>()?,
        })
    }

    /// Applies the changes: removals first, then `set` (replacing every value), then `add`
    /// (appending), Envoy's order, so a header both removed and set ends up set.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug)]
pub struct Retry {
    /// Attempts after the first.
    pub attempts: u32,
    /// Response codes retried (connect failures and resets always are).
    pub codes: Vec<u16>,
    pub backoff: Duration,
    pub retry_non_idempotent: bool,
}

impl Retry {
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.contains(&status)
    }

    /// Returns whether a failed attempt may be repeated. Idempotent methods (RFC 9110 §9.2.2)
    /// always may; others (POST, PATCH, CONNECT) only without a body or when the route says so,
    /// since a request that reached the app may have had its effect.
    pub fn may_retry(&self, method: &Method, has_body: bool) -> bool {
        let idempotent = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        idempotent || !has_body || self.retry_non_idempotent
    }
}

#[derive(Clone, Debug, Default)]
pub struct RouteRule {
    /// Empty: the parent service itself.
    pub backends: Vec<Backend>,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    /// The whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// Each attempt.
    pub backend_request_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

impl RouteRule {
    /// Returns the backend for `roll` (uniform over u32) by weight: backend `i` takes a share of
    /// the rolls proportional to its weight. None without backends (the caller uses the parent
    /// service) or when every weight is 0 (the caller answers 500, as Gateway API says).
    pub fn pick_backend(&self, roll: u32) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        // Scales the roll onto [0, total) without the bias of a modulo; weights may sum past
        // 2^32, so the product needs 128 bits.
        let mut point = u64::try_from((u128::from(roll) * u128::from(total)) >> 32).ok()?;
        for backend in &self.backends {
            if point < u64::from(backend.weight) {
                return Some(backend);
            }
            point -= u64::from(backend.weight);
        }
        None
    }

    fn compile(object: &str, field: &str, rule: &HttpRouteRule) -> Result<Self, PolicyError> {
        let mut backends = Vec::with_capacity(rule.backends.len());
        for (j, b) in rule.backends.iter().enumerate() {
            let backend_field = format!("{field}.backendRefs[{j}]");
            service(object, &backend_field, &b.service)?;
            let port = port(object, &format!("{backend_field}.port"), b.port)?;
            backends.push(Backend { service: b.service.clone(), port, weight: b.weight });
        }
        let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        let (request_timeout, backend_request_timeout) =
            (millis(rule.request_timeout_ms), millis(rule.backend_request_timeout_ms));
        if request_timeout.is_some() && rule.backend_request_timeout_ms > rule.request_timeout_ms {
            return Err(PolicyError::TimeoutOrder {
                object: object.into(),
                field: format!("{field}.timeouts.backendRequest"),
                backend_ms: rule.backend_request_timeout_ms,
                request_ms: rule.request_timeout_ms,
            });
        }
        let mut retry = None;
        if let Some(r) = &rule.retry {
            let mut codes = Vec::with_capacity(r.codes.len());
            for (j, code) in r.codes.iter().enumerate() {
                match u16::try_from(*code) {
                    Ok(code) if (100..=599).contains(&code) => codes.push(code),
                    _ => {
                        return Err(PolicyError::OutOfRange {
                            object: object.into(),
                            field: format!("{field}.retry.codes[{j}]"),
                            value: u64::from(*code),
                            min: 100,
                            max: 599,
                        });
                    }
                }
            }
            retry = (r.attempts > 0).then(|| Retry {
                attempts: r.attempts,
                codes,
                backoff: Duration::from_millis(r.backoff_ms),
                retry_non_idempotent: r.retry_non_idempotent,
            });
        }
        Ok(RouteRule {
            backends,
            request_headers: HeaderChanges::compile(
                object,
                &format!("{field}.filters.requestHeaderModifier"),
                rule.request_headers.as_ref(),
            )?,
            response_headers: HeaderChanges::compile(
                object,
                &format!("{field}.filters.responseHeaderModifier"),
                rule.response_headers.as_ref(),
            )?,
            request_timeout,
            backend_request_timeout,
            retry,
        })
    }
}

/// Checks a `<namespace>/<hostname>` reference.
fn service(object: &str, field: &str, value: &str) -> Result<(), PolicyError> {
    match value.split_once('/') {
        Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => Ok(()),
        _ => Err(PolicyError::BadService { object: object.into(), field: field.into(), value: value.into() }),
    }
}

fn port(object: &str, field: &str, value: u32) -> Result<u16, PolicyError> {
    u16::try_from(value).map_err(|_| PolicyError::OutOfRange {
        object: object.into(),
        field: field.into(),
        value: u64::from(value),
        min: 0,
        max: 65535,
    })
}

impl Route {
    /// Compiles a route, refusing invalid regexes, header names and values, service references,
    /// ports, methods, retry codes and a per-attempt timeout longer than the request's.
    pub fn compile(r: &HttpRoute) -> Result<Route, PolicyError> {
        let key = object_key(&r.namespace, &r.name);
        let mut parents = Vec::with_capacity(r.parents.len());
        for (i, p) in r.parents.iter().enumerate() {
            service(&key, &format!("parentRefs[{i}]"), &p.service)?;
            parents.push((p.service.clone(), port(&key, &format!("parentRefs[{i}].port"), p.port)?));
        }
        let mut hostnames = Vec::with_capacity(r.hostnames.len());
        for (i, h) in r.hostnames.iter().enumerate() {
            let h = h.to_ascii_lowercase();
            hostnames.push(match h.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 => {
                    Hostname::Wildcard(suffix.into())
                }
                _ if h.is_empty() || h.contains('*') => {
                    return Err(PolicyError::BadHostname {
                        object: key,
                        field: format!("hostnames[{i}]"),
                        value: h,
                    });
                }
                _ => Hostname::Exact(h),
            });
        }
        let mut rules = Vec::with_capacity(r.rules.len().max(1));
        let mut matches = Vec::with_capacity(r.rules.len().max(1));
        for (i, rule) in r.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            matches.push(if rule.matches.is_empty() {
                vec![Match::catch_all()]
            } else {
                let one = |(j, m)| Match::compile(&key, &format!("{field}.matches[{j}]"), m);
                rule.matches.iter().enumerate().map(one).collect::<Result<_, _>>()?
            });
            rules.push(RouteRule::compile(&key, &field, rule)?);
        }
        // Gateway API's default for `rules`: one rule taking every request to the parent.
        if rules.is_empty() {
            rules.push(RouteRule::default());
            matches.push(vec![Match::catch_all()]);
        }
        Ok(Route {
            namespace: r.namespace.clone(),
            key,
            created: created::parse(&r.created),
            parents,
            hostnames,
            rules,
            matches,
        })
    }

    /// Returns `<namespace>/<name>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Returns the rules in the order written.
    pub fn rules(&self) -> &[RouteRule] {
        &self.rules
    }

    /// Returns whether the route applies to traffic for `service` (`<ns>/<hostname>`) on `port`.
    pub fn attaches_to(&self, service: &str, port: u16) -> bool {
        self.parents.iter().any(|(s, p)| s == service && (*p == 0 || *p == port))
    }

    /// Returns whether a route may send to `service` (`<ns>/<hostname>`): a Service of its own
    /// namespace, or one of its parents (a consumer route sending on to the Service it
    /// attaches to). Any other namespace's would need a Gateway API ReferenceGrant, which
    /// nodemesh does not read yet, so it is refused.
    pub fn may_send_to(&self, service: &str) -> bool {
        service.split_once('/').is_some_and(|(ns, _)| ns == self.namespace)
            || self.parents.iter().any(|(s, _)| s == service)
    }

    /// Ranks how specifically the route's hostnames take `host` (lowercase, no port): characters
    /// of a matching exact hostname, then of any matching hostname; None if none matches.
    fn host_rank(&self, host: &str) -> Option<(usize, usize)> {
        if self.hostnames.is_empty() {
            return Some((0, 0));
        }
        self.hostnames
            .iter()
            .filter_map(|h| match h {
                Hostname::Exact(e) => (e == host).then_some((e.len(), e.len())),
                Hostname::Wildcard(suffix) => host
                    .strip_suffix(suffix.as_str())
                    .is_some_and(|label| !label.is_empty())
                    .then_some((0, suffix.len() + 1)),
            })
            .max()
    }
}

/// One HTTP request's routing attributes.
pub struct RouteRequest<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Host or `:authority`, possibly with a port.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The rule that takes a request.
pub struct RouteMatch<'a> {
    pub route: &'a Route,
    pub rule_index: usize,
    pub rule: &'a RouteRule,
}

/// Returns, among the routes attached to (`service`, `port`), the rule that takes the request,
/// by Gateway API precedence: the most specific matching hostname (exact, then longest), then
/// exact path, longest prefix, regex, a method, most header matches, most query matches; ties
/// go to the oldest route, then by `<ns>/<name>`, then to the first rule of the route. Routes
/// from another namespace than the service's apply only to clients of `from_namespace`.
pub fn select<'a>(
    routes: &'a [Route],
    service: &str,
    port: u16,
    from_namespace: &str,
    request: &RouteRequest<'_>,
) -> Option<RouteMatch<'a>> {
    let host = request.host.to_ascii_lowercase();
    let host = host_without_port(&host);
    let mut best: Option<((usize, usize), Rank, &Route, usize)> = None;
    let service_namespace = service.split_once('/').map_or("", |(ns, _)| ns);
    // GAMMA (GEP-1294): a route in the service's namespace (producer) applies to every client; a
    // route in another namespace (consumer) only to clients of its own namespace, so no
    // namespace can reroute another's traffic.
    let applies = |r: &&Route| r.namespace == service_namespace || r.namespace == from_namespace;
    for route in routes.iter().filter(|r| r.attaches_to(service, port)).filter(applies) {
        let Some(host_rank) = route.host_rank(host) else { continue };
        for (index, matches) in route.matches.iter().enumerate() {
            let Some(rank) = matches.iter().filter(|m| m.matches(request)).map(Match::rank).max() else {
                continue;
            };
            let better = best.as_ref().is_none_or(|(best_host, best_rank, best_route, best_index)| {
                let order = (host_rank, rank)
                    .cmp(&(*best_host, *best_rank))
                    .then_with(|| older(best_route, route))
                    .then_with(|| best_route.key.cmp(&route.key))
                    .then_with(|| best_index.cmp(&index));
                order == Ordering::Greater
            });
            if better {
                best = Some((host_rank, rank, route, index));
            }
        }
    }
    best.map(|(_, _, route, rule_index)| RouteMatch { route, rule_index, rule: &route.rules[rule_index] })
}

/// Orders two routes' creation times: Greater when `b` is older than `a` (so `b` wins ties);
/// a route without a known time is the youngest.
fn older(a: &Route, b: &Route) -> Ordering {
    match (a.created, b.created) {
        (Some(a), Some(b)) => a.cmp(&b),
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (None, None) => Ordering::Equal,
    }
}
