//! Where meshctl finds things: mesh-control's admin endpoint and each node's, possibly inside a
//! network namespace (the local demo runs every node in its own). Like a kubeconfig, a context
//! file names them once; `cargo xtask demo` and the test bed write one.
//!
//! ```yaml
//! controlPlane:
//!   admin: 127.0.0.1:15014
//!   netns: /run/netns/nm-demo-na     # optional: connect from inside this netns
//!   configDir: /tmp/nodemesh-demo    # local mode: the manifests directory mesh-control reads
//! nodes:
//!   - name: node-a
//!     admin: 127.0.0.1:15000
//!     netns: /run/netns/nm-demo-na
//! ```
//!
//! Without a context meshctl runs where a node agent runs (its host network): mesh-control at
//! `127.0.0.1:15014` and this node's admin endpoint at `127.0.0.1:15000`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// An admin endpoint and the netns it is reached from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub admin: SocketAddr,
    /// A netns file (e.g. `/run/netns/<name>`); absent: meshctl's own netns.
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    pub admin: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Local mode: the directory of manifests mesh-control reads (connectivity-test writes its
    /// test objects there, and removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub admin: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

impl ControlPlane {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint { admin: self.admin, netns: self.netns.clone() }
    }
}

impl Node {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint { admin: self.admin, netns: self.netns.clone() }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    pub control_plane: ControlPlane,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// mesh-control's admin port (its gRPC port is 15012).
pub const CONTROL_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15014);
/// A node agent's admin port.
pub const NODE_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

impl Default for Context {
    fn default() -> Self {
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "local".into());
        Context {
            control_plane: ControlPlane { admin: CONTROL_ADMIN, netns: None, config_dir: None },
            nodes: vec![Node { name: node, admin: NODE_ADMIN, netns: None }],
        }
    }
}

impl Context {
    /// Reads a context file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(Context::default()) };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the meshctl context {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("meshctl context {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let context: Context = serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut names = std::collections::BTreeSet::new();
        for node in &context.nodes {
            if !names.insert(node.name.as_str()) {
                bail!("node {} is listed twice", node.name);
            }
        }
        Ok(context)
    }

    /// Writes the context as YAML (the round-trip test; the test bed writes its own by hand).
    #[cfg(test)]
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        serde_saphyr::to_string(self).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The node called `name`, with the known names in the error.
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let known: Vec<_> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!("no node {name:?} in the context (known: {})", known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_round_trips_and_rejects_typos_and_duplicates() {
        let text = "controlPlane:\n  admin: 127.0.0.1:15014\n  netns: /run/netns/x\n  configDir: /tmp/m\n\
                    nodes:\n  - name: node-a\n    admin: 127.0.0.1:15000\n    netns: /run/netns/x\n";
        let context = Context::parse(text).expect("valid");
        assert_eq!(context.nodes[0].name, "node-a");
        assert_eq!(context.control_plane.config_dir.as_deref(), Some(Path::new("/tmp/m")));
        assert_eq!(Context::parse(&context.to_yaml().expect("yaml")).expect("round trip"), context);
        let typo = text.replace("configDir", "configdir");
        assert!(Context::parse(&typo).unwrap_err().to_string().contains("configdir"));
        let twice = format!("{text}  - name: node-a\n    admin: 127.0.0.1:15000\n");
        assert!(Context::parse(&twice).unwrap_err().to_string().contains("listed twice"));
        assert!(context.node("node-z").unwrap_err().to_string().contains("known: node-a"));
    }
}
