//! Authorization with Istio's AuthorizationPolicy semantics, as pure functions.
//!
//! Order: any matching DENY denies; then, if no ALLOW policy applies, allow; if one matches,
//! allow; otherwise deny. AUDIT policies never change the verdict and are only reported. A
//! policy matches when any rule does; a rule when its `from`, `to` and `when` all do (each list
//! ORs its entries, each entry ANDs its fields, each field ORs its values, `not*` fields match
//! when the value is none of them).
//!
//! Connections are decided before any request is seen: rules with HTTP conditions are then
//! deferred to each request when the connection is HTTP, and fail closed when it is not (a DENY
//! rule's L4 part alone denies, an ALLOW rule with HTTP conditions never allows).

mod pattern;

use std::net::IpAddr;

use mesh_api::workload::v1::{
    Authorization, AuthorizationAction, AuthorizationCondition, AuthorizationOperation, AuthorizationScope,
    AuthorizationSource,
};
use pattern::{IpBlock, Pattern, PatternError};
use serde::Serialize;

use crate::{PolicyError, is_method, object_key};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    WorkloadSelector,
    Namespace,
    Global,
}

/// A compiled policy.
#[derive(Clone, Debug)]
pub struct Policy {
    key: String,
    namespace: String,
    scope: Scope,
    action: Action,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Clone, Debug, Default)]
struct Source {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    ip_blocks: Vec<IpBlock>,
    not_ip_blocks: Vec<IpBlock>,
}

#[derive(Clone, Debug, Default)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<Pattern>,
    not_methods: Vec<Pattern>,
    paths: Vec<Pattern>,
    not_paths: Vec<Pattern>,
    hosts: Vec<Pattern>,
    not_hosts: Vec<Pattern>,
}

impl Operation {
    fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

#[derive(Clone, Debug)]
enum Key {
    Header(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

#[derive(Clone, Debug)]
struct Condition {
    key: Key,
    values: Vec<Value>,
    not_values: Vec<Value>,
}

#[derive(Clone, Debug)]
enum Value {
    Pattern(Pattern),
    Ip(IpBlock),
    Port(u16),
}

impl Rule {
    fn has_l7(&self) -> bool {
        self.to.iter().any(Operation::has_l7) || self.when.iter().any(|c| matches!(c.key, Key::Header(_)))
    }
}

struct Compiler<'a> {
    object: &'a str,
}

impl Compiler<'_> {
    fn patterns(&self, field: &str, values: &[String], lowercase: bool) -> Result<Vec<Pattern>, PolicyError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                Pattern::parse(v, lowercase).map_err(|e| match e {
                    PatternError::Empty => {
                        PolicyError::Empty { object: self.object.into(), field: format!("{field}[{i}]") }
                    }
                    PatternError::Wildcard => PolicyError::BadPattern {
                        object: self.object.into(),
                        field: format!("{field}[{i}]"),
                        value: v.clone(),
                    },
                })
            })
            .collect()
    }

    fn methods(&self, field: &str, values: &[String]) -> Result<Vec<Pattern>, PolicyError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if is_method(v) {
                    Ok(Pattern::exact(v))
                } else {
                    Err(PolicyError::BadMethod {
                        object: self.object.into(),
                        field: format!("{field}[{i}]"),
                        value: v.clone(),
                    })
                }
            })
            .collect()
    }

    fn ip_blocks(&self, field: &str, values: &[String]) -> Result<Vec<IpBlock>, PolicyError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                IpBlock::parse(v).ok_or_else(|| PolicyError::BadIpBlock {
                    object: self.object.into(),
                    field: format!("{field}[{i}]"),
                    value: v.clone(),
                })
            })
            .collect()
    }

    fn ports(&self, field: &str, values: &[u32]) -> Result<Vec<u16>, PolicyError> {
        values.iter().enumerate().map(|(i, v)| self.port(&format!("{field}[{i}]"), &v.to_string())).collect()
    }

    fn port(&self, field: &str, value: &str) -> Result<u16, PolicyError> {
        value.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| PolicyError::BadPort {
            object: self.object.into(),
            field: field.into(),
            value: value.into(),
        })
    }

    fn source(&self, field: &str, s: &AuthorizationSource) -> Result<Source, PolicyError> {
        Ok(Source {
            principals: self.patterns(&format!("{field}.principals"), &s.principals, false)?,
            not_principals: self.patterns(&format!("{field}.notPrincipals"), &s.not_principals, false)?,
            namespaces: self.patterns(&format!("{field}.namespaces"), &s.namespaces, false)?,
            not_namespaces: self.patterns(&format!("{field}.notNamespaces"), &s.not_namespaces, false)?,
            ip_blocks: self.ip_blocks(&format!("{field}.ipBlocks"), &s.ip_blocks)?,
            not_ip_blocks: self.ip_blocks(&format!("{field}.notIpBlocks"), &s.not_ip_blocks)?,
        })
    }

    fn operation(&self, field: &str, o: &AuthorizationOperation) -> Result<Operation, PolicyError> {
        Ok(Operation {
            ports: self.ports(&format!("{field}.ports"), &o.ports)?,
            not_ports: self.ports(&format!("{field}.notPorts"), &o.not_ports)?,
            methods: self.methods(&format!("{field}.methods"), &o.methods)?,
            not_methods: self.methods(&format!("{field}.notMethods"), &o.not_methods)?,
            paths: self.patterns(&format!("{field}.paths"), &o.paths, false)?,
            not_paths: self.patterns(&format!("{field}.notPaths"), &o.not_paths, false)?,
            hosts: self.patterns(&format!("{field}.hosts"), &o.hosts, true)?,
            not_hosts: self.patterns(&format!("{field}.notHosts"), &o.not_hosts, true)?,
        })
    }

    fn condition(&self, field: &str, c: &AuthorizationCondition) -> Result<Condition, PolicyError> {
        let key = match c.key.as_str() {
            "source.ip" | "remote.ip" => Key::SourceIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "destination.port" => Key::DestinationPort,
            k => match k.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
                Some(name) if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
                    Key::Header(name.to_ascii_lowercase())
                }
                _ => {
                    return Err(PolicyError::UnknownConditionKey {
                        object: self.object.into(),
                        field: format!("{field}.key"),
                        key: c.key.clone(),
                    });
                }
            },
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(PolicyError::NoConditionValues { object: self.object.into(), field: field.into() });
        }
        let values = |name: &str, list: &[String]| -> Result<Vec<Value>, PolicyError> {
            let field = format!("{field}.{name}");
            match key {
                Key::SourceIp => Ok(self.ip_blocks(&field, list)?.into_iter().map(Value::Ip).collect()),
                Key::DestinationPort => list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.port(&format!("{field}[{i}]"), v).map(Value::Port))
                    .collect(),
                _ => Ok(self.patterns(&field, list, false)?.into_iter().map(Value::Pattern).collect()),
            }
        };
        Ok(Condition {
            values: values("values", &c.values)?,
            not_values: values("notValues", &c.not_values)?,
            key,
        })
    }
}

impl Policy {
    /// Compiles a policy, refusing anything it could not enforce as written.
    pub fn compile(p: &Authorization) -> Result<Policy, PolicyError> {
        let key = object_key(&p.namespace, &p.name);
        let c = Compiler { object: &key };
        if p.name.is_empty() {
            return Err(PolicyError::Empty { object: key.clone(), field: "metadata.name".into() });
        }
        let scope = match AuthorizationScope::try_from(p.scope) {
            Ok(AuthorizationScope::WorkloadSelector) => Scope::WorkloadSelector,
            Ok(AuthorizationScope::Namespace) => Scope::Namespace,
            Ok(AuthorizationScope::Global) => Scope::Global,
            Err(_) => {
                return Err(PolicyError::UnknownEnum { object: key, field: "scope".into(), value: p.scope });
            }
        };
        let action = match AuthorizationAction::try_from(p.action) {
            Ok(AuthorizationAction::Allow) => Action::Allow,
            Ok(AuthorizationAction::Deny) => Action::Deny,
            Ok(AuthorizationAction::Audit) => Action::Audit,
            Err(_) => {
                return Err(PolicyError::UnknownEnum {
                    object: key,
                    field: "spec.action".into(),
                    value: p.action,
                });
            }
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, rule) in p.rules.iter().enumerate() {
            let mut compiled = Rule::default();
            for (i, from) in rule.from.iter().enumerate() {
                compiled.from.push(c.source(&format!("rules[{r}].from[{i}].source"), from)?);
            }
            for (i, to) in rule.to.iter().enumerate() {
                compiled.to.push(c.operation(&format!("rules[{r}].to[{i}].operation"), to)?);
            }
            for (i, when) in rule.when.iter().enumerate() {
                compiled.when.push(c.condition(&format!("rules[{r}].when[{i}]"), when)?);
            }
            rules.push(compiled);
        }
        Ok(Policy { namespace: p.namespace.clone(), key, scope, action, rules })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    pub fn action(&self) -> Action {
        self.action
    }

    /// Whether any rule has HTTP conditions (then HTTP connections are decided per request).
    pub fn has_l7(&self) -> bool {
        self.rules.iter().any(Rule::has_l7)
    }

    /// The ports named by rules with HTTP conditions; empty when such a rule names no port.
    pub fn l7_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for rule in self.rules.iter().filter(|r| r.has_l7()) {
            let named: Vec<u16> = rule.to.iter().flat_map(|o| o.ports.iter().copied()).collect();
            if named.is_empty() || rule.to.iter().any(|o| o.ports.is_empty()) {
                return Vec::new();
            }
            ports.extend(named);
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// The connection's source, as the destination side sees it.
pub struct Peer<'a> {
    pub ip: IpAddr,
    /// `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`); `None`: plaintext, unauthenticated.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

/// One HTTP request's L7 attributes.
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// Host or `:authority`, possibly with a port.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Allow,
    Deny,
    /// Connection level only: an HTTP connection whose outcome depends on each request.
    PerRequest,
}

/// Whether and why one policy matched, for `meshctl explain`.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub policy: String,
    pub action: Action,
    pub matched: bool,
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The DENY policy that decided, or the ALLOW policies none of which matched.
    pub policy: Option<String>,
    /// One line for logs and 403 bodies.
    pub reason: String,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    pub evaluated: Vec<Evaluation>,
}

/// What a rule can tell before requests are seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    Yes,
    No,
    /// The L4 parts match; HTTP conditions decide per request.
    Deferred,
}

/// What the evaluation may look at: the peer and port, and the request if there is one.
struct Input<'a> {
    peer: &'a Peer<'a>,
    port: u16,
    request: Option<&'a Request<'a>>,
    /// Connection level: whether requests will be seen.
    http: bool,
}

fn any_pattern(patterns: &[Pattern], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| p.matches(v.as_bytes())))
}

/// A field with values matches when the value is among them; a `not` field when it is not.
/// An unknown value (no principal on plaintext) never matches the positive field and, failing
/// closed, counts as matching the negative one only for DENY rules.
fn field(values: &[Pattern], nots: &[Pattern], value: Option<&str>, deny: bool) -> bool {
    let positive = values.is_empty() || any_pattern(values, value);
    let negative = nots.is_empty()
        || match value {
            Some(v) => !nots.iter().any(|p| p.matches(v.as_bytes())),
            None => deny,
        };
    positive && negative
}

impl Source {
    fn matches(&self, peer: &Peer<'_>, deny: bool) -> bool {
        let ip = canonical(peer.ip);
        field(&self.principals, &self.not_principals, peer.principal, deny)
            && field(&self.namespaces, &self.not_namespaces, peer.namespace, deny)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|b| b.contains(ip)))
            && !self.not_ip_blocks.iter().any(|b| b.contains(ip))
    }
}

impl Operation {
    fn l4_matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }

    fn l7_matches(&self, request: &Request<'_>) -> bool {
        let host = crate::host_without_port(request.host).to_ascii_lowercase();
        field(&self.methods, &self.not_methods, Some(request.method), false)
            && field(&self.paths, &self.not_paths, Some(request.path), false)
            && field(&self.hosts, &self.not_hosts, Some(&host), false)
    }
}

impl Condition {
    /// `None`: an HTTP condition without a request to look at.
    fn matches(&self, input: &Input<'_>) -> Option<bool> {
        let check = |values: &[Value]| -> bool {
            values.iter().any(|v| match (v, &self.key) {
                (Value::Ip(block), _) => block.contains(canonical(input.peer.ip)),
                (Value::Port(p), _) => *p == input.port,
                (Value::Pattern(p), Key::SourceNamespace) => {
                    input.peer.namespace.is_some_and(|n| p.matches(n.as_bytes()))
                }
                (Value::Pattern(p), Key::SourcePrincipal) => {
                    input.peer.principal.is_some_and(|n| p.matches(n.as_bytes()))
                }
                (Value::Pattern(p), Key::Header(name)) => input.request.is_some_and(|r| {
                    r.headers.get_all(name.as_str()).iter().any(|h| p.matches(h.as_bytes()))
                }),
                (Value::Pattern(_), _) => false,
            })
        };
        if matches!(self.key, Key::Header(_)) && input.request.is_none() {
            return None;
        }
        Some((self.values.is_empty() || check(&self.values)) && !check(&self.not_values))
    }
}

impl Rule {
    fn evaluate(&self, input: &Input<'_>, deny: bool) -> Match {
        if !self.from.is_empty() && !self.from.iter().any(|s| s.matches(input.peer, deny)) {
            return Match::No;
        }
        let mut deferred = false;
        if !self.to.is_empty() {
            let mut any = false;
            for op in self.to.iter().filter(|o| o.l4_matches(input.port)) {
                match (op.has_l7(), input.request) {
                    (false, _) => any = true,
                    (true, Some(request)) => any |= op.l7_matches(request),
                    (true, None) => {
                        any = true;
                        deferred = true;
                    }
                }
            }
            if !any {
                return Match::No;
            }
        }
        for condition in &self.when {
            match condition.matches(input) {
                Some(true) => {}
                Some(false) => return Match::No,
                None => deferred = true,
            }
        }
        if !deferred {
            return Match::Yes;
        }
        // HTTP conditions without a request: decided per request when the connection is HTTP;
        // otherwise they can never be checked, so DENY matches (fail closed) and ALLOW does not.
        match (input.http, deny) {
            (true, _) => Match::Deferred,
            (false, true) => Match::Yes,
            (false, false) => Match::No,
        }
    }
}

impl Policy {
    fn evaluate(&self, input: &Input<'_>) -> (Match, String) {
        let deny = self.action == Action::Deny;
        let mut deferred = None;
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.evaluate(input, deny) {
                Match::Yes => return (Match::Yes, format!("rule {i} matched")),
                Match::Deferred => deferred = deferred.or(Some(i)),
                Match::No => {}
            }
        }
        match deferred {
            Some(i) => (Match::Deferred, format!("rule {i} depends on each HTTP request")),
            None if self.rules.is_empty() => (Match::No, "no rules: matches nothing".into()),
            None => (Match::No, "no rule matched".into()),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn decide(policies: &[&Policy], input: &Input<'_>) -> Decision {
    let mut evaluated = Vec::with_capacity(policies.len());
    let mut audited = Vec::new();
    let mut deny: Option<(String, Match)> = None;
    let mut allow_applies = Vec::new();
    let mut allow = Match::No;
    for policy in policies {
        let (matched, why) = policy.evaluate(input);
        evaluated.push(Evaluation {
            policy: policy.key.clone(),
            action: policy.action,
            matched: matched == Match::Yes,
            why: why.clone(),
        });
        match policy.action {
            Action::Audit if matched == Match::Yes => audited.push(policy.key.clone()),
            Action::Audit => {}
            Action::Deny => match (matched, &deny) {
                (Match::Yes, Some((_, Match::Yes))) | (Match::No, _) => {}
                (Match::Yes, _) => deny = Some((policy.key.clone(), Match::Yes)),
                (Match::Deferred, None) => deny = Some((policy.key.clone(), Match::Deferred)),
                (Match::Deferred, Some(_)) => {}
            },
            Action::Allow => {
                allow_applies.push(policy.key.clone());
                allow = match (allow, matched) {
                    (Match::Yes, _) | (_, Match::Yes) => Match::Yes,
                    (Match::Deferred, _) | (_, Match::Deferred) => Match::Deferred,
                    _ => Match::No,
                };
            }
        }
    }
    let (verdict, policy, reason) = match deny {
        Some((key, Match::Yes)) => (Verdict::Deny, Some(key.clone()), format!("denied by {key}")),
        Some((key, _)) => (Verdict::PerRequest, None, format!("{key} has HTTP conditions")),
        None if allow_applies.is_empty() => (Verdict::Allow, None, "no ALLOW policy applies".into()),
        None => match allow {
            Match::Yes => (Verdict::Allow, None, "allowed by an ALLOW policy".into()),
            Match::Deferred => (Verdict::PerRequest, None, "ALLOW policies have HTTP conditions".into()),
            Match::No => {
                let names = allow_applies.join(", ");
                (Verdict::Deny, Some(names.clone()), format!("no ALLOW policy matched ({names})"))
            }
        },
    };
    Decision { verdict, policy, reason, audited, evaluated }
}

/// Decides a connection; `http` says whether it will be parsed as HTTP.
pub fn check_connection(policies: &[&Policy], peer: &Peer<'_>, dst_port: u16, http: bool) -> Decision {
    decide(policies, &Input { peer, port: dst_port, request: None, http })
}

/// Decides one HTTP request, with every attribute.
pub fn check_request(
    policies: &[&Policy],
    peer: &Peer<'_>,
    dst_port: u16,
    request: &Request<'_>,
) -> Decision {
    decide(policies, &Input { peer, port: dst_port, request: Some(request), http: true })
}

#[cfg(test)]
mod tests;
