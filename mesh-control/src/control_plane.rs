//! Assembles the control plane from its configuration and serves it.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use mesh_api::ca::v1::certificate_service_server::CertificateServiceServer;
use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    attestation::PodDirectory,
    ca::{CertificateAuthority, RootCa, TrustBundle, TtlPolicy},
    metrics::Metrics,
    node_auth::NodeCredentials,
    service::{CaService, MAX_REQUEST_BYTES},
    tls,
};

/// Everything mesh-control needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory (or file) of Kubernetes-shaped manifests (local mode).
    pub config_dir: PathBuf,
    /// Where the root CA and node tokens are kept (`ca/`, `nodes/`).
    pub state_dir: PathBuf,
    /// The signing root's directory, when not `<state_dir>/ca` (e.g. the next root, while
    /// rotating).
    pub root_dir: Option<PathBuf>,
    pub trust_domain: String,
    pub ttl: TtlPolicy,
    /// More roots to trust (PEM files), e.g. the next root while rotating.
    pub extra_roots: Vec<PathBuf>,
    /// Extra DNS names or IPs for the serving certificate.
    pub server_names: Vec<String>,
    pub reload_interval: Duration,
}

/// The running parts of the control plane.
#[derive(Debug)]
pub struct ControlPlane {
    pub config: Config,
    pub service: CaService,
    server_identity: (String, String),
}

impl ControlPlane {
    /// Loads (or creates) the root, the trust bundle and node tokens, and reads the manifests.
    pub fn open(config: Config) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let root_dir = config.root_dir.clone().unwrap_or_else(|| config.state_dir.join("ca"));
        let (root, created) = RootCa::load_or_generate(&root_dir, &config.trust_domain)?;
        if created {
            tracing::info!(dir = %root_dir.display(), "generated a new root CA");
        }
        let mut bundle = TrustBundle::default();
        for path in &config.extra_roots {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading trust root {}", path.display()))?;
            bundle.add(&pem).with_context(|| format!("trust root {}", path.display()))?;
        }
        let server_identity = tls::server_identity(&root, &config.server_names)?;
        let ca = CertificateAuthority::new(&config.trust_domain, root, bundle, config.ttl);
        tracing::info!(
            signer = %ca.signer().fingerprint(),
            trust_bundle = ?ca.trust_bundle().fingerprints(),
            "certificate authority ready"
        );
        let nodes = NodeCredentials::open(&config.state_dir.join("nodes"))?;
        let pods = PodDirectory::default();
        let service = CaService {
            ca: Arc::new(RwLock::new(ca)),
            nodes: Arc::new(nodes),
            pods: Arc::new(pods),
            metrics: Arc::new(Metrics::default()),
        };
        let plane = ControlPlane { config, service, server_identity };
        plane.reload().context("reading the manifests")?;
        Ok(plane)
    }

    /// Re-reads the manifests: the pods nodes may obtain identities for, and a token for every
    /// node that has pods. On error the previous state stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pods = mesh_manifests::load_all(&self.config.config_dir)?;
        self.service.pods.replace(pods);
        for node in self.service.pods.nodes() {
            if self.service.nodes.ensure(&node)? {
                tracing::info!(node = %node, token = %self.service.nodes.token_path(&node).display(), "created a node token");
            }
        }
        Ok(())
    }

    /// Returns the PEM roots nodes must trust to verify mesh-control and workloads.
    pub fn trust_bundle_pem(&self) -> String {
        let ca = self.service.ca.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        ca.trust_bundle().pems().concat()
    }

    /// Serves the CA over TLS on `listener` until the future is dropped; re-reads the manifests
    /// every reload interval.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        let plane = self.clone();
        tokio::spawn(async move {
            let mut last_error = None;
            loop {
                tokio::time::sleep(plane.config.reload_interval).await;
                match plane.reload() {
                    Ok(()) => last_error = None,
                    Err(err) => {
                        let message = format!("{err:#}");
                        if last_error.as_ref() != Some(&message) {
                            tracing::error!(error = %message, "manifests are invalid; keeping the last good state");
                            last_error = Some(message);
                        }
                    }
                }
            }
        });
        let (cert, key) = &self.server_identity;
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        let ca =
            CertificateServiceServer::new(self.service.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
        Server::builder()
            .tls_config(tls)?
            .add_service(ca)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await?;
        Ok(())
    }
}
