//! Node authorization: a node may obtain only the identities of pods scheduled on it.

use std::sync::RwLock;

use mesh_api::SpiffeId;
use mesh_manifests::translate::{Model, WorkloadSpec};

/// The meshed pods the control plane knows, by node.
#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: RwLock<Vec<WorkloadSpec>>,
}

impl PodDirectory {
    /// Replaces the known pods with the meshed workloads of a model.
    pub fn replace(&self, model: &Model) {
        let meshed = model.workloads.iter().filter(|w| w.membership.is_some()).cloned().collect();
        *self.pods.write().unwrap_or_else(std::sync::PoisonError::into_inner) = meshed;
    }

    /// Returns the nodes that have pods.
    pub fn nodes(&self) -> Vec<String> {
        let pods = self.pods.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut nodes: Vec<String> = pods.iter().map(|p| p.node.clone()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Returns whether a pod with `identity`'s namespace and service account runs on `node`.
    pub fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool {
        let pods = self.pods.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        pods.iter().any(|p| {
            p.node == node
                && p.key.namespace == identity.namespace()
                && p.service_account == identity.service_account()
        })
    }
}
