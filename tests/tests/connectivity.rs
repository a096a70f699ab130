//! End-to-end: `meshctl connectivity-test` against the meshed two-node topology, through the
//! context file the test bed writes (as an operator would run it against `cargo xtask demo`).
//!
//! meshctl places its own probes in the pods (their netns and a cgroup under the node's pods
//! cgroup), writes a Service and a DENY policy into mesh-control's config directory, and
//! captures packets in the client node's netns. The tests check the rows it reports, and that
//! whatever happens (all passing, checks failing, a Ctrl-C midway) it leaves no file, cgroup or
//! process behind.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nodemesh_testbed::{NodeId, Topology, eventually, process::find_binary};
use serde_json::Value;

const CHECKS: [&str; 5] =
    ["pod-to-pod-cross-node", "pod-to-pod-same-node", "pod-to-service", "mtls-on-the-wire", "deny-policy"];

/// A meshed topology where b1 carries a label only it has, so a Service can select it alone.
fn meshed(test: &str, config: &[(&str, &str)]) -> Topology {
    let mut topology = Topology::build(test).expect("topology");
    topology.label("b1", "app: b1").expect("label");
    for (name, yaml) in config {
        topology.write_config(name, yaml).expect("config");
    }
    topology.start_meshed(&[]).expect("meshed topology");
    topology
}

fn row<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no row {name} in {report:#}"))
}

/// Fails if meshctl left a file, a cgroup or a process of its own in the topology.
fn assert_nothing_left(topology: &Topology) {
    let files: Vec<String> = std::fs::read_dir(topology.state_dir())
        .expect("state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("meshctl-conntest"))
        .collect();
    assert!(files.is_empty(), "test objects left in the config directory: {files:?}");
    for node in NodeId::ALL {
        let pods = topology.cgroup_root().join(node.name()).join("pods");
        let left: Vec<String> = std::fs::read_dir(&pods)
            .expect("pods cgroup")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("meshctl-conntest"))
            .collect();
        assert!(left.is_empty(), "probe cgroups left under {}: {left:?}", pods.display());
    }
    let root = topology.cgroup_root().display().to_string();
    let probes: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            let probe = cmdline.split(|b| *b == 0).any(|arg| arg == b"probe");
            let ours = cgroup.lines().any(|l| l.contains(&root) && l.contains("meshctl-conntest"));
            (probe && ours).then(|| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect();
    assert!(probes.is_empty(), "probe processes left running: {probes:?}");
}

#[test]
fn every_check_passes_on_a_healthy_mesh() {
    let topology = meshed("connectivity_passes", &[]);
    let inbound_before =
        topology.node_pods(NodeId::B).expect("pods").pod("b1").expect("b1").inbound.connections;

    let (code, report) = topology
        .meshctl_json(&["connectivity-test"])
        .unwrap_or_else(|e| panic!("{e:#}\nnode-b log:\n{}", topology.node_log_tail(NodeId::B, 30)));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["passed"], true, "{report:#}");
    let names: Vec<&str> =
        report["checks"].as_array().expect("rows").iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, CHECKS, "one row per check, in order");
    for name in CHECKS {
        let check = row(&report, name);
        assert_eq!(check["status"], "pass", "{name}: {check:#}");
        assert!(
            check["duration_ms"].is_u64() && !check["detail"].as_str().unwrap_or_default().is_empty(),
            "{check}"
        );
    }
    // The default plan: a1 is the client, b1 (selectable by its label) the cross-node server,
    // a2 the same-node one; the server saw the client pod's own address.
    let detail = |name| row(&report, name)["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail("pod-to-pod-cross-node").contains("demo/a1 → demo/b1"), "{report:#}");
    assert!(detail("pod-to-pod-cross-node").contains("server saw 10.1.1.2"), "{report:#}");
    assert!(detail("pod-to-pod-same-node").contains("demo/a1 → demo/a2"), "{report:#}");
    assert!(detail("pod-to-service").contains("meshctl-conntest.demo"), "{report:#}");
    assert!(detail("mtls-on-the-wire").contains("marker never in clear"), "{report:#}");
    assert!(detail("deny-policy").contains("cluster.local/ns/demo/sa/a1"), "{report:#}");

    // The traffic was real: b1's node counted inbound connections (the checks' and the policy
    // retries'), and the HBONE streams came from a1's identity.
    let inbound_after =
        topology.node_pods(NodeId::B).expect("pods").pod("b1").expect("b1").inbound.connections;
    assert!(inbound_after >= inbound_before + 4, "b1 inbound connections {inbound_before} → {inbound_after}");
    assert!(
        topology.node_log_count(
            NodeId::B,
            &["HBONE stream accepted", "src.identity=spiffe://cluster.local/ns/demo/sa/a1"]
        ) > 0,
        "node-b accepted a1's streams over mTLS"
    );
    assert_nothing_left(&topology);
    // mesh-control is back to the manifests without the test objects.
    eventually("the test Service gone from node-a", Duration::from_secs(20), || {
        let traffic = topology.node_admin(NodeId::A, "/traffic").ok()?;
        (!traffic.contains("meshctl-conntest")).then_some(())
    });

    // The human form: the same rows as a table and a verdict.
    let run =
        topology.meshctl(&["connectivity-test", "--client", "demo/b2", "--server", "a1"]).expect("meshctl");
    println!("{}{}", run.stderr, run.stdout);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("CHECK"), "{}", run.stdout);
    assert!(run.stdout.contains("demo/b2 → demo/a1"), "{}", run.stdout);
    // a1 has no labels a Service could select it by: that check says so and is skipped.
    assert!(
        run.stdout.lines().any(|l| l.starts_with("pod-to-service") && l.contains("SKIP")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("checks passed (1 skipped)"), "{}", run.stdout);
    assert!(run.stderr.contains("[5/5] deny-policy"), "progress lines on stderr: {}", run.stderr);
    assert_nothing_left(&topology);
}

#[test]
fn a_deny_all_policy_fails_the_checks_and_meshctl_still_cleans_up() {
    let deny_all = "apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: demo
spec:
  action: DENY
  rules:
  - {}
";
    let topology = meshed("connectivity_deny_all", &[("deny-all", deny_all)]);

    let (code, report) = topology.meshctl_json(&["connectivity-test", "--keep-going"]).expect("meshctl");
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["passed"], false, "{report:#}");
    for name in ["pod-to-pod-cross-node", "pod-to-pod-same-node", "pod-to-service", "mtls-on-the-wire"] {
        let check = row(&report, name);
        assert_eq!(check["status"], "fail", "{name}: {check:#}");
        let detail = check["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("reset") || detail.contains("closed"), "{name} says how it failed: {detail}");
    }
    // Denied, as the check expects, but never flowing again: the namespace-wide policy stays.
    let deny = row(&report, "deny-policy");
    assert_eq!(deny["status"], "fail", "{deny:#}");
    assert!(deny["detail"].as_str().unwrap_or_default().contains("did not flow again"), "{deny:#}");
    assert_nothing_left(&topology);
    assert!(topology.state_dir().join("deny-all.yaml").exists(), "meshctl removes only its own objects");

    // Without --keep-going the first failure ends the run: the rest is skipped, not run.
    let (code, report) = topology.meshctl_json(&["connectivity-test"]).expect("meshctl");
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(row(&report, "pod-to-pod-cross-node")["status"], "fail");
    for name in &CHECKS[1..] {
        assert_eq!(row(&report, name)["status"], "skip", "{name}: {report:#}");
    }
    assert_nothing_left(&topology);
}

#[test]
fn an_interrupted_run_removes_its_objects_probes_and_cgroups() {
    let topology = meshed("connectivity_interrupted", &[]);
    // Without mesh-control the nodes keep serving (the pod checks pass) but never receive the
    // test Service: the run waits on it, with its file written and its probes running.
    topology.stop_control_plane().expect("stop mesh-control");
    let mut child = Command::new(find_binary("meshctl").expect("meshctl"))
        .arg("--context")
        .arg(topology.meshctl_context())
        .args(["connectivity-test", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, as a shell gives a foreground job: Ctrl-C reaches the group.
        .process_group(0)
        .spawn()
        .expect("meshctl");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    let service = topology.state_dir().join("meshctl-conntest.yaml");
    loop {
        let line =
            lines.next().and_then(Result::ok).unwrap_or_else(|| panic!("meshctl ended early:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("waiting until node-a routes the Service") {
            break;
        }
    }
    assert!(service.exists(), "the Service file is written while the run waits:\n{seen}");
    assert_eq!(probe_cgroups(&topology), 3, "a1's client, b1's and a2's servers have their cgroups");
    // Ctrl-C: SIGINT to meshctl and its probes (the group of our own child).
    // SAFETY: signalling our own child's process group.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("meshctl exits");
    assert_eq!(status.code(), Some(2), "an interrupted run is not a verdict:\n{seen}{}", rest.join("\n"));
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
    assert!(!service.exists(), "the Service file is removed");
    assert_nothing_left(&topology);
}

fn probe_cgroups(topology: &Topology) -> usize {
    NodeId::ALL
        .iter()
        .map(|node| {
            let pods = topology.cgroup_root().join(node.name()).join("pods");
            count_prefixed(&pods, "meshctl-conntest")
        })
        .sum()
}

fn count_prefixed(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).count()
        })
        .unwrap_or(0)
}

#[test]
fn without_a_config_directory_it_says_kubernetes_is_not_supported_yet() {
    let dir = std::env::temp_dir().join(format!("meshctl-conntest-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let context = dir.join("context.yaml");
    std::fs::write(&context, "controlPlane:\n  admin: 127.0.0.1:15014\nnodes: []\n").expect("context");
    let output = Command::new(find_binary("meshctl").expect("meshctl"))
        .arg("--context")
        .arg(&context)
        .arg("connectivity-test")
        .output()
        .expect("meshctl");
    std::fs::remove_dir_all(&dir).expect("cleanup");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("configDir") && stderr.contains("kind-up"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(output.stdout.is_empty());
}
