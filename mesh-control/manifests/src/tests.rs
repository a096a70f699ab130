use super::*;

fn load_str(yaml: &str, node: &str) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    let dir = std::env::temp_dir().join(format!("nm-local-pods-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("pods.yaml");
    std::fs::write(&file, yaml).expect("write");
    let result = load(&file, node);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn load_str_all(yaml: &str) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    let dir = std::env::temp_dir().join(format!("nm-local-pods-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("pods.yaml");
    std::fs::write(&file, yaml).expect("write");
    let result = load_all(&file);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    nodemesh.io/dataplane-mode: ambient\n";

fn pod(name: &str, node: &str, ip: &str, extra_annotations: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations:\n    nodemesh.io/netns: /run/netns/{name}\n{extra_annotations}spec:\n  nodeName: {node}\n  serviceAccountName: sa-{name}\nstatus:\n  podIP: {ip}\n"
    )
}

#[test]
fn enrols_pods_of_ambient_namespace_on_this_node_only() {
    let yaml = format!(
        "{NAMESPACE}{}{}{}",
        pod("a1", "node-a", "10.1.1.2", ""),
        pod("b1", "node-b", "10.1.2.2", ""),
        pod("a3", "node-a", "10.1.1.4", "    nodemesh.io/dataplane-mode: none\n"),
    );
    let pods = load_str(&yaml, "node-a").expect("valid");
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].key.to_string(), "demo/a1");
    assert_eq!(pods[0].ip, Ipv4Addr::new(10, 1, 1, 2));
    assert_eq!(pods[0].netns, PathBuf::from("/run/netns/a1"));
    assert_eq!(pods[0].service_account, "sa-a1");
}

#[test]
fn load_all_returns_every_node_with_its_node_name() {
    let yaml =
        format!("{NAMESPACE}{}{}", pod("a1", "node-a", "10.1.1.2", ""), pod("b1", "node-b", "10.1.2.2", ""));
    let pods = load_str_all(&yaml).expect("valid");
    let nodes: Vec<_> = pods.iter().map(|p| (p.key.name.as_str(), p.node.as_str())).collect();
    assert_eq!(nodes, [("a1", "node-a"), ("b1", "node-b")]);
}

#[test]
fn namespace_not_ambient_enrols_nothing_unless_pod_opts_in() {
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n{}{}",
        pod("a1", "node-a", "10.1.1.2", ""),
        pod("a2", "node-a", "10.1.1.3", "    nodemesh.io/dataplane-mode: ambient\n"),
    );
    let pods = load_str(&yaml, "node-a").expect("valid");
    assert_eq!(pods.iter().map(|p| p.key.name.as_str()).collect::<Vec<_>>(), ["a2"]);
}

#[test]
fn mtls_mode_is_strict_by_default_and_set_by_namespace_or_pod() {
    let permissive_ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    nodemesh.io/dataplane-mode: ambient\n  annotations:\n    nodemesh.io/mtls-mode: PERMISSIVE\n";
    let yaml = format!(
        "{permissive_ns}{}{}",
        pod("a1", "node-a", "10.1.1.2", ""),
        pod("a2", "node-a", "10.1.1.3", "    nodemesh.io/mtls-mode: strict\n"),
    );
    let modes: Vec<_> = load_str(&yaml, "node-a").expect("valid").iter().map(|p| p.mtls_mode).collect();
    assert_eq!(modes, [MtlsMode::Permissive, MtlsMode::Strict]);
    let default =
        load_str(&format!("{NAMESPACE}{}", pod("a1", "node-a", "10.1.1.2", "")), "node-a").expect("valid");
    assert_eq!(default[0].mtls_mode, MtlsMode::Strict);
    let bad =
        format!("{NAMESPACE}{}", pod("a1", "node-a", "10.1.1.2", "    nodemesh.io/mtls-mode: DISABLE\n"));
    let err = load_str(&bad, "node-a").expect_err("invalid mode").to_string();
    assert!(err.contains("must be STRICT or PERMISSIVE, not \"DISABLE\""), "{err}");
}

#[test]
fn pod_without_ip_waits() {
    let yaml = format!(
        "{NAMESPACE}---\nkind: Pod\nmetadata:\n  name: p\n  namespace: demo\nspec:\n  nodeName: node-a\n"
    );
    assert!(load_str(&yaml, "node-a").expect("valid").is_empty());
}

#[test]
fn other_kinds_are_ignored() {
    let yaml = format!(
        "{NAMESPACE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\nspec:\n  ports: [{{port: 80}}]\n{}",
        pod("a1", "node-a", "10.1.1.2", "")
    );
    assert_eq!(load_str(&yaml, "node-a").expect("valid").len(), 1);
}

#[test]
fn bad_input_names_file_and_problem() {
    let cases = [
        (
            format!("{NAMESPACE}{}", pod("a1", "node-a", "10.1.1.999", "")),
            "status.podIP \"10.1.1.999\" is not an IP address",
        ),
        (
            format!("{NAMESPACE}{}", pod("a1", "node-a", "fd00::1", "")),
            "IPv6 pod addresses are not supported yet",
        ),
        (
            format!(
                "{NAMESPACE}{}",
                pod("a1", "node-a", "10.1.1.2", "    nodemesh.io/dataplane-mode: sidecar\n")
            ),
            "must be \"ambient\" or \"none\"",
        ),
        (
            format!(
                "{NAMESPACE}{}{}",
                pod("a1", "node-a", "10.1.1.2", ""),
                pod("a1", "node-a", "10.1.1.3", "")
            ),
            "defined twice",
        ),
        (format!("{NAMESPACE}---\nkind: Pod\nmetadata:\n  namespace: demo\n"), "metadata.name is required"),
        (
            format!(
                "{NAMESPACE}---\nkind: Pod\nmetadata:\n  name: x\n  namespace: demo\nspec:\n  nodeName: node-a\nstatus:\n  podIP: 10.0.0.1\n"
            ),
            "annotation nodemesh.io/netns",
        ),
        ("kind: Pod\nmetadata: [unclosed\n".to_owned(), "pods.yaml:"),
        ("kind: Pod\nmetadata:\n  name: [1, 2]\n".to_owned(), "pods.yaml"),
    ];
    for (yaml, expected) in cases {
        let err = load_str(&yaml, "node-a").expect_err(expected).to_string();
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        assert!(err.contains("pods.yaml"), "error must name the file: {err}");
    }
}

#[test]
fn yaml_error_has_line_number() {
    let err =
        load_str("kind: Pod\nmetadata:\n  name: ok\n  labels: {a: [}\n", "node-a").expect_err("bad yaml");
    assert!(err.to_string().contains("pods.yaml:4"), "{err}");
}

#[test]
fn reads_every_yaml_file_of_a_directory() {
    let dir = std::env::temp_dir().join(format!("nm-local-dir-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("00-ns.yaml"), NAMESPACE).expect("write");
    std::fs::write(dir.join("a1.yml"), pod("a1", "node-a", "10.1.1.2", "")).expect("write");
    std::fs::write(dir.join("notes.txt"), "not yaml: [").expect("write");
    let pods = load(&dir, "node-a");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(pods.expect("valid").len(), 1);
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = load(Path::new("/nonexistent/pods.yaml"), "node-a").unwrap_err();
    assert!(err.to_string().starts_with("cannot read /nonexistent/pods.yaml"), "{err}");
}

fn model_str(yaml: &str) -> Result<translate::Model, ManifestError> {
    let dir = std::env::temp_dir().join(format!("nm-local-model-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, yaml).expect("write");
    let result = load_model(&file);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn services_policies_and_routes_are_read_too() {
    let yaml = format!(
        "{NAMESPACE}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: a1}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
         ---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\n\
         spec: {{action: DENY, rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: demo}}\n\
         spec: {{parentRefs: [{{kind: Service, name: web}}]}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: x}}\n",
        pod("a1", "node-a", "10.1.1.2", "").replace("  annotations:", "  labels: {app: a1}\n  annotations:")
    );
    let model = model_str(&yaml).expect("valid");
    assert_eq!(model.services.len(), 1);
    assert_eq!(model.workloads[0].services.keys().collect::<Vec<_>>(), ["demo/web.demo.svc.cluster.local"]);
    let local = local::read(&{
        let dir =
            std::env::temp_dir().join(format!("nm-local-kinds-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("mesh.yaml"), &yaml).expect("write");
        dir
    })
    .expect("read");
    assert_eq!(local.objects.authorization_policies.len(), 1);
    assert_eq!(local.objects.http_routes.len(), 1);
    assert_eq!(local.origin("Service", "demo/web").map(|o| o.line), Some(22));
}

#[test]
fn the_same_object_repeated_is_harmless() {
    let yaml = format!("{NAMESPACE}---\n{NAMESPACE}{}", pod("a1", "node-a", "10.1.1.2", ""));
    assert_eq!(model_str(&yaml).expect("valid").workloads.len(), 1);
}

#[test]
fn wrong_versions_bad_fields_and_duplicates_name_file_line_and_field() {
    let cases = [
        (
            format!(
                "{NAMESPACE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\n"
            ),
            "mesh.yaml:8:1: AuthorizationPolicy demo/p: apiVersion security.istio.io/v1 is not one nodemesh reads (expected nodemesh.io/v1alpha1)",
        ),
        (
            format!(
                "{NAMESPACE}---\nkind: Service\nmetadata: {{name: s, namespace: demo}}\nspec: {{ports: [{{port: eighty}}]}}\n"
            ),
            "mesh.yaml:8:1: Service demo/s: spec.ports[0].port: invalid type",
        ),
        (
            format!(
                "{NAMESPACE}---\nkind: Service\nmetadata: {{name: s}}\n---\nkind: Service\nmetadata: {{name: s, namespace: default}}\nspec: {{ports: [{{port: 80}}]}}\n"
            ),
            "Service default/s is defined twice",
        ),
        (
            format!("{NAMESPACE}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n"),
            "Namespace demo is defined twice",
        ),
        (
            format!("{NAMESPACE}{}", pod("a1", "node-a", "10.1.1.999", "")),
            "mesh.yaml:8:1: Pod demo/a1: status.podIP",
        ),
    ];
    for (yaml, expected) in cases {
        let err = model_str(&yaml).expect_err(expected).to_string();
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    }
}

#[test]
fn a_rejected_policy_or_route_is_a_load_error_naming_file_line_and_rule() {
    let db = format!(
        "{NAMESPACE}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.11, selector: {{app: db}}, ports: [{{port: 5432, appProtocol: tcp}}]}}\n",
        pod("db", "node-a", "10.1.1.3", "").replace("  annotations:", "  labels: {app: db}\n  annotations:")
    );
    let cases = [
        (
            "---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: db-admin, namespace: demo}\n\
             spec: {selector: {matchLabels: {app: db}}, action: DENY, rules: [{to: [{operation: {ports: [\"5432\"], paths: [/admin]}}]}]}\n",
            "mesh.yaml:27:1: AuthorizationPolicy demo/db-admin: rules[0]: HTTP conditions (paths) can never apply: port 5432 is declared \"tcp\"",
        ),
        (
            "---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad-port, namespace: demo}\n\
             spec: {rules: [{to: [{operation: {ports: [postgres]}}]}]}\n",
            "mesh.yaml:27:1: AuthorizationPolicy demo/bad-port: rules[0].to[0].operation.ports[0]: \"postgres\" is not a port number",
        ),
        (
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\n\
             spec: {parentRefs: [{kind: Service, name: db}], rules: [{filters: [{type: URLRewrite}]}]}\n",
            "mesh.yaml:27:1: HTTPRoute demo/r: rules[0].filters[0]: unsupported filter type URLRewrite",
        ),
    ];
    for (extra, expected) in cases {
        let err = model_str(&format!("{db}{extra}")).expect_err(expected).to_string();
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    }
    // The same policy on an HTTP port is fine, and its translation is in the model.
    let fine = format!(
        "{db}---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: db}}}}, rules: [{{to: [{{operation: {{ports: [\"8080\"], paths: [/admin]}}}}]}}]}}\n"
    );
    let model = model_str(&fine).expect("valid");
    assert_eq!(model.authorizations[0].authorization.rules[0].to[0].ports, [8080]);
    assert_eq!(model.workloads[0].authorization_policies, ["demo/p"]);
}
