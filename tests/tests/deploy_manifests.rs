//! Everything in `deploy/`, checked every way this machine allows (no Docker, no kind, no
//! cluster): each manifest validates strictly against the schemas of Kubernetes 1.30 and 1.37
//! (`kubernetes-validate --strict`) and passes yamllint; `kubectl kustomize deploy/base` renders
//! exactly the files it lists; the real kube-apiserver of the test tier (1.20) accepts every
//! rendered object it serves in a server-side-apply dry run; the DaemonSet's and Deployment's
//! arguments are ones the built binaries accept, and agree with the probes, ports, mounts and
//! images; the Dockerfiles pass hadolint and copy what the workspace builds; the kind config is
//! what kind-up and the demo expect.
//!
//! The checkers come from `cargo xtask manifest-tools` (run by `cargo xtask test`), found through
//! `NODEMESH_MANIFEST_TOOLS`, else in `target/tools/manifest-tools/bin`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Container, PodSpec, Service},
};
use nodemesh_testbed::{deploy, kube_apiserver::KubeApiServer, process::find_binary};

/// The Kubernetes versions the manifests must be valid for: the oldest we support, the newest
/// kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// The images the manifests name: what `cargo xtask kind-up` builds and loads (xtask/src/kind.rs).
const IMAGES: [(&str, &str); 2] = [
    ("nodemesh/mesh-node:dev", "deploy/images/mesh-node.Dockerfile"),
    ("nodemesh/mesh-control:dev", "deploy/images/mesh-control.Dockerfile"),
];

// ---------------------------------------------------------------------------------------------
// Tools and files

/// Returns the directory holding kubernetes-validate, yamllint and hadolint.
fn tools_dir() -> PathBuf {
    let install = "install them with `cargo xtask manifest-tools` (cargo xtask test does)";
    if let Some(dir) = std::env::var_os("NODEMESH_MANIFEST_TOOLS") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("kubernetes-validate").is_file(),
            "NODEMESH_MANIFEST_TOOLS={} has no kubernetes-validate: {install}",
            dir.display()
        );
        return dir;
    }
    let dir = workspace().join("target/tools/manifest-tools/bin");
    assert!(
        dir.join("kubernetes-validate").is_file(),
        "the manifest checkers are not installed (no {}): {install}",
        dir.display()
    );
    dir
}

/// Returns a command for a checker, with the tools' directory first on PATH (kubectl may be
/// there, when the machine has none).
fn tool(program: &str) -> Command {
    let dir = tools_dir();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.clone()];
    dirs.extend(std::env::split_paths(&path));
    let program = if dir.join(program).is_file() { dir.join(program) } else { PathBuf::from(program) };
    let mut cmd = Command::new(program);
    cmd.env("PATH", std::env::join_paths(dirs).expect("PATH")).current_dir(workspace());
    cmd
}

/// Runs `cmd`, returning its output; panics naming it when it cannot start.
fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|err| panic!("cannot run {:?}: {err}", cmd.get_program()))
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn workspace() -> PathBuf {
    deploy::deploy_dir().join("..").canonicalize().expect("workspace")
}

/// Every YAML file under deploy/, sorted.
fn yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable deploy/ directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy::deploy_dir().canonicalize().expect("deploy/"), &mut files);
    files.sort();
    files
}

/// Files that hold Kubernetes API objects (not the Kustomization, not kind's config, not
/// yamllint's).
fn kubernetes_files() -> Vec<PathBuf> {
    yaml_files()
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name != "kustomization.yaml" && !p.ends_with("kind/cluster.yaml") && !name.starts_with('.')
        })
        .collect()
}

/// Renders deploy/base with `kubectl kustomize` into a file of `dir`; returns its path.
fn render_base(dir: &Path) -> PathBuf {
    let output = run(tool("kubectl").args(["kustomize", "deploy/base"]));
    assert!(output.status.success(), "kubectl kustomize deploy/base failed:\n{}", text(&output));
    let path = dir.join("base.yaml");
    std::fs::write(&path, &output.stdout).expect("write rendered base");
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodemesh-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `kind/name` of every object in `path`, in order.
fn object_names(path: &Path) -> Vec<String> {
    deploy::read_objects(path)
        .expect("parses")
        .iter()
        .map(|o| {
            let kind = o.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
            format!("{kind}/{}", o.metadata.name.as_deref().unwrap_or(""))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Schemas, lint, rendering

/// Runs kubernetes-validate --strict on `files` for `version`; returns (success, output).
fn validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let output = run(tool("kubernetes-validate").args(["--strict", "-k", version]).args(files));
    (output.status.success(), text(&output))
}

#[test]
fn every_manifest_validates_strictly_for_kubernetes_1_30_and_1_37() {
    let dir = scratch("validate");
    let mut files = kubernetes_files();
    // And what Kustomize makes of the base (the files it lists are in `files` too).
    files.push(render_base(&dir));
    let objects: usize = files.iter().map(|f| object_names(f).len()).sum();
    for version in KUBERNETES_VERSIONS {
        let (ok, output) = validate(version, &files);
        assert!(ok, "kubernetes-validate --strict -k {version} refused a manifest:\n{output}");
        // It only warns (and succeeds) for a kind it has no schema for: that is a failure here.
        let unchecked: Vec<&str> = output.lines().filter(|l| !l.starts_with("INFO")).collect();
        assert!(unchecked.is_empty(), "not validated against {version}:\n{}", unchecked.join("\n"));
        let passed = output.lines().filter(|l| l.contains(" passed for resource ")).count();
        assert_eq!(passed, objects, "{version}: {objects} objects, {passed} validated:\n{output}");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn strict_validation_refuses_an_unknown_field() {
    // The control: the same checker, an object with a misspelt field.
    let dir = scratch("validate-control");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\nautomountServiceAccountTokn: false\n",
    )
    .expect("write");
    for version in KUBERNETES_VERSIONS {
        let (ok, output) = validate(version, std::slice::from_ref(&bad));
        assert!(
            !ok && output.contains("'automountServiceAccountTokn' was unexpected"),
            "{version}: {output}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn yamllint_passes_with_the_project_config() {
    let output = run(tool("yamllint").args(["--strict", "-c", "deploy/.yamllint.yaml", "deploy/"]));
    assert!(output.status.success(), "yamllint -c deploy/.yamllint.yaml deploy/:\n{}", text(&output));
    // The control: the config is read and its rules bite.
    let dir = scratch("yamllint-control");
    std::fs::write(dir.join("bad.yaml"), "---\nkey: value   \nkey: again\n").expect("write");
    let output = run(tool("yamllint")
        .arg("-c")
        .arg(workspace().join("deploy/.yamllint.yaml"))
        .arg(dir.join("bad.yaml")));
    let found = text(&output);
    assert!(
        !output.status.success() && found.contains("trailing-spaces") && found.contains("key-duplicates"),
        "{found}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn kustomize_renders_exactly_the_listed_files() {
    let dir = scratch("kustomize");
    let rendered = render_base(&dir);
    let mut listed: Vec<String> = deploy::kustomization_resources("base")
        .expect("deploy/base/kustomization.yaml")
        .iter()
        .flat_map(|f| object_names(f))
        .collect();
    let mut got = object_names(&rendered);
    // Kustomize orders by kind; what matters is that nothing is added, lost or renamed.
    listed.sort();
    got.sort();
    assert_eq!(got, listed);
    for expected in [
        "Deployment/mesh-control",
        "Service/mesh-control",
        "PodDisruptionBudget/mesh-control",
        "DaemonSet/mesh-node",
    ] {
        assert!(got.iter().any(|n| n == expected), "deploy/base renders no {expected}");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

// ---------------------------------------------------------------------------------------------
// The real API server

/// `kubectl --kubeconfig <admin> <args>` against the test server.
fn kubectl(api: &KubeApiServer, args: &[&str]) -> Output {
    run(tool("kubectl").arg("--kubeconfig").arg(api.kubeconfig()).args(args))
}

/// Writes the objects of `path` except those of the given kinds into `dir/name`; returns the path
/// and the `kind/name`s left out.
fn without_kinds(path: &Path, kinds: &[(&str, &str)], dir: &Path, name: &str) -> (PathBuf, Vec<String>) {
    let mut kept = Vec::new();
    let mut left_out = Vec::new();
    for object in deploy::read_objects(path).expect("parses") {
        let types = object.types.clone().expect("typed");
        if kinds.iter().any(|(api_version, kind)| types.api_version == *api_version && types.kind == *kind) {
            left_out.push(format!("{}/{}", types.kind, object.metadata.name.clone().unwrap_or_default()));
        } else {
            kept.push(serde_json::to_string(&object).expect("json"));
        }
    }
    // JSON is YAML: one document each.
    let out = dir.join(name);
    std::fs::write(&out, kept.iter().map(|o| format!("---\n{o}\n")).collect::<String>()).expect("write");
    (out, left_out)
}

/// `kubectl apply --server-side --dry-run=server`: the server runs admission and validation and
/// stores nothing. Server-side apply, unlike a plain create, refuses fields the server's schema
/// does not know (1.20 has no field validation for creates).
fn dry_run(api: &KubeApiServer, file: &Path) -> Output {
    kubectl(
        api,
        &[
            "apply",
            "--server-side",
            "--field-manager=deploy-test",
            "--dry-run=server",
            "-f",
            file.to_str().expect("utf-8"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_api_server_accepts_the_rendered_manifests() {
    let dir = scratch("dry-run");
    let api = KubeApiServer::start("deploy-dry-run").expect("kube-apiserver");

    // What the server does not serve is said, and must stay true: when the test tier moves to a
    // newer server, the skip goes.
    let versions = kubectl(&api, &["api-versions"]);
    assert!(versions.status.success(), "{}", text(&versions));
    let served: Vec<String> = String::from_utf8_lossy(&versions.stdout).lines().map(str::to_owned).collect();
    let skipped_kinds: Vec<(&str, &str)> = deploy::NOT_SERVED_BY_TEST_SERVER
        .iter()
        .map(|(api_version, kind, _)| (*api_version, *kind))
        .collect();
    for (api_version, kind, why) in deploy::NOT_SERVED_BY_TEST_SERVER {
        assert!(
            !served.iter().any(|v| v == api_version),
            "the test server serves {api_version} now: stop skipping {kind}"
        );
        eprintln!(
            "not dry-run on kube-apiserver 1.20: {kind} ({api_version}): {why}; validated against 1.30 and 1.37 instead"
        );
    }

    // The CRDs for real (the base does not need them, the demo and policies do), and the
    // namespaces the namespaced objects go to: a dry run creates nothing for the next object.
    for file in ["deploy/crds/", "deploy/base/namespace.yaml"] {
        let output = kubectl(&api, &["apply", "--server-side", "--field-manager=deploy-test", "-f", file]);
        assert!(output.status.success(), "applying {file}: {}", text(&output));
    }
    let output = kubectl(&api, &["create", "namespace", "demo"]);
    assert!(output.status.success(), "{}", text(&output));

    let rendered = render_base(&dir);
    let (base, left_out) = without_kinds(&rendered, &skipped_kinds, &dir, "base-served.yaml");
    assert_eq!(left_out, ["PodDisruptionBudget/mesh-control"], "only the PodDisruptionBudget is left out");
    let others: Vec<PathBuf> = ["deploy/crds", "deploy/kind/demo.yaml", "deploy/uninstall/cleanup.yaml"]
        .iter()
        .map(|p| workspace().join(p))
        .collect();
    for file in std::iter::once(&base).chain(&others) {
        let output = dry_run(&api, file);
        let said = text(&output);
        assert!(output.status.success(), "kube-apiserver 1.20 refused {}:\n{said}", file.display());
        let files: Vec<PathBuf> = if file.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(file)
                .expect("dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect();
            found.sort();
            found
        } else {
            vec![file.clone()]
        };
        let expected: usize = files.iter().map(|f| object_names(f).len()).sum();
        let applied = said.lines().filter(|l| l.ends_with("serverside-applied (server dry run)")).count();
        assert_eq!(applied, expected, "{}: {expected} objects, {applied} accepted:\n{said}", file.display());
    }

    // The control: a field 1.20's schema does not know is refused by the same dry run.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  namespace: nodemesh-system\nautomountServiceAccountTokn: false\n",
    )
    .expect("write");
    let output = dry_run(&api, &bad);
    assert!(!output.status.success(), "an unknown field passed the dry run:\n{}", text(&output));
    // Nothing of the dry runs was stored.
    let output =
        kubectl(&api, &["-n", "nodemesh-system", "get", "daemonsets,deployments,services", "-o", "name"]);
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "the dry run stored objects:\n{}",
        text(&output)
    );
    drop(api);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

// ---------------------------------------------------------------------------------------------
// Arguments against the binaries

fn daemonset() -> DaemonSet {
    let [ds]: [DaemonSet; 1] =
        deploy::read_kind(&deploy::deploy_dir().join("base/mesh-node.yaml"), "DaemonSet")
            .expect("mesh-node.yaml")
            .try_into()
            .expect("one DaemonSet");
    ds
}

fn deployment() -> Deployment {
    let [d]: [Deployment; 1] =
        deploy::read_kind(&deploy::deploy_dir().join("base/mesh-control.yaml"), "Deployment")
            .expect("mesh-control.yaml")
            .try_into()
            .expect("one Deployment");
    d
}

fn pod_spec_of_daemonset(ds: &DaemonSet) -> PodSpec {
    ds.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Returns the container's args with `$(VAR)` replaced as the kubelet would, from its env
/// (fieldRefs get a sample value).
fn expanded_args(container: &Container) -> Vec<String> {
    let env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(from))
                    if from.field_ref.as_ref().is_some_and(|f| f.field_path == "spec.nodeName") =>
                {
                    "kind-worker".to_owned()
                }
                _ => format!("sample-{}", e.name.to_lowercase()),
            };
            (e.name.clone(), value)
        })
        .collect();
    container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            env.iter().fold(arg.clone(), |arg, (name, value)| arg.replace(&format!("$({name})"), value))
        })
        .collect()
}

/// Returns the value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

/// Runs the binary's argument parser on `args`: clap parses every argument in order (an
/// unknown flag or a bad value fails with exit 2) and stops at the trailing `--help`, before it
/// would run anything.
fn parse_args(binary: &Path, args: &[String]) -> Output {
    run(Command::new(binary).args(args).arg("--help").env_clear())
}

/// Returns the `--flags` of the `Usage:` line of `<binary> <subcommand> --help`: the required ones.
fn required_flags(binary: &Path, subcommand: &[&str]) -> Vec<String> {
    let output = run(Command::new(binary).args(subcommand).arg("--help"));
    assert!(output.status.success(), "{}", text(&output));
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    let usage = help.lines().find(|l| l.starts_with("Usage:")).expect("a Usage line").to_owned();
    usage.split_whitespace().filter(|w| w.starts_with("--")).map(str::to_owned).collect()
}

/// Checks `args` with the binary: accepted, every required flag given, and a bogus flag refused.
fn assert_binary_accepts(binary: &Path, subcommand: &[&str], args: &[String], what: &str) {
    let output = parse_args(binary, args);
    assert!(
        output.status.success(),
        "{} does not accept the args of {what} {args:?}:\n{}",
        binary.display(),
        text(&output)
    );
    for required in required_flags(binary, subcommand) {
        assert!(
            args.iter().any(|a| a == &required || a.starts_with(&format!("{required}="))),
            "{what} does not pass {required}, which {} {} requires",
            binary.display(),
            subcommand.join(" ")
        );
    }
    // The control: the same parser refuses what it does not know.
    let mut bogus = args.to_vec();
    bogus.push("--no-such-flag=1".to_owned());
    let output = parse_args(binary, &bogus);
    assert!(!output.status.success() && text(&output).contains("--no-such-flag"), "{}", text(&output));
}

#[test]
fn mesh_node_accepts_the_daemonset_args_and_they_agree_with_the_pod() {
    let binary = find_binary("mesh-node").expect("mesh-node");
    let ds = daemonset();
    let spec = pod_spec_of_daemonset(&ds);
    let node = container(&spec, "mesh-node");
    let args = expanded_args(node);
    assert_binary_accepts(&binary, &["run"], &args, "deploy/base/mesh-node.yaml");
    assert_eq!(flag(&args, "node-name"), Some("kind-worker"), "the node name comes from spec.nodeName");

    // Exactly the node access the DaemonSet's comment justifies, and no more.
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.host_pid, None, "the netns paths come from the CNI plugin, not /proc");
    assert_eq!(spec.host_ipc, None);
    let host_paths: Vec<&str> =
        spec.volumes.iter().flatten().filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str())).collect();
    assert_eq!(
        host_paths,
        [
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/var/run/netns",
            "/opt/cni/bin",
            "/etc/cni/net.d",
            "/run/nodemesh"
        ]
    );

    // Every path an argument names is inside a volume mounted for it.
    let mounts: Vec<&str> = node.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    for name in
        ["control-plane-roots", "node-token-file", "pods-cgroup", "proxy-cgroup", "bpffs", "state-dir"]
    {
        let path = flag(&args, name).unwrap_or_else(|| panic!("the DaemonSet passes no --{name}"));
        assert!(
            mounts.iter().any(|m| Path::new(path).starts_with(m)),
            "--{name}={path} is in no volume mount ({mounts:?})"
        );
    }
    // The kernel programs are where the image puts them.
    let dockerfile =
        std::fs::read_to_string(workspace().join("deploy/images/mesh-node.Dockerfile")).expect("Dockerfile");
    let object = flag(&args, "bpf-object").expect("--bpf-object");
    assert!(
        dockerfile.lines().any(|l| l.starts_with("COPY --from=") && l.ends_with(&format!(" {object}"))),
        "the image puts no object at {object}"
    );

    // Probes and scraping use the ports mesh-node listens on.
    let port_of = |name: &str| -> i32 {
        let addr = flag(&args, name).unwrap_or_else(|| panic!("--{name}"));
        addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
    };
    let http_port = |probe: &Option<k8s_openapi::api::core::v1::Probe>| -> Option<i32> {
        let probe = probe.as_ref()?;
        let port = probe.http_get.as_ref().map(|h| &h.port).or(probe.tcp_socket.as_ref().map(|t| &t.port))?;
        match port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => Some(*p),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => None,
        }
    };
    assert_eq!(http_port(&node.readiness_probe), Some(port_of("readiness-addr")));
    assert_eq!(
        node.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.as_deref()),
        Some("/healthz/ready")
    );
    assert_eq!(http_port(&node.liveness_probe), Some(port_of("readiness-addr")));
    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"));
    assert_eq!(annotations.get("prometheus.io/port"), Some(&port_of("metrics-addr").to_string()));

    // The node's identity: a projected token with no audience, because mesh-control's
    // TokenReview names none (the API server then checks its own audiences).
    let review = std::fs::read_to_string(workspace().join("mesh-control/src/node_auth/kubernetes.rs"))
        .expect("source");
    assert!(
        review.contains("audiences: None"),
        "mesh-control's TokenReview names audiences now: give the DaemonSet's token the same"
    );
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| {
            v.projected.as_ref()?.sources.iter().flatten().find_map(|s| s.service_account_token.clone())
        })
        .expect("a projected service-account token");
    assert_eq!(token.audience, None);
    assert_eq!(spec.automount_service_account_token, Some(false), "no other API credential in the pod");
    assert_eq!(spec.service_account_name.as_deref(), Some("mesh-node"));
    assert_eq!(
        flag(
            &expanded_args(container(
                &deployment().spec.and_then(|s| s.template.spec).expect("spec"),
                "mesh-control"
            )),
            "node-service-account"
        ),
        Some("nodemesh-system/mesh-node"),
        "mesh-control accepts the tokens of the DaemonSet's service account"
    );
}

#[test]
fn mesh_node_accepts_the_cleanup_args() {
    let binary = find_binary("mesh-node").expect("mesh-node");
    let [ds]: [DaemonSet; 1] =
        deploy::read_kind(&deploy::deploy_dir().join("uninstall/cleanup.yaml"), "DaemonSet")
            .expect("cleanup.yaml")
            .try_into()
            .expect("one DaemonSet");
    let spec = pod_spec_of_daemonset(&ds);
    let args = expanded_args(container(&spec, "cleanup"));
    assert_eq!(args.first().map(String::as_str), Some("cleanup"));
    assert_binary_accepts(&binary, &["cleanup"], &args, "deploy/uninstall/cleanup.yaml");
    // The same bpffs and CNI directories as the agent's, mounted.
    let agent = expanded_args(container(&pod_spec_of_daemonset(&daemonset()), "mesh-node"));
    let mounts: Vec<&str> =
        container(&spec, "cleanup").volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    for name in ["bpffs", "cni-conf-dir", "cni-bin-dir"] {
        assert_eq!(flag(&args, name), flag(&agent, name), "--{name}");
        let path = flag(&args, name).unwrap_or_else(|| panic!("cleanup passes no --{name}"));
        assert!(mounts.contains(&path), "--{name}={path} is not mounted");
    }
}

#[test]
fn mesh_control_accepts_the_deployment_args_and_they_agree_with_the_pod() {
    let binary = find_binary("mesh-control").expect("mesh-control");
    let deployment = deployment();
    let spec = deployment.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod spec");
    let control = container(&spec, "mesh-control");
    let args = expanded_args(control);
    assert_binary_accepts(&binary, &[], &args, "deploy/base/mesh-control.yaml");
    assert!(args.iter().any(|a| a == "--kubernetes"), "Kubernetes mode");

    let port = |name: &str| -> i32 {
        flag(&args, name)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("--{name}"))
    };
    let ports: Vec<i32> = control.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [port("listen"), port("admin-listen")]);
    assert!(
        flag(&args, "admin-listen").is_some_and(|a| a.starts_with("0.0.0.0:")),
        "probes and scrapes come from outside the pod"
    );
    let [service]: [Service; 1] =
        deploy::read_kind(&deploy::deploy_dir().join("base/mesh-control.yaml"), "Service")
            .expect("Service")
            .try_into()
            .expect("one Service");
    let service_ports: Vec<i32> =
        service.spec.and_then(|s| s.ports).unwrap_or_default().iter().map(|p| p.port).collect();
    assert_eq!(service_ports, [port("listen"), port("admin-listen")]);
    // The node agents dial what the Service serves.
    let agent = expanded_args(container(&pod_spec_of_daemonset(&daemonset()), "mesh-node"));
    assert_eq!(
        flag(&agent, "control-plane"),
        Some(format!("https://mesh-control.nodemesh-system.svc:{}", port("listen")).as_str())
    );

    // Non-root, as the image's user; the root's directory is the CA secret's mount.
    let security = spec.security_context.clone().expect("pod securityContext");
    assert_eq!(security.run_as_non_root, Some(true));
    let dockerfile = std::fs::read_to_string(workspace().join("deploy/images/mesh-control.Dockerfile"))
        .expect("Dockerfile");
    let user = dockerfile.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER");
    assert_eq!(user, format!("{0}:{0}", security.run_as_user.expect("runAsUser")));
    let mounts: Vec<&str> = control.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    for name in ["root-dir", "state-dir"] {
        let path = flag(&args, name).unwrap_or_else(|| panic!("--{name}"));
        assert!(mounts.contains(&path), "--{name}={path} is no volume mount ({mounts:?})");
    }
}

// ---------------------------------------------------------------------------------------------
// Images and kind

/// The instructions of a Dockerfile, continuation lines joined.
fn instructions(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let line = line.trim();
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_owned());
                }
                current.clear();
            }
        }
    }
    out
}

#[test]
fn the_dockerfiles_pass_hadolint_and_copy_what_the_workspace_builds() {
    let files: Vec<PathBuf> = IMAGES.iter().map(|(_, f)| workspace().join(f)).collect();
    let output = run(tool("hadolint").args(&files));
    assert!(output.status.success(), "hadolint:\n{}", text(&output));
    let rust_version = std::fs::read_to_string(workspace().join("Cargo.toml"))
        .expect("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = ").map(|v| v.trim_matches('"').to_owned()))
        .expect("workspace rust-version");

    for (binary, file) in [("mesh-node", &files[0]), ("mesh-control", &files[1])] {
        let steps = instructions(file);
        let from: Vec<&String> = steps.iter().filter(|s| s.starts_with("FROM ")).collect();
        assert!(from.len() >= 2, "{}: not multi-stage", file.display());
        assert!(
            from[0].contains(&format!("rust:{rust_version}-")),
            "{}: build with the workspace's Rust {rust_version}",
            file.display()
        );
        // The build produces the binary, from the crate of that name in the workspace...
        let build =
            steps.iter().find(|s| s.starts_with("RUN ") && s.contains("cargo build")).expect("a cargo build");
        assert!(build.contains(&format!("-p {binary} --bin {binary}")), "{}: {build}", file.display());
        assert!(build.contains("--locked"), "{}: builds with the checked-in Cargo.lock", file.display());
        assert!(workspace().join(binary).join("Cargo.toml").is_file(), "no crate {binary}");
        // ...which the last stage copies to where its entrypoint runs it.
        let last = steps.iter().rposition(|s| s.starts_with("FROM ")).expect("FROM");
        let runtime = &steps[last..];
        let entrypoint = runtime.iter().find_map(|s| s.strip_prefix("ENTRYPOINT ")).expect("an ENTRYPOINT");
        let target = format!("/usr/bin/{binary}");
        assert_eq!(entrypoint, format!("[\"{target}\"]"));
        assert!(
            runtime
                .iter()
                .any(|s| s.starts_with("COPY --from=build ") && s.ends_with(&format!("/{binary} {target}"))),
            "{}: no COPY of {binary}",
            file.display()
        );
        assert!(
            !runtime.iter().any(|s| s.starts_with("RUN ")),
            "{}: the runtime image runs nothing at build",
            file.display()
        );
    }
    // mesh-node's image carries the eBPF object that xtask build-ebpf builds.
    let node = instructions(&files[0]);
    assert!(node.iter().any(|s| s.contains("cargo xtask build-ebpf")
        && s.contains("target/ebpf/bpfel-unknown-none/release/mesh-ebpf")));
    // mesh-control does not run as root; mesh-node must.
    let last_user =
        |steps: &[String]| steps.iter().rev().find_map(|s| s.strip_prefix("USER ")).map(str::to_owned);
    let control_user = last_user(&instructions(&files[1])).expect("mesh-control sets a USER");
    assert!(
        !["0", "root", "0:0", "root:root"].contains(&control_user.as_str()),
        "mesh-control runs as {control_user}"
    );
    assert_eq!(last_user(&node).as_deref(), Some("0:0"));
    // The build context leaves the build trees out.
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".dockerignore keeps target/ out");
}

#[test]
fn the_manifests_name_the_images_kind_up_builds() {
    let mut named = Vec::new();
    for file in kubernetes_files() {
        let text = std::fs::read_to_string(&file).expect("read");
        for line in text.lines().filter_map(|l| l.trim().strip_prefix("image: ")) {
            if line.starts_with("nodemesh/") {
                named.push(line.to_owned());
            }
        }
    }
    named.sort();
    named.dedup();
    let mut built: Vec<String> = IMAGES.iter().map(|(i, _)| (*i).to_owned()).collect();
    built.sort();
    assert_eq!(named, built);
    let kind_up = std::fs::read_to_string(workspace().join("xtask/src/kind.rs")).expect("xtask/src/kind.rs");
    for (image, dockerfile) in IMAGES {
        assert!(
            kind_up.contains(&format!("(\"{image}\", \"{dockerfile}\")")),
            "kind-up does not build {image} from {dockerfile}"
        );
    }
}

#[test]
fn the_kind_config_is_what_kind_up_and_the_demo_expect() {
    let path = deploy::deploy_dir().join("kind/cluster.yaml");
    let text = std::fs::read_to_string(&path).expect("cluster.yaml");
    let config: serde_json::Value = serde_saphyr::from_str(&text).expect("parses");
    assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(config["kind"], "Cluster");
    // kind-up finds its cluster and context by this name.
    let kind_up = std::fs::read_to_string(workspace().join("xtask/src/kind.rs")).expect("kind.rs");
    let name = config["name"].as_str().expect("a name");
    assert!(
        kind_up.contains(&format!("pub const CLUSTER: &str = \"{name}\";")),
        "kind-up's cluster is not {name}"
    );
    // Only fields kind's v1alpha4 Cluster has (a misspelt one is silently ignored by kind).
    let known = [
        "kind",
        "apiVersion",
        "name",
        "nodes",
        "networking",
        "featureGates",
        "runtimeConfig",
        "kubeadmConfigPatches",
        "containerdConfigPatches",
    ];
    for key in config.as_object().expect("a map").keys() {
        assert!(known.contains(&key.as_str()), "kind has no Cluster field {key}");
    }
    assert_eq!(config["networking"]["disableDefaultCNI"], false, "the default CNI stays: ours is chained");
    let nodes = config["nodes"].as_array().expect("nodes");
    let roles: Vec<&str> = nodes.iter().map(|n| n["role"].as_str().expect("role")).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    // The demo's client and server land on the two workers.
    let labels: Vec<String> = nodes
        .iter()
        .filter_map(|n| n["labels"]["nodemesh.io/demo-node"].as_str().map(str::to_owned))
        .collect();
    let demo = std::fs::read_to_string(deploy::deploy_dir().join("kind/demo.yaml")).expect("demo.yaml");
    let selectors: Vec<Deployment> =
        deploy::read_kind(&deploy::deploy_dir().join("kind/demo.yaml"), "Deployment").expect("demo");
    let mut wanted: Vec<String> = selectors
        .iter()
        .filter_map(|d| {
            d.spec
                .as_ref()?
                .template
                .spec
                .as_ref()?
                .node_selector
                .as_ref()?
                .get("nodemesh.io/demo-node")
                .cloned()
        })
        .collect();
    wanted.sort();
    assert_eq!(labels, wanted, "demo nodeSelectors and node labels differ");
    assert!(demo.contains("namespace: demo"));
}
