//! Assembles the control plane from its configuration and serves it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use hyper::StatusCode;
use mesh_api::{
    ca::v1::certificate_service_server::CertificateServiceServer,
    http,
    workload::v1::{ADDRESS_TYPE, AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE},
    xds::v1::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
};
use mesh_manifests::{
    ClusterObjects,
    translate::{self, Model, TranslateOptions},
};
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming};

use crate::{
    attestation::PodDirectory,
    ca::{CertificateAuthority, RootCa, TrustBundle, TtlPolicy},
    manifest_watch::ManifestWatch,
    metrics::{Metrics, XdsTypeLabels},
    node_auth::KubernetesNodeAuth,
    node_auth::NodeCredentials,
    service::{CaService, MAX_REQUEST_BYTES},
    status::{
        Reports,
        kubernetes::{self as status_writer, StatusInput},
    },
    tls,
    xds::{
        XdsServer,
        snapshot::{self, Snapshot},
    },
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything mesh-control needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory (or file) of Kubernetes-shaped manifests (local mode); `None` when the objects
    /// come from the Kubernetes API.
    pub config_dir: Option<PathBuf>,
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
    /// Local mode on nodes that run the CNI plugin: a pod's netns comes from its node, so the
    /// `nodemesh.io/netns` annotation is optional.
    pub netns_from_cni: bool,
}

/// Mesh-wide settings of the translation (kept apart from [`Config`] so that adding one does
/// not change every place a `Config` is written out).
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// Authorization policies here without a selector apply to every workload, and their
    /// selectors pick workloads in every namespace (Istio's root namespace).
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings { root_namespace: translate::DEFAULT_ROOT_NAMESPACE.to_owned() }
    }
}

/// What the last reload of the manifests found, for the admin endpoint.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ConfigStatus {
    pub snapshot_version: String,
    pub workloads: usize,
    pub services: usize,
    pub authorization_policies: usize,
    pub http_routes: usize,
    /// Objects that could not be translated as written (Kubernetes mode skips pods and
    /// services, distributes policies failing closed, and holds back routes; see `/policies`
    /// and `/routes`).
    pub problems: Vec<String>,
    /// Why the manifests are being ignored (the last good state is served), if they are.
    pub error: Option<String>,
}

/// The running parts of the control plane.
#[derive(Debug)]
pub struct ControlPlane {
    pub config: Config,
    pub settings: MeshSettings,
    pub service: CaService,
    pub xds: XdsServer,
    snapshots: watch::Sender<Arc<Snapshot>>,
    pub config_status: Mutex<ConfigStatus>,
    /// How the last translation took each policy and route (`/policies`, `/routes`).
    pub reports: Mutex<Reports>,
    /// The manifests' files as last read (local mode).
    source_fingerprint: Mutex<Option<mesh_manifests::local::Fingerprint>>,
    server_identity: (String, String),
}

impl ControlPlane {
    /// Loads (or creates) the root, the trust bundle and node tokens, and reads the manifests.
    pub fn open(config: Config) -> anyhow::Result<Self> {
        Self::open_with(config, None)
    }

    /// Like [`ControlPlane::open`]; with `kubernetes_auth`, nodes authenticate with
    /// service-account tokens reviewed by the Kubernetes API instead of node tokens.
    pub fn open_with(config: Config, kubernetes_auth: Option<KubernetesNodeAuth>) -> anyhow::Result<Self> {
        Self::open_in_mesh(config, kubernetes_auth, MeshSettings::default())
    }

    /// Like [`ControlPlane::open_with`], with mesh-wide `settings`.
    pub fn open_in_mesh(
        config: Config,
        kubernetes_auth: Option<KubernetesNodeAuth>,
        settings: MeshSettings,
    ) -> anyhow::Result<Self> {
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
        let (nodes, metrics) = (Arc::new(nodes), Arc::new(Metrics::default()));
        let service = CaService {
            ca: Arc::new(RwLock::new(ca)),
            nodes,
            kubernetes_auth: kubernetes_auth.map(Arc::new),
            pods: Arc::new(pods),
            metrics: metrics.clone(),
        };
        let (snapshots, receiver) = watch::channel(Arc::new(Snapshot::default()));
        let xds =
            XdsServer { nodes: service.node_auth(), snapshots: receiver, status: Arc::default(), metrics };
        let plane = ControlPlane {
            config,
            settings,
            service,
            xds,
            snapshots,
            config_status: Mutex::new(ConfigStatus::default()),
            reports: Mutex::new(Reports::default()),
            source_fingerprint: Mutex::new(None),
            server_identity,
        };
        plane.reload().context("reading the manifests")?;
        Ok(plane)
    }

    /// Re-reads the manifests: the pods nodes may obtain identities for, and a token for every
    /// node that has pods. On error the previous state stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.config.config_dir else { return Ok(()) };
        // Unchanged files are not read again (a failed read is retried only when they change).
        let fingerprint = mesh_manifests::local::fingerprint(dir).ok();
        {
            let mut last = lock(&self.source_fingerprint);
            if fingerprint.is_some() && *last == fingerprint {
                return match &lock(&self.config_status).error {
                    Some(error) => Err(anyhow::anyhow!("{error}")),
                    None => Ok(()),
                };
            }
            *last = fingerprint;
        }
        let options = TranslateOptions {
            require_netns: !self.config.netns_from_cni,
            root_namespace: self.settings.root_namespace.clone(),
            ..TranslateOptions::default()
        };
        let translated = mesh_manifests::translate_dir(dir, &options);
        if let Ok((model, error)) = &translated {
            // Shown even when refused: which policy or route was rejected, and why.
            *lock(&self.reports) = Reports::of(model, error.is_none());
        }
        match translated {
            Ok((model, None)) => self.publish(&model),
            Ok((_, Some(err))) | Err(err) => {
                self.service.metrics.config_errors.inc();
                lock(&self.config_status).error = Some(err.to_string());
                Err(err.into())
            }
        }
    }

    /// Makes `model` what nodes receive and what the CA authorizes.
    pub fn publish(&self, model: &Model) -> anyhow::Result<()> {
        let snapshot = Snapshot::build(model, &self.config.trust_domain);
        *lock(&self.config_status) = ConfigStatus {
            snapshot_version: snapshot.version().to_owned(),
            workloads: model.workloads.len(),
            services: model.services.len(),
            authorization_policies: snapshot.count(AUTHORIZATION_TYPE),
            http_routes: snapshot.count(HTTP_ROUTE_TYPE),
            problems: model
                .problems
                .iter()
                .map(|p| format!("{} {}: {}", p.kind, p.object, p.message))
                .collect(),
            error: None,
        };
        for type_url in snapshot::TYPES {
            self.service
                .metrics
                .config_resources
                .get_or_create(&XdsTypeLabels { type_url: type_url.to_owned() })
                .set(snapshot.count(type_url) as i64);
        }
        self.snapshots.send_if_modified(|current| {
            if **current == snapshot {
                return false;
            }
            tracing::info!(
                version = %snapshot.version(),
                addresses = snapshot.count(ADDRESS_TYPE),
                authorizations = snapshot.count(AUTHORIZATION_TYPE),
                routes = snapshot.count(HTTP_ROUTE_TYPE),
                "configuration changed"
            );
            *current = Arc::new(snapshot);
            true
        });
        self.service.pods.replace(model);
        if self.service.kubernetes_auth.is_some() {
            return Ok(()); // nodes present service-account tokens; no node tokens to make
        }
        for node in self.service.pods.nodes() {
            if self.service.nodes.ensure(&node)? {
                tracing::info!(node = %node, token = %self.service.nodes.token_path(&node).display(), "created a node token");
            }
        }
        Ok(())
    }

    /// Translates what the Kubernetes source found and publishes it; returns the model.
    /// Pods and services that do not translate are skipped; policies that were not taken as
    /// written are still enforced (failing closed) and routes with values nodemesh cannot
    /// implement are held back; all are logged, shown on `/debug/config` and, for policies
    /// and routes, written into their status.
    pub fn publish_kubernetes(&self, objects: &ClusterObjects) -> Model {
        let options = TranslateOptions {
            require_netns: false,
            root_namespace: self.settings.root_namespace.clone(),
            ..TranslateOptions::default()
        };
        let model = translate::translate(objects, &options);
        for problem in &model.problems {
            let outcome = match problem.kind {
                "AuthorizationPolicy" => "policy not accepted; enforced failing closed",
                "HTTPRoute" => "route not accepted; not applied",
                _ => "object skipped",
            };
            tracing::warn!(kind = problem.kind, object = %problem.object, error = %problem.message, "{outcome}");
        }
        *lock(&self.reports) = Reports::of(&model, true);
        if let Err(err) = self.publish(&model) {
            tracing::error!(error = %format!("{err:#}"), "cannot publish the configuration");
        }
        model
    }

    /// Serves `/metrics`, `/debug/nodes` (each node's xDS sync), `/debug/config`, `/policies`
    /// and `/routes` (each with whether it was accepted, and why not) and `/healthz/ready` on
    /// `listener`.
    pub async fn serve_admin(self: Arc<Self>, listener: TcpListener) {
        mesh_api::http::serve(listener, "admin", move |request| {
            let plane = self.clone();
            async move {
                if request.path == "/logging" {
                    return mesh_api::logging::serve(&request); // GET shows, POST changes the filter
                }
                if !request.is_get() {
                    return http::method_not_allowed("GET");
                }
                match request.path.as_str() {
                    "/metrics" => {
                        http::respond(StatusCode::OK, http::OPENMETRICS, plane.service.metrics.render())
                    }
                    "/debug/nodes" => http::json(&*lock(&plane.xds.status)),
                    "/debug/config" => http::json(&*lock(&plane.config_status)),
                    "/policies" => {
                        let reports = lock(&plane.reports);
                        http::json(
                            &serde_json::json!({"served": reports.served, "policies": reports.policies}),
                        )
                    }
                    "/routes" => {
                        let reports = lock(&plane.reports);
                        http::json(&serde_json::json!({"served": reports.served, "routes": reports.routes}))
                    }
                    "/healthz/ready" => http::respond(StatusCode::OK, "text/plain", "ready\n"),
                    _ => http::not_found(),
                }
            }
        })
        .await;
    }

    /// Returns the PEM roots nodes must trust to verify mesh-control and workloads.
    pub fn trust_bundle_pem(&self) -> String {
        let ca = self.service.ca.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        ca.trust_bundle().pems().concat()
    }

    /// Serves the CA over TLS on `listener` until the future is dropped; re-reads the manifests
    /// when their directory reports a change (inotify) and every reload interval.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        let plane = self.clone();
        if self.config.config_dir.is_none() {
            // Kubernetes mode: the objects arrive from the watchers (see `watch_kubernetes`).
            return self.serve_grpc(listener).await;
        }
        tokio::spawn(async move {
            let mut last_error = None;
            let dir = plane.config.config_dir.as_deref().unwrap_or(std::path::Path::new("."));
            let mut watch = ManifestWatch::new(dir)
                .inspect_err(|err| tracing::warn!(error = %err, "manifests not watched; polling them only"))
                .ok();
            loop {
                let interval = tokio::time::sleep(plane.config.reload_interval);
                match &watch {
                    Some(changes) => tokio::select! {
                        () = interval => {}
                        changed = changes.changed() => if let Err(err) = changed {
                            tracing::warn!(error = %err, "watching the manifests failed; polling them only");
                            watch = None;
                        },
                    },
                    None => interval.await,
                }
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
        self.serve_grpc(listener).await
    }

    /// Watches the Kubernetes API with `client` and publishes every change, and writes each
    /// policy's and route's status, until dropped.
    pub async fn watch_kubernetes(self: Arc<Self>, client: kube::Client) {
        let plane = self.clone();
        let (inputs, receiver) = watch::channel(Arc::new(StatusInput::default()));
        // Ends when `inputs` is dropped with this future.
        tokio::spawn(status_writer::run(client.clone(), receiver));
        crate::discovery::kubernetes(client, move |objects| {
            let model = plane.publish_kubernetes(&objects);
            inputs.send_replace(Arc::new(StatusInput {
                policies: objects.authorization_policies,
                routes: objects.http_routes,
                authorizations: model.authorizations,
                route_specs: model.routes,
            }));
        })
        .await;
    }

    async fn serve_grpc(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        let (cert, key) = &self.server_identity;
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        let ca =
            CertificateServiceServer::new(self.service.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
        let xds = AggregatedDiscoveryServiceServer::new(self.xds.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        Server::builder()
            .tls_config(tls)?
            .add_service(ca)
            .add_service(xds)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await?;
        Ok(())
    }
}
