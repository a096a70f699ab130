//! Kubernetes enrolment at pod creation: a chained CNI plugin (`nodemesh-cni`, this binary
//! under another name) asks the node agent over a Unix socket to capture each new pod before
//! the runtime starts its containers, and fails the pod's creation when it cannot.
//!
//! The plugin holds a pod of an ambient namespace until the agent has enrolled it (its address
//! and netns come from the plugin; its identity and mode from mesh-control). Pods of other
//! namespaces start at once; exempt namespaces (the mesh's own, kube-system) never ask.

pub mod agent;
pub mod install;
pub mod plugin;

use std::{net::Ipv4Addr, path::PathBuf};

use mesh_manifests::PodKey;
use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin.
pub const DEFAULT_SOCKET: &str = "/var/run/nodemesh/cni.sock";
/// The plugin's name in the CNI config (`type`) and in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "nodemesh-cni";
/// Namespaces whose pods never wait for the agent: the mesh's own pods must start for the
/// mesh to work at all, and the cluster's system pods must not depend on it.
pub const DEFAULT_EXEMPT_NAMESPACES: [&str; 2] = ["kube-system", "nodemesh-system"];
/// A request line is small; anything longer is not from the plugin.
const MAX_MESSAGE: usize = 64 * 1024;

/// One request from the plugin to the agent, a JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Add {
        pod: PodKey,
        container_id: String,
        netns: PathBuf,
        ip: Ipv4Addr,
        /// How long the plugin waits for the answer (its `timeoutSeconds`); the agent answers
        /// within it, and within its own limit.
        #[serde(default)]
        wait_secs: u64,
    },
    Del {
        pod: PodKey,
        container_id: String,
    },
    Check {
        pod: PodKey,
    },
    /// Whether the agent is up (CNI `STATUS`).
    Status,
}

/// The agent's answer, a JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the pod may go ahead.
    pub ok: bool,
    /// Whether its traffic is captured.
    pub enrolled: bool,
    pub message: String,
}
