//! End-to-end: Kubernetes enrolment through the CNI plugin. A pod being created (known to
//! mesh-control with no address yet, as the API server shows it) is announced by the chained
//! plugin, as the container runtime runs it, with the sandbox's netns and the main plugin's
//! result; the plugin returns only once the pod is captured, so the pod's first connection
//! already goes through mTLS. When it cannot be captured, the pod's creation fails.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nodemesh_testbed::{NodeId, Topology, eventually, netns, process::find_binary};
use serde_json::{Value, json};

const PORT: u16 = 8080;
/// The pod the test creates through the CNI plugin (on node-a).
const NEW_POD: &str = "a2";
const WAIT: Duration = Duration::from_secs(10);
/// The container ID of the pod's sandbox.
const SANDBOX: &str = "sandbox-1";

fn socket(topology: &Topology, node: NodeId) -> PathBuf {
    topology.state_dir().join(format!("{}-cni.sock", node.name()))
}

/// What the plugin printed and how it exited.
#[derive(Debug)]
struct CniRun {
    ok: bool,
    stdout: Value,
    stderr: String,
    took: Duration,
}

/// Runs the plugin as a container runtime would: `CNI_*` variables and the network config
/// (with the main plugin's result) on stdin.
fn cni(
    topology: &Topology,
    command: &str,
    namespace: &str,
    pod: &str,
    sandbox: &str,
    timeout_secs: u64,
) -> CniRun {
    let ip = topology.pod(NEW_POD).ip;
    let config = json!({
        "cniVersion": "1.0.0", "name": "testbed", "type": "nodemesh-cni",
        "agentSocket": socket(topology, NodeId::A), "timeoutSeconds": timeout_secs,
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                       "ips": [{"address": format!("{ip}/24"), "interface": 0}]}
    });
    let started = Instant::now();
    let mut child = Command::new(find_binary("mesh-node").expect("mesh-node"))
        .arg("cni")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", netns::path(&topology.netns_name(NEW_POD)))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID=u1"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the plugin");
    child.stdin.take().expect("stdin").write_all(config.to_string().as_bytes()).expect("config");
    let output = child.wait_with_output().expect("plugin output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    CniRun {
        ok: output.status.success(),
        stdout: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// mesh-control's view of the pod being created: scheduled on node-a, with no address yet
/// unless the kubelet has reported one.
fn describe_new_pod(topology: &Topology, reported_ip: bool) {
    let status = if reported_ip { format!("  podIP: {}\n", topology.pod(NEW_POD).ip) } else { String::new() };
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {NEW_POD}\n  namespace: demo\nspec:\n  nodeName: node-a\n  serviceAccountName: {NEW_POD}\nstatus:\n  phase: Pending\n{status}"
    );
    let path = topology.state_dir().join("new-pod.yaml");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
}

fn pods_json(topology: &Topology) -> Value {
    serde_json::from_str(&topology.node_admin(NodeId::A, "/pods").expect("pods")).expect("json")
}

fn enrolled(topology: &Topology) -> bool {
    pods_json(topology)["pods"].as_array().is_some_and(|pods| pods.iter().any(|p| p["name"] == NEW_POD))
}

fn streams_from_new_pod(topology: &Topology) -> usize {
    let identity = format!("src.identity=spiffe://cluster.local/ns/demo/sa/{NEW_POD}");
    topology.node_log_count(NodeId::B, &["HBONE stream accepted", &identity])
}

#[test]
fn a_pod_created_through_the_cni_plugin_is_captured_from_its_first_connection() {
    let mut topology = Topology::build("cni_enrol").expect("topology");
    topology.set_listed(NEW_POD, false).expect("a2 is created by the test");
    let sock = topology.state_dir().join("{node}-cni.sock");
    topology
        .start_meshed_with(
            &["--pod-netns-from-cni"],
            &["--cni-socket", &sock.to_string_lossy(), "--cni-timeout-secs", "10"],
        )
        .expect("mesh");
    topology.serve("b1", PORT).expect("server");
    let b1 = SocketAddr::from((topology.pod("b1").ip, PORT));

    // mesh-control has not seen the pod yet and its namespace is ambient: the plugin holds it,
    // then fails its creation rather than let it start uncaptured.
    let early = cni(&topology, "ADD", "demo", NEW_POD, SANDBOX, 1);
    assert!(!early.ok, "{early:?}");
    assert_eq!(early.stdout["code"], 100, "{early:?}");
    assert!(early.stdout["details"].as_str().unwrap_or("").contains("has not sent pod demo/a2"), "{early:?}");
    // As a runtime does after a failed ADD, it tears the sandbox down.
    assert!(cni(&topology, "DEL", "demo", NEW_POD, SANDBOX, 5).ok);

    // The API server shows the pod scheduled on node-a, no address yet: node-a waits for the CNI.
    describe_new_pod(&topology, false);
    eventually("node-a lists demo/a2 as awaiting the CNI plugin", WAIT, || {
        (pods_json(&topology)["awaiting_cni"] == json!(["demo/a2"])).then_some(())
    });
    let add = cni(&topology, "ADD", "demo", NEW_POD, SANDBOX, 10);
    assert!(add.ok, "{add:?}");
    assert_eq!(
        add.stdout["ips"][0]["address"],
        format!("{}/24", topology.pod(NEW_POD).ip),
        "prevResult passed on"
    );
    eprintln!("CNI ADD to captured: {:?}", add.took);

    // The app's very first connection is captured and carried over mTLS.
    assert_eq!(streams_from_new_pod(&topology), 0);
    let first = topology.client(NEW_POD, b1, 4096, 1).expect("client");
    assert!(first.ok, "{first:?}");
    assert_eq!(streams_from_new_pod(&topology), 1, "the first connection went through HBONE");
    assert_eq!(pods_json(&topology)["awaiting_cni"], json!([]));
    let metrics = topology.node_metrics(NodeId::A).expect("metrics");
    for counted in [r#"command="add",outcome="enrolled"} 1"#, r#"command="add",outcome="failed"} 1"#] {
        assert!(
            metrics.contains(&format!("nodemesh_cni_requests_total{{{counted}")),
            "{counted}:\n{metrics}"
        );
    }

    // The kubelet reports the address: peers reach the pod through the mesh, and node-a keeps
    // the enrolment it already had (the same counters, not a re-created pod).
    describe_new_pod(&topology, true);
    topology.serve(NEW_POD, PORT).expect("server in a2");
    let a2 = SocketAddr::from((topology.pod(NEW_POD).ip, PORT));
    eventually("b1 reaches a2 through the mesh", WAIT, || {
        topology.client("b1", a2, 1024, 1).ok().filter(|r| r.ok).map(|_| ())
    });
    let pods = topology.node_pods(NodeId::A).expect("pods");
    assert_eq!(pods.pod(NEW_POD).expect("a2").outbound.connections, 1, "not re-enrolled");
    assert!(pods.pod(NEW_POD).expect("a2").inbound.connections >= 1, "inbound captured");

    // A restarted mesh-node re-adopts the pod from what the plugin reported.
    topology.kill_node(NodeId::A).expect("kill node-a");
    topology.start_node(NodeId::A).expect("restart node-a");
    assert!(enrolled(&topology), "re-adopted: {}", pods_json(&topology));

    // DEL of an older sandbox of the same pod changes nothing; DEL of this one releases it,
    // and its traffic is no longer captured (b1 is STRICT: plaintext is refused).
    let stale = cni(&topology, "DEL", "demo", NEW_POD, "an-older-sandbox", 5);
    assert!(stale.ok && enrolled(&topology), "{stale:?}");
    let del = cni(&topology, "DEL", "demo", NEW_POD, SANDBOX, 5);
    assert!(del.ok, "{del:?}");
    assert!(!enrolled(&topology), "released: {}", pods_json(&topology));
    let uncaptured = topology.client(NEW_POD, b1, 1024, 1).expect("client");
    assert_eq!(uncaptured.succeeded, 0, "no longer captured, so STRICT b1 refuses it: {uncaptured:?}");
}

#[test]
fn without_its_agent_the_plugin_fails_pod_creation_except_in_exempt_namespaces() {
    let mut topology = Topology::build("cni_agent_down").expect("topology");
    topology.set_listed(NEW_POD, false).expect("a2 is created by the test");
    let sock = topology.state_dir().join("{node}-cni.sock");
    topology
        .start_meshed_with(&["--pod-netns-from-cni"], &["--cni-socket", &sock.to_string_lossy()])
        .expect("mesh");

    // A pod of a namespace outside the mesh starts at once, uncaptured.
    let plain = cni(&topology, "ADD", "default", "web", SANDBOX, 5);
    assert!(plain.ok, "{plain:?}");
    assert!(plain.took < Duration::from_secs(2), "not held: {:?}", plain.took);

    topology.kill_node(NodeId::A).expect("kill node-a");
    let refused = cni(&topology, "ADD", "demo", NEW_POD, SANDBOX, 5);
    assert!(!refused.ok, "{refused:?}");
    assert_eq!(refused.stdout["code"], 11, "try again later: {refused:?}");
    assert!(refused.stdout["msg"].as_str().unwrap_or("").contains("not reachable"), "{refused:?}");
    assert!(refused.stderr.contains("mesh-node"), "{refused:?}");

    let system = cni(&topology, "ADD", "kube-system", "coredns", SANDBOX, 5);
    assert!(system.ok, "exempt namespaces never wait for the agent: {system:?}");
    let teardown = cni(&topology, "DEL", "demo", NEW_POD, SANDBOX, 5);
    assert!(teardown.ok, "DEL never blocks a pod's teardown: {teardown:?}");
}
