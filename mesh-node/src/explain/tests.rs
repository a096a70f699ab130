//! Tables for [`explain`]: a two-node mesh in `demo` (a1, a2 on node-a; b1, b2 on node-b; a3 and
//! b3 outside the mesh; b2 PERMISSIVE), services `web` (b1, b2; HTTP), `web-v1` (b1), `web-v2`
//! (b2), `db` (b1; opaque TCP), `api` (b1; undeclared), and per test policies and routes.

use std::collections::{BTreeMap, BTreeSet};

use mesh_api::workload::v1::{
    self as proto, AuthorizationAction, AuthorizationOperation, AuthorizationRule, AuthorizationScope,
    AuthorizationSource, BackendRef, HttpRouteMatch, HttpRouteRule, NetworkAddress, Port, RouteParent,
    ValueMatch,
};

use mesh_manifests::MtlsMode;

use super::*;
use crate::{desired::MeshWorkload, traffic::EndpointSpec};

const TD: &str = "cluster.local";

struct Mesh {
    view: MeshView,
    traffic: Traffic,
    enrolled_on_a: BTreeSet<PodKey>,
}

fn key(name: &str) -> PodKey {
    PodKey { namespace: "demo".into(), name: name.into() }
}

/// (name, node, ip, meshed, services (service, port, target))
type PodRow = (&'static str, &'static str, [u8; 4], bool, &'static [(&'static str, u16, u16)]);

const PODS: [PodRow; 6] = [
    ("a1", "node-a", [10, 1, 1, 2], true, &[]),
    ("a2", "node-a", [10, 1, 1, 3], true, &[]),
    ("a3", "node-a", [10, 1, 1, 4], false, &[]),
    (
        "b1",
        "node-b",
        [10, 1, 2, 2],
        true,
        &[("web", 80, 8080), ("web-v1", 80, 8080), ("db", 5432, 5432), ("api", 80, 9090)],
    ),
    ("b2", "node-b", [10, 1, 2, 3], true, &[("web", 80, 8080), ("web-v2", 80, 8080)]),
    ("b3", "node-b", [10, 1, 2, 4], false, &[]),
];

fn service(name: &str, vip: [u8; 4], port: u16, target: u16, protocol: &str) -> proto::Service {
    proto::Service {
        name: name.into(),
        namespace: "demo".into(),
        hostname: format!("{name}.demo.svc.cluster.local"),
        addresses: vec![NetworkAddress { address: vip.to_vec() }],
        ports: vec![Port {
            service_port: u32::from(port),
            target_port: u32::from(target),
            app_protocol: protocol.into(),
        }],
        ..Default::default()
    }
}

/// A policy on the pods `on` (empty: the whole namespace).
struct PolicyRow {
    name: &'static str,
    on: &'static [&'static str],
    action: AuthorizationAction,
    rules: Vec<AuthorizationRule>,
}

fn from_principals(principals: &[&str]) -> AuthorizationRule {
    AuthorizationRule {
        from: vec![AuthorizationSource {
            principals: principals.iter().map(|p| format!("{TD}/ns/demo/sa/{p}")).collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn to(methods: &[&str], paths: &[&str]) -> AuthorizationRule {
    AuthorizationRule {
        to: vec![AuthorizationOperation {
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn from_ip(block: &str) -> AuthorizationRule {
    AuthorizationRule {
        from: vec![AuthorizationSource { ip_blocks: vec![block.into()], ..Default::default() }],
        ..Default::default()
    }
}

fn policy(
    name: &'static str,
    on: &'static [&'static str],
    action: AuthorizationAction,
    rules: Vec<AuthorizationRule>,
) -> PolicyRow {
    PolicyRow { name, on, action, rules }
}

/// The canary route on `web`: `x-canary: 1` → web-v2; else web-v1 90, web-v2 10.
fn canary_route() -> proto::HttpRoute {
    let backend = |name: &str, weight| BackendRef {
        service: format!("demo/{name}.demo.svc.cluster.local"),
        port: 80,
        weight,
    };
    proto::HttpRoute {
        name: "web-canary".into(),
        namespace: "demo".into(),
        parents: vec![RouteParent { service: "demo/web.demo.svc.cluster.local".into(), port: 80 }],
        rules: vec![
            HttpRouteRule {
                matches: vec![HttpRouteMatch {
                    headers: vec![ValueMatch { name: "x-canary".into(), value: "1".into(), regex: false }],
                    ..Default::default()
                }],
                backends: vec![backend("web-v2", 1)],
                ..Default::default()
            },
            HttpRouteRule {
                backends: vec![backend("web-v1", 90), backend("web-v2", 10)],
                ..Default::default()
            },
        ],
        created: "2026-01-01T00:00:00Z".into(),
        ..Default::default()
    }
}

fn mesh(policies: Vec<PolicyRow>, routes: Vec<proto::HttpRoute>) -> Mesh {
    let mut view = MeshView::default();
    for (name, node, ip, meshed, services) in PODS {
        let mut by_service: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
        for (service, port, target) in services {
            by_service
                .entry(format!("demo/{service}.demo.svc.cluster.local"))
                .or_default()
                .push((*port, *target));
        }
        let selected =
            policies.iter().filter(|p| p.on.contains(&name)).map(|p| format!("demo/{}", p.name)).collect();
        view.traffic.endpoints.push(EndpointSpec {
            key: key(name),
            ip: ip.into(),
            meshed,
            service_account: name.into(),
            policies: selected,
            services: by_service,
        });
        if meshed {
            view.workloads.push(MeshWorkload {
                key: key(name),
                node: node.into(),
                ip: Some(ip.into()),
                netns: None,
                service_account: name.into(),
                mtls_mode: if name == "b2" { MtlsMode::Permissive } else { MtlsMode::Strict },
            });
        } else {
            view.outside.insert(key(name));
        }
    }
    view.traffic.services = vec![
        service("web", [10, 96, 0, 10], 80, 8080, "http"),
        service("web-v1", [10, 96, 0, 11], 80, 8080, "http"),
        service("web-v2", [10, 96, 0, 12], 80, 8080, "http"),
        service("db", [10, 96, 0, 20], 5432, 5432, "tcp"),
        service("api", [10, 96, 0, 30], 80, 9090, ""),
    ];
    view.traffic.authorizations = policies
        .into_iter()
        .map(|p| proto::Authorization {
            name: p.name.into(),
            namespace: "demo".into(),
            scope: if p.on.is_empty() {
                AuthorizationScope::Namespace
            } else {
                AuthorizationScope::WorkloadSelector
            }
            .into(),
            action: p.action.into(),
            rules: p.rules,
        })
        .collect();
    view.traffic.routes = routes;
    view.traffic.root_namespace = "nodemesh-system".into();
    let traffic = Traffic::compile(&view.traffic, TD);
    assert!(traffic.invalid.is_empty(), "{:?}", traffic.invalid);
    let enrolled_on_a = [key("a1"), key("a2")].into_iter().collect();
    Mesh { view, traffic, enrolled_on_a }
}

impl Mesh {
    /// Explains on node-a (the sources' node) with a mesh CA.
    fn explain(&self, query: &Query) -> Result<Explanation, ExplainError> {
        let identities: BTreeMap<IpAddr, SpiffeId> = self
            .view
            .workloads
            .iter()
            .map(|w| {
                (IpAddr::V4(w.ip.unwrap()), SpiffeId::new(TD, &w.key.namespace, &w.service_account).unwrap())
            })
            .collect();
        let identity_of = |ip: IpAddr| identities.get(&ip).cloned();
        let state = NodeState {
            node: "node-a",
            mesh_ca: true,
            view: &self.view,
            traffic: &self.traffic,
            identity_of: &identity_of,
            enrolled_here: &self.enrolled_on_a,
        };
        explain(&state, query)
    }

    fn run(&self, from: &str, to: &str, port: Option<u16>, http: Option<HttpRow<'_>>) -> Explanation {
        self.explain(&query(from, to, port, http)).unwrap_or_else(|e| panic!("{from} -> {to}: {e}"))
    }
}

fn query(from: &str, to: &str, port: Option<u16>, http: Option<HttpRow<'_>>) -> Query {
    Query {
        from: from.into(),
        to: to.into(),
        port,
        http: http.map(|(method, path, headers)| HttpQuery {
            method: method.into(),
            path: path.into(),
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }),
    }
}

/// A request: method, path, headers.
type HttpRow<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

const GET: Option<HttpRow<'static>> = Some(("GET", "/", &[]));

/// (allowed, effect, by) of the verdict.
fn outcome(e: &Explanation) -> (Option<bool>, Effect, Option<&str>) {
    (e.verdict.allowed, e.verdict.effect, e.verdict.by.as_deref())
}

fn workloads(e: &Explanation) -> Vec<&str> {
    e.endpoints.iter().filter_map(|e| e.workload.as_deref()).collect()
}

#[test]
fn without_policies_meshed_pods_talk_hbone_expecting_the_destination_identity() {
    let mesh = mesh(vec![], vec![]);
    let e = mesh.run("demo/a1", "demo/b1", Some(8080), GET);
    assert_eq!(outcome(&e), (Some(true), Effect::Forwarded, None));
    assert_eq!((e.source.captured, e.source.node.as_deref()), (true, Some("node-a")));
    assert_eq!(e.source.identity.as_deref(), Some("spiffe://cluster.local/ns/demo/sa/a1"));
    assert_eq!((e.destination.kind, e.destination.protocol), ("pod", AppProtocol::Http1));
    let endpoint = &e.endpoints[0];
    assert_eq!((endpoint.transport, endpoint.node.as_deref()), ("hbone", Some("node-b")));
    assert_eq!(endpoint.identity.as_deref(), Some("spiffe://cluster.local/ns/demo/sa/b1"));
    assert_eq!(endpoint.inbound.caller_principal.as_deref(), Some("cluster.local/ns/demo/sa/a1"));
    assert_eq!(endpoint.inbound.parsed_as, "http", "the port is declared HTTP");
    assert_eq!(e.verdict.reason, "allowed: no policies apply");
}

#[test]
fn tcp_denied_by_principal_is_reset_and_names_the_policy_while_others_pass() {
    let mesh = mesh(
        vec![policy("deny-a1", &["b1"], AuthorizationAction::Deny, vec![from_principals(&["a1"])])],
        vec![],
    );
    let e = mesh.run("demo/a1", "demo/b1", Some(9000), None);
    assert_eq!(outcome(&e), (Some(false), Effect::Reset, Some("demo/deny-a1")));
    let inbound = &e.endpoints[0].inbound;
    assert_eq!(inbound.parsed_as, "tcp");
    assert_eq!(inbound.policies.len(), 1);
    assert!(inbound.policies[0].matched, "{:?}", inbound.policies);
    assert!(!inbound.policies[0].why.is_empty(), "explained: {:?}", inbound.policies);
    let e = mesh.run("demo/a2", "demo/b1", Some(9000), None);
    assert_eq!(outcome(&e), (Some(true), Effect::Forwarded, None));
    assert!(!e.endpoints[0].inbound.policies[0].matched);
}

#[test]
fn deny_wins_over_a_matching_allow_and_answers_403() {
    let mesh = mesh(
        vec![
            policy("allow-api", &["b1"], AuthorizationAction::Allow, vec![to(&["GET"], &["/api/*"])]),
            policy("deny-admin", &["b1"], AuthorizationAction::Deny, vec![to(&[], &["/api/admin*"])]),
        ],
        vec![],
    );
    let admin = mesh.run("demo/a1", "demo/b1", Some(8080), Some(("GET", "/api/admin", &[])));
    assert_eq!(outcome(&admin), (Some(false), Effect::Forbidden, Some("demo/deny-admin")));
    let matched: Vec<(&str, bool)> =
        admin.endpoints[0].inbound.policies.iter().map(|p| (p.policy.as_str(), p.matched)).collect();
    assert_eq!(matched, [("demo/allow-api", true), ("demo/deny-admin", true)]);
    let users = mesh.run("demo/a1", "demo/b1", Some(8080), Some(("GET", "/api/users", &[])));
    assert_eq!(outcome(&users), (Some(true), Effect::Forwarded, None));
    assert_eq!(users.verdict.reason, "allowed by demo/allow-api");
}

#[test]
fn allow_policies_none_of_which_match_deny_without_a_deny_policy() {
    let mesh = mesh(
        vec![policy("allow-a2", &["b1"], AuthorizationAction::Allow, vec![from_principals(&["a2"])])],
        vec![],
    );
    let e = mesh.run("demo/a1", "demo/b1", Some(8080), GET);
    assert_eq!(outcome(&e), (Some(false), Effect::Forbidden, None));
    assert!(e.verdict.reason.contains("no ALLOW policy matched (demo/allow-a2)"), "{}", e.verdict.reason);
    // On a port nothing parses, the same policy resets the connection.
    let e = mesh.run("demo/a1", "demo/b1", Some(9000), None);
    assert_eq!(outcome(&e), (Some(false), Effect::Reset, None));
    assert_eq!(
        outcome(&mesh.run("demo/a2", "demo/b1", Some(9000), None)),
        (Some(true), Effect::Forwarded, None)
    );
}

#[test]
fn http_rules_on_a_tcp_port_fail_closed_and_say_they_need_http() {
    let mesh =
        mesh(vec![policy("allow-get", &["b1"], AuthorizationAction::Allow, vec![to(&["GET"], &[])])], vec![]);
    // `db` declares 5432 opaque: the policy's HTTP parts make the proxy parse, detection says TCP.
    let e = mesh.run("demo/a1", "db.demo", None, None);
    assert_eq!(e.destination.port, 5432, "the service's only port");
    assert_eq!((e.outbound.handled_as, e.endpoints.len()), ("tcp", 1));
    assert_eq!(outcome(&e), (Some(false), Effect::Closed, None));
    let inbound = &e.endpoints[0].inbound;
    assert_eq!(inbound.parsed_as, "tcp");
    assert!(inbound.notes.iter().any(|n| n.starts_with("needs HTTP")), "{:?}", inbound.notes);
    // A GET to the HTTP port is what the rule allows.
    let e = mesh.run("demo/a1", "demo/b1", Some(8080), GET);
    assert_eq!(outcome(&e), (Some(true), Effect::Forwarded, None));
    // A DENY with HTTP parts on a TCP connection counts as matching.
    let mesh = mesh_with_deny_post();
    let e = mesh.run("demo/a1", "db.demo.svc.cluster.local", Some(5432), None);
    assert_eq!(outcome(&e), (Some(false), Effect::Closed, Some("demo/deny-post")));
}

fn mesh_with_deny_post() -> Mesh {
    mesh(vec![policy("deny-post", &["b1"], AuthorizationAction::Deny, vec![to(&["POST"], &[])])], vec![])
}

#[test]
fn route_rules_take_requests_by_precedence_and_weights_become_shares() {
    let mesh = mesh(vec![], vec![canary_route()]);
    let marked =
        mesh.run("demo/a1", "web.demo.svc.cluster.local", Some(80), Some(("GET", "/", &[("x-canary", "1")])));
    let route = marked.route.as_ref().expect("routed");
    assert_eq!((route.route.as_str(), route.rule), ("demo/web-canary", 0));
    assert_eq!(workloads(&marked), ["demo/b2"]);
    assert_eq!(marked.endpoints[0].service.as_deref(), Some("demo/web-v2.demo.svc.cluster.local"));
    assert_eq!(outcome(&marked), (Some(true), Effect::Forwarded, None));

    let plain = mesh.run("demo/a1", "10.96.0.10", None, GET);
    let route = plain.route.as_ref().expect("routed");
    assert_eq!(route.rule, 1, "the catch-all rule");
    let shares: Vec<(&str, f64)> = route.backends.iter().map(|b| (b.service.as_str(), b.share)).collect();
    assert_eq!(
        shares,
        [("demo/web-v1.demo.svc.cluster.local", 0.9), ("demo/web-v2.demo.svc.cluster.local", 0.1)]
    );
    assert_eq!(workloads(&plain), ["demo/b1", "demo/b2"]);
    assert_eq!(plain.endpoints[0].share, Some(0.9));
    assert_eq!(plain.request.as_ref().map(|r| r.host.as_str()), Some("10.96.0.10"));

    // Without the route, `web` balances over both of its endpoints itself.
    let mesh = self::mesh(vec![], vec![]);
    let e = mesh.run("demo/a1", "web.demo", Some(80), GET);
    assert!(e.route.is_none());
    assert_eq!(workloads(&e), ["demo/b1", "demo/b2"]);
    assert!(e.endpoints.iter().all(|e| e.service.as_deref() == Some("demo/web.demo.svc.cluster.local")));
}

#[test]
fn a_decision_that_differs_by_endpoint_varies() {
    let mesh = mesh(
        vec![policy("deny-a1-b2", &["b2"], AuthorizationAction::Deny, vec![from_principals(&["a1"])])],
        vec![],
    );
    let e = mesh.run("demo/a1", "web.demo", None, GET);
    assert_eq!(outcome(&e), (None, Effect::Varies, None));
    let each: Vec<(Option<bool>, Effect)> =
        e.endpoints.iter().map(|e| (e.verdict.allowed, e.verdict.effect)).collect();
    assert_eq!(each, [(Some(true), Effect::Forwarded), (Some(false), Effect::Forbidden)]);
}

#[test]
fn an_l4_deny_behind_the_source_proxys_http_is_its_503() {
    // `api` port 80 is undeclared (b1:9090) with a route: the source parses HTTP; b1 does not
    // (no HTTP rules, port undeclared) and refuses the stream at once.
    let mut route = canary_route();
    route.name = "api".into();
    route.parents[0].service = "demo/api.demo.svc.cluster.local".into();
    route.rules = vec![HttpRouteRule::default()];
    let mesh = mesh(
        vec![policy("deny-a1-ip", &["b1"], AuthorizationAction::Deny, vec![from_ip("10.1.1.2/32")])],
        vec![route],
    );
    let e = mesh.run("demo/a1", "api.demo", Some(80), GET);
    assert_eq!(e.outbound.handled_as, "http");
    assert_eq!(e.endpoints[0].inbound.parsed_as, "tcp");
    assert_eq!(outcome(&e), (Some(false), Effect::Unavailable, Some("demo/deny-a1-ip")));
    // Not HTTP: no route, the source relays the connection and b1 resets it.
    let e = mesh.run("demo/a1", "api.demo", Some(80), None);
    assert_eq!(
        (e.outbound.handled_as, outcome(&e)),
        ("tcp", (Some(false), Effect::Reset, Some("demo/deny-a1-ip")))
    );
}

#[test]
fn outside_the_mesh_on_either_side() {
    let mesh = mesh(
        vec![policy("allow-a1", &[], AuthorizationAction::Allow, vec![from_principals(&["a1"])])],
        vec![],
    );
    // An unmeshed destination: plain TCP from the pod, nothing enforces the namespace's policy.
    let e = mesh.run("demo/a1", "demo/b3", Some(8080), GET);
    assert_eq!((e.endpoints[0].transport, e.endpoints[0].inbound.enforced), ("plaintext", false));
    assert_eq!(outcome(&e), (Some(true), Effect::Forwarded, None));
    // An unmeshed source: not captured; STRICT b1 resets plaintext.
    let e = mesh.run("demo/a3", "demo/b1", Some(8080), GET);
    assert_eq!((e.source.captured, e.outbound.handled_as), (false, "none"));
    assert_eq!(outcome(&e), (Some(false), Effect::Reset, None));
    // PERMISSIVE b2 takes plaintext, without a principal: the ALLOW by principal cannot match.
    let e = mesh.run("demo/a3", "demo/b2", Some(8080), GET);
    assert_eq!(e.endpoints[0].inbound.caller_principal, None);
    assert_eq!(outcome(&e), (Some(false), Effect::Forbidden, None));
    // A plain IP outside everything.
    let e = mesh.run("demo/a1", "10.9.0.2:80", None, None);
    assert_eq!((e.destination.kind, e.endpoints[0].transport), ("ip", "plaintext"));
    assert_eq!(outcome(&e), (Some(true), Effect::Forwarded, None));
}

#[test]
fn a_source_this_node_has_not_enrolled_is_not_captured() {
    let mut mesh = mesh(vec![], vec![]);
    mesh.enrolled_on_a.remove(&key("a2"));
    let e = mesh.run("a2", "b1", Some(8080), GET);
    assert!(!e.source.captured && e.source.meshed, "{:?}", e.source);
    assert_eq!(outcome(&e), (Some(false), Effect::Reset, None), "plaintext to STRICT b1");
    // b1's enrolment is node-b's to know: assumed from the config.
    assert!(mesh.explain(&query("b1", "a1", Some(8080), None)).expect("explained").source.captured);
}

#[test]
fn the_source_proxy_fails_some_requests_itself() {
    let mesh = mesh(vec![], vec![]);
    let e = mesh.run("demo/a1", "10.96.0.10", Some(81), GET);
    assert_eq!(outcome(&e), (Some(false), Effect::Reset, None), "no such service port");
    let e = mesh.run("demo/a1", "web.demo", Some(80), None);
    assert_eq!(outcome(&e), (Some(false), Effect::BadRequest, None), "declared HTTP, not HTTP");
    let mut route = canary_route();
    route.rules = vec![HttpRouteRule {
        backends: vec![BackendRef {
            service: "demo/gone.demo.svc.cluster.local".into(),
            port: 80,
            weight: 1,
        }],
        ..Default::default()
    }];
    let mesh = self::mesh(vec![], vec![route]);
    let e = mesh.run("demo/a1", "web.demo", Some(80), GET);
    assert_eq!(outcome(&e), (Some(false), Effect::ServerError, None), "{:?}", e.failures);
    assert!(e.verdict.reason.contains("does not exist"), "{}", e.verdict.reason);
}

#[test]
fn route_header_changes_reach_the_destination_policies() {
    let mut route = canary_route();
    route.rules = vec![HttpRouteRule {
        request_headers: Some(proto::HeaderModifier {
            set: vec![proto::Header { name: "x-role".into(), value: "admin".into() }],
            ..Default::default()
        }),
        ..Default::default()
    }];
    let deny_admin = AuthorizationRule {
        when: vec![proto::AuthorizationCondition {
            key: "request.headers[x-role]".into(),
            values: vec!["admin".into()],
            not_values: vec![],
        }],
        ..Default::default()
    };
    let mesh = mesh(
        vec![policy("deny-role", &["b1", "b2"], AuthorizationAction::Deny, vec![deny_admin])],
        vec![route],
    );
    let e = mesh.run("demo/a1", "web.demo", None, GET);
    assert_eq!(outcome(&e), (Some(false), Effect::Forbidden, Some("demo/deny-role")));
    // Straight to the pod, the header is the client's own.
    let e = mesh.run("demo/a1", "demo/b1", Some(8080), Some(("GET", "/", &[("x-role", "user")])));
    assert_eq!(outcome(&e), (Some(true), Effect::Forwarded, None));
}

#[test]
fn questions_it_cannot_answer_get_one_clear_error() {
    let mesh = mesh(vec![], vec![]);
    let err = |q: Query| mesh.explain(&q).map(|_| ()).unwrap_err().to_string();
    assert!(err(query("demo/zz", "demo/b1", Some(80), None)).contains("unknown pod \"demo/zz\""));
    assert!(
        err(query("demo/a1", "nowhere.demo", Some(80), None))
            .contains("unknown destination \"nowhere.demo\"")
    );
    assert!(err(query("demo/a1", "demo/b1", None, None)).contains("give --port"));
    assert!(err(query("demo/a1", "10.1.2.2:80", Some(81), None)).contains("two ports"));
    assert!(
        err(query("demo/a1", "demo/b1", Some(80), Some(("get", "/", &[])))).contains("not an HTTP method")
    );
    assert!(
        err(query("demo/a1", "demo/b1", Some(80), Some(("GET", "x", &[])))).contains("must start with /")
    );
    assert!(
        err(query("demo/a1", "demo/b1", Some(80), Some(("GET", "/", &[("bad name", "1")]))))
            .contains("header name")
    );

    let params = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };
    let parsed = Query::from_params(&params(&[
        ("from", "demo/a1"),
        ("to", "web.demo"),
        ("port", "80"),
        ("method", "POST"),
        ("path", "/x?y=1"),
        ("header", "x-a: 1"),
        ("header", "x-b:2"),
    ]))
    .expect("valid");
    assert_eq!(parsed.port, Some(80));
    let http = parsed.http.expect("HTTP");
    assert_eq!((http.method.as_str(), http.path.as_str()), ("POST", "/x?y=1"));
    assert_eq!(http.headers, [("x-a".to_owned(), "1".to_owned()), ("x-b".to_owned(), "2".to_owned())]);
    assert_eq!(Query::from_params(&params(&[("to", "x")])), Err(ExplainError::Missing("from")));
    assert!(Query::from_params(&params(&[("from", "a"), ("to", "b"), ("port", "0")])).is_err());
    assert!(Query::from_params(&params(&[("from", "a"), ("to", "b"), ("header", "x:1")])).is_err());
}
