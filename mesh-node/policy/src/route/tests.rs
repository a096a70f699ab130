//! Gateway API HTTPRoute matching, weighting and retry rules.

use http::HeaderMap;
use mesh_api::workload::v1::{
    BackendRef, Header, HeaderModifier, HttpRouteMatch, HttpRouteRule, PathMatch as ProtoPath, RetryPolicy,
    RouteParent, ValueMatch,
};

use super::*;

const WEB: &str = "demo/web.demo.svc.cluster.local";

fn path(kind: PathMatchKind, value: &str) -> HttpRouteMatch {
    HttpRouteMatch { path: Some(ProtoPath { kind: kind.into(), value: value.into() }), ..Default::default() }
}

fn rule(matches: Vec<HttpRouteMatch>, backend: &str) -> HttpRouteRule {
    HttpRouteRule {
        matches,
        backends: vec![BackendRef { service: format!("demo/{backend}"), port: 80, weight: 1 }],
        ..Default::default()
    }
}

fn route(name: &str, created: &str, rules: Vec<HttpRouteRule>) -> Route {
    Route::compile(&HttpRoute {
        name: name.into(),
        namespace: "demo".into(),
        parents: vec![RouteParent { service: WEB.into(), port: 80 }],
        rules,
        created: created.into(),
        ..Default::default()
    })
    .expect("compiles")
}

fn pick(
    routes: &[Route],
    method: &str,
    p: &str,
    query: Option<&str>,
    headers: &[(&'static str, &str)],
) -> Option<String> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, v.parse().unwrap());
    }
    let request =
        RouteRequest { method, path: p, query, host: "web.demo.svc.cluster.local:80", headers: &map };
    select(routes, WEB, 80, &request).map(|m| m.rule.backends[0].service.clone())
}

#[test]
fn the_most_specific_match_wins() {
    let routes = vec![route(
        "a",
        "2026-01-01T00:00:00Z",
        vec![
            rule(vec![path(PathMatchKind::PathPrefix, "/")], "root"),
            rule(vec![path(PathMatchKind::PathPrefix, "/api")], "api"),
            rule(vec![path(PathMatchKind::Exact, "/api/exact")], "exact"),
            rule(vec![path(PathMatchKind::RegularExpression, "/re/[0-9]+")], "regex"),
            rule(
                vec![HttpRouteMatch {
                    headers: vec![ValueMatch { name: "x-canary".into(), value: "1".into(), regex: false }],
                    ..path(PathMatchKind::PathPrefix, "/api")
                }],
                "canary",
            ),
            rule(
                vec![HttpRouteMatch { method: "POST".into(), ..path(PathMatchKind::PathPrefix, "/api") }],
                "post",
            ),
            rule(
                vec![HttpRouteMatch {
                    query_params: vec![ValueMatch { name: "v".into(), value: "2".into(), regex: false }],
                    ..path(PathMatchKind::PathPrefix, "/q")
                }],
                "query",
            ),
        ],
    )];
    let r = |m, p, q, h| pick(&routes, m, p, q, h).map(|s| s.trim_start_matches("demo/").to_owned());
    assert_eq!(r("GET", "/", None, &[]).as_deref(), Some("root"));
    assert_eq!(r("GET", "/api", None, &[]).as_deref(), Some("api"));
    assert_eq!(r("GET", "/api/x", None, &[]).as_deref(), Some("api"));
    assert_eq!(r("GET", "/apix", None, &[]).as_deref(), Some("root"), "prefixes match whole segments");
    assert_eq!(r("GET", "/api/exact", None, &[]).as_deref(), Some("exact"));
    assert_eq!(r("GET", "/re/42", None, &[]).as_deref(), Some("regex"));
    assert_eq!(r("GET", "/re/4x", None, &[]).as_deref(), Some("root"), "regexes match the whole path");
    assert_eq!(r("POST", "/api/x", None, &[]).as_deref(), Some("post"), "a method beats no method");
    assert_eq!(r("GET", "/api/x", None, &[("x-canary", "1")]).as_deref(), Some("canary"));
    assert_eq!(r("GET", "/q", Some("a=1&v=2"), &[]).as_deref(), Some("query"));
    assert_eq!(r("GET", "/q", Some("v=3"), &[]).as_deref(), Some("root"));
}

#[test]
fn ties_go_to_the_oldest_route_and_unattached_routes_are_ignored() {
    let routes = vec![
        route("young", "2026-02-01T00:00:00Z", vec![rule(vec![], "young")]),
        route("old", "2026-01-01T00:00:00Z", vec![rule(vec![], "old")]),
    ];
    assert_eq!(pick(&routes, "GET", "/", None, &[]).as_deref(), Some("demo/old"));
    let map = HeaderMap::new();
    let request = RouteRequest { method: "GET", path: "/", query: None, host: "x", headers: &map };
    assert!(select(&routes, WEB, 81, &request).is_none(), "another port");
    assert!(select(&routes, "demo/other.demo.svc.cluster.local", 80, &request).is_none());
}

#[test]
fn weighted_backends_split_by_weight_and_zero_gets_nothing() {
    let rule = RouteRule {
        backends: vec![
            Backend { service: "demo/v1".into(), port: 80, weight: 90 },
            Backend { service: "demo/zero".into(), port: 80, weight: 0 },
            Backend { service: "demo/v2".into(), port: 80, weight: 10 },
        ],
        request_headers: HeaderChanges::default(),
        response_headers: HeaderChanges::default(),
        request_timeout: None,
        backend_request_timeout: None,
        retry: None,
    };
    let mut counts = std::collections::BTreeMap::new();
    let steps = 10_000u64;
    for i in 0..steps {
        let roll = (i * (u64::from(u32::MAX) + 1) / steps) as u32;
        *counts.entry(rule.pick_backend(roll).unwrap().service.clone()).or_insert(0u64) += 1;
    }
    assert!(counts["demo/v1"].abs_diff(9_000) <= 1, "{counts:?}");
    assert!(counts["demo/v2"].abs_diff(1_000) <= 1, "{counts:?}");
    assert!(!counts.contains_key("demo/zero"));
    assert_eq!(rule.pick_backend(u32::MAX).unwrap().service, "demo/v2");
    let none = RouteRule { backends: vec![Backend { service: "demo/z".into(), port: 0, weight: 0 }], ..rule };
    assert!(none.pick_backend(7).is_none());
}

#[test]
fn header_changes_retries_and_timeouts_compile() {
    let compiled = Route::compile(&HttpRoute {
        name: "r".into(),
        namespace: "demo".into(),
        parents: vec![RouteParent { service: WEB.into(), port: 0 }],
        rules: vec![HttpRouteRule {
            request_headers: Some(HeaderModifier {
                set: vec![Header { name: "x-set".into(), value: "1".into() }],
                add: vec![Header { name: "x-add".into(), value: "2".into() }],
                remove: vec!["x-gone".into()],
            }),
            request_timeout_ms: 500,
            retry: Some(RetryPolicy {
                attempts: 2,
                codes: vec![503],
                backoff_ms: 10,
                retry_non_idempotent: false,
            }),
            ..Default::default()
        }],
        ..Default::default()
    })
    .expect("compiles");
    assert!(compiled.attaches_to(WEB, 8080), "port 0: every port");
    let rule = &compiled.rules[0].1;
    let mut headers = HeaderMap::new();
    headers.insert("x-set", "0".parse().unwrap());
    headers.insert("x-add", "1".parse().unwrap());
    headers.insert("x-gone", "1".parse().unwrap());
    rule.request_headers.apply(&mut headers);
    assert_eq!(headers["x-set"], "1");
    assert_eq!(headers.get_all("x-add").iter().count(), 2);
    assert!(!headers.contains_key("x-gone"));
    assert_eq!(rule.request_timeout, Some(Duration::from_millis(500)));
    let retry = rule.retry.as_ref().expect("retry");
    assert!(retry.retries_status(503) && !retry.retries_status(500));
    assert!(retry.may_retry(&Method::GET, false));
    assert!(retry.may_retry(&Method::POST, false), "no body: nothing was consumed");
    assert!(!retry.may_retry(&Method::POST, true), "a POST with a body is not repeated");

    let bad = Route::compile(&HttpRoute {
        name: "r".into(),
        namespace: "demo".into(),
        rules: vec![rule_with_bad_regex()],
        ..Default::default()
    })
    .expect_err("refused");
    assert!(bad.to_string().contains("rules[0].matches[0].path.value"), "{bad}");
}

fn rule_with_bad_regex() -> HttpRouteRule {
    HttpRouteRule { matches: vec![path(PathMatchKind::RegularExpression, "(")], ..Default::default() }
}
