//! End-to-end: L7 in the node proxies, over mTLS (HBONE) between the meshed pods of a two-node
//! topology, with real clients (curl, pod-app http-client, raw TCP) and pod-app HTTP servers.
//!
//! Authorization (`nodemesh.io/v1alpha1` AuthorizationPolicy, Istio's semantics) is enforced
//! by the destination's node: a denied request gets a 403 whose body names the policy.
//! Routing (Gateway API HTTPRoute attached to a Service, GAMMA) happens on the source's node
//! for connections to a Service's cluster IP. Cluster IPs are in 10.96.0.0/16, which no
//! namespace routes: the connect4 program rewrites the destination at connect() time, so no
//! route is needed (the pods have a default route anyway).
//!
//! Every object a test needs is written into mesh-control's config directory before the mesh
//! starts, so the first configuration the nodes receive already holds it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use nodemesh_testbed::{
    HttpReport, NodeId, RawReport, ServerHandle, Topology, eventually,
    http_app::raw,
    objects::{self, policy, route},
    prometheus,
};

/// Where every pod-app HTTP server listens (the Services' target port).
const APP: u16 = 8080;
/// The cluster IP of the Service the routing tests call.
const WEB_VIP: &str = "10.96.0.10";

/// Builds the topology, labels pods (`pod`, `key: value`), writes the config objects (`name`,
/// YAML) and starts the mesh (mesh-control and both nodes, certificates issued).
fn meshed(test: &str, labels: &[(&str, &str)], config: &[(&str, String)]) -> Topology {
    let mut topology = Topology::build(test).expect("topology");
    for (pod, label) in labels {
        topology.label(pod, label).expect("label");
    }
    for (name, yaml) in config {
        topology.write_config(name, yaml).expect("config");
    }
    topology
        .start_meshed(&[])
        .unwrap_or_else(|e| panic!("{e:#}\nmesh-control log:\n{}", mesh_control_log(&topology)));
    assert_taken_as_written(&topology);
    topology
}

/// Fails unless mesh-control took every policy and route as written (`/policies`, `/routes`):
/// a test whose objects were not accepted would test something else than it says.
fn assert_taken_as_written(topology: &Topology) {
    let admin = |path: &str| -> serde_json::Value {
        let body = topology.control_admin(path).unwrap_or_else(|e| panic!("mesh-control {path}: {e:#}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("mesh-control {path}: {e}: {body}"))
    };
    let policies = admin("/policies");
    assert_eq!(policies["served"], true, "{policies}");
    for policy in policies["policies"].as_array().into_iter().flatten() {
        assert_eq!(policy["accepted"]["status"], true, "policy not accepted: {policy}");
    }
    let routes = admin("/routes");
    assert_eq!(routes["served"], true, "{routes}");
    for route in routes["routes"].as_array().into_iter().flatten() {
        assert_eq!(route["distributed"], true, "route not distributed: {route}");
        for parent in route["parents"].as_array().into_iter().flatten() {
            assert_eq!(parent["accepted"]["status"], true, "route parent not accepted: {route}");
            assert_eq!(parent["resolved_refs"]["status"], true, "route backends not resolved: {route}");
        }
    }
}

fn mesh_control_log(topology: &Topology) -> String {
    std::fs::read_to_string(topology.state_dir().join("mesh-control.log")).unwrap_or_default()
}

// ---- the objects the tests write ---------------------------------------------------------

/// A Service in `demo` whose ports all declare `appProtocol: http` (see [`objects::service`]).
fn service(
    name: &str,
    vip: &str,
    selector: &[&str],
    ports: &[(u16, u16)],
    annotations: &[(&str, &str)],
) -> String {
    objects::service(name, vip, selector, ports, "http", annotations)
}

/// The Service `b1` (all of b1's HTTP port), so both nodes know the port speaks HTTP even
/// without sniffing it.
fn b1_service() -> (&'static str, String) {
    ("b1-service", service("b1", "10.96.0.2", &["app: b1"], &[(APP, APP)], &[]))
}

/// `web` (b1 and b2), `web-v1` (b1) and `web-v2` (b2), all port 80 → 8080.
fn web_services() -> Vec<(&'static str, String)> {
    vec![
        ("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[])),
        ("web-v1", service("web-v1", "10.96.0.11", &["app: web", "version: v1"], &[(80, APP)], &[])),
        ("web-v2", service("web-v2", "10.96.0.12", &["app: web", "version: v2"], &[(80, APP)], &[])),
    ]
}

const WEB_LABELS: [(&str, &str); 4] =
    [("b1", "app: web"), ("b1", "version: v1"), ("b2", "app: web"), ("b2", "version: v2")];

// ---- clients -----------------------------------------------------------------------------

fn pod_url(topology: &Topology, pod: &str, path: &str) -> String {
    format!("http://{}:{APP}{path}", topology.pod(pod).ip)
}

fn web_url(path: &str) -> String {
    format!("http://{WEB_VIP}{path}")
}

/// Runs pod-app http-client in `from` against `url` with `args`; unless `args` say otherwise,
/// a request may take 3 s and the run 20 s, so a broken data path fails the test promptly.
fn http(topology: &Topology, from: &str, url: &str, args: &[&str]) -> HttpReport {
    let mut all = vec!["--url", url];
    all.extend_from_slice(args);
    for (flag, default) in [("--timeout-ms", "3000"), ("--deadline-ms", "20000")] {
        if !args.contains(&flag) {
            all.extend([flag, default]);
        }
    }
    topology.http_client(from, &all).expect("http-client")
}

/// Polls `read` for up to 5 s until it returns `want`; returns the last value read.
fn settle<T: PartialEq>(want: &T, mut read: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = read();
        if got == *want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- the control: the tools without the mesh ---------------------------------------------

/// What the L7 tests read is right before the mesh is involved: between pods with no
/// mesh-node at all, curl and pod-app's client and server work, keep-alive and h2c hold one
/// connection, and a raw smuggling attempt does fool the lenient server (so the smuggling test
/// below would see a proxy that forwards such requests as they are).
#[test]
fn without_the_mesh_the_tools_reach_pods_directly_and_smuggling_fools_a_lenient_server() {
    let topology = Topology::build("l7_tools_control").expect("topology");
    let server = topology.http_serve("b1", APP, &[]).expect("server");
    let by_length = topology.http_serve("b1", 8081, &["--framing", "first-content-length"]).expect("server");

    let curl =
        topology.curl("a1", &["-H", "x-canary: 1", &pod_url(&topology, "b1", "/x?y=1")]).expect("curl");
    assert_eq!((curl.status, curl.header("x-server")), (200, Some("b1")), "{curl:?}");
    let seen: serde_json::Value = serde_json::from_str(&curl.body).expect("pod-app's JSON");
    assert_eq!(seen["peer"].as_str().and_then(|p| p.split(':').next()), Some("10.1.1.2"), "{seen}");
    assert_eq!((seen["path"].as_str(), seen["headers"]["x-canary"].as_str()), (Some("/x"), Some("1")));

    let keep_alive = http(&topology, "a1", &pod_url(&topology, "b1", "/"), &["--requests", "100"]);
    assert!(keep_alive.all(200) && keep_alive.connections_opened == 1, "{keep_alive:?}");
    let h2 = http(
        &topology,
        "a2",
        &pod_url(&topology, "b1", "/"),
        &["--http2", "--requests", "100", "--concurrency", "10"],
    );
    assert!(h2.all(200) && h2.connections_opened == 1, "{h2:?}");
    assert_eq!(h2.server_versions.get("HTTP/2.0"), Some(&100), "{h2:?}");
    let stats = topology.http_stats(&server).expect("stats");
    assert_eq!((stats.requests, stats.path("/x")), (201, 1), "{stats:?}");

    let b1 = SocketAddr::from((topology.pod("b1").ip, 8081));
    let report =
        topology.raw_tcp("a1", b1, raw::two_content_lengths("/first", "web").as_bytes()).expect("raw");
    assert_eq!(report.statuses(), [200, 200], "the lenient server answers the hidden request: {report:?}");
    let stats = topology.http_stats(&by_length).expect("stats");
    assert_eq!(stats.path(raw::SMUGGLED_PATH), 1, "{stats:?}");
}

// ---- authorization -----------------------------------------------------------------------

#[test]
fn an_allow_policy_admits_only_the_methods_and_paths_it_names() {
    let allow = policy(
        "allow-public",
        "b1",
        "ALLOW",
        "  - to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/public*\"]\n",
    );
    let topology = meshed("l7_allow_paths", &[("b1", "app: b1")], &[b1_service(), ("allow-public", allow)]);
    let server = topology.http_serve("b1", APP, &[]).expect("server");

    let public = topology.curl("a1", &[&pod_url(&topology, "b1", "/public/x")]).expect("curl");
    assert_eq!(public.status, 200, "GET /public/x is allowed: {public:?}");
    assert_eq!(public.header("x-server"), Some("b1"), "{public:?}");

    let private = topology.curl("a1", &[&pod_url(&topology, "b1", "/private")]).expect("curl");
    assert_eq!(private.status, 403, "GET /private matches no ALLOW rule: {private:?}");
    assert!(private.body.contains("allow-public"), "the 403 names the policy: {private:?}");

    let post = topology
        .curl("a1", &["-X", "POST", "--data", "x", &pod_url(&topology, "b1", "/public/x")])
        .expect("curl");
    assert_eq!(post.status, 403, "POST is not an allowed method: {post:?}");
    assert!(post.body.contains("allow-public"), "the 403 names the policy: {post:?}");

    let stats = topology.http_stats(&server).expect("stats");
    assert_eq!(stats.path("/public/x"), 1, "only the allowed request reached b1: {stats:?}");
    assert_eq!((stats.path("/private"), stats.requests), (0, 1), "denied requests never reach b1: {stats:?}");
}

#[test]
fn a_deny_policy_on_a_principal_refuses_that_caller_only() {
    let deny = policy(
        "deny-a1",
        "b1",
        "DENY",
        "  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/a1\"]\n",
    );
    let topology = meshed("l7_deny_principal", &[("b1", "app: b1")], &[b1_service(), ("deny-a1", deny)]);
    topology.http_serve("b1", APP, &[]).expect("server");
    let url = pod_url(&topology, "b1", "/");

    let a1 = topology.curl("a1", &[&url]).expect("curl");
    assert_eq!(a1.status, 403, "a1's identity is denied: {a1:?}");
    assert!(a1.body.contains("deny-a1"), "the 403 names the policy: {a1:?}");
    let a2 = topology.curl("a2", &[&url]).expect("curl");
    assert_eq!(a2.status, 200, "a2 is not a1: {a2:?}");
    assert_eq!(a2.header("x-server"), Some("b1"));
}

#[test]
fn deny_wins_when_an_allow_and_a_deny_policy_both_match() {
    let allow = policy(
        "allow-api",
        "b1",
        "ALLOW",
        "  - to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/api/*\"]\n",
    );
    let deny =
        policy("deny-admin", "b1", "DENY", "  - to:\n    - operation:\n        paths: [\"/api/admin*\"]\n");
    let topology = meshed(
        "l7_deny_beats_allow",
        &[("b1", "app: b1")],
        &[b1_service(), ("allow-api", allow), ("deny-admin", deny)],
    );
    topology.http_serve("b1", APP, &[]).expect("server");

    let users = topology.curl("a1", &[&pod_url(&topology, "b1", "/api/users")]).expect("curl");
    assert_eq!(users.status, 200, "only the ALLOW matches: {users:?}");
    let admin = topology.curl("a1", &[&pod_url(&topology, "b1", "/api/admin")]).expect("curl");
    assert_eq!(admin.status, 403, "both match, DENY wins: {admin:?}");
    assert!(admin.body.contains("deny-admin"), "the 403 names the DENY policy: {admin:?}");
}

// ---- routing -----------------------------------------------------------------------------

#[test]
fn a_weighted_route_splits_requests_ninety_ten() {
    let canary = route(
        "web-canary",
        "web",
        "  - backendRefs:\n    - name: web-v1\n      port: 80\n      weight: 90\n    - name: web-v2\n      port: 80\n      weight: 10\n",
    );
    let mut config = web_services();
    config.push(("web-canary", canary));
    let topology = meshed("l7_canary", &WEB_LABELS, &config);
    topology.http_serve("b1", APP, &[]).expect("v1");
    topology.http_serve("b2", APP, &[]).expect("v2");

    const N: u32 = 2000;
    let report = http(&topology, "a1", &web_url("/"), &["--requests", &N.to_string(), "--concurrency", "8"]);
    assert!(report.all(200), "every request answered 200: {report:?}");
    assert_eq!(
        report.served_by("b1") + report.served_by("b2"),
        N,
        "only v1 and v2 answer: {:?}",
        report.servers
    );
    let share = f64::from(report.served_by("b2")) / f64::from(N);
    let sigma = (0.1 * 0.9 / f64::from(N)).sqrt();
    assert!(
        (share - 0.10).abs() <= 4.0 * sigma,
        "v2 got {share:.4} of {N} requests, want 0.10 ± {:.4} (4σ): {:?}",
        4.0 * sigma,
        report.servers
    );
}

#[test]
fn a_header_match_sends_only_marked_requests_to_the_canary() {
    let by_header = route(
        "web-by-header",
        "web",
        "  - matches:\n    - headers:\n      - name: x-canary\n        value: \"1\"\n    backendRefs:\n    - name: web-v2\n      port: 80\n  - backendRefs:\n    - name: web-v1\n      port: 80\n",
    );
    let mut config = web_services();
    config.push(("web-by-header", by_header));
    let topology = meshed("l7_header_match", &WEB_LABELS, &config);
    topology.http_serve("b1", APP, &[]).expect("v1");
    topology.http_serve("b2", APP, &[]).expect("v2");

    let marked = http(&topology, "a1", &web_url("/"), &["--requests", "200", "--header", "x-canary: 1"]);
    assert!(marked.all(200) && marked.served_by("b2") == 200, "x-canary: 1 goes to v2 only: {marked:?}");
    let plain = http(&topology, "a1", &web_url("/"), &["--requests", "200"]);
    assert!(plain.all(200) && plain.served_by("b1") == 200, "the rest goes to v1 only: {plain:?}");
    let other = http(&topology, "a1", &web_url("/"), &["--requests", "50", "--header", "x-canary: 2"]);
    assert!(other.all(200) && other.served_by("b1") == 50, "another value is not a match: {other:?}");
}

#[test]
fn header_modifiers_change_the_request_and_the_response() {
    let modify = route(
        "web-headers",
        "web",
        "  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - name: x-route
          value: web-headers
        remove:
        - x-secret
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add:
        - name: x-served-via
          value: web-route
    backendRefs:
    - name: web
      port: 80
",
    );
    let topology = meshed(
        "l7_header_modifiers",
        &[("b1", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[])), ("web-headers", modify)],
    );
    topology.http_serve("b1", APP, &[]).expect("server");

    let report = http(
        &topology,
        "a1",
        &web_url("/"),
        &["--header", "x-secret: 42", "--header", "x-route: from-client"],
    );
    assert!(report.all(200), "the route's backend answers: {report:?}");
    let response = report.first_response.as_ref().expect("a response");
    assert_eq!(response.header("x-served-via"), Some("web-route"), "response header added: {response:?}");
    let seen: serde_json::Value = serde_json::from_str(&response.body).expect("pod-app's JSON");
    assert_eq!(seen["headers"]["x-route"], "web-headers", "request header set (replaced): {seen}");
    assert!(seen["headers"].get("x-secret").is_none(), "request header removed: {seen}");
}

#[test]
fn a_retry_policy_hides_a_transient_503() {
    let retry = route(
        "web-retry",
        "web",
        "  - backendRefs:\n    - name: web\n      port: 80\n    retry:\n      attempts: 2\n      codes: [503]\n",
    );
    let topology = meshed(
        "l7_retry",
        &[("b1", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[])), ("web-retry", retry)],
    );
    let server = topology.http_serve("b1", APP, &["--fail-first", "1"]).expect("server");

    let report =
        http(&topology, "a1", &web_url("/"), &["--requests", "5", "--header", "x-fail-key: retry-once"]);
    assert!(report.all(200), "the client never sees the 503: {report:?}");
    let stats = topology.http_stats(&server).expect("stats");
    assert_eq!(
        stats.by_fail_key.get("retry-once"),
        Some(&6),
        "b1 saw 5 requests plus the one retry of the first: {stats:?}"
    );
    assert_eq!(stats.responses.get(&503), Some(&1), "{stats:?}");
}

#[test]
fn a_request_timeout_answers_504_in_time() {
    let timeout = route(
        "web-timeout",
        "web",
        "  - backendRefs:\n    - name: web\n      port: 80\n    timeouts:\n      request: 500ms\n",
    );
    let topology = meshed(
        "l7_timeout",
        &[("b1", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[])), ("web-timeout", timeout)],
    );
    let server = topology.http_serve("b1", APP, &["--delay-ms", "3000"]).expect("server");

    let slow = http(&topology, "a1", &web_url("/slow"), &["--timeout-ms", "10000"]);
    assert!(slow.all(504), "a 3 s answer is cut off with 504: {slow:?}");
    let took = slow.latency_ms.max;
    assert!((500.0..=1500.0).contains(&took), "the 504 came after {took:.0} ms, want 500-1500 ms: {slow:?}");
    eventually("b1 saw the /slow request the proxy gave up on", Duration::from_secs(5), || {
        (topology.http_stats(&server).expect("stats").path("/slow") == 1).then_some(())
    });

    let fast = http(&topology, "a1", &web_url("/fast"), &["--header", "x-delay-ms: 0"]);
    assert!(fast.all(200), "a prompt answer is not affected: {fast:?}");
}

#[test]
fn a_failing_endpoint_is_ejected_and_comes_back_after_the_ejection_time() {
    let annotations = [
        ("nodemesh.io/load-balancer", "round-robin"),
        ("nodemesh.io/outlier-consecutive-errors", "3"),
        ("nodemesh.io/outlier-base-ejection", "2s"),
    ];
    let topology = meshed(
        "l7_outlier",
        &[("b1", "app: web"), ("b2", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &annotations))],
    );
    topology.http_serve("b1", APP, &[]).expect("b1");
    let b2 = topology.http_serve("b2", APP, &[]).expect("b2");
    let one_at_a_time = |n: u32| http(&topology, "a1", &web_url("/"), &["--requests", &n.to_string()]);
    let requests_at = |server: &ServerHandle| topology.http_stats(server).expect("stats").requests;

    let healthy = one_at_a_time(20);
    assert!(healthy.all(200), "both endpoints healthy, every request answers 200: {healthy:?}");
    assert!(
        healthy.served_by("b1") >= 5 && healthy.served_by("b2") >= 5,
        "round robin spreads over both endpoints: {:?}",
        healthy.servers
    );

    topology.set_http_status(&b2, 500).expect("b2 fails");
    let started = Instant::now();
    let failing = one_at_a_time(20);
    let failing_took = started.elapsed();
    let ejected_by = Instant::now();
    assert!(
        (1..=3).contains(&failing.count(500)),
        "b2 answers 500 until its third consecutive error ejects it: {:?}",
        failing.statuses
    );

    let before = requests_at(&b2);
    let after_ejection = one_at_a_time(30);
    let quiet_for = ejected_by.elapsed();
    assert!(
        quiet_for < Duration::from_millis(1500),
        "too slow to check within the 2 s ejection: {quiet_for:?}"
    );
    assert!(after_ejection.all(200), "only b1 answers while b2 is ejected: {after_ejection:?}");
    assert_eq!(requests_at(&b2), before, "b2 got no request while ejected: {:?}", after_ejection.servers);

    topology.set_http_status(&b2, 200).expect("b2 recovers");
    let back = loop {
        let waited = ejected_by.elapsed();
        let probe = one_at_a_time(10);
        assert!(probe.all(200), "b2 recovered, nothing fails: {probe:?}");
        if probe.served_by("b2") > 0 {
            break waited;
        }
        assert!(waited < Duration::from_secs(10), "b2 still gets nothing {waited:?} after its ejection");
        std::thread::sleep(Duration::from_millis(200));
    };
    let earliest = Duration::from_secs(2).saturating_sub(failing_took + Duration::from_millis(100));
    assert!(back >= earliest, "b2 came back {back:?} after being ejected for 2 s (earliest {earliest:?})");
}

// ---- connections -------------------------------------------------------------------------

#[test]
fn http1_keep_alive_carries_every_request_on_one_connection() {
    let topology = meshed(
        "l7_keep_alive",
        &[("b1", "app: web"), ("b2", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[]))],
    );
    topology.http_serve("b1", APP, &[]).expect("b1");
    topology.http_serve("b2", APP, &[]).expect("b2");

    let report = http(&topology, "a1", &web_url("/"), &["--requests", "300", "--concurrency", "1"]);
    assert!(report.all(200), "300 requests to the Service, one after another, all answered: {report:?}");
    assert_eq!(report.connections_opened, 1, "the proxy kept the client's connection alive: {report:?}");
    assert!(
        report.served_by("b1") > 0 && report.served_by("b2") > 0,
        "requests on one connection are balanced one by one: {:?}",
        report.servers
    );
}

#[test]
fn max_requests_per_connection_makes_the_proxy_open_a_fresh_upstream_connection() {
    let limited = service(
        "web",
        WEB_VIP,
        &["app: web"],
        &[(80, APP)],
        &[("nodemesh.io/max-requests-per-connection", "2")],
    );
    let topology = meshed("l7_max_requests_per_conn", &[("b1", "app: web")], &[("web", limited)]);
    let server = topology.http_serve("b1", APP, &[]).expect("b1");
    // The server counts every connection, the stats queries' own too (one each).
    let before = topology.http_stats(&server).expect("stats").connections;

    let report = http(&topology, "a1", &web_url("/"), &["--requests", "6", "--concurrency", "1"]);
    assert!(report.all(200), "{report:?}");
    assert_eq!(report.connections_opened, 1, "the client's own connection is kept alive: {report:?}");
    let stats = topology.http_stats(&server).expect("stats");
    assert_eq!(stats.requests, 6, "{stats:?}");
    assert_eq!(
        stats.connections - before - 1,
        3,
        "two requests per upstream connection, then a new one: {stats:?}"
    );

    // Without the annotation the same six requests share one pooled upstream connection.
    topology
        .write_config("web", &service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[]))
        .expect("unlimited");
    let unlimited = settle(&1, || {
        let before = topology.http_stats(&server).expect("stats").connections;
        let report = http(&topology, "a1", &web_url("/"), &["--requests", "6", "--concurrency", "1"]);
        assert!(report.all(200), "{report:?}");
        topology.http_stats(&server).expect("stats").connections - before - 1
    });
    assert!(
        unlimited <= 1,
        "no limit: at most one new upstream connection for six requests, got {unlimited}"
    );
}

#[test]
fn http2_multiplexes_concurrent_requests_over_one_connection() {
    let topology = meshed(
        "l7_http2",
        &[("b1", "app: web"), ("b2", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP)], &[]))],
    );
    topology.http_serve("b1", APP, &[]).expect("b1");
    topology.http_serve("b2", APP, &[]).expect("b2");

    let report =
        http(&topology, "a1", &web_url("/"), &["--http2", "--requests", "300", "--concurrency", "30"]);
    assert!(report.all(200), "300 multiplexed requests all answered: {report:?}");
    assert_eq!(report.connections_opened, 1, "one HTTP/2 connection carried them all: {report:?}");
    assert_eq!(report.server_versions.get("HTTP/2.0"), Some(&300), "the servers saw HTTP/2: {report:?}");
    assert!(report.served_by("b1") > 0 && report.served_by("b2") > 0, "{:?}", report.servers);
}

/// A smuggling attempt must end at the proxy: a 400, or the connection closed without an
/// answer, and never a second request at the server. The servers frame bodies leniently, each
/// the way its request fools (see `http_app::lenient`): were the proxy to forward the request
/// as it is, the server would answer the hidden request too.
fn assert_refused(what: &str, report: &RawReport, server: &ServerHandle, topology: &Topology) {
    let statuses = report.statuses();
    let refused = statuses == [400] || (statuses.is_empty() && (report.closed || report.reset));
    assert!(refused, "{what}: want a 400 or a closed connection, got {statuses:?}: {report:?}");
    let stats = topology.http_stats(server).expect("stats");
    assert_eq!(stats.path(raw::SMUGGLED_PATH), 0, "{what}: the server saw the smuggled request: {stats:?}");
}

#[test]
fn ambiguous_request_framing_is_refused_and_never_smuggles_a_request() {
    let topology = meshed(
        "l7_smuggling",
        &[("b1", "app: web")],
        &[("web", service("web", WEB_VIP, &["app: web"], &[(80, APP), (81, 8081), (82, 8082)], &[]))],
    );
    let standard = topology.http_serve("b1", APP, &[]).expect("server");
    let by_length = topology.http_serve("b1", 8081, &["--framing", "first-content-length"]).expect("server");
    let by_chunks = topology.http_serve("b1", 8082, &["--framing", "chunked-keep-alive"]).expect("server");
    let vip = |port: u16| SocketAddr::from((WEB_VIP.parse::<std::net::Ipv4Addr>().expect("ip"), port));

    // The control: two well-formed pipelined requests on one connection both get through.
    let pipelined = format!("{}{}", raw::get("/one", "web"), raw::get("/two", "web"));
    let control = topology.raw_tcp("a1", vip(80), pipelined.as_bytes()).expect("raw");
    assert_eq!(control.statuses(), [200, 200], "pipelined requests: {control:?}");
    let stats = topology.http_stats(&standard).expect("stats");
    assert_eq!((stats.path("/one"), stats.path("/two")), (1, 1), "{stats:?}");

    let two_lengths = raw::two_content_lengths("/first", "web");
    let report = topology.raw_tcp("a1", vip(81), two_lengths.as_bytes()).expect("raw");
    assert_refused("two different Content-Lengths", &report, &by_length, &topology);

    // With both headers, the proxy's HTTP/1 parser (hyper) frames the request by
    // Transfer-Encoding alone, as RFC 9112 §6.3 says, drops the Content-Length and closes the
    // connection after answering: the server gets one request it cannot misread, never a second.
    let length_and_chunked = raw::content_length_and_chunked("/first", "web");
    let report = topology.raw_tcp("a1", vip(82), length_and_chunked.as_bytes()).expect("raw");
    let normalized = report.statuses() == [200]
        && (report.closed || report.reset)
        && report.responses.first().is_some_and(|r| !r.body.to_ascii_lowercase().contains("content-length"));
    if !normalized {
        assert_refused("Content-Length with Transfer-Encoding: chunked", &report, &by_chunks, &topology);
    }
    let stats = topology.http_stats(&by_chunks).expect("stats");
    assert_eq!(stats.path(raw::SMUGGLED_PATH), 0, "the server saw the smuggled request: {stats:?}");
}

// ---- telemetry ---------------------------------------------------------------------------

#[test]
fn the_destination_node_counts_requests_by_response_code_istio_style() {
    let allow =
        policy("allow-public", "b1", "ALLOW", "  - to:\n    - operation:\n        paths: [\"/public*\"]\n");
    let topology = meshed("l7_metrics", &[("b1", "app: b1")], &[b1_service(), ("allow-public", allow)]);
    topology.http_serve("b1", APP, &[]).expect("server");

    let allowed = http(&topology, "a1", &pod_url(&topology, "b1", "/public/x"), &["--requests", "7"]);
    assert!(allowed.all(200), "GET /public/x is allowed: {allowed:?}");
    let denied = http(&topology, "a1", &pod_url(&topology, "b1", "/private"), &["--requests", "3"]);
    assert!(denied.all(403), "GET /private is denied: {denied:?}");

    let count = |code: &str| {
        let text = topology.node_metrics(NodeId::B).expect("metrics");
        let wanted = [
            ("reporter", "destination"),
            ("source_workload", "a1"),
            ("destination_workload", "b1"),
            // b1 serves port APP for exactly one Service: the destination side names it.
            ("destination_service", "b1.demo.svc.cluster.local"),
            ("response_code", code),
        ];
        prometheus::sum(&text, "istio_requests_total", &wanted)
    };
    let ok = settle(&7.0, || count("200"));
    let forbidden = settle(&3.0, || count("403"));
    let text = topology.node_metrics(NodeId::B).expect("metrics");
    let samples: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_requests_total")).collect();
    assert_eq!((ok, forbidden), (7.0, 3.0), "istio_requests_total on node-b for 200 and 403: {samples:#?}");
}

// ---- policy changes ----------------------------------------------------------------------

#[test]
fn a_policy_change_closes_an_open_connection_it_now_denies() {
    let topology = meshed("l7_revoke", &[("b2", "app: b2")], &[]);
    topology.serve("b2", APP).expect("echo server");
    let to = SocketAddr::from((topology.pod("b2").ip, APP));
    let deny = policy(
        "deny-a1",
        "b2",
        "DENY",
        "  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/a1\"]\n",
    );
    std::thread::scope(|scope| {
        // A slow L4 stream (plain echo, no HTTP): a 64 KiB chunk every 300 ms for 6 s.
        let stream = scope.spawn(|| {
            topology
                .client_spread("a1", to, 20 * 64 * 1024, 1, Duration::from_secs(5), Duration::from_secs(6))
                .expect("client")
        });
        std::thread::sleep(Duration::from_secs(2));
        topology.write_config("deny-a1", &deny).expect("policy");
        let written = Instant::now();
        let report = stream.join().expect("client thread");
        assert_eq!((report.succeeded, report.failed), (0, 1), "the open connection is cut: {report:?}");
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "cut soon after the policy arrived, not at the end of the stream: {:?}",
            written.elapsed()
        );
    });
    eventually("node-b says why it closed the connection", Duration::from_secs(5), || {
        (topology.node_log_count(NodeId::B, &["a policy change denies it"]) > 0).then_some(())
    });
    let again = topology.client("a1", to, 1024, 1).expect("client");
    assert_eq!(again.succeeded, 0, "a new connection from a1 is refused: {again:?}");
    let other = topology.client("a2", to, 1024, 1).expect("client");
    assert!(other.ok, "a2 is not denied: {other:?}");
}
