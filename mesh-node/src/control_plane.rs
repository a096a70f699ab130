//! How the node reaches mesh-control (CA and xDS share it): the address, the roots mesh-control
//! is verified with, and the credentials the node presents.
//!
//! The roots start as the configured file and then follow the trust bundle the CA sends with
//! each certificate, so the node keeps trusting mesh-control while the mesh root is rotated.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The name mesh-control's serving certificate carries, whatever address is dialled.
const SERVER_NAME: &str = "mesh-control";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Metadata naming the calling node (mesh-control's `NODE_HEADER`).
const NODE_HEADER: &str = "x-nodemesh-node";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("invalid control plane address {0:?}")]
    Address(String),
    #[error("control plane TLS configuration: {0}")]
    Tls(String),
    #[error("node name or token is not valid in gRPC metadata")]
    Credentials,
    #[error("cannot read the node token {0}: {1}")]
    Token(PathBuf, std::io::Error),
}

fn read_token(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

#[derive(Debug)]
struct Inner {
    address: String,
    node: String,
    /// The token as last read; re-read from `token_file` for each request, since projected
    /// service-account tokens rotate.
    token: Mutex<String>,
    token_file: Option<PathBuf>,
    /// The roots in use (PEM) and a channel verifying with them.
    roots: Mutex<(String, Channel)>,
}

/// A cheap handle: clones share the channel and the roots.
#[derive(Debug, Clone)]
pub struct ControlPlane(Arc<Inner>);

impl ControlPlane {
    /// Prepares the connection; it is made (and re-made) on demand.
    pub fn new(address: &str, roots_pem: &str, node: &str, token: &str) -> Result<Self, ControlPlaneError> {
        tonic::metadata::MetadataValue::try_from(node).map_err(|_| ControlPlaneError::Credentials)?;
        tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ControlPlaneError::Credentials)?;
        let channel = channel(address, roots_pem)?;
        Ok(ControlPlane(Arc::new(Inner {
            address: address.to_owned(),
            node: node.to_owned(),
            token: Mutex::new(token.to_owned()),
            token_file: None,
            roots: Mutex::new((roots_pem.to_owned(), channel)),
        })))
    }

    /// Like [`ControlPlane::new`], with the token read from `token_file` now and before each
    /// request (a rotated token is picked up; if the file cannot be read, the last one is sent).
    pub fn with_token_file(
        address: &str,
        roots_pem: &str,
        node: &str,
        token_file: &Path,
    ) -> Result<Self, ControlPlaneError> {
        let token = read_token(token_file).map_err(|e| ControlPlaneError::Token(token_file.to_owned(), e))?;
        let mut control = Self::new(address, roots_pem, node, &token)?;
        if let Some(inner) = Arc::get_mut(&mut control.0) {
            inner.token_file = Some(token_file.to_owned());
        }
        Ok(control)
    }

    pub fn node(&self) -> &str {
        &self.0.node
    }

    pub fn address(&self) -> &str {
        &self.0.address
    }

    /// A channel verifying mesh-control with the current roots.
    pub fn channel(&self) -> Channel {
        self.0.roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1.clone()
    }

    /// Adds the node's name and token to a request.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        let token = {
            let mut token = self.0.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(fresh) = self.0.token_file.as_deref().and_then(|f| read_token(f).ok()) {
                *token = fresh;
            }
            token.clone()
        };
        let metadata = request.metadata_mut();
        // The name was checked in `new`; a token that is not valid metadata is not sent.
        if let Ok(node) = self.0.node.parse() {
            metadata.insert(NODE_HEADER, node);
        }
        if let Ok(token) = format!("Bearer {token}").parse() {
            metadata.insert("authorization", token);
        }
    }

    /// Verifies mesh-control with `bundle` (PEM roots) from now on, if it differs.
    pub fn follow_bundle(&self, bundle: &[String]) -> Result<(), ControlPlaneError> {
        let pem = bundle.concat();
        let mut roots = self.0.roots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if roots.0 != pem {
            *roots = (pem.clone(), channel(&self.0.address, &pem)?);
            tracing::info!(roots = bundle.len(), "verifying mesh-control with the CA's trust bundle");
        }
        Ok(())
    }
}

/// A lazily connecting channel that verifies mesh-control with `roots_pem`.
fn channel(address: &str, roots_pem: &str) -> Result<Channel, ControlPlaneError> {
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots_pem)).domain_name(SERVER_NAME);
    Ok(Channel::from_shared(address.to_owned())
        .map_err(|_| ControlPlaneError::Address(address.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| ControlPlaneError::Tls(e.to_string()))?
        .connect_lazy())
}
