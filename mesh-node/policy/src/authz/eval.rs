//! Matching a policy against what is known of a connection or a request, with the reasons.
//!
//! Matching is three-valued: before a request is seen an HTTP field is Unknown, and AND/OR
//! combine Unknown the Kleene way, so a connection is left to its requests only when they could
//! change the answer. Each result can carry a short reason for `meshctl explain`: reasons are
//! built only when asked for ([`Reasons`]), because the proxy decides every request and most
//! of the cost of a large policy would otherwise be formatting text nobody reads.

use std::{borrow::Cow, fmt::Display, net::IpAddr};

use http::HeaderMap;

use super::{
    Action, Condition, Operation, Peer, Policy, Request, Rule, Source, normalize_path,
    pattern::{IpBlock, Pattern},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tri {
    Yes,
    No,
    /// Depends on the HTTP request.
    Unknown,
}

pub(super) struct Check {
    pub(super) tri: Tri,
    pub(super) why: String,
}

/// Whether reasons are written (explaining) or left empty (enforcing).
#[derive(Clone, Copy, Debug)]
pub(super) struct Reasons(pub(super) bool);

impl Reasons {
    fn check(self, tri: Tri, why: impl FnOnce() -> String) -> Check {
        Check { tri, why: if self.0 { why() } else { String::new() } }
    }

    fn yes(self, why: impl FnOnce() -> String) -> Check {
        self.check(Tri::Yes, why)
    }

    fn no(self, why: impl FnOnce() -> String) -> Check {
        self.check(Tri::No, why)
    }
}

/// What is known of HTTP.
pub(super) enum L7<'a> {
    /// A request: every attribute.
    Known(Http<'a>),
    /// A connection that will be parsed as HTTP: the attributes come with each request.
    Pending,
    /// A connection that will not be parsed: the attributes will never be known.
    Never,
}

pub(super) struct Http<'a> {
    method: &'a str,
    path: Cow<'a, str>,
    /// The Host as sent, then without its port (lowercased): a policy may name either form, and
    /// Istio's exact-only comparison lets `example.com:80` slip past a DENY on `example.com`.
    hosts: Vec<String>,
    headers: &'a HeaderMap,
}

impl<'a> Http<'a> {
    pub(super) fn new(request: &Request<'a>) -> Self {
        let full = request.host.to_ascii_lowercase();
        let bare = crate::host_without_port(&full).to_owned();
        let hosts = if bare == full { vec![full] } else { vec![full, bare] };
        Http { method: request.method, path: normalize_path(request.path), hosts, headers: request.headers }
    }
}

pub(super) struct Context<'a> {
    peer: &'a Peer<'a>,
    /// The peer's address with v4-mapped v6 unwrapped, so v4 blocks match it.
    ip: IpAddr,
    port: u16,
    l7: L7<'a>,
    reasons: Reasons,
}

impl<'a> Context<'a> {
    pub(super) fn new(peer: &'a Peer<'a>, port: u16, l7: L7<'a>, reasons: Reasons) -> Self {
        Context { peer, ip: peer.ip.to_canonical(), port, l7, reasons }
    }
}

/// Whether an unknown attribute counts as a match: yes for DENY (fail closed), no otherwise.
#[derive(Clone, Copy)]
struct Deny(bool);

pub(super) fn policy(p: &Policy, cx: &Context<'_>) -> Check {
    if p.rules.is_empty() {
        return cx.reasons.no(|| "no rules: matches nothing".into());
    }
    let deny = Deny(p.action == Action::Deny);
    any(cx.reasons, p.rules.iter().map(|r| rule(r, cx, deny)), |i| format!("rule {i}: "))
}

fn rule(r: &Rule, cx: &Context<'_>, deny: Deny) -> Check {
    if r.from.is_empty() && r.to.is_empty() && r.when.is_empty() {
        return cx.reasons.yes(|| "matches anything (no from, to or when)".into());
    }
    let mut all = All::new(cx.reasons);
    if !r.from.is_empty() {
        all.push(any_entry(cx.reasons, "from", r.from.iter().map(|s| source(s, cx, deny))));
    }
    if !r.to.is_empty() && !all.failed() {
        all.push(any_entry(cx.reasons, "to", r.to.iter().map(|o| operation(o, cx, deny))));
    }
    for c in &r.when {
        if all.failed() {
            break;
        }
        all.push(condition(c, cx, deny));
    }
    all.finish("")
}

fn source(s: &Source, cx: &Context<'_>, deny: Deny) -> Check {
    let (principal, namespace, r) = (cx.peer.principal, cx.peer.namespace, cx.reasons);
    let mut all = All::new(r);
    all.add(identity(r, "principal", "principals", &s.principals, false, principal, deny));
    all.add(identity(r, "principal", "notPrincipals", &s.not_principals, true, principal, deny));
    all.add(identity(r, "namespace", "namespaces", &s.namespaces, false, namespace, deny));
    all.add(identity(r, "namespace", "notNamespaces", &s.not_namespaces, true, namespace, deny));
    all.add(ips(r, "ipBlocks", &s.ip_blocks, false, cx.ip));
    all.add(ips(r, "notIpBlocks", &s.not_ip_blocks, true, cx.ip));
    all.finish("any source")
}

fn operation(o: &Operation, cx: &Context<'_>, deny: Deny) -> Check {
    let r = cx.reasons;
    let mut all = All::new(r);
    all.add(ports(r, "ports", &o.ports, false, cx.port));
    all.add(ports(r, "notPorts", &o.not_ports, true, cx.port));
    if o.has_l7() && !all.failed() {
        match &cx.l7 {
            L7::Known(h) => {
                let method = [h.method.as_bytes()];
                all.add(strings(r, "method", "methods", &o.methods, false, &method, h.method));
                all.add(strings(r, "method", "notMethods", &o.not_methods, true, &method, h.method));
                let path = [h.path.as_bytes()];
                all.add(strings(r, "path", "paths", &o.paths, false, &path, &h.path));
                all.add(strings(r, "path", "notPaths", &o.not_paths, true, &path, &h.path));
                all.add(strings(r, "host", "hosts", &o.hosts, false, &h.hosts, &h.hosts[0]));
                all.add(strings(r, "host", "notHosts", &o.not_hosts, true, &h.hosts, &h.hosts[0]));
            }
            L7::Pending | L7::Never => {
                let fields = [
                    ("methods", o.methods.is_empty()),
                    ("notMethods", o.not_methods.is_empty()),
                    ("paths", o.paths.is_empty()),
                    ("notPaths", o.not_paths.is_empty()),
                    ("hosts", o.hosts.is_empty()),
                    ("notHosts", o.not_hosts.is_empty()),
                ];
                let named: Vec<&str> = fields.iter().filter(|(_, empty)| !empty).map(|(f, _)| *f).collect();
                all.push(unavailable(r, || named.join(", "), &cx.l7, deny));
            }
        }
    }
    all.finish("any operation")
}

fn condition(c: &Condition, cx: &Context<'_>, deny: Deny) -> Check {
    let r = cx.reasons;
    let mut all = All::new(r);
    match c {
        Condition::Header { name, values, not_values } => {
            let L7::Known(h) = &cx.l7 else {
                return unavailable(r, || format!("request.headers[{name}]"), &cx.l7, deny);
            };
            let found: Vec<&[u8]> = h.headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            let (what, shown) = if !r.0 {
                (String::new(), String::new())
            } else if found.is_empty() {
                (format!("header {name}"), "(absent)".to_owned())
            } else {
                let shown = found.iter().map(|v| String::from_utf8_lossy(v)).collect::<Vec<_>>().join(",");
                (format!("header {name}"), shown)
            };
            all.add(strings(r, &what, "values", values, false, &found, &shown));
            all.add(strings(r, &what, "notValues", not_values, true, &found, &shown));
        }
        Condition::SourceIp { values, not_values } => {
            all.add(ips(r, "values", values, false, cx.ip));
            all.add(ips(r, "notValues", not_values, true, cx.ip));
        }
        Condition::SourceNamespace { values, not_values } => {
            let namespace = cx.peer.namespace;
            all.add(identity(r, "namespace", "values", values, false, namespace, deny));
            all.add(identity(r, "namespace", "notValues", not_values, true, namespace, deny));
        }
        Condition::SourcePrincipal { values, not_values } => {
            let principal = cx.peer.principal;
            all.add(identity(r, "principal", "values", values, false, principal, deny));
            all.add(identity(r, "principal", "notValues", not_values, true, principal, deny));
        }
        Condition::DestinationPort { values, not_values } => {
            all.add(ports(r, "values", values, false, cx.port));
            all.add(ports(r, "notValues", not_values, true, cx.port));
        }
    }
    all.finish("")
}

/// HTTP fields without a request: left to the request, or failing closed when there will be none.
fn unavailable(r: Reasons, fields: impl FnOnce() -> String, l7: &L7<'_>, deny: Deny) -> Check {
    match (l7, deny) {
        (L7::Never, Deny(true)) => {
            r.yes(|| format!("{} need HTTP, which this connection is not: DENY fails closed", fields()))
        }
        (L7::Never, Deny(false)) => r.no(|| format!("{} need HTTP, which this connection is not", fields())),
        _ => r.check(Tri::Unknown, || format!("{} depend on each request", fields())),
    }
}

/// A string attribute (its candidate forms, any of which may match) against a list.
fn strings(
    r: Reasons,
    what: &str,
    list_name: &str,
    list: &[Pattern],
    negated: bool,
    candidates: &[impl AsRef<[u8]>],
    shown: &str,
) -> Option<Check> {
    if list.is_empty() {
        return None;
    }
    let hit = list.iter().find(|p| candidates.iter().any(|c| p.matches(c.as_ref())));
    Some(verdict(r, what, &shown, list_name, list, negated, hit))
}

/// An identity attribute, absent on plaintext. Absent, a positive list never matches, and a
/// `not` list matches only for DENY: it fails closed either way.
fn identity(
    r: Reasons,
    what: &str,
    list_name: &str,
    list: &[Pattern],
    negated: bool,
    value: Option<&str>,
    deny: Deny,
) -> Option<Check> {
    match (value, list.is_empty()) {
        (_, true) => None,
        (Some(v), false) => strings(r, what, list_name, list, negated, &[v.as_bytes()], v),
        (None, false) => Some(match (negated, deny) {
            (false, _) => r.no(|| format!("no {what} (plaintext peer) for {list_name}")),
            (true, Deny(true)) => {
                r.yes(|| format!("no {what} (plaintext peer): {list_name} fails closed for DENY"))
            }
            (true, Deny(false)) => r.no(|| format!("no {what} (plaintext peer): {list_name} needs mTLS")),
        }),
    }
}

fn ips(r: Reasons, list_name: &str, list: &[IpBlock], negated: bool, ip: IpAddr) -> Option<Check> {
    if list.is_empty() {
        return None;
    }
    let hit = list.iter().find(|b| b.contains(ip));
    Some(verdict(r, "source ip", &ip, list_name, list, negated, hit))
}

fn ports(r: Reasons, list_name: &str, list: &[u16], negated: bool, port: u16) -> Option<Check> {
    if list.is_empty() {
        return None;
    }
    let hit = list.iter().find(|p| **p == port);
    Some(verdict(r, "port", &port, list_name, list, negated, hit))
}

/// Words the outcome of one field: a positive list matches on a hit, a `not` list on none.
fn verdict<T: Display>(
    r: Reasons,
    what: &str,
    value: &dyn Display,
    list_name: &str,
    list: &[T],
    negated: bool,
    hit: Option<&T>,
) -> Check {
    match (negated, hit) {
        (false, Some(h)) => r.yes(|| format!("{what} {value} matches {h}")),
        (false, None) => r.no(|| format!("{what} {value} matches none of {list_name} [{}]", join(list))),
        (true, Some(h)) => r.no(|| format!("{what} {value} matches {list_name} {h}")),
        (true, None) => r.yes(|| format!("{what} {value} matches none of {list_name}")),
    }
}

fn join<T: Display>(list: &[T]) -> String {
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// ORs checks, stopping at the first match; `tag` names each entry in the reason.
fn any(r: Reasons, checks: impl Iterator<Item = Check>, tag: impl Fn(usize) -> String) -> Check {
    let mut pending = Vec::new();
    let mut misses = Vec::new();
    let mut any_pending = false;
    for (i, c) in checks.enumerate() {
        let tagged = || format!("{}{}", tag(i), c.why);
        match c.tri {
            Tri::Yes => return r.yes(tagged),
            Tri::Unknown if r.0 => pending.push(tagged()),
            Tri::No if r.0 => misses.push(tagged()),
            Tri::Unknown => any_pending = true,
            Tri::No => {}
        }
    }
    if pending.is_empty() && !any_pending {
        r.no(|| misses.join("; "))
    } else {
        r.check(Tri::Unknown, || pending.join("; "))
    }
}

/// ORs the entries of `from` or `to`, naming the entry only when there are several.
fn any_entry(r: Reasons, list: &str, checks: impl ExactSizeIterator<Item = Check>) -> Check {
    let several = checks.len() > 1;
    any(r, checks, |i| if several { format!("{list}[{i}]: ") } else { String::new() })
}

/// ANDs checks: the first miss explains a No; otherwise pending parts make it Unknown.
struct All {
    reasons: Reasons,
    matched: Vec<String>,
    pending: Vec<String>,
    /// Parts that matched or are pending (counted, as their reasons may be left empty).
    passed: usize,
    any_pending: bool,
    miss: Option<String>,
}

impl All {
    fn new(reasons: Reasons) -> Self {
        All { reasons, matched: Vec::new(), pending: Vec::new(), passed: 0, any_pending: false, miss: None }
    }

    fn push(&mut self, c: Check) {
        match c.tri {
            Tri::Yes => self.passed += 1,
            Tri::Unknown => {
                self.passed += 1;
                self.any_pending = true;
            }
            Tri::No => {}
        }
        match c.tri {
            Tri::Yes if self.reasons.0 => self.matched.push(c.why),
            Tri::Unknown if self.reasons.0 => self.pending.push(c.why),
            Tri::No => {
                self.miss.get_or_insert(c.why);
            }
            Tri::Yes | Tri::Unknown => {}
        }
    }

    fn add(&mut self, c: Option<Check>) {
        if let Some(c) = c
            && !self.failed()
        {
            self.push(c);
        }
    }

    fn failed(&self) -> bool {
        self.miss.is_some()
    }

    fn finish(self, nothing_checked: &str) -> Check {
        let r = self.reasons;
        if let Some(why) = self.miss {
            Check { tri: Tri::No, why }
        } else if self.passed == 0 {
            r.yes(|| nothing_checked.to_owned())
        } else {
            let tri = if self.any_pending { Tri::Unknown } else { Tri::Yes };
            let mut parts = self.matched;
            parts.extend(self.pending);
            r.check(tri, || parts.join(", "))
        }
    }
}
