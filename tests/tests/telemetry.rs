//! Telemetry end to end, with real traffic through a meshed topology (mTLS between nodes):
//! Istio's TCP metrics on both reporters count exactly the bytes sent; `/connections` lists a
//! live connection with both identities and growing byte counts, and forgets it once closed;
//! each connection is one JSON log line with its fields; every `/metrics` exposition (both
//! nodes, mesh-control) passes a strict OpenMetrics parser; the Grafana dashboard names only
//! metrics the components export; `/logging` changes the log filter at run time.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use nodemesh_testbed::{NodeId, Topology, eventually, prometheus, telemetry};
use serde_json::Value;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);

fn identity(pod: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{pod}")
}

fn addr(topology: &Topology, pod: &str) -> SocketAddr {
    SocketAddr::from((topology.pod(pod).ip, PORT))
}

fn mesh_control_log(topology: &Topology) -> String {
    std::fs::read_to_string(topology.state_dir().join("mesh-control.log")).unwrap_or_default()
}

fn connections(topology: &Topology, node: NodeId) -> Vec<Value> {
    let body = topology.node_admin(node, "/connections").expect("/connections");
    let json: Value = serde_json::from_str(&body).expect("/connections is JSON");
    json["connections"].as_array().cloned().expect("a connections array")
}

/// Istio's labels for a1 → b1 over mTLS, as `reporter` counts them.
fn a1_to_b1(reporter: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("reporter", reporter.into()),
        ("source_workload", "a1".into()),
        ("source_workload_namespace", "demo".into()),
        ("source_principal", identity("a1")),
        ("destination_workload", "b1".into()),
        ("destination_workload_namespace", "demo".into()),
        ("destination_principal", identity("b1")),
        ("destination_service", "unknown".into()),
        ("request_protocol", "tcp".into()),
        ("response_flags", "-".into()),
        ("connection_security_policy", "mutual_tls".into()),
    ]
}

fn tcp_counter(text: &str, name: &str, labels: &[(&'static str, String)]) -> f64 {
    let wanted: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    prometheus::sum(text, name, &wanted)
}

#[test]
fn tcp_connections_are_counted_listed_and_logged_on_both_ends() {
    nodemesh_testbed::require_root().expect("root");
    let topology = Topology::build("telemetry-tcp").expect("topology");
    topology
        .start_meshed_with(&["--log-format", "json"], &["--log-format", "json"])
        .unwrap_or_else(|e| panic!("{e:#}\nmesh-control log:\n{}", mesh_control_log(&topology)));
    topology.serve("b1", PORT).expect("echo server in b1");
    let b1 = addr(&topology, "b1");

    // Exactly N bytes from a1 to b1 on one connection; b1 answers its PEER line and the echo.
    const N: u64 = 200_000;
    let report = topology.client("a1", b1, N, 1).expect("client");
    assert!(report.ok, "{report:?}");
    let peer_line = format!("PEER {}\n", report.peers_seen.first().expect("the server's PEER line"));
    let response = N + peer_line.len() as u64;

    // Istio: received = client → server (request), sent = server → client (response), whichever
    // end reports.
    for (node, reporter) in [(NodeId::A, "source"), (NodeId::B, "destination")] {
        let labels = a1_to_b1(reporter);
        let text = eventually(&format!("the {reporter} reporter counts the closed connection"), WAIT, || {
            let text = topology.node_metrics(node).ok()?;
            (tcp_counter(&text, "istio_tcp_connections_closed_total", &labels) >= 1.0).then_some(text)
        });
        assert_eq!(
            tcp_counter(&text, "istio_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}\n{text}"
        );
        assert_eq!(tcp_counter(&text, "istio_tcp_connections_closed_total", &labels), 1.0, "{reporter}");
        assert_eq!(tcp_counter(&text, "istio_tcp_received_bytes_total", &labels), N as f64, "{reporter}");
        assert_eq!(tcp_counter(&text, "istio_tcp_sent_bytes_total", &labels), response as f64, "{reporter}");
    }

    // One JSON line per connection, on each node, with its fields.
    let closed = |node: NodeId, direction: &str| -> Value {
        eventually(&format!("{direction} connection log line on {}", node.name()), WAIT, || {
            telemetry::json_lines(&topology.node_log_text(node)).into_iter().find(|line| {
                line["message"] == "connection closed"
                    && line["direction"] == direction
                    && line["dst.addr"] == b1.to_string()
            })
        })
    };
    let out = closed(NodeId::A, "outbound");
    assert_eq!(out["target"], "connection", "{out}");
    assert_eq!(out["pod"], "demo/a1", "{out}");
    assert!(
        out["src.addr"].as_str().is_some_and(|a| a.starts_with(&format!("{}:", topology.pod("a1").ip))),
        "{out}"
    );
    assert_eq!(out["src.identity"], identity("a1"), "{out}");
    assert_eq!(out["dst.identity"], identity("b1"), "{out}");
    assert_eq!(out["transport"], "hbone", "{out}");
    assert_eq!(out["protocol"], "tcp", "{out}");
    assert_eq!(out["bytes.sent"], N, "{out}");
    assert_eq!(out["bytes.received"], response, "{out}");
    assert!(out["duration_ms"].is_u64() && out["service"].is_string() && out["policy"].is_string(), "{out}");
    let inb = closed(NodeId::B, "inbound");
    assert_eq!(inb["pod"], "demo/b1", "{inb}");
    assert_eq!(inb["src.identity"], identity("a1"), "{inb}");
    assert_eq!(inb["dst.identity"], identity("b1"), "{inb}");
    assert_eq!(inb["policy"], "allow", "{inb}");
    assert_eq!(inb["bytes.received"], N, "{inb}");
    assert_eq!(inb["bytes.sent"], response, "{inb}");

    // A slow stream: listed on both nodes while open, with growing counts, then gone.
    let to = b1;
    let (report, out_id, in_id) = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            topology.client_spread("a1", to, 4 * 64 * 1024, 1, Duration::from_secs(5), Duration::from_secs(8))
        });
        let listed = |node: NodeId, direction: &str| {
            eventually(&format!("the live {direction} connection on {}", node.name()), WAIT, || {
                connections(&topology, node).into_iter().find(|c| {
                    c["direction"] == direction
                        && c["destination"] == to.to_string()
                        && c["bytes_sent"].as_u64().unwrap_or(0) + c["bytes_received"].as_u64().unwrap_or(0)
                            > 0
                })
            })
        };
        let out = listed(NodeId::A, "outbound");
        let inb = listed(NodeId::B, "inbound");
        assert_eq!(out["pod"], "demo/a1", "{out}");
        assert_eq!(out["source_identity"], identity("a1"), "{out}");
        assert_eq!(out["destination_identity"], identity("b1"), "{out}");
        assert_eq!(out["transport"], "hbone", "{out}");
        assert_eq!(out["protocol"], "tcp", "{out}");
        assert!(out["policy"].is_null(), "the source decides no policy: {out}");
        assert!(out["service"].is_null(), "{out}");
        assert!(out["opened_at"].as_str().is_some_and(|t| t.contains('T') && t.ends_with('Z')), "{out}");
        assert!(out["duration_ms"].is_u64() && out["id"].is_u64(), "{out}");
        assert_eq!(inb["pod"], "demo/b1", "{inb}");
        assert_eq!(inb["source_identity"], identity("a1"), "{inb}");
        assert_eq!(inb["destination_identity"], identity("b1"), "{inb}");
        assert_eq!(inb["policy"], "allow", "{inb}");
        // Live counts: the stream is paced, so the bytes sent grow while it is listed.
        let first = out["bytes_sent"].as_u64().unwrap_or(0);
        let id = out["id"].clone();
        eventually("the listed bytes grow while the stream runs", WAIT, || {
            connections(&topology, NodeId::A)
                .into_iter()
                .find(|c| c["id"] == id)
                .filter(|c| c["bytes_sent"].as_u64().unwrap_or(0) > first)
        });
        (running.join().expect("client thread"), id, inb["id"].clone())
    });
    assert!(report.expect("slow client").ok);
    eventually("the closed connection leaves both tables", WAIT, || {
        let gone_a = connections(&topology, NodeId::A).iter().all(|c| c["id"] != out_id);
        let gone_b = connections(&topology, NodeId::B).iter().all(|c| c["id"] != in_id);
        (gone_a && gone_b).then_some(())
    });
}

/// A Service `b1` at 10.96.0.2 whose port 80 → b1:8080 speaks HTTP.
const B1_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: b1
  namespace: demo
spec:
  type: ClusterIP
  clusterIP: 10.96.0.2
  clusterIPs:
  - 10.96.0.2
  selector:
    app: b1
  ports:
  - name: http
    protocol: TCP
    appProtocol: http
    port: 80
    targetPort: 8080
";

#[test]
fn metrics_are_valid_openmetrics_the_dashboard_names_only_exported_metrics_and_logging_changes_live() {
    nodemesh_testbed::require_root().expect("root");
    let mut topology = Topology::build("telemetry-metrics").expect("topology");
    topology.label("b1", "app: b1").expect("label");
    topology.write_config("b1-service", B1_SERVICE).expect("service");
    topology
        .start_meshed(&[])
        .unwrap_or_else(|e| panic!("{e:#}\nmesh-control log:\n{}", mesh_control_log(&topology)));
    topology.http_serve("b1", PORT, &[]).expect("HTTP server in b1");
    topology.serve("b2", 9000).expect("echo server in b2");

    // Traffic so that the families have samples: HTTP through the service, plain TCP.
    let response = eventually("HTTP through the service", WAIT, || {
        topology.curl("a1", &["http://10.96.0.2/hello"]).ok().filter(|r| r.status == 200)
    });
    assert_eq!(response.status, 200);
    let report =
        topology.client("a2", SocketAddr::from((topology.pod("b2").ip, 9000)), 10_000, 2).expect("client");
    assert!(report.ok, "{report:?}");
    eventually("request metrics on both reporters", WAIT, || {
        let a = topology.node_metrics(NodeId::A).ok()?;
        let b = topology.node_metrics(NodeId::B).ok()?;
        (prometheus::sum(&a, "istio_requests_total", &[("reporter", "source")]) >= 1.0
            && prometheus::sum(&b, "istio_requests_total", &[("reporter", "destination")]) >= 1.0)
            .then_some(())
    });

    // Every exposition parses strictly; the kernel side's gauges say what is installed.
    let mut exported = std::collections::BTreeMap::new();
    for node in NodeId::ALL {
        for text in [
            topology.node_metrics(node).expect(":15020/metrics"),
            topology.node_admin(node, "/metrics").expect("admin /metrics"),
        ] {
            let families = telemetry::parse_openmetrics(&text)
                .unwrap_or_else(|e| panic!("{} /metrics: {e:#}\n{text}", node.name()));
            exported.extend(families);
            assert_eq!(
                prometheus::sum(&text, "nodemesh_ebpf_programs_attached", &[("program", "capture_inbound")]),
                2.0,
                "one sk_lookup link per enrolled pod (2 on {}):\n{text}",
                node.name()
            );
            assert_eq!(
                prometheus::sum(&text, "nodemesh_ebpf_map_entries", &[("map", "ENROLLED_NETNS")]),
                2.0
            );
            assert_eq!(
                prometheus::sum(&text, "nodemesh_ebpf_map_max_entries", &[("map", "ENROLLED_NETNS")]),
                4096.0
            );
            assert!(
                prometheus::sum(&text, "nodemesh_xds_last_update_timestamp_seconds", &[]) > 1.6e9,
                "the config's last update is a Unix time:\n{text}"
            );
        }
    }
    let control = topology.control_admin("/metrics").expect("mesh-control /metrics");
    let families = telemetry::parse_openmetrics(&control)
        .unwrap_or_else(|e| panic!("mesh-control /metrics: {e:#}\n{control}"));
    exported.extend(families);
    // The parser is strict: a counter sample without `_total` is refused.
    assert!(telemetry::parse_openmetrics("# TYPE x counter\nx 1\n# EOF\n").is_err());
    assert!(telemetry::parse_openmetrics("# TYPE x counter\nx_total 1\n").is_err(), "no # EOF");

    // The dashboard names only metrics that exist.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/nodemesh.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
        .expect("dashboard JSON");
    let expressions = telemetry::dashboard_expressions(&dashboard);
    assert!(expressions.len() >= 20, "{expressions:?}");
    let mut referenced = std::collections::BTreeSet::new();
    let mut missing = Vec::new();
    for (panel, expr) in &expressions {
        for name in telemetry::promql_metric_names(expr) {
            if !telemetry::exports(&exported, &name) {
                missing.push(format!("{panel}: {name}"));
            }
            referenced.insert(name);
        }
    }
    assert!(missing.is_empty(), "the dashboard uses metrics nothing exports: {missing:#?}");
    assert!(referenced.len() >= 15, "{referenced:?}");
    assert!(!telemetry::exports(&exported, "nodemesh_not_a_metric_total"));

    // The log filter, changed at run time. Start from `info`: debug events are not logged.
    let opened = |topology: &Topology| topology.node_log_count(NodeId::A, &["connection opened"]);
    let (status, body) =
        telemetry::node_admin(&topology, NodeId::A, "POST", "/logging?level=info").expect("POST");
    assert_eq!(status, 200, "{body}");
    let (status, body) = telemetry::node_admin(&topology, NodeId::A, "GET", "/logging").expect("GET");
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).expect("JSON")["level"].clone()),
        (200, "info".into())
    );
    let echo = SocketAddr::from((topology.pod("b2").ip, 9000));
    assert!(topology.client("a1", echo, 100, 1).expect("client").ok);
    eventually("the connection is logged at info", WAIT, || {
        (topology.node_log_count(NodeId::A, &["connection closed", "demo/a1"]) >= 1).then_some(())
    });
    assert_eq!(opened(&topology), 0, "no debug event at info");

    let (status, body) =
        telemetry::node_admin(&topology, NodeId::A, "POST", "/logging?level=mesh_node%3Dloud").expect("POST");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid log filter \"mesh_node=loud\""), "{body}");
    let (status, body) = telemetry::node_admin(&topology, NodeId::A, "POST", "/logging").expect("POST");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing ?level="), "{body}");
    let (_, body) = telemetry::node_admin(&topology, NodeId::A, "GET", "/logging").expect("GET");
    assert!(body.contains("\"info\""), "a refused filter leaves the old one: {body}");

    let (status, body) =
        telemetry::node_admin(&topology, NodeId::A, "POST", "/logging?level=debug").expect("POST");
    assert_eq!(status, 200, "{body}");
    let changed: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!((changed["level"].as_str(), changed["previous"].as_str()), (Some("debug"), Some("info")));
    assert!(topology.node_log_count(NodeId::A, &["log filter changed"]) >= 1);
    let started = Instant::now();
    assert!(topology.client("a1", echo, 100, 1).expect("client").ok);
    eventually("a debug event once the filter says debug", WAIT, || (opened(&topology) >= 1).then_some(()));
    assert!(started.elapsed() < WAIT);

    // mesh-control's admin endpoint takes the same requests.
    let (status, body) = telemetry::control_admin(&topology, "POST", "/logging?level=%5Bbad").expect("POST");
    assert_eq!(status, 400, "{body}");
    let (status, body) = telemetry::control_admin(&topology, "POST", "/logging?level=debug").expect("POST");
    assert_eq!(status, 200, "{body}");
    let (_, body) = telemetry::control_admin(&topology, "GET", "/logging").expect("GET");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["level"], "debug");
    eventually("mesh-control logs the change", WAIT, || {
        mesh_control_log(&topology).contains("log filter changed").then_some(())
    });
}
