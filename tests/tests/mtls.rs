//! End-to-end: HBONE mTLS between node proxies, with a real mesh-control CA, real certificates
//! and a packet capture on the node-to-node link.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use nodemesh_testbed::{ClientReport, NodeId, Topology, eventually, payload, process::find_binary};
use serde_json::Value;

const PORT: u16 = 8080;
const HBONE: u16 = 15008;

fn addr(topology: &Topology, pod: &str) -> SocketAddr {
    SocketAddr::from((topology.pod(pod).ip, PORT))
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

/// Builds the topology with mesh-control and waits until every enrolled pod has a certificate.
fn meshed(test: &str) -> Topology {
    meshed_with(test, &[], &[])
}

/// Like [`meshed`], with pod annotations (`pod`, `key: value`) and extra mesh-control arguments.
fn meshed_with(test: &str, annotations: &[(&str, &str)], control_args: &[&str]) -> Topology {
    let mut topology = Topology::build(test).expect("topology");
    for (pod, annotation) in annotations {
        topology.annotate(pod, annotation).expect("annotate");
    }
    topology.start_meshed(control_args).expect("meshed topology");
    topology
}

#[test]
fn cross_node_traffic_is_mutual_tls_on_the_wire_with_both_identities() {
    let topology = meshed("mtls_on_the_wire");
    topology.serve("b1", PORT).expect("server");
    let sniffer = topology.sniff_node_link().expect("capture");
    let report = topology.client("a1", addr(&topology, "b1"), 1024 * 1024, 1).expect("client");
    let capture = sniffer.stop().expect("capture");
    assert!(report.ok, "{report:?}");
    assert_eq!(
        report.peer_ips(),
        [topology.pod("a1").ip.to_string()],
        "the app still sees the client pod's IP"
    );

    let marker = payload::prefix(1, 32);
    assert!(!capture.contains(&marker), "the payload must never cross the node link in clear");
    assert!(capture.tcp_payloads(PORT).is_empty(), "no plaintext connection to the app port on the link");
    let tunnel = capture.tcp_payloads(HBONE);
    assert!(tunnel.iter().any(|p| p.starts_with(&[0x16, 0x03])), "a TLS handshake crossed the link");
    let records = tunnel.iter().filter(|p| p.starts_with(&[0x17, 0x03, 0x03])).count();
    assert!(records > 10, "TLS application-data records carried the megabyte: {records}");

    let (a, b) = (topology.node_pods(NodeId::A).expect("a"), topology.node_pods(NodeId::B).expect("b"));
    assert_eq!(a.pod("a1").expect("a1").outbound.connections, 1);
    assert_eq!(b.pod("b1").expect("b1").inbound.connections, 1);
    assert_eq!(b.pod("b1").expect("b1").inbound.bytes_received, 1024 * 1024);

    // Each side recorded the other's SPIFFE ID for this connection.
    let (log_a, log_b) = (topology.node_log_text(NodeId::A), topology.node_log_text(NodeId::B));
    let opened = log_a.lines().find(|l| l.contains("HBONE stream opened")).expect("node-a logged the stream");
    assert!(
        opened.contains(&format!("src.identity={}", spiffe("a1")))
            && opened.contains(&format!("dst.identity={}", spiffe("b1"))),
        "{opened}"
    );
    let accepted =
        log_b.lines().find(|l| l.contains("HBONE stream accepted")).expect("node-b logged the stream");
    assert!(
        accepted.contains(&format!("src.identity={}", spiffe("a1")))
            && accepted.contains(&format!("dst.identity={}", spiffe("b1"))),
        "{accepted}"
    );
    // The CONNECT carried a W3C trace context and the source's baggage: one trace ID on both nodes.
    let trace_id = field(opened, "trace_id").expect("node-a logged a trace ID");
    assert_eq!(trace_id.len(), 32, "{opened}");
    assert_eq!(field(accepted, "trace_id"), Some(trace_id), "{accepted}");
    assert!(accepted.contains("k8s.namespace.name=demo,k8s.pod.name=a1,k8s.node.name=node-a"), "{accepted}");
}

#[test]
fn without_the_mesh_ca_the_same_capture_sees_plaintext() {
    // The control experiment: proves the capture above would have caught plaintext.
    let topology = Topology::build("mtls_control_plaintext").expect("topology");
    for node in NodeId::ALL {
        topology.start_node(node).expect("mesh-node");
    }
    topology.serve("b1", PORT).expect("server");
    let sniffer = topology.sniff_node_link().expect("capture");
    let report = topology.client("a1", addr(&topology, "b1"), 64 * 1024, 1).expect("client");
    let capture = sniffer.stop().expect("capture");
    assert!(report.ok, "{report:?}");
    assert!(capture.contains(&payload::prefix(1, 32)), "plain TCP forwarding carries the payload in clear");
}

#[test]
fn a_thousand_concurrent_streams_share_pooled_tunnels() {
    let topology = meshed("mtls_thousand_streams");
    topology.serve("b1", PORT).expect("server");
    topology.serve("b2", PORT).expect("server");
    const PER_CLIENT: u32 = 500;
    const BYTES: u64 = 64 * 1024;
    let reports: Vec<_> = std::thread::scope(|s| {
        [("a1", "b1"), ("a2", "b2")]
            .map(|(from, to)| {
                let topology = &topology;
                s.spawn(move || topology.client(from, addr(topology, to), BYTES, PER_CLIENT).expect("client"))
            })
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    for report in &reports {
        assert!(report.ok, "{} of {} failed: {:?}", report.failed, report.conns, report.errors);
        assert_eq!(report.bytes_received, BYTES * u64::from(PER_CLIENT), "every byte verified");
    }
    // Streams are multiplexed over a few tunnels (a new one opens only when every tunnel to that
    // destination is full, at 100 streams), never one per connection.
    let tunnels =
        topology.node_log_text(NodeId::A).lines().filter(|l| l.contains("HBONE tunnel opened")).count();
    assert!((2..=12).contains(&tunnels), "{tunnels} tunnels for 1,000 streams");
}

#[test]
fn without_tunnel_reuse_every_connection_gets_its_own_tunnel_that_closes_with_it() {
    // `--hbone-tunnel-reuse=false` exists for the benchmarks (tunnel setup rate): check it does
    // what they rely on.
    let topology = Topology::build("mtls_no_tunnel_reuse").expect("topology");
    topology.start_meshed_with(&[], &["--hbone-tunnel-reuse=false"]).expect("meshed topology");
    topology.serve("b1", PORT).expect("server");
    for _ in 0..3 {
        let report = topology.client("a1", addr(&topology, "b1"), 4096, 2).expect("client");
        assert!(report.ok, "{report:?}");
    }
    let tunnels =
        topology.node_log_text(NodeId::A).lines().filter(|l| l.contains("HBONE tunnel opened")).count();
    assert_eq!(tunnels, 6, "one tunnel per connection");
    let ns = topology.netns_name("a1");
    let open = |deadline: Instant| loop {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ss", "-Htn", "state", "established", "( dport = :15008 )"])
            .output()
            .expect("ss");
        let open = String::from_utf8_lossy(&output.stdout).lines().count();
        if open == 0 || Instant::now() > deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(open(Instant::now() + Duration::from_secs(5)), 0, "tunnels close with their connection");
}

#[test]
fn strict_refuses_plaintext_from_outside_the_mesh_and_permissive_accepts_it() {
    let topology = meshed_with("mtls_modes", &[("b2", "nodemesh.io/mtls-mode: PERMISSIVE")], &[]);
    topology.serve("b1", PORT).expect("server");
    topology.serve("b2", PORT).expect("server");
    // a3 is not in the mesh: its connections arrive as plaintext.
    let to_strict = topology.client("a3", addr(&topology, "b1"), 1024, 1).expect("client");
    assert_eq!(to_strict.succeeded, 0, "STRICT b1 refuses plaintext: {to_strict:?}");
    let to_permissive = topology.client("a3", addr(&topology, "b2"), 1024, 1).expect("client");
    assert!(to_permissive.ok, "PERMISSIVE b2 accepts plaintext: {to_permissive:?}");
    assert_eq!(to_permissive.peer_ips(), [topology.pod("a3").ip.to_string()]);
    // Meshed clients reach the STRICT pod through HBONE.
    assert!(topology.client("a1", addr(&topology, "b1"), 1024, 1).expect("client").ok);
    let wait = Duration::from_secs(5);
    eventually("the refusal is logged with the reason", wait, || {
        topology.node_log_text(NodeId::B).contains("the pod is STRICT").then_some(())
    });
    let b = topology.node_pods(NodeId::B).expect("pods");
    assert_eq!(b.pod("b1").expect("b1").inbound.failed, 1, "the refusal is counted");
}

/// Returns the serial of `identity`'s current certificate on `node`.
fn serial(topology: &Topology, node: NodeId, identity: &str) -> String {
    let body = topology.node_admin(node, "/certs").expect("certs");
    let json: Value = serde_json::from_str(&body).expect("json");
    json["certificates"]
        .as_array()
        .and_then(|certs| certs.iter().find(|c| c["identity"] == identity))
        .and_then(|c| c["serial"].as_str())
        .unwrap_or_else(|| panic!("no certificate for {identity} on {}: {body}", node.name()))
        .to_owned()
}

/// Returns the value of `key=` in a log line, if present.
fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

#[test]
fn certificates_rotate_under_a_long_lived_stream_and_new_tunnels_use_the_new_one() {
    // Six-second certificates: each identity renews about every three seconds.
    let topology = meshed_with("mtls_rotation", &[], &["--cert-ttl-secs", "6", "--min-cert-ttl-secs", "1"]);
    topology.serve("b1", PORT).expect("server");
    let first = serial(&topology, NodeId::A, &spiffe("a1"));

    // One connection that outlives five certificate lifetimes, paced over 30 s.
    const BYTES: u64 = 4 * 1024 * 1024;
    let report = topology
        .client_spread("a1", addr(&topology, "b1"), BYTES, 1, Duration::from_secs(5), Duration::from_secs(30))
        .expect("client");
    assert!(report.ok, "the stream survived rotation: {report:?}");
    assert_eq!(report.bytes_received, BYTES, "every byte verified");

    let current = serial(&topology, NodeId::A, &spiffe("a1"));
    assert_ne!(current, first, "a1's certificate rotated during the stream");
    let log_a = topology.node_log_text(NodeId::A);
    let issued = log_a
        .lines()
        .filter(|l| l.contains("workload certificate issued") && l.contains(&spiffe("a1")))
        .count();
    assert!(issued >= 8, "renewed at half-life, again and again: {issued} certificates");

    // A new connection does not ride the tunnel authenticated with a replaced certificate.
    let again = topology.client("a1", addr(&topology, "b1"), 1024, 1).expect("client");
    assert!(again.ok, "{again:?}");
    let serial_now = serial(&topology, NodeId::A, &spiffe("a1"));
    let accepted: Vec<String> = topology
        .node_log_text(NodeId::B)
        .lines()
        .filter(|l| l.contains("HBONE tunnel accepted") && l.contains(&spiffe("a1")))
        .filter_map(|l| field(l, "src.serial").map(str::to_owned))
        .collect();
    assert_eq!(accepted.len(), 2, "one tunnel per certificate used: {accepted:?}");
    assert_eq!(accepted[0], first, "the first tunnel presented the first certificate");
    assert!(
        accepted[1] != first && (accepted[1] == serial_now || accepted[1] == current),
        "the second tunnel presented a fresh certificate: {accepted:?}, now {serial_now}"
    );
}

/// Every certificate on both nodes, as /certs shows them.
fn all_certs(topology: &Topology) -> Vec<Value> {
    NodeId::ALL
        .iter()
        .flat_map(|node| {
            let body = topology.node_admin(*node, "/certs").expect("certs");
            let json: Value = serde_json::from_str(&body).expect("json");
            json["certificates"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

/// Waits until every certificate on both nodes satisfies `done`.
fn wait_for_certs(topology: &Topology, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let certs = all_certs(topology);
        if !certs.is_empty() && certs.iter().all(&done) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: never happened: {certs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn roots(cert: &Value) -> Vec<&str> {
    let mut roots: Vec<&str> =
        cert["trust_roots"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    roots.sort_unstable();
    roots
}

#[test]
fn the_root_ca_rotates_with_zero_failed_requests() {
    const TTL: [&str; 4] = ["--cert-ttl-secs", "4", "--min-cert-ttl-secs", "1"];
    let topology = meshed_with("mtls_root_rotation", &[], &TTL);
    topology.serve("b1", PORT).expect("server");
    topology.serve("a2", PORT).expect("server");
    let old_root = all_certs(&topology)[0]["signed_by"].as_str().expect("signed_by").to_owned();
    let old_dir = topology.control_root_dir();
    let next_dir = topology.state_dir().join("next-root");
    let generated = std::process::Command::new(find_binary("mesh-control").expect("binary"))
        .args(["generate-root", "--out"])
        .arg(&next_dir)
        .output()
        .expect("mesh-control generate-root");
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    let new_root = String::from_utf8_lossy(&generated.stdout)
        .split_whitespace()
        .nth(2)
        .expect("generate-root prints the fingerprint")
        .to_owned();
    let mut both = [old_root.as_str(), new_root.as_str()];
    both.sort_unstable();
    let restart = |args: &[&str]| {
        topology.stop_control_plane().expect("stop mesh-control");
        topology.start_control_plane_with(&[&TTL[..], args].concat()).expect("restart mesh-control");
    };
    let (old_cert, next_cert, next_dir) = (
        old_dir.join("root-cert.pem").display().to_string(),
        next_dir.join("root-cert.pem").display().to_string(),
        next_dir.display().to_string(),
    );

    // Requests flow both ways across the nodes, through the whole rotation.
    let running = AtomicBool::new(true);
    let reports: Vec<ClientReport> = std::thread::scope(|s| {
        let loops = [("a1", "b1"), ("b2", "a2")].map(|(from, to)| {
            let (topology, running) = (&topology, &running);
            s.spawn(move || {
                let mut reports = Vec::new();
                while running.load(Ordering::Acquire) {
                    reports.push(topology.client(from, addr(topology, to), 16 * 1024, 2).expect("client"));
                }
                reports
            })
        });

        // 1. Trust the next root everywhere, still signing with the old one.
        restart(&["--extra-trust-root", &next_cert]);
        wait_for_certs(&topology, "every node trusts both roots", |c| {
            roots(c) == both && c["signed_by"] == old_root.as_str()
        });
        // 2. Sign with the next root; the old one is still trusted.
        restart(&["--root-dir", &next_dir, "--extra-trust-root", &old_cert]);
        wait_for_certs(&topology, "every certificate is re-issued by the next root", |c| {
            c["signed_by"] == new_root.as_str()
        });
        // 3. Drop the old root.
        restart(&["--root-dir", &next_dir]);
        wait_for_certs(&topology, "every node trusts only the next root", |c| {
            roots(c) == [new_root.as_str()] && c["signed_by"] == new_root.as_str()
        });
        std::thread::sleep(Duration::from_secs(2));
        running.store(false, Ordering::Release);
        loops.into_iter().flat_map(|l| l.join().expect("traffic loop")).collect()
    });

    let requests: u32 = reports.iter().map(|r| r.conns).sum();
    let failures: Vec<_> = reports.iter().filter(|r| !r.ok).collect();
    assert!(failures.is_empty(), "{} of {requests} requests failed: {failures:?}", failures.len());
    assert!(requests >= 100, "enough requests crossed the rotation: {requests}");
    // Tunnels opened under both roots: the old tunnels retired as their certificates changed.
    let accepted = topology.node_log_text(NodeId::B).matches("HBONE tunnel accepted").count();
    assert!(accepted >= 3, "{accepted} tunnels accepted on node-b");
}
