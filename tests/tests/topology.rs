//! The test bed on its own, without mesh-node: the topology routes pod to pod across nodes and
//! to the external host with real source addresses, apps run in their pods' cgroups, and
//! teardown (explicit, on drop, or by the next run after a crash) leaves nothing behind.

use std::net::SocketAddr;

use nodemesh_testbed::{Topology, topology::EXT_IP};

const PORT: u16 = 8080;

/// Returns the cgroup v2 path of a process (`0::/...`), relative to the cgroup2 mount.
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/<pid>/cgroup");
    text.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 line").to_owned()
}

/// Returns whether a process is still alive (a reaped or zombie process is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

#[test]
fn without_the_mesh_pods_reach_each_other_and_the_outside_with_their_own_ips() {
    // Longer than a netns-safe name: the test bed shortens it with a hash.
    let topology =
        Topology::build("topology_without_the_mesh_pods_reach_each_other_and_the_outside").expect("topology");
    assert!(topology.name().len() <= 40, "{}", topology.name());
    let b3 = topology.serve("b3", PORT).expect("server");
    topology.serve("b1", PORT).expect("server");
    topology.serve("a2", PORT).expect("server");
    topology.serve("ext", PORT).expect("server");
    let pod = |name: &str| SocketAddr::from((topology.pod(name).ip, PORT));
    let ext = SocketAddr::from((EXT_IP, PORT));

    for (from, to) in [("a3", pod("b3")), ("a1", pod("b1")), ("a1", pod("a2")), ("a1", ext), ("b2", ext)] {
        let report = topology.client(from, to, 256 * 1024, 2).expect("client");
        assert!(report.ok, "{from} -> {to}: {report:?}");
        assert_eq!(report.peer_ips(), [topology.pod(from).ip.to_string()], "{from} -> {to} keeps its IP");
    }
    let report = topology.client("ext", pod("b1"), 1024, 1).expect("client");
    assert!(report.ok && report.peer_ips() == [EXT_IP.to_string()], "ext reaches pods: {report:?}");

    // Apps run in their pod's cgroup (joined before exec), external ones in the topology's.
    let expected = format!("/nodemesh-test/{}/node-b/pods/b3", topology.name());
    assert_eq!(cgroup_of(b3.pid), expected);

    // A stopped server refuses.
    topology.stop_server(&b3).expect("stop");
    assert!(!alive(b3.pid));
    let refused = topology.client("a3", pod("b3"), 1024, 1).expect("client");
    assert_eq!(refused.failed, 1, "{refused:?}");
    assert!(refused.errors[0].contains("refused"), "{refused:?}");
}

#[test]
fn the_next_run_sweeps_what_an_interrupted_run_left_and_teardown_leaves_nothing() {
    const NAME: &str = "topology_interrupted_run";
    let crashed = Topology::build(NAME).expect("topology");
    let servers = [crashed.serve("b1", PORT).expect("server"), crashed.serve("ext", PORT).expect("server")];
    let dir = crashed.cgroup_root().to_owned();
    // As if the test process died: no teardown, processes, netns, cgroups and the mount stay.
    std::mem::forget(crashed);
    assert!(dir.exists());

    let rerun = Topology::build(NAME).expect("a rerun builds over the leftovers");
    for server in &servers {
        assert!(!alive(server.pid), "the interrupted run's server in {} was ended", server.place);
    }
    rerun.serve("b1", PORT).expect("server");
    let to = SocketAddr::from((rerun.pod("b1").ip, PORT));
    assert!(rerun.client("a1", to, 1024, 1).expect("client").ok);

    rerun.teardown();
    assert_eq!(rerun.leftovers(), Vec::<String>::new());
    rerun.teardown(); // idempotent
    drop(rerun);
    assert!(!dir.exists());
}
