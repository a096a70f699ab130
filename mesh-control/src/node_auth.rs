//! Local-mode node authentication: one random bearer token per node.
//!
//! mesh-control keeps `<dir>/<node>.token` (0600) for every node that has pods in the manifests,
//! creating missing ones. A node agent reads its own token file and sends it with each request
//! (`authorization: Bearer <token>`, `x-nodemesh-node: <node>`) over TLS that it verifies against
//! the mesh root. In Kubernetes mode the node agent's service-account token takes this place.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

/// Bytes of randomness in a token (hex-encoded on disk).
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum NodeAuthError {
    #[error("cannot use the node token directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("node name {0:?} is not a valid Kubernetes node name")]
    BadNodeName(String),
    #[error("cannot generate a token: the system random generator failed")]
    Random,
}

/// Tokens by node name.
#[derive(Debug)]
pub struct NodeCredentials {
    dir: PathBuf,
    tokens: RwLock<BTreeMap<String, String>>,
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeCredentials {
    /// Opens (creating, 0700) the token directory and loads the tokens in it.
    pub fn open(dir: &Path) -> Result<Self, NodeAuthError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let io = |source| NodeAuthError::Io { path: dir.to_owned(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        let credentials = NodeCredentials { dir: dir.to_owned(), tokens: RwLock::new(BTreeMap::new()) };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(node) = path.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_suffix(".token"))
            else {
                continue;
            };
            let token = std::fs::read_to_string(&path)
                .map_err(|source| NodeAuthError::Io { path: path.clone(), source })?;
            credentials.write().insert(node.to_owned(), token.trim().to_owned());
        }
        Ok(credentials)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, String>> {
        self.tokens.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns the path of a node's token file.
    pub fn token_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.token"))
    }

    /// Makes sure `node` has a token, creating one if needed; returns whether one was created.
    pub fn ensure(&self, node: &str) -> Result<bool, NodeAuthError> {
        if !valid_node_name(node) {
            return Err(NodeAuthError::BadNodeName(node.to_owned()));
        }
        if self.write().contains_key(node) {
            return Ok(false);
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| NodeAuthError::Random)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.token_path(node);
        let io = |source| NodeAuthError::Io { path: path.clone(), source };
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
        file.write_all(token.as_bytes()).map_err(io)?;
        self.write().insert(node.to_owned(), token);
        Ok(true)
    }

    /// Returns whether `token` is `node`'s token. Unknown nodes never verify.
    pub fn verify(&self, node: &str, token: &str) -> bool {
        let tokens = self.tokens.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        tokens.get(node).is_some_and(|expected| constant_time_eq(expected.as_bytes(), token.as_bytes()))
    }
}

/// How nodes authenticate: per-node tokens (local mode), or service-account tokens reviewed by
/// the Kubernetes API (Kubernetes mode).
#[derive(Debug, Clone)]
pub struct NodeAuth {
    pub local: Arc<NodeCredentials>,
    pub kubernetes: Option<Arc<KubernetesNodeAuth>>,
}

impl NodeAuth {
    /// Returns the calling node's name from gRPC metadata (`x-nodemesh-node` and
    /// `authorization: Bearer <token>`), or why it is not authenticated.
    pub async fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String, String> {
        let node = metadata
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("missing {NODE_HEADER} metadata naming the calling node"))?;
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("missing `authorization: Bearer <node token>` metadata")?;
        match &self.kubernetes {
            Some(kubernetes) => kubernetes.authenticate(node, token).await?,
            None if self.local.verify(node, token) => {}
            None => return Err(format!("node {node:?} is unknown or its token is wrong")),
        }
        Ok(node.to_owned())
    }
}

mod kubernetes;

pub use kubernetes::KubernetesNodeAuth;

/// Metadata key naming the calling node.
pub const NODE_HEADER: &str = "x-nodemesh-node";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_created_once_private_and_verified() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("nm-node-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let creds = NodeCredentials::open(&dir).expect("open");
        assert!(creds.ensure("node-a").expect("create"));
        assert!(!creds.ensure("node-a").expect("exists"));
        let path = creds.token_path("node-a");
        assert_eq!(std::fs::metadata(&path).expect("file").permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(&path).expect("read");
        assert_eq!(token.len(), 64);
        assert!(creds.verify("node-a", &token));
        assert!(!creds.verify("node-a", &token[..63]));
        assert!(!creds.verify("node-b", &token), "unknown node");
        assert!(!creds.verify("node-a", ""));
        assert!(creds.ensure("Bad/Name").is_err());
        // A restarted control plane reads the same tokens.
        assert!(NodeCredentials::open(&dir).expect("reopen").verify("node-a", &token));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
