//! Authorization: Istio's AuthorizationPolicy semantics, decided per connection and per request.
//!
//! Order: any matching DENY denies; else, with no ALLOW policies, allow; else any matching ALLOW
//! allows; else deny. AUDIT policies are only reported. A policy matches when any rule does; a
//! rule when its `from`, `to` and `when` all do (each list ORs its entries, each entry ANDs its
//! fields, each field ORs its values; `not*` fields match when the value is none of them).
//!
//! The caller passes the policies that apply to the destination workload (by scope and
//! selector); this module never looks them up. Where an attribute cannot be known (a plaintext
//! peer has no principal; a connection not parsed as HTTP has no path) the answer fails closed:
//! ALLOW rules that need it do not match and DENY rules that need it do.

mod compile;
mod eval;
mod normalize;
mod pattern;
#[cfg(test)]
mod tests;

use std::{fmt, net::IpAddr};

use http::HeaderName;
use mesh_api::workload::v1::Authorization;
use serde::Serialize;

pub use normalize::normalize_path;
use pattern::{IpBlock, Pattern};

use crate::PolicyError;

/// What a policy does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Reported in [`Decision::audited`]; never changes the verdict.
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
        })
    }
}

/// Which workloads a policy applies to; the caller uses it to pick the policies it passes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// The workloads whose `authorization_policies` list the policy.
    WorkloadSelector,
    /// Every workload of the policy's namespace.
    Namespace,
    /// Every workload of the mesh (a policy without selector in the root namespace).
    Global,
}

/// A compiled AuthorizationPolicy: patterns parsed and CIDRs built once, so checks parse nothing.
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

/// Empty lists are not checked, so an empty source matches any peer.
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
    /// Lowercased: hosts compare case-insensitively.
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

/// A `when` condition; `values` and `not_values` are ANDed when both are set.
#[derive(Clone, Debug)]
enum Condition {
    Header { name: HeaderName, values: Vec<Pattern>, not_values: Vec<Pattern> },
    SourceIp { values: Vec<IpBlock>, not_values: Vec<IpBlock> },
    SourceNamespace { values: Vec<Pattern>, not_values: Vec<Pattern> },
    SourcePrincipal { values: Vec<Pattern>, not_values: Vec<Pattern> },
    DestinationPort { values: Vec<u16>, not_values: Vec<u16> },
}

impl Rule {
    fn has_l7(&self) -> bool {
        self.to.iter().any(Operation::has_l7) || self.has_header_condition()
    }

    fn has_header_condition(&self) -> bool {
        self.when.iter().any(|c| matches!(c, Condition::Header { .. }))
    }
}

impl Policy {
    /// Compiles a policy, refusing what it could not enforce as written: bad CIDRs, unknown
    /// `when` keys, conditions without values, empty values, ports outside 1-65535, inner
    /// wildcards, methods that are not uppercase tokens, unknown enum values.
    pub fn compile(p: &Authorization) -> Result<Policy, PolicyError> {
        compile::policy(p)
    }

    /// Returns `<namespace>/<name>`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Returns the policy's name without its namespace.
    pub fn name(&self) -> &str {
        &self.key[self.namespace.len() + 1..]
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

    /// Returns whether any rule needs HTTP attributes (methods, paths, hosts, their `not` forms,
    /// or a `request.headers[...]` condition), i.e. whether the proxy must parse HTTP to decide.
    pub fn has_l7(&self) -> bool {
        self.rules.iter().any(Rule::has_l7)
    }

    /// Returns the ports named by rules with HTTP parts (sorted, deduplicated), so the proxy
    /// parses HTTP only where needed; empty when such a rule applies to any port (and when no rule
    /// has HTTP parts: check [`Policy::has_l7`] first).
    pub fn l7_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for rule in self.rules.iter().filter(|r| r.has_l7()) {
            // A header condition makes every operation of the rule need HTTP; otherwise only the
            // operations with HTTP fields do.
            let all = rule.has_header_condition();
            let mut operations = rule.to.iter().filter(|o| all || o.has_l7()).peekable();
            if operations.peek().is_none() {
                return Vec::new();
            }
            for operation in operations {
                if operation.ports.is_empty() {
                    return Vec::new();
                }
                ports.extend_from_slice(&operation.ports);
            }
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// The connection's source, as the destination side sees it.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    pub ip: IpAddr,
    /// `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`, see [`crate::principal_of`]); None = plaintext,
    /// unauthenticated.
    pub principal: Option<&'a str>,
    /// The namespace the peer's identity proves; None for plaintext.
    pub namespace: Option<&'a str>,
}

/// One HTTP request's L7 attributes.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query. Matched after [`normalize_path`].
    pub path: &'a str,
    /// Host or `:authority`, possibly with a port; `hosts` patterns may name it with or without.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// The outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Allow,
    Deny,
    /// Connection level only: an HTTP connection whose fate depends on each request.
    PerRequest,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::PerRequest => "per request",
        })
    }
}

/// How one policy fared, for `meshctl explain` and debug logs.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub policy: String,
    pub action: Action,
    pub matched: bool,
    /// Which rule matched, or why none did, e.g. `rule 0: path /admin matches "/admin*"`.
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The DENY policy that denied (`<ns>/<name>`); None when denied because ALLOW policies
    /// apply and none matched, and None for Allow and PerRequest.
    pub policy: Option<String>,
    /// One line for logs and 403 bodies, e.g. `denied by demo/deny-admin` or
    /// `no ALLOW policy matched (demo/allow-get)`.
    pub reason: String,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Every policy passed in, and whether and why it matched: filled by [`explain_connection`]
    /// and [`explain_request`] only: the proxy's checks skip the text, which is most of their cost.
    pub evaluated: Vec<Evaluation>,
}

/// Decides a connection. `http`: whether the connection will be parsed as HTTP; then rules with
/// HTTP parts are left to [`check_request`], and the verdict is [`Verdict::PerRequest`] when one
/// of them could still change the outcome. When `http` is false those parts can never be
/// checked, so it fails closed: a DENY operation or header condition counts as matching when its
/// L4 parts do; an ALLOW one never matches.
pub fn check_connection(policies: &[&Policy], peer: &Peer<'_>, dst_port: u16, http: bool) -> Decision {
    connection(policies, peer, dst_port, http, eval::Reasons(false))
}

/// Decides one HTTP request, evaluating every part of every rule.
pub fn check_request(
    policies: &[&Policy],
    peer: &Peer<'_>,
    dst_port: u16,
    request: &Request<'_>,
) -> Decision {
    request_decision(policies, peer, dst_port, request, eval::Reasons(false))
}

/// [`check_connection`], with every policy's evaluation and the reasons (`meshctl explain`).
pub fn explain_connection(policies: &[&Policy], peer: &Peer<'_>, dst_port: u16, http: bool) -> Decision {
    connection(policies, peer, dst_port, http, eval::Reasons(true))
}

/// [`check_request`], with every policy's evaluation and the reasons (`meshctl explain`).
pub fn explain_request(
    policies: &[&Policy],
    peer: &Peer<'_>,
    dst_port: u16,
    request: &Request<'_>,
) -> Decision {
    request_decision(policies, peer, dst_port, request, eval::Reasons(true))
}

fn connection(
    policies: &[&Policy],
    peer: &Peer<'_>,
    dst_port: u16,
    http: bool,
    reasons: eval::Reasons,
) -> Decision {
    let l7 = if http { eval::L7::Pending } else { eval::L7::Never };
    decide(policies, &eval::Context::new(peer, dst_port, l7, reasons), reasons)
}

fn request_decision(
    policies: &[&Policy],
    peer: &Peer<'_>,
    dst_port: u16,
    request: &Request<'_>,
    reasons: eval::Reasons,
) -> Decision {
    let l7 = eval::L7::Known(eval::Http::new(request));
    decide(policies, &eval::Context::new(peer, dst_port, l7, reasons), reasons)
}

fn decide(policies: &[&Policy], cx: &eval::Context<'_>, reasons: eval::Reasons) -> Decision {
    use eval::Tri;

    let mut evaluated = Vec::with_capacity(if reasons.0 { policies.len() } else { 0 });
    let mut denied_by = None;
    let mut allows = Vec::new();
    let mut allowed_by = None;
    // Policies whose outcome waits for the request.
    let mut pending_deny = Vec::new();
    let mut pending_allow = Vec::new();
    let mut audited = Vec::new();
    for policy in policies {
        let check = eval::policy(policy, cx);
        let key = policy.key();
        match (policy.action, check.tri) {
            (Action::Deny, Tri::Yes) => denied_by = denied_by.or(Some(key)),
            (Action::Deny, Tri::Unknown) => pending_deny.push(key),
            (Action::Allow, tri) => {
                allows.push(key);
                match tri {
                    Tri::Yes => allowed_by = allowed_by.or(Some(key)),
                    Tri::Unknown => pending_allow.push(key),
                    Tri::No => {}
                }
            }
            (Action::Audit, Tri::Yes) => audited.push(key.to_owned()),
            (Action::Deny | Action::Audit, _) => {}
        }
        if reasons.0 {
            evaluated.push(Evaluation {
                policy: key.to_owned(),
                action: policy.action,
                matched: check.tri == Tri::Yes,
                why: check.why,
            });
        }
    }

    let allow_all_missed = !allows.is_empty() && allowed_by.is_none() && pending_allow.is_empty();
    let (verdict, policy, reason) = if let Some(key) = denied_by {
        (Verdict::Deny, Some(key.to_owned()), format!("denied by {key}"))
    } else if allow_all_missed {
        // Denied whatever the pending DENY policies say.
        (Verdict::Deny, None, format!("no ALLOW policy matched ({})", allows.join(", ")))
    } else if !pending_deny.is_empty() || allowed_by.is_none() && !pending_allow.is_empty() {
        let mut pending = pending_deny;
        if allowed_by.is_none() {
            pending.extend(pending_allow);
        }
        (Verdict::PerRequest, None, format!("decided per request by {}", pending.join(", ")))
    } else if let Some(key) = allowed_by {
        (Verdict::Allow, None, format!("allowed by {key}"))
    } else if policies.is_empty() {
        (Verdict::Allow, None, "allowed: no policies apply".to_owned())
    } else {
        (Verdict::Allow, None, "allowed: no ALLOW policies apply and no DENY policy matched".to_owned())
    };
    Decision { verdict, policy, reason, audited, evaluated }
}
