//! Gateway API HTTPRoute matching and precedence, weighting, header changes, retries, errors.

use http::HeaderMap;
use mesh_api::workload::v1::{
    BackendRef, HttpRouteMatch, PathMatch as ProtoPath, PathMatchKind, RetryPolicy, RouteParent, ValueMatch,
};

use super::*;

const WEB: &str = "demo/web.demo.svc.cluster.local";

fn path(kind: PathMatchKind, value: &str) -> HttpRouteMatch {
    HttpRouteMatch { path: Some(ProtoPath { kind: kind.into(), value: value.into() }), ..Default::default() }
}

fn prefix(value: &str) -> HttpRouteMatch {
    path(PathMatchKind::PathPrefix, value)
}

fn value(name: &str, value: &str, regex: bool) -> ValueMatch {
    ValueMatch { name: name.into(), value: value.into(), regex }
}

/// A rule whose backend is named `to`, so tests can see which rule took a request.
fn rule(matches: Vec<HttpRouteMatch>, to: &str) -> HttpRouteRule {
    HttpRouteRule {
        matches,
        backends: vec![BackendRef { service: format!("demo/{to}"), port: 80, weight: 1 }],
        ..Default::default()
    }
}

fn http_route(name: &str, created: &str, rules: Vec<HttpRouteRule>) -> HttpRoute {
    HttpRoute {
        name: name.into(),
        namespace: "demo".into(),
        parents: vec![RouteParent { service: WEB.into(), port: 80 }],
        rules,
        created: created.into(),
        ..Default::default()
    }
}

fn route(name: &str, created: &str, rules: Vec<HttpRouteRule>) -> Route {
    Route::compile(&http_route(name, created, rules)).expect("compiles")
}

#[derive(Clone, Copy)]
struct Req<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    host: &'a str,
    headers: &'a [(&'static str, &'a str)],
}

fn get(path: &str) -> Req<'_> {
    Req { method: "GET", path, query: None, host: "web.demo.svc.cluster.local:80", headers: &[] }
}

/// The backend (without `demo/`) of the rule that takes the request, if any.
fn pick(routes: &[Route], req: Req<'_>) -> Option<String> {
    let mut headers = HeaderMap::new();
    for (k, v) in req.headers {
        headers.append(*k, v.parse().unwrap());
    }
    let request = RouteRequest {
        method: req.method,
        path: req.path,
        query: req.query,
        host: req.host,
        headers: &headers,
    };
    let m = select(routes, WEB, 80, "demo", &request)?;
    Some(m.rule.backends.first().map_or("(parent)", |b| b.service.trim_start_matches("demo/")).to_owned())
}

#[test]
fn the_most_specific_match_wins() {
    let routes = vec![route(
        "a",
        "2026-01-01T00:00:00Z",
        vec![
            rule(vec![prefix("/")], "root"),
            rule(vec![prefix("/api")], "api"),
            rule(vec![prefix("/api/v1/")], "v1"),
            rule(vec![path(PathMatchKind::Exact, "/api/exact")], "exact"),
            rule(vec![path(PathMatchKind::RegularExpression, "/(re|api)/[0-9]+")], "regex"),
            rule(
                vec![HttpRouteMatch { headers: vec![value("x-canary", "1", false)], ..prefix("/api") }],
                "canary",
            ),
            rule(
                vec![HttpRouteMatch {
                    headers: vec![value("x-canary", "1", false), value("x-team", "a", false)],
                    ..prefix("/api")
                }],
                "canary-a",
            ),
            rule(vec![HttpRouteMatch { method: "POST".into(), ..prefix("/api") }], "post"),
            rule(
                vec![HttpRouteMatch { query_params: vec![value("v", "2", false)], ..prefix("/q") }],
                "query",
            ),
            rule(
                vec![HttpRouteMatch {
                    query_params: vec![value("v", "2", false), value("w", "3", false)],
                    ..prefix("/q")
                }],
                "query2",
            ),
            rule(
                vec![HttpRouteMatch { headers: vec![value("x-h", "1", false)], ..prefix("/q") }],
                "header-beats-query",
            ),
        ],
    )];
    let canary = [("x-canary", "1")];
    let canary_a = [("x-canary", "1"), ("x-team", "a")];
    let both = [("x-h", "1")];
    for (req, want) in [
        (get("/"), "root"),
        (get("/other"), "root"),
        (get("/api"), "api"),
        (get("/api/x"), "api"),
        (get("/apix"), "root"),
        (get("/api/v1"), "v1"),
        (get("/api/v1/users"), "v1"),
        (get("/api/v10"), "api"),
        (get("/api/exact"), "exact"),
        (get("/api/exact/"), "api"),
        (get("/re/42"), "regex"),
        (get("/re/4x"), "root"),
        (get("/api/42"), "api"),
        (Req { method: "POST", ..get("/api/x") }, "post"),
        (Req { method: "post", ..get("/api/x") }, "api"),
        (Req { headers: &canary, ..get("/api/x") }, "canary"),
        (Req { headers: &canary_a, ..get("/api/x") }, "canary-a"),
        (Req { method: "POST", headers: &canary, ..get("/api/x") }, "post"),
        (Req { query: Some("a=1&v=2"), ..get("/q") }, "query"),
        (Req { query: Some("w=3&v=2"), ..get("/q") }, "query2"),
        (Req { query: Some("v=3"), ..get("/q") }, "root"),
        (Req { query: Some("v=2&w=3"), headers: &both, ..get("/q") }, "header-beats-query"),
    ] {
        assert_eq!(
            pick(&routes, req).as_deref(),
            Some(want),
            "{} {}?{:?} {:?}",
            req.method,
            req.path,
            req.query,
            req.headers
        );
    }
}

#[test]
fn headers_and_query_match_exactly_or_by_whole_regex() {
    let routes = vec![route(
        "a",
        "",
        vec![
            rule(vec![], "default"),
            rule(
                vec![HttpRouteMatch { headers: vec![value("X-Version", "v[0-9]", true)], ..prefix("/") }],
                "regex",
            ),
            rule(
                vec![HttpRouteMatch { headers: vec![value("x-list", "a,b", false)], ..prefix("/") }],
                "joined",
            ),
            rule(
                vec![HttpRouteMatch { query_params: vec![value("id", "[0-9]+", true)], ..prefix("/") }],
                "id",
            ),
        ],
    )];
    for (headers, query, want) in [
        (&[("x-version", "v2")][..], None, "regex"),
        (&[("x-version", "v22")][..], None, "default"),
        (&[("x-version", "xv2")][..], None, "default"),
        (&[("x-list", "a"), ("x-list", "b")][..], None, "joined"),
        (&[("x-list", "a")][..], None, "default"),
        (&[][..], Some("id=123"), "id"),
        (&[][..], Some("id=12a"), "default"),
        (&[][..], Some("ID=1"), "default"),
        (&[][..], Some("id=1&id=x"), "id"),
        (&[][..], Some("id=x&id=1"), "default"),
    ] {
        assert_eq!(
            pick(&routes, Req { headers, query, ..get("/") }).as_deref(),
            Some(want),
            "{headers:?} {query:?}"
        );
    }
}

#[test]
fn hostnames_filter_and_rank_routes() {
    let with_hosts = |name: &str, hosts: &[&str]| {
        let mut r = http_route(name, "2026-01-01T00:00:00Z", vec![rule(vec![], name)]);
        r.hostnames = hosts.iter().map(|h| (*h).to_owned()).collect();
        Route::compile(&r).expect("compiles")
    };
    let routes = vec![
        with_hosts("any", &[]),
        with_hosts("wild", &["*.example.com"]),
        with_hosts("deeper", &["*.api.example.com"]),
        with_hosts("exact", &["www.Example.com"]),
    ];
    for (host, want) in [
        ("WWW.example.com:8080", "exact"),
        ("www.example.com.", "exact"),
        ("a.example.com", "wild"),
        ("a.b.example.com", "wild"),
        ("v1.api.example.com", "deeper"),
        ("example.com", "any"),
        ("other.org", "any"),
    ] {
        assert_eq!(pick(&routes, Req { host, ..get("/") }).as_deref(), Some(want), "{host}");
    }
    // A hostname beats a longer path elsewhere: hostnames rank first.
    let mut longer = http_route("path", "2025-01-01T00:00:00Z", vec![rule(vec![prefix("/api")], "path")]);
    longer.parents[0].port = 0;
    let routes = vec![with_hosts("exact", &["www.example.com"]), Route::compile(&longer).unwrap()];
    assert_eq!(pick(&routes, Req { host: "www.example.com", ..get("/api") }).as_deref(), Some("exact"));
    assert_eq!(pick(&routes, Req { host: "else.example.com", ..get("/api") }).as_deref(), Some("path"));
    assert_eq!(pick(&[with_hosts("wild", &["*.example.com"])], Req { host: "x.org", ..get("/") }), None);
}

#[test]
fn ties_go_to_the_oldest_route_then_the_name_then_rule_order() {
    let one = |name: &str, created: &str| route(name, created, vec![rule(vec![], name)]);
    for (routes, want) in [
        (vec![one("young", "2026-02-01T00:00:00Z"), one("old", "2026-01-01T00:00:00Z")], "old"),
        // 01:00+02:00 is 23:00 the day before.
        (vec![one("utc", "2026-01-01T00:00:00Z"), one("offset", "2026-01-01T01:00:00+02:00")], "offset"),
        (vec![one("frac", "2026-01-01T00:00:00.5Z"), one("whole", "2026-01-01T00:00:00Z")], "whole"),
        (vec![one("unknown", ""), one("known", "2026-06-01T00:00:00Z")], "known"),
        (vec![one("b", "2026-01-01T00:00:00Z"), one("a", "2026-01-01T00:00:00Z")], "a"),
    ] {
        assert_eq!(pick(&routes, get("/")).as_deref(), Some(want));
    }
    let routes =
        vec![route("r", "", vec![rule(vec![prefix("/x")], "first"), rule(vec![prefix("/x")], "second")])];
    let m = {
        let headers = HeaderMap::new();
        let request = RouteRequest { method: "GET", path: "/x", query: None, host: "h", headers: &headers };
        select(&routes, WEB, 80, "demo", &request).map(|m| (m.route.key().to_owned(), m.rule_index))
    };
    assert_eq!(m, Some(("demo/r".to_owned(), 0)));
}

#[test]
fn routes_attach_to_their_parents_only() {
    let mut all_ports = http_route("r", "", vec![]);
    all_ports.parents = vec![RouteParent { service: WEB.into(), port: 0 }];
    let all_ports = Route::compile(&all_ports).unwrap();
    assert!(all_ports.attaches_to(WEB, 80) && all_ports.attaches_to(WEB, 8080));
    assert!(!all_ports.attaches_to("demo/other.demo.svc.cluster.local", 80));
    let one_port = route("r", "", vec![]);
    assert!(one_port.attaches_to(WEB, 80) && !one_port.attaches_to(WEB, 81));
    // No rules: Gateway API's default rule sends everything to the parent.
    assert_eq!(one_port.rules().len(), 1);
    assert_eq!(pick(std::slice::from_ref(&one_port), get("/anything")).as_deref(), Some("(parent)"));
    let headers = HeaderMap::new();
    let request = RouteRequest { method: "GET", path: "/", query: None, host: "x", headers: &headers };
    assert!(select(std::slice::from_ref(&one_port), WEB, 81, "demo", &request).is_none(), "another port");
    assert!(select(&[], WEB, 80, "demo", &request).is_none());
}

#[test]
fn a_route_from_another_namespace_reroutes_only_its_own_namespace_clients() {
    // `demo/web` has a producer route (same namespace) to v1, and a consumer route from
    // namespace `team` sends to `team/mirror`.
    let producer = route("producer", "2026-01-01T00:00:00Z", vec![rule(vec![prefix("/")], "v1")]);
    let mut consumer =
        http_route("consumer", "2025-01-01T00:00:00Z", vec![rule(vec![prefix("/")], "mirror")]);
    consumer.namespace = "team".into();
    consumer.rules[0].backends[0].service = "team/mirror".into();
    let consumer = Route::compile(&consumer).expect("compiles");
    let routes = [producer, consumer];
    let headers = HeaderMap::new();
    let request = RouteRequest { method: "GET", path: "/", query: None, host: "web", headers: &headers };
    let chosen = |from: &str| select(&routes, WEB, 80, from, &request).map(|m| m.route.key().to_owned());
    assert_eq!(chosen("demo").as_deref(), Some("demo/producer"), "the service's own namespace");
    assert_eq!(chosen("other").as_deref(), Some("demo/producer"), "any other client: the producer route");
    assert_eq!(
        chosen("team").as_deref(),
        Some("team/consumer"),
        "team's clients: its own (older, equally specific) route applies to them"
    );
    assert!(
        select(&routes[1..], WEB, 80, "demo", &request).is_none(),
        "never team's route for demo's clients"
    );
}

#[test]
fn a_route_sends_only_to_its_namespace_or_its_parents() {
    let mut consumer = http_route("consumer", "", vec![]);
    consumer.namespace = "team".into();
    let consumer = Route::compile(&consumer).expect("compiles");
    assert!(consumer.may_send_to("team/mirror.team.svc.cluster.local"), "its own namespace");
    assert!(consumer.may_send_to(WEB), "the Service it attaches to");
    assert!(
        !consumer.may_send_to("demo/db.demo.svc.cluster.local"),
        "another of demo's: needs a ReferenceGrant"
    );
    assert!(!consumer.may_send_to("bank/payments.bank.svc.cluster.local"));
}

fn backends(weights: &[u32]) -> RouteRule {
    let backends = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Backend { service: format!("demo/b{i}"), port: 0, weight: *w })
        .collect();
    RouteRule { backends, ..Default::default() }
}

#[test]
fn weighted_backends_split_by_weight_and_zero_gets_nothing() {
    let rule = backends(&[90, 0, 10]);
    let mut counts = std::collections::BTreeMap::new();
    let steps = 10_000u64;
    for i in 0..steps {
        // The middle of each of `steps` equal slices of the roll space.
        let roll = u32::try_from((2 * i + 1) * (1 << 32) / (2 * steps)).unwrap();
        *counts.entry(rule.pick_backend(roll).unwrap().service.clone()).or_insert(0u64) += 1;
    }
    assert_eq!(counts.get("demo/b0"), Some(&9_000), "{counts:?}");
    assert_eq!(counts.get("demo/b2"), Some(&1_000), "{counts:?}");
    assert!(!counts.contains_key("demo/b1"), "weight 0 receives nothing");

    let name = |rule: &RouteRule, roll: u32| rule.pick_backend(roll).map(|b| b.service.clone());
    assert_eq!(name(&rule, 0).as_deref(), Some("demo/b0"));
    assert_eq!(name(&rule, u32::MAX).as_deref(), Some("demo/b2"));
    let halves = backends(&[1, 1]);
    assert_eq!(name(&halves, (1 << 31) - 1).as_deref(), Some("demo/b0"));
    assert_eq!(name(&halves, 1 << 31).as_deref(), Some("demo/b1"));
    let leading_zero = backends(&[0, 5]);
    assert_eq!(name(&leading_zero, 0).as_deref(), Some("demo/b1"));
    let huge = backends(&[u32::MAX, u32::MAX]);
    assert_eq!(name(&huge, u32::MAX).as_deref(), Some("demo/b1"), "weights sum past u32");
    assert_eq!(name(&backends(&[3]), 12345).as_deref(), Some("demo/b0"));
    assert!(backends(&[0, 0]).pick_backend(7).is_none(), "all zero: the caller answers 500");
    assert!(backends(&[]).pick_backend(7).is_none(), "none: the caller uses the parent");
}

#[test]
fn header_changes_apply_remove_then_set_then_add() {
    let changes = HeaderChanges::compile(
        "demo/r",
        "f",
        Some(&HeaderModifier {
            set: vec![
                Header { name: "x-set".into(), value: "1".into() },
                Header { name: "x-both".into(), value: "kept".into() },
            ],
            add: vec![Header { name: "X-Add".into(), value: "2".into() }],
            remove: vec!["x-gone".into(), "x-both".into()],
        }),
    )
    .unwrap();
    assert!(!changes.is_empty() && HeaderChanges::default().is_empty());
    let mut headers = HeaderMap::new();
    headers.append("x-set", "0".parse().unwrap());
    headers.append("x-set", "0b".parse().unwrap());
    headers.insert("x-add", "1".parse().unwrap());
    headers.insert("x-gone", "1".parse().unwrap());
    headers.insert("x-both", "old".parse().unwrap());
    headers.insert("x-other", "1".parse().unwrap());
    changes.apply(&mut headers);
    assert_eq!(headers.get_all("x-set").iter().collect::<Vec<_>>(), ["1"]);
    assert_eq!(headers.get_all("x-add").iter().collect::<Vec<_>>(), ["1", "2"]);
    assert!(!headers.contains_key("x-gone"));
    assert_eq!(headers["x-both"], "kept");
    assert_eq!(headers["x-other"], "1");
}

#[test]
fn retries_repeat_only_what_is_safe() {
    let retry = |non_idempotent| Retry {
        attempts: 2,
        codes: vec![502, 503],
        backoff: Duration::from_millis(10),
        retry_non_idempotent: non_idempotent,
    };
    assert!(retry(false).retries_status(503) && !retry(false).retries_status(500));
    for (method, body, flag, want) in [
        (Method::GET, false, false, true),
        (Method::HEAD, false, false, true),
        (Method::OPTIONS, true, false, true),
        (Method::TRACE, false, false, true),
        (Method::PUT, true, false, true),
        (Method::DELETE, true, false, true),
        (Method::POST, false, false, true),
        (Method::POST, true, false, false),
        (Method::POST, true, true, true),
        (Method::PATCH, true, false, false),
        (Method::PATCH, true, true, true),
        (Method::CONNECT, true, false, false),
    ] {
        assert_eq!(retry(flag).may_retry(&method, body), want, "{method} body={body} flag={flag}");
    }
}

#[test]
fn rules_carry_timeouts_and_retries() {
    let r = Route::compile(&http_route(
        "r",
        "",
        vec![
            HttpRouteRule {
                request_timeout_ms: 500,
                backend_request_timeout_ms: 200,
                retry: Some(RetryPolicy {
                    attempts: 2,
                    codes: vec![503],
                    backoff_ms: 10,
                    retry_non_idempotent: true,
                }),
                ..Default::default()
            },
            HttpRouteRule {
                retry: Some(RetryPolicy { attempts: 0, codes: vec![503], ..Default::default() }),
                ..Default::default()
            },
        ],
    ))
    .unwrap();
    let first = &r.rules()[0];
    assert_eq!(first.request_timeout, Some(Duration::from_millis(500)));
    assert_eq!(first.backend_request_timeout, Some(Duration::from_millis(200)));
    let retry = first.retry.as_ref().unwrap();
    assert_eq!(
        (retry.attempts, retry.codes.as_slice(), retry.backoff),
        (2, &[503][..], Duration::from_millis(10))
    );
    assert!(retry.retry_non_idempotent);
    let second = &r.rules()[1];
    assert!(second.request_timeout.is_none() && second.backend_request_timeout.is_none());
    assert!(second.retry.is_none(), "0 attempts: no retries");
    assert!(second.backends.is_empty() && second.request_headers.is_empty());
}

#[test]
fn invalid_routes_are_refused_naming_the_field() {
    let with_rule = |rule: HttpRouteRule| http_route("r", "", vec![HttpRouteRule::default(), rule]);
    let with_match =
        |m: HttpRouteMatch| with_rule(HttpRouteRule { matches: vec![prefix("/"), m], ..Default::default() });
    let modifier = |h: Header| HttpRouteRule {
        request_headers: Some(HeaderModifier { set: vec![h], ..Default::default() }),
        ..Default::default()
    };
    let backend = |service: &str, port| HttpRouteRule {
        backends: vec![BackendRef { service: service.into(), port, weight: 1 }],
        ..Default::default()
    };
    let cases: Vec<(HttpRoute, &str, &str)> = vec![
        (
            with_match(path(PathMatchKind::RegularExpression, "(")),
            "rules[1].matches[1].path.value",
            "unclosed group",
        ),
        (
            with_match(path(PathMatchKind::RegularExpression, "")),
            "rules[1].matches[1].path.value",
            "must not be empty",
        ),
        (with_match(path(PathMatchKind::Exact, "api")), "rules[1].matches[1].path.value", "must start with"),
        (
            with_match(HttpRouteMatch {
                path: Some(ProtoPath { kind: 9, value: "/".into() }),
                ..Default::default()
            }),
            "rules[1].matches[1].path.type",
            "unknown enum",
        ),
        (
            with_match(HttpRouteMatch { headers: vec![value("x", "[", true)], ..Default::default() }),
            "rules[1].matches[1].headers[0].value",
            "invalid regular expression",
        ),
        (
            with_match(HttpRouteMatch { headers: vec![value("bad name", "1", false)], ..Default::default() }),
            "rules[1].matches[1].headers[0].name",
            "not a valid header name",
        ),
        (
            with_match(HttpRouteMatch { query_params: vec![value("", "1", false)], ..Default::default() }),
            "rules[1].matches[1].queryParams[0].name",
            "must not be empty",
        ),
        (
            with_match(HttpRouteMatch { query_params: vec![value("q", "(", true)], ..Default::default() }),
            "rules[1].matches[1].queryParams[0].value",
            "invalid regular expression",
        ),
        (
            with_match(HttpRouteMatch { method: "get".into(), ..Default::default() }),
            "rules[1].matches[1].method",
            "not an HTTP method",
        ),
        (
            with_rule(modifier(Header { name: "bad name".into(), value: "1".into() })),
            "rules[1].filters.requestHeaderModifier.set[0].name",
            "not a valid header name",
        ),
        (
            with_rule(modifier(Header { name: "x".into(), value: "a\nb".into() })),
            "rules[1].filters.requestHeaderModifier.set[0].value",
            "not a valid header value",
        ),
        (
            with_rule(HttpRouteRule {
                response_headers: Some(HeaderModifier { remove: vec![String::new()], ..Default::default() }),
                ..Default::default()
            }),
            "rules[1].filters.responseHeaderModifier.remove[0]",
            "not a valid header name",
        ),
        (with_rule(backend("web", 80)), "rules[1].backendRefs[0]", "is not \"<namespace>/<hostname>\""),
        (with_rule(backend("demo/", 80)), "rules[1].backendRefs[0]", "is not \"<namespace>/<hostname>\""),
        (with_rule(backend("demo/web", 70000)), "rules[1].backendRefs[0].port", "outside 0-65535"),
        (
            with_rule(HttpRouteRule {
                retry: Some(RetryPolicy { attempts: 1, codes: vec![503, 600], ..Default::default() }),
                ..Default::default()
            }),
            "rules[1].retry.codes[1]",
            "outside 100-599",
        ),
        (
            with_rule(HttpRouteRule {
                request_timeout_ms: 100,
                backend_request_timeout_ms: 200,
                ..Default::default()
            }),
            "rules[1].timeouts.backendRequest",
            "longer than the request timeout",
        ),
        (
            HttpRoute {
                parents: vec![RouteParent { service: "nope".into(), port: 80 }],
                ..http_route("r", "", vec![])
            },
            "parentRefs[0]",
            "<namespace>/<hostname>",
        ),
        (
            HttpRoute {
                parents: vec![RouteParent { service: WEB.into(), port: 65536 }],
                ..http_route("r", "", vec![])
            },
            "parentRefs[0].port",
            "outside 0-65535",
        ),
        (
            HttpRoute { hostnames: vec!["a.*.com".into()], ..http_route("r", "", vec![]) },
            "hostnames[0]",
            "not a hostname",
        ),
        (
            HttpRoute { hostnames: vec![String::new()], ..http_route("r", "", vec![]) },
            "hostnames[0]",
            "not a hostname",
        ),
    ];
    for (r, field, problem) in cases {
        let err = Route::compile(&r).expect_err(field);
        assert_eq!((err.object(), err.field()), ("demo/r", field), "{err}");
        assert!(err.to_string().contains(problem), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
