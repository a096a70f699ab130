//! mesh-control: runs nodemesh's control plane.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use mesh_control::{
    ca::{RootCa, TtlPolicy},
    control_plane::{Config, ControlPlane, MeshSettings},
    node_auth::KubernetesNodeAuth,
};

#[derive(Debug, Parser)]
#[command(name = "mesh-control", version, about = "nodemesh control plane")]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Local mode: a directory (or file) of Kubernetes-shaped manifests, re-read on change.
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: watch the API server (in-cluster config, or KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    kubernetes: bool,
    /// Local mode on nodes that run the CNI plugin (`mesh-node run --cni-socket`): pods' netns
    /// come from their node, so the `nodemesh.io/netns` annotation is optional.
    #[arg(long, requires = "config_dir")]
    pod_netns_from_cni: bool,
    /// Kubernetes mode: the node agent's service account (`namespace/name`); nodes authenticate
    /// with its projected tokens, bound to their pod.
    #[arg(long, default_value = "nodemesh-system/mesh-node")]
    node_service_account: String,
    /// Where the root CA (`ca/`) and node tokens (`nodes/`) are kept.
    #[arg(long, default_value = "/var/lib/nodemesh/control")]
    state_dir: PathBuf,
    /// The signing root's directory (`root-cert.pem`, `root-key.pem`); default `<state-dir>/ca`.
    /// Point it at a new root to rotate (see ARCHITECTURE.md, "Rotating the root").
    #[arg(long)]
    root_dir: Option<PathBuf>,
    /// The TLS listener nodes use: CA and xDS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Admin endpoint: /metrics, /debug/nodes, /debug/config, /policies, /routes, /healthz/ready.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_listen: SocketAddr,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Authorization policies in this namespace without a selector apply to every workload,
    /// and their selectors pick workloads in every namespace (Istio's root namespace).
    #[arg(long, default_value = mesh_manifests::translate::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Default certificate lifetime, seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_secs: u64,
    #[arg(long, default_value_t = 60)]
    min_cert_ttl_secs: u64,
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    max_cert_ttl_secs: u64,
    /// Extra trusted root (PEM), repeatable: used while rotating the root.
    #[arg(long = "extra-trust-root")]
    extra_roots: Vec<PathBuf>,
    /// Extra DNS name or IP for the serving certificate, repeatable.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "NODEMESH_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate a new root CA into a directory (for rotation); refuses to overwrite one.
    GenerateRoot {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The filter can be changed at run time through the admin endpoint's `/logging`.
    mesh_api::logging::init(match cli.log_format {
        LogFormat::Text => mesh_api::logging::LogFormat::Text,
        LogFormat::Json => mesh_api::logging::LogFormat::Json,
    });
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh-control: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::GenerateRoot { out, trust_domain }) = &cli.command {
        return generate_root(out, trust_domain);
    }
    let ttl = TtlPolicy {
        default: Duration::from_secs(cli.cert_ttl_secs),
        min: Duration::from_secs(cli.min_cert_ttl_secs),
        max: Duration::from_secs(cli.max_cert_ttl_secs),
    };
    anyhow::ensure!(
        ttl.min <= ttl.default && ttl.default <= ttl.max,
        "certificate TTLs must satisfy min <= default <= max (got {}s, {}s, {}s)",
        cli.min_cert_ttl_secs,
        cli.cert_ttl_secs,
        cli.max_cert_ttl_secs
    );
    let config = Config {
        config_dir: cli.config_dir.clone(),
        state_dir: cli.state_dir,
        root_dir: cli.root_dir,
        trust_domain: cli.trust_domain,
        ttl,
        extra_roots: cli.extra_roots,
        server_names: cli.server_names,
        reload_interval: Duration::from_millis(cli.reload_interval_ms.max(50)),
        netns_from_cni: cli.pod_netns_from_cni,
    };
    let settings = MeshSettings { root_namespace: cli.root_namespace };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = match cli.kubernetes {
            true => Some(
                kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?,
            ),
            false => None,
        };
        let node_auth = client
            .clone()
            .map(|client| KubernetesNodeAuth::new(client, &cli.node_service_account))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let plane = Arc::new(ControlPlane::open_in_mesh(config, node_auth, settings)?);
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        let admin = tokio::net::TcpListener::bind(cli.admin_listen)
            .await
            .with_context(|| format!("binding the admin endpoint on {}", cli.admin_listen))?;
        tokio::spawn(plane.clone().serve_admin(admin));
        if let Some(client) = client {
            tokio::spawn(plane.clone().watch_kubernetes(client));
        }
        tracing::info!(listen = %cli.listen, trust_domain = %plane.config.trust_domain, "mesh-control serving the CA and xDS");
        plane.serve(listener).await
    })
}

fn generate_root(out: &std::path::Path, trust_domain: &str) -> anyhow::Result<()> {
    let root = RootCa::generate_into(out, trust_domain)?;
    println!("generated root {} in {}", root.fingerprint(), out.display());
    Ok(())
}
