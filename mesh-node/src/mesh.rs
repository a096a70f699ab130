//! The mesh as this node sees it: which addresses belong to meshed pods, and the identity each
//! must present (outbound connections to these go through HBONE; others stay plain TCP); and
//! the traffic config (services, policies, routes) with the load balancers' live state.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, RwLock},
};

use mesh_api::SpiffeId;
use mesh_manifests::PodKey;

use crate::{
    proxy::balancer::Balancers,
    traffic::{Traffic, TrafficSpec},
};

#[derive(Debug)]
pub struct MeshDirectory {
    peers: RwLock<HashMap<IpAddr, SpiffeId>>,
    traffic: RwLock<(TrafficSpec, Arc<Traffic>)>,
    /// Bumped whenever the traffic config changes: open connections re-check their policies.
    generation: tokio::sync::watch::Sender<u64>,
    /// Per service: endpoint health, requests in flight, circuit breakers.
    pub balancers: Balancers,
}

impl Default for MeshDirectory {
    fn default() -> Self {
        MeshDirectory {
            peers: RwLock::default(),
            traffic: RwLock::default(),
            generation: tokio::sync::watch::Sender::new(0),
            balancers: Balancers::default(),
        }
    }
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

    /// Replaces the traffic config, if it changed.
    pub fn replace_traffic(&self, spec: &TrafficSpec, trust_domain: &str) {
        let mut held = self.traffic.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.0 == *spec {
            return;
        }
        let compiled = Traffic::compile(spec, trust_domain);
        for (resource, error) in &compiled.invalid {
            tracing::error!(resource = %resource, error = %error, "traffic config not compiled; left out");
        }
        *held = (spec.clone(), Arc::new(compiled));
        drop(held);
        self.generation.send_modify(|g| *g += 1);
    }

    /// The traffic config in force.
    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.read().unwrap_or_else(std::sync::PoisonError::into_inner).1.clone()
    }

    /// Wakes up when the traffic config changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Returns the identity a meshed destination must present, if it is meshed.
    pub fn identity_of(&self, ip: IpAddr) -> Option<SpiffeId> {
        let ip = crate::traffic::unmap(ip);
        self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&ip).cloned()
    }
}
