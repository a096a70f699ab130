//! mesh-node: nodemesh's per-node agent and shared proxy, one process per node.
//!
//! It installs the capture programs, enrols the node's pods (opening listeners inside each
//! pod's netns), forwards their captured connections, and serves admin, metrics and readiness.
//! See ARCHITECTURE.md for the data path.

mod admin;
mod bpffs;
mod capture;
mod cgroup;
mod cni;
mod connections;
mod control_plane;
mod desired;
mod explain;
mod identity;
mod mesh;
mod metrics;
mod netns;
mod node;
mod pod;
mod proxy;
mod state_dir;
mod tls;
mod traffic;
mod xds;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::unix::AsyncFd;

use crate::{
    admin::Endpoint,
    capture::{Capture, CaptureConfig, KernelLogger},
    control_plane::ControlPlane,
    desired::MeshView,
    node::Node,
    state_dir::StateDir,
    xds::{XdsClient, store::ConfigStore},
};

#[derive(Debug, Parser)]
#[command(name = "mesh-node", version, about = "nodemesh node agent and shared proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "NODEMESH_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Installs capture, enrols this node's pods and runs the proxy.
    Run(Box<RunArgs>),
    /// Detaches and unpins everything mesh-node installed for a node (uninstall), and takes
    /// the CNI plugin out of the cluster's CNI config when given its directories.
    Cleanup {
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        #[arg(long, requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
    /// The CNI plugin, as the container runtime runs it (installed as `nodemesh-cni`).
    #[command(hide = true)]
    Cni,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// This node's name: only pods with this `spec.nodeName` are enrolled.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Standalone mode, without mesh-control: a YAML file or directory of Kubernetes-shaped
    /// Namespace and Pod manifests, re-read every reload interval (plain TCP only).
    #[arg(long, required_unless_present = "control_plane", conflicts_with = "control_plane")]
    pods: Option<PathBuf>,
    /// The cgroup v2 directory holding this node's pods; capture applies below it.
    #[arg(long)]
    pods_cgroup: PathBuf,
    /// The cgroup v2 directory mesh-node moves itself into (created if missing).
    #[arg(long)]
    proxy_cgroup: PathBuf,
    /// Mount point of the BPF filesystem (mounted if needed); pins go to <bpffs>/nodemesh/<node>.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The kernel programs' object file (built by `cargo xtask build-ebpf`).
    #[arg(long, env = "NODEMESH_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// How often the pod manifests are re-read.
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    /// Destination ports never captured outbound (repeatable).
    #[arg(long = "exclude-outbound-port")]
    excluded_ports: Vec<u16>,
    /// mesh-control, e.g. `https://10.0.0.1:15012`: the config (xDS) and the CA.
    #[arg(long, alias = "ca-address", requires_all = ["control_plane_roots", "node_token_file"])]
    control_plane: Option<String>,
    /// PEM roots that sign mesh-control's serving certificate (bootstraps the trust bundle).
    #[arg(long, alias = "ca-trust-roots")]
    control_plane_roots: Option<PathBuf>,
    /// Private state kept across restarts (last good config, certificates): a root-only tmpfs.
    #[arg(long, default_value = "/run/nodemesh")]
    state_dir: PathBuf,
    /// This node's token for mesh-control, re-read before each request: in local mode the
    /// file mesh-control wrote; in Kubernetes a projected service-account token (it rotates).
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Requested workload certificate lifetime in seconds; 0 = the CA's default.
    #[arg(long, default_value_t = 0)]
    cert_validity_secs: u64,
    /// Pool HBONE tunnels (default). `--hbone-tunnel-reuse=false` opens a fresh mTLS tunnel for
    /// every connection and closes it with the connection: only for measuring tunnel setup
    /// (`cargo xtask bench`), hence hidden.
    #[arg(long, hide = true, default_value_t = true, action = clap::ArgAction::Set)]
    hbone_tunnel_reuse: bool,
    /// Relay authorized plain TCP connections inside the kernel (sk_skb redirect, default):
    /// the proxy sees their ends, not their bytes. `--kernel-relay=false` relays them in the
    /// proxy (splice), e.g. on a kernel without sockmap support.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kernel_relay: bool,
    /// Kubernetes enrolment: the root-only Unix socket where the CNI plugin announces new pods.
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// The cluster's CNI config directory: the plugin is chained into its config list.
    #[arg(long, requires_all = ["cni_socket", "cni_bin_dir"])]
    cni_conf_dir: Option<PathBuf>,
    /// The CNI binary directory the plugin is installed into.
    #[arg(long, requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// How long a new pod of an ambient namespace may wait for its capture before its creation
    /// fails (and the kubelet retries).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    cni_timeout_secs: u64,
    /// Namespaces whose pods the plugin never holds (repeatable).
    #[arg(long = "cni-exempt-namespace", default_values = cni::DEFAULT_EXEMPT_NAMESPACES)]
    cni_exempt_namespaces: Vec<String>,
}

fn main() -> std::process::ExitCode {
    // The container runtime runs the plugin by its name, with no arguments.
    let invoked_as = std::env::args_os().next().map(PathBuf::from);
    if invoked_as.as_deref().and_then(Path::file_name).is_some_and(|n| n == cni::PLUGIN_TYPE) {
        return cni::plugin::main();
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Cni) {
        return cni::plugin::main();
    }
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Cleanup { node_name, bpffs, cni_conf_dir, cni_bin_dir } => {
            cleanup(&node_name, &bpffs, cni_conf_dir.zip(cni_bin_dir))
        }
        Command::Cni => unreachable!("handled above"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let message = error_chain(&err);
            tracing::error!("{message}");
            eprintln!("mesh-node: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Joins an error and its causes, skipping causes whose text the message already contains
/// (most of our errors spell out their source).
fn error_chain(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
    }
    message
}

/// Installs logging with a filter the admin endpoint's `/logging` can change at run time (and
/// the `log` bridge, which carries aya-log's kernel records).
fn init_tracing(format: LogFormat) {
    mesh_api::logging::init(match format {
        LogFormat::Text => mesh_api::logging::LogFormat::Text,
        LogFormat::Json => mesh_api::logging::LogFormat::Json,
    });
}

fn default_bpf_object() -> PathBuf {
    let built =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    if built.is_file() { built } else { PathBuf::from("/usr/lib/nodemesh/mesh-ebpf") }
}

/// Raises the open-files limit to the hard limit: each proxied connection holds two sockets.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn pin_root(bpffs: &Path, node: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !node.is_empty() && node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
        "node name {node:?} must be a Kubernetes node name (letters, digits, '-' and '.')"
    );
    Ok(bpffs.join("nodemesh").join(node))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("mesh-node must run as root (it loads BPF programs and enters pod network namespaces)");
    }
    let pin_root = pin_root(&args.bpffs, &args.node_name)?;
    let pods_cgroup = cgroup::validate_pods_cgroup(&args.pods_cgroup)?;
    // Before any socket exists: sockets belong to the cgroup of the process creating them.
    let proxy_cgroup = cgroup::join_proxy_cgroup(&args.proxy_cgroup, &pods_cgroup)?;
    raise_fd_limit();
    bpffs::ensure_mounted(&args.bpffs)?;
    let standalone = match &args.pods {
        Some(path) => {
            let all =
                mesh_manifests::load_all(path).with_context(|| format!("reading {}", path.display()))?;
            Some((path.clone(), all))
        }
        None => None,
    };

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("mesh-node").build()?;
    runtime.block_on(async move {
        let config = CaptureConfig {
            object: args.bpf_object.clone().unwrap_or_else(default_bpf_object),
            pin_root,
            pods_cgroup: pods_cgroup.clone(),
            excluded_ports: args.excluded_ports.clone(),
            kernel_relay: args.kernel_relay,
        };
        let (capture, logger) = Capture::install(&config)?;
        tokio::spawn(forward_kernel_logs(logger));
        tracing::info!(
            node = %args.node_name, pods_cgroup = %pods_cgroup.display(), proxy_cgroup = %proxy_cgroup.display(),
            pins = %config.pin_root.display(), "capture programs attached"
        );
        let control = control_plane(&args)?;
        let state = match &control {
            Some(_) => Some(StateDir::open(&args.state_dir.join(&args.node_name))?),
            None => None,
        };
        let identities = control.as_ref().map(|control| {
            let client = identity::CaClient::new(control.clone(), Duration::from_secs(args.cert_validity_secs));
            identity::IdentityManager::new(client, state.clone())
        });
        let xds = control.as_ref().map(|control| XdsClient::new(control.clone(), ConfigStore::load(state.clone())));
        let source = match (&args.pods, &control) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(control)) => format!("xDS from {}", control.address()),
            (None, None) => String::new(),
        };
        let node = Arc::new(Node::new(
            args.node_name.clone(),
            source,
            xds.clone(),
            Arc::new(capture),
            identities,
            state.clone(),
            args.trust_domain.clone(),
            args.hbone_tunnel_reuse,
        ));

        let endpoints = [
            (args.admin_addr, Endpoint::Admin),
            (args.metrics_addr, Endpoint::Metrics),
            (args.readiness_addr, Endpoint::Readiness),
        ];
        for (addr, endpoint) in endpoints {
            let listener = admin::bind(addr).await.with_context(|| format!("binding the {endpoint:?} endpoint on {addr}"))?;
            tokio::spawn(admin::serve(listener, node.clone(), endpoint));
        }

        if let Some(socket) = &args.cni_socket {
            let listener = cni::agent::bind(socket)?;
            tokio::spawn(cni::agent::serve(listener, node.clone(), Duration::from_secs(args.cni_timeout_secs)));
            tracing::info!(socket = %socket.display(), "listening for the CNI plugin");
        }
        if let (Some(conf_dir), Some(bin_dir), Some(socket)) = (&args.cni_conf_dir, &args.cni_bin_dir, &args.cni_socket) {
            let install = cni::install::CniInstall {
                conf_dir: conf_dir.clone(),
                bin_dir: bin_dir.clone(),
                socket: socket.clone(),
                timeout_secs: args.cni_timeout_secs,
                exempt_namespaces: args.cni_exempt_namespaces.clone(),
            };
            install.install_binary()?;
            tokio::spawn(keep_cni_chained(install));
        }

        let interval = Duration::from_millis(args.reload_interval_ms.max(50));
        match (standalone, xds) {
            (Some((path, all)), _) => {
                node.apply_mesh(MeshView::from_manifests(all.clone())).await;
                tokio::spawn(reload_loop(node.clone(), path, all, interval));
            }
            (None, Some(xds)) => {
                let (view, held) = {
                    let store = xds.store.lock().await;
                    (store.view(), !store.is_empty())
                };
                if held {
                    // Serve at once from the last good config; xDS brings it up to date.
                    tracing::info!(workloads = view.workloads.len(), "serving the persisted config until mesh-control answers");
                    node.apply_mesh(view).await;
                }
                tokio::spawn(xds.run(node.clone()));
            }
            (None, None) => unreachable!("clap requires --pods or --control-plane"),
        }
        wait_for_shutdown().await?;
        // Capture stays pinned: until the next mesh-node starts, enrolled pods fail closed.
        tracing::info!("shutting down; capture stays installed for the next mesh-node");
        Ok(())
    })
}

/// Connects to mesh-control when one is configured.
fn control_plane(args: &RunArgs) -> anyhow::Result<Option<ControlPlane>> {
    let (Some(address), Some(roots), Some(token)) =
        (&args.control_plane, &args.control_plane_roots, &args.node_token_file)
    else {
        return Ok(None);
    };
    let roots_pem = std::fs::read_to_string(roots)
        .with_context(|| format!("reading mesh-control trust roots {}", roots.display()))?;
    Ok(Some(ControlPlane::with_token_file(address, &roots_pem, &args.node_name, token)?))
}

/// Re-reads the pod source and applies changes; on a bad file the last good state stays.
async fn reload_loop(
    node: Arc<Node>,
    path: PathBuf,
    mut current: Vec<mesh_manifests::EnrolledPodSpec>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    loop {
        ticker.tick().await;
        let path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || mesh_manifests::load_all(&path)).await;
        match loaded {
            Ok(Ok(all)) => {
                if last_error.take().is_some() {
                    tracing::info!("pod manifests are valid again");
                    node.set_source_error(None);
                }
                // Apply changes, and retry pods that failed to enrol.
                if all != current || !node.status().await.failed_pods.is_empty() {
                    node.apply_mesh(MeshView::from_manifests(all.clone())).await;
                    current = all;
                }
            }
            Ok(Err(err)) => {
                let message = err.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "pod manifests are invalid; keeping the last good state");
                    node.set_source_error(Some(message.clone()));
                    last_error = Some(message);
                }
            }
            Err(err) => tracing::error!(error = %err, "reading pod manifests panicked"),
        }
    }
}

/// Polls aya-log's ring buffer and hands records to `log`, which tracing receives.
async fn forward_kernel_logs(logger: KernelLogger) {
    // SAFETY: the AsyncFd owns the logger, so the ring buffer's fd stays open while registered.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read kernel program logs");
            return;
        }
    };
    loop {
        match logger.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(err) => {
                tracing::warn!(error = %err, "kernel program log reader stopped");
                return;
            }
        }
    }
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Keeps the plugin chained into the cluster's CNI config: it may not exist yet when mesh-node
/// starts, and the cluster's network plugin may rewrite it.
async fn keep_cni_chained(install: cni::install::CniInstall) {
    let mut last: Option<Result<Option<PathBuf>, String>> = None;
    loop {
        let attempt = install.clone();
        let outcome = match tokio::task::spawn_blocking(move || attempt.install_config()).await {
            Ok(result) => result.map_err(|e| format!("{e:#}")),
            Err(err) => Err(err.to_string()),
        };
        if last.as_ref() != Some(&outcome) {
            match &outcome {
                Ok(Some(file)) => tracing::info!(config = %file.display(), "CNI plugin chained"),
                Ok(None) => tracing::warn!(
                    dir = %install.conf_dir.display(),
                    "no CNI config yet (the cluster's network plugin writes it); waiting"
                ),
                Err(err) => tracing::error!(error = %err, "cannot chain the CNI plugin"),
            }
            last = Some(outcome);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn cleanup(node: &str, bpffs: &Path, cni: Option<(PathBuf, PathBuf)>) -> anyhow::Result<()> {
    if let Some((conf_dir, bin_dir)) = cni {
        let install = cni::install::CniInstall {
            conf_dir,
            bin_dir,
            socket: PathBuf::from(cni::DEFAULT_SOCKET),
            timeout_secs: 0,
            exempt_namespaces: Vec::new(),
        };
        if install.uninstall()? {
            println!("removed the CNI plugin and its entry from {}", install.conf_dir.display());
        }
    }
    let root = pin_root(bpffs, node)?;
    if !root.exists() {
        println!("nothing installed for node {node} under {}", root.display());
        return Ok(());
    }
    let removed = capture::remove_all(&root)?;
    println!("removed {removed} pinned links and maps of node {node} from {}", root.display());
    Ok(())
}
