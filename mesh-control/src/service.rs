//! The CA's gRPC service: authenticate the node, authorize the identity, sign.

use std::sync::{Arc, RwLock};

use mesh_api::{
    SpiffeId,
    ca::v1::{CertificateRequest, CertificateResponse, certificate_service_server::CertificateService},
};
use tonic::{Request, Response, Status};

use crate::{
    attestation::PodDirectory,
    ca::{CaError, CertificateAuthority},
    metrics::{CaOutcome, Metrics},
    node_auth::{KubernetesNodeAuth, NodeAuth, NodeCredentials},
};

pub use crate::node_auth::NODE_HEADER;
/// Largest request message the CA decodes; bigger ones are refused before parsing.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The CA behind its gRPC API.
#[derive(Debug, Clone)]
pub struct CaService {
    pub ca: Arc<RwLock<CertificateAuthority>>,
    pub nodes: Arc<NodeCredentials>,
    /// Set in Kubernetes mode: nodes present service-account tokens instead of node tokens.
    pub kubernetes_auth: Option<Arc<KubernetesNodeAuth>>,
    pub pods: Arc<PodDirectory>,
    pub metrics: Arc<Metrics>,
}

type Refusal = (CaOutcome, Status);

fn unauthenticated(message: impl Into<String>) -> Refusal {
    (CaOutcome::Unauthenticated, Status::unauthenticated(message))
}

fn invalid(message: impl Into<String>) -> Refusal {
    (CaOutcome::InvalidRequest, Status::invalid_argument(message))
}

impl CaService {
    /// Returns the authenticated node's name.
    pub fn node_auth(&self) -> NodeAuth {
        NodeAuth { local: self.nodes.clone(), kubernetes: self.kubernetes_auth.clone() }
    }

    fn handle(
        &self,
        node: String,
        request: Request<CertificateRequest>,
    ) -> Result<(String, SpiffeId, CertificateResponse), Refusal> {
        let request = request.into_inner();
        let ca = self.ca.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wanted =
            request.identity.ok_or_else(|| invalid("identity (namespace, service account) is required"))?;
        let identity = SpiffeId::new(ca.trust_domain(), &wanted.namespace, &wanted.service_account)
            .map_err(|e| invalid(e.to_string()))?;
        if !self.pods.runs_on(&node, &identity) {
            return Err((
                CaOutcome::NotOnNode,
                Status::permission_denied(format!(
                    "no enrolled pod with identity {identity} runs on node {node}"
                )),
            ));
        }
        let issued =
            ca.sign(&request.csr, &identity, request.validity_duration).map_err(|err| match err {
                CaError::Signing(e) => {
                    (CaOutcome::Internal, Status::internal(format!("signing failed: {e}")))
                }
                other => invalid(other.to_string()),
            })?;
        Ok((
            node,
            identity,
            CertificateResponse { cert_chain: issued.chain, trust_bundle: ca.trust_bundle().pems() },
        ))
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let authenticated = self.node_auth().authenticate(request.metadata()).await.map_err(unauthenticated);
        match authenticated.and_then(|node| self.handle(node, request)) {
            Ok((node, identity, response)) => {
                self.metrics.count(CaOutcome::Issued);
                tracing::info!(node = %node, identity = %identity, "certificate issued");
                Ok(Response::new(response))
            }
            Err((outcome, status)) => {
                self.metrics.count(outcome);
                tracing::warn!(?outcome, error = %status.message(), "certificate refused; nothing signed");
                Err(status)
            }
        }
    }
}
