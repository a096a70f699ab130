//! `cargo xtask kind-up`: nodemesh on a kind cluster, on a machine with Docker and kind.
//!
//! Creates the cluster of `deploy/kind/cluster.yaml` (or reuses it), builds the two images of
//! `deploy/images/` and loads them into the nodes, creates the signing root (Secret and
//! ConfigMap), applies `deploy/crds/` then `deploy/base/`, creates and annotates namespace
//! `demo`, deploys `deploy/kind/demo.yaml`, and checks that the client reaches the server and
//! that mesh-node carried the request in an HBONE tunnel. Each step shows its progress and logs
//! to `target/xtask/kind-*.log`; the first failure stops the run with one message. Where Docker
//! or kind is missing, it stops before doing anything.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{progress::Step, toolchain};

/// The cluster's name, as in deploy/kind/cluster.yaml; kind names its kubectl context after it.
pub const CLUSTER: &str = "nodemesh";
const CONTEXT: &str = "kind-nodemesh";
const SYSTEM_NAMESPACE: &str = "nodemesh-system";
const DEMO_NAMESPACE: &str = "demo";
/// The images the manifests name (deploy/base), built here and loaded into the nodes.
pub const IMAGES: [(&str, &str); 2] = [
    ("nodemesh/mesh-node:dev", "deploy/images/mesh-node.Dockerfile"),
    ("nodemesh/mesh-control:dev", "deploy/images/mesh-control.Dockerfile"),
];
/// What mesh-node logs on the client's node for each stream it opens to a meshed destination.
const HBONE_LOG: &str = "HBONE stream opened";

/// The programs kind-up drives, where they were found.
#[derive(Debug, Default, Clone)]
pub struct Tools {
    pub docker: Option<PathBuf>,
    pub kind: Option<PathBuf>,
    pub kubectl: Option<PathBuf>,
}

impl Tools {
    /// Looks the programs up on PATH.
    pub fn find() -> Self {
        Tools {
            docker: toolchain::which("docker"),
            kind: toolchain::which("kind"),
            kubectl: toolchain::which("kubectl"),
        }
    }
}

/// Returns why kind-up cannot start with `tools`, or `None` when they are all there.
pub fn missing_tools(tools: &Tools) -> Option<String> {
    let missing: Vec<&str> = [("docker", &tools.docker), ("kind", &tools.kind), ("kubectl", &tools.kubectl)]
        .into_iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| name)
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "cargo xtask kind-up needs Docker, kind and kubectl, and {} not on PATH: install {} \
         (Docker Engine, kind 0.20 or later, kubectl) and run it again. Nothing was created. \
         Without them, the manifests are checked offline and against a real kube-apiserver by \
         `cargo xtask test` (tests/tests/deploy_manifests.rs).",
        match missing.as_slice() {
            [one] => format!("{one} is"),
            _ => format!("{} are", missing.join(", ")),
        },
        if missing.len() == 1 { "it" } else { "them" },
    ))
}

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Returns whether `path` is a cgroup v2 mount (the unified hierarchy kind's nodes inherit).
fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: zeroed plain-data struct owned here; both pointers are valid for the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0) && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// Checks what kind-up needs before it changes anything: the programs, a Docker daemon that
/// answers, and a cgroup v2 host.
fn preflight() -> anyhow::Result<Tools> {
    let tools = Tools::find();
    if let Some(why) = missing_tools(&tools) {
        bail!(why);
    }
    let docker = tools.docker.clone().unwrap_or_default();
    let info = Command::new(&docker).args(["info", "--format", "{{.ServerVersion}}"]).output();
    match info {
        Ok(output) if output.status.success() => {}
        Ok(output) => bail!(
            "Docker is installed ({}) but its daemon does not answer: {}. Start it (or give this \
             user access to it) and run cargo xtask kind-up again. Nothing was created.",
            docker.display(),
            String::from_utf8_lossy(&output.stderr).lines().next().unwrap_or("no output").trim()
        ),
        Err(err) => bail!("cannot run {}: {err}. Nothing was created.", docker.display()),
    }
    if !is_cgroup2(Path::new("/sys/fs/cgroup")) {
        bail!(
            "/sys/fs/cgroup is not cgroup v2: kind's nodes inherit the host's hierarchy, and \
             mesh-node attaches its programs to a cgroup v2 directory. Boot the host with the \
             unified hierarchy (systemd.unified_cgroup_hierarchy=1). Nothing was created."
        );
    }
    Ok(tools)
}

/// Runs `program args` as a step; returns its output.
fn step(title: &str, log: &str, program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(crate::workspace_root());
    Step::start(title).run(log, &mut cmd)
}

/// Returns `kubectl --context kind-nodemesh <args>`'s stdout, or an error with its stderr.
fn kubectl(tools: &Tools, args: &[&str]) -> anyhow::Result<String> {
    let kubectl = tools.kubectl.as_deref().context("kubectl")?;
    let output = Command::new(kubectl)
        .arg("--context")
        .arg(CONTEXT)
        .args(args)
        .current_dir(crate::workspace_root())
        .output()
        .with_context(|| format!("running {}", kubectl.display()))?;
    if !output.status.success() {
        bail!("`kubectl {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a kubectl command as a step, with its output in `target/xtask/<log>.log`.
fn kubectl_step(tools: &Tools, title: &str, log: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["--context", CONTEXT];
    all.extend_from_slice(args);
    step(title, log, tools.kubectl.as_deref().context("kubectl")?, &all)
}

/// Creates the cluster, installs nodemesh, runs the demo and its connectivity check.
pub fn up() -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("kind-up: checking Docker, kind, kubectl and cgroup v2");
    let tools = preflight()?;
    let (docker, kind) = (tools.docker.clone().unwrap_or_default(), tools.kind.clone().unwrap_or_default());

    let clusters = Command::new(&kind).args(["get", "clusters"]).output().context("kind get clusters")?;
    if String::from_utf8_lossy(&clusters.stdout).lines().any(|line| line.trim() == CLUSTER) {
        eprintln!(
            "✓ kind cluster {CLUSTER} exists: reusing it (`kind delete cluster --name {CLUSTER}` starts afresh)"
        );
    } else {
        step(
            &format!(
                "creating kind cluster {CLUSTER} (deploy/kind/cluster.yaml: a control plane, two workers)"
            ),
            "kind-create",
            &kind,
            &["create", "cluster", "--config", "deploy/kind/cluster.yaml", "--wait", "120s"],
        )?;
    }

    for (image, dockerfile) in IMAGES {
        step(
            &format!("building {image} ({dockerfile}; the first build compiles everything)"),
            &format!("kind-build-{}", image_file_name(image)),
            &docker,
            &["build", "-f", dockerfile, "-t", image, "."],
        )?;
    }
    let mut load = vec!["load", "docker-image", "--name", CLUSTER];
    load.extend(IMAGES.map(|(image, _)| image));
    step("loading the images into the nodes", "kind-load", &kind, &load)?;

    kubectl_step(
        &tools,
        "installing the CRDs (deploy/crds/)",
        "kind-crds",
        &["apply", "-f", "deploy/crds/"],
    )?;
    kubectl_step(
        &tools,
        "waiting for the CRDs to be served",
        "kind-crds-wait",
        &["wait", "--for=condition=Established", "--timeout=60s", "-f", "deploy/crds/"],
    )?;
    kubectl_step(
        &tools,
        "creating namespace nodemesh-system",
        "kind-namespace",
        &["apply", "-f", "deploy/base/namespace.yaml"],
    )?;
    ensure_root_ca(&tools)?;
    kubectl_step(
        &tools,
        "applying deploy/base/ (kubectl apply -k)",
        "kind-base",
        &["apply", "-k", "deploy/base/"],
    )?;
    for (what, object) in
        [("mesh-control", "deployment/mesh-control"), ("mesh-node on every node", "daemonset/mesh-node")]
    {
        kubectl_step(
            &tools,
            &format!("waiting for {what}"),
            "kind-rollout",
            &["-n", SYSTEM_NAMESPACE, "rollout", "status", object, "--timeout=180s"],
        )?;
    }

    if kubectl(&tools, &["get", "namespace", DEMO_NAMESPACE]).is_err() {
        kubectl(&tools, &["create", "namespace", DEMO_NAMESPACE])?;
    }
    kubectl_step(
        &tools,
        "enrolling namespace demo (nodemesh.io/dataplane-mode=ambient)",
        "kind-annotate",
        &["annotate", "--overwrite", "namespace", DEMO_NAMESPACE, "nodemesh.io/dataplane-mode=ambient"],
    )?;
    kubectl_step(
        &tools,
        "deploying the demo apps (deploy/kind/demo.yaml)",
        "kind-demo",
        &["apply", "-f", "deploy/kind/demo.yaml"],
    )?;
    for app in ["server", "client"] {
        kubectl_step(
            &tools,
            &format!("waiting for demo/{app}"),
            "kind-demo-rollout",
            &["-n", DEMO_NAMESPACE, "rollout", "status", &format!("deployment/{app}"), "--timeout=180s"],
        )?;
    }
    check_connectivity(&tools)?;
    eprintln!(
        "\nnodemesh runs on kind cluster {CLUSTER} ({}s). Look around:\n  kubectl --context {CONTEXT} -n {SYSTEM_NAMESPACE} get pods -o wide\n  \
         kubectl --context {CONTEXT} -n {SYSTEM_NAMESPACE} logs daemonset/mesh-node\n\
         Remove it all: kind delete cluster --name {CLUSTER}",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// Returns the part of an image name usable in a file name (`mesh-node` of `nodemesh/mesh-node:dev`).
fn image_file_name(image: &str) -> &str {
    let name = image.rsplit('/').next().unwrap_or(image);
    name.split(':').next().unwrap_or(name)
}

/// Creates the signing root once per cluster: generated on this machine by mesh-control, kept
/// only in the cluster (Secret nodemesh-ca for mesh-control, ConfigMap nodemesh-ca-root with the
/// certificate alone for mesh-node).
fn ensure_root_ca(tools: &Tools) -> anyhow::Result<()> {
    if kubectl(tools, &["-n", SYSTEM_NAMESPACE, "get", "secret", "nodemesh-ca"]).is_ok() {
        eprintln!("✓ signing root: Secret nodemesh-ca exists, kept");
        return Ok(());
    }
    let step = Step::start("creating the signing root (mesh-control generate-root)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(crate::workspace_root()).args(["build", "-p", "mesh-control", "--bin", "mesh-control"]);
    crate::progress::run_logged(&step, "kind-root-build", &mut build)?;
    let dir = crate::target_dir().join("kind").join("root");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let mut generate = Command::new(crate::target_dir().join("debug/mesh-control"));
    generate.args(["generate-root", "--out"]).arg(&dir);
    crate::progress::run_logged(&step, "kind-root-generate", &mut generate)?;
    let (cert, key) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
    let (cert, key) = (format!("--from-file={}", cert.display()), format!("--from-file={}", key.display()));
    let created =
        kubectl(tools, &["-n", SYSTEM_NAMESPACE, "create", "secret", "generic", "nodemesh-ca", &cert, &key])
            .and_then(|_| {
                kubectl(tools, &["-n", SYSTEM_NAMESPACE, "create", "configmap", "nodemesh-ca-root", &cert])
            });
    // The key's only copy is the Secret's.
    let _ = std::fs::remove_dir_all(&dir);
    created?;
    step.done_with("Secret nodemesh-ca, ConfigMap nodemesh-ca-root");
    Ok(())
}

/// Checks that the demo client reaches the server, and that mesh-node on the client's node
/// carried it in an HBONE tunnel (its log says so).
fn check_connectivity(tools: &Tools) -> anyhow::Result<()> {
    let step = Step::start("connectivity check: demo/client -> server.demo, through the mesh");
    let request = [
        "-n",
        DEMO_NAMESPACE,
        "exec",
        "deploy/client",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://server.demo.svc/",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match kubectl(tools, &request) {
            Ok(status) if status.trim() == "200" => break,
            outcome if Instant::now() > deadline => {
                bail!("demo/client could not reach server.demo within 60 s (last: {outcome:?})")
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    }
    step.detail("HTTP 200; looking for the HBONE stream in mesh-node's log");
    let node = kubectl(
        tools,
        &["-n", DEMO_NAMESPACE, "get", "pod", "-l", "app=client", "-o", "jsonpath={.items[0].spec.nodeName}"],
    )?;
    let selector = format!("spec.nodeName={}", node.trim());
    let pod = kubectl(
        tools,
        &[
            "-n",
            SYSTEM_NAMESPACE,
            "get",
            "pod",
            "-l",
            "app.kubernetes.io/name=mesh-node",
            "--field-selector",
            &selector,
            "-o",
            "name",
        ],
    )?;
    let pod = pod.trim();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = kubectl(tools, &["-n", SYSTEM_NAMESPACE, "logs", pod, "--since=5m"])?;
        if logs.contains(HBONE_LOG) {
            step.done_with(&format!("HTTP 200, carried over HBONE mTLS by {pod} on {}", node.trim()));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "demo/client reached the server, but {pod} on {} logged no \"{HBONE_LOG}\": the \
                 demo pods were not captured (see `kubectl --context {CONTEXT} -n {SYSTEM_NAMESPACE} \
                 logs {pod}` and its /pods endpoint)",
                node.trim()
            );
        }
        // Another request, in case the first one raced the pods' enrolment.
        let _ = kubectl(tools, &request);
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_which_tools_are_missing() {
        let none = missing_tools(&Tools::default()).unwrap_or_default();
        assert!(none.starts_with("cargo xtask kind-up needs Docker, kind and kubectl, and docker, kind, kubectl are not on PATH: install them"), "{none}");
        assert!(none.contains("Nothing was created."), "{none}");
        let some = PathBuf::from("/usr/bin/x");
        let only_kind = Tools { docker: Some(some.clone()), kind: None, kubectl: Some(some.clone()) };
        let message = missing_tools(&only_kind).unwrap_or_default();
        assert!(message.contains("and kind is not on PATH: install it"), "{message}");
        let all = Tools { docker: Some(some.clone()), kind: Some(some.clone()), kubectl: Some(some) };
        assert_eq!(missing_tools(&all), None);
    }

    #[test]
    fn names_log_files_after_images() {
        assert_eq!(image_file_name("nodemesh/mesh-node:dev"), "mesh-node");
        assert_eq!(image_file_name("mesh-control"), "mesh-control");
    }

    #[test]
    fn tells_cgroup2_apart() {
        assert!(!is_cgroup2(Path::new("/")), "/ is not a cgroup mount");
        assert!(!is_cgroup2(Path::new("/nonexistent")));
    }
}
