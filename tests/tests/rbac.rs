//! The RBAC in `deploy/base/` against a real kube-apiserver (v1.20, RBAC authorizer): mesh-control,
//! running with a token of the `mesh-control` service account those objects bind, discovers the
//! cluster and authenticates a node. Then each permission is taken away in turn, and what needs it
//! fails visibly: mesh-control logs the 403 for that kind, or refuses the node with the API's
//! reason, or cannot write a policy's or route's status. So every permission granted is used,
//! and the list in this file is exactly what is granted. With every permission, mesh-control
//! writes the AuthorizationPolicy's and the HTTPRoute's status.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{Namespace, Pod, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use mesh_api::xds::v1::{
    DeltaDiscoveryRequest, Node, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use mesh_manifests::crd::{AuthorizationPolicy, HttpRoute};
use nodemesh_testbed::{
    deploy,
    kube_apiserver::{KubeApiServer, TokenUser},
    process::find_binary,
};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const SYSTEM_NAMESPACE: &str = "nodemesh-system";
/// The user the API server sees for a token of mesh-control's service account.
const MESH_CONTROL_USER: &str = "system:serviceaccount:nodemesh-system:mesh-control";
/// How long a failure (or success) may take to show.
const WAIT: Duration = Duration::from_secs(20);

/// One permission: a verb on a resource, cluster-wide (from the ClusterRole) or in a namespace
/// (from the Role).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    namespace: Option<&'static str>,
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
}

const fn cluster(group: &'static str, resource: &'static str, verb: &'static str) -> Permission {
    Permission { namespace: None, group, resource, verb }
}

/// Exactly what deploy/base grants mesh-control, and what each is for (the YAML says the same).
const GRANTED: [(Permission, Needed); 14] = [
    (cluster("", "namespaces", "list"), Needed::Discovery("Namespace")),
    (cluster("", "namespaces", "watch"), Needed::Discovery("Namespace")),
    (cluster("", "pods", "list"), Needed::Discovery("Pod")),
    (cluster("", "pods", "watch"), Needed::Discovery("Pod")),
    (cluster("", "services", "list"), Needed::Discovery("Service")),
    (cluster("", "services", "watch"), Needed::Discovery("Service")),
    (cluster("nodemesh.io", "authorizationpolicies", "list"), Needed::Discovery("AuthorizationPolicy")),
    (cluster("nodemesh.io", "authorizationpolicies", "watch"), Needed::Discovery("AuthorizationPolicy")),
    (cluster("gateway.networking.k8s.io", "httproutes", "list"), Needed::Discovery("HTTPRoute")),
    (cluster("gateway.networking.k8s.io", "httproutes", "watch"), Needed::Discovery("HTTPRoute")),
    (cluster("authentication.k8s.io", "tokenreviews", "create"), Needed::NodeAuth),
    (cluster("nodemesh.io", "authorizationpolicies/status", "patch"), Needed::Status("AuthorizationPolicy")),
    (cluster("gateway.networking.k8s.io", "httproutes/status", "patch"), Needed::Status("HTTPRoute")),
    (
        Permission { namespace: Some(SYSTEM_NAMESPACE), group: "", resource: "pods", verb: "get" },
        Needed::NodeAuth,
    ),
];

/// Which part of mesh-control fails without a permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needed {
    /// The reflector of this kind in `discovery.rs`: its watch fails with 403, logged.
    Discovery(&'static str),
    /// `node_auth/kubernetes.rs`: nodes are refused with the API's 403.
    NodeAuth,
    /// `status/kubernetes.rs`: writing this kind's status fails with 403, logged.
    Status(&'static str),
}

/// A permission as read from YAML.
type Grant = (Option<String>, String, String, String);

impl Permission {
    fn grant(&self) -> Grant {
        (self.namespace.map(Into::into), self.group.into(), self.resource.into(), self.verb.into())
    }

    /// Returns the start of the API server's 403 message for this permission missing, for a
    /// request in `namespace` (a namespaced object's, under a cluster-wide grant), if any.
    fn forbidden(&self, namespace: Option<&str>) -> String {
        let scope = match self.namespace.or(namespace) {
            Some(namespace) => format!("in the namespace \"{namespace}\""),
            None => "at the cluster scope".to_owned(),
        };
        format!(
            "User \"{MESH_CONTROL_USER}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.verb, self.resource, self.group
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_control_needs_exactly_the_rbac_in_deploy_base() {
    let started = Instant::now();
    let api = KubeApiServer::start("deploy-rbac").expect("kube-apiserver");
    let admin = api.client().expect("admin client");
    deploy::apply_dir(&admin, "crds").await.expect("deploy/crds/ applies");
    deploy::wait_established(
        &admin,
        &["authorizationpolicies.nodemesh.io", "httproutes.gateway.networking.k8s.io"],
        WAIT,
    )
    .await
    .expect("CRDs served");
    deploy::apply_kustomization(&admin, "base").await.expect("deploy/base/ applies");

    // What the YAML grants is exactly the list above: a new permission must come with its test.
    let rbac = deploy::deploy_dir().join("base/mesh-control-rbac.yaml");
    let [cluster_role]: [ClusterRole; 1] = exactly(&rbac, "ClusterRole");
    let [role]: [Role; 1] = exactly(&rbac, "Role");
    assert_eq!(role.metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE));
    let granted: BTreeSet<Grant> = GRANTED.iter().map(|(p, _)| p.grant()).collect();
    assert_eq!(permissions(&cluster_role, &role), granted, "deploy/base grants other permissions");
    // ...to mesh-control's service account alone, and nothing else in deploy/base grants more.
    let [cluster_binding]: [ClusterRoleBinding; 1] = exactly(&rbac, "ClusterRoleBinding");
    let [binding]: [RoleBinding; 1] = exactly(&rbac, "RoleBinding");
    let mesh_control =
        json!([{"kind": "ServiceAccount", "name": "mesh-control", "namespace": SYSTEM_NAMESPACE}]);
    for (subjects, role_ref, kind) in [
        (&cluster_binding.subjects, &cluster_binding.role_ref, "ClusterRole"),
        (&binding.subjects, &binding.role_ref, "Role"),
    ] {
        assert_eq!(serde_json::to_value(subjects).expect("subjects"), mesh_control);
        assert_eq!((role_ref.kind.as_str(), role_ref.name.as_str()), (kind, "nodemesh-control"));
    }
    assert_eq!(binding.metadata.namespace.as_deref(), Some(SYSTEM_NAMESPACE));
    let rbac_kinds = ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];
    for entry in std::fs::read_dir(deploy::deploy_dir().join("base")).expect("deploy/base") {
        let path = entry.expect("entry").path();
        if path != rbac
            && path.extension().is_some_and(|e| e == "yaml")
            && !path.ends_with("kustomization.yaml")
        {
            let objects = deploy::read_objects(&path).expect("parses");
            let kinds = objects.iter().filter_map(|o| o.types.as_ref()).map(|t| t.kind.as_str());
            assert!(!kinds.clone().any(|k| rbac_kinds.contains(&k)), "{} grants permissions", path.display());
        }
    }

    let kubeconfig = mesh_control_kubeconfig(&api).await;
    let node_token = create_cluster_objects(&api).await;
    wait_for_rules(&admin, None).await;

    // With everything granted: discovery, a node authenticating and the status written, with
    // not one 403.
    let control = MeshControl::start(&api, &kubeconfig, "all");
    control.wait_for_discovery().await;
    control.authenticate("node-a", &node_token).await.expect("node-a authenticates with its bound token");
    wait_for_status(&admin).await;
    let log = control.log();
    assert!(!log.contains("forbidden") && !log.contains("watch failed"), "with every permission:\n{log}");
    drop(control);
    println!("with every permission: discovery and node authentication work ({:?})", started.elapsed());

    // Without each permission in turn, what needs it fails, and nothing else does.
    for (removed, needed) in GRANTED {
        let run = Instant::now();
        set_rules(&admin, &cluster_role, &role, Some(removed)).await;
        wait_for_rules(&admin, Some(removed)).await;
        if let Needed::Status(kind) = needed {
            // Written already: cleared, so mesh-control has something to write.
            clear_status(&admin, kind).await;
        }
        let control = MeshControl::start(
            &api,
            &kubeconfig,
            &format!("no-{}-{}", removed.verb, removed.resource.replace('/', "-")),
        );
        let expected = removed.forbidden(matches!(needed, Needed::Status(_)).then_some("demo"));
        match needed {
            Needed::Discovery(kind) => {
                let failed = format!("watch failed; retrying with backoff kind=\"{kind}\"");
                // kube's own warning quotes the API's message with escaped quotes.
                let seen =
                    eventually(&format!("mesh-control logs {failed:?} with {expected:?}"), async || {
                        let log = control.log().replace('\\', "");
                        log.lines().any(|l| l.contains(&failed) && l.contains(&expected)).then_some(log)
                    })
                    .await;
                let other: Vec<&str> =
                    seen.lines().filter(|l| l.contains("forbidden") && !l.contains(&expected)).collect();
                assert!(other.is_empty(), "without {removed:?}, other 403s too:\n{}", other.join("\n"));
            }
            Needed::NodeAuth => {
                control.wait_for_discovery().await;
                let refused = control.authenticate("node-a", &node_token).await.expect_err("node refused");
                assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
                assert!(
                    refused.message().contains(&expected),
                    "without {removed:?}, expected {expected:?} in {:?}",
                    refused.message()
                );
                let log = control.log();
                assert!(!log.contains("watch failed"), "discovery is unaffected:\n{log}");
                println!("  node refused: {}", refused.message());
            }
            Needed::Status(kind) => {
                let failed = format!("status write failed; retrying kind=\"{kind}\"");
                let seen =
                    eventually(&format!("mesh-control logs {failed:?} with {expected:?}"), async || {
                        let log = control.log().replace('\\', "");
                        log.lines().any(|l| l.contains(&failed) && l.contains(&expected)).then_some(log)
                    })
                    .await;
                let other: Vec<&str> = seen
                    .lines()
                    .filter(|l| {
                        (l.contains("forbidden") && !l.contains(&expected)) || l.contains("watch failed")
                    })
                    .collect();
                assert!(other.is_empty(), "without {removed:?}, other failures too:\n{}", other.join("\n"));
                control.authenticate("node-a", &node_token).await.expect("node authentication is unaffected");
            }
        }
        println!(
            "without {} {} ({:?}): fails as expected, {:?}",
            removed.verb,
            removed.resource,
            needed,
            run.elapsed()
        );
    }
    set_rules(&admin, &cluster_role, &role, None).await;
    println!("done in {:?}", started.elapsed());
}

/// Reads the objects of `kind` in `path`, requiring exactly `N`.
fn exactly<K: serde::de::DeserializeOwned + std::fmt::Debug, const N: usize>(
    path: &Path,
    kind: &str,
) -> [K; N] {
    let objects: Vec<K> = deploy::read_kind(path, kind).expect("the RBAC YAML parses");
    objects.try_into().unwrap_or_else(|objects: Vec<K>| panic!("expected {N} {kind}, found {objects:?}"))
}

/// Returns every (namespace, group, resource, verb) the roles grant.
fn permissions(cluster_role: &ClusterRole, role: &Role) -> BTreeSet<Grant> {
    let mut all = BTreeSet::new();
    let sets = [(None, cluster_role.rules.as_deref()), (Some(SYSTEM_NAMESPACE), role.rules.as_deref())];
    for (namespace, rules) in sets {
        for rule in explode(rules.unwrap_or_default()) {
            // Exploded: each list has exactly one entry.
            let only = |list: Option<Vec<String>>| list.unwrap_or_default().concat();
            all.insert((
                namespace.map(Into::into),
                only(rule.api_groups),
                only(rule.resources),
                rule.verbs.concat(),
            ));
        }
    }
    all
}

/// Returns the rules as one rule per (group, resource, verb): the same grant, easy to subtract from.
fn explode(rules: &[PolicyRule]) -> Vec<PolicyRule> {
    let mut single = Vec::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "a rule this test does not model: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    single.push(PolicyRule {
                        api_groups: Some(vec![group.clone()]),
                        resources: Some(vec![resource.clone()]),
                        verbs: vec![verb.clone()],
                        ..Default::default()
                    });
                }
            }
        }
    }
    single
}

/// Sets the ClusterRole's and the Role's rules to those of deploy/base, less `removed`.
async fn set_rules(
    admin: &kube::Client,
    cluster_role: &ClusterRole,
    role: &Role,
    removed: Option<Permission>,
) {
    let keep = |namespace: Option<&str>, rules: Option<&Vec<PolicyRule>>| -> Vec<PolicyRule> {
        explode(rules.map(Vec::as_slice).unwrap_or_default())
            .into_iter()
            .filter(|rule| {
                removed.is_none_or(|r| {
                    r.namespace != namespace
                        || rule.api_groups.as_deref() != Some(&[r.group.to_owned()])
                        || rule.resources.as_deref() != Some(&[r.resource.to_owned()])
                        || rule.verbs != [r.verb]
                })
            })
            .collect()
    };
    // A merge patch replaces the whole list.
    let cluster_rules = json!({"rules": keep(None, cluster_role.rules.as_ref())});
    Api::<ClusterRole>::all(admin.clone())
        .patch("nodemesh-control", &PatchParams::default(), &Patch::Merge(&cluster_rules))
        .await
        .expect("patch the ClusterRole");
    let role_rules = json!({"rules": keep(Some(SYSTEM_NAMESPACE), role.rules.as_ref())});
    Api::<Role>::namespaced(admin.clone(), SYSTEM_NAMESPACE)
        .patch("nodemesh-control", &PatchParams::default(), &Patch::Merge(&role_rules))
        .await
        .expect("patch the Role");
}

/// Waits until the authorizer (which follows roles through a watch) allows every granted
/// permission but `removed`, so the next mesh-control runs under the rules just set.
async fn wait_for_rules(admin: &kube::Client, removed: Option<Permission>) {
    for (permission, _) in GRANTED {
        wait_until_allowed(admin, permission, removed != Some(permission)).await;
    }
}

async fn wait_until_allowed(admin: &kube::Client, permission: Permission, allowed: bool) {
    let (resource, subresource) = match permission.resource.split_once('/') {
        Some((resource, subresource)) => (resource, Some(subresource.to_owned())),
        None => (permission.resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(MESH_CONTROL_USER.into()),
            groups: Some(vec!["system:serviceaccounts".into(), "system:authenticated".into()]),
            resource_attributes: Some(ResourceAttributes {
                namespace: permission.namespace.map(Into::into),
                group: Some(permission.group.into()),
                resource: Some(resource.into()),
                subresource,
                verb: Some(permission.verb.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SubjectAccessReview> = Api::all(admin.clone());
    eventually(&format!("the authorizer answers allowed={allowed} for {permission:?}"), async || {
        let answer = reviews.create(&PostParams::default(), &review).await.ok()?;
        (answer.status?.allowed == allowed).then_some(())
    })
    .await;
}

/// Waits until mesh-control has written the AuthorizationPolicy's `Accepted` condition and the
/// HTTPRoute's parent entry (`Accepted` and `ResolvedRefs`, as nodemesh's controller).
async fn wait_for_status(admin: &kube::Client) {
    let policies: Api<AuthorizationPolicy> = Api::namespaced(admin.clone(), "demo");
    let routes: Api<HttpRoute> = Api::namespaced(admin.clone(), "demo");
    eventually("mesh-control writes the policy's and the route's status", async || {
        let policy = policies.get("allow-web").await.ok()?;
        let conditions = policy.status?.conditions;
        let accepted = conditions.iter().find(|c| c.type_ == "Accepted")?;
        let route = routes.get("web").await.ok()?;
        let parent =
            route.status?.parents.into_iter().find(|p| p.controller_name == "nodemesh.io/mesh-control")?;
        let types: Vec<(String, String)> =
            parent.conditions.iter().map(|c| (c.type_.clone(), c.status.clone())).collect();
        (accepted.status == "True"
            && types
                == [
                    ("Accepted".to_owned(), "True".to_owned()),
                    ("ResolvedRefs".to_owned(), "True".to_owned()),
                ])
        .then_some(())
    })
    .await;
}

/// Removes the status of the demo object of `kind` (as an admin), so mesh-control must write it.
async fn clear_status(admin: &kube::Client, kind: &str) {
    let clear = Patch::Merge(json!({"status": null}));
    match kind {
        "AuthorizationPolicy" => Api::<AuthorizationPolicy>::namespaced(admin.clone(), "demo")
            .patch_status("allow-web", &PatchParams::default(), &clear)
            .await
            .map(drop),
        _ => Api::<HttpRoute>::namespaced(admin.clone(), "demo")
            .patch_status("web", &PatchParams::default(), &clear)
            .await
            .map(drop),
    }
    .expect("status cleared");
}

/// Writes a kubeconfig holding a token of the `mesh-control` service account, which deploy/base
/// created: mesh-control runs as exactly what a cluster would run it as.
async fn mesh_control_kubeconfig(api: &KubeApiServer) -> PathBuf {
    let accounts: Api<ServiceAccount> =
        Api::namespaced(api.client().expect("admin client"), SYSTEM_NAMESPACE);
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).expect("valid");
    let issued = accounts
        .create_token_request("mesh-control", &PostParams::default(), &request)
        .await
        .expect("a token for mesh-control's service account");
    let user = TokenUser {
        name: "mesh-control".into(),
        groups: vec![],
        token: issued.status.expect("status").token,
    };
    api.write_kubeconfig(&user).expect("kubeconfig")
}

/// Creates what mesh-control discovers: an ambient namespace with a pod (IP reported, as a
/// kubelet would) and a service, an AuthorizationPolicy and an HTTPRoute; and the node agent's
/// pod on node-a. Returns a token of the node agent's service account bound to that pod.
async fn create_cluster_objects(api: &KubeApiServer) -> String {
    let client = api.client().expect("admin client");
    let create = PostParams::default();
    let namespace =
        json!({"metadata": {"name": "demo", "labels": {"nodemesh.io/dataplane-mode": "ambient"}}});
    Api::<Namespace>::all(client.clone())
        .create(&create, &serde_json::from_value(namespace).expect("valid"))
        .await
        .expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod = json!({
        "metadata": {"name": "web-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "example/web"}]}
    });
    pods.create(&create, &serde_json::from_value(pod).expect("valid")).await.expect("pod");
    let status = json!({"status": {"phase": "Running", "podIP": "10.1.1.2", "podIPs": [{"ip": "10.1.1.2"}]}});
    pods.patch_status("web-1", &PatchParams::default(), &Patch::Merge(&status)).await.expect("status");
    let service =
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
    Api::<Service>::namespaced(client.clone(), "demo")
        .create(&create, &serde_json::from_value(service).expect("valid"))
        .await
        .expect("service");
    let policy = json!({
        "apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-web"}, "spec": {"selector": {"matchLabels": {"app": "web"}}}
    });
    Api::<AuthorizationPolicy>::namespaced(client.clone(), "demo")
        .create(&create, &serde_json::from_value(policy).expect("valid"))
        .await
        .expect("policy");
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web"}, "spec": {"parentRefs": [{"kind": "Service", "name": "web"}]}
    });
    Api::<HttpRoute>::namespaced(client.clone(), "demo")
        .create(&create, &serde_json::from_value(route).expect("valid"))
        .await
        .expect("route");

    let agent = json!({
        "metadata": {"name": "mesh-node-a"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "mesh-node",
                 "containers": [{"name": "agent", "image": "nodemesh/mesh-node"}]}
    });
    let agent = Api::<Pod>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .create(&create, &serde_json::from_value(agent).expect("valid"))
        .await
        .expect("node agent pod");
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "mesh-node-a", "uid": agent.metadata.uid}}
    }))
    .expect("valid");
    Api::<ServiceAccount>::namespaced(client, SYSTEM_NAMESPACE)
        .create_token_request("mesh-node", &create, &request)
        .await
        .expect("a token bound to the node agent's pod")
        .status
        .expect("status")
        .token
}

/// mesh-control in Kubernetes mode, started by this test and killed (by PID) when dropped.
struct MeshControl {
    child: Child,
    state: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl MeshControl {
    /// Starts mesh-control with `kubeconfig`, logging to `mesh-control-<run>.log` in the API
    /// server's directory (kept with it when the test fails).
    fn start(api: &KubeApiServer, kubeconfig: &Path, run: &str) -> Self {
        let state = api.dir().join("mesh-control");
        let log = api.dir().join(format!("mesh-control-{run}.log"));
        let (listen, admin) = (free_port(), free_port());
        let output = std::fs::File::create(&log).expect("log file");
        let child = Command::new(find_binary("mesh-control").expect("mesh-control binary"))
            .arg("--kubernetes")
            .arg("--state-dir")
            .arg(&state)
            .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("log file"))
            .stderr(output)
            .spawn()
            .expect("start mesh-control");
        MeshControl { child, state, log, listen, admin }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until mesh-control has published the cluster: web-1, and the services `web`,
    /// `kubernetes` and deploy/base's `mesh-control`.
    async fn wait_for_discovery(&self) {
        eventually("mesh-control discovers the cluster", async || {
            let config = admin_get(self.admin, "/debug/config").await?;
            (config["workloads"] == 1 && config["services"] == 3).then_some(())
        })
        .await;
    }

    /// Authenticates as `node` with `token` by opening its xDS stream; returns the refusal.
    async fn authenticate(&self, node: &str, token: &str) -> Result<(), tonic::Status> {
        let root = std::fs::read_to_string(self.state.join("ca/root-cert.pem")).expect("root");
        let tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name("mesh-control");
        let channel = Channel::from_shared(format!("https://{}", self.listen))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("TLS to mesh-control");
        let subscribe = DeltaDiscoveryRequest {
            node: Some(Node { id: node.into() }),
            type_url: mesh_api::workload::v1::ADDRESS_TYPE.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        // The stream stays open (no more requests) until the first response is read.
        let outgoing = futures_util::stream::iter([subscribe]).chain(futures_util::stream::pending());
        let mut request = tonic::Request::new(outgoing);
        request.metadata_mut().insert("x-nodemesh-node", node.parse().expect("ascii"));
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        let first =
            tokio::time::timeout(WAIT, responses.message()).await.expect("a response within the wait");
        first?.map(|_| ()).ok_or_else(|| tonic::Status::unknown("stream closed before a response"))
    }
}

impl Drop for MeshControl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

/// Polls `check` until it returns `Some`, for up to [`WAIT`].
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_get(admin: SocketAddr, path: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
}
