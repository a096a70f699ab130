//! The mesh as this node sees it: which addresses belong to meshed pods, and the identity each
//! must present. Outbound connections to these go through HBONE; others stay plain TCP.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::RwLock,
};

use mesh_api::SpiffeId;
use mesh_manifests::PodKey;

#[derive(Debug, Default)]
pub struct MeshDirectory {
    peers: RwLock<HashMap<IpAddr, SpiffeId>>,
}

impl MeshDirectory {
    /// Replaces the view with every meshed pod of every node: (pod, address, service account).
    pub fn replace(&self, pods: &[(PodKey, Ipv4Addr, String)], trust_domain: &str) {
        let peers = pods
            .iter()
            .filter_map(|(key, ip, service_account)| {
                match SpiffeId::new(trust_domain, &key.namespace, service_account) {
                    Ok(id) => Some((IpAddr::V4(*ip), id)),
                    Err(err) => {
                        tracing::warn!(pod = %key, error = %err, "pod has no valid identity; not meshed");
                        None
                    }
                }
            })
            .collect();
        *self.peers.write().unwrap_or_else(std::sync::PoisonError::into_inner) = peers;
    }

    /// Returns the identity a meshed destination must present, if it is meshed.
    pub fn identity_of(&self, ip: IpAddr) -> Option<SpiffeId> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&ip).cloned()
    }
}
