//! Table tests: HTTPRoutes (with the services around them) and the `HttpRoute` resources and
//! parent conditions they must give.

use mesh_api::workload::v1::{
    BackendRef, Header, HeaderModifier, HttpRoute, HttpRouteMatch, HttpRouteRule, PathMatch, PathMatchKind,
    RetryPolicy, RouteParent, ValueMatch,
};
use serde_json::{Value, json};

use super::{DEFAULT_RETRY_ATTEMPTS, RouteSpec};
use crate::{
    crd,
    translate::{
        Acceptance, Model,
        tests::{ambient, model, objects, service},
    },
};

fn route(spec: Value) -> crd::HttpRoute {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "demo", "generation": 2,
                     "creationTimestamp": "2025-01-02T03:04:05Z"},
        "spec": spec
    }))
    .expect("route")
}

/// Services `reviews` (80 and 9080), `reviews-v1` and `reviews-v2` (80) in demo, `ratings` in
/// prod.
fn translate_routes(routes: Vec<crd::HttpRoute>) -> Model {
    let services = vec![
        service("reviews", |s| {
            s["spec"]["ports"] = json!([{"name": "http", "port": 80}, {"name": "http-alt", "port": 9080}]);
        }),
        service("reviews-v1", |_| {}),
        service("reviews-v2", |_| {}),
        service("ratings", |s| s["metadata"]["namespace"] = json!("prod")),
    ];
    let mut objects = objects(vec![ambient("demo")], vec![], services);
    objects.http_routes = routes;
    model(&objects)
}

fn only(model: &Model) -> &RouteSpec {
    assert_eq!(model.routes.len(), 1, "{:?}", model.routes);
    &model.routes[0]
}

fn distributed(model: &Model) -> &HttpRoute {
    only(model).route.as_ref().expect("distributed")
}

const REVIEWS: &str = "demo/reviews.demo.svc.cluster.local";

#[test]
fn a_canary_route_translates_field_by_field() {
    let written = route(json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
        "hostnames": ["reviews"],
        "rules": [{
            "matches": [{"path": {"type": "Exact", "value": "/api"},
                         "headers": [{"name": "x-canary", "value": "1"}, {"type": "RegularExpression", "name": "x-user", "value": "a.*"}],
                         "queryParams": [{"name": "v", "value": "2"}],
                         "method": "GET"},
                        {"path": {"type": "RegularExpression", "value": "^/v[0-9]+/"}}],
            "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]}},
                        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-c", "value": "2"}]}}],
            "backendRefs": [{"name": "reviews-v1", "port": 80, "weight": 90}, {"name": "reviews-v2", "port": 80, "weight": 10}],
            "timeouts": {"request": "10s", "backendRequest": "500ms"},
            "retry": {"codes": [502, 503], "attempts": 3, "backoff": "100ms"}
        }, {}]
    }));
    let model = translate_routes(vec![written]);
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    let expected = HttpRoute {
        name: "r".into(),
        namespace: "demo".into(),
        parents: vec![RouteParent { service: REVIEWS.into(), port: 80 }],
        hostnames: vec!["reviews".into()],
        rules: vec![
            HttpRouteRule {
                matches: vec![
                    HttpRouteMatch {
                        path: Some(PathMatch { kind: PathMatchKind::Exact.into(), value: "/api".into() }),
                        headers: vec![
                            ValueMatch { name: "x-canary".into(), value: "1".into(), regex: false },
                            ValueMatch { name: "x-user".into(), value: "a.*".into(), regex: true },
                        ],
                        query_params: vec![ValueMatch { name: "v".into(), value: "2".into(), regex: false }],
                        method: "GET".into(),
                    },
                    HttpRouteMatch {
                        path: Some(PathMatch {
                            kind: PathMatchKind::RegularExpression.into(),
                            value: "^/v[0-9]+/".into(),
                        }),
                        ..Default::default()
                    },
                ],
                request_headers: Some(HeaderModifier {
                    set: vec![Header { name: "x-a".into(), value: "1".into() }],
                    add: vec![],
                    remove: vec!["x-b".into()],
                }),
                response_headers: Some(HeaderModifier {
                    set: vec![],
                    add: vec![Header { name: "x-c".into(), value: "2".into() }],
                    remove: vec![],
                }),
                backends: vec![
                    BackendRef {
                        service: "demo/reviews-v1.demo.svc.cluster.local".into(),
                        port: 80,
                        weight: 90,
                    },
                    BackendRef {
                        service: "demo/reviews-v2.demo.svc.cluster.local".into(),
                        port: 80,
                        weight: 10,
                    },
                ],
                request_timeout_ms: 10_000,
                backend_request_timeout_ms: 500,
                retry: Some(RetryPolicy {
                    attempts: 3,
                    codes: vec![502, 503],
                    backoff_ms: 100,
                    retry_non_idempotent: false,
                }),
            },
            HttpRouteRule::default(),
        ],
        created: "2025-01-02T03:04:05Z".into(),
    };
    assert_eq!(distributed(&model), &expected);
    let spec = only(&model);
    assert_eq!(spec.generation, Some(2));
    let [parent] = spec.parents.as_slice() else { panic!("{:?}", spec.parents) };
    assert_eq!(
        parent.accepted,
        Acceptance::condition(true, "Accepted", "applied to traffic for this Service")
    );
    assert_eq!(
        parent.resolved_refs,
        Acceptance::condition(true, "ResolvedRefs", "every backend Service exists")
    );
}

#[test]
fn parents_backends_and_defaults() {
    /// (case, route spec, expected parents, expected backends of rule 0).
    type Case<'a> = (&'a str, Value, Vec<RouteParent>, Vec<BackendRef>);
    let parent = |service: &str, port: u32| RouteParent { service: service.into(), port };
    let backend =
        |service: &str, port: u32, weight: u32| BackendRef { service: service.into(), port, weight };
    let cases: Vec<Case> = vec![
        (
            "no port: every port of the service; weight 1",
            json!({
            "parentRefs": [{"kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 80}]}]}),
            vec![parent(REVIEWS, 0)],
            vec![backend("demo/reviews-v1.demo.svc.cluster.local", 80, 1)],
        ),
        (
            "the core group, spelled out",
            json!({
            "parentRefs": [{"group": "core", "kind": "Service", "name": "reviews", "port": 9080}],
            "rules": [{"backendRefs": [{"name": "reviews-v1"}]}]}),
            vec![parent(REVIEWS, 9080)],
            vec![backend("demo/reviews-v1.demo.svc.cluster.local", 9080, 1)],
        ),
        (
            "a backend without port takes the parents' port when they agree",
            json!({
            "parentRefs": [{"kind": "Service", "name": "reviews", "port": 80}, {"kind": "Service", "name": "reviews-v1", "port": 80}],
            "rules": [{"backendRefs": [{"name": "reviews-v2", "weight": 0}]}]}),
            vec![parent(REVIEWS, 80), parent("demo/reviews-v1.demo.svc.cluster.local", 80)],
            vec![backend("demo/reviews-v2.demo.svc.cluster.local", 80, 0)],
        ),
        (
            "... and 0 when they do not",
            json!({
            "parentRefs": [{"kind": "Service", "name": "reviews", "port": 80}, {"kind": "Service", "name": "reviews", "port": 9080}],
            "rules": [{"backendRefs": [{"name": "reviews-v2"}]}]}),
            vec![parent(REVIEWS, 80), parent(REVIEWS, 9080)],
            vec![backend("demo/reviews-v2.demo.svc.cluster.local", 0, 1)],
        ),
        (
            "Gateway parents are another implementation's",
            json!({
            "parentRefs": [{"name": "gateway"}, {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
                           {"group": "example.com", "kind": "Service", "name": "x"}, {"kind": "Service", "name": "reviews"}],
            "rules": [{}]}),
            vec![parent(REVIEWS, 0)],
            vec![],
        ),
        (
            "another namespace's parent and backend",
            json!({
            "parentRefs": [{"kind": "Service", "name": "ratings", "namespace": "prod"}],
            "rules": [{"backendRefs": [{"name": "ratings", "namespace": "prod", "port": 80}]}]}),
            vec![parent("prod/ratings.prod.svc.cluster.local", 0)],
            vec![backend("prod/ratings.prod.svc.cluster.local", 80, 1)],
        ),
    ];
    for (case, spec, parents, backends) in cases {
        let model = translate_routes(vec![route(spec)]);
        assert!(model.problems.is_empty(), "{case}: {:?}", model.problems);
        let translated = distributed(&model);
        assert_eq!(translated.parents, parents, "{case}");
        assert_eq!(translated.rules[0].backends, backends, "{case}");
        let status = &only(&model).parents;
        assert_eq!(status.len(), parents.len(), "{case}: one status per Service parent");
        assert!(status.iter().all(|p| p.accepted.status && p.resolved_refs.status), "{case}: {status:?}");
    }
}

#[test]
fn a_route_only_for_gateways_is_not_nodemeshs() {
    let model = translate_routes(vec![route(json!({"parentRefs": [{"name": "gateway"}]}))]);
    assert!(model.routes.is_empty() && model.problems.is_empty());
}

#[test]
fn matches_default_to_a_prefix_slash_and_retries_to_two() {
    let model = translate_routes(vec![route(json!({
        "parentRefs": [{"kind": "Service", "name": "reviews"}],
        "rules": [{"matches": [{"method": "POST"}, {"path": {"value": "/x"}}], "retry": {"codes": [503]}}]
    }))]);
    let rule = &distributed(&model).rules[0];
    let paths: Vec<(PathMatchKind, &str)> =
        rule.matches.iter().filter_map(|m| m.path.as_ref()).map(|p| (p.kind(), p.value.as_str())).collect();
    assert_eq!(paths, [(PathMatchKind::PathPrefix, "/"), (PathMatchKind::PathPrefix, "/x")]);
    let retry = rule.retry.as_ref().expect("retry");
    assert_eq!((retry.attempts, retry.backoff_ms), (DEFAULT_RETRY_ATTEMPTS, 0));
    assert_eq!(rule.request_timeout_ms, 0, "no timeout");
    assert!(rule.retry.is_some() && distributed(&model).created == "2025-01-02T03:04:05Z");
}

#[test]
fn missing_services_are_reported_in_the_status_and_the_route_still_distributed() {
    /// (case, route spec, Accepted (status, reason, message), ResolvedRefs (status, reason, message)).
    type Case<'a> = (&'a str, Value, (bool, &'a str, &'a str), (bool, &'a str, &'a str));
    let cases: Vec<Case> = vec![
        (
            "the parent does not exist",
            json!({
            "parentRefs": [{"kind": "Service", "name": "details"}], "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 80}]}]}),
            (false, "NoMatchingParent", "Service demo/details does not exist"),
            (true, "ResolvedRefs", "every backend Service exists"),
        ),
        (
            "the parent lacks the port",
            json!({"parentRefs": [{"kind": "Service", "name": "reviews", "port": 8080}]}),
            (false, "NoMatchingParent", "Service demo/reviews has no port 8080"),
            (true, "ResolvedRefs", "every backend Service exists"),
        ),
        (
            "a backend does not exist",
            json!({
            "parentRefs": [{"kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "reviews-v3", "port": 80}, {"name": "ratings", "port": 80}]}]}),
            (true, "Accepted", "applied to traffic for this Service"),
            (
                false,
                "BackendNotFound",
                "Service demo/reviews-v3 does not exist; Service demo/ratings does not exist",
            ),
        ),
        (
            "a backend lacks the port",
            json!({
            "parentRefs": [{"kind": "Service", "name": "reviews"}], "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 81}]}]}),
            (true, "Accepted", "applied to traffic for this Service"),
            (false, "BackendNotFound", "Service demo/reviews-v1 has no port 81"),
        ),
        (
            "a backend in another namespace (no ReferenceGrant support: refused)",
            json!({
            "parentRefs": [{"kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "payments", "namespace": "bank", "port": 80}]}]}),
            (true, "Accepted", "applied to traffic for this Service"),
            (
                false,
                "RefNotPermitted",
                "Service bank/payments is in another namespace (ReferenceGrant is not supported)",
            ),
        ),
    ];
    for (case, spec, accepted, resolved) in cases {
        let model = translate_routes(vec![route(spec)]);
        assert!(model.problems.is_empty(), "{case}: not a problem of the route itself: {:?}", model.problems);
        assert!(only(&model).route.is_some(), "{case}: still distributed");
        let [parent] = only(&model).parents.as_slice() else { panic!("{case}") };
        let view = |a: &Acceptance| (a.status, a.reason.clone(), a.message.clone());
        let expect = |(s, r, m): (bool, &str, &str)| (s, r.to_owned(), m.to_owned());
        assert_eq!(view(&parent.accepted), expect(accepted), "{case}");
        assert_eq!(view(&parent.resolved_refs), expect(resolved), "{case}");
    }
}

#[test]
fn values_nodemesh_cannot_implement_are_problems_and_the_route_is_not_distributed() {
    let cases = [
        (
            json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]}),
            "rules[0].filters[0]: unsupported filter type RequestRedirect",
        ),
        (
            json!({"filters": [{"type": "RequestHeaderModifier"}]}),
            "rules[0].filters[0].requestHeaderModifier: required by type RequestHeaderModifier",
        ),
        (json!({"timeouts": {"request": "1.5s"}}), "rules[0].timeouts.request: \"1.5s\" is not a duration"),
        (
            json!({"timeouts": {"request": "1s", "backendRequest": "2s"}}),
            "rules[0].timeouts.backendRequest: longer than timeouts.request",
        ),
        (json!({"retry": {"backoff": "soon"}}), "rules[0].retry.backoff: \"soon\" is not a duration"),
        (
            json!({"retry": {"codes": [200]}}),
            "rules[0].retry.codes[0]: 200 is not an HTTP error status (400-599)",
        ),
        (
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "api"}}]}),
            "rules[0].matches[0].path.value: \"api\" must start with \"/\"",
        ),
        (
            json!({"matches": [{"method": "FETCH"}]}),
            "rules[0].matches[0].method: \"FETCH\" is not one of GET",
        ),
        (
            json!({"matches": [{"headers": [{"name": "", "value": "x"}]}]}),
            "rules[0].matches[0].headers[0].name: must not be empty",
        ),
        (
            json!({"matches": [{"headers": [{"name": "x user", "value": "x"}]}]}),
            "rules[0].matches[0].headers[0].name: \"x user\" is not a header name",
        ),
        (
            json!({"matches": [{"queryParams": [{"name": "v", "value": "1"}, {"name": "V", "value": "2"}]}]}),
            "rules[0].matches[0].queryParams[1].name: \"V\" is matched twice",
        ),
        (
            json!({"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["a:b"]}}]}),
            "rules[0].filters[0].responseHeaderModifier: \"a:b\" is not a header name",
        ),
    ];
    for (rule, expected) in cases {
        let model = translate_routes(vec![route(json!({
            "parentRefs": [{"kind": "Service", "name": "reviews"}], "rules": [rule]
        }))]);
        let [problem] = model.problems.as_slice() else { panic!("{expected}: {:?}", model.problems) };
        assert_eq!((problem.kind, problem.object.as_str()), ("HTTPRoute", "demo/r"));
        assert!(problem.message.starts_with(expected), "expected {expected:?}, got {:?}", problem.message);
        let spec = only(&model);
        assert!(spec.route.is_none(), "{expected}: not distributed");
        assert_eq!(
            (spec.parents[0].accepted.status, spec.parents[0].accepted.reason.as_str()),
            (false, "UnsupportedValue")
        );
        assert_eq!(spec.parents[0].accepted.message, problem.message);
    }
}

#[test]
fn routes_are_sorted_and_filters_of_one_kind_merge() {
    let mut second = route(json!({
        "parentRefs": [{"kind": "Service", "name": "reviews"}],
        "rules": [{"filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "1"}]}},
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "b", "value": "2"}]}}
        ]}]
    }));
    second.metadata.name = Some("a-first".into());
    let first = route(json!({"parentRefs": [{"kind": "Service", "name": "reviews"}]}));
    let model = translate_routes(vec![first, second]);
    let names: Vec<&str> = model.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a-first", "r"]);
    let set =
        &model.routes[0].route.as_ref().expect("route").rules[0].request_headers.as_ref().expect("set").set;
    assert_eq!(set.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
}

#[test]
fn hostnames_must_be_dns_names_or_wildcards() {
    let with = |hostnames: Value| {
        translate_routes(vec![route(
            json!({"parentRefs": [{"kind": "Service", "name": "reviews"}], "hostnames": hostnames}),
        )])
    };
    assert!(with(json!(["reviews", "reviews.demo.svc.cluster.local", "*.example.com"])).problems.is_empty());
    for bad in ["Reviews", "*", "a..b", "-a", "10.0.0.1:80", "*.*.a"] {
        let model = with(json!([bad]));
        let message = model.problems.first().map(|p| p.message.clone()).unwrap_or_default();
        assert_eq!(message, format!("hostnames[0]: {bad:?} is not a hostname or a \"*.\" wildcard"));
        assert!(only(&model).route.is_none());
    }
}
