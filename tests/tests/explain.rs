//! End-to-end: `meshctl explain` agrees with the traffic. On a meshed two-node topology with
//! Services, an HTTPRoute and AuthorizationPolicies (ALLOW by principal, DENY by path and by
//! method, an L4 DENY by ipBlock), every case of a table is both explained (`meshctl explain …
//! -o json`) and really sent (curl for HTTP, pod-app's verifying client for TCP), and the two
//! must agree: allowed ⇔ answered by the app; 403 ⇔ 403 naming the same policy; reset or closed
//! ⇔ no response at all; the explained endpoint(s) ⇔ the server that answered.
//!
//! Each case's expected verdict is pinned too, so a case cannot pass by both sides being wrong
//! the same way in a way nobody looked at.

use std::net::SocketAddr;

use nodemesh_testbed::{Topology, objects};
use serde_json::Value;

const APP: u16 = 8080;
const ECHO: u16 = 9000;
const WEB_VIP: &str = "10.96.0.10";
const ECHO_VIP: &str = "10.96.0.20";
const WEB_HOST: &str = "web.demo.svc.cluster.local";

fn service(name: &str, vip: &str, selector: &[&str], port: u16, target: u16, protocol: &str) -> String {
    objects::service(name, vip, selector, &[(port, target)], protocol, &[])
}

/// A policy on the `app: web` pods.
fn policy(name: &str, action: &str, rules: &str) -> String {
    objects::policy(name, "web", action, rules)
}

fn config() -> Vec<(&'static str, String)> {
    vec![
        ("web", service("web", WEB_VIP, &["app: web"], 80, APP, "http")),
        ("web-v1", service("web-v1", "10.96.0.11", &["app: web", "version: v1"], 80, APP, "http")),
        ("web-v2", service("web-v2", "10.96.0.12", &["app: web", "version: v2"], 80, APP, "http")),
        ("echo", service("echo", ECHO_VIP, &["app: web", "version: v1"], ECHO, ECHO, "tcp")),
        (
            "web-route",
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-route
  namespace: demo
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: web
    port: 80
  rules:
  - matches:
    - headers:
      - name: x-canary
        value: \"1\"
    backendRefs:
    - name: web-v2
      port: 80
  - matches:
    - path:
        type: PathPrefix
        value: /v1
    backendRefs:
    - name: web-v1
      port: 80
  - backendRefs:
    - name: web
      port: 80
"
            .into(),
        ),
        (
            "allow-a-side",
            policy(
                "allow-a-side",
                "ALLOW",
                "  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/a1\", \"cluster.local/ns/demo/sa/a2\"]\n",
            ),
        ),
        (
            "deny-admin",
            policy(
                "deny-admin",
                "DENY",
                "  - to:\n    - operation:\n        ports: [\"8080\"]\n        paths: [\"/admin*\"]\n  - to:\n    - operation:\n        ports: [\"8080\"]\n        methods: [\"DELETE\"]\n",
            ),
        ),
        (
            "deny-a2-echo",
            policy(
                "deny-a2-echo",
                "DENY",
                "  - from:\n    - source:\n        ipBlocks: [\"10.1.1.3/32\"]\n    to:\n    - operation:\n        ports: [\"9000\"]\n",
            ),
        ),
    ]
}

/// One case: who, where, what; and the verdict it must have.
struct Case {
    from: &'static str,
    to: &'static str,
    port: Option<u16>,
    /// `METHOD PATH`, or `None` for plain TCP.
    http: Option<&'static str>,
    headers: &'static [&'static str],
    /// (allowed, effect, by)
    want: (bool, &'static str, Option<&'static str>),
}

const CASES: &[Case] = &[
    // Straight to a pod, HTTP.
    Case {
        from: "demo/a1",
        to: "demo/b1",
        port: Some(APP),
        http: Some("GET /public"),
        headers: &[],
        want: (true, "forwarded", None),
    },
    Case {
        from: "demo/a1",
        to: "demo/b1",
        port: Some(APP),
        http: Some("GET /admin/users"),
        headers: &[],
        want: (false, "403", Some("demo/deny-admin")),
    },
    Case {
        from: "demo/a2",
        to: "demo/b1",
        port: Some(APP),
        http: Some("DELETE /public"),
        headers: &[],
        want: (false, "403", Some("demo/deny-admin")),
    },
    // b1's identity is not among the ALLOWed principals (same node, node-b explains alone).
    Case {
        from: "demo/b1",
        to: "demo/b2",
        port: Some(APP),
        http: Some("GET /"),
        headers: &[],
        want: (false, "403", None),
    },
    // Through the service: the route's rules.
    Case {
        from: "demo/a1",
        to: WEB_HOST,
        port: None,
        http: Some("GET /"),
        headers: &["x-canary: 1"],
        want: (true, "forwarded", None),
    },
    Case {
        from: "demo/a2",
        to: WEB_VIP,
        port: Some(80),
        http: Some("GET /v1/items"),
        headers: &[],
        want: (true, "forwarded", None),
    },
    Case {
        from: "demo/a1",
        to: WEB_VIP,
        port: None,
        http: Some("GET /"),
        headers: &[],
        want: (true, "forwarded", None),
    },
    Case {
        from: "demo/a1",
        to: WEB_VIP,
        port: None,
        http: Some("GET /admin"),
        headers: &[],
        want: (false, "403", Some("demo/deny-admin")),
    },
    // TCP: the L4 DENY by ipBlock; b1 parses (its policies have HTTP rules), detection says TCP.
    Case {
        from: "demo/a1",
        to: "demo/b1",
        port: Some(ECHO),
        http: None,
        headers: &[],
        want: (true, "forwarded", None),
    },
    Case {
        from: "demo/a2",
        to: "demo/b1",
        port: Some(ECHO),
        http: None,
        headers: &[],
        want: (false, "closed", Some("demo/deny-a2-echo")),
    },
    Case {
        from: "demo/a1",
        to: ECHO_VIP,
        port: Some(ECHO),
        http: None,
        headers: &[],
        want: (true, "forwarded", None),
    },
    Case {
        from: "demo/a2",
        to: ECHO_VIP,
        port: None,
        http: None,
        headers: &[],
        want: (false, "closed", Some("demo/deny-a2-echo")),
    },
    // Outside the mesh: plaintext to a STRICT pod is reset; an unmeshed destination is reached.
    Case {
        from: "demo/a3",
        to: "demo/b1",
        port: Some(APP),
        http: Some("GET /public"),
        headers: &[],
        want: (false, "reset", None),
    },
    Case {
        from: "demo/a1",
        to: "demo/b3",
        port: Some(APP),
        http: Some("GET /"),
        headers: &[],
        want: (true, "forwarded", None),
    },
];

/// What really happened.
#[derive(Debug)]
enum Real {
    /// An HTTP response: status, `x-server`, body.
    Http(u16, Option<String>, String),
    /// A TCP exchange: whether every byte came back.
    Tcp(bool),
    /// No response at all (refused, reset, closed), and what the client said.
    Nothing(#[expect(dead_code, reason = "read through Debug in failure messages")] String),
}

fn pod_of(to: &str) -> Option<&str> {
    to.strip_prefix("demo/")
}

/// Where the client connects and the Host it names.
fn address(topology: &Topology, case: &Case) -> (String, u16) {
    let ip = match case.to {
        WEB_HOST => WEB_VIP.to_owned(),
        to => pod_of(to).map_or_else(|| to.to_owned(), |pod| topology.pod(pod).ip.to_string()),
    };
    let port = case.port.unwrap_or(if ip == ECHO_VIP { ECHO } else { 80 });
    (ip, port)
}

fn send(topology: &Topology, case: &Case) -> Real {
    let source = pod_of(case.from).expect("a pod");
    let (ip, port) = address(topology, case);
    let Some(http) = case.http else {
        let to: SocketAddr = format!("{ip}:{port}").parse().expect("address");
        let report = topology
            .client_with(source, to, 64 * 1024, 1, std::time::Duration::from_secs(3))
            .expect("pod-app client");
        return if report.ok { Real::Tcp(true) } else { Real::Nothing(format!("{:?}", report.errors)) };
    };
    let (method, path) = http.split_once(' ').expect("METHOD PATH");
    let host = if case.to == WEB_HOST { WEB_HOST.to_owned() } else { ip.clone() };
    let url = if port == 80 { format!("http://{host}{path}") } else { format!("http://{host}:{port}{path}") };
    let resolve = format!("{host}:{port}:{ip}");
    let mut args = vec!["-X", method, "--resolve", &resolve, "--max-time", "5"];
    for header in case.headers {
        args.extend(["-H", header]);
    }
    args.push(&url);
    let response = topology.curl(source, &args).expect("curl");
    if response.status == 0 {
        return Real::Nothing(format!("curl exit {}: {}", response.exit_code, response.stderr));
    }
    Real::Http(response.status, response.header("x-server").map(str::to_owned), response.body)
}

fn explain(topology: &Topology, case: &Case) -> (i32, Value) {
    let port = case.port.map(|p| p.to_string());
    let mut args = vec!["explain", case.from, case.to];
    if let Some(port) = &port {
        args.extend(["--port", port]);
    }
    if let Some(http) = case.http {
        args.extend(["--http", http]);
    }
    for header in case.headers {
        args.extend(["--header", header]);
    }
    topology.meshctl_json(&args).unwrap_or_else(|e| panic!("meshctl {args:?}: {e:#}"))
}

/// The pods explain says the traffic may reach.
fn endpoint_pods(explained: &Value) -> Vec<String> {
    explained["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["workload"].as_str())
        .filter_map(|w| w.strip_prefix("demo/"))
        .map(str::to_owned)
        .collect()
}

fn check(topology: &Topology, case: &Case) -> Result<(), String> {
    let label = format!("{} -> {} {:?} {:?} {:?}", case.from, case.to, case.port, case.http, case.headers);
    let (code, explained) = explain(topology, case);
    let verdict = &explained["verdict"];
    let got = (verdict["allowed"].as_bool(), verdict["effect"].as_str(), verdict["by"].as_str());
    let (allowed, effect, by) = case.want;
    if got != (Some(allowed), Some(effect), by) {
        return Err(format!("{label}: explain says {got:?}, the table wants {:?}\n{explained:#}", case.want));
    }
    if (code == 0) != allowed {
        return Err(format!("{label}: meshctl exited {code} for allowed={allowed}"));
    }
    // Each meshed endpoint's inbound half was decided by the node that hosts it.
    for endpoint in explained["endpoints"].as_array().into_iter().flatten() {
        if endpoint["inbound"]["enforced"] == true && endpoint["inbound"]["node"] != endpoint["node"] {
            return Err(format!("{label}: inbound half not from the endpoint's node: {endpoint:#}"));
        }
    }
    let pods = endpoint_pods(&explained);
    let real = send(topology, case);
    let agrees = match (effect, &real) {
        ("forwarded", Real::Http(200, Some(server), _)) => pods.contains(server),
        ("forwarded", Real::Tcp(true)) => true,
        ("403", Real::Http(403, _, body)) => by.is_none_or(|policy| body.contains(policy)),
        ("503", Real::Http(503, _, _)) => true,
        ("reset" | "closed", Real::Nothing(_)) => true,
        _ => false,
    };
    if !agrees {
        return Err(format!(
            "{label}: explain says {effect} via {pods:?}, traffic got {real:?}\n{explained:#}"
        ));
    }
    // Deterministic routing: exactly the one explained pod answered.
    if let (Real::Http(200, Some(server), _), [only]) = (&real, pods.as_slice())
        && server != only
    {
        return Err(format!("{label}: explain picks {only}, {server} answered"));
    }
    Ok(())
}

#[test]
fn explain_agrees_with_real_traffic_case_by_case() {
    let mut topology = Topology::build("explain_agrees").expect("topology");
    for (pod, label) in [("b1", "app: web"), ("b1", "version: v1"), ("b2", "app: web"), ("b2", "version: v2")]
    {
        topology.label(pod, label).expect("label");
    }
    for (name, yaml) in config() {
        topology.write_config(name, &yaml).expect("config");
    }
    topology.start_meshed(&[]).expect("meshed topology");
    let policies: Value =
        serde_json::from_str(&topology.control_admin("/policies").expect("policies")).unwrap();
    for policy in policies["policies"].as_array().into_iter().flatten() {
        assert_eq!(policy["accepted"]["status"], true, "policy not accepted: {policy}");
    }
    let routes: Value = serde_json::from_str(&topology.control_admin("/routes").expect("routes")).unwrap();
    assert_eq!(routes["routes"][0]["distributed"], true, "{routes}");
    for pod in ["b1", "b2", "b3"] {
        topology.http_serve(pod, APP, &[]).expect("http server");
    }
    topology.serve("b1", ECHO).expect("echo server");

    let allowed = CASES.iter().filter(|c| c.want.0).count();
    assert!(allowed >= 4 && CASES.len() - allowed >= 4, "both kinds of cases");
    let failures: Vec<String> = CASES.iter().filter_map(|case| check(&topology, case).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );

    // The human report says the same in one line per step.
    let run = topology
        .meshctl(&["explain", "demo/a1", "demo/b1", "--port", "8080", "--http", "GET /admin/users"])
        .expect("meshctl");
    assert_eq!(run.code, 1, "denied: {run:?}");
    let verdict = run.stdout.lines().find(|l| l.starts_with("verdict")).unwrap_or_default();
    assert!(verdict.contains("DENIED by demo/deny-admin -> 403"), "{}", run.stdout);
    assert!(run.stdout.contains("demo/deny-admin DENY matched"), "{}", run.stdout);

    // Questions it cannot answer: one line, exit 2.
    for (args, says) in [
        (vec!["explain", "demo/nobody", "demo/b1", "--port", "8080"], "unknown pod \"demo/nobody\""),
        (vec!["explain", "demo/a1", "nowhere.demo", "--port", "80"], "unknown destination \"nowhere.demo\""),
        (vec!["explain", "demo/a1", "demo/b1", "--port", "8080", "--http", "GET"], "not \"METHOD PATH\""),
        (vec!["explain", "demo/a1", "demo/b1"], "give --port"),
    ] {
        let run = topology.meshctl(&args).expect("meshctl");
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains(says) && run.stderr.trim().lines().count() == 1, "{args:?}: {run:?}");
    }
}
