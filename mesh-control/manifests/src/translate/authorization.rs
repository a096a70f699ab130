//! AuthorizationPolicy → the `Authorization` resource nodes enforce, the workloads it selects,
//! and whether it was taken as written.
//!
//! Two kinds of findings make a policy not accepted (a [`Problem`](super::Problem), so local
//! mode refuses the file; the Kubernetes source still distributes the policy and says why in
//! its status):
//!
//! - **Invalid values** (a port that is not a number, a bad CIDR, an unknown `when` key): what
//!   nodes receive fails closed. An ALLOW (or AUDIT) rule with one never matches, so it is
//!   dropped; a DENY rule loses the invalid field or condition, so it matches more, never less.
//! - **Unenforceable HTTP conditions**: methods, paths, hosts or a `request.headers[…]`
//!   condition that only ever meet ports declared as something other than HTTP. Nodes receive
//!   such a rule as written and fail closed on it (a DENY denies on its L4 parts alone, an ALLOW
//!   never matches); the finding makes that visible instead of silent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use mesh_api::workload::v1::{
    Authorization, AuthorizationAction, AuthorizationCondition, AuthorizationOperation, AuthorizationRule,
    AuthorizationScope, AuthorizationSource,
};

use super::{Acceptance, EndpointIndex, ServiceSpec, WorkloadSpec};
use crate::crd::{self, AuthorizationPolicy};

/// Condition reason: a value nodemesh cannot read (what nodes got fails closed).
pub const REASON_INVALID: &str = "Invalid";
/// Condition reason: HTTP conditions that only meet non-HTTP ports.
pub const REASON_UNENFORCEABLE: &str = "UnenforceableHTTPRule";

/// The `when` keys nodes evaluate (Istio's names).
const CONDITION_KEYS: &str =
    "request.headers[<name>], source.ip, source.namespace, source.principal, destination.port";

/// A translated policy: what nodes receive, and whether it was taken as written.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationSpec {
    pub authorization: Authorization,
    /// `metadata.generation`, for the status' `observedGeneration`.
    pub generation: Option<i64>,
    pub acceptance: Acceptance,
}

/// What the translation of one policy needs to know about the rest of the model.
pub(super) struct Context<'a> {
    pub root_namespace: &'a str,
    pub workloads: &'a [WorkloadSpec],
    pub index: &'a EndpointIndex<'a>,
    /// Services by `namespace/hostname`.
    pub services: &'a HashMap<String, &'a ServiceSpec>,
}

/// A policy translated: the resource, the workloads that list it (selector policies only),
/// and the findings that keep it from being accepted.
pub(super) struct Translated {
    pub spec: AuthorizationSpec,
    pub listed_by: Vec<usize>,
    pub findings: Vec<String>,
}

/// Translates one policy; `Err` when it cannot even be named.
pub(super) fn translate(policy: &AuthorizationPolicy, context: &Context<'_>) -> Result<Translated, String> {
    let name = policy.metadata.name.clone().ok_or("metadata.name is required")?;
    let namespace = policy.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let selector = policy.spec.selector.as_ref().map(|s| &s.match_labels).filter(|l| !l.is_empty());
    let scope = match selector {
        Some(_) => AuthorizationScope::WorkloadSelector,
        None if namespace == context.root_namespace => AuthorizationScope::Global,
        None => AuthorizationScope::Namespace,
    };
    let action = match policy.spec.action {
        crd::Action::Allow => AuthorizationAction::Allow,
        crd::Action::Deny => AuthorizationAction::Deny,
        crd::Action::Audit => AuthorizationAction::Audit,
    };
    let mut invalid = Vec::new();
    let rules = policy
        .spec
        .rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| translate_rule(i, rule, action == AuthorizationAction::Deny, &mut invalid))
        .collect();
    let in_scope = context.in_scope(&namespace, selector);
    let mut unenforceable = Vec::new();
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        if let Some(finding) = context.unenforceable(i, rule, &in_scope) {
            unenforceable.push(finding);
        }
    }
    let acceptance = match (invalid.first(), unenforceable.first()) {
        (None, None) => Acceptance::accepted(),
        (Some(_), _) => Acceptance::rejected(REASON_INVALID, join(&invalid, &unenforceable)),
        (None, Some(_)) => Acceptance::rejected(REASON_UNENFORCEABLE, join(&invalid, &unenforceable)),
    };
    let listed_by = if scope == AuthorizationScope::WorkloadSelector { in_scope } else { Vec::new() };
    Ok(Translated {
        spec: AuthorizationSpec {
            authorization: Authorization {
                name,
                namespace,
                scope: scope.into(),
                action: action.into(),
                rules,
            },
            generation: policy.metadata.generation,
            acceptance,
        },
        listed_by,
        findings: invalid.into_iter().chain(unenforceable).collect(),
    })
}

fn join(first: &[String], second: &[String]) -> String {
    first.iter().chain(second).cloned().collect::<Vec<_>>().join("; ")
}

/// Translates rule `i`; `None` when an invalid value makes a non-DENY rule never match.
fn translate_rule(
    i: usize,
    rule: &crd::Rule,
    deny: bool,
    invalid: &mut Vec<String>,
) -> Option<AuthorizationRule> {
    let before = invalid.len();
    let mut values = Values { invalid };
    let from = rule
        .from
        .iter()
        .enumerate()
        .map(|(j, from)| values.source(&format!("rules[{i}].from[{j}].source"), &from.source))
        .collect();
    let to = rule
        .to
        .iter()
        .enumerate()
        .map(|(j, to)| values.operation(&format!("rules[{i}].to[{j}].operation"), &to.operation))
        .collect();
    let when = rule
        .when
        .iter()
        .enumerate()
        .filter_map(|(j, condition)| values.condition(&format!("rules[{i}].when[{j}]"), condition))
        .collect();
    if values.invalid.len() > before && !deny {
        return None;
    }
    Some(AuthorizationRule { from, to, when })
}

/// Checks values, recording what is invalid. A field with an invalid value is left empty
/// (matches anything, or excludes nothing): what a DENY rule should fall back to; a rule
/// that is not DENY is dropped whole instead.
struct Values<'a> {
    invalid: &'a mut Vec<String>,
}

impl Values<'_> {
    fn source(&mut self, path: &str, source: &crd::Source) -> AuthorizationSource {
        AuthorizationSource {
            principals: self.patterns(&format!("{path}.principals"), &source.principals),
            not_principals: self.patterns(&format!("{path}.notPrincipals"), &source.not_principals),
            namespaces: self.patterns(&format!("{path}.namespaces"), &source.namespaces),
            not_namespaces: self.patterns(&format!("{path}.notNamespaces"), &source.not_namespaces),
            ip_blocks: self.cidrs(&format!("{path}.ipBlocks"), &source.ip_blocks),
            not_ip_blocks: self.cidrs(&format!("{path}.notIpBlocks"), &source.not_ip_blocks),
        }
    }

    fn operation(&mut self, path: &str, operation: &crd::Operation) -> AuthorizationOperation {
        AuthorizationOperation {
            ports: self.ports(&format!("{path}.ports"), &operation.ports),
            not_ports: self.ports(&format!("{path}.notPorts"), &operation.not_ports),
            methods: self.methods(&format!("{path}.methods"), &operation.methods),
            not_methods: self.methods(&format!("{path}.notMethods"), &operation.not_methods),
            paths: self.patterns(&format!("{path}.paths"), &operation.paths),
            not_paths: self.patterns(&format!("{path}.notPaths"), &operation.not_paths),
            hosts: self.patterns(&format!("{path}.hosts"), &operation.hosts),
            not_hosts: self.patterns(&format!("{path}.notHosts"), &operation.not_hosts),
        }
    }

    /// Returns the condition, or `None` when its key or a value is invalid.
    fn condition(&mut self, path: &str, condition: &crd::RuleCondition) -> Option<AuthorizationCondition> {
        let key = condition.key.as_str();
        let before = self.invalid.len();
        if condition.values.is_empty() && condition.not_values.is_empty() {
            self.invalid.push(format!("{path}: {key} needs values or notValues"));
        }
        let check = |this: &mut Self, field: &str, values: &[String]| {
            let field = format!("{path}.{field}");
            match key {
                "source.ip" => this.cidrs(&field, values).len(),
                "destination.port" => this.ports(&field, values).len(),
                // Principals, namespaces and header values: exact or one-sided wildcards.
                _ => this.patterns(&field, values).len(),
            };
        };
        if header_name(key).is_some_and(|name| !name.is_empty() && !name.contains(['[', ']']))
            || matches!(key, "source.ip" | "source.namespace" | "source.principal" | "destination.port")
        {
            check(self, "values", &condition.values);
            check(self, "notValues", &condition.not_values);
        } else {
            self.invalid.push(format!(
                "{path}.key: {key:?} is not a condition nodemesh evaluates ({CONDITION_KEYS})"
            ));
        }
        (self.invalid.len() == before).then(|| AuthorizationCondition {
            key: key.to_owned(),
            values: condition.values.clone(),
            not_values: condition.not_values.clone(),
        })
    }

    fn ports(&mut self, path: &str, values: &[String]) -> Vec<u32> {
        let parsed: Vec<Option<u32>> = values.iter().map(|v| port(v).map(u32::from)).collect();
        for (k, (value, parsed)) in values.iter().zip(&parsed).enumerate() {
            if parsed.is_none() {
                self.invalid.push(format!("{path}[{k}]: {value:?} is not a port number"));
            }
        }
        parsed.into_iter().collect::<Option<Vec<u32>>>().unwrap_or_default()
    }

    /// Methods match exactly and are case-sensitive: uppercase tokens, no wildcards.
    fn methods(&mut self, path: &str, values: &[String]) -> Vec<String> {
        let mut all_valid = true;
        for (k, value) in values.iter().enumerate() {
            if !is_method(value) {
                self.invalid.push(format!(
                    "{path}[{k}]: {value:?} is not an HTTP method (uppercase, matched exactly)"
                ));
                all_valid = false;
            }
        }
        if all_valid { values.to_vec() } else { Vec::new() }
    }

    fn cidrs(&mut self, path: &str, values: &[String]) -> Vec<String> {
        let mut all_valid = true;
        for (k, value) in values.iter().enumerate() {
            if !is_cidr(value) {
                self.invalid.push(format!("{path}[{k}]: {value:?} is not an IP address or CIDR"));
                all_valid = false;
            }
        }
        if all_valid { values.to_vec() } else { Vec::new() }
    }

    /// Exact values, or one `*` at the start or the end (or alone), as Istio matches them.
    fn patterns(&mut self, path: &str, values: &[String]) -> Vec<String> {
        let mut all_valid = true;
        for (k, value) in values.iter().enumerate() {
            let inner = value.strip_prefix('*').unwrap_or(value);
            let inner = inner.strip_suffix('*').filter(|_| inner.len() == value.len()).unwrap_or(inner);
            let problem = if value.is_empty() {
                Some("is empty")
            } else if inner.contains('*') {
                Some("may have one \"*\" only, at its start or its end")
            } else {
                None
            };
            if let Some(problem) = problem {
                self.invalid.push(format!("{path}[{k}]: {value:?} {problem}"));
                all_valid = false;
            }
        }
        if all_valid { values.to_vec() } else { Vec::new() }
    }
}

/// The header name of a `request.headers[<name>]` key.
fn header_name(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?.strip_suffix(']')
}

/// Whether `value` is an HTTP method token (RFC 9110) without lowercase letters or `*`.
pub(super) fn is_method(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'+-.^_`|~".contains(&b))
}

/// A port number, 1–65535, in decimal digits only (no sign or spaces: what the node reads).
pub(super) fn port(value: &str) -> Option<u16> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u16>().ok().filter(|p| *p != 0)
}

fn is_cidr(value: &str) -> bool {
    match value.split_once('/') {
        None => value.parse::<IpAddr>().is_ok(),
        Some((address, length)) => {
            let Ok(address) = address.parse::<IpAddr>() else { return false };
            let max = if address.is_ipv4() { 32 } else { 128 };
            length.parse::<u8>().is_ok_and(|l| l <= max) && !length.starts_with('+')
        }
    }
}

/// Whether an `appProtocol` (or port-name protocol) is HTTP the node proxy can read; empty
/// means not declared (the proxy detects it).
pub fn speaks_http(app_protocol: &str) -> bool {
    matches!(
        app_protocol,
        "" | "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c" | "kubernetes.io/ws"
    )
}

impl Context<'_> {
    /// The workloads a policy applies to: those its selector picks (in its namespace, or
    /// anywhere from the root namespace, as in Istio), or every workload of its namespace, or
    /// of the mesh.
    fn in_scope(&self, namespace: &str, selector: Option<&BTreeMap<String, String>>) -> Vec<usize> {
        let matches = |i: &usize| {
            let Some(selector) = selector else { return true };
            let workload = &self.workloads[*i];
            let pod = self.index.pods.get(&(workload.key.namespace.as_str(), workload.key.name.as_str()));
            let labels = pod.and_then(|p| p.metadata.labels.as_ref());
            selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        };
        if namespace == self.root_namespace {
            return (0..self.workloads.len()).filter(matches).collect();
        }
        let candidates = match selector.and_then(|s| s.iter().next()) {
            // Only workloads carrying the selector's first label can match all of it.
            Some((key, value)) => self.index.by_label.get(&(namespace, key.as_str(), value.as_str())),
            None => self.index.by_namespace.get(namespace),
        };
        let mut selected: Vec<usize> = candidates.into_iter().flatten().copied().filter(matches).collect();
        selected.sort_unstable();
        selected
    }

    /// Target port → the protocols it is declared with, over the services a workload serves.
    fn declared_protocols(&self, workload: &WorkloadSpec) -> BTreeMap<u16, BTreeSet<&str>> {
        let mut ports: BTreeMap<u16, BTreeSet<&str>> = BTreeMap::new();
        for (service, mappings) in &workload.services {
            let Some(service) = self.services.get(service) else { continue };
            for mapping in mappings {
                if let Some(port) = service.ports.iter().find(|p| p.port == mapping.service_port) {
                    ports.entry(mapping.target_port).or_default().insert(port.app_protocol.as_str());
                }
            }
        }
        ports
    }

    /// Returns why rule `i`'s HTTP conditions can never apply to the meshed workloads in
    /// scope, if they cannot.
    fn unenforceable(&self, i: usize, rule: &crd::Rule, in_scope: &[usize]) -> Option<String> {
        let HttpParts { limited, anywhere } = http_parts(rule);
        if limited.is_empty() && anywhere.is_empty() {
            return None;
        }
        let meshed: Vec<&WorkloadSpec> =
            in_scope.iter().map(|&w| &self.workloads[w]).filter(|w| w.membership.is_some()).collect();
        let declared: Vec<BTreeMap<u16, BTreeSet<&str>>> =
            meshed.iter().map(|w| self.declared_protocols(w)).collect();
        let mut findings = Vec::new();
        if !limited.is_empty() {
            // A port is declared non-HTTP when some workload in scope serves it and every
            // declaration of it, on every such workload, is something other than HTTP.
            let mut all: BTreeMap<u16, BTreeSet<&str>> = BTreeMap::new();
            for (port, protocols) in declared.iter().flatten() {
                all.entry(*port).or_default().extend(protocols);
            }
            for (parts, ports) in &limited {
                let described: Option<Vec<String>> = ports
                    .iter()
                    .map(|p| {
                        let protocols = all.get(p).filter(|d| d.iter().all(|d| !speaks_http(d)))?;
                        Some(format!("port {p} is declared {}", quoted(protocols)))
                    })
                    .collect();
                if let Some(described) = described {
                    findings.push(format!(
                        "HTTP conditions ({}) can never apply: {}",
                        parts.join(", "),
                        described.join(", ")
                    ));
                }
            }
        }
        if !anywhere.is_empty() {
            // Not limited to ports: a workload whose every served port is non-HTTP never sees
            // them.
            let tcp_only: Vec<String> = meshed
                .iter()
                .zip(&declared)
                .filter(|(_, ports)| {
                    !ports.is_empty() && ports.values().flatten().all(|protocol| !speaks_http(protocol))
                })
                .map(|(w, ports)| {
                    let served: Vec<String> =
                        ports.iter().map(|(p, protocols)| format!("{p} {}", quoted(protocols))).collect();
                    format!("{} (serves only {})", w.key, served.join(", "))
                })
                .collect();
            if let Some(first) = tcp_only.first() {
                let more = match tcp_only.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                };
                findings.push(format!(
                    "HTTP conditions ({}) can never apply to {first}{more}: list its HTTP ports in to.operation.ports",
                    anywhere.join(", ")
                ));
            }
        }
        (!findings.is_empty()).then(|| format!("rules[{i}]: {}", findings.join("; ")))
    }
}

/// A rule's HTTP parts, by the field names written.
struct HttpParts<'a> {
    /// Parts that apply only on these ports.
    limited: Vec<(Vec<&'a str>, Vec<u16>)>,
    /// Parts that apply on any port.
    anywhere: Vec<&'a str>,
}

/// Splits a rule's HTTP parts: an operation's methods, paths and hosts go with its ports; the
/// rule's `request.headers[…]` conditions go with its `destination.port` condition, or else with
/// its operations' ports when each lists some.
fn http_parts(rule: &crd::Rule) -> HttpParts<'_> {
    let (mut limited, mut anywhere) = (Vec::new(), Vec::new());
    for operation in rule.to.iter().map(|t| &t.operation) {
        let parts: Vec<&str> = [
            ("methods", &operation.methods),
            ("notMethods", &operation.not_methods),
            ("paths", &operation.paths),
            ("notPaths", &operation.not_paths),
            ("hosts", &operation.hosts),
            ("notHosts", &operation.not_hosts),
        ]
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, _)| name)
        .collect();
        if parts.is_empty() {
            continue;
        }
        let ports: Vec<u16> = operation.ports.iter().filter_map(|p| port(p)).collect();
        if ports.is_empty() { anywhere.extend(parts) } else { limited.push((parts, ports)) }
    }
    let headers: Vec<&str> =
        rule.when.iter().map(|c| c.key.as_str()).filter(|k| header_name(k).is_some()).collect();
    if !headers.is_empty() {
        let destination: Vec<u16> = rule
            .when
            .iter()
            .filter(|c| c.key == "destination.port")
            .flat_map(|c| c.values.iter().filter_map(|p| port(p)))
            .collect();
        let every_operation_has_ports =
            !rule.to.is_empty() && rule.to.iter().all(|t| !t.operation.ports.is_empty());
        let ports: Vec<u16> = if !destination.is_empty() {
            destination
        } else if every_operation_has_ports {
            rule.to.iter().flat_map(|t| t.operation.ports.iter().filter_map(|p| port(p))).collect()
        } else {
            Vec::new()
        };
        if ports.is_empty() { anywhere.extend(headers) } else { limited.push((headers, ports)) }
    }
    let mut seen = Vec::new();
    anywhere.retain(|part| {
        let first = !seen.contains(part);
        seen.push(*part);
        first
    });
    HttpParts { limited, anywhere }
}

fn quoted<'a>(protocols: impl IntoIterator<Item = &'a &'a str>) -> String {
    protocols.into_iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(" and ")
}

#[cfg(test)]
mod tests;
