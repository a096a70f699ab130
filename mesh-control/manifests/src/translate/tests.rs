//! Table tests: each case is a set of objects and the model they must give.

use serde_json::json;

use super::*;

pub(super) fn namespace(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}}))
        .expect("namespace")
}

pub(super) fn ambient(name: &str) -> Namespace {
    namespace(name, json!({DATAPLANE_MODE: "ambient"}), json!({}))
}

/// A running pod on node-a in `demo` with a netns annotation; `change` edits its JSON first.
pub(super) fn pod(name: &str, ip: &str, change: impl FnOnce(&mut serde_json::Value)) -> Pod {
    let mut value = json!({
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": name},
                     "annotations": {NETNS_ANNOTATION: format!("/run/netns/{name}")}},
        "spec": {"nodeName": "node-a", "serviceAccountName": format!("sa-{name}"),
                 "containers": [{"name": "app", "ports": [{"name": "web", "containerPort": 8080}]}]},
        "status": {"podIP": ip, "phase": "Running"}
    });
    change(&mut value);
    serde_json::from_value(value).expect("pod")
}

pub(super) fn service(name: &str, change: impl FnOnce(&mut serde_json::Value)) -> Service {
    let mut value = json!({
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    change(&mut value);
    serde_json::from_value(value).expect("service")
}

pub(super) fn objects(namespaces: Vec<Namespace>, pods: Vec<Pod>, services: Vec<Service>) -> ClusterObjects {
    ClusterObjects { namespaces, pods, services, ..Default::default() }
}

pub(super) fn model(objects: &ClusterObjects) -> Model {
    translate(objects, &TranslateOptions::default())
}

/// (name, meshed?) of every workload.
fn membership(model: &Model) -> Vec<(String, bool)> {
    model.workloads.iter().map(|w| (w.key.name.clone(), w.membership.is_some())).collect()
}

#[test]
fn pods_become_workloads_meshed_by_namespace_or_pod_setting() {
    /// (case, namespaces, pods, expected (workload, meshed)).
    type Case<'a> = (&'a str, Vec<Namespace>, Vec<Pod>, Vec<(&'a str, bool)>);
    let cases: Vec<Case> = vec![
        ("ambient namespace", vec![ambient("demo")], vec![pod("a", "10.1.1.2", |_| {})], vec![("a", true)]),
        (
            "namespace turned off",
            vec![namespace("demo", json!({}), json!({}))],
            vec![pod("a", "10.1.1.2", |_| {})],
            vec![("a", false)],
        ),
        (
            "namespace set to none",
            vec![namespace("demo", json!({DATAPLANE_MODE: "none"}), json!({}))],
            vec![pod("a", "10.1.1.2", |_| {})],
            vec![("a", false)],
        ),
        (
            "annotation on the namespace counts too",
            vec![namespace("demo", json!({}), json!({DATAPLANE_MODE: "ambient"}))],
            vec![pod("a", "10.1.1.2", |_| {})],
            vec![("a", true)],
        ),
        ("no Namespace object", vec![], vec![pod("a", "10.1.1.2", |_| {})], vec![("a", false)]),
        (
            "pod opts out",
            vec![ambient("demo")],
            vec![pod("a", "10.1.1.2", |p| p["metadata"]["labels"][DATAPLANE_MODE] = json!("none"))],
            vec![("a", false)],
        ),
        (
            "pod opts in alone",
            vec![],
            vec![pod("a", "10.1.1.2", |p| p["metadata"]["annotations"][DATAPLANE_MODE] = json!("ambient"))],
            vec![("a", true)],
        ),
        (
            "pod being created in an ambient namespace: its node's CNI plugin needs it",
            vec![ambient("demo")],
            vec![pod("a", "10.1.1.2", |p| p["status"] = json!({"phase": "Pending"}))],
            vec![("a", true)],
        ),
        (
            "pod being created that opts out: its CNI plugin lets it start uncaptured",
            vec![ambient("demo")],
            vec![pod("a", "10.1.1.2", |p| {
                p["status"] = json!({"phase": "Pending"});
                p["metadata"]["labels"][DATAPLANE_MODE] = json!("none");
            })],
            vec![("a", false)],
        ),
        (
            "pod being created outside the mesh is not a workload yet",
            vec![namespace("demo", json!({}), json!({}))],
            vec![pod("a", "10.1.1.2", |p| p["status"] = json!({"phase": "Pending"}))],
            vec![],
        ),
        (
            "unscheduled pod",
            vec![ambient("demo")],
            vec![pod("a", "10.1.1.2", |p| p["spec"]["nodeName"] = json!(null))],
            vec![],
        ),
        (
            "finished pod gives up its address",
            vec![ambient("demo")],
            vec![pod("a", "10.1.1.2", |p| p["status"]["phase"] = json!("Succeeded"))],
            vec![],
        ),
    ];
    for (case, namespaces, pods, expected) in cases {
        let model = model(&objects(namespaces, pods, vec![]));
        assert!(model.problems.is_empty(), "{case}: {:?}", model.problems);
        let expected: Vec<(String, bool)> = expected.into_iter().map(|(n, m)| (n.to_owned(), m)).collect();
        assert_eq!(membership(&model), expected, "{case}");
    }
}

#[test]
fn a_workload_carries_node_address_identity_and_mode() {
    let permissive = namespace("demo", json!({DATAPLANE_MODE: "ambient"}), json!({MTLS_MODE: "PERMISSIVE"}));
    let pods = vec![
        pod("a", "10.1.1.2", |_| {}),
        pod("b", "10.1.1.3", |p| p["metadata"]["annotations"][MTLS_MODE] = json!("strict")),
        pod("c", "10.1.1.4", |p| p["spec"]["serviceAccountName"] = json!(null)),
    ];
    let model = model(&objects(vec![permissive], pods, vec![]));
    let w = &model.workloads;
    assert_eq!(
        (w[0].node.as_str(), w[0].ip, w[0].service_account.as_str()),
        ("node-a", Some(Ipv4Addr::new(10, 1, 1, 2)), "sa-a")
    );
    let modes: Vec<_> = w.iter().map(|w| w.membership.as_ref().map(|m| m.mtls_mode)).collect();
    assert_eq!(modes, [Some(MtlsMode::Permissive), Some(MtlsMode::Strict), Some(MtlsMode::Permissive)]);
    assert_eq!(w[2].service_account, "default");
    assert_eq!(w[0].membership.as_ref().and_then(|m| m.netns.clone()), Some(PathBuf::from("/run/netns/a")));
}

#[test]
fn bad_objects_are_problems_naming_them_and_the_rest_translates() {
    let pods = vec![
        pod("good", "10.1.1.2", |_| {}),
        pod("v6", "fd00::1", |_| {}),
        pod("garbage-ip", "10.1.1.999", |_| {}),
        pod("mode", "10.1.1.5", |p| p["metadata"]["annotations"][DATAPLANE_MODE] = json!("sidecar")),
        pod("mtls", "10.1.1.6", |p| p["metadata"]["annotations"][MTLS_MODE] = json!("DISABLE")),
        pod("relative", "10.1.1.7", |p| p["metadata"]["annotations"][NETNS_ANNOTATION] = json!("netns/x")),
        pod("no-netns", "10.1.1.8", |p| p["metadata"]["annotations"] = json!({})),
    ];
    let services = vec![service("bad-port", |s| s["spec"]["ports"][0]["port"] = json!(70000))];
    let model = model(&objects(vec![ambient("demo")], pods, services));
    let problems: BTreeMap<&str, &str> =
        model.problems.iter().map(|p| (p.object.as_str(), p.message.as_str())).collect();
    let expected = [
        ("demo/v6", "IPv6 pod addresses are not supported yet"),
        ("demo/garbage-ip", "is not an IP address"),
        ("demo/mode", "must be \"ambient\" or \"none\""),
        ("demo/mtls", "must be STRICT or PERMISSIVE"),
        ("demo/relative", "must be an absolute path"),
        ("demo/no-netns", "is required in local mode"),
        ("demo/bad-port", "is not a port"),
    ];
    for (object, message) in expected {
        assert!(problems.get(object).is_some_and(|m| m.contains(message)), "{object}: {problems:?}");
    }
    assert_eq!(problems.len(), expected.len());
    assert_eq!(membership(&model), [("good".to_owned(), true)]);
}

#[test]
fn a_pod_being_created_has_no_address_and_needs_no_netns_annotation() {
    let pending = pod("a", "10.1.1.2", |p| {
        p["status"] = json!({"phase": "Pending"});
        p["metadata"]["annotations"] = json!({});
    });
    let model = model(&objects(vec![ambient("demo"), ambient("other")], vec![pending], vec![]));
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    assert_eq!(model.workloads[0].ip, None);
    assert_eq!(model.workloads[0].membership, Some(Membership { netns: None, mtls_mode: MtlsMode::Strict }));
    assert_eq!(model.ambient_namespaces, ["demo", "other"]);
    assert!(crate::enrolled(&model).is_empty(), "nothing to enrol from the manifests alone");
}

#[test]
fn kubernetes_mode_finds_the_netns_on_the_node() {
    let pods = vec![pod("a", "10.1.1.2", |p| p["metadata"]["annotations"] = json!({}))];
    let options = TranslateOptions { require_netns: false, ..Default::default() };
    let model = translate(&objects(vec![ambient("demo")], pods, vec![]), &options);
    assert!(model.problems.is_empty());
    assert_eq!(model.workloads[0].membership, Some(Membership { netns: None, mtls_mode: MtlsMode::Strict }));
}

#[test]
fn services_get_hostnames_vips_ports_and_protocols() {
    let services = vec![
        service("web", |s| {
            s["spec"]["ports"] = json!([
                {"name": "http-main", "port": 80, "targetPort": 8080},
                {"name": "metrics", "port": 9090, "appProtocol": "HTTP"},
                {"name": "grpc", "port": 50051, "targetPort": "web"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]);
        }),
        service("headless", |s| s["spec"]["clusterIP"] = json!("None")),
        service("dual", |s| s["spec"]["clusterIPs"] = json!(["10.96.0.11", "10.96.0.12"])),
    ];
    let model = model(&objects(vec![ambient("demo")], vec![], services));
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    let web = model.services.iter().find(|s| s.name == "web").expect("web");
    assert_eq!(web.hostname, "web.demo.svc.cluster.local");
    assert_eq!(web.vips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    let ports: Vec<(u16, &str)> = web.ports.iter().map(|p| (p.port, p.app_protocol.as_str())).collect();
    assert_eq!(ports, [(80, "http"), (9090, "http"), (50051, "grpc")], "UDP is not carried");
    assert_eq!(web.ports[1].target_port, IntOrString::Int(9090), "targetPort defaults to the port");
    let headless = model.services.iter().find(|s| s.name == "headless").expect("headless");
    assert!(headless.vips.is_empty());
    let dual = model.services.iter().find(|s| s.name == "dual").expect("dual");
    assert_eq!(dual.vips.len(), 3, "clusterIPs and clusterIP, without duplicates");
}

#[test]
fn selectors_attach_ports_to_matching_pods_in_the_same_namespace() {
    let pods = vec![
        pod("web", "10.1.1.2", |_| {}),
        pod("other", "10.1.1.3", |_| {}),
        pod("web-elsewhere", "10.1.1.4", |p| {
            p["metadata"]["namespace"] = json!("prod");
            p["metadata"]["labels"]["app"] = json!("web");
        }),
        pod("web-no-named-port", "10.1.1.5", |p| {
            p["metadata"]["labels"]["app"] = json!("web");
            p["spec"]["containers"] = json!([{"name": "app"}]);
        }),
    ];
    let services = vec![
        service("web", |s| {
            s["spec"]["ports"] = json!([
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "named", "port": 81, "targetPort": "web"}
            ]);
        }),
        service("no-selector", |s| s["spec"]["selector"] = json!(null)),
    ];
    let model = model(&objects(vec![ambient("demo"), ambient("prod")], pods, services));
    let services_of = |name: &str| {
        let w = model.workloads.iter().find(|w| w.key.name == name).expect("workload");
        w.services.clone()
    };
    let web = services_of("web");
    assert_eq!(
        web.get("demo/web.demo.svc.cluster.local").expect("member"),
        &[
            PortMapping { service_port: 80, target_port: 8080 },
            PortMapping { service_port: 81, target_port: 8080 }
        ]
    );
    assert!(services_of("other").is_empty(), "labels do not match");
    assert!(services_of("web-elsewhere").is_empty(), "another namespace");
    assert_eq!(
        services_of("web-no-named-port").get("demo/web.demo.svc.cluster.local").expect("member"),
        &[PortMapping { service_port: 80, target_port: 8080 }],
        "a named port the pod lacks is left out for that pod"
    );
    assert!(model.workloads.iter().all(|w| !w.services.keys().any(|k| k.contains("no-selector"))));
}

#[test]
fn a_selector_picks_pods_with_all_its_labels_in_its_own_namespace_only() {
    let labelled = |name: &str, ip: &str, namespace: &str, labels: serde_json::Value| {
        pod(name, ip, |p| {
            p["metadata"]["namespace"] = json!(namespace);
            p["metadata"]["labels"] = labels;
        })
    };
    let pods = vec![
        labelled("both", "10.1.1.2", "demo", json!({"app": "web", "tier": "front"})),
        labelled("app-only", "10.1.1.3", "demo", json!({"app": "web"})),
        labelled("tier-only", "10.1.1.4", "demo", json!({"tier": "front"})),
        labelled("elsewhere", "10.1.1.5", "other", json!({"app": "web", "tier": "front"})),
        labelled("none", "10.1.1.6", "demo", json!({})),
    ];
    let web = service("web", |s| s["spec"]["selector"] = json!({"app": "web", "tier": "front"}));
    let model = model(&objects(vec![ambient("demo"), ambient("other")], pods, vec![web]));
    let selected: Vec<&str> = model
        .workloads
        .iter()
        .filter(|w| w.services.contains_key("demo/web.demo.svc.cluster.local"))
        .map(|w| w.key.name.as_str())
        .collect();
    assert_eq!(selected, ["both"]);
}

#[test]
fn traffic_annotations_reach_the_service_and_a_bad_one_is_a_problem_that_keeps_it() {
    let services = vec![
        service("web", |s| {
            s["metadata"]["annotations"] = json!({
                traffic::LOAD_BALANCER: "round-robin",
                traffic::MAX_CONNECTIONS: "100",
                traffic::OUTLIER_BASE_EJECTION: "30s",
            });
        }),
        service("db", |s| {
            s["metadata"]["annotations"] =
                json!({traffic::LOAD_BALANCER: "random", traffic::MAX_CONNECTIONS: "10"});
        }),
    ];
    let model = model(&objects(vec![ambient("demo")], vec![], services));
    let web = model.services.iter().find(|s| s.name == "web").expect("web");
    assert_eq!(
        web.traffic.load_balancing.map(|l| l.mode()),
        Some(mesh_api::workload::v1::LoadBalancerMode::RoundRobin)
    );
    assert_eq!(web.traffic.circuit_breaker.map(|c| c.max_connections), Some(100));
    assert_eq!(web.traffic.outlier_detection.map(|o| o.base_ejection_ms), Some(30_000));
    let db = model.services.iter().find(|s| s.name == "db").expect("db is still a service");
    assert_eq!(
        (db.traffic.load_balancing, db.traffic.circuit_breaker.map(|c| c.max_connections)),
        (None, Some(10))
    );
    assert_eq!(
        model.problems,
        [Problem {
            kind: "Service",
            object: "demo/db".into(),
            message:
                "annotation nodemesh.io/load-balancer: must be least-request or round-robin, not \"random\""
                    .into()
        }]
    );
}
