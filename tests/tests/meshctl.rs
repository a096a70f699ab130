//! End-to-end: `meshctl check`, `meshctl status` and `meshctl proxy-config` as an operator runs
//! them, against a meshed two-node topology (mTLS, a Service, a policy and a route written into
//! mesh-control's config directory) through the topology's context file. Every `-o json` value
//! is compared with what the topology set up or with the endpoints meshctl reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use nodemesh_testbed::{NodeId, Topology, eventually, process::find_binary};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const WEB_VIP: &str = "10.96.0.10";
const APP: u16 = 8080;
/// The port of the plain TCP stream the connections view is checked with.
const STREAM: u16 = 9000;

const WEB: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs:
  - 10.96.0.10
  selector:
    app: web
  ports:
  - name: http
    protocol: TCP
    appProtocol: http
    port: 80
    targetPort: 8080
";

const ALLOW_GET: &str = "apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: demo
spec:
  selector:
    matchLabels:
      tier: gated
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [\"GET\"]
";

const WEB_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
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
  - backendRefs:
    - name: web
      port: 80
";

fn identity(pod: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{pod}")
}

fn mesh_control_log(topology: &Topology) -> String {
    std::fs::read_to_string(topology.state_dir().join("mesh-control.log")).unwrap_or_default()
}

/// The meshed topology: b1 and b2 behind the Service `web` with `web-route` attached; b2 alone
/// selected by `allow-get` (b1 takes the plain TCP stream of the connections check).
fn meshed(test: &str, with_config: bool) -> Topology {
    let mut topology = Topology::build(test).expect("topology");
    if with_config {
        for (pod, label) in [("b1", "app: web"), ("b2", "app: web"), ("b2", "tier: gated")] {
            topology.label(pod, label).expect("label");
        }
        for (name, yaml) in [("web", WEB), ("allow-get", ALLOW_GET), ("web-route", WEB_ROUTE)] {
            topology.write_config(name, yaml).expect("config");
        }
    }
    topology
        .start_meshed(&[])
        .unwrap_or_else(|e| panic!("{e:#}\nmesh-control log:\n{}", mesh_control_log(&topology)));
    topology
}

fn meshctl_json(topology: &Topology, args: &[&str]) -> (i32, Value) {
    topology.meshctl_json(args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn control_json(topology: &Topology, path: &str) -> Value {
    let body = topology.control_admin(path).unwrap_or_else(|e| panic!("mesh-control {path}: {e:#}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("mesh-control {path}: {e}: {body}"))
}

fn node_json(topology: &Topology, node: NodeId, path: &str) -> Value {
    let body = topology.node_admin(node, path).unwrap_or_else(|e| panic!("{} {path}: {e:#}", node.name()));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{} {path}: {e}: {body}", node.name()))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// The enrolled pods of `node` (what the topology enrolled, not what the node says).
fn enrolled(topology: &Topology, node: NodeId) -> Vec<String> {
    topology.pods().iter().filter(|p| p.node == node && p.enrolled).map(|p| p.name.clone()).collect()
}

fn items<'a>(report: &'a Value, key: &str, node: &str) -> Vec<&'a Value> {
    report[key].as_array().into_iter().flatten().filter(|i| i["node"] == node).collect()
}

#[test]
fn status_and_proxy_config_show_the_mesh_as_the_nodes_hold_it() {
    nodemesh_testbed::require_root().expect("root");
    let topology = meshed("meshctl_views", true);
    let snapshot =
        control_json(&topology, "/debug/config")["snapshot_version"].as_str().expect("version").to_owned();

    // ---- status: both nodes connected, every type ACKed, holding mesh-control's config.
    let status = eventually("meshctl status passes", WAIT, || {
        let (code, status) = meshctl_json(&topology, &["status"]);
        (code == 0 && status["passed"] == true).then_some(status)
    });
    let cp = &status["control_plane"];
    assert_eq!((cp["reachable"].as_bool(), cp["ready"].as_bool()), (Some(true), Some(true)), "{cp:#}");
    let config = &cp["config"];
    assert_eq!(config["version"], snapshot.as_str(), "{config:#}");
    assert_eq!(
        (config["services"].as_u64(), config["policies"].as_u64(), config["routes"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(config["workloads"], control_json(&topology, "/debug/config")["workloads"]);
    assert_eq!(
        (cp["policies_not_accepted"].clone(), cp["routes_not_accepted"].clone()),
        (Value::from(Vec::<Value>::new()), Value::from(Vec::<Value>::new()))
    );
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    for (report, node) in nodes.iter().zip(NodeId::ALL) {
        let name = node.name();
        assert_eq!(report["name"], name);
        for key in ["reachable", "ready", "connected", "in_sync"] {
            assert_eq!(report[key], true, "{name} {key}: {report:#}");
        }
        assert_eq!(report["config_version"], snapshot.as_str(), "{report:#}");
        let types: BTreeMap<String, String> = report["xds"]
            .as_array()
            .expect("xds")
            .iter()
            .map(|t| {
                (t["type"].as_str().unwrap_or("?").to_owned(), t["state"].as_str().unwrap_or("?").to_owned())
            })
            .collect();
        let acked: BTreeMap<String, String> = ["Address", "Authorization", "HttpRoute", "MeshConfig"]
            .iter()
            .map(|t| ((*t).to_owned(), "ACK".to_owned()))
            .collect();
        assert_eq!(types, acked, "{name}");
        let pods = enrolled(&topology, node);
        let names: BTreeSet<String> = pods.iter().map(|p| format!("demo/{p}")).collect();
        assert_eq!(strings(&report["pods"]["names"]), names, "{name}");
        assert_eq!(report["pods"]["count"], pods.len());
        let identities: BTreeSet<String> = report["certificates"]
            .as_array()
            .expect("certs")
            .iter()
            .map(|c| c["identity"].as_str().unwrap_or("?").to_owned())
            .collect();
        assert_eq!(
            identities,
            pods.iter().map(|p| identity(p)).collect(),
            "certificates for exactly the enrolled pods"
        );
        for cert in report["certificates"].as_array().into_iter().flatten() {
            let left = cert["expires_in_secs"].as_i64().expect("time left");
            assert!(left > 0 && left <= 48 * 3600, "{cert}");
            assert!(cert["last_error"].is_null(), "{cert}");
        }
        assert_eq!(report["problems"], Value::from(Vec::<Value>::new()));
    }

    // The same facts as a table (header line, one row per node) and as YAML.
    let table = topology.meshctl(&["status"]).expect("meshctl");
    assert_eq!(table.code, 0, "{}{}", table.stdout, table.stderr);
    let header =
        table.stdout.lines().find(|l| l.starts_with("NODE")).unwrap_or_else(|| panic!("{}", table.stdout));
    for column in ["REACHABLE", "READY", "CONNECTED", "CONFIG", "XDS", "PODS", "CERTIFICATES"] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        table.stdout.lines().any(|l| l.starts_with("node-a ") && l.contains("Address ACK")),
        "{}",
        table.stdout
    );
    let yaml = topology.meshctl(&["status", "-o", "yaml"]).expect("meshctl");
    let parsed: Value =
        serde_saphyr::from_str(&yaml.stdout).unwrap_or_else(|e| panic!("{e}: {}", yaml.stdout));
    assert_eq!(parsed["nodes"][1]["name"], "node-b");
    assert_eq!(parsed["control_plane"]["config"]["version"], snapshot.as_str());

    // ---- proxy-config workloads: the enrolled pods of both nodes, with their IPs.
    let (code, workloads) = meshctl_json(&topology, &["proxy-config", "workloads", "--node", "node-a"]);
    assert_eq!(code, 0);
    let seen: BTreeMap<String, String> = items(&workloads, "workloads", "node-a")
        .iter()
        .map(|w| (w["pod"].as_str().unwrap_or("?").to_owned(), w["ip"].as_str().unwrap_or("?").to_owned()))
        .collect();
    let want: BTreeMap<String, String> = topology
        .pods()
        .iter()
        .filter(|p| p.enrolled)
        .map(|p| (format!("demo/{}", p.name), p.ip.to_string()))
        .collect();
    assert_eq!(seen, want, "{workloads:#}");
    assert_eq!(workloads["workloads"].as_array().map(Vec::len), Some(want.len()), "only node-a's view");
    let b1 = items(&workloads, "workloads", "node-a")
        .into_iter()
        .find(|w| w["pod"] == "demo/b1")
        .cloned()
        .expect("b1");
    assert_eq!((b1["pod_node"].as_str(), b1["service_account"].as_str()), (Some("node-b"), Some("b1")));
    assert_eq!(strings(&b1["policies"]), BTreeSet::new(), "{b1}");
    let b2 = items(&workloads, "workloads", "node-a")
        .into_iter()
        .find(|w| w["pod"] == "demo/b2")
        .cloned()
        .expect("b2");
    assert_eq!(strings(&b2["policies"]), BTreeSet::from(["demo/allow-get".to_owned()]), "{b2}");

    // ---- services, policies, routes: every node's view (NODE column), as written.
    let (code, services) = meshctl_json(&topology, &["proxy-config", "services"]);
    assert_eq!(code, 0);
    let endpoints: BTreeSet<String> =
        ["b1", "b2"].iter().map(|p| SocketAddr::from((topology.pod(p).ip, APP)).to_string()).collect();
    for node in NodeId::ALL {
        let list = items(&services, "services", node.name());
        assert_eq!(list.len(), 1, "{services:#}");
        let web = list[0];
        assert_eq!(web["service"], "demo/web");
        assert_eq!(strings(&web["vips"]), BTreeSet::from([WEB_VIP.to_owned()]));
        assert_eq!(web["ports"][0]["port"], 80);
        assert_eq!(web["ports"][0]["target_port"], APP);
        let addrs: BTreeSet<String> = web["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| e["addr"].as_str().unwrap_or("?").to_owned())
            .collect();
        assert_eq!(addrs, endpoints, "{web:#}");
        let ids: BTreeSet<String> = web["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["identity"].as_str().unwrap_or("?").to_owned())
            .collect();
        assert_eq!(ids, BTreeSet::from([identity("b1"), identity("b2")]));
    }
    let (_, policies) = meshctl_json(&topology, &["proxy-config", "policies"]);
    let (_, routes) = meshctl_json(&topology, &["proxy-config", "routes"]);
    for node in NodeId::ALL {
        let list = items(&policies, "policies", node.name());
        assert_eq!(list.len(), 1, "{policies:#}");
        assert_eq!(list[0]["policy"], "demo/allow-get");
        assert_eq!(list[0]["action"], "Allow");
        assert_eq!(list[0]["http_rules"], true);
        assert_eq!(strings(&list[0]["workloads"]), BTreeSet::from(["demo/b2".to_owned()]));
        let list = items(&routes, "routes", node.name());
        assert_eq!(
            list.iter().map(|r| r["route"].clone()).collect::<Vec<_>>(),
            ["demo/web-route"],
            "{routes:#}"
        );
    }
    let table = topology.meshctl(&["proxy-config", "services"]).expect("meshctl");
    assert!(table.stdout.starts_with("NODE     SERVICE"), "{}", table.stdout);
    assert_eq!(table.stdout.lines().filter(|l| l.contains("demo/web")).count(), 2, "{}", table.stdout);

    // ---- certs: exactly each node's /certs.
    let (_, certs) = meshctl_json(&topology, &["proxy-config", "certs"]);
    for node in NodeId::ALL {
        let direct = node_json(&topology, node, "/certs")["certificates"].clone();
        let shown: Vec<Value> = items(&certs, "certs", node.name())
            .into_iter()
            .map(|c| {
                let mut c = c.clone();
                c.as_object_mut().expect("object").remove("node");
                c
            })
            .collect();
        assert_eq!(Value::from(shown), direct, "{}", node.name());
    }

    // ---- connections: a live stream a1 → b1 seen on both ends.
    // Not the Service's port: that one is declared HTTP, and the echo server speaks first.
    topology.serve("b1", STREAM).expect("echo server in b1");
    let to = SocketAddr::from((topology.pod("b1").ip, STREAM));
    let report = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            topology.client_spread("a1", to, 4 * 64 * 1024, 1, Duration::from_secs(5), Duration::from_secs(8))
        });
        let (code, live) =
            eventually("the live connection in meshctl proxy-config connections", WAIT, || {
                let (code, live) = meshctl_json(&topology, &["proxy-config", "connections"]);
                let both = ["node-a", "node-b"].iter().all(|n| {
                    items(&live, "connections", n).iter().any(|c| c["destination"] == to.to_string())
                });
                both.then_some((code, live))
            });
        assert_eq!(code, 0);
        let out = items(&live, "connections", "node-a")
            .into_iter()
            .find(|c| c["destination"] == to.to_string())
            .cloned()
            .expect("outbound");
        assert_eq!(
            (out["direction"].as_str(), out["pod"].as_str()),
            (Some("outbound"), Some("demo/a1")),
            "{out}"
        );
        assert_eq!(out["source_identity"], identity("a1"), "{out}");
        assert_eq!(out["destination_identity"], identity("b1"), "{out}");
        let inb = items(&live, "connections", "node-b")
            .into_iter()
            .find(|c| c["destination"] == to.to_string())
            .cloned()
            .expect("inbound");
        assert_eq!(
            (inb["direction"].as_str(), inb["pod"].as_str()),
            (Some("inbound"), Some("demo/b1")),
            "{inb}"
        );
        let table = topology.meshctl(&["proxy-config", "connections", "--node", "node-a"]).expect("meshctl");
        let header = table.stdout.lines().next().unwrap_or_default();
        assert!(
            header.starts_with("ID ")
                && header.contains("SOURCE IDENTITY")
                && header.contains("BYTES RECEIVED"),
            "{header}"
        );
        assert!(
            table.stdout.contains(&identity("a1")) && table.stdout.contains(&to.to_string()),
            "{}",
            table.stdout
        );
        running.join().expect("client thread")
    });
    let report = report.expect("client");
    assert!(report.ok, "{report:?}");

    // ---- an unknown node: exit 2 and one line naming the known ones.
    let unknown = topology.meshctl(&["proxy-config", "certs", "--node", "node-z"]).expect("meshctl");
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert_eq!(unknown.stderr.lines().count(), 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("node-z") && unknown.stderr.contains("known: node-a, node-b"),
        "{unknown:?}"
    );
    assert!(unknown.stdout.is_empty(), "{unknown:?}");
}

#[test]
fn status_reports_a_stopped_node_unreachable_and_fails() {
    nodemesh_testbed::require_root().expect("root");
    let topology = meshed("meshctl_down", false);
    eventually("meshctl status passes", WAIT, || {
        let (code, status) = meshctl_json(&topology, &["status"]);
        (code == 0 && status["passed"] == true).then_some(())
    });
    topology.stop_node(NodeId::B, Duration::from_secs(10)).expect("node-b stops");

    let status = eventually("mesh-control sees node-b gone", WAIT, || {
        let (code, status) = meshctl_json(&topology, &["status"]);
        assert_eq!(code, 1, "a stopped node fails the status: {status:#}");
        (status["nodes"][1]["connected"] == false).then_some(status)
    });
    assert_eq!(status["passed"], false);
    let (a, b) = (&status["nodes"][0], &status["nodes"][1]);
    assert_eq!((a["name"].as_str(), a["reachable"].as_bool()), (Some("node-a"), Some(true)));
    assert_eq!(a["problems"], Value::from(Vec::<Value>::new()), "node-a is fine: {a:#}");
    assert_eq!((b["name"].as_str(), b["reachable"].as_bool()), (Some("node-b"), Some(false)), "{b:#}");
    assert!(b["error"].as_str().is_some_and(|e| e.contains("15000")), "the error names the endpoint: {b:#}");
    assert!(strings(&b["problems"]).iter().any(|p| p.starts_with("admin endpoint unreachable")), "{b:#}");
    assert_eq!(status["control_plane"]["reachable"], true);
    let table = topology.meshctl(&["status"]).expect("meshctl");
    assert_eq!(table.code, 1);
    assert!(table.stdout.lines().any(|l| l.starts_with("node-b ") && l.contains(" no ")), "{}", table.stdout);

    // proxy-config: every node → node-b listed unreachable (exit 1); node-b alone → exit 2.
    let (code, certs) = meshctl_json(&topology, &["proxy-config", "certs"]);
    assert_eq!(code, 1);
    assert_eq!(certs["unreachable"][0]["node"], "node-b", "{certs:#}");
    assert_eq!(items(&certs, "certs", "node-a").len(), enrolled(&topology, NodeId::A).len());
    let alone = topology.meshctl(&["proxy-config", "certs", "--node", "node-b"]).expect("meshctl");
    assert_eq!(alone.code, 2, "{alone:?}");
    assert!(alone.stderr.contains("node node-b"), "{alone:?}");
}

/// Runs meshctl on this machine (no context: `check` needs none).
fn check(args: &[&str]) -> (i32, Value) {
    let output = std::process::Command::new(find_binary("meshctl").expect("meshctl"))
        .arg("check")
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("running meshctl check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (output.status.code().unwrap_or(-1), json)
}

fn check_named<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

#[test]
fn check_passes_this_machine_and_fails_what_is_wrong() {
    nodemesh_testbed::require_root().expect("root");
    let (code, report) = check(&[]);
    let checks = report["checks"].as_array().expect("checks");
    for c in checks {
        assert!(c["name"].is_string() && c["detail"].is_string(), "{c}");
        assert!(["pass", "warn", "fail"].contains(&c["status"].as_str().unwrap_or("?")), "{c}");
        assert_eq!(c["hint"].is_null(), c["status"] == "pass", "a hint exactly when not passing: {c}");
        let name = c["name"].as_str().unwrap_or_default();
        if name.starts_with("program type") || name.starts_with("helper") || name.starts_with("map type") {
            assert_eq!(c["status"], "pass", "this machine runs mesh-node: {c}");
        }
    }
    for name in
        ["program type sk_lookup", "helper bpf_sk_assign", "helper bpf_get_netns_cookie", "map type sockhash"]
    {
        check_named(&report, name);
    }
    for name in ["kernel", "BTF", "cgroup v2", "root", "capabilities"] {
        assert_eq!(check_named(&report, name)["status"], "pass", "{report:#}");
    }
    assert!(
        check_named(&report, "cgroup v2")["detail"].as_str().is_some_and(|d| d.contains("/sys/fs/cgroup"))
    );
    assert_eq!((code, report["passed"].as_bool()), (0, Some(true)), "{report:#}");

    // A pods cgroup that is not cgroup v2 fails; a broken CNI config fails; a chained one passes.
    let dir = std::env::temp_dir().join(format!("meshctl-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("10-net.conflist"), "{\"plugins\": [").expect("write");
    let dir_arg = dir.display().to_string();
    let (code, report) = check(&["--cgroup-root", "/proc", "--cni-conf-dir", &dir_arg]);
    assert_eq!((code, report["passed"].as_bool()), (1, Some(false)));
    assert_eq!(check_named(&report, "cgroup v2")["status"], "fail");
    let cni = check_named(&report, "CNI config");
    assert_eq!(cni["status"], "fail", "{cni}");
    assert!(
        cni["detail"].as_str().is_some_and(|d| d.contains("10-net.conflist") && d.contains("JSON")),
        "{cni}"
    );

    std::fs::write(
        dir.join("10-net.conflist"),
        r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"ptp"},{"type":"nodemesh-cni"}]}"#,
    )
    .expect("write");
    let cgroup = cgroup2_mount();
    let (code, report) = check(&["--cgroup-root", &cgroup, "--cni-conf-dir", &dir_arg]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(check_named(&report, "cgroup v2")["status"], "pass", "{report:#}");
    let cni = check_named(&report, "CNI config");
    assert_eq!(cni["status"], "pass", "{cni}");
    assert!(cni["detail"].as_str().is_some_and(|d| d.contains("ptp → nodemesh-cni")), "{cni}");
    assert_eq!(code, 0);
}

/// A cgroup v2 directory to name (the root of the first cgroup2 mount; `check` only inspects it).
fn cgroup2_mount() -> String {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            after.starts_with("cgroup2 ").then(|| before.split(' ').nth(4).map(str::to_owned)).flatten()
        })
        .expect("a cgroup2 mount")
}
