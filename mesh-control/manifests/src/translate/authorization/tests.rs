//! Table tests: policies (with the pods and services around them) and the `Authorization`
//! resources, workload listings and acceptance they must give.

use mesh_api::workload::v1::{
    Authorization, AuthorizationAction, AuthorizationCondition, AuthorizationOperation, AuthorizationRule,
    AuthorizationScope, AuthorizationSource,
};
use serde_json::{Value, json};

use super::{REASON_INVALID, REASON_UNENFORCEABLE};
use crate::{
    DATAPLANE_MODE,
    crd::AuthorizationPolicy,
    translate::{
        Acceptance, AuthorizationSpec, Model, Problem,
        tests::{ambient, model, objects, pod, service},
    },
};

fn policy(namespace: &str, name: &str, spec: Value) -> AuthorizationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, "generation": 3},
        "spec": spec
    }))
    .expect("policy")
}

/// web (app=web, tier=front) and db (app=db) in demo, web-prod (app=web) in prod; services web
/// (HTTP, 80 → 8080) and db (`tcp`, 5432).
fn translate_with(policies: Vec<AuthorizationPolicy>) -> Model {
    translate_in(policies, |_| {}, |_| {})
}

/// Like [`translate_with`], after `change_db_pod` and `change_db_service` edit db's JSON.
fn translate_in(
    policies: Vec<AuthorizationPolicy>,
    change_db_pod: impl FnOnce(&mut Value),
    change_db_service: impl FnOnce(&mut Value),
) -> Model {
    let pods = vec![
        pod("web", "10.1.1.2", |p| p["metadata"]["labels"]["tier"] = json!("front")),
        pod("db", "10.1.1.3", change_db_pod),
        pod("web-prod", "10.1.2.2", |p| {
            p["metadata"]["namespace"] = json!("prod");
            p["metadata"]["labels"]["app"] = json!("web");
        }),
    ];
    let services = vec![
        service("web", |_| {}),
        service("db", |s| {
            s["spec"]["selector"] = json!({"app": "db"});
            s["spec"]["ports"] =
                json!([{"name": "postgres", "port": 5432, "targetPort": 5432, "appProtocol": "tcp"}]);
            change_db_service(s);
        }),
    ];
    let mut objects = objects(vec![ambient("demo"), ambient("prod")], pods, services);
    objects.authorization_policies = policies;
    model(&objects)
}

fn only(model: &Model) -> &AuthorizationSpec {
    assert_eq!(model.authorizations.len(), 1, "{:?}", model.authorizations);
    &model.authorizations[0]
}

/// `namespace/name` of the workloads listing `policy`.
fn listed_by(model: &Model, policy: &str) -> Vec<String> {
    model
        .workloads
        .iter()
        .filter(|w| w.authorization_policies.iter().any(|p| p == policy))
        .map(|w| w.key.to_string())
        .collect()
}

#[test]
fn the_scope_follows_the_selector_and_the_namespace() {
    /// (case, policy namespace, selector, scope, workloads listing it).
    type Case<'a> = (&'a str, &'a str, Value, AuthorizationScope, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "a selector picks pods of its namespace",
            "demo",
            json!({"matchLabels": {"app": "web"}}),
            AuthorizationScope::WorkloadSelector,
            vec!["demo/web"],
        ),
        (
            "every label must match",
            "demo",
            json!({"matchLabels": {"app": "web", "tier": "front"}}),
            AuthorizationScope::WorkloadSelector,
            vec!["demo/web"],
        ),
        (
            "a label no pod has picks none",
            "demo",
            json!({"matchLabels": {"app": "web", "tier": "back"}}),
            AuthorizationScope::WorkloadSelector,
            vec![],
        ),
        (
            "another namespace's selector",
            "prod",
            json!({"matchLabels": {"app": "web"}}),
            AuthorizationScope::WorkloadSelector,
            vec!["prod/web-prod"],
        ),
        ("no selector: the namespace", "demo", json!(null), AuthorizationScope::Namespace, vec![]),
        (
            "empty matchLabels: the namespace",
            "demo",
            json!({"matchLabels": {}}),
            AuthorizationScope::Namespace,
            vec![],
        ),
        (
            "the root namespace without selector: the mesh",
            "nodemesh-system",
            json!(null),
            AuthorizationScope::Global,
            vec![],
        ),
        (
            "the root namespace's selector picks in every namespace",
            "nodemesh-system",
            json!({"matchLabels": {"app": "web"}}),
            AuthorizationScope::WorkloadSelector,
            vec!["demo/web", "prod/web-prod"],
        ),
    ];
    for (case, namespace, selector, scope, listed) in cases {
        let spec = if selector.is_null() { json!({}) } else { json!({"selector": selector}) };
        let model = translate_with(vec![policy(namespace, "p", spec)]);
        assert!(model.problems.is_empty(), "{case}: {:?}", model.problems);
        let translated = only(&model);
        assert_eq!(translated.authorization.scope(), scope, "{case}");
        assert_eq!(translated.acceptance, Acceptance::accepted(), "{case}");
        assert_eq!(listed_by(&model, &format!("{namespace}/p")), listed, "{case}");
    }
}

#[test]
fn a_policy_translates_field_by_field_with_numeric_ports() {
    let written = policy(
        "demo",
        "deny-admin",
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/demo/sa/*"], "notNamespaces": ["prod"],
                                     "ipBlocks": ["10.0.0.0/8", "fd00::1"], "notIpBlocks": ["10.9.0.0/16"]}}],
                "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"], "methods": ["POST"],
                                      "paths": ["/admin*"], "notPaths": ["/admin/health"], "hosts": ["*.demo"]}}],
                "when": [{"key": "request.headers[x-user]", "values": ["mallory"]},
                         {"key": "source.ip", "notValues": ["10.1.1.0/24"]},
                         {"key": "destination.port", "values": ["8080"]}]
            }, {}]
        }),
    );
    let model = translate_with(vec![written]);
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    let expected = Authorization {
        name: "deny-admin".into(),
        namespace: "demo".into(),
        scope: AuthorizationScope::WorkloadSelector.into(),
        action: AuthorizationAction::Deny.into(),
        rules: vec![
            AuthorizationRule {
                from: vec![AuthorizationSource {
                    principals: vec!["cluster.local/ns/demo/sa/*".into()],
                    not_namespaces: vec!["prod".into()],
                    ip_blocks: vec!["10.0.0.0/8".into(), "fd00::1".into()],
                    not_ip_blocks: vec!["10.9.0.0/16".into()],
                    ..Default::default()
                }],
                to: vec![AuthorizationOperation {
                    ports: vec![8080],
                    not_ports: vec![9090],
                    methods: vec!["POST".into()],
                    paths: vec!["/admin*".into()],
                    not_paths: vec!["/admin/health".into()],
                    hosts: vec!["*.demo".into()],
                    ..Default::default()
                }],
                when: vec![
                    AuthorizationCondition {
                        key: "request.headers[x-user]".into(),
                        values: vec!["mallory".into()],
                        not_values: vec![],
                    },
                    AuthorizationCondition {
                        key: "source.ip".into(),
                        values: vec![],
                        not_values: vec!["10.1.1.0/24".into()],
                    },
                    AuthorizationCondition {
                        key: "destination.port".into(),
                        values: vec!["8080".into()],
                        not_values: vec![],
                    },
                ],
            },
            AuthorizationRule::default(),
        ],
    };
    let translated = only(&model);
    assert_eq!(translated.authorization, expected);
    assert_eq!(translated.generation, Some(3));
    let audit = translate_with(vec![policy("demo", "audit", json!({"action": "AUDIT"}))]);
    assert_eq!(only(&audit).authorization.action(), AuthorizationAction::Audit);
    assert!(only(&audit).authorization.rules.is_empty(), "no rules stays no rules (ALLOW: denies all)");
}

#[test]
fn invalid_values_are_problems_naming_the_field_and_fail_closed() {
    /// (case, action, rule, expected finding, the rules nodes receive).
    type Case<'a> = (&'a str, &'a str, Value, &'a str, Vec<AuthorizationRule>);
    let valid = json!({"from": [{"source": {"namespaces": ["demo"]}}]});
    let valid_rule = AuthorizationRule {
        from: vec![AuthorizationSource { namespaces: vec!["demo".into()], ..Default::default() }],
        ..Default::default()
    };
    let cases: Vec<Case> = vec![
        (
            "ALLOW: a rule with a bad port never matches (dropped)",
            "ALLOW",
            json!({"to": [{"operation": {"ports": ["http"]}}]}),
            "rules[0].to[0].operation.ports[0]: \"http\" is not a port number",
            vec![valid_rule.clone()],
        ),
        (
            "DENY: a bad port leaves the ports open (any port)",
            "DENY",
            json!({"to": [{"operation": {"ports": ["80", "70000"], "methods": ["GET"]}}]}),
            "rules[0].to[0].operation.ports[1]: \"70000\" is not a port number",
            vec![
                AuthorizationRule {
                    to: vec![AuthorizationOperation { methods: vec!["GET".into()], ..Default::default() }],
                    ..Default::default()
                },
                valid_rule.clone(),
            ],
        ),
        (
            "DENY: port 0 in notPorts excludes nothing",
            "DENY",
            json!({"to": [{"operation": {"notPorts": ["0", "+80", " 81"]}}]}),
            "rules[0].to[0].operation.notPorts[0]: \"0\" is not a port number",
            vec![
                AuthorizationRule { to: vec![AuthorizationOperation::default()], ..Default::default() },
                valid_rule.clone(),
            ],
        ),
        (
            "DENY: a bad CIDR widens the source",
            "DENY",
            json!({"from": [{"source": {"ipBlocks": ["10.0.0.0/33"], "principals": ["a/ns/b/sa/c"]}}]}),
            "rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR",
            vec![
                AuthorizationRule {
                    from: vec![AuthorizationSource {
                        principals: vec!["a/ns/b/sa/c".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                valid_rule.clone(),
            ],
        ),
        (
            "ALLOW: a bad notIpBlock",
            "ALLOW",
            json!({"from": [{"source": {"notIpBlocks": ["10.1.1.1/+8"]}}]}),
            "rules[0].from[0].source.notIpBlocks[0]: \"10.1.1.1/+8\" is not an IP address or CIDR",
            vec![valid_rule.clone()],
        ),
        (
            "DENY: an unknown condition key is dropped",
            "DENY",
            json!({"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}, {"key": "source.namespace", "values": ["prod"]}]}),
            "rules[0].when[0].key: \"request.auth.claims[iss]\" is not a condition nodemesh evaluates",
            vec![
                AuthorizationRule {
                    when: vec![AuthorizationCondition {
                        key: "source.namespace".into(),
                        values: vec!["prod".into()],
                        not_values: vec![],
                    }],
                    ..Default::default()
                },
                valid_rule.clone(),
            ],
        ),
        (
            "ALLOW: a condition without values",
            "ALLOW",
            json!({"when": [{"key": "source.principal"}]}),
            "rules[0].when[0]: source.principal needs values or notValues",
            vec![valid_rule.clone()],
        ),
        (
            "ALLOW: a bad source.ip value",
            "ALLOW",
            json!({"when": [{"key": "source.ip", "values": ["ten"]}]}),
            "rules[0].when[0].values[0]: \"ten\" is not an IP address or CIDR",
            vec![valid_rule.clone()],
        ),
        (
            "ALLOW: a bad destination.port value",
            "ALLOW",
            json!({"when": [{"key": "destination.port", "notValues": ["x"]}]}),
            "rules[0].when[0].notValues[0]: \"x\" is not a port number",
            vec![valid_rule.clone()],
        ),
        (
            "ALLOW: an empty header name",
            "ALLOW",
            json!({"when": [{"key": "request.headers[]", "values": ["x"]}]}),
            "rules[0].when[0].key: \"request.headers[]\" is not a condition",
            vec![valid_rule.clone()],
        ),
        (
            "ALLOW: a wildcard in the middle",
            "ALLOW",
            json!({"to": [{"operation": {"paths": ["/api/*/admin"]}}]}),
            "rules[0].to[0].operation.paths[0]: \"/api/*/admin\" may have one \"*\" only, at its start or its end",
            vec![valid_rule.clone()],
        ),
        (
            "ALLOW: wildcards at both ends",
            "ALLOW",
            json!({"from": [{"source": {"principals": ["*admin*"]}}]}),
            "rules[0].from[0].source.principals[0]: \"*admin*\" may have one \"*\"",
            vec![valid_rule.clone()],
        ),
        (
            "ALLOW: a lowercase method never matches",
            "ALLOW",
            json!({"to": [{"operation": {"methods": ["get"]}}]}),
            "rules[0].to[0].operation.methods[0]: \"get\" is not an HTTP method (uppercase, matched exactly)",
            vec![valid_rule.clone()],
        ),
        (
            "DENY: a wildcard method leaves the methods open",
            "DENY",
            json!({"to": [{"operation": {"notMethods": ["GET", "P*"]}}]}),
            "rules[0].to[0].operation.notMethods[1]: \"P*\" is not an HTTP method",
            vec![
                AuthorizationRule { to: vec![AuthorizationOperation::default()], ..Default::default() },
                valid_rule.clone(),
            ],
        ),
        (
            "ALLOW: an empty value",
            "ALLOW",
            json!({"to": [{"operation": {"hosts": [""]}}]}),
            "rules[0].to[0].operation.hosts[0]: \"\" is empty",
            vec![valid_rule.clone()],
        ),
    ];
    for (case, action, rule, finding, rules) in cases {
        let written = policy("demo", "p", json!({"action": action, "rules": [rule, valid]}));
        let model = translate_with(vec![written]);
        let [problem] = model.problems.as_slice() else { panic!("{case}: {:?}", model.problems) };
        assert_eq!((problem.kind, problem.object.as_str()), ("AuthorizationPolicy", "demo/p"), "{case}");
        assert!(
            problem.message.starts_with(finding),
            "{case}: expected {finding:?}, got {:?}",
            problem.message
        );
        let translated = only(&model);
        assert_eq!(
            (translated.acceptance.status, translated.acceptance.reason.as_str()),
            (false, REASON_INVALID),
            "{case}"
        );
        assert_eq!(translated.acceptance.message, problem.message, "{case}");
        assert_eq!(translated.authorization.rules, rules, "{case}");
    }
}

#[test]
fn http_conditions_that_only_meet_non_http_ports_are_rejected_but_kept() {
    /// (case, policy spec, the finding, or `None` when accepted).
    type Case<'a> = (&'a str, Value, Option<&'a str>);
    let db = json!({"matchLabels": {"app": "db"}});
    let cases: Vec<Case> = vec![
        (
            "paths on a port declared tcp",
            json!({"selector": db, "action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"], "paths": ["/admin"]}}]}]}),
            Some("rules[0]: HTTP conditions (paths) can never apply: port 5432 is declared \"tcp\""),
        ),
        (
            "every L7 field is named",
            json!({"selector": db, "rules": [{"to": [{"operation": {"ports": ["5432"], "methods": ["GET"], "notHosts": ["x"]}}]}]}),
            Some(
                "rules[0]: HTTP conditions (methods, notHosts) can never apply: port 5432 is declared \"tcp\"",
            ),
        ),
        (
            "methods on the HTTP port",
            json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}),
            None,
        ),
        (
            "L4 parts alone on the tcp port",
            json!({"selector": db, "rules": [{"from": [{"source": {"namespaces": ["demo"]}}], "to": [{"operation": {"ports": ["5432"]}}]}]}),
            None,
        ),
        (
            "L7 without ports on a workload serving only tcp",
            json!({"selector": db, "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}),
            Some(
                "rules[0]: HTTP conditions (methods) can never apply to demo/db (serves only 5432 \"tcp\"): list its HTTP ports in to.operation.ports",
            ),
        ),
        (
            "a header condition on a workload serving only tcp",
            json!({"selector": db, "rules": [{"when": [{"key": "request.headers[x-user]", "values": ["alice"]}]}]}),
            Some("rules[0]: HTTP conditions (request.headers[x-user]) can never apply to demo/db"),
        ),
        (
            "a header condition limited to the tcp port by the rule's operations",
            json!({"selector": db, "rules": [{"to": [{"operation": {"ports": ["5432"]}}], "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]}]}),
            Some(
                "rules[0]: HTTP conditions (request.headers[x-user]) can never apply: port 5432 is declared \"tcp\"",
            ),
        ),
        (
            "a namespace-wide L7 rule meets the tcp-only workload",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/debug*"]}}]}]}),
            Some("rules[0]: HTTP conditions (paths) can never apply to demo/db (serves only 5432 \"tcp\")"),
        ),
        (
            "... unless limited to the HTTP port",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"], "paths": ["/debug*"]}}]}]}),
            None,
        ),
        (
            "... or by destination.port",
            json!({"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["a"]}, {"key": "destination.port", "values": ["8080"]}]}]}),
            None,
        ),
        (
            "one operation on the tcp port is enough to reject",
            json!({"rules": [{"to": [{"operation": {"ports": ["8080"], "paths": ["/a"]}}, {"operation": {"ports": ["5432"], "hosts": ["db"]}}]}]}),
            Some("rules[0]: HTTP conditions (hosts) can never apply: port 5432 is declared \"tcp\""),
        ),
        (
            "a port nobody declares is not judged",
            json!({"selector": db, "rules": [{"to": [{"operation": {"ports": ["9999"], "paths": ["/a"]}}]}]}),
            None,
        ),
        (
            "a later rule is named by its index",
            json!({"selector": db, "rules": [{}, {"to": [{"operation": {"ports": ["5432"], "notMethods": ["GET"]}}]}]}),
            Some("rules[1]: HTTP conditions (notMethods) can never apply: port 5432 is declared \"tcp\""),
        ),
    ];
    for (case, spec, finding) in cases {
        let model = translate_with(vec![policy("demo", "p", spec.clone())]);
        let translated = only(&model);
        match finding {
            None => {
                assert!(model.problems.is_empty(), "{case}: {:?}", model.problems);
                assert_eq!(translated.acceptance, Acceptance::accepted(), "{case}");
            }
            Some(finding) => {
                let [Problem { kind: "AuthorizationPolicy", message, .. }] = model.problems.as_slice() else {
                    panic!("{case}: {:?}", model.problems)
                };
                assert!(message.starts_with(finding), "{case}: expected {finding:?}, got {message:?}");
                assert_eq!(
                    (translated.acceptance.status, translated.acceptance.reason.as_str()),
                    (false, REASON_UNENFORCEABLE),
                    "{case}"
                );
                // Distributed as written: the node fails closed on it.
                let written = spec["rules"].as_array().map_or(0, Vec::len);
                assert_eq!(translated.authorization.rules.len(), written, "{case}");
            }
        }
    }
}

#[test]
fn what_a_port_is_declared_as_decides_and_only_meshed_pods_count() {
    let l7_on_db = || {
        policy(
            "demo",
            "p",
            json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        )
    };
    // (case, db's service ports, accepted?).
    let cases = [
        ("declared tcp", json!([{"port": 5432, "appProtocol": "tcp"}]), false),
        ("a tls port name", json!([{"name": "tls-db", "port": 5432}]), false),
        ("an unknown protocol", json!([{"port": 5432, "appProtocol": "mysql"}]), false),
        ("undeclared: the proxy detects it", json!([{"name": "db", "port": 5432}]), true),
        ("http2", json!([{"port": 5432, "appProtocol": "HTTP2"}]), true),
        ("grpc by name", json!([{"name": "grpc-api", "port": 5432}]), true),
        ("h2c", json!([{"port": 5432, "appProtocol": "kubernetes.io/h2c"}]), true),
        (
            "one HTTP port among tcp ones",
            json!([{"port": 5432, "appProtocol": "tcp"}, {"port": 80, "targetPort": 8080, "appProtocol": "http"}]),
            true,
        ),
    ];
    for (case, ports, accepted) in cases {
        let model = translate_in(vec![l7_on_db()], |_| {}, |s| s["spec"]["ports"] = ports);
        assert_eq!(only(&model).acceptance.status, accepted, "{case}: {:?}", model.problems);
    }
    // A pod outside the mesh is not enforced on, so nothing is unenforceable there.
    let model =
        translate_in(vec![l7_on_db()], |p| p["metadata"]["labels"][DATAPLANE_MODE] = json!("none"), |_| {});
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    assert_eq!(listed_by(&model, "demo/p"), ["demo/db"], "it is still listed: it is what the policy selects");
}

#[test]
fn workloads_list_every_selector_policy_sorted_and_others_only_by_scope() {
    let policies = vec![
        policy("demo", "z-web", json!({"selector": {"matchLabels": {"app": "web"}}})),
        policy("demo", "a-front", json!({"selector": {"matchLabels": {"tier": "front"}}})),
        policy("demo", "namespace-wide", json!({})),
        policy(
            "nodemesh-system",
            "mesh-wide",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["demo", "prod"]}}]}]}),
        ),
    ];
    let model = translate_with(policies);
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    let web = model.workloads.iter().find(|w| w.key.name == "web").expect("web");
    assert_eq!(web.authorization_policies, ["demo/a-front", "demo/z-web"]);
    let names: Vec<String> = model
        .authorizations
        .iter()
        .map(|a| format!("{}/{}", a.authorization.namespace, a.authorization.name))
        .collect();
    assert_eq!(names, ["demo/a-front", "demo/namespace-wide", "demo/z-web", "nodemesh-system/mesh-wide"]);
    assert_eq!(model.root_namespace, "nodemesh-system");
}

#[test]
fn a_policy_without_a_name_is_a_problem_and_not_distributed() {
    let mut nameless = policy("demo", "x", json!({}));
    nameless.metadata.name = None;
    let model = translate_with(vec![nameless]);
    assert!(model.authorizations.is_empty());
    assert_eq!(model.problems[0].message, "metadata.name is required");
}
