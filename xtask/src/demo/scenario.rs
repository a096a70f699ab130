//! The demo itself: two nodes, real pods, real traffic through the node proxies, and a report of
//! what each mesh-node captured. It drives the end-to-end test bed (`nodemesh_testbed`).

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use nodemesh_testbed::{ClientReport, NodeId, Topology, payload, topology::EXT_IP};

use crate::progress::Step;

const PORT: u16 = 8080;
const MIB: u64 = 1024 * 1024;

/// One client run of the demo: from a pod to a pod (or the external host).
struct Flow {
    from: &'static str,
    to: &'static str,
    bytes: u64,
    conns: u32,
    note: &'static str,
}

const FLOWS: [Flow; 6] = [
    Flow { from: "a1", to: "b1", bytes: 8 * MIB, conns: 1, note: "cross-node, both meshed: HBONE mTLS" },
    Flow { from: "a2", to: "b1", bytes: MIB, conns: 4, note: "4 parallel connections, one tunnel" },
    Flow { from: "b2", to: "a2", bytes: MIB, conns: 1, note: "the other direction" },
    Flow { from: "a3", to: "b3", bytes: MIB, conns: 1, note: "a3 and b3 opted out: not captured" },
    Flow { from: "a3", to: "b1", bytes: MIB, conns: 1, note: "plaintext into STRICT b1: refused" },
    Flow { from: "a1", to: "ext", bytes: MIB, conns: 1, note: "to a host outside the mesh: plain TCP" },
];

/// Shows what mesh-control distributed and what each node acknowledged.
fn print_configuration(topology: &Topology) -> anyhow::Result<()> {
    let config: serde_json::Value = serde_json::from_str(&topology.control_admin("/debug/config")?)?;
    let nodes: serde_json::Value = serde_json::from_str(&topology.control_admin("/debug/nodes")?)?;
    println!(
        "\nConfiguration (delta xDS from mesh-control, version {}): {} workloads, {} services",
        config["snapshot_version"].as_str().unwrap_or("?"),
        config["workloads"],
        config["services"]
    );
    for node in NodeId::ALL {
        let view: serde_json::Value = serde_json::from_str(&topology.node_admin(node, "/config")?)?;
        let sync = &nodes[node.name()];
        println!(
            "  {:<7} connected {:<5}  ACKed {} type(s)  meshed workloads known {}  state kept in {}",
            node.name(),
            sync["connected"],
            sync["acked"].as_object().map_or(0, |a| a.len()),
            view["workloads"].as_array().map_or(0, Vec::len),
            view["xds"]["persisted_at"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// Runs the demo on binaries already built (`cargo xtask demo` builds them, then runs this).
pub fn run() -> anyhow::Result<()> {
    let step = Step::start("creating two nodes, six pods and an external host (network namespaces)");
    let mut topology = Topology::build("demo")?;
    // A label only b1 carries: meshctl connectivity-test's Service selects its server by it.
    topology.label("b1", "app: echo")?;
    step.done_with(&format!("state and logs in {}", topology.state_dir().display()));
    let step = Step::start("starting mesh-control (CA and xDS, reading the YAML) on node-a");
    topology.start_control_plane()?;
    step.done();
    for node in NodeId::ALL {
        let step = Step::start(format!("starting mesh-node on {}", node.name()));
        topology.start_node(node)?;
        step.done();
    }
    let step = Step::start("waiting for workload certificates");
    wait_for_certificates(&topology)?;
    step.done();
    let step = Step::start("starting echo servers in b1, a2, b3 and ext");
    for server in ["b1", "a2", "b3", "ext"] {
        topology.serve(server, PORT)?;
    }
    step.done();

    print_configuration(&topology)?;

    println!("\nWorkload identities (SPIFFE X.509 SVIDs from mesh-control's CA; keys never left the node):");
    for node in NodeId::ALL {
        let certs: serde_json::Value = serde_json::from_str(&topology.node_admin(node, "/certs")?)?;
        for cert in certs["certificates"].as_array().into_iter().flatten() {
            println!(
                "  {:<7} {:<40} expires {}",
                node.name(),
                cert["identity"].as_str().unwrap_or("?"),
                cert["not_after"].as_str().unwrap_or("?")
            );
        }
    }

    println!("\nTraffic (every byte is echoed back and verified by the client):");
    println!(
        "  {:<11} {:>9} {:>6}  {:<22} {:<8} note",
        "flow", "bytes", "conns", "server saw client", "result"
    );
    // The link is captured during the first (meshed) flow only: later flows include plain TCP to
    // a host outside the mesh, which is clear text by design.
    let mut capture = None;
    for (i, flow) in FLOWS.iter().enumerate() {
        let to = if flow.to == "ext" { EXT_IP } else { topology.pod(flow.to).ip };
        let sniffer = if i == 0 { Some(topology.sniff_node_link()?) } else { None };
        let report = topology
            .client(flow.from, SocketAddr::from((to, PORT)), flow.bytes, flow.conns)
            .with_context(|| format!("client {} -> {}", flow.from, flow.to))?;
        if let Some(sniffer) = sniffer {
            capture = Some(sniffer.stop()?);
        }
        print_flow(flow, &report);
    }
    let capture = capture.context("the first flow was captured")?;
    let tls_records =
        capture.tcp_payloads(15008).iter().filter(|p| p.starts_with(&[0x17, 0x03, 0x03])).count();
    let in_clear = capture.contains(&payload::prefix(1, 32));
    println!(
        "\nOn the node-to-node link during a1→b1: {} frames, {} TLS 1.3 application-data records on \
         :15008; a1's payload seen in clear: {}",
        capture.frames.len(),
        tls_records,
        if in_clear { "YES (not encrypted!)" } else { "no" }
    );
    let tunnels =
        topology.node_log_text(NodeId::A).lines().filter(|l| l.contains("HBONE tunnel opened")).count();
    println!("HBONE tunnels opened by node-a: {tunnels} (streams are multiplexed)");

    println!("\nWhat each mesh-node captured (from its admin endpoint, 127.0.0.1:15000/pods):");
    for node in NodeId::ALL {
        let pods = topology.node_pods(node)?;
        println!("  {} ({} pods enrolled)", pods.node, pods.pods.len());
        println!(
            "    {:<6} {:<10} {:>11} {:>12} {:>12} {:>11} {:>12} {:>12}",
            "pod", "ip", "out conns", "out sent", "out recv", "in conns", "in recv", "in sent"
        );
        for pod in topology.pods().iter().filter(|p| p.node == node) {
            match pods.pod(&pod.name) {
                Some(p) => println!(
                    "    {:<6} {:<10} {:>11} {:>12} {:>12} {:>11} {:>12} {:>12}",
                    p.name,
                    p.ip,
                    p.outbound.connections,
                    human(p.outbound.bytes_sent),
                    human(p.outbound.bytes_received),
                    p.inbound.connections,
                    human(p.inbound.bytes_received),
                    human(p.inbound.bytes_sent)
                ),
                None => println!(
                    "    {:<6} {:<10} not enrolled (nodemesh.io/dataplane-mode: none): never captured",
                    pod.name,
                    pod.ip.to_string()
                ),
            }
        }
        let ebpf = topology.node_admin(node, "/ebpf")?;
        let stats: serde_json::Value = serde_json::from_str(&ebpf)?;
        let stat = |name: &str| stats["stats"][name].as_u64().unwrap_or(0);
        println!(
            "    kernel: {} outbound connects redirected, {} inbound steered to the proxy, {} proxy deliveries passed",
            stat("outbound_redirected"),
            stat("inbound_assigned"),
            stat("inbound_delivery_passed")
        );
    }
    let checks_passed = operate_with_meshctl(&topology)?;
    println!(
        "\nLogs of mesh-control, both mesh-nodes and the pods' apps: {}",
        topology.state_dir().display()
    );
    let step = Step::start("tearing down (processes, namespaces, cgroups, bpffs)");
    topology.teardown();
    step.done();
    if !checks_passed {
        bail!("meshctl connectivity-test found the mesh failing (its table above says where)");
    }
    Ok(())
}

/// Operates the running mesh as a person would, with meshctl and the context file the test bed
/// wrote when mesh-control started (every admin endpoint, inside its node's netns, and
/// mesh-control's config directory). The demo tears everything down at its end, so the commands
/// run here rather than being suggested for later. Returns whether connectivity-test passed.
fn operate_with_meshctl(topology: &Topology) -> anyhow::Result<bool> {
    let context = topology.meshctl_context();
    println!(
        "\nOperating the mesh with meshctl (context {}: mesh-control's and each node's admin \
         endpoint, inside the nodes' netns, and mesh-control's config directory):",
        context.display()
    );
    let commands: [(&[&str], &str); 3] = [
        (&["status"], "the control plane and every node"),
        (
            &["explain", "demo/a1", "demo/b1", "--port", "8080"],
            "why a1 → b1:8080 is allowed, and how it travels",
        ),
        (
            &["connectivity-test"],
            "probes in a1, a2 and b1; a Service, a packet capture and a DENY policy, all removed afterwards",
        ),
    ];
    let mut passed = true;
    for (args, what) in commands {
        let ok = run_meshctl(topology, &context, args, what)?;
        if args[0] == "connectivity-test" {
            passed = ok;
        }
    }
    // The traffic is over, so a policy may now deny what it sent: explain a request it denies.
    println!(
        "\n  Writing {DENY_ADMIN_FILE}.yaml (DENY GET/POST /admin* on pods labelled app: echo, i.e. b1):"
    );
    topology.write_config(DENY_ADMIN_FILE, DENY_ADMIN)?;
    wait_for_policy(topology, NodeId::B, "demo/deny-admin")?;
    let denied = ["explain", "demo/a1", "demo/b1", "--port", "8080", "--http", "GET /admin/users"];
    run_meshctl(topology, &context, &denied, "a request the new policy denies (exit 1: denied)")?;
    Ok(passed)
}

const DENY_ADMIN_FILE: &str = "deny-admin";
const DENY_ADMIN: &str = "apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: demo
spec:
  selector:
    matchLabels:
      app: echo
  action: DENY
  rules:
  - to:
    - operation:
        methods: [GET, POST]
        paths: [/admin*]
";

/// Waits until `node` enforces the policy `key` (it is in the node's `/traffic`).
fn wait_for_policy(topology: &Topology, node: NodeId, key: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !topology.node_admin(node, "/traffic")?.contains(&format!("\"{key}\"")) {
        if std::time::Instant::now() > deadline {
            bail!("{} did not receive the policy {key} within 15 s", node.name());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// Runs one meshctl command against the demo and prints it as a session; returns whether it
/// exited 0.
fn run_meshctl(
    topology: &Topology,
    context: &std::path::Path,
    args: &[&str],
    what: &str,
) -> anyhow::Result<bool> {
    let quoted: Vec<String> =
        args.iter().map(|a| if a.contains(' ') { format!("{a:?}") } else { (*a).to_owned() }).collect();
    println!("\n  $ meshctl --context {} {}    # {what}", context.display(), quoted.join(" "));
    let step = Step::start(format!("meshctl {}", args.join(" ")));
    let run = topology.meshctl(args)?;
    step.done();
    for line in run.stdout.lines() {
        if line.is_empty() { println!() } else { println!("    {line}") }
    }
    if run.code != 0 {
        // Exit 1: something it checked failed; 2: it could not do its job (says why).
        for line in run.stderr.lines().filter(|l| l.starts_with("meshctl:")) {
            println!("    {line}");
        }
        println!("    (exit code {})", run.code);
    }
    Ok(run.code == 0)
}

/// Waits until both nodes hold a certificate for each of their enrolled pods.
fn wait_for_certificates(topology: &Topology) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    for node in NodeId::ALL {
        loop {
            let certs: serde_json::Value = serde_json::from_str(&topology.node_admin(node, "/certs")?)?;
            let list = certs["certificates"].as_array().cloned().unwrap_or_default();
            if !list.is_empty() && list.iter().all(|c| c["serial"].is_string()) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("{} has no workload certificates: {certs}", node.name());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Ok(())
}

fn print_flow(flow: &Flow, report: &ClientReport) {
    let result = if report.ok {
        "ok".to_owned()
    } else if report.succeeded == 0 && flow.note.contains("refused") {
        "refused".to_owned()
    } else {
        format!("FAILED: {}", report.errors.first().cloned().unwrap_or_default())
    };
    println!(
        "  {:<11} {:>9} {:>6}  {:<22} {:<8} {}",
        format!("{}→{}", flow.from, flow.to),
        human(report.bytes_sent),
        flow.conns,
        report.peer_ips().join(","),
        result,
        flow.note
    );
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1024 * 1024 => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        b if b >= 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
