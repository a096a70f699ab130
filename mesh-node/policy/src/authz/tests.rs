//! Table tests against Istio's documented AuthorizationPolicy semantics.

use http::HeaderMap;
use mesh_api::workload::v1::{
    AuthorizationAction, AuthorizationCondition, AuthorizationOperation, AuthorizationRule,
    AuthorizationScope, AuthorizationSource,
};

use super::*;

use AuthorizationAction::{Allow as A, Audit as U, Deny as D};

mod compile;
mod connection;

const WEB: &str = "cluster.local/ns/demo/sa/web";

fn policy(name: &str, action: AuthorizationAction, rules: Vec<AuthorizationRule>) -> Policy {
    Policy::compile(&Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: AuthorizationScope::Namespace.into(),
        action: action.into(),
        rules,
    })
    .expect("compiles")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn from(s: AuthorizationSource) -> AuthorizationRule {
    AuthorizationRule { from: vec![s], ..Default::default() }
}

fn to(o: AuthorizationOperation) -> AuthorizationRule {
    AuthorizationRule { to: vec![o], ..Default::default() }
}

fn cond(key: &str, values: &[&str], not_values: &[&str]) -> AuthorizationCondition {
    AuthorizationCondition { key: key.into(), values: s(values), not_values: s(not_values) }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> AuthorizationRule {
    AuthorizationRule { when: vec![cond(key, values, not_values)], ..Default::default() }
}

fn paths(p: &[&str]) -> AuthorizationOperation {
    AuthorizationOperation { paths: s(p), ..Default::default() }
}

fn methods(m: &[&str]) -> AuthorizationOperation {
    AuthorizationOperation { methods: s(m), ..Default::default() }
}

fn principals(p: &[&str]) -> AuthorizationSource {
    AuthorizationSource { principals: s(p), ..Default::default() }
}

fn mtls() -> Peer<'static> {
    Peer { ip: "10.1.1.2".parse().unwrap(), principal: Some(WEB), namespace: Some("demo") }
}

fn plain() -> Peer<'static> {
    Peer { ip: "10.1.1.2".parse().unwrap(), principal: None, namespace: None }
}

fn peer_at(ip: &str) -> Peer<'static> {
    Peer { ip: ip.parse().unwrap(), ..mtls() }
}

/// A request to port 8080 of `web.demo`.
#[derive(Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

fn get(path: &'static str) -> Req {
    Req { method: "GET", path, host: "web.demo:8080", headers: vec![] }
}

impl Req {
    fn method(self, method: &'static str) -> Req {
        Req { method, ..self }
    }
    fn host(self, host: &'static str) -> Req {
        Req { host, ..self }
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers.push((name, value));
        self
    }
}

fn request(policies: &[Policy], peer: &Peer<'_>, req: &Req) -> Decision {
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        headers.append(*k, v.parse().unwrap());
    }
    let refs: Vec<&Policy> = policies.iter().collect();
    let r = Request { method: req.method, path: req.path, host: req.host, headers: &headers };
    same_outcome(check_request(&refs, peer, 8080, &r), explain_request(&refs, peer, 8080, &r))
}

/// Decides a connection both ways, enforcing and explaining; see [`same_outcome`].
fn connection(policies: &[&Policy], peer: &Peer<'_>, port: u16, http: bool) -> Decision {
    same_outcome(check_connection(policies, peer, port, http), explain_connection(policies, peer, port, http))
}

/// Asserts the proxy's check (no reasons) and `meshctl explain`'s decide the same, and returns
/// the explained decision.
fn same_outcome(checked: Decision, explained: Decision) -> Decision {
    assert_eq!(
        (checked.verdict, &checked.policy, &checked.reason, &checked.audited),
        (explained.verdict, &explained.policy, &explained.reason, &explained.audited),
        "enforcing and explaining disagree"
    );
    assert!(checked.evaluated.is_empty(), "the proxy's check builds no explanations");
    explained
}

/// Name, policies, peer, request, expected verdict.
type RequestCase = (&'static str, Vec<Policy>, Peer<'static>, Req, Verdict);

#[test]
fn requests_are_decided_as_istio_documents() {
    let get_public =
        || to(AuthorizationOperation { methods: s(&["GET"]), paths: s(&["/public*"]), ..Default::default() });
    let cases: Vec<RequestCase> = vec![
        ("no policy: allow", vec![], plain(), get("/"), Verdict::Allow),
        ("ALLOW matches", vec![policy("a", A, vec![get_public()])], mtls(), get("/public/x"), Verdict::Allow),
        (
            "ALLOW misses the path",
            vec![policy("a", A, vec![get_public()])],
            mtls(),
            get("/private"),
            Verdict::Deny,
        ),
        (
            "ALLOW misses the method",
            vec![policy("a", A, vec![get_public()])],
            mtls(),
            get("/public").method("POST"),
            Verdict::Deny,
        ),
        ("ALLOW without rules denies all", vec![policy("a", A, vec![])], mtls(), get("/"), Verdict::Deny),
        (
            "ALLOW with one empty rule allows all, even plaintext",
            vec![policy("a", A, vec![AuthorizationRule::default()])],
            plain(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "DENY without rules matches nothing",
            vec![policy("d", D, vec![])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "DENY beats ALLOW",
            vec![policy("a", A, vec![get_public()]), policy("d", D, vec![get_public()])],
            mtls(),
            get("/public"),
            Verdict::Deny,
        ),
        (
            "DENY not matching and no ALLOW: allow",
            vec![policy("d", D, vec![to(paths(&["/admin"]))])],
            mtls(),
            get("/public"),
            Verdict::Allow,
        ),
        (
            "the second ALLOW matches",
            vec![policy("a", A, vec![to(paths(&["/x"]))]), policy("b", A, vec![to(paths(&["/y"]))])],
            mtls(),
            get("/y"),
            Verdict::Allow,
        ),
        (
            "principal DENY",
            vec![policy("d", D, vec![from(principals(&[WEB]))])],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "principal DENY spares another caller",
            vec![policy("d", D, vec![from(principals(&[WEB]))])],
            Peer { principal: Some("cluster.local/ns/demo/sa/other"), ..mtls() },
            get("/"),
            Verdict::Allow,
        ),
        (
            "principal prefix",
            vec![policy("a", A, vec![from(principals(&["cluster.local/ns/demo/*"]))])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "principal suffix",
            vec![policy("a", A, vec![from(principals(&["*/sa/web"]))])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "principal presence, mTLS",
            vec![policy("a", A, vec![from(principals(&["*"]))])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "principal presence never matches plaintext",
            vec![policy("a", A, vec![from(principals(&["*"]))])],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "notPrincipals DENY fails closed on plaintext",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { not_principals: s(&[WEB]), ..Default::default() })],
            )],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "notPrincipals ALLOW fails closed on plaintext",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { not_principals: s(&["x/*"]), ..Default::default() })],
            )],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "notPrincipals DENY spares the listed caller",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { not_principals: s(&[WEB]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "namespaces, with a wildcard",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { namespaces: s(&["de*"]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "notNamespaces ALLOW",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { not_namespaces: s(&["prod"]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "notNamespaces DENY fails closed on plaintext",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { not_namespaces: s(&["demo"]), ..Default::default() })],
            )],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "ipBlocks v4 CIDR, plaintext",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { ip_blocks: s(&["10.1.0.0/16"]), ..Default::default() })],
            )],
            plain(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "ipBlocks miss",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { ip_blocks: s(&["10.9.0.0/16"]), ..Default::default() })],
            )],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "notIpBlocks DENY",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource {
                    not_ip_blocks: s(&["10.9.0.0/16", "::1"]),
                    ..Default::default()
                })],
            )],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "ipBlocks v6",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { ip_blocks: s(&["fd00::/8"]), ..Default::default() })],
            )],
            peer_at("fd00::5"),
            get("/"),
            Verdict::Allow,
        ),
        (
            "a v4 block does not hold a v6 peer",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { ip_blocks: s(&["0.0.0.0/0"]), ..Default::default() })],
            )],
            peer_at("fd00::5"),
            get("/"),
            Verdict::Deny,
        ),
        (
            "a v4-mapped peer meets v4 blocks",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { ip_blocks: s(&["10.1.1.2"]), ..Default::default() })],
            )],
            peer_at("::ffff:10.1.1.2"),
            get("/"),
            Verdict::Allow,
        ),
        (
            "path suffix",
            vec![policy("d", D, vec![to(paths(&["*.php"]))])],
            mtls(),
            get("/x/index.php"),
            Verdict::Deny,
        ),
        (
            "notPaths",
            vec![policy(
                "a",
                A,
                vec![to(AuthorizationOperation { not_paths: s(&["/admin*"]), ..Default::default() })],
            )],
            mtls(),
            get("/admin/x"),
            Verdict::Deny,
        ),
        (
            "dot segments cannot dodge a DENY",
            vec![policy("d", D, vec![to(paths(&["/admin"]))])],
            mtls(),
            get("/public/../admin"),
            Verdict::Deny,
        ),
        (
            "doubled slashes cannot dodge a DENY",
            vec![policy("d", D, vec![to(paths(&["/admin*"]))])],
            mtls(),
            get("//admin/x"),
            Verdict::Deny,
        ),
        (
            "ports other than the destination's",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { ports: vec![9090], ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "notPorts",
            vec![policy(
                "a",
                A,
                vec![to(AuthorizationOperation { not_ports: vec![8080], ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "hosts are case-insensitive and may omit the port",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { hosts: s(&["WEB.demo"]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "hosts may name the port",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { hosts: s(&["web.demo:*"]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "notHosts",
            vec![policy(
                "a",
                A,
                vec![to(AuthorizationOperation { not_hosts: s(&["*.demo"]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "notMethods DENY catches another method",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { not_methods: s(&["GET"]), ..Default::default() })],
            )],
            mtls(),
            get("/").method("POST"),
            Verdict::Deny,
        ),
        (
            "notMethods DENY spares the listed method",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { not_methods: s(&["GET"]), ..Default::default() })],
            )],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "values within a field are ORed",
            vec![policy("a", A, vec![to(methods(&["POST", "GET"]))])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "from entries are ORed",
            vec![policy(
                "a",
                A,
                vec![AuthorizationRule {
                    from: vec![
                        principals(&["x/ns/y/sa/z"]),
                        AuthorizationSource { namespaces: s(&["demo"]), ..Default::default() },
                    ],
                    ..Default::default()
                }],
            )],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "fields within a source are ANDed",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource {
                    principals: s(&[WEB]),
                    ip_blocks: s(&["192.168.0.0/16"]),
                    ..Default::default()
                })],
            )],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "from and to are ANDed",
            vec![policy(
                "a",
                A,
                vec![AuthorizationRule {
                    from: vec![principals(&[WEB])],
                    to: vec![paths(&["/x"])],
                    ..Default::default()
                }],
            )],
            mtls(),
            get("/y"),
            Verdict::Deny,
        ),
        (
            "when conditions are ANDed",
            vec![policy(
                "a",
                A,
                vec![AuthorizationRule {
                    when: vec![
                        cond("source.namespace", &["demo"], &[]),
                        cond("destination.port", &["9090"], &[]),
                    ],
                    ..Default::default()
                }],
            )],
            mtls(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "AUDIT never changes the verdict",
            vec![policy("u", U, vec![AuthorizationRule::default()])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "source.namespace condition",
            vec![policy("a", A, vec![when("source.namespace", &["demo"], &[])])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "source.ip condition",
            vec![policy("d", D, vec![when("source.ip", &["10.1.0.0/16"], &[])])],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "source.principal notValues ALLOW fails closed on plaintext",
            vec![policy("a", A, vec![when("source.principal", &[], &["x/*"])])],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "source.principal notValues DENY fails closed on plaintext",
            vec![policy("d", D, vec![when("source.principal", &[], &[WEB])])],
            plain(),
            get("/"),
            Verdict::Deny,
        ),
        (
            "destination.port notValues",
            vec![policy("d", D, vec![when("destination.port", &[], &["8080"])])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "header exact",
            vec![policy("d", D, vec![when("request.headers[x-user]", &["mallory"], &[])])],
            mtls(),
            get("/").header("x-user", "mallory"),
            Verdict::Deny,
        ),
        (
            "header names are case-insensitive",
            vec![policy("d", D, vec![when("request.headers[X-User]", &["mal*"], &[])])],
            mtls(),
            get("/").header("x-user", "mallory"),
            Verdict::Deny,
        ),
        (
            "any of a repeated header's values",
            vec![policy("d", D, vec![when("request.headers[x-user]", &["mallory"], &[])])],
            mtls(),
            get("/").header("x-user", "alice").header("x-user", "mallory"),
            Verdict::Deny,
        ),
        (
            "header presence",
            vec![policy("a", A, vec![when("request.headers[authorization]", &["*"], &[])])],
            mtls(),
            get("/").header("authorization", "Bearer x"),
            Verdict::Allow,
        ),
        (
            "an absent header does not match values",
            vec![policy("d", D, vec![when("request.headers[x-user]", &["*"], &[])])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "an absent header matches notValues",
            vec![policy("a", A, vec![when("request.headers[x-env]", &[], &["prod"])])],
            mtls(),
            get("/"),
            Verdict::Allow,
        ),
        (
            "a listed header value fails notValues",
            vec![policy("a", A, vec![when("request.headers[x-env]", &[], &["prod"])])],
            mtls(),
            get("/").header("x-env", "prod"),
            Verdict::Deny,
        ),
        (
            "another host",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { hosts: s(&["web.demo"]), ..Default::default() })],
            )],
            mtls(),
            get("/").host("api.demo"),
            Verdict::Allow,
        ),
    ];
    assert!(cases.len() >= 50);
    for (name, policies, peer, req, want) in &cases {
        let decision = request(policies, peer, req);
        assert_eq!(decision.verdict, *want, "{name}: {decision:#?}");
        assert_eq!(decision.evaluated.len(), policies.len(), "{name}");
    }
}

#[test]
fn decisions_name_the_deciding_policy_and_audits() {
    let deny = policy("deny-mallory", D, vec![when("request.headers[x-user]", &["mallory"], &[])]);
    let allow = policy("allow-get", A, vec![to(methods(&["GET"]))]);
    let audit = policy("audit-all", U, vec![AuthorizationRule::default()]);
    let all = [deny, allow, audit];

    let d = request(&all, &mtls(), &get("/").header("x-user", "mallory"));
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Deny, Some("demo/deny-mallory")));
    assert_eq!(d.reason, "denied by demo/deny-mallory");
    assert_eq!(d.audited, ["demo/audit-all"]);

    let d = request(&all, &mtls(), &get("/").method("POST"));
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Deny, None));
    assert_eq!(d.reason, "no ALLOW policy matched (demo/allow-get)");

    let d = request(&all, &mtls(), &get("/"));
    assert_eq!((d.verdict, d.policy.as_deref()), (Verdict::Allow, None));
    assert_eq!(d.reason, "allowed by demo/allow-get");

    let refs: Vec<&Policy> = all.iter().collect();
    let d = connection(&refs, &mtls(), 80, true);
    assert_eq!(d.verdict, Verdict::PerRequest);
    assert_eq!(d.reason, "decided per request by demo/deny-mallory, demo/allow-get");
    assert_eq!(d.audited, ["demo/audit-all"], "an L4-only AUDIT is reported at once");

    let l7_audit = policy("audit-admin", U, vec![to(paths(&["/admin*"]))]);
    let d = connection(&[&l7_audit], &mtls(), 80, false);
    assert!(d.audited.is_empty() && d.verdict == Verdict::Allow, "AUDIT reports only what it saw");
}

#[test]
fn evaluations_say_why() {
    let deny = policy("deny-admin", D, vec![to(methods(&["POST"])), to(paths(&["/admin*"]))]);
    let d = request(&[deny], &mtls(), &get("/admin"));
    let e = &d.evaluated[0];
    assert_eq!((e.policy.as_str(), e.action, e.matched), ("demo/deny-admin", Action::Deny, true));
    assert_eq!(e.why, "rule 1: path /admin matches \"/admin*\"");

    let allow = policy("allow", A, vec![from(principals(&["x/*"])), to(paths(&["/a", "/b*"]))]);
    let d = request(&[allow], &plain(), &get("/c"));
    assert!(!d.evaluated[0].matched);
    assert_eq!(
        d.evaluated[0].why,
        "rule 0: no principal (plaintext peer) for principals; \
         rule 1: path /c matches none of paths [\"/a\", \"/b*\"]"
    );

    let empty = policy("nothing", A, vec![]);
    assert_eq!(request(&[empty], &mtls(), &get("/")).evaluated[0].why, "no rules: matches nothing");

    let l7 = policy(
        "l7",
        D,
        vec![to(AuthorizationOperation { ports: vec![80], paths: s(&["/x"]), ..Default::default() })],
    );
    let d = connection(&[&l7], &mtls(), 80, true);
    assert_eq!(d.evaluated[0].why, "rule 0: port 80 matches 80, paths depend on each request");
    let d = connection(&[&l7], &mtls(), 80, false);
    assert_eq!(
        d.evaluated[0].why,
        "rule 0: port 80 matches 80, paths need HTTP, which this connection is not: DENY fails closed"
    );
}

#[test]
fn http_needs_and_ports_are_reported() {
    let l4 = policy("l4", A, vec![from(principals(&[WEB]))]);
    assert!(!l4.has_l7());
    let by_port = policy(
        "p",
        D,
        vec![
            to(AuthorizationOperation { ports: vec![8080, 80], paths: s(&["/x"]), ..Default::default() }),
            AuthorizationRule {
                to: vec![
                    AuthorizationOperation { ports: vec![9000], methods: s(&["GET"]), ..Default::default() },
                    // L4 only: no HTTP needed on its ports.
                    AuthorizationOperation { ports: vec![5432], ..Default::default() },
                ],
                ..Default::default()
            },
        ],
    );
    assert!(by_port.has_l7());
    assert_eq!(by_port.l7_ports(), [80, 8080, 9000]);
    let any_port = policy("q", A, vec![to(methods(&["GET"]))]);
    assert!(any_port.l7_ports().is_empty());
    let header_everywhere = policy(
        "h",
        A,
        vec![AuthorizationRule {
            to: vec![AuthorizationOperation { ports: vec![81], ..Default::default() }],
            when: vec![cond("request.headers[x]", &["1"], &[])],
            ..Default::default()
        }],
    );
    assert!(header_everywhere.has_l7());
    assert_eq!(header_everywhere.l7_ports(), [81]);
    assert!(policy("w", A, vec![when("request.headers[x]", &["1"], &[])]).l7_ports().is_empty());
    assert_eq!((by_port.key(), by_port.name(), by_port.namespace()), ("demo/p", "p", "demo"));
    assert_eq!((by_port.action(), by_port.scope()), (Action::Deny, Scope::Namespace));
}

#[test]
fn decisions_serialize() {
    fn serializable<T: serde::Serialize>(_: &T) {}
    let d = request(&[], &mtls(), &get("/"));
    serializable(&d);
    assert_eq!(d.reason, "allowed: no policies apply");
    assert_eq!(format!("{} {}", Action::Deny, Verdict::PerRequest), "DENY per request");
}
