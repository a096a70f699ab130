//! End-to-end: capture into the shared node proxy, with real mesh-node processes, real eBPF
//! programs and real traffic between network namespaces.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use nodemesh_testbed::{NodeId, PodsReport, Topology, prometheus, topology::EXT_IP};

const PORT: u16 = 8080;

fn addr(topology: &Topology, pod: &str) -> SocketAddr {
    SocketAddr::from((topology.pod(pod).ip, PORT))
}

fn started(test: &str) -> Topology {
    let topology = Topology::build(test).expect("topology");
    for node in NodeId::ALL {
        topology.start_node(node).expect("mesh-node starts");
    }
    topology
}

fn pods(topology: &Topology, node: NodeId) -> PodsReport {
    topology.node_pods(node).expect("admin /pods")
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

#[test]
fn cross_node_connection_is_captured_on_both_nodes_and_64mib_arrive_intact() {
    let topology = started("capture_cross_node_64mib");
    topology.serve("b1", PORT).expect("server");
    const BYTES: u64 = 64 * 1024 * 1024;
    let report = topology.client("a1", addr(&topology, "b1"), BYTES, 1).expect("client");
    assert!(report.ok, "transfer failed: {report:?}");
    assert_eq!((report.bytes_sent, report.bytes_received), (BYTES, BYTES), "echo verified byte for byte");

    let (a, b) = (pods(&topology, NodeId::A), pods(&topology, NodeId::B));
    let a1 = a.pod("a1").expect("a1 enrolled").outbound;
    let b1 = b.pod("b1").expect("b1 enrolled").inbound;
    assert_eq!(a1.connections, 1, "node-a captured a1's connection: {a1:?}");
    assert_eq!(b1.connections, 1, "node-b captured the connection to b1: {b1:?}");
    // The server first sends its PEER line; everything else is the echo.
    assert!(a1.bytes_sent == BYTES && a1.bytes_received > BYTES, "node-a relayed it all: {a1:?}");
    assert!(
        b1.bytes_received == BYTES && b1.bytes_sent == a1.bytes_received,
        "node-b relayed it all: {b1:?}"
    );
    assert_eq!((a1.failed, b1.failed, a1.active, b1.active), (0, 0, 0, 0));

    // The Prometheus endpoint counts the same traffic.
    let metrics = topology.node_metrics(NodeId::B).expect("metrics");
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
    };
    assert_eq!(
        sample(r#"nodemesh_proxy_connections_total{namespace="demo",pod="b1",direction="inbound"}"#),
        1
    );
    assert_eq!(
        sample(
            r#"nodemesh_proxy_bytes_total{namespace="demo",pod="b1",direction="inbound",flow="received"}"#
        ),
        BYTES
    );
    assert_eq!(sample(r#"nodemesh_ebpf_events_total{event="inbound_assigned"}"#), 1);
    // Each node relayed the connection once: whole in the proxy (a bulk transfer, normally) or
    // in the kernel, never both and never lost from the count.
    for node in NodeId::ALL {
        let text = topology.node_metrics(node).expect("metrics");
        let relayed =
            |relay| prometheus::sum(&text, "nodemesh_plaintext_relay_connections_total", &[("relay", relay)]);
        assert_eq!((relayed("kernel") + relayed("proxy"), relayed("failed")), (1.0, 0.0), "{node:?}");
    }
    assert!(metrics.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
}

#[test]
fn a_long_lived_connection_is_relayed_in_the_kernel_with_its_bytes_counted() {
    let topology = started("capture_kernel_relay");
    topology.serve("b1", PORT).expect("server");
    const BYTES: u64 = 4 * 1024 * 1024;
    let (connect, spread) = (Duration::from_secs(5), Duration::from_secs(2));
    let report =
        topology.client_spread("a1", addr(&topology, "b1"), BYTES, 2, connect, spread).expect("client");
    assert!(report.ok, "transfer failed: {report:?}");
    assert_eq!((report.bytes_sent, report.bytes_received), (2 * BYTES, 2 * BYTES), "echo verified");
    // Both connections outlived their warm-up at a steady trickle: the kernel relayed them on
    // both nodes, and the partner always kept up, so the proxy never took a direction back.
    for node in NodeId::ALL {
        let text = topology.node_metrics(node).expect("metrics");
        let relayed =
            |relay| prometheus::sum(&text, "nodemesh_plaintext_relay_connections_total", &[("relay", relay)]);
        let counts = [relayed("kernel"), relayed("proxy"), relayed("failed"), relayed("taken_over")];
        assert_eq!(counts, [2.0, 0.0, 0.0, 0.0], "{node:?}: kernel, proxy, failed, taken over");
        assert_eq!(prometheus::sum(&text, "nodemesh_plaintext_relay_kernel_active", &[]), 0.0, "{node:?}");
    }
    // The byte counts of kernel-relayed connections (from TCP_INFO) are exact.
    let a1 = pods(&topology, NodeId::A).pod("a1").expect("a1").outbound;
    let b1 = pods(&topology, NodeId::B).pod("b1").expect("b1").inbound;
    assert_eq!((a1.connections, b1.connections), (2, 2));
    assert_eq!((a1.bytes_sent, b1.bytes_received), (2 * BYTES, 2 * BYTES), "{a1:?} {b1:?}");
    assert!(b1.bytes_sent == a1.bytes_received && a1.bytes_received > 2 * BYTES, "{a1:?} {b1:?}");
}

#[test]
fn a_stalled_receiver_holds_the_sender_back_and_every_byte_arrives_in_order() {
    let topology = started("capture_stalled_receiver");
    topology.stalling_sink("b1", PORT, Duration::from_secs(2)).expect("sink");
    // Quiet after its header, the connection goes to the kernel relay; then it streams.
    let (pause, duration) = (Duration::from_millis(300), Duration::from_secs(3));
    let (report, accepted_while_stalled) = std::thread::scope(|s| {
        let sender = s.spawn(|| topology.send_after("a1", addr(&topology, "b1"), 1, pause, duration));
        // While the receiver reads nothing, the mesh may buffer a few budgets and socket
        // buffers, never the stream: what the sender got acknowledged stays small.
        std::thread::sleep(Duration::from_millis(1500));
        let accepted = bytes_acked_from(&topology, "a1");
        (sender.join().expect("sender thread"), accepted)
    });
    let report = report.expect("send");
    assert!(report.ok && report.bytes_verified == report.bytes_sent, "every byte verified: {report:?}");
    assert!(report.bytes_sent > 64 * 1024 * 1024, "a real bulk stream: {report:?}");
    assert!(
        accepted_while_stalled < 96 * 1024 * 1024,
        "the mesh took {accepted_while_stalled} bytes from the sender while the receiver stalled"
    );
    // The kernel relay stopped relaying for the stalled receiver: the proxy took the
    // direction over (with a full receive buffer's backpressure) on the receiver's node.
    // (Seen from the sender, the stall began 300 ms in; the check above is at 1.5 s.)
    let text = topology.node_metrics(NodeId::B).expect("metrics");
    let taken =
        prometheus::sum(&text, "nodemesh_plaintext_relay_connections_total", &[("relay", "taken_over")]);
    let relay_lines: Vec<_> = text.lines().filter(|l| l.starts_with("nodemesh_plaintext_relay")).collect();
    assert!(taken >= 1.0, "node-b took the direction over: {relay_lines:?}");
}

/// Bytes acknowledged on the pod's (one) connection to port 8080, from `ss` in its netns.
fn bytes_acked_from(topology: &Topology, pod: &str) -> u64 {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", &topology.netns_name(pod), "ss", "-tinH", "dport", "= :8080"])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .find_map(|field| field.strip_prefix("bytes_acked:")?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no bytes_acked in ss output: {text}"))
}

#[test]
fn invalid_manifests_keep_the_last_good_state_with_a_clear_error() {
    let topology = started("capture_bad_manifest");
    topology.serve("b1", PORT).expect("server");
    topology
        .write_raw_manifests(
            NodeId::A,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a1\n  labels: {oops: [}\n",
        )
        .expect("write");
    let mut report = pods(&topology, NodeId::A);
    assert!(
        eventually(Duration::from_secs(5), || {
            report = pods(&topology, NodeId::A);
            report.source_error.is_some()
        }),
        "the bad file is reported"
    );
    let error = report.source_error.clone().unwrap_or_default();
    assert!(error.contains("node-a-pods.yaml:5"), "error names file and line: {error}");
    assert_eq!(report.pods.len(), 2, "a1 and a2 stay enrolled: {report:?}");
    assert!(topology.client("a1", addr(&topology, "b1"), 1024, 1).expect("client").ok);
    assert_eq!(pods(&topology, NodeId::A).pod("a1").expect("a1").outbound.connections, 1, "still captured");

    topology.restore_manifests(NodeId::A).expect("restore");
    assert!(
        eventually(Duration::from_secs(5), || pods(&topology, NodeId::A).source_error.is_none()),
        "the error clears once the file is valid"
    );
}

#[test]
fn server_sees_the_real_client_pod_ip() {
    let topology = started("capture_client_ip");
    topology.serve("b1", PORT).expect("server");
    topology.serve("a2", PORT).expect("server");
    let cross = topology.client("a1", addr(&topology, "b1"), 1024, 3).expect("client");
    let same_node = topology.client("a1", addr(&topology, "a2"), 1024, 1).expect("client");
    assert!(cross.ok && same_node.ok, "{cross:?} {same_node:?}");
    let a1 = topology.pod("a1").ip.to_string();
    assert_eq!(cross.peer_ips(), std::slice::from_ref(&a1), "cross-node peer");
    assert_eq!(same_node.peer_ips(), [a1], "same-node peer");
    let a = pods(&topology, NodeId::A);
    assert_eq!(a.pod("a2").expect("a2").inbound.connections, 1, "same-node inbound captured too");
}

#[test]
fn unenrolled_pod_is_untouched() {
    let topology = started("capture_unenrolled");
    topology.serve("b3", PORT).expect("server");
    topology.serve("ext", PORT).expect("server");
    let to_pod = topology.client("a3", addr(&topology, "b3"), 256 * 1024, 2).expect("client");
    let to_ext = topology.client("a3", SocketAddr::from((EXT_IP, PORT)), 256 * 1024, 1).expect("client");
    assert!(to_pod.ok && to_ext.ok, "{to_pod:?} {to_ext:?}");
    assert_eq!(to_pod.peer_ips(), [topology.pod("a3").ip.to_string()]);
    for node in NodeId::ALL {
        let report = pods(&topology, node);
        assert_eq!(report.total_connections(), 0, "{} counted nothing: {report:?}", node.name());
        assert!(report.pod("a3").is_none() && report.pod("b3").is_none(), "opted-out pods are not enrolled");
    }
    let ebpf = topology.node_admin(NodeId::A, "/ebpf").expect("ebpf");
    assert!(ebpf.contains(r#""outbound_redirected": 0"#), "no redirect on node-a: {ebpf}");
}

#[test]
fn removing_a_pod_stops_capture_and_adding_it_back_restores_it() {
    let mut topology = started("capture_remove_readd");
    topology.serve("b3", PORT).expect("server");
    let to_b3 = addr(&topology, "b3");
    assert!(topology.client("a1", to_b3, 1024, 1).expect("client").ok);
    assert_eq!(pods(&topology, NodeId::A).pod("a1").expect("a1").outbound.connections, 1);

    topology.set_enrolled("a1", false).expect("rewrite manifests");
    assert!(
        eventually(Duration::from_secs(5), || pods(&topology, NodeId::A).pod("a1").is_none()),
        "a1 withdrawn after reload"
    );
    let report = topology.client("a1", to_b3, 1024, 2).expect("client");
    assert!(report.ok, "withdrawn pod still reaches its destination directly: {report:?}");
    let ebpf = topology.node_admin(NodeId::A, "/ebpf").expect("ebpf");
    assert!(ebpf.contains(r#""outbound_redirected": 1"#), "no new redirects after withdrawal: {ebpf}");
    let links = topology.node_admin(NodeId::A, "/ebpf").expect("ebpf");
    assert!(!links.contains("sk_lookup:demo:a1"), "a1's sk_lookup link detached: {links}");

    topology.set_enrolled("a1", true).expect("rewrite manifests");
    assert!(
        eventually(Duration::from_secs(5), || pods(&topology, NodeId::A).pod("a1").is_some()),
        "a1 enrolled again"
    );
    assert!(topology.client("a1", to_b3, 1024, 1).expect("client").ok);
    let a1 = pods(&topology, NodeId::A).pod("a1").expect("a1").outbound;
    assert_eq!(a1.connections, 1, "captured again (fresh counters after re-enrolment): {a1:?}");
}

#[test]
fn killed_node_fails_closed_and_restart_recaptures_within_two_seconds() {
    let topology = started("capture_kill_restart");
    topology.serve("b1", PORT).expect("server");
    topology.serve("a1", PORT).expect("server");
    assert!(topology.client("a1", addr(&topology, "b1"), 1024, 1).expect("client").ok);

    topology.kill_node(NodeId::A).expect("kill -9");
    let short = Duration::from_millis(1500);
    let out = topology.client_with("a1", addr(&topology, "b1"), 1024, 1, short).expect("client");
    assert_eq!(out.succeeded, 0, "enrolled a1's outbound must fail while node-a is down: {out:?}");
    let inbound = topology.client_with("b1", addr(&topology, "a1"), 1024, 1, short).expect("client");
    assert_eq!(inbound.succeeded, 0, "inbound to enrolled a1 must fail while node-a is down: {inbound:?}");
    let b1_out = pods(&topology, NodeId::B).pod("b1").expect("b1").outbound;
    assert_eq!(b1_out.connections, 1, "b1's attempt was captured on node-b, then refused at node-a");

    let restarted_at = Instant::now();
    topology.start_node(NodeId::A).expect("restart");
    let mut recaptured = None;
    while restarted_at.elapsed() < Duration::from_secs(5) {
        let report = topology.client_with("a1", addr(&topology, "b1"), 1024, 1, short).expect("client");
        if report.ok {
            recaptured = Some(restarted_at.elapsed());
            break;
        }
    }
    let recaptured = recaptured.expect("a1 reaches b1 again after the restart");
    let a1 = pods(&topology, NodeId::A).pod("a1").expect("a1").outbound;
    assert_eq!(a1.connections, 1, "the new mesh-node captured it: {a1:?}");
    assert!(recaptured < Duration::from_secs(2), "captured again {recaptured:?} after the restart");
    eprintln!("capture restored {recaptured:?} after restarting mesh-node");
    let links = topology.node_admin(NodeId::A, "/ebpf").expect("ebpf");
    assert!(links.contains("sk_lookup:demo:a1") && links.contains("connect4"), "{links}");
}

#[test]
fn connection_to_outside_the_mesh_keeps_the_pod_source_ip() {
    let topology = started("capture_external");
    topology.serve("ext", PORT).expect("server");
    let report = topology.client("a1", SocketAddr::from((EXT_IP, PORT)), 1024 * 1024, 2).expect("client");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.peer_ips(), [topology.pod("a1").ip.to_string()], "ext sees a1's own IP");
    let a1 = pods(&topology, NodeId::A).pod("a1").expect("a1").outbound;
    assert_eq!(a1.connections, 2, "counted as a1 outbound: {a1:?}");
    assert_eq!(pods(&topology, NodeId::B).total_connections(), 0, "nothing captured on node-b");
}

#[test]
fn thousand_concurrent_connections_across_pods_all_complete() {
    let topology = started("capture_thousand_concurrent");
    topology.serve("b1", PORT).expect("server");
    topology.serve("b2", PORT).expect("server");
    const PER_CLIENT: u32 = 250;
    const BYTES: u64 = 64 * 1024;
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = [("a1", "b1"), ("a1", "b2"), ("a2", "b1"), ("a2", "b2")]
            .into_iter()
            .map(|(from, to)| {
                let topology = &topology;
                s.spawn(move || topology.client(from, addr(topology, to), BYTES, PER_CLIENT).expect("client"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    for report in &reports {
        assert!(report.ok, "{} of {} failed: {:?}", report.failed, report.conns, report.errors);
        assert_eq!(report.bytes_received, BYTES * u64::from(PER_CLIENT));
    }
    let (a, b) = (pods(&topology, NodeId::A), pods(&topology, NodeId::B));
    let outbound: u64 = ["a1", "a2"].iter().map(|p| a.pod(p).expect("enrolled").outbound.connections).sum();
    let inbound: u64 = ["b1", "b2"].iter().map(|p| b.pod(p).expect("enrolled").inbound.connections).sum();
    assert_eq!((outbound, inbound), (1000, 1000));
}

#[test]
fn teardown_leaves_nothing_behind_and_a_rerun_works() {
    for _ in 0..2 {
        let topology = started("capture_teardown");
        topology.serve("b1", PORT).expect("server");
        assert!(topology.client("a1", addr(&topology, "b1"), 1024, 1).expect("client").ok);
        topology.teardown();
        assert_eq!(topology.leftovers(), Vec::<String>::new());
    }
}

#[test]
fn sigterm_leaves_capture_installed_failing_closed_until_the_next_mesh_node() {
    let topology = started("capture_sigterm");
    topology.serve("b1", PORT).expect("server");
    let status = topology.stop_node(NodeId::A, Duration::from_secs(5)).expect("graceful stop");
    assert!(status.success(), "mesh-node exits 0 on SIGTERM: {status}");
    let short = Duration::from_millis(1500);
    let out = topology.client_with("a1", addr(&topology, "b1"), 1024, 1, short).expect("client");
    assert_eq!(out.succeeded, 0, "capture stays installed after SIGTERM, failing closed: {out:?}");

    topology.start_node(NodeId::A).expect("restart");
    assert!(topology.client("a1", addr(&topology, "b1"), 1024, 1).expect("client").ok);
    assert_eq!(pods(&topology, NodeId::A).pod("a1").expect("a1").outbound.connections, 1);
}

#[test]
fn cleanup_uninstalls_capture_so_traffic_flows_directly() {
    let topology = started("capture_cleanup");
    topology.serve("b1", PORT).expect("server");
    topology.serve("a1", PORT).expect("server");
    topology.stop_node(NodeId::A, Duration::from_secs(5)).expect("graceful stop");
    let printed = topology.cleanup_node(NodeId::A).expect("mesh-node cleanup");

    let out = topology.client("a1", addr(&topology, "b1"), 64 * 1024, 1).expect("client");
    assert!(out.ok, "a1 is no longer captured on node-a ({printed}): {out:?}");
    assert_eq!(out.peer_ips(), [topology.pod("a1").ip.to_string()]);
    let inbound = topology.client("b2", addr(&topology, "a1"), 64 * 1024, 1).expect("client");
    assert!(inbound.ok, "nothing of node-a's capture is left to drop inbound traffic: {inbound:?}");
    // node-b still captures its side.
    let b = pods(&topology, NodeId::B);
    assert_eq!(b.pod("b1").expect("b1").inbound.connections, 1, "{b:?}");
    assert_eq!(b.pod("b2").expect("b2").outbound.connections, 1, "{b:?}");
    assert!(
        topology.cleanup_node(NodeId::A).expect("second cleanup").contains("nothing installed"),
        "cleanup is idempotent"
    );
}
