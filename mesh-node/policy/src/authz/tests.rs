//! Table tests against Istio's documented AuthorizationPolicy semantics.

use http::HeaderMap;
use mesh_api::workload::v1::{
    AuthorizationCondition, AuthorizationOperation, AuthorizationRule, AuthorizationSource,
};

use super::*;

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

fn from(s: AuthorizationSource) -> AuthorizationRule {
    AuthorizationRule { from: vec![s], ..Default::default() }
}

fn to(o: AuthorizationOperation) -> AuthorizationRule {
    AuthorizationRule { to: vec![o], ..Default::default() }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> AuthorizationRule {
    AuthorizationRule {
        when: vec![AuthorizationCondition {
            key: key.into(),
            values: values.iter().map(|s| (*s).into()).collect(),
            not_values: not_values.iter().map(|s| (*s).into()).collect(),
        }],
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

const WEB: &str = "cluster.local/ns/demo/sa/web";

fn peer(principal: Option<&'static str>) -> Peer<'static> {
    Peer { ip: "10.1.1.2".parse().unwrap(), principal, namespace: principal.map(|_| "demo") }
}

struct Case {
    name: &'static str,
    policies: Vec<Policy>,
    principal: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    want: Verdict,
}

fn run(case: &Case) -> Decision {
    let mut headers = HeaderMap::new();
    for (k, v) in &case.headers {
        headers.insert(*k, v.parse().unwrap());
    }
    let refs: Vec<&Policy> = case.policies.iter().collect();
    check_request(
        &refs,
        &peer(case.principal),
        8080,
        &Request { method: case.method, path: case.path, host: "web.demo:8080", headers: &headers },
    )
}

#[test]
fn requests_are_decided_as_istio_documents() {
    use AuthorizationAction::{Allow as A, Audit as U, Deny as D};
    let get_public = || {
        to(AuthorizationOperation {
            methods: strings(&["GET"]),
            paths: strings(&["/public*"]),
            ..Default::default()
        })
    };
    let case = |name, policies, principal, method, path, want| Case {
        name,
        policies,
        principal,
        method,
        path,
        headers: vec![],
        want,
    };
    let cases = vec![
        case("no policy allows", vec![], Some(WEB), "GET", "/", Verdict::Allow),
        case(
            "ALLOW matching",
            vec![policy("p", A, vec![get_public()])],
            Some(WEB),
            "GET",
            "/public/x",
            Verdict::Allow,
        ),
        case(
            "ALLOW not matching path",
            vec![policy("p", A, vec![get_public()])],
            Some(WEB),
            "GET",
            "/private",
            Verdict::Deny,
        ),
        case(
            "ALLOW not matching method",
            vec![policy("p", A, vec![get_public()])],
            Some(WEB),
            "POST",
            "/public/x",
            Verdict::Deny,
        ),
        case(
            "ALLOW with no rules denies all",
            vec![policy("p", A, vec![])],
            Some(WEB),
            "GET",
            "/",
            Verdict::Deny,
        ),
        case(
            "ALLOW with an empty rule allows all",
            vec![policy("p", A, vec![AuthorizationRule::default()])],
            None,
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "DENY with no rules matches nothing",
            vec![policy("p", D, vec![])],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "DENY beats ALLOW",
            vec![policy("a", A, vec![get_public()]), policy("d", D, vec![get_public()])],
            Some(WEB),
            "GET",
            "/public",
            Verdict::Deny,
        ),
        case(
            "principal DENY",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { principals: strings(&[WEB]), ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/",
            Verdict::Deny,
        ),
        case(
            "principal DENY, other caller",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { principals: strings(&[WEB]), ..Default::default() })],
            )],
            Some("cluster.local/ns/demo/sa/other"),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "principal prefix",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource {
                    principals: strings(&["cluster.local/ns/demo/*"]),
                    ..Default::default()
                })],
            )],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "principal ALLOW never matches plaintext",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { principals: strings(&["*"]), ..Default::default() })],
            )],
            None,
            "GET",
            "/",
            Verdict::Deny,
        ),
        case(
            "notPrincipals DENY fails closed on plaintext",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { not_principals: strings(&[WEB]), ..Default::default() })],
            )],
            None,
            "GET",
            "/",
            Verdict::Deny,
        ),
        case(
            "notPrincipals DENY spares the listed one",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { not_principals: strings(&[WEB]), ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "notNamespaces ALLOW",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource { not_namespaces: strings(&["prod"]), ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "ipBlocks CIDR",
            vec![policy(
                "a",
                A,
                vec![from(AuthorizationSource {
                    ip_blocks: strings(&["10.1.0.0/16"]),
                    ..Default::default()
                })],
            )],
            None,
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "notIpBlocks",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource {
                    not_ip_blocks: strings(&["10.9.0.0/16", "::1"]),
                    ..Default::default()
                })],
            )],
            None,
            "GET",
            "/",
            Verdict::Deny,
        ),
        case(
            "path suffix",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { paths: strings(&["*.php"]), ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/x/index.php",
            Verdict::Deny,
        ),
        case(
            "notPaths",
            vec![policy(
                "a",
                A,
                vec![to(AuthorizationOperation { not_paths: strings(&["/admin*"]), ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/admin/x",
            Verdict::Deny,
        ),
        case(
            "ports other than the destination's",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { ports: vec![9090], ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "hosts are case-insensitive and ignore the port",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { hosts: strings(&["WEB.demo"]), ..Default::default() })],
            )],
            Some(WEB),
            "GET",
            "/",
            Verdict::Deny,
        ),
        case(
            "AUDIT never changes the verdict",
            vec![policy("u", U, vec![AuthorizationRule::default()])],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "source.namespace condition",
            vec![policy("a", A, vec![when("source.namespace", &["demo"], &[])])],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
        case(
            "destination.port notValues",
            vec![policy("d", D, vec![when("destination.port", &[], &["8080"])])],
            Some(WEB),
            "GET",
            "/",
            Verdict::Allow,
        ),
    ];
    for c in &cases {
        let decision = run(c);
        assert_eq!(decision.verdict, c.want, "{}: {decision:?}", c.name);
    }
}

#[test]
fn header_conditions_and_the_deciding_policy_are_reported() {
    let deny = policy(
        "deny-mallory",
        AuthorizationAction::Deny,
        vec![when("request.headers[x-user]", &["mallory"], &[])],
    );
    let audit = policy("audit-all", AuthorizationAction::Audit, vec![AuthorizationRule::default()]);
    let mut case = Case {
        name: "header",
        policies: vec![deny, audit],
        principal: Some(WEB),
        method: "GET",
        path: "/",
        headers: vec![("x-user", "mallory")],
        want: Verdict::Deny,
    };
    let decision = run(&case);
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.policy.as_deref(), Some("demo/deny-mallory"));
    assert_eq!(decision.reason, "denied by demo/deny-mallory");
    assert_eq!(decision.audited, ["demo/audit-all"]);
    assert_eq!(decision.evaluated.len(), 2);
    case.headers = vec![("x-user", "alice")];
    assert_eq!(run(&case).verdict, Verdict::Allow);
    case.headers = vec![];
    assert_eq!(run(&case).verdict, Verdict::Allow, "an absent header does not match values");
    assert_eq!(case.name, "header");
}

#[test]
fn connections_defer_http_rules_when_parsed_and_fail_closed_when_not() {
    let p = peer(Some(WEB));
    let allow_get = policy(
        "a",
        AuthorizationAction::Allow,
        vec![to(AuthorizationOperation { methods: strings(&["GET"]), ..Default::default() })],
    );
    let deny_admin = policy(
        "d",
        AuthorizationAction::Deny,
        vec![to(AuthorizationOperation { paths: strings(&["/admin*"]), ..Default::default() })],
    );
    let deny_web = policy(
        "w",
        AuthorizationAction::Deny,
        vec![from(AuthorizationSource { principals: strings(&[WEB]), ..Default::default() })],
    );
    assert_eq!(check_connection(&[&allow_get], &p, 80, true).verdict, Verdict::PerRequest);
    assert_eq!(
        check_connection(&[&allow_get], &p, 80, false).verdict,
        Verdict::Deny,
        "ALLOW with HTTP parts never allows TCP"
    );
    assert_eq!(check_connection(&[&deny_admin], &p, 80, true).verdict, Verdict::PerRequest);
    assert_eq!(
        check_connection(&[&deny_admin], &p, 80, false).verdict,
        Verdict::Deny,
        "DENY with HTTP parts fails closed on TCP"
    );
    assert_eq!(
        check_connection(&[&deny_web, &allow_get], &p, 80, true).verdict,
        Verdict::Deny,
        "an L4 DENY decides at once"
    );
    assert!(allow_get.has_l7() && !deny_web.has_l7());
    assert!(check_connection(&[], &p, 80, false).verdict == Verdict::Allow);
}

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let bad = |rule: AuthorizationRule| {
        Policy::compile(&Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            rules: vec![rule],
            ..Default::default()
        })
        .expect_err("refused")
        .to_string()
    };
    assert!(
        bad(from(AuthorizationSource { ip_blocks: strings(&["10.0.0.0/33"]), ..Default::default() }))
            .contains("rules[0].from[0].source.ipBlocks[0]")
    );
    assert!(bad(when("request.auth.claims[iss]", &["x"], &[])).contains("unknown condition key"));
    assert!(bad(when("source.ip", &[], &[])).contains("needs values"));
    assert!(
        bad(to(AuthorizationOperation { paths: strings(&["/a*b*"]), ..Default::default() }))
            .contains("`*` may only")
    );
    assert!(
        bad(to(AuthorizationOperation { methods: strings(&["get"]), ..Default::default() }))
            .contains("not an HTTP method")
    );
    assert!(
        bad(to(AuthorizationOperation { ports: vec![70000], ..Default::default() })).contains("not a port")
    );
}
