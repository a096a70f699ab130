//! HTTPRoute (Gateway API, attached to Services as GAMMA says) → the `HttpRoute` resource the
//! source-side proxies apply, and each parent's status.
//!
//! Only `parentRefs` of kind Service are nodemesh's; a route with none is another
//! implementation's and is left alone. A route whose Service (parent or backend) does not exist
//! yet is still distributed and says so in its status. A route with a value nodemesh cannot
//! implement (an unsupported filter, a malformed duration) is not distributed: Gateway API's
//! meaning of `Accepted=False`.

use std::collections::HashMap;

use mesh_api::workload::v1::{
    BackendRef, Header, HeaderModifier, HttpRoute, HttpRouteMatch, HttpRouteRule, PathMatch, PathMatchKind,
    RetryPolicy, RouteParent, ValueMatch,
};

use super::{Acceptance, ServiceSpec, duration::parse_millis};
use crate::crd::{self, ParentReference};

/// Retries when a route's `retry` leaves `attempts` out (Gateway API lets the implementation
/// choose; Istio and Envoy Gateway retry twice too).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// The controller nodemesh writes route status as.
pub const CONTROLLER_NAME: &str = "nodemesh.io/mesh-control";

/// Methods Gateway API allows in a match.
const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// A translated route and its status.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSpec {
    pub namespace: String,
    pub name: String,
    /// What nodes receive; `None` when the route is not accepted for a value nodemesh cannot
    /// implement (nodes then route to the Service as if there were no route).
    pub route: Option<HttpRoute>,
    /// `metadata.generation`, for the conditions' `observedGeneration`.
    pub generation: Option<i64>,
    /// One per Service `parentRef`, in their order.
    pub parents: Vec<ParentStatus>,
}

/// A Service parent's conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    pub parent_ref: ParentReference,
    /// `Accepted`: the route applies to traffic for this parent.
    pub accepted: Acceptance,
    /// `ResolvedRefs`: every backend exists.
    pub resolved_refs: Acceptance,
}

/// Translates one route; `Ok(None)` when it has no Service parent (not nodemesh's), and the
/// problems that keep it from being accepted besides.
pub(super) fn translate(
    route: &crd::HttpRoute,
    services: &HashMap<(String, String), &ServiceSpec>,
    cluster_domain: &str,
) -> Result<Option<(RouteSpec, Vec<String>)>, String> {
    let name = route.metadata.name.clone().ok_or("metadata.name is required")?;
    let namespace = route.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let service_parents: Vec<&ParentReference> = route
        .spec
        .parent_refs
        .iter()
        .filter(|p| {
            p.kind.as_deref() == Some("Service") && matches!(p.group.as_deref(), None | Some("" | "core"))
        })
        .collect();
    if service_parents.is_empty() {
        return Ok(None);
    }
    let hostname =
        |namespace: &str, name: &str| format!("{namespace}/{name}.{namespace}.svc.{cluster_domain}");
    let parents: Vec<RouteParent> = service_parents
        .iter()
        .map(|p| RouteParent {
            service: hostname(p.namespace.as_deref().unwrap_or(&namespace), &p.name),
            port: p.port.map(u32::from).unwrap_or_default(),
        })
        .collect();
    // A backend without a port goes to the parents' port, when they agree on one.
    let parent_port = match parents.first().map(|p| p.port) {
        Some(port) if parents.iter().all(|p| p.port == port) => port,
        _ => 0,
    };

    let mut problems = Vec::new();
    for (k, hostname) in route.spec.hostnames.iter().enumerate() {
        if !is_hostname(hostname) {
            problems.push(format!("hostnames[{k}]: {hostname:?} is not a hostname or a \"*.\" wildcard"));
        }
    }
    let mut missing_backends = Vec::new();
    // Gateway API lets a route reach another namespace's Service (other than its parents) only
    // through a ReferenceGrant, which nodemesh does not read yet: such backends are refused
    // (the proxy answers 500 for them, see mesh-policy's `Route::may_send_to`).
    let mut not_permitted = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        let mut backends = Vec::new();
        for backend in &rule.backend_refs {
            let backend_namespace = backend.namespace.as_deref().unwrap_or(&namespace);
            let backend_service = hostname(backend_namespace, &backend.name);
            if backend_namespace != namespace && !parents.iter().any(|p| p.service == backend_service) {
                not_permitted.push(format!(
                    "Service {backend_namespace}/{} is in another namespace (ReferenceGrant is not supported)",
                    backend.name
                ));
            }
            match services.get(&(backend_namespace.to_owned(), backend.name.clone())) {
                None => missing_backends
                    .push(format!("Service {backend_namespace}/{} does not exist", backend.name)),
                Some(service) => {
                    if let Some(port) = backend.port
                        && !service.ports.iter().any(|p| p.port == port)
                    {
                        missing_backends
                            .push(format!("Service {backend_namespace}/{} has no port {port}", backend.name));
                    }
                }
            }
            backends.push(BackendRef {
                service: hostname(backend_namespace, &backend.name),
                port: backend.port.map_or(parent_port, u32::from),
                weight: backend.weight.unwrap_or(1),
            });
        }
        let matches = rule
            .matches
            .iter()
            .enumerate()
            .map(|(j, m)| route_match(&format!("{path}.matches[{j}]"), m, &mut problems))
            .collect();
        let (request_headers, response_headers) = filters(&path, &rule.filters, &mut problems);
        let mut duration = |field: &str, value: Option<&String>| -> u64 {
            let Some(value) = value else { return 0 };
            parse_millis(value)
                .inspect_err(|err| problems.push(format!("{path}.{field}: {err}")))
                .unwrap_or_default()
        };
        let timeouts = rule.timeouts.as_ref();
        let request_timeout_ms = duration("timeouts.request", timeouts.and_then(|t| t.request.as_ref()));
        let backend_request_timeout_ms =
            duration("timeouts.backendRequest", timeouts.and_then(|t| t.backend_request.as_ref()));
        let retry = rule.retry.as_ref().map(|retry| RetryPolicy {
            attempts: retry.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            codes: retry.codes.iter().map(|&c| u32::from(c)).collect(),
            backoff_ms: duration("retry.backoff", retry.backoff.as_ref()),
            retry_non_idempotent: false,
        });
        if request_timeout_ms != 0 && backend_request_timeout_ms > request_timeout_ms {
            problems.push(format!("{path}.timeouts.backendRequest: longer than timeouts.request"));
        }
        for (k, code) in rule.retry.iter().flat_map(|r| r.codes.iter()).enumerate() {
            if !(400..=599).contains(code) {
                problems
                    .push(format!("{path}.retry.codes[{k}]: {code} is not an HTTP error status (400-599)"));
            }
        }
        rules.push(HttpRouteRule {
            matches,
            request_headers,
            response_headers,
            backends,
            request_timeout_ms,
            backend_request_timeout_ms,
            retry,
        });
    }

    let invalid = (!problems.is_empty()).then(|| problems.join("; "));
    let resolved_refs = if !not_permitted.is_empty() {
        Acceptance::condition(false, "RefNotPermitted", not_permitted.join("; "))
    } else if !missing_backends.is_empty() {
        Acceptance::condition(false, "BackendNotFound", missing_backends.join("; "))
    } else {
        Acceptance::condition(true, "ResolvedRefs", "every backend Service exists")
    };
    let parent_status = service_parents
        .iter()
        .map(|parent| {
            let parent_namespace = parent.namespace.as_deref().unwrap_or(&namespace);
            let service = services.get(&(parent_namespace.to_owned(), parent.name.clone()));
            let accepted = match (service, &invalid) {
                (_, Some(invalid)) => Acceptance::condition(false, "UnsupportedValue", invalid.clone()),
                (None, None) => Acceptance::condition(
                    false,
                    "NoMatchingParent",
                    format!("Service {parent_namespace}/{} does not exist", parent.name),
                ),
                (Some(service), None) => match parent.port {
                    Some(port) if !service.ports.iter().any(|p| p.port == port) => Acceptance::condition(
                        false,
                        "NoMatchingParent",
                        format!("Service {parent_namespace}/{} has no port {port}", parent.name),
                    ),
                    _ => Acceptance::condition(true, "Accepted", "applied to traffic for this Service"),
                },
            };
            ParentStatus { parent_ref: (*parent).clone(), accepted, resolved_refs: resolved_refs.clone() }
        })
        .collect();
    let created = route
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let translated = HttpRoute {
        name: name.clone(),
        namespace: namespace.clone(),
        parents,
        hostnames: route.spec.hostnames.clone(),
        rules,
        created,
    };
    let spec = RouteSpec {
        namespace,
        name,
        route: invalid.is_none().then_some(translated),
        generation: route.metadata.generation,
        parents: parent_status,
    };
    Ok(Some((spec, problems)))
}

fn route_match(path: &str, m: &crd::HttpRouteMatch, problems: &mut Vec<String>) -> HttpRouteMatch {
    // Gateway API's default: a PathPrefix "/" match.
    let (kind, value) = match &m.path {
        None => (PathMatchKind::PathPrefix, "/".to_owned()),
        Some(p) => {
            let kind = match p.match_type {
                crd::PathMatchType::Exact => PathMatchKind::Exact,
                crd::PathMatchType::PathPrefix => PathMatchKind::PathPrefix,
                crd::PathMatchType::RegularExpression => PathMatchKind::RegularExpression,
            };
            if kind != PathMatchKind::RegularExpression && !p.value.starts_with('/') {
                problems.push(format!("{path}.path.value: {:?} must start with \"/\"", p.value));
            }
            (kind, p.value.clone())
        }
    };
    let mut values = |field: &str, matches: &[crd::HttpValueMatch], header: bool| -> Vec<ValueMatch> {
        matches
            .iter()
            .enumerate()
            .map(|(k, v)| {
                if v.name.is_empty() {
                    problems.push(format!("{path}.{field}[{k}].name: must not be empty"));
                } else if header && !is_header_name(&v.name) {
                    problems.push(format!("{path}.{field}[{k}].name: {:?} is not a header name", v.name));
                } else if matches[..k].iter().any(|o| o.name.eq_ignore_ascii_case(&v.name)) {
                    problems.push(format!("{path}.{field}[{k}].name: {:?} is matched twice", v.name));
                }
                ValueMatch {
                    name: v.name.clone(),
                    value: v.value.clone(),
                    regex: v.match_type == crd::ValueMatchType::RegularExpression,
                }
            })
            .collect()
    };
    let headers = values("headers", &m.headers, true);
    let query_params = values("queryParams", &m.query_params, false);
    let method = m.method.clone().unwrap_or_default();
    if !method.is_empty() && !METHODS.contains(&method.as_str()) {
        problems.push(format!("{path}.method: {method:?} is not one of {}", METHODS.join(", ")));
    }
    HttpRouteMatch { path: Some(PathMatch { kind: kind.into(), value }), headers, query_params, method }
}

/// The rule's header modifiers; any other filter is a problem naming its type.
fn filters(
    path: &str,
    filters: &[crd::HttpRouteFilter],
    problems: &mut Vec<String>,
) -> (Option<HeaderModifier>, Option<HeaderModifier>) {
    let (mut request, mut response): (Option<HeaderModifier>, Option<HeaderModifier>) = (None, None);
    for (k, filter) in filters.iter().enumerate() {
        let (modifier, target, field) = match filter.filter_type.as_str() {
            "RequestHeaderModifier" => {
                (&filter.request_header_modifier, &mut request, "requestHeaderModifier")
            }
            "ResponseHeaderModifier" => {
                (&filter.response_header_modifier, &mut response, "responseHeaderModifier")
            }
            other => {
                problems.push(format!(
                    "{path}.filters[{k}]: unsupported filter type {other} (nodemesh implements RequestHeaderModifier and ResponseHeaderModifier)"
                ));
                continue;
            }
        };
        let Some(modifier) = modifier else {
            problems.push(format!("{path}.filters[{k}].{field}: required by type {}", filter.filter_type));
            continue;
        };
        let headers = |list: &[crd::HttpHeader]| -> Vec<Header> {
            list.iter().map(|h| Header { name: h.name.clone(), value: h.value.clone() }).collect()
        };
        let names = modifier
            .set
            .iter()
            .chain(&modifier.add)
            .map(|h| h.name.as_str())
            .chain(modifier.remove.iter().map(String::as_str));
        for name in names.filter(|n| !is_header_name(n)) {
            problems.push(format!("{path}.filters[{k}].{field}: {name:?} is not a header name"));
        }
        let merged = target.get_or_insert_with(HeaderModifier::default);
        merged.set.extend(headers(&modifier.set));
        merged.add.extend(headers(&modifier.add));
        merged.remove.extend(modifier.remove.iter().cloned());
    }
    (request, response)
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `name` is a lowercase DNS name, optionally under a leading `*.` wildcard (Gateway
/// API's Hostname).
fn is_hostname(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests;
