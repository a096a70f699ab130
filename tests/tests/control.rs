//! End-to-end: mesh-control distributes the mesh over delta xDS (local mode), and the data
//! path does not depend on it being up: pods enrol and leave by editing YAML, traffic survives
//! a control-plane outage, a node restarted during the outage serves from its persisted state,
//! and bad input (a malformed file, a resource nodes reject) disturbs nothing.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use nodemesh_testbed::{ClientReport, NodeId, Topology};
use serde_json::Value;

const PORT: u16 = 8080;

fn addr(topology: &Topology, pod: &str) -> SocketAddr {
    SocketAddr::from((topology.pod(pod).ip, PORT))
}

fn meshed(test: &str) -> Topology {
    let topology = Topology::build(test).expect("topology");
    topology.start_meshed(&[]).expect("meshed topology");
    topology
}

fn admin_json(topology: &Topology, node: NodeId, path: &str) -> Value {
    serde_json::from_str(&topology.node_admin(node, path).expect("admin")).expect("json")
}

fn control_json(topology: &Topology, path: &str) -> Value {
    serde_json::from_str(&topology.control_admin(path).expect("mesh-control admin")).expect("json")
}

fn enrolled_here(topology: &Topology, node: NodeId, pod: &str) -> bool {
    topology.node_pods(node).expect("pods").pod(pod).is_some()
}

fn workload_known(topology: &Topology, node: NodeId, pod: &str) -> bool {
    let config = admin_json(topology, node, "/config");
    config["workloads"].as_array().into_iter().flatten().any(|w| w["pod"] == format!("demo/{pod}"))
}

/// Polls `done` every 50 ms for up to `limit`; returns how long it took.
fn within(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn hbone_streams_to(topology: &Topology, pod: &str) -> usize {
    let identity = format!("dst.identity=spiffe://cluster.local/ns/demo/sa/{pod}");
    topology.node_log_count(NodeId::B, &["HBONE stream accepted", &identity])
}

#[test]
fn a_pod_added_to_the_yaml_is_enrolled_on_its_node_and_meshed_then_removed() {
    let mut topology = meshed("control_enrol");
    topology.serve("b3", PORT).expect("server");
    assert!(topology.client("a1", addr(&topology, "b3"), 1024, 1).expect("client").ok, "plain TCP before");
    assert_eq!(hbone_streams_to(&topology, "b3"), 0);

    topology.set_enrolled("b3", true).expect("enrol b3");
    let took = within(Duration::from_secs(10), "b3 meshed", || {
        enrolled_here(&topology, NodeId::B, "b3")
            && topology.client("a1", addr(&topology, "b3"), 1024, 1).is_ok_and(|r| r.ok)
            && hbone_streams_to(&topology, "b3") > 0
    });
    eprintln!("from the YAML change to the first mTLS connection to the new pod: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!enrolled_here(&topology, NodeId::A, "b3"), "enrolled only on its own node");
    assert!(workload_known(&topology, NodeId::A, "b3"), "and known to the other node, as a peer");

    topology.set_enrolled("b3", false).expect("withdraw b3");
    within(Duration::from_secs(10), "b3 withdrawn everywhere", || {
        !enrolled_here(&topology, NodeId::B, "b3") && !workload_known(&topology, NodeId::A, "b3")
    });
    let streams = hbone_streams_to(&topology, "b3");
    assert!(topology.client("a1", addr(&topology, "b3"), 1024, 1).expect("client").ok, "plain TCP again");
    assert_eq!(hbone_streams_to(&topology, "b3"), streams, "no longer through the mesh");
}

/// Runs request loops (new connections each time) a1 → b1 and b2 → a2 while `during` runs.
fn under_load(topology: &Topology, during: impl FnOnce()) -> Vec<ClientReport> {
    let running = AtomicBool::new(true);
    std::thread::scope(|s| {
        let loops = [("a1", "b1"), ("b2", "a2")].map(|(from, to)| {
            let running = &running;
            s.spawn(move || {
                let mut reports = Vec::new();
                while running.load(Ordering::Acquire) {
                    reports.push(topology.client(from, addr(topology, to), 16 * 1024, 2).expect("client"));
                }
                reports
            })
        });
        during();
        running.store(false, Ordering::Release);
        loops.into_iter().flat_map(|l| l.join().expect("load loop")).collect()
    })
}

fn assert_no_failures(reports: &[ClientReport], at_least: u32) {
    let requests: u32 = reports.iter().map(|r| r.conns).sum();
    let failed: Vec<_> = reports.iter().filter(|r| !r.ok).collect();
    assert!(failed.is_empty(), "{} of {requests} requests failed: {failed:?}", failed.len());
    assert!(requests >= at_least, "only {requests} requests");
    eprintln!("{requests} requests, none failed");
}

fn both_nodes_synced(topology: &Topology) -> bool {
    let nodes = control_json(topology, "/debug/nodes");
    ["node-a", "node-b"]
        .iter()
        .all(|n| nodes[n]["connected"] == true && nodes[n]["acked"].as_object().is_some_and(|a| a.len() >= 2))
}

#[test]
fn traffic_never_fails_while_mesh_control_is_down_and_nodes_converge_after() {
    let topology = meshed("control_outage");
    topology.serve("b1", PORT).expect("server");
    topology.serve("a2", PORT).expect("server");
    within(Duration::from_secs(5), "both nodes synced", || both_nodes_synced(&topology));
    let reports = under_load(&topology, || {
        std::thread::sleep(Duration::from_secs(10));
        topology.stop_control_plane().expect("stop mesh-control");
        std::thread::sleep(Duration::from_secs(40));
        topology.start_control_plane().expect("restart mesh-control");
        within(Duration::from_secs(20), "nodes reconnect and ACK", || both_nodes_synced(&topology));
        std::thread::sleep(Duration::from_secs(8));
    });
    assert_no_failures(&reports, 200);
    for node in NodeId::ALL {
        let config = admin_json(&topology, node, "/config");
        assert_eq!(config["xds"]["connected"], true, "{config}");
        assert_eq!(
            config["workloads"].as_array().map(Vec::len),
            Some(4),
            "the same mesh as before: {config}"
        );
    }
}

#[test]
fn a_node_restarted_while_mesh_control_is_down_serves_from_its_persisted_state() {
    let topology = meshed("control_restart_offline");
    topology.serve("b1", PORT).expect("server");
    topology.serve("a2", PORT).expect("server");
    topology.stop_control_plane().expect("stop mesh-control");
    topology.stop_node(NodeId::A, Duration::from_secs(10)).expect("stop node-a");

    let started = Instant::now();
    topology.start_node(NodeId::A).expect("node-a restarts without mesh-control");
    let outbound = topology.client("a1", addr(&topology, "b1"), 64 * 1024, 1).expect("client");
    let inbound = topology.client("b2", addr(&topology, "a2"), 64 * 1024, 1).expect("client");
    let took = started.elapsed();
    assert!(outbound.ok && inbound.ok, "{outbound:?} {inbound:?}");
    eprintln!("restart to serving (both directions, mTLS) with mesh-control down: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    let log = topology.node_log_text(NodeId::A);
    assert!(log.contains("serving the persisted config"), "{log}");
    assert!(log.contains("workload certificate restored from the state directory"), "{log}");
    let state = topology.node_state_dir().join("node-a");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&state).expect("state dir").permissions().mode() & 0o777, 0o700);
    for file in std::fs::read_dir(&state).expect("read").flatten() {
        let mode = file.metadata().expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is private", file.path().display());
    }

    topology.start_control_plane().expect("restart mesh-control");
    within(Duration::from_secs(20), "node-a resynced", || both_nodes_synced(&topology));
}

#[test]
fn bad_yaml_and_rejected_resources_leave_traffic_undisturbed_and_are_visible() {
    let topology = meshed("control_bad_input");
    topology.serve("b1", PORT).expect("server");
    let config_dir = topology.state_dir();

    // A malformed file: mesh-control keeps the last good state and says where the problem is.
    std::fs::write(config_dir.join("broken.yaml"), "kind: Pod\nmetadata: {name: [oops\n").expect("write");
    within(Duration::from_secs(5), "mesh-control reports the bad file", || {
        control_json(&topology, "/debug/config")["error"].as_str().is_some_and(|e| e.contains("broken.yaml"))
    });
    let error = control_json(&topology, "/debug/config")["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("broken.yaml:2"), "file and line: {error}");
    assert!(topology.control_admin("/metrics").expect("metrics").contains("nodemesh_config_errors_total"));
    assert!(topology.client("a1", addr(&topology, "b1"), 16 * 1024, 4).expect("client").ok);
    assert!(workload_known(&topology, NodeId::A, "b1"), "the mesh is unchanged");
    std::fs::remove_file(config_dir.join("broken.yaml")).expect("remove");

    // A pod claiming b1's address: valid YAML, but the nodes reject (NACK) that workload.
    let netns = nodemesh_testbed::netns::path(&topology.netns_name("b3"));
    let impostor = format!(
        "kind: Pod\napiVersion: v1\nmetadata: {{name: impostor, namespace: demo, annotations: {{nodemesh.io/netns: {}}}}}\n\
         spec: {{nodeName: node-b, serviceAccountName: impostor}}\nstatus: {{podIP: {}}}\n",
        netns.display(),
        topology.pod("b1").ip
    );
    std::fs::write(config_dir.join("impostor.yaml"), impostor).expect("write");
    within(Duration::from_secs(5), "both nodes NACK the impostor", || {
        let nodes = control_json(&topology, "/debug/nodes");
        ["node-a", "node-b"]
            .iter()
            .all(|n| nodes[n]["last_nack"].as_str().is_some_and(|m| m.contains("impostor")))
    });
    for node in NodeId::ALL {
        let config = admin_json(&topology, node, "/config");
        let rejected = config["rejected"].to_string();
        assert!(rejected.contains("already belongs to Kubernetes//Pod/demo/b1"), "{rejected}");
        let metrics = topology.node_metrics(node).expect("metrics");
        assert!(
            metrics.lines().any(|l| l.starts_with("nodemesh_xds_updates_total") && l.contains("nack")),
            "{metrics}"
        );
        assert!(topology.node_log_text(node).contains("rejecting invalid resources (NACK)"));
    }
    assert!(!enrolled_here(&topology, NodeId::B, "impostor"), "the impostor is not enrolled");
    let report = topology.client("a1", addr(&topology, "b1"), 16 * 1024, 4).expect("client");
    assert!(report.ok, "b1 still reachable, as b1: {report:?}");
}
